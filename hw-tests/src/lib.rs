//! dwcp-hw-tests: tests that need RDMA hardware (not built yet).
//!
//! This crate will hold tests that run the RDMA verbs backend against a real
//! device, gated behind the `rdma_hw` cfg so that clippy still checks them
//! on machines without one. The RDMA backend does not exist yet, so there is
//! nothing to test: the crate is empty on purpose.
