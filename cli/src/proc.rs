//! Child processes for benchmarks and their references: run one to
//! completion within a time limit with its output captured, guard one so it
//! is killed and reaped whatever happens, and read the CPU time it (or this
//! process) used.

use std::io::Read;
use std::os::unix::process::ExitStatusExt;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};

/// Longest pause between two polls in [`wait_with_cpu`], which is also how
/// late it may notice that the child exited.
const WAIT_POLL_MAX: Duration = Duration::from_millis(2);

/// Runs `cmd` to completion with stdin closed and output captured, killing
/// it when it takes longer than `timeout`. A spawn failure is returned as
/// the bare `io::Error` (so callers can tell `NotFound`).
pub fn run_capture(cmd: &mut Command, timeout: Duration) -> Result<Output> {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let mut child = ChildGuard::new(child);
    let mut out = child
        .child_mut()
        .stdout
        .take()
        .context("child stdout not piped")?;
    let mut err = child
        .child_mut()
        .stderr
        .take()
        .context("child stderr not piped")?;
    thread::scope(|s| {
        let out = s.spawn(move || {
            let mut buf = Vec::new();
            out.read_to_end(&mut buf).map(|_| buf)
        });
        let err = s.spawn(move || {
            let mut buf = Vec::new();
            err.read_to_end(&mut buf).map(|_| buf)
        });
        let deadline = Instant::now() + timeout;
        let mut pause = Duration::from_millis(1);
        let status = loop {
            if let Some(status) = child.child_mut().try_wait().context("waiting for child")? {
                break Some(status);
            }
            if Instant::now() >= deadline {
                break None;
            }
            thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(20));
        };
        // Killing closes the pipes, so the readers finish either way.
        drop(child);
        let stdout = out.join().map_err(|_| anyhow!("stdout reader panicked"))?;
        let stderr = err.join().map_err(|_| anyhow!("stderr reader panicked"))?;
        let Some(status) = status else {
            bail!("{cmd:?} did not finish within {timeout:?}; killed it");
        };
        Ok(Output {
            status,
            stdout: stdout.context("reading child stdout")?,
            stderr: stderr.context("reading child stderr")?,
        })
    })
}

/// A child process that is killed and reaped when dropped, unless it was
/// waited for with [`ChildGuard::wait_with_cpu`] first.
#[derive(Debug)]
pub struct ChildGuard(Option<Child>);

impl ChildGuard {
    /// Guards `child`.
    pub fn new(child: Child) -> Self {
        ChildGuard(Some(child))
    }

    /// The guarded child, to take its pipes or poll it.
    pub fn child_mut(&mut self) -> &mut Child {
        self.0
            .as_mut()
            .expect("the child is only taken by wait_with_cpu and drop, which consume the guard")
    }

    /// [`wait_with_cpu`] on the guarded child. Consumes the guard, since
    /// the child is reaped afterwards and must not be killed again.
    pub fn wait_with_cpu(mut self, deadline: Instant) -> Result<(ExitStatus, f64)> {
        let mut child = self
            .0
            .take()
            .expect("the child is only taken by wait_with_cpu and drop, which consume the guard");
        wait_with_cpu(&mut child, deadline)
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            // Both fail only when the child is already gone, which is fine.
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Waits for `child` until `deadline`, killing it (SIGKILL) past the
/// deadline, and returns its exit status and the CPU seconds (user + system)
/// it and its waited-for children used, from `wait4`'s rusage.
///
/// A child killed at the deadline is still `Ok`, with a status that says
/// SIGKILL. Exit is noticed by polling, at most [`WAIT_POLL_MAX`] late.
///
/// The child is reaped here, behind `std`'s back: do not call `wait`,
/// `try_wait` or `kill` on it afterwards (the first two fail with ECHILD;
/// `kill` could hit a recycled pid). [`ChildGuard::wait_with_cpu`] makes
/// that impossible.
pub fn wait_with_cpu(child: &mut Child, deadline: Instant) -> Result<(ExitStatus, f64)> {
    let pid = sys::pid_t::try_from(child.id())
        .with_context(|| format!("child pid {} does not fit pid_t", child.id()))?;
    let mut pause = Duration::from_micros(100);
    loop {
        if let Some(done) =
            sys::wait4(pid, true).with_context(|| format!("waiting for child {pid}"))?
        {
            return Ok(done);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        thread::sleep(pause.min(left));
        pause = (pause * 2).min(WAIT_POLL_MAX);
    }
    // Not reaped yet, so the pid is still this child's (maybe a zombie).
    child
        .kill()
        .with_context(|| format!("killing child {pid} past its deadline"))?;
    sys::wait4(pid, false)
        .with_context(|| format!("waiting for killed child {pid}"))?
        .with_context(|| format!("wait4 on killed child {pid} returned no status"))
}

/// `wait4(2)` with its resource usage.
mod sys {
    use std::io;
    use std::process::ExitStatus;

    use super::ExitStatusExt;

    pub use libc::pid_t;

    /// `wait4(pid, .., WNOHANG if nohang, ..)`, retried on EINTR: `None` when
    /// the child has not exited (only with `nohang`), else its status and
    /// user + system CPU seconds.
    pub fn wait4(pid: pid_t, nohang: bool) -> io::Result<Option<(ExitStatus, f64)>> {
        loop {
            let mut status: libc::c_int = 0;
            // SAFETY: all-zero is a valid `struct rusage`.
            let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
            // SAFETY: `status` and `usage` are live and writable; wait4 writes
            // only through them and keeps neither pointer.
            let r = unsafe {
                libc::wait4(
                    pid,
                    &raw mut status,
                    if nohang { libc::WNOHANG } else { 0 },
                    &raw mut usage,
                )
            };
            if r == 0 {
                return Ok(None);
            }
            if r < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            let seconds = |t: &libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
            let cpu = seconds(&usage.ru_utime) + seconds(&usage.ru_stime);
            return Ok(Some((ExitStatus::from_raw(status), cpu)));
        }
    }
}

/// User + system CPU seconds this process has used so far.
pub fn cpu_seconds() -> Result<f64> {
    // SAFETY: all-zero is a valid `struct rusage`.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `u` is live and writable; getrusage writes only through it.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &raw mut u) } != 0 {
        return Err(std::io::Error::last_os_error()).context("getrusage");
    }
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    Ok(secs(u.ru_utime) + secs(u.ru_stime))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wait_with_cpu_counts_cpu() {
        // ~0.1 s of shell arithmetic, well inside the deadline.
        let child = Command::new("sh")
            .args([
                "-c",
                "i=0; while [ $i -lt 100000 ]; do i=$((i+1)); done; exit 3",
            ])
            .spawn()
            .unwrap();
        let start = Instant::now();
        let (status, cpu) = ChildGuard::new(child)
            .wait_with_cpu(start + Duration::from_secs(20))
            .unwrap();
        println!("busy sh: {status}, {cpu:.3} s CPU in {:?}", start.elapsed());
        assert_eq!(status.code(), Some(3));
        assert!(
            cpu > 0.0 && cpu <= start.elapsed().as_secs_f64() + 0.01,
            "{cpu}"
        );
    }

    #[test]
    fn wait_with_cpu_kills_past_deadline() {
        let child = Command::new("sleep").arg("10").spawn().unwrap();
        let start = Instant::now();
        let (status, cpu) = ChildGuard::new(child)
            .wait_with_cpu(start + Duration::from_millis(200))
            .unwrap();
        assert!(start.elapsed() < Duration::from_secs(5));
        assert_eq!(status.signal(), Some(9), "{status}");
        assert!(cpu < 0.2, "{cpu}");
    }
}
