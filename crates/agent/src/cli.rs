//! `tether-agent`'s command line: init, join, fingerprint, check, run, status.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tether_common::config::{AgentConfig, HostPort, AGENT_STATUS_SOCKET};
use tether_common::service::cli::{self as common, failure, usage_error};
use tether_common::service::notify;
use tether_common::trust::identity::{Fingerprint, Identity};

use crate::status::AgentReport;
use crate::{Agent, AgentStatus};

const DEFAULT_CONFIG: &str = "/etc/tether/agent.toml";

#[derive(Parser)]
#[command(
    name = "tether-agent",
    version,
    about = "The home end of a tether tunnel"
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
    /// Write DIR/agent.toml and a new DIR/agent.key; never overwrites
    Init {
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// The relay's public name or address and UDP port
        #[arg(long, value_name = "HOST:PORT", value_parser = parse_host_port)]
        relay: HostPort,
        /// What `tether-relay fingerprint` prints on the relay
        #[arg(long, value_name = "FP", value_parser = parse_fingerprint)]
        relay_fingerprint: Fingerprint,
        /// This agent's name in the relay's logs and status (default: the host name)
        #[arg(long, value_name = "NAME")]
        name: Option<String>,
    },
    /// Join a relay with the line `tether-relay invite` printed: make the key and agent.toml
    /// in DIR, and be listed by the relay
    Join {
        /// The line, as printed (tether://...)
        #[arg(value_name = "LINE")]
        line: String,
        #[arg(long, value_name = "DIR", default_value = "/etc/tether")]
        dir: PathBuf,
    },
    /// Print this agent's key fingerprint, for the relay's allowlist
    Fingerprint {
        #[arg(short, long, value_name = "FILE", default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Validate the configuration and the key; exit 0, or print every problem and exit 64
    Check {
        #[arg(short, long, value_name = "FILE", default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Keep the tunnel up until SIGINT or SIGTERM; SIGHUP reloads the config's forwards
    Run {
        #[arg(short, long, value_name = "FILE", default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// The key file, instead of the config's `key` (the systemd unit passes its credential)
        #[arg(long, value_name = "FILE")]
        key: Option<PathBuf>,
    },
    /// Show the running agent's session and forwards, and what they carried
    Status {
        #[arg(short, long, value_name = "FILE", default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// The status socket, instead of the config's status_socket
        #[arg(long, value_name = "PATH")]
        socket: Option<PathBuf>,
        /// Print JSON, for scripts
        #[arg(long)]
        json: bool,
    },
}

fn parse_host_port(text: &str) -> Result<HostPort, String> {
    text.parse()
}

fn parse_fingerprint(text: &str) -> Result<Fingerprint, String> {
    text.parse().map_err(|e| format!("{e}"))
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
        Command::Init {
            dir,
            relay,
            relay_fingerprint,
            name,
        } => init(&dir, &relay, relay_fingerprint, name),
        Command::Join { line, dir } => crate::join::main(&line, &dir),
        Command::Fingerprint { config } => match load(&config, None) {
            Ok((_, identity)) => {
                println!("{}", identity.fingerprint());
                ExitCode::SUCCESS
            }
            Err(code) => code,
        },
        Command::Check { config: file } => match load(&file, None) {
            Ok((config, _)) => {
                println!(
                    "{}: ok ({})",
                    file.display(),
                    common::count(config.forwards.len(), "forward")
                );
                for warning in unserved(&config) {
                    eprintln!("warning: {warning}");
                }
                ExitCode::SUCCESS
            }
            Err(code) => code,
        },
        Command::Status {
            config,
            socket,
            json,
        } => {
            let socket = common::status_socket_path(socket, &config, AGENT_STATUS_SOCKET);
            common::print_status(&socket, json, AgentReport::render)
        }
        Command::Run { config: file, key } => {
            let Ok((config, identity)) = load(&file, key.as_deref()) else {
                return usage_error();
            };
            common::init_logging(cli.verbose);
            run(file, config, identity)
        }
    }
}

fn load(file: &Path, key: Option<&Path>) -> Result<(AgentConfig, Identity), ExitCode> {
    common::load_config_and_key(file, AgentConfig::load, |c| &mut c.key, key)
}

fn run(file: PathBuf, config: AgentConfig, identity: Identity) -> ExitCode {
    // Every forwarded connection and UDP flow holds a descriptor here.
    common::raise_open_files_limit();
    common::run_until_signal(|shutdown| async move {
        let (status_socket, metrics) = (config.status_socket.clone(), config.metrics);
        let key = config.key.clone();
        match Agent::new(config, &identity) {
            Ok(agent) => {
                let control = agent.control();
                let metrics = metrics.map(|at| (at, crate::metrics::registry(control.clone())));
                let reload = {
                    let control = control.clone();
                    move |mut config: AgentConfig| {
                        // The key in use came from the command line, or from the config.
                        config.key = key.clone();
                        for key in control.reload(config) {
                            tracing::warn!(
                                "reload: {key} changed; it takes effect at the next restart"
                            );
                        }
                        tracing::info!("reload done");
                    }
                };
                let status = move || control.status();
                let operations = common::start_operations(
                    file,
                    AgentConfig::load,
                    reload,
                    &status_socket,
                    status,
                    None,
                    metrics,
                    &shutdown,
                );
                if let Err(code) = operations.await {
                    return code;
                }
                tokio::spawn(notify::report(
                    agent.status(),
                    AgentStatus::to_string,
                    shutdown.clone(),
                ));
                agent.run(shutdown).await;
                ExitCode::SUCCESS
            }
            Err(error) => {
                tracing::error!("{error}");
                failure()
            }
        }
    })
}

fn init(
    dir: &Path,
    relay: &HostPort,
    relay_fingerprint: Fingerprint,
    name: Option<String>,
) -> ExitCode {
    let name = name.unwrap_or_else(host_name);
    let text = config_template(relay, relay_fingerprint);
    let identity = match common::init_files(dir, "agent.toml", "agent.key", &text) {
        Ok(identity) => identity,
        Err(message) => {
            eprintln!("tether-agent init: {message}");
            return failure();
        }
    };
    let (config_path, key_path) = (dir.join("agent.toml"), dir.join("agent.key"));
    println!(
        "Wrote {} and {}.",
        config_path.display(),
        key_path.display()
    );
    println!("Agent fingerprint: {}", identity.fingerprint());
    println!();
    println!("Paste this into relay.toml on the relay, then `systemctl reload tether-relay`:");
    println!();
    println!("[[agent]]");
    println!("name = \"{name}\"");
    println!("fingerprint = \"{}\"", identity.fingerprint());
    println!("ports = [\"2222/tcp\"]");
    println!();
    println!(
        "Firewall: on the relay, open 2222/tcp to visitors, and {port}/udp and {port}/tcp to this",
        port = relay.port
    );
    println!("agent (TCP for networks that block UDP). This machine needs no open port: the agent");
    println!("only connects out.");
    ExitCode::SUCCESS
}

/// A word about each TCP forward whose local service does not answer now (its first port, if
/// a range): not an error, as the service may start later, but visitors are refused until it
/// does.
fn unserved(config: &AgentConfig) -> Vec<String> {
    use std::net::{TcpStream, ToSocketAddrs};
    let timeout = std::time::Duration::from_secs(1);
    config
        .forwards
        .iter()
        .enumerate()
        .filter(|(_, f)| f.proto == tether_common::net::ports::Proto::Tcp)
        .filter_map(|(i, f)| {
            let port = f.local.ports.start();
            let addresses: Vec<_> = (f.local.host.as_str(), port)
                .to_socket_addrs()
                .map(Iterator::collect)
                .unwrap_or_default();
            let answers = addresses
                .iter()
                .any(|a| TcpStream::connect_timeout(a, timeout).is_ok());
            (!answers).then(|| {
                format!(
                    "forward[{i}] ({}): nothing answers on {}:{port} now; visitors are refused \
                     until a service listens there",
                    f.name, f.local.host
                )
            })
        })
        .collect()
}

/// This machine's name, made fit for a config name; "home" if it has none.
fn host_name() -> String {
    let raw = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let name: String = raw
        .trim()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || "-_.".contains(*c))
        .take(tether_common::wire::protocol::MAX_NAME_LEN)
        .collect();
    if name.is_empty() {
        "home".into()
    } else {
        name
    }
}

fn config_template(relay: &HostPort, relay_fingerprint: Fingerprint) -> String {
    format!(
        r#"# tether agent
relay = "{relay}"   # re-resolved on every reconnect
relay_fingerprint = "{relay_fingerprint}"   # printed by `tether-relay fingerprint`
key = "agent.key"
# keepalive = "5s"
# idle_timeout = "30s"
# resume_window = "5m"          # how long local connections of a lost session are held; "off" for none
# status_socket = "/run/tether-agent/status.sock"   # where `tether-agent status` asks
# metrics = 9561                 # Prometheus metrics on 127.0.0.1:9561

[[forward]]
name = "ssh"
proto = "tcp"
remote = 2222                    # port on the relay
local = "127.0.0.1:22"

# mosh: the relay must allow "60000-60010/udp" for this agent too.
# [[forward]]
# name = "mosh"
# proto = "udp"
# remote = "60000-60010"         # a range maps one to one onto the local range
# local = "127.0.0.1:60000-60010"
"#
    )
}
