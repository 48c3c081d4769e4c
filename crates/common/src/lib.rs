//! What tether's relay and agent share: the wire protocol, identities and TLS pinning, config
//! types, and the one TCP copy loop.

pub mod cli;
pub mod config;
pub mod control;
pub mod identity;
pub mod ports;
pub mod protocol;
pub mod splice;
pub mod tls;
pub mod transport;
