//! Probing the relay, so that what an outage or a NAT rebinding held up moves again as soon as
//! the path is back.
//!
//! A probe is an empty QUIC datagram. The relay answers each with an empty datagram of its own;
//! the agent acknowledges that, and the acknowledgement of something the relay sent after a
//! loss is what makes it declare the rest lost and send it again at once (an acknowledgement of
//! a plain keepalive tells the relay nothing about its own lost packets, and QUIC backs off its
//! retransmissions exponentially: after a 20 s outage in the NAT lab, the relay resent what a
//! visitor had typed 5-6 s after the link came back). The agent probes:
//!
//! - **While the relay is silent**: once a keepalive has gone unanswered for a second, every
//!   second.
//! - **While connections are open** ([`BUSY_KEEPALIVE`]): whenever it has sent nothing for
//!   that long. A NAT that rebinds (a router restarted, a mapping flushed) drops what the relay
//!   sends to the old mapping, and only a packet from the agent opens the new one; with QUIC's
//!   keepalive alone, a visitor who typed after a rebinding waited until the agent's next
//!   keepalive (up to 5 s; 4.0 s measured). An agent with no connection open sends only its
//!   keepalives, as before.

use std::time::{Duration, Instant};

use bytes::Bytes;
use tether_common::carry::resume::HeldStreams;

/// How often the agent probes a silent relay.
pub const PROBE_EVERY: Duration = Duration::from_secs(1);

/// While connections are open, how long the agent may have sent nothing before it probes (seen
/// every `BUSY_TICK`, so quiet for a second at most): what bounds a visitor's wait after a NAT
/// rebinding.
pub const BUSY_KEEPALIVE: Duration = Duration::from_millis(750);

/// How often the counters are read while connections are open.
const BUSY_TICK: Duration = Duration::from_millis(250);

/// Probes the relay on `conn` when the module docs say, until the session ends. `streams` are
/// the agent's connections.
pub async fn while_silent(conn: quinn::Connection, keepalive: Duration, streams: &HeldStreams) {
    let mut watch = Watch::new(keepalive, Instant::now());
    loop {
        tokio::select! {
            () = tokio::time::sleep(watch.tick()) => {}
            _ = conn.closed() => return,
        }
        let stats = conn.stats();
        let counts = Counts {
            received: stats.udp_rx.datagrams,
            sent: stats.udp_tx.datagrams,
            busy: !streams.is_empty(),
        };
        if watch.probe(Instant::now(), counts) {
            // Fails only once the session is over, which the select above notices next.
            let _ = conn.send_datagram(Bytes::new());
        }
    }
}

/// What the watch reads at each tick.
#[derive(Debug, Clone, Copy)]
struct Counts {
    /// Datagrams received and sent on the session so far.
    received: u64,
    sent: u64,
    /// Whether any connection is open.
    busy: bool,
}

/// When to probe, from the session's counters; the clock is the caller's.
#[derive(Debug)]
struct Watch {
    keepalive: Duration,
    every: Duration,
    last: Counts,
    heard_at: Instant,
    sent_at: Instant,
}

impl Watch {
    fn new(keepalive: Duration, now: Instant) -> Self {
        Self {
            keepalive,
            every: PROBE_EVERY.min(keepalive),
            last: Counts {
                received: 0,
                sent: 0,
                busy: false,
            },
            heard_at: now,
            sent_at: now,
        }
    }

    /// How long to wait before the next look at the counters.
    fn tick(&self) -> Duration {
        match self.last.busy {
            true => BUSY_TICK,
            false => self.every,
        }
    }

    /// Takes the counters read at `now`, and says whether to send a probe.
    fn probe(&mut self, now: Instant, counts: Counts) -> bool {
        if counts.received != self.last.received {
            self.heard_at = now;
        }
        if counts.sent != self.last.sent {
            self.sent_at = now;
        }
        self.last = counts;
        let silent = now.duration_since(self.heard_at) > self.keepalive + self.every;
        let quiet = counts.busy && now.duration_since(self.sent_at) >= BUSY_KEEPALIVE;
        if silent || quiet {
            // The probe is sent now, and counted by the next look.
            self.sent_at = now;
            self.last.sent += 1;
            return true;
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEEPALIVE: Duration = Duration::from_secs(5);

    /// Drives a watch at its own ticks until `until`, with the counters `at` gives for each
    /// moment (datagrams received, datagrams sent besides the probes, busy); returns when it
    /// probed, as times since the start.
    fn probes(until: Duration, at: impl Fn(Duration) -> (u64, u64, bool)) -> Vec<Duration> {
        let start = Instant::now();
        let mut watch = Watch::new(KEEPALIVE, start);
        let (mut now, mut sent) = (Duration::ZERO, Vec::new());
        while now < until {
            now += watch.tick();
            let (received, others, busy) = at(now);
            let counts = Counts {
                received,
                sent: others + sent.len() as u64,
                busy,
            };
            if watch.probe(start + now, counts) {
                sent.push(now);
            }
        }
        sent
    }

    fn ms(ms: u64) -> Duration {
        Duration::from_millis(ms)
    }

    #[test]
    fn an_idle_session_probes_only_when_keepalives_go_unanswered() {
        // A keepalive sent and answered every 5 s: no probe in a minute.
        let keepalives = |t: Duration| t.as_secs() / 5;
        let answered = probes(Duration::from_secs(60), |t| {
            (keepalives(t), keepalives(t), false)
        });
        assert_eq!(answered, [] as [Duration; 0]);
        // Nothing heard after 10 s: a probe a second, once keepalive + 1 s have passed.
        let silent = probes(Duration::from_secs(20), |t| {
            (
                keepalives(t.min(Duration::from_secs(10))),
                keepalives(t),
                false,
            )
        });
        assert_eq!(silent.first(), Some(&Duration::from_secs(17)));
        assert!(
            silent.windows(2).all(|w| w[1] - w[0] == PROBE_EVERY),
            "{silent:?}"
        );
    }

    #[test]
    fn open_connections_keep_the_agent_from_being_quiet_long() {
        // Connections open and nothing else to send after 1 s: a probe every 750 ms.
        let sent = probes(Duration::from_secs(4), |t| {
            (1, 1, t >= Duration::from_secs(1))
        });
        assert_eq!(sent, [ms(1750), ms(2500), ms(3250), ms(4000)]);
        // Connections open, and the agent sends on its own every 500 ms: no probe.
        let sending = probes(Duration::from_secs(4), |t| {
            (1, t.as_millis() as u64 / 500, true)
        });
        assert_eq!(sending, [] as [Duration; 0]);
    }

    #[test]
    fn the_last_connection_closed_ends_the_busy_probes() {
        let sent = probes(Duration::from_secs(6), |t| {
            (1, 1, t < Duration::from_secs(2))
        });
        assert_eq!(sent, [ms(1750)]);
    }
}
