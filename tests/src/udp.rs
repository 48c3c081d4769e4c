//! UDP services and visitors for the tests.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use tether_common::net::ports::PortRange;
use tokio::net::UdpSocket;

use crate::consecutive;

/// How long a test waits for one answer before it calls the datagram lost.
pub const ANSWER_WAIT: Duration = Duration::from_secs(5);

/// `count` consecutive UDP ports free on 127.0.0.1 and ::1, and the IPv4 sockets holding them.
/// Drop the sockets to hand the ports to the relay, or serve on them.
pub fn consecutive_udp_ports(count: u16) -> (PortRange, Vec<std::net::UdpSocket>) {
    let (base, bound) = consecutive(count, |address| std::net::UdpSocket::bind(address).ok());
    let v4 = bound
        .into_iter()
        .filter(|s| s.local_addr().unwrap().is_ipv4())
        .collect();
    (PortRange::new(base, base + count - 1).unwrap(), v4)
}

/// Serves on `socket`: answers each datagram with what `answer` makes of it and its sender.
pub fn serve_udp<F>(socket: std::net::UdpSocket, answer: F)
where
    F: Fn(&[u8], SocketAddr, u16) -> Vec<u8> + Send + 'static,
{
    socket.set_nonblocking(true).unwrap();
    let socket = UdpSocket::from_std(socket).unwrap();
    let port = socket.local_addr().unwrap().port();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65_536];
        while let Ok((len, from)) = socket.recv_from(&mut buf).await {
            let _ = socket.send_to(&answer(&buf[..len], from, port), from).await;
        }
    });
}

/// Echoes every datagram to its sender.
pub fn udp_echo(socket: std::net::UdpSocket) {
    serve_udp(socket, |payload, _, _| payload.to_vec());
}

/// Answers every datagram with "PORT SOURCE": the local port it reached and who sent it.
pub fn udp_whoami(socket: std::net::UdpSocket) {
    serve_udp(socket, |_, from, port| {
        format!("{port} {from}").into_bytes()
    });
}

/// A visitor: a fresh UDP socket on `ip` with a port of its own.
pub async fn visitor(ip: &str) -> UdpSocket {
    UdpSocket::bind((ip.parse::<IpAddr>().unwrap(), 0))
        .await
        .expect("visitor bind")
}

/// Sends `payload` to `to` and waits up to [`ANSWER_WAIT`] for the answer.
pub async fn ask(socket: &UdpSocket, to: SocketAddr, payload: &[u8]) -> Option<Vec<u8>> {
    socket.send_to(payload, to).await.expect("send");
    let mut buf = vec![0u8; 65_536];
    let (len, _) = tokio::time::timeout(ANSWER_WAIT, socket.recv_from(&mut buf))
        .await
        .ok()?
        .expect("recv");
    buf.truncate(len);
    Some(buf)
}

/// [`ask`] a [`udp_whoami`] service: the local port reached and the source it saw.
pub async fn whoami(socket: &UdpSocket, to: SocketAddr) -> (u16, SocketAddr) {
    let answer = ask(socket, to, b"who").await.expect("an answer");
    let text = String::from_utf8(answer).unwrap();
    let (port, source) = text.split_once(' ').unwrap();
    (port.parse().unwrap(), source.parse().unwrap())
}
