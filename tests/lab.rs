//! The NAT lab scenarios: real binaries in network namespaces behind a real NAT (see
//! `tether_tests::lab`). Each prints the figure it measured.

use std::time::{Duration, Instant};

use tether_agent::probe::PROBE_EVERY;
use tether_tests::lab::{
    idle_span, session_of, Impairment, Lab, Netns, Peer, Shim, NAT_SECOND_PUBLIC, NAT_UDP_TIMEOUT,
    RELAY_LISTEN, RELAY_PUBLIC,
};
use tether_tests::mosh::{MoshServer, Tmux, LOCALE};
use tether_tests::process::Process;
use tether_tests::{tools, within_for};

/// How long a visitor waits for an answer that should come at once.
const AT_ONCE: &str = "2000";

/// A lab with a relay, an agent with `settings`, `service` (a lab-peer mode) on home's port
/// 7000, and a visitor connected to it through relay port 7000.
struct Scene {
    lab: Lab,
    relay: Process,
    /// Runs until the scene is dropped.
    _shim: Option<Peer>,
    agent: Process,
    session: String,
    service: Peer,
    visitor: Peer,
}

impl Scene {
    async fn start(settings: &str, service: &str) -> Self {
        Self::start_via(None, settings, service).await
    }

    /// With `shim`, the agent reaches the relay through the impairment shim.
    async fn start_via(shim: Option<Shim>, settings: &str, service: &str) -> Self {
        Self::start_with(shim, "", settings, service).await
    }

    /// With `relay_settings` in relay.toml too.
    async fn start_with(
        shim: Option<Shim>,
        relay_settings: &str,
        settings: &str,
        service: &str,
    ) -> Self {
        let lab = Lab::build();
        let (service, ready) = lab.peer(&lab.home, &[service, "127.0.0.1:7000"]).await;
        assert_eq!(ready, "listening");
        let relay = lab.start_relay_with(relay_settings).await;
        let (shim, relay_address) = match shim {
            Some(shim) => {
                let (shim, address) = lab.start_shim(shim).await;
                (Some(shim), address)
            }
            None => (None, RELAY_LISTEN),
        };
        let (agent, session) = lab.start_agent_via(relay_address, settings).await;
        let public = format!("{RELAY_PUBLIC}:7000");
        let (visitor, connected) = lab.peer(&lab.visitor, &["client", &public]).await;
        assert_eq!(connected, "connected");
        Self {
            lab,
            relay,
            _shim: shim,
            agent,
            session,
            service,
            visitor,
        }
    }

    /// The visitor sends a line to the echo service; it must come back at once.
    async fn echo_at_once(&mut self, text: &str) -> String {
        self.visitor.ask(&format!("echo {text} {AT_ONCE}")).await
    }

    /// A new visitor connection to the echo service; its echo must come back at once.
    async fn new_visitor_echo(&self) -> String {
        let public = format!("{RELAY_PUBLIC}:7000");
        let (mut visitor, connected) = self.lab.peer(&self.lab.visitor, &["client", &public]).await;
        assert_eq!(connected, "connected");
        visitor.ask(&format!("echo new-visitor {AT_ONCE}")).await
    }

    /// Restarts the relay after stopping it with `signal`, and returns how long after it
    /// listened again a new visitor was served.
    async fn served_after_restart(&mut self, signal: &str) -> Duration {
        self.relay.signal_and_wait(signal).await;
        self.relay = self.lab.start_relay().await;
        let back = Instant::now();
        self.agent.wait_for_line("connected to relay").await;
        let echo = self.new_visitor_echo().await;
        assert!(echo.starts_with("echoed"), "{echo}");
        back.elapsed()
    }

    /// Stops the agent and returns the ids of every session it had.
    async fn agent_sessions(&mut self) -> Vec<String> {
        self.agent.signal_and_wait("TERM").await;
        let log = &self.agent.log;
        log.iter()
            .filter(|l| l.contains("connected to relay"))
            .map(|l| session_of(l))
            .collect()
    }
}

/// Sends `bytes` (more than 8 MiB) from the visitor to the sink at home, calling `meanwhile` once
/// the first 8 MiB are out; returns (sent line, received line).
async fn transfer(scene: &mut Scene, bytes: u64, meanwhile: impl FnOnce(&Lab)) -> (String, String) {
    // Slow under loss and in debug builds: each 8 MiB may take a while.
    let slow = Duration::from_secs(60);
    scene.visitor.tell(&format!("send {bytes}")).await;
    let mut meanwhile = Some(meanwhile);
    let sent = loop {
        let line = scene.visitor.line_within(slow).await;
        if !line.starts_with("progress") {
            break line;
        }
        if let Some(meanwhile) = meanwhile.take() {
            meanwhile(&scene.lab);
        }
    };
    assert!(
        meanwhile.is_none(),
        "the transfer ended before its first 8 MiB"
    );
    let received = scene.service.line_within(slow).await;
    (sent, received)
}

/// "sent BYTES SHA MILLIS" and "received BYTES SHA" describe the same bytes.
fn assert_same_bytes(sent: &str, received: &str) -> (u64, Duration) {
    let sent: Vec<&str> = sent.split(' ').collect();
    let received: Vec<&str> = received.split(' ').collect();
    assert_eq!(sent[0], "sent", "{sent:?}");
    assert_eq!(received[0], "received", "{received:?}");
    assert_eq!(sent[1..3], received[1..3], "bytes and sha256 must match");
    (
        sent[1].parse().unwrap(),
        Duration::from_millis(sent[3].parse().unwrap()),
    )
}

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
async fn an_outage_shorter_than_the_idle_timeout_costs_nothing() {
    let test = "an_outage_shorter_than_the_idle_timeout_costs_nothing";
    if !Lab::available(test) {
        return;
    }
    let outage = Duration::from_secs(20);
    within_for("the whole test", outage + Duration::from_secs(60), async {
        let mut scene = Scene::start("", "tcp-echo").await;
        let first = scene.echo_at_once("hello").await;
        assert!(first.starts_with("echoed"), "{first}");
        scene.lab.impair(Impairment::Outage);
        // The outage under test; in its middle the visitor sends a line, which must arrive
        // once the link is back.
        tokio::time::sleep(outage / 2).await;
        scene.visitor.tell("echo during-the-outage 30000").await;
        tokio::time::sleep(outage / 2).await;
        scene.lab.impair(Impairment::None);
        let back = Instant::now();
        let during = scene.visitor.line_within(Duration::from_secs(30)).await;
        let late = back.elapsed();
        assert!(during.starts_with("echoed"), "{during}");
        let after = scene.echo_at_once("after").await;
        assert!(after.starts_with("echoed"), "{after}");
        let sessions = scene.agent_sessions().await;
        assert_eq!(sessions, [scene.session.clone()], "no new session");
        println!(
            "{outage:?} outage: one session; what the visitor sent during it was answered {late:?} \
             after the link came back"
        );
        // The agent's probes and the relay's answers find the link within a second; without
        // them, the relay's backed-off retransmission came 5-6 s after the link.
        assert!(late < PROBE_EVERY * 2, "took {late:?}");
    })
    .await;
}

#[tokio::test]
async fn after_an_outage_longer_than_the_idle_timeout_the_agent_is_back_at_once() {
    let test = "after_an_outage_longer_than_the_idle_timeout_the_agent_is_back_at_once";
    if !Lab::available(test) {
        return;
    }
    let outage = Duration::from_secs(60);
    within_for("the whole test", outage + Duration::from_secs(60), async {
        let mut scene = Scene::start("", "tcp-echo").await;
        scene.lab.impair(Impairment::Outage);
        tokio::time::sleep(outage).await; // the outage under test
        scene.lab.impair(Impairment::None);
        let back = Instant::now();
        let line = scene.agent.wait_for_line("connected to relay").await;
        let reconnected = back.elapsed();
        assert_ne!(
            session_of(&line),
            scene.session,
            "the old session outlived the outage"
        );
        let echo = scene.new_visitor_echo().await;
        assert!(echo.starts_with("echoed"), "{echo}");
        let served = back.elapsed();
        println!(
            "{outage:?} outage: the agent reconnected {reconnected:?} after the link came back; \
             a new visitor was served {served:?} after it"
        );
        assert!(reconnected < Duration::from_secs(3), "took {reconnected:?}");
    })
    .await;
}

#[tokio::test]
async fn a_relay_killed_and_restarted_serves_again_within_five_seconds() {
    let test = "a_relay_killed_and_restarted_serves_again_within_five_seconds";
    if !Lab::available(test) {
        return;
    }
    within_for("the whole test", Duration::from_secs(60), async {
        let mut scene = Scene::start("", "tcp-echo").await;
        // Idle, so that only a keepalive can find the restarted relay: the agent sent its last
        // about a second before the kill, and the next goes out about 4 s after it.
        tokio::time::sleep(Duration::from_secs(6)).await;
        let served = scene.served_after_restart("KILL").await;
        println!("relay killed with SIGKILL and restarted: a visitor served {served:?} after it was back");
        assert!(served < Duration::from_secs(5), "took {served:?}");
    })
    .await;
}

#[tokio::test]
async fn a_relay_restarted_with_sigterm_serves_again_within_a_second() {
    let test = "a_relay_restarted_with_sigterm_serves_again_within_a_second";
    if !Lab::available(test) {
        return;
    }
    within_for("the whole test", Duration::from_secs(60), async {
        let mut scene = Scene::start("", "tcp-echo").await;
        let served = scene.served_after_restart("TERM").await;
        println!("relay restarted with SIGTERM: a visitor served {served:?} after it was back");
        assert!(served < Duration::from_secs(1), "took {served:?}");
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
async fn an_agent_stopped_for_fifteen_seconds_recovers_by_itself() {
    let test = "an_agent_stopped_for_fifteen_seconds_recovers_by_itself";
    if !Lab::available(test) {
        return;
    }
    let stopped = Duration::from_secs(15);
    within_for("the whole test", stopped + Duration::from_secs(60), async {
        let mut scene = Scene::start("", "tcp-echo").await;
        scene.agent.signal("STOP");
        tokio::time::sleep(stopped).await; // the pause under test
        scene.agent.signal("CONT");
        let resumed = Instant::now();
        let echo = scene.visitor.ask("echo after-the-pause 5000").await;
        let answered = resumed.elapsed();
        assert!(echo.starts_with("echoed"), "{echo}");
        let fresh = scene.new_visitor_echo().await;
        assert!(fresh.starts_with("echoed"), "{fresh}");
        let sessions = scene.agent_sessions().await;
        println!(
            "agent stopped {stopped:?} with SIGSTOP: after SIGCONT the open connection answered \
             in {answered:?}, sessions {sessions:?}"
        );
        assert_eq!(sessions, [scene.session.clone()], "no new session");
    })
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

/// A transfer from the visitor to a sink at home, cut by an outage of `outage` (longer than the
/// idle timeout, so the session dies) once it is under way; the visitor goes on writing while
/// it can. Returns what it measured, once the sink got every byte.
async fn transfer_across_an_outage(outage: Duration, switch_address: bool) {
    // Progress every 256 KiB, so that writes made during the outage show.
    const EVERY: u64 = 256 << 10;
    let bytes: u64 = 96 << 20;
    let mut scene = Scene::start("", "sink").await;
    scene.visitor.tell(&format!("send {bytes} {EVERY}")).await;
    let progress = |line: &str| -> u64 {
        let n = line.strip_prefix("progress ");
        n.unwrap_or_else(|| panic!("expected progress, got {line:?}"))
            .parse()
            .unwrap()
    };
    let first = progress(&scene.visitor.line_within(Duration::from_secs(60)).await);
    scene.lab.impair(Impairment::Outage);
    let cut = Instant::now();
    // What the visitor manages to write while the link is down.
    let mut written = first;
    while let Some(left) = outage.checked_sub(cut.elapsed()) {
        match tokio::time::timeout(left, scene.visitor.next_line()).await {
            Ok(Some(line)) => written = progress(&line),
            Ok(None) => panic!("the visitor ended during the outage"),
            Err(_) => break,
        }
    }
    if switch_address {
        scene.lab.switch_nat_address();
    }
    scene.lab.impair(Impairment::None);
    let back = Instant::now();
    let line = scene
        .agent
        .wait_for_line("connected to relay; the lost session resumed")
        .await;
    let resumed = back.elapsed();
    assert_ne!(session_of(&line), scene.session, "a new session");
    // Data flows again: the visitor's next progress mark.
    let next = progress(&scene.visitor.line_within(Duration::from_secs(30)).await);
    let flowing = back.elapsed();
    let sent = loop {
        let line = scene.visitor.line_within(Duration::from_secs(120)).await;
        if !line.starts_with("progress") {
            break line;
        }
    };
    let received = scene.service.line_within(Duration::from_secs(60)).await;
    let (total, _) = assert_same_bytes(&sent, &received);
    assert_eq!(total, bytes);
    assert!(
        written > first,
        "the visitor wrote nothing while the link was down"
    );
    if switch_address {
        let relay_line = scene.relay.wait_for_line("its lost session resumed").await;
        assert!(
            relay_line.contains(&format!("remote={NAT_SECOND_PUBLIC}:")),
            "{relay_line}"
        );
    }
    println!(
        "{outage:?} outage mid-transfer{}: the visitor wrote {} KiB while the link was down; \
         the session resumed {resumed:?} after the link came back and the visitor's bytes moved \
         again {flowing:?} after it (mark {} KiB); {total} bytes arrived, sha256 equal",
        if switch_address {
            ", NAT address switched"
        } else {
            ""
        },
        (written - first) >> 10,
        next >> 10,
    );
}

#[tokio::test]
async fn a_transfer_outlives_a_sixty_second_outage_with_every_byte() {
    let test = "a_transfer_outlives_a_sixty_second_outage_with_every_byte";
    if !Lab::available(test) {
        return;
    }
    let outage = Duration::from_secs(60);
    within_for("the whole test", outage + Duration::from_secs(180), async {
        transfer_across_an_outage(outage, false).await;
    })
    .await;
}

#[tokio::test]
async fn a_transfer_outlives_a_four_minute_outage_with_every_byte() {
    let test = "a_transfer_outlives_a_four_minute_outage_with_every_byte";
    if !Lab::available(test) {
        return;
    }
    let outage = Duration::from_secs(240);
    within_for("the whole test", outage + Duration::from_secs(180), async {
        transfer_across_an_outage(outage, false).await;
    })
    .await;
}

#[tokio::test]
async fn a_transfer_resumes_when_the_home_address_changed_during_the_outage() {
    let test = "a_transfer_resumes_when_the_home_address_changed_during_the_outage";
    if !Lab::available(test) {
        return;
    }
    let outage = Duration::from_secs(60);
    within_for("the whole test", outage + Duration::from_secs(180), async {
        transfer_across_an_outage(outage, true).await;
    })
    .await;
}

#[tokio::test]
async fn past_the_resume_window_visitors_are_reset_and_new_ones_served() {
    let test = "past_the_resume_window_visitors_are_reset_and_new_ones_served";
    if !Lab::available(test) {
        return;
    }
    // A short idle timeout and window, so that the outage needs to be only a little longer.
    let settings = "keepalive = \"1s\"\nidle_timeout = \"5s\"\nresume_window = \"10s\"";
    let outage = Duration::from_secs(25);
    within_for("the whole test", outage + Duration::from_secs(60), async {
        let mut scene =
            Scene::start_with(None, "resume_window = \"10s\"", settings, "tcp-echo").await;
        let first = scene.echo_at_once("hello").await;
        assert!(first.starts_with("echoed"), "{first}");
        scene.lab.impair(Impairment::Outage);
        tokio::time::sleep(outage).await; // the outage under test
        scene.lab.impair(Impairment::None);
        // The relay may still hold the lost session (its ports and UDP flows outlive the
        // window), but no visitor connection of it.
        let line = scene.agent.wait_for_line("connected to relay;").await;
        assert!(
            line.contains("streams=0") || line.contains("no longer holds"),
            "{line}"
        );
        let old = scene.visitor.ask(&format!("echo after {AT_ONCE}")).await;
        assert!(
            old.contains("reset") || old.contains("closed"),
            "the held visitor must be closed: {old}"
        );
        let echo = scene.new_visitor_echo().await;
        assert!(echo.starts_with("echoed"), "{echo}");
        println!(
            "{outage:?} outage, 10 s window: the held visitor got {old:?}; a new one was served"
        );
    })
    .await;
}

#[tokio::test]
async fn an_ssh_session_outlives_a_sixty_second_outage() {
    let test = "an_ssh_session_outlives_a_sixty_second_outage";
    if !Lab::available(test) || !tools::available(test, &["sshd", "ssh", "ssh-keygen"]) {
        return;
    }
    let outage = Duration::from_secs(60);
    within_for("the whole test", outage + Duration::from_secs(90), async {
        let lab = Lab::build();
        let (_sshd, login) = lab.start_sshd().await;
        let _relay = lab.start_relay().await;
        let (mut agent, _) = lab.start_agent("").await;
        let mut command = lab.visitor.command("ssh");
        command.args(&login).arg("sh");
        let mut ssh = Peer::start(command);
        ssh.tell("echo logged-in-as-$(id -un)").await;
        assert_eq!(ssh.line().await, "logged-in-as-root");
        lab.impair(Impairment::Outage);
        tokio::time::sleep(outage / 2).await;
        // Typed during the outage: it waits, and is answered once the link is back.
        ssh.tell("echo typed-during-the-outage").await;
        tokio::time::sleep(outage / 2).await;
        lab.impair(Impairment::None);
        let back = Instant::now();
        agent
            .wait_for_line("connected to relay; the lost session resumed")
            .await;
        assert_eq!(
            ssh.line_within(Duration::from_secs(30)).await,
            "typed-during-the-outage"
        );
        let answered = back.elapsed();
        ssh.tell("echo still-there").await;
        assert_eq!(ssh.line_within(Duration::from_secs(5)).await, "still-there");
        println!(
            "ssh across a {outage:?} outage: what was typed during it was answered {answered:?} \
             after the link came back"
        );
    })
    .await;
}

#[tokio::test]
async fn a_mosh_session_outlives_a_sixty_second_outage() {
    let test = "a_mosh_session_outlives_a_sixty_second_outage";
    if !Lab::available(test) || !tools::available(test, &["mosh-server", "mosh-client", "tmux"]) {
        return;
    }
    let outage = Duration::from_secs(60);
    within_for("the whole test", outage + Duration::from_secs(90), async {
        let lab = Lab::build();
        let _relay = lab.start_relay().await;
        let (mut agent, _) = lab.start_agent("").await;
        let in_home = ["ip", "netns", "exec", &lab.home.name];
        let server = MoshServer::start(&in_home, 60002);
        let client = format!(
            "ip netns exec {} env LC_ALL={LOCALE} MOSH_KEY={} mosh-client {RELAY_PUBLIC} 60002",
            lab.visitor.name, server.key
        );
        let tmux = Tmux::start(&client);
        tmux.type_line("echo first-$((6 * 7))");
        tmux.wait_for("first-42").await;
        lab.impair(Impairment::Outage);
        tokio::time::sleep(outage).await; // the outage under test
        lab.impair(Impairment::None);
        let back = Instant::now();
        agent
            .wait_for_line("connected to relay; the lost session resumed")
            .await;
        tmux.type_line("echo after-outage-$((6 * 7))");
        tmux.wait_for("after-outage-42").await;
        println!(
            "mosh across a {outage:?} outage: answered {:?} after the link came back",
            back.elapsed()
        );
    })
    .await;
}
