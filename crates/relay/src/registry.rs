//! Which agent owns which public port. Pure bookkeeping, no sockets: the caller opens listeners
//! once a claim succeeds, and releases the claim if it cannot.
//!
//! A public port belongs to one agent at a time. The agent that owns a port may claim it again
//! (its new session takes over at once); any other agent is refused until the owner releases it.

use std::collections::HashMap;

use tether_common::config::AgentEntry;
use tether_common::net::ports::{PortSpec, Proto};
use tether_common::wire::protocol::Refusal;

#[derive(Debug, Default)]
pub struct PortRegistry {
    owners: HashMap<(Proto, u16), String>,
}

impl PortRegistry {
    /// Claims every port of `spec` for `agent`, or none of them.
    pub fn claim(&mut self, agent: &AgentEntry, spec: PortSpec) -> Result<(), Refusal> {
        if !agent.allows(spec) {
            return Err(Refusal::NotAllowed);
        }
        let taken = spec.range.ports().any(|port| {
            self.owner(spec.proto, port)
                .is_some_and(|owner| owner != agent.name)
        });
        if taken {
            return Err(Refusal::InUse);
        }
        for port in spec.range.ports() {
            self.owners.insert((spec.proto, port), agent.name.clone());
        }
        Ok(())
    }

    /// Gives up `agent`'s claim on one port; a port it does not own is left alone.
    pub fn release(&mut self, agent: &str, proto: Proto, port: u16) {
        if self.owner(proto, port) == Some(agent) {
            self.owners.remove(&(proto, port));
        }
    }

    pub fn owner(&self, proto: Proto, port: u16) -> Option<&str> {
        self.owners.get(&(proto, port)).map(String::as_str)
    }

    /// How many ports are claimed, by anyone.
    pub fn len(&self) -> usize {
        self.owners.len()
    }

    pub fn is_empty(&self) -> bool {
        self.owners.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tether_common::trust::identity::Fingerprint;

    fn agent(name: &str, ports: &[&str]) -> AgentEntry {
        AgentEntry {
            name: name.into(),
            fingerprint: Fingerprint::of_spki(name.as_bytes()),
            ports: ports.iter().map(|p| p.parse().unwrap()).collect(),
        }
    }

    fn spec(s: &str) -> PortSpec {
        s.parse().unwrap()
    }

    #[test]
    fn ports_outside_the_allowlist_are_refused() {
        let mut registry = PortRegistry::default();
        let dorm = agent("dorm", &["2222/tcp", "60000-60010/udp"]);
        assert_eq!(
            registry.claim(&dorm, spec("2223/tcp")),
            Err(Refusal::NotAllowed)
        );
        assert_eq!(
            registry.claim(&dorm, spec("2222/udp")),
            Err(Refusal::NotAllowed)
        );
        assert_eq!(
            registry.claim(&dorm, spec("59999-60001/udp")),
            Err(Refusal::NotAllowed)
        );
        assert!(registry.is_empty());
        assert_eq!(registry.claim(&dorm, spec("60000-60010/udp")), Ok(()));
        assert_eq!(registry.len(), 11);
    }

    #[test]
    fn one_owner_per_port_and_the_owner_may_claim_again() {
        let mut registry = PortRegistry::default();
        let dorm = agent("dorm", &["2222/tcp", "3000-3010/tcp"]);
        let lab = agent("lab", &["2222/tcp", "3005-3020/tcp"]);
        assert_eq!(registry.claim(&dorm, spec("2222/tcp")), Ok(()));
        // The same agent's new session takes its port over.
        assert_eq!(registry.claim(&dorm, spec("2222/tcp")), Ok(()));
        // Another agent is refused, even though its allowlist has the port.
        assert_eq!(registry.claim(&lab, spec("2222/tcp")), Err(Refusal::InUse));
        assert_eq!(registry.owner(Proto::Tcp, 2222), Some("dorm"));
        // A range is claimed whole or not at all.
        assert_eq!(registry.claim(&dorm, spec("3000-3005/tcp")), Ok(()));
        assert_eq!(
            registry.claim(&lab, spec("3005-3020/tcp")),
            Err(Refusal::InUse)
        );
        assert_eq!(registry.owner(Proto::Tcp, 3006), None);
    }

    #[test]
    fn release_frees_only_the_owners_ports() {
        let mut registry = PortRegistry::default();
        let dorm = agent("dorm", &["2222/tcp"]);
        let lab = agent("lab", &["2222/tcp"]);
        registry.claim(&dorm, spec("2222/tcp")).unwrap();
        registry.release("lab", Proto::Tcp, 2222);
        assert_eq!(registry.owner(Proto::Tcp, 2222), Some("dorm"));
        registry.release("dorm", Proto::Tcp, 2222);
        assert_eq!(registry.claim(&lab, spec("2222/tcp")), Ok(()));
    }

    #[test]
    fn tcp_and_udp_ports_are_separate() {
        let mut registry = PortRegistry::default();
        let dorm = agent("dorm", &["5000/tcp"]);
        let lab = agent("lab", &["5000/udp"]);
        assert_eq!(registry.claim(&dorm, spec("5000/tcp")), Ok(()));
        assert_eq!(registry.claim(&lab, spec("5000/udp")), Ok(()));
    }
}
