//! The relay's TCP listener (`listen_tcp`): agents that UDP does not reach connect here, prove
//! their key in TLS, and run their session over the connection, a carrier (see
//! [`tether_common::transport::carrier`]). From the QUIC handshake on, a session here is served
//! as any other.
//!
//! A connection holds a handshake place (see [`crate::handshakes`]) from its first byte until
//! its session is set up, under the same caps and deadline as a QUIC handshake: the TLS
//! handshake, then the QUIC one inside it.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tether_common::transport::{carrier, Path};
use tether_common::wire::protocol::CloseCode;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;

use crate::handshakes::{Pending, Place, Verdict};
use crate::session;
use crate::shared::Shared;

/// How long a carrier whose session ended is given to send the session's last packets.
const CLOSE_LINGER: Duration = Duration::from_secs(1);

/// What the relay needs to serve a carrier, made once.
pub struct TcpPath {
    pub listener: TcpListener,
    pub tls: TlsAcceptor,
    pub endpoint: quinn::EndpointConfig,
    pub server: quinn::ServerConfig,
}

impl TcpPath {
    /// Takes in a connection from the listener, or drops it when the handshake places say so.
    pub fn admit(&self, shared: &Arc<Shared>, pending: &Pending, tcp: TcpStream, peer: SocketAddr) {
        let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
        // TCP's own handshake proved the address: no Retry is needed.
        match pending.consider(peer.ip(), true, false) {
            Verdict::Accept(place) => {
                let setup = Setup {
                    tls: self.tls.clone(),
                    endpoint: self.endpoint.clone(),
                    server: self.server.clone(),
                };
                shared
                    .tasks
                    .spawn(serve(shared.clone(), setup, tcp, peer, place));
            }
            Verdict::Drop(reason) => refused(shared, reason, peer),
            // Not asked of an address already proved; dropped all the same if it were.
            Verdict::Retry => refused(shared, "too many handshakes", peer),
        }
    }
}

struct Setup {
    tls: TlsAcceptor,
    endpoint: quinn::EndpointConfig,
    server: quinn::ServerConfig,
}

/// Serves one carrier, from its TLS handshake to the end of its session.
async fn serve(shared: Arc<Shared>, setup: Setup, tcp: TcpStream, peer: SocketAddr, place: Place) {
    let deadline = tokio::time::Instant::now() + shared.limits.handshake_timeout;
    let local = match tcp.local_addr() {
        Ok(local) => local,
        Err(_) => return,
    };
    carrier::tune(&tcp);
    let tls = tokio::select! {
        tls = tokio::time::timeout_at(deadline, setup.tls.accept(tcp)) => tls,
        () = place.evicted() => {
            refused(&shared, "handshake abandoned for another address's", peer);
            return;
        }
    };
    let tls = match tls {
        Ok(Ok(tls)) => tls,
        Ok(Err(error)) => {
            // An unlisted key was counted by the verifier, with its fingerprint.
            if !is_refused_key(&error) {
                refused(&shared, "TLS over TCP handshake failed", peer);
            }
            tracing::debug!(%peer, %error, "TLS over TCP refused");
            return;
        }
        Err(_) => {
            refused(&shared, "handshake timed out", peer);
            return;
        }
    };
    let socket = carrier::CarrierSocket::new(tls, local, peer);
    let endpoint = match carrier::endpoint(setup.endpoint, Some(setup.server), socket.clone()) {
        Ok(endpoint) => endpoint,
        Err(error) => {
            tracing::warn!(%peer, %error, "cannot serve a carrier");
            return;
        }
    };
    let broken = socket.broken();
    drop(socket);
    let incoming = tokio::select! {
        incoming = tokio::time::timeout_at(deadline, endpoint.accept()) => incoming,
        () = place.evicted() => {
            refused(&shared, "handshake abandoned for another address's", peer);
            return;
        }
    };
    let Ok(Some(incoming)) = incoming else {
        refused(&shared, "handshake timed out", peer);
        return;
    };
    let session = session::serve(shared.clone(), incoming, place, Path::Tcp);
    tokio::pin!(session);
    tokio::select! {
        () = &mut session => {}
        () = broken => {
            // The TCP connection is gone: the session is lost, as one whose UDP path went
            // silent, and its visitors are held for the agent's return.
            let code = CloseCode::PathLost;
            endpoint.close(code.code(), code.reason().as_bytes());
            session.await;
        }
    }
    let _ = tokio::time::timeout(CLOSE_LINGER, endpoint.wait_idle()).await;
}

fn refused(shared: &Shared, reason: &'static str, peer: SocketAddr) {
    shared.refused_handshakes.record(reason, &peer.ip());
}

/// Whether TLS failed because the agent's key is not listed: the verifier counted it already.
fn is_refused_key(error: &io::Error) -> bool {
    let Some(tls) = error
        .get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>())
    else {
        return false;
    };
    matches!(
        tls,
        rustls::Error::InvalidCertificate(rustls::CertificateError::ApplicationVerificationFailure)
    )
}

/// Binds the relay's TCP listener on `address`.
pub fn bind(address: SocketAddr) -> io::Result<TcpListener> {
    let socket = match address {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.bind(address)?;
    socket.listen(1024)
}
