//! Binding public ports, TCP and UDP alike, and what holds one open. With no `public_bind`, one
//! dual-stack socket takes IPv4 and IPv6 visitors; a host without IPv6 gets IPv4 alone.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;

use socket2::{Domain, Protocol, SockRef, Socket, Type};
use tether_common::net::ports::Proto;
use tether_common::service::fdstore::Store;
use tokio::net::{TcpListener, UdpSocket};
use tokio_util::sync::CancellationToken;

/// A public port open: its listener runs until this is dropped, and a TCP port stops taking
/// connections there and then, before its accept loop has seen that it was cancelled, so that
/// a reload that closed the port says so truly.
pub struct Listening {
    pub cancel: CancellationToken,
    pub tcp: Option<Arc<TcpListener>>,
    /// A UDP port's socket, where answers to its visitors leave from.
    pub udp: Option<Arc<UdpSocket>>,
    /// Where systemd keeps a copy of the socket while the port is open, so that the port
    /// outlives a crash of the relay (see `handover`); it is taken out when the port closes.
    pub kept: Option<Kept>,
}

/// A socket in systemd's store under a name of its own.
pub struct Kept {
    pub store: Arc<Store>,
    pub name: String,
}

impl Kept {
    /// Has `store`, if any, keep a copy of `socket` under `name`; `adopted`: a socket the
    /// previous process left, which the store keeps already. `None` if there is no store or
    /// it cannot take the socket.
    pub fn keep(
        store: Option<&Arc<Store>>,
        name: String,
        socket: BorrowedFd<'_>,
        adopted: bool,
    ) -> Option<Self> {
        let store = store?.clone();
        if !adopted {
            if let Err(error) = store.keep_at_once(&name, &[socket]) {
                tracing::debug!(%error, name, "cannot hand a socket to systemd's store");
                return None;
            }
        }
        Some(Self { store, name })
    }

    /// Asks systemd to close and forget its copy.
    pub fn forget(self) {
        if let Err(error) = self.store.forget(&self.name) {
            tracing::debug!(%error, name = self.name, "cannot take a socket out of systemd's store");
        }
    }
}

/// The name a public port's socket is kept under in systemd's store.
pub fn kept_name(proto: Proto, port: u16) -> String {
    format!("{proto}-{port}")
}

impl Listening {
    /// Leaves the port's socket to the next process (see `handover`): from here on, dropping
    /// this no longer stops the listener, which goes on in that process. The socket, if
    /// systemd does not keep a copy already.
    pub fn hand_over(mut self) -> io::Result<Option<OwnedFd>> {
        let tcp = self.tcp.take();
        if self.kept.take().is_some() {
            return Ok(None);
        }
        match (tcp, &self.udp) {
            (Some(tcp), _) => tcp.as_fd().try_clone_to_owned().map(Some),
            (None, Some(udp)) => udp.as_fd().try_clone_to_owned().map(Some),
            (None, None) => Err(io::Error::other("a port without a socket")),
        }
    }
}

impl Drop for Listening {
    fn drop(&mut self) {
        self.cancel.cancel();
        if let Some(listener) = &self.tcp {
            if let Err(error) = SockRef::from(&**listener).shutdown(Shutdown::Both) {
                tracing::debug!(%error, "cannot stop listening");
            }
        }
        if let Some(kept) = self.kept.take() {
            kept.forget();
        }
    }
}

/// A bound, non-blocking socket for public `port`; TCP ones are listening.
pub fn bind(address: Option<IpAddr>, port: u16, proto: Proto) -> io::Result<Socket> {
    match address {
        Some(ip) => socket(SocketAddr::new(ip, port), proto, false),
        None => match socket(
            SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), port),
            proto,
            true,
        ) {
            Err(e) if e.kind() != io::ErrorKind::AddrInUse => socket(
                SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), port),
                proto,
                false,
            ),
            other => other,
        },
    }
}

fn socket(address: SocketAddr, proto: Proto, dual_stack: bool) -> io::Result<Socket> {
    let (kind, protocol) = match proto {
        Proto::Tcp => (Type::STREAM, Protocol::TCP),
        Proto::Udp => (Type::DGRAM, Protocol::UDP),
    };
    let socket = Socket::new(Domain::for_address(address), kind, Some(protocol))?;
    if dual_stack {
        socket.set_only_v6(false)?;
    }
    // A TCP port can be bound again at once after its listener closed. Not for UDP, where the
    // option would let a second socket share the port.
    if proto == Proto::Tcp {
        socket.set_reuse_address(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&address.into())?;
    if proto == Proto::Tcp {
        socket.listen(1024)?;
    }
    Ok(socket)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_port_in_use_is_reported_as_such() {
        for proto in [Proto::Tcp, Proto::Udp] {
            let taken = bind(Some("127.0.0.1".parse().unwrap()), 0, proto).unwrap();
            let port = taken.local_addr().unwrap().as_socket().unwrap().port();
            let error = bind(Some("127.0.0.1".parse().unwrap()), port, proto).unwrap_err();
            assert_eq!(error.kind(), io::ErrorKind::AddrInUse, "{proto}");
        }
    }
}
