//! What tether's relay and agent share, one folder a concern: the wire protocol (`wire`), trust
//! (`trust`), the connection under a session (`transport`), ports and addresses (`net`), how
//! bytes are carried (`carry`), the configs (`config`) and running as a service (`service`).
//! ARCHITECTURE.md at the root of the repository is the map.

pub mod carry;
pub mod config;
pub mod fuzzing;
pub mod net;
pub mod service;
pub mod transport;
pub mod trust;
pub mod wire;
