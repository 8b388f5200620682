//! Transfers for federation services: sessions that send buffers, files
//! and streams of buffers, and listeners that receive them.

use std::ffi::{c_char, c_void};
use std::io::Read;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::mpsc::{Receiver as ChanRx, RecvTimeoutError, SyncSender, sync_channel};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{SystemTime, UNIX_EPOCH};

use ::dwcp_engine::Engine;
use dwcp_codec::Policy;
use dwcp_transport::files::{DirSink, FileMeta, safe_relative};
use dwcp_transport::{
    Event, FileSource, MemorySink, MetricsSnapshot, Receiver, ReceiverConfig, Sender, SenderConfig,
    Sink, StreamCount, TransportError,
};

use crate::engine::{dwcp_engine, key_of};
use crate::ptr::{self, User, handle, millis, out, write};
use crate::status::{CANCELLED, Error, Result, call, call_void, copy_str_out, dwcp_status};

/// Codec policy: LZ4, for links faster than a core runs ZStd.
pub const DWCP_MODE_DATACENTER: u32 = 0;
/// Codec policy: ZStd, for slow links where ratio pays.
pub const DWCP_MODE_INTERNET: u32 = 1;
/// Codec policy: per frame, what delivers the most bytes per second on the
/// measured link.
pub const DWCP_MODE_AUTO: u32 = 2;
/// Codec policy: no compression.
pub const DWCP_MODE_NONE: u32 = 3;

/// Most data streams of a session.
const MAX_STREAMS: u32 = 64;

/// The codec policy named by a `DWCP_MODE_*` value; `link_bits` is the
/// link's rate for `DWCP_MODE_AUTO` (0: 10 Gbit/s until measured).
pub(crate) fn policy(mode: u32, link_bits: u64, what: &str) -> Result<Policy> {
    Ok(match mode {
        DWCP_MODE_DATACENTER => Policy::Datacenter,
        DWCP_MODE_INTERNET => Policy::internet(),
        DWCP_MODE_AUTO => Policy::Auto {
            link_bytes_per_sec: if link_bits > 0 {
                link_bits as f64 / 8.0
            } else {
                1.25e9
            },
        },
        DWCP_MODE_NONE => Policy::Stored,
        m => {
            return Err(Error::invalid(format!(
                "{what}: mode {m} is not a DWCP_MODE_* value"
            )));
        }
    })
}

/// Resolves `host:port`.
pub(crate) fn resolve(addr: &str) -> Result<SocketAddr> {
    Ok(dwcp_transport::resolve(addr)?)
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Options of an outgoing session. Initialise with
/// `dwcp_connect_options_default()`, then change what you need.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct dwcp_connect_options {
    /// The pre-shared key (32 bytes, see `dwcp_key_load()`), read during
    /// the call; NULL only together with `insecure_no_auth`.
    pub key: *const u8,
    /// Run without authentication (the peer must allow it too).
    pub insecure_no_auth: bool,
    /// Data streams, 1 to 64; 0 for automatic (start small, add streams
    /// while throughput grows).
    pub streams: u32,
    /// Codec policy of the chunks, a `DWCP_MODE_*` value.
    pub mode: u32,
    /// Rate limit in bits per second on the wire; 0 for none. Also the link
    /// rate `DWCP_MODE_AUTO` starts from.
    pub rate_limit: u64,
    /// Per connection attempt, in milliseconds.
    pub connect_timeout_ms: u32,
    /// A stream that hears nothing this long while holding data is
    /// declared failed (its data goes out on the others).
    pub stall_timeout_ms: u32,
    /// How long to keep trying to resume the session after every
    /// connection failed.
    pub resume_ms: u32,
}

impl dwcp_connect_options {
    pub(crate) fn defaults() -> Self {
        dwcp_connect_options {
            key: std::ptr::null(),
            insecure_no_auth: false,
            streams: 4,
            mode: DWCP_MODE_DATACENTER,
            rate_limit: 0,
            connect_timeout_ms: 10_000,
            stall_timeout_ms: 10_000,
            resume_ms: 30_000,
        }
    }

    /// The transport's settings.
    ///
    /// # Safety
    /// `self.key` must be NULL or valid for 32 bytes of reads.
    pub(crate) unsafe fn config(&self) -> Result<SenderConfig> {
        // SAFETY: the caller's contract on `key`.
        let key = unsafe { key_of(self.key, self.insecure_no_auth, "connect options") }?;
        let streams = match self.streams {
            0 => StreamCount::Auto {
                max: MAX_STREAMS as u16,
            },
            n @ 1..=MAX_STREAMS => StreamCount::Fixed(n as u16),
            n => {
                return Err(Error::invalid(format!(
                    "connect options: streams {n} is more than {MAX_STREAMS}"
                )));
            }
        };
        for (v, name) in [
            (self.connect_timeout_ms, "connect_timeout_ms"),
            (self.stall_timeout_ms, "stall_timeout_ms"),
        ] {
            if v == 0 {
                return Err(Error::invalid(format!("connect options: {name} is 0")));
            }
        }
        Ok(SenderConfig {
            key,
            streams,
            policy: policy(self.mode, self.rate_limit, "connect options")?,
            rate_limit: self.rate_limit / 8,
            connect_timeout: millis(self.connect_timeout_ms),
            stall_timeout: millis(self.stall_timeout_ms),
            resume_for: millis(self.resume_ms),
            ..SenderConfig::default()
        })
    }
}

/// Writes the default connect options into `*out`: no key (set one),
/// 4 streams, `DWCP_MODE_DATACENTER`, no rate limit, 10 s connect and stall
/// timeouts, 30 s of resuming.
///
/// # Safety
/// `out` must be valid for one write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn dwcp_connect_options_default(
    out_opts: *mut dwcp_connect_options,
) -> dwcp_status {
    call(|| {
        let o = out(out_opts, "out")?;
        // SAFETY: checked non-NULL; valid for a write (caller's contract).
        unsafe { write(o, dwcp_connect_options::defaults()) };
        Ok(())
    })
}

/// How far a transfer is, as a progress callback hears it.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct dwcp_progress {
    /// The transfer (its region id in the session).
    pub region: u32,
    /// Bytes done: acknowledged by the receiver (sending), or placed and
    /// checked (receiving).
    pub done: u64,
    /// Its length; `UINT64_MAX` while unknown (a stream of buffers).
    pub total: u64,
}

/// A progress callback: runs on library threads, one call at a time, and
/// must return quickly without calling into the session or listener it
/// reports on. `done` only ever grows for a given region.
pub type dwcp_progress_fn =
    Option<unsafe extern "C" fn(user: *mut c_void, p: *const dwcp_progress)>;

#[derive(Clone, Copy)]
struct ProgressFn {
    f: unsafe extern "C" fn(*mut c_void, *const dwcp_progress),
    user: User,
}

/// A log callback: hears what went wrong or changed in a session or
/// listener that no call returns (a connection refused for a wrong key, a
/// stream that failed and was replaced, a session resumed), as one line of
/// NUL-terminated text valid during the call. Runs on library threads, one
/// call at a time; must return quickly without calling into the session or
/// listener. The library itself never writes to stdout or stderr.
pub type dwcp_log_fn = Option<unsafe extern "C" fn(user: *mut c_void, message: *const c_char)>;

#[derive(Clone, Copy)]
struct LogFn {
    f: unsafe extern "C" fn(*mut c_void, *const c_char),
    user: User,
}

/// Where a session's or listener's events go: the callbacks the caller set
/// last.
#[derive(Default)]
struct EventCallbacks {
    progress: Option<ProgressFn>,
    log: Option<LogFn>,
}

type CallbackSlot = Arc<Mutex<EventCallbacks>>;

/// The line a log callback hears for `e`, if any.
fn log_line(e: &Event) -> Option<String> {
    match e {
        Event::ConnectionFailed { peer, reason } => {
            Some(format!("connection from {peer}: {reason}"))
        }
        Event::AcceptFailed { reason } => Some(format!("accept failed: {reason}")),
        Event::StreamFailed { stream, reason } => Some(format!(
            "stream {stream} failed (its data goes out on the others): {reason}"
        )),
        Event::Resumed => Some("the session resumed after its connections failed".into()),
        Event::RegionDone {
            region,
            error: Some(why),
            ..
        } => Some(format!("transfer {region} failed: {why}")),
        _ => None,
    }
}

fn event_callbacks(slot: &CallbackSlot) -> impl Fn(&Event) + Send + Sync + 'static {
    let slot = slot.clone();
    move |e| {
        let cbs = {
            let c = lock(&slot);
            (c.progress, c.log)
        };
        if let (
            Event::Progress {
                region, done, len, ..
            },
            (Some(p), _),
        ) = (e, cbs)
        {
            let report = dwcp_progress {
                region: *region,
                done: *done,
                total: len.unwrap_or(u64::MAX),
            };
            // SAFETY: a callback the caller registered with its context;
            // `report` lives for the call.
            unsafe { (p.f)(p.user.0, &report) };
        }
        if let (Some(l), Some(line)) = (cbs.1, log_line(e)) {
            let c = std::ffi::CString::new(line.replace('\0', " ")).unwrap_or_default();
            // SAFETY: a callback the caller registered with its context;
            // `c` lives for the call.
            unsafe { (l.f)(l.user.0, c.as_ptr()) };
        }
    }
}

fn set_progress(slot: &CallbackSlot, cb: dwcp_progress_fn, user: *mut c_void) {
    lock(slot).progress = cb.map(|f| ProgressFn {
        f,
        user: User(user),
    });
}

fn set_log(slot: &CallbackSlot, cb: dwcp_log_fn, user: *mut c_void) {
    lock(slot).log = cb.map(|f| LogFn {
        f,
        user: User(user),
    });
}

/// Sets the callback that hears `session`'s log lines (failed and
/// replaced streams, resumes, failed transfers; NULL `cb` for none);
/// `user` is passed back to it.
///
/// # Safety
/// `session` must be NULL or a live session; `cb` and `user` must stay
/// valid until replaced or the session is freed, and be callable from any
/// thread.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn dwcp_session_set_log(
    session: *const dwcp_session,
    cb: dwcp_log_fn,
    user: *mut c_void,
) -> dwcp_status {
    call(|| {
        // SAFETY: NULL or a live session (caller's contract).
        let s = unsafe { handle(session, "session") }?;
        set_log(&s.callbacks, cb, user);
        Ok(())
    })
}

/// Sets the callback that hears `listener`'s log lines (refused or failed
/// connections, failed accepts, failed transfers; NULL `cb` for none);
/// `user` is passed back to it.
///
/// # Safety
/// `listener` must be NULL or a live listener; `cb` and `user` must stay
/// valid until replaced or the listener is freed, and be callable from any
/// thread.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn dwcp_listener_set_log(
    listener: *const dwcp_listener,
    cb: dwcp_log_fn,
    user: *mut c_void,
) -> dwcp_status {
    call(|| {
        // SAFETY: NULL or a live listener (caller's contract).
        let l = unsafe { handle(listener, "listener") }?;
        set_log(&l.callbacks, cb, user);
        Ok(())
    })
}

/// Figures of a session or listener.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct dwcp_metrics {
    /// Application bytes handed to the session (sending) or received.
    pub bytes_in: u64,
    /// Application bytes acknowledged by the receiver.
    pub bytes_acked: u64,
    /// Bytes put on (or taken off) the sockets.
    pub wire_bytes: u64,
    /// Chunks sent again after a stream failed.
    pub retransmitted_chunks: u64,
    /// Data streams that failed.
    pub stream_failures: u64,
    /// Times the session was resumed after every connection failed.
    pub resumes: u64,
    /// Data streams up now.
    pub streams: u64,
    /// Application bytes per wire byte (0 before any).
    pub ratio: f64,
    /// Estimated link bandwidth in Gbit/s (sending; 0 before one).
    pub bandwidth_gbps: f64,
}

impl From<MetricsSnapshot> for dwcp_metrics {
    fn from(m: MetricsSnapshot) -> Self {
        dwcp_metrics {
            bytes_in: m.bytes_in,
            bytes_acked: m.bytes_acked,
            wire_bytes: m.wire_bytes,
            retransmitted_chunks: m.retransmitted_chunks,
            stream_failures: m.stream_failures,
            resumes: m.resumes,
            streams: m.streams,
            ratio: m.ratio(),
            bandwidth_gbps: m.bandwidth * 8.0 / 1e9,
        }
    }
}

/// An outgoing session: sends buffers, files and streams of buffers to one
/// listener. Thread-safe: transfers may run from several threads at once,
/// and `dwcp_session_cancel()` may be called from any thread.
pub struct dwcp_session {
    _engine: Arc<Engine>,
    /// Taken by `dwcp_session_close`; each transfer holds a clone while it
    /// runs.
    sender: Mutex<Option<Arc<Sender>>>,
    callbacks: CallbackSlot,
}

impl dwcp_session {
    fn sender(&self) -> Result<Arc<Sender>> {
        lock(&self.sender)
            .clone()
            .ok_or_else(|| Error::new(dwcp_status::Busy, "the session was closed"))
    }
}

/// Opens a session to the listener at `addr` (`host:port`) and writes its
/// handle into `*out`; free it with `dwcp_session_free()`.
///
/// # Safety
/// `engine` must be NULL or a live engine; `addr` NULL or a NUL-terminated
/// string; `opts` NULL (the defaults, which carry no key) or valid for a
/// read (its `key` NULL or 32 bytes); `out` valid for one write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn dwcp_connect(
    engine: *const dwcp_engine,
    addr: *const c_char,
    opts: *const dwcp_connect_options,
    out_session: *mut *mut dwcp_session,
) -> dwcp_status {
    call(|| {
        // SAFETY: each pointer per the caller's contract.
        let e = unsafe { handle(engine, "engine") }?;
        // SAFETY: as above.
        let addr = resolve(unsafe { ptr::string(addr, "addr") }?)?;
        // SAFETY: as above: NULL (the defaults) or valid for a read.
        let opts = unsafe { ptr::or_default(opts, dwcp_connect_options::defaults) };
        let o = out(out_session, "out")?;
        // SAFETY: `opts.key` per the caller's contract.
        let cfg = unsafe { opts.config() }?;
        let sender = Sender::connect(&e.engine, addr, cfg)?;
        let callbacks: CallbackSlot = Arc::default();
        sender.on_event(event_callbacks(&callbacks));
        let s = Box::new(dwcp_session {
            _engine: e.engine.clone(),
            sender: Mutex::new(Some(Arc::new(sender))),
            callbacks,
        });
        // SAFETY: checked non-NULL; valid for a write.
        unsafe { write(o, Box::into_raw(s)) };
        Ok(())
    })
}

/// Sets the callback that hears the progress of every transfer of
/// `session` (NULL `cb` for none); `user` is passed back to it.
///
/// # Safety
/// `session` must be NULL or a live session; `cb` and `user` must stay
/// valid until replaced or the session is freed, and be callable from any
/// thread.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn dwcp_session_set_progress(
    session: *const dwcp_session,
    cb: dwcp_progress_fn,
    user: *mut c_void,
) -> dwcp_status {
    call(|| {
        // SAFETY: NULL or a live session (caller's contract).
        let s = unsafe { handle(session, "session") }?;
        set_progress(&s.callbacks, cb, user);
        Ok(())
    })
}

fn now_meta(name: &str, mode: u32) -> Result<FileMeta> {
    safe_relative(name).map_err(|e| Error::invalid(format!("name {name:?}: {e}")))?;
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    Ok(FileMeta {
        path: name.to_string(),
        mode,
        mtime_s: i64::try_from(t.as_secs()).unwrap_or(i64::MAX),
        mtime_ns: t.subsec_nanos(),
    })
}

/// Sends `len` bytes at `data` as one transfer named `name` (a relative
/// path, `/`-separated: a listener with a directory writes it there) and
/// returns once the receiver has placed and verified all of it.
///
/// The bytes are copied before the call starts sending, so `data` may be
/// reused as soon as it returns, whatever the outcome.
///
/// # Safety
/// `session` must be NULL or a live session; `name` NULL or a
/// NUL-terminated string; `data` valid for `len` bytes of reads (NULL when
/// `len` is 0).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn dwcp_session_send_buffer(
    session: *const dwcp_session,
    name: *const c_char,
    data: *const u8,
    len: usize,
) -> dwcp_status {
    call(|| {
        // SAFETY: each pointer per the caller's contract.
        let s = unsafe { handle(session, "session") }?;
        // SAFETY: as above.
        let name = unsafe { ptr::string(name, "name") }?;
        // SAFETY: as above.
        let data = unsafe { ptr::bytes(data, len, "data") }?;
        let meta = now_meta(name, 0o644)?;
        let sender = s.sender()?;
        sender.send_region(meta.encode(), Arc::new(data.to_vec()))?;
        Ok(())
    })
}

/// Sends the file at `path` as one transfer named `name` (NULL: the file's
/// own name), with its permission bits and modification time, and returns
/// once the receiver has placed and verified it.
///
/// # Safety
/// `session` must be NULL or a live session; `path` NULL or a
/// NUL-terminated string; `name` NULL or a NUL-terminated string.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn dwcp_session_send_file(
    session: *const dwcp_session,
    path: *const c_char,
    name: *const c_char,
) -> dwcp_status {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    call(|| {
        // SAFETY: each pointer per the caller's contract.
        let s = unsafe { handle(session, "session") }?;
        // SAFETY: as above.
        let path = Path::new(unsafe { ptr::string(path, "path") }?);
        // SAFETY: as above.
        let name = match unsafe { ptr::opt_string(name, "name") }? {
            Some(n) => n.to_string(),
            None => path
                .file_name()
                .and_then(|n| n.to_str())
                .ok_or_else(|| Error::invalid(format!("{} names no file", path.display())))?
                .to_string(),
        };
        let io =
            |e: std::io::Error| Error::new(dwcp_status::Io, format!("{}: {e}", path.display()));
        let file = std::fs::File::open(path).map_err(io)?;
        let md = file.metadata().map_err(io)?;
        if !md.is_file() {
            return Err(Error::invalid(format!(
                "{} is not a regular file",
                path.display()
            )));
        }
        let mut meta = now_meta(&name, md.permissions().mode() & 0o777)?;
        meta.mtime_s = md.mtime();
        meta.mtime_ns = u32::try_from(md.mtime_nsec()).unwrap_or(0);
        let sender = s.sender()?;
        sender.send_region(meta.encode(), Arc::new(FileSource::new(file, md.len())))?;
        Ok(())
    })
}

/// Cancels `session` from any thread: every transfer in progress on it
/// returns `DWCP_STATUS_CANCELLED`, nothing more is sent, and the receiver
/// discards what was unfinished. The handle must still be freed.
///
/// # Safety
/// `session` must be NULL or a live session.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn dwcp_session_cancel(session: *const dwcp_session) -> dwcp_status {
    call(|| {
        // SAFETY: NULL or a live session (caller's contract).
        let s = unsafe { handle(session, "session") }?;
        if let Some(sender) = lock(&s.sender).clone() {
            sender.abort(CANCELLED);
        }
        Ok(())
    })
}

/// Writes the figures of `session` into `*out`.
///
/// # Safety
/// `session` must be NULL or a live session; `out` valid for one write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn dwcp_session_metrics(
    session: *const dwcp_session,
    out_metrics: *mut dwcp_metrics,
) -> dwcp_status {
    call(|| {
        // SAFETY: NULL or a live session (caller's contract).
        let s = unsafe { handle(session, "session") }?;
        let o = out(out_metrics, "out")?;
        let m = s.sender()?.metrics();
        // SAFETY: checked non-NULL; valid for a write.
        unsafe { write(o, m.into()) };
        Ok(())
    })
}

/// Ends `session` cleanly: waits until everything sent is acknowledged,
/// says goodbye, and writes the final figures into `*out` (NULL: not
/// wanted). Fails with `DWCP_STATUS_BUSY` while a transfer or stream of
/// the session is still running. The handle must still be freed.
///
/// # Safety
/// `session` must be NULL or a live session; `out` NULL or valid for one
/// write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn dwcp_session_close(
    session: *mut dwcp_session,
    out_metrics: *mut dwcp_metrics,
) -> dwcp_status {
    call(|| {
        // SAFETY: NULL or a live session (caller's contract).
        let s = unsafe { handle(session.cast_const(), "session") }?;
        let sender = {
            let mut slot = lock(&s.sender);
            let Some(arc) = slot.take() else {
                return Err(Error::new(dwcp_status::Busy, "the session was closed"));
            };
            match Arc::try_unwrap(arc) {
                Ok(sender) => sender,
                Err(arc) => {
                    *slot = Some(arc);
                    return Err(Error::new(
                        dwcp_status::Busy,
                        "a transfer or stream of this session is still running",
                    ));
                }
            }
        };
        let m = sender.close()?;
        if !out_metrics.is_null() {
            // SAFETY: non-NULL and valid for a write (caller's contract).
            unsafe { write(out_metrics, m.into()) };
        }
        Ok(())
    })
}

/// Frees a session (NULL is fine). A session not closed is cancelled: the
/// receiver discards what it did not finish.
///
/// # Safety
/// `session` must be NULL or a live session with no call running on it,
/// and not used after this call.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn dwcp_session_free(session: *mut dwcp_session) {
    call_void(|| {
        if session.is_null() {
            return;
        }
        // SAFETY: made by `Box::into_raw` in `dwcp_connect`, freed once.
        let s = unsafe { Box::from_raw(session) };
        if let Some(sender) = lock(&s.sender).take() {
            sender.abort(CANCELLED);
        }
    })
}

/// What the thread of a stream of buffers reads.
enum Piece {
    Data(Vec<u8>),
    End,
}

/// Reads the buffers a caller writes, in order; a stream dropped without
/// its end fails the read, so that the receiver never takes a truncated
/// stream for a whole one.
struct PieceReader {
    rx: ChanRx<Piece>,
    cur: Vec<u8>,
    pos: usize,
    ended: bool,
}

impl Read for PieceReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.pos == self.cur.len() {
            if self.ended {
                return Ok(0);
            }
            match self.rx.recv() {
                Ok(Piece::Data(d)) => {
                    self.cur = d;
                    self.pos = 0;
                }
                Ok(Piece::End) => self.ended = true,
                Err(_) => {
                    return Err(std::io::Error::other(
                        "the stream was freed before dwcp_stream_finish",
                    ));
                }
            }
        }
        let n = buf.len().min(self.cur.len() - self.pos);
        buf[..n].copy_from_slice(&self.cur[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// Buffers written ahead of the session before `dwcp_stream_write` blocks.
const STREAM_QUEUE: usize = 16;

/// A stream of buffers on its way: bytes of unknown total length,
/// delivered in order as one transfer. Use from one thread at a time.
pub struct dwcp_stream {
    tx: Option<SyncSender<Piece>>,
    thread: Option<JoinHandle<std::result::Result<u64, TransportError>>>,
    /// Held while the stream runs, so that `dwcp_session_close` waits for
    /// it; let go once it ended.
    sender: Option<Arc<Sender>>,
    /// How it ended: told again by later calls.
    ended: Option<std::result::Result<u64, (dwcp_status, String)>>,
}

impl dwcp_stream {
    /// Waits for the stream's thread (once) and tells how it ended.
    fn join(&mut self) -> Result<u64> {
        if let Some(t) = self.thread.take() {
            let r = match t.join() {
                Ok(r) => r.map_err(Error::from),
                Err(_) => Err(Error::new(
                    dwcp_status::Panic,
                    "the stream's thread panicked (a bug)",
                )),
            };
            self.sender = None;
            self.ended = Some(r.map_err(|e| (e.status, e.message)));
        }
        match &self.ended {
            Some(Ok(n)) => Ok(*n),
            Some(Err((status, message))) => Err(Error::new(*status, message.clone())),
            None => Err(Error::new(
                dwcp_status::Busy,
                "the stream has ended already",
            )),
        }
    }

    /// The error of a call on a stream that ended: its failure, or BUSY
    /// after a clean end.
    fn after_end(&mut self) -> Error {
        match self.join() {
            Ok(_) => Error::new(dwcp_status::Busy, "the stream has ended already"),
            Err(e) => e,
        }
    }
}

/// Opens a stream of buffers named `name` on `session` and writes its
/// handle into `*out`. Write with `dwcp_stream_write()`, end with
/// `dwcp_stream_finish()`, free with `dwcp_stream_free()`.
///
/// # Safety
/// `session` must be NULL or a live session; `name` NULL or a
/// NUL-terminated string; `out` valid for one write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn dwcp_session_stream_open(
    session: *const dwcp_session,
    name: *const c_char,
    out_stream: *mut *mut dwcp_stream,
) -> dwcp_status {
    call(|| {
        // SAFETY: each pointer per the caller's contract.
        let s = unsafe { handle(session, "session") }?;
        // SAFETY: as above.
        let name = unsafe { ptr::string(name, "name") }?;
        let o = out(out_stream, "out")?;
        let meta = now_meta(name, 0o644)?.encode();
        let sender = s.sender()?;
        let (tx, rx) = sync_channel(STREAM_QUEUE);
        let on_thread = sender.clone();
        let thread = std::thread::Builder::new()
            .name("dwcp-stream".into())
            .spawn(move || {
                let mut reader = PieceReader {
                    rx,
                    cur: Vec::new(),
                    pos: 0,
                    ended: false,
                };
                on_thread.send_stream(meta, &mut reader)
            })
            .map_err(|e| Error::new(dwcp_status::Io, format!("starting a stream thread: {e}")))?;
        let st = Box::new(dwcp_stream {
            tx: Some(tx),
            thread: Some(thread),
            sender: Some(sender),
            ended: None,
        });
        // SAFETY: checked non-NULL; valid for a write.
        unsafe { write(o, Box::into_raw(st)) };
        Ok(())
    })
}

/// Appends `len` bytes at `data` to `stream` (copied; `data` may be reused
/// at once). Blocks while the session is that far behind.
///
/// # Safety
/// `stream` must be NULL or a live stream used by no other thread; `data`
/// valid for `len` bytes of reads (NULL when `len` is 0).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn dwcp_stream_write(
    stream: *mut dwcp_stream,
    data: *const u8,
    len: usize,
) -> dwcp_status {
    call(|| {
        // SAFETY: NULL or a live stream used by this thread only (caller's
        // contract), so no other reference to it exists.
        let st = unsafe { stream.as_mut() }.ok_or_else(|| Error::null("stream"))?;
        // SAFETY: per the caller's contract.
        let data = unsafe { ptr::bytes(data, len, "data") }?;
        let Some(tx) = &st.tx else {
            return Err(st.after_end());
        };
        if data.is_empty() {
            return Ok(());
        }
        if tx.send(Piece::Data(data.to_vec())).is_err() {
            // The session gave the stream up: say why.
            st.tx = None;
            return Err(match st.join() {
                Err(e) => e,
                Ok(_) => Error::new(dwcp_status::SessionLost, "the stream ended early"),
            });
        }
        Ok(())
    })
}

/// Ends `stream`: waits until the receiver has every byte in order and
/// verified, and writes the stream's length into `*out_len` (NULL: not
/// wanted). The handle must still be freed.
///
/// # Safety
/// `stream` must be NULL or a live stream used by no other thread;
/// `out_len` NULL or valid for one write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn dwcp_stream_finish(
    stream: *mut dwcp_stream,
    out_len: *mut u64,
) -> dwcp_status {
    call(|| {
        // SAFETY: NULL or a live stream used by this thread only.
        let st = unsafe { stream.as_mut() }.ok_or_else(|| Error::null("stream"))?;
        let Some(tx) = st.tx.take() else {
            return Err(st.after_end());
        };
        // A failed send means the thread ended: `join` says why.
        let _ = tx.send(Piece::End);
        let n = st.join()?;
        if !out_len.is_null() {
            // SAFETY: non-NULL and valid for a write (caller's contract).
            unsafe { write(out_len, n) };
        }
        Ok(())
    })
}

/// Frees a stream (NULL is fine). A stream not finished is abandoned: the
/// receiver never takes it for whole. Frees no session.
///
/// # Safety
/// `stream` must be NULL or a live stream, not used after this call.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn dwcp_stream_free(stream: *mut dwcp_stream) {
    call_void(|| {
        if stream.is_null() {
            return;
        }
        // SAFETY: made by `Box::into_raw` in `dwcp_session_stream_open`,
        // freed once.
        let mut st = unsafe { Box::from_raw(stream) };
        // Dropping the channel without `End` fails the stream's read.
        st.tx = None;
        let _ = st.join();
    })
}

/// Options of a listener. Initialise with `dwcp_listen_options_default()`,
/// then change what you need.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct dwcp_listen_options {
    /// The pre-shared key (32 bytes), read during the call; NULL only
    /// together with `insecure_no_auth`.
    pub key: *const u8,
    /// Accept only sessions without authentication.
    pub insecure_no_auth: bool,
    /// NULL: keep what arrives in memory, for `dwcp_listener_next()`.
    /// Otherwise an existing directory to write transfers into, by name
    /// (each file is written under a temporary name and renamed once its
    /// digest matches; names that would leave the directory are refused).
    pub dir: *const c_char,
    /// In memory: the most bytes held at once (transfers arriving and
    /// received ones not yet taken); more is refused.
    pub memory_limit: u64,
    /// How long a session whose connections all failed is kept for its
    /// sender to resume, in milliseconds.
    pub grace_ms: u32,
}

/// Writes the default listen options into `*out`: no key (set one), in
/// memory, 1 GiB, 30 s of grace.
///
/// # Safety
/// `out` must be valid for one write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn dwcp_listen_options_default(
    out_opts: *mut dwcp_listen_options,
) -> dwcp_status {
    call(|| {
        let o = out(out_opts, "out")?;
        // SAFETY: checked non-NULL; valid for a write (caller's contract).
        unsafe { write(o, listen_defaults()) };
        Ok(())
    })
}

pub(crate) fn listen_defaults() -> dwcp_listen_options {
    dwcp_listen_options {
        key: std::ptr::null(),
        insecure_no_auth: false,
        dir: std::ptr::null(),
        memory_limit: 1 << 30,
        grace_ms: 30_000,
    }
}

impl dwcp_listen_options {
    /// The transport's settings.
    ///
    /// # Safety
    /// `self.key` must be NULL or valid for 32 bytes of reads.
    pub(crate) unsafe fn config(&self) -> Result<ReceiverConfig> {
        // SAFETY: the caller's contract on `key`.
        let key = unsafe { key_of(self.key, self.insecure_no_auth, "listen options") }?;
        Ok(ReceiverConfig {
            key,
            grace: millis(self.grace_ms),
            ..ReceiverConfig::default()
        })
    }
}

/// What a listener was given, finished and verified.
pub struct dwcp_received {
    name: String,
    len: u64,
    data: Option<Vec<u8>>,
}

enum Inbox {
    Memory(MemorySink),
    Dir(Mutex<ChanRx<dwcp_received>>),
}

/// A listener: accepts sessions and receives what they send. Thread-safe.
pub struct dwcp_listener {
    _engine: Arc<Engine>,
    receiver: Mutex<Option<Receiver>>,
    addr: SocketAddr,
    inbox: Inbox,
    callbacks: CallbackSlot,
}

/// Listens on `addr` (`host:port`; port 0 picks a free one, see
/// `dwcp_listener_local_addr()`) and writes the listener's handle into
/// `*out`; free it with `dwcp_listener_free()`.
///
/// # Safety
/// `engine` must be NULL or a live engine; `addr` NULL or a NUL-terminated
/// string; `opts` NULL (the defaults, which carry no key) or valid for a
/// read (its `key` NULL or 32 bytes, its `dir` NULL or a NUL-terminated
/// string); `out` valid for one write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn dwcp_listen(
    engine: *const dwcp_engine,
    addr: *const c_char,
    opts: *const dwcp_listen_options,
    out_listener: *mut *mut dwcp_listener,
) -> dwcp_status {
    call(|| {
        // SAFETY: each pointer per the caller's contract.
        let e = unsafe { handle(engine, "engine") }?;
        // SAFETY: as above.
        let addr = resolve(unsafe { ptr::string(addr, "addr") }?)?;
        // SAFETY: as above: NULL (the defaults) or valid for a read.
        let opts = unsafe { ptr::or_default(opts, listen_defaults) };
        let o = out(out_listener, "out")?;
        // SAFETY: `opts.key` per the caller's contract.
        let cfg = unsafe { opts.config() }?;
        // SAFETY: `opts.dir` per the caller's contract.
        let dir = unsafe { ptr::opt_string(opts.dir, "opts.dir") }?;
        let (inbox, sink): (Inbox, Arc<dyn Sink>) = match dir {
            None => {
                let m = MemorySink::new(opts.memory_limit);
                let h = m.handle();
                (Inbox::Memory(m), h)
            }
            Some(dir) => {
                let root = std::fs::canonicalize(dir)
                    .map_err(|e| Error::new(dwcp_status::Io, format!("directory {dir}: {e}")))?;
                let (tx, rx) = sync_channel::<dwcp_received>(1024);
                let tx = Mutex::new(tx);
                let base = root.clone();
                let report = move |p: &Path, len: u64, r: std::result::Result<(), &str>| {
                    if r.is_ok() {
                        let name = p
                            .strip_prefix(&base)
                            .unwrap_or(p)
                            .to_string_lossy()
                            .into_owned();
                        // A listener whose owner stops taking files only
                        // loses the notices, never the files.
                        let _ = lock(&tx).try_send(dwcp_received {
                            name,
                            len,
                            data: None,
                        });
                    }
                };
                let sink = DirSink::new(&root)
                    .map_err(|e| Error::new(dwcp_status::Io, format!("directory {dir}: {e}")))?
                    .with_report(Arc::new(report));
                (Inbox::Dir(Mutex::new(rx)), Arc::new(sink))
            }
        };
        let receiver = Receiver::bind(&e.engine, addr, cfg, sink)?;
        let callbacks: CallbackSlot = Arc::default();
        receiver.on_event(event_callbacks(&callbacks));
        let l = Box::new(dwcp_listener {
            _engine: e.engine.clone(),
            addr: receiver.local_addr(),
            receiver: Mutex::new(Some(receiver)),
            inbox,
            callbacks,
        });
        // SAFETY: checked non-NULL; valid for a write.
        unsafe { write(o, Box::into_raw(l)) };
        Ok(())
    })
}

/// Copies the address `listener` listens on (`ip:port`) into `buf`,
/// NUL-terminated, and its length into `*written`.
///
/// # Safety
/// `listener` must be NULL or a live listener; `buf` valid for `len` bytes
/// of writes; `written` for one write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn dwcp_listener_local_addr(
    listener: *const dwcp_listener,
    buf: *mut c_char,
    len: usize,
    written: *mut usize,
) -> dwcp_status {
    call(|| {
        // SAFETY: NULL or a live listener (caller's contract).
        let l = unsafe { handle(listener, "listener") }?;
        // SAFETY: the caller's contract on `buf`, `len`, `written`.
        unsafe { copy_str_out(&l.addr.to_string(), buf, len, written) }
    })
}

/// Sets the callback that hears the progress of what `listener` receives
/// (NULL `cb` for none); `user` is passed back to it.
///
/// # Safety
/// `listener` must be NULL or a live listener; `cb` and `user` must stay
/// valid until replaced or the listener is freed, and be callable from any
/// thread.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn dwcp_listener_set_progress(
    listener: *const dwcp_listener,
    cb: dwcp_progress_fn,
    user: *mut c_void,
) -> dwcp_status {
    call(|| {
        // SAFETY: NULL or a live listener (caller's contract).
        let l = unsafe { handle(listener, "listener") }?;
        set_progress(&l.callbacks, cb, user);
        Ok(())
    })
}

/// Waits up to `timeout_ms` for the next finished, verified transfer and
/// writes it into `*out` (free it with `dwcp_received_free()`);
/// `DWCP_STATUS_TIMEOUT` when none came.
///
/// # Safety
/// `listener` must be NULL or a live listener; `out` valid for one write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn dwcp_listener_next(
    listener: *const dwcp_listener,
    timeout_ms: u32,
    out_received: *mut *mut dwcp_received,
) -> dwcp_status {
    call(|| {
        // SAFETY: NULL or a live listener (caller's contract).
        let l = unsafe { handle(listener, "listener") }?;
        let o = out(out_received, "out")?;
        let wait = millis(timeout_ms);
        let timeout = || Error::new(dwcp_status::Timeout, format!("nothing arrived in {wait:?}"));
        let r = match &l.inbox {
            Inbox::Memory(m) => {
                let r = m.take(wait).ok_or_else(timeout)?;
                let name = FileMeta::decode(&r.meta)
                    .map(|m| m.path)
                    .unwrap_or_default();
                dwcp_received {
                    name,
                    len: r.len,
                    data: r.bytes,
                }
            }
            Inbox::Dir(rx) => match lock(rx).recv_timeout(wait) {
                Ok(r) => r,
                Err(RecvTimeoutError::Timeout) => return Err(timeout()),
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(Error::new(dwcp_status::Busy, "the listener has stopped"));
                }
            },
        };
        // SAFETY: checked non-NULL; valid for a write.
        unsafe { write(o, Box::into_raw(Box::new(r))) };
        Ok(())
    })
}

/// Writes the figures of `listener` into `*out`.
///
/// # Safety
/// `listener` must be NULL or a live listener; `out` valid for one write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn dwcp_listener_metrics(
    listener: *const dwcp_listener,
    out_metrics: *mut dwcp_metrics,
) -> dwcp_status {
    call(|| {
        // SAFETY: NULL or a live listener (caller's contract).
        let l = unsafe { handle(listener, "listener") }?;
        let o = out(out_metrics, "out")?;
        let m = lock(&l.receiver)
            .as_ref()
            .map(|r| r.metrics())
            .unwrap_or_default();
        // SAFETY: checked non-NULL; valid for a write.
        unsafe { write(o, m.into()) };
        Ok(())
    })
}

/// Frees a listener (NULL is fine): stops listening and drops sessions in
/// progress; received transfers not yet taken are freed.
///
/// # Safety
/// `listener` must be NULL or a live listener with no call running on it,
/// not used after this call.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn dwcp_listener_free(listener: *mut dwcp_listener) {
    call_void(|| {
        if listener.is_null() {
            return;
        }
        // SAFETY: made by `Box::into_raw` in `dwcp_listen`, freed once.
        let l = unsafe { Box::from_raw(listener) };
        if let Some(r) = lock(&l.receiver).take() {
            let _ = r.close();
        }
    })
}

/// Copies the name of a received transfer into `buf`, NUL-terminated, and
/// its length into `*written`.
///
/// # Safety
/// `received` must be NULL or a live received transfer; `buf` valid for
/// `len` bytes of writes; `written` for one write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn dwcp_received_name(
    received: *const dwcp_received,
    buf: *mut c_char,
    len: usize,
    written: *mut usize,
) -> dwcp_status {
    call(|| {
        // SAFETY: NULL or a live received transfer (caller's contract).
        let r = unsafe { handle(received, "received") }?;
        // SAFETY: the caller's contract on `buf`, `len`, `written`.
        unsafe { copy_str_out(&r.name, buf, len, written) }
    })
}

/// Writes the bytes of a received transfer: `*data` points at them (valid
/// until the transfer is freed; do not free it yourself) and `*len` is
/// their number (NULL and 0 for an empty transfer). A listener with a
/// directory keeps no bytes: `*data` is then NULL and `*len` the file's
/// length.
///
/// # Safety
/// `received` must be NULL or a live received transfer; `data` and `len`
/// valid for one write each.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn dwcp_received_data(
    received: *const dwcp_received,
    data: *mut *const u8,
    len: *mut u64,
) -> dwcp_status {
    call(|| {
        // SAFETY: NULL or a live received transfer (caller's contract).
        let r = unsafe { handle(received, "received") }?;
        let d = out(data, "data")?;
        let l = out(len, "len")?;
        let p = r
            .data
            .as_ref()
            .filter(|v| !v.is_empty())
            .map_or(std::ptr::null(), |v| v.as_ptr());
        // SAFETY: both checked non-NULL and valid for a write.
        unsafe {
            write(d, p);
            write(l, r.len);
        }
        Ok(())
    })
}

/// Frees a received transfer (NULL is fine).
///
/// # Safety
/// `received` must be NULL or a live received transfer, not used after
/// this call (nor the bytes `dwcp_received_data` pointed at).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn dwcp_received_free(received: *mut dwcp_received) {
    call_void(|| {
        if !received.is_null() {
            // SAFETY: made by `Box::into_raw` in `dwcp_listener_next`,
            // freed once.
            drop(unsafe { Box::from_raw(received) });
        }
    })
}
