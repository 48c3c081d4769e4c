//! How a visitor's bytes are carried, the same at both ends: the one TCP copy loop (`splice`),
//! what lets a data stream outlive its session (`resume`), the table of UDP flows (`flows`),
//! and what each forward carried (`traffic`).
//!
//! Knows nothing of which end it runs at, nor of configs: the relay and the agent hand it a
//! TCP connection, a data stream and the caps, and it carries.

pub mod flows;
pub mod resume;
pub mod splice;
pub mod traffic;
