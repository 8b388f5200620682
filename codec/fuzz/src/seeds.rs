//! Seed inputs of every target, made deterministically from the encoder.
//!
//! `cargo run --manifest-path codec/fuzz/Cargo.toml --example make_seeds`
//! writes them to `codec/fuzz/seeds/<target>/`; `tests/replay.rs` replays
//! both the committed files and a fresh [`all`] (the committed ones may lag
//! behind the encoder; they stay valid inputs either way).

use dwcp_codec::corpus::{self, ClassMix, PageClass, Rng};
use dwcp_codec::{
    Baseline, CodecConfig, Decoder, Encoder, PageRef, PageSize, Policy, SessionKey, delta,
};

use crate::{
    LIMITS, MODE_RAW, MODE_SEALED, MODE_STRUCTURED, Pages, SEALED_STATE_LIMITS, fuzz_key,
    sealed_baseline, sealed_baseline_pages, sealed_config,
};

/// One seed input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seed {
    /// The target it feeds (a name of [`crate::TARGETS`]).
    pub target: &'static str,
    /// File name.
    pub name: String,
    /// The input.
    pub data: Vec<u8>,
}

/// The pages of a small three-frame session: fresh pages, then dirtied
/// versions (deltas), duplicates (references) and a zero run, then zeroed
/// pages, unchanged pages and a baseline page.
pub fn session_pages(seed: u64) -> Vec<Pages> {
    let c = corpus::generate(8 * 4096, ClassMix::STANDARD, seed);
    let first: Pages = (0..8).map(|i| (i as u64, c.page(i).to_vec())).collect();
    let mut rng = Rng::new(seed ^ 0xd1);
    let mut second: Pages = first
        .iter()
        .map(|(i, p)| {
            let mut p = p.clone();
            if !dwcp_codec::is_zero(&p) {
                corpus::dirty_page(&mut rng, &mut p);
            }
            (*i, p)
        })
        .collect();
    let nonzero = first
        .iter()
        .find(|(_, p)| !dwcp_codec::is_zero(p))
        .map_or_else(|| vec![7u8; 4096], |(_, p)| p.clone());
    second.push((100, nonzero.clone()));
    second.push((101, nonzero));
    second.push((102, vec![0; 4096]));
    second.push((103, vec![0; 4096]));
    let mut third: Pages = (0..4).map(|i| (i, vec![0u8; 4096])).collect();
    third.extend(second[4..8].iter().cloned());
    third.push((200, sealed_baseline_pages()[0].clone()));
    vec![first, second, third]
}

/// Encodes `frames` in one session (the receiver holding
/// [`sealed_baseline`] when `baseline`); returns the frames, after checking
/// that a decoder of the same configuration takes them.
pub fn encode_session(
    config: &CodecConfig,
    policy: Policy,
    baseline: bool,
    frames: &[Pages],
) -> Vec<Vec<u8>> {
    let mut enc = Encoder::new(config, policy).expect("valid policy");
    let mut dec = Decoder::with_limits(config, LIMITS);
    if baseline {
        enc.set_baseline(sealed_baseline().advertise())
            .expect("same page size");
        dec.set_baseline(sealed_baseline()).expect("same page size");
    }
    encode_with(&mut enc, &mut dec, frames)
}

/// Encodes `frames` with `enc`, checking that `dec` takes each one.
fn encode_with(enc: &mut Encoder, dec: &mut Decoder, frames: &[Pages]) -> Vec<Vec<u8>> {
    frames
        .iter()
        .map(|pages| {
            let refs: Vec<PageRef<'_>> = pages
                .iter()
                .map(|(index, data)| PageRef {
                    index: *index,
                    data,
                })
                .collect();
            let mut out = Vec::new();
            enc.encode_pages(&refs, &mut out).expect("encodes");
            dec.decode_pages(&out).expect("decodes");
            out
        })
        .collect()
}

fn chunk_frame(policy: Policy, key: Option<SessionKey>, data: &[u8], seq: u64) -> Vec<u8> {
    let config = CodecConfig {
        key,
        ..CodecConfig::default()
    };
    let mut enc = Encoder::new(&config, policy).expect("valid policy");
    let mut out = Vec::new();
    enc.encode_chunk(data, seq, &mut out).expect("encodes");
    out
}

/// Length-prefixed bodies (frames without their checksum) for the sealed
/// mode.
fn bodies(frames: &[Vec<u8>]) -> Vec<u8> {
    let mut out = Vec::new();
    for f in frames {
        let body = &f[..f.len() - dwcp_codec::frame::CHECKSUM_LEN];
        let n = u16::try_from(body.len()).expect("seed frames are small");
        out.extend_from_slice(&n.to_le_bytes());
        out.extend_from_slice(body);
    }
    out
}

fn text(len: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; len];
    corpus::fill_page(PageClass::Text, &mut Rng::new(seed), &mut v);
    v
}

// Structured page_frames sessions. After the mode byte: c0 (page size,
// state limit), c1 (key, baseline, policy), the number of frames - 1; per
// frame a header byte (pages, policy switch) and per page its content op and
// arguments, then its index op and arguments; then the frame to mutate, the
// edits - 1, each edit (op, u32 position, value), and whether to re-seal.
// See `gen_page` and `gen_index` in lib.rs.

#[rustfmt::skip]
const STRUCTURED_SESSION: &[u8] = &[
    5, // 1 MiB of state, 4 KiB pages
    1, // datacenter
    2, // three frames
    5, // frame 0: five pages at indices 0..5
        1, 10, 0, // text (seed 10)
        2, 11, 0, // code
        0, 0, // zero
        3, 12, 0, // random
        7, 0x41, 3, 0, 9, 0, // a constant page with one other byte
    3, // frame 1: three pages
        5, 0, 2, 18, 0, // page 0 dirtied (seed 2), as page 0: a delta
        4, 1, 18, 1, // page 1 again, unchanged: a reference
        5, 3, 3, 0x10, 0, 0x20, 0x11, 0, 0x21, 18, 3, // page 3, two bytes edited
    2, // frame 2: two pages
        0, 18, 0, // page 0 becomes zero
        5, 4, 6, 24, 77, // the constant page dirtied, as page 77
    1, 0, 7, 0x30, 0, 0, 0, 4, 0, // flip a byte of frame 1's body
];

#[rustfmt::skip]
const STRUCTURED_RESEALED_BASELINE: &[u8] = &[
    4, // 32 pages of state
    0x40 | 0x08 | 5, // a baseline of two pages, internet
        1, 2, // the baseline pages' seeds
    1, // two frames
    2, // frame 0: two pages
        6, 0, 0, // the first baseline page
        1, 44, 0, // text
    0x80, 0, // frame 1: two pages, policy switched to stored
        5, 1, 2, 18, 1, // page 1 dirtied: a delta
        4, 0, 24, 9, // the baseline page again, as page 9
    1, 0, 7, 0, 0, 0, 0, 1, 1, // flip a byte of frame 1's table, re-seal
];

#[rustfmt::skip]
const STRUCTURED_KEYED_8K_ZERO_RUNS: &[u8] = &[
    0xe0 | 3, // 8 KiB pages, 8 pages of state
    0x80 | 5, // keyed, internet
    1, // two frames
    4, // frame 0: pages u64::MAX - 3 ..= u64::MAX
        0, 28, 3, // zero
        0, 0, // zero
        1, 0x99, 0, // text
        0, 0, // zero
    2, // frame 1
        5, 2, 1, 0x10, 0, 0x33, 18, 2, // the text page, one byte edited
        0, 18, 2, // then zero (the last version wins)
    0, 0, 3, 0x10, 0, 0, 0, 0, 0, // truncate frame 0
];

/// Every seed, in a fixed order.
pub fn all() -> Vec<Seed> {
    let mut out = Vec::new();
    let mut add = |target: &'static str, name: &str, data: Vec<u8>| {
        out.push(Seed {
            target,
            name: name.to_string(),
            data,
        });
    };
    let pages = session_pages(1);

    // page_frames, raw: whole sessions, as a reader would receive them.
    for (name, policy) in [
        ("raw-datacenter", Policy::Datacenter),
        ("raw-internet", Policy::internet()),
        ("raw-stored", Policy::Stored),
    ] {
        let frames = encode_session(&CodecConfig::default(), policy, false, &pages);
        let mut data = vec![MODE_RAW];
        data.extend(frames.concat());
        add("page_frames", name, data);
    }
    // page_frames, raw: a session whose frames carry no checksum (as a
    // migration sends them inside verified regions).
    {
        let mut enc = Encoder::new(&CodecConfig::default(), Policy::Datacenter).expect("valid");
        enc.set_page_checksums(false);
        let mut dec = Decoder::with_limits(&CodecConfig::default(), LIMITS);
        dec.accept_unchecked(true);
        let mut data = vec![MODE_RAW];
        data.extend(encode_with(&mut enc, &mut dec, &pages).concat());
        add("page_frames", "raw-unchecked", data);
    }
    // page_frames, sealed: bodies of sessions of each sealed configuration.
    for (name, cfg, policy) in [
        ("sealed-datacenter", 3, Policy::Datacenter),
        ("sealed-stored-small-state", 1, Policy::Stored),
        (
            "sealed-keyed-internet",
            2 | sealed_config::KEYED,
            Policy::internet(),
        ),
        (
            "sealed-baseline",
            3 | sealed_config::BASELINE,
            Policy::Datacenter,
        ),
        ("sealed-no-state", 0, Policy::Datacenter),
    ] {
        let config = CodecConfig {
            page_size: PageSize::DEFAULT,
            state_limit: SEALED_STATE_LIMITS[usize::from(cfg & sealed_config::STATE_MASK)],
            key: (cfg & sealed_config::KEYED != 0).then(fuzz_key),
        };
        let baseline = cfg & sealed_config::BASELINE != 0;
        let frames = encode_session(&config, policy, baseline, &pages);
        let mut data = vec![MODE_SEALED, cfg];
        data.extend(bodies(&frames));
        add("page_frames", name, data);
    }
    // page_frames, structured: hand-written sessions.
    for (name, script) in [
        ("structured-session", STRUCTURED_SESSION),
        ("structured-resealed-baseline", STRUCTURED_RESEALED_BASELINE),
        (
            "structured-keyed-8k-zero-runs",
            STRUCTURED_KEYED_8K_ZERO_RUNS,
        ),
    ] {
        let mut data = vec![MODE_STRUCTURED];
        data.extend_from_slice(script);
        add("page_frames", name, data);
    }

    // chunk_frames.
    let chunk = text(3000, 5);
    let frames = [
        chunk_frame(Policy::Datacenter, None, &chunk, 1),
        chunk_frame(Policy::internet(), None, &chunk, 2),
        chunk_frame(Policy::Stored, None, &chunk[..300], 3),
        chunk_frame(Policy::Datacenter, None, &[], 4),
    ];
    let mut data = vec![MODE_RAW];
    data.extend(frames.concat());
    add("chunk_frames", "raw-chunks", data);
    let mut data = vec![MODE_SEALED, 0];
    data.extend(bodies(&frames));
    add("chunk_frames", "sealed-chunks", data);
    let keyed = [chunk_frame(
        Policy::internet(),
        Some(fuzz_key()),
        &chunk,
        u64::MAX,
    )];
    let mut data = vec![MODE_SEALED, sealed_config::KEYED];
    data.extend(bodies(&keyed));
    add("chunk_frames", "sealed-keyed-chunk", data);
    for (name, c, repeat) in [
        ("structured-datacenter", 1u8, 2u8),
        ("structured-keyed-internet", 0x80 | 5, 3),
    ] {
        let mut data = vec![MODE_STRUCTURED, c];
        data.extend(7u64.to_le_bytes());
        data.push(repeat);
        data.extend(200u16.to_le_bytes());
        data.extend(&chunk[..200]);
        data.extend([1, 7, 0x10, 0, 0, 0, 0x20, 1]);
        add("chunk_frames", name, data);
    }

    // delta_apply: a real delta against the harness's old page (selector 0:
    // 4096 bytes of text from Rng seed 9), and round-trip scripts.
    let mut old = vec![0u8; 4096];
    corpus::fill_page(PageClass::Text, &mut Rng::new(9), &mut old);
    let mut new = old.clone();
    corpus::dirty_page(&mut Rng::new(3), &mut new);
    let mut d = Vec::new();
    delta::encode(&old, &new, &mut d, usize::MAX).expect("no cap");
    let mut data = vec![0, 0, 9];
    data.extend(5u64.to_le_bytes());
    data.extend(&d);
    add("delta_apply", "apply-counters", data);
    let mut data = vec![0, 0, 9];
    data.extend(5u64.to_le_bytes());
    data.extend([0x80, 0x20, 0x03, 1, 2, 3, 0x00, 0x01, 0xff]);
    add("delta_apply", "apply-handmade", data);
    add(
        "delta_apply",
        "roundtrip-counters",
        vec![1, 0, 9, 0, 3, 0, 0],
    );
    add(
        "delta_apply",
        "roundtrip-edits-capped",
        vec![1, 4, 2, 1, 3, 0x10, 0, 1, 0x20, 0, 2, 0xff, 0x0f, 1, 2],
    );
    add(
        "delta_apply",
        "roundtrip-short-page",
        vec![1, 2, 40, 7, 3, 1, 2, 3, 4, 5, 6, 7, 8, 3, 5, 0],
    );

    // baseline_advert.
    let mut data = vec![0, 3];
    data.extend(sealed_baseline().advertise().to_bytes());
    add("baseline_advert", "advert", data);
    let mut data = vec![0, 2];
    let mut b8 = Baseline::new(PageSize::new(8192).expect("valid"));
    b8.insert(&text(8192, 4)).expect("page size");
    data.extend(b8.advertise().to_bytes());
    add("baseline_advert", "advert-8k", data);
    add(
        "baseline_advert",
        "pages",
        vec![1, 0, 6, 2, 7, 6, 8, 0, 1, 10, 9, 5],
    );
    add("baseline_advert", "pages-8k", vec![1, 1, 3, 10, 4, 0, 1]);

    // frame_header.
    let page = encode_session(
        &CodecConfig::default(),
        Policy::Datacenter,
        false,
        &pages[..1],
    );
    add("frame_header", "page-frame", page[0].clone());
    add(
        "frame_header",
        "page-frame-header",
        page[0][..dwcp_codec::frame::HEADER_LEN].to_vec(),
    );
    add("frame_header", "chunk-frame", frames[0].clone());
    add("frame_header", "stored-chunk-frame", frames[2].clone());

    // lz4_block: raw blocks (mode 0, a u16 output size, the block), and
    // mode 1's ops building text that lz4_flex compresses.
    add(
        "lz4_block",
        "raw-literals",
        b"\x00\x05\x00\x50hello".to_vec(),
    );
    add(
        "lz4_block",
        "raw-overlap",
        vec![0x00, 0x14, 0x00, 0x1f, b'a', 0x01, 0x00, 0x00],
    );
    let mut data = b"\x01\x10\x41\x21\x05\x02\x1f".to_vec();
    data.extend(b"the quick brown fox jumps over the lazy dog".repeat(3));
    add("lz4_block", "structured-text", data);
    out
}
