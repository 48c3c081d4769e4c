//! UDP forwards: datagrams of any size, flows, port hops, expiry, caps, and no head-of-line
//! blocking between flows.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tether_common::config::Forward;
use tether_common::net::ports::{PortRange, PortSpec, Proto};
use tether_common::wire::datagram::MAX_PAYLOAD;
use tether_relay::Limits;
use tether_tests::gate::UdpGate;
use tether_tests::udp::*;
use tether_tests::*;

/// A relay and an agent with one UDP forward `mosh` of `ports` public ports onto as many local
/// ports, each served by `service`.
async fn udp_bench(
    ports: u16,
    service: fn(std::net::UdpSocket),
    limits: Limits,
    change: impl FnOnce(&mut Forward),
) -> (Bench, PortRange) {
    let (local, sockets) = consecutive_udp_ports(ports);
    sockets.into_iter().for_each(service);
    let (public, _) = consecutive_udp_ports(ports);
    let mut forward = udp_forward("mosh", public, "127.0.0.1", local);
    change(&mut forward);
    // Every address, IPv4 and IPv6.
    let bench = Bench::serving(vec![forward], limits, |c| c.public_bind = None).await;
    (bench, public)
}

fn at(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse().unwrap(), port)
}

#[tokio::test]
async fn datagrams_of_every_size_echo_back_identical_over_ipv4_and_ipv6() {
    within_for("the whole test", Duration::from_secs(60), async {
        let (bench, public) = udp_bench(1, udp_echo, Limits::default(), |_| {}).await;
        let sizes = [1, 200, 1200, 1400, 8000, 65_000, MAX_PAYLOAD];
        for ip in ["127.0.0.1", "::1"] {
            for len in sizes {
                // IPv6 loopback carries the largest IPv4 payload too.
                let visitor = visitor(ip).await;
                let sent = pattern(len);
                let back = ask(&visitor, at(ip, public.start()), &sent).await;
                assert!(back.is_some(), "no answer to {len} bytes over {ip}");
                assert!(
                    back.unwrap() == sent,
                    "{len} bytes over {ip} came back altered"
                );
            }
        }
        // 8,000 bytes and more never fit a QUIC datagram: both ways they took a stream.
        let relay = bench.relay.udp.count();
        let agent = bench.agent.udp.count();
        assert!(relay.sent_on_stream >= 6, "relay: {relay:?}");
        assert!(agent.sent_on_stream >= 6, "agent: {agent:?}");
        assert_eq!(relay.flows_opened, 14);
        println!("datagrams sent on a stream: relay {relay:?}, agent {agent:?}");
        bench.stop().await;
    })
    .await;
}

#[tokio::test]
async fn a_local_service_on_ipv6_is_reached() {
    within("the whole test", async {
        let service = std::net::UdpSocket::bind("[::1]:0").unwrap();
        let local = PortRange::single(service.local_addr().unwrap().port()).unwrap();
        udp_whoami(service);
        let (public, _) = consecutive_udp_ports(1);
        let forward = udp_forward("v6", public, "::1", local);
        let bench = Bench::serving(vec![forward], Limits::default(), |_| {}).await;
        let visitor = visitor("127.0.0.1").await;
        let (port, source) = whoami(&visitor, at("127.0.0.1", public.start())).await;
        assert_eq!(port, local.start());
        assert!(source.is_ipv6(), "the agent's flow socket is {source}");
        bench.stop().await;
    })
    .await;
}

#[tokio::test]
async fn a_range_maps_port_to_port_and_a_hop_reaches_the_same_local_port() {
    within("the whole test", async {
        let (bench, public) = udp_bench(3, udp_whoami, Limits::default(), |_| {}).await;
        let local_port = |answer: (u16, SocketAddr)| answer.0;
        let first = visitor("127.0.0.1").await;
        let middle = at("127.0.0.1", public.start() + 1);
        let (port, source) = whoami(&first, middle).await;
        // The same visitor source stays one flow: the service sees the same source again.
        assert_eq!(whoami(&first, middle).await, (port, source));
        // Each public port reaches its own local port.
        let last = at("127.0.0.1", public.end());
        assert_eq!(local_port(whoami(&first, last).await), port + 1);
        // A new source port (mosh hopping) is a new flow to the same local port.
        let hopped = visitor("127.0.0.1").await;
        let (hop_port, hop_source) = whoami(&hopped, middle).await;
        assert_eq!(hop_port, port);
        assert_ne!(hop_source, source);
        assert_eq!(bench.relay.udp.count().flows_opened, 3);
        bench.stop().await;
    })
    .await;
}

#[tokio::test]
async fn many_flows_at_once_each_get_their_own_answers() {
    within_for("the whole test", Duration::from_secs(60), async {
        let (bench, public) = udp_bench(1, udp_echo, Limits::default(), |_| {}).await;
        let to = at("127.0.0.1", public.start());
        // 200 flows from 50 loopback addresses, four source ports each (the per-visitor cap is
        // 32), all talking at once.
        let mut flows = tokio::task::JoinSet::new();
        for i in 0..200u32 {
            flows.spawn(async move {
                let ip = format!("127.0.1.{}", i % 50 + 1);
                let visitor = visitor(&ip).await;
                for round in 0..5u32 {
                    let sent = format!("flow {i} round {round}").into_bytes();
                    let back = ask(&visitor, to, &sent).await;
                    assert_eq!(back, Some(sent), "flow {i} round {round}");
                }
            });
        }
        while let Some(flow) = flows.join_next().await {
            flow.unwrap();
        }
        let relay = bench.relay.udp.count();
        assert_eq!(relay.flows_opened, 200, "{relay:?}");
        assert_eq!(relay.flows_evicted, 0, "{relay:?}");
        assert_eq!(bench.agent.udp.count().flows_opened, 200);
        bench.stop().await;
    })
    .await;
}

#[tokio::test]
async fn idle_flows_expire_and_talking_ones_stay() {
    within_for("the whole test", Duration::from_secs(30), async {
        let idle = Duration::from_secs(1);
        let (bench, public) =
            udp_bench(1, udp_whoami, Limits::default(), |f| f.flow_idle = idle).await;
        let to = at("127.0.0.1", public.start());
        let (silent, talking) = (visitor("127.0.0.1").await, visitor("127.0.0.1").await);
        let (_, silent_source) = whoami(&silent, to).await;
        let (_, talking_source) = whoami(&talking, to).await;
        // The time under test: the talking flow speaks every 300 ms for 2.5 idle times.
        let start = Instant::now();
        while start.elapsed() < idle * 5 / 2 {
            tokio::time::sleep(Duration::from_millis(300)).await;
            assert_eq!(whoami(&talking, to).await.1, talking_source);
        }
        // The silent flow was forgotten at both ends: its visitor comes back as a new flow.
        assert_eq!(bench.relay.udp.count().flows_expired, 1);
        assert_eq!(bench.agent.udp.count().flows_expired, 1);
        let (_, again) = whoami(&silent, to).await;
        assert_ne!(again, silent_source);
        bench.stop().await;
    })
    .await;
}

#[tokio::test]
async fn a_visitor_address_over_its_cap_loses_its_longest_idle_flow() {
    within("the whole test", async {
        let limits = Limits {
            max_flows_per_visitor: 2,
            ..Limits::default()
        };
        let (bench, public) = udp_bench(1, udp_whoami, limits, |_| {}).await;
        let to = at("127.0.0.1", public.start());
        let (a, b, c) = (
            visitor("127.0.0.1").await,
            visitor("127.0.0.1").await,
            visitor("127.0.0.1").await,
        );
        let (_, a_source) = whoami(&a, to).await;
        let (_, b_source) = whoami(&b, to).await;
        whoami(&a, to).await; // b is now the longest idle
        let other = visitor("127.0.0.2").await;
        whoami(&other, to).await; // another address is not counted against this one
        assert_eq!(bench.relay.udp.count().flows_evicted, 0);
        whoami(&c, to).await;
        assert_eq!(bench.relay.udp.count().flows_evicted, 1);
        assert_eq!(whoami(&a, to).await.1, a_source, "a must keep its flow");
        let (_, b_again) = whoami(&b, to).await;
        assert_ne!(b_again, b_source, "b's flow must have been the one evicted");
        bench.stop().await;
    })
    .await;
}

#[tokio::test]
async fn a_forward_over_its_cap_loses_its_longest_idle_flow() {
    within("the whole test", async {
        // Every flow here was seen a moment ago; which one goes is the question when none is
        // protected (tests/strangers.rs has the protection of active flows).
        let limits = Limits {
            max_flows_per_forward: 3,
            protect_active_flows: Duration::ZERO,
            ..Limits::default()
        };
        let (bench, public) = udp_bench(1, udp_whoami, limits, |_| {}).await;
        let to = at("127.0.0.1", public.start());
        let mut visitors = Vec::new();
        let mut sources = Vec::new();
        for i in 1..=3 {
            let v = visitor(&format!("127.0.2.{i}")).await;
            sources.push(whoami(&v, to).await.1);
            visitors.push(v);
        }
        // Touch the first two; the third is now the longest idle.
        whoami(&visitors[0], to).await;
        whoami(&visitors[1], to).await;
        let fourth = visitor("127.0.2.4").await;
        whoami(&fourth, to).await;
        let relay = bench.relay.udp.count();
        assert_eq!((relay.flows_opened, relay.flows_evicted), (4, 1));
        assert_eq!(whoami(&visitors[0], to).await.1, sources[0]);
        assert_eq!(whoami(&visitors[1], to).await.1, sources[1]);
        assert_ne!(whoami(&visitors[2], to).await.1, sources[2]);
        bench.stop().await;
    })
    .await;
}

/// Round trips of small pings on one flow, interleaved with large datagrams on another; returns
/// the ping round-trip times and how many large datagrams came back.
async fn ping_beside_bulk(to: SocketAddr, rounds: usize) -> (Vec<Duration>, usize) {
    let pinger = visitor("127.0.0.1").await;
    let bulk = std::sync::Arc::new(visitor("127.0.0.1").await);
    let echoes = {
        let bulk = bulk.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 2048];
            let mut echoed = 0;
            // Counts until no echo came for a while after the last ping.
            while let Ok(Ok(_)) =
                tokio::time::timeout(Duration::from_millis(500), bulk.recv_from(&mut buf)).await
            {
                echoed += 1;
            }
            echoed
        })
    };
    let mut rtts = Vec::with_capacity(rounds);
    for i in 0..rounds {
        // Sent on its own, so it is not packed into one packet with a ping.
        bulk.send_to(&pattern(1000), to).await.unwrap();
        tokio::time::sleep(Duration::from_millis(2)).await;
        let start = Instant::now();
        let ping = format!("ping {i}").into_bytes();
        let back = ask(&pinger, to, &ping).await;
        assert_eq!(back, Some(ping), "ping {i} must come back");
        rtts.push(start.elapsed());
    }
    (rtts, echoes.await.unwrap())
}

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

#[tokio::test]
async fn a_flow_losing_every_datagram_does_not_delay_another() {
    within_for("the whole test", Duration::from_secs(60), async {
        let keys = Keys::new();
        let (relay_identity, relay_key) = keys.identity("relay");
        let (agent_identity, agent_key) = keys.identity("agent");
        let (local, sockets) = consecutive_udp_ports(1);
        sockets.into_iter().for_each(udp_echo);
        let (public, _) = consecutive_udp_ports(1);
        let mut entry = agent_entry("dorm", agent_identity.fingerprint(), &[]);
        entry.ports.push(PortSpec {
            proto: Proto::Udp,
            range: public,
        });
        let relay = start_relay(relay_config(relay_key, vec![entry]), &relay_identity);
        let gate = UdpGate::new(relay.addr).await;
        let forward = udp_forward("game", public, "127.0.0.1", local);
        let config = agent_config(agent_key, gate.addr, relay.fingerprint, vec![forward]);
        let mut agent = start_agent(config, &agent_identity);
        agent.connected().await;
        let to = at("127.0.0.1", public.start());

        let (clear, bulk_echoed) = ping_beside_bulk(to, 100).await;
        assert_eq!(bulk_echoed, 100, "without loss every large datagram comes back");
        // Packets towards the agent that carry a large datagram are lost from now on; pings
        // and acknowledgements are small and pass.
        gate.drop_to_agent_larger_than(Some(600));
        let (lossy, bulk_echoed) = ping_beside_bulk(to, 100).await;
        assert_eq!(bulk_echoed, 0, "the gate must have dropped every large datagram");
        let slowest = *lossy.iter().max().unwrap();
        println!(
            "ping round trip beside a flow that loses everything: median {:?} (without loss {:?}), slowest {slowest:?}",
            median(lossy),
            median(clear),
        );
        // Carried on one reliable stream, the first ping after a lost datagram would wait for a
        // retransmission that is lost too, and never arrive; every ping came back instead.
        gate.drop_to_agent_larger_than(None);
        let bulk = visitor("127.0.0.1").await;
        assert!(ask(&bulk, to, &pattern(1000)).await.is_some());
        agent.stop().await;
        relay.stop().await;
    })
    .await;
}
