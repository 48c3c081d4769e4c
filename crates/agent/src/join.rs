//! `tether-agent join LINE`: the agent's side of enrollment (see
//! [`tether_common::trust::invite`]). It makes a key, reaches the relay the line names on
//! either path, pinning the key the line names, proves the invite's secret over the mutual-TLS
//! session, and once the relay lists it, writes agent.toml with one forward per port the relay
//! allows. Nothing is left behind when a join fails: the key is written under a temporary name
//! and renamed only after the relay said yes.

use std::fs;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use tether_common::config::{AgentConfig, HostPort};
use tether_common::net::ports::{PortSpec, Proto};
use tether_common::service::cli::{failure, usage_error};
use tether_common::transport::choose::Chooser;
use tether_common::trust::identity::Identity;
use tether_common::trust::invite::{
    JoinAnswer, JoinLine, JoinRequest, JOIN_VERSION, MAX_JOIN_MESSAGE,
};
use tether_common::trust::tls;
use tether_common::wire::text::printable;

use crate::client::{Agent, ConnectError};

/// How long the relay may take to answer a join: it lists the agent in relay.toml first.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(45);

/// Why a join failed, in words for the person who ran it.
#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    #[error(
        "the relay at {address} refused the handshake: it has no invite pending (the line \
         expired, was used or revoked, or the relay restarted since); ask for a new line with \
         `tether-relay invite`"
    )]
    NoInvite { address: std::net::SocketAddr },
    #[error(
        "the relay at {address} shows key {got}, but the join line names {expected}: the line \
         was made by another relay, or something between here and there is not the relay"
    )]
    WrongRelay {
        address: std::net::SocketAddr,
        expected: tether_common::trust::identity::Fingerprint,
        got: tether_common::trust::identity::Fingerprint,
    },
    #[error("{0}")]
    Connect(ConnectError),
    #[error("the relay refused the join: {0}")]
    Refused(String),
    #[error("the join session failed: {0}")]
    Session(String),
}

impl From<ConnectError> for JoinError {
    fn from(error: ConnectError) -> Self {
        match error {
            ConnectError::KeyRefused { address, .. } => JoinError::NoInvite { address },
            ConnectError::WrongRelay {
                address,
                expected,
                got,
            } => JoinError::WrongRelay {
                address,
                expected,
                got,
            },
            ConnectError::Neither { quic, tcp } => match (*quic, *tcp) {
                // The relay answered on one path: that answer says more than the silence.
                (e @ (ConnectError::KeyRefused { .. } | ConnectError::WrongRelay { .. }), _)
                | (_, e @ (ConnectError::KeyRefused { .. } | ConnectError::WrongRelay { .. })) => {
                    e.into()
                }
                (quic, tcp) => JoinError::Connect(ConnectError::Neither {
                    quic: Box::new(quic),
                    tcp: Box::new(tcp),
                }),
            },
            error => JoinError::Connect(error),
        }
    }
}

/// Joins the relay of `config` with `line`'s secret, as `identity`; returns the agent's name
/// and the ports the relay allows it.
pub async fn join(
    config: AgentConfig,
    identity: &Identity,
    line: &JoinLine,
) -> Result<(String, Vec<String>), JoinError> {
    let chooser = Chooser::new(config.transport);
    let agent = Agent::speaking(config, identity, tls::ALPN_JOIN)
        .map_err(|e| JoinError::Session(e.to_string()))?;
    let connected = agent.connect(&mut None, None, &chooser).await?;
    let conn = connected.conn;
    let exchange = async {
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
        let request = JoinRequest {
            version: JOIN_VERSION,
            secret: line.secret.to_string(),
        };
        let bytes = serde_json::to_vec(&request).map_err(|e| e.to_string())?;
        send.write_all(&bytes).await.map_err(|e| e.to_string())?;
        send.finish().map_err(|e| e.to_string())?;
        let answer = recv
            .read_to_end(MAX_JOIN_MESSAGE)
            .await
            .map_err(|e| e.to_string())?;
        serde_json::from_slice::<JoinAnswer>(&answer)
            .map_err(|_| "the relay's answer is not one".to_string())
    };
    let answer = tokio::time::timeout(ANSWER_TIMEOUT, exchange).await;
    let result = explain(&conn, answer);
    conn.close(0u32.into(), b"joined");
    let _ = tokio::time::timeout(Duration::from_secs(1), connected.endpoint.wait_idle()).await;
    result
}

/// What the exchange on `conn` came to.
fn explain(
    conn: &quinn::Connection,
    answer: Result<Result<JoinAnswer, String>, tokio::time::error::Elapsed>,
) -> Result<(String, Vec<String>), JoinError> {
    match answer {
        Err(_) => Err(JoinError::Session(format!(
            "no answer from the relay within {ANSWER_TIMEOUT:?}"
        ))),
        // TLS 1.3 lets the client finish first: a relay with no invite pending refuses the key
        // after, and the session ends with its alert.
        Ok(Err(_)) if conn.close_reason().is_some_and(|e| refused_key(&e)) => {
            Err(JoinError::NoInvite {
                address: conn.remote_address(),
            })
        }
        Ok(Err(error)) => Err(JoinError::Session(printable(&error))),
        Ok(Ok(JoinAnswer::Joined { name, ports })) => Ok((name, ports)),
        Ok(Ok(JoinAnswer::Refused { message, .. })) => Err(JoinError::Refused(printable(&message))),
    }
}

/// Whether a session ended because the relay refused this side's key.
fn refused_key(error: &quinn::ConnectionError) -> bool {
    match error {
        quinn::ConnectionError::ConnectionClosed(close) => {
            u64::from(close.error_code) == tls::REFUSED_KEY_ERROR_CODE
        }
        error => tls::is_unlisted_key(error),
    }
}

/// `tether-agent join LINE --dir DIR`.
pub fn main(line: &str, dir: &Path) -> ExitCode {
    let line: JoinLine = match line.parse() {
        Ok(line) => line,
        Err(error) => {
            eprintln!("tether-agent join: {error}");
            return usage_error();
        }
    };
    let (config_path, key_path) = (dir.join("agent.toml"), dir.join("agent.key"));
    if let Some(path) = [&config_path, &key_path].into_iter().find(|p| p.exists()) {
        eprintln!(
            "tether-agent join: {} already exists; join never overwrites (this machine has an \
             agent already: remove its files, or join with --dir elsewhere)",
            path.display()
        );
        return failure();
    }
    let header = config_header(&line);
    let config = match AgentConfig::from_toml(&header, &config_path) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("tether-agent join: {error}");
            return usage_error();
        }
    };
    if let Err(error) = fs::create_dir_all(dir) {
        eprintln!("tether-agent join: {}: {error}", dir.display());
        return failure();
    }
    // Under a name of its own until the relay lists it; one left by a join that was killed
    // is replaced.
    let pending_key = dir.join(".agent.key.joining");
    let _ = fs::remove_file(&pending_key);
    let identity = match Identity::generate(&pending_key) {
        Ok(identity) => identity,
        Err(error) => {
            eprintln!("tether-agent join: {error}");
            return failure();
        }
    };
    println!(
        "Joining the relay at {} (key {}) as this agent, key {} ...",
        line.relay,
        line.fingerprint,
        identity.fingerprint()
    );
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let joined = runtime.block_on(join(config, &identity, &line));
    let (name, ports) = match joined {
        Ok(joined) => joined,
        Err(error) => {
            let _ = fs::remove_file(&pending_key);
            eprintln!("tether-agent join: {error}");
            return failure();
        }
    };
    let specs: Vec<PortSpec> = ports.iter().filter_map(|p| p.parse().ok()).collect();
    let (forwards, described) = forwards(&specs);
    let written = fs::rename(&pending_key, &key_path).and_then(|()| {
        fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&config_path)
            .and_then(|mut file| {
                std::io::Write::write_all(&mut file, format!("{header}{forwards}").as_bytes())
            })
    });
    if let Err(error) = written {
        eprintln!(
            "tether-agent join: the relay lists this agent as {name}, but writing {} failed: \
             {error}",
            config_path.display()
        );
        return failure();
    }
    println!(
        "Joined as {name}. Wrote {} and {}.",
        config_path.display(),
        key_path.display()
    );
    for line in described {
        println!("  {line}");
    }
    println!();
    println!("Start it: sudo systemctl enable --now tether-agent");
    ExitCode::SUCCESS
}

/// agent.toml up to its forwards: the relay and its key as the line names them.
fn config_header(line: &JoinLine) -> String {
    let relay_tcp = match line.tcp_port {
        Some(port) => format!(
            "relay_tcp = \"{}\"   # the relay's TCP listener, when UDP does not pass\n",
            HostPort {
                host: line.relay.host.clone(),
                port
            }
        ),
        None => String::new(),
    };
    format!(
        r#"# tether agent, joined with an invite
relay = "{}"   # re-resolved on every reconnect
relay_fingerprint = "{}"   # the relay's key, from the join line
{relay_tcp}key = "agent.key"   # this agent's key
# keepalive = "5s"
# idle_timeout = "30s"
# resume_window = "5m"          # how long local connections of a lost session are held; "off" for none
# status_socket = "/run/tether-agent/status.sock"   # where `tether-agent status` asks
# metrics = 9561                 # Prometheus metrics on 127.0.0.1:9561
"#,
        line.relay, line.fingerprint
    )
}

/// One forward per port the relay allows, as `init` makes them: 2222/tcp (or 22) is ssh to
/// port 22 here, a UDP range is mosh on the same range here (what `mosh -p` needs), anything
/// else the same port here. Returns the TOML and a line about each.
fn forwards(ports: &[PortSpec]) -> (String, Vec<String>) {
    let (mut text, mut described) = (String::new(), Vec::new());
    let (mut ssh, mut mosh) = (false, false);
    for spec in ports {
        let (start, end) = (spec.range.start(), spec.range.end());
        let range = spec.range.to_string();
        let (name, local) = match spec.proto {
            Proto::Tcp if start == end && (start == 2222 || start == 22) && !ssh => {
                ssh = true;
                ("ssh".to_string(), "127.0.0.1:22".to_string())
            }
            Proto::Udp if start != end && !mosh => {
                mosh = true;
                ("mosh".to_string(), format!("127.0.0.1:{range}"))
            }
            proto => (format!("{proto}-{range}"), format!("127.0.0.1:{range}")),
        };
        let remote = if start == end {
            range.clone()
        } else {
            format!("\"{range}\"")
        };
        text.push_str(&format!(
            "\n[[forward]]\nname = \"{name}\"\nproto = \"{}\"\nremote = {remote}   # on the relay\nlocal = \"{local}\"\n",
            spec.proto
        ));
        described.push(format!(
            "{name}: {range}/{} on the relay -> {local} here",
            spec.proto
        ));
    }
    (text, described)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_forwards_follow_the_allowed_ports() {
        let ports: Vec<PortSpec> = ["2222/tcp", "60000-60010/udp", "8080/tcp", "5353/udp"]
            .iter()
            .map(|p| p.parse().unwrap())
            .collect();
        let (text, described) = forwards(&ports);
        let line: JoinLine = format!(
            "tether://vps.example.com:4433/?tcp=443#{}.{}",
            "SHA256:47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU",
            tether_common::trust::invite::Secret::generate()
        )
        .parse()
        .unwrap();
        let config = AgentConfig::from_toml(
            &format!("{}{text}", config_header(&line)),
            Path::new("/etc/tether/agent.toml"),
        )
        .unwrap();
        assert_eq!(config.relay.to_string(), "vps.example.com:4433");
        assert_eq!(config.relay_tcp.to_string(), "vps.example.com:443");
        assert_eq!(config.relay_fingerprint, line.fingerprint);
        let forwards: Vec<(String, String, String)> = config
            .forwards
            .iter()
            .map(|f| (f.name.clone(), f.remote.to_string(), f.local.to_string()))
            .collect();
        let expected = [
            ("ssh", "2222", "127.0.0.1:22"),
            ("mosh", "60000-60010", "127.0.0.1:60000-60010"),
            ("tcp-8080", "8080", "127.0.0.1:8080"),
            ("udp-5353", "5353", "127.0.0.1:5353"),
        ];
        let expected: Vec<(String, String, String)> = expected
            .iter()
            .map(|(a, b, c)| (a.to_string(), b.to_string(), c.to_string()))
            .collect();
        assert_eq!(forwards, expected);
        assert_eq!(described.len(), 4);
    }
}
