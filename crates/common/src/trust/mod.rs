//! Trust, as with ssh: who a side is (`identity`: its key file, the certificate made from it at
//! start-up, its `SHA256:` fingerprint) and mutual TLS 1.3 in which each side accepts only the
//! keys it pinned (`tls`).
//!
//! Knows nothing of forwards, visitors or sessions: it answers "is this the peer we pinned?".

pub mod identity;
pub mod invite;
pub mod tls;
