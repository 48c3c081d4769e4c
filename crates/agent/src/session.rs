//! One session on the agent's side: say Hello, learn which forwards the relay opened, and carry
//! each data stream the relay opens to the local service it names.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tether_common::config::Forward;
use tether_common::control::{read_frame, write_frame, FrameError};
use tether_common::datagram::{DatagramSender, UdpCounters};
use tether_common::protocol::{
    AgentMessage, CloseCode, ForwardId, ForwardRequest, ForwardResult, Hello, RelayMessage,
    SessionId, StreamCode, StreamHeader, Update, Updated, VERSION,
};
use tether_common::splice::splice;
use tether_common::traffic::ForwardTraffic;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;
use tracing::Instrument;

use crate::client::relay_restarting;
use crate::status::{AgentStatus, Tracker};
use crate::udp;

/// How long the relay may take to answer Hello.
const WELCOME_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the relay may take to send a data stream's header.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long connecting to a local service may take.
const LOCAL_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A forward from agent.toml, with what it carried since the agent started.
#[derive(Debug, Clone)]
pub struct Offered {
    pub forward: Forward,
    pub traffic: Arc<ForwardTraffic>,
}

impl Offered {
    pub fn new(forward: Forward) -> Self {
        Self {
            forward,
            traffic: Arc::default(),
        }
    }
}

/// What a session reports to and counts into, besides its connection.
pub struct Context<'a> {
    pub status: &'a watch::Sender<AgentStatus>,
    pub tracker: &'a Tracker,
    pub udp: &'a Arc<UdpCounters>,
    pub shutdown: &'a CancellationToken,
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
            Some(why) => SessionEnd::RelayRestarting { session, why },
            None => SessionEnd::Lost { session, error },
        }
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
    } = cx;
    let first = forwards.borrow_and_update().clone();
    let (session, results, (mut control_send, mut control)) = match open(conn, &first, resume).await
    {
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
    tracing::info!(session, "connected to relay");
    let mut current: Vec<Answered> = (0..)
        .zip(first.iter().cloned())
        .zip(results)
        .map(|((id, offered), result)| (id, offered, result))
        .collect();
    report(&[], &current);
    publish(status, session, &current);
    let opened = Arc::new(RwLock::new(opened_by_id(&current)));
    let datagrams = DatagramSender::new(conn.clone(), udp.clone());
    let flows = udp::Flows::new(&opened_by_id(&current), datagrams, udp.clone()).await;
    let _live = tracker.connected(conn.clone(), flows.clone());
    let _udp = AbortOnDropHandle::new(tokio::spawn(
        udp::carry(conn.clone(), flows.clone()).in_current_span(),
    ));

    // Updates sent and not answered yet, oldest first; the relay answers them in order.
    let mut pending: VecDeque<Vec<(ForwardId, Offered)>> = VecDeque::new();
    let mut streams = JoinSet::new();
    let end = loop {
        tokio::select! {
            () = shutdown.cancelled() => {
                CloseCode::AgentShutdown.close(conn);
                break SessionEnd::Stopped;
            }
            accepted = conn.accept_bi() => match accepted {
                Ok((send, recv)) => {
                    streams.spawn(serve_stream(send, recv, opened.clone(), shutdown.clone()));
                }
                Err(error) => {
                    break SessionEnd::of_closed(Some(session), &error, error.to_string());
                }
            },
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
                    break SessionEnd::of_closed(Some(session), &closed, error.to_string());
                }
                pending.push_back(next);
            }
            frame = read_frame(&mut control) => {
                let answer = match frame {
                    Ok((kind, body)) => RelayMessage::decode(kind, &body).ok(),
                    Err(FrameError::Decode(_)) => None,
                    Err(_) => {
                        let error = conn.closed().await;
                        break SessionEnd::of_closed(Some(session), &error, error.to_string());
                    }
                };
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
                        // Only an answer to an update may follow Welcome.
                        CloseCode::ProtocolError.close(conn);
                        let error = conn.closed().await;
                        break SessionEnd::of_closed(Some(session), &error, error.to_string());
                    }
                };
                report(&current, &applied);
                current = applied;
                let by_id = opened_by_id(&current);
                flows.set_forwards(&by_id).await;
                *opened.write().unwrap_or_else(|e| e.into_inner()) = by_id;
                publish(status, session, &current);
            }
            Some(_) = streams.join_next() => {}
        }
    };
    // The streams cannot outlive the connection; dropping the set ends what is left.
    streams.abort_all();
    end
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
) -> Result<(SessionId, Vec<ForwardResult>, Control), OpenError> {
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
    Ok((welcome.session, welcome.results, (send, recv)))
}

/// Logs in plain words the relay's answer for each forward of `after` that `before` did not
/// have as it is, and each forward of `before` that is gone.
fn report(before: &[Answered], after: &[Answered]) {
    let same = |a: &Answered, b: &Answered| a.0 == b.0 && a.1.forward == b.1.forward;
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

/// Carries one data stream to the local service its header names.
async fn serve_stream(
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    forwards: Arc<RwLock<Opened>>,
    shutdown: CancellationToken,
) {
    let refuse = |send: &mut quinn::SendStream, recv: &mut quinn::RecvStream, code: StreamCode| {
        let _ = send.reset(code.code());
        let _ = recv.stop(code.code());
    };
    let mut bytes = [0u8; StreamHeader::LEN];
    let header = match tokio::time::timeout(HEADER_TIMEOUT, recv.read_exact(&mut bytes)).await {
        Ok(Ok(())) => StreamHeader::decode(&bytes).ok(),
        _ => None,
    };
    let target = header.and_then(|h| {
        let opened = forwards.read().unwrap_or_else(|e| e.into_inner());
        let Offered { forward, traffic } = opened.get(&h.forward)?;
        let (host, port) = forward.local_for(h.port)?;
        Some((
            h,
            forward.name.clone(),
            traffic.clone(),
            host.to_owned(),
            port,
        ))
    });
    let Some((header, name, traffic, host, port)) = target else {
        tracing::warn!("the relay opened a data stream with a bad header");
        refuse(&mut send, &mut recv, StreamCode::BadHeader);
        return;
    };
    let span = tracing::debug_span!("visitor", forward = %name, visitor = %header.visitor, stream = header.id);
    async move {
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
        let _open = traffic.visitor();
        tracing::debug!("visitor connected");
        match splice(tcp, send, recv, &shutdown, traffic.at_service()).await {
            Ok(moved) => tracing::debug!(
                bytes_in = moved.to_tcp,
                bytes_out = moved.to_stream,
                "visitor done"
            ),
            Err(error) if error.is_shutdown() => tracing::debug!(%error, "visitor closed"),
            Err(error) => tracing::debug!(%error, "visitor connection ended abnormally"),
        }
    }
    .instrument(span)
    .await
}
