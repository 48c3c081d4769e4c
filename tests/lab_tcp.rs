//! The NAT lab, where UDP does not pass: the real binaries behind a real NAT (see
//! `tether_tests::lab`) that drops UDP from the start or in the middle of a transfer, lets only
//! TCP to port 443 out, or nothing but its HTTP proxy. The agent finds the TCP path by itself,
//! moves there and back with every byte, and mosh and ssh go on. Each prints the figure it
//! measured.

use std::time::{Duration, Instant};

use tether_common::transport::choose::QUIC_PROBE_EVERY;
use tether_tests::lab::{Impairment, Lab, Peer, RELAY_PUBLIC};
use tether_tests::mosh::{MoshServer, Tmux, LOCALE};
use tether_tests::process::Process;
use tether_tests::scene::{assert_same_bytes, AT_ONCE};
use tether_tests::{tools, within_for};

/// relay.toml's line for a TCP listener beside the UDP one, on the same port.
const LISTEN_TCP: &str = "listen_tcp = \"203.0.113.1:4433\"";

/// A lab with an echo service on home's port 7000 and the relay, with `relay_settings`.
async fn echo_lab(relay_settings: &str) -> (Lab, Peer, Process) {
    let lab = Lab::build();
    let (service, ready) = lab.peer(&lab.home, &["tcp-echo", "127.0.0.1:7000"]).await;
    assert_eq!(ready, "listening");
    let relay = lab.start_relay_with(relay_settings).await;
    (lab, service, relay)
}

/// A visitor connected through the relay to the service on home's port 7000.
async fn visitor(lab: &Lab) -> Peer {
    let public = format!("{RELAY_PUBLIC}:7000");
    let (visitor, connected) = lab.peer(&lab.visitor, &["client", &public]).await;
    assert_eq!(connected, "connected");
    visitor
}

/// The line of the agent's log read so far that contains `needle`.
fn logged(agent: &Process, needle: &str) -> String {
    let line = agent.log.iter().find(|line| line.contains(needle));
    line.cloned().unwrap_or_else(|| {
        panic!(
            "no {needle:?} in the agent's log:\n{}",
            agent.log.join("\n")
        )
    })
}

/// The agent's log line that says it moved its session to `to`.
async fn moved_to(agent: &mut Process, to: &str, limit: Duration) -> String {
    loop {
        let line = agent
            .wait_for_line_within("moving the session to the other path", limit)
            .await;
        if line.contains(&format!("to={to}")) {
            return line;
        }
    }
}

#[tokio::test]
async fn with_udp_blocked_from_the_start_forwards_are_served_over_tcp_within_five_seconds() {
    let test = "with_udp_blocked_from_the_start_forwards_are_served_over_tcp_within_five_seconds";
    if !Lab::available(test) {
        return;
    }
    within_for("the whole test", Duration::from_secs(60), async {
        let (lab, _service, _relay) = echo_lab(LISTEN_TCP).await;
        lab.impair(Impairment::UdpBlocked);
        let started = Instant::now();
        let (agent, _) = lab.start_agent("").await;
        let mut visitor = visitor(&lab).await;
        let echo = visitor.ask(&format!("echo first {AT_ONCE}")).await;
        let served = started.elapsed();
        assert!(echo.starts_with("echoed"), "{echo}");
        // Said before the session's "connected to relay", which `start_agent` waited for.
        let line = logged(&agent, "connected over TCP");
        assert!(line.contains("UDP to the relay gets no answer"), "{line}");
        println!("UDP blocked by the NAT from the start: the first visitor served {served:?} after the agent started");
        assert!(served <= Duration::from_secs(5), "took {served:?}");
    })
    .await;
}

#[tokio::test]
async fn udp_dropped_under_a_transfer_and_an_idle_ssh_session_moves_both_to_tcp_and_back() {
    let test = "udp_dropped_under_a_transfer_and_an_idle_ssh_session_moves_both_to_tcp_and_back";
    if !Lab::available(test) || !tools::available(test, &["sshd", "ssh", "ssh-keygen"]) {
        return;
    }
    // Progress every 256 KiB, so that the moment bytes move again shows.
    const EVERY: u64 = 256 << 10;
    let bytes: u64 = 64 << 20;
    let limit = QUIC_PROBE_EVERY + Duration::from_secs(240);
    within_for("the whole test", limit, async {
        let lab = Lab::build();
        let (mut sink, ready) = lab.peer(&lab.home, &["sink", "127.0.0.1:7000"]).await;
        assert_eq!(ready, "listening");
        let (_sshd, login) = lab.start_sshd().await;
        let _relay = lab.start_relay_with(LISTEN_TCP).await;
        let (mut agent, _) = lab.start_agent("").await;
        let mut command = lab.visitor.command("ssh");
        command.args(&login).arg("sh");
        let mut ssh = Peer::start(command);
        ssh.tell("echo logged-in-as-$(id -un)").await;
        assert_eq!(ssh.line().await, "logged-in-as-root");

        let mut visitor = visitor(&lab).await;
        visitor.tell(&format!("send {bytes} {EVERY}")).await;
        let progress = |line: &str| -> u64 {
            let n = line.strip_prefix("progress ");
            n.unwrap_or_else(|| panic!("expected progress, got {line:?}"))
                .parse()
                .unwrap()
        };
        let first = progress(&visitor.line_within(Duration::from_secs(60)).await);
        lab.impair(Impairment::UdpBlocked);
        let cut = Instant::now();
        // Both at once: the idle ssh session is asked something, and the transfer's marks are
        // read as they come, each timed.
        let ssh_answers = async {
            ssh.tell("echo typed-after-the-cut").await;
            let line = ssh.line_within(Duration::from_secs(30)).await;
            assert_eq!(line, "typed-after-the-cut");
            cut.elapsed()
        };
        let transfer = async {
            let mut last = cut;
            // The longest wait between two marks after the cut, and when it ended.
            let (mut stall, mut resumed) = (Duration::ZERO, Duration::ZERO);
            let sent = loop {
                let line = visitor.line_within(Duration::from_secs(180)).await;
                let now = Instant::now();
                if !line.starts_with("progress") {
                    break line;
                }
                progress(&line);
                if now - last > stall {
                    (stall, resumed) = (now - last, now - cut);
                }
                last = now;
            };
            (sent, stall, resumed)
        };
        let (ssh_answered, (sent, stall, resumed)) = tokio::join!(ssh_answers, transfer);
        let received = sink.line_within(Duration::from_secs(60)).await;
        let (total, _) = assert_same_bytes(&sent, &received);
        assert_eq!(total, bytes);
        assert!(first < bytes);
        moved_to(&mut agent, "tcp", Duration::from_secs(1)).await;

        lab.impair(Impairment::None);
        let restored = Instant::now();
        moved_to(
            &mut agent,
            "quic",
            QUIC_PROBE_EVERY + Duration::from_secs(30),
        )
        .await;
        let back = restored.elapsed();
        ssh.tell("echo back-on-quic").await;
        assert_eq!(
            ssh.line_within(Duration::from_secs(10)).await,
            "back-on-quic"
        );
        println!(
            "UDP dropped mid-transfer: the idle ssh session answered {ssh_answered:?} after the \
             cut; the transfer stalled {stall:?} at most and moved again {resumed:?} after the \
             cut; {total} bytes arrived, sha256 equal; UDP allowed again: back on QUIC {back:?} \
             later, ssh still answering"
        );
        assert!(
            ssh_answered <= Duration::from_secs(5),
            "ssh: {ssh_answered:?}"
        );
        assert!(resumed <= Duration::from_secs(5), "transfer: {resumed:?}");
        assert!(back <= Duration::from_secs(60), "back on QUIC: {back:?}");
    })
    .await;
}

#[tokio::test]
async fn with_only_tcp_443_out_of_the_nat_the_agent_reaches_a_relay_listening_there() {
    let test = "with_only_tcp_443_out_of_the_nat_the_agent_reaches_a_relay_listening_there";
    if !Lab::available(test) {
        return;
    }
    within_for("the whole test", Duration::from_secs(60), async {
        let (lab, _service, _relay) = echo_lab("listen_tcp = \"203.0.113.1:443\"").await;
        lab.impair(Impairment::OnlyTcpTo(443));
        let (_agent, _) = lab.start_agent("relay_tcp = \"203.0.113.1:443\"").await;
        let mut visitor = visitor(&lab).await;
        let echo = visitor.ask(&format!("echo through-443 {AT_ONCE}")).await;
        assert!(echo.starts_with("echoed"), "{echo}");
    })
    .await;
}

/// Starts tinyproxy in the NAT's namespace on 10.77.0.1:8888, letting home tunnel to the
/// relay's port 4433; returns it once it accepts connections.
async fn start_proxy(lab: &Lab) -> Process {
    let config = lab.keys.path().join("tinyproxy.conf");
    let text = "Port 8888\nListen 10.77.0.1\nTimeout 600\nAllow 10.77.0.0/24\nConnectPort 4433\n\
                LogLevel Info\nMaxClients 100\n";
    std::fs::write(&config, text).expect("write tinyproxy.conf");
    // tinyproxy logs to stdout when it stays in the foreground; the log is read on stderr.
    let mut command = lab.nat.command("sh");
    command
        .arg("-c")
        .arg(format!("exec tinyproxy -d -c {} 1>&2", config.display()));
    let mut proxy = Process::start(command);
    proxy.wait_for_line("Accepting connections").await;
    proxy
}

#[tokio::test]
async fn through_an_http_proxy_when_nothing_else_passes_and_a_wrong_proxy_is_named() {
    let test = "through_an_http_proxy_when_nothing_else_passes_and_a_wrong_proxy_is_named";
    if !Lab::available(test) || !tools::available(test, &["tinyproxy"]) {
        return;
    }
    within_for("the whole test", Duration::from_secs(90), async {
        let (lab, _service, _relay) = echo_lab(LISTEN_TCP).await;
        let mut proxy = start_proxy(&lab).await;
        // Nothing passes the NAT: only the proxy, which runs on it, reaches the relay.
        lab.impair(Impairment::Outage);
        let (agent, _) = lab.start_agent("proxy = \"http://10.77.0.1:8888\"").await;
        let mut visitor = visitor(&lab).await;
        let echo = visitor.ask(&format!("echo via-proxy {AT_ONCE}")).await;
        assert!(echo.starts_with("echoed"), "{echo}");
        proxy.wait_for_line("Established connection to host").await;
        drop(agent);

        let mut wrong = {
            let settings = "transport = \"tcp\"\nproxy = \"http://10.77.0.1:8899\"";
            let file = lab.keys.path().join("agent.toml");
            let text = std::fs::read_to_string(&file).expect("agent.toml");
            let text = text.replace("proxy = \"http://10.77.0.1:8888\"", settings);
            let wrong = lab.keys.path().join("wrong-proxy.toml");
            std::fs::write(&wrong, text).expect("write wrong-proxy.toml");
            let mut command = lab.home.command(tether_tests::lab::binary("tether-agent"));
            command.args(["run", "-c"]).arg(&wrong);
            Process::start(command)
        };
        let line = wrong
            .wait_for_line("cannot reach the proxy http://10.77.0.1:8899")
            .await;
        println!("a wrong proxy: {line}");
    })
    .await;
}

#[tokio::test]
async fn mosh_works_over_the_tcp_path() {
    let test = "mosh_works_over_the_tcp_path";
    if !Lab::available(test) || !tools::available(test, &["mosh-server", "mosh-client", "tmux"]) {
        return;
    }
    within_for("the whole test", Duration::from_secs(90), async {
        let lab = Lab::build();
        let _relay = lab.start_relay_with(LISTEN_TCP).await;
        lab.impair(Impairment::UdpBlocked);
        let (agent, _) = lab.start_agent("").await;
        logged(&agent, "connected over TCP");
        let in_home = ["ip", "netns", "exec", &lab.home.name];
        let server = MoshServer::start(&in_home, 60003);
        let client = format!(
            "ip netns exec {} env LC_ALL={LOCALE} MOSH_KEY={} mosh-client {RELAY_PUBLIC} 60003",
            lab.visitor.name, server.key
        );
        let tmux = Tmux::start(&client);
        let started = Instant::now();
        tmux.type_line("echo over-tcp-$((6 * 7))");
        tmux.wait_for("over-tcp-42").await;
        println!(
            "mosh over the TCP path: answered {:?} after typing",
            started.elapsed()
        );
    })
    .await;
}
