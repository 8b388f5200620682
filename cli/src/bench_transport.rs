//! `dwcp bench transport`: an AMST session between two processes in two
//! network namespaces joined by a veth pair (optionally rate-limited with
//! tbf), next to `iperf3 -P N` over the same link in the same run.
//!
//! The sender and the receiver are this binary again (`dwcp bench-peer send`
//! and `dwcp bench-peer recv`, hidden commands), each inside its namespace,
//! so that the measurement covers two real processes, their own engines and
//! a real TCP path, and the CPU time of each is read from `wait4`. The data
//! is made in memory before the clock starts; the receiver places it into
//! memory and checks the BLAKE3 digest of every region before the sender's
//! clock stops (when the receiver has said `DONE` and `BYE`).

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use dwcp_codec::corpus::{self, ClassMix, Rng};
use dwcp_engine::Engine;
use dwcp_transport::{
    FileSource, Key, MemorySink, Receiver, ReceiverConfig, Sender, SenderConfig, Source,
    StreamCount,
};
use serde_json::{Value, json};

use crate::netns::{LinkPair, Side};
use crate::proc::{ChildGuard, cpu_seconds};
use crate::transfer::{parse_streams, policy, resolve};
use crate::units::format_size;

/// What to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Data {
    /// Incompressible bytes.
    Random,
    /// The codec's synthetic memory corpus.
    Synthetic,
    /// A file, read where it lies.
    File(PathBuf),
}

impl Data {
    /// Parses `random`, `synthetic` or a file name.
    pub fn parse(s: &str) -> Result<Data, String> {
        Ok(match s {
            "random" => Data::Random,
            "synthetic" => Data::Synthetic,
            path => {
                let p = PathBuf::from(path);
                match fs::metadata(&p) {
                    Ok(m) if m.is_file() => Data::File(p),
                    Ok(_) => return Err(format!("{path}: not a regular file")),
                    Err(e) => {
                        return Err(format!(
                            "{path}: {e} (expected random, synthetic or a file)"
                        ));
                    }
                }
            }
        })
    }

    /// The `data` field of a row.
    pub fn name(&self) -> String {
        match self {
            Data::Random => "random".into(),
            Data::Synthetic => "synthetic".into(),
            Data::File(p) => p
                .file_name()
                .map_or_else(|| p.display().to_string(), |n| n.to_string_lossy().into()),
        }
    }

    /// The argument that names it to `bench-peer send`.
    fn arg(&self) -> String {
        match self {
            Data::Random => "random".into(),
            Data::Synthetic => "synthetic".into(),
            Data::File(p) => p.display().to_string(),
        }
    }
}

/// Options of `dwcp bench transport`.
#[derive(Debug, Clone)]
pub struct Options {
    /// What to send.
    pub data: Data,
    /// Bytes to send (random and synthetic).
    pub size: u64,
    /// Stream count, as `--streams` writes it (`4`, `auto`).
    pub streams: String,
    /// Codec policies, each measured in every run.
    pub modes: Vec<String>,
    /// tbf rate in bit/s; 0 for none.
    pub rate_bps: u64,
    /// Runs, interleaved; medians are reported.
    pub repeat: usize,
    /// Engine workers of each side.
    pub workers: Option<usize>,
    /// Cut one stream once this share of the data is acknowledged.
    pub kill_stream: Option<f64>,
    /// Skip the iperf3 rows.
    pub no_iperf3: bool,
}

/// One dwcp run, as the sender and receiver reported it.
#[derive(Debug, Clone)]
pub struct DwcpRun {
    /// Seconds from connecting to the receiver's `BYE`.
    pub seconds: f64,
    /// Application bytes delivered and verified.
    pub bytes: u64,
    /// Bytes the sender put on its sockets.
    pub wire_bytes: u64,
    /// Streams at the end.
    pub streams: u64,
    /// CPU seconds of both processes.
    pub cpu_s: f64,
    /// Bytes sent again after a stream failed.
    pub retransmitted_bytes: u64,
    /// Stream connections that failed.
    pub stream_failures: u64,
    /// The per-stream window.
    pub window: u64,
}

impl DwcpRun {
    fn goodput_gbps(&self) -> f64 {
        self.bytes as f64 * 8.0 / 1e9 / self.seconds.max(1e-9)
    }
    fn wire_gbps(&self) -> f64 {
        self.wire_bytes as f64 * 8.0 / 1e9 / self.seconds.max(1e-9)
    }
}

/// The medians of one row of the report.
#[derive(Debug, Clone)]
pub struct Row {
    /// `dwcp` or `iperf3`.
    pub name: &'static str,
    /// Streams.
    pub streams: u64,
    /// Codec policy (`-` for iperf3).
    pub mode: String,
    /// Median goodput, Gbit/s.
    pub goodput_gbps: f64,
    /// Median wire throughput, Gbit/s.
    pub wire_gbps: f64,
    /// Median CPU seconds of both sides (dwcp only).
    pub cpu_s: Option<f64>,
    /// Median seconds.
    pub seconds: f64,
    /// Goodput of every run.
    pub runs: Vec<f64>,
    /// Median bytes delivered.
    pub bytes: u64,
    /// Most bytes retransmitted in any run.
    pub retransmitted_bytes: Option<u64>,
    /// Most stream failures in any run.
    pub stream_failures: Option<u64>,
    /// Per-stream window.
    pub window: Option<u64>,
}

/// What `run` measured.
#[derive(Debug)]
pub struct Report {
    /// Rows: each mode's dwcp, then iperf3.
    pub rows: Vec<Row>,
    /// tbf rate, bit/s.
    pub rate_bps: u64,
    /// `data` field.
    pub data: String,
    /// Whether iperf3 was missing.
    pub iperf3_missing: bool,
}

pub(crate) fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// A private directory holding the session key, removed on drop.
pub(crate) struct KeyDir(PathBuf);

impl KeyDir {
    pub(crate) fn new() -> Result<KeyDir> {
        let dir = std::env::temp_dir().join(format!("dwcp-bench-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .with_context(|| format!("creating {}", dir.display()))?;
        let kd = KeyDir(dir);
        Key::write_new(&kd.key())?;
        Ok(kd)
    }
    pub(crate) fn key(&self) -> PathBuf {
        self.0.join("key")
    }
}

impl Drop for KeyDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A peer process: its guard, the lines it prints, and its stderr.
pub(crate) struct Peer {
    child: ChildGuard,
    pub(crate) lines: mpsc::Receiver<String>,
    stderr: thread::JoinHandle<String>,
}

impl Peer {
    pub(crate) fn spawn(mut cmd: Command, what: &str) -> Result<Peer> {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting the {what}"))?;
        let out = child.stdout.take().context("stdout not piped")?;
        let mut err = child.stderr.take().context("stderr not piped")?;
        let (tx, lines) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stderr = thread::spawn(move || {
            let mut s = String::new();
            let _ = err.read_to_string(&mut s);
            s
        });
        Ok(Peer {
            child: ChildGuard::new(child),
            lines,
            stderr,
        })
    }

    /// Waits for the peer to exit (killing it past `deadline`); its status
    /// must be success. Returns its last stdout line, a JSON object. (Each
    /// peer reports its own CPU over the session, leaving out its setup, so
    /// the whole-life figure of `wait4` is not used.)
    pub(crate) fn finish(self, deadline: Instant, what: &str) -> Result<Value> {
        let (status, _) = self.child.wait_with_cpu(deadline)?;
        let stderr = self.stderr.join().unwrap_or_default();
        let last = self.lines.try_iter().last();
        if !status.success() {
            bail!("the {what} failed ({status}): {}", stderr.trim());
        }
        let last = last.with_context(|| format!("the {what} printed no report"))?;
        let v: Value = serde_json::from_str(&last)
            .with_context(|| format!("the {what}'s report {last:?} is not JSON"))?;
        Ok(v)
    }
}

fn field(v: &Value, k: &str) -> Result<u64> {
    v.get(k)
        .and_then(Value::as_u64)
        .with_context(|| format!("peer report has no {k}: {v}"))
}

/// One dwcp transfer across `pair`.
fn dwcp_once(
    pair: &LinkPair,
    exe: &Path,
    key: &Path,
    opts: &Options,
    mode: &str,
    size: u64,
) -> Result<DwcpRun> {
    let rate = pair.rate_bits_per_sec();
    // Generous: three times the time at the link rate (or at 100 MB/s
    // unlimited), plus time to make the data and start.
    let at = if rate > 0 { rate / 8 } else { 100_000_000 };
    let budget = Duration::from_secs(30 + 3 * size / at.max(1));
    let deadline = Instant::now() + budget;
    let workers = opts.workers.map(|w| w.to_string());
    let mut recv = pair.command(Side::B, exe);
    recv.args(["bench-peer", "recv", "--listen"])
        .arg(format!("{}:0", pair.addr(Side::B)))
        .arg("--key")
        .arg(key)
        .args(["--limit", &size.to_string()])
        .args(["--timeout", &format!("{}s", budget.as_secs())]);
    if let Some(w) = &workers {
        recv.args(["--workers", w]);
    }
    let recv = Peer::spawn(recv, "receiver")?;
    // It puts its memory in place first.
    let start_wait = Duration::from_secs(10 + 3 * size.div_ceil(1 << 30));
    let listening = recv
        .lines
        .recv_timeout(start_wait)
        .map_err(|_| anyhow!("the receiver did not start listening within {start_wait:?}"))?;
    let addr = listening
        .strip_prefix("listening ")
        .with_context(|| format!("the receiver said {listening:?}"))?
        .to_owned();
    let mut send = pair.command(Side::A, exe);
    send.args(["bench-peer", "send", "--to", &addr])
        .arg("--key")
        .arg(key)
        .args(["--data", &opts.data.arg()])
        .args(["--size", &size.to_string()])
        .args(["--streams", &opts.streams])
        .args(["--mode", mode])
        .args(["--link-rate", &format!("{rate}bit")]);
    if let Some(w) = &workers {
        send.args(["--workers", w]);
    }
    if let Some(share) = opts.kill_stream {
        send.args([
            "--kill-stream-at",
            &((size as f64 * share) as u64).to_string(),
        ]);
    }
    let send = Peer::spawn(send, "sender")?;
    let sent = send.finish(deadline, "sender");
    if let Err(e) = sent {
        // The receiver would wait for a session that is not coming.
        drop(recv);
        return Err(e);
    }
    // The sender is done; the receiver ends within moments.
    let got = recv.finish(Instant::now() + Duration::from_secs(10), "receiver");
    let (s, r) = (sent?, got?);
    // Each side counts its own CPU over the session, leaving out making
    // the data (sender) and putting its memory in place (receiver).
    let cpu = |v: &Value| {
        v.get("cpu_s")
            .and_then(Value::as_f64)
            .with_context(|| format!("peer report has no cpu_s: {v}"))
    };
    let (cpu_send, cpu_recv) = (cpu(&s)?, cpu(&r)?);
    let bytes = field(&r, "bytes")?;
    ensure!(
        bytes == field(&s, "bytes")? && field(&r, "failed")? == 0,
        "the receiver verified {bytes} bytes of {} ({} region(s) failed)",
        field(&s, "bytes")?,
        field(&r, "failed")?
    );
    Ok(DwcpRun {
        seconds: s
            .get("seconds")
            .and_then(Value::as_f64)
            .context("sender report has no seconds")?,
        bytes,
        wire_bytes: field(&s, "wire_bytes")?,
        streams: field(&s, "streams")?,
        cpu_s: cpu_send + cpu_recv,
        retransmitted_bytes: field(&s, "retransmitted_bytes")?,
        stream_failures: field(&s, "stream_failures")?,
        window: field(&s, "window")?,
    })
}

/// Runs the benchmark.
pub fn run(opts: &Options, mut progress: impl FnMut(&str)) -> Result<Report> {
    ensure!(opts.repeat > 0, "--repeat must be at least 1");
    ensure!(!opts.modes.is_empty(), "--mode names no policy");
    for m in &opts.modes {
        policy(m, opts.rate_bps)?;
    }
    parse_streams(&opts.streams).map_err(|e| anyhow!(e))?;
    let size = match &opts.data {
        Data::File(p) => fs::metadata(p)
            .with_context(|| format!("reading {}", p.display()))?
            .len(),
        _ => opts.size,
    };
    ensure!(size > 0, "nothing to send: the data is empty");
    // The receiver holds the whole region in memory, and the sender does
    // too unless it reads a file; both run on this machine.
    let held = if matches!(opts.data, Data::File(_)) {
        1
    } else {
        2
    };
    if let Some(avail) = mem_available() {
        ensure!(
            size.saturating_mul(held) < avail,
            "{} of data needs {} of memory here (sender and receiver both hold it), \
             but only {} is available; use a smaller --size",
            format_size(size),
            format_size(size.saturating_mul(held)),
            format_size(avail)
        );
    }
    let exe = std::env::current_exe().context("finding this program's path")?;
    let keys = KeyDir::new()?;
    let pair = LinkPair::create(opts.rate_bps)?;
    let mut dwcp: Vec<Vec<DwcpRun>> = vec![Vec::new(); opts.modes.len()];
    let mut iperf: Vec<crate::netref::BulkResult> = Vec::new();
    let mut iperf3_missing = false;
    for rep in 0..opts.repeat {
        let mut first_secs = None;
        let mut first_streams = 1;
        for (m, mode) in opts.modes.iter().enumerate() {
            progress(&format!(
                "run {}/{}: dwcp {mode}, {} of {}",
                rep + 1,
                opts.repeat,
                format_size(size),
                opts.data.name()
            ));
            let r = dwcp_once(&pair, &exe, &keys.key(), opts, mode, size)
                .with_context(|| format!("dwcp run {} ({mode})", rep + 1))?;
            first_secs.get_or_insert(r.seconds);
            if m == 0 {
                first_streams = r.streams;
            }
            dwcp[m].push(r);
        }
        if !iperf3_missing && !opts.no_iperf3 {
            let secs = first_secs.unwrap_or(3.0).ceil().clamp(2.0, 60.0);
            progress(&format!(
                "run {}/{}: iperf3 -P {first_streams} -t {secs}",
                rep + 1,
                opts.repeat
            ));
            match pair.iperf3(first_streams as usize, Duration::from_secs_f64(secs))? {
                Some(r) => iperf.push(r),
                None => iperf3_missing = true,
            }
        }
    }
    let mut rows = Vec::new();
    for (runs, mode) in dwcp.iter().zip(&opts.modes) {
        let mut good: Vec<f64> = runs.iter().map(DwcpRun::goodput_gbps).collect();
        let all = good.clone();
        let mut wire: Vec<f64> = runs.iter().map(DwcpRun::wire_gbps).collect();
        let mut cpu: Vec<f64> = runs.iter().map(|r| r.cpu_s).collect();
        let mut secs: Vec<f64> = runs.iter().map(|r| r.seconds).collect();
        rows.push(Row {
            name: "dwcp",
            streams: runs.iter().map(|r| r.streams).max().unwrap_or(0),
            mode: mode.clone(),
            goodput_gbps: median(&mut good),
            wire_gbps: median(&mut wire),
            cpu_s: Some(median(&mut cpu)),
            seconds: median(&mut secs),
            runs: all,
            bytes: size,
            retransmitted_bytes: runs.iter().map(|r| r.retransmitted_bytes).max(),
            stream_failures: runs.iter().map(|r| r.stream_failures).max(),
            window: runs.first().map(|r| r.window),
        });
    }
    if !iperf.is_empty() {
        let mut good: Vec<f64> = iperf.iter().map(|r| r.gbps()).collect();
        let all = good.clone();
        let mut secs: Vec<f64> = iperf.iter().map(|r| r.seconds).collect();
        let mut bytes: Vec<f64> = iperf.iter().map(|r| r.bytes as f64).collect();
        let g = median(&mut good);
        rows.push(Row {
            name: "iperf3",
            streams: iperf[0].connections as u64,
            mode: "-".into(),
            goodput_gbps: g,
            wire_gbps: g,
            cpu_s: None,
            seconds: median(&mut secs),
            runs: all,
            bytes: median(&mut bytes) as u64,
            retransmitted_bytes: None,
            stream_failures: None,
            window: None,
        });
    }
    Ok(Report {
        rows,
        rate_bps: opts.rate_bps,
        data: opts.data.name(),
        iperf3_missing,
    })
}

impl Report {
    /// One JSON object per row.
    pub fn print_json(&self) {
        for r in &self.rows {
            println!(
                "{}",
                json!({
                    "name": r.name,
                    "streams": r.streams,
                    "rate": self.rate_bps,
                    "data": self.data,
                    "mode": r.mode,
                    "goodput_gbps": r.goodput_gbps,
                    "wire_gbps": r.wire_gbps,
                    "cpu_s": r.cpu_s,
                    "cpu_s_per_gb": r.cpu_s.map(|c| c / (r.bytes as f64 / 1e9)),
                    "utilisation": (self.rate_bps > 0)
                        .then(|| r.wire_gbps * 1e9 / self.rate_bps as f64),
                    "seconds": r.seconds,
                    "bytes": r.bytes,
                    "runs_goodput_gbps": r.runs,
                    "retransmitted_bytes": r.retransmitted_bytes,
                    "stream_failures": r.stream_failures,
                    "window": r.window,
                })
            );
        }
    }

    /// A table of medians, with each dwcp row's ratio to iperf3.
    pub fn print_table(&self) {
        let link = if self.rate_bps > 0 {
            format!("tbf {} Mbit/s", self.rate_bps / 1_000_000)
        } else {
            "unlimited".into()
        };
        println!(
            "dwcp bench transport: {}, veth between two namespaces ({link}); medians of {} run(s)\n",
            self.data,
            self.rows.first().map_or(0, |r| r.runs.len())
        );
        println!(
            "{:<7} {:>7} {:<11} {:>12} {:>10} {:>8} {:>9} {:>9} {:>9}",
            "name",
            "streams",
            "mode",
            "goodput Gb/s",
            "wire Gb/s",
            "secs",
            "CPU s",
            "CPU s/GB",
            "vs iperf3"
        );
        let iperf = self.rows.iter().find(|r| r.name == "iperf3");
        for r in &self.rows {
            let cpu = r.cpu_s.map_or("-".into(), |c| format!("{c:.2}"));
            let per_gb = r
                .cpu_s
                .map_or("-".into(), |c| format!("{:.2}", c / (r.bytes as f64 / 1e9)));
            let ratio = match iperf {
                Some(i) if r.name != "iperf3" && i.goodput_gbps > 0.0 => {
                    format!("{:.3}x", r.goodput_gbps / i.goodput_gbps)
                }
                _ => "-".into(),
            };
            println!(
                "{:<7} {:>7} {:<11} {:>12.3} {:>10.3} {:>8.2} {:>9} {:>9} {:>9}",
                r.name,
                r.streams,
                r.mode,
                r.goodput_gbps,
                r.wire_gbps,
                r.seconds,
                cpu,
                per_gb,
                ratio
            );
        }
        println!();
        if self.rate_bps > 0 {
            for r in self.rows.iter().filter(|r| r.name == "dwcp") {
                println!(
                    "{}: goodput {:.2}x the link rate, link utilisation {:.1}%",
                    r.mode,
                    r.goodput_gbps * 1e9 / self.rate_bps as f64,
                    r.wire_gbps * 1e9 / self.rate_bps as f64 * 100.0
                );
            }
        }
        for r in self
            .rows
            .iter()
            .filter(|r| r.stream_failures.unwrap_or(0) > 0)
        {
            let w = r.window.unwrap_or(0);
            println!(
                "{}: {} stream failure(s); at most {} retransmitted in one run ({:.2} windows of {})",
                r.mode,
                r.stream_failures.unwrap_or(0),
                format_size(r.retransmitted_bytes.unwrap_or(0)),
                r.retransmitted_bytes.unwrap_or(0) as f64 / w.max(1) as f64,
                format_size(w)
            );
        }
        if self.iperf3_missing {
            println!("iperf3 is not installed (apt-get install iperf3): no reference row");
        }
    }
}

/// Options of `dwcp bench-peer recv`.
#[derive(Debug)]
pub struct RecvPeer {
    /// Where to listen; port 0 picks one.
    pub listen: String,
    /// The key file.
    pub key: PathBuf,
    /// Most bytes held in memory.
    pub limit: u64,
    /// Give up after this long.
    pub timeout: Duration,
    /// Engine workers.
    pub workers: Option<usize>,
}

/// `dwcp bench-peer recv`: prints `listening ADDR`, receives one session
/// into memory, verifies each region, and prints a JSON report when the
/// session has ended.
pub fn recv_peer(o: &RecvPeer) -> Result<()> {
    let deadline = Instant::now() + o.timeout;
    let key = Key::load(&o.key)?;
    let engine = engine(o.workers)?;
    let sink = MemorySink::discarding(o.limit);
    // Memory in place before the session, as a VMM's guest RAM would be:
    // first-touch page faults are slow under nested virtualisation (PVM
    // here: ~2 core-seconds per GiB) and are not the transport's cost.
    sink.prefault(o.limit).map_err(|e| anyhow!(e))?;
    let cpu_start = cpu_seconds()?;
    let cfg = ReceiverConfig {
        key: Some(key),
        ..ReceiverConfig::default()
    };
    let recv = Receiver::bind(&engine, resolve(&o.listen)?, cfg, sink.handle())?;
    crate::transfer::log_connection_failures(&recv);
    let mut out = std::io::stdout().lock();
    writeln!(out, "listening {}", recv.local_addr())?;
    out.flush()?;
    let (mut regions, mut bytes) = (0u64, 0u64);
    let mut seen = false;
    loop {
        while let Some(r) = sink.take(Duration::from_millis(20)) {
            regions += 1;
            bytes += r.len;
        }
        let live = recv.sessions();
        seen |= live > 0 || regions > 0;
        if seen && live == 0 {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "no session ended within {:?}",
            o.timeout
        );
    }
    while let Some(r) = sink.take(Duration::ZERO) {
        regions += 1;
        bytes += r.len;
    }
    let m = recv.metrics();
    recv.close()?;
    writeln!(
        out,
        "{}",
        json!({
            "name": "recv",
            "regions": regions,
            "bytes": bytes,
            "failed": sink.failed(),
            "wire_bytes": m.wire_bytes,
            "cpu_s": cpu_seconds()? - cpu_start,
        })
    )?;
    Ok(())
}

/// Options of `dwcp bench-peer send`.
#[derive(Debug)]
pub struct SendPeer {
    /// The receiver.
    pub to: String,
    /// The key file.
    pub key: PathBuf,
    /// What to send.
    pub data: Data,
    /// How much (random, synthetic).
    pub size: u64,
    /// `--streams`.
    pub streams: StreamCount,
    /// `--mode`.
    pub mode: String,
    /// Link rate for `auto`, bit/s (0: unknown).
    pub link_rate: u64,
    /// Cut stream 0 once this many bytes are acknowledged.
    pub kill_stream_at: Option<u64>,
    /// Engine workers.
    pub workers: Option<usize>,
}

/// `dwcp bench-peer send`: makes the data, then times one session that
/// sends it as one region, and prints a JSON report.
pub fn send_peer(o: &SendPeer) -> Result<()> {
    let key = Key::load(&o.key)?;
    let source: Arc<dyn Source> = match &o.data {
        Data::Random => {
            let mut v = vec![0u8; usize::try_from(o.size).context("--size")?];
            Rng::new(0x5eed).fill_bytes(&mut v);
            Arc::new(v)
        }
        Data::Synthetic => {
            let size = usize::try_from(o.size).context("--size")?;
            ensure!(
                size >= dwcp_codec::PAGE_SIZE,
                "--size must be at least one page for synthetic data"
            );
            Arc::new(corpus::generate(size, ClassMix::STANDARD, 1).data)
        }
        Data::File(p) => {
            let f = fs::File::open(p).with_context(|| format!("opening {}", p.display()))?;
            let len = f.metadata()?.len();
            Arc::new(FileSource::new(f, len))
        }
    };
    let engine = engine(o.workers)?;
    let cfg = SenderConfig {
        key: Some(key),
        streams: o.streams,
        policy: policy(&o.mode, o.link_rate)?,
        ..SenderConfig::default()
    };
    let addr = resolve(&o.to)?;
    let cpu_start = cpu_seconds()?;
    let start = Instant::now();
    let sender = Arc::new(Sender::connect(&engine, addr, cfg)?);
    let killer = o.kill_stream_at.map(|at| {
        let s = sender.clone();
        thread::spawn(move || {
            while s.metrics().bytes_acked < at {
                thread::sleep(Duration::from_millis(2));
                if start.elapsed() > Duration::from_secs(600) {
                    return false;
                }
            }
            s.reset_stream(0)
        })
    });
    sender.send_region(Vec::new(), source.clone())?;
    let killed = killer.map(|k| k.join().unwrap_or(false));
    let sender = Arc::into_inner(sender).context("the stream killer still holds the sender")?;
    let window = sender.window();
    let m = sender.close()?;
    let seconds = start.elapsed().as_secs_f64();
    let cpu_s = cpu_seconds()? - cpu_start;
    println!(
        "{}",
        json!({
            "name": "send",
            "bytes": source.len(),
            "wire_bytes": m.wire_bytes,
            "seconds": seconds,
            "streams": m.streams,
            "window": window,
            "retransmitted_bytes": m.retransmitted_bytes,
            "retransmitted_chunks": m.retransmitted_chunks,
            "stream_failures": m.stream_failures,
            "killed_stream": killed,
            "cpu_s": cpu_s,
        })
    );
    Ok(())
}

/// `MemAvailable` of /proc/meminfo in bytes, when it can be read.
fn mem_available() -> Option<u64> {
    let info = fs::read_to_string("/proc/meminfo").ok()?;
    let kib: u64 = info
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))?
        .trim()
        .strip_suffix("kB")?
        .trim()
        .parse()
        .ok()?;
    Some(kib * 1024)
}

fn engine(workers: Option<usize>) -> Result<Engine> {
    let mut b = Engine::builder();
    if let Some(w) = workers {
        b = b.workers(w);
    }
    b.build().context("starting the engine")
}
