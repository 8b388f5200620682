//! Building, using and stopping an engine.

use std::future::Future;
use std::os::fd::{FromRawFd, OwnedFd};
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use crossbeam_channel::{TrySendError, bounded};
use io_uring::{IoUring, opcode, register::Probe};

use crate::buf::LocalBufPool;
use crate::bufring::LocalBufRing;
use crate::driver::Driver;
use crate::error::{EngineError, TaskError, io_uring_unavailable, panic_message};
use crate::metrics::CoreMetricsSnapshot;
use crate::runtime::{
    self, EngineShared, Local, Message, SendMessage, WorkerRef, WorkerShared, remote_task,
};
use crate::task::RemoteHandle;

/// Provided-buffer group id of each worker's receive ring.
const RECV_BGID: u16 = 0;

/// What the kernel offered when the engine started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Features {
    /// `IORING_OP_SEND_ZC` is available ([`crate::LocalTcpStream::send_zc`]
    /// uses it; otherwise it sends normally).
    pub send_zc: bool,
    /// Multishot receive into a provided-buffer ring is available.
    pub recv_multishot: bool,
    /// Pool buffers are registered with the ring (fixed buffers).
    pub registered_buffers: bool,
    /// The ring runs with `SINGLE_ISSUER | DEFER_TASKRUN`.
    pub defer_taskrun: bool,
}

/// Configures and starts an [`Engine`].
#[derive(Debug, Clone)]
pub struct EngineBuilder {
    workers: Option<usize>,
    cpus: Option<Vec<usize>>,
    ring_entries: u32,
    buffer_count: usize,
    buffer_size: usize,
    register_buffers: bool,
    recv_buffers: u16,
    recv_buffer_size: u32,
    inbox_capacity: usize,
    spin: Duration,
    pin: bool,
}

impl Default for EngineBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl EngineBuilder {
    /// Defaults: one worker per CPU this process may run on, 256-entry
    /// rings, 64 pool buffers of 256 KiB and 64 receive buffers of 64 KiB per
    /// worker, pool buffers registered, 1024-message inboxes, no spinning.
    pub fn new() -> Self {
        Self {
            workers: None,
            cpus: None,
            ring_entries: 256,
            buffer_count: 64,
            buffer_size: 256 * 1024,
            register_buffers: true,
            recv_buffers: 64,
            recv_buffer_size: 64 * 1024,
            inbox_capacity: 1024,
            spin: Duration::ZERO,
            pin: true,
        }
    }

    /// Number of workers (default: the CPUs this process may run on). With
    /// more workers than CPUs, workers share CPUs round-robin.
    pub fn workers(mut self, n: usize) -> Self {
        self.workers = Some(n);
        self
    }

    /// The CPUs to pin workers to, in worker order.
    pub fn cpus(mut self, cpus: Vec<usize>) -> Self {
        self.cpus = Some(cpus);
        self
    }

    /// Submission queue entries per ring (a power of two, 2..=32768); the
    /// completion queue is twice that, and at most that many operations are
    /// in flight per worker before new ones wait.
    pub fn ring_entries(mut self, n: u32) -> Self {
        self.ring_entries = n;
        self
    }

    /// Pool buffers per worker.
    pub fn buffer_count(mut self, n: usize) -> Self {
        self.buffer_count = n;
        self
    }

    /// Size of each pool buffer.
    pub fn buffer_size(mut self, n: usize) -> Self {
        self.buffer_size = n;
        self
    }

    /// Whether to register pool buffers with the ring (fixed buffers).
    pub fn register_buffers(mut self, on: bool) -> Self {
        self.register_buffers = on;
        self
    }

    /// Provided receive buffers per worker (for multishot receive); 0 turns
    /// multishot receive off.
    pub fn recv_buffers(mut self, n: u16) -> Self {
        self.recv_buffers = n;
        self
    }

    /// Size of each provided receive buffer.
    pub fn recv_buffer_size(mut self, n: u32) -> Self {
        self.recv_buffer_size = n;
        self
    }

    /// Capacity of each worker's inbox (messages from other threads).
    pub fn inbox_capacity(mut self, n: usize) -> Self {
        self.inbox_capacity = n;
        self
    }

    /// How long an idle worker polls its ring before it sleeps. Spinning
    /// trades CPU for wake-up latency (request/response traffic).
    pub fn spin(mut self, d: Duration) -> Self {
        self.spin = d;
        self
    }

    /// Whether to pin workers to CPUs (default on).
    pub fn pin(mut self, on: bool) -> Self {
        self.pin = on;
        self
    }

    fn validate(&self) -> Result<(), EngineError> {
        let bad = |s: String| Err(EngineError::InvalidConfig(s));
        if let Some(0) = self.workers {
            return bad("workers must be at least 1".into());
        }
        if self.workers.is_some_and(|w| w > 4096) {
            return bad("at most 4096 workers".into());
        }
        if !self.ring_entries.is_power_of_two() || !(2..=32768).contains(&self.ring_entries) {
            return bad(format!(
                "ring entries must be a power of two in 2..=32768, got {}",
                self.ring_entries
            ));
        }
        if self.buffer_size == 0 || self.buffer_size > 1 << 30 {
            return bad(format!(
                "buffer size must be in 1..=1GiB, got {}",
                self.buffer_size
            ));
        }
        if self.buffer_count > 65536 {
            return bad(format!(
                "at most 65536 pool buffers per worker, got {}",
                self.buffer_count
            ));
        }
        if self.buffer_count.saturating_mul(self.buffer_size) > 16 << 30 {
            return bad("pool larger than 16 GiB per worker".into());
        }
        if self.recv_buffers > 32768 {
            return bad(format!(
                "at most 32768 receive buffers, got {}",
                self.recv_buffers
            ));
        }
        if self.recv_buffers > 0 && (self.recv_buffer_size == 0 || self.recv_buffer_size > 1 << 24)
        {
            return bad(format!(
                "receive buffer size must be in 1..=16MiB, got {}",
                self.recv_buffer_size
            ));
        }
        if self.inbox_capacity == 0 {
            return bad("inbox capacity must be at least 1".into());
        }
        if self.cpus.as_ref().is_some_and(Vec::is_empty) {
            return bad("CPU list is empty".into());
        }
        Ok(())
    }

    /// Starts the workers. Fails, naming the reason, when io_uring is
    /// unavailable or a worker cannot be set up; no thread is left running.
    pub fn build(self) -> Result<Engine, EngineError> {
        self.validate()?;
        let allowed: Vec<usize> = core_affinity::get_core_ids()
            .map(|ids| ids.into_iter().map(|c| c.id).collect())
            .unwrap_or_default();
        let cpus = match &self.cpus {
            Some(list) => {
                for &cpu in list {
                    if !allowed.is_empty() && !allowed.contains(&cpu) {
                        return Err(EngineError::CpuUnavailable {
                            cpu,
                            allowed: allowed.clone(),
                        });
                    }
                }
                list.clone()
            }
            None if allowed.is_empty() => vec![0],
            None => allowed.clone(),
        };
        let workers = self.workers.unwrap_or(cpus.len());
        let probe = probe_kernel()?;

        let mut refs = Vec::with_capacity(workers);
        let mut receivers = Vec::with_capacity(workers);
        for index in 0..workers {
            let (tx, rx) = bounded(self.inbox_capacity);
            // SAFETY: plain eventfd(2) call; the result is checked.
            let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
            if efd < 0 {
                return Err(EngineError::WorkerSetup {
                    worker: index,
                    what: "eventfd",
                    source: std::io::Error::last_os_error(),
                });
            }
            // SAFETY: a new descriptor owned by nobody else.
            let efd = unsafe { OwnedFd::from_raw_fd(efd) };
            let cpu = cpus[index % cpus.len()];
            refs.push(WorkerRef {
                tx,
                shared: Arc::new(WorkerShared::new(index, cpu, efd)),
            });
            receivers.push(rx);
        }
        let shared = Arc::new(EngineShared {
            workers: refs,
            stopped: std::sync::atomic::AtomicBool::new(false),
        });

        let mut engine = Engine {
            shared: shared.clone(),
            threads: Vec::with_capacity(workers),
            features: Features {
                send_zc: probe.send_zc,
                recv_multishot: false,
                registered_buffers: false,
                defer_taskrun: false,
            },
        };
        let (ready_tx, ready_rx) = bounded::<Result<Features, EngineError>>(workers);
        for (index, rx) in receivers.into_iter().enumerate() {
            let config = self.clone();
            let shared = shared.clone();
            let ready = ready_tx.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("dwcp-worker-{index}"))
                .spawn(move || worker_main(index, config, probe, shared, rx, ready));
            match spawned {
                Ok(t) => engine.threads.push(t),
                Err(source) => {
                    engine.stop_now();
                    return Err(EngineError::WorkerSetup {
                        worker: index,
                        what: "thread",
                        source,
                    });
                }
            }
        }
        drop(ready_tx);
        for _ in 0..workers {
            match ready_rx.recv() {
                Ok(Ok(f)) => {
                    engine.features.recv_multishot = f.recv_multishot;
                    engine.features.registered_buffers = f.registered_buffers;
                    engine.features.defer_taskrun = f.defer_taskrun;
                }
                Ok(Err(e)) => {
                    engine.stop_now();
                    return Err(e);
                }
                Err(_) => {
                    engine.stop_now();
                    return Err(EngineError::WorkerDied {
                        worker: 0,
                        message: "a worker exited during start-up".into(),
                    });
                }
            }
        }
        Ok(engine)
    }
}

#[derive(Debug, Clone, Copy)]
struct KernelProbe {
    send_zc: bool,
    recv_multishot: bool,
}

/// Creates a throw-away ring to learn whether io_uring works at all and
/// which operations the kernel has.
fn probe_kernel() -> Result<KernelProbe, EngineError> {
    let ring = IoUring::new(4).map_err(io_uring_unavailable)?;
    let mut probe = Probe::new();
    ring.submitter()
        .register_probe(&mut probe)
        .map_err(|e| EngineError::IoUringUnavailable {
            reason: "IORING_REGISTER_PROBE failed: the kernel is older than 5.6".into(),
            source: e,
        })?;
    let required: [(u8, &'static str); 14] = [
        (opcode::Send::CODE, "IORING_OP_SEND"),
        (opcode::Recv::CODE, "IORING_OP_RECV"),
        (opcode::SendMsg::CODE, "IORING_OP_SENDMSG"),
        (opcode::RecvMsg::CODE, "IORING_OP_RECVMSG"),
        (opcode::Accept::CODE, "IORING_OP_ACCEPT"),
        (opcode::Connect::CODE, "IORING_OP_CONNECT"),
        (opcode::Read::CODE, "IORING_OP_READ"),
        (opcode::Write::CODE, "IORING_OP_WRITE"),
        (opcode::ReadFixed::CODE, "IORING_OP_READ_FIXED"),
        (opcode::Timeout::CODE, "IORING_OP_TIMEOUT"),
        (opcode::AsyncCancel::CODE, "IORING_OP_ASYNC_CANCEL"),
        (opcode::Close::CODE, "IORING_OP_CLOSE"),
        (opcode::OpenAt::CODE, "IORING_OP_OPENAT"),
        (opcode::Shutdown::CODE, "IORING_OP_SHUTDOWN"),
    ];
    for (code, name) in required {
        if !probe.is_supported(code) {
            return Err(EngineError::MissingOperation(name));
        }
    }
    Ok(KernelProbe {
        send_zc: probe.is_supported(opcode::SendZc::CODE),
        // Provided-buffer rings came with 5.19, multishot recv with 6.0;
        // the registration at worker start confirms it.
        recv_multishot: probe.is_supported(opcode::SendZc::CODE),
    })
}

fn build_ring(entries: u32) -> std::io::Result<(IoUring, bool)> {
    let fast = IoUring::builder()
        .setup_cqsize(entries * 2)
        .setup_single_issuer()
        .setup_defer_taskrun()
        .setup_coop_taskrun()
        .setup_taskrun_flag()
        .build(entries);
    match fast {
        Ok(r) => Ok((r, true)),
        Err(_) => IoUring::builder()
            .setup_cqsize(entries * 2)
            .build(entries)
            .map(|r| (r, false)),
    }
}

fn memlock_limit() -> u64 {
    // SAFETY: getrlimit writes into the struct we pass.
    let mut lim: libc::rlimit = unsafe { std::mem::zeroed() };
    // SAFETY: valid resource id and pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut lim) } == 0 {
        lim.rlim_cur
    } else {
        0
    }
}

fn worker_main(
    index: usize,
    config: EngineBuilder,
    probe: KernelProbe,
    engine: Arc<EngineShared>,
    rx: crossbeam_channel::Receiver<Message>,
    ready: crossbeam_channel::Sender<Result<Features, EngineError>>,
) {
    let shared = engine.workers[index].shared.clone();
    let setup = || -> Result<(Rc<Local>, Features), EngineError> {
        if config.pin && !core_affinity::set_for_current(core_affinity::CoreId { id: shared.cpu }) {
            return Err(EngineError::Pin {
                worker: index,
                cpu: shared.cpu,
            });
        }
        let (ring, defer_taskrun) =
            build_ring(config.ring_entries).map_err(io_uring_unavailable)?;
        let pool = LocalBufPool::new(config.buffer_count, config.buffer_size);
        let mut registered = false;
        if config.register_buffers && config.buffer_count > 0 && config.buffer_count <= 16384 {
            let iovecs = pool.iovecs();
            // SAFETY: the iovecs describe the pool allocation, which lives
            // until after the ring is gone (the worker drops the ring first
            // and frees the pool only when no operation is in flight).
            match unsafe { ring.submitter().register_buffers(&iovecs) } {
                Ok(()) => {
                    pool.set_registered();
                    registered = true;
                }
                Err(e) if e.raw_os_error() == Some(libc::ENOMEM) => {
                    return Err(EngineError::MemLockLimit {
                        wanted: (config.buffer_count * config.buffer_size) as u64,
                        limit: memlock_limit(),
                    });
                }
                // Other failures (old kernel, odd memory): plain buffers.
                Err(_) => {}
            }
        }
        let mut recv_ring = None;
        if probe.recv_multishot && config.recv_buffers > 0 {
            let r = LocalBufRing::new(config.recv_buffers, config.recv_buffer_size, RECV_BGID);
            // SAFETY: the ring memory lives in `r`, kept by the worker until
            // after the io_uring is dropped (or leaked).
            let reg = unsafe {
                ring.submitter().register_buf_ring_with_flags(
                    r.ring_addr(),
                    r.entries(),
                    RECV_BGID,
                    0,
                )
            };
            if reg.is_ok() {
                recv_ring = Some(r);
            }
        }
        let features = Features {
            send_zc: probe.send_zc,
            recv_multishot: recv_ring.is_some(),
            registered_buffers: registered,
            defer_taskrun,
        };
        let driver = Driver::new(ring, shared.metrics.clone());
        let local = Rc::new(Local::new(
            driver,
            pool,
            recv_ring,
            shared.clone(),
            engine.clone(),
            config.spin,
            features,
        ));
        Ok((local, features))
    };
    let (local, features) = match setup() {
        Ok(v) => v,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    let _ = ready.send(Ok(features));
    drop(ready);
    runtime::install(local.clone());
    local.run(&rx);
    drop(local);
    runtime::uninstall();
}

/// A running engine: one pinned worker thread and one io_uring per core.
///
/// Dropping it shuts it down (in-flight work is cancelled); prefer
/// [`Engine::shutdown`], which can let tasks finish first.
pub struct Engine {
    shared: Arc<EngineShared>,
    threads: Vec<std::thread::JoinHandle<()>>,
    features: Features,
}

/// A cheap, `Send + Sync` handle to an engine, for other threads and tasks.
#[derive(Clone)]
pub struct EngineHandle {
    shared: Arc<EngineShared>,
}

impl Engine {
    /// A builder with defaults.
    pub fn builder() -> EngineBuilder {
        EngineBuilder::new()
    }

    /// A handle for other threads and tasks.
    pub fn handle(&self) -> EngineHandle {
        EngineHandle {
            shared: self.shared.clone(),
        }
    }

    /// Number of workers.
    pub fn workers(&self) -> usize {
        self.shared.workers.len()
    }

    /// The CPU each worker is pinned to.
    pub fn cpus(&self) -> Vec<usize> {
        self.shared.workers.iter().map(|w| w.shared.cpu).collect()
    }

    /// What the kernel offered.
    pub fn features(&self) -> Features {
        self.features
    }

    /// Starts a task on worker `core`; see [`EngineHandle::spawn_on`].
    pub fn spawn_on<F, Fut, T>(&self, core: usize, make: F) -> Result<RemoteHandle<T>, TaskError>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = T> + 'static,
        T: Send + 'static,
    {
        self.handle().spawn_on(core, make)
    }

    /// Runs a task on worker `core` and waits for its result.
    pub fn block_on<F, Fut, T>(&self, core: usize, make: F) -> Result<T, TaskError>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = T> + 'static,
        T: Send + 'static,
    {
        self.spawn_on(core, make)?.join()
    }

    /// Counters of every worker, readable while the engine runs.
    pub fn metrics(&self) -> Vec<CoreMetricsSnapshot> {
        self.handle().metrics()
    }

    /// Stops taking new work, lets running tasks finish for up to `grace`,
    /// then cancels what is left, waits for the kernel to release every
    /// buffer, closes the rings and joins the workers.
    pub fn shutdown(mut self, grace: Duration) -> Result<(), EngineError> {
        self.stop(grace)
    }

    fn stop(&mut self, grace: Duration) -> Result<(), EngineError> {
        self.shared.stopped.store(true, Ordering::Release);
        for w in &self.shared.workers {
            w.shared.stopping.store(true, Ordering::Release);
            // A full inbox still gets the message: it waits for room, and a
            // stopping worker drains its inbox without running anything.
            let _ = w.tx.send(Message::Shutdown { grace });
            w.shared.notify();
        }
        let mut result = Ok(());
        for (worker, t) in self.threads.drain(..).enumerate() {
            if let Err(payload) = t.join() {
                result = Err(EngineError::WorkerDied {
                    worker,
                    message: panic_message(payload.as_ref()),
                });
            }
        }
        result
    }

    fn stop_now(&mut self) {
        let _ = self.stop(Duration::ZERO);
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        if !self.threads.is_empty() {
            self.stop_now();
        }
    }
}

impl EngineHandle {
    /// The engine of the current worker, if this thread is one.
    pub fn current() -> Option<Self> {
        runtime::with_local(|l| Self {
            shared: l.engine.clone(),
        })
    }

    /// Number of workers.
    pub fn workers(&self) -> usize {
        self.shared.workers.len()
    }

    /// Starts a task on worker `core`: `make` runs there and builds the
    /// future, which need not be `Send`. Blocks while that worker's inbox is
    /// full (backpressure), except on a worker thread, where it fails with
    /// `Busy` instead; workers use [`crate::spawn_on`] to wait without
    /// blocking.
    pub fn spawn_on<F, Fut, T>(&self, core: usize, make: F) -> Result<RemoteHandle<T>, TaskError>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = T> + 'static,
        T: Send + 'static,
    {
        let worker = self.worker(core)?;
        let (msg, handle) = remote_task(make);
        let sent = if runtime::current_worker_uid().is_some() {
            match worker.tx.try_send(msg) {
                Ok(()) => Ok(()),
                Err(TrySendError::Full(_)) => return Err(TaskError::Busy { core }),
                Err(TrySendError::Disconnected(_)) => Err(()),
            }
        } else {
            worker.tx.send(msg).map_err(drop)
        };
        if sent.is_err() {
            return Err(TaskError::EngineStopped);
        }
        worker.shared.notify();
        Ok(handle)
    }

    /// As [`EngineHandle::spawn_on`], but fails with `Busy` instead of
    /// waiting when the inbox is full.
    pub fn try_spawn_on<F, Fut, T>(
        &self,
        core: usize,
        make: F,
    ) -> Result<RemoteHandle<T>, TaskError>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = T> + 'static,
        T: Send + 'static,
    {
        let worker = self.worker(core)?;
        let (msg, handle) = remote_task(make);
        match worker.tx.try_send(msg) {
            Ok(()) => {
                worker.shared.notify();
                Ok(handle)
            }
            Err(TrySendError::Full(_)) => Err(TaskError::Busy { core }),
            Err(TrySendError::Disconnected(_)) => Err(TaskError::EngineStopped),
        }
    }

    fn worker(&self, core: usize) -> Result<&WorkerRef, TaskError> {
        if self.shared.stopped.load(Ordering::Acquire) {
            return Err(TaskError::EngineStopped);
        }
        self.shared.workers.get(core).ok_or(TaskError::NoSuchCore {
            core,
            workers: self.shared.workers.len(),
        })
    }

    /// Counters of every worker.
    pub fn metrics(&self) -> Vec<CoreMetricsSnapshot> {
        self.shared
            .workers
            .iter()
            .map(|w| {
                w.shared
                    .metrics
                    .snapshot(w.shared.index, w.shared.cpu, w.tx.len())
            })
            .collect()
    }
}

/// Starts a task on worker `core` from a worker, waiting without blocking
/// the thread while that worker's inbox is full.
pub async fn spawn_on<F, Fut, T>(core: usize, make: F) -> Result<RemoteHandle<T>, TaskError>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = T> + 'static,
    T: Send + 'static,
{
    let engine = runtime::with_local(|l| l.engine.clone()).ok_or(TaskError::EngineStopped)?;
    if engine.stopped.load(Ordering::Acquire) {
        return Err(TaskError::EngineStopped);
    }
    let (msg, handle) = remote_task(make);
    SendMessage {
        engine: &engine,
        core,
        msg: Some(msg),
    }
    .await?;
    Ok(handle)
}

/// Index of the worker running the current thread, if it is one.
pub fn current_core() -> Option<usize> {
    runtime::with_local(|l| l.shared.index)
}
