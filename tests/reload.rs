//! Reloading a running relay or agent (SIGHUP): the new config applies to whom it concerns,
//! everyone else's sessions and visitors go on, and a config that does not load changes nothing.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use tether_tests::lab::binary;
use tether_tests::process::{run, Process};
use tether_tests::status::{agent_status, path, relay_status, relay_status_once};
use tether_tests::udp::{ask, consecutive_udp_ports, udp_echo, visitor};
use tether_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A relay binary and agent binaries of its own, each with a config in one folder.
struct Fleet {
    keys: Keys,
    quic: u16,
    relay_identity: tether_common::trust::identity::Identity,
    relay_config: PathBuf,
}

impl Fleet {
    fn new() -> Self {
        let keys = Keys::new();
        let (relay_identity, _) = keys.identity("relay");
        let (ports, held) = consecutive_udp_ports(1);
        drop(held);
        let relay_config = keys.path().join("relay.toml");
        Self {
            keys,
            quic: ports.start(),
            relay_identity,
            relay_config,
        }
    }

    /// Writes relay.toml with `agents`: (name, fingerprint, allowed TCP port).
    fn write_relay(&self, agents: &[(&str, String, u16)]) {
        let mut text = format!(
            "listen = \"127.0.0.1:{}\"\npublic_bind = \"127.0.0.1\"\nstatus_socket = \"relay.sock\"\n",
            self.quic
        );
        for (name, fingerprint, port) in agents {
            text.push_str(&format!(
                "[[agent]]\nname = \"{name}\"\nfingerprint = \"{fingerprint}\"\nports = [\"{port}/tcp\"]\n"
            ));
        }
        std::fs::write(&self.relay_config, text).unwrap();
    }

    /// A key for agent `name` and its config, forwarding public `port` to `local`; returns the
    /// fingerprint and the config's path.
    fn agent(&self, name: &str, port: u16, local: SocketAddr) -> (String, PathBuf) {
        let (identity, _) = self.keys.identity(name);
        let config = self.keys.path().join(format!("{name}.toml"));
        let text = format!(
            "relay = \"127.0.0.1:{}\"\nrelay_fingerprint = \"{}\"\nkey = \"{name}.key\"\n\
             status_socket = \"{name}.sock\"\n\
             [[forward]]\nname = \"echo\"\nproto = \"tcp\"\nremote = {port}\nlocal = \"{local}\"\n",
            self.quic,
            self.relay_identity.fingerprint(),
        );
        std::fs::write(&config, text).unwrap();
        (identity.fingerprint().to_string(), config)
    }
}

/// Writes `data` on an open visitor connection to an echo service and reads it back.
async fn echo_on(tcp: &mut TcpStream, data: &[u8]) {
    tcp.write_all(data).await.unwrap();
    let mut back = vec![0; data.len()];
    within("the echo", tcp.read_exact(&mut back)).await.unwrap();
    assert_eq!(back, data);
}

#[tokio::test]
async fn a_relay_reload_applies_its_agents_and_leaves_other_sessions_alone() {
    within_for("the whole test", Duration::from_secs(60), async {
        let fleet = Fleet::new();
        let echo = echo_service().await;
        let (home_port, lab_port, new_port) = (free_port(), free_port(), free_port());
        let (home_fp, home_config) = fleet.agent("home", home_port, echo);
        let (lab_fp, lab_config) = fleet.agent("lab", lab_port, echo);
        let (new_fp, new_config) = fleet.agent("new", new_port, echo);
        fleet.write_relay(&[
            ("home", home_fp.clone(), home_port),
            ("lab", lab_fp, lab_port),
        ]);
        let relay_binary = binary("tether-relay");
        let mut relay = Process::spawn(&relay_binary, &["run", "-c", path(&fleet.relay_config)]);
        relay.wait_for_line("relay listening").await;
        let agent_binary = binary("tether-agent");
        let mut home = Process::spawn(&agent_binary, &["run", "-c", path(&home_config)]);
        home.wait_for_line("connected to relay").await;
        let mut lab = Process::spawn(&agent_binary, &["run", "-c", path(&lab_config)]);
        lab.wait_for_line("connected to relay").await;
        let mut visitor = TcpStream::connect(public(home_port)).await.unwrap();
        echo_on(&mut visitor, b"before").await;

        // lab is removed and new is added; home is listed as before.
        fleet.write_relay(&[
            ("home", home_fp.clone(), home_port),
            ("new", new_fp, new_port),
        ]);
        relay.signal("HUP");
        relay
            .wait_for_line("reload: agents removed and disconnected")
            .await;
        relay.wait_for_line("reload done").await;
        lab.wait_for_line("agent not authorized").await;
        assert_port_closed(lab_port).await;
        // lab keeps trying; each attempt is refused and counted, resumed TLS session or not.
        relay_status_once(&fleet.keys.path().join("relay.sock"), |s| {
            s.refused_handshakes.get("agent key not listed") >= Some(&1)
        })
        .await;
        echo_on(&mut visitor, b"after the reload").await;
        let mut new = Process::spawn(&agent_binary, &["run", "-c", path(&new_config)]);
        new.wait_for_line("connected to relay").await;
        let status = relay_status(&fleet.keys.path().join("relay.sock")).await;
        let names: Vec<_> = status.agents.iter().map(|a| a.name.as_str()).collect();
        assert_eq!(names, ["home", "new"]);
        assert!(status.agents.iter().all(|a| a.connected));
        assert_eq!(
            status.agents[0].sessions, 1,
            "home's session was not touched"
        );

        // A config that does not load changes nothing.
        std::fs::write(&fleet.relay_config, "listen = \"nowhere\"\n").unwrap();
        relay.signal("HUP");
        let problem = relay.wait_for_line("relay.toml: listen:").await;
        assert!(problem.contains("expected IP:PORT"), "{problem}");
        relay
            .wait_for_line("reload refused; the running config stays")
            .await;
        echo_on(&mut visitor, b"after a broken reload").await;
        assert_eq!(
            relay_status(&fleet.keys.path().join("relay.sock"))
                .await
                .agents
                .len(),
            2
        );

        // home's allowlist no longer has its port: home asks again, and is refused it.
        fleet.write_relay(&[("home", home_fp, new_port + 1)]);
        relay.signal("HUP");
        relay.wait_for_line("reload: allowlists changed").await;
        home.wait_for_line("relay refused port").await;
        assert_port_closed(home_port).await;
        new.wait_for_line("agent not authorized").await;
    })
    .await;
}

#[tokio::test]
async fn an_agent_reload_changes_its_forwards_and_a_kept_one_keeps_its_visitor() {
    within_for("the whole test", Duration::from_secs(60), async {
        let fleet = Fleet::new();
        let echo = echo_service().await;
        let (kept, dropped, added) = (free_port(), free_port(), free_port());
        let (udp_ports, held) = consecutive_udp_ports(2);
        drop(held);
        let (game, local_udp) = (udp_ports.start(), udp_ports.end());
        udp_echo(std::net::UdpSocket::bind(("127.0.0.1", local_udp)).unwrap());
        let (fingerprint, config) = fleet.agent("home", kept, echo);
        let text = std::fs::read_to_string(&config).unwrap();
        let forward = |name: &str, port: u16| {
            format!("[[forward]]\nname = \"{name}\"\nproto = \"tcp\"\nremote = {port}\nlocal = \"{echo}\"\n")
        };
        std::fs::write(&config, format!("{text}{}", forward("dropped", dropped))).unwrap();
        let relay_text = format!(
            "listen = \"127.0.0.1:{}\"\npublic_bind = \"127.0.0.1\"\nstatus_socket = \"relay.sock\"\n\
             [[agent]]\nname = \"home\"\nfingerprint = \"{fingerprint}\"\n\
             ports = [\"{kept}/tcp\", \"{dropped}/tcp\", \"{added}/tcp\", \"{game}/udp\"]\n",
            fleet.quic
        );
        std::fs::write(&fleet.relay_config, relay_text).unwrap();
        let mut relay = Process::spawn(
            &binary("tether-relay"),
            &["run", "-c", path(&fleet.relay_config)],
        );
        relay.wait_for_line("relay listening").await;
        let mut agent = Process::spawn(&binary("tether-agent"), &["run", "-c", path(&config)]);
        agent.wait_for_line("connected to relay").await;
        let mut visitor = TcpStream::connect(public(kept)).await.unwrap();
        echo_on(&mut visitor, b"before").await;
        assert_eq!(round_trip(public(dropped), b"x").await.unwrap(), b"x");

        // "dropped" goes, "added" and the UDP "game" come, "echo" stays as it was.
        let udp_forward = format!(
            "[[forward]]\nname = \"game\"\nproto = \"udp\"\nremote = {game}\nlocal = \"127.0.0.1:{local_udp}\"\n"
        );
        std::fs::write(
            &config,
            format!("{text}{}{udp_forward}", forward("added", added)),
        )
        .unwrap();
        agent.signal("HUP");
        // The session logs what the relay answered, removals first; "reload done" may come
        // before or after, from the task that read the file.
        agent.wait_for_line(&format!("relay port {game}/udp now reaches")).await;
        assert!(
            agent.log.iter().any(|l| l.contains("forward removed")),
            "{}",
            agent.log.join("\n")
        );
        echo_on(&mut visitor, b"after the reload").await;
        assert_eq!(round_trip(public(added), b"new").await.unwrap(), b"new");
        assert_port_closed(dropped).await;
        let udp_visitor = visitor_socket().await;
        let echoed = ask(&udp_visitor, public(game), b"ping").await;
        assert_eq!(echoed.as_deref(), Some(&b"ping"[..]));
        let status = relay_status(&fleet.keys.path().join("relay.sock")).await;
        let home = &status.agents[0];
        assert_eq!(home.sessions, 1, "the session was kept");
        let names: Vec<_> = home.forwards.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(names, ["echo", "added", "game"]);
        assert!(home.forwards.iter().all(|f| f.state == "open"), "{home:?}");
        let status = agent_status(&fleet.keys.path().join("home.sock")).await;
        assert_eq!(status.forwards[0].traffic.visitors_open, 1);

        // A broken agent.toml changes nothing.
        std::fs::write(&config, format!("{text}[[forward]]\nname = \"bad\"\n")).unwrap();
        agent.signal("HUP");
        agent.wait_for_line("reload refused; the running config stays").await;
        echo_on(&mut visitor, b"after a broken reload").await;
        // status still finds the running agent, though the file on disk does not load.
        let (code, table, stderr) = run(&binary("tether-agent"), &["status", "-c", path(&config)]);
        assert_eq!(code, 0, "{stderr}");
        assert!(table.contains("connected to the relay, 3 forwards"), "{table}");
        assert_eq!(round_trip(public(added), b"still").await.unwrap(), b"still");
    })
    .await;
}

async fn visitor_socket() -> tokio::net::UdpSocket {
    visitor("127.0.0.1").await
}
