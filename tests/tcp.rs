//! Visitors' TCP connections through a forward: bytes intact, many at once, half-close both
//! ways, refusals passed on, and how soon the first byte arrives.

use std::time::{Duration, Instant};

use tether_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

#[tokio::test]
async fn eight_mib_through_a_forward_comes_back_identical() {
    within("the whole test", async {
        let port = free_port();
        let bench = Bench::start(
            &[port],
            vec![tcp_forward("echo", port, echo_service().await)],
        )
        .await;
        let data = pattern(8 * 1024 * 1024);
        let started = Instant::now();
        let back = round_trip(public(port), &data).await.expect("round trip");
        let elapsed = started.elapsed();
        assert!(
            back == data,
            "echo differs: {} bytes back of {}",
            back.len(),
            data.len()
        );
        println!("8 MiB echoed through the tunnel in {elapsed:?}");
        bench.stop().await;
    })
    .await;
}

#[tokio::test]
async fn two_hundred_visitors_at_once_all_complete() {
    within("the whole test", async {
        let port = free_port();
        let bench = Bench::start(
            &[port],
            vec![tcp_forward("echo", port, echo_service().await)],
        )
        .await;
        let visitors: Vec<_> = (0..200)
            .map(|i| {
                tokio::spawn(async move {
                    let data = pattern(16 * 1024 + i);
                    let back = round_trip(public(port), &data).await.expect("round trip");
                    assert!(back == data, "visitor {i} got different bytes back");
                })
            })
            .collect();
        for visitor in visitors {
            visitor.await.expect("visitor task");
        }
        bench.stop().await;
    })
    .await;
}

#[tokio::test]
async fn visitor_that_shuts_its_write_side_still_receives_the_rest() {
    within("the whole test", async {
        // The service reads to the end, then answers: only a working half-close lets it answer.
        let service = serve(|mut tcp| async move {
            let mut got = Vec::new();
            tcp.read_to_end(&mut got).await.expect("read to end");
            let answer = format!("got {} bytes", got.len());
            tcp.write_all(answer.as_bytes()).await.expect("answer");
            tcp.write_all(&pattern(1024 * 1024))
                .await
                .expect("the rest");
        })
        .await;
        let port = free_port();
        let bench = Bench::start(&[port], vec![tcp_forward("svc", port, service)]).await;
        let back = round_trip(public(port), &pattern(100_000))
            .await
            .expect("round trip");
        let answer = b"got 100000 bytes";
        assert_eq!(&back[..answer.len()], answer);
        assert!(
            back[answer.len()..] == pattern(1024 * 1024)[..],
            "the rest differs"
        );
        bench.stop().await;
    })
    .await;
}

#[tokio::test]
async fn service_that_shuts_its_write_side_still_receives_the_rest() {
    within("the whole test", async {
        // The service greets, half-closes, then still reads everything the visitor sends.
        let (counted_tx, mut counted_rx) = tokio::sync::mpsc::unbounded_channel();
        let service = serve(move |mut tcp| {
            let counted = counted_tx.clone();
            async move {
                tcp.write_all(b"hello").await.expect("greet");
                tcp.shutdown().await.expect("half-close");
                let mut got = Vec::new();
                tcp.read_to_end(&mut got)
                    .await
                    .expect("read after half-close");
                counted.send(got).expect("report");
            }
        })
        .await;
        let port = free_port();
        let bench = Bench::start(&[port], vec![tcp_forward("svc", port, service)]).await;
        let mut visitor = TcpStream::connect(public(port)).await.expect("connect");
        let mut greeting = Vec::new();
        visitor
            .read_to_end(&mut greeting)
            .await
            .expect("read to the service's EOF");
        assert_eq!(greeting, b"hello");
        let data = pattern(500_000);
        visitor
            .write_all(&data)
            .await
            .expect("write after the service's EOF");
        visitor.shutdown().await.expect("shutdown");
        let got = counted_rx.recv().await.expect("service report");
        assert!(
            got == data,
            "service got {} bytes of {}",
            got.len(),
            data.len()
        );
        bench.stop().await;
    })
    .await;
}

#[tokio::test]
async fn local_service_that_refuses_closes_the_visitor_at_once() {
    within("the whole test", async {
        let port = free_port();
        // Nothing listens on the local address.
        let closed = public(free_port());
        let bench = Bench::start(&[port], vec![tcp_forward("gone", port, closed)]).await;
        let started = Instant::now();
        let mut visitor = TcpStream::connect(public(port))
            .await
            .expect("relay accepts");
        let mut buf = [0u8; 16];
        let read = visitor.read(&mut buf).await;
        let elapsed = started.elapsed();
        // Reset, as a refused direct connection would be (never a clean, empty EOF).
        let error = read.expect_err("the visitor should be reset");
        assert_eq!(error.kind(), std::io::ErrorKind::ConnectionReset, "{error}");
        // Well under the agent's 5 s connect timeout: the refusal itself was passed on.
        assert!(elapsed < Duration::from_secs(2), "took {elapsed:?}");
        println!("refused local service reset the visitor after {elapsed:?}");
        bench.stop().await;
    })
    .await;
}

#[tokio::test]
async fn time_to_first_byte_of_a_new_visitor_connection() {
    within("the whole test", async {
        // Like sshd, the service speaks first.
        let service = serve(|mut tcp| async move {
            let _ = tcp.write_all(b"SSH-2.0-banner\r\n").await;
            let mut sink = Vec::new();
            let _ = tcp.read_to_end(&mut sink).await;
        })
        .await;
        let port = free_port();
        let bench = Bench::start(&[port], vec![tcp_forward("ssh", port, service)]).await;
        let mut tunnelled = Vec::new();
        let mut direct = Vec::new();
        for _ in 0..21 {
            for (addr, times) in [(public(port), &mut tunnelled), (service, &mut direct)] {
                let started = Instant::now();
                let mut tcp = TcpStream::connect(addr).await.expect("connect");
                let mut byte = [0u8; 1];
                tcp.read_exact(&mut byte).await.expect("first byte");
                times.push(started.elapsed());
            }
        }
        tunnelled.sort();
        direct.sort();
        println!(
            "time to first byte, median of 21: through tether {:?}, direct {:?}",
            tunnelled[10], direct[10]
        );
        bench.stop().await;
    })
    .await;
}

#[tokio::test]
async fn the_copy_loop_counts_the_bytes_each_way() {
    use std::sync::Arc;
    use tether_common::carry::resume::{AckQueue, HeldStreams, Link};
    use tether_common::carry::splice::{splice, Held, Transferred};
    use tether_common::carry::traffic::ForwardTraffic;
    use tether_common::trust::tls::{self, AgentPins};

    within("the whole test", async {
        let keys = Keys::new();
        let (relay_identity, _) = keys.identity("relay");
        let (agent_identity, _) = keys.identity("agent");
        let pins = Arc::new(AgentPins::new([agent_identity.fingerprint()]));
        let server = tls::server_config(&relay_identity, pins).unwrap();
        let server = quinn::Endpoint::server(server, "127.0.0.1:0".parse().unwrap()).unwrap();
        let (client_config, _) =
            tls::client_config(&agent_identity, relay_identity.fingerprint()).unwrap();
        let client = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        let server_addr = server.local_addr().unwrap();
        let (conn, accepted) = tokio::join!(
            async {
                client
                    .connect_with(client_config, server_addr, tls::SERVER_NAME)
                    .unwrap()
                    .await
            },
            async { server.accept().await.unwrap().await },
        );
        let (conn, peer) = (conn.unwrap(), accepted.unwrap());

        // TCP on one side of the loop, the raw stream on the other.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut outside = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (inside, _) = listener.accept().await.unwrap();
        let (send, recv) = conn.open_bi().await.unwrap();
        let stop = CancellationToken::new();
        let traffic = Arc::new(ForwardTraffic::default());
        let meter = traffic.clone();
        let streams = Arc::new(HeldStreams::default());
        let header = tether_common::wire::protocol::StreamHeader {
            id: 1,
            forward: 0,
            port: 1,
            visitor: "127.0.0.1:1".parse().unwrap(),
        };
        let (stream, _registration) = streams.add(header, 1).unwrap();
        let acks = Arc::new(AckQueue::default());
        let link = Link {
            conn: conn.clone(),
            send,
            recv,
            peer_received: 0,
            acks: acks.clone(),
        };
        let spliced = tokio::spawn(async move {
            let held = Held {
                stream: &stream,
                window: Duration::ZERO,
                stop: &stop,
                hand_over: None,
                meter: meter.at_visitor(),
            };
            splice(inside, Some(link), held).await
        });

        let (up, down) = (pattern(300_001), pattern(700_003));
        outside.write_all(&up).await.unwrap();
        outside.shutdown().await.unwrap();
        let (mut peer_send, mut peer_recv) = peer.accept_bi().await.unwrap();
        assert!(peer_recv.read_to_end(usize::MAX).await.unwrap() == up);
        peer_send.write_all(&down).await.unwrap();
        peer_send.finish().unwrap();
        let mut got = Vec::new();
        outside.read_to_end(&mut got).await.unwrap();
        assert!(got == down);
        // This side confirms what it received, its end counted as one more byte.
        assert_eq!(acks.next_batch().await, [(1, 700_004)]);
        // The splice ends once the peer confirms this side's bytes and end.
        assert!(!spliced.is_finished());
        assert_eq!(streams.confirm(&[(1, 300_002)]), 0);
        let (moved, ended) = spliced.await.unwrap();
        ended.expect("clean end both ways");
        assert_eq!(
            moved,
            Transferred {
                to_stream: 300_001,
                to_tcp: 700_003
            }
        );
        // The forward's meter saw the same bytes: in from the TCP side, out to it.
        let count = traffic.count();
        assert_eq!((count.bytes_in, count.bytes_out), (300_001, 700_003));
    })
    .await;
}
