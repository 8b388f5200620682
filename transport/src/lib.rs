//! dwcp-transport: AMST, adaptive multi-stream transfer (not built yet).
//!
//! This crate will hold the session handshake with mutual authentication,
//! the data-stream frames (region and ordered addressing), per-stream
//! credits, acknowledgement and retransmission across streams, pacing, and
//! the TCP-on-io_uring and RDMA verbs backends, as `ARCHITECTURE.md`
//! ("Transport: AMST") describes. Its issue has not been worked on: the crate
//! is empty on purpose and offers no API.
