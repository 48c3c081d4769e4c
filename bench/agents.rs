//! Many agents on one relay: what each connected agent costs the relay in memory, and what
//! their keepalives cost it in CPU time while nothing else happens.
//!
//! The relay is the release binary in a process of its own, so that its RSS and CPU time are
//! its alone; it lists every agent in its relay.toml (no ports). The agents run in this process,
//! on one runtime, each with its own key and UDP socket and the keepalive and idle timeout an
//! installed agent has by default, with no forwards. Each run starts a fresh relay and measures:
//!
//! - the relay's RSS at rest (every agent listed, none connected) and with all of them
//!   connected, hence KiB per agent;
//! - the relay's CPU time (utime + stime) over an idle window with all of them connected: ms per
//!   second, and µs per agent per keepalive interval;
//! - this process's own RSS per agent, for the agent side.
//!
//! Each figure is the median over the runs; the report goes to `--out` as a Markdown section.
//!
//! `cargo build --release -p tether-relay -p tether-bench --bin agents && target/release/agents`

mod procfs;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use clap::Parser;
use tether_agent::Agent;
use tether_common::config::AgentConfig;
use tether_common::trust::identity::Identity;
use tether_relay::status::RelayStatus;
use tokio::net::UnixDatagram;
use tokio::process::{Child, Command};
use tokio::sync::{watch, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use procfs::{cpu_seconds, rss_kib, ticks_per_second};

#[derive(Parser, Debug)]
#[command(about = "Many agents on one relay: the relay's RSS per agent and CPU time while idle")]
struct Args {
    /// Agents connected to the relay.
    #[arg(long, default_value_t = 1000)]
    agents: usize,
    /// The idle window over which the relay's CPU time is measured, in seconds.
    #[arg(long, default_value_t = 30)]
    idle_seconds: u64,
    /// Runs, each with a fresh relay; each figure is their median.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Where the report goes.
    #[arg(long, default_value = "target/bench-results/agents.md")]
    out: PathBuf,
    /// The relay binary.
    #[arg(long, default_value = "target/release/tether-relay")]
    relay: PathBuf,
    /// Where keys, configs and the relay's log are kept; emptied first.
    #[arg(long, default_value = "target/bench-agents")]
    work: PathBuf,
}

/// The target of the performance work for one connected agent's cost to the relay.
const TARGET_KIB_PER_AGENT: f64 = 150.0;
/// The target for the relay's RSS at rest.
const TARGET_REST_KIB: f64 = 10.0 * 1024.0;
/// Agents connecting at once: under the relay's cap of handshakes from one address (32), which
/// every agent here shares, so that none is dropped and left to time out.
const CONNECTING_AT_ONCE: usize = 16;
/// How long the relay may take to say it is ready, and all agents to connect.
const READY_WITHIN: Duration = Duration::from_secs(20);
const CONNECTED_WITHIN: Duration = Duration::from_secs(300);
/// A pause before reading memory, so that what connecting left behind (handshake state,
/// buffers freed by the allocator in batches) is settled and not counted.
const SETTLE: Duration = Duration::from_secs(2);
/// Why the agents' memory is taken from the first run alone.
const AGENT_SIDE_NOTE: &str = "Later runs are left out: once the earlier runs' agents free \
     their buffers, glibc serves the next ones from reused heap, zeroed and resident in full. \
     Each agent's QUIC endpoint allocates a 2.9 MiB receive buffer (quinn: 1,472 bytes × 64 GRO \
     segments × 32 datagrams a batch); in a fresh mapping only the pages that packets reach \
     become resident, from reused heap all of them (later runs here: up to 2.7 MiB per agent).";
/// File descriptors this process needs besides one UDP socket per agent.
const SPARE_FILES: u64 = 256;

/// What one run measured.
struct Run {
    relay_rest_kib: f64,
    relay_connected_kib: f64,
    relay_cpu_ms_per_second: f64,
    /// Only the first run's is reported: see [`AGENT_SIDE_NOTE`].
    bench_kib_per_agent: f64,
    connect_seconds: f64,
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    ensure!(args.agents >= 1, "--agents must be at least 1");
    ensure!(args.runs >= 1, "--runs must be at least 1");
    ensure!(args.idle_seconds >= 1, "--idle-seconds must be at least 1");
    raise_file_limit(args.agents as u64 + SPARE_FILES)?;
    let relay = std::fs::canonicalize(&args.relay)
        .with_context(|| format!("no relay binary at {}", args.relay.display()))?;
    let ticks = ticks_per_second().await?;
    let _ = std::fs::remove_dir_all(&args.work);
    std::fs::create_dir_all(&args.work)
        .with_context(|| format!("creating {}", args.work.display()))?;
    let work = std::fs::canonicalize(&args.work)?;

    eprintln!("making {} agent keys", args.agents);
    let setup = Setup::write(&work, args.agents)?;
    let mut runs = Vec::with_capacity(args.runs);
    for run in 0..args.runs {
        eprintln!("run {} of {}", run + 1, args.runs);
        runs.push(measure(&args, &setup, &relay, &work, ticks).await?);
    }
    let text = render(&args, &setup, &runs, ticks);
    if let Some(parent) = args.out.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    std::fs::write(&args.out, &text).with_context(|| format!("writing {}", args.out.display()))?;
    print!("{text}");
    eprintln!("wrote {}", args.out.display());
    Ok(())
}

/// The keys and the relay's config, made once for every run.
struct Setup {
    relay_fingerprint: String,
    /// Each agent's name and key.
    agents: Vec<(String, Identity)>,
    /// Where the agents' configs would be read from: their relative paths start there.
    agent_toml: PathBuf,
    /// Keepalive and idle timeout as the agents have them: an installed agent's defaults.
    keepalive: Duration,
    idle_timeout: Duration,
}

impl Setup {
    fn write(work: &Path, count: usize) -> Result<Self> {
        let keys = work.join("keys");
        std::fs::create_dir_all(&keys)?;
        let relay = Identity::generate(&work.join("relay.key")).context("relay key")?;
        let mut relay_toml = "listen = \"127.0.0.1:0\"\nkey = \"relay.key\"\n\
             status_socket = \"status.sock\"\npublic_bind = \"127.0.0.1\"\n"
            .to_owned();
        let mut agents = Vec::with_capacity(count);
        for i in 0..count {
            let name = format!("agent-{i:04}");
            let identity = Identity::generate(&keys.join(format!("{name}.key")))
                .with_context(|| format!("key of {name}"))?;
            relay_toml += &format!(
                "\n[[agent]]\nname = \"{name}\"\nfingerprint = \"{}\"\nports = []\n",
                identity.fingerprint()
            );
            agents.push((name, identity));
        }
        std::fs::write(work.join("relay.toml"), relay_toml)?;
        let mut setup = Self {
            relay_fingerprint: relay.fingerprint().to_string(),
            agents,
            agent_toml: keys.join("agent.toml"),
            keepalive: Duration::ZERO,
            idle_timeout: Duration::ZERO,
        };
        // What an agent.toml that leaves them out gets.
        let defaults = setup.agent_config("agent", "127.0.0.1:1")?;
        setup.keepalive = defaults
            .keepalive
            .context("agents have no keepalive by default")?;
        setup.idle_timeout = defaults.idle_timeout;
        Ok(setup)
    }

    /// An agent's config as `tether-agent init` writes it, built in memory.
    fn agent_config(&self, name: &str, relay: &str) -> Result<AgentConfig> {
        let text = format!(
            "relay = \"{relay}\"\nrelay_fingerprint = \"{}\"\nkey = \"{name}.key\"\n",
            self.relay_fingerprint
        );
        AgentConfig::from_toml(&text, &self.agent_toml).context("an agent's config")
    }
}

/// One run: a fresh relay, every agent connected, memory and an idle window measured.
async fn measure(
    args: &Args,
    setup: &Setup,
    relay_binary: &Path,
    work: &Path,
    ticks: f64,
) -> Result<Run> {
    let relay = RelayProcess::start(relay_binary, work).await?;
    let pid = relay.pid()?;
    let status = relay.status().await?;
    let listen = status
        .listen
        .parse()
        .context("the relay's listen address")?;
    tokio::time::sleep(SETTLE).await;
    let relay_rest_kib = rss_kib(pid)?;
    let bench_before_kib = rss_kib(std::process::id())?;

    let stop = CancellationToken::new();
    let tasks = TaskTracker::new();
    let started = Instant::now();
    let connected =
        tokio::time::timeout(CONNECTED_WITHIN, connect_all(setup, listen, &tasks, &stop)).await;
    let measured = async {
        connected
            .map_err(|_| anyhow::anyhow!("agents not all connected within {CONNECTED_WITHIN:?}"))?
            .context("connecting the agents")?;
        let connect_seconds = started.elapsed().as_secs_f64();
        check_connected(&relay, args.agents, "once connected").await?;

        tokio::time::sleep(SETTLE).await;
        let relay_connected_kib = rss_kib(pid)?;
        let bench_kib = rss_kib(std::process::id())?;
        let bench_kib_per_agent = (bench_kib - bench_before_kib) / args.agents as f64;
        eprintln!(
            "  {} agents connected in {connect_seconds:.1} s; relay RSS {relay_rest_kib} → \
             {relay_connected_kib} KiB, bench RSS {bench_before_kib} → {bench_kib} KiB",
            args.agents
        );

        let window = Duration::from_secs(args.idle_seconds);
        let cpu_before = cpu_seconds(pid, ticks)?;
        let idle_start = Instant::now();
        tokio::time::sleep(window).await;
        let cpu = cpu_seconds(pid, ticks)? - cpu_before;
        let elapsed = idle_start.elapsed().as_secs_f64();
        check_connected(&relay, args.agents, "after the idle window").await?;
        anyhow::Ok(Run {
            relay_rest_kib,
            relay_connected_kib,
            relay_cpu_ms_per_second: cpu * 1e3 / elapsed,
            bench_kib_per_agent,
            connect_seconds,
        })
    }
    .await;
    stop.cancel();
    tasks.close();
    let _ = tokio::time::timeout(Duration::from_secs(10), tasks.wait()).await;
    relay.stop().await;
    measured
}

/// Starts every agent, at most [`CONNECTING_AT_ONCE`] connecting at a time, and returns once
/// each has a session.
async fn connect_all(
    setup: &Setup,
    relay: std::net::SocketAddr,
    tasks: &TaskTracker,
    stop: &CancellationToken,
) -> Result<()> {
    let connecting = Arc::new(Semaphore::new(CONNECTING_AT_ONCE));
    let mut statuses = Vec::with_capacity(setup.agents.len());
    for (name, identity) in &setup.agents {
        let config = setup.agent_config(name, &relay.to_string())?;
        let agent = Agent::new(config, identity)?;
        let status = agent.status();
        let permit = connecting.clone().acquire_owned().await?;
        tasks.spawn(agent.run(stop.clone()));
        // The permit goes back once this agent has its session, or gave up.
        let mut waiter = status.clone();
        tasks.spawn(async move {
            let _ = waiter.wait_for(|s| s.session().is_some()).await;
            drop(permit);
        });
        statuses.push(status);
    }
    for status in &mut statuses {
        wait_session(status).await?;
    }
    Ok(())
}

async fn wait_session(status: &mut watch::Receiver<tether_agent::AgentStatus>) -> Result<()> {
    status
        .wait_for(|s| s.session().is_some())
        .await
        .context("an agent stopped before it connected")?;
    Ok(())
}

/// Fails unless the relay counts `expected` agents connected, none of them reconnected.
async fn check_connected(relay: &RelayProcess, expected: usize, when: &str) -> Result<()> {
    let status = relay.status().await?;
    let connected = status.agents.iter().filter(|a| a.connected).count();
    let reconnects: u64 = status.agents.iter().map(|a| a.reconnects).sum();
    if connected != expected || reconnects != 0 {
        bail!(
            "{when}, the relay counts {connected} of {expected} agents connected and \
             {reconnects} reconnects"
        );
    }
    Ok(())
}

/// The relay in a process of its own, run as systemd would run it: this process stands in for
/// the service manager and takes its `READY=1`.
struct RelayProcess {
    child: Child,
    status_socket: PathBuf,
}

impl RelayProcess {
    async fn start(binary: &Path, work: &Path) -> Result<Self> {
        let notify_path = work.join("notify.sock");
        let _ = std::fs::remove_file(&notify_path);
        let notify = UnixDatagram::bind(&notify_path)
            .with_context(|| format!("binding {}", notify_path.display()))?;
        let log = std::fs::File::create(work.join("relay.log"))?;
        let mut child = Command::new(binary)
            .args(["run", "-c", "relay.toml"])
            .current_dir(work)
            .env("NOTIFY_SOCKET", &notify_path)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        let ready = async {
            let mut message = vec![0u8; 4096];
            loop {
                let n = notify.recv(&mut message).await?;
                let text = String::from_utf8_lossy(&message[..n]);
                if text.lines().any(|line| line == "READY=1") {
                    return anyhow::Ok(());
                }
            }
        };
        tokio::select! {
            ready = tokio::time::timeout(READY_WITHIN, ready) => {
                ready.map_err(|_| anyhow::anyhow!("the relay was not ready within {READY_WITHIN:?}"))??;
            }
            exit = child.wait() => bail!(
                "the relay exited ({}) before it was ready; see {}",
                exit?,
                work.join("relay.log").display()
            ),
        }
        Ok(Self {
            child,
            status_socket: work.join("status.sock"),
        })
    }

    fn pid(&self) -> Result<u32> {
        self.child.id().context("the relay has exited")
    }

    /// What the relay's status socket says, as `tether-relay status --json` prints it.
    async fn status(&self) -> Result<RelayStatus> {
        let answer = tether_common::service::status_socket::query(&self.status_socket)
            .await
            .context("asking the relay's status socket")?;
        serde_json::from_str(&answer).context("the relay's status")
    }

    async fn stop(mut self) {
        let _ = self.child.kill().await;
    }
}

/// Lets this process hold one UDP socket per agent: the soft limit on open files is raised to
/// `needed`, within the hard limit. The relay, started from here, inherits it.
fn raise_file_limit(needed: u64) -> Result<()> {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let limit = getrlimit(Resource::Nofile);
    if limit.current.is_none_or(|current| current >= needed) {
        return Ok(());
    }
    if limit.maximum.is_some_and(|maximum| maximum < needed) {
        bail!(
            "{needed} open files are needed but the hard limit is {:?}; raise it (ulimit -Hn)",
            limit.maximum
        );
    }
    setrlimit(
        Resource::Nofile,
        Rlimit {
            current: Some(needed),
            maximum: limit.maximum,
        },
    )
    .context("raising the limit on open files")
}

fn median(values: &[f64]) -> f64 {
    let mut values = values.to_vec();
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    if values.len() % 2 == 1 {
        values[mid]
    } else {
        (values[mid - 1] + values[mid]) / 2.0
    }
}

/// `n` with a comma between thousands, as the headings write counts.
fn thousands(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// The report: a Markdown section with each figure's median and per-run values.
fn render(args: &Args, setup: &Setup, runs: &[Run], ticks: f64) -> String {
    let n = args.agents as f64;
    let keepalive = setup.keepalive.as_secs_f64();
    let per_agent = |r: &Run| (r.relay_connected_kib - r.relay_rest_kib) / n;
    // Each row: its label, unit and decimals, and its value in each run.
    let row = |label, unit, decimals, value: &dyn Fn(&Run) -> f64| {
        (
            label,
            unit,
            decimals,
            runs.iter().map(value).collect::<Vec<f64>>(),
        )
    };
    let rows = [
        row(
            "relay RSS at rest (agents listed, none connected)",
            "MiB",
            1,
            &|r| r.relay_rest_kib / 1024.0,
        ),
        row("relay RSS with every agent connected", "MiB", 1, &|r| {
            r.relay_connected_kib / 1024.0
        }),
        row("relay RSS per connected agent", "KiB", 1, &per_agent),
        row("relay CPU while idle", "ms per s", 2, &|r| {
            r.relay_cpu_ms_per_second
        }),
        row(
            "relay CPU per agent per keepalive interval",
            "µs",
            1,
            &|r| r.relay_cpu_ms_per_second * 1e3 * keepalive / n,
        ),
        row("time to connect every agent", "s", 1, &|r| {
            r.connect_seconds
        }),
    ];
    let mut out = format!(
        "# {} agents on one relay\n\n\
         The release relay in a process of its own, every agent listed in its relay.toml; the \
         agents in the bench's process, each with its own key and UDP socket, the default \
         keepalive ({}) and idle timeout ({}), no forwards, {CONNECTING_AT_ONCE} connecting at \
         a time. Memory is read {} after the last one connected; CPU time (counted by the \
         kernel in ticks of {:.0} ms) over {} s idle. {}.\n\n\
         | | median | runs |\n|---|--:|--:|\n",
        thousands(args.agents),
        seconds(setup.keepalive),
        seconds(setup.idle_timeout),
        seconds(SETTLE),
        1e3 / ticks,
        args.idle_seconds,
        match runs.len() {
            1 => "One run".to_owned(),
            n => format!("Medians of {n} runs"),
        },
    );
    for (label, unit, decimals, values) in rows {
        let each: Vec<String> = values.iter().map(|v| format!("{v:.decimals$}")).collect();
        out += &format!(
            "| {label} | {:.decimals$} {unit} | {} |\n",
            median(&values),
            each.join(", ")
        );
    }
    if let Some(first) = runs.first() {
        out += &format!(
            "| bench process RSS per agent (agent side), first run only¹ | {:.1} KiB | |\n\n\
             ¹ {AGENT_SIDE_NOTE}\n",
            first.bench_kib_per_agent
        );
    }
    let kib = median(&runs.iter().map(per_agent).collect::<Vec<_>>());
    let rest = median(&runs.iter().map(|r| r.relay_rest_kib).collect::<Vec<_>>());
    let verdict = |met: bool| if met { "met" } else { "**not met**" };
    out += &format!(
        "\nTargets: relay ≤ {TARGET_KIB_PER_AGENT:.0} KiB per agent: {} ({kib:.1} KiB). \
         Relay RSS at rest ≤ {:.0} MiB: {} ({:.1} MiB, with {} agents listed).\n\n",
        verdict(kib <= TARGET_KIB_PER_AGENT),
        TARGET_REST_KIB / 1024.0,
        verdict(rest <= TARGET_REST_KIB),
        rest / 1024.0,
        thousands(args.agents),
    );
    out += &format!(
        "Reproduce with:\n\n```\n\
         cargo build --release -p tether-relay -p tether-bench --bin agents\n\
         target/release/agents --agents {} --idle-seconds {} --runs {}\n```\n",
        args.agents, args.idle_seconds, args.runs
    );
    out
}

/// A duration as the report writes it: "5 s".
fn seconds(d: Duration) -> String {
    format!("{} s", d.as_secs_f64())
}
