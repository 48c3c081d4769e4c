//! Keepalives and the idle timeout, seen working: an idle session stays up only because of the
//! keepalives, a silent relay is noticed within the idle timeout, and a visitor that does not
//! read holds the local service back instead of filling memory.

use std::time::{Duration, Instant};

use tether_agent::AgentStatus;
use tether_tests::gate::UdpGate;
use tether_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const IDLE: Duration = Duration::from_millis(1000);

/// A relay and an agent that reaches it through a gate, with a 1 s idle timeout.
async fn through_a_gate(keepalive: Option<Duration>) -> (Keys, RelayHandle, UdpGate, AgentHandle) {
    let keys = Keys::new();
    let (relay_identity, relay_key) = keys.identity("relay");
    let (agent_identity, agent_key) = keys.identity("agent");
    let port = free_port();
    let entry = agent_entry("dorm", agent_identity.fingerprint(), &[port]);
    let relay = start_relay(relay_config(relay_key, vec![entry]), &relay_identity);
    let gate = UdpGate::new(relay.addr).await;
    let forward = tcp_forward("echo", port, echo_service().await);
    let mut config = agent_config(agent_key, gate.addr, relay.fingerprint, vec![forward]);
    config.keepalive = keepalive;
    config.idle_timeout = IDLE;
    let mut agent = start_agent(config, &agent_identity);
    agent.connected().await;
    (keys, relay, gate, agent)
}

#[tokio::test]
async fn keepalives_keep_an_idle_session_up_and_without_them_it_times_out() {
    within("the whole test", async {
        // With keepalives every 250 ms, three idle timeouts pass and nothing changes.
        let (_keys, relay, _gate, mut agent) =
            through_a_gate(Some(Duration::from_millis(250))).await;
        let quiet = tokio::time::timeout(IDLE * 3, agent.status.changed()).await;
        assert!(
            quiet.is_err(),
            "the idle session changed: {:?}",
            *agent.status.borrow()
        );
        agent.stop().await;
        relay.stop().await;

        // Without them, the same idle session ends at the idle timeout.
        let (_keys, relay, _gate, mut agent) = through_a_gate(None).await;
        let idle_since = Instant::now();
        let error = agent.failed().await;
        let lasted = idle_since.elapsed();
        assert!(error.contains("timed out"), "{error}");
        assert!(
            lasted >= IDLE - Duration::from_millis(100),
            "ended after {lasted:?}"
        );
        println!(
            "without keepalives an idle session ended after {lasted:?} (idle timeout {IDLE:?})"
        );
        agent.stop().await;
        relay.stop().await;
    })
    .await;
}

#[tokio::test]
async fn a_relay_gone_silent_is_noticed_within_the_idle_timeout() {
    within("the whole test", async {
        let (_keys, relay, gate, mut agent) =
            through_a_gate(Some(Duration::from_millis(250))).await;
        gate.set_open(false);
        let silent_since = Instant::now();
        let error = agent.failed().await;
        let noticed = silent_since.elapsed();
        assert!(error.contains("timed out"), "{error}");
        assert!(noticed < IDLE * 2, "noticed after {noticed:?}");
        println!("a silent relay was noticed after {noticed:?} (idle timeout {IDLE:?})");
        // Once the link is back, the agent reconnects by itself.
        gate.set_open(true);
        within(
            "a new session",
            agent
                .status
                .wait_for(|s| matches!(s, AgentStatus::Connected { .. })),
        )
        .await
        .unwrap();
        agent.stop().await;
        relay.stop().await;
    })
    .await;
}

#[tokio::test]
async fn a_visitor_that_does_not_read_holds_the_service_back() {
    within("the whole test", async {
        const TOTAL: usize = 64 * 1024 * 1024;
        let (written_tx, mut written_rx) = tokio::sync::watch::channel(0usize);
        // The service writes 64 MiB as fast as it may and reports how far it got.
        let service = serve(move |mut tcp| {
            let written = written_tx.clone();
            async move {
                let chunk = pattern(64 * 1024);
                let mut sent = 0;
                while sent < TOTAL {
                    if tcp.write_all(&chunk).await.is_err() {
                        return;
                    }
                    sent += chunk.len();
                    written.send_replace(sent);
                }
            }
        })
        .await;
        let port = free_port();
        let bench = Bench::start(&[port], vec![tcp_forward("bulk", port, service)]).await;
        let mut visitor = TcpStream::connect(public(port)).await.unwrap();
        // The visitor reads nothing. The service must stall: no progress for a whole second.
        let stalled_at = loop {
            let before = *written_rx.borrow_and_update();
            if tokio::time::timeout(Duration::from_secs(1), written_rx.changed())
                .await
                .is_err()
            {
                break before;
            }
        };
        println!(
            "with a visitor not reading, the service stalled after {} KiB",
            stalled_at / 1024
        );
        assert!(
            stalled_at < 32 * 1024 * 1024,
            "buffered {stalled_at} bytes for a visitor that does not read"
        );
        // Nothing was lost meanwhile: the visitor now reads all of it, intact.
        let mut got = vec![0u8; TOTAL];
        visitor.read_exact(&mut got).await.unwrap();
        let chunk = pattern(64 * 1024);
        assert!(got.chunks(chunk.len()).all(|c| c == chunk), "bytes differ");
        bench.stop().await;
    })
    .await;
}
