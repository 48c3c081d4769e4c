//! The relay binary under everything a hostile internet throws at it at once: random datagrams
//! at its QUIC port, thousands of UDP visitor sources, hundreds of idle TCP visitors and unknown
//! agents handshaking in a loop. It must stay up, stay small, keep serving its agent's forwards
//! and keep its log short.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::{Rng, RngCore};
use tether_common::net::ports::PortRange;
use tether_common::trust::tls;
use tether_tests::udp::{ask, consecutive_udp_ports, udp_echo};
use tether_tests::*;
use tokio::net::{TcpSocket, TcpStream, UdpSocket};
use tokio::process::{Child, Command};

const RELAY: &str = env!("CARGO_BIN_EXE_tether-relay");

const RANDOM_DATAGRAMS: usize = 30_000;
const UDP_SOURCES: usize = 3_000;
const IDLE_VISITORS: usize = 400;
const HANDSHAKE_LOOPS: usize = 8;
/// The least time the flood lasts.
const MIN_FLOOD_TIME: Duration = Duration::from_secs(5);

/// Most bytes the relay's memory may grow by under the flood.
const MAX_GROWTH: u64 = 64 * 1024 * 1024;
/// Most lines the relay may log, from its start to its exit.
const MAX_LOG_LINES: usize = 300;

/// A loopback address of its own for each of `count` senders, so that caps per address see
/// many visitors.
fn loopback(network: u8, index: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(
        127,
        network,
        (index / 250) as u8,
        (index % 250 + 1) as u8,
    ))
}

/// Resident and peak resident memory of `pid`, in bytes.
fn memory(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().strip_suffix(" kB"))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(|kb| kb * 1024)
            .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status"))
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// Starts the relay binary with its log in `log`.
fn start_relay(config: &Path, log: &Path) -> Child {
    Command::new(RELAY)
        .args(["run", "-c", config.to_str().unwrap()])
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .kill_on_drop(true)
        .spawn()
        .expect("tether-relay starts")
}

/// A UDP port nobody uses right now.
fn free_udp_port() -> u16 {
    let (range, sockets) = consecutive_udp_ports(1);
    drop(sockets);
    range.start()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_stays_up_small_and_serving_under_a_flood() {
    within_for("the whole test", Duration::from_secs(300), async {
        let keys = Keys::new();
        let (relay_identity, relay_key) = keys.identity("relay");
        let (agent_identity, agent_key) = keys.identity("agent");
        let (stranger, _) = keys.identity("stranger");
        let (quic_port, tcp_port, udp_port) = (free_udp_port(), free_port(), free_udp_port());
        let relay_addr = SocketAddr::from(([127, 0, 0, 1], quic_port));
        let config = keys.path().join("relay.toml");
        std::fs::write(
            &config,
            format!(
                "listen = \"{relay_addr}\"\nkey = \"{}\"\npublic_bind = \"127.0.0.1\"\n\
                 [[agent]]\nname = \"home\"\nfingerprint = \"{}\"\n\
                 ports = [\"{tcp_port}/tcp\", \"{udp_port}/udp\"]\n",
                relay_key.display(),
                agent_identity.fingerprint(),
            ),
        )
        .unwrap();
        let log = keys.path().join("relay.log");
        let mut relay = start_relay(&config, &log);
        let pid = relay.id().expect("relay pid");

        let udp_service = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let udp_local = PortRange::single(udp_service.local_addr().unwrap().port()).unwrap();
        udp_echo(udp_service);
        let forwards = vec![
            tcp_forward("ssh", tcp_port, echo_service().await),
            udp_forward(
                "mosh",
                PortRange::single(udp_port).unwrap(),
                "127.0.0.1",
                udp_local,
            ),
        ];
        let config = agent_config(
            agent_key,
            relay_addr,
            relay_identity.fingerprint(),
            forwards,
        );
        let mut agent = start_agent(config, &agent_identity);
        agent.connected().await;
        let session = agent.status.borrow().session();
        let udp_visitor = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let udp_public = SocketAddr::from(([127, 0, 0, 1], udp_port));
        assert_eq!(
            round_trip(public(tcp_port), b"warm").await.unwrap(),
            b"warm"
        );
        assert!(ask(&udp_visitor, udp_public, b"warm").await.is_some());
        let (at_rest, _) = memory(pid);

        let flooding = Arc::new(AtomicBool::new(true));
        let handshakes = Arc::new(AtomicU64::new(0));
        let started = Instant::now();
        let loops: Vec<_> = (0..HANDSHAKE_LOOPS)
            .map(|i| {
                let (flooding, handshakes) = (flooding.clone(), handshakes.clone());
                let (client, _) =
                    tls::client_config(&stranger, relay_identity.fingerprint()).unwrap();
                tokio::spawn(async move {
                    let bind = SocketAddr::new(loopback(3, i), 0);
                    let endpoint = quinn::Endpoint::client(bind).unwrap();
                    while flooding.load(Ordering::Relaxed) {
                        unknown_agent(&endpoint, client.clone(), relay_addr).await;
                        handshakes.fetch_add(1, Ordering::Relaxed);
                    }
                })
            })
            .collect();
        let floods = async {
            tokio::join!(
                random_datagrams(relay_addr),
                udp_sources(udp_public),
                idle_visitors(tcp_port),
            )
            .2
        };
        // The real forwards answer throughout, each answer within two seconds.
        let mut udp_tries = Vec::new();
        let probes = async {
            let mut answers = Vec::new();
            loop {
                let sent = Instant::now();
                let tcp = within_for(
                    "the TCP forward to answer during the flood",
                    Duration::from_secs(2),
                    round_trip(public(tcp_port), b"still there?"),
                )
                .await;
                assert_eq!(tcp.unwrap(), b"still there?");
                let tries = ask_until_answered(&udp_visitor, udp_public).await;
                udp_tries.push(tries);
                answers.push(sent.elapsed());
                if !flooding.load(Ordering::Relaxed) {
                    return answers;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        };
        let (visitors, mut answers) = tokio::join!(
            async {
                let visitors = floods.await;
                // Handshakes and probes go on for a while, with the idle visitors held, so that
                // the rate of handshakes is measured over seconds, not a burst.
                tokio::time::sleep_until((started + MIN_FLOOD_TIME).into()).await;
                flooding.store(false, Ordering::Relaxed);
                visitors
            },
            probes,
        );
        let flood_time = started.elapsed();
        for handshake_loop in loops {
            handshake_loop.await.unwrap();
        }
        let (after, peak) = memory(pid);
        assert!(relay.try_wait().unwrap().is_none(), "the relay died");
        assert_eq!(
            agent.status.borrow().session(),
            session,
            "the agent's session changed"
        );
        let udp = agent.udp.count();
        println!(
            "UDP flows the agent opened: {}, evicted: {}",
            udp.flows_opened, udp.flows_evicted
        );
        answers.sort();
        let rate = handshakes.load(Ordering::Relaxed) as f64 / flood_time.as_secs_f64();
        println!(
            "flood of {flood_time:.1?}: {RANDOM_DATAGRAMS} random datagrams, {UDP_SOURCES} UDP \
             sources, {} idle TCP visitors held, {} unknown-agent handshakes ({rate:.0}/s)",
            visitors.len(),
            handshakes.load(Ordering::Relaxed),
        );
        println!(
            "relay memory: {:.1} MiB at rest, {:.1} MiB after, peak {:.1} MiB (growth {:.1} MiB)",
            mib(at_rest),
            mib(after),
            mib(peak),
            mib(peak.saturating_sub(at_rest)),
        );
        println!(
            "{} probes of both forwards answered: median {:?}, slowest {:?}; {} UDP probes \
             needed a second datagram, the most tries {}",
            answers.len(),
            answers[answers.len() / 2],
            answers[answers.len() - 1],
            udp_tries.iter().filter(|&&t| t > 1).count(),
            udp_tries.iter().max().unwrap(),
        );
        assert!(
            peak.saturating_sub(at_rest) < MAX_GROWTH,
            "the relay grew by {:.1} MiB",
            mib(peak - at_rest)
        );
        drop(visitors);

        agent.stop().await;
        Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .await
            .unwrap();
        let status = within("the relay to exit", relay.wait()).await.unwrap();
        assert!(status.success(), "{status}");
        let log = std::fs::read_to_string(&log).unwrap();
        let lines = log.lines().count();
        println!("relay log, {lines} lines:\n{log}");
        assert!(lines < MAX_LOG_LINES, "{lines} lines of log:\n{log}");
    })
    .await;
}

/// Asks the UDP forward as mosh would, sending again every half second until an answer comes;
/// returns how many datagrams it took. A flood at the relay's QUIC port overflows its socket
/// buffer in the kernel, and a QUIC datagram lost there is not sent again.
async fn ask_until_answered(socket: &UdpSocket, to: SocketAddr) -> usize {
    let mut buf = [0u8; 64];
    for tries in 1..=10 {
        socket.send_to(b"still there?", to).await.unwrap();
        let answer = tokio::time::timeout(Duration::from_millis(500), socket.recv_from(&mut buf));
        if let Ok(Ok((len, _))) = answer.await {
            assert_eq!(&buf[..len], b"still there?");
            return tries;
        }
    }
    panic!("the UDP forward did not answer 10 datagrams in 5 s");
}

/// One unknown agent's attempt, to its end.
async fn unknown_agent(endpoint: &quinn::Endpoint, client: quinn::ClientConfig, relay: SocketAddr) {
    let connecting = endpoint
        .connect_with(client, relay, tls::SERVER_NAME)
        .unwrap();
    let attempt = async {
        if let Ok(conn) = connecting.await {
            conn.closed().await;
        }
    };
    within("an unknown agent's attempt to end", attempt).await;
}

/// Random bytes of random lengths at the QUIC port, from a few sources.
async fn random_datagrams(relay: SocketAddr) {
    let senders: Vec<_> = (0..10)
        .map(|i| {
            tokio::spawn(async move {
                let socket = UdpSocket::bind(SocketAddr::new(loopback(4, i), 0))
                    .await
                    .unwrap();
                let mut datagram = vec![0u8; 1500];
                for n in 0..RANDOM_DATAGRAMS / 10 {
                    let len = {
                        let mut rng = rand::thread_rng();
                        let len = rng.gen_range(1..=1500);
                        rng.fill_bytes(&mut datagram[..len]);
                        len
                    };
                    socket.send_to(&datagram[..len], relay).await.unwrap();
                    if n % 100 == 0 {
                        // Let the relay read: a full socket buffer would drop most of the
                        // flood before the relay saw it.
                        tokio::task::yield_now().await;
                    }
                }
            })
        })
        .collect();
    for sender in senders {
        sender.await.unwrap();
    }
}

/// A datagram from each of many sources at the public UDP port, a hundred sources at a time.
async fn udp_sources(public: SocketAddr) {
    for batch in 0..UDP_SOURCES / 100 {
        let mut sockets = Vec::with_capacity(100);
        for i in 0..100 {
            let source = SocketAddr::new(loopback(5, batch * 100 + i), 0);
            let socket = UdpSocket::bind(source).await.unwrap();
            socket.send_to(b"who goes there", public).await.unwrap();
            sockets.push(socket);
        }
    }
}

/// Visitor connections that connect and then say nothing, returned so they stay open.
async fn idle_visitors(port: u16) -> Vec<TcpStream> {
    let mut visitors = Vec::with_capacity(IDLE_VISITORS);
    for i in 0..IDLE_VISITORS {
        let socket = TcpSocket::new_v4().unwrap();
        socket
            .bind(SocketAddr::new(loopback(6, i / 100), 0))
            .unwrap();
        visitors.push(socket.connect(public(port)).await.unwrap());
    }
    visitors
}
