//! What the agent is doing, published for tests, systemd's status line and (later) the status
//! command.

use std::fmt;
use std::time::Duration;

use tether_common::cli::count;
use tether_common::protocol::{ForwardResult, SessionId};

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

#[cfg(test)]
mod tests {
    use tether_common::protocol::Refusal;

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
