//! The UDP flows of one session, one table per forward: a flow is one visitor source on one
//! public port, numbered by the relay. Each table is capped in total and per visitor address (an
//! IPv6 visitor by its /64), and forgets flows that stay idle. Pure bookkeeping over
//! [`FlowTable`]; the sockets are in `udp.rs`.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tether_common::carry::flows::{self, FlowTable};
use tether_common::carry::traffic::ForwardTraffic;
use tether_common::net::cidr::address_group;
use tether_common::wire::datagram::{FlowId, UdpCounters};

use crate::limits::Limits;

/// The visitor source of a flow: the public port it reached and its address.
type Source = (u16, SocketAddr);

/// The UDP flows of one session, one table per forward, each capped in total and per visitor
/// address.
pub struct SessionFlows {
    inner: Mutex<Flows>,
    /// The caps of each forward's table.
    max_flows: usize,
    max_per_visitor: usize,
    protect_active: Duration,
}

struct Flows {
    forwards: HashMap<u16, ForwardFlows>,
    by_id: HashMap<FlowId, (u16, Source)>,
    next_id: FlowId,
    /// Ids have come round past `FlowId::MAX`, so any id but 0 may have been opened once.
    wrapped: bool,
}

struct ForwardFlows {
    table: FlowTable<Source, FlowId, IpAddr>,
    idle: Duration,
}

impl SessionFlows {
    /// Tables for the session's UDP forwards, given as (forward id, flow idle time).
    pub fn new(forwards: impl IntoIterator<Item = (u16, Duration)>, limits: &Limits) -> Self {
        let flows = Self {
            inner: Mutex::new(Flows {
                forwards: HashMap::new(),
                by_id: HashMap::new(),
                next_id: 1,
                wrapped: false,
            }),
            max_flows: limits.max_flows_per_forward,
            max_per_visitor: limits.max_flows_per_visitor,
            protect_active: limits.protect_active_flows,
        };
        flows.set_forwards(forwards);
        flows
    }

    /// Makes the session's UDP forwards these: a forward kept with the same idle time keeps its
    /// flows, the flows of the others are forgotten, and new ones start empty.
    pub fn set_forwards(&self, forwards: impl IntoIterator<Item = (u16, Duration)>) {
        let mut flows = self.lock();
        let Flows {
            forwards: tables,
            by_id,
            ..
        } = &mut *flows;
        let mut kept = HashMap::new();
        for (id, idle) in forwards {
            let table = match tables.remove(&id) {
                Some(forward) if forward.idle == idle => forward,
                _ => ForwardFlows {
                    table: FlowTable::new(
                        self.max_flows,
                        self.max_per_visitor,
                        |(_, v): &Source| address_group(v.ip()),
                    )
                    .protect_active(self.protect_active),
                    idle,
                },
            };
            kept.insert(id, table);
        }
        // What is left in `tables` is closed: its flows are forgotten both ways.
        by_id.retain(|_, (forward, _)| kept.contains_key(forward));
        *tables = kept;
    }

    fn lock(&self) -> MutexGuard<'_, Flows> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The flow of `visitor` on `port` of `forward`, opened if it is new. `None` if the session
    /// has no UDP forward of that index, or if the forward's flows are all at their cap and
    /// active, so that a new one may not push any out.
    pub fn flow_for(
        &self,
        forward: u16,
        port: u16,
        visitor: SocketAddr,
        counters: &UdpCounters,
        traffic: &ForwardTraffic,
    ) -> Option<FlowId> {
        let now = Instant::now();
        let mut flows = self.lock();
        let Flows {
            forwards,
            by_id,
            next_id,
            wrapped,
        } = &mut *flows;
        let table = &mut forwards.get_mut(&forward)?.table;
        let source = (port, visitor);
        if let Some(&mut id) = table.touch(&source, now) {
            return Some(id);
        }
        let mut id = *next_id;
        while id == 0 || by_id.contains_key(&id) {
            id = id.wrapping_add(1);
        }
        *next_id = id.wrapping_add(1);
        *wrapped |= *next_id <= id;
        let Some(evicted) = table.insert(source, id, now) else {
            UdpCounters::add(&counters.flows_refused, 1);
            return None;
        };
        for (source, old) in &evicted {
            by_id.remove(old);
            tracing::debug!(port = source.0, visitor = %source.1, "flow evicted under the cap");
        }
        by_id.insert(id, (forward, source));
        UdpCounters::add(&counters.flows_opened, 1);
        traffic.flow_opened();
        UdpCounters::add(&counters.flows_evicted, evicted.len() as u64);
        tracing::debug!(%visitor, port, flow = id, "flow opened");
        Some(id)
    }

    /// Where the numbering of flows stands: the next id, and whether ids came round.
    pub fn numbering(&self) -> (FlowId, bool) {
        let flows = self.lock();
        (flows.next_id, flows.wrapped)
    }

    /// Goes on numbering flows from where another table of the same agent stood (see
    /// [`SessionFlows::numbering`]): a relay that restarts never gives a new flow the id of one
    /// the agent may still hold.
    pub fn number_on_from(&self, (next_id, wrapped): (FlowId, bool)) {
        let mut flows = self.lock();
        flows.next_id = next_id;
        flows.wrapped |= wrapped;
    }

    /// The forward, public port and visitor of flow `id`, marking it seen.
    pub fn visitor_of(&self, id: FlowId) -> Option<(u16, u16, SocketAddr)> {
        let mut flows = self.lock();
        let (forward, source) = *flows.by_id.get(&id)?;
        flows
            .forwards
            .get_mut(&forward)?
            .table
            .touch(&source, Instant::now())?;
        Some((forward, source.0, source.1))
    }

    /// The flows `forward` has open now.
    pub fn open_flows(&self, forward: u16) -> usize {
        self.lock()
            .forwards
            .get(&forward)
            .map_or(0, |f| f.table.len())
    }

    /// Whether flow `id` was ever opened, even if it has been forgotten since.
    pub fn ever_opened(&self, id: FlowId) -> bool {
        let flows = self.lock();
        id != 0 && (flows.wrapped || id < flows.next_id)
    }

    /// Forgets the flows that stayed silent for their forward's idle time; returns how many.
    pub fn expire(&self, now: Instant) -> usize {
        let mut flows = self.lock();
        let Flows {
            forwards, by_id, ..
        } = &mut *flows;
        let mut count = 0;
        for forward in forwards.values_mut() {
            for (_, id) in forward.table.expire(now, forward.idle) {
                by_id.remove(&id);
                count += 1;
            }
        }
        count
    }

    /// How often idle flows are looked for: often enough for the shortest idle time.
    pub fn sweep_interval(&self) -> Duration {
        flows::sweep_interval(self.lock().forwards.values().map(|f| f.idle).min())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(per_forward: usize, per_visitor: usize) -> Limits {
        Limits {
            max_flows_per_forward: per_forward,
            max_flows_per_visitor: per_visitor,
            ..Limits::default()
        }
    }

    fn visitor(text: &str) -> SocketAddr {
        text.parse().unwrap()
    }

    #[test]
    fn a_table_that_numbers_on_from_another_gives_none_of_its_ids_again() {
        let (counters, traffic) = (UdpCounters::default(), ForwardTraffic::default());
        let forwards = [(1, Duration::from_secs(120))];
        let before = SessionFlows::new(forwards, &limits(8, 8));
        let old: Vec<_> = (0..3)
            .map(|n| {
                let v = visitor(&format!("203.0.113.5:{}", 4000 + n));
                before.flow_for(1, 60001, v, &counters, &traffic).unwrap()
            })
            .collect();
        let after = SessionFlows::new(forwards, &limits(8, 8));
        after.number_on_from(before.numbering());
        let new = after.flow_for(1, 60001, visitor("203.0.113.5:4000"), &counters, &traffic);
        assert!(!old.contains(&new.unwrap()), "{new:?} was given before");
        assert!(old.iter().all(|&id| after.ever_opened(id)));
    }

    #[test]
    fn a_source_keeps_its_flow_and_a_new_source_gets_a_new_one() {
        let counters = UdpCounters::default();
        let traffic = ForwardTraffic::default();
        let flows = SessionFlows::new([(1, Duration::from_secs(120))], &limits(8, 8));
        let a = flows.flow_for(1, 60001, visitor("203.0.113.5:4000"), &counters, &traffic);
        let again = flows.flow_for(1, 60001, visitor("203.0.113.5:4000"), &counters, &traffic);
        let hopped = flows.flow_for(1, 60001, visitor("203.0.113.5:4001"), &counters, &traffic);
        let other_port = flows.flow_for(1, 60002, visitor("203.0.113.5:4000"), &counters, &traffic);
        assert!(a.is_some());
        assert_eq!(a, again);
        assert_ne!(a, hopped);
        assert_ne!(a, other_port);
        assert_eq!(
            flows.visitor_of(hopped.unwrap()),
            Some((1, 60001, visitor("203.0.113.5:4001")))
        );
        assert_eq!(counters.count().flows_opened, 3);
        assert_eq!(traffic.count().flows, 3);
        assert_eq!(flows.open_flows(1), 3);
        // Not a UDP forward of this session.
        assert_eq!(
            flows.flow_for(0, 60001, visitor("203.0.113.5:4000"), &counters, &traffic),
            None
        );
    }

    #[test]
    fn evicted_and_expired_flows_are_forgotten_both_ways() {
        let counters = UdpCounters::default();
        let traffic = ForwardTraffic::default();
        let flows = SessionFlows::new([(0, Duration::from_secs(120))], &limits(8, 1));
        let first = flows
            .flow_for(0, 60001, visitor("198.51.100.7:1"), &counters, &traffic)
            .unwrap();
        let second = flows
            .flow_for(0, 60001, visitor("198.51.100.7:2"), &counters, &traffic)
            .unwrap();
        assert_eq!(flows.visitor_of(first), None);
        assert_eq!(counters.count().flows_evicted, 1);
        assert_eq!(flows.expire(Instant::now() + Duration::from_secs(119)), 0);
        assert_eq!(flows.expire(Instant::now() + Duration::from_secs(121)), 1);
        assert_eq!(flows.visitor_of(second), None);
        // Forgotten, but once opened: the agent may still answer them.
        assert!(flows.ever_opened(first) && flows.ever_opened(second));
        assert!(!flows.ever_opened(0));
        assert!(!flows.ever_opened(second + 1));
    }

    #[test]
    fn the_sources_of_one_ipv6_64_share_the_cap_per_visitor() {
        let counters = UdpCounters::default();
        let traffic = ForwardTraffic::default();
        let flows = SessionFlows::new([(0, Duration::from_secs(120))], &limits(8, 2));
        let open = |source: &str| {
            flows
                .flow_for(0, 60001, visitor(source), &counters, &traffic)
                .unwrap()
        };
        let first = open("[2001:db8:0:1::1]:1000");
        open("[2001:db8:0:1::2]:1000");
        // A third address of the same /64 takes the place of its oldest flow.
        open("[2001:db8:0:1::3]:1000");
        assert_eq!(flows.visitor_of(first), None);
        assert_eq!(counters.count().flows_evicted, 1);
        open("[2001:db8:0:2::1]:1000");
        assert_eq!(flows.open_flows(0), 3);
    }

    #[test]
    fn sweeps_come_often_enough_for_the_shortest_idle_time() {
        let limits = Limits::default();
        let sweep = |idle: &[u64]| {
            SessionFlows::new(
                idle.iter()
                    .enumerate()
                    .map(|(i, &ms)| (i as u16, Duration::from_millis(ms))),
                &limits,
            )
            .sweep_interval()
        };
        assert_eq!(sweep(&[120_000]), Duration::from_secs(5));
        assert_eq!(sweep(&[120_000, 2_000]), Duration::from_millis(500));
        assert_eq!(sweep(&[1]), Duration::from_millis(100));
    }
}
