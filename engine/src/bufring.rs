//! A ring of provided buffers for multishot receives.
//!
//! The kernel picks a buffer from the ring for each received chunk and says
//! which in the completion; the buffer goes back to the ring when the
//! [`RingBuf`] that holds it is dropped. When the application holds every
//! buffer, the kernel ends the multishot receive with `ENOBUFS`; the receiver
//! then waits for a buffer to come back before it re-arms (backpressure).

use std::alloc::{Layout, alloc_zeroed, dealloc};
use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::rc::Rc;
use std::sync::atomic::{AtomicU16, Ordering};
use std::task::Waker;

use io_uring::types::BufRingEntry;

pub(crate) struct RingInner {
    ring: *mut BufRingEntry,
    ring_layout: Layout,
    bufs: *mut u8,
    bufs_layout: Layout,
    entries: u16,
    buf_size: u32,
    pub bgid: u16,
    tail: Cell<u16>,
    /// Buffers the application holds.
    out: Cell<u32>,
    waiters: RefCell<VecDeque<Waker>>,
    leaked: Cell<bool>,
}

impl Drop for RingInner {
    fn drop(&mut self) {
        if self.leaked.get() {
            return;
        }
        // SAFETY: both blocks were allocated in `LocalBufRing::new` with these
        // layouts; the worker drops the ring after the kernel finished every
        // receive that could pick from it.
        unsafe {
            dealloc(self.ring.cast(), self.ring_layout);
            dealloc(self.bufs, self.bufs_layout);
        }
    }
}

/// A per-core ring of provided receive buffers. `!Send`.
#[derive(Clone)]
pub struct LocalBufRing {
    pub(crate) inner: Rc<RingInner>,
}

impl LocalBufRing {
    /// Allocates a ring of `entries` buffers (a power of two, at most 32768)
    /// of `buf_size` bytes each, all of them handed to the kernel.
    pub(crate) fn new(entries: u16, buf_size: u32, bgid: u16) -> Self {
        let entries = entries.max(1).next_power_of_two().min(32768);
        let ring_layout =
            Layout::from_size_align(entries as usize * std::mem::size_of::<BufRingEntry>(), 4096)
                .unwrap_or_else(|_| Layout::new::<BufRingEntry>());
        let bufs_layout =
            Layout::from_size_align((entries as usize * buf_size as usize).max(1), 4096)
                .unwrap_or_else(|_| Layout::new::<u8>());
        // SAFETY: both layouts have a non-zero size.
        let (ring, bufs) = unsafe { (alloc_zeroed(ring_layout), alloc_zeroed(bufs_layout)) };
        if ring.is_null() {
            std::alloc::handle_alloc_error(ring_layout);
        }
        if bufs.is_null() {
            std::alloc::handle_alloc_error(bufs_layout);
        }
        let this = Self {
            inner: Rc::new(RingInner {
                ring: ring.cast(),
                ring_layout,
                bufs,
                bufs_layout,
                entries,
                buf_size,
                bgid,
                tail: Cell::new(0),
                out: Cell::new(0),
                waiters: RefCell::new(VecDeque::new()),
                leaked: Cell::new(false),
            }),
        };
        for bid in 0..entries {
            this.inner.push(bid);
        }
        this.inner.publish();
        this.inner.out.set(0);
        this
    }

    /// Address of the ring, for registration.
    pub(crate) fn ring_addr(&self) -> u64 {
        self.inner.ring as u64
    }

    /// Number of entries.
    pub fn entries(&self) -> u16 {
        self.inner.entries
    }

    /// Size of each buffer.
    pub fn buf_size(&self) -> u32 {
        self.inner.buf_size
    }

    /// Buffers the application holds right now.
    pub fn held(&self) -> u32 {
        self.inner.out.get()
    }

    pub(crate) fn leak(&self) {
        self.inner.leaked.set(true);
    }

    /// Wraps buffer `bid`, which the kernel filled with `len` bytes.
    pub(crate) fn take(&self, bid: u16, len: u32) -> RingBuf {
        self.inner.out.set(self.inner.out.get() + 1);
        RingBuf {
            ring: self.inner.clone(),
            bid,
            len: len.min(self.inner.buf_size),
        }
    }

    /// Registers `waker` to run when a buffer comes back.
    pub(crate) fn wait_for_buffer(&self, waker: Waker) {
        self.inner.waiters.borrow_mut().push_back(waker);
    }

    /// Whether the kernel has at least one buffer to pick.
    pub(crate) fn has_free(&self) -> bool {
        self.inner.out.get() < self.inner.entries as u32
    }
}

impl RingInner {
    fn push(&self, bid: u16) {
        let tail = self.tail.get();
        let idx = (tail & (self.entries - 1)) as usize;
        // SAFETY: `idx < entries`, inside the ring allocation; the kernel
        // reads entries only up to the published tail, which does not yet
        // cover this one.
        let entry = unsafe { &mut *self.ring.add(idx) };
        // SAFETY: `bid < entries`, so the buffer lies inside `bufs`.
        entry.set_addr(unsafe { self.bufs.add(bid as usize * self.buf_size as usize) } as u64);
        entry.set_len(self.buf_size);
        entry.set_bid(bid);
        self.tail.set(tail.wrapping_add(1));
    }

    fn publish(&self) {
        // SAFETY: the tail field overlays the first entry's `resv` field, as
        // the kernel ABI defines; the ring base is valid and aligned.
        let tail = unsafe { BufRingEntry::tail(self.ring) } as *const AtomicU16;
        // SAFETY: the tail is a naturally aligned u16 the kernel only reads.
        unsafe { &*tail }.store(self.tail.get(), Ordering::Release);
    }

    /// Gives buffer `bid` back to the kernel.
    pub(crate) fn recycle(&self, bid: u16) {
        if bid >= self.entries {
            return;
        }
        self.push(bid);
        self.publish();
        self.out.set(self.out.get().saturating_sub(1));
        if let Some(w) = self.waiters.borrow_mut().pop_front() {
            w.wake();
        }
    }

    /// Recycles the buffer a completion picked, if any (for receives whose
    /// consumer went away).
    pub(crate) fn recycle_flags(&self, flags: u32) {
        if let Some(bid) = io_uring::cqueue::buffer_select(flags) {
            self.out.set(self.out.get() + 1);
            self.recycle(bid);
        }
    }
}

/// A received chunk in a provided buffer; the buffer goes back to the ring on
/// drop. Derefs to the received bytes.
pub struct RingBuf {
    ring: Rc<RingInner>,
    bid: u16,
    len: u32,
}

impl std::ops::Deref for RingBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: `bid < entries`, `len <= buf_size`; the kernel wrote these
        // bytes before posting the completion and will not touch the buffer
        // until it is recycled.
        unsafe {
            std::slice::from_raw_parts(
                self.ring
                    .bufs
                    .add(self.bid as usize * self.ring.buf_size as usize),
                self.len as usize,
            )
        }
    }
}

impl Drop for RingBuf {
    fn drop(&mut self) {
        self.ring.recycle(self.bid);
    }
}

impl std::fmt::Debug for RingBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RingBuf")
            .field("bid", &self.bid)
            .field("len", &self.len)
            .finish()
    }
}
