//! A KVM guest migrated live between two guests of this process over an
//! AMST session on loopback, while it keeps dirtying memory. Skips (and
//! says why) where KVM cannot create a VM.
#![cfg(all(target_os = "linux", target_arch = "x86_64"))]

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dwcp_engine::Engine;
use dwcp_migration::hv::{DestHypervisor, GuestRegion, HvResult, PAGE_SIZE, SourceHypervisor};
use dwcp_migration::kvm::{GuestConfig, KvmGuest, kvm_available};
use dwcp_migration::precopy::{self, Incoming, MigrateConfig, migrate_out};
use dwcp_migration::synthetic::SyntheticGuest;
use dwcp_transport::{Key, Receiver, ReceiverConfig, Sender, SenderConfig, StreamCount};

/// BLAKE3 of a whole region, read page by page.
fn memory_digest(region: &GuestRegion) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    let mut page = vec![0u8; PAGE_SIZE];
    for p in 0..region.pages() {
        region.read(p * PAGE_SIZE, &mut page).unwrap();
        h.update(&page);
    }
    *h.finalize().as_bytes()
}

/// The destination guest, shared with the test, which records the digest
/// of its memory just before it is started.
struct Recorded<G> {
    guest: Arc<Mutex<G>>,
    digest: Arc<Mutex<Option<[u8; 32]>>>,
}

impl<G: DestHypervisor> DestHypervisor for Recorded<G> {
    fn regions(&self) -> Vec<GuestRegion> {
        self.guest.lock().unwrap().regions()
    }
    fn load_device_state(&mut self, blob: &[u8]) -> HvResult<()> {
        self.guest.lock().unwrap().load_device_state(blob)
    }
    fn resume(&mut self) -> HvResult<()> {
        let mut g = self.guest.lock().unwrap();
        let region = g.regions().remove(0);
        *self.digest.lock().unwrap() = Some(memory_digest(&region));
        g.resume()
    }
}

/// A receiver with `incoming`'s sink and a sender to it, on loopback.
fn session(incoming: &Incoming) -> (Receiver, Sender, Engine, Engine) {
    let key = Key::generate().unwrap();
    let (rx_engine, tx_engine) = (
        Engine::builder().workers(1).build().unwrap(),
        Engine::builder().workers(1).build().unwrap(),
    );
    let recv = Receiver::bind(
        &rx_engine,
        "127.0.0.1:0".parse().unwrap(),
        ReceiverConfig {
            key: Some(key.clone()),
            ..ReceiverConfig::default()
        },
        incoming.sink(),
    )
    .unwrap();
    let sender = Sender::connect(
        &tx_engine,
        recv.local_addr(),
        SenderConfig {
            key: Some(key),
            streams: StreamCount::Fixed(2),
            policy: dwcp_codec::Policy::Stored,
            ..SenderConfig::default()
        },
    )
    .unwrap();
    (recv, sender, rx_engine, tx_engine)
}

#[test]
fn a_synthetic_guest_moves_live_without_kvm() {
    let mut src = SyntheticGuest::source(64 << 20, 30, 3).unwrap();
    let dst = Arc::new(Mutex::new(
        SyntheticGuest::destination(64 << 20, 30).unwrap(),
    ));
    let digest = Arc::new(Mutex::new(None));
    let incoming = Incoming::new(
        Box::new(Recorded {
            guest: dst.clone(),
            digest: digest.clone(),
        }),
        1 << 30,
    );
    let (recv, sender, _rx, _tx) = session(&incoming);
    std::thread::sleep(Duration::from_millis(100));
    let report = migrate_out(&mut src, &sender, &MigrateConfig::default(), |_| {}).unwrap();
    sender.close().unwrap();
    let done = incoming.wait(Duration::from_secs(10)).unwrap().unwrap();
    assert!(report.summary.converged);
    assert_eq!(
        done.memory_digest,
        precopy::memory_digest(&SourceHypervisor::regions(&src)).unwrap(),
        "the page-by-page digest agrees"
    );
    let at_pause = src.counter();
    assert!(at_pause > 0);
    assert_eq!(Some(memory_digest(&src.region())), *digest.lock().unwrap());
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(src.counter(), at_pause, "the source stays stopped");
    assert!(
        dst.lock().unwrap().counter() > at_pause,
        "the destination counts on"
    );
    recv.close().unwrap();
}

#[test]
fn a_page_corrupted_after_the_transport_fails_the_memory_check() {
    let mut src = SyntheticGuest::source(32 << 20, 0, 5).unwrap();
    let dst = Arc::new(Mutex::new(
        SyntheticGuest::destination(32 << 20, 0).unwrap(),
    ));
    // A text page of the working set (second half of RAM).
    let victim = (32 << 20) / PAGE_SIZE as u64 * 3 / 4;
    let incoming = Incoming::with_fault(
        Box::new(Recorded {
            guest: dst.clone(),
            digest: Arc::new(Mutex::new(None)),
        }),
        1 << 30,
        Some(victim),
    );
    let (recv, sender, _rx, _tx) = session(&incoming);
    migrate_out(&mut src, &sender, &MigrateConfig::default(), |_| {}).unwrap();
    sender.close().unwrap();
    let done = incoming.wait(Duration::from_secs(10)).unwrap().unwrap();
    assert_ne!(
        done.memory_digest,
        precopy::memory_digest(&SourceHypervisor::regions(&src)).unwrap(),
        "one changed byte must show"
    );
    recv.close().unwrap();
}

#[test]
fn a_running_guest_moves_live_and_keeps_counting() {
    if let Err(why) = kvm_available() {
        eprintln!("a_running_guest_moves_live_and_keeps_counting: skipped: {why}");
        return;
    }
    let cfg = GuestConfig {
        ram: 64 << 20,
        dirty_mibps: 30,
        seed: 7,
    };
    let mut src = KvmGuest::source(cfg.clone()).unwrap();
    let dst = Arc::new(Mutex::new(KvmGuest::destination(cfg).unwrap()));
    let digest = Arc::new(Mutex::new(None));
    let incoming = Incoming::new(
        Box::new(Recorded {
            guest: dst.clone(),
            digest: digest.clone(),
        }),
        1 << 30,
    );
    let (recv, sender, _rx, _tx) = session(&incoming);
    // Let the guest run a little first.
    std::thread::sleep(Duration::from_millis(200));
    let before = src.counter();
    assert!(before > 0, "the source guest runs");
    let started = Instant::now();
    let mut rounds = Vec::new();
    let report = migrate_out(&mut src, &sender, &MigrateConfig::default(), |m| {
        rounds.push(*m);
    })
    .unwrap();
    let elapsed = started.elapsed();
    sender.close().unwrap();
    let done = incoming.wait(Duration::from_secs(10)).unwrap().unwrap();
    assert!(done.pages > 0);
    assert_eq!(
        done.memory_digest,
        precopy::memory_digest(&SourceHypervisor::regions(&src)).unwrap()
    );
    assert!(!rounds.is_empty() && report.summary.converged, "{report:?}");
    // The source is paused for good: its memory is what it was at the
    // pause, and must equal what the destination started from.
    let at_pause = src.counter();
    let want = memory_digest(&src.region());
    assert_eq!(Some(want), *digest.lock().unwrap(), "memory differs");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(src.counter(), at_pause, "the source stays stopped");
    let after = dst.lock().unwrap().counter();
    assert!(
        after > at_pause,
        "the destination guest counts on from {at_pause}: {after}"
    );
    eprintln!(
        "64 MiB guest at 30 MiB/s: {} rounds, total {:?} (wall {:?}), downtime {:?}, {} wire bytes",
        report.rounds.len(),
        report.total,
        elapsed,
        report.downtime,
        report.wire_bytes
    );
    recv.close().unwrap();
}
