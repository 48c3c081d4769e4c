//! An HTTP CONNECT proxy on the way to the relay's TCP listener, as offices and campuses have
//! them: the agent asks the proxy for a tunnel to the relay, then speaks TLS through it.

use std::fmt;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::wire::text::printable;

/// The longest answer header accepted from a proxy.
const MAX_ANSWER: usize = 8 * 1024;

/// How long the proxy may take to answer.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the proxy is: `http://HOST:PORT` in agent.toml.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Proxy {
    pub host: String,
    pub port: u16,
}

impl fmt::Display for Proxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.host.contains(':') {
            true => write!(f, "http://[{}]:{}", self.host, self.port),
            false => write!(f, "http://{}:{}", self.host, self.port),
        }
    }
}

impl std::str::FromStr for Proxy {
    type Err = String;

    /// `http://HOST:PORT`, with an optional `/` after it; nothing else.
    fn from_str(text: &str) -> Result<Self, String> {
        let expected = || format!("expected http://HOST:PORT, got {text:?}");
        let rest = text
            .strip_prefix("http://")
            .ok_or_else(|| match text.split_once("://") {
                Some((scheme, _)) => {
                    format!("only http:// proxies (HTTP CONNECT) are supported, got {scheme}://")
                }
                None => expected(),
            })?;
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        if rest.contains('@') {
            return Err("proxy credentials (USER:PASSWORD@) are not supported".into());
        }
        if rest.contains('/') {
            return Err(expected());
        }
        let (host, port) = match rest.rsplit_once(':') {
            Some((host, port)) => (host, port),
            None => return Err(expected()),
        };
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        let port: u16 = port.parse().map_err(|_| expected())?;
        if host.is_empty() || port == 0 {
            return Err(expected());
        }
        Ok(Proxy {
            host: host.to_owned(),
            port,
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("cannot reach the proxy {proxy}: {source}")]
    Unreachable {
        proxy: Proxy,
        source: std::io::Error,
    },
    #[error("the proxy {proxy} failed while asked for {target}: {source}")]
    Io {
        proxy: Proxy,
        target: String,
        source: std::io::Error,
    },
    #[error("the proxy {proxy} did not answer within {ANSWER_TIMEOUT:?}")]
    Timeout { proxy: Proxy },
    #[error("the proxy {proxy} refused a tunnel to {target}: {answer}")]
    Refused {
        proxy: Proxy,
        target: String,
        answer: String,
    },
    #[error("the proxy {proxy} gave an answer that is not HTTP: {answer}")]
    NotHttp { proxy: Proxy, answer: String },
}

/// A TCP connection to `host`:`port` through `proxy`, ready for TLS.
pub async fn connect(proxy: &Proxy, host: &str, port: u16) -> Result<TcpStream, ProxyError> {
    let mut tcp = TcpStream::connect((proxy.host.as_str(), proxy.port))
        .await
        .map_err(|source| ProxyError::Unreachable {
            proxy: proxy.clone(),
            source,
        })?;
    let target = match host.contains(':') {
        true => format!("[{host}]:{port}"),
        false => format!("{host}:{port}"),
    };
    let io = |source| ProxyError::Io {
        proxy: proxy.clone(),
        target: target.clone(),
        source,
    };
    let ask = async {
        let request = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n");
        tcp.write_all(request.as_bytes()).await.map_err(io)?;
        read_answer(&mut tcp).await.map_err(io)
    };
    let answer = tokio::time::timeout(ANSWER_TIMEOUT, ask)
        .await
        .map_err(|_| ProxyError::Timeout {
            proxy: proxy.clone(),
        })??;
    let status_line = answer.lines().next().unwrap_or_default();
    let status = parse_status(status_line).ok_or_else(|| ProxyError::NotHttp {
        proxy: proxy.clone(),
        answer: printable(status_line),
    })?;
    if !(200..300).contains(&status) {
        return Err(ProxyError::Refused {
            proxy: proxy.clone(),
            target,
            answer: printable(status_line),
        });
    }
    Ok(tcp)
}

/// Reads the proxy's answer up to the blank line that ends its header, and not a byte past
/// it: what follows belongs to TLS.
async fn read_answer(tcp: &mut TcpStream) -> std::io::Result<String> {
    let mut answer = Vec::with_capacity(256);
    let mut byte = [0u8; 1];
    while !answer.ends_with(b"\r\n\r\n") {
        if answer.len() >= MAX_ANSWER {
            let why = format!("an answer header longer than {MAX_ANSWER} bytes");
            return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, why));
        }
        if tcp.read(&mut byte).await? == 0 {
            let why = "the proxy closed the connection before it answered";
            return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, why));
        }
        answer.push(byte[0]);
    }
    Ok(String::from_utf8_lossy(&answer).into_owned())
}

/// The status code of `HTTP/1.x NNN reason`.
fn parse_status(line: &str) -> Option<u16> {
    let mut parts = line.split_whitespace();
    let version = parts.next()?;
    if !version.starts_with("HTTP/1.") {
        return None;
    }
    let code = parts.next()?;
    if code.len() != 3 {
        return None;
    }
    code.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    const WAIT: Duration = Duration::from_secs(5);

    #[test]
    fn a_proxy_is_written_http_host_port() {
        let proxy: Proxy = "http://proxy.example:3128".parse().unwrap();
        assert_eq!((proxy.host.as_str(), proxy.port), ("proxy.example", 3128));
        assert_eq!(proxy.to_string(), "http://proxy.example:3128");
        let v6: Proxy = "http://[2001:db8::1]:8080/".parse().unwrap();
        assert_eq!((v6.host.as_str(), v6.port), ("2001:db8::1", 8080));
        assert_eq!(v6.to_string(), "http://[2001:db8::1]:8080");
        for (bad, says) in [
            ("proxy.example:3128", "expected http://HOST:PORT"),
            ("https://proxy.example:3128", "only http:// proxies"),
            ("socks5://proxy.example:1080", "only http:// proxies"),
            ("http://proxy.example", "expected http://HOST:PORT"),
            ("http://proxy.example:0", "expected http://HOST:PORT"),
            ("http://proxy.example:99999", "expected http://HOST:PORT"),
            ("http://:3128", "expected http://HOST:PORT"),
            ("http://user:pw@proxy.example:3128", "credentials"),
            (
                "http://proxy.example:3128/path",
                "expected http://HOST:PORT",
            ),
        ] {
            let error = bad.parse::<Proxy>().unwrap_err();
            assert!(error.contains(says), "{bad}: {error}");
        }
    }

    #[test]
    fn the_status_is_read_from_an_http_1_status_line() {
        assert_eq!(
            parse_status("HTTP/1.1 200 Connection established"),
            Some(200)
        );
        assert_eq!(parse_status("HTTP/1.0 403 Forbidden"), Some(403));
        assert_eq!(parse_status("SSH-2.0-OpenSSH_9.2"), None);
        assert_eq!(parse_status("HTTP/1.1 2000 x"), None);
        assert_eq!(parse_status(""), None);
    }

    /// A proxy that reads one request and gives `answer`; returns its address and what it read.
    async fn proxy_answering(answer: &'static [u8]) -> (Proxy, tokio::task::JoinHandle<String>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let task = tokio::spawn(async move {
            let (mut tcp, _) = listener.accept().await.unwrap();
            let request = read_answer(&mut tcp).await.unwrap();
            tcp.write_all(answer).await.unwrap();
            // What follows the answer is the tunnel: echo one message through it.
            let mut buf = [0u8; 5];
            if tcp.read_exact(&mut buf).await.is_ok() {
                tcp.write_all(&buf).await.unwrap();
            }
            request
        });
        let proxy = Proxy {
            host: "127.0.0.1".into(),
            port,
        };
        (proxy, task)
    }

    #[tokio::test]
    async fn a_tunnel_is_asked_for_and_carries_bytes_once_granted() {
        let run = async {
            let (proxy, task) =
                proxy_answering(b"HTTP/1.1 200 Connection established\r\n\r\n").await;
            let mut tcp = connect(&proxy, "relay.example", 4433).await.unwrap();
            tcp.write_all(b"hello").await.unwrap();
            let mut echo = [0u8; 5];
            tcp.read_exact(&mut echo).await.unwrap();
            assert_eq!(&echo, b"hello");
            let request = task.await.unwrap();
            assert_eq!(
                request,
                "CONNECT relay.example:4433 HTTP/1.1\r\nHost: relay.example:4433\r\n\r\n"
            );
        };
        tokio::time::timeout(WAIT, run).await.unwrap();
    }

    #[tokio::test]
    async fn a_refusal_or_a_stranger_is_an_error_that_names_the_proxy() {
        let run = async {
            let (proxy, _task) =
                proxy_answering(b"HTTP/1.1 403 Forbidden\r\nX: \x1b[31m\r\n\r\n").await;
            let error = connect(&proxy, "relay.example", 443).await.unwrap_err();
            let text = error.to_string();
            assert!(text.contains(&proxy.to_string()), "{text}");
            assert!(
                text.contains("refused a tunnel to relay.example:443"),
                "{text}"
            );
            assert!(text.contains("403 Forbidden"), "{text}");

            let (proxy, _task) = proxy_answering(b"SSH-2.0-\x1b[2J\r\n\r\n").await;
            let error = connect(&proxy, "relay.example", 443).await.unwrap_err();
            let text = error.to_string();
            assert!(text.contains("not HTTP"), "{text}");
            assert!(!text.contains('\x1b'), "escaped: {text}");

            let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let proxy = Proxy {
                host: "127.0.0.1".into(),
                port: closed.local_addr().unwrap().port(),
            };
            drop(closed);
            let error = connect(&proxy, "relay.example", 443).await.unwrap_err();
            assert!(
                error
                    .to_string()
                    .starts_with(&format!("cannot reach the proxy {proxy}")),
                "{error}"
            );
        };
        tokio::time::timeout(WAIT, run).await.unwrap();
    }
}
