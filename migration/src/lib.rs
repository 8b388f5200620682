//! dwcp-migration: pre-copy live migration.
//!
//! Being built (issue 5). So far: the hypervisor traits ([`hv`]) that the
//! migration drivers will use and that a KVM guest, a synthetic guest or a
//! C VMM implement. The drivers, the convergence controller and the KVM
//! guest are not here yet; nothing in this crate migrates anything yet.

pub mod hv;
