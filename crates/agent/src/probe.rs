//! Probing a silent relay, so that what an outage held up moves again as soon as the link is
//! back. While packets are lost, QUIC backs off its retransmissions exponentially: after a 20 s
//! outage in the NAT lab, the relay resent what a visitor had typed 5-6 s after the link came
//! back, and the agent's keepalives could not hurry it (an acknowledgement of a keepalive tells
//! the relay nothing about its own lost packets).
//!
//! So once a keepalive has gone unanswered for a second, the agent sends a probe (an empty QUIC
//! datagram) every second. The relay answers each with an empty datagram of its own; the agent
//! acknowledges that, and the acknowledgement of something the relay sent after the outage is
//! what makes it declare the rest lost and send it again at once.

use std::time::{Duration, Instant};

use bytes::Bytes;

/// How often the agent probes a silent relay.
pub const PROBE_EVERY: Duration = Duration::from_secs(1);

/// Probes the relay on `conn` whenever it has been silent for a second longer than `keepalive`,
/// until the session ends.
pub async fn while_silent(conn: quinn::Connection, keepalive: Duration) {
    let every = PROBE_EVERY.min(keepalive);
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut heard = conn.stats().udp_rx.datagrams;
    let mut heard_at = Instant::now();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = conn.closed() => return,
        }
        let received = conn.stats().udp_rx.datagrams;
        if received != heard {
            (heard, heard_at) = (received, Instant::now());
        } else if heard_at.elapsed() > keepalive + every {
            // Fails only once the session is over, which the select above notices next.
            let _ = conn.send_datagram(Bytes::new());
        }
    }
}
