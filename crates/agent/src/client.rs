//! The agent's connect loop: resolve the relay, handshake with its pinned key, run a session,
//! and when it ends, try again: after a backoff when the relay answered with an error; at once
//! when the relay restarted or got no answer at all (the link may be back any moment, and the
//! attempt itself already waited).

use std::future::{poll_fn, Future};
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use quinn::EndpointConfig;
use rustls::pki_types::ServerName;
use tether_common::carry::resume::{HeldStreams, DEFAULT_RESUME_WINDOW};
use tether_common::config::{AgentConfig, HostPort};
use tether_common::service::report;
use tether_common::transport::choose::{Chooser, Silence, RETRY_MOVE_AFTER, STALLED_AFTER};
use tether_common::transport::{carrier, proxy, quic, socket, Path};
use tether_common::trust::identity::{Fingerprint, Identity};
use tether_common::trust::tls::{self, RelayPin, TlsError};
use tether_common::wire::datagram::{DropReason, UdpCounters};
use tether_common::wire::protocol::{CloseCode, ForwardResult, SessionId};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_rustls::TlsConnector;
use tokio_util::sync::CancellationToken;
use tokio_util::task::{AbortOnDropHandle, TaskTracker};
use tracing::Instrument;

use crate::backoff::Backoff;
use crate::forwards::Offered;
use crate::probe;
use crate::session::{self, Context, SessionEnd};
use crate::status::{AgentReport, AgentStatus, ForwardReport, Tracker};

/// How long one attempt to reach the relay may take, name lookup and handshake included.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A session that stayed up this long resets the backoff.
pub const STABLE_AFTER: Duration = Duration::from_secs(10);

/// After a restarting relay's goodbye, and while the relay does not answer, an attempt starts a
/// fresh handshake this often (besides QUIC's own retransmissions, which back off), so that the
/// agent is back within a fraction of a second of the relay or the link. The cost while the link
/// is down: a 1,200-byte Initial packet each time, its retransmission a second later, and the
/// close of the oldest handshake given up (see [`MAX_HANDSHAKES`]).
const RESTART_PROBE: Duration = Duration::from_millis(250);

/// How soon the agent tries again when a relay that just said goodbye for a restart that keeps
/// the connections ([`CloseCode::RelayRestart`]) refuses the attempt as it drains: the old
/// process is about to hand over and exit, the new one to answer.
/// Trying at the usual backoff (0.5 s) made most of a restart's pause (seen under systemd:
/// the new relay answered 0.18 s before the agent asked again).
const DRAINING_RETRY: Duration = Duration::from_millis(50);

/// For how long after such a goodbye the agent tries again every [`DRAINING_RETRY`]; then
/// it backs off as usual.
const DRAINING_RETRY_FOR: Duration = Duration::from_secs(3);

/// For how long the relay may go unanswered before the agent stops starting a handshake every
/// [`RESTART_PROBE`] and only retries with QUIC's backed-off retransmissions: the length of the
/// default resume window, in which every connection held on both ends waits for the link.
const PROBE_UNANSWERED_FOR: Duration = DEFAULT_RESUME_WINDOW;

/// Handshakes one attempt keeps in flight at most.
const MAX_HANDSHAKES: usize = 8;

/// While the relay does not answer, how often the log says so again.
const STILL_UNANSWERED_EVERY: Duration = Duration::from_secs(300);

/// How long the agent waits for its goodbye to the relay to go out when it stops.
pub const CLOSE_GRACE: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("idle_timeout is too long for QUIC")]
    IdleTimeout,
}

/// Why one attempt to reach the relay failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("cannot resolve {relay}: {source}")]
    Resolve { relay: String, source: io::Error },
    #[error("{relay} resolves to no address")]
    NoAddress { relay: String },
    #[error("cannot open a UDP socket: {0}")]
    Socket(io::Error),
    #[error("no answer from the relay at {relay} within {limit:?}")]
    Timeout { relay: String, limit: Duration },
    #[error(
        "the relay at {address} shows key {got}, but relay_fingerprint pins {expected}; \
         refusing to connect"
    )]
    WrongRelay {
        address: SocketAddr,
        expected: Fingerprint,
        got: Fingerprint,
    },
    #[error(
        "the relay at {address} refused this agent's key {fingerprint}; list it in the relay's \
         relay.toml (tether-agent fingerprint prints it)"
    )]
    KeyRefused {
        address: SocketAddr,
        fingerprint: Fingerprint,
    },
    #[error("handshake with {address} failed: {source}")]
    Handshake {
        address: SocketAddr,
        source: quinn::ConnectionError,
    },
    #[error("cannot start a connection: {0}")]
    Connect(#[from] quinn::ConnectError),
    #[error("cannot connect over TCP to {relay}: {source}")]
    Tcp { relay: String, source: io::Error },
    #[error("no answer over TCP from the relay at {relay} within {CONNECT_TIMEOUT:?}")]
    TcpTimeout { relay: String },
    #[error("TLS over TCP with {address} failed: {source}")]
    TlsOverTcp {
        address: SocketAddr,
        source: io::Error,
    },
    #[error(transparent)]
    Proxy(#[from] proxy::ProxyError),
    /// Both paths were tried, and neither answered.
    #[error("{quic}; over TCP: {tcp}")]
    Neither {
        quic: Box<ConnectError>,
        tcp: Box<ConnectError>,
    },
}

impl ConnectError {
    /// Whether the relay refused a new session because it is draining, as it does on its way
    /// to a restart (QUIC's CONNECTION_REFUSED).
    fn relay_draining(&self) -> bool {
        match self {
            ConnectError::Handshake {
                source: quinn::ConnectionError::ConnectionClosed(close),
                ..
            } => close.error_code == quinn::TransportErrorCode::CONNECTION_REFUSED,
            ConnectError::Neither { quic, .. } => quic.relay_draining(),
            _ => false,
        }
    }

    /// Whether the relay gave no answer at all over QUIC: the link may be back any moment, so
    /// the next attempt starts at once.
    fn unanswered(&self) -> bool {
        match self {
            ConnectError::Timeout { .. } => true,
            ConnectError::Neither { quic, .. } => quic.unanswered(),
            _ => false,
        }
    }
}

/// A connection to the relay, ready for a session.
pub struct Connected {
    pub(crate) endpoint: quinn::Endpoint,
    pub(crate) conn: quinn::Connection,
    path: Path,
    /// On TCP: completes when the carrier's TCP connection ends.
    broken: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
}

/// What the connect loop does after a session.
enum Next {
    Stop,
    /// The relay is restarting: reconnect without waiting; `handing_over` if its next process
    /// keeps the connections and is about to answer.
    AtOnce {
        handing_over: bool,
    },
    /// Wait out the backoff; the string says why, for the log and the status.
    AfterBackoff(String),
    /// The relay went silent (the link may be down): wait out the backoff, then try with a
    /// fresh handshake every [`RESTART_PROBE`], to be back as soon as the link is.
    AfterSilence(String),
}

/// The agent: keeps one session to the relay up for as long as it runs.
pub struct Agent {
    config: AgentConfig,
    fingerprint: Fingerprint,
    /// QUIC's client configuration, for the UDP path.
    client: quinn::ClientConfig,
    /// The same, for a session over a carrier: TCP's packet size.
    tcp_client: quinn::ClientConfig,
    /// TLS over TCP, with the same key and pin.
    tcp_tls: TlsConnector,
    pin: Arc<RelayPin>,
    /// The forwards to offer the relay, as the config (or its latest reload) says.
    forwards: Arc<watch::Sender<Arc<[Offered]>>>,
    status: watch::Sender<AgentStatus>,
    tracker: Arc<Tracker>,
    udp: Arc<UdpCounters>,
    /// Local connections, held across sessions.
    streams: Arc<HeldStreams>,
    /// The tasks that carry them.
    tasks: TaskTracker,
}

impl Agent {
    pub fn new(config: AgentConfig, identity: &Identity) -> Result<Self, AgentError> {
        Self::speaking(config, identity, tls::ALPN)
    }

    /// An agent whose sessions speak `alpn`: [`tls::ALPN`], or [`tls::ALPN_JOIN`] to join.
    pub(crate) fn speaking(
        config: AgentConfig,
        identity: &Identity,
        alpn: &[u8],
    ) -> Result<Self, AgentError> {
        let (mut client, pin) = tls::client_config_for(identity, config.relay_fingerprint, alpn)?;
        let transport = || {
            quic::agent(config.keepalive, config.idle_timeout).map_err(|_| AgentError::IdleTimeout)
        };
        let mut tcp_client = client.clone();
        tcp_client.transport_config(Arc::new(carrier::transport(transport()?)));
        client.transport_config(Arc::new(transport()?));
        let tcp_tls = TlsConnector::from(tls::tcp_client_config(identity, &pin)?);
        Ok(Self {
            fingerprint: identity.fingerprint(),
            client,
            tcp_client,
            tcp_tls,
            pin,
            forwards: Arc::new(watch::Sender::new(
                config.forwards.iter().cloned().map(Offered::new).collect(),
            )),
            status: watch::Sender::new(AgentStatus::Connecting { last_error: None }),
            tracker: Arc::default(),
            udp: Arc::default(),
            streams: Arc::default(),
            tasks: TaskTracker::new(),
            config,
        })
    }

    /// Follows what the agent is doing.
    pub fn status(&self) -> watch::Receiver<AgentStatus> {
        self.status.subscribe()
    }

    /// A handle that reads the agent's state (for the status socket and the metrics) and
    /// reloads its forwards.
    pub fn control(&self) -> AgentControl {
        AgentControl {
            config: self.config.clone(),
            relay: self.config.relay.to_string(),
            relay_fingerprint: self.config.relay_fingerprint,
            fingerprint: self.fingerprint,
            forwards: self.forwards.clone(),
            status: self.status.subscribe(),
            tracker: self.tracker.clone(),
            udp: self.udp.clone(),
        }
    }

    /// What happened to UDP traffic since the agent started.
    pub fn udp_counters(&self) -> Arc<UdpCounters> {
        self.udp.clone()
    }

    /// Connects and reconnects until `shutdown` is cancelled.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut backoff = Backoff::default();
        let mut last_session: Option<SessionId> = None;
        let mut latest_flows = None;
        let mut probe = None;
        // When the relay last said it restarts (see `DRAINING_RETRY`).
        let mut restarted_at: Option<Instant> = None;
        let mut unanswered = Unanswered::default();
        let mut reused = None;
        let mut chooser = Chooser::new(self.config.transport);
        // A connection on another path, made during the last session to move there.
        let mut moved: Option<Connected> = None;
        // Why the last attempt or session failed, shown while the next attempt runs.
        let mut last_error = None;
        tracing::info!(
            relay = %self.config.relay,
            relay_key = %self.config.relay_fingerprint,
            transport = %self.config.transport,
            agent_key = %self.fingerprint,
            "agent starting"
        );
        while !shutdown.is_cancelled() {
            // The attempt failed because the relay drains, on its way to a restart.
            let mut restarting = false;
            let attempt = match moved.take() {
                Some(connected) => Ok(connected),
                None => {
                    self.status.send_replace(AgentStatus::Connecting {
                        last_error: last_error.take(),
                    });
                    tokio::select! {
                        () = shutdown.cancelled() => break,
                        attempt = self.connect(&mut reused, probe.take(), &chooser) => attempt,
                    }
                }
            };
            let error = match attempt {
                Ok(connected) => {
                    unanswered.answered();
                    restarted_at = None;
                    chooser.connected(connected.path);
                    let started = Instant::now();
                    let run = Running {
                        last_session: &mut last_session,
                        latest_flows: &mut latest_flows,
                        reused: &mut reused,
                        chooser: &mut chooser,
                        shutdown: &shutdown,
                    };
                    let (next, next_path) = self.session_on(connected, run).await;
                    if started.elapsed() >= STABLE_AFTER {
                        backoff.reset();
                    }
                    if next_path.is_some() && !matches!(next, Next::Stop) {
                        moved = next_path;
                        continue;
                    }
                    match next {
                        Next::Stop => break,
                        Next::AtOnce { handing_over } => {
                            backoff.reset();
                            probe = Some(RESTART_PROBE);
                            restarted_at = handing_over.then(Instant::now);
                            continue;
                        }
                        Next::AfterBackoff(error) => error,
                        Next::AfterSilence(error) => {
                            probe = Some(RESTART_PROBE);
                            error
                        }
                    }
                }
                Err(error) if error.unanswered() => {
                    let error = error.to_string();
                    unanswered.log(&error);
                    self.status.send_replace(AgentStatus::Waiting {
                        retry_in: Duration::ZERO,
                        error: error.clone(),
                    });
                    self.tracker.failed(&error);
                    last_error = Some(error);
                    probe = unanswered.probe(Instant::now());
                    continue;
                }
                Err(error) => {
                    restarting = error.relay_draining();
                    error.to_string()
                }
            };
            let just_restarted = restarted_at.is_some_and(|at| at.elapsed() < DRAINING_RETRY_FOR);
            let retry_in = match restarting && just_restarted {
                true => DRAINING_RETRY,
                false => backoff.next_delay(rand::random()),
            };
            if restarting && just_restarted {
                // Expected for a moment, and asked again every 50 ms: not for the log each time.
                tracing::debug!(%error, "the relay is handing over to its next process; asking again");
            } else if restarting {
                // Expected while a relay restarts: it refuses new sessions as it drains.
                tracing::info!(%error, "the relay is stopping or restarting; reconnecting in {:.1}s", retry_in.as_secs_f64());
            } else {
                tracing::warn!(%error, "reconnecting in {:.1}s", retry_in.as_secs_f64());
            }
            self.status.send_replace(AgentStatus::Waiting {
                retry_in,
                error: error.clone(),
            });
            self.tracker.failed(&error);
            last_error = Some(error);
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = tokio::time::sleep(retry_in) => {}
            }
        }
        // The held connections see the shutdown and close at once.
        self.tasks.close();
        self.tasks.wait().await;
        self.status.send_replace(AgentStatus::Stopped);
        tracing::info!("agent stopped");
    }

    /// Runs a session on `connected` until it ends, and says what to do next. With `auto`, it
    /// moves to the other path when that one serves better (see [`Chooser`]): the session is
    /// closed, and the connection on the other path is returned, for the next session to
    /// resume this one at once.
    async fn session_on(
        &self,
        connected: Connected,
        run: Running<'_>,
    ) -> (Next, Option<Connected>) {
        let Connected {
            endpoint,
            conn,
            path,
            broken,
        } = connected;
        let Running {
            last_session,
            latest_flows,
            reused,
            chooser,
            shutdown,
        } = run;
        let why = chooser.why(path);
        self.tracker.on_path(path, why);
        match why {
            Some(why) => tracing::info!(%path, "connected over TCP: {why}"),
            None => tracing::debug!(%path, "connected"),
        }
        let session = self.session(&conn, last_session, latest_flows, shutdown);
        let better = self.better_path(&conn, path, chooser, reused);
        let broken = async {
            match broken {
                Some(broken) => broken.await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(session);
        let (next, moved) = tokio::select! {
            next = &mut session => (next, None),
            moved = better => {
                tracing::info!(from = %path, to = %moved.path, "moving the session to the other path");
                self.tracker.moved();
                CloseCode::PathChanged.close(&conn);
                (session.await, Some(moved))
            }
            () = broken => {
                CloseCode::PathLost.close(&conn);
                (session.await, None)
            }
        };
        // What the session said last (its goodbye, on a stop) goes out before its endpoint
        // goes; the UDP endpoint stays for the next attempt.
        if matches!(next, Next::Stop) || path == Path::Tcp {
            let _ = tokio::time::timeout(CLOSE_GRACE, endpoint.wait_idle()).await;
        }
        (next, moved)
    }

    /// Completes with a connection on the other path once the agent should move there: on
    /// QUIC, when the relay stopped answering over UDP and TCP reaches it; on TCP, when QUIC
    /// answers again. Never, unless `transport` is `auto`.
    async fn better_path(
        &self,
        conn: &quinn::Connection,
        path: Path,
        chooser: &mut Chooser,
        reused: &mut Option<quinn::Endpoint>,
    ) -> Connected {
        if chooser.watches_udp(path) {
            let stats = conn.stats();
            let mut silence = Silence::new(stats.udp_tx.datagrams, stats.udp_rx.datagrams);
            let mut tick = tokio::time::interval(WATCH_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut failures = 0u32;
            loop {
                tick.tick().await;
                let stalled = |silence: &mut Silence| {
                    let stats = conn.stats();
                    silence.stalled(
                        Instant::now(),
                        stats.udp_tx.datagrams,
                        stats.udp_rx.datagrams,
                    )
                };
                if !stalled(&mut silence) {
                    continue;
                }
                tracing::info!(
                    "the relay has not answered over UDP for {STALLED_AFTER:?}; trying TCP"
                );
                match self.connect_tcp().await {
                    Ok(tcp) if stalled(&mut silence) => {
                        chooser.udp_stalled();
                        return tcp;
                    }
                    Ok(tcp) => {
                        tracing::info!("the relay answers over UDP again; staying on QUIC");
                        CloseCode::PathChanged.close(&tcp.conn);
                    }
                    Err(error) => {
                        failures += 1;
                        // Said once: during an outage TCP fails as UDP does.
                        if failures == 1 {
                            tracing::info!(%error, "cannot move to TCP; trying again every {RETRY_MOVE_AFTER:?}");
                        } else {
                            tracing::debug!(%error, "cannot move to TCP");
                        }
                        tokio::time::sleep(RETRY_MOVE_AFTER).await;
                    }
                }
            }
        }
        if let Some(every) = chooser.probes_quic(path) {
            loop {
                tokio::time::sleep(every).await;
                match self.connect_quic(reused, None, CONNECT_TIMEOUT).await {
                    Ok(quic) => return quic,
                    Err(error) => {
                        tracing::debug!(%error, "QUIC still gets no answer; staying on TCP")
                    }
                }
            }
        }
        std::future::pending().await
    }

    /// Runs one session on `conn` and says what to do once it ends. `last_session` is the id
    /// to present for resuming, kept across sessions that end before they are set up, and
    /// `latest_flows` the UDP flows a resumed session goes on with.
    async fn session(
        &self,
        conn: &quinn::Connection,
        last_session: &mut Option<SessionId>,
        latest_flows: &mut Option<Arc<crate::udp::Flows>>,
        shutdown: &CancellationToken,
    ) -> Next {
        let span = tracing::info_span!("session", relay = %conn.remote_address());
        let _probe = self.config.keepalive.map(|keepalive| {
            let (conn, streams) = (conn.clone(), self.streams.clone());
            AbortOnDropHandle::new(tokio::spawn(async move {
                probe::while_silent(conn, keepalive, &streams).await
            }))
        });
        let cx = Context {
            status: &self.status,
            tracker: &self.tracker,
            udp: &self.udp,
            shutdown,
            streams: &self.streams,
            tasks: &self.tasks,
            resume_window: self.config.resume_window,
            flows: latest_flows,
        };
        let end = session::run(conn, self.forwards.subscribe(), *last_session, cx)
            .instrument(span)
            .await;
        match end {
            SessionEnd::Stopped => Next::Stop,
            SessionEnd::RelayRestarting {
                session,
                why,
                handing_over,
            } => {
                tracing::info!("{why}; reconnecting at once");
                *last_session = session.or(*last_session);
                Next::AtOnce { handing_over }
            }
            // TLS 1.3 lets the client finish first: a relay that refuses this agent's key says
            // so by closing the connection right after.
            SessionEnd::Lost {
                session: None,
                error,
            } => Next::AfterBackoff(match conn.close_reason() {
                Some(reason) => self.explain(conn.remote_address(), reason).to_string(),
                None => error,
            }),
            SessionEnd::Lost { session, error } => {
                *last_session = session.or(*last_session);
                match conn.close_reason() {
                    Some(quinn::ConnectionError::TimedOut) => Next::AfterSilence(error),
                    _ => Next::AfterBackoff(error),
                }
            }
        }
    }

    /// One attempt to reach the relay, on the paths [`Chooser::plan`] says, each from its
    /// moment: the first connection made wins, and the other attempt is dropped.
    pub(crate) async fn connect(
        &self,
        reused: &mut Option<quinn::Endpoint>,
        probe: Option<Duration>,
        chooser: &Chooser,
    ) -> Result<Connected, ConnectError> {
        let plan = chooser.plan();
        match (plan.quic, plan.tcp) {
            (Some(_), None) => self.connect_quic(reused, probe, CONNECT_TIMEOUT).await,
            (None, Some(_)) | (None, None) => self.connect_tcp().await,
            (Some(quic_after), Some(tcp_after)) => {
                // QUIC goes on trying until TCP's attempt ends too, so that the attempt has no
                // stretch without a handshake under way.
                let limit = CONNECT_TIMEOUT + tcp_after.saturating_sub(quic_after);
                let quic = after(quic_after, self.connect_quic(reused, probe, limit));
                let tcp = after(tcp_after, self.connect_tcp());
                tokio::pin!(quic, tcp);
                tokio::select! {
                    quic_result = &mut quic => match quic_result {
                        Ok(connected) => Ok(connected),
                        // The relay answered over UDP, with a refusal (a relay that drains
                        // refuses new sessions): UDP passes, and TCP would hear the same.
                        Err(quic_error) if !quic_error.unanswered() => Err(quic_error),
                        Err(quic_error) => tcp.await.map_err(|tcp_error| ConnectError::Neither {
                            quic: Box::new(quic_error),
                            tcp: Box::new(tcp_error),
                        }),
                    },
                    tcp_result = &mut tcp => match tcp_result {
                        Ok(connected) => Ok(connected),
                        Err(tcp_error) => quic.await.map_err(|quic_error| ConnectError::Neither {
                            quic: Box::new(quic_error),
                            tcp: Box::new(tcp_error),
                        }),
                    },
                }
            }
        }
    }

    /// One attempt over QUIC, of at most `limit`: resolve the relay's name afresh and handshake
    /// from a fresh UDP socket. With `probe`, a fresh handshake starts that often until one gets
    /// an answer; past [`MAX_HANDSHAKES`] under way, the oldest is given up.
    ///
    /// The agent keeps one endpoint for its life in `reused`, moved to each attempt's socket: a
    /// new endpoint would allocate its receive buffer (about 3 MiB) again, from memory the
    /// allocator may have to zero in full, where the first one is only touched as packets come.
    async fn connect_quic(
        &self,
        reused: &mut Option<quinn::Endpoint>,
        probe: Option<Duration>,
        limit: Duration,
    ) -> Result<Connected, ConnectError> {
        let relay = &self.config.relay;
        let attempt = async {
            let address = resolve(&relay.host, relay.port).await?;
            let local: SocketAddr = match address {
                SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
                SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
            };
            let socket = quic::udp_socket(local).map_err(ConnectError::Socket)?;
            let endpoint = match reused {
                Some(endpoint) => {
                    endpoint.rebind(socket).map_err(ConnectError::Socket)?;
                    endpoint.clone()
                }
                None => {
                    let runtime = Arc::new(socket::Runtime);
                    let config = EndpointConfig::default();
                    let endpoint = quinn::Endpoint::new(config, None, socket, runtime)
                        .map_err(ConnectError::Socket)?;
                    reused.insert(endpoint).clone()
                }
            };
            let start = || endpoint.connect_with(self.client.clone(), address, tls::SERVER_NAME);
            let mut handshakes = vec![start()?];
            let result = loop {
                tokio::select! {
                    result = first_answer(&mut handshakes) => break result,
                    () = sleep_for(probe) => {
                        if handshakes.len() == MAX_HANDSHAKES {
                            handshakes.remove(0);
                        }
                        handshakes.push(start()?);
                    }
                }
            };
            Ok::<_, ConnectError>((endpoint, address, result))
        };
        let (endpoint, address, result) =
            tokio::time::timeout(limit, attempt)
                .await
                .map_err(|_| ConnectError::Timeout {
                    relay: relay.to_string(),
                    limit,
                })??;
        match result {
            Ok(conn) => Ok(Connected {
                endpoint,
                conn,
                path: Path::Quic,
                broken: None,
            }),
            Err(source) => Err(self.explain(address, source)),
        }
    }

    /// One attempt over TCP: connect to `relay_tcp` (through `proxy`, if set), TLS with the
    /// pinned keys, then the QUIC handshake on the carrier.
    async fn connect_tcp(&self) -> Result<Connected, ConnectError> {
        let relay = &self.config.relay_tcp;
        let attempt = async {
            let tcp = match &self.config.proxy {
                Some(proxy) => proxy::connect(proxy, &relay.host, relay.port).await?,
                None => {
                    let address = resolve(&relay.host, relay.port).await?;
                    TcpStream::connect(address)
                        .await
                        .map_err(|source| ConnectError::Tcp {
                            relay: relay.to_string(),
                            source,
                        })?
                }
            };
            carrier::tune(&tcp);
            let addresses = tcp.local_addr().and_then(|l| Ok((l, tcp.peer_addr()?)));
            let (local, peer) = addresses.map_err(|source| ConnectError::Tcp {
                relay: relay.to_string(),
                source,
            })?;
            let name = ServerName::try_from(tls::SERVER_NAME).expect("a valid server name");
            let tls = self
                .tcp_tls
                .connect(name, tcp)
                .await
                .map_err(|source| self.explain_tls(peer, source))?;
            let carrier = carrier::CarrierSocket::new(tls, local, peer);
            let broken = carrier.broken();
            let endpoint = carrier::endpoint(EndpointConfig::default(), None, carrier.clone())
                .map_err(ConnectError::Socket)?;
            let connecting =
                endpoint.connect_with(self.tcp_client.clone(), peer, tls::SERVER_NAME)?;
            let conn = tokio::select! {
                conn = connecting => conn.map_err(|source| self.explain(peer, source))?,
                // The relay ended the TLS connection: its alert says why.
                () = carrier.broken() => {
                    let failure = carrier.take_failure().unwrap_or_else(|| {
                        io::Error::new(io::ErrorKind::ConnectionAborted, "the relay closed the connection")
                    });
                    return Err(self.explain_tls(peer, failure));
                }
            };
            Ok(Connected {
                endpoint,
                conn,
                path: Path::Tcp,
                broken: Some(Box::pin(broken)),
            })
        };
        tokio::time::timeout(CONNECT_TIMEOUT, attempt)
            .await
            .map_err(|_| ConnectError::TcpTimeout {
                relay: relay.to_string(),
            })?
    }

    fn explain(&self, address: SocketAddr, source: quinn::ConnectionError) -> ConnectError {
        if let Some(got) = self.pin.take_mismatch() {
            return ConnectError::WrongRelay {
                address,
                expected: self.pin.expected(),
                got,
            };
        }
        if let quinn::ConnectionError::ConnectionClosed(close) = &source {
            if u64::from(close.error_code) == tls::REFUSED_KEY_ERROR_CODE {
                return ConnectError::KeyRefused {
                    address,
                    fingerprint: self.fingerprint,
                };
            }
        }
        ConnectError::Handshake { address, source }
    }

    /// [`Agent::explain`] for the TLS handshake over TCP.
    fn explain_tls(&self, address: SocketAddr, source: io::Error) -> ConnectError {
        if let Some(got) = self.pin.take_mismatch() {
            return ConnectError::WrongRelay {
                address,
                expected: self.pin.expected(),
                got,
            };
        }
        let alert = source
            .get_ref()
            .and_then(|e| e.downcast_ref::<rustls::Error>());
        if let Some(rustls::Error::AlertReceived(rustls::AlertDescription::AccessDenied)) = alert {
            return ConnectError::KeyRefused {
                address,
                fingerprint: self.fingerprint,
            };
        }
        ConnectError::TlsOverTcp { address, source }
    }
}

/// What a session needs of the connect loop's state.
struct Running<'a> {
    last_session: &'a mut Option<SessionId>,
    latest_flows: &'a mut Option<Arc<crate::udp::Flows>>,
    reused: &'a mut Option<quinn::Endpoint>,
    chooser: &'a mut Chooser,
    shutdown: &'a CancellationToken,
}

/// How often a session on QUIC checks that the relay still answers.
const WATCH_EVERY: Duration = Duration::from_millis(250);

/// `attempt`, once `delay` is over.
async fn after<F: Future>(delay: Duration, attempt: F) -> F::Output {
    tokio::time::sleep(delay).await;
    attempt.await
}

/// The first address `host` resolves to.
async fn resolve(host: &str, port: u16) -> Result<SocketAddr, ConnectError> {
    let relay = || {
        HostPort {
            host: host.to_owned(),
            port,
        }
        .to_string()
    };
    tokio::net::lookup_host((host, port))
        .await
        .map_err(|source| ConnectError::Resolve {
            relay: relay(),
            source,
        })?
        .next()
        .ok_or_else(|| ConnectError::NoAddress { relay: relay() })
}

/// Reads the state of a running agent, and reloads its forwards.
#[derive(Clone)]
pub struct AgentControl {
    /// The config the agent started with.
    config: AgentConfig,
    relay: String,
    relay_fingerprint: Fingerprint,
    fingerprint: Fingerprint,
    forwards: Arc<watch::Sender<Arc<[Offered]>>>,
    status: watch::Receiver<AgentStatus>,
    tracker: Arc<Tracker>,
    udp: Arc<UdpCounters>,
}

impl std::fmt::Debug for AgentControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentControl")
            .field("relay", &self.relay)
            .finish_non_exhaustive()
    }
}

impl AgentControl {
    /// Applies a new config's forwards: the live session (and every later one) asks the relay
    /// for the new set; forwards that stay as they were keep their visitors. Returns the
    /// settings that changed and take effect only at the next start; they are kept.
    pub fn reload(&self, config: AgentConfig) -> Vec<&'static str> {
        let old = &self.config;
        let restart_only = [
            ("relay", old.relay != config.relay),
            (
                "relay_fingerprint",
                old.relay_fingerprint != config.relay_fingerprint,
            ),
            ("transport", old.transport != config.transport),
            ("relay_tcp", old.relay_tcp != config.relay_tcp),
            ("proxy", old.proxy != config.proxy),
            ("key", old.key != config.key),
            ("keepalive", old.keepalive != config.keepalive),
            ("idle_timeout", old.idle_timeout != config.idle_timeout),
            ("resume_window", old.resume_window != config.resume_window),
            ("status_socket", old.status_socket != config.status_socket),
            ("metrics", old.metrics != config.metrics),
        ];
        self.forwards.send_modify(|offered| {
            // A forward's totals go on under its name.
            let traffic = |name: &str| {
                offered
                    .iter()
                    .find(|o| o.forward.name == name)
                    .map(|o| o.traffic.clone())
            };
            let next: Arc<[Offered]> = config
                .forwards
                .iter()
                .map(|forward| Offered {
                    traffic: traffic(&forward.name).unwrap_or_default(),
                    forward: forward.clone(),
                })
                .collect();
            *offered = next;
        });
        restart_only
            .iter()
            .filter(|(_, changed)| *changed)
            .map(|(key, _)| *key)
            .collect()
    }

    /// Sessions on each path since the agent started, and moves between them.
    pub fn paths(&self) -> ([(Path, u64); 2], u64) {
        self.tracker.paths()
    }

    /// The session, the forwards and what they carried.
    pub fn status(&self) -> AgentReport {
        let status = self.status.borrow().clone();
        let live = self.tracker.live();
        let offered = self.forwards.borrow().clone();
        let forwards = offered
            .iter()
            .map(|Offered { forward, traffic }| {
                let state = match status.forward(&forward.name) {
                    None => "not connected".to_string(),
                    Some(ForwardResult::Opened) => "open".to_string(),
                    Some(ForwardResult::Refused(why)) => format!("refused: {why}"),
                };
                let flows = live
                    .as_ref()
                    .map_or(0, |l| l.flows.open_flows_of(&forward.name));
                ForwardReport {
                    name: forward.name.clone(),
                    proto: forward.proto.to_string(),
                    remote: forward.remote.to_string(),
                    local: forward.local.to_string(),
                    state,
                    flows_open: flows as u64,
                    traffic: traffic.count(),
                }
            })
            .collect();
        let sessions = self.tracker.sessions();
        let last_error = self.tracker.last_error();
        AgentReport {
            relay: self.relay.clone(),
            relay_fingerprint: self.relay_fingerprint.to_string(),
            fingerprint: self.fingerprint.to_string(),
            state: status.to_string(),
            connected: live.is_some(),
            session: status.session(),
            relay_address: live.as_ref().map(|l| l.conn.remote_address().to_string()),
            transport: live
                .as_ref()
                .and(self.tracker.path())
                .map(|(path, _)| path.to_string()),
            transport_why: live
                .as_ref()
                .and(self.tracker.path())
                .and_then(|(_, why)| why.map(str::to_owned)),
            since: live.as_ref().map(|l| report::timestamp(l.since)),
            rtt_ms: live.as_ref().map(|l| report::millis(l.conn.rtt())),
            sessions,
            reconnects: sessions.saturating_sub(1),
            last_error_at: last_error.as_ref().map(|(_, at)| report::timestamp(*at)),
            last_error: last_error.map(|(error, _)| error),
            forwards,
            dropped_datagrams: DropReason::ALL
                .iter()
                .map(|&reason| (reason.label().to_owned(), self.udp.dropped(reason)))
                .collect(),
        }
    }
}

/// The first of `handshakes` to get an answer, successful or not; the others are dropped with
/// the attempt.
async fn first_answer(
    handshakes: &mut [quinn::Connecting],
) -> Result<quinn::Connection, quinn::ConnectionError> {
    poll_fn(|cx| {
        for handshake in handshakes.iter_mut() {
            if let Poll::Ready(result) = Pin::new(handshake).poll(cx) {
                return Poll::Ready(result);
            }
        }
        Poll::Pending
    })
    .await
}

/// Sleeps for `duration`, or forever without one.
async fn sleep_for(duration: Option<Duration>) {
    match duration {
        Some(duration) => tokio::time::sleep(duration).await,
        None => std::future::pending().await,
    }
}

/// Attempts in a row that got no answer from the relay, logged when they start and then now and
/// then, rather than once per attempt.
#[derive(Default)]
struct Unanswered {
    since: Option<Instant>,
    last_logged: Option<Instant>,
}

impl Unanswered {
    fn log(&mut self, error: &str) {
        let now = Instant::now();
        let since = *self.since.get_or_insert(now);
        match self.last_logged {
            None => tracing::warn!(%error, "trying again at once, until it answers"),
            Some(last) if now.duration_since(last) >= STILL_UNANSWERED_EVERY => {
                let quiet = now.duration_since(since).as_secs();
                tracing::warn!("still no answer from the relay after {quiet}s");
            }
            Some(_) => return,
        }
        self.last_logged = Some(now);
    }

    fn answered(&mut self) {
        *self = Self::default();
    }

    /// How often the next attempt, at `now`, starts a fresh handshake: see
    /// [`PROBE_UNANSWERED_FOR`].
    fn probe(&self, now: Instant) -> Option<Duration> {
        let since = self.since?;
        (now.duration_since(since) < PROBE_UNANSWERED_FOR).then_some(RESTART_PROBE)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_draining_relays_refusal_is_told_apart() {
        let address: SocketAddr = "192.0.2.1:4433".parse().unwrap();
        let closed = |code| ConnectError::Handshake {
            address,
            source: quinn::ConnectionError::ConnectionClosed(quinn::ConnectionClose {
                error_code: code,
                frame_type: None,
                reason: bytes::Bytes::new(),
            }),
        };
        let refused = closed(quinn::TransportErrorCode::CONNECTION_REFUSED);
        assert!(refused.relay_draining());
        let timeout = ConnectError::Timeout {
            relay: "relay".into(),
            limit: CONNECT_TIMEOUT,
        };
        let both = ConnectError::Neither {
            quic: Box::new(refused),
            tcp: Box::new(timeout),
        };
        assert!(both.relay_draining());
        assert!(!closed(quinn::TransportErrorCode::PROTOCOL_VIOLATION).relay_draining());
    }

    #[test]
    fn an_unanswered_relay_is_probed_for_the_first_minutes_only() {
        let mut unanswered = Unanswered::default();
        let start = Instant::now();
        assert_eq!(unanswered.probe(start), None, "answered so far");
        unanswered.log("no answer");
        let since = unanswered.since.expect("since when");
        assert_eq!(unanswered.probe(since), Some(RESTART_PROBE));
        let late = since + PROBE_UNANSWERED_FOR;
        assert_eq!(
            unanswered.probe(late - Duration::from_secs(1)),
            Some(RESTART_PROBE)
        );
        assert_eq!(unanswered.probe(late), None);
        unanswered.answered();
        assert_eq!(unanswered.probe(late), None);
    }
}
