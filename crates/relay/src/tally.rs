//! Repeated failures logged so that a flood of them costs a few lines: the first of each reason
//! in a period is logged at once, the rest are counted and summed up when the period ends.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Display;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The failures of one kind, such as refused handshakes or refused visitors.
pub struct Tally {
    what: &'static str,
    period: Mutex<Period>,
}

/// What the current period saw, by reason, and every failure since the start.
struct Period {
    started: Instant,
    reasons: HashMap<&'static str, Unlogged>,
    totals: BTreeMap<&'static str, u64>,
}

/// What a period saw of one reason beyond its first occurrence.
#[derive(Default)]
struct Unlogged {
    count: u64,
    last: String,
}

impl Tally {
    pub fn new(what: &'static str) -> Self {
        Self {
            what,
            period: Mutex::new(Period {
                started: Instant::now(),
                reasons: HashMap::new(),
                totals: BTreeMap::new(),
            }),
        }
    }

    /// Counts one failure, logging it if it is the first of its reason this period; returns
    /// whether it did. `from` says who failed: an address, a fingerprint.
    pub fn record(&self, reason: &'static str, from: &dyn Display) -> bool {
        let mut period = self.lock();
        *period.totals.entry(reason).or_default() += 1;
        match period.reasons.get_mut(reason) {
            Some(unlogged) => {
                unlogged.count += 1;
                unlogged.last.clear();
                use std::fmt::Write;
                let _ = write!(unlogged.last, "{from}");
                false
            }
            None => {
                period.reasons.insert(reason, Unlogged::default());
                drop(period);
                tracing::info!(%from, "{}: {reason}", self.what);
                true
            }
        }
    }

    /// Logs a summary of what was counted and not logged in the period that ends now, and
    /// starts a new one. Returns each reason summed up, with its count.
    pub fn flush(&self) -> Vec<(&'static str, u64)> {
        let (started, reasons) = {
            let mut period = self.lock();
            let started = std::mem::replace(&mut period.started, Instant::now());
            (started, std::mem::take(&mut period.reasons))
        };
        let secs = started.elapsed().as_secs();
        let mut summed = Vec::new();
        for (reason, unlogged) in reasons {
            if unlogged.count > 0 {
                tracing::info!(
                    last_from = %unlogged.last,
                    "{}: {reason}: {} more in the last {secs} s",
                    self.what,
                    unlogged.count,
                );
                summed.push((reason, unlogged.count));
            }
        }
        summed
    }

    /// Every failure counted since the start, by reason.
    pub fn totals(&self) -> BTreeMap<&'static str, u64> {
        self.lock().totals.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Period> {
        self.period.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Calls `flush` every `period` until the future is dropped.
pub async fn flush_every(period: Duration, flush: impl Fn()) {
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    loop {
        tick.tick().await;
        flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_of_each_reason_is_logged_and_the_rest_summed_up_once_a_period() {
        let tally = Tally::new("visitor refused");
        let logged: Vec<bool> = (0..5)
            .map(|i| tally.record("not in the forward's allow_from", &i))
            .collect();
        assert_eq!(logged, [true, false, false, false, false]);
        assert!(tally.record("the forward has its most open connections", &9));
        assert_eq!(tally.flush(), [("not in the forward's allow_from", 4)]);
        // A new period logs the first again, and a quiet one sums up nothing.
        assert!(tally.record("not in the forward's allow_from", &5));
        assert_eq!(tally.flush(), []);
        assert_eq!(tally.flush(), []);
        // The totals are never reset.
        let totals = tally.totals();
        assert_eq!(totals["not in the forward's allow_from"], 6);
        assert_eq!(totals["the forward has its most open connections"], 1);
    }
}
