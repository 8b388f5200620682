//! LZ4 block decompression, with wide copies and one `unsafe` fast loop.
//!
//! Compression uses `lz4_flex` (block format, no size prefix). Its safe
//! decoder copies byte runs through a bounds-checked sink and measured here
//! at about half the speed of the C library; with the frame checksum on top
//! that missed our decode floor. This decoder decodes the same format into
//! a caller buffer of exactly the declared size, copying literals and
//! matches 16 or 32 bytes at a time where the buffers have room (the bytes
//! written past a run's end are overwritten by the runs after it, and never
//! past the buffer), and falls back to exact copies near the ends and for
//! overlapping matches. Malformed input returns an error and never panics.
//!
//! Where `unsafe` is, and why: the fast loop of [`decompress_into`], far
//! from both ends of the buffers (`ip + 32 <= input.len()`,
//! `op + 64 <= out.len()` at each sequence), reads and writes through raw
//! pointers with fixed-size copies, as the C decoder's fast path does. Each
//! pointer range there is in bounds by a check made before it in the same
//! sequence (stated at each `unsafe` block); anything the fast loop does not
//! handle (offsets below 16, lengths whose wide copy would not fit the
//! margins, the last sequence, truncated or bad lengths) goes back, from
//! the start of that sequence, to the safe, bounds-checked loop, which also
//! decodes the ends of the buffers (the one error the fast loop returns
//! itself, a bad offset, is the one the safe loop would return there).
//! JUSTIFICATION: the safe fast loop it
//! replaces spent its time in bounds checks and left for the slow path on
//! ~22% of sequences (long literals and matches); decoding 1 MiB blocks of
//! the standard corpus (compressed by the C library) in-process, it took
//! 0.40 ns per input byte, this loop 0.33, the C `LZ4_decompress_safe`
//! 0.28 (medians of interleaved runs on a shared two-core machine; an
//! earlier, noisier set gave 0.54, 0.38 and 0.37).

/// Why a block did not decode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lz4Error {
    /// The input ended inside a sequence.
    Truncated,
    /// A match offset is 0 or points before the start of the output.
    BadOffset,
    /// The block would produce more bytes than the output holds.
    OutputOverrun,
    /// The block produced fewer bytes than the output holds.
    OutputShort,
}

impl std::fmt::Display for Lz4Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Lz4Error::Truncated => "input ends inside a sequence",
            Lz4Error::BadOffset => "match offset out of range",
            Lz4Error::OutputOverrun => "block decodes past the declared size",
            Lz4Error::OutputShort => "block decodes short of the declared size",
        })
    }
}

const WIDE: usize = 16;
const WILD: usize = 32;
/// The fast loop runs while `ip + IN_MARGIN <= input.len()`...
const IN_MARGIN: usize = 32;
/// ... and `op + OUT_MARGIN <= out.len()`.
const OUT_MARGIN: usize = 64;

/// Copies 16 bytes from `src` to `dst`.
///
/// # Safety
///
/// `src` must be valid for reading 16 bytes, `dst` for writing 16 bytes,
/// and the two ranges must not overlap.
#[inline(always)]
unsafe fn copy16(src: *const u8, dst: *mut u8) {
    // SAFETY: the caller's contract.
    unsafe { std::ptr::copy_nonoverlapping(src, dst, 16) }
}

/// Copies 32 bytes from `src` to `dst`.
///
/// # Safety
///
/// `src` must be valid for reading 32 bytes, `dst` for writing 32 bytes,
/// and the two ranges must not overlap.
#[inline(always)]
unsafe fn copy32(src: *const u8, dst: *mut u8) {
    // SAFETY: the caller's contract.
    unsafe { std::ptr::copy_nonoverlapping(src, dst, 32) }
}

#[inline(always)]
fn read_len(input: &[u8], ip: &mut usize, mut len: usize) -> Result<usize, Lz4Error> {
    loop {
        let b = *input.get(*ip).ok_or(Lz4Error::Truncated)?;
        *ip += 1;
        len = len.checked_add(b as usize).ok_or(Lz4Error::OutputOverrun)?;
        if b != 255 {
            return Ok(len);
        }
    }
}

/// Copies a match of `mlen` bytes from `src` to `op = src + offset` where
/// the two may overlap (the pattern of `offset` bytes repeats). The caller
/// has checked `op + mlen <= out.len()`.
#[inline(always)]
fn copy_overlapping(out: &mut [u8], src: usize, op: usize, mlen: usize, offset: usize) {
    if offset == 1 {
        let b = out[src];
        out[op..op + mlen].fill(b);
    } else if offset >= mlen {
        out.copy_within(src..src + mlen, op);
    } else {
        // Copy the pattern in growing pieces, each from bytes already final.
        let mut done = 0;
        while done < mlen {
            let n = (offset + done).min(mlen - done);
            out.copy_within(src..src + n, op + done);
            done += n;
        }
    }
}

/// Decodes one LZ4 block from `input` into all of `out`: the block must
/// produce exactly `out.len()` bytes.
pub fn decompress_into(input: &[u8], out: &mut [u8]) -> Result<(), Lz4Error> {
    let (mut ip, mut op) = (0usize, 0usize);
    let olen = out.len();
    if input.is_empty() {
        // Even an empty block has its one token.
        return Err(Lz4Error::Truncated);
    }
    let ilen = input.len();
    loop {
        // Fast loop (see the module docs): it decodes whole sequences far
        // from both ends, or leaves with `ip`/`op` at the start of the
        // sequence it does not take, which the safe code below decodes.
        let ibase = input.as_ptr();
        // Taken anew after the safe code below used `out`; between here and
        // the end of the fast loop, `out` is reached only through `obase`.
        let obase = out.as_mut_ptr();
        while ip + IN_MARGIN <= ilen && op + OUT_MARGIN <= olen {
            let (seq_ip, seq_op) = (ip, op);
            // SAFETY: ip < ip + IN_MARGIN <= ilen (loop condition).
            let token = unsafe { *ibase.add(ip) };
            ip += 1;
            let mut lit = (token >> 4) as usize;
            if lit < 15 {
                // SAFETY: reads input[ip..ip + 16] with ip = seq_ip + 1, and
                // seq_ip + 17 <= seq_ip + IN_MARGIN <= ilen (loop
                // condition); writes out[op..op + 16], op + 16 <= op +
                // OUT_MARGIN <= olen (loop condition). `input` and `out`
                // are a shared and a unique borrow, so they do not overlap.
                unsafe { copy16(ibase.add(ip), obase.add(op)) };
                // Now ip + lit + 2 <= seq_ip + 17 <= ilen and
                // op + lit + 32 <= seq_op + 46 <= olen.
            } else {
                lit = match read_len(input, &mut ip, lit) {
                    Ok(n) => n,
                    Err(_) => {
                        (ip, op) = (seq_ip, seq_op);
                        break;
                    }
                };
                // read_len reads only in bounds, so ip <= ilen; op + 64 <=
                // olen still holds. Written so that nothing can overflow:
                if ilen - ip < lit
                    || ilen - ip - lit < WILD
                    || olen - op < lit
                    || olen - op - lit < WILD
                {
                    (ip, op) = (seq_ip, seq_op);
                    break;
                }
                // Now ip + lit + 32 <= ilen and op + lit + 32 <= olen.
                let mut k = 0;
                while k < lit {
                    // SAFETY: k < lit and k is a multiple of 32, so
                    // k + 32 <= lit + 31: reads input[ip + k..ip + k + 32]
                    // within ip + lit + 32 <= ilen and writes
                    // out[op + k..op + k + 32] within op + lit + 32 <= olen
                    // (both checked just above). The borrows do not overlap.
                    unsafe { copy32(ibase.add(ip + k), obase.add(op + k)) };
                    k += WILD;
                }
            }
            ip += lit;
            op += lit;
            // Both branches left ip + 2 <= ilen and op + 32 <= olen.
            // SAFETY: reads input[ip..ip + 2], ip + 2 <= ilen (above).
            let offset = u16::from_le_bytes(unsafe { ibase.add(ip).cast::<[u8; 2]>().read() });
            ip += 2;
            if offset == 0 || offset as usize > op {
                // The safe code would decode this sequence to the same error.
                return Err(Lz4Error::BadOffset);
            }
            let offset = offset as usize;
            if offset < WIDE {
                // Overlapping: the safe code copies it exactly.
                (ip, op) = (seq_ip, seq_op);
                break;
            }
            // 16 <= offset <= op, checked above.
            let src = op - offset;
            let ml = (token & 15) as usize;
            if ml < 15 {
                // SAFETY: reads out[src..src + 32]: src + 32 = op + 32 -
                // offset <= op + 16, and writes out[op..op + 32],
                // op + 32 <= olen (above). Each copy reads 16 bytes that
                // end at or before the 16 it writes start (offset >= 16),
                // so neither overlaps; the second reads bytes the first
                // may have written, in order, as the format wants.
                unsafe {
                    copy16(obase.add(src), obase.add(op));
                    copy16(obase.add(src + WIDE), obase.add(op + WIDE));
                }
                op += ml + 4;
            } else {
                let mlen = match read_len(input, &mut ip, ml + 4) {
                    Ok(n) => n,
                    Err(_) => {
                        (ip, op) = (seq_ip, seq_op);
                        break;
                    }
                };
                if olen - op < mlen || olen - op - mlen < WIDE {
                    (ip, op) = (seq_ip, seq_op);
                    break;
                }
                // Now op + mlen + 16 <= olen.
                let mut k = 0;
                while k < mlen {
                    // SAFETY: k < mlen and k is a multiple of 16, so
                    // k + 16 <= mlen + 15: writes out[op + k..op + k + 16]
                    // within op + mlen + 16 <= olen (checked just above);
                    // reads out[src + k..src + k + 16], which ends at
                    // op + k + 16 - offset <= op + k (offset >= 16), so in
                    // bounds, not overlapping the write, and already final.
                    unsafe { copy16(obase.add(src + k), obase.add(op + k)) };
                    k += WIDE;
                }
                op += mlen;
            }
        }
        let token = *input.get(ip).ok_or(Lz4Error::Truncated)?;
        ip += 1;
        // Literals.
        let mut lit = (token >> 4) as usize;
        if lit == 15 {
            lit = read_len(input, &mut ip, lit)?;
        }
        if lit <= WIDE && ip + WIDE <= input.len() && op + WIDE <= olen {
            out[op..op + WIDE].copy_from_slice(&input[ip..ip + WIDE]);
        } else {
            let src = input.get(ip..ip + lit).ok_or(Lz4Error::Truncated)?;
            out.get_mut(op..op + lit)
                .ok_or(Lz4Error::OutputOverrun)?
                .copy_from_slice(src);
        }
        ip += lit;
        op += lit;
        if ip == input.len() {
            // The last sequence has literals only.
            break;
        }
        if op > olen {
            return Err(Lz4Error::OutputOverrun);
        }
        // Match.
        let off = input.get(ip..ip + 2).ok_or(Lz4Error::Truncated)?;
        let offset = u16::from_le_bytes([off[0], off[1]]) as usize;
        ip += 2;
        if offset == 0 || offset > op {
            return Err(Lz4Error::BadOffset);
        }
        let mut mlen = (token & 15) as usize + 4;
        if mlen == 19 {
            mlen = read_len(input, &mut ip, mlen)?;
        }
        let end = op.checked_add(mlen).ok_or(Lz4Error::OutputOverrun)?;
        if end > olen {
            return Err(Lz4Error::OutputOverrun);
        }
        let src = op - offset;
        if offset >= WIDE && end + WIDE <= olen {
            // Each 16-byte piece reads bytes already written, before it.
            let mut k = 0;
            while k < mlen {
                out.copy_within(src + k..src + k + WIDE, op + k);
                k += WIDE;
            }
        } else {
            copy_overlapping(out, src, op, mlen, offset);
        }
        op = end;
    }
    if op < olen {
        return Err(Lz4Error::OutputShort);
    }
    if op > olen {
        return Err(Lz4Error::OutputOverrun);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn check(data: &[u8]) {
        let c = lz4_flex::block::compress(data);
        let mut out = vec![0u8; data.len()];
        decompress_into(&c, &mut out).unwrap();
        assert_eq!(out, data);
        if !data.is_empty() {
            let mut short = vec![0u8; data.len() - 1];
            assert!(decompress_into(&c, &mut short).is_err());
        }
        let mut long = vec![0u8; data.len() + 1];
        assert!(decompress_into(&c, &mut long).is_err());
    }

    /// The format as a byte-at-a-time decoder, with the errors of
    /// [`decompress_into`] in the order it finds them.
    fn reference(input: &[u8], n: usize) -> Result<Vec<u8>, Lz4Error> {
        fn len(input: &[u8], ip: &mut usize, mut len: usize) -> Result<usize, Lz4Error> {
            loop {
                let b = *input.get(*ip).ok_or(Lz4Error::Truncated)?;
                *ip += 1;
                len = len.checked_add(b as usize).ok_or(Lz4Error::OutputOverrun)?;
                if b != 255 {
                    return Ok(len);
                }
            }
        }
        let mut out = Vec::new();
        let mut ip = 0;
        loop {
            let token = *input.get(ip).ok_or(Lz4Error::Truncated)?;
            ip += 1;
            let mut lit = (token >> 4) as usize;
            if lit == 15 {
                lit = len(input, &mut ip, lit)?;
            }
            if input.len() - ip < lit {
                return Err(Lz4Error::Truncated);
            }
            if n - out.len() < lit {
                return Err(Lz4Error::OutputOverrun);
            }
            out.extend_from_slice(&input[ip..ip + lit]);
            ip += lit;
            if ip == input.len() {
                break;
            }
            if input.len() - ip < 2 {
                return Err(Lz4Error::Truncated);
            }
            let offset = u16::from_le_bytes([input[ip], input[ip + 1]]) as usize;
            ip += 2;
            if offset == 0 || offset > out.len() {
                return Err(Lz4Error::BadOffset);
            }
            let mut mlen = (token & 15) as usize + 4;
            if mlen == 19 {
                mlen = len(input, &mut ip, mlen)?;
            }
            if n - out.len() < mlen {
                return Err(Lz4Error::OutputOverrun);
            }
            for _ in 0..mlen {
                out.push(out[out.len() - offset]);
            }
        }
        if out.len() < n {
            return Err(Lz4Error::OutputShort);
        }
        Ok(out)
    }

    /// Ours against [`reference`] on `input` into `n` bytes (starting from
    /// garbage in `out`): the same result, and on success the same bytes.
    fn agree(input: &[u8], n: usize) {
        let want = reference(input, n);
        let mut out = vec![0xa5u8; n];
        let got = decompress_into(input, &mut out);
        match want {
            Ok(w) => {
                assert_eq!(got, Ok(()), "n = {n}");
                assert!(out == w, "bytes differ, n = {n}");
            }
            Err(e) => assert_eq!(got, Err(e), "n = {n}"),
        }
    }

    /// One sequence: literals, then a match (`offset`, `mlen` >= 4).
    struct Seq<'a> {
        lits: &'a [u8],
        offset: u16,
        mlen: usize,
    }

    fn push_len(block: &mut Vec<u8>, mut rest: usize) {
        while rest >= 255 {
            block.push(255);
            rest -= 255;
        }
        block.push(rest as u8);
    }

    /// Encodes `seqs` and then `last` (the literals-only last sequence).
    fn encode(seqs: &[Seq<'_>], last: &[u8]) -> Vec<u8> {
        let mut block = Vec::new();
        for s in seqs {
            let ml = s.mlen - 4;
            block.push(((s.lits.len().min(15) as u8) << 4) | ml.min(15) as u8);
            if s.lits.len() >= 15 {
                push_len(&mut block, s.lits.len() - 15);
            }
            block.extend_from_slice(s.lits);
            block.extend_from_slice(&s.offset.to_le_bytes());
            if ml >= 15 {
                push_len(&mut block, ml - 15);
            }
        }
        block.push((last.len().min(15) as u8) << 4);
        if last.len() >= 15 {
            push_len(&mut block, last.len() - 15);
        }
        block.extend_from_slice(last);
        block
    }

    /// `n` incompressible bytes determined by `seed`.
    fn bytes(n: usize, seed: u64) -> Vec<u8> {
        let mut out = vec![0u8; n];
        crate::corpus::Rng::new(seed).fill_bytes(&mut out);
        out
    }

    /// Checks a valid block (decoding to `n` bytes): exact size, one byte
    /// less and one more, against the reference.
    fn check_block(block: &[u8], n: usize) {
        assert!(reference(block, n).is_ok());
        agree(block, n);
        agree(block, n + 1);
        if n > 0 {
            agree(block, n - 1);
        }
    }

    proptest! {
        #[test]
        fn matches_lz4_flex_on_random_structured_data(
            pieces in proptest::collection::vec((0u8..5, any::<u8>(), 1usize..300), 0..40),
        ) {
            let mut data = Vec::new();
            let mut x: u64 = 88172645463325252;
            for (kind, byte, len) in pieces {
                match kind {
                    0 => data.extend(std::iter::repeat_n(byte, len)),
                    1 => for _ in 0..len { x ^= x << 13; x ^= x >> 7; x ^= x << 17; data.push(x as u8) },
                    2 if !data.is_empty() => {
                        let start = (x as usize) % data.len();
                        let take = len.min(data.len() - start);
                        let copy = data[start..start + take].to_vec();
                        data.extend(copy);
                    }
                    3 => { let pat: Vec<u8> = (0..(byte % 15 + 2)).collect(); for i in 0..len { data.push(pat[i % pat.len()]) } }
                    _ => data.extend(b"the quick brown fox ".iter().cycle().take(len)),
                }
            }
            check(&data);
        }

        /// Long literal runs (incompressible pieces), long matches (long
        /// repeats) and repeating patterns of every period 1..=20, through
        /// lz4_flex's compressor; also into buffers of other sizes.
        #[test]
        fn matches_lz4_flex_with_long_runs(
            pieces in proptest::collection::vec((0u8..4, 1usize..=20, 1usize..2000, any::<u64>()), 1..12),
            delta in -70i64..70,
        ) {
            let mut data = Vec::new();
            for (kind, period, len, seed) in pieces {
                match kind {
                    0 => data.extend(bytes(len, seed)),
                    1 if !data.is_empty() => {
                        let start = seed as usize % data.len();
                        let take = len.min(data.len() - start);
                        let copy = data[start..start + take].to_vec();
                        data.extend(copy);
                    }
                    2 => {
                        let pat = bytes(period, seed);
                        data.extend(pat.iter().cycle().take(len + period));
                    }
                    _ => {
                        // A short literal run, then a repeat of it.
                        let lit = bytes(period, seed);
                        data.extend_from_slice(&lit);
                        data.extend(bytes(len % 40, seed ^ 1));
                        data.extend_from_slice(&lit);
                    }
                }
            }
            check(&data);
            let c = lz4_flex::block::compress(&data);
            agree(&c, data.len().saturating_add_signed(delta as isize));
        }

        /// Hand-made blocks: any literal and match lengths, offsets
        /// anywhere (half of them below 21), checked against the reference
        /// at the exact size, one off both ways, and mutated.
        #[test]
        fn hand_made_blocks_match_reference(
            seqs in proptest::collection::vec(
                (
                    prop_oneof![0usize..20, 0usize..600],
                    any::<bool>(),
                    any::<u16>(),
                    prop_oneof![4usize..24, 4usize..700],
                ),
                0..24,
            ),
            last in 0usize..100,
            seed in any::<u64>(),
            flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..4),
            sizes in proptest::collection::vec(0usize..3000, 4),
        ) {
            let lits = bytes(700 * 25, seed);
            let mut spec = Vec::new();
            let (mut at, mut produced) = (0, 0);
            for (lit, small, sel, mlen) in seqs {
                let lit = if produced + lit == 0 { 1 } else { lit };
                produced += lit;
                let max = produced.min(if small { 20 } else { 65535 });
                let offset = 1 + sel as usize % max;
                spec.push((at, lit, offset as u16, mlen));
                at += lit;
                produced += mlen;
            }
            let seqs: Vec<Seq<'_>> = spec
                .iter()
                .map(|&(at, lit, offset, mlen)| Seq { lits: &lits[at..at + lit], offset, mlen })
                .collect();
            let block = encode(&seqs, &lits[at..at + last]);
            let n = produced + last;
            check_block(&block, n);
            let mut m = block.clone();
            for (pos, v) in flips {
                let i = pos % m.len();
                m[i] ^= v | 1;
            }
            agree(&m, n);
            for k in sizes {
                agree(&block, k);
                agree(&m, k);
            }
        }

        #[test]
        fn garbage_never_panics(input in proptest::collection::vec(any::<u8>(), 0..200), n in 0usize..2000) {
            let mut out = vec![0u8; n];
            let _ = decompress_into(&input, &mut out);
        }

        /// Garbage decodes as the reference decodes it (almost always an
        /// error, and the same one), into buffers of many sizes.
        #[test]
        fn garbage_matches_reference(
            input in proptest::collection::vec(any::<u8>(), 0..400),
            sizes in proptest::collection::vec(0usize..5000, 1..6),
        ) {
            for n in sizes {
                agree(&input, n);
            }
        }
    }

    /// A short and a long sequence with every overlapping offset 1..=20
    /// (and a few more), each twice, then trailing literals of every count
    /// up to 70, so that the sequences sit at every distance from the
    /// fast loop's margins at both ends.
    #[test]
    fn every_offset_length_and_margin() {
        let lits = bytes(4096, 7);
        let (offsets, mlens, litlens, tails): (Vec<u16>, Vec<usize>, Vec<usize>, Vec<usize>) =
            if cfg!(miri) {
                (
                    vec![1, 3, 15, 16, 17],
                    vec![4, 18, 19, 36],
                    vec![0, 14, 15, 33],
                    (28..40).collect(),
                )
            } else {
                (
                    (1..=20).chain([31, 32, 33, 64]).collect(),
                    (4..=40).chain([49, 50, 51, 100, 273, 274, 600]).collect(),
                    vec![0, 1, 9, 14, 15, 16, 17, 31, 32, 33, 100, 300],
                    (0..=70).collect(),
                )
            };
        for &offset in &offsets {
            for &mlen in &mlens {
                for &lit in &litlens {
                    let seqs = [
                        Seq {
                            lits: &lits[..64],
                            offset: 7,
                            mlen: 5,
                        },
                        Seq {
                            lits: &lits[100..100 + lit],
                            offset,
                            mlen,
                        },
                        Seq {
                            lits: &lits[1000..1000 + lit],
                            offset,
                            mlen,
                        },
                        Seq {
                            lits: &lits[2000..2003],
                            offset: 29,
                            mlen: 4,
                        },
                    ];
                    for &tail in &tails {
                        let block = encode(&seqs, &lits[3000..3000 + tail]);
                        let n = 64 + 5 + 2 * (lit + mlen) + 3 + 4 + tail;
                        check_block(&block, n);
                    }
                }
            }
        }
    }

    #[test]
    fn edge_cases() {
        check(&[]);
        assert_eq!(decompress_into(&[], &mut []), Err(Lz4Error::Truncated));
        check(&[1]);
        check(&[0; 100_000]);
        check(&b"ab".repeat(40_000));
        check(&(0..=255u8).cycle().take(70_000).collect::<Vec<_>>());
        let mut out = [0u8; 4];
        // A match with offset 0, one before the start, and truncated input.
        assert_eq!(
            decompress_into(&[0x10, b'a', 0, 0], &mut out),
            Err(Lz4Error::BadOffset)
        );
        assert_eq!(
            decompress_into(&[0x10, b'a', 2, 0], &mut out),
            Err(Lz4Error::BadOffset)
        );
        assert_eq!(
            decompress_into(&[0x10, b'a', 1], &mut out),
            Err(Lz4Error::Truncated)
        );
        assert_eq!(decompress_into(&[0xf0], &mut out), Err(Lz4Error::Truncated));
    }

    /// The fast loop's own exits, far from the ends: a bad offset, a
    /// length that runs off the input, a match longer than the output.
    #[test]
    fn fast_loop_errors() {
        let lits = bytes(200, 3);
        let n = 500;
        // Offset past the start, and offset 0, in the fast loop.
        let mut b = encode(
            &[Seq {
                lits: &lits[..10],
                offset: 11,
                mlen: 4,
            }],
            &lits[..100],
        );
        agree(&b, n);
        b[11] = 0;
        agree(&b, n);
        // A long literal length whose bytes run to the end of the input.
        let mut b = vec![0xf0];
        b.extend(std::iter::repeat_n(255, 100));
        agree(&b, n);
        agree(&b, 1 << 20);
        // A long match that overruns the output, then one that fits.
        let b = encode(
            &[Seq {
                lits: &lits[..40],
                offset: 20,
                mlen: 1000,
            }],
            &lits[..40],
        );
        agree(&b, 100);
        agree(&b, 1080);
        agree(&b, 1079);
    }
}
