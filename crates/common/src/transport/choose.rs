//! Which path the agent takes to the relay, and when it moves: the decisions alone, on a clock
//! the caller passes in, so that they are tested without waiting.
//!
//! With `transport = "auto"`:
//! - An attempt starts with QUIC; TCP starts beside it when QUIC has not answered within
//!   [`TCP_AFTER`] (happy eyeballs), and the first path whose handshake completes wins. Once
//!   UDP got no answer, the next attempts start both at once, until QUIC wins again.
//! - On QUIC, a relay silent for [`STALLED_AFTER`] while the agent sends ([`Silence`]) means
//!   that UDP stopped passing: the agent connects over TCP and moves there.
//! - On TCP, QUIC is tried again every [`QUIC_PROBE_EVERY`], and the agent moves back as soon
//!   as it answers.
//!
//! A move is a new session on the other path that resumes the current one: no connection is
//! dropped (see [`crate::carry::resume`]).

use std::fmt;
use std::time::{Duration, Instant};

use super::Path;

/// How long QUIC has to answer before TCP starts beside it.
pub const TCP_AFTER: Duration = Duration::from_secs(1);

/// How long the relay may stay silent on QUIC, while the agent sends, before the agent takes
/// UDP to be blocked. A keepalive or probe unanswered for this long: the relay answers within
/// a round trip, and the agent probes a silent relay every second (see the agent's `probe`).
pub const STALLED_AFTER: Duration = Duration::from_secs(2);

/// How often an agent on TCP tries QUIC again.
pub const QUIC_PROBE_EVERY: Duration = Duration::from_secs(30);

/// After a failed attempt to move to TCP, how long before the next.
pub const RETRY_MOVE_AFTER: Duration = Duration::from_secs(5);

/// Which paths to the relay the agent takes (`transport` in agent.toml).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Transport {
    /// QUIC over UDP, TLS over TCP when UDP does not pass, and back when it does.
    #[default]
    Auto,
    /// QUIC over UDP only.
    Quic,
    /// TLS over TCP only.
    Tcp,
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Transport::Auto => "auto",
            Transport::Quic => "quic",
            Transport::Tcp => "tcp",
        })
    }
}

impl std::str::FromStr for Transport {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "auto" => Ok(Transport::Auto),
            "quic" => Ok(Transport::Quic),
            "tcp" => Ok(Transport::Tcp),
            _ => Err(format!(
                "expected \"auto\", \"quic\" or \"tcp\", got \"{text}\""
            )),
        }
    }
}

/// When each path's attempt starts, after the attempt's start; `None`: not tried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    pub quic: Option<Duration>,
    pub tcp: Option<Duration>,
}

/// What the agent decides with, and what it learned about the paths to its relay.
#[derive(Debug, Clone)]
pub struct Chooser {
    transport: Transport,
    /// UDP got no answer the last time it was tried.
    udp_blocked: bool,
}

impl Chooser {
    pub fn new(transport: Transport) -> Self {
        Self {
            transport,
            udp_blocked: false,
        }
    }

    /// How the next attempt to reach the relay starts.
    pub fn plan(&self) -> Plan {
        match self.transport {
            Transport::Quic => Plan {
                quic: Some(Duration::ZERO),
                tcp: None,
            },
            Transport::Tcp => Plan {
                quic: None,
                tcp: Some(Duration::ZERO),
            },
            Transport::Auto => Plan {
                quic: Some(Duration::ZERO),
                tcp: Some(match self.udp_blocked {
                    true => Duration::ZERO,
                    false => TCP_AFTER,
                }),
            },
        }
    }

    /// Notes that a session is up on `path`.
    pub fn connected(&mut self, path: Path) {
        if self.transport == Transport::Auto {
            self.udp_blocked = path == Path::Tcp;
        }
    }

    /// Notes that UDP stopped passing during a session.
    pub fn udp_stalled(&mut self) {
        self.udp_blocked = true;
    }

    /// Why a session runs on `path`, for the status; `None` on QUIC, the first choice.
    pub fn why(&self, path: Path) -> Option<&'static str> {
        match (path, self.transport) {
            (Path::Quic, _) => None,
            (Path::Tcp, Transport::Tcp) => Some("transport = \"tcp\" in agent.toml"),
            (Path::Tcp, _) => Some("UDP to the relay gets no answer"),
        }
    }

    /// Whether, during a session on `path`, the agent watches for UDP to stall.
    pub fn watches_udp(&self, path: Path) -> bool {
        self.transport == Transport::Auto && path == Path::Quic
    }

    /// How often, during a session on `path`, the agent tries QUIC again, if it does.
    pub fn probes_quic(&self, path: Path) -> Option<Duration> {
        (self.transport == Transport::Auto && path == Path::Tcp).then_some(QUIC_PROBE_EVERY)
    }
}

/// Whether the relay answers on QUIC: fed the session's datagram counts, it tells how long the
/// relay has been silent while this side was sending.
#[derive(Debug, Clone)]
pub struct Silence {
    received: u64,
    sent: u64,
    /// When this side first sent something the relay has not answered since.
    unanswered_since: Option<Instant>,
}

impl Silence {
    pub fn new(sent: u64, received: u64) -> Self {
        Self {
            received,
            sent,
            unanswered_since: None,
        }
    }

    /// Notes the datagram counts at `now`; returns for how long the relay has not answered
    /// what this side sent, if it has not.
    pub fn observe(&mut self, now: Instant, sent: u64, received: u64) -> Option<Duration> {
        if received != self.received {
            self.received = received;
            self.sent = sent;
            self.unanswered_since = None;
            return None;
        }
        if sent != self.sent {
            self.sent = sent;
            self.unanswered_since.get_or_insert(now);
        }
        self.unanswered_since
            .map(|since| now.saturating_duration_since(since))
    }

    /// Whether the relay has been silent for [`STALLED_AFTER`] or longer while this side sent.
    pub fn stalled(&mut self, now: Instant, sent: u64, received: u64) -> bool {
        self.observe(now, sent, received)
            .is_some_and(|silent| silent >= STALLED_AFTER)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_starts_tcp_a_second_after_quic_until_udp_went_unanswered() {
        let mut auto = Chooser::new(Transport::Auto);
        assert_eq!(
            auto.plan(),
            Plan {
                quic: Some(Duration::ZERO),
                tcp: Some(TCP_AFTER)
            }
        );
        auto.connected(Path::Tcp);
        assert_eq!(
            auto.plan().tcp,
            Some(Duration::ZERO),
            "learned: both at once"
        );
        assert_eq!(auto.plan().quic, Some(Duration::ZERO), "QUIC still tried");
        auto.connected(Path::Quic);
        assert_eq!(auto.plan().tcp, Some(TCP_AFTER), "QUIC answered again");
        auto.udp_stalled();
        assert_eq!(auto.plan().tcp, Some(Duration::ZERO));
    }

    #[test]
    fn a_fixed_transport_tries_its_path_alone_and_never_moves() {
        for (transport, quic, tcp) in [
            (Transport::Quic, true, false),
            (Transport::Tcp, false, true),
        ] {
            let mut chooser = Chooser::new(transport);
            chooser.udp_stalled();
            let plan = chooser.plan();
            assert_eq!((plan.quic.is_some(), plan.tcp.is_some()), (quic, tcp));
            for path in [Path::Quic, Path::Tcp] {
                assert!(!chooser.watches_udp(path));
                assert_eq!(chooser.probes_quic(path), None);
            }
        }
    }

    #[test]
    fn auto_watches_udp_on_quic_and_probes_quic_on_tcp() {
        let auto = Chooser::new(Transport::Auto);
        assert!(auto.watches_udp(Path::Quic));
        assert!(!auto.watches_udp(Path::Tcp));
        assert_eq!(auto.probes_quic(Path::Tcp), Some(QUIC_PROBE_EVERY));
        assert_eq!(auto.probes_quic(Path::Quic), None);
        assert_eq!(auto.why(Path::Quic), None);
        assert_eq!(auto.why(Path::Tcp), Some("UDP to the relay gets no answer"));
        let tcp = Chooser::new(Transport::Tcp);
        assert_eq!(
            tcp.why(Path::Tcp),
            Some("transport = \"tcp\" in agent.toml")
        );
    }

    #[test]
    fn silence_counts_from_the_first_unanswered_send() {
        let start = Instant::now();
        let at = |ms: u64| start + Duration::from_millis(ms);
        let mut silence = Silence::new(10, 10);
        // Nothing sent, nothing heard: an idle session is not a silent relay.
        assert_eq!(silence.observe(at(5_000), 10, 10), None);
        // A keepalive goes out at 5.0 s; no answer yet.
        assert_eq!(silence.observe(at(5_000), 11, 10), Some(Duration::ZERO));
        assert!(!silence.stalled(at(6_000), 12, 10));
        // More sends do not restart the count.
        assert_eq!(
            silence.observe(at(6_900), 13, 10),
            Some(Duration::from_millis(1_900))
        );
        assert!(silence.stalled(at(7_000), 13, 10));
        // An answer ends the silence.
        assert!(!silence.stalled(at(7_100), 13, 11));
        assert_eq!(silence.observe(at(9_000), 13, 11), None);
    }

    #[test]
    fn a_relay_that_answers_within_the_bound_is_never_stalled() {
        let start = Instant::now();
        let mut silence = Silence::new(0, 0);
        // A send every 100 ms, answered 1.9 s later each time, for a minute.
        for tick in 0..600u64 {
            let now = start + Duration::from_millis(100 * tick);
            let answered = tick.saturating_sub(19);
            assert!(!silence.stalled(now, tick + 1, answered), "at {tick}");
        }
    }
}
