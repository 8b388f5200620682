//! The per-core ring: submission with backpressure, completion dispatch, and
//! the slab that owns the state (and the buffers) of every in-flight operation.
//!
//! Every operation gets a slab slot whose key is the SQE's `user_data`. The
//! slot stays alive until the kernel's *final* completion for that operation
//! (a CQE without `IORING_CQE_F_MORE`), whatever happens to the future that
//! submitted it: a future dropped mid-flight parks its buffers in the slot
//! (`Lifecycle::Ignored`) and asks the kernel to cancel, so the kernel never
//! writes into memory that was freed or reused.

use std::any::Any;
use std::collections::VecDeque;
use std::io;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use io_uring::{IoUring, cqueue, opcode, squeue, types};
use slab::Slab;

use crate::metrics::CoreMetrics;

/// `IORING_ENTER_GETEVENTS` from the kernel ABI (not re-exported by io-uring).
const IORING_ENTER_GETEVENTS: u32 = 1;

/// `user_data` of the eventfd read that wakes a sleeping worker.
pub(crate) const WAKE_TOKEN: u64 = u64::MAX;
/// `user_data` of cancel requests (their own completions carry nothing).
pub(crate) const CANCEL_TOKEN: u64 = u64::MAX - 1;
/// `user_data` of the timeout that bounds a timed wait.
pub(crate) const WAIT_TIMEOUT_TOKEN: u64 = u64::MAX - 2;

/// One completion as the kernel posted it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Completion {
    /// The result (`-errno` on failure).
    pub result: i32,
    /// The CQE flags (`F_MORE`, `F_BUFFER`, `F_NOTIF`, ...).
    pub flags: u32,
    /// `SEND_ZC` only: the notification said the kernel copied the data
    /// instead of sending from the pinned pages (loopback, devices without
    /// scatter-gather), so zero copy bought nothing.
    pub zc_copied: bool,
}

/// `IORING_NOTIF_USAGE_ZC_COPIED`: set in a `SEND_ZC` notification's result
/// when the SQE asked for `IORING_SEND_ZC_REPORT_USAGE` and the kernel copied.
const NOTIF_USAGE_ZC_COPIED: u32 = 1 << 31;

impl Completion {
    /// A completion with `result` and `flags`.
    pub fn new(result: i32, flags: u32) -> Self {
        Self {
            result,
            flags,
            zc_copied: false,
        }
    }

    /// The result as an `io::Result`.
    pub fn into_io(self) -> io::Result<u32> {
        if self.result < 0 {
            Err(io::Error::from_raw_os_error(-self.result))
        } else {
            Ok(self.result as u32)
        }
    }
}

/// Where an operation's slot stands.
enum Lifecycle {
    /// In the kernel, a future waits for it.
    Waiting(Option<Waker>),
    /// Single-shot: the result (first CQE) is in, the final CQE may not be.
    Partial(Completion, Option<Waker>),
    /// Single-shot: final result available, not yet taken.
    Done(Completion),
    /// Multishot: completions queued for the consumer.
    Multi {
        queue: VecDeque<Completion>,
        waker: Option<Waker>,
        finished: bool,
    },
    /// The future is gone; its data stays here until the final CQE.
    Ignored(#[allow(dead_code)] Box<dyn Any>),
}

struct Slot {
    lifecycle: Lifecycle,
    /// Called for each CQE of an ignored operation that picked a provided
    /// buffer, so the buffer goes back to its ring.
    recycle: Option<Box<dyn Fn(u32)>>,
}

/// The ring and its bookkeeping. Owned by one worker thread.
pub(crate) struct Driver {
    ring: IoUring,
    slots: Slab<Slot>,
    /// Operations the kernel still holds (final CQE not seen).
    in_flight: usize,
    /// Most operations allowed in flight: the completion queue size, so the
    /// kernel never has to buffer overflowing completions.
    max_in_flight: usize,
    /// Futures waiting for room in the ring.
    room_waiters: VecDeque<Waker>,
    /// Whether the eventfd read is armed.
    pub wake_armed: bool,
    metrics: std::sync::Arc<CoreMetrics>,
}

impl Driver {
    pub fn new(ring: IoUring, metrics: std::sync::Arc<CoreMetrics>) -> Self {
        let max_in_flight = ring.params().cq_entries() as usize;
        Self {
            ring,
            slots: Slab::with_capacity(64),
            in_flight: 0,
            max_in_flight,
            room_waiters: VecDeque::new(),
            wake_armed: false,
            metrics,
        }
    }

    /// Operations the kernel holds right now.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Pushes an SQE, flushing the queue to the kernel when it is full.
    ///
    /// # Safety
    /// Every pointer in `entry` must stay valid until the operation's final
    /// completion (the caller parks the memory in the slot when needed).
    unsafe fn push_raw(&mut self, entry: &squeue::Entry) -> io::Result<()> {
        loop {
            // SAFETY: forwarded from this function's contract.
            if unsafe { self.ring.submission().push(entry) }.is_ok() {
                return Ok(());
            }
            // The SQ is full: hand it to the kernel and try again.
            match self.ring.submit() {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                    // Completions must be reaped before the kernel takes more.
                    self.reap();
                }
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Submits an operation, or registers `cx` to be woken when there is room.
    ///
    /// # Safety
    /// As [`Driver::push_raw`]: the memory `entry` points to must live until
    /// the final completion, which the caller guarantees by keeping it in the
    /// operation future and, if that is dropped, in the slot.
    pub unsafe fn submit(
        &mut self,
        entry: squeue::Entry,
        multishot: bool,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<usize>> {
        if self.in_flight >= self.max_in_flight {
            self.room_waiters.push_back(cx.waker().clone());
            self.metrics.ring_full_waits.incr();
            return Poll::Pending;
        }
        let key = self.slots.vacant_key();
        let entry = entry.user_data(key as u64);
        // SAFETY: forwarded from this function's contract.
        unsafe { self.push_raw(&entry) }?;
        self.slots.insert(Slot {
            lifecycle: if multishot {
                Lifecycle::Multi {
                    queue: VecDeque::new(),
                    waker: Some(cx.waker().clone()),
                    finished: false,
                }
            } else {
                Lifecycle::Waiting(Some(cx.waker().clone()))
            },
            recycle: None,
        });
        self.in_flight += 1;
        self.metrics.ops_submitted.incr();
        self.metrics.ring_depth.set(self.in_flight as u64);
        Poll::Ready(Ok(key))
    }

    /// Submits an operation nobody waits for (a close on drop). Returns
    /// `false` when the ring has no room; the caller then does it inline.
    ///
    /// # Safety
    /// `entry` must point to no memory, or to memory in `data`.
    pub unsafe fn submit_detached(&mut self, entry: squeue::Entry, data: Box<dyn Any>) -> bool {
        if self.in_flight >= self.max_in_flight {
            return false;
        }
        let key = self.slots.vacant_key();
        let entry = entry.user_data(key as u64);
        // SAFETY: the memory it points to is in `data`, parked in the slot.
        if unsafe { self.push_raw(&entry) }.is_err() {
            return false;
        }
        self.slots.insert(Slot {
            lifecycle: Lifecycle::Ignored(data),
            recycle: None,
        });
        self.in_flight += 1;
        self.metrics.ops_submitted.incr();
        true
    }

    /// Pushes an SQE with a reserved token (wake-up read, wait timeout).
    ///
    /// # Safety
    /// As [`Driver::push_raw`].
    pub unsafe fn submit_internal(&mut self, entry: squeue::Entry, token: u64) -> io::Result<()> {
        // SAFETY: forwarded.
        unsafe { self.push_raw(&entry.user_data(token)) }
    }

    /// Polls a single-shot operation for its final completion.
    pub fn poll_single(&mut self, key: usize, cx: &mut Context<'_>) -> Poll<Completion> {
        let Some(slot) = self.slots.get_mut(key) else {
            // Cannot happen: the key belongs to the live future that polls.
            return Poll::Ready(Completion::new(-libc::ECANCELED, 0));
        };
        match &mut slot.lifecycle {
            Lifecycle::Done(c) => {
                let c = *c;
                self.slots.remove(key);
                Poll::Ready(c)
            }
            Lifecycle::Waiting(w) | Lifecycle::Partial(_, w) => {
                set_waker(w, cx);
                Poll::Pending
            }
            Lifecycle::Multi { .. } | Lifecycle::Ignored(_) => {
                Poll::Ready(Completion::new(-libc::EINVAL, 0))
            }
        }
    }

    /// Polls a multishot operation for its next completion. `None` once the
    /// kernel finished it and every completion was taken (the slot is freed).
    pub fn poll_multi(&mut self, key: usize, cx: &mut Context<'_>) -> Poll<Option<Completion>> {
        let Some(slot) = self.slots.get_mut(key) else {
            return Poll::Ready(None);
        };
        let Lifecycle::Multi {
            queue,
            waker,
            finished,
        } = &mut slot.lifecycle
        else {
            return Poll::Ready(None);
        };
        if let Some(c) = queue.pop_front() {
            return Poll::Ready(Some(c));
        }
        if *finished {
            self.slots.remove(key);
            return Poll::Ready(None);
        }
        set_waker(waker, cx);
        Poll::Pending
    }

    /// Takes the completions queued on a multishot operation (used when its
    /// consumer goes away, to give provided buffers back).
    pub fn drain_multi(&mut self, key: usize) -> Vec<Completion> {
        match self.slots.get_mut(key).map(|s| &mut s.lifecycle) {
            Some(Lifecycle::Multi { queue, .. }) => queue.drain(..).collect(),
            _ => Vec::new(),
        }
    }

    /// The future of operation `key` is gone. If the kernel is done with it,
    /// the slot is freed; otherwise its data is parked and the kernel is
    /// asked to cancel it.
    pub fn abandon(&mut self, key: usize, data: Box<dyn Any>, recycle: Option<Box<dyn Fn(u32)>>) {
        let Some(slot) = self.slots.get_mut(key) else {
            return;
        };
        let kernel_done = match &slot.lifecycle {
            Lifecycle::Done(_) => true,
            Lifecycle::Multi { finished, .. } => *finished,
            _ => false,
        };
        if kernel_done {
            self.slots.remove(key);
            return;
        }
        slot.lifecycle = Lifecycle::Ignored(data);
        slot.recycle = recycle;
        let cancel = opcode::AsyncCancel::new(key as u64).build();
        // SAFETY: a cancel request points to no memory.
        if let Err(e) = unsafe { self.submit_internal(cancel, CANCEL_TOKEN) } {
            // The operation will still finish on its own (peer activity,
            // close, ring teardown); its data stays parked until then.
            let _ = e;
        }
    }

    /// Forgets the memory parked by abandoned operations instead of freeing
    /// it (teardown, when the kernel did not finish them in time).
    pub fn leak_parked(&mut self) {
        std::mem::forget(std::mem::take(&mut self.slots));
    }

    /// Asks the kernel to cancel every operation on `fd`.
    pub fn cancel_fd(&mut self, fd: i32) -> io::Result<()> {
        let cancel =
            opcode::AsyncCancel2::new(types::CancelBuilder::fd(types::Fd(fd)).all()).build();
        // SAFETY: a cancel request points to no memory.
        unsafe { self.submit_internal(cancel, CANCEL_TOKEN) }
    }

    /// Asks the kernel to cancel everything in flight (shutdown).
    pub fn cancel_everything(&mut self) {
        let cancel = opcode::AsyncCancel2::new(types::CancelBuilder::any()).build();
        // SAFETY: a cancel request points to no memory.
        let _ = unsafe { self.submit_internal(cancel, CANCEL_TOKEN) };
    }

    /// Submits what is queued and, if `wait` says so, sleeps until at least
    /// one completion arrives or the timeout passes.
    pub fn enter(&mut self, wait: Option<Option<Duration>>) -> io::Result<()> {
        let sq_len = self.ring_sq_len() as u32;
        let submitter = self.ring.submitter();
        let result = match wait {
            None => {
                // SAFETY: no argument is passed; GETEVENTS only runs
                // deferred task work so completions get posted.
                unsafe {
                    submitter.enter::<libc::sigset_t>(sq_len, 0, IORING_ENTER_GETEVENTS, None)
                }
            }
            Some(None) => submitter.submit_and_wait(1),
            Some(Some(timeout)) => {
                let ts = types::Timespec::new()
                    .sec(timeout.as_secs())
                    .nsec(timeout.subsec_nanos());
                let args = types::SubmitArgs::new().timespec(&ts);
                submitter.submit_with_args(1, &args)
            }
        };
        match result {
            Ok(_) => Ok(()),
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::ETIME) | Some(libc::EINTR) | Some(libc::EBUSY)
                ) =>
            {
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    fn ring_sq_len(&mut self) -> usize {
        self.ring.submission().len()
    }

    /// Moves every posted completion into its slot and wakes its future.
    /// Returns the tokens of internal completions seen (wake-up reads).
    pub fn reap(&mut self) -> ReapOutcome {
        let mut outcome = ReapOutcome::default();
        let mut batch = [(0u64, Completion::new(0, 0)); 64];
        loop {
            let mut n = 0;
            {
                let mut cq = self.ring.completion();
                cq.sync();
                for cqe in &mut cq {
                    batch[n] = (cqe.user_data(), Completion::new(cqe.result(), cqe.flags()));
                    n += 1;
                    if n == batch.len() {
                        break;
                    }
                }
                cq.sync();
            }
            if n == 0 {
                break;
            }
            for &(ud, c) in &batch[..n] {
                match ud {
                    WAKE_TOKEN => outcome.woken = true,
                    CANCEL_TOKEN | WAIT_TIMEOUT_TOKEN => {}
                    _ => self.dispatch(ud as usize, c),
                }
            }
            outcome.completions += n;
        }
        self.metrics.ring_depth.set(self.in_flight as u64);
        outcome
    }

    fn dispatch(&mut self, key: usize, c: Completion) {
        let more = cqueue::more(c.flags);
        let Some(slot) = self.slots.get_mut(key) else {
            return;
        };
        if !more {
            self.in_flight -= 1;
            self.metrics.ops_completed.incr();
            if let Some(w) = self.room_waiters.pop_front() {
                w.wake();
            }
        }
        let lifecycle = std::mem::replace(&mut slot.lifecycle, Lifecycle::Waiting(None));
        slot.lifecycle = match lifecycle {
            Lifecycle::Waiting(w) => {
                if more {
                    // First CQE of a two-part operation (SEND_ZC): the result
                    // is in, the buffer is still the kernel's.
                    Lifecycle::Partial(c, w)
                } else {
                    wake(w);
                    Lifecycle::Done(c)
                }
            }
            Lifecycle::Partial(first, w) => {
                if more {
                    Lifecycle::Partial(first, w)
                } else {
                    wake(w);
                    // A notification carries no result of its own, only
                    // whether the kernel copied after all.
                    Lifecycle::Done(if cqueue::notif(c.flags) {
                        Completion {
                            zc_copied: c.result as u32 & NOTIF_USAGE_ZC_COPIED != 0,
                            ..first
                        }
                    } else {
                        c
                    })
                }
            }
            Lifecycle::Multi {
                mut queue,
                waker,
                finished: _,
            } => {
                queue.push_back(c);
                let waker = match waker {
                    Some(w) => {
                        w.wake();
                        None
                    }
                    None => None,
                };
                Lifecycle::Multi {
                    queue,
                    waker,
                    finished: !more,
                }
            }
            Lifecycle::Ignored(data) => {
                if let (Some(_), Some(recycle)) = (cqueue::buffer_select(c.flags), &slot.recycle) {
                    recycle(c.flags);
                }
                if !more {
                    self.slots.remove(key);
                    return;
                }
                Lifecycle::Ignored(data)
            }
            Lifecycle::Done(d) => Lifecycle::Done(d),
        };
    }
}

/// What a reap saw besides operation completions.
#[derive(Default)]
pub(crate) struct ReapOutcome {
    /// The wake-up eventfd read completed.
    pub woken: bool,
    /// Completions seen in all.
    pub completions: usize,
}

fn set_waker(slot: &mut Option<Waker>, cx: &Context<'_>) {
    match slot {
        Some(w) if w.will_wake(cx.waker()) => {}
        _ => *slot = Some(cx.waker().clone()),
    }
}

fn wake(w: Option<Waker>) {
    if let Some(w) = w {
        w.wake();
    }
}
