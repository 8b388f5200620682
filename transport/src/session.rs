//! What both ends of a session share: settings, the sources a sender reads
//! and the sinks a receiver writes, metrics, and a small cross-core mailbox.

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use dwcp_codec::Policy;

use crate::auth::Key;
use crate::wire::WirePolicy;

/// Default chunk size: 1 MiB.
pub const DEFAULT_CHUNK: u32 = 1 << 20;
/// Default credit per stream: 4 chunks.
pub const DEFAULT_WINDOW: u32 = 4 << 20;
/// Most data streams in a session.
pub const MAX_STREAMS: u16 = 64;
/// Largest chunk a receiver accepts by default (and at most).
pub const MAX_CHUNK: u32 = 16 << 20;
/// Default reorder window of a receiver's ordered regions: 64 MiB.
pub const DEFAULT_REORDER: u64 = 64 << 20;

/// How many data streams a sender opens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamCount {
    /// Exactly this many (1..=64).
    Fixed(u16),
    /// Start with two per engine worker (at least 2) and add streams, up to
    /// `max`, while measured throughput still grows (see docs/transport.md).
    Auto {
        /// At most this many.
        max: u16,
    },
}

/// Settings of a sending session.
#[derive(Debug, Clone)]
pub struct SenderConfig {
    /// The pre-shared key; `None` runs without authentication, which the
    /// receiver accepts only when it was started that way too.
    pub key: Option<Key>,
    /// Data streams.
    pub streams: StreamCount,
    /// Codec policy for chunks.
    pub policy: Policy,
    /// Bytes per chunk.
    pub chunk: u32,
    /// `TCP_CONGESTION` of every stream (`bbr` by default); `None` keeps the
    /// system's default. A name the kernel lacks is reported in the metrics
    /// and the system's default is used.
    pub congestion: Option<String>,
    /// Session-wide rate limit in bytes on the wire per second; 0 for none.
    pub rate_limit: u64,
    /// Connecting and joining, per attempt.
    pub connect_timeout: Duration,
    /// A stream holding unacknowledged chunks that hears nothing for this
    /// long is declared failed.
    pub stall_timeout: Duration,
    /// How long the sender keeps trying to get the session back after
    /// every connection failed.
    pub resume_for: Duration,
}

impl Default for SenderConfig {
    fn default() -> Self {
        SenderConfig {
            key: None,
            streams: StreamCount::Fixed(4),
            policy: Policy::Datacenter,
            chunk: DEFAULT_CHUNK,
            congestion: Some("bbr".into()),
            rate_limit: 0,
            connect_timeout: Duration::from_secs(10),
            stall_timeout: Duration::from_secs(10),
            resume_for: Duration::from_secs(30),
        }
    }
}

/// Settings of a receiver.
#[derive(Debug, Clone)]
pub struct ReceiverConfig {
    /// The pre-shared key; `None` accepts only unauthenticated sessions
    /// (`--insecure-no-auth`).
    pub key: Option<Key>,
    /// Credit of each data stream, in chunk bytes.
    pub window: u32,
    /// Largest chunk accepted.
    pub max_chunk: u32,
    /// Most data streams per session.
    pub max_streams: u16,
    /// How long a session whose connections all failed is kept for the
    /// sender to resume it.
    pub grace: Duration,
    /// Most sessions at once.
    pub max_sessions: usize,
    /// A connection that sends nothing for this long while a message is
    /// expected is closed.
    pub idle_timeout: Duration,
    /// Chunk bytes of ordered regions a session may hold out of order
    /// (rounded down to 64 KiB, at most 4 GiB); 0 refuses ordered regions.
    pub reorder_bytes: u64,
}

impl Default for ReceiverConfig {
    fn default() -> Self {
        ReceiverConfig {
            key: None,
            window: DEFAULT_WINDOW,
            max_chunk: MAX_CHUNK,
            max_streams: MAX_STREAMS,
            grace: Duration::from_secs(30),
            max_sessions: 64,
            idle_timeout: Duration::from_secs(60),
            reorder_bytes: DEFAULT_REORDER,
        }
    }
}

pub(crate) fn wire_policy(p: &Policy) -> WirePolicy {
    match *p {
        Policy::Stored => WirePolicy::None,
        Policy::Datacenter => WirePolicy::Datacenter,
        Policy::Internet { level } => WirePolicy::Internet(level.clamp(1, 22) as i8),
        Policy::Auto { .. } => WirePolicy::Auto,
    }
}

/// Where a sender reads a region's bytes: any core may read any range, so
/// it must be safe to share.
pub trait Source: Send + Sync + 'static {
    /// Length in bytes.
    fn len(&self) -> u64;
    /// Whether it is empty.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Fills `buf` with the bytes at `offset`.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
    /// All of its bytes, when they are in memory and cannot change: chunks
    /// are then encoded from where they lie instead of being copied out
    /// first, and a stored chunk is handed to the kernel from there, while
    /// the session holds the source (so the bytes must be the same memory,
    /// unchanged, for as long as the source lives: borrowed from `self` or
    /// `'static`, as safe code gives).
    fn as_slice(&self) -> Option<&[u8]> {
        None
    }
}

/// Copies `buf.len()` bytes of `bytes` at `offset` into `buf`.
fn read_slice(bytes: &[u8], offset: u64, buf: &mut [u8]) -> io::Result<()> {
    let start = usize::try_from(offset).map_err(|_| io::ErrorKind::InvalidInput)?;
    let src = start
        .checked_add(buf.len())
        .and_then(|end| bytes.get(start..end))
        .ok_or(io::ErrorKind::UnexpectedEof)?;
    buf.copy_from_slice(src);
    Ok(())
}

impl Source for Arc<[u8]> {
    fn len(&self) -> u64 {
        <[u8]>::len(self) as u64
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        read_slice(self, offset, buf)
    }
    fn as_slice(&self) -> Option<&[u8]> {
        Some(self)
    }
}

impl Source for Vec<u8> {
    fn len(&self) -> u64 {
        <[u8]>::len(self) as u64
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        read_slice(self, offset, buf)
    }
    fn as_slice(&self) -> Option<&[u8]> {
        Some(self)
    }
}

/// A file read with `pread`, its length fixed when opened.
#[derive(Debug)]
pub struct FileSource {
    file: File,
    len: u64,
}

impl FileSource {
    /// Opens `file` of `len` bytes.
    pub fn new(file: File, len: u64) -> Self {
        FileSource { file, len }
    }
}

impl Source for FileSource {
    fn len(&self) -> u64 {
        self.len
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.file.read_exact_at(buf, offset).map_err(|e| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the file shrank while it was being sent",
                )
            } else {
                e
            }
        })
    }
}

/// A region as the receiver learns of it.
#[derive(Debug, Clone)]
pub struct RegionInfo {
    /// Its id in the session.
    pub region: u32,
    /// Its length; `None` for an ordered region (a byte stream), whose
    /// length is known only when it ends and whose bytes are written in
    /// order, each write starting where the previous one ended.
    pub len: Option<u64>,
    /// The sender's metadata (for files, see `files::FileMeta`).
    pub meta: Vec<u8>,
}

/// Where a receiver places regions.
pub trait Sink: Send + Sync + 'static {
    /// A region begins; refuse it with a reason, or return its writer.
    fn open(&self, info: &RegionInfo) -> Result<Arc<dyn RegionWriter>, String>;
}

/// Places the chunks of one region; called from any core, in any order
/// (in order, one write at a time, for an ordered region).
pub trait RegionWriter: Send + Sync {
    /// Writes `data` at `offset` (inside the region, checked by the caller).
    fn write_at(&self, offset: u64, data: &[u8]) -> Result<(), String>;
    /// [`RegionWriter::write_at`] of a chunk whose BLAKE3 `digest` the
    /// codec computed (and checked) already: a writer that assembles the
    /// region's digest from its pieces can take it instead of hashing the
    /// bytes again.
    fn write_digested(
        &self,
        offset: u64,
        data: &[u8],
        digest: &dwcp_codec::ChunkDigest,
    ) -> Result<(), String> {
        let _ = digest;
        self.write_at(offset, data)
    }
    /// Every chunk is placed and the region is `len` bytes long (what
    /// `OPEN` said, or for an ordered region everything written): check
    /// the whole region against `digest` (BLAKE3) and make it visible; an
    /// error discards it.
    fn finish(&self, len: u64, digest: &[u8; 32]) -> Result<(), String>;
    /// The region will never finish (session ended or failed): discard it.
    fn abort(&self);
}

/// Something that happened in a session, as told to an event callback
/// ([`crate::Sender::on_event`], [`crate::Receiver::on_event`]).
///
/// Callbacks run on the session's threads (engine workers among them), one
/// at a time and never under a lock of the session's state: they may read
/// its metrics, but should return quickly, as the session waits for them,
/// and must not block on the session (`wait_region`, `close`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// More of a region is done: `done` bytes acknowledged (sender) or
    /// placed (receiver), of `len` (`None` while an ordered region's length
    /// is not known).
    Progress {
        /// The session.
        session: [u8; 16],
        /// The region.
        region: u32,
        /// Bytes done so far.
        done: u64,
        /// Its length, when known.
        len: Option<u64>,
    },
    /// A region is finished: verified and handed over by the receiver, or
    /// failed (`error`).
    RegionDone {
        /// The session.
        session: [u8; 16],
        /// The region.
        region: u32,
        /// Why it failed; `None` when it was verified.
        error: Option<String>,
    },
    /// Data stream `stream` is up (sender).
    StreamUp {
        /// Its index.
        stream: usize,
    },
    /// Data stream `stream` failed (sender); what it held goes out on the
    /// others and it connects again.
    StreamFailed {
        /// Its index.
        stream: usize,
        /// Why.
        reason: String,
    },
    /// The sender got the session back after its control stream failed.
    Resumed,
    /// A connection was refused or failed before or while it served a
    /// session (receiver): a wrong key, a protocol error, a peer gone.
    /// The library never prints; a program that wants these logged
    /// prints them from here.
    ConnectionFailed {
        /// Who connected.
        peer: std::net::SocketAddr,
        /// Why it ended.
        reason: String,
    },
    /// Accepting a connection failed (out of descriptors, say); the
    /// receiver waits a little and goes on listening.
    AcceptFailed {
        /// Why.
        reason: String,
    },
}

/// An event callback.
pub type EventFn = Arc<dyn Fn(&Event) + Send + Sync>;

/// Where a session's events go: one callback, settable at any time.
///
/// Events are made on several threads; they reach the callback one at a
/// time, and a region's progress only ever grows (a figure overtaken by a
/// later one made on another thread is dropped).
#[derive(Default)]
pub(crate) struct Events {
    f: Mutex<Option<EventFn>>,
    /// Held while the callback runs; the last progress told per
    /// `(session, region)` until its `RegionDone`.
    dispatch: Mutex<std::collections::HashMap<([u8; 16], u32), u64>>,
}

impl Events {
    pub(crate) fn set(&self, f: EventFn) {
        *lock(&self.f) = Some(f);
    }

    /// Tells the callback, if any, every event of `events`. Call without
    /// holding any lock of the session.
    pub(crate) fn emit(&self, events: impl IntoIterator<Item = Event>) {
        let Some(f) = lock(&self.f).clone() else {
            return;
        };
        let mut told = lock(&self.dispatch);
        for e in events {
            match &e {
                Event::Progress {
                    session,
                    region,
                    done,
                    ..
                } => {
                    let last = told.entry((*session, *region)).or_insert(0);
                    if *done <= *last {
                        continue;
                    }
                    *last = *done;
                }
                Event::RegionDone {
                    session, region, ..
                } => {
                    told.remove(&(*session, *region));
                }
                _ => {}
            }
            f(&e);
        }
    }

    /// Whether anyone listens (to skip building events for no one).
    pub(crate) fn wanted(&self) -> bool {
        lock(&self.f).is_some()
    }
}

/// Counters of a session, readable while it runs.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Application bytes handed to the session (sender) or placed
    /// (receiver).
    pub bytes_in: AtomicU64,
    /// Application bytes acknowledged (sender).
    pub bytes_acked: AtomicU64,
    /// Bytes of messages put on (sender) or taken from (receiver) the
    /// sockets.
    pub wire_bytes: AtomicU64,
    /// Chunks sent again after their stream failed.
    pub retransmitted_chunks: AtomicU64,
    /// Bytes of those.
    pub retransmitted_bytes: AtomicU64,
    /// Streams (re)connected over the session's life.
    pub stream_connects: AtomicU64,
    /// Streams that failed.
    pub stream_failures: AtomicU64,
    /// Session resumptions after a full disconnect.
    pub resumes: AtomicU64,
}

/// A copy of [`Metrics`] with derived figures.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct MetricsSnapshot {
    /// See [`Metrics::bytes_in`].
    pub bytes_in: u64,
    /// See [`Metrics::bytes_acked`].
    pub bytes_acked: u64,
    /// See [`Metrics::wire_bytes`].
    pub wire_bytes: u64,
    /// See [`Metrics::retransmitted_chunks`].
    pub retransmitted_chunks: u64,
    /// See [`Metrics::retransmitted_bytes`].
    pub retransmitted_bytes: u64,
    /// See [`Metrics::stream_connects`].
    pub stream_connects: u64,
    /// See [`Metrics::stream_failures`].
    pub stream_failures: u64,
    /// See [`Metrics::resumes`].
    pub resumes: u64,
    /// Streams up now.
    pub streams: u64,
    /// Bandwidth estimate of the link in wire bytes per second (sender),
    /// 0 before one.
    pub bandwidth: f64,
}

impl MetricsSnapshot {
    /// Application bytes per wire byte.
    pub fn ratio(&self) -> f64 {
        if self.wire_bytes == 0 {
            0.0
        } else {
            self.bytes_acked.max(self.bytes_in) as f64 / self.wire_bytes as f64
        }
    }
}

impl Metrics {
    pub(crate) fn snapshot(&self, streams: u64, bandwidth: f64) -> MetricsSnapshot {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        MetricsSnapshot {
            bytes_in: g(&self.bytes_in),
            bytes_acked: g(&self.bytes_acked),
            wire_bytes: g(&self.wire_bytes),
            retransmitted_chunks: g(&self.retransmitted_chunks),
            retransmitted_bytes: g(&self.retransmitted_bytes),
            stream_connects: g(&self.stream_connects),
            stream_failures: g(&self.stream_failures),
            resumes: g(&self.resumes),
            streams,
            bandwidth,
        }
    }

    pub(crate) fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }
}

/// Locks `m`, recovering from poisoning: every critical section in this
/// crate leaves the state consistent before it can panic.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Waits on `cond` for at most `d` with `g` held, recovering from poisoning
/// as [`lock`] does.
pub(crate) fn wait<'a, T>(cond: &Condvar, g: MutexGuard<'a, T>, d: Duration) -> MutexGuard<'a, T> {
    cond.wait_timeout(g, d)
        .map(|(g, _)| g)
        .unwrap_or_else(|p| p.into_inner().0)
}

/// A queue any thread may push to and one engine task awaits.
pub(crate) struct Mailbox<T> {
    inner: Mutex<MailboxInner<T>>,
}

struct MailboxInner<T> {
    queue: VecDeque<T>,
    waker: Option<Waker>,
    closed: bool,
}

impl<T> Mailbox<T> {
    pub(crate) fn new() -> Self {
        Mailbox {
            inner: Mutex::new(MailboxInner {
                queue: VecDeque::new(),
                waker: None,
                closed: false,
            }),
        }
    }

    /// Queues `t`; false when closed.
    pub(crate) fn push(&self, t: T) -> bool {
        let mut g = lock(&self.inner);
        if g.closed {
            return false;
        }
        g.queue.push_back(t);
        if let Some(w) = g.waker.take() {
            w.wake();
        }
        true
    }

    /// Discards everything queued.
    pub(crate) fn clear(&self) {
        lock(&self.inner).queue.clear();
    }

    /// Closes it: `recv` returns `None` once drained.
    pub(crate) fn close(&self) {
        let mut g = lock(&self.inner);
        g.closed = true;
        if let Some(w) = g.waker.take() {
            w.wake();
        }
    }

    /// The next item, or `None` when closed and drained.
    pub(crate) fn poll_recv(&self, cx: &mut Context<'_>) -> Poll<Option<T>> {
        let mut g = lock(&self.inner);
        if let Some(t) = g.queue.pop_front() {
            return Poll::Ready(Some(t));
        }
        if g.closed {
            return Poll::Ready(None);
        }
        g.waker = Some(cx.waker().clone());
        Poll::Pending
    }

    /// Awaits the next item.
    pub(crate) async fn recv(&self) -> Option<T> {
        std::future::poll_fn(|cx| self.poll_recv(cx)).await
    }
}
