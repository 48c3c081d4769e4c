//! The wire: what crosses between an agent and the relay, and nothing about why. The messages
//! and their pure codec with the protocol flow at its top (`protocol`), control frames on a QUIC
//! stream (`control`), the header of a UDP datagram carried as a QUIC datagram (`datagram`), and
//! text from the network made safe to print (`text`).
//!
//! Knows nothing of configs, sessions or the local services: a decoder takes bytes and returns
//! a message or an error, never panics, and checks every length before it allocates.

pub mod control;
pub mod datagram;
pub mod protocol;
pub mod text;
