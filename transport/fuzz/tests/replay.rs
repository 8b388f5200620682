//! Replays, on stable and without libFuzzer, every committed seed under
//! `seeds/<target>/`, the seeds as [`seeds::all`] makes them now, mutants of
//! both, and deterministic pseudo-random inputs through each fuzz function.
//! A failing input is saved under the system's temporary directory
//! (`dwcp-transport-fuzz-failures/`) for `cargo fuzz run TARGET FILE`.

use std::path::{Path, PathBuf};
use std::{fs, panic};

use dwcp_codec::corpus::Rng;
use dwcp_transport::wire::{HEADER_LEN, Kind, MAGIC};
use dwcp_transport_fuzz::{TARGETS, meta_mode, seeds, wire_sel};

/// How many inputs a target gets: pseudo-random inputs, and mutants per
/// seed. `tree_digest` hashes regions of up to 4 MiB, so it gets fewer.
struct Budget {
    random: u64,
    mutants: u64,
}

const CHEAP: Budget = Budget {
    random: 4000,
    mutants: 200,
};
const HASHING: Budget = Budget {
    random: 1000,
    mutants: 60,
};

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
        let dir = std::env::temp_dir().join("dwcp-transport-fuzz-failures");
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

/// Gives a pseudo-random input of `target` a chance to pass the first
/// checks: every selector or mode in turn, and for headers the magic, a
/// known kind, no flags and a short body.
fn shape(target: &str, i: u64, data: &mut [u8], rng: &mut Rng) {
    let Some(first) = data.first_mut() else {
        return;
    };
    match target {
        "wire_messages" => {
            let sel = (i % u64::from(wire_sel::COUNT)) as u8;
            *first = sel;
            if (sel == wire_sel::HEADER || sel == wire_sel::MESSAGES)
                && data.len() >= 2 + HEADER_LEN
            {
                let kinds = [1u8, 2, 3, 4, 5, 6, 7, 16, 17, 32, 33, 34, 35, 36];
                let kind = kinds[rng.below(kinds.len() as u64) as usize];
                assert!(Kind::from_wire(kind).is_some());
                let h = &mut data[2..2 + HEADER_LEN];
                h[..4].copy_from_slice(&MAGIC);
                h[4] = kind;
                h[5..8].fill(0);
                let len = rng.below(200) as u32;
                h[8..12].copy_from_slice(&len.to_le_bytes());
            }
        }
        "file_meta" => {
            *first = (i % 8) as u8;
            if *first & meta_mode::PATH == 0
                && let Some(version) = data.get_mut(1)
            {
                *version = 1;
            }
        }
        _ => {}
    }
}

fn replay(target: &str, budget: &Budget) {
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
        for k in 0..budget.mutants {
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
    for i in 0..budget.random {
        let mut rng = Rng::new(salt ^ i);
        let len = match i % 8 {
            0..=3 => rng.below(64),
            4..=6 => rng.below(600),
            _ => rng.below(5000),
        } as usize;
        let mut data = vec![0u8; len];
        rng.fill_bytes(&mut data);
        shape(target, i, &mut data, &mut rng);
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
    assert_eq!(names.len(), 3);
}

#[test]
fn wire_messages() {
    replay("wire_messages", &CHEAP);
}

#[test]
fn file_meta() {
    replay("file_meta", &CHEAP);
}

#[test]
fn tree_digest() {
    replay("tree_digest", &HASHING);
}
