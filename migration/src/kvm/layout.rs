//! Where things live in the guest's physical memory.
//!
//! Everything is computed from the RAM size alone, so the source and the
//! destination VMM agree on it without telling each other (the destination
//! only needs it to read the guest's counters).
//!
//! ```text
//! 0x0000_0000  page 0                     never touched (zero)
//! 0x0000_1000  program                    the guest's code (at most 16 KiB)
//! 0x0000_8000  page tables                PML4, PDPT, then one page directory
//!                                          per GiB: RAM identity-mapped with
//!                                          2 MiB user pages
//! ...          zero up to 2 MiB
//! 0x0020_0000  control page               counters, RNG state, parameters;
//!                                          the guest's stack grows down from
//!                                          its end (0x20_1000)
//! ...          zero up to 4 MiB
//! 0x0040_0000  working set                RAM/2: 50% zero, 30% text, 20% random
//!                                          pages, shuffled; the only pages the
//!                                          guest dirties (with the control page)
//!   then       code area                  RAM*80/1024 of code-like pages that
//!                                          never change
//!   then       page table                 one u32 per non-zero working-set page:
//!                                          its guest-physical address, bit 0 set
//!                                          for a random page (clear: text)
//!   then       text pool                  RAM/16 (1..16 MiB) of text that new
//!                                          text content is copied from
//!   then       zero up to the end of RAM
//! ```
//!
//! Only the 2 MiB pages of the control page and of the working set are
//! mapped writable (with the accessed and dirty bits preset); everything
//! else is mapped read-only, so a stray write faults (and stops the guest)
//! and, as importantly, KVM never maps a page the guest only reads as
//! writable: shadow paging (as in PVM) marks a page dirty when it maps it
//! writable, which a guest page whose dirty bit is set gets even on a read,
//! so read-only data sharing a 2 MiB page with written data would show up
//! in the dirty log.
//!
//! The control page (offsets from [`CONTROL_GPA`], little-endian):
//!
//! | offset | size | field |
//! |--------|------|-------|
//! | 0x00 | u64 | page writes done ([`KvmGuest::counter`](super::KvmGuest::counter)) |
//! | 0x08 | u64 | budget requests made (ticks; grows even at 0 MiB/s) |
//! | 0x10 | u64 | xorshift64* state |
//! | 0x20 | u32 | writes left in the current batch |
//! | 0x40 | u32 | page table address |
//! | 0x44 | u32 | page table entries |
//! | 0x48 | u32 | text pool address |
//! | 0x4c | u32 | number of valid copy offsets in the pool (pool length - 4095) |
//! | 0x50 | u32 | [`CONTROL_MAGIC`] |

use dwcp_codec::corpus::{ClassMix, PageClass};

use crate::hv::{HvError, HvResult, PAGE_SIZE};

const MIB: usize = 1 << 20;
/// Size of the guest's (large) pages.
pub const LARGE_PAGE: usize = 2 * MIB;

/// Guest-physical address where the program is loaded and starts.
pub const PROGRAM_GPA: u64 = 0x1000;
/// Most bytes the program may take.
pub const PROGRAM_MAX: usize = 0x4000;
/// Guest-physical address of the control page, alone in its 2 MiB page.
pub const CONTROL_GPA: u64 = 0x20_0000;
/// Initial stack pointer: the end of the control page.
pub const STACK_TOP: u32 = CONTROL_GPA as u32 + 0x1000;
/// Guest-physical address of the PML4; the PDPT follows, then the page
/// directories (one per GiB).
pub const PML4_GPA: u64 = 0x8000;
/// Guest-physical address of the PDPT.
pub const PDPT_GPA: u64 = PML4_GPA + 0x1000;
/// Guest-physical address of the first page directory.
pub const PD_GPA: u64 = PDPT_GPA + 0x1000;
/// Guest-physical address of the working set.
pub const WORKING_SET_GPA: u64 = 0x40_0000;
/// The I/O port the guest reads its write budget from (`in eax, dx`).
pub const BUDGET_PORT: u16 = 0xd0;

/// Control page: page writes done (u64).
pub const CTL_WRITES: u32 = 0x00;
/// Control page: budget requests made (u64).
pub const CTL_TICKS: u32 = 0x08;
/// Control page: xorshift64* state (u64).
pub const CTL_RNG: u32 = 0x10;
/// Control page: writes left in the current batch (u32).
pub const CTL_BATCH_LEFT: u32 = 0x20;
/// Control page: page table address (u32).
pub const CTL_TABLE_GPA: u32 = 0x40;
/// Control page: page table entries (u32).
pub const CTL_TABLE_LEN: u32 = 0x44;
/// Control page: text pool address (u32).
pub const CTL_POOL_GPA: u32 = 0x48;
/// Control page: valid copy offsets in the pool (u32).
pub const CTL_POOL_SPAN: u32 = 0x4c;
/// Control page: magic (u32).
pub const CTL_MAGIC: u32 = 0x50;
/// Value of the control page's magic word (`"DWKG"` little-endian).
pub const CONTROL_MAGIC: u32 = u32::from_le_bytes(*b"DWKG");

/// Longest copy the guest makes from the pool (a whole text page).
pub const TEXT_COPY: usize = PAGE_SIZE;

/// Smallest RAM accepted.
pub const MIN_RAM: usize = 16 * MIB;
/// RAM is a whole number of these, so that the working set (RAM/2) is made
/// of whole 2 MiB pages.
pub const RAM_GRAIN: usize = 2 * LARGE_PAGE;
/// Largest RAM accepted: the guest keeps addresses in `u32`s, and three
/// page directories map it.
pub const MAX_RAM: usize = 3 << 30;

/// The guest-physical layout of a guest of a given RAM size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestLayout {
    /// RAM size in bytes.
    pub ram: usize,
    /// Start of the working set.
    pub working_set_gpa: u64,
    /// Bytes of the working set (RAM/2).
    pub working_set_len: usize,
    /// Start of the code area.
    pub code_gpa: u64,
    /// Bytes of the code area (RAM*80/1024, whole pages).
    pub code_len: usize,
    /// Start of the page table.
    pub table_gpa: u64,
    /// Entries of the page table (non-zero working-set pages).
    pub table_entries: usize,
    /// Start of the text pool.
    pub pool_gpa: u64,
    /// Bytes of the text pool.
    pub pool_len: usize,
    /// Pages of each class in the working set, in the order of
    /// [`PageClass::ALL`].
    pub class_counts: [usize; 4],
}

fn round_up_page(n: usize) -> usize {
    n.div_ceil(PAGE_SIZE) * PAGE_SIZE
}

impl GuestLayout {
    /// The layout of a guest with `ram` bytes: a whole number of
    /// [`RAM_GRAIN`], between [`MIN_RAM`] and [`MAX_RAM`].
    pub fn new(ram: usize) -> HvResult<Self> {
        let what = "guest RAM size";
        if !(MIN_RAM..=MAX_RAM).contains(&ram) {
            return Err(HvError::new(
                what,
                format!("{ram} bytes is outside {MIN_RAM}..={MAX_RAM}"),
            ));
        }
        if !ram.is_multiple_of(RAM_GRAIN) {
            return Err(HvError::new(
                what,
                format!("{ram} bytes is not a whole number of {RAM_GRAIN} bytes"),
            ));
        }
        let working_set_len = ram / 2;
        let class_counts = ClassMix::MIGRATION_WORKING_SET.page_counts(working_set_len / PAGE_SIZE);
        let table_entries = class_counts[1] + class_counts[2] + class_counts[3];
        let code_len = ram * 80 / 1024 / PAGE_SIZE * PAGE_SIZE;
        let pool_len = (ram / 16).clamp(MIB, 16 * MIB);
        let code_gpa = WORKING_SET_GPA + working_set_len as u64;
        let table_gpa = code_gpa + code_len as u64;
        let pool_gpa = table_gpa + round_up_page(table_entries * 4) as u64;
        let end = pool_gpa + pool_len as u64;
        if end > ram as u64 {
            return Err(HvError::new(
                what,
                format!("{ram} bytes cannot hold the layout, which ends at {end:#x}"),
            ));
        }
        Ok(Self {
            ram,
            working_set_gpa: WORKING_SET_GPA,
            working_set_len,
            code_gpa,
            code_len,
            table_gpa,
            table_entries,
            pool_gpa,
            pool_len,
            class_counts,
        })
    }

    /// Pages of the working set.
    pub fn working_set_pages(&self) -> usize {
        self.working_set_len / PAGE_SIZE
    }

    /// Whether guest page number `page` (guest-physical address / 4096) is
    /// in the working set.
    pub fn in_working_set(&self, page: usize) -> bool {
        let first = self.working_set_gpa as usize / PAGE_SIZE;
        (first..first + self.working_set_pages()).contains(&page)
    }

    /// Whether the guest may write the 2 MiB page at `gpa`: the control
    /// page's and the working set's.
    pub fn writable(&self, gpa: u64) -> bool {
        (CONTROL_GPA..self.working_set_gpa + self.working_set_len as u64).contains(&gpa)
    }

    /// Guest page number of the control page.
    pub fn control_page(&self) -> usize {
        CONTROL_GPA as usize / PAGE_SIZE
    }

    /// Pages of each class in the working set, as `(class, pages)`.
    pub fn classes(&self) -> [(PageClass, usize); 4] {
        let mut out = PageClass::ALL.map(|c| (c, 0));
        for (slot, &n) in out.iter_mut().zip(self.class_counts.iter()) {
            slot.1 = n;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_fit_and_scale() {
        for mib in [16usize, 32, 64, 1024, 3072] {
            let l = GuestLayout::new(mib * MIB).unwrap();
            assert_eq!(l.working_set_len, mib * MIB / 2);
            assert_eq!(l.code_len, mib * MIB * 80 / 1024 / PAGE_SIZE * PAGE_SIZE);
            assert!(l.pool_gpa as usize + l.pool_len <= l.ram);
            assert_eq!(l.class_counts.iter().sum::<usize>(), l.working_set_pages());
            assert_eq!(l.class_counts[2], 0, "no code pages in the working set");
        }
        let gib = GuestLayout::new(1 << 30).unwrap();
        assert_eq!(gib.code_len, 80 * MIB);
        assert_eq!(gib.pool_len, 16 * MIB);
        assert_eq!(gib.table_entries, 65536);
        assert!(gib.in_working_set(0x400));
        assert!(!gib.in_working_set(0x3ff));
        assert!(!gib.in_working_set(0x400 + 131072));
        assert!(!gib.writable(0) && !gib.writable(0x1f_f000));
        assert!(gib.writable(CONTROL_GPA) && gib.writable(0x40_0000 + (512 << 20) - 1));
        assert!(!gib.writable(0x40_0000 + (512 << 20)));
    }

    #[test]
    fn bad_sizes_are_errors() {
        assert!(GuestLayout::new(0).is_err());
        assert!(GuestLayout::new(8 * MIB).is_err());
        assert!(GuestLayout::new(18 * MIB).is_err());
        assert!(GuestLayout::new(32 * MIB + 4096).is_err());
        assert!(GuestLayout::new(33 * MIB).is_err());
        assert!(GuestLayout::new(4 << 30).is_err());
    }
}
