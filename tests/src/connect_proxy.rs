//! A small HTTP CONNECT proxy for tests: it grants every tunnel, counts them, and can sever
//! every tunnel open, as a proxy restarted or a TCP connection lost on the way would.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::task::AbortOnDropHandle;

pub struct ConnectProxy {
    pub addr: SocketAddr,
    /// Tunnels granted so far.
    pub tunnels: Arc<AtomicUsize>,
    /// Bumped to sever every tunnel open.
    severed: watch::Sender<u64>,
    _task: AbortOnDropHandle<()>,
}

impl ConnectProxy {
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let tunnels = Arc::new(AtomicUsize::new(0));
        let severed = watch::Sender::new(0u64);
        let task = {
            let (tunnels, severed) = (tunnels.clone(), severed.clone());
            async move {
                while let Ok((client, _)) = listener.accept().await {
                    let (tunnels, severed) = (tunnels.clone(), severed.subscribe());
                    tokio::spawn(tunnel(client, tunnels, severed));
                }
            }
        };
        Self {
            addr,
            tunnels,
            severed,
            _task: AbortOnDropHandle::new(tokio::spawn(task)),
        }
    }

    /// Ends every tunnel open now, both ways.
    pub fn sever(&self) {
        self.severed.send_modify(|n| *n += 1);
    }

    /// The proxy as agent.toml names it.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

async fn tunnel(
    mut client: TcpStream,
    tunnels: Arc<AtomicUsize>,
    mut severed: watch::Receiver<u64>,
) {
    let mut request = Vec::new();
    let mut byte = [0u8; 1];
    while !request.ends_with(b"\r\n\r\n") {
        if client.read(&mut byte).await.unwrap_or(0) == 0 || request.len() > 8192 {
            return;
        }
        request.push(byte[0]);
    }
    let request = String::from_utf8_lossy(&request).into_owned();
    let Some(target) = request
        .strip_prefix("CONNECT ")
        .and_then(|rest| rest.split_whitespace().next())
    else {
        let _ = client
            .write_all(b"HTTP/1.1 405 Method Not Allowed\r\n\r\n")
            .await;
        return;
    };
    let Ok(mut server) = TcpStream::connect(target).await else {
        let _ = client.write_all(b"HTTP/1.1 502 Bad Gateway\r\n\r\n").await;
        return;
    };
    if client
        .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
        .await
        .is_err()
    {
        return;
    }
    tunnels.fetch_add(1, Ordering::SeqCst);
    severed.borrow_and_update();
    tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
        _ = severed.changed() => {
            // A reset, as when the path in between is lost.
            let _ = socket2::SockRef::from(&client).set_linger(Some(std::time::Duration::ZERO));
            let _ = socket2::SockRef::from(&server).set_linger(Some(std::time::Duration::ZERO));
        }
    }
}
