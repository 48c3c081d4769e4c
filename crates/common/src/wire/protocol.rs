//! The tether wire protocol, version 1 (ALPN `tether/1`).
//!
//! # Protocol flow
//!
//! ```text
//!  agent                                              relay
//!    | QUIC, TLS 1.3, both certificates pinned by key   |
//!    |=================================================>|
//!    | control stream: the first bidirectional stream,  |
//!    | opened by the agent                              |
//!    |   Hello { version, resume, forwards }            |
//!    |------------------------------------------------->| each forward checked against the
//!    |   Welcome { session, results, resumed }          | agent's allowlist and the port
//!    |<-------------------------------------------------| registry; listeners opened
//!    |                                                  |
//!    | later, on the same control stream, both ways:    |
//!    |   Acks { (stream, received)... }                 |
//!    |<------------------------------------------------>|
//!    |                                                  |
//!    | later, on the same control stream:               |
//!    |   Update { (id, forward)... }: the whole new set |
//!    |------------------------------------------------->| kept, opened and closed as
//!    |   Updated { results }                            | the set differs
//!    |<-------------------------------------------------|
//!    |                                                  |
//!    | data stream: one bidirectional stream per        | a visitor connects to a
//!    | visitor TCP connection, opened by the relay      | public port
//!    |   StreamHeader, then the visitor's bytes at once |
//!    |<-------------------------------------------------|
//!    |   the local service's bytes                      |
//!    |------------------------------------------------->|
//!    |                                                  |
//!    | resumed data stream: one per stream that Welcome | after a session was lost
//!    | lists, opened by the relay                       |
//!    |   ResumeHeader { stream, received, seen }        |
//!    |<-------------------------------------------------|
//!    |   received (u64), then the agent's bytes from    |
//!    |   the relay's `received` on                      |
//!    |------------------------------------------------->|
//!    |   the relay's bytes from the agent's `received`  |
//!    |<-------------------------------------------------|
//!    |                                                  |
//!    | QUIC datagram: one per visitor UDP datagram,     | a visitor's datagram reaches
//!    | either way (see crate::wire::datagram)                 | a public UDP port
//!    |   DatagramHeader { flow, forward, port }, payload|
//!    |<------------------------------------------------>|
//!    | unidirectional stream: the same, for a datagram  |
//!    | too large for a QUIC datagram                    |
//!    |<------------------------------------------------>|
//!    |                                                  |
//!    | CONNECTION_CLOSE with a CloseCode and a reason   |
//!    |<------------------------------------------------>|
//! ```
//!
//! The relay does not wait for the agent before it sends a visitor's first bytes: they follow
//! the [`StreamHeader`] on the same stream, so a new visitor connection costs no round trip
//! beyond the one to the local service. The agent answers a local service that refuses by
//! resetting the stream with [`StreamCode::LocalUnreachable`]; the relay then resets the visitor.
//!
//! Control messages are framed as `type: u8, length: u32 (big-endian), body`. The length is
//! checked against [`MAX_FRAME_LEN`] before anything is allocated. Integers are big-endian.
//!
//! # Resuming
//!
//! Each side counts, per data stream, the bytes it has written to its TCP connection (the
//! stream's *received* offset; the peer's end of stream counts as one more byte), and tells the
//! peer in [`Acks`] now and then. Each side keeps the bytes it sent until the peer's `Acks`
//! covers them. When a session is lost, both ends keep their TCP connections; the agent's next
//! Hello names the lost session, and if the relay still holds it, Welcome lists the data streams
//! it resumes. For each, the relay opens a new data stream with a [`ResumeHeader`]; the two
//! sides swap their received offsets on it and each sends again what the other did not receive.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::net::cidr::Cidr;
use crate::net::ports::{PortRange, Proto};

/// The version carried in [`Hello`]. ALPN already selects it; the field lets a relay explain a
/// mismatch instead of failing the handshake.
pub const VERSION: u16 = 1;

/// The largest control frame body either side accepts.
pub const MAX_FRAME_LEN: usize = 64 * 1024;

/// Whether `text` may name an agent or a forward: 1 to [`MAX_NAME_LEN`] ASCII letters, digits,
/// '-', '_' or '.', so that a name is safe to print in logs and status tables.
pub fn is_valid_name(text: &str) -> bool {
    !text.is_empty()
        && text.len() <= MAX_NAME_LEN
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}

/// Forwards in one [`Hello`] at most.
pub const MAX_FORWARDS: usize = 256;

/// Bytes in a forward's name at most.
pub const MAX_NAME_LEN: usize = 64;

/// Address blocks in one forward's `allow_from` at most.
pub const MAX_ALLOW_FROM: usize = 64;

/// The bytes in front of each control frame's body: type and length.
pub const FRAME_HEADER_LEN: usize = 5;

/// An id the relay gives each session; an agent presents its last one when it reconnects.
pub type SessionId = u64;

/// An id the relay gives each data stream of an agent; unique across that agent's sessions. The
/// relay numbers them 1, 2, 3, … in the order it opens them; a relay that does not resume the
/// agent's lost session may start over.
pub type StreamId = u64;

/// Visitor TCP connections one session carries at once (QUIC's limit of open streams); more
/// wait for a free stream.
pub const MAX_DATA_STREAMS: u32 = 1024;

/// Streams one [`Welcome`] resumes at most, and offsets one [`Acks`] carries at most: as many
/// data streams as a session has open at once.
pub const MAX_STREAMS_PER_FRAME: usize = MAX_DATA_STREAMS as usize;

/// A forward's number within a session: its index in [`Hello`], or the id the agent gave it in
/// an [`Update`]. Data streams and datagrams name their forward by it.
pub type ForwardId = u16;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("frame body of {len} bytes is larger than the limit of {max}")]
    TooLong { len: usize, max: usize },
    #[error("message is truncated")]
    Truncated,
    #[error("{0} unexpected bytes after the message")]
    TrailingBytes(usize),
    #[error("unknown message type {0:#04x}")]
    UnknownType(u8),
    #[error("invalid {0}")]
    Invalid(&'static str),
}

impl From<bytes::TryGetError> for DecodeError {
    fn from(_: bytes::TryGetError) -> Self {
        DecodeError::Truncated
    }
}

/// What the agent asks for when a session opens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    pub version: u16,
    /// The session this agent had before, if any: room for resuming its streams.
    pub resume: Option<SessionId>,
    pub forwards: Vec<ForwardRequest>,
}

/// One forward as the agent asks for it: which public ports, for which protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForwardRequest {
    pub name: String,
    pub proto: Proto,
    pub remote: PortRange,
    /// UDP: how long a flow may stay silent before both ends forget it. Carried in whole
    /// milliseconds (u32), so that both ends agree on it.
    pub flow_idle: Duration,
    /// The visitors the relay lets through, by address; empty lets everyone through.
    pub allow_from: Vec<Cidr>,
}

/// The relay's answer to [`Hello`]: one result per requested forward, in the same order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Welcome {
    pub session: SessionId,
    pub results: Vec<ForwardResult>,
    /// `Some` if the relay still held the session that Hello's `resume` names: the data streams
    /// of it that the relay resumes (their UDP flows go on too). The agent closes its other
    /// held streams.
    pub resumed: Option<Vec<StreamId>>,
}

/// How far each data stream's received offset has come (see the module's "Resuming"): the
/// sender may forget its bytes below it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Acks {
    pub streams: Vec<(StreamId, u64)>,
}

/// Whether the relay opened a forward's public ports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ForwardResult {
    Opened,
    Refused(Refusal),
}

/// Why the relay refused a forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("the relay does not allow this agent these ports")]
    NotAllowed,
    #[error("the port is in use on the relay")]
    InUse,
    #[error("the request is invalid (bad range, or it overlaps another forward)")]
    Invalid,
    #[error("the relay could not open the port")]
    Unavailable,
}

/// The agent's forwards after its config was reloaded: the whole set, each with its id. A
/// forward the session has under the same id and with the same request stays as it is (its
/// listener and its visitors go on); any other is opened; the session's forwards missing from
/// the set are closed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Update {
    pub forwards: Vec<(ForwardId, ForwardRequest)>,
}

/// The relay's answer to [`Update`]: one result per forward, in the same order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Updated {
    pub results: Vec<ForwardResult>,
}

/// Control messages from the agent to the relay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentMessage {
    Hello(Hello),
    Update(Update),
    Acks(Acks),
}

/// Control messages from the relay to the agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RelayMessage {
    Welcome(Welcome),
    Updated(Updated),
    Acks(Acks),
}

const TYPE_HELLO: u8 = 0x01;
const TYPE_UPDATE: u8 = 0x02;
const TYPE_AGENT_ACKS: u8 = 0x03;
const TYPE_WELCOME: u8 = 0x81;
const TYPE_UPDATED: u8 = 0x82;
const TYPE_RELAY_ACKS: u8 = 0x83;

impl Update {
    /// The message's body alone, without a frame's header: what a relay that restarts keeps
    /// of an agent's forwards for its next process.
    pub fn encode_body(&self) -> Bytes {
        let mut body = BytesMut::new();
        self.encode(&mut body);
        body.freeze()
    }

    /// Reads a body [`Update::encode_body`] wrote, all of it.
    pub fn decode_body(mut body: &[u8]) -> Result<Self, DecodeError> {
        let update = Update::decode(&mut body)?;
        ensure_consumed(body)?;
        Ok(update)
    }
}

impl AgentMessage {
    pub fn encode(&self) -> Bytes {
        match self {
            AgentMessage::Hello(hello) => frame(TYPE_HELLO, |body| hello.encode(body)),
            AgentMessage::Update(update) => frame(TYPE_UPDATE, |body| update.encode(body)),
            AgentMessage::Acks(acks) => frame(TYPE_AGENT_ACKS, |body| acks.encode(body)),
        }
    }

    pub fn decode(kind: u8, mut body: &[u8]) -> Result<Self, DecodeError> {
        let message = match kind {
            TYPE_HELLO => AgentMessage::Hello(Hello::decode(&mut body)?),
            TYPE_UPDATE => AgentMessage::Update(Update::decode(&mut body)?),
            TYPE_AGENT_ACKS => AgentMessage::Acks(Acks::decode(&mut body)?),
            other => return Err(DecodeError::UnknownType(other)),
        };
        ensure_consumed(body)?;
        Ok(message)
    }
}

impl RelayMessage {
    pub fn encode(&self) -> Bytes {
        match self {
            RelayMessage::Welcome(welcome) => frame(TYPE_WELCOME, |body| welcome.encode(body)),
            RelayMessage::Updated(updated) => {
                frame(TYPE_UPDATED, |body| encode_results(&updated.results, body))
            }
            RelayMessage::Acks(acks) => frame(TYPE_RELAY_ACKS, |body| acks.encode(body)),
        }
    }

    pub fn decode(kind: u8, mut body: &[u8]) -> Result<Self, DecodeError> {
        let message = match kind {
            TYPE_WELCOME => RelayMessage::Welcome(Welcome::decode(&mut body)?),
            TYPE_UPDATED => RelayMessage::Updated(Updated {
                results: decode_results(&mut body)?,
            }),
            TYPE_RELAY_ACKS => RelayMessage::Acks(Acks::decode(&mut body)?),
            other => return Err(DecodeError::UnknownType(other)),
        };
        ensure_consumed(body)?;
        Ok(message)
    }
}

/// Parses the five bytes in front of a frame into its type and body length, refusing a length
/// over [`MAX_FRAME_LEN`] before the caller allocates for it.
pub fn decode_frame_header(header: [u8; FRAME_HEADER_LEN]) -> Result<(u8, usize), DecodeError> {
    let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
    if len > MAX_FRAME_LEN {
        return Err(DecodeError::TooLong {
            len,
            max: MAX_FRAME_LEN,
        });
    }
    Ok((header[0], len))
}

fn frame(kind: u8, write_body: impl FnOnce(&mut BytesMut)) -> Bytes {
    let mut buf = BytesMut::with_capacity(64);
    buf.put_u8(kind);
    buf.put_u32(0);
    write_body(&mut buf);
    let len = (buf.len() - FRAME_HEADER_LEN) as u32;
    buf[1..FRAME_HEADER_LEN].copy_from_slice(&len.to_be_bytes());
    buf.freeze()
}

fn ensure_consumed(rest: &[u8]) -> Result<(), DecodeError> {
    match rest.len() {
        0 => Ok(()),
        n => Err(DecodeError::TrailingBytes(n)),
    }
}

impl Hello {
    fn encode(&self, buf: &mut BytesMut) {
        buf.put_u16(self.version);
        match self.resume {
            None => buf.put_u8(0),
            Some(id) => {
                buf.put_u8(1);
                buf.put_u64(id);
            }
        }
        buf.put_u16(self.forwards.len() as u16);
        for forward in &self.forwards {
            forward.encode(buf);
        }
    }

    fn decode(buf: &mut &[u8]) -> Result<Self, DecodeError> {
        let version = buf.try_get_u16()?;
        let resume = match buf.try_get_u8()? {
            0 => None,
            1 => Some(buf.try_get_u64()?),
            _ => return Err(DecodeError::Invalid("resume flag")),
        };
        let count = usize::from(buf.try_get_u16()?);
        if count > MAX_FORWARDS {
            return Err(DecodeError::Invalid("forward count"));
        }
        let mut forwards = Vec::with_capacity(count);
        for _ in 0..count {
            forwards.push(ForwardRequest::decode(buf)?);
        }
        Ok(Hello {
            version,
            resume,
            forwards,
        })
    }
}

impl ForwardRequest {
    fn encode(&self, buf: &mut BytesMut) {
        let name = self.name.as_bytes();
        buf.put_u8(name.len() as u8);
        buf.put_slice(name);
        buf.put_u8(self.proto.wire());
        buf.put_u16(self.remote.start());
        buf.put_u16(self.remote.end());
        let millis = u32::try_from(self.flow_idle.as_millis()).unwrap_or(u32::MAX);
        buf.put_u32(millis);
        buf.put_u8(self.allow_from.len() as u8);
        for block in &self.allow_from {
            match block.addr() {
                IpAddr::V4(v4) => {
                    buf.put_u8(4);
                    buf.put_slice(&v4.octets());
                }
                IpAddr::V6(v6) => {
                    buf.put_u8(6);
                    buf.put_slice(&v6.octets());
                }
            }
            buf.put_u8(block.prefix());
        }
    }

    fn decode(buf: &mut &[u8]) -> Result<Self, DecodeError> {
        let name_len = usize::from(buf.try_get_u8()?);
        if name_len > MAX_NAME_LEN {
            return Err(DecodeError::Invalid("forward name length"));
        }
        if buf.remaining() < name_len {
            return Err(DecodeError::Truncated);
        }
        // The config's rules, so that a name from the wire is as safe to log and print.
        let name = std::str::from_utf8(&buf[..name_len])
            .ok()
            .filter(|name| is_valid_name(name))
            .ok_or(DecodeError::Invalid("forward name"))?
            .to_owned();
        buf.advance(name_len);
        let proto = Proto::from_wire(buf.try_get_u8()?).ok_or(DecodeError::Invalid("proto"))?;
        let (start, end) = (buf.try_get_u16()?, buf.try_get_u16()?);
        let remote = PortRange::new(start, end).ok_or(DecodeError::Invalid("port range"))?;
        let flow_idle = Duration::from_millis(u64::from(buf.try_get_u32()?));
        let allow_from = decode_allow_from(buf)?;
        Ok(ForwardRequest {
            name,
            proto,
            remote,
            flow_idle,
            allow_from,
        })
    }
}

impl Update {
    fn encode(&self, buf: &mut BytesMut) {
        buf.put_u16(self.forwards.len() as u16);
        for (id, forward) in &self.forwards {
            buf.put_u16(*id);
            forward.encode(buf);
        }
    }

    /// Refuses more than [`MAX_FORWARDS`] forwards, and an id given twice.
    fn decode(buf: &mut &[u8]) -> Result<Self, DecodeError> {
        let count = usize::from(buf.try_get_u16()?);
        if count > MAX_FORWARDS {
            return Err(DecodeError::Invalid("forward count"));
        }
        let mut forwards: Vec<(ForwardId, ForwardRequest)> = Vec::with_capacity(count);
        for _ in 0..count {
            let id = buf.try_get_u16()?;
            if forwards.iter().any(|(other, _)| *other == id) {
                return Err(DecodeError::Invalid("forward id given twice"));
            }
            forwards.push((id, ForwardRequest::decode(buf)?));
        }
        Ok(Update { forwards })
    }
}

fn encode_results(results: &[ForwardResult], buf: &mut BytesMut) {
    buf.put_u16(results.len() as u16);
    for result in results {
        buf.put_u8(result.wire());
    }
}

fn decode_results(buf: &mut &[u8]) -> Result<Vec<ForwardResult>, DecodeError> {
    let count = usize::from(buf.try_get_u16()?);
    if count > MAX_FORWARDS {
        return Err(DecodeError::Invalid("result count"));
    }
    let mut results = Vec::with_capacity(count);
    for _ in 0..count {
        let byte = buf.try_get_u8()?;
        results.push(ForwardResult::from_wire(byte).ok_or(DecodeError::Invalid("result"))?);
    }
    Ok(results)
}

/// A count, then each block as family (4 or 6), address and prefix length.
fn decode_allow_from(buf: &mut &[u8]) -> Result<Vec<Cidr>, DecodeError> {
    let count = usize::from(buf.try_get_u8()?);
    if count > MAX_ALLOW_FROM {
        return Err(DecodeError::Invalid("allow_from count"));
    }
    let mut blocks = Vec::with_capacity(count);
    for _ in 0..count {
        let addr = match buf.try_get_u8()? {
            4 => IpAddr::from(buf.try_get_u32()?.to_be_bytes()),
            6 => IpAddr::from(buf.try_get_u128()?.to_be_bytes()),
            _ => return Err(DecodeError::Invalid("address family")),
        };
        let prefix = buf.try_get_u8()?;
        blocks.push(Cidr::new(addr, prefix).map_err(|_| DecodeError::Invalid("address block"))?);
    }
    Ok(blocks)
}

impl ForwardResult {
    fn wire(self) -> u8 {
        match self {
            ForwardResult::Opened => 0,
            ForwardResult::Refused(Refusal::NotAllowed) => 1,
            ForwardResult::Refused(Refusal::InUse) => 2,
            ForwardResult::Refused(Refusal::Invalid) => 3,
            ForwardResult::Refused(Refusal::Unavailable) => 4,
        }
    }

    fn from_wire(byte: u8) -> Option<Self> {
        Some(match byte {
            0 => ForwardResult::Opened,
            1 => ForwardResult::Refused(Refusal::NotAllowed),
            2 => ForwardResult::Refused(Refusal::InUse),
            3 => ForwardResult::Refused(Refusal::Invalid),
            4 => ForwardResult::Refused(Refusal::Unavailable),
            _ => return None,
        })
    }
}

impl Welcome {
    fn encode(&self, buf: &mut BytesMut) {
        buf.put_u64(self.session);
        encode_results(&self.results, buf);
        match &self.resumed {
            None => buf.put_u8(0),
            Some(streams) => {
                buf.put_u8(1);
                buf.put_u16(streams.len() as u16);
                for id in streams {
                    buf.put_u64(*id);
                }
            }
        }
    }

    fn decode(buf: &mut &[u8]) -> Result<Self, DecodeError> {
        let session = buf.try_get_u64()?;
        let results = decode_results(buf)?;
        let resumed = match buf.try_get_u8()? {
            0 => None,
            1 => {
                let count = usize::from(buf.try_get_u16()?);
                if count > MAX_STREAMS_PER_FRAME {
                    return Err(DecodeError::Invalid("resumed stream count"));
                }
                let mut streams = Vec::with_capacity(count);
                for _ in 0..count {
                    streams.push(buf.try_get_u64()?);
                }
                Some(streams)
            }
            _ => return Err(DecodeError::Invalid("resumed flag")),
        };
        Ok(Welcome {
            session,
            results,
            resumed,
        })
    }
}

impl Acks {
    fn encode(&self, buf: &mut BytesMut) {
        buf.put_u16(self.streams.len() as u16);
        for (id, received) in &self.streams {
            buf.put_u64(*id);
            buf.put_u64(*received);
        }
    }

    fn decode(buf: &mut &[u8]) -> Result<Self, DecodeError> {
        let count = usize::from(buf.try_get_u16()?);
        if count > MAX_STREAMS_PER_FRAME {
            return Err(DecodeError::Invalid("ack count"));
        }
        let mut streams = Vec::with_capacity(count);
        for _ in 0..count {
            streams.push((buf.try_get_u64()?, buf.try_get_u64()?));
        }
        Ok(Acks { streams })
    }
}

/// What the relay writes at the start of each data stream, before the visitor's bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamHeader {
    pub id: StreamId,
    pub forward: ForwardId,
    /// The public port the visitor connected to; with a range, it selects the local port.
    pub port: u16,
    pub visitor: SocketAddr,
}

/// What kind of data stream its first byte says it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamKind {
    /// A new visitor connection: a [`StreamHeader`] follows.
    Open,
    /// A data stream of a lost session, resumed: a [`ResumeHeader`] follows.
    Resume,
}

impl StreamKind {
    pub fn from_wire(byte: u8) -> Result<Self, DecodeError> {
        match byte {
            StreamHeader::KIND_OPEN => Ok(StreamKind::Open),
            ResumeHeader::KIND_RESUME => Ok(StreamKind::Resume),
            _ => Err(DecodeError::Invalid("stream kind")),
        }
    }
}

/// What the relay writes first on a data stream that resumes a lost session's stream; the
/// agent answers with its own received offset (a u64) before its bytes.
///
/// The stream's [`StreamHeader`] may have been lost with the session, before the agent saw it.
/// So the relay sends it again, with the forward's id in the new session, and says whether the
/// agent is known to have seen the stream (it confirmed or sent a byte): an agent that does not
/// hold a stream it never saw opens it anew; one it saw and no longer holds is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResumeHeader {
    pub stream: StreamHeader,
    /// The bytes of the agent's the relay has written to the visitor's connection (and one more
    /// if it saw the agent's end of stream): the agent sends again from there.
    pub received: u64,
    pub seen: bool,
}

impl ResumeHeader {
    /// kind (1), the stream header's fields (30), received (8), seen (1).
    pub const LEN: usize = StreamHeader::LEN + 9;
    const KIND_RESUME: u8 = 0x02;

    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut out = [0u8; Self::LEN];
        out[..StreamHeader::LEN].copy_from_slice(&self.stream.encode());
        out[0] = Self::KIND_RESUME;
        let mut buf = &mut out[StreamHeader::LEN..];
        buf.put_u64(self.received);
        buf.put_u8(u8::from(self.seen));
        out
    }

    pub fn decode(bytes: &[u8; Self::LEN]) -> Result<Self, DecodeError> {
        if bytes[0] != Self::KIND_RESUME {
            return Err(DecodeError::Invalid("stream kind"));
        }
        let mut open = [0u8; StreamHeader::LEN];
        open.copy_from_slice(&bytes[..StreamHeader::LEN]);
        open[0] = StreamHeader::KIND_OPEN;
        let stream = StreamHeader::decode(&open)?;
        let mut buf = &bytes[StreamHeader::LEN..];
        let received = buf.get_u64();
        let seen = match buf.get_u8() {
            0 => false,
            1 => true,
            _ => return Err(DecodeError::Invalid("seen flag")),
        };
        Ok(ResumeHeader {
            stream,
            received,
            seen,
        })
    }
}

impl StreamHeader {
    /// kind (1), id (8), forward (2), port (2), visitor address (16, IPv4 mapped), visitor port (2).
    pub const LEN: usize = 31;
    const KIND_OPEN: u8 = 0x01;

    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut out = [0u8; Self::LEN];
        let mut buf = &mut out[..];
        buf.put_u8(Self::KIND_OPEN);
        buf.put_u64(self.id);
        buf.put_u16(self.forward);
        buf.put_u16(self.port);
        let ip = match self.visitor.ip() {
            IpAddr::V4(v4) => v4.to_ipv6_mapped(),
            IpAddr::V6(v6) => v6,
        };
        buf.put_slice(&ip.octets());
        buf.put_u16(self.visitor.port());
        out
    }

    pub fn decode(bytes: &[u8; Self::LEN]) -> Result<Self, DecodeError> {
        let mut buf = &bytes[..];
        if buf.get_u8() != Self::KIND_OPEN {
            return Err(DecodeError::Invalid("stream kind"));
        }
        let id = buf.get_u64();
        let forward = buf.get_u16();
        let port = buf.get_u16();
        let mut ip = [0u8; 16];
        buf.copy_to_slice(&mut ip);
        let ip = Ipv6Addr::from(ip).to_canonical();
        let visitor = SocketAddr::new(ip, buf.get_u16());
        Ok(StreamHeader {
            id,
            forward,
            port,
            visitor,
        })
    }
}

/// Why a session was closed: the application error code of QUIC's CONNECTION_CLOSE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseCode {
    /// The agent is stopping.
    AgentShutdown,
    /// The relay is stopping, or restarting without keeping its visitors: reconnect at once.
    RelayShutdown,
    /// A newer session of the same agent took over.
    Replaced,
    /// The peer broke the protocol.
    ProtocolError,
    /// The agent speaks a version the relay does not.
    UnsupportedVersion,
    /// The agent's key is no longer listed.
    Unauthorized,
    /// A step of the session set-up took too long.
    Timeout,
    /// A bug in the relay ended the session; reconnecting starts a fresh one.
    InternalError,
    /// The relay's config for this agent changed (its allowlist): reconnect at once, so that
    /// the forwards are asked for again under the new one.
    Reconfigured,
    /// The TCP connection under the session ended (see `crate::transport::carrier`): said
    /// only to this side's own connection, as the peer can no longer be told.
    PathLost,
    /// The agent moved to another path to the relay (UDP or TCP); a session there resumes
    /// this one.
    PathChanged,
    /// The relay is restarting and its next process keeps the visitor connections: reconnect
    /// at once and resume this session, which a relay that said [`CloseCode::RelayShutdown`]
    /// would not.
    RelayRestart,
}

impl CloseCode {
    const ALL: [CloseCode; 12] = [
        CloseCode::AgentShutdown,
        CloseCode::RelayShutdown,
        CloseCode::Replaced,
        CloseCode::ProtocolError,
        CloseCode::UnsupportedVersion,
        CloseCode::Unauthorized,
        CloseCode::Timeout,
        CloseCode::InternalError,
        CloseCode::Reconfigured,
        CloseCode::PathLost,
        CloseCode::PathChanged,
        CloseCode::RelayRestart,
    ];

    pub fn code(self) -> quinn::VarInt {
        quinn::VarInt::from_u32(match self {
            CloseCode::AgentShutdown => 1,
            CloseCode::RelayShutdown => 2,
            CloseCode::Replaced => 3,
            CloseCode::ProtocolError => 4,
            CloseCode::UnsupportedVersion => 5,
            CloseCode::Unauthorized => 6,
            CloseCode::Timeout => 7,
            CloseCode::InternalError => 8,
            CloseCode::Reconfigured => 9,
            CloseCode::PathLost => 10,
            CloseCode::PathChanged => 11,
            CloseCode::RelayRestart => 12,
        })
    }

    pub fn from_code(code: quinn::VarInt) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.code() == code)
    }

    /// Words for the peer's log, sent as the close reason.
    pub fn reason(self) -> &'static str {
        match self {
            CloseCode::AgentShutdown => "agent shutting down",
            CloseCode::RelayShutdown => "relay shutting down",
            CloseCode::Replaced => "a newer session of this agent took over",
            CloseCode::ProtocolError => "protocol error",
            CloseCode::UnsupportedVersion => "unsupported protocol version",
            CloseCode::Unauthorized => "agent not authorized",
            CloseCode::Timeout => "session set-up timed out",
            CloseCode::InternalError => "internal error in the relay",
            CloseCode::Reconfigured => "the relay's config for this agent changed",
            CloseCode::PathLost => "the TCP connection under the session ended",
            CloseCode::PathChanged => "the agent moved to another path",
            CloseCode::RelayRestart => "relay restarting; its visitors wait for this session",
        }
    }

    /// Closes `conn` with this code and its reason.
    pub fn close(self, conn: &quinn::Connection) {
        conn.close(self.code(), self.reason().as_bytes());
    }
}

/// Why a data stream was reset or stopped: the application error code of RESET_STREAM and
/// STOP_SENDING.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamCode {
    /// The agent could not connect to the local service.
    LocalUnreachable,
    /// The TCP connection at the other end failed or was reset.
    Aborted,
    /// The stream header was malformed or named an unknown forward.
    BadHeader,
    /// A resumed data stream named a stream this side no longer holds, or offsets that do not
    /// fit what it holds.
    NotResumable,
}

impl StreamCode {
    pub fn code(self) -> quinn::VarInt {
        quinn::VarInt::from_u32(match self {
            StreamCode::LocalUnreachable => 1,
            StreamCode::Aborted => 2,
            StreamCode::BadHeader => 3,
            StreamCode::NotResumable => 4,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(start: u16, end: u16) -> PortRange {
        PortRange::new(start, end).unwrap()
    }

    fn hello() -> Hello {
        Hello {
            version: VERSION,
            resume: Some(0x0102_0304_0506_0708),
            forwards: vec![
                ForwardRequest {
                    name: "ssh".into(),
                    proto: Proto::Tcp,
                    remote: range(2222, 2222),
                    flow_idle: Duration::ZERO,
                    allow_from: vec![
                        "203.0.113.0/24".parse().unwrap(),
                        "2001:db8::/32".parse().unwrap(),
                        "198.51.100.7".parse().unwrap(),
                    ],
                },
                ForwardRequest {
                    name: "mosh".into(),
                    proto: Proto::Udp,
                    remote: range(60000, 60010),
                    flow_idle: Duration::from_secs(120),
                    allow_from: vec![],
                },
            ],
        }
    }

    fn welcome() -> Welcome {
        Welcome {
            session: u64::MAX,
            results: vec![
                ForwardResult::Opened,
                ForwardResult::Refused(Refusal::NotAllowed),
                ForwardResult::Refused(Refusal::InUse),
                ForwardResult::Refused(Refusal::Invalid),
                ForwardResult::Refused(Refusal::Unavailable),
            ],
            resumed: Some(vec![1, u64::MAX]),
        }
    }

    fn split(frame: &[u8]) -> (u8, &[u8]) {
        let header: [u8; FRAME_HEADER_LEN] = frame[..FRAME_HEADER_LEN].try_into().unwrap();
        let (kind, len) = decode_frame_header(header).unwrap();
        assert_eq!(len, frame.len() - FRAME_HEADER_LEN);
        (kind, &frame[FRAME_HEADER_LEN..])
    }

    #[test]
    fn hello_round_trips() {
        for message in [
            AgentMessage::Hello(hello()),
            AgentMessage::Hello(Hello {
                version: 7,
                resume: None,
                forwards: vec![],
            }),
        ] {
            let frame = message.encode();
            let (kind, body) = split(&frame);
            assert_eq!(AgentMessage::decode(kind, body), Ok(message));
        }
    }

    #[test]
    fn update_round_trips_and_refuses_an_id_given_twice() {
        let forwards = hello().forwards;
        let update = Update {
            forwards: vec![(3, forwards[0].clone()), (0, forwards[1].clone())],
        };
        let message = AgentMessage::Update(update);
        let frame = message.encode();
        let (kind, body) = split(&frame);
        assert_eq!(AgentMessage::decode(kind, body), Ok(message));

        let twice = AgentMessage::Update(Update {
            forwards: vec![(1, forwards[0].clone()), (1, forwards[1].clone())],
        });
        let frame = twice.encode();
        let (kind, body) = split(&frame);
        assert_eq!(
            AgentMessage::decode(kind, body),
            Err(DecodeError::Invalid("forward id given twice"))
        );

        let updated = RelayMessage::Updated(Updated {
            results: welcome().results,
        });
        let frame = updated.encode();
        let (kind, body) = split(&frame);
        assert_eq!(RelayMessage::decode(kind, body), Ok(updated));
    }

    #[test]
    fn an_update_over_the_forward_limit_is_refused_before_it_is_read() {
        let mut body = Vec::new();
        body.extend_from_slice(&(MAX_FORWARDS as u16 + 1).to_be_bytes());
        assert_eq!(
            AgentMessage::decode(TYPE_UPDATE, &body),
            Err(DecodeError::Invalid("forward count"))
        );
    }

    #[test]
    fn welcome_round_trips() {
        let message = RelayMessage::Welcome(welcome());
        let frame = message.encode();
        let (kind, body) = split(&frame);
        assert_eq!(RelayMessage::decode(kind, body), Ok(message));
    }

    #[test]
    fn every_truncation_is_refused() {
        let frame = AgentMessage::Hello(hello()).encode();
        let (kind, body) = split(&frame);
        for cut in 0..body.len() {
            assert_eq!(
                AgentMessage::decode(kind, &body[..cut]),
                Err(DecodeError::Truncated)
            );
        }
        let frame = RelayMessage::Welcome(welcome()).encode();
        let (kind, body) = split(&frame);
        for cut in 0..body.len() {
            assert_eq!(
                RelayMessage::decode(kind, &body[..cut]),
                Err(DecodeError::Truncated)
            );
        }
    }

    #[test]
    fn trailing_bytes_are_refused() {
        let frame = AgentMessage::Hello(hello()).encode();
        let (kind, body) = split(&frame);
        let mut longer = body.to_vec();
        longer.push(0);
        assert_eq!(
            AgentMessage::decode(kind, &longer),
            Err(DecodeError::TrailingBytes(1))
        );
    }

    #[test]
    fn oversized_frames_are_refused_before_reading_the_body() {
        let mut header = [TYPE_HELLO, 0, 0, 0, 0];
        header[1..].copy_from_slice(&(MAX_FRAME_LEN as u32 + 1).to_be_bytes());
        assert_eq!(
            decode_frame_header(header),
            Err(DecodeError::TooLong {
                len: MAX_FRAME_LEN + 1,
                max: MAX_FRAME_LEN
            })
        );
        header[1..].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(
            decode_frame_header(header),
            Err(DecodeError::TooLong { .. })
        ));
        header[1..].copy_from_slice(&(MAX_FRAME_LEN as u32).to_be_bytes());
        assert_eq!(decode_frame_header(header), Ok((TYPE_HELLO, MAX_FRAME_LEN)));
    }

    #[test]
    fn unknown_types_and_directions_are_refused() {
        let hello = AgentMessage::Hello(hello()).encode();
        let (kind, body) = split(&hello);
        assert_eq!(
            RelayMessage::decode(kind, body),
            Err(DecodeError::UnknownType(TYPE_HELLO))
        );
        assert_eq!(
            AgentMessage::decode(0x7f, body),
            Err(DecodeError::UnknownType(0x7f))
        );
    }

    #[test]
    fn invalid_fields_are_refused() {
        // version 1, no resume, one forward named "a", proto 9.
        let body = [0, 1, 0, 0, 1, 1, b'a', 9, 0, 22, 0, 22];
        assert_eq!(
            AgentMessage::decode(TYPE_HELLO, &body),
            Err(DecodeError::Invalid("proto"))
        );
        // A range that runs backwards.
        let body = [0, 1, 0, 0, 1, 1, b'a', 1, 0, 23, 0, 22];
        assert_eq!(
            AgentMessage::decode(TYPE_HELLO, &body),
            Err(DecodeError::Invalid("port range"))
        );
        // Port 0.
        let body = [0, 1, 0, 0, 1, 1, b'a', 1, 0, 0, 0, 0];
        assert_eq!(
            AgentMessage::decode(TYPE_HELLO, &body),
            Err(DecodeError::Invalid("port range"))
        );
        // A name that is not UTF-8.
        let body = [0, 1, 0, 0, 1, 1, 0xff, 1, 0, 22, 0, 22];
        assert_eq!(
            AgentMessage::decode(TYPE_HELLO, &body),
            Err(DecodeError::Invalid("forward name"))
        );
        // Names that would forge a log line or move a terminal's cursor, or are empty.
        for name in [&b"ok\nINFO forged"[..], b"\x1b[2J", b"tab\there", b""] {
            let mut body = vec![0, 1, 0, 0, 1, name.len() as u8];
            body.extend_from_slice(name);
            body.extend_from_slice(&[1, 0, 22, 0, 22, 0, 0, 0, 0, 0]);
            assert_eq!(
                AgentMessage::decode(TYPE_HELLO, &body),
                Err(DecodeError::Invalid("forward name")),
                "{name:?}"
            );
        }
        // A name longer than the limit.
        let body = [0, 1, 0, 0, 1, MAX_NAME_LEN as u8 + 1];
        assert_eq!(
            AgentMessage::decode(TYPE_HELLO, &body),
            Err(DecodeError::Invalid("forward name length"))
        );
        // More forwards than the limit: refused before any allocation for them.
        let count = (MAX_FORWARDS as u16 + 1).to_be_bytes();
        let body = [0, 1, 0, count[0], count[1]];
        assert_eq!(
            AgentMessage::decode(TYPE_HELLO, &body),
            Err(DecodeError::Invalid("forward count"))
        );
        // allow_from: too many blocks, an unknown family, a prefix too long, host bits set.
        let forward = [0, 1, 0, 0, 1, 1, b'a', 1, 0, 22, 0, 22, 0, 0, 0, 0];
        let with = |tail: &[u8]| [&forward[..], tail].concat();
        let cases: [(&[u8], &str); 4] = [
            (&[MAX_ALLOW_FROM as u8 + 1], "allow_from count"),
            (&[1, 5, 0, 0, 0, 0, 0], "address family"),
            (&[1, 4, 203, 0, 113, 0, 33], "address block"),
            (&[1, 4, 203, 0, 113, 5, 24], "address block"),
        ];
        for (tail, what) in cases {
            assert_eq!(
                AgentMessage::decode(TYPE_HELLO, &with(tail)),
                Err(DecodeError::Invalid(what))
            );
        }
        assert!(AgentMessage::decode(TYPE_HELLO, &with(&[1, 4, 203, 0, 113, 0, 24])).is_ok());
        // A resume flag that is neither 0 nor 1.
        let body = [0, 1, 2];
        assert_eq!(
            AgentMessage::decode(TYPE_HELLO, &body),
            Err(DecodeError::Invalid("resume flag"))
        );
        // An unknown result.
        let body = [0, 0, 0, 0, 0, 0, 0, 1, 0, 1, 99];
        assert_eq!(
            RelayMessage::decode(TYPE_WELCOME, &body),
            Err(DecodeError::Invalid("result"))
        );
    }

    #[test]
    fn stream_header_round_trips_both_families() {
        for visitor in ["203.0.113.9:40000", "[2001:db8::1]:1", "[::ffff:1.2.3.4]:5"] {
            let visitor: SocketAddr = visitor.parse().unwrap();
            let header = StreamHeader {
                id: 42,
                forward: 3,
                port: 60005,
                visitor,
            };
            let decoded = StreamHeader::decode(&header.encode()).unwrap();
            assert_eq!(decoded.id, 42);
            assert_eq!(decoded.forward, 3);
            assert_eq!(decoded.port, 60005);
            // IPv4 (also IPv4-mapped IPv6) comes back as plain IPv4.
            let expected = SocketAddr::new(visitor.ip().to_canonical(), visitor.port());
            assert_eq!(decoded.visitor, expected);
        }
    }

    #[test]
    fn stream_header_with_unknown_kind_is_refused() {
        let visitor = "127.0.0.1:1".parse().unwrap();
        let mut bytes = StreamHeader {
            id: 1,
            forward: 0,
            port: 22,
            visitor,
        }
        .encode();
        bytes[0] = 0x7f;
        assert_eq!(
            StreamHeader::decode(&bytes),
            Err(DecodeError::Invalid("stream kind"))
        );
    }

    #[test]
    fn acks_round_trip_both_ways_and_their_count_is_capped() {
        let acks = Acks {
            streams: vec![(1, 0), (u64::MAX, u64::MAX)],
        };
        let frame = AgentMessage::Acks(acks.clone()).encode();
        let (kind, body) = split(&frame);
        assert_eq!(
            AgentMessage::decode(kind, body),
            Ok(AgentMessage::Acks(acks.clone()))
        );
        let frame = RelayMessage::Acks(acks.clone()).encode();
        let (kind, body) = split(&frame);
        assert_eq!(
            RelayMessage::decode(kind, body),
            Ok(RelayMessage::Acks(acks))
        );

        let over = (MAX_STREAMS_PER_FRAME + 1) as u16;
        assert_eq!(
            AgentMessage::decode(TYPE_AGENT_ACKS, &over.to_be_bytes()),
            Err(DecodeError::Invalid("ack count"))
        );
        let mut welcome = RelayMessage::Welcome(Welcome {
            session: 1,
            results: vec![],
            resumed: None,
        })
        .encode()
        .to_vec();
        welcome.pop(); // the "not resumed" flag
        welcome.push(1);
        welcome.extend_from_slice(&over.to_be_bytes());
        let (kind, body) = split_unchecked(&welcome);
        assert_eq!(
            RelayMessage::decode(kind, body),
            Err(DecodeError::Invalid("resumed stream count"))
        );
    }

    fn split_unchecked(frame: &[u8]) -> (u8, &[u8]) {
        (frame[0], &frame[FRAME_HEADER_LEN..])
    }

    #[test]
    fn resume_header_round_trips_and_kinds_are_told_apart() {
        let visitor = "127.0.0.1:1".parse().unwrap();
        for seen in [false, true] {
            let header = ResumeHeader {
                stream: StreamHeader {
                    id: 7,
                    forward: 2,
                    port: 2222,
                    visitor,
                },
                received: 1 << 40,
                seen,
            };
            let mut bytes = header.encode();
            assert_eq!(ResumeHeader::decode(&bytes), Ok(header));
            assert_eq!(StreamKind::from_wire(bytes[0]), Ok(StreamKind::Resume));
            bytes[ResumeHeader::LEN - 1] = 2;
            assert_eq!(
                ResumeHeader::decode(&bytes),
                Err(DecodeError::Invalid("seen flag"))
            );
        }
        let open = StreamHeader {
            id: 1,
            forward: 0,
            port: 22,
            visitor,
        }
        .encode();
        assert_eq!(StreamKind::from_wire(open[0]), Ok(StreamKind::Open));
        assert_eq!(
            StreamKind::from_wire(0x7f),
            Err(DecodeError::Invalid("stream kind"))
        );
    }

    #[test]
    fn close_codes_round_trip() {
        for code in CloseCode::ALL {
            assert_eq!(CloseCode::from_code(code.code()), Some(code));
        }
        assert_eq!(CloseCode::from_code(quinn::VarInt::from_u32(0)), None);
    }
}
