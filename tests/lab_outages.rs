//! The NAT lab, outages and restarts and what survives them: real binaries in network
//! namespaces behind a real NAT (see `tether_tests::lab`), links cut for seconds to minutes,
//! the relay killed or stopped and restarted, the agent stopped, the home address changed; a
//! transfer, an ssh and a mosh session resumed with every byte. Each prints the figure it
//! measured.

use std::time::{Duration, Instant};

use tether_agent::probe::PROBE_EVERY;
use tether_tests::lab::{session_of, Impairment, Lab, Peer, NAT_SECOND_PUBLIC, RELAY_PUBLIC};
use tether_tests::mosh::{MoshServer, Tmux, LOCALE};
use tether_tests::scene::{assert_same_bytes, Scene, AT_ONCE};
use tether_tests::{tools, within_for};

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

/// Five outages of a minute in a row (each longer than the idle timeout, so each loses the
/// session) under one visitor connection: what the visitor sent during each is answered within
/// half a second of the link's return (the median), because the agent starts a fresh
/// handshake every 250 ms while the relay does not answer, rather than waiting out QUIC's
/// backed-off retransmissions (up to 2 s apart).
#[tokio::test]
async fn after_each_of_five_minute_long_outages_a_queued_line_is_answered_at_once() {
    let test = "after_each_of_five_minute_long_outages_a_queued_line_is_answered_at_once";
    if !Lab::available(test) {
        return;
    }
    const TRIES: usize = 5;
    let outage = Duration::from_secs(60);
    let limit = (outage + Duration::from_secs(30)) * TRIES as u32 + Duration::from_secs(60);
    within_for("the whole test", limit, async {
        let mut scene = Scene::start("", "tcp-echo").await;
        let mut answered = Vec::new();
        for n in 0..TRIES {
            scene.lab.impair(Impairment::Outage);
            tokio::time::sleep(outage / 2).await; // the outage under test
            scene.visitor.tell(&format!("echo queued-{n} 60000")).await;
            tokio::time::sleep(outage / 2).await;
            scene.lab.impair(Impairment::None);
            let back = Instant::now();
            let line = scene.visitor.line_within(Duration::from_secs(60)).await;
            answered.push(back.elapsed());
            assert!(line.starts_with("echoed"), "{line}");
        }
        let sessions = scene.agent_sessions().await;
        assert_eq!(sessions.len(), TRIES + 1, "a session lost to each outage");
        let printed = format!("{answered:?}");
        answered.sort();
        let median = answered[TRIES / 2];
        println!(
            "{TRIES} outages of {outage:?}: the line sent during each was answered {printed} \
             after the link came back, median {median:?}"
        );
        assert!(median <= Duration::from_millis(500), "median {median:?}");
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
