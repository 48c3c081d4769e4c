//! systemd's file descriptor store: descriptors a service hands systemd to keep across its
//! restarts, and gets back at its next start (sd_notify(3), "FDSTORE=1"; sd_listen_fds(3)).
//!
//! Sending is `sendmsg` with the descriptors attached (`SCM_RIGHTS`), through rustix's safe
//! wrapper. Receiving is the start of the process: systemd opens the stored descriptors as 3,
//! 4, 5, … and says how many in `LISTEN_FDS`, which [`take_passed`] turns into owned sockets
//! through `sd-listen-fds` (turning a descriptor number into an owned one is the one step safe
//! Rust cannot take itself).
//!
//! systemd keeps what it was handed until the service removes it (`FDSTOREREMOVE=1`) or is
//! stopped for good (not restarted): a service that took its descriptors back removes them at
//! once, so that a connection it closes is not kept open by the store.

use std::io::{self, IoSlice};
use std::os::fd::{BorrowedFd, OwnedFd};
use std::os::unix::net::UnixDatagram;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags};

/// Descriptors one message carries at most: the kernel's limit (`SCM_MAX_FD`).
pub const PER_MESSAGE: usize = 253;

/// How long sending one message may wait for systemd to take it.
const SEND_TIMEOUT: Duration = Duration::from_secs(5);

/// The descriptors systemd handed this process at its start, each with its name; empty if it
/// handed none, or if this was called before. Call it first thing, before anything else opens
/// a descriptor: each is owned from here on, and closed on exec.
pub fn take_passed() -> Vec<(String, OwnedFd)> {
    static TAKEN: AtomicBool = AtomicBool::new(false);
    if TAKEN.swap(true, Ordering::SeqCst) {
        return Vec::new();
    }
    let passed = match sd_listen_fds::get() {
        Ok(passed) => passed,
        Err(error) => {
            tracing::warn!(%error, "LISTEN_FDS is malformed; no descriptor taken from systemd");
            return Vec::new();
        }
    };
    let mut taken = Vec::with_capacity(passed.len());
    for (name, fd) in passed {
        let fd = fd.into_std();
        // A number `LISTEN_FDS` named but that is not open is not ours to close.
        if rustix::io::fcntl_setfd(&fd, rustix::io::FdFlags::CLOEXEC).is_err() {
            tracing::warn!("LISTEN_FDS names a descriptor that is not open; ignored");
            std::mem::forget(fd);
            continue;
        }
        taken.push((name.unwrap_or_default(), fd));
    }
    taken
}

/// Where the store is: systemd's notify socket, named by `$NOTIFY_SOCKET`.
pub struct Store {
    socket: UnixDatagram,
}

impl Store {
    /// The store of the service manager that started this process; `None` outside systemd.
    pub fn from_env() -> Option<io::Result<Self>> {
        let path = std::env::var_os("NOTIFY_SOCKET")?;
        Some(Self::at(path.to_str().unwrap_or_default()))
    }

    /// The store behind the notify socket `path` (a path, or `@name` for an abstract one).
    pub fn at(path: &str) -> io::Result<Self> {
        let target = super::notify::socket_address(path)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let socket = UnixDatagram::unbound()?;
        socket.connect_addr(&target)?;
        socket.set_write_timeout(Some(SEND_TIMEOUT))?;
        Ok(Self { socket })
    }

    /// Hands `fds` to systemd to keep under `name`, [`PER_MESSAGE`] at a time, waiting for
    /// systemd to take each message: for a service on its way out.
    pub fn keep(&self, name: &str, fds: &[BorrowedFd<'_>]) -> io::Result<()> {
        self.send_fds(name, fds, SendFlags::empty())
    }

    /// [`Store::keep`] without waiting: for a running service, which must not stall on a
    /// busy systemd; a message systemd cannot take at once fails with `WouldBlock`.
    pub fn keep_at_once(&self, name: &str, fds: &[BorrowedFd<'_>]) -> io::Result<()> {
        self.send_fds(name, fds, SendFlags::DONTWAIT)
    }

    fn send_fds(&self, name: &str, fds: &[BorrowedFd<'_>], flags: SendFlags) -> io::Result<()> {
        let message = format!("FDSTORE=1\nFDNAME={name}");
        for batch in fds.chunks(PER_MESSAGE) {
            let mut space =
                vec![std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(PER_MESSAGE))];
            let mut control = SendAncillaryBuffer::new(&mut space);
            if !control.push(SendAncillaryMessage::ScmRights(batch)) {
                return Err(io::Error::other("descriptors do not fit one message"));
            }
            let iov = [IoSlice::new(message.as_bytes())];
            rustix::net::sendmsg(&self.socket, &iov, &mut control, flags)?;
        }
        Ok(())
    }

    /// Asks systemd to close and forget every descriptor it keeps under `name`, without
    /// waiting for it to take the message.
    pub fn forget(&self, name: &str) -> io::Result<()> {
        let message = format!("FDSTOREREMOVE=1\nFDNAME={name}");
        rustix::net::send(&self.socket, message.as_bytes(), SendFlags::DONTWAIT)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags};
    use std::io::IoSliceMut;
    use std::os::fd::AsFd;

    /// The next message on `socket`: its text and how many descriptors came with it.
    fn receive(socket: &UnixDatagram) -> (String, usize) {
        let mut buffer = [0u8; 256];
        let mut space =
            vec![std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(PER_MESSAGE))];
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let mut iov = [IoSliceMut::new(&mut buffer)];
        let got = rustix::net::recvmsg(socket, &mut iov, &mut control, RecvFlags::CMSG_CLOEXEC)
            .expect("a message");
        let mut fds = 0;
        for message in control.drain() {
            if let RecvAncillaryMessage::ScmRights(rights) = message {
                fds += rights.count();
            }
        }
        (
            String::from_utf8_lossy(&buffer[..got.bytes]).into_owned(),
            fds,
        )
    }

    #[test]
    fn descriptors_go_to_the_store_in_messages_of_at_most_the_kernels_limit_and_come_out_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let systemd = UnixDatagram::bind(&path).unwrap();
        let store = Store::at(path.to_str().unwrap()).unwrap();
        let sockets: Vec<_> = (0..300)
            .map(|_| std::net::UdpSocket::bind("127.0.0.1:0").unwrap())
            .collect();
        let fds: Vec<_> = sockets.iter().map(AsFd::as_fd).collect();
        store.keep("tcp-2222", &fds).unwrap();
        store.keep_at_once("listen-udp", &fds[..1]).unwrap();
        store.forget("tcp-2222").unwrap();
        let kept = "FDSTORE=1\nFDNAME=tcp-2222".to_owned();
        assert_eq!(receive(&systemd), (kept.clone(), PER_MESSAGE));
        assert_eq!(receive(&systemd), (kept, 300 - PER_MESSAGE));
        assert_eq!(
            receive(&systemd),
            ("FDSTORE=1\nFDNAME=listen-udp".to_owned(), 1)
        );
        assert_eq!(
            receive(&systemd),
            ("FDSTOREREMOVE=1\nFDNAME=tcp-2222".to_owned(), 0)
        );
    }
}
