//! The lab's stand-in for local services and visitors: a small process that the lab tests run
//! inside a network namespace and drive over its stdin and stdout.
//!
//! ```text
//! lab-peer tcp-echo ADDR      echoes every connection; prints "listening" once bound
//! lab-peer sink ADDR          reads every connection to its end; prints "listening" once
//!                             bound, then "received BYTES SHA256" per connection
//! lab-peer client ADDR        connects, prints "connected", then runs commands from stdin:
//!     echo TEXT TIMEOUT_MS    sends TEXT and a newline, awaits it back:
//!                             prints "echoed MICROS" or "failed WHY"
//!     send BYTES [EVERY]      sends BYTES of random data and half-closes, printing
//!                             "progress BYTES" every EVERY bytes (8 MiB) and then
//!                             "sent BYTES SHA256 MILLIS"
//! ```

use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

const PROGRESS_EVERY: u64 = 8 << 20;

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    match args.as_slice() {
        ["tcp-echo", addr] => tcp_echo(addr).await,
        ["sink", addr] => sink(addr).await,
        ["client", addr] => client(addr).await,
        _ => {
            eprintln!("usage: lab-peer tcp-echo ADDR | client ADDR");
            std::process::exit(64);
        }
    }
}

async fn tcp_echo(addr: &str) {
    let listener = TcpListener::bind(addr).await.expect("bind");
    println!("listening");
    while let Ok((mut tcp, _)) = listener.accept().await {
        tokio::spawn(async move {
            let (mut read, mut write) = tcp.split();
            let _ = tokio::io::copy(&mut read, &mut write).await;
        });
    }
}

async fn sink(addr: &str) {
    let listener = TcpListener::bind(addr).await.expect("bind");
    println!("listening");
    while let Ok((mut tcp, _)) = listener.accept().await {
        tokio::spawn(async move {
            let mut hash = Sha256::new();
            let mut total = 0u64;
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match tcp.read(&mut buf).await {
                    Ok(0) => break,
                    Ok(n) => {
                        hash.update(&buf[..n]);
                        total += n as u64;
                    }
                    Err(error) => {
                        println!("failed after {total} bytes: {error}");
                        return;
                    }
                }
            }
            println!("received {total} {}", hex(&hash.finalize()));
        });
    }
}

async fn send(
    write: &mut tokio::net::tcp::OwnedWriteHalf,
    bytes: u64,
    every: u64,
) -> std::io::Result<String> {
    let start = Instant::now();
    let mut hash = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut sent = 0u64;
    while sent < bytes {
        let len = buf.len().min((bytes - sent) as usize);
        rand::Rng::fill(&mut rand::thread_rng(), &mut buf[..len]);
        write.write_all(&buf[..len]).await?;
        hash.update(&buf[..len]);
        let before = sent;
        sent += len as u64;
        if sent / every > before / every {
            println!("progress {sent}");
        }
    }
    write.shutdown().await?;
    let millis = start.elapsed().as_millis();
    Ok(format!("sent {sent} {} {millis}", hex(&hash.finalize())))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

async fn client(addr: &str) {
    let tcp = match TcpStream::connect(addr).await {
        Ok(tcp) => tcp,
        Err(error) => {
            println!("failed {error}");
            return;
        }
    };
    println!("connected");
    let (read, mut write) = tcp.into_split();
    let mut replies = BufReader::new(read).lines();
    let mut commands = BufReader::new(tokio::io::stdin()).lines();
    while let Ok(Some(command)) = commands.next_line().await {
        let words: Vec<&str> = command.split_whitespace().collect();
        match words.as_slice() {
            ["echo", text, timeout_ms] => {
                let limit = Duration::from_millis(timeout_ms.parse().expect("TIMEOUT_MS"));
                let start = Instant::now();
                let exchange = async {
                    write.write_all(format!("{text}\n").as_bytes()).await?;
                    replies.next_line().await
                };
                match tokio::time::timeout(limit, exchange).await {
                    Ok(Ok(Some(line))) if line == *text => {
                        println!("echoed {}", start.elapsed().as_micros())
                    }
                    Ok(Ok(Some(line))) => println!("failed got {line:?}"),
                    Ok(Ok(None)) => println!("failed closed"),
                    Ok(Err(error)) => println!("failed {error}"),
                    Err(_) => println!("failed no answer within {limit:?}"),
                }
            }
            ["send", bytes, every @ ..] => {
                let every = every
                    .first()
                    .map_or(PROGRESS_EVERY, |e| e.parse().expect("EVERY"));
                match send(&mut write, bytes.parse().expect("BYTES"), every.max(1)).await {
                    Ok(done) => println!("{done}"),
                    Err(error) => println!("failed {error}"),
                }
            }
            _ => println!("failed unknown command {command:?}"),
        }
    }
}
