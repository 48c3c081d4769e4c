//! An agent's live session as the public ports see it: where each port's visitors go (its
//! routes, with each forward's door and counters), its UDP flows, its held streams and the
//! confirmations to send. The table of agents publishes it; visitors and flows use it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use tether_common::carry::resume::{AckQueue, HeldStreams};
use tether_common::carry::traffic::ForwardTraffic;
use tether_common::net::ports::Proto;
use tether_common::transport::Path;
use tether_common::wire::datagram::DatagramSender;
use tether_common::wire::protocol::{ForwardId, SessionId, StreamId};
use tokio::net::UdpSocket;
use tokio::sync::watch;

use crate::admission::Admission;
use crate::flows::SessionFlows;

/// Which forward serves each public port.
pub type Routes = HashMap<(Proto, u16), Route>;

/// One authenticated session, as visitors need it.
pub struct LiveSession {
    pub id: SessionId,
    pub conn: quinn::Connection,
    /// UDP or TCP.
    pub path: Path,
    /// Replaced as a whole when the agent updates its forwards.
    pub(crate) routes: RwLock<Arc<Routes>>,
    /// The flows of the session's UDP forwards; a resumed session goes on with the lost one's.
    pub flows: Arc<SessionFlows>,
    pub datagrams: DatagramSender,
    pub(crate) next_stream: Arc<AtomicU64>,
    /// The agent's visitor connections, held across its sessions.
    pub streams: Arc<HeldStreams>,
    /// The received offsets of the session's data streams, to confirm to the agent.
    pub acks: Arc<AckQueue>,
}

impl LiveSession {
    pub fn next_stream_id(&self) -> StreamId {
        self.next_stream.fetch_add(1, Ordering::Relaxed)
    }

    /// Which forward serves each public port now.
    pub fn routes(&self) -> Arc<Routes> {
        self.routes
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub(crate) fn set_routes(&self, routes: Routes) {
        *self.routes.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(routes);
    }
}

#[derive(Clone)]
pub struct Route {
    pub forward: ForwardId,
    pub name: Arc<str>,
    /// What the forward carried, since the relay started.
    pub traffic: Arc<ForwardTraffic>,
    /// Which visitors may reach the forward, and how many at once.
    pub admission: Arc<Admission>,
    /// A UDP port's socket, where answers to its visitors leave from.
    pub udp: Option<Arc<UdpSocket>>,
}

/// What listeners watch: the agent's live session, `None` while it is away.
pub type SessionWatch = watch::Receiver<Option<Arc<LiveSession>>>;
