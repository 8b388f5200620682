//! Criterion benches of the HDE codec, one group per stage, throughput in
//! input bytes:
//!
//! - `zero_scan`: [`is_zero`] on a zero page, a typical non-zero page and a
//!   page whose only non-zero byte is its last (the worst case);
//! - `blake3_page`: [`ContentHash::of`] of one 4 KiB page (and plain
//!   `blake3::hash`, for comparison);
//! - `fingerprint`: [`fingerprint`] of one 4 KiB page;
//! - `delta`: [`delta::encode`] and [`delta::apply`] of counter-dirtied pages
//!   ([`corpus::dirty_page`]) against their previous version;
//! - `lz4`, `zstd`: the block compressors on the corpus' non-zero pages, page
//!   by page and as one block of a frame's size (lz4_flex's block API; ZStd's
//!   bulk API with reused contexts, levels 1 and 3);
//! - `frames_raw`: [`Encoder::encode_pages_into`] and
//!   [`Decoder::decode_pages`] of 256-page batches of the synthetic corpus
//!   ([`ClassMix::STANDARD`]: half zero pages) with no state (`state_limit:
//!   0`: zero pages and compressed raw pages only);
//! - `frames_delta`: the same batches after a dirtying pass, each encoded
//!   against its previous version (delta frames, the default state limit).
//!
//! Each policy is measured under `datacenter` (LZ4) and `internet` (ZStd 3).
//! The measurement time is kept short (2 s, 20 samples) so that the whole
//! run takes a few minutes on two cores:
//!
//! ```text
//! cargo bench -p dwcp-benches --bench codec            # everything
//! cargo bench -p dwcp-benches --bench codec -- frames  # one stage
//! ```

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use dwcp_codec::corpus::{self, ClassMix, Corpus, Rng};
use dwcp_codec::{
    CodecConfig, ContentHash, Decoder, Encoder, PAGE_SIZE, PageRef, Policy, delta, fingerprint,
    is_zero, max_page_frame_len,
};

/// Pages per frame in the frame benches.
const BATCH: usize = 256;
/// Batches of the corpus (the frame benches rotate through them).
const BATCHES: usize = 4;
/// Seed of the corpus.
const SEED: u64 = 0x00d3_c0de;

fn corpus() -> Corpus {
    corpus::generate(BATCH * BATCHES * PAGE_SIZE, ClassMix::STANDARD, SEED)
}

/// The corpus with every non-zero page dirtied once more per `round`.
fn dirtied(c: &Corpus, round: u64) -> Vec<u8> {
    c.dirtied(SEED ^ round)
}

fn batch(data: &[u8], b: usize) -> Vec<PageRef<'_>> {
    data[b * BATCH * PAGE_SIZE..(b + 1) * BATCH * PAGE_SIZE]
        .chunks_exact(PAGE_SIZE)
        .zip((b * BATCH) as u64..)
        .map(|(data, index)| PageRef { index, data })
        .collect()
}

fn policies() -> [(&'static str, Policy); 2] {
    [
        ("datacenter", Policy::Datacenter),
        ("internet", Policy::internet()),
    ]
}

fn zero_scan(c: &mut Criterion) {
    let corpus = corpus();
    let zero = vec![0u8; PAGE_SIZE];
    let nonzero = corpus.page(corpus.nonzero_indices()[0]).to_vec();
    let mut last = vec![0u8; PAGE_SIZE];
    last[PAGE_SIZE - 1] = 1;
    let mut g = c.benchmark_group("zero_scan");
    g.throughput(Throughput::Bytes(PAGE_SIZE as u64));
    for (name, page) in [
        ("zero_page", &zero),
        ("nonzero_page", &nonzero),
        ("last_byte_nonzero", &last),
    ] {
        g.bench_function(name, |b| b.iter(|| is_zero(black_box(page))));
    }
    g.finish();
}

fn hashes(c: &mut Criterion) {
    let corpus = corpus();
    let page = corpus.page(corpus.nonzero_indices()[0]).to_vec();
    let mut g = c.benchmark_group("blake3_page");
    g.throughput(Throughput::Bytes(PAGE_SIZE as u64));
    g.bench_function("content_hash", |b| {
        b.iter(|| ContentHash::of(black_box(&page)))
    });
    g.bench_function("blake3_hash", |b| b.iter(|| blake3::hash(black_box(&page))));
    g.finish();
    let mut g = c.benchmark_group("fingerprint");
    g.throughput(Throughput::Bytes(PAGE_SIZE as u64));
    g.bench_function("page", |b| b.iter(|| fingerprint(black_box(&page))));
    g.finish();
}

fn deltas(c: &mut Criterion) {
    let corpus = corpus();
    let nonzero = corpus.nonzero_pages();
    let mut new = nonzero.clone();
    let mut rng = Rng::new(SEED);
    for p in new.chunks_exact_mut(PAGE_SIZE) {
        corpus::dirty_page(&mut rng, p);
    }
    let pages = nonzero.len() / PAGE_SIZE;
    let mut body = Vec::new();
    let mut spans = Vec::with_capacity(pages);
    for (old, new) in nonzero
        .chunks_exact(PAGE_SIZE)
        .zip(new.chunks_exact(PAGE_SIZE))
    {
        let at = body.len();
        let n = delta::encode(old, new, &mut body, usize::MAX).expect("no cap");
        spans.push((at, n));
    }
    eprintln!(
        "delta: {pages} counter-dirtied pages, {:.1} delta bytes per page",
        body.len() as f64 / pages as f64
    );
    let mut g = c.benchmark_group("delta");
    g.throughput(Throughput::Bytes(nonzero.len() as u64));
    let mut out = Vec::with_capacity(body.len());
    g.bench_function("encode", |b| {
        b.iter(|| {
            out.clear();
            for (old, new) in nonzero
                .chunks_exact(PAGE_SIZE)
                .zip(new.chunks_exact(PAGE_SIZE))
            {
                delta::encode(old, new, &mut out, usize::MAX);
            }
            black_box(out.len())
        })
    });
    // Applying a delta twice gives the page back (XOR), so every iteration
    // does the same work on the same buffer.
    let mut work = nonzero.clone();
    g.bench_function("apply", |b| {
        b.iter(|| {
            for (page, &(at, n)) in work.chunks_exact_mut(PAGE_SIZE).zip(&spans) {
                delta::apply(page, &body[at..at + n], 0).expect("valid delta");
            }
            black_box(work[0])
        })
    });
    g.finish();
}

/// One compressor under test: compress `src` into `dst`, decompress `src`
/// into `dst`; both return the bytes written.
trait Block {
    fn compress(&mut self, src: &[u8], dst: &mut [u8]) -> usize;
    fn decompress(&mut self, src: &[u8], dst: &mut [u8]) -> usize;
}

struct Lz4;

impl Block for Lz4 {
    fn compress(&mut self, src: &[u8], dst: &mut [u8]) -> usize {
        lz4_flex::block::compress_into(src, dst).expect("large enough")
    }
    fn decompress(&mut self, src: &[u8], dst: &mut [u8]) -> usize {
        lz4_flex::block::decompress_into(src, dst).expect("valid block")
    }
}

struct Zstd {
    c: zstd::bulk::Compressor<'static>,
    d: zstd::bulk::Decompressor<'static>,
}

impl Zstd {
    fn new(level: i32) -> Zstd {
        Zstd {
            c: zstd::bulk::Compressor::new(level).expect("valid level"),
            d: zstd::bulk::Decompressor::new().expect("context"),
        }
    }
}

impl Block for Zstd {
    fn compress(&mut self, src: &[u8], dst: &mut [u8]) -> usize {
        self.c.compress_to_buffer(src, dst).expect("large enough")
    }
    fn decompress(&mut self, src: &[u8], dst: &mut [u8]) -> usize {
        self.d.decompress_to_buffer(src, dst).expect("valid frame")
    }
}

/// Compress and decompress benches of one compressor (`name`, the prefix of
/// the bench ids within `group`), per 4 KiB page and per block of [`BATCH`]
/// pages (a frame's raw block).
fn block_benches(c: &mut Criterion, group: &str, name: &str, codec: &mut dyn Block) {
    let id = |op: &str| {
        if name.is_empty() {
            op.to_string()
        } else {
            format!("{name}/{op}")
        }
    };
    let label = if name.is_empty() {
        group.to_string()
    } else {
        format!("{group}/{name}")
    };
    let corpus = corpus();
    let src = corpus.nonzero_pages();
    let bound = lz4_flex::block::get_maximum_output_size(BATCH * PAGE_SIZE)
        .max(zstd::zstd_safe::compress_bound(BATCH * PAGE_SIZE));
    let mut dst = vec![0u8; bound];
    let mut back = vec![0u8; BATCH * PAGE_SIZE];
    let mut g = c.benchmark_group(group);
    g.throughput(Throughput::Bytes(src.len() as u64));

    // Page by page: every non-zero page of the corpus.
    let mut packed = Vec::new();
    let mut spans = Vec::new();
    for p in src.chunks_exact(PAGE_SIZE) {
        let n = codec.compress(p, &mut dst);
        spans.push((packed.len(), n));
        packed.extend_from_slice(&dst[..n]);
    }
    eprintln!(
        "{label}: {} non-zero pages, ratio {:.3} page by page",
        spans.len(),
        src.len() as f64 / packed.len() as f64
    );
    g.bench_function(id("compress_page"), |b| {
        b.iter(|| {
            let mut total = 0;
            for p in src.chunks_exact(PAGE_SIZE) {
                total += codec.compress(p, &mut dst);
            }
            black_box(total)
        })
    });
    g.bench_function(id("decompress_page"), |b| {
        b.iter(|| {
            let mut total = 0;
            for &(at, n) in &spans {
                total += codec.decompress(&packed[at..at + n], &mut back[..PAGE_SIZE]);
            }
            black_box(total)
        })
    });

    // Blocks of BATCH pages.
    let mut packed = Vec::new();
    let mut spans = Vec::new();
    for blk in src.chunks(BATCH * PAGE_SIZE) {
        let n = codec.compress(blk, &mut dst);
        spans.push((packed.len(), n, blk.len()));
        packed.extend_from_slice(&dst[..n]);
    }
    eprintln!(
        "{label}: ratio {:.3} in blocks of {BATCH} pages",
        src.len() as f64 / packed.len() as f64
    );
    g.bench_function(id("compress_block"), |b| {
        b.iter(|| {
            let mut total = 0;
            for blk in src.chunks(BATCH * PAGE_SIZE) {
                total += codec.compress(blk, &mut dst);
            }
            black_box(total)
        })
    });
    g.bench_function(id("decompress_block"), |b| {
        b.iter(|| {
            let mut total = 0;
            for &(at, n, len) in &spans {
                total += codec.decompress(&packed[at..at + n], &mut back[..len]);
            }
            black_box(total)
        })
    });
    g.finish();
}

fn compressors(c: &mut Criterion) {
    block_benches(c, "lz4", "", &mut Lz4);
    block_benches(c, "zstd", "level-1", &mut Zstd::new(1));
    block_benches(c, "zstd", "level-3", &mut Zstd::new(3));
}

/// An encoder and a decoder of one session, and the frame buffer.
struct Session {
    enc: Encoder,
    dec: Decoder,
    out: Vec<u8>,
}

impl Session {
    fn new(config: &CodecConfig, policy: Policy) -> Session {
        Session {
            enc: Encoder::new(config, policy).expect("valid policy"),
            dec: Decoder::new(config),
            out: vec![0u8; max_page_frame_len(BATCH, PAGE_SIZE)],
        }
    }

    /// Encodes one batch; returns the frame's length.
    fn encode(&mut self, pages: &[PageRef<'_>]) -> usize {
        let s = self
            .enc
            .encode_pages_into(pages, &mut self.out)
            .expect("encodes");
        s.frame_bytes as usize
    }

    /// Encodes one batch (untimed), then decodes it; returns the decode time.
    fn round(&mut self, pages: &[PageRef<'_>]) -> Duration {
        let n = self.encode(pages);
        let t0 = Instant::now();
        let got = self.dec.decode_pages(&self.out[..n]).expect("decodes");
        black_box(got.stats.pages);
        t0.elapsed()
    }
}

fn frames_raw(c: &mut Criterion) {
    let corpus = corpus();
    let batches: Vec<Vec<PageRef<'_>>> = (0..BATCHES).map(|b| batch(&corpus.data, b)).collect();
    let config = CodecConfig {
        state_limit: 0,
        ..CodecConfig::default()
    };
    let mut g = c.benchmark_group("frames_raw");
    g.throughput(Throughput::Bytes((BATCH * PAGE_SIZE) as u64));
    for (name, policy) in policies() {
        let mut s = Session::new(&config, policy);
        let sizes: Vec<usize> = batches.iter().map(|p| s.encode(p)).collect();
        eprintln!(
            "frames_raw/{name}: {BATCH}-page frames of {:?} bytes (ratio {:.3})",
            sizes,
            (BATCH * BATCHES * PAGE_SIZE) as f64 / sizes.iter().sum::<usize>() as f64
        );
        let mut i = 0usize;
        g.bench_function(format!("encode/{name}"), |b| {
            b.iter(|| {
                i += 1;
                s.encode(&batches[i % BATCHES])
            })
        });
        // The decoder follows the encoder frame by frame; only decoding is
        // timed.
        let mut s = Session::new(&config, policy);
        let mut i = 0usize;
        g.bench_function(format!("decode/{name}"), |b| {
            b.iter_custom(|iters| {
                let mut t = Duration::ZERO;
                for _ in 0..iters {
                    i += 1;
                    t += s.round(&batches[i % BATCHES]);
                }
                t
            })
        });
    }
    g.finish();
}

fn frames_delta(c: &mut Criterion) {
    let corpus = corpus();
    // Two dirtied versions of the corpus: once each batch's first version has
    // been sent, every later frame alternates between them, so every
    // non-zero page goes as a delta against the version sent before.
    let versions = [dirtied(&corpus, 1), dirtied(&corpus, 2)];
    let batches: Vec<Vec<Vec<PageRef<'_>>>> = versions
        .iter()
        .map(|v| (0..BATCHES).map(|b| batch(v, b)).collect())
        .collect();
    let config = CodecConfig::default();
    let mut g = c.benchmark_group("frames_delta");
    g.throughput(Throughput::Bytes((BATCH * PAGE_SIZE) as u64));
    for (name, policy) in policies() {
        // Version 0 of every batch first, then alternate.
        let warm = |s: &mut Session| {
            for p in &batches[0] {
                s.round(p);
            }
        };
        let next = |i: usize| &batches[1 - (i / BATCHES) % 2][i % BATCHES];

        let mut s = Session::new(&config, policy);
        warm(&mut s);
        let stats = s
            .enc
            .encode_pages_into(next(0), &mut s.out)
            .expect("encodes");
        eprintln!(
            "frames_delta/{name}: {} pages, {} delta, {} zero, {} raw, {} ref; {} bytes (ratio {:.1})",
            stats.pages,
            stats.delta,
            stats.zero,
            stats.raw,
            stats.reference,
            stats.frame_bytes,
            stats.input_bytes as f64 / stats.frame_bytes as f64
        );
        let mut i = 1usize;
        g.bench_function(format!("encode/{name}"), |b| {
            b.iter(|| {
                let n = s.encode(next(i));
                i += 1;
                n
            })
        });

        let mut s = Session::new(&config, policy);
        warm(&mut s);
        let mut i = 0usize;
        g.bench_function(format!("decode/{name}"), |b| {
            b.iter_custom(|iters| {
                let mut t = Duration::ZERO;
                for _ in 0..iters {
                    t += s.round(next(i));
                    i += 1;
                }
                t
            })
        });
    }
    g.finish();
}

criterion_group! {
    name = codec;
    config = Criterion::default()
        .measurement_time(Duration::from_secs(2))
        .warm_up_time(Duration::from_millis(500))
        .sample_size(20);
    targets = zero_scan, hashes, deltas, compressors, frames_raw, frames_delta
}
criterion_main!(codec);
