//! The worker: its thread-local state, executor and main loop.
//!
//! A worker loops over: inbox messages, remote wake-ups, ready tasks, then
//! one `io_uring_enter` that submits what the tasks queued and reaps what
//! completed. With nothing to do it sleeps inside the ring; an eventfd read
//! kept armed in the ring lets other threads wake it.

use std::any::{Any, TypeId};
use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::os::fd::{AsRawFd, OwnedFd};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering, fence};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TryRecvError, TrySendError};
use io_uring::{opcode, types};
use slab::Slab;

use crate::buf::LocalBufPool;
use crate::bufring::LocalBufRing;
use crate::driver::{Driver, WAKE_TOKEN};
use crate::error::{TaskError, panic_message};
use crate::metrics::CoreMetrics;
use crate::task::{
    Completer, JoinHandle, JoinState, RemoteCompleter, RemoteHandle, RemoteState, TaskWaker,
};

/// Polls between two looks at the ring, so a busy core still reaps.
const POLL_BUDGET: usize = 128;
/// Inbox messages taken per loop turn.
const INBOX_BUDGET: usize = 64;
/// How long a worker waits for in-flight operations to finish at shutdown
/// after cancelling them, before it leaks their buffers instead.
const TEARDOWN_WAIT: Duration = Duration::from_secs(5);

static NEXT_UID: AtomicUsize = AtomicUsize::new(1);

pub(crate) fn next_uid() -> usize {
    NEXT_UID.fetch_add(1, Ordering::Relaxed)
}

/// A message in a worker's inbox.
pub(crate) enum Message {
    /// Run this on the worker (it usually spawns a task).
    Run(Box<dyn FnOnce() + Send>),
    /// Stop taking work; finish tasks within `grace`, then cancel the rest.
    Shutdown { grace: Duration },
}

/// The part of a worker other threads can see.
pub(crate) struct WorkerShared {
    /// Unique across engines in this process.
    pub uid: usize,
    pub index: usize,
    pub cpu: usize,
    pub metrics: Arc<CoreMetrics>,
    remote_wakes: Mutex<Vec<u64>>,
    has_remote_wakes: AtomicBool,
    sleeping: AtomicBool,
    eventfd: OwnedFd,
    /// Set once the worker stops taking new work.
    pub stopping: AtomicBool,
}

impl WorkerShared {
    pub fn new(index: usize, cpu: usize, eventfd: OwnedFd) -> Self {
        Self {
            uid: next_uid(),
            index,
            cpu,
            metrics: Arc::new(CoreMetrics::default()),
            remote_wakes: Mutex::new(Vec::new()),
            has_remote_wakes: AtomicBool::new(false),
            sleeping: AtomicBool::new(false),
            eventfd,
            stopping: AtomicBool::new(false),
        }
    }

    /// Queues a wake-up for task `key` from another thread.
    pub fn wake_remote(&self, key: u64) {
        match self.remote_wakes.lock() {
            Ok(mut g) => g.push(key),
            Err(p) => p.into_inner().push(key),
        }
        self.has_remote_wakes.store(true, Ordering::Release);
        self.notify();
    }

    /// Wakes the worker if it sleeps in the ring.
    pub fn notify(&self) {
        // Pairs with the fence in the worker between setting `sleeping` and
        // its last look at the inbox: either it sees our message, or we see
        // it sleeping and write the eventfd.
        fence(Ordering::SeqCst);
        if self.sleeping.load(Ordering::SeqCst) {
            let one: u64 = 1;
            // SAFETY: writes 8 bytes from a live u64 to an eventfd we own.
            let _ = unsafe {
                libc::write(
                    self.eventfd.as_raw_fd(),
                    (&raw const one).cast::<libc::c_void>(),
                    8,
                )
            };
        }
    }
}

/// Handles other threads use to reach each worker.
pub(crate) struct WorkerRef {
    pub tx: Sender<Message>,
    pub shared: Arc<WorkerShared>,
}

/// Everything the workers of one engine share: how to reach each other.
pub(crate) struct EngineShared {
    pub workers: Vec<WorkerRef>,
    pub stopped: AtomicBool,
}

struct Task {
    generation: u32,
    future: Option<Pin<Box<dyn Future<Output = ()>>>>,
    waker: Arc<TaskWaker>,
    on_panic: Option<Box<dyn FnOnce(String)>>,
}

/// A worker's thread-local state.
pub(crate) struct Local {
    pub driver: RefCell<Driver>,
    tasks: RefCell<Slab<Task>>,
    next_generation: Cell<u32>,
    pub pool: LocalBufPool,
    pub recv_ring: Option<LocalBufRing>,
    pub shared: Arc<WorkerShared>,
    pub engine: Arc<EngineShared>,
    state: RefCell<HashMap<TypeId, Rc<dyn Any>>>,
    /// Wakers to call on the next loop turn (producers waiting on a full
    /// inbox elsewhere).
    deferred: RefCell<Vec<Waker>>,
    /// How long to poll the ring before sleeping when idle.
    spin: Duration,
    /// What the kernel offered.
    pub features: crate::engine::Features,
    /// Read target of the wake-up eventfd. Freed with the worker once
    /// teardown saw the kernel finish the read on it; leaked otherwise
    /// (the kernel may still write it while the ring closes).
    wake_buf: *mut u64,
    /// Teardown saw the last wake-up read complete: `wake_buf` may be
    /// freed.
    wake_buf_idle: Cell<bool>,
}

impl Drop for Local {
    fn drop(&mut self) {
        if self.wake_buf_idle.get() {
            // SAFETY: made by `Box::into_raw` in `Local::new`, freed only
            // here, and no read into it is in flight (teardown saw the
            // kernel complete the last one and armed none after).
            drop(unsafe { Box::from_raw(self.wake_buf) });
        }
    }
}

thread_local! {
    static CURRENT: RefCell<Option<Rc<Local>>> = const { RefCell::new(None) };
    static CURRENT_UID: Cell<usize> = const { Cell::new(0) };
    static RUN_QUEUE: RefCell<VecDeque<u64>> = RefCell::new(VecDeque::with_capacity(256));
}

pub(crate) fn current_worker_uid() -> Option<usize> {
    let uid = CURRENT_UID.with(Cell::get);
    (uid != 0).then_some(uid)
}

pub(crate) fn push_local_run_queue(key: u64) {
    RUN_QUEUE.with(|q| q.borrow_mut().push_back(key));
}

/// Runs `f` with the current worker's state, or returns `None` off-engine.
pub(crate) fn with_local<R>(f: impl FnOnce(&Rc<Local>) -> R) -> Option<R> {
    let local = CURRENT.with(|c| c.borrow().clone())?;
    Some(f(&local))
}

/// Counts bytes received or read on the current worker.
pub(crate) fn count_in(n: u32) {
    let _ = with_local(|l| l.shared.metrics.bytes_in.add(n as u64));
}

/// Counts bytes sent or written on the current worker.
pub(crate) fn count_out(n: u32) {
    let _ = with_local(|l| l.shared.metrics.bytes_out.add(n as u64));
}

/// The error an operation returns when polled outside a worker.
pub(crate) fn not_on_worker() -> std::io::Error {
    std::io::Error::other("not on a dwcp engine worker thread")
}

fn split_key(key: u64) -> (usize, u32) {
    ((key & 0xffff_ffff) as usize, (key >> 32) as u32)
}

impl Local {
    pub fn new(
        driver: Driver,
        pool: LocalBufPool,
        recv_ring: Option<LocalBufRing>,
        shared: Arc<WorkerShared>,
        engine: Arc<EngineShared>,
        spin: Duration,
        features: crate::engine::Features,
    ) -> Self {
        Self {
            driver: RefCell::new(driver),
            tasks: RefCell::new(Slab::with_capacity(64)),
            next_generation: Cell::new(0),
            pool,
            recv_ring,
            shared,
            engine,
            state: RefCell::new(HashMap::new()),
            deferred: RefCell::new(Vec::new()),
            spin,
            features,
            wake_buf: Box::into_raw(Box::new(0u64)),
            wake_buf_idle: Cell::new(false),
        }
    }

    fn spawn_boxed(
        &self,
        future: Pin<Box<dyn Future<Output = ()>>>,
        on_panic: Option<Box<dyn FnOnce(String)>>,
    ) -> u64 {
        let generation = self.next_generation.get().wrapping_add(1);
        self.next_generation.set(generation);
        let mut tasks = self.tasks.borrow_mut();
        let entry = tasks.vacant_entry();
        let key = ((generation as u64) << 32) | entry.key() as u64;
        let waker = Arc::new(TaskWaker {
            key,
            scheduled: AtomicBool::new(true),
            worker: self.shared.clone(),
        });
        entry.insert(Task {
            generation,
            future: Some(future),
            waker,
            on_panic,
        });
        push_local_run_queue(key);
        self.shared.metrics.tasks_spawned.incr();
        self.shared.metrics.tasks_live.set(tasks.len() as u64);
        key
    }

    /// Polls ready tasks; returns how many polls ran.
    fn run_ready(&self) -> usize {
        let mut polls = 0;
        while polls < POLL_BUDGET {
            let Some(key) = RUN_QUEUE.with(|q| q.borrow_mut().pop_front()) else {
                break;
            };
            let (idx, generation) = split_key(key);
            let (future, waker) = {
                let mut tasks = self.tasks.borrow_mut();
                match tasks.get_mut(idx) {
                    Some(t) if t.generation == generation => (t.future.take(), t.waker.clone()),
                    _ => continue,
                }
            };
            let Some(mut future) = future else { continue };
            waker.scheduled.store(false, Ordering::Release);
            let waker = Waker::from(waker);
            let mut cx = Context::from_waker(&waker);
            let result = catch_unwind(AssertUnwindSafe(|| future.as_mut().poll(&mut cx)));
            polls += 1;
            match result {
                Ok(Poll::Pending) => {
                    let mut tasks = self.tasks.borrow_mut();
                    match tasks.get_mut(idx) {
                        Some(t) if t.generation == generation => t.future = Some(future),
                        // Aborted while it ran: drop it below, outside the borrow.
                        _ => {
                            drop(tasks);
                            drop_quietly(future);
                        }
                    }
                }
                Ok(Poll::Ready(())) => {
                    self.remove_task(idx, generation);
                    drop_quietly(future);
                    self.shared.metrics.tasks_completed.incr();
                }
                Err(payload) => {
                    let message = panic_message(payload.as_ref());
                    let task = self.remove_task(idx, generation);
                    self.shared.metrics.tasks_panicked.incr();
                    if let Some(on_panic) = task.and_then(|t| t.on_panic) {
                        on_panic(message);
                    }
                    drop_quietly(future);
                }
            }
        }
        polls
    }

    fn remove_task(&self, idx: usize, generation: u32) -> Option<Task> {
        let mut tasks = self.tasks.borrow_mut();
        let task = match tasks.get(idx) {
            Some(t) if t.generation == generation => Some(tasks.remove(idx)),
            _ => None,
        };
        self.shared.metrics.tasks_live.set(tasks.len() as u64);
        task
    }

    fn arm_wake_read(&self) {
        let mut driver = self.driver.borrow_mut();
        if driver.wake_armed {
            return;
        }
        let entry = opcode::Read::new(
            types::Fd(self.shared.eventfd.as_raw_fd()),
            self.wake_buf.cast::<u8>(),
            8,
        )
        .build();
        // SAFETY: `wake_buf` is a heap u64 freed only when the worker is
        // dropped after teardown saw this read complete (or never), so it
        // outlives the read.
        if unsafe { driver.submit_internal(entry, WAKE_TOKEN) }.is_ok() {
            driver.wake_armed = true;
        }
    }

    fn has_remote_work(&self, rx: &Receiver<Message>) -> bool {
        !rx.is_empty() || self.shared.has_remote_wakes.load(Ordering::Acquire)
    }

    /// The worker's main loop. Returns when shut down.
    pub fn run(self: &Rc<Self>, rx: &Receiver<Message>) {
        let metrics = self.shared.metrics.clone();
        let mut draining: Option<Instant> = None;
        let mut turn_start = Instant::now();
        loop {
            // 1. Inbox.
            for _ in 0..INBOX_BUDGET {
                match rx.try_recv() {
                    Ok(Message::Run(f)) => {
                        if draining.is_some() {
                            // Dropping it completes its handle with
                            // `EngineStopped`.
                            drop_quietly(f);
                        } else if let Err(payload) = catch_unwind(AssertUnwindSafe(f)) {
                            metrics.tasks_panicked.incr();
                            let _ = payload;
                        }
                    }
                    Ok(Message::Shutdown { grace }) => {
                        self.shared.stopping.store(true, Ordering::Release);
                        let deadline = Instant::now() + grace;
                        draining = Some(draining.map_or(deadline, |d| d.min(deadline)));
                    }
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        self.shared.stopping.store(true, Ordering::Release);
                        draining.get_or_insert_with(Instant::now);
                        break;
                    }
                }
            }
            // 2. Wake-ups from other threads.
            if self.shared.has_remote_wakes.swap(false, Ordering::AcqRel) {
                let keys = match self.shared.remote_wakes.lock() {
                    Ok(mut g) => std::mem::take(&mut *g),
                    Err(p) => std::mem::take(&mut *p.into_inner()),
                };
                RUN_QUEUE.with(|q| q.borrow_mut().extend(keys));
            }
            // 3. Tasks.
            self.run_ready();
            for w in self.deferred.borrow_mut().drain(..) {
                w.wake();
            }
            if draining.is_some_and(|d| self.tasks.borrow().is_empty() || Instant::now() >= d) {
                break;
            }
            // 4. Ring: submit, and reap or sleep.
            let mut idle = Duration::ZERO;
            let ready = RUN_QUEUE.with(|q| !q.borrow().is_empty());
            if ready || self.has_remote_work(rx) {
                let _ = self.driver.borrow_mut().enter(None);
            } else if !self.spin_for_work(rx) {
                idle = self.sleep(rx, draining);
            }
            let outcome = self.driver.borrow_mut().reap();
            if outcome.woken {
                self.driver.borrow_mut().wake_armed = false;
            }
            let now = Instant::now();
            metrics.busy_ns.add(
                now.duration_since(turn_start)
                    .saturating_sub(idle)
                    .as_nanos() as u64,
            );
            turn_start = now;
        }
        self.teardown(rx);
    }

    /// Polls the ring for a short while before sleeping (lower wake-up
    /// latency for request/response traffic). True when work showed up.
    fn spin_for_work(&self, rx: &Receiver<Message>) -> bool {
        if self.spin.is_zero() {
            return false;
        }
        let until = Instant::now() + self.spin;
        loop {
            let _ = self.driver.borrow_mut().enter(None);
            let mut driver = self.driver.borrow_mut();
            let outcome = driver.reap();
            if outcome.woken {
                driver.wake_armed = false;
            }
            drop(driver);
            if outcome.completions > 0
                || self.has_remote_work(rx)
                || RUN_QUEUE.with(|q| !q.borrow().is_empty())
            {
                return true;
            }
            if Instant::now() >= until {
                return false;
            }
            std::hint::spin_loop();
        }
    }

    /// Sleeps in the ring; returns how long (counted as idle, not busy).
    fn sleep(&self, rx: &Receiver<Message>, draining: Option<Instant>) -> Duration {
        self.arm_wake_read();
        self.shared.sleeping.store(true, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        if self.has_remote_work(rx) {
            self.shared.sleeping.store(false, Ordering::SeqCst);
            let _ = self.driver.borrow_mut().enter(None);
            return Duration::ZERO;
        }
        let timeout = if !self.deferred.borrow().is_empty() {
            Some(Duration::from_micros(50))
        } else {
            draining.map(|d| d.saturating_duration_since(Instant::now()))
        };
        let start = Instant::now();
        let _ = self.driver.borrow_mut().enter(Some(timeout));
        self.shared.sleeping.store(false, Ordering::SeqCst);
        let slept = start.elapsed();
        self.shared.metrics.idle_ns.add(slept.as_nanos() as u64);
        slept
    }

    /// Cancels what is left and waits for the kernel to let go of every
    /// buffer before the worker's memory is freed.
    fn teardown(self: &Rc<Self>, rx: &Receiver<Message>) {
        self.shared.stopping.store(true, Ordering::Release);
        // Tasks first: dropping them abandons their operations.
        loop {
            let tasks: Vec<Task> = self.tasks.borrow_mut().drain().collect();
            if tasks.is_empty() {
                break;
            }
            for task in tasks {
                drop_task(task);
            }
        }
        self.shared.metrics.tasks_live.set(0);
        // Messages nobody will run: their handles learn the engine stopped.
        while let Ok(msg) = rx.try_recv() {
            drop_quietly(msg);
        }
        let mut driver = self.driver.borrow_mut();
        driver.cancel_everything();
        let deadline = Instant::now() + TEARDOWN_WAIT;
        // The wake-up read is cancelled too; wait for it as well, so that
        // its buffer can be freed.
        while (driver.in_flight() > 0 || driver.wake_armed) && Instant::now() < deadline {
            let _ = driver.enter(Some(Some(Duration::from_millis(10))));
            if driver.reap().woken {
                driver.wake_armed = false;
            }
        }
        self.wake_buf_idle.set(!driver.wake_armed);
        if driver.in_flight() > 0 {
            // The kernel still holds buffers: never free memory it may write.
            driver.leak_parked();
            self.pool.leak();
            if let Some(r) = &self.recv_ring {
                r.leak();
            }
        }
    }
}

/// Drops a task's future; if the drop panics, its handle learns so (the
/// completer inside could not report while unwinding).
fn drop_task(task: Task) {
    let Some(f) = task.future else { return };
    if let (Err(_), Some(on_panic)) = (
        catch_unwind(AssertUnwindSafe(move || drop(f))),
        task.on_panic,
    ) {
        on_panic("task panicked while being dropped".into());
    }
}

fn drop_quietly<T>(value: T) {
    let _ = catch_unwind(AssertUnwindSafe(move || drop(value)));
}

pub(crate) fn install(local: Rc<Local>) {
    CURRENT_UID.with(|c| c.set(local.shared.uid));
    CURRENT.with(|c| *c.borrow_mut() = Some(local));
}

pub(crate) fn uninstall() {
    // Drop order: the state (with the ring) goes before the uid is cleared,
    // so drops that run now still see they are on the worker.
    let local = CURRENT.with(|c| c.borrow_mut().take());
    drop(local);
    RUN_QUEUE.with(|q| q.borrow_mut().clear());
    CURRENT_UID.with(|c| c.set(0));
}

/// Starts a task on the current core.
///
/// The future does not need to be `Send`: it never leaves this core. Returns
/// `Err(TaskError::EngineStopped)` off-engine or while shutting down.
pub fn spawn_local<F>(future: F) -> Result<JoinHandle<F::Output>, TaskError>
where
    F: Future + 'static,
    F::Output: 'static,
{
    with_local(|local| {
        if local.shared.stopping.load(Ordering::Acquire) {
            return Err(TaskError::EngineStopped);
        }
        let state = JoinState::new();
        let completer = Completer(state.clone());
        let panic_state = state.clone();
        let key = local.spawn_boxed(
            Box::pin(async move {
                let completer = completer;
                let out = future.await;
                completer.0.complete(Ok(out));
            }),
            Some(Box::new(move |msg| {
                panic_state.complete(Err(TaskError::Panicked(msg)));
            })),
        );
        Ok(JoinHandle { state, key })
    })
    .unwrap_or(Err(TaskError::EngineStopped))
}

pub(crate) fn abort_task(key: u64) {
    let (idx, generation) = split_key(key);
    let task = with_local(|local| local.remove_task(idx, generation)).flatten();
    if let Some(task) = task {
        drop_task(task);
    }
}

/// Builds the inbox message that runs `make` on a worker and reports to a
/// remote handle.
pub(crate) fn remote_task<F, Fut, T>(make: F) -> (Message, RemoteHandle<T>)
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = T> + 'static,
    T: Send + 'static,
{
    let state = RemoteState::new();
    let handle = RemoteHandle {
        state: state.clone(),
    };
    let unrun = RemoteCompleter::new(state, TaskError::EngineStopped);
    let msg = Message::Run(Box::new(move || {
        // From here on a drop means cancellation, not an unrun message.
        let Some(state) = unrun.disarm() else { return };
        let future = match catch_unwind(AssertUnwindSafe(make)) {
            Ok(f) => f,
            Err(payload) => {
                state.complete(Err(TaskError::Panicked(panic_message(payload.as_ref()))));
                return;
            }
        };
        let done = RemoteCompleter::new(state.clone(), TaskError::Cancelled);
        let panic_state = state.clone();
        let spawned = with_local(|local| {
            local.spawn_boxed(
                Box::pin(async move {
                    let done = done;
                    let out = future.await;
                    done.complete(Ok(out));
                }),
                Some(Box::new(move |msg| {
                    panic_state.complete(Err(TaskError::Panicked(msg)));
                })),
            )
        });
        if spawned.is_none() {
            state.complete(Err(TaskError::EngineStopped));
        }
    }));
    (msg, handle)
}

/// Sends `msg` to worker `core`, waiting (without blocking the thread when
/// called on a worker) while its inbox is full.
pub(crate) struct SendMessage<'a> {
    pub engine: &'a EngineShared,
    pub core: usize,
    pub msg: Option<Message>,
}

impl Future for SendMessage<'_> {
    type Output = Result<(), TaskError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let Some(worker) = self.engine.workers.get(self.core) else {
            return Poll::Ready(Err(TaskError::NoSuchCore {
                core: self.core,
                workers: self.engine.workers.len(),
            }));
        };
        let Some(msg) = self.msg.take() else {
            return Poll::Ready(Ok(()));
        };
        match worker.tx.try_send(msg) {
            Ok(()) => {
                worker.shared.notify();
                Poll::Ready(Ok(()))
            }
            Err(TrySendError::Full(msg)) => {
                self.msg = Some(msg);
                let waker = cx.waker().clone();
                if with_local(|l| l.deferred.borrow_mut().push(waker.clone())).is_none() {
                    // Off-engine poller: try again soon.
                    waker.wake();
                }
                Poll::Pending
            }
            Err(TrySendError::Disconnected(_)) => Poll::Ready(Err(TaskError::EngineStopped)),
        }
    }
}

/// Per-core state: one value of type `T` per worker, created on first use,
/// never shared with another core.
pub fn local_state<T: Default + 'static>() -> Option<Rc<T>> {
    with_local(|local| {
        let mut map = local.state.borrow_mut();
        let entry = map
            .entry(TypeId::of::<T>())
            .or_insert_with(|| Rc::new(T::default()) as Rc<dyn Any>);
        entry.clone().downcast::<T>().ok()
    })
    .flatten()
}
