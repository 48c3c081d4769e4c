//! Enrollment by invite: the one line that `tether-relay invite` prints and `tether-agent join`
//! takes, the one-time secret in it, and the two messages of a join.
//!
//! The line, `tether://HOST:PORT/#FINGERPRINT.SECRET` (with `?tcp=PORT` when the relay's TCP
//! listener has another port), names the relay and the key it must show, so that the agent pins
//! the relay from its first packet, as if `relay_fingerprint` had been pasted; the secret shows
//! the relay that whoever joins was invited. The relay keeps only the secret's SHA-256
//! ([`SecretHash`]) and compares in constant time.
//!
//! A join is a session of its own, ALPN [`tls::ALPN_JOIN`], on either path: the agent shows its
//! new key in the mutual TLS handshake (which proves that it holds it), sends a [`JoinRequest`]
//! on one stream and reads the [`JoinAnswer`]. The relay completes such a handshake from a key
//! it does not list only while an invite is pending, and such a session may do nothing else.
//!
//! [`tls::ALPN_JOIN`]: crate::trust::tls::ALPN_JOIN

use std::fmt;
use std::str::FromStr;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::config::HostPort;
use crate::trust::identity::Fingerprint;

/// The scheme of a join line.
const SCHEME: &str = "tether://";

/// Random bytes in a secret: 128 bits, out of reach of guessing at any rate a relay lets through.
pub const SECRET_BYTES: usize = 16;

/// The version of the join messages.
pub const JOIN_VERSION: u32 = 1;

/// The largest join message either side reads.
pub const MAX_JOIN_MESSAGE: usize = 4096;

/// An invite's one-time secret.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret([u8; SECRET_BYTES]);

impl Secret {
    /// A new secret from the system's secure random source.
    pub fn generate() -> Self {
        use ring::rand::SecureRandom;
        let mut bytes = [0; SECRET_BYTES];
        ring::rand::SystemRandom::new()
            .fill(&mut bytes)
            .expect("the system's random source");
        Self(bytes)
    }

    pub fn hash(&self) -> SecretHash {
        SecretHash(Sha256::digest(self.0).into())
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&URL_SAFE_NO_PAD.encode(self.0))
    }
}

/// Never shown in a log by mistake.
impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(..)")
    }
}

impl FromStr for Secret {
    type Err = ();

    fn from_str(s: &str) -> Result<Self, ()> {
        let bytes = URL_SAFE_NO_PAD.decode(s).map_err(|_| ())?;
        Ok(Self(bytes.try_into().map_err(|_| ())?))
    }
}

/// What the relay keeps of a secret: its SHA-256.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct SecretHash([u8; 32]);

impl SecretHash {
    /// Whether `self` and `other` are the same, in a time that does not depend on where they
    /// differ.
    pub fn matches(&self, other: &SecretHash) -> bool {
        let differ = self
            .0
            .iter()
            .zip(other.0.iter())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b));
        std::hint::black_box(differ) == 0
    }
}

impl fmt::Display for SecretHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&URL_SAFE_NO_PAD.encode(self.0))
    }
}

impl fmt::Debug for SecretHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretHash({self})")
    }
}

impl FromStr for SecretHash {
    type Err = ();

    fn from_str(s: &str) -> Result<Self, ()> {
        let bytes = URL_SAFE_NO_PAD.decode(s).map_err(|_| ())?;
        Ok(Self(bytes.try_into().map_err(|_| ())?))
    }
}

/// A join line: where the relay is, the key it shows, and the invite's secret.
#[derive(Clone, PartialEq, Eq)]
pub struct JoinLine {
    pub relay: HostPort,
    /// The port of the relay's TCP listener, when it is not `relay`'s.
    pub tcp_port: Option<u16>,
    pub fingerprint: Fingerprint,
    pub secret: Secret,
}

impl fmt::Debug for JoinLine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JoinLine")
            .field("relay", &self.relay)
            .field("tcp_port", &self.tcp_port)
            .field("fingerprint", &self.fingerprint)
            .finish_non_exhaustive()
    }
}

impl fmt::Display for JoinLine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{SCHEME}{}/", self.relay)?;
        if let Some(port) = self.tcp_port {
            write!(f, "?tcp={port}")?;
        }
        write!(f, "#{}.{}", self.fingerprint, self.secret)
    }
}

/// What is wrong with a join line, in words for the person who pasted it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadJoinLine {
    #[error("expected a line that starts with tether:// (as `tether-relay invite` prints it)")]
    Scheme,
    #[error("expected tether://HOST:PORT/ before the '#'")]
    Relay,
    #[error("expected ?tcp=PORT after the relay's address")]
    TcpPort,
    #[error("expected the relay's key after the '#': SHA256: and 43 base64 characters")]
    Fingerprint,
    #[error("expected the invite's secret after the key and a '.': was the line cut short?")]
    Secret,
}

impl FromStr for JoinLine {
    type Err = BadJoinLine;

    fn from_str(s: &str) -> Result<Self, BadJoinLine> {
        let rest = s.trim().strip_prefix(SCHEME).ok_or(BadJoinLine::Scheme)?;
        let (before, after) = rest.split_once('#').ok_or(BadJoinLine::Fingerprint)?;
        let (address, query) = before.split_once('/').ok_or(BadJoinLine::Relay)?;
        let relay: HostPort = address.parse().map_err(|_| BadJoinLine::Relay)?;
        let tcp_port = match query {
            "" => None,
            query => {
                let port = query.strip_prefix("?tcp=").ok_or(BadJoinLine::TcpPort)?;
                Some(
                    port.parse::<u16>()
                        .ok()
                        .filter(|p| *p != 0)
                        .ok_or(BadJoinLine::TcpPort)?,
                )
            }
        };
        // The fingerprint's base64 has no '.', so the last one separates the secret.
        let (fingerprint, secret) = after.rsplit_once('.').ok_or(BadJoinLine::Secret)?;
        Ok(Self {
            relay,
            tcp_port,
            fingerprint: fingerprint.parse().map_err(|_| BadJoinLine::Fingerprint)?,
            secret: secret.parse().map_err(|_| BadJoinLine::Secret)?,
        })
    }
}

/// The agent's one message: the secret, in the form the line has it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JoinRequest {
    pub version: u32,
    pub secret: String,
}

/// The relay's one answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JoinAnswer {
    /// Listed in relay.toml under `name`, allowed `ports` (such as "2222/tcp").
    Joined {
        name: String,
        ports: Vec<String>,
    },
    Refused {
        reason: Refusal,
        message: String,
    },
}

/// Why a join was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Refusal {
    /// No invite has this secret, and none had lately.
    Unknown,
    Used,
    Expired,
    Revoked,
    /// Too many wrong secrets lately, from this address or from everyone.
    TooManyTries,
    /// The key is listed already: it needs no invite.
    AlreadyListed,
    /// The relay could not list the agent (relay.toml not written, or not loaded).
    NotListed,
    /// Another version of the messages.
    Version,
}

impl Refusal {
    /// What the person at the agent's end should know and do.
    pub fn explain(self) -> &'static str {
        match self {
            Refusal::Unknown => {
                "the relay has no invite with this secret; ask for a new line with `tether-relay invite`"
            }
            Refusal::Used => "this invite was used already; an invite lets one agent join, once",
            Refusal::Expired => "this invite expired; ask for a new line with `tether-relay invite`",
            Refusal::Revoked => "this invite was revoked on the relay",
            Refusal::TooManyTries => {
                "the relay refuses joins for a while after too many wrong secrets; try again later"
            }
            Refusal::AlreadyListed => "the relay lists this agent's key already; no invite is needed",
            Refusal::NotListed => "the relay could not list this agent",
            Refusal::Version => "the relay speaks another version of joining; update both ends",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FP: &str = "SHA256:47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU";

    fn line() -> JoinLine {
        JoinLine {
            relay: "vps.example.com:4433".parse().unwrap(),
            tcp_port: None,
            fingerprint: FP.parse().unwrap(),
            secret: Secret::generate(),
        }
    }

    #[test]
    fn a_line_reads_back_as_written() {
        let mut line = line();
        let text = line.to_string();
        assert!(text.starts_with(&format!("tether://vps.example.com:4433/#{FP}.")));
        assert_eq!(text.parse::<JoinLine>().unwrap(), line);
        line.tcp_port = Some(443);
        line.relay = "[2001:db8::1]:4433".parse().unwrap();
        let text = line.to_string();
        assert!(text.starts_with("tether://[2001:db8::1]:4433/?tcp=443#SHA256:"));
        assert_eq!(text.parse::<JoinLine>().unwrap(), line);
        // As pasted with the shell's quotes' spaces or a newline around it.
        assert_eq!(format!(" {text}\n").parse::<JoinLine>().unwrap(), line);
    }

    #[test]
    fn a_broken_line_says_what_is_missing() {
        let good = line().to_string();
        let cases = [
            ("https://vps.example.com:4433/", BadJoinLine::Scheme),
            ("tether://vps.example.com/#x.y", BadJoinLine::Relay),
            ("tether://vps.example.com:4433", BadJoinLine::Fingerprint),
            (
                "tether://vps.example.com:4433/?udp=1#x.y",
                BadJoinLine::TcpPort,
            ),
            (
                "tether://vps.example.com:4433/?tcp=0#x.y",
                BadJoinLine::TcpPort,
            ),
            (
                "tether://vps.example.com:4433/#SHA256:abc.y",
                BadJoinLine::Fingerprint,
            ),
            (&good[..good.len() - 3], BadJoinLine::Secret),
            (
                good.rsplit_once('.').map(|(a, _)| a).unwrap(),
                BadJoinLine::Secret,
            ),
        ];
        for (text, expected) in cases {
            assert_eq!(text.parse::<JoinLine>().unwrap_err(), expected, "{text}");
        }
    }

    #[test]
    fn secrets_are_random_and_only_their_hash_matches() {
        let (a, b) = (Secret::generate(), Secret::generate());
        assert_ne!(a, b);
        assert!(a.hash().matches(&a.hash()));
        assert!(!a.hash().matches(&b.hash()));
        let hash = a.hash().to_string();
        assert_eq!(hash.parse::<SecretHash>().unwrap(), a.hash());
        assert_eq!(a.to_string().parse::<Secret>().unwrap(), a);
        assert!(!format!("{a:?}").contains(&a.to_string()));
    }

    #[test]
    fn answers_read_back() {
        let answers = [
            JoinAnswer::Joined {
                name: "dorm".into(),
                ports: vec!["2222/tcp".into()],
            },
            JoinAnswer::Refused {
                reason: Refusal::Expired,
                message: Refusal::Expired.explain().into(),
            },
        ];
        for answer in answers {
            let text = serde_json::to_string(&answer).unwrap();
            assert_eq!(serde_json::from_str::<JoinAnswer>(&text).unwrap(), answer);
        }
    }
}
