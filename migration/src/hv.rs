//! The hypervisor seen by a migration: guest memory regions, a dirty
//! tracker, vCPU control and an opaque device state.
//!
//! The migration drivers know nothing of KVM. A hypervisor (the KVM guest of
//! [`crate::kvm`], a synthetic in-process guest, or a C VMM through the
//! callbacks of `libdwcp`) implements [`SourceHypervisor`] on the sending
//! side and [`DestHypervisor`] on the receiving side.
//!
//! Guest memory is shared with running vCPUs, so it is never seen as
//! `&[u8]`: [`GuestRegion`] only offers volatile copies in and out
//! (STYLE.md §4).

use std::fmt;
use std::ptr::NonNull;
use std::sync::{Arc, Mutex, MutexGuard};

/// Page size of dirty tracking and of page transfers.
pub const PAGE_SIZE: usize = 4096;

/// Error of a hypervisor call, with the name of what failed.
#[derive(Debug, thiserror::Error)]
#[error("hypervisor: {what}: {reason}")]
pub struct HvError {
    /// The call or object that failed (`"dirty log of region 0"`).
    pub what: String,
    /// Why, in words (an errno text, a bad length).
    pub reason: String,
}

impl HvError {
    /// An error for `what`, with `reason`.
    pub fn new(what: impl Into<String>, reason: impl fmt::Display) -> Self {
        Self {
            what: what.into(),
            reason: reason.to_string(),
        }
    }
}

/// Result of a hypervisor call.
pub type HvResult<T> = Result<T, HvError>;

/// One contiguous range of guest-physical memory and where the host maps it.
///
/// The memory may be written by guest vCPUs at any time, so it is only ever
/// copied with volatile accesses. A region made with
/// [`GuestRegion::with_owner`] keeps its mapping alive for as long as any
/// copy of it exists, so safe code can never reach unmapped memory through
/// one.
#[derive(Clone)]
pub struct GuestRegion {
    /// Guest-physical base address, page aligned.
    pub gpa: u64,
    host: NonNull<u8>,
    len: usize,
    /// What keeps the mapping alive, when the region holds it.
    owner: Option<Arc<dyn Send + Sync>>,
    /// The mapping is private and anonymous: a page this process never
    /// wrote (nor the guest, through KVM) reads as zero.
    private_anonymous: bool,
}

impl fmt::Debug for GuestRegion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GuestRegion")
            .field("gpa", &format_args!("{:#x}", self.gpa))
            .field("host", &self.host)
            .field("len", &self.len)
            .field("owned", &self.owner.is_some())
            .field("private_anonymous", &self.private_anonymous)
            .finish()
    }
}

// SAFETY: a `GuestRegion` is an address range, not a reference; every access
// goes through the volatile copies below, whose callers' contract
// (`GuestRegion::new`) keeps the mapping alive and valid from any thread.
unsafe impl Send for GuestRegion {}
// SAFETY: as for `Send`: shared use only performs volatile copies of a
// mapping that stays valid, which races with vCPUs by design, never UB for
// plain bytes accessed volatilely.
unsafe impl Sync for GuestRegion {}

impl GuestRegion {
    /// Describes `len` bytes of guest memory at guest-physical `gpa`,
    /// mapped at `host` in this process.
    ///
    /// # Safety
    /// `host..host + len` must be one mapping, readable and writable, that
    /// stays mapped for as long as this value or any copy of it is used.
    /// Nothing may hold a Rust reference (`&[u8]`, `&mut [u8]`) to it.
    pub unsafe fn new(gpa: u64, host: NonNull<u8>, len: usize) -> Self {
        Self {
            gpa,
            host,
            len,
            owner: None,
            private_anonymous: false,
        }
    }

    /// Like [`GuestRegion::new`], for a mapping that stays mapped for as
    /// long as `owner` lives: the region (and every clone) holds `owner`,
    /// so the mapping outlives every use of it.
    ///
    /// # Safety
    /// `host..host + len` must be one mapping, readable and writable, that
    /// stays mapped while `owner` is alive; nothing may hold a Rust
    /// reference to it.
    pub unsafe fn with_owner(
        gpa: u64,
        host: NonNull<u8>,
        len: usize,
        owner: Arc<dyn Send + Sync>,
    ) -> Self {
        Self {
            gpa,
            host,
            len,
            owner: Some(owner),
            private_anonymous: false,
        }
    }

    /// Says that the mapping is private and anonymous (`MAP_PRIVATE |
    /// MAP_ANONYMOUS`, not shared, not file-backed), so that a page with
    /// no page-table entry in this process (never written, or dropped with
    /// `MADV_DONTNEED`), and not swapped out, reads as zero. A migration
    /// source then sends such pages as zero pages without reading them,
    /// which skips a page fault per page (~0.9 us here) and the read.
    /// Wrong for shared memory (a memfd the guest's memory is also mapped
    /// from elsewhere) and for memory registered with `userfaultfd`: a
    /// page may be absent here and hold data, or get it on access. Used only
    /// where the region's host address is page aligned.
    pub fn with_private_anonymous_memory(mut self) -> Self {
        self.private_anonymous = true;
        self
    }

    /// Whether [`GuestRegion::with_private_anonymous_memory`] was said.
    pub fn is_private_anonymous(&self) -> bool {
        self.private_anonymous
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the region has no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Number of whole pages (a trailing partial page counts as one).
    pub fn pages(&self) -> usize {
        self.len.div_ceil(PAGE_SIZE)
    }

    /// Host address of the first byte (for callers that register the
    /// region with the kernel, e.g. `KVM_SET_USER_MEMORY_REGION`).
    pub fn host_addr(&self) -> *mut u8 {
        self.host.as_ptr()
    }

    fn check(&self, offset: usize, len: usize) -> HvResult<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len => Ok(()),
            _ => Err(HvError::new(
                format!("guest region at {:#x}", self.gpa),
                format!("range {offset}+{len} is outside its {} bytes", self.len),
            )),
        }
    }

    /// Copies `out.len()` bytes starting at `offset` out of guest memory.
    pub fn read(&self, offset: usize, out: &mut [u8]) -> HvResult<()> {
        self.check(offset, out.len())?;
        // SAFETY: the range is inside the mapping (checked above), which the
        // contract of `new` keeps alive; `out` is a distinct Rust buffer.
        unsafe { volatile_copy_out(self.host.as_ptr().add(offset), out) };
        Ok(())
    }

    /// Copies `data` into guest memory at `offset`.
    pub fn write(&self, offset: usize, data: &[u8]) -> HvResult<()> {
        self.check(offset, data.len())?;
        // SAFETY: as in `read`; the mapping is writable by `new`'s contract.
        unsafe { volatile_copy_in(self.host.as_ptr().add(offset), data) };
        Ok(())
    }
}

/// Volatile copy of `out.len()` bytes from `src`, in 8-byte words where
/// aligned.
///
/// # Safety
/// `src..src + out.len()` must be valid for reads.
unsafe fn volatile_copy_out(src: *const u8, out: &mut [u8]) {
    let mut i = 0;
    let n = out.len();
    if (src as usize).is_multiple_of(8) {
        while i + 8 <= n {
            // SAFETY: in bounds by the caller's contract; aligned (checked).
            let w = unsafe { std::ptr::read_volatile(src.add(i).cast::<u64>()) };
            out[i..i + 8].copy_from_slice(&w.to_ne_bytes());
            i += 8;
        }
    }
    while i < n {
        // SAFETY: in bounds by the caller's contract.
        out[i] = unsafe { std::ptr::read_volatile(src.add(i)) };
        i += 1;
    }
}

/// Volatile copy of `data` to `dst`.
///
/// # Safety
/// `dst..dst + data.len()` must be valid for writes.
unsafe fn volatile_copy_in(dst: *mut u8, data: &[u8]) {
    let mut i = 0;
    let n = data.len();
    if (dst as usize).is_multiple_of(8) {
        while i + 8 <= n {
            let mut w = [0u8; 8];
            w.copy_from_slice(&data[i..i + 8]);
            // SAFETY: in bounds by the caller's contract; aligned (checked).
            unsafe { std::ptr::write_volatile(dst.add(i).cast::<u64>(), u64::from_ne_bytes(w)) };
            i += 8;
        }
    }
    while i < n {
        // SAFETY: in bounds by the caller's contract.
        unsafe { std::ptr::write_volatile(dst.add(i), data[i]) };
        i += 1;
    }
}

/// Number of `u64` words of a dirty bitmap covering `pages` pages.
pub fn bitmap_words(pages: usize) -> usize {
    pages.div_ceil(64)
}

/// The source side: memory, dirty tracking, vCPU control, device state.
///
/// Calls come from one migration thread, in this order: `regions`,
/// `start_dirty_log`, then rounds of `read_and_clear_dirty` (with
/// `throttle` between them when asked), then `pause`, a last
/// `read_and_clear_dirty` of every region and `save_device_state`. A
/// cancelled or failed migration ends with `resume` (if paused),
/// `throttle(0)` and `stop_dirty_log`; the guest runs on.
pub trait SourceHypervisor: Send {
    /// The guest's memory regions; fixed for the whole migration.
    fn regions(&self) -> Vec<GuestRegion>;

    /// Starts dirty tracking of every region; every page counts as dirty
    /// from here on until first read.
    fn start_dirty_log(&mut self) -> HvResult<()>;

    /// Writes into `bitmap` (exactly [`bitmap_words`] of the region's pages;
    /// bit `i % 64` of word `i / 64` is page `i`) the pages written since
    /// the last call (or since `start_dirty_log`) and clears them.
    fn read_and_clear_dirty(&mut self, region: usize, bitmap: &mut [u64]) -> HvResult<()>;

    /// Stops dirty tracking.
    fn stop_dirty_log(&mut self) -> HvResult<()>;

    /// Stops every vCPU; returns when none runs guest code.
    fn pause(&mut self) -> HvResult<()>;

    /// Runs the vCPUs again after `pause`.
    fn resume(&mut self) -> HvResult<()>;

    /// Slows the guest to leave `percent` (0..=99) of its time idle;
    /// `0` ends throttling.
    fn throttle(&mut self, percent: u8) -> HvResult<()>;

    /// The device state (vCPU registers and the like) of the paused guest,
    /// as an opaque blob.
    fn save_device_state(&mut self) -> HvResult<Vec<u8>>;
}

/// The destination side: memory to fill, device state to load, a guest to
/// start.
pub trait DestHypervisor: Send {
    /// The guest's memory regions; must match the source's in count, base
    /// and length, or the migration is refused before any page moves.
    /// Whatever they hold is replaced: pages that are not zero are zeroed
    /// first (unless [`DestHypervisor::memory_is_zero`]), then the
    /// source's pages are written.
    fn regions(&self) -> Vec<GuestRegion>;

    /// Whether every byte of [`DestHypervisor::regions`] is known to be
    /// zero (fresh anonymous memory nobody wrote), so that the migration
    /// need not read it all to zero what is not. `false` (the default)
    /// is always safe; `true` for memory that is not zero leaves stale
    /// bytes where the source has zero pages.
    fn memory_is_zero(&self) -> bool {
        false
    }

    /// Loads the device state saved by the source; a malformed blob is an
    /// error, never a crash.
    fn load_device_state(&mut self, blob: &[u8]) -> HvResult<()>;

    /// Starts the guest's vCPUs (after `load_device_state`).
    fn resume(&mut self) -> HvResult<()>;
}

/// A destination shared with its owner, who reads it (a guest's counter,
/// say) while a migration drives it.
impl<G: DestHypervisor> DestHypervisor for Arc<Mutex<G>> {
    fn regions(&self) -> Vec<GuestRegion> {
        locked(self).regions()
    }

    fn memory_is_zero(&self) -> bool {
        locked(self).memory_is_zero()
    }

    fn load_device_state(&mut self, blob: &[u8]) -> HvResult<()> {
        locked(self).load_device_state(blob)
    }

    fn resume(&mut self) -> HvResult<()> {
        locked(self).resume()
    }
}

/// Locks `m`, going on after a panic elsewhere (the guest's state is the
/// hypervisor's; a poisoned lock says nothing about it).
fn locked<G>(m: &Mutex<G>) -> MutexGuard<'_, G> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volatile_copies_round_trip_and_check_bounds() {
        let mut backing = vec![0u64; 1024];
        let len = backing.len() * 8;
        let host = NonNull::new(backing.as_mut_ptr().cast::<u8>()).unwrap();
        // SAFETY: `backing` outlives `region` and is not otherwise borrowed
        // while the region is used.
        let region = unsafe { GuestRegion::new(0x1000, host, len) };
        let data: Vec<u8> = (0..100u8).collect();
        for offset in [0, 1, 7, 8, 4000, len - 100] {
            region.write(offset, &data).unwrap();
            let mut out = vec![0u8; data.len()];
            region.read(offset, &mut out).unwrap();
            assert_eq!(out, data, "offset {offset}");
        }
        assert!(region.read(len - 99, &mut [0u8; 100]).is_err());
        assert!(region.write(usize::MAX, &[1]).is_err());
        assert_eq!(region.pages(), 2);
        assert_eq!(bitmap_words(65), 2);
    }

    #[test]
    fn an_owned_region_keeps_its_mapping_alive() {
        let backing: Arc<Vec<u64>> = Arc::new(vec![7u64; 16]);
        let host = NonNull::new(backing.as_ptr().cast::<u8>().cast_mut()).unwrap();
        // SAFETY: the Vec's buffer lives as long as `backing`, which the
        // region holds; only volatile copies touch it.
        let region = unsafe { GuestRegion::with_owner(0, host, 128, backing.clone()) };
        drop(backing);
        let copy = region.clone();
        drop(region);
        let mut out = [0u8; 8];
        copy.read(8, &mut out).unwrap();
        assert_eq!(u64::from_ne_bytes(out), 7);
    }
}
