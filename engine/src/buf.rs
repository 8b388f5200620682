//! Buffers the kernel may read or write while an operation is in flight.
//!
//! An operation takes its buffer by value and gives it back with the result
//! ([`BufResult`]), so the buffer provably outlives the kernel's use of it.
//! [`LocalBufPool`] hands out fixed-size buffers from one allocation per
//! core, registered with the ring when that is enabled, and makes a task wait
//! when the pool is empty (backpressure: memory never grows).

use std::alloc::{Layout, alloc_zeroed, dealloc};
use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

use crate::runtime;

/// An operation's result together with the buffer it used.
pub type BufResult<T, B> = (std::io::Result<T>, B);

/// A buffer the kernel can read from (sends and writes).
///
/// # Safety
/// `stable_ptr` must point to `bytes_init` initialized bytes that stay at the
/// same address, unchanged, for as long as the value lives, even when the
/// value itself is moved.
pub unsafe trait IoBuf: Unpin + 'static {
    /// Start of the bytes.
    fn stable_ptr(&self) -> *const u8;
    /// Initialized bytes (what a send sends).
    fn bytes_init(&self) -> usize;
    /// Index of the registered buffer this memory lies in, if any.
    fn fixed_index(&self) -> Option<u16> {
        None
    }
}

/// A buffer the kernel can write into (receives and reads).
///
/// # Safety
/// As [`IoBuf`], and `stable_mut_ptr` must be valid for writes of
/// `bytes_total` bytes; `set_init` is called with what the kernel wrote.
pub unsafe trait IoBufMut: IoBuf {
    /// Start of the writable memory.
    fn stable_mut_ptr(&mut self) -> *mut u8;
    /// Capacity in bytes.
    fn bytes_total(&self) -> usize;
    /// Records that the first `len` bytes are now initialized.
    ///
    /// # Safety
    /// The first `len` bytes must have been written.
    unsafe fn set_init(&mut self, len: usize);
}

// SAFETY: a Vec's heap block does not move when the Vec is moved; the
// pointer and length describe its initialized part.
unsafe impl IoBuf for Vec<u8> {
    fn stable_ptr(&self) -> *const u8 {
        self.as_ptr()
    }
    fn bytes_init(&self) -> usize {
        self.len()
    }
}

// SAFETY: as above; writes go to the capacity, which the Vec owns.
unsafe impl IoBufMut for Vec<u8> {
    fn stable_mut_ptr(&mut self) -> *mut u8 {
        self.as_mut_ptr()
    }
    fn bytes_total(&self) -> usize {
        self.capacity()
    }
    unsafe fn set_init(&mut self, len: usize) {
        if len > self.len() {
            // SAFETY: the caller says the kernel wrote `len` bytes, and
            // `len <= capacity` because the kernel got that as the limit.
            unsafe { self.set_len(len) };
        }
    }
}

// SAFETY: a boxed slice's heap block does not move; all of it is initialized.
unsafe impl IoBuf for Box<[u8]> {
    fn stable_ptr(&self) -> *const u8 {
        self.as_ptr()
    }
    fn bytes_init(&self) -> usize {
        self.len()
    }
}

// SAFETY: a static slice lives forever and is never written.
unsafe impl IoBuf for &'static [u8] {
    fn stable_ptr(&self) -> *const u8 {
        self.as_ptr()
    }
    fn bytes_init(&self) -> usize {
        self.len()
    }
}

pub(crate) struct PoolInner {
    base: *mut u8,
    layout: Layout,
    buf_size: usize,
    count: usize,
    free: RefCell<Vec<u32>>,
    waiters: RefCell<VecDeque<Waker>>,
    registered: Cell<bool>,
    leaked: Cell<bool>,
}

impl Drop for PoolInner {
    fn drop(&mut self) {
        if !self.leaked.get() && self.layout.size() > 0 {
            // SAFETY: allocated in `LocalBufPool::new` with this layout; the
            // worker frees it only after the kernel finished every operation.
            unsafe { dealloc(self.base, self.layout) };
        }
    }
}

/// A per-core pool of fixed-size buffers carved from one allocation.
///
/// Cloning gives another handle to the same pool. `!Send`: it never leaves
/// its core.
#[derive(Clone)]
pub struct LocalBufPool {
    inner: Rc<PoolInner>,
}

impl LocalBufPool {
    /// A pool of `count` buffers of `buf_size` bytes (zeroed, page-aligned).
    pub(crate) fn new(count: usize, buf_size: usize) -> Self {
        let total = count.saturating_mul(buf_size);
        let layout =
            Layout::from_size_align(total.max(1), 4096).unwrap_or_else(|_| Layout::new::<u8>());
        // SAFETY: the layout has a non-zero size.
        let base = unsafe { alloc_zeroed(layout) };
        if base.is_null() {
            std::alloc::handle_alloc_error(layout);
        }
        Self {
            inner: Rc::new(PoolInner {
                base,
                layout,
                buf_size,
                count,
                free: RefCell::new((0..count as u32).rev().collect()),
                waiters: RefCell::new(VecDeque::new()),
                registered: Cell::new(false),
                leaked: Cell::new(false),
            }),
        }
    }

    /// The pool of the current worker, or `None` off-engine.
    pub fn current() -> Option<Self> {
        runtime::with_local(|l| l.pool.clone())
    }

    /// The iovecs to register with the ring, one per buffer.
    pub(crate) fn iovecs(&self) -> Vec<libc::iovec> {
        (0..self.inner.count)
            .map(|i| libc::iovec {
                // SAFETY: `i * buf_size` is inside the allocation.
                iov_base: unsafe { self.inner.base.add(i * self.inner.buf_size) }.cast(),
                iov_len: self.inner.buf_size,
            })
            .collect()
    }

    pub(crate) fn set_registered(&self) {
        self.inner.registered.set(true);
    }

    /// Whether the buffers are registered with the ring (fixed buffers).
    pub fn is_registered(&self) -> bool {
        self.inner.registered.get()
    }

    pub(crate) fn leak(&self) {
        self.inner.leaked.set(true);
    }

    /// Size of each buffer.
    pub fn buf_size(&self) -> usize {
        self.inner.buf_size
    }

    /// Number of buffers in the pool.
    pub fn capacity(&self) -> usize {
        self.inner.count
    }

    /// Buffers free right now.
    pub fn available(&self) -> usize {
        self.inner.free.borrow().len()
    }

    /// A buffer if one is free, without waiting.
    pub fn try_get(&self) -> Option<PoolBuf> {
        let idx = self.inner.free.borrow_mut().pop()?;
        Some(PoolBuf {
            pool: self.inner.clone(),
            idx,
            len: 0,
        })
    }

    /// A buffer; waits while the pool is empty.
    pub fn get(&self) -> GetBuf {
        GetBuf {
            pool: self.clone(),
            waited: false,
        }
    }
}

/// Future of [`LocalBufPool::get`].
pub struct GetBuf {
    pool: LocalBufPool,
    waited: bool,
}

impl Future for GetBuf {
    type Output = PoolBuf;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<PoolBuf> {
        if let Some(b) = self.pool.try_get() {
            return Poll::Ready(b);
        }
        if !self.waited {
            self.waited = true;
            let _ = runtime::with_local(|l| l.shared.metrics.buffer_waits.incr());
        }
        self.pool
            .inner
            .waiters
            .borrow_mut()
            .push_back(cx.waker().clone());
        Poll::Pending
    }
}

/// One buffer of a [`LocalBufPool`]; goes back to the pool when dropped.
///
/// It has a capacity ([`LocalBufPool::buf_size`]) and a length (the bytes in
/// use, what a send sends); it derefs to the bytes in use.
pub struct PoolBuf {
    pool: Rc<PoolInner>,
    idx: u32,
    len: usize,
}

impl PoolBuf {
    fn base(&self) -> *mut u8 {
        // SAFETY: `idx < count`, so the offset is inside the allocation.
        unsafe { self.pool.base.add(self.idx as usize * self.pool.buf_size) }
    }

    /// Capacity in bytes.
    pub fn capacity(&self) -> usize {
        self.pool.buf_size
    }

    /// Sets the length (bytes in use), at most the capacity.
    pub fn set_len(&mut self, len: usize) {
        self.len = len.min(self.pool.buf_size);
    }

    /// The whole buffer, whatever the length.
    pub fn as_full_mut(&mut self) -> &mut [u8] {
        // SAFETY: the buffer's bytes are initialized (the pool is zeroed at
        // allocation) and owned exclusively by this `PoolBuf`.
        unsafe { std::slice::from_raw_parts_mut(self.base(), self.pool.buf_size) }
    }

    /// Copies `data` in (up to the capacity) and sets the length; returns how
    /// many bytes were taken.
    pub fn fill_from(&mut self, data: &[u8]) -> usize {
        let n = data.len().min(self.capacity());
        self.as_full_mut()[..n].copy_from_slice(&data[..n]);
        self.len = n;
        n
    }
}

impl std::ops::Deref for PoolBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: `len <= buf_size`; the bytes are initialized and owned by
        // this `PoolBuf`.
        unsafe { std::slice::from_raw_parts(self.base(), self.len) }
    }
}

impl std::ops::DerefMut for PoolBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as for `Deref`, and the access is exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.base(), self.len) }
    }
}

impl Drop for PoolBuf {
    fn drop(&mut self) {
        self.pool.free.borrow_mut().push(self.idx);
        if let Some(w) = self.pool.waiters.borrow_mut().pop_front() {
            w.wake();
        }
    }
}

impl std::fmt::Debug for PoolBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PoolBuf")
            .field("idx", &self.idx)
            .field("len", &self.len)
            .finish()
    }
}

// SAFETY: the memory is part of the pool allocation, which the `Rc` keeps
// alive and which never moves; `len` bytes of it are initialized.
unsafe impl IoBuf for PoolBuf {
    fn stable_ptr(&self) -> *const u8 {
        self.base()
    }
    fn bytes_init(&self) -> usize {
        self.len
    }
    fn fixed_index(&self) -> Option<u16> {
        if self.pool.registered.get() {
            u16::try_from(self.idx).ok()
        } else {
            None
        }
    }
}

// SAFETY: as above; the whole capacity is writable and owned by this buffer.
unsafe impl IoBufMut for PoolBuf {
    fn stable_mut_ptr(&mut self) -> *mut u8 {
        self.base()
    }
    fn bytes_total(&self) -> usize {
        self.pool.buf_size
    }
    unsafe fn set_init(&mut self, len: usize) {
        self.len = len.min(self.pool.buf_size);
    }
}

/// A range of a buffer, usable as a buffer: send a prefix of a reusable
/// frame buffer, or receive exactly `n` bytes into part of a larger one.
/// [`Slice::into_inner`] gives the whole buffer back.
#[derive(Debug)]
pub struct Slice<B> {
    buf: B,
    begin: usize,
    end: usize,
}

impl<B: IoBuf> Slice<B> {
    /// `buf[range]` for sending: the range must lie within its initialized
    /// bytes.
    ///
    /// # Panics
    /// If it does not (a caller bug, never input-dependent).
    pub fn new(buf: B, range: std::ops::Range<usize>) -> Self {
        assert!(
            range.start <= range.end && range.end <= buf.bytes_init(),
            "slice {range:?} of a buffer of {} initialized bytes",
            buf.bytes_init()
        );
        Slice {
            buf,
            begin: range.start,
            end: range.end,
        }
    }

    /// The whole buffer.
    pub fn into_inner(self) -> B {
        self.buf
    }

    /// The range.
    pub fn range(&self) -> std::ops::Range<usize> {
        self.begin..self.end
    }
}

impl<B: IoBufMut> Slice<B> {
    /// `buf[range]` for receiving: the range must lie within its capacity
    /// and start within its initialized bytes (so that reporting the
    /// received bytes never claims uninitialized memory before them).
    ///
    /// # Panics
    /// If it does not (a caller bug, never input-dependent).
    pub fn new_mut(buf: B, range: std::ops::Range<usize>) -> Self {
        assert!(
            range.start <= range.end
                && range.end <= buf.bytes_total()
                && range.start <= buf.bytes_init(),
            "slice {range:?} of a buffer of {} bytes, {} initialized",
            buf.bytes_total(),
            buf.bytes_init()
        );
        Slice {
            buf,
            begin: range.start,
            end: range.end,
        }
    }
}

// SAFETY: the range was checked against the inner buffer when the slice was
// made and the inner buffer's memory is stable; `bytes_init` never reaches
// past the inner buffer's initialized bytes.
unsafe impl<B: IoBuf> IoBuf for Slice<B> {
    fn stable_ptr(&self) -> *const u8 {
        // SAFETY: `begin <= end <= ` the inner buffer's length or capacity.
        unsafe { self.buf.stable_ptr().add(self.begin) }
    }
    fn bytes_init(&self) -> usize {
        self.end
            .min(self.buf.bytes_init())
            .saturating_sub(self.begin)
    }
    fn fixed_index(&self) -> Option<u16> {
        self.buf.fixed_index()
    }
}

// SAFETY: as above; writes stay within `begin..end`, inside the inner
// buffer's capacity, and initialization is reported to it in its own terms.
unsafe impl<B: IoBufMut> IoBufMut for Slice<B> {
    fn stable_mut_ptr(&mut self) -> *mut u8 {
        // SAFETY: `begin <= end <=` the inner buffer's capacity.
        unsafe { self.buf.stable_mut_ptr().add(self.begin) }
    }
    fn bytes_total(&self) -> usize {
        self.end - self.begin
    }
    unsafe fn set_init(&mut self, len: usize) {
        // SAFETY: the kernel wrote `len` bytes from `begin`, and `new_mut`
        // checked that every byte before `begin` was already initialized.
        unsafe { self.buf.set_init(self.begin + len) }
    }
}
