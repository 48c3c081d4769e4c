//! The systemd units in `deploy/`: systemd accepts them, rates their hardening 2.0 or lower
//! (`systemd-analyze security`), and they agree with the binaries they start.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use tether_tests::lab::binary;
use tether_tests::tools;

/// The highest exposure `systemd-analyze security` may give a unit, in its tenths (2.0).
const MOST_EXPOSURE: u32 = 20;

fn unit(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .join(format!("{name}.service"))
}

/// The value of `key` in the unit, which must appear once.
fn setting(text: &str, key: &str) -> String {
    let prefix = format!("{key}=");
    let values: Vec<&str> = text
        .lines()
        .filter_map(|line| line.strip_prefix(&prefix))
        .collect();
    assert_eq!(values.len(), 1, "{key} appears {} times", values.len());
    values[0].to_owned()
}

fn seconds(value: &str) -> Duration {
    let seconds = value.strip_suffix('s').expect("a time in seconds");
    Duration::from_secs(seconds.parse().expect("whole seconds"))
}

#[test]
fn units_start_the_binaries_as_they_expect() {
    for (side, grace) in [
        ("relay", tether_relay::Limits::default().shutdown_grace),
        ("agent", tether_agent::client::CLOSE_GRACE),
    ] {
        let text = std::fs::read_to_string(unit(&format!("tether-{side}"))).unwrap();
        assert_eq!(setting(&text, "Type"), "notify");
        // The config is read in place, so that a reload reads the edited file; the key comes
        // as a credential, the one copy the service's user may read.
        assert_eq!(
            setting(&text, "ExecStart"),
            format!("/usr/bin/tether-{side} run -c /etc/tether/{side}.toml --key %d/{side}.key")
        );
        assert_eq!(
            setting(&text, "LoadCredential"),
            format!("{side}.key:/etc/tether/{side}.key")
        );
        assert_eq!(setting(&text, "ExecReload"), "/bin/kill -HUP $MAINPID");
        // The default status socket is in the folder systemd makes for the service.
        let socket = match side {
            "relay" => tether_common::config::RELAY_STATUS_SOCKET,
            _ => tether_common::config::AGENT_STATUS_SOCKET,
        };
        let folder = format!("/run/{}", setting(&text, "RuntimeDirectory"));
        assert_eq!(Path::new(socket).parent(), Some(Path::new(&folder)));
        // A usage or config error (exit 64) is not worth restarting for.
        assert_eq!(setting(&text, "RestartPreventExitStatus"), "64");
        assert_eq!(setting(&text, "Restart"), "on-failure");
        let stop = seconds(&setting(&text, "TimeoutStopSec"));
        assert!(stop > grace * 2, "TimeoutStopSec {stop:?}, grace {grace:?}");
        assert!(seconds(&setting(&text, "WatchdogSec")) >= Duration::from_secs(10));
        assert_eq!(setting(&text, "After"), "network-online.target");
        assert_eq!(setting(&text, "DynamicUser"), "yes");
        assert_eq!(setting(&text, "CapabilityBoundingSet"), "");
    }
}

#[test]
fn a_restart_of_the_relay_unit_keeps_its_connections_and_a_stop_does_not() {
    let text = std::fs::read_to_string(unit("tether-relay")).unwrap();
    // `systemctl restart` sends the signal the relay hands its connections over on; a stop
    // sends SIGTERM, on which it drains.
    assert_eq!(setting(&text, "RestartKillSignal"), "SIGUSR2");
    assert!(!text.lines().any(|line| line.starts_with("KillSignal=")));
    // Room in systemd's store for every visitor connection the relay takes, and its ports.
    let store: u64 = setting(&text, "FileDescriptorStoreMax").parse().unwrap();
    let files: u64 = setting(&text, "LimitNOFILE").parse().unwrap();
    assert!(
        store >= files * 3 / 4 + 1024,
        "store {store}, files {files}"
    );
    // The state file waits beside the status socket, in a folder kept across a restart.
    assert_eq!(setting(&text, "RuntimeDirectoryPreserve"), "restart");
    let state =
        tether_relay::handover::state_path(Path::new(tether_common::config::RELAY_STATUS_SOCKET));
    let folder = format!("/run/{}", setting(&text, "RuntimeDirectory"));
    assert_eq!(state.parent(), Some(Path::new(&folder)));
}

#[test]
fn systemd_accepts_the_units_and_rates_them_two_or_lower() {
    let test = "systemd_accepts_the_units_and_rates_them_two_or_lower";
    if !tools::available(test, &["systemd-analyze"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for name in ["tether-relay", "tether-agent"] {
        // verify checks that ExecStart's program exists: point it at the one just built.
        let text = std::fs::read_to_string(unit(name))
            .unwrap()
            .replace(&format!("/usr/bin/{name}"), binary(name).to_str().unwrap());
        let copy = dir.path().join(format!("{name}.service"));
        std::fs::write(&copy, text).unwrap();

        let verify = Command::new("systemd-analyze")
            .arg("verify")
            .arg(&copy)
            .output()
            .expect("systemd-analyze runs");
        let complaints = String::from_utf8_lossy(&verify.stderr);
        assert!(verify.status.success(), "{name}: {complaints}");
        assert!(complaints.trim().is_empty(), "{name}: {complaints}");

        let security = Command::new("systemd-analyze")
            .args(["security", "--offline=true"])
            .arg(format!("--threshold={MOST_EXPOSURE}"))
            .arg(&copy)
            .output()
            .expect("systemd-analyze runs");
        let report = String::from_utf8_lossy(&security.stdout);
        let overall = report
            .lines()
            .find(|l| l.contains("Overall exposure level"))
            .unwrap_or_else(|| panic!("{name}: no overall rating in\n{report}"));
        println!("{overall}");
        assert!(
            security.status.success(),
            "{name} is rated above 2.0:\n{report}"
        );
    }
}
