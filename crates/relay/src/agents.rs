//! The relay's table of agents: for each, its live session (if any) and the public ports it
//! holds, with the port registry that keeps one owner per port.
//!
//! Ports belong to the agent, not to one session: a new session of the same agent takes them
//! over at once, without closing the listeners, and an agent that went away keeps them for
//! [`crate::limits::Limits::port_hold`] so that it finds them again when it reconnects.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use tether_common::carry::resume::{HeldStream, HeldStreams, Resume};
use tether_common::carry::traffic::ForwardTraffic;
use tether_common::config::AgentEntry;
use tether_common::net::ports::{PortSpec, Proto};
use tether_common::service::cli::count;
use tether_common::service::report;
use tether_common::transport::Path;
use tether_common::wire::datagram::{DatagramSender, FlowId};
use tether_common::wire::protocol::{
    CloseCode, ForwardId, ForwardRequest, ForwardResult, Refusal, SessionId, StreamHeader, StreamId,
};
use tokio::sync::watch;

use crate::admission::Admission;
use crate::flows::SessionFlows;
use crate::limits::Limits;
use crate::live::{LiveSession, Route, Routes, SessionWatch};
use crate::public::Listening;
use crate::registry::PortRegistry;
use crate::status::{AgentState, ForwardState, VisitorState, MAX_LISTED_VISITORS};

/// What opens the agent's public ports and resumes its visitors: the listeners of `visitor.rs`
/// and `udp.rs`, which serve visitors through the sessions this table publishes. The caller
/// hands them in, so that the table, below them, does not know them.
pub trait Doors {
    /// Opens public `port` for `agent`, its visitors served through the agent's `session`.
    fn open(
        &self,
        agent: &str,
        proto: Proto,
        port: u16,
        session: SessionWatch,
    ) -> io::Result<Listening>;
    /// How a held visitor connection goes on in the new session `live`.
    fn resume_link(&self, live: &LiveSession, stream: &HeldStream) -> Resume;
}

/// A public port the agent holds.
type Held = Listening;

/// A session about to be published, with what the relay opened for it.
pub struct NewSession {
    pub id: SessionId,
    pub conn: quinn::Connection,
    pub path: Path,
    pub routes: Routes,
    /// The UDP forwards that opened, as (id, flow idle time).
    pub udp_forwards: Vec<(ForwardId, std::time::Duration)>,
    pub datagrams: DatagramSender,
    /// The session the agent's Hello names as its last, if any.
    pub resume: Option<SessionId>,
}

/// A published session, and what it resumed of the one it follows.
pub struct Published {
    pub live: Arc<LiveSession>,
    /// `Some` if the relay still held the session Hello named: the streams that go on.
    pub resumed: Option<Vec<StreamId>>,
}

#[derive(Default)]
pub struct Table {
    registry: PortRegistry,
    agents: HashMap<String, Slot>,
    summary: watch::Sender<Summary>,
}

/// What the relay serves at the moment, for systemd's status line.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Summary {
    /// Agents with a live session.
    pub agents: usize,
    /// Forwards those sessions have open.
    pub forwards: usize,
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}, {}",
            count(self.agents, "agent"),
            count(self.forwards, "forward")
        )
    }
}

/// A forward the agent asked for in its latest session, and the relay's answer.
pub struct Asked {
    pub id: ForwardId,
    pub request: ForwardRequest,
    pub name: Arc<str>,
    pub spec: PortSpec,
    pub result: ForwardResult,
    pub traffic: Arc<ForwardTraffic>,
    /// Who may reach it, and how many are in: kept while the forward stays as it is.
    admission: Option<Arc<Admission>>,
}

struct Slot {
    live: watch::Sender<Option<Arc<LiveSession>>>,
    /// What the latest session asked for; kept while the agent is away.
    forwards: Vec<Asked>,
    /// What each forward the agent asks for now carried, by name, since the relay started: a
    /// forward's totals go on across sessions.
    traffic: HashMap<Arc<str>, Arc<ForwardTraffic>>,
    /// Sessions the agent has had since the relay started.
    sessions: u64,
    /// When the agent's latest session began, or ended if it is away.
    since: Option<SystemTime>,
    /// Where the latest session came from; a live session's address may have moved since.
    address: Option<SocketAddr>,
    /// The listener of each held port.
    ports: HashMap<(Proto, u16), Held>,
    next_stream: Arc<AtomicU64>,
    /// Counts sessions, so that a hold timer knows whether the agent came back meanwhile.
    generation: u64,
    /// The agent's visitor connections, held across its sessions.
    streams: Arc<HeldStreams>,
    /// The latest session's id and UDP flows, for the next session to resume.
    latest: Option<(SessionId, Arc<SessionFlows>)>,
}

impl Slot {
    fn new() -> Self {
        Self {
            live: watch::Sender::new(None),
            forwards: Vec::new(),
            traffic: HashMap::new(),
            sessions: 0,
            since: None,
            address: None,
            ports: HashMap::new(),
            next_stream: Arc::new(AtomicU64::new(1)),
            generation: 0,
            streams: Arc::default(),
            latest: None,
        }
    }
}

impl Table {
    /// Opens what `agent` asks for, in a new session's Hello or in an update of a live one,
    /// and returns a result per request and the routes of the opened ports. A forward the
    /// agent had under the same id and with the same request keeps its listeners and its
    /// visitors; ports the agent held but no longer asks for are released.
    pub fn open_forwards(
        &mut self,
        doors: &dyn Doors,
        limits: &Limits,
        agent: &AgentEntry,
        requests: &[(ForwardId, ForwardRequest)],
    ) -> (Vec<ForwardResult>, Routes) {
        let slot = self
            .agents
            .entry(agent.name.clone())
            .or_insert_with(Slot::new);
        let before = std::mem::take(&mut slot.forwards);
        let mut held = std::mem::take(&mut slot.ports);
        let mut ports = HashMap::new();
        let mut routes = HashMap::new();
        let mut results = Vec::with_capacity(requests.len());
        let mut asked = Vec::with_capacity(requests.len());
        for (index, (id, request)) in requests.iter().enumerate() {
            let spec = PortSpec {
                proto: request.proto,
                range: request.remote,
            };
            let overlaps = requests[..index]
                .iter()
                .any(|(_, r)| r.proto == request.proto && r.remote.overlaps(request.remote));
            let no_idle_time = request.proto == Proto::Udp && request.flow_idle.is_zero();
            let result = if overlaps || no_idle_time {
                Err(Refusal::Invalid)
            } else {
                self.registry.claim(agent, spec).and_then(|()| {
                    let opened =
                        open_ports(doors, &agent.name, spec, &slot.live, &mut held, &mut ports);
                    if opened.is_err() {
                        // Only a claim that succeeded has ports to give back; a refused one
                        // claimed none, whatever its range.
                        for port in spec.range.ports() {
                            if !ports.contains_key(&(spec.proto, port)) {
                                self.registry.release(&agent.name, spec.proto, port);
                            }
                        }
                    }
                    opened
                })
            };
            let name: Arc<str> = request.name.as_str().into();
            let traffic = slot.traffic.entry(name.clone()).or_default().clone();
            let unchanged = before
                .iter()
                .find(|b| b.id == *id && b.request == *request)
                .and_then(|b| b.admission.clone());
            let admission = unchanged.unwrap_or_else(|| {
                Arc::new(Admission::new(
                    request.allow_from.clone(),
                    limits.max_visitors_per_forward,
                    limits.max_visitors_per_address,
                ))
            });
            asked.push(Asked {
                id: *id,
                request: request.clone(),
                name: name.clone(),
                spec,
                result: ForwardResult::Opened,
                traffic: traffic.clone(),
                admission: result.is_ok().then(|| admission.clone()),
            });
            results.push(match result {
                Ok(()) => {
                    for port in spec.range.ports() {
                        let route = Route {
                            forward: *id,
                            name: name.clone(),
                            traffic: traffic.clone(),
                            admission: admission.clone(),
                            udp: ports.get(&(spec.proto, port)).and_then(|h| h.udp.clone()),
                        };
                        routes.insert((spec.proto, port), route);
                    }
                    ForwardResult::Opened
                }
                Err(refusal) => ForwardResult::Refused(refusal),
            });
        }
        // Whatever was held and not asked for again is closed and released.
        for (proto, port) in held.into_keys() {
            self.registry.release(&agent.name, proto, port);
        }
        slot.ports = ports;
        for (asked, result) in asked.iter_mut().zip(&results) {
            asked.result = *result;
        }
        // Totals are kept for the forwards asked for now, and only those: an agent that keeps
        // sending new names cannot grow the table.
        let names: HashSet<&str> = asked.iter().map(|a| &*a.name).collect();
        slot.traffic.retain(|name, _| names.contains(&**name));
        slot.forwards = asked;
        (results, routes)
    }

    /// Makes a new session the agent's live one, closing the one it replaces. If the agent's
    /// Hello named the relay's latest session of it, the new one resumes that session's
    /// visitor connections and UDP flows; the connections of any other session are closed.
    pub fn publish(
        &mut self,
        doors: &dyn Doors,
        limits: &Limits,
        agent: &str,
        session: NewSession,
    ) -> Option<Published> {
        let slot = self.agents.get_mut(agent)?;
        slot.generation += 1;
        slot.sessions += 1;
        slot.since = Some(SystemTime::now());
        slot.address = Some(session.conn.remote_address());
        let resumes =
            session.resume.is_some() && slot.latest.as_ref().map(|(id, _)| *id) == session.resume;
        let flows = match slot.latest.take() {
            Some((_, flows)) if resumes => {
                flows.set_forwards(session.udp_forwards);
                flows
            }
            _ => Arc::new(SessionFlows::new(session.udp_forwards, limits)),
        };
        slot.latest = Some((session.id, flows.clone()));
        let live = Arc::new(LiveSession {
            id: session.id,
            conn: session.conn,
            path: session.path,
            routes: RwLock::new(Arc::new(session.routes)),
            flows,
            datagrams: session.datagrams,
            next_stream: slot.next_stream.clone(),
            streams: slot.streams.clone(),
            acks: Arc::default(),
        });
        if let Some(old) = slot.live.send_replace(Some(live.clone())) {
            tracing::info!(
                agent,
                session = old.id,
                "closing the session this one replaces"
            );
            CloseCode::Replaced.close(&old.conn);
        }
        let lost = session.resume.filter(|_| resumes);
        // A visitor of a port the new session no longer has (its forward was dropped, or the
        // agent's allowlist no longer covers it), or whose address it no longer admits, is
        // closed.
        let routes = live.routes();
        let streams = slot.streams.resume(lost, live.id, |stream| {
            admits(&routes, &stream.header).then(|| doors.resume_link(&live, stream))
        });
        self.update_summary();
        Some(Published {
            live,
            resumed: resumes.then_some(streams),
        })
    }

    /// Applies an agent's [`Update`](tether_common::wire::protocol::Update) to its live session
    /// `id`: the routes and the UDP flow tables become those of the new set, and visitors
    /// waiting for a port that just opened are let through. `None` if `id` is no longer the
    /// agent's live session.
    pub fn update_forwards(
        &mut self,
        doors: &dyn Doors,
        limits: &Limits,
        agent: &AgentEntry,
        id: SessionId,
        requests: &[(ForwardId, ForwardRequest)],
    ) -> Option<Vec<ForwardResult>> {
        let live = self.agents.get(&agent.name)?.live.borrow().clone()?;
        if live.id != id {
            return None;
        }
        let (results, routes) = self.open_forwards(doors, limits, agent, requests);
        // A visitor whose forward went, or whose address the forward no longer admits, goes.
        live.streams.revoke_where(|header| !admits(&routes, header));
        live.set_routes(routes);
        live.flows.set_forwards(udp_forwards(requests, &results));
        if let Some(slot) = self.agents.get(&agent.name) {
            // Wakes the visitors that wait for a port of this agent.
            slot.live.send_modify(|_| {});
        }
        self.update_summary();
        Some(results)
    }

    /// Marks the agent away if `id` is still its live session; unless `resumable`, the next
    /// session starts afresh. Returns the generation to pass to
    /// [`Table::release_if_still_away`] once the hold time has passed.
    pub fn session_ended(&mut self, agent: &str, id: SessionId, resumable: bool) -> Option<u64> {
        let slot = self.agents.get_mut(agent)?;
        let ours = slot
            .live
            .borrow()
            .as_ref()
            .is_some_and(|live| live.id == id);
        if !ours {
            return None;
        }
        if let Some(live) = slot.live.send_replace(None) {
            slot.address = Some(live.conn.remote_address());
        }
        slot.since = Some(SystemTime::now());
        if !resumable {
            slot.latest = None;
        }
        let generation = slot.generation;
        self.update_summary();
        Some(generation)
    }

    /// Who may reach the agent's public TCP `port` now: the admission of the forward that
    /// holds it, kept while the agent is away so that visitors are turned away before they
    /// wait for it.
    pub fn admission_of(&self, agent: &str, port: u16) -> Option<Arc<Admission>> {
        let slot = self.agents.get(agent)?;
        let asked = slot
            .forwards
            .iter()
            .find(|a| a.spec.proto == Proto::Tcp && a.spec.range.contains(port))?;
        asked.admission.clone()
    }

    /// Follows how many agents and forwards the relay serves.
    pub fn summary(&self) -> watch::Receiver<Summary> {
        self.summary.subscribe()
    }

    fn update_summary(&self) {
        let mut summary = Summary::default();
        for slot in self.agents.values() {
            if let Some(live) = &*slot.live.borrow() {
                summary.agents += 1;
                let forwards: HashSet<u16> = live.routes().values().map(|r| r.forward).collect();
                summary.forwards += forwards.len();
            }
        }
        self.summary.send_if_modified(|current| {
            let changed = *current != summary;
            *current = summary;
            changed
        });
    }

    /// Forgets an agent that is no longer listed: its session is closed and its ports too.
    pub fn remove_agent(&mut self, agent: &str) {
        let Some(slot) = self.agents.remove(agent) else {
            return;
        };
        slot.streams.close_all();
        if let Some(live) = slot.live.send_replace(None) {
            tracing::info!(
                agent,
                session = live.id,
                "agent no longer listed; session closed"
            );
            CloseCode::Unauthorized.close(&live.conn);
        }
        for (proto, port) in slot.ports.into_keys() {
            self.registry.release(agent, proto, port);
        }
        self.update_summary();
    }

    /// Applies an agent's new allowlist. If its live session holds a forward the new one does
    /// not allow, or was refused one it now allows, the session is closed with
    /// [`CloseCode::Reconfigured`] so that the agent asks again at once; returns whether it was.
    /// Ports an absent agent holds and may no longer have are closed.
    pub fn allowlist_changed(&mut self, agent: &AgentEntry) -> bool {
        let Some(slot) = self.agents.get_mut(&agent.name) else {
            return false;
        };
        let live = slot.live.borrow().clone();
        let Some(live) = live else {
            let refused: Vec<_> = slot
                .ports
                .keys()
                .copied()
                .filter(|&(proto, port)| {
                    let range = tether_common::net::ports::PortRange::single(port);
                    !range.is_some_and(|range| agent.allows(PortSpec { proto, range }))
                })
                .collect();
            for (proto, port) in refused {
                slot.ports.remove(&(proto, port));
                self.registry.release(&agent.name, proto, port);
            }
            return false;
        };
        let differs = slot.forwards.iter().any(|asked| match asked.result {
            ForwardResult::Opened => !agent.allows(asked.spec),
            ForwardResult::Refused(Refusal::NotAllowed) => agent.allows(asked.spec),
            ForwardResult::Refused(_) => false,
        });
        if differs {
            tracing::info!(
                agent = agent.name,
                session = live.id,
                "allowlist changed; the agent asks for its forwards again"
            );
            CloseCode::Reconfigured.close(&live.conn);
        }
        differs
    }

    /// The state of each listed agent and of its latest session's forwards.
    pub fn agent_states(&self, listed: &[AgentEntry]) -> Vec<AgentState> {
        listed
            .iter()
            .map(|entry| {
                let slot = self.agents.get(&entry.name);
                let live = slot.and_then(|s| s.live.borrow().clone());
                let forwards = slot.map_or(&[][..], |s| &s.forwards);
                let forwards = forwards
                    .iter()
                    .map(|asked| {
                        let state = match (&live, asked.result) {
                            (None, _) => "agent away".to_string(),
                            (Some(_), ForwardResult::Opened) => "open".to_string(),
                            (Some(_), ForwardResult::Refused(why)) => format!("refused: {why}"),
                        };
                        let flows = live.as_ref().map(|l| l.flows.open_flows(asked.id));
                        let connections = match (slot, asked.spec.proto) {
                            (Some(slot), Proto::Tcp) => visitors_of(&slot.streams, asked.spec),
                            _ => Vec::new(),
                        };
                        ForwardState {
                            name: asked.name.to_string(),
                            proto: asked.spec.proto.to_string(),
                            ports: asked.spec.range.to_string(),
                            state,
                            flows_open: flows.unwrap_or(0) as u64,
                            traffic: asked.traffic.count(),
                            connections,
                        }
                    })
                    .collect();
                let sessions = slot.map_or(0, |s| s.sessions);
                AgentState {
                    name: entry.name.clone(),
                    fingerprint: entry.fingerprint.to_string(),
                    connected: live.is_some(),
                    // Where the session is now: QUIC follows the agent when its NAT moves it.
                    address: live
                        .as_ref()
                        .map(|l| l.conn.remote_address())
                        .or_else(|| slot.and_then(|s| s.address))
                        .map(|a| a.to_string()),
                    since: slot.and_then(|s| s.since).map(report::timestamp),
                    rtt_ms: live.as_ref().map(|l| report::millis(l.conn.rtt())),
                    transport: live.as_ref().map(|l| l.path.to_string()),
                    sessions,
                    reconnects: sessions.saturating_sub(1),
                    forwards,
                }
            })
            .collect()
    }

    /// Closes and releases the agent's ports if no session came since `generation`.
    pub fn release_if_still_away(&mut self, agent: &str, generation: u64) {
        let Some(slot) = self.agents.get_mut(agent) else {
            return;
        };
        if slot.generation != generation || slot.live.borrow().is_some() {
            return;
        }
        for (proto, port) in std::mem::take(&mut slot.ports).into_keys() {
            self.registry.release(agent, proto, port);
        }
        slot.latest = None;
        tracing::info!(agent, "agent did not come back; its ports are closed");
    }
}

/// What a relay that restarts hands over of one agent: the session its visitors wait for, and
/// the ports they came in on.
pub struct KeptAgent {
    pub name: String,
    /// The agent's latest session, which its next Hello resumes.
    pub session: SessionId,
    pub next_stream: u64,
    /// Where the numbering of UDP flows stood: the next id, and whether ids came round.
    pub flows: (FlowId, bool),
    pub forwards: Vec<(ForwardId, ForwardRequest)>,
    pub ports: Vec<((Proto, u16), Listening)>,
}

impl Table {
    /// Takes out every agent whose latest session may be resumed, with its ports, for the
    /// next process (see `handover`); the ports are left open.
    pub fn hand_over(&mut self) -> Vec<KeptAgent> {
        let mut kept = Vec::new();
        for (name, slot) in &mut self.agents {
            let Some((session, flows)) = &slot.latest else {
                continue;
            };
            kept.push(KeptAgent {
                name: name.clone(),
                session: *session,
                flows: flows.numbering(),
                next_stream: slot.next_stream.load(std::sync::atomic::Ordering::Acquire),
                forwards: slot
                    .forwards
                    .iter()
                    .map(|asked| (asked.id, asked.request.clone()))
                    .collect(),
                ports: std::mem::take(&mut slot.ports).into_iter().collect(),
            });
        }
        kept
    }

    /// Puts `agent` back as the previous process left it: away, its session `lost` to be
    /// resumed, stream ids going on from `next_stream` and flow ids from `flows`. Its forwards
    /// were opened again with [`Table::open_forwards`] first. Returns the generation to pass
    /// to [`Table::release_if_still_away`], and the table its streams are restored to.
    pub fn restore_away(
        &mut self,
        agent: &str,
        lost: SessionId,
        (next_stream, flows): (u64, (FlowId, bool)),
        udp_forwards: Vec<(ForwardId, std::time::Duration)>,
        limits: &Limits,
    ) -> Option<(u64, Arc<HeldStreams>)> {
        let slot = self.agents.get_mut(agent)?;
        slot.next_stream
            .store(next_stream.max(1), std::sync::atomic::Ordering::Release);
        let table = SessionFlows::new(udp_forwards, limits);
        table.number_on_from(flows);
        slot.latest = Some((lost, Arc::new(table)));
        slot.since = Some(SystemTime::now());
        slot.generation += 1;
        Some((slot.generation, slot.streams.clone()))
    }
}

/// Whether `routes` still let the visitor of data stream `header` in.
/// The visitor connections open now on the public ports of `spec`.
fn visitors_of(streams: &HeldStreams, spec: PortSpec) -> Vec<VisitorState> {
    streams
        .list()
        .iter()
        .filter(|s| spec.range.contains(s.header.port))
        .take(MAX_LISTED_VISITORS)
        .map(|s| VisitorState {
            address: s.header.visitor.to_string(),
            since: report::timestamp(s.opened()),
            bytes_in: s.sent(),
            bytes_out: s.received(),
        })
        .collect()
}

fn admits(routes: &Routes, header: &StreamHeader) -> bool {
    routes
        .get(&(Proto::Tcp, header.port))
        .is_some_and(|route| route.admission.allows(header.visitor.ip()))
}

/// The UDP forwards that opened, as (id, flow idle time), for the session's flow tables.
pub fn udp_forwards<'a>(
    requests: &'a [(ForwardId, ForwardRequest)],
    results: &'a [ForwardResult],
) -> impl Iterator<Item = (ForwardId, std::time::Duration)> + 'a {
    requests
        .iter()
        .zip(results)
        .filter(|((_, request), result)| {
            request.proto == Proto::Udp && **result == ForwardResult::Opened
        })
        .map(|((id, request), _)| (*id, request.flow_idle))
}

/// Moves the listeners of `spec` that the agent already holds into `ports`, and opens the ones
/// it does not. On failure, listeners opened here are closed again.
fn open_ports(
    doors: &dyn Doors,
    agent: &str,
    spec: PortSpec,
    live: &watch::Sender<Option<Arc<LiveSession>>>,
    held: &mut HashMap<(Proto, u16), Held>,
    ports: &mut HashMap<(Proto, u16), Held>,
) -> Result<(), Refusal> {
    for port in spec.range.ports() {
        let key = (spec.proto, port);
        if let Some(listener) = held.remove(&key) {
            ports.insert(key, listener);
            continue;
        }
        let opened = doors.open(agent, spec.proto, port, live.subscribe());
        match opened {
            Ok(listener) => {
                ports.insert(key, listener);
            }
            Err(error) => {
                tracing::warn!(agent, port, %error, "cannot open public port");
                // Back to `held`: the caller closes and releases whatever stays there.
                for port in spec.range.ports() {
                    let key = (spec.proto, port);
                    if let Some(listener) = ports.remove(&key) {
                        held.insert(key, listener);
                    }
                }
                return Err(match error.kind() {
                    std::io::ErrorKind::AddrInUse => Refusal::InUse,
                    _ => Refusal::Unavailable,
                });
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_lists_a_forwards_visitor_connections_oldest_first_up_to_its_cap() {
        let streams = Arc::new(HeldStreams::default());
        let mut kept = Vec::new();
        for id in 0..(MAX_LISTED_VISITORS as u64 + 20) {
            let header = StreamHeader {
                id,
                forward: 0,
                // Every other one on a port of another forward.
                port: if id % 2 == 0 { 2222 } else { 8080 },
                visitor: SocketAddr::from(([198, 51, 100, 7], 40_000 + id as u16)),
            };
            kept.push(streams.add(header, 1).unwrap());
        }
        let ssh: PortSpec = "2222/tcp".parse().unwrap();
        let web: PortSpec = "8080/tcp".parse().unwrap();
        let listed = visitors_of(&streams, ssh);
        assert_eq!(listed.len(), (MAX_LISTED_VISITORS + 20) / 2);
        assert_eq!(listed[0].address, "198.51.100.7:40000");
        assert_eq!(listed[1].address, "198.51.100.7:40002");
        let both: PortSpec = "2222-8080/tcp".parse().unwrap();
        assert_eq!(visitors_of(&streams, both).len(), MAX_LISTED_VISITORS);
        assert_eq!(visitors_of(&streams, web)[0].address, "198.51.100.7:40001");
        drop(kept);
        assert!(
            visitors_of(&streams, both).is_empty(),
            "a closed one is gone"
        );
    }
}
