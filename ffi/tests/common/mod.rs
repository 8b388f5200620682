//! What the integration tests share.

/// The name of every function `ffi/src` exports to C (`pub extern "C" fn`
/// or `pub unsafe extern "C" fn`), from all its source files.
pub fn exports() -> Vec<String> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut names = Vec::new();
    for entry in std::fs::read_dir(&dir).expect("listing ffi/src") {
        let file = entry.expect("an entry of ffi/src").path();
        if file.extension().is_none_or(|e| e != "rs") {
            continue;
        }
        let src = std::fs::read_to_string(&file)
            .unwrap_or_else(|e| panic!("reading {}: {e}", file.display()));
        for line in src.lines() {
            if let Some(rest) = line
                .strip_prefix("pub unsafe extern \"C\" fn ")
                .or_else(|| line.strip_prefix("pub extern \"C\" fn "))
            {
                names.push(rest.split('(').next().unwrap_or_default().to_string());
            }
        }
    }
    names
}
