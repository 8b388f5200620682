//! The committed header matches this crate: its version macros are the
//! crate's version, and it declares every export of the library. (CI also
//! regenerates it with cbindgen and fails on any difference.)

mod common;

use std::ffi::CStr;

const HEADER: &str = include_str!("../include/dwcp.h");

fn define(name: &str) -> &'static str {
    HEADER
        .lines()
        .find_map(|l| l.strip_prefix(&format!("#define {name} ")))
        .unwrap_or_else(|| panic!("dwcp.h defines no {name}"))
        .trim()
}

#[test]
fn version_macros_match_the_crate() {
    assert_eq!(
        define("DWCP_VERSION_MAJOR"),
        env!("CARGO_PKG_VERSION_MAJOR")
    );
    assert_eq!(
        define("DWCP_VERSION_MINOR"),
        env!("CARGO_PKG_VERSION_MINOR")
    );
    assert_eq!(
        define("DWCP_VERSION_PATCH"),
        env!("CARGO_PKG_VERSION_PATCH")
    );
    assert_eq!(
        define("DWCP_VERSION_STRING"),
        format!("\"{}\"", env!("CARGO_PKG_VERSION"))
    );
    // SAFETY: `dwcp_version` returns a static NUL-terminated string.
    let v = unsafe { CStr::from_ptr(dwcp::dwcp_version()) };
    assert_eq!(v.to_str().unwrap(), env!("CARGO_PKG_VERSION"));
    let n: u32 = env!("CARGO_PKG_VERSION_MAJOR").parse::<u32>().unwrap() << 16
        | env!("CARGO_PKG_VERSION_MINOR").parse::<u32>().unwrap() << 8
        | env!("CARGO_PKG_VERSION_PATCH").parse::<u32>().unwrap();
    assert_eq!(dwcp::dwcp_version_number(), n);
}

#[test]
fn the_header_declares_every_export() {
    let exports = common::exports();
    for name in &exports {
        assert!(
            HEADER.contains(&format!(" {name}(")) || HEADER.contains(&format!("*{name}(")),
            "dwcp.h does not declare {name}: regenerate it (ffi/cbindgen.toml)"
        );
    }
    let n = exports.len();
    assert!(n > 40, "found only {n} exports");
}
