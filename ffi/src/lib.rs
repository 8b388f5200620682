//! libdwcp: the C ABI of dwcp.
//!
//! This crate builds `libdwcp.so` and `libdwcp.a`; `include/dwcp.h` is
//! generated from it by cbindgen (`cbindgen.toml`) and committed. It
//! translates and decides nothing: every call maps onto the engine
//! (`dwcp_engine`), transport (`dwcp_transport()`) and migration
//! (`dwcp_migration`) crates.
//!
//! Conventions (STYLE.md §7), written again in the header:
//! - every call returns a `dwcp_status`; results go through
//!   out-parameters written only on success;
//! - a failed call leaves a message for the calling thread, copied out by
//!   `dwcp_last_error()`;
//! - handles are opaque and made by `_new` / `dwcp_connect` /
//!   `dwcp_listen` calls, freed by their `_free` (NULL is fine);
//! - every pointer is checked for NULL; strings must be UTF-8;
//! - no panic crosses the boundary: each export runs under
//!   `catch_unwind` and returns `DWCP_STATUS_PANIC`.
//!
//! docs/c-api.md is the guide for hypervisor authors; ffi/examples/kvm_vmm.c
//! the worked example.
//!
//! There is no ABI stability across releases: rebuild against the header
//! of the library you link (`DWCP_VERSION_STRING` vs [`engine::dwcp_version`]).

#![allow(non_camel_case_types)]

pub mod engine;
pub mod migration;
mod ptr;
pub mod status;
pub mod transfer;

pub use engine::*;
pub use migration::*;
pub use status::*;
pub use transfer::*;
