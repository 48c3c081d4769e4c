//! The connection under a session, and the paths it takes to the relay: QUIC's settings on
//! each side (`quic`) and its congestion controller (`congestion`), the UDP socket under quinn
//! (`socket`), the TCP path for networks that
//! block UDP (`carrier`: QUIC packets over TLS on TCP), and an HTTP proxy on the way to it
//! (`proxy`), and which of the paths the agent takes, and when it moves (`choose`).
//!
//! Knows nothing of what a session carries: forwards, streams and flows are above it.

pub mod carrier;
pub mod choose;
pub mod congestion;
pub mod proxy;
pub mod quic;
pub mod socket;

use std::fmt;

/// Which path a session runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    /// QUIC over UDP.
    Quic,
    /// QUIC over a carrier: TLS over TCP (see [`carrier`]).
    Tcp,
}

impl Path {
    /// The name status and metrics show.
    pub fn label(self) -> &'static str {
        match self {
            Path::Quic => "quic",
            Path::Tcp => "tcp",
        }
    }
}

impl fmt::Display for Path {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}
