//! The stable replay harness of dwcp's fuzz crates (this one and
//! `transport/fuzz`): every committed seed under `seeds/<target>/`, the
//! seeds as the crate makes them now, libFuzzer-like mutants of both, and
//! deterministic pseudo-random inputs, through each fuzz function, without
//! libFuzzer. A failing input is saved under the system's temporary
//! directory for `cargo fuzz run TARGET FILE`.

use std::path::{Path, PathBuf};
use std::{fs, panic};

use dwcp_codec::corpus::Rng;

use crate::FuzzFn;

/// One fuzz crate's targets and where its files are.
#[derive(Debug, Clone, Copy)]
pub struct Harness<'a> {
    /// Name and function of each target.
    pub targets: &'a [(&'a str, FuzzFn)],
    /// The crate's directory (`env!("CARGO_MANIFEST_DIR")`).
    pub crate_dir: &'a str,
    /// Directory under the system's temporary directory for failing inputs.
    pub failures: &'a str,
}

/// How many inputs a target gets.
#[derive(Debug, Clone, Copy)]
pub struct Budget {
    /// Pseudo-random inputs.
    pub random: u64,
    /// Mutants per seed.
    pub mutants: u64,
}

impl Harness<'_> {
    fn function(&self, target: &str) -> FuzzFn {
        self.targets
            .iter()
            .find(|(t, _)| *t == target)
            .map(|(_, f)| *f)
            .unwrap_or_else(|| panic!("no target {target}"))
    }

    /// Runs one input; on a panic, saves it and fails naming it.
    pub fn run(&self, target: &str, what: &str, data: &[u8]) {
        let f = self.function(target);
        if panic::catch_unwind(|| f(data)).is_err() {
            let dir = std::env::temp_dir().join(self.failures);
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

    /// The committed seed files of `target`, sorted.
    pub fn seed_files(&self, target: &str) -> Vec<PathBuf> {
        let dir = Path::new(self.crate_dir).join("seeds").join(target);
        let mut files: Vec<PathBuf> = fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| e.expect("directory entry").path())
            .filter(|p| p.is_file())
            .collect();
        files.sort();
        files
    }

    /// Writes `seeds` (target, file name, bytes) under `seeds/<target>/`,
    /// replacing what is there; each must pass its own target first.
    /// Returns the seeds directory.
    pub fn write_seeds(&self, seeds: &[(&str, String, Vec<u8>)]) -> std::io::Result<PathBuf> {
        let root = Path::new(self.crate_dir).join("seeds");
        for (target, _) in self.targets {
            let dir = root.join(target);
            if dir.exists() {
                fs::remove_dir_all(&dir)?;
            }
            fs::create_dir_all(&dir)?;
        }
        for (target, name, data) in seeds {
            self.function(target)(data);
            fs::write(root.join(target).join(name), data)?;
        }
        Ok(root)
    }

    /// Checks that every target has its `fuzz_targets/<name>.rs`, and that
    /// there are `count` of them.
    pub fn check_target_files(&self, count: usize) {
        let dir = Path::new(self.crate_dir).join("fuzz_targets");
        for (t, _) in self.targets {
            assert!(
                dir.join(format!("{t}.rs")).is_file(),
                "no fuzz_targets/{t}.rs"
            );
        }
        assert_eq!(self.targets.len(), count);
    }

    /// Replays `target`: its committed seeds (at least 3), `fresh` (the
    /// seeds as made now, named), their mutants, and pseudo-random inputs,
    /// each passed through `shape(i, input, rng)` first so that some get
    /// past the target's first checks.
    pub fn replay(
        &self,
        target: &str,
        fresh: Vec<(String, Vec<u8>)>,
        budget: Budget,
        mut shape: impl FnMut(u64, &mut [u8], &mut Rng),
    ) {
        let files = self.seed_files(target);
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
            fresh
                .into_iter()
                .map(|(name, data)| (format!("fresh seed {name}"), data)),
        );
        for (what, data) in &inputs {
            self.run(target, what, data);
        }
        let mut rng = Rng::new(0x5eed);
        for (what, data) in &inputs {
            for k in 0..budget.mutants {
                self.run(
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
            shape(i, &mut data, &mut rng);
            self.run(target, &format!("random {i}"), &data);
        }
    }
}

/// A libFuzzer-like mutant of `data`.
pub fn mutant(data: &[u8], rng: &mut Rng) -> Vec<u8> {
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
