//! A real mosh session for the tests: Debian's `mosh-server`, and `mosh-client` in a tmux of
//! the test's own, typed into and read back.

use std::process::Command;
use std::time::Duration;

/// mosh refuses to start without a UTF-8 locale; C.UTF-8 is always there.
pub const LOCALE: &str = "C.UTF-8";

/// A detached `mosh-server`, killed when dropped.
pub struct MoshServer {
    pid: String,
    /// What mosh-client needs: the session key.
    pub key: String,
}

impl MoshServer {
    /// Starts `mosh-server` on 127.0.0.1:`port` with a plain shell, run through `prefix` (such
    /// as `ip netns exec NAME`) if there is one.
    pub fn start(prefix: &[&str], port: u16) -> Self {
        let port = port.to_string();
        let mut command = match prefix {
            [program, args @ ..] => {
                let mut command = Command::new(program);
                command.args(args).arg("mosh-server");
                command
            }
            [] => Command::new("mosh-server"),
        };
        let output = command
            .args(["new", "-i", "127.0.0.1", "-p", &port, "--", "/bin/sh"])
            .env("LC_ALL", LOCALE)
            .env("SHELL", "/bin/sh")
            .env("PS1", "$ ")
            // If the test dies without killing it, the server gives up on its own: longer than
            // the outages the tests put it through.
            .env("MOSH_SERVER_NETWORK_TMOUT", "300")
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
pub struct Tmux {
    socket: String,
}

impl Tmux {
    /// Runs `command` in a detached 100x30 session.
    pub fn start(command: &str) -> Self {
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

    pub fn type_line(&self, line: &str) {
        let status = self.command(&["send-keys", line, "Enter"]).status();
        assert!(status.expect("tmux send-keys").success());
    }

    pub fn screen(&self) -> String {
        let output = self.command(&["capture-pane", "-p"]).output();
        String::from_utf8_lossy(&output.expect("tmux capture-pane").stdout).into_owned()
    }

    /// Waits until the screen shows `text`; tmux has no event to await, so it looks every 100 ms.
    pub async fn wait_for(&self, text: &str) {
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
