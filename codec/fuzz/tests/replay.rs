//! Replays, on stable and without libFuzzer, every committed seed under
//! `seeds/<target>/`, the seeds as [`seeds::all`] makes them now, mutants of
//! both, and a few thousand deterministic pseudo-random inputs through each
//! fuzz function. A failing input is saved under the system's temporary
//! directory (`dwcp-codec-fuzz-failures/`) for `cargo fuzz run TARGET FILE`.

use std::path::{Path, PathBuf};
use std::{fs, panic};

use dwcp_codec::corpus::Rng;
use dwcp_codec_fuzz::{MODE_STRUCTURED, TARGETS, seeds};

/// Pseudo-random inputs per target.
const RANDOM_INPUTS: u64 = 4000;
/// Mutants per seed.
const MUTANTS: u64 = 200;

fn function(target: &str) -> fn(&[u8]) {
    TARGETS
        .iter()
        .find(|(t, _)| *t == target)
        .map(|(_, f)| *f)
        .unwrap_or_else(|| panic!("no target {target}"))
}

/// Runs one input; on a panic, saves it and fails naming it.
fn run(target: &str, what: &str, data: &[u8]) {
    let f = function(target);
    if panic::catch_unwind(|| f(data)).is_err() {
        let dir = std::env::temp_dir().join("dwcp-codec-fuzz-failures");
        let _ = fs::create_dir_all(&dir);
        let path = dir.join(format!("{target}-{}", what.replace(['/', ' '], "_")));
        let _ = fs::write(&path, data);
        let head: String = data.iter().take(48).map(|b| format!("{b:02x}")).collect();
        panic!(
            "{target}: input {what} ({} bytes, starts {head}) panicked (see above); saved to {}",
            data.len(),
            path.display()
        );
    }
}

fn seed_files(target: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("seeds")
        .join(target);
    let mut files: Vec<PathBuf> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("directory entry").path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

/// A libFuzzer-like mutant of `data`.
fn mutant(data: &[u8], rng: &mut Rng) -> Vec<u8> {
    let mut m = data.to_vec();
    for _ in 0..1 + rng.below(4) {
        let pos = |m: &Vec<u8>, rng: &mut Rng| rng.below(m.len() as u64 + 1) as usize;
        match rng.below(6) {
            0 | 1 if !m.is_empty() => {
                let i = rng.below(m.len() as u64) as usize;
                m[i] ^= 1 << rng.below(8);
            }
            2 if !m.is_empty() => {
                let i = rng.below(m.len() as u64) as usize;
                m[i] = rng.next_u64() as u8;
            }
            3 => {
                let i = pos(&m, rng);
                m.insert(i, rng.next_u64() as u8);
            }
            4 if !m.is_empty() => {
                let i = rng.below(m.len() as u64) as usize;
                m.remove(i);
            }
            _ => {
                let i = pos(&m, rng);
                m.truncate(i.max(1));
            }
        }
    }
    m
}

fn replay(target: &str) {
    let files = seed_files(target);
    assert!(files.len() >= 3, "{target}: fewer than 3 committed seeds");
    let mut inputs: Vec<(String, Vec<u8>)> = files
        .iter()
        .map(|p| {
            let name = format!(
                "seed {}",
                p.file_name().unwrap_or_default().to_string_lossy()
            );
            (name, fs::read(p).expect("readable seed"))
        })
        .collect();
    inputs.extend(
        seeds::all()
            .into_iter()
            .filter(|s| s.target == target)
            .map(|s| (format!("fresh seed {}", s.name), s.data)),
    );
    for (what, data) in &inputs {
        run(target, what, data);
    }
    let mut rng = Rng::new(0x5eed);
    for (what, data) in &inputs {
        for k in 0..MUTANTS {
            run(
                target,
                &format!("{what} mutant {k}"),
                &mutant(data, &mut rng),
            );
        }
    }
    let salt = target
        .bytes()
        .fold(0u64, |h, b| h.rotate_left(5) ^ u64::from(b));
    for i in 0..RANDOM_INPUTS {
        let mut rng = Rng::new(salt ^ i);
        let len = match i % 8 {
            0..=3 => rng.below(64),
            4..=6 => rng.below(600),
            _ => rng.below(5000),
        } as usize;
        let mut data = vec![0u8; len];
        rng.fill_bytes(&mut data);
        if let Some(first) = data.first_mut() {
            // Every mode, the structured one most.
            *first = [0, 1, MODE_STRUCTURED, MODE_STRUCTURED][(i % 4) as usize];
        }
        run(target, &format!("random {i}"), &data);
    }
}

#[test]
fn every_target_has_a_test() {
    let names: Vec<&str> = TARGETS.iter().map(|(t, _)| *t).collect();
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz_targets");
    for t in &names {
        assert!(
            dir.join(format!("{t}.rs")).is_file(),
            "no fuzz_targets/{t}.rs"
        );
    }
    assert_eq!(names.len(), 6);
}

#[test]
fn page_frames() {
    replay("page_frames");
}

#[test]
fn chunk_frames() {
    replay("chunk_frames");
}

#[test]
fn delta_apply() {
    replay("delta_apply");
}

#[test]
fn baseline_advert() {
    replay("baseline_advert");
}

#[test]
fn frame_header() {
    replay("frame_header");
}

#[test]
fn lz4_block() {
    replay("lz4_block");
}
