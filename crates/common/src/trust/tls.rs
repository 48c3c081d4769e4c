//! Mutual TLS 1.3 with pinned keys, like ssh: no CA, no names. Each side checks that the peer's
//! certificate carries a pinned key *and* that the peer signed the handshake with that key.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};

use crate::trust::identity::{Fingerprint, Identity};

/// The one application protocol both sides speak; the version of the wire format in
/// [`crate::wire::protocol`].
pub const ALPN: &[u8] = b"tether/1";

/// The protocol of the TCP path (see [`crate::transport::carrier`]): QUIC packets, framed,
/// over TLS with the same pinned keys.
pub const ALPN_TCP: &[u8] = b"tether-tcp/1";

/// The protocol of a join (see [`crate::trust::invite`]): a key not listed yet presents an
/// invite's secret, and the session does nothing else.
pub const ALPN_JOIN: &[u8] = b"tether-join/1";

/// The name the agent asks for. The relay's certificate is trusted by its key, so the name is
/// never checked; it only has to be a valid server name.
pub const SERVER_NAME: &str = "tether";

/// The TLS alert a relay sends to an agent whose key it does not list (`access_denied`), as a
/// QUIC transport error code: crypto errors are 0x100 plus the alert.
pub const REFUSED_KEY_ERROR_CODE: u64 = 0x100 + 49;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("TLS set-up: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("QUIC TLS set-up: {0}")]
    Quic(#[from] quinn::crypto::rustls::NoInitialCipherSuite),
}

/// ring: it builds with nothing but a C compiler, and gives us Ed25519 for keys.
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The agent's side: a client configuration that trusts only the pinned relay key. The returned
/// [`RelayPin`] tells, after a refused handshake, which key the relay showed instead.
pub fn client_config(
    identity: &Identity,
    relay: Fingerprint,
) -> Result<(quinn::ClientConfig, Arc<RelayPin>), TlsError> {
    client_config_for(identity, relay, ALPN)
}

/// [`client_config`] for a session that speaks `alpn`: [`ALPN`], or [`ALPN_JOIN`] to join.
pub fn client_config_for(
    identity: &Identity,
    relay: Fingerprint,
    alpn: &[u8],
) -> Result<(quinn::ClientConfig, Arc<RelayPin>), TlsError> {
    let provider = provider();
    let pin = Arc::new(RelayPin {
        expected: relay,
        mismatch: Mutex::new(None),
        algorithms: provider.signature_verification_algorithms,
    });
    let tls = client_tls(identity, &pin, alpn)?;
    let quic = QuicClientConfig::try_from(tls)?;
    Ok((quinn::ClientConfig::new(Arc::new(quic)), pin))
}

/// The agent's TLS over TCP, for the TCP path: the same key, the same pin.
pub fn tcp_client_config(
    identity: &Identity,
    pin: &Arc<RelayPin>,
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    Ok(Arc::new(client_tls(identity, pin, ALPN_TCP)?))
}

fn client_tls(
    identity: &Identity,
    pin: &Arc<RelayPin>,
    alpn: &[u8],
) -> Result<rustls::ClientConfig, TlsError> {
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(pin.clone())
        .with_client_auth_cert(vec![identity.certificate()], identity.private_key())?;
    tls.alpn_protocols = vec![alpn.to_vec()];
    Ok(tls)
}

/// The relay's side: a server configuration that admits only agents whose keys are in `agents`
/// (and, while an invite is pending, keys that come to join: see [`AgentPins::set_inviting`]).
pub fn server_config(
    identity: &Identity,
    agents: Arc<AgentPins>,
) -> Result<quinn::ServerConfig, TlsError> {
    let mut tls = server_tls(identity, agents, ALPN)?;
    tls.alpn_protocols.push(ALPN_JOIN.to_vec());
    let quic = QuicServerConfig::try_from(tls)?;
    Ok(quinn::ServerConfig::with_crypto(Arc::new(quic)))
}

/// The relay's TLS over TCP, for the TCP path: the same key, the same agents.
pub fn tcp_server_config(
    identity: &Identity,
    agents: Arc<AgentPins>,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    Ok(Arc::new(server_tls(identity, agents, ALPN_TCP)?))
}

fn server_tls(
    identity: &Identity,
    agents: Arc<AgentPins>,
    alpn: &[u8],
) -> Result<rustls::ServerConfig, TlsError> {
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(agents)
        .with_single_cert(vec![identity.certificate()], identity.private_key())?;
    tls.alpn_protocols = vec![alpn.to_vec()];
    Ok(tls)
}

/// The fingerprint of the key a connected peer proved it holds.
pub fn peer_fingerprint(conn: &quinn::Connection) -> Option<Fingerprint> {
    let certs = conn
        .peer_identity()?
        .downcast::<Vec<CertificateDer<'static>>>()
        .ok()?;
    Fingerprint::of_certificate(certs.first()?).ok()
}

/// The application protocol a connection negotiated: [`ALPN`] or [`ALPN_JOIN`].
pub fn protocol(conn: &quinn::Connection) -> Option<Vec<u8>> {
    conn.handshake_data()?
        .downcast::<quinn::crypto::rustls::HandshakeData>()
        .ok()?
        .protocol
}

fn fingerprint_or_refuse(cert: &CertificateDer<'_>) -> Result<Fingerprint, rustls::Error> {
    Fingerprint::of_certificate(cert).map_err(|_| CertificateError::BadEncoding.into())
}

fn verify_tls13(
    message: &[u8],
    cert: &CertificateDer<'_>,
    dss: &DigitallySignedStruct,
    algorithms: &WebPkiSupportedAlgorithms,
) -> Result<HandshakeSignatureValid, rustls::Error> {
    rustls::crypto::verify_tls13_signature(message, cert, dss, algorithms)
}

/// TLS 1.2 is never negotiated (the configurations allow 1.3 alone); refuse it all the same.
fn refuse_tls12() -> Result<HandshakeSignatureValid, rustls::Error> {
    Err(rustls::PeerIncompatible::Tls12NotOffered.into())
}

/// The agent's verifier of the relay's certificate.
#[derive(Debug)]
pub struct RelayPin {
    expected: Fingerprint,
    mismatch: Mutex<Option<Fingerprint>>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl RelayPin {
    /// The fingerprint the relay showed in the last handshake, if it was not the pinned one.
    pub fn take_mismatch(&self) -> Option<Fingerprint> {
        self.mismatch
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }

    pub fn expected(&self) -> Fingerprint {
        self.expected
    }
}

impl ServerCertVerifier for RelayPin {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let got = fingerprint_or_refuse(end_entity)?;
        if got != self.expected {
            *self.mismatch.lock().unwrap_or_else(|e| e.into_inner()) = Some(got);
            return Err(CertificateError::ApplicationVerificationFailure.into());
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        refuse_tls12()
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// Whether a relay's handshake failed because the agent's key is not listed: the verifier
/// refused its certificate, which TLS reports to both sides as "access denied".
pub fn is_unlisted_key(error: &quinn::ConnectionError) -> bool {
    let denied = quinn::TransportErrorCode::crypto(rustls::AlertDescription::AccessDenied.into());
    matches!(error, quinn::ConnectionError::TransportError(e) if e.code == denied)
}

/// What the relay does with the key of an agent it refused: log it, or count it first so that
/// a stream of them is not a stream of log lines.
pub type OnRefused = Box<dyn Fn(&Fingerprint) + Send + Sync>;

/// The relay's verifier of agents' certificates: the set of agent keys it serves.
pub struct AgentPins {
    known: RwLock<HashSet<Fingerprint>>,
    /// An invite is pending: a key not listed completes its handshake, for a join.
    inviting: AtomicBool,
    algorithms: WebPkiSupportedAlgorithms,
    on_refused: OnRefused,
}

impl std::fmt::Debug for AgentPins {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentPins")
            .field("known", &self.known)
            .finish_non_exhaustive()
    }
}

impl AgentPins {
    /// Pins that log each refused key.
    pub fn new(known: impl IntoIterator<Item = Fingerprint>) -> Self {
        Self::with_on_refused(
            known,
            Box::new(
                |fingerprint| tracing::info!(%fingerprint, "refused an agent whose key is not listed"),
            ),
        )
    }

    pub fn with_on_refused(
        known: impl IntoIterator<Item = Fingerprint>,
        on_refused: OnRefused,
    ) -> Self {
        Self {
            known: RwLock::new(known.into_iter().collect()),
            inviting: AtomicBool::new(false),
            algorithms: provider().signature_verification_algorithms,
            on_refused,
        }
    }

    /// Lists `known` instead of the keys listed so far: handshakes from now on are checked
    /// against them.
    pub fn replace(&self, known: impl IntoIterator<Item = Fingerprint>) {
        *self.known.write().unwrap_or_else(|e| e.into_inner()) = known.into_iter().collect();
    }

    /// While `inviting`, a key that is not listed completes the handshake too, so that it can
    /// present an invite's secret; the session checks the key again and lets such a one do
    /// nothing but join. With no invite pending, such a key is refused in the handshake.
    pub fn set_inviting(&self, inviting: bool) {
        self.inviting.store(inviting, Ordering::Relaxed);
    }

    pub fn is_inviting(&self) -> bool {
        self.inviting.load(Ordering::Relaxed)
    }

    pub fn contains(&self, fingerprint: &Fingerprint) -> bool {
        self.known
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .contains(fingerprint)
    }
}

impl ClientCertVerifier for AgentPins {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let got = fingerprint_or_refuse(end_entity)?;
        if !self.contains(&got) && !self.inviting.load(Ordering::Relaxed) {
            (self.on_refused)(&got);
            return Err(CertificateError::ApplicationVerificationFailure.into());
        }
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        refuse_tls12()
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}
