//! Reference network measurements printed next to the engine's own rows by
//! `dwcp bench engine`.
//!
//! Everything here runs on loopback (127.0.0.1, ephemeral ports), is bounded
//! in time and leaves no thread or process behind:
//!
//! - [`std_bulk`]: bulk throughput over plain blocking `std::net` sockets,
//!   one sender and one receiver thread per connection;
//! - [`std_echo`]: request/response round-trip latency over blocking
//!   `std::net` sockets with `TCP_NODELAY`;
//! - [`iperf3`]: the same bulk transfer measured by `iperf3`, when installed.

use std::io::{self, ErrorKind, Read, Write};
use std::net::{Ipv4Addr, Shutdown, TcpListener, TcpStream};
use std::process::{Command, Stdio};

use crate::proc::{ChildGuard, run_capture};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};

/// Extra time, on top of the measured duration, that any blocking socket
/// operation or child process may take before it is treated as hung.
const GRACE: Duration = Duration::from_secs(10);

/// Length of the untimed warm-up transfer that precedes [`std_bulk`].
const BULK_WARMUP: Duration = Duration::from_millis(200);

/// Untimed round trips (over all connections) that precede [`std_echo`].
const ECHO_WARMUP_ROUND_TRIPS: usize = 1000;

/// How often the `iperf3` client is retried while its server is not yet
/// listening.
const IPERF3_CONNECT_ATTEMPTS: usize = 10;

/// Pause between two `iperf3` client attempts.
const IPERF3_RETRY_PAUSE: Duration = Duration::from_millis(200);

/// Result of a bulk (one-way, as fast as possible) transfer.
#[derive(Debug, Clone, PartialEq)]
pub struct BulkResult {
    /// Parallel TCP connections used.
    pub connections: usize,
    /// Payload bytes received, over all connections.
    pub bytes: u64,
    /// Seconds the transfer took, from the start of sending to the last
    /// receiver seeing end of stream.
    pub seconds: f64,
}

impl BulkResult {
    /// Payload throughput in gigabits (10^9 bits) per second; 0 when no time
    /// was measured.
    pub fn gbps(&self) -> f64 {
        if self.seconds > 0.0 {
            self.bytes as f64 * 8.0 / 1e9 / self.seconds
        } else {
            0.0
        }
    }
}

/// Result of a request/response (echo) run.
#[derive(Debug, Clone, PartialEq)]
pub struct EchoResult {
    /// Parallel TCP connections used, each with one message in flight.
    pub connections: usize,
    /// Round trips completed in the timed part, over all connections.
    pub messages: u64,
    /// Median round-trip time in microseconds (nearest rank).
    pub p50_us: f64,
    /// 99th-percentile round-trip time in microseconds (nearest rank).
    pub p99_us: f64,
    /// Round trips per second, over all connections.
    pub msgs_per_s: f64,
}

impl EchoResult {
    /// Summarises round-trip `samples` (nanoseconds) taken over `elapsed`
    /// seconds on `connections` connections.
    pub fn from_samples(connections: usize, mut samples: Vec<u64>, elapsed: f64) -> Self {
        let messages = samples.len() as u64;
        let (p50_us, p99_us) = percentiles(&mut samples);
        Self {
            connections,
            messages,
            p50_us,
            p99_us,
            msgs_per_s: if elapsed > 0.0 {
                messages as f64 / elapsed
            } else {
                0.0
            },
        }
    }
}

/// Median and 99th percentile of `samples` (nanoseconds), in microseconds.
///
/// Uses the nearest-rank method: the p-th percentile is the smallest sample
/// such that at least p % of the samples are less than or equal to it.
/// Sorts `samples` in place. Both values are NaN when `samples` is empty.
pub fn percentiles(samples: &mut [u64]) -> (f64, f64) {
    if samples.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    samples.sort_unstable();
    let n = samples.len();
    let at = |p: usize| {
        let rank = (p * n).div_ceil(100).max(1);
        samples[rank - 1] as f64 / 1000.0
    };
    (at(50), at(99))
}

/// Connects `n` loopback client sockets to a fresh listener and accepts each
/// one, returning `(client, server)` pairs. Every socket gets read and write
/// timeouts of `io_timeout`.
fn loopback_pairs(n: usize, io_timeout: Duration) -> Result<Vec<(TcpStream, TcpStream)>> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("binding 127.0.0.1:0")?;
    let addr = listener.local_addr().context("reading listener address")?;
    let mut pairs = Vec::with_capacity(n);
    for i in 0..n {
        // Accept right after each connect so that the listen backlog never
        // fills up, whatever `n` is.
        let client =
            TcpStream::connect(addr).with_context(|| format!("connecting {i} to {addr}"))?;
        let (server, _) = listener
            .accept()
            .with_context(|| format!("accepting connection {i}"))?;
        for s in [&client, &server] {
            s.set_read_timeout(Some(io_timeout))
                .context("setting read timeout")?;
            s.set_write_timeout(Some(io_timeout))
                .context("setting write timeout")?;
        }
        pairs.push((client, server));
    }
    Ok(pairs)
}

/// Joins a scoped thread, turning a panic into an error.
fn join<T>(handle: thread::ScopedJoinHandle<'_, Result<T>>, what: &str) -> Result<T> {
    handle
        .join()
        .map_err(|_| anyhow!("{what} thread panicked"))?
}

/// A buffer of `len` bytes filled with a non-zero repeating pattern.
fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8 + 1).collect()
}

/// One bulk transfer of `duration` over `connections` fresh connections.
fn bulk_run(connections: usize, duration: Duration, write_size: usize) -> Result<BulkResult> {
    let pairs = loopback_pairs(connections, duration + GRACE)?;
    let payload = pattern(write_size);
    let payload = payload.as_slice();
    thread::scope(|s| {
        let mut receivers = Vec::with_capacity(connections);
        let mut senders = Vec::with_capacity(connections);
        let mut outgoing = Vec::with_capacity(connections);
        for (client, mut server) in pairs {
            receivers.push(s.spawn(move || -> Result<(u64, Instant)> {
                let mut buf = vec![0u8; write_size];
                let mut bytes = 0u64;
                loop {
                    match server.read(&mut buf) {
                        Ok(0) => return Ok((bytes, Instant::now())),
                        Ok(k) => bytes += k as u64,
                        Err(e) if e.kind() == ErrorKind::Interrupted => {}
                        Err(e) => return Err(e).context("bulk receiver read"),
                    }
                }
            }));
            outgoing.push(client);
        }
        let start = Instant::now();
        let deadline = start + duration;
        for mut client in outgoing {
            senders.push(s.spawn(move || -> Result<()> {
                while Instant::now() < deadline {
                    client.write_all(payload).context("bulk sender write")?;
                }
                client
                    .shutdown(Shutdown::Write)
                    .context("bulk sender shutdown")
            }));
        }
        // Join everything before looking at any result.
        let sent: Vec<Result<()>> = senders.into_iter().map(|h| join(h, "sender")).collect();
        let received: Vec<Result<(u64, Instant)>> =
            receivers.into_iter().map(|h| join(h, "receiver")).collect();
        let mut bytes = 0;
        let mut last = start;
        for r in received {
            let (b, end) = r?;
            bytes += b;
            last = last.max(end);
        }
        for r in sent {
            r?;
        }
        Ok(BulkResult {
            connections,
            bytes,
            seconds: (last - start).as_secs_f64(),
        })
    })
}

/// Bulk throughput of plain blocking `std::net` TCP sockets on loopback.
///
/// Opens `connections` connections to a listener on 127.0.0.1; per
/// connection one thread writes a `write_size` buffer in a loop until
/// `duration` has passed and then shuts down its write side, and one thread
/// reads into a `write_size` buffer until end of stream. Socket options are
/// left at their defaults (Nagle on, kernel buffer autotuning), like
/// `iperf3`. A 200 ms single-connection transfer runs first as an uncounted
/// warm-up.
///
/// The result counts the bytes received over the time from the start of
/// sending to the last receiver seeing end of stream.
pub fn std_bulk(connections: usize, duration: Duration, write_size: usize) -> Result<BulkResult> {
    ensure!(connections > 0, "std_bulk needs at least one connection");
    ensure!(write_size > 0, "std_bulk needs a non-empty write size");
    bulk_run(1, BULK_WARMUP, write_size).context("bulk warm-up")?;
    bulk_run(connections, duration, write_size)
}

/// Serves one echo connection: reads exactly `msg_size` bytes and writes
/// them back, until the client closes.
fn echo_serve(mut stream: TcpStream, msg_size: usize) -> Result<()> {
    let mut buf = vec![0u8; msg_size];
    loop {
        match stream.read_exact(&mut buf) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e).context("echo server read"),
        }
        stream.write_all(&buf).context("echo server write")?;
    }
}

/// One request/response round trip on `stream`.
fn round_trip(stream: &mut TcpStream, msg: &[u8], reply: &mut [u8]) -> io::Result<()> {
    stream.write_all(msg)?;
    stream.read_exact(reply)
}

/// Round-trip latency and rate of plain blocking `std::net` TCP sockets on
/// loopback.
///
/// Opens `connections` connections with `TCP_NODELAY` on both ends. The
/// server side runs one thread per connection that reads exactly `msg_size`
/// bytes and writes them back; the client side runs one thread per
/// connection that writes `msg_size` bytes, reads the reply and records the
/// round-trip time, until `duration` has passed. About 1000 round trips
/// (spread over the connections) run first as an uncounted warm-up.
///
/// Percentiles come from [`percentiles`] over all samples; `msgs_per_s` is
/// the number of round trips over the time from the start to the last
/// client's last reply.
pub fn std_echo(connections: usize, duration: Duration, msg_size: usize) -> Result<EchoResult> {
    ensure!(connections > 0, "std_echo needs at least one connection");
    ensure!(msg_size > 0, "std_echo needs a non-empty message");
    let pairs = loopback_pairs(connections, duration + GRACE)?;
    for (client, server) in &pairs {
        client.set_nodelay(true).context("setting TCP_NODELAY")?;
        server.set_nodelay(true).context("setting TCP_NODELAY")?;
    }
    let msg = pattern(msg_size);
    let msg = msg.as_slice();
    let warmup = ECHO_WARMUP_ROUND_TRIPS.div_ceil(connections);
    thread::scope(|s| {
        let mut servers = Vec::with_capacity(connections);
        let mut clients = Vec::with_capacity(connections);
        for (client, server) in pairs {
            servers.push(s.spawn(move || echo_serve(server, msg_size)));
            clients.push(client);
        }
        // Runs the clients; on an early error the client sockets are dropped
        // on return, so the server threads see end of stream and finish.
        let run = move || -> Result<EchoResult> {
            let mut reply = vec![0u8; msg_size];
            for client in &mut clients {
                for _ in 0..warmup {
                    round_trip(client, msg, &mut reply).context("echo warm-up")?;
                }
            }
            let start = Instant::now();
            let deadline = start + duration;
            let workers: Vec<_> = clients
                .into_iter()
                .map(|mut client| {
                    s.spawn(move || -> Result<(Vec<u64>, Instant)> {
                        let mut reply = vec![0u8; msg_size];
                        let mut samples = Vec::new();
                        let mut last = Instant::now();
                        loop {
                            let t0 = Instant::now();
                            if t0 >= deadline {
                                break;
                            }
                            round_trip(&mut client, msg, &mut reply)
                                .context("echo client round trip")?;
                            last = Instant::now();
                            samples.push(u64::try_from((last - t0).as_nanos()).unwrap_or(u64::MAX));
                        }
                        client
                            .shutdown(Shutdown::Write)
                            .context("echo client shutdown")?;
                        Ok((samples, last))
                    })
                })
                .collect();
            let results: Vec<_> = workers
                .into_iter()
                .map(|h| join(h, "echo client"))
                .collect();
            let mut all = Vec::new();
            let mut last = start;
            for r in results {
                let (samples, end) = r?;
                all.extend_from_slice(&samples);
                last = last.max(end);
            }
            let elapsed = (last - start).as_secs_f64();
            Ok(EchoResult::from_samples(connections, all, elapsed))
        };
        let result = run();
        let served: Vec<_> = servers
            .into_iter()
            .map(|h| join(h, "echo server"))
            .collect();
        let result = result?;
        for r in served {
            r?;
        }
        Ok(result)
    })
}

/// A loopback TCP port that was free a moment ago.
fn free_port() -> Result<u16> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("binding 127.0.0.1:0")?;
    Ok(listener
        .local_addr()
        .context("reading listener address")?
        .port())
}

/// Reads `bytes` and `seconds` out of one of iperf3's `end.sum_*` objects.
fn iperf3_sum(sum: &serde_json::Value) -> Option<(u64, f64)> {
    let bytes = sum.get("bytes")?;
    let bytes = bytes
        .as_u64()
        .or_else(|| bytes.as_f64().map(|b| b as u64))?;
    let seconds = sum.get("seconds")?.as_f64()?;
    Some((bytes, seconds))
}

/// Parses the JSON report of `iperf3 -c ... -J` into a [`BulkResult`].
///
/// Uses `end.sum_received`, falling back to `end.sum_sent`. A report with an
/// `error` field is an error.
fn parse_iperf3(json: &str, connections: usize) -> Result<BulkResult> {
    let report: serde_json::Value =
        serde_json::from_str(json).context("iperf3 printed no valid JSON")?;
    if let Some(error) = report.get("error") {
        let error = error
            .as_str()
            .map_or_else(|| error.to_string(), str::to_owned);
        bail!("iperf3 client failed: {error}");
    }
    let end = report
        .get("end")
        .context("iperf3 report has no `end` section")?;
    let (bytes, seconds) = ["sum_received", "sum_sent"]
        .iter()
        .find_map(|key| end.get(key).and_then(iperf3_sum))
        .context("iperf3 report has neither end.sum_received nor end.sum_sent")?;
    Ok(BulkResult {
        connections,
        bytes,
        seconds,
    })
}

/// Bulk throughput as measured by `iperf3` on loopback, or `None` when
/// `iperf3` is not installed: [`iperf3_via`] with both ends here, the
/// server on 127.0.0.1 and a free port.
pub fn iperf3(connections: usize, duration: Duration) -> Result<Option<BulkResult>> {
    let port = free_port()?.to_string();
    let here = || Command::new("iperf3");
    iperf3_via(&here, &here, "127.0.0.1", &port, connections, duration)
}

/// Bulk throughput as measured by `iperf3`, or `None` when `iperf3` is not
/// installed. `server()` and `client()` make the `iperf3` commands (the
/// same program, perhaps run inside a network namespace); the server binds
/// `host:port`.
///
/// Starts a one-off server (`iperf3 -s -1 -B HOST -p PORT`), then runs
/// `iperf3 -c HOST -p PORT -P connections -t SECS -J` with `duration`
/// rounded up to whole seconds (at least 1), default options otherwise.
/// The client is retried while the server is not yet listening and killed
/// when it runs more than 10 s past `duration`; the server is always killed
/// and reaped before returning. Bytes and seconds come from the client's
/// `end.sum_received` (or `end.sum_sent`).
pub fn iperf3_via(
    server: &dyn Fn() -> Command,
    client: &dyn Fn() -> Command,
    host: &str,
    port: &str,
    connections: usize,
    duration: Duration,
) -> Result<Option<BulkResult>> {
    ensure!(connections > 0, "iperf3 needs at least one connection");
    match Command::new("iperf3")
        .arg("--version")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
    {
        Ok(_) => {}
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).context("running `iperf3 --version`"),
    }
    let secs = (duration.as_secs() + u64::from(duration.subsec_nanos() > 0)).max(1);
    let child = server()
        .args(["-s", "-1", "-B", host, "-p", port])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting the iperf3 server")?;
    let mut child = ChildGuard::new(child);
    let client_timeout = Duration::from_secs(secs) + GRACE;
    let mut attempt = 0;
    loop {
        attempt += 1;
        thread::sleep(IPERF3_RETRY_PAUSE);
        if let Some(status) = child
            .child_mut()
            .try_wait()
            .context("polling the iperf3 server")?
        {
            bail!("iperf3 server on {host}:{port} exited early ({status})");
        }
        let run = run_capture(
            client().args([
                "-c",
                host,
                "-p",
                port,
                "-P",
                &connections.to_string(),
                "-t",
                &secs.to_string(),
                "-J",
            ]),
            client_timeout,
        )
        .context("running the iperf3 client")?;
        let stdout = String::from_utf8_lossy(&run.stdout);
        let stderr = String::from_utf8_lossy(&run.stderr);
        match parse_iperf3(&stdout, connections) {
            Ok(result) => return Ok(Some(result)),
            Err(e)
                if attempt < IPERF3_CONNECT_ATTEMPTS
                    && format!("{e:#}{stderr}").contains("unable to connect") =>
            {
                continue;
            }
            Err(e) => {
                let stderr = stderr.trim();
                if stderr.is_empty() {
                    return Err(e.context(format!("iperf3 client exited with {}", run.status)));
                }
                return Err(e.context(format!("iperf3 client failed ({}): {stderr}", run.status)));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_nearest_rank() {
        // 1..=100 µs, scrambled.
        let mut v: Vec<u64> = (1..=100u64).map(|i| (i * 37 % 101) * 1000).collect();
        assert_eq!(percentiles(&mut v), (50.0, 99.0));
        let mut v: Vec<u64> = (1..=10u64).rev().map(|i| i * 1000).collect();
        assert_eq!(percentiles(&mut v), (5.0, 10.0));
        let mut one = vec![2500];
        assert_eq!(percentiles(&mut one), (2.5, 2.5));
        let (a, b) = percentiles(&mut []);
        assert!(a.is_nan() && b.is_nan());
    }

    #[test]
    fn parses_iperf3_report() {
        let ok = r#"{"end":{"sum_sent":{"bytes":2000,"seconds":1.0},
                     "sum_received":{"bytes":1000,"seconds":2.0}}}"#;
        let r = parse_iperf3(ok, 3).unwrap();
        assert_eq!((r.connections, r.bytes, r.seconds), (3, 1000, 2.0));
        assert_eq!(r.gbps(), 1000.0 * 8.0 / 1e9 / 2.0);
        let sent_only = r#"{"end":{"sum_sent":{"bytes":2000,"seconds":1.0}}}"#;
        assert_eq!(parse_iperf3(sent_only, 1).unwrap().bytes, 2000);
        let failed = r#"{"end":{},"error":"unable to connect to server: Connection refused"}"#;
        let e = parse_iperf3(failed, 1).unwrap_err().to_string();
        assert!(e.contains("iperf3 client failed: unable to connect"), "{e}");
        assert!(parse_iperf3(r#"{"end":{}}"#, 1).is_err());
    }

    #[test]
    fn std_bulk_one_and_two_connections() {
        for n in [1, 2] {
            let r = std_bulk(n, Duration::from_millis(300), 128 * 1024).unwrap();
            println!(
                "std_bulk {n} conn: {} bytes in {:.3} s = {:.2} Gbit/s",
                r.bytes,
                r.seconds,
                r.gbps()
            );
            assert_eq!(r.connections, n);
            assert!(r.bytes > 0 && r.seconds > 0.0 && r.gbps() > 0.0);
        }
    }

    #[test]
    fn std_echo_round_trips() {
        let r = std_echo(1, Duration::from_millis(300), 64).unwrap();
        println!(
            "std_echo 1 conn: {} msgs, p50 {:.1} us, p99 {:.1} us, {:.0} msg/s",
            r.messages, r.p50_us, r.p99_us, r.msgs_per_s
        );
        assert!(r.messages > 100, "{r:?}");
        assert!(r.p50_us <= r.p99_us, "{r:?}");
        assert!(r.msgs_per_s > 0.0);
    }

    #[test]
    fn iperf3_one_connection() {
        let Some(r) = iperf3(1, Duration::from_secs(1)).unwrap() else {
            println!("skipped: iperf3 not installed");
            return;
        };
        println!(
            "iperf3 1 conn: {} bytes in {:.3} s = {:.2} Gbit/s",
            r.bytes,
            r.seconds,
            r.gbps()
        );
        assert_eq!(r.connections, 1);
        assert!(r.gbps() > 0.0);
    }
}
