//! The delayer of `peers --lab`: holds each packet netfilter queues to it (`iptables -j
//! NFQUEUE`) for a fixed time, then lets it go on. One delay for every packet, so they leave in
//! the order they came, TCP and UDP alike.
//!
//!     lab-delay --delay-ms 20 [--queue 0] [--max-len 65536] [--rate-mbit 50 [--limit 1000]]
//!
//! With `--rate-mbit` it is also a bottleneck, as a home uplink is: packets go through at that
//! rate, one after the other, those that wait form a queue of at most `--limit` packets, and a
//! packet that finds the queue full is dropped (a tail-drop FIFO, as in most home routers). A
//! packet leaves once it went through and the delay passed. The delay is then the link's
//! propagation and the queue's wait comes on top, as bufferbloat does. Packets' lengths are read
//! from the first 4 bytes of their IPv4 header, the only bytes copied then.
//!
//! It speaks the kernel's netfilter queue protocol (nfnetlink_queue) itself, over a netlink
//! socket from socket2, with no unsafe code: only each packet's id is copied here, never its
//! bytes, and the packets due are let go with one batch verdict. The kernel queue holds
//! `--max-len` packets and the socket's receive buffer is as large as the system allows
//! (net.core.rmem_max), so that a burst at the rates the benchmark reaches is not dropped: the
//! netlink library crates' default buffer of ~200 KB lost a tenth of a 250 Mbit/s transfer.
//! What the kernel still could not queue is counted in `/proc/net/netfilter/nfnetlink_queue`
//! (queue_dropped, user_dropped), which `peers` reports.
//!
//! It prints `ready` once it holds the queue.

use std::collections::VecDeque;
use std::io::{ErrorKind, Read, Write};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use socket2::{Domain, Protocol, Socket, Type};

#[derive(Parser, Debug)]
#[command(about = "Holds every packet of a netfilter queue for a fixed time, in order")]
struct Args {
    /// The netfilter queue to serve (iptables -j NFQUEUE --queue-num).
    #[arg(long, default_value_t = 0)]
    queue: u16,
    /// How long each packet is held, in milliseconds.
    #[arg(long)]
    delay_ms: u64,
    /// Packets the kernel queue holds at most, those held here included: far more than are in
    /// flight at 1 Gbit/s over the delay (20 ms at 1,500 bytes a packet is about 1,700 a
    /// direction).
    #[arg(long, default_value_t = 65536)]
    max_len: u32,
    /// The bottleneck's rate, in Mbit/s: none by default.
    #[arg(long)]
    rate_mbit: Option<f64>,
    /// With --rate-mbit: packets that may wait for the bottleneck; one more is dropped.
    #[arg(long, default_value_t = 1000)]
    limit: usize,
}

// Linux's netlink and nfnetlink_queue constants (linux/netlink.h, linux/netfilter/*.h).
const AF_NETLINK: i32 = 16;
const NETLINK_NETFILTER: i32 = 12;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLMSG_ERROR: u16 = 2;
const NFNL_SUBSYS_QUEUE: u16 = 3;
const NFQNL_MSG_PACKET: u16 = 0;
const NFQNL_MSG_VERDICT: u16 = 1;
const NFQNL_MSG_CONFIG: u16 = 2;
const NFQNL_MSG_VERDICT_BATCH: u16 = 3;
const NFQA_PACKET_HDR: u16 = 1;
const NFQA_VERDICT_HDR: u16 = 2;
const NFQA_PAYLOAD: u16 = 10;
const NFQA_CFG_CMD: u16 = 1;
const NFQA_CFG_PARAMS: u16 = 2;
const NFQA_CFG_QUEUE_MAXLEN: u16 = 3;
const NFQNL_CFG_CMD_BIND: u8 = 1;
const NFQNL_COPY_META: u8 = 1;
const NFQNL_COPY_PACKET: u8 = 2;
/// Bytes of each packet copied with --rate-mbit: an IPv4 header's total length is in them.
const COPIED: u32 = 4;
const NF_DROP: u32 = 0;
const NF_ACCEPT: u32 = 1;
const ENOBUFS: i32 = 105;
/// The receive buffer asked for; Linux grants at most twice net.core.rmem_max.
const RECEIVE_BUFFER: usize = 64 << 20;
/// How often packets are looked for while some are held and none are due.
const POLL: Duration = Duration::from_micros(100);

fn main() -> Result<()> {
    let args = Args::parse();
    let delay = Duration::from_millis(args.delay_ms);
    let socket = open(&args)?;
    println!(
        "ready (receive buffer {} bytes)",
        socket.recv_buffer_size()?
    );
    std::io::stdout().flush()?;
    let mut held: VecDeque<(Instant, u32)> = VecDeque::new();
    let mut bottleneck = args.rate_mbit.map(|rate| Bottleneck::new(rate, args.limit));
    let mut buffer = vec![0u8; 65536];
    let mut blocking = true;
    loop {
        release(&socket, args.queue, &mut held)?;
        // Nothing held: wait for a packet. Some held: look for packets, and sleep a little
        // when there are none (a socket's read timeout counts in jiffies, too coarse here).
        if blocking != held.is_empty() {
            blocking = held.is_empty();
            socket.set_nonblocking(!blocking)?;
        }
        match (&socket).read(&mut buffer) {
            Ok(n) => {
                let Some((id, length)) = packet(&buffer[..n])? else {
                    continue;
                };
                let now = Instant::now();
                let through = match &mut bottleneck {
                    None => Some(now),
                    Some(bottleneck) => bottleneck.enter(now, length),
                };
                match through {
                    Some(through) => held.push_back((through + delay, id)),
                    None => drop_packet(&socket, args.queue, id)?,
                }
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                if let Some((due, _)) = held.front() {
                    std::thread::sleep(due.saturating_duration_since(Instant::now()).min(POLL));
                }
            }
            // The kernel could not hand some packets over; it counts them (user_dropped).
            Err(e) if e.raw_os_error() == Some(ENOBUFS) => {}
            Err(e) => return Err(e).context("receiving from the netfilter queue"),
        }
    }
}

/// A netlink socket bound to the queue, with a long queue and only packets' metadata copied.
fn open(args: &Args) -> Result<Socket> {
    let socket = Socket::new(
        Domain::from(AF_NETLINK),
        Type::RAW,
        Some(Protocol::from(NETLINK_NETFILTER)),
    )
    .context("opening a netfilter netlink socket (root?)")?;
    socket.set_recv_buffer_size(RECEIVE_BUFFER)?;
    // Sent without an address, to the kernel; the socket binds itself on the first send.
    let params = match args.rate_mbit {
        None => [0u32.to_be_bytes().to_vec(), vec![NFQNL_COPY_META]].concat(),
        Some(_) => [COPIED.to_be_bytes().to_vec(), vec![NFQNL_COPY_PACKET]].concat(),
    };
    let config = message(
        NFQNL_MSG_CONFIG,
        NLM_F_REQUEST | NLM_F_ACK,
        args.queue,
        &[
            (NFQA_CFG_CMD, &[NFQNL_CFG_CMD_BIND, 0, 0, 0]),
            (NFQA_CFG_PARAMS, &params),
            (NFQA_CFG_QUEUE_MAXLEN, &args.max_len.to_be_bytes()),
        ],
    );
    socket.send(&config).context("configuring the queue")?;
    let mut answer = [0u8; 1024];
    let n = (&socket).read(&mut answer)?;
    match acknowledgement(&answer[..n]) {
        Some(0) => Ok(socket),
        Some(error) => bail!(
            "binding netfilter queue {}: {}",
            args.queue,
            std::io::Error::from_raw_os_error(-error)
        ),
        None => bail!("binding netfilter queue {}: no answer", args.queue),
    }
}

/// Lets every packet that is due go on, with one verdict for all of them: the kernel accepts
/// each queued packet whose id is at most the last one's, and ids grow in arrival order.
fn release(socket: &Socket, queue: u16, held: &mut VecDeque<(Instant, u32)>) -> Result<()> {
    let now = Instant::now();
    let mut last = None;
    while let Some(&(due, id)) = held.front() {
        if due > now {
            break;
        }
        last = Some(id);
        held.pop_front();
    }
    if let Some(id) = last {
        let batch = verdict(NFQNL_MSG_VERDICT_BATCH, queue, NF_ACCEPT, id);
        socket.send(&batch).context("letting packets go")?;
    }
    Ok(())
}

/// Drops the queued packet `id` (the bottleneck's queue is full).
fn drop_packet(socket: &Socket, queue: u16, id: u32) -> Result<()> {
    let message = verdict(NFQNL_MSG_VERDICT, queue, NF_DROP, id);
    socket.send(&message).context("dropping a packet")?;
    Ok(())
}

/// A verdict message: `kind` says whether for the packet `id` alone or for every one up to it.
fn verdict(kind: u16, queue: u16, verdict: u32, id: u32) -> Vec<u8> {
    let mut header = verdict.to_be_bytes().to_vec();
    header.extend(id.to_be_bytes());
    message(kind, NLM_F_REQUEST, queue, &[(NFQA_VERDICT_HDR, &header)])
}

/// A link of a fixed rate with a first-in, first-out queue in front, which drops what arrives
/// when it is full.
struct Bottleneck {
    /// Seconds per byte.
    per_byte: f64,
    limit: usize,
    /// When each packet in the queue, the one going through included, is through.
    queue: VecDeque<Instant>,
}

impl Bottleneck {
    fn new(rate_mbit: f64, limit: usize) -> Self {
        Self {
            per_byte: 8.0 / (rate_mbit * 1e6),
            limit,
            queue: VecDeque::new(),
        }
    }

    /// A packet of `length` bytes arrives at `now`: when it is through, or none if it is dropped.
    fn enter(&mut self, now: Instant, length: usize) -> Option<Instant> {
        while self.queue.front().is_some_and(|&through| through <= now) {
            self.queue.pop_front();
        }
        // The one going through is not waiting.
        if self.queue.len() > self.limit {
            return None;
        }
        let start = self.queue.back().copied().unwrap_or(now).max(now);
        let through = start + Duration::from_secs_f64(length as f64 * self.per_byte);
        self.queue.push_back(through);
        Some(through)
    }
}

/// A netlink message to nfnetlink_queue: header, nfgenmsg, attributes.
fn message(kind: u16, flags: u16, queue: u16, attributes: &[(u16, &[u8])]) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    out.extend(0u32.to_ne_bytes()); // length, below
    out.extend(((NFNL_SUBSYS_QUEUE << 8) | kind).to_ne_bytes());
    out.extend(flags.to_ne_bytes());
    out.extend(0u32.to_ne_bytes()); // sequence
    out.extend(0u32.to_ne_bytes()); // port id: the kernel fills it in
    out.extend([0u8, 0u8]); // AF_UNSPEC, NFNETLINK_V0
    out.extend(queue.to_be_bytes());
    for (kind, payload) in attributes {
        let length = 4 + payload.len();
        out.extend((length as u16).to_ne_bytes());
        out.extend(kind.to_ne_bytes());
        out.extend(*payload);
        out.resize(out.len().next_multiple_of(4), 0);
    }
    let length = out.len() as u32;
    out[..4].copy_from_slice(&length.to_ne_bytes());
    out
}

/// The id and length of the queued packet `datagram` tells of (the length is 0 unless its IP
/// header was copied); none if it is some other message.
fn packet(datagram: &[u8]) -> Result<Option<(u32, usize)>> {
    let kind = u16::from_ne_bytes(field(datagram, 4)?);
    if kind != (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET {
        return Ok(None);
    }
    let length = (u32::from_ne_bytes(field(datagram, 0)?) as usize).min(datagram.len());
    let (mut id, mut bytes) = (None, 0);
    // Attributes follow the 16-byte header and the 4-byte nfgenmsg.
    let mut at = 20;
    while at + 4 <= length {
        let size = u16::from_ne_bytes(field(datagram, at)?) as usize;
        // The top bits are flags (nested, network byte order).
        let kind = u16::from_ne_bytes(field(datagram, at + 2)?) & 0x3fff;
        if size < 4 {
            bail!("a malformed attribute in a queued packet's message");
        }
        match kind {
            NFQA_PACKET_HDR => id = Some(u32::from_be_bytes(field(datagram, at + 4)?)),
            NFQA_PAYLOAD => bytes = ip_length(field(datagram, at + 4)?),
            _ => {}
        }
        at += size.next_multiple_of(4);
    }
    match id {
        Some(id) => Ok(Some((id, bytes))),
        None => bail!("a queued packet's message without its id"),
    }
}

/// A packet's length from the first 4 bytes of its IPv4 header (the lab is IPv4 only).
fn ip_length(header: [u8; 4]) -> usize {
    usize::from(u16::from_be_bytes([header[2], header[3]]))
}

/// The error code of a netlink acknowledgement (0: success); none if it is not one.
fn acknowledgement(datagram: &[u8]) -> Option<i32> {
    let kind = u16::from_ne_bytes(field(datagram, 4).ok()?);
    (kind == NLMSG_ERROR).then(|| field(datagram, 16).ok().map(i32::from_ne_bytes))?
}

/// `N` bytes of `datagram` from `at`.
fn field<const N: usize>(datagram: &[u8], at: usize) -> Result<[u8; N]> {
    datagram
        .get(at..at + N)
        .and_then(|bytes| bytes.try_into().ok())
        .context("a short netlink message")
}
