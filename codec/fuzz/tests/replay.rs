//! Replays, on stable and without libFuzzer, every committed seed under
//! `seeds/<target>/`, the seeds as [`seeds::all`] makes them now, mutants of
//! both, and a few thousand deterministic pseudo-random inputs through each
//! fuzz function. A failing input is saved under the system's temporary
//! directory (`dwcp-codec-fuzz-failures/`) for `cargo fuzz run TARGET FILE`.

use dwcp_codec_fuzz::replay::{Budget, Harness};
use dwcp_codec_fuzz::{MODE_STRUCTURED, TARGETS, seeds};

const HARNESS: Harness<'static> = Harness {
    targets: &TARGETS,
    crate_dir: env!("CARGO_MANIFEST_DIR"),
    failures: "dwcp-codec-fuzz-failures",
};

const BUDGET: Budget = Budget {
    random: 4000,
    mutants: 200,
};

fn replay(target: &str) {
    let fresh = seeds::all()
        .into_iter()
        .filter(|s| s.target == target)
        .map(|s| (s.name, s.data))
        .collect();
    HARNESS.replay(target, fresh, BUDGET, |i, data, _| {
        if let Some(first) = data.first_mut() {
            // Every mode, the structured one most.
            *first = [0, 1, MODE_STRUCTURED, MODE_STRUCTURED][(i % 4) as usize];
        }
    });
}

#[test]
fn every_target_has_a_test() {
    HARNESS.check_target_files(6);
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
