//! The tunnels compared, each started in front of the same services: tether's relay and agent,
//! rathole's server and client (Noise and plain TCP), bore's server and client, and no tunnel at
//! all. On loopback, or with the home side (agent, clients) in the lab's home namespace and the
//! VPS side (relay, servers) in this one.

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};

/// How long a tunnel may take to carry its first byte after its processes start.
const READY_WITHIN: Duration = Duration::from_secs(20);

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum System {
    Direct,
    Tether,
    /// tether with its agent on the TCP path (`transport = "tcp"`): QUIC over TLS on TCP.
    TetherTcp,
    RatholeNoise,
    RatholeTcp,
    Bore,
}

impl System {
    pub const ALL: [System; 6] = [
        System::Direct,
        System::Tether,
        System::TetherTcp,
        System::RatholeNoise,
        System::RatholeTcp,
        System::Bore,
    ];

    pub fn name(self) -> &'static str {
        match self {
            System::Direct => "direct",
            System::Tether => "tether",
            System::TetherTcp => "tether (TCP path)",
            System::RatholeNoise => "rathole (Noise)",
            System::RatholeTcp => "rathole (plain TCP)",
            System::Bore => "bore",
        }
    }

    /// Whether it carries UDP: bore does not.
    pub fn carries_udp(self) -> bool {
        self != System::Bore
    }

    /// Whether it has processes of its own to measure.
    pub fn is_tunnel(self) -> bool {
        self != System::Direct
    }
}

/// The programs the comparison runs.
#[derive(Debug, Clone)]
pub struct Tools {
    pub relay: PathBuf,
    pub agent: PathBuf,
    pub rathole: PathBuf,
    pub bore: PathBuf,
    pub iperf3: PathBuf,
}

/// The services behind every tunnel, iperf3's server (TCP and UDP on one port, as iperf3 wants)
/// and a TCP echo service, and where the two sides of a tunnel run.
#[derive(Debug, Clone)]
pub struct Services {
    pub iperf: u16,
    pub echo: u16,
    /// Where the services are reached with no tunnel.
    pub host: Ipv4Addr,
    /// The network namespace the home side runs in, beside the services (which it reaches on
    /// its loopback); none on loopback.
    pub home: Option<String>,
    /// Where the VPS side listens for the home side.
    pub vps: Ipv4Addr,
}

/// A tunnel running in front of the services: its processes, and where each service is
/// reached through it.
pub struct Running {
    pub system: System,
    children: Vec<Child>,
    /// Where the public ports are.
    host: Ipv4Addr,
    iperf: u16,
    echo: u16,
}

impl Running {
    /// The tunnel's processes, server side first.
    pub fn pids(&self) -> Vec<u32> {
        self.children.iter().filter_map(Child::id).collect()
    }

    pub fn echo(&self) -> SocketAddr {
        SocketAddr::from((self.host, self.echo))
    }

    pub fn iperf(&self) -> SocketAddr {
        SocketAddr::from((self.host, self.iperf))
    }

    pub async fn stop(mut self) {
        // Client side first, so that the server sees a clean goodbye where it can.
        for child in self.children.iter_mut().rev() {
            let _ = child.kill().await;
        }
    }
}

/// A port nobody listens on now, for a program that takes a port number rather than port 0.
pub fn free_port() -> Result<u16> {
    Ok(TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?
        .local_addr()?
        .port())
}

/// Starts `system` in front of `services`, its files in `dir`, and returns once a byte went
/// through it to the echo service and back.
pub async fn start(
    system: System,
    tools: &Tools,
    services: &Services,
    dir: &Path,
) -> Result<Running> {
    std::fs::create_dir_all(dir)?;
    let running = match system {
        System::Direct => Running {
            system,
            children: Vec::new(),
            host: services.host,
            iperf: services.iperf,
            echo: services.echo,
        },
        System::Tether => tether(tools, services, dir, false).await?,
        System::TetherTcp => tether(tools, services, dir, true).await?,
        System::RatholeNoise => rathole(tools, services, dir, true).await?,
        System::RatholeTcp => rathole(tools, services, dir, false).await?,
        System::Bore => bore(tools, services, dir).await?,
    };
    wait_ready(running.echo()).await.with_context(|| {
        format!(
            "{} did not carry a byte; see {}",
            system.name(),
            dir.display()
        )
    })?;
    Ok(running)
}

/// Runs a program to its end and returns what it printed.
async fn output(program: &Path, args: &[&str], dir: &Path) -> Result<String> {
    let out = Command::new(program)
        .args(args)
        .current_dir(dir)
        .output()
        .await
        .with_context(|| format!("running {}", program.display()))?;
    if !out.status.success() {
        bail!(
            "{} {args:?} failed: {}",
            program.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Starts a program in the background, its output in `dir/log`; in the network namespace `ns`
/// if there is one.
fn spawn(program: &Path, args: &[&str], dir: &Path, log: &str, ns: Option<&str>) -> Result<Child> {
    let log = std::fs::File::create(dir.join(log))?;
    let mut command = match ns {
        Some(ns) => {
            let mut command = Command::new("ip");
            command.args(["netns", "exec", ns]).arg(program);
            command
        }
        None => Command::new(program),
    };
    command
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", program.display()))
}

/// The value after `label` on a line of `text`, as `tether-* init` print them.
fn after<'a>(text: &'a str, label: &str) -> Result<&'a str> {
    text.lines()
        .find_map(|line| line.trim().strip_prefix(label))
        .map(str::trim)
        .with_context(|| format!("no {label:?} in {text:?}"))
}

/// tether; with `tcp`, its agent on the TCP path alone.
async fn tether(tools: &Tools, services: &Services, dir: &Path, tcp: bool) -> Result<Running> {
    let listen = SocketAddr::from((services.vps, free_port()?)).to_string();
    let (iperf, echo) = (free_port()?, free_port()?);
    let dir_arg = |side: &str| dir.join(side).display().to_string();
    // `init` makes the keys and prints the fingerprints; the configs are then written whole.
    let relay_init = output(
        &tools.relay,
        &["init", "--dir", &dir_arg("r"), "--listen", &listen],
        dir,
    )
    .await?;
    let relay_fingerprint = after(&relay_init, "Relay fingerprint:")?;
    let agent_init = output(
        &tools.agent,
        &[
            "init",
            "--dir",
            &dir_arg("a"),
            "--relay",
            &listen,
            "--relay-fingerprint",
            relay_fingerprint,
            "--name",
            "bench",
        ],
        dir,
    )
    .await?;
    let agent_fingerprint = after(&agent_init, "Agent fingerprint:")?;
    std::fs::write(
        dir.join("r/relay.toml"),
        format!(
            r#"listen = "{listen}"
listen_tcp = "{listen}"
key = "relay.key"
public_bind = "127.0.0.1"

[[agent]]
name = "bench"
fingerprint = "{agent_fingerprint}"
ports = ["{iperf}/tcp", "{iperf}/udp", "{echo}/tcp"]
"#
        ),
    )?;
    let forward = |name: &str, proto: &str, remote: u16, local: u16| {
        format!(
            "\n[[forward]]\nname = \"{name}\"\nproto = \"{proto}\"\nremote = {remote}\nlocal = \"127.0.0.1:{local}\"\n"
        )
    };
    std::fs::write(
        dir.join("a/agent.toml"),
        format!(
            "relay = \"{listen}\"\nrelay_fingerprint = \"{relay_fingerprint}\"\nkey = \"agent.key\"\ntransport = \"{}\"\n{}{}{}",
            if tcp { "tcp" } else { "quic" },
            forward("iperf", "tcp", iperf, services.iperf),
            forward("iperf-udp", "udp", iperf, services.iperf),
            forward("echo", "tcp", echo, services.echo),
        ),
    )?;
    let relay = spawn(
        &tools.relay,
        &["run", "-c", "relay.toml"],
        &dir.join("r"),
        "relay.log",
        None,
    )?;
    let agent = spawn(
        &tools.agent,
        &["run", "-c", "agent.toml"],
        &dir.join("a"),
        "agent.log",
        services.home.as_deref(),
    )?;
    Ok(Running {
        system: if tcp {
            System::TetherTcp
        } else {
            System::Tether
        },
        children: vec![relay, agent],
        host: Ipv4Addr::LOCALHOST,
        iperf,
        echo,
    })
}

async fn rathole(tools: &Tools, services: &Services, dir: &Path, noise: bool) -> Result<Running> {
    let vps = services.vps;
    let control = free_port()?;
    let (iperf, echo) = (free_port()?, free_port()?);
    let (server_transport, client_transport) = if noise {
        let keys = output(&tools.rathole, &["--genkey"], dir).await?;
        let private = after_line(&keys, "Private Key:")?;
        let public = after_line(&keys, "Public Key:")?;
        (
            format!(
                "type = \"noise\"\n[server.transport.noise]\nlocal_private_key = \"{private}\"\n"
            ),
            format!(
                "type = \"noise\"\n[client.transport.noise]\nremote_public_key = \"{public}\"\n"
            ),
        )
    } else {
        ("type = \"tcp\"\n".to_owned(), "type = \"tcp\"\n".to_owned())
    };
    let services_of = |side: &str, address: &dyn Fn(u16, u16) -> String| {
        [
            ("iperf", "tcp", iperf, services.iperf),
            ("iperf_udp", "udp", iperf, services.iperf),
            ("echo", "tcp", echo, services.echo),
        ]
        .iter()
        .map(|(name, proto, public, local)| {
            format!(
                "\n[{side}.services.{name}]\ntype = \"{proto}\"\ntoken = \"bench-token\"\n{}\n",
                address(*public, *local)
            )
        })
        .collect::<String>()
    };
    std::fs::write(
        dir.join("server.toml"),
        format!(
            "[server]\nbind_addr = \"{vps}:{control}\"\n[server.transport]\n{server_transport}{}",
            services_of("server", &|public, _| format!(
                "bind_addr = \"127.0.0.1:{public}\""
            ))
        ),
    )?;
    std::fs::write(
        dir.join("client.toml"),
        format!(
            "[client]\nremote_addr = \"{vps}:{control}\"\n[client.transport]\n{client_transport}{}",
            services_of("client", &|_, local| format!(
                "local_addr = \"127.0.0.1:{local}\""
            ))
        ),
    )?;
    let server = spawn(
        &tools.rathole,
        &["--server", "server.toml"],
        dir,
        "server.log",
        None,
    )?;
    let client = spawn(
        &tools.rathole,
        &["--client", "client.toml"],
        dir,
        "client.log",
        services.home.as_deref(),
    )?;
    let system = if noise {
        System::RatholeNoise
    } else {
        System::RatholeTcp
    };
    Ok(Running {
        system,
        children: vec![server, client],
        host: Ipv4Addr::LOCALHOST,
        iperf,
        echo,
    })
}

/// The line after the one that reads `label`, as `rathole --genkey` prints its keys.
fn after_line<'a>(text: &'a str, label: &str) -> Result<&'a str> {
    let mut lines = text.lines().map(str::trim);
    lines
        .by_ref()
        .find(|line| *line == label)
        .with_context(|| format!("no {label:?} in {text:?}"))?;
    lines.next().context("a key label with no key")
}

async fn bore(tools: &Tools, services: &Services, dir: &Path) -> Result<Running> {
    // bore's server listens for its clients on a fixed port, 7835, and gives out public ports
    // from the range it is told, on the same address.
    let (iperf, echo) = (free_port()?, free_port()?);
    let vps = services.vps.to_string();
    let (low, high) = (iperf.min(echo).to_string(), iperf.max(echo).to_string());
    let server = spawn(
        &tools.bore,
        &[
            "server",
            "--bind-addr",
            &vps,
            "--min-port",
            &low,
            "--max-port",
            &high,
        ],
        dir,
        "server.log",
        None,
    )?;
    wait_listening(SocketAddr::from((services.vps, 7835))).await?;
    let mut children = vec![server];
    for (public, local, log) in [
        (iperf, services.iperf, "iperf.log"),
        (echo, services.echo, "echo.log"),
    ] {
        children.push(spawn(
            &tools.bore,
            &[
                "local",
                &local.to_string(),
                "--to",
                &vps,
                "--port",
                &public.to_string(),
            ],
            dir,
            log,
            services.home.as_deref(),
        )?);
    }
    Ok(Running {
        system: System::Bore,
        children,
        host: services.vps,
        iperf,
        echo,
    })
}

/// Waits until something accepts connections at `address`. Another program's readiness has no
/// event to await here, so this asks again every 20 ms, within [`READY_WITHIN`].
async fn wait_listening(address: SocketAddr) -> Result<()> {
    let start = Instant::now();
    while TcpStream::connect(address).await.is_err() {
        if start.elapsed() > READY_WITHIN {
            bail!("nothing listens at {address}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// Waits until a byte sent to the echo service at `address` comes back: the whole path works.
async fn wait_ready(address: SocketAddr) -> Result<()> {
    let start = Instant::now();
    loop {
        let attempt = async {
            let mut tcp = TcpStream::connect(address).await?;
            tcp.write_all(b"?").await?;
            let mut byte = [0u8; 1];
            tcp.read_exact(&mut byte).await?;
            anyhow::Ok(())
        };
        match tokio::time::timeout(Duration::from_secs(1), attempt).await {
            Ok(Ok(())) => return Ok(()),
            _ if start.elapsed() > READY_WITHIN => bail!("no echo through {address}"),
            _ => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}
