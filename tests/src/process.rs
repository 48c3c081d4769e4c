//! The real binaries as child processes: start one, await a line of its log, signal it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use tether_common::trust::identity::Fingerprint;
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStderr, Command};

use crate::udp::consecutive_udp_ports;
use crate::{free_port, within, within_for, Keys, STEP};

/// A running binary whose stderr is read line by line.
pub struct Process {
    child: Child,
    stderr: Lines<BufReader<ChildStderr>>,
    /// Everything read from stderr so far, for failure messages.
    pub log: Vec<String>,
}

impl Process {
    pub fn spawn(binary: &Path, args: &[&str]) -> Self {
        let mut command = Command::new(binary);
        command.args(args);
        Self::start(command)
    }

    /// Starts `command` with its log read and nothing on its stdin or stdout.
    pub fn start(mut command: Command) -> Self {
        let what = format!("{:?}", command.as_std());
        let mut child = command
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
        let stderr = BufReader::new(child.stderr.take().expect("stderr")).lines();
        Self {
            child,
            stderr,
            log: Vec::new(),
        }
    }

    /// Reads the log until a line contains `needle`, and returns that line.
    pub async fn wait_for_line(&mut self, needle: &str) -> String {
        self.wait_for_line_within(needle, STEP).await
    }

    /// [`Process::wait_for_line`], waiting up to `limit`.
    pub async fn wait_for_line_within(&mut self, needle: &str, limit: Duration) -> String {
        within_for(&format!("a log line with {needle:?}"), limit, async {
            loop {
                match self.stderr.next_line().await {
                    Ok(Some(line)) => {
                        self.log.push(line.clone());
                        if line.contains(needle) {
                            return line;
                        }
                    }
                    _ => panic!("log ended without {needle:?}:\n{}", self.log.join("\n")),
                }
            }
        })
        .await
    }

    /// The process's resident memory now, in bytes.
    pub fn rss(&self) -> u64 {
        let pid = self.child.id().expect("still running");
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
        let kib: u64 = status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS");
        kib * 1024
    }

    /// Sends `signal` (such as "STOP").
    pub fn signal(&self, signal: &str) {
        let pid = self.child.id().expect("still running").to_string();
        let sent = std::process::Command::new("kill")
            .args([&format!("-{signal}"), &pid])
            .status();
        assert!(
            sent.expect("kill runs").success(),
            "kill -{signal} {pid} failed"
        );
    }

    /// Sends `signal` (such as "TERM") and waits for the process to exit.
    pub async fn signal_and_wait(&mut self, signal: &str) -> ExitStatus {
        self.signal(signal);
        self.wait().await
    }

    /// Waits for the process to exit.
    pub async fn wait(&mut self) -> ExitStatus {
        within("the process to exit", async {
            // Drain the log meanwhile, so that a full pipe cannot hold the process up.
            while let Ok(Some(line)) = self.stderr.next_line().await {
                self.log.push(line);
            }
            self.child.wait().await.expect("exit status")
        })
        .await
    }
}

/// Runs a binary to completion and returns its exit code, stdout and stderr.
pub fn run(binary: &Path, args: &[&str]) -> (i32, String, String) {
    let output = std::process::Command::new(binary)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", binary.display()));
    (
        output.status.code().expect("exited, not killed"),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// Config files, in the keys' folder, for a relay binary on loopback and an agent binary that
/// know each other's keys; the agent forwards one public TCP port to `local`.
pub struct Configs {
    pub relay: PathBuf,
    pub agent: PathBuf,
    /// The public port of the agent's one forward.
    pub port: u16,
    /// Where the relay listens for agents.
    pub listen: SocketAddr,
    pub relay_key: PathBuf,
    pub agent_key: PathBuf,
    /// Where each binary answers `status`, in the keys' folder.
    pub relay_socket: PathBuf,
    pub agent_socket: PathBuf,
}

impl Configs {
    /// Starts the relay binary, then the agent binary, on these configs, and waits until the
    /// agent is connected.
    pub async fn run_both(&self) -> (Process, Process) {
        let run = |binary_name: &str, config: &Path| {
            let config = config.to_str().expect("a UTF-8 path").to_owned();
            Process::spawn(&crate::lab::binary(binary_name), &["run", "-c", &config])
        };
        let mut relay = run("tether-relay", &self.relay);
        relay.wait_for_line("relay listening").await;
        let mut agent = run("tether-agent", &self.agent);
        agent.wait_for_line("connected to relay").await;
        (relay, agent)
    }

    /// Lists one more agent in relay.toml, allowed `ports` (such as "2222/tcp").
    pub fn add_agent(&self, name: &str, fingerprint: Fingerprint, ports: &[String]) {
        let mut relay = std::fs::read_to_string(&self.relay).expect("relay.toml");
        let ports: Vec<String> = ports.iter().map(|p| format!("\"{p}\"")).collect();
        relay.push_str(&format!(
            "[[agent]]\nname = \"{name}\"\nfingerprint = \"{fingerprint}\"\nports = [{}]\n",
            ports.join(", ")
        ));
        std::fs::write(&self.relay, relay).expect("relay.toml");
    }

    pub fn write(keys: &Keys, local: SocketAddr) -> Self {
        let (relay_identity, relay_key) = keys.identity("relay");
        let (agent_identity, agent_key) = keys.identity("agent");
        let (quic, held) = consecutive_udp_ports(1);
        drop(held);
        let quic = quic.start();
        let port = free_port();
        let relay = keys.path().join("relay.toml");
        std::fs::write(
            &relay,
            format!(
                "listen = \"127.0.0.1:{quic}\"\nkey = \"relay.key\"\npublic_bind = \"127.0.0.1\"\n\
                 status_socket = \"relay.sock\"\n\
                 [[agent]]\nname = \"home\"\nfingerprint = \"{}\"\nports = [\"{port}/tcp\"]\n",
                agent_identity.fingerprint()
            ),
        )
        .expect("relay.toml");
        let agent = keys.path().join("agent.toml");
        std::fs::write(
            &agent,
            format!(
                "relay = \"127.0.0.1:{quic}\"\nrelay_fingerprint = \"{}\"\nkey = \"agent.key\"\n\
                 status_socket = \"agent.sock\"\n\
                 [[forward]]\nname = \"echo\"\nproto = \"tcp\"\nremote = {port}\nlocal = \"{local}\"\n",
                relay_identity.fingerprint(),
            ),
        )
        .expect("agent.toml");
        Self {
            relay,
            agent,
            port,
            listen: SocketAddr::from(([127, 0, 0, 1], quic)),
            relay_key,
            agent_key,
            relay_socket: keys.path().join("relay.sock"),
            agent_socket: keys.path().join("agent.sock"),
        }
    }
}
