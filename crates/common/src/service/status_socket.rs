//! The local Unix socket that `tether-relay status` and `tether-agent status` ask the running
//! process on.
//!
//! The client sends one line, `status`; the process answers with one JSON document and closes
//! the connection. A process may answer other requests too (the relay's invites: see its
//! `invites` module), each a line that starts with the request's name, with a [`Handler`]
//! that goes on talking over the connection. The socket file is made mode 0600, and the process answers only root and its
//! own user (checked by the peer's credentials too, so a socket left in a wider folder by
//! mistake does not leak the state to other users).

use std::future::Future;
use std::io;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;

/// The request every process answers.
const REQUEST: &str = "status";

/// The longest request line read.
const MAX_REQUEST: u64 = 4096;

/// What answers a request other than `status`: given the request's line and the connection.
pub type Handler =
    Arc<dyn Fn(String, UnixStream) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

/// How long either side waits for the other.
const TIMEOUT: Duration = Duration::from_secs(5);

/// The largest answer a client reads: a relay with its 1,000 agents fits many times over.
const MAX_ANSWER: u64 = 64 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error("{path}: another process answers on this status socket")]
    InUse { path: PathBuf },
    #[error("{path} exists and is not a socket; choose another status_socket")]
    NotASocket { path: PathBuf },
    #[error("cannot open the status socket {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

/// A bound status socket; the file is removed when it is dropped.
pub struct StatusSocket {
    listener: UnixListener,
    path: PathBuf,
    /// Who may ask besides root: the user that owns the socket, which is this process's.
    owner: u32,
}

impl StatusSocket {
    /// Binds `path`, replacing a socket file that a process which is gone left behind. A
    /// missing folder is made, mode 0750 (as systemd makes the unit's runtime folder), so that
    /// `run` by hand answers `status` too.
    pub fn bind(path: &Path) -> Result<Self, BindError> {
        let io = |source| BindError::Io {
            path: path.to_owned(),
            source,
        };
        if let Some(folder) = path.parent().filter(|f| !f.as_os_str().is_empty()) {
            if !folder.exists() {
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o750)
                    .create(folder)
                    .map_err(io)?;
            }
        }
        match std::fs::symlink_metadata(path) {
            Ok(meta) if !meta.file_type().is_socket() => {
                return Err(BindError::NotASocket {
                    path: path.to_owned(),
                })
            }
            Ok(_) => {
                if std::os::unix::net::UnixStream::connect(path).is_ok() {
                    return Err(BindError::InUse {
                        path: path.to_owned(),
                    });
                }
                std::fs::remove_file(path).map_err(io)?;
            }
            Err(error) if error.kind() == io::ErrorKind::NotFound => {}
            Err(error) => return Err(io(error)),
        }
        let listener = UnixListener::bind(path).map_err(io)?;
        let mut socket = Self {
            listener,
            path: path.to_owned(),
            owner: 0,
        };
        // From here on, dropping `socket` removes the file again.
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
        socket.owner = std::fs::metadata(path).map_err(io)?.uid();
        Ok(socket)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Answers each request with what `answer` returns at that moment, until `shutdown` is
    /// cancelled.
    pub async fn serve(self, answer: impl Fn() -> String, shutdown: CancellationToken) {
        self.serve_with(answer, None, shutdown).await;
    }

    /// [`StatusSocket::serve`], with `other` answering requests other than `status`.
    pub async fn serve_with(
        self,
        answer: impl Fn() -> String,
        other: Option<Handler>,
        shutdown: CancellationToken,
    ) {
        loop {
            let stream = tokio::select! {
                () = shutdown.cancelled() => return,
                accepted = self.listener.accept() => match accepted {
                    Ok((stream, _)) => stream,
                    Err(error) => {
                        tracing::debug!(%error, "accepting a status client failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let uid = stream.peer_cred().map(|c| c.uid());
            if !matches!(uid, Ok(uid) if uid == 0 || uid == self.owner) {
                tracing::debug!(?uid, "status asked by another user; refused");
                continue;
            }
            // One small request at a time: a client that does not send it in time is dropped.
            let asked = tokio::time::timeout(TIMEOUT, read_request(stream)).await;
            if let Ok(Ok((stream, request))) = asked {
                if let Some(handler) = other.as_ref().filter(|_| request != REQUEST) {
                    tokio::spawn(handler(request, stream));
                    continue;
                }
                let body = if request == REQUEST {
                    answer()
                } else {
                    serde_json::json!({ "error": format!("unknown request {request:?}") })
                        .to_string()
                };
                tokio::spawn(async move {
                    let mut stream = stream;
                    let write = async {
                        stream.write_all(body.as_bytes()).await?;
                        stream.write_all(b"\n").await?;
                        stream.shutdown().await
                    };
                    let _ = tokio::time::timeout(TIMEOUT, write).await;
                });
            }
        }
    }
}

impl Drop for StatusSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

async fn read_request(stream: UnixStream) -> io::Result<(UnixStream, String)> {
    let mut reader = BufReader::new(stream).take(MAX_REQUEST);
    let mut line = String::new();
    reader.read_line(&mut line).await?;
    Ok((reader.into_inner().into_inner(), line.trim_end().to_owned()))
}

#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    #[error("no status socket at {path}: is the service running, with this status_socket?")]
    NotRunning { path: PathBuf },
    #[error("{path}: permission denied; ask as root or as the service's user")]
    Denied { path: PathBuf },
    #[error("{path}: no answer within {TIMEOUT:?}")]
    Timeout { path: PathBuf },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

/// Asks the process listening on `path` for its status; returns its JSON answer.
pub async fn query(path: &Path) -> Result<String, QueryError> {
    let exchange = async {
        let mut stream = UnixStream::connect(path).await?;
        stream.write_all(format!("{REQUEST}\n").as_bytes()).await?;
        let mut answer = String::new();
        (&mut stream)
            .take(MAX_ANSWER)
            .read_to_string(&mut answer)
            .await?;
        Ok::<_, io::Error>(answer)
    };
    let path = path.to_owned();
    match tokio::time::timeout(TIMEOUT, exchange).await {
        Err(_) => Err(QueryError::Timeout { path }),
        Ok(Ok(answer)) if answer.is_empty() => Err(QueryError::Denied { path }),
        Ok(Ok(answer)) => Ok(answer),
        Ok(Err(source)) => Err(query_error(path, source)),
    }
}

/// Sends `request` (a line without its newline) to the process listening on `path`, and
/// returns the connection, to read its answers and go on talking.
pub async fn open(path: &Path, request: &str) -> Result<BufReader<UnixStream>, QueryError> {
    let exchange = async {
        let mut stream = UnixStream::connect(path).await?;
        stream.write_all(format!("{request}\n").as_bytes()).await?;
        Ok::<_, io::Error>(BufReader::new(stream))
    };
    match tokio::time::timeout(TIMEOUT, exchange).await {
        Err(_) => Err(QueryError::Timeout {
            path: path.to_owned(),
        }),
        Ok(result) => result.map_err(|source| query_error(path.to_owned(), source)),
    }
}

fn query_error(path: PathBuf, source: io::Error) -> QueryError {
    match source.kind() {
        io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused => {
            QueryError::NotRunning { path }
        }
        io::ErrorKind::PermissionDenied => QueryError::Denied { path },
        _ => QueryError::Io { path, source },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn within<T>(test: impl std::future::Future<Output = T>) -> T {
        tokio::time::timeout(Duration::from_secs(10), test)
            .await
            .expect("the test timed out")
    }

    #[tokio::test]
    async fn answers_status_and_removes_its_file() {
        within(async {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("status.sock");
            let socket = StatusSocket::bind(&path).unwrap();
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
            let stop = CancellationToken::new();
            let served = tokio::spawn(socket.serve(|| "{\"ok\":1}".into(), stop.clone()));
            assert_eq!(query(&path).await.unwrap(), "{\"ok\":1}\n");
            assert_eq!(query(&path).await.unwrap(), "{\"ok\":1}\n");
            stop.cancel();
            served.await.unwrap();
            assert!(!path.exists());
            assert!(matches!(
                query(&path).await,
                Err(QueryError::NotRunning { .. })
            ));
        })
        .await;
    }

    #[tokio::test]
    async fn a_missing_folder_is_made_for_the_socket() {
        within(async {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("tether-relay").join("status.sock");
            let socket = StatusSocket::bind(&path).unwrap();
            let folder = std::fs::metadata(dir.path().join("tether-relay")).unwrap();
            assert_eq!(folder.permissions().mode() & 0o777, 0o750);
            let stop = CancellationToken::new();
            tokio::spawn(socket.serve(|| "{}".into(), stop.clone()));
            assert_eq!(query(&path).await.unwrap(), "{}\n");
            stop.cancel();
        })
        .await;
    }

    #[tokio::test]
    async fn a_stale_socket_is_replaced_and_a_live_one_is_not() {
        within(async {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("status.sock");
            // Left by a process that was killed: bound, and nobody listening any more.
            drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
            assert!(path.exists());
            let socket = StatusSocket::bind(&path).unwrap();
            assert!(matches!(
                StatusSocket::bind(&path),
                Err(BindError::InUse { .. })
            ));
            drop(socket);

            std::fs::write(&path, "not a socket").unwrap();
            assert!(matches!(
                StatusSocket::bind(&path),
                Err(BindError::NotASocket { .. })
            ));
            assert_eq!(std::fs::read_to_string(&path).unwrap(), "not a socket");
        })
        .await;
    }

    #[tokio::test]
    async fn an_unknown_request_gets_an_error_not_the_status() {
        within(async {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("status.sock");
            let socket = StatusSocket::bind(&path).unwrap();
            let stop = CancellationToken::new();
            tokio::spawn(socket.serve(|| "secret".into(), stop.clone()));
            let mut stream = UnixStream::connect(&path).await.unwrap();
            stream.write_all(b"reload\n").await.unwrap();
            let mut answer = String::new();
            stream.read_to_string(&mut answer).await.unwrap();
            assert_eq!(answer, "{\"error\":\"unknown request \\\"reload\\\"\"}\n");
            stop.cancel();
        })
        .await;
    }
}
