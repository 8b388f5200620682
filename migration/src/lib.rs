//! dwcp-migration: pre-copy live migration.
//!
//! Being built (issue 5). So far: the hypervisor traits ([`hv`]) that the
//! migration drivers will use and that a KVM guest, a synthetic guest or a
//! C VMM implement, and the sans-IO convergence controller ([`controller`])
//! that decides after each round whether to go on, throttle, stop-and-copy
//! or give up. [`kvm`] is a real KVM guest that implements the traits (one
//! vCPU running a workload that dirties memory at a chosen rate; Linux on
//! x86-64). [`precopy`] migrates a guest over an AMST session: the source
//! driver runs rounds under the controller and stops and copies; the
//! destination applies verified page batches and starts the guest. Not
//! here yet: the `dwcp migrate` commands, the benchmark, cancellation from
//! outside, and a whole-memory digest comparison outside the downtime.

pub mod controller;
pub mod hv;
#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
pub mod kvm;
pub mod precopy;
pub mod synthetic;
