//! A UDP forwarder between an in-process agent and relay that a test can cut, restore and move
//! to a new source address, so that a session is lost (and a new one comes from elsewhere)
//! without root or network namespaces.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::net::UdpSocket;
use tokio::sync::watch;
use tokio_util::task::AbortOnDropHandle;

/// What the agent takes for the relay: everything it sends goes on to the relay from the
/// link's own socket, and the answers come back, while the link is up.
pub struct CutLink {
    /// Where the agent sends.
    pub addr: SocketAddr,
    up: Arc<AtomicBool>,
    outbound: watch::Sender<Arc<UdpSocket>>,
    _tasks: [AbortOnDropHandle<()>; 2],
}

impl CutLink {
    pub async fn to(relay: SocketAddr) -> Self {
        let front = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
        let addr = front.local_addr().unwrap();
        let up = Arc::new(AtomicBool::new(true));
        let outbound = watch::Sender::new(Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap()));
        let agent: Arc<Mutex<Option<SocketAddr>>> = Arc::default();
        let to_relay = {
            let (front, up, outbound, agent) = (
                front.clone(),
                up.clone(),
                outbound.subscribe(),
                agent.clone(),
            );
            async move {
                let mut buf = vec![0u8; 65_536];
                while let Ok((len, from)) = front.recv_from(&mut buf).await {
                    *agent.lock().unwrap() = Some(from);
                    if up.load(Ordering::Acquire) {
                        let socket = outbound.borrow().clone();
                        let _ = socket.send_to(&buf[..len], relay).await;
                    }
                }
            }
        };
        let to_agent = {
            let (up, mut outbound) = (up.clone(), outbound.subscribe());
            async move {
                let mut buf = vec![0u8; 65_536];
                loop {
                    let socket = outbound.borrow_and_update().clone();
                    tokio::select! {
                        _ = outbound.changed() => continue,
                        received = socket.recv_from(&mut buf) => {
                            let Ok((len, _)) = received else { return };
                            let to = *agent.lock().unwrap();
                            if let (Some(to), true) = (to, up.load(Ordering::Acquire)) {
                                let _ = front.send_to(&buf[..len], to).await;
                            }
                        }
                    }
                }
            }
        };
        Self {
            addr,
            up,
            outbound,
            _tasks: [
                AbortOnDropHandle::new(tokio::spawn(to_relay)),
                AbortOnDropHandle::new(tokio::spawn(to_agent)),
            ],
        }
    }

    /// Drops every packet both ways until [`CutLink::restore`].
    pub fn cut(&self) {
        self.up.store(false, Ordering::Release);
    }

    pub fn restore(&self) {
        self.up.store(true, Ordering::Release);
    }

    /// From now on the relay sees the agent's packets come from another address, as after a
    /// change of the home network.
    pub async fn move_source(&self) {
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        self.outbound.send_replace(Arc::new(socket));
    }

    /// The address the relay sees the agent's packets come from.
    pub fn source(&self) -> SocketAddr {
        self.outbound.borrow().local_addr().unwrap()
    }
}
