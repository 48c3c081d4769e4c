//! The NAT lab: four network namespaces joined by veth pairs, with the real binaries running in
//! them, so that the tests see what a home NAT does to a tunnel.
//!
//! ```text
//!  visitor              relay                          nat                     home
//!  198.51.100.2 ── 198.51.100.1  203.0.113.1 ── 203.0.113.2  10.77.0.1 ── 10.77.0.2
//!                  public ports  agents' port   MASQUERADE                agent and
//!                                4433/udp       --random-fully            local services
//! ```
//!
//! The NAT drops inbound packets that are not replies, and forgets a UDP mapping after 30 s of
//! silence, both for flows that saw a reply (`nf_conntrack_udp_timeout_stream`) and for those
//! that did not. The namespaces' names carry the test process's id; a lab is removed when it is
//! dropped, even by a failing test, and one left by a killed run is removed by the next.
//!
//! Delay and reordering, which `iptables` cannot do, come from `lab-shim`, a UDP forwarder in the
//! relay's namespace that agents reach the relay through when a test asks for it.
//!
//! Needs root, `ip` (iproute2), `iptables` and `conntrack`.

use std::ffi::OsStr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use tether_common::trust::identity::Identity;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

use crate::process::Process;
use crate::{tools, within_for, Keys};

pub const VISITOR: &str = "198.51.100.2";
/// Where visitors reach the relay's public ports.
pub const RELAY_PUBLIC: &str = "198.51.100.1";
/// Where agents reach the relay.
pub const RELAY_LISTEN: &str = "203.0.113.1:4433";
pub const NAT_PUBLIC: &str = "203.0.113.2";
/// The NAT's outside address after [`Lab::switch_nat_address`].
pub const NAT_SECOND_PUBLIC: &str = "203.0.113.3";
pub const HOME: &str = "10.77.0.2";

/// The NAT's UDP timeout, for flows with and without replies.
pub const NAT_UDP_TIMEOUT: Duration = Duration::from_secs(30);

/// How long the idle scenarios stay idle: 100 s (over three NAT timeouts), or
/// `TETHER_LAB_IDLE_SECS` for a soak.
pub fn idle_span() -> Duration {
    let secs = std::env::var("TETHER_LAB_IDLE_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(100);
    Duration::from_secs(secs)
}

const PREFIX: &str = "tlab";

/// One network namespace of the lab.
pub struct Netns {
    pub name: String,
}

impl Netns {
    /// `program` to be run inside this namespace.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.name]).arg(program);
        command
    }

    /// Runs `program` with `args` inside this namespace and returns its stdout; it must succeed.
    pub fn run(&self, program: &str, args: &[&str]) -> String {
        let output = std::process::Command::new("ip")
            .args(["netns", "exec", &self.name, program])
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("cannot run ip netns exec: {e}"));
        assert!(
            output.status.success(),
            "in {}: {program} {args:?} failed: {}",
            self.name,
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }
}

/// What the NAT does to packets between home and the relay, besides translating them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Impairment {
    None,
    /// Every packet either way is dropped: the uplink is down.
    Outage,
    /// Each packet either way is dropped with this probability.
    Loss(f64),
    /// Only packets from the relay to home are dropped: a half-open path.
    RelayToHomeLost,
    /// Every UDP packet either way is dropped; TCP passes.
    UdpBlocked,
    /// Only TCP to and from this port on the relay passes, as out of an office whose firewall
    /// lets nothing out but HTTPS.
    OnlyTcpTo(u16),
}

/// What the impairment shim (`lab-shim`) does to each packet, either way: see its usage.
#[derive(Debug, Clone, Copy)]
pub struct Shim {
    pub delay: Duration,
    pub jitter: Duration,
    pub loss: f64,
    pub reorder: f64,
}

/// Where the impairment shim listens, in the relay's namespace.
const SHIM_LISTEN: &str = "203.0.113.1:4434";

pub struct Lab {
    pub visitor: Netns,
    pub relay: Netns,
    pub nat: Netns,
    pub home: Netns,
    /// Keys and configs of the relay and the agent.
    pub keys: Keys,
    relay_identity: Identity,
    agent_identity: Identity,
}

impl Lab {
    /// Whether the lab can run here; says loudly why not (or fails under
    /// `TETHER_REQUIRE_TOOLS`).
    pub fn available(test: &str) -> bool {
        if !tools::available(test, &["ip", "iptables", "conntrack"]) {
            return false;
        }
        if !is_root() {
            assert!(
                std::env::var_os("TETHER_REQUIRE_TOOLS").is_none(),
                "{test} needs root"
            );
            tools::not_run(test, "root");
            return false;
        }
        true
    }

    /// Builds the four namespaces, their links and the NAT.
    pub fn build() -> Self {
        static COUNT: AtomicU32 = AtomicU32::new(0);
        remove_stale_labs();
        let id = format!(
            "{PREFIX}-{}-{}",
            std::process::id(),
            COUNT.fetch_add(1, Ordering::Relaxed)
        );
        let ns = |role: &str| Netns {
            name: format!("{id}-{role}"),
        };
        let keys = Keys::new();
        let (relay_identity, _) = keys.identity("relay");
        let (agent_identity, _) = keys.identity("agent");
        // Made first, so that whatever is built below is removed if a step fails.
        let lab = Lab {
            visitor: ns("visitor"),
            relay: ns("relay"),
            nat: ns("nat"),
            home: ns("home"),
            keys,
            relay_identity,
            agent_identity,
        };
        for netns in lab.all() {
            ip(&["netns", "add", &netns.name]);
            netns.run("ip", &["link", "set", "lo", "up"]);
        }
        lab.link(
            &lab.visitor,
            "v0",
            "198.51.100.2/24",
            &lab.relay,
            "r0",
            "198.51.100.1/24",
        );
        lab.link(
            &lab.relay,
            "r1",
            "203.0.113.1/24",
            &lab.nat,
            "n0",
            "203.0.113.2/24",
        );
        lab.link(
            &lab.nat,
            "n1",
            "10.77.0.1/24",
            &lab.home,
            "h0",
            "10.77.0.2/24",
        );
        lab.home
            .run("ip", &["route", "add", "default", "via", "10.77.0.1"]);
        let timeout = NAT_UDP_TIMEOUT.as_secs().to_string();
        lab.nat.run(
            "sysctl",
            &[
                "-qw",
                "net.ipv4.ip_forward=1",
                &format!("net.netfilter.nf_conntrack_udp_timeout={timeout}"),
                &format!("net.netfilter.nf_conntrack_udp_timeout_stream={timeout}"),
            ],
        );
        let nat = |args: &[&str]| lab.nat.run("iptables", args);
        nat(&[
            "-t",
            "nat",
            "-A",
            "POSTROUTING",
            "-o",
            "n0",
            "-j",
            "MASQUERADE",
            "--random-fully",
        ]);
        // Impairments live in a chain of their own, ahead of the NAT's rules.
        nat(&["-N", "IMPAIR"]);
        nat(&["-A", "FORWARD", "-j", "IMPAIR"]);
        nat(&[
            "-A",
            "FORWARD",
            "-i",
            "n0",
            "-m",
            "conntrack",
            "--ctstate",
            "ESTABLISHED,RELATED",
            "-j",
            "ACCEPT",
        ]);
        nat(&["-A", "FORWARD", "-i", "n0", "-j", "DROP"]);
        lab
    }

    fn all(&self) -> [&Netns; 4] {
        [&self.visitor, &self.relay, &self.nat, &self.home]
    }

    fn link(&self, a: &Netns, a_if: &str, a_ip: &str, b: &Netns, b_if: &str, b_ip: &str) {
        ip(&[
            "link", "add", a_if, "netns", &a.name, "type", "veth", "peer", "name", b_if, "netns",
            &b.name,
        ]);
        for (netns, interface, address) in [(a, a_if, a_ip), (b, b_if, b_ip)] {
            netns.run("ip", &["addr", "add", address, "dev", interface]);
            netns.run("ip", &["link", "set", interface, "up"]);
        }
    }

    /// Sets what the NAT does to packets between home and the relay.
    pub fn impair(&self, impairment: Impairment) {
        self.nat.run("iptables", &["-F", "IMPAIR"]);
        let drop = |extra: &[&str]| {
            let mut args = vec!["-A", "IMPAIR"];
            args.extend_from_slice(extra);
            args.extend_from_slice(&["-j", "DROP"]);
            self.nat.run("iptables", &args);
        };
        match impairment {
            Impairment::None => {}
            Impairment::Outage => drop(&[]),
            Impairment::Loss(p) => {
                let p = p.to_string();
                drop(&["-m", "statistic", "--mode", "random", "--probability", &p]);
            }
            Impairment::RelayToHomeLost => drop(&["-i", "n0"]),
            Impairment::UdpBlocked => drop(&["-p", "udp"]),
            Impairment::OnlyTcpTo(port) => {
                let port = port.to_string();
                for direction in ["--dport", "--sport"] {
                    let pass = [
                        "-A", "IMPAIR", "-p", "tcp", direction, &port, "-j", "RETURN",
                    ];
                    self.nat.run("iptables", &pass);
                }
                drop(&[]);
            }
        }
    }

    /// Makes the NAT's outside address [`NAT_SECOND_PUBLIC`] from now on, as when a home
    /// network's public address changes; mappings made before are forgotten.
    pub fn switch_nat_address(&self) {
        let address = format!("{NAT_SECOND_PUBLIC}/24");
        self.nat.run("ip", &["addr", "add", &address, "dev", "n0"]);
        let rule = [
            "-t",
            "nat",
            "-R",
            "POSTROUTING",
            "1",
            "-o",
            "n0",
            "-j",
            "SNAT",
            "--to-source",
            NAT_SECOND_PUBLIC,
            "--random-fully",
        ];
        self.nat.run("iptables", &rule);
        self.flush_nat();
    }

    /// Forgets every NAT mapping: the next packet from home leaves from a new port.
    pub fn flush_nat(&self) {
        self.nat.run("conntrack", &["-F"]);
    }

    /// The NAT's current UDP mappings from home to the relay's agent port: the public port of
    /// each on the NAT.
    pub fn nat_ports(&self) -> Vec<u16> {
        let port = RELAY_LISTEN.rsplit(':').next().unwrap();
        // conntrack prints its summary on stderr and exits 0 with or without entries.
        let table = self
            .nat
            .run("conntrack", &["-L", "-p", "udp", "--dport", port]);
        // "... sport=40001 dport=4433 src=203.0.113.1 dst=203.0.113.2 sport=4433 dport=2630 ..."
        table
            .lines()
            .filter_map(|l| {
                l.split("dport=")
                    .nth(2)?
                    .split_whitespace()
                    .next()?
                    .parse()
                    .ok()
            })
            .collect()
    }

    /// Writes relay.toml and starts the relay in its namespace, admitting the agent `home` to
    /// ports 7000/tcp, 2222/tcp and 60000-60010/udp.
    pub async fn start_relay(&self) -> Process {
        self.start_relay_with("").await
    }

    /// [`Lab::start_relay`] with `settings` (TOML lines) in relay.toml.
    pub async fn start_relay_with(&self, settings: &str) -> Process {
        let config = format!(
            "listen = \"{RELAY_LISTEN}\"\nkey = \"relay.key\"\npublic_bind = \"{RELAY_PUBLIC}\"\n\
             {settings}\n\
             [[agent]]\nname = \"home\"\nfingerprint = \"{}\"\n\
             ports = [\"7000/tcp\", \"2222/tcp\", \"60000-60010/udp\"]\n",
            self.agent_identity.fingerprint()
        );
        let file = self.keys.path().join("relay.toml");
        std::fs::write(&file, config).expect("write relay.toml");
        let mut command = self.relay.command(binary("tether-relay"));
        command.args(["run", "-c"]).arg(&file);
        let mut process = Process::start(command);
        process.wait_for_line("relay listening").await;
        process
    }

    /// Writes agent.toml with `settings` (TOML lines such as `keepalive = "off"`) and the
    /// forwards 7000/tcp, 2222/tcp to home's sshd and 60000-60010/udp, and starts the agent.
    /// Returns once it is connected, with the id of its session.
    pub async fn start_agent(&self, settings: &str) -> (Process, String) {
        self.start_agent_via(RELAY_LISTEN, settings).await
    }

    /// [`Lab::start_agent`], reaching the relay at `relay` (such as a [`Lab::start_shim`]).
    pub async fn start_agent_via(&self, relay: &str, settings: &str) -> (Process, String) {
        let config = format!(
            "relay = \"{relay}\"\nrelay_fingerprint = \"{}\"\nkey = \"agent.key\"\n\
             {settings}\n\
             [[forward]]\nname = \"echo\"\nproto = \"tcp\"\nremote = 7000\nlocal = \"127.0.0.1:7000\"\n\
             [[forward]]\nname = \"ssh\"\nproto = \"tcp\"\nremote = 2222\nlocal = \"127.0.0.1:22\"\n\
             [[forward]]\nname = \"mosh\"\nproto = \"udp\"\nremote = \"60000-60010\"\n\
             local = \"127.0.0.1:60000-60010\"\n",
            self.relay_identity.fingerprint()
        );
        let file = self.keys.path().join("agent.toml");
        std::fs::write(&file, config).expect("write agent.toml");
        let mut command = self.home.command(binary("tether-agent"));
        command.args(["run", "-c"]).arg(&file);
        let mut process = Process::start(command);
        let line = process.wait_for_line("connected to relay").await;
        (process, session_of(&line))
    }

    /// Starts sshd in home on 127.0.0.1:22, admitting root with a key of its own, and returns
    /// it with the arguments that log in through the relay's port 2222 from the visitor.
    pub async fn start_sshd(&self) -> (Process, Vec<String>) {
        let files = crate::tools::SshdFiles::write(self.keys.path(), "127.0.0.1:22");
        let mut command = self.home.command("/usr/sbin/sshd");
        command.args(["-D", "-e", "-f"]).arg(&files.config);
        let mut sshd = Process::start(command);
        sshd.wait_for_line("Server listening").await;
        (sshd, files.login(RELAY_PUBLIC, 2222))
    }

    /// Starts the impairment shim in the relay's namespace, in front of the relay, and returns
    /// it with the address agents reach the relay through it.
    pub async fn start_shim(&self, shim: Shim) -> (Peer, &'static str) {
        let millis = |d: Duration| d.as_millis().to_string();
        let mut command = self.relay.command(binary("lab-shim"));
        command.args([
            SHIM_LISTEN,
            RELAY_LISTEN,
            &millis(shim.delay),
            &millis(shim.jitter),
            &shim.loss.to_string(),
            &shim.reorder.to_string(),
        ]);
        let mut peer = Peer::start(command);
        assert_eq!(peer.line().await, "listening");
        (peer, SHIM_LISTEN)
    }

    /// Starts `lab-peer` with `args` in `netns` and waits for its first line.
    pub async fn peer(&self, netns: &Netns, args: &[&str]) -> (Peer, String) {
        let mut command = netns.command(binary("lab-peer"));
        command.args(args);
        let mut peer = Peer::start(command);
        let first = peer.line().await;
        (peer, first)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for netns in self.all() {
            // Its processes were killed with their handles; the veths go with the namespaces.
            let _ = std::process::Command::new("ip")
                .args(["netns", "delete", &netns.name])
                .status();
        }
    }
}

/// The session id in a log line: the agent's "connected to relay session=ID", or the relay's
/// "session{agent=NAME session=ID}: ...".
pub fn session_of(line: &str) -> String {
    let id: String = line
        .split("session=")
        .nth(1)
        .map(|rest| rest.chars().take_while(char::is_ascii_digit).collect())
        .unwrap_or_default();
    assert!(!id.is_empty(), "no session id in {line:?}");
    id
}

/// A process driven line by line over its stdin and stdout: `lab-peer`, or ssh.
pub struct Peer {
    _child: Child,
    stdin: ChildStdin,
    stdout: Lines<BufReader<ChildStdout>>,
}

impl Peer {
    /// Starts `command`, to be driven over its stdin and stdout.
    pub fn start(mut command: Command) -> Self {
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("start lab-peer");
        let stdin = child.stdin.take().expect("stdin");
        let stdout = BufReader::new(child.stdout.take().expect("stdout")).lines();
        Self {
            _child: child,
            stdin,
            stdout,
        }
    }

    /// The next line it prints, within [`crate::STEP`].
    pub async fn line(&mut self) -> String {
        self.line_within(crate::STEP).await
    }

    /// The next line it prints, with no limit of its own: for a caller that bounds the wait
    /// itself (safe to drop while waiting). `None` once it ended.
    pub async fn next_line(&mut self) -> Option<String> {
        self.stdout.next_line().await.ok().flatten()
    }

    /// The next line it prints, within `limit`.
    pub async fn line_within(&mut self, limit: Duration) -> String {
        within_for("a line from lab-peer", limit, self.stdout.next_line())
            .await
            .expect("lab-peer's stdout")
            .expect("lab-peer ended")
    }

    /// Sends one command and returns the line that answers it.
    pub async fn ask(&mut self, command: &str) -> String {
        self.tell(command).await;
        self.line().await
    }

    /// Sends one command; its answers are read with [`Peer::line`].
    pub async fn tell(&mut self, command: &str) {
        self.stdin
            .write_all(format!("{command}\n").as_bytes())
            .await
            .expect("lab-peer's stdin");
    }
}

fn ip(args: &[&str]) {
    let status = std::process::Command::new("ip").args(args).status();
    assert!(status.expect("run ip").success(), "ip {args:?} failed");
}

/// Whether this process runs as root (its effective uid is 0).
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status").is_ok_and(|status| {
        status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|ids| ids.split_whitespace().nth(1))
            == Some("0")
    })
}

/// Removes labs left behind by test processes that no longer run.
fn remove_stale_labs() {
    let Ok(entries) = std::fs::read_dir("/run/netns") else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(&format!("{PREFIX}-"))
            .and_then(|rest| rest.split('-').next())
        else {
            continue;
        };
        if !std::path::Path::new("/proc").join(pid).exists() {
            let _ = std::process::Command::new("ip")
                .args(["netns", "delete", &name])
                .status();
        }
    }
}

/// A binary of this workspace, built beside the running test: `cargo test --workspace` builds
/// them all; `cargo build --workspace --bins` does too.
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable");
    // target/debug/deps/TEST → target/debug/NAME
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target dir");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is not built; run cargo build --workspace --bins",
        path.display()
    );
    path
}
