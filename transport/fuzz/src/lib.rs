//! Fuzz logic for the AMST wire decoders of `dwcp-transport`, as plain
//! functions of `&[u8]` that must never panic, whatever the input.
//!
//! The libFuzzer targets in `fuzz_targets/` (built only with the `libfuzzer`
//! feature, on nightly, by `transport/fuzz/run`) call these functions; so
//! does `tests/replay.rs`, on stable, with the committed seeds of `seeds/`
//! and a few thousand deterministic pseudo-random inputs. A panic is a
//! finding: either the transport panicked, or one of the properties asserted
//! here failed.
//!
//! - [`wire_messages`]: every decoder of `dwcp_transport::wire` (the first
//!   byte picks one, see [`wire_sel`]), and whole message streams (header,
//!   then the body its kind says). Whatever a decoder accepts must encode
//!   back to exactly the bytes it read (the encoding is canonical) and decode
//!   again to the same value, within the body limit of its kind.
//! - [`file_meta`]: `files::FileMeta::decode` and `files::safe_relative`,
//!   each compared with a plain reading of its rules; an accepted path never
//!   leaves its root.
//! - [`tree_digest`]: `treehash::PieceDigest` over a region made from the
//!   input, with input-chosen writes (aligned pieces, the sender's cuts,
//!   arbitrary and hostile ranges): `finish` must equal `blake3::hash` of the
//!   region, read back only inside it, and never more than its length.

#![forbid(unsafe_code)]

use std::fmt::Debug;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use dwcp_codec::corpus::Rng;
use dwcp_transport::WireError;
use dwcp_transport::files::{self, FileMeta, MAX_PATH_LEN};
use dwcp_transport::treehash::PieceDigest;
use dwcp_transport::wire::{
    self, CHALLENGE_LEN, Challenge, Close, DATA_FIXED_LEN, DataHeader, HEADER_LEN, HELLO_LEN,
    Header, Hello, Join, JoinOk, Kind, MAX_ACKS, MAX_META_LEN, MAX_TEXT_LEN, Open, Reason, TAG_LEN,
    Welcome,
};

pub mod seeds;

/// A fuzz function: takes any bytes, panics only on a finding.
pub type FuzzFn = fn(&[u8]);

/// Every fuzz function, by target name (the names of `fuzz_targets/*.rs`).
pub const TARGETS: [(&str, FuzzFn); 3] = [
    ("wire_messages", wire_messages),
    ("file_meta", file_meta),
    ("tree_digest", tree_digest),
];

// ---------------------------------------------------------------------------
// Input reader
// ---------------------------------------------------------------------------

pub use dwcp_codec_fuzz::Input;

// ---------------------------------------------------------------------------
// wire_messages
// ---------------------------------------------------------------------------

/// Selectors of [`wire_messages`]: its first byte, modulo [`wire_sel::COUNT`].
pub mod wire_sel {
    /// A [`MAX_FRAMES`](super::MAX_FRAMES) choice byte, then a 12-byte
    /// header for `Header::parse`.
    pub const HEADER: u8 = 0;
    /// The rest is a `HELLO` body.
    pub const HELLO: u8 = 1;
    /// The rest is a `CHALLENGE` body.
    pub const CHALLENGE: u8 = 2;
    /// The rest is a `WELCOME` body (without tag).
    pub const WELCOME: u8 = 3;
    /// The rest is a reason (`REFUSE`, `DONE`, `ERROR`) body.
    pub const REASON: u8 = 4;
    /// The rest is a `JOIN` body.
    pub const JOIN: u8 = 5;
    /// The rest is a `JOIN_OK` body.
    pub const JOIN_OK: u8 = 6;
    /// The rest is a `DATA` body (fixed fields, then frame and tag).
    pub const DATA: u8 = 7;
    /// The rest is an `ACK` body (without tag).
    pub const ACK: u8 = 8;
    /// The rest is an `OPEN` body (without tag).
    pub const OPEN: u8 = 9;
    /// The rest is a `CLOSE` body (without tag).
    pub const CLOSE: u8 = 10;
    /// A [`MAX_FRAMES`](super::MAX_FRAMES) choice byte, then a stream of
    /// messages: each a header and the body it declares (its tag, when the
    /// kind has one, is cut off and not checked).
    pub const MESSAGES: u8 = 11;
    /// Number of selectors.
    pub const COUNT: u8 = 12;
}

/// The message kind whose body each body selector (`HELLO..=CLOSE`) feeds.
const SEL_KINDS: [Kind; 10] = [
    Kind::Hello,
    Kind::Challenge,
    Kind::Welcome,
    Kind::Refuse,
    Kind::Join,
    Kind::JoinOk,
    Kind::Data,
    Kind::Ack,
    Kind::Open,
    Kind::Close,
];

/// Longest data frames a session may allow (the receiver's configuration,
/// not the peer's input), by a choice byte modulo their number.
pub const MAX_FRAMES: [usize; 4] = [0, 64 << 10, 2 << 20, u32::MAX as usize];

/// Most messages of one [`wire_sel::MESSAGES`] stream.
const MAX_MESSAGES: usize = 64;

/// Every decoder of `dwcp_transport::wire` on arbitrary bytes: the first
/// byte picks one ([`wire_sel`]). What a decoder accepts must satisfy its
/// message's rules, encode back to exactly the bytes decoded, and decode
/// again to the same value.
pub fn wire_messages(data: &[u8]) {
    let mut inp = Input::new(data);
    match inp.u8() % wire_sel::COUNT {
        wire_sel::HEADER => {
            let max_frame = max_frame(inp.u8());
            let _ = check_header(&header_bytes(&mut inp), max_frame);
        }
        wire_sel::MESSAGES => {
            let max_frame = max_frame(inp.u8());
            for _ in 0..MAX_MESSAGES {
                if inp.is_empty() {
                    break;
                }
                let h = header_bytes(&mut inp);
                let Ok(header) = check_header(&h, max_frame) else {
                    return;
                };
                let len = header.len as usize;
                let body = inp.take(len);
                if body.len() < len {
                    // A reader waits for the rest; nothing to decode.
                    return;
                }
                let body = if header.kind.tagged() {
                    &body[..len - TAG_LEN]
                } else {
                    body
                };
                check_body(header.kind, body);
            }
        }
        sel => {
            let kind = SEL_KINDS[usize::from(sel - 1)];
            check_body(kind, inp.rest());
        }
    }
}

fn max_frame(b: u8) -> usize {
    MAX_FRAMES[usize::from(b) % MAX_FRAMES.len()]
}

/// The next 12 bytes, zero-padded at the end of the input.
fn header_bytes(inp: &mut Input<'_>) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    let b = inp.take(HEADER_LEN);
    h[..b.len()].copy_from_slice(b);
    h
}

/// `Header::parse`, and what an accepted header must satisfy.
fn check_header(b: &[u8; HEADER_LEN], max_frame: usize) -> Result<Header, WireError> {
    if let Some(k) = Kind::from_wire(b[4]) {
        assert_eq!(k as u8, b[4], "Kind::from_wire({}) is {k:?}", b[4]);
    }
    let h = Header::parse(b, max_frame)?;
    assert_eq!(
        &h.write(),
        b,
        "parse accepted a header that write does not give back ({h:?})"
    );
    assert_eq!(Header::parse(&h.write(), max_frame), Ok(h));
    let len = h.len as usize;
    assert!(
        len <= h.kind.max_body(max_frame),
        "{h:?}: longer than its kind allows"
    );
    if h.kind.tagged() {
        assert!(len >= TAG_LEN, "{h:?}: a tagged message shorter than a tag");
    }
    // The limit only grows with the frame limit.
    let widest = MAX_FRAMES[MAX_FRAMES.len() - 1];
    assert_eq!(
        Header::parse(b, widest),
        Ok(h),
        "a header accepted under max_frame {max_frame} is refused under {widest}"
    );
    Ok(h)
}

/// A decoded value must encode back to exactly `input`, which must decode
/// again to the same value; the encoding, with its tag, must fit the body
/// limit of `kind` (so a receiver never refuses what a sender writes).
fn round_trip<T: PartialEq + Debug>(
    kind: Kind,
    input: &[u8],
    x: &T,
    encoded: &[u8],
    again: Result<T, WireError>,
) {
    match again {
        Ok(y) => assert_eq!(&y, x, "{kind:?}: decode(encode(x)) != x"),
        Err(e) => panic!("{kind:?}: decode refused encode({x:?}): {e}"),
    }
    assert_eq!(
        encoded, input,
        "{kind:?}: {x:?} encodes to other bytes than it was decoded from"
    );
    let tag = if kind.tagged() { TAG_LEN } else { 0 };
    assert!(
        encoded.len() + tag <= kind.max_body(0),
        "{kind:?}: an encoding of {} bytes exceeds the kind's limit",
        encoded.len()
    );
}

/// The decoder of `kind` on `b` (a body without its tag), and the
/// properties of what it accepts.
fn check_body(kind: Kind, b: &[u8]) {
    match kind {
        Kind::Hello => {
            if let Ok(m) = Hello::decode(b) {
                assert!(m.version_min <= m.version_max, "HELLO: {m:?}");
                let e = m.encode();
                assert_eq!(e.len(), HELLO_LEN);
                round_trip(kind, b, &m, &e, Hello::decode(&e));
            }
        }
        Kind::Challenge => {
            if let Ok(m) = Challenge::decode(b) {
                let e = m.encode();
                assert_eq!(e.len(), CHALLENGE_LEN);
                assert_eq!(
                    &e[..CHALLENGE_LEN - 32],
                    &m.encode_unproven()[..],
                    "CHALLENGE: the proof does not follow the unproven body"
                );
                round_trip(kind, b, &m, &e, Challenge::decode(&e));
            }
        }
        // The proof is 32 opaque bytes; BYE has no body.
        Kind::Proof | Kind::Bye => {}
        Kind::Welcome => {
            if let Ok(m) = Welcome::decode(b) {
                assert!(
                    m.window > 0 && m.max_chunk > 0 && m.max_streams > 0,
                    "WELCOME: {m:?}"
                );
                let e = m.encode();
                round_trip(kind, b, &m, &e, Welcome::decode(&e));
            }
        }
        Kind::Refuse | Kind::Done | Kind::Error => {
            if let Ok(m) = Reason::decode(b) {
                assert!(m.text.len() <= MAX_TEXT_LEN, "reason text too long");
                let e = m.encode();
                round_trip(kind, b, &m, &e, Reason::decode(&e));
            }
        }
        Kind::Join => {
            if let Ok(m) = Join::decode(b) {
                let e = m.encode();
                round_trip(kind, b, &m, &e, Join::decode(&e));
            }
        }
        Kind::JoinOk => {
            if let Ok(m) = JoinOk::decode(b) {
                let e = m.encode();
                round_trip(kind, b, &m, &e, JoinOk::decode(&e));
            }
        }
        Kind::Data => {
            if let Ok((h, rest)) = DataHeader::decode(b) {
                assert_eq!(
                    rest,
                    &b[DATA_FIXED_LEN..],
                    "DATA: the frame is not what follows the fixed fields"
                );
                let mut e = h.encode().to_vec();
                assert_eq!(
                    &e[..],
                    &b[..DATA_FIXED_LEN],
                    "DATA: {h:?} encodes to other bytes than it was decoded from"
                );
                e.extend_from_slice(rest);
                match DataHeader::decode(&e) {
                    Ok((h2, rest2)) => {
                        assert_eq!(h2, h, "DATA: decode(encode(x)) != x");
                        assert_eq!(rest2, rest);
                    }
                    Err(err) => panic!("DATA: decode refused encode({h:?}): {err}"),
                }
            }
        }
        Kind::Ack => {
            if let Ok(ids) = wire::decode_ack(b) {
                assert!(
                    !ids.is_empty() && ids.len() <= MAX_ACKS,
                    "ACK of {} ids",
                    ids.len()
                );
                let e = wire::encode_ack(&ids);
                round_trip(kind, b, &ids, &e, wire::decode_ack(&e));
            }
        }
        Kind::Open => {
            if let Ok(m) = Open::decode(b) {
                assert!(m.meta.len() <= MAX_META_LEN, "OPEN metadata too long");
                let e = m.encode();
                round_trip(kind, b, &m, &e, Open::decode(&e));
                // A file region's metadata is the next decoder a peer reaches.
                check_meta(&m.meta);
            }
        }
        Kind::Close => {
            if let Ok(m) = Close::decode(b) {
                let e = m.encode();
                round_trip(kind, b, &m, &e, Close::decode(&e));
            }
        }
    }
}

// ---------------------------------------------------------------------------
// file_meta
// ---------------------------------------------------------------------------

/// Mode bits of [`file_meta`] (its first byte).
pub mod meta_mode {
    /// Set: the rest is a path with a mode and time, encoded by the
    /// harness; clear: the rest is metadata bytes for `FileMeta::decode`.
    pub const PATH: u8 = 1;
    /// Path mode: keep only the permission bits of the input's mode.
    pub const PERM_ONLY: u8 = 1 << 1;
    /// Path mode: keep the nanoseconds below one second.
    pub const NS_IN_RANGE: u8 = 1 << 2;
}

/// `FileMeta::decode` on metadata bytes, or `safe_relative` on a path and
/// `FileMeta::encode` then `decode` with it ([`meta_mode`]); both against a
/// plain reading of their rules.
pub fn file_meta(data: &[u8]) {
    let mut inp = Input::new(data);
    let mode = inp.u8();
    if mode & meta_mode::PATH == 0 {
        check_meta(inp.rest());
        return;
    }
    let mut perm = inp.u32();
    if mode & meta_mode::PERM_ONLY != 0 {
        perm &= 0o777;
    }
    let mtime_s = inp.u64() as i64;
    let mut mtime_ns = inp.u32();
    if mode & meta_mode::NS_IN_RANGE != 0 {
        mtime_ns %= 1_000_000_000;
    }
    let path = String::from_utf8_lossy(inp.rest()).into_owned();
    let safe = check_path(&path);
    let m = FileMeta {
        path,
        mode: perm,
        mtime_s,
        mtime_ns,
    };
    let valid = safe && perm & !0o777 == 0 && mtime_ns < 1_000_000_000;
    let e = m.encode();
    match FileMeta::decode(&e) {
        Ok(d) => {
            assert!(valid, "decode accepted invalid metadata {m:?}");
            assert_eq!(d, m, "file metadata did not round-trip");
        }
        Err(err) => assert!(!valid, "decode refused valid metadata {m:?}: {err}"),
    }
}

/// `FileMeta::decode` on `b`, against a plain reading of the format; what
/// it accepts encodes back to `b`, and its path is safe.
fn check_meta(b: &[u8]) {
    let want = ref_meta_ok(b);
    match FileMeta::decode(b) {
        Ok(m) => {
            assert!(want, "decode accepted metadata the format forbids: {m:?}");
            assert_eq!(m.mode & !0o777, 0, "a set-id, sticky or unknown mode bit");
            assert!(m.mtime_ns < 1_000_000_000);
            let e = m.encode();
            assert_eq!(
                e, b,
                "{m:?} encodes to other bytes than it was decoded from"
            );
            assert_eq!(FileMeta::decode(&e).as_ref(), Ok(&m));
            assert!(check_path(&m.path), "decode accepted an unsafe path");
        }
        Err(e) => assert!(!want, "decode refused well-formed metadata: {e}"),
    }
}

/// A plain reading of the metadata format (`files::FileMeta`): version 1,
/// mode (permission bits only), seconds, nanoseconds (below one second), path
/// length, then exactly that much UTF-8 path, which must be safe.
fn ref_meta_ok(b: &[u8]) -> bool {
    if b.len() < 19 || b[0] != 1 {
        return false;
    }
    let mode = u32::from_le_bytes([b[1], b[2], b[3], b[4]]);
    let ns = u32::from_le_bytes([b[13], b[14], b[15], b[16]]);
    let n = usize::from(u16::from_le_bytes([b[17], b[18]]));
    if b.len() != 19 + n || mode > 0o777 || ns >= 1_000_000_000 {
        return false;
    }
    std::str::from_utf8(&b[19..]).is_ok_and(|p| ref_safe_relative(p).is_some())
}

/// `files::safe_relative` on `path`, against [`ref_safe_relative`]; checks
/// that what it accepts stays inside its root. Returns whether it accepted.
fn check_path(path: &str) -> bool {
    let got = files::safe_relative(path);
    let want = ref_safe_relative(path);
    assert_eq!(
        got.as_ref().ok(),
        want.as_ref(),
        "safe_relative({path:?}) is {got:?}"
    );
    let Ok(parts) = got else {
        return false;
    };
    assert!(!parts.is_empty(), "{path:?}: accepted with no component");
    assert!(path.len() <= MAX_PATH_LEN, "a path of {} bytes", path.len());
    assert!(
        !path.starts_with('/') && !Path::new(path).is_absolute(),
        "absolute path {path:?} accepted"
    );
    assert!(!path.contains('\0'), "{path:?}: a NUL byte accepted");
    for p in &parts {
        assert!(
            !p.is_empty() && *p != "." && *p != ".." && !p.contains(['/', '\0']),
            "{path:?}: component {p:?} accepted"
        );
    }
    // Joined under a root, one component per part, all below the root.
    let root = Path::new("/fuzz-root");
    let mut joined = PathBuf::from(root);
    for p in &parts {
        joined.push(p);
    }
    assert!(joined.starts_with(root), "{path:?} leaves its root");
    assert_eq!(
        joined.components().count(),
        root.components().count() + parts.len(),
        "{path:?}: a component is not one path component"
    );
    true
}

/// A plain reading of `safe_relative`'s rules: not empty, at most
/// [`MAX_PATH_LEN`] bytes, no NUL, not absolute, no `..`, and at least one
/// name once empty and `.` components are dropped (those are the parts).
fn ref_safe_relative(path: &str) -> Option<Vec<&str>> {
    if path.is_empty() || path.len() > MAX_PATH_LEN || path.contains('\0') || path.starts_with('/')
    {
        return None;
    }
    if path.split('/').any(|s| s == "..") {
        return None;
    }
    let parts: Vec<&str> = path
        .split('/')
        .filter(|s| !s.is_empty() && *s != ".")
        .collect();
    (!parts.is_empty()).then_some(parts)
}

// ---------------------------------------------------------------------------
// tree_digest
// ---------------------------------------------------------------------------

/// Longest region of [`tree_digest`].
pub const MAX_REGION: u64 = 4 << 20;
/// Most bytes passed to `record` by one input (bounds one execution).
pub const MAX_RECORDED: u64 = 16 << 20;
/// Most writes of one input.
pub const MAX_WRITES: usize = 48;
/// Longest write (outside the region, its bytes are [`junk`]).
pub const MAX_WRITE: u64 = 2 * MAX_REGION;

/// How [`tree_digest`] reads the region length (its first byte, modulo 4).
pub mod region_shape {
    /// A u16 modulo 4097: one BLAKE3 chunk or a few (the root case).
    pub const SMALL: u8 = 0;
    /// A u32 modulo `MAX_REGION + 1`.
    pub const ANY: u8 = 1;
    /// 1 to 4 MiB (a byte), give or take an i16: the sender's 1 MiB cuts.
    pub const MIB: u8 = 2;
    /// A power of two from 1 KiB to 4 MiB (a byte: 10 + b % 13 as the
    /// log), plus one of [`super::POW2_ADJUST`] (a byte).
    pub const POW2: u8 = 3;
}

/// What [`region_shape::POW2`] adds to its power of two.
pub const POW2_ADJUST: [i64; 5] = [0, -1, 1, -1024, 1024];

/// Write kinds of [`tree_digest`] (the write's first byte, modulo 4; its
/// upper bits are arguments).
pub mod write_op {
    /// A power-of-two piece (a byte: log 10 + b % 13) at a multiple of its
    /// length (a byte); cut at the region's end unless [`NO_CLIP`] is set.
    pub const ALIGNED: u8 = 0;
    /// The k-th (a byte) piece of a fixed cut (bits 2..4 of the op pick it
    /// from [`super::CUTS`]), the last one shorter: what a sender does.
    pub const CUT: u8 = 1;
    /// An offset (u16 shifted by a byte mod 24) and length (u16 shifted by a
    /// byte mod 8): mostly unaligned, partly outside.
    pub const ANY: u8 = 2;
    /// An offset from [`super::HOSTILE_OFFSETS`] (a byte) and a length
    /// (a u16 shifted by a byte mod 8): near the region's end or `u64::MAX`.
    pub const HOSTILE: u8 = 3;
    /// Flag of [`ALIGNED`]: keep the full length past the region's end.
    pub const NO_CLIP: u8 = 1 << 7;
}

/// Chunk lengths of [`write_op::CUT`].
pub const CUTS: [u64; 4] = [64 << 10, 256 << 10, 1 << 20, 1_000_000];

/// Offsets of [`write_op::HOSTILE`], as functions of the region length.
pub const HOSTILE_OFFSETS: [fn(u64) -> u64; 8] = [
    |_| u64::MAX,
    |_| u64::MAX - 1023,
    |_| u64::MAX - (1 << 20) + 1,
    |_| 1 << 63,
    |len| len,
    |len| len + 1024,
    |len| len.saturating_sub(1024),
    |len| len & !1023,
];

/// `PieceDigest` over a region made from the input: a length
/// ([`region_shape`]), a byte seeding its content, then writes
/// ([`write_op`]) recorded in input order, each with the region's true bytes
/// when it lies inside the region and with [`junk`] otherwise (the contract
/// of `record`: its data is what was written there); an odd content byte
/// leaves the length unannounced until `finish`. `finish`, reading the
/// true bytes, must give `blake3::hash` of the region, read only inside it,
/// at most its length in all; and a failing reader's error must reach the
/// caller.
pub fn tree_digest(data: &[u8]) {
    let mut inp = Input::new(data);
    let len = region_len(&mut inp);
    let mut region = vec![0u8; len as usize];
    let seed = inp.u8();
    Rng::new(u64::from(seed)).fill_bytes(&mut region);
    // An odd seed digests it as an ordered region (length known at the end).
    let d = PieceDigest::new((seed & 1 == 0).then_some(len));
    let mut budget = MAX_RECORDED;
    for _ in 0..MAX_WRITES {
        if inp.is_empty() {
            break;
        }
        let (offset, n) = write_range(&mut inp, len);
        let n = n.min(budget).min(MAX_WRITE);
        budget -= n;
        let inside = offset.checked_add(n).is_some_and(|end| end <= len);
        let bytes = if inside {
            &region[offset as usize..(offset + n) as usize]
        } else {
            &junk()[..n as usize]
        };
        d.record(offset, bytes);
    }
    let mut read = 0u64;
    let got = d
        .finish(len, |offset, buf| {
            let end = offset
                .checked_add(buf.len() as u64)
                .filter(|&end| end <= len)
                .unwrap_or_else(|| {
                    panic!(
                        "finish read {} bytes at {offset}, past the region of {len}",
                        buf.len()
                    )
                });
            buf.copy_from_slice(&region[offset as usize..end as usize]);
            read += buf.len() as u64;
            Ok(())
        })
        .unwrap_or_else(|e| panic!("finish failed with a reader that never fails: {e}"));
    assert_eq!(
        got,
        blake3::hash(&region),
        "the assembled digest of a region of {len} bytes is not its BLAKE3"
    );
    assert!(
        read <= len,
        "finish read back {read} bytes of a region of {len}"
    );
    // The pieces are spent: a second finish reads, and a reader's error
    // reaches the caller.
    let e = d.finish(len, |_, _| Err("reader failed".to_string()));
    assert_eq!(e, Err("reader failed".to_string()));
}

fn region_len(inp: &mut Input<'_>) -> u64 {
    match inp.u8() % 4 {
        region_shape::SMALL => u64::from(inp.u16()) % 4097,
        region_shape::ANY => u64::from(inp.u32()) % (MAX_REGION + 1),
        region_shape::MIB => {
            let mib = 1 + u64::from(inp.u8() % 4);
            let delta = i64::from(inp.u16() as i16);
            (mib << 20).saturating_add_signed(delta).min(MAX_REGION)
        }
        _ => {
            let log = 10 + inp.u8() % 13;
            let adjust = POW2_ADJUST[usize::from(inp.u8()) % POW2_ADJUST.len()];
            (1u64 << log).saturating_add_signed(adjust).min(MAX_REGION)
        }
    }
}

/// The next write's offset and length (the length not yet bounded).
fn write_range(inp: &mut Input<'_>, len: u64) -> (u64, u64) {
    let op = inp.u8();
    match op % 4 {
        write_op::ALIGNED => {
            let n = 1u64 << (10 + inp.u8() % 13);
            let offset = u64::from(inp.u8()) * n;
            let n = if op & write_op::NO_CLIP == 0 && offset < len {
                n.min(len - offset)
            } else {
                n
            };
            (offset, n)
        }
        write_op::CUT => {
            let cut = CUTS[usize::from(op >> 2) % CUTS.len()];
            let offset = u64::from(inp.u8()) * cut;
            let n = if offset < len {
                cut.min(len - offset)
            } else {
                cut
            };
            (offset, n)
        }
        write_op::ANY => {
            let offset = u64::from(inp.u16()) << (inp.u8() % 24);
            let n = u64::from(inp.u16()) << (inp.u8() % 8);
            (offset, n)
        }
        _ => {
            let offset = HOSTILE_OFFSETS[usize::from(inp.u8()) % HOSTILE_OFFSETS.len()](len);
            let n = u64::from(inp.u16()) << (inp.u8() % 8);
            (offset, n)
        }
    }
}

/// What a write outside the region carries: [`MAX_WRITE`] bytes that are
/// not the region's.
pub fn junk() -> &'static [u8] {
    static JUNK: OnceLock<Vec<u8>> = OnceLock::new();
    JUNK.get_or_init(|| {
        let mut v = vec![0u8; MAX_WRITE as usize];
        Rng::new(0x6a75_6e6b).fill_bytes(&mut v);
        v
    })
}
