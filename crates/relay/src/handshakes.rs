//! Handshakes under way, before anyone is authenticated: capped in total and per source address
//! (an IPv6 source by its /64), and past a threshold only for sources that proved their address
//! with a QUIC Retry. What is over a cap is dropped without an answer, so a spoofed flood gets
//! nothing back to amplify.
//!
//! The places are shared fairly: when every place is taken, a source that holds fewer than
//! another takes the place of that other source's oldest handshake, which is then abandoned.
//! A few addresses that keep their handshakes stalled cannot lock everyone else out, however
//! many places each may hold.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};

use tether_common::net::cidr::address_group;
use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};

use crate::limits::Limits;

/// What to do with a new connection attempt.
pub enum Verdict {
    /// Go on with the handshake; the place is held until dropped.
    Accept(Place),
    /// Ask the client to prove its address first.
    Retry,
    /// Drop it unanswered, for this reason.
    Drop(&'static str),
}

pub struct Pending {
    table: Arc<Mutex<Table>>,
    max: usize,
    max_per_address: usize,
    retry_above: usize,
}

#[derive(Default)]
struct Table {
    /// The handshakes of each source, oldest first, with what abandons each.
    by_source: HashMap<IpAddr, VecDeque<(u64, CancellationToken)>>,
    taken: usize,
    next_id: u64,
}

/// One handshake's place, given back when dropped.
pub struct Place {
    table: Arc<Mutex<Table>>,
    source: IpAddr,
    id: u64,
    evicted: CancellationToken,
}

impl Place {
    /// Completes when another source took this place: the handshake is to be abandoned.
    pub fn evicted(&self) -> WaitForCancellationFuture<'_> {
        self.evicted.cancelled()
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        let mut table = lock(&self.table);
        table.remove(self.source, self.id);
    }
}

fn lock(table: &Mutex<Table>) -> MutexGuard<'_, Table> {
    table.lock().unwrap_or_else(|e| e.into_inner())
}

impl Table {
    fn held_by(&self, source: IpAddr) -> usize {
        self.by_source.get(&source).map_or(0, VecDeque::len)
    }

    fn remove(&mut self, source: IpAddr, id: u64) {
        let Some(places) = self.by_source.get_mut(&source) else {
            return;
        };
        // An evicted place was removed when it was evicted.
        if let Some(at) = places.iter().position(|(held, _)| *held == id) {
            places.remove(at);
            self.taken -= 1;
        }
        if places.is_empty() {
            self.by_source.remove(&source);
        }
    }

    /// Abandons the oldest handshake of the source holding the most places, if it holds more
    /// than one beyond what `newcomer` holds; returns whether a place was freed.
    fn evict_for(&mut self, newcomer: IpAddr) -> bool {
        let ours = self.held_by(newcomer);
        let Some((&greediest, places)) = self.by_source.iter_mut().max_by_key(|(_, p)| p.len())
        else {
            return false;
        };
        if places.len() <= ours + 1 {
            return false;
        }
        if let Some((_, evicted)) = places.pop_front() {
            evicted.cancel();
            self.taken -= 1;
        }
        if places.is_empty() {
            self.by_source.remove(&greediest);
        }
        true
    }
}

impl Pending {
    pub fn new(limits: &Limits) -> Self {
        Self {
            table: Arc::default(),
            max: limits.max_pending_handshakes,
            max_per_address: limits.max_pending_handshakes_per_address,
            retry_above: limits.retry_above,
        }
    }

    /// Decides on an attempt from `address`. `validated`: the attempt carries a Retry token, so
    /// its address is proven; `may_retry`: a Retry can still be asked of it.
    pub fn consider(&self, address: IpAddr, validated: bool, may_retry: bool) -> Verdict {
        let source = address_group(address);
        let mut table = lock(&self.table);
        // A Retry is an answer: none once every place is taken.
        let busy = table.taken >= self.retry_above && table.taken < self.max;
        if busy && !validated && may_retry {
            return Verdict::Retry;
        }
        if table.held_by(source) >= self.max_per_address {
            return Verdict::Drop("too many handshakes under way from one address");
        }
        if table.taken >= self.max && !table.evict_for(source) {
            return Verdict::Drop("too many handshakes under way");
        }
        let id = table.next_id;
        table.next_id += 1;
        let evicted = CancellationToken::new();
        table
            .by_source
            .entry(source)
            .or_default()
            .push_back((id, evicted.clone()));
        table.taken += 1;
        Verdict::Accept(Place {
            table: self.table.clone(),
            source,
            id,
            evicted,
        })
    }

    /// Places taken now.
    #[cfg(test)]
    fn taken(&self) -> usize {
        lock(&self.table).taken
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pending(max: usize, per_address: usize, retry_above: usize) -> Pending {
        Pending::new(&Limits {
            max_pending_handshakes: max,
            max_pending_handshakes_per_address: per_address,
            retry_above,
            ..Limits::default()
        })
    }

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([192, 0, 2, last])
    }

    fn accepted(verdict: Verdict) -> Place {
        match verdict {
            Verdict::Accept(place) => place,
            Verdict::Retry => panic!("asked for a Retry"),
            Verdict::Drop(reason) => panic!("dropped: {reason}"),
        }
    }

    #[test]
    fn attempts_over_a_cap_are_dropped_with_the_cap_they_met() {
        let pending = pending(2, 1, 100);
        let _a = accepted(pending.consider(ip(1), false, true));
        assert!(matches!(
            pending.consider(ip(1), false, true),
            Verdict::Drop("too many handshakes under way from one address")
        ));
        let _b = accepted(pending.consider(ip(2), false, true));
        assert!(matches!(
            pending.consider(ip(3), true, false),
            Verdict::Drop("too many handshakes under way")
        ));
    }

    #[test]
    fn past_the_threshold_unproven_sources_are_asked_to_retry() {
        let pending = pending(10, 10, 1);
        let _first = accepted(pending.consider(ip(1), false, true));
        assert!(matches!(
            pending.consider(ip(2), false, true),
            Verdict::Retry
        ));
        // With a Retry token, or when a Retry cannot be asked again, it goes on.
        let _proven = accepted(pending.consider(ip(2), true, false));
        let _no_retry = accepted(pending.consider(ip(3), false, false));
    }

    #[test]
    fn a_full_relay_asks_for_no_retry_and_drops() {
        let pending = pending(1, 1, 0);
        let _only = accepted(pending.consider(ip(1), true, false));
        assert!(matches!(
            pending.consider(ip(2), false, true),
            Verdict::Drop("too many handshakes under way")
        ));
    }

    #[test]
    fn a_few_sources_cannot_keep_every_place() {
        let limits = Limits::default();
        let pending = Pending::new(&limits);
        let per_address = limits.max_pending_handshakes_per_address;
        let fillers = limits.max_pending_handshakes / per_address;
        // The fewest sources that can fill every place, each holding its most, all proven.
        let held: Vec<Place> = (0..fillers * per_address)
            .map(|n| accepted(pending.consider(ip(n as u8 / per_address as u8), true, false)))
            .collect();
        assert_eq!(pending.taken(), limits.max_pending_handshakes);
        // Someone else still gets in, at the expense of a filler's oldest handshake.
        let newcomer = accepted(pending.consider(ip(200), true, false));
        let evicted: Vec<&Place> = held.iter().filter(|p| p.evicted.is_cancelled()).collect();
        assert_eq!(evicted.len(), 1);
        assert_eq!(pending.taken(), limits.max_pending_handshakes);
        // The evicted place, dropped when its handshake is abandoned, frees nothing twice.
        drop(held);
        assert_eq!(pending.taken(), 1);
        drop(newcomer);
        assert_eq!(pending.taken(), 0);
    }

    #[test]
    fn places_are_shared_until_everyone_holds_about_as_many() {
        let pending = pending(4, 4, 100);
        let _a: Vec<Place> = (0..4)
            .map(|_| accepted(pending.consider(ip(1), true, false)))
            .collect();
        // Each newcomer takes from the greediest source while it holds two more.
        let _b1 = accepted(pending.consider(ip(2), true, false));
        let _b2 = accepted(pending.consider(ip(2), true, false));
        assert!(matches!(
            pending.consider(ip(2), true, false),
            Verdict::Drop("too many handshakes under way")
        ));
        let _c = accepted(pending.consider(ip(3), true, false));
        assert_eq!(pending.taken(), 4);
    }

    #[test]
    fn one_ipv6_64_counts_as_one_address() {
        let pending = pending(100, 2, 100);
        let v6 = |text: &str| text.parse::<IpAddr>().unwrap();
        let _a = accepted(pending.consider(v6("2001:db8::1"), true, false));
        let _b = accepted(pending.consider(v6("2001:db8::2"), true, false));
        assert!(matches!(
            pending.consider(v6("2001:db8::3"), true, false),
            Verdict::Drop("too many handshakes under way from one address")
        ));
    }
}
