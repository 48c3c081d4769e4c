//! The test bench for tether's end-to-end tests: keys in a temporary folder, a relay and agents
//! running in-process on loopback, and local services to forward to. Everything binds port 0
//! or asks the kernel for a free port, and every wait has a deadline.

pub mod connect_proxy;
pub mod cut;
pub mod gate;
pub mod lab;
pub mod manager;
pub mod mosh;
pub mod process;
pub mod raw;
pub mod scene;
pub mod status;
pub mod tools;
pub mod udp;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tether_agent::{Agent, AgentStatus};
use tether_common::config::{
    AgentConfig, AgentEntry, Forward, HostPort, LocalTarget, RelayConfig, Transport,
    DEFAULT_FLOW_IDLE,
};
use tether_common::net::ports::{PortRange, PortSpec, Proto};
use tether_common::trust::identity::{Fingerprint, Identity};
use tether_common::wire::datagram::UdpCounters;
use tether_relay::{Limits, Relay};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// The deadline of any one step of a test.
pub const STEP: Duration = Duration::from_secs(10);

/// Awaits `future`, failing the test if it takes longer than [`STEP`].
pub async fn within<T>(what: &str, future: impl Future<Output = T>) -> T {
    within_for(what, STEP, future).await
}

/// Awaits `future`, failing the test if it takes longer than `limit`.
pub async fn within_for<T>(what: &str, limit: Duration, future: impl Future<Output = T>) -> T {
    match tokio::time::timeout(limit, future).await {
        Ok(value) => value,
        Err(_) => panic!("timed out after {limit:?} waiting for {what}"),
    }
}

/// A folder of keys that lives as long as the test.
pub struct Keys {
    dir: tempfile::TempDir,
}

impl Keys {
    pub fn new() -> Self {
        Self {
            dir: tempfile::tempdir().expect("temporary folder"),
        }
    }

    /// A new identity, its key written as `NAME.key`.
    pub fn identity(&self, name: &str) -> (Identity, PathBuf) {
        let path = self.dir.path().join(format!("{name}.key"));
        (Identity::generate(&path).expect("key"), path)
    }

    pub fn path(&self) -> &std::path::Path {
        self.dir.path()
    }
}

impl Default for Keys {
    fn default() -> Self {
        Self::new()
    }
}

/// A TCP port that was free a moment ago, for public ports the agent must name in advance.
pub fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("address").port()
}

/// `count` consecutive ports bound on 127.0.0.1 and on ::1, for ranges.
pub fn consecutive_listeners(count: u16) -> Vec<std::net::TcpListener> {
    consecutive(count, |address| std::net::TcpListener::bind(address).ok()).1
}

/// The first of `count` consecutive ports that `bind` could take on 127.0.0.1 and ::1, and what
/// it made of them (IPv4 and IPv6 for each port in turn).
pub fn consecutive<T>(count: u16, bind: impl Fn((&str, u16)) -> Option<T>) -> (u16, Vec<T>) {
    for _ in 0..1000 {
        let base = rand::random::<u16>() % 30_000 + 20_000;
        let bound: Vec<_> = (base..base + count)
            .flat_map(|port| ["127.0.0.1", "::1"].map(|ip| (ip, port)))
            .map_while(&bind)
            .collect();
        if bound.len() == usize::from(count) * 2 {
            return (base, bound);
        }
    }
    panic!("no {count} consecutive free ports");
}

pub fn relay_config(key: PathBuf, agents: Vec<AgentEntry>) -> RelayConfig {
    RelayConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        listen_tcp: None,
        key: key.clone(),
        public_bind: Some("127.0.0.1".parse().unwrap()),
        tcp_keepalive: Some(Duration::from_secs(30)),
        resume_window: tether_common::carry::resume::DEFAULT_RESUME_WINDOW,
        agents,
        status_socket: key.with_file_name("relay.sock"),
        metrics: None,
    }
}

/// An `[[agent]]` entry allowing `ports` over TCP.
pub fn agent_entry(name: &str, fingerprint: Fingerprint, ports: &[u16]) -> AgentEntry {
    AgentEntry {
        name: name.into(),
        fingerprint,
        ports: ports
            .iter()
            .map(|&p| PortSpec {
                proto: Proto::Tcp,
                range: PortRange::single(p).unwrap(),
            })
            .collect(),
    }
}

pub fn agent_config(
    key: PathBuf,
    relay: SocketAddr,
    relay_fingerprint: Fingerprint,
    forwards: Vec<Forward>,
) -> AgentConfig {
    let relay = HostPort {
        host: relay.ip().to_string(),
        port: relay.port(),
    };
    AgentConfig {
        relay_tcp: relay.clone(),
        relay,
        relay_fingerprint,
        transport: Transport::Auto,
        proxy: None,
        status_socket: key.with_file_name("agent.sock"),
        key,
        keepalive: Some(Duration::from_secs(10)),
        idle_timeout: Duration::from_secs(30),
        resume_window: tether_common::carry::resume::DEFAULT_RESUME_WINDOW,
        forwards,
        metrics: None,
    }
}

/// A TCP forward from public `remote` to `local`.
pub fn tcp_forward(name: &str, remote: u16, local: SocketAddr) -> Forward {
    Forward {
        name: name.into(),
        proto: Proto::Tcp,
        remote: PortRange::single(remote).unwrap(),
        local: LocalTarget {
            host: local.ip().to_string(),
            ports: PortRange::single(local.port()).unwrap(),
        },
        flow_idle: DEFAULT_FLOW_IDLE,
        allow_from: vec![],
    }
}

/// A UDP forward from public ports `remote` to the same number of ports from `local` on
/// `host`.
pub fn udp_forward(name: &str, remote: PortRange, host: &str, local: PortRange) -> Forward {
    Forward {
        name: name.into(),
        proto: Proto::Udp,
        remote,
        local: LocalTarget {
            host: host.into(),
            ports: local,
        },
        flow_idle: DEFAULT_FLOW_IDLE,
        allow_from: vec![],
    }
}

/// A relay running in-process until [`RelayHandle::stop`].
pub struct RelayHandle {
    pub addr: SocketAddr,
    /// The TCP address agents connect to when UDP does not pass, if `listen_tcp` is set.
    pub tcp_addr: Option<SocketAddr>,
    /// Reads the relay's status and reloads its config, as the status socket and SIGHUP do.
    pub control: tether_relay::Control,
    pub fingerprint: Fingerprint,
    pub udp: Arc<UdpCounters>,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

pub fn start_relay(config: RelayConfig, identity: &Identity) -> RelayHandle {
    start_relay_with(config, identity, Limits::default())
}

/// A relay with other timings than the product's, to see a limit work without waiting for it.
pub fn start_relay_with(config: RelayConfig, identity: &Identity, limits: Limits) -> RelayHandle {
    let relay = Relay::bind_with(config, identity, limits).expect("relay binds");
    let addr = relay.local_addr().expect("relay address");
    let tcp_addr = relay.tcp_addr();
    let control = relay.control();
    let udp = relay.udp_counters();
    let stop = CancellationToken::new();
    let task = tokio::spawn(relay.run(stop.clone()));
    RelayHandle {
        addr,
        tcp_addr,
        control,
        fingerprint: identity.fingerprint(),
        udp,
        stop,
        task,
    }
}

impl RelayHandle {
    /// Drains the relay and waits until it has let go of its port.
    pub async fn stop(self) {
        self.stop.cancel();
        within("the relay to stop", self.task)
            .await
            .expect("relay task");
    }
}

/// An agent running in-process until [`AgentHandle::stop`].
pub struct AgentHandle {
    pub status: watch::Receiver<AgentStatus>,
    /// Reloads the agent's config, as SIGHUP does.
    pub control: tether_agent::AgentControl,
    pub udp: Arc<UdpCounters>,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

pub fn start_agent(config: AgentConfig, identity: &Identity) -> AgentHandle {
    let agent = Agent::new(config, identity).expect("agent");
    let status = agent.status();
    let control = agent.control();
    let udp = agent.udp_counters();
    let stop = CancellationToken::new();
    let task = tokio::spawn(agent.run(stop.clone()));
    AgentHandle {
        status,
        control,
        udp,
        stop,
        task,
    }
}

impl AgentHandle {
    /// Waits for a session other than `not` to be up, and returns its status.
    pub async fn connected_other_than(&mut self, not: Option<u64>) -> AgentStatus {
        let status = within(
            "the agent to connect",
            self.status
                .wait_for(|s| s.session().is_some() && s.session() != not),
        )
        .await
        .expect("agent status");
        status.clone()
    }

    pub async fn connected(&mut self) -> AgentStatus {
        self.connected_other_than(None).await
    }

    /// Waits for a failed attempt and returns its error.
    pub async fn failed(&mut self) -> String {
        let failure = |status: &AgentStatus| match status {
            AgentStatus::Waiting { error, .. } => Some(error.clone()),
            AgentStatus::Connecting { last_error } => last_error.clone(),
            _ => None,
        };
        let status = within(
            "the agent to report a failure",
            self.status.wait_for(|s| failure(s).is_some()),
        )
        .await
        .expect("agent status");
        failure(&status).expect("a failure")
    }

    pub async fn stop(self) {
        self.stop.cancel();
        within("the agent to stop", self.task)
            .await
            .expect("agent task");
    }
}

/// A local service that echoes everything and half-closes when its visitor does.
pub async fn echo_service() -> SocketAddr {
    serve(|mut tcp| async move {
        let (mut read, mut write) = tcp.split();
        let _ = tokio::io::copy(&mut read, &mut write).await;
        let _ = write.shutdown().await;
    })
    .await
}

/// A local service on `127.0.0.1:0` that runs `handler` for each connection.
pub async fn serve<F, Fut>(handler: F) -> SocketAddr
where
    F: Fn(TcpStream) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("address");
    let handler = Arc::new(handler);
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(handler(tcp));
        }
    });
    addr
}

/// Sends `data` through a connection to `addr`, half-closes, and returns all that comes back.
pub async fn round_trip(addr: SocketAddr, data: &[u8]) -> std::io::Result<Vec<u8>> {
    let tcp = TcpStream::connect(addr).await?;
    let (mut read, mut write) = tcp.into_split();
    let data = data.to_vec();
    let writer = tokio::spawn(async move {
        write.write_all(&data).await?;
        write.shutdown().await
    });
    let mut back = Vec::new();
    read.read_to_end(&mut back).await?;
    writer.await.expect("writer task")?;
    Ok(back)
}

/// Splits a visitor's connection to an echo service: a task reads back all that returns, and
/// the test writes.
pub fn echo_through(tcp: TcpStream) -> (JoinHandle<Vec<u8>>, tokio::net::tcp::OwnedWriteHalf) {
    let (mut read, write) = tcp.into_split();
    let reader = tokio::spawn(async move {
        let mut back = Vec::new();
        read.read_to_end(&mut back)
            .await
            .expect("the visitor's connection stays up");
        back
    });
    (reader, write)
}

/// `len` bytes that are not all alike, so that a misplaced chunk shows.
pub fn pattern(len: usize) -> Vec<u8> {
    let mut state = 0x2545_f491_u32;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            state as u8
        })
        .collect()
}

/// A relay and one agent with forwards to local services, connected and ready.
pub struct Bench {
    pub keys: Keys,
    pub relay: RelayHandle,
    pub relay_identity: Identity,
    pub agent: AgentHandle,
    pub agent_identity: Identity,
    pub agent_key: PathBuf,
}

impl Bench {
    /// Starts a relay that allows `dorm` the given TCP ports, and `dorm` asking for `forwards`.
    pub async fn start(allowed: &[u16], forwards: Vec<Forward>) -> Self {
        let allowed = allowed
            .iter()
            .map(|&p| PortSpec {
                proto: Proto::Tcp,
                range: PortRange::single(p).unwrap(),
            })
            .collect();
        Self::launch(allowed, forwards, Limits::default(), |_| {}).await
    }

    /// A relay that allows `dorm` exactly the ports of `forwards`, with `limits` and a last
    /// change to its config, and `dorm` asking for them.
    pub async fn serving(
        forwards: Vec<Forward>,
        limits: Limits,
        relay_config_change: impl FnOnce(&mut RelayConfig),
    ) -> Self {
        let allowed = forwards
            .iter()
            .map(|f| PortSpec {
                proto: f.proto,
                range: f.remote,
            })
            .collect();
        Self::launch(allowed, forwards, limits, relay_config_change).await
    }

    async fn launch(
        allowed: Vec<PortSpec>,
        forwards: Vec<Forward>,
        limits: Limits,
        relay_config_change: impl FnOnce(&mut RelayConfig),
    ) -> Self {
        let keys = Keys::new();
        let (relay_identity, relay_key) = keys.identity("relay");
        let (agent_identity, agent_key) = keys.identity("agent");
        let mut entry = agent_entry("dorm", agent_identity.fingerprint(), &[]);
        entry.ports = allowed;
        let mut config = relay_config(relay_key, vec![entry]);
        relay_config_change(&mut config);
        let relay = start_relay_with(config, &relay_identity, limits);
        let config = agent_config(
            agent_key.clone(),
            relay.addr,
            relay_identity.fingerprint(),
            forwards,
        );
        let mut agent = start_agent(config, &agent_identity);
        agent.connected().await;
        Self {
            keys,
            relay,
            relay_identity,
            agent,
            agent_identity,
            agent_key,
        }
    }
}

impl Bench {
    pub async fn stop(self) {
        self.agent.stop().await;
        self.relay.stop().await;
    }
}

/// Fails the test if anything accepts connections on relay port `port`.
pub async fn assert_port_closed(port: u16) {
    assert!(
        TcpStream::connect(public(port)).await.is_err(),
        "port {port} must not be open"
    );
}

/// The public address of relay port `port` on loopback.
pub fn public(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// A visitor TCP connection from `source`, one of loopback's addresses.
pub async fn connect_from(source: &str, port: u16) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket
        .bind(SocketAddr::new(source.parse().unwrap(), 0))
        .unwrap();
    socket.connect(public(port)).await.expect("connect")
}

/// Whether an echo through `tcp` comes back.
pub async fn echoes(tcp: &mut TcpStream) -> bool {
    if tcp.write_all(b"ping").await.is_err() {
        return false;
    }
    let mut buf = [0u8; 4];
    match within("the echo", tcp.read_exact(&mut buf)).await {
        Ok(_) => &buf == b"ping",
        Err(_) => false,
    }
}

/// An echo service that counts the connections it accepted.
pub async fn counting_echo() -> (SocketAddr, Arc<AtomicUsize>) {
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    let addr = serve(move |mut tcp| {
        count.fetch_add(1, Ordering::SeqCst);
        async move {
            let (mut read, mut write) = tcp.split();
            let _ = tokio::io::copy(&mut read, &mut write).await;
        }
    })
    .await;
    (addr, accepted)
}
