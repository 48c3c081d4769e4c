//! The connection under a session: QUIC's settings on each side (`quic`) and the UDP socket
//! under quinn (`socket`). This is where another path to the relay belongs.
//!
//! Knows nothing of what a session carries: forwards, streams and flows are above it.

pub mod quic;
pub mod socket;
