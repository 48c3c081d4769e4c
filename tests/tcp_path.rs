//! The TCP path (issue 23), in-process on loopback: agents that UDP does not reach run their
//! sessions over TLS on TCP, find that path by themselves, move there when UDP stops and back
//! when it returns, with no connection dropped. The UDP link between agent and relay is a
//! [`CutLink`], so a test can block UDP and let TCP through without root; the NAT lab
//! (`lab_tcp.rs`) does the same with iptables.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tether_common::config::{AgentConfig, RelayConfig, Transport};
use tether_common::net::ports::{PortSpec, Proto};
use tether_common::transport::choose::QUIC_PROBE_EVERY;
use tether_relay::Limits;
use tether_tests::connect_proxy::ConnectProxy;
use tether_tests::cut::CutLink;
use tether_tests::udp::{ask, consecutive_udp_ports, udp_echo, visitor};
use tether_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A relay listening on UDP and TCP, an agent reaching its UDP side through a [`CutLink`] and
/// its TCP side directly, and a TCP forward to an echo service.
struct Scene {
    relay: RelayHandle,
    link: CutLink,
    agent: Option<AgentHandle>,
    agent_identity: tether_common::trust::identity::Identity,
    config: AgentConfig,
    port: u16,
    _keys: Keys,
}

impl Scene {
    async fn new(change: impl FnOnce(&mut RelayConfig, &mut AgentConfig)) -> Self {
        let keys = Keys::new();
        let (relay_identity, relay_key) = keys.identity("relay");
        let (agent_identity, agent_key) = keys.identity("agent");
        let port = free_port();
        let service = echo_service().await;
        let entry = agent_entry("dorm", agent_identity.fingerprint(), &[port]);
        let mut relay_config = relay_config(relay_key, vec![entry]);
        relay_config.listen_tcp = Some("127.0.0.1:0".parse().unwrap());
        let mut config = agent_config(
            agent_key,
            "127.0.0.1:1".parse().unwrap(),
            relay_identity.fingerprint(),
            vec![tcp_forward("echo", port, service)],
        );
        change(&mut relay_config, &mut config);
        let relay = start_relay(relay_config, &relay_identity);
        let link = CutLink::to(relay.addr).await;
        config.relay.port = link.addr.port();
        let tcp = relay.tcp_addr.expect("the relay listens on TCP");
        config.relay_tcp.port = tcp.port();
        Self {
            relay,
            link,
            agent: None,
            agent_identity,
            config,
            port,
            _keys: keys,
        }
    }

    fn start_agent(&mut self) -> &mut AgentHandle {
        self.agent
            .insert(start_agent(self.config.clone(), &self.agent_identity))
    }

    fn agent(&mut self) -> &mut AgentHandle {
        self.agent.as_mut().expect("an agent")
    }

    /// The path of the agent's live session, as its status says.
    fn agent_path(&self) -> (Option<String>, Option<String>) {
        let report = self.agent.as_ref().expect("an agent").control.status();
        (report.transport, report.transport_why)
    }

    /// The path of the agent's live session, as the relay's status says.
    fn relay_path(&self) -> Option<String> {
        let status = self.relay.control.status();
        status.agents.into_iter().find_map(|a| a.transport)
    }

    async fn stop(self) {
        if let Some(agent) = self.agent {
            agent.stop().await;
        }
        self.relay.stop().await;
    }
}

/// Writes `data` to a visitor connection through the echo forward while a task reads back as
/// much; returns the reader, which ends with all it read, and the writer.
async fn echo_in_background(
    port: u16,
    data: Vec<u8>,
) -> (
    tokio::task::JoinHandle<Vec<u8>>,
    tokio::task::JoinHandle<()>,
) {
    let tcp = TcpStream::connect(public(port)).await.unwrap();
    let (reader, mut write) = echo_through(tcp);
    let writer = tokio::spawn(async move {
        for chunk in data.chunks(64 * 1024) {
            write
                .write_all(chunk)
                .await
                .expect("the visitor's connection stays up");
        }
        write.shutdown().await.unwrap();
    });
    (reader, writer)
}

#[tokio::test]
async fn a_tcp_only_agent_serves_tcp_and_udp_forwards_over_tls_on_tcp() {
    within_for("the whole test", Duration::from_secs(60), async {
        let (local, sockets) = consecutive_udp_ports(1);
        sockets.into_iter().for_each(udp_echo);
        let (public_udp, _) = consecutive_udp_ports(1);
        let mut scene = Scene::new(|relay, agent| {
            agent.transport = Transport::Tcp;
            agent
                .forwards
                .push(udp_forward("mosh", public_udp, "127.0.0.1", local));
            relay.agents[0].ports.push(PortSpec {
                proto: Proto::Udp,
                range: public_udp,
            });
        })
        .await;
        // UDP to the relay is cut from the start: whatever works here went over TCP.
        scene.link.cut();
        scene.start_agent().connected().await;

        let data = pattern(4 << 20);
        let back = within("a 4 MiB echo", round_trip(public(scene.port), &data))
            .await
            .unwrap();
        assert!(back == data, "the echo differs from what was sent");
        let mosh = visitor("127.0.0.1").await;
        let to = SocketAddr::from(([127, 0, 0, 1], public_udp.start()));
        for len in [1, 1200, 20_000] {
            let sent = pattern(len);
            let answer = ask(&mosh, to, &sent).await;
            assert!(
                answer == Some(sent),
                "a {len}-byte datagram over the TCP path"
            );
        }

        let (path, why) = scene.agent_path();
        assert_eq!(path.as_deref(), Some("tcp"));
        assert_eq!(why.as_deref(), Some("transport = \"tcp\" in agent.toml"));
        assert_eq!(scene.relay_path().as_deref(), Some("tcp"));
        // The metrics count sessions by path, at both ends.
        let metrics = |registry: prometheus_client::registry::Registry| {
            let mut text = String::new();
            prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
            text
        };
        let agent_control = scene.agent().control.clone();
        let agent_metrics = metrics(tether_agent::metrics::registry(agent_control));
        assert!(
            agent_metrics.contains("tether_agent_transport_sessions_total{transport=\"tcp\"} 1\n"),
            "{agent_metrics}"
        );
        assert!(agent_metrics.contains("tether_agent_transport_moves_total 0\n"));
        let relay_metrics = metrics(tether_relay::metrics::registry(scene.relay.control.clone()));
        assert!(
            relay_metrics.contains("tether_relay_transport_sessions{transport=\"tcp\"} 1.0\n"),
            "{relay_metrics}"
        );
        assert!(relay_metrics.contains("tether_relay_transport_sessions{transport=\"quic\"} 0.0\n"));
        let relay_status = scene.relay.control.status();
        let address = relay_status.agents[0].address.clone().unwrap();
        let address: SocketAddr = address.parse().unwrap();
        assert_eq!(
            address.ip().to_string(),
            "127.0.0.1",
            "the agent's TCP address"
        );
        scene.stop().await;
    })
    .await;
}

#[tokio::test]
async fn with_udp_blocked_from_the_start_auto_is_served_over_tcp_within_seconds() {
    within_for("the whole test", Duration::from_secs(60), async {
        let mut scene = Scene::new(|_, _| {}).await;
        scene.link.cut();
        let started = Instant::now();
        scene.start_agent();
        // The first visitor served: the forward answers an echo.
        let port = scene.port;
        let served = async {
            loop {
                if let Ok(Ok(back)) =
                    tokio::time::timeout(Duration::from_secs(1), round_trip(public(port), b"hi"))
                        .await
                {
                    if back == b"hi" {
                        return started.elapsed();
                    }
                }
                scene
                    .agent()
                    .status
                    .changed()
                    .await
                    .expect("the agent runs");
            }
        };
        let served = within("the first visitor served", served).await;
        println!(
            "UDP blocked from the start: first visitor served {served:?} after the agent started"
        );
        assert!(served <= Duration::from_secs(5), "took {served:?}");
        let (path, why) = scene.agent_path();
        assert_eq!(path.as_deref(), Some("tcp"));
        assert_eq!(why.as_deref(), Some("UDP to the relay gets no answer"));
        scene.stop().await;
    })
    .await;
}

#[tokio::test]
async fn a_transfer_moves_to_tcp_when_udp_stops_and_back_to_quic_when_it_returns() {
    let limit = QUIC_PROBE_EVERY + Duration::from_secs(60);
    within_for("the whole test", limit, async {
        let mut scene = Scene::new(|_, _| {}).await;
        let first = scene.start_agent().connected().await.session();
        assert_eq!(scene.agent_path().0.as_deref(), Some("quic"));
        // An idle connection, as an ssh session left open, and a transfer under way.
        let mut idle = TcpStream::connect(public(scene.port)).await.unwrap();
        assert!(echoes(&mut idle).await);
        let data = pattern(32 << 20);
        let (reader, writer) = echo_in_background(scene.port, data.clone()).await;

        let cut = Instant::now();
        scene.link.cut();
        let moved = scene.agent().connected_other_than(first).await.session();
        let moved_after = cut.elapsed();
        assert_eq!(scene.agent_path().0.as_deref(), Some("tcp"));
        assert_eq!(scene.relay_path().as_deref(), Some("tcp"));
        assert!(echoes(&mut idle).await, "the idle connection answers over TCP");
        let flowing_after = cut.elapsed();
        println!("UDP cut: on TCP {moved_after:?} after the cut, the idle connection answered {flowing_after:?} after it");
        assert!(flowing_after <= Duration::from_secs(5), "took {flowing_after:?}");

        scene.link.restore();
        let restored = Instant::now();
        let wait = QUIC_PROBE_EVERY + Duration::from_secs(15);
        let status = &mut scene.agent().status;
        let back_on_quic = status.wait_for(|s| s.session().is_some() && s.session() != moved);
        within_for("the move back to QUIC", wait, back_on_quic)
            .await
            .expect("the agent runs");
        let back_after = restored.elapsed();
        assert_eq!(scene.agent_path().0.as_deref(), Some("quic"));
        assert_eq!(scene.relay_path().as_deref(), Some("quic"));
        println!("UDP back: on QUIC {back_after:?} after it returned");
        assert!(back_after <= Duration::from_secs(60), "took {back_after:?}");

        assert!(echoes(&mut idle).await, "the idle connection answers over QUIC again");
        let (by_path, moves) = scene.agent().control.paths();
        assert_eq!(moves, 2, "to TCP and back");
        assert_eq!(by_path.map(|(_, sessions)| sessions), [2, 1], "QUIC twice, TCP once");
        within("the transfer's writer", writer).await.unwrap();
        let back = within_for("the transfer's echo", Duration::from_secs(60), reader)
            .await
            .unwrap();
        assert_eq!(back.len(), data.len());
        assert!(back == data, "the echo differs from what was sent");
        scene.stop().await;
    })
    .await;
}

#[tokio::test]
async fn through_a_proxy_a_lost_tcp_connection_is_a_lost_session_that_the_next_resumes() {
    within_for("the whole test", Duration::from_secs(60), async {
        let proxy = ConnectProxy::start().await;
        let url = proxy.url();
        let mut scene = Scene::new(|_, agent| {
            agent.transport = Transport::Tcp;
            agent.proxy = Some(url.parse().unwrap());
        })
        .await;
        let first = scene.start_agent().connected().await.session();
        assert_eq!(proxy.tunnels.load(std::sync::atomic::Ordering::SeqCst), 1);
        let mut visitor = TcpStream::connect(public(scene.port)).await.unwrap();
        assert!(echoes(&mut visitor).await);

        proxy.sever();
        scene.agent().connected_other_than(first).await;
        assert_eq!(proxy.tunnels.load(std::sync::atomic::Ordering::SeqCst), 2);
        assert!(
            echoes(&mut visitor).await,
            "the visitor's connection goes on in the next session"
        );
        scene.stop().await;
    })
    .await;
}

#[tokio::test]
async fn over_tcp_a_bad_proxy_a_wrong_relay_key_and_an_unlisted_agent_say_what_is_wrong() {
    within_for("the whole test", Duration::from_secs(60), async {
        let closed = free_port();
        let mut scene = Scene::new(|_, agent| {
            agent.transport = Transport::Tcp;
            agent.proxy = Some(format!("http://127.0.0.1:{closed}").parse().unwrap());
        })
        .await;
        let error = scene.start_agent().failed().await;
        assert!(
            error.contains(&format!("cannot reach the proxy http://127.0.0.1:{closed}")),
            "{error}"
        );
        scene.stop().await;

        let other = Keys::new().identity("other").0.fingerprint();
        let mut scene = Scene::new(|_, agent| {
            agent.transport = Transport::Tcp;
            agent.relay_fingerprint = other;
        })
        .await;
        let error = scene.start_agent().failed().await;
        assert!(error.contains("relay_fingerprint pins"), "{error}");
        scene.stop().await;

        let mut scene = Scene::new(|relay, agent| {
            agent.transport = Transport::Tcp;
            relay.agents[0].fingerprint = other;
        })
        .await;
        let error = scene.start_agent().failed().await;
        assert!(error.contains("refused this agent's key"), "{error}");
        scene.stop().await;
    })
    .await;
}

#[tokio::test]
async fn strangers_on_the_tcp_listener_give_their_handshake_places_back() {
    within_for("the whole test", Duration::from_secs(90), async {
        let limits = Limits::default();
        let strangers = limits.max_pending_handshakes + 44;
        let mut scene = Scene::new(|_, agent| agent.transport = Transport::Tcp).await;
        let tcp = scene.relay.tcp_addr.unwrap();
        // Garbage instead of TLS, a close before any byte, and a reset: each way out.
        for i in 0..strangers {
            let mut stranger = TcpStream::connect(tcp).await.unwrap();
            match i % 3 {
                0 => {
                    let _ = stranger.write_all(&pattern(300)).await;
                    let mut rest = Vec::new();
                    let _ = stranger.read_to_end(&mut rest).await;
                }
                1 => drop(stranger),
                _ => {
                    socket2::SockRef::from(&stranger)
                        .set_linger(Some(Duration::ZERO))
                        .unwrap();
                    drop(stranger);
                }
            }
        }
        // Every place came back: the agent, from the same address, gets one.
        scene.start_agent().connected().await;
        let mut visitor = TcpStream::connect(public(scene.port)).await.unwrap();
        assert!(echoes(&mut visitor).await);
        let refused = scene.relay.control.status().refused_handshakes;
        let failed_tls = refused
            .get("TLS over TCP handshake failed")
            .copied()
            .unwrap_or(0);
        assert!(failed_tls >= (strangers / 3) as u64, "{refused:?}");
        scene.stop().await;
    })
    .await;
}
