//! Invites: what `tether-relay invite` makes, pending until an agent joins with its secret, and
//! the join itself (see [`tether_common::trust::invite`] for the line and the messages).
//!
//! Who writes relay.toml: not the running relay. The hardened unit cannot (ProtectSystem=strict,
//! DynamicUser), and the file is root's. So `tether-relay invite`, run by root, hands the
//! invite (the secret's hash, never the secret) to the running relay over the status socket,
//! which answers root and the service alone, and waits on that connection. When an agent joins
//! with the secret, the relay tells it the agent's key; it writes the `[[agent]]` block into
//! relay.toml, and the relay reads the file again, as a reload does, before it answers the
//! agent. An agent is thus only ever listed by relay.toml, and stays listed across restarts;
//! an invite lives as long as its command waits, and Ctrl-C withdraws it.
//!
//! Guessing: wrong secrets (not those of invites that ended lately) are counted per source address (an IPv6 source by its /64) and in
//! all; past [`MISSES_PER_SOURCE`] or [`MISSES_IN_ALL`] within [`MISS_WINDOW`], joins are
//! refused until the count ages. With 128-bit secrets this bounds the log and the work, not the
//! odds, which were out of reach already. Unlisted keys complete a handshake only while an
//! invite is pending, and at most [`MAX_JOINING`] such sessions are open at once.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};
use tether_common::net::cidr::address_group;
use tether_common::net::ports::PortSpec;
use tether_common::service::status_socket::Handler;
use tether_common::trust::identity::Fingerprint;
use tether_common::trust::invite::{
    JoinAnswer, JoinRequest, Refusal, SecretHash, JOIN_VERSION, MAX_JOIN_MESSAGE,
};
use tether_common::trust::tls::{self, AgentPins};
use tether_common::wire::text;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::sync::{oneshot, Semaphore};

use crate::shared::Shared;

/// Invites pending at once, at most.
pub const MAX_PENDING: usize = 64;

/// The longest an invite may last.
pub const MAX_EXPIRES: Duration = Duration::from_secs(7 * 24 * 3600);

/// Wrong secrets one source may send within [`MISS_WINDOW`] before its joins are refused.
pub const MISSES_PER_SOURCE: usize = 5;

/// Wrong secrets from everyone within [`MISS_WINDOW`] before every join is refused.
pub const MISSES_IN_ALL: usize = 60;

pub const MISS_WINDOW: Duration = Duration::from_secs(600);

/// Join sessions open at once, at most; more are closed at once.
pub const MAX_JOINING: usize = 16;

/// How long a joining agent has to send its request.
pub const JOIN_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// How long the relay waits for `invite` to write relay.toml, and itself to load it.
pub const LIST_TIMEOUT: Duration = Duration::from_secs(30);

/// Ended invites remembered, to tell a late joiner why its secret no longer works.
const ENDED_KEPT: usize = 256;

/// What `tether-relay invite` asks of the running relay.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InviteRequest {
    pub name: String,
    /// Such as "2222/tcp".
    pub ports: Vec<String>,
    /// The secret's [`SecretHash`].
    pub hash: String,
    pub expires_in_secs: u64,
}

/// What the relay says to a waiting `invite`, one JSON line each.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Said {
    /// Pending, under this id.
    Invited {
        id: String,
    },
    /// An agent joined with the secret: list it in relay.toml, then answer [`Wrote`].
    Joined {
        fingerprint: String,
        address: String,
    },
    /// relay.toml loaded, with the agent in it: the agent was told it joined.
    Listed,
    Expired,
    Revoked,
    Error {
        message: String,
    },
}

/// `invite`'s answer to [`Said::Joined`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Wrote {
    Written,
    Failed { message: String },
}

/// One pending invite, as `tether-relay invites` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InviteInfo {
    pub id: String,
    pub name: String,
    pub ports: Vec<String>,
    /// RFC 3339.
    pub expires: String,
}

/// How an invite ended, told to the `invite` command that waits for it.
pub enum Ended {
    Joined {
        fingerprint: Fingerprint,
        address: SocketAddr,
        /// Answered once relay.toml lists the agent, or with why not.
        listed: oneshot::Sender<Result<(), String>>,
    },
    Revoked,
}

/// An invite an agent joined with: its name and ports, and what answers once relay.toml lists
/// the agent (or says why not).
#[derive(Debug)]
pub struct Taken {
    pub name: String,
    pub ports: Vec<String>,
    pub listed: oneshot::Receiver<Result<(), String>>,
}

/// The invites pending now, and what guessing cost lately.
pub struct Invites {
    table: Mutex<Table>,
    pins: Arc<AgentPins>,
    joining: Arc<Semaphore>,
}

#[derive(Default)]
struct Table {
    pending: Vec<Pending>,
    ended: VecDeque<(SecretHash, Refusal)>,
    misses: HashMap<IpAddr, VecDeque<Instant>>,
    all_misses: VecDeque<Instant>,
}

struct Pending {
    id: String,
    name: String,
    ports: Vec<String>,
    hash: SecretHash,
    deadline: Instant,
    expires: SystemTime,
    ended: Option<oneshot::Sender<Ended>>,
}

impl Invites {
    pub fn new(pins: Arc<AgentPins>) -> Self {
        Self {
            table: Mutex::default(),
            pins,
            joining: Arc::new(Semaphore::new(MAX_JOINING)),
        }
    }

    fn table(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Unlisted keys complete their handshake while, and only while, an invite is pending.
    fn update_pins(&self, table: &Table) {
        self.pins.set_inviting(!table.pending.is_empty());
    }

    /// Makes an invite pending; `listed` are the names relay.toml lists now. Returns its id, its
    /// deadline, and what ends it.
    pub fn add(
        &self,
        request: &InviteRequest,
        listed: &[String],
        now: Instant,
    ) -> Result<(String, Instant, oneshot::Receiver<Ended>), String> {
        if !tether_common::wire::protocol::is_valid_name(&request.name) {
            return Err(format!(
                "{:?} is not a valid agent name (letters, digits, '-', '_', '.')",
                text::printable(&request.name)
            ));
        }
        if listed.contains(&request.name) {
            return Err(format!(
                "relay.toml lists an agent named {} already",
                request.name
            ));
        }
        if request.ports.is_empty() {
            return Err("an invite needs at least one port, such as 2222/tcp".into());
        }
        for port in &request.ports {
            if port.parse::<PortSpec>().is_err() {
                return Err(format!(
                    "{:?}: expected PORT/tcp, PORT/udp or FIRST-LAST/udp",
                    text::printable(port)
                ));
            }
        }
        let Ok(hash) = request.hash.parse::<SecretHash>() else {
            return Err("the invite's hash is not one".into());
        };
        let expires_in = Duration::from_secs(request.expires_in_secs);
        if expires_in.is_zero() || expires_in > MAX_EXPIRES {
            return Err(format!(
                "an invite lasts from a second to {} days",
                MAX_EXPIRES.as_secs() / 86400
            ));
        }
        let mut table = self.table();
        if table.pending.iter().any(|p| p.name == request.name) {
            return Err(format!(
                "an invite for {} is pending already (tether-relay invites)",
                request.name
            ));
        }
        if table.pending.len() >= MAX_PENDING {
            return Err(format!(
                "{MAX_PENDING} invites are pending; revoke some first (tether-relay invites)"
            ));
        }
        let id = format!("{:08x}", rand::random::<u32>());
        let (tell, ended) = oneshot::channel();
        table.pending.push(Pending {
            id: id.clone(),
            name: request.name.clone(),
            ports: request.ports.clone(),
            hash,
            deadline: now + expires_in,
            expires: SystemTime::now() + expires_in,
            ended: Some(tell),
        });
        self.update_pins(&table);
        Ok((id, now + expires_in, ended))
    }

    /// Ends invite `id` for `why`, if it is still pending; returns whether it was.
    pub fn end(&self, id: &str, why: Refusal) -> bool {
        let mut table = self.table();
        let Some(at) = table.pending.iter().position(|p| p.id == id) else {
            return false;
        };
        let mut pending = table.pending.remove(at);
        table.remember(pending.hash, why);
        self.update_pins(&table);
        if why == Refusal::Revoked {
            if let Some(tell) = pending.ended.take() {
                let _ = tell.send(Ended::Revoked);
            }
        }
        true
    }

    /// The invites pending now.
    pub fn list(&self) -> Vec<InviteInfo> {
        self.table()
            .pending
            .iter()
            .map(|p| InviteInfo {
                id: p.id.clone(),
                name: p.name.clone(),
                ports: p.ports.clone(),
                expires: tether_common::service::report::timestamp(p.expires),
            })
            .collect()
    }

    /// Takes the invite whose secret is `secret`, for `fingerprint` joining from `from`; `listed`:
    /// relay.toml lists that key already. Returns the invite's name and ports, and what answers
    /// once relay.toml lists the agent.
    pub fn take(
        &self,
        secret: &str,
        fingerprint: Fingerprint,
        from: SocketAddr,
        listed: bool,
        now: Instant,
    ) -> Result<Taken, Refusal> {
        let source = address_group(from.ip().to_canonical());
        let mut table = self.table();
        table.forget_misses(now);
        if table.misses.get(&source).map_or(0, VecDeque::len) >= MISSES_PER_SOURCE
            || table.all_misses.len() >= MISSES_IN_ALL
        {
            return Err(Refusal::TooManyTries);
        }
        let hash = secret
            .parse()
            .ok()
            .map(|s: tether_common::trust::invite::Secret| s.hash());
        // Every pending hash is compared, whichever matches.
        let found = hash.and_then(|hash| {
            table
                .pending
                .iter()
                .enumerate()
                .fold(None, |found, (i, p)| {
                    found.or(p.hash.matches(&hash).then_some(i))
                })
        });
        let Some(at) = found else {
            let why = hash
                .and_then(|hash| {
                    table
                        .ended
                        .iter()
                        .find(|(ended, _)| ended.matches(&hash))
                        .map(|(_, why)| *why)
                })
                .unwrap_or(Refusal::Unknown);
            // A secret that once was one is a late join, not a guess.
            if why == Refusal::Unknown {
                table.misses.entry(source).or_default().push_back(now);
                table.all_misses.push_back(now);
            }
            return Err(why);
        };
        if table.pending[at].deadline <= now {
            let pending = table.pending.remove(at);
            table.remember(pending.hash, Refusal::Expired);
            self.update_pins(&table);
            return Err(Refusal::Expired);
        }
        if listed {
            return Err(Refusal::AlreadyListed);
        }
        let mut pending = table.pending.remove(at);
        table.remember(pending.hash, Refusal::Used);
        self.update_pins(&table);
        let (listed, answer) = oneshot::channel();
        let told = pending.ended.take().map(|tell| {
            tell.send(Ended::Joined {
                fingerprint,
                address: from,
                listed,
            })
        });
        if !matches!(told, Some(Ok(()))) {
            // The invite's command is gone: nobody will write relay.toml.
            return Err(Refusal::NotListed);
        }
        Ok(Taken {
            name: pending.name,
            ports: pending.ports,
            listed: answer,
        })
    }

    /// Wrong secrets counted now, from one source and in all (for tests).
    pub fn misses(&self, from: IpAddr) -> (usize, usize) {
        let table = self.table();
        let source = address_group(from.to_canonical());
        (
            table.misses.get(&source).map_or(0, VecDeque::len),
            table.all_misses.len(),
        )
    }
}

impl Table {
    fn remember(&mut self, hash: SecretHash, why: Refusal) {
        if self.ended.len() == ENDED_KEPT {
            self.ended.pop_front();
        }
        self.ended.push_back((hash, why));
    }

    fn forget_misses(&mut self, now: Instant) {
        let old = |at: &Instant| now.saturating_duration_since(*at) >= MISS_WINDOW;
        while self.all_misses.front().is_some_and(old) {
            self.all_misses.pop_front();
        }
        self.misses.retain(|_, misses| {
            while misses.front().is_some_and(old) {
                misses.pop_front();
            }
            !misses.is_empty()
        });
    }
}

/// Serves one join session: reads the request, takes the invite, waits until relay.toml lists
/// the agent, answers.
pub async fn serve_join(shared: Arc<Shared>, conn: quinn::Connection, remote: SocketAddr) {
    let Ok(_seat) = shared.invites.joining.clone().try_acquire_owned() else {
        shared
            .refused_handshakes
            .record("too many joins under way", &remote.ip().to_canonical());
        conn.close(0u32.into(), b"too many joins under way");
        return;
    };
    let Some(fingerprint) = tls::peer_fingerprint(&conn) else {
        conn.close(0u32.into(), b"no key");
        return;
    };
    let read = async {
        let (send, mut recv) = conn.accept_bi().await.ok()?;
        let bytes = recv.read_to_end(MAX_JOIN_MESSAGE).await.ok()?;
        Some((send, serde_json::from_slice::<JoinRequest>(&bytes).ok()?))
    };
    let Ok(Some((mut send, request))) = tokio::time::timeout(JOIN_REQUEST_TIMEOUT, read).await
    else {
        shared.refused_handshakes.record(
            "join without a request in time",
            &remote.ip().to_canonical(),
        );
        conn.close(0u32.into(), b"no join request");
        return;
    };
    // Bounded by LIST_TIMEOUT within.
    let answer = match request.version {
        JOIN_VERSION => join(&shared, &request.secret, fingerprint, remote).await,
        _ => refused(Refusal::Version),
    };
    let write = async {
        let text = serde_json::to_vec(&answer).ok()?;
        send.write_all(&text).await.ok()?;
        send.finish().ok()
    };
    if tokio::time::timeout(JOIN_REQUEST_TIMEOUT, write)
        .await
        .is_err()
    {
        conn.close(0u32.into(), b"answer not read");
        return;
    }
    // The agent closes once it read the answer.
    let _ = tokio::time::timeout(JOIN_REQUEST_TIMEOUT, conn.closed()).await;
}

fn refused(reason: Refusal) -> JoinAnswer {
    JoinAnswer::Refused {
        reason,
        message: reason.explain().into(),
    }
}

async fn join(
    shared: &Shared,
    secret: &str,
    fingerprint: Fingerprint,
    remote: SocketAddr,
) -> JoinAnswer {
    let listed = shared.agent_with(fingerprint).is_some();
    let taken = shared
        .invites
        .take(secret, fingerprint, remote, listed, Instant::now());
    let Taken {
        name,
        ports,
        listed: answer,
    } = match taken {
        Ok(taken) => taken,
        Err(reason) => {
            let label = match reason {
                Refusal::TooManyTries => "join refused: too many wrong secrets",
                Refusal::Unknown => "join refused: no invite has this secret",
                Refusal::Used => "join refused: the invite was used already",
                Refusal::Expired => "join refused: the invite expired",
                Refusal::Revoked => "join refused: the invite was revoked",
                Refusal::AlreadyListed => "join refused: the key is listed already",
                Refusal::NotListed | Refusal::Version => "join refused",
            };
            shared
                .refused_handshakes
                .record(label, &remote.ip().to_canonical());
            return refused(reason);
        }
    };
    match tokio::time::timeout(LIST_TIMEOUT, answer).await {
        Ok(Ok(Ok(()))) => {
            tracing::info!(agent = %name, %fingerprint, %remote, "agent joined with an invite");
            JoinAnswer::Joined { name, ports }
        }
        Ok(Ok(Err(why))) => JoinAnswer::Refused {
            reason: Refusal::NotListed,
            message: format!("the relay could not list this agent: {why}"),
        },
        _ => refused(Refusal::NotListed),
    }
}

/// What answers `invite`, `invites` and `revoke` on the status socket. `reload` reads relay.toml
/// again and applies it, as SIGHUP does.
pub fn handler(
    shared: Arc<Shared>,
    reload: Arc<dyn Fn() -> Result<(), String> + Send + Sync>,
) -> Handler {
    Arc::new(move |request: String, stream: UnixStream| {
        let (shared, reload) = (shared.clone(), reload.clone());
        Box::pin(async move {
            let mut stream = BufReader::new(stream);
            let (verb, rest) = request.split_once(' ').unwrap_or((&request, ""));
            match verb {
                "invite" => invite(&shared, &*reload, rest, &mut stream).await,
                "invites" => {
                    let list = shared.invites.list();
                    let text = serde_json::to_string(&list).unwrap_or_default();
                    let _ = write_line(&mut stream, &text).await;
                }
                "revoke" => {
                    let said = if shared.invites.end(rest.trim(), Refusal::Revoked) {
                        Said::Revoked
                    } else {
                        Said::Error {
                            message: format!(
                                "no pending invite has id {:?} (tether-relay invites lists them)",
                                text::printable(rest.trim())
                            ),
                        }
                    };
                    let _ = say(&mut stream, &said).await;
                }
                _ => {
                    let said = Said::Error {
                        message: format!("unknown request {:?}", text::printable(verb)),
                    };
                    let _ = say(&mut stream, &said).await;
                }
            }
        })
    })
}

async fn write_line(stream: &mut BufReader<UnixStream>, text: &str) -> std::io::Result<()> {
    let stream = stream.get_mut();
    stream.write_all(text.as_bytes()).await?;
    stream.write_all(b"\n").await
}

async fn say(stream: &mut BufReader<UnixStream>, said: &Said) -> std::io::Result<()> {
    write_line(stream, &serde_json::to_string(said).unwrap_or_default()).await
}

/// Serves one `invite` command: makes the invite pending for as long as the command waits.
async fn invite(
    shared: &Shared,
    reload: &(dyn Fn() -> Result<(), String> + Send + Sync),
    request: &str,
    stream: &mut BufReader<UnixStream>,
) {
    let request = match serde_json::from_str::<InviteRequest>(request) {
        Ok(request) => request,
        Err(error) => {
            let message = format!("not an invite request: {error}");
            let _ = say(stream, &Said::Error { message }).await;
            return;
        }
    };
    let listed: Vec<String> = shared.agents().iter().map(|a| a.name.clone()).collect();
    let (id, deadline, ended) = match shared.invites.add(&request, &listed, Instant::now()) {
        Ok(added) => added,
        Err(message) => {
            let _ = say(stream, &Said::Error { message }).await;
            return;
        }
    };
    tracing::info!(invite = %id, agent = %request.name, "invite pending");
    if say(stream, &Said::Invited { id: id.clone() })
        .await
        .is_err()
    {
        shared.invites.end(&id, Refusal::Revoked);
        return;
    }
    // Until it ends: joined, revoked, expired, or the command gone.
    let mut line = String::new();
    let outcome = tokio::select! {
        ended = ended => ended.ok(),
        () = tokio::time::sleep_until(deadline.into()) => {
            shared.invites.end(&id, Refusal::Expired);
            let _ = say(stream, &Said::Expired).await;
            tracing::info!(invite = %id, "invite expired");
            return;
        }
        // Nothing is expected from the command meanwhile: a line or its end withdraws it.
        _ = stream.read_line(&mut line) => {
            shared.invites.end(&id, Refusal::Revoked);
            tracing::info!(invite = %id, "invite withdrawn");
            return;
        }
        () = shared.shutdown.cancelled() => return,
    };
    match outcome {
        Some(Ended::Revoked) => {
            tracing::info!(invite = %id, "invite revoked");
            let _ = say(stream, &Said::Revoked).await;
        }
        Some(Ended::Joined {
            fingerprint,
            address,
            listed,
        }) => {
            let result = list(shared, reload, fingerprint, address, stream).await;
            if let Err(message) = &result {
                let _ = say(
                    stream,
                    &Said::Error {
                        message: message.clone(),
                    },
                )
                .await;
            } else {
                let _ = say(stream, &Said::Listed).await;
            }
            let _ = listed.send(result);
        }
        None => {}
    }
}

/// Asks the waiting command to list the agent in relay.toml, then loads the file.
async fn list(
    shared: &Shared,
    reload: &(dyn Fn() -> Result<(), String> + Send + Sync),
    fingerprint: Fingerprint,
    address: SocketAddr,
    stream: &mut BufReader<UnixStream>,
) -> Result<(), String> {
    let joined = Said::Joined {
        fingerprint: fingerprint.to_string(),
        address: address.to_string(),
    };
    say(stream, &joined)
        .await
        .map_err(|e| format!("the invite command is gone: {e}"))?;
    let mut line = String::new();
    let read = tokio::time::timeout(LIST_TIMEOUT, stream.read_line(&mut line)).await;
    if !matches!(read, Ok(Ok(n)) if n > 0) {
        return Err("the invite command did not write relay.toml".into());
    }
    match serde_json::from_str::<Wrote>(&line) {
        Ok(Wrote::Written) => {}
        Ok(Wrote::Failed { message }) => return Err(message),
        Err(_) => return Err("the invite command's answer is not one".into()),
    }
    reload()?;
    if shared.agent_with(fingerprint).is_none() {
        return Err("relay.toml was written, but the relay does not list the agent".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tether_common::trust::invite::Secret;

    fn invites() -> Invites {
        Invites::new(Arc::new(AgentPins::new([])))
    }

    fn request(name: &str, secret: &Secret) -> InviteRequest {
        InviteRequest {
            name: name.into(),
            ports: vec!["2222/tcp".into(), "60000-60010/udp".into()],
            hash: secret.hash().to_string(),
            expires_in_secs: 3600,
        }
    }

    fn key(n: u8) -> Fingerprint {
        Fingerprint::of_spki(&[n])
    }

    fn from(last: u8) -> SocketAddr {
        SocketAddr::from(([198, 51, 100, last], 4000))
    }

    #[test]
    fn a_secret_joins_once_and_then_says_it_was_used() {
        let (invites, secret, now) = (invites(), Secret::generate(), Instant::now());
        let (_, _, mut ended) = invites.add(&request("dorm", &secret), &[], now).unwrap();
        let taken = invites
            .take(&secret.to_string(), key(1), from(1), false, now)
            .unwrap();
        assert_eq!(taken.name, "dorm");
        assert_eq!(taken.ports, ["2222/tcp", "60000-60010/udp"]);
        assert!(
            matches!(ended.try_recv(), Ok(Ended::Joined { fingerprint, .. }) if fingerprint == key(1))
        );
        assert_eq!(
            invites
                .take(&secret.to_string(), key(2), from(2), false, now)
                .unwrap_err(),
            Refusal::Used
        );
        assert!(invites.list().is_empty());
    }

    #[test]
    fn expired_revoked_unknown_and_listed_are_told_apart() {
        let (invites, now) = (invites(), Instant::now());
        let (a, b, c) = (Secret::generate(), Secret::generate(), Secret::generate());
        let (_, deadline, _a_ended) = invites.add(&request("a", &a), &[], now).unwrap();
        let (id_b, _, _b_ended) = invites.add(&request("b", &b), &[], now).unwrap();
        let (_, _, _c_ended) = invites.add(&request("c", &c), &[], now).unwrap();
        assert_eq!(invites.list().len(), 3);
        assert_eq!(
            invites
                .take(&a.to_string(), key(1), from(1), false, deadline)
                .unwrap_err(),
            Refusal::Expired
        );
        assert!(invites.end(&id_b, Refusal::Revoked));
        assert!(!invites.end(&id_b, Refusal::Revoked));
        assert_eq!(
            invites
                .take(&b.to_string(), key(1), from(1), false, now)
                .unwrap_err(),
            Refusal::Revoked
        );
        assert_eq!(
            invites
                .take(&c.to_string(), key(1), from(1), true, now)
                .unwrap_err(),
            Refusal::AlreadyListed
        );
        // Still pending: a listed key does not use it up.
        assert_eq!(invites.list().len(), 1);
        // Late joins are not guesses.
        assert_eq!(invites.misses(from(1).ip()), (0, 0));
        let stranger = Secret::generate().to_string();
        for guess in [stranger.as_str(), "not even a secret"] {
            assert_eq!(
                invites
                    .take(guess, key(1), from(2), false, now)
                    .unwrap_err(),
                Refusal::Unknown
            );
        }
    }

    #[test]
    fn unlisted_keys_get_a_handshake_only_while_an_invite_is_pending() {
        let (invites, now) = (invites(), Instant::now());
        let (a, b) = (Secret::generate(), Secret::generate());
        assert!(!invites.pins.is_inviting());
        let (id_a, _, _a) = invites.add(&request("a", &a), &[], now).unwrap();
        let (_, _, _b) = invites.add(&request("b", &b), &[], now).unwrap();
        assert!(invites.pins.is_inviting());
        invites.end(&id_a, Refusal::Revoked);
        assert!(invites.pins.is_inviting());
        let _ = invites.take(&b.to_string(), key(1), from(1), false, now);
        assert!(!invites.pins.is_inviting());
    }

    #[test]
    fn guessing_is_refused_per_source_and_in_all_until_the_misses_age() {
        let (invites, now) = (invites(), Instant::now());
        let secret = Secret::generate();
        let (_, _, _ended) = invites.add(&request("dorm", &secret), &[], now).unwrap();
        let guess = || Secret::generate().to_string();
        for _ in 0..MISSES_PER_SOURCE {
            assert_eq!(
                invites
                    .take(&guess(), key(1), from(1), false, now)
                    .unwrap_err(),
                Refusal::Unknown
            );
        }
        // Even the right secret, from that source, until the window passes.
        assert_eq!(
            invites
                .take(&secret.to_string(), key(1), from(1), false, now)
                .unwrap_err(),
            Refusal::TooManyTries
        );
        assert_eq!(
            invites.misses(from(1).ip()),
            (MISSES_PER_SOURCE, MISSES_PER_SOURCE)
        );
        // Many sources together hit the cap in all.
        let mut source = 2u8;
        while invites.misses(from(source).ip()).1 < MISSES_IN_ALL {
            let _ = invites.take(&guess(), key(1), from(source), false, now);
            if invites.misses(from(source).ip()).0 == MISSES_PER_SOURCE {
                source += 1;
            }
        }
        assert_eq!(
            invites
                .take(&secret.to_string(), key(1), from(250), false, now)
                .unwrap_err(),
            Refusal::TooManyTries
        );
        let later = now + MISS_WINDOW;
        assert!(invites
            .take(&secret.to_string(), key(1), from(1), false, later)
            .is_ok());
        assert_eq!(invites.misses(from(1).ip()), (0, 0));
    }

    #[test]
    fn bad_invites_are_refused_with_the_reason() {
        let (invites, now) = (invites(), Instant::now());
        let secret = Secret::generate();
        let listed = ["home".to_string()];
        let mut cases: Vec<(InviteRequest, &str)> = Vec::new();
        cases.push((
            request("home", &secret),
            "lists an agent named home already",
        ));
        cases.push((request("bad name", &secret), "is not a valid agent name"));
        let mut r = request("a", &secret);
        r.ports = vec!["22".into()];
        cases.push((r, "expected PORT/tcp"));
        let mut r = request("a", &secret);
        r.ports.clear();
        cases.push((r, "at least one port"));
        let mut r = request("a", &secret);
        r.expires_in_secs = 0;
        cases.push((r, "an invite lasts"));
        let mut r = request("a", &secret);
        r.hash = "x".into();
        cases.push((r, "hash"));
        for (request, expected) in cases {
            let error = invites.add(&request, &listed, now).err().unwrap();
            assert!(error.contains(expected), "{error}");
        }
        let (_, _, _ended) = invites.add(&request("a", &secret), &listed, now).unwrap();
        let error = invites
            .add(&request("a", &secret), &listed, now)
            .err()
            .unwrap();
        assert!(error.contains("pending already"), "{error}");
    }

    #[test]
    fn pending_invites_are_capped() {
        let (invites, now) = (invites(), Instant::now());
        let mut kept = Vec::new();
        for n in 0..MAX_PENDING {
            kept.push(
                invites
                    .add(&request(&format!("a{n}"), &Secret::generate()), &[], now)
                    .unwrap(),
            );
        }
        let error = invites
            .add(&request("one-more", &Secret::generate()), &[], now)
            .err()
            .unwrap();
        assert!(error.contains("revoke some first"), "{error}");
    }
}
