//! The future behind every ring operation.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use io_uring::squeue;

use crate::driver::Completion;
use crate::runtime::{self, not_on_worker};

/// One kind of ring operation: the memory it needs, how to build its SQE,
/// and what its completion means.
pub(crate) trait Operation: Unpin + 'static {
    type Output;
    /// The SQE. Pointers in it must point into `self`'s heap memory.
    fn entry(&mut self) -> squeue::Entry;
    /// Turns the final completion into the output.
    fn complete(self, c: Completion) -> Self::Output;
    /// The output when the operation could not be submitted.
    fn fail(self, e: io::Error) -> Self::Output;
}

/// Submits `T` on first poll (waiting while the ring is full) and resolves
/// with its completion. Dropped early, it leaves its memory with the driver
/// and cancels the operation.
pub(crate) struct Op<T: Operation> {
    data: Option<T>,
    key: Option<usize>,
}

impl<T: Operation> Op<T> {
    pub fn new(data: T) -> Self {
        Self {
            data: Some(data),
            key: None,
        }
    }
}

impl<T: Operation> Future for Op<T> {
    type Output = T::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<T::Output> {
        let this = &mut *self;
        let Some(data) = this.data.as_mut() else {
            // Polled after completion (a caller bug): like a fused future,
            // it never resolves again.
            return Poll::Pending;
        };
        let local = match runtime::with_local(|l| l.clone()) {
            Some(l) => l,
            None => {
                let data = this.data.take().map(|d| d.fail(not_on_worker()));
                return data.map_or(Poll::Pending, Poll::Ready);
            }
        };
        let mut driver = local.driver.borrow_mut();
        let key = match this.key {
            Some(k) => k,
            None => {
                let entry = data.entry();
                // SAFETY: the entry points into `data`'s heap memory, which
                // stays here until completion or is parked in the driver by
                // `Drop` until the kernel's final completion.
                match unsafe { driver.submit(entry, false, cx) } {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Ok(k)) => {
                        this.key = Some(k);
                        k
                    }
                    Poll::Ready(Err(e)) => {
                        drop(driver);
                        let out = this.data.take().map(|d| d.fail(e));
                        return out.map_or(Poll::Pending, Poll::Ready);
                    }
                }
            }
        };
        match driver.poll_single(key, cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(c) => {
                drop(driver);
                this.key = None;
                let out = this.data.take().map(|d| d.complete(c));
                out.map_or(Poll::Pending, Poll::Ready)
            }
        }
    }
}

impl<T: Operation> Drop for Op<T> {
    fn drop(&mut self) {
        if let (Some(key), Some(data)) = (self.key.take(), self.data.take()) {
            let _ = runtime::with_local(|l| {
                l.driver.borrow_mut().abandon(key, Box::new(data), None);
            });
        }
    }
}
