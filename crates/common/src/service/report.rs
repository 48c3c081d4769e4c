//! What both `status` commands print for people: aligned columns, byte counts and ages.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use crate::carry::traffic::TrafficCount;

/// `rows` under `header`, each column as wide as its widest cell, two spaces apart.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let header: Vec<String> = header.iter().map(|h| h.to_string()).collect();
    for row in std::iter::once(&header).chain(rows) {
        let mut line = String::new();
        for (cell, width) in row.iter().zip(&widths) {
            line.push_str(&format!("{cell:<width$}  "));
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// A byte count for people: "512 B", "1.5 KiB", "3.2 GiB".
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut value = n as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// A forward's VISITORS, FLOWS, IN and OUT cells: open visitors for TCP, open flows for UDP,
/// and the payload each way.
pub fn traffic_cells(proto: &str, flows_open: u64, traffic: &TrafficCount) -> [String; 4] {
    let (visitors, flows) = match proto {
        "udp" => ("-".to_string(), flows_open.to_string()),
        _ => (traffic.visitors_open.to_string(), "-".to_string()),
    };
    [
        visitors,
        flows,
        bytes(traffic.bytes_in + traffic.datagram_bytes_in),
        bytes(traffic.bytes_out + traffic.datagram_bytes_out),
    ]
}

/// "`what`: 2 this, 1 that" for the reasons counted at least once; `None` if there are none.
pub fn by_reason(what: &str, counts: &BTreeMap<String, u64>) -> Option<String> {
    let counted: Vec<String> = counts
        .iter()
        .filter(|(_, &n)| n > 0)
        .map(|(reason, n)| format!("{n} {reason}"))
        .collect();
    (!counted.is_empty()).then(|| format!("{what}: {}", counted.join(", ")))
}

/// A moment as the status shows it: RFC 3339 in UTC, to the second.
pub fn timestamp(time: SystemTime) -> String {
    humantime::format_rfc3339_seconds(time).to_string()
}

/// How long ago a [`timestamp`] was, to the second: "2h 5m 3s". `None` if it does not parse.
pub fn age(timestamp: &str, now: SystemTime) -> Option<String> {
    let then = humantime::parse_rfc3339(timestamp).ok()?;
    let secs = now.duration_since(then).unwrap_or_default().as_secs();
    Some(humantime::format_duration(Duration::from_secs(secs)).to_string())
}

/// A round-trip time in milliseconds, as the status shows it.
pub fn millis(rtt: Duration) -> f64 {
    (rtt.as_secs_f64() * 10_000.0).round() / 10.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_line_up() {
        let rows = vec![
            vec!["dorm".to_string(), "up".to_string()],
            vec!["a-longer-name".to_string(), "away".to_string()],
        ];
        assert_eq!(
            table(&["AGENT", "STATE"], &rows),
            "AGENT          STATE\ndorm           up\na-longer-name  away\n"
        );
    }

    #[test]
    fn byte_counts() {
        assert_eq!(bytes(0), "0 B");
        assert_eq!(bytes(1023), "1023 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(10 * 1024 * 1024), "10.0 MiB");
        assert_eq!(bytes(u64::MAX), "16384.0 PiB");
    }

    #[test]
    fn ages_and_timestamps() {
        let then = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let stamp = timestamp(then);
        assert_eq!(stamp, "2027-01-15T08:00:00Z");
        let later = then + Duration::from_millis(7_503_900);
        assert_eq!(age(&stamp, later).as_deref(), Some("2h 5m 3s"));
        assert_eq!(age("yesterday", later), None);
        assert_eq!(millis(Duration::from_micros(12_345)), 12.3);
    }
}
