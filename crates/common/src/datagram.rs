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

use crate::protocol::DecodeError;

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
