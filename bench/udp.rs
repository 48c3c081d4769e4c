//! UDP through tether on loopback, against the same echo service reached directly:
//!
//! - round-trip time of 64-byte datagrams, one at a time (p50 and p99);
//! - the highest rate at which every datagram of one flow comes back, for 64- and 1,200-byte
//!   payloads (1,200 is about what mosh sends at most). Rates climb until some are lost; each
//!   step runs for a second, and the sweep runs three times.
//!
//! `cargo run --release -p tether-bench --bin udp`

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use socket2::SockRef;
use tether_relay::Limits;
use tether_tests::udp::{consecutive_udp_ports, udp_echo};
use tether_tests::{udp_forward, Bench};
use tokio::net::UdpSocket;

const PINGS: usize = 2000;
const RATES: [u64; 12] = [
    5_000, 10_000, 20_000, 30_000, 40_000, 50_000, 60_000, 80_000, 100_000, 120_000, 150_000,
    200_000,
];
const STEP: Duration = Duration::from_secs(1);
const SWEEPS: usize = 3;

#[tokio::main]
async fn main() {
    let (local, sockets) = consecutive_udp_ports(1);
    for socket in sockets {
        // The echo service is the measuring tool, not the thing measured: give it room.
        let _ = SockRef::from(&socket).set_recv_buffer_size(4 << 20);
        udp_echo(socket);
    }
    let (public, _) = consecutive_udp_ports(1);
    let forward = udp_forward("echo", public, "127.0.0.1", local);
    let bench = Bench::serving(vec![forward], Limits::default(), |_| {}).await;
    let direct = SocketAddr::from(([127, 0, 0, 1], local.start()));
    let tunnel = SocketAddr::from(([127, 0, 0, 1], public.start()));

    println!("round trip of 64-byte datagrams, {PINGS} one at a time:");
    let (mut direct_rtts, mut tunnel_rtts) = (Vec::new(), Vec::new());
    // Alternate in blocks, so that both see the same moments of a noisy machine.
    for _ in 0..10 {
        direct_rtts.extend(round_trips(direct, PINGS / 10).await);
        tunnel_rtts.extend(round_trips(tunnel, PINGS / 10).await);
    }
    let (d50, d99) = percentiles(&mut direct_rtts);
    let (t50, t99) = percentiles(&mut tunnel_rtts);
    println!("  direct   p50 {d50:>9.1?}  p99 {d99:>9.1?}");
    println!("  tether   p50 {t50:>9.1?}  p99 {t99:>9.1?}");
    println!(
        "  added    p50 {:>9.1?}  p99 {:>9.1?}",
        t50.saturating_sub(d50),
        t99.saturating_sub(d99)
    );

    for size in [64, 1200] {
        println!("\nhighest rate with every {size}-byte datagram echoed, {STEP:?} per step:");
        for (name, to) in [("direct", direct), ("tether", tunnel)] {
            let mut best = Vec::new();
            for _ in 0..SWEEPS {
                best.push(highest_lossless_rate(to, size).await);
            }
            best.sort();
            println!(
                "  {name}  median {} datagrams/s  (sweeps: {best:?})",
                best[best.len() / 2]
            );
        }
    }
    let relay = bench.relay.udp.count();
    let agent = bench.agent.udp.count();
    println!("\nrelay counters: {relay:?}\nagent counters: {agent:?}");
    bench.stop().await;
}

async fn visitor() -> UdpSocket {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let _ = SockRef::from(&socket).set_recv_buffer_size(4 << 20);
    socket.set_nonblocking(true).unwrap();
    UdpSocket::from_std(socket).unwrap()
}

async fn round_trips(to: SocketAddr, count: usize) -> Vec<Duration> {
    let socket = visitor().await;
    let mut buf = [0u8; 128];
    let mut rtts = Vec::with_capacity(count);
    for _ in 0..count {
        let start = Instant::now();
        socket.send_to(&[7u8; 64], to).await.unwrap();
        match tokio::time::timeout(Duration::from_secs(1), socket.recv_from(&mut buf)).await {
            Ok(Ok(_)) => rtts.push(start.elapsed()),
            _ => eprintln!("a ping was lost"),
        }
    }
    rtts
}

fn percentiles(samples: &mut [Duration]) -> (Duration, Duration) {
    samples.sort();
    let at = |p: f64| samples[((samples.len() - 1) as f64 * p).round() as usize];
    (at(0.50), at(0.99))
}

/// Climbs [`RATES`] from a fresh source each step until a step loses a datagram; returns the
/// last rate that lost none.
async fn highest_lossless_rate(to: SocketAddr, size: usize) -> u64 {
    let mut best = 0;
    for rate in RATES {
        let (sent, received) = run_at(to, size, rate).await;
        if received < sent {
            break;
        }
        best = rate;
    }
    best
}

/// Sends `size`-byte datagrams at `rate` a second for [`STEP`] and counts the echoes.
async fn run_at(to: SocketAddr, size: usize, rate: u64) -> (u64, u64) {
    let socket = Arc::new(visitor().await);
    let received = Arc::new(AtomicU64::new(0));
    let counter = {
        let (socket, received) = (socket.clone(), received.clone());
        tokio::spawn(async move {
            let mut buf = vec![0u8; 2048];
            while let Ok(Ok(_)) =
                tokio::time::timeout(Duration::from_millis(500), socket.recv_from(&mut buf)).await
            {
                received.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    let payload = vec![0x5au8; size];
    let start = Instant::now();
    let mut sent = 0u64;
    while start.elapsed() < STEP {
        let due = (start.elapsed().as_secs_f64() * rate as f64) as u64;
        while sent < due {
            socket.send_to(&payload, to).await.unwrap();
            sent += 1;
        }
        tokio::time::sleep(Duration::from_micros(500)).await;
    }
    counter.await.unwrap();
    (sent, received.load(Ordering::Relaxed))
}
