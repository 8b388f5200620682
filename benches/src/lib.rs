//! Criterion benches of dwcp's stages live in `benches/benches/`; this
//! library is empty and exists so the package has a target of its own.
