//! What the two binaries' command lines share: exit codes, logging, signals.

use std::future::Future;
use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::process::ExitCode;
use std::time::SystemTime;

use prometheus_client::registry::Registry;
use serde::de::DeserializeOwned;
use serde::Serialize;

use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

use crate::config::ConfigError;
use crate::service::metrics;
use crate::service::status_socket::{self, Handler, StatusSocket};
use crate::trust::identity::Identity;

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

/// Loads a config with `load` and the key it names (or `key_override`, which then becomes the
/// config's key), printing every problem for the user.
pub fn load_config_and_key<C>(
    file: &Path,
    load: fn(&Path) -> Result<C, ConfigError>,
    key: fn(&mut C) -> &mut std::path::PathBuf,
    key_override: Option<&Path>,
) -> Result<(C, Identity), ExitCode> {
    let mut config = load(file).map_err(|e| {
        eprintln!("{e}");
        usage_error()
    })?;
    if let Some(path) = key_override {
        *key(&mut config) = path.to_owned();
    }
    let identity = Identity::load(key(&mut config)).map_err(|e| {
        eprintln!("{}: key: {e}", file.display());
        usage_error()
    })?;
    Ok((config, identity))
}

/// On each SIGHUP until `shutdown`, loads `file` again and hands the config to `apply`. A
/// config that fails to load is logged, problem by problem, and the running one stays.
async fn reload_on_hangup<C>(
    file: std::path::PathBuf,
    load: impl Fn(&Path) -> Result<C, ConfigError>,
    mut apply: impl FnMut(C),
    shutdown: CancellationToken,
) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hangups = match signal(SignalKind::hangup()) {
        Ok(hangups) => hangups,
        Err(error) => {
            tracing::error!(%error, "cannot listen for SIGHUP; reloading is off");
            return;
        }
    };
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = hangups.recv() => {}
        }
        tracing::info!("SIGHUP received, reloading {}", file.display());
        match load(&file) {
            Ok(config) => apply(config),
            Err(error) => {
                for problem in error.to_string().lines() {
                    tracing::error!("{problem}");
                }
                tracing::error!("reload refused; the running config stays");
            }
        }
    }
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

/// Runs `serve` on a new runtime, cancelling its token at the first SIGINT or SIGTERM.
///
/// Raises this process's soft limit of open files to its hard limit, and returns the soft
/// limit in force then. Every visitor connection holds a descriptor at the relay, and every
/// forwarded connection one at the agent; the soft limit is often 1,024, the hard one far more
/// (systemd's default is 524,288, and the units ask for as much).
pub fn raise_open_files_limit() -> u64 {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let limit = getrlimit(Resource::Nofile);
    if limit.current != limit.maximum {
        let raised = Rlimit {
            current: limit.maximum,
            maximum: limit.maximum,
        };
        match setrlimit(Resource::Nofile, raised) {
            Ok(()) => return limit.maximum.unwrap_or(u64::MAX),
            Err(error) => tracing::debug!(%error, "cannot raise the limit of open files"),
        }
    }
    limit.current.unwrap_or(u64::MAX)
}

/// The runtime has one thread. A session's packets all pass through its QUIC connection's one
/// driver task, so more threads add no parallelism to a transfer, only hand-offs between
/// them: on two cores, relay and agent each on one thread spent a sixth less CPU per byte
/// carried than on a thread per core (3.0 against 3.6 CPU seconds per GB, iperf3 through
/// loopback). One core still carries more than a small VPS's link.
pub fn run_until_signal<F, Fut>(serve: F) -> ExitCode
where
    F: FnOnce(CancellationToken) -> Fut,
    Fut: Future<Output = ExitCode>,
{
    let runtime = match tokio::runtime::Builder::new_current_thread()
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

/// Answers `status` on the socket at `path` with what `status` returns, until `shutdown`. A
/// socket that cannot be opened is logged, and the service goes on without it.
fn spawn_status_socket<S: Serialize>(
    path: &Path,
    status: impl Fn() -> S + Send + 'static,
    other: Option<Handler>,
    shutdown: CancellationToken,
) {
    match StatusSocket::bind(path) {
        Ok(socket) => {
            tracing::debug!(path = %path.display(), "status socket open");
            let answer = move || serde_json::to_string(&status()).unwrap_or_default();
            tokio::spawn(socket.serve_with(answer, other, shutdown));
        }
        Err(error) => tracing::warn!("{error}; `status` will get no answer"),
    }
}

/// Serves `registry` on `address` until `shutdown`. The address was asked for in the config, so
/// failing to bind it is an error, as failing to bind `listen` is.
async fn spawn_metrics(
    address: SocketAddr,
    registry: Registry,
    shutdown: CancellationToken,
) -> Result<(), ExitCode> {
    match metrics::bind(address).await {
        Ok(listener) => {
            let bound = listener.local_addr().unwrap_or(address);
            tracing::info!("metrics on http://{bound}/metrics");
            tokio::spawn(metrics::serve(listener, registry, shutdown));
            Ok(())
        }
        Err(error) => {
            tracing::error!("cannot serve metrics on {address}: {error}");
            Err(failure())
        }
    }
}

/// The `status` command: asks the process on `socket` and prints its answer, as JSON or for
/// people with `render`. Exits 1 if the process does not answer.
pub fn print_status<S: DeserializeOwned>(
    socket: &Path,
    json: bool,
    render: fn(&S, SystemTime) -> String,
) -> ExitCode {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build();
    let answer = match runtime.map(|rt| rt.block_on(status_socket::query(socket))) {
        Ok(Ok(answer)) => answer,
        Ok(Err(error)) => {
            eprintln!("{error}");
            return failure();
        }
        Err(error) => {
            eprintln!("cannot start the runtime: {error}");
            return failure();
        }
    };
    if json {
        print!("{answer}");
        return ExitCode::SUCCESS;
    }
    match serde_json::from_str::<S>(&answer) {
        Ok(status) => {
            print!("{}", render(&status, SystemTime::now()));
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!(
                "{}: cannot read the answer ({error}); is the service the same version as this command?",
                socket.display()
            );
            failure()
        }
    }
}

/// Where `status` asks: `--socket` if given, else the `status_socket` of the config `file`,
/// else where `run` puts it by default (see [`crate::config::default_status_socket`]). Only
/// that one key is read, so that `status` still answers while the file holds an edit that a
/// reload refused.
pub fn status_socket_path(
    socket: Option<std::path::PathBuf>,
    file: &Path,
    default: &str,
) -> std::path::PathBuf {
    if let Some(socket) = socket {
        return socket;
    }
    let configured = std::fs::read_to_string(file)
        .ok()
        .and_then(|text| text.parse::<toml::Table>().ok())
        .and_then(|table| match table.get("status_socket") {
            Some(toml::Value::String(path)) if !path.is_empty() => Some(path.clone()),
            _ => None,
        });
    if let Some(path) = configured {
        return file.parent().unwrap_or(Path::new("")).join(path);
    }
    // As `run` chose it; but a user asking about the service that systemd runs finds that one.
    let own = crate::config::default_status_socket(default);
    if !own.exists() && Path::new(default).exists() {
        return default.into();
    }
    own
}

/// What `run` starts beside the service, on both ends: the metrics endpoint if the config asks
/// for one, reloads of `file` on SIGHUP (handed to `reload`), and the status socket answering
/// with `status` (and with `other`, to requests other than `status`). Fails only if the metrics
/// address cannot be bound.
#[allow(clippy::too_many_arguments)]
pub async fn start_operations<C: Send + 'static, S: Serialize>(
    file: std::path::PathBuf,
    load: fn(&Path) -> Result<C, ConfigError>,
    reload: impl FnMut(C) + Send + 'static,
    status_socket: &Path,
    status: impl Fn() -> S + Send + 'static,
    other: Option<Handler>,
    metrics: Option<(SocketAddr, Registry)>,
    shutdown: &CancellationToken,
) -> Result<(), ExitCode> {
    if let Some((address, registry)) = metrics {
        spawn_metrics(address, registry, shutdown.clone()).await?;
    }
    tokio::spawn(reload_on_hangup(file, load, reload, shutdown.clone()));
    spawn_status_socket(status_socket, status, other, shutdown.clone());
    Ok(())
}
