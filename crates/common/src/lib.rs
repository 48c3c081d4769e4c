//! What tether's relay and agent share: the wire protocol, identities and TLS pinning, config
//! types, the one TCP copy loop, and the UDP datagram format and flow table.

pub mod cidr;
pub mod cli;
pub mod config;
pub mod control;
pub mod datagram;
pub mod flows;
pub mod fuzzing;
pub mod identity;
pub mod metrics;
pub mod notify;
pub mod ports;
pub mod protocol;
pub mod quic_socket;
pub mod report;
pub mod resume;
pub mod splice;
pub mod status_socket;
pub mod tls;
pub mod traffic;
pub mod transport;
