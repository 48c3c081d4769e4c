//! Handshakes under way, before anyone is authenticated: capped in total and per source address,
//! and past a threshold only for sources that proved their address with a QUIC Retry. What is
//! over a cap is dropped without an answer, so a spoofed flood gets nothing back to amplify.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::server::Limits;

/// What to do with a new connection attempt.
pub enum Verdict {
    /// Go on with the handshake; the permit holds its place until dropped.
    Accept(Permit),
    /// Ask the client to prove its address first.
    Retry,
    /// Drop it unanswered, for this reason.
    Drop(&'static str),
}

pub struct Pending {
    max: usize,
    max_per_address: usize,
    retry_above: usize,
    counts: Mutex<Counts>,
}

#[derive(Default)]
struct Counts {
    total: usize,
    by_address: HashMap<IpAddr, usize>,
}

/// One handshake's place among those under way.
pub struct Permit {
    pending: Arc<Pending>,
    address: IpAddr,
}

impl Pending {
    pub fn new(limits: &Limits) -> Self {
        Self {
            max: limits.max_pending_handshakes,
            max_per_address: limits.max_pending_handshakes_per_address,
            retry_above: limits.retry_above,
            counts: Mutex::default(),
        }
    }

    /// Decides on an attempt from `address`. `validated`: the attempt carries a Retry token, so
    /// its address is proven; `may_retry`: a Retry can still be asked of it.
    pub fn consider(
        self: &Arc<Self>,
        address: IpAddr,
        validated: bool,
        may_retry: bool,
    ) -> Verdict {
        let mut counts = self.lock();
        if counts.total >= self.max {
            return Verdict::Drop("too many handshakes under way");
        }
        if counts.total >= self.retry_above && !validated && may_retry {
            return Verdict::Retry;
        }
        let from_address = counts.by_address.entry(address).or_default();
        if *from_address >= self.max_per_address {
            return Verdict::Drop("too many handshakes under way from one address");
        }
        *from_address += 1;
        counts.total += 1;
        Verdict::Accept(Permit {
            pending: self.clone(),
            address,
        })
    }

    /// Handshakes under way now.
    #[cfg(test)]
    pub fn count(&self) -> usize {
        self.lock().total
    }

    fn lock(&self) -> MutexGuard<'_, Counts> {
        self.counts.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut counts = self.pending.lock();
        counts.total -= 1;
        if let Some(count) = counts.by_address.get_mut(&self.address) {
            *count -= 1;
            if *count == 0 {
                counts.by_address.remove(&self.address);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pending(max: usize, per_address: usize, retry_above: usize) -> Arc<Pending> {
        Arc::new(Pending::new(&Limits {
            max_pending_handshakes: max,
            max_pending_handshakes_per_address: per_address,
            retry_above,
            ..Limits::default()
        }))
    }

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([192, 0, 2, last])
    }

    fn accepted(verdict: Verdict) -> Permit {
        match verdict {
            Verdict::Accept(permit) => permit,
            Verdict::Retry => panic!("asked for a Retry"),
            Verdict::Drop(reason) => panic!("dropped: {reason}"),
        }
    }

    #[test]
    fn caps_hold_in_total_and_per_address_and_free_on_drop() {
        let pending = pending(3, 2, 100);
        let a1 = accepted(pending.consider(ip(1), false, true));
        let _a2 = accepted(pending.consider(ip(1), false, true));
        assert!(matches!(
            pending.consider(ip(1), false, true),
            Verdict::Drop("too many handshakes under way from one address")
        ));
        let _b = accepted(pending.consider(ip(2), false, true));
        assert!(matches!(
            pending.consider(ip(3), true, false),
            Verdict::Drop("too many handshakes under way")
        ));
        drop(a1);
        assert_eq!(pending.count(), 2);
        let _a3 = accepted(pending.consider(ip(1), false, true));
        assert_eq!(pending.lock().by_address.len(), 2);
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
        assert_eq!(pending.count(), 3);
    }
}
