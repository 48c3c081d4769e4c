//! `tether-agent` as users type it: init, fingerprint, check, run, and its exit codes.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use tether_common::trust::identity::Fingerprint;
use tether_tests::process::{run, Process};
use tether_tests::*;

const AGENT: &str = env!("CARGO_BIN_EXE_tether-agent");

fn agent(args: &[&str]) -> (i32, String, String) {
    run(Path::new(AGENT), args)
}

fn some_fingerprint() -> String {
    Fingerprint::of_spki(b"some relay").to_string()
}

#[test]
fn init_prints_the_block_to_paste_on_the_relay() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().to_str().unwrap();
    let relay_fp = some_fingerprint();
    let (code, out, err) = agent(&[
        "init",
        "--dir",
        target,
        "--relay",
        "vps.example.com:4433",
        "--relay-fingerprint",
        &relay_fp,
        "--name",
        "dorm",
    ]);
    assert_eq!(code, 0, "{err}");
    let config = dir.path().join("agent.toml");
    let (code, fingerprint, err) = agent(&["fingerprint", "-c", config.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let block = format!(
        "[[agent]]\nname = \"dorm\"\nfingerprint = \"{}\"\nports = [\"2222/tcp\"]\n",
        fingerprint.trim()
    );
    assert!(out.contains(&block), "{out}");
    assert!(
        out.contains("on the relay, open 2222/tcp to visitors, and 4433/udp and 4433/tcp to this"),
        "{out}"
    );
    let mode = fs::metadata(dir.path().join("agent.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let text = fs::read_to_string(&config).unwrap();
    assert!(text.contains("relay = \"vps.example.com:4433\""), "{text}");
    assert!(
        text.contains(&format!("relay_fingerprint = \"{relay_fp}\"")),
        "{text}"
    );
    let (code, out, err) = agent(&["check", "-c", config.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("ok (1 forward)"), "{out}");
}

#[test]
fn init_refuses_bad_input_and_existing_files() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().to_str().unwrap();
    let fp = some_fingerprint();
    let (code, _, err) = agent(&[
        "init",
        "--dir",
        target,
        "--relay",
        "vps",
        "--relay-fingerprint",
        &fp,
    ]);
    assert_eq!(code, 64);
    assert!(err.contains("expected HOST:PORT, got \"vps\""), "{err}");
    let (code, _, err) = agent(&[
        "init",
        "--dir",
        target,
        "--relay",
        "vps:4433",
        "--relay-fingerprint",
        "abc",
    ]);
    assert_eq!(code, 64);
    assert!(
        err.contains("expected SHA256: followed by 43 base64 characters"),
        "{err}"
    );
    let args = [
        "init",
        "--dir",
        target,
        "--relay",
        "vps:4433",
        "--relay-fingerprint",
        &fp,
    ];
    assert_eq!(agent(&args).0, 0);
    let (code, _, err) = agent(&args);
    assert_eq!(code, 1);
    assert!(
        err.contains("already exists; init never overwrites"),
        "{err}"
    );
}

#[test]
fn check_names_file_key_and_expectation() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("agent.toml");
    fs::write(
        &config,
        format!(
            "relay = \"vps:4433\"\nrelay_fingerprint = \"{}\"\n[[forward]]\nname = \"ssh\"\nproto = \"tcp\"\nremote = 2222\nlocal = \"127.0.0.1:22\"\n[[forward]]\nname = \"web\"\nproto = \"tcp\"\nremote = 8080\nlocal = \"22\"\n",
            some_fingerprint()
        ),
    )
    .unwrap();
    let (code, _, err) = agent(&["check", "-c", config.to_str().unwrap()]);
    assert_eq!(code, 64);
    assert_eq!(
        err.trim(),
        format!(
            "{}: forward[1].local: expected HOST:PORT, got \"22\"",
            config.display()
        )
    );
}

#[test]
fn key_readable_by_others_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().to_str().unwrap();
    let fp = some_fingerprint();
    assert_eq!(
        agent(&[
            "init",
            "--dir",
            target,
            "--relay",
            "h:1",
            "--relay-fingerprint",
            &fp
        ])
        .0,
        0
    );
    fs::set_permissions(
        dir.path().join("agent.key"),
        fs::Permissions::from_mode(0o604),
    )
    .unwrap();
    let (code, _, err) = agent(&[
        "check",
        "-c",
        dir.path().join("agent.toml").to_str().unwrap(),
    ]);
    assert_eq!(code, 64);
    assert!(
        err.contains("agent.key: permissions 0604 are too open"),
        "{err}"
    );
}

#[tokio::test]
async fn run_carries_a_forward_and_stops_on_sigterm() {
    within("the whole test", async {
        let keys = Keys::new();
        let (relay_identity, relay_key) = keys.identity("relay");
        let dir = tempfile::tempdir().unwrap();
        let relay_fp = relay_identity.fingerprint().to_string();
        let target = dir.path().to_str().unwrap();
        let placeholder = [
            "init",
            "--dir",
            target,
            "--relay",
            "127.0.0.1:1",
            "--relay-fingerprint",
            &relay_fp,
        ];
        assert_eq!(agent(&placeholder).0, 0);
        let config = dir.path().join("agent.toml");
        let agent_fp = agent(&["fingerprint", "-c", config.to_str().unwrap()]).1;

        let port = free_port();
        let entry = agent_entry("dorm", agent_fp.trim().parse().unwrap(), &[port]);
        let relay = start_relay(relay_config(relay_key, vec![entry]), &relay_identity);
        let echo = echo_service().await;
        let text = fs::read_to_string(&config)
            .unwrap()
            .replace("127.0.0.1:1", &relay.addr.to_string())
            .replace("remote = 2222", &format!("remote = {port}"))
            .replace("127.0.0.1:22", &echo.to_string());
        fs::write(&config, text).unwrap();

        let mut process =
            Process::spawn(Path::new(AGENT), &["run", "-c", config.to_str().unwrap()]);
        process
            .wait_for_line(&format!("relay port {port}/tcp now reaches {echo}"))
            .await;
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
        assert!(process.log.join("\n").contains("agent stopped"));
        relay.stop().await;
    })
    .await;
}
