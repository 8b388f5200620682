//! Writes the seed inputs of every fuzz target to `codec/fuzz/seeds/<target>/`
//! (replacing what is there), deterministically; every seed must pass its
//! own target before it is written:
//!
//! ```text
//! cargo run --manifest-path codec/fuzz/Cargo.toml --example make_seeds
//! ```

use dwcp_codec_fuzz::replay::Harness;

fn main() -> std::io::Result<()> {
    let harness = Harness {
        targets: &dwcp_codec_fuzz::TARGETS,
        crate_dir: env!("CARGO_MANIFEST_DIR"),
        failures: "dwcp-codec-fuzz-failures",
    };
    let seeds: Vec<_> = dwcp_codec_fuzz::seeds::all()
        .into_iter()
        .map(|s| (s.target, s.name, s.data))
        .collect();
    let root = harness.write_seeds(&seeds)?;
    println!("wrote {} seeds under {}", seeds.len(), root.display());
    Ok(())
}
