//! A guest without a hypervisor: memory in this process and a thread that
//! dirties it like the KVM test guest's workload (random non-zero pages of
//! a working set, full-page and 64-byte rewrites at R MiB/s), with a
//! software dirty log. For machines without `/dev/kvm` (the demo's
//! fallback) and for tests of the migration drivers.
//!
//! Page 0 holds the guest's write counter (its first 8 bytes), so a
//! migrated guest's memory says how far it got; the device state is that
//! counter and the writer's random state.

use std::alloc::Layout;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use dwcp_codec::corpus::{ClassMix, PageClass, Rng, fill_page};

use crate::hv::{
    DestHypervisor, GuestRegion, HvError, HvResult, PAGE_SIZE, SourceHypervisor, bitmap_words,
};

const MAGIC: &[u8; 8] = b"DWCPSYN1";

/// Zeroed memory from the allocator (lazily backed by the kernel), freed on
/// drop.
struct Memory {
    ptr: NonNull<u8>,
    layout: Layout,
}

// SAFETY: plain memory owned by this value, only accessed through
// `GuestRegion`'s volatile copies.
unsafe impl Send for Memory {}
// SAFETY: as for `Send`.
unsafe impl Sync for Memory {}

impl Drop for Memory {
    fn drop(&mut self) {
        // SAFETY: allocated in `Memory::new` with this layout, freed once.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), self.layout) };
    }
}

struct Shared {
    region: GuestRegion,
    dirty: Vec<AtomicU64>,
    logging: AtomicBool,
    running: AtomicBool,
    stop: AtomicBool,
    throttle: std::sync::atomic::AtomicU8,
    counter: AtomicU64,
    rng: Mutex<u64>,
    rate: u32,
    /// Non-zero pages of the working set, with their class.
    pages: Vec<(u32, PageClass)>,
}

/// The synthetic guest.
pub struct SyntheticGuest {
    shared: Arc<Shared>,
    writer: Option<JoinHandle<()>>,
}

impl SyntheticGuest {
    fn create(ram: usize, dirty_mibps: u32, fill: Option<u64>) -> HvResult<Self> {
        if ram < 16 * PAGE_SIZE || !ram.is_multiple_of(PAGE_SIZE) {
            return Err(HvError::new(
                "synthetic guest",
                format!("RAM of {ram} bytes"),
            ));
        }
        let layout = Layout::from_size_align(ram, PAGE_SIZE)
            .map_err(|e| HvError::new("synthetic guest", e))?;
        // SAFETY: `layout` has a non-zero size.
        let ptr = NonNull::new(unsafe { std::alloc::alloc_zeroed(layout) })
            .ok_or_else(|| HvError::new("synthetic guest", "out of memory"))?;
        let mem = Arc::new(Memory { ptr, layout });
        // SAFETY: `ptr..ptr + ram` is one allocation owned by `mem`, which
        // the region holds; only volatile copies touch it.
        let region = unsafe { GuestRegion::with_owner(0, ptr, ram, mem) };
        let total = ram / PAGE_SIZE;
        // Working set: the second half of RAM, the migration mix, in class
        // order (the same for source and destination).
        let ws = total / 2;
        let counts = ClassMix::MIGRATION_WORKING_SET.page_counts(ws);
        let mut pages = Vec::new();
        let mut p = total - ws;
        for (class, n) in [
            PageClass::Zero,
            PageClass::Text,
            PageClass::Code,
            PageClass::Random,
        ]
        .into_iter()
        .zip(counts)
        {
            for _ in 0..n {
                if class != PageClass::Zero {
                    pages.push((p as u32, class));
                }
                p += 1;
            }
        }
        if let Some(seed) = fill {
            let mut rng = Rng::new(seed);
            let mut page = vec![0u8; PAGE_SIZE];
            for &(p, class) in &pages {
                fill_page(class, &mut rng, &mut page);
                region.write(p as usize * PAGE_SIZE, &page)?;
            }
        }
        let shared = Arc::new(Shared {
            region,
            dirty: (0..bitmap_words(total))
                .map(|_| AtomicU64::new(0))
                .collect(),
            logging: AtomicBool::new(false),
            running: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            throttle: Default::default(),
            counter: AtomicU64::new(0),
            rng: Mutex::new(fill.unwrap_or(1) | 1),
            rate: dirty_mibps,
            pages,
        });
        let s = shared.clone();
        let writer = std::thread::Builder::new()
            .name("dwcp-synth-guest".into())
            .spawn(move || write_loop(&s))
            .map_err(|e| HvError::new("synthetic guest thread", e))?;
        Ok(SyntheticGuest {
            shared,
            writer: Some(writer),
        })
    }

    /// A running source guest of `ram` bytes dirtying `dirty_mibps`.
    pub fn source(ram: usize, dirty_mibps: u32, seed: u64) -> HvResult<Self> {
        let g = Self::create(ram, dirty_mibps, Some(seed))?;
        g.shared.running.store(true, Ordering::Release);
        Ok(g)
    }

    /// A stopped destination of `ram` bytes, memory zero; it dirties at the
    /// same rate once started.
    pub fn destination(ram: usize, dirty_mibps: u32) -> HvResult<Self> {
        Self::create(ram, dirty_mibps, None)
    }

    /// Writes done so far (what page 0 says).
    pub fn counter(&self) -> u64 {
        self.shared.counter.load(Ordering::Acquire)
    }

    /// The memory.
    pub fn region(&self) -> GuestRegion {
        self.shared.region.clone()
    }
}

impl Drop for SyntheticGuest {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        if let Some(h) = self.writer.take() {
            let _ = h.join();
        }
    }
}

fn next(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

fn write_loop(s: &Shared) {
    let mut page = vec![0u8; PAGE_SIZE];
    let mut last = Instant::now();
    let mut budget = 0.0f64;
    let per_sec = f64::from(s.rate) * 256.0;
    while !s.stop.load(Ordering::Acquire) {
        std::thread::sleep(Duration::from_millis(2));
        let now = Instant::now();
        let dt = now.duration_since(last).as_secs_f64();
        last = now;
        if !s.running.load(Ordering::Acquire) || s.pages.is_empty() {
            budget = 0.0;
            continue;
        }
        let idle = f64::from(s.throttle.load(Ordering::Relaxed)) / 100.0;
        budget = (budget + dt * per_sec * (1.0 - idle)).min(per_sec * 0.01 + 1.0);
        let mut rng = *s.rng.lock().unwrap_or_else(|p| p.into_inner());
        while budget >= 1.0 && s.running.load(Ordering::Acquire) {
            budget -= 1.0;
            let (p, class) = s.pages[(next(&mut rng) % s.pages.len() as u64) as usize];
            let at = p as usize * PAGE_SIZE;
            let mut r = Rng::new(next(&mut rng));
            if next(&mut rng) & 1 == 0 {
                fill_page(class, &mut r, &mut page);
                let _ = s.region.write(at, &page);
            } else {
                let off = (next(&mut rng) % (PAGE_SIZE as u64 / 64)) as usize * 64;
                fill_page(class, &mut r, &mut page[..64]);
                let _ = s.region.write(at + off, &page[..64]);
            }
            let n = s.counter.fetch_add(1, Ordering::AcqRel) + 1;
            let _ = s.region.write(0, &n.to_le_bytes());
            if s.logging.load(Ordering::Acquire) {
                for q in [0, p as usize] {
                    s.dirty[q / 64].fetch_or(1 << (q % 64), Ordering::AcqRel);
                }
            }
        }
        *s.rng.lock().unwrap_or_else(|p| p.into_inner()) = rng;
    }
}

impl SourceHypervisor for SyntheticGuest {
    fn regions(&self) -> Vec<GuestRegion> {
        vec![self.region()]
    }
    fn start_dirty_log(&mut self) -> HvResult<()> {
        for w in &self.shared.dirty {
            w.store(u64::MAX, Ordering::Release);
        }
        self.shared.logging.store(true, Ordering::Release);
        Ok(())
    }
    fn read_and_clear_dirty(&mut self, region: usize, bitmap: &mut [u64]) -> HvResult<()> {
        if region != 0 || bitmap.len() != self.shared.dirty.len() {
            return Err(HvError::new(
                "dirty log",
                "no such region or wrong bitmap length",
            ));
        }
        for (out, w) in bitmap.iter_mut().zip(&self.shared.dirty) {
            *out = w.swap(0, Ordering::AcqRel);
        }
        Ok(())
    }
    fn stop_dirty_log(&mut self) -> HvResult<()> {
        self.shared.logging.store(false, Ordering::Release);
        Ok(())
    }
    fn pause(&mut self) -> HvResult<()> {
        self.shared.running.store(false, Ordering::Release);
        // The writer checks between writes; take its lock to be sure the
        // write in progress (and its rng update) is over.
        drop(self.shared.rng.lock().unwrap_or_else(|p| p.into_inner()));
        std::thread::sleep(Duration::from_millis(3));
        Ok(())
    }
    fn resume(&mut self) -> HvResult<()> {
        self.shared.running.store(true, Ordering::Release);
        Ok(())
    }
    fn throttle(&mut self, percent: u8) -> HvResult<()> {
        self.shared
            .throttle
            .store(percent.min(99), Ordering::Relaxed);
        Ok(())
    }
    fn save_device_state(&mut self) -> HvResult<Vec<u8>> {
        let mut b = MAGIC.to_vec();
        b.extend_from_slice(&self.counter().to_le_bytes());
        let rng = *self.shared.rng.lock().unwrap_or_else(|p| p.into_inner());
        b.extend_from_slice(&rng.to_le_bytes());
        Ok(b)
    }
}

impl DestHypervisor for SyntheticGuest {
    fn regions(&self) -> Vec<GuestRegion> {
        vec![self.region()]
    }
    fn load_device_state(&mut self, blob: &[u8]) -> HvResult<()> {
        if blob.len() != 24 || &blob[..8] != MAGIC {
            return Err(HvError::new(
                "synthetic device state",
                format!("{} bytes, not a synthetic guest's state", blob.len()),
            ));
        }
        let word = |i: usize| u64::from_le_bytes(blob[i..i + 8].try_into().unwrap_or_default());
        self.shared.counter.store(word(8), Ordering::Release);
        *self.shared.rng.lock().unwrap_or_else(|p| p.into_inner()) = word(16) | 1;
        Ok(())
    }
    fn resume(&mut self) -> HvResult<()> {
        SourceHypervisor::resume(self)
    }
}
