//! What every task of the relay shares: the config it started with and the agents a reload
//! lists now, the table of agents, the tasks and the token that ends them, and the counters and
//! places that every public port uses.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use tether_common::config::{AgentEntry, RelayConfig};
use tether_common::net::ports::Proto;
use tether_common::service::fdstore::Store;
use tether_common::trust::identity::Fingerprint;
use tether_common::trust::tls::AgentPins;
use tether_common::wire::datagram::UdpCounters;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::agents::Table;
use crate::audit::Audit;
use crate::handover::HandOver;
use crate::invites::Invites;
use crate::limits::Limits;
use crate::places::Seats;
use crate::public::Kept;
use crate::tally::Tally;

/// What every task of the relay shares.
pub struct Shared {
    /// The config the relay started with; its agents are [`Shared::agents`], which a reload
    /// replaces.
    pub config: RelayConfig,
    pub(crate) agents: RwLock<Arc<[AgentEntry]>>,
    pub(crate) pins: Arc<AgentPins>,
    /// Invites pending, for agents that join.
    pub(crate) invites: Invites,
    pub limits: Limits,
    pub(crate) table: Mutex<Table>,
    pub tasks: TaskTracker,
    /// Cancelled when the relay drains: listeners close, sessions end.
    pub shutdown: CancellationToken,
    pub udp: Arc<UdpCounters>,
    pub refused_visitors: Tally,
    /// Visitor TCP connections open now, all forwards together.
    pub visitors: Arc<Seats>,
    /// Who connected, for the log.
    pub audit: Audit,
    pub refused_handshakes: Arc<Tally>,
    /// Where visitor connections go when the relay restarts and keeps them.
    pub hand_over: HandOver,
    /// Public ports' sockets the previous process left, until the agent that held each one
    /// asks for it again (see `handover`).
    pub(crate) adopted_ports: Mutex<HashMap<(Proto, SocketAddr), (String, OwnedFd)>>,
    /// systemd's store of descriptors, under systemd with room for them; `None` elsewhere.
    pub store: Option<Arc<Store>>,
}

impl Shared {
    pub fn table(&self) -> MutexGuard<'_, Table> {
        // A panic while holding the lock leaves the table as consistent as any step left it.
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The agents the relay serves now.
    pub fn agents(&self) -> Arc<[AgentEntry]> {
        self.agents
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Has systemd keep a copy of a socket the relay just bound, under `name`, for as long
    /// as the returned `Kept` is held; `adopted`: a socket the previous process left, which
    /// systemd keeps already. `None` outside systemd, or if systemd cannot take it.
    pub fn keep(&self, name: String, socket: BorrowedFd<'_>, adopted: bool) -> Option<Kept> {
        Kept::keep(self.store.as_ref(), name, socket, adopted)
    }

    /// Closes the sockets the previous process left that were not taken again, and has
    /// systemd forget them.
    pub fn release_adopted(&self) {
        let left =
            std::mem::take(&mut *self.adopted_ports.lock().unwrap_or_else(|e| e.into_inner()));
        for (name, _) in left.into_values() {
            if let Some(store) = &self.store {
                let _ = store.forget(&name);
            }
        }
    }

    /// The socket of public `port` that the previous process left, if it is bound where this
    /// relay's `public_bind` says.
    pub fn adopted_port(&self, proto: Proto, port: u16) -> Option<socket2::Socket> {
        let mut adopted = self.adopted_ports.lock().unwrap_or_else(|e| e.into_inner());
        let here = |address: &SocketAddr| {
            address.port() == port
                && match self.config.public_bind {
                    Some(bind) => bind.to_canonical() == address.ip(),
                    None => address.ip().is_unspecified(),
                }
        };
        let key = *adopted
            .keys()
            .find(|(p, address)| *p == proto && here(address))?;
        let (_, fd) = adopted.remove(&key)?;
        let socket = socket2::Socket::from(fd);
        socket.set_nonblocking(true).ok()?;
        Some(socket)
    }

    /// The listed agent with this key, if any.
    pub fn agent_with(&self, fingerprint: Fingerprint) -> Option<AgentEntry> {
        self.agents()
            .iter()
            .find(|a| a.fingerprint == fingerprint)
            .cloned()
    }
}
