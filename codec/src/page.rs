//! Page-level primitives: page sizes, the zero-page scan, the cheap
//! fingerprint that finds duplicate candidates, and the BLAKE3 content hash.

use crate::CodecError;

/// The default page size: 4 KiB.
pub const PAGE_SIZE: usize = 4096;

/// Smallest page size a frame may declare (4 KiB, shift 12).
pub const MIN_PAGE_SHIFT: u8 = 12;
/// Largest page size a frame may declare (2 MiB, shift 21).
pub const MAX_PAGE_SHIFT: u8 = 21;

/// A page size: a power of two from 4 KiB to 2 MiB.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PageSize(u8);

impl PageSize {
    /// 4 KiB pages.
    pub const DEFAULT: PageSize = PageSize(12);

    /// The page size of `bytes`, which must be a power of two from 4 KiB to
    /// 2 MiB.
    pub fn new(bytes: usize) -> Result<PageSize, CodecError> {
        if !bytes.is_power_of_two() {
            return Err(CodecError::InvalidConfig(format!(
                "page size {bytes} is not a power of two"
            )));
        }
        Self::from_shift(bytes.trailing_zeros() as u8).ok_or_else(|| {
            CodecError::InvalidConfig(format!("page size {bytes} is outside 4 KiB..=2 MiB"))
        })
    }

    /// The page size `1 << shift`, if `shift` is in range.
    pub fn from_shift(shift: u8) -> Option<PageSize> {
        (MIN_PAGE_SHIFT..=MAX_PAGE_SHIFT)
            .contains(&shift)
            .then_some(PageSize(shift))
    }

    /// log2 of the size.
    pub fn shift(self) -> u8 {
        self.0
    }

    /// The size in bytes.
    pub fn bytes(self) -> usize {
        1 << self.0
    }
}

impl Default for PageSize {
    fn default() -> Self {
        PageSize::DEFAULT
    }
}

/// True when every byte of `page` is zero.
///
/// Reads 256-byte blocks as eight-byte words and ORs them, so that the loop
/// vectorises and a non-zero page is usually rejected in its first block;
/// a zero page costs one pass over its bytes, bound by memory bandwidth.
#[inline]
pub fn is_zero(page: &[u8]) -> bool {
    let mut blocks = page.chunks_exact(256);
    for block in &mut blocks {
        let mut acc = 0u64;
        for w in block.chunks_exact(8) {
            acc |= u64::from_ne_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]]);
        }
        if acc != 0 {
            return false;
        }
    }
    blocks.remainder().iter().all(|&b| b == 0)
}

/// Number of zero pages among the `page_size`-byte pages of `mem` (a
/// trailing partial page is not counted). The zero scan, as one call.
#[inline(never)]
pub fn count_zero_pages(mem: &[u8], page_size: usize) -> usize {
    if page_size == 0 {
        return 0;
    }
    // Measured: a software prefetch of the next page made this slower, not
    // faster; the plain scan runs at the speed of a flat memory read.
    mem.chunks_exact(page_size).filter(|p| is_zero(p)).count()
}

/// A 64-bit fingerprint of a page from 16 eight-byte words sampled across
/// it. It only nominates duplicate candidates: equal fingerprints are
/// confirmed by comparing bytes (session content) or BLAKE3 hashes
/// (baselines), never trusted alone. Costs about as much as one cache line
/// per sampled word, independent of the page size.
///
/// The sampled word `i` is at byte offset `i * (len / 16) + 8 * (i % (len / 128))`
/// for `len = page.len()` (a multiple of 128). The words are mixed with a
/// multiply-rotate hash (documented in docs/wire-format.md, because a
/// receiver's baseline advertisement carries these fingerprints).
#[inline]
pub fn fingerprint(page: &[u8]) -> u64 {
    const K: u64 = 0x9E37_79B9_7F4A_7C15;
    let len = page.len();
    debug_assert!(len >= 128 && len.is_multiple_of(128));
    let stride = len / 16;
    let words_per_stride = len / 128;
    let mut h: u64 = len as u64;
    for i in 0..16 {
        let off = i * stride + 8 * (i % words_per_stride);
        let w = page.get(off..off + 8).map_or(0, |b| {
            u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])
        });
        h = (h ^ w).wrapping_mul(K).rotate_left(29);
    }
    h ^ (h >> 32)
}

/// A cheap content signature used to group similar pages inside a frame, so
/// that the block compressor finds more matches within its window: the
/// share of printable ASCII bytes and the number of distinct byte values in a
/// 64-byte sample. Larger means "more text-like"; the value carries no
/// meaning on the wire. It reads two bytes from each of 32 lines spread over
/// the page (measured: sampling every line instead bought no ratio and cost
/// time).
#[inline]
pub fn signature(page: &[u8]) -> u32 {
    const SAMPLES: usize = 32;
    let len = page.len();
    let stride = len / SAMPLES;
    if stride == 0 {
        return 0;
    }
    let mut seen = [0u64; 4];
    let mut ascii = 0u32;
    for i in 0..SAMPLES {
        // Two bytes from every sampled line, at offsets that vary by line.
        let at = i * stride + (i * 5) % (stride - 1).max(1);
        for &b in &page[at..(at + 2).min(len)] {
            seen[(b >> 6) as usize] |= 1 << (b & 63);
            ascii += u32::from((0x20..0x7f).contains(&b));
        }
    }
    let distinct: u32 = seen.iter().map(|w| w.count_ones()).sum();
    ((ascii / 8) << 8) | (distinct / 8)
}

/// A BLAKE3 content hash truncated to 128 bits: the name of a page's content
/// in a receiver's baseline.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ContentHash(pub [u8; 16]);

impl ContentHash {
    /// Hashes `data`.
    pub fn of(data: &[u8]) -> ContentHash {
        let full = blake3::hash(data);
        let mut out = [0u8; 16];
        out.copy_from_slice(&full.as_bytes()[..16]);
        ContentHash(out)
    }

    /// Lower-case hex.
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }
}

impl std::fmt::Debug for ContentHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ContentHash({})", self.to_hex())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn zero_scan_matches_naive(pos in 0usize..4096, val in 1u8..=255, len_pages in 1usize..3) {
            let mut page = vec![0u8; 4096 * len_pages];
            prop_assert!(is_zero(&page));
            let p = pos % page.len();
            page[p] = val;
            prop_assert!(!is_zero(&page));
        }

        #[test]
        fn zero_scan_odd_lengths(len in 0usize..600, pos in 0usize..600) {
            let mut v = vec![0u8; len];
            prop_assert_eq!(is_zero(&v), true);
            if len > 0 {
                v[pos % len] = 1;
                prop_assert_eq!(is_zero(&v), false);
            }
        }
    }

    #[test]
    fn page_sizes() {
        assert_eq!(PageSize::new(4096).unwrap().shift(), 12);
        assert_eq!(PageSize::new(2 << 20).unwrap().bytes(), 2 << 20);
        assert!(PageSize::new(8192 + 1).is_err());
        assert!(PageSize::new(2048).is_err());
        assert!(PageSize::new(4 << 20).is_err());
    }

    #[test]
    fn fingerprint_sees_sampled_words_and_page_size() {
        let a = vec![7u8; 4096];
        let mut b = a.clone();
        assert_eq!(fingerprint(&a), fingerprint(&b));
        b[0] = 8;
        assert_ne!(fingerprint(&a), fingerprint(&b));
        let big = vec![7u8; 8192];
        assert_ne!(fingerprint(&a), fingerprint(&big));
    }
}
