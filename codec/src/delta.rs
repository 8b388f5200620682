//! XOR delta of a page against its previous version, zero-run-length
//! encoded (in the manner of QEMU's XBZRLE, byte-granular).
//!
//! A delta is a sequence of runs, each `zero_len` (varint), `data_len`
//! (varint, at least 1) and `data_len` bytes of `new XOR old`. Runs are in
//! address order and cover at most the page; the zero run after the last
//! data run is implied. Gaps of one or two unchanged bytes inside a changed
//! stretch are folded into the data run (cheaper than two run headers).

use crate::{DecodeError, varint};

/// Appends the delta of `new` against `old` to `out`, unless it would grow
/// past `cap` bytes; returns the delta's length, or `None` (with `out`
/// restored) when it is larger than `cap`. Both pages have the same length.
pub fn encode(old: &[u8], new: &[u8], out: &mut Vec<u8>, cap: usize) -> Option<usize> {
    debug_assert_eq!(old.len(), new.len());
    let n = new.len().min(old.len());
    let base = out.len();
    let mut covered = 0usize;
    let mut i = 0usize;
    while let Some(start) = next_diff(old, new, i) {
        let mut end = start + 1;
        loop {
            while end < n && old[end] != new[end] {
                end += 1;
            }
            if end + 1 < n && old[end + 1] != new[end + 1] {
                end += 2;
            } else if end + 2 < n && old[end + 2] != new[end + 2] {
                end += 3;
            } else {
                break;
            }
        }
        let run = end - start;
        if out.len() - base + varint::len((start - covered) as u64) + varint::len(run as u64) + run
            > cap
        {
            out.truncate(base);
            return None;
        }
        varint::put(out, (start - covered) as u64);
        varint::put(out, run as u64);
        out.extend(
            old[start..end]
                .iter()
                .zip(&new[start..end])
                .map(|(a, b)| a ^ b),
        );
        covered = end;
        i = end;
    }
    Some(out.len() - base)
}

/// The first byte at or after `from` where the pages differ.
#[inline]
fn next_diff(old: &[u8], new: &[u8], from: usize) -> Option<usize> {
    let n = new.len().min(old.len());
    let mut i = from;
    while i < n && !i.is_multiple_of(8) {
        if old[i] != new[i] {
            return Some(i);
        }
        i += 1;
    }
    if i >= n {
        return None;
    }
    let words = old[i..n].chunks_exact(8).zip(new[i..n].chunks_exact(8));
    for (k, (a, b)) in words.enumerate() {
        let a = u64::from_le_bytes([a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7]]);
        let b = u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]);
        if a != b {
            return Some(i + k * 8 + ((a ^ b).trailing_zeros() / 8) as usize);
        }
    }
    let tail = i + (n - i) / 8 * 8;
    (tail..n).find(|&j| old[j] != new[j])
}

/// Applies `delta` to `page` (holding the old version) in place.
/// `entry` names the table entry in errors.
pub fn apply(page: &mut [u8], delta: &[u8], entry: u64) -> Result<(), DecodeError> {
    let n = page.len() as u64;
    let mut pos = 0usize;
    let mut at = 0u64;
    let bad = |reason| DecodeError::BadDelta { entry, reason };
    while pos < delta.len() {
        let zeros = varint::get(delta, &mut pos, "delta run").map_err(|_| bad("bad run header"))?;
        let run = varint::get(delta, &mut pos, "delta run").map_err(|_| bad("bad run header"))?;
        if run == 0 {
            return Err(bad("empty data run"));
        }
        let start = at.checked_add(zeros).ok_or(bad("run past the page"))?;
        let end = start.checked_add(run).ok_or(bad("run past the page"))?;
        if end > n {
            return Err(bad("run past the page"));
        }
        let data_end = pos
            .checked_add(run as usize)
            .ok_or(bad("run past the body"))?;
        let Some(data) = delta.get(pos..data_end) else {
            return Err(bad("run past the body"));
        };
        for (p, d) in page[start as usize..end as usize].iter_mut().zip(data) {
            *p ^= d;
        }
        pos = data_end;
        at = end;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn round_trip(old: &[u8], new: &[u8]) -> usize {
        let mut d = Vec::new();
        let len = encode(old, new, &mut d, usize::MAX).unwrap();
        assert_eq!(len, d.len());
        let mut page = old.to_vec();
        apply(&mut page, &d, 0).unwrap();
        assert_eq!(page, new);
        len
    }

    proptest! {
        #[test]
        fn random_edits_round_trip(
            seed in proptest::collection::vec(any::<u8>(), 4096),
            edits in proptest::collection::vec((0usize..4096, any::<u8>()), 0..64),
        ) {
            let mut new = seed.clone();
            for (p, v) in edits { new[p] = v; }
            round_trip(&seed, &new);
        }

        #[test]
        fn unrelated_pages_round_trip(
            a in proptest::collection::vec(any::<u8>(), 0..300),
            b in proptest::collection::vec(any::<u8>(), 0..300),
        ) {
            let n = a.len().min(b.len());
            round_trip(&a[..n], &b[..n]);
        }

        #[test]
        fn garbage_never_panics(d in proptest::collection::vec(any::<u8>(), 0..64)) {
            let mut page = vec![0u8; 4096];
            let _ = apply(&mut page, &d, 0);
        }
    }

    #[test]
    fn identical_pages_give_empty_delta() {
        let p = vec![5u8; 4096];
        assert_eq!(round_trip(&p, &p), 0);
    }

    #[test]
    fn counter_edit_is_small() {
        let old = vec![0x11u8; 4096];
        let mut new = old.clone();
        let w = u64::from_le_bytes(new[800..808].try_into().unwrap()).wrapping_add(40_000);
        new[800..808].copy_from_slice(&w.to_le_bytes());
        // zero run 800 (2 bytes), data run length (1 byte), about 3 bytes.
        assert!(round_trip(&old, &new) <= 6);
    }

    #[test]
    fn cap_is_respected() {
        let old = vec![0u8; 4096];
        let new = vec![1u8; 4096];
        let mut d = vec![9];
        assert_eq!(encode(&old, &new, &mut d, 100), None);
        assert_eq!(d, vec![9]);
    }

    #[test]
    fn rejects_runs_past_the_page() {
        let mut page = vec![0u8; 16];
        let mut d = Vec::new();
        varint::put(&mut d, 10);
        varint::put(&mut d, 7);
        d.extend([1; 7]);
        assert!(matches!(
            apply(&mut page, &d, 3),
            Err(DecodeError::BadDelta { entry: 3, .. })
        ));
        let mut d = Vec::new();
        varint::put(&mut d, 0);
        varint::put(&mut d, 0);
        assert!(apply(&mut page, &d, 0).is_err());
        let mut d = Vec::new();
        varint::put(&mut d, 0);
        varint::put(&mut d, 4);
        d.extend([1; 2]);
        assert!(apply(&mut page, &d, 0).is_err());
    }
}
