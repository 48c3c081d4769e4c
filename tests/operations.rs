//! What an operator sees of the running binaries: `status` (a table and JSON) over the status
//! socket, the Prometheus metrics, and the log format under systemd.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tether_relay::status::RelayStatus;
use tether_tests::lab::{binary, is_root};
use tether_tests::process::{run, Process};
use tether_tests::status::{agent_status_once, path, relay_status_once};
use tether_tests::udp::{ask, consecutive_udp_ports, udp_echo, visitor};
use tether_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// What the local TCP service reads from each visitor before it answers, and how much it answers.
const ASKED: usize = 1000;

const ANSWERED: usize = 5000;

/// Two binaries' configs: one TCP forward ("files") and one UDP forward ("game"), status sockets
/// in the keys' folder, and metrics on a free loopback port.
struct Setup {
    relay: PathBuf,
    agent: PathBuf,
    relay_socket: PathBuf,
    agent_socket: PathBuf,
    tcp: u16,
    udp: u16,
}

impl Setup {
    fn write(keys: &Keys, tcp_local: SocketAddr, udp_local: u16) -> Self {
        let (relay_identity, _) = keys.identity("relay");
        let (agent_identity, _) = keys.identity("agent");
        let (ports, held) = consecutive_udp_ports(2);
        drop(held);
        let (quic, udp) = (ports.start(), ports.end());
        let tcp = free_port();
        let relay = keys.path().join("relay.toml");
        let relay_text = format!(
            "listen = \"127.0.0.1:{quic}\"\npublic_bind = \"127.0.0.1\"\n\
             status_socket = \"relay.sock\"\nmetrics = \"127.0.0.1:0\"\n\
             [[agent]]\nname = \"home\"\nfingerprint = \"{}\"\n\
             ports = [\"{tcp}/tcp\", \"{udp}/udp\"]\n",
            agent_identity.fingerprint()
        );
        std::fs::write(&relay, relay_text).unwrap();
        let agent = keys.path().join("agent.toml");
        let agent_text = format!(
            "relay = \"127.0.0.1:{quic}\"\nrelay_fingerprint = \"{}\"\n\
             status_socket = \"agent.sock\"\nmetrics = \"127.0.0.1:0\"\n\
             [[forward]]\nname = \"files\"\nproto = \"tcp\"\nremote = {tcp}\nlocal = \"{tcp_local}\"\n\
             [[forward]]\nname = \"game\"\nproto = \"udp\"\nremote = {udp}\nlocal = \"127.0.0.1:{udp_local}\"\n",
            relay_identity.fingerprint(),
        );
        std::fs::write(&agent, agent_text).unwrap();
        Self {
            relay,
            agent,
            relay_socket: keys.path().join("relay.sock"),
            agent_socket: keys.path().join("agent.sock"),
            tcp,
            udp,
        }
    }
}

/// Starts `binary run -c config` and returns it with the address its metrics are served on.
async fn start(binary_name: &str, config: &Path, ready: &str) -> (Process, SocketAddr) {
    let mut process = Process::spawn(&binary(binary_name), &["run", "-c", path(config)]);
    let line = process.wait_for_line("metrics on http://").await;
    let address = line
        .split("http://")
        .nth(1)
        .and_then(|rest| rest.split('/').next())
        .and_then(|address| address.parse().ok())
        .unwrap_or_else(|| panic!("no metrics address in {line:?}"));
    process.wait_for_line(ready).await;
    (process, address)
}

/// A local service that reads [`ASKED`] bytes from each visitor, answers [`ANSWERED`] and then
/// waits for the visitor to close.
async fn asymmetric_service() -> SocketAddr {
    serve(|mut tcp| async move {
        let mut asked = vec![0; ASKED];
        if tcp.read_exact(&mut asked).await.is_ok() {
            let _ = tcp.write_all(&pattern(ANSWERED)).await;
            let _ = tcp.read_to_end(&mut Vec::new()).await;
        }
    })
    .await
}

/// `GET /metrics` from `address`: the body of a 200 answer.
async fn scrape(address: SocketAddr) -> String {
    within("a scrape", async {
        let mut tcp = TcpStream::connect(address).await.expect("metrics endpoint");
        tcp.write_all(b"GET /metrics HTTP/1.1\r\nHost: tether\r\n\r\n")
            .await
            .unwrap();
        let mut answer = String::new();
        tcp.read_to_string(&mut answer).await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 200 OK"), "{answer}");
        answer
            .split_once("\r\n\r\n")
            .map(|(_, body)| body.to_owned())
            .unwrap()
    })
    .await
}

/// Asserts that the sample `series` (name and labels, as exposed) has `value` in a scrape.
fn assert_sample(scrape: &str, series: &str, value: f64) {
    let found = scrape
        .lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|value| value.parse::<f64>().ok());
    assert_eq!(found, Some(value), "{series} in:\n{scrape}");
}

const RELAY_FAMILIES: [(&str, &str); 15] = [
    ("tether_relay_agent_up", "gauge"),
    ("tether_relay_sessions", "counter"),
    ("tether_relay_reconnects", "counter"),
    ("tether_relay_rtt_seconds", "gauge"),
    ("tether_relay_open_visitors", "gauge"),
    ("tether_relay_visitors", "counter"),
    ("tether_relay_open_flows", "gauge"),
    ("tether_relay_flows", "counter"),
    ("tether_relay_received_bytes", "counter"),
    ("tether_relay_sent_bytes", "counter"),
    ("tether_relay_received_datagrams", "counter"),
    ("tether_relay_sent_datagrams", "counter"),
    ("tether_relay_dropped_datagrams", "counter"),
    ("tether_relay_refused_handshakes", "counter"),
    ("tether_relay_refused_visitors", "counter"),
];

const AGENT_FAMILIES: [(&str, &str); 13] = [
    ("tether_agent_connected", "gauge"),
    ("tether_agent_sessions", "counter"),
    ("tether_agent_reconnects", "counter"),
    ("tether_agent_rtt_seconds", "gauge"),
    ("tether_agent_open_visitors", "gauge"),
    ("tether_agent_visitors", "counter"),
    ("tether_agent_open_flows", "gauge"),
    ("tether_agent_flows", "counter"),
    ("tether_agent_sent_bytes", "counter"),
    ("tether_agent_received_bytes", "counter"),
    ("tether_agent_sent_datagrams", "counter"),
    ("tether_agent_received_datagrams", "counter"),
    ("tether_agent_dropped_datagrams", "counter"),
];

fn assert_families(scrape: &str, families: &[(&str, &str)]) {
    for (name, kind) in families {
        let declared = format!("# TYPE {name} {kind}\n");
        assert!(scrape.contains(&declared), "no {declared:?} in:\n{scrape}");
    }
}

#[tokio::test]
async fn status_and_metrics_show_the_agents_forwards_and_what_they_carried() {
    within_for("the whole test", Duration::from_secs(60), async {
        let keys = Keys::new();
        let (local_udp, sockets) = consecutive_udp_ports(1);
        udp_echo(sockets.into_iter().next().unwrap());
        let setup = Setup::write(&keys, asymmetric_service().await, local_udp.start());
        let (_relay, relay_metrics) = start("tether-relay", &setup.relay, "relay listening").await;
        let (_agent, agent_metrics) =
            start("tether-agent", &setup.agent, "connected to relay").await;

        // Before any visitor: every family is there, and the byte counters are at zero.
        let before = scrape(relay_metrics).await;
        assert_families(&before, &RELAY_FAMILIES);
        let files = "{agent=\"home\",forward=\"files\"}";
        let game = "{agent=\"home\",forward=\"game\"}";
        let received = format!("tether_relay_received_bytes_total{files}");
        assert_sample(&before, &received, 0.0);
        assert_families(&scrape(agent_metrics).await, &AGENT_FAMILIES);

        // One visitor over TCP, kept open, and three datagrams over UDP.
        let mut tcp = TcpStream::connect(public(setup.tcp)).await.unwrap();
        tcp.write_all(&pattern(ASKED)).await.unwrap();
        let mut answer = vec![0; ANSWERED];
        within("the answer", tcp.read_exact(&mut answer))
            .await
            .unwrap();
        let udp_visitor = visitor("127.0.0.1").await;
        for _ in 0..3 {
            let echoed = ask(&udp_visitor, public(setup.udp), &[7; 100]).await;
            assert_eq!(echoed.as_deref(), Some(&[7; 100][..]));
        }

        let relay = relay_status_once(&setup.relay_socket, |s| {
            let t = &s.agents[0].forwards[0].traffic;
            let u = &s.agents[0].forwards[1].traffic;
            t.bytes_out == ANSWERED as u64 && u.datagrams_out == 3
        })
        .await;
        let home = &relay.agents[0];
        assert_eq!((home.name.as_str(), home.connected), ("home", true));
        assert!(home.address.as_deref().unwrap().starts_with("127.0.0.1:"));
        assert!(home.rtt_ms.is_some() && home.since.is_some());
        assert_eq!((home.sessions, home.reconnects), (1, 0));
        let (tcp_forward, udp_forward) = (&home.forwards[0], &home.forwards[1]);
        assert_eq!(
            (tcp_forward.name.as_str(), tcp_forward.proto.as_str()),
            ("files", "tcp")
        );
        assert_eq!(tcp_forward.ports, setup.tcp.to_string());
        assert_eq!(tcp_forward.state, "open");
        let t = &tcp_forward.traffic;
        assert_eq!((t.visitors_open, t.visitors), (1, 1));
        assert_eq!((t.bytes_in, t.bytes_out), (ASKED as u64, ANSWERED as u64));
        // The one visitor connection open now, as frp's dashboard shows them.
        let [open] = &tcp_forward.connections[..] else {
            panic!("one visitor connection: {:?}", tcp_forward.connections);
        };
        assert_eq!(open.address, tcp.local_addr().unwrap().to_string());
        assert_eq!(
            (open.bytes_in, open.bytes_out),
            (ASKED as u64, ANSWERED as u64)
        );
        assert!(
            tether_common::service::report::age(&open.since, std::time::SystemTime::now())
                .is_some(),
            "{}",
            open.since
        );
        let u = &udp_forward.traffic;
        assert_eq!((udp_forward.flows_open, u.flows), (1, 1));
        assert_eq!((u.datagrams_in, u.datagrams_out), (3, 3));
        assert_eq!((u.datagram_bytes_in, u.datagram_bytes_out), (300, 300));

        // The agent counts the same bytes, seen from the service's side.
        let agent = agent_status_once(&setup.agent_socket, |s| {
            s.forwards[0].traffic.bytes_out == ANSWERED as u64
                && s.forwards[1].traffic.datagrams_out == 3
        })
        .await;
        assert!(agent.connected && agent.rtt_ms.is_some());
        assert_eq!(agent.state, "connected to the relay, 2 forwards");
        assert_eq!((agent.sessions, agent.last_error.as_deref()), (1, None));
        let t = &agent.forwards[0].traffic;
        assert_eq!((t.visitors_open, t.bytes_in, t.bytes_out), (1, 1000, 5000));
        assert_eq!(agent.forwards[0].local, tcp_forward_local(&setup.agent));
        let u = &agent.forwards[1].traffic;
        assert_eq!((agent.forwards[1].flows_open, u.datagrams_in), (1, 3));

        // The metrics moved with the traffic.
        let after = scrape(relay_metrics).await;
        assert_sample(&after, &received, ASKED as f64);
        let sent = format!("tether_relay_sent_bytes_total{files}");
        assert_sample(&after, &sent, ANSWERED as f64);
        let series = format!("tether_relay_received_datagrams_total{game}");
        assert_sample(&after, &series, 3.0);
        let series = format!("tether_relay_open_visitors{files}");
        assert_sample(&after, &series, 1.0);
        let series = format!("tether_relay_open_flows{game}");
        assert_sample(&after, &series, 1.0);
        assert_sample(&after, "tether_relay_agent_up{agent=\"home\"}", 1.0);
        assert_sample(&after, "tether_relay_sessions_total{agent=\"home\"}", 1.0);
        let agent_scrape = scrape(agent_metrics).await;
        let series = "tether_agent_sent_bytes_total{forward=\"files\"}";
        assert_sample(&agent_scrape, series, ASKED as f64);
        let series = "tether_agent_received_datagrams_total{forward=\"game\"}";
        assert_sample(&agent_scrape, series, 3.0);
        assert_sample(&agent_scrape, "tether_agent_connected", 1.0);

        // What a person reads, and what a script reads.
        let (code, table, _) = run(
            &binary("tether-relay"),
            &["status", "-c", path(&setup.relay)],
        );
        assert_eq!(code, 0);
        assert!(table.contains("1 agent connected of 1 listed"), "{table}");
        assert!(table.starts_with("relay 127.0.0.1:"), "{table}");
        assert!(
            table
                .lines()
                .next()
                .unwrap()
                .contains(", this relay's key SHA256:"),
            "{table}"
        );
        let row = table.lines().find(|l| l.starts_with("home  ")).unwrap();
        assert!(
            row.contains(" up ") && row.contains("127.0.0.1:"),
            "{table}"
        );
        let row = table.lines().find(|l| l.contains(" files ")).unwrap();
        assert!(
            row.contains(&format!("{}/tcp", setup.tcp)) && row.contains("1000 B"),
            "{table}"
        );
        let visitor_address = tcp.local_addr().unwrap().to_string();
        let row = table
            .lines()
            .find(|l| l.contains(&visitor_address))
            .unwrap();
        assert!(row.starts_with("home   files "), "{table}");
        let (code, json, _) = run(
            &binary("tether-relay"),
            &["status", "--json", "--socket", path(&setup.relay_socket)],
        );
        assert_eq!(code, 0);
        let parsed: RelayStatus = serde_json::from_str(&json).unwrap();
        assert_eq!(parsed.agents[0].forwards[0].traffic.bytes_in, ASKED as u64);
        let (code, table, _) = run(
            &binary("tether-agent"),
            &["status", "-c", path(&setup.agent)],
        );
        assert_eq!(code, 0);
        assert!(
            table.contains("connected to the relay, 2 forwards"),
            "{table}"
        );
        // The key the agent pins is named as such, beside the agent's own.
        let mut lines = table.lines();
        assert!(
            lines.next().unwrap().contains(", pinned relay key SHA256:"),
            "{table}"
        );
        assert!(
            lines
                .next()
                .unwrap()
                .starts_with("this agent's key SHA256:"),
            "{table}"
        );
        assert!(table.contains("4.9 KiB"), "{table}");

        // The visitor leaves: the open count goes back to zero, the totals stay.
        drop(tcp);
        let relay = relay_status_once(&setup.relay_socket, |s| {
            s.agents[0].forwards[0].traffic.visitors_open == 0
        })
        .await;
        assert_eq!(relay.agents[0].forwards[0].traffic.visitors, 1);
        assert!(relay.agents[0].forwards[0].connections.is_empty());
    })
    .await;
}

/// The `local` of the agent's first forward, as agent.toml has it.
fn tcp_forward_local(agent: &Path) -> String {
    let text = std::fs::read_to_string(agent).unwrap();
    let line = text.lines().find(|l| l.starts_with("local = ")).unwrap();
    line.trim_start_matches("local = ")
        .trim_matches('"')
        .to_owned()
}

#[tokio::test]
async fn status_without_a_running_process_says_so() {
    within("the test", async {
        let keys = Keys::new();
        let socket = keys.path().join("nobody.sock");
        for name in ["tether-relay", "tether-agent"] {
            let (code, stdout, stderr) = run(&binary(name), &["status", "--socket", path(&socket)]);
            assert_eq!(code, 1);
            assert!(stdout.is_empty());
            assert_eq!(
                stderr.trim(),
                format!(
                    "no status socket at {}: is the service running, with this status_socket?",
                    socket.display()
                )
            );
        }
    })
    .await;
}

/// As the README runs them by hand: no `status_socket` in either config, no folder made for it
/// beforehand, and `status` asked with no more than `-c`.
#[tokio::test]
async fn run_by_hand_answers_status_at_the_default_socket() {
    within("the test", async {
        let keys = Keys::new();
        let configs = process::Configs::write(&keys, echo_service().await);
        for file in [&configs.relay, &configs.agent] {
            let text = std::fs::read_to_string(file).unwrap();
            let text: String = text
                .lines()
                .filter(|l| !l.starts_with("status_socket"))
                .map(|l| format!("{l}\n"))
                .collect();
            std::fs::write(file, text).unwrap();
        }
        for system in [
            tether_common::config::RELAY_STATUS_SOCKET,
            tether_common::config::AGENT_STATUS_SOCKET,
        ] {
            // As on a machine where the service never ran: no folder for the socket.
            let socket = tether_common::config::default_status_socket(system);
            let _ = std::fs::remove_file(&socket);
            if let Some(folder) = socket.parent() {
                let _ = std::fs::remove_dir(folder);
            }
            assert!(!socket.exists(), "{} is in the way", socket.display());
        }
        let (mut relay, mut agent) = configs.run_both().await;
        for (name, config) in [
            ("tether-relay", &configs.relay),
            ("tether-agent", &configs.agent),
        ] {
            let (code, stdout, stderr) = run(&binary(name), &["status", "-c", path(config)]);
            assert_eq!(code, 0, "{name} status: {stderr}");
            assert!(stdout.contains("connected"), "{name} status: {stdout}");
        }
        agent.signal_and_wait("TERM").await;
        relay.signal_and_wait("TERM").await;
        for process in [&relay, &agent] {
            assert!(
                !process.log.iter().any(|l| l.contains("will get no answer")),
                "{}",
                process.log.join("\n")
            );
        }
    })
    .await;
}

#[tokio::test]
async fn only_root_and_the_services_user_may_ask() {
    let test = "only_root_and_the_services_user_may_ask";
    if !tools::available(test, &["setpriv"]) {
        return;
    }
    if !is_root() {
        assert!(
            std::env::var_os("TETHER_REQUIRE_TOOLS").is_none(),
            "{test} needs root"
        );
        tools::not_run(test, "root, to ask as another user");
        return;
    }
    within("the test", async {
        let keys = Keys::new();
        let configs = process::Configs::write(&keys, echo_service().await);
        let mut relay = Process::spawn(
            &binary("tether-relay"),
            &["run", "-c", path(&configs.relay)],
        );
        relay.wait_for_line("relay listening").await;
        // The keys' folder is private to root; make the way to the socket open, so that only
        // the socket's own mode stands between another user and the relay.
        let mode = std::os::unix::fs::PermissionsExt::from_mode(0o755);
        std::fs::set_permissions(keys.path(), mode).unwrap();
        let output = std::process::Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(binary("tether-relay"))
            .args(["status", "--socket", path(&configs.relay_socket)])
            .output()
            .unwrap();
        assert_eq!(output.status.code(), Some(1));
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains("permission denied"), "{stderr}");
        let (code, _, _) = run(
            &binary("tether-relay"),
            &["status", "--socket", path(&configs.relay_socket)],
        );
        assert_eq!(code, 0, "root may ask");
    })
    .await;
}

#[tokio::test]
async fn under_systemd_logs_carry_no_colours_and_no_timestamps_of_their_own() {
    within("the test", async {
        let keys = Keys::new();
        let configs = process::Configs::write(&keys, echo_service().await);
        let start = |journal: bool| {
            let mut command = tokio::process::Command::new(binary("tether-relay"));
            command.args(["run", "-c", path(&configs.relay)]);
            if journal {
                command.env("JOURNAL_STREAM", "8:12345");
            } else {
                command.env_remove("JOURNAL_STREAM");
            }
            Process::start(command)
        };
        let mut relay = start(false);
        let plain = relay.wait_for_line("relay listening").await;
        relay.signal_and_wait("TERM").await;
        // On a terminal-less stderr: a timestamp of our own, and no colour either way.
        assert!(plain.starts_with("20") && plain.contains('T'), "{plain}");
        let mut relay = start(true);
        let journal = relay.wait_for_line("relay listening").await;
        assert!(journal.trim_start().starts_with("INFO "), "{journal}");
        assert!(!journal.contains('\u{1b}'), "{journal}");
        relay.signal_and_wait("TERM").await;
    })
    .await;
}

/// SIGTERM with a session up: each binary exits within a second, whichever goes first (the
/// README's figure), measured from the signal to the exit its parent sees.
#[tokio::test]
async fn each_end_exits_within_a_second_of_sigterm_with_a_session_up() {
    within_for("the test", Duration::from_secs(60), async {
        let keys = Keys::new();
        let configs = process::Configs::write(&keys, echo_service().await);
        let mut exits = Vec::new();
        for relay_first in [false, true] {
            let (mut relay, mut agent) = configs.run_both().await;
            let (first, second) = match relay_first {
                true => (&mut relay, &mut agent),
                false => (&mut agent, &mut relay),
            };
            for process in [first, second] {
                let start = std::time::Instant::now();
                assert!(process.signal_and_wait("TERM").await.success());
                exits.push(start.elapsed());
            }
        }
        // Agent with the relay up, relay with no agent; then relay with the agent up, agent.
        eprintln!("exits after SIGTERM: {exits:?}");
        for exit in &exits {
            assert!(*exit < Duration::from_secs(1), "{exits:?}");
        }
    })
    .await;
}
