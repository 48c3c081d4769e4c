//! What one forward carried: visitor connections, flows, bytes and datagrams each way. The relay
//! and the agent each keep one [`ForwardTraffic`] per forward for as long as they run, so that
//! `status` and the metrics show totals that only grow.
//!
//! "In" is the way from visitors towards the service beside the agent, "out" the way back, on
//! both ends alike.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::carry::splice::Meter;

#[derive(Debug, Default)]
pub struct ForwardTraffic {
    visitors_open: AtomicU64,
    visitors: AtomicU64,
    flows: AtomicU64,
    /// Bytes of TCP payload towards the service.
    bytes_in: AtomicU64,
    /// Bytes of TCP payload towards visitors.
    bytes_out: AtomicU64,
    datagrams_in: AtomicU64,
    datagrams_out: AtomicU64,
    datagram_bytes_in: AtomicU64,
    datagram_bytes_out: AtomicU64,
}

/// A [`ForwardTraffic`] at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrafficCount {
    /// Visitor TCP connections open now.
    pub visitors_open: u64,
    /// Visitor TCP connections ever carried.
    pub visitors: u64,
    /// UDP flows ever opened.
    pub flows: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub datagrams_in: u64,
    pub datagrams_out: u64,
    /// UDP payload bytes (headers not counted) towards the service.
    pub datagram_bytes_in: u64,
    pub datagram_bytes_out: u64,
}

/// One visitor TCP connection, counted as open until dropped.
pub struct OpenVisitor(Arc<ForwardTraffic>);

impl Drop for OpenVisitor {
    fn drop(&mut self) {
        self.0.visitors_open.fetch_sub(1, Ordering::Relaxed);
    }
}

fn add(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

impl ForwardTraffic {
    /// Counts a new visitor connection, open until the returned guard is dropped.
    pub fn visitor(self: &Arc<Self>) -> OpenVisitor {
        add(&self.visitors, 1);
        add(&self.visitors_open, 1);
        OpenVisitor(self.clone())
    }

    /// Where the relay's splice of a visitor connection counts: read from the visitor is in.
    pub fn at_visitor(&self) -> Meter<'_> {
        Meter {
            from_tcp: &self.bytes_in,
            to_tcp: &self.bytes_out,
        }
    }

    /// Where the agent's splice of a service connection counts: written to the service is in.
    pub fn at_service(&self) -> Meter<'_> {
        Meter {
            from_tcp: &self.bytes_out,
            to_tcp: &self.bytes_in,
        }
    }

    pub fn flow_opened(&self) {
        add(&self.flows, 1);
    }

    /// Counts one datagram of `payload` bytes towards the service.
    pub fn datagram_in(&self, payload: usize) {
        add(&self.datagrams_in, 1);
        add(&self.datagram_bytes_in, payload as u64);
    }

    /// Counts one datagram of `payload` bytes towards a visitor.
    pub fn datagram_out(&self, payload: usize) {
        add(&self.datagrams_out, 1);
        add(&self.datagram_bytes_out, payload as u64);
    }

    pub fn count(&self) -> TrafficCount {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        TrafficCount {
            visitors_open: get(&self.visitors_open),
            visitors: get(&self.visitors),
            flows: get(&self.flows),
            bytes_in: get(&self.bytes_in),
            bytes_out: get(&self.bytes_out),
            datagrams_in: get(&self.datagrams_in),
            datagrams_out: get(&self.datagrams_out),
            datagram_bytes_in: get(&self.datagram_bytes_in),
            datagram_bytes_out: get(&self.datagram_bytes_out),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_visitor_is_open_until_its_guard_drops() {
        let traffic = Arc::new(ForwardTraffic::default());
        let first = traffic.visitor();
        let second = traffic.visitor();
        drop(first);
        let count = traffic.count();
        assert_eq!((count.visitors_open, count.visitors), (1, 2));
        drop(second);
        assert_eq!(traffic.count().visitors_open, 0);
    }

    #[test]
    fn datagrams_count_their_payload_each_way() {
        let traffic = ForwardTraffic::default();
        traffic.datagram_in(100);
        traffic.datagram_in(20);
        traffic.datagram_out(7);
        let count = traffic.count();
        assert_eq!((count.datagrams_in, count.datagram_bytes_in), (2, 120));
        assert_eq!((count.datagrams_out, count.datagram_bytes_out), (1, 7));
    }
}
