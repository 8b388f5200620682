//! dwcp-engine: the thread-per-core runtime.
//!
//! One worker thread per core, pinned with `core_affinity`, each owning its
//! own `io_uring`, its own pool of fixed-size buffers (registered with the
//! ring), its own ring of provided receive buffers, and a bounded inbox.
//! Nothing on the data path is shared between cores: a task runs on the core
//! it was started on, with every socket and buffer it touches (`Local*`
//! types are `!Send`). Cores talk through their inboxes:
//! [`Engine::spawn_on`] from any thread, [`spawn_on`] from a worker, with a
//! [`RemoteHandle`] for the reply.
//!
//! Every operation is a future that owns its buffers while the kernel uses
//! them and hands them back with the result ([`BufResult`]). Dropping the
//! future cancels the operation; its buffers stay with the engine until the
//! kernel's final completion, so the kernel never writes into freed memory.
//!
//! Backpressure, never unbounded memory: at most the completion-queue size
//! of operations are in flight per worker (more wait for room), an empty
//! buffer pool makes [`LocalBufPool::get`] wait, a full inbox makes
//! [`Engine::spawn_on`] block (or [`spawn_on`] wait, on a worker), and a
//! multishot receive whose buffers are all held waits for one to return.
//!
//! ```
//! use dwcp_engine::{Engine, LocalTcpListener, LocalTcpStream};
//!
//! let engine = Engine::builder().workers(2).build()?;
//! let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
//! let addr = listener.local_addr()?;
//! let server = engine.spawn_on(1, move || async move {
//!     let listener = LocalTcpListener::from_std(listener);
//!     let (conn, _) = listener.accept().await?;
//!     let (n, buf) = conn.recv(vec![0u8; 5]).await;
//!     n.map(|n| buf[..n].to_vec())
//! })?;
//! engine.block_on(0, move || async move {
//!     let conn = LocalTcpStream::connect(addr).await?;
//!     conn.send_all(b"hello".to_vec()).await.0
//! })??;
//! assert_eq!(server.join()??, b"hello");
//! engine.shutdown(std::time::Duration::from_secs(1))?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod buf;
mod bufring;
mod driver;
mod engine;
mod error;
mod fs;
mod metrics;
mod net;
mod op;
mod runtime;
mod task;
mod time;

pub use buf::{BufResult, GetBuf, IoBuf, IoBufMut, LocalBufPool, PoolBuf, Slice};
pub use bufring::{LocalBufRing, RingBuf};
pub use engine::{Engine, EngineBuilder, EngineHandle, Features, current_core, spawn_on};
pub use error::{EngineError, TaskError};
pub use fs::{LocalFile, OpenOptions};
pub use metrics::{CoreMetrics, CoreMetricsSnapshot, Counter};
pub use net::{LocalTcpListener, LocalTcpStream, RecvStream, ZeroCopy};
pub use runtime::{local_state, spawn_local};
pub use task::{JoinHandle, RemoteHandle};
pub use time::{Elapsed, Sleep, Timeout, sleep, timeout, yield_now};
