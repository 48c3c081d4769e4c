//! `tether-relay`'s command line: init, fingerprint, check, run, status, invite, invites.

use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use tether_common::config::{RelayConfig, RELAY_STATUS_SOCKET};
use tether_common::service::cli::{self as common, failure, usage_error};
use tether_common::service::{fdstore, notify};
use tether_common::trust::identity::Identity;
use tokio_util::sync::CancellationToken;

use crate::status::RelayStatus;
use crate::{Control, Limits, Relay};

const DEFAULT_CONFIG: &str = "/etc/tether/relay.toml";

#[derive(Parser)]
#[command(
    name = "tether-relay",
    version,
    about = "The public end of a tether tunnel"
)]
struct Cli {
    /// More log output: -v debug, -vv trace (RUST_LOG overrides)
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Write DIR/relay.toml and a new DIR/relay.key; never overwrites
    Init {
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// The UDP address agents connect to
        #[arg(long, value_name = "ADDR", default_value = "0.0.0.0:4433")]
        listen: SocketAddr,
    },
    /// Print this relay's key fingerprint, for the agents to pin
    Fingerprint {
        #[arg(short, long, value_name = "FILE", default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Validate the configuration and the key; exit 0, or print every problem and exit 64
    Check {
        #[arg(short, long, value_name = "FILE", default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Serve until SIGINT or SIGTERM; SIGHUP reloads the config's agents
    Run {
        #[arg(short, long, value_name = "FILE", default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// The key file, instead of the config's `key` (the systemd unit passes its credential)
        #[arg(long, value_name = "FILE")]
        key: Option<PathBuf>,
    },
    /// Invite an agent: print the one line to run at home, wait for it to join, list it in
    /// relay.toml
    Invite {
        /// The agent's name, as relay.toml will list it
        #[arg(value_name = "NAME")]
        name: String,
        /// What the agent may open: PORT/tcp, PORT/udp or FIRST-LAST/udp, comma-separated
        #[arg(
            long,
            value_name = "SPEC[,SPEC...]",
            value_delimiter = ',',
            required = true
        )]
        ports: Vec<String>,
        /// How long the invite lasts
        #[arg(long, value_name = "TIME", default_value = "1h", value_parser = parse_duration)]
        expires: Duration,
        /// The name or address the agent reaches this relay by (default: listen's address,
        /// else this machine's outward address)
        #[arg(long, value_name = "HOST")]
        host: Option<String>,
        #[command(flatten)]
        running: Running,
    },
    /// List the pending invites, or revoke one
    Invites {
        /// Revoke the invite with this id
        #[arg(long, value_name = "ID")]
        revoke: Option<String>,
        #[command(flatten)]
        running: Running,
        /// Print JSON, for scripts
        #[arg(long)]
        json: bool,
    },
    /// Show the running relay's agents and forwards, and what they carried
    Status {
        #[command(flatten)]
        running: Running,
        /// Print JSON, for scripts
        #[arg(long)]
        json: bool,
    },
}

/// Where the running relay answers: the status socket its config names, or the one given.
#[derive(clap::Args)]
struct Running {
    #[arg(short, long, value_name = "FILE", default_value = DEFAULT_CONFIG)]
    config: PathBuf,
    /// The status socket, instead of the config's status_socket
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
}

impl Running {
    fn socket(self) -> PathBuf {
        common::status_socket_path(self.socket, &self.config, RELAY_STATUS_SOCKET)
    }
}

/// Parses the command line and runs the command; the whole of `main`.
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(error) => {
            let _ = error.print();
            return if error.use_stderr() {
                usage_error()
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    match cli.command {
        Command::Init { dir, listen } => init(&dir, listen),
        Command::Fingerprint { config } => match load(&config, None) {
            Ok((_, identity)) => {
                println!("{}", identity.fingerprint());
                ExitCode::SUCCESS
            }
            Err(code) => code,
        },
        Command::Check { config } => match load(&config, None) {
            Ok((config_ok, _)) => {
                println!(
                    "{}: ok ({})",
                    config.display(),
                    common::count(config_ok.agents.len(), "agent")
                );
                ExitCode::SUCCESS
            }
            Err(code) => code,
        },
        Command::Status { running, json } => {
            common::print_status(&running.socket(), json, RelayStatus::render)
        }
        Command::Invite {
            name,
            ports,
            expires,
            host,
            running,
        } => {
            let config = running.config.clone();
            crate::enroll::invite(&config, &running.socket(), &name, &ports, expires, host)
        }
        Command::Invites {
            revoke,
            running,
            json,
        } => crate::enroll::invites(&running.socket(), revoke.as_deref(), json),
        Command::Run { config: file, key } => {
            let Ok((config, identity)) = load(&file, key.as_deref()) else {
                return usage_error();
            };
            common::init_logging(cli.verbose);
            // What the previous process handed over through systemd, before anything else
            // opens a descriptor.
            let passed = fdstore::take_passed();
            run(file, config, identity, passed)
        }
    }
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text).map_err(|e| format!("{e} (such as 1h, 30m or 2d)"))
}

pub(crate) fn load(file: &Path, key: Option<&Path>) -> Result<(RelayConfig, Identity), ExitCode> {
    common::load_config_and_key(file, RelayConfig::load, |c| &mut c.key, key)
}

fn run(
    file: PathBuf,
    config: RelayConfig,
    identity: Identity,
    passed: Vec<(String, OwnedFd)>,
) -> ExitCode {
    common::run_until_signal(|shutdown| async move {
        let (status_socket, metrics) = (config.status_socket.clone(), config.metrics);
        let key = config.key.clone();
        // Every visitor connection holds a descriptor: as many as the system lets us have, and
        // visitors capped below that.
        let limits = Limits::default().within_open_files(common::raise_open_files_limit());
        match Relay::take_over(config, &identity, limits, passed) {
            Ok(relay) => {
                let control = relay.control();
                tokio::spawn(restart_on_sigusr2(control.clone(), shutdown.clone()));
                let metrics = metrics.map(|at| (at, crate::metrics::registry(control.clone())));
                let reload = {
                    let (control, key) = (control.clone(), key.clone());
                    move |mut config: RelayConfig| {
                        // The key in use came from the command line, or from the config.
                        config.key = key.clone();
                        control.reload(config).log();
                    }
                };
                let invites = {
                    let (control, file) = (control.clone(), file.clone());
                    let reload = move || {
                        let mut config = RelayConfig::load(&file).map_err(|e| e.to_string())?;
                        config.key = key.clone();
                        control.reload(config).log();
                        Ok(())
                    };
                    crate::invites::handler(relay.shared(), Arc::new(reload))
                };
                let status = move || control.status();
                let operations = common::start_operations(
                    file,
                    RelayConfig::load,
                    reload,
                    &status_socket,
                    status,
                    Some(invites),
                    metrics,
                    &shutdown,
                );
                if let Err(code) = operations.await {
                    return code;
                }
                // Ready once bound: agents' handshakes queue from then on.
                let summary = relay.summary();
                tokio::spawn(notify::report(summary, |s| s.to_string(), shutdown.clone()));
                relay.run(shutdown).await;
                ExitCode::SUCCESS
            }
            Err(error) => {
                tracing::error!("{error}");
                failure()
            }
        }
    })
}

/// On SIGUSR2, stops the relay as a restart that keeps its connections: the unit's
/// `RestartKillSignal`, so that `systemctl restart` sends it where `systemctl stop` sends
/// SIGTERM.
async fn restart_on_sigusr2(control: Control, shutdown: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut restart = match signal(SignalKind::user_defined2()) {
        Ok(restart) => restart,
        Err(error) => {
            tracing::warn!(%error, "cannot listen for SIGUSR2; a restart drains as a stop does");
            return;
        }
    };
    tokio::select! {
        _ = restart.recv() => {
            tracing::info!("SIGUSR2 received, restarting");
            control.request_restart();
            shutdown.cancel();
        }
        () = shutdown.cancelled() => {}
    }
}

fn init(dir: &Path, listen: SocketAddr) -> ExitCode {
    let identity =
        match common::init_files(dir, "relay.toml", "relay.key", &config_template(listen)) {
            Ok(identity) => identity,
            Err(message) => {
                eprintln!("tether-relay init: {message}");
                return failure();
            }
        };
    let (config_path, key_path) = (dir.join("relay.toml"), dir.join("relay.key"));
    let fingerprint = identity.fingerprint();
    // The address agents reach: the one given, unless it is "every address".
    let relay = if listen.ip().is_unspecified() {
        format!("RELAY_HOST:{}", listen.port())
    } else {
        listen.to_string()
    };
    println!(
        "Wrote {} and {}.",
        config_path.display(),
        key_path.display()
    );
    println!("Relay fingerprint: {fingerprint}");
    println!();
    println!("Start the relay, then add an agent with one line to run at home:");
    println!("  tether-relay invite NAME --ports 2222/tcp");
    println!();
    println!("Or by hand: on the home machine, run");
    println!(
        "  tether-agent init --dir /etc/tether --relay {relay} --relay-fingerprint {fingerprint}"
    );
    if listen.ip().is_unspecified() {
        println!("with RELAY_HOST this relay's public name or address.");
    }
    println!(
        "Then paste the [[agent]] block it prints into {}.",
        config_path.display()
    );
    println!();
    println!(
        "Firewall: open {port}/udp and {port}/tcp (agents connect there: over TCP when UDP",
        port = listen.port()
    );
    println!("does not pass), and the public ports each agent is allowed in relay.toml (such as");
    println!("2222/tcp for ssh, 60000-60010/udp for mosh).");
    ExitCode::SUCCESS
}

fn config_template(listen: SocketAddr) -> String {
    format!(
        r#"# tether relay
listen = "{listen}"        # UDP, where agents connect
listen_tcp = "{listen}"    # TCP, where agents connect when UDP does not pass; "off" for none
key = "relay.key"
# public_bind = "0.0.0.0"      # where public ports are opened; default: every address, IPv4 and IPv6
# tcp_keepalive = "30s"        # probes on visitor TCP connections, keeps their NATs open; "off" for none
# resume_window = "5m"         # how long visitors of a lost session are held for the agent; "off" for none
# status_socket = "/run/tether-relay/status.sock"   # where `tether-relay status` asks
# metrics = 9560               # Prometheus metrics on 127.0.0.1:9560; "IP:PORT" for another address

# One block per agent: `tether-relay invite NAME --ports 2222/tcp` adds one when the agent
# joins, or paste the one `tether-agent init` prints.
# [[agent]]
# name = "dorm"                             # used in logs and status
# fingerprint = "SHA256:..."                # printed by `tether-agent fingerprint`
# ports = ["2222/tcp", "60000-60010/udp"]   # what this agent may open, nothing else
"#
    )
}
