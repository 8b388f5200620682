//! Tasks: local join handles, cross-core handles, and the wakers that put a
//! task back on its core's run queue.

use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

use crate::error::TaskError;
use crate::runtime::{self, WorkerShared};

/// Waker of one task: remembers the task's key and its worker.
pub(crate) struct TaskWaker {
    pub key: u64,
    /// Set while the task sits in a run queue, so it is queued once.
    pub scheduled: AtomicBool,
    pub worker: Arc<WorkerShared>,
}

impl Wake for TaskWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        if self.scheduled.swap(true, Ordering::AcqRel) {
            return;
        }
        if runtime::current_worker_uid() == Some(self.worker.uid) {
            runtime::push_local_run_queue(self.key);
        } else {
            self.worker.wake_remote(self.key);
        }
    }
}

/// State shared by a local task and its [`JoinHandle`].
pub(crate) struct JoinState<T> {
    result: RefCell<Option<Result<T, TaskError>>>,
    waker: RefCell<Option<Waker>>,
    finished: std::cell::Cell<bool>,
}

impl<T> JoinState<T> {
    pub fn new() -> Rc<Self> {
        Rc::new(Self {
            result: RefCell::new(None),
            waker: RefCell::new(None),
            finished: std::cell::Cell::new(false),
        })
    }

    pub fn complete(&self, result: Result<T, TaskError>) {
        if self.finished.replace(true) {
            return;
        }
        *self.result.borrow_mut() = Some(result);
        if let Some(w) = self.waker.borrow_mut().take() {
            w.wake();
        }
    }
}

/// Sets the join result to `Cancelled` if the task is dropped unfinished.
pub(crate) struct Completer<T>(pub Rc<JoinState<T>>);

impl<T> Drop for Completer<T> {
    fn drop(&mut self) {
        // While a panic unwinds through the task, the executor reports it
        // as `Panicked` right after; do not pre-empt that with `Cancelled`.
        if std::thread::panicking() {
            return;
        }
        self.0.complete(Err(TaskError::Cancelled));
    }
}

/// Handle to a task on the current core. Awaiting it gives the task's output,
/// or why there is none. Dropping it detaches the task, which runs on.
#[must_use = "dropping a JoinHandle detaches the task"]
pub struct JoinHandle<T> {
    pub(crate) state: Rc<JoinState<T>>,
    pub(crate) key: u64,
}

impl<T> JoinHandle<T> {
    /// Whether the task has finished (or panicked, or was cancelled).
    pub fn is_finished(&self) -> bool {
        self.state.finished.get()
    }

    /// Stops the task: its future is dropped, which cancels its in-flight
    /// operations. Awaiting the handle then gives `TaskError::Cancelled`.
    pub fn abort(&self) {
        runtime::abort_task(self.key);
    }
}

impl<T> Future for JoinHandle<T> {
    type Output = Result<T, TaskError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        if let Some(r) = self.state.result.borrow_mut().take() {
            return Poll::Ready(r);
        }
        if self.state.finished.get() {
            // Already taken by an earlier poll.
            return Poll::Ready(Err(TaskError::Cancelled));
        }
        *self.state.waker.borrow_mut() = Some(cx.waker().clone());
        Poll::Pending
    }
}

struct RemoteSlot<T> {
    result: Option<Result<T, TaskError>>,
    waker: Option<Waker>,
    done: bool,
}

/// State shared between a task on some core and its [`RemoteHandle`].
pub(crate) struct RemoteState<T> {
    slot: Mutex<RemoteSlot<T>>,
    cond: Condvar,
}

impl<T> RemoteState<T> {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            slot: Mutex::new(RemoteSlot {
                result: None,
                waker: None,
                done: false,
            }),
            cond: Condvar::new(),
        })
    }

    pub fn complete(&self, result: Result<T, TaskError>) {
        let waker = {
            let mut slot = match self.slot.lock() {
                Ok(g) => g,
                Err(p) => p.into_inner(),
            };
            if slot.done {
                return;
            }
            slot.done = true;
            slot.result = Some(result);
            slot.waker.take()
        };
        self.cond.notify_all();
        if let Some(w) = waker {
            w.wake();
        }
    }
}

/// Completes a remote handle with `err` if dropped before it was completed.
pub(crate) struct RemoteCompleter<T> {
    state: Option<Arc<RemoteState<T>>>,
    err: TaskError,
}

impl<T> RemoteCompleter<T> {
    pub fn new(state: Arc<RemoteState<T>>, err: TaskError) -> Self {
        Self {
            state: Some(state),
            err,
        }
    }

    /// Completes the handle with `result`.
    pub fn complete(mut self, result: Result<T, TaskError>) {
        if let Some(state) = self.state.take() {
            state.complete(result);
        }
    }

    /// Takes the state out without completing it.
    pub fn disarm(mut self) -> Option<Arc<RemoteState<T>>> {
        self.state.take()
    }
}

impl<T> Drop for RemoteCompleter<T> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // The executor's panic hook completes the handle.
            return;
        }
        if let Some(state) = self.state.take() {
            state.complete(Err(self.err.clone()));
        }
    }
}

/// Handle to a task started on another core (or from outside the engine).
/// It is `Send`: await it from a worker, or [`RemoteHandle::join`] it from a
/// plain thread.
#[must_use = "dropping a RemoteHandle detaches the task"]
pub struct RemoteHandle<T> {
    pub(crate) state: Arc<RemoteState<T>>,
}

impl<T> RemoteHandle<T> {
    /// Blocks this thread until the task ends. Call it from threads that are
    /// not engine workers; a worker awaits the handle instead.
    pub fn join(self) -> Result<T, TaskError> {
        let mut slot = match self.state.slot.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        loop {
            if let Some(r) = slot.result.take() {
                return r;
            }
            if slot.done {
                return Err(TaskError::Cancelled);
            }
            slot = match self.state.cond.wait(slot) {
                Ok(g) => g,
                Err(p) => p.into_inner(),
            };
        }
    }

    /// As [`RemoteHandle::join`], giving the handle back if the task has not
    /// ended within `timeout`.
    pub fn join_timeout(self, timeout: Duration) -> Result<Result<T, TaskError>, Self> {
        let deadline = Instant::now() + timeout;
        {
            let mut slot = match self.state.slot.lock() {
                Ok(g) => g,
                Err(p) => p.into_inner(),
            };
            loop {
                if let Some(r) = slot.result.take() {
                    return Ok(r);
                }
                if slot.done {
                    return Ok(Err(TaskError::Cancelled));
                }
                let now = Instant::now();
                if now >= deadline {
                    break;
                }
                slot = match self.state.cond.wait_timeout(slot, deadline - now) {
                    Ok((g, _)) => g,
                    Err(p) => p.into_inner().0,
                };
            }
        }
        Err(self)
    }
}

impl<T> Future for RemoteHandle<T> {
    type Output = Result<T, TaskError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut slot = match self.state.slot.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        if let Some(r) = slot.result.take() {
            return Poll::Ready(r);
        }
        if slot.done {
            return Poll::Ready(Err(TaskError::Cancelled));
        }
        slot.waker = Some(cx.waker().clone());
        Poll::Pending
    }
}
