//! A table of UDP flows with caps and idle expiry, shared by the relay (flows by visitor source)
//! and the agent (flows by flow id). Pure bookkeeping: the caller passes the time, so the rules
//! are tested without sockets or sleeps.
//!
//! Two caps hold: one for the whole table, and one per group (the relay groups by visitor
//! address, so one source cannot take every slot). A new flow that would pass either cap evicts
//! the longest idle flow of its group or of the table. A table may protect its active flows: a
//! flow seen within the protection time is never evicted to make room for a stranger's, so a
//! flood of new sources cannot push out a conversation under way; the new flow is refused
//! instead.

use std::collections::HashMap;
use std::hash::Hash;
use std::time::{Duration, Instant};

/// How often to look for idle flows, given the shortest idle time among a session's forwards:
/// a quarter of it, so that a flow is forgotten at most a quarter late, within 100 ms to 5 s.
pub fn sweep_interval(shortest_idle: Option<Duration>) -> Duration {
    (shortest_idle.unwrap_or(Duration::from_secs(20)) / 4)
        .clamp(Duration::from_millis(100), Duration::from_secs(5))
}

struct Entry<V> {
    value: V,
    last_seen: Instant,
}

pub struct FlowTable<K, V, G> {
    entries: HashMap<K, Entry<V>>,
    per_group: HashMap<G, usize>,
    max_flows: usize,
    max_per_group: usize,
    group_of: fn(&K) -> G,
    protect: Duration,
}

impl<K: Eq + Hash + Clone, V, G: Eq + Hash> FlowTable<K, V, G> {
    /// `max_flows` and `max_per_group` are at least 1.
    pub fn new(max_flows: usize, max_per_group: usize, group_of: fn(&K) -> G) -> Self {
        Self {
            entries: HashMap::new(),
            per_group: HashMap::new(),
            max_flows: max_flows.max(1),
            max_per_group: max_per_group.max(1),
            group_of,
            protect: Duration::ZERO,
        }
    }

    /// Flows seen within `protect` are not evicted to make room for another group's flow.
    /// The agent keeps none: the relay decides which flows live, and the agent follows.
    pub fn protect_active(mut self, protect: Duration) -> Self {
        self.protect = protect;
        self
    }

    /// The flow's value, marking it seen at `now`.
    pub fn touch(&mut self, key: &K, now: Instant) -> Option<&mut V> {
        let entry = self.entries.get_mut(key)?;
        entry.last_seen = now;
        Some(&mut entry.value)
    }

    /// Adds a flow, first evicting what the caps require. Returns the evicted flows, or `None`
    /// (and adds nothing) if the table is full of protected flows.
    pub fn insert(&mut self, key: K, value: V, now: Instant) -> Option<Vec<(K, V)>> {
        let mut evicted = Vec::new();
        if let Some(old) = self.remove(&key) {
            evicted.push((key.clone(), old));
        }
        let group = (self.group_of)(&key);
        if self.per_group.get(&group).copied().unwrap_or(0) >= self.max_per_group {
            // Within its own group a flow makes room for the next, as when mosh hops ports.
            let group_of = self.group_of;
            evicted.extend(self.evict_longest_idle(|k| group_of(k) == group));
        }
        if self.entries.len() >= self.max_flows {
            let longest_idle = self.entries.values().map(|e| e.last_seen).min();
            let protected =
                longest_idle.is_some_and(|seen| now.saturating_duration_since(seen) < self.protect);
            let group_of = self.group_of;
            let room = match protected {
                false => self.evict_longest_idle(|_| true),
                // Every flow is active: only the newcomer's own group may make room.
                true => self.evict_longest_idle(|k| group_of(k) == group),
            };
            match room {
                Some(flow) => evicted.push(flow),
                None => return None,
            }
        }
        *self.per_group.entry(group).or_default() += 1;
        self.entries.insert(
            key,
            Entry {
                value,
                last_seen: now,
            },
        );
        Some(evicted)
    }

    pub fn remove(&mut self, key: &K) -> Option<V> {
        let entry = self.entries.remove(key)?;
        let group = (self.group_of)(key);
        if let Some(count) = self.per_group.get_mut(&group) {
            *count -= 1;
            if *count == 0 {
                self.per_group.remove(&group);
            }
        }
        Some(entry.value)
    }

    /// Removes and returns the flows not seen for `idle` or longer.
    pub fn expire(&mut self, now: Instant, idle: Duration) -> Vec<(K, V)> {
        let stale: Vec<K> = self
            .entries
            .iter()
            .filter(|(_, e)| now.saturating_duration_since(e.last_seen) >= idle)
            .map(|(k, _)| k.clone())
            .collect();
        stale
            .into_iter()
            .filter_map(|k| self.remove(&k).map(|v| (k, v)))
            .collect()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn evict_longest_idle(&mut self, within: impl Fn(&K) -> bool) -> Option<(K, V)> {
        let key = self
            .entries
            .iter()
            .filter(|(k, _)| within(k))
            .min_by_key(|(_, e)| e.last_seen)
            .map(|(k, _)| k.clone())?;
        self.remove(&key).map(|v| (key, v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Keys are (visitor, port); groups are visitors.
    fn table(max: usize, per_visitor: usize) -> FlowTable<(u8, u16), &'static str, u8> {
        FlowTable::new(max, per_visitor, |(visitor, _)| *visitor)
    }

    fn at(start: Instant, secs: u64) -> Instant {
        start + Duration::from_secs(secs)
    }

    #[test]
    fn idle_flows_expire_and_seen_ones_stay() {
        let t0 = Instant::now();
        let mut flows = table(10, 10);
        flows.insert((1, 1000), "a", t0);
        flows.insert((2, 1000), "b", t0);
        assert!(flows.touch(&(2, 1000), at(t0, 100)).is_some());
        let expired = flows.expire(at(t0, 120), Duration::from_secs(120));
        assert_eq!(expired, [((1, 1000), "a")]);
        assert_eq!(flows.len(), 1);
        assert!(flows
            .expire(at(t0, 219), Duration::from_secs(120))
            .is_empty());
        assert_eq!(flows.expire(at(t0, 220), Duration::from_secs(120)).len(), 1);
        assert!(flows.is_empty());
    }

    #[test]
    fn the_table_cap_evicts_the_longest_idle_flow() {
        let t0 = Instant::now();
        let mut flows = table(3, 3);
        flows.insert((1, 1), "oldest", t0);
        flows.insert((2, 1), "middle", at(t0, 1));
        flows.insert((3, 1), "newest", at(t0, 2));
        // The oldest was seen last, so the middle one is now the longest idle.
        flows.touch(&(1, 1), at(t0, 3));
        let evicted = flows.insert((4, 1), "new", at(t0, 4));
        assert_eq!(evicted, Some(vec![((2, 1), "middle")]));
        assert_eq!(flows.len(), 3);
    }

    #[test]
    fn one_visitor_cannot_take_every_slot() {
        let t0 = Instant::now();
        let mut flows = table(100, 2);
        flows.insert((9, 1), "other visitor", t0);
        flows.insert((1, 1), "first", at(t0, 1));
        flows.insert((1, 2), "second", at(t0, 2));
        // A third source port of visitor 1 evicts that visitor's longest idle flow, not
        // visitor 9's older one.
        let evicted = flows.insert((1, 3), "third", at(t0, 3));
        assert_eq!(evicted, Some(vec![((1, 1), "first")]));
        assert!(flows.touch(&(9, 1), at(t0, 4)).is_some());
        assert_eq!(flows.len(), 3);
    }

    #[test]
    fn a_flood_of_sources_stays_within_the_cap() {
        let t0 = Instant::now();
        let mut flows = table(64, 4);
        for i in 0..3000u16 {
            flows.insert(
                ((i % 251) as u8, i),
                "flood",
                t0 + Duration::from_millis(u64::from(i)),
            );
            assert!(flows.len() <= 64);
        }
        assert_eq!(flows.len(), 64);
    }

    #[test]
    fn a_flood_of_new_sources_cannot_push_out_active_flows() {
        let t0 = Instant::now();
        let mut flows = table(3, 3).protect_active(Duration::from_secs(5));
        flows.insert((1, 1), "ssh-like, idle", t0);
        flows.insert((2, 1), "mosh", at(t0, 1));
        flows.insert((3, 1), "flood", at(t0, 6));
        // At 7 s the first flow has been idle for 7 s and makes room.
        let evicted = flows.insert((4, 1), "flood", at(t0, 7));
        assert_eq!(evicted, Some(vec![((1, 1), "ssh-like, idle")]));
        // Every flow was seen within 5 s: the newcomer is refused, nothing is evicted.
        flows.touch(&(2, 1), at(t0, 7));
        assert_eq!(flows.insert((5, 1), "flood", at(t0, 8)), None);
        assert_eq!(flows.len(), 3);
        assert!(flows.touch(&(2, 1), at(t0, 8)).is_some());
        // A visitor that already has a flow may replace its own, as mosh does when it hops.
        let evicted = flows.insert((2, 2), "mosh, hopped", at(t0, 9));
        assert_eq!(evicted, Some(vec![((2, 1), "mosh")]));
        assert_eq!(flows.len(), 3);
    }

    #[test]
    fn inserting_a_known_key_replaces_it() {
        let t0 = Instant::now();
        let mut flows = table(10, 10);
        flows.insert((1, 1), "old", t0);
        assert_eq!(flows.insert((1, 1), "new", t0), Some(vec![((1, 1), "old")]));
        assert_eq!(flows.touch(&(1, 1), t0).copied(), Some("new"));
        assert_eq!(flows.len(), 1);
    }
}
