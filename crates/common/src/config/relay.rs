//! `relay.toml`: where agents connect, and which agents may open which public ports.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::{
    fingerprint, metrics_address, name, optional_duration, path_in, read, resume_window,
    ConfigError, Problems,
};
use crate::net::ports::PortSpec;
use crate::trust::identity::Fingerprint;

pub const DEFAULT_TCP_KEEPALIVE: Duration = Duration::from_secs(30);

/// Where `tether-relay status` asks the running relay unless `status_socket` says otherwise:
/// in the runtime folder that the systemd unit makes for it.
pub const RELAY_STATUS_SOCKET: &str = "/run/tether-relay/status.sock";

/// A validated relay configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayConfig {
    /// The UDP address agents connect to.
    pub listen: SocketAddr,
    /// The TCP address agents connect to when UDP does not pass; `None` listens on none.
    pub listen_tcp: Option<SocketAddr>,
    pub key: PathBuf,
    /// Where public ports are opened; `None` is every address, IPv4 and IPv6.
    pub public_bind: Option<IpAddr>,
    /// Keepalive probes on visitor TCP connections; `None` turns them off.
    pub tcp_keepalive: Option<Duration>,
    /// How long the visitor connections of a lost session are held for the agent's return;
    /// zero holds none.
    pub resume_window: Duration,
    pub agents: Vec<AgentEntry>,
    /// The Unix socket `status` asks on.
    pub status_socket: PathBuf,
    /// Where Prometheus metrics are served; `None` (the default) serves none.
    pub metrics: Option<SocketAddr>,
}

/// An agent the relay serves, known by its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentEntry {
    pub name: String,
    pub fingerprint: Fingerprint,
    /// What this agent may open, and nothing else.
    pub ports: Vec<PortSpec>,
}

impl AgentEntry {
    /// Whether every port of `spec` is in this agent's allowlist for `proto`.
    pub fn allows(&self, spec: PortSpec) -> bool {
        // Walk the range, jumping to the end of whichever allowed entry covers the next port.
        let mut next = u32::from(spec.range.start());
        while next <= u32::from(spec.range.end()) {
            let covering = self
                .ports
                .iter()
                .filter(|a| a.proto == spec.proto)
                .find_map(|a| {
                    let port = u16::try_from(next).ok()?;
                    a.range.contains(port).then_some(a.range.end())
                });
            match covering {
                Some(end) => next = u32::from(end) + 1,
                None => return false,
            }
        }
        true
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRelayConfig {
    listen: String,
    listen_tcp: Option<String>,
    key: Option<String>,
    public_bind: Option<String>,
    tcp_keepalive: Option<String>,
    resume_window: Option<String>,
    status_socket: Option<String>,
    metrics: Option<toml::Value>,
    #[serde(default)]
    agent: Vec<RawAgent>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAgent {
    name: String,
    fingerprint: String,
    ports: Vec<String>,
}

impl RelayConfig {
    /// Reads and validates `file`; relative paths in it are relative to its folder.
    pub fn load(file: &Path) -> Result<Self, ConfigError> {
        let (raw, dir) = read::<RawRelayConfig>(file)?;
        Self::validate(raw, &dir, file)
    }

    /// Validates the text of a relay.toml kept at `file` (only used to name it and its folder).
    pub fn from_toml(text: &str, file: &Path) -> Result<Self, ConfigError> {
        let raw = super::parse::<RawRelayConfig>(text).map_err(|p| ConfigError {
            file: file.into(),
            problems: vec![p],
        })?;
        let dir = file.parent().map(Path::to_path_buf).unwrap_or_default();
        Self::validate(raw, &dir, file)
    }

    fn validate(raw: RawRelayConfig, dir: &Path, file: &Path) -> Result<Self, ConfigError> {
        let mut p = Problems::default();
        let listen = p.check(
            "listen",
            raw.listen
                .parse::<SocketAddr>()
                .map_err(|_| format!("expected IP:PORT, got \"{}\"", raw.listen)),
        );
        // Absent in a relay.toml written before the TCP path: off, so that an upgrade opens no
        // port that nobody asked for.
        let listen_tcp = match raw.listen_tcp.as_deref() {
            None | Some("off") => Some(None),
            Some(text) => p.check(
                "listen_tcp",
                text.parse::<SocketAddr>()
                    .map(Some)
                    .map_err(|_| format!("expected IP:PORT or \"off\", got \"{text}\"")),
            ),
        };
        let key = p.check(
            "key",
            path_in(dir, raw.key.as_deref().unwrap_or("relay.key")),
        );
        let public_bind = match &raw.public_bind {
            None => Some(None),
            Some(text) => p.check(
                "public_bind",
                text.parse::<IpAddr>()
                    .map(Some)
                    .map_err(|_| format!("expected an IP address, got \"{text}\"")),
            ),
        };
        let tcp_keepalive = match &raw.tcp_keepalive {
            None => Some(Some(DEFAULT_TCP_KEEPALIVE)),
            Some(text) => p.check("tcp_keepalive", optional_duration(text)),
        };
        let resume_window = resume_window(raw.resume_window.as_deref(), &mut p);
        let agents = agents(&raw.agent, &mut p);
        let status_socket = match raw.status_socket.as_deref() {
            Some(path) => p.check("status_socket", path_in(dir, path)),
            None => Some(super::default_status_socket(RELAY_STATUS_SOCKET)),
        };
        let metrics = match &raw.metrics {
            None => Some(None),
            Some(value) => p.check("metrics", metrics_address(value).map(Some)),
        };
        p.finish(file, || {
            Some(RelayConfig {
                listen: listen?,
                listen_tcp: listen_tcp?,
                key: key?,
                public_bind: public_bind?,
                tcp_keepalive: tcp_keepalive?,
                resume_window: resume_window?,
                agents,
                status_socket: status_socket?,
                metrics: metrics?,
            })
        })
    }
}

fn agents(raw: &[RawAgent], p: &mut Problems) -> Vec<AgentEntry> {
    let mut out: Vec<AgentEntry> = Vec::with_capacity(raw.len());
    for (i, raw) in raw.iter().enumerate() {
        let key = |field: &str| format!("agent[{i}].{field}");
        let name = p.check(key("name"), name(&raw.name));
        let fingerprint = p.check(key("fingerprint"), fingerprint(&raw.fingerprint));
        let mut ports = Vec::with_capacity(raw.ports.len());
        for (j, text) in raw.ports.iter().enumerate() {
            let spec = text.parse::<PortSpec>().map_err(|_| {
                format!("expected PORT/PROTO or FIRST-LAST/PROTO like \"2222/tcp\", got \"{text}\"")
            });
            ports.extend(p.check(format!("agent[{i}].ports[{j}]"), spec));
        }
        let (Some(name), Some(fingerprint)) = (name, fingerprint) else {
            continue;
        };
        if out.iter().any(|a| a.name == name) {
            p.add(
                key("name"),
                format!("\"{name}\" is already the name of another agent"),
            );
            continue;
        }
        if let Some(other) = out.iter().find(|a| a.fingerprint == fingerprint) {
            p.add(
                key("fingerprint"),
                format!("already the fingerprint of agent \"{}\"", other.name),
            );
            continue;
        }
        out.push(AgentEntry {
            name,
            fingerprint,
            ports,
        });
    }
    out
}
