//! The TCP path to the relay, for agents that UDP does not reach: QUIC packets carried over
//! TLS 1.3 on one TCP connection, the carrier.
//!
//! A carrier is the socket of a quinn endpoint of its own ([`CarrierSocket`]): a session over
//! TCP is an ordinary QUIC session, with everything the UDP path has (data streams, datagrams,
//! keepalives, resume) from the same code. Moving between the paths is a new session on the
//! other one, which takes over the agent's ports and resumes its held connections (see
//! [`crate::carry::resume`]), as a reconnect does.
//!
//! Why an endpoint per carrier, rather than one endpoint for both paths and QUIC's migration
//! to move a session between them: an endpoint has one socket, and that socket's writability is
//! one for all of the endpoint's sessions. On the relay a carrier that falls behind could then
//! be kept in bounds only by dropping its packets; with an endpoint of its own, a carrier whose
//! TCP connection is full holds back its own session's sender and no one else's: backpressure,
//! not drops.
//!
//! On the wire, after TLS (mutual, with the pinned keys, ALPN [`tls::ALPN_TCP`]): each QUIC
//! packet as its length (2 bytes, big-endian) and its bytes. TCP delivers every packet, in
//! order, so QUIC's loss recovery has nothing to do, and its congestion control sees TCP's
//! queue as delay. Packets are larger than on UDP ([`MTU`]): fewer packets to encrypt, frame
//! and account for per byte carried.
//!
//! What it costs, measured on loopback against tether over QUIC and rathole (Noise, over TCP)
//! (`bench/run` at 68f9eb3, bench/RESULTS.md, 2 cores, medians of 3 runs): one stream 4,686
//! Mbit/s, 1.28x QUIC's and 1.55x rathole's; four streams 4,928 Mbit/s; added request/response
//! p50 152 us (QUIC 170); an idle visitor connection 6.71 KiB (QUIC 6.64); the relay at rest
//! with one agent on TCP 8,232 KiB (on QUIC 8,024). (The run before, at 6991ad5, had one
//! stream at 5,797 Mbit/s; that build and this one side by side on the same day, three rounds
//! of `peers --systems tether,tether-tcp --runs 1 --seconds 5` each, carried 4,923, 4,582 and
//! 4,941 against 3,920, 4,638 and 4,844: the day's machine, within the rounds' spread.) Over the
//! lossy lab (20 ms and 2% loss each way): one stream 211.8 Mbit/s, where QUIC carried 504.9
//! and rathole 170.1 (1.25x; before `SEND_BUFFER`, 156.6 against 182.5); beside a bulk
//! transfer, a request waited 155.4 ms (p50), where QUIC's waited 47.8 and rathole's 41.4.
//! Every stream shares the one TCP connection there, and so waits out each of its losses;
//! rathole gives each visitor connection a TCP connection of its own. With a 1 MiB stream
//! window instead of 8, this path carried 50.8 (one run). QUIC's own congestion control is
//! left out on a carrier (`LeftToTcp`, with its side-by-side figures).
//!
//! [`tls::ALPN_TCP`]: crate::trust::tls::ALPN_TCP

use std::collections::VecDeque;
use std::future::poll_fn;
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, EndpointConfig, TransportConfig, UdpPoller};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::transport::socket;

/// The largest QUIC packet on a carrier, and the one size every packet may have: a carrier
/// never loses a packet for being too large, so no path MTU is searched for.
pub const MTU: u16 = 16 * 1024;

/// Bytes queued for the TCP connection at most: past this, the session's sender waits.
const OUTBOUND_BYTES: usize = 256 * 1024;

/// Bytes handed to TLS at once at most.
const WRITE_BATCH: usize = 64 * 1024;

/// Packets read from TCP and not yet taken by quinn, at most: past this, reading waits.
const INBOUND_PACKETS: usize = 64;

/// Packets handed to quinn per receive at most. Each is copied into a buffer of its own, so
/// this bounds how much of the endpoint's receive buffer is ever touched.
const RECV_BATCH: usize = 8;

/// Bytes the kernel holds for a carrier's TCP connection beyond what it has in flight, at most
/// (`TCP_NOTSENT_LOWAT`): the rest waits in the carrier's own queue, where a keystroke's packet
/// is not behind megabytes of bulk data already handed to the kernel.
///
/// Over the lossy lab (20 ms and 2% loss each way), three rounds of 15 s, each with and without
/// it and rathole (Noise) side by side (`peers --lab --runs 1 --seconds 15`): one stream 160.8,
/// 186.5 and 175.6 Mbit/s, where without it 132.1, 120.4 and 139.4, and rathole 194.5, 170.4
/// and 191.5 (medians: 175.6, 132.1, 191.5); a request beside a bulk transfer waited 126.0,
/// 130.7 and 122.5 ms (p50), without it 160.2, 164.6 and 155.1; the bulk transfer beside it
/// carried 167.3, 163.4 and 128.9 Mbit/s, without it 176.3, 185.2 and 196.6. In runs as long
/// as the bench's (`peers --lab --runs 3 --seconds 30`, medians) the gain in one stream did
/// not hold: 161.5 against rathole's 188.6 (0.86x, as without it in bench/RESULTS.md then); a
/// request beside a bulk transfer waited 132.9 ms (p50; 159.3 there), rathole's 41.0.
const KERNEL_UNSENT: u32 = 128 * 1024;

/// The send buffer asked for a carrier's TCP connection, when asking gives more than the
/// kernel's own tuning would ([`send_buffer`]).
///
/// Over a lossy link the kernel keeps in its send buffer every byte in flight until the holes
/// before it are filled, a round trip and more after it was sent: with 2% loss and a 40 ms
/// round trip, its own tuning's ceiling (`net.ipv4.tcp_wmem`'s largest, 4 MiB by default) held
/// the carrier back for 6.3 s of a 20 s transfer (`ss -ti`'s sndbuf_limited; rathole's
/// connection, whose unsent bytes are not kept short, 4.1 s). Linux grants
/// twice what is asked, here 8 MiB, and only while bytes are in flight: the unsent part stays
/// [`KERNEL_UNSENT`]. Over the lossy lab, three rounds of 30 s, alternating, each with rathole
/// (Noise) (`peers --lab --runs 1 --seconds 30`): one stream 223.9, 213.9 and 204.5 Mbit/s,
/// where without it 148.3, 165.9 and 142.0, and rathole 182.7, 182.8 and 191.9 (medians 213.9,
/// 148.3, 182.8); the bulk transfer beside the probe 226.3, 258.4 and 249.1 (without it 151.1,
/// 163.8, 164.2; rathole 182.1, 177.8, 184.4); a request beside it waited a little longer
/// (p50 135.9, 140.3, 150.5 ms; without it 126.7, 121.1, 129.0; rathole 40.9, 41.1, 41.4).
const SEND_BUFFER: usize = 4 * 1024 * 1024;

/// What to ask for as a carrier's send buffer, if anything: [`SEND_BUFFER`], or as much of it
/// as `net.core.wmem_max` (`wmem_max`) allows, when the kernel would grant more than its own
/// tuning reaches (`tcp_wmem_max`). Asking turns that tuning off, so where `wmem_max` is the
/// kernel's default (208 KiB) nothing is asked: the README's setting for the QUIC socket
/// (4 MiB) is what lets a carrier's buffer grow.
fn send_buffer(wmem_max: usize, tcp_wmem_max: usize) -> Option<usize> {
    let asked = SEND_BUFFER.min(wmem_max);
    (asked.saturating_mul(2) > tcp_wmem_max).then_some(asked)
}

/// [`send_buffer`] under this process's kernel settings, read once.
fn send_buffer_here() -> Option<usize> {
    static ASKED: std::sync::OnceLock<Option<usize>> = std::sync::OnceLock::new();
    *ASKED.get_or_init(|| {
        let read = |file: &str| std::fs::read_to_string(format!("/proc/sys/net/{file}")).ok();
        let wmem_max = read("core/wmem_max")?.trim().parse().ok()?;
        let tcp_wmem = read("ipv4/tcp_wmem")?;
        let tcp_wmem_max = tcp_wmem.split_whitespace().nth(2)?.parse().ok()?;
        send_buffer(wmem_max, tcp_wmem_max)
    })
}

/// Sets up a carrier's TCP connection, on either end: no Nagle delay (QUIC packets go as they
/// are written), a short unsent queue in the kernel (`KERNEL_UNSENT`), and room for what a
/// lossy link keeps in flight (`SEND_BUFFER`).
pub fn tune(tcp: &tokio::net::TcpStream) {
    let _ = tcp.set_nodelay(true);
    let socket = socket2::SockRef::from(tcp);
    let _ = socket.set_tcp_notsent_lowat(KERNEL_UNSENT);
    if let Some(size) = send_buffer_here() {
        let _ = socket.set_send_buffer_size(size);
    }
}

/// How long a carrier whose session ended still writes what it queued (the session's
/// goodbye) before it closes.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// A quinn endpoint whose one socket is `carrier`, with `config`'s keys (the relay's are its
/// identity's) and the carrier's packet size.
pub fn endpoint(
    mut config: EndpointConfig,
    server: Option<quinn::ServerConfig>,
    carrier: Arc<CarrierSocket>,
) -> io::Result<quinn::Endpoint> {
    config
        .max_udp_payload_size(MTU)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    quinn::Endpoint::new_with_abstract_socket(config, server, carrier, Arc::new(socket::Runtime))
}

/// `config` as a session over a carrier uses it: packets of [`MTU`] bytes from the first.
pub fn transport(mut config: TransportConfig) -> TransportConfig {
    config
        .initial_mtu(MTU)
        .min_mtu(MTU)
        .mtu_discovery_config(None)
        .congestion_controller_factory(Arc::new(LeftToTcp));
    config
}

/// The congestion control of a session over a carrier: none of QUIC's own. TCP under it already
/// controls congestion on the link, and the carrier's full queue holds the sender back; a
/// second controller on top would only estimate the path again from round trips that swing
/// with TCP's retransmissions. The window is a bound the session's own send window (see
/// [`crate::transport::quic`]) keeps anyway.
///
/// Measured over the lossy lab (20 ms and 2% loss each way), two runs of 15 s each, side by
/// side: one stream 182.4 and 190.2 Mbit/s, where quinn's BBR on top carried 183.1 and 165.8
/// and rathole (Noise) 182.7 and 194.7; a request beside a bulk transfer p99 366.8 and 323.6
/// ms, with BBR 397.8 and 488.7. On loopback, two runs of 5 s each, side by side: one stream
/// 6,312 and 6,350 Mbit/s (with BBR 4,891 and 5,956), 1.99 and 2.01 CPU seconds per GB (2.49
/// and 2.07), added request/response p50 133 and 112 us (204 and 170).
#[derive(Debug, Clone, Copy)]
struct LeftToTcp;

/// Bytes in flight a session over a carrier may have: more than its send window, so that only
/// flow control and the carrier's queue hold it back.
const CARRIED_WINDOW: u64 = 32 * 1024 * 1024;

impl quinn::congestion::ControllerFactory for LeftToTcp {
    fn build(
        self: Arc<Self>,
        _now: std::time::Instant,
        _mtu: u16,
    ) -> Box<dyn quinn::congestion::Controller> {
        Box::new(LeftToTcp)
    }
}

impl quinn::congestion::Controller for LeftToTcp {
    fn on_congestion_event(
        &mut self,
        _now: std::time::Instant,
        _sent: std::time::Instant,
        _persistent: bool,
        _lost_bytes: u64,
    ) {
    }

    fn on_mtu_update(&mut self, _mtu: u16) {}

    fn window(&self) -> u64 {
        CARRIED_WINDOW
    }

    fn clone_box(&self) -> Box<dyn quinn::congestion::Controller> {
        Box::new(LeftToTcp)
    }

    fn initial_window(&self) -> u64 {
        CARRIED_WINDOW
    }

    fn into_any(self: Box<Self>) -> Box<dyn std::any::Any> {
        self
    }
}

/// A TCP connection (after TLS) as the UDP socket of one quinn endpoint.
pub struct CarrierSocket {
    local: SocketAddr,
    peer: SocketAddr,
    inbound: Mutex<mpsc::Receiver<Bytes>>,
    outbound: Arc<Outbound>,
    broken: CancellationToken,
    /// What ended the connection, if it failed rather than closed.
    failure: Arc<Mutex<Option<io::Error>>>,
}

impl std::fmt::Debug for CarrierSocket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CarrierSocket")
            .field("local", &self.local)
            .field("peer", &self.peer)
            .finish_non_exhaustive()
    }
}

/// The packets waiting for the TCP connection, shared by the socket and its writer.
#[derive(Default)]
struct Outbound {
    queue: Mutex<Queue>,
}

#[derive(Default)]
struct Queue {
    packets: VecDeque<Bytes>,
    bytes: usize,
    /// The writer stopped (the connection failed): packets go nowhere.
    stopped: bool,
    /// The socket is gone: the writer writes what is queued and closes.
    closing: bool,
    writer: Option<Waker>,
    /// quinn's tasks waiting for room.
    senders: Vec<Waker>,
}

impl Outbound {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Queue {
    fn has_room(&self) -> bool {
        self.stopped || self.bytes < OUTBOUND_BYTES
    }

    fn wake_senders(&mut self) {
        for waker in self.senders.drain(..) {
            waker.wake();
        }
    }
}

impl CarrierSocket {
    /// Carries packets over `stream`, a TLS connection between `local` and `peer`, from a task
    /// of its own that ends when the connection does, or soon after the socket is dropped.
    pub fn new<S>(stream: S, local: SocketAddr, peer: SocketAddr) -> Arc<Self>
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (to_quinn, inbound) = mpsc::channel(INBOUND_PACKETS);
        let outbound = Arc::new(Outbound::default());
        let broken = CancellationToken::new();
        let failure = Arc::new(Mutex::new(None));
        let carry = {
            let (outbound, broken, failure) = (outbound.clone(), broken.clone(), failure.clone());
            async move {
                let (reader, writer) = tokio::io::split(stream);
                let ended = tokio::select! {
                    ended = read_packets(reader, to_quinn) => ended,
                    ended = write_packets(writer, &outbound) => ended,
                };
                if let Err(error) = ended {
                    tracing::debug!(%peer, %error, "carrier failed");
                    *failure.lock().unwrap_or_else(|e| e.into_inner()) = Some(error);
                }
                let mut queue = outbound.lock();
                queue.stopped = true;
                queue.packets.clear();
                queue.bytes = 0;
                queue.wake_senders();
                drop(queue);
                broken.cancel();
            }
        };
        tokio::spawn(carry);
        Arc::new(Self {
            local,
            peer,
            inbound: Mutex::new(inbound),
            outbound,
            broken,
            failure,
        })
    }

    /// What ended the TCP connection, if it failed: once, to whoever asks first. A relay that
    /// refuses the agent's key says so here, in a TLS alert, after the agent's handshake is
    /// done.
    pub fn take_failure(&self) -> Option<io::Error> {
        self.failure
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }

    /// The address of the peer at the other end of the TCP connection.
    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    /// Completes once the TCP connection has ended or failed: the session on it is lost.
    pub fn broken(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        self.broken.clone().cancelled_owned()
    }
}

impl Drop for CarrierSocket {
    fn drop(&mut self) {
        let mut queue = self.outbound.lock();
        queue.closing = true;
        if let Some(writer) = queue.writer.take() {
            writer.wake();
        }
    }
}

impl AsyncUdpSocket for CarrierSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        Box::pin(Room(self.outbound.clone()))
    }

    fn try_send(&self, transmit: &Transmit<'_>) -> io::Result<()> {
        let mut queue = self.outbound.lock();
        if queue.stopped {
            // Gone, as a datagram into a dead link: the session learns it from `broken`.
            return Ok(());
        }
        if !queue.has_room() {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let contents = transmit.contents;
        let size = transmit.segment_size.unwrap_or(contents.len()).max(1);
        for packet in contents.chunks(size) {
            if packet.len() > usize::from(MTU) {
                // Larger than any packet this endpoint makes: dropped, as a link would.
                continue;
            }
            queue.bytes += packet.len();
            queue.packets.push_back(Bytes::copy_from_slice(packet));
        }
        if let Some(writer) = queue.writer.take() {
            writer.wake();
        }
        Ok(())
    }

    fn poll_recv(
        &self,
        cx: &mut Context<'_>,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        let mut inbound = self.inbound.lock().unwrap_or_else(|e| e.into_inner());
        let room = bufs.len().min(meta.len()).min(RECV_BATCH);
        let mut n = 0;
        while n < room {
            // Pending registers the waker; a closed carrier stays pending: its session is
            // told through `broken`.
            let Poll::Ready(Some(packet)) = inbound.poll_recv(cx) else {
                break;
            };
            let len = packet.len().min(bufs[n].len());
            bufs[n][..len].copy_from_slice(&packet[..len]);
            meta[n] = RecvMeta {
                addr: self.peer,
                len,
                stride: len,
                ecn: None,
                dst_ip: None,
            };
            n += 1;
        }
        match n {
            0 => Poll::Pending,
            n => Poll::Ready(Ok(n)),
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.local)
    }

    fn may_fragment(&self) -> bool {
        false
    }

    fn max_transmit_segments(&self) -> usize {
        1
    }

    fn max_receive_segments(&self) -> usize {
        1
    }
}

/// Waits, for one of quinn's tasks, until the carrier has room for more packets.
struct Room(Arc<Outbound>);

impl std::fmt::Debug for Room {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Room").finish_non_exhaustive()
    }
}

impl UdpPoller for Room {
    fn poll_writable(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut queue = self.0.lock();
        if queue.has_room() {
            return Poll::Ready(Ok(()));
        }
        if !queue.senders.iter().any(|w| w.will_wake(cx.waker())) {
            queue.senders.push(cx.waker().clone());
        }
        Poll::Pending
    }
}

/// Reads framed packets from the connection into `to_quinn` until the connection ends.
async fn read_packets<R: AsyncRead + Unpin>(
    mut tcp: R,
    to_quinn: mpsc::Sender<Bytes>,
) -> io::Result<()> {
    loop {
        let len = match tcp.read_u16().await {
            Ok(len) => len,
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        };
        if len == 0 || len > MTU {
            let why = format!("a packet of {len} bytes (at most {MTU})");
            return Err(io::Error::new(io::ErrorKind::InvalidData, why));
        }
        let mut packet = BytesMut::zeroed(usize::from(len));
        tcp.read_exact(&mut packet).await?;
        if to_quinn.send(packet.freeze()).await.is_err() {
            return Ok(());
        }
    }
}

/// Writes the queued packets, framed, to the connection; once the socket is gone, what is
/// still queued within [`CLOSE_GRACE`], and then closes the connection.
async fn write_packets<W: AsyncWrite + Unpin>(mut tcp: W, outbound: &Outbound) -> io::Result<()> {
    let mut frames = Vec::with_capacity(WRITE_BATCH + 2 + usize::from(MTU));
    loop {
        let closing = poll_fn(|cx| {
            let mut queue = outbound.lock();
            while frames.len() < WRITE_BATCH {
                let Some(packet) = queue.packets.pop_front() else {
                    break;
                };
                queue.bytes -= packet.len();
                let len = u16::try_from(packet.len()).expect("packets are at most MTU bytes");
                frames.extend_from_slice(&len.to_be_bytes());
                frames.extend_from_slice(&packet);
            }
            if !frames.is_empty() {
                queue.wake_senders();
                return Poll::Ready(false);
            }
            if queue.closing {
                return Poll::Ready(true);
            }
            queue.writer = Some(cx.waker().clone());
            Poll::Pending
        })
        .await;
        if closing {
            let _ = tokio::time::timeout(CLOSE_GRACE, tcp.shutdown()).await;
            return Ok(());
        }
        let write = async {
            tcp.write_all(&frames).await?;
            tcp.flush().await
        };
        if outbound.lock().closing {
            tokio::time::timeout(CLOSE_GRACE, write)
                .await
                .map_err(|_| io::Error::from(io::ErrorKind::TimedOut))??;
        } else {
            write.await?;
        }
        frames.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WAIT: Duration = Duration::from_secs(5);

    fn transmit(contents: &[u8]) -> Transmit<'_> {
        Transmit {
            destination: "127.0.0.1:1".parse().unwrap(),
            ecn: None,
            contents,
            segment_size: None,
            src_ip: None,
        }
    }

    async fn receive(socket: &CarrierSocket) -> Vec<Vec<u8>> {
        let mut storage = vec![[0u8; MTU as usize]; 4];
        let mut bufs: Vec<IoSliceMut<'_>> =
            storage.iter_mut().map(|b| IoSliceMut::new(b)).collect();
        let mut meta = [RecvMeta::default(); 4];
        let n = tokio::time::timeout(
            WAIT,
            poll_fn(|cx| socket.poll_recv(cx, &mut bufs, &mut meta)),
        )
        .await
        .expect("packets arrive")
        .unwrap();
        (0..n)
            .map(|i| {
                assert_eq!(meta[i].addr, socket.peer);
                bufs[i][..meta[i].len].to_vec()
            })
            .collect()
    }

    #[test]
    fn the_send_buffer_is_asked_for_only_where_it_grows_past_the_kernels_own_tuning() {
        const MIB: usize = 1024 * 1024;
        // The kernel's defaults: asking would cap the buffer at 416 KiB.
        assert_eq!(send_buffer(212_992, 4 * MIB), None);
        // The README's setting: 8 MiB granted, past the tuning's 4 MiB.
        assert_eq!(send_buffer(4 * MIB, 4 * MIB), Some(SEND_BUFFER));
        assert_eq!(send_buffer(64 * MIB, 4 * MIB), Some(SEND_BUFFER));
        assert_eq!(send_buffer(3 * MIB, 4 * MIB), Some(3 * MIB));
        // A tuning that already reaches further is left alone.
        assert_eq!(send_buffer(4 * MIB, 8 * MIB), None);
        assert_eq!(send_buffer(2 * MIB, 4 * MIB), None);
        assert_eq!(send_buffer(usize::MAX, usize::MAX), None);
    }

    #[tokio::test]
    async fn a_tuned_connection_has_a_short_unsent_queue_and_the_send_buffer_decided() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let (tcp, _) = tokio::join!(tokio::net::TcpStream::connect(address), listener.accept());
        let tcp = tcp.unwrap();
        let before = socket2::SockRef::from(&tcp).send_buffer_size().unwrap();
        tune(&tcp);
        let socket = socket2::SockRef::from(&tcp);
        assert!(socket.tcp_nodelay().unwrap());
        assert_eq!(socket.tcp_notsent_lowat().unwrap(), KERNEL_UNSENT);
        let after = socket.send_buffer_size().unwrap();
        match send_buffer_here() {
            Some(asked) => assert_eq!(after, 2 * asked, "Linux grants twice what is asked"),
            None => assert_eq!(after, before, "the kernel's own tuning is kept"),
        }
        eprintln!("send buffer on this machine: {before} bytes untuned, {after} tuned");
    }

    fn pair() -> (Arc<CarrierSocket>, Arc<CarrierSocket>) {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let (one, two): (SocketAddr, SocketAddr) = (
            "127.0.0.1:1001".parse().unwrap(),
            "127.0.0.1:1002".parse().unwrap(),
        );
        (
            CarrierSocket::new(a, one, two),
            CarrierSocket::new(b, two, one),
        )
    }

    #[tokio::test]
    async fn packets_cross_whole_and_in_order_with_their_peer_as_source() {
        let (a, b) = pair();
        a.try_send(&transmit(&[1; 1200])).unwrap();
        a.try_send(&transmit(&[2; MTU as usize])).unwrap();
        let mut got = Vec::new();
        while got.len() < 2 {
            got.extend(receive(&b).await);
        }
        assert_eq!(got, [vec![1; 1200], vec![2; MTU as usize]]);
    }

    #[tokio::test]
    async fn segments_of_one_transmit_become_packets_of_their_own() {
        let (a, b) = pair();
        let contents: Vec<u8> = [[7u8; 100], [8u8; 100], [9u8; 100]].concat();
        let mut segmented = transmit(&contents[..250]);
        segmented.segment_size = Some(100);
        a.try_send(&segmented).unwrap();
        let mut got = Vec::new();
        while got.len() < 3 {
            got.extend(receive(&b).await);
        }
        assert_eq!(got, [vec![7; 100], vec![8; 100], vec![9; 50]]);
    }

    #[tokio::test]
    async fn a_full_carrier_turns_senders_away_until_its_writer_makes_room() {
        // Nobody reads the other end: the duplex pipe fills, then the queue.
        let (a, _b) = pair();
        let mut poller = a.clone().create_io_poller();
        let packet = [0u8; 8 * 1024];
        let mut sent = 0;
        while a.try_send(&transmit(&packet)).is_ok() {
            sent += packet.len();
            assert!(sent < 4 * OUTBOUND_BYTES, "the queue is bounded");
            tokio::task::yield_now().await;
        }
        let error = a.try_send(&transmit(&packet)).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::WouldBlock);
        let writable = poll_fn(|cx| poller.as_mut().poll_writable(cx));
        let still_full = tokio::time::timeout(Duration::from_millis(50), writable).await;
        assert!(still_full.is_err(), "no room while nothing drains");
    }

    #[tokio::test]
    async fn a_reader_of_the_full_end_gives_the_senders_room_again() {
        let (a, b) = pair();
        let mut poller = a.clone().create_io_poller();
        let packet = [5u8; 8 * 1024];
        let mut sent = 0usize;
        while a.try_send(&transmit(&packet)).is_ok() {
            sent += 1;
            tokio::task::yield_now().await;
        }
        let mut received = 0usize;
        let drain = async {
            while received < sent {
                received += receive(&b).await.len();
            }
        };
        let writable = poll_fn(|cx| poller.as_mut().poll_writable(cx));
        let (room, ()) = tokio::time::timeout(WAIT, async { tokio::join!(writable, drain) })
            .await
            .expect("reading makes room");
        room.unwrap();
    }

    #[tokio::test]
    async fn a_connection_that_ends_breaks_the_carrier_and_senders_are_not_left_waiting() {
        let (a, b) = pair();
        drop(b);
        tokio::time::timeout(WAIT, a.broken())
            .await
            .expect("the carrier sees its connection end");
        // Sending into a broken carrier neither fails nor waits.
        a.try_send(&transmit(&[1; 100])).unwrap();
        let mut poller = a.clone().create_io_poller();
        let writable = poll_fn(|cx| poller.as_mut().poll_writable(cx));
        tokio::time::timeout(WAIT, writable).await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn a_frame_longer_than_the_mtu_breaks_the_carrier() {
        let (mut raw, carried) = tokio::io::duplex(64 * 1024);
        let peer: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let socket = CarrierSocket::new(carried, peer, peer);
        raw.write_all(&(MTU + 1).to_be_bytes()).await.unwrap();
        tokio::time::timeout(WAIT, socket.broken())
            .await
            .expect("a frame too long ends the carrier");
    }

    #[tokio::test]
    async fn a_dropped_socket_still_sends_what_it_queued_and_closes() {
        let (mut raw, carried) = tokio::io::duplex(64 * 1024);
        let peer: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let socket = CarrierSocket::new(carried, peer, peer);
        socket.try_send(&transmit(&[3; 10])).unwrap();
        drop(socket);
        let mut got = Vec::new();
        tokio::time::timeout(WAIT, raw.read_to_end(&mut got))
            .await
            .expect("the carrier closes")
            .unwrap();
        assert_eq!(got, [&[0, 10][..], &[3; 10]].concat());
    }
}
