//! tether's agent: the end of the tunnel beside the home machine. It keeps one QUIC session to
//! the relay and carries each visitor the relay sends to the local service of its forward.

pub mod backoff;
pub mod cli;
pub mod client;
pub mod forwards;
pub mod join;
pub mod metrics;
pub mod probe;
pub mod session;
pub mod status;
pub mod udp;

pub use client::{Agent, AgentControl, AgentError};
pub use status::AgentStatus;
