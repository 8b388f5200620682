//! The sending end: the handshake, data streams on the engine's cores, the
//! scheduler between them, and regions from open to `DONE`.

use std::cell::Cell;
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::io::Read;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex, OnceLock, Weak};
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use dwcp_codec::{CodecConfig, Encoder, Policy, SessionKey, max_chunk_frame_len};
use dwcp_engine::{
    Engine, EngineHandle, LocalTcpStream, RemoteHandle, sleep, spawn_local, timeout,
};

use crate::auth::{self, Direction, Tagger};
use crate::conn::{self, MsgReader, MsgWriter};
use crate::error::{TransportError, WireError, refused, wire_err};
use crate::pace::{BandwidthEstimate, TokenBucket};
use crate::sched::{Chunk, Scheduler};
use crate::session::{
    Event, Events, Mailbox, Metrics, MetricsSnapshot, SenderConfig, Source, StreamCount, lock,
    wait, wire_policy,
};
use crate::treehash::PieceDigest;
use crate::wire::{
    self, Addressing, Challenge, Close, DataHeader, Hello, Join, JoinOk, Kind, Open, Reason,
    Welcome, caps, code,
};

/// How often `auto` looks at throughput to decide on another stream.
const AUTO_STEP: Duration = Duration::from_millis(300);
/// Growth that justifies another stream under `auto`.
const AUTO_GAIN: f64 = 1.05;

/// A sending session. Cheap to share between threads by reference; every
/// method blocks the calling thread (never call them from an engine worker).
pub struct Sender {
    shared: Arc<Shared>,
    streams: Mutex<Vec<RemoteHandle<()>>>,
}

struct Shared {
    cfg: SenderConfig,
    addr: SocketAddr,
    engine: EngineHandle,
    workers: usize,
    session: [u8; 16],
    /// The session key of the current control connection (a resume makes
    /// a new one); data streams join with it.
    session_key: Mutex<[u8; 32]>,
    welcome: Welcome,
    /// Streams asked for in `HELLO`, repeated when resuming.
    hello_streams: u16,
    state: Mutex<State>,
    cond: Condvar,
    control: Arc<Mailbox<Ctl>>,
    metrics: Metrics,
    events: Events,
}

/// What the control stream's writer is given.
pub(crate) enum Ctl {
    /// A message to send.
    Msg(Kind, Vec<u8>),
    /// The connection failed: stop writing.
    Stop,
}

struct State {
    sched: Scheduler,
    wakers: Vec<Option<Waker>>,
    /// A stream's reader saw its connection fail.
    dead: Vec<bool>,
    sources: HashMap<u32, Arc<dyn Source>>,
    /// The digest of each in-memory region, assembled from the subtree
    /// values the codec computes for its chunks' checksums (see
    /// [`Sender::send_region`]).
    trees: HashMap<u32, Arc<PieceDigest>>,
    /// Regions to close with their assembled digest once every chunk is
    /// acknowledged ([`Sender::close_region_when_sent`]).
    auto_close: HashSet<u32>,
    /// Bytes acknowledged and length (`None`: an ordered region still
    /// being read) of every region without a `DONE`, for progress events.
    progress: HashMap<u32, (u64, Option<u64>)>,
    /// Chunks of each ordered region handed to the scheduler from its
    /// oldest unacknowledged one on: `(sequence, bytes, acknowledged)`.
    /// The receiver may have to hold any of them but the first out of
    /// order, so their bytes, all regions together, stay within its reorder
    /// window (`reorder_used`).
    ordered: HashMap<u32, VecDeque<(u64, u64, bool)>>,
    reorder_used: u64,
    /// `DONE` results by region.
    done: HashMap<u32, Option<Result<(), String>>>,
    /// `OPEN` and (once closed) `CLOSE` of every region without a `DONE`
    /// yet, in id order: what a resumed control stream says again.
    pending: BTreeMap<u32, (Vec<u8>, Option<Vec<u8>>)>,
    next_region: u32,
    closing: bool,
    /// `BYE` was queued (a resume queues it again).
    bye_sent: bool,
    bye: bool,
    failed: Option<String>,
    bw: BandwidthEstimate,
    bucket: Option<TokenBucket>,
    congestion_error: Option<String>,
}

impl State {
    fn wake_all(&mut self) {
        for w in self.wakers.iter_mut().filter_map(Option::take) {
            w.wake();
        }
    }
}

impl Sender {
    /// Opens a session to `addr`: the handshake on core 0, then the data
    /// streams spread over the engine's cores.
    pub fn connect(
        engine: &Engine,
        addr: SocketAddr,
        cfg: SenderConfig,
    ) -> Result<Sender, TransportError> {
        cfg.policy.validate()?;
        let streams = match cfg.streams {
            StreamCount::Fixed(n) if (1..=crate::session::MAX_STREAMS).contains(&n) => n,
            StreamCount::Auto { max } if (1..=crate::session::MAX_STREAMS).contains(&max) => {
                max.min((2 * engine.workers() as u16).max(2))
            }
            other => {
                return Err(TransportError::Config(format!(
                    "{other:?}: streams must be 1..={}",
                    crate::session::MAX_STREAMS
                )));
            }
        };
        if cfg.chunk == 0 || cfg.chunk > crate::session::MAX_CHUNK {
            return Err(TransportError::Config(format!(
                "chunk of {} bytes; 1..={}",
                cfg.chunk,
                crate::session::MAX_CHUNK
            )));
        }
        let mailbox = Arc::new(Mailbox::new());
        let slot: Arc<OnceLock<Weak<Shared>>> = Arc::new(OnceLock::new());
        let hs_cfg = cfg.clone();
        let mb = mailbox.clone();
        let sl = slot.clone();
        let hs = engine
            .spawn_on(0, move || handshake(addr, hs_cfg, streams, mb, sl))?
            .join()??;
        let (session, session_key, welcome) = hs;
        let hello_streams = streams;
        if cfg.chunk > welcome.max_chunk {
            return Err(TransportError::Config(format!(
                "chunk of {} bytes; the receiver accepts at most {}",
                cfg.chunk, welcome.max_chunk
            )));
        }
        let streams = streams.min(welcome.max_streams);
        let now = Instant::now();
        let bucket = (cfg.rate_limit > 0).then(|| {
            // A burst of two chunks (or 10 ms at the rate) keeps the pacing
            // smooth without starving a chunk larger than the burst.
            TokenBucket::new(
                cfg.rate_limit,
                (u64::from(cfg.chunk) * 2).max(cfg.rate_limit / 100),
                now,
            )
        });
        let shared = Arc::new(Shared {
            addr,
            engine: engine.handle(),
            workers: engine.workers(),
            session,
            session_key: Mutex::new(session_key),
            welcome,
            hello_streams,
            state: Mutex::new(State {
                sched: Scheduler::new(usize::from(streams), u64::from(welcome.window)),
                wakers: vec![None; usize::from(streams)],
                dead: vec![false; usize::from(streams)],
                sources: HashMap::new(),
                trees: HashMap::new(),
                auto_close: HashSet::new(),
                progress: HashMap::new(),
                ordered: HashMap::new(),
                reorder_used: 0,
                done: HashMap::new(),
                pending: BTreeMap::new(),
                next_region: 0,
                closing: false,
                bye_sent: false,
                bye: false,
                failed: None,
                bw: BandwidthEstimate::new(Duration::from_millis(100), 50, now),
                bucket,
                congestion_error: None,
            }),
            cond: Condvar::new(),
            control: mailbox,
            metrics: Metrics::default(),
            events: Events::default(),
            cfg,
        });
        // The control reader reports to the session from now on.
        let _ = slot.set(Arc::downgrade(&shared));
        let sender = Sender {
            shared,
            streams: Mutex::new(Vec::new()),
        };
        for i in 0..usize::from(streams) {
            sender.start_stream(i)?;
        }
        if let StreamCount::Auto { max } = sender.shared.cfg.streams {
            let s = sender.shared.clone();
            let h = sender
                .shared
                .engine
                .spawn_on(0, move || auto_streams(s, usize::from(max)))?;
            lock(&sender.streams).push(h);
        }
        Ok(sender)
    }

    fn start_stream(&self, i: usize) -> Result<(), TransportError> {
        let s = self.shared.clone();
        let core = i % self.shared.workers.max(1);
        let h = self
            .shared
            .engine
            .spawn_on(core, move || stream_main(s, i))?;
        lock(&self.streams).push(h);
        Ok(())
    }

    /// The session id.
    pub fn session_id(&self) -> [u8; 16] {
        self.shared.session
    }

    /// Calls `f` with every [`Event`] of the session from now on (progress
    /// of each region as it is acknowledged, regions done, streams up and
    /// failed, resumptions), replacing any earlier callback.
    pub fn on_event(&self, f: impl Fn(&Event) + Send + Sync + 'static) {
        self.shared.events.set(Arc::new(f));
    }

    /// Counters and estimates of the session.
    pub fn metrics(&self) -> MetricsSnapshot {
        let st = lock(&self.shared.state);
        self.shared
            .metrics
            .snapshot(st.sched.live() as u64, st.bw.get().unwrap_or(0.0))
    }

    /// Why `TCP_CONGESTION` could not be set, if it could not.
    pub fn congestion_error(&self) -> Option<String> {
        lock(&self.shared.state).congestion_error.clone()
    }

    /// Bytes each stream may have unacknowledged (the receiver's window).
    pub fn window(&self) -> u64 {
        u64::from(self.shared.welcome.window)
    }

    /// Cuts data stream `i`'s connection as a network failure would: what
    /// it has in flight and unacknowledged goes out on the other streams,
    /// and the stream connects again. For fault drills (`dwcp bench
    /// transport --kill-stream`); false when there is no such stream.
    pub fn reset_stream(&self, i: usize) -> bool {
        let mut st = lock(&self.shared.state);
        if i >= st.dead.len() {
            return false;
        }
        st.dead[i] = true;
        if let Some(w) = st.wakers[i].take() {
            w.wake();
        }
        true
    }

    /// Starts sending a region read from `source`, described to the
    /// receiver's sink by `meta`; returns its id. Chunks start flowing at
    /// once; [`Sender::close_region`] says it is complete.
    pub fn open_region(
        &self,
        meta: Vec<u8>,
        source: Arc<dyn Source>,
    ) -> Result<u32, TransportError> {
        self.open(meta, Some(source))
    }

    /// Opens a region: addressed by offset and read from `source`, or,
    /// without one, ordered, its chunks handed over as they are read.
    fn open(&self, meta: Vec<u8>, source: Option<Arc<dyn Source>>) -> Result<u32, TransportError> {
        if meta.len() > wire::MAX_META_LEN {
            return Err(TransportError::Config(format!(
                "region metadata of {} bytes, at most {}",
                meta.len(),
                wire::MAX_META_LEN
            )));
        }
        if source.is_none() && self.shared.welcome.reorder_units == 0 {
            return Err(TransportError::Config(
                "the receiver takes no ordered regions (byte streams)".into(),
            ));
        }
        let len = source.as_ref().map(|s| s.len());
        let mut st = lock(&self.shared.state);
        if let Some(f) = &st.failed {
            return Err(TransportError::SessionLost(f.clone()));
        }
        let id = st.next_region;
        st.next_region = st
            .next_region
            .checked_add(1)
            .ok_or_else(|| TransportError::Config("out of region ids".into()))?;
        let open = Open {
            region: id,
            addressing: if len.is_some() {
                Addressing::Region
            } else {
                Addressing::Ordered
            },
            len: len.unwrap_or(u64::MAX),
            meta,
        };
        // OPEN goes out before any chunk is given to a stream; it is queued
        // under the state lock, so a resume repeats it in order.
        let body = open.encode();
        if !self.shared.control.push(Ctl::Msg(Kind::Open, body.clone())) {
            return Err(TransportError::SessionLost(
                "the control stream is closed".into(),
            ));
        }
        st.pending.insert(id, (body, None));
        st.done.insert(id, None);
        st.progress.insert(id, (0, len));
        match source {
            Some(source) => {
                let len = source.len();
                if source.as_slice().is_some() {
                    st.trees.insert(id, Arc::new(PieceDigest::new(Some(len))));
                }
                st.sources.insert(id, source);
                st.sched.add_region(id, len, self.shared.cfg.chunk);
                Metrics::add(&self.shared.metrics.bytes_in, len);
            }
            None => {
                st.ordered.insert(id, VecDeque::new());
            }
        }
        st.wake_all();
        Ok(id)
    }

    /// Says region `id` is complete, with the BLAKE3 `digest` of its bytes;
    /// the receiver finishes it when every chunk is placed.
    pub fn close_region(&self, id: u32, digest: [u8; 32]) -> Result<(), TransportError> {
        let len = match lock(&self.shared.state).sources.get(&id) {
            Some(src) => src.len(),
            None => return Err(TransportError::Config(format!("no region {id}"))),
        };
        let chunks = len.div_ceil(u64::from(self.shared.cfg.chunk));
        self.close_with(id, chunks, len, digest)
    }

    fn close_with(
        &self,
        id: u32,
        chunks: u64,
        len: u64,
        digest: [u8; 32],
    ) -> Result<(), TransportError> {
        let mut st = lock(&self.shared.state);
        queue_close(&self.shared, &mut st, id, chunks, len, digest)
    }

    /// Closes region `id`, read from a source in memory
    /// ([`Source::as_slice`]), as soon as every chunk of it is
    /// acknowledged, with the digest assembled from the BLAKE3 subtree
    /// values its chunks' checksums were made of: its bytes are hashed
    /// once, for those checksums, and nothing waits here. Any other source
    /// (or a chunk size that is not a power of two, whose chunks are not
    /// subtrees) is read for its digest on this thread and closed at once.
    pub fn close_region_when_sent(&self, id: u32) -> Result<(), TransportError> {
        let mut st = lock(&self.shared.state);
        let Some(source) = st.sources.get(&id).cloned() else {
            return Err(TransportError::Config(format!("no region {id}")));
        };
        if st.trees.contains_key(&id) && self.shared.cfg.chunk.is_power_of_two() {
            st.auto_close.insert(id);
            try_auto_close(&self.shared, &mut st, id);
            drop(st);
            self.shared.cond.notify_all();
            return Ok(());
        }
        drop(st);
        let digest = digest(source.as_ref())
            .map_err(|e| TransportError::io(format!("reading region {id} for its digest"), e))?;
        self.close_region(id, digest)
    }

    /// Sends everything `reader` yields, to its end, as one ordered region
    /// (a byte stream, which the receiver writes in order), and waits for
    /// the receiver to confirm it; returns its length.
    ///
    /// Chunks are read on this thread and go out on every stream as they
    /// are read; memory is bounded by the receiver's reorder window (it
    /// blocks while that many bytes are unacknowledged).
    pub fn send_stream(&self, meta: Vec<u8>, reader: &mut dyn Read) -> Result<u64, TransportError> {
        let id = self.open(meta, None)?;
        let result = self.stream_chunks(id, reader);
        if result.is_err() {
            // Nothing more of it is sent; the receiver discards it at BYE.
            let mut st = lock(&self.shared.state);
            st.ordered.remove(&id);
            st.progress.remove(&id);
        }
        let (chunks, len, digest) = result?;
        self.close_with(id, chunks, len, digest)?;
        self.wait_region(id)?;
        Ok(len)
    }

    /// Reads `reader` into chunks of ordered region `id`; returns their
    /// count, total length and BLAKE3.
    fn stream_chunks(
        &self,
        id: u32,
        reader: &mut dyn Read,
    ) -> Result<(u64, u64, [u8; 32]), TransportError> {
        let chunk = self.shared.cfg.chunk as usize;
        let window = u64::from(self.shared.welcome.reorder_units) * wire::REORDER_UNIT;
        let mut hasher = blake3::Hasher::new();
        let (mut seq, mut total) = (0u64, 0u64);
        loop {
            let mut buf = vec![0u8; chunk];
            let n = read_full(reader, &mut buf)
                .map_err(|e| TransportError::io(format!("reading the stream of region {id}"), e))?;
            if n == 0 {
                break;
            }
            buf.truncate(n);
            hasher.update(&buf);
            total += n as u64;
            let n = n as u64;
            let mut st = lock(&self.shared.state);
            // Within the reorder window, or alone in it (a chunk larger
            // than the window is always the next the receiver wants).
            while st.failed.is_none() && st.reorder_used > 0 && st.reorder_used + n > window {
                st = wait(&self.shared.cond, st, Duration::from_millis(200));
            }
            if let Some(f) = &st.failed {
                return Err(TransportError::SessionLost(f.clone()));
            }
            let Some(q) = st.ordered.get_mut(&id) else {
                return Err(TransportError::Config(format!("no ordered region {id}")));
            };
            q.push_back((seq, n, false));
            st.reorder_used += n;
            st.sched.add_chunk(id, seq, Arc::from(buf));
            Metrics::add(&self.shared.metrics.bytes_in, n);
            st.wake_all();
            seq += 1;
            if (n as usize) < chunk {
                break;
            }
        }
        let mut st = lock(&self.shared.state);
        if let Some(p) = st.progress.get_mut(&id) {
            p.1 = Some(total);
        }
        Ok((seq, total, *hasher.finalize().as_bytes()))
    }

    /// Waits until region `id` is placed and verified by the receiver.
    pub fn wait_region(&self, id: u32) -> Result<(), TransportError> {
        let mut st = lock(&self.shared.state);
        loop {
            match st.done.get(&id) {
                None => return Err(TransportError::Config(format!("no region {id}"))),
                Some(Some(r)) => {
                    let r = r.clone();
                    // Its source is no longer needed.
                    st.sources.remove(&id);
                    st.trees.remove(&id);
                    st.done.remove(&id);
                    return r.map_err(|text| TransportError::Region { region: id, text });
                }
                Some(None) => {}
            }
            if let Some(f) = &st.failed {
                return Err(TransportError::SessionLost(f.clone()));
            }
            st = wait(&self.shared.cond, st, Duration::from_millis(200));
        }
    }

    /// Sends a whole region and waits for the receiver to confirm it:
    /// [`Sender::open_region`], its digest, [`Sender::close_region`],
    /// [`Sender::wait_region`].
    ///
    /// A source in memory ([`Source::as_slice`], which cannot change) is
    /// hashed once: its digest is assembled from the BLAKE3 subtree values
    /// its chunks' checksums are made of, once every chunk is acknowledged.
    /// Any other source (a file, which could change while it is sent) is
    /// read a second time for its digest while the engine sends, so that a
    /// source that changed fails the receiver's check instead of arriving
    /// mixed.
    pub fn send_region(
        &self,
        meta: Vec<u8>,
        source: Arc<dyn Source>,
    ) -> Result<(), TransportError> {
        let id = self.open_region(meta, source)?;
        self.close_region_when_sent(id)?;
        self.wait_region(id)
    }

    /// Ends the session cleanly: waits for every chunk to be acknowledged,
    /// says `BYE`, waits for the receiver's, and stops the streams.
    pub fn close(self) -> Result<MetricsSnapshot, TransportError> {
        let deadline = Instant::now() + self.shared.cfg.resume_for + self.shared.cfg.stall_timeout;
        {
            let mut st = lock(&self.shared.state);
            while !(st.sched.idle() || st.failed.is_some()) {
                if Instant::now() > deadline {
                    return Err(TransportError::Timeout(
                        "waiting for the last acknowledgements".into(),
                    ));
                }
                st = wait(&self.shared.cond, st, Duration::from_millis(100));
            }
            if let Some(f) = &st.failed {
                return Err(TransportError::SessionLost(f.clone()));
            }
        }
        {
            let mut st = lock(&self.shared.state);
            st.bye_sent = true;
            self.shared.control.push(Ctl::Msg(Kind::Bye, Vec::new()));
        }
        let bye_deadline = Instant::now() + self.shared.cfg.stall_timeout;
        let bye = {
            let mut st = lock(&self.shared.state);
            while !st.bye && st.failed.is_none() && Instant::now() < bye_deadline {
                st = wait(&self.shared.cond, st, Duration::from_millis(100));
            }
            st.bye
        };
        // Before the streams are told to close: once told, they go, and the
        // figures would count none.
        let metrics = self.metrics();
        {
            let mut st = lock(&self.shared.state);
            st.closing = true;
            st.wake_all();
        }
        self.shared.control.close();
        self.stop();
        if bye {
            Ok(metrics)
        } else {
            Err(TransportError::Timeout(
                "waiting for the receiver's BYE".into(),
            ))
        }
    }

    fn stop(&self) {
        {
            let mut st = lock(&self.shared.state);
            st.closing = true;
            st.wake_all();
        }
        self.shared.control.close();
        for h in lock(&self.streams).drain(..) {
            let _ = h.join_timeout(Duration::from_secs(5));
        }
    }

    /// Cancels the session: nothing more is sent; the receiver discards
    /// what is unfinished when its grace period ends.
    pub fn cancel(self) {
        self.abort("cancelled");
    }

    /// [`Sender::cancel`] from any thread, without taking the sender: every
    /// call waiting on the session (`send_region`, `wait_region`,
    /// `send_stream`, `close`) returns [`TransportError::SessionLost`] with
    /// `reason`, and nothing more is sent.
    pub fn abort(&self, reason: &str) {
        {
            let mut st = lock(&self.shared.state);
            st.failed.get_or_insert_with(|| reason.to_string());
            st.wake_all();
        }
        self.shared.cond.notify_all();
        self.stop();
    }
}

impl Drop for Sender {
    fn drop(&mut self) {
        self.stop();
    }
}

/// BLAKE3 of a whole source, read in order.
pub fn digest(source: &dyn Source) -> std::io::Result<[u8; 32]> {
    if let Some(bytes) = source.as_slice() {
        return Ok(*blake3::hash(bytes).as_bytes());
    }
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let len = source.len();
    let mut off = 0;
    while off < len {
        let n = (len - off).min(buf.len() as u64) as usize;
        source.read_at(off, &mut buf[..n])?;
        h.update(&buf[..n]);
        off += n as u64;
    }
    Ok(*h.finalize().as_bytes())
}

type Handshake = ([u8; 16], [u8; 32], Welcome);

async fn connect(addr: SocketAddr, cfg: &SenderConfig) -> Result<LocalTcpStream, TransportError> {
    match timeout(cfg.connect_timeout, LocalTcpStream::connect(addr)).await {
        Ok(r) => r.map_err(|e| TransportError::io(format!("connecting to {addr}"), e)),
        Err(_) => Err(TransportError::Timeout(format!("connecting to {addr}"))),
    }
}

async fn handshake(
    addr: SocketAddr,
    cfg: SenderConfig,
    streams: u16,
    mailbox: Arc<Mailbox<Ctl>>,
    slot: Arc<OnceLock<Weak<Shared>>>,
) -> Result<Handshake, TransportError> {
    let (r, w, hs) = handshake_conn(addr, &cfg, streams, [0; 16]).await?;
    // Runs until the session ends; detached, the engine's shutdown ends it
    // at the latest.
    drop(spawn_local(control_tasks(r, w, mailbox, slot))?);
    Ok(hs)
}

/// Opens a control connection and runs the handshake: a new session when
/// `resume` is all zero, else that session again (with a new session key).
async fn handshake_conn(
    addr: SocketAddr,
    cfg: &SenderConfig,
    streams: u16,
    resume: [u8; 16],
) -> Result<(MsgReader, MsgWriter, Handshake), TransportError> {
    let stream = connect(addr, cfg).await?;
    let _ = stream.set_nodelay(true);
    // A receiver that vanishes without a FIN or RST (host down, link cut)
    // shows up as an error instead of a control stream that waits forever.
    let _ = stream.set_dead_peer_timeout(cfg.stall_timeout);
    let peer = addr.to_string();
    let (mut r, mut w) = conn::split(stream, peer.clone(), 0);
    let nonce: [u8; 32] = auth::random().map_err(|e| TransportError::io("random nonce", e))?;
    let hello = Hello {
        version_min: wire::VERSION_MIN,
        version_max: wire::VERSION_MAX,
        keyed: cfg.key.is_some(),
        caps: caps::ALL,
        nonce,
        resume,
        policy: wire_policy(&cfg.policy),
        streams,
    };
    w.send(Kind::Hello, &hello.encode()).await?;
    let limit = Some(cfg.connect_timeout);
    let closed = format!("{peer} closed the connection during the handshake");
    let body = r
        .expect(limit, Kind::Challenge, "CHALLENGE", &closed)
        .await?;
    let ch = Challenge::decode(body).map_err(|e| wire_err(&peer, e))?;
    if !(wire::VERSION_MIN..=wire::VERSION_MAX).contains(&ch.version) {
        return Err(TransportError::Auth(format!(
            "the receiver chose protocol version {}, which this sender does not speak",
            ch.version
        )));
    }
    let psk = auth::psk(cfg.key.as_ref());
    let transcript = auth::transcript(&hello.encode(), &ch.encode_unproven());
    if !auth::check_proof(auth::proof(&psk, b"server", &transcript), &ch.proof) {
        let text = "wrong key: the receiver's proof does not match";
        let _ = w
            .send(
                Kind::Refuse,
                &Reason {
                    id: 0,
                    code: code::AUTH,
                    text: text.into(),
                }
                .encode(),
            )
            .await;
        return Err(TransportError::Auth(text.into()));
    }
    if resume != [0; 16] && (!ch.resumed || ch.session != resume) {
        return Err(TransportError::Protocol {
            peer,
            text: "asked to resume a session; the receiver answered with another".into(),
        });
    }
    w.send(
        Kind::Proof,
        auth::proof(&psk, b"client", &transcript).as_bytes(),
    )
    .await?;
    let session_key = auth::session_key(&psk, &transcript);
    let ck = auth::conn_key(&session_key, u16::MAX, &nonce, &ch.nonce);
    r.set_tagger(Tagger::new(ck, Direction::ToServer));
    w.set_tagger(Tagger::new(ck, Direction::ToServer));
    let body = r
        .expect(
            limit,
            Kind::Welcome,
            "WELCOME",
            "the receiver refused the key (it closed the connection)",
        )
        .await?;
    let welcome = Welcome::decode(body).map_err(|e| wire_err(&peer, e))?;
    Ok((r, w, (ch.session, session_key, welcome)))
}

/// Runs the control stream for the life of the session: a writer task
/// draining the mailbox and this task reading `DONE`, `BYE` and `ERROR`.
/// When the connection fails mid-session, the session is resumed on a new
/// one (see [`resume`]); it fails only when that does not work.
async fn control_tasks(
    mut r: MsgReader,
    mut w: MsgWriter,
    mailbox: Arc<Mailbox<Ctl>>,
    slot: Arc<OnceLock<Weak<Shared>>>,
) {
    let shared = loop {
        if let Some(s) = slot.get() {
            break s.upgrade();
        }
        let _ = sleep(Duration::from_millis(1)).await;
    };
    let Some(shared) = shared else { return };
    loop {
        let sock = w.stream().clone();
        let mb = mailbox.clone();
        let writer = spawn_local(async move {
            while let Some(ctl) = mb.recv().await {
                let Ctl::Msg(kind, body) = ctl else { break };
                w.send(kind, &body).await?;
            }
            let _ = w.stream().shutdown(std::net::Shutdown::Write).await;
            Ok::<(), TransportError>(())
        });
        // Every `stall_timeout`, the `CLOSE` of each closed region still
        // without a `DONE` goes out again: the receiver answers a repeated
        // `CLOSE` of a finished region with its `DONE` again, so a `DONE`
        // lost with a failed connection costs a delay, never a hang.
        let ticking = Rc::new(Cell::new(true));
        let tick = ticking.clone();
        let sh = shared.clone();
        let ticker = spawn_local(async move {
            loop {
                let _ = sleep(sh.cfg.stall_timeout).await;
                if !tick.get() {
                    return;
                }
                let st = lock(&sh.state);
                if st.closing || st.bye {
                    return;
                }
                for close in st.pending.values().filter_map(|(_, c)| c.as_ref()) {
                    sh.control.push(Ctl::Msg(Kind::Close, close.clone()));
                }
            }
        });
        let result = read_control(&shared, &mut r).await;
        ticking.set(false);
        drop(ticker);
        let e = match result {
            Ok(()) => {
                // BYE: the writer ends when the mailbox is closed.
                if let Ok(h) = writer {
                    let _ = h.await;
                }
                return;
            }
            Err(e) => e.to_string(),
        };
        // The connection failed: stop its writer before anything is
        // queued again (what it held is repeated from `pending`).
        let _ = sock.shutdown(std::net::Shutdown::Both).await;
        mailbox.push(Ctl::Stop);
        if let Ok(h) = writer {
            let _ = h.await;
        }
        let resumable = {
            let st = lock(&shared.state);
            !(st.closing || st.bye || st.failed.is_some())
        };
        let outcome = if resumable {
            resume(&shared).await.map_err(|e2| {
                format!("the control stream failed ({e}) and the session could not resume: {e2}")
            })
        } else {
            Err(e)
        };
        match outcome {
            Ok((r2, w2)) => {
                Metrics::add(&shared.metrics.resumes, 1);
                shared.events.emit([Event::Resumed]);
                r = r2;
                w = w2;
            }
            Err(text) => {
                let mut st = lock(&shared.state);
                if !st.closing && !st.bye {
                    st.failed.get_or_insert(text);
                    st.wake_all();
                }
                drop(st);
                shared.cond.notify_all();
                shared.control.close();
                return;
            }
        }
    }
}

/// Reads the control stream into the session until `BYE` (`Ok`) or an
/// error.
async fn read_control(shared: &Arc<Shared>, r: &mut MsgReader) -> Result<(), TransportError> {
    let peer = r.peer.clone();
    loop {
        let Some((kind, body)) = r.recv(None).await? else {
            return Err(TransportError::SessionLost(format!(
                "{peer} closed the control stream"
            )));
        };
        match kind {
            Kind::Done => {
                let reason = Reason::decode(body).map_err(|e| wire_err(&peer, e))?;
                let mut st = lock(&shared.state);
                let mut events = Vec::new();
                if let Some(slot) = st.done.get_mut(&reason.id)
                    && slot.is_none()
                {
                    let error = (reason.code != code::OK).then_some(reason.text);
                    *slot = Some(error.clone().map_or(Ok(()), Err));
                    st.pending.remove(&reason.id);
                    // A DONE may overtake the ACK of the region's last
                    // chunks (they travel on other connections): a
                    // verified region is complete, and its progress says so.
                    if let Some((done, Some(len))) = st.progress.remove(&reason.id)
                        && error.is_none()
                        && done < len
                    {
                        events.push(Event::Progress {
                            session: shared.session,
                            region: reason.id,
                            done: len,
                            len: Some(len),
                        });
                    }
                    if let Some(q) = st.ordered.remove(&reason.id) {
                        st.reorder_used -= q.iter().map(|e| e.1).sum::<u64>();
                    }
                    events.push(Event::RegionDone {
                        session: shared.session,
                        region: reason.id,
                        error,
                    });
                }
                drop(st);
                shared.cond.notify_all();
                shared.events.emit(events);
            }
            Kind::Bye => {
                lock(&shared.state).bye = true;
                shared.cond.notify_all();
                return Ok(());
            }
            Kind::Error => {
                return Err(refused(body, &peer));
            }
            other => {
                return Err(wire_err(
                    &peer,
                    WireError::Unexpected {
                        expected: "DONE, BYE or ERROR on the control stream",
                        found: other,
                    },
                ));
            }
        }
    }
}

/// Opens a new control connection to the same session within the
/// sender's `resume_for`, retrying with backoff while the receiver cannot
/// be reached; gives up at once when it answers that the session is gone
/// or the key is wrong. On success the new session key is in place, and
/// every region without a `DONE` has been queued again (`OPEN`, then
/// `CLOSE` if it was closed), in order, ahead of anything newer.
async fn resume(shared: &Arc<Shared>) -> Result<(MsgReader, MsgWriter), TransportError> {
    let deadline = Instant::now() + shared.cfg.resume_for;
    let mut backoff = Duration::from_millis(50);
    loop {
        if lock(&shared.state).closing {
            return Err(TransportError::Cancelled);
        }
        match handshake_conn(
            shared.addr,
            &shared.cfg,
            shared.hello_streams,
            shared.session,
        )
        .await
        {
            Ok((r, w, (_, key, _))) => {
                let st = lock(&shared.state);
                *lock(&shared.session_key) = key;
                shared.control.clear();
                for (open, close) in st.pending.values() {
                    shared.control.push(Ctl::Msg(Kind::Open, open.clone()));
                    if let Some(c) = close {
                        shared.control.push(Ctl::Msg(Kind::Close, c.clone()));
                    }
                }
                if st.bye_sent {
                    shared.control.push(Ctl::Msg(Kind::Bye, Vec::new()));
                }
                return Ok((r, w));
            }
            Err(e @ (TransportError::Refused { .. } | TransportError::Auth(_))) => return Err(e),
            Err(e) => {
                if Instant::now() + backoff > deadline {
                    return Err(e);
                }
            }
        }
        let _ = sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(1));
    }
}

/// One data stream slot: (re)connects and sends until the session closes
/// or gives up.
async fn stream_main(shared: Arc<Shared>, i: usize) {
    let mut backoff = Duration::from_millis(50);
    let mut last_ok = Instant::now();
    loop {
        if lock(&shared.state).closing {
            break;
        }
        let r = run_stream(&shared, i).await;
        {
            let mut st = lock(&shared.state);
            let back = st.sched.fail(i);
            if back.resent_bytes > 0 {
                Metrics::add(&shared.metrics.retransmitted_chunks, back.chunks);
                Metrics::add(&shared.metrics.retransmitted_bytes, back.resent_bytes);
            }
            st.dead[i] = false;
            st.wake_all();
            if st.closing || st.failed.is_some() {
                break;
            }
        }
        shared.cond.notify_all();
        let failure = match &r {
            Ok(true) => Some("its connection failed".to_string()),
            Ok(false) => None,
            Err(e) => Some(e.to_string()),
        };
        if let Some(reason) = failure {
            shared
                .events
                .emit([Event::StreamFailed { stream: i, reason }]);
        }
        match r {
            Ok(true) => {
                // It worked, then failed: a failure, but a fresh one.
                Metrics::add(&shared.metrics.stream_failures, 1);
                last_ok = Instant::now();
                backoff = Duration::from_millis(50);
            }
            Ok(false) => break,
            Err(e @ TransportError::Region { .. }) => {
                // The source failed, not the network: no retry helps.
                let mut st = lock(&shared.state);
                st.failed.get_or_insert_with(|| e.to_string());
                st.wake_all();
                drop(st);
                shared.cond.notify_all();
                break;
            }
            Err(e) => {
                Metrics::add(&shared.metrics.stream_failures, 1);
                let mut st = lock(&shared.state);
                if last_ok.elapsed() > shared.cfg.resume_for && st.sched.live() == 0 {
                    st.failed
                        .get_or_insert_with(|| format!("every stream failed; last error: {e}"));
                    st.wake_all();
                    drop(st);
                    shared.cond.notify_all();
                    break;
                }
            }
        }
        let _ = sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

/// Waits for the next chunk of stream `i`: `Ok(None)` when the session
/// closes, `Err` when the stream's reader saw it fail.
async fn next_chunk(shared: &Shared, i: usize) -> Result<Option<Chunk>, ()> {
    std::future::poll_fn(|cx| {
        let mut st = lock(&shared.state);
        if st.dead[i] {
            return Poll::Ready(Err(()));
        }
        // A failed (or aborted) session sends nothing more; a closing one
        // drains what is queued first.
        if st.failed.is_some() {
            return Poll::Ready(Ok(None));
        }
        if let Some(c) = st.sched.next(i) {
            return Poll::Ready(Ok(Some(c)));
        }
        if st.closing {
            return Poll::Ready(Ok(None));
        }
        st.wakers[i] = Some(cx.waker().clone());
        Poll::Pending
    })
    .await
}

/// One connection of stream `i`: `Ok(true)` when it ended because the
/// connection failed after working, `Ok(false)` when the session closes.
async fn run_stream(shared: &Arc<Shared>, i: usize) -> Result<bool, TransportError> {
    let cfg = &shared.cfg;
    let stream = connect(shared.addr, cfg).await?;
    let _ = stream.set_nodelay(true);
    if let Some(cc) = &cfg.congestion
        && let Err(e) = stream.set_congestion(cc)
    {
        lock(&shared.state).congestion_error = Some(format!("TCP_CONGESTION {cc}: {e}"));
    }
    let peer = shared.addr.to_string();
    let chunk = cfg.chunk as usize;
    let max_frame = max_chunk_frame_len(chunk);
    let (mut r, mut w) = conn::split(stream, peer.clone(), 0);
    let stream_id = i as u16;
    let nonce: [u8; 32] = auth::random().map_err(|e| TransportError::io("random nonce", e))?;
    let key = *lock(&shared.session_key);
    let proof = auth::join_proof(&key, b"join", &shared.session, stream_id, &nonce, None);
    w.send(
        Kind::Join,
        &Join {
            session: shared.session,
            stream: stream_id,
            nonce,
            proof: *proof.as_bytes(),
        }
        .encode(),
    )
    .await?;
    let closed = format!("{peer} closed a joining stream");
    let body = r
        .expect(Some(cfg.connect_timeout), Kind::JoinOk, "JOIN_OK", &closed)
        .await?;
    let ok = JoinOk::decode(body).map_err(|e| wire_err(&peer, e))?;
    let want = auth::join_proof(
        &key,
        b"join-ok",
        &shared.session,
        stream_id,
        &nonce,
        Some(&ok.nonce),
    );
    if !auth::check_proof(want, &ok.proof) {
        return Err(TransportError::Auth("JOIN_OK proof does not match".into()));
    }
    let ck = auth::conn_key(&key, stream_id, &nonce, &ok.nonce);
    r.set_tagger(Tagger::new(ck, Direction::ToServer));
    w.set_tagger(Tagger::new(ck, Direction::ToServer));
    Metrics::add(&shared.metrics.stream_connects, 1);
    {
        let mut st = lock(&shared.state);
        st.dead[i] = false;
        st.sched.up(i);
        st.wake_all();
    }
    shared.events.emit([Event::StreamUp { stream: i }]);
    let sock = w.stream().clone();
    let reader_done = Rc::new(Cell::new(false));
    let rd = reader_done.clone();
    let sh = shared.clone();
    let reader = spawn_local(async move {
        let r = ack_reader(&sh, i, &mut r).await;
        rd.set(true);
        let mut st = lock(&sh.state);
        st.dead[i] = true;
        if let Some(w) = st.wakers[i].take() {
            w.wake();
        }
        r
    })?;
    let codec = CodecConfig {
        key: Some(SessionKey(key)),
        ..CodecConfig::default()
    };
    let mut enc = Encoder::new(&codec, cfg.policy)?;
    enc.set_thread_cpu_clock(Some(crate::thread_cpu_time));
    let fixed_end = wire::HEADER_LEN + wire::DATA_FIXED_LEN;
    let mut buf = vec![0u8; fixed_end + max_frame + wire::TAG_LEN];
    let mut data = vec![0u8; chunk];
    let mut tail = vec![0u8; dwcp_codec::frame::CHECKSUM_LEN + wire::TAG_LEN];
    let result: Result<bool, TransportError> = async {
        loop {
            let c = match next_chunk(shared, i).await {
                Ok(Some(c)) => c,
                Ok(None) => return Ok(false),
                Err(()) => return Ok(true),
            };
            let len = c.len as usize;
            let mut held: Option<Arc<dyn Source>> = None;
            // A region chunk's source and digest record, in one look.
            let (src, held_tree) = if c.data.is_none() {
                let st = lock(&shared.state);
                (
                    st.sources.get(&c.region).cloned(),
                    st.trees.get(&c.region).cloned(),
                )
            } else {
                (None, None)
            };
            // Where a chunk to be sent stored lies in an in-memory source.
            let mut in_memory = None;
            let bytes: &[u8] = match &c.data {
                Some(d) => d,
                None => {
                    let Some(src) = src else {
                        // Finished meanwhile (acknowledged on another
                        // stream): nothing to send.
                        continue;
                    };
                    let src = held.insert(src);
                    // Memory sources are encoded where they lie.
                    let direct = usize::try_from(c.offset).ok().and_then(|off| {
                        let range = off..off.checked_add(len)?;
                        let s = src.as_slice()?.get(range.clone())?;
                        if matches!(cfg.policy, Policy::Stored) {
                            in_memory = Some((src.clone(), range));
                        }
                        Some(s)
                    });
                    match direct {
                        Some(s) => s,
                        None => {
                            src.read_at(c.offset, &mut data[..len]).map_err(|e| {
                                TransportError::Region {
                                    region: c.region,
                                    text: format!("reading the source at {}: {e}", c.offset),
                                }
                            })?;
                            &data[..len]
                        }
                    }
                }
            };
            if let Policy::Auto { .. } = cfg.policy {
                let bw = lock(&shared.state).bw.get();
                let link = bw
                    .or((cfg.rate_limit > 0).then_some(cfg.rate_limit as f64))
                    .unwrap_or(125e6);
                // Each core encodes for its share of the link, whatever
                // the number of streams it carries: N streams on W cores
                // deliver (W/N) x min(link/W x ratio, speed), so the method
                // that wins for link/W on one core wins for the session.
                // (link/N, which this used to pass, made every encoder
                // believe it had a whole core for a sliver of the link,
                // and chose ZStd where the CPU could not keep up.)
                enc.set_policy(Policy::Auto {
                    link_bytes_per_sec: (link / shared.workers.max(1) as f64).max(1.0),
                })?;
            }
            // A region chunk's checksum covers its BLAKE3 subtree at its
            // offset; an in-memory region's digest is assembled from those.
            let at = (c.addressing == Addressing::Region).then_some(c.offset);
            // Stored chunks of in-memory sources go to the kernel from where
            // they lie, between a head and a tail of our own: one copy of
            // the payload fewer than assembling the frame.
            let stored_from = in_memory.and_then(|(src, range)| conn::SourceBytes::new(src, range));
            let frame_head = fixed_end..fixed_end + dwcp_codec::frame::HEADER_LEN;
            let (stats, digest) = match &stored_from {
                Some(_) => enc.encode_stored_chunk_at(
                    bytes,
                    c.id,
                    at,
                    &mut buf[frame_head],
                    &mut tail[..dwcp_codec::frame::CHECKSUM_LEN],
                )?,
                None => enc.encode_chunk_at(bytes, c.id, at, &mut buf[fixed_end..])?,
            };
            if let Some(tree) = held_tree {
                crate::memory::record_digested(&tree, c.offset, bytes, &digest);
            }
            let frame_len = stats.frame_bytes as usize;
            let h = DataHeader {
                stream: stream_id,
                addressing: c.addressing,
                chunk: c.id,
                region: c.region,
                raw_len: c.len,
                offset: c.offset,
            };
            buf[wire::HEADER_LEN..fixed_end].copy_from_slice(&h.encode());
            let wire_len = (fixed_end + frame_len + wire::TAG_LEN) as u64;
            let wait = {
                let mut st = lock(&shared.state);
                st.sched.on_wire(i, c.id, wire_len);
                st.bucket.as_mut().map(|b| b.take(wire_len, Instant::now()))
            };
            if let Some(d) = wait
                && !d.is_zero()
            {
                let _ = sleep(d).await;
            }
            let res = match stored_from {
                Some(payload) => {
                    let (res, h, t) = w.send_data_stored(buf, payload, tail).await;
                    (buf, tail) = (h, t);
                    res
                }
                None => {
                    let (res, b) = w.send_data(buf, frame_len).await;
                    buf = b;
                    res
                }
            };
            res?;
            Metrics::add(&shared.metrics.wire_bytes, wire_len);
        }
    }
    .await;
    let _ = sock.shutdown(std::net::Shutdown::Both).await;
    let read = reader.await;
    match (&result, read) {
        (Ok(_), Ok(Err(e))) if !reader_done.get() || !lock(&shared.state).closing => {
            // The reader's reason is the better one.
            if matches!(result, Ok(true)) {
                return Err(e);
            }
        }
        _ => {}
    }
    result
}

/// Reads `ACK`s of stream `i` into the scheduler; fails on a stalled
/// stream (chunks outstanding, nothing heard for the stall timeout).
async fn ack_reader(
    shared: &Arc<Shared>,
    i: usize,
    r: &mut MsgReader,
) -> Result<(), TransportError> {
    let peer = r.peer.clone();
    loop {
        let msg = match r.recv(Some(shared.cfg.stall_timeout)).await {
            Ok(m) => m,
            Err(TransportError::Timeout(t)) => {
                let st = lock(&shared.state);
                if st.sched.free(i) < u64::from(shared.welcome.window) {
                    return Err(TransportError::Timeout(format!(
                        "{t}: stream {i} has unacknowledged chunks"
                    )));
                }
                continue;
            }
            Err(e) => return Err(e),
        };
        let Some((kind, body)) = msg else {
            return Err(TransportError::io(
                format!("stream {i}"),
                std::io::ErrorKind::UnexpectedEof.into(),
            ));
        };
        match kind {
            Kind::Ack => {
                let ids = wire::decode_ack(body).map_err(|e| wire_err(&peer, e))?;
                let mut st = lock(&shared.state);
                let now = Instant::now();
                let (mut n, mut wire) = (0, 0);
                let mut touched = Vec::new();
                for id in ids {
                    if let Some((c, w)) = st.sched.ack_wire(i, id) {
                        n += u64::from(c.len);
                        wire += w;
                        acked(&mut st, &c);
                        if !touched.contains(&c.region) {
                            touched.push(c.region);
                        }
                    }
                }
                for &r in &touched {
                    try_auto_close(shared, &mut st, r);
                }
                let events: Vec<Event> = if shared.events.wanted() {
                    touched
                        .iter()
                        .filter_map(|r| {
                            let &(done, len) = st.progress.get(r)?;
                            Some(Event::Progress {
                                session: shared.session,
                                region: *r,
                                done,
                                len,
                            })
                        })
                        .collect()
                } else {
                    Vec::new()
                };
                // The link's rate is what the codec's `auto` needs: wire
                // bytes, not the application bytes they carried (which
                // grow with the ratio and would make compression look
                // ever less worth it).
                st.bw.record(wire, now);
                Metrics::add(&shared.metrics.bytes_acked, n);
                st.wake_all();
                drop(st);
                shared.cond.notify_all();
                shared.events.emit(events);
            }
            Kind::Error => return Err(refused(body, &peer)),
            other => {
                return Err(wire_err(
                    &peer,
                    WireError::Unexpected {
                        expected: "ACK or ERROR on a data stream",
                        found: other,
                    },
                ));
            }
        }
    }
}

/// Queues the `CLOSE` of region `id` (kept for a resume to repeat).
fn queue_close(
    shared: &Shared,
    st: &mut State,
    id: u32,
    chunks: u64,
    len: u64,
    digest: [u8; 32],
) -> Result<(), TransportError> {
    let body = Close {
        region: id,
        chunks,
        len,
        digest,
    }
    .encode();
    if !shared.control.push(Ctl::Msg(Kind::Close, body.clone())) {
        return Err(TransportError::SessionLost(
            "the control stream is closed".into(),
        ));
    }
    if let Some(p) = st.pending.get_mut(&id) {
        p.1 = Some(body);
    }
    Ok(())
}

/// Closes region `id` if it waits to be closed once sent
/// ([`Sender::close_region_when_sent`]) and every chunk is acknowledged:
/// its digest is assembled from the recorded subtree values (all of them
/// but a short tail, which is read from the source in memory). A failure
/// fails the region, as its `DONE` would.
fn try_auto_close(shared: &Shared, st: &mut State, id: u32) {
    if !st.auto_close.contains(&id) || st.sched.region_outstanding(id) != (0, false) {
        return;
    }
    st.auto_close.remove(&id);
    let (Some(source), Some(tree)) = (st.sources.get(&id).cloned(), st.trees.get(&id).cloned())
    else {
        return;
    };
    let len = source.len();
    let result = match source.as_slice() {
        Some(bytes) => tree.finish(len, |off, buf| {
            let start = off as usize;
            buf.copy_from_slice(&bytes[start..start + buf.len()]);
            Ok(())
        }),
        None => Err("the source is not in memory".into()),
    };
    let closed = result.map_err(|e| e.to_string()).and_then(|h| {
        let chunks = len.div_ceil(u64::from(shared.cfg.chunk));
        queue_close(shared, st, id, chunks, len, h.into()).map_err(|e| e.to_string())
    });
    if let Err(text) = closed
        && let Some(slot) = st.done.get_mut(&id)
    {
        *slot = Some(Err(text));
    }
}

/// Books the acknowledgement of chunk `c`: its region's progress and, for an
/// ordered region, the reorder window it frees.
fn acked(st: &mut State, c: &Chunk) {
    if let Some(p) = st.progress.get_mut(&c.region) {
        p.0 += u64::from(c.len);
    }
    if c.addressing != Addressing::Ordered {
        return;
    }
    let Some(q) = st.ordered.get_mut(&c.region) else {
        return;
    };
    if let Some(e) = q.iter_mut().find(|e| e.0 == c.offset) {
        e.2 = true;
    }
    while let Some(&(_, n, true)) = q.front() {
        q.pop_front();
        st.reorder_used -= n;
    }
}

/// Fills `buf` from `reader` as far as it goes; returns the bytes read
/// (less than `buf.len()` only at the end of the stream).
fn read_full(reader: &mut dyn Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match reader.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// `auto` stream count: every step, when acknowledged throughput grew by
/// at least [`AUTO_GAIN`] since the last stream was added and work is
/// waiting, another stream joins, up to `max`; two steps without growth
/// end the search.
async fn auto_streams(shared: Arc<Shared>, max: usize) {
    let mut last_rate = 0.0;
    let mut last_bytes = shared.metrics.bytes_acked.load(Ordering::Relaxed);
    let mut flat = 0;
    loop {
        let _ = sleep(AUTO_STEP).await;
        let bytes = shared.metrics.bytes_acked.load(Ordering::Relaxed);
        let rate = (bytes - last_bytes) as f64 / AUTO_STEP.as_secs_f64();
        last_bytes = bytes;
        // `Some(i)`: start slot `i`; `None`: look again next step.
        let add = {
            let mut st = lock(&shared.state);
            if st.closing || st.failed.is_some() {
                return;
            }
            if st.sched.idle() || rate == 0.0 {
                None
            } else if rate < last_rate * AUTO_GAIN {
                flat += 1;
                if flat >= 2 {
                    return;
                }
                None
            } else {
                flat = 0;
                last_rate = rate;
                if st.sched.streams() >= max {
                    return;
                }
                let i = st.sched.add_stream();
                st.wakers.push(None);
                st.dead.push(false);
                Some(i)
            }
        };
        if let Some(i) = add {
            let s = shared.clone();
            let core = i % shared.workers.max(1);
            // The new slot runs until the session closes; its handle is not
            // kept (the engine's shutdown ends it with the others).
            let _ = dwcp_engine::spawn_on(core, move || stream_main(s, i)).await;
        }
    }
}
