//! Every timing and cap of the relay, in one place, with the product's defaults. Tests shorten
//! or lower them to see each limit work without waiting for it.

use std::time::Duration;

/// The relay's timings. The defaults are the product's; tests shorten them to see each limit
/// work without waiting for it.
#[derive(Debug, Clone)]
pub struct Limits {
    /// How long a QUIC and TLS handshake may take.
    pub handshake_timeout: Duration,
    /// How long an authenticated agent may take to open its control stream and say Hello.
    pub hello_timeout: Duration,
    /// How long a visitor who arrives while its agent is away waits for the agent's return.
    pub visitor_wait: Duration,
    /// How long an agent that went away keeps its public ports.
    pub port_hold: Duration,
    /// How long a drain may take before the relay exits anyway.
    pub shutdown_grace: Duration,
    /// UDP flows one forward carries at once; a new one evicts the longest idle.
    pub max_flows_per_forward: usize,
    /// UDP flows one visitor address has on one forward at once (mosh hops source ports, and a
    /// few visitors may share a NAT's address).
    pub max_flows_per_visitor: usize,
    /// A UDP flow seen this recently is never evicted for another visitor's new flow: under a
    /// flood of new sources the newcomers are refused, and mosh sessions under way go on.
    pub protect_active_flows: Duration,
    /// Visitor TCP connections the relay carries at once, all forwards together; more are
    /// refused. Each holds a descriptor: see [`Limits::within_open_files`].
    pub max_visitors: usize,
    /// Visitor TCP connections one forward carries at once; more are refused.
    pub max_visitors_per_forward: usize,
    /// Visitor TCP connections from one address to one forward at once; more are refused.
    pub max_visitors_per_address: usize,
    /// Handshakes under way at once, from anyone; more are dropped unanswered.
    pub max_pending_handshakes: usize,
    /// Handshakes under way at once from one address; more are dropped unanswered.
    pub max_pending_handshakes_per_address: usize,
    /// Above this many handshakes under way, a client must first prove its address with a QUIC
    /// Retry, so that spoofed sources cost the relay nothing but a packet.
    pub retry_above: usize,
    /// How often repeated failures (refused handshakes, refused visitors) are summed up in the
    /// log; within a period, only the first of each reason is logged.
    pub log_summary_every: Duration,
    /// Updates of its forwards a session may send at once; after them, one per
    /// [`Limits::update_every`]. The relay reads nothing more of the session's control stream
    /// until the next is due, so a flood of updates pushes back on its sender.
    pub update_burst: u32,
    pub update_every: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            handshake_timeout: Duration::from_secs(5),
            hello_timeout: Duration::from_secs(5),
            visitor_wait: Duration::from_secs(5),
            port_hold: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(5),
            max_flows_per_forward: 256,
            max_flows_per_visitor: 32,
            // mosh sends at least every 3 s while a session is open.
            protect_active_flows: Duration::from_secs(5),
            max_visitors: 16 * 1024,
            max_visitors_per_forward: 1024,
            max_visitors_per_address: 256,
            max_pending_handshakes: 256,
            // An agent keeps up to 8 handshakes going while it probes a restarting relay, and a
            // few agents may share one NAT's address.
            max_pending_handshakes_per_address: 32,
            retry_above: 64,
            log_summary_every: Duration::from_secs(60),
            // A reload sends one update; a few in a row are someone editing agent.toml.
            update_burst: 5,
            update_every: Duration::from_secs(1),
        }
    }
}

impl Limits {
    /// These limits, with the visitor caps lowered to fit a process that may have
    /// `open_files` descriptors: visitors take at most three quarters of them (listeners,
    /// sessions, the status and metrics sockets need the rest), and one forward at most half
    /// of the visitors' share, so that a flood of one forward leaves room for the others.
    pub fn within_open_files(mut self, open_files: u64) -> Self {
        let share = usize::try_from(open_files / 4 * 3).unwrap_or(usize::MAX);
        self.max_visitors = self.max_visitors.min(share).max(1);
        self.max_visitors_per_forward = self
            .max_visitors_per_forward
            .min(self.max_visitors / 2)
            .max(1);
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn visitors_are_capped_below_the_descriptors_and_one_forward_below_half_of_them() {
        let limits = Limits::default().within_open_files(512);
        assert_eq!(limits.max_visitors, 384);
        assert_eq!(limits.max_visitors_per_forward, 192);
        // Plenty of descriptors: the defaults stand.
        let plenty = Limits::default().within_open_files(1 << 20);
        assert_eq!(plenty.max_visitors, Limits::default().max_visitors);
        assert_eq!(plenty.max_visitors_per_forward, 1024);
        let none = Limits::default().within_open_files(0);
        assert_eq!((none.max_visitors, none.max_visitors_per_forward), (1, 1));
    }
}
