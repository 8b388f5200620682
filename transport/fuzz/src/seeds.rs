//! Seed inputs of every target, made deterministically from the encoders.
//!
//! `cargo run --manifest-path transport/fuzz/Cargo.toml --example make_seeds`
//! writes them to `transport/fuzz/seeds/<target>/`; `tests/replay.rs`
//! replays both the committed files and a fresh [`all`] (the committed ones
//! may lag behind the encoders; they stay valid inputs either way).

use dwcp_transport::files::{FileMeta, MAX_PATH_LEN};
use dwcp_transport::wire::{
    self, Addressing, Challenge, Close, DataHeader, Header, Hello, Join, JoinOk, Kind, Open,
    Reason, TAG_LEN, Welcome, WirePolicy, caps, code,
};

use crate::{meta_mode, region_shape, wire_sel, write_op};

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

/// A `HELLO` of a keyed client offering everything.
pub fn hello() -> Hello {
    Hello {
        version_min: 1,
        version_max: 1,
        keyed: true,
        caps: caps::ALL,
        nonce: [0x11; 32],
        resume: [0; 16],
        policy: WirePolicy::Internet(3),
        streams: 8,
    }
}

/// The server's `CHALLENGE` to [`hello`].
pub fn challenge() -> Challenge {
    Challenge {
        version: 1,
        caps: caps::REGION | caps::ORDERED,
        nonce: [0x22; 32],
        session: [0x33; 16],
        resumed: false,
        proof: [0x44; 32],
    }
}

/// The server's `WELCOME`.
pub fn welcome() -> Welcome {
    Welcome {
        window: 8 << 20,
        max_chunk: 1 << 20,
        grace_ms: 30_000,
        max_streams: 64,
        reorder_units: 1024,
    }
}

/// A data stream's `JOIN`.
pub fn join() -> Join {
    Join {
        session: [0x33; 16],
        stream: 3,
        nonce: [0x55; 32],
        proof: [0x66; 32],
    }
}

/// The server's `JOIN_OK`.
pub fn join_ok() -> JoinOk {
    JoinOk {
        nonce: [0x77; 32],
        proof: [0x88; 32],
    }
}

/// The metadata of a file region.
pub fn file_meta() -> FileMeta {
    FileMeta {
        path: "dir/sub/file.txt".into(),
        mode: 0o640,
        mtime_s: 1_700_000_000,
        mtime_ns: 123_456_789,
    }
}

/// The `OPEN` of a file region.
pub fn open_file() -> Open {
    Open {
        region: 1,
        addressing: Addressing::Region,
        len: (3 << 20) + 12345,
        meta: file_meta().encode(),
    }
}

/// The fixed fields of a `DATA` message.
pub fn data_header() -> DataHeader {
    DataHeader {
        stream: 3,
        addressing: Addressing::Region,
        chunk: 77,
        region: 1,
        raw_len: 1 << 20,
        offset: 2 << 20,
    }
}

/// The `CLOSE` of [`open_file`].
pub fn close() -> Close {
    Close {
        region: 1,
        chunks: 4,
        len: (3 << 20) + 12345,
        digest: [0x99; 32],
    }
}

/// A whole message: header, body, and a (made-up) tag when the kind has one.
fn message(kind: Kind, body: &[u8]) -> Vec<u8> {
    let tag = if kind.tagged() { TAG_LEN } else { 0 };
    let len = u32::try_from(body.len() + tag).expect("seed messages are small");
    let mut m = Header { kind, len }.write().to_vec();
    m.extend_from_slice(body);
    m.extend(std::iter::repeat_n(0x7a, tag));
    m
}

fn reason(id: u32, code: u16, text: &str) -> Vec<u8> {
    Reason {
        id,
        code,
        text: text.into(),
    }
    .encode()
}

fn with(prefix: &[u8], rest: &[u8]) -> Vec<u8> {
    let mut v = prefix.to_vec();
    v.extend_from_slice(rest);
    v
}

/// A [`file_meta`] path-mode input: mode bits, then permission bits,
/// seconds, nanoseconds and the path.
fn path_input(perm: u32, mtime_s: i64, mtime_ns: u32, path: &str) -> Vec<u8> {
    let mut v = vec![meta_mode::PATH | meta_mode::PERM_ONLY | meta_mode::NS_IN_RANGE];
    v.extend_from_slice(&perm.to_le_bytes());
    v.extend_from_slice(&mtime_s.to_le_bytes());
    v.extend_from_slice(&mtime_ns.to_le_bytes());
    v.extend_from_slice(path.as_bytes());
    v
}

/// A [`crate::tree_digest`] script: a region, then writes.
struct Tree(Vec<u8>);

impl Tree {
    /// A region of whole MiBs (1 to 4) give or take `delta` bytes.
    fn mib(mib: u8, delta: i16, seed: u8) -> Tree {
        let mut v = vec![region_shape::MIB, mib - 1];
        v.extend_from_slice(&delta.to_le_bytes());
        v.push(seed);
        Tree(v)
    }

    /// A region of `len` bytes (at most `MAX_REGION`).
    fn any(len: u32, seed: u8) -> Tree {
        let mut v = vec![region_shape::ANY];
        v.extend_from_slice(&len.to_le_bytes());
        v.push(seed);
        Tree(v)
    }

    /// A region of `len` bytes (at most 4096).
    fn small(len: u16, seed: u8) -> Tree {
        let mut v = vec![region_shape::SMALL];
        v.extend_from_slice(&len.to_le_bytes());
        v.push(seed);
        Tree(v)
    }

    /// A region of `2^log` bytes plus `POW2_ADJUST[adjust]`.
    fn pow2(log: u8, adjust: u8, seed: u8) -> Tree {
        Tree(vec![region_shape::POW2, log - 10, adjust, seed])
    }

    /// The `k`-th piece of cut `CUTS[cut]`.
    fn cut(mut self, cut: u8, k: u8) -> Tree {
        self.0.extend([write_op::CUT | (cut << 2), k]);
        self
    }

    /// The `k`-th piece of `2^log` bytes, cut at the region's end unless
    /// `clip` is false.
    fn aligned(mut self, log: u8, k: u8, clip: bool) -> Tree {
        let flag = if clip { 0 } else { write_op::NO_CLIP };
        self.0.extend([write_op::ALIGNED | flag, log - 10, k]);
        self
    }

    /// `n << shift` bytes at `offset << offset_shift`.
    fn any_write(mut self, offset: u16, offset_shift: u8, n: u16, shift: u8) -> Tree {
        self.0.push(write_op::ANY);
        self.0.extend_from_slice(&offset.to_le_bytes());
        self.0.push(offset_shift);
        self.0.extend_from_slice(&n.to_le_bytes());
        self.0.push(shift);
        self
    }

    /// `n << shift` bytes at `HOSTILE_OFFSETS[which]`.
    fn hostile(mut self, which: u8, n: u16, shift: u8) -> Tree {
        self.0.extend([write_op::HOSTILE, which]);
        self.0.extend_from_slice(&n.to_le_bytes());
        self.0.push(shift);
        self
    }
}

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

    // wire_messages: headers.
    for (name, max_frame, kind, len) in [
        ("header-hello", 2, Kind::Hello, wire::HELLO_LEN),
        (
            "header-data",
            2,
            Kind::Data,
            wire::DATA_FIXED_LEN + 1000 + TAG_LEN,
        ),
        ("header-ack-no-frames", 0, Kind::Ack, 4 + 8 * 3 + TAG_LEN),
        ("header-bye", 1, Kind::Bye, TAG_LEN),
    ] {
        let len = u32::try_from(len).expect("small");
        add(
            "wire_messages",
            name,
            with(
                &[wire_sel::HEADER, max_frame],
                &Header { kind, len }.write(),
            ),
        );
    }
    // wire_messages: one body of each decoder.
    let mut data = data_header().encode().to_vec();
    data.extend_from_slice(b"codec frame bytes");
    let bodies: [(&str, u8, Vec<u8>); 14] = [
        ("hello", wire_sel::HELLO, hello().encode()),
        (
            "hello-insecure-stored",
            wire_sel::HELLO,
            Hello {
                keyed: false,
                policy: WirePolicy::None,
                resume: [0xab; 16],
                ..hello()
            }
            .encode(),
        ),
        ("challenge", wire_sel::CHALLENGE, challenge().encode()),
        ("welcome", wire_sel::WELCOME, welcome().encode()),
        (
            "reason-refuse",
            wire_sel::REASON,
            reason(0, code::AUTH, "bad key"),
        ),
        (
            "reason-done-utf8",
            wire_sel::REASON,
            reason(7, code::OK, "données reçues"),
        ),
        ("join", wire_sel::JOIN, join().encode()),
        ("join-ok", wire_sel::JOIN_OK, join_ok().encode()),
        ("data", wire_sel::DATA, data.clone()),
        (
            "ack",
            wire_sel::ACK,
            wire::encode_ack(&[1, 2, 77, u64::MAX]),
        ),
        ("open-file", wire_sel::OPEN, open_file().encode()),
        (
            "open-ordered",
            wire_sel::OPEN,
            Open {
                region: 2,
                addressing: Addressing::Ordered,
                len: u64::MAX,
                meta: Vec::new(),
            }
            .encode(),
        ),
        ("close", wire_sel::CLOSE, close().encode()),
        (
            "data-ordered",
            wire_sel::DATA,
            DataHeader {
                addressing: Addressing::Ordered,
                offset: 5,
                ..data_header()
            }
            .encode()
            .to_vec(),
        ),
    ];
    for (name, sel, body) in bodies {
        add("wire_messages", name, with(&[sel], &body));
    }
    // wire_messages: message streams, as the two ends of a session see them.
    let session = [
        message(Kind::Hello, &hello().encode()),
        message(Kind::Challenge, &challenge().encode()),
        message(Kind::Proof, &[0x5c; 32]),
        message(Kind::Welcome, &welcome().encode()),
        message(Kind::Open, &open_file().encode()),
        message(Kind::Data, &data),
        message(Kind::Ack, &wire::encode_ack(&[77])),
        message(Kind::Close, &close().encode()),
        message(Kind::Done, &reason(1, code::OK, "")),
        message(Kind::Bye, &[]),
    ]
    .concat();
    add(
        "wire_messages",
        "messages-session",
        with(&[wire_sel::MESSAGES, 2], &session),
    );
    let streams = [
        message(Kind::Join, &join().encode()),
        message(Kind::JoinOk, &join_ok().encode()),
        message(Kind::Data, &data),
        message(
            Kind::Error,
            &reason(0, code::PROTOCOL, "unexpected message"),
        ),
    ]
    .concat();
    add(
        "wire_messages",
        "messages-data-stream",
        with(&[wire_sel::MESSAGES, 1], &streams),
    );
    let refused = [
        message(Kind::Hello, &hello().encode()),
        message(Kind::Refuse, &reason(0, code::VERSION, "no common version")),
    ]
    .concat();
    add(
        "wire_messages",
        "messages-refused",
        with(&[wire_sel::MESSAGES, 0], &refused),
    );

    // file_meta: metadata bytes.
    for (name, meta) in [
        ("meta-file", file_meta()),
        (
            "meta-pre-epoch-dots",
            FileMeta {
                path: "./a/./b//c".into(),
                mode: 0o755,
                mtime_s: -5,
                mtime_ns: 999_999_999,
            },
        ),
        (
            "meta-unicode",
            FileMeta {
                path: "données/été.bin".into(),
                mode: 0,
                mtime_s: 0,
                mtime_ns: 0,
            },
        ),
        (
            "meta-parent-refused",
            FileMeta {
                path: "a/../../etc/passwd".into(),
                ..file_meta()
            },
        ),
    ] {
        add("file_meta", name, with(&[0], &meta.encode()));
    }
    // file_meta: paths.
    for (name, path) in [
        ("path-dots", "./a/./b//c/"),
        ("path-parent", "a/b/../../../x"),
        ("path-absolute", "/etc/passwd"),
        ("path-dot-only", "./."),
        ("path-dotted-names", "...a/.b/..c/d.."),
    ] {
        add("file_meta", name, path_input(0o644, 1_700_000_000, 0, path));
    }
    let longest = format!("{}/{}", "d".repeat(100), "f".repeat(MAX_PATH_LEN - 101));
    add(
        "file_meta",
        "path-longest",
        path_input(0o600, 1, 2, &longest),
    );

    // tree_digest: a sender's 1 MiB cuts, in and out of order, with a tail.
    let t = (0..4).fold(Tree::mib(3, 12345, 1), |t, k| t.cut(2, k));
    add("tree_digest", "cut-1mib-with-tail", t.0);
    let t = [3u8, 1, 0, 2, 3, 1]
        .iter()
        .fold(Tree::mib(4, -1000, 2), |t, &k| t.cut(2, k));
    add("tree_digest", "cut-1mib-scrambled", t.0);
    // Some pieces missing: read back.
    let t = [0u8, 2, 3]
        .iter()
        .fold(Tree::mib(4, 0, 3), |t, &k| t.cut(2, k));
    add("tree_digest", "cut-1mib-missing", t.0);
    // Pieces that fit no node of the tree (1,000,000 bytes).
    let t = (0..3).fold(Tree::any(2_500_000, 4), |t, k| t.cut(3, k));
    add("tree_digest", "cut-unaligned", t.0);
    // Power-of-two pieces: 64 KiB ones inside a node read whole (unused),
    // a 2 MiB one and the 64 KiB tail (both nodes of the tree).
    let t = (0..4).fold(Tree::any((2 << 20) + (64 << 10), 5), |t, k| {
        t.aligned(16, k, true)
    });
    let t = t.aligned(21, 0, true).aligned(16, 32, true);
    add("tree_digest", "aligned-2m-and-64k-tail", t.0);
    // 64 KiB pieces of a region just over 1 MiB: all read back.
    let t = (0..17).fold(Tree::pow2(20, 4, 5), |t, k| t.aligned(16, k, true));
    add("tree_digest", "aligned-64k", t.0);
    // Small regions: the root is hashed whole.
    let t = Tree::small(1025, 6)
        .aligned(10, 0, true)
        .aligned(10, 1, true);
    add("tree_digest", "small-1025", t.0);
    let t = Tree::pow2(16, 1, 7)
        .aligned(15, 0, true)
        .aligned(15, 1, true);
    add("tree_digest", "just-under-min-piece", t.0);
    // Hostile ranges: past the end, near u64::MAX, across the end.
    let t = (0..8).fold(Tree::any((2 << 20) + 512, 8), |t, w| t.hostile(w, 8192, 7));
    let t = t
        .aligned(20, 2, false)
        .aligned(21, 1, false)
        .cut(2, 0)
        .any_write(1, 20, 1, 20)
        .any_write(3, 19, 8192, 7);
    add("tree_digest", "hostile-ranges", t.0);
    out
}
