//! An agent driven by hand: it says exactly what a test wants, right or wrong.

use tether_common::control::{read_frame, write_frame};
use tether_common::identity::Identity;
use tether_common::protocol::{
    AgentMessage, CloseCode, ForwardRequest, ForwardResult, Hello, RelayMessage, VERSION,
};
use tether_common::tls;

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
        let (client, _) = tls::client_config(identity, relay.fingerprint).unwrap();
        let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        let connecting = endpoint
            .connect_with(client, relay.addr, tls::SERVER_NAME)
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
