//! A stand-in for systemd as a service's manager: the notify socket it listens on, the
//! descriptor store it keeps across the service's restarts (`FDSTORE=1`, `FDNAME=`,
//! `FDSTOREREMOVE=1`), and the start of the service's next process with the stored
//! descriptors as 3, 4, 5, … and `LISTEN_FDS`, `LISTEN_FDNAMES` and `LISTEN_PID` set, as
//! sd_listen_fds(3) reads them.

use std::io::IoSliceMut;
use std::mem::MaybeUninit;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use command_fds::{CommandFdExt, FdMapping};
use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags};
use tokio::process::Command;
use tokio::sync::Notify;

use crate::process::Process;

/// What the manager has seen and keeps.
#[derive(Default)]
struct Kept {
    /// Descriptors in the store, with their names, in the order they came.
    stored: Vec<(String, OwnedFd)>,
    /// Every notification's text, in order.
    messages: Vec<String>,
}

/// The notify socket and the store, served by a thread of their own.
pub struct Manager {
    path: PathBuf,
    kept: Arc<Mutex<Kept>>,
    changed: Arc<Notify>,
}

/// Descriptors one notification may carry, as the kernel allows.
const MAX_FDS: usize = 253;

impl Manager {
    /// Listens on a notify socket at `dir/name`.
    pub fn bind(dir: &Path, name: &str) -> Self {
        let path = dir.join(name);
        let socket = UnixDatagram::bind(&path).expect("notify socket");
        let kept = Arc::new(Mutex::new(Kept::default()));
        let changed = Arc::new(Notify::new());
        let (kept2, changed2) = (kept.clone(), changed.clone());
        std::thread::spawn(move || serve(socket, &kept2, changed2));
        Self {
            path,
            kept,
            changed,
        }
    }

    /// The notify socket's path, for `NOTIFY_SOCKET`.
    pub fn socket(&self) -> &Path {
        &self.path
    }

    /// How many descriptors the store holds now under `name`.
    pub fn stored(&self, name: &str) -> usize {
        self.lock().stored.iter().filter(|(n, _)| n == name).count()
    }

    /// Returns once every notification sent before this call has been taken in: the socket
    /// delivers in order, so a message of the manager's own, once seen, comes after them.
    pub async fn settle(&self) {
        let marker = format!("X_SETTLED={}", rand::random::<u64>());
        let socket = UnixDatagram::unbound().expect("a socket");
        socket.send_to(marker.as_bytes(), &self.path).expect("send");
        self.wait_for(&marker, 0).await;
    }

    /// Every notification so far.
    pub fn messages(&self) -> Vec<String> {
        self.lock().messages.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Kept> {
        self.kept.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits until a notification after the first `after` contains `text`; returns how many
    /// notifications there are then.
    pub async fn wait_for(&self, text: &str, after: usize) -> usize {
        crate::within(&format!("a notification with {text:?}"), async {
            loop {
                let changed = self.changed.notified();
                {
                    let kept = self.lock();
                    if kept.messages.iter().skip(after).any(|m| m.contains(text)) {
                        return kept.messages.len();
                    }
                }
                changed.await;
            }
        })
        .await
    }

    /// Starts the service's next process as systemd would: `command` with the stored
    /// descriptors handed over (the store keeps its own copies) and `NOTIFY_SOCKET` set.
    pub fn start(&self, program: &Path, args: &[&str]) -> Process {
        let kept = self.lock();
        let mut mappings = Vec::new();
        let mut names = Vec::new();
        for (index, (name, fd)) in kept.stored.iter().enumerate() {
            mappings.push(FdMapping {
                parent_fd: fd.try_clone().expect("dup a stored descriptor"),
                child_fd: 3 + index as i32,
            });
            names.push(name.clone());
        }
        drop(kept);
        // `exec` keeps the shell's pid, which LISTEN_PID must name.
        let mut command = Command::new("sh");
        command
            .arg("-c")
            .arg("export LISTEN_PID=$$; exec \"$0\" \"$@\"")
            .arg(program)
            .args(args)
            .env("NOTIFY_SOCKET", &self.path);
        if !names.is_empty() {
            command
                .env("LISTEN_FDS", names.len().to_string())
                .env("LISTEN_FDNAMES", names.join(":"));
        }
        command.fd_mappings(mappings).expect("descriptors mapped");
        Process::start(command)
    }
}

/// Receives notifications until the process ends: texts logged, descriptors stored or
/// removed as the message says.
fn serve(socket: UnixDatagram, kept: &Mutex<Kept>, changed: Arc<Notify>) {
    let _ = socket.set_read_timeout(Some(Duration::from_millis(200)));
    let mut buffer = vec![0u8; 4096];
    let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
    loop {
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let mut iov = [IoSliceMut::new(&mut buffer)];
        let received =
            rustix::net::recvmsg(&socket, &mut iov, &mut control, RecvFlags::CMSG_CLOEXEC);
        let Ok(received) = received else {
            // Timed out: the manager may be gone.
            if Arc::strong_count(&changed) == 1 {
                return;
            }
            continue;
        };
        let mut fds = Vec::new();
        for message in control.drain() {
            if let RecvAncillaryMessage::ScmRights(rights) = message {
                fds.extend(rights);
            }
        }
        let text = String::from_utf8_lossy(&buffer[..received.bytes]).into_owned();
        let field = |key: &str| {
            text.lines()
                .find_map(|line| line.strip_prefix(key))
                .map(str::to_owned)
        };
        let mut kept = kept.lock().unwrap_or_else(|e| e.into_inner());
        let name = field("FDNAME=").unwrap_or_else(|| "stored".into());
        if field("FDSTORE=").as_deref() == Some("1") {
            kept.stored
                .extend(fds.into_iter().map(|fd| (name.clone(), fd)));
        } else if field("FDSTOREREMOVE=").as_deref() == Some("1") {
            kept.stored.retain(|(held, _)| *held != name);
        }
        kept.messages.push(text);
        drop(kept);
        changed.notify_waiters();
    }
}
