//! UDP flows on the agent's side. Each flow the relay numbers gets a socket of its own, connected
//! to the local service, so that the service sees one source per visitor and its answers go back
//! to the right one. A flow's socket is opened by its first datagram: the header says which
//! forward and public port it came to, which selects the local port.
//!
//! Datagrams to the service are sent without waiting (a full socket drops one, as a router
//! would); answers are read by one small task per flow. Nothing one flow does delays another.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use socket2::SockRef;
use tether_common::carry::flows::{self, FlowTable};
use tether_common::carry::traffic::ForwardTraffic;
use tether_common::net::ports::{PortRange, Proto};
use tether_common::wire::datagram::UdpCounters;
use tether_common::wire::datagram::{self, DatagramHeader, DatagramSender, DropReason, FlowId};
use tether_common::wire::datagram::{HEADER_LEN, MAX_PAYLOAD};
use tokio::net::UdpSocket;
use tokio_util::task::AbortOnDropHandle;
use tracing::Instrument;

use crate::forwards::Offered;

/// Flows one forward carries at once; a new one evicts the longest idle. Each holds a socket
/// and a 64 KiB receive buffer.
pub const MAX_FLOWS_PER_FORWARD: usize = 256;

/// The UDP flows of one session, and of the sessions that resume it.
pub struct Flows {
    state: Mutex<State>,
    /// The live session's: replaced when a new session resumes the flows.
    datagrams: RwLock<DatagramSender>,
    counters: Arc<UdpCounters>,
}

/// The session's UDP forwards by id, and the flows of each.
#[derive(Default)]
struct State {
    forwards: HashMap<u16, UdpForward>,
    tables: HashMap<u16, FlowTable<FlowId, Flow, ()>>,
}

/// A UDP forward the relay opened, with its local host resolved.
struct UdpForward {
    name: String,
    remote: PortRange,
    local_ip: IpAddr,
    local_ports: PortRange,
    idle: Duration,
    traffic: Arc<ForwardTraffic>,
}

impl UdpForward {
    /// Whether `other` carries the same traffic the same way, so that flows may go on.
    fn same_as(&self, other: &UdpForward) -> bool {
        (self.remote, self.local_ip, self.local_ports, self.idle)
            == (other.remote, other.local_ip, other.local_ports, other.idle)
    }
}

struct Flow {
    socket: Arc<UdpSocket>,
    _answers: AbortOnDropHandle<()>,
}

impl Flows {
    /// Flows for the UDP forwards among `opened` (the forwards the relay opened, by id).
    pub async fn new(
        opened: &HashMap<u16, Offered>,
        datagrams: DatagramSender,
        counters: Arc<UdpCounters>,
    ) -> Arc<Self> {
        let flows = Arc::new(Self {
            state: Mutex::default(),
            datagrams: RwLock::new(datagrams),
            counters,
        });
        flows.set_forwards(opened).await;
        flows
    }

    /// Makes the UDP forwards among `opened` the session's: a forward kept as it was keeps its
    /// flows, the flows of the others are closed. Local host names are resolved here, once per
    /// session and update.
    pub async fn set_forwards(&self, opened: &HashMap<u16, Offered>) {
        let mut forwards = HashMap::new();
        for (&index, offered) in opened {
            let Offered { forward, traffic } = offered;
            if forward.proto != Proto::Udp {
                continue;
            }
            let host = forward.local.host.as_str();
            let port = forward.local.ports.start();
            let local = match tokio::net::lookup_host((host, port)).await {
                Ok(mut addresses) => addresses.next().map(|a| a.ip()),
                Err(error) => {
                    tracing::warn!(forward = %forward.name, %error, "cannot resolve {host}");
                    None
                }
            };
            let Some(local_ip) = local else {
                tracing::warn!(forward = %forward.name, "{host} has no address; its datagrams are dropped");
                continue;
            };
            forwards.insert(
                index,
                UdpForward {
                    name: forward.name.clone(),
                    remote: forward.remote,
                    local_ip,
                    local_ports: forward.local.ports,
                    idle: forward.flow_idle,
                    traffic: traffic.clone(),
                },
            );
        }
        let closed = {
            let mut state = self.lock();
            let mut tables = std::mem::take(&mut state.tables);
            let mut kept = HashMap::new();
            for (index, forward) in &forwards {
                let same = state
                    .forwards
                    .get(index)
                    .is_some_and(|f| f.same_as(forward));
                let table = match tables.remove(index) {
                    Some(table) if same => table,
                    _ => FlowTable::new(MAX_FLOWS_PER_FORWARD, MAX_FLOWS_PER_FORWARD, |_| ()),
                };
                kept.insert(*index, table);
            }
            state.tables = kept;
            state.forwards = forwards;
            tables
        };
        // Dropped outside the lock: each closed flow stops its task and closes its socket.
        drop(closed);
    }

    /// Carries the flows on in a new session that resumes the one they were opened in.
    pub fn attach(&self, datagrams: DatagramSender) {
        *self.datagrams.write().unwrap_or_else(|e| e.into_inner()) = datagrams;
    }

    fn datagrams(&self) -> std::sync::RwLockReadGuard<'_, DatagramSender> {
        self.datagrams.read().unwrap_or_else(|e| e.into_inner())
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sends one datagram from the relay to the local service of its flow, opening the flow if
    /// it is new.
    fn deliver(self: &Arc<Self>, datagram: &[u8]) {
        if datagram.is_empty() {
            return; // The relay's answer to a probe: its arrival was the point.
        }
        let dropped = |reason| self.counters.count_drop(reason);
        let Ok((header, payload)) = DatagramHeader::decode(datagram) else {
            return dropped(DropReason::UnknownFlow);
        };
        let now = Instant::now();
        let mut state = self.lock();
        let State { forwards, tables } = &mut *state;
        let (Some(table), Some(forward)) = (
            tables.get_mut(&header.forward),
            forwards.get(&header.forward),
        ) else {
            return dropped(DropReason::NoRoute);
        };
        tracing::trace!(
            flow = header.flow,
            len = payload.len(),
            "datagram to the service"
        );
        if let Some(flow) = table.touch(&header.flow, now) {
            if send(&flow.socket, payload, dropped) {
                forward.traffic.datagram_in(payload.len());
            }
            return;
        }
        let Some(flow) = self.open(forward, header) else {
            return dropped(DropReason::NoFlow);
        };
        forward.traffic.flow_opened();
        if send(&flow.socket, payload, dropped) {
            forward.traffic.datagram_in(payload.len());
        }
        // The agent's table protects no flow, so the insert always makes room.
        let evicted = table.insert(header.flow, flow, now).unwrap_or_default();
        UdpCounters::add(&self.counters.flows_opened, 1);
        UdpCounters::add(&self.counters.flows_evicted, evicted.len() as u64);
    }

    /// Opens flow `header.flow`: a socket connected to the local port that the public port maps
    /// to, and a task that carries the service's answers back.
    fn open(self: &Arc<Self>, forward: &UdpForward, header: DatagramHeader) -> Option<Flow> {
        let port = forward.local_ports.map_from(forward.remote, header.port)?;
        let local = SocketAddr::new(forward.local_ip, port);
        let span = tracing::debug_span!("flow", forward = %forward.name, flow = header.flow);
        let socket = match connect(local) {
            Ok(socket) => Arc::new(socket),
            Err(error) => {
                span.in_scope(|| tracing::warn!(%error, "cannot open a UDP socket to {local}"));
                return None;
            }
        };
        span.in_scope(|| tracing::debug!(public_port = header.port, %local, "flow opened"));
        let answers = carry_answers(Arc::downgrade(self), header, socket.clone());
        let answers = tokio::spawn(answers.instrument(span));
        Some(Flow {
            socket,
            _answers: AbortOnDropHandle::new(answers),
        })
    }

    /// The flows of forward `index` open now.
    pub fn open_flows(&self, index: u16) -> usize {
        self.lock()
            .tables
            .get(&index)
            .map_or(0, |table| table.len())
    }

    /// The flows open now of the forward called `name`.
    pub fn open_flows_of(&self, name: &str) -> usize {
        let state = self.lock();
        let ids = state.forwards.iter().filter(|(_, f)| f.name == name);
        ids.filter_map(|(id, _)| state.tables.get(id))
            .map(|table| table.len())
            .sum()
    }

    /// Counts an answer of the local service on forward `index`.
    fn answered(&self, index: u16, len: usize) {
        if let Some(forward) = self.lock().forwards.get(&index) {
            forward.traffic.datagram_out(len);
        }
    }

    /// Marks flow `id` of `forward` seen; false if it is gone.
    fn touch(&self, forward: u16, id: FlowId) -> bool {
        let mut state = self.lock();
        let table = state.tables.get_mut(&forward);
        table.is_some_and(|t| t.touch(&id, Instant::now()).is_some())
    }

    /// Forgets the flows that stayed silent for their forward's idle time.
    fn expire(&self, now: Instant) {
        let mut expired = Vec::new();
        {
            let mut state = self.lock();
            let State { forwards, tables } = &mut *state;
            for (index, table) in tables.iter_mut() {
                if let Some(forward) = forwards.get(index) {
                    expired.extend(table.expire(now, forward.idle));
                }
            }
        }
        if !expired.is_empty() {
            tracing::debug!(expired = expired.len(), "idle flows forgotten");
            UdpCounters::add(&self.counters.flows_expired, expired.len() as u64);
        }
        // Dropped here, outside the lock: each stops its task and closes its socket.
        drop(expired);
    }

    fn sweep_interval(&self) -> Duration {
        flows::sweep_interval(self.lock().forwards.values().map(|f| f.idle).min())
    }
}

/// Carries the session's datagrams to local services and forgets idle flows, until the session
/// ends. Runs without UDP forwards too, to take the relay's answers to probes.
pub async fn carry(conn: quinn::Connection, flows: Arc<Flows>) {
    // The relay is trusted (its key is pinned): what does not fit is dropped and counted.
    let deliver = datagram::receive(&conn, |datagram| {
        flows.deliver(&datagram);
        Ok(())
    });
    let expire = async {
        loop {
            // Asked each time: an update of the forwards may change it.
            tokio::time::sleep(flows.sweep_interval()).await;
            flows.expire(Instant::now());
        }
    };
    tokio::select! {
        _ = deliver => {}
        () = expire => {}
    }
}

/// Reads the local service's answers on a flow's socket and sends them to the relay with the
/// flow's header. Ends when the flow is forgotten (its task is aborted) or the session ends.
async fn carry_answers(flows: Weak<Flows>, header: DatagramHeader, socket: Arc<UdpSocket>) {
    let mut buf = vec![0u8; HEADER_LEN + MAX_PAYLOAD];
    buf[..HEADER_LEN].copy_from_slice(&header.encode());
    let mut refused_before = false;
    loop {
        match socket.recv(&mut buf[HEADER_LEN..]).await {
            Ok(len) => {
                let Some(flows) = flows.upgrade() else { return };
                if flows.touch(header.forward, header.flow) {
                    tracing::trace!(len, "datagram to the relay");
                    let answer = Bytes::copy_from_slice(&buf[..HEADER_LEN + len]);
                    flows.datagrams().send(answer);
                    flows.answered(header.forward, len);
                }
            }
            // The service is not listening (yet): an ICMP message said so, once per datagram.
            Err(error) if error.kind() == io::ErrorKind::ConnectionRefused => {
                if !refused_before {
                    let local = socket
                        .peer_addr()
                        .map(|a| a.to_string())
                        .unwrap_or_default();
                    tracing::warn!("nothing listens on local UDP port {local}");
                    refused_before = true;
                }
            }
            Err(error) => {
                tracing::warn!(%error, "receiving from the local service failed; flow stops");
                return;
            }
        }
    }
}

/// A socket of its own for one flow, connected to the local service.
fn connect(local: SocketAddr) -> io::Result<UdpSocket> {
    let any: SocketAddr = match local {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let socket = std::net::UdpSocket::bind(any)?;
    socket.connect(local)?;
    socket.set_nonblocking(true)?;
    UdpSocket::from_std(socket)
}

/// A non-blocking send straight on the socket: a datagram that does not fit now is dropped
/// rather than waited for, and the socket need not have been polled first. Returns whether it
/// was sent.
fn send(socket: &UdpSocket, payload: &[u8], dropped: impl Fn(DropReason)) -> bool {
    let sent = SockRef::from(socket).send(payload).is_ok();
    if !sent {
        dropped(DropReason::SendFailed);
    }
    sent
}
