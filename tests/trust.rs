//! Keys pinned on both ends: a relay serves only listed agents, an agent talks only to the relay
//! it pins, and showing a pinned certificate without holding its key gets nobody in.

use std::sync::Arc;

use rustls::client::ResolvesClientCert;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::SignatureScheme;
use tether_common::trust::identity::Identity;
use tether_common::trust::tls::{self, AgentPins};
use tether_tests::*;

/// Shows `shown`'s certificate but signs with `signer`'s key.
#[derive(Debug)]
struct Impostor(Arc<CertifiedKey>);

impl Impostor {
    fn new(shown: &Identity, signer: &Identity) -> Arc<Self> {
        let key = rustls::crypto::ring::sign::any_supported_type(&signer.private_key())
            .expect("signing key");
        Arc::new(Self(Arc::new(CertifiedKey::new(
            vec![shown.certificate()],
            key,
        ))))
    }
}

impl ResolvesServerCert for Impostor {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

impl ResolvesClientCert for Impostor {
    fn resolve(&self, _: &[&[u8]], _: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

fn ring() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

#[tokio::test]
async fn agent_whose_key_the_relay_does_not_list_opens_nothing() {
    within("the whole test", async {
        let keys = Keys::new();
        let (relay_identity, relay_key) = keys.identity("relay");
        let (listed, _) = keys.identity("listed");
        let (stranger, stranger_key) = keys.identity("stranger");
        let port = free_port();
        let entry = agent_entry("dorm", listed.fingerprint(), &[port]);
        let relay = start_relay(relay_config(relay_key, vec![entry]), &relay_identity);
        let forward = tcp_forward("ssh", port, echo_service().await);
        let config = agent_config(stranger_key, relay.addr, relay.fingerprint, vec![forward]);
        let mut agent = start_agent(config, &stranger);
        let error = agent.failed().await;
        assert!(
            error.contains(&format!(
                "refused this agent's key {}",
                stranger.fingerprint()
            )),
            "{error}"
        );
        assert_port_closed(port).await;
        agent.stop().await;
        relay.stop().await;
    })
    .await;
}

#[tokio::test]
async fn agent_pinned_to_another_relay_refuses_and_names_both_keys() {
    within("the whole test", async {
        let keys = Keys::new();
        let (relay_identity, relay_key) = keys.identity("relay");
        let (other_relay, _) = keys.identity("other-relay");
        let (agent_identity, agent_key) = keys.identity("agent");
        let port = free_port();
        let entry = agent_entry("dorm", agent_identity.fingerprint(), &[port]);
        let relay = start_relay(relay_config(relay_key, vec![entry]), &relay_identity);
        let forward = tcp_forward("ssh", port, echo_service().await);
        let config = agent_config(
            agent_key,
            relay.addr,
            other_relay.fingerprint(),
            vec![forward],
        );
        let mut agent = start_agent(config, &agent_identity);
        let error = agent.failed().await;
        let expected = format!(
            "shows key {}, but relay_fingerprint pins {}; refusing to connect",
            relay_identity.fingerprint(),
            other_relay.fingerprint()
        );
        assert!(error.contains(&expected), "{error}");
        assert_port_closed(port).await;
        agent.stop().await;
        relay.stop().await;
    })
    .await;
}

#[tokio::test]
async fn relay_showing_the_pinned_certificate_without_its_key_is_refused() {
    within("the whole test", async {
        let keys = Keys::new();
        let (real_relay, _) = keys.identity("relay");
        let (thief, _) = keys.identity("thief");
        let (agent_identity, agent_key) = keys.identity("agent");
        // The impostor has the relay's certificate (it is public) but not the relay's key.
        let server = rustls::ServerConfig::builder_with_provider(ring())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_client_cert_verifier(Arc::new(AgentPins::new([agent_identity.fingerprint()])))
            .with_cert_resolver(Impostor::new(&real_relay, &thief));
        let mut server = server;
        server.alpn_protocols = vec![tls::ALPN.to_vec()];
        let quic = quinn::crypto::rustls::QuicServerConfig::try_from(server).unwrap();
        let endpoint = quinn::Endpoint::server(
            quinn::ServerConfig::with_crypto(Arc::new(quic)),
            "127.0.0.1:0".parse().unwrap(),
        )
        .unwrap();
        let addr = endpoint.local_addr().unwrap();
        let accepted = tokio::spawn(async move {
            let incoming = endpoint.accept().await.expect("an attempt");
            incoming.await.map(|_| ())
        });
        let forward = tcp_forward("ssh", free_port(), echo_service().await);
        let config = agent_config(agent_key, addr, real_relay.fingerprint(), vec![forward]);
        let mut agent = start_agent(config, &agent_identity);
        let error = agent.failed().await;
        assert!(error.contains("handshake with"), "{error}");
        assert!(
            !error.contains("pins"),
            "the certificate matched; the signature must not: {error}"
        );
        assert!(
            accepted.await.unwrap().is_err(),
            "the impostor must not get a session"
        );
        agent.stop().await;
    })
    .await;
}

#[tokio::test]
async fn agent_showing_a_listed_certificate_without_its_key_is_refused() {
    within("the whole test", async {
        let keys = Keys::new();
        let (relay_identity, relay_key) = keys.identity("relay");
        let (listed, _) = keys.identity("listed");
        let (thief, _) = keys.identity("thief");
        let port = free_port();
        let entry = agent_entry("dorm", listed.fingerprint(), &[port]);
        let relay = start_relay(relay_config(relay_key, vec![entry]), &relay_identity);
        // A client that trusts the real relay and shows the listed agent's certificate.
        let (_, pin) = tls::client_config(&thief, relay.fingerprint).unwrap();
        let mut client = rustls::ClientConfig::builder_with_provider(ring())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(pin)
            .with_client_cert_resolver(Impostor::new(&listed, &thief));
        client.alpn_protocols = vec![tls::ALPN.to_vec()];
        let quic = quinn::crypto::rustls::QuicClientConfig::try_from(client).unwrap();
        let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        let attempt = endpoint
            .connect_with(
                quinn::ClientConfig::new(Arc::new(quic)),
                relay.addr,
                tls::SERVER_NAME,
            )
            .unwrap();
        let result = attempt.await;
        // The client may finish its side of the handshake first; the relay's verdict then
        // arrives as the connection's close.
        let refused = match result {
            Err(error) => error,
            Ok(conn) => conn.closed().await,
        };
        assert!(
            matches!(refused, quinn::ConnectionError::ConnectionClosed(_)),
            "expected the relay to refuse the handshake, got {refused}"
        );
        assert_port_closed(port).await;
        relay.stop().await;
    })
    .await;
}
