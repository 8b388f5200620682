//! A KVM guest migrated live between two guests of this process over an
//! AMST session on loopback, while it keeps dirtying memory. Skips (and
//! says why) where KVM cannot create a VM. Migrations that do not complete
//! (cancelled by the caller, destination gone, deadline, round limit)
//! leave the source running and the destination's guest never started.
#![cfg(all(target_os = "linux", target_arch = "x86_64"))]

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dwcp_engine::Engine;
use dwcp_migration::controller::ControllerConfig;
use dwcp_migration::hv::{DestHypervisor, GuestRegion, HvResult, PAGE_SIZE, SourceHypervisor};
use dwcp_migration::kvm::{GuestConfig, KvmGuest, kvm_available};
use dwcp_migration::precopy::{self, Incoming, MigrateConfig, MigrationError, migrate_out};
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
    session_with(incoming, SenderConfig::default())
}

/// [`session`] with `cfg`'s rate limit and timeouts.
fn session_with(incoming: &Incoming, cfg: SenderConfig) -> (Receiver, Sender, Engine, Engine) {
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
            ..cfg
        },
    )
    .unwrap();
    (recv, sender, rx_engine, tx_engine)
}

/// A session slowed to 200 Mbit/s, that gives a dead peer up within a few
/// seconds (stall 2 s, resume 3 s), as `dwcp migrate` does.
fn slow_session(incoming: &Incoming) -> (Receiver, Sender, Engine, Engine) {
    session_with(
        incoming,
        SenderConfig {
            rate_limit: 200_000_000 / 8,
            connect_timeout: Duration::from_secs(2),
            stall_timeout: Duration::from_secs(2),
            resume_for: Duration::from_secs(3),
            ..SenderConfig::default()
        },
    )
}

/// What [`Recorded`] records: the digest of the memory a destination
/// guest started from, once started.
type Started = Arc<Mutex<Option<[u8; 32]>>>;

/// An `Incoming` into `dst`, recorded, and what it records.
fn recorded<G: DestHypervisor + Send + 'static>(dst: &Arc<Mutex<G>>) -> (Started, Incoming) {
    let started = Started::default();
    let incoming = Incoming::new(
        Box::new(Recorded {
            guest: dst.clone(),
            digest: started.clone(),
        }),
        1 << 30,
    );
    (started, incoming)
}

/// A synthetic destination, shared with the test, and its `Incoming`.
fn synthetic_destination(ram: usize) -> (Arc<Mutex<SyntheticGuest>>, Started, Incoming) {
    let dst = Arc::new(Mutex::new(SyntheticGuest::destination(ram, 30).unwrap()));
    let (started, incoming) = recorded(&dst);
    (dst, started, incoming)
}

/// The source's counter moves on over 300 ms.
fn assert_runs_on(counter: impl Fn() -> u64, what: &str) {
    let before = counter();
    std::thread::sleep(Duration::from_millis(300));
    let after = counter();
    assert!(after > before, "{what}: counter {before} -> {after}");
}

/// The destination discarded the migration, saying `why`, and never
/// started its guest.
fn assert_discarded(
    incoming: &Incoming,
    dst: &Mutex<SyntheticGuest>,
    started: &Mutex<Option<[u8; 32]>>,
    why: &str,
) {
    let outcome = incoming.wait(Duration::from_secs(10));
    match &outcome {
        Some(Err(e)) => assert!(e.contains(why), "the destination says {e:?}, not {why:?}"),
        other => panic!("the destination should have discarded it: {other:?}"),
    }
    assert!(started.lock().unwrap().is_none(), "the destination started");
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(dst.lock().unwrap().counter(), 0, "the destination runs");
}

#[test]
fn a_synthetic_guest_moves_live_without_kvm() {
    synthetic_guest_moves_live(false);
}

#[test]
fn a_destination_with_its_codec_state_allocated_in_advance_decodes_the_same() {
    synthetic_guest_moves_live(true);
}

fn synthetic_guest_moves_live(prealloc: bool) {
    let mut src = SyntheticGuest::source(64 << 20, 30, 3).unwrap();
    let (dst, digest, incoming) = synthetic_destination(64 << 20);
    if prealloc {
        let (bytes, _) = incoming.preallocate_state(&MigrateConfig::default(), 64 << 20);
        assert_eq!(
            bytes,
            precopy::default_codec_state(64 << 20, MigrateConfig::default().shards)
        );
    }
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

/// By default round 0 keeps in the codec state only the stripes the
/// guest writes: after the first read of the dirty log, the others go
/// through the stateless encoders, in the same per-shard sequences as
/// the stateful batches, and the destination ends up with the source's
/// memory all the same. An idle guest's data goes stateless, a busy
/// one's stateful.
#[test]
fn round_0_keeps_in_the_codec_state_only_the_stripes_the_guest_writes() {
    for dirty in [0, 30] {
        let ram = 256 << 20;
        let mut src = SyntheticGuest::source(ram, dirty, 11).unwrap();
        let (_dst, digest, incoming) = synthetic_destination(ram);
        // 200 Mbit/s: round 0 lasts well past the first read, 50 ms in,
        // and the shards' windows fill long before it.
        let (recv, sender, _rx, _tx) = slow_session(&incoming);
        let report = migrate_out(&mut src, &sender, &MigrateConfig::default(), |_| {}).unwrap();
        sender.close().unwrap();
        let done = incoming.wait(Duration::from_secs(20)).unwrap().unwrap();
        assert!(report.summary.converged);
        assert_eq!(
            done.memory_digest,
            precopy::memory_digest(&SourceHypervisor::regions(&src)).unwrap(),
            "dirty {dirty}: the page-by-page digest agrees"
        );
        assert_eq!(Some(memory_digest(&src.region())), *digest.lock().unwrap());
        // The synthetic guest's data is its last quarter, the part it
        // writes; the batches of its zero pages go before the first read
        // (the stateful encoders, which keep nothing of zero pages).
        let (stateless, all) = (done.stateless_batches, done.batches);
        if dirty == 0 {
            assert!(stateless * 2 > all, "{stateless} of {all} stateless");
        } else {
            assert!(stateless < all / 4, "{stateless} of {all} stateless");
        }
        recv.close().unwrap();
    }
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
    let (digest, incoming) = recorded(&dst);
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

#[test]
fn a_migration_cancelled_mid_way_leaves_the_source_running() {
    // 256 MiB at 200 Mbit/s: round 0 alone takes seconds.
    let ram = 256 << 20;
    let mut src = SyntheticGuest::source(ram, 30, 11).unwrap();
    let (dst, started, incoming) = synthetic_destination(ram);
    let (recv, sender, _rx, _tx) = slow_session(&incoming);
    let cfg = MigrateConfig::default();
    let token = cfg.cancel.clone();
    let mut rounds = 0;
    let (result, latency) = std::thread::scope(|s| {
        let h = s.spawn(|| {
            let r = migrate_out(&mut src, &sender, &cfg, |_| rounds += 1);
            (r, Instant::now())
        });
        std::thread::sleep(Duration::from_millis(200));
        let at = Instant::now();
        token.cancel();
        let (r, done) = h.join().unwrap();
        (r, done.saturating_duration_since(at))
    });
    eprintln!("cancelled 200 ms in ({rounds} rounds done); returned {latency:?} after the cancel");
    match &result {
        Err(MigrationError::Cancelled(why)) => {
            assert_eq!(why, precopy::CANCELLED_BY_CALLER);
        }
        other => panic!("{other:?}"),
    }
    assert!(
        result
            .unwrap_err()
            .to_string()
            .contains("cancelled by the caller")
    );
    assert!(latency < Duration::from_secs(3), "{latency:?}");
    assert_runs_on(|| src.counter(), "the source after the cancel");
    assert_discarded(&incoming, &dst, &started, "cancelled by the caller");
    sender.cancel();
    recv.close().unwrap();
    assert_runs_on(|| src.counter(), "the source after the session");
}

#[test]
fn a_destination_that_dies_mid_way_leaves_the_source_running() {
    let ram = 256 << 20;
    let mut src = SyntheticGuest::source(ram, 30, 12).unwrap();
    let (dst, started, incoming) = synthetic_destination(ram);
    let (recv, sender, rx, _tx) = slow_session(&incoming);
    let (result, took) = std::thread::scope(|s| {
        let h = s.spawn(|| {
            let r = migrate_out(&mut src, &sender, &MigrateConfig::default(), |_| {});
            (r, Instant::now())
        });
        std::thread::sleep(Duration::from_millis(300));
        // The destination process dies: its listener and every connection
        // go at once.
        let at = Instant::now();
        drop(recv);
        drop(rx);
        let (r, done) = h.join().unwrap();
        (r, done.saturating_duration_since(at))
    });
    eprintln!("destination killed mid round 0; the source gave up {took:?} later: {result:?}");
    assert!(
        matches!(result, Err(MigrationError::Transport(_))),
        "{result:?}"
    );
    assert!(took < Duration::from_secs(15), "{took:?}");
    assert_runs_on(|| src.counter(), "the source after the destination died");
    // Parts still unfinished when the receiver closed were discarded,
    // which fails the migration; with none in flight at that moment it is
    // just never completed. Either way the guest never starts.
    let outcome = incoming.wait(Duration::from_millis(500));
    assert!(
        matches!(&outcome, None | Some(Err(_))),
        "the destination should not have completed: {outcome:?}"
    );
    assert!(started.lock().unwrap().is_none(), "the destination started");
    assert_eq!(dst.lock().unwrap().counter(), 0, "the destination runs");
    sender.cancel();
}

#[test]
fn past_its_round_limit_a_migration_cancels_and_the_source_runs_on() {
    // One round only, no throttling, and a guest dirtying faster than a
    // 50 ms stop could carry.
    let ram = 64 << 20;
    let mut src = SyntheticGuest::source(ram, 60, 13).unwrap();
    let (dst, started, incoming) = synthetic_destination(ram);
    let (recv, sender, _rx, _tx) = slow_session(&incoming);
    let cfg = MigrateConfig {
        controller: ControllerConfig {
            max_rounds: 1,
            allow_throttle: false,
            ..ControllerConfig::default()
        },
        ..MigrateConfig::default()
    };
    let t = Instant::now();
    let result = migrate_out(&mut src, &sender, &cfg, |_| {});
    eprintln!(
        "round limit: {:?} after {:?}",
        result.as_ref().err(),
        t.elapsed()
    );
    match &result {
        Err(e @ MigrationError::Cancelled(why)) => {
            assert!(why.contains("round limit"), "{why}");
            assert!(e.to_string().contains("round limit reached"), "{e}");
        }
        other => panic!("{other:?}"),
    }
    assert_runs_on(|| src.counter(), "the source after the round limit");
    assert_discarded(&incoming, &dst, &started, "round limit reached");
    sender.cancel();
    recv.close().unwrap();
}

#[test]
fn past_its_deadline_a_migration_cancels_mid_round_and_the_source_runs_on() {
    // Round 0 of 256 MiB at 200 Mbit/s takes seconds; the deadline is 300
    // ms, so it passes mid-round.
    let ram = 256 << 20;
    let mut src = SyntheticGuest::source(ram, 30, 14).unwrap();
    let (dst, started, incoming) = synthetic_destination(ram);
    let (recv, sender, _rx, _tx) = slow_session(&incoming);
    let cfg = MigrateConfig {
        controller: ControllerConfig {
            deadline: Some(Duration::from_millis(300)),
            allow_throttle: false,
            ..ControllerConfig::default()
        },
        ..MigrateConfig::default()
    };
    let t = Instant::now();
    let result = migrate_out(&mut src, &sender, &cfg, |_| {});
    let took = t.elapsed();
    eprintln!(
        "deadline 300 ms: {:?} after {took:?}",
        result.as_ref().err()
    );
    match &result {
        Err(MigrationError::Cancelled(why)) => assert!(why.contains("deadline exceeded"), "{why}"),
        other => panic!("{other:?}"),
    }
    assert!(took < Duration::from_secs(4), "{took:?}");
    assert_runs_on(|| src.counter(), "the source after the deadline");
    assert_discarded(&incoming, &dst, &started, "deadline exceeded");
    sender.cancel();
    recv.close().unwrap();
}

#[test]
fn a_kvm_migration_cancelled_mid_way_leaves_the_source_running() {
    if let Err(why) = kvm_available() {
        eprintln!("a_kvm_migration_cancelled_mid_way_leaves_the_source_running: skipped: {why}");
        return;
    }
    let cfg = GuestConfig {
        ram: 64 << 20,
        dirty_mibps: 30,
        seed: 9,
    };
    let mut src = KvmGuest::source(cfg.clone()).unwrap();
    let dst = Arc::new(Mutex::new(KvmGuest::destination(cfg).unwrap()));
    let (started, incoming) = recorded(&dst);
    // 64 MiB at 50 Mbit/s: round 0 takes seconds.
    let (recv, sender, _rx, _tx) = session_with(
        &incoming,
        SenderConfig {
            rate_limit: 50_000_000 / 8,
            ..SenderConfig::default()
        },
    );
    std::thread::sleep(Duration::from_millis(100));
    let mcfg = MigrateConfig::default();
    let token = mcfg.cancel.clone();
    let result = std::thread::scope(|s| {
        let h = s.spawn(|| migrate_out(&mut src, &sender, &mcfg, |_| {}));
        std::thread::sleep(Duration::from_millis(200));
        token.cancel();
        h.join().unwrap()
    });
    assert!(
        matches!(&result, Err(MigrationError::Cancelled(w)) if w == precopy::CANCELLED_BY_CALLER),
        "{result:?}"
    );
    assert_runs_on(|| src.counter(), "the KVM source after the cancel");
    match incoming.wait(Duration::from_secs(10)) {
        Some(Err(e)) => assert!(e.contains("cancelled by the caller"), "{e}"),
        other => panic!("{other:?}"),
    }
    assert!(started.lock().unwrap().is_none(), "the destination started");
    // Its memory holds what arrived; the guest must not run on it.
    let c = dst.lock().unwrap().counter();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(dst.lock().unwrap().counter(), c, "the destination runs");
    sender.cancel();
    recv.close().unwrap();
}

/// A destination whose `resume` tells the test it has committed, then
/// waits for the test's go before starting the guest.
struct Gated {
    guest: Arc<Mutex<SyntheticGuest>>,
    committed: std::sync::mpsc::Sender<()>,
    go: Mutex<std::sync::mpsc::Receiver<()>>,
}

impl DestHypervisor for Gated {
    fn regions(&self) -> Vec<GuestRegion> {
        DestHypervisor::regions(&*self.guest.lock().unwrap())
    }
    fn load_device_state(&mut self, blob: &[u8]) -> HvResult<()> {
        self.guest.lock().unwrap().load_device_state(blob)
    }
    fn resume(&mut self) -> HvResult<()> {
        let _ = self.committed.send(());
        let _ = self
            .go
            .lock()
            .unwrap()
            .recv_timeout(Duration::from_secs(10));
        DestHypervisor::resume(&mut *self.guest.lock().unwrap())
    }
}

#[test]
fn a_session_lost_after_end_leaves_the_source_paused_never_two_guests() {
    let ram = 64 << 20;
    let mut src = SyntheticGuest::source(ram, 30, 21).unwrap();
    let dst = Arc::new(Mutex::new(SyntheticGuest::destination(ram, 30).unwrap()));
    let (committed_tx, committed) = std::sync::mpsc::channel();
    let (go, go_rx) = std::sync::mpsc::channel();
    let incoming = Incoming::new(
        Box::new(Gated {
            guest: dst.clone(),
            committed: committed_tx,
            go: Mutex::new(go_rx),
        }),
        1 << 30,
    );
    let (recv, sender, rx, _tx) = slow_session(&incoming);
    let result = std::thread::scope(|s| {
        let h = s.spawn(|| migrate_out(&mut src, &sender, &MigrateConfig::default(), |_| {}));
        // The destination is starting the guest; now its process loses the
        // network (listener and connections), so `End`'s answer never
        // reaches the source.
        committed
            .recv_timeout(Duration::from_secs(60))
            .expect("the destination never got to start the guest");
        let killer = s.spawn(move || {
            drop(recv);
            drop(rx);
        });
        std::thread::sleep(Duration::from_millis(300));
        go.send(()).unwrap();
        killer.join().unwrap();
        h.join().unwrap()
    });
    eprintln!("session lost after End: {result:?}");
    assert!(
        matches!(result, Err(MigrationError::OutcomeUnknown(_))),
        "{result:?}"
    );
    // The destination runs the guest...
    match incoming.wait(Duration::from_secs(10)) {
        Some(Ok(_)) => {}
        other => panic!("the destination should run the guest: {other:?}"),
    }
    assert_runs_on(|| dst.lock().unwrap().counter(), "the destination");
    // ... and the source stays paused: never two copies running.
    let before = src.counter();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(src.counter(), before, "the source runs too");
    sender.cancel();
}

/// What [`SecondRead`] does at its source's second dirty-log read.
#[derive(Clone, Copy)]
enum AtSecondRead {
    /// Report every page as written although nothing changed.
    ReportAll,
    /// Fail.
    Fail,
}

/// A synthetic source whose second dirty-log read (the first of those
/// made while round 0 sends, 50 ms in, or else the read that ends round
/// 0) is scripted.
struct SecondRead {
    guest: SyntheticGuest,
    reads: usize,
    at_second: AtSecondRead,
}

impl SourceHypervisor for SecondRead {
    fn regions(&self) -> Vec<GuestRegion> {
        SourceHypervisor::regions(&self.guest)
    }
    fn start_dirty_log(&mut self) -> HvResult<()> {
        self.guest.start_dirty_log()
    }
    fn read_and_clear_dirty(&mut self, region: usize, bitmap: &mut [u64]) -> HvResult<()> {
        self.reads += 1;
        // Read 1 is the one at the start of the migration.
        if self.reads == 2 {
            match self.at_second {
                AtSecondRead::ReportAll => {
                    self.guest.read_and_clear_dirty(region, bitmap)?;
                    bitmap.fill(u64::MAX);
                    return Ok(());
                }
                AtSecondRead::Fail => {
                    return Err(dwcp_migration::hv::HvError::new(
                        "dirty log read",
                        "failed (test)",
                    ));
                }
            }
        }
        self.guest.read_and_clear_dirty(region, bitmap)
    }
    fn stop_dirty_log(&mut self) -> HvResult<()> {
        self.guest.stop_dirty_log()
    }
    fn pause(&mut self) -> HvResult<()> {
        self.guest.pause()
    }
    fn resume(&mut self) -> HvResult<()> {
        SourceHypervisor::resume(&mut self.guest)
    }
    fn throttle(&mut self, percent: u8) -> HvResult<()> {
        self.guest.throttle(percent)
    }
    fn save_device_state(&mut self) -> HvResult<Vec<u8>> {
        self.guest.save_device_state()
    }
}

/// Pages reported dirty after round 0 although nothing changed (as pages
/// dirtied before round 0 read them are) are at the destination already:
/// with round 0 stateless (page hashes kept for the next round) none goes
/// again.
#[test]
fn pages_reported_dirty_but_unchanged_since_round_0_are_not_sent_again() {
    let ram = 32 << 20;
    for keep_round0 in [false, true] {
        let mut src = SecondRead {
            guest: SyntheticGuest::source(ram, 0, 5).unwrap(),
            reads: 0,
            at_second: AtSecondRead::ReportAll,
        };
        let dst = Arc::new(Mutex::new(SyntheticGuest::destination(ram, 0).unwrap()));
        let (digest, incoming) = recorded(&dst);
        let (recv, sender, _rx, _tx) = session(&incoming);
        let cfg = MigrateConfig {
            round0_codec_state: keep_round0,
            ..MigrateConfig::default()
        };
        let report = migrate_out(&mut src, &sender, &cfg, |_| {}).unwrap();
        sender.close().unwrap();
        let done = incoming.wait(Duration::from_secs(10)).unwrap().unwrap();
        assert_eq!(
            done.memory_digest,
            precopy::memory_digest(&SourceHypervisor::regions(&src)).unwrap()
        );
        assert_eq!(
            Some(memory_digest(&src.guest.region())),
            *digest.lock().unwrap()
        );
        let round0 = &report.rounds[0];
        let later = report.summary.pages_sent - round0.pages_sent;
        let nonzero = round0.pages_sent - round0.zero_pages;
        assert!(nonzero > 1000, "the guest has data ({nonzero} pages)");
        if keep_round0 {
            // Sent again, as references to the held content.
            assert!(later >= nonzero, "{later} pages after round 0");
        } else {
            // Only the zero pages go again (as tags), and the few the
            // guest's own counter changed.
            assert!(
                later <= round0.zero_pages + 4,
                "{later} pages after round 0, {nonzero} unchanged non-zero pages"
            );
        }
        recv.close().unwrap();
    }
}

#[test]
fn a_dirty_log_failure_in_the_round_0_probe_stops_the_round_and_the_source_runs_on() {
    // 256 MiB at 40 Mbit/s: round 0 takes seconds; the shards stop at
    // their next batch after the first read while round 0 sends fails,
    // 50 ms in.
    let ram = 256 << 20;
    let mut src = SecondRead {
        guest: SyntheticGuest::source(ram, 30, 13).unwrap(),
        reads: 0,
        at_second: AtSecondRead::Fail,
    };
    let (dst, started, incoming) = synthetic_destination(ram);
    let (recv, sender, _rx, _tx) = session_with(
        &incoming,
        SenderConfig {
            rate_limit: 40_000_000 / 8,
            stall_timeout: Duration::from_secs(2),
            resume_for: Duration::from_secs(3),
            ..SenderConfig::default()
        },
    );
    let t = Instant::now();
    let cfg = MigrateConfig {
        round0_codec_state: false,
        ..MigrateConfig::default()
    };
    let result = migrate_out(&mut src, &sender, &cfg, |_| {});
    let took = t.elapsed();
    let err = result.unwrap_err().to_string();
    assert!(err.contains("dirty log read: failed (test)"), "{err}");
    assert!(
        took < Duration::from_millis(1500),
        "returned after {took:?}"
    );
    assert_runs_on(|| src.guest.counter(), "the source after the failure");
    sender.cancel();
    assert_discarded(&incoming, &dst, &started, "");
    recv.close().unwrap();
}
