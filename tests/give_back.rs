//! Every reservation comes back, on every way out. A data stream holds the bytes its peer has
//! not confirmed, out of a budget each side keeps per agent; a connection that ends on an error
//! path (a visitor's reset, a local service that closes early, a download reset unread) must
//! give its share back, or a stranger who repeats it silences the agent's forwards. Each test
//! takes many more connections that way than the budget could lose, then checks that a large
//! transfer still goes through the same forward.

use std::net::SocketAddr;
use std::time::Duration;

use tether_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinSet;

/// What each visitor sends before it resets: as much as one stream may hold unconfirmed.
const SENT: usize = 1024 * 1024;

/// Visitors at once: enough to keep both cores busy, few enough to stay under every cap.
const AT_ONCE: usize = 8;

/// Runs `visit` `count` times, [`AT_ONCE`] at a time.
async fn visitors<F, Fut>(count: usize, visit: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let mut running = JoinSet::new();
    for _ in 0..count {
        if running.len() == AT_ONCE {
            running.join_next().await.unwrap().unwrap();
        }
        running.spawn(within("a visitor", visit()));
    }
    while let Some(done) = running.join_next().await {
        done.unwrap();
    }
}

/// Closes `tcp` with a RST.
fn reset(tcp: TcpStream) {
    tether_common::carry::splice::reset_tcp(&tcp);
}

/// Checks that 4 MiB still echo through `port`, every byte in order.
async fn still_carries(port: u16) {
    let data = pattern(4 * 1024 * 1024);
    let back = within_for(
        "a 4 MiB echo after the resets",
        Duration::from_secs(30),
        round_trip(public(port), &data),
    )
    .await
    .unwrap();
    assert!(back == data, "the echo came back altered");
}

/// A service that echoes, or, for a connection whose first byte is `D`, sends until its
/// visitor goes away.
async fn echo_or_download() -> SocketAddr {
    serve(|mut tcp| async move {
        let mut first = [0u8; 1];
        if tcp.read_exact(&mut first).await.is_err() {
            return;
        }
        if first[0] == b'D' {
            let chunk = pattern(64 * 1024);
            while tcp.write_all(&chunk).await.is_ok() {}
            return;
        }
        let (mut read, mut write) = tcp.split();
        if write.write_all(&first).await.is_ok() {
            let _ = tokio::io::copy(&mut read, &mut write).await;
        }
        let _ = write.shutdown().await;
    })
    .await
}

#[tokio::test]
async fn visitors_that_send_and_reset_do_not_use_up_the_budget() {
    within_for("the whole test", Duration::from_secs(300), async {
        let port = free_port();
        let forwards = vec![tcp_forward("echo", port, echo_service().await)];
        let bench = Bench::start(&[port], forwards).await;
        let data = pattern(SENT);
        visitors(500, || {
            let data = data.clone();
            async move {
                let mut tcp = TcpStream::connect(public(port)).await.unwrap();
                // The relay may reset the connection first, if it is quicker.
                let _ = tcp.write_all(&data).await;
                reset(tcp);
            }
        })
        .await;
        still_carries(port).await;
        bench.stop().await;
    })
    .await;
}

#[tokio::test]
async fn a_service_that_closes_early_does_not_use_up_the_budget() {
    within_for("the whole test", Duration::from_secs(300), async {
        // Reads 100 bytes and closes, with the rest unread: its side ends with a RST. The
        // visitor whose first byte is `E` is echoed instead, for the check at the end.
        let service = serve(|mut tcp| async move {
            let mut head = [0u8; 100];
            if tcp.read_exact(&mut head).await.is_err() {
                return;
            }
            if head[0] == b'E' {
                let (mut read, mut write) = tcp.split();
                if write.write_all(&head).await.is_ok() {
                    let _ = tokio::io::copy(&mut read, &mut write).await;
                }
                let _ = write.shutdown().await;
            }
        })
        .await;
        let port = free_port();
        let bench = Bench::start(&[port], vec![tcp_forward("early", port, service)]).await;
        let data = vec![b'x'; SENT];
        visitors(500, || {
            let data = data.clone();
            async move {
                let mut tcp = TcpStream::connect(public(port)).await.unwrap();
                let _ = tcp.write_all(&data).await;
                // Until the relay passes the service's end on.
                let mut rest = Vec::new();
                let _ = tcp.read_to_end(&mut rest).await;
            }
        })
        .await;
        let mut data = pattern(4 * 1024 * 1024);
        data[0] = b'E';
        let back = within_for(
            "a 4 MiB echo after the early closes",
            Duration::from_secs(30),
            round_trip(public(port), &data),
        )
        .await
        .unwrap();
        assert!(back == data, "the echo came back altered");
        bench.stop().await;
    })
    .await;
}

#[tokio::test]
async fn downloads_reset_unread_do_not_use_up_the_budget() {
    within_for("the whole test", Duration::from_secs(300), async {
        let port = free_port();
        let forwards = vec![tcp_forward("dl", port, echo_or_download().await)];
        let bench = Bench::start(&[port], forwards).await;
        visitors(100, || async move {
            let mut tcp = TcpStream::connect(public(port)).await.unwrap();
            tcp.write_all(b"D").await.unwrap();
            // Once the download flows, the visitor stops reading and resets.
            let mut first = [0u8; 1];
            tcp.read_exact(&mut first).await.unwrap();
            reset(tcp);
        })
        .await;
        still_carries(port).await;
        bench.stop().await;
    })
    .await;
}

/// Waits until the relay has carried `carried` visitor connections in all and has none open:
/// each has given back its places.
async fn until_all_closed(relay: &RelayHandle, carried: u64) {
    within("the relay to close every visitor connection", async {
        loop {
            let traffic = relay.control.status().agents[0].forwards[0].traffic;
            if traffic.visitors == carried && traffic.visitors_open == 0 {
                return;
            }
            tokio::task::yield_now().await;
        }
    })
    .await;
}

#[tokio::test]
async fn visitor_places_come_back_however_the_connection_ends() {
    use tether_relay::Limits;
    within_for("the whole test", Duration::from_secs(120), async {
        const PLACES: usize = 4;
        let limits = Limits {
            max_visitors: PLACES,
            max_visitors_per_forward: PLACES,
            max_visitors_per_address: PLACES,
            ..Limits::default()
        };
        let port = free_port();
        let forwards = vec![tcp_forward("dl", port, echo_or_download().await)];
        let bench = Bench::serving(forwards, limits, |_| {}).await;
        let mut carried = 0;
        for _ in 0..25 {
            // A clean end, a reset before any byte, a reset in the middle of a download: ten
            // times as many connections as there are places, each ended before the next.
            assert_eq!(round_trip(public(port), b"Eh").await.unwrap(), b"Eh");
            reset(TcpStream::connect(public(port)).await.unwrap());
            let mut download = TcpStream::connect(public(port)).await.unwrap();
            download.write_all(b"D").await.unwrap();
            let mut first = [0u8; 1];
            within("the download", download.read_exact(&mut first))
                .await
                .unwrap();
            reset(download);
            carried += 3;
            until_all_closed(&bench.relay, carried).await;
        }
        // Every place is free again: PLACES visitors at once are served.
        let mut open = Vec::new();
        for _ in 0..PLACES {
            let mut tcp = TcpStream::connect(public(port)).await.unwrap();
            tcp.write_all(b"E!").await.unwrap();
            let mut back = [0u8; 2];
            within("an echo", tcp.read_exact(&mut back)).await.unwrap();
            open.push(tcp);
        }
        bench.stop().await;
    })
    .await;
}
