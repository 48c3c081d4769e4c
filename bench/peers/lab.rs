//! The lab of `peers --lab`: the home side of every system in a network namespace of its own,
//! the VPS side in the root namespace, and between them a namespace that forwards every packet
//! either way with a delay and a chance of loss.
//!
//! ```text
//!  root namespace: the VPS side      wan namespace                  home namespace
//!  relay, rathole server, probes,    FORWARD: loss (iptables         agent, rathole client,
//!  iperf3 client                     -m statistic), then delay       iperf3 -s, echo service
//!  10.213.A.1 ──────────── 10.213.A.2   (NFQUEUE to lab-delay)  10.213.B.1 ──── 10.213.B.2
//! ```
//!
//! Every packet between the sides passes the wan namespace's FORWARD chain once, TCP and UDP
//! alike: it is dropped with the chance given, else held for the delay by `lab-delay` (one for
//! each direction, each perhaps a bottleneck with a queue as well), so a round trip gains twice
//! the delay. The sending ends of the links hand the kernel one packet
//! at a time (`gso_max_segs 1`), so that a loss is one packet's, not a 64 KB burst's.
//!
//! The namespaces carry this process's id in their names. They, and with them the links, the
//! rules and the processes inside, are removed when the lab is dropped, and one left by a killed
//! run is removed by the next.

use std::net::Ipv4Addr;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};

const PREFIX: &str = "tbench";

/// How the lab treats each packet, either way.
#[derive(Debug, Clone, Copy)]
pub struct Link {
    /// Added each way.
    pub delay: Duration,
    /// The chance of loss, in percent.
    pub loss: f64,
    /// A bottleneck before the delay: Mbit/s, and the packets that may wait for it.
    pub bottleneck: Option<(f64, usize)>,
}

pub struct Lab {
    pub link: Link,
    wan: String,
    home: String,
    /// The root namespace's address, where the VPS side listens.
    pub vps: Ipv4Addr,
    /// The home namespace's address.
    pub home_address: Ipv4Addr,
    /// The delayer and the services, alive as long as the lab.
    children: Vec<Child>,
}

impl Lab {
    /// Builds the namespaces and links, and starts the delayer `delay` in the wan namespace.
    pub async fn build(link: Link, delay: &Path) -> Result<Self> {
        remove_stale();
        let pid = std::process::id();
        // Two /24s of 10.213/16 that another run's are unlikely to be.
        let a = (pid % 127 * 2) as u8;
        let net = |n: u8, host: u8| Ipv4Addr::new(10, 213, n, host);
        // Made first, so that whatever is built below is removed if a step fails.
        let mut lab = Lab {
            link,
            wan: format!("{PREFIX}-{pid}-wan"),
            home: format!("{PREFIX}-{pid}-home"),
            vps: net(a, 1),
            home_address: net(a + 1, 2),
            children: Vec::new(),
        };
        let (wan, home) = (lab.wan.clone(), lab.home.clone());
        for ns in [&wan, &home] {
            ip(&["netns", "add", ns])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        let root_end = format!("tbr{pid}");
        ip(&[
            "link", "add", &root_end, "type", "veth", "peer", "name", "w0", "netns", &wan,
        ])?;
        ip(&[
            "-n", &wan, "link", "add", "w1", "type", "veth", "peer", "name", "h0", "netns", &home,
        ])?;
        let cidr = |address: Ipv4Addr| format!("{address}/24");
        for (ns, dev, address) in [
            (None, root_end.as_str(), net(a, 1)),
            (Some(&wan), "w0", net(a, 2)),
            (Some(&wan), "w1", net(a + 1, 1)),
            (Some(&home), "h0", net(a + 1, 2)),
        ] {
            let mut args: Vec<&str> = ns.map_or(vec![], |ns| vec!["-n", ns]);
            let cidr = cidr(address);
            ip(&[&args[..], &["addr", "add", &cidr, "dev", dev]].concat())?;
            args.extend(["link", "set", dev, "up", "gso_max_segs", "1"]);
            ip(&args)?;
        }
        let home_net = format!("{}/24", net(a + 1, 0));
        ip(&["route", "add", &home_net, "via", &net(a, 2).to_string()])?;
        ip(&[
            "-n",
            &home,
            "route",
            "add",
            "default",
            "via",
            &net(a + 1, 1).to_string(),
        ])?;
        run_in(&wan, "sysctl", &["-qw", "net.ipv4.ip_forward=1"])?;
        lab.start_delayer(delay).await?;
        Ok(lab)
    }

    /// A `lab-delay` in the wan namespace for each direction, then the rules that drop and
    /// queue every forwarded packet: loss first, so that a lost packet is not held.
    async fn start_delayer(&mut self, delay: &Path) -> Result<()> {
        let wan = self.wan.clone();
        // Queue 0 takes what comes from the VPS side (w0), queue 1 what comes from home (w1).
        for queue in [0u16, 1] {
            self.start_one_delayer(delay, queue).await?;
        }
        if self.link.loss > 0.0 {
            let chance = format!("{}", self.link.loss / 100.0);
            run_in(
                &wan,
                "iptables",
                &[
                    "-A",
                    "FORWARD",
                    "-m",
                    "statistic",
                    "--mode",
                    "random",
                    "--probability",
                    &chance,
                    "-j",
                    "DROP",
                ],
            )?;
        }
        for (dev, queue) in [("w0", "0"), ("w1", "1")] {
            run_in(
                &wan,
                "iptables",
                &[
                    "-A",
                    "FORWARD",
                    "-i",
                    dev,
                    "-j",
                    "NFQUEUE",
                    "--queue-num",
                    queue,
                ],
            )?;
        }
        Ok(())
    }

    /// One `lab-delay`, serving the netfilter queue `queue`.
    async fn start_one_delayer(&mut self, delay: &Path, queue: u16) -> Result<()> {
        // Real-time priority, as a link is not starved of CPU: a delayer that misses its turn
        // while the benchmark's processes run overflows its socket, and the kernel drops.
        let mut command = self.command(&self.wan.clone(), Path::new("chrt"));
        command
            .args(["--fifo", "10"])
            .arg(delay)
            .args(["--delay-ms", &self.link.delay.as_millis().to_string()])
            .args(["--queue", &queue.to_string()]);
        if let Some((rate, limit)) = self.link.bottleneck {
            command
                .args(["--rate-mbit", &rate.to_string()])
                .args(["--limit", &limit.to_string()]);
        }
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", delay.display()))?;
        let stdout = child.stdout.take().context("lab-delay's stdout")?;
        self.children.push(child);
        let mut lines = BufReader::new(stdout).lines();
        let ready = tokio::time::timeout(Duration::from_secs(10), lines.next_line()).await;
        if !matches!(ready, Ok(Ok(Some(ref line))) if line.starts_with("ready")) {
            bail!("{} did not say it was ready", delay.display());
        }
        Ok(())
    }

    /// `program` to be run in the namespace `ns`.
    fn command(&self, ns: &str, program: &Path) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", ns]).arg(program);
        command
    }

    /// The home namespace's name.
    pub fn home(&self) -> &str {
        &self.home
    }

    /// Starts the services in the home namespace, on every address: iperf3's server and the
    /// echo service (this program, `--echo-service`); returns once both answer across the lab.
    pub async fn start_services(
        &mut self,
        iperf3: &Path,
        peers: &Path,
        iperf: u16,
        echo: u16,
    ) -> Result<()> {
        let home = self.home.clone();
        let iperf_server = self
            .command(&home, iperf3)
            .args(["-s", "-p", &iperf.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("starting iperf3 -s in the lab")?;
        self.children.push(iperf_server);
        let echo_service = self
            .command(&home, peers)
            .args(["--echo-service", &format!("0.0.0.0:{echo}")])
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("starting the echo service in the lab")?;
        self.children.push(echo_service);
        for port in [iperf, echo] {
            self.wait_listening(port).await?;
        }
        Ok(())
    }

    /// Waits until the home namespace accepts connections on `port`, asked across the lab.
    async fn wait_listening(&self, port: u16) -> Result<()> {
        let start = Instant::now();
        let address = (self.home_address, port);
        loop {
            let attempt = tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(address));
            if let Ok(Ok(_)) = attempt.await {
                return Ok(());
            }
            if start.elapsed() > Duration::from_secs(20) {
                bail!("nothing listens at {}:{port} in the lab", self.home_address);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// TCP's congestion control in the root namespace and in the home one, as the kernel names
    /// it: it decides much of what TCP carries over a lossy link.
    pub fn congestion_control(&self) -> Result<(String, String)> {
        let file = "/proc/sys/net/ipv4/tcp_congestion_control";
        let root = std::fs::read_to_string(file).with_context(|| format!("reading {file}"))?;
        let home = run_in(&self.home, "cat", &[file])?;
        Ok((root.trim().to_owned(), home.trim().to_owned()))
    }

    /// What the delayers' kernel queues could not take, summed: packets dropped because a
    /// queue was full and because they could not be handed to the delayer; and whether both
    /// delayers still run. (A bottleneck's own drops are the link's, and not counted.)
    pub fn delayer_drops(&mut self) -> Result<(u64, bool)> {
        let running = self.children.len() >= 2
            && self.children[..2]
                .iter_mut()
                .all(|child| matches!(child.try_wait(), Ok(None)));
        let out = run_in(&self.wan, "cat", &["/proc/net/netfilter/nfnetlink_queue"])?;
        // queue, portid, waiting, copy mode, copy range, queue_dropped, user_dropped, ...
        let dropped = out
            .lines()
            .map(|line| {
                let fields: Vec<u64> = line
                    .split_whitespace()
                    .filter_map(|f| f.parse().ok())
                    .collect();
                fields.get(5).unwrap_or(&0) + fields.get(6).unwrap_or(&0)
            })
            .sum();
        Ok((dropped, running))
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.start_kill();
        }
        for ns in [&self.home, &self.wan] {
            remove(ns);
        }
    }
}

/// Stops what still runs in the namespace `ns` and removes it; its links and rules go with it.
fn remove(ns: &str) {
    if let Ok(pids) = ip(&["netns", "pids", ns]) {
        for pid in pids.split_whitespace() {
            let _ = std::process::Command::new("kill")
                .args(["-KILL", pid])
                .status();
        }
    }
    let _ = ip(&["netns", "del", ns]);
}

/// Removes the namespaces of runs whose process is gone.
fn remove_stale() {
    let Ok(list) = ip(&["netns", "list"]) else {
        return;
    };
    for name in list
        .lines()
        .filter_map(|line| line.split_whitespace().next())
    {
        let Some(pid) = name
            .strip_prefix(PREFIX)
            .and_then(|rest| rest.strip_prefix('-'))
            .and_then(|rest| rest.split('-').next())
        else {
            continue;
        };
        if !Path::new("/proc").join(pid).exists() {
            eprintln!("removing {name}, left by an earlier run");
            remove(name);
        }
    }
}

/// Runs `ip` with `args`; it must succeed. Returns its output.
fn ip(args: &[&str]) -> Result<String> {
    output("ip", args)
}

/// Runs `program` with `args` in the namespace `ns`; it must succeed.
fn run_in(ns: &str, program: &str, args: &[&str]) -> Result<String> {
    output("ip", &[&["netns", "exec", ns, program], args].concat())
}

fn output(program: &str, args: &[&str]) -> Result<String> {
    let out = std::process::Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("running {program}"))?;
    if !out.status.success() {
        bail!(
            "{program} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
