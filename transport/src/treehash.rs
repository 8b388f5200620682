//! The BLAKE3 digest of a region assembled from its pieces as they are
//! placed, so that finishing a region costs a few merges instead of a second
//! pass over every byte.
//!
//! BLAKE3 is a binary tree over 1 KiB chunks: a subtree's chaining value
//! depends only on its bytes and where they start. When a chunk of a region
//! is written at an offset aligned to its power-of-two length (1 MiB chunks
//! at multiples of 1 MiB: what the sender cuts), or is the region's tail,
//! [`PieceDigest::record`] hashes it right away, on the core that placed it,
//! while it is hot in cache. [`PieceDigest::finish`] then walks the tree of
//! the whole region from the root, using a recorded value wherever one
//! matches a node exactly and reading back (through the sink's own reader)
//! whatever was not recorded. The result is, bit for bit, `blake3::hash` of
//! the region; tests compare the two over many shapes.
//!
//! Memory is bounded: pieces shorter than [`MIN_PIECE`] are not recorded,
//! and at most [`MAX_PIECES`] are kept per region (about 20 MiB at most; a
//! 256 GiB file in 1 MiB chunks fits). Anything not recorded is read back.

use std::collections::HashMap;
use std::sync::Mutex;

use blake3::hazmat::{
    ChainingValue, HasherExt, Mode, left_subtree_len, max_subtree_len, merge_subtrees_non_root,
    merge_subtrees_root,
};

use crate::session::lock;

/// Shortest piece worth recording.
pub const MIN_PIECE: u64 = 64 * 1024;
/// Most pieces recorded per region.
pub const MAX_PIECES: usize = 256 * 1024;
/// Largest range read back at once when a node was not recorded.
const READ_PIECE: u64 = 1 << 20;

/// Chaining values of a region's pieces, recorded as they are placed.
#[derive(Debug)]
pub struct PieceDigest {
    /// The region's length when known in advance; an ordered region's is
    /// known only at `finish`.
    len: Option<u64>,
    /// `(offset, length)` of a subtree to its chaining value.
    pieces: Mutex<HashMap<(u64, u64), ChainingValue>>,
}

impl PieceDigest {
    /// An empty record for a region of `len` bytes (`None`: not known
    /// until [`PieceDigest::finish`]; only aligned pieces are recorded).
    pub fn new(len: Option<u64>) -> Self {
        PieceDigest {
            len,
            pieces: Mutex::new(HashMap::new()),
        }
    }

    /// Records `data`, which was written at `offset`, when it can be a node
    /// of the region's tree: aligned to its own power-of-two length, or
    /// reaching the region's end from an offset that may start a subtree
    /// that long. Anything else (and the whole region as one piece, which is
    /// the root, not a chaining value) is left to [`PieceDigest::finish`].
    pub fn record(&self, offset: u64, data: &[u8]) {
        if !self.fits(offset, data.len() as u64) {
            return;
        }
        let cv = blake3::Hasher::new()
            .set_input_offset(offset)
            .update(data)
            .finalize_non_root();
        self.insert(offset, data.len() as u64, cv);
    }

    /// Records `cv`, already computed (by the codec, which checked the
    /// chunk against it), as the chaining value of the `n` bytes at
    /// `offset`, under the same rules as [`PieceDigest::record`].
    pub fn record_cv(&self, offset: u64, n: u64, cv: ChainingValue) {
        if self.fits(offset, n) {
            self.insert(offset, n, cv);
        }
    }

    /// Whether `n` bytes at `offset` can be a node of the region's tree
    /// worth recording.
    fn fits(&self, offset: u64, n: u64) -> bool {
        let len = self.len.unwrap_or(u64::MAX);
        if n < MIN_PIECE.min(len) || n == 0 || !offset.is_multiple_of(blake3::CHUNK_LEN as u64) {
            return false;
        }
        let Some(end) = offset.checked_add(n) else {
            return false;
        };
        if end > len || (offset == 0 && end == len) {
            return false;
        }
        let aligned = n.is_power_of_two() && offset.is_multiple_of(n);
        let tail = end == len && max_subtree_len(offset).is_none_or(|max| n <= max);
        (aligned || tail) && lock(&self.pieces).len() < MAX_PIECES
    }

    fn insert(&self, offset: u64, n: u64, cv: ChainingValue) {
        let mut pieces = lock(&self.pieces);
        if pieces.len() < MAX_PIECES {
            pieces.insert((offset, n), cv);
        }
    }

    /// The BLAKE3 hash of the whole region of `len` bytes: recorded pieces
    /// where they fit the tree, `read(offset, buf)` (filling `buf` from
    /// the region's bytes at `offset`) for the rest. A `len` other than the
    /// one given to [`PieceDigest::new`] is an error.
    pub fn finish(
        &self,
        len: u64,
        mut read: impl FnMut(u64, &mut [u8]) -> Result<(), String>,
    ) -> Result<blake3::Hash, String> {
        if self.len.is_some_and(|l| l != len) {
            return Err(format!(
                "region is {len} bytes long, {} were announced",
                self.len.unwrap_or(0)
            ));
        }
        let pieces = std::mem::take(&mut *lock(&self.pieces));
        if len <= blake3::CHUNK_LEN as u64 {
            let mut buf = vec![0u8; len as usize];
            read(0, &mut buf)?;
            return Ok(blake3::hash(&buf));
        }
        let mut buf = Vec::new();
        let left = left_subtree_len(len);
        let l = node(&pieces, 0, left, &mut read, &mut buf)?;
        let r = node(&pieces, left, len - left, &mut read, &mut buf)?;
        Ok(merge_subtrees_root(&l, &r, Mode::Hash))
    }
}

/// The chaining value of the subtree `[offset, offset + n)`.
fn node(
    pieces: &HashMap<(u64, u64), ChainingValue>,
    offset: u64,
    n: u64,
    read: &mut impl FnMut(u64, &mut [u8]) -> Result<(), String>,
    buf: &mut Vec<u8>,
) -> Result<ChainingValue, String> {
    if let Some(cv) = pieces.get(&(offset, n)) {
        return Ok(*cv);
    }
    if n <= READ_PIECE || n <= blake3::CHUNK_LEN as u64 {
        buf.resize(n as usize, 0);
        read(offset, buf)?;
        return Ok(blake3::Hasher::new()
            .set_input_offset(offset)
            .update(buf)
            .finalize_non_root());
    }
    let left = left_subtree_len(n);
    let l = node(pieces, offset, left, read, buf)?;
    let r = node(pieces, offset + left, n - left, read, buf)?;
    Ok(merge_subtrees_non_root(&l, &r, Mode::Hash))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn bytes(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 11) as u8)
            .collect()
    }

    /// Records `data` cut into `chunk`-byte pieces (in a scrambled order),
    /// then finishes with reads that count what they read.
    fn assembled(data: &[u8], chunk: usize, skip_every: usize) -> (blake3::Hash, u64) {
        assembled_as(data, chunk, skip_every, Some(data.len() as u64))
    }

    fn assembled_as(
        data: &[u8],
        chunk: usize,
        skip_every: usize,
        announced: Option<u64>,
    ) -> (blake3::Hash, u64) {
        let d = PieceDigest::new(announced);
        let count = data.len().div_ceil(chunk.max(1));
        for k in (0..count).rev().chain(0..count) {
            if skip_every > 0 && k % skip_every == 0 {
                continue;
            }
            let off = k * chunk;
            d.record(off as u64, &data[off..(off + chunk).min(data.len())]);
        }
        let mut read = 0u64;
        let h = d
            .finish(data.len() as u64, |off, buf| {
                read += buf.len() as u64;
                buf.copy_from_slice(&data[off as usize..off as usize + buf.len()]);
                Ok(())
            })
            .unwrap();
        (h, read)
    }

    #[test]
    fn aligned_chunks_need_no_read_back() {
        for len in [
            (1 << 20) + 1,
            2 << 20,
            (5 << 20) + 12345,
            (8 << 20) - 1024,
            3 << 20,
        ] {
            let data = bytes(len, 7);
            let (h, read) = assembled(&data, 1 << 20, 0);
            assert_eq!(h, blake3::hash(&data), "len {len}");
            // Only a tail shorter than MIN_PIECE is read back.
            assert!(read < MIN_PIECE, "len {len}: read back {read}");
        }
    }

    #[test]
    fn missing_and_unaligned_pieces_are_read_back() {
        let data = bytes((6 << 20) + 999, 3);
        let (h, read) = assembled(&data, 1 << 20, 3);
        assert_eq!(h, blake3::hash(&data));
        assert!(read > 0 && read < data.len() as u64, "{read}");
        // A chunk size that is not a power of two: nothing fits but the tail.
        let (h, _) = assembled(&data, 1_000_000, 0);
        assert_eq!(h, blake3::hash(&data));
    }

    #[test]
    fn small_regions_hash_as_the_root() {
        for len in [0, 1, 1023, 1024, 1025, 65536, 65537, (1 << 20) - 1] {
            let data = bytes(len, 1);
            let (h, _) = assembled(&data, 65536, 0);
            assert_eq!(h, blake3::hash(&data), "len {len}");
        }
    }

    #[test]
    fn an_unknown_length_records_aligned_pieces_and_checks_nothing_else() {
        let data = bytes((5 << 20) + 4321, 9);
        let (h, read) = assembled_as(&data, 1 << 20, 0, None);
        assert_eq!(h, blake3::hash(&data));
        // Only the tail (not recordable without the length) is read back.
        assert!(read <= 4321 + (1 << 20), "{read}");
        let d = PieceDigest::new(Some(10));
        assert!(d.finish(11, |_, _| Ok(())).is_err(), "length mismatch");
    }

    #[test]
    fn hostile_offsets_are_ignored() {
        let d = PieceDigest::new(Some(4 << 20));
        let piece = bytes(1 << 20, 0);
        d.record(u64::MAX - 10, &piece);
        d.record(3 << 20 | 512, &piece);
        d.record(4 << 20, &piece);
        d.record(1 << 19, &piece);
        assert!(lock(&d.pieces).is_empty());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        #[test]
        fn equals_blake3_for_any_cut(
            len in 0usize..(3 << 20),
            chunk_log in 10u32..21,
            skip in 0usize..4,
            seed in any::<u8>(),
        ) {
            let data = bytes(len, seed);
            let (h, _) = assembled(&data, 1 << chunk_log, skip);
            prop_assert_eq!(h, blake3::hash(&data));
            let (h, _) = assembled_as(&data, 1 << chunk_log, skip, None);
            prop_assert_eq!(h, blake3::hash(&data));
        }
    }
}
