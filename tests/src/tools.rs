//! Outside programs some tests drive (mosh, tmux). CI installs them and sets
//! `TETHER_REQUIRE_TOOLS=1`, so there a missing one fails the test; elsewhere the test says, past
//! the test harness's output capture, that it did not run.

use std::io::Write;
use std::path::Path;

/// Whether every one of `tools` is on the PATH. Panics if one is missing and
/// `TETHER_REQUIRE_TOOLS` is set.
pub fn available(test: &str, tools: &[&str]) -> bool {
    let missing: Vec<&str> = tools.iter().copied().filter(|t| !on_path(t)).collect();
    if missing.is_empty() {
        return true;
    }
    let missing = missing.join(", ");
    if std::env::var_os("TETHER_REQUIRE_TOOLS").is_some() {
        panic!("{test} needs these, missing here: {missing}");
    }
    not_run(test, &format!("{missing} (.ci/run installs them)"));
    false
}

/// Says that `test` did not run for want of `what`: straight to stderr, past the test harness,
/// which shows a passing test's own output to nobody.
pub fn not_run(test: &str, what: &str) {
    let _ = writeln!(
        std::io::stderr(),
        "\n*** NOT RUN: {test} needs these, missing here: {what} ***\n"
    );
}

fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| is_executable(&dir.join(tool))))
}

fn is_executable(file: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    file.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// The files of an sshd of a test's own, in `dir`: a config listening on `listen` that admits
/// root with a key made for the test, its host key, and the user key to log in with.
pub struct SshdFiles {
    pub config: std::path::PathBuf,
    pub user_key: std::path::PathBuf,
}

impl SshdFiles {
    pub fn write(dir: &Path, listen: &str) -> Self {
        let keygen = |name: &str| {
            let path = dir.join(name);
            let status = std::process::Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-f"])
                .arg(&path)
                .status();
            assert!(
                status.expect("run ssh-keygen").success(),
                "ssh-keygen failed"
            );
            path
        };
        let host_key = keygen("ssh_host_key");
        let user_key = keygen("ssh_user_key");
        let config = dir.join("sshd_config");
        std::fs::write(
            &config,
            format!(
                "ListenAddress {listen}\nHostKey {}\nAuthorizedKeysFile {}.pub\n\
                 PermitRootLogin prohibit-password\nPasswordAuthentication no\nUsePAM no\n\
                 StrictModes no\nUseDNS no\nPidFile none\n",
                host_key.display(),
                user_key.display()
            ),
        )
        .expect("write sshd_config");
        // sshd insists on its privilege separation directory.
        std::fs::create_dir_all("/run/sshd").expect("create /run/sshd");
        Self { config, user_key }
    }

    /// The arguments of `ssh` that log in as root at `host`'s `port` with the test's key,
    /// asking nothing.
    pub fn login(&self, host: &str, port: u16) -> Vec<String> {
        [
            "-F",
            "/dev/null",
            "-o",
            "BatchMode=yes",
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "LogLevel=ERROR",
            "-o",
            "IdentitiesOnly=yes",
            "-i",
            &self.user_key.display().to_string(),
            "-p",
            &port.to_string(),
            &format!("root@{host}"),
        ]
        .map(String::from)
        .to_vec()
    }
}
