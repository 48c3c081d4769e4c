//! A forward of agent.toml as the agent offers it to the relay, with what it carried since the
//! agent started: what the session, the UDP flows and the status all speak of.

use std::sync::Arc;

use tether_common::carry::traffic::ForwardTraffic;
use tether_common::config::Forward;

/// A forward from agent.toml, with what it carried since the agent started.
#[derive(Debug, Clone)]
pub struct Offered {
    pub forward: Forward,
    pub traffic: Arc<ForwardTraffic>,
}

impl Offered {
    pub fn new(forward: Forward) -> Self {
        Self {
            forward,
            traffic: Arc::default(),
        }
    }
}
