//! Guest RAM: one anonymous mapping, and the initial content the source VMM
//! puts in it before the guest starts.

use std::ptr::NonNull;

use dwcp_codec::corpus::{PageClass, Rng, fill_page};

use super::layout::{
    CONTROL_GPA, CONTROL_MAGIC, CTL_MAGIC, CTL_POOL_GPA, CTL_POOL_SPAN, CTL_RNG, CTL_TABLE_GPA,
    CTL_TABLE_LEN, GuestLayout, LARGE_PAGE, PD_GPA, PDPT_GPA, PML4_GPA, PROGRAM_GPA, TEXT_COPY,
};
use std::sync::Arc;

use crate::hv::{GuestRegion, HvError, HvResult, PAGE_SIZE};

/// An anonymous, private, `MAP_NORESERVE` mapping of guest RAM, unmapped on
/// drop. Fresh pages read as zero and take no host memory until written.
#[derive(Debug)]
pub struct GuestMemory {
    host: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain memory owned by this value; it is only
// accessed through `GuestRegion`'s volatile copies (and by KVM), never
// through Rust references, so moving the owner to another thread is fine.
unsafe impl Send for GuestMemory {}
// SAFETY: shared use only hands out `GuestRegion`s (address ranges whose
// accesses are volatile copies), see `Send`.
unsafe impl Sync for GuestMemory {}

impl GuestMemory {
    /// Maps `len` bytes (a multiple of the page size) of zeroed memory.
    pub fn new(len: usize) -> HvResult<Self> {
        // SAFETY: a fresh anonymous mapping at an address of the kernel's
        // choosing aliases nothing; the result is checked below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(HvError::new(
                format!("mapping {len} bytes of guest RAM"),
                std::io::Error::last_os_error(),
            ));
        }
        let host = NonNull::new(ptr.cast::<u8>())
            .ok_or_else(|| HvError::new("mapping guest RAM", "mmap returned NULL"))?;
        Ok(Self { host, len })
    }

    /// Allocates every page of the mapping now with
    /// `MADV_POPULATE_WRITE` (Linux 5.14); `Ok(false)` where the kernel
    /// does not have it. The content stays zero. A destination does this
    /// before the migration starts, so that writing arriving pages takes no
    /// page faults (on this host a first write fault costs ~2.5 us per
    /// 4 KiB page, about 0.6 s of CPU per GiB of pages, against ~1.7 us per
    /// page populated in one call), and so that a host that cannot hold
    /// the guest says so before the source starts sending.
    pub fn populate(&self) -> HvResult<bool> {
        const MADV_POPULATE_WRITE: libc::c_int = 23;
        // SAFETY: advice on this value's own mapping; populating anonymous
        // memory allocates the pages not yet present (as zero) and leaves
        // the content of those present as it is.
        let rc = unsafe { libc::madvise(self.host.as_ptr().cast(), self.len, MADV_POPULATE_WRITE) };
        if rc == 0 {
            return Ok(true);
        }
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::EINVAL) {
            return Ok(false);
        }
        Err(HvError::new(
            format!("allocating {} MiB of guest RAM", self.len >> 20),
            err,
        ))
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Host address of the first byte.
    pub fn host_addr(&self) -> *mut u8 {
        self.host.as_ptr()
    }

    /// The whole RAM as one region at guest-physical 0; the region keeps
    /// the mapping alive.
    pub fn region(self: &Arc<Self>) -> GuestRegion {
        // SAFETY: `host..host + len` is one readable and writable mapping
        // that lives as long as this `GuestMemory` (unmapped only on drop),
        // which the region holds through `owner`. No Rust reference to the
        // mapping is ever formed.
        unsafe { GuestRegion::with_owner(0, self.host, self.len, self.clone()) }
            .with_private_anonymous_memory()
    }

    /// Reads the `u64` at guest-physical `gpa` (8-aligned) with one load,
    /// so a value the guest updates with one store is never torn.
    pub fn read_u64(self: &Arc<Self>, gpa: u64) -> HvResult<u64> {
        let mut b = [0u8; 8];
        self.region().read(gpa as usize, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }
}

impl Drop for GuestMemory {
    fn drop(&mut self) {
        // SAFETY: the mapping was made by `new` with this address and
        // length; its owner drops it only after the VM that used it (drop
        // order of `KvmGuest`), so nothing accesses it any more.
        unsafe { libc::munmap(self.host.as_ptr().cast(), self.len) };
    }
}

/// Puts the initial content into a fresh source guest: the program, the
/// control page, the page tables, the working set (classes shuffled by `seed`; zero pages
/// left untouched), the code area, the page table and the text pool.
/// Returns the class of every working-set page.
pub fn fill(
    region: &GuestRegion,
    layout: &GuestLayout,
    program: &[u8],
    seed: u64,
) -> HvResult<Vec<PageClass>> {
    let mut rng = Rng::new(seed);

    // Working set: the standard mix, in a seeded random order.
    let mut classes = Vec::with_capacity(layout.working_set_pages());
    for (class, n) in layout.classes() {
        classes.extend(std::iter::repeat_n(class, n));
    }
    for i in (1..classes.len()).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        classes.swap(i, j);
    }
    let mut page = vec![0u8; PAGE_SIZE];
    let mut table = Vec::with_capacity(layout.table_entries * 4);
    for (i, &class) in classes.iter().enumerate() {
        if class == PageClass::Zero {
            continue;
        }
        let gpa = layout.working_set_gpa as usize + i * PAGE_SIZE;
        fill_page(class, &mut rng, &mut page);
        region.write(gpa, &page)?;
        let entry = gpa as u32 | u32::from(class == PageClass::Random);
        table.extend_from_slice(&entry.to_le_bytes());
    }
    region.write(layout.table_gpa as usize, &table)?;

    // Code area and text pool.
    for off in (0..layout.code_len).step_by(PAGE_SIZE) {
        fill_page(PageClass::Code, &mut rng, &mut page);
        region.write(layout.code_gpa as usize + off, &page)?;
    }
    for off in (0..layout.pool_len).step_by(PAGE_SIZE) {
        fill_page(PageClass::Text, &mut rng, &mut page);
        region.write(layout.pool_gpa as usize + off, &page)?;
    }

    // Program and control page.
    region.write(PROGRAM_GPA as usize, program)?;
    let mut ctl = vec![0u8; 0x60];
    // xorshift64* needs a non-zero state.
    let state = rng.next_u64() | 1;
    ctl[CTL_RNG as usize..CTL_RNG as usize + 8].copy_from_slice(&state.to_le_bytes());
    let mut put = |field: u32, v: u32| {
        let at = field as usize;
        ctl[at..at + 4].copy_from_slice(&v.to_le_bytes());
    };
    put(CTL_TABLE_GPA, layout.table_gpa as u32);
    put(CTL_TABLE_LEN, table.len() as u32 / 4);
    put(CTL_POOL_GPA, layout.pool_gpa as u32);
    put(CTL_POOL_SPAN, (layout.pool_len - TEXT_COPY + 1) as u32);
    put(CTL_MAGIC, CONTROL_MAGIC);
    region.write(CONTROL_GPA as usize, &ctl)?;
    write_page_tables(region, layout)?;
    Ok(classes)
}

/// Present, writable, user, accessed.
const TABLE_FLAGS: u64 = 0x27;
/// Present, writable, user, accessed, dirty, 2 MiB page.
const WRITABLE_PAGE: u64 = 0xe7;
/// Present, user, accessed, 2 MiB page (read-only, never dirty).
const READ_ONLY_PAGE: u64 = 0xa5;

/// Identity-maps the RAM with 2 MiB user pages: one PML4 entry, one PDPT
/// entry per GiB, one page directory per GiB; writable only where the
/// guest writes (see the [`layout`](super::layout) docs). The accessed and
/// dirty bits are preset so that nothing ever writes the tables.
fn write_page_tables(region: &GuestRegion, layout: &GuestLayout) -> HvResult<()> {
    region.write(PML4_GPA as usize, &(PDPT_GPA | TABLE_FLAGS).to_le_bytes())?;
    let gib = 1usize << 30;
    for i in 0..layout.ram.div_ceil(gib) {
        let pd = PD_GPA + (i * PAGE_SIZE) as u64;
        region.write(PDPT_GPA as usize + i * 8, &(pd | TABLE_FLAGS).to_le_bytes())?;
    }
    let mut pds = Vec::with_capacity(layout.ram / LARGE_PAGE * 8);
    for base in (0..layout.ram as u64).step_by(LARGE_PAGE) {
        let flags = if layout.writable(base) {
            WRITABLE_PAGE
        } else {
            READ_ONLY_PAGE
        };
        pds.extend_from_slice(&(base | flags).to_le_bytes());
    }
    region.write(PD_GPA as usize, &pds)
}
