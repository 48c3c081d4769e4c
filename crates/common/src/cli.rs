//! What the two binaries' command lines share: exit codes, logging, signals.

use std::future::Future;
use std::io::{IsTerminal, Write};
use std::path::Path;
use std::process::ExitCode;

use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

use crate::config::ConfigError;
use crate::identity::Identity;

/// Exit code for bad usage or a bad config (EX_USAGE).
pub const EXIT_USAGE: u8 = 64;
/// Exit code for a failure at run time.
pub const EXIT_FAILURE: u8 = 1;

/// `n` and the noun, in the plural unless `n` is 1: "1 agent", "2 agents".
pub fn count(n: usize, noun: &str) -> String {
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

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
async fn shutdown_signal() -> std::io::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received, shutting down"),
        _ = int.recv() => tracing::info!("SIGINT received, shutting down"),
    }
    Ok(())
}

/// Loads a config with `load` and the key it names, printing every problem for the user.
pub fn load_config_and_key<C>(
    file: &Path,
    load: fn(&Path) -> Result<C, ConfigError>,
    key: fn(&C) -> &Path,
) -> Result<(C, Identity), ExitCode> {
    let config = load(file).map_err(|e| {
        eprintln!("{e}");
        usage_error()
    })?;
    let identity = Identity::load(key(&config)).map_err(|e| {
        eprintln!("{}: key: {e}", file.display());
        usage_error()
    })?;
    Ok((config, identity))
}

/// What `init` does on both sides: in `dir`, a new key as `key_name` and `config_text` as
/// `config_name`. Nothing is written if either exists: init never overwrites.
pub fn init_files(
    dir: &Path,
    config_name: &str,
    key_name: &str,
    config_text: &str,
) -> Result<Identity, String> {
    let (config_path, key_path) = (dir.join(config_name), dir.join(key_name));
    if let Some(path) = [&config_path, &key_path].into_iter().find(|p| p.exists()) {
        return Err(format!(
            "{} already exists; init never overwrites",
            path.display()
        ));
    }
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let identity = Identity::generate(&key_path).map_err(|e| e.to_string())?;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&config_path)
        .and_then(|mut file| file.write_all(config_text.as_bytes()))
        .map_err(|e| format!("{}: {e}", config_path.display()))?;
    Ok(identity)
}

/// Runs `serve` on a new multi-threaded runtime, cancelling its token at the first SIGINT or
/// SIGTERM.
pub fn run_until_signal<F, Fut>(serve: F) -> ExitCode
where
    F: FnOnce(CancellationToken) -> Fut,
    Fut: Future<Output = ExitCode>,
{
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("cannot start the runtime: {error}");
            return failure();
        }
    };
    runtime.block_on(async {
        let shutdown = CancellationToken::new();
        let signal = shutdown.clone();
        tokio::spawn(async move {
            if let Err(error) = shutdown_signal().await {
                tracing::error!(%error, "cannot listen for signals");
            }
            signal.cancel();
        });
        serve(shutdown).await
    })
}
