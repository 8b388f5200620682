//! `dwcp bench codec`: HDE on a memory image or the synthetic corpus, per
//! policy, next to the C `lz4` and `zstd` tools on the same bytes.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use dwcp_codec::corpus::{self, ClassMix};
use dwcp_codec::{
    CodecConfig, DecodedPage, Decoder, Encoder, FrameStats, PAGE_SIZE, PageRef, Policy,
    max_page_frame_len,
};
use serde_json::json;

use crate::units::{format_rate, format_size};

/// Pages per frame: 1 MiB of 4 KiB pages, the transport's chunk size.
pub const BATCH_PAGES: usize = 256;

/// What to measure.
#[derive(Debug, Clone)]
pub struct Options {
    /// A raw memory image instead of the synthetic corpus.
    pub input: Option<PathBuf>,
    /// Size of the synthetic corpus.
    pub synthetic: u64,
    /// Seed of the synthetic corpus.
    pub seed: u64,
    /// Link rate for `auto`, bits per second.
    pub link_bps: u64,
    /// Passes per measurement (medians are reported).
    pub repeat: usize,
    /// Size of the all-zero image for the zero-scan row (0: skip).
    pub zero_scan: u64,
    /// Run the C reference tools.
    pub references: bool,
    /// ZStd level of `internet`.
    pub internet_level: i32,
    /// Iterations of each C tool run (`-i`).
    pub ref_iterations: u32,
}

/// One row of the table / one JSON line.
#[derive(Debug, Clone)]
pub struct Row {
    /// `datacenter`, `internet`, `auto`, `zero-scan`, `ref-lz4-1`, ...
    pub name: String,
    /// `synthetic`, `synthetic-nonzero`, `dirtied`, `all-zero` or a file name.
    pub corpus: String,
    /// Encode (or compress) GB/s of input, one core.
    pub encode_gbps: Option<f64>,
    /// Decode GB/s of input, one core.
    pub decode_gbps: Option<f64>,
    /// Input bytes / output bytes.
    pub ratio: Option<f64>,
    /// Page-kind counts of the last pass (codec rows).
    pub stats: Option<FrameStats>,
    /// Input bytes.
    pub bytes: u64,
    /// Extra note (reference rows: why a tool was skipped).
    pub note: Option<String>,
    /// Zero-scan row: a flat read of the same memory, GB/s (its reference).
    pub memory_read_gbps: Option<f64>,
}

impl Row {
    /// Delivered input bytes per second (GB/s) on a link of `link_bps`:
    /// the slower of the encoder and the link carrying compressed bytes.
    pub fn delivered_gbps(&self, link_bps: u64) -> Option<f64> {
        let (e, r) = (self.encode_gbps?, self.ratio?);
        Some((link_bps as f64 / 8e9 * r).min(e))
    }

    /// The row as one JSON object.
    pub fn to_json(&self, link_bps: u64) -> serde_json::Value {
        let mut v = json!({
            "name": self.name,
            "corpus": self.corpus,
            "encode_gbps": self.encode_gbps,
            "decode_gbps": self.decode_gbps,
            "ratio": self.ratio,
            "bytes": self.bytes,
        });
        if let Some(s) = &self.stats {
            v["pages"] = json!({
                "zero": s.zero, "raw": s.raw, "delta": s.delta,
                "ref": s.reference, "baseline": s.baseline,
            });
            v["frame_bytes"] = json!(s.frame_bytes);
            if let Some(d) = self.delivered_gbps(link_bps) {
                v["link_bps"] = json!(link_bps);
                v["delivered_gbps"] = json!(d);
            }
        }
        if let Some(n) = &self.note {
            v["note"] = json!(n);
        }
        if let Some(m) = self.memory_read_gbps {
            v["memory_read_gbps"] = json!(m);
        }
        v
    }
}

/// Median of `v` (mean of the middle two for an even count); 0 when empty.
pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        0.0
    } else if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn gbps(bytes: u64, t: Duration) -> f64 {
    bytes as f64 / t.as_secs_f64().max(1e-9) / 1e9
}

/// The pages of one workload: (index, offset in `data`) in send order.
struct Workload<'a> {
    data: &'a [u8],
    pages: Vec<u64>,
    /// A first version sent before the measured one (for `dirtied`).
    warmup: Option<(&'a [u8], Vec<u64>)>,
}

/// Encodes every batch of `w` with a fresh encoder, then decodes the frames
/// with a fresh decoder, checking every page; times only the codec calls.
fn measure(
    policy: Policy,
    w: &Workload<'_>,
    state_limit: usize,
) -> Result<(f64, f64, u64, FrameStats)> {
    let config = CodecConfig {
        state_limit,
        ..CodecConfig::default()
    };
    let mut enc = Encoder::new(&config, policy)?;
    enc.set_thread_cpu_clock(Some(dwcp_transport::thread_cpu_time));
    let mut dec = Decoder::new(&config);
    enc.prefault();
    dec.prefault();
    let mut out = vec![0u8; max_page_frame_len(BATCH_PAGES, PAGE_SIZE)];
    let mut refs: Vec<PageRef<'_>> = Vec::with_capacity(BATCH_PAGES);
    // Warm-up version: encoded and decoded, not timed; kept for the check.
    let mut warm_frames: Vec<Vec<u8>> = Vec::new();
    if let Some((data, pages)) = &w.warmup {
        for batch in pages.chunks(BATCH_PAGES) {
            refs.clear();
            refs.extend(batch.iter().map(|&i| PageRef {
                index: i,
                data: &data[i as usize * PAGE_SIZE..(i as usize + 1) * PAGE_SIZE],
            }));
            let s = enc.encode_pages_into(&refs, &mut out)?;
            dec.decode_pages(&out[..s.frame_bytes as usize])?;
            warm_frames.push(out[..s.frame_bytes as usize].to_vec());
        }
    }
    let mut frames: Vec<u8> = Vec::new();
    let mut ends: Vec<usize> = Vec::new();
    let mut total = FrameStats::default();
    let mut t_enc = Duration::ZERO;
    for batch in w.pages.chunks(BATCH_PAGES) {
        refs.clear();
        refs.extend(batch.iter().map(|&i| PageRef {
            index: i,
            data: &w.data[i as usize * PAGE_SIZE..(i as usize + 1) * PAGE_SIZE],
        }));
        let t0 = Instant::now();
        let s = enc.encode_pages_into(&refs, &mut out)?;
        t_enc += t0.elapsed();
        total.add(&s);
        frames.extend_from_slice(&out[..s.frame_bytes as usize]);
        ends.push(frames.len());
    }
    // Timed pass: decode every frame, nothing else between the calls (a
    // check between them would evict the next frame from the cache).
    let mut t_dec = Duration::ZERO;
    let mut start = 0;
    for end in &ends {
        let t0 = Instant::now();
        let d = dec.decode_pages(&frames[start..*end])?;
        t_dec += t0.elapsed();
        std::hint::black_box(d.stats.pages);
        start = *end;
    }
    // Check pass, untimed: a fresh decoder (after the same warm-up) decodes
    // the frames again and every page is compared with the input, each
    // exactly once (the encoder may reorder a batch).
    let mut check_dec = Decoder::new(&config);
    for f in &warm_frames {
        check_dec.decode_pages(f)?;
    }
    let mut seen: Vec<u64> = Vec::with_capacity(BATCH_PAGES);
    let mut done: Vec<bool> = Vec::with_capacity(BATCH_PAGES);
    let mut start = 0;
    for (end, batch) in ends.iter().zip(w.pages.chunks(BATCH_PAGES)) {
        let d = check_dec.decode_pages(&frames[start..*end])?;
        seen.clear();
        seen.extend(batch.iter().copied());
        seen.sort_unstable();
        done.clear();
        done.resize(seen.len(), false);
        let mut k = 0usize;
        let mut check = |i: u64, bytes: Option<&[u8]>| -> Result<()> {
            let at = i as usize * PAGE_SIZE;
            let want = &w.data[at..at + PAGE_SIZE];
            let ok = match bytes {
                Some(b) => b == want,
                None => dwcp_codec::is_zero(want),
            };
            match seen.binary_search(&i) {
                Ok(pos) if ok && !done[pos] => {
                    done[pos] = true;
                    k += 1;
                    Ok(())
                }
                _ => bail!("decoded page {i} does not match the input"),
            }
        };
        for p in d.iter() {
            match p {
                DecodedPage::Zero { first, count } => {
                    for i in first..first + count {
                        check(i, None)?;
                    }
                }
                DecodedPage::Data { index, bytes } => check(index, Some(bytes))?,
            }
        }
        if k != batch.len() {
            bail!("a frame decoded to {k} pages, {} were sent", batch.len());
        }
        start = *end;
    }
    let bytes = (w.pages.len() * PAGE_SIZE) as u64;
    Ok((
        gbps(bytes, t_enc),
        gbps(bytes, t_dec),
        frames.len() as u64,
        total,
    ))
}

/// The row of one codec measurement from its passes: median speeds, the
/// ratio and page kinds of the last pass (every pass encodes the same).
fn codec_row(name: &str, corpus: &str, w: &Workload<'_>, passes: &Passes) -> Row {
    let (frame_bytes, stats) = passes.last.unwrap_or_default();
    let bytes = (w.pages.len() * PAGE_SIZE) as u64;
    Row {
        name: name.into(),
        corpus: corpus.into(),
        encode_gbps: Some(median(passes.enc.clone())),
        decode_gbps: Some(median(passes.dec.clone())),
        ratio: Some(bytes as f64 / frame_bytes.max(1) as f64),
        stats: Some(stats),
        bytes,
        note: None,
        memory_read_gbps: None,
    }
}

/// The passes of one codec measurement so far.
#[derive(Default)]
struct Passes {
    enc: Vec<f64>,
    dec: Vec<f64>,
    last: Option<(u64, FrameStats)>,
}

/// Scans `size` bytes of written (not shared-zero) memory page by page.
fn zero_scan(size: u64, repeat: usize) -> Row {
    let n = (size as usize / PAGE_SIZE) * PAGE_SIZE;
    // Every page is written (ones, then zeros) so that the scan reads real
    // memory, not the kernel's shared zero page; black_box keeps the
    // optimiser from folding the writes into a calloc.
    let mut mem = vec![std::hint::black_box(1u8); n];
    std::hint::black_box(&mut mem);
    mem.fill(std::hint::black_box(0));
    std::hint::black_box(&mut mem);
    let mut speeds = Vec::new();
    let mut reads = Vec::new();
    for _ in 0..repeat.max(1) {
        // The reference: one flat pass ORing every word of the same memory,
        // no per-page work: what this machine's memory reads allow.
        let t0 = Instant::now();
        let acc = or_all(std::hint::black_box(&mem));
        reads.push(gbps(n as u64, t0.elapsed()));
        assert_eq!(std::hint::black_box(acc), 0);
        let t0 = Instant::now();
        let zero = dwcp_codec::count_zero_pages(std::hint::black_box(&mem), PAGE_SIZE);
        let t = t0.elapsed();
        assert_eq!(zero, n / PAGE_SIZE, "zero scan disagrees with memory");
        speeds.push(gbps(n as u64, t));
    }
    Row {
        name: "zero-scan".into(),
        corpus: "all-zero".into(),
        encode_gbps: Some(median(speeds)),
        decode_gbps: None,
        ratio: None,
        stats: None,
        bytes: n as u64,
        note: None,
        memory_read_gbps: Some(median(reads)),
    }
}

/// ORs every eight-byte word of `mem` in one flat pass.
#[inline(never)]
fn or_all(mem: &[u8]) -> u64 {
    let mut acc = 0u64;
    for line in mem.chunks_exact(64) {
        for w in line.chunks_exact(8) {
            acc |= u64::from_ne_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]]);
        }
    }
    acc
}

/// Runs `tool -bLEVEL file` and parses its last result line:
/// `1#name : 1000 -> 500 (2.000), 800.0 MB/s, 4000.0 MB/s` (lz4 prints the
/// ratio plain, zstd as `x2.000`). Both tools count MB as 10^6 bytes.
fn reference(tool: &str, level: u32, iterations: u32, file: &Path, corpus: &str) -> Row {
    let name = format!("ref-{tool}-{level}");
    let mut row = Row {
        name,
        corpus: corpus.into(),
        encode_gbps: None,
        decode_gbps: None,
        ratio: None,
        stats: None,
        bytes: std::fs::metadata(file).map(|m| m.len()).unwrap_or(0),
        note: None,
        memory_read_gbps: None,
    };
    let out = match Command::new(tool)
        .arg(format!("-b{level}"))
        .arg(format!("-i{iterations}"))
        .arg(file)
        .output()
    {
        Ok(o) if o.status.success() => o,
        Ok(o) => {
            row.note = Some(format!(
                "{tool} failed: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            ));
            return row;
        }
        Err(e) => {
            row.note = Some(format!(
                "{tool} not run ({e}); install the Debian package {tool}"
            ));
            return row;
        }
    };
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    match parse_reference(&text) {
        Some((ratio, c, d)) => {
            row.ratio = Some(ratio);
            row.encode_gbps = Some(c / 1000.0);
            row.decode_gbps = Some(d / 1000.0);
        }
        None => row.note = Some(format!("could not parse {tool} output")),
    }
    row
}

/// One pass of every C reference over `files`.
fn reference_pass(
    files: &[(PathBuf, String)],
    opts: &Options,
    progress: &mut impl FnMut(&str),
) -> Vec<Row> {
    let mut rows = Vec::new();
    for (file, cname) in files {
        for (tool, level) in [("lz4", 1), ("zstd", 1), ("zstd", 3)] {
            progress(&format!("{tool} -b{level} on {cname}"));
            rows.push(reference(tool, level, opts.ref_iterations, file, cname));
        }
    }
    rows
}

/// One reference row from its runs: median speeds (the first run's ratio
/// and note).
fn merge_reference(runs: Vec<Row>) -> Row {
    let mid = |f: fn(&Row) -> Option<f64>| {
        let v: Vec<f64> = runs.iter().filter_map(f).collect();
        (!v.is_empty()).then(|| median(v))
    };
    let encode_gbps = mid(|r| r.encode_gbps);
    let decode_gbps = mid(|r| r.decode_gbps);
    let ratio = runs.iter().find_map(|r| r.ratio);
    let note = runs.iter().find_map(|r| r.note.clone());
    let first = runs.into_iter().next().expect("at least one run");
    Row {
        encode_gbps,
        decode_gbps,
        ratio,
        note,
        ..first
    }
}

/// (ratio, compress MB/s, decompress MB/s) from a `-b` run's output.
pub fn parse_reference(text: &str) -> Option<(f64, f64, f64)> {
    let seg = text
        .split(['\r', '\n'])
        .rfind(|s| s.matches("MB/s").count() >= 2)?;
    let open = seg.find('(')?;
    let close = seg[open..].find(')')? + open;
    let ratio: f64 = seg[open + 1..close]
        .trim()
        .trim_start_matches('x')
        .parse()
        .ok()?;
    let mut speeds = seg[close..].split("MB/s").filter_map(|p| {
        p.rsplit([',', ' '])
            .find(|t| !t.trim().is_empty())
            .and_then(|t| t.trim().parse::<f64>().ok())
    });
    Some((ratio, speeds.next()?, speeds.next()?))
}

/// Runs the whole benchmark and returns its rows in print order.
pub fn run(opts: &Options, mut progress: impl FnMut(&str)) -> Result<Vec<Row>> {
    let (data, corpus_name) = match &opts.input {
        Some(path) => {
            let mut d =
                std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
            let whole = d.len() / PAGE_SIZE * PAGE_SIZE;
            if whole == 0 {
                bail!(
                    "{} holds less than one {PAGE_SIZE}-byte page",
                    path.display()
                );
            }
            if whole != d.len() {
                eprintln!(
                    "dwcp: note: the last {} bytes of {} are not a whole {PAGE_SIZE}-byte page and are left out",
                    d.len() - whole,
                    path.display()
                );
            }
            d.truncate(whole);
            let name = path.file_name().map_or_else(
                || path.display().to_string(),
                |n| n.to_string_lossy().into_owned(),
            );
            (d, name)
        }
        None => {
            if opts.synthetic < PAGE_SIZE as u64 {
                bail!("--synthetic must be at least one page ({PAGE_SIZE})");
            }
            progress(&format!(
                "generating {} of synthetic pages (seed {})",
                format_size(opts.synthetic),
                opts.seed
            ));
            (
                corpus::generate(opts.synthetic as usize, ClassMix::STANDARD, opts.seed).data,
                "synthetic".to_string(),
            )
        }
    };
    let n_pages = data.len() / PAGE_SIZE;
    let all: Vec<u64> = (0..n_pages as u64).collect();
    let nonzero: Vec<u64> = all
        .iter()
        .copied()
        .filter(|&i| {
            !dwcp_codec::is_zero(&data[i as usize * PAGE_SIZE..(i as usize + 1) * PAGE_SIZE])
        })
        .collect();
    // The second version: every non-zero page changes 1-8 counters.
    let mut rng = corpus::Rng::new(opts.seed ^ 0xD1_27_1E_D0);
    let mut dirtied = data.clone();
    for &i in &nonzero {
        corpus::dirty_page(
            &mut rng,
            &mut dirtied[i as usize * PAGE_SIZE..(i as usize + 1) * PAGE_SIZE],
        );
    }
    let link_bytes = opts.link_bps as f64 / 8.0;
    let policies = [
        ("datacenter", Policy::Datacenter),
        (
            "internet",
            Policy::Internet {
                level: opts.internet_level,
            },
        ),
        (
            "auto",
            Policy::Auto {
                link_bytes_per_sec: link_bytes,
            },
        ),
    ];
    let nonzero_name = if opts.input.is_some() {
        format!("{corpus_name}-nonzero")
    } else {
        "synthetic-nonzero".into()
    };
    let whole = Workload {
        data: &data,
        pages: all.clone(),
        warmup: None,
    };
    // The non-zero pages as one contiguous image: the same bytes, in the
    // same layout, as the file the C tools read.
    let mut nz_bytes: Vec<u8> = Vec::with_capacity(nonzero.len() * PAGE_SIZE);
    for &i in &nonzero {
        nz_bytes.extend_from_slice(&data[i as usize * PAGE_SIZE..(i as usize + 1) * PAGE_SIZE]);
    }
    let nz = Workload {
        data: &nz_bytes,
        pages: (0..nonzero.len() as u64).collect(),
        warmup: None,
    };
    let dirty = Workload {
        data: &dirtied,
        pages: nonzero.clone(),
        warmup: Some((&data, all.clone())),
    };
    // Enough state for the first version and the second one.
    let dirty_state = (2 * data.len()).max(dwcp_codec::DEFAULT_STATE_LIMIT);
    let refs = if opts.references {
        let dir = std::env::temp_dir().join(format!("dwcp-bench-{}", std::process::id()));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let f_all = dir.join(&corpus_name);
        let f_nz = dir.join(&nonzero_name);
        std::fs::write(&f_all, &data).with_context(|| format!("writing {}", f_all.display()))?;
        std::fs::write(&f_nz, &nz_bytes).with_context(|| format!("writing {}", f_nz.display()))?;
        Some((
            dir,
            vec![(f_all, corpus_name.clone()), (f_nz, nonzero_name.clone())],
        ))
    } else {
        None
    };
    let mut cells = Vec::new();
    for (name, policy) in policies {
        for (w, cname, limit) in [
            (
                &whole,
                corpus_name.as_str(),
                dwcp_codec::DEFAULT_STATE_LIMIT,
            ),
            (&nz, nonzero_name.as_str(), dwcp_codec::DEFAULT_STATE_LIMIT),
            (&dirty, "dirtied", dirty_state),
        ] {
            if !w.pages.is_empty() {
                cells.push((name, cname, policy, w, limit, Passes::default()));
            }
        }
    }
    // Rounds: each measures every row once and runs every reference once,
    // so that ours and the references sample the same stretches of this
    // shared host's drifting speed; the rows are medians over the rounds.
    let rounds = opts.repeat.max(1);
    let mut ref_runs: Vec<Vec<Row>> = Vec::new();
    for round in 1..=rounds {
        if let Some((_, files)) = &refs {
            let pass = reference_pass(files, opts, &mut progress);
            if ref_runs.is_empty() {
                ref_runs = pass.into_iter().map(|r| vec![r]).collect();
            } else {
                for (runs, r) in ref_runs.iter_mut().zip(pass) {
                    runs.push(r);
                }
            }
        }
        for (name, cname, policy, w, limit, passes) in &mut cells {
            progress(&format!("{name} on {cname} (round {round} of {rounds})"));
            let (e, d, frame_bytes, stats) = measure(*policy, w, *limit)?;
            passes.enc.push(e);
            passes.dec.push(d);
            passes.last = Some((frame_bytes, stats));
        }
    }
    let mut rows: Vec<Row> = cells
        .iter()
        .map(|(name, cname, _, w, _, passes)| codec_row(name, cname, w, passes))
        .collect();
    if opts.zero_scan > 0 {
        progress(&format!("zero scan of {}", format_size(opts.zero_scan)));
        rows.push(zero_scan(opts.zero_scan, opts.repeat));
    }
    if let Some((dir, _)) = refs {
        let _ = std::fs::remove_dir_all(&dir);
        rows.extend(ref_runs.into_iter().map(merge_reference));
    }
    Ok(rows)
}

/// Prints the rows as a table.
pub fn print_table(rows: &[Row], link_bps: u64) {
    println!(
        "{:<11} {:<18} {:>9} {:>9} {:>8} {:>10}  pages zero/raw/delta/ref/base",
        "name", "corpus", "enc GB/s", "dec GB/s", "ratio", "deliv GB/s"
    );
    let f = |v: Option<f64>, p: usize| v.map_or_else(|| "-".to_string(), |x| format!("{x:.p$}"));
    for r in rows {
        let kinds = r.stats.as_ref().map_or_else(
            || match r.memory_read_gbps {
                Some(m) => format!("memory read {m:.2} GB/s"),
                None => r.note.clone().unwrap_or_default(),
            },
            |s| {
                format!(
                    "{}/{}/{}/{}/{}",
                    s.zero, s.raw, s.delta, s.reference, s.baseline
                )
            },
        );
        let delivered = if r.stats.is_some() {
            r.delivered_gbps(link_bps)
        } else {
            None
        };
        println!(
            "{:<11} {:<18} {:>9} {:>9} {:>8} {:>10}  {}",
            r.name,
            r.corpus,
            f(r.encode_gbps, 2),
            f(r.decode_gbps, 2),
            f(r.ratio, 2),
            f(delivered, 3),
            kinds
        );
    }
    println!(
        "(GB/s = 10^9 bytes of input per second on one core; delivered = min(link x ratio, encode) at {}; medians)",
        format_rate(link_bps)
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_tool_output() {
        let lz4 = "\r |-t.bin : 86456144 ->\r =-t.bin : 86456144 ->  43228072 (2.000),6756.5 MB/s ,9190.7 MB/s\r 1#t.bin : 86456144 ->  43228072 (2.000), 812.3 MB/s ,4700.1 MB/s\n";
        assert_eq!(parse_reference(lz4), Some((2.0, 812.3, 4700.1)));
        let zstd = "Loading...\r |-t.bin : 86 ->  65 (x1.327),  323.2 MB/s ,  755.2 MB/s\r 3#t.bin : 86 -> 65 (x1.327),  348.9 MB/s,  843.0 MB/s\n";
        assert_eq!(parse_reference(zstd), Some((1.327, 348.9, 843.0)));
        assert_eq!(parse_reference("nothing"), None);
    }

    #[test]
    fn small_run_checks_every_page() {
        let opts = Options {
            input: None,
            synthetic: 2 << 20,
            seed: 1,
            link_bps: 1_000_000_000,
            repeat: 1,
            zero_scan: 1 << 20,
            references: false,
            internet_level: 3,
            ref_iterations: 1,
        };
        let rows = run(&opts, |_| {}).unwrap();
        assert_eq!(rows.len(), 10);
        let dirtied = rows
            .iter()
            .find(|r| r.corpus == "dirtied" && r.name == "datacenter")
            .unwrap();
        assert!(dirtied.ratio.unwrap() > 50.0, "{dirtied:?}");
        assert_eq!(dirtied.stats.unwrap().delta, dirtied.stats.unwrap().pages);
    }
}
