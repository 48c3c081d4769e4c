//! One session on the agent's side: say Hello, learn which forwards the relay opened, and carry
//! each data stream the relay opens to the local service it names.

use std::sync::Arc;
use std::time::Duration;

use tether_common::config::Forward;
use tether_common::control::{read_frame, write_frame, FrameError};
use tether_common::datagram::{DatagramSender, UdpCounters};
use tether_common::protocol::{
    AgentMessage, CloseCode, ForwardRequest, ForwardResult, Hello, RelayMessage, SessionId,
    StreamCode, StreamHeader, VERSION,
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

/// Runs one session on an established connection until it ends.
pub async fn run(
    conn: &quinn::Connection,
    forwards: Arc<[Offered]>,
    resume: Option<SessionId>,
    cx: Context<'_>,
) -> SessionEnd {
    let Context {
        status,
        tracker,
        udp,
        shutdown,
    } = cx;
    let (session, opened, (_control_send, mut control)) = match open(conn, &forwards, resume).await
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
    report(&forwards, &opened);
    status.send_replace(AgentStatus::Connected {
        session,
        forwards: forwards
            .iter()
            .map(|o| o.forward.name.clone())
            .zip(opened.iter().copied())
            .collect(),
    });
    let opened: Arc<[Option<Offered>]> = forwards
        .iter()
        .zip(opened.iter())
        .map(|(f, r)| (*r == ForwardResult::Opened).then(|| f.clone()))
        .collect();
    let datagrams = DatagramSender::new(conn.clone(), udp.clone());
    let flows = udp::Flows::new(&opened, datagrams, udp.clone()).await;
    let _live = tracker.connected(conn.clone(), flows.clone());
    let _udp = AbortOnDropHandle::new(tokio::spawn(
        udp::carry(conn.clone(), flows).in_current_span(),
    ));

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
            frame = read_frame(&mut control) => {
                if let Ok(_) | Err(FrameError::Decode(_)) = frame {
                    // Version 1 has no message for the relay to send after Welcome.
                    CloseCode::ProtocolError.close(conn);
                }
                let error = conn.closed().await;
                break SessionEnd::of_closed(Some(session), &error, error.to_string());
            }
            Some(_) = streams.join_next() => {}
        }
    };
    // The streams cannot outlive the connection; dropping the set ends what is left.
    streams.abort_all();
    end
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
            forwards: forwards
                .iter()
                .map(|o| &o.forward)
                .map(|f| ForwardRequest {
                    name: f.name.clone(),
                    proto: f.proto,
                    remote: f.remote,
                    flow_idle: f.flow_idle,
                    allow_from: f.allow_from.clone(),
                })
                .collect(),
        };
        write_frame(&mut send, &AgentMessage::Hello(hello).encode()).await?;
        let (kind, body) = read_frame(&mut recv).await?;
        let RelayMessage::Welcome(welcome) =
            RelayMessage::decode(kind, &body).map_err(FrameError::Decode)?;
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

/// Logs the relay's answer for each forward in plain words.
fn report(forwards: &[Offered], results: &[ForwardResult]) {
    for (Offered { forward, .. }, result) in forwards.iter().zip(results) {
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
    forwards: Arc<[Option<Offered>]>,
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
        let Offered { forward, traffic } = forwards.get(usize::from(h.forward))?.as_ref()?;
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
