//! Frames written by released format versions, decoded forever.
//!
//! `codec/tests/golden/v1-*.bin` hold page-frame sessions written by format
//! version 1 (a u32 LE length before each frame). Their decoded pages must
//! hash to the digests in `v1.digests`. Regenerate only when adding a new
//! format version: `cargo test -p dwcp-codec --test golden -- --ignored`.

use std::path::PathBuf;

use dwcp_codec::corpus::{self, ClassMix};
use dwcp_codec::{
    Baseline, CodecConfig, DecodedPage, Decoder, Encoder, PageRef, PageSize, Policy, SessionKey,
};

const PS: usize = 4096;

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden")
}

struct Case {
    name: &'static str,
    policy: Policy,
    key: Option<SessionKey>,
}

fn cases() -> Vec<Case> {
    vec![
        Case {
            name: "v1-datacenter",
            policy: Policy::Datacenter,
            key: None,
        },
        Case {
            name: "v1-internet",
            policy: Policy::Internet { level: 3 },
            key: None,
        },
        Case {
            name: "v1-keyed-stored",
            policy: Policy::Stored,
            key: Some(SessionKey([0x5a; 32])),
        },
    ]
}

/// One frame's pages: (index, content).
type FramePages = Vec<(u64, Vec<u8>)>;

/// Pages 0..32 of a small corpus, then a dirtied version of them, then a
/// frame of duplicates and baseline pages.
fn session() -> (Vec<FramePages>, Vec<u8>) {
    let c = corpus::generate(32 * PS, ClassMix::STANDARD, 7);
    let v2 = c.dirtied(8);
    let base = corpus::generate(
        4 * PS,
        ClassMix {
            zero: 0,
            text: 1,
            code: 1,
            random: 0,
        },
        9,
    )
    .data;
    let f1 = (0..32).map(|i| (i as u64, c.page(i).to_vec())).collect();
    let f2 = (0..32)
        .map(|i| (i as u64, v2[i * PS..(i + 1) * PS].to_vec()))
        .collect();
    let f3 = vec![
        (100, {
            let i = c.nonzero_indices()[0];
            v2[i * PS..(i + 1) * PS].to_vec()
        }),
        (101, base[..PS].to_vec()),
        (102, base[PS..2 * PS].to_vec()),
        (103, vec![0u8; PS]),
    ];
    (vec![f1, f2, f3], base)
}

fn config(key: Option<SessionKey>) -> CodecConfig {
    CodecConfig {
        page_size: PageSize::DEFAULT,
        state_limit: 1 << 20,
        key,
    }
}

fn digest_of(dec: &mut Decoder, frame: &[u8], h: &mut blake3::Hasher) {
    let d = dec.decode_pages(frame).expect("a golden frame decodes");
    let mut pages: Vec<(u64, Vec<u8>)> = Vec::new();
    for p in d.iter() {
        match p {
            DecodedPage::Zero { first, count } => {
                for i in first..first + count {
                    pages.push((i, vec![0u8; PS]));
                }
            }
            DecodedPage::Data { index, bytes } => pages.push((index, bytes.to_vec())),
        }
    }
    pages.sort_by_key(|p| p.0);
    for (i, b) in pages {
        h.update(&i.to_le_bytes());
        h.update(&b);
    }
}

#[test]
fn v1_frames_decode_forever() {
    let digests = std::fs::read_to_string(dir().join("v1.digests")).expect("v1.digests");
    let (_, base) = session();
    for case in cases() {
        let bytes = std::fs::read(dir().join(format!("{}.bin", case.name))).expect("golden file");
        let mut dec = Decoder::new(&config(case.key.clone()));
        dec.set_baseline(Baseline::from_image(PageSize::DEFAULT, &base).unwrap())
            .unwrap();
        let mut h = blake3::Hasher::new();
        let mut at = 0;
        while at < bytes.len() {
            let n = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
            digest_of(&mut dec, &bytes[at + 4..at + 4 + n], &mut h);
            at += 4 + n;
        }
        let want = digests
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{} ", case.name)))
            .expect("digest line");
        assert_eq!(h.finalize().to_hex().as_str(), want, "{}", case.name);
    }
}

#[test]
#[ignore = "writes the golden files; run only when adding a format version"]
fn write_golden() {
    let (frames, base) = session();
    let mut lines = String::new();
    for case in cases() {
        let mut enc = Encoder::new(&config(case.key.clone()), case.policy).unwrap();
        enc.set_baseline(
            Baseline::from_image(PageSize::DEFAULT, &base)
                .unwrap()
                .advertise(),
        )
        .unwrap();
        let mut dec = Decoder::new(&config(case.key.clone()));
        dec.set_baseline(Baseline::from_image(PageSize::DEFAULT, &base).unwrap())
            .unwrap();
        let mut out = Vec::new();
        let mut h = blake3::Hasher::new();
        let mut want = blake3::Hasher::new();
        let mut kinds = dwcp_codec::FrameStats::default();
        for f in &frames {
            let refs: Vec<PageRef<'_>> = f
                .iter()
                .map(|(i, d)| PageRef { index: *i, data: d })
                .collect();
            let mut sorted = f.clone();
            sorted.sort_by_key(|p| p.0);
            for (i, b) in &sorted {
                want.update(&i.to_le_bytes());
                want.update(b);
            }
            let mut frame = Vec::new();
            kinds.add(&enc.encode_pages(&refs, &mut frame).unwrap());
            out.extend_from_slice(&(frame.len() as u32).to_le_bytes());
            out.extend_from_slice(&frame);
            digest_of(&mut dec, &frame, &mut h);
        }
        assert_eq!(
            h.finalize(),
            want.finalize(),
            "{} decodes to its input",
            case.name
        );
        assert!(
            kinds.zero > 0 && kinds.raw > 0 && kinds.delta > 0,
            "{kinds:?}"
        );
        assert!(kinds.reference > 0 && kinds.baseline > 0, "{kinds:?}");
        std::fs::write(dir().join(format!("{}.bin", case.name)), &out).unwrap();
        lines.push_str(&format!("{} {}\n", case.name, h.finalize().to_hex()));
    }
    std::fs::write(dir().join("v1.digests"), lines).unwrap();
}
