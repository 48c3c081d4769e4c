//! What the agent is doing: [`AgentStatus`], published for tests and systemd's status line, and
//! the fuller [`AgentReport`] that `tether-agent status` shows.

use std::collections::BTreeMap;
use std::fmt::{self, Write};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use tether_common::carry::traffic::TrafficCount;
use tether_common::service::cli::count;
use tether_common::service::report::{self, age};
use tether_common::transport::Path;
use tether_common::wire::protocol::{ForwardResult, SessionId};

use crate::udp::Flows;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentStatus {
    /// Resolving the relay's name and handshaking; after a failure, with its reason.
    Connecting {
        last_error: Option<String>,
    },
    /// A session is up; the relay answered for each forward.
    Connected {
        session: SessionId,
        forwards: Vec<(String, ForwardResult)>,
    },
    /// The last attempt or session failed; the next attempt comes after `retry_in`.
    Waiting {
        retry_in: Duration,
        error: String,
    },
    Stopped,
}

impl AgentStatus {
    pub fn session(&self) -> Option<SessionId> {
        match self {
            AgentStatus::Connected { session, .. } => Some(*session),
            _ => None,
        }
    }

    /// The relay's answer for the forward called `name`, while connected.
    pub fn forward(&self, name: &str) -> Option<ForwardResult> {
        match self {
            AgentStatus::Connected { forwards, .. } => {
                forwards.iter().find(|(n, _)| n == name).map(|(_, r)| *r)
            }
            _ => None,
        }
    }
}

/// One line, as `systemctl status` shows it.
impl fmt::Display for AgentStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AgentStatus::Connecting { last_error: None } => f.write_str("connecting to the relay"),
            AgentStatus::Connecting {
                last_error: Some(error),
            } => write!(
                f,
                "connecting to the relay again; the last attempt: {error}"
            ),
            AgentStatus::Connected { forwards, .. } => {
                let opened = forwards
                    .iter()
                    .filter(|(_, r)| *r == ForwardResult::Opened)
                    .count();
                write!(f, "connected to the relay, {}", count(opened, "forward"))?;
                match forwards.len() - opened {
                    0 => Ok(()),
                    refused => write!(f, " ({refused} refused)"),
                }
            }
            AgentStatus::Waiting { retry_in, error } if retry_in.is_zero() => {
                write!(f, "reconnecting: {error}")
            }
            AgentStatus::Waiting { retry_in, error } => {
                write!(
                    f,
                    "reconnecting in {:.1} s: {error}",
                    retry_in.as_secs_f64()
                )
            }
            AgentStatus::Stopped => f.write_str("stopped"),
        }
    }
}

/// What `status` shows beyond [`AgentStatus`]: the live session's connection and flows, how
/// many sessions there were, and the last error.
#[derive(Default)]
pub struct Tracker {
    inner: Mutex<Tracked>,
}

#[derive(Default)]
struct Tracked {
    live: Option<Live>,
    sessions: u64,
    last_error: Option<(String, SystemTime)>,
    /// The path of the latest session, and why it is not QUIC.
    path: Option<(Path, Option<&'static str>)>,
    sessions_by_path: [u64; 2],
    moves: u64,
}

#[derive(Clone)]
pub struct Live {
    pub conn: quinn::Connection,
    pub since: SystemTime,
    pub flows: Arc<Flows>,
}

/// A session counted as live until dropped.
pub struct LiveGuard<'a>(&'a Tracker);

impl Drop for LiveGuard<'_> {
    fn drop(&mut self) {
        self.0.lock().live = None;
    }
}

impl Tracker {
    fn lock(&self) -> MutexGuard<'_, Tracked> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts a session that is set up, live until the returned guard is dropped.
    pub fn connected(&self, conn: quinn::Connection, flows: Arc<Flows>) -> LiveGuard<'_> {
        let mut tracked = self.lock();
        tracked.sessions += 1;
        tracked.live = Some(Live {
            conn,
            since: SystemTime::now(),
            flows,
        });
        LiveGuard(self)
    }

    /// Notes the path the next session runs on, and why, unless it is QUIC.
    pub fn on_path(&self, path: Path, why: Option<&'static str>) {
        let mut tracked = self.lock();
        tracked.path = Some((path, why));
        tracked.sessions_by_path[path_index(path)] += 1;
    }

    /// Counts a move of the session to the other path.
    pub fn moved(&self) {
        self.lock().moves += 1;
    }

    /// The path of the latest session, and why it is not QUIC.
    pub fn path(&self) -> Option<(Path, Option<&'static str>)> {
        self.lock().path
    }

    /// Sessions on each path since the agent started, and moves between them.
    pub fn paths(&self) -> ([(Path, u64); 2], u64) {
        let tracked = self.lock();
        let by_path = [Path::Quic, Path::Tcp].map(|p| (p, tracked.sessions_by_path[path_index(p)]));
        (by_path, tracked.moves)
    }

    /// Keeps `error` as the last one, for the status.
    pub fn failed(&self, error: &str) {
        self.lock().last_error = Some((error.to_owned(), SystemTime::now()));
    }

    pub fn live(&self) -> Option<Live> {
        self.lock().live.clone()
    }

    pub fn sessions(&self) -> u64 {
        self.lock().sessions
    }

    pub fn last_error(&self) -> Option<(String, SystemTime)> {
        self.lock().last_error.clone()
    }
}

fn path_index(path: Path) -> usize {
    match path {
        Path::Quic => 0,
        Path::Tcp => 1,
    }
}

/// The agent's state at one moment, as `status --json` prints it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentReport {
    /// The relay as agent.toml names it.
    pub relay: String,
    pub relay_fingerprint: String,
    /// This agent's own key.
    pub fingerprint: String,
    /// What the agent is doing, in the words of systemd's status line.
    pub state: String,
    pub connected: bool,
    pub session: Option<SessionId>,
    /// The address the live session goes to.
    pub relay_address: Option<String>,
    /// The live session's path: "quic" (UDP) or "tcp".
    #[serde(default)]
    pub transport: Option<String>,
    /// Why the live session is not on QUIC.
    #[serde(default)]
    pub transport_why: Option<String>,
    /// When the live session began; RFC 3339.
    pub since: Option<String>,
    pub rtt_ms: Option<f64>,
    /// Sessions since the agent started; every one after the first was a reconnect.
    pub sessions: u64,
    pub reconnects: u64,
    pub last_error: Option<String>,
    pub last_error_at: Option<String>,
    pub forwards: Vec<ForwardReport>,
    /// Datagrams dropped since the agent started, by reason.
    pub dropped_datagrams: BTreeMap<String, u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ForwardReport {
    pub name: String,
    pub proto: String,
    /// The public port or range on the relay.
    pub remote: String,
    pub local: String,
    /// "open", `"refused: <why>"`, or "not connected".
    pub state: String,
    /// UDP flows open now.
    pub flows_open: u64,
    /// Since the agent started, across its sessions.
    #[serde(flatten)]
    pub traffic: TrafficCount,
}

impl AgentReport {
    /// The report as a person reads it: the relay, the session, then a table of forwards.
    pub fn render(&self, now: SystemTime) -> String {
        let mut out = format!(
            "relay {}, pinned relay key {}\nthis agent's key {}\n\n{}\n",
            self.relay, self.relay_fingerprint, self.fingerprint, self.state
        );
        if self.connected {
            let mut parts = Vec::new();
            if let Some(session) = self.session {
                parts.push(format!("session {session}"));
            }
            if let Some(address) = &self.relay_address {
                parts.push(format!("to {address}"));
            }
            if let Some(age) = self.since.as_deref().and_then(|s| age(s, now)) {
                parts.push(format!("up {age}"));
            }
            if let Some(rtt) = self.rtt_ms {
                parts.push(format!("RTT {rtt:.1} ms"));
            }
            parts.push(count(self.reconnects as usize, "reconnect"));
            let _ = writeln!(out, "{}", parts.join(", "));
            match (self.transport.as_deref(), &self.transport_why) {
                (Some("tcp"), Some(why)) => {
                    let _ = writeln!(out, "over TCP: {why}");
                }
                (Some("tcp"), None) => {
                    let _ = writeln!(out, "over TCP");
                }
                (Some(other), _) => {
                    let _ = writeln!(out, "over {}", other.to_uppercase());
                }
                (None, _) => {}
            }
        }
        if let Some(error) = &self.last_error {
            let ago = self.last_error_at.as_deref().and_then(|at| age(at, now));
            match ago {
                Some(ago) => {
                    let _ = writeln!(out, "last error, {ago} ago: {error}");
                }
                None => {
                    let _ = writeln!(out, "last error: {error}");
                }
            }
        }
        let rows: Vec<Vec<String>> = self
            .forwards
            .iter()
            .map(|f| {
                let mut row = vec![
                    f.name.clone(),
                    format!("{}/{}", f.remote, f.proto),
                    f.local.clone(),
                    f.state.clone(),
                ];
                row.extend(report::traffic_cells(&f.proto, f.flows_open, &f.traffic));
                row
            })
            .collect();
        if !rows.is_empty() {
            out.push('\n');
            out.push_str(&report::table(
                &[
                    "FORWARD",
                    "RELAY PORTS",
                    "LOCAL",
                    "STATE",
                    "VISITORS",
                    "FLOWS",
                    "IN",
                    "OUT",
                ],
                &rows,
            ));
        }
        if let Some(line) = report::by_reason("dropped datagrams", &self.dropped_datagrams) {
            let _ = writeln!(out, "\n{line}");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use tether_common::wire::protocol::Refusal;

    use super::*;

    #[test]
    fn status_lines() {
        let connected = |forwards: Vec<(String, ForwardResult)>| AgentStatus::Connected {
            session: 1,
            forwards,
        };
        let ssh = || ("ssh".to_string(), ForwardResult::Opened);
        let mosh = || ("mosh".to_string(), ForwardResult::Refused(Refusal::InUse));
        assert_eq!(
            connected(vec![ssh()]).to_string(),
            "connected to the relay, 1 forward"
        );
        assert_eq!(
            connected(vec![ssh(), mosh()]).to_string(),
            "connected to the relay, 1 forward (1 refused)"
        );
        let waiting = AgentStatus::Waiting {
            retry_in: Duration::from_millis(4200),
            error: "connection refused".into(),
        };
        assert_eq!(
            waiting.to_string(),
            "reconnecting in 4.2 s: connection refused"
        );
        let unanswered = AgentStatus::Waiting {
            retry_in: Duration::ZERO,
            error: "no answer".into(),
        };
        assert_eq!(unanswered.to_string(), "reconnecting: no answer");
        let again = AgentStatus::Connecting {
            last_error: Some("no answer".into()),
        };
        assert_eq!(
            again.to_string(),
            "connecting to the relay again; the last attempt: no answer"
        );
    }
}
