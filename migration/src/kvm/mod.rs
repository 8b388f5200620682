//! A real KVM guest to migrate: one vCPU running a synthetic workload that
//! dirties memory at a chosen rate, behind [`SourceHypervisor`] and
//! [`DestHypervisor`].
//!
//! The guest is a small x86-64 program ([`program`]) that runs in long
//! mode at CPL 3 on identity-mapped page tables, without interrupts.
//! That mode is chosen for KVM in PVM mode (no VMX/SVM), where measured
//! here: code at CPL 0, in flat 32-bit protected mode without paging, or in
//! 32-bit compatibility mode is emulated instruction by instruction (about
//! 1.5 to 2 µs per instruction: a 32-bit flat guest reached 0.4 MiB/s of
//! page writes), 32-bit paging does not start at all (shutdown), while
//! 64-bit CPL-3 code runs natively. On VMX/SVM hosts the same setup simply
//! runs.
//!
//! Its memory holds the *standard workload* scaled to its RAM
//! ([`layout`]): a working set of RAM/2 (50% zero, 30% text-like, 20%
//! random pages), RAM*80/1024 of code-like pages that never change, the
//! rest zero. The guest rewrites random non-zero working-set pages at `R`
//! MiB/s (`R * 256` page writes per second): half of the writes rewrite the
//! whole page, half one 64-byte piece, always with new content of the
//! page's class that is a copy of no other page. It counts its writes in a
//! control page; after a migration the destination guest goes on counting
//! from where the source stopped.
//!
//! The source VMM fills the initial content before the guest starts (from
//! [`dwcp_codec::corpus`]) and never writes guest memory afterwards, so
//! KVM's dirty log is the whole truth about what changed. A destination
//! guest has the same RAM size, its memory stays untouched (zero) until the
//! migration writes into it through [`GuestRegion::write`], and its vCPU
//! starts only on `resume` after `load_device_state`.
//!
//! The vCPU runs in a thread of its own. The guest asks the VMM for a
//! budget of page writes with an `in` from an I/O port; the VMM answers
//! from a token bucket filled at the configured rate (about [`BATCH`] worth
//! per answer, at most [`BURST`] banked), and when there is nothing to
//! grant it waits before answering, so a slow or idle guest costs no CPU
//! (about 10% of a core at 30 MiB/s, mostly exits). `pause` kicks the
//! thread out of `KVM_RUN` with a signal (and `immediate_exit`), completes
//! any pending I/O exit, and returns once the thread is parked: about
//! 60 µs measured here. `throttle(p)` makes the vCPU sleep `p`% of every
//! [`THROTTLE_PERIOD`], and no budget is earned meanwhile.
//!
//! Dirty log: `start_dirty_log` sets `KVM_MEM_LOG_DIRTY_PAGES` on the RAM's
//! memory slot; the first `read_and_clear_dirty` after it reports every
//! page (the trait's contract: every page counts as dirty until first
//! read), later ones what KVM's `KVM_GET_DIRTY_LOG` reports. The device
//! state ([`state`]) is the vCPU's registers plus the RAM size and the
//! workload's rate, in a versioned, checksummed blob.
//!
//! ```no_run
//! use dwcp_migration::hv::{DestHypervisor, SourceHypervisor};
//! use dwcp_migration::kvm::{GuestConfig, KvmGuest};
//!
//! # fn main() -> Result<(), dwcp_migration::hv::HvError> {
//! let config = GuestConfig { ram: 64 << 20, dirty_mibps: 30, seed: 7 };
//! let mut src = KvmGuest::source(config.clone())?;
//! let mut dst = KvmGuest::destination(config)?;
//! src.start_dirty_log()?;
//! // ... copy pages from src.regions() to dst.regions() in rounds ...
//! src.pause()?;
//! let state = src.save_device_state()?;
//! dst.load_device_state(&state)?;
//! dst.resume()?;
//! # Ok(()) }
//! ```
//!
//! Linux on x86-64 only; [`kvm_available`] says whether this host can run
//! it.
#![cfg(all(target_os = "linux", target_arch = "x86_64"))]

pub mod layout;
pub(crate) mod memory;
pub mod program;
pub mod state;
mod vcpu;

use std::sync::Arc;
use std::time::{Duration, Instant};

use dwcp_codec::corpus::PageClass;
use kvm_bindings::{KVM_MEM_LOG_DIRTY_PAGES, kvm_userspace_memory_region};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};

use crate::hv::{
    DestHypervisor, GuestRegion, HvError, HvResult, PAGE_SIZE, SourceHypervisor, bitmap_words,
};
pub use layout::GuestLayout;
use layout::{CONTROL_GPA, CTL_TICKS, CTL_WRITES, PROGRAM_GPA};
use memory::GuestMemory;
use state::DeviceState;
pub use vcpu::{BATCH, BURST, IDLE_TICK, THROTTLE_PERIOD};

/// What guest to build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestConfig {
    /// RAM in bytes: a whole number of 4 MiB, 16 MiB to 3 GiB.
    pub ram: usize,
    /// Rate at which the guest dirties memory, MiB/s (`R * 256` page
    /// writes per second); 0: it only counts its budget requests, slowly.
    /// A destination takes the source's rate from the device state.
    pub dirty_mibps: u32,
    /// Seed of the initial content and of the guest's random choices
    /// (unused by a destination, whose content comes from the source).
    pub seed: u64,
}

impl Default for GuestConfig {
    /// 1 GiB of RAM dirtied at 30 MiB/s.
    fn default() -> Self {
        Self {
            ram: 1 << 30,
            dirty_mibps: 30,
            seed: 1,
        }
    }
}

/// Whether this host can run a [`KvmGuest`]: `Err` says why not (no
/// `/dev/kvm`, no permission, no VM could be created).
pub fn kvm_available() -> Result<(), String> {
    let kvm = Kvm::new().map_err(|e| format!("cannot open /dev/kvm: {e}"))?;
    kvm.create_vm()
        .map(drop)
        .map_err(|e| format!("/dev/kvm cannot create a VM: {e}"))
}

fn kvm_err(what: &str) -> impl FnOnce(kvm_ioctls::Error) -> HvError + '_ {
    move |e| HvError::new(what, e)
}

/// The memory slot of the guest's RAM.
const SLOT: u32 = 0;

/// A one-vCPU KVM guest running the synthetic workload.
///
/// Dropping it stops the vCPU thread, then closes the vCPU and the VM and
/// unmaps the RAM; [`GuestRegion`]s taken from it must not be used after
/// that.
#[derive(Debug)]
pub struct KvmGuest {
    // Drop order matters: the runner first (it stops and joins the vCPU
    // thread and closes the vCPU), then the VM, and the RAM last, since
    // KVM may use the RAM while the VM exists.
    runner: vcpu::VcpuRunner,
    vm: VmFd,
    memory: Arc<GuestMemory>,
    layout: GuestLayout,
    /// Class of every working-set page (empty on a destination).
    classes: Vec<PageClass>,
    dirty_log: bool,
    /// The next dirty-log read reports every page (first after start).
    report_all_dirty: bool,
    /// The vCPU has registers to run with: set up (source) or loaded.
    ready: bool,
    /// The vCPU has been resumed at least once by this VMM.
    started: bool,
    writes_at_start: u64,
    last_pause: Option<Duration>,
}

impl KvmGuest {
    /// Builds a source guest: fills its memory, sets up its vCPU and starts
    /// it.
    pub fn source(config: GuestConfig) -> HvResult<Self> {
        let mut guest = Self::create(&config)?;
        let program = program::assemble()?;
        guest.classes = memory::fill(&guest.memory.region(), &guest.layout, &program, config.seed)?;
        guest
            .runner
            .with_parked_vcpu("setting up the vCPU", setup_long_mode)??;
        guest.ready = true;
        guest.resume()?;
        Ok(guest)
    }

    /// Builds a destination guest: same RAM size, memory left zero, vCPU not
    /// started until [`DestHypervisor::resume`] after
    /// [`DestHypervisor::load_device_state`].
    pub fn destination(config: GuestConfig) -> HvResult<Self> {
        Self::create(&config)
    }

    /// Allocates all of the guest's RAM now ([`GuestMemory::populate`]):
    /// for a destination, before it accepts a migration, so that pages
    /// arriving are written without page faults and a host short of
    /// memory fails before the source sends anything. Returns how long it
    /// took, or `None` where the kernel cannot populate memory in advance
    /// (then pages are allocated as they arrive, as without this call).
    /// The memory stays zero ([`DestHypervisor::memory_is_zero`]).
    pub fn preallocate(&self) -> HvResult<Option<Duration>> {
        let t0 = Instant::now();
        Ok(self.memory.populate()?.then(|| t0.elapsed()))
    }

    fn create(config: &GuestConfig) -> HvResult<Self> {
        let layout = GuestLayout::new(config.ram)?;
        let kvm = Kvm::new().map_err(kvm_err("opening /dev/kvm"))?;
        let vm = kvm.create_vm().map_err(kvm_err("creating a VM"))?;
        let memory = Arc::new(GuestMemory::new(config.ram)?);
        set_memory_slot(&vm, &memory, false, "registering guest RAM")?;
        let vcpu = vm.create_vcpu(0).map_err(kvm_err("creating vCPU 0"))?;
        let runner = vcpu::VcpuRunner::spawn(vcpu, config.dirty_mibps)?;
        Ok(Self {
            runner,
            vm,
            memory,
            layout,
            classes: Vec::new(),
            dirty_log: false,
            report_all_dirty: false,
            ready: false,
            started: false,
            writes_at_start: 0,
            last_pause: None,
        })
    }

    /// The guest-physical layout.
    pub fn layout(&self) -> &GuestLayout {
        &self.layout
    }

    /// The one memory region: all of RAM at guest-physical 0.
    pub fn region(&self) -> GuestRegion {
        self.memory.region()
    }

    /// The guest's memory regions (one).
    pub fn regions(&self) -> Vec<GuestRegion> {
        vec![self.region()]
    }

    /// Class of guest page `page` (guest-physical address / 4096) if it is
    /// in the working set of a source guest, `None` otherwise.
    pub fn page_class(&self, page: usize) -> Option<PageClass> {
        let first = self.layout.working_set_gpa as usize / PAGE_SIZE;
        self.classes.get(page.checked_sub(first)?).copied()
    }

    /// Page writes the guest has done in its life (on a destination: since
    /// the source's start, once migrated). Read from the control page.
    pub fn counter(&self) -> u64 {
        // The control page is inside every accepted RAM size.
        self.memory
            .read_u64(CONTROL_GPA + u64::from(CTL_WRITES))
            .unwrap_or(0)
    }

    /// Budget requests the guest has made in its life (grows at 0 MiB/s
    /// too, about every [`IDLE_TICK`]).
    pub fn ticks(&self) -> u64 {
        self.memory
            .read_u64(CONTROL_GPA + u64::from(CTL_TICKS))
            .unwrap_or(0)
    }

    /// Time this VMM has let the guest run (paused time excluded).
    pub fn run_time(&self) -> Duration {
        self.runner.run_time()
    }

    /// Page writes done while this VMM ran the guest.
    pub fn writes_here(&self) -> u64 {
        self.counter().saturating_sub(self.writes_at_start)
    }

    /// Achieved dirty rate in MiB/s (4 KiB page writes, whole or piece,
    /// per second of [`Self::run_time`]); 0 before the guest ran.
    pub fn dirty_rate_achieved(&self) -> f64 {
        let secs = self.run_time().as_secs_f64();
        if secs == 0.0 {
            return 0.0;
        }
        self.writes_here() as f64 * PAGE_SIZE as f64 / f64::from(1 << 20) / secs
    }

    /// The configured dirty rate, MiB/s.
    pub fn dirty_mibps(&self) -> u32 {
        self.runner.dirty_mibps()
    }

    /// Changes the dirty rate, MiB/s (takes effect at the next budget
    /// request).
    pub fn set_dirty_mibps(&self, mibps: u32) {
        self.runner.set_dirty_mibps(mibps);
    }

    /// Whether the vCPU is running (resumed and not paused).
    pub fn is_running(&self) -> bool {
        self.runner.is_running()
    }

    /// Why the vCPU stopped, if the guest failed (an unexpected exit).
    pub fn failure(&self) -> Option<String> {
        self.runner.failure()
    }

    /// How long the last [`Self::pause`] took to stop the vCPU.
    pub fn last_pause_latency(&self) -> Option<Duration> {
        self.last_pause
    }

    /// Stops the vCPU; returns once it runs no guest code.
    pub fn pause(&mut self) -> HvResult<()> {
        let t = Instant::now();
        self.runner.pause()?;
        self.last_pause = Some(t.elapsed());
        Ok(())
    }

    /// Runs the vCPU (again). A destination must have loaded a device state
    /// first.
    pub fn resume(&mut self) -> HvResult<()> {
        if !self.ready {
            return Err(HvError::new(
                "resuming the guest",
                "no device state loaded yet",
            ));
        }
        if !self.started {
            self.writes_at_start = self.counter();
            self.started = true;
        }
        self.runner.resume()
    }

    fn set_throttle(&mut self, percent: u8) -> HvResult<()> {
        if percent > 99 {
            return Err(HvError::new(
                "throttling the vCPU",
                format!("{percent}% is more than 99%"),
            ));
        }
        self.runner.set_throttle(percent);
        Ok(())
    }

    fn save_state(&mut self) -> HvResult<Vec<u8>> {
        let what = "saving the device state";
        let (regs, sregs) = self
            .runner
            .with_parked_vcpu(what, |v| {
                Ok::<_, kvm_ioctls::Error>((v.get_regs()?, v.get_sregs()?))
            })?
            .map_err(kvm_err(what))?;
        Ok(state::encode(&DeviceState {
            ram: self.layout.ram as u64,
            dirty_mibps: self.runner.dirty_mibps(),
            regs,
            sregs,
        }))
    }

    fn load_state(&mut self, blob: &[u8]) -> HvResult<()> {
        let what = "loading the device state";
        let state = state::decode(blob).map_err(|e| HvError::new(what, e))?;
        if state.ram != self.layout.ram as u64 {
            return Err(HvError::new(
                what,
                format!(
                    "the source has {} bytes of RAM, this guest {}",
                    state.ram, self.layout.ram
                ),
            ));
        }
        if self.started {
            return Err(HvError::new(what, "this guest has already run"));
        }
        self.runner
            .with_parked_vcpu(what, |v| {
                v.set_sregs(&state.sregs)?;
                v.set_regs(&state.regs)
            })?
            .map_err(kvm_err(what))?;
        self.runner.set_dirty_mibps(state.dirty_mibps);
        self.ready = true;
        Ok(())
    }

    fn read_dirty(&mut self, region: usize, bitmap: &mut [u64]) -> HvResult<()> {
        let what = format!("dirty log of region {region}");
        if region != 0 {
            return Err(HvError::new(what, "the guest has one region (0)"));
        }
        let pages = self.layout.ram / PAGE_SIZE;
        if bitmap.len() != bitmap_words(pages) {
            return Err(HvError::new(
                what,
                format!(
                    "bitmap of {} words for {pages} pages (needs {})",
                    bitmap.len(),
                    bitmap_words(pages)
                ),
            ));
        }
        if !self.dirty_log {
            return Err(HvError::new(what, "dirty logging is not started"));
        }
        let log = self
            .vm
            .get_dirty_log(SLOT, self.layout.ram)
            .map_err(|e| HvError::new(what.clone(), e))?;
        if log.len() != bitmap.len() {
            return Err(HvError::new(
                what,
                format!("KVM returned {} words, not {}", log.len(), bitmap.len()),
            ));
        }
        if std::mem::take(&mut self.report_all_dirty) {
            bitmap.fill(u64::MAX);
            if !pages.is_multiple_of(64)
                && let Some(last) = bitmap.last_mut()
            {
                *last = (1u64 << (pages % 64)) - 1;
            }
        } else {
            bitmap.copy_from_slice(&log);
        }
        Ok(())
    }

    fn set_dirty_log(&mut self, on: bool) -> HvResult<()> {
        let what = if on {
            "starting the dirty log"
        } else {
            "stopping the dirty log"
        };
        set_memory_slot(&self.vm, &self.memory, on, what)?;
        self.dirty_log = on;
        self.report_all_dirty = on;
        Ok(())
    }
}

/// Registers (or re-registers with new flags) the RAM as slot 0.
fn set_memory_slot(vm: &VmFd, memory: &GuestMemory, log_dirty: bool, what: &str) -> HvResult<()> {
    let region = kvm_userspace_memory_region {
        slot: SLOT,
        flags: if log_dirty {
            KVM_MEM_LOG_DIRTY_PAGES
        } else {
            0
        },
        guest_phys_addr: 0,
        memory_size: memory.len() as u64,
        userspace_addr: memory.host_addr() as u64,
    };
    // SAFETY: the range is one mapping owned by `memory`, which the owning
    // `KvmGuest` drops only after the VM (field order), so it stays valid
    // for as long as KVM may use it; changing only the flags of an existing
    // slot is allowed at any time.
    unsafe { vm.set_user_memory_region(region) }.map_err(kvm_err(what))
}

/// Puts a fresh vCPU in 64-bit long mode at CPL 3 on the identity page
/// tables, at the program's entry.
fn setup_long_mode(vcpu: &VcpuFd) -> HvResult<()> {
    let what = "setting up the vCPU";
    let mut sregs = vcpu.get_sregs().map_err(kvm_err(what))?;
    let user = |selector: u16, type_: u8, l: u8, db: u8| kvm_bindings::kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 3,
        db,
        s: 1,
        l,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    };
    // Code: 64-bit, execute/read, accessed (11); data: read/write,
    // accessed (3). The selectors (RPL 3) are nominal: there is no GDT and
    // nothing reloads them.
    sregs.cs = user(0x2b, 11, 1, 0);
    for seg in [
        &mut sregs.ds,
        &mut sregs.es,
        &mut sregs.fs,
        &mut sregs.gs,
        &mut sregs.ss,
    ] {
        *seg = user(0x23, 3, 0, 1);
    }
    sregs.cr3 = layout::PML4_GPA;
    sregs.cr4 = CR4_PAE;
    sregs.cr0 = CR0_PE | CR0_ET | CR0_NE | CR0_PG;
    sregs.efer = EFER_LME | EFER_LMA;
    vcpu.set_sregs(&sregs).map_err(kvm_err(what))?;
    let regs = kvm_bindings::kvm_regs {
        rip: PROGRAM_GPA,
        // IOPL 3 lets CPL-3 code use `in`; IF clear: no interrupts; bit 1
        // is reserved and set.
        rflags: RFLAGS_IOPL3 | 0x2,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(kvm_err(what))
}

const CR0_PE: u64 = 1;
const CR0_ET: u64 = 1 << 4;
const CR0_NE: u64 = 1 << 5;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
const RFLAGS_IOPL3: u64 = 3 << 12;

impl SourceHypervisor for KvmGuest {
    fn regions(&self) -> Vec<GuestRegion> {
        KvmGuest::regions(self)
    }

    /// Starts KVM's dirty log; the first read afterwards reports every
    /// page (the trait's contract), later ones what the guest wrote since.
    fn start_dirty_log(&mut self) -> HvResult<()> {
        self.set_dirty_log(true)
    }

    fn read_and_clear_dirty(&mut self, region: usize, bitmap: &mut [u64]) -> HvResult<()> {
        self.read_dirty(region, bitmap)
    }

    fn stop_dirty_log(&mut self) -> HvResult<()> {
        self.set_dirty_log(false)
    }

    fn pause(&mut self) -> HvResult<()> {
        KvmGuest::pause(self)
    }

    fn resume(&mut self) -> HvResult<()> {
        KvmGuest::resume(self)
    }

    fn throttle(&mut self, percent: u8) -> HvResult<()> {
        self.set_throttle(percent)
    }

    fn save_device_state(&mut self) -> HvResult<Vec<u8>> {
        self.save_state()
    }
}

impl DestHypervisor for KvmGuest {
    fn regions(&self) -> Vec<GuestRegion> {
        KvmGuest::regions(self)
    }

    /// A destination's RAM is a fresh anonymous mapping that only a
    /// migration writes, until its vCPU first runs.
    fn memory_is_zero(&self) -> bool {
        !self.ready && !self.started && self.classes.is_empty()
    }

    fn load_device_state(&mut self, blob: &[u8]) -> HvResult<()> {
        self.load_state(blob)
    }

    fn resume(&mut self) -> HvResult<()> {
        KvmGuest::resume(self)
    }
}
