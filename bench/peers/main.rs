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
//! the median over the runs. `bench/run` builds tether, installs the peers, runs this on
//! loopback and over the lab, and puts the reports into `bench/RESULTS.md`.
//!
//! With `--lab`, the home side (agent or client, iperf3's server, the echo service) runs in a
//! network namespace of its own, and every packet between it and the VPS side here is delayed
//! and may be lost (lab.rs). Measured there: TCP throughput, one stream, and the request and
//! answer alone and beside a bulk transfer.

mod lab;
mod probes;
#[path = "../procfs.rs"]
mod procfs;
mod report;
mod systems;

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Parser, ValueEnum};

use probes::{quantile, total, Echo};
use procfs::{cpu_seconds, rss_kib, ticks_per_second};
use report::{Figures, Metric};
use systems::{Running, Services, System, Tools};

#[derive(Parser, Debug)]
#[command(
    about = "tether against rathole and bore on loopback, or over a lossy, delayed \
                   link (--lab); writes a Markdown report"
)]
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
    /// Default: all; with --lab, direct, tether and rathole-noise.
    #[arg(long, value_enum, value_delimiter = ',')]
    systems: Option<Vec<System>>,
    /// Over the lab: the home side in a network namespace of its own, every packet between it
    /// and the VPS side delayed and perhaps lost. Needs root.
    #[arg(long)]
    lab: bool,
    /// With --lab: the delay added to each packet, each way, in ms; a round trip gains twice
    /// this.
    #[arg(long, default_value_t = 20)]
    delay_ms: u64,
    /// With --lab: the chance that a packet is lost, in percent, each way.
    #[arg(long, default_value_t = 2.0)]
    loss: f64,
    /// With --lab: a bottleneck of this many Mbit/s each way, before the delay (a home uplink).
    #[arg(long)]
    rate_mbit: Option<f64>,
    /// With --rate-mbit: the packets that may wait in the bottleneck's queue.
    #[arg(long, default_value_t = 1000)]
    queue_packets: usize,
    /// Where the report goes. Default: target/bench-results/loopback.md, or lab.md with --lab;
    /// bench/run puts them together into bench/RESULTS.md.
    #[arg(long)]
    out: Option<PathBuf>,
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
    /// Serve only the TCP echo service at this address, until killed: how --lab runs it in the
    /// home namespace.
    #[arg(long, hide = true)]
    echo_service: Option<SocketAddr>,
}

impl Args {
    fn systems(&self) -> Vec<System> {
        match (&self.systems, self.lab) {
            (Some(systems), _) => systems.clone(),
            (None, false) => System::ALL.to_vec(),
            (None, true) => vec![
                System::Direct,
                System::Tether,
                System::TetherTcp,
                System::RatholeNoise,
            ],
        }
    }

    fn out(&self) -> PathBuf {
        match (&self.out, self.lab) {
            (Some(out), _) => out.clone(),
            (None, false) => "target/bench-results/loopback.md".into(),
            (None, true) => "target/bench-results/lab.md".into(),
        }
    }
}

/// Round trips in the request/response probe, on loopback, after a tenth as many to warm up.
const ROUND_TRIPS: usize = 5000;
/// Round trips to warm up where the probe runs for a time rather than a count (over the lab, and
/// beside a bulk transfer, whose own ramp it waits out first).
const TIMED_WARM_UP: usize = 10;
/// New connections timed to their first byte.
const FIRST_BYTES: usize = 300;
/// The payload of each UDP datagram, about what mosh sends at most.
const UDP_PAYLOAD: &str = "1200";

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    if let Some(address) = args.echo_service {
        Echo::start(address).await?;
        return std::future::pending().await;
    }
    // Dropping the run on a signal removes the lab and stops what it started.
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        result = compare(args) => result,
        _ = tokio::signal::ctrl_c() => bail!("interrupted"),
        _ = terminate.recv() => bail!("terminated"),
    }
}

async fn compare(args: Args) -> Result<()> {
    if args.lab && !(0.0..=100.0).contains(&args.loss) {
        bail!("--loss is a percentage, 0 to 100: {}", args.loss);
    }
    if let Some(rate) = args.rate_mbit {
        if !(rate > 0.0 && rate.is_finite() && args.lab) {
            bail!("--rate-mbit needs --lab and a rate above 0: {rate}");
        }
    }
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
    let (services, mut place) = if args.lab {
        lab_services(&args, &tools).await?
    } else {
        loopback_services(&tools).await?
    };
    let started = Instant::now();
    let mut figures = Figures::default();
    let systems = args.systems();
    for run in 0..args.runs {
        // A different order each run, so that no system always follows the same one.
        let mut order = systems.clone();
        let turn = run % order.len().max(1);
        order.rotate_left(turn);
        for system in order {
            eprintln!("run {} of {}: {}", run + 1, args.runs, system.name());
            let dir = work.join(format!("run{run}-{system:?}"));
            let _ = std::fs::remove_dir_all(&dir);
            let running = systems::start(system, &tools, &services, &dir).await?;
            let measured = if args.lab {
                measure_lab(&args, &tools, &running, &mut figures).await
            } else {
                measure(&args, &tools, &running, ticks, &mut figures).await
            };
            running.stop().await;
            measured.with_context(|| format!("measuring {}", system.name()))?;
        }
    }
    let versions = report::versions(&tools).await;
    let text = match &mut place {
        Place::Lab(lab) => {
            let setup = report::LabSetup {
                delay: lab.link.delay,
                loss: lab.link.loss,
                bottleneck: lab.link.bottleneck,
                delayer: lab.delayer_drops()?,
                congestion_control: lab.congestion_control()?,
            };
            report::render_lab(
                &figures,
                &args_line(&args),
                &versions,
                started.elapsed(),
                &setup,
            )
        }
        Place::Loopback { .. } => {
            report::render(&figures, &args_line(&args), &versions, started.elapsed())
        }
    };
    let out = args.out();
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(&out, text).with_context(|| format!("writing {}", out.display()))?;
    eprintln!("wrote {}", out.display());
    Ok(())
}

/// Where the services run, kept alive for the whole comparison.
enum Place {
    /// In this process (the echo service) and a child (iperf3's server), on loopback.
    Loopback {
        _iperf_server: tokio::process::Child,
    },
    Lab(Box<lab::Lab>),
}

async fn loopback_services(tools: &Tools) -> Result<(Services, Place)> {
    let echo = Echo::start(SocketAddr::from((Ipv4Addr::LOCALHOST, 0))).await?;
    let (iperf_server, iperf) = probes::iperf3_server(&tools.iperf3).await?;
    let services = Services {
        iperf,
        echo: echo.port,
        host: Ipv4Addr::LOCALHOST,
        home: None,
        vps: Ipv4Addr::LOCALHOST,
    };
    Ok((
        services,
        Place::Loopback {
            _iperf_server: iperf_server,
        },
    ))
}

/// Builds the lab and starts the services in its home namespace.
async fn lab_services(args: &Args, tools: &Tools) -> Result<(Services, Place)> {
    let this = std::env::current_exe().context("finding this program")?;
    let delayer = this.with_file_name("lab-delay");
    if !delayer.exists() {
        bail!(
            "no {}: cargo build --release -p tether-bench --bin lab-delay",
            delayer.display()
        );
    }
    let link = lab::Link {
        delay: Duration::from_millis(args.delay_ms),
        loss: args.loss,
        bottleneck: args.rate_mbit.map(|rate| (rate, args.queue_packets)),
    };
    let mut lab = lab::Lab::build(link, &delayer)
        .await
        .context("building the lab (needs root, ip, iptables)")?;
    let (iperf, echo) = (systems::free_port()?, systems::free_port()?);
    lab.start_services(&tools.iperf3, &this, iperf, echo)
        .await?;
    let services = Services {
        iperf,
        echo,
        host: lab.home_address,
        home: Some(lab.home().to_owned()),
        vps: lab.vps,
    };
    Ok((services, Place::Lab(Box::new(lab))))
}

/// What is measured over the lab, in one run: TCP throughput, one stream, and the request and
/// answer alone and beside a bulk transfer. Each round-trip probe runs for `--seconds`.
async fn measure_lab(
    args: &Args,
    tools: &Tools,
    running: &Running,
    figures: &mut Figures,
) -> Result<()> {
    let system = running.system;
    let until = Instant::now() + Duration::from_secs(args.seconds);
    let mut trips =
        probes::round_trips(running.echo(), usize::MAX, TIMED_WARM_UP, Some(until)).await?;
    add_p50_p99(
        figures,
        (Metric::RoundTripP50, Metric::RoundTripP99),
        system,
        &mut trips,
    );
    let result = probes::iperf3(&tools.iperf3, running.iperf(), args.seconds, &[]).await?;
    figures.add(Metric::Tcp1, system, result.mbps);
    // iperf3's server takes a few round trips to finish a test, and turns the next away until
    // it has.
    tokio::time::sleep(Duration::from_secs(2)).await;
    loaded(args, tools, running, TIMED_WARM_UP, figures).await
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

    if system.is_tunnel() {
        let rest = total(&pids, rss_kib)?;
        figures.add(Metric::RestKib, system, rest);
        figures.add(Metric::ServerRestKib, system, rss_kib(pids[0])?);
        let held = probes::idle_connections(echo_address, args.idle).await?;
        // Let the processes settle what the connections' set-up left behind.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let with_idle = total(&pids, rss_kib)?;
        figures.add(Metric::IdleKib, system, with_idle);
        figures.add(
            Metric::IdleKibPerConnection,
            system,
            (with_idle - rest) / args.idle as f64,
        );
        drop(held);
    }

    let mut trips = probes::round_trips(echo_address, ROUND_TRIPS, ROUND_TRIPS / 10, None).await?;
    add_p50_p99(
        figures,
        (Metric::RoundTripP50, Metric::RoundTripP99),
        system,
        &mut trips,
    );

    let mut firsts = probes::first_bytes(echo_address, FIRST_BYTES).await?;
    add_p50_p99(
        figures,
        (Metric::FirstByteP50, Metric::FirstByteP99),
        system,
        &mut firsts,
    );

    for (streams, metric) in [("1", Metric::Tcp1), ("4", Metric::Tcp4)] {
        let cpu_before = total(&pids, |pid| cpu_seconds(pid, ticks))?;
        let result = probes::iperf3(
            &tools.iperf3,
            running.iperf(),
            args.seconds,
            &["-P", streams],
        )
        .await?;
        let cpu = total(&pids, |pid| cpu_seconds(pid, ticks))? - cpu_before;
        figures.add(metric, system, result.mbps);
        if streams == "1" && system.is_tunnel() {
            figures.add(Metric::CpuSecondsPerGb, system, cpu / (result.bytes / 1e9));
        }
    }

    loaded(args, tools, running, TIMED_WARM_UP, figures).await?;

    if system.carries_udp() {
        for &rate in &args.udp_rates {
            let bandwidth = format!("{rate}M");
            let seconds = (args.seconds / 2).max(1);
            let extra = ["-u", "-b", &bandwidth, "-l", UDP_PAYLOAD];
            let result = probes::iperf3(&tools.iperf3, running.iperf(), seconds, &extra).await?;
            figures.add(Metric::UdpLoss(rate), system, result.lost_percent);
            figures.add(Metric::UdpJitter(rate), system, result.jitter_ms);
            figures.add(Metric::UdpReceived(rate), system, result.mbps);
        }
    }
    Ok(())
}

/// The request and answer on an interactive connection beside a bulk transfer through the
/// same tunnel, after `warm_up` round trips; and that transfer's Mbit/s.
async fn loaded(
    args: &Args,
    tools: &Tools,
    running: &Running,
    warm_up: usize,
    figures: &mut Figures,
) -> Result<()> {
    let system = running.system;
    let bulk = {
        let iperf3 = tools.iperf3.clone();
        let (server, seconds) = (running.iperf(), args.seconds);
        tokio::spawn(async move { probes::iperf3(&iperf3, server, seconds, &[]).await })
    };
    // The bulk transfer's first second is its ramp: the probe starts after it.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let until = Instant::now() + Duration::from_secs(args.seconds.saturating_sub(2).max(1));
    let mut trips = probes::round_trips(running.echo(), ROUND_TRIPS, warm_up, Some(until)).await?;
    let bulk = bulk.await??;
    add_p50_p99(
        figures,
        (Metric::LoadedRoundTripP50, Metric::LoadedRoundTripP99),
        system,
        &mut trips,
    );
    figures.add(Metric::LoadedBulk, system, bulk.mbps);
    Ok(())
}

/// The median and the 99th percentile of `times`, in µs, as the two metrics of `system`.
fn add_p50_p99(
    figures: &mut Figures,
    (p50, p99): (Metric, Metric),
    system: System,
    times: &mut [Duration],
) {
    let micros = |d: Duration| d.as_secs_f64() * 1e6;
    figures.add(p50, system, micros(quantile(times, 0.5)));
    figures.add(p99, system, micros(quantile(times, 0.99)));
}

/// The command line that reproduces this run.
fn args_line(args: &Args) -> String {
    let mut line = if args.lab {
        format!(
            "target/release/peers --lab --delay-ms {} --loss {} --runs {} --seconds {}",
            args.delay_ms, args.loss, args.runs, args.seconds
        )
    } else {
        let rates: Vec<String> = args.udp_rates.iter().map(u32::to_string).collect();
        format!(
            "target/release/peers --runs {} --seconds {} --idle {} --udp-rates {}",
            args.runs,
            args.seconds,
            args.idle,
            rates.join(",")
        )
    };
    if let (true, Some(rate)) = (args.lab, args.rate_mbit) {
        line += &format!(" --rate-mbit {rate} --queue-packets {}", args.queue_packets);
    }
    if args.systems.is_some() {
        let names: Vec<String> = args
            .systems()
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
