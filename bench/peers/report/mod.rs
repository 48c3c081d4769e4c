//! The figures of a comparison and the reports made of them: medians, ratios against the peers,
//! and the targets tether is held to. The loopback comparison's report is in `loopback`, the
//! lossy lab's in `lab`; the Markdown helpers they share are here.

use std::collections::BTreeMap;
use std::fmt::Write;

mod lab;
mod loopback;

pub use lab::{render_lab, LabSetup};
pub use loopback::render;

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
