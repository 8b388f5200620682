//! dwcp-migration: pre-copy live migration (not built yet).
//!
//! This crate will hold the source and destination drivers, the sans-IO
//! convergence controller (dirty rate, bandwidth, predicted downtime), the
//! hypervisor traits (dirty bitmap, pause, resume, throttle, device state)
//! and a KVM-backed guest, as `ARCHITECTURE.md` ("Migration: pre-copy")
//! describes. Its issue has not been worked on: the crate is empty on
//! purpose and offers no API.
