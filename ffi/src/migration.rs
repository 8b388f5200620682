//! Live migration for hypervisors: the hypervisor side is a table of C
//! callbacks; this library runs the pre-copy rounds, the stop-and-copy and
//! the transfer.

use std::ffi::{c_char, c_int, c_void};
use std::ptr::NonNull;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ::dwcp_engine::Engine;
use ::dwcp_migration::controller::{ControllerConfig, Decision, RoundMetrics};
use ::dwcp_migration::hv::{
    DestHypervisor, GuestRegion, HvError, HvResult, PAGE_SIZE, SourceHypervisor, bitmap_words,
};
use ::dwcp_migration::precopy::{
    CancelToken, Incoming, IncomingReport, MAX_DEVICE_STATE, MigrateConfig, memory_digest,
    migrate_out,
};
use dwcp_transport::{Receiver, Sender};

use crate::engine::dwcp_engine;
use crate::ptr::{self, User, handle, millis, out, write};
use crate::status::{Error, Result, call, call_void, copy_str_out, dwcp_status};
use crate::transfer::{dwcp_connect_options, dwcp_listen_options, lock, policy, resolve};

/// One range of guest-physical memory and where this process maps it.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct dwcp_region {
    /// Guest-physical base address; a multiple of 4096.
    pub gpa: u64,
    /// Where the range is mapped in this process: readable and writable,
    /// mapped until the migration handle is freed.
    pub host: *mut c_void,
    /// Length in bytes: a multiple of 4096, not 0. Dirty bitmaps count its
    /// 4 KiB pages.
    pub len: u64,
    /// `DWCP_REGION_*` flags, or 0. Unknown bits are refused.
    pub flags: u32,
}

/// `dwcp_region::flags`: the range is private anonymous memory
/// (`mmap(MAP_PRIVATE | MAP_ANONYMOUS)`, or `malloc`), neither shared nor
/// file-backed, so that a page with no page-table entry in this process
/// (never written by the VMM nor by the guest through KVM, or dropped
/// with `MADV_DONTNEED`) and not swapped out reads as zero. A source then
/// sends such pages as zero pages without reading them (Linux
/// `/proc/self/pagemap`), which saves a page fault per untouched page.
/// Wrong for memory that is also mapped elsewhere (a memfd, shared
/// memory) or registered with `userfaultfd`: do not set it there. `host` must then be 4 KiB aligned.
pub const DWCP_REGION_PRIVATE_ANONYMOUS: u32 = 1;

/// The hypervisor side of a migration: what the library asks of the VMM.
///
/// Every callback gets the `user` pointer given with the table and returns
/// 0 on success; any other value is a failure, which cancels the migration
/// (the value is quoted in the error message, with the reason the callback
/// gave `dwcp_callback_error()`, if it did). A source uses
/// `start_dirty_log`, `read_and_clear_dirty`, `stop_dirty_log`, `pause`,
/// `resume`, `save_device_state` (all required) and `throttle` (optional:
/// NULL disables throttling); they are called from the thread that called
/// `dwcp_migration_migrate_to()`, one at a time. A destination uses
/// `load_device_state` and `resume` (required), called from a library
/// thread, one at a time; the others may be NULL there.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct dwcp_hv_callbacks {
    /// Starts dirty tracking of every region (e.g. set
    /// `KVM_MEM_LOG_DIRTY_PAGES`). Right after it the library reads every
    /// region's bitmap once and discards it (round 0 sends every page
    /// anyway), so a tracker may report all pages on that first read.
    pub start_dirty_log: Option<unsafe extern "C" fn(user: *mut c_void) -> c_int>,
    /// Writes the dirty bitmap of region `region` (an index into the
    /// regions given at creation) into `bitmap`: exactly `words` 64-bit
    /// words, bit `i % 64` of word `i / 64` for page `i`, then clears it.
    /// Must set `*written` to the number of words written (`words`); any
    /// other count, or bits past the region's last page, cancel the
    /// migration with `DWCP_STATUS_CALLBACK_BAD_DATA`.
    pub read_and_clear_dirty: Option<
        unsafe extern "C" fn(
            user: *mut c_void,
            region: u32,
            bitmap: *mut u64,
            words: usize,
            written: *mut usize,
        ) -> c_int,
    >,
    /// Stops dirty tracking.
    pub stop_dirty_log: Option<unsafe extern "C" fn(user: *mut c_void) -> c_int>,
    /// Stops every vCPU; returns once none runs guest code.
    pub pause: Option<unsafe extern "C" fn(user: *mut c_void) -> c_int>,
    /// Runs the vCPUs (source: again after `pause`; destination: for the
    /// first time, after `load_device_state`).
    pub resume: Option<unsafe extern "C" fn(user: *mut c_void) -> c_int>,
    /// Leaves `percent` (0 to 99) of the guest's time idle to slow its
    /// writes; 0 ends throttling. May be NULL.
    pub throttle: Option<unsafe extern "C" fn(user: *mut c_void, percent: u32) -> c_int>,
    /// Writes the paused guest's device state (vCPU registers and the
    /// like), an opaque blob, into `buf` (`cap` bytes: the
    /// `max_device_state` option) and its length into `*len`. A length
    /// over `cap` cancels the migration with
    /// `DWCP_STATUS_CALLBACK_BAD_DATA`.
    pub save_device_state: Option<
        unsafe extern "C" fn(user: *mut c_void, buf: *mut u8, cap: usize, len: *mut usize) -> c_int,
    >,
    /// Loads a device state saved by the source (`len` bytes at `blob`,
    /// valid during the call). Must refuse a malformed blob (return
    /// non-zero), never crash on one.
    pub load_device_state:
        Option<unsafe extern "C" fn(user: *mut c_void, blob: *const u8, len: usize) -> c_int>,
}

/// The controller's decision after a round.
pub const DWCP_DECISION_CONTINUE: u32 = 0;
/// The controller's decision after a round: pause and copy the rest.
pub const DWCP_DECISION_STOP_AND_COPY: u32 = 1;
/// The controller's decision after a round: give up (the guest runs on).
pub const DWCP_DECISION_CANCEL: u32 = 2;

/// One pre-copy round, as the round callback hears it.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct dwcp_round_report {
    /// Round number (0 sends every page).
    pub round: u32,
    /// When it started, in ms since the migration started.
    pub started_ms: f64,
    /// When it ended (its bitmap read), in ms since the start.
    pub ended_ms: f64,
    /// Pages sent.
    pub pages_sent: u64,
    /// Of those, zero pages (sent as tags).
    pub zero_pages: u64,
    /// Guest bytes sent.
    pub bytes_sent: u64,
    /// Bytes on the wire.
    pub wire_bytes: u64,
    /// The dirty set in hand at its end, in pages.
    pub dirty_pages: u64,
    /// Estimated dirty rate, MiB/s.
    pub dirty_rate_mibps: f64,
    /// Wire bandwidth used for the prediction, Gbit/s; negative when
    /// unknown.
    pub bandwidth_gbps: f64,
    /// Guest bytes per wire byte of the round; negative when nothing went
    /// on the wire.
    pub ratio: f64,
    /// Predicted downtime of stopping after this round, ms; negative when
    /// unknown.
    pub predicted_downtime_ms: f64,
    /// Throttle in effect, percent.
    pub throttle: u32,
    /// `DWCP_DECISION_*`.
    pub decision: u32,
}

impl From<&RoundMetrics> for dwcp_round_report {
    fn from(m: &RoundMetrics) -> Self {
        dwcp_round_report {
            round: m.round,
            started_ms: ms(m.started),
            ended_ms: ms(m.ended),
            pages_sent: m.pages_sent,
            zero_pages: m.zero_pages,
            bytes_sent: m.bytes_sent,
            wire_bytes: m.wire_bytes,
            dirty_pages: m.dirty_pages,
            dirty_rate_mibps: m.dirty_rate_mib_s(),
            bandwidth_gbps: m.wire_gbit_s().unwrap_or(-1.0),
            ratio: m.ratio.unwrap_or(-1.0),
            predicted_downtime_ms: m.predicted_downtime.map_or(-1.0, ms),
            throttle: u32::from(m.throttle),
            decision: match m.decision {
                Decision::Continue { .. } => DWCP_DECISION_CONTINUE,
                Decision::StopAndCopy { .. } => DWCP_DECISION_STOP_AND_COPY,
                Decision::Cancel(_) => DWCP_DECISION_CANCEL,
            },
        }
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// A round callback: runs on the migrating thread after each round's
/// decision; keep it short (it delays the next round).
pub type dwcp_round_fn =
    Option<unsafe extern "C" fn(user: *mut c_void, round: *const dwcp_round_report)>;

/// Options of a migration. Initialise with
/// `dwcp_migration_options_default()`, then change what you need.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct dwcp_migration_options {
    /// Longest acceptable downtime the controller plans for, ms (50).
    pub downtime_limit_ms: u32,
    /// Give up (the guest runs on) when no stop is possible this long after
    /// the start, ms; 0 for no deadline.
    pub deadline_ms: u32,
    /// Give up after this many rounds without a stop (30).
    pub max_rounds: u32,
    /// Let the controller throttle a guest that dirties memory faster than
    /// the link carries it (needs the `throttle` callback).
    pub allow_throttle: bool,
    /// Codec policy of the page frames, a `DWCP_MODE_*` value.
    pub mode: u32,
    /// Page encoders working in parallel (1 to 64).
    pub shards: u32,
    /// Largest device state, bytes (at most 16 MiB).
    pub max_device_state: u64,
    /// Destination: the most bytes of received page batches held before
    /// they are applied.
    pub max_buffered: u64,
    /// Destination: the regions are known to be all zero (a fresh
    /// anonymous mapping nothing wrote), so `dwcp_migration_dest_new()`
    /// need not read them all to zero what is not. Set it only when true:
    /// stale bytes would stay where the source has zero pages.
    pub dest_memory_zero: bool,
    /// Destination: allocate (and touch) the page codec's state now, in
    /// `dwcp_migration_dest_new()`, sized by `shards` and `codec_state` as
    /// the source's must be, so that its page faults are not taken while
    /// pages arrive (measured: about 7% of two cores during round 0). It
    /// costs that memory (by default half the guest's size) from then on.
    /// Off by default.
    pub dest_prealloc_state: bool,
    /// Source: bytes of sent page versions the page codec keeps (at each
    /// end, over all shards) so that pages dirtied again go out as deltas;
    /// 0 for the default, half the guest's memory (at most 1 GiB, at least
    /// 64 MiB per shard). The destination refuses more than its guest's
    /// size. Memory is only used as pages are sent.
    pub codec_state: u64,
    /// Source: keep round 0's pages in that state too (true, the
    /// default), those of the stripes the guest is seen writing (every
    /// page until the first dirty-log read, 50 ms in; with two or more
    /// shards). False sends round 0 through stateless encoders: the
    /// state starts with the pages dirtied again, unless a dirty-log
    /// probe 250 ms in finds the guest dirtying more than half the link
    /// (docs/migration.md).
    pub round0_codec_state: bool,
    /// The link's rate in bits per second, for `DWCP_MODE_AUTO`; 0 to let
    /// the transport measure it.
    pub link_rate: u64,
    /// Hears every round (source; may be NULL).
    pub on_round: dwcp_round_fn,
    /// Passed back to `on_round`.
    pub on_round_user: *mut c_void,
}

/// Writes the default migration options into `*out`: 50 ms downtime, no
/// deadline, 30 rounds, throttling allowed, `DWCP_MODE_DATACENTER`, 2
/// shards, 1 MiB of device state, 1 GiB buffered, the default codec state
/// (not allocated in advance), no round callback.
///
/// # Safety
/// `out` must be valid for one write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn dwcp_migration_options_default(
    out_opts: *mut dwcp_migration_options,
) -> dwcp_status {
    call(|| {
        let o = out(out_opts, "out")?;
        // SAFETY: checked non-NULL; valid for a write (caller's contract).
        unsafe { write(o, migration_defaults()) };
        Ok(())
    })
}

fn migration_defaults() -> dwcp_migration_options {
    dwcp_migration_options {
        downtime_limit_ms: 50,
        deadline_ms: 0,
        max_rounds: 30,
        allow_throttle: true,
        mode: crate::transfer::DWCP_MODE_DATACENTER,
        shards: 2,
        max_device_state: 1 << 20,
        max_buffered: 1 << 30,
        dest_memory_zero: false,
        dest_prealloc_state: false,
        codec_state: 0,
        round0_codec_state: MigrateConfig::default().round0_codec_state,
        link_rate: 0,
        on_round: None,
        on_round_user: std::ptr::null_mut(),
    }
}

impl dwcp_migration_options {
    fn config(&self, can_throttle: bool) -> Result<MigrateConfig> {
        let bad = |m: String| Error::invalid(format!("migration options: {m}"));
        if self.shards == 0 || self.shards > 64 {
            return Err(bad(format!("shards {} is not 1 to 64", self.shards)));
        }
        if self.max_device_state == 0 || self.max_device_state > MAX_DEVICE_STATE as u64 {
            return Err(bad(format!(
                "max_device_state {} is not 1 to {MAX_DEVICE_STATE}",
                self.max_device_state
            )));
        }
        if self.max_buffered < (16 << 20) {
            return Err(bad(format!(
                "max_buffered {} is less than 16 MiB",
                self.max_buffered
            )));
        }
        let controller = ControllerConfig {
            downtime_limit: millis(self.downtime_limit_ms),
            deadline: (self.deadline_ms > 0).then(|| millis(self.deadline_ms)),
            max_rounds: self.max_rounds,
            allow_throttle: self.allow_throttle && can_throttle,
            ..ControllerConfig::default()
        };
        controller.validate().map_err(|e| bad(e.to_string()))?;
        Ok(MigrateConfig {
            controller,
            policy: policy(self.mode, self.link_rate, "migration options")?,
            shards: self.shards as usize,
            codec_state: (self.codec_state > 0)
                .then(|| usize::try_from(self.codec_state).unwrap_or(usize::MAX)),
            round0_codec_state: self.round0_codec_state,
            cancel: CancelToken::new(),
        })
    }
}

/// The final report of a migration that completed.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct dwcp_migration_report {
    /// Pre-copy rounds.
    pub rounds: u32,
    /// Pages sent, rounds and stop-and-copy.
    pub pages_sent: u64,
    /// Guest bytes sent.
    pub bytes_sent: u64,
    /// Bytes the session put on its sockets.
    pub wire_bytes: u64,
    /// Highest throttle asked for, percent.
    pub max_throttle: u32,
    /// Whether the controller stopped under the downtime limit (false: it
    /// stopped at the deadline or round limit, over the limit).
    pub converged: bool,
    /// From the start of round 0 to the destination's confirmation that
    /// its guest runs, ms.
    pub total_ms: f64,
    /// From the source's pause to that confirmation, ms.
    pub downtime_ms: f64,
    /// What the controller predicted for the downtime, ms; negative when
    /// unknown.
    pub predicted_downtime_ms: f64,
}

/// What a destination did.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct dwcp_incoming_report {
    /// Pages written into guest memory.
    pub pages: u64,
    /// Page batches applied.
    pub batches: u64,
    /// From the source's last message to the guest running, ms.
    pub finish_ms: f64,
    /// `dwcp_memory_digest()` of the memory as the migration left it, for
    /// comparing with the source's.
    pub memory_digest: [u8; 32],
}

impl From<IncomingReport> for dwcp_incoming_report {
    fn from(r: IncomingReport) -> Self {
        dwcp_incoming_report {
            pages: r.pages,
            batches: r.batches,
            finish_ms: ms(r.finish),
            memory_digest: r.memory_digest,
        }
    }
}

/// Checks the caller's regions and describes them for the migration.
///
/// # Safety
/// `regions` must be NULL or valid for `n` reads, each region's `host`
/// valid as `dwcp_region` says.
unsafe fn guest_regions(regions: *const dwcp_region, n: usize) -> Result<Vec<GuestRegion>> {
    // SAFETY: the caller's contract.
    let rs = unsafe { ptr::array(regions, n, "regions") }?;
    if rs.is_empty() {
        return Err(Error::invalid("no regions given"));
    }
    if rs.len() > u32::MAX as usize {
        return Err(Error::invalid("too many regions"));
    }
    let mut spans: Vec<(u64, u64, usize)> = Vec::with_capacity(rs.len());
    let mut out = Vec::with_capacity(rs.len());
    for (i, r) in rs.iter().enumerate() {
        let bad = |m: String| Error::invalid(format!("region {i}: {m}"));
        if r.len == 0 {
            return Err(bad("length 0".into()));
        }
        if !r.len.is_multiple_of(PAGE_SIZE as u64) {
            return Err(bad(format!("length {} is not a multiple of 4096", r.len)));
        }
        if !r.gpa.is_multiple_of(PAGE_SIZE as u64) {
            return Err(bad(format!("gpa {:#x} is not 4 KiB aligned", r.gpa)));
        }
        let end = r
            .gpa
            .checked_add(r.len)
            .ok_or_else(|| bad("gpa + len overflows".into()))?;
        let len = usize::try_from(r.len)
            .ok()
            .filter(|l| *l <= isize::MAX as usize)
            .ok_or_else(|| bad(format!("length {} does not fit in memory", r.len)))?;
        if (r.host as usize).checked_add(len).is_none() {
            return Err(bad("host + len overflows".into()));
        }
        let host = NonNull::new(r.host.cast::<u8>()).ok_or_else(|| bad("host is NULL".into()))?;
        spans.push((r.gpa, end, i));
        if r.flags & !DWCP_REGION_PRIVATE_ANONYMOUS != 0 {
            return Err(bad(format!("unknown flags {:#x}", r.flags)));
        }
        if r.flags & DWCP_REGION_PRIVATE_ANONYMOUS != 0
            && !(r.host as usize).is_multiple_of(PAGE_SIZE)
        {
            return Err(bad(
                "DWCP_REGION_PRIVATE_ANONYMOUS needs a 4 KiB aligned host address".into(),
            ));
        }
        // SAFETY: the caller promises the mapping is readable, writable
        // and mapped until the migration handle is freed, which outlives
        // every use of the region (the handle owns the migration).
        let region = unsafe { GuestRegion::new(r.gpa, host, len) };
        out.push(if r.flags & DWCP_REGION_PRIVATE_ANONYMOUS != 0 {
            region.with_private_anonymous_memory()
        } else {
            region
        });
    }
    spans.sort_unstable();
    for w in spans.windows(2) {
        if w[1].0 < w[0].1 {
            return Err(Error::invalid(format!(
                "regions {} and {} overlap in guest-physical memory",
                w[0].2, w[1].2
            )));
        }
    }
    Ok(out)
}

thread_local! {
    /// The reason a callback running on this thread gave for failing.
    static CALLBACK_ERROR: std::cell::RefCell<Option<String>> =
        const { std::cell::RefCell::new(None) };
}

/// Called from inside a hypervisor callback that is about to return
/// non-zero: `message` (copied) says why, and is quoted in the migration's
/// error message after the callback's return value. Only the last call
/// before the callback returns counts; outside a callback it has no
/// effect.
///
/// # Safety
/// `message` must be NULL or a NUL-terminated string.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn dwcp_callback_error(message: *const c_char) -> dwcp_status {
    // Not through `call`: the thread's last error is not this call's.
    let r = std::panic::catch_unwind(|| {
        if message.is_null() {
            return dwcp_status::NullArgument;
        }
        // SAFETY: non-NULL and NUL-terminated (caller's contract).
        let m = unsafe { std::ffi::CStr::from_ptr(message) }.to_string_lossy();
        let m: String = m.chars().take(1024).collect();
        CALLBACK_ERROR.with(|e| *e.borrow_mut() = Some(m));
        dwcp_status::Ok
    });
    r.unwrap_or(dwcp_status::Panic)
}

/// The first status a callback caused, so that the migration's error maps
/// to it.
type Fault = Arc<Mutex<Option<dwcp_status>>>;

/// A C table of callbacks behind the migration's hypervisor traits.
struct Callbacks {
    cbs: dwcp_hv_callbacks,
    user: User,
    regions: Vec<GuestRegion>,
    max_state: usize,
    /// `dest_memory_zero`.
    memory_is_zero: bool,
    fault: Fault,
}

impl Callbacks {
    fn fail(&self, status: dwcp_status, what: &str, reason: String) -> HvError {
        lock(&self.fault).get_or_insert(status);
        HvError::new(format!("callback {what}"), reason)
    }

    /// Runs a callback that returns a code.
    fn check(&self, what: &str, f: impl FnOnce(*mut c_void) -> c_int) -> HvResult<()> {
        CALLBACK_ERROR.with(|e| e.borrow_mut().take());
        match f(self.user.0) {
            0 => Ok(()),
            code => {
                let reason = match CALLBACK_ERROR.with(|e| e.borrow_mut().take()) {
                    Some(why) => format!("returned {code}: {why}"),
                    None => format!("returned {code}"),
                };
                Err(self.fail(dwcp_status::CallbackFailed, what, reason))
            }
        }
    }

    fn missing(&self, what: &str) -> HvError {
        self.fail(dwcp_status::CallbackFailed, what, "is NULL".into())
    }
}

impl SourceHypervisor for Callbacks {
    fn regions(&self) -> Vec<GuestRegion> {
        self.regions.clone()
    }

    fn start_dirty_log(&mut self) -> HvResult<()> {
        let f = self
            .cbs
            .start_dirty_log
            .ok_or_else(|| self.missing("start_dirty_log"))?;
        // SAFETY: the caller's callback with its context.
        self.check("start_dirty_log", |u| unsafe { f(u) })
    }

    fn read_and_clear_dirty(&mut self, region: usize, bitmap: &mut [u64]) -> HvResult<()> {
        const WHAT: &str = "read_and_clear_dirty";
        let f = self
            .cbs
            .read_and_clear_dirty
            .ok_or_else(|| self.missing(WHAT))?;
        let pages = self.regions[region].pages();
        let words = bitmap.len();
        let mut written = usize::MAX;
        let idx = region as u32;
        // SAFETY: `bitmap` is valid for `words` words for the call;
        // `written` for a write.
        self.check(WHAT, |u| unsafe {
            f(u, idx, bitmap.as_mut_ptr(), words, &mut written)
        })?;
        if written != words {
            return Err(self.fail(
                dwcp_status::CallbackBadData,
                WHAT,
                format!(
                    "wrote {written} words of region {region}'s dirty bitmap; its {pages} pages need {words}"
                ),
            ));
        }
        debug_assert_eq!(words, bitmap_words(pages));
        let tail = pages % 64;
        if tail != 0 && bitmap[words - 1] >> tail != 0 {
            return Err(self.fail(
                dwcp_status::CallbackBadData,
                WHAT,
                format!("marked pages past region {region}'s last page ({pages} pages) dirty"),
            ));
        }
        Ok(())
    }

    fn stop_dirty_log(&mut self) -> HvResult<()> {
        let f = self
            .cbs
            .stop_dirty_log
            .ok_or_else(|| self.missing("stop_dirty_log"))?;
        // SAFETY: the caller's callback with its context.
        self.check("stop_dirty_log", |u| unsafe { f(u) })
    }

    fn pause(&mut self) -> HvResult<()> {
        let f = self.cbs.pause.ok_or_else(|| self.missing("pause"))?;
        // SAFETY: the caller's callback with its context.
        self.check("pause", |u| unsafe { f(u) })
    }

    fn resume(&mut self) -> HvResult<()> {
        let f = self.cbs.resume.ok_or_else(|| self.missing("resume"))?;
        // SAFETY: the caller's callback with its context.
        self.check("resume", |u| unsafe { f(u) })
    }

    fn throttle(&mut self, percent: u8) -> HvResult<()> {
        match self.cbs.throttle {
            // SAFETY: the caller's callback with its context.
            Some(f) => self.check("throttle", |u| unsafe { f(u, u32::from(percent)) }),
            // Never asked for more than 0 (throttling is off without it).
            None => Ok(()),
        }
    }

    fn save_device_state(&mut self) -> HvResult<Vec<u8>> {
        const WHAT: &str = "save_device_state";
        let f = self
            .cbs
            .save_device_state
            .ok_or_else(|| self.missing(WHAT))?;
        let mut buf = vec![0u8; self.max_state];
        let cap = buf.len();
        let mut len = usize::MAX;
        // SAFETY: `buf` is valid for `cap` bytes for the call; `len` for a
        // write.
        self.check(WHAT, |u| unsafe { f(u, buf.as_mut_ptr(), cap, &mut len) })?;
        if len > cap {
            return Err(self.fail(
                dwcp_status::CallbackBadData,
                WHAT,
                format!("reported a device state of {len} bytes, over the limit of {cap}"),
            ));
        }
        buf.truncate(len);
        Ok(buf)
    }
}

impl DestHypervisor for Callbacks {
    fn regions(&self) -> Vec<GuestRegion> {
        self.regions.clone()
    }

    fn memory_is_zero(&self) -> bool {
        self.memory_is_zero
    }

    fn load_device_state(&mut self, blob: &[u8]) -> HvResult<()> {
        const WHAT: &str = "load_device_state";
        let f = self
            .cbs
            .load_device_state
            .ok_or_else(|| self.missing(WHAT))?;
        // SAFETY: `blob` is valid for its length during the call.
        self.check(WHAT, |u| unsafe { f(u, blob.as_ptr(), blob.len()) })
    }

    fn resume(&mut self) -> HvResult<()> {
        let f = self.cbs.resume.ok_or_else(|| self.missing("resume"))?;
        // SAFETY: the caller's callback with its context.
        self.check("resume", |u| unsafe { f(u) })
    }
}

struct Source {
    hv: Mutex<Option<Callbacks>>,
    /// The session of the migration under way, for cancelling it.
    sender: Mutex<Option<Arc<Sender>>>,
}

struct Dest {
    incoming: Incoming,
    /// Shared with a running `wait_incoming`, which must not hold the lock
    /// while it waits.
    receiver: Mutex<Option<Arc<Receiver>>>,
    /// Where it listens, once it does.
    addr: std::sync::OnceLock<String>,
}

enum Side {
    Source(Source),
    Dest(Dest),
}

/// A migration, source or destination. Thread-safe: while one thread runs
/// `dwcp_migration_migrate_to()` or `dwcp_migration_wait_incoming()`,
/// others may call `dwcp_migration_cancel()`. The regions given at
/// creation must stay mapped until `dwcp_migration_free()` returns.
pub struct dwcp_migration {
    engine: Arc<Engine>,
    opts: dwcp_migration_options,
    config: MigrateConfig,
    fault: Fault,
    side: Side,
}

/// Checks the callbacks one side needs and builds the adapter.
///
/// # Safety
/// As for `dwcp_migration_source_new()`.
unsafe fn callbacks(
    regions: *const dwcp_region,
    n_regions: usize,
    cbs: *const dwcp_hv_callbacks,
    user: *mut c_void,
    opts: *const dwcp_migration_options,
    needed: &[&str],
) -> Result<(Callbacks, dwcp_migration_options)> {
    // SAFETY: per the caller's contract.
    let cbs = *unsafe { handle(cbs, "callbacks") }?;
    // SAFETY: per the caller's contract: NULL (the defaults) or valid.
    let opts = unsafe { ptr::or_default(opts, migration_defaults) };
    // SAFETY: per the caller's contract.
    let regions = unsafe { guest_regions(regions, n_regions) }?;
    let have = |name: &str| match name {
        "start_dirty_log" => cbs.start_dirty_log.is_some(),
        "read_and_clear_dirty" => cbs.read_and_clear_dirty.is_some(),
        "stop_dirty_log" => cbs.stop_dirty_log.is_some(),
        "pause" => cbs.pause.is_some(),
        "resume" => cbs.resume.is_some(),
        "save_device_state" => cbs.save_device_state.is_some(),
        "load_device_state" => cbs.load_device_state.is_some(),
        _ => false,
    };
    if let Some(m) = needed.iter().find(|n| !have(n)) {
        return Err(Error::invalid(format!("callback {m} is NULL")));
    }
    Ok((
        Callbacks {
            cbs,
            user: User(user),
            regions,
            max_state: opts.max_device_state as usize,
            memory_is_zero: opts.dest_memory_zero,
            fault: Fault::default(),
        },
        opts,
    ))
}

/// Makes the source side of a migration of the guest whose memory is
/// `regions` (`n_regions` of them), driven through `cbs` with context
/// `user`, and writes its handle into `*out`. Nothing is called yet; run
/// it with `dwcp_migration_migrate_to()`.
///
/// # Safety
/// `engine` must be NULL or a live engine; `regions` NULL or valid for
/// `n_regions` reads, each mapped as `dwcp_region` says until the handle
/// is freed; `cbs` NULL or valid for a read; `user` whatever the callbacks
/// expect; `opts` NULL (the defaults) or valid for a read; `out` valid for
/// one write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn dwcp_migration_source_new(
    engine: *const dwcp_engine,
    regions: *const dwcp_region,
    n_regions: usize,
    cbs: *const dwcp_hv_callbacks,
    user: *mut c_void,
    opts: *const dwcp_migration_options,
    out_migration: *mut *mut dwcp_migration,
) -> dwcp_status {
    call(|| {
        // SAFETY: per the caller's contract.
        let e = unsafe { handle(engine, "engine") }?;
        let o = out(out_migration, "out")?;
        let needed = [
            "start_dirty_log",
            "read_and_clear_dirty",
            "stop_dirty_log",
            "pause",
            "resume",
            "save_device_state",
        ];
        // SAFETY: per the caller's contract.
        let (cb, opts) = unsafe { callbacks(regions, n_regions, cbs, user, opts, &needed) }?;
        let config = opts.config(cb.cbs.throttle.is_some())?;
        let m = Box::new(dwcp_migration {
            engine: e.engine.clone(),
            opts,
            config,
            fault: cb.fault.clone(),
            side: Side::Source(Source {
                hv: Mutex::new(Some(cb)),
                sender: Mutex::new(None),
            }),
        });
        // SAFETY: checked non-NULL; valid for a write.
        unsafe { write(o, Box::into_raw(m)) };
        Ok(())
    })
}

/// Migrates the source guest to the destination listening at `addr`
/// (`host:port`) over a session opened with `conn` (its `mode` is ignored:
/// pages are compressed by the page codec the migration options choose),
/// and writes the final report into `*out`. Blocks until the destination's
/// guest runs (then the source guest stays paused: free it) or the
/// migration fails: then the source guest runs on (resumed, unthrottled,
/// dirty log stopped) and the destination discards what it received.
/// The one exception is `DWCP_STATUS_MIGRATION_OUTCOME_UNKNOWN`: the
/// session failed after the final part left, the destination may be
/// running the guest, and the source stays paused (dirty log stopped,
/// unthrottled) until you find out. A handle migrates once
/// (`DWCP_STATUS_BUSY` after).
///
/// For a paused guest, a destination that vanishes should cost seconds:
/// consider `stall_timeout_ms` 2000 and `resume_ms` 3000.
///
/// # Safety
/// `m` must be NULL or a live migration; `addr` NULL or a NUL-terminated
/// string; `conn` NULL or valid for a read (its `key` NULL or 32 bytes);
/// `out` valid for one write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn dwcp_migration_migrate_to(
    m: *mut dwcp_migration,
    addr: *const c_char,
    conn: *const dwcp_connect_options,
    out_report: *mut dwcp_migration_report,
) -> dwcp_status {
    call(|| {
        // SAFETY: per the caller's contract; only shared references are
        // made, as `dwcp_migration_cancel` may run meanwhile.
        let mig = unsafe { handle(m.cast_const(), "migration") }?;
        // SAFETY: as above.
        let addr = resolve(unsafe { ptr::string(addr, "addr") }?)?;
        // SAFETY: as above: NULL (the defaults, which carry no key) or
        // valid for a read.
        let conn = unsafe { ptr::or_default(conn, dwcp_connect_options::defaults) };
        let o = out(out_report, "out")?;
        let Side::Source(src) = &mig.side else {
            return Err(Error::invalid("this migration is a destination"));
        };
        // SAFETY: `conn.key` per the caller's contract.
        let mut cfg = unsafe { conn.config() }?;
        // Pages are compressed by the page codec; chunks only framed.
        cfg.policy = dwcp_codec::Policy::Stored;
        let mut hv = lock(&src.hv)
            .take()
            .ok_or_else(|| Error::new(dwcp_status::Busy, "this migration ran already"))?;
        mig.config.cancel_check()?;
        let sender = Arc::new(Sender::connect(&mig.engine, addr, cfg)?);
        *lock(&src.sender) = Some(sender.clone());
        if mig.config.cancel.is_cancelled() {
            sender.abort(crate::status::CANCELLED);
        }
        let (on_round, round_user) = (mig.opts.on_round, User(mig.opts.on_round_user));
        let r = migrate_out(&mut hv, &sender, &mig.config, |m| {
            if let Some(f) = on_round {
                let report = dwcp_round_report::from(m);
                // SAFETY: the caller's callback with its context; `report`
                // lives for the call.
                unsafe { f(round_user.0, &report) };
            }
        });
        lock(&src.sender).take();
        let sender = Arc::try_unwrap(sender).ok();
        match r {
            Ok(r) => {
                if let Some(s) = sender {
                    // The guest runs there: the goodbye is a courtesy.
                    let _ = s.close();
                }
                let s = &r.summary;
                let report = dwcp_migration_report {
                    rounds: s.rounds,
                    pages_sent: s.pages_sent,
                    bytes_sent: s.bytes_sent,
                    wire_bytes: r.wire_bytes,
                    max_throttle: u32::from(s.max_throttle),
                    converged: s.converged,
                    total_ms: ms(r.total),
                    downtime_ms: ms(r.downtime),
                    predicted_downtime_ms: s.predicted_downtime.map_or(-1.0, ms),
                };
                // SAFETY: checked non-NULL; valid for a write.
                unsafe { write(o, report) };
                Ok(())
            }
            Err(e) => {
                if let Some(s) = sender {
                    s.cancel();
                }
                let unknown = matches!(
                    e,
                    ::dwcp_migration::precopy::MigrationError::OutcomeUnknown(_)
                );
                let mut err = Error::from(e);
                if !unknown {
                    if let Some(status) = *lock(&mig.fault) {
                        err.status = status;
                    }
                    err.message.push_str("; the source guest runs on");
                }
                Err(err)
            }
        }
    })
}

trait CancelCheck {
    fn cancel_check(&self) -> Result<()>;
}

impl CancelCheck for MigrateConfig {
    fn cancel_check(&self) -> Result<()> {
        if self.cancel.is_cancelled() {
            Err(Error::new(
                dwcp_status::Cancelled,
                "migration cancelled by the caller before it started; the source guest runs on",
            ))
        } else {
            Ok(())
        }
    }
}

/// Makes the destination side of a migration into the guest whose memory
/// is `regions` (which must match the source's in number, base and length;
/// pages not zero are zeroed here unless the `dest_memory_zero` option
/// says they all are, as the migration writes only the pages that are not
/// zero at the source),
/// driven through `cbs` (`load_device_state` and `resume`) with context
/// `user`, and writes its handle into `*out`. Then
/// `dwcp_migration_listen()` and `dwcp_migration_wait_incoming()`.
///
/// # Safety
/// As for `dwcp_migration_source_new()`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn dwcp_migration_dest_new(
    engine: *const dwcp_engine,
    regions: *const dwcp_region,
    n_regions: usize,
    cbs: *const dwcp_hv_callbacks,
    user: *mut c_void,
    opts: *const dwcp_migration_options,
    out_migration: *mut *mut dwcp_migration,
) -> dwcp_status {
    call(|| {
        // SAFETY: per the caller's contract.
        let e = unsafe { handle(engine, "engine") }?;
        let o = out(out_migration, "out")?;
        let needed = ["load_device_state", "resume"];
        // SAFETY: per the caller's contract.
        let (cb, opts) = unsafe { callbacks(regions, n_regions, cbs, user, opts, &needed) }?;
        let config = opts.config(false)?;
        let fault = cb.fault.clone();
        let guest_bytes: u64 = cb.regions.iter().map(|r| r.len() as u64).sum();
        let incoming = Incoming::new(Box::new(cb), opts.max_buffered);
        if opts.dest_prealloc_state {
            incoming.preallocate_state(&config, guest_bytes);
        }
        let m = Box::new(dwcp_migration {
            engine: e.engine.clone(),
            opts,
            config,
            fault,
            side: Side::Dest(Dest {
                incoming,
                receiver: Mutex::new(None),
                addr: std::sync::OnceLock::new(),
            }),
        });
        // SAFETY: checked non-NULL; valid for a write.
        unsafe { write(o, Box::into_raw(m)) };
        Ok(())
    })
}

/// Starts listening for the source at `addr` (`host:port`; port 0 picks a
/// free one, see `dwcp_migration_local_addr()`) with `opts` (NULL `dir`;
/// `memory_limit` unused: see `max_buffered`). Once.
///
/// # Safety
/// `m` must be NULL or a live migration; `addr` NULL or a NUL-terminated
/// string; `opts` NULL or valid for a read (its `key` NULL or 32 bytes).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn dwcp_migration_listen(
    m: *mut dwcp_migration,
    addr: *const c_char,
    opts: *const dwcp_listen_options,
) -> dwcp_status {
    call(|| {
        // SAFETY: per the caller's contract (shared references only).
        let mig = unsafe { handle(m.cast_const(), "migration") }?;
        // SAFETY: as above.
        let addr = resolve(unsafe { ptr::string(addr, "addr") }?)?;
        // SAFETY: as above: NULL (the defaults, which carry no key) or
        // valid for a read.
        let opts = unsafe { ptr::or_default(opts, crate::transfer::listen_defaults) };
        let Side::Dest(dst) = &mig.side else {
            return Err(Error::invalid("this migration is a source"));
        };
        if !opts.dir.is_null() {
            return Err(Error::invalid(
                "listen options: dir must be NULL for a migration",
            ));
        }
        // SAFETY: `opts.key` per the caller's contract.
        let cfg = unsafe { opts.config() }?;
        let mut slot = lock(&dst.receiver);
        if slot.is_some() {
            return Err(Error::new(
                dwcp_status::Busy,
                "this migration listens already",
            ));
        }
        let r = Receiver::bind(&mig.engine, addr, cfg, dst.incoming.sink())?;
        let _ = dst.addr.set(r.local_addr().to_string());
        *slot = Some(Arc::new(r));
        Ok(())
    })
}

/// Copies the address a destination listens on (`ip:port`) into `buf`,
/// NUL-terminated, and its length into `*written`.
///
/// # Safety
/// `m` must be NULL or a live migration; `buf` valid for `len` bytes of
/// writes; `written` for one write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn dwcp_migration_local_addr(
    m: *const dwcp_migration,
    buf: *mut c_char,
    len: usize,
    written: *mut usize,
) -> dwcp_status {
    call(|| {
        // SAFETY: per the caller's contract.
        let mig = unsafe { handle(m, "migration") }?;
        let Side::Dest(dst) = &mig.side else {
            return Err(Error::invalid("this migration is a source"));
        };
        let addr = dst
            .addr
            .get()
            .ok_or_else(|| Error::new(dwcp_status::Busy, "this migration does not listen yet"))?;
        // SAFETY: the caller's contract on `buf`, `len`, `written`.
        unsafe { copy_str_out(addr, buf, len, written) }
    })
}

/// Waits up to `timeout_ms` for the incoming migration to end. `OK`: the
/// guest runs here (its `resume` callback returned 0) and `*out` holds the
/// report. `DWCP_STATUS_TIMEOUT`: not yet, call again. Any other status:
/// the migration was discarded (the message says why) and the guest is
/// never started; `DWCP_STATUS_CALLBACK_*` when a callback of this side
/// caused it.
///
/// # Safety
/// `m` must be NULL or a live migration; `out` valid for one write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn dwcp_migration_wait_incoming(
    m: *mut dwcp_migration,
    timeout_ms: u32,
    out_report: *mut dwcp_incoming_report,
) -> dwcp_status {
    call(|| {
        // SAFETY: per the caller's contract (shared references only).
        let mig = unsafe { handle(m.cast_const(), "migration") }?;
        let o = out(out_report, "out")?;
        let Side::Dest(dst) = &mig.side else {
            return Err(Error::invalid("this migration is a source"));
        };
        let wait = millis(timeout_ms);
        let recv = lock(&dst.receiver).clone();
        let outcome = match recv {
            Some(r) => dst.incoming.wait_receiving(&r, wait),
            None => dst.incoming.wait(wait),
        };
        match outcome {
            None => Err(Error::new(
                dwcp_status::Timeout,
                format!("the migration has not finished after {wait:?}"),
            )),
            Some(Ok(report)) => {
                // SAFETY: checked non-NULL; valid for a write.
                unsafe { write(o, report.into()) };
                Ok(())
            }
            Some(Err(why)) => {
                let status = lock(&mig.fault).unwrap_or(dwcp_status::MigrationDiscarded);
                Err(Error::new(
                    status,
                    format!("the migration was discarded, no guest was started here: {why}"),
                ))
            }
        }
    })
}

/// Cancels a migration from any thread. Source: the running
/// `dwcp_migration_migrate_to()` returns `DWCP_STATUS_CANCELLED` within
/// about one batch's transfer time, the guest running on, unless the guest
/// was already handed over (then it completes). Destination: unless the
/// guest is being started, the migration is discarded.
///
/// # Safety
/// `m` must be NULL or a live migration.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn dwcp_migration_cancel(m: *const dwcp_migration) -> dwcp_status {
    call(|| {
        // SAFETY: per the caller's contract.
        let mig = unsafe { handle(m, "migration") }?;
        mig.config.cancel.cancel();
        if let Side::Dest(dst) = &mig.side {
            dst.incoming.abandon("cancelled by the caller");
        }
        Ok(())
    })
}

/// Writes into `out` (32 bytes) the digest of guest memory that an
/// incoming report's `memory_digest` holds: BLAKE3 over the 128-bit XXH3
/// hashes of every 4 KiB page of `regions`, in order. Run on a paused
/// source after a migration to check that both sides hold the same memory.
///
/// # Safety
/// `regions` must be NULL or valid for `n_regions` reads, each mapped and
/// readable; `out` valid for 32 bytes of writes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn dwcp_memory_digest(
    regions: *const dwcp_region,
    n_regions: usize,
    out_digest: *mut u8,
) -> dwcp_status {
    call(|| {
        let o = out(out_digest, "out")?;
        // SAFETY: per the caller's contract (only read during this call).
        let rs = unsafe { guest_regions(regions, n_regions) }?;
        let d = memory_digest(&rs).map_err(|e| Error::invalid(e.to_string()))?;
        // SAFETY: `o` is valid for 32 bytes (caller's contract).
        unsafe { std::ptr::copy_nonoverlapping(d.as_ptr(), o, d.len()) };
        Ok(())
    })
}

/// Frees a migration (NULL is fine). A destination still receiving
/// discards the migration first; a source must not be migrating (cancel
/// it and wait for `dwcp_migration_migrate_to` to return). The regions may
/// be unmapped once this returns.
///
/// # Safety
/// `m` must be NULL or a live migration with no call running on it, not
/// used after this call.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn dwcp_migration_free(m: *mut dwcp_migration) {
    call_void(|| {
        if m.is_null() {
            return;
        }
        // SAFETY: made by `Box::into_raw` in a `_new`, freed once.
        let mig = unsafe { Box::from_raw(m) };
        if let Side::Dest(dst) = &mig.side {
            dst.incoming.abandon("the destination was freed");
            if let Some(r) = lock(&dst.receiver).take() {
                // No call runs on the handle (the contract), so this is the
                // only reference.
                if let Ok(r) = Arc::try_unwrap(r) {
                    let _ = r.close();
                }
            }
        }
        drop(mig);
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(regions: &[dwcp_region]) -> std::result::Result<usize, String> {
        // SAFETY: `regions` is a live slice; the hosts it names are only
        // described here, never read.
        unsafe { guest_regions(regions.as_ptr(), regions.len()) }
            .map(|v| v.len())
            .map_err(|e| e.message)
    }

    #[test]
    fn regions_are_checked() {
        let mut backing = vec![0u8; 1 << 16];
        let host = backing.as_mut_ptr().cast::<c_void>();
        let r = |gpa, len| dwcp_region {
            gpa,
            host,
            len,
            flags: 0,
        };
        assert_eq!(check(&[r(0, 4096), r(0x10000, 8192)]), Ok(2));
        assert!(
            check(&[r(0, 4096 + 100)])
                .unwrap_err()
                .contains("multiple of 4096")
        );
        assert!(check(&[]).unwrap_err().contains("no regions"));
        assert!(check(&[r(1, 4096)]).unwrap_err().contains("aligned"));
        assert!(check(&[r(0, 0)]).unwrap_err().contains("length 0"));
        assert!(
            check(&[r(u64::MAX - 4095, 8192)])
                .unwrap_err()
                .contains("overflows")
        );
        assert!(
            check(&[r(0x2000, 8192), r(0, 12288)])
                .unwrap_err()
                .contains("overlap")
        );
        let null = dwcp_region {
            gpa: 0,
            host: std::ptr::null_mut(),
            len: 4096,
            flags: 0,
        };
        assert!(check(&[null]).unwrap_err().contains("NULL"));
        // A page-aligned host inside the backing.
        let base = backing.as_mut_ptr();
        let page = base.wrapping_add(base.align_offset(4096));
        let flagged = |host: *mut u8, flags| dwcp_region {
            gpa: 0,
            host: host.cast(),
            len: 4096,
            flags,
        };
        assert_eq!(
            check(&[flagged(page, DWCP_REGION_PRIVATE_ANONYMOUS)]),
            Ok(1)
        );
        assert!(
            check(&[flagged(page, 2)])
                .unwrap_err()
                .contains("unknown flags")
        );
        assert!(
            check(&[flagged(page.wrapping_add(8), DWCP_REGION_PRIVATE_ANONYMOUS)])
                .unwrap_err()
                .contains("aligned")
        );
        // Without the flag, any host address will do.
        assert_eq!(check(&[flagged(page.wrapping_add(8), 0)]), Ok(1));
    }

    #[test]
    fn options_are_checked() {
        let ok = migration_defaults();
        assert!(ok.config(true).is_ok());
        for (f, what) in [
            (
                (|o: &mut dwcp_migration_options| o.shards = 0) as fn(&mut _),
                "shards",
            ),
            (|o| o.shards = 65, "shards"),
            (|o| o.max_device_state = 0, "max_device_state"),
            (|o| o.max_device_state = 64 << 20, "max_device_state"),
            (|o| o.max_buffered = 1, "max_buffered"),
            (|o| o.mode = 9, "mode"),
            (|o| o.downtime_limit_ms = 0, "downtime"),
            (|o| o.max_rounds = 0, "round"),
        ] {
            let mut o = migration_defaults();
            f(&mut o);
            let e = o.config(true).expect_err(what);
            assert!(
                e.message.to_lowercase().contains(what),
                "{what}: {}",
                e.message
            );
        }
        // Without a throttle callback, throttling is off.
        assert!(!ok.config(false).unwrap().controller.allow_throttle);
    }
}
