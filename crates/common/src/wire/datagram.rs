//! UDP payloads as QUIC datagrams (RFC 9221): an 8-byte header, then the payload as it was.
//!
//! ```text
//!  0               4       6       8
//! +---------------+-------+-------+-----------------
//! | flow (u32)    |forward| port  | payload ...
//! +---------------+-------+-------+-----------------
//! ```
//!
//! The relay numbers flows (one visitor source on one public port). `forward` is the index of
//! the forward in the agent's Hello and `port` the public port, so the agent can open a flow's
//! local socket from its first datagram alone, with no set-up message to wait for or lose.
//! Answers carry the same header back.
//!
//! A datagram larger than what the session can send as one QUIC datagram right now (about 1,160
//! bytes before path MTU discovery, about 1,400 after) takes a unidirectional stream of its own
//! instead: the same bytes, header and payload, then the end of the stream. It arrives intact,
//! a little later, and never holds up another flow.
//!
//! An empty datagram is a probe: the agent sends them while the relay is silent, and the relay
//! answers each with an empty datagram of its own.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::wire::protocol::DecodeError;

/// The bytes in front of every payload.
pub const HEADER_LEN: usize = 8;

/// The largest UDP payload over IPv4, and so the largest tether carries.
pub const MAX_PAYLOAD: usize = 65_507;

/// The relay's number for one visitor source on one public port.
pub type FlowId = u32;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DatagramHeader {
    pub flow: FlowId,
    /// The index of the forward in the agent's Hello.
    pub forward: u16,
    /// The public port the visitor sent to; with a range, it selects the local port.
    pub port: u16,
}

impl DatagramHeader {
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        out[..4].copy_from_slice(&self.flow.to_be_bytes());
        out[4..6].copy_from_slice(&self.forward.to_be_bytes());
        out[6..].copy_from_slice(&self.port.to_be_bytes());
        out
    }

    /// Splits a datagram into its header and payload.
    pub fn decode(datagram: &[u8]) -> Result<(Self, &[u8]), DecodeError> {
        let Some((header, payload)) = datagram.split_first_chunk::<HEADER_LEN>() else {
            return Err(DecodeError::Truncated);
        };
        if payload.len() > MAX_PAYLOAD {
            return Err(DecodeError::TooLong {
                len: payload.len(),
                max: MAX_PAYLOAD,
            });
        }
        let header = DatagramHeader {
            flow: u32::from_be_bytes([header[0], header[1], header[2], header[3]]),
            forward: u16::from_be_bytes([header[4], header[5]]),
            port: u16::from_be_bytes([header[6], header[7]]),
        };
        Ok((header, payload))
    }
}

/// Oversized datagrams one session has on streams at once; more are dropped, as UDP may.
pub const MAX_STREAMED: u32 = 64;

/// How long sending or receiving one oversized datagram on its stream may take.
const STREAM_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a datagram was dropped, as the metrics label it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// No live session or no forward for it: the agent is away, or the forward closed.
    NoRoute,
    /// Its flow was forgotten meanwhile, or the header named no flow of this session.
    UnknownFlow,
    /// No flow could be opened for it: every flow under the cap was active, or no local socket
    /// could be opened.
    NoFlow,
    /// A socket's buffer or the session's datagram queue was full, or the path went away.
    SendFailed,
    /// Too large for a QUIC datagram while [`MAX_STREAMED`] others were on streams already.
    TooManyStreamed,
}

impl DropReason {
    pub const ALL: [DropReason; 5] = [
        DropReason::NoRoute,
        DropReason::UnknownFlow,
        DropReason::NoFlow,
        DropReason::SendFailed,
        DropReason::TooManyStreamed,
    ];

    /// The reason as a metric label value.
    pub fn label(self) -> &'static str {
        match self {
            DropReason::NoRoute => "no_route",
            DropReason::UnknownFlow => "unknown_flow",
            DropReason::NoFlow => "no_flow",
            DropReason::SendFailed => "send_failed",
            DropReason::TooManyStreamed => "too_many_streamed",
        }
    }
}

/// What happened to the UDP traffic of one side, for logs, metrics and tests.
#[derive(Debug, Default)]
pub struct UdpCounters {
    /// Datagrams too large for a QUIC datagram, sent on a stream of their own.
    pub sent_on_stream: AtomicU64,
    /// Datagrams dropped, by [`DropReason`] in the order of [`DropReason::ALL`].
    dropped: [AtomicU64; DropReason::ALL.len()],
    /// Datagrams from visitors outside the forward's `allow_from`.
    pub refused: AtomicU64,
    pub flows_opened: AtomicU64,
    /// Flows forgotten after `flow_idle` of silence.
    pub flows_expired: AtomicU64,
    /// Flows forgotten to make room under a cap, the longest idle first.
    pub flows_evicted: AtomicU64,
    /// New flows refused because every flow under the cap was active.
    pub flows_refused: AtomicU64,
}

/// The counters at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct UdpCount {
    pub sent_on_stream: u64,
    pub dropped: u64,
    pub refused: u64,
    pub flows_opened: u64,
    pub flows_expired: u64,
    pub flows_evicted: u64,
    pub flows_refused: u64,
}

impl UdpCounters {
    pub fn count(&self) -> UdpCount {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        UdpCount {
            sent_on_stream: get(&self.sent_on_stream),
            dropped: self.dropped.iter().map(get).sum(),
            refused: get(&self.refused),
            flows_opened: get(&self.flows_opened),
            flows_expired: get(&self.flows_expired),
            flows_evicted: get(&self.flows_evicted),
            flows_refused: get(&self.flows_refused),
        }
    }

    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Counts one dropped datagram.
    pub fn count_drop(&self, reason: DropReason) {
        Self::add(&self.dropped[reason as usize], 1);
    }

    /// Datagrams dropped for `reason`.
    pub fn dropped(&self, reason: DropReason) -> u64 {
        self.dropped[reason as usize].load(Ordering::Relaxed)
    }
}

/// Sends the datagrams of one session, each as a QUIC datagram if it fits and on a stream of
/// its own if not. Never waits: what cannot be sent now is dropped and counted.
#[derive(Clone)]
pub struct DatagramSender {
    conn: quinn::Connection,
    streams: Arc<Semaphore>,
    counters: Arc<UdpCounters>,
}

impl DatagramSender {
    pub fn new(conn: quinn::Connection, counters: Arc<UdpCounters>) -> Self {
        Self {
            conn,
            streams: Arc::new(Semaphore::new(MAX_STREAMED as usize)),
            counters,
        }
    }

    /// Sends `datagram`: a header and its payload.
    pub fn send(&self, datagram: Bytes) {
        match self.conn.max_datagram_size() {
            Some(max) if datagram.len() <= max => {
                // Only fails if the connection is gone or the path shrank this very moment.
                if self.conn.send_datagram(datagram).is_err() {
                    self.counters.count_drop(DropReason::SendFailed);
                }
            }
            _ => self.send_on_stream(datagram),
        }
    }

    fn send_on_stream(&self, datagram: Bytes) {
        let Ok(permit) = self.streams.clone().try_acquire_owned() else {
            self.counters.count_drop(DropReason::TooManyStreamed);
            return;
        };
        UdpCounters::add(&self.counters.sent_on_stream, 1);
        let conn = self.conn.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let send = async {
                let mut stream = conn.open_uni().await.ok()?;
                stream.write_all(&datagram).await.ok()?;
                stream.finish().ok()
            };
            let _ = tokio::time::timeout(STREAM_TIMEOUT, send).await;
        });
    }
}

/// The peer broke the rules of datagrams; the words say how, for the log.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Violation(pub String);

/// Hands each datagram the peer sends, by either path, to `deliver` until the session ends,
/// or until the peer breaks the rules: `deliver` says so of a datagram, or a datagram's stream
/// runs longer than any datagram.
pub async fn receive(
    conn: &quinn::Connection,
    mut deliver: impl FnMut(Bytes) -> Result<(), Violation>,
) -> Result<(), Violation> {
    let mut streamed = JoinSet::new();
    loop {
        tokio::select! {
            datagram = conn.read_datagram() => match datagram {
                Ok(datagram) => deliver(datagram)?,
                Err(_) => return Ok(()),
            },
            stream = conn.accept_uni() => match stream {
                Ok(stream) => {
                    // The peer may have at most MAX_STREAMED of these open at once.
                    streamed.spawn(read_streamed(stream));
                }
                Err(_) => return Ok(()),
            },
            Some(Ok(read)) = streamed.join_next() => {
                if let Some(datagram) = read? {
                    deliver(datagram)?;
                }
            }
        }
    }
}

/// The datagram on one stream; `None` if the stream was reset or took too long, as a lost
/// datagram would be.
async fn read_streamed(mut stream: quinn::RecvStream) -> Result<Option<Bytes>, Violation> {
    let limit = HEADER_LEN + MAX_PAYLOAD;
    let read = stream.read_to_end(limit);
    match tokio::time::timeout(STREAM_TIMEOUT, read).await {
        Ok(Ok(datagram)) => Ok(Some(datagram.into())),
        Ok(Err(quinn::ReadToEndError::TooLong)) => Err(Violation(format!(
            "a datagram's stream ran past {limit} bytes"
        ))),
        Ok(Err(_)) | Err(_) => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_with_any_payload_size() {
        let header = DatagramHeader {
            flow: 0xdead_beef,
            forward: 7,
            port: 60001,
        };
        for len in [0, 1, 200, 1200, 1400, 8000, MAX_PAYLOAD] {
            let payload: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let mut datagram = header.encode().to_vec();
            datagram.extend_from_slice(&payload);
            let (decoded, rest) = DatagramHeader::decode(&datagram).unwrap();
            assert_eq!(decoded, header);
            assert_eq!(rest, &payload[..]);
        }
    }

    #[test]
    fn short_and_oversized_datagrams_are_refused() {
        for len in 0..HEADER_LEN {
            assert_eq!(
                DatagramHeader::decode(&vec![0; len]),
                Err(DecodeError::Truncated)
            );
        }
        let oversized = vec![0; HEADER_LEN + MAX_PAYLOAD + 1];
        assert_eq!(
            DatagramHeader::decode(&oversized),
            Err(DecodeError::TooLong {
                len: MAX_PAYLOAD + 1,
                max: MAX_PAYLOAD
            })
        );
    }
}
