//! What `tether-relay status` shows: each listed agent and the forwards of its latest session,
//! with what they carried. The same state feeds the metrics (see [`crate::metrics`]).

use std::collections::BTreeMap;
use std::fmt::Write;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use tether_common::carry::traffic::TrafficCount;
use tether_common::service::cli::count;
use tether_common::service::report::{self, age};

/// The relay's state at one moment, as `status --json` prints it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RelayStatus {
    /// The UDP address agents connect to.
    pub listen: String,
    pub fingerprint: String,
    /// Every agent relay.toml lists, connected or not.
    pub agents: Vec<AgentState>,
    /// Handshakes refused since the relay started, by reason.
    pub refused_handshakes: BTreeMap<String, u64>,
    /// Visitor connections and datagrams refused since the relay started, by reason.
    pub refused_visitors: BTreeMap<String, u64>,
    /// Datagrams dropped since the relay started, by reason.
    pub dropped_datagrams: BTreeMap<String, u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentState {
    pub name: String,
    pub fingerprint: String,
    pub connected: bool,
    /// Where the latest session came from.
    pub address: Option<String>,
    /// When the latest session began (connected) or ended (away); RFC 3339.
    pub since: Option<String>,
    pub rtt_ms: Option<f64>,
    /// The path of the session up now: "quic" (UDP) or "tcp".
    #[serde(default)]
    pub transport: Option<String>,
    /// Sessions since the relay started; every one after the first was a reconnect.
    pub sessions: u64,
    pub reconnects: u64,
    /// The forwards of the latest session.
    pub forwards: Vec<ForwardState>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ForwardState {
    pub name: String,
    pub proto: String,
    /// The public port or range.
    pub ports: String,
    /// "open", `"refused: <why>"`, or "agent away".
    pub state: String,
    /// UDP flows open now.
    pub flows_open: u64,
    /// Since the relay started, across the agent's sessions.
    #[serde(flatten)]
    pub traffic: TrafficCount,
    /// TCP only: the visitor connections open now, oldest first, at most
    /// [`MAX_LISTED_VISITORS`] of them.
    #[serde(default)]
    pub connections: Vec<VisitorState>,
}

/// One visitor connection open now.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VisitorState {
    pub address: String,
    /// RFC 3339.
    pub since: String,
    /// From the visitor, towards the agent.
    pub bytes_in: u64,
    /// From the agent, to the visitor.
    pub bytes_out: u64,
}

/// Visitor connections listed per forward at most: the status of a relay with thousands stays
/// small; the count of them all is in the forward's traffic.
pub const MAX_LISTED_VISITORS: usize = 100;

impl RelayStatus {
    /// The status as a person reads it: a line about the relay, a table of agents and one of
    /// forwards.
    pub fn render(&self, now: SystemTime) -> String {
        let connected = self.agents.iter().filter(|a| a.connected).count();
        let mut out = format!(
            "relay {}, this relay's key {}\n{} connected of {} listed\n\n",
            self.listen,
            self.fingerprint,
            count(connected, "agent"),
            self.agents.len()
        );
        let dash = || "-".to_string();
        let agents: Vec<Vec<String>> = self
            .agents
            .iter()
            .map(|a| {
                let since = a.since.as_deref().and_then(|s| age(s, now));
                let state = match (a.connected, since) {
                    (true, Some(age)) => format!("up {age}"),
                    (false, Some(age)) => format!("away {age}"),
                    (_, None) => "never connected".into(),
                };
                vec![
                    a.name.clone(),
                    state,
                    a.address.clone().unwrap_or_else(dash),
                    a.transport.clone().unwrap_or_else(dash),
                    a.rtt_ms.map_or_else(dash, |ms| format!("{ms:.1} ms")),
                    a.reconnects.to_string(),
                    a.fingerprint.clone(),
                ]
            })
            .collect();
        out.push_str(&report::table(
            &[
                "AGENT",
                "STATE",
                "ADDRESS",
                "TRANSPORT",
                "RTT",
                "RECONNECTS",
                "FINGERPRINT",
            ],
            &agents,
        ));
        let forwards: Vec<Vec<String>> = self
            .agents
            .iter()
            .flat_map(|a| a.forwards.iter().map(move |f| (a, f)))
            .map(|(a, f)| {
                let mut row = vec![
                    a.name.clone(),
                    f.name.clone(),
                    format!("{}/{}", f.ports, f.proto),
                    f.state.clone(),
                ];
                row.extend(report::traffic_cells(&f.proto, f.flows_open, &f.traffic));
                row
            })
            .collect();
        if !forwards.is_empty() {
            out.push('\n');
            out.push_str(&report::table(
                &[
                    "AGENT", "FORWARD", "PORTS", "STATE", "VISITORS", "FLOWS", "IN", "OUT",
                ],
                &forwards,
            ));
        }
        let visitors: Vec<Vec<String>> = self
            .agents
            .iter()
            .flat_map(|a| a.forwards.iter().map(move |f| (a, f)))
            .flat_map(|(a, f)| f.connections.iter().map(move |v| (a, f, v)))
            .map(|(a, f, v)| {
                let since = age(&v.since, now).unwrap_or_else(|| "-".into());
                vec![
                    a.name.clone(),
                    f.name.clone(),
                    v.address.clone(),
                    since,
                    report::bytes(v.bytes_in),
                    report::bytes(v.bytes_out),
                ]
            })
            .collect();
        if !visitors.is_empty() {
            out.push('\n');
            out.push_str(&report::table(
                &["AGENT", "FORWARD", "VISITOR", "FOR", "IN", "OUT"],
                &visitors,
            ));
        }
        let refusals = [
            ("refused handshakes", &self.refused_handshakes),
            ("refused visitors", &self.refused_visitors),
            ("dropped datagrams", &self.dropped_datagrams),
        ];
        for (what, reasons) in refusals {
            if let Some(line) = report::by_reason(what, reasons) {
                let _ = write!(out, "\n{line}");
            }
        }
        if !out.ends_with('\n') {
            out.push('\n');
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn renders_agents_and_forwards() {
        let then = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let status = RelayStatus {
            listen: "0.0.0.0:4433".into(),
            fingerprint: "SHA256:relay".into(),
            agents: vec![
                AgentState {
                    name: "dorm".into(),
                    fingerprint: "SHA256:dorm".into(),
                    connected: true,
                    address: Some("203.0.113.7:50123".into()),
                    since: Some(report::timestamp(then)),
                    rtt_ms: Some(12.3),
                    transport: Some("tcp".into()),
                    sessions: 3,
                    reconnects: 2,
                    forwards: vec![
                        ForwardState {
                            name: "ssh".into(),
                            proto: "tcp".into(),
                            ports: "2222".into(),
                            state: "open".into(),
                            flows_open: 0,
                            traffic: TrafficCount {
                                visitors_open: 1,
                                visitors: 4,
                                bytes_in: 2048,
                                bytes_out: 3 * 1024 * 1024,
                                ..TrafficCount::default()
                            },
                            connections: vec![VisitorState {
                                address: "198.51.100.4:51000".into(),
                                since: report::timestamp(then + Duration::from_secs(5)),
                                bytes_in: 2048,
                                bytes_out: 3 * 1024 * 1024,
                            }],
                        },
                        ForwardState {
                            name: "mosh".into(),
                            proto: "udp".into(),
                            ports: "60000-60010".into(),
                            state: "refused: the port is in use on the relay".into(),
                            flows_open: 0,
                            traffic: TrafficCount::default(),
                            connections: vec![],
                        },
                    ],
                },
                AgentState {
                    name: "spare".into(),
                    fingerprint: "SHA256:spare".into(),
                    connected: false,
                    address: None,
                    since: None,
                    rtt_ms: None,
                    transport: None,
                    sessions: 0,
                    reconnects: 0,
                    forwards: vec![],
                },
            ],
            refused_handshakes: [("agent key not listed".to_string(), 2)].into(),
            refused_visitors: BTreeMap::new(),
            dropped_datagrams: BTreeMap::new(),
        };
        let text = status.render(then + Duration::from_secs(65));
        let expected = "\
relay 0.0.0.0:4433, this relay's key SHA256:relay
1 agent connected of 2 listed

AGENT  STATE            ADDRESS            TRANSPORT  RTT      RECONNECTS  FINGERPRINT
dorm   up 1m 5s         203.0.113.7:50123  tcp        12.3 ms  2           SHA256:dorm
spare  never connected  -                  -          -        0           SHA256:spare

AGENT  FORWARD  PORTS            STATE                                     VISITORS  FLOWS  IN       OUT
dorm   ssh      2222/tcp         open                                      1         -      2.0 KiB  3.0 MiB
dorm   mosh     60000-60010/udp  refused: the port is in use on the relay  -         0      0 B      0 B

AGENT  FORWARD  VISITOR             FOR  IN       OUT
dorm   ssh      198.51.100.4:51000  1m   2.0 KiB  3.0 MiB

refused handshakes: 2 agent key not listed
";
        assert_eq!(text, expected);
        let json = serde_json::to_string(&status).unwrap();
        assert!(json.contains("\"bytes_in\":2048"), "{json}");
        assert_eq!(serde_json::from_str::<RelayStatus>(&json).unwrap(), status);
    }
}
