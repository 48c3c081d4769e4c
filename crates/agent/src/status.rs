//! What the agent is doing, published for tests, logs and (later) the status command.

use std::time::Duration;

use tether_common::protocol::{ForwardResult, SessionId};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentStatus {
    /// Resolving the relay's name and handshaking.
    Connecting,
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
