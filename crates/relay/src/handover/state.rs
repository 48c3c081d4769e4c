//! The state file a restarting relay leaves for its next process: for each agent whose
//! session it closed, what the next process needs to take its visitors over. The sockets
//! themselves travel through systemd's descriptor store; this says what each one is.
//!
//! Binary, big-endian, every length checked before anything is allocated, and signed with a
//! key derived from the relay's own key (HMAC-SHA256): a file another relay wrote, one changed
//! by anyone without the key, one cut short, or one of another format is refused as a whole,
//! never half trusted.
//!
//! ```text
//! magic "tether handover\n" (16), format (2), written (8, seconds since the Unix epoch),
//! boot id (2 + that many bytes), agents (4), then per agent:
//!   name (2 + bytes), session (8), next stream id (8), next flow id (4), flow ids came
//!   round (1), forwards (4 + an Update's body),
//!   streams (4), then per stream:
//!     header (StreamHeader, 31), public address (16 + 2), opened (8), start (8),
//!     confirmed (8), received (8), flags (1: ended, peer ended), held bytes (4 + bytes)
//! signature (32)
//! ```

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tether_common::carry::resume::{Snapshot, HELD_PER_SESSION, HELD_PER_STREAM};
use tether_common::wire::datagram::FlowId;
use tether_common::wire::protocol::{
    is_valid_name, ForwardId, ForwardRequest, SessionId, StreamHeader, Update, MAX_FRAME_LEN,
};

const MAGIC: &[u8; 16] = b"tether handover\n";

/// This build's format; a file of any other is refused.
pub const FORMAT: u16 = 1;

const SIGNATURE_LEN: usize = 32;

/// Bytes of state per held stream besides its held bytes, at most.
const PER_STREAM: usize = StreamHeader::LEN + 18 + 4 * 8 + 1 + 4;

/// What the next process takes over from this one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct State {
    /// When it was written, in seconds since the Unix epoch.
    pub written: u64,
    /// The kernel's boot id when it was written: sockets do not outlive a reboot.
    pub boot_id: String,
    pub agents: Vec<AgentState>,
}

/// One agent whose visitors wait for its next session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentState {
    pub name: String,
    /// The session the relay closed: the agent's next Hello names it, and resumes it.
    pub session: SessionId,
    /// The id the next data stream gets: ids are never given twice while streams are held.
    pub next_stream: u64,
    /// The id the next UDP flow gets, and whether ids came round: the agent may still hold
    /// the flows numbered before.
    pub next_flow: (FlowId, bool),
    /// What the session asked for, as its Hello or latest Update did.
    pub forwards: Vec<(ForwardId, ForwardRequest)>,
    pub streams: Vec<StreamState>,
}

/// One visitor connection, and where its socket is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamState {
    pub snapshot: Snapshot,
    /// The relay's end of the visitor's connection: with the visitor's address (in the
    /// stream's header), it tells which descriptor is this connection's.
    pub public: SocketAddr,
}

/// Why a state file is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StateError {
    #[error("it is not a tether hand-over file")]
    NotOurs,
    #[error("it is of format {0}, this relay reads format {FORMAT}")]
    Format(u16),
    #[error("its signature does not match this relay's key (another relay's, or changed)")]
    Signature,
    #[error("it is {len} bytes, more than the {max} a relay of {agents} agents may leave")]
    TooLong {
        len: usize,
        max: usize,
        agents: usize,
    },
    #[error("it does not decode: {0}")]
    Malformed(&'static str),
}

impl State {
    /// The file's bytes, signed with `key`.
    pub fn encode(&self, key: &ring::hmac::Key) -> Vec<u8> {
        let mut buf = BytesMut::new();
        buf.put_slice(MAGIC);
        buf.put_u16(FORMAT);
        buf.put_u64(self.written);
        put_text(&mut buf, &self.boot_id);
        buf.put_u32(self.agents.len() as u32);
        for agent in &self.agents {
            put_text(&mut buf, &agent.name);
            buf.put_u64(agent.session);
            buf.put_u64(agent.next_stream);
            buf.put_u32(agent.next_flow.0);
            buf.put_u8(u8::from(agent.next_flow.1));
            let body = Update {
                forwards: agent.forwards.clone(),
            }
            .encode_body();
            buf.put_u32(body.len() as u32);
            buf.put_slice(&body);
            buf.put_u32(agent.streams.len() as u32);
            for stream in &agent.streams {
                let s = &stream.snapshot;
                buf.put_slice(&s.header.encode());
                put_address(&mut buf, stream.public);
                for value in [s.opened, s.start, s.confirmed, s.received] {
                    buf.put_u64(value);
                }
                buf.put_u8(u8::from(s.ended) | u8::from(s.peer_ended) << 1);
                buf.put_u32(s.held.len() as u32);
                buf.put_slice(&s.held);
            }
        }
        let signature = ring::hmac::sign(key, &buf);
        buf.put_slice(signature.as_ref());
        buf.to_vec()
    }

    /// The most bytes a relay serving `agents` agents may leave: each agent's held bytes at
    /// their cap, and a stream's bookkeeping per byte of them, as if each held one byte.
    pub fn max_len(agents: usize) -> usize {
        let per_agent = HELD_PER_SESSION * (1 + PER_STREAM) + MAX_FRAME_LEN + 1024;
        per_agent.saturating_mul(agents).saturating_add(4096)
    }

    /// Reads a file `encode` wrote with the same `key`, for a relay serving `agents` agents.
    pub fn decode(file: &[u8], key: &ring::hmac::Key, agents: usize) -> Result<Self, StateError> {
        if file.len() < MAGIC.len() + 2 + SIGNATURE_LEN || &file[..MAGIC.len()] != MAGIC {
            return Err(StateError::NotOurs);
        }
        let format = u16::from_be_bytes([file[MAGIC.len()], file[MAGIC.len() + 1]]);
        if format != FORMAT {
            return Err(StateError::Format(format));
        }
        let max = Self::max_len(agents);
        if file.len() > max {
            return Err(StateError::TooLong {
                len: file.len(),
                max,
                agents,
            });
        }
        let (signed, signature) = file.split_at(file.len() - SIGNATURE_LEN);
        ring::hmac::verify(key, signed, signature).map_err(|_| StateError::Signature)?;
        let mut buf = &signed[MAGIC.len() + 2..];
        decode_body(&mut buf, agents).map_err(StateError::Malformed)
    }
}

fn decode_body(buf: &mut &[u8], agents: usize) -> Result<State, &'static str> {
    let written = get_u64(buf)?;
    let boot_id = get_text(buf)?;
    let count = get_u32(buf)? as usize;
    if count > agents {
        return Err("more agents than the relay lists");
    }
    let mut states = Vec::with_capacity(count);
    for _ in 0..count {
        let name = get_text(buf)?;
        if !is_valid_name(&name) {
            return Err("an agent name");
        }
        let session = get_u64(buf)?;
        let next_stream = get_u64(buf)?;
        let next_flow = get_u32(buf)?;
        let flows_wrapped = match get_u8(buf)? {
            0 => false,
            1 => true,
            _ => return Err("flow numbering"),
        };
        let len = get_u32(buf)? as usize;
        if len > MAX_FRAME_LEN || buf.len() < len {
            return Err("forwards");
        }
        let (body, rest) = buf.split_at(len);
        *buf = rest;
        let forwards = Update::decode_body(body).map_err(|_| "forwards")?.forwards;
        let streams = get_u32(buf)? as usize;
        // Each stream takes at least its bookkeeping: a count past what is left is a lie.
        if streams > buf.len() / PER_STREAM {
            return Err("stream count");
        }
        let mut held_in_all = 0usize;
        let mut kept = Vec::with_capacity(streams);
        for _ in 0..streams {
            let header = take::<{ StreamHeader::LEN }>(buf)?;
            let header = StreamHeader::decode(&header).map_err(|_| "a stream header")?;
            let public = get_address(buf)?;
            let [opened, start, confirmed, received] =
                [get_u64(buf)?, get_u64(buf)?, get_u64(buf)?, get_u64(buf)?];
            let flags = get_u8(buf)?;
            if flags > 3 {
                return Err("stream flags");
            }
            let len = get_u32(buf)? as usize;
            held_in_all += len;
            if len > HELD_PER_STREAM || held_in_all > HELD_PER_SESSION || buf.len() < len {
                return Err("held bytes");
            }
            let held = Bytes::copy_from_slice(&buf[..len]);
            buf.advance(len);
            kept.push(StreamState {
                snapshot: Snapshot {
                    header,
                    opened,
                    start,
                    held,
                    ended: flags & 1 != 0,
                    confirmed,
                    received,
                    peer_ended: flags & 2 != 0,
                },
                public,
            });
        }
        states.push(AgentState {
            name,
            session,
            next_stream,
            next_flow: (next_flow, flows_wrapped),
            forwards,
            streams: kept,
        });
    }
    if !buf.is_empty() {
        return Err("bytes after the last agent");
    }
    Ok(State {
        written,
        boot_id,
        agents: states,
    })
}

fn put_text(buf: &mut BytesMut, text: &str) {
    let text = &text.as_bytes()[..text.len().min(u16::MAX as usize)];
    buf.put_u16(text.len() as u16);
    buf.put_slice(text);
}

fn put_address(buf: &mut BytesMut, address: SocketAddr) {
    let ip = match address.ip() {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    };
    buf.put_slice(&ip.octets());
    buf.put_u16(address.port());
}

fn take<const N: usize>(buf: &mut &[u8]) -> Result<[u8; N], &'static str> {
    if buf.len() < N {
        return Err("cut short");
    }
    let mut out = [0; N];
    buf.copy_to_slice(&mut out);
    Ok(out)
}

fn get_u8(buf: &mut &[u8]) -> Result<u8, &'static str> {
    Ok(take::<1>(buf)?[0])
}

fn get_u32(buf: &mut &[u8]) -> Result<u32, &'static str> {
    Ok(u32::from_be_bytes(take(buf)?))
}

fn get_u64(buf: &mut &[u8]) -> Result<u64, &'static str> {
    Ok(u64::from_be_bytes(take(buf)?))
}

fn get_text(buf: &mut &[u8]) -> Result<String, &'static str> {
    let len = u16::from_be_bytes(take(buf)?) as usize;
    if buf.len() < len {
        return Err("cut short");
    }
    let text = std::str::from_utf8(&buf[..len]).map_err(|_| "text that is not UTF-8")?;
    buf.advance(len);
    Ok(text.to_owned())
}

fn get_address(buf: &mut &[u8]) -> Result<SocketAddr, &'static str> {
    let ip = Ipv6Addr::from(take::<16>(buf)?).to_canonical();
    let port = u16::from_be_bytes(take(buf)?);
    Ok(SocketAddr::new(ip, port))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tether_common::net::ports::{PortRange, Proto};

    fn key(seed: u8) -> ring::hmac::Key {
        ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &[seed; 32])
    }

    fn state() -> State {
        let forward = ForwardRequest {
            name: "ssh".into(),
            proto: Proto::Tcp,
            remote: PortRange::single(2222).unwrap(),
            flow_idle: std::time::Duration::ZERO,
            allow_from: Vec::new(),
        };
        let stream = |id: u64, held: &'static [u8]| StreamState {
            snapshot: Snapshot {
                header: StreamHeader {
                    id,
                    forward: 0,
                    port: 2222,
                    visitor: "198.51.100.7:40000".parse().unwrap(),
                },
                opened: 1_765_000_000,
                start: 10,
                held: Bytes::from_static(held),
                ended: id == 2,
                confirmed: 10,
                received: 77,
                peer_ended: id == 2,
            },
            public: "[2001:db8::1]:2222".parse().unwrap(),
        };
        State {
            written: 1_765_000_100,
            boot_id: "4d2d7c1e-0000-4000-8000-000000000000".into(),
            agents: vec![AgentState {
                name: "dorm".into(),
                session: 0x0102_0304_0506_0708,
                next_stream: 3,
                next_flow: (9, true),
                forwards: vec![(0, forward)],
                streams: vec![stream(1, b"not yet confirmed"), stream(2, b"")],
            }],
        }
    }

    #[test]
    fn a_state_reads_back_as_it_was_written() {
        let file = state().encode(&key(1));
        assert_eq!(State::decode(&file, &key(1), 1), Ok(state()));
    }

    #[test]
    fn streams_that_hold_nothing_read_back_too() {
        let mut idle = state();
        idle.agents[0].streams.remove(0);
        let file = idle.encode(&key(1));
        assert_eq!(State::decode(&file, &key(1), 1), Ok(idle));
    }

    #[test]
    fn another_relays_a_changed_a_cut_or_a_foreign_file_is_refused() {
        let file = state().encode(&key(1));
        assert_eq!(State::decode(&file, &key(2), 1), Err(StateError::Signature));
        for at in [20, file.len() / 2, file.len() - 1] {
            let mut changed = file.clone();
            changed[at] ^= 1;
            assert_eq!(
                State::decode(&changed, &key(1), 1),
                Err(StateError::Signature),
                "byte {at} changed"
            );
        }
        for len in [0, 10, 17, file.len() - 1] {
            assert!(
                State::decode(&file[..len], &key(1), 1).is_err(),
                "{len} bytes"
            );
        }
        let mut format = file.clone();
        format[16..18].copy_from_slice(&2u16.to_be_bytes());
        assert_eq!(
            State::decode(&format, &key(1), 1),
            Err(StateError::Format(2))
        );
        assert_eq!(
            State::decode(
                b"# tether relay\nlisten = \"0.0.0.0:4433\"\n12345678901234567890",
                &key(1),
                1
            ),
            Err(StateError::NotOurs)
        );
    }

    /// `body` as a file signed with `key`, whatever it says.
    fn signed(body: &[u8], key: &ring::hmac::Key) -> Vec<u8> {
        let mut file = body.to_vec();
        file.extend_from_slice(ring::hmac::sign(key, body).as_ref());
        file
    }

    #[test]
    fn whatever_a_signed_file_says_decoding_it_never_panics() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(26);
        let file = state().encode(&key(1));
        let body = &file[..file.len() - SIGNATURE_LEN];
        for _ in 0..20_000 {
            let mut changed = body.to_vec();
            for _ in 0..rng.gen_range(1..8) {
                // Past the magic and the format, which are checked before the signature.
                let at = rng.gen_range(18..changed.len());
                changed[at] = rng.gen();
            }
            let cut = rng.gen_range(18..=changed.len());
            let _ = State::decode(&signed(&changed[..cut], &key(1)), &key(1), 4);
        }
    }

    #[test]
    fn a_signed_state_past_the_running_caps_is_refused() {
        // More agents than the relay lists.
        let file = state().encode(&key(1));
        assert_eq!(
            State::decode(&file, &key(1), 0),
            Err(StateError::Malformed("more agents than the relay lists"))
        );
        // A stream holding more than a stream may.
        let mut big = state();
        big.agents[0].streams[0].snapshot.held = Bytes::from(vec![0; HELD_PER_STREAM + 1]);
        let file = big.encode(&key(1));
        assert_eq!(
            State::decode(&file, &key(1), 1),
            Err(StateError::Malformed("held bytes"))
        );
        // Streams that hold more together than an agent may.
        let mut many = state();
        let stream = many.agents[0].streams[0].clone();
        many.agents[0].streams = (0..3)
            .map(|id| {
                let mut s = stream.clone();
                s.snapshot.header.id = id;
                s.snapshot.held = Bytes::from(vec![0; HELD_PER_STREAM]);
                s
            })
            .collect();
        let file = many.encode(&key(1));
        assert_eq!(
            State::decode(&file, &key(1), 1),
            Err(StateError::Malformed("held bytes"))
        );
        // A file longer than any relay of this many agents leaves.
        let long = vec![0u8; State::max_len(1) + 1];
        let mut long_file = MAGIC.to_vec();
        long_file.extend_from_slice(&FORMAT.to_be_bytes());
        long_file.extend_from_slice(&long);
        assert!(matches!(
            State::decode(&long_file, &key(1), 1),
            Err(StateError::TooLong { .. })
        ));
    }
}
