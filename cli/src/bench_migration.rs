//! `dwcp bench migration`: the standard workload guest migrated between two
//! network namespaces joined by veth (tbf-limited to `--rate`), as two
//! `dwcp migrate` processes, with the final report per run and medians.
//! With `--vmm PATH`, the C VMM at PATH (ffi/examples/kvm_vmm.c, the same
//! guest driven through libdwcp) migrates on the same link too, its runs
//! alternating with `dwcp migrate`'s, and the two are compared.

use std::path::{Path, PathBuf};
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
    /// Round 0 through stateless encoders (`dwcp migrate
    /// --round0-stateless`).
    pub round0_stateless: bool,
    /// A C VMM (ffi/examples/kvm_vmm) to compare with `dwcp migrate`.
    pub vmm: Option<PathBuf>,
}

/// Which program migrates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Vmm {
    /// `dwcp migrate` (this program).
    Rust,
    /// The C VMM over libdwcp.
    C,
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
    /// CPU seconds of both processes during the migration (source: the
    /// migration call, its guest's vCPU included; destination: from
    /// listening to the guest running); `None` where a side (the C VMM)
    /// does not report it.
    cpu_s: Option<f64>,
}

fn num(v: &Value, k: &str) -> Result<f64> {
    v.get(k)
        .and_then(Value::as_f64)
        .with_context(|| format!("report has no {k}: {v}"))
}

fn once(pair: &LinkPair, vmm: Vmm, exe: &Path, key: &Path, o: &Options) -> Result<Run> {
    let ram = o.ram.to_string();
    let budget = o.deadline + Duration::from_secs(60);
    // The C VMM takes `dwcp migrate`'s flags, `--to` spelled `--migrate-to`.
    let (sub, to): (&[&str], &str) = match vmm {
        Vmm::Rust => (&["migrate"], "--to"),
        Vmm::C => (&[], "--migrate-to"),
    };
    let mut dst = pair.command(Side::B, exe);
    dst.args(sub)
        .arg("--incoming")
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
    src.args(sub)
        .args([to, &addr, "--ram", &ram, "--json"])
        .args(["--dirty", &o.dirty.to_string()])
        .args(["--downtime", &format!("{}ms", o.downtime.as_millis())])
        .args(["--deadline", &format!("{}ms", o.deadline.as_millis())])
        .args(["--mode", &o.mode, "--streams", &o.streams, "--key"])
        .arg(key);
    if o.round0_stateless && vmm == Vmm::Rust {
        src.arg("--round0-stateless");
    }
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
        cpu_s: match (s["cpu_ms"].as_f64(), d["cpu_ms"].as_f64()) {
            (Some(a), Some(b)) => Some((a + b) / 1e3),
            _ => None,
        },
    })
}

/// Runs the benchmark; returns the runs of `dwcp migrate`, and of the C
/// VMM when [`Options::vmm`] names one (alternating with them).
pub fn run(o: &Options, mut progress: impl FnMut(&str)) -> Result<(Vec<Run>, Vec<Run>)> {
    crate::netns::available().map_err(|e| anyhow!("dwcp bench migration: {e}"))?;
    dwcp_migration::kvm::kvm_available()
        .map_err(|e| anyhow!("dwcp bench migration needs KVM: {e}"))?;
    if o.repeat == 0 {
        bail!("--repeat must be at least 1");
    }
    let exe = std::env::current_exe().context("finding this program's path")?;
    let mut vmms = vec![(Vmm::Rust, exe)];
    if let Some(c) = &o.vmm {
        if !c.is_file() {
            bail!(
                "--vmm {}: no such program (build ffi/examples/kvm_vmm.c, see ffi/examples/README.md)",
                c.display()
            );
        }
        vmms.push((Vmm::C, c.clone()));
    }
    let keys = KeyDir::new()?;
    let pair = LinkPair::create(o.rate_bps)?;
    if o.warmup {
        for (vmm, exe) in &vmms {
            progress(&format!("warm-up run of {} (not counted)", name(*vmm)));
            once(&pair, *vmm, exe, &keys.key(), o).context("warm-up run")?;
        }
    }
    let (mut rust, mut c) = (Vec::new(), Vec::new());
    for i in 0..o.repeat {
        for (vmm, exe) in &vmms {
            progress(&format!(
                "run {}/{} of {}: {} guest dirtying {} MiB/s",
                i + 1,
                o.repeat,
                name(*vmm),
                format_size(o.ram),
                o.dirty
            ));
            let r = once(&pair, *vmm, exe, &keys.key(), o)
                .with_context(|| format!("run {} of {}", i + 1, name(*vmm)))?;
            match vmm {
                Vmm::Rust => rust.push(r),
                Vmm::C => c.push(r),
            }
        }
    }
    Ok((rust, c))
}

fn name(vmm: Vmm) -> &'static str {
    match vmm {
        Vmm::Rust => "dwcp migrate",
        Vmm::C => "the C VMM",
    }
}

/// The C VMM's medians against `dwcp migrate`'s: ratios, and whether each
/// is within 10% or 3 ms (whichever is larger) of the Rust path's.
pub fn comparison(rust: &Value, c: &Value) -> Value {
    let get = |v: &Value, k: &str| v[k].as_f64().unwrap_or(f64::NAN);
    let within = |k: &str| {
        let (r, c) = (get(rust, k), get(c, k));
        c <= r + (0.10 * r).max(3.0)
    };
    json!({
        "name": "migration-c-vs-rust",
        "total_ratio": get(c, "total_ms") / get(rust, "total_ms"),
        "downtime_ratio": get(c, "downtime_ms") / get(rust, "downtime_ms"),
        "total_within": within("total_ms"),
        "downtime_within": within("downtime_ms"),
    })
}

/// The median report as one JSON object.
pub fn summary(o: &Options, vmm: Vmm, runs: &[Run]) -> Value {
    let med = |f: &dyn Fn(&Run) -> f64| {
        let mut v: Vec<f64> = runs.iter().map(f).collect();
        median(&mut v)
    };
    json!({
        "name": "migration",
        "vmm": match vmm { Vmm::Rust => "rust", Vmm::C => "c" },
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
        "cpu_s": runs
            .iter()
            .map(|r| r.cpu_s)
            .collect::<Option<Vec<f64>>>()
            .map(|mut v| median(&mut v)),
        "runs_total_ms": runs.iter().map(|r| r.total_ms).collect::<Vec<_>>(),
        "runs_downtime_ms": runs.iter().map(|r| r.downtime_ms).collect::<Vec<_>>(),
    })
}

/// The report as a table.
pub fn print_table(o: &Options, vmm: Vmm, runs: &[Run]) {
    let link = if o.rate_bps == 0 {
        "unlimited veth".to_string()
    } else {
        format!("tbf {} Mbit/s veth", o.rate_bps / 1_000_000)
    };
    println!(
        "dwcp bench migration ({}): {} guest dirtying {} MiB/s, {link}, mode {}",
        name(vmm),
        format_size(o.ram),
        o.dirty,
        o.mode
    );
    println!(
        "\n{:>4} {:>10} {:>12} {:>7} {:>12} {:>12} {:>9} {:>9} {:>10} {:>9} {:>6}",
        "run",
        "total ms",
        "downtime ms",
        "rounds",
        "guest MiB",
        "wire MiB",
        "converged",
        "throttle",
        "dirty MiB/s",
        "verified",
        "cpu s"
    );
    for (i, r) in runs.iter().enumerate() {
        println!(
            "{:>4} {:>10.0} {:>12.1} {:>7} {:>12} {:>12} {:>9} {:>8}% {:>10.1} {:>9} {:>6}",
            i + 1,
            r.total_ms,
            r.downtime_ms,
            r.rounds,
            r.guest_bytes >> 20,
            r.wire_bytes >> 20,
            r.converged,
            r.throttled,
            r.guest_dirty_mibps,
            r.verified,
            r.cpu_s.map_or("-".into(), |c| format!("{c:.2}"))
        );
    }
    let s = summary(o, vmm, runs);
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
