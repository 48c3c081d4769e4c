//! The one TCP copy loop, used by the relay for visitors and by the agent for local services:
//! a TCP connection spliced to a QUIC data stream, both directions at once, held across a lost
//! session until a new one resumes it (see [`crate::carry::resume`]).
//!
//! - Half-close: EOF from TCP finishes the stream, the end of the stream shuts down TCP's
//!   write side; the other direction goes on until it ends too.
//! - A failure on one side is passed on as a failure, not a clean end: a TCP error resets the
//!   stream, a reset stream resets the TCP connection (RST), so neither end mistakes a broken
//!   connection for a complete one. A connection held past the resume window is reset too.
//! - A lost session is no failure: the TCP connection is held, nothing more is read from it,
//!   and when the stream is resumed each side sends what the other did not receive.
//! - A connection revoked (its visitor is no longer admitted) is reset at once, wherever it is.
//! - A shutdown is no failure either: when this process stops, or the peer closes the session
//!   because it stops, the TCP connection ends with a FIN, as any server that is stopped closes
//!   its connections.
//! - A hand-over leaves the TCP connection as it is: when the relay restarts and its next
//!   process takes the connection over, the splice stops where it is, touches neither the
//!   connection nor the stream, and hands the connection back to its caller; the held stream
//!   says exactly what was read and written.
//! - The bytes are counted as they go, into the forward's [`Meter`], so that status and metrics
//!   see a long transfer move; bytes sent again on a resumed stream are not counted twice.
//! - Memory is bounded: a stream keeps at most its cap of bytes the peer has not confirmed, one
//!   chunk is read at a time, and QUIC flow control pushes back on the sender when the TCP
//!   reader is slow. No buffer is held while a connection is idle and confirmed.
//! - What the stream has received is written to TCP with one system call, not one per QUIC
//!   packet: on a fast link the per-packet writes were most of the receiving side's work.

use std::future::{poll_fn, Future};
use std::io::{self, IoSlice};
use std::mem::MaybeUninit;
use std::net::Shutdown;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::{Buf, Bytes};
use quinn::{Chunk, RecvStream, SendStream};
use socket2::SockRef;
use tokio::io::{AsyncRead, ReadBuf};
use tokio::net::tcp::ReadHalf;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::carry::resume::{HeldStream, Link, Resume, ResumeError, ACK_EVERY};
use crate::wire::protocol::{CloseCode, StreamCode};

/// The most bytes read from either side at once.
pub const CHUNK: usize = 16 * 1024;

/// Bytes carried each way by one spliced connection.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Transferred {
    /// From the TCP connection into the stream.
    pub to_stream: u64,
    /// From the stream out to the TCP connection.
    pub to_tcp: u64,
}

/// The counters a splice adds its bytes to as it carries them.
#[derive(Debug, Clone, Copy)]
pub struct Meter<'a> {
    /// Bytes read from the TCP connection.
    pub from_tcp: &'a AtomicU64,
    /// Bytes written to the TCP connection.
    pub to_tcp: &'a AtomicU64,
}

#[derive(Debug, thiserror::Error)]
pub enum SpliceError {
    #[error("reading from TCP: {0}")]
    TcpRead(io::Error),
    #[error("writing to TCP: {0}")]
    TcpWrite(io::Error),
    #[error("reading from the tunnel: {0}")]
    StreamRead(#[from] quinn::ReadError),
    #[error("writing to the tunnel: {0}")]
    StreamWrite(#[from] quinn::WriteError),
    #[error("the session was lost: {0}")]
    SessionLost(quinn::ConnectionError),
    #[error("the session did not come back within the resume window ({0:?})")]
    NotResumed(Duration),
    #[error("cannot resume: {0}")]
    Resume(#[from] ResumeError),
    #[error("closed because this end is stopping")]
    Stopping,
    #[error("closed: the connection may no longer go on (its address is no longer admitted)")]
    Revoked,
    /// The connection goes on in the next process: given back as it is (`None` only inside
    /// the loop, before it is handed back).
    #[error("handed over to the next process")]
    HandedOver(Option<TcpStream>),
}

/// What a splice needs besides its TCP connection and first data stream.
pub struct Held<'a> {
    pub stream: &'a HeldStream,
    /// How long a lost session is waited for; zero closes the connection at once.
    pub window: Duration,
    /// Cancelled when this process stops.
    pub stop: &'a CancellationToken,
    /// Cancelled, before `stop` is, when this process hands its connections over to the next
    /// one (a relay that restarts): `stop` then stops the splice as a hand-over. `None` where
    /// that never happens. Read when `stop` fires rather than waited for beside it, so that
    /// it costs no room in every connection's future.
    pub hand_over: Option<&'a CancellationToken>,
    pub meter: Meter<'a>,
}

/// Carries bytes both ways between `tcp` and the data stream of `link` until both directions
/// have ended and the peer confirmed this side's bytes, across as many lost and resumed
/// sessions as it takes; returns what it carried each way, and how it ended. Without a `link`,
/// the stream's session is lost already: it starts by waiting for one that resumes it.
///
/// One of these waits per forwarded connection, most of them idle, so its size counts: the
/// body is an `async move` block, whose captures are used in place (an `async fn` would keep
/// its arguments twice), and the wait for a lost session is boxed, made only when needed.
#[expect(
    clippy::manual_async_fn,
    reason = "an async fn keeps its arguments twice"
)]
pub fn splice<'a>(
    mut tcp: TcpStream,
    mut link: Option<Link>,
    held: Held<'a>,
) -> impl Future<Output = (Transferred, Result<(), SpliceError>)> + Send + 'a {
    async move {
        let mut moved = Transferred::default();
        let result = loop {
            let current = match &mut link {
                Some(current) => current,
                None => match Box::pin(wait_for_link(&held)).await {
                    Ok(next) => {
                        tracing::debug!(
                            received = held.stream.received(),
                            peer_received = next.peer_received,
                            "resumed"
                        );
                        link.insert(next)
                    }
                    Err(SpliceError::HandedOver(_)) => {
                        break Err(SpliceError::HandedOver(Some(tcp)))
                    }
                    Err(error) => {
                        reset_tcp(&tcp);
                        break Err(error);
                    }
                },
            };
            let error = match carry(&mut tcp, current, &held, &mut moved).await {
                Ok(()) => break Ok(()),
                Err(SpliceError::HandedOver(_)) => break Err(SpliceError::HandedOver(Some(tcp))),
                Err(error) => error,
            };
            if error.is_shutdown() {
                let _ = current.send.finish();
                let _ = SockRef::from(&tcp).shutdown(Shutdown::Write);
                break Err(error);
            }
            if error.is_lost() && !held.window.is_zero() {
                tracing::debug!(%error, "holding the connection until the session is back");
                link = None;
                continue;
            }
            // Whichever side failed, tell the other one that this is no clean end.
            let code = match error {
                SpliceError::Resume(_) => StreamCode::NotResumable,
                _ => StreamCode::Aborted,
            };
            let _ = current.send.reset(code.code());
            let _ = current.recv.stop(code.code());
            if !matches!(error, SpliceError::TcpRead(_) | SpliceError::TcpWrite(_)) {
                reset_tcp(&tcp);
            }
            break Err(error);
        };
        (moved, result)
    }
}

/// Waits, within the resume window, for the data stream of a session that resumes this one.
async fn wait_for_link(held: &Held<'_>) -> Result<Link, SpliceError> {
    let deadline = Instant::now() + held.window;
    let give_up = async {
        tokio::select! {
            biased;
            () = held.stop.cancelled() => held.stopped(),
            () = held.stream.revoked() => SpliceError::Revoked,
            () = tokio::time::sleep_until(deadline) => SpliceError::NotResumed(held.window),
        }
    };
    let wait = async {
        loop {
            let Resume::Link(link) = held.stream.next().await else {
                return Err(SpliceError::Resume(ResumeError::Refused));
            };
            // A new session lost before the stream was set up: wait for the next one.
            if let Some(link) = link(held.stream.received()).await? {
                return Ok(link);
            }
        }
    };
    tokio::select! {
        error = give_up => Err(error),
        link = wait => link,
    }
}

/// Carries both directions on one data stream, until both are done or something fails.
async fn carry(
    tcp: &mut TcpStream,
    link: &mut Link,
    held: &Held<'_>,
    moved: &mut Transferred,
) -> Result<(), SpliceError> {
    let Link {
        conn,
        send,
        recv,
        peer_received,
        acks,
    } = link;
    let stream = held.stream;
    let (mut reader, writer) = tcp.split();
    let writer = writer.as_ref();
    // Pinned here and polled by reference, so that each is stored once.
    let mut outgoing = pin!(async {
        // First what the peer did not receive before, if this stream resumes another.
        send.write_all_chunks(&mut stream.missed_from(*peer_received)?)
            .await?;
        if !stream.ended_sending() {
            tcp_to_stream(
                &mut reader,
                send,
                stream,
                (&mut moved.to_stream, held.meter.from_tcp),
            )
            .await?;
        }
        let _ = send.finish();
        stream.until_all_confirmed().await;
        Ok::<_, SpliceError>(())
    });
    let mut incoming = pin!(async {
        if stream.has_peer_ended() {
            return Ok(());
        }
        let counts = (&mut moved.to_tcp, held.meter.to_tcp);
        stream_to_tcp(recv, writer, stream, acks, counts).await
    });
    let (mut outgoing_done, mut incoming_done) = (false, false);
    while !(outgoing_done && incoming_done) {
        tokio::select! {
            // Checked first: once stopping (or handing over), the errors of the closing session
            // are no failures.
            biased;
            () = held.stop.cancelled() => return Err(held.stopped()),
            () = stream.revoked() => return Err(SpliceError::Revoked),
            // The directions may both be waiting on something other than the session: the
            // session's end must end them.
            error = conn.closed() => return Err(SpliceError::SessionLost(error)),
            result = &mut outgoing, if !outgoing_done => {
                result?;
                outgoing_done = true;
            }
            result = &mut incoming, if !incoming_done => {
                result?;
                incoming_done = true;
            }
        }
    }
    Ok(())
}

impl Held<'_> {
    /// Why the splice stops now that `stop` fired: a hand-over if one was asked for first.
    fn stopped(&self) -> SpliceError {
        match self.hand_over.is_some_and(CancellationToken::is_cancelled) {
            true => SpliceError::HandedOver(None),
            false => SpliceError::Stopping,
        }
    }
}

impl SpliceError {
    /// Whether the splice ended because this process or its peer is stopping, rather than
    /// because something broke.
    pub fn is_shutdown(&self) -> bool {
        if matches!(self, SpliceError::Stopping) {
            return true;
        }
        let Some(quinn::ConnectionError::ApplicationClosed(close)) = self.lost_session() else {
            return false;
        };
        matches!(
            CloseCode::from_code(close.error_code),
            Some(CloseCode::AgentShutdown | CloseCode::RelayShutdown)
        )
    }

    /// Whether the splice ended because its session was lost, for another reason than a
    /// shutdown: a new session may resume it.
    pub fn is_lost(&self) -> bool {
        self.lost_session().is_some() && !self.is_shutdown()
    }

    fn lost_session(&self) -> Option<&quinn::ConnectionError> {
        match self {
            SpliceError::SessionLost(lost)
            | SpliceError::StreamRead(quinn::ReadError::ConnectionLost(lost))
            | SpliceError::StreamWrite(quinn::WriteError::ConnectionLost(lost)) => Some(lost),
            _ => None,
        }
    }
}

/// Closes `tcp` with a RST instead of a FIN when it is dropped.
pub fn reset_tcp(tcp: &TcpStream) {
    let _ = SockRef::from(tcp).set_linger(Some(Duration::ZERO));
}

/// What a direction counts its bytes into: its own total and the forward's meter.
type Counts<'a> = (&'a mut u64, &'a AtomicU64);

fn count((total, meter): &mut Counts<'_>, n: usize) {
    **total += n as u64;
    meter.fetch_add(n as u64, Ordering::Relaxed);
}

/// Reads TCP into the stream until TCP's end, each chunk kept until the peer confirms it.
async fn tcp_to_stream(
    tcp: &mut ReadHalf<'_>,
    send: &mut SendStream,
    stream: &HeldStream,
    mut counts: Counts<'_>,
) -> Result<(), SpliceError> {
    loop {
        // Readiness is polled rather than awaited with `readable()`, whose future would take
        // 150 bytes in every idle connection. Only this task polls the socket, so the one
        // waker the socket keeps per direction is always the right one.
        poll_fn(|cx| tcp.as_ref().poll_read_ready(cx))
            .await
            .map_err(SpliceError::TcpRead)?;
        // Nothing is read while the stream is at its cap: the TCP writer waits. Taken once
        // there is something to read, so that an idle connection holds no room.
        let room = stream.reserve(CHUNK).await;
        let chunk = match read_now(tcp) {
            Poll::Ready(Ok(chunk)) if chunk.is_empty() => {
                stream.sent_end();
                return Ok(());
            }
            Poll::Ready(Ok(chunk)) => chunk,
            Poll::Ready(Err(e)) => return Err(SpliceError::TcpRead(e)),
            // The readiness was stale: wait again, without the room.
            Poll::Pending => continue,
        };
        count(&mut counts, chunk.len());
        // Held first: if the session is lost during the write, the chunk is sent again.
        room.hold(chunk.clone());
        // Not `write_chunk`, whose future is twice the size of this loop's, in every
        // connection.
        let mut chunks = [chunk];
        while !chunks[0].is_empty() {
            send.write_chunks(&mut chunks).await?;
        }
    }
}

/// Reads what TCP holds now, up to [`CHUNK`] bytes; empty at TCP's end.
///
/// Through `poll_read`, which after a short read marks the socket as drained, so that the next
/// wait for readiness goes straight to sleep instead of first reading nothing. Polled once,
/// never awaited: that wait registers the task's own waker before the task sleeps. The buffer
/// lives only during this call, so an idle connection holds none; it is not zeroed first,
/// since only the bytes read are copied out.
fn read_now(tcp: &mut ReadHalf<'_>) -> Poll<io::Result<Bytes>> {
    let mut buf = [const { MaybeUninit::uninit() }; CHUNK];
    let mut buf = ReadBuf::uninit(&mut buf);
    Pin::new(tcp)
        .poll_read(&mut Context::from_waker(Waker::noop()), &mut buf)
        .map_ok(|()| Bytes::copy_from_slice(buf.filled()))
}

/// Chunks written to TCP with one system call at most. QUIC hands the stream over about one
/// packet's payload at a time; a write per packet would cost more than the rest of the path.
const GATHER: usize = 64;

/// Writes the stream's bytes to TCP until the stream's end, counting each as written and
/// queueing the received offset for confirmation.
async fn stream_to_tcp(
    recv: &mut RecvStream,
    tcp: &TcpStream,
    stream: &HeldStream,
    acks: &crate::carry::resume::AckQueue,
    mut counts: Counts<'_>,
) -> Result<(), SpliceError> {
    let mut unconfirmed = 0u64;
    // Not `while let`, whose scrutinee's temporaries would be kept across the write.
    loop {
        let Some(Chunk { bytes, .. }) = recv.read_chunk(usize::MAX, true).await? else {
            break;
        };
        // Room for more than one chunk only when more are waiting: an interactive exchange
        // is one chunk at a time. Nothing is kept once written, so an idle connection holds
        // no batch.
        let mut batch = vec![bytes];
        if let Some(second) = poll_chunk(recv)? {
            batch.reserve_exact(GATHER - 1);
            batch.push(second);
            while batch.len() < GATHER {
                let Some(next) = poll_chunk(recv)? else {
                    break;
                };
                batch.push(next);
            }
        }
        let len: usize = batch.iter().map(Bytes::len).sum();
        write_all(tcp, &mut batch, |n| {
            stream.add_received(n);
            count(&mut counts, n);
        })
        .await
        .map_err(SpliceError::TcpWrite)?;
        unconfirmed += len as u64;
        let urgent = unconfirmed >= ACK_EVERY;
        if urgent {
            unconfirmed = 0;
        }
        acks.received(stream.header.id, stream.received(), urgent);
    }
    if stream.peer_ended() {
        acks.received(stream.header.id, stream.received(), true);
    }
    match SockRef::from(tcp).shutdown(Shutdown::Write) {
        // The peer may have closed already; there is nothing left to tell it.
        Err(e) if e.kind() != io::ErrorKind::NotConnected => Err(SpliceError::TcpWrite(e)),
        _ => Ok(()),
    }
}

/// The next chunk the stream has received and not yet given out, if there is one now. Polled
/// once, never awaited: the stream is polled again, with the task's own waker, before the task
/// sleeps. The stream's end is left for that next read to see.
fn poll_chunk(recv: &mut RecvStream) -> Result<Option<Bytes>, quinn::ReadError> {
    let read =
        pin!(recv.read_chunk(usize::MAX, true)).poll(&mut Context::from_waker(Waker::noop()));
    match read {
        Poll::Ready(Ok(chunk)) => Ok(chunk.map(|chunk| chunk.bytes)),
        Poll::Ready(Err(e)) => Err(e),
        Poll::Pending => Ok(None),
    }
}

/// Writes all of `chunks`, as few system calls as the kernel allows, calling `written` with
/// each part the kernel took: if the write is abandoned half way (the session was lost), the
/// count says exactly what went out.
async fn write_all(
    tcp: &TcpStream,
    chunks: &mut [Bytes],
    mut written: impl FnMut(usize),
) -> io::Result<()> {
    let mut next = 0;
    while next < chunks.len() {
        poll_fn(|cx| tcp.poll_write_ready(cx)).await?;
        let wrote = {
            let mut slices = [IoSlice::new(&[]); GATHER];
            let pending = &chunks[next..];
            for (slice, chunk) in slices.iter_mut().zip(pending) {
                *slice = IoSlice::new(chunk);
            }
            tcp.try_write_vectored(&slices[..pending.len().min(GATHER)])
        };
        match wrote {
            Ok(mut n) => {
                written(n);
                while let Some(chunk) = chunks.get_mut(next) {
                    if n < chunk.len() {
                        chunk.advance(n);
                        break;
                    }
                    n -= chunk.len();
                    next += 1;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
