//! Public UDP ports and their flows. A flow is one visitor source on one public port; the relay
//! numbers it, and every datagram of it crosses the session with a [`DatagramHeader`] naming the
//! flow, the forward and the public port.
//!
//! Nothing here waits on one flow's behalf: datagrams go to the agent as QUIC datagrams and
//! answers go to visitors with non-blocking sends, so a lost or stuck datagram of one flow never
//! delays another.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use socket2::SockRef;
use tether_common::carry::flows::{self, FlowTable};
use tether_common::carry::traffic::ForwardTraffic;
use tether_common::net::cidr::address_group;
use tether_common::net::ports::Proto;
use tether_common::wire::datagram::{
    self, DatagramHeader, DropReason, FlowId, UdpCounters, Violation,
};
use tether_common::wire::datagram::{HEADER_LEN, MAX_PAYLOAD};
use tether_common::wire::protocol::CloseCode;
use tokio::net::UdpSocket;
use tokio_util::sync::{CancellationToken, DropGuard};
use tracing::Instrument;

use crate::admission::Refused;
use crate::agents::{LiveSession, SessionWatch};
use crate::limits::Limits;
use crate::public;
use crate::server::Shared;

/// Opens public UDP `port` for `agent` and carries what arrives on it until the returned token is
/// cancelled. The socket is returned too: answers to visitors leave from it.
pub fn listen(
    shared: &Arc<Shared>,
    agent: &str,
    port: u16,
    session: SessionWatch,
) -> io::Result<(CancellationToken, Arc<UdpSocket>)> {
    let socket = Arc::new(bind_udp(shared.config.public_bind, port)?);
    let cancel = shared.shutdown.child_token();
    let span = tracing::info_span!("port", agent, port, proto = "udp");
    let task = receive_loop(
        shared.clone(),
        socket.clone(),
        port,
        session,
        cancel.clone(),
    );
    shared.tasks.spawn(task.instrument(span));
    Ok((cancel, socket))
}

/// Reads visitors' datagrams on one public port and sends each to the agent's live session.
async fn receive_loop(
    shared: Arc<Shared>,
    socket: Arc<UdpSocket>,
    port: u16,
    session: SessionWatch,
    cancel: CancellationToken,
) {
    tracing::debug!("listening");
    // One buffer for the port's life: the header is written in front of each payload.
    let mut buf = vec![0u8; HEADER_LEN + MAX_PAYLOAD];
    loop {
        let (len, visitor) = tokio::select! {
            () = cancel.cancelled() => break,
            received = socket.recv_from(&mut buf[HEADER_LEN..]) => match received {
                Ok(received) => received,
                Err(error) => {
                    tracing::debug!(%error, "receiving a visitor datagram failed");
                    continue;
                }
            },
        };
        let visitor = SocketAddr::new(visitor.ip().to_canonical(), visitor.port());
        let live = session.borrow().clone();
        let Some(live) = live else {
            shared.udp.count_drop(DropReason::NoRoute);
            continue;
        };
        let routes = live.routes();
        let Some(route) = routes.get(&(Proto::Udp, port)) else {
            shared.udp.count_drop(DropReason::NoRoute);
            continue;
        };
        if !route.admission.allows(visitor.ip()) {
            UdpCounters::add(&shared.udp.refused, 1);
            let reason = Refused::NotAllowed.reason();
            shared.refused_visitors.record(reason, &visitor);
            continue;
        }
        let Some(flow) =
            live.flows
                .flow_for(route.forward, port, visitor, &shared.udp, &route.traffic)
        else {
            shared.udp.count_drop(DropReason::NoFlow);
            continue;
        };
        let header = DatagramHeader {
            flow,
            forward: route.forward,
            port,
        };
        buf[..HEADER_LEN].copy_from_slice(&header.encode());
        route.traffic.datagram_in(len);
        tracing::trace!(%visitor, flow, len, "datagram to the agent");
        live.datagrams
            .send(Bytes::copy_from_slice(&buf[..HEADER_LEN + len]));
    }
    tracing::debug!("closed");
}

/// Carries the session's datagrams from the agent back to visitors, and forgets idle flows,
/// until the returned guard is dropped or the session ends. An agent that breaks the rules of
/// datagrams loses its session with a protocol error.
pub fn carry(shared: &Arc<Shared>, live: Arc<LiveSession>) -> DropGuard {
    let cancel = shared.shutdown.child_token();
    let task = {
        let (shared, cancel) = (shared.clone(), cancel.clone());
        async move {
            let answers =
                datagram::receive(&live.conn, |datagram| answer(&shared, &live, &datagram));
            tokio::select! {
                () = cancel.cancelled() => {}
                () = expire_loop(&shared, &live) => {}
                ended = answers => if let Err(violation) = ended {
                    tracing::warn!(%violation, "protocol error: closing the session");
                    CloseCode::ProtocolError.close(&live.conn);
                },
            }
        }
    };
    shared.tasks.spawn(task.in_current_span());
    cancel.drop_guard()
}

/// Sends one datagram from the agent to the visitor of its flow.
fn answer(shared: &Shared, live: &LiveSession, datagram: &[u8]) -> Result<(), Violation> {
    if datagram.is_empty() {
        // The agent's probe after a silence; the answer lets the relay find out at once what
        // the silence lost (see the agent's probe module).
        let _ = live.conn.send_datagram(Bytes::new());
        return Ok(());
    }
    let counters = &shared.udp;
    let (header, payload) = DatagramHeader::decode(datagram)
        .map_err(|e| Violation(format!("datagram of {} bytes: {e}", datagram.len())))?;
    let Some((forward, port, visitor)) = live.flows.visitor_of(header.flow) else {
        if !live.flows.ever_opened(header.flow) {
            return Err(Violation(format!(
                "datagram for flow {}, which the relay never opened",
                header.flow
            )));
        }
        // Expired or evicted meanwhile: the visitor's next datagram opens a new flow.
        counters.count_drop(DropReason::UnknownFlow);
        return Ok(());
    };
    if (header.forward, header.port) != (forward, port) {
        return Err(Violation(format!(
            "datagram of flow {} names forward {} port {}, but the flow is forward {forward} \
             port {port}",
            header.flow, header.forward, header.port
        )));
    }
    let routes = live.routes();
    let Some((route, socket)) = routes
        .get(&(Proto::Udp, port))
        .and_then(|r| Some((r, r.udp.as_ref()?)))
    else {
        counters.count_drop(DropReason::NoRoute);
        return Ok(());
    };
    tracing::trace!(%visitor, flow = header.flow, len = payload.len(), "datagram to the visitor");
    // A non-blocking send straight on the socket: a full socket buffer drops this datagram
    // rather than hold up the others, as a router would.
    if SockRef::from(socket.as_ref())
        .send_to(payload, &visitor.into())
        .is_err()
    {
        counters.count_drop(DropReason::SendFailed);
    } else {
        route.traffic.datagram_out(payload.len());
    }
    Ok(())
}

async fn expire_loop(shared: &Shared, live: &LiveSession) {
    loop {
        // Asked each time: an update of the agent's forwards may change it.
        tokio::time::sleep(live.flows.sweep_interval()).await;
        let expired = live.flows.expire(Instant::now());
        if expired > 0 {
            tracing::debug!(expired, "idle flows forgotten");
            UdpCounters::add(&shared.udp.flows_expired, expired as u64);
        }
    }
}

/// The visitor source of a flow: the public port it reached and its address.
type Source = (u16, SocketAddr);

/// The UDP flows of one session, one table per forward, each capped in total and per visitor
/// address.
pub struct SessionFlows {
    inner: Mutex<Flows>,
    /// The caps of each forward's table.
    max_flows: usize,
    max_per_visitor: usize,
    protect_active: Duration,
}

struct Flows {
    forwards: HashMap<u16, ForwardFlows>,
    by_id: HashMap<FlowId, (u16, Source)>,
    next_id: FlowId,
    /// Ids have come round past `FlowId::MAX`, so any id but 0 may have been opened once.
    wrapped: bool,
}

struct ForwardFlows {
    table: FlowTable<Source, FlowId, IpAddr>,
    idle: Duration,
}

impl SessionFlows {
    /// Tables for the session's UDP forwards, given as (forward id, flow idle time).
    pub fn new(forwards: impl IntoIterator<Item = (u16, Duration)>, limits: &Limits) -> Self {
        let flows = Self {
            inner: Mutex::new(Flows {
                forwards: HashMap::new(),
                by_id: HashMap::new(),
                next_id: 1,
                wrapped: false,
            }),
            max_flows: limits.max_flows_per_forward,
            max_per_visitor: limits.max_flows_per_visitor,
            protect_active: limits.protect_active_flows,
        };
        flows.set_forwards(forwards);
        flows
    }

    /// Makes the session's UDP forwards these: a forward kept with the same idle time keeps its
    /// flows, the flows of the others are forgotten, and new ones start empty.
    pub fn set_forwards(&self, forwards: impl IntoIterator<Item = (u16, Duration)>) {
        let mut flows = self.lock();
        let Flows {
            forwards: tables,
            by_id,
            ..
        } = &mut *flows;
        let mut kept = HashMap::new();
        for (id, idle) in forwards {
            let table = match tables.remove(&id) {
                Some(forward) if forward.idle == idle => forward,
                _ => ForwardFlows {
                    table: FlowTable::new(
                        self.max_flows,
                        self.max_per_visitor,
                        |(_, v): &Source| address_group(v.ip()),
                    )
                    .protect_active(self.protect_active),
                    idle,
                },
            };
            kept.insert(id, table);
        }
        // What is left in `tables` is closed: its flows are forgotten both ways.
        by_id.retain(|_, (forward, _)| kept.contains_key(forward));
        *tables = kept;
    }

    fn lock(&self) -> MutexGuard<'_, Flows> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The flow of `visitor` on `port` of `forward`, opened if it is new. `None` if the session
    /// has no UDP forward of that index, or if the forward's flows are all at their cap and
    /// active, so that a new one may not push any out.
    pub fn flow_for(
        &self,
        forward: u16,
        port: u16,
        visitor: SocketAddr,
        counters: &UdpCounters,
        traffic: &ForwardTraffic,
    ) -> Option<FlowId> {
        let now = Instant::now();
        let mut flows = self.lock();
        let Flows {
            forwards,
            by_id,
            next_id,
            wrapped,
        } = &mut *flows;
        let table = &mut forwards.get_mut(&forward)?.table;
        let source = (port, visitor);
        if let Some(&mut id) = table.touch(&source, now) {
            return Some(id);
        }
        let mut id = *next_id;
        while id == 0 || by_id.contains_key(&id) {
            id = id.wrapping_add(1);
        }
        *next_id = id.wrapping_add(1);
        *wrapped |= *next_id <= id;
        let Some(evicted) = table.insert(source, id, now) else {
            UdpCounters::add(&counters.flows_refused, 1);
            return None;
        };
        for (source, old) in &evicted {
            by_id.remove(old);
            tracing::debug!(port = source.0, visitor = %source.1, "flow evicted under the cap");
        }
        by_id.insert(id, (forward, source));
        UdpCounters::add(&counters.flows_opened, 1);
        traffic.flow_opened();
        UdpCounters::add(&counters.flows_evicted, evicted.len() as u64);
        tracing::debug!(%visitor, port, flow = id, "flow opened");
        Some(id)
    }

    /// The forward, public port and visitor of flow `id`, marking it seen.
    pub fn visitor_of(&self, id: FlowId) -> Option<(u16, u16, SocketAddr)> {
        let mut flows = self.lock();
        let (forward, source) = *flows.by_id.get(&id)?;
        flows
            .forwards
            .get_mut(&forward)?
            .table
            .touch(&source, Instant::now())?;
        Some((forward, source.0, source.1))
    }

    /// The flows `forward` has open now.
    pub fn open_flows(&self, forward: u16) -> usize {
        self.lock()
            .forwards
            .get(&forward)
            .map_or(0, |f| f.table.len())
    }

    /// Whether flow `id` was ever opened, even if it has been forgotten since.
    pub fn ever_opened(&self, id: FlowId) -> bool {
        let flows = self.lock();
        id != 0 && (flows.wrapped || id < flows.next_id)
    }

    /// Forgets the flows that stayed silent for their forward's idle time; returns how many.
    pub fn expire(&self, now: Instant) -> usize {
        let mut flows = self.lock();
        let Flows {
            forwards, by_id, ..
        } = &mut *flows;
        let mut count = 0;
        for forward in forwards.values_mut() {
            for (_, id) in forward.table.expire(now, forward.idle) {
                by_id.remove(&id);
                count += 1;
            }
        }
        count
    }

    /// How often idle flows are looked for: often enough for the shortest idle time.
    pub fn sweep_interval(&self) -> Duration {
        flows::sweep_interval(self.lock().forwards.values().map(|f| f.idle).min())
    }
}

fn bind_udp(address: Option<IpAddr>, port: u16) -> io::Result<UdpSocket> {
    UdpSocket::from_std(public::bind(address, port, Proto::Udp)?.into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::within;

    fn limits(per_forward: usize, per_visitor: usize) -> Limits {
        Limits {
            max_flows_per_forward: per_forward,
            max_flows_per_visitor: per_visitor,
            ..Limits::default()
        }
    }

    fn visitor(text: &str) -> SocketAddr {
        text.parse().unwrap()
    }

    #[test]
    fn a_source_keeps_its_flow_and_a_new_source_gets_a_new_one() {
        let counters = UdpCounters::default();
        let traffic = ForwardTraffic::default();
        let flows = SessionFlows::new([(1, Duration::from_secs(120))], &limits(8, 8));
        let a = flows.flow_for(1, 60001, visitor("203.0.113.5:4000"), &counters, &traffic);
        let again = flows.flow_for(1, 60001, visitor("203.0.113.5:4000"), &counters, &traffic);
        let hopped = flows.flow_for(1, 60001, visitor("203.0.113.5:4001"), &counters, &traffic);
        let other_port = flows.flow_for(1, 60002, visitor("203.0.113.5:4000"), &counters, &traffic);
        assert!(a.is_some());
        assert_eq!(a, again);
        assert_ne!(a, hopped);
        assert_ne!(a, other_port);
        assert_eq!(
            flows.visitor_of(hopped.unwrap()),
            Some((1, 60001, visitor("203.0.113.5:4001")))
        );
        assert_eq!(counters.count().flows_opened, 3);
        assert_eq!(traffic.count().flows, 3);
        assert_eq!(flows.open_flows(1), 3);
        // Not a UDP forward of this session.
        assert_eq!(
            flows.flow_for(0, 60001, visitor("203.0.113.5:4000"), &counters, &traffic),
            None
        );
    }

    #[test]
    fn evicted_and_expired_flows_are_forgotten_both_ways() {
        let counters = UdpCounters::default();
        let traffic = ForwardTraffic::default();
        let flows = SessionFlows::new([(0, Duration::from_secs(120))], &limits(8, 1));
        let first = flows
            .flow_for(0, 60001, visitor("198.51.100.7:1"), &counters, &traffic)
            .unwrap();
        let second = flows
            .flow_for(0, 60001, visitor("198.51.100.7:2"), &counters, &traffic)
            .unwrap();
        assert_eq!(flows.visitor_of(first), None);
        assert_eq!(counters.count().flows_evicted, 1);
        assert_eq!(flows.expire(Instant::now() + Duration::from_secs(119)), 0);
        assert_eq!(flows.expire(Instant::now() + Duration::from_secs(121)), 1);
        assert_eq!(flows.visitor_of(second), None);
        // Forgotten, but once opened: the agent may still answer them.
        assert!(flows.ever_opened(first) && flows.ever_opened(second));
        assert!(!flows.ever_opened(0));
        assert!(!flows.ever_opened(second + 1));
    }

    #[test]
    fn the_sources_of_one_ipv6_64_share_the_cap_per_visitor() {
        let counters = UdpCounters::default();
        let traffic = ForwardTraffic::default();
        let flows = SessionFlows::new([(0, Duration::from_secs(120))], &limits(8, 2));
        let open = |source: &str| {
            flows
                .flow_for(0, 60001, visitor(source), &counters, &traffic)
                .unwrap()
        };
        let first = open("[2001:db8:0:1::1]:1000");
        open("[2001:db8:0:1::2]:1000");
        // A third address of the same /64 takes the place of its oldest flow.
        open("[2001:db8:0:1::3]:1000");
        assert_eq!(flows.visitor_of(first), None);
        assert_eq!(counters.count().flows_evicted, 1);
        open("[2001:db8:0:2::1]:1000");
        assert_eq!(flows.open_flows(0), 3);
    }

    #[test]
    fn sweeps_come_often_enough_for_the_shortest_idle_time() {
        let limits = Limits::default();
        let sweep = |idle: &[u64]| {
            SessionFlows::new(
                idle.iter()
                    .enumerate()
                    .map(|(i, &ms)| (i as u16, Duration::from_millis(ms))),
                &limits,
            )
            .sweep_interval()
        };
        assert_eq!(sweep(&[120_000]), Duration::from_secs(5));
        assert_eq!(sweep(&[120_000, 2_000]), Duration::from_millis(500));
        assert_eq!(sweep(&[1]), Duration::from_millis(100));
    }

    #[tokio::test]
    async fn default_bind_takes_ipv4_and_ipv6_visitors() {
        within(async {
            let socket = bind_udp(None, 0).unwrap();
            let port = socket.local_addr().unwrap().port();
            for ip in ["127.0.0.1", "::1"] {
                let client = UdpSocket::bind((ip, 0)).await.unwrap();
                client.send_to(b"hi", (ip, port)).await.unwrap();
                let mut buf = [0u8; 2];
                let (_, from) = socket.recv_from(&mut buf).await.unwrap();
                assert_eq!(from.ip().to_canonical(), ip.parse::<IpAddr>().unwrap());
            }
        })
        .await;
    }
}
