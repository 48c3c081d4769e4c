//! Keepalives and the idle timeout, seen working: an idle session stays up only because of the
//! keepalives, an outage shorter than the idle timeout costs nothing, a silent relay is noticed
//! within the idle timeout, and a visitor that does not read holds the local service back
//! instead of filling memory.

use std::time::{Duration, Instant};

use tether_agent::AgentStatus;
use tether_tests::gate::UdpGate;
use tether_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const IDLE: Duration = Duration::from_millis(1000);

/// A relay, and an agent that reaches it through a gate with an echo service on `port`.
struct Gated {
    _keys: Keys,
    relay: RelayHandle,
    gate: UdpGate,
    agent: AgentHandle,
    port: u16,
}

impl Gated {
    /// With a 1 s idle timeout.
    async fn start(keepalive: Option<Duration>) -> Self {
        Self::start_with(keepalive, IDLE).await
    }

    async fn start_with(keepalive: Option<Duration>, idle: Duration) -> Self {
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
        config.idle_timeout = idle;
        let mut agent = start_agent(config, &agent_identity);
        agent.connected().await;
        Self {
            _keys: keys,
            relay,
            gate,
            agent,
            port,
        }
    }

    async fn stop(self) {
        self.agent.stop().await;
        self.relay.stop().await;
    }
}

#[tokio::test]
async fn keepalives_keep_an_idle_session_up_and_without_them_it_times_out() {
    within("the whole test", async {
        // With keepalives every 250 ms, three idle timeouts pass and nothing changes.
        let mut gated = Gated::start(Some(Duration::from_millis(250))).await;
        let quiet = tokio::time::timeout(IDLE * 3, gated.agent.status.changed()).await;
        assert!(
            quiet.is_err(),
            "the idle session changed: {:?}",
            *gated.agent.status.borrow()
        );
        gated.stop().await;

        // Without them, the same idle session ends at the idle timeout.
        let mut gated = Gated::start(None).await;
        let idle_since = Instant::now();
        let error = gated.agent.failed().await;
        let lasted = idle_since.elapsed();
        assert!(error.contains("timed out"), "{error}");
        assert!(
            lasted >= IDLE - Duration::from_millis(100),
            "ended after {lasted:?}"
        );
        println!(
            "without keepalives an idle session ended after {lasted:?} (idle timeout {IDLE:?})"
        );
        gated.stop().await;
    })
    .await;
}

#[tokio::test]
async fn an_outage_shorter_than_the_idle_timeout_keeps_the_session_and_its_visitors() {
    within_for("the whole test", Duration::from_secs(20), async {
        // Keepalives go on during the outage, one per interval without anything else sent (not
        // backing off as QUIC's loss probes do), so one crosses soon after the link is back,
        // well before the idle timeout: the relay hears the agent again, and nothing is lost.
        let (keepalive, idle, outage) = (
            Duration::from_millis(500),
            Duration::from_secs(6),
            Duration::from_millis(4500),
        );
        let gated = Gated::start_with(Some(keepalive), idle).await;
        let session = gated.agent.status.borrow().session();
        let mut visitor = TcpStream::connect(public(gated.port)).await.unwrap();
        visitor.write_all(b"before\n").await.unwrap();
        let mut buf = [0u8; 7];
        visitor.read_exact(&mut buf).await.unwrap();

        // Nothing crosses during the outage; only the agent keeps sending.
        gated.gate.set_open(false);
        tokio::time::sleep(outage).await; // the outage under test
        gated.gate.set_open(true);
        // Still nothing from the visitor until the idle timeout would have ended the session:
        // only the agent's keepalives and probes can have told the relay that the link is back.
        tokio::time::sleep(idle - outage + Duration::from_secs(1)).await;
        let start = Instant::now();
        visitor.write_all(b"later!\n").await.unwrap();
        visitor.read_exact(&mut buf).await.unwrap();
        let answered = start.elapsed();
        assert_eq!(&buf, b"later!\n");
        assert_eq!(
            gated.agent.status.borrow().session(),
            session,
            "a new session"
        );
        println!(
            "a {outage:?} outage, then silence past the {idle:?} idle timeout: same session, the \
             visitor's echo came back in {answered:?}"
        );
        gated.stop().await;
    })
    .await;
}

#[tokio::test]
async fn a_relay_gone_silent_is_noticed_within_the_idle_timeout() {
    within("the whole test", async {
        let mut gated = Gated::start(Some(Duration::from_millis(250))).await;
        gated.gate.set_open(false);
        let silent_since = Instant::now();
        let error = gated.agent.failed().await;
        let noticed = silent_since.elapsed();
        assert!(error.contains("timed out"), "{error}");
        assert!(noticed < IDLE * 2, "noticed after {noticed:?}");
        println!("a silent relay was noticed after {noticed:?} (idle timeout {IDLE:?})");
        // Once the link is back, the agent reconnects by itself.
        gated.gate.set_open(true);
        within(
            "a new session",
            gated
                .agent
                .status
                .wait_for(|s| matches!(s, AgentStatus::Connected { .. })),
        )
        .await
        .unwrap();
        gated.stop().await;
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
