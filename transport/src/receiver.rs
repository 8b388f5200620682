//! The receiving end: accepts sessions and data streams, places chunks,
//! acknowledges them, and finishes regions when every chunk is in and the
//! digest matches.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dwcp_codec::{CodecConfig, DecodeLimits, Decoder, SessionKey, max_chunk_frame_len};
use dwcp_engine::{
    Engine, LocalTcpListener, LocalTcpStream, RemoteHandle, spawn_local, spawn_on, timeout,
};

use crate::auth::{self, Direction, Tagger};
use crate::conn::{self, MsgReader, MsgWriter};
use crate::error::{TransportError, WireError, refused, wire_err};
use crate::session::{
    Event, Events, Mailbox, Metrics, MetricsSnapshot, ReceiverConfig, RegionInfo, RegionWriter,
    Sink, lock,
};
use crate::wire::{
    self, Addressing, Challenge, Close, DataHeader, Hello, Join, JoinOk, Kind, Open, Reason,
    Welcome, caps, code,
};

/// How long a fresh connection has to say who it is.
const FIRST_MESSAGE: Duration = Duration::from_secs(10);
/// How long a control connection's peer may stay silent to TCP (no ACK,
/// no keepalive answer) before the connection counts as dead.
const CONTROL_DEAD_PEER: Duration = Duration::from_secs(20);
/// How long a chunk waits for its region's OPEN.
const OPEN_WAIT: Duration = Duration::from_secs(5);
/// How often the accept loop looks at its stop flag and expired sessions.
const ACCEPT_POLL: Duration = Duration::from_millis(200);

/// A receiver bound to an address, serving sessions on an engine until it
/// is closed or the engine stops.
pub struct Receiver {
    shared: Arc<Shared>,
    addr: SocketAddr,
    accept: Option<RemoteHandle<Result<(), TransportError>>>,
}

struct Shared {
    cfg: ReceiverConfig,
    sink: Arc<dyn Sink>,
    sessions: Mutex<HashMap<[u8; 16], Arc<RecvSession>>>,
    metrics: Metrics,
    /// Shared with the threads that finish regions.
    events: Arc<Events>,
    stopping: AtomicBool,
    workers: usize,
}

enum ControlMsg {
    Send(Kind, Vec<u8>),
    /// The control connection of this epoch is gone: its writer stops.
    Stop(u64),
}

struct RecvSession {
    id: [u8; 16],
    /// Session key of the current epoch (changes when resumed).
    key: Mutex<[u8; 32]>,
    state: Mutex<RState>,
    control: Mailbox<ControlMsg>,
}

/// The reorder window a receiver announces, in [`wire::REORDER_UNIT`]s.
fn reorder_units(bytes: u64) -> u16 {
    (bytes / wire::REORDER_UNIT).min(u64::from(u16::MAX)) as u16
}

#[derive(Default)]
struct RState {
    epoch: u64,
    regions: HashMap<u32, RRegion>,
    placed: HashSet<u64>,
    /// Bytes of ordered chunks held out of order, all regions together.
    reorder_held: u64,
    control_up: bool,
    detached_since: Option<Instant>,
    ended: bool,
}

struct RRegion {
    /// What `OPEN` said; `None` for an ordered region.
    len: Option<u64>,
    /// An ordered region's delivery state.
    ordered: Option<Arc<Mutex<Reorder>>>,
    writer: Arc<dyn RegionWriter>,
    /// Chunks placed, and their bytes.
    placed: u64,
    placed_bytes: u64,
    close: Option<Close>,
    /// Finishing started (or done).
    finishing: bool,
    /// The `DONE` reason, once finished.
    done: Option<Reason>,
}

/// An ordered region's chunks on their way to its writer: delivered in
/// sequence, those that arrive early held (in the session's bounded reorder
/// window) until the gap before them fills.
#[derive(Default)]
struct Reorder {
    /// The next sequence number to deliver.
    next: u64,
    /// Bytes delivered so far: where the next one is written.
    delivered: u64,
    held: std::collections::BTreeMap<u64, Vec<u8>>,
}

impl Receiver {
    /// Binds `addr` and starts accepting on core 0 of `engine`.
    pub fn bind(
        engine: &Engine,
        addr: SocketAddr,
        cfg: ReceiverConfig,
        sink: Arc<dyn Sink>,
    ) -> Result<Receiver, TransportError> {
        if cfg.window == 0 || cfg.max_chunk == 0 || cfg.max_chunk > crate::session::MAX_CHUNK {
            return Err(TransportError::Config(format!(
                "window {} and chunk limit {} must be positive, the chunk limit at most {}",
                cfg.window,
                cfg.max_chunk,
                crate::session::MAX_CHUNK
            )));
        }
        let listener = std::net::TcpListener::bind(addr)
            .map_err(|e| TransportError::io(format!("binding {addr}"), e))?;
        let addr = listener
            .local_addr()
            .map_err(|e| TransportError::io("reading the bound address", e))?;
        let shared = Arc::new(Shared {
            cfg,
            sink,
            sessions: Mutex::new(HashMap::new()),
            metrics: Metrics::default(),
            events: Arc::default(),
            stopping: AtomicBool::new(false),
            workers: engine.workers(),
        });
        let s = shared.clone();
        let accept = engine.spawn_on(0, move || accept_loop(s, listener))?;
        Ok(Receiver {
            shared,
            addr,
            accept: Some(accept),
        })
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Counters over every session.
    pub fn metrics(&self) -> MetricsSnapshot {
        self.shared.metrics.snapshot(0, 0.0)
    }

    /// Calls `f` with the [`Event`]s of every session from now on (each
    /// chunk placed, each region verified or failed), replacing any earlier
    /// callback.
    pub fn on_event(&self, f: impl Fn(&Event) + Send + Sync + 'static) {
        self.shared.events.set(Arc::new(f));
    }

    /// Sessions open now (including those waiting to be resumed).
    pub fn sessions(&self) -> usize {
        lock(&self.shared.sessions).len()
    }

    /// Stops accepting, discards unfinished regions, and waits for the
    /// accept loop; sessions' connections end when the engine stops.
    pub fn close(mut self) -> Result<(), TransportError> {
        self.stop()
    }

    fn stop(&mut self) -> Result<(), TransportError> {
        self.shared.stopping.store(true, Ordering::Relaxed);
        let r = match self.accept.take() {
            Some(h) => h.join().map_err(TransportError::from).and_then(|r| r),
            None => Ok(()),
        };
        let sessions: Vec<_> = lock(&self.shared.sessions)
            .drain()
            .map(|(_, s)| s)
            .collect();
        for s in sessions {
            s.end(true);
        }
        r
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

impl RecvSession {
    /// Ends the session; `abort` discards its unfinished regions.
    fn end(&self, abort: bool) {
        let regions: Vec<Arc<dyn RegionWriter>> = {
            let mut st = lock(&self.state);
            st.ended = true;
            st.regions
                .values()
                .filter(|r| r.done.is_none())
                .map(|r| r.writer.clone())
                .collect()
        };
        if abort {
            for w in regions {
                w.abort();
            }
        }
        self.control.close();
    }
}

async fn accept_loop(
    shared: Arc<Shared>,
    listener: std::net::TcpListener,
) -> Result<(), TransportError> {
    let listener = LocalTcpListener::from_std(listener);
    while !shared.stopping.load(Ordering::Relaxed) {
        expire(&shared);
        match timeout(ACCEPT_POLL, listener.accept()).await {
            Err(_) => continue,
            Ok(Err(e)) => {
                // EMFILE and friends: wait and go on rather than stop serving.
                shared.events.emit([Event::AcceptFailed {
                    reason: e.to_string(),
                }]);
                let _ = dwcp_engine::sleep(ACCEPT_POLL).await;
            }
            Ok(Ok((stream, peer))) => {
                let s = shared.clone();
                // A failed spawn means the engine is stopping; the
                // connection is dropped (closed).
                let _ = spawn_local(async move {
                    let events = s.events.clone();
                    if let Err(e) = handle_conn(s, stream, peer).await {
                        events.emit([Event::ConnectionFailed {
                            peer,
                            reason: e.to_string(),
                        }]);
                    }
                });
            }
        }
    }
    Ok(())
}

/// Drops sessions whose grace period ran out, discarding their unfinished
/// regions.
fn expire(shared: &Shared) {
    let grace = shared.cfg.grace;
    let gone: Vec<Arc<RecvSession>> = {
        let mut map = lock(&shared.sessions);
        let ids: Vec<[u8; 16]> = map
            .iter()
            .filter(|(_, s)| {
                let st = lock(&s.state);
                st.ended || st.detached_since.is_some_and(|t| t.elapsed() > grace)
            })
            .map(|(k, _)| *k)
            .collect();
        ids.iter().filter_map(|k| map.remove(k)).collect()
    };
    for s in gone {
        s.end(true);
    }
}

async fn refuse(w: &mut MsgWriter, code: u16, text: impl Into<String>) -> TransportError {
    let text = text.into();
    let body = Reason {
        id: 0,
        code,
        text: text.clone(),
    }
    .encode();
    // Best effort: the peer may be gone already.
    let _ = w.send(Kind::Refuse, &body).await;
    let _ = w.stream().shutdown(std::net::Shutdown::Both).await;
    TransportError::Auth(text)
}

async fn handle_conn(
    shared: Arc<Shared>,
    stream: LocalTcpStream,
    peer: SocketAddr,
) -> Result<(), TransportError> {
    let _ = stream.set_nodelay(true);
    let (mut r, mut w) = conn::split(stream, peer.to_string(), 0);
    let peer = peer.to_string();
    let Some((kind, body)) = r.recv(Some(FIRST_MESSAGE)).await? else {
        return Ok(());
    };
    match kind {
        Kind::Hello => {
            let hello = Hello::decode(body).map_err(|e| wire_err(&peer, e))?;
            control(shared, r, w, hello).await
        }
        Kind::Join => {
            let join = Join::decode(body).map_err(|e| wire_err(&peer, e))?;
            accept_join(shared, r, w, join).await
        }
        other => {
            let e = wire_err(
                &peer,
                WireError::Unexpected {
                    expected: "HELLO or JOIN",
                    found: other,
                },
            );
            refuse(&mut w, code::PROTOCOL, e.to_string()).await;
            Err(e)
        }
    }
}

async fn control(
    shared: Arc<Shared>,
    mut r: MsgReader,
    mut w: MsgWriter,
    hello: Hello,
) -> Result<(), TransportError> {
    let peer = r.peer.clone();
    // A sender that vanishes without a FIN or RST frees its control
    // connection (and starts its grace period) instead of holding it.
    let _ = w.stream().set_dead_peer_timeout(CONTROL_DEAD_PEER);
    let cfg = &shared.cfg;
    let lo = hello.version_min.max(wire::VERSION_MIN);
    let hi = hello.version_max.min(wire::VERSION_MAX);
    if lo > hi {
        return Err(refuse(
            &mut w,
            code::VERSION,
            format!(
                "no common protocol version: the sender speaks {}..={}, this receiver {}..={}",
                hello.version_min,
                hello.version_max,
                wire::VERSION_MIN,
                wire::VERSION_MAX
            ),
        )
        .await);
    }
    match (cfg.key.is_some(), hello.keyed) {
        (true, false) => {
            return Err(refuse(
                &mut w,
                code::AUTH,
                "this receiver requires a key (--key); the sender has none",
            )
            .await);
        }
        (false, true) => {
            return Err(refuse(
                &mut w,
                code::AUTH,
                "this receiver runs without authentication (--insecure-no-auth); the sender has a key",
            )
            .await);
        }
        _ => {}
    }
    let resumed = hello.resume != [0; 16];
    let existing = resumed
        .then(|| lock(&shared.sessions).get(&hello.resume).cloned())
        .flatten();
    if resumed && existing.is_none() {
        return Err(refuse(
            &mut w,
            code::SESSION,
            "unknown or expired session; start a new one",
        )
        .await);
    }
    if !resumed && lock(&shared.sessions).len() >= cfg.max_sessions {
        return Err(refuse(&mut w, code::LIMIT, "too many sessions").await);
    }
    let nonce: [u8; 32] = auth::random().map_err(|e| TransportError::io("random nonce", e))?;
    let id: [u8; 16] = if resumed {
        hello.resume
    } else {
        auth::random().map_err(|e| TransportError::io("random session id", e))?
    };
    let mut ch = Challenge {
        version: hi,
        caps: hello.caps & caps::ALL,
        nonce,
        session: id,
        resumed,
        proof: [0; 32],
    };
    let psk = auth::psk(cfg.key.as_ref());
    let transcript = auth::transcript(&hello.encode(), &ch.encode_unproven());
    ch.proof = *auth::proof(&psk, b"server", &transcript).as_bytes();
    w.send(Kind::Challenge, &ch.encode()).await?;
    let proof = match r.recv(Some(FIRST_MESSAGE)).await? {
        Some((Kind::Proof, body)) if body.len() == 32 => {
            let mut p = [0u8; 32];
            p.copy_from_slice(body);
            p
        }
        Some((Kind::Refuse, body)) => return Err(refused(body, &peer)),
        Some((k, _)) => {
            let e = wire_err(
                &peer,
                WireError::Unexpected {
                    expected: "PROOF",
                    found: k,
                },
            );
            return Err(refuse(&mut w, code::PROTOCOL, e.to_string()).await);
        }
        None => {
            return Err(TransportError::Auth(
                "the sender left during the handshake".into(),
            ));
        }
    };
    if !auth::check_proof(auth::proof(&psk, b"client", &transcript), &proof) {
        return Err(refuse(
            &mut w,
            code::AUTH,
            "wrong key: the sender's proof does not match",
        )
        .await);
    }
    let session_key = auth::session_key(&psk, &transcript);
    let session = match existing {
        Some(s) => {
            *lock(&s.key) = session_key;
            crate::session::Metrics::add(&shared.metrics.resumes, 1);
            s
        }
        None => {
            let s = Arc::new(RecvSession {
                id,
                key: Mutex::new(session_key),
                state: Mutex::new(RState::default()),
                control: Mailbox::new(),
            });
            lock(&shared.sessions).insert(id, s.clone());
            s
        }
    };
    let epoch = {
        let mut st = lock(&session.state);
        st.epoch += 1;
        st.control_up = true;
        st.detached_since = None;
        st.epoch
    };
    let ck = auth::conn_key(&session_key, u16::MAX, &hello.nonce, &nonce);
    r.set_tagger(Tagger::new(ck, Direction::ToClient));
    w.set_tagger(Tagger::new(ck, Direction::ToClient));
    let welcome = Welcome {
        window: cfg.window,
        max_chunk: cfg.max_chunk,
        grace_ms: cfg.grace.as_millis().min(u128::from(u32::MAX)) as u32,
        max_streams: cfg.max_streams,
        reorder_units: reorder_units(cfg.reorder_bytes),
    };
    w.send(Kind::Welcome, &welcome.encode()).await?;
    // Regions that finished while the control stream was away are
    // reported again by their CLOSE, which the sender repeats on resume.
    let writer_session = session.clone();
    let writer = spawn_local(async move {
        while let Some(m) = writer_session.control.recv().await {
            match m {
                ControlMsg::Stop(e) if e == epoch => break,
                ControlMsg::Stop(_) => {}
                ControlMsg::Send(kind, body) => {
                    if w.send(kind, &body).await.is_err() || kind == Kind::Bye {
                        break;
                    }
                }
            }
        }
    })?;
    let result = control_loop(&shared, &session, &mut r).await;
    let bye = matches!(result, Ok(true));
    {
        let mut st = lock(&session.state);
        if st.epoch == epoch {
            st.control_up = false;
            if !bye {
                st.detached_since = Some(Instant::now());
            }
        }
    }
    if bye {
        // The writer sends our BYE and stops.
        let _ = writer.await;
        // Regions the sender left unfinished are discarded.
        session.end(true);
        lock(&shared.sessions).remove(&session.id);
    } else {
        session.control.push(ControlMsg::Stop(epoch));
        let _ = writer.await;
    }
    result.map(|_| ())
}

/// Serves the control stream; `Ok(true)` after a clean `BYE`.
async fn control_loop(
    shared: &Arc<Shared>,
    session: &Arc<RecvSession>,
    r: &mut MsgReader,
) -> Result<bool, TransportError> {
    let peer = r.peer.clone();
    loop {
        let Some((kind, body)) = r.recv(None).await? else {
            return Ok(false);
        };
        match kind {
            Kind::Open => {
                let open = Open::decode(body).map_err(|e| wire_err(&peer, e))?;
                open_region(shared, session, open);
            }
            Kind::Close => {
                let close = Close::decode(body).map_err(|e| wire_err(&peer, e))?;
                let mut st = lock(&session.state);
                let Some(reg) = st.regions.get_mut(&close.region) else {
                    drop(st);
                    session.control.push(ControlMsg::Send(
                        Kind::Done,
                        Reason {
                            id: close.region,
                            code: code::REGION,
                            text: "CLOSE of a region that was never opened".into(),
                        }
                        .encode(),
                    ));
                    continue;
                };
                if let Some(done) = &reg.done {
                    // A repeat after a resume: say it again.
                    let body = done.encode();
                    drop(st);
                    session.control.push(ControlMsg::Send(Kind::Done, body));
                    continue;
                }
                if reg.close.is_none() {
                    reg.close = Some(close);
                }
                drop(st);
                maybe_finish(&shared.events, session, close.region);
            }
            Kind::Bye => {
                session
                    .control
                    .push(ControlMsg::Send(Kind::Bye, Vec::new()));
                return Ok(true);
            }
            Kind::Error => {
                return Err(refused(body, &peer));
            }
            other => {
                return Err(wire_err(
                    &peer,
                    WireError::Unexpected {
                        expected: "OPEN, CLOSE, BYE or ERROR on the control stream",
                        found: other,
                    },
                ));
            }
        }
    }
}

fn open_region(shared: &Shared, session: &RecvSession, open: Open) {
    let fail = |text: String| {
        session.control.push(ControlMsg::Send(
            Kind::Done,
            Reason {
                id: open.region,
                code: code::REGION,
                text,
            }
            .encode(),
        ));
    };
    let ordered = open.addressing == Addressing::Ordered;
    if ordered && reorder_units(shared.cfg.reorder_bytes) == 0 {
        fail("this receiver takes no ordered regions (its reorder window is 0)".into());
        return;
    }
    if lock(&session.state).regions.contains_key(&open.region) {
        // A repeat after a resume.
        return;
    }
    let len = (!ordered).then_some(open.len);
    let info = RegionInfo {
        region: open.region,
        len,
        meta: open.meta,
    };
    match shared.sink.open(&info) {
        Ok(writer) => {
            lock(&session.state).regions.insert(
                open.region,
                RRegion {
                    len,
                    ordered: ordered.then(Default::default),
                    writer,
                    placed: 0,
                    placed_bytes: 0,
                    close: None,
                    finishing: false,
                    done: None,
                },
            );
            // An empty region may be closed before any chunk.
        }
        Err(text) => fail(text),
    }
}

/// Finishes `region` if it is closed and every chunk is placed: the digest
/// check (which reads the whole region) runs on its own thread, off the
/// engine's cores, and its result goes back as `DONE`.
fn maybe_finish(events: &Arc<Events>, session: &Arc<RecvSession>, region: u32) {
    let (writer, close, len, ordered) = {
        let mut st = lock(&session.state);
        let Some(reg) = st.regions.get_mut(&region) else {
            return;
        };
        let Some(close) = reg.close else { return };
        if reg.finishing || reg.placed < close.chunks {
            return;
        }
        reg.finishing = true;
        (reg.writer.clone(), close, reg.len, reg.ordered.clone())
    };
    let for_thread = session.clone();
    let events = events.clone();
    let run = move || {
        let session = for_thread;
        // Every chunk is placed, so every chunk of an ordered region is
        // delivered: what it wrote is its length.
        let len = len.or_else(|| ordered.map(|o| lock(&o).delivered));
        let result = match len {
            Some(len) if len == close.len => writer.finish(len, &close.digest),
            Some(len) => Err(format!(
                "CLOSE says {} bytes, the region has {len}",
                close.len
            )),
            None => Err("region has no length".into()),
        };
        let reason = match result {
            Ok(()) => Reason {
                id: region,
                code: code::OK,
                text: String::new(),
            },
            Err(text) => {
                writer.abort();
                Reason {
                    id: region,
                    code: code::REGION,
                    text,
                }
            }
        };
        let body = reason.encode();
        let error = (reason.code != code::OK).then(|| reason.text.clone());
        if let Some(r) = lock(&session.state).regions.get_mut(&region) {
            r.done = Some(reason);
        }
        session.control.push(ControlMsg::Send(Kind::Done, body));
        events.emit([Event::RegionDone {
            session: session.id,
            region,
            error,
        }]);
    };
    if std::thread::Builder::new()
        .name("dwcp-finish".into())
        .spawn(run)
        .is_err()
    {
        // No thread: report it rather than hang the sender.
        session.control.push(ControlMsg::Send(
            Kind::Done,
            Reason {
                id: region,
                code: code::REGION,
                text: "the receiver could not start a thread to finish the region".into(),
            }
            .encode(),
        ));
    }
}

async fn accept_join(
    shared: Arc<Shared>,
    r: MsgReader,
    mut w: MsgWriter,
    join: Join,
) -> Result<(), TransportError> {
    let Some(session) = lock(&shared.sessions).get(&join.session).cloned() else {
        return Err(refuse(&mut w, code::SESSION, "unknown or expired session").await);
    };
    if join.stream >= shared.cfg.max_streams {
        return Err(refuse(
            &mut w,
            code::LIMIT,
            format!(
                "stream {} beyond this receiver's limit of {}",
                join.stream, shared.cfg.max_streams
            ),
        )
        .await);
    }
    let key = *lock(&session.key);
    let want = auth::join_proof(&key, b"join", &join.session, join.stream, &join.nonce, None);
    if !auth::check_proof(want, &join.proof) {
        return Err(refuse(&mut w, code::AUTH, "JOIN proof does not match the session").await);
    }
    let nonce: [u8; 32] = auth::random().map_err(|e| TransportError::io("random nonce", e))?;
    let proof = auth::join_proof(
        &key,
        b"join-ok",
        &join.session,
        join.stream,
        &join.nonce,
        Some(&nonce),
    );
    w.send(
        Kind::JoinOk,
        &JoinOk {
            nonce,
            proof: *proof.as_bytes(),
        }
        .encode(),
    )
    .await?;
    let ck = auth::conn_key(&key, join.stream, &join.nonce, &nonce);
    let peer = r.peer.clone();
    let Some(stream) = conn::unsplit(r, w) else {
        return Err(TransportError::Config("connection still shared".into()));
    };
    let std_stream = stream.into_std();
    let core = usize::from(join.stream) % shared.workers.max(1);
    let s = shared.clone();
    let h = spawn_on(core, move || async move {
        let stream = LocalTcpStream::from_std(std_stream)
            .map_err(|e| TransportError::io("moving a stream to its core", e))?;
        data_stream(s, session, stream, peer, join.stream, key, ck).await
    })
    .await?;
    h.await.map_err(TransportError::from).and_then(|r| r)
}

async fn data_stream(
    shared: Arc<Shared>,
    session: Arc<RecvSession>,
    stream: LocalTcpStream,
    peer: String,
    stream_id: u16,
    session_key: [u8; 32],
    conn_key: [u8; 32],
) -> Result<(), TransportError> {
    let max_chunk = shared.cfg.max_chunk as usize;
    let max_frame = max_chunk_frame_len(max_chunk);
    let (mut r, w) = conn::split(stream, peer, max_frame);
    r.set_tagger(Tagger::new(conn_key, Direction::ToClient));
    let mut w = w;
    w.set_tagger(Tagger::new(conn_key, Direction::ToClient));
    crate::session::Metrics::add(&shared.metrics.stream_connects, 1);
    let codec = CodecConfig {
        key: Some(SessionKey(session_key)),
        ..CodecConfig::default()
    };
    let mut dec = Decoder::with_limits(
        &codec,
        DecodeLimits {
            max_frame_len: max_frame as u64,
            max_raw_len: max_chunk as u64,
            ..DecodeLimits::default()
        },
    );
    let peer = r.peer.clone();
    let result = async {
        loop {
            let Some((kind, body)) = r.recv(Some(shared.cfg.idle_timeout)).await? else {
                return Ok(());
            };
            if kind != Kind::Data {
                return Err(wire_err(
                    &peer,
                    WireError::Unexpected {
                        expected: "DATA",
                        found: kind,
                    },
                ));
            }
            let wire_len = (wire::HEADER_LEN + body.len() + wire::TAG_LEN) as u64;
            crate::session::Metrics::add(&shared.metrics.wire_bytes, wire_len);
            let (h, frame) = DataHeader::decode(body).map_err(|e| wire_err(&peer, e))?;
            // The region's OPEN travels on the control stream and may be a
            // moment behind its first chunks.
            let open_by = Instant::now() + OPEN_WAIT;
            while !lock(&session.state).regions.contains_key(&h.region) && Instant::now() < open_by
            {
                let _ = dwcp_engine::sleep(Duration::from_millis(1)).await;
            }
            let chunk = place(&shared, &session, &mut dec, stream_id, &h, frame, &peer)?;
            w.send(Kind::Ack, &wire::encode_ack(&[chunk])).await?;
        }
    }
    .await;
    if let Err(e) = &result {
        let body = Reason {
            id: 0,
            code: code::PROTOCOL,
            text: e.to_string(),
        }
        .encode();
        let _ = w.send(Kind::Error, &body).await;
        let _ = w.stream().shutdown(std::net::Shutdown::Both).await;
    }
    result
}

/// Checks, decodes and places one chunk; returns its id to acknowledge.
fn place(
    shared: &Shared,
    session: &Arc<RecvSession>,
    dec: &mut Decoder,
    stream_id: u16,
    h: &DataHeader,
    frame: &[u8],
    peer: &str,
) -> Result<u64, TransportError> {
    let bad = |text: String| TransportError::Protocol {
        peer: peer.to_string(),
        text,
    };
    if h.stream != stream_id {
        return Err(bad(format!(
            "DATA names stream {} on stream {stream_id}",
            h.stream
        )));
    }
    let (writer, len, ordered, already) = {
        let st = lock(&session.state);
        let Some(reg) = st.regions.get(&h.region) else {
            return Err(bad(format!(
                "DATA for region {} which was never opened",
                h.region
            )));
        };
        (
            reg.writer.clone(),
            reg.len,
            reg.ordered.clone(),
            st.placed.contains(&h.chunk),
        )
    };
    if already {
        return Ok(h.chunk);
    }
    if ordered.is_some() != (h.addressing == Addressing::Ordered) {
        return Err(bad(format!(
            "DATA addressed {:?} for region {}, which was opened otherwise",
            h.addressing, h.region
        )));
    }
    // A region chunk's checksum covers its bytes as the BLAKE3 subtree at
    // its offset, which the sink's digest then takes as it is.
    let at = (h.addressing == Addressing::Region).then_some(h.offset);
    let (seq, bytes, digest) =
        dec.decode_chunk_at(frame, at)
            .map_err(|e| TransportError::Frame {
                peer: peer.to_string(),
                source: e,
            })?;
    if seq != h.chunk || bytes.len() != h.raw_len as usize {
        return Err(bad(format!(
            "chunk frame says chunk {seq} of {} bytes, DATA says chunk {} of {}",
            bytes.len(),
            h.chunk,
            h.raw_len
        )));
    }
    let region_err = |text: String| TransportError::Region {
        region: h.region,
        text,
    };
    let newly = match (len, ordered) {
        (_, Some(ordered)) => deliver_ordered(shared, session, &ordered, &*writer, h, bytes)
            .map_err(|e| match e {
                Misplaced::Peer(t) => bad(t),
                Misplaced::Sink(t) => region_err(t),
            })?,
        (Some(len), None) => {
            if h.offset
                .checked_add(bytes.len() as u64)
                .is_none_or(|end| end > len)
            {
                return Err(bad(format!(
                    "chunk at {} of {} bytes lies outside region {} of {len} bytes",
                    h.offset,
                    bytes.len(),
                    h.region
                )));
            }
            writer
                .write_digested(h.offset, bytes, &digest)
                .map_err(region_err)?;
            mark_placed(session, h)
        }
        (None, None) => return Err(region_err("region has no length".into())),
    };
    if newly {
        crate::session::Metrics::add(&shared.metrics.bytes_in, bytes.len() as u64);
        if shared.events.wanted() {
            let event = lock(&session.state)
                .regions
                .get(&h.region)
                .map(|r| Event::Progress {
                    session: session.id,
                    region: h.region,
                    done: r.placed_bytes,
                    len: r.len,
                });
            shared.events.emit(event);
        }
        maybe_finish(&shared.events, session, h.region);
    }
    Ok(h.chunk)
}

/// Records chunk `h` as placed; false when it already was.
fn mark_placed(session: &RecvSession, h: &DataHeader) -> bool {
    let mut st = lock(&session.state);
    let newly = st.placed.insert(h.chunk);
    if newly && let Some(reg) = st.regions.get_mut(&h.region) {
        reg.placed += 1;
        reg.placed_bytes += u64::from(h.raw_len);
    }
    newly
}

/// Why an ordered chunk could not be placed.
enum Misplaced {
    /// The peer broke the protocol (a repeated sequence number, a chunk
    /// beyond the reorder window).
    Peer(String),
    /// The sink refused a write.
    Sink(String),
}

/// Places chunk `h.offset` (its sequence number) of an ordered region:
/// written at once when it is the next one, followed by any held chunks it
/// unblocks; otherwise copied and held, within the session's reorder
/// window. Delivery is serialised per region by its `Reorder` lock, so the
/// writer sees one write at a time, in order; the chunk counts as placed
/// under that lock too, so a copy of it racing in on another stream (a
/// retransmission) is recognised. Returns whether it was new.
fn deliver_ordered(
    shared: &Shared,
    session: &RecvSession,
    ordered: &Mutex<Reorder>,
    writer: &dyn RegionWriter,
    h: &DataHeader,
    bytes: &[u8],
) -> Result<bool, Misplaced> {
    let seq = h.offset;
    let mut o = lock(ordered);
    if lock(&session.state).placed.contains(&h.chunk) {
        return Ok(false);
    }
    if seq < o.next || o.held.contains_key(&seq) {
        return Err(Misplaced::Peer(format!(
            "sequence {seq} of region {} arrived twice under different chunk ids",
            h.region
        )));
    }
    if seq > o.next {
        let n = bytes.len() as u64;
        let limit = u64::from(reorder_units(shared.cfg.reorder_bytes)) * wire::REORDER_UNIT;
        {
            let mut st = lock(&session.state);
            if st.reorder_held.saturating_add(n) > limit {
                return Err(Misplaced::Peer(format!(
                    "sequence {seq} of region {} (next due: {}) overruns the reorder window \
                     of {limit} bytes",
                    h.region, o.next
                )));
            }
            st.reorder_held += n;
        }
        o.held.insert(seq, bytes.to_vec());
        return Ok(mark_placed(session, h));
    }
    let write = |o: &mut Reorder, data: &[u8]| -> Result<(), Misplaced> {
        let at = o.delivered;
        o.delivered = at
            .checked_add(data.len() as u64)
            .ok_or_else(|| Misplaced::Peer("ordered region longer than 2^64 bytes".into()))?;
        o.next += 1;
        writer.write_at(at, data).map_err(Misplaced::Sink)
    };
    write(&mut o, bytes)?;
    loop {
        let next = o.next;
        let Some(data) = o.held.remove(&next) else {
            break;
        };
        {
            let mut st = lock(&session.state);
            st.reorder_held = st.reorder_held.saturating_sub(data.len() as u64);
        }
        write(&mut o, &data)?;
    }
    Ok(mark_placed(session, h))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::MemorySink;

    fn fixture(reorder_bytes: u64) -> (Arc<Shared>, Arc<RecvSession>, MemorySink) {
        let sink = MemorySink::new(1 << 30);
        let shared = Arc::new(Shared {
            cfg: ReceiverConfig {
                reorder_bytes,
                ..ReceiverConfig::default()
            },
            sink: sink.handle(),
            sessions: Mutex::new(HashMap::new()),
            metrics: Metrics::default(),
            events: Arc::default(),
            stopping: AtomicBool::new(false),
            workers: 1,
        });
        let session = Arc::new(RecvSession {
            id: [7; 16],
            key: Mutex::new([0; 32]),
            state: Mutex::new(RState::default()),
            control: Mailbox::new(),
        });
        open_region(
            &shared,
            &session,
            Open {
                region: 1,
                addressing: Addressing::Ordered,
                len: u64::MAX,
                meta: Vec::new(),
            },
        );
        (shared, session, sink)
    }

    fn deliver(
        shared: &Shared,
        session: &RecvSession,
        chunk: u64,
        seq: u64,
        bytes: &[u8],
    ) -> Result<bool, String> {
        let (ordered, writer) = {
            let st = lock(&session.state);
            let r = &st.regions[&1];
            (r.ordered.clone().unwrap(), r.writer.clone())
        };
        let h = DataHeader {
            stream: 0,
            addressing: Addressing::Ordered,
            chunk,
            region: 1,
            raw_len: bytes.len() as u32,
            offset: seq,
        };
        deliver_ordered(shared, session, &ordered, &*writer, &h, bytes).map_err(|e| match e {
            Misplaced::Peer(t) => format!("peer: {t}"),
            Misplaced::Sink(t) => format!("sink: {t}"),
        })
    }

    #[test]
    fn ordered_chunks_are_written_in_sequence_whatever_their_arrival() {
        let (shared, session, _sink) = fixture(1 << 20);
        assert!(deliver(&shared, &session, 12, 2, b"cc").unwrap());
        assert!(deliver(&shared, &session, 11, 1, b"b").unwrap());
        assert_eq!(lock(&session.state).reorder_held, 3, "held until 0 comes");
        // A retransmitted copy of a held chunk is not new.
        assert!(!deliver(&shared, &session, 12, 2, b"cc").unwrap());
        assert!(deliver(&shared, &session, 10, 0, b"aaa").unwrap());
        let st = lock(&session.state);
        assert_eq!(st.reorder_held, 0);
        let o = lock(st.regions[&1].ordered.as_ref().unwrap());
        assert_eq!((o.next, o.delivered), (3, 6));
    }

    #[test]
    fn a_peer_cannot_overrun_the_reorder_window_or_reuse_a_sequence() {
        let (shared, session, _sink) = fixture(wire::REORDER_UNIT);
        let piece = vec![1u8; 40 * 1024];
        deliver(&shared, &session, 1, 1, &piece).unwrap();
        let e = deliver(&shared, &session, 2, 2, &piece).unwrap_err();
        assert!(e.contains("overruns the reorder window"), "{e}");
        deliver(&shared, &session, 0, 0, b"x").unwrap();
        let e = deliver(&shared, &session, 9, 1, b"again").unwrap_err();
        assert!(e.contains("arrived twice"), "{e}");
        assert_eq!(lock(&session.state).reorder_held, 0, "memory given back");
    }
}
