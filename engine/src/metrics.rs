//! Per-core counters, written by their worker only and readable from any
//! thread while the engine runs.

use std::sync::atomic::{AtomicU64, Ordering};

/// A counter with a single writer (its worker) and any number of readers.
///
/// Increments are a relaxed load and store, not a locked read-modify-write:
/// only the owning worker writes, so no increment is lost, and readers see a
/// value that is at most a few operations old.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub(crate) fn add(&self, n: u64) {
        let v = self.0.load(Ordering::Relaxed);
        self.0.store(v.wrapping_add(n), Ordering::Relaxed);
    }

    pub(crate) fn incr(&self) {
        self.add(1);
    }

    pub(crate) fn set(&self, v: u64) {
        self.0.store(v, Ordering::Relaxed);
    }

    /// The current value.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Live counters of one worker.
#[derive(Debug, Default)]
pub struct CoreMetrics {
    /// Operations handed to the ring.
    pub ops_submitted: Counter,
    /// Operations whose final completion arrived.
    pub ops_completed: Counter,
    /// Bytes received from sockets and read from files.
    pub bytes_in: Counter,
    /// Bytes sent to sockets and written to files.
    pub bytes_out: Counter,
    /// Operations in the kernel right now.
    pub ring_depth: Counter,
    /// Times an operation waited because the ring was full.
    pub ring_full_waits: Counter,
    /// Times a task waited for a pool buffer.
    pub buffer_waits: Counter,
    /// Nanoseconds spent running tasks and handling completions.
    pub busy_ns: Counter,
    /// Nanoseconds spent asleep in the ring waiting for work.
    pub idle_ns: Counter,
    /// Tasks started on this core.
    pub tasks_spawned: Counter,
    /// Tasks that ran to completion.
    pub tasks_completed: Counter,
    /// Tasks that panicked (caught, reported to their handle).
    pub tasks_panicked: Counter,
    /// Tasks alive right now.
    pub tasks_live: Counter,
}

/// A copy of one worker's counters at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CoreMetricsSnapshot {
    /// Worker index.
    pub worker: usize,
    /// CPU it is pinned to.
    pub cpu: usize,
    /// Operations handed to the ring.
    pub ops_submitted: u64,
    /// Operations whose final completion arrived.
    pub ops_completed: u64,
    /// Bytes received from sockets and read from files.
    pub bytes_in: u64,
    /// Bytes sent to sockets and written to files.
    pub bytes_out: u64,
    /// Operations in the kernel right now.
    pub ring_depth: u64,
    /// Messages waiting in the worker's inbox.
    pub inbox_depth: u64,
    /// Times an operation waited because the ring was full.
    pub ring_full_waits: u64,
    /// Times a task waited for a pool buffer.
    pub buffer_waits: u64,
    /// Nanoseconds spent running tasks and handling completions.
    pub busy_ns: u64,
    /// Nanoseconds spent asleep waiting for work.
    pub idle_ns: u64,
    /// Tasks started on this core.
    pub tasks_spawned: u64,
    /// Tasks that ran to completion.
    pub tasks_completed: u64,
    /// Tasks that panicked.
    pub tasks_panicked: u64,
    /// Tasks alive right now.
    pub tasks_live: u64,
}

impl CoreMetrics {
    pub(crate) fn snapshot(&self, worker: usize, cpu: usize, inbox: usize) -> CoreMetricsSnapshot {
        CoreMetricsSnapshot {
            worker,
            cpu,
            ops_submitted: self.ops_submitted.get(),
            ops_completed: self.ops_completed.get(),
            bytes_in: self.bytes_in.get(),
            bytes_out: self.bytes_out.get(),
            ring_depth: self.ring_depth.get(),
            inbox_depth: inbox as u64,
            ring_full_waits: self.ring_full_waits.get(),
            buffer_waits: self.buffer_waits.get(),
            busy_ns: self.busy_ns.get(),
            idle_ns: self.idle_ns.get(),
            tasks_spawned: self.tasks_spawned.get(),
            tasks_completed: self.tasks_completed.get(),
            tasks_panicked: self.tasks_panicked.get(),
            tasks_live: self.tasks_live.get(),
        }
    }
}
