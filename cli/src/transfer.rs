//! `dwcp keygen`, `dwcp serve` and `dwcp send`: files and directory trees
//! over an AMST session.

use std::collections::VecDeque;
use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use dwcp_codec::Policy;
use dwcp_engine::Engine;
use dwcp_transport::files::{self, DirSink};
use dwcp_transport::{Key, Receiver, ReceiverConfig, Sender, SenderConfig, Source, StreamCount};
use serde_json::json;

use crate::units::{format_size, parse_rate};

/// Files whose digest is computed and whose `DONE` is awaited at once.
const FILES_IN_FLIGHT: usize = 64;

/// The key from `--key FILE`, or none with `--insecure-no-auth`; one of
/// the two is required.
pub fn key_from(key: Option<&Path>, insecure: bool) -> Result<Option<Key>> {
    match (key, insecure) {
        (Some(_), true) => bail!("--key and --insecure-no-auth exclude each other"),
        (Some(p), false) => Ok(Some(Key::load(p)?)),
        (None, true) => Ok(None),
        (None, false) => bail!(
            "a session needs a key: pass --key FILE (make one with `dwcp keygen FILE`), \
             or --insecure-no-auth on both sides"
        ),
    }
}

/// `dwcp keygen FILE`.
pub fn keygen(path: &Path) -> Result<()> {
    Key::write_new(path)?;
    eprintln!("wrote a new key to {} (mode 0600)", path.display());
    Ok(())
}

/// Resolves `ADDR` (`host:port`).
pub fn resolve(addr: &str) -> Result<SocketAddr> {
    Ok(dwcp_transport::resolve(addr)?)
}

fn report(path: &Path, len: u64, r: Result<(), &str>) {
    match r {
        Ok(()) => eprintln!("received {} ({})", path.display(), format_size(len)),
        Err(e) => eprintln!("refused {}: {e}", path.display()),
    }
}

/// Prints on standard error what the receiver refused or lost (a wrong
/// key, a protocol error), which the library only reports as events.
pub fn log_connection_failures(recv: &Receiver) {
    recv.on_event(|e| match e {
        dwcp_transport::Event::ConnectionFailed { peer, reason } => {
            eprintln!("dwcp: connection from {peer}: {reason}");
        }
        dwcp_transport::Event::AcceptFailed { reason } => {
            eprintln!("dwcp: accept failed: {reason}");
        }
        _ => {}
    });
}

/// `dwcp serve`: receives into `dir` until killed.
pub fn serve(listen: &str, dir: &Path, key: Option<Key>, workers: Option<usize>) -> Result<()> {
    let addr = resolve(listen)?;
    let sink = DirSink::new(dir)
        .with_context(|| format!("target directory {}", dir.display()))?
        .with_report(std::sync::Arc::new(report));
    let mut b = Engine::builder();
    if let Some(w) = workers {
        b = b.workers(w);
    }
    let engine = b.build().context("starting the engine")?;
    let cfg = ReceiverConfig {
        key,
        ..ReceiverConfig::default()
    };
    let insecure = cfg.key.is_none();
    let recv = Receiver::bind(&engine, addr, cfg, Arc::new(sink))?;
    log_connection_failures(&recv);
    eprintln!(
        "dwcp serve: listening on {} into {}{}",
        recv.local_addr(),
        dir.display(),
        if insecure {
            " (WITHOUT authentication: --insecure-no-auth)"
        } else {
            ""
        }
    );
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// Options of `dwcp send`.
#[derive(Debug, Clone)]
pub struct SendOptions {
    /// Files and directories; `-` alone: standard input.
    pub paths: Vec<PathBuf>,
    /// The file name standard input is stored under.
    pub stdin_name: String,
    /// Receiver.
    pub to: String,
    /// `None` without authentication.
    pub key: Option<Key>,
    /// Streams.
    pub streams: StreamCount,
    /// `datacenter`, `internet`, `auto` or `none`.
    pub mode: String,
    /// `--rate-limit` in bits per second, 0 for none.
    pub rate_limit_bps: u64,
    /// Machine output.
    pub json: bool,
    /// Engine workers.
    pub workers: Option<usize>,
}

/// Parses `--streams N|auto`.
pub fn parse_streams(s: &str) -> Result<StreamCount, String> {
    if s == "auto" {
        return Ok(StreamCount::Auto { max: 64 });
    }
    match s.parse::<u16>() {
        Ok(n) if (1..=64).contains(&n) => Ok(StreamCount::Fixed(n)),
        _ => Err(format!("streams {s:?}: a number 1..=64 or auto")),
    }
}

/// The codec policy of `--mode`, for a link of `rate_bps` (0: unknown).
pub fn policy(mode: &str, rate_bps: u64) -> Result<Policy> {
    Ok(match mode {
        "datacenter" => Policy::Datacenter,
        "internet" => Policy::internet(),
        "none" => Policy::Stored,
        "auto" => Policy::Auto {
            link_bytes_per_sec: if rate_bps > 0 {
                rate_bps as f64 / 8.0
            } else {
                1.25e9
            },
        },
        other => bail!("--mode {other:?}: datacenter, internet, auto or none"),
    })
}

/// `dwcp send`.
pub fn send(o: &SendOptions) -> Result<()> {
    let addr = resolve(&o.to)?;
    let stdin = o.paths.iter().any(|p| p.as_os_str() == "-");
    if stdin && o.paths.len() > 1 {
        bail!("`-` (standard input) cannot be sent together with other paths");
    }
    let (list, skipped) = if stdin {
        (Vec::new(), Vec::new())
    } else {
        files::walk(&o.paths)?
    };
    for s in &skipped {
        eprintln!("skipping {} (not a regular file or directory)", s.display());
    }
    let total: u64 = list.iter().map(|f| f.len).sum();
    let mut b = Engine::builder();
    if let Some(w) = o.workers {
        b = b.workers(w);
    }
    let engine = b.build().context("starting the engine")?;
    let cfg = SenderConfig {
        key: o.key.clone(),
        streams: o.streams,
        policy: policy(&o.mode, o.rate_limit_bps)?,
        rate_limit: o.rate_limit_bps / 8,
        ..SenderConfig::default()
    };
    let start = Instant::now();
    let sender = Sender::connect(&engine, addr, cfg)
        .with_context(|| format!("opening a session to {addr}"))?;
    if let Some(e) = sender.congestion_error() {
        eprintln!("note: {e}; using the system's congestion control");
    }
    let show = !o.json && std::io::stderr().is_terminal();
    let mut waiting: VecDeque<(u32, &files::FileToSend)> = VecDeque::new();
    let mut last_draw = Instant::now();
    let mut draw = |sender: &Sender, force: bool| {
        if show && (force || last_draw.elapsed() > Duration::from_millis(200)) {
            last_draw = Instant::now();
            let m = sender.metrics();
            let secs = start.elapsed().as_secs_f64().max(1e-3);
            let rate = m.bytes_acked as f64 / secs;
            let eta = if rate > 0.0 {
                format!("{:.0}s", total.saturating_sub(m.bytes_acked) as f64 / rate)
            } else {
                "-".into()
            };
            eprint!(
                "\r{} / {}  {:.3} Gbit/s  ratio {:.2}  {} streams  ETA {eta}   ",
                format_size(m.bytes_acked),
                format_size(total),
                rate * 8.0 / 1e9,
                m.ratio(),
                m.streams
            );
            let _ = std::io::stderr().flush();
        }
    };
    let mut total = total;
    if stdin {
        let meta = files::FileMeta {
            path: o.stdin_name.clone(),
            mode: 0o644,
            mtime_s: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as i64),
            mtime_ns: 0,
        };
        files::safe_relative(&meta.path)
            .map_err(|e| anyhow::anyhow!("--name {:?}: {e}", meta.path))?;
        if show {
            // The bar follows the acknowledgements as they come.
            let last = std::sync::Mutex::new(Instant::now());
            sender.on_event(move |e| {
                if let dwcp_transport::Event::Progress { done, .. } = e {
                    let mut l = last.lock().unwrap_or_else(|p| p.into_inner());
                    if l.elapsed() > Duration::from_millis(200) {
                        *l = Instant::now();
                        let secs = start.elapsed().as_secs_f64().max(1e-3);
                        eprint!(
                            "\r{} from standard input  {:.3} Gbit/s   ",
                            format_size(*done),
                            *done as f64 * 8.0 / 1e9 / secs
                        );
                        let _ = std::io::stderr().flush();
                    }
                }
            });
        }
        total = sender
            .send_stream(meta.encode(), &mut std::io::stdin().lock())
            .context("sending standard input")?;
    }
    for f in &list {
        let src: Arc<dyn Source> = Arc::new(
            f.source()
                .with_context(|| format!("opening {}", f.path.display()))?,
        );
        let id = sender.open_region(f.meta.encode(), src.clone())?;
        let digest = dwcp_transport::digest(src.as_ref())
            .with_context(|| format!("reading {}", f.path.display()))?;
        sender.close_region(id, digest)?;
        waiting.push_back((id, f));
        draw(&sender, false);
        while waiting.len() >= FILES_IN_FLIGHT {
            let (id, f) = waiting.pop_front().expect("not empty");
            sender
                .wait_region(id)
                .with_context(|| format!("sending {}", f.path.display()))?;
            draw(&sender, false);
        }
    }
    while let Some((id, f)) = waiting.pop_front() {
        // Draw while waiting on a big file.
        sender
            .wait_region(id)
            .with_context(|| format!("sending {}", f.path.display()))?;
        draw(&sender, true);
    }
    let m = sender.close()?;
    let secs = start.elapsed().as_secs_f64();
    if show {
        eprintln!();
    }
    let goodput = total as f64 * 8.0 / 1e9 / secs.max(1e-9);
    if o.json {
        println!(
            "{}",
            json!({
                "name": "send",
                "files": list.len() + usize::from(stdin),
                "bytes": total,
                "wire_bytes": m.wire_bytes,
                "ratio": m.ratio(),
                "seconds": secs,
                "goodput_gbps": goodput,
                "wire_gbps": m.wire_bytes as f64 * 8.0 / 1e9 / secs.max(1e-9),
                "streams": m.streams,
                "retransmitted_chunks": m.retransmitted_chunks,
                "retransmitted_bytes": m.retransmitted_bytes,
                "stream_failures": m.stream_failures,
                "mode": o.mode,
            })
        );
    } else {
        println!(
            "sent {} file(s), {} in {:.2}s: {:.3} Gbit/s goodput, {} on the wire (ratio {:.2}), {} retransmitted chunk(s)",
            list.len() + usize::from(stdin),
            format_size(total),
            secs,
            goodput,
            format_size(m.wire_bytes),
            m.ratio(),
            m.retransmitted_chunks
        );
    }
    Ok(())
}

/// Parses `--rate-limit`.
pub fn parse_rate_limit(s: &str) -> Result<u64, String> {
    parse_rate(s).map_err(|e| e.to_string())
}
