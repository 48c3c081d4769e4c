//! An agent, or a relay, driven by hand: it says exactly what a test wants, right or wrong.

use std::time::Duration;
use tether_common::wire::control::{read_frame, write_frame};

use tether_common::net::ports::{PortRange, Proto};
use tether_common::trust::identity::Identity;
use tether_common::trust::tls;
use tether_common::wire::protocol::{
    AgentMessage, CloseCode, ForwardRequest, ForwardResult, Hello, RelayMessage, Welcome, VERSION,
};

use crate::{within, RelayHandle};

/// An authenticated connection to a relay and its control stream, before anything is said.
pub struct RawAgent {
    /// Kept so that the connection lives as long as the agent.
    pub endpoint: quinn::Endpoint,
    pub conn: quinn::Connection,
    pub send: quinn::SendStream,
    pub recv: quinn::RecvStream,
}

impl RawAgent {
    /// Completes the handshake with `identity`'s key and opens the control stream.
    pub async fn connect(identity: &Identity, relay: &RelayHandle) -> Self {
        Self::connect_to(identity, relay.addr, relay.fingerprint).await
    }

    /// [`RawAgent::connect`] to a relay at `addr` with key `fingerprint`.
    pub async fn connect_to(
        identity: &Identity,
        addr: std::net::SocketAddr,
        fingerprint: tether_common::trust::identity::Fingerprint,
    ) -> Self {
        let (client, _) = tls::client_config(identity, fingerprint).unwrap();
        let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        let connecting = endpoint
            .connect_with(client, addr, tls::SERVER_NAME)
            .unwrap();
        let conn = within("the handshake", connecting).await.unwrap();
        let (send, recv) = conn.open_bi().await.unwrap();
        Self {
            endpoint,
            conn,
            send,
            recv,
        }
    }

    /// Says Hello with `forwards`, exactly as given, and returns the relay's results.
    pub async fn hello(&mut self, forwards: Vec<ForwardRequest>) -> Vec<ForwardResult> {
        let hello = Hello {
            version: VERSION,
            resume: None,
            forwards,
        };
        self.write(&AgentMessage::Hello(hello).encode()).await;
        let (kind, body) = within("Welcome", read_frame(&mut self.recv)).await.unwrap();
        let RelayMessage::Welcome(welcome) = RelayMessage::decode(kind, &body).unwrap() else {
            panic!("the relay answered Hello with something other than Welcome");
        };
        welcome.results
    }

    /// Writes raw bytes on the control stream.
    pub async fn write(&mut self, bytes: &[u8]) {
        write_frame(&mut self.send, bytes).await.unwrap();
    }

    /// Waits for the relay to close the connection, and returns its code.
    pub async fn closed_by_relay(&self) -> Option<CloseCode> {
        match within("the relay to close the session", self.conn.closed()).await {
            quinn::ConnectionError::ApplicationClosed(close) => {
                CloseCode::from_code(close.error_code)
            }
            other => panic!("the session ended otherwise: {other}"),
        }
    }
}

/// A relay driven by hand: it accepts one agent's sessions and says exactly what a test wants,
/// so that a test can stage what a real relay does only by chance of timing.
pub struct RawRelay {
    pub endpoint: quinn::Endpoint,
    pub fingerprint: tether_common::trust::identity::Fingerprint,
}

impl RawRelay {
    /// Listens on loopback with `identity`'s key, admitting only `agent`'s.
    pub fn bind(identity: &Identity, agent: tether_common::trust::identity::Fingerprint) -> Self {
        let pins = std::sync::Arc::new(tls::AgentPins::new([agent]));
        let mut server = tls::server_config(identity, pins).unwrap();
        server.transport_config(tether_common::transport::quic::relay());
        let endpoint = quinn::Endpoint::server(server, "127.0.0.1:0".parse().unwrap()).unwrap();
        Self {
            endpoint,
            fingerprint: identity.fingerprint(),
        }
    }

    pub fn addr(&self) -> std::net::SocketAddr {
        self.endpoint.local_addr().unwrap()
    }

    /// Accepts the agent's next session, reads its Hello and answers with `welcome`.
    pub async fn accept(&self, welcome: impl FnOnce(&Hello) -> Welcome) -> RawSession {
        let incoming = within("the agent to connect", self.endpoint.accept())
            .await
            .unwrap();
        let conn = within("the handshake", incoming.accept().unwrap())
            .await
            .unwrap();
        let (mut send, mut recv) = within("the control stream", conn.accept_bi())
            .await
            .unwrap();
        let (kind, body) = within("Hello", read_frame(&mut recv)).await.unwrap();
        let AgentMessage::Hello(hello) = AgentMessage::decode(kind, &body).unwrap() else {
            panic!("the agent's first message is not Hello");
        };
        let answer = RelayMessage::Welcome(welcome(&hello)).encode();
        write_frame(&mut send, &answer).await.unwrap();
        RawSession {
            conn,
            hello,
            control: (send, recv),
        }
    }
}

/// A session a [`RawRelay`] accepted.
pub struct RawSession {
    pub conn: quinn::Connection,
    pub hello: Hello,
    /// Kept so that the control stream lives as long as the session.
    pub control: (quinn::SendStream, quinn::RecvStream),
}

/// A forward request as an agent would send it, for one port.
pub fn request(name: &str, proto: Proto, port: u16) -> ForwardRequest {
    ForwardRequest {
        name: name.into(),
        proto,
        remote: PortRange::single(port).unwrap(),
        flow_idle: Duration::from_secs(120),
        allow_from: vec![],
    }
}
