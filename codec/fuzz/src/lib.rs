//! Fuzz logic for the HDE codec (`dwcp-codec`), as plain functions of
//! `&[u8]` that must never panic, whatever the input.
//!
//! The libFuzzer targets in `fuzz_targets/` (built only with the `libfuzzer`
//! feature, on nightly, by `codec/fuzz/run`) call these functions; so does
//! `tests/replay.rs`, on stable, with the committed seeds of `seeds/` and a
//! few thousand deterministic pseudo-random inputs. A panic is a finding:
//! either the codec panicked, or one of the properties asserted here failed.
//!
//! Frames carry a BLAKE3 checksum, which a fuzzer cannot forge. So the frame
//! targets read their first byte as a mode:
//!
//! - [`MODE_RAW`]: the rest is a stream of frames fed as is (split where a
//!   frame header says the frame ends): header parsing and the checksum;
//!   page frames go to a second decoder too, one that accepts frames
//!   flagged as carrying no checksum (`FLAG_UNCHECKED`), which the fuzzer
//!   can reach the table and payload with directly;
//! - [`MODE_SEALED`]: a configuration byte, then frame bodies (header,
//!   table, payload; each prefixed by its length as a u16 LE) that the
//!   harness seals: it fixes the magic, the table and payload lengths, the
//!   sequence number and the keyed flag (unless the configuration keeps them),
//!   and appends the right checksum, so mutations reach the table, the
//!   payload and the decoder's state;
//! - [`MODE_STRUCTURED`]: the rest drives an [`Encoder`] session (policy,
//!   state limit, page size, key, baseline and the pages, all chosen by the
//!   input, and for an unkeyed session whether page frames carry their
//!   checksum); its frames must decode to exactly the pages encoded, and one
//!   of them is mutated (optionally re-sealed): the decoder must reject it,
//!   or accept it only when its checksum is valid (any time, without one); a rejection that does not
//!   poison the decoder must leave it in step (the unmutated frame then
//!   decodes exactly).
//!
//! Everywhere, the decoder's poisoning contract is checked: after an error,
//! the decoder refuses further page frames exactly when
//! [`DecodeError::poisons_state`] says so.

#![forbid(unsafe_code)]

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::OnceLock;

use dwcp_codec::corpus::{self, PageClass, Rng};
use dwcp_codec::frame::{
    CHECKSUM_LEN, FLAG_KEYED, FLAG_UNCHECKED, FrameHeader, FrameKind, HEADER_LEN, MAGIC,
};
use dwcp_codec::{
    Baseline, BaselineAdvert, CodecConfig, ContentHash, DecodeError, DecodeLimits, DecodedPage,
    DecodedPages, Decoder, Encoder, PageRef, PageSize, Policy, SessionKey, delta, fingerprint,
    is_zero,
};

pub mod replay;
pub mod seeds;

/// Mode byte: the rest of the input is fed to the decoder as is.
pub const MODE_RAW: u8 = 0;
/// Mode byte: a configuration byte, then length-prefixed frame bodies that
/// the harness seals with a valid checksum.
pub const MODE_SEALED: u8 = 1;
/// Mode byte: the input drives an encoder; its frames are decoded, one of
/// them mutated.
pub const MODE_STRUCTURED: u8 = 2;

/// A fuzz function: takes any bytes, panics only on a finding.
pub type FuzzFn = fn(&[u8]);

/// Pages with their indices, in frame order.
pub type Pages = Vec<(u64, Vec<u8>)>;

/// Every fuzz function, by target name (the names of `fuzz_targets/*.rs`).
pub const TARGETS: [(&str, FuzzFn); 6] = [
    ("page_frames", page_frames),
    ("chunk_frames", chunk_frames),
    ("delta_apply", delta_apply),
    ("baseline_advert", baseline_advert),
    ("frame_header", frame_header),
    ("lz4_block", lz4_block),
];

/// Sealed mode, configuration bits: state limit (two bits), key, keep the
/// body's sequence number, keep its flags, decoder holds [`sealed_baseline`].
pub mod sealed_config {
    /// Mask of the state limit choice (index into [`super::SEALED_STATE_LIMITS`]).
    pub const STATE_MASK: u8 = 0b11;
    /// The session is keyed with [`super::fuzz_key`].
    pub const KEYED: u8 = 1 << 2;
    /// Keep the sequence number of the body instead of the expected one.
    pub const KEEP_SEQ: u8 = 1 << 3;
    /// Keep the flags of the body instead of setting the keyed flag right.
    pub const KEEP_FLAGS: u8 = 1 << 4;
    /// The decoder holds [`super::sealed_baseline`].
    pub const BASELINE: u8 = 1 << 5;
}

/// State limits of the sealed mode, by [`sealed_config::STATE_MASK`].
pub const SEALED_STATE_LIMITS: [usize; 4] = [0, 2 * 4096, 16 * 4096, 1 << 20];

/// Decode limits of the harness: small enough that a hostile frame cannot
/// make one execution slow, large enough for every frame it encodes.
pub const LIMITS: DecodeLimits = DecodeLimits {
    max_frame_len: 4 << 20,
    max_raw_len: 2 << 20,
    max_entries: 1 << 16,
    max_pages: 1 << 24,
};

/// The session key of keyed sessions.
pub fn fuzz_key() -> SessionKey {
    SessionKey(*b"dwcp codec fuzz session key 0001")
}

/// The baseline pages a sealed-mode decoder may hold (4 KiB pages).
pub fn sealed_baseline_pages() -> &'static [Vec<u8>] {
    static PAGES: OnceLock<Vec<Vec<u8>>> = OnceLock::new();
    PAGES.get_or_init(|| {
        let mut rng = Rng::new(0xba5e);
        [PageClass::Text, PageClass::Code, PageClass::Random]
            .iter()
            .map(|&c| {
                let mut p = vec![0u8; 4096];
                corpus::fill_page(c, &mut rng, &mut p);
                p
            })
            .collect()
    })
}

/// The baseline of [`sealed_baseline_pages`].
pub fn sealed_baseline() -> Baseline {
    let mut b = Baseline::new(PageSize::DEFAULT);
    for p in sealed_baseline_pages() {
        b.insert(p).expect("baseline page of the page size");
    }
    b
}

/// Fills `out` with a page of `class` made from `seed`, as
/// [`corpus::fill_page`] does; memoised, because generating text and code
/// pages costs more than the codec under test.
pub fn class_page(class: PageClass, seed: u8, out: &mut [u8]) {
    type Cache = HashMap<(u8, u8, usize), Vec<u8>>;
    thread_local! {
        static CACHE: RefCell<Cache> = RefCell::new(HashMap::new());
    }
    let key = (class as u8, seed, out.len());
    CACHE.with(|c| {
        let mut c = c.borrow_mut();
        let page = c.entry(key).or_insert_with(|| {
            let mut p = vec![0u8; out.len()];
            corpus::fill_page(class, &mut Rng::new(u64::from(seed)), &mut p);
            p
        });
        out.copy_from_slice(page);
    });
}

// ---------------------------------------------------------------------------
// Input reader
// ---------------------------------------------------------------------------

/// Reads a fuzz input front to back; past its end every read is zero.
#[derive(Debug, Clone)]
pub struct Input<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Input<'a> {
    /// A reader of `data`.
    pub fn new(data: &'a [u8]) -> Self {
        Input { data, pos: 0 }
    }

    /// The next byte, or 0.
    pub fn u8(&mut self) -> u8 {
        let b = self.data.get(self.pos).copied().unwrap_or(0);
        self.pos += 1;
        b
    }

    /// The next two bytes (LE), or 0.
    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }

    /// The next four bytes (LE), or 0.
    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }

    /// The next eight bytes (LE), or 0.
    pub fn u64(&mut self) -> u64 {
        u64::from(self.u32()) | (u64::from(self.u32()) << 32)
    }

    /// Up to `n` next bytes (fewer at the end).
    pub fn take(&mut self, n: usize) -> &'a [u8] {
        let start = self.pos.min(self.data.len());
        let end = start.saturating_add(n).min(self.data.len());
        self.pos = end;
        &self.data[start..end]
    }

    /// The bytes not read yet.
    pub fn rest(&mut self) -> &'a [u8] {
        self.take(usize::MAX)
    }

    /// Whether every byte has been read.
    pub fn is_empty(&self) -> bool {
        self.pos >= self.data.len()
    }
}

// ---------------------------------------------------------------------------
// Shared helpers
// ---------------------------------------------------------------------------

/// The checksum the codec appends to `body` (header, table, payload).
pub fn checksum(key: Option<&SessionKey>, body: &[u8]) -> [u8; CHECKSUM_LEN] {
    match key {
        Some(k) => *blake3::keyed_hash(&k.0, body).as_bytes(),
        None => *blake3::hash(body).as_bytes(),
    }
}

/// Makes a frame of `body`: a header (zero-padded to its length) whose magic,
/// table and payload lengths are fixed to fit the body, with `seq` and the
/// keyed flag set when given, and the checksum appended.
pub fn seal(
    body: &[u8],
    seq: Option<u64>,
    keyed_flag: Option<bool>,
    key: Option<&SessionKey>,
) -> Vec<u8> {
    let mut f = body.to_vec();
    if f.len() < HEADER_LEN {
        f.resize(HEADER_LEN, 0);
    }
    f[..4].copy_from_slice(&MAGIC);
    let rest = u32::try_from(f.len() - HEADER_LEN).unwrap_or(u32::MAX);
    let declared = u32::from_le_bytes([f[16], f[17], f[18], f[19]]);
    let table = declared.min(rest);
    f[16..20].copy_from_slice(&table.to_le_bytes());
    f[20..24].copy_from_slice(&(rest - table).to_le_bytes());
    if let Some(s) = seq {
        f[28..36].copy_from_slice(&s.to_le_bytes());
    }
    if let Some(k) = keyed_flag {
        let flags = u16::from_le_bytes([f[8], f[9]]);
        let flags = if k {
            flags | FLAG_KEYED
        } else {
            flags & !FLAG_KEYED
        };
        f[8..10].copy_from_slice(&flags.to_le_bytes());
    }
    let sum = frame_checksum(key, &f);
    f.extend_from_slice(&sum);
    f
}

/// The checksum a frame whose bytes before the checksum are `body` must
/// carry: over the whole body for page frames; for chunk frames (kind 2,
/// version 2) over the header and the BLAKE3 of the decoded payload, as
/// `docs/wire-format.md` ("Chunk frames") says, in its "whole" form (no
/// region offset), which is how `Decoder::decode_chunk` checks it. A chunk
/// payload that cannot be decoded gets the body checksum: it fails either
/// way.
pub fn frame_checksum(key: Option<&SessionKey>, body: &[u8]) -> [u8; CHECKSUM_LEN] {
    if body.len() >= HEADER_LEN
        && body[5] == 2
        && let Some(raw) = chunk_payload(body)
    {
        let mut h = match key {
            Some(k) => blake3::Hasher::new_keyed(&k.0),
            None => blake3::Hasher::new(),
        };
        h.update(&body[..HEADER_LEN]);
        h.update(&[0]);
        h.update(&0u64.to_le_bytes());
        h.update(blake3::hash(&raw).as_bytes());
        return *h.finalize().as_bytes();
    }
    checksum(key, body)
}

/// The decoded payload of a chunk frame's body (stored or LZ4 only; the
/// fuzz crate carries no ZStd), `None` when it does not decode.
fn chunk_payload(body: &[u8]) -> Option<Vec<u8>> {
    let table = u32::from_le_bytes(body[16..20].try_into().ok()?) as usize;
    let payload = body.get(HEADER_LEN.checked_add(table)?..)?;
    let raw_len = u32::from_le_bytes(body[24..28].try_into().ok()?) as usize;
    match body[6] {
        0 => Some(payload.to_vec()),
        1 if raw_len <= 1 << 24 => lz4_flex::block::decompress(payload, raw_len).ok(),
        _ => None,
    }
}

/// Replaces the trailing checksum of `frame` with the right one (when it is
/// long enough to have one).
pub fn reseal(frame: &mut [u8], key: Option<&SessionKey>) {
    if frame.len() >= HEADER_LEN + CHECKSUM_LEN {
        let split = frame.len() - CHECKSUM_LEN;
        let sum = frame_checksum(key, &frame[..split]);
        frame[split..].copy_from_slice(&sum);
    }
}

/// Mutates a copy of `frame` at input-chosen places (one to four edits:
/// flips, sets, truncation, insertion, removal), then re-seals it when the
/// input says so. Returns the mutant and whether it was re-sealed.
pub fn mutate(frame: &[u8], inp: &mut Input<'_>, key: Option<&SessionKey>) -> (Vec<u8>, bool) {
    let mut m = frame.to_vec();
    let edits = 1 + inp.u8() % 4;
    for _ in 0..edits {
        let op = inp.u8();
        let pos = inp.u32() as usize;
        let v = inp.u8();
        match op % 8 {
            0 | 1 if !m.is_empty() => {
                let i = pos % m.len();
                m[i] ^= v.max(1);
            }
            2 if !m.is_empty() => {
                let i = pos % m.len();
                m[i] = v;
            }
            3 => m.truncate(pos % (m.len() + 1)),
            4 => m.insert(pos % (m.len() + 1), v),
            5 if !m.is_empty() => {
                m.remove(pos % m.len());
            }
            6 if !m.is_empty() => {
                // The header's fields.
                let i = pos % m.len().min(HEADER_LEN);
                m[i] ^= v.max(1);
            }
            7 if m.len() > HEADER_LEN + CHECKSUM_LEN => {
                // The table and payload.
                let i = HEADER_LEN + pos % (m.len() - HEADER_LEN - CHECKSUM_LEN);
                m[i] ^= v.max(1);
            }
            _ => {}
        }
    }
    let resealed = inp.u8() & 1 == 1;
    if resealed {
        reseal(&mut m, key);
    }
    (m, resealed)
}

/// Splits a byte stream into frames the way a reader does: a frame ends
/// where its header says; what cannot be framed is the last piece.
pub fn split_frames(mut stream: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    while !stream.is_empty() {
        let len = FrameHeader::peek(stream)
            .ok()
            .and_then(|h| usize::try_from(h.frame_len()).ok())
            .filter(|&n| n <= stream.len())
            .unwrap_or(stream.len());
        let (frame, rest) = stream.split_at(len);
        out.push(frame);
        stream = rest;
    }
    out
}

/// Reads length-prefixed (u16 LE) bodies until the input ends.
fn bodies<'a>(inp: &mut Input<'a>) -> Vec<&'a [u8]> {
    let mut out = Vec::new();
    while !inp.is_empty() && out.len() < 64 {
        let n = usize::from(inp.u16());
        out.push(inp.take(n));
    }
    out
}

/// Whether `e` poisons a decoder.
fn poisons(e: &DecodeError) -> bool {
    e.poisons_state()
}

/// Checks the poisoning contract after `decode_pages` failed with `e`: the
/// decoder refuses the next page frame exactly when `e` poisons it.
fn check_poison_contract(dec: &mut Decoder, e: &DecodeError) {
    // An empty frame is refused as truncated, or as desynchronized when the
    // decoder is poisoned; neither changes anything.
    let poisoned = matches!(dec.decode_pages(&[]), Err(DecodeError::Desynchronized));
    assert_eq!(
        poisoned,
        poisons(e),
        "after the error `{e}` ({e:?}) the decoder is {}poisoned, but poisons_state() is {}",
        if poisoned { "" } else { "not " },
        e.poisons_state()
    );
}

/// Invariants of any accepted page frame: page lengths, the page count, and
/// `write_into` (all or nothing, last write wins).
fn check_decoded(pages: &DecodedPages<'_>, page_size: usize) {
    let ps = page_size as u64;
    let mut total = 0u64;
    let (mut lo, mut hi) = (u64::MAX, 0u128);
    for p in pages.iter() {
        let (first, count) = match p {
            DecodedPage::Zero { first, count } => {
                assert!(count >= 1, "empty zero run at page {first}");
                (first, count)
            }
            DecodedPage::Data { index, bytes } => {
                assert_eq!(bytes.len(), page_size, "page {index} has a wrong length");
                (index, 1)
            }
        };
        assert!(
            first.checked_add(count - 1).is_some(),
            "zero run {first}+{count} overflows"
        );
        total = total.saturating_add(count);
        lo = lo.min(first);
        hi = hi.max(u128::from(first) + u128::from(count));
    }
    assert_eq!(
        pages.stats.pages, total,
        "stats.pages disagrees with the pages"
    );
    if total == 0 {
        let mut image = [];
        assert!(pages.write_into(&mut image, 0).is_ok());
        return;
    }
    let span = hi - u128::from(lo);
    if span > 64 {
        // Too large an image to build; a one-page image is refused whole.
        let mut image = vec![0x5au8; page_size];
        assert!(pages.write_into(&mut image, lo).is_err());
        assert!(
            image.iter().all(|&b| b == 0x5a),
            "a refused write_into wrote"
        );
        return;
    }
    let span = span as usize;
    let mut want = vec![0x5au8; span * page_size];
    for p in pages.iter() {
        match p {
            DecodedPage::Zero { first, count } => {
                let at = ((first - lo) * ps) as usize;
                want[at..at + (count * ps) as usize].fill(0);
            }
            DecodedPage::Data { index, bytes } => {
                let at = ((index - lo) * ps) as usize;
                want[at..at + page_size].copy_from_slice(bytes);
            }
        }
    }
    let mut image = vec![0x5au8; span * page_size];
    pages
        .write_into(&mut image, lo)
        .expect("write_into an image that covers every page");
    assert!(image == want, "write_into wrote the wrong bytes");
    // One page short: refused, and nothing written.
    let mut short = vec![0x5au8; (span - 1) * page_size];
    assert!(pages.write_into(&mut short, lo).is_err());
    assert!(
        short.iter().all(|&b| b == 0x5a),
        "a refused write_into wrote"
    );
    if let Some(after) = lo.checked_add(1) {
        // An image that starts past the lowest page.
        let mut image = vec![0x5au8; span * page_size];
        assert!(pages.write_into(&mut image, after).is_err());
    }
}

/// Whether the decoded pages are exactly `want`: as many pages, and the same
/// content for each index once applied in order (the last version of an
/// index wins; the encoder may reorder a batch whose indices are distinct).
fn same_pages(got: &DecodedPages<'_>, want: &[(u64, Vec<u8>)]) -> bool {
    let mut wanted: BTreeMap<u64, Option<&[u8]>> = BTreeMap::new();
    for (i, d) in want {
        wanted.insert(*i, (!is_zero(d)).then_some(d.as_slice()));
    }
    let mut have: BTreeMap<u64, Option<&[u8]>> = BTreeMap::new();
    let mut n = 0u64;
    for p in got.iter() {
        match p {
            DecodedPage::Zero { first, count } => {
                n = n.saturating_add(count);
                if n > want.len() as u64 {
                    return false;
                }
                for k in 0..count {
                    let Some(i) = first.checked_add(k) else {
                        return false;
                    };
                    have.insert(i, None);
                }
            }
            DecodedPage::Data { index, bytes } => {
                // The encoder sends zero pages as zero entries, always.
                if is_zero(bytes) {
                    return false;
                }
                n += 1;
                have.insert(index, Some(bytes));
            }
        }
    }
    n == want.len() as u64 && have == wanted
}

/// A policy chosen by one byte (ZStd levels kept low for speed).
fn policy(b: u8) -> Policy {
    match b % 8 {
        0 => Policy::Stored,
        1..=3 => Policy::Datacenter,
        4 => Policy::Internet { level: 1 },
        5 => Policy::internet(),
        6 => Policy::Auto {
            link_bytes_per_sec: 1e6,
        },
        _ => Policy::Auto {
            link_bytes_per_sec: 1e11,
        },
    }
}

// ---------------------------------------------------------------------------
// page_frames
// ---------------------------------------------------------------------------

/// Page frames through [`Decoder::decode_pages`]: raw bytes, sealed bodies,
/// or an encoder session with one mutated frame (see the crate docs).
pub fn page_frames(data: &[u8]) {
    let mut inp = Input::new(data);
    match inp.u8() % 3 {
        MODE_RAW => page_frames_raw(inp.rest()),
        MODE_SEALED => page_frames_sealed(&mut inp),
        _ => page_frames_structured(&mut inp),
    }
}

fn page_frames_raw(stream: &[u8]) {
    // Once as a decoder that needs checksums reads it, once as one whose
    // frames come from a verifying container: there a frame flagged
    // unchecked reaches the table and payload with no checksum to forge.
    for accept_unchecked in [false, true] {
        let mut dec = Decoder::with_limits(&CodecConfig::default(), LIMITS);
        dec.accept_unchecked(accept_unchecked);
        for frame in split_frames(stream) {
            match dec.decode_pages(frame) {
                Ok(p) => {
                    let unchecked = FrameHeader::peek(frame).is_ok_and(|h| h.unchecked());
                    assert!(
                        accept_unchecked || !unchecked,
                        "an unchecked frame was accepted"
                    );
                    check_decoded(&p, 4096)
                }
                Err(e) => check_poison_contract(&mut dec, &e),
            }
        }
    }
}

fn page_frames_sealed(inp: &mut Input<'_>) {
    use sealed_config::*;
    let c = inp.u8();
    let key = (c & KEYED != 0).then(fuzz_key);
    let config = CodecConfig {
        page_size: PageSize::DEFAULT,
        state_limit: SEALED_STATE_LIMITS[usize::from(c & STATE_MASK)],
        key: key.clone(),
    };
    let mut dec = Decoder::with_limits(&config, LIMITS);
    if c & BASELINE != 0 {
        dec.set_baseline(sealed_baseline())
            .expect("baseline of the decoder's page size");
    }
    let mut seq = 0u64;
    for body in bodies(inp) {
        let frame = seal(
            body,
            (c & KEEP_SEQ == 0).then_some(seq),
            (c & KEEP_FLAGS == 0).then_some(key.is_some()),
            key.as_ref(),
        );
        match dec.decode_pages(&frame) {
            Ok(p) => {
                check_decoded(&p, 4096);
                seq += 1;
            }
            Err(e) => check_poison_contract(&mut dec, &e),
        }
    }
}

/// One page of a structured session, made from the input.
fn gen_page(
    inp: &mut Input<'_>,
    ps: usize,
    history: &[(u64, Vec<u8>)],
    baseline: &[Vec<u8>],
) -> Vec<u8> {
    let op = inp.u8();
    let mut page = vec![0u8; ps];
    match op % 8 {
        0 => {}
        1..=3 => {
            let class =
                [PageClass::Text, PageClass::Code, PageClass::Random][usize::from(op % 8) - 1];
            class_page(class, inp.u8(), &mut page);
        }
        4 if !history.is_empty() => {
            page.copy_from_slice(&history[usize::from(inp.u8()) % history.len()].1);
        }
        5 if !history.is_empty() => {
            // An earlier page, edited: a few counters, or bytes at input-chosen
            // places (sometimes making it zero, or making a zero page not).
            page.copy_from_slice(&history[usize::from(inp.u8()) % history.len()].1);
            let e = inp.u8();
            if e & 1 == 0 {
                corpus::dirty_page(&mut Rng::new(u64::from(e)), &mut page);
            } else {
                for _ in 0..1 + (e >> 1) % 8 {
                    let at = usize::from(inp.u16()) % ps;
                    page[at] ^= inp.u8();
                }
            }
        }
        6 if !baseline.is_empty() => {
            page.copy_from_slice(&baseline[usize::from(inp.u8()) % baseline.len()]);
        }
        _ => {
            let v = inp.u8();
            page.fill(v);
            let at = usize::from(inp.u16()) % ps;
            page[at] = inp.u8();
        }
    }
    page
}

/// The index of the next page of a structured session.
fn gen_index(inp: &mut Input<'_>, last: Option<u64>, history: &[(u64, Vec<u8>)]) -> u64 {
    let next = last.map_or(0, |l| l.wrapping_add(1));
    match inp.u8() % 32 {
        0..=17 => next,
        18..=23 if !history.is_empty() => history[usize::from(inp.u8()) % history.len()].0,
        24..=27 => u64::from(inp.u8()),
        28 => u64::MAX - u64::from(inp.u8() % 4),
        29..=31 => inp.u64(),
        _ => next,
    }
}

fn page_frames_structured(inp: &mut Input<'_>) {
    let c0 = inp.u8();
    let c1 = inp.u8();
    let ps_choice = if c0 & 0xe0 == 0xe0 { 8192 } else { 4096 };
    let page_size = PageSize::new(ps_choice).expect("valid page size");
    let ps = page_size.bytes();
    let state_limit = [0, ps, 3 * ps, 8 * ps, 32 * ps, 1 << 20, 64 << 20][usize::from(c0 % 7)];
    let key = (c1 & 0x80 != 0).then(fuzz_key);
    let config = CodecConfig {
        page_size,
        state_limit,
        key: key.clone(),
    };
    let mut enc = Encoder::new(&config, policy(c1)).expect("valid policy");
    let mut dec = Decoder::with_limits(&config, LIMITS);
    // An unkeyed session may leave its page checksums out, as a migration
    // does inside verified regions: mutants then reach the table and the
    // payload as they are, and may be accepted with other pages.
    let unchecked = key.is_none() && c0 & 0x10 != 0;
    enc.set_page_checksums(!unchecked);
    dec.accept_unchecked(unchecked);

    // A baseline of a few pages, advertised through its wire form.
    let mut baseline_pages = Vec::new();
    if c1 & 0x40 != 0 {
        let n = 1 + usize::from(c1 >> 3) % 4;
        for i in 0..n {
            let mut p = vec![0u8; ps];
            let class = [PageClass::Text, PageClass::Code, PageClass::Random][i % 3];
            class_page(class, inp.u8(), &mut p);
            baseline_pages.push(p);
        }
        let mut image = Vec::new();
        for p in &baseline_pages {
            image.extend_from_slice(p);
        }
        let b = Baseline::from_image(page_size, &image).expect("whole pages");
        let advert = BaselineAdvert::from_bytes(&b.advertise().to_bytes(), 64)
            .expect("an advertisement parses back");
        enc.set_baseline(advert).expect("same page size");
        dec.set_baseline(b).expect("same page size");
    }

    // Encode the session.
    let n_frames = 1 + usize::from(inp.u8() % 4);
    let mut history: Pages = Vec::new();
    let mut frames: Vec<(Vec<u8>, Pages)> = Vec::new();
    let mut last = None;
    for _ in 0..n_frames {
        let h = inp.u8();
        if h & 0x80 != 0 {
            enc.set_policy(policy(inp.u8())).expect("valid policy");
        }
        let n_pages = usize::from(h % 9);
        let mut want = Vec::with_capacity(n_pages);
        for _ in 0..n_pages {
            let page = gen_page(inp, ps, &history, &baseline_pages);
            let index = gen_index(inp, last, &history);
            last = Some(index);
            history.push((index, page.clone()));
            want.push((index, page));
        }
        let refs: Vec<PageRef<'_>> = want
            .iter()
            .map(|(index, data)| PageRef {
                index: *index,
                data,
            })
            .collect();
        let mut frame = Vec::new();
        let stats = enc
            .encode_pages(&refs, &mut frame)
            .unwrap_or_else(|e| panic!("the encoder refused valid pages: {e}"));
        assert_eq!(stats.pages, n_pages as u64);
        assert_eq!(stats.frame_bytes, frame.len() as u64);
        assert_eq!(
            stats.zero + stats.raw + stats.delta + stats.reference + stats.baseline,
            n_pages as u64,
            "page kinds do not add up: {stats:?}"
        );
        assert!(
            enc.state_bytes() <= state_limit,
            "encoder state over its limit"
        );
        frames.push((frame, want));
    }

    // Mutate one frame, then decode them all in order.
    let target = usize::from(inp.u8()) % frames.len();
    let (mutant, resealed) = mutate(&frames[target].0, inp, key.as_ref());
    let mutant = (mutant != frames[target].0).then_some(mutant);
    let mut diverged = false;
    for (i, (frame, want)) in frames.iter().enumerate() {
        if i == target
            && let Some(m) = &mutant
        {
            match dec.decode_pages(m) {
                Ok(got) => {
                    check_decoded(&got, ps);
                    let same = same_pages(&got, want);
                    assert!(
                        resealed || unchecked || same,
                        "frame {i}: a mutated frame whose checksum was not recomputed \
                         was accepted with different pages"
                    );
                    // A re-sealed (or unchecked) mutant may carry other
                    // pages: from here on the two ends may hold different
                    // state.
                    diverged |= resealed || unchecked;
                    continue;
                }
                Err(e) => {
                    check_poison_contract(&mut dec, &e);
                    if poisons(&e) {
                        return;
                    }
                }
            }
        }
        match dec.decode_pages(frame) {
            Ok(got) => {
                check_decoded(&got, ps);
                assert!(
                    diverged || same_pages(&got, want),
                    "frame {i} of {} decoded to other pages than were encoded",
                    frames.len()
                );
            }
            Err(e) => {
                assert!(
                    diverged,
                    "frame {i} of {} of an in-step session was rejected: {e} ({e:?})",
                    frames.len()
                );
                check_poison_contract(&mut dec, &e);
                if poisons(&e) {
                    return;
                }
            }
        }
        assert!(
            dec.state_bytes() <= state_limit,
            "decoder state over its limit"
        );
    }
}

// ---------------------------------------------------------------------------
// chunk_frames
// ---------------------------------------------------------------------------

/// Checks one decoded chunk against its header.
fn check_chunk(frame: &[u8], seq: u64, bytes: &[u8]) {
    let h = FrameHeader::parse(frame).expect("an accepted chunk frame parses");
    assert_eq!(h.kind, FrameKind::Chunk);
    assert_eq!(h.seq, seq);
    assert_eq!(bytes.len() as u64, u64::from(h.raw_len));
}

/// Chunk frames through [`Decoder::decode_chunk`]: raw bytes, sealed bodies,
/// or an encoded chunk, mutated.
pub fn chunk_frames(data: &[u8]) {
    let mut inp = Input::new(data);
    match inp.u8() % 3 {
        MODE_RAW => {
            let mut dec = Decoder::with_limits(&CodecConfig::default(), LIMITS);
            for frame in split_frames(inp.rest()) {
                if let Ok((seq, bytes)) = dec.decode_chunk(frame) {
                    check_chunk(frame, seq, bytes);
                }
            }
        }
        MODE_SEALED => {
            let c = inp.u8();
            let key = (c & sealed_config::KEYED != 0).then(fuzz_key);
            let config = CodecConfig {
                key: key.clone(),
                ..CodecConfig::default()
            };
            let mut dec = Decoder::with_limits(&config, LIMITS);
            for body in bodies(&mut inp) {
                let keyed = (c & sealed_config::KEEP_FLAGS == 0).then_some(key.is_some());
                let frame = seal(body, None, keyed, key.as_ref());
                if let Ok((seq, bytes)) = dec.decode_chunk(&frame) {
                    check_chunk(&frame, seq, bytes);
                }
                // Chunks use no state: a page frame decoder is not disturbed.
                if let Err(e) = dec.decode_pages(&frame) {
                    check_poison_contract(&mut dec, &e);
                }
            }
        }
        _ => chunk_frames_structured(&mut inp),
    }
}

fn chunk_frames_structured(inp: &mut Input<'_>) {
    let c = inp.u8();
    let key = (c & 0x80 != 0).then(fuzz_key);
    let config = CodecConfig {
        key: key.clone(),
        ..CodecConfig::default()
    };
    let mut enc = Encoder::new(&config, policy(c)).expect("valid policy");
    let mut dec = Decoder::with_limits(&config, LIMITS);
    let seq = inp.u64();
    let repeat = [1, 1, 3, 40][usize::from(inp.u8() % 4)];
    let len = usize::from(inp.u16());
    let data = inp.take(len).repeat(repeat);

    let mut frame = Vec::new();
    let stats = enc
        .encode_chunk(&data, seq, &mut frame)
        .unwrap_or_else(|e| panic!("the encoder refused a chunk: {e}"));
    assert_eq!(stats.input_bytes, data.len() as u64);
    assert_eq!(stats.frame_bytes, frame.len() as u64);
    let mut small = vec![0u8; dwcp_codec::max_chunk_frame_len(data.len()) - 1];
    assert!(enc.encode_chunk_into(&data, seq, &mut small).is_err());
    // The stored frame in three pieces (what a sender hands `sendmsg`) is
    // the stored frame, whatever this encoder's policy.
    let offset = (c & 0x40 != 0).then(|| inp.u64() & !0xfff);
    let mut head = [0u8; dwcp_codec::frame::HEADER_LEN];
    let mut sum = [0u8; dwcp_codec::frame::CHECKSUM_LEN];
    let (pstats, pdigest) = enc
        .encode_stored_chunk_at(&data, seq, offset, &mut head, &mut sum)
        .unwrap_or_else(|e| panic!("the encoder refused a stored chunk: {e}"));
    let mut stored = Encoder::new(&config, Policy::Stored).expect("valid policy");
    let mut whole = vec![0u8; dwcp_codec::max_chunk_frame_len(data.len())];
    let (wstats, wdigest) = stored
        .encode_chunk_at(&data, seq, offset, &mut whole)
        .unwrap_or_else(|e| panic!("the encoder refused a chunk: {e}"));
    whole.truncate(wstats.frame_bytes as usize);
    assert!(
        [&head[..], &data[..], &sum[..]].concat() == whole,
        "stored pieces differ from the stored frame"
    );
    assert_eq!((pstats, pdigest), (wstats, wdigest));
    match dec.decode_chunk(&frame) {
        Ok((s, bytes)) => assert!(s == seq && bytes == data, "chunk did not round-trip"),
        Err(e) => panic!("a chunk frame was rejected: {e} ({e:?})"),
    }
    // A chunk frame is not a page frame.
    assert!(matches!(
        dec.decode_pages(&frame),
        Err(DecodeError::WrongFrameKind { .. })
    ));

    let (mutant, resealed) = mutate(&frame, inp, key.as_ref());
    if mutant != frame
        && let Ok((s, bytes)) = dec.decode_chunk(&mutant)
    {
        check_chunk(&mutant, s, bytes);
        assert!(
            resealed || (s == seq && bytes == data),
            "a mutated chunk frame whose checksum was not recomputed was accepted \
             with other content"
        );
    }
    // Chunks use no state: the original still decodes after anything.
    match dec.decode_chunk(&frame) {
        Ok((s, bytes)) => assert!(s == seq && bytes == data, "chunk did not round-trip"),
        Err(e) => panic!("a chunk frame was rejected after a mutant: {e} ({e:?})"),
    }
}

// ---------------------------------------------------------------------------
// delta_apply
// ---------------------------------------------------------------------------

/// A plain reading of LEB128 (at most ten bytes, at most 64 bits, minimal).
fn ref_varint(buf: &[u8], pos: &mut usize) -> Option<u64> {
    let mut v: u128 = 0;
    for i in 0..10 {
        let b = *buf.get(*pos)?;
        *pos += 1;
        v |= u128::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            if i > 0 && b == 0 {
                return None;
            }
            return u64::try_from(v).ok();
        }
    }
    None
}

/// A plain reading of the delta format (docs in `dwcp_codec::delta`): the
/// reference `delta_apply` is compared with. Returns whether it applied.
fn ref_apply(page: &mut [u8], d: &[u8]) -> bool {
    let n = page.len() as u128;
    let (mut pos, mut at) = (0usize, 0u128);
    while pos < d.len() {
        let (Some(zeros), Some(run)) = (ref_varint(d, &mut pos), ref_varint(d, &mut pos)) else {
            return false;
        };
        let (start, end) = (
            at + u128::from(zeros),
            at + u128::from(zeros) + u128::from(run),
        );
        if run == 0 || end > n || (pos as u128 + u128::from(run)) > d.len() as u128 {
            return false;
        }
        let run = run as usize;
        for (p, x) in page[start as usize..end as usize]
            .iter_mut()
            .zip(&d[pos..pos + run])
        {
            *p ^= x;
        }
        pos += run;
        at = end;
    }
    true
}

/// [`delta::apply`] on arbitrary deltas, compared with a plain reading of the
/// format; and [`delta::encode`] then `apply` on input-made page pairs.
pub fn delta_apply(data: &[u8]) {
    let mut inp = Input::new(data);
    let mode = inp.u8();
    let sel = inp.u8();
    let len = match sel % 4 {
        0 | 1 => 4096,
        2 => usize::from(inp.u8()),
        _ => 8192,
    };
    let mut old = vec![0u8; len];
    let class = [
        PageClass::Text,
        PageClass::Random,
        PageClass::Zero,
        PageClass::Code,
    ][usize::from(sel >> 2) % 4];
    class_page(class, inp.u8(), &mut old);
    if mode.is_multiple_of(2) {
        let entry = inp.u64();
        let d = inp.rest();
        let mut got = old.clone();
        let mut want = old.clone();
        let ok = ref_apply(&mut want, d);
        match delta::apply(&mut got, d, entry) {
            Ok(()) => {
                assert!(ok, "apply took a delta the format forbids");
                assert!(got == want, "apply wrote other bytes than the format says");
            }
            Err(DecodeError::BadDelta { entry: e, .. }) => {
                assert!(!ok, "apply refused a well-formed delta");
                assert_eq!(e, entry, "the error names another entry");
            }
            Err(e) => panic!("apply failed with an unexpected error: {e:?}"),
        }
        return;
    }
    // Round trip.
    let mut new = old.clone();
    let e = inp.u8();
    match e % 4 {
        0 => corpus::dirty_page(&mut Rng::new(u64::from(inp.u8())), &mut new),
        1 if len > 0 => {
            for _ in 0..1 + inp.u8() % 32 {
                let at = usize::from(inp.u16()) % len;
                new[at] ^= inp.u8();
            }
        }
        2 => {
            let class = [PageClass::Text, PageClass::Random][usize::from(e >> 2) % 2];
            class_page(class, inp.u8(), &mut new);
        }
        _ => {
            for b in &mut new {
                *b ^= inp.u8();
            }
        }
    }
    let cap = match inp.u8() % 4 {
        0 => usize::MAX,
        1 => len / 2,
        2 => usize::from(inp.u16()),
        _ => usize::from(inp.u8() % 8),
    };
    let prefix = usize::from(inp.u8() % 4);
    let mut out = vec![0xabu8; prefix];
    match delta::encode(&old, &new, &mut out, cap) {
        Some(n) => {
            assert_eq!(out.len(), prefix + n, "encode returned a wrong length");
            assert!(n <= cap, "encode went past its cap");
            assert!(out[..prefix].iter().all(|&b| b == 0xab), "encode overwrote");
            if old == new {
                assert_eq!(n, 0, "identical pages give an empty delta");
            }
            let mut page = old.clone();
            delta::apply(&mut page, &out[prefix..], 0)
                .unwrap_or_else(|e| panic!("apply refused what encode wrote: {e}"));
            assert!(page == new, "a delta did not round-trip");
            let mut page = old.clone();
            assert!(ref_apply(&mut page, &out[prefix..]) && page == new);
        }
        None => {
            assert!(cap != usize::MAX, "encode failed without a cap");
            assert!(out == vec![0xabu8; prefix], "encode left bytes behind");
            let mut full = Vec::new();
            let n = delta::encode(&old, &new, &mut full, usize::MAX).expect("no cap");
            assert!(n > cap, "encode refused a delta within its cap");
        }
    }
}

// ---------------------------------------------------------------------------
// baseline_advert
// ---------------------------------------------------------------------------

/// [`BaselineAdvert::from_bytes`] on arbitrary bytes (whatever parses must
/// serialise back the same way), and baselines of input-made pages.
pub fn baseline_advert(data: &[u8]) {
    let mut inp = Input::new(data);
    if inp.u8().is_multiple_of(2) {
        let max = [0, 1, 16, u64::MAX][usize::from(inp.u8() % 4)];
        let bytes = inp.rest();
        let Ok(a) = BaselineAdvert::from_bytes(bytes, max) else {
            return;
        };
        let distinct: HashSet<(u64, [u8; 16])> = bytes[16..]
            .chunks_exact(24)
            .map(|e| {
                let mut fp = [0u8; 8];
                fp.copy_from_slice(&e[..8]);
                let mut h = [0u8; 16];
                h.copy_from_slice(&e[8..]);
                (u64::from_le_bytes(fp), h)
            })
            .collect();
        assert_eq!(a.len(), distinct.len(), "entries lost or invented");
        assert!(a.len() as u64 <= max);
        for (fp, h) in &distinct {
            assert!(a.candidates(*fp).contains(&ContentHash(*h)));
        }
        let out = a.to_bytes();
        let b = BaselineAdvert::from_bytes(&out, u64::MAX).expect("to_bytes parses back");
        assert_eq!(b.to_bytes(), out, "to_bytes is not canonical");
        assert_eq!(b.len(), a.len());
        assert_eq!(b.page_size(), a.page_size());
        return;
    }
    let ps = if inp.u8() & 1 == 0 { 4096 } else { 8192 };
    let page_size = PageSize::new(ps).expect("valid page size");
    let n = usize::from(inp.u8() % 9);
    let mut pages: Vec<Vec<u8>> = Vec::new();
    for _ in 0..n {
        let op = inp.u8();
        let mut p = vec![0u8; ps];
        match op % 4 {
            0 => {}
            1 if !pages.is_empty() => p.copy_from_slice(&pages[usize::from(op >> 2) % pages.len()]),
            _ => {
                let class =
                    [PageClass::Text, PageClass::Code, PageClass::Random][usize::from(op >> 2) % 3];
                class_page(class, inp.u8(), &mut p);
            }
        }
        pages.push(p);
    }
    let mut b = Baseline::new(page_size);
    let mut seen: HashSet<&[u8]> = HashSet::new();
    for p in &pages {
        let added = b.insert(p).expect("page of the page size");
        assert_eq!(added, !is_zero(p) && seen.insert(p), "insert added wrongly");
    }
    assert!(b.insert(&vec![1u8; ps + 1]).is_err());
    assert_eq!(b.len(), seen.len());
    let image = pages.concat();
    let from_image = Baseline::from_image(page_size, &image).expect("whole pages");
    assert_eq!(from_image.len(), b.len());
    let advert = b.advertise();
    assert_eq!(advert.len(), b.len());
    for p in &seen {
        let h = ContentHash::of(p);
        assert_eq!(b.get(&h), Some(*p));
        assert!(advert.candidates(fingerprint(p)).contains(&h));
    }
    let bytes = advert.to_bytes();
    let back = BaselineAdvert::from_bytes(&bytes, b.len() as u64).expect("parses back");
    assert_eq!(back.to_bytes(), bytes);
    assert_eq!(back.page_size(), page_size);
    if !b.is_empty() {
        assert!(BaselineAdvert::from_bytes(&bytes, b.len() as u64 - 1).is_err());
    }
}

// ---------------------------------------------------------------------------
// frame_header
// ---------------------------------------------------------------------------

/// [`FrameHeader::peek`] and [`FrameHeader::parse`] on arbitrary bytes: they
/// agree, and what they accept is what the format allows.
pub fn frame_header(data: &[u8]) {
    let peeked = FrameHeader::peek(data);
    let parsed = FrameHeader::parse(data);
    if let Ok(h) = &parsed {
        assert_eq!(h.frame_len(), data.len() as u64);
        assert_eq!(
            peeked.as_ref().ok(),
            Some(h),
            "parse accepts what peek refuses"
        );
    }
    let Ok(h) = peeked else {
        return;
    };
    assert_eq!(data[..4], MAGIC);
    assert_eq!(h.flags & !(FLAG_KEYED | FLAG_UNCHECKED), 0);
    if h.unchecked() {
        // Only page frames, and with no key.
        assert_eq!((h.kind, h.flags), (FrameKind::Pages, FLAG_UNCHECKED));
    }
    if h.kind == FrameKind::Chunk {
        assert_eq!((h.page_shift, h.entries, h.table_len), (0, 0, 0));
    }
    if h.compression == dwcp_codec::Compression::Stored {
        assert_eq!(h.payload_len, h.raw_len);
    }
    assert!(h.frame_len() >= (HEADER_LEN + h.checksum_len()) as u64);
    if let Ok(n) = usize::try_from(h.frame_len())
        && n <= data.len()
    {
        assert_eq!(FrameHeader::parse(&data[..n]).ok(), Some(h));
    }
}

/// The codec's own LZ4 block decoder, differentially against `lz4_flex`'s
/// safe decoder. First byte: mode. Mode even: the rest (after a two-byte
/// output size) is a block decoded as is; whenever either decoder produces
/// exactly that many bytes, both must, with the same bytes. Mode odd: the
/// rest is expanded into data with runs and repeats, compressed with
/// `lz4_flex`, and must decode to exactly that data.
pub fn lz4_block(data: &[u8]) {
    use dwcp_codec::lz4::decompress_into;
    let mut inp = Input::new(data);
    let mode = inp.u8();
    if mode.is_multiple_of(2) {
        let n = usize::from(inp.u8()) | (usize::from(inp.u8()) << 8);
        let block = inp.rest();
        let mut ours = vec![0u8; n];
        let mut theirs = vec![0u8; n];
        let a = decompress_into(block, &mut ours).is_ok();
        let b = matches!(lz4_flex::block::decompress_into(block, &mut theirs), Ok(k) if k == n);
        if a {
            assert!(
                b,
                "ours decoded a block lz4_flex rejects or sizes differently"
            );
        }
        if a && b {
            assert!(ours == theirs, "the decoders disagree on a block");
        }
        if b && !a {
            // lz4_flex takes blocks whose last sequence is a match; the
            // format says the last sequence holds literals only, so ours
            // may refuse those. Any other disagreement is a finding.
            assert!(
                last_sequence_is_match(block),
                "ours refused a block lz4_flex decodes to the declared size"
            );
        }
    } else {
        let mut src = Vec::new();
        let rest = inp.rest();
        let mut i = 0;
        while i < rest.len() && src.len() < 1 << 18 {
            let op = rest[i];
            let arg = rest.get(i + 1).copied().unwrap_or(0);
            i += 2;
            match op % 4 {
                0 => src.extend(std::iter::repeat_n(arg, usize::from(op) * 4)),
                1 if !src.is_empty() => {
                    let start = usize::from(arg) * 37 % src.len();
                    let take = (usize::from(op) * 3).min(src.len() - start);
                    let copy = src[start..start + take].to_vec();
                    src.extend(copy);
                }
                _ => src.extend_from_slice(
                    &rest[i.min(rest.len())..(i + usize::from(arg % 32)).min(rest.len())],
                ),
            }
        }
        let c = lz4_flex::block::compress(&src);
        let mut out = vec![0u8; src.len()];
        assert!(
            decompress_into(&c, &mut out).is_ok(),
            "ours refused an lz4_flex block"
        );
        assert!(out == src, "ours decoded an lz4_flex block wrongly");
    }
}

/// Whether the block's last sequence carries a match (walking the tokens;
/// false on anything malformed).
fn last_sequence_is_match(block: &[u8]) -> bool {
    let mut ip = 0usize;
    loop {
        let Some(&t) = block.get(ip) else {
            return false;
        };
        ip += 1;
        let mut lit = usize::from(t >> 4);
        if lit == 15 {
            loop {
                let Some(&b) = block.get(ip) else {
                    return false;
                };
                ip += 1;
                lit += usize::from(b);
                if b != 255 {
                    break;
                }
            }
        }
        ip += lit;
        if ip >= block.len() {
            return false;
        }
        ip += 2;
        if t & 15 == 15 {
            loop {
                let Some(&b) = block.get(ip) else {
                    return false;
                };
                ip += 1;
                if b != 255 {
                    break;
                }
            }
        }
        if ip >= block.len() {
            return true;
        }
    }
}
