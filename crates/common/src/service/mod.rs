//! Running as a service, the same for both binaries: the command lines' common parts (`cli`),
//! systemd's notify socket (`notify`) and its store of descriptors (`fdstore`), the status socket (`status_socket`) and the tables it
//! prints (`report`), and the metrics endpoint (`metrics`).
//!
//! Knows nothing of the protocol: it serves what each end's state says about itself.

pub mod cli;
pub mod fdstore;
pub mod metrics;
pub mod notify;
pub mod report;
pub mod status_socket;
