//! What lets a data stream outlive its session: per stream, the bytes sent and not yet confirmed
//! by the peer and the count of bytes received; per session, the confirmations to send (see
//! [`crate::wire::protocol`], "Resuming"); per side, the table of streams held.
//!
//! Offsets count the bytes of one direction of a stream from its start, across every session it
//! lived in. The end of a direction counts as one more byte, so that "received everything" and
//! "received everything and the end" are told apart.
//!
//! Memory is bounded twice: a stream keeps at most [`HELD_PER_STREAM`] unconfirmed bytes, and
//! all the streams of a table together at most [`HELD_PER_SESSION`]. A stream at either cap
//! reads nothing more from its TCP connection until the peer confirms, so the connection's
//! writer waits, as it would for any slow reader; while the session is away, nothing is read at
//! all. The caps are QUIC's own windows: the held bytes include those QUIC still has in flight
//! (the same memory), and QUIC lets no more than its windows be unread at the peer, so holding
//! bytes until the peer wrote them out costs little more memory than QUIC alone.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::{Notify, Semaphore};

use crate::transport::quic::{SESSION_WINDOW, STREAM_WINDOW};
use crate::wire::protocol::{SessionId, StreamHeader, StreamId, MAX_STREAMS_PER_FRAME};

/// Unconfirmed bytes one data stream keeps at most.
pub const HELD_PER_STREAM: usize = STREAM_WINDOW as usize;

/// Unconfirmed bytes all the data streams of one table keep at most.
pub const HELD_PER_SESSION: usize = SESSION_WINDOW as usize;

/// How long a stream's received offset may wait before it is confirmed to the peer.
const ACK_DELAY: Duration = Duration::from_millis(20);

/// A stream that has received this much since it last asked confirms at once, so that the
/// sender's held bytes stay well under its cap while bytes flow.
pub const ACK_EVERY: u64 = STREAM_WINDOW as u64 / 4;

/// The default of `resume_window`: how long each end holds the connections of a lost session.
pub const DEFAULT_RESUME_WINDOW: Duration = Duration::from_secs(300);

/// Why a held stream cannot go on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ResumeError {
    #[error("the peer no longer holds the stream")]
    Refused,
    #[error("the peer asked to resume from offset {offset}, outside the held {start}..={end}")]
    BadOffset { offset: u64, start: u64, end: u64 },
}

/// How a held stream continues once its session is back: `Link` makes the new data stream,
/// given the offset this side received up to. Built by the relay or the agent, which know how
/// their side of a resumed stream starts.
pub enum Resume {
    Link(Box<dyn FnOnce(u64) -> LinkFuture + Send>),
    /// The new session does not resume this stream.
    Close,
}

/// A new data stream for a held stream, or why there is none: `Ok(None)` if the new session
/// was lost too before the stream was set up (the stream waits for the next).
pub type LinkFuture = Pin<Box<dyn Future<Output = Result<Option<Link>, ResumeError>> + Send>>;

/// One session's data stream for a held stream.
pub struct Link {
    pub conn: quinn::Connection,
    pub send: quinn::SendStream,
    pub recv: quinn::RecvStream,
    /// How much of this side's bytes the peer has received: sending starts there.
    pub peer_received: u64,
    /// Where this side's received offsets are confirmed.
    pub acks: Arc<AckQueue>,
}

/// The bytes this side sent on a stream and the peer has not confirmed.
#[derive(Default)]
struct Outbox {
    /// Offset of the first held byte.
    start: u64,
    held: VecDeque<Bytes>,
    held_len: u64,
    /// Room taken by a reservation not yet used.
    reserved: u64,
    /// Whether the TCP connection's end was read: it follows the held bytes.
    ended: bool,
    /// The task to wake when the stream is revoked. A waker, not a `Notify`: the wait for it
    /// sits in every forwarded connection's future, and a `Notify`'s waiter would grow each
    /// by a hundred bytes, where this costs a reference.
    on_revoke: Option<Waker>,
    /// The highest offset the peer confirmed.
    confirmed: u64,
}

impl Outbox {
    /// The offset after the last byte sent, the end included.
    fn end(&self) -> u64 {
        self.start + self.held_len + u64::from(self.ended)
    }

    /// Notes that the peer received everything below `offset` (at most [`Outbox::end`]) and
    /// drops those bytes; returns how many were dropped.
    fn confirm(&mut self, offset: u64) -> u64 {
        self.confirmed = self.confirmed.max(offset);
        let mut drop = offset.saturating_sub(self.start).min(self.held_len);
        let dropped = drop;
        while drop > 0 {
            let Some(front) = self.held.front_mut() else {
                break;
            };
            let len = front.len() as u64;
            if len <= drop {
                self.held.pop_front();
                drop -= len;
            } else {
                let _ = front.split_to(drop as usize);
                drop = 0;
            }
        }
        self.start += dropped;
        self.held_len -= dropped;
        dropped
    }
}

/// One data stream, held across sessions: shared by the task that carries it and by the
/// session that passes the peer's confirmations on. There is one per forwarded connection, so
/// it is kept small: one lock, one wake-up for the one task that waits on it.
pub struct HeldStream {
    /// The stream's header as the relay first sent it; its id names the stream.
    pub header: StreamHeader,
    outbox: Mutex<Outbox>,
    per_stream: u64,
    session_room: Arc<Semaphore>,
    /// The peer's bytes written to TCP, and one more once the peer's end was seen.
    received: AtomicU64,
    peer_ended: AtomicBool,
    next: Mutex<Option<Resume>>,
    /// Woken when the peer confirms and when the stream is handed how it goes on: the task
    /// carrying the stream waits for one or the other, and checks again what it waits for.
    changed: Notify,
    /// Set when the stream must end wherever it is (see [`HeldStream::revoke`]).
    revoked: AtomicBool,
    /// When the stream was added, in seconds since the Unix epoch: what `status` shows.
    opened: u64,
}

/// Whatever a stream holds goes back to its table's room when the stream goes, however its
/// connection ended: a reset, an early close, a lost session never resumed. Nothing else needs
/// to remember to give it back.
impl Drop for HeldStream {
    fn drop(&mut self) {
        let outbox = self.outbox.get_mut().unwrap_or_else(|e| e.into_inner());
        let held = std::mem::take(&mut outbox.held_len);
        self.release_shared(held);
    }
}

/// All of a held stream at one moment: what a relay that restarts writes down for the process
/// that takes its connections over, which adds the stream again from it
/// ([`HeldStreams::restore`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub header: StreamHeader,
    /// When the stream was added, in seconds since the Unix epoch.
    pub opened: u64,
    /// The offset of the first byte held; `held` are the bytes from there on.
    pub start: u64,
    pub held: Bytes,
    /// Whether the TCP connection's end was read (it follows the held bytes).
    pub ended: bool,
    /// The highest offset the peer confirmed.
    pub confirmed: u64,
    /// The received offset (see [`HeldStream::received`]).
    pub received: u64,
    pub peer_ended: bool,
}

impl Snapshot {
    /// Whether the offsets agree with one another, as those of a stream that ran do: the peer
    /// confirmed at least up to the first byte held and at most what was sent, and a peer's end
    /// counts in the received offset.
    fn is_consistent(&self) -> bool {
        let end = self
            .start
            .checked_add(self.held.len() as u64 + u64::from(self.ended));
        end.is_some_and(|end| self.start <= self.confirmed && self.confirmed <= end)
            && (!self.peer_ended || self.received > 0)
    }
}

/// Room for one chunk taken from a stream's caps; what the chunk does not use goes back.
pub struct Reservation<'a> {
    stream: &'a HeldStream,
    len: u64,
    /// Whether the table's room was taken too, not only the stream's.
    shared: bool,
}

impl Reservation<'_> {
    /// Keeps `chunk`, sent now, until the peer confirms it; the room it does not use goes back.
    /// The chunk is no longer than the room reserved.
    pub fn hold(mut self, chunk: Bytes) {
        let len = chunk.len() as u64;
        debug_assert!(len <= self.len, "a chunk longer than its reservation");
        let mut outbox = self.stream.outbox();
        outbox.reserved -= self.len;
        outbox.held_len += len;
        outbox.held.push_back(chunk);
        drop(outbox);
        self.stream.release_shared(self.len.saturating_sub(len));
        self.len = 0;
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        if self.len > 0 {
            self.stream.outbox().reserved -= self.len;
            if self.shared {
                self.stream.release_shared(self.len);
            }
        }
    }
}

impl HeldStream {
    fn new(header: StreamHeader, per_stream: usize, session_room: Arc<Semaphore>) -> Self {
        Self {
            header,
            outbox: Mutex::default(),
            per_stream: per_stream as u64,
            session_room,
            received: AtomicU64::new(0),
            peer_ended: AtomicBool::new(false),
            next: Mutex::new(None),
            changed: Notify::new(),
            revoked: AtomicBool::new(false),
            opened: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        }
    }

    /// The stream as it is now; see [`Snapshot`]. Taken once nothing carries it any more, it
    /// is all the stream is.
    pub fn snapshot(&self) -> Snapshot {
        let outbox = self.outbox();
        let mut held = bytes::BytesMut::with_capacity(outbox.held_len as usize);
        for chunk in &outbox.held {
            held.extend_from_slice(chunk);
        }
        Snapshot {
            header: self.header,
            opened: self.opened,
            start: outbox.start,
            held: held.freeze(),
            ended: outbox.ended,
            confirmed: outbox.confirmed,
            received: self.received(),
            peer_ended: self.has_peer_ended(),
        }
    }

    /// When the stream was added.
    pub fn opened(&self) -> std::time::SystemTime {
        std::time::UNIX_EPOCH + Duration::from_secs(self.opened)
    }

    /// How many of this side's bytes the stream carried: sent, whether confirmed or not.
    pub fn sent(&self) -> u64 {
        let outbox = self.outbox();
        outbox.start + outbox.held_len
    }

    /// Ends the stream wherever it is, carrying bytes or waiting for a session: its connection
    /// may no longer go on (the visitor's address is no longer admitted).
    pub fn revoke(&self) {
        self.revoked.store(true, Ordering::Release);
        let waiting = self.outbox().on_revoke.take();
        if let Some(waker) = waiting {
            waker.wake();
        }
    }

    /// Completes once the stream is revoked. Only one task waits for it: the one that carries
    /// the stream.
    pub fn revoked(&self) -> impl Future<Output = ()> + '_ {
        poll_fn(|cx| {
            if self.revoked.load(Ordering::Acquire) {
                return Poll::Ready(());
            }
            let mut outbox = self.outbox();
            match &mut outbox.on_revoke {
                Some(waker) if waker.will_wake(cx.waker()) => {}
                waiting => *waiting = Some(cx.waker().clone()),
            }
            drop(outbox);
            // Read again under the lock's ordering: a revocation between the first read and
            // the waker's storing found no waker to wake.
            if self.revoked.load(Ordering::Acquire) {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
    }

    fn outbox(&self) -> MutexGuard<'_, Outbox> {
        self.outbox.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits until both caps have room for `len` more bytes, and takes it. Dropped while it
    /// waits, it takes nothing.
    pub async fn reserve(&self, len: usize) -> Reservation<'_> {
        let len64 = len as u64;
        loop {
            let changed = self.changed.notified();
            {
                let mut outbox = self.outbox();
                if outbox.held_len + outbox.reserved + len64 <= self.per_stream {
                    outbox.reserved += len64;
                    break;
                }
            }
            changed.await;
        }
        // From here the reservation gives the stream's room back if dropped.
        let mut reservation = Reservation {
            stream: self,
            len: len64,
            shared: false,
        };
        let count = u32::try_from(len).unwrap_or(u32::MAX);
        // The semaphore is never closed, so the acquire does not fail. The room is given back
        // by the reservation, or by a confirmation once the bytes are sent.
        if let Ok(shared) = self.session_room.acquire_many(count).await {
            shared.forget();
        }
        reservation.shared = true;
        reservation
    }

    fn release_shared(&self, len: u64) {
        if len > 0 {
            self.session_room.add_permits(len as usize);
        }
    }

    /// Notes that the TCP connection's end was read: it is sent after the held bytes.
    pub fn sent_end(&self) {
        self.outbox().ended = true;
    }

    /// Whether the TCP connection's end was read.
    pub fn ended_sending(&self) -> bool {
        self.outbox().ended
    }

    /// Whether the peer confirmed everything, the end included.
    pub fn all_confirmed(&self) -> bool {
        let outbox = self.outbox();
        outbox.ended && outbox.confirmed == outbox.end()
    }

    /// Waits until the peer confirmed everything, the end included.
    pub async fn until_all_confirmed(&self) {
        loop {
            let changed = self.changed.notified();
            if self.all_confirmed() {
                return;
            }
            changed.await;
        }
    }

    /// The peer has received everything below `offset`: those bytes are forgotten and their
    /// room is freed. An offset past what was sent is refused and changes nothing.
    pub fn confirm(&self, offset: u64) -> Result<(), ResumeError> {
        let mut outbox = self.outbox();
        let end = outbox.end();
        if offset > end {
            return Err(ResumeError::BadOffset {
                offset,
                start: outbox.start,
                end,
            });
        }
        let dropped = outbox.confirm(offset);
        drop(outbox);
        self.release_shared(dropped);
        self.changed.notify_one();
        Ok(())
    }

    /// The bytes the peer lacks when it has received up to `offset`, to send again on a new
    /// data stream; `offset` also counts as a confirmation. Refused if the bytes from `offset`
    /// on are no longer held (the peer confirmed them before) or were never sent.
    pub fn missed_from(&self, offset: u64) -> Result<Vec<Bytes>, ResumeError> {
        let mut outbox = self.outbox();
        let end = outbox.end();
        if offset < outbox.start || offset > end {
            return Err(ResumeError::BadOffset {
                offset,
                start: outbox.start,
                end,
            });
        }
        let dropped = outbox.confirm(offset);
        let missed = outbox.held.iter().cloned().collect();
        drop(outbox);
        self.release_shared(dropped);
        self.changed.notify_one();
        Ok(missed)
    }

    /// Whether the peer is known to have seen the stream: it confirmed or sent a byte.
    pub fn seen_by_peer(&self) -> bool {
        self.received() > 0 || self.outbox().confirmed > 0
    }

    /// The bytes held now, unconfirmed.
    pub fn held(&self) -> u64 {
        self.outbox().held_len
    }

    /// The received offset: the peer's bytes written to TCP, plus one once its end was seen.
    pub fn received(&self) -> u64 {
        self.received.load(Ordering::Acquire)
    }

    /// Counts `len` more of the peer's bytes written to TCP.
    pub fn add_received(&self, len: usize) {
        self.received.fetch_add(len as u64, Ordering::AcqRel);
    }

    /// Notes the peer's end of stream; returns false if it was seen before.
    pub fn peer_ended(&self) -> bool {
        if self.peer_ended.swap(true, Ordering::AcqRel) {
            return false;
        }
        self.received.fetch_add(1, Ordering::AcqRel);
        true
    }

    /// Whether the peer's end of stream was seen.
    pub fn has_peer_ended(&self) -> bool {
        self.peer_ended.load(Ordering::Acquire)
    }

    /// Hands the stream how it goes on, replacing what was handed before and not taken yet.
    pub fn resume(&self, next: Resume) {
        *self.next.lock().unwrap_or_else(|e| e.into_inner()) = Some(next);
        self.changed.notify_one();
    }

    /// Waits for how the stream goes on.
    pub async fn next(&self) -> Resume {
        loop {
            let changed = self.changed.notified();
            if let Some(next) = self.next.lock().unwrap_or_else(|e| e.into_inner()).take() {
                return next;
            }
            changed.await;
        }
    }
}

/// The received offsets of one session's streams, waiting to be confirmed to the peer in
/// [`crate::wire::protocol::Acks`] frames.
#[derive(Default)]
pub struct AckQueue {
    state: Mutex<AckState>,
    wake: Notify,
}

#[derive(Default)]
struct AckState {
    offsets: HashMap<StreamId, u64>,
    /// When the oldest offset waiting was queued.
    since: Option<Instant>,
    urgent: bool,
}

impl AckQueue {
    /// Queues stream `id`'s received offset; `urgent` sends it without the usual delay.
    pub fn received(&self, id: StreamId, offset: u64, urgent: bool) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.offsets.insert(id, offset);
        let first = state.since.is_none();
        state.since.get_or_insert_with(Instant::now);
        let wake = first || (urgent && !state.urgent);
        state.urgent |= urgent;
        drop(state);
        if wake {
            self.wake.notify_one();
        }
    }

    /// Waits until offsets are due and takes them, at most [`MAX_STREAMS_PER_FRAME`]; the rest
    /// stay due. Safe to drop while waiting: nothing is lost.
    pub async fn next_batch(&self) -> Vec<(StreamId, u64)> {
        loop {
            let woken = self.wake.notified();
            let due_at = {
                let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
                match state.since {
                    None => None,
                    Some(since) if state.urgent || since.elapsed() >= ACK_DELAY => {
                        return take_batch(&mut state);
                    }
                    Some(since) => Some(since + ACK_DELAY),
                }
            };
            match due_at {
                None => woken.await,
                Some(at) => {
                    tokio::select! {
                        () = woken => {}
                        () = tokio::time::sleep_until(at.into()) => {}
                    }
                }
            }
        }
    }
}

fn take_batch(state: &mut AckState) -> Vec<(StreamId, u64)> {
    let batch: Vec<(StreamId, u64)> = if state.offsets.len() <= MAX_STREAMS_PER_FRAME {
        state.offsets.drain().collect()
    } else {
        let ids: Vec<StreamId> = state
            .offsets
            .keys()
            .take(MAX_STREAMS_PER_FRAME)
            .copied()
            .collect();
        ids.into_iter()
            .filter_map(|id| Some((id, state.offsets.remove(&id)?)))
            .collect()
    };
    if state.offsets.is_empty() {
        state.since = None;
        state.urgent = false;
    }
    batch
}

/// The data streams one side holds, by id, with the session each belongs to, and the room
/// they share.
pub struct HeldStreams {
    streams: Mutex<HashMap<StreamId, (Arc<HeldStream>, SessionId)>>,
    per_stream: usize,
    room: Arc<Semaphore>,
    /// Every stream ever added, held or not, since the peer's numbering last started over.
    added: Mutex<SeenIds>,
}

/// Gaps below the newest id [`SeenIds`] keeps at most; past that the oldest are taken as seen.
const MAX_GAPS: usize = 4096;

/// A set of stream ids, for ids given in about increasing order: every id below `below`, and
/// those in `above`. Its size is that of the gaps, not of the ids seen. Past [`MAX_GAPS`], the
/// oldest gaps are taken as seen: a stream never seen is then refused, never taken twice.
#[derive(Debug, Default)]
struct SeenIds {
    /// `None` until the first id since the numbering started over; ids below that one count as
    /// seen.
    below: Option<StreamId>,
    above: BTreeSet<StreamId>,
}

impl SeenIds {
    fn insert(&mut self, id: StreamId) {
        let below = self.below.get_or_insert(id);
        if id < *below {
            return;
        }
        self.above.insert(id);
        while self.above.len() > MAX_GAPS {
            if let Some(oldest) = self.above.pop_first() {
                *below = oldest + 1;
            }
        }
        while self.above.first() == Some(below) {
            self.above.pop_first();
            *below += 1;
        }
    }

    fn contains(&self, id: StreamId) -> bool {
        self.below.is_some_and(|below| id < below) || self.above.contains(&id)
    }
}

impl Default for HeldStreams {
    fn default() -> Self {
        Self::with_caps(HELD_PER_STREAM, HELD_PER_SESSION)
    }
}

/// A stream's place in [`HeldStreams`], given up when the stream ends.
pub struct Registration {
    streams: Arc<HeldStreams>,
    id: StreamId,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.streams.lock().remove(&self.id);
    }
}

impl HeldStreams {
    /// With other caps than the product's, for tests.
    pub fn with_caps(per_stream: usize, per_session: usize) -> Self {
        Self {
            streams: Mutex::default(),
            per_stream,
            room: Arc::new(Semaphore::new(per_session)),
            added: Mutex::default(),
        }
    }

    fn added(&self) -> MutexGuard<'_, SeenIds> {
        self.added.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether a stream of this id was added since the peer's numbering last started over,
    /// whether it is still held or not. A resumed stream that is not held but was added ended
    /// here, and its bytes may have reached TCP already: it must not be opened again.
    pub fn was_added(&self, id: StreamId) -> bool {
        self.added().contains(id)
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<StreamId, (Arc<HeldStream>, SessionId)>> {
        self.streams.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds the stream of `header` in `session`; `None` if a stream of that id is held already.
    pub fn add(
        self: &Arc<Self>,
        header: StreamHeader,
        session: SessionId,
    ) -> Option<(Arc<HeldStream>, Registration)> {
        self.insert(header.id, session, || {
            Some(HeldStream::new(header, self.per_stream, self.room.clone()))
        })
    }

    /// Holds the stream `make` builds as stream `id` of `session`; `None` if a stream of that
    /// id is held already (`make` is not called then), or if `make` builds none.
    fn insert(
        self: &Arc<Self>,
        id: StreamId,
        session: SessionId,
        make: impl FnOnce() -> Option<HeldStream>,
    ) -> Option<(Arc<HeldStream>, Registration)> {
        let mut streams = self.lock();
        if streams.contains_key(&id) {
            return None;
        }
        let stream = Arc::new(make()?);
        streams.insert(id, (stream.clone(), session));
        self.added().insert(id);
        let registration = Registration {
            streams: self.clone(),
            id,
        };
        Some((stream, registration))
    }

    /// Adds the stream of `snapshot` again, in the lost `session`, as it was when the snapshot
    /// was taken. `None` if it cannot be: a stream of that id is held already, its offsets do
    /// not agree, or its bytes do not fit the stream's cap or the room left.
    pub fn restore(
        self: &Arc<Self>,
        snapshot: Snapshot,
        session: SessionId,
    ) -> Option<(Arc<HeldStream>, Registration)> {
        let len = snapshot.held.len();
        if !snapshot.is_consistent() || len > self.per_stream {
            return None;
        }
        self.insert(snapshot.header.id, session, || {
            self.room
                .try_acquire_many(u32::try_from(len).ok()?)
                .ok()?
                .forget();
            let mut stream = HeldStream::new(snapshot.header, self.per_stream, self.room.clone());
            let outbox = stream.outbox.get_mut().unwrap_or_else(|e| e.into_inner());
            outbox.start = snapshot.start;
            outbox.confirmed = snapshot.confirmed;
            outbox.ended = snapshot.ended;
            outbox.held_len = len as u64;
            if len > 0 {
                outbox.held.push_back(snapshot.held);
            }
            *stream.received.get_mut() = snapshot.received;
            *stream.peer_ended.get_mut() = snapshot.peer_ended;
            stream.opened = snapshot.opened;
            Some(stream)
        })
    }

    /// Passes the peer's confirmations on; returns how many named a stream that is held and
    /// an offset past what it sent.
    pub fn confirm(&self, acks: &[(StreamId, u64)]) -> usize {
        let streams = self.lock();
        acks.iter()
            .filter(|(id, offset)| {
                streams
                    .get(id)
                    .is_some_and(|(stream, _)| stream.confirm(*offset).is_err())
            })
            .count()
    }

    /// Hands each stream of session `lost` how it goes on in session `now` (made by `link`,
    /// given the stream; `None` if it may not go on) and closes every other stream of any other
    /// session than `now`. Returns the ids of the streams that go on.
    pub fn resume(
        &self,
        lost: Option<SessionId>,
        now: SessionId,
        mut link: impl FnMut(&Arc<HeldStream>) -> Option<Resume>,
    ) -> Vec<StreamId> {
        let mut resumed = Vec::new();
        for (id, (stream, session)) in self.lock().iter_mut() {
            if *session == now {
                continue;
            }
            match link(stream).filter(|_| Some(*session) == lost) {
                Some(next) => {
                    stream.resume(next);
                    *session = now;
                    resumed.push(*id);
                }
                None => stream.resume(Resume::Close),
            }
        }
        resumed
    }

    /// Closes the streams not in `keep`, and moves those in it to session `now`; for the
    /// agent, once Welcome says which streams the relay resumes (`None`: none, and the relay
    /// may number new streams from the start again).
    pub fn keep_only(&self, keep: Option<&[StreamId]>, now: SessionId) {
        if keep.is_none() {
            *self.added() = SeenIds::default();
        }
        let keep: HashSet<StreamId> = keep.unwrap_or_default().iter().copied().collect();
        for (id, (stream, session)) in self.lock().iter_mut() {
            if keep.contains(id) {
                *session = now;
            } else if *session != now {
                stream.resume(Resume::Close);
            }
        }
    }

    /// Revokes every stream whose header `revoke` picks, wherever it is.
    pub fn revoke_where(&self, mut revoke: impl FnMut(&StreamHeader) -> bool) {
        for (stream, _) in self.lock().values() {
            if revoke(&stream.header) {
                stream.revoke();
            }
        }
    }

    /// Closes every stream held.
    pub fn close_all(&self) {
        for (stream, _) in self.lock().values() {
            stream.resume(Resume::Close);
        }
    }

    /// The held stream `id`, if any.
    pub fn get(&self, id: StreamId) -> Option<Arc<HeldStream>> {
        self.lock().get(&id).map(|(stream, _)| stream.clone())
    }

    /// Whether no stream is held: no connection is open, nor waits for its session.
    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    /// Every stream held now, oldest first.
    pub fn list(&self) -> Vec<Arc<HeldStream>> {
        let mut streams: Vec<Arc<HeldStream>> =
            self.lock().values().map(|(s, _)| s.clone()).collect();
        streams.sort_by_key(|s| s.header.id);
        streams
    }

    /// How many streams are held, and their unconfirmed bytes.
    pub fn usage(&self) -> (usize, u64) {
        let streams = self.lock();
        let bytes = streams.values().map(|(s, _)| s.held()).sum();
        (streams.len(), bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(id: StreamId) -> StreamHeader {
        StreamHeader {
            id,
            forward: 0,
            port: 2222,
            visitor: "203.0.113.9:40000".parse().unwrap(),
        }
    }

    async fn within<T>(test: impl Future<Output = T>) -> T {
        tokio::time::timeout(Duration::from_secs(10), test)
            .await
            .expect("the test took too long")
    }

    /// Whether `future` is still waiting after everything else that can run has run.
    async fn still_waiting(future: impl Future) -> bool {
        tokio::select! {
            biased;
            _ = future => false,
            () = tokio::task::yield_now() => true,
        }
    }

    #[tokio::test]
    async fn a_restored_stream_is_what_its_snapshot_was_and_takes_its_room_back_with_it() {
        within(async {
            let before = Arc::new(HeldStreams::with_caps(100, 150));
            let (stream, registration) = before.add(header(1), 7).unwrap();
            stream.reserve(60).await.hold(Bytes::from(vec![1; 60]));
            stream.confirm(20).unwrap();
            stream.add_received(33);
            stream.sent_end();
            let snapshot = stream.snapshot();
            assert_eq!((snapshot.start, snapshot.held.len()), (20, 40));
            drop((stream, registration));

            let after = Arc::new(HeldStreams::with_caps(100, 150));
            let (restored, registration) = after.restore(snapshot.clone(), 9).unwrap();
            assert_eq!(restored.snapshot(), snapshot);
            assert_eq!(restored.missed_from(30).unwrap().concat(), vec![1; 30]);
            assert!(
                after.restore(snapshot.clone(), 9).is_none(),
                "an id held already"
            );
            // The room its bytes take is the table's: 30 held of 150, so 120 more fit.
            let mut bigger = snapshot.clone();
            bigger.header = header(2);
            bigger.held = Bytes::from(vec![0; 100]);
            bigger.confirmed = bigger.start;
            let (second, second_registration) = after.restore(bigger.clone(), 9).unwrap();
            let mut third = bigger.clone();
            third.header = header(3);
            assert!(
                after.restore(third.clone(), 9).is_none(),
                "past the table's room"
            );
            drop((second, second_registration, restored, registration));
            assert!(after.restore(third, 9).is_some(), "room given back");
        })
        .await;
    }

    #[test]
    fn a_snapshot_whose_offsets_disagree_or_that_holds_too_much_is_not_restored() {
        let streams = Arc::new(HeldStreams::with_caps(100, 1000));
        let good = Snapshot {
            header: header(1),
            opened: 0,
            start: 10,
            held: Bytes::from(vec![0; 5]),
            ended: false,
            confirmed: 10,
            received: 0,
            peer_ended: false,
        };
        let bad = [
            Snapshot {
                confirmed: 9,
                ..good.clone()
            },
            Snapshot {
                confirmed: 16,
                ..good.clone()
            },
            Snapshot {
                peer_ended: true,
                ..good.clone()
            },
            Snapshot {
                start: u64::MAX - 2,
                confirmed: u64::MAX - 2,
                ..good.clone()
            },
            Snapshot {
                held: Bytes::from(vec![0; 101]),
                ..good.clone()
            },
        ];
        for snapshot in bad {
            assert!(
                streams.restore(snapshot.clone(), 1).is_none(),
                "{snapshot:?}"
            );
        }
        assert!(streams.restore(good, 1).is_some());
    }

    #[tokio::test]
    async fn a_stream_at_its_cap_waits_until_the_peer_confirms() {
        within(async {
            let streams = Arc::new(HeldStreams::with_caps(100, 1000));
            let (stream, _registration) = streams.add(header(1), 7).unwrap();
            stream.reserve(60).await.hold(Bytes::from(vec![1; 60]));
            stream.reserve(40).await.hold(Bytes::from(vec![2; 40]));
            assert_eq!(stream.held(), 100);
            assert!(still_waiting(stream.reserve(1)).await, "past the cap");
            // A confirmation frees exactly what it covers.
            stream.confirm(30).unwrap();
            assert_eq!(stream.held(), 70);
            let room = stream.reserve(30).await;
            assert!(still_waiting(stream.reserve(1)).await);
            // Room taken and not used goes back.
            room.hold(Bytes::from(vec![3; 10]));
            stream.reserve(20).await.hold(Bytes::from(vec![4; 20]));
            assert_eq!(stream.held(), 100);
        })
        .await;
    }

    #[tokio::test]
    async fn the_streams_of_a_table_share_its_cap() {
        within(async {
            let streams = Arc::new(HeldStreams::with_caps(100, 150));
            let (first, _one) = streams.add(header(1), 7).unwrap();
            let (second, _two) = streams.add(header(2), 7).unwrap();
            first.reserve(100).await.hold(Bytes::from(vec![0; 100]));
            second.reserve(50).await.hold(Bytes::from(vec![0; 50]));
            assert!(
                still_waiting(second.reserve(1)).await,
                "under its own cap, over the table's"
            );
            assert_eq!(streams.confirm(&[(1, 100)]), 0);
            second.reserve(50).await.hold(Bytes::from(vec![0; 50]));
            assert_eq!(streams.usage(), (2, 100));
            // The reservation dropped while it waited took nothing: the table is full at 150.
            first.reserve(50).await.hold(Bytes::from(vec![0; 50]));
            assert!(still_waiting(first.reserve(1)).await);
        })
        .await;
    }

    #[tokio::test]
    async fn what_the_peer_missed_is_sent_again_from_its_offset() {
        let streams = Arc::new(HeldStreams::default());
        let (stream, _registration) = streams.add(header(1), 7).unwrap();
        stream.reserve(6).await.hold(Bytes::from_static(b"hello "));
        stream.reserve(5).await.hold(Bytes::from_static(b"world"));
        stream.confirm(2).unwrap();
        let missed = stream.missed_from(4).unwrap();
        assert_eq!(missed.concat(), b"o world");
        // Below what is held, or past what was sent: refused, nothing changes.
        assert_eq!(
            stream.missed_from(3).unwrap_err(),
            ResumeError::BadOffset {
                offset: 3,
                start: 4,
                end: 11
            }
        );
        assert!(stream.missed_from(12).is_err());
        assert!(stream.confirm(12).is_err());
        assert_eq!(stream.held(), 7);
        // The end counts as one more byte: confirmed only once the peer saw it.
        stream.sent_end();
        stream.confirm(11).unwrap();
        assert!(!stream.all_confirmed());
        assert_eq!(stream.missed_from(11).unwrap(), Vec::<Bytes>::new());
        stream.confirm(12).unwrap();
        assert!(stream.all_confirmed());
    }

    #[test]
    fn a_stream_id_is_held_once_and_let_go_when_its_registration_drops() {
        let streams = Arc::new(HeldStreams::default());
        let (_stream, registration) = streams.add(header(1), 7).unwrap();
        assert!(streams.add(header(1), 7).is_none());
        drop(registration);
        assert!(streams.get(1).is_none());
        assert!(streams.add(header(1), 7).is_some());
    }

    #[tokio::test]
    async fn resuming_hands_on_the_lost_sessions_streams_and_closes_the_others() {
        within(async {
            let streams = Arc::new(HeldStreams::default());
            let (lost, _a) = streams.add(header(1), 7).unwrap();
            let (other, _b) = streams.add(header(2), 6).unwrap();
            let (new, _c) = streams.add(header(3), 8).unwrap();
            let resumed = streams.resume(Some(7), 8, |_| {
                Some(Resume::Link(Box::new(|_| Box::pin(async { Ok(None) }))))
            });
            assert_eq!(resumed, [1]);
            assert!(matches!(lost.next().await, Resume::Link(_)));
            assert!(matches!(other.next().await, Resume::Close));
            assert!(
                still_waiting(new.next()).await,
                "the new session's own stream"
            );
        })
        .await;
    }

    #[tokio::test]
    async fn a_stream_that_goes_gives_its_held_bytes_back_to_the_table() {
        within(async {
            let streams = Arc::new(HeldStreams::with_caps(100, 150));
            for round in 0..10 {
                let (stream, registration) = streams.add(header(round), 7).unwrap();
                stream.reserve(100).await.hold(Bytes::from(vec![0; 100]));
                // Dropped with everything unconfirmed, as on a reset.
                drop((stream, registration));
            }
            let (stream, _registration) = streams.add(header(99), 7).unwrap();
            stream.reserve(100).await.hold(Bytes::from(vec![0; 100]));
            let (other, _other) = streams.add(header(100), 7).unwrap();
            other.reserve(50).await.hold(Bytes::from(vec![0; 50]));
            assert!(still_waiting(other.reserve(1)).await, "the table is full");
        })
        .await;
    }

    #[test]
    fn streams_added_are_remembered_after_they_go_until_the_numbering_starts_over() {
        let streams = Arc::new(HeldStreams::default());
        for id in [1, 2, 4, 5] {
            drop(streams.add(header(id), 7));
        }
        assert!([1, 2, 4, 5].iter().all(|&id| streams.was_added(id)));
        assert!(!streams.was_added(3), "never added");
        assert!(!streams.was_added(6));
        streams.keep_only(Some(&[]), 8);
        assert!(streams.was_added(5), "a resumed session goes on numbering");
        streams.keep_only(None, 9);
        assert!(
            !streams.was_added(5),
            "a session not resumed may start over"
        );
    }

    #[test]
    fn seen_ids_keep_only_their_gaps_and_at_most_max_gaps() {
        let mut seen = SeenIds::default();
        for id in 1..=10_000 {
            seen.insert(id);
        }
        assert!(seen.above.is_empty() && seen.contains(10_000) && !seen.contains(10_001));
        // Every other id, far past the cap: the oldest gaps are taken as seen.
        for id in (10_002..10_002 + 4 * MAX_GAPS as u64).step_by(2) {
            seen.insert(id);
        }
        assert!(seen.above.len() <= MAX_GAPS);
        assert!(seen.contains(10_001), "the oldest gap counts as seen");
        let newest_gap = 10_001 + 4 * MAX_GAPS as u64 - 2;
        assert!(!seen.contains(newest_gap));
    }

    #[tokio::test]
    async fn a_revoked_stream_is_told_whether_it_waits_already_or_not() {
        within(async {
            let streams = Arc::new(HeldStreams::default());
            let (first, _a) = streams.add(header(1), 7).unwrap();
            let (second, _b) = streams.add(header(2), 7).unwrap();
            let waiting = tokio::spawn({
                let first = first.clone();
                async move { first.revoked().await }
            });
            tokio::task::yield_now().await;
            assert!(still_waiting(second.revoked()).await);
            streams.revoke_where(|header| header.id == 1);
            waiting.await.unwrap();
            assert!(still_waiting(second.revoked()).await, "only the one picked");
            second.revoke();
            second.revoked().await;
        })
        .await;
    }

    #[tokio::test(start_paused = true)]
    async fn confirmations_wait_a_little_unless_urgent_and_keep_the_latest_offset() {
        let acks = AckQueue::default();
        acks.received(1, 10, false);
        acks.received(1, 20, false);
        let started = tokio::time::Instant::now();
        assert_eq!(acks.next_batch().await, [(1, 20)]);
        // The timer's resolution is a millisecond.
        let waited = started.elapsed();
        assert!(waited >= ACK_DELAY && waited <= ACK_DELAY + Duration::from_millis(1));
        acks.received(2, 5, true);
        let started = tokio::time::Instant::now();
        assert_eq!(acks.next_batch().await, [(2, 5)]);
        assert_eq!(started.elapsed(), Duration::ZERO);
        // Dropped while waiting, nothing is lost.
        acks.received(3, 1, false);
        assert!(still_waiting(acks.next_batch()).await);
        assert_eq!(acks.next_batch().await, [(3, 1)]);
    }
}
