//! The NAT lab, what the NAT and the link do to a running session: real binaries in network
//! namespaces behind a real NAT (see `tether_tests::lab`), an idle connection across the NAT's
//! timeouts, a NAT rebinding, a half-open path, loss, delay, jitter and reordering. Each prints
//! the figure it measured.

use std::time::{Duration, Instant};

use tether_agent::probe::BUSY_KEEPALIVE;

use tether_tests::lab::{
    idle_span, session_of, Impairment, Lab, Netns, Peer, Shim, NAT_UDP_TIMEOUT, RELAY_PUBLIC,
};
use tether_tests::mosh::{MoshServer, Tmux, LOCALE};
use tether_tests::scene::{assert_same_bytes, transfer, Scene, AT_ONCE};
use tether_tests::{tools, within_for};

#[tokio::test]
async fn an_idle_visitor_connection_outlives_three_nat_timeouts() {
    let test = "an_idle_visitor_connection_outlives_three_nat_timeouts";
    if !Lab::available(test) {
        return;
    }
    let idle = idle_span();
    within_for("the whole test", idle + Duration::from_secs(60), async {
        let mut scene = Scene::start("", "tcp-echo").await;
        let first = scene.echo_at_once("hello").await;
        assert!(first.starts_with("echoed"), "{first}");
        tokio::time::sleep(idle).await; // the time under test
        assert_eq!(
            scene.lab.nat_ports().len(),
            1,
            "the agent's NAT mapping must still be there"
        );
        let start = Instant::now();
        let answer = scene.echo_at_once("still-there").await;
        assert!(
            answer.starts_with("echoed"),
            "after {idle:?} idle: {answer}"
        );
        println!(
            "idle {idle:?} ({:.1} NAT timeouts): the visitor's echo came back in {:?}",
            idle.as_secs_f64() / NAT_UDP_TIMEOUT.as_secs_f64(),
            start.elapsed()
        );
    })
    .await;
}

#[tokio::test]
async fn without_keepalives_the_nat_forgets_the_agent() {
    let test = "without_keepalives_the_nat_forgets_the_agent";
    if !Lab::available(test) {
        return;
    }
    let idle = idle_span();
    within_for("the whole test", idle + Duration::from_secs(60), async {
        // No keepalives, and an idle timeout longer than the idle span, so that only the NAT
        // can end this session.
        let settings = "keepalive = \"off\"\nidle_timeout = \"1h\"";
        let mut scene = Scene::start(settings, "tcp-echo").await;
        let first = scene.echo_at_once("hello").await;
        assert!(first.starts_with("echoed"), "{first}");
        tokio::time::sleep(idle).await; // the time under test
        let mappings = scene.lab.nat_ports().len();
        let answer = scene.echo_at_once("still-there").await;
        println!(
            "idle {idle:?} without keepalives: NAT mappings left {mappings}, visitor: {answer}"
        );
        assert_eq!(mappings, 0, "the NAT must have forgotten the agent");
        assert!(answer.starts_with("failed"), "{answer}");
    })
    .await;
}

#[tokio::test]
async fn a_nat_rebinding_mid_transfer_is_followed_without_a_new_session() {
    let test = "a_nat_rebinding_mid_transfer_is_followed_without_a_new_session";
    if !Lab::available(test) {
        return;
    }
    within_for("the whole test", Duration::from_secs(120), async {
        let mut scene = Scene::start("", "sink").await;
        let before = scene.lab.nat_ports();
        let (sent, received) = transfer(&mut scene, 64 << 20, Lab::flush_nat).await;
        let (bytes, took) = assert_same_bytes(&sent, &received);
        let after = scene.lab.nat_ports();
        assert_eq!((before.len(), after.len()), (1, 1), "{before:?} {after:?}");
        assert_ne!(
            before, after,
            "the flush must have moved the agent to a new NAT port"
        );
        let sessions = scene.agent_sessions().await;
        assert_eq!(sessions, [scene.session.clone()], "no new session");
        println!(
            "{bytes} bytes with the NAT flushed after 8 MiB (NAT port {} -> {}): sha256 matches, \
             one session, {took:?}",
            before[0], after[0]
        );
    })
    .await;
}

/// A NAT that rebinds while a visitor's connection is open and idle (a router restarted, its
/// mappings flushed): the relay's packets go to the old mapping, which drops them, and only a
/// packet from the agent opens the new one. The agent sends one at least every
/// `BUSY_KEEPALIVE` while connections are open, so the visitor's next line waits for that
/// rather than for the next keepalive (up to 5 s).
#[tokio::test]
async fn after_a_nat_rebinding_an_open_connection_waits_under_a_second() {
    let test = "after_a_nat_rebinding_an_open_connection_waits_under_a_second";
    if !Lab::available(test) {
        return;
    }
    const TRIES: usize = 5;
    within_for("the whole test", Duration::from_secs(180), async {
        let mut scene = Scene::start("", "tcp-echo").await;
        let mut waits = Vec::new();
        for n in 0..TRIES {
            let before = scene.lab.nat_ports();
            // Idle for a while, a different while each time, so that the rebinding falls
            // anywhere between the agent's packets.
            tokio::time::sleep(Duration::from_millis(1500 + 290 * n as u64)).await;
            scene.lab.flush_nat();
            let echo = scene.visitor.ask(&format!("echo rebound-{n} 30000")).await;
            let micros = echo.strip_prefix("echoed ");
            let micros = micros.unwrap_or_else(|| panic!("no echo after the rebinding: {echo}"));
            waits.push(Duration::from_micros(micros.parse().unwrap()));
            let after = scene.lab.nat_ports();
            assert_ne!(
                before, after,
                "the flush must have moved the agent to a new NAT port"
            );
        }
        let sessions = scene.agent_sessions().await;
        assert_eq!(sessions, [scene.session.clone()], "no new session");
        let printed = format!("{waits:?}");
        waits.sort();
        let median = waits[TRIES / 2];
        println!(
            "NAT rebound under an idle visitor connection, {TRIES} times: the visitor's next \
             line came back {printed} later, median {median:?}; one session"
        );
        assert!(median <= Duration::from_secs(1), "median {median:?}");
        assert!(
            waits[TRIES - 1] <= BUSY_KEEPALIVE * 2,
            "slowest {:?}",
            waits[TRIES - 1]
        );
    })
    .await;
}

#[tokio::test]
async fn five_percent_loss_each_way_still_delivers_every_byte() {
    let test = "five_percent_loss_each_way_still_delivers_every_byte";
    if !Lab::available(test) {
        return;
    }
    within_for("the whole test", Duration::from_secs(300), async {
        let mut scene = Scene::start("", "sink").await;
        scene.lab.impair(Impairment::Loss(0.05));
        let (sent, received) = transfer(&mut scene, 64 << 20, |_| {}).await;
        let (bytes, took) = assert_same_bytes(&sent, &received);
        println!(
            "{bytes} bytes through 5% loss each way: sha256 matches, {took:?} ({:.1} MB/s)",
            bytes as f64 / took.as_secs_f64() / 1e6
        );
    })
    .await;
}

#[tokio::test]
async fn delay_jitter_reordering_and_loss_still_deliver_every_byte() {
    let test = "delay_jitter_reordering_and_loss_still_deliver_every_byte";
    if !Lab::available(test) {
        return;
    }
    within_for("the whole test", Duration::from_secs(300), async {
        // Round trips of 50-70 ms, and 0.5% of packets lost and 0.5% overtaken, each way.
        let shim = Shim {
            delay: Duration::from_millis(25),
            jitter: Duration::from_millis(10),
            loss: 0.005,
            reorder: 0.005,
        };
        let mut scene = Scene::start_via(Some(shim), "", "sink").await;
        // An echo service on home's port 22, which the agent forwards from relay port 2222.
        let (_echo, ready) = scene
            .lab
            .peer(&scene.lab.home, &["tcp-echo", "127.0.0.1:22"])
            .await;
        assert_eq!(ready, "listening");
        let public = format!("{RELAY_PUBLIC}:2222");
        let (mut pinger, connected) = scene
            .lab
            .peer(&scene.lab.visitor, &["client", &public])
            .await;
        assert_eq!(connected, "connected");
        let mut echoes = Vec::new();
        for i in 0..20 {
            let echo = pinger.ask(&format!("echo ping-{i} {AT_ONCE}")).await;
            let micros: u64 = echo
                .strip_prefix("echoed ")
                .and_then(|m| m.parse().ok())
                .unwrap_or_else(|| panic!("{echo}"));
            echoes.push(Duration::from_micros(micros));
        }
        echoes.sort();
        let median = echoes[echoes.len() / 2];
        assert!(
            median >= shim.delay * 2,
            "echoes took {median:?}: is the shim in the path?"
        );
        let (sent, received) = transfer(&mut scene, 16 << 20, |_| {}).await;
        let (bytes, took) = assert_same_bytes(&sent, &received);
        println!(
            "through the shim ({shim:?}): median visitor echo {median:?}; {bytes} bytes with \
             matching sha256 in {took:?} ({:.1} MB/s)",
            bytes as f64 / took.as_secs_f64() / 1e6
        );
    })
    .await;
}

#[tokio::test]
async fn a_half_open_path_is_noticed_and_leaves_one_session() {
    let test = "a_half_open_path_is_noticed_and_leaves_one_session";
    if !Lab::available(test) {
        return;
    }
    let idle_timeout = Duration::from_secs(30);
    within_for(
        "the whole test",
        idle_timeout * 2 + Duration::from_secs(60),
        async {
            let mut scene = Scene::start("", "tcp-echo").await;
            scene.lab.impair(Impairment::RelayToHomeLost);
            let cut = Instant::now();
            let line = scene
                .agent
                .wait_for_line_within("reconnecting", idle_timeout * 2)
                .await;
            let noticed = cut.elapsed();
            assert!(line.contains("timed out"), "{line}");
            scene.lab.impair(Impairment::None);
            let line = scene.agent.wait_for_line("connected to relay").await;
            let new = session_of(&line);
            let echo = scene.new_visitor_echo().await;
            assert!(echo.starts_with("echoed"), "{echo}");
            // The sessions the relay still held when it stopped: only the new one.
            scene.relay.signal_and_wait("TERM").await;
            let held: Vec<String> = scene
                .relay
                .log
                .iter()
                .filter(|l| l.contains("agent disconnected") && l.contains("shutting down"))
                .map(|l| session_of(l))
                .collect();
            println!(
                "relay-to-home packets dropped: the agent noticed after {noticed:?} (idle timeout \
             {idle_timeout:?}); the relay then held sessions {held:?}"
            );
            assert_eq!(held, [new]);
        },
    )
    .await;
}

#[tokio::test]
async fn an_idle_ssh_login_outlives_three_nat_timeouts() {
    let test = "an_idle_ssh_login_outlives_three_nat_timeouts";
    if !Lab::available(test) || !tools::available(test, &["sshd", "ssh", "ssh-keygen"]) {
        return;
    }
    let idle = idle_span();
    within_for("the whole test", idle + Duration::from_secs(60), async {
        let lab = Lab::build();
        let (_sshd, login) = lab.start_sshd().await;
        let _relay = lab.start_relay().await;
        let (_agent, _) = lab.start_agent("").await;
        // A remote shell that reads commands from the ssh connection, as a person's would.
        let mut command = lab.visitor.command("ssh");
        command.args(&login).arg("sh");
        let mut ssh = Peer::start(command);
        ssh.tell("echo logged-in-as-$(id -un)").await;
        assert_eq!(ssh.line().await, "logged-in-as-root");
        tokio::time::sleep(idle).await; // the time under test
        let start = Instant::now();
        ssh.tell("echo still-there").await;
        let answer = ssh.line_within(Duration::from_secs(2)).await;
        let took = start.elapsed();
        assert_eq!(answer, "still-there");
        println!(
            "ssh login idle {idle:?} ({:.1} NAT timeouts): echo answered in {took:?}",
            idle.as_secs_f64() / NAT_UDP_TIMEOUT.as_secs_f64()
        );
    })
    .await;
}

#[tokio::test]
async fn an_idle_mosh_session_outlives_the_nat_and_a_port_hop() {
    let test = "an_idle_mosh_session_outlives_the_nat_and_a_port_hop";
    if !Lab::available(test) || !tools::available(test, &["mosh-server", "mosh-client", "tmux"]) {
        return;
    }
    let idle = idle_span();
    // mosh-client moves to a new source port after 10 s without hearing the server.
    let blocked = Duration::from_secs(15);
    within_for(
        "the whole test",
        idle + blocked + Duration::from_secs(90),
        async {
            let lab = Lab::build();
            let _relay = lab.start_relay().await;
            let (_agent, _) = lab.start_agent("").await;
            let in_home = ["ip", "netns", "exec", &lab.home.name];
            let server = MoshServer::start(&in_home, 60001);
            let client = format!(
                "ip netns exec {} env LC_ALL={LOCALE} MOSH_KEY={} mosh-client {RELAY_PUBLIC} 60001",
                lab.visitor.name, server.key
            );
            let tmux = Tmux::start(&client);
            tmux.type_line("echo first-$((6 * 7))");
            tmux.wait_for("first-42").await;

            tokio::time::sleep(idle).await; // the time under test
            let start = Instant::now();
            tmux.type_line("echo after-idle-$((6 * 7))");
            tmux.wait_for("after-idle-42").await;
            let after_idle = start.elapsed();

            // The visitor's uplink drops its UDP until mosh-client gives up on its source port.
            let ports_before = udp_ports(&lab.visitor);
            let block = ["-A", "OUTPUT", "-p", "udp", "-j", "DROP"];
            lab.visitor.run("iptables", &block);
            tokio::time::sleep(blocked).await; // the silence that makes mosh hop
            lab.visitor.run("iptables", &["-F", "OUTPUT"]);
            let start = Instant::now();
            tmux.type_line("echo after-hop-$((6 * 7))");
            tmux.wait_for("after-hop-42").await;
            let after_hop = start.elapsed();
            let ports_after = udp_ports(&lab.visitor);
            let new: Vec<u16> = ports_after
                .iter()
                .copied()
                .filter(|p| !ports_before.contains(p))
                .collect();
            println!(
                "mosh idle {idle:?}: answered in {after_idle:?}; after a source port hop \
             ({ports_before:?} -> {ports_after:?}) answered in {after_hop:?}"
            );
            assert!(!new.is_empty(), "mosh-client did not hop: {ports_after:?}");
        },
    )
    .await;
}

/// The local ports of the UDP sockets open in `netns`.
fn udp_ports(netns: &Netns) -> Vec<u16> {
    // "UNCONN 0 0 0.0.0.0:41234 0.0.0.0:*"
    netns
        .run("ss", &["-Huan"])
        .lines()
        .filter_map(|l| {
            l.split_whitespace()
                .nth(3)?
                .rsplit(':')
                .next()?
                .parse()
                .ok()
        })
        .collect()
}
