//! Who a relay or an agent is: its private key file, the certificate made from it at start-up,
//! and the `SHA256:` fingerprint that the other side pins.

use std::fmt;
use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use base64::engine::general_purpose::STANDARD_NO_PAD;
use base64::Engine;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use sha2::{Digest, Sha256};

/// The name written into the self-signed certificates. Nobody checks it: trust comes from the
/// pinned fingerprint, never from a name.
const CERT_NAME: &str = "tether";

/// SHA-256 of a SubjectPublicKeyInfo, shown as `SHA256:` and unpadded standard base64, the way
/// ssh shows host keys.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Fingerprint([u8; 32]);

impl Fingerprint {
    const PREFIX: &'static str = "SHA256:";

    /// The fingerprint of a DER-encoded SubjectPublicKeyInfo.
    pub fn of_spki(spki_der: &[u8]) -> Self {
        Self(Sha256::digest(spki_der).into())
    }

    /// The fingerprint of the key inside a DER-encoded X.509 certificate.
    pub fn of_certificate(cert: &CertificateDer<'_>) -> Result<Self, webpki::Error> {
        let cert = webpki::EndEntityCert::try_from(cert)?;
        Ok(Self::of_spki(&cert.subject_public_key_info()))
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}", Self::PREFIX, STANDARD_NO_PAD.encode(self.0))
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// A string that is not a fingerprint of the form `SHA256:` followed by 43 base64 characters.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("expected SHA256: followed by 43 base64 characters")]
pub struct BadFingerprint;

impl FromStr for Fingerprint {
    type Err = BadFingerprint;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let encoded = s.strip_prefix(Self::PREFIX).ok_or(BadFingerprint)?;
        let bytes = STANDARD_NO_PAD
            .decode(encoded)
            .map_err(|_| BadFingerprint)?;
        Ok(Self(bytes.try_into().map_err(|_| BadFingerprint)?))
    }
}

/// Why a key file could not be created or used.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("{}: {source}", path.display())]
    Read { path: PathBuf, source: io::Error },
    #[error("{}: already exists; init never overwrites a key", path.display())]
    Exists { path: PathBuf },
    #[error("{}: {source}", path.display())]
    Write { path: PathBuf, source: io::Error },
    #[error(
        "{}: permissions {mode:04o} are too open; the key must be readable by its owner alone \
         (chmod 600 {})",
        path.display(),
        path.display()
    )]
    TooOpen { path: PathBuf, mode: u32 },
    #[error("{}: not a PKCS#8 PEM private key: {source}", path.display())]
    Parse { path: PathBuf, source: rcgen::Error },
    #[error("generating a key: {0}")]
    Generate(rcgen::Error),
    #[error("making a certificate from the key: {0}")]
    Certificate(rcgen::Error),
}

/// A private key and the self-signed certificate made from it.
pub struct Identity {
    cert: CertificateDer<'static>,
    key_der: Vec<u8>,
    fingerprint: Fingerprint,
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the key itself.
        f.debug_struct("Identity")
            .field("fingerprint", &self.fingerprint)
            .finish()
    }
}

impl Identity {
    /// Generates a new Ed25519 key and writes it to `path` as PKCS#8 PEM, mode 0600. Fails if
    /// anything already exists at `path`.
    pub fn generate(path: &Path) -> Result<Self, KeyError> {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).map_err(KeyError::Generate)?;
        let pem = key.serialize_pem();
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|source| match source.kind() {
                io::ErrorKind::AlreadyExists => KeyError::Exists { path: path.into() },
                _ => KeyError::Write {
                    path: path.into(),
                    source,
                },
            })?;
        file.write_all(pem.as_bytes())
            .and_then(|()| file.sync_all())
            .map_err(|source| KeyError::Write {
                path: path.into(),
                source,
            })?;
        Self::from_key_pair(&key)
    }

    /// Loads the key at `path`, refusing one that group or others may read, as ssh does.
    pub fn load(path: &Path) -> Result<Self, KeyError> {
        let read_err = |source| KeyError::Read {
            path: path.into(),
            source,
        };
        let mode = fs::metadata(path).map_err(read_err)?.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(KeyError::TooOpen {
                path: path.into(),
                mode,
            });
        }
        let pem = fs::read_to_string(path).map_err(read_err)?;
        let key = rcgen::KeyPair::from_pem(&pem).map_err(|source| KeyError::Parse {
            path: path.into(),
            source,
        })?;
        Self::from_key_pair(&key)
    }

    fn from_key_pair(key: &rcgen::KeyPair) -> Result<Self, KeyError> {
        let params = rcgen::CertificateParams::new(vec![CERT_NAME.to_owned()])
            .map_err(KeyError::Certificate)?;
        let cert = params.self_signed(key).map_err(KeyError::Certificate)?;
        Ok(Self {
            cert: cert.der().clone(),
            key_der: key.serialize_der(),
            fingerprint: Fingerprint::of_spki(&key.public_key_der()),
        })
    }

    pub fn fingerprint(&self) -> Fingerprint {
        self.fingerprint
    }

    pub fn certificate(&self) -> CertificateDer<'static> {
        self.cert.clone()
    }

    pub fn private_key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_der.clone()))
    }

    /// A secret for one `purpose`, derived from the private key: the same key gives the same
    /// secret in every process, and no two purposes share one.
    pub fn derive_secret(&self, purpose: &str) -> [u8; 32] {
        let mut hash = Sha256::new();
        hash.update(b"tether derived secret\0");
        hash.update(purpose.as_bytes());
        hash.update([0]);
        hash.update(&self.key_der);
        hash.finalize().into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "tether-identity-{}-{}",
            std::process::id(),
            rand::random::<u64>()
        ));
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn fingerprint_round_trips_through_its_text_form() {
        let fp = Fingerprint::of_spki(b"some key");
        let text = fp.to_string();
        assert!(text.starts_with("SHA256:"));
        assert_eq!(text.len(), "SHA256:".len() + 43);
        assert!(!text.ends_with('='));
        assert_eq!(text.parse::<Fingerprint>(), Ok(fp));
    }

    #[test]
    fn malformed_fingerprints_are_refused() {
        let good = Fingerprint::of_spki(b"k").to_string();
        for bad in [
            "",
            "SHA256:",
            &good["SHA256:".len()..],
            &good.replace("SHA256:", "MD5:"),
            &format!("{good}="),
            &good[..good.len() - 1],
            "SHA256:!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!",
        ] {
            assert_eq!(bad.parse::<Fingerprint>(), Err(BadFingerprint), "{bad:?}");
        }
    }

    #[test]
    fn generated_key_is_private_and_loads_with_the_same_fingerprint() {
        let dir = temp_dir();
        let path = dir.join("test.key");
        let made = Identity::generate(&path).unwrap();
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let loaded = Identity::load(&path).unwrap();
        assert_eq!(made.fingerprint(), loaded.fingerprint());
        let from_cert = Fingerprint::of_certificate(&loaded.certificate()).unwrap();
        assert_eq!(from_cert, loaded.fingerprint());
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn derived_secrets_follow_the_key_and_the_purpose() {
        let dir = temp_dir();
        let path = dir.join("test.key");
        let made = Identity::generate(&path).unwrap();
        let loaded = Identity::load(&path).unwrap();
        let other = Identity::generate(&dir.join("other.key")).unwrap();
        let secret = made.derive_secret("a");
        assert_eq!(loaded.derive_secret("a"), secret);
        assert_ne!(made.derive_secret("b"), secret);
        assert_ne!(other.derive_secret("a"), secret);
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn generate_never_overwrites() {
        let dir = temp_dir();
        let path = dir.join("test.key");
        fs::write(&path, "precious").unwrap();
        let err = Identity::generate(&path).unwrap_err();
        assert!(matches!(err, KeyError::Exists { .. }), "{err}");
        assert_eq!(fs::read_to_string(&path).unwrap(), "precious");
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn key_readable_by_others_is_refused() {
        let dir = temp_dir();
        let path = dir.join("test.key");
        Identity::generate(&path).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        let err = Identity::load(&path).unwrap_err().to_string();
        assert!(err.contains("permissions 0644 are too open"), "{err}");
        assert!(err.contains("chmod 600"), "{err}");
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn garbage_key_file_is_refused_with_its_path() {
        let dir = temp_dir();
        let path = dir.join("test.key");
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .unwrap()
            .write_all(b"not a key")
            .unwrap();
        let err = Identity::load(&path).unwrap_err().to_string();
        assert!(
            err.contains("test.key: not a PKCS#8 PEM private key"),
            "{err}"
        );
        fs::remove_dir_all(dir).unwrap();
    }
}
