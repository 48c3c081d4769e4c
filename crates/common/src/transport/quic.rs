//! QUIC transport settings of a session, on each side.

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use quinn::{EndpointConfig, IdleTimeout, TransportConfig, VarInt, VarIntBoundsExceeded};
use quinn_proto::HashedConnectionIdGenerator;
use socket2::{Domain, Protocol, Socket, Type};

use crate::transport::congestion::ShortQueueConfig;
use crate::trust::identity::Identity;
use crate::wire::datagram::MAX_STREAMED;
use crate::wire::protocol::MAX_DATA_STREAMS;

/// Bytes one data stream may have in flight, and a whole session: the memory bound per session.
pub const STREAM_WINDOW: u32 = 8 * 1024 * 1024;
pub const SESSION_WINDOW: u32 = 16 * 1024 * 1024;

/// Bytes of kernel buffer asked for the QUIC socket, each way: room for the packets that arrive
/// while the process is busy, which would otherwise be dropped and taken for congestion.
pub const SOCKET_BUFFER: usize = 4 * 1024 * 1024;

/// Bytes of QUIC datagrams each side buffers, either way; past it the oldest are dropped.
const DATAGRAM_BUFFER: usize = 1024 * 1024;

fn common() -> TransportConfig {
    let mut config = TransportConfig::default();
    config
        .stream_receive_window(VarInt::from_u32(STREAM_WINDOW))
        .receive_window(VarInt::from_u32(SESSION_WINDOW))
        .send_window(u64::from(SESSION_WINDOW))
        .datagram_receive_buffer_size(Some(DATAGRAM_BUFFER))
        .datagram_send_buffer_size(DATAGRAM_BUFFER)
        // Unidirectional streams carry UDP datagrams too large for a QUIC datagram.
        .max_concurrent_uni_streams(VarInt::from_u32(MAX_STREAMED));
    // BBR paces to the path's measured rate and does not take a random loss for congestion. A
    // home link loses packets that no queue dropped (Wi-Fi, a busy uplink): with 2% loss and a
    // 40 ms round trip, Cubic carried 2.5 Mbit/s where BBR carried 86 (`peers --lab`, bench/).
    // Its window is capped while a standing queue shows (see `congestion`).
    config.congestion_controller_factory(Arc::new(ShortQueueConfig::default()));
    config
}

/// The agent's side: it sends the keepalives and sets the idle timeout both sides use. It
/// accepts the relay's data streams.
pub fn agent(
    keepalive: Option<Duration>,
    idle_timeout: Duration,
) -> Result<TransportConfig, VarIntBoundsExceeded> {
    let mut config = common();
    config
        .keep_alive_interval(keepalive)
        .max_idle_timeout(Some(IdleTimeout::try_from(idle_timeout)?))
        .max_concurrent_bidi_streams(VarInt::from_u32(MAX_DATA_STREAMS));
    Ok(config)
}

/// The relay's side: no idle timeout of its own, so the agent's applies; the agent may open
/// its control stream and nothing else.
pub fn relay_transport() -> TransportConfig {
    let mut config = common();
    config
        .max_idle_timeout(None)
        .max_concurrent_bidi_streams(VarInt::from_u32(1));
    config
}

/// [`relay_transport`], shared.
pub fn relay() -> Arc<TransportConfig> {
    Arc::new(relay_transport())
}

/// The relay's endpoint. Its stateless reset key and the key that signs its connection IDs are
/// derived from its identity, so that a relay restarted after a crash recognises an agent's
/// next packet as one of its own connection IDs and answers it with a reset the agent believes:
/// the agent reconnects at once instead of waiting out its idle timeout.
pub fn relay_endpoint(identity: &Identity) -> EndpointConfig {
    let secret = identity.derive_secret("quic stateless reset");
    let reset_key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &secret);
    let mut config = EndpointConfig::new(Arc::new(reset_key));
    let secret = identity.derive_secret("quic connection id");
    let cid_key = u64::from_le_bytes(secret[..8].try_into().expect("8 of 32 bytes"));
    config.cid_generator(move || Box::new(HashedConnectionIdGenerator::from_key(cid_key)));
    config
}

/// The UDP socket a session runs on, bound to `address`, with kernel buffers of
/// [`SOCKET_BUFFER`] each way, or as much as the kernel allows, with a warning naming the
/// setting that caps them: once per process, as an agent makes a socket for each attempt.
pub fn udp_socket(address: SocketAddr) -> io::Result<UdpSocket> {
    static WARNED: AtomicBool = AtomicBool::new(false);
    let socket = Socket::new(
        Domain::for_address(address),
        Type::DGRAM,
        Some(Protocol::UDP),
    )?;
    socket.bind(&address.into())?;
    socket.set_recv_buffer_size(SOCKET_BUFFER)?;
    socket.set_send_buffer_size(SOCKET_BUFFER)?;
    for (way, got, sysctl) in [
        ("receive", socket.recv_buffer_size()?, "net.core.rmem_max"),
        ("send", socket.send_buffer_size()?, "net.core.wmem_max"),
    ] {
        if is_capped(got) && !WARNED.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                "the kernel caps the QUIC socket's {way} buffer at {} KiB of the {} KiB asked: \
                 bursts beyond it are lost and slow transfers down; raise {sysctl} to {} or more",
                got / 1024,
                SOCKET_BUFFER / 1024,
                SOCKET_BUFFER,
            );
        }
    }
    Ok(socket.into())
}

/// Whether a buffer the kernel reports as `got` bytes is smaller than [`SOCKET_BUFFER`]. Linux
/// reports twice what it grants, the other half being its own bookkeeping.
fn is_capped(got: usize) -> bool {
    got / 2 < SOCKET_BUFFER
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The kernel's limit on a socket's buffer that way, from its sysctl.
    fn kernel_max(sysctl: &str) -> usize {
        std::fs::read_to_string(format!("/proc/sys/net/core/{sysctl}"))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }

    #[test]
    fn the_quic_socket_gets_the_buffers_the_kernel_allows_and_knows_when_they_are_capped() {
        let socket = Socket::from(udp_socket("127.0.0.1:0".parse().unwrap()).unwrap());
        for (got, max) in [
            (socket.recv_buffer_size().unwrap(), kernel_max("rmem_max")),
            (socket.send_buffer_size().unwrap(), kernel_max("wmem_max")),
        ] {
            assert_eq!(got / 2, SOCKET_BUFFER.min(max));
            assert_eq!(is_capped(got), max < SOCKET_BUFFER);
        }
    }
}
