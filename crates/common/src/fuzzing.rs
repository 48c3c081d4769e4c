//! The bodies of the fuzz targets in `fuzz/`, kept here so that a stable test can replay their
//! corpus (`tests/fuzz_corpus.rs`). Each takes any bytes: it must never panic, and what decodes
//! must encode back to the same bytes, so that no two encodings mean one message.

use std::path::Path;

use crate::config::{AgentConfig, RelayConfig};
use crate::wire::datagram::DatagramHeader;
use crate::wire::protocol::{
    decode_frame_header, AgentMessage, RelayMessage, ResumeHeader, StreamHeader, FRAME_HEADER_LEN,
};

/// A control frame as the relay or the agent reads it from a stream, and the header of a data
/// stream as the agent reads it.
pub fn control_frame(data: &[u8]) {
    if let Some(header) = data.first_chunk::<{ StreamHeader::LEN }>() {
        if let Ok(decoded) = StreamHeader::decode(header) {
            assert_eq!(&decoded.encode(), header, "stream header re-encodes");
        }
    }
    if let Some(header) = data.first_chunk::<{ ResumeHeader::LEN }>() {
        if let Ok(decoded) = ResumeHeader::decode(header) {
            assert_eq!(&decoded.encode(), header, "resume header re-encodes");
        }
    }
    let Some((header, body)) = data.split_first_chunk::<FRAME_HEADER_LEN>() else {
        return;
    };
    let Ok((kind, len)) = decode_frame_header(*header) else {
        return;
    };
    // A stream reader takes exactly `len` bytes; the rest would be the next frame.
    let Some(body) = body.get(..len) else {
        return;
    };
    let frame = &data[..FRAME_HEADER_LEN + len];
    if let Ok(message) = AgentMessage::decode(kind, body) {
        assert_eq!(&message.encode()[..], frame, "agent message re-encodes");
    }
    if let Ok(message) = RelayMessage::decode(kind, body) {
        assert_eq!(&message.encode()[..], frame, "relay message re-encodes");
    }
}

/// A QUIC datagram as either side receives it.
pub fn datagram(data: &[u8]) {
    if let Ok((header, payload)) = DatagramHeader::decode(data) {
        let mut encoded = header.encode().to_vec();
        encoded.extend_from_slice(payload);
        assert_eq!(encoded, data, "datagram re-encodes");
    }
}

/// The text of a relay.toml and of an agent.toml: accepted, or refused with problems that each
/// say something.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Err(error) = RelayConfig::from_toml(text, Path::new("relay.toml")) {
        assert!(!error.problems.is_empty());
        assert!(error.problems.iter().all(|p| !p.message.is_empty()));
    }
    if let Err(error) = AgentConfig::from_toml(text, Path::new("agent.toml")) {
        assert!(!error.problems.is_empty());
        assert!(error.problems.iter().all(|p| !p.message.is_empty()));
    }
}
