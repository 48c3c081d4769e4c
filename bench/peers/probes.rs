//! What the comparison measures with: a TCP echo service, a 64-byte request/response probe,
//! new connections timed to their first byte, idle connections held open, iperf3, and the
//! memory and CPU time of a process as Linux counts them.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::process::Command;

/// The size of the request/response probe's messages.
pub const PROBE_BYTES: usize = 64;

/// The TCP echo service behind every tunnel.
pub struct Echo {
    pub port: u16,
}

impl Echo {
    /// Listens at `address` (port 0: any free port) and serves for as long as the runtime.
    pub async fn start(address: SocketAddr) -> Result<Self> {
        let listener = TcpListener::bind(address)
            .await
            .with_context(|| format!("echo service at {address}"))?;
        let port = listener.local_addr()?.port();
        tokio::spawn(async move {
            while let Ok((mut tcp, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let _ = tcp.set_nodelay(true);
                    let (mut read, mut write) = tcp.split();
                    let _ = tokio::io::copy(&mut read, &mut write).await;
                });
            }
        });
        Ok(Self { port })
    }
}

/// Round trips of a 64-byte message on one connection to `address`, after `warm_up` of them:
/// `count`, or as many as fit before `until`.
pub async fn round_trips(
    address: SocketAddr,
    count: usize,
    warm_up: usize,
    until: Option<Instant>,
) -> Result<Vec<Duration>> {
    let mut tcp = TcpStream::connect(address).await?;
    tcp.set_nodelay(true)?;
    let message = [7u8; PROBE_BYTES];
    let mut answer = [0u8; PROBE_BYTES];
    let mut times = Vec::with_capacity(count.min(100_000));
    for i in 0..count.saturating_add(warm_up) {
        if until.is_some_and(|until| Instant::now() >= until) {
            break;
        }
        let start = Instant::now();
        tcp.write_all(&message).await?;
        tcp.read_exact(&mut answer).await?;
        if i >= warm_up {
            times.push(start.elapsed());
        }
    }
    if times.is_empty() {
        bail!("no round trip through {address} in time");
    }
    Ok(times)
}

/// For each of `count` new connections to `address` in turn, the time from the first
/// connection attempt to the first byte of the answer: a visitor's wait before anything works.
pub async fn first_bytes(address: SocketAddr, count: usize) -> Result<Vec<Duration>> {
    let mut times = Vec::with_capacity(count);
    for _ in 0..count {
        let start = Instant::now();
        let mut tcp = TcpStream::connect(address).await?;
        tcp.set_nodelay(true)?;
        tcp.write_all(b"x").await?;
        let mut byte = [0u8; 1];
        tcp.read_exact(&mut byte).await?;
        times.push(start.elapsed());
    }
    Ok(times)
}

/// Opens `count` connections to the echo service through `address`, each carrying one byte
/// there and back (so each is set up end to end), and returns them open and idle. They come
/// from several loopback addresses, 200 from each, under the per-address limits a relay may
/// have.
pub async fn idle_connections(address: SocketAddr, count: usize) -> Result<Vec<TcpStream>> {
    let mut held = Vec::with_capacity(count);
    for i in 0..count {
        let source = Ipv4Addr::new(127, 0, 1, 1 + (i / 200) as u8);
        let socket = TcpSocket::new_v4()?;
        socket.bind(SocketAddr::from((source, 0)))?;
        let mut tcp = socket
            .connect(address)
            .await
            .with_context(|| format!("idle connection {i}"))?;
        tcp.write_all(b"x").await?;
        let mut byte = [0u8; 1];
        tcp.read_exact(&mut byte).await?;
        held.push(tcp);
    }
    Ok(held)
}

/// What iperf3 reported of one test.
#[derive(Debug, Clone, Copy, Default)]
pub struct Iperf {
    /// Received, in Mbit/s.
    pub mbps: f64,
    /// Bytes received.
    pub bytes: f64,
    /// UDP only: the share of datagrams lost, in percent, and the jitter in milliseconds.
    pub lost_percent: f64,
    pub jitter_ms: f64,
}

/// Runs the iperf3 client against the server at `server` for `seconds` with `extra` arguments.
pub async fn iperf3(
    iperf3: &Path,
    server: SocketAddr,
    seconds: u64,
    extra: &[&str],
) -> Result<Iperf> {
    let out = Command::new(iperf3)
        .args([
            "-c",
            &server.ip().to_string(),
            "-p",
            &server.port().to_string(),
        ])
        .arg("-J")
        .args(["-t", &seconds.to_string()])
        .args(extra)
        .stdin(Stdio::null())
        .output()
        .await?;
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "iperf3 printed no report: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })?;
    if let Some(error) = report.get("error") {
        bail!("iperf3: {error}");
    }
    let end = &report["end"];
    let number = |v: &serde_json::Value| v.as_f64().unwrap_or(0.0);
    if extra.contains(&"-u") {
        // The server's view: what arrived, how much was lost, and the jitter.
        let sum = &end["sum"];
        return Ok(Iperf {
            mbps: number(&sum["bits_per_second"]) / 1e6,
            bytes: number(&sum["bytes"]),
            lost_percent: number(&sum["lost_percent"]),
            jitter_ms: number(&sum["jitter_ms"]),
        });
    }
    let received = &end["sum_received"];
    Ok(Iperf {
        mbps: number(&received["bits_per_second"]) / 1e6,
        bytes: number(&received["bytes"]),
        ..Iperf::default()
    })
}

/// Starts iperf3's server on a free port; it serves one test at a time, for as long as the
/// returned child lives. A port found free may be taken before iperf3 binds it (by one of the
/// many connections a run makes): iperf3 then exits, and another port is tried.
pub async fn iperf3_server(iperf3: &Path) -> Result<(tokio::process::Child, u16)> {
    const TRIES: usize = 5;
    for _ in 0..TRIES {
        let port = crate::systems::free_port()?;
        let mut child = Command::new(iperf3)
            .args(["-s", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("starting iperf3 -s")?;
        let start = Instant::now();
        // iperf3 says nothing when it is ready: ask until it accepts, within 10 s.
        while TcpStream::connect(("127.0.0.1", port)).await.is_err() {
            if child.try_wait()?.is_some() {
                break;
            }
            if start.elapsed() > Duration::from_secs(10) {
                bail!("iperf3 -s did not start on port {port}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if child.try_wait()?.is_none() {
            return Ok((child, port));
        }
    }
    bail!("iperf3 -s exited at once on {TRIES} free ports")
}

/// The sum over `pids` of `measure`.
pub fn total(pids: &[u32], measure: impl Fn(u32) -> Result<f64>) -> Result<f64> {
    pids.iter().map(|&pid| measure(pid)).sum()
}

/// The `q` quantile (0 to 1) of `samples`, by nearest rank.
pub fn quantile(samples: &mut [Duration], q: f64) -> Duration {
    samples.sort();
    let rank = ((samples.len() as f64 * q).ceil() as usize).clamp(1, samples.len());
    samples[rank - 1]
}
