//! Telling systemd how the service is doing, as a `Type=notify` unit expects (sd_notify(3)):
//! `READY=1` once it serves, `STATUS=` lines for `systemctl status`, `WATCHDOG=1` while its event
//! loop runs, `STOPPING=1` when it drains. Each message is one datagram to the Unix socket named
//! by `$NOTIFY_SOCKET`; outside systemd nothing is sent.

use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// The service manager's notification socket, when there is one.
pub struct Systemd {
    socket: UnixDatagram,
    target: SocketAddr,
    /// How often to send `WATCHDOG=1`: half the unit's `WatchdogSec`, if it has one.
    watchdog_every: Option<Duration>,
}

impl Systemd {
    /// The socket named by `$NOTIFY_SOCKET`, or `None` when not started by systemd as a
    /// `Type=notify` service. A socket that cannot be used is logged once and ignored: the
    /// service still runs, and systemd reports the missing `READY=1`.
    pub fn from_env() -> Option<Self> {
        let path = std::env::var_os("NOTIFY_SOCKET")?;
        let path = path.to_str().unwrap_or_default();
        let target = match socket_address(path) {
            Ok(target) => target,
            Err(error) => {
                tracing::warn!(%error, "NOTIFY_SOCKET={path:?} is unusable; not notifying systemd");
                return None;
            }
        };
        let socket = match UnixDatagram::unbound().and_then(|s| {
            s.set_nonblocking(true)?;
            Ok(s)
        }) {
            Ok(socket) => socket,
            Err(error) => {
                tracing::warn!(%error, "cannot open a socket to notify systemd");
                return None;
            }
        };
        let watchdog_every = watchdog_interval(
            std::env::var("WATCHDOG_USEC").ok().as_deref(),
            std::env::var("WATCHDOG_PID").ok().as_deref(),
            std::process::id(),
        );
        Some(Self {
            socket,
            target,
            watchdog_every,
        })
    }

    /// Sends one message of `KEY=value` lines. A message systemd cannot take at once is
    /// dropped: the next status or watchdog message follows soon.
    fn send(&self, message: &str) {
        if let Err(error) = self.socket.send_to_addr(message.as_bytes(), &self.target) {
            tracing::debug!(%error, "cannot notify systemd");
        }
    }

    /// Says the service is ready with the first status line, then keeps systemd told: a new
    /// `STATUS=` line whenever `status` changes, `WATCHDOG=1` at half the watchdog interval,
    /// and `STOPPING=1` once `shutdown` is cancelled. Runs until `status`'s sender is gone.
    ///
    /// Being a task of the service's own runtime, the watchdog stops when that runtime stops
    /// running tasks, and systemd restarts the service.
    pub async fn report<T>(
        self,
        mut status: watch::Receiver<T>,
        line: impl Fn(&T) -> String,
        shutdown: CancellationToken,
    ) {
        let mut last = line(&status.borrow_and_update());
        self.send(&format!("READY=1\nSTATUS={last}"));
        let mut watchdog = self.watchdog_every.map(tokio::time::interval);
        let mut stopping = false;
        loop {
            tokio::select! {
                changed = status.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    let next = line(&status.borrow_and_update());
                    if next != last && !stopping {
                        self.send(&format!("STATUS={next}"));
                        last = next;
                    }
                }
                () = tick(&mut watchdog) => self.send("WATCHDOG=1"),
                () = shutdown.cancelled(), if !stopping => {
                    stopping = true;
                    self.send("STOPPING=1\nSTATUS=stopping");
                }
            }
        }
    }
}

/// Sends the notifications of [`Systemd::report`] if the service runs under systemd.
pub async fn report<T>(
    status: watch::Receiver<T>,
    line: impl Fn(&T) -> String,
    shutdown: CancellationToken,
) {
    if let Some(systemd) = Systemd::from_env() {
        systemd.report(status, line, shutdown).await;
    }
}

async fn tick(interval: &mut Option<tokio::time::Interval>) {
    match interval {
        Some(interval) => {
            interval.tick().await;
        }
        None => std::future::pending().await,
    }
}

/// `$NOTIFY_SOCKET` as an address: a path, or with a leading `@` a name in Linux's abstract
/// namespace.
pub(crate) fn socket_address(text: &str) -> Result<SocketAddr, String> {
    match text.strip_prefix('@') {
        Some(name) => abstract_address(name.as_bytes()),
        None if text.starts_with('/') => SocketAddr::from_pathname(text).map_err(|e| e.to_string()),
        None => Err("expected an absolute path or @name".to_string()),
    }
}

#[cfg(target_os = "linux")]
fn abstract_address(name: &[u8]) -> Result<SocketAddr, String> {
    use std::os::linux::net::SocketAddrExt;
    SocketAddr::from_abstract_name(name).map_err(|e| e.to_string())
}

#[cfg(not(target_os = "linux"))]
fn abstract_address(_: &[u8]) -> Result<SocketAddr, String> {
    Err("abstract sockets exist on Linux alone".to_string())
}

/// Half of `WATCHDOG_USEC`, if it is set for this process: `WATCHDOG_PID`, when present, must
/// be `pid`. A zero or unreadable interval means no watchdog.
fn watchdog_interval(usec: Option<&str>, for_pid: Option<&str>, pid: u32) -> Option<Duration> {
    if let Some(for_pid) = for_pid {
        if for_pid.parse::<u32>().ok()? != pid {
            return None;
        }
    }
    let usec: u64 = usec?.parse().ok().filter(|&usec| usec > 0)?;
    Some(Duration::from_micros(usec) / 2)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watchdog_interval_is_half_of_watchdog_usec() {
        assert_eq!(
            watchdog_interval(Some("1000000"), None, 7),
            Some(Duration::from_millis(500))
        );
        assert_eq!(
            watchdog_interval(Some("30000000"), Some("7"), 7),
            Some(Duration::from_secs(15))
        );
    }

    #[test]
    fn no_watchdog_for_another_process_or_a_bad_value() {
        assert_eq!(watchdog_interval(Some("1000000"), Some("8"), 7), None);
        assert_eq!(watchdog_interval(Some("1000000"), Some("x"), 7), None);
        assert_eq!(watchdog_interval(None, None, 7), None);
        assert_eq!(watchdog_interval(Some("0"), None, 7), None);
        assert_eq!(watchdog_interval(Some("-5"), None, 7), None);
        assert_eq!(watchdog_interval(Some("1s"), None, 7), None);
    }

    #[test]
    fn notify_socket_paths_and_abstract_names() {
        let path = socket_address("/run/systemd/notify").unwrap();
        assert_eq!(
            path.as_pathname(),
            Some(std::path::Path::new("/run/systemd/notify"))
        );
        assert!(socket_address("@/org/freedesktop/systemd1/notify/1").is_ok());
        assert!(socket_address("run/systemd/notify").is_err());
        assert!(socket_address("").is_err());
    }

    fn messages(socket: &UnixDatagram) -> Vec<String> {
        let mut buffer = [0; 512];
        let mut messages = Vec::new();
        while let Ok(n) = socket.recv(&mut buffer) {
            messages.push(String::from_utf8_lossy(&buffer[..n]).into_owned());
        }
        messages
    }

    #[tokio::test(start_paused = true)]
    async fn report_says_ready_status_watchdog_and_stopping() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let listener = UnixDatagram::bind(&path).unwrap();
        listener.set_nonblocking(true).unwrap();
        let systemd = Systemd {
            socket: UnixDatagram::unbound().unwrap(),
            target: SocketAddr::from_pathname(&path).unwrap(),
            watchdog_every: Some(Duration::from_millis(500)),
        };
        let (status, receiver) = watch::channel(0);
        let shutdown = CancellationToken::new();
        let report =
            tokio::spawn(systemd.report(receiver, |n| format!("{n} agents"), shutdown.clone()));

        tokio::time::sleep(Duration::from_millis(1200)).await;
        status.send_replace(2);
        status.send_replace(2);
        tokio::task::yield_now().await;
        shutdown.cancel();
        tokio::task::yield_now().await;
        status.send_replace(1);
        drop(status);
        report.await.unwrap();

        assert_eq!(
            messages(&listener),
            [
                "READY=1\nSTATUS=0 agents",
                "WATCHDOG=1",
                "WATCHDOG=1",
                "WATCHDOG=1",
                "STATUS=2 agents",
                "STOPPING=1\nSTATUS=stopping",
            ]
        );
    }

    #[tokio::test]
    async fn abstract_sockets_are_reached() {
        let name = format!("tether-notify-test-{}", std::process::id());
        let listener =
            UnixDatagram::bind_addr(&abstract_address(name.as_bytes()).unwrap()).unwrap();
        let systemd = Systemd {
            socket: UnixDatagram::unbound().unwrap(),
            target: socket_address(&format!("@{name}")).unwrap(),
            watchdog_every: None,
        };
        systemd.send("READY=1");
        let mut buffer = [0; 64];
        let n = listener.recv(&mut buffer).unwrap();
        assert_eq!(&buffer[..n], b"READY=1");
    }
}
