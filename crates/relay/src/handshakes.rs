//! Handshakes under way, before anyone is authenticated: capped in total and per source address,
//! and past a threshold only for sources that proved their address with a QUIC Retry. What is
//! over a cap is dropped without an answer, so a spoofed flood gets nothing back to amplify.

use std::net::IpAddr;
use std::sync::Arc;

use crate::places::{Full, Place, Places};
use crate::server::Limits;

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
    places: Arc<Places>,
    retry_above: usize,
}

impl Pending {
    pub fn new(limits: &Limits) -> Self {
        let places = Places::new(
            limits.max_pending_handshakes,
            limits.max_pending_handshakes_per_address,
        );
        Self {
            places: Arc::new(places),
            retry_above: limits.retry_above,
        }
    }

    /// Decides on an attempt from `address`. `validated`: the attempt carries a Retry token, so
    /// its address is proven; `may_retry`: a Retry can still be asked of it.
    pub fn consider(&self, address: IpAddr, validated: bool, may_retry: bool) -> Verdict {
        // A Retry is an answer: none once every place is taken.
        let busy = self.places.taken() >= self.retry_above && !self.places.full();
        if busy && !validated && may_retry {
            return Verdict::Retry;
        }
        match self.places.take(address) {
            Ok(place) => Verdict::Accept(place),
            Err(Full::Total) => Verdict::Drop("too many handshakes under way"),
            Err(Full::Address) => Verdict::Drop("too many handshakes under way from one address"),
        }
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
}
