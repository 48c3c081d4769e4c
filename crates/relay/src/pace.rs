//! How often an agent may change its forwards: a few changes at once, then one per period.
//! Pure bookkeeping, the time given by the caller, so that it is tested without waiting.

use std::time::Duration;

use tokio::time::Instant;

/// Turns taken at a steady pace, with a burst allowed after a quiet spell.
#[derive(Debug, Clone)]
pub struct Pace {
    every: Duration,
    burst: u32,
    /// When the turns taken would be paid off at one per `every`.
    paid_off: Instant,
}

impl Pace {
    /// One turn per `every`, or `burst` at once after `burst` periods of none.
    pub fn new(every: Duration, burst: u32, now: Instant) -> Self {
        Self {
            every,
            burst: burst.max(1),
            paid_off: now,
        }
    }

    /// Takes a turn at `now`, and returns when the next one may be taken: `None` if at once.
    pub fn take(&mut self, now: Instant) -> Option<Instant> {
        self.paid_off = self.paid_off.max(now) + self.every;
        let next = self.paid_off.checked_sub(self.every * (self.burst - 1))?;
        (next > now).then_some(next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_one_turn_per_period() {
        let every = Duration::from_secs(1);
        let start = Instant::now();
        let mut pace = Pace::new(every, 3, start);
        assert_eq!(pace.take(start), None);
        assert_eq!(pace.take(start), None);
        // The third turn of the burst: the next must wait a period.
        assert_eq!(pace.take(start), Some(start + every));
        assert_eq!(pace.take(start + every), Some(start + every * 2));
        // After a quiet spell as long as the burst, a whole burst again.
        let later = start + every * 10;
        assert_eq!(pace.take(later), None);
        assert_eq!(pace.take(later), None);
        assert_eq!(pace.take(later), Some(later + every));
    }

    #[test]
    fn a_burst_of_one_is_a_steady_pace() {
        let every = Duration::from_millis(500);
        let start = Instant::now();
        let mut pace = Pace::new(every, 0, start);
        assert_eq!(pace.take(start), Some(start + every));
        assert_eq!(pace.take(start + every * 3), Some(start + every * 4));
    }
}
