//! `dwcp bench migration`: the standard workload guest migrated between two
//! network namespaces joined by veth (tbf-limited to `--rate`), as two
//! `dwcp migrate` processes, with the final report per run and medians.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use serde_json::{Value, json};

use crate::bench_transport::{KeyDir, Peer, median};
use crate::netns::{LinkPair, Side};
use crate::units::format_size;

/// Options of `dwcp bench migration`.
#[derive(Debug, Clone)]
pub struct Options {
    /// Guest RAM.
    pub ram: u64,
    /// Guest dirty rate, MiB/s.
    pub dirty: u32,
    /// tbf rate in bit/s; 0 for unlimited.
    pub rate_bps: u64,
    /// Downtime limit.
    pub downtime: Duration,
    /// Give up after this long.
    pub deadline: Duration,
    /// Page codec policy.
    pub mode: String,
    /// Data streams.
    pub streams: String,
    /// Timed runs.
    pub repeat: usize,
    /// An untimed run first (warms page caches and the first-touch cost of
    /// fresh memory, see the note on this machine).
    pub warmup: bool,
}

/// One run's figures.
#[derive(Debug, Clone)]
pub struct Run {
    total_ms: f64,
    downtime_ms: f64,
    rounds: u64,
    guest_bytes: u64,
    wire_bytes: u64,
    converged: bool,
    throttled: u64,
    guest_dirty_mibps: f64,
    verified: bool,
}

fn num(v: &Value, k: &str) -> Result<f64> {
    v.get(k)
        .and_then(Value::as_f64)
        .with_context(|| format!("report has no {k}: {v}"))
}

fn once(pair: &LinkPair, exe: &Path, key: &Path, o: &Options) -> Result<Run> {
    let ram = o.ram.to_string();
    let budget = o.deadline + Duration::from_secs(60);
    let mut dst = pair.command(Side::B, exe);
    dst.args(["migrate", "--incoming"])
        .arg(format!("{}:0", pair.addr(Side::B)))
        .args(["--ram", &ram, "--json", "--run-after", "300ms", "--key"])
        .arg(key);
    let dst = Peer::spawn(dst, "destination")?;
    let listening = dst
        .lines
        .recv_timeout(Duration::from_secs(30))
        .map_err(|_| anyhow!("the destination did not start listening within 30 s"))?;
    let v: Value = serde_json::from_str(&listening)
        .with_context(|| format!("the destination said {listening:?}"))?;
    let addr = v["addr"]
        .as_str()
        .with_context(|| format!("the destination said {listening:?}"))?
        .to_owned();
    let mut src: Command = pair.command(Side::A, exe);
    src.args(["migrate", "--to", &addr, "--ram", &ram, "--json"])
        .args(["--dirty", &o.dirty.to_string()])
        .args(["--downtime", &format!("{}ms", o.downtime.as_millis())])
        .args(["--deadline", &format!("{}ms", o.deadline.as_millis())])
        .args(["--mode", &o.mode, "--streams", &o.streams, "--key"])
        .arg(key);
    let src = Peer::spawn(src, "source")?;
    let deadline = Instant::now() + budget;
    let s = src.finish(deadline, "source");
    let s = match s {
        Ok(s) => s,
        Err(e) => {
            drop(dst);
            return Err(e);
        }
    };
    let d = dst.finish(Instant::now() + Duration::from_secs(30), "destination")?;
    let digest = |v: &Value| v["memory_digest"].as_str().map(str::to_owned);
    Ok(Run {
        total_ms: num(&s, "total_ms")?,
        downtime_ms: num(&s, "downtime_ms")?,
        rounds: num(&s, "rounds")? as u64,
        guest_bytes: num(&s, "guest_bytes")? as u64,
        wire_bytes: num(&s, "wire_bytes")? as u64,
        converged: s["converged"].as_bool().unwrap_or(false),
        throttled: num(&s, "throttled")? as u64,
        guest_dirty_mibps: num(&s, "guest_dirty_mibps")?,
        verified: digest(&s).is_some() && digest(&s) == digest(&d),
    })
}

/// Runs the benchmark; returns the runs.
pub fn run(o: &Options, mut progress: impl FnMut(&str)) -> Result<Vec<Run>> {
    crate::netns::available().map_err(|e| anyhow!("dwcp bench migration: {e}"))?;
    dwcp_migration::kvm::kvm_available()
        .map_err(|e| anyhow!("dwcp bench migration needs KVM: {e}"))?;
    if o.repeat == 0 {
        bail!("--repeat must be at least 1");
    }
    let exe = std::env::current_exe().context("finding this program's path")?;
    let keys = KeyDir::new()?;
    let pair = LinkPair::create(o.rate_bps)?;
    if o.warmup {
        progress("warm-up run (not counted)");
        once(&pair, &exe, &keys.key(), o).context("warm-up run")?;
    }
    let mut runs = Vec::new();
    for i in 0..o.repeat {
        progress(&format!(
            "run {}/{}: {} guest dirtying {} MiB/s",
            i + 1,
            o.repeat,
            format_size(o.ram),
            o.dirty
        ));
        runs.push(once(&pair, &exe, &keys.key(), o).with_context(|| format!("run {}", i + 1))?);
    }
    Ok(runs)
}

/// The median report as one JSON object.
pub fn summary(o: &Options, runs: &[Run]) -> Value {
    let med = |f: &dyn Fn(&Run) -> f64| {
        let mut v: Vec<f64> = runs.iter().map(f).collect();
        median(&mut v)
    };
    json!({
        "name": "migration",
        "ram": o.ram,
        "dirty_mibps": o.dirty,
        "rate": o.rate_bps,
        "mode": o.mode,
        "runs": runs.len(),
        "total_ms": med(&|r| r.total_ms),
        "downtime_ms": med(&|r| r.downtime_ms),
        "rounds": med(&|r| r.rounds as f64),
        "guest_bytes": med(&|r| r.guest_bytes as f64) as u64,
        "wire_bytes": med(&|r| r.wire_bytes as f64) as u64,
        "converged": runs.iter().all(|r| r.converged),
        "throttled": runs.iter().map(|r| r.throttled).max().unwrap_or(0),
        "guest_dirty_mibps": med(&|r| r.guest_dirty_mibps),
        "verified": runs.iter().all(|r| r.verified),
        "runs_total_ms": runs.iter().map(|r| r.total_ms).collect::<Vec<_>>(),
        "runs_downtime_ms": runs.iter().map(|r| r.downtime_ms).collect::<Vec<_>>(),
    })
}

/// The report as a table.
pub fn print_table(o: &Options, runs: &[Run]) {
    let link = if o.rate_bps == 0 {
        "unlimited veth".to_string()
    } else {
        format!("tbf {} Mbit/s veth", o.rate_bps / 1_000_000)
    };
    println!(
        "dwcp bench migration: {} guest dirtying {} MiB/s, {link}, mode {}",
        format_size(o.ram),
        o.dirty,
        o.mode
    );
    println!(
        "\n{:>4} {:>10} {:>12} {:>7} {:>12} {:>12} {:>9} {:>9} {:>10} {:>9}",
        "run",
        "total ms",
        "downtime ms",
        "rounds",
        "guest MiB",
        "wire MiB",
        "converged",
        "throttle",
        "dirty MiB/s",
        "verified"
    );
    for (i, r) in runs.iter().enumerate() {
        println!(
            "{:>4} {:>10.0} {:>12.1} {:>7} {:>12} {:>12} {:>9} {:>8}% {:>10.1} {:>9}",
            i + 1,
            r.total_ms,
            r.downtime_ms,
            r.rounds,
            r.guest_bytes >> 20,
            r.wire_bytes >> 20,
            r.converged,
            r.throttled,
            r.guest_dirty_mibps,
            r.verified
        );
    }
    let s = summary(o, runs);
    println!(
        "\nmedian of {}: total {:.0} ms, downtime {:.1} ms, guest dirtied {:.1} MiB/s; converged {}; verified {}",
        runs.len(),
        s["total_ms"].as_f64().unwrap_or(0.0),
        s["downtime_ms"].as_f64().unwrap_or(0.0),
        s["guest_dirty_mibps"].as_f64().unwrap_or(0.0),
        s["converged"],
        s["verified"]
    );
}
