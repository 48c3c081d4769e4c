//! What a listed agent that misbehaves can make the relay do: breaking the protocol loses its
//! session alone, and a flood of updates grows no memory and slows no other agent.

use std::net::SocketAddr;
use std::time::Duration;

use tether_common::net::ports::{PortRange, PortSpec, Proto};
use tether_common::trust::identity::Identity;
use tether_common::wire::datagram::{DatagramHeader, HEADER_LEN, MAX_PAYLOAD};
use tether_common::wire::protocol::{CloseCode, ForwardResult, MAX_FRAME_LEN};
use tether_relay::Limits;
use tether_tests::raw::{request, RawAgent};
use tether_tests::udp::{consecutive_udp_ports, visitor};
use tether_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

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
            let hello = tether_common::wire::protocol::Hello {
                version: tether_common::wire::protocol::VERSION,
                resume: None,
                forwards: vec![request(forged, Proto::Udp, udp_port)],
            };
            let frame = tether_common::wire::protocol::AgentMessage::Hello(hello).encode();
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
    use tether_common::wire::protocol::{AgentMessage, Update, MAX_FORWARDS};

    use tether_tests::process::Configs;
    const FLOOD: Duration = Duration::from_secs(10);
    within_for("the whole test", Duration::from_secs(60), async {
        let keys = Keys::new();
        let configs = Configs::write(&keys, echo_service().await);
        let (rogue_identity, _) = keys.identity("rogue");
        configs.add_agent("rogue", rogue_identity.fingerprint(), &[]);
        let relay_fingerprint = Identity::load(&configs.relay_key).unwrap().fingerprint();
        let (mut relay, mut agent) = configs.run_both().await;
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
            while tether_common::wire::control::read_frame(&mut recv)
                .await
                .is_ok()
            {
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
                if tether_common::wire::control::write_frame(&mut send, &frame)
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
