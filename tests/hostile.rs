//! What strangers and misbehaving agents can make the relay do: visitors outside a forward's
//! allow_from or over its caps are refused before the agent hears of them, handshakes over
//! their caps get no answer and leave nothing behind, an agent that breaks the protocol loses
//! its session alone, and a visitor that does not read pushes back all the way to the service.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tether_common::datagram::{DatagramHeader, HEADER_LEN, MAX_PAYLOAD};
use tether_common::identity::Identity;
use tether_common::ports::{PortRange, PortSpec, Proto};
use tether_common::protocol::{CloseCode, ForwardRequest, ForwardResult, MAX_FRAME_LEN};
use tether_common::tls;
use tether_relay::Limits;
use tether_tests::raw::RawAgent;
use tether_tests::udp::{ask, consecutive_udp_ports, udp_echo, udp_whoami, visitor, whoami};
use tether_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream, UdpSocket};
use tokio::sync::watch;

/// A visitor TCP connection from `source`, one of loopback's addresses.
async fn connect_from(source: &str, port: u16) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket
        .bind(SocketAddr::new(source.parse().unwrap(), 0))
        .unwrap();
    socket.connect(public(port)).await.expect("connect")
}

/// Whether an echo through `tcp` comes back.
async fn echoes(tcp: &mut TcpStream) -> bool {
    if tcp.write_all(b"ping").await.is_err() {
        return false;
    }
    let mut buf = [0u8; 4];
    match within("the echo", tcp.read_exact(&mut buf)).await {
        Ok(_) => &buf == b"ping",
        Err(_) => false,
    }
}

/// An echo service that counts the connections it accepted.
async fn counting_echo() -> (SocketAddr, Arc<AtomicUsize>) {
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    let addr = serve(move |mut tcp| {
        count.fetch_add(1, Ordering::SeqCst);
        async move {
            let (mut read, mut write) = tcp.split();
            let _ = tokio::io::copy(&mut read, &mut write).await;
        }
    })
    .await;
    (addr, accepted)
}

#[tokio::test]
async fn a_visitor_outside_allow_from_is_refused_and_one_inside_is_served() {
    within("the whole test", async {
        let (echo, accepted) = counting_echo().await;
        let tcp_port = free_port();
        let mut tcp = tcp_forward("ssh", tcp_port, echo);
        tcp.allow_from = vec!["127.0.0.2".parse().unwrap()];
        let service = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let local = PortRange::single(service.local_addr().unwrap().port()).unwrap();
        udp_echo(service);
        let (remote, held) = consecutive_udp_ports(1);
        drop(held);
        let mut udp = udp_forward("mosh", remote, "127.0.0.1", local);
        udp.allow_from = vec!["127.0.0.0/30".parse().unwrap()];
        let bench = Bench::serving(vec![tcp, udp], Limits::default(), |_| {}).await;

        let mut outsider = connect_from("127.0.0.1", tcp_port).await;
        assert!(!echoes(&mut outsider).await, "an outsider was served");
        let mut insider = connect_from("127.0.0.2", tcp_port).await;
        assert!(echoes(&mut insider).await, "an insider was not served");
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            1,
            "only the insider reaches the service"
        );

        let public_udp = SocketAddr::from(([127, 0, 0, 1], remote.start()));
        let outsider = visitor("127.0.0.5").await;
        assert_eq!(ask(&outsider, public_udp, b"hi").await, None);
        assert!(bench.relay.udp.count().refused >= 1);
        assert_eq!(
            bench.agent.udp.count().flows_opened,
            0,
            "the agent heard of the outsider"
        );
        let insider = visitor("127.0.0.3").await;
        assert_eq!(
            ask(&insider, public_udp, b"hi").await.as_deref(),
            Some(&b"hi"[..])
        );
        bench.stop().await;
    })
    .await;
}

#[tokio::test]
async fn narrowing_allow_from_closes_the_visitors_it_no_longer_admits() {
    within("the whole test", async {
        let port = free_port();
        let forward = tcp_forward("ssh", port, echo_service().await);
        let bench = Bench::serving(vec![forward.clone()], Limits::default(), |_| {}).await;
        let mut leaving = connect_from("127.0.0.2", port).await;
        let mut staying = connect_from("127.0.0.3", port).await;
        assert!(echoes(&mut leaving).await && echoes(&mut staying).await);

        // The agent's reload lets only 127.0.0.3 in from now on.
        let mut narrowed = forward;
        narrowed.allow_from = vec!["127.0.0.3/32".parse().unwrap()];
        let config = agent_config(
            bench.agent_key.clone(),
            bench.relay.addr,
            bench.relay.fingerprint,
            vec![narrowed],
        );
        bench.agent.control.reload(config);
        let mut buf = [0u8; 1];
        let cut = within(
            "the visitor no longer admitted to be closed",
            leaving.read(&mut buf),
        );
        assert!(matches!(cut.await, Ok(0) | Err(_)));
        assert!(
            echoes(&mut staying).await,
            "the one still admitted was closed"
        );
        let mut newcomer = connect_from("127.0.0.2", port).await;
        assert!(!echoes(&mut newcomer).await);
        bench.stop().await;
    })
    .await;
}

#[tokio::test]
async fn visitors_over_the_caps_are_refused_and_the_others_served() {
    within("the whole test", async {
        let (echo, accepted) = counting_echo().await;
        let port = free_port();
        let limits = Limits {
            max_visitors_per_forward: 3,
            max_visitors_per_address: 2,
            ..Limits::default()
        };
        let bench = Bench::serving(vec![tcp_forward("web", port, echo)], limits, |_| {}).await;

        let mut open = Vec::new();
        for _ in 0..2 {
            let mut tcp = connect_from("127.0.0.1", port).await;
            assert!(echoes(&mut tcp).await);
            open.push(tcp);
        }
        let mut third_from_one_address = connect_from("127.0.0.1", port).await;
        assert!(!echoes(&mut third_from_one_address).await);

        let mut other = connect_from("127.0.0.2", port).await;
        assert!(echoes(&mut other).await);
        let mut over_the_forward = connect_from("127.0.0.3", port).await;
        assert!(!echoes(&mut over_the_forward).await);

        // The open ones were not disturbed.
        for tcp in &mut open {
            assert!(echoes(tcp).await);
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 3);
        bench.stop().await;
    })
    .await;
}

#[tokio::test]
async fn udp_flow_caps_hold_under_a_flood_of_sources_and_spare_active_flows() {
    within_for("the whole test", Duration::from_secs(60), async {
        const SOURCES: usize = 2_000;
        let service = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let local = PortRange::single(service.local_addr().unwrap().port()).unwrap();
        udp_whoami(service);
        let (remote, held) = consecutive_udp_ports(1);
        drop(held);
        let forward = udp_forward("mosh", remote, "127.0.0.1", local);
        let bench = Bench::serving(vec![forward], Limits::default(), |_| {}).await;
        let public_udp = SocketAddr::from(([127, 0, 0, 1], remote.start()));
        let regular = visitor("127.0.0.1").await;
        let (_, before) = whoami(&regular, public_udp).await;

        for batch in 0..SOURCES / 100 {
            let mut sockets = Vec::with_capacity(100);
            for i in 0..100 {
                let n = batch * 100 + i;
                let ip = format!("127.1.{}.{}", n / 250, n % 250 + 1);
                let socket = visitor(&ip).await;
                socket.send_to(b"flood", public_udp).await.unwrap();
                sockets.push(socket);
            }
        }
        // The regular visitor's flow was active a moment ago, so no newcomer pushed it out:
        // the service still sees it from the same socket of the agent.
        let (_, after) = whoami(&regular, public_udp).await;
        assert_eq!(after, before, "the regular visitor's flow was replaced");
        let udp = bench.relay.udp.count();
        let live = udp.flows_opened - udp.flows_evicted - udp.flows_expired;
        println!(
            "{} flows opened, {} evicted, {} refused, {live} live",
            udp.flows_opened, udp.flows_evicted, udp.flows_refused
        );
        let arrived = udp.flows_opened + udp.flows_refused;
        assert!(arrived > SOURCES as u64 / 2, "the flood did not arrive");
        assert!(
            live <= Limits::default().max_flows_per_forward as u64,
            "{live} flows live"
        );
        bench.stop().await;
    })
    .await;
}

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

fn request(name: &str, proto: Proto, port: u16) -> ForwardRequest {
    ForwardRequest {
        name: name.into(),
        proto,
        remote: PortRange::single(port).unwrap(),
        flow_idle: Duration::from_secs(120),
        allow_from: vec![],
    }
}

/// One way an authenticated agent can break the protocol.
#[derive(Debug, Clone, Copy)]
enum Misdeed {
    MalformedHello,
    NameWithControlCharacters,
    UnknownControlMessage,
    OversizedControlFrame,
    EndedControlStream,
    ResetControlStream,
    ShortDatagram,
    DatagramForAFlowNeverOpened,
    DatagramUnderAnotherForward,
    OversizedDatagramStream,
}

impl Misdeed {
    const ALL: [Misdeed; 10] = [
        Misdeed::MalformedHello,
        Misdeed::NameWithControlCharacters,
        Misdeed::UnknownControlMessage,
        Misdeed::OversizedControlFrame,
        Misdeed::EndedControlStream,
        Misdeed::ResetControlStream,
        Misdeed::ShortDatagram,
        Misdeed::DatagramForAFlowNeverOpened,
        Misdeed::DatagramUnderAnotherForward,
        Misdeed::OversizedDatagramStream,
    ];

    /// Does it, on a fresh session of `rogue`, whose UDP port is `udp_port`.
    async fn commit(self, rogue: &mut RawAgent, udp_port: u16) {
        if let Misdeed::MalformedHello = self {
            // A Hello whose one forward has proto 9.
            let body = [0, 1, 0, 0, 1, 1, b'a', 9, 0, 22, 0, 22, 0, 0, 0, 0, 0];
            let mut frame = vec![0x01];
            frame.extend_from_slice(&(body.len() as u32).to_be_bytes());
            frame.extend_from_slice(&body);
            return rogue.write(&frame).await;
        }
        if let Misdeed::NameWithControlCharacters = self {
            // A name that would forge a log line and clear the operator's terminal.
            let forged = "ssh\n2026-01-01T00:00:00Z  INFO agent connected\x1b[2J";
            let hello = tether_common::protocol::Hello {
                version: tether_common::protocol::VERSION,
                resume: None,
                forwards: vec![request(forged, Proto::Udp, udp_port)],
            };
            let frame = tether_common::protocol::AgentMessage::Hello(hello).encode();
            return rogue.write(&frame).await;
        }
        let results = rogue
            .hello(vec![request("mosh", Proto::Udp, udp_port)])
            .await;
        assert_eq!(results, [ForwardResult::Opened]);
        let header = |flow, forward, port| {
            DatagramHeader {
                flow,
                forward,
                port,
            }
            .encode()
        };
        match self {
            Misdeed::MalformedHello | Misdeed::NameWithControlCharacters => unreachable!(),
            Misdeed::UnknownControlMessage => rogue.write(&[0x7f, 0, 0, 0, 0]).await,
            Misdeed::OversizedControlFrame => {
                let len = (MAX_FRAME_LEN as u32 + 1).to_be_bytes();
                rogue.write(&[0x01, len[0], len[1], len[2], len[3]]).await;
            }
            Misdeed::EndedControlStream => rogue.send.finish().unwrap(),
            Misdeed::ResetControlStream => rogue.send.reset(0u32.into()).unwrap(),
            Misdeed::ShortDatagram => rogue.conn.send_datagram(vec![1, 2, 3].into()).unwrap(),
            Misdeed::DatagramForAFlowNeverOpened => {
                let datagram = [&header(77, 0, udp_port)[..], b"hi"].concat();
                rogue.conn.send_datagram(datagram.into()).unwrap();
            }
            Misdeed::DatagramUnderAnotherForward => {
                // A visitor opens a real flow; the answer names another forward.
                let visitor = visitor("127.0.0.1").await;
                let public = SocketAddr::from(([127, 0, 0, 1], udp_port));
                visitor.send_to(b"hello", public).await.unwrap();
                let datagram = within("the visitor's datagram", rogue.conn.read_datagram())
                    .await
                    .unwrap();
                let (flow, _) = DatagramHeader::decode(&datagram).unwrap();
                let answer = [&header(flow.flow, 1, udp_port)[..], b"hi"].concat();
                rogue.conn.send_datagram(answer.into()).unwrap();
            }
            Misdeed::OversizedDatagramStream => {
                let mut stream = rogue.conn.open_uni().await.unwrap();
                let too_long = vec![0u8; HEADER_LEN + MAX_PAYLOAD + 1];
                // The relay may stop reading before it has all of it.
                let _ = stream.write_all(&too_long).await;
                let _ = stream.finish();
            }
        }
    }
}

#[tokio::test]
async fn a_misbehaving_agent_loses_its_session_and_nobody_else_does() {
    within("the whole test", async {
        let rogue_keys = Keys::new();
        let (rogue_identity, _) = rogue_keys.identity("rogue");
        let (udp_ports, held) = consecutive_udp_ports(1);
        drop(held);
        let udp_port = udp_ports.start();
        let tcp_port = free_port();
        let forwards = vec![tcp_forward("echo", tcp_port, echo_service().await)];
        let mut bench = Bench::serving(forwards, Limits::default(), |config| {
            let mut rogue = agent_entry("rogue", rogue_identity.fingerprint(), &[]);
            rogue.ports = vec![PortSpec {
                proto: Proto::Udp,
                range: udp_ports,
            }];
            config.agents.push(rogue);
        })
        .await;
        let session = bench.agent.connected().await.session();

        for misdeed in Misdeed::ALL {
            let mut rogue = RawAgent::connect(&rogue_identity, &bench.relay).await;
            misdeed.commit(&mut rogue, udp_port).await;
            assert_eq!(
                rogue.closed_by_relay().await,
                Some(CloseCode::ProtocolError),
                "{misdeed:?}"
            );
            // The well-behaved agent keeps its session and its visitors are served.
            assert_eq!(
                bench.agent.status.borrow().session(),
                session,
                "{misdeed:?}"
            );
            assert_eq!(
                round_trip(public(tcp_port), b"still here").await.unwrap(),
                b"still here",
                "{misdeed:?}"
            );
        }
        bench.stop().await;
    })
    .await;
}

#[tokio::test]
async fn a_visitor_that_does_not_read_pushes_back_on_the_service() {
    within_for("the whole test", Duration::from_secs(60), async {
        const OFFERED: usize = 128 * 1024 * 1024;
        let written = Arc::new(AtomicU64::new(0));
        let count = written.clone();
        // A service that writes OFFERED bytes as fast as the tunnel takes them.
        let firehose = serve(move |mut tcp| {
            let count = count.clone();
            async move {
                let chunk = vec![7u8; 64 * 1024];
                for _ in 0..OFFERED / chunk.len() {
                    if tcp.write_all(&chunk).await.is_err() {
                        return;
                    }
                    count.fetch_add(chunk.len() as u64, Ordering::SeqCst);
                }
                let _ = tcp.shutdown().await;
            }
        })
        .await;
        let port = free_port();
        let bench = Bench::start(&[port], vec![tcp_forward("bulk", port, firehose)]).await;
        let mut visitor = TcpStream::connect(public(port)).await.unwrap();

        // The service stalls once every buffer on the way is full: nothing more is written
        // for half a second.
        let stalled_at = loop {
            let before = written.load(Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(500)).await;
            let after = written.load(Ordering::SeqCst);
            if after == before && after > 0 {
                break after;
            }
        };
        println!(
            "the service stalled after {:.1} MiB of {} MiB offered",
            stalled_at as f64 / 1048576.0,
            OFFERED / 1048576
        );
        // Socket buffers at both ends, the stream's 1 MiB window and a chunk or two.
        assert!(stalled_at < 48 * 1024 * 1024, "{stalled_at} bytes buffered");

        // Once the visitor reads, every byte arrives.
        let mut received = 0usize;
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            match visitor.read(&mut buf).await.unwrap() {
                0 => break,
                n => received += n,
            }
        }
        assert_eq!(received, OFFERED);
        bench.stop().await;
    })
    .await;
}

#[tokio::test]
async fn private_keys_stay_out_of_the_logs() {
    use tether_tests::lab::binary;
    use tether_tests::process::{Configs, Process};
    within_for("the whole test", Duration::from_secs(60), async {
        let keys = Keys::new();
        let configs = Configs::write(&keys, echo_service().await);
        let port = configs.port;
        // Debug logs: everything tether itself says about sessions and visitors.
        let relay_args = ["run", "-v", "-c", configs.relay.to_str().unwrap()];
        let mut relay = Process::spawn(&binary("tether-relay"), &relay_args);
        relay.wait_for_line("relay listening").await;
        let agent_args = ["run", "-v", "-c", configs.agent.to_str().unwrap()];
        let mut agent = Process::spawn(&binary("tether-agent"), &agent_args);
        agent.wait_for_line("connected to relay").await;
        assert_eq!(round_trip(public(port), b"hi").await.unwrap(), b"hi");
        assert!(agent.signal_and_wait("TERM").await.success());
        assert!(relay.signal_and_wait("TERM").await.success());

        for (key, process) in [(&configs.relay_key, &relay), (&configs.agent_key, &agent)] {
            let pem = std::fs::read_to_string(key).unwrap();
            let body: Vec<&str> = pem.lines().filter(|l| !l.starts_with("-----")).collect();
            assert!(!body.is_empty());
            let log = process.log.join("\n");
            assert!(log.contains("DEBUG"), "not a debug log:\n{log}");
            for line in body.iter().chain([&body.concat().as_str()]) {
                assert!(!log.contains(line), "{} leaked into the log", key.display());
            }
        }
    })
    .await;
}

/// The round trip of 64 bytes through `tcp`, to an echo service.
async fn echo_time(tcp: &mut TcpStream) -> Duration {
    let started = std::time::Instant::now();
    tcp.write_all(&[7u8; 64]).await.unwrap();
    let mut back = [0u8; 64];
    within("the echo", tcp.read_exact(&mut back)).await.unwrap();
    started.elapsed()
}

#[tokio::test]
async fn an_agent_that_floods_updates_grows_no_memory_and_slows_no_one() {
    use tether_common::protocol::{AgentMessage, Update, MAX_FORWARDS};
    use tether_tests::lab::binary;
    use tether_tests::process::{Configs, Process};
    const FLOOD: Duration = Duration::from_secs(10);
    within_for("the whole test", Duration::from_secs(60), async {
        let keys = Keys::new();
        let configs = Configs::write(&keys, echo_service().await);
        let (rogue_identity, _) = keys.identity("rogue");
        configs.add_agent("rogue", rogue_identity.fingerprint(), &[]);
        let relay_fingerprint = Identity::load(&configs.relay_key).unwrap().fingerprint();
        let mut relay = Process::spawn(
            &binary("tether-relay"),
            &["run", "-c", configs.relay.to_str().unwrap()],
        );
        relay.wait_for_line("relay listening").await;
        let mut agent = Process::spawn(
            &binary("tether-agent"),
            &["run", "-c", configs.agent.to_str().unwrap()],
        );
        agent.wait_for_line("connected to relay").await;
        let mut echo = TcpStream::connect(public(configs.port)).await.unwrap();
        for _ in 0..20 {
            echo_time(&mut echo).await;
        }
        let rss_before = relay.rss();

        // Every update names MAX_FORWARDS new forwards over the whole port range, none of
        // which the rogue may open.
        let mut rogue =
            RawAgent::connect_to(&rogue_identity, configs.listen, relay_fingerprint).await;
        assert!(rogue.hello(vec![]).await.is_empty());
        let RawAgent {
            endpoint: _endpoint,
            conn: _conn,
            mut send,
            mut recv,
        } = rogue;
        let answers = tokio::spawn(async move {
            let mut answered = 0u64;
            while tether_common::control::read_frame(&mut recv).await.is_ok() {
                answered += 1;
            }
            answered
        });
        let flood = tokio::spawn(async move {
            for round in 0u64.. {
                let forwards = (0..MAX_FORWARDS as u16)
                    .map(|id| {
                        let mut forward = request(&format!("n{round}-{id}"), Proto::Tcp, 1);
                        forward.remote = PortRange::new(1, 65535).unwrap();
                        (id, forward)
                    })
                    .collect();
                let frame = AgentMessage::Update(Update { forwards }).encode();
                if tether_common::control::write_frame(&mut send, &frame)
                    .await
                    .is_err()
                {
                    return round;
                }
            }
            unreachable!()
        });

        let started = std::time::Instant::now();
        let mut times = Vec::new();
        while started.elapsed() < FLOOD {
            times.push(echo_time(&mut echo).await);
        }
        let grown = relay.rss().saturating_sub(rss_before);
        flood.abort();
        answers.abort();
        times.sort();
        let p99 = times[times.len() * 99 / 100];
        println!(
            "{} echoes beside the flood: p50 {:?}, p99 {p99:?}; the relay's memory grew {} KiB",
            times.len(),
            times[times.len() / 2],
            grown / 1024
        );
        assert!(p99 <= Duration::from_millis(50), "echo p99 {p99:?}");
        assert!(grown <= 16 * 1024 * 1024, "the relay grew {grown} bytes");
        assert!(relay.signal_and_wait("TERM").await.success());
        assert!(agent.signal_and_wait("TERM").await.success());
    })
    .await;
}

#[tokio::test]
async fn visitors_cannot_take_every_descriptor_of_the_relay() {
    use tether_tests::lab::binary;
    use tether_tests::process::{Configs, Process};
    const OPEN_FILES: u64 = 512;
    within_for("the whole test", Duration::from_secs(60), async {
        let keys = Keys::new();
        let configs = Configs::write(&keys, echo_service().await);
        // Another agent, in this process, with a forward of its own.
        let (other_identity, other_key) = keys.identity("other");
        let other_port = free_port();
        configs.add_agent(
            "other",
            other_identity.fingerprint(),
            &[format!("{other_port}/tcp")],
        );
        let relay_identity = Identity::load(&configs.relay_key).unwrap();
        // The relay can have OPEN_FILES descriptors, and no more.
        let mut command = tokio::process::Command::new("prlimit");
        command
            .arg(format!("--nofile={OPEN_FILES}:{OPEN_FILES}"))
            .arg(binary("tether-relay"))
            .args(["run", "-c", configs.relay.to_str().unwrap()]);
        let mut relay = Process::start(command);
        relay.wait_for_line("relay listening").await;
        let mut agent = Process::spawn(
            &binary("tether-agent"),
            &["run", "-c", configs.agent.to_str().unwrap()],
        );
        agent.wait_for_line("connected to relay").await;
        let forwards = vec![tcp_forward("web", other_port, echo_service().await)];
        let config = agent_config(
            other_key,
            configs.listen,
            relay_identity.fingerprint(),
            forwards,
        );
        let mut other = start_agent(config, &other_identity);
        other.connected().await;

        // Five addresses open 256 connections each to the first agent's forward, and keep
        // them: more than the relay has descriptors.
        let mut flood = Vec::new();
        for source in 2..7 {
            for _ in 0..256 {
                let socket = TcpSocket::new_v4().unwrap();
                socket
                    .bind(SocketAddr::new(IpAddr::from([127, 0, 0, source]), 0))
                    .unwrap();
                if let Ok(tcp) = socket.connect(public(configs.port)).await {
                    flood.push(tcp);
                }
            }
        }
        // The other agent's visitors are served all the same.
        for _ in 0..5 {
            let echoed = within("the other forward", round_trip(public(other_port), b"hi")).await;
            assert_eq!(echoed.unwrap(), b"hi");
        }
        assert!(relay.signal_and_wait("TERM").await.success());
        let log = relay.log.join("\n");
        assert!(!log.contains("Too many open files"), "{log}");
        assert!(
            log.contains("the relay has its most visitor connections")
                || log.contains("the forward has its most open connections"),
            "{log}"
        );
        drop(flood);
        other.stop().await;
        assert!(agent.signal_and_wait("TERM").await.success());
    })
    .await;
}

#[tokio::test]
async fn visitors_over_the_caps_are_refused_at_once_while_the_agent_is_away() {
    within("the whole test", async {
        let (echo, _) = counting_echo().await;
        let port = free_port();
        let limits = Limits {
            max_visitors_per_address: 2,
            // Longer than the whole test: a visitor that waits this long fails it.
            visitor_wait: Duration::from_secs(60),
            ..Limits::default()
        };
        let bench = Bench::serving(vec![tcp_forward("web", port, echo)], limits, |_| {}).await;
        // The agent goes away; the relay keeps its port for its return.
        bench.agent.stop().await;
        let _waiting = [
            connect_from("127.0.0.1", port).await,
            connect_from("127.0.0.1", port).await,
        ];
        let mut third = connect_from("127.0.0.1", port).await;
        let mut buf = [0u8; 1];
        let ended = within("the third visitor's refusal", third.read(&mut buf)).await;
        assert!(matches!(ended, Ok(0) | Err(_)), "{ended:?}");
        bench.relay.stop().await;
    })
    .await;
}

#[tokio::test]
async fn the_relay_logs_who_connected_and_what_they_carried() {
    use tether_tests::lab::binary;
    use tether_tests::process::{Configs, Process};
    within_for("the whole test", Duration::from_secs(60), async {
        let keys = Keys::new();
        let configs = Configs::write(&keys, echo_service().await);
        let mut relay = Process::spawn(
            &binary("tether-relay"),
            &["run", "-c", configs.relay.to_str().unwrap()],
        );
        relay.wait_for_line("relay listening").await;
        let mut agent = Process::spawn(
            &binary("tether-agent"),
            &["run", "-c", configs.agent.to_str().unwrap()],
        );
        agent.wait_for_line("connected to relay").await;
        let mut visitor = connect_from("127.0.0.9", configs.port).await;
        assert!(echoes(&mut visitor).await);
        let connected = relay.wait_for_line("visitor connected").await;
        assert!(
            connected.contains("INFO") && connected.contains("forward=echo"),
            "{connected}"
        );
        assert!(connected.contains("visitor=127.0.0.9:"), "{connected}");
        drop(visitor);
        let closed = relay.wait_for_line("visitor disconnected").await;
        assert!(closed.contains("visitor=127.0.0.9:"), "{closed}");
        // "ping" each way.
        assert!(closed.contains("bytes_in=4 bytes_out=4"), "{closed}");
        assert!(closed.contains("seconds="), "{closed}");
        assert!(agent.signal_and_wait("TERM").await.success());
        assert!(relay.signal_and_wait("TERM").await.success());
    })
    .await;
}
