//! A real mosh session through a ranged UDP forward: Debian's `mosh-server` beside the agent,
//! `mosh-client` in tmux as the visitor, a command typed into it and its output read back.

use std::process::Command;
use std::time::Duration;

use tether_relay::Limits;
use tether_tests::udp::consecutive_udp_ports;
use tether_tests::*;

/// mosh refuses to start without a UTF-8 locale; C.UTF-8 is always there.
const LOCALE: &str = "C.UTF-8";

/// A detached `mosh-server`, killed when dropped.
struct MoshServer {
    pid: String,
    /// What mosh-client needs: the session key.
    key: String,
}

impl MoshServer {
    /// Starts `mosh-server` on 127.0.0.1:`port` with a plain shell.
    fn start(port: u16) -> Self {
        let port = port.to_string();
        let output = Command::new("mosh-server")
            .args(["new", "-i", "127.0.0.1", "-p", &port, "--", "/bin/sh"])
            .env("LC_ALL", LOCALE)
            .env("SHELL", "/bin/sh")
            .env("PS1", "$ ")
            // If this test dies without killing it, the server gives up on its own.
            .env("MOSH_SERVER_NETWORK_TMOUT", "60")
            .output()
            .expect("run mosh-server");
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        let key = stdout
            .lines()
            .find_map(|l| l.strip_prefix(&format!("MOSH CONNECT {port} ")))
            .unwrap_or_else(|| panic!("mosh-server did not start:\n{stdout}{stderr}"))
            .trim()
            .to_owned();
        let pid = stderr
            .split("detached, pid = ")
            .nth(1)
            .and_then(|rest| rest.split(']').next())
            .unwrap_or_else(|| panic!("no pid from mosh-server:\n{stderr}"))
            .to_owned();
        Self { pid, key }
    }
}

impl Drop for MoshServer {
    fn drop(&mut self) {
        let _ = Command::new("kill").args(["-KILL", &self.pid]).status();
    }
}

/// A tmux server of the test's own, killed when dropped.
struct Tmux {
    socket: String,
}

impl Tmux {
    /// Runs `command` in a detached 100x30 session.
    fn start(command: &str) -> Self {
        let tmux = Self {
            socket: format!(
                "tether-test-{}-{}",
                std::process::id(),
                rand::random::<u32>()
            ),
        };
        let status = tmux
            .command(&["new-session", "-d", "-x", "100", "-y", "30", command])
            .status()
            .expect("run tmux");
        assert!(status.success(), "tmux new-session failed");
        tmux
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new("tmux");
        command.args(["-L", &self.socket]).args(args);
        command
    }

    fn type_line(&self, line: &str) {
        let status = self.command(&["send-keys", line, "Enter"]).status();
        assert!(status.expect("tmux send-keys").success());
    }

    fn screen(&self) -> String {
        let output = self.command(&["capture-pane", "-p"]).output();
        String::from_utf8_lossy(&output.expect("tmux capture-pane").stdout).into_owned()
    }

    /// Waits until the screen shows `text`; tmux has no event to await, so it looks every 100 ms.
    async fn wait_for(&self, text: &str) {
        let found = tokio::time::timeout(Duration::from_secs(20), async {
            while !self.screen().contains(text) {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
        .await;
        if found.is_err() {
            panic!("the screen never showed {text:?}:\n{}", self.screen());
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.command(&["kill-server"]).status();
    }
}

#[tokio::test]
async fn a_mosh_session_works_through_a_ranged_forward() {
    let test = "a_mosh_session_works_through_a_ranged_forward";
    if !tools::available(test, &["mosh-server", "mosh-client", "tmux"]) {
        return;
    }
    within_for("the whole test", Duration::from_secs(60), async {
        // Three public ports onto three local ones; mosh uses the middle pair.
        let (local, _) = consecutive_udp_ports(3);
        let (public, _) = consecutive_udp_ports(3);
        let forward = udp_forward("mosh", public, "127.0.0.1", local);
        let bench = Bench::serving(vec![forward], Limits::default(), |_| {}).await;

        let server = MoshServer::start(local.start() + 1);
        let client = format!(
            "env LC_ALL={LOCALE} MOSH_KEY={} mosh-client 127.0.0.1 {}",
            server.key,
            public.start() + 1
        );
        let tmux = Tmux::start(&client);
        tmux.type_line("echo tether-$((6 * 7))");
        within(
            "the command's output on the mosh screen",
            tmux.wait_for("tether-42"),
        )
        .await;

        // It went through the tunnel: the relay and the agent carried the flow.
        let relay = bench.relay.udp.count();
        let agent = bench.agent.udp.count();
        assert!(relay.flows_opened >= 1, "relay: {relay:?}");
        assert!(agent.flows_opened >= 1, "agent: {agent:?}");
        drop(tmux);
        drop(server);
        bench.stop().await;
    })
    .await;
}
