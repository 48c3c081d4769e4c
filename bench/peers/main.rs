//! tether against its peers, side by side on loopback in one run: rathole with Noise and with
//! plain TCP, bore, and the services reached directly. Each run starts every system in turn in
//! front of the same iperf3 server and TCP echo service and measures:
//!
//! - TCP throughput, one stream and four (iperf3), and the CPU seconds per GB it took;
//! - the round trip of a 64-byte request and its answer, p50 and p99, alone and beside a bulk
//!   transfer on the same tunnel;
//! - a new connection's time to its first answered byte;
//! - UDP at fixed rates (iperf3 -u): what arrived, the loss and the jitter;
//! - the memory (RSS) of the tunnel's processes at rest and holding idle connections.
//!
//! The systems take turns within each run, in a different order each time, and each figure is
//! the median over the runs. The results go to `bench/RESULTS.md`. `bench/run` builds tether,
//! installs the peers and runs this.

mod probes;
mod report;
mod systems;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::{Parser, ValueEnum};

use probes::{cpu_seconds, quantile, rss_kib, total, Echo};
use report::{Figures, Metric};
use systems::{Running, Services, System, Tools};

#[derive(Parser, Debug)]
#[command(about = "tether against rathole and bore on loopback; writes RESULTS.md")]
struct Args {
    /// Runs of everything; each figure is their median.
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Length of each iperf3 test, in seconds.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Idle connections held for the memory figure.
    #[arg(long, default_value_t = 1000)]
    idle: usize,
    /// UDP rates tried, in Mbit/s.
    #[arg(long, value_delimiter = ',', default_value = "100,200,400,800")]
    udp_rates: Vec<u32>,
    /// The systems compared; the report's ratios need tether, rathole-noise and direct.
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = System::ALL)]
    systems: Vec<System>,
    /// Where the report goes.
    #[arg(long, default_value = "bench/RESULTS.md")]
    out: PathBuf,
    /// Where each system keeps its configs and logs.
    #[arg(long, default_value = "target/bench-peers")]
    work: PathBuf,
    #[arg(long, default_value = "target/release/tether-relay")]
    relay: PathBuf,
    #[arg(long, default_value = "target/release/tether-agent")]
    agent: PathBuf,
    #[arg(long, default_value = "rathole")]
    rathole: PathBuf,
    #[arg(long, default_value = "bore")]
    bore: PathBuf,
    #[arg(long, default_value = "iperf3")]
    iperf3: PathBuf,
}

/// Round trips in the request/response probe.
const ROUND_TRIPS: usize = 5000;
/// New connections timed to their first byte.
const FIRST_BYTES: usize = 300;
/// The payload of each UDP datagram, about what mosh sends at most.
const UDP_PAYLOAD: &str = "1200";

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    // Each system runs in a directory of its own: paths given relative to here are made whole.
    let tools = Tools {
        relay: absolute(&args.relay)?,
        agent: absolute(&args.agent)?,
        rathole: absolute(&args.rathole)?,
        bore: absolute(&args.bore)?,
        iperf3: absolute(&args.iperf3)?,
    };
    std::fs::create_dir_all(&args.work)?;
    let work = std::fs::canonicalize(&args.work)?;
    let ticks = ticks_per_second().await?;
    let echo = Echo::start().await?;
    let (_iperf_server, iperf) = probes::iperf3_server(&tools.iperf3).await?;
    let services = Services {
        iperf,
        echo: echo.port,
    };
    let started = Instant::now();
    let mut figures = Figures::default();
    for run in 0..args.runs {
        // A different order each run, so that no system always follows the same one.
        let mut order = args.systems.clone();
        let turn = run % order.len().max(1);
        order.rotate_left(turn);
        for system in order {
            eprintln!("run {} of {}: {}", run + 1, args.runs, system.name());
            let dir = work.join(format!("run{run}-{system:?}"));
            let _ = std::fs::remove_dir_all(&dir);
            let running = systems::start(system, &tools, services, &dir).await?;
            let measured = measure(&args, &tools, &running, ticks, &mut figures).await;
            running.stop().await;
            measured.with_context(|| format!("measuring {}", system.name()))?;
        }
    }
    let versions = report::versions(&tools).await;
    let text = report::render(&figures, &args_line(&args), &versions, started.elapsed());
    std::fs::write(&args.out, text).with_context(|| format!("writing {}", args.out.display()))?;
    eprintln!("wrote {}", args.out.display());
    Ok(())
}

/// Everything measured of one running system, in one run.
async fn measure(
    args: &Args,
    tools: &Tools,
    running: &Running,
    ticks: f64,
    figures: &mut Figures,
) -> Result<()> {
    let system = running.system;
    let pids = running.pids();
    let echo_address = running.echo();
    let micros = |d: Duration| d.as_secs_f64() * 1e6;

    if system.is_tunnel() {
        let rest = total(&pids, |pid| Ok(rss_kib(pid)? as f64))?;
        figures.add(Metric::RestKib, system, rest);
        figures.add(Metric::ServerRestKib, system, rss_kib(pids[0])? as f64);
        let held = probes::idle_connections(echo_address, args.idle).await?;
        // Let the processes settle what the connections' set-up left behind.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let with_idle = total(&pids, |pid| Ok(rss_kib(pid)? as f64))?;
        figures.add(Metric::IdleKib, system, with_idle);
        figures.add(
            Metric::IdleKibPerConnection,
            system,
            (with_idle - rest) / args.idle as f64,
        );
        drop(held);
    }

    let mut trips = probes::round_trips(echo_address, ROUND_TRIPS, None).await?;
    figures.add(
        Metric::RoundTripP50,
        system,
        micros(quantile(&mut trips, 0.5)),
    );
    figures.add(
        Metric::RoundTripP99,
        system,
        micros(quantile(&mut trips, 0.99)),
    );

    let mut firsts = probes::first_bytes(echo_address, FIRST_BYTES).await?;
    figures.add(
        Metric::FirstByteP50,
        system,
        micros(quantile(&mut firsts, 0.5)),
    );
    figures.add(
        Metric::FirstByteP99,
        system,
        micros(quantile(&mut firsts, 0.99)),
    );

    for (streams, metric) in [("1", Metric::Tcp1), ("4", Metric::Tcp4)] {
        let cpu_before = total(&pids, |pid| cpu_seconds(pid, ticks))?;
        let result =
            probes::iperf3(&tools.iperf3, running.iperf, args.seconds, &["-P", streams]).await?;
        let cpu = total(&pids, |pid| cpu_seconds(pid, ticks))? - cpu_before;
        figures.add(metric, system, result.mbps);
        if streams == "1" && system.is_tunnel() {
            figures.add(Metric::CpuSecondsPerGb, system, cpu / (result.bytes / 1e9));
        }
    }

    // An interactive connection beside a bulk transfer through the same tunnel.
    let bulk = {
        let iperf3 = tools.iperf3.clone();
        let (port, seconds) = (running.iperf, args.seconds);
        tokio::spawn(async move { probes::iperf3(&iperf3, port, seconds, &[]).await })
    };
    // The bulk transfer's first second is its ramp: the probe starts after it.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let until = Instant::now() + Duration::from_secs(args.seconds.saturating_sub(2).max(1));
    let mut trips = probes::round_trips(echo_address, ROUND_TRIPS, Some(until)).await?;
    let bulk = bulk.await??;
    figures.add(
        Metric::LoadedRoundTripP50,
        system,
        micros(quantile(&mut trips, 0.5)),
    );
    figures.add(
        Metric::LoadedRoundTripP99,
        system,
        micros(quantile(&mut trips, 0.99)),
    );
    figures.add(Metric::LoadedBulk, system, bulk.mbps);

    if system.carries_udp() {
        for &rate in &args.udp_rates {
            let bandwidth = format!("{rate}M");
            let seconds = (args.seconds / 2).max(1);
            let extra = ["-u", "-b", &bandwidth, "-l", UDP_PAYLOAD];
            let result = probes::iperf3(&tools.iperf3, running.iperf, seconds, &extra).await?;
            figures.add(Metric::UdpLoss(rate), system, result.lost_percent);
            figures.add(Metric::UdpJitter(rate), system, result.jitter_ms);
            figures.add(Metric::UdpReceived(rate), system, result.mbps);
        }
    }
    Ok(())
}

/// The command line that reproduces this run.
fn args_line(args: &Args) -> String {
    let rates: Vec<String> = args.udp_rates.iter().map(u32::to_string).collect();
    let mut line = format!(
        "bench/run --runs {} --seconds {} --idle {} --udp-rates {}",
        args.runs,
        args.seconds,
        args.idle,
        rates.join(",")
    );
    if args.systems != System::ALL {
        let names: Vec<String> = args
            .systems
            .iter()
            .filter_map(|s| Some(s.to_possible_value()?.get_name().to_owned()))
            .collect();
        line += &format!(" --systems {}", names.join(","));
    }
    line
}

/// `path` made whole if it names a file by a relative path; a bare name is looked up in PATH.
fn absolute(path: &Path) -> Result<PathBuf> {
    if path.components().count() > 1 && path.is_relative() {
        std::fs::canonicalize(path).with_context(|| format!("no {}", path.display()))
    } else {
        Ok(path.to_owned())
    }
}

/// The kernel's clock ticks per second, in which /proc counts CPU time.
async fn ticks_per_second() -> Result<f64> {
    let out = tokio::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .await
        .context("getconf CLK_TCK")?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().parse()?)
}
