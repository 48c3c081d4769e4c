//! Enrollment as the README runs it, with the real binaries: `tether-relay invite` on the relay,
//! `tether-agent join` with the line it printed, and every way a join is refused.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use tether_tests::lab::binary;
use tether_tests::process::{run, Process};
use tether_tests::status::path;
use tether_tests::udp::consecutive_udp_ports;
use tether_tests::*;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};

/// A relay's folder, made by `tether-relay init` on loopback with its status socket beside it.
struct Relay {
    config: PathBuf,
}

impl Relay {
    fn init(keys: &Keys) -> Self {
        let dir = keys.path().join("relay");
        // `init` puts the TCP listener on the same port number as QUIC's: free for both.
        let (port, held) = consecutive(1, |address| {
            let udp = std::net::UdpSocket::bind(address).ok()?;
            Some((udp, std::net::TcpListener::bind(address).ok()?))
        });
        drop(held);
        let listen = format!("127.0.0.1:{port}");
        let (code, _, stderr) = run(
            &binary("tether-relay"),
            &["init", "--dir", path(&dir), "--listen", &listen],
        );
        assert_eq!(code, 0, "{stderr}");
        let config = dir.join("relay.toml");
        let text = std::fs::read_to_string(&config).unwrap();
        // Public ports on loopback, the status socket in the test's folder.
        let text = text.replace(
            "# public_bind = \"0.0.0.0\"",
            "public_bind = \"127.0.0.1\"\nstatus_socket = \"relay.sock\"\n#",
        );
        std::fs::write(&config, text).unwrap();
        Self { config }
    }

    async fn start(&self) -> Process {
        let mut relay = Process::spawn(&binary("tether-relay"), &["run", "-c", path(&self.config)]);
        relay.wait_for_line("relay listening").await;
        relay
    }
}

/// A running `tether-relay invite`, and the line it printed.
struct Invite {
    child: Child,
    line: String,
    id: String,
}

impl Invite {
    async fn make(relay: &Relay, name: &str, ports: &str, extra: &[&str]) -> Self {
        let mut child = Command::new(binary("tether-relay"))
            .args(["invite", name, "--ports", ports, "-c", path(&relay.config)])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap()).lines();
        let (mut line, mut id) = (None, None);
        within("the invite's line", async {
            while line.is_none() {
                let text = stdout
                    .next_line()
                    .await
                    .unwrap()
                    .expect("the invite's output");
                if let Some(rest) = text.strip_prefix("Invite ") {
                    id = rest.split_whitespace().next().map(str::to_owned);
                }
                if let Some((_, rest)) = text.split_once("tether-agent join '") {
                    line = rest.strip_suffix('\'').map(str::to_owned);
                }
            }
        })
        .await;
        // The rest of its output, for `finish`.
        let rest = tokio::spawn(async move {
            let mut out = String::new();
            while let Ok(Some(text)) = stdout.next_line().await {
                out.push_str(&text);
                out.push('\n');
            }
            out
        });
        let invite = Self {
            child,
            line: line.unwrap(),
            id: id.expect("an invite id"),
        };
        drop(rest);
        invite
    }

    /// Waits for the command to end; its exit code and stderr.
    async fn finish(mut self) -> (i32, String) {
        within("the invite command to end", async {
            let mut stderr = String::new();
            let mut pipe = self.child.stderr.take().unwrap();
            pipe.read_to_string(&mut stderr).await.unwrap();
            let status = self.child.wait().await.unwrap();
            (status.code().unwrap_or(-1), stderr)
        })
        .await
    }
}

/// `tether-agent join LINE --dir DIR`: exit code, stdout, stderr.
async fn join(line: &str, dir: &Path) -> (i32, String, String) {
    let (line, dir) = (line.to_owned(), dir.to_owned());
    tokio::task::spawn_blocking(move || {
        run(
            &binary("tether-agent"),
            &["join", &line, "--dir", path(&dir)],
        )
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn invite_join_serve_restart_and_still_listed() {
    within_for("the test", 4 * STEP, async {
        let keys = Keys::new();
        let relay = Relay::init(&keys);
        let mut relay_process = relay.start().await;
        let port = free_port();
        let invite = Invite::make(&relay, "home", &format!("{port}/tcp"), &[]).await;
        assert!(
            invite.line.starts_with("tether://127.0.0.1:"),
            "{}",
            invite.line
        );

        let home = keys.path().join("home");
        let invite_line = invite.line.clone();
        let (code, stdout, stderr) = join(&invite_line, &home).await;
        assert_eq!(code, 0, "{stdout}{stderr}");
        assert!(stdout.contains("Joined as home."), "{stdout}");
        let (code, stderr) = invite.finish().await;
        assert_eq!(code, 0, "{stderr}");
        // Listed in relay.toml, as a block pasted by hand would be, with init's comments kept.
        let text = std::fs::read_to_string(&relay.config).unwrap();
        assert!(text.contains("# One block per agent"), "{text}");
        assert!(text.contains("[[agent]]\nname = \"home\""), "{text}");
        assert!(!home.join(".agent.key.joining").exists());

        // The forward the join made goes to the same port here: point it at a service.
        let agent_config = home.join("agent.toml");
        let (code, stdout, stderr) = run(
            &binary("tether-agent"),
            &["check", "-c", path(&agent_config)],
        );
        assert_eq!(code, 0, "{stderr}");
        assert!(stdout.contains("ok (1 forward)"), "{stdout}");
        let warning =
            format!("warning: forward[0] (tcp-{port}): nothing answers on 127.0.0.1:{port} now");
        assert!(stderr.contains(&warning), "{stderr}");
        let service = echo_service().await;
        let text = std::fs::read_to_string(&agent_config).unwrap();
        let text = text.replace(
            &format!("local = \"127.0.0.1:{port}\""),
            &format!("local = \"{service}\""),
        );
        std::fs::write(
            &agent_config,
            format!("status_socket = \"agent.sock\"\n{text}"),
        )
        .unwrap();
        let (code, _, stderr) = run(
            &binary("tether-agent"),
            &["check", "-c", path(&agent_config)],
        );
        assert_eq!((code, stderr.as_str()), (0, ""), "a service answers now");
        let mut agent =
            Process::spawn(&binary("tether-agent"), &["run", "-c", path(&agent_config)]);
        let started = agent.wait_for_line("agent starting").await;
        // Each key named for whose it is.
        let relay_key = invite_line.split('#').nth(1).unwrap();
        let relay_key = relay_key.rsplit_once('.').unwrap().0;
        assert!(
            started.contains(&format!("relay_key={relay_key}")),
            "{started}"
        );
        assert!(started.contains("agent_key=SHA256:"), "{started}");
        agent.wait_for_line("connected to relay").await;
        let mut visitor = TcpStream::connect(public(port)).await.unwrap();
        assert!(echoes(&mut visitor).await, "a visitor is served");

        // Restarted, the relay lists the agent from relay.toml and serves it again.
        relay_process.signal_and_wait("TERM").await;
        let _relay = relay.start().await;
        agent.wait_for_line("connected to relay").await;
        // A planned restart is nothing to warn about.
        let warnings: Vec<&String> = agent.log.iter().filter(|l| l.contains("WARN")).collect();
        assert!(warnings.is_empty(), "{warnings:?}");
        let mut visitor = TcpStream::connect(public(port)).await.unwrap();
        assert!(
            echoes(&mut visitor).await,
            "a visitor is served after the restart"
        );
        let (code, stdout, stderr) = run(
            &binary("tether-relay"),
            &["status", "-c", path(&relay.config)],
        );
        assert_eq!(code, 0, "{stderr}");
        assert!(stdout.contains("1 agent connected of 1 listed"), "{stdout}");
    })
    .await;
}

#[tokio::test]
async fn every_refused_join_says_why_on_both_ends() {
    within_for("the test", 4 * STEP, async {
        let keys = Keys::new();
        let relay = Relay::init(&keys);
        let mut relay_process = relay.start().await;
        let dir = keys.path().join("home");
        let refused = |(code, stdout, stderr): (i32, String, String), why: &str| {
            assert_eq!(code, 1, "{stdout}{stderr}");
            assert!(stderr.contains(why), "expected {why:?} in {stderr}");
            assert!(!dir.join("agent.toml").exists() && !dir.join("agent.key").exists());
            assert!(
                !dir.join(".agent.key.joining").exists(),
                "nothing left behind"
            );
        };

        // No invite pending: the relay refuses the handshake itself.
        let used = Invite::make(&relay, "first", "2300/tcp", &[]).await;
        let used_line = used.line.clone();
        let (code, _, stderr) = join(&used_line, &keys.path().join("first")).await;
        assert_eq!(code, 0, "{stderr}");
        assert_eq!(used.finish().await.0, 0);
        refused(join(&used_line, &dir).await, "has no invite pending");

        // With another invite pending, the relay hears each secret and says what it knows.
        let pending = Invite::make(&relay, "pending", "2301/tcp", &[]).await;
        refused(join(&used_line, &dir).await, "was used already");
        let expired = Invite::make(&relay, "late", "2302/tcp", &["--expires", "1s"]).await;
        let expired_line = expired.line.clone();
        let (code, stderr) = expired.finish().await;
        assert_eq!(code, 1);
        assert!(stderr.contains("the invite expired"), "{stderr}");
        refused(join(&expired_line, &dir).await, "expired");
        let revoked = Invite::make(&relay, "gone", "2303/tcp", &[]).await;
        let (code, listed, _) = run(
            &binary("tether-relay"),
            &["invites", "--json", "-c", path(&relay.config)],
        );
        assert_eq!(code, 0);
        assert!(
            listed.contains(&revoked.id) && listed.contains(&pending.id),
            "{listed}"
        );
        let (code, stdout, stderr) = run(
            &binary("tether-relay"),
            &[
                "invites",
                "--revoke",
                &revoked.id,
                "-c",
                path(&relay.config),
            ],
        );
        assert_eq!(code, 0, "{stdout}{stderr}");
        let line = revoked.line.clone();
        let (code, stderr) = revoked.finish().await;
        assert_eq!(code, 1);
        assert!(stderr.contains("the invite was revoked"), "{stderr}");
        refused(join(&line, &dir).await, "was revoked");
        let unknown = format!(
            "{}.AAAAAAAAAAAAAAAAAAAAAA",
            pending.line.rsplit_once('.').unwrap().0
        );
        refused(join(&unknown, &dir).await, "no invite with this secret");
        let other_relay = pending.line.replace(
            &pending.line[pending.line.find("SHA256:").unwrap()..pending.line.rfind('.').unwrap()],
            "SHA256:47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU",
        );
        refused(
            join(&other_relay, &dir).await,
            "the line was made by another relay",
        );

        // Guessing: past a few wrong secrets from one address, even the right one is refused.
        for _ in 1..tether_relay::invites::MISSES_PER_SOURCE {
            refused(join(&unknown, &dir).await, "no invite with this secret");
        }
        refused(join(&pending.line, &dir).await, "too many wrong secrets");

        // The relay's log says why, each reason once and then summed up.
        relay_process.signal_and_wait("TERM").await;
        let log = relay_process.log.join("\n");
        for why in [
            "join refused: the invite was used already",
            "join refused: the invite expired",
            "join refused: the invite was revoked",
            "join refused: no invite has this secret",
            "join refused: too many wrong secrets",
            "the agent refused this relay's key",
        ] {
            assert!(log.contains(why), "no {why:?} in the relay's log:\n{log}");
        }
        let (code, stderr) = pending.finish().await;
        assert_eq!(code, 1);
        assert!(stderr.contains("the relay stopped"), "{stderr}");
    })
    .await;
}

/// Where UDP gets no answer, the join goes over the relay's TCP listener, as the agent does.
#[tokio::test]
async fn a_join_goes_over_tcp_when_udp_gets_no_answer() {
    within_for("the test", 4 * STEP, async {
        let keys = Keys::new();
        let relay = Relay::init(&keys);
        let _relay_process = relay.start().await;
        let invite = Invite::make(&relay, "home", "2400/tcp", &[]).await;
        // The relay's TCP listener has the UDP port's number; UDP goes to a port where nothing
        // listens.
        let (silent, held) = consecutive_udp_ports(1);
        drop(held);
        let address = invite.line["tether://".len()..]
            .split('/')
            .next()
            .unwrap()
            .to_owned();
        let tcp_port = address.rsplit_once(':').unwrap().1.to_owned();
        let line = invite.line.replace(
            &format!("{address}/#"),
            &format!("127.0.0.1:{}/?tcp={tcp_port}#", silent.start()),
        );
        let home = keys.path().join("home");
        let (code, stdout, stderr) = join(&line, &home).await;
        assert_eq!(code, 0, "{stdout}{stderr}");
        assert_eq!(invite.finish().await.0, 0);
        let config = std::fs::read_to_string(home.join("agent.toml")).unwrap();
        assert!(
            config.contains(&format!("relay_tcp = \"127.0.0.1:{tcp_port}\"")),
            "{config}"
        );
    })
    .await;
}

/// Join sessions open at once are capped, and a seat comes back however its session ends: the
/// joiner closing early, or sending nothing until the relay gives up on it.
#[tokio::test]
async fn joins_at_once_are_capped_and_their_seats_come_back() {
    use tether_common::trust::identity::Identity;
    use tether_common::trust::invite::JoinLine;
    use tether_common::trust::tls;
    use tether_relay::invites::{JOIN_REQUEST_TIMEOUT, MAX_JOINING};
    within_for("the test", 4 * STEP, async {
        let keys = Keys::new();
        let relay = Relay::init(&keys);
        let _relay_process = relay.start().await;
        let invite = Invite::make(&relay, "home", "2500/tcp", &[]).await;
        let line: JoinLine = invite.line.parse().unwrap();
        let address: std::net::SocketAddr = line.relay.to_string().parse().unwrap();
        let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        let connect = |n: usize| {
            let identity = Identity::generate(&keys.path().join(format!("joiner-{n}.key")));
            let (client, _) =
                tls::client_config_for(&identity.unwrap(), line.fingerprint, tls::ALPN_JOIN)
                    .unwrap();
            let connecting = endpoint
                .connect_with(client, address, tls::SERVER_NAME)
                .unwrap();
            async move { within("a join handshake", connecting).await.unwrap() }
        };
        let closed_by_relay = |conn: quinn::Connection| async move {
            match within_for("the relay to close", 2 * STEP, conn.closed()).await {
                quinn::ConnectionError::ApplicationClosed(close) => {
                    String::from_utf8_lossy(&close.reason).into_owned()
                }
                other => panic!("closed otherwise: {other}"),
            }
        };
        let mut held = Vec::new();
        for n in 0..MAX_JOINING {
            held.push(connect(n).await);
        }
        let extra = connect(MAX_JOINING).await;
        assert_eq!(closed_by_relay(extra).await, "too many joins under way");
        assert!(held.iter().all(|c| c.close_reason().is_none()));

        // Closed early by the joiners: every seat is back, and a join gets through.
        for conn in held.drain(..) {
            conn.close(0u32.into(), b"gone");
        }
        let home = keys.path().join("home");
        let joined = within("a join to get a seat", async {
            loop {
                let (code, stdout, stderr) = join(&invite.line, &home).await;
                if code == 0 {
                    return stdout;
                }
                assert!(stderr.contains("join session failed"), "{stderr}");
            }
        })
        .await;
        assert!(joined.contains("Joined as home."), "{joined}");
        assert_eq!(invite.finish().await.0, 0);

        // Silent until the relay gives up: its seat is back too (a join session needs an
        // invite pending, hence another).
        let _next = Invite::make(&relay, "next", "2501/tcp", &[]).await;
        // Many in a row, each closed at once or with a request that is none: no seat is kept.
        for n in 0..200 {
            let conn = connect(1000 + n).await;
            if n % 2 == 0 {
                conn.close(0u32.into(), b"gone");
            } else {
                let (mut send, _recv) = conn.open_bi().await.unwrap();
                send.write_all(b"not a join request").await.unwrap();
                send.finish().unwrap();
                let _ = within("the relay to close", conn.closed()).await;
            }
        }
        let silent = connect(MAX_JOINING + 1).await;
        let start = std::time::Instant::now();
        assert_eq!(closed_by_relay(silent).await, "no join request");
        let waited = start.elapsed();
        assert!(waited >= JOIN_REQUEST_TIMEOUT - std::time::Duration::from_millis(500));
        let mut again = Vec::new();
        for n in 0..MAX_JOINING {
            again.push(connect(100 + n).await);
        }
        // The one after them is refused, once each of them has its seat.
        let extra = connect(200).await;
        assert_eq!(closed_by_relay(extra).await, "too many joins under way");
        assert!(
            again.iter().all(|c| c.close_reason().is_none()),
            "every seat was free"
        );
    })
    .await;
}

/// An invite whose command is stopped (Ctrl-C, or killed) is withdrawn: no longer listed, and
/// its line no longer gets a handshake.
#[tokio::test]
async fn stopping_the_invite_command_withdraws_the_invite() {
    within_for("the test", 4 * STEP, async {
        let keys = Keys::new();
        let relay = Relay::init(&keys);
        let mut relay_process = relay.start().await;
        let mut invite = Invite::make(&relay, "home", "2600/tcp", &[]).await;
        let pending = |json: &str| !json.trim().eq("[]");
        let list = || {
            run(
                &binary("tether-relay"),
                &["invites", "--json", "-c", path(&relay.config)],
            )
        };
        assert!(pending(&list().1));
        invite.child.start_kill().unwrap();
        let line = invite.line.clone();
        invite.finish().await;
        relay_process.wait_for_line("invite withdrawn").await;
        let listed = list().1;
        assert_eq!(listed.trim(), "[]");
        let (code, _, stderr) = join(&line, &keys.path().join("home")).await;
        assert_eq!(code, 1);
        assert!(stderr.contains("has no invite pending"), "{stderr}");
    })
    .await;
}
