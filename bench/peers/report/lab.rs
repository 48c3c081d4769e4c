//! The report of `--lab`: the comparison over a lossy, delayed link or a home uplink, and how
//! the lab treated packets.

use std::fmt::Write;
use std::time::Duration;

use super::*;

/// How the lab treated packets, for the report of `--lab`.
pub struct LabSetup {
    /// Added each way.
    pub delay: Duration,
    /// Percent, each way.
    pub loss: f64,
    /// The bottleneck, each way: Mbit/s and the packets its queue holds.
    pub bottleneck: Option<(f64, usize)>,
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
    let _ = match setup.bottleneck {
        None => writeln!(
            out,
            "# tether against its peers over a lossy, delayed link\n"
        ),
        Some((rate, limit)) => writeln!(
            out,
            "# tether against its peers over a home uplink: {rate} Mbit/s, a queue of {limit} \
             packets, {delay_ms} ms each way\n"
        ),
    };
    let bottleneck = match setup.bottleneck {
        None => String::new(),
        Some((rate, limit)) => format!(
            " Before the delay, packets went through a bottleneck of {rate} Mbit/s each way, \
             one after the other, with up to {limit} waiting in a first-in, first-out queue and \
             one more dropped (as a home router's uplink does): a full queue adds {:.0} ms.",
            limit as f64 * 1500.0 * 8.0 / (rate * 1e3)
        ),
    };
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
         loses a packet either way with a chance of about {:.1}%.{bottleneck} The links carry \
         1,500-byte packets, handed on one at a time. The systems took turns within each run; \
         each figure is the median over the runs. Ratios are tether's figure over the peer's.\n",
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
         kernel's, for the peers' TCP and tether's TCP path; tether's QUIC over UDP uses BBR of \
         its own)"
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

    let targets = match setup.bottleneck {
        None => lossy_targets(figures, setup),
        Some(_) => uplink_targets(figures),
    };
    section(&mut out, "Targets");
    table(
        &mut out,
        Columns::Text,
        &["target", "measured", ""],
        targets,
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

/// "tether ÷ rathole (Noise)" for `metric`: the ratio, and both figures.
fn against_rathole(figures: &Figures, metric: Metric, unit: &str) -> (Option<f64>, String) {
    let (tether, rathole) = (System::Tether, System::RatholeNoise);
    let figure = |system| match unit {
        "ms" => cell(figures.median(metric, system).map(|us| us / 1e3), 1),
        _ => cell(figures.median(metric, system), 1),
    };
    let ratio = figures.ratio(metric, rathole);
    let text = format!(
        "{} ({} {unit}, rathole {})",
        ratio_cell(ratio),
        figure(tether),
        figure(rathole)
    );
    (ratio, text)
}

/// A target row: what, the measured ratio and figures, met or not.
fn target(what: String, (ratio, text): (Option<f64>, String), met: fn(f64) -> bool) -> Vec<String> {
    vec![what, text, verdict(ratio.map(met)).to_owned()]
}

/// Over the lossy link: tether's throughput no worse than rathole's, interactive traffic
/// beside a bulk transfer far better; the TCP path's throughput no worse than rathole's.
fn lossy_targets(figures: &Figures, setup: &LabSetup) -> Vec<Vec<String>> {
    let link = format!(
        "{}% loss, {} ms each way",
        setup.loss,
        setup.delay.as_millis()
    );
    let mut targets = vec![
        target(
            format!("1 stream ≥ 1.0× rathole (Noise), {link}"),
            against_rathole(figures, Metric::Tcp1, "Mbit/s"),
            |r| r >= 1.0,
        ),
        target(
            "the bulk transfer beside the probe ≥ 1.0× rathole (Noise)".into(),
            against_rathole(figures, Metric::LoadedBulk, "Mbit/s"),
            |r| r >= 1.0,
        ),
        target(
            "interactive p99 beside a bulk transfer ≤ 0.5× rathole (Noise)".into(),
            against_rathole(figures, Metric::LoadedRoundTripP99, "ms"),
            |r| r <= 0.5,
        ),
    ];
    let tcp_path = System::TetherTcp;
    let rathole = figures.median(Metric::Tcp1, System::RatholeNoise);
    if let Some((tcp, rathole)) = figures.median(Metric::Tcp1, tcp_path).zip(rathole) {
        let text = format!(
            "{} ({tcp:.1} Mbit/s, rathole {rathole:.1})",
            ratio_cell(Some(tcp / rathole))
        );
        targets.push(target(
            "TCP path: 1 stream no worse than rathole (Noise)".into(),
            (Some(tcp / rathole), text),
            |r| r >= 1.0,
        ));
    }
    targets
}

/// Over the home uplink: nearly rathole's throughput, and interactive traffic beside a bulk
/// transfer that does not wait behind the bottleneck's full queue.
fn uplink_targets(figures: &Figures) -> Vec<Vec<String>> {
    vec![
        target(
            "1 stream ≥ 0.9× rathole (Noise)".into(),
            against_rathole(figures, Metric::Tcp1, "Mbit/s"),
            |r| r >= 0.9,
        ),
        target(
            "interactive p50 beside a bulk transfer ≤ 0.5× rathole (Noise)".into(),
            against_rathole(figures, Metric::LoadedRoundTripP50, "ms"),
            |r| r <= 0.5,
        ),
        target(
            "interactive p99 beside it ≤ 0.5× rathole (Noise)".into(),
            against_rathole(figures, Metric::LoadedRoundTripP99, "ms"),
            |r| r <= 0.5,
        ),
    ]
}
