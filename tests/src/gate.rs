//! A UDP gate between an agent and its relay that can be shut: while shut, every packet either
//! way is dropped, as on a link that went down or a NAT that forgot the mapping.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio::net::UdpSocket;
use tokio::sync::Mutex;
use tokio::task::JoinHandle;

pub struct UdpGate {
    /// Where the agent sends, in place of the relay's address.
    pub addr: SocketAddr,
    open: Arc<AtomicBool>,
    tasks: [JoinHandle<()>; 2],
}

impl UdpGate {
    pub async fn new(relay: SocketAddr) -> Self {
        let front = Arc::new(UdpSocket::bind("127.0.0.1:0").await.expect("bind"));
        let back = Arc::new(UdpSocket::bind("127.0.0.1:0").await.expect("bind"));
        back.connect(relay).await.expect("connect");
        let addr = front.local_addr().expect("address");
        let open = Arc::new(AtomicBool::new(true));
        let agent = Arc::new(Mutex::new(None::<SocketAddr>));
        let to_relay = {
            let (front, back, open, agent) =
                (front.clone(), back.clone(), open.clone(), agent.clone());
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65536];
                while let Ok((n, from)) = front.recv_from(&mut buf).await {
                    *agent.lock().await = Some(from);
                    if open.load(Ordering::Relaxed) {
                        let _ = back.send(&buf[..n]).await;
                    }
                }
            })
        };
        let to_agent = {
            let open = open.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65536];
                while let Ok(n) = back.recv(&mut buf).await {
                    let to = *agent.lock().await;
                    if let (Some(to), true) = (to, open.load(Ordering::Relaxed)) {
                        let _ = front.send_to(&buf[..n], to).await;
                    }
                }
            })
        };
        Self {
            addr,
            open,
            tasks: [to_relay, to_agent],
        }
    }

    pub fn set_open(&self, open: bool) {
        self.open.store(open, Ordering::Relaxed);
    }
}

impl Drop for UdpGate {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}
