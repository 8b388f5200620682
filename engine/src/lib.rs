//! dwcp-engine: the thread-per-core runtime (not built yet).
//!
//! This crate will hold one pinned worker thread and one `io_uring` per core,
//! per-core buffer pools, bounded cross-core inboxes, timers and per-core
//! metrics, as `ARCHITECTURE.md` ("The engine: thread-per-core") describes.
//! Its issue has not been worked on: the crate is empty on purpose and
//! offers no API, so nothing can mistake it for a working runtime.
