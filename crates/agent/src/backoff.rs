//! How long the agent waits between attempts to reach the relay: from 0.5 s, doubling to 15 s,
//! with jitter so that many agents cut off together do not come back in step.

use std::time::Duration;

pub const INITIAL: Duration = Duration::from_millis(500);
pub const MAX: Duration = Duration::from_secs(15);

#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self { base: INITIAL }
    }
}

impl Backoff {
    /// The next delay, between half and all of the current base; `jitter` is uniform in [0, 1).
    /// The base then doubles, up to [`MAX`].
    pub fn next_delay(&mut self, jitter: f64) -> Duration {
        let half = self.base / 2;
        let delay = half + half.mul_f64(jitter.clamp(0.0, 1.0));
        self.base = (self.base * 2).min(MAX);
        delay
    }

    /// Back to the shortest delay, once a session has stayed up.
    pub fn reset(&mut self) {
        self.base = INITIAL;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_from_half_a_second_to_fifteen() {
        let mut backoff = Backoff::default();
        let most: Vec<_> = (0..8).map(|_| backoff.next_delay(1.0)).collect();
        let secs: Vec<f64> = most.iter().map(Duration::as_secs_f64).collect();
        assert_eq!(secs, [0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 15.0, 15.0]);
    }

    #[test]
    fn jitter_stays_within_half_and_all_of_the_base() {
        let mut backoff = Backoff::default();
        assert_eq!(backoff.next_delay(0.0), Duration::from_millis(250));
        assert_eq!(backoff.next_delay(0.5), Duration::from_millis(750));
        for _ in 0..10 {
            backoff.next_delay(0.0);
        }
        assert_eq!(backoff.next_delay(0.0), MAX / 2);
    }

    #[test]
    fn reset_starts_over() {
        let mut backoff = Backoff::default();
        for _ in 0..5 {
            backoff.next_delay(1.0);
        }
        backoff.reset();
        assert_eq!(backoff.next_delay(1.0), INITIAL);
    }
}
