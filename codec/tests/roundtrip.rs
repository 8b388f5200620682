//! Round trips over random mixes of page kinds, under every policy, with the
//! state evolving over many frames on both sides; corruption and misuse.

use dwcp_codec::frame::{FLAG_KEYED, FLAG_UNCHECKED, FrameHeader};
use dwcp_codec::{
    Baseline, ChunkDigest, CodecConfig, DecodeError, DecodedPage, Decoder, Encoder, PageRef,
    PageSize, Policy, SessionKey,
};
use proptest::prelude::*;

const PS: usize = 4096;

/// How one page of a generated frame is made.
#[derive(Debug, Clone)]
enum Gen {
    Zero,
    Random(u64),
    Text(u64),
    /// Same content as an earlier page of the history (index into it).
    Dup(usize),
    /// An earlier page with a few words changed.
    Edit(usize, Vec<(u16, u8)>),
    /// A page of the baseline image.
    Base(usize),
}

fn fill(seed: u64, text: bool) -> Vec<u8> {
    let mut x = seed | 1;
    let mut v = vec![0u8; PS];
    let words: [&[u8]; 6] = [b"page ", b"dirty ", b"vcpu ", b"round ", b"the ", b"copy "];
    if text {
        let mut i = 0;
        while i < PS {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let w = words[(x % 6) as usize];
            let n = w.len().min(PS - i);
            v[i..i + n].copy_from_slice(&w[..n]);
            i += n;
        }
    } else {
        for b in &mut v {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
    }
    v
}

fn gen_strategy() -> impl Strategy<Value = Gen> {
    prop_oneof![
        3 => Just(Gen::Zero),
        2 => any::<u64>().prop_map(Gen::Random),
        2 => any::<u64>().prop_map(Gen::Text),
        2 => any::<usize>().prop_map(Gen::Dup),
        3 => (any::<usize>(), proptest::collection::vec((0u16..4096, any::<u8>()), 1..12))
            .prop_map(|(i, e)| Gen::Edit(i, e)),
        1 => any::<usize>().prop_map(Gen::Base),
    ]
}

fn policies() -> Vec<Policy> {
    vec![
        Policy::Stored,
        Policy::Datacenter,
        Policy::internet(),
        Policy::Auto {
            link_bytes_per_sec: 1e9 / 8.0,
        },
        Policy::Auto {
            link_bytes_per_sec: 100e9 / 8.0,
        },
    ]
}

/// Runs frames through an encoder/decoder pair and checks every page.
fn run(frames: &[Vec<(u64, Gen)>], policy: Policy, state_limit: usize, key: Option<SessionKey>) {
    run_with(frames, policy, state_limit, key, None, true);
}

/// [`run`], the decoder first adopting `arena` as its state's memory, the
/// page frames with or without their checksums.
fn run_with(
    frames: &[Vec<(u64, Gen)>],
    policy: Policy,
    state_limit: usize,
    key: Option<SessionKey>,
    arena: Option<Vec<u8>>,
    checksums: bool,
) {
    let base_img: Vec<u8> = (0..4u64).flat_map(|s| fill(1000 + s, s % 2 == 0)).collect();
    let baseline = Baseline::from_image(PageSize::DEFAULT, &base_img).unwrap();
    let config = CodecConfig {
        page_size: PageSize::DEFAULT,
        state_limit,
        key,
    };
    let mut enc = Encoder::new(&config, policy).unwrap();
    enc.set_page_checksums(checksums);
    enc.set_baseline(baseline.advertise()).unwrap();
    let mut dec = Decoder::new(&config);
    dec.accept_unchecked(!checksums);
    if let Some(a) = arena {
        assert!(dec.adopt_arena(a).is_ok(), "a fresh decoder takes an arena");
    }
    dec.set_baseline(baseline).unwrap();
    let mut history: Vec<Vec<u8>> = vec![fill(1, false)];
    let mut frame = Vec::new();
    for f in frames {
        let mut contents = Vec::new();
        for (_, g) in f {
            let c = match g {
                Gen::Zero => vec![0u8; PS],
                Gen::Random(s) => fill(*s, false),
                Gen::Text(s) => fill(*s, true),
                Gen::Dup(i) => history[i % history.len()].clone(),
                Gen::Edit(i, edits) => {
                    let mut c = history[i % history.len()].clone();
                    for &(p, v) in edits {
                        c[p as usize] ^= v | 1;
                    }
                    c
                }
                Gen::Base(i) => base_img[(i % 4) * PS..(i % 4 + 1) * PS].to_vec(),
            };
            history.push(c.clone());
            contents.push(c);
        }
        let pages: Vec<PageRef<'_>> = f
            .iter()
            .zip(&contents)
            .map(|((idx, _), c)| PageRef {
                index: *idx,
                data: c,
            })
            .collect();
        let stats = enc.encode_pages(&pages, &mut frame).unwrap();
        assert_eq!(stats.frame_bytes as usize, frame.len());
        assert_eq!(FrameHeader::peek(&frame).unwrap().unchecked(), !checksums);
        assert!(enc.state_bytes() <= state_limit);
        let decoded = dec.decode_pages(&frame).unwrap();
        assert_eq!(decoded.stats.raw, stats.raw);
        assert_eq!(decoded.stats.delta, stats.delta);
        assert_eq!(decoded.stats.reference, stats.reference);
        let mut got: Vec<(u64, Vec<u8>)> = Vec::new();
        for p in decoded.iter() {
            match p {
                DecodedPage::Zero { first, count } => {
                    for k in 0..count {
                        got.push((first + k, vec![0u8; PS]));
                    }
                }
                DecodedPage::Data { index, bytes } => got.push((index, bytes.to_vec())),
            }
        }
        let mut want: Vec<(u64, Vec<u8>)> =
            pages.iter().map(|p| (p.index, p.data.to_vec())).collect();
        assert_eq!(got.len(), want.len());
        // The encoder may reorder a batch whose indices are all distinct; a
        // batch that repeats an index keeps its order (the last one wins).
        let mut idx: Vec<u64> = want.iter().map(|w| w.0).collect();
        idx.sort_unstable();
        idx.dedup();
        if idx.len() == want.len() {
            got.sort_by_key(|g| g.0);
            want.sort_by_key(|w| w.0);
        }
        for (g, w) in got.iter().zip(&want) {
            assert_eq!(g.0, w.0);
            assert!(g.1 == w.1, "page {} differs", w.0);
        }
        assert!(dec.state_bytes() <= state_limit);
        assert_eq!(dec.state_bytes(), enc.state_bytes());
    }
}

fn frames_strategy() -> impl Strategy<Value = Vec<Vec<(u64, Gen)>>> {
    proptest::collection::vec(
        proptest::collection::vec((0u64..48, gen_strategy()), 0..24),
        1..10,
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn round_trip_every_policy(frames in frames_strategy(), p in 0usize..5) {
        run(&frames, policies()[p], 64 << 20, None);
    }

    #[test]
    fn round_trip_small_state_evicts_in_step(frames in frames_strategy(), pages in 0usize..20, p in 0usize..5) {
        run(&frames, policies()[p], pages * PS + (pages % 3) * 100, None);
    }

    #[test]
    fn round_trip_with_an_adopted_arena_of_garbage(
        frames in frames_strategy(),
        pages in 0usize..40,
        size in 0usize..3,
        p in 0usize..5,
    ) {
        // Smaller than the state, as large, or larger; its bytes are noise.
        let limit = pages * PS + 100;
        let len = [limit / 3, limit, 2 * limit + 5][size];
        run_with(&frames, policies()[p], limit, None, Some(vec![0xa5; len]), true);
    }

    #[test]
    fn round_trip_without_page_checksums(frames in frames_strategy(), p in 0usize..5, keyed: bool) {
        let key = keyed.then_some(SessionKey([7; 32]));
        run_with(&frames, policies()[p], 1 << 20, key, None, false);
    }

    #[test]
    fn round_trip_keyed(frames in frames_strategy()) {
        run(&frames, Policy::Datacenter, 1 << 20, Some(SessionKey([7; 32])));
    }

    #[test]
    fn sequential_runs(start in 0u64..1_000_000, zeros in 0usize..300) {
        let frames = vec![(0..zeros as u64).map(|i| (start + i, Gen::Zero))
            .chain([(start + zeros as u64, Gen::Text(3))]).collect::<Vec<_>>()];
        run(&frames, Policy::Datacenter, 1 << 20, None);
    }

    #[test]
    fn corrupted_frames_are_rejected_and_change_nothing(
        flips in proptest::collection::vec((any::<usize>(), 1u8..=255), 1..4),
    ) {
        let config = CodecConfig::default();
        let mut enc = Encoder::new(&config, Policy::Datacenter).unwrap();
        let mut dec = Decoder::new(&config);
        let a = fill(5, true);
        let mut b = a.clone();
        b[100] ^= 1;
        let mut f1 = Vec::new();
        enc.encode_pages(&[PageRef { index: 1, data: &a }, PageRef { index: 2, data: &[0; PS] }], &mut f1).unwrap();
        let mut f2 = Vec::new();
        enc.encode_pages(&[PageRef { index: 1, data: &b }], &mut f2).unwrap();
        let mut bad = f1.clone();
        for (pos, x) in &flips {
            let n = bad.len();
            bad[pos % n] ^= x;
        }
        if bad != f1 {
            prop_assert!(dec.decode_pages(&bad).is_err());
        }
        // Truncations and extensions are refused too.
        prop_assert!(dec.decode_pages(&f1[..f1.len() - 1 - flips[0].0 % (f1.len() - 1)]).is_err());
        let mut long = f1.clone();
        long.push(0);
        prop_assert!(dec.decode_pages(&long).is_err());
        // The good frames still decode, in order.
        prop_assert!(dec.decode_pages(&f1).is_ok());
        let d = dec.decode_pages(&f2).unwrap();
        prop_assert_eq!(d.stats.delta, 1);
        let got: Vec<_> = d.iter().collect();
        prop_assert_eq!(got, vec![DecodedPage::Data { index: 1, bytes: &b[..] }]);
    }

    #[test]
    fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        let mut dec = Decoder::new(&CodecConfig::default());
        let _ = dec.decode_pages(&bytes);
        let _ = dec.decode_chunk(&bytes);
    }

    #[test]
    fn chunks_round_trip(data in proptest::collection::vec(any::<u8>(), 0..5000), rep in 1usize..4, p in 0usize..5, seq: u64) {
        let config = CodecConfig::default();
        let mut enc = Encoder::new(&config, policies()[p]).unwrap();
        let mut dec = Decoder::new(&config);
        let data = data.repeat(rep);
        let mut f = Vec::new();
        enc.encode_chunk(&data, seq, &mut f).unwrap();
        let (s, got) = dec.decode_chunk(&f).unwrap();
        prop_assert_eq!(s, seq);
        prop_assert_eq!(got, &data[..]);
    }
}

#[test]
fn keys_must_agree() {
    let keyed = CodecConfig {
        key: Some(SessionKey([1; 32])),
        ..CodecConfig::default()
    };
    let other = CodecConfig {
        key: Some(SessionKey([2; 32])),
        ..CodecConfig::default()
    };
    let plain = CodecConfig::default();
    let page = fill(9, true);
    let mut f = Vec::new();
    Encoder::new(&keyed, Policy::Datacenter)
        .unwrap()
        .encode_pages(
            &[PageRef {
                index: 0,
                data: &page,
            }],
            &mut f,
        )
        .unwrap();
    assert!(matches!(
        Decoder::new(&plain).decode_pages(&f),
        Err(DecodeError::KeyMismatch { frame_keyed: true })
    ));
    assert!(matches!(
        Decoder::new(&other).decode_pages(&f),
        Err(DecodeError::BadChecksum)
    ));
    assert!(Decoder::new(&keyed).decode_pages(&f).is_ok());
    let mut g = Vec::new();
    Encoder::new(&plain, Policy::Datacenter)
        .unwrap()
        .encode_pages(
            &[PageRef {
                index: 0,
                data: &page,
            }],
            &mut g,
        )
        .unwrap();
    assert!(matches!(
        Decoder::new(&keyed).decode_pages(&g),
        Err(DecodeError::KeyMismatch { frame_keyed: false })
    ));
}

#[test]
fn a_page_frame_without_its_checksum_needs_a_decoder_told_so() {
    let page = fill(9, true);
    let pages = [PageRef {
        index: 3,
        data: &page,
    }];
    let keyed = CodecConfig {
        key: Some(SessionKey([1; 32])),
        ..CodecConfig::default()
    };
    let (mut checked, mut unchecked) = (Vec::new(), Vec::new());
    let mut enc = Encoder::new(&keyed, Policy::Datacenter).unwrap();
    enc.encode_pages(&pages, &mut checked).unwrap();
    let mut enc = Encoder::new(&keyed, Policy::Datacenter).unwrap();
    enc.set_page_checksums(false);
    let stats = enc.encode_pages(&pages, &mut unchecked).unwrap();
    // The same frame less its 32-byte checksum, flagged unchecked and not
    // keyed (there is nothing to key).
    assert_eq!(stats.frame_bytes as usize, unchecked.len());
    assert_eq!(unchecked.len() + 32, checked.len());
    let h = FrameHeader::peek(&unchecked).unwrap();
    assert_eq!(h.flags, FLAG_UNCHECKED);
    assert_eq!(h.frame_len(), unchecked.len() as u64);
    assert_eq!(unchecked[40..], checked[40..checked.len() - 32]);

    // Refused by default, without poisoning: the same decoder, once told,
    // decodes it, whatever its key.
    let mut dec = Decoder::new(&keyed);
    let e = dec.decode_pages(&unchecked).unwrap_err();
    assert_eq!(e, DecodeError::Unchecked);
    assert!(!e.poisons_state());
    dec.accept_unchecked(true);
    let got: Vec<_> = dec.decode_pages(&unchecked).unwrap().iter().collect();
    assert_eq!(
        got,
        vec![DecodedPage::Data {
            index: 3,
            bytes: &page[..]
        }]
    );
    // Checked frames still have theirs checked by such a decoder.
    let mut dec = Decoder::new(&keyed);
    dec.accept_unchecked(true);
    let mut bad = checked.clone();
    let n = bad.len();
    bad[n - 40] ^= 1;
    assert_eq!(
        dec.decode_pages(&bad).unwrap_err(),
        DecodeError::BadChecksum
    );
    assert!(dec.decode_pages(&checked).is_ok());

    // Unchecked with a key, or on a chunk frame, is no valid header.
    let mut both = unchecked.clone();
    both[8..10].copy_from_slice(&(FLAG_UNCHECKED | FLAG_KEYED).to_le_bytes());
    assert!(matches!(
        FrameHeader::peek(&both),
        Err(DecodeError::Reserved { field: "flags", .. })
    ));
    let mut chunk = Vec::new();
    Encoder::new(&CodecConfig::default(), Policy::Stored)
        .unwrap()
        .encode_chunk(b"abc", 0, &mut chunk)
        .unwrap();
    chunk[8..10].copy_from_slice(&FLAG_UNCHECKED.to_le_bytes());
    assert!(matches!(
        FrameHeader::peek(&chunk),
        Err(DecodeError::Reserved { field: "flags", .. })
    ));
}

#[test]
fn frames_must_come_in_order() {
    let config = CodecConfig::default();
    let mut enc = Encoder::new(&config, Policy::Datacenter).unwrap();
    let mut dec = Decoder::new(&config);
    let page = fill(3, true);
    let (mut f0, mut f1) = (Vec::new(), Vec::new());
    enc.encode_pages(
        &[PageRef {
            index: 0,
            data: &page,
        }],
        &mut f0,
    )
    .unwrap();
    enc.encode_pages(
        &[PageRef {
            index: 1,
            data: &page,
        }],
        &mut f1,
    )
    .unwrap();
    assert!(matches!(
        dec.decode_pages(&f1),
        Err(DecodeError::OutOfSequence {
            found: 1,
            expected: 0
        })
    ));
    dec.decode_pages(&f0).unwrap();
    // Replaying a frame is refused.
    assert!(matches!(
        dec.decode_pages(&f0),
        Err(DecodeError::OutOfSequence { .. })
    ));
    let d = dec.decode_pages(&f1).unwrap();
    assert_eq!(d.stats.reference, 1);
}

#[test]
fn wrong_page_size_and_bad_input() {
    let config = CodecConfig::default();
    let mut enc = Encoder::new(&config, Policy::Datacenter).unwrap();
    let mut f = Vec::new();
    assert!(
        enc.encode_pages(
            &[PageRef {
                index: 0,
                data: &[1; 100]
            }],
            &mut f
        )
        .is_err()
    );
    let big = CodecConfig {
        page_size: PageSize::new(2 << 20).unwrap(),
        ..CodecConfig::default()
    };
    let page = vec![3u8; 2 << 20];
    Encoder::new(&big, Policy::Datacenter)
        .unwrap()
        .encode_pages(
            &[PageRef {
                index: 0,
                data: &page,
            }],
            &mut f,
        )
        .unwrap();
    assert!(matches!(
        Decoder::new(&config).decode_pages(&f),
        Err(DecodeError::PageSizeMismatch { .. })
    ));
    let d = &mut Decoder::new(&big);
    let got: Vec<_> = d.decode_pages(&f).unwrap().iter().collect();
    assert_eq!(
        got,
        vec![DecodedPage::Data {
            index: 0,
            bytes: &page[..]
        }]
    );
    let mut small = [0u8; 10];
    assert!(
        enc.encode_pages_into(
            &[PageRef {
                index: 0,
                data: &[1; PS]
            }],
            &mut small
        )
        .is_err()
    );
    assert!(Encoder::new(&config, Policy::Internet { level: 99 }).is_err());
}

#[test]
fn counter_dirtied_pages_cost_under_41_bytes() {
    let config = CodecConfig::default();
    let mut enc = Encoder::new(&config, Policy::Datacenter).unwrap();
    let mut dec = Decoder::new(&config);
    let v1: Vec<Vec<u8>> = (0..256).map(|i| fill(i + 10, i % 2 == 0)).collect();
    let mut x = 99u64;
    let mut rnd = |n: u64| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x % n
    };
    let v2: Vec<Vec<u8>> = v1
        .iter()
        .map(|p| {
            let mut p = p.clone();
            let k = 1 + rnd(8);
            for _ in 0..k {
                let w = rnd(512) as usize * 8;
                let v = u64::from_le_bytes(p[w..w + 8].try_into().unwrap())
                    .wrapping_add(1 + rnd(65535));
                p[w..w + 8].copy_from_slice(&v.to_le_bytes());
            }
            p
        })
        .collect();
    let mut f = Vec::new();
    for v in [&v1, &v2] {
        let pages: Vec<_> = v
            .iter()
            .enumerate()
            .map(|(i, d)| PageRef {
                index: i as u64,
                data: d,
            })
            .collect();
        enc.encode_pages(&pages, &mut f).unwrap();
        dec.decode_pages(&f).unwrap();
    }
    let per_page = f.len() as f64 / 256.0;
    assert!(per_page < 41.0, "{per_page} bytes per dirtied page");
}

#[test]
fn frames_over_the_input_limit_are_refused_and_change_nothing() {
    let big = CodecConfig {
        page_size: PageSize::new(2 << 20).unwrap(),
        ..CodecConfig::default()
    };
    let page = vec![7u8; 2 << 20];
    let n = dwcp_codec::MAX_FRAME_INPUT / (2 << 20) + 1;
    let pages: Vec<PageRef<'_>> = (0..n as u64)
        .map(|index| PageRef { index, data: &page })
        .collect();
    let mut enc = Encoder::new(&big, Policy::Datacenter).unwrap();
    let mut small = [0u8; 64];
    let err = enc.encode_pages_into(&pages, &mut small).unwrap_err();
    assert!(err.to_string().contains("at most"), "{err}");
    // The refusal changed nothing: the next frame is still frame 0.
    let mut f = Vec::new();
    enc.encode_pages(&pages[..1], &mut f).unwrap();
    let mut dec = Decoder::new(&big);
    assert_eq!(dec.decode_pages(&f).unwrap().stats.raw, 1);
}

#[test]
fn a_chunk_placed_at_an_offset_is_bound_to_it_and_yields_its_subtree() {
    let config = CodecConfig {
        key: Some(SessionKey([3; 32])),
        ..CodecConfig::default()
    };
    let data: Vec<u8> = (0..(64 << 10)).map(|i| (i * 7 % 253) as u8).collect();
    for policy in [Policy::Stored, Policy::Datacenter] {
        let mut enc = Encoder::new(&config, policy).unwrap();
        let mut dec = Decoder::new(&config);
        let mut f = vec![0u8; dwcp_codec::max_chunk_frame_len(data.len())];
        let (stats, digest) = enc
            .encode_chunk_at(&data, 5, Some(1 << 20), &mut f)
            .unwrap();
        f.truncate(stats.frame_bytes as usize);
        let ChunkDigest::Subtree { offset, cv } = digest else {
            panic!("an aligned chunk is a subtree: {digest:?}");
        };
        assert_eq!(offset, 1 << 20);
        {
            use blake3::hazmat::HasherExt;
            let want = blake3::Hasher::new()
                .set_input_offset(1 << 20)
                .update(&data)
                .finalize_non_root();
            assert_eq!(cv, want);
        }
        let (seq, got, d) = dec.decode_chunk_at(&f, Some(1 << 20)).unwrap();
        assert_eq!((seq, got, d), (5, &data[..], digest));
        // Another offset, or none, is another checksum.
        assert!(matches!(
            dec.decode_chunk_at(&f, Some(2 << 20)),
            Err(DecodeError::BadChecksum)
        ));
        assert!(matches!(
            dec.decode_chunk(&f),
            Err(DecodeError::BadChecksum)
        ));
        // A version-1 chunk frame (whose checksum meant something else) is
        // refused by version.
        let mut old = f.clone();
        old[4] = 1;
        assert!(matches!(
            dec.decode_chunk_at(&old, Some(1 << 20)),
            Err(DecodeError::UnsupportedVersion { found: 1, .. })
        ));
    }
    // An offset that cannot start a subtree that long falls back to the
    // whole-chunk hash, at both ends.
    let mut enc = Encoder::new(&config, Policy::Stored).unwrap();
    let mut f = vec![0; dwcp_codec::max_chunk_frame_len(data.len())];
    let (stats, d) = enc.encode_chunk_at(&data, 1, Some(4096), &mut f).unwrap();
    f.truncate(stats.frame_bytes as usize);
    assert_eq!(d, ChunkDigest::Whole(*blake3::hash(&data).as_bytes()));
    assert!(
        Decoder::new(&config)
            .decode_chunk_at(&f, Some(4096))
            .is_ok()
    );
}

#[test]
fn a_stored_chunk_in_three_pieces_is_the_stored_frame_byte_for_byte() {
    let keyed = CodecConfig {
        key: Some(SessionKey([9; 32])),
        ..CodecConfig::default()
    };
    let data: Vec<u8> = (0..(3 << 20) / 2).map(|i| (i * 31 % 251) as u8).collect();
    let mut rng = 0x5eed_u64;
    for config in [CodecConfig::default(), keyed] {
        for _ in 0..24 {
            rng = rng
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let len = (rng >> 33) as usize % (data.len() + 1);
            let offset = match rng % 3 {
                0 => None,
                1 => Some(((rng >> 12) % 64) << 20),
                _ => Some((rng >> 20) % (1 << 30)),
            };
            let chunk = &data[..len];
            let mut whole = vec![0u8; dwcp_codec::max_chunk_frame_len(len)];
            let (stats, digest) = Encoder::new(&config, Policy::Stored)
                .unwrap()
                .encode_chunk_at(chunk, 7, offset, &mut whole)
                .unwrap();
            whole.truncate(stats.frame_bytes as usize);
            // Whatever the encoder's own policy.
            for policy in [Policy::Stored, Policy::Datacenter, Policy::internet()] {
                let mut enc = Encoder::new(&config, policy).unwrap();
                let mut head = [0u8; dwcp_codec::frame::HEADER_LEN];
                let mut sum = [0u8; dwcp_codec::frame::CHECKSUM_LEN];
                let (s, d) = enc
                    .encode_stored_chunk_at(chunk, 7, offset, &mut head, &mut sum)
                    .unwrap();
                let pieces = [&head[..], chunk, &sum[..]].concat();
                assert_eq!(pieces, whole, "{len} bytes at {offset:?} under {policy:?}");
                assert_eq!((s, d), (stats, digest));
                let mut dec = Decoder::new(&config);
                let (seq, got, _) = dec.decode_chunk_at(&pieces, offset).unwrap();
                assert_eq!((seq, got), (7, chunk));
            }
        }
    }
    // Room too small for either end is refused, not written past.
    let mut enc = Encoder::new(&CodecConfig::default(), Policy::Stored).unwrap();
    let mut head = [0u8; dwcp_codec::frame::HEADER_LEN - 1];
    let mut sum = [0u8; dwcp_codec::frame::CHECKSUM_LEN];
    assert!(
        enc.encode_stored_chunk_at(&data[..10], 1, None, &mut head, &mut sum)
            .is_err()
    );
    let mut head = [0u8; dwcp_codec::frame::HEADER_LEN];
    let mut sum = [0u8; dwcp_codec::frame::CHECKSUM_LEN - 1];
    assert!(
        enc.encode_stored_chunk_at(&data[..10], 1, None, &mut head, &mut sum)
            .is_err()
    );
}

#[test]
fn a_decoder_with_state_keeps_its_arena() {
    let config = CodecConfig::default();
    let mut enc = Encoder::new(&config, Policy::Datacenter).unwrap();
    let mut dec = Decoder::new(&config);
    let page = fill(9, true);
    let mut frame = Vec::new();
    enc.encode_pages(
        &[PageRef {
            index: 3,
            data: &page,
        }],
        &mut frame,
    )
    .unwrap();
    dec.decode_pages(&frame).unwrap();
    let back = dec.adopt_arena(vec![1; 4 * PS]).unwrap_err();
    assert_eq!(back.len(), 4 * PS, "the offered arena comes back untouched");
    // And what it holds still serves a reference.
    enc.encode_pages(
        &[PageRef {
            index: 4,
            data: &page,
        }],
        &mut frame,
    )
    .unwrap();
    let d = dec.decode_pages(&frame).unwrap();
    assert_eq!(d.stats.reference, 1);
    assert_eq!(
        d.iter().collect::<Vec<_>>(),
        vec![DecodedPage::Data {
            index: 4,
            bytes: &page[..]
        }]
    );
}
