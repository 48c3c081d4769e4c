//! A complete tether on loopback with nothing set up beforehand: fresh keys and configs in a
//! temporary folder, a relay, an agent, and a small local web service forwarded through them.
//!
//! Run it with `cargo run --example demo`, then follow what it prints.

use std::net::SocketAddr;
use std::path::Path;

use tether_agent::Agent;
use tether_common::config::{AgentConfig, RelayConfig};
use tether_common::trust::identity::Identity;
use tether_relay::Relay;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tether_common::service::cli::init_logging(0);
    let dir = tempfile::Builder::new().prefix("tether-demo-").tempdir()?;
    let service = web_service().await?;
    let public_port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();

    // The relay, as `tether-relay init` would set it up, on loopback.
    let relay_identity = Identity::generate(&dir.path().join("relay.key"))?;
    let agent_identity = Identity::generate(&dir.path().join("agent.key"))?;
    let relay_toml = write(
        dir.path(),
        "relay.toml",
        &format!(
            "listen = \"127.0.0.1:0\"\nkey = \"relay.key\"\npublic_bind = \"127.0.0.1\"\n\n\
             [[agent]]\nname = \"demo\"\nfingerprint = \"{}\"\nports = [\"{public_port}/tcp\"]\n",
            agent_identity.fingerprint()
        ),
    )?;
    let relay = Relay::bind(RelayConfig::load(&relay_toml)?, &relay_identity)?;
    let relay_addr = relay.local_addr()?;

    // The agent, forwarding the relay's public port to the local web service.
    let agent_toml = write(
        dir.path(),
        "agent.toml",
        &format!(
            "relay = \"{relay_addr}\"\nrelay_fingerprint = \"{}\"\nkey = \"agent.key\"\n\n\
             [[forward]]\nname = \"web\"\nproto = \"tcp\"\nremote = {public_port}\nlocal = \"{service}\"\n",
            relay_identity.fingerprint()
        ),
    )?;
    let agent = Agent::new(AgentConfig::load(&agent_toml)?, &agent_identity)?;
    let mut status = agent.status();

    let stop = CancellationToken::new();
    let relay_task = tokio::spawn(relay.run(stop.clone()));
    let agent_task = tokio::spawn(agent.run(stop.clone()));
    status.wait_for(|s| s.session().is_some()).await?;

    println!();
    println!(
        "tether demo: a relay and an agent on loopback, keys and configs in {}",
        dir.path().display()
    );
    println!(
        "  relay   {relay_addr}/udp   fingerprint {}",
        relay_identity.fingerprint()
    );
    println!("  agent   fingerprint {}", agent_identity.fingerprint());
    println!("  forward web: relay port 127.0.0.1:{public_port}/tcp -> local service {service}");
    println!();
    println!("In another terminal, reach the local service through the relay:");
    println!("  curl http://127.0.0.1:{public_port}/");
    println!();
    println!("Press Ctrl-C to stop.");

    tokio::signal::ctrl_c().await?;
    stop.cancel();
    agent_task.await?;
    relay_task.await?;
    Ok(())
}

fn write(dir: &Path, name: &str, text: &str) -> std::io::Result<std::path::PathBuf> {
    let path = dir.join(name);
    std::fs::write(&path, text)?;
    Ok(path)
}

/// A tiny web service that greets whoever reaches it, standing in for ssh or anything else.
async fn web_service() -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut request = [0u8; 1024];
                let _ = tcp.read(&mut request).await;
                let body = "Hello through tether!\n";
                let response = format!(
                    "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                );
                let _ = tcp.write_all(response.as_bytes()).await;
            });
        }
    });
    Ok(addr)
}
