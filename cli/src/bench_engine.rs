//! `dwcp bench engine`: the io_uring engine on loopback (127.0.0.1), next to
//! plain `std::net` sockets and `iperf3` on the same machine.
//!
//! Two kinds of measurement:
//!
//! - bulk: one-way TCP throughput over 1 and N connections. For connection
//!   `i` the receiver runs on worker `i % workers` and the sender on worker
//!   `(i + 1) % workers`, so with two or more workers a single connection
//!   crosses cores. The sender loops `send_zc` (or `send_all`) of one pool
//!   buffer until a shared deadline, then shuts its side down; the receiver
//!   counts bytes with a multishot receive (or plain receives into a pool
//!   buffer) until end of stream.
//! - echo: small request/response round trips, one message in flight per
//!   connection, `TCP_NODELAY` on both ends, on an engine whose idle
//!   workers spin before they sleep.
//!
//! Every measurement runs `repeat` times, round-robin over all of them, so
//! that a noisy machine slows every row alike; medians are reported.

use std::io;
use std::net::{Ipv4Addr, Shutdown, TcpListener, TcpStream};
use std::rc::Rc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use dwcp_engine::{
    Engine, Features, LocalBufPool, LocalTcpStream, PoolBuf, RemoteHandle, ZeroCopy, spawn_local,
};
use serde_json::{Value, json};

use crate::netref::{self, BulkResult, EchoResult};
use crate::units::{format_duration, format_size};

/// Extra time, on top of the measured duration, that any engine task may
/// take before the run is treated as hung.
const GRACE: Duration = Duration::from_secs(10);

/// Length of the untimed transfer that precedes each engine bulk run.
const BULK_WARMUP: Duration = Duration::from_millis(300);

/// Untimed round trips (over all connections) that precede each engine echo
/// run.
const ECHO_WARMUP_ROUND_TRIPS: usize = 1000;

/// How long the engines may take to let their tasks finish at the end.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// What to measure.
#[derive(Debug, Clone)]
pub struct Options {
    /// Connections of the second set of bulk rows (the first uses 1).
    pub connections: usize,
    /// Engine workers; `None`: one per CPU.
    pub workers: Option<usize>,
    /// Timed length of each bulk and echo run.
    pub duration: Duration,
    /// Bytes per send (and size of the engine's pool buffers).
    pub write_size: usize,
    /// Send with `send_zc` (else `send_all`).
    pub zero_copy: bool,
    /// Receive with a multishot receive where the kernel has it (else
    /// plain receives into a pool buffer).
    pub multishot: bool,
    /// Sends in flight per bulk connection (each with its own buffer).
    pub in_flight: usize,
    /// Size of each provided receive buffer of the bulk engine (multishot
    /// receive).
    pub recv_buffer_size: u32,
    /// Runs of each measurement; medians are reported.
    pub repeat: usize,
    /// Connections of the echo rows.
    pub echo_connections: usize,
    /// Bytes per echo message.
    pub echo_size: usize,
    /// How long an idle worker of the echo engine polls before sleeping.
    pub spin: Duration,
}

/// A bulk row: median throughput of `runs` runs.
#[derive(Debug, Clone, PartialEq)]
pub struct BulkRow {
    /// `engine`, `std` or `iperf3`.
    pub name: &'static str,
    /// Parallel connections.
    pub connections: usize,
    /// Median Gbit/s.
    pub gbps: f64,
    /// Slowest run, Gbit/s.
    pub min_gbps: f64,
    /// Fastest run, Gbit/s.
    pub max_gbps: f64,
    /// Runs measured.
    pub runs: usize,
}

impl BulkRow {
    fn new(name: &'static str, connections: usize, runs: &[BulkResult]) -> Self {
        let g: Vec<f64> = runs.iter().map(BulkResult::gbps).collect();
        Self {
            name,
            connections,
            gbps: median(&g),
            min_gbps: g.iter().copied().fold(f64::INFINITY, f64::min),
            max_gbps: g.iter().copied().fold(f64::NEG_INFINITY, f64::max),
            runs: g.len(),
        }
    }

    /// The row as one JSON object.
    pub fn to_json(&self) -> Value {
        json!({
            "name": self.name,
            "connections": self.connections,
            "gbps": self.gbps,
            "runs": self.runs,
            "min_gbps": self.min_gbps,
            "max_gbps": self.max_gbps,
        })
    }
}

/// An echo row: medians over `runs` runs of each figure.
#[derive(Debug, Clone, PartialEq)]
pub struct EchoRow {
    /// `echo` or `std-echo`.
    pub name: &'static str,
    /// Parallel connections, one message in flight on each.
    pub connections: usize,
    /// Median of the runs' median round trips, microseconds.
    pub p50_us: f64,
    /// Median of the runs' 99th-percentile round trips, microseconds.
    pub p99_us: f64,
    /// Median of the runs' round trips per second.
    pub msgs_per_s: f64,
    /// Runs measured.
    pub runs: usize,
}

impl EchoRow {
    fn new(name: &'static str, connections: usize, runs: &[EchoResult]) -> Self {
        let pick = |f: fn(&EchoResult) -> f64| median(&runs.iter().map(f).collect::<Vec<_>>());
        Self {
            name,
            connections,
            p50_us: pick(|r| r.p50_us),
            p99_us: pick(|r| r.p99_us),
            msgs_per_s: pick(|r| r.msgs_per_s),
            runs: runs.len(),
        }
    }

    /// The row as one JSON object.
    pub fn to_json(&self) -> Value {
        json!({
            "name": self.name,
            "connections": self.connections,
            "p50_us": self.p50_us,
            "p99_us": self.p99_us,
            "msgs_per_s": self.msgs_per_s,
            "runs": self.runs,
        })
    }
}

/// Everything one `dwcp bench engine` run measured.
#[derive(Debug, Clone)]
pub struct Report {
    /// Bulk rows in print order: engine, std, iperf3 for 1, then for N.
    pub bulk: Vec<BulkRow>,
    /// `echo`, then `std-echo`.
    pub echo: Vec<EchoRow>,
    /// Whether `iperf3` was found (no iperf3 rows otherwise).
    pub iperf3_installed: bool,
    /// What the bulk engine's kernel offered.
    pub features: Features,
    /// What `send_zc` learnt on the last bulk engine run's first socket.
    pub zero_copy: ZeroCopy,
    /// Workers of each engine.
    pub workers: usize,
    /// The options the run used.
    pub options: Options,
}

impl Report {
    /// The bulk row `name` with `connections`.
    pub fn bulk_row(&self, name: &str, connections: usize) -> Option<&BulkRow> {
        self.bulk
            .iter()
            .find(|r| r.name == name && r.connections == connections)
    }

    /// The echo row `name`.
    pub fn echo_row(&self, name: &str) -> Option<&EchoRow> {
        self.echo.iter().find(|r| r.name == name)
    }

    fn ratio(&self, a: (&str, usize), b: (&str, usize)) -> Option<f64> {
        Some(self.bulk_row(a.0, a.1)?.gbps / self.bulk_row(b.0, b.1)?.gbps)
    }

    /// The ratios the engine's floors are about, as `(key, value)`; `None`
    /// where a row is missing (iperf3 not installed).
    pub fn ratios(&self) -> Vec<(&'static str, Option<f64>)> {
        let n = self.options.connections;
        let echo = self.echo_row("echo");
        let std_echo = self.echo_row("std-echo");
        let echo_ratio = |f: fn(&EchoRow) -> f64| Some(f(echo?) / f(std_echo?));
        vec![
            ("engine_1_vs_std_1", self.ratio(("engine", 1), ("std", 1))),
            (
                "engine_n_vs_iperf3_n",
                self.ratio(("engine", n), ("iperf3", n)),
            ),
            ("engine_n_vs_std_n", self.ratio(("engine", n), ("std", n))),
            (
                "engine_1_vs_iperf3_1",
                self.ratio(("engine", 1), ("iperf3", 1)),
            ),
            ("echo_p99_vs_std_echo_p99", echo_ratio(|r| r.p99_us)),
            ("echo_p50_vs_std_echo_p50", echo_ratio(|r| r.p50_us)),
            ("echo_msgs_vs_std_echo_msgs", echo_ratio(|r| r.msgs_per_s)),
        ]
    }

    /// The last JSON line: the ratios and how they were measured.
    pub fn summary_json(&self) -> Value {
        let mut v = json!({
            "name": "summary",
            "connections": self.options.connections,
            "workers": self.workers,
            "repeat": self.options.repeat,
            "duration_s": self.options.duration.as_secs_f64(),
            "write_size": self.options.write_size,
            "send_zc": self.options.zero_copy && self.features.send_zc,
            "send_zc_kernel_copied": self.options.zero_copy && self.zero_copy == ZeroCopy::Copies,
            "recv_multishot": self.options.multishot && self.features.recv_multishot,
            "registered_buffers": self.features.registered_buffers,
            "in_flight": self.options.in_flight,
            "recv_buffer_size": self.options.recv_buffer_size,
            "echo_size": self.options.echo_size,
            "spin_us": self.options.spin.as_secs_f64() * 1e6,
            "iperf3_installed": self.iperf3_installed,
        });
        for (k, r) in self.ratios() {
            v[k] = json!(r);
        }
        v
    }

    /// One JSON object per line: the bulk rows, the echo rows, the summary.
    /// A missing `iperf3` is said on stderr (stdout stays pure JSON).
    pub fn print_json(&self) {
        if !self.iperf3_installed {
            eprintln!("dwcp: iperf3 is not installed: no iperf3 rows");
        }
        for r in &self.bulk {
            println!("{}", r.to_json());
        }
        for r in &self.echo {
            println!("{}", r.to_json());
        }
        println!("{}", self.summary_json());
    }

    /// The human-readable table.
    pub fn print_table(&self) {
        let o = &self.options;
        if !self.iperf3_installed {
            println!("iperf3 is not installed: no iperf3 rows (install iperf3 for them)\n");
        }
        println!(
            "{:<9} {:>5} {:>9} {:>9} {:>9}",
            "bulk", "conns", "Gbit/s", "min", "max"
        );
        for r in &self.bulk {
            println!(
                "{:<9} {:>5} {:>9.2} {:>9.2} {:>9.2}",
                r.name, r.connections, r.gbps, r.min_gbps, r.max_gbps
            );
        }
        println!();
        println!(
            "{:<9} {:>5} {:>9} {:>9} {:>11}",
            "echo", "conns", "p50 us", "p99 us", "msgs/s"
        );
        for r in &self.echo {
            println!(
                "{:<9} {:>5} {:>9.1} {:>9.1} {:>11.0}",
                r.name, r.connections, r.p50_us, r.p99_us, r.msgs_per_s
            );
        }
        println!();
        let n = o.connections;
        let ratios = self.ratios();
        let get = |k: &str| {
            ratios
                .iter()
                .find(|(key, _)| *key == k)
                .and_then(|(_, v)| *v)
        };
        let lines = [
            (
                "engine-1 / std-1".to_string(),
                get("engine_1_vs_std_1"),
                "throughput, higher is better",
            ),
            (
                format!("engine-{n} / iperf3-{n}"),
                get("engine_n_vs_iperf3_n"),
                if self.iperf3_installed {
                    "throughput, higher is better"
                } else {
                    "iperf3 is not installed"
                },
            ),
            (
                "echo p99 / std-echo p99".to_string(),
                get("echo_p99_vs_std_echo_p99"),
                "latency, lower is better",
            ),
            (
                "echo msgs/s / std-echo msgs/s".to_string(),
                get("echo_msgs_vs_std_echo_msgs"),
                "rate, higher is better",
            ),
        ];
        for (label, v, note) in lines {
            let v = v.map_or_else(|| "-".to_string(), |x| format!("{x:.2}"));
            println!("{label:<30} {v:>6}  ({note})");
        }
        println!();
        println!(
            "(loopback 127.0.0.1; medians of {} interleaved runs of {} each; engine: {} workers, {} of {}, {}{}; echo: {} B messages, spin {})",
            o.repeat,
            format_duration(o.duration),
            self.workers,
            match (o.zero_copy && self.features.send_zc, self.zero_copy) {
                (true, ZeroCopy::Copies) => "send_zc (the kernel copied: plain sends)",
                (true, _) => "send_zc",
                (false, _) => "send_all",
            },
            format_size(o.write_size as u64),
            if o.multishot && self.features.recv_multishot {
                "multishot recv"
            } else {
                "recv into a pool buffer"
            },
            if o.in_flight > 1 {
                format!(", {} sends in flight per connection", o.in_flight)
            } else {
                String::new()
            },
            o.echo_size,
            format_duration(o.spin),
        );
    }
}

/// Median of `v` (mean of the middle two for an even count); 0 when empty.
fn median(v: &[f64]) -> f64 {
    crate::bench_codec::median(v.to_vec())
}

/// A non-zero repeating byte pattern.
fn pattern_byte(i: usize) -> u8 {
    (i % 251) as u8 + 1
}

/// Connects `n` loopback client sockets to a fresh listener and accepts each
/// one, returning `(client, server)` pairs.
fn loopback_pairs(n: usize) -> Result<Vec<(TcpStream, TcpStream)>> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("binding 127.0.0.1:0")?;
    let addr = listener.local_addr().context("reading listener address")?;
    (0..n)
        .map(|i| {
            let client =
                TcpStream::connect(addr).with_context(|| format!("connecting {i} to {addr}"))?;
            let (server, _) = listener
                .accept()
                .with_context(|| format!("accepting connection {i}"))?;
            Ok((client, server))
        })
        .collect()
}

/// Waits for an engine task until `limit`, turning every way it can fail
/// into an error that says `what` failed.
fn join_until<T>(handle: RemoteHandle<Result<T>>, limit: Instant, what: &str) -> Result<T> {
    match handle.join_timeout(limit.saturating_duration_since(Instant::now())) {
        Ok(Ok(result)) => result.with_context(|| what.to_string()),
        Ok(Err(e)) => Err(anyhow!(e)).with_context(|| what.to_string()),
        Err(_) => bail!("{what} did not finish in time: the engine looks stuck"),
    }
}

/// Joins every handle (so none is left running unwatched), then reports the
/// first failure.
fn join_all<T>(
    handles: Vec<RemoteHandle<Result<T>>>,
    limit: Instant,
    what: &str,
) -> Result<Vec<T>> {
    let results: Vec<Result<T>> = handles
        .into_iter()
        .enumerate()
        .map(|(i, h)| join_until(h, limit, &format!("{what} {i}")))
        .collect();
    results.into_iter().collect()
}

/// The current worker's buffer pool.
fn pool() -> Result<LocalBufPool> {
    LocalBufPool::current().context("not running on an engine worker")
}

/// A pool buffer holding `len` bytes of the pattern (at most its capacity).
async fn pattern_buf(pool: &LocalBufPool, len: usize) -> PoolBuf {
    let mut buf = pool.get().await;
    let len = len.min(buf.capacity());
    for (i, b) in buf.as_full_mut()[..len].iter_mut().enumerate() {
        *b = pattern_byte(i);
    }
    buf.set_len(len);
    buf
}

/// Counts the bytes arriving on `stream` until end of stream; returns them
/// and when end of stream came.
async fn bulk_receive(stream: TcpStream, multishot: bool) -> Result<(u64, Instant)> {
    let stream = LocalTcpStream::from_std(stream).context("wrapping the receiver socket")?;
    let mut bytes = 0u64;
    if multishot {
        let mut chunks = stream
            .recv_multishot()
            .context("starting a multishot receive")?;
        while let Some(chunk) = chunks.next().await {
            bytes += chunk.context("multishot receive")?.len() as u64;
        }
    } else {
        let mut buf = pool()?.get().await;
        loop {
            let (r, b) = stream.recv(buf).await;
            buf = b;
            match r.context("receive")? {
                0 => break,
                n => bytes += n as u64,
            }
        }
    }
    Ok((bytes, Instant::now()))
}

/// Sends `buf` over and over until `deadline`.
async fn send_loop(
    stream: Rc<LocalTcpStream>,
    mut buf: PoolBuf,
    deadline: Instant,
    zero_copy: bool,
) -> Result<()> {
    while Instant::now() < deadline {
        let (r, b) = if zero_copy {
            stream.send_zc(buf).await
        } else {
            stream.send_all(buf).await
        };
        buf = b;
        r.context(if zero_copy { "send_zc" } else { "send_all" })?;
    }
    Ok(())
}

/// Sends the pattern on `stream` until `deadline` with `in_flight` sends in
/// flight, then shuts the sending side down.
async fn bulk_send(
    stream: TcpStream,
    deadline: Instant,
    write_size: usize,
    zero_copy: bool,
    in_flight: usize,
) -> Result<ZeroCopy> {
    let stream = Rc::new(LocalTcpStream::from_std(stream).context("wrapping the sender socket")?);
    let pool = pool()?;
    let mut extra = Vec::with_capacity(in_flight.saturating_sub(1));
    for _ in 1..in_flight {
        let buf = pattern_buf(&pool, write_size).await;
        extra.push(
            spawn_local(send_loop(stream.clone(), buf, deadline, zero_copy))
                .map_err(|e| anyhow!(e))
                .context("starting a second sender loop")?,
        );
    }
    let buf = pattern_buf(&pool, write_size).await;
    let first = send_loop(stream.clone(), buf, deadline, zero_copy).await;
    // Wait for every loop before shutting down: none may send after it.
    let mut others = Ok(());
    for h in extra {
        let r = h.await.map_err(|e| anyhow!(e)).and_then(|r| r);
        others = others.and(r);
    }
    first?;
    others?;
    stream
        .shutdown(Shutdown::Write)
        .await
        .context("shutting down the sending side")?;
    Ok(stream.zero_copy())
}

/// Settings of the bulk engine runs.
#[derive(Debug, Clone, Copy)]
struct BulkConfig {
    write_size: usize,
    zero_copy: bool,
    multishot: bool,
    in_flight: usize,
}

/// One bulk transfer of `duration` over `connections` fresh connections
/// through `engine`.
fn engine_bulk(
    engine: &Engine,
    connections: usize,
    duration: Duration,
    c: BulkConfig,
) -> Result<(BulkResult, ZeroCopy)> {
    let pairs = loopback_pairs(connections)?;
    let workers = engine.workers();
    let multishot = c.multishot && engine.features().recv_multishot;
    let mut receivers = Vec::with_capacity(connections);
    let mut outgoing = Vec::with_capacity(connections);
    for (i, (client, server)) in pairs.into_iter().enumerate() {
        let h = engine
            .spawn_on(i % workers, move || bulk_receive(server, multishot))
            .map_err(|e| anyhow!(e))
            .with_context(|| format!("starting bulk receiver {i}"))?;
        receivers.push(h);
        outgoing.push(client);
    }
    let start = Instant::now();
    let deadline = start + duration;
    let mut senders = Vec::with_capacity(connections);
    for (i, client) in outgoing.into_iter().enumerate() {
        let h = engine
            .spawn_on((i + 1) % workers, move || {
                bulk_send(client, deadline, c.write_size, c.zero_copy, c.in_flight)
            })
            .map_err(|e| anyhow!(e))
            .with_context(|| format!("starting bulk sender {i}"))?;
        senders.push(h);
    }
    let limit = deadline + GRACE;
    let sent = join_all(senders, limit, "engine bulk sender");
    let received = join_all(receivers, limit, "engine bulk receiver");
    let zero_copy = sent?.first().copied().unwrap_or(ZeroCopy::Untried);
    let mut bytes = 0;
    let mut last = start;
    for (b, end) in received? {
        bytes += b;
        last = last.max(end);
    }
    let result = BulkResult {
        connections,
        bytes,
        seconds: (last - start).as_secs_f64(),
    };
    Ok((result, zero_copy))
}

/// Sends `msg`, receives the reply into `reply` and checks it.
async fn round_trip(
    stream: &LocalTcpStream,
    msg: PoolBuf,
    reply: PoolBuf,
) -> Result<(PoolBuf, PoolBuf)> {
    let (r, msg) = stream.send_all(msg).await;
    r.context("echo client send")?;
    let (r, reply) = stream.recv_exact(reply).await;
    r.context("echo client receive")?;
    ensure!(
        reply[..] == msg[..],
        "the echo reply differs from the request"
    );
    Ok((msg, reply))
}

/// What one echo client measured.
struct EchoClient {
    samples: Vec<u64>,
    start: Instant,
    last: Instant,
}

/// Runs `warmup` untimed round trips, then timed ones until `duration` has
/// passed; shuts the sending side down at the end.
async fn echo_client(
    stream: TcpStream,
    size: usize,
    warmup: usize,
    duration: Duration,
) -> Result<EchoClient> {
    let stream = LocalTcpStream::from_std(stream).context("wrapping the echo client socket")?;
    stream.set_nodelay(true).context("setting TCP_NODELAY")?;
    let pool = pool()?;
    let mut msg = pattern_buf(&pool, size).await;
    let mut reply = pool.get().await;
    ensure!(
        msg.len() == size && reply.capacity() == size,
        "the echo engine's buffers are not {size} bytes"
    );
    for _ in 0..warmup {
        (msg, reply) = round_trip(&stream, msg, reply)
            .await
            .context("echo warm-up")?;
    }
    let mut samples = Vec::with_capacity(1 << 16);
    let start = Instant::now();
    let deadline = start + duration;
    let mut last = start;
    loop {
        let t0 = Instant::now();
        if t0 >= deadline {
            break;
        }
        (msg, reply) = round_trip(&stream, msg, reply).await?;
        last = Instant::now();
        samples.push(u64::try_from((last - t0).as_nanos()).unwrap_or(u64::MAX));
    }
    stream
        .shutdown(Shutdown::Write)
        .await
        .context("echo client shutdown")?;
    Ok(EchoClient {
        samples,
        start,
        last,
    })
}

/// Echoes whole messages (the pool's buffer size) until end of stream.
async fn echo_serve(stream: TcpStream) -> Result<()> {
    let stream = LocalTcpStream::from_std(stream).context("wrapping the echo server socket")?;
    stream.set_nodelay(true).context("setting TCP_NODELAY")?;
    let mut buf = pool()?.get().await;
    loop {
        let (r, b) = stream.recv_exact(buf).await;
        buf = b;
        match r {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e).context("echo server receive"),
        }
        let (r, b) = stream.send_all(buf).await;
        buf = b;
        r.context("echo server send")?;
    }
}

/// Round trips of `size`-byte messages over `connections` connections
/// through `engine` (whose pool buffers must be `size` bytes): client `i`
/// on worker `i % workers`, its server on worker `(i + 1) % workers`.
fn engine_echo(
    engine: &Engine,
    connections: usize,
    duration: Duration,
    size: usize,
) -> Result<EchoResult> {
    let pairs = loopback_pairs(connections)?;
    let workers = engine.workers();
    let warmup = ECHO_WARMUP_ROUND_TRIPS.div_ceil(connections);
    let mut servers = Vec::with_capacity(connections);
    let mut clients = Vec::with_capacity(connections);
    for (i, (client, server)) in pairs.into_iter().enumerate() {
        servers.push(
            engine
                .spawn_on((i + 1) % workers, move || echo_serve(server))
                .map_err(|e| anyhow!(e))
                .with_context(|| format!("starting echo server {i}"))?,
        );
        clients.push(
            engine
                .spawn_on(i % workers, move || {
                    echo_client(client, size, warmup, duration)
                })
                .map_err(|e| anyhow!(e))
                .with_context(|| format!("starting echo client {i}"))?,
        );
    }
    let limit = Instant::now() + duration + GRACE;
    let measured = join_all(clients, limit, "engine echo client");
    let served = join_all(servers, limit, "engine echo server");
    let measured = measured?;
    served?;
    let start = measured.iter().map(|c| c.start).min();
    let last = measured.iter().map(|c| c.last).max();
    let elapsed = match (start, last) {
        (Some(s), Some(l)) => (l - s).as_secs_f64(),
        _ => 0.0,
    };
    let all: Vec<u64> = measured.into_iter().flat_map(|c| c.samples).collect();
    Ok(EchoResult::from_samples(connections, all, elapsed))
}

/// The two engines of a run; dropped (stopped at once) on an early error.
struct Engines {
    bulk: Engine,
    echo: Engine,
}

impl Engines {
    fn build(o: &Options) -> Result<Self> {
        let mut bulk = Engine::builder()
            .buffer_size(o.write_size)
            // Per worker: every sender's buffers and a receive buffer per
            // connection, with room to spare.
            .buffer_count(o.connections * (o.in_flight + 1) + 4)
            .recv_buffer_size(o.recv_buffer_size);
        if let Some(w) = o.workers {
            bulk = bulk.workers(w);
        }
        let bulk = bulk.build().context("building the bulk engine")?;
        let workers = bulk.workers();
        let echo = Engine::builder()
            .workers(workers)
            .spin(o.spin)
            .buffer_size(o.echo_size)
            .buffer_count(2 * o.echo_connections + 4)
            .recv_buffers(0)
            .build()
            .context("building the echo engine")?;
        Ok(Self { bulk, echo })
    }

    fn shutdown(self) -> Result<()> {
        let bulk = self.bulk.shutdown(SHUTDOWN_GRACE);
        let echo = self.echo.shutdown(SHUTDOWN_GRACE);
        bulk.context("shutting down the bulk engine")?;
        echo.context("shutting down the echo engine")
    }
}

/// One measurement of the round-robin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    EngineBulk(usize),
    StdBulk(usize),
    Iperf3(usize),
    Echo,
    StdEcho,
}

impl Step {
    fn label(self) -> String {
        match self {
            Self::EngineBulk(n) => format!("engine bulk, {n} connection(s)"),
            Self::StdBulk(n) => format!("std bulk, {n} connection(s)"),
            Self::Iperf3(n) => format!("iperf3, {n} connection(s)"),
            Self::Echo => "engine echo".into(),
            Self::StdEcho => "std echo".into(),
        }
    }
}

/// Runs every measurement `repeat` times, round-robin, and returns the
/// medians. `progress` hears what runs next.
pub fn run(o: &Options, mut progress: impl FnMut(&str)) -> Result<Report> {
    ensure!(o.connections > 0, "--connections must be at least 1");
    ensure!(
        o.echo_connections > 0,
        "--echo-connections must be at least 1"
    );
    ensure!(o.repeat > 0, "--repeat must be at least 1");
    ensure!(o.in_flight > 0, "--in-flight must be at least 1");
    ensure!(o.write_size > 0, "--write-size must be at least 1 byte");
    ensure!(o.echo_size > 0, "--echo-size must be at least 1 byte");
    ensure!(!o.duration.is_zero(), "--duration must be longer than 0");
    progress("starting the engines");
    let engines = Engines::build(o)?;
    let report = measure(o, &engines, &mut progress);
    // Stop the engines whatever happened; a measurement error comes first.
    let stopped = engines.shutdown();
    let report = report?;
    stopped?;
    Ok(report)
}

fn measure(o: &Options, engines: &Engines, progress: &mut impl FnMut(&str)) -> Result<Report> {
    let bulk_config = BulkConfig {
        write_size: o.write_size,
        zero_copy: o.zero_copy,
        multishot: o.multishot,
        in_flight: o.in_flight,
    };
    let mut counts = vec![1];
    if o.connections != 1 {
        counts.push(o.connections);
    }
    let mut steps = Vec::new();
    for &n in &counts {
        steps.extend([Step::EngineBulk(n), Step::StdBulk(n), Step::Iperf3(n)]);
    }
    steps.extend([Step::Echo, Step::StdEcho]);
    let mut bulk: Vec<Vec<BulkResult>> = vec![Vec::new(); steps.len()];
    let mut echo: Vec<Vec<EchoResult>> = vec![Vec::new(); steps.len()];
    let mut iperf3_installed = true;
    let mut zero_copy = ZeroCopy::Untried;
    for pass in 1..=o.repeat {
        for (k, &step) in steps.iter().enumerate() {
            if matches!(step, Step::Iperf3(_)) && !iperf3_installed {
                continue;
            }
            progress(&format!("run {pass}/{}: {}", o.repeat, step.label()));
            let what = || format!("{} (run {pass})", step.label());
            match step {
                Step::EngineBulk(n) => {
                    engine_bulk(&engines.bulk, n, BULK_WARMUP, bulk_config)
                        .with_context(|| format!("warm-up of {}", what()))?;
                    let (r, zc) = engine_bulk(&engines.bulk, n, o.duration, bulk_config)
                        .with_context(what)?;
                    bulk[k].push(r);
                    zero_copy = zc;
                }
                Step::StdBulk(n) => {
                    bulk[k].push(netref::std_bulk(n, o.duration, o.write_size).with_context(what)?)
                }
                Step::Iperf3(n) => match netref::iperf3(n, o.duration).with_context(what)? {
                    Some(r) => bulk[k].push(r),
                    None => iperf3_installed = false,
                },
                Step::Echo => echo[k].push(
                    engine_echo(&engines.echo, o.echo_connections, o.duration, o.echo_size)
                        .with_context(what)?,
                ),
                Step::StdEcho => echo[k].push(
                    netref::std_echo(o.echo_connections, o.duration, o.echo_size)
                        .with_context(what)?,
                ),
            }
        }
    }
    let mut report = Report {
        bulk: Vec::new(),
        echo: Vec::new(),
        iperf3_installed,
        features: engines.bulk.features(),
        zero_copy,
        workers: engines.bulk.workers(),
        options: o.clone(),
    };
    for (k, step) in steps.into_iter().enumerate() {
        match step {
            Step::EngineBulk(n) => report.bulk.push(BulkRow::new("engine", n, &bulk[k])),
            Step::StdBulk(n) => report.bulk.push(BulkRow::new("std", n, &bulk[k])),
            Step::Iperf3(n) if !bulk[k].is_empty() => {
                report.bulk.push(BulkRow::new("iperf3", n, &bulk[k]));
            }
            Step::Iperf3(_) => {}
            Step::Echo => report
                .echo
                .push(EchoRow::new("echo", o.echo_connections, &echo[k])),
            Step::StdEcho => {
                report
                    .echo
                    .push(EchoRow::new("std-echo", o.echo_connections, &echo[k]))
            }
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> Options {
        Options {
            connections: 2,
            workers: Some(2),
            duration: Duration::from_millis(200),
            write_size: 256 * 1024,
            zero_copy: true,
            multishot: true,
            in_flight: 1,
            recv_buffer_size: 64 * 1024,
            repeat: 1,
            echo_connections: 1,
            echo_size: 64,
            spin: Duration::from_micros(50),
        }
    }

    #[test]
    fn medians() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(median(&[]), 0.0);
    }

    #[test]
    fn whole_run_with_tiny_settings() {
        let t = Instant::now();
        let report = run(&tiny(), |m| eprintln!("  .. {m}")).unwrap();
        report.print_table();
        report.print_json();
        let mut names = vec![("engine", 1), ("std", 1), ("engine", 2), ("std", 2)];
        if report.iperf3_installed {
            names.extend([("iperf3", 1), ("iperf3", 2)]);
        } else {
            eprintln!("iperf3 not installed: its rows are not checked");
        }
        for (name, n) in names {
            let r = report
                .bulk_row(name, n)
                .unwrap_or_else(|| panic!("no {name}-{n} row"));
            assert_eq!(r.runs, 1, "{r:?}");
            assert!(
                r.gbps > 0.0 && r.min_gbps > 0.0 && r.max_gbps > 0.0,
                "{r:?}"
            );
        }
        for name in ["echo", "std-echo"] {
            let r = report
                .echo_row(name)
                .unwrap_or_else(|| panic!("no {name} row"));
            assert_eq!(r.connections, 1);
            assert!(r.p50_us > 0.0 && r.p99_us >= r.p50_us, "{r:?}");
            assert!(r.msgs_per_s > 0.0, "{r:?}");
        }
        let s = report.summary_json();
        assert!(s["engine_1_vs_std_1"].as_f64().unwrap() > 0.0, "{s}");
        assert!(s["echo_p99_vs_std_echo_p99"].as_f64().unwrap() > 0.0, "{s}");
        assert!(
            s["echo_msgs_vs_std_echo_msgs"].as_f64().unwrap() > 0.0,
            "{s}"
        );
        assert!(t.elapsed() < Duration::from_secs(30), "{:?}", t.elapsed());
    }

    #[test]
    fn two_sends_in_flight_without_multishot_or_zero_copy() {
        let o = Options {
            in_flight: 2,
            zero_copy: false,
            multishot: false,
            ..tiny()
        };
        let engines = Engines::build(&o).unwrap();
        let c = BulkConfig {
            write_size: o.write_size,
            zero_copy: false,
            multishot: false,
            in_flight: 2,
        };
        let r = engine_bulk(&engines.bulk, 3, Duration::from_millis(100), c);
        engines.shutdown().unwrap();
        let (r, zc) = r.unwrap();
        assert_eq!(zc, ZeroCopy::Untried, "send_all never tries zero copy");
        assert_eq!(r.connections, 3);
        assert!(r.bytes > 0 && r.gbps() > 0.0, "{r:?}");
    }
}
