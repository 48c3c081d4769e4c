//! The report of `--lab`: the comparison over a lossy, delayed link, and how the lab treated
//! packets.

use std::fmt::Write;
use std::time::Duration;

use super::*;

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
    let tcp_path = System::TetherTcp;
    let tcp_over_rathole = figures
        .median(Metric::Tcp1, tcp_path)
        .zip(figures.median(Metric::Tcp1, System::RatholeNoise))
        .map(|(t, r)| t / r);
    let mut targets = vec![vec![
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
    ]];
    if tcp_over_rathole.is_some() {
        targets.push(vec![
            "TCP path: 1 stream no worse than rathole (Noise)".into(),
            format!(
                "{} ({} Mbit/s, rathole {})",
                ratio_cell(tcp_over_rathole),
                cell(figures.median(Metric::Tcp1, tcp_path), 1),
                cell(figures.median(Metric::Tcp1, System::RatholeNoise), 1)
            ),
            verdict(tcp_over_rathole.map(|r| r >= 1.0)).to_owned(),
        ]);
    }
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
