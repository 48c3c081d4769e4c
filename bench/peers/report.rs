//! The figures of a comparison and the report made of them: medians, ratios against the peers,
//! and the targets tether is held to.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::time::Duration;

use crate::systems::{System, Tools};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Metric {
    /// Mbit/s, one TCP stream.
    Tcp1,
    /// Mbit/s, four TCP streams.
    Tcp4,
    /// CPU seconds of the tunnel's processes per GB carried, one TCP stream.
    CpuSecondsPerGb,
    /// Microseconds.
    RoundTripP50,
    RoundTripP99,
    /// The same probe beside a bulk transfer, and that transfer's Mbit/s.
    LoadedRoundTripP50,
    LoadedRoundTripP99,
    LoadedBulk,
    /// Microseconds from a new connection's attempt to its first answered byte.
    FirstByteP50,
    FirstByteP99,
    /// At a rate in Mbit/s: the percentage lost, the jitter in ms, what arrived in Mbit/s.
    UdpLoss(u32),
    UdpJitter(u32),
    UdpReceived(u32),
    /// KiB of RSS, all the tunnel's processes: at rest, holding idle connections, and the
    /// difference per connection; and the server side alone at rest.
    RestKib,
    ServerRestKib,
    IdleKib,
    IdleKibPerConnection,
}

/// Every sample taken, by metric and system.
#[derive(Default)]
pub struct Figures {
    samples: BTreeMap<(Metric, System), Vec<f64>>,
}

impl Figures {
    pub fn add(&mut self, metric: Metric, system: System, value: f64) {
        self.samples
            .entry((metric, system))
            .or_default()
            .push(value);
    }

    /// The median of the samples of `metric` for `system`, if any.
    pub fn median(&self, metric: Metric, system: System) -> Option<f64> {
        let mut values = self.samples.get(&(metric, system))?.clone();
        if values.is_empty() {
            return None;
        }
        values.sort_by(f64::total_cmp);
        let mid = values.len() / 2;
        Some(if values.len() % 2 == 1 {
            values[mid]
        } else {
            (values[mid - 1] + values[mid]) / 2.0
        })
    }

    /// The systems measured, in the order of [`System::ALL`].
    fn systems(&self) -> Vec<System> {
        System::ALL
            .into_iter()
            .filter(|&system| self.samples.keys().any(|&(_, s)| s == system))
            .collect()
    }

    fn runs(&self) -> usize {
        self.samples.values().map(Vec::len).max().unwrap_or(0)
    }

    /// tether's median over `system`'s.
    fn ratio(&self, metric: Metric, system: System) -> Option<f64> {
        Some(self.median(metric, System::Tether)? / self.median(metric, system)?)
    }

    /// How much `system` adds to the direct path's median.
    fn added(&self, metric: Metric, system: System) -> Option<f64> {
        Some(self.median(metric, system)? - self.median(metric, System::Direct)?)
    }

    /// The rates tried, lowest first.
    fn udp_rates(&self) -> Vec<u32> {
        let mut rates: Vec<u32> = self
            .samples
            .keys()
            .filter_map(|(metric, _)| match metric {
                Metric::UdpLoss(rate) => Some(*rate),
                _ => None,
            })
            .collect();
        rates.dedup();
        rates
    }

    /// The highest rate tried at which `system`'s median loss was at most `loss` percent.
    fn best_udp_rate(&self, system: System, loss: f64) -> Option<u32> {
        self.udp_rates()
            .into_iter()
            .filter(|&rate| {
                self.median(Metric::UdpLoss(rate), system)
                    .is_some_and(|l| l <= loss)
            })
            .max()
    }
}

/// What each program says its version is, and the machine's description.
pub struct Versions {
    lines: Vec<(String, String)>,
}

pub async fn versions(tools: &Tools) -> Versions {
    let first_line = |program: &std::path::Path, args: &'static [&'static str]| {
        let program = program.to_owned();
        async move {
            match tokio::process::Command::new(&program)
                .args(args)
                .output()
                .await
            {
                Ok(out) => {
                    let text = if out.stdout.is_empty() {
                        out.stderr
                    } else {
                        out.stdout
                    };
                    String::from_utf8_lossy(&text)
                        .lines()
                        .next()
                        .unwrap_or("")
                        .trim()
                        .to_owned()
                }
                Err(error) => format!("unknown ({error})"),
            }
        }
    };
    let git = first_line(
        std::path::Path::new("git"),
        &["describe", "--always", "--dirty"],
    )
    .await;
    let date = first_line(std::path::Path::new("date"), &["-u", "+%Y-%m-%d %H:%M UTC"]).await;
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, m)| m.trim().to_owned())
        .unwrap_or_else(|| "unknown".to_owned());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let memory = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .next()
                .map(|l| l.split_whitespace().nth(1).unwrap_or("").to_owned())
        })
        .and_then(|kib| kib.parse::<u64>().ok())
        .map_or("unknown".to_owned(), |kib| format!("{} GiB", kib >> 20));
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    Versions {
        lines: vec![
            ("date".into(), date),
            (
                "machine".into(),
                format!("{model}, {cores} cores, {memory}, Linux {}", kernel.trim()),
            ),
            (
                "tether".into(),
                format!(
                    "{} (git {git})",
                    first_line(&tools.relay, &["--version"]).await
                ),
            ),
            ("rathole".into(), rathole_version(&tools.rathole).await),
            ("bore".into(), first_line(&tools.bore, &["--version"]).await),
            (
                "iperf3".into(),
                first_line(&tools.iperf3, &["--version"]).await,
            ),
        ],
    }
}

/// rathole prints its name on the first line and its version on a later one.
async fn rathole_version(rathole: &std::path::Path) -> String {
    let out = tokio::process::Command::new(rathole)
        .arg("--version")
        .output()
        .await;
    out.ok()
        .and_then(|out| {
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .find_map(|line| {
                    let version = line.trim().strip_prefix("Build Version:")?;
                    Some(format!("rathole {}", version.trim()))
                })
        })
        .unwrap_or_else(|| "rathole, version unknown".to_owned())
}

fn cell(value: Option<f64>, decimals: usize) -> String {
    value.map_or("–".to_owned(), |v| format!("{v:.decimals$}"))
}

fn ratio_cell(value: Option<f64>) -> String {
    value.map_or("–".to_owned(), |v| format!("{v:.2}×"))
}

fn verdict(met: Option<bool>) -> &'static str {
    match met {
        Some(true) => "met",
        Some(false) => "**not met**",
        None => "not measured",
    }
}

fn section(out: &mut String, title: &str) {
    let _ = writeln!(out, "\n## {title}\n");
}

/// How a table's columns after the first are aligned.
#[derive(Clone, Copy)]
enum Columns {
    /// Right-aligned, as figures read best.
    Figures,
    Text,
}

/// A Markdown table whose first column names the row.
fn table(
    out: &mut String,
    columns: Columns,
    header: &[&str],
    rows: impl IntoIterator<Item = Vec<String>>,
) {
    let _ = writeln!(out, "| {} |", header.join(" | "));
    let align = match columns {
        Columns::Figures => "---:|",
        Columns::Text => "---|",
    };
    let _ = writeln!(out, "|---|{}", align.repeat(header.len() - 1));
    for row in rows {
        let _ = writeln!(out, "| {} |", row.join(" | "));
    }
}

/// The report, in Markdown.
pub fn render(figures: &Figures, command: &str, versions: &Versions, took: Duration) -> String {
    let mut out = String::new();
    let systems = figures.systems();
    let tunnels: Vec<System> = systems.iter().copied().filter(|s| s.is_tunnel()).collect();
    let peers: Vec<System> = tunnels
        .iter()
        .copied()
        .filter(|&s| s != System::Tether)
        .collect();
    let _ = writeln!(out, "# tether against its peers\n");
    let _ = writeln!(
        out,
        "Written by `{command}` (runs: {}, {} min). Every system ran on loopback in front of the \
         same iperf3 server and TCP echo service, in turn within each run; each figure is the \
         median over the runs. Ratios are tether's figure over the peer's.\n",
        figures.runs(),
        took.as_secs() / 60
    );
    for (name, value) in &versions.lines {
        let _ = writeln!(out, "- {name}: {value}");
    }

    let median = |metric, system, decimals| cell(figures.median(metric, system), decimals);

    section(&mut out, "TCP throughput (iperf3)");
    let mut rows: Vec<Vec<String>> = systems
        .iter()
        .map(|&system| {
            vec![
                system.name().to_owned(),
                median(Metric::Tcp1, system, 0),
                median(Metric::Tcp4, system, 0),
                median(Metric::CpuSecondsPerGb, system, 2),
            ]
        })
        .collect();
    rows.extend(peers.iter().map(|&peer| {
        vec![
            format!("tether ÷ {}", peer.name()),
            ratio_cell(figures.ratio(Metric::Tcp1, peer)),
            ratio_cell(figures.ratio(Metric::Tcp4, peer)),
            ratio_cell(figures.ratio(Metric::CpuSecondsPerGb, peer)),
        ]
    }));
    table(
        &mut out,
        Columns::Figures,
        &[
            "",
            "1 stream, Mbit/s",
            "4 streams, Mbit/s",
            "CPU s per GB (1 stream)",
        ],
        rows,
    );

    section(&mut out, "64-byte request and answer, µs");
    let added = |metric, system| cell(figures.added(metric, system), 0);
    table(
        &mut out,
        Columns::Figures,
        &[
            "",
            "p50",
            "p99",
            "added p50",
            "added p99",
            "p50 beside a bulk transfer",
            "p99 beside it",
            "the bulk transfer, Mbit/s",
        ],
        systems.iter().map(|&system| {
            vec![
                system.name().to_owned(),
                median(Metric::RoundTripP50, system, 0),
                median(Metric::RoundTripP99, system, 0),
                added(Metric::RoundTripP50, system),
                added(Metric::RoundTripP99, system),
                median(Metric::LoadedRoundTripP50, system, 0),
                median(Metric::LoadedRoundTripP99, system, 0),
                median(Metric::LoadedBulk, system, 0),
            ]
        }),
    );

    section(&mut out, "A new connection's first answered byte, µs");
    table(
        &mut out,
        Columns::Figures,
        &["", "p50", "p99"],
        systems.iter().map(|&system| {
            vec![
                system.name().to_owned(),
                median(Metric::FirstByteP50, system, 0),
                median(Metric::FirstByteP99, system, 0),
            ]
        }),
    );

    section(
        &mut out,
        "UDP (iperf3 -u, 1,200-byte datagrams): received Mbit/s, loss %, jitter ms",
    );
    let udp: Vec<System> = systems
        .iter()
        .copied()
        .filter(|s| s.carries_udp())
        .collect();
    let header: Vec<&str> = std::iter::once("rate")
        .chain(udp.iter().map(|s| s.name()))
        .collect();
    table(
        &mut out,
        Columns::Figures,
        &header,
        figures.udp_rates().into_iter().map(|rate| {
            std::iter::once(format!("{rate} Mbit/s"))
                .chain(udp.iter().map(|&system| {
                    format!(
                        "{} / {}% / {}",
                        median(Metric::UdpReceived(rate), system, 0),
                        median(Metric::UdpLoss(rate), system, 2),
                        median(Metric::UdpJitter(rate), system, 3),
                    )
                }))
                .collect()
        }),
    );

    section(&mut out, "Memory (RSS of the tunnel's processes), KiB");
    table(
        &mut out,
        Columns::Figures,
        &[
            "",
            "at rest",
            "server side at rest",
            "holding idle connections",
            "per idle connection",
        ],
        tunnels.iter().map(|&system| {
            vec![
                system.name().to_owned(),
                median(Metric::RestKib, system, 0),
                median(Metric::ServerRestKib, system, 0),
                median(Metric::IdleKib, system, 0),
                median(Metric::IdleKibPerConnection, system, 2),
            ]
        }),
    );

    render_targets(figures, &mut out);
    out
}

/// The targets of tether's performance issue, each against what this run measured.
fn render_targets(figures: &Figures, out: &mut String) {
    let rathole = System::RatholeNoise;
    let tether = System::Tether;
    let mut rows: Vec<(String, String, Option<bool>)> = Vec::new();
    let tcp = figures.ratio(Metric::Tcp1, rathole);
    let tcp4 = figures.ratio(Metric::Tcp4, rathole);
    rows.push((
        "TCP throughput ≥ 1.0× rathole (Noise)".into(),
        format!(
            "1 stream {}, 4 streams {}",
            ratio_cell(tcp),
            ratio_cell(tcp4)
        ),
        tcp.zip(tcp4).map(|(a, b)| a >= 1.0 && b >= 1.0),
    ));
    let (p50, p99) = (
        figures.added(Metric::RoundTripP50, tether),
        figures.added(Metric::RoundTripP99, tether),
    );
    let (r50, r99) = (
        figures.added(Metric::RoundTripP50, rathole),
        figures.added(Metric::RoundTripP99, rathole),
    );
    rows.push((
        "added p50 ≤ 150 µs, p99 ≤ 500 µs, neither worse than rathole's".into(),
        format!(
            "p50 {} µs (rathole {}), p99 {} µs (rathole {})",
            cell(p50, 0),
            cell(r50, 0),
            cell(p99, 0),
            cell(r99, 0)
        ),
        match (p50, p99, r50, r99) {
            (Some(p50), Some(p99), Some(r50), Some(r99)) => {
                Some(p50 <= 150.0 && p99 <= 500.0 && p50 <= r50 && p99 <= r99)
            }
            _ => None,
        },
    ));
    let (first, rathole_first) = (
        figures.median(Metric::FirstByteP50, tether),
        figures.median(Metric::FirstByteP50, rathole),
    );
    rows.push((
        "new connection's first byte no later than rathole's".into(),
        format!(
            "p50 {} µs (rathole {})",
            cell(first, 0),
            cell(rathole_first, 0)
        ),
        first.zip(rathole_first).map(|(t, r)| t <= r),
    ));
    let (per, rathole_per) = (
        figures.median(Metric::IdleKibPerConnection, tether),
        figures.median(Metric::IdleKibPerConnection, rathole),
    );
    rows.push((
        "an idle connection ≤ 16 KiB, ≤ 0.5× rathole's".into(),
        format!("{} KiB (rathole {})", cell(per, 2), cell(rathole_per, 2)),
        per.zip(rathole_per).map(|(t, r)| t <= 16.0 && t <= 0.5 * r),
    ));
    let loss_200 = figures.median(Metric::UdpLoss(200), tether);
    rows.push((
        "UDP at 200 Mbit/s with ≤ 1% loss".into(),
        format!("{}% lost", cell(loss_200, 2)),
        loss_200.map(|l| l <= 1.0),
    ));
    let (best, rathole_best) = (
        figures.best_udp_rate(tether, 1.0),
        figures.best_udp_rate(rathole, 1.0),
    );
    rows.push((
        "UDP ≥ 2× rathole's rate at ≤ 1% loss".into(),
        format!(
            "{} Mbit/s (rathole {}), of the rates tried",
            best.map_or("none".to_owned(), |b| b.to_string()),
            rathole_best.map_or("none".to_owned(), |b| b.to_string())
        ),
        match (best, rathole_best) {
            // rathole lost nothing even at the highest rate tried: its limit was not found.
            (_, Some(r)) if Some(r) == figures.udp_rates().last().copied() => None,
            (Some(t), Some(r)) => Some(t >= 2 * r),
            (Some(_), None) => Some(true),
            (None, _) => Some(false),
        },
    ));
    let relay_rest = figures.median(Metric::ServerRestKib, tether);
    rows.push((
        "relay at rest ≤ 10 MiB".into(),
        format!("{} KiB", cell(relay_rest, 0)),
        relay_rest.map(|k| k <= 10.0 * 1024.0),
    ));
    section(out, "Targets");
    table(
        out,
        Columns::Text,
        &["target", "measured", ""],
        rows.into_iter()
            .map(|(target, measured, met)| vec![target, measured, verdict(met).to_owned()]),
    );
}

/// How the lab treated packets, for the report of `--lab`.
pub struct LabSetup {
    /// Added each way.
    pub delay: Duration,
    /// Percent, each way.
    pub loss: f64,
    /// Packets the delayer's queue could not take over the whole comparison, and whether the
    /// delayer still ran at its end.
    pub delayer: (u64, bool),
    /// TCP's congestion control, VPS side and home side.
    pub congestion_control: (String, String),
}

/// The report of `--lab`, in Markdown.
pub fn render_lab(
    figures: &Figures,
    command: &str,
    versions: &Versions,
    took: Duration,
    setup: &LabSetup,
) -> String {
    let mut out = String::new();
    let systems = figures.systems();
    let peers: Vec<System> = systems
        .iter()
        .copied()
        .filter(|&s| s.is_tunnel() && s != System::Tether)
        .collect();
    let delay_ms = setup.delay.as_millis();
    let _ = writeln!(
        out,
        "# tether against its peers over a lossy, delayed link\n"
    );
    let _ = writeln!(
        out,
        "Written by `{command}` (runs: {}, {} min). The home side of each system (tether's agent, \
         rathole's client, bore's clients) ran in a network namespace of its own beside an \
         iperf3 server and a TCP echo service; the VPS side (tether's relay, rathole's and \
         bore's servers) and the probes and iperf3's client ran in the root namespace, reaching \
         the services through the tunnel's public ports on loopback (direct: across the link, \
         with no tunnel). Every packet between the sides, TCP and UDP alike, crossed a third \
         namespace that dropped it with a chance of {}% (iptables -m statistic) and else held it \
         {delay_ms} ms (NFQUEUE, `lab-delay`), in each direction: a round trip gains {} ms and \
         loses a packet either way with a chance of about {:.1}%. The links carry 1,500-byte \
         packets, handed on one at a time. The systems took turns within each run; each figure \
         is the median over the runs. Ratios are tether's figure over the peer's.\n",
        figures.runs(),
        took.as_secs() / 60,
        setup.loss,
        2 * delay_ms,
        100.0 * (1.0 - (1.0 - setup.loss / 100.0).powi(2)),
    );
    let (dropped, running) = setup.delayer;
    let _ = writeln!(
        out,
        "The delayer itself dropped {dropped} packets (its kernel queue full or not handed \
         over){}.\n",
        if running {
            ""
        } else {
            "; **it had stopped by the end**"
        }
    );
    for (name, value) in &versions.lines {
        let _ = writeln!(out, "- {name}: {value}");
    }
    let (vps, home) = &setup.congestion_control;
    let _ = writeln!(
        out,
        "- TCP congestion control: {vps} on the VPS side, {home} on the home side (the \
         kernel's, for the peers' TCP; tether's QUIC uses BBR of its own)"
    );

    section(
        &mut out,
        "TCP throughput (iperf3, 1 stream) and a 64-byte request and answer, ms",
    );
    let median = |metric, system, decimals| cell(figures.median(metric, system), decimals);
    let ms = |metric, system| cell(figures.median(metric, system).map(|us| us / 1e3), 1);
    let mut rows: Vec<Vec<String>> = systems
        .iter()
        .map(|&system| {
            vec![
                system.name().to_owned(),
                median(Metric::Tcp1, system, 1),
                ms(Metric::RoundTripP50, system),
                ms(Metric::RoundTripP99, system),
                ms(Metric::LoadedRoundTripP50, system),
                ms(Metric::LoadedRoundTripP99, system),
                median(Metric::LoadedBulk, system, 1),
            ]
        })
        .collect();
    rows.extend(peers.iter().map(|&peer| {
        std::iter::once(format!("tether ÷ {}", peer.name()))
            .chain(
                [
                    Metric::Tcp1,
                    Metric::RoundTripP50,
                    Metric::RoundTripP99,
                    Metric::LoadedRoundTripP50,
                    Metric::LoadedRoundTripP99,
                    Metric::LoadedBulk,
                ]
                .map(|metric| ratio_cell(figures.ratio(metric, peer))),
            )
            .collect()
    }));
    table(
        &mut out,
        Columns::Figures,
        &[
            "",
            "1 stream, Mbit/s",
            "p50",
            "p99",
            "p50 beside a bulk transfer",
            "p99 beside it",
            "the bulk transfer, Mbit/s",
        ],
        rows,
    );

    let p99 = figures.ratio(Metric::LoadedRoundTripP99, System::RatholeNoise);
    section(&mut out, "Targets");
    table(
        &mut out,
        Columns::Text,
        &["target", "measured", ""],
        [vec![
            format!(
                "interactive p99 beside a bulk transfer ≤ 0.5× rathole (Noise), {}% loss, \
                 {delay_ms} ms each way",
                setup.loss
            ),
            format!(
                "{} ({} ms, rathole {} ms)",
                ratio_cell(p99),
                ms(Metric::LoadedRoundTripP99, System::Tether),
                ms(Metric::LoadedRoundTripP99, System::RatholeNoise)
            ),
            verdict(p99.map(|r| r <= 0.5)).to_owned(),
        ]],
    );
    // A probe beside a bulk transfer that hardly moves waits behind little: say how much moved.
    if let Some(bulk) = figures.ratio(Metric::LoadedBulk, System::RatholeNoise) {
        let _ = writeln!(
            out,
            "\nThe bulk transfer beside tether's probe carried {} of rathole's (Noise).",
            ratio_cell(Some(bulk))
        );
    }
    out
}
