//! Public UDP ports and their flows. A flow is one visitor source on one public port; the relay
//! numbers it, and every datagram of it crosses the session with a [`DatagramHeader`] naming the
//! flow, the forward and the public port.
//!
//! Nothing here waits on one flow's behalf: datagrams go to the agent as QUIC datagrams and
//! answers go to visitors with non-blocking sends, so a lost or stuck datagram of one flow never
//! delays another.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use socket2::SockRef;
use tether_common::net::ports::Proto;
use tether_common::wire::datagram::{self, DatagramHeader, DropReason, UdpCounters, Violation};
use tether_common::wire::datagram::{HEADER_LEN, MAX_PAYLOAD};
use tether_common::wire::protocol::CloseCode;
use tokio::net::UdpSocket;
use tokio_util::sync::{CancellationToken, DropGuard};
use tracing::Instrument;

use crate::admission::Refused;
use crate::live::{LiveSession, SessionWatch};
use crate::public::{self, Listening};
use crate::shared::Shared;

/// Opens public UDP `port` for `agent` and carries what arrives on it for as long as the
/// returned port is held; answers to visitors leave from its socket.
pub fn listen(
    shared: &Arc<Shared>,
    agent: &str,
    port: u16,
    session: SessionWatch,
) -> io::Result<Listening> {
    let (socket, adopted) = match shared.adopted_port(Proto::Udp, port) {
        Some(socket) => (UdpSocket::from_std(socket.into())?, true),
        None => (bind_udp(shared.config.public_bind, port)?, false),
    };
    let kept = shared.keep(public::kept_name(Proto::Udp, port), socket.as_fd(), adopted);
    let socket = Arc::new(socket);
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
    Ok(Listening {
        cancel,
        tcp: None,
        udp: Some(socket),
        kept,
    })
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

fn bind_udp(address: Option<IpAddr>, port: u16) -> io::Result<UdpSocket> {
    UdpSocket::from_std(public::bind(address, port, Proto::Udp)?.into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::within;

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
