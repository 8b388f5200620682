//! Timers through the ring: sleep and timeouts.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use io_uring::{opcode, squeue, types};

use crate::driver::Completion;
use crate::op::{Op, Operation};

struct TimeoutOp {
    ts: Box<types::Timespec>,
}

impl Operation for TimeoutOp {
    type Output = io::Result<()>;
    fn entry(&mut self) -> squeue::Entry {
        opcode::Timeout::new(&raw const *self.ts).build()
    }
    fn complete(self, c: Completion) -> Self::Output {
        if c.result == -libc::ETIME || c.result >= 0 {
            Ok(())
        } else {
            Err(io::Error::from_raw_os_error(-c.result))
        }
    }
    fn fail(self, e: io::Error) -> Self::Output {
        Err(e)
    }
}

/// Completes after `duration` (a ring timeout; the worker sleeps meanwhile).
pub fn sleep(duration: Duration) -> Sleep {
    Sleep {
        op: Op::new(TimeoutOp {
            ts: Box::new(
                types::Timespec::new()
                    .sec(duration.as_secs())
                    .nsec(duration.subsec_nanos()),
            ),
        }),
    }
}

/// Future of [`sleep`]. Fails only off-engine.
pub struct Sleep {
    op: Op<TimeoutOp>,
}

impl Future for Sleep {
    type Output = io::Result<()>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.op).poll(cx)
    }
}

/// The deadline of a [`timeout`] passed first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("operation timed out")]
pub struct Elapsed;

/// Runs `future` for at most `duration`. When the time is up the future is
/// dropped, which cancels its in-flight operations.
pub fn timeout<F: Future>(duration: Duration, future: F) -> Timeout<F> {
    Timeout {
        future: Box::pin(future),
        sleep: sleep(duration),
    }
}

/// Future of [`timeout`].
pub struct Timeout<F: Future> {
    future: Pin<Box<F>>,
    sleep: Sleep,
}

impl<F: Future> Future for Timeout<F> {
    type Output = Result<F::Output, Elapsed>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        if let Poll::Ready(v) = self.future.as_mut().poll(cx) {
            return Poll::Ready(Ok(v));
        }
        match Pin::new(&mut self.sleep).poll(cx) {
            Poll::Ready(_) => Poll::Ready(Err(Elapsed)),
            Poll::Pending => Poll::Pending,
        }
    }
}

/// Yields to the other tasks of this core once.
pub async fn yield_now() {
    let mut yielded = false;
    std::future::poll_fn(|cx| {
        if yielded {
            Poll::Ready(())
        } else {
            yielded = true;
            cx.waker().wake_by_ref();
            Poll::Pending
        }
    })
    .await;
}
