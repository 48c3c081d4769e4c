//! What the two binaries' command lines share: exit codes, logging, signals.

use std::io::IsTerminal;
use std::process::ExitCode;

use tracing_subscriber::EnvFilter;

/// Exit code for bad usage or a bad config (EX_USAGE).
pub const EXIT_USAGE: u8 = 64;
/// Exit code for a failure at run time.
pub const EXIT_FAILURE: u8 = 1;

pub fn usage_error() -> ExitCode {
    ExitCode::from(EXIT_USAGE)
}

pub fn failure() -> ExitCode {
    ExitCode::from(EXIT_FAILURE)
}

/// Logs to stderr, in colour only on a terminal. `RUST_LOG` wins; otherwise `info`, `debug`
/// with `-v`, `trace` with `-vv`. Under systemd (`JOURNAL_STREAM` set) the journal adds its own timestamps and shows no colours.
pub fn init_logging(verbosity: u8) {
    let level = match verbosity {
        0 => "info",
        1 => "debug",
        _ => "trace",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    if std::env::var_os("JOURNAL_STREAM").is_some() {
        builder.with_ansi(false).without_time().init();
    } else {
        builder.init();
    }
}

/// Completes on the first SIGINT or SIGTERM.
pub async fn shutdown_signal() -> std::io::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received, shutting down"),
        _ = int.recv() => tracing::info!("SIGINT received, shutting down"),
    }
    Ok(())
}

/// Refuses to go on if any of `paths` exists: `init` never overwrites.
pub fn refuse_existing(paths: &[&std::path::Path]) -> Result<(), String> {
    match paths.iter().find(|p| p.exists()) {
        Some(path) => Err(format!(
            "{} already exists; init never overwrites",
            path.display()
        )),
        None => Ok(()),
    }
}

/// Writes a new file, failing if it exists.
pub fn write_new(path: &std::path::Path, contents: &str) -> Result<(), String> {
    use std::io::Write;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .and_then(|mut file| file.write_all(contents.as_bytes()))
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// The multi-threaded runtime both binaries run on.
pub fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
}
