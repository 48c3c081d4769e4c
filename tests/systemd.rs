//! Both binaries as systemd runs them: notifications to a stand-in for systemd's notify socket
//! (READY, STATUS, WATCHDOG, STOPPING), and SIGTERM, which systemd sends to stop a service.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tether_tests::lab::binary;
use tether_tests::process::{Configs, Process};
use tether_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UnixDatagram};
use tokio::process::Command;
use tokio::sync::mpsc;

/// The relay's drain limit (`Limits::shutdown_grace`); the units' `TimeoutStopSec` is longer.
const GRACE: Duration = Duration::from_secs(5);

/// Where a binary sends its notifications, as systemd's socket would receive them.
struct NotifySocket {
    socket: UnixDatagram,
    path: PathBuf,
    /// Everything received so far, for failure messages.
    seen: Vec<String>,
}

impl NotifySocket {
    fn bind(dir: &Path, name: &str) -> Self {
        let path = dir.join(name);
        Self {
            socket: UnixDatagram::bind(&path).expect("notify socket"),
            path,
            seen: Vec::new(),
        }
    }

    /// Starts `binary run -c config` as systemd would with `WatchdogSec=1`.
    fn start(&self, binary: &str, config: &Path) -> Process {
        let mut command = Command::new(tether_tests::lab::binary(binary));
        command
            .args(["run", "-c", config.to_str().unwrap()])
            .env("NOTIFY_SOCKET", &self.path)
            .env("WATCHDOG_USEC", "1000000");
        Process::start(command)
    }

    async fn next(&mut self) -> String {
        let mut buffer = vec![0; 4096];
        let n = self.socket.recv(&mut buffer).await.expect("notification");
        let message = String::from_utf8(buffer[..n].to_vec()).expect("UTF-8");
        self.seen.push(message.clone());
        message
    }

    /// Reads notifications until one is `message`.
    async fn wait_for(&mut self, message: &str) {
        let what = format!("{message:?}");
        within(&what, async { while self.next().await != message {} }).await;
    }

    /// Counts `WATCHDOG=1` pings over `period`.
    async fn watchdog_pings(&mut self, period: Duration) -> usize {
        let mut pings = 0;
        let _ = tokio::time::timeout(period, async {
            loop {
                if self.next().await == "WATCHDOG=1" {
                    pings += 1;
                }
            }
        })
        .await;
        pings
    }
}

#[tokio::test]
async fn both_binaries_notify_systemd() {
    within_for("the whole test", Duration::from_secs(60), async {
        let keys = Keys::new();
        let configs = Configs::write(&keys, echo_service().await);

        let mut relay_notify = NotifySocket::bind(keys.path(), "relay.notify");
        let mut relay = relay_notify.start("tether-relay", &configs.relay);
        relay_notify
            .wait_for("READY=1\nSTATUS=0 agents, 0 forwards")
            .await;
        let pings = relay_notify.watchdog_pings(Duration::from_secs(5)).await;
        println!("relay: {pings} watchdog pings in 5 s with WATCHDOG_USEC=1000000");
        assert!(pings >= 3, "{:?}", relay_notify.seen);

        let mut agent_notify = NotifySocket::bind(keys.path(), "agent.notify");
        let mut agent = agent_notify.start("tether-agent", &configs.agent);
        agent_notify
            .wait_for("READY=1\nSTATUS=connecting to the relay")
            .await;
        agent_notify
            .wait_for("STATUS=connected to the relay, 1 forward")
            .await;
        relay_notify.wait_for("STATUS=1 agent, 1 forward").await;
        let pings = agent_notify.watchdog_pings(Duration::from_secs(5)).await;
        println!("agent: {pings} watchdog pings in 5 s with WATCHDOG_USEC=1000000");
        assert!(pings >= 3, "{:?}", agent_notify.seen);

        // Stopped relay: the agent says it is reconnecting, and why.
        relay.signal("TERM");
        relay_notify.wait_for("STOPPING=1\nSTATUS=stopping").await;
        assert!(relay.wait().await.success());
        within("the agent's reconnecting status", async {
            while !agent_notify.next().await.starts_with("STATUS=reconnecting") {}
        })
        .await;

        agent.signal("TERM");
        agent_notify.wait_for("STOPPING=1\nSTATUS=stopping").await;
        assert!(agent.wait().await.success());
    })
    .await;
}

/// A relay and an agent binary, serving one visitor who holds a connection open to an echo
/// service.
struct Serving {
    relay: Process,
    agent: Process,
    visitor: TcpStream,
    /// How the service's side of the connection ended: `Ok` for a FIN, `Err` for a reset.
    service_end: mpsc::UnboundedReceiver<std::io::Result<u64>>,
    _keys: Keys,
}

impl Serving {
    async fn start() -> Self {
        let keys = Keys::new();
        let (ended, service_end) = mpsc::unbounded_channel();
        let service = serve(move |mut tcp| {
            let ended = ended.clone();
            async move {
                let (mut read, mut write) = tcp.split();
                let _ = ended.send(tokio::io::copy(&mut read, &mut write).await);
            }
        })
        .await;
        let configs = Configs::write(&keys, service);
        let mut relay = Process::spawn(
            &binary("tether-relay"),
            &["run", "-c", path(&configs.relay)],
        );
        relay.wait_for_line("relay listening").await;
        let mut agent = Process::spawn(
            &binary("tether-agent"),
            &["run", "-c", path(&configs.agent)],
        );
        agent.wait_for_line("now reaches").await;
        let mut visitor = TcpStream::connect(public(configs.port)).await.unwrap();
        visitor.write_all(b"hello").await.unwrap();
        let mut echoed = [0; 5];
        within("the echo", visitor.read_exact(&mut echoed))
            .await
            .unwrap();
        assert_eq!(&echoed, b"hello");
        Self {
            relay,
            agent,
            visitor,
            service_end,
            _keys: keys,
        }
    }
}

fn path(file: &Path) -> &str {
    file.to_str().unwrap()
}

/// Stops `process` with SIGTERM and checks it exits 0 within the grace time.
async fn terminate(process: &mut Process, name: &str) -> Duration {
    let started = Instant::now();
    let status = process.signal_and_wait("TERM").await;
    let took = started.elapsed();
    let log = process.log.join("\n");
    assert!(status.success(), "{name} exited with {status}:\n{log}");
    assert!(took < GRACE, "{name} took {took:?} to stop:\n{log}");
    println!("{name} stopped in {took:?}");
    took
}

impl Serving {
    /// Both ends of the carried connection were closed with a FIN: the visitor's read and the
    /// service's return 0 bytes, not an error.
    async fn closed_cleanly(&mut self) {
        let mut buffer = [0; 16];
        let read = within("the visitor's close", self.visitor.read(&mut buffer)).await;
        assert!(matches!(read, Ok(0)), "visitor read {read:?}");
        let service = within("the service's close", self.service_end.recv()).await;
        assert!(matches!(service, Some(Ok(5))), "service read {service:?}");
    }
}

#[tokio::test]
async fn sigterm_stops_the_relay_and_closes_visitors_cleanly() {
    within_for("the whole test", Duration::from_secs(60), async {
        let mut serving = Serving::start().await;
        terminate(&mut serving.relay, "relay").await;
        serving.closed_cleanly().await;
        let log = serving.relay.log.join("\n");
        assert!(log.contains("relay stopped"), "{log}");
        terminate(&mut serving.agent, "agent").await;
    })
    .await;
}

#[tokio::test]
async fn sigterm_stops_the_agent_and_closes_visitors_cleanly() {
    within_for("the whole test", Duration::from_secs(60), async {
        let mut serving = Serving::start().await;
        terminate(&mut serving.agent, "agent").await;
        serving.closed_cleanly().await;
        let log = serving.agent.log.join("\n");
        assert!(log.contains("agent stopped"), "{log}");
        terminate(&mut serving.relay, "relay").await;
    })
    .await;
}
