//! The relay restarted as systemd restarts it (`RestartKillSignal=SIGUSR2`, then a new process
//! given back what the old one stored), with a stand-in for systemd (`tests/src/manager.rs`):
//! visitor connections and a real ssh session go on with every byte; a state that does not
//! hold closes them cleanly; a stop still closes everything; after a crash the ports, kept in
//! the store from when they opened, still take visitors in.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use tether_tests::lab::{binary, Peer};
use tether_tests::manager::Manager;
use tether_tests::process::Process;
use tether_tests::status::relay_status_once;
use tether_tests::tools::SshdFiles;
use tether_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::process::Command;

/// The relay and agent binaries on loopback, forwarding an echo service and, when given, an
/// sshd; the relay started by `manager`.
struct Scene {
    manager: Manager,
    relay_toml: PathBuf,
    agent: Process,
    relay: Process,
    echo_port: u16,
    ssh_port: u16,
    /// A public UDP port, forwarded to a UDP echo service.
    udp_port: u16,
}

impl Scene {
    /// `extra` goes into relay.toml as it is (such as `resume_window = "2s"`).
    async fn start(keys: &Keys, echo: SocketAddr, ssh: Option<SocketAddr>, extra: &str) -> Self {
        let (relay_identity, _) = keys.identity("relay");
        let (agent_identity, _) = keys.identity("agent");
        let quic = free_udp_port();
        let (echo_port, ssh_port, udp_port) = (free_port(), free_port(), free_udp_port());
        let udp_echo = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let udp_local = udp_echo.local_addr().unwrap();
        tether_tests::udp::udp_echo(udp_echo);
        let relay_toml = keys.path().join("relay.toml");
        std::fs::write(
            &relay_toml,
            format!(
                "listen = \"127.0.0.1:{quic}\"\nlisten_tcp = \"off\"\nkey = \"relay.key\"\n\
                 public_bind = \"127.0.0.1\"\nstatus_socket = \"run/relay.sock\"\n{extra}\n\
                 [[agent]]\nname = \"home\"\nfingerprint = \"{}\"\n\
                 ports = [\"{echo_port}/tcp\", \"{ssh_port}/tcp\", \"{udp_port}/udp\"]\n",
                agent_identity.fingerprint()
            ),
        )
        .unwrap();
        let ssh_forward = ssh.map_or(String::new(), |ssh| {
            format!("[[forward]]\nname = \"ssh\"\nproto = \"tcp\"\nremote = {ssh_port}\nlocal = \"{ssh}\"\n")
        });
        let agent_toml = keys.path().join("agent.toml");
        std::fs::write(
            &agent_toml,
            format!(
                "relay = \"127.0.0.1:{quic}\"\nrelay_fingerprint = \"{}\"\nkey = \"agent.key\"\n\
                 status_socket = \"agent.sock\"\ntransport = \"quic\"\n\
                 [[forward]]\nname = \"echo\"\nproto = \"tcp\"\nremote = {echo_port}\nlocal = \"{echo}\"\n\
                 [[forward]]\nname = \"udp\"\nproto = \"udp\"\nremote = {udp_port}\nlocal = \"{udp_local}\"\n\
                 {ssh_forward}",
                relay_identity.fingerprint(),
            ),
        )
        .unwrap();
        let manager = Manager::bind(keys.path(), "notify");
        let mut relay = start_relay(&manager, &relay_toml);
        relay.wait_for_line("relay listening").await;
        let mut agent = Process::spawn(
            &binary("tether-agent"),
            &["run", "-c", agent_toml.to_str().unwrap()],
        );
        agent.wait_for_line("connected to relay").await;
        Self {
            manager,
            relay_toml,
            agent,
            relay,
            echo_port,
            ssh_port,
            udp_port,
        }
    }

    /// A visitor connection to the echo forward, served once.
    async fn visitor(&self) -> TcpStream {
        let mut tcp = TcpStream::connect(public(self.echo_port)).await.unwrap();
        assert!(echoes(&mut tcp).await, "a visitor is served");
        tcp
    }

    /// Stops the agent and the relay as systemd stops them.
    async fn stop(mut self) {
        let _ = self.agent.signal_and_wait("TERM").await;
        let _ = self.relay.signal_and_wait("TERM").await;
    }

    /// Asks the relay to restart as `systemctl restart` does with the unit's
    /// `RestartKillSignal`.
    fn ask_restart(&self) -> usize {
        let before = self.manager.messages().len();
        self.relay.signal("USR2");
        before
    }

    /// Waits for the old relay to store its sockets and exit, starts the next process as
    /// systemd would, and returns its log line about what it took over.
    async fn take_over(&mut self, _before: usize) -> String {
        let status = self.relay.wait().await;
        assert!(status.success(), "the old relay exited with {status}");
        self.manager.settle().await;
        self.relay = start_relay(&self.manager, &self.relay_toml);
        self.relay.wait_for_line("relay listening").await;
        let line = self
            .relay
            .log
            .iter()
            .find(|line| line.contains("previous process"))
            .cloned();
        line.unwrap_or_else(|| panic!("nothing taken over:\n{}", self.relay.log.join("\n")))
    }
}

fn start_relay(manager: &Manager, relay_toml: &Path) -> Process {
    std::fs::create_dir_all(relay_toml.with_file_name("run")).unwrap();
    manager.start(
        &binary("tether-relay"),
        &["run", "-c", relay_toml.to_str().unwrap()],
    )
}

fn free_udp_port() -> u16 {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    socket.local_addr().unwrap().port()
}

/// sshd on loopback, letting root in with a key of the test's own; returns it, where it
/// listens, and its files (with the arguments of `ssh` that log in).
async fn start_sshd(dir: &Path) -> (Process, SocketAddr, SshdFiles) {
    let listen = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let files = SshdFiles::write(dir, &listen.to_string());
    // sshd re-executes itself, by an absolute path only.
    let mut command = Command::new("/usr/sbin/sshd");
    command.args(["-D", "-e", "-f"]).arg(&files.config);
    let mut sshd = Process::start(command);
    sshd.wait_for_line("Server listening").await;
    (sshd, listen, files)
}

/// Whether sshd can be run here: it needs root and openssh, which `.ci/run` installs (where a
/// missing one fails the test).
fn can_run_sshd(test: &str) -> bool {
    if !tether_tests::tools::available(test, &["sshd", "ssh", "ssh-keygen"]) {
        return false;
    }
    if !tether_tests::lab::is_root() {
        tether_tests::tools::not_run(test, "root, for sshd");
        return false;
    }
    true
}

/// Restarts in a row in the test below, and the median pause it allows: the README quotes it.
const RESTARTS: usize = 10;
const MAX_PAUSE: Duration = Duration::from_secs(1);

#[tokio::test]
async fn ten_restarts_in_a_row_lose_no_byte_and_the_ssh_session_answers_after_each() {
    within_for("the whole test", Duration::from_secs(180), async {
        let keys = Keys::new();
        let echo = echo_service().await;
        let test = "ten_restarts_in_a_row_lose_no_byte_and_the_ssh_session_answers_after_each";
        let sshd = match can_run_sshd(test) {
            true => {
                let dir = keys.path().join("ssh");
                std::fs::create_dir_all(&dir).unwrap();
                Some(start_sshd(&dir).await)
            }
            false => None,
        };
        let mut scene = Scene::start(&keys, echo, sshd.as_ref().map(|(_, at, _)| *at), "").await;
        let mut ssh = sshd.as_ref().map(|(_, _, files)| {
            let mut command = Command::new("ssh");
            command
                .args(files.login("127.0.0.1", scene.ssh_port))
                .arg("sh");
            Peer::start(command)
        });
        if let Some(ssh) = &mut ssh {
            assert_eq!(ssh.ask("echo logged-in").await, "logged-in");
        }
        // A bulk transfer under way, both directions hashed; and an interactive connection,
        // idle but for one line written as each restart begins.
        let data = pattern(48 << 20);
        let tcp = TcpStream::connect(public(scene.echo_port)).await.unwrap();
        let (reader, mut write) = echo_through(tcp);
        let mut typing = scene.visitor().await;
        let chunks: Vec<&[u8]> = data.chunks(data.len() / RESTARTS).collect();
        let mut pauses = Vec::new();
        for (round, chunk) in chunks.iter().take(RESTARTS).enumerate() {
            write.write_all(chunk).await.unwrap();
            let before = scene.ask_restart();
            let asked = Instant::now();
            let line = format!("typed as restart {round} began\n");
            typing.write_all(line.as_bytes()).await.unwrap();
            if let Some(ssh) = &mut ssh {
                ssh.tell(&format!("echo answered-after-restart-{round}"))
                    .await;
            }
            let took_over = scene.take_over(before).await;
            let mut back = vec![0; line.len()];
            within(
                "the line typed during the restart",
                typing.read_exact(&mut back),
            )
            .await
            .unwrap();
            assert_eq!(back, line.as_bytes());
            pauses.push(asked.elapsed());
            if let Some(ssh) = &mut ssh {
                assert_eq!(
                    ssh.line().await,
                    format!("answered-after-restart-{round}"),
                    "the ssh session answers after restart {round}"
                );
            }
            println!("restart {}: {took_over}", round + 1);
        }
        for chunk in &chunks[RESTARTS..] {
            write.write_all(chunk).await.unwrap();
        }
        write.shutdown().await.unwrap();
        let back = within("the echo of every byte", reader).await.unwrap();
        assert_eq!(back.len(), data.len());
        assert_eq!(
            Sha256::digest(&back),
            Sha256::digest(&data),
            "the bytes that came back differ from those sent"
        );
        let mut sorted = pauses.clone();
        sorted.sort();
        let median = sorted[RESTARTS / 2];
        println!(
            "a line typed as each restart began came back after {pauses:?} (median {median:?}); \
             {} bytes echoed intact across {RESTARTS} restarts",
            back.len()
        );
        assert!(median <= MAX_PAUSE, "median pause {median:?}");
        scene.stop().await;
    })
    .await;
}

/// How a test changes the state file between two processes.
type Change = fn(&mut Vec<u8>);

#[tokio::test]
async fn a_changed_or_foreign_state_closes_the_kept_connections_and_the_relay_serves_on() {
    within_for("the whole test", Duration::from_secs(90), async {
        let keys = Keys::new();
        let echo = echo_service().await;
        let mut scene = Scene::start(&keys, echo, None, "").await;
        let state = keys.path().join("run/handover");
        let changes: [(&str, Change); 2] = [
            ("signature", |bytes| {
                let middle = bytes.len() / 2;
                bytes[middle] ^= 1;
            }),
            ("not a tether hand-over file", |bytes| {
                *bytes = b"listen = \"0.0.0.0:4433\"\n# not what the relay left\n".to_vec();
            }),
        ];
        for (why, change) in changes {
            let mut held = scene.visitor().await;
            let before = scene.ask_restart();
            assert!(scene.relay.wait().await.success());
            scene.manager.wait_for("FDNAME=tether-relay", before).await;
            scene.manager.settle().await;
            // Between the two processes, the state file is changed.
            let mut bytes = std::fs::read(&state).expect("the state file");
            change(&mut bytes);
            std::fs::write(&state, bytes).unwrap();
            let before = scene.manager.messages().len();
            scene.relay = start_relay(&scene.manager, &scene.relay_toml);
            let line = scene
                .relay
                .wait_for_line("hand-over state is refused")
                .await;
            assert!(line.contains(why), "{line}");
            scene.relay.wait_for_line("relay listening").await;
            // The store is emptied, so that the connections it kept close for real.
            scene.manager.wait_for("FDSTOREREMOVE=1", before).await;
            let mut byte = [0u8; 1];
            let end = within("the kept connection to close", held.read(&mut byte)).await;
            assert!(matches!(end, Ok(0) | Err(_)), "{end:?}");
            assert!(!state.exists(), "a state is read once");
            // The agent comes back, and visitors are served.
            scene.agent.wait_for_line("connected to relay").await;
            scene.visitor().await;
        }
        scene.stop().await;
    })
    .await;
}

#[tokio::test]
async fn a_stop_drains_and_closes_every_connection_keeping_nothing() {
    within_for("the whole test", Duration::from_secs(60), async {
        let keys = Keys::new();
        let echo = echo_service().await;
        let mut scene = Scene::start(&keys, echo, None, "").await;
        let mut held = scene.visitor().await;
        let status = scene.relay.signal_and_wait("TERM").await;
        assert!(status.success());
        let mut byte = [0u8; 1];
        let end = within("the connection to close", held.read(&mut byte)).await;
        assert!(matches!(end, Ok(0) | Err(_)), "{end:?}");
        // Listening sockets are kept while the relay runs (systemd drops them at a stop);
        // no connection is handed over.
        scene.manager.settle().await;
        let messages = scene.manager.messages();
        assert!(
            !messages.iter().any(|m| m.contains("FDNAME=tether-relay")),
            "a stop hands no connection over: {messages:?}"
        );
        assert_eq!(scene.manager.stored("tether-relay"), 0);
        assert!(!keys.path().join("run/handover").exists());
        let _ = scene.agent.signal_and_wait("TERM").await;
    })
    .await;
}

#[tokio::test]
async fn a_kept_connection_whose_agent_does_not_come_back_closes_after_the_resume_window() {
    within_for("the whole test", Duration::from_secs(60), async {
        let keys = Keys::new();
        let echo = echo_service().await;
        let mut scene = Scene::start(&keys, echo, None, "resume_window = \"2s\"").await;
        let mut held = scene.visitor().await;
        // The agent stops for good as the relay restarts.
        scene.agent.signal("STOP");
        let before = scene.ask_restart();
        let line = scene.take_over(before).await;
        assert!(line.contains("connections=1"), "{line}");
        let kept = Instant::now();
        let mut byte = [0u8; 1];
        let end = within("the kept connection to close", held.read(&mut byte)).await;
        assert!(matches!(end, Ok(0) | Err(_)), "{end:?}");
        let waited = kept.elapsed();
        assert!(
            waited >= Duration::from_millis(1500),
            "closed after {waited:?}, before the resume window"
        );
        println!("closed {waited:?} after the new process took it over (resume window 2 s)");
        scene.agent.signal("KILL");
        let _ = scene.relay.signal_and_wait("TERM").await;
    })
    .await;
}

#[tokio::test]
async fn with_the_agent_restarted_at_the_same_moment_kept_connections_close_and_new_ones_are_served(
) {
    within_for("the whole test", Duration::from_secs(60), async {
        let keys = Keys::new();
        let echo = echo_service().await;
        let mut scene = Scene::start(&keys, echo, None, "").await;
        let mut held = scene.visitor().await;
        let before = scene.ask_restart();
        // The agent's own connections to its services end with its process.
        assert!(scene.agent.signal_and_wait("TERM").await.success());
        scene.take_over(before).await;
        let agent_toml = keys.path().join("agent.toml");
        scene.agent = Process::spawn(
            &binary("tether-agent"),
            &["run", "-c", agent_toml.to_str().unwrap()],
        );
        scene.agent.wait_for_line("connected to relay").await;
        let mut byte = [0u8; 1];
        let end = within("the kept connection to close", held.read(&mut byte)).await;
        assert!(matches!(end, Ok(0) | Err(_)), "{end:?}");
        scene.visitor().await;
        scene.stop().await;
    })
    .await;
}

#[tokio::test]
async fn a_udp_visitor_is_answered_again_on_the_same_port_after_a_restart() {
    within_for("the whole test", Duration::from_secs(60), async {
        let keys = Keys::new();
        let echo = echo_service().await;
        let mut scene = Scene::start(&keys, echo, None, "").await;
        let to = public(scene.udp_port);
        let mosh = tether_tests::udp::visitor("127.0.0.1").await;
        let asked = tether_tests::udp::ask(&mosh, to, b"before").await;
        assert_eq!(asked.as_deref(), Some(&b"before"[..]));
        for round in 0..2 {
            let before = scene.ask_restart();
            scene.take_over(before).await;
            // Datagrams sent while the agent reconnects may be dropped, as on any lost link;
            // the same visitor socket is answered again on the same port once it is back.
            let payload = format!("after restart {round}");
            let answered = within("an answer after the restart", async {
                loop {
                    let answer = tether_tests::udp::ask(&mosh, to, payload.as_bytes()).await;
                    if answer.as_deref() == Some(payload.as_bytes()) {
                        break;
                    }
                }
            });
            answered.await;
        }
        scene.stop().await;
    })
    .await;
}

#[tokio::test]
async fn two_hundred_kept_connections_go_on_and_give_their_places_back_when_they_close() {
    within_for("the whole test", Duration::from_secs(120), async {
        let keys = Keys::new();
        let echo = echo_service().await;
        let mut scene = Scene::start(&keys, echo, None, "").await;
        let mut visitors = Vec::new();
        for _ in 0..200 {
            let tcp = scene.visitor().await;
            visitors.push(tcp);
        }
        let before = scene.ask_restart();
        let line = scene.take_over(before).await;
        assert!(line.contains("connections=200"), "{line}");
        for tcp in &mut visitors {
            assert!(echoes(tcp).await, "a kept connection answers");
        }
        // Each one closes, early or not: each gives its places back.
        for (n, tcp) in visitors.into_iter().enumerate() {
            if n % 2 == 0 {
                let _ = socket2::SockRef::from(&tcp).set_linger(Some(Duration::ZERO));
            }
            drop(tcp);
        }
        let socket = keys.path().join("run/relay.sock");
        relay_status_once(&socket, |status| {
            status.agents[0]
                .forwards
                .iter()
                .all(|f| f.connections.is_empty())
        })
        .await;
        // And the next restart has none to keep.
        let before = scene.ask_restart();
        let line = scene.take_over(before).await;
        assert!(line.contains("connections=0"), "{line}");
        scene.visitor().await;
        scene.stop().await;
    })
    .await;
}

#[tokio::test]
async fn after_a_crash_the_ports_still_listen_and_a_visitor_who_came_meanwhile_is_served() {
    within_for("the whole test", Duration::from_secs(60), async {
        let keys = Keys::new();
        let echo = echo_service().await;
        let mut scene = Scene::start(&keys, echo, None, "").await;
        let _ = scene.relay.signal_and_wait("KILL").await;
        // No relay runs: the port systemd keeps takes the visitor in, and its first line waits.
        let mut visitor = TcpStream::connect(public(scene.echo_port)).await.unwrap();
        visitor
            .write_all(b"sent while the relay was down\n")
            .await
            .unwrap();
        scene.manager.settle().await;
        let restarted = Instant::now();
        scene.relay = start_relay(&scene.manager, &scene.relay_toml);
        scene.relay.wait_for_line("relay listening").await;
        // The agent hears of the crash at its next packet (a stateless reset on the same UDP
        // socket), reconnects, and the visitor is served.
        let mut back = vec![0; 30];
        within_for(
            "the line sent while the relay was down",
            Duration::from_secs(20),
            visitor.read_exact(&mut back),
        )
        .await
        .unwrap();
        assert_eq!(back, b"sent while the relay was down\n");
        println!(
            "the visitor who came during the crash was answered {:?} after the relay started again",
            restarted.elapsed()
        );
        scene.stop().await;
    })
    .await;
}
