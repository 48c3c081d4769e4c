//! Restarting the relay without dropping anyone's connection: the old process hands its
//! public ports and visitor connections to the next one through systemd.
//!
//! Asked to restart (`RestartKillSignal=SIGUSR2` in the unit: `systemctl restart`, a package's
//! upgrade), the relay stops accepting, freezes every visitor connection where it is (the
//! splice stops between two reads and two writes, touching neither the connection nor its
//! stream), closes each agent's session with [`CloseCode::RelayRestart`] (the agent holds its
//! connections and reconnects at once), hands its own sockets (where agents connect, so that
//! their first packets after the goodbye wait there for the next process), its public ports
//! and its visitor connections to systemd's descriptor store, writes what each stream was in a
//! state file beside the status socket ([`state`]), and exits. A stop (`SIGTERM`) drains as
//! before.
//!
//! The next process takes the sockets back ([`adopt`]), reads the state file once and deletes
//! it, asks systemd to forget the sockets (so that a connection it closes is closed), and puts
//! each agent back as if its session had just been lost: its ports listening on the same
//! sockets, its visitors held for the resume window. The agent's next Hello names the session
//! the old process closed, and every stream resumes from the offsets both sides kept.
//!
//! Listening sockets (the relay's own, where agents connect, and each public port's) go to the
//! store as they open, under a name of their own, and out of it as they close: a crash closes
//! the visitor connections, but the ports keep listening, and a visitor who connects while the
//! relay is down waits in the port's queue for the next process.
//!
//! Nothing is taken on trust: a state file that another relay wrote, that is changed, cut,
//! too old or of another format is refused whole, with a log line saying why, and the visitor
//! connections that came with it are closed (listening sockets carry nothing of a connection
//! and stay: a port systemd still held could not be bound again at once); a connection that no
//! stream names, or a stream whose socket did not come, is closed; an agent no longer listed
//! gets nothing back. What is restored takes the same places and room as on a running relay.
//!
//! [`CloseCode::RelayRestart`]: tether_common::wire::protocol::CloseCode::RelayRestart

pub mod state;

use std::collections::HashMap;
use std::io::{self, Write};
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use socket2::SockRef;
use tether_common::carry::resume::Snapshot;
use tether_common::net::ports::Proto;
use tether_common::service::fdstore::Store;
use tokio_util::sync::CancellationToken;

pub use state::{AgentState, State, StateError, StreamState};

/// The name the visitor connections of a restart are kept under in systemd's store (the
/// listening sockets have names of their own: see [`LISTEN_UDP`]).
pub const FD_NAME: &str = "tether-relay";

/// The names the relay's own sockets are kept under in systemd's store while it runs: where
/// agents connect over UDP and over TCP. Public ports are kept under their own
/// (`public::kept_name`). Kept from the moment they are bound, these outlive even a crash.
pub const LISTEN_UDP: &str = "listen-udp";
pub const LISTEN_TCP: &str = "listen-tcp";

/// systemd's store of descriptors for this service, or why there is none: not started by
/// systemd, a unit that keeps no descriptors, or a notify socket that cannot be used.
pub fn systemd_store() -> Result<std::sync::Arc<Store>, String> {
    if std::env::var("FDSTORE").is_ok_and(|max| max.trim() == "0") {
        return Err("the unit keeps no descriptors (FileDescriptorStoreMax=0)".into());
    }
    match Store::from_env() {
        Some(Ok(store)) => Ok(std::sync::Arc::new(store)),
        Some(Err(error)) => Err(format!("systemd's notify socket cannot be used ({error})")),
        None => Err("no service manager keeps descriptors here (not started by systemd)".into()),
    }
}

/// The state file's name, in the folder of the status socket (the unit's runtime directory).
const STATE_FILE: &str = "handover";

/// Where the state file is for a relay whose status socket is `status_socket`.
pub fn state_path(status_socket: &Path) -> PathBuf {
    status_socket.with_file_name(STATE_FILE)
}

/// The key that signs the state file: the relay's own, for this purpose alone.
pub fn state_key(identity: &tether_common::trust::identity::Identity) -> ring::hmac::Key {
    let secret = identity.derive_secret("relay handover state");
    ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &secret)
}

/// The kernel's id of this boot: a socket never outlives it.
pub fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|id| id.trim().to_owned())
        .unwrap_or_default()
}

/// A visitor connection its task handed over, with its stream as it stood.
pub struct Handed {
    pub tcp: std::net::TcpStream,
    pub snapshot: Snapshot,
}

/// Where the relay's tasks hand their connections when the relay restarts.
#[derive(Default)]
pub struct HandOver {
    /// Set when the relay is asked to restart (SIGUSR2): its stop hands over, if it can,
    /// rather than drains.
    requested: AtomicBool,
    /// Cancelled when the relay hands its connections over rather than drains.
    pub token: CancellationToken,
    handed: Mutex<Vec<Handed>>,
}

impl HandOver {
    /// Asks the relay's next stop to hand its connections over.
    pub fn request(&self) {
        self.requested.store(true, Ordering::Release);
    }

    /// Whether the relay was asked to restart.
    pub fn is_requested(&self) -> bool {
        self.requested.load(Ordering::Acquire)
    }

    /// Keeps a visitor connection, frozen with its stream, for the next process.
    pub fn give(&self, tcp: tokio::net::TcpStream, snapshot: Snapshot) {
        match tcp.into_std() {
            Ok(tcp) => self.lock().push(Handed { tcp, snapshot }),
            Err(error) => tracing::warn!(%error, "cannot hand a visitor connection over"),
        }
    }

    /// Every connection handed over so far.
    pub fn take(&self) -> Vec<Handed> {
        std::mem::take(&mut *self.lock())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Handed>> {
        self.handed.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// What one hand-over took: for the log, and for the tests.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    pub agents: usize,
    pub ports: usize,
    pub connections: usize,
}

/// Hands `sockets` to systemd and writes `state` where the next process finds it. The sockets
/// go first: a state file always has its sockets in the store, while sockets without a state
/// file are closed by the next process.
pub fn keep(
    store: &Store,
    sockets: &[OwnedFd],
    state: &State,
    key: &ring::hmac::Key,
    path: &Path,
) -> io::Result<()> {
    let borrowed: Vec<_> = sockets.iter().map(AsFd::as_fd).collect();
    store.keep(FD_NAME, &borrowed)?;
    write_private(path, &state.encode(key))
}

/// Writes `bytes` to `path` through a new file readable by this user alone, renamed over
/// whatever was there.
fn write_private(path: &Path, bytes: &[u8]) -> io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let partial = path.with_extension("partial");
    let _ = std::fs::remove_file(&partial);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&partial)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&partial, path)
}

/// What the previous process left: its sockets by what they are, and its state if it holds.
#[derive(Default)]
pub struct Adopted {
    /// Sockets that listen (TCP) or are bound (UDP), by protocol and address: the relay's own
    /// (where agents connect) and its public ports'. Kept whether the state holds or not: they
    /// carry nothing of a connection, and a port systemd still holds could not be bound again
    /// until it let go.
    /// Each with the name systemd keeps it under.
    pub ports: HashMap<(Proto, SocketAddr), (String, OwnedFd)>,
    /// Visitor connections, by (the relay's end, the visitor's end).
    pub connections: HashMap<(SocketAddr, SocketAddr), std::net::TcpStream>,
    pub state: Option<State>,
}

impl Adopted {
    /// The socket bound at `address`, if one was left.
    pub fn take(&mut self, proto: Proto, address: SocketAddr) -> Option<OwnedFd> {
        let (_, fd) = self.ports.remove(&(proto, canonical(address)))?;
        Some(fd)
    }
}

/// Takes over what the previous process left: the sockets systemd handed this one (`passed`)
/// and the state file at `path`, read once and deleted. A state that does not hold is logged
/// and everything that came with it is closed. `agents` is how many agents the relay lists
/// (it bounds the state), `max_age` how old a state may be (the resume window: past it, the
/// agents gave up on their connections).
pub fn adopt(
    passed: Vec<(String, OwnedFd)>,
    path: &Path,
    key: &ring::hmac::Key,
    agents: usize,
    max_age: Duration,
) -> Adopted {
    let mut adopted = Adopted::default();
    for (name, fd) in passed {
        match classify(fd) {
            Ok(Socket::Port(proto, address, fd)) => {
                adopted.ports.insert((proto, address), (name, fd));
            }
            // Connections come with a state, under the hand-over's name.
            Ok(Socket::Connection(ends, tcp)) if name == FD_NAME => {
                adopted.connections.insert(ends, tcp);
            }
            Ok(Socket::Connection(..)) => tracing::warn!(
                name = %tether_common::wire::text::printable(&name),
                "a connection systemd passed under another name than the relay's; closed"
            ),
            Err(why) => tracing::warn!("a descriptor systemd passed is refused: {why}; closed"),
        }
    }
    let closed = |adopted: Adopted| Adopted {
        ports: adopted.ports,
        ..Adopted::default()
    };
    let file = match read_once(path, State::max_len(agents)) {
        Ok(file) => file,
        Err(error) => {
            if !adopted.connections.is_empty() {
                tracing::warn!(
                    path = %path.display(),
                    %error,
                    "systemd passed {} visitor connections but the hand-over state cannot be \
                     read; they are closed",
                    adopted.connections.len(),
                );
            }
            return closed(adopted);
        }
    };
    let state = State::decode(&file, key, agents)
        .map_err(|e| e.to_string())
        .and_then(|state| check_fresh(state, max_age));
    match state {
        Ok(state) => adopted.state = Some(state),
        Err(why) => {
            tracing::warn!(
                path = %path.display(),
                "the hand-over state is refused: {why}; the {} visitor connections that came \
                 with it are closed",
                adopted.connections.len(),
            );
            return closed(adopted);
        }
    }
    adopted
}

/// The state, if it was written on this boot and within `max_age`.
fn check_fresh(state: State, max_age: Duration) -> Result<State, String> {
    if state.boot_id != boot_id() {
        return Err("it was written before the machine restarted".into());
    }
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let age = now.saturating_sub(state.written);
    if age > max_age.as_secs() {
        return Err(format!(
            "it was written {age} s ago, past the resume window ({} s)",
            max_age.as_secs()
        ));
    }
    Ok(state)
}

/// The file at `path`, at most `max` bytes, deleted once read: a state is taken over once.
fn read_once(path: &Path, max: usize) -> io::Result<Vec<u8>> {
    use std::io::Read;
    let file = std::fs::File::open(path)?;
    let _ = std::fs::remove_file(path);
    let mut bytes = Vec::new();
    file.take(max as u64 + 1).read_to_end(&mut bytes)?;
    Ok(bytes)
}

enum Socket {
    Port(Proto, SocketAddr, OwnedFd),
    Connection((SocketAddr, SocketAddr), std::net::TcpStream),
}

/// What a passed descriptor is: a public port's socket, a visitor connection, or nothing the
/// relay uses.
fn classify(fd: OwnedFd) -> Result<Socket, String> {
    let socket = SockRef::from(&fd);
    let kind = socket
        .r#type()
        .map_err(|e| format!("it is not a socket ({e})"))?;
    let local = socket
        .local_addr()
        .ok()
        .and_then(|a| a.as_socket())
        .ok_or("it is not an IP socket")?;
    let local = canonical(local);
    if kind == socket2::Type::DGRAM {
        return Ok(Socket::Port(Proto::Udp, local, fd));
    }
    if kind != socket2::Type::STREAM {
        return Err(format!("a socket of another type ({kind:?})"));
    }
    if socket.is_listener().unwrap_or(false) {
        return Ok(Socket::Port(Proto::Tcp, local, fd));
    }
    let peer = socket
        .peer_addr()
        .ok()
        .and_then(|a| a.as_socket())
        .ok_or("a TCP socket neither listening nor connected")?;
    Ok(Socket::Connection(
        (local, canonical(peer)),
        std::net::TcpStream::from(fd),
    ))
}

/// `address` with an IPv4 address mapped into IPv6 written as IPv4, as visitors are named.
pub fn canonical(address: SocketAddr) -> SocketAddr {
    SocketAddr::new(address.ip().to_canonical(), address.port())
}
