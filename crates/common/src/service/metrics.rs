//! Prometheus metrics: an opt-in HTTP endpoint that serves `GET /metrics` in the OpenMetrics
//! text format, which `prometheus-client` encodes.
//!
//! Both ends gather their metrics at scrape time from the state that `status` shows as well
//! (see each side's `metrics` module), so the two never disagree and the hot paths update
//! nothing but their own atomic counters.

use std::collections::VecDeque;
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::task::{AbortHandle, JoinSet};
use tokio_util::sync::CancellationToken;

/// The content type of the OpenMetrics text format.
const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The most bytes of a request read; a scrape's request is a few hundred.
const MAX_REQUEST: usize = 8 * 1024;

/// How long a client may take to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// How long the answer may take to leave: a client that does not read is dropped.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

/// Clients served at once. When all are taken, a new client takes the place of the oldest one
/// still to send its request: a few idle connections cannot keep a scraper out, since a
/// scraper sends its request at once.
const MAX_CLIENTS: usize = 16;

/// Binds the metrics endpoint on `address`; [`serve`] answers on it.
pub async fn bind(address: SocketAddr) -> io::Result<TcpListener> {
    TcpListener::bind(address).await
}

/// One client's task, and whether it has its request and is being answered.
struct Client {
    task: AbortHandle,
    answering: Arc<AtomicBool>,
}

/// Answers scrapes on `listener` with what `registry` encodes, until `shutdown` is cancelled.
pub async fn serve(listener: TcpListener, registry: Registry, shutdown: CancellationToken) {
    let registry = Arc::new(registry);
    let mut tasks = JoinSet::new();
    let mut clients: VecDeque<Client> = VecDeque::new();
    loop {
        let stream = tokio::select! {
            () = shutdown.cancelled() => return,
            Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(error) => {
                    tracing::debug!(%error, "accepting a metrics client failed");
                    continue;
                }
            },
        };
        clients.retain(|client| !client.task.is_finished());
        if clients.len() >= MAX_CLIENTS {
            let waiting = clients
                .iter()
                .position(|client| !client.answering.load(Ordering::Acquire));
            match waiting {
                Some(oldest) => {
                    if let Some(client) = clients.remove(oldest) {
                        client.task.abort();
                    }
                }
                // Every place is answering; their answers end within their timeout.
                None => continue,
            }
        }
        let registry = registry.clone();
        let answering = Arc::new(AtomicBool::new(false));
        let flag = answering.clone();
        let task = tasks.spawn(async move {
            if let Err(error) = answer(stream, &registry, &flag).await {
                tracing::debug!(%error, "metrics request failed");
            }
        });
        clients.push_back(Client { task, answering });
    }
}

/// Reads one HTTP request and answers it, then closes the connection.
async fn answer(
    mut stream: impl AsyncRead + AsyncWrite + Unpin,
    registry: &Registry,
    answering: &AtomicBool,
) -> io::Result<()> {
    let mut request = Vec::with_capacity(512);
    let head = async {
        let mut buf = [0u8; 1024];
        while !request.windows(4).any(|w| w == b"\r\n\r\n") {
            if request.len() >= MAX_REQUEST {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "request too long",
                ));
            }
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            request.extend_from_slice(&buf[..n]);
        }
        Ok(())
    };
    tokio::time::timeout(REQUEST_TIMEOUT, head)
        .await
        .map_err(|_| io::Error::from(io::ErrorKind::TimedOut))??;
    answering.store(true, Ordering::Release);
    let line = request.split(|&b| b == b'\r').next().unwrap_or_default();
    let mut words = line.split(|&b| b == b' ');
    let (method, target) = (words.next(), words.next());
    let (status, content_type, body) = match (method, target) {
        (Some(b"GET"), Some(b"/metrics")) => {
            let mut body = String::new();
            match prometheus_client::encoding::text::encode(&mut body, registry) {
                Ok(()) => ("200 OK", CONTENT_TYPE, body),
                Err(_) => {
                    let body = "cannot encode the metrics\n".to_owned();
                    ("500 Internal Server Error", "text/plain", body)
                }
            }
        }
        (Some(b"GET"), _) => ("404 Not Found", "text/plain", "try /metrics\n".to_owned()),
        _ => (
            "405 Method Not Allowed",
            "text/plain",
            "GET /metrics\n".to_owned(),
        ),
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n",
        body.len()
    );
    let send = async {
        stream.write_all(head.as_bytes()).await?;
        stream.write_all(body.as_bytes()).await?;
        stream.shutdown().await
    };
    tokio::time::timeout(ANSWER_TIMEOUT, send)
        .await
        .map_err(|_| io::Error::from(io::ErrorKind::TimedOut))?
}

/// Writes metric families into a collector's encoder, one call per family.
pub struct Families<'a> {
    encoder: DescriptorEncoder<'a>,
}

impl<'a> Families<'a> {
    pub fn new(encoder: DescriptorEncoder<'a>) -> Self {
        Self { encoder }
    }

    /// A counter family: `name` gets the unit's suffix and `_total`.
    pub fn counter<L: EncodeLabelSet>(
        &mut self,
        name: &str,
        help: &str,
        unit: Option<Unit>,
        samples: impl IntoIterator<Item = (L, u64)>,
    ) -> fmt::Result {
        let mut family =
            self.encoder
                .encode_descriptor(name, help, unit.as_ref(), MetricType::Counter)?;
        for (labels, value) in samples {
            ConstCounter::new(value).encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }

    /// A gauge family: `name` gets the unit's suffix.
    pub fn gauge<L: EncodeLabelSet>(
        &mut self,
        name: &str,
        help: &str,
        unit: Option<Unit>,
        samples: impl IntoIterator<Item = (L, f64)>,
    ) -> fmt::Result {
        let mut family =
            self.encoder
                .encode_descriptor(name, help, unit.as_ref(), MetricType::Gauge)?;
        for (labels, value) in samples {
            ConstGauge::new(value).encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }

    /// A counter without labels.
    pub fn counter_of(&mut self, name: &str, help: &str, value: u64) -> fmt::Result {
        let family = self
            .encoder
            .encode_descriptor(name, help, None, MetricType::Counter)?;
        ConstCounter::new(value).encode(family)
    }

    /// A gauge without labels; none at all when `value` is `None`.
    pub fn gauge_of(
        &mut self,
        name: &str,
        help: &str,
        unit: Option<Unit>,
        value: Option<f64>,
    ) -> fmt::Result {
        let family =
            self.encoder
                .encode_descriptor(name, help, unit.as_ref(), MetricType::Gauge)?;
        match value {
            Some(value) => ConstGauge::new(value).encode(family),
            None => Ok(()),
        }
    }
}

/// A failure's reason as a label value: "handshake timed out" becomes "handshake_timed_out".
pub fn reason_label(reason: &str) -> String {
    reason
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use prometheus_client::collector::Collector;
    use tokio::net::TcpStream;

    use super::*;

    #[derive(Debug)]
    struct Fixed;

    impl Collector for Fixed {
        fn encode(&self, encoder: DescriptorEncoder) -> fmt::Result {
            let mut families = Families::new(encoder);
            families.counter(
                "received",
                "Bytes received.",
                Some(Unit::Bytes),
                [([("forward", "ssh")], 42)],
            )?;
            families.gauge(
                "rtt",
                "Round trip.",
                Some(Unit::Seconds),
                [([("agent", "dorm")], 0.25)],
            )
        }
    }

    async fn get(address: SocketAddr, request: &str) -> String {
        let mut stream = TcpStream::connect(address).await.unwrap();
        // The server may close before reading a request that is too long: a reset is as good
        // an answer as none.
        let _ = stream.write_all(request.as_bytes()).await;
        let mut answer = String::new();
        let _ = stream.read_to_string(&mut answer).await;
        answer
    }

    #[tokio::test]
    async fn serves_the_registry_on_get_metrics_and_nothing_else() {
        let test = async {
            let mut registry = Registry::with_prefix("tether_test");
            registry.register_collector(Box::new(Fixed));
            let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
            let address = listener.local_addr().unwrap();
            let stop = CancellationToken::new();
            tokio::spawn(serve(listener, registry, stop.clone()));

            let answer = get(address, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
            assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
            assert!(answer.contains(CONTENT_TYPE));
            assert!(answer.contains("tether_test_received_bytes_total{forward=\"ssh\"} 42\n"));
            assert!(answer.contains("tether_test_rtt_seconds{agent=\"dorm\"} 0.25\n"));
            assert!(answer.ends_with("# EOF\n"));

            let answer = get(address, "GET / HTTP/1.1\r\n\r\n").await;
            assert!(answer.starts_with("HTTP/1.1 404"), "{answer}");
            let answer = get(address, "POST /metrics HTTP/1.1\r\n\r\n").await;
            assert!(answer.starts_with("HTTP/1.1 405"), "{answer}");
            // A request that never ends is cut off at its limit, not buffered.
            let answer = get(address, &"X".repeat(MAX_REQUEST + 2048)).await;
            assert!(answer.is_empty());
            stop.cancel();
        };
        tokio::time::timeout(Duration::from_secs(10), test)
            .await
            .expect("the test timed out");
    }

    #[tokio::test]
    async fn idle_clients_do_not_keep_a_scrape_waiting() {
        let test = async {
            let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
            let address = listener.local_addr().unwrap();
            let stop = CancellationToken::new();
            tokio::spawn(serve(listener, Registry::default(), stop.clone()));
            // Twice as many idle connections as there are places, each sending half a request.
            let mut idle = Vec::new();
            for _ in 0..2 * MAX_CLIENTS {
                let mut stream = TcpStream::connect(address).await.unwrap();
                stream
                    .write_all(b"GET /metrics HTTP/1.1\r\n")
                    .await
                    .unwrap();
                idle.push(stream);
            }
            let started = tokio::time::Instant::now();
            let answer = get(address, "GET /metrics HTTP/1.1\r\n\r\n").await;
            assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
            let waited = started.elapsed();
            assert!(waited < REQUEST_TIMEOUT / 2, "the scrape waited {waited:?}");
            stop.cancel();
        };
        tokio::time::timeout(Duration::from_secs(10), test)
            .await
            .expect("the test timed out");
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_does_not_read_its_answer_is_given_up_on() {
        let mut registry = Registry::with_prefix("tether_test");
        registry.register_collector(Box::new(Fixed));
        // A connection whose client sent its request and reads nothing: it takes 64 bytes.
        let (server, mut client) = tokio::io::duplex(64);
        client
            .write_all(b"GET /metrics HTTP/1.1\r\n\r\n")
            .await
            .unwrap();
        let answering = AtomicBool::new(false);
        let started = tokio::time::Instant::now();
        let answered = answer(server, &registry, &answering);
        let error = tokio::time::timeout(ANSWER_TIMEOUT * 2, answered)
            .await
            .expect("the answer's own timeout")
            .unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::TimedOut);
        assert!(answering.load(Ordering::Acquire));
        assert_eq!(started.elapsed(), ANSWER_TIMEOUT);
    }

    #[test]
    fn reasons_become_label_values() {
        assert_eq!(reason_label("agent key not listed"), "agent_key_not_listed");
        assert_eq!(
            reason_label("TLS or QUIC handshake failed"),
            "tls_or_quic_handshake_failed"
        );
    }
}
