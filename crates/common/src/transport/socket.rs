//! The UDP socket under each QUIC endpoint: quinn's tokio socket, less one system call per
//! datagram received on an interactive connection.
//!
//! quinn receives until the socket reports it has nothing more, so each wake-up ended with a
//! receive that found nothing. A receive that took fewer datagrams than it had room for has
//! emptied the socket: here that marks the socket drained at once, as tokio's own `poll_read`
//! does for a short TCP read, and the next wait goes straight to sleep.

use std::future::Future;
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Instant;

use quinn::udp::{RecvMeta, Transmit, UdpSocketState, BATCH_SIZE};
use quinn::{AsyncTimer, AsyncUdpSocket, UdpPoller};
use tokio::io::Interest;
use tokio::net::UdpSocket;

/// quinn's tokio runtime, with [`QuicSocket`] for its sockets.
#[derive(Debug)]
pub struct Runtime;

impl quinn::Runtime for Runtime {
    fn new_timer(&self, at: Instant) -> Pin<Box<dyn AsyncTimer>> {
        quinn::TokioRuntime.new_timer(at)
    }

    fn spawn(&self, future: Pin<Box<dyn Future<Output = ()> + Send>>) {
        quinn::TokioRuntime.spawn(future);
    }

    fn wrap_udp_socket(&self, socket: std::net::UdpSocket) -> io::Result<Arc<dyn AsyncUdpSocket>> {
        Ok(Arc::new(QuicSocket::new(socket)?))
    }

    fn now(&self) -> Instant {
        quinn::TokioRuntime.now()
    }
}

/// A UDP socket as quinn sends and receives on it.
#[derive(Debug)]
pub struct QuicSocket {
    io: UdpSocket,
    state: UdpSocketState,
}

impl QuicSocket {
    fn new(socket: std::net::UdpSocket) -> io::Result<Self> {
        let state = UdpSocketState::new((&socket).into())?;
        socket.set_nonblocking(true)?;
        let io = UdpSocket::from_std(socket)?;
        Ok(Self { io, state })
    }
}

impl AsyncUdpSocket for QuicSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        Box::pin(Writable {
            socket: self,
            wait: None,
        })
    }

    fn try_send(&self, transmit: &Transmit<'_>) -> io::Result<()> {
        self.io.try_io(Interest::WRITABLE, || {
            self.state.send((&self.io).into(), transmit)
        })
    }

    fn poll_recv(
        &self,
        cx: &mut Context<'_>,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        let room = bufs.len().min(meta.len()).min(BATCH_SIZE);
        loop {
            ready!(self.io.poll_recv_ready(cx))?;
            // A closure that fails with `WouldBlock` clears the readiness tokio saw before
            // calling it, not any that came in since: a datagram arriving after the receive
            // still wakes the task. So a short receive is reported that way, its count kept
            // aside.
            let mut short = None;
            let received = self.io.try_io(Interest::READABLE, || {
                let n = self.state.recv((&self.io).into(), bufs, meta)?;
                if n < room {
                    short = Some(n);
                    return Err(io::ErrorKind::WouldBlock.into());
                }
                Ok(n)
            });
            return match received {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => match short {
                    Some(n) => Poll::Ready(Ok(n)),
                    None => continue,
                },
                received => Poll::Ready(received),
            };
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.io.local_addr()
    }

    fn may_fragment(&self) -> bool {
        self.state.may_fragment()
    }

    fn max_transmit_segments(&self) -> usize {
        self.state.max_gso_segments()
    }

    fn max_receive_segments(&self) -> usize {
        self.state.gro_segments()
    }
}

type WaitWritable = Pin<Box<dyn Future<Output = io::Result<()>> + Send + Sync>>;

/// Waits, for one of quinn's tasks, until the socket takes datagrams again. Each task has its
/// own wait, so that all of those sending on one socket are woken.
struct Writable {
    socket: Arc<QuicSocket>,
    /// Made when a send was turned away, dropped once the socket is writable.
    wait: Option<WaitWritable>,
}

impl std::fmt::Debug for Writable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Writable")
            .field("socket", &self.socket)
            .field("waiting", &self.wait.is_some())
            .finish()
    }
}

impl UdpPoller for Writable {
    fn poll_writable(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let wait = this.wait.get_or_insert_with(|| {
            let socket = Arc::clone(&this.socket);
            Box::pin(async move { socket.io.writable().await })
        });
        let result = ready!(wait.as_mut().poll(cx));
        this.wait = None;
        Poll::Ready(result)
    }
}

#[cfg(test)]
mod tests {
    use std::future::poll_fn;
    use std::task::Waker;
    use std::time::Duration;

    use super::*;

    const WAIT: Duration = Duration::from_secs(5);

    /// A socket under test and a plain one sending to it.
    fn pair() -> (Arc<QuicSocket>, std::net::UdpSocket) {
        let local = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let peer = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        peer.connect(local.local_addr().unwrap()).unwrap();
        (Arc::new(QuicSocket::new(local).unwrap()), peer)
    }

    /// Receives with room for two datagrams: their lengths.
    fn receive(socket: &QuicSocket, cx: &mut Context<'_>) -> Poll<Vec<usize>> {
        let [mut first, mut second] = [[0u8; 1500]; 2];
        let mut bufs = [IoSliceMut::new(&mut first), IoSliceMut::new(&mut second)];
        let mut meta = [RecvMeta::default(); 2];
        let n = ready!(socket.poll_recv(cx, &mut bufs, &mut meta)).unwrap();
        Poll::Ready(meta[..n].iter().map(|meta| meta.len).collect())
    }

    async fn received(socket: &QuicSocket) -> Vec<usize> {
        tokio::time::timeout(WAIT, poll_fn(|cx| receive(socket, cx)))
            .await
            .expect("a datagram sent wakes the receiver")
    }

    #[tokio::test]
    async fn a_datagram_after_a_short_receive_still_wakes_the_receiver() {
        let (socket, peer) = pair();
        peer.send(&[1; 10]).unwrap();
        assert_eq!(received(&socket).await, [10]);
        // The socket is marked drained: this one must come through a new wake-up.
        peer.send(&[2; 20]).unwrap();
        assert_eq!(received(&socket).await, [20]);
    }

    #[tokio::test]
    async fn a_full_receive_leaves_the_socket_ready_for_the_rest() {
        let (socket, peer) = pair();
        for len in [10, 20, 30] {
            peer.send(&vec![0; len]).unwrap();
        }
        assert_eq!(received(&socket).await, [10, 20]);
        // No new datagram arrives to wake the receiver: the third is taken without waiting.
        let rest = receive(&socket, &mut Context::from_waker(Waker::noop()));
        assert_eq!(rest, Poll::Ready(vec![30]));
    }

    #[tokio::test]
    async fn an_idle_socket_is_writable_for_each_poller() {
        let (socket, _peer) = pair();
        for _ in 0..2 {
            let mut poller = Arc::clone(&socket).create_io_poller();
            let writable = poll_fn(|cx| poller.as_mut().poll_writable(cx));
            tokio::time::timeout(WAIT, writable).await.unwrap().unwrap();
        }
    }
}
