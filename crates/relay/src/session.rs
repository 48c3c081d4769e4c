//! One agent's session on the relay: who it is, what it asks for, and how it ends.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tether_common::carry::resume::{HeldStream, Resume};
use tether_common::net::ports::Proto;
use tether_common::transport::Path;
use tether_common::wire::control::{frames, read_frame, write_frame, FrameError};
use tether_common::wire::datagram::DatagramSender;
use tether_common::wire::protocol::{
    Acks, AgentMessage, CloseCode, ForwardId, ForwardRequest, ForwardResult, Hello, RelayMessage,
    SessionId, Update, Updated, Welcome, VERSION,
};
use tether_common::{trust::tls, wire::text};
use tokio::time::Instant;
use tracing::Instrument;

use crate::agents::{self, Doors, NewSession, Published};
use crate::handshakes::Place;
use crate::live::{LiveSession, SessionWatch};
use crate::pace::Pace;
use crate::public::Listening;
use crate::shared::Shared;
use crate::udp;
use crate::visitor;

#[derive(Debug, thiserror::Error)]
enum SetupError {
    #[error("handshake timed out")]
    HandshakeTimeout,
    #[error("handshake abandoned to make room for another address's")]
    Evicted,
    #[error("handshake failed: {0}")]
    Handshake(#[from] quinn::ConnectionError),
    #[error("no Hello in time")]
    HelloTimeout,
    #[error("reading Hello: {0}")]
    Hello(#[from] FrameError),
    #[error("the first control message is not Hello")]
    NotHello,
    #[error("the agent speaks protocol version {0}, this relay {VERSION}")]
    Version(u16),
}

impl SetupError {
    /// What a failed handshake is counted under, unless the verifier counted it already.
    fn handshake_failure(&self) -> Option<&'static str> {
        use quinn::ConnectionError as E;
        match self {
            SetupError::Handshake(e) if tls::is_unlisted_key(e) => None,
            SetupError::HandshakeTimeout | SetupError::Handshake(E::TimedOut) => {
                Some("handshake timed out")
            }
            SetupError::Handshake(E::TransportError(_)) => Some("TLS or QUIC handshake failed"),
            SetupError::Evicted => Some("handshake abandoned for another address's"),
            // A TLS alert from the agent: it refused this relay's certificate.
            SetupError::Handshake(E::ConnectionClosed(close))
                if (0x100..0x200).contains(&u64::from(close.error_code)) =>
            {
                Some(
                    "the agent refused this relay's key: it pins another \
                     (relay_fingerprint, or a join line of another relay)",
                )
            }
            _ => Some("handshake abandoned by the client"),
        }
    }

    fn close_code(&self) -> CloseCode {
        match self {
            SetupError::HelloTimeout => CloseCode::Timeout,
            SetupError::Version(_) => CloseCode::UnsupportedVersion,
            _ => CloseCode::ProtocolError,
        }
    }
}

/// Serves one incoming connection, on `path`, from the handshake to the end of its session.
/// `place` holds the handshake's place among those under way until it is over.
pub async fn serve(shared: Arc<Shared>, incoming: quinn::Incoming, place: Place, path: Path) {
    let remote = incoming.remote_address();
    let handshake = tokio::select! {
        handshake = handshake(incoming, shared.limits.handshake_timeout) => handshake,
        () = place.evicted() => Err(SetupError::Evicted),
    };
    drop(place);
    let conn = match handshake {
        Ok(conn) => conn,
        Err(error) => {
            // An unlisted key was counted by the verifier, with its fingerprint.
            if let Some(reason) = error.handshake_failure() {
                shared
                    .refused_handshakes
                    .record(reason, &remote.ip().to_canonical());
            }
            let error = text::printable(&error.to_string());
            tracing::debug!(%remote, %error, "handshake refused");
            return;
        }
    };
    if tls::protocol(&conn).as_deref() == Some(tls::ALPN_JOIN) {
        crate::invites::serve_join(shared, conn, remote).await;
        return;
    }
    let fingerprint = tls::peer_fingerprint(&conn);
    let Some(agent) = fingerprint.and_then(|fp| shared.agent_with(fp)) else {
        // The verifier admits only listed keys, but a reload may have removed the key since,
        // and a resumed TLS session does not go through the verifier again.
        let from = fingerprint.map_or_else(|| remote.to_string(), |fp| fp.to_string());
        shared
            .refused_handshakes
            .record("agent key not listed", &from);
        CloseCode::Unauthorized.close(&conn);
        return;
    };
    let id: SessionId = rand::random();
    let span = tracing::info_span!("session", agent = %agent.name, session = id);
    let session = run_session(
        shared.clone(),
        conn.clone(),
        remote,
        id,
        agent.fingerprint,
        path,
    );
    let panicked = isolate(session.instrument(span.clone())).await;
    if panicked {
        // A bug of ours, not the agent's doing: end this session as any other end would, and
        // leave the relay and other sessions running.
        let _span = span.enter();
        tracing::error!("the session's task panicked; closing the session");
        CloseCode::InternalError.close(&conn);
        end_session(&shared, &agent.name, id, true);
    }
}

/// Runs `task` on a task of its own, so that a panic in it unwinds that task alone. Returns
/// whether it panicked.
async fn isolate(task: impl Future<Output = ()> + Send + 'static) -> bool {
    tokio::spawn(task).await.is_err_and(|e| e.is_panic())
}

async fn handshake(
    incoming: quinn::Incoming,
    deadline: Duration,
) -> Result<quinn::Connection, SetupError> {
    let connecting = incoming.accept()?;
    tokio::time::timeout(deadline, connecting)
        .await
        .map_err(|_| SetupError::HandshakeTimeout)?
        .map_err(SetupError::Handshake)
}

async fn run_session(
    shared: Arc<Shared>,
    conn: quinn::Connection,
    remote: SocketAddr,
    id: SessionId,
    agent: tether_common::trust::identity::Fingerprint,
    path: Path,
) {
    let (mut send, recv, hello) = match read_hello(&conn, shared.limits.hello_timeout).await {
        Ok(setup) => setup,
        Err(error) => {
            let why = text::printable(&error.to_string());
            tracing::warn!(%remote, error = %why, "session set-up failed");
            error.close_code().close(&conn);
            return;
        }
    };
    // Opened and published under one lock, so that another session of the same agent cannot
    // come between; published before Welcome is sent, so that every way out ends alike.
    let (agent, results, published) = {
        let mut table = shared.table();
        // A reload may have removed the agent, or changed its allowlist, since the handshake.
        let Some(agent) = shared.agent_with(agent) else {
            drop(table);
            tracing::info!("agent no longer listed; session closed");
            CloseCode::Unauthorized.close(&conn);
            return;
        };
        let requests: Vec<(ForwardId, ForwardRequest)> =
            (0..).zip(hello.forwards.iter().cloned()).collect();
        let doors = PublicPorts(&shared);
        let (results, routes) = table.open_forwards(&doors, &shared.limits, &agent, &requests);
        let session = NewSession {
            id,
            conn: conn.clone(),
            path,
            routes,
            udp_forwards: agents::udp_forwards(&requests, &results).collect(),
            datagrams: DatagramSender::new(conn.clone(), shared.udp.clone()),
            resume: hello.resume,
        };
        let published = table.publish(&doors, &shared.limits, &agent.name, session);
        (agent, results, published)
    };
    let Some(Published { live, resumed }) = published else {
        // Removed by a reload between the two steps above; nothing was published.
        CloseCode::Unauthorized.close(&conn);
        return;
    };
    let _udp = udp::carry(&shared, live.clone());
    log_results("forwards", &hello.forwards, &results);
    let welcome = RelayMessage::Welcome(Welcome {
        session: id,
        results,
        resumed: resumed.clone(),
    })
    .encode();
    let reason = match write_frame(&mut send, &welcome).await {
        Ok(()) => {
            match (&hello.resume, &resumed) {
                (Some(lost), Some(streams)) => tracing::info!(
                    %remote,
                    %path,
                    resumed = lost,
                    streams = streams.len(),
                    "agent connected; its lost session resumed"
                ),
                (Some(lost), None) => tracing::info!(
                    %remote,
                    %path,
                    lost,
                    "agent connected; its lost session is not held here, not resumed"
                ),
                (None, _) => tracing::info!(%remote, %path, "agent connected"),
            }
            let session = Session {
                shared: &shared,
                conn: &conn,
                agent: &agent.name,
                live: &live,
            };
            session.wait_for_end(&mut send, recv).await
        }
        Err(error) => format!("cannot send Welcome: {error}"),
    };
    drop(live);
    tracing::info!(%reason, "agent disconnected");
    end_session(&shared, &agent.name, id, resumable(&conn));
}

/// Whether a session that ended may be resumed: it was lost, rather than ended by an agent that
/// said it stops.
fn resumable(conn: &quinn::Connection) -> bool {
    !matches!(
        conn.close_reason(),
        Some(quinn::ConnectionError::ApplicationClosed(close))
            if CloseCode::from_code(close.error_code) == Some(CloseCode::AgentShutdown)
    )
}

/// Why a session's connection ended, the agent's own words made safe to log.
fn ended(error: &quinn::ConnectionError) -> String {
    text::printable(&error.to_string())
}

/// Forwards named in the log line of a Hello or an Update; the rest are counted.
const LOGGED_FORWARDS: usize = 8;

/// Logs the relay's answers to a Hello or an Update in one line, however many forwards it
/// named: `what` says which.
fn log_results(what: &str, forwards: &[ForwardRequest], results: &[ForwardResult]) {
    let refused = results
        .iter()
        .filter(|r| **r != ForwardResult::Opened)
        .count();
    let mut answers: Vec<String> = forwards
        .iter()
        .zip(results)
        .take(LOGGED_FORWARDS)
        .map(|(request, result)| {
            let ports = format!("{}/{}", request.remote, request.proto);
            match result {
                ForwardResult::Opened => format!("{} {ports} open", request.name),
                ForwardResult::Refused(why) => format!("{} {ports} refused: {why}", request.name),
            }
        })
        .collect();
    if forwards.len() > LOGGED_FORWARDS {
        answers.push(format!("and {} more", forwards.len() - LOGGED_FORWARDS));
    }
    tracing::info!(
        open = results.len() - refused,
        refused,
        "{what}: {}",
        answers.join("; ")
    );
}

/// A session once Welcome is sent.
struct Session<'a> {
    shared: &'a Arc<Shared>,
    conn: &'a quinn::Connection,
    agent: &'a str,
    live: &'a LiveSession,
}

impl Session<'_> {
    /// Answers the agent's updates and passes confirmations both ways until the session ends,
    /// and says why it ended.
    async fn wait_for_end(&self, send: &mut quinn::SendStream, recv: quinn::RecvStream) -> String {
        let conn = self.conn;
        let (mut frames, _reader) = frames(recv);
        let limits = &self.shared.limits;
        let mut updates = Pace::new(limits.update_every, limits.update_burst, Instant::now());
        // While set, the control stream is not read: the agent sent updates too fast.
        let mut paused: Option<Instant> = None;
        loop {
            let frame = tokio::select! {
                biased;
                () = self.shared.shutdown.cancelled() => {
                    // Said here, not left to the endpoint's close: once this task ends, nothing
                    // may hold the connection, and quinn would close it with code 0 first.
                    let code = match self.shared.hand_over.token.is_cancelled() {
                        true => CloseCode::RelayRestart,
                        false => CloseCode::RelayShutdown,
                    };
                    code.close(conn);
                    return code.reason().to_owned();
                }
                error = conn.closed() => return ended(&error),
                batch = self.live.acks.next_batch() => {
                    let frame = RelayMessage::Acks(Acks { streams: batch }).encode();
                    match write_frame(send, &frame).await {
                        Ok(()) => continue,
                        Err(_) => return ended(&conn.closed().await),
                    }
                }
                () = tokio::time::sleep_until(paused.unwrap_or_else(Instant::now)), if paused.is_some() => {
                    paused = None;
                    continue;
                }
                frame = frames.recv(), if paused.is_none() => frame.unwrap_or(Err(FrameError::Closed)),
            };
            use quinn::{ReadError, ReadExactError};
            let why = match frame {
                Ok((kind, body)) => match AgentMessage::decode(kind, &body) {
                    Ok(AgentMessage::Acks(acks)) => {
                        let bad = self.live.streams.confirm(&acks.streams);
                        if bad == 0 {
                            continue;
                        }
                        "a confirmation past what the relay sent"
                    }
                    Ok(AgentMessage::Update(update)) => match self.update(update) {
                        Some(answer) => match write_frame(send, &answer).await {
                            Ok(()) => {
                                paused = updates.take(Instant::now());
                                continue;
                            }
                            Err(error) => return format!("cannot answer an update: {error}"),
                        },
                        None => return "replaced or removed during an update".to_owned(),
                    },
                    Ok(AgentMessage::Hello(_)) => "a second Hello",
                    Err(_) => "a control message that does not decode",
                },
                Err(FrameError::Decode(_)) => "a control frame that does not decode",
                // The control stream lasts as long as the session.
                Err(FrameError::Closed | FrameError::Read(ReadExactError::FinishedEarly(_))) => {
                    "the agent ended its control stream"
                }
                Err(FrameError::Read(ReadExactError::ReadError(ReadError::Reset(_)))) => {
                    "the agent reset its control stream"
                }
                // The stream ended with the connection.
                Err(_) => return ended(&conn.closed().await),
            };
            CloseCode::ProtocolError.close(conn);
            return format!("protocol error: {why}");
        }
    }

    /// Applies an update of the agent's forwards and returns the frame that answers it.
    fn update(&self, update: Update) -> Option<bytes::Bytes> {
        let agent = self
            .shared
            .agents()
            .iter()
            .find(|a| a.name == self.agent)
            .cloned()?;
        let results = self.shared.table().update_forwards(
            &PublicPorts(self.shared),
            &self.shared.limits,
            &agent,
            self.live.id,
            &update.forwards,
        )?;
        let requests: Vec<ForwardRequest> = update.forwards.into_iter().map(|(_, r)| r).collect();
        log_results("the agent updated its forwards", &requests, &results);
        Some(RelayMessage::Updated(Updated { results }).encode())
    }
}

/// The relay's public ports, as the table of agents opens them.
pub struct PublicPorts<'a>(pub &'a Arc<Shared>);

impl Doors for PublicPorts<'_> {
    fn open(
        &self,
        agent: &str,
        proto: Proto,
        port: u16,
        session: SessionWatch,
    ) -> std::io::Result<Listening> {
        match proto {
            Proto::Tcp => visitor::listen(self.0, agent, port, session),
            Proto::Udp => udp::listen(self.0, agent, port, session),
        }
    }

    fn resume_link(&self, live: &LiveSession, stream: &HeldStream) -> Resume {
        visitor::resume_link(live, stream)
    }
}

/// Marks the agent away and closes its ports if it does not come back within the hold time.
fn end_session(shared: &Arc<Shared>, agent: &str, id: SessionId, resumable: bool) {
    let Some(generation) = shared.table().session_ended(agent, id, resumable) else {
        return; // A newer session of the agent has taken over.
    };
    hold_ports(shared, agent, generation, resumable);
}

/// Closes the ports of an agent away since `generation` if it does not come back within the
/// hold time: a session that may be resumed holds them as long as its visitor connections, so
/// that its UDP flows find their ports again too.
pub fn hold_ports(shared: &Arc<Shared>, agent: &str, generation: u64, resumable: bool) {
    let shared2 = shared.clone();
    let agent = agent.to_owned();
    let hold = async move {
        let hold = match resumable {
            true => shared2.limits.port_hold.max(shared2.config.resume_window),
            false => shared2.limits.port_hold,
        };
        tokio::select! {
            () = tokio::time::sleep(hold) => {}
            () = shared2.shutdown.cancelled() => return,
        }
        shared2.table().release_if_still_away(&agent, generation);
    };
    shared.tasks.spawn(hold.in_current_span());
}

async fn read_hello(
    conn: &quinn::Connection,
    deadline: Duration,
) -> Result<(quinn::SendStream, quinn::RecvStream, Hello), SetupError> {
    let setup = async {
        let (send, mut recv) = conn.accept_bi().await?;
        let (kind, body) = read_frame(&mut recv).await?;
        match AgentMessage::decode(kind, &body) {
            Ok(AgentMessage::Hello(hello)) => Ok((send, recv, hello)),
            Ok(_) => Err(SetupError::NotHello),
            Err(error) => Err(SetupError::Hello(FrameError::Decode(error))),
        }
    };
    let (send, recv, hello) = tokio::time::timeout(deadline, setup)
        .await
        .map_err(|_| SetupError::HelloTimeout)??;
    if hello.version != VERSION {
        return Err(SetupError::Version(hello.version));
    }
    Ok((send, recv, hello))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::within;

    #[tokio::test]
    async fn a_panicking_session_task_is_reported_and_contained() {
        within(async {
            assert!(isolate(async { panic!("a bug") }).await);
            assert!(!isolate(async {}).await);
        })
        .await;
    }
}
