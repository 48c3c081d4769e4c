//! Who connected to the public ports. The services behind the agent see every visitor as the
//! agent's own address, so the relay's log is the only record of who it was: one INFO line when
//! a visitor connection is accepted, and one when it closes, with its bytes and duration. Past
//! [`LINES_PER_PERIOD`] connections in a period, the rest are counted and summed up in one line
//! when the period ends, so that a flood of connections cannot flood the log.

use std::net::SocketAddr;
use std::num::NonZeroU64;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tether_common::carry::splice::{SpliceError, Transferred};

/// Visitor connections logged one by one in a period at most.
pub const LINES_PER_PERIOD: usize = 64;

pub struct Audit {
    period: Mutex<Period>,
    /// What [`Logged`] counts from.
    began: Instant,
}

impl Default for Audit {
    fn default() -> Self {
        Self {
            period: Mutex::default(),
            began: Instant::now(),
        }
    }
}

#[derive(Default)]
struct Period {
    logged: usize,
    unlogged: u64,
    last: Option<SocketAddr>,
}

/// A visitor connection logged when it was accepted: its close is logged too. It is held by
/// every such connection, so it is 8 bytes: when the connection was accepted, in milliseconds
/// after the audit began, plus one.
pub struct Logged(NonZeroU64);

impl Audit {
    /// Notes an accepted connection, logging it if the period has lines left; `Some` if it did.
    pub fn accepted(&self, forward: &str, visitor: SocketAddr) -> Option<Logged> {
        let mut period = self.lock();
        if period.logged >= LINES_PER_PERIOD {
            period.unlogged += 1;
            period.last = Some(visitor);
            return None;
        }
        period.logged += 1;
        drop(period);
        tracing::info!(%forward, %visitor, "visitor connected");
        let since = u64::try_from(self.began.elapsed().as_millis()).unwrap_or(u64::MAX);
        Some(Logged(NonZeroU64::MIN.saturating_add(since)))
    }

    /// Sums up what was not logged in the period that ends now, and starts a new one; returns
    /// how many connections that was.
    pub fn flush(&self, period: Duration) -> u64 {
        let ended = std::mem::take(&mut *self.lock());
        if ended.unlogged > 0 {
            let last = ended.last.map_or_else(String::new, |a| a.to_string());
            tracing::info!(
                last_from = %last,
                "visitors: {} more connected in the last {} s, not logged one by one",
                ended.unlogged,
                period.as_secs()
            );
        }
        ended.unlogged
    }

    fn lock(&self) -> MutexGuard<'_, Period> {
        self.period.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Logs how the connection `logged` ended, with what it carried.
    pub fn closed(
        &self,
        logged: Logged,
        forward: &str,
        visitor: SocketAddr,
        moved: Transferred,
        result: &Result<(), SpliceError>,
    ) {
        let since = Duration::from_millis(logged.0.get() - 1);
        let lasted = self.began.elapsed().saturating_sub(since);
        let seconds = format!("{:.1}", lasted.as_secs_f64());
        let (bytes_in, bytes_out) = (moved.to_stream, moved.to_tcp);
        match result {
            Ok(()) => {
                tracing::info!(%forward, %visitor, bytes_in, bytes_out, %seconds, "visitor disconnected")
            }
            Err(error) => tracing::info!(
                %forward,
                %visitor,
                bytes_in,
                bytes_out,
                %seconds,
                %error,
                "visitor disconnected"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn past_the_lines_of_a_period_connections_are_counted() {
        let audit = Audit::default();
        let visitor: SocketAddr = "203.0.113.9:40000".parse().unwrap();
        let logged = (0..LINES_PER_PERIOD + 10)
            .filter(|_| audit.accepted("ssh", visitor).is_some())
            .count();
        assert_eq!(logged, LINES_PER_PERIOD);
        assert_eq!(audit.flush(Duration::from_secs(60)), 10);
        // A new period logs again.
        assert!(audit.accepted("ssh", visitor).is_some());
        assert_eq!(audit.flush(Duration::from_secs(60)), 0);
    }
}
