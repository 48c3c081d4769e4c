//! The report of a comparison on loopback: throughput, latency, first byte, UDP and memory,
//! each against the peers, and the targets tether is held to there.

use std::fmt::Write;
use std::time::Duration;

use super::*;

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
    // The TCP path, when it ran: against tether over QUIC and rathole, who is on TCP too.
    let tcp_path = System::TetherTcp;
    let over =
        |metric, system| Some(figures.median(metric, tcp_path)? / figures.median(metric, system)?);
    if figures.median(Metric::Tcp1, tcp_path).is_some() {
        let (quic, peer) = (over(Metric::Tcp1, tether), over(Metric::Tcp1, rathole));
        rows.push((
            "TCP path: 1 stream ≥ 0.8× tether over QUIC, ≥ 1.0× rathole (Noise)".into(),
            format!(
                "{} QUIC's, {} rathole's",
                ratio_cell(quic),
                ratio_cell(peer)
            ),
            quic.zip(peer).map(|(q, r)| q >= 0.8 && r >= 1.0),
        ));
        let idle = over(Metric::IdleKibPerConnection, tether);
        rows.push((
            "TCP path: an idle connection costs what it does over QUIC (≤ 1.05×)".into(),
            format!(
                "{} KiB ({} QUIC's)",
                cell(figures.median(Metric::IdleKibPerConnection, tcp_path), 2),
                ratio_cell(idle)
            ),
            idle.map(|r| r <= 1.05),
        ));
    }
    section(out, "Targets");
    table(
        out,
        Columns::Text,
        &["target", "measured", ""],
        rows.into_iter()
            .map(|(target, measured, met)| vec![target, measured, verdict(met).to_owned()]),
    );
}
