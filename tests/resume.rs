//! Forwarded connections across a lost session: the agent's link to the relay is cut for longer
//! than the idle timeout, so that the session dies, and restored; the visitor's connection and
//! the local service's go on with every byte, or are closed once the resume window has passed.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tether_agent::status::AgentStatus;
use tether_common::config::{AgentConfig, RelayConfig};
use tether_tests::cut::CutLink;
use tether_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;

/// A relay, a cuttable link, and an agent behind it whose session dies one second into a cut.
struct Scene {
    relay: RelayHandle,
    link: CutLink,
    agent: AgentHandle,
    /// The agent's config as it started, for a test to reload a changed one.
    config: AgentConfig,
    port: u16,
    session: u64,
}

impl Scene {
    async fn start(
        service: SocketAddr,
        change: impl Fn(&mut RelayConfig, &mut AgentConfig),
    ) -> Self {
        let keys = Keys::new();
        let (relay_identity, relay_key) = keys.identity("relay");
        let (agent_identity, agent_key) = keys.identity("agent");
        let port = free_port();
        let entry = agent_entry("dorm", agent_identity.fingerprint(), &[port]);
        let mut relay_config = relay_config(relay_key, vec![entry]);
        let mut agent_config = agent_config(
            agent_key,
            "127.0.0.1:1".parse().unwrap(),
            relay_identity.fingerprint(),
            vec![tcp_forward("svc", port, service)],
        );
        agent_config.keepalive = Some(Duration::from_millis(200));
        agent_config.idle_timeout = Duration::from_secs(1);
        change(&mut relay_config, &mut agent_config);
        let relay = start_relay(relay_config, &relay_identity);
        let link = CutLink::to(relay.addr).await;
        agent_config.relay.port = link.addr.port();
        let mut agent = start_agent(agent_config.clone(), &agent_identity);
        let session = agent.connected().await.session().unwrap();
        // The keys' folder must outlive the processes that read it at start only.
        std::mem::forget(keys);
        Self {
            relay,
            link,
            agent,
            config: agent_config,
            port,
            session,
        }
    }

    /// Cuts the link and waits until the agent has lost its session.
    async fn lose_session(&mut self) -> Instant {
        self.link.cut();
        within(
            "the session to be lost",
            self.agent.status.wait_for(|s| s.session().is_none()),
        )
        .await
        .unwrap();
        Instant::now()
    }

    /// Restores the link and waits for the agent's next session, which must be new.
    async fn next_session(&mut self) -> (AgentStatus, Duration) {
        self.link.restore();
        let back = Instant::now();
        let status = self.agent.connected_other_than(Some(self.session)).await;
        self.session = status.session().unwrap();
        (status, back.elapsed())
    }

    async fn stop(self) {
        self.agent.stop().await;
        self.relay.stop().await;
    }
}

#[tokio::test]
async fn a_transfer_goes_on_with_every_byte_after_the_session_is_lost_and_resumed() {
    within_for("the whole test", Duration::from_secs(60), async {
        let service = echo_service().await;
        let mut scene = Scene::start(service, |_, _| {}).await;
        let first = scene.session;
        let data = pattern(6 << 20);
        let (before, rest) = data.split_at(4 << 20);
        let (during, after) = rest.split_at(64 << 10);
        let tcp = TcpStream::connect(public(scene.port)).await.unwrap();
        let (reader, mut write) = echo_through(tcp);

        // The transfer is under way, bytes in flight both ways, when the link goes.
        write.write_all(before).await.unwrap();
        let lost = scene.lose_session().await;
        // Written while no session exists: it waits in the kernel's buffers and the relay's.
        within("a write during the outage", write.write_all(during))
            .await
            .unwrap();
        let (status, reconnected) = scene.next_session().await;
        write.write_all(after).await.unwrap();
        write.shutdown().await.unwrap();
        let back = within("the echo of every byte", reader).await.unwrap();
        assert_eq!(back.len(), data.len());
        assert!(
            back == data,
            "the bytes that came back differ from those sent"
        );
        println!(
            "session {first:x} lost {:?} after the cut; {status} {reconnected:?} after the \
             link came back; {} bytes echoed intact",
            lost.elapsed(),
            back.len()
        );
        scene.stop().await;
    })
    .await;
}

#[tokio::test]
async fn an_agent_that_comes_back_from_another_address_resumes() {
    within_for("the whole test", Duration::from_secs(60), async {
        let service = echo_service().await;
        let mut scene = Scene::start(service, |_, _| {}).await;
        let tcp = TcpStream::connect(public(scene.port)).await.unwrap();
        let (reader, mut write) = echo_through(tcp);
        write.write_all(b"before ").await.unwrap();
        scene.lose_session().await;
        let old = scene.link.source();
        scene.link.move_source().await;
        assert_ne!(scene.link.source(), old);
        write.write_all(b"during ").await.unwrap();
        scene.next_session().await;
        write.write_all(b"after").await.unwrap();
        write.shutdown().await.unwrap();
        let back = within("the echo", reader).await.unwrap();
        assert_eq!(back, b"before during after");
        scene.stop().await;
    })
    .await;
}

#[tokio::test]
async fn past_the_resume_window_both_connections_are_reset_and_new_visitors_are_served() {
    within_for("the whole test", Duration::from_secs(60), async {
        // A service that says when its connection ends, and how.
        let (ended_tx, ended_rx) = oneshot::channel::<std::io::Result<usize>>();
        let ended_tx = std::sync::Mutex::new(Some(ended_tx));
        let service = serve(move |mut tcp| {
            let tx = ended_tx.lock().unwrap().take();
            async move {
                let mut buf = [0u8; 64];
                let end = loop {
                    match tcp.read(&mut buf).await {
                        Ok(0) => break Ok(0),
                        Ok(n) => {
                            if let Err(error) = tcp.write_all(&buf[..n]).await {
                                break Err(error);
                            }
                        }
                        Err(error) => break Err(error),
                    }
                };
                if let Some(tx) = tx {
                    let _ = tx.send(end);
                }
            }
        })
        .await;
        let window = Duration::from_secs(1);
        let mut scene = Scene::start(service, |relay, agent| {
            relay.resume_window = window;
            agent.resume_window = window;
        })
        .await;
        let mut visitor = TcpStream::connect(public(scene.port)).await.unwrap();
        visitor.write_all(b"hello").await.unwrap();
        let mut buf = [0u8; 5];
        visitor.read_exact(&mut buf).await.unwrap();
        let lost = scene.lose_session().await;

        // Both ends give up once the window has passed, with a reset: a held connection that
        // is closed lost whatever was in flight, so neither end may take it for complete.
        let visitor_end = within("the visitor's connection to end", visitor.read(&mut buf)).await;
        let after = lost.elapsed();
        assert_eq!(
            visitor_end.map_err(|e| e.kind()),
            Err(std::io::ErrorKind::ConnectionReset)
        );
        let service_end = within("the service's connection to end", ended_rx)
            .await
            .unwrap();
        assert_eq!(
            service_end.map_err(|e| e.kind()),
            Err(std::io::ErrorKind::ConnectionReset)
        );
        assert!(after >= window / 2, "closed after {after:?}");
        println!("held connections reset {after:?} after the session was lost (window {window:?})");

        scene.next_session().await;
        let mut visitor = TcpStream::connect(public(scene.port)).await.unwrap();
        visitor.write_all(b"again").await.unwrap();
        visitor.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"again");
        scene.stop().await;
    })
    .await;
}

#[tokio::test]
async fn a_udp_flow_goes_on_from_the_same_local_socket_after_a_resume() {
    use tether_common::net::ports::{PortSpec, Proto};
    use tether_tests::udp::{consecutive_udp_ports, udp_whoami, visitor, whoami};

    within_for("the whole test", Duration::from_secs(60), async {
        let (local, sockets) = consecutive_udp_ports(1);
        udp_whoami(sockets.into_iter().next().unwrap());
        let (public, _) = consecutive_udp_ports(1);
        let forward = udp_forward("mosh", public, "127.0.0.1", local);
        let service = echo_service().await;
        let mut scene = Scene::start(service, |relay, agent| {
            relay.agents[0].ports.push(PortSpec {
                proto: Proto::Udp,
                range: public,
            });
            agent.forwards.push(forward.clone());
        })
        .await;
        let visitor = visitor("127.0.0.1").await;
        let to = SocketAddr::new("127.0.0.1".parse().unwrap(), public.start());
        let (_, before) = whoami(&visitor, to).await;
        scene.lose_session().await;
        scene.next_session().await;
        // The service sees the flow's datagrams come from the agent's same socket, as if
        // nothing had happened: a new flow would come from another port.
        let (_, after) = whoami(&visitor, to).await;
        assert_eq!(after, before);
        scene.stop().await;
    })
    .await;
}

#[tokio::test]
async fn bytes_reach_the_local_service_at_most_once_when_its_stream_ended_unconfirmed() {
    use tether_common::wire::protocol::{
        CloseCode, ForwardResult, ResumeHeader, StreamCode, StreamHeader, Welcome,
    };
    use tether_tests::raw::RawRelay;
    within_for("the whole test", Duration::from_secs(60), async {
        const REQUEST: &[u8] = b"POST /pay-once";
        // A service that takes a request and fails: its end of the connection is reset.
        let (took, mut requests) = tokio::sync::mpsc::unbounded_channel();
        let service = serve(move |mut tcp| {
            let took = took.clone();
            async move {
                let mut request = [0u8; REQUEST.len()];
                if tcp.read_exact(&mut request).await.is_ok() {
                    let _ = took.send(request.to_vec());
                }
                tether_common::carry::splice::reset_tcp(&tcp);
            }
        })
        .await;
        let keys = Keys::new();
        let (relay_identity, _) = keys.identity("relay");
        let (agent_identity, agent_key) = keys.identity("agent");
        let relay = RawRelay::bind(&relay_identity, agent_identity.fingerprint());
        let port = free_port();
        let forwards = vec![tcp_forward("pay", port, service)];
        let config = agent_config(agent_key, relay.addr(), relay.fingerprint, forwards);
        let agent = start_agent(config, &agent_identity);
        let welcome = |session, resumed| {
            move |_: &_| Welcome {
                session,
                results: vec![ForwardResult::Opened],
                resumed,
            }
        };

        // The relay opens a visitor's stream; the service takes the request and fails, and
        // the agent resets the stream.
        let first = relay.accept(welcome(1, None)).await;
        let header = StreamHeader {
            id: 1,
            forward: 0,
            port,
            visitor: "203.0.113.9:40000".parse().unwrap(),
        };
        let (mut send, mut recv) = first.conn.open_bi().await.unwrap();
        send.write_all(&[&header.encode()[..], REQUEST].concat())
            .await
            .unwrap();
        let request = within("the request", requests.recv()).await.unwrap();
        assert_eq!(request, REQUEST);
        let ended = within("the agent's reset", recv.read_to_end(1024)).await;
        assert!(ended.is_err(), "the agent ended the stream cleanly");

        // The session is lost before the relay hears of it: the relay holds the stream, has
        // seen nothing of the agent, and resumes it from the start.
        CloseCode::Reconfigured.close(&first.conn);
        let second = relay.accept(welcome(2, Some(vec![1]))).await;
        assert_eq!(second.hello.resume, Some(1));
        let (mut send, mut recv) = second.conn.open_bi().await.unwrap();
        let resume = ResumeHeader {
            stream: header,
            received: 0,
            seen: false,
        };
        send.write_all(&[&resume.encode()[..], REQUEST].concat())
            .await
            .unwrap();
        let answer = within("the agent's answer", recv.read_to_end(1024)).await;
        let code = StreamCode::NotResumable.code();
        assert!(
            matches!(answer, Err(quinn::ReadToEndError::Read(quinn::ReadError::Reset(c))) if c == code),
            "the agent took the stream again: {answer:?}"
        );
        assert!(
            requests.try_recv().is_err(),
            "the service got the request twice"
        );
        agent.stop().await;
    })
    .await;
}

#[tokio::test]
async fn a_visitor_the_next_session_no_longer_admits_is_not_resumed() {
    within_for("the whole test", Duration::from_secs(60), async {
        let mut scene = Scene::start(echo_service().await, |_, _| {}).await;
        let connect_from = |source: [u8; 4]| async move {
            let socket = tokio::net::TcpSocket::new_v4().unwrap();
            socket.bind(SocketAddr::from((source, 0))).unwrap();
            socket.connect(public(scene.port)).await.unwrap()
        };
        let mut leaving = connect_from([127, 0, 0, 2]).await;
        let mut staying = connect_from([127, 0, 0, 3]).await;
        for tcp in [&mut leaving, &mut staying] {
            tcp.write_all(b"hi").await.unwrap();
            let mut back = [0u8; 2];
            tcp.read_exact(&mut back).await.unwrap();
        }
        scene.lose_session().await;
        // While the agent is away, its reload narrows the forward to 127.0.0.3.
        let mut narrowed = scene.config.clone();
        narrowed.forwards[0].allow_from = vec!["127.0.0.3/32".parse().unwrap()];
        scene.agent.control.reload(narrowed);
        scene.next_session().await;
        let mut buf = [0u8; 1];
        let closed = within(
            "the visitor no longer admitted to be closed",
            leaving.read(&mut buf),
        );
        assert!(matches!(closed.await, Ok(0) | Err(_)));
        staying.write_all(b"on").await.unwrap();
        let mut back = [0u8; 2];
        within("the admitted visitor's echo", staying.read_exact(&mut back))
            .await
            .unwrap();
        assert_eq!(&back, b"on");
        scene.stop().await;
    })
    .await;
}

#[tokio::test]
async fn the_relay_shows_where_an_agent_is_now_after_its_nat_moved_it() {
    within_for("the whole test", Duration::from_secs(60), async {
        let scene = Scene::start(echo_service().await, |_, _| {}).await;
        let address = |scene: &Scene| scene.relay.control.status().agents[0].address.clone();
        assert_eq!(address(&scene), Some(scene.link.source().to_string()));
        // The home NAT maps the agent to another port; the session follows it.
        scene.link.move_source().await;
        assert_eq!(round_trip(public(scene.port), b"hi").await.unwrap(), b"hi");
        assert_eq!(address(&scene), Some(scene.link.source().to_string()));
        assert_eq!(scene.agent.status.borrow().session(), Some(scene.session));
        scene.stop().await;
    })
    .await;
}
