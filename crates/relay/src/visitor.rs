//! Public TCP ports and the visitors who connect to them: each visitor connection becomes one
//! data stream to the agent, its first bytes sent right behind the stream header. A visitor
//! connection is held when the agent's session is lost, and resumed on a new data stream when
//! the agent's next session asks for it.

use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::Duration;

use socket2::{SockRef, TcpKeepalive};
use tether_common::carry::resume::{HeldStream, Link, Registration, Resume, ResumeError};
use tether_common::carry::splice::{self, splice, Held, SpliceError};
use tether_common::net::ports::Proto;
use tether_common::wire::protocol::{ResumeHeader, StreamHeader};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::admission::{Admission, Refused};
use crate::live::{LiveSession, Route, SessionWatch};
use crate::places::{Place, Seat};
use crate::public::{self, Listening};
use crate::shared::Shared;

/// Opens public TCP `port` for `agent` and serves it for as long as the returned port is held.
pub fn listen(
    shared: &Arc<Shared>,
    agent: &str,
    port: u16,
    session: SessionWatch,
) -> io::Result<Listening> {
    let (listener, adopted) = match shared.adopted_port(Proto::Tcp, port) {
        Some(socket) => (TcpListener::from_std(socket.into())?, true),
        None => (bind_tcp(shared.config.public_bind, port)?, false),
    };
    let kept = shared.keep(
        public::kept_name(Proto::Tcp, port),
        listener.as_fd(),
        adopted,
    );
    let listener = Arc::new(listener);
    let cancel = shared.shutdown.child_token();
    let span = tracing::info_span!("port", agent, port);
    let door = Door {
        agent: agent.to_owned(),
        port,
    };
    let task = accept_loop(
        shared.clone(),
        listener.clone(),
        door,
        session,
        cancel.clone(),
    );
    shared.tasks.spawn(task.instrument(span));
    Ok(Listening {
        cancel,
        tcp: Some(listener),
        udp: None,
        kept,
    })
}

/// Where visitors come in: one agent's public TCP port.
struct Door {
    agent: String,
    port: u16,
}

/// What an admitted visitor holds until its connection ends: a seat among the relay's
/// visitors and a place among its forward's. Kept where the visitor's future first stores it
/// and changed in place: a part moved out would take room of its own in every connection's
/// future.
struct Admitted {
    _relay: Seat,
    forward: Option<Place>,
}

impl Admitted {
    /// Holds on to the visitor's place if `now` is the admission that gave it; else gives the
    /// place back and asks `now` for one (the forward changed while the visitor waited).
    fn confirm(&mut self, now: &Admission, visitor: IpAddr) -> Result<(), Refused> {
        if self.forward.as_ref().is_some_and(|place| now.gave(place)) {
            return Ok(());
        }
        self.forward = None;
        self.forward = Some(now.admit(visitor)?);
        Ok(())
    }
}

impl Door {
    /// Takes the visitor's places, or says in the tally why not. Done as the visitor arrives,
    /// before anything waits for the agent: a visitor the forward would refuse holds nothing.
    fn admit(&self, shared: &Shared, visitor: SocketAddr) -> Option<Admitted> {
        let Some(seat) = shared.visitors.take() else {
            let why = "the relay has its most visitor connections";
            shared.refused_visitors.record(why, &visitor);
            return None;
        };
        // The agent's latest forwards, kept while it is away; none if the port is closing.
        let admission = shared.table().admission_of(&self.agent, self.port)?;
        match admission.admit(visitor.ip()) {
            Ok(forward) => Some(Admitted {
                _relay: seat,
                forward: Some(forward),
            }),
            Err(refused) => {
                shared.refused_visitors.record(refused.reason(), &visitor);
                None
            }
        }
    }
}

async fn accept_loop(
    shared: Arc<Shared>,
    listener: Arc<TcpListener>,
    door: Door,
    session: SessionWatch,
    cancel: CancellationToken,
) {
    tracing::debug!("listening");
    loop {
        let (tcp, visitor) = tokio::select! {
            // First: a listener stopped when its port was dropped fails to accept.
            biased;
            () = cancel.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors and the like: pause rather than spin.
                    tracing::warn!(%error, "accepting a visitor failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let visitor = SocketAddr::new(visitor.ip().to_canonical(), visitor.port());
        let Some(admitted) = door.admit(&shared, visitor) else {
            splice::reset_tcp(&tcp);
            continue;
        };
        let span = tracing::debug_span!("visitor", %visitor);
        let task = serve(
            tcp,
            visitor,
            door.port,
            admitted,
            session.clone(),
            shared.clone(),
        );
        // A span takes room in every visitor's task: only when it is on.
        match span.is_disabled() {
            true => shared.tasks.spawn(task),
            false => shared.tasks.spawn(task.instrument(span)),
        };
    }
    tracing::debug!("closed");
}

/// Serves one visitor for as long as its connection lasts. There is one of these per visitor,
/// so its size counts: see `splice` for why it is an `async move` block.
#[expect(
    clippy::manual_async_fn,
    reason = "an async fn keeps its arguments twice"
)]
fn serve(
    tcp: TcpStream,
    visitor: SocketAddr,
    port: u16,
    mut admitted: Admitted,
    mut session: SessionWatch,
    shared: Arc<Shared>,
) -> impl Future<Output = ()> {
    async move {
        configure(&tcp, shared.config.tcp_keepalive);
        let ready = |s: &Option<Arc<LiveSession>>| {
            s.as_ref()
                .is_some_and(|s| s.routes().contains_key(&(Proto::Tcp, port)))
        };
        let wait = shared.limits.visitor_wait;
        let live = tokio::select! {
            // A relay that stops (or restarts) does not wait for an agent that is away.
            biased;
            () = shared.shutdown.cancelled() => None,
            live = tokio::time::timeout(wait, session.wait_for(ready)) => match live {
                Ok(Ok(live)) => live.clone(),
                _ => None,
            },
        };
        let Some((live, route)) =
            live.and_then(|l| Some((l.clone(), l.routes().get(&(Proto::Tcp, port))?.clone())))
        else {
            tracing::debug!("agent away; visitor closed");
            return;
        };
        if let Err(refused) = admitted.confirm(&route.admission, visitor.ip()) {
            shared.refused_visitors.record(refused.reason(), &visitor);
            splice::reset_tcp(&tcp);
            return;
        }
        let (mut send, recv) = match live.conn.open_bi().await {
            Ok(stream) => stream,
            Err(error) => {
                tracing::debug!(%error, "cannot open a data stream");
                return;
            }
        };
        let header = StreamHeader {
            id: live.next_stream_id(),
            forward: route.forward,
            port,
            visitor,
        };
        let Some((stream, _held)) = live.streams.add(header, live.id) else {
            return; // Ids are never given twice; nothing to carry if one were.
        };
        let _open = route.traffic.visitor();
        tracing::debug!(forward = %route.name, stream = header.id, "data stream open");
        let logged = shared.audit.accepted(&route.name, visitor);
        if let Err(error) = send.write_all(&header.encode()).await {
            tracing::debug!(%error, "cannot write the stream header");
            splice::reset_tcp(&tcp);
            return;
        }
        let link = Link {
            conn: live.conn.clone(),
            send,
            recv,
            peer_received: 0,
            acks: live.acks.clone(),
        };
        drop(live);
        let (moved, result) = splice(tcp, Some(link), held(&shared, &stream, &route)).await;
        let Some(result) = hand_over_if_asked(&shared, &stream, result) else {
            return;
        };
        match logged {
            Some(logged) => shared
                .audit
                .closed(logged, &route.name, visitor, moved, &result),
            None => tracing::debug!(?result, "visitor disconnected"),
        }
    }
}

/// Carries on a visitor connection that the previous process handed over, its stream as that
/// process left it: held until the agent's next session resumes it, within the resume window.
/// It takes its places as a visitor arriving now would; refused (the relay or the forward is
/// full, or the forward no longer admits its address), it is closed.
pub fn adopt(
    shared: &Arc<Shared>,
    tcp: std::net::TcpStream,
    route: Route,
    stream: Arc<HeldStream>,
    registration: Registration,
) -> Result<(), &'static str> {
    let visitor = stream.header.visitor;
    let seat = shared
        .visitors
        .take()
        .ok_or("the relay has its most visitor connections")?;
    let forward = route
        .admission
        .admit(visitor.ip())
        .map_err(|r| r.reason())?;
    let tcp = tcp
        .set_nonblocking(true)
        .and_then(|()| TcpStream::from_std(tcp))
        .map_err(|_| "the socket cannot be registered")?;
    let shared2 = shared.clone();
    let task = async move {
        let shared = shared2;
        let _admitted = Admitted {
            _relay: seat,
            forward: Some(forward),
        };
        let _registration = registration;
        let _open = route.traffic.visitor();
        let (_, result) = splice(tcp, None, held(&shared, &stream, &route)).await;
        if let Some(result) = hand_over_if_asked(&shared, &stream, result) {
            tracing::debug!(?result, "visitor disconnected");
        }
    };
    let span = tracing::debug_span!("visitor", %visitor);
    shared.tasks.spawn(task.instrument(span));
    Ok(())
}

/// What a visitor's splice needs of the relay: its resume window, its stop and hand-over, and
/// the forward's meter.
fn held<'a>(shared: &'a Shared, stream: &'a HeldStream, route: &'a Route) -> Held<'a> {
    Held {
        stream,
        window: shared.config.resume_window,
        stop: &shared.shutdown,
        hand_over: Some(&shared.hand_over.token),
        meter: route.traffic.at_visitor(),
    }
}

/// Gives the connection of a splice that stopped for a hand-over to the relay's hand-over,
/// with its stream as it stands; any other end is returned.
fn hand_over_if_asked(
    shared: &Shared,
    stream: &HeldStream,
    result: Result<(), SpliceError>,
) -> Option<Result<(), SpliceError>> {
    match result {
        Err(SpliceError::HandedOver(Some(tcp))) => {
            shared.hand_over.give(tcp, stream.snapshot());
            None
        }
        result => Some(result),
    }
}

/// How a held stream goes on in the new session `live`: the relay opens a data stream, says
/// which stream it resumes and what it received, and reads what the agent received.
pub fn resume_link(live: &LiveSession, stream: &HeldStream) -> Resume {
    let conn = live.conn.clone();
    let acks = live.acks.clone();
    let mut header = stream.header;
    // The forward's id in the new session, in case the agent never saw the stream.
    if let Some(route) = live.routes().get(&(Proto::Tcp, header.port)) {
        header.forward = route.forward;
    }
    let seen = stream.seen_by_peer();
    Resume::Link(Box::new(move |received| {
        Box::pin(async move {
            let lost = |error: &quinn::ConnectionError| {
                tracing::debug!(%error, "the new session was lost too");
                Ok(None)
            };
            let (mut send, mut recv) = match conn.open_bi().await {
                Ok(stream) => stream,
                Err(error) => return lost(&error),
            };
            let header = ResumeHeader {
                stream: header,
                received,
                seen,
            };
            if let Err(error) = send.write_all(&header.encode()).await {
                return match error {
                    quinn::WriteError::ConnectionLost(error) => lost(&error),
                    _ => Err(ResumeError::Refused),
                };
            }
            let mut peer = [0u8; 8];
            let answer = tokio::time::timeout(RESUME_ANSWER_TIMEOUT, recv.read_exact(&mut peer));
            match answer.await {
                Ok(Ok(())) => {}
                Ok(Err(quinn::ReadExactError::ReadError(quinn::ReadError::ConnectionLost(
                    error,
                )))) => return lost(&error),
                // Reset: the agent no longer holds the stream.
                _ => return Err(ResumeError::Refused),
            }
            Ok(Some(Link {
                conn,
                send,
                recv,
                peer_received: u64::from_be_bytes(peer),
                acks,
            }))
        })
    }))
}

/// How long the agent may take to answer a resumed data stream.
const RESUME_ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

fn bind_tcp(address: Option<IpAddr>, port: u16) -> io::Result<TcpListener> {
    TcpListener::from_std(public::bind(address, port, Proto::Tcp)?.into())
}

fn configure(tcp: &TcpStream, keepalive: Option<Duration>) {
    let _ = tcp.set_nodelay(true);
    if let Some(time) = keepalive {
        let probes = TcpKeepalive::new().with_time(time).with_interval(time);
        if let Err(error) = SockRef::from(tcp).set_tcp_keepalive(&probes) {
            tracing::debug!(%error, "cannot set TCP keepalive");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::within;

    async fn accepted_pair(listener: &TcpListener, addr: SocketAddr) -> (TcpStream, TcpStream) {
        let client = TcpStream::connect(addr).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        (client, server)
    }

    #[tokio::test]
    async fn visitor_sockets_get_nodelay_and_the_configured_keepalive() {
        within(async {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let (_client, server) = accepted_pair(&listener, addr).await;
            configure(&server, Some(Duration::from_secs(30)));
            let socket = SockRef::from(&server);
            assert!(server.nodelay().unwrap());
            assert!(socket.keepalive().unwrap());
            assert_eq!(
                socket.tcp_keepalive_time().unwrap(),
                Duration::from_secs(30)
            );
            assert_eq!(
                socket.tcp_keepalive_interval().unwrap(),
                Duration::from_secs(30)
            );

            let (_client, server) = accepted_pair(&listener, addr).await;
            configure(&server, None);
            assert!(!SockRef::from(&server).keepalive().unwrap());
        })
        .await;
    }

    #[tokio::test]
    async fn default_bind_takes_ipv4_and_ipv6_visitors() {
        within(async {
            let listener = bind_tcp(None, 0).unwrap();
            let port = listener.local_addr().unwrap().port();
            for ip in ["127.0.0.1", "::1"] {
                let addr = SocketAddr::new(ip.parse().unwrap(), port);
                let (_client, server) = accepted_pair(&listener, addr).await;
                let seen = server.peer_addr().unwrap().ip().to_canonical();
                assert_eq!(seen, addr.ip());
            }
        })
        .await;
    }
}
