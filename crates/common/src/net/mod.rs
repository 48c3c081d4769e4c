//! What configs and the protocol say of the network: protocols, ports and ranges (`ports`), and
//! address blocks with the group a visitor's address counts in for the caps (`cidr`).
//!
//! Pure values: no sockets, no I/O.

pub mod cidr;
pub mod ports;
