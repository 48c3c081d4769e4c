//! `agent.toml`: where the relay is, which key it must show, and what to forward.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;

use super::{
    duration, fingerprint, metrics_address, name, optional_duration, path_in, port_range, read,
    resume_window, split_host, ConfigError, Problems,
};
use crate::net::cidr::Cidr;
use crate::net::ports::{PortRange, Proto};
use crate::transport::choose::Transport;
use crate::transport::proxy::Proxy;
use crate::trust::identity::Fingerprint;
use crate::wire::protocol::MAX_ALLOW_FROM;

pub const DEFAULT_KEEPALIVE: Duration = Duration::from_secs(5);
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a UDP flow may stay silent before it is forgotten: above mosh's 40 s without a
/// reply, after which mosh hops to a new source port anyway.
pub const DEFAULT_FLOW_IDLE: Duration = Duration::from_secs(120);

/// Where `tether-agent status` asks the running agent unless `status_socket` says otherwise:
/// in the runtime folder that the systemd unit makes for it.
pub const AGENT_STATUS_SOCKET: &str = "/run/tether-agent/status.sock";

/// A validated agent configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentConfig {
    /// Resolved again on every connection attempt.
    pub relay: HostPort,
    pub relay_fingerprint: Fingerprint,
    /// Which paths to the relay the agent takes.
    pub transport: Transport,
    /// The relay's TCP listener, for the TCP path: by default `relay`'s host and port.
    pub relay_tcp: HostPort,
    /// An HTTP CONNECT proxy on the way to `relay_tcp`.
    pub proxy: Option<Proxy>,
    pub key: PathBuf,
    /// `None`: no keepalives (only useful to prove that they matter).
    pub keepalive: Option<Duration>,
    pub idle_timeout: Duration,
    /// How long the local connections of a lost session are held for the next session to
    /// resume them; zero holds none.
    pub resume_window: Duration,
    pub forwards: Vec<Forward>,
    /// The Unix socket `status` asks on.
    pub status_socket: PathBuf,
    /// Where Prometheus metrics are served; `None` (the default) serves none.
    pub metrics: Option<SocketAddr>,
}

/// A host name or address and a port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPort {
    pub host: String,
    pub port: u16,
}

impl fmt::Display for HostPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// One exposed service: public ports on the relay, a local address beside the agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forward {
    pub name: String,
    pub proto: Proto,
    pub remote: PortRange,
    pub local: LocalTarget,
    /// UDP only: how long a flow may stay silent, both ways, before both ends forget it.
    pub flow_idle: Duration,
    /// The visitors the relay lets through to this forward; empty lets everyone through.
    pub allow_from: Vec<Cidr>,
}

/// Where a forward's traffic goes beside the agent: a host and a port or a range as long as
/// the forward's remote range.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalTarget {
    pub host: String,
    pub ports: PortRange,
}

impl Forward {
    /// The local host and port for a visitor who reached public `port`.
    pub fn local_for(&self, port: u16) -> Option<(&str, u16)> {
        let local = self.local.ports.map_from(self.remote, port)?;
        Some((&self.local.host, local))
    }
}

impl fmt::Display for LocalTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let host = HostPort {
            host: self.host.clone(),
            port: 0,
        }
        .to_string();
        let host = host.strip_suffix(":0").unwrap_or(&host);
        write!(f, "{host}:{}", self.ports)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAgentConfig {
    relay: String,
    relay_fingerprint: String,
    transport: Option<String>,
    relay_tcp: Option<String>,
    proxy: Option<String>,
    key: Option<String>,
    keepalive: Option<String>,
    idle_timeout: Option<String>,
    resume_window: Option<String>,
    status_socket: Option<String>,
    metrics: Option<toml::Value>,
    #[serde(default)]
    forward: Vec<RawForward>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawForward {
    name: String,
    proto: String,
    remote: RawPorts,
    local: String,
    flow_idle: Option<String>,
    allow_from: Option<Vec<String>>,
}

/// `remote` is written as a number (`2222`) or a string (`"60000-60010"`).
struct RawPorts(String);

impl<'de> Deserialize<'de> for RawPorts {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct PortsVisitor;
        impl Visitor<'_> for PortsVisitor {
            type Value = RawPorts;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a port like 2222 or a range like \"60000-60010\"")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<RawPorts, E> {
                Ok(RawPorts(v.to_string()))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<RawPorts, E> {
                Ok(RawPorts(v.to_owned()))
            }
        }
        deserializer.deserialize_any(PortsVisitor)
    }
}

impl AgentConfig {
    /// Reads and validates `file`; relative paths in it are relative to its folder.
    pub fn load(file: &Path) -> Result<Self, ConfigError> {
        let (raw, dir) = read::<RawAgentConfig>(file)?;
        Self::validate(raw, &dir, file)
    }

    /// Validates the text of an agent.toml kept at `file` (only used to name it and its folder).
    pub fn from_toml(text: &str, file: &Path) -> Result<Self, ConfigError> {
        let raw = super::parse::<RawAgentConfig>(text).map_err(|p| ConfigError {
            file: file.into(),
            problems: vec![p],
        })?;
        let dir = file.parent().map(Path::to_path_buf).unwrap_or_default();
        Self::validate(raw, &dir, file)
    }

    fn validate(raw: RawAgentConfig, dir: &Path, file: &Path) -> Result<Self, ConfigError> {
        let mut p = Problems::default();
        let relay = p.check("relay", host_port(&raw.relay));
        let relay_fingerprint = p.check("relay_fingerprint", fingerprint(&raw.relay_fingerprint));
        let transport = match raw.transport.as_deref() {
            None => Some(Transport::Auto),
            Some(text) => p.check("transport", text.parse()),
        };
        let relay_tcp = match (&raw.relay_tcp, &relay) {
            (Some(text), _) => p.check("relay_tcp", host_port(text)),
            (None, relay) => relay.clone(),
        };
        let proxy = match &raw.proxy {
            None => Some(None),
            Some(text) => p.check("proxy", text.parse::<Proxy>().map(Some)),
        };
        if transport == Some(Transport::Quic) {
            for (key, set) in [
                ("relay_tcp", raw.relay_tcp.is_some()),
                ("proxy", raw.proxy.is_some()),
            ] {
                if set {
                    p.add(
                        key,
                        "is for the TCP path, which transport = \"quic\" never takes",
                    );
                }
            }
        }
        let key = p.check(
            "key",
            path_in(dir, raw.key.as_deref().unwrap_or("agent.key")),
        );
        let keepalive = match &raw.keepalive {
            None => Some(Some(DEFAULT_KEEPALIVE)),
            Some(text) => p.check("keepalive", optional_duration(text)),
        };
        let idle_timeout = match &raw.idle_timeout {
            None => Some(DEFAULT_IDLE_TIMEOUT),
            Some(text) => p.check("idle_timeout", duration(text).and_then(nonzero)),
        };
        if let (Some(Some(keepalive)), Some(idle)) = (keepalive, idle_timeout) {
            if keepalive >= idle {
                p.add(
                    "keepalive",
                    format!(
                        "must be shorter than idle_timeout ({}), got {}",
                        humantime::format_duration(idle),
                        humantime::format_duration(keepalive)
                    ),
                );
            }
        }
        let resume_window = resume_window(raw.resume_window.as_deref(), &mut p);
        let forwards = forwards(&raw.forward, &mut p);
        let status_socket = match raw.status_socket.as_deref() {
            Some(path) => p.check("status_socket", path_in(dir, path)),
            None => Some(super::default_status_socket(AGENT_STATUS_SOCKET)),
        };
        let metrics = match &raw.metrics {
            None => Some(None),
            Some(value) => p.check("metrics", metrics_address(value).map(Some)),
        };
        p.finish(file, || {
            Some(AgentConfig {
                relay: relay?,
                relay_fingerprint: relay_fingerprint?,
                transport: transport?,
                relay_tcp: relay_tcp?,
                proxy: proxy?,
                key: key?,
                keepalive: keepalive?,
                idle_timeout: idle_timeout?,
                resume_window: resume_window?,
                forwards,
                status_socket: status_socket?,
                metrics: metrics?,
            })
        })
    }
}

fn nonzero(d: Duration) -> Result<Duration, String> {
    if d.is_zero() {
        Err("must be longer than zero".into())
    } else {
        Ok(d)
    }
}

fn forwards(raw: &[RawForward], p: &mut Problems) -> Vec<Forward> {
    let mut out: Vec<Forward> = Vec::with_capacity(raw.len());
    for (i, raw) in raw.iter().enumerate() {
        let key = |field: &str| format!("forward[{i}].{field}");
        let name = p.check(key("name"), name(&raw.name));
        let proto = p.check(
            key("proto"),
            raw.proto
                .parse::<Proto>()
                .map_err(|()| format!("expected \"tcp\" or \"udp\", got \"{}\"", raw.proto)),
        );
        let remote = p.check(
            key("remote"),
            port_range(&raw.remote.0).ok_or_else(|| {
                format!(
                    "expected a port like 2222 or a range like \"60000-60010\", got \"{}\"",
                    raw.remote.0
                )
            }),
        );
        let local = p.check(key("local"), local_target(&raw.local));
        let flow_idle = match (&raw.flow_idle, proto) {
            (None, _) => Some(DEFAULT_FLOW_IDLE),
            (Some(text), Some(Proto::Udp)) => {
                p.check(key("flow_idle"), duration(text).and_then(nonzero))
            }
            (Some(_), Some(Proto::Tcp)) => {
                p.add(key("flow_idle"), "only UDP forwards have flows");
                None
            }
            (Some(_), None) => None,
        };
        let allow_from = raw
            .allow_from
            .as_deref()
            .map_or(Some(Vec::new()), |list| allow_from(list, i, p));
        let (Some(name), Some(proto), Some(remote), Some(local), Some(flow_idle), Some(allow_from)) =
            (name, proto, remote, local, flow_idle, allow_from)
        else {
            continue;
        };
        if local.ports.size() != remote.size() {
            p.add(
                key("local"),
                format!(
                    "expected {} local ports to match remote {remote}, got \"{}\"",
                    remote.size(),
                    raw.local
                ),
            );
            continue;
        }
        if let Some(other) = out.iter().find(|f| f.name == name) {
            p.add(
                key("name"),
                format!("\"{}\" is already the name of another forward", other.name),
            );
            continue;
        }
        if let Some(other) = out
            .iter()
            .find(|f| f.proto == proto && f.remote.overlaps(remote))
        {
            p.add(
                key("remote"),
                format!(
                    "{remote}/{proto} overlaps forward \"{}\" ({}/{proto})",
                    other.name, other.remote
                ),
            );
            continue;
        }
        out.push(Forward {
            name,
            proto,
            remote,
            local,
            flow_idle,
            allow_from,
        });
    }
    out
}

/// The blocks of `forward[i].allow_from`; `None` if any is wrong, each wrong one recorded.
fn allow_from(list: &[String], i: usize, p: &mut Problems) -> Option<Vec<Cidr>> {
    if list.is_empty() {
        p.add(
            format!("forward[{i}].allow_from"),
            "an empty list would refuse every visitor; remove allow_from to let everyone in",
        );
        return None;
    }
    if list.len() > MAX_ALLOW_FROM {
        p.add(
            format!("forward[{i}].allow_from"),
            format!("at most {MAX_ALLOW_FROM} blocks, got {}", list.len()),
        );
        return None;
    }
    let mut blocks = Vec::with_capacity(list.len());
    let mut ok = true;
    for (j, text) in list.iter().enumerate() {
        let block = text
            .parse::<Cidr>()
            .map_err(|e| format!("{e}, got \"{text}\""));
        match p.check(format!("forward[{i}].allow_from[{j}]"), block) {
            Some(block) => blocks.push(block),
            None => ok = false,
        }
    }
    ok.then_some(blocks)
}

impl std::str::FromStr for HostPort {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        host_port(text)
    }
}

fn host_port(text: &str) -> Result<HostPort, String> {
    let err = || format!("expected HOST:PORT, got \"{text}\"");
    let (host, port) = split_host(text).ok_or_else(err)?;
    let port = port
        .parse::<u16>()
        .ok()
        .filter(|&p| p != 0)
        .ok_or_else(err)?;
    Ok(HostPort { host, port })
}

fn local_target(text: &str) -> Result<LocalTarget, String> {
    let err = || format!("expected HOST:PORT, got \"{text}\"");
    let (host, ports) = split_host(text).ok_or_else(err)?;
    Ok(LocalTarget {
        host,
        ports: port_range(ports).ok_or_else(err)?,
    })
}
