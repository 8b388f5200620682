//! The bounded state that both ends of a session keep in step: recently
//! sent (or received) page contents in a byte ring, indexed by content id,
//! and the map from page index to its latest content.
//!
//! Encoder and decoder run the same deterministic allocator over the same
//! sequence of frame sizes, so they evict the same frames at the same time
//! without exchanging a word (docs/wire-format.md, "Keeping state in step").

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};

/// A hasher for keys that are already well mixed (fingerprints) or small
/// integers (page indices): one multiply, no per-call state.
#[derive(Default, Clone, Copy)]
pub(crate) struct MulHasher(u64);

impl Hasher for MulHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }
    fn write_u64(&mut self, v: u64) {
        let x = (v ^ self.0).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        self.0 = x ^ (x >> 29);
    }
}

pub(crate) type FastMap<K, V> = HashMap<K, V, BuildHasherDefault<MulHasher>>;

/// One retained frame's contents: `len` bytes at `start` in the arena.
#[derive(Debug)]
struct Retained {
    start: usize,
    len: usize,
    first_id: u64,
    /// Offset of each content page within the frame, by id - first_id.
    offsets: Vec<u32>,
}

/// Where a frame's contents go, decided before anything is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Placement {
    /// Start in the arena (when retained).
    start: usize,
    /// Frames evicted from the front of the ring.
    evict: usize,
    /// Whether the frame is kept (false: it does not fit, or is empty).
    retained: bool,
}

/// The ring of recent contents plus the page map.
#[derive(Debug)]
pub(crate) struct Store {
    page_size: usize,
    capacity: usize,
    arena: Vec<u8>,
    scratch: Vec<u8>,
    head: usize,
    frames: VecDeque<Retained>,
    next_id: u64,
    /// page index -> content id of its latest version.
    pages: FastMap<u64, u64>,
    /// The region of the frame being (or last) written: placement, length.
    current: Option<(Placement, usize)>,
    /// Content offsets of the frame being written.
    offsets: Vec<u32>,
    /// Offset vectors of evicted frames, reused so that a frame allocates
    /// nothing once the ring is warm.
    spare: Vec<Vec<u32>>,
}

impl Store {
    pub(crate) fn new(page_size: usize, capacity: usize) -> Store {
        Store {
            page_size,
            capacity,
            arena: Vec::new(),
            scratch: Vec::new(),
            head: 0,
            frames: VecDeque::new(),
            next_id: 0,
            pages: FastMap::default(),
            current: None,
            offsets: Vec::new(),
            spare: Vec::new(),
        }
    }

    /// Uses `arena` as the arena when nothing was ever placed in this one
    /// (else gives it back). Only bytes written by a frame are ever read,
    /// so what `arena` holds does not matter.
    pub(crate) fn adopt_arena(&mut self, arena: Vec<u8>) -> Result<(), Vec<u8>> {
        if !self.arena.is_empty() || !self.frames.is_empty() || self.current.is_some() {
            return Err(arena);
        }
        self.arena = arena;
        Ok(())
    }

    /// Bytes of page content currently retained.
    pub(crate) fn retained_bytes(&self) -> usize {
        self.frames.iter().map(|f| f.len).sum()
    }

    /// Touches the whole arena now so that first use does not pay for
    /// page faults (optional).
    pub(crate) fn prefault(&mut self) {
        if self.arena.len() < self.capacity {
            self.arena.resize(self.capacity, 0);
        }
        for i in (0..self.arena.len()).step_by(4096) {
            // SAFETY-free way to force a write the optimiser cannot drop:
            // black_box hides that the memory is already zero.
            self.arena[i] = std::hint::black_box(0);
        }
    }

    /// The id the next content page will get.
    pub(crate) fn next_id(&self) -> u64 {
        self.next_id
    }

    /// Where a frame of `len` content bytes would go and what it evicts.
    pub(crate) fn plan(&self, len: usize) -> Placement {
        if len == 0 || len > self.capacity {
            return Placement {
                start: 0,
                evict: if len == 0 { 0 } else { self.frames.len() },
                retained: false,
            };
        }
        let mut h = self.head;
        let mut k = 0;
        if h + len > self.capacity {
            // Everything at or after the head predates the last wrap: the
            // oldest frames. Wrapping discards them.
            while k < self.frames.len() && self.frames[k].start >= h {
                k += 1;
            }
            h = 0;
        }
        while k < self.frames.len() {
            let f = &self.frames[k];
            if f.start < h + len && f.start + f.len > h {
                k += 1;
            } else {
                break;
            }
        }
        Placement {
            start: h,
            evict: k,
            retained: true,
        }
    }

    /// The lowest content id still held after `plan` is applied.
    pub(crate) fn oldest_after(&self, plan: &Placement) -> u64 {
        self.frames
            .get(plan.evict)
            .map_or(self.next_id, |f| f.first_id)
    }

    /// The content of `id`, if it is held now.
    pub(crate) fn content(&self, id: u64) -> Option<&[u8]> {
        let i = self
            .frames
            .partition_point(|f| f.first_id <= id)
            .checked_sub(1)?;
        let f = &self.frames[i];
        let off = *f.offsets.get(usize::try_from(id - f.first_id).ok()?)? as usize;
        self.arena
            .get(f.start + off..f.start + off + self.page_size)
    }

    /// The content id of page `index`'s latest version, if held now.
    pub(crate) fn page(&self, index: u64) -> Option<u64> {
        self.pages
            .get(&index)
            .copied()
            .filter(|&id| self.is_held(id))
    }

    fn is_held(&self, id: u64) -> bool {
        self.frames.front().is_some_and(|f| f.first_id <= id) && id < self.next_id
    }

    /// Applies `plan`: evicts, and returns the region (of `len` bytes) the
    /// frame's contents are written to.
    pub(crate) fn begin(&mut self, plan: Placement, len: usize) -> &mut [u8] {
        for _ in 0..plan.evict {
            if let Some(f) = self.frames.pop_front() {
                self.recycle(f.offsets);
            }
        }
        self.current = Some((plan, len));
        self.offsets.clear();
        if plan.retained {
            if self.arena.len() < plan.start + len {
                self.arena.resize(plan.start + len, 0);
            }
            &mut self.arena[plan.start..plan.start + len]
        } else {
            if self.scratch.len() < len {
                self.scratch.resize(len, 0);
            }
            &mut self.scratch[..len]
        }
    }

    /// The region of the frame being written.
    pub(crate) fn region(&self) -> &[u8] {
        match &self.current {
            Some((p, len)) if p.retained => &self.arena[p.start..p.start + len],
            Some((_, len)) => &self.scratch[..*len],
            None => &[],
        }
    }

    /// The region of the frame being written, mutably.
    pub(crate) fn region_mut(&mut self) -> &mut [u8] {
        match &self.current {
            Some((p, len)) if p.retained => &mut self.arena[p.start..p.start + len],
            Some((_, len)) => &mut self.scratch[..*len],
            None => &mut [],
        }
    }

    /// Records that the next content page of the current frame lies at
    /// `offset` in its region and is page `index`'s latest version.
    pub(crate) fn add_content(&mut self, index: u64, offset: usize) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        self.offsets.push(offset as u32);
        self.pages.insert(index, id);
        id
    }

    /// Copies one page of content into the current region at `dst`: from
    /// held content `src` (an id of an earlier frame), or from the current
    /// region at offset `src_off` when `src` is `None`.
    /// Returns false (copying nothing) when the source is not there.
    pub(crate) fn copy_into_region(
        &mut self,
        src: Option<u64>,
        src_off: usize,
        dst: usize,
    ) -> bool {
        let ps = self.page_size;
        let Some((plan, len)) = self.current else {
            return false;
        };
        if dst.checked_add(ps).is_none_or(|end| end > len) {
            return false;
        }
        let (buf, base) = if plan.retained {
            (&mut self.arena, plan.start)
        } else {
            (&mut self.scratch, 0)
        };
        let from = match src {
            None if src_off.checked_add(ps).is_some_and(|end| end <= len) => base + src_off,
            None => return false,
            // Held content lives in the arena; a frame that is not retained
            // evicted every held frame first, so nothing is held then.
            Some(_) if !plan.retained => return false,
            Some(id) => {
                let Some(i) = self
                    .frames
                    .partition_point(|f| f.first_id <= id)
                    .checked_sub(1)
                else {
                    return false;
                };
                let f = &self.frames[i];
                let Some(off) = usize::try_from(id - f.first_id)
                    .ok()
                    .and_then(|k| f.offsets.get(k))
                else {
                    return false;
                };
                f.start + *off as usize
            }
        };
        buf.copy_within(from..from + ps, base + dst);
        true
    }

    fn recycle(&mut self, mut v: Vec<u32>) {
        if self.spare.len() < 4 {
            v.clear();
            self.spare.push(v);
        }
    }

    /// Offset in the current region of the frame's `k`-th content page.
    pub(crate) fn content_offset_in_frame(&self, k: u64) -> Option<usize> {
        self.offsets
            .get(usize::try_from(k).ok()?)
            .map(|&o| o as usize)
    }

    /// Forgets pages `first..first + count` (they became zero).
    pub(crate) fn forget_pages(&mut self, first: u64, count: u64) {
        if count > self.pages.len() as u64 {
            let end = first.saturating_add(count);
            self.pages.retain(|&k, _| !(first..end).contains(&k));
        } else {
            for k in 0..count {
                self.pages.remove(&first.wrapping_add(k));
            }
        }
    }

    /// Finishes the current frame: keeps it when it fits.
    pub(crate) fn finish(&mut self) {
        let Some((plan, len)) = self.current else {
            return;
        };
        let spare = self.spare.pop().unwrap_or_default();
        let offsets = std::mem::replace(&mut self.offsets, spare);
        if plan.retained && !offsets.is_empty() {
            let first_id = self.next_id - offsets.len() as u64;
            self.frames.push_back(Retained {
                start: plan.start,
                len,
                first_id,
                offsets,
            });
            self.head = plan.start + len;
        } else {
            if !plan.retained && len > 0 {
                // It did not fit: nothing before it survives either.
                while let Some(f) = self.frames.pop_front() {
                    self.recycle(f.offsets);
                }
                self.head = 0;
            }
            self.recycle(offsets);
        }
        let live = self.frames.iter().map(|f| f.offsets.len()).sum::<usize>();
        if self.pages.len() > 2 * live + 65536 {
            let oldest = self.frames.front().map_or(self.next_id, |f| f.first_id);
            self.pages.retain(|_, id| *id >= oldest);
        }
    }

    /// The lowest content id held now.
    pub(crate) fn oldest_held(&self) -> u64 {
        self.frames.front().map_or(self.next_id, |f| f.first_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(s: &mut Store, pages: &[u64]) -> Vec<u64> {
        let len = pages.len() * 4096;
        let plan = s.plan(len);
        let region = s.begin(plan, len);
        for (i, p) in pages.iter().enumerate() {
            region[i * 4096..(i + 1) * 4096].fill(*p as u8);
        }
        let ids = pages
            .iter()
            .enumerate()
            .map(|(i, &p)| s.add_content(p, i * 4096))
            .collect();
        s.finish();
        ids
    }

    #[test]
    fn fifo_eviction_within_capacity() {
        let mut s = Store::new(4096, 10 * 4096);
        let a = frame(&mut s, &[1, 2, 3, 4]);
        let b = frame(&mut s, &[5, 6, 7, 8]);
        assert_eq!(s.content(a[0]).unwrap()[0], 1);
        assert_eq!(s.page(8), Some(b[3]));
        // 8 + 4 > 10 pages: wraps, evicts the oldest frame only.
        let c = frame(&mut s, &[9, 10, 11, 12]);
        assert!(s.content(a[0]).is_none());
        assert_eq!(s.page(1), None);
        assert_eq!(s.content(b[0]).unwrap()[0], 5);
        assert_eq!(s.content(c[3]).unwrap()[0], 12);
        assert!(s.retained_bytes() <= s.capacity);
        // Next frame overlaps b at [4,8): b goes.
        frame(&mut s, &[13, 14, 15, 16]);
        assert!(s.content(b[0]).is_none());
        assert_eq!(s.content(c[0]).unwrap()[0], 9);
    }

    #[test]
    fn oversized_frame_clears_everything() {
        let mut s = Store::new(4096, 4 * 4096);
        let a = frame(&mut s, &[1]);
        let big = frame(&mut s, &[2, 3, 4, 5, 6]);
        assert!(s.content(a[0]).is_none());
        assert!(s.content(big[0]).is_none());
        assert_eq!(s.page(2), None);
    }

    #[test]
    fn zero_capacity_holds_nothing() {
        let mut s = Store::new(4096, 0);
        let a = frame(&mut s, &[1, 2]);
        assert!(s.content(a[0]).is_none());
        assert_eq!(s.page(1), None);
    }
}
