//! Handshakes before anyone is authenticated: over their caps they get no answer, a stalled one
//! ends at its deadline and holds up no drain, a failed one leaves nothing behind, and agents
//! still connect when every client must first prove its address.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use tether_common::net::ports::Proto;
use tether_common::trust::identity::Identity;
use tether_common::trust::tls;
use tether_common::wire::protocol::ForwardResult;
use tether_relay::Limits;
use tether_tests::raw::{request, RawAgent};
use tether_tests::*;
use tokio::net::UdpSocket;
use tokio::sync::watch;

#[tokio::test]
async fn agents_connect_when_every_client_must_prove_its_address() {
    within("the whole test", async {
        let port = free_port();
        let limits = Limits {
            retry_above: 0,
            ..Limits::default()
        };
        let forwards = vec![tcp_forward("echo", port, echo_service().await)];
        let bench = Bench::serving(forwards, limits, |_| {}).await;
        assert_eq!(round_trip(public(port), b"hi").await.unwrap(), b"hi");
        bench.stop().await;
    })
    .await;
}

/// A UDP hop between a client and the relay, from its own address, that counts the relay's
/// answers and passes them on only if told to: a client behind a hop that swallows them keeps
/// its handshake under way at the relay.
struct Hop {
    /// Where the client sends.
    addr: SocketAddr,
    answers: watch::Receiver<u64>,
}

impl Hop {
    async fn start(source: &str, relay: SocketAddr, pass_answers: bool) -> Self {
        let front = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let back = UdpSocket::bind((source.parse::<IpAddr>().unwrap(), 0))
            .await
            .unwrap();
        back.connect(relay).await.unwrap();
        let addr = front.local_addr().unwrap();
        let (count, answers) = watch::channel(0);
        tokio::spawn(async move {
            let mut client = None;
            let (mut up, mut down) = (vec![0u8; 2048], vec![0u8; 2048]);
            loop {
                tokio::select! {
                    Ok((len, from)) = front.recv_from(&mut up) => {
                        client = Some(from);
                        let _ = back.send(&up[..len]).await;
                    }
                    Ok(len) = back.recv(&mut down) => {
                        count.send_modify(|n| *n += 1);
                        if let (true, Some(client)) = (pass_answers, client) {
                            let _ = front.send_to(&down[..len], client).await;
                        }
                    }
                }
            }
        });
        Self { addr, answers }
    }

    /// Waits until the relay has answered through this hop.
    async fn answered(&mut self) {
        within("the relay to answer", self.answers.wait_for(|&n| n > 0))
            .await
            .unwrap();
    }

    /// Asserts that the relay stays silent towards this hop for a second.
    async fn assert_unanswered(&mut self) {
        let answered =
            tokio::time::timeout(Duration::from_secs(1), self.answers.wait_for(|&n| n > 0)).await;
        assert!(
            answered.is_err(),
            "the relay answered an attempt over the cap"
        );
    }
}

/// Starts a handshake with `identity`'s key through `hop`; the attempt goes on in the
/// background for as long as the returned endpoint lives.
fn attempt(identity: &Identity, relay: &RelayHandle, hop: &Hop) -> quinn::Endpoint {
    let (client, _) = tls::client_config(identity, relay.fingerprint).unwrap();
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let connecting = endpoint
        .connect_with(client, hop.addr, tls::SERVER_NAME)
        .unwrap();
    tokio::spawn(connecting);
    endpoint
}

/// A relay with `limits` that lists one agent, allowed TCP `ports`; returns the relay, the
/// agent's key and a stranger's.
fn gatekeeper(keys: &Keys, limits: Limits, ports: &[u16]) -> (RelayHandle, Identity, Identity) {
    let (relay_identity, relay_key) = keys.identity("relay");
    let (agent_identity, _) = keys.identity("agent");
    let (stranger, _) = keys.identity("stranger");
    let config = relay_config(
        relay_key,
        vec![agent_entry("dorm", agent_identity.fingerprint(), ports)],
    );
    let relay = start_relay_with(config, &relay_identity, limits);
    (relay, agent_identity, stranger)
}

#[tokio::test]
async fn handshakes_over_their_caps_are_dropped_unanswered() {
    within("the whole test", async {
        let limits = Limits {
            max_pending_handshakes: 2,
            max_pending_handshakes_per_address: 1,
            // Long enough that the stalled handshakes hold their places for the whole test.
            handshake_timeout: Duration::from_secs(60),
            ..Limits::default()
        };
        let keys = Keys::new();
        let (relay, agent_identity, stranger) = gatekeeper(&keys, limits, &[]);

        // One handshake under way from 127.0.0.2 takes that address's one place.
        let mut stalled = Hop::start("127.0.0.2", relay.addr, false).await;
        let _first = attempt(&stranger, &relay, &stalled);
        stalled.answered().await;
        let mut same_address = Hop::start("127.0.0.2", relay.addr, true).await;
        let _second = attempt(&stranger, &relay, &same_address);
        same_address.assert_unanswered().await;

        // Another address still gets through, and its finished handshake frees its place.
        let agent = RawAgent::connect(&agent_identity, &relay).await;
        drop(agent);

        // A second stalled handshake fills the relay's two places; then nobody gets an answer.
        let mut stalled_too = Hop::start("127.0.0.3", relay.addr, false).await;
        let _third = attempt(&stranger, &relay, &stalled_too);
        stalled_too.answered().await;
        let mut over_the_total = Hop::start("127.0.0.4", relay.addr, true).await;
        let _fourth = attempt(&stranger, &relay, &over_the_total);
        over_the_total.assert_unanswered().await;
        relay.stop().await;
    })
    .await;
}

#[tokio::test]
async fn a_stalled_handshake_ends_at_its_deadline_and_frees_its_place() {
    within("the whole test", async {
        let deadline = Duration::from_secs(1);
        let limits = Limits {
            max_pending_handshakes_per_address: 1,
            handshake_timeout: deadline,
            ..Limits::default()
        };
        let keys = Keys::new();
        let (relay, agent_identity, _) = gatekeeper(&keys, limits, &[]);
        let mut stalled = Hop::start("127.0.0.2", relay.addr, false).await;
        let _stalled = attempt(&agent_identity, &relay, &stalled);
        stalled.answered().await;
        let since = std::time::Instant::now();

        // The same address gets in once the stalled handshake's deadline has passed: the
        // client's next retransmission of its first packet finds a free place.
        let through = Hop::start("127.0.0.2", relay.addr, true).await;
        let (client, _) = tls::client_config(&agent_identity, relay.fingerprint).unwrap();
        let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        let connecting = endpoint
            .connect_with(client, through.addr, tls::SERVER_NAME)
            .unwrap();
        let conn = within("the second handshake", connecting).await.unwrap();
        let waited = since.elapsed();
        println!("a second handshake from the address got through after {waited:?}");
        assert!(waited >= deadline, "got through after {waited:?}");
        drop(conn);
        relay.stop().await;
    })
    .await;
}

#[tokio::test]
async fn a_stalled_handshake_does_not_hold_up_the_drain() {
    within("the whole test", async {
        let keys = Keys::new();
        let limits = Limits::default();
        let deadline = limits.handshake_timeout;
        let (relay, agent_identity, _) = gatekeeper(&keys, limits, &[]);
        // An agent that gave up on a handshake (it keeps several going while it probes a
        // restarting relay) leaves one the relay cannot finish.
        let mut stalled = Hop::start("127.0.0.2", relay.addr, false).await;
        let _stalled = attempt(&agent_identity, &relay, &stalled);
        stalled.answered().await;
        let since = std::time::Instant::now();
        relay.stop().await;
        let took = since.elapsed();
        println!("the relay drained in {took:?} with a handshake stalled");
        assert!(took < deadline / 2, "the drain took {took:?}");
    })
    .await;
}

#[tokio::test]
async fn failed_handshakes_leave_nothing_behind() {
    within("the whole test", async {
        let port = free_port();
        // One handshake at a time from an address: one left behind would lock the agent out.
        let limits = Limits {
            max_pending_handshakes_per_address: 1,
            ..Limits::default()
        };
        let keys = Keys::new();
        let (relay, agent_identity, stranger) = gatekeeper(&keys, limits, &[port]);
        for _ in 0..20 {
            let (client, _) = tls::client_config(&stranger, relay.fingerprint).unwrap();
            let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
            let connecting = endpoint
                .connect_with(client, relay.addr, tls::SERVER_NAME)
                .unwrap();
            // TLS 1.3 ends the client's side of the handshake before the relay has checked
            // the client's key, so the refusal may come right after.
            if let Ok(conn) = within("the handshake", connecting).await {
                let refusal = within("the refusal", conn.closed()).await;
                assert!(
                    matches!(refusal, quinn::ConnectionError::ConnectionClosed(_)),
                    "{refusal}"
                );
            }
        }
        assert_port_closed(port).await;
        let mut agent = RawAgent::connect(&agent_identity, &relay).await;
        let results = agent.hello(vec![request("ssh", Proto::Tcp, port)]).await;
        assert_eq!(results, [ForwardResult::Opened]);
        relay.stop().await;
    })
    .await;
}
