//! Replays, on stable and without libFuzzer, every committed seed under
//! `seeds/<target>/`, the seeds as [`seeds::all`] makes them now, mutants of
//! both, and deterministic pseudo-random inputs through each fuzz function.
//! A failing input is saved under the system's temporary directory
//! (`dwcp-transport-fuzz-failures/`) for `cargo fuzz run TARGET FILE`.

use dwcp_codec::corpus::Rng;
use dwcp_codec_fuzz::replay::{Budget, Harness};
use dwcp_transport::wire::{HEADER_LEN, Kind, MAGIC};
use dwcp_transport_fuzz::{TARGETS, meta_mode, seeds, wire_sel};

const HARNESS: Harness<'static> = Harness {
    targets: &TARGETS,
    crate_dir: env!("CARGO_MANIFEST_DIR"),
    failures: "dwcp-transport-fuzz-failures",
};

/// `tree_digest` hashes regions of up to 4 MiB, so it gets fewer inputs.
const CHEAP: Budget = Budget {
    random: 4000,
    mutants: 200,
};
const HASHING: Budget = Budget {
    random: 1000,
    mutants: 60,
};

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

fn replay(target: &str, budget: Budget) {
    let fresh = seeds::all()
        .into_iter()
        .filter(|s| s.target == target)
        .map(|s| (s.name, s.data))
        .collect();
    HARNESS.replay(target, fresh, budget, |i, data, rng| {
        shape(target, i, data, rng)
    });
}

#[test]
fn every_target_has_a_test() {
    HARNESS.check_target_files(3);
}

#[test]
fn wire_messages() {
    replay("wire_messages", CHEAP);
}

#[test]
fn file_meta() {
    replay("file_meta", CHEAP);
}

#[test]
fn tree_digest() {
    replay("tree_digest", HASHING);
}
