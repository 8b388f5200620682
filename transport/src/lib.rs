//! dwcp-transport: AMST, adaptive multi-stream transfer.
//!
//! A *session* joins a sender and a receiver over one control stream and
//! several data streams, each bound to one core of a [`dwcp_engine`] engine.
//! The handshake authenticates both sides with a pre-shared key
//! ([`auth`]); data travels as chunks, each one HDE codec frame encoded on
//! the core that sends it, addressed by region and offset (placed in any
//! order) or by sequence (delivered in order). The receiver acknowledges a
//! chunk only after it is placed and verified; when a stream fails, its
//! unacknowledged chunks go out on the others ([`sched`]) and the stream is
//! re-opened. docs/transport.md explains the design and docs/wire-format.md
//! every message.

pub mod auth;
mod conn;
pub mod error;
pub mod files;
pub mod memory;
pub mod pace;
mod receiver;
pub mod sched;
mod sender;
pub mod session;
pub mod treehash;
pub mod wire;

pub use auth::Key;

/// The calling thread's CPU time (`CLOCK_THREAD_CPUTIME_ID`): the clock a
/// codec encoder's `auto` times its probes on
/// (`dwcp_codec::Encoder::set_thread_cpu_clock`), which the sans-IO codec
/// cannot read itself.
pub fn thread_cpu_time() -> Option<std::time::Duration> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec for the duration of the
    // call, and CLOCK_THREAD_CPUTIME_ID is a clock id Linux defines; the
    // call writes only `ts`.
    if unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) } != 0 {
        return None;
    }
    Some(std::time::Duration::new(
        u64::try_from(ts.tv_sec).ok()?,
        u32::try_from(ts.tv_nsec).ok()?,
    ))
}

/// Resolves `host:port` to its first address; the error names the input.
pub fn resolve(addr: &str) -> Result<std::net::SocketAddr, TransportError> {
    use std::net::ToSocketAddrs;
    addr.to_socket_addrs()
        .map_err(|e| TransportError::Config(format!("address {addr:?}: {e} (expected host:port)")))?
        .next()
        .ok_or_else(|| TransportError::Config(format!("address {addr:?} resolves to no address")))
}
pub use error::{TransportError, WireError};
pub use memory::{MemorySink, ReceivedRegion};
pub use receiver::Receiver;
pub use sender::{Sender, digest};
pub use session::{
    Event, EventFn, FileSource, Metrics, MetricsSnapshot, ReceiverConfig, RegionInfo, RegionWriter,
    SenderConfig, Sink, Source, StreamCount,
};
