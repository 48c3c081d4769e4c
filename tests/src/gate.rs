//! A UDP gate between an agent and its relay that can be shut: while shut, every packet either
//! way is dropped, as on a link that went down or a NAT that forgot the mapping. It can also
//! drop only the large packets towards the agent, to lose one flow's datagrams and not another's.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::net::UdpSocket;
use tokio::sync::Mutex;
use tokio::task::JoinHandle;

pub struct UdpGate {
    /// Where the agent sends, in place of the relay's address.
    pub addr: SocketAddr,
    open: Arc<AtomicBool>,
    largest_to_agent: Arc<AtomicUsize>,
    tasks: [JoinHandle<()>; 2],
}

impl UdpGate {
    pub async fn new(relay: SocketAddr) -> Self {
        let front = Arc::new(UdpSocket::bind("127.0.0.1:0").await.expect("bind"));
        let back = Arc::new(UdpSocket::bind("127.0.0.1:0").await.expect("bind"));
        back.connect(relay).await.expect("connect");
        let addr = front.local_addr().expect("address");
        let open = Arc::new(AtomicBool::new(true));
        let largest_to_agent = Arc::new(AtomicUsize::new(usize::MAX));
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
            let (open, largest) = (open.clone(), largest_to_agent.clone());
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65536];
                while let Ok(n) = back.recv(&mut buf).await {
                    let to = *agent.lock().await;
                    let pass = open.load(Ordering::Relaxed) && n <= largest.load(Ordering::Relaxed);
                    if let (Some(to), true) = (to, pass) {
                        let _ = front.send_to(&buf[..n], to).await;
                    }
                }
            })
        };
        Self {
            addr,
            open,
            largest_to_agent,
            tasks: [to_relay, to_agent],
        }
    }

    pub fn set_open(&self, open: bool) {
        self.open.store(open, Ordering::Relaxed);
    }

    /// Drops packets towards the agent larger than `largest` bytes; `None` lets all through.
    pub fn drop_to_agent_larger_than(&self, largest: Option<usize>) {
        let largest = largest.unwrap_or(usize::MAX);
        self.largest_to_agent.store(largest, Ordering::Relaxed);
    }
}

impl Drop for UdpGate {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}
