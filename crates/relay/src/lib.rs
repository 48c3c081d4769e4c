//! tether's relay: the public side of the tunnel. It admits agents by their pinned keys, opens
//! the public ports each may have, and carries visitors' connections to them.

pub mod agents;
pub mod cli;
mod public;
pub mod registry;
pub mod server;
pub mod session;
pub mod udp;
pub mod visitor;

pub use server::{Limits, Relay, RelayError};
