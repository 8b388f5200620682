//! `dwcp migrate`: live migration of the KVM test guest between two
//! processes (`--incoming ADDR` on the destination, `--to ADDR` on the
//! source).
//!
//! Ctrl-C on the source cancels the migration (its guest runs on) unless
//! the guest was already handed over; on the destination it discards the
//! migration unless its guest was already started. Either side exits
//! non-zero when the migration did not complete, saying why. A second
//! Ctrl-C kills the process the usual way.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use dwcp_codec::Policy;
use dwcp_engine::Engine;
use dwcp_migration::controller::ControllerConfig;
use dwcp_migration::kvm::{GuestConfig, KvmGuest, kvm_available};
use dwcp_migration::precopy::{
    Incoming, MigrateConfig, MigrationError, memory_digest, migrate_out,
};
use dwcp_transport::{Key, Receiver, ReceiverConfig, Sender, SenderConfig, StreamCount};
use serde_json::json;

use crate::proc::cpu_seconds;
use crate::transfer::resolve;

/// How long a stream of the source's session may go unanswered before it
/// counts as failed (the transport's default is 10 s).
const STALL_TIMEOUT: Duration = Duration::from_secs(2);
/// How long the source tries to get a broken session back before it gives
/// the migration up and its guest runs on (the default is 30 s).
const RESUME_FOR: Duration = Duration::from_secs(3);
/// Connecting to the destination, per attempt.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the destination keeps a session whose connections all failed
/// (the default is 30 s): longer than the source's [`RESUME_FOR`].
const GRACE: Duration = Duration::from_secs(10);

/// Set by the SIGINT handler.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigint(_: libc::c_int) {
    // An atomic store is async-signal-safe.
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Catches the first SIGINT (Ctrl-C) into [`INTERRUPTED`] while it lives;
/// the handler resets itself, so a second one kills the process.
struct CatchSigint {
    old: libc::sigaction,
}

impl CatchSigint {
    fn install() -> Result<CatchSigint> {
        INTERRUPTED.store(false, Ordering::SeqCst);
        // SAFETY: `sigaction` is plain old data, for which all zeroes is a
        // valid value (no handler, empty mask, no flags).
        let mut act: libc::sigaction = unsafe { std::mem::zeroed() };
        act.sa_sigaction = on_sigint as extern "C" fn(libc::c_int) as libc::sighandler_t;
        act.sa_flags = libc::SA_RESTART | libc::SA_RESETHAND;
        // SAFETY: as above.
        let mut old: libc::sigaction = unsafe { std::mem::zeroed() };
        // SAFETY: `act` and `old` are valid sigaction values that outlive
        // the call; `sa_mask` was emptied by zeroing and is emptied again
        // here with its own call; the handler only stores to an atomic.
        let rc = unsafe {
            libc::sigemptyset(&mut act.sa_mask);
            libc::sigaction(libc::SIGINT, &act, &mut old)
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error()).context("installing a SIGINT handler");
        }
        Ok(CatchSigint { old })
    }

    fn interrupted(&self) -> bool {
        INTERRUPTED.load(Ordering::SeqCst)
    }
}

impl Drop for CatchSigint {
    fn drop(&mut self) {
        // SAFETY: restores the action saved by `install`, a valid value;
        // a null old-action pointer is allowed.
        unsafe {
            libc::sigaction(libc::SIGINT, &self.old, std::ptr::null_mut());
        }
    }
}

/// Options of `dwcp migrate`.
#[derive(Debug, Clone)]
pub struct MigrateOptions {
    /// Source: the destination's address.
    pub to: Option<String>,
    /// Destination: the address to listen on.
    pub incoming: Option<String>,
    /// `None` without authentication.
    pub key: Option<Key>,
    /// Guest RAM in bytes.
    pub ram: u64,
    /// Guest dirty rate, MiB/s.
    pub dirty: u32,
    /// Downtime limit.
    pub downtime: Duration,
    /// Give up after this long (source).
    pub deadline: Duration,
    /// Data streams.
    pub streams: StreamCount,
    /// Page codec policy: datacenter, internet, auto or none.
    pub mode: String,
    /// Rate limit in bits per second, 0 for none.
    pub rate_limit_bps: u64,
    /// How long the destination runs the guest after it arrives.
    pub run_after: Duration,
    /// Destination: allocate all guest RAM ([`KvmGuest::preallocate`])
    /// and the page codec's state ([`Incoming::preallocate_state`])
    /// before listening.
    pub prealloc: bool,
    /// Source: round 0 through stateless encoders (not
    /// [`MigrateConfig::round0_codec_state`]).
    pub round0_stateless: bool,
    /// Machine output.
    pub json: bool,
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Runs one side.
pub fn run(o: &MigrateOptions) -> Result<()> {
    kvm_available().map_err(|why| anyhow!("dwcp migrate needs KVM: {why}"))?;
    let ram = usize::try_from(o.ram).context("--ram")?;
    let guest = GuestConfig {
        ram,
        dirty_mibps: o.dirty,
        seed: 1,
    };
    match (&o.to, &o.incoming) {
        (Some(to), None) => source(o, guest, to),
        (None, Some(listen)) => destination(o, guest, listen),
        _ => bail!("give exactly one of --to ADDR (source) or --incoming ADDR (destination)"),
    }
}

fn page_policy(mode: &str, rate_bps: u64) -> Result<Policy> {
    Ok(match mode {
        "none" => Policy::Stored,
        "datacenter" => Policy::Datacenter,
        "internet" => Policy::internet(),
        // A migration replaces this link figure with its share of what
        // the transport measures, and uses LZ4 until it has measured.
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

fn source(o: &MigrateOptions, guest: GuestConfig, to: &str) -> Result<()> {
    let addr = resolve(to)?;
    let policy = page_policy(&o.mode, o.rate_limit_bps)?;
    let mut src = KvmGuest::source(guest).map_err(|e| anyhow!("{e}"))?;
    eprintln!(
        "source guest: {} MiB of RAM, dirtying {} MiB/s; migrating to {addr}",
        o.ram >> 20,
        o.dirty
    );
    let engine = Engine::builder().build().context("starting the engine")?;
    let sender = Sender::connect(
        &engine,
        addr,
        SenderConfig {
            key: o.key.clone(),
            streams: o.streams,
            // Pages are compressed by the page codec; the transport only
            // frames and checks them.
            policy: Policy::Stored,
            rate_limit: o.rate_limit_bps / 8,
            // A migration holds a paused or throttled guest: a destination
            // that is gone should cost seconds, not the transport's
            // patient defaults.
            connect_timeout: CONNECT_TIMEOUT,
            stall_timeout: STALL_TIMEOUT,
            resume_for: RESUME_FOR,
            ..SenderConfig::default()
        },
    )
    .with_context(|| format!("opening a session to {addr}"))?;
    let cfg = MigrateConfig {
        controller: ControllerConfig {
            downtime_limit: o.downtime,
            deadline: Some(o.deadline),
            ..ControllerConfig::default()
        },
        policy,
        round0_codec_state: !o.round0_stateless,
        ..MigrateConfig::default()
    };
    let json = o.json;
    let counter0 = src.counter();
    let sigint = CatchSigint::install()?;
    let finished = AtomicBool::new(false);
    let cpu0 = cpu_seconds()?;
    let result = std::thread::scope(|scope| {
        // Ctrl-C cancels the migration.
        let token = cfg.cancel.clone();
        let (sigint, finished) = (&sigint, &finished);
        scope.spawn(move || {
            while !finished.load(Ordering::Acquire) {
                if sigint.interrupted() {
                    eprintln!("interrupted: cancelling the migration");
                    token.cancel();
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        let r = migrate_out(&mut src, &sender, &cfg, |m| {
            if !json {
                eprintln!("{m}");
            }
        });
        finished.store(true, Ordering::Release);
        // CPU of all threads, the guest's vCPU thread included.
        r.map(|r| (r, cpu_seconds().unwrap_or(cpu0) - cpu0))
    });
    drop(sigint);
    match result {
        Ok((r, cpu)) => {
            if cfg.cancel.is_cancelled() {
                eprintln!("interrupted too late: the guest had been handed over already");
            }
            let _ = sender.close();
            let s = &r.summary;
            // Paused for good: this is the memory at the pause, hashed as
            // the destination hashed what it received.
            let digest = memory_digest(&[src.region()]).map_err(|e| anyhow!("{e}"))?;
            let writes = src.counter().saturating_sub(counter0);
            let dirty_mibps = writes as f64 / 256.0 / r.total.as_secs_f64().max(1e-9);
            if json {
                println!(
                    "{}",
                    json!({
                        "name": "migrate",
                        "result": "ok",
                        "total_ms": r.total.as_secs_f64() * 1e3,
                        "downtime_ms": r.downtime.as_secs_f64() * 1e3,
                        "rounds": r.rounds.len(),
                        "guest_bytes": s.bytes_sent,
                        "wire_bytes": r.wire_bytes,
                        "converged": s.converged,
                        "throttled": s.max_throttle,
                        "counter_at_pause": src.counter(),
                        "guest_dirty_mibps": dirty_mibps,
                        "cpu_ms": cpu * 1e3,
                        "memory_digest": hex(&digest),
                    })
                );
            } else {
                println!(
                    "migrated: {} rounds, total {:.1} ms, downtime {:.1} ms, {} MiB of guest pages in {} MiB on the wire, max throttle {}%; the guest counter stopped here at {}",
                    r.rounds.len(),
                    r.total.as_secs_f64() * 1e3,
                    r.downtime.as_secs_f64() * 1e3,
                    s.bytes_sent >> 20,
                    r.wire_bytes >> 20,
                    s.max_throttle,
                    src.counter()
                );
            }
            Ok(())
        }
        Err(e) => {
            sender.cancel();
            let before = src.counter();
            std::thread::sleep(Duration::from_millis(200));
            let after = src.counter();
            let cancelled = matches!(e, MigrationError::Cancelled(_));
            let unknown = matches!(e, MigrationError::OutcomeUnknown(_));
            if json {
                println!(
                    "{}",
                    json!({
                        "name": "migrate",
                        "result": if unknown { "unknown" } else if cancelled { "cancelled" } else { "failed" },
                        "error": e.to_string(),
                        "interrupted": cfg.cancel.is_cancelled(),
                        "source_runs": after > before || o.dirty == 0,
                        "counter_before": before,
                        "counter_after": after,
                    })
                );
            }
            if unknown {
                // This process holds the only other copy: keep it paused
                // until the operator has asked the destination.
                eprintln!(
                    "{e}. Check the destination: if its guest runs, this one must not. Ctrl-C discards this (paused) guest."
                );
                let sigint = CatchSigint::install()?;
                while !sigint.interrupted() {
                    std::thread::sleep(Duration::from_millis(100));
                }
                bail!("{e}; the paused source guest was discarded on request");
            }
            bail!("{e}; the source guest runs on (counter {before} -> {after})")
        }
    }
}

fn destination(o: &MigrateOptions, guest: GuestConfig, listen: &str) -> Result<()> {
    let addr = resolve(listen)?;
    let dst = KvmGuest::destination(guest).map_err(|e| anyhow!("{e}"))?;
    if o.prealloc {
        match dst.preallocate().map_err(|e| anyhow!("{e}"))? {
            Some(t) if !o.json => eprintln!(
                "destination: allocated {} MiB of guest RAM in {:.0} ms",
                o.ram >> 20,
                t.as_secs_f64() * 1e3
            ),
            Some(_) => {}
            None => eprintln!(
                "destination: this kernel cannot allocate memory in advance (MADV_POPULATE_WRITE); pages are allocated as they arrive"
            ),
        }
    }
    let dst = Arc::new(Mutex::new(dst));
    let incoming = Incoming::new(Box::new(dst.clone()), 2 << 30);
    if o.prealloc {
        // The page decoders' state too, for the same reason.
        let (bytes, t) = incoming.preallocate_state(&MigrateConfig::default(), o.ram);
        if !o.json {
            eprintln!(
                "destination: allocated {} MiB of codec state in {:.0} ms",
                bytes >> 20,
                t.as_secs_f64() * 1e3
            );
        }
    }
    let engine = Engine::builder().build().context("starting the engine")?;
    let recv = Receiver::bind(
        &engine,
        addr,
        ReceiverConfig {
            key: o.key.clone(),
            grace: GRACE,
            ..ReceiverConfig::default()
        },
        incoming.sink(),
    )
    .with_context(|| format!("listening on {addr}"))?;
    crate::transfer::log_connection_failures(&recv);
    eprintln!(
        "destination: {} MiB guest waiting; listening on {}",
        o.ram >> 20,
        recv.local_addr()
    );
    if o.json {
        // For tools that start the source once the destination listens.
        println!(
            "{}",
            json!({"name": "listening", "addr": recv.local_addr().to_string()})
        );
    }
    let waited = Instant::now();
    let cpu0 = cpu_seconds()?;
    let sigint = CatchSigint::install()?;
    let outcome = loop {
        if let Some(r) = incoming.wait_receiving(&recv, Duration::from_millis(100)) {
            break r;
        }
        if sigint.interrupted() {
            // Refused once the guest is being started: then it runs here.
            incoming.abandon("interrupted (Ctrl-C) before the guest started here");
        } else if waited.elapsed() > o.deadline + Duration::from_secs(60) {
            incoming.abandon(format!(
                "no migration completed within {:?}",
                o.deadline + Duration::from_secs(60)
            ));
        }
    };
    drop(sigint);
    let cpu = cpu_seconds().unwrap_or(cpu0) - cpu0;
    let report = match outcome {
        Ok(r) => r,
        Err(e) => {
            if o.json {
                println!(
                    "{}",
                    json!({"name": "incoming", "result": "discarded", "error": e})
                );
            }
            bail!("the migration was discarded, no guest was started here: {e}")
        }
    };
    // The guest's writes, and its budget requests (which go on at any
    // dirty rate, 0 included): either growing shows it runs.
    let progress = || {
        let g = dst.lock().unwrap_or_else(|p| p.into_inner());
        (g.counter(), g.ticks())
    };
    let (first, ticks0) = progress();
    std::thread::sleep(o.run_after);
    let (later, ticks1) = progress();
    if o.json {
        println!(
            "{}",
            json!({
                "name": "incoming",
                "result": "ok",
                "pages": report.pages,
                "batches": report.batches,
                "finish_ms": report.finish.as_secs_f64() * 1e3,
                "cpu_ms": cpu * 1e3,
                "counter_at_start": first,
                "counter_after": later,
                "ticks_at_start": ticks0,
                "ticks_after": ticks1,
                "memory_digest": hex(&report.memory_digest),
            })
        );
    } else {
        println!(
            "guest arrived ({} pages in {} batches) and runs here: counter {first} -> {later}, ticks {ticks0} -> {ticks1} over {:?}",
            report.pages, report.batches, o.run_after
        );
    }
    if later <= first && ticks1 <= ticks0 {
        bail!("the guest does not run on after the migration");
    }
    let _ = recv.close();
    Ok(())
}
