//! libdwcp: the C ABI of dwcp (not built yet).
//!
//! This crate builds `libdwcp.so` and `libdwcp.a`. It will export opaque
//! handles for the engine, transfers and migrations, status codes, a
//! per-thread last-error message and a cbindgen-generated `dwcp.h`, as
//! `ARCHITECTURE.md` ("C ABI") describes. Its issue has not been worked on:
//! the library exports nothing yet, on purpose.
