//! `dwcp demo`: a live migration on this machine. A guest dirtying memory
//! is moved between two guests of this process over an AMST session on
//! loopback, with a fresh key; progress per round, the final report, and a
//! check that the destination's memory equals the source's at the pause.
//! Uses the KVM test guest where `/dev/kvm` works, otherwise the in-process
//! synthetic guest (and says so).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use dwcp_engine::Engine;
use dwcp_migration::hv::{DestHypervisor, GuestRegion, SourceHypervisor};
use dwcp_migration::kvm::{GuestConfig, KvmGuest, kvm_available};
use dwcp_migration::precopy::{Incoming, MigrateConfig, memory_digest, migrate_out};
use dwcp_migration::synthetic::SyntheticGuest;
use dwcp_transport::{Key, Receiver, ReceiverConfig, Sender, SenderConfig, StreamCount};
use serde_json::json;

/// Options of the migration demo.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Guest RAM.
    pub ram: usize,
    /// Dirty rate, MiB/s.
    pub dirty: u32,
    /// Machine output.
    pub json: bool,
    /// Use the synthetic guest even where KVM works.
    pub synthetic: bool,
}

/// A guest whose progress can be read.
trait Guest: SourceHypervisor + DestHypervisor + 'static {
    fn count(&self) -> u64;
    fn memory(&self) -> GuestRegion;
}

impl Guest for KvmGuest {
    fn count(&self) -> u64 {
        self.counter()
    }
    fn memory(&self) -> GuestRegion {
        self.region()
    }
}

impl Guest for SyntheticGuest {
    fn count(&self) -> u64 {
        self.counter()
    }
    fn memory(&self) -> GuestRegion {
        self.region()
    }
}

/// Runs the demo.
pub fn run(o: &DemoOptions) -> Result<()> {
    let kvm = if o.synthetic {
        Err("--synthetic was given".to_string())
    } else {
        kvm_available()
    };
    match kvm {
        Ok(()) => {
            let cfg = GuestConfig {
                ram: o.ram,
                dirty_mibps: o.dirty,
                seed: 1,
            };
            if !o.json {
                println!(
                    "dwcp demo: live migration of a KVM guest ({} MiB of RAM, dirtying {} MiB/s) between two guests of this process over loopback",
                    o.ram >> 20,
                    o.dirty
                );
            }
            let src = KvmGuest::source(cfg.clone()).map_err(|e| anyhow!("{e}"))?;
            let dst = KvmGuest::destination(cfg).map_err(|e| anyhow!("{e}"))?;
            // As `dwcp migrate --incoming` does by default.
            dst.preallocate().map_err(|e| anyhow!("{e}"))?;
            demo(o, src, dst, "kvm")
        }
        Err(why) => {
            if !o.json {
                println!("dwcp demo: no KVM guest ({why});");
                println!(
                    "using the in-process synthetic guest instead ({} MiB, dirtying {} MiB/s).",
                    o.ram >> 20,
                    o.dirty
                );
            }
            let src = SyntheticGuest::source(o.ram, o.dirty, 1).map_err(|e| anyhow!("{e}"))?;
            let dst = SyntheticGuest::destination(o.ram, o.dirty).map_err(|e| anyhow!("{e}"))?;
            demo(o, src, dst, "synthetic")
        }
    }
}

fn demo<G: Guest>(o: &DemoOptions, mut src: G, dst: G, kind: &str) -> Result<()> {
    let dst = Arc::new(Mutex::new(dst));
    let incoming = Incoming::new(Box::new(dst.clone()), 2 << 30);
    // As `dwcp migrate --incoming` does by default.
    incoming.preallocate_state(&MigrateConfig::default(), o.ram as u64);
    let key = Key::generate().context("making a fresh key")?;
    let rx_engine = Engine::builder().workers(1).build()?;
    let tx_engine = Engine::builder().workers(1).build()?;
    let recv = Receiver::bind(
        &rx_engine,
        "127.0.0.1:0".parse()?,
        ReceiverConfig {
            key: Some(key.clone()),
            ..ReceiverConfig::default()
        },
        incoming.sink(),
    )?;
    let sender = Sender::connect(
        &tx_engine,
        recv.local_addr(),
        SenderConfig {
            key: Some(key),
            // One per shard, as `dwcp migrate`.
            streams: StreamCount::Fixed(2),
            policy: dwcp_codec::Policy::Stored,
            ..SenderConfig::default()
        },
    )?;
    // Let the guest run before it moves.
    std::thread::sleep(Duration::from_millis(300));
    let json = o.json;
    let report = migrate_out(&mut src, &sender, &MigrateConfig::default(), |m| {
        if !json {
            println!("  {m}");
        }
    })
    .map_err(|e| anyhow!("{e} (the source guest runs on)"))?;
    let _ = sender.close();
    let arrived = incoming
        .wait(Duration::from_secs(30))
        .ok_or_else(|| anyhow!("the destination did not report"))?
        .map_err(|e| anyhow!("destination: {e}"))?;
    let at_pause = src.count();
    // The source is paused for good: its memory is the memory at the
    // pause. The destination assembled its digest page by page as pages
    // landed, so the check costs no downtime.
    let verified =
        memory_digest(&[src.memory()]).map_err(|e| anyhow!("{e}"))? == arrived.memory_digest;
    let downtime = report.downtime;
    let first = dst.lock().unwrap_or_else(|p| p.into_inner()).count();
    std::thread::sleep(Duration::from_millis(500));
    let later = dst.lock().unwrap_or_else(|p| p.into_inner()).count();
    let s = &report.summary;
    if json {
        println!(
            "{}",
            json!({
                "name": "demo",
                "guest": kind,
                "total_ms": report.total.as_secs_f64() * 1e3,
                "downtime_ms": downtime.as_secs_f64() * 1e3,
                "destination_finish_ms": arrived.finish.as_secs_f64() * 1e3,
                "rounds": report.rounds.len(),
                "guest_bytes": s.bytes_sent,
                "wire_bytes": report.wire_bytes,
                "converged": s.converged,
                "throttled": s.max_throttle,
                "verified": verified,
                "counter_at_pause": at_pause,
                "counter_after": later,
            })
        );
    } else {
        println!(
            "done: {} rounds, total {:.0} ms, downtime {:.1} ms, {} MiB of guest pages in {} MiB on the wire",
            report.rounds.len(),
            report.total.as_secs_f64() * 1e3,
            downtime.as_secs_f64() * 1e3,
            s.bytes_sent >> 20,
            report.wire_bytes >> 20
        );
        println!(
            "memory at the pause: {}; the guest counted to {at_pause} on the source and counts on at the destination ({first} -> {later} in 0.5 s)",
            if verified {
                "identical on both sides"
            } else {
                "DIFFERS"
            }
        );
    }
    let _ = recv.close();
    if !verified {
        return Err(anyhow!(
            "the destination's memory differs from the source's at the pause"
        ));
    }
    Ok(())
}
