//! `tether-relay` as users type it: init, fingerprint, check, run, and its exit codes.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use tether_tests::process::{run, Process};
use tether_tests::*;

const RELAY: &str = env!("CARGO_BIN_EXE_tether-relay");

fn relay(args: &[&str]) -> (i32, String, String) {
    run(Path::new(RELAY), args)
}

#[test]
fn init_writes_a_private_key_and_a_config_that_checks() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("etc");
    let target = target.to_str().unwrap();
    let (code, out, err) = relay(&["init", "--dir", target, "--listen", "127.0.0.1:4433"]);
    assert_eq!(code, 0, "{err}");
    let printed = out
        .lines()
        .find_map(|l| l.strip_prefix("Relay fingerprint: "))
        .expect("init prints the fingerprint");
    assert!(
        out.contains(&format!(
            "tether-agent init --dir /etc/tether --relay 127.0.0.1:4433 --relay-fingerprint {printed}"
        )),
        "{out}"
    );
    assert!(
        out.contains("Firewall: open 4433/udp and 4433/tcp"),
        "{out}"
    );
    let mode = fs::metadata(dir.path().join("etc/relay.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let config = format!("{target}/relay.toml");
    let written = fs::read_to_string(&config).unwrap();
    assert!(written.contains("listen = \"127.0.0.1:4433\""));
    // The TCP listener beside the UDP one, on the same port.
    assert!(written.contains("listen_tcp = \"127.0.0.1:4433\""));
    let (code, out, err) = relay(&["fingerprint", "-c", &config]);
    assert_eq!((code, out.trim()), (0, printed), "{err}");
    let (code, out, err) = relay(&["check", "-c", &config]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("ok"), "{out}");
}

#[test]
fn init_never_overwrites() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().to_str().unwrap();
    let (code, out, _) = relay(&["init", "--dir", target]);
    assert_eq!(code, 0);
    // Listening on every address, init cannot know the public one.
    assert!(out.contains("--relay RELAY_HOST:4433 "), "{out}");
    assert!(
        out.contains("with RELAY_HOST this relay's public name"),
        "{out}"
    );
    let key_before = fs::read(dir.path().join("relay.key")).unwrap();
    fs::remove_file(dir.path().join("relay.toml")).unwrap();
    let (code, _, err) = relay(&["init", "--dir", target]);
    assert_eq!(code, 1);
    assert!(
        err.contains("relay.key already exists; init never overwrites"),
        "{err}"
    );
    assert_eq!(fs::read(dir.path().join("relay.key")).unwrap(), key_before);
    assert!(
        !dir.path().join("relay.toml").exists(),
        "nothing is written when init refuses"
    );
}

#[test]
fn check_prints_every_problem_and_exits_64() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("relay.toml");
    fs::write(
        &config,
        "listen = \"nowhere\"\n[[agent]]\nname = \"a\"\nfingerprint = \"x\"\nports = [\"22\"]\n",
    )
    .unwrap();
    let (code, _, err) = relay(&["check", "-c", config.to_str().unwrap()]);
    assert_eq!(code, 64);
    let file = config.display();
    assert!(
        err.contains(&format!(
            "{file}: listen: expected IP:PORT, got \"nowhere\""
        )),
        "{err}"
    );
    assert!(
        err.contains(&format!("{file}: agent[0].fingerprint: expected SHA256:")),
        "{err}"
    );
    assert!(
        err.contains(&format!("{file}: agent[0].ports[0]: expected PORT/PROTO")),
        "{err}"
    );
}

#[test]
fn missing_config_and_open_key_are_usage_errors() {
    let (code, _, err) = relay(&["check", "-c", "/nonexistent/relay.toml"]);
    assert_eq!(code, 64);
    assert!(
        err.contains("/nonexistent/relay.toml: cannot read"),
        "{err}"
    );

    let dir = tempfile::tempdir().unwrap();
    assert_eq!(relay(&["init", "--dir", dir.path().to_str().unwrap()]).0, 0);
    let key = dir.path().join("relay.key");
    fs::set_permissions(&key, fs::Permissions::from_mode(0o640)).unwrap();
    let config = dir.path().join("relay.toml");
    let (code, _, err) = relay(&["fingerprint", "-c", config.to_str().unwrap()]);
    assert_eq!(code, 64);
    assert!(err.contains("permissions 0640 are too open"), "{err}");
}

#[test]
fn bad_usage_exits_64_and_help_exits_0() {
    assert_eq!(relay(&["frobnicate"]).0, 64);
    assert_eq!(relay(&["run", "--bogus"]).0, 64);
    assert_eq!(relay(&["init"]).0, 64, "--dir is required");
    assert_eq!(relay(&["init", "--dir", "/tmp/x", "--listen", "vps"]).0, 64);
    let (code, out, _) = relay(&["--help"]);
    assert_eq!(code, 0);
    for command in ["init", "fingerprint", "check", "run"] {
        assert!(out.contains(command), "{out}");
    }
}

#[tokio::test]
async fn run_serves_an_agent_and_drains_on_sigterm() {
    within("the whole test", async {
        let keys = Keys::new();
        let (agent_identity, agent_key) = keys.identity("agent");
        let dir = keys.path();
        assert_eq!(
            relay(&[
                "init",
                "--dir",
                dir.to_str().unwrap(),
                "--listen",
                "127.0.0.1:0"
            ])
            .0,
            0
        );
        let port = free_port();
        let config = dir.join("relay.toml");
        let mut text = fs::read_to_string(&config).unwrap();
        text.push_str(&format!(
            "\n[[agent]]\nname = \"dorm\"\nfingerprint = \"{}\"\nports = [\"{port}/tcp\"]\n",
            agent_identity.fingerprint()
        ));
        text = text.replace("# public_bind = \"0.0.0.0\"", "public_bind = \"127.0.0.1\"");
        fs::write(&config, text).unwrap();

        let mut process =
            Process::spawn(Path::new(RELAY), &["run", "-c", config.to_str().unwrap()]);
        let line = process.wait_for_line("relay listening").await;
        let addr = line
            .split("listen=")
            .nth(1)
            .and_then(|rest| rest.split(' ').next())
            .unwrap();
        let relay_fp = relay(&["fingerprint", "-c", config.to_str().unwrap()]).1;
        let forward = tcp_forward("echo", port, echo_service().await);
        let agent_config = agent_config(
            agent_key,
            addr.parse().unwrap(),
            relay_fp.trim().parse().unwrap(),
            vec![forward],
        );
        let mut agent = start_agent(agent_config, &agent_identity);
        agent.connected().await;
        assert_eq!(
            round_trip(public(port), b"via the binary").await.unwrap(),
            b"via the binary"
        );

        let status = process.signal_and_wait("TERM").await;
        assert!(
            status.success(),
            "exit status {status}:\n{}",
            process.log.join("\n")
        );
        let log = process.log.join("\n");
        assert!(log.contains("SIGTERM received"), "{log}");
        assert!(log.contains("relay stopped"), "{log}");
        agent.stop().await;
    })
    .await;
}
