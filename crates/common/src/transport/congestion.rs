//! The congestion controller of every session: quinn's BBR, with a bound on the queue it builds
//! in front of a slow link.
//!
//! quinn paces by the congestion window (a window per smoothed round trip), not by BBR's own
//! rate, so BBR's window alone decides how much waits in the bottleneck's queue. Behind a home
//! uplink with a deep queue (`peers --lab --rate-mbit 50 --queue-packets 1000`, 20 ms each way)
//! it kept that queue full: a keystroke beside a bulk transfer waited 278 ms, where rathole
//! over the kernel's BBR waited 43 ms.
//!
//! So while a standing queue shows (the least round trip of the last half round trip is more
//! than [`queue_target`] twice over the least of the last [`MIN_RTT_WINDOW`]; a delay that
//! only some packets see, such as a retransmission's, shows none), the window is capped at what
//! the path delivered lately (the median of the last round trips' rates) times the least round
//! trip plus one [`queue_target`]:
//! enough to keep the link busy, and a queue of about that target. One round trip in eight the
//! cap is a quarter higher, and the next a quarter lower ([`GAINS`]), so that a path that can
//! carry more shows it and the cap follows, rather than the cap measuring only itself. The cap
//! lets go once the queue stayed down to half the target for [`RELEASE_AFTER`], and BBR probes
//! for more on its own again.
//! Random loss (Wi-Fi) shows no queue and is left to BBR, which does not take it for
//! congestion.
//!
//! Measured over the lab's uplink, one run of 15 s each, BBR alone against this: a 64-byte
//! request beside a bulk transfer p50 278.0 -> 51.0 ms and p99 555.5 -> 63.8 ms, one stream
//! 44.6 -> 45.8 Mbit/s (no tunnel: 42.7 ms, 46.8 Mbit/s); over the lossy lab (2% loss
//! each way) one stream 543.8 -> 499.5 Mbit/s, within the run-to-run spread there. What did not
//! work, on the same runs: gating on the smoothed round trip rather than the standing one
//! (p50 127.6 ms; and on the TCP path, whose round trips swing with TCP's retransmissions, one
//! stream fell from 178 to 5.6 Mbit/s: the cap measured only itself); a cap from the best rate
//! of the last round trips, let go as soon as the queue was down (p50 130.7 ms: right after the
//! cap bites, quinn paces by the old, long round trip, the queue empties, the cap let go and
//! BBR filled the queue again). Those runs aimed at a queue of a quarter of the round trip;
//! the eighth aimed at now gives a p50 of 45.8 ms (see [`queue_target`]). The TCP path has no
//! QUIC controller at all (`carrier::LeftToTcp`).
//!
//! A queue that never drains would pass for the path's own round trip once the least one
//! measured ages out, and the cap would creep up with it. So while capping, every
//! [`DRAIN_EVERY`] the window drops to half the path's delivery for a round trip (at least
//! [`DRAIN_FOR`]), which empties the queue and measures the round trip afresh; as BBR's own
//! PROBE_RTT does, at a cost of a few percent of throughput while it caps.

use std::any::Any;
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use quinn::congestion::{BbrConfig, Controller, ControllerFactory, ControllerMetrics};
use quinn_proto::RttEstimator;

/// How long a least round trip, and a best delivery rate, count.
pub const MIN_RTT_WINDOW: Duration = Duration::from_secs(10);

/// The queue the cap aims at, in time: an eighth of the round trip, at least [`QUEUE_FLOOR`].
///
/// Over the lab's uplink (40 ms round trip), three rounds of 30 s each side by side, medians:
/// with a quarter, a request beside a bulk transfer p50 50.9 ms and p99 64.2, one stream 46.1
/// Mbit/s; with an eighth 45.8 ms, 58.4 and 44.7; with a sixteenth 43.6 ms, 62.8 and 42.0
/// (rathole with Noise 42.6 ms, 53.2 and 47.1: a sixteenth fell under 0.9x its throughput).
/// The eighth costs about 5% over the lossy lab (20 ms and 2% loss each way, the same rounds):
/// one stream 438.1 Mbit/s where 464.0, a request beside a bulk transfer p50 48.7 ms where 53.1.
pub fn queue_target(min_rtt: Duration) -> Duration {
    (min_rtt / 8).max(QUEUE_FLOOR)
}

/// The least queue aimed at: under it, a busy machine's scheduling alone would starve the link.
///
/// On loopback (a round trip well under a millisecond), three rounds of 5 s side by side,
/// medians: with 2 ms a request beside a bulk transfer p50 2,980 us, that transfer 2,812
/// Mbit/s, four streams 2,655; with 1 ms 1,638 us, 2,427 and 2,477; with 0.5 ms 965 us, 2,300
/// and 2,085 (rathole with Noise 185 us, 2,022 and 2,417). Shorter gives a request less to
/// wait behind, but at a cost in throughput, and nowhere near rathole's wait, whose request
/// rides a TCP connection of its own.
pub const QUEUE_FLOOR: Duration = Duration::from_millis(2);

/// How long the queue must stay down to half the target before the cap lets go.
pub const RELEASE_AFTER: Duration = Duration::from_secs(1);

/// While capping, how often the queue is drained to measure the round trip afresh.
pub const DRAIN_EVERY: Duration = Duration::from_secs(4);

/// How long a drain lasts at least (and a round trip, if longer).
pub const DRAIN_FOR: Duration = Duration::from_millis(100);

/// The cap's gain over the round trips, in turn: probe for more, drain what that queued, cruise.
pub const GAINS: [f64; 8] = [1.25, 0.75, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0];

/// Delivery-rate samples kept: one per round trip, over about ten of them.
const RATE_SAMPLES: usize = 16;

/// Builds [`ShortQueue`] controllers around BBR.
#[derive(Debug, Default)]
pub struct ShortQueueConfig {
    bbr: Arc<BbrConfig>,
}

impl ControllerFactory for ShortQueueConfig {
    fn build(self: Arc<Self>, now: Instant, current_mtu: u16) -> Box<dyn Controller> {
        Box::new(ShortQueue {
            inner: self.bbr.clone().build(now, current_mtu),
            limits: Limits::new(now),
            mtu: current_mtu,
        })
    }
}

/// The least the cap leaves in flight, in packets.
const MIN_CAP_PACKETS: u64 = 4;

/// BBR, its window capped while a standing queue shows (see the module docs).
pub struct ShortQueue {
    inner: Box<dyn Controller>,
    limits: Limits,
    mtu: u16,
}

impl Controller for ShortQueue {
    fn on_sent(&mut self, now: Instant, bytes: u64, last_packet_number: u64) {
        self.inner.on_sent(now, bytes, last_packet_number);
    }

    fn on_ack(
        &mut self,
        now: Instant,
        sent: Instant,
        bytes: u64,
        app_limited: bool,
        rtt: &RttEstimator,
    ) {
        self.inner.on_ack(now, sent, bytes, app_limited, rtt);
        self.limits.acked(
            now,
            now.saturating_duration_since(sent),
            bytes,
            app_limited,
            rtt.get(),
        );
    }

    fn on_end_acks(
        &mut self,
        now: Instant,
        in_flight: u64,
        app_limited: bool,
        largest_packet_num_acked: Option<u64>,
    ) {
        self.inner
            .on_end_acks(now, in_flight, app_limited, largest_packet_num_acked);
    }

    fn on_congestion_event(
        &mut self,
        now: Instant,
        sent: Instant,
        is_persistent_congestion: bool,
        lost_bytes: u64,
    ) {
        self.inner
            .on_congestion_event(now, sent, is_persistent_congestion, lost_bytes);
    }

    fn on_mtu_update(&mut self, new_mtu: u16) {
        self.mtu = new_mtu;
        self.inner.on_mtu_update(new_mtu);
    }

    fn window(&self) -> u64 {
        let window = self.inner.window();
        match self.limits.cap() {
            Some(cap) => window.min(cap.max(MIN_CAP_PACKETS * u64::from(self.mtu))),
            None => window,
        }
    }

    fn metrics(&self) -> ControllerMetrics {
        let mut metrics = self.inner.metrics();
        metrics.congestion_window = self.window();
        metrics
    }

    fn clone_box(&self) -> Box<dyn Controller> {
        Box::new(ShortQueue {
            inner: self.inner.clone_box(),
            limits: self.limits.clone(),
            mtu: self.mtu,
        })
    }

    fn initial_window(&self) -> u64 {
        self.inner.initial_window()
    }

    fn into_any(self: Box<Self>) -> Box<dyn Any> {
        self
    }
}

/// What the path showed lately: its least round trip, its best delivery rate, and whether a
/// standing queue shows. The clock is the caller's.
#[derive(Debug, Clone)]
struct Limits {
    /// Round-trip samples (the time from a packet's sending to its acknowledgement), the least
    /// of each stretch of a second, with when.
    rtts: VecDeque<(Instant, Duration)>,
    /// Bytes acknowledged since `round_start`.
    round_bytes: u64,
    round_start: Instant,
    /// Delivery rates (bytes per second) measured over a round trip each, with when.
    rates: VecDeque<(Instant, f64)>,
    /// The least round trip of the current half round trip, and of the one before.
    recent: (Instant, Duration, Duration),
    /// Which of [`GAINS`] applies this round trip.
    gain: usize,
    /// Whether the cap applies: a standing queue showed and has not stayed drained since.
    capping: bool,
    /// Since when the queue has been down to half the target, if it is.
    low_since: Option<Instant>,
    /// When the last drain ended, and when the one under way ends.
    drained_at: Instant,
    draining_until: Option<Instant>,
    /// The median of `rates`, and the cap, as of the last acknowledgement: quinn asks for the
    /// window several times for each packet it sends, far more often than they change. Worked
    /// out at each ask, the sort and the window took 2.1% of the machine's CPU time on a
    /// loopback bulk transfer, beside 0.8% in malloc and free (`perf record -a`; the relay 37%
    /// in all); kept, one stream on loopback carried 3,405 Mbit/s at 3.52 CPU s per GB where
    /// 3,176 at 3.81 (medians of six rounds alternating, `peers --systems tether --runs 1
    /// --seconds 5`).
    rate: Option<f64>,
    cap: Option<u64>,
}

impl Limits {
    fn new(now: Instant) -> Self {
        Self {
            rtts: VecDeque::new(),
            round_bytes: 0,
            round_start: now,
            rates: VecDeque::new(),
            recent: (now, Duration::MAX, Duration::MAX),
            gain: 0,
            capping: false,
            low_since: None,
            drained_at: now,
            draining_until: None,
            rate: None,
            cap: None,
        }
    }

    /// A packet of `bytes` was acknowledged `rtt` after it was sent; `smoothed` is quinn's
    /// smoothed round trip.
    fn acked(
        &mut self,
        now: Instant,
        rtt: Duration,
        bytes: u64,
        app_limited: bool,
        smoothed: Duration,
    ) {
        self.note_rtt(now, rtt);
        let Some(min_rtt) = self.min_rtt() else {
            return;
        };
        let (since, current, _) = &mut self.recent;
        if now.duration_since(*since) >= smoothed / 2 {
            self.recent = (now, rtt, *current);
        } else {
            *current = (*current).min(rtt);
        }
        self.round_bytes += bytes;
        let round = now.saturating_duration_since(self.round_start);
        if round >= min_rtt.max(QUEUE_FLOOR) {
            let rate = self.round_bytes as f64 / round.as_secs_f64();
            // A sender with too little to send measures itself, not the path: kept only if
            // it is a new best.
            if !app_limited || self.best_rate().is_none_or(|best| rate > best) {
                if self.rates.len() == RATE_SAMPLES {
                    self.rates.pop_front();
                }
                self.rates.push_back((now, rate));
                self.rate = self.median_rate();
            }
            self.round_bytes = 0;
            self.round_start = now;
            self.gain = (self.gain + 1) % GAINS.len();
        }
        while self
            .rates
            .front()
            .is_some_and(|&(at, _)| now.duration_since(at) > MIN_RTT_WINDOW)
        {
            self.rates.pop_front();
            self.rate = self.median_rate();
        }
        let target = queue_target(min_rtt);
        let standing = self.recent.1.min(self.recent.2);
        if standing > min_rtt + target * 2 {
            if !self.capping {
                // The least round trip was just measured: the first drain can wait.
                self.drained_at = now;
            }
            self.capping = true;
            self.low_since = None;
        } else if standing < min_rtt + target / 2 {
            // Let go only once the queue stayed down a while: right after the cap bites, quinn
            // paces by the old, long round trip, and the queue empties for a moment.
            let low_since = *self.low_since.get_or_insert(now);
            if now.duration_since(low_since) >= RELEASE_AFTER {
                self.capping = false;
            }
        } else {
            self.low_since = None;
        }
        match self.draining_until {
            Some(until) if now >= until => {
                self.draining_until = None;
                self.drained_at = now;
            }
            Some(_) => {}
            None if self.capping && now.duration_since(self.drained_at) >= DRAIN_EVERY => {
                self.draining_until = Some(now + min_rtt.max(DRAIN_FOR));
            }
            None => {}
        }
        self.cap = self.reckon_cap(min_rtt);
    }

    fn note_rtt(&mut self, now: Instant, rtt: Duration) {
        match self.rtts.back_mut() {
            // One entry per second: the least of it.
            Some((at, least)) if now.duration_since(*at) < Duration::from_secs(1) => {
                *least = (*least).min(rtt);
            }
            _ => self.rtts.push_back((now, rtt)),
        }
        while self
            .rtts
            .front()
            .is_some_and(|&(at, _)| now.duration_since(at) > MIN_RTT_WINDOW)
        {
            self.rtts.pop_front();
        }
    }

    fn min_rtt(&self) -> Option<Duration> {
        self.rtts.iter().map(|&(_, rtt)| rtt).min()
    }

    fn best_rate(&self) -> Option<f64> {
        self.rates.iter().map(|&(_, rate)| rate).reduce(f64::max)
    }

    /// The path's delivery rate: the median of the rates measured lately, as acknowledgements
    /// that come in bursts make some round trips' rates far higher than the link's.
    fn median_rate(&self) -> Option<f64> {
        let mut rates = [0.0; RATE_SAMPLES];
        let n = self.rates.len().min(RATE_SAMPLES);
        for (slot, &(_, rate)) in rates.iter_mut().zip(&self.rates) {
            *slot = rate;
        }
        let rates = &mut rates[..n];
        rates.sort_unstable_by(f64::total_cmp);
        rates.get(n / 2).copied()
    }

    /// The most bytes in flight while a standing queue shows; none otherwise.
    fn cap(&self) -> Option<u64> {
        self.cap
    }

    /// [`Limits::cap`] from what the path showed, `min_rtt` its least round trip.
    fn reckon_cap(&self, min_rtt: Duration) -> Option<u64> {
        if !self.capping {
            return None;
        }
        let rate = self.rate?;
        let allowed = match self.draining_until {
            Some(_) => (min_rtt / 2).as_secs_f64(),
            None => (min_rtt + queue_target(min_rtt)).as_secs_f64() * GAINS[self.gain],
        };
        Some((rate * allowed) as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A path of 6.25 MB/s (50 Mbit/s) and a base round trip, acknowledging a packet of 1,200
    /// bytes at that rate, with whatever queue stands in front of it; the clock is its own.
    struct Path {
        limits: Limits,
        start: Instant,
        now: Instant,
        base: Duration,
    }

    const RATE: f64 = 6.25e6;

    impl Path {
        fn new(base_ms: u64) -> Self {
            let start = Instant::now();
            Self {
                limits: Limits::new(start),
                start,
                now: start,
                base: ms(base_ms),
            }
        }

        /// `time` of acknowledgements with `queued` waiting in front.
        fn run(&mut self, time: Duration, queued: Duration) -> &mut Self {
            let every = Duration::from_secs_f64(1200.0 / RATE);
            let until = self.now + time;
            while self.now < until {
                self.now += every;
                let rtt = self.base + queued;
                self.limits.acked(self.now, rtt, 1200, false, rtt);
                // What the window is taken from, kept as acknowledgements come, is what the
                // path's samples give now.
                let limits = &self.limits;
                assert_eq!(limits.rate, limits.median_rate());
                let fresh = limits.min_rtt().and_then(|min| limits.reckon_cap(min));
                assert_eq!(limits.cap(), fresh);
            }
            self
        }

        fn cap(&self) -> Option<u64> {
            self.limits.cap()
        }

        fn elapsed(&self) -> Duration {
            self.now.duration_since(self.start)
        }
    }

    fn ms(ms: u64) -> Duration {
        Duration::from_millis(ms)
    }

    fn secs(secs: u64) -> Duration {
        Duration::from_secs(secs)
    }

    #[test]
    fn no_cap_without_a_standing_queue() {
        let mut path = Path::new(40);
        path.run(secs(5), Duration::ZERO);
        assert_eq!(path.cap(), None);
    }

    #[test]
    fn a_standing_queue_caps_the_window_at_the_rate_times_the_round_trip_and_the_target() {
        // The least round trip is learned first, with no queue; then the queue stands at 200 ms.
        let mut path = Path::new(40);
        path.run(secs(2), Duration::ZERO).run(secs(2), ms(200));
        let cap = path.cap().expect("capping") as f64 / GAINS[path.limits.gain];
        // 6.25 MB/s over 40 + 5 ms, times the gain of the round.
        assert!((270_000.0..=290_000.0).contains(&cap), "{cap}");
    }

    #[test]
    fn the_cap_lets_go_once_the_queue_drains() {
        let mut path = Path::new(40);
        path.run(secs(1), Duration::ZERO).run(secs(1), ms(100));
        assert!(path.cap().is_some());
        // At the target (5 ms) the cap holds; under half of it for a second, it lets go.
        path.run(secs(1), ms(5));
        assert!(path.cap().is_some());
        path.run(ms(500), ms(1));
        assert!(path.cap().is_some(), "let go too soon");
        path.run(secs(1), ms(1));
        assert_eq!(path.cap(), None);
    }

    #[test]
    fn while_capping_the_queue_is_drained_now_and_then() {
        let mut path = Path::new(40);
        path.run(secs(1), Duration::ZERO);
        // Then a queue of 100 ms stands; the cap is looked at every 10 ms.
        let mut caps = Vec::new();
        while path.elapsed() < secs(8) {
            path.run(ms(10), ms(100));
            caps.push((path.elapsed(), path.cap()));
        }
        let capped_from = caps.iter().find(|(_, cap)| cap.is_some());
        let capped_from = capped_from.expect("capping").0;
        let drained: Vec<_> = caps
            .iter()
            .filter_map(|&(at, cap)| cap.filter(|&cap| cap < 200_000).map(|cap| (at, cap)))
            .collect();
        let (first, last) = (drained[0].0, drained[drained.len() - 1].0);
        let due = capped_from + DRAIN_EVERY;
        assert!(
            first + ms(10) >= due && first <= due + ms(20),
            "{first:?}, due {due:?}"
        );
        assert!(last - first < DRAIN_FOR + ms(20), "{first:?}..{last:?}");
        // Half the path's delivery over its round trip: 6.25 MB/s over 20 ms.
        let halved = |(_, cap): &(Duration, u64)| (120_000..=130_000).contains(cap);
        assert!(drained.iter().all(halved), "{drained:?}");
    }

    #[test]
    fn a_longer_path_is_learned_within_the_window() {
        // The round trip grows for good from 40 to 80 ms (a new route): after the window the
        // least round trip is the new one, and the cap has let go.
        let mut path = Path::new(40);
        path.run(secs(2), Duration::ZERO);
        path.base = ms(80);
        path.run(secs(12), Duration::ZERO);
        assert_eq!(path.limits.min_rtt(), Some(ms(80)));
        assert_eq!(path.cap(), None);
    }
}
