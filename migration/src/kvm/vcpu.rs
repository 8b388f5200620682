//! The vCPU thread: runs the guest, answers its budget requests (rate
//! control), parks on `pause`, sleeps on `throttle`.
//!
//! Control goes through a mutex-protected [`Ctl`] and a condition variable;
//! the controller (the `KvmGuest` owner) sets what it wants, the thread
//! reports what it does. To stop a vCPU that is inside `KVM_RUN`, the
//! controller sends the thread a real-time signal (a *kick*, as
//! cloud-hypervisor and firecracker do): the signal makes `KVM_RUN` return
//! `EINTR`, and its handler sets `kvm_run.immediate_exit`, so a kick that
//! lands just before `KVM_RUN` is entered is not lost either. The kick is
//! `SIGRTMIN + 2`; its handler is installed process-wide on first use and
//! replaces any other handler of that signal.
//!
//! Guest state is consistent only after an I/O exit has been completed by
//! re-entering `KVM_RUN`; so before parking, a pending I/O exit is
//! completed with `immediate_exit` set (the guest does not run again).
//!
//! Rate control: the guest asks for a budget of page writes with an `in`
//! from [`BUDGET_PORT`]. A token bucket fills at `R * 256` writes per
//! second while the guest is running and not throttled (at most
//! [`BURST`] worth); a request is answered with every whole token once at
//! least [`BATCH`] worth (or one) is there, and waits for it otherwise,
//! inside the VMM, so a guest that has nothing to do costs no CPU. At 0 MiB/s
//! the answer is 0 after [`IDLE_TICK`]. The bucket restarts empty at every
//! resume, so a pause never turns into a burst.
//!
//! Throttle `p`%: in every [`THROTTLE_PERIOD`], once the vCPU has been
//! running for `(100 - p)`% of it, it sleeps the other `p`% (checked at
//! every exit, which the rate control makes frequent), and the bucket does
//! not fill while it sleeps: a throttled guest dirties `(100 - p)`% of its
//! rate.

use std::cell::Cell;
use std::os::unix::thread::JoinHandleExt;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, PoisonError, TryLockError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_ioctls::{VcpuExit, VcpuFd};

use super::layout::BUDGET_PORT;
use crate::hv::{HvError, HvResult};

/// Budget handed out per request when the guest keeps up: 2 ms of writes
/// (1 ms cost 14% of a core at 30 MiB/s in exits and wake-ups on PVM).
pub const BATCH: Duration = Duration::from_millis(2);
/// Most budget that can pile up: 8 ms of writes.
pub const BURST: Duration = Duration::from_millis(8);
/// How long a guest at 0 MiB/s waits for its (empty) budget.
pub const IDLE_TICK: Duration = Duration::from_millis(10);
/// Period of the throttle's run/sleep cycle.
pub const THROTTLE_PERIOD: Duration = Duration::from_millis(10);

/// Page writes per second for one MiB/s.
const WRITES_PER_MIB: f64 = 256.0;

/// Offset from `SIGRTMIN` of the kick signal.
const KICK_SIGNAL_OFFSET: libc::c_int = 2;

thread_local! {
    /// `&kvm_run.immediate_exit` of the vCPU this thread runs (null when
    /// none); written by the kick signal handler.
    static KICK_TARGET: Cell<*mut u8> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // `try_with` never panics; a const-initialised `Cell` of a raw pointer
    // has no destructor, so this is a plain thread-local load.
    let _ = KICK_TARGET.try_with(|target| {
        let p = target.get();
        if !p.is_null() {
            // SAFETY: `p` points into the `kvm_run` mapping of the vCPU
            // that this thread runs, set by `vcpu_main` while it holds the
            // vCPU and cleared before it lets go of it, so the mapping is
            // alive. It is a single byte that the kernel polls on entry to
            // `KVM_RUN`; a volatile store is what `set_kvm_immediate_exit`
            // does too, from the same thread (a signal handler interrupts
            // its own thread, which at worst is inside the `KVM_RUN`
            // ioctl: the kernel is then the only other party).
            unsafe { p.write_volatile(1) };
        }
    });
}

/// The kick signal, with its handler installed (once per process).
fn kick_signal() -> HvResult<libc::c_int> {
    static INSTALLED: OnceLock<Result<libc::c_int, String>> = OnceLock::new();
    INSTALLED
        .get_or_init(|| {
            let signal = libc::SIGRTMIN() + KICK_SIGNAL_OFFSET;
            // SAFETY: an all-zero `sigaction` is a valid value (empty mask,
            // no flags) that is then filled in.
            let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
            action.sa_sigaction = on_kick as *const () as usize;
            action.sa_flags = libc::SA_SIGINFO;
            // SAFETY: `action` is initialised, its mask is emptied by
            // `sigemptyset`, and the handler only does a thread-local
            // load and a volatile store (async-signal-safe).
            let rc = unsafe {
                libc::sigemptyset(&mut action.sa_mask);
                libc::sigaction(signal, &action, std::ptr::null_mut())
            };
            if rc == 0 {
                Ok(signal)
            } else {
                Err(std::io::Error::last_os_error().to_string())
            }
        })
        .clone()
        .map_err(|e| HvError::new("installing the vCPU kick signal handler", e))
}

/// What the controller wants of the thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Want {
    Run,
    Pause,
    Exit,
}

/// What the thread does.
#[derive(Debug, Clone, PartialEq, Eq)]
enum RunState {
    /// Not running guest code; the vCPU may be used by the controller.
    Parked,
    /// In its run loop.
    Running,
    /// The thread has ended: `None` when asked to, or why it failed.
    Stopped(Option<String>),
}

#[derive(Debug)]
struct Ctl {
    want: Want,
    state: RunState,
    dirty_mibps: u32,
    throttle: u8,
    /// Time spent running before the current run.
    run_time: Duration,
    /// Start of the current run.
    running_since: Option<Instant>,
}

#[derive(Debug)]
struct Shared {
    ctl: Mutex<Ctl>,
    cv: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Ctl> {
        self.ctl.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn want(&self) -> Want {
        self.lock().want
    }

    /// Sleeps up to `d` unless the controller wants something other than
    /// running; returns whether it still wants the thread running.
    fn sleep_running(&self, d: Duration) -> bool {
        let guard = self.lock();
        let (guard, _) = self
            .cv
            .wait_timeout_while(guard, d, |c| c.want == Want::Run)
            .unwrap_or_else(PoisonError::into_inner);
        guard.want == Want::Run
    }
}

/// Owns the vCPU and the thread that runs it.
#[derive(Debug)]
pub struct VcpuRunner {
    shared: Arc<Shared>,
    vcpu: Arc<Mutex<VcpuFd>>,
    signal: libc::c_int,
    thread: Option<JoinHandle<()>>,
}

impl VcpuRunner {
    /// Starts the vCPU thread, parked.
    pub fn spawn(vcpu: VcpuFd, dirty_mibps: u32) -> HvResult<Self> {
        let signal = kick_signal()?;
        let shared = Arc::new(Shared {
            ctl: Mutex::new(Ctl {
                want: Want::Pause,
                state: RunState::Parked,
                dirty_mibps,
                throttle: 0,
                run_time: Duration::ZERO,
                running_since: None,
            }),
            cv: Condvar::new(),
        });
        let vcpu = Arc::new(Mutex::new(vcpu));
        let thread = std::thread::Builder::new()
            .name("dwcp-vcpu0".into())
            .spawn({
                let shared = Arc::clone(&shared);
                let vcpu = Arc::clone(&vcpu);
                move || vcpu_main(&vcpu, &shared)
            })
            .map_err(|e| HvError::new("spawning the vCPU thread", e))?;
        Ok(Self {
            shared,
            vcpu,
            signal,
            thread: Some(thread),
        })
    }

    fn stopped_error(what: &str, why: Option<&String>) -> HvError {
        HvError::new(
            what,
            match why {
                Some(why) => format!("the vCPU thread failed: {why}"),
                None => "the vCPU thread has stopped".to_string(),
            },
        )
    }

    /// Interrupts `KVM_RUN` on the vCPU thread (no effect if it is not in
    /// it, beyond making the next entry return at once).
    fn kick(&self) {
        if let Some(thread) = &self.thread {
            // SAFETY: the thread has not been joined (that happens only in
            // `drop`, after the last kick), so its pthread_t is valid; the
            // signal's handler is installed by `spawn`.
            unsafe { libc::pthread_kill(thread.as_pthread_t(), self.signal) };
        }
    }

    /// Lets the vCPU run.
    pub fn resume(&self) -> HvResult<()> {
        let mut c = self.shared.lock();
        if let RunState::Stopped(why) = &c.state {
            return Err(Self::stopped_error("resuming the vCPU", why.as_ref()));
        }
        c.want = Want::Run;
        self.shared.cv.notify_all();
        Ok(())
    }

    /// Stops the vCPU; returns once it runs no guest code.
    pub fn pause(&self) -> HvResult<()> {
        {
            let mut c = self.shared.lock();
            c.want = Want::Pause;
            self.shared.cv.notify_all();
        }
        self.kick();
        let c = self.shared.lock();
        let c = self
            .shared
            .cv
            .wait_while(c, |c| c.state == RunState::Running)
            .unwrap_or_else(PoisonError::into_inner);
        match &c.state {
            RunState::Stopped(why) => Err(Self::stopped_error("pausing the vCPU", why.as_ref())),
            _ => Ok(()),
        }
    }

    /// Whether the vCPU is wanted running (resumed and not paused since).
    pub fn is_running(&self) -> bool {
        self.shared.lock().want == Want::Run
    }

    /// Why the vCPU thread stopped, if it failed.
    pub fn failure(&self) -> Option<String> {
        match &self.shared.lock().state {
            RunState::Stopped(why) => why.clone(),
            _ => None,
        }
    }

    /// Sets the throttle, 0..=99 percent.
    pub fn set_throttle(&self, percent: u8) {
        self.shared.lock().throttle = percent.min(99);
        self.shared.cv.notify_all();
    }

    /// The workload's dirty rate, MiB/s.
    pub fn dirty_mibps(&self) -> u32 {
        self.shared.lock().dirty_mibps
    }

    /// Sets the workload's dirty rate, MiB/s.
    pub fn set_dirty_mibps(&self, mibps: u32) {
        self.shared.lock().dirty_mibps = mibps;
        self.shared.cv.notify_all();
    }

    /// Time the vCPU has been running (resumed) in total.
    pub fn run_time(&self) -> Duration {
        let c = self.shared.lock();
        c.run_time + c.running_since.map_or(Duration::ZERO, |t| t.elapsed())
    }

    /// Runs `f` on the vCPU, which must be parked.
    pub fn with_parked_vcpu<T>(&self, what: &str, f: impl FnOnce(&VcpuFd) -> T) -> HvResult<T> {
        {
            let c = self.shared.lock();
            match &c.state {
                RunState::Stopped(why) => return Err(Self::stopped_error(what, why.as_ref())),
                _ if c.want == Want::Run || c.state != RunState::Parked => {
                    return Err(HvError::new(what, "the vCPU is running; pause it first"));
                }
                _ => {}
            }
        }
        // The thread holds the vCPU only while running, and lets go of it
        // before it reports `Parked`.
        let vcpu = match self.vcpu.try_lock() {
            Ok(v) => v,
            Err(TryLockError::Poisoned(p)) => p.into_inner(),
            Err(TryLockError::WouldBlock) => {
                return Err(HvError::new(what, "the vCPU is in use by its thread"));
            }
        };
        Ok(f(&vcpu))
    }
}

impl Drop for VcpuRunner {
    fn drop(&mut self) {
        {
            let mut c = self.shared.lock();
            c.want = Want::Exit;
            self.shared.cv.notify_all();
        }
        self.kick();
        if let Some(thread) = self.thread.take() {
            // A panic of the thread has nothing left to report to.
            let _ = thread.join();
        }
    }
}

fn lock_vcpu(vcpu: &Mutex<VcpuFd>) -> MutexGuard<'_, VcpuFd> {
    vcpu.lock().unwrap_or_else(PoisonError::into_inner)
}

fn vcpu_main(vcpu: &Mutex<VcpuFd>, shared: &Shared) {
    {
        let mut fd = lock_vcpu(vcpu);
        let target: *mut u8 = &raw mut fd.get_kvm_run().immediate_exit;
        KICK_TARGET.with(|t| t.set(target));
    }
    let end = loop {
        if !park(shared) {
            break None;
        }
        let mut fd = lock_vcpu(vcpu);
        let result = run(&mut fd, shared);
        drop(fd);
        if let Err(why) = result {
            break Some(why);
        }
    };
    KICK_TARGET.with(|t| t.set(std::ptr::null_mut()));
    let mut c = shared.lock();
    if let Some(t) = c.running_since.take() {
        c.run_time += t.elapsed();
    }
    c.state = RunState::Stopped(end);
    shared.cv.notify_all();
}

/// Parks until the controller wants the vCPU running (`true`) or the
/// thread to end (`false`).
fn park(shared: &Shared) -> bool {
    let mut c = shared.lock();
    loop {
        match c.want {
            Want::Exit => return false,
            Want::Run => {
                c.state = RunState::Running;
                c.running_since = Some(Instant::now());
                shared.cv.notify_all();
                return true;
            }
            Want::Pause => {
                if c.state != RunState::Parked {
                    c.state = RunState::Parked;
                    if let Some(t) = c.running_since.take() {
                        c.run_time += t.elapsed();
                    }
                    shared.cv.notify_all();
                }
                c = shared.cv.wait(c).unwrap_or_else(PoisonError::into_inner);
            }
        }
    }
}

/// Runs the guest until the controller wants something else; `Err` when
/// the guest cannot go on.
fn run(fd: &mut VcpuFd, shared: &Shared) -> Result<(), String> {
    let mut pacer = Pacer::new();
    let mut pending_io = false;
    loop {
        // Clear before looking at `want`: a kick after the look sets it
        // again, and a kick before it comes with `want` already changed.
        fd.set_kvm_immediate_exit(0);
        if shared.want() == Want::Run {
            pacer.throttle(shared);
        } else if pending_io {
            // Complete the I/O (guest state is consistent only after
            // that) without entering the guest: KVM_RUN returns EINTR.
            fd.set_kvm_immediate_exit(1);
        } else {
            return Ok(());
        }
        let exit = fd.run();
        pending_io = false;
        match exit {
            Ok(VcpuExit::IoIn(port, data)) => {
                pending_io = true;
                let answer = if port == BUDGET_PORT {
                    pacer.grant(shared)
                } else {
                    0
                };
                let bytes = answer.to_le_bytes();
                for (i, d) in data.iter_mut().enumerate() {
                    *d = bytes.get(i).copied().unwrap_or(0);
                }
            }
            Ok(VcpuExit::IoOut(..)) => pending_io = true,
            Ok(VcpuExit::Intr) => {}
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
            Ok(other) => return Err(format!("unexpected vCPU exit {other:?}")),
            Err(e) => return Err(format!("KVM_RUN: {e}")),
        }
    }
}

/// Token bucket of page writes and the throttle's duty cycle.
struct Pacer {
    tokens: f64,
    last: Instant,
    period_start: Instant,
}

/// The rate (page writes per second) and the throttle (percent) now.
fn settings(shared: &Shared) -> (f64, u32) {
    let c = shared.lock();
    (
        f64::from(c.dirty_mibps) * WRITES_PER_MIB,
        u32::from(c.throttle.min(99)),
    )
}

impl Pacer {
    fn new() -> Self {
        let now = Instant::now();
        Self {
            tokens: 0.0,
            last: now,
            period_start: now,
        }
    }

    /// Adds the budget earned since the last call, up to [`BURST`] worth.
    fn accrue(&mut self, rate: f64, now: Instant) {
        let batch = (rate * BATCH.as_secs_f64()).max(1.0);
        let cap = (rate * BURST.as_secs_f64()).max(batch);
        let earned = rate * now.duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + earned).min(cap);
        self.last = now;
    }

    /// Sleeps the throttle's share once the running share of the period
    /// is used up; no budget is earned while asleep.
    fn throttle(&mut self, shared: &Shared) {
        let (rate, percent) = settings(shared);
        let now = Instant::now();
        if percent == 0 {
            self.period_start = now;
            return;
        }
        let quota = THROTTLE_PERIOD * (100 - percent) / 100;
        if now.duration_since(self.period_start) >= quota {
            self.accrue(rate, now);
            shared.sleep_running(THROTTLE_PERIOD * percent / 100);
            let now = Instant::now();
            self.period_start = now;
            self.last = now;
        }
    }

    /// The number of writes the guest may do now; waits (interruptibly)
    /// until there is a batch worth. 0 when paused meanwhile, or after
    /// [`IDLE_TICK`] at 0 MiB/s.
    fn grant(&mut self, shared: &Shared) -> u32 {
        loop {
            let (rate, _) = settings(shared);
            if rate == 0.0 {
                shared.sleep_running(IDLE_TICK);
                self.tokens = 0.0;
                self.last = Instant::now();
                return 0;
            }
            self.accrue(rate, Instant::now());
            let batch = (rate * BATCH.as_secs_f64()).max(1.0);
            if self.tokens >= batch {
                let n = self.tokens.floor();
                self.tokens -= n;
                return n as u32;
            }
            let wait = Duration::from_secs_f64((batch - self.tokens) / rate);
            if !shared.sleep_running(wait) {
                return 0;
            }
            self.throttle(shared);
        }
    }
}
