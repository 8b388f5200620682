//! A [`Sink`] that receives regions into memory: buffers and memory images
//! sent by a federation service, and the receiving side of `dwcp bench
//! transport`.
//!
//! Every region's bytes are reserved against a byte limit when it opens (a
//! region that would exceed it is refused, so a peer cannot make the
//! receiver allocate more than the limit), checked against the sender's
//! BLAKE3 digest when it finishes, and then handed over whole: nothing of a
//! region is visible before it is complete and verified.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::session::{RegionInfo, RegionWriter, Sink, lock};
use crate::treehash::PieceDigest;

/// A region received and verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceivedRegion {
    /// Its id in its session.
    pub region: u32,
    /// The sender's metadata.
    pub meta: Vec<u8>,
    /// Its length.
    pub len: u64,
    /// Its bytes; `None` when the sink discards what it verified.
    pub bytes: Option<Vec<u8>>,
}

/// Most buffers a sink keeps for reuse.
pub const POOL_BUFFERS: usize = 32;

/// Receives regions into memory, up to a limit.
#[derive(Debug)]
pub struct MemorySink {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    limit: u64,
    keep: bool,
    state: Mutex<SinkState>,
    cond: Condvar,
    /// Buffers of verified, discarded regions (and prefaulted ones, and
    /// ones given back with [`MemorySink::recycle`]), reused by later
    /// regions: a fresh buffer costs a page fault per 4 KiB as it fills.
    pool: Mutex<Vec<Vec<u8>>>,
}

#[derive(Debug, Default)]
struct SinkState {
    /// Bytes of open regions, and of finished ones not yet taken.
    reserved: u64,
    finished: VecDeque<ReceivedRegion>,
    failed: u64,
}

impl MemorySink {
    /// A sink holding at most `limit` bytes of regions at once (open ones
    /// and finished ones not yet taken).
    pub fn new(limit: u64) -> Self {
        Self::with(limit, true)
    }

    /// A sink that verifies each region and then frees it, reporting only
    /// its id, metadata and length (for measuring).
    pub fn discarding(limit: u64) -> Self {
        Self::with(limit, false)
    }

    fn with(limit: u64, keep: bool) -> Self {
        MemorySink {
            inner: Arc::new(Inner {
                limit,
                keep,
                state: Mutex::new(SinkState::default()),
                cond: Condvar::new(),
                pool: Mutex::new(Vec::new()),
            }),
        }
    }

    /// A handle to give to [`crate::Receiver::bind`]; this one keeps
    /// seeing what it receives.
    pub fn handle(&self) -> Arc<dyn Sink> {
        Arc::new(MemorySink {
            inner: self.inner.clone(),
        })
    }

    /// Takes the oldest finished region, waiting up to `wait` for one.
    pub fn take(&self, wait: Duration) -> Option<ReceivedRegion> {
        let deadline = Instant::now() + wait;
        let mut st = lock(&self.inner.state);
        loop {
            if let Some(r) = st.finished.pop_front() {
                if r.bytes.is_some() {
                    st.reserved -= r.len;
                }
                return Some(r);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            st = crate::session::wait(&self.inner.cond, st, left);
        }
    }

    /// Allocates and touches a `len`-byte buffer now, for a discarding
    /// sink to receive a region of up to `len` bytes into later without
    /// faulting in fresh pages while it receives (as a VMM's guest memory
    /// is in place before a migration arrives). Does nothing for a sink
    /// that keeps what it receives.
    pub fn prefault(&self, len: u64) -> Result<(), String> {
        if self.inner.keep {
            return Ok(());
        }
        let len = usize::try_from(len).map_err(|_| format!("{len} bytes do not fit in memory"))?;
        let mut buf = zeroed(len).ok_or_else(|| format!("cannot allocate {len} bytes"))?;
        populate(&mut buf);
        self.inner.pool_keep(buf);
        Ok(())
    }

    /// Gives back the bytes of a region taken with [`MemorySink::take`],
    /// once used, for a later region to be received into (at most
    /// [`POOL_BUFFERS`] are kept; the rest are freed).
    pub fn recycle(&self, buf: Vec<u8>) {
        self.inner.pool_keep(buf);
    }

    /// Regions that failed their digest check or were aborted.
    pub fn failed(&self) -> u64 {
        lock(&self.inner.state).failed
    }
}

impl Sink for MemorySink {
    fn open(&self, info: &RegionInfo) -> Result<Arc<dyn RegionWriter>, String> {
        let Some(announced) = info.len else {
            // An ordered region: reserved as it grows.
            return Ok(Arc::new(MemRegion {
                sink: self.inner.clone(),
                region: info.region,
                meta: info.meta.clone(),
                ordered: true,
                digest: PieceDigest::new(None),
                bytes: Mutex::new(Some(Buf {
                    data: Vec::new(),
                    len: 0,
                    stream: Some(blake3::Hasher::new()),
                })),
            }));
        };
        let len = usize::try_from(announced)
            .map_err(|_| format!("region of {announced} bytes does not fit in memory"))?;
        self.inner.reserve(announced)?;
        // A buffer that is large enough is reused: every byte of the
        // region is written before the digest is checked, and the digest
        // covers every byte, so nothing stale can pass (and what is kept
        // is cut to the region's length).
        let reused = {
            let mut pool = lock(&self.inner.pool);
            let best = (0..pool.len())
                .filter(|&i| pool[i].len() >= len)
                .min_by_key(|&i| pool[i].len());
            best.map(|i| pool.swap_remove(i))
        };
        let Some(data) = reused.or_else(|| zeroed(len)) else {
            lock(&self.inner.state).reserved -= announced;
            return Err(format!("cannot allocate {announced} bytes"));
        };
        Ok(Arc::new(MemRegion {
            sink: self.inner.clone(),
            region: info.region,
            meta: info.meta.clone(),
            ordered: false,
            digest: PieceDigest::new(Some(announced)),
            bytes: Mutex::new(Some(Buf {
                data,
                len,
                stream: None,
            })),
        }))
    }
}

impl Inner {
    /// Keeps `buf` for a later region, unless it is empty or
    /// [`POOL_BUFFERS`] are kept already.
    fn pool_keep(&self, buf: Vec<u8>) {
        let mut pool = lock(&self.pool);
        if pool.len() < POOL_BUFFERS && !buf.is_empty() {
            pool.push(buf);
        }
    }

    /// Reserves `n` more bytes against the limit.
    fn reserve(&self, n: u64) -> Result<(), String> {
        let mut st = lock(&self.state);
        let after = st.reserved.saturating_add(n);
        if after > self.limit {
            return Err(format!(
                "{n} more bytes: this receiver holds at most {} bytes in memory and {} are in use",
                self.limit, st.reserved
            ));
        }
        st.reserved = after;
        Ok(())
    }
}

/// Records a placed chunk in `pieces`: the codec's subtree value when it
/// has one for this offset, else by hashing the bytes.
pub(crate) fn record_digested(
    pieces: &PieceDigest,
    offset: u64,
    data: &[u8],
    digest: &dwcp_codec::ChunkDigest,
) {
    match *digest {
        dwcp_codec::ChunkDigest::Subtree { offset: at, cv } if at == offset => {
            pieces.record_cv(offset, data.len() as u64, cv);
        }
        _ => pieces.record(offset, data),
    }
}

/// `len` zero bytes, or `None` when they cannot be allocated. Large
/// zeroed allocations come from the kernel's zero pages lazily, so nothing
/// is written here (unlike `resize`, which would touch every page).
fn zeroed(len: usize) -> Option<Vec<u8>> {
    if len == 0 {
        return Some(Vec::new());
    }
    let layout = std::alloc::Layout::array::<u8>(len).ok()?;
    // SAFETY: `layout` has a non-zero size (len > 0).
    let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
    if ptr.is_null() {
        return None;
    }
    // SAFETY: `ptr` was allocated by the global allocator with the layout
    // of `[u8; len]` (alignment 1, size `len`), and all `len` bytes are
    // initialised (zeroed), so it is a valid Vec<u8> of length and capacity
    // `len`.
    Some(unsafe { Vec::from_raw_parts(ptr, len, len) })
}

/// Faults every page of `buf` in, writable: one `MADV_POPULATE_WRITE`
/// (Linux 5.14) over its whole pages, or a write per page where that is
/// not available. Reading would only map the shared zero page.
fn populate(buf: &mut [u8]) {
    const PAGE: usize = 4096;
    let start = buf.as_mut_ptr() as usize;
    let first = start.next_multiple_of(PAGE);
    let end = (start + buf.len()) / PAGE * PAGE;
    if end > first {
        // SAFETY: [first, end) lies inside `buf`, which this function
        // borrows mutably; MADV_POPULATE_WRITE only faults pages in (as a
        // write of their current contents would) and changes no byte.
        let r = unsafe {
            libc::madvise(
                first as *mut libc::c_void,
                end - first,
                libc::MADV_POPULATE_WRITE,
            )
        };
        if r == 0 {
            return;
        }
    }
    for b in buf.iter_mut().step_by(PAGE) {
        // A volatile write of the byte's own value faults the page in
        // and cannot be optimised away.
        // SAFETY: `b` is a valid, exclusive reference to a byte of `buf`.
        unsafe { std::ptr::write_volatile(b, *b) };
    }
}

struct MemRegion {
    sink: Arc<Inner>,
    region: u32,
    meta: Vec<u8>,
    /// Written in order, growing (an ordered region).
    ordered: bool,
    /// A region's digest, assembled from pieces as they are placed.
    digest: PieceDigest,
    /// `None` once finished or aborted.
    bytes: Mutex<Option<Buf>>,
}

/// A region's bytes: `data[..len]`; `data` may be longer (a reused buffer).
struct Buf {
    data: Vec<u8>,
    /// The region's length (announced, or written so far when ordered);
    /// what is reserved for it.
    len: usize,
    /// An ordered region's BLAKE3, fed in order as it is written (a
    /// discarding sink keeps none of its bytes to read back).
    stream: Option<blake3::Hasher>,
}

impl MemRegion {
    /// Copies `data` in at `offset`; true when the region's pieces are to
    /// be recorded (an ordered region hashes as it grows instead).
    fn place(&self, offset: u64, data: &[u8]) -> Result<bool, String> {
        let mut b = lock(&self.bytes);
        let b = b.as_mut().ok_or("the region is already finished")?;
        let start = usize::try_from(offset).map_err(|_| "offset out of range")?;
        if self.ordered {
            if start != b.len {
                return Err(format!(
                    "ordered write at {start}, the region ends at {}",
                    b.len
                ));
            }
            self.sink.reserve(data.len() as u64)?;
            b.len += data.len();
            if self.sink.keep {
                b.data.extend_from_slice(data);
            }
            if let Some(h) = &mut b.stream {
                h.update(data);
            }
            return Ok(false);
        }
        b.data[..b.len]
            .get_mut(start..start.saturating_add(data.len()))
            .ok_or("write outside the region")?
            .copy_from_slice(data);
        Ok(true)
    }

    /// Gives back the reservation of a region that will not be kept, and
    /// its buffer to the pool.
    fn release(&self, buf: Buf, failed: bool) {
        let mut st = lock(&self.sink.state);
        st.reserved -= buf.len as u64;
        st.failed += u64::from(failed);
        drop(st);
        if !self.ordered {
            self.sink.pool_keep(buf.data);
        }
    }
}

impl RegionWriter for MemRegion {
    fn write_at(&self, offset: u64, data: &[u8]) -> Result<(), String> {
        if self.place(offset, data)? {
            // Hashed outside the lock, on the placing core.
            self.digest.record(offset, data);
        }
        Ok(())
    }

    fn write_digested(
        &self,
        offset: u64,
        data: &[u8],
        digest: &dwcp_codec::ChunkDigest,
    ) -> Result<(), String> {
        if self.place(offset, data)? {
            record_digested(&self.digest, offset, data, digest);
        }
        Ok(())
    }

    fn finish(&self, len: u64, digest: &[u8; 32]) -> Result<(), String> {
        let Some(mut bytes) = lock(&self.bytes).take() else {
            return Err("the region is already finished".into());
        };
        let got = if bytes.len as u64 != len {
            Err(format!(
                "region {} is {} bytes long, the sender says {len}",
                self.region, bytes.len
            ))
        } else if let Some(h) = &bytes.stream {
            Ok(h.finalize())
        } else {
            self.digest.finish(len, |off, buf| {
                let start = off as usize;
                buf.copy_from_slice(&bytes.data[start..start + buf.len()]);
                Ok(())
            })
        };
        let got = match got {
            Ok(h) => h,
            Err(e) => {
                self.release(bytes, true);
                return Err(e);
            }
        };
        if got != blake3::Hash::from_bytes(*digest) {
            self.release(bytes, true);
            return Err(format!(
                "region {}: BLAKE3 digest does not match the sender's; discarded",
                self.region
            ));
        }
        let keep = self.sink.keep;
        let kept = if keep {
            bytes.data.truncate(bytes.len);
            Some(bytes.data)
        } else {
            self.release(bytes, false);
            None
        };
        let mut st = lock(&self.sink.state);
        st.finished.push_back(ReceivedRegion {
            region: self.region,
            meta: self.meta.clone(),
            len,
            bytes: kept,
        });
        drop(st);
        self.sink.cond.notify_all();
        Ok(())
    }

    fn abort(&self) {
        if let Some(b) = lock(&self.bytes).take() {
            self.release(b, true);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(region: u32, len: u64) -> RegionInfo {
        RegionInfo {
            region,
            len: Some(len),
            meta: b"m".to_vec(),
        }
    }

    #[test]
    fn verifies_then_hands_over() {
        let sink = MemorySink::new(10 << 20);
        let data: Vec<u8> = (0..(3 << 20) + 5).map(|i| (i * 7 % 251) as u8).collect();
        let w = sink.open(&info(4, data.len() as u64)).unwrap();
        for (k, piece) in data.chunks(1 << 20).enumerate().rev() {
            w.write_at((k << 20) as u64, piece).unwrap();
        }
        assert!(sink.take(Duration::ZERO).is_none(), "nothing before finish");
        w.finish(data.len() as u64, blake3::hash(&data).as_bytes())
            .unwrap();
        let r = sink.take(Duration::ZERO).unwrap();
        assert_eq!(
            (r.region, r.len, r.meta.as_slice()),
            (4, data.len() as u64, &b"m"[..])
        );
        assert!(r.bytes.as_deref() == Some(&data[..]));
        assert_eq!(lock(&sink.inner.state).reserved, 0);
    }

    #[test]
    fn a_wrong_digest_discards() {
        let sink = MemorySink::new(1 << 20);
        let w = sink.open(&info(0, 100)).unwrap();
        w.write_at(0, &[1; 100]).unwrap();
        let e = w.finish(100, &[0; 32]).unwrap_err();
        assert!(e.contains("digest"), "{e}");
        assert!(sink.take(Duration::ZERO).is_none());
        assert_eq!((sink.failed(), lock(&sink.inner.state).reserved), (1, 0));
        assert!(
            w.write_at(0, &[1]).is_err(),
            "finished regions take no writes"
        );
    }

    #[test]
    fn the_limit_bounds_what_peers_can_make_it_hold() {
        let sink = MemorySink::new(1000);
        let a = sink.open(&info(0, 600)).unwrap();
        let e = sink.open(&info(1, 600)).err().unwrap();
        assert!(e.contains("at most 1000"), "{e}");
        assert!(sink.open(&info(2, u64::MAX)).is_err());
        a.abort();
        let b = sink.open(&info(1, 600)).unwrap();
        assert!(b.write_at(599, &[0, 0]).is_err(), "outside the region");
        b.write_at(0, &[9; 600]).unwrap();
        b.finish(600, blake3::hash(&[9; 600]).as_bytes()).unwrap();
        // Kept until taken.
        assert!(sink.open(&info(3, 600)).is_err());
        assert!(sink.take(Duration::ZERO).is_some());
        assert!(sink.open(&info(3, 600)).is_ok());
    }

    #[test]
    fn a_recycled_buffer_is_reused_and_what_is_kept_is_exactly_the_region() {
        let sink = MemorySink::new(1 << 20);
        sink.recycle(vec![7u8; 1000]);
        let w = sink.open(&info(0, 300)).unwrap();
        assert!(lock(&sink.inner.pool).is_empty(), "taken from the pool");
        w.write_at(0, &[8; 300]).unwrap();
        w.finish(300, blake3::hash(&[8; 300]).as_bytes()).unwrap();
        let r = sink.take(Duration::ZERO).unwrap();
        assert_eq!(r.bytes.as_deref(), Some(&[8u8; 300][..]), "cut to length");
        // A stale byte left from the earlier use fails the digest.
        sink.recycle(r.bytes.unwrap());
        let w = sink.open(&info(1, 200)).unwrap();
        w.write_at(0, &[9; 199]).unwrap();
        assert!(w.finish(200, blake3::hash(&[9; 200]).as_bytes()).is_err());
        assert_eq!(lock(&sink.inner.state).reserved, 0);
        // The pool is bounded.
        for _ in 0..POOL_BUFFERS + 5 {
            sink.recycle(vec![0; 10]);
        }
        assert_eq!(lock(&sink.inner.pool).len(), POOL_BUFFERS);
    }

    #[test]
    fn discarding_frees_after_verifying() {
        let sink = MemorySink::discarding(1000);
        let w = sink.open(&info(0, 600)).unwrap();
        w.write_at(0, &[3; 600]).unwrap();
        w.finish(600, blake3::hash(&[3; 600]).as_bytes()).unwrap();
        assert!(sink.open(&info(1, 600)).is_ok(), "freed at finish");
        let r = sink.take(Duration::ZERO).unwrap();
        assert_eq!((r.len, r.bytes), (600, None));
    }

    #[test]
    fn discarding_reuses_buffers_and_still_checks_every_byte() {
        let sink = MemorySink::discarding(1 << 20);
        sink.prefault(1000).unwrap();
        let w = sink.open(&info(0, 700)).unwrap();
        w.write_at(0, &[5; 700]).unwrap();
        w.finish(700, blake3::hash(&[5; 700]).as_bytes()).unwrap();
        assert_eq!(lock(&sink.inner.pool).len(), 1, "given back");
        // The next region lands in the same (stale) buffer: a missing
        // write would leave old bytes, which the digest catches.
        let w = sink.open(&info(1, 500)).unwrap();
        assert!(w.write_at(499, &[0, 0]).is_err(), "bounded by the region");
        w.write_at(0, &[6; 400]).unwrap();
        let mut want = vec![6u8; 400];
        want.extend([0u8; 100]);
        assert!(w.finish(500, blake3::hash(&want).as_bytes()).is_err());
        assert_eq!(sink.failed(), 1);
        assert_eq!(lock(&sink.inner.state).reserved, 0);
    }

    #[test]
    fn ordered_regions_grow_in_order_within_the_limit() {
        for keep in [true, false] {
            let sink = MemorySink::with(3000, keep);
            let w = sink
                .open(&RegionInfo {
                    region: 7,
                    len: None,
                    meta: Vec::new(),
                })
                .unwrap();
            w.write_at(0, &[1; 1000]).unwrap();
            assert!(w.write_at(500, &[2; 10]).is_err(), "out of order");
            w.write_at(1000, &[2; 1000]).unwrap();
            let mut want = vec![1u8; 1000];
            want.extend([2u8; 1000]);
            assert!(w.finish(1999, blake3::hash(&want).as_bytes()).is_err());
            assert_eq!(lock(&sink.inner.state).reserved, 0);
            let w = sink
                .open(&RegionInfo {
                    region: 8,
                    len: None,
                    meta: Vec::new(),
                })
                .unwrap();
            w.write_at(0, &want).unwrap();
            let e = w.write_at(2000, &[0; 1001]).unwrap_err();
            assert!(e.contains("at most 3000"), "{e}");
            w.finish(2000, blake3::hash(&want).as_bytes()).unwrap();
            let r = sink.take(Duration::ZERO).unwrap();
            assert_eq!(r.len, 2000);
            assert_eq!(r.bytes.is_some(), keep);
            if keep {
                assert_eq!(r.bytes.unwrap(), want);
            }
            assert_eq!(lock(&sink.inner.state).reserved, 0);
        }
    }
}
