//! Configuration files: TOML read into raw serde structs (unknown keys refused), then validated
//! once into typed configs. Every problem names the file, the key path and what was expected,
//! e.g. `agent.toml: forward[1].local: expected HOST:PORT, got "22"`.

mod agent;
mod relay;

use std::ffi::OsString;
use std::fmt;
use std::net::Ipv6Addr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;

use crate::net::ports::PortRange;
use crate::trust::identity::Fingerprint;

pub use crate::transport::choose::Transport;
pub use agent::{
    AgentConfig, Forward, HostPort, LocalTarget, AGENT_STATUS_SOCKET, DEFAULT_FLOW_IDLE,
};
pub use relay::{AgentEntry, RelayConfig, RELAY_STATUS_SOCKET};

/// Where a service's status socket is unless `status_socket` says otherwise: `system` (such as
/// [`RELAY_STATUS_SOCKET`]), in the runtime folder systemd makes for the unit and `run` makes
/// when it is missing; but for a user other than root who has a runtime folder of their own
/// (`$XDG_RUNTIME_DIR`, as in a login session), the same folder name in that one, where the
/// user may make it. `status` run by the same user finds the socket `run` opened.
pub fn default_status_socket(system: &str) -> PathBuf {
    status_socket_for(
        system,
        rustix::process::getuid().is_root(),
        std::env::var_os("XDG_RUNTIME_DIR"),
    )
}

fn status_socket_for(system: &str, root: bool, runtime_dir: Option<OsString>) -> PathBuf {
    let system = Path::new(system);
    let folder = system.parent().and_then(Path::file_name);
    match (runtime_dir, folder, system.file_name()) {
        (Some(dir), Some(folder), Some(file)) if !root && Path::new(&dir).is_absolute() => {
            Path::new(&dir).join(folder).join(file)
        }
        _ => system.to_owned(),
    }
}

/// Everything wrong with one config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: PathBuf,
    pub problems: Vec<Problem>,
}

/// One thing wrong, at one key path (empty for the file as a whole).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub key: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, problem) in self.problems.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{}: ", self.file.display())?;
            if !problem.key.is_empty() {
                write!(f, "{}: ", problem.key)?;
            }
            f.write_str(&problem.message)?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

impl ConfigError {
    fn one(file: &Path, key: &str, message: String) -> Self {
        Self {
            file: file.into(),
            problems: vec![Problem {
                key: key.into(),
                message,
            }],
        }
    }
}

/// Reads `file` and deserializes it into `T`, the first step of loading a config.
fn read<T: DeserializeOwned>(file: &Path) -> Result<(T, PathBuf), ConfigError> {
    let text = std::fs::read_to_string(file)
        .map_err(|e| ConfigError::one(file, "", format!("cannot read: {e}")))?;
    let raw = parse(&text).map_err(|p| ConfigError {
        file: file.into(),
        problems: vec![p],
    })?;
    let dir = file.parent().map(Path::to_path_buf).unwrap_or_default();
    Ok((raw, dir))
}

fn parse<T: DeserializeOwned>(text: &str) -> Result<T, Problem> {
    serde_path_to_error::deserialize(toml::Deserializer::new(text)).map_err(|e| {
        let key = e.path().to_string();
        let inner = e.into_inner();
        let mut message = inner.message().trim().to_string();
        if key == "." && !message.starts_with("missing field") {
            // Syntax errors have no key; say where they are instead.
            if let Some(span) = inner.span() {
                let line = text[..span.start.min(text.len())].lines().count().max(1);
                message = format!("line {line}: {message}");
            }
        }
        Problem {
            key: if key == "." { String::new() } else { key },
            message,
        }
    })
}

/// Collects the problems of one file while its raw form is checked.
#[derive(Default)]
struct Problems(Vec<Problem>);

impl Problems {
    fn add(&mut self, key: impl Into<String>, message: impl Into<String>) {
        self.0.push(Problem {
            key: key.into(),
            message: message.into(),
        });
    }

    /// The value, or `None` with the problem recorded.
    fn check<T>(&mut self, key: impl Into<String>, value: Result<T, String>) -> Option<T> {
        value.map_err(|message| self.add(key, message)).ok()
    }

    fn finish<T>(self, file: &Path, value: impl FnOnce() -> Option<T>) -> Result<T, ConfigError> {
        match (self.0.is_empty(), value()) {
            (true, Some(value)) => Ok(value),
            _ => Err(ConfigError {
                file: file.into(),
                problems: self.0,
            }),
        }
    }
}

/// The longest keepalive or idle time the configs accept.
const MAX_DURATION: Duration = Duration::from_secs(24 * 60 * 60);

fn duration(text: &str) -> Result<Duration, String> {
    match humantime::parse_duration(text) {
        Ok(d) if d > MAX_DURATION => Err(format!("must be at most 24h, got \"{text}\"")),
        Ok(d) => Ok(d),
        Err(_) => Err(format!("expected a duration like \"10s\", got \"{text}\"")),
    }
}

/// A duration that `"off"` (or zero) turns off.
fn optional_duration(text: &str) -> Result<Option<Duration>, String> {
    match text {
        "off" => Ok(None),
        _ => duration(text).map(|d| (!d.is_zero()).then_some(d)),
    }
}

/// `resume_window`: a duration, `"off"` or zero for none; five minutes if absent.
fn resume_window(text: Option<&str>, p: &mut Problems) -> Option<Duration> {
    match text {
        None => Some(crate::carry::resume::DEFAULT_RESUME_WINDOW),
        Some(text) => p.check(
            "resume_window",
            optional_duration(text).map(Option::unwrap_or_default),
        ),
    }
}

fn fingerprint(text: &str) -> Result<Fingerprint, String> {
    text.parse().map_err(|e| format!("{e}, got \"{text}\""))
}

/// `metrics`: a port alone (`9560`) is on loopback; an address (`"0.0.0.0:9560"`) is taken as
/// it is.
fn metrics_address(value: &toml::Value) -> Result<std::net::SocketAddr, String> {
    let expected = "expected PORT or \"IP:PORT\" like \"127.0.0.1:9560\"";
    let text = match value {
        toml::Value::Integer(port) => port.to_string(),
        toml::Value::String(text) => text.clone(),
        other => return Err(format!("{expected}, got {other}")),
    };
    match text.parse::<u16>() {
        Ok(0) => Err(format!("{expected}, got {text}")),
        Ok(port) => Ok((std::net::Ipv4Addr::LOCALHOST, port).into()),
        Err(_) => text
            .parse()
            .map_err(|_| format!("{expected}, got \"{text}\"")),
    }
}

fn path_in(dir: &Path, text: &str) -> Result<PathBuf, String> {
    if text.is_empty() {
        return Err("expected a file path, got \"\"".into());
    }
    Ok(dir.join(text))
}

/// Names of agents and forwards: short, and safe to print in logs and status tables.
fn name(text: &str) -> Result<String, String> {
    if crate::wire::protocol::is_valid_name(text) {
        Ok(text.to_owned())
    } else {
        Err(format!(
            "expected 1 to {} letters, digits, '-', '_' or '.', got \"{text}\"",
            crate::wire::protocol::MAX_NAME_LEN
        ))
    }
}

/// Splits `HOST:REST` where HOST may be a bracketed IPv6 address.
fn split_host(text: &str) -> Option<(String, &str)> {
    let (host, rest) = text.rsplit_once(':')?;
    let host = match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        Some(v6) => v6.parse::<Ipv6Addr>().ok()?.to_string(),
        None if host.is_empty() || host.contains([':', '[', ']']) => return None,
        None => host.to_owned(),
    };
    Some((host, rest))
}

fn port_range(text: &str) -> Option<PortRange> {
    text.parse().ok()
}

#[cfg(test)]
mod tests;
