//! The relay: a QUIC endpoint that admits listed agents, and the drain on shutdown.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tether_common::config::RelayConfig;
use tether_common::net::ports::Proto;
use tether_common::service::fdstore::Store;
use tether_common::transport::{carrier, quic, socket, Path};
use tether_common::trust::identity::{Fingerprint, Identity};
use tether_common::trust::tls::{self, AgentPins, TlsError};
use tether_common::wire::datagram::{DropReason, UdpCounters};
use tether_common::wire::protocol::CloseCode;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::agents::{self, Summary};
use crate::audit::Audit;
use crate::carriers::{self, TcpPath};
use crate::handover::{self, HandOver};
use crate::handshakes::{Pending, Verdict};
use crate::invites::Invites;
use crate::limits::Limits;
use crate::places::Seats;
use crate::public::Kept;
use crate::session;
use crate::shared::Shared;
use crate::status::RelayStatus;
use crate::tally::{self, Tally};
use crate::visitor;

/// How long a draining relay waits, at most, for its closed connections to go idle.
const CLOSE_LINGER: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("cannot listen on {address}: {source}")]
    Bind {
        address: SocketAddr,
        source: io::Error,
    },
    #[error("cannot listen on {address}/tcp (listen_tcp): {source}")]
    BindTcp {
        address: SocketAddr,
        source: io::Error,
    },
}

/// A relay bound to its QUIC address (and its TCP one, if it has one), ready to [`Relay::run`].
pub struct Relay {
    endpoint: quinn::Endpoint,
    tcp: Option<TcpPath>,
    shared: Arc<Shared>,
    fingerprint: tether_common::trust::identity::Fingerprint,
    /// Signs the state a restart leaves for the next process.
    state_key: ring::hmac::Key,
}

impl Relay {
    /// Binds the QUIC endpoint on `config.listen`.
    pub fn bind(config: RelayConfig, identity: &Identity) -> Result<Self, RelayError> {
        Self::bind_with(config, identity, Limits::default())
    }

    /// [`Relay::bind`] with other timings.
    pub fn bind_with(
        config: RelayConfig,
        identity: &Identity,
        limits: Limits,
    ) -> Result<Self, RelayError> {
        Self::bind_on(config, identity, limits, handover::Adopted::default())
    }

    /// [`Relay::bind_with`], taking over what the previous process handed over through
    /// systemd (`passed`, see [`handover`]): its sockets where agents connect, and each agent
    /// it kept, put back as if its session had just been lost, its ports listening on the
    /// same sockets and its visitor connections held for its next session. Within the
    /// runtime: the visitors' tasks start here.
    pub fn take_over(
        config: RelayConfig,
        identity: &Identity,
        limits: Limits,
        passed: Vec<(String, std::os::fd::OwnedFd)>,
    ) -> Result<Self, RelayError> {
        let passed_any = !passed.is_empty();
        let adopted = handover::adopt(
            passed,
            &handover::state_path(&config.status_socket),
            &handover::state_key(identity),
            config.agents.len(),
            config.resume_window,
        );
        // Kept by systemd until now, taken or refused: a connection closed from here on must
        // close for real. Listening sockets stay kept under their own names.
        if passed_any {
            if let Ok(store) = handover::systemd_store() {
                if let Err(error) = store.forget(handover::FD_NAME) {
                    tracing::warn!(%error, "cannot ask systemd to forget the handed-over sockets");
                }
            }
        }
        Self::bind_on(config, identity, limits, adopted)
    }

    fn bind_on(
        config: RelayConfig,
        identity: &Identity,
        limits: Limits,
        mut adopted: handover::Adopted,
    ) -> Result<Self, RelayError> {
        let refused_handshakes = Arc::new(Tally::new("handshake refused"));
        let pins = {
            let tally = refused_handshakes.clone();
            let on_refused = move |fp: &Fingerprint| {
                tally.record("agent key not listed", fp);
            };
            let known = config.agents.iter().map(|a| a.fingerprint);
            Arc::new(AgentPins::with_on_refused(known, Box::new(on_refused)))
        };
        let mut server = tls::server_config(identity, pins.clone())?;
        let tcp_server = {
            let mut server = server.clone();
            server.transport_config(Arc::new(carrier::transport(quic::relay_transport())));
            server
        };
        server
            .transport_config(quic::relay())
            // Attempts the accept loop has not decided on yet: it decides on each at once, so
            // these bound only a stall.
            .max_incoming(1024)
            .incoming_buffer_size(64 * 1024)
            .incoming_buffer_size_total(4 * 1024 * 1024);
        // Where agents connect: the previous process's sockets if it left them, so that an
        // agent's first packets after a restart or a crash wait there for this process; kept
        // in systemd's store from here on, for the next.
        let store = handover::systemd_store().ok();
        let keep = |name: &str, socket: BorrowedFd<'_>, adopted: bool| {
            Kept::keep(store.as_ref(), name.to_owned(), socket, adopted)
        };
        let adopted_udp = adopted.take(Proto::Udp, config.listen);
        let udp_was_kept = adopted_udp.is_some();
        let endpoint = match adopted_udp {
            Some(fd) => Ok(std::net::UdpSocket::from(fd)),
            None => quic::udp_socket(config.listen),
        }
        .and_then(|socket| {
            keep(handover::LISTEN_UDP, socket.as_fd(), udp_was_kept);
            let runtime = Arc::new(socket::Runtime);
            let endpoint = quic::relay_endpoint(identity);
            quinn::Endpoint::new(endpoint, Some(server), socket, runtime)
        })
        .map_err(|source| RelayError::Bind {
            address: config.listen,
            source,
        })?;
        let tcp = match config.listen_tcp {
            None => None,
            Some(address) => {
                let adopted_tcp = adopted.take(Proto::Tcp, address);
                let tcp_was_kept = adopted_tcp.is_some();
                let listener = match adopted_tcp {
                    Some(fd) => {
                        let listener = std::net::TcpListener::from(fd);
                        listener
                            .set_nonblocking(true)
                            .and_then(|()| tokio::net::TcpListener::from_std(listener))
                    }
                    None => carriers::bind(address),
                }
                .map_err(|source| RelayError::BindTcp { address, source })?;
                keep(handover::LISTEN_TCP, listener.as_fd(), tcp_was_kept);
                Some(TcpPath {
                    listener,
                    tls: TlsAcceptor::from(tls::tcp_server_config(identity, pins.clone())?),
                    endpoint: quic::relay_endpoint(identity),
                    server: tcp_server,
                })
            }
        };
        let visitors = Arc::new(Seats::new(limits.max_visitors));
        let shared = Arc::new(Shared {
            agents: RwLock::new(config.agents.clone().into()),
            invites: Invites::new(pins.clone()),
            pins: pins.clone(),
            config,
            limits,
            table: Mutex::default(),
            tasks: TaskTracker::new(),
            shutdown: CancellationToken::new(),
            udp: Arc::default(),
            refused_visitors: Tally::new("visitor refused"),
            visitors,
            audit: Audit::default(),
            refused_handshakes,
            hand_over: HandOver::default(),
            adopted_ports: Mutex::default(),
            store,
        });
        restore(&shared, adopted);
        Ok(Self {
            endpoint,
            tcp,
            shared,
            fingerprint: identity.fingerprint(),
            state_key: handover::state_key(identity),
        })
    }

    /// The UDP address agents connect to (useful when `listen` had port 0).
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.endpoint.local_addr()
    }

    /// The TCP address agents connect to when UDP does not pass, if the relay listens on one.
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        self.tcp.as_ref()?.listener.local_addr().ok()
    }

    /// Follows how many agents and forwards the relay serves.
    pub fn summary(&self) -> watch::Receiver<Summary> {
        self.shared.table().summary()
    }

    /// What every task of the relay shares.
    pub(crate) fn shared(&self) -> Arc<Shared> {
        self.shared.clone()
    }

    /// A handle that reads the relay's state (for the status socket and the metrics) and
    /// reloads its config.
    pub fn control(&self) -> Control {
        Control {
            shared: self.shared.clone(),
            listen: self.local_addr().map_or("?".into(), |a| a.to_string()),
            fingerprint: self.fingerprint,
        }
    }

    /// What happened to UDP traffic since the relay started.
    pub fn udp_counters(&self) -> Arc<UdpCounters> {
        self.shared.udp.clone()
    }

    /// Serves agents and visitors until `shutdown` is cancelled, then drains: stops accepting,
    /// closes every session with [`CloseCode::RelayShutdown`] so agents reconnect at once, and
    /// returns within [`Limits::shutdown_grace`]. If the relay was asked to restart
    /// ([`Control::request_restart`]) and systemd keeps descriptors for it, it hands its ports
    /// and visitor connections over instead (see [`handover`]).
    pub async fn run(self, shutdown: CancellationToken) {
        let listen_tcp = self.tcp_addr().map_or("off".into(), |a| a.to_string());
        let Relay {
            endpoint,
            tcp,
            shared,
            fingerprint,
            state_key,
        } = self;
        tracing::info!(
            listen = %endpoint.local_addr().map_or("?".into(), |a| a.to_string()),
            %listen_tcp,
            %fingerprint,
            agents = shared.config.agents.len(),
            "relay listening"
        );
        if shared.config.agents.is_empty() {
            tracing::warn!(
                "relay.toml lists no [[agent]]: no agent can connect until one is \
                 (tether-relay invite NAME --ports ... adds one)"
            );
        }
        let pending = Pending::new(&shared.limits);
        let tallies = [&*shared.refused_handshakes, &shared.refused_visitors];
        let period = shared.limits.log_summary_every;
        let flush = || {
            for tally in tallies {
                tally.flush();
            }
            shared.audit.flush(period);
        };
        let summaries = tally::flush_every(period, flush);
        tokio::pin!(summaries);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = &mut summaries => {}
                incoming = endpoint.accept() => match incoming {
                    Some(incoming) => admit(&shared, &pending, incoming),
                    None => break,
                },
                accepted = accept_tcp(tcp.as_ref()) => match accepted {
                    Ok((tcp_stream, peer)) => {
                        if let Some(path) = &tcp {
                            path.admit(&shared, &pending, tcp_stream, peer);
                        }
                    }
                    Err(error) => {
                        // Out of file descriptors and the like: pause rather than spin.
                        tracing::warn!(%error, "accepting an agent over TCP failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
            }
        }
        // What was counted since the last summary is logged before the relay stops.
        for tally in tallies {
            tally.flush();
        }
        shared.audit.flush(period);
        // No new agent over TCP; those connected are closed with their sessions.
        drop(tcp);
        let store = match shared.hand_over.is_requested() {
            true => store_for_restart(),
            false => None,
        };
        let code = match store {
            Some(_) => {
                // First, so that every visitor connection stops where it is before the
                // sessions close under it.
                shared.hand_over.token.cancel();
                CloseCode::RelayRestart
            }
            None => CloseCode::RelayShutdown,
        };
        shared.shutdown.cancel();
        endpoint.close(code.code(), code.reason().as_bytes());
        shared.tasks.close();
        let handing_over = store.is_some();
        let drained = async {
            shared.tasks.wait().await;
            // The goodbyes went out at once; waiting for idle lets a lost one be sent again.
            // A connection dropped mid-handshake would hold this up for its whole closing
            // period (3 s at QUIC's initial RTT estimate), hence the bound. Not on a restart,
            // whose visitors wait for it: an agent that missed the goodbye hears of the
            // restart from the next process (a stateless reset), and handshakes that agents
            // abandoned while reconnecting held the restart up for the whole bound (seen
            // under systemd: 1.1 s of pause, where 0.36 s without them).
            if !handing_over {
                let _ = tokio::time::timeout(CLOSE_LINGER, endpoint.wait_idle()).await;
            }
        };
        let grace = shared.limits.shutdown_grace;
        if tokio::time::timeout(grace, drained).await.is_err() {
            tracing::warn!("drain took longer than {grace:?}; exiting anyway");
        }
        if let Some(store) = store {
            match hand_over(&shared, &store, &state_key) {
                Ok(counts) => tracing::info!(
                    agents = counts.agents,
                    ports = counts.ports,
                    connections = counts.connections,
                    "relay stopped; its ports and connections wait in systemd for the next start"
                ),
                Err(error) => tracing::error!(
                    %error,
                    "cannot hand the ports and connections to systemd; they close"
                ),
            }
            return;
        }
        tracing::info!("relay stopped");
    }
}

/// systemd's descriptor store, for a relay asked to restart; `None`, with a log line saying
/// why, where there is none to keep its connections (it then drains as for a stop).
fn store_for_restart() -> Option<Arc<Store>> {
    match handover::systemd_store() {
        Ok(store) => Some(store),
        Err(why) => {
            tracing::warn!("asked to restart keeping connections, but {why}: draining instead");
            None
        }
    }
}

/// Hands the ports and visitor connections of every agent whose session may be resumed to
/// systemd, and writes what the next process needs beside them. Visitors of other agents, and
/// those whose agent is not known, close as the process exits.
fn hand_over(
    shared: &Shared,
    store: &Store,
    key: &ring::hmac::Key,
) -> io::Result<handover::Counts> {
    let handed = shared.hand_over.take();
    let kept = shared.table().hand_over();
    let mut counts = handover::Counts::default();
    // Listening sockets are in the store already, under names of their own.
    let mut sockets = Vec::new();
    let mut owner = HashMap::new();
    let mut agents = Vec::with_capacity(kept.len());
    for (index, agent) in kept.into_iter().enumerate() {
        for ((proto, port), listening) in agent.ports {
            if proto == Proto::Tcp {
                owner.insert(port, index);
            }
            match listening.hand_over() {
                Ok(fd) => {
                    sockets.extend(fd);
                    counts.ports += 1;
                }
                Err(error) => tracing::warn!(port, %error, "cannot hand a public port over"),
            }
        }
        agents.push(handover::AgentState {
            name: agent.name,
            session: agent.session,
            next_stream: agent.next_stream,
            next_flow: agent.flows,
            forwards: agent.forwards,
            streams: Vec::new(),
        });
    }
    for handed in handed {
        let Some(&index) = owner.get(&handed.snapshot.header.port) else {
            continue;
        };
        let Ok(public) = handed.tcp.local_addr() else {
            continue;
        };
        agents[index].streams.push(handover::StreamState {
            snapshot: handed.snapshot,
            public: handover::canonical(public),
        });
        sockets.push(std::os::fd::OwnedFd::from(handed.tcp));
        counts.connections += 1;
    }
    counts.agents = agents.len();
    let state = handover::State {
        written: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        boot_id: handover::boot_id(),
        agents,
    };
    let path = handover::state_path(&shared.config.status_socket);
    handover::keep(store, &sockets, &state, key, &path)?;
    Ok(counts)
}

/// Puts back each agent of the previous process's state that is still listed (see
/// [`Relay::take_over`]); whatever is not put back is closed, with a log line.
fn restore(shared: &Arc<Shared>, adopted: handover::Adopted) -> handover::Counts {
    let mut counts = handover::Counts::default();
    let handover::Adopted {
        ports,
        mut connections,
        state,
    } = adopted;
    let (port_count, sockets) = (ports.len(), ports.len() + connections.len());
    *shared
        .adopted_ports
        .lock()
        .unwrap_or_else(|e| e.into_inner()) = ports;
    let Some(state) = state else {
        // Ports without a state (it was refused): each goes to its agent when the agent asks
        // for it again, and closes if no agent does within the port hold.
        if port_count > 0 {
            release_adopted_after(shared, shared.limits.port_hold);
        }
        return counts;
    };
    let streams: usize = state.agents.iter().map(|a| a.streams.len()).sum();
    if sockets == 0 && streams > 0 {
        tracing::warn!(
            "the previous process kept {streams} visitor connections but systemd passed no \
             socket (the unit needs FileDescriptorStoreMax=); they are closed"
        );
    }
    for agent in state.agents {
        let Some(entry) = shared
            .agents()
            .iter()
            .find(|a| a.name == agent.name)
            .cloned()
        else {
            tracing::info!(
                agent = agent.name,
                connections = agent.streams.len(),
                "the previous process kept this agent's connections, but it is no longer \
             listed; they are closed"
            );
            continue;
        };
        let restored = {
            let mut table = shared.table();
            let doors = session::PublicPorts(shared);
            let (results, routes) =
                table.open_forwards(&doors, &shared.limits, &entry, &agent.forwards);
            let udp = agents::udp_forwards(&agent.forwards, &results).collect();
            let away = table.restore_away(
                &entry.name,
                agent.session,
                (agent.next_stream, agent.next_flow),
                udp,
                &shared.limits,
            );
            away.map(|(generation, streams)| (generation, streams, routes))
        };
        let Some((generation, streams, routes)) = restored else {
            continue;
        };
        session::hold_ports(shared, &entry.name, generation, true);
        counts.agents += 1;
        let (mut carried, mut closed) = (0, 0);
        for stream in agent.streams {
            let header = stream.snapshot.header;
            let Some(tcp) = connections.remove(&(stream.public, header.visitor)) else {
                closed += 1;
                continue;
            };
            let adopted = routes
                .get(&(Proto::Tcp, header.port))
                .ok_or("its forward is no longer open")
                .and_then(|route| {
                    let (held, registration) = streams
                        .restore(stream.snapshot, agent.session)
                        .ok_or("its offsets or bytes do not hold")?;
                    visitor::adopt(shared, tcp, route.clone(), held, registration)
                });
            match adopted {
                Ok(()) => carried += 1,
                Err(why) => {
                    tracing::info!(agent = entry.name, visitor = %header.visitor, "a handed-over connection is closed: {why}");
                    closed += 1;
                }
            }
        }
        counts.connections += carried;
        tracing::info!(
            agent = entry.name,
            connections = carried,
            closed,
            "took over the agent's ports and connections from the previous process; they wait \
             for its next session"
        );
    }
    if !connections.is_empty() {
        tracing::info!(
            count = connections.len(),
            "handed-over connections that no kept stream names are closed"
        );
    }
    // Ports no agent asked for again close here.
    let leftover = shared
        .adopted_ports
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .len();
    shared.release_adopted();
    counts.ports = port_count - leftover;
    counts
}

/// Closes, after `hold`, the public ports the previous process left that no agent asked for
/// again.
fn release_adopted_after(shared: &Arc<Shared>, hold: Duration) {
    let shared2 = shared.clone();
    shared.tasks.spawn(async move {
        tokio::select! {
            () = tokio::time::sleep(hold) => {}
            () = shared2.shutdown.cancelled() => {}
        }
        shared2.release_adopted();
    });
}

/// What a reload changed, by agent name.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Reloaded {
    /// Listed now, and not before (or with another key).
    pub added: Vec<String>,
    /// No longer listed (or listed with another key): disconnected.
    pub removed: Vec<String>,
    /// Listed with other ports.
    pub changed: Vec<String>,
    /// Of those changed, the ones whose session was closed so that they ask again.
    pub reconnected: Vec<String>,
    /// Settings that changed and take effect only at the next start.
    pub needs_restart: Vec<&'static str>,
}

impl Reloaded {
    /// Says in the log what the reload did.
    pub fn log(&self) {
        let list = |names: &[String]| names.join(", ");
        if !self.added.is_empty() {
            tracing::info!(agents = list(&self.added), "reload: agents added");
        }
        if !self.removed.is_empty() {
            tracing::info!(
                agents = list(&self.removed),
                "reload: agents removed and disconnected"
            );
        }
        if !self.changed.is_empty() {
            tracing::info!(
                agents = list(&self.changed),
                reconnected = list(&self.reconnected),
                "reload: allowlists changed"
            );
        }
        for key in &self.needs_restart {
            tracing::warn!("reload: {key} changed; it takes effect at the next restart");
        }
        tracing::info!("reload done");
    }
}

/// Reads the state of a running relay, and reloads its config.
#[derive(Clone)]
pub struct Control {
    shared: Arc<Shared>,
    listen: String,
    fingerprint: Fingerprint,
}

impl std::fmt::Debug for Control {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Control")
            .field("listen", &self.listen)
            .finish_non_exhaustive()
    }
}

impl Control {
    /// Asks the relay's next stop to be a restart that keeps its connections (see
    /// [`handover`]); the stop itself comes from the shutdown token, as any stop's.
    pub fn request_restart(&self) {
        self.shared.hand_over.request();
    }

    /// Applies a new config's agents: a removed agent (or one whose key changed) is disconnected
    /// and its ports closed, a new one is accepted from now on, and an agent whose allowlist
    /// changed what its session may open reconnects to ask again. Other sessions go on
    /// untouched. Settings that only a restart applies are named in the answer, and kept.
    pub fn reload(&self, config: RelayConfig) -> Reloaded {
        let shared = &self.shared;
        let old = &shared.config;
        let mut reloaded = Reloaded::default();
        let restart_only = [
            ("listen", old.listen != config.listen),
            ("listen_tcp", old.listen_tcp != config.listen_tcp),
            ("key", old.key != config.key),
            ("public_bind", old.public_bind != config.public_bind),
            ("tcp_keepalive", old.tcp_keepalive != config.tcp_keepalive),
            ("resume_window", old.resume_window != config.resume_window),
            ("status_socket", old.status_socket != config.status_socket),
            ("metrics", old.metrics != config.metrics),
        ];
        reloaded.needs_restart = restart_only
            .iter()
            .filter(|(_, changed)| *changed)
            .map(|(key, _)| *key)
            .collect();
        // Under the table's lock, so that no session is published for an agent in between.
        let mut table = shared.table();
        let before = shared.agents();
        for agent in before.iter() {
            match config.agents.iter().find(|a| a.name == agent.name) {
                Some(now) if now.fingerprint == agent.fingerprint => {
                    if now.ports != agent.ports {
                        if table.allowlist_changed(now) {
                            reloaded.reconnected.push(agent.name.clone());
                        }
                        reloaded.changed.push(agent.name.clone());
                    }
                }
                _ => {
                    table.remove_agent(&agent.name);
                    reloaded.removed.push(agent.name.clone());
                }
            }
        }
        reloaded.added = config
            .agents
            .iter()
            .filter(|a| {
                !before
                    .iter()
                    .any(|b| b.name == a.name && b.fingerprint == a.fingerprint)
            })
            .map(|a| a.name.clone())
            .collect();
        shared
            .pins
            .replace(config.agents.iter().map(|a| a.fingerprint));
        *shared.agents.write().unwrap_or_else(|e| e.into_inner()) = config.agents.into();
        reloaded
    }

    /// Every listed agent, its latest session's forwards and what they carried.
    pub fn status(&self) -> RelayStatus {
        let shared = &self.shared;
        let agents = shared.table().agent_states(&shared.agents());
        let by_reason = |tally: &Tally| {
            tally
                .totals()
                .into_iter()
                .map(|(reason, n)| (reason.to_owned(), n))
                .collect()
        };
        let dropped_datagrams = DropReason::ALL
            .iter()
            .map(|&reason| (reason.label().to_owned(), shared.udp.dropped(reason)))
            .collect();
        RelayStatus {
            listen: self.listen.clone(),
            fingerprint: self.fingerprint.to_string(),
            agents,
            refused_handshakes: by_reason(&shared.refused_handshakes),
            refused_visitors: by_reason(&shared.refused_visitors),
            dropped_datagrams,
        }
    }
}

/// The next agent connection on the TCP listener; never, without one.
async fn accept_tcp(tcp: Option<&TcpPath>) -> io::Result<(tokio::net::TcpStream, SocketAddr)> {
    match tcp {
        Some(path) => path.listener.accept().await,
        None => std::future::pending().await,
    }
}

/// Starts the handshake of a connection attempt, asks it to prove its address, or drops it.
fn admit(shared: &Arc<Shared>, pending: &Pending, incoming: quinn::Incoming) {
    let remote = incoming.remote_address();
    let verdict = pending.consider(
        remote.ip().to_canonical(),
        incoming.remote_address_validated(),
        incoming.may_retry(),
    );
    match verdict {
        Verdict::Accept(place) => {
            shared
                .tasks
                .spawn(session::serve(shared.clone(), incoming, place, Path::Quic));
        }
        Verdict::Retry => {
            if let Err(error) = incoming.retry() {
                error.into_incoming().ignore();
            }
        }
        Verdict::Drop(reason) => {
            shared
                .refused_handshakes
                .record(reason, &remote.ip().to_canonical());
            incoming.ignore();
        }
    }
}
