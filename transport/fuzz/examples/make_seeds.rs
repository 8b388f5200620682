//! Writes the seed inputs of every fuzz target to `transport/fuzz/seeds/<target>/`
//! (replacing what is there), deterministically:
//!
//! ```text
//! cargo run --manifest-path transport/fuzz/Cargo.toml --example make_seeds
//! ```

use std::fs;
use std::path::Path;

fn main() -> std::io::Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("seeds");
    let seeds = dwcp_transport_fuzz::seeds::all();
    for (target, _) in dwcp_transport_fuzz::TARGETS {
        let dir = root.join(target);
        if dir.exists() {
            fs::remove_dir_all(&dir)?;
        }
        fs::create_dir_all(&dir)?;
    }
    for s in &seeds {
        // Every seed must pass its own target before it is written.
        let (_, f) = dwcp_transport_fuzz::TARGETS
            .iter()
            .find(|(t, _)| *t == s.target)
            .expect("a known target");
        f(&s.data);
        fs::write(root.join(s.target).join(&s.name), &s.data)?;
    }
    println!("wrote {} seeds under {}", seeds.len(), root.display());
    Ok(())
}
