//! Sessions coming and going: refused forwards, a restarted relay, the same agent reconnecting,
//! another agent wanting the same port, and visitors who arrive while their agent is away.

use std::time::{Duration, Instant};

use tether_common::net::ports::{PortRange, PortSpec, Proto};
use tether_common::trust::identity::Identity;
use tether_common::wire::protocol::{CloseCode, ForwardRequest, ForwardResult, Refusal};
use tether_relay::Limits;
use tether_tests::raw::RawAgent;
use tether_tests::*;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

#[tokio::test]
async fn forward_outside_the_allowlist_is_refused_while_another_works() {
    within("the whole test", async {
        let (allowed, forbidden) = (free_port(), free_port());
        let echo = echo_service().await;
        let forwards = vec![
            tcp_forward("ok", allowed, echo),
            tcp_forward("nope", forbidden, echo),
        ];
        let mut bench = Bench::start(&[allowed], forwards).await;
        let status = bench.agent.connected().await;
        assert_eq!(status.forward("ok"), Some(ForwardResult::Opened));
        assert_eq!(
            status.forward("nope"),
            Some(ForwardResult::Refused(Refusal::NotAllowed))
        );
        assert_eq!(
            round_trip(public(allowed), b"still works").await.unwrap(),
            b"still works"
        );
        assert_port_closed(forbidden).await;
        bench.stop().await;
    })
    .await;
}

#[tokio::test]
async fn forwards_work_again_within_five_seconds_of_a_relay_restart() {
    within("the whole test", async {
        let port = free_port();
        let mut bench = Bench::start(
            &[port],
            vec![tcp_forward("echo", port, echo_service().await)],
        )
        .await;
        let first = bench.agent.connected().await.session();
        let relay_addr = bench.relay.addr;
        bench.relay.stop().await;
        let restarted = Instant::now();
        let mut config = relay_config(
            bench.keys.path().join("relay.key"),
            vec![agent_entry(
                "dorm",
                bench.agent_identity.fingerprint(),
                &[port],
            )],
        );
        config.listen = relay_addr;
        let relay = start_relay(config, &bench.relay_identity);
        bench.agent.connected_other_than(first).await;
        assert_eq!(round_trip(public(port), b"back").await.unwrap(), b"back");
        let elapsed = restarted.elapsed();
        println!("forwards served again {elapsed:?} after the relay restarted");
        assert!(elapsed.as_secs_f64() < 5.0, "took {elapsed:?}");
        bench.agent.stop().await;
        relay.stop().await;
    })
    .await;
}

/// The control stream, which the caller keeps open as a live agent would.
type Control = (quinn::SendStream, quinn::RecvStream);

/// A session that says Hello for `ports` and then does nothing: an agent whose link died
/// without the relay noticing yet.
async fn stale_session(
    identity: &Identity,
    relay: &RelayHandle,
    port: u16,
) -> (
    quinn::Endpoint,
    quinn::Connection,
    Control,
    Vec<ForwardResult>,
) {
    let forward = ForwardRequest {
        name: "ssh".into(),
        proto: Proto::Tcp,
        remote: PortRange::single(port).unwrap(),
        flow_idle: Duration::ZERO,
        allow_from: vec![],
    };
    session_asking_for(identity, relay, vec![forward]).await
}

/// A session that says Hello with `forwards`, exactly as given, and then does nothing.
async fn session_asking_for(
    identity: &Identity,
    relay: &RelayHandle,
    forwards: Vec<ForwardRequest>,
) -> (
    quinn::Endpoint,
    quinn::Connection,
    Control,
    Vec<ForwardResult>,
) {
    let mut agent = RawAgent::connect(identity, relay).await;
    let results = agent.hello(forwards).await;
    (
        agent.endpoint,
        agent.conn,
        (agent.send, agent.recv),
        results,
    )
}

#[tokio::test]
async fn a_udp_forward_without_a_flow_idle_time_is_refused() {
    within("the whole test", async {
        let keys = Keys::new();
        let (relay_identity, relay_key) = keys.identity("relay");
        let (agent_identity, _) = keys.identity("agent");
        let ports = [free_port(), free_port()];
        let mut entry = agent_entry("dorm", agent_identity.fingerprint(), &[]);
        let udp = |port| PortSpec {
            proto: Proto::Udp,
            range: PortRange::single(port).unwrap(),
        };
        entry.ports = ports.iter().map(|&p| udp(p)).collect();
        let relay = start_relay(relay_config(relay_key, vec![entry]), &relay_identity);
        let request = |name: &str, port, flow_idle| ForwardRequest {
            name: name.into(),
            proto: Proto::Udp,
            remote: PortRange::single(port).unwrap(),
            flow_idle,
            allow_from: vec![],
        };
        let forwards = vec![
            request("never-forgets", ports[0], Duration::ZERO),
            request("mosh", ports[1], Duration::from_secs(120)),
        ];
        let (_endpoint, _conn, _control, results) =
            session_asking_for(&agent_identity, &relay, forwards).await;
        assert_eq!(
            results,
            [
                ForwardResult::Refused(Refusal::Invalid),
                ForwardResult::Opened
            ]
        );
        relay.stop().await;
    })
    .await;
}

#[tokio::test]
async fn same_agent_reconnecting_takes_its_ports_over_at_once() {
    within("the whole test", async {
        let keys = Keys::new();
        let (relay_identity, relay_key) = keys.identity("relay");
        let (agent_identity, agent_key) = keys.identity("agent");
        let port = free_port();
        let entry = agent_entry("dorm", agent_identity.fingerprint(), &[port]);
        let relay = start_relay(relay_config(relay_key, vec![entry]), &relay_identity);
        let (_endpoint, old, _control, results) =
            stale_session(&agent_identity, &relay, port).await;
        assert_eq!(results, [ForwardResult::Opened]);
        // The same key connects again while the relay still holds the old session.
        let forward = tcp_forward("ssh", port, echo_service().await);
        let config = agent_config(agent_key, relay.addr, relay.fingerprint, vec![forward]);
        let mut agent = start_agent(config, &agent_identity);
        let status = agent.connected().await;
        assert_eq!(status.forward("ssh"), Some(ForwardResult::Opened));
        // The old session was closed as replaced, and the port now reaches the new one.
        match old.closed().await {
            quinn::ConnectionError::ApplicationClosed(close) => {
                assert_eq!(
                    CloseCode::from_code(close.error_code),
                    Some(CloseCode::Replaced)
                );
            }
            other => panic!("old session ended with {other}"),
        }
        assert_eq!(
            round_trip(public(port), b"new session").await.unwrap(),
            b"new session"
        );
        agent.stop().await;
        relay.stop().await;
    })
    .await;
}

#[tokio::test]
async fn another_agent_asking_for_a_held_port_is_refused() {
    within("the whole test", async {
        let rivals = Rivals::start(Limits::default()).await;
        let port = rivals.port;
        let mut first = rivals.start_agent("dorm");
        assert_eq!(
            first.connected().await.forward("ssh"),
            Some(ForwardResult::Opened)
        );
        let mut second = rivals.start_agent("lab");
        let status = second.connected().await;
        assert_eq!(
            status.forward("ssh"),
            Some(ForwardResult::Refused(Refusal::InUse))
        );
        // The owner is untouched.
        assert_eq!(
            first.status.borrow().forward("ssh"),
            Some(ForwardResult::Opened)
        );
        assert_eq!(round_trip(public(port), b"owner").await.unwrap(), b"owner");
        second.stop().await;
        first.stop().await;
        rivals.relay.stop().await;
    })
    .await;
}

/// A forward refused because another program held its port comes up by itself once the port
/// is free, and the agent's other forwards are untouched meanwhile.
#[tokio::test]
async fn a_forward_refused_for_a_port_in_use_comes_up_once_the_port_is_free() {
    within("the whole test", async {
        let rivals = Rivals::start(Limits::default()).await;
        let port = rivals.port;
        let squatter = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
        let mut agent = rivals.start_agent("dorm");
        let status = agent.connected().await;
        let session = status.session();
        assert_eq!(
            status.forward("ssh"),
            Some(ForwardResult::Refused(Refusal::InUse))
        );
        drop(squatter);
        let opened =
            |s: &tether_agent::AgentStatus| s.forward("ssh") == Some(ForwardResult::Opened);
        within("the forward to come up", agent.status.wait_for(opened))
            .await
            .unwrap();
        assert_eq!(
            agent.status.borrow().session(),
            session,
            "in the same session"
        );
        assert_eq!(round_trip(public(port), b"freed").await.unwrap(), b"freed");
        agent.stop().await;
        rivals.relay.stop().await;
    })
    .await;
}

#[tokio::test]
async fn visitor_arriving_while_the_agent_is_away_waits_for_its_return() {
    within("the whole test", async {
        let port = free_port();
        let echo = echo_service().await;
        let bench = Bench::start(&[port], vec![tcp_forward("echo", port, echo)]).await;
        let Bench {
            relay,
            relay_identity,
            agent,
            agent_identity,
            agent_key,
            keys: _keys,
        } = bench;
        agent.stop().await;
        // The relay keeps the agent's port for a while; the visitor gets in and waits.
        let mut visitor = TcpStream::connect(public(port))
            .await
            .expect("port still held");
        visitor.write_all(b"while away").await.unwrap();
        let config = agent_config(
            agent_key,
            relay.addr,
            relay_identity.fingerprint(),
            vec![tcp_forward("echo", port, echo)],
        );
        let mut agent = start_agent(config, &agent_identity);
        agent.connected().await;
        visitor.shutdown().await.unwrap();
        let mut back = Vec::new();
        tokio::io::AsyncReadExt::read_to_end(&mut visitor, &mut back)
            .await
            .unwrap();
        assert_eq!(back, b"while away");
        agent.stop().await;
        relay.stop().await;
    })
    .await;
}

#[tokio::test]
async fn visitor_is_closed_when_its_agent_does_not_return_in_time() {
    within("the whole test", async {
        let keys = Keys::new();
        let (relay_identity, relay_key) = keys.identity("relay");
        let (agent_identity, agent_key) = keys.identity("agent");
        let port = free_port();
        let entry = agent_entry("dorm", agent_identity.fingerprint(), &[port]);
        let limits = Limits {
            visitor_wait: Duration::from_millis(300),
            ..Limits::default()
        };
        let relay = start_relay_with(
            relay_config(relay_key, vec![entry]),
            &relay_identity,
            limits,
        );
        let forward = tcp_forward("echo", port, echo_service().await);
        let config = agent_config(agent_key, relay.addr, relay.fingerprint, vec![forward]);
        let mut agent = start_agent(config, &agent_identity);
        agent.connected().await;
        agent.stop().await;

        let started = Instant::now();
        let mut visitor = TcpStream::connect(public(port))
            .await
            .expect("port still held");
        let mut buf = [0u8; 1];
        let read = tokio::io::AsyncReadExt::read(&mut visitor, &mut buf).await;
        let waited = started.elapsed();
        assert!(
            matches!(read, Ok(0)),
            "expected a clean close, got {read:?}"
        );
        assert!(
            waited >= Duration::from_millis(300),
            "closed after {waited:?}, before the wait"
        );
        println!("a visitor with no agent was closed after {waited:?} (wait 300 ms)");
        relay.stop().await;
    })
    .await;
}

#[tokio::test]
async fn an_agent_that_stays_away_loses_its_ports_to_another() {
    within("the whole test", async {
        let limits = Limits {
            port_hold: Duration::from_millis(300),
            visitor_wait: Duration::from_millis(50),
            ..Limits::default()
        };
        let rivals = Rivals::start(limits).await;
        let port = rivals.port;
        let mut first = rivals.start_agent("dorm");
        first.connected().await;
        let away = Instant::now();
        first.stop().await;
        // The relay gives no signal when it lets a port go, so look until the port is closed.
        let mut tick = tokio::time::interval(Duration::from_millis(20));
        while TcpStream::connect(public(port)).await.is_ok() {
            tick.tick().await;
        }
        let held = away.elapsed();
        assert!(
            held >= Duration::from_millis(300),
            "released after {held:?}, before the hold"
        );
        let mut second = rivals.start_agent("lab");
        assert_eq!(
            second.connected().await.forward("ssh"),
            Some(ForwardResult::Opened)
        );
        assert_eq!(round_trip(public(port), b"lab").await.unwrap(), b"lab");
        second.stop().await;
        rivals.relay.stop().await;
    })
    .await;
}

/// Two agents, dorm and lab, both allowed the same port, and a relay serving them.
struct Rivals {
    _keys: Keys,
    relay: RelayHandle,
    port: u16,
    echo: std::net::SocketAddr,
    agents: Vec<(&'static str, Identity, std::path::PathBuf)>,
}

impl Rivals {
    async fn start(limits: Limits) -> Self {
        let keys = Keys::new();
        let (relay_identity, relay_key) = keys.identity("relay");
        let port = free_port();
        let agents: Vec<_> = ["dorm", "lab"]
            .into_iter()
            .map(|name| {
                let (identity, key) = keys.identity(name);
                (name, identity, key)
            })
            .collect();
        let entries = agents
            .iter()
            .map(|(name, identity, _)| agent_entry(name, identity.fingerprint(), &[port]))
            .collect();
        let relay = start_relay_with(relay_config(relay_key, entries), &relay_identity, limits);
        let echo = echo_service().await;
        Self {
            _keys: keys,
            relay,
            port,
            echo,
            agents,
        }
    }

    /// Starts the agent called `name`, asking for the shared port.
    fn start_agent(&self, name: &str) -> AgentHandle {
        let (_, identity, key) = self
            .agents
            .iter()
            .find(|(n, ..)| *n == name)
            .expect("agent");
        let forward = tcp_forward("ssh", self.port, self.echo);
        let config = agent_config(
            key.clone(),
            self.relay.addr,
            self.relay.fingerprint,
            vec![forward],
        );
        start_agent(config, identity)
    }
}
