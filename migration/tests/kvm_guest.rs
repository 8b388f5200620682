//! The KVM guest on a real `/dev/kvm`: it runs, dirties what and as fast as
//! it should, pauses, and survives a migration done by hand in-process.
//!
//! Each test skips (and says why) where KVM cannot create a VM. The tests
//! run one at a time (they measure rates and latencies on a small machine).
#![cfg(all(target_os = "linux", target_arch = "x86_64"))]

use std::collections::HashSet;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::thread::sleep;
use std::time::{Duration, Instant};

use dwcp_codec::corpus::PageClass;
use dwcp_migration::hv::{DestHypervisor, GuestRegion, PAGE_SIZE, SourceHypervisor, bitmap_words};
use dwcp_migration::kvm::layout::CONTROL_GPA;
use dwcp_migration::kvm::{GuestConfig, KvmGuest, kvm_available};

const MIB: usize = 1 << 20;

static SERIAL: Mutex<()> = Mutex::new(());

/// Takes the one-test-at-a-time lock, or `None` (after saying why) when
/// KVM is not usable here.
fn kvm_or_skip(test: &str) -> Option<MutexGuard<'static, ()>> {
    if let Err(why) = kvm_available() {
        eprintln!("{test}: skipped: {why}");
        return None;
    }
    Some(SERIAL.lock().unwrap_or_else(PoisonError::into_inner))
}

fn config(ram_mib: usize, dirty_mibps: u32, seed: u64) -> GuestConfig {
    GuestConfig {
        ram: ram_mib * MIB,
        dirty_mibps,
        seed,
    }
}

fn dirty_pages(guest: &mut KvmGuest) -> Vec<usize> {
    let pages = guest.region().pages();
    let mut bitmap = vec![0u64; bitmap_words(pages)];
    guest.read_and_clear_dirty(0, &mut bitmap).unwrap();
    (0..pages)
        .filter(|&p| bitmap[p / 64] >> (p % 64) & 1 == 1)
        .collect()
}

fn read_page(region: &GuestRegion, page: usize) -> Vec<u8> {
    let mut out = vec![0u8; PAGE_SIZE];
    region.read(page * PAGE_SIZE, &mut out).unwrap();
    out
}

fn copy_pages(from: &GuestRegion, to: &GuestRegion, pages: impl IntoIterator<Item = usize>) {
    let mut buf = vec![0u8; PAGE_SIZE];
    for p in pages {
        from.read(p * PAGE_SIZE, &mut buf).unwrap();
        to.write(p * PAGE_SIZE, &buf).unwrap();
    }
}

/// Waits up to `limit` for `cond`.
fn wait_for(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let t = Instant::now();
    while t.elapsed() < limit {
        if cond() {
            return true;
        }
        sleep(Duration::from_millis(5));
    }
    cond()
}

#[test]
fn guest_runs_and_its_counter_grows() {
    let Some(_serial) = kvm_or_skip("guest_runs_and_its_counter_grows") else {
        return;
    };
    let guest = KvmGuest::source(config(32, 20, 1)).unwrap();
    assert!(guest.is_running());
    assert!(
        wait_for(Duration::from_secs(2), || guest.counter() > 100),
        "counter {} after 2 s; failure: {:?}",
        guest.counter(),
        guest.failure()
    );
    let before = guest.counter();
    sleep(Duration::from_millis(100));
    assert!(guest.counter() > before);
    assert!(guest.ticks() > 0);
    assert_eq!(guest.failure(), None);
}

#[test]
fn idle_guest_only_ticks() {
    let Some(_serial) = kvm_or_skip("idle_guest_only_ticks") else {
        return;
    };
    let guest = KvmGuest::source(config(16, 0, 2)).unwrap();
    sleep(Duration::from_millis(200));
    assert_eq!(guest.counter(), 0);
    let ticks = guest.ticks();
    // One request every 10 ms: about 20, never a busy loop.
    assert!((5..=60).contains(&ticks), "{ticks} ticks in 200 ms");
}

#[test]
fn dirty_log_sees_the_working_set_only_at_the_configured_rate() {
    let Some(_serial) = kvm_or_skip("dirty_log_sees_the_working_set_only") else {
        return;
    };
    let rate = 40u32;
    let mut guest = KvmGuest::source(config(64, rate, 3)).unwrap();
    let pages = guest.region().pages();
    guest.start_dirty_log().unwrap();
    // First read after start: every page.
    assert_eq!(dirty_pages(&mut guest).len(), pages);

    let w0 = guest.counter();
    let t0 = Instant::now();
    sleep(Duration::from_millis(1000));
    let dirty = dirty_pages(&mut guest);
    let writes = guest.counter() - w0;
    let secs = t0.elapsed().as_secs_f64();

    let control = CONTROL_GPA as usize / PAGE_SIZE;
    let layout = guest.layout().clone();
    for &p in &dirty {
        assert!(
            p == control || layout.in_working_set(p),
            "page {p:#x} outside the working set is dirty"
        );
        if p != control {
            assert_ne!(
                guest.page_class(p),
                Some(PageClass::Zero),
                "zero page {p:#x}"
            );
        }
    }
    let achieved = writes as f64 * PAGE_SIZE as f64 / MIB as f64 / secs;
    eprintln!(
        "{rate} MiB/s asked: {achieved:.1} MiB/s done ({writes} writes), {} pages dirty",
        dirty.len()
    );
    assert!(
        (0.8..=1.1).contains(&(achieved / f64::from(rate))),
        "achieved {achieved:.1} MiB/s for {rate}"
    );
    // Distinct pages: `writes` uniform picks among the n non-zero pages hit
    // n * (1 - (1 - 1/n)^writes) of them.
    let ws_dirty = dirty.iter().filter(|&&p| p != control).count() as f64;
    let n = layout.table_entries as f64;
    let expected = n * (1.0 - (1.0 - 1.0 / n).powf(writes as f64));
    assert!(
        (ws_dirty / expected - 1.0).abs() < 0.1,
        "{ws_dirty} pages dirty for {writes} writes over {n} pages (expected {expected:.0})"
    );
    let rate_here = guest.dirty_rate_achieved();
    assert!(
        rate_here > 0.7 * f64::from(rate),
        "dirty_rate_achieved {rate_here:.1}"
    );

    guest.stop_dirty_log().unwrap();
    let mut bitmap = vec![0u64; bitmap_words(pages)];
    assert!(guest.read_and_clear_dirty(0, &mut bitmap).is_err());
}

#[test]
fn new_content_looks_like_its_class_and_is_unique() {
    let Some(_serial) = kvm_or_skip("new_content_looks_like_its_class") else {
        return;
    };
    let mut guest = KvmGuest::source(config(32, 100, 4)).unwrap();
    guest.start_dirty_log().unwrap();
    let _all = dirty_pages(&mut guest);
    sleep(Duration::from_millis(500));
    guest.pause().unwrap();
    let dirty = dirty_pages(&mut guest);
    let region = guest.region();
    let mut seen = HashSet::new();
    let (mut text_in, mut text_out, mut random_in, mut random_out) = (0usize, 0, 0usize, 0);
    for p in dirty {
        let Some(class) = guest.page_class(p) else {
            continue;
        };
        let page = read_page(&region, p);
        assert!(
            seen.insert(page.clone()),
            "page {p:#x} is a copy of another"
        );
        let packed = lz4_flex::block::compress(&page).len();
        match class {
            PageClass::Text => (text_in, text_out) = (text_in + PAGE_SIZE, text_out + packed),
            PageClass::Random => {
                (random_in, random_out) = (random_in + PAGE_SIZE, random_out + packed)
            }
            other => panic!("{other:?} page {p:#x} was dirtied"),
        }
    }
    let text = text_in as f64 / text_out as f64;
    let random = random_in as f64 / random_out as f64;
    eprintln!("LZ4 ratio of dirtied pages: text {text:.2}x, random {random:.3}x");
    assert!(text_in > 50 * PAGE_SIZE && random_in > 50 * PAGE_SIZE);
    assert!((1.6..=2.6).contains(&text), "text {text:.2}x");
    assert!(random <= 1.0, "random {random:.3}x");
}

#[test]
fn pause_stops_the_guest_and_resume_continues_it() {
    let Some(_serial) = kvm_or_skip("pause_stops_the_guest") else {
        return;
    };
    let mut guest = KvmGuest::source(config(32, 50, 5)).unwrap();
    guest.start_dirty_log().unwrap();
    assert!(wait_for(Duration::from_secs(2), || guest.counter() > 0));
    let mut latencies = Vec::new();
    for _ in 0..20 {
        sleep(Duration::from_millis(20));
        guest.pause().unwrap();
        latencies.push(guest.last_pause_latency().unwrap());
        assert!(!guest.is_running());
        let _ = dirty_pages(&mut guest);
        let at_pause = guest.counter();
        sleep(Duration::from_millis(30));
        assert_eq!(guest.counter(), at_pause, "counter moved while paused");
        assert!(
            dirty_pages(&mut guest).is_empty(),
            "pages dirtied while paused"
        );
        guest.resume().unwrap();
        assert!(
            wait_for(Duration::from_secs(1), || guest.counter() > at_pause),
            "counter stuck after resume"
        );
    }
    latencies.sort();
    eprintln!(
        "pause latency: min {:?} median {:?} max {:?}",
        latencies[0],
        latencies[latencies.len() / 2],
        latencies[latencies.len() - 1]
    );
    // Well under 1 ms where the host is quiet; the bound leaves room for a
    // loaded CI machine.
    assert!(latencies[latencies.len() / 2] < Duration::from_millis(20));
}

#[test]
fn throttle_slows_the_guest() {
    let Some(_serial) = kvm_or_skip("throttle_slows_the_guest") else {
        return;
    };
    let mut guest = KvmGuest::source(config(32, 80, 6)).unwrap();
    let measure = |guest: &KvmGuest| {
        let (w, t) = (guest.counter(), Instant::now());
        sleep(Duration::from_millis(500));
        (guest.counter() - w) as f64 * PAGE_SIZE as f64 / MIB as f64 / t.elapsed().as_secs_f64()
    };
    let full = measure(&guest);
    guest.throttle(50).unwrap();
    let half = measure(&guest);
    guest.throttle(0).unwrap();
    let again = measure(&guest);
    eprintln!("throttle: {full:.1} MiB/s, at 50% {half:.1} MiB/s, after {again:.1} MiB/s");
    assert!(
        (0.35..=0.65).contains(&(half / full)),
        "{half:.1} of {full:.1}"
    );
    assert!(again > 0.8 * full);
    assert!(guest.throttle(100).is_err());
}

#[test]
fn manual_migration_moves_a_running_guest() {
    let Some(_serial) = kvm_or_skip("manual_migration_moves_a_running_guest") else {
        return;
    };
    let cfg = config(32, 30, 7);
    let mut src = KvmGuest::source(cfg.clone()).unwrap();
    let mut dst = KvmGuest::destination(cfg).unwrap();
    let (from, to) = (
        SourceHypervisor::regions(&src)[0].clone(),
        DestHypervisor::regions(&dst)[0].clone(),
    );
    assert_eq!((from.gpa, from.len()), (to.gpa, to.len()));
    assert_eq!(dst.counter(), 0, "destination memory starts zero");
    assert!(wait_for(Duration::from_secs(2), || src.counter() > 0));

    // Round 0: the first read reports every page.
    src.start_dirty_log().unwrap();
    let all = dirty_pages(&mut src);
    assert_eq!(all.len(), from.pages());
    copy_pages(&from, &to, all);
    // A few rounds of what was dirtied meanwhile.
    for round in 1..=4 {
        sleep(Duration::from_millis(50));
        let dirty = dirty_pages(&mut src);
        eprintln!("round {round}: {} dirty pages", dirty.len());
        assert!(!dirty.is_empty());
        copy_pages(&from, &to, dirty);
    }
    // Stop and copy.
    src.pause().unwrap();
    let last = dirty_pages(&mut src);
    eprintln!(
        "stop-and-copy: {} pages, pause took {:?}",
        last.len(),
        src.last_pause_latency().unwrap()
    );
    copy_pages(&from, &to, last);
    let state = src.save_device_state().unwrap();
    let at_pause = src.counter();
    assert!(at_pause > 0);

    // A destination refuses to start without a state.
    assert!(DestHypervisor::resume(&mut dst).is_err());
    dst.load_device_state(&state).unwrap();

    // Memory is the same, page by page, before the destination runs.
    let (mut a, mut b) = (vec![0u8; PAGE_SIZE], vec![0u8; PAGE_SIZE]);
    for p in 0..from.pages() {
        from.read(p * PAGE_SIZE, &mut a).unwrap();
        to.read(p * PAGE_SIZE, &mut b).unwrap();
        assert!(a == b, "page {p:#x} differs");
    }
    assert_eq!(dst.counter(), at_pause);

    DestHypervisor::resume(&mut dst).unwrap();
    assert!(
        wait_for(Duration::from_secs(2), || dst.counter() > at_pause + 100),
        "destination counter {} (source stopped at {at_pause}); failure: {:?}",
        dst.counter(),
        dst.failure()
    );
    assert_eq!(dst.dirty_mibps(), 30, "the rate came with the state");
    // The source stays paused and unchanged.
    assert_eq!(src.counter(), at_pause);
    // The destination can be paused and saved in turn.
    dst.pause().unwrap();
    let again = dst.save_device_state().unwrap();
    assert_eq!(again.len(), state.len());
}

#[test]
fn load_device_state_rejects_bad_blobs() {
    let Some(_serial) = kvm_or_skip("load_device_state_rejects_bad_blobs") else {
        return;
    };
    let mut src = KvmGuest::source(config(16, 10, 8)).unwrap();
    // Saving needs a paused guest.
    assert!(src.save_device_state().is_err());
    src.pause().unwrap();
    let blob = src.save_device_state().unwrap();

    let mut dst = KvmGuest::destination(config(16, 10, 8)).unwrap();
    for n in [0, 1, 8, 16, blob.len() / 2, blob.len() - 1] {
        assert!(
            dst.load_device_state(&blob[..n]).is_err(),
            "truncated to {n}"
        );
    }
    let mut longer = blob.clone();
    longer.push(0);
    assert!(dst.load_device_state(&longer).is_err());
    for i in [0, 8, 12, 20, 100, blob.len() - 1] {
        let mut bad = blob.clone();
        bad[i] ^= 1;
        let err = dst.load_device_state(&bad).unwrap_err();
        eprintln!("byte {i} flipped: {err}");
    }
    assert!(dst.load_device_state(b"not a device state at all").is_err());
    assert!(
        DestHypervisor::resume(&mut dst).is_err(),
        "nothing was loaded"
    );

    // A state of another RAM size is refused.
    let mut other = KvmGuest::destination(config(32, 10, 8)).unwrap();
    let err = other.load_device_state(&blob).unwrap_err();
    assert!(err.to_string().contains("RAM"), "{err}");

    // The good blob still loads.
    dst.load_device_state(&blob).unwrap();
}

#[test]
fn a_destination_without_memory_fails_cleanly() {
    let Some(_serial) = kvm_or_skip("a_destination_without_memory_fails_cleanly") else {
        return;
    };
    let mut src = KvmGuest::source(config(16, 10, 10)).unwrap();
    src.pause().unwrap();
    let state = src.save_device_state().unwrap();
    // No page copied: the destination's page tables and program are zero.
    let mut dst = KvmGuest::destination(config(16, 10, 10)).unwrap();
    dst.load_device_state(&state).unwrap();
    DestHypervisor::resume(&mut dst).unwrap();
    assert!(
        wait_for(Duration::from_secs(2), || dst.failure().is_some()),
        "a guest without memory kept running"
    );
    eprintln!("destination failed as expected: {:?}", dst.failure());
    assert!(dst.pause().is_err());
    assert!(dst.save_device_state().is_err());
}

/// The numbers of the report: a 1 GiB guest at 30 and 100 MiB/s (and
/// more, to find where it tops out), with and without dirty logging, and
/// its pause latency. Slow (fills 1 GiB); run by hand:
/// `cargo test --release -p dwcp-migration --test kvm_guest -- --ignored --nocapture`.
#[test]
#[ignore = "fills a 1 GiB guest; run by hand for the numbers"]
fn one_gib_guest_rates() {
    let Some(_serial) = kvm_or_skip("one_gib_guest_rates") else {
        return;
    };
    let t = Instant::now();
    let mut guest = KvmGuest::source(config(1024, 30, 9)).unwrap();
    eprintln!("1 GiB guest built and started in {:?}", t.elapsed());
    let pages = guest.region().pages();
    let mut bitmap = vec![0u64; bitmap_words(pages)];
    for rate in [30u32, 100, 300, 1000, 3000] {
        guest.set_dirty_mibps(rate);
        for log in [false, true] {
            if log {
                guest.start_dirty_log().unwrap();
                guest.read_and_clear_dirty(0, &mut bitmap).unwrap();
            }
            sleep(Duration::from_millis(200));
            if log {
                guest.read_and_clear_dirty(0, &mut bitmap).unwrap();
            }
            let (w, t, cpu) = (guest.counter(), Instant::now(), vcpu_cpu_time());
            let mut dirty = 0u64;
            for _ in 0..10 {
                sleep(Duration::from_millis(200));
                if log {
                    guest.read_and_clear_dirty(0, &mut bitmap).unwrap();
                    dirty += bitmap
                        .iter()
                        .map(|w| u64::from(w.count_ones()))
                        .sum::<u64>();
                }
            }
            let secs = t.elapsed().as_secs_f64();
            let cpu = (vcpu_cpu_time() - cpu).as_secs_f64() / secs * 100.0;
            let achieved = (guest.counter() - w) as f64 * PAGE_SIZE as f64 / MIB as f64 / secs;
            eprintln!(
                "{rate:>5} MiB/s asked, dirty log {}: {achieved:7.1} MiB/s done, \
                 {:7.1} MiB/s of dirty pages seen, vCPU thread {cpu:5.1}% CPU",
                if log { "on " } else { "off" },
                dirty as f64 * PAGE_SIZE as f64 / MIB as f64 / secs
            );
            if log {
                guest.stop_dirty_log().unwrap();
            }
        }
    }
    guest.set_dirty_mibps(100);
    let mut latencies = Vec::new();
    for _ in 0..50 {
        sleep(Duration::from_millis(10));
        guest.pause().unwrap();
        latencies.push(guest.last_pause_latency().unwrap());
        guest.resume().unwrap();
    }
    latencies.sort();
    eprintln!(
        "pause latency at 100 MiB/s: min {:?} median {:?} p90 {:?} max {:?}",
        latencies[0], latencies[25], latencies[45], latencies[49]
    );
    assert_eq!(guest.failure(), None);
}

/// CPU time (user + system) of the vCPU thread(s) of this process, from
/// `/proc/self/task/*/stat`; zero where unreadable.
fn vcpu_cpu_time() -> Duration {
    let mut ticks = 0u64;
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return Duration::ZERO;
    };
    for task in tasks.flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if comm.trim() != "dwcp-vcpu0" {
            continue;
        }
        let stat = std::fs::read_to_string(task.path().join("stat")).unwrap_or_default();
        // Fields after the ")" that closes the name: state is field 3,
        // utime 14 and stime 15.
        if let Some((_, rest)) = stat.rsplit_once(')') {
            let fields: Vec<&str> = rest.split_whitespace().collect();
            for i in [11, 12] {
                ticks += fields
                    .get(i)
                    .and_then(|f| f.parse::<u64>().ok())
                    .unwrap_or(0);
            }
        }
    }
    // USER_HZ is 100 on Linux.
    Duration::from_millis(ticks * 10)
}
