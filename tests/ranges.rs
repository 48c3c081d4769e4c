//! Port ranges mapped one to one, over IPv4 and IPv6.

use std::net::SocketAddr;

use tether_common::config::{Forward, LocalTarget, DEFAULT_FLOW_IDLE};
use tether_common::net::ports::{PortRange, PortSpec, Proto};
use tether_tests::*;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;

#[tokio::test]
async fn a_range_maps_one_to_one_for_ipv4_and_ipv6_visitors() {
    within("the whole test", async {
        // Three local services on consecutive ports, each answering with its own port.
        let local: Vec<_> = consecutive_listeners(3)
            .into_iter()
            .filter(|l| l.local_addr().unwrap().is_ipv4())
            .collect();
        let local_base = local[0].local_addr().unwrap().port();
        for listener in local {
            listener.set_nonblocking(true).unwrap();
            let listener = TcpListener::from_std(listener).unwrap();
            tokio::spawn(async move {
                let port = listener.local_addr().unwrap().port();
                while let Ok((mut tcp, _)) = listener.accept().await {
                    let _ = tcp.write_all(port.to_string().as_bytes()).await;
                }
            });
        }
        // Public ports: a consecutive free range, released for the relay to bind.
        let public_base = consecutive_listeners(3)[0].local_addr().unwrap().port();
        let remote = PortRange::new(public_base, public_base + 2).unwrap();

        let keys = Keys::new();
        let (relay_identity, relay_key) = keys.identity("relay");
        let (agent_identity, agent_key) = keys.identity("agent");
        let mut entry = agent_entry("dorm", agent_identity.fingerprint(), &[]);
        entry.ports.push(PortSpec {
            proto: Proto::Tcp,
            range: remote,
        });
        let mut config = relay_config(relay_key, vec![entry]);
        config.listen = "[::1]:0".parse().unwrap();
        config.public_bind = None; // every address, IPv4 and IPv6
        let relay = start_relay(config, &relay_identity);
        assert!(relay.addr.is_ipv6());

        let forward = Forward {
            name: "range".into(),
            proto: Proto::Tcp,
            remote,
            local: LocalTarget {
                host: "127.0.0.1".into(),
                ports: PortRange::new(local_base, local_base + 2).unwrap(),
            },
            flow_idle: DEFAULT_FLOW_IDLE,
            allow_from: vec![],
        };
        let config = agent_config(agent_key, relay.addr, relay.fingerprint, vec![forward]);
        let mut agent = start_agent(config, &agent_identity);
        agent.connected().await;

        for offset in 0..3 {
            for ip in ["127.0.0.1", "::1"] {
                let visitor = SocketAddr::new(ip.parse().unwrap(), public_base + offset);
                let answer = round_trip(visitor, b"").await.expect("round trip");
                let expected = (local_base + offset).to_string();
                assert_eq!(
                    String::from_utf8(answer).unwrap(),
                    expected,
                    "via {visitor}"
                );
            }
        }
        agent.stop().await;
        relay.stop().await;
    })
    .await;
}
