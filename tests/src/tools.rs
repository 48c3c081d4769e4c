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
