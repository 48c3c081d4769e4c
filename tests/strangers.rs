//! What strangers can make the relay do as visitors: those outside a forward's allow_from or
//! over its caps are refused before the agent hears of them, even while it is away, a narrowed
//! allow_from closes those no longer admitted, a flood of them takes neither every descriptor
//! nor every UDP flow, and a visitor that does not read pushes back all the way to the service.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tether_common::net::ports::PortRange;
use tether_common::trust::identity::Identity;
use tether_relay::Limits;
use tether_tests::udp::{ask, consecutive_udp_ports, udp_echo, udp_whoami, visitor, whoami};
use tether_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

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
