//! The NAT lab's impairment shim: a UDP forwarder that delays, drops and reorders, standing in
//! for the `netem` qdisc this kernel lacks. It runs in the relay's namespace; agents send to it
//! in place of the relay.
//!
//! ```text
//! lab-shim LISTEN UPSTREAM DELAY_MS JITTER_MS LOSS REORDER
//! ```
//!
//! Each packet, either way, is dropped with probability LOSS; otherwise it is sent on after
//! DELAY_MS plus a uniform 0..JITTER_MS, but never before the packet ahead of it, as from a
//! queue; and with probability REORDER after a further DELAY_MS, so that packets sent after it
//! overtake it. Each source gets its own socket towards UPSTREAM,
//! as behind a NAT: when the source's port changes, UPSTREAM sees a new port too. Prints
//! "listening" once bound.

use std::cmp::Reverse;
use std::collections::hash_map::Entry;
use std::collections::{BinaryHeap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::time::Instant;

#[derive(Clone, Copy)]
struct Impairment {
    delay: Duration,
    jitter: Duration,
    loss: f64,
    reorder: f64,
}

/// One direction's schedule.
struct Direction {
    impairment: Impairment,
    /// When the last packet not held back goes on.
    last: Instant,
}

impl Direction {
    fn new(impairment: Impairment) -> Self {
        let last = Instant::now();
        Self { impairment, last }
    }

    /// When a packet received now goes on, or `None` to drop it.
    fn schedule(&mut self, rng: &mut impl Rng) -> Option<Instant> {
        let Impairment {
            delay,
            jitter,
            loss,
            reorder,
        } = self.impairment;
        if rng.gen_bool(loss) {
            return None;
        }
        if rng.gen_bool(reorder) {
            return Some(Instant::now() + delay * 2);
        }
        self.last = self
            .last
            .max(Instant::now() + delay + jitter.mul_f64(rng.gen()));
        Some(self.last)
    }
}

/// A packet waiting for its time, and where it goes.
type Scheduled = (Instant, Arc<UdpSocket>, Option<SocketAddr>, Vec<u8>);

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [listen, upstream, delay, jitter, loss, reorder] = args.as_slice() else {
        eprintln!("usage: lab-shim LISTEN UPSTREAM DELAY_MS JITTER_MS LOSS REORDER");
        std::process::exit(64);
    };
    let millis = |s: &str| Duration::from_millis(s.parse().expect("milliseconds"));
    let impairment = Impairment {
        delay: millis(delay),
        jitter: millis(jitter),
        loss: loss.parse().expect("LOSS"),
        reorder: reorder.parse().expect("REORDER"),
    };
    let upstream: SocketAddr = upstream.parse().expect("UPSTREAM");
    let front = Arc::new(UdpSocket::bind(listen.as_str()).await.expect("bind LISTEN"));
    let (send, queue) = mpsc::unbounded_channel();
    tokio::spawn(send_on_time(queue));
    println!("listening");

    let mut backs: HashMap<SocketAddr, (Arc<UdpSocket>, Direction)> = HashMap::new();
    let mut buf = vec![0u8; 65536];
    loop {
        let (n, source) = front.recv_from(&mut buf).await.expect("receive");
        let (back, out) = match backs.entry(source) {
            Entry::Occupied(entry) => entry.into_mut(),
            Entry::Vacant(entry) => {
                let back = Arc::new(UdpSocket::bind("0.0.0.0:0").await.expect("bind"));
                back.connect(upstream).await.expect("connect UPSTREAM");
                let answers = Direction::new(impairment);
                let (front, send) = (front.clone(), send.clone());
                tokio::spawn(carry_answers(back.clone(), front, source, answers, send));
                entry.insert((back, Direction::new(impairment)))
            }
        };
        if let Some(at) = out.schedule(&mut rand::thread_rng()) {
            let _ = send.send((at, back.clone(), None, buf[..n].to_vec()));
        }
    }
}

/// Carries what UPSTREAM sends on `back` to `source` through `front`.
async fn carry_answers(
    back: Arc<UdpSocket>,
    front: Arc<UdpSocket>,
    source: SocketAddr,
    mut direction: Direction,
    send: mpsc::UnboundedSender<Scheduled>,
) {
    let mut buf = vec![0u8; 65536];
    while let Ok(n) = back.recv(&mut buf).await {
        if let Some(at) = direction.schedule(&mut rand::thread_rng()) {
            let _ = send.send((at, front.clone(), Some(source), buf[..n].to_vec()));
        }
    }
}

/// Sends each packet at its time, whatever order they were scheduled in.
async fn send_on_time(mut queue: mpsc::UnboundedReceiver<Scheduled>) {
    let mut due: BinaryHeap<Reverse<(Instant, u64)>> = BinaryHeap::new();
    let mut packets = HashMap::new();
    let mut next_id = 0u64;
    loop {
        let next = due.peek().map(|Reverse((at, _))| *at);
        tokio::select! {
            scheduled = queue.recv() => {
                let Some((at, socket, to, bytes)) = scheduled else { return };
                due.push(Reverse((at, next_id)));
                packets.insert(next_id, (socket, to, bytes));
                next_id += 1;
            }
            () = sleep_until(next) => {
                while let Some(Reverse((at, id))) = due.peek().copied() {
                    if at > Instant::now() {
                        break;
                    }
                    due.pop();
                    let (socket, to, bytes) = packets.remove(&id).expect("scheduled");
                    let _ = match to {
                        Some(to) => socket.send_to(&bytes, to).await,
                        None => socket.send(&bytes).await,
                    };
                }
            }
        }
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
