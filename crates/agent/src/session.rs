//! One session on the agent's side: say Hello, learn which forwards the relay opened, and carry
//! each data stream the relay opens to the local service it names.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use tether_common::carry::resume::{AckQueue, HeldStreams, Link, Resume, ResumeError};
use tether_common::carry::splice::{splice, Held};
use tether_common::config::Forward;
use tether_common::wire::control::{frames, read_frame, write_frame, FrameError};
use tether_common::wire::datagram::{DatagramSender, UdpCounters};
use tether_common::wire::protocol::{
    Acks, AgentMessage, CloseCode, ForwardId, ForwardRequest, ForwardResult, Hello, Refusal,
    RelayMessage, ResumeHeader, SessionId, StreamCode, StreamHeader, StreamKind, Update, Updated,
    Welcome, VERSION,
};
use tether_common::wire::text;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::{AbortOnDropHandle, TaskTracker};
use tracing::Instrument;

use crate::forwards::Offered;
use crate::status::{AgentStatus, Tracker};
use crate::udp;

/// How long the relay may take to answer Hello.
const WELCOME_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the relay may take to send a data stream's header.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long connecting to a local service may take.
const LOCAL_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// What a session reports to and counts into, besides its connection.
pub struct Context<'a> {
    pub status: &'a watch::Sender<AgentStatus>,
    pub tracker: &'a Tracker,
    pub udp: &'a Arc<UdpCounters>,
    pub shutdown: &'a CancellationToken,
    /// The agent's local connections, held across its sessions.
    pub streams: &'a Arc<HeldStreams>,
    /// Where the tasks that carry them run: they outlive the session.
    pub tasks: &'a TaskTracker,
    pub resume_window: Duration,
    /// The UDP flows of the agent's latest session, for a session that resumes it.
    pub flows: &'a mut Option<Arc<udp::Flows>>,
}

/// How a session ended.
#[derive(Debug)]
pub enum SessionEnd {
    /// The agent was told to stop and said goodbye.
    Stopped,
    /// The relay is restarting, or restarted and lost the session (`why` says which):
    /// reconnect at once.
    RelayRestarting {
        session: Option<SessionId>,
        why: &'static str,
        /// The relay said it keeps the connections for its next process, which is about to
        /// answer ([`CloseCode::RelayRestart`]).
        handing_over: bool,
    },
    /// Anything else; `error` says what, for the log.
    Lost {
        session: Option<SessionId>,
        error: String,
    },
}

impl SessionEnd {
    /// The end of a session whose connection closed with `reason`; `error` says what failed,
    /// for the log.
    fn of_closed(
        session: Option<SessionId>,
        reason: &quinn::ConnectionError,
        error: String,
    ) -> Self {
        match relay_restarting(reason) {
            Some(why) => SessionEnd::RelayRestarting {
                session,
                why,
                handing_over: is_handing_over(reason),
            },
            // The relay's reason for closing is in it: its words, made safe to print.
            None => SessionEnd::Lost {
                session,
                error: text::printable(&error),
            },
        }
    }
}

/// Whether the relay closed the session because it restarts and keeps its connections.
fn is_handing_over(error: &quinn::ConnectionError) -> bool {
    matches!(
        error,
        quinn::ConnectionError::ApplicationClosed(close)
            if CloseCode::from_code(close.error_code) == Some(CloseCode::RelayRestart)
    )
}

/// Why a lost session calls for reconnecting at once, if it does: the relay said goodbye
/// because it is restarting or its config for this agent changed, or it answered with a stateless reset, which only a relay holding
/// the same key can make (it restarted and no longer knows the session).
fn relay_restarting(error: &quinn::ConnectionError) -> Option<&'static str> {
    match error {
        quinn::ConnectionError::ApplicationClosed(close) => {
            match CloseCode::from_code(close.error_code)? {
                CloseCode::RelayShutdown => Some("relay is stopping or restarting"),
                CloseCode::RelayRestart => Some("relay is restarting and holds the connections"),
                CloseCode::Reconfigured => Some("the relay's config for this agent changed"),
                _ => None,
            }
        }
        quinn::ConnectionError::Reset => Some("relay restarted and no longer knows this session"),
        _ => None,
    }
}

/// Runs one session on an established connection until it ends. `forwards` follows the
/// config: when it changes, the relay is sent the new set and the session carries on with it.
pub async fn run(
    conn: &quinn::Connection,
    mut forwards: watch::Receiver<Arc<[Offered]>>,
    resume: Option<SessionId>,
    cx: Context<'_>,
) -> SessionEnd {
    let Context {
        status,
        tracker,
        udp,
        shutdown,
        streams,
        tasks,
        resume_window,
        flows: latest_flows,
    } = cx;
    let first = forwards.borrow_and_update().clone();
    let (welcome, (mut control_send, control)) = match open(conn, &first, resume).await {
        Ok(open) => open,
        Err(error) => {
            return match conn.close_reason() {
                Some(reason) => SessionEnd::of_closed(None, &reason, error.to_string()),
                None => {
                    CloseCode::ProtocolError.close(conn);
                    SessionEnd::Lost {
                        session: None,
                        error: error.to_string(),
                    }
                }
            };
        }
    };
    let session = welcome.session;
    // The relay resumes what it still holds; whatever else this side holds is closed.
    let resumed = welcome.resumed.as_deref();
    streams.keep_only(resumed, session);
    match (resume, resumed) {
        (Some(lost), Some(ids)) => tracing::info!(
            session,
            resumed = lost,
            streams = ids.len(),
            "connected to relay; the lost session resumed"
        ),
        (Some(lost), None) => tracing::info!(
            session,
            lost,
            "connected to relay; the relay no longer holds the lost session"
        ),
        (None, _) => tracing::info!(session, "connected to relay"),
    }
    let mut current: Vec<Answered> = (0..)
        .zip(first.iter().cloned())
        .zip(welcome.results)
        .map(|((id, offered), result)| (id, offered, result))
        .collect();
    report(&[], &current);
    publish(status, session, &current);
    let opened = Arc::new(RwLock::new(opened_by_id(&current)));
    let datagrams = DatagramSender::new(conn.clone(), udp.clone());
    let flows = match latest_flows.take() {
        Some(flows) if resumed.is_some() => {
            flows.attach(datagrams);
            flows.set_forwards(&opened_by_id(&current)).await;
            flows
        }
        _ => udp::Flows::new(&opened_by_id(&current), datagrams, udp.clone()).await,
    };
    *latest_flows = Some(flows.clone());
    let _live = tracker.connected(conn.clone(), flows.clone());
    let _udp = AbortOnDropHandle::new(tokio::spawn(
        udp::carry(conn.clone(), flows.clone()).in_current_span(),
    ));
    let acks = Arc::new(AckQueue::default());
    let streams_cx = Streams {
        conn: conn.clone(),
        opened: opened.clone(),
        held: streams.clone(),
        acks: acks.clone(),
        session,
        window: resume_window,
        shutdown: shutdown.clone(),
        tasks: tasks.clone(),
    };
    let (mut frames, _reader) = frames(control);

    // Updates sent and not answered yet, oldest first; the relay answers them in order.
    let mut pending: VecDeque<Vec<(ForwardId, Offered)>> = VecDeque::new();
    let mut retry = RetryRefused::default();
    retry.after(&current, Instant::now());
    loop {
        tokio::select! {
            () = retry.due(), if pending.is_empty() => {
                // The same set again: the relay keeps what it opened and tries the rest anew.
                let again: Vec<(ForwardId, Offered)> =
                    current.iter().map(|(id, o, _)| (*id, o.clone())).collect();
                let update = Update {
                    forwards: again.iter().map(|(id, o)| (*id, request(&o.forward))).collect(),
                };
                let frame = AgentMessage::Update(update).encode();
                if let Err(error) = write_frame(&mut control_send, &frame).await {
                    let closed = conn.closed().await;
                    return SessionEnd::of_closed(Some(session), &closed, error.to_string());
                }
                retry.sent();
                pending.push_back(again);
            }
            () = shutdown.cancelled() => {
                CloseCode::AgentShutdown.close(conn);
                return SessionEnd::Stopped;
            }
            accepted = conn.accept_bi() => match accepted {
                Ok((send, recv)) => {
                    tasks.spawn(serve_stream(send, recv, streams_cx.clone()).in_current_span());
                }
                Err(error) => {
                    return SessionEnd::of_closed(Some(session), &error, error.to_string());
                }
            },
            batch = acks.next_batch() => {
                let frame = AgentMessage::Acks(Acks { streams: batch }).encode();
                if let Err(error) = write_frame(&mut control_send, &frame).await {
                    let closed = conn.closed().await;
                    return SessionEnd::of_closed(Some(session), &closed, error.to_string());
                }
            }
            Ok(()) = forwards.changed() => {
                let wanted = forwards.borrow_and_update().clone();
                let latest: Vec<(ForwardId, Offered)> = match pending.back() {
                    Some(next) => next.clone(),
                    None => current.iter().map(|(id, o, _)| (*id, o.clone())).collect(),
                };
                let next = assign_ids(&current, &latest, &wanted);
                let update = Update {
                    forwards: next.iter().map(|(id, o)| (*id, request(&o.forward))).collect(),
                };
                tracing::info!("sending the relay the reloaded forwards");
                let frame = AgentMessage::Update(update).encode();
                if let Err(error) = write_frame(&mut control_send, &frame).await {
                    let closed = conn.closed().await;
                    return SessionEnd::of_closed(Some(session), &closed, error.to_string());
                }
                pending.push_back(next);
            }
            frame = frames.recv() => {
                let answer = match frame.unwrap_or(Err(FrameError::Closed)) {
                    Ok((kind, body)) => RelayMessage::decode(kind, &body).ok(),
                    Err(FrameError::Decode(_)) => None,
                    Err(_) => {
                        let error = conn.closed().await;
                        return SessionEnd::of_closed(Some(session), &error, error.to_string());
                    }
                };
                if let Some(RelayMessage::Acks(acks)) = &answer {
                    if streams.confirm(&acks.streams) == 0 {
                        continue;
                    }
                }
                let applied = match (answer, pending.pop_front()) {
                    (Some(RelayMessage::Updated(Updated { results })), Some(next))
                        if results.len() == next.len() =>
                    {
                        next.into_iter()
                            .zip(results)
                            .map(|((id, offered), result)| (id, offered, result))
                            .collect::<Vec<Answered>>()
                    }
                    _ => {
                        // Only confirmations and answers to updates may follow Welcome.
                        CloseCode::ProtocolError.close(conn);
                        let error = conn.closed().await;
                        return SessionEnd::of_closed(Some(session), &error, error.to_string());
                    }
                };
                report(&current, &applied);
                current = applied;
                retry.after(&current, Instant::now());
                let by_id = opened_by_id(&current);
                flows.set_forwards(&by_id).await;
                *opened.write().unwrap_or_else(|e| e.into_inner()) = by_id;
                publish(status, session, &current);
            }
        }
    }
}

/// The first pause before the relay is asked again for forwards it refused for a reason that
/// may pass (the port in use there); it doubles up to [`RETRY_REFUSED_MAX`].
pub const RETRY_REFUSED_FIRST: Duration = Duration::from_secs(1);

pub const RETRY_REFUSED_MAX: Duration = Duration::from_secs(15);

/// When to ask the relay again for the forwards it refused because their ports were in use or
/// could not be opened: a port another program held may come free, and then the forward comes
/// up by itself. A refusal that only a config change mends (not allowed, invalid) is not asked
/// again.
#[derive(Debug, Default)]
struct RetryRefused {
    /// The pause after the next refusal.
    delay: Option<Duration>,
    at: Option<Instant>,
}

impl RetryRefused {
    /// Follows the relay's latest answers, got at `now`.
    fn after(&mut self, answered: &[Answered], now: Instant) {
        let passing = answered.iter().any(|(_, _, result)| {
            matches!(
                result,
                ForwardResult::Refused(Refusal::InUse | Refusal::Unavailable)
            )
        });
        if !passing {
            *self = Self::default();
            return;
        }
        let delay = self.delay.unwrap_or(RETRY_REFUSED_FIRST);
        self.at = Some(now + delay);
        self.delay = Some((delay * 2).min(RETRY_REFUSED_MAX));
    }

    /// Completes when the relay is to be asked again; never, while nothing is to be.
    async fn due(&self) {
        match self.at {
            Some(at) => tokio::time::sleep_until(at.into()).await,
            None => std::future::pending().await,
        }
    }

    /// The relay was asked; the next time is set by its answer.
    fn sent(&mut self) {
        self.at = None;
    }
}

/// A forward of the session: its id, what the config says, and the relay's answer.
type Answered = (ForwardId, Offered, ForwardResult);

/// The forwards the relay opened, by id, as data streams and datagrams name them.
type Opened = HashMap<ForwardId, Offered>;

fn opened_by_id(forwards: &[Answered]) -> Opened {
    forwards
        .iter()
        .filter(|(_, _, result)| *result == ForwardResult::Opened)
        .map(|(id, offered, _)| (*id, offered.clone()))
        .collect()
}

fn publish(status: &watch::Sender<AgentStatus>, session: SessionId, forwards: &[Answered]) {
    status.send_replace(AgentStatus::Connected {
        session,
        forwards: forwards
            .iter()
            .map(|(_, o, result)| (o.forward.name.clone(), *result))
            .collect(),
    });
}

/// Ids for the `wanted` forwards: a forward that `latest` (the newest set sent) has as it is
/// keeps its id, so that its listener and visitors go on; any other gets an id that neither
/// `latest` nor the session's current set uses, so that no data stream still on its way for a
/// closed forward reaches a new one.
fn assign_ids(
    current: &[Answered],
    latest: &[(ForwardId, Offered)],
    wanted: &[Offered],
) -> Vec<(ForwardId, Offered)> {
    let mut next: Vec<(ForwardId, Offered)> = Vec::with_capacity(wanted.len());
    let mut fresh = Vec::new();
    for offered in wanted {
        let kept = latest.iter().find(|(id, o)| {
            o.forward == offered.forward && !next.iter().any(|(taken, _)| taken == id)
        });
        match kept {
            Some((id, _)) => next.push((*id, offered.clone())),
            None => fresh.push(offered.clone()),
        }
    }
    let used = |id: ForwardId, next: &[(ForwardId, Offered)]| {
        current.iter().any(|(c, _, _)| *c == id)
            || latest.iter().any(|(l, _)| *l == id)
            || next.iter().any(|(n, _)| *n == id)
    };
    let mut candidate: ForwardId = 0;
    for offered in fresh {
        while used(candidate, &next) {
            candidate += 1;
        }
        next.push((candidate, offered));
    }
    next
}

fn request(forward: &Forward) -> ForwardRequest {
    ForwardRequest {
        name: forward.name.clone(),
        proto: forward.proto,
        remote: forward.remote,
        flow_idle: forward.flow_idle,
        allow_from: forward.allow_from.clone(),
    }
}

#[derive(Debug, thiserror::Error)]
enum OpenError {
    #[error("opening the control stream: {0}")]
    Connection(#[from] quinn::ConnectionError),
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("the relay did not answer Hello within {WELCOME_TIMEOUT:?}")]
    Timeout,
    #[error("the relay answered {got} forwards of {sent}")]
    ResultCount { got: usize, sent: usize },
    #[error("the relay's first answer is not Welcome")]
    NotWelcome,
}

/// The control stream, kept open for the session's life.
type Control = (quinn::SendStream, quinn::RecvStream);

/// Says Hello and reads the relay's Welcome.
async fn open(
    conn: &quinn::Connection,
    forwards: &[Offered],
    resume: Option<SessionId>,
) -> Result<(Welcome, Control), OpenError> {
    let exchange = async {
        let (mut send, mut recv) = conn.open_bi().await?;
        let hello = Hello {
            version: VERSION,
            resume,
            forwards: forwards.iter().map(|o| request(&o.forward)).collect(),
        };
        write_frame(&mut send, &AgentMessage::Hello(hello).encode()).await?;
        let (kind, body) = read_frame(&mut recv).await?;
        let RelayMessage::Welcome(welcome) =
            RelayMessage::decode(kind, &body).map_err(FrameError::Decode)?
        else {
            return Err(OpenError::NotWelcome);
        };
        Ok::<_, OpenError>((welcome, send, recv))
    };
    let (welcome, send, recv) = tokio::time::timeout(WELCOME_TIMEOUT, exchange)
        .await
        .map_err(|_| OpenError::Timeout)??;
    if welcome.results.len() != forwards.len() {
        return Err(OpenError::ResultCount {
            got: welcome.results.len(),
            sent: forwards.len(),
        });
    }
    Ok((welcome, (send, recv)))
}

/// Logs in plain words the relay's answer for each forward of `after` that `before` did not
/// have as it is, and each forward of `before` that is gone.
fn report(before: &[Answered], after: &[Answered]) {
    let same = |a: &Answered, b: &Answered| a.0 == b.0 && a.1.forward == b.1.forward && a.2 == b.2;
    for (_, Offered { forward, .. }, _) in
        before.iter().filter(|b| !after.iter().any(|a| same(a, b)))
    {
        if !after.iter().any(|(_, o, _)| o.forward.name == forward.name) {
            tracing::info!(forward = %forward.name, "forward removed; its relay port is closed");
        }
    }
    for (_, Offered { forward, .. }, result) in
        after.iter().filter(|a| !before.iter().any(|b| same(a, b)))
    {
        let public = format!("{}/{}", forward.remote, forward.proto);
        match result {
            ForwardResult::Opened => tracing::info!(
                forward = %forward.name,
                "relay port {public} now reaches {}",
                forward.local
            ),
            ForwardResult::Refused(reason) => tracing::warn!(
                forward = %forward.name,
                "relay refused port {public}: {reason}; the other forwards keep working"
            ),
        }
    }
}

/// What the data streams of a session need.
#[derive(Clone)]
struct Streams {
    conn: quinn::Connection,
    opened: Arc<RwLock<Opened>>,
    held: Arc<HeldStreams>,
    acks: Arc<AckQueue>,
    session: SessionId,
    window: Duration,
    shutdown: CancellationToken,
    tasks: TaskTracker,
}

/// Carries one data stream: a new one to the local service its header names, or a resumed one
/// to the held connection it names.
async fn serve_stream(mut send: quinn::SendStream, mut recv: quinn::RecvStream, cx: Streams) {
    let refuse = |send: &mut quinn::SendStream, recv: &mut quinn::RecvStream, code: StreamCode| {
        let _ = send.reset(code.code());
        let _ = recv.stop(code.code());
    };
    let start = tokio::time::timeout(HEADER_TIMEOUT, read_start(&mut recv)).await;
    // A resumed stream this side never saw (its header was lost with the session) opens anew;
    // the relay then waits for this side's received offset, which is zero.
    let (header, resumed_unseen) = match start {
        Ok(Some(Start::Open(header))) => (header, false),
        Ok(Some(Start::Resume(resume))) => match cx.held.get(resume.stream.id) {
            Some(stream) => {
                let link = resume_link(cx.conn, send, recv, resume.received, cx.acks);
                stream.resume(link);
                return;
            }
            // A stream that ended here before the relay heard of it is not opened again: its
            // first bytes may have reached the local service already.
            None if !resume.seen
                && resume.received == 0
                && !cx.held.was_added(resume.stream.id) =>
            {
                (resume.stream, true)
            }
            None => {
                let stream = resume.stream.id;
                tracing::debug!(stream, "the relay resumed a stream no longer held here");
                return refuse(&mut send, &mut recv, StreamCode::NotResumable);
            }
        },
        _ => {
            tracing::warn!("the relay opened a data stream with a bad header");
            return refuse(&mut send, &mut recv, StreamCode::BadHeader);
        }
    };
    let target = {
        let opened = cx.opened.read().unwrap_or_else(|e| e.into_inner());
        opened
            .get(&header.forward)
            .and_then(|Offered { forward, traffic }| {
                let (host, port) = forward.local_for(header.port)?;
                Some((forward.name.clone(), traffic.clone(), host.to_owned(), port))
            })
    };
    let Some((name, traffic, host, port)) = target else {
        tracing::warn!("the relay opened a data stream for a forward it did not open");
        return refuse(&mut send, &mut recv, StreamCode::BadHeader);
    };
    let span = tracing::debug_span!("visitor", forward = %name, visitor = %header.visitor, stream = header.id);
    // The connection gets a task of its own, only as big as carrying it takes: the state of
    // this set-up ends here.
    let tasks = cx.tasks.clone();
    let carry = async move {
        let connect = TcpStream::connect((host.as_str(), port));
        let tcp = match tokio::time::timeout(LOCAL_CONNECT_TIMEOUT, connect).await {
            Ok(Ok(tcp)) => tcp,
            Ok(Err(error)) => {
                tracing::warn!(%error, "cannot reach local service {host}:{port}");
                return refuse(&mut send, &mut recv, StreamCode::LocalUnreachable);
            }
            Err(_) => {
                tracing::warn!("local service {host}:{port} did not answer");
                return refuse(&mut send, &mut recv, StreamCode::LocalUnreachable);
            }
        };
        let _ = tcp.set_nodelay(true);
        let Some((stream, _registration)) = cx.held.add(header, cx.session) else {
            tracing::warn!("the relay opened a data stream under an id in use");
            return refuse(&mut send, &mut recv, StreamCode::BadHeader);
        };
        if resumed_unseen && send.write_all(&0u64.to_be_bytes()).await.is_err() {
            return;
        }
        let _open = traffic.visitor();
        tracing::debug!("visitor connected");
        let link = Link {
            conn: cx.conn,
            send,
            recv,
            peer_received: 0,
            acks: cx.acks,
        };
        let held = Held {
            stream: &stream,
            window: cx.window,
            stop: &cx.shutdown,
            hand_over: None,
            meter: traffic.at_service(),
        };
        match splice(tcp, Some(link), held).await {
            (moved, Ok(())) => tracing::debug!(
                bytes_in = moved.to_tcp,
                bytes_out = moved.to_stream,
                "visitor done"
            ),
            (_, Err(error)) if error.is_shutdown() => tracing::debug!(%error, "visitor closed"),
            (_, Err(error)) => tracing::debug!(%error, "visitor connection ended abnormally"),
        }
    };
    // A span takes room in every connection's task: only when it is on.
    match span.is_disabled() {
        true => tasks.spawn(carry),
        false => tasks.spawn(carry.instrument(span)),
    };
}

/// What a data stream starts with.
enum Start {
    Open(StreamHeader),
    Resume(ResumeHeader),
}

/// Reads a data stream's header, whichever kind it is; `None` if it is malformed or cut short.
async fn read_start(recv: &mut quinn::RecvStream) -> Option<Start> {
    let mut kind = [0u8; 1];
    recv.read_exact(&mut kind).await.ok()?;
    match StreamKind::from_wire(kind[0]).ok()? {
        StreamKind::Open => {
            let mut bytes = [0u8; StreamHeader::LEN];
            bytes[0] = kind[0];
            recv.read_exact(&mut bytes[1..]).await.ok()?;
            StreamHeader::decode(&bytes).ok().map(Start::Open)
        }
        StreamKind::Resume => {
            let mut bytes = [0u8; ResumeHeader::LEN];
            bytes[0] = kind[0];
            recv.read_exact(&mut bytes[1..]).await.ok()?;
            ResumeHeader::decode(&bytes).ok().map(Start::Resume)
        }
    }
}

/// How a held connection goes on, on the resumed data stream the relay opened: the agent
/// answers with what it received, then each side sends what the other lacks.
fn resume_link(
    conn: quinn::Connection,
    mut send: quinn::SendStream,
    recv: quinn::RecvStream,
    relay_received: u64,
    acks: Arc<AckQueue>,
) -> Resume {
    Resume::Link(Box::new(move |received| {
        Box::pin(async move {
            match send.write_all(&received.to_be_bytes()).await {
                Ok(()) => {}
                Err(quinn::WriteError::ConnectionLost(error)) => {
                    tracing::debug!(%error, "the new session was lost too");
                    return Ok(None);
                }
                Err(_) => return Err(ResumeError::Refused),
            }
            Ok(Some(Link {
                conn,
                send,
                recv,
                peer_received: relay_received,
                acks,
            }))
        })
    }))
}

#[cfg(test)]
mod tests {
    use tether_common::config::{Forward, LocalTarget};
    use tether_common::net::ports::{PortRange, Proto};

    use super::*;

    fn answered(result: ForwardResult) -> Answered {
        let forward = Forward {
            name: "ssh".into(),
            proto: Proto::Tcp,
            remote: PortRange::new(2222, 2222).unwrap(),
            local: LocalTarget {
                host: "127.0.0.1".into(),
                ports: PortRange::new(22, 22).unwrap(),
            },
            flow_idle: Duration::from_secs(120),
            allow_from: Vec::new(),
        };
        (0, Offered::new(forward), result)
    }

    #[test]
    fn refusals_that_may_pass_are_asked_again_ever_less_often() {
        let now = Instant::now();
        let in_use = [answered(ForwardResult::Refused(Refusal::InUse))];
        let mut retry = RetryRefused::default();
        let mut pauses = Vec::new();
        for _ in 0..7 {
            retry.after(&in_use, now);
            pauses.push(retry.at.unwrap() - now);
            retry.sent();
            assert_eq!(retry.at, None, "nothing more until the relay answers");
        }
        let secs: Vec<u64> = pauses.iter().map(Duration::as_secs).collect();
        assert_eq!(secs, [1, 2, 4, 8, 15, 15, 15]);
        // Opened: nothing to ask, and the pause starts over at the next refusal.
        retry.after(&[answered(ForwardResult::Opened)], now);
        assert_eq!(retry.at, None);
        retry.after(&in_use, now);
        assert_eq!(retry.at, Some(now + RETRY_REFUSED_FIRST));
        // Only a config change mends these.
        for refusal in [Refusal::NotAllowed, Refusal::Invalid] {
            retry.after(&[answered(ForwardResult::Refused(refusal))], now);
            assert_eq!(retry.at, None);
        }
    }
}
