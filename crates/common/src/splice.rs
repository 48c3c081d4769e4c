//! The one TCP copy loop, used by the relay for visitors and by the agent for local services:
//! a TCP connection spliced to a QUIC stream, both directions at once.
//!
//! - Half-close: EOF from TCP finishes the stream, the end of the stream shuts down TCP's
//!   write side; the other direction goes on until it ends too.
//! - A failure on one side is passed on as a failure, not a clean end: a TCP error resets the
//!   stream, a reset stream resets the TCP connection (RST), so neither end mistakes a broken
//!   connection for a complete one.
//! - A shutdown is no failure: when this process stops, or the peer closes the session because
//!   it stops, the TCP connection ends with a FIN, as any server that is stopped closes its
//!   connections.
//! - The bytes are counted as they go, into the forward's [`Meter`], so that status and metrics
//!   see a long transfer move.
//! - Memory is bounded: one chunk in flight per direction, and QUIC flow control pushes back on
//!   the sender when the TCP reader is slow. No buffer is held while a connection is idle.

use std::io;
use std::net::Shutdown;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use quinn::{RecvStream, SendStream};
use socket2::SockRef;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::protocol::{CloseCode, StreamCode};

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
    #[error("closed because this end is stopping")]
    Stopping,
}

/// Carries bytes both ways between `tcp` and the stream until both directions have ended, or
/// until `stop` is cancelled (this process is stopping).
pub async fn splice(
    tcp: TcpStream,
    mut send: SendStream,
    mut recv: RecvStream,
    stop: &CancellationToken,
    meter: Meter<'_>,
) -> Result<Transferred, SpliceError> {
    let mut moved = Transferred::default();
    let result = tokio::select! {
        // Checked first: once stopping, the errors of the closing session are no failures.
        biased;
        () = stop.cancelled() => Err(SpliceError::Stopping),
        result = async {
            tokio::try_join!(
                tcp_to_stream(&tcp, &mut send, (&mut moved.to_stream, meter.from_tcp)),
                stream_to_tcp(&mut recv, &tcp, (&mut moved.to_tcp, meter.to_tcp)),
            )
        } => result.map(|_| ()),
    };
    match result {
        Ok(()) => Ok(moved),
        Err(error) if error.is_shutdown() => {
            let _ = send.finish();
            let _ = SockRef::from(&tcp).shutdown(Shutdown::Write);
            Err(error)
        }
        Err(error) => {
            // Whichever side failed, tell the other one that this is no clean end.
            let _ = send.reset(StreamCode::Aborted.code());
            let _ = recv.stop(StreamCode::Aborted.code());
            if matches!(
                error,
                SpliceError::StreamRead(_) | SpliceError::StreamWrite(_)
            ) {
                reset_tcp(&tcp);
            }
            Err(error)
        }
    }
}

impl SpliceError {
    /// Whether the splice ended because this process or its peer is stopping, rather than
    /// because something broke.
    pub fn is_shutdown(&self) -> bool {
        let lost = match self {
            SpliceError::Stopping => return true,
            SpliceError::StreamRead(quinn::ReadError::ConnectionLost(lost)) => lost,
            SpliceError::StreamWrite(quinn::WriteError::ConnectionLost(lost)) => lost,
            _ => return false,
        };
        let quinn::ConnectionError::ApplicationClosed(close) = lost else {
            return false;
        };
        matches!(
            CloseCode::from_code(close.error_code),
            Some(CloseCode::AgentShutdown | CloseCode::RelayShutdown)
        )
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

async fn tcp_to_stream(
    tcp: &TcpStream,
    send: &mut SendStream,
    mut counts: Counts<'_>,
) -> Result<(), SpliceError> {
    loop {
        tcp.readable().await.map_err(SpliceError::TcpRead)?;
        // The buffer lives only until the chunk is copied out, never across an await, so an
        // idle connection holds none.
        let chunk = {
            let mut buf = [0u8; CHUNK];
            match tcp.try_read(&mut buf) {
                Ok(0) => {
                    let _ = send.finish();
                    return Ok(());
                }
                Ok(n) => Bytes::copy_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(SpliceError::TcpRead(e)),
            }
        };
        let len = chunk.len();
        send.write_chunk(chunk).await?;
        count(&mut counts, len);
    }
}

async fn stream_to_tcp(
    recv: &mut RecvStream,
    tcp: &TcpStream,
    mut counts: Counts<'_>,
) -> Result<(), SpliceError> {
    while let Some(chunk) = recv.read_chunk(CHUNK, true).await? {
        write_all(tcp, &chunk.bytes)
            .await
            .map_err(SpliceError::TcpWrite)?;
        count(&mut counts, chunk.bytes.len());
    }
    match SockRef::from(tcp).shutdown(Shutdown::Write) {
        // The peer may have closed already; there is nothing left to tell it.
        Err(e) if e.kind() != io::ErrorKind::NotConnected => Err(SpliceError::TcpWrite(e)),
        _ => Ok(()),
    }
}

async fn write_all(tcp: &TcpStream, mut buf: &[u8]) -> io::Result<()> {
    while !buf.is_empty() {
        tcp.writable().await?;
        match tcp.try_write(buf) {
            Ok(n) => buf = &buf[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
