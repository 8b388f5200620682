//! Errors of the engine: building it, running tasks on it, and talking to it.

use std::io;

/// Why an engine could not be built or run.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The configuration asks for something impossible.
    #[error("invalid engine configuration: {0}")]
    InvalidConfig(String),
    /// The kernel refuses io_uring; `reason` says which mechanism and why.
    #[error("io_uring is unavailable: {reason}")]
    IoUringUnavailable {
        /// What refused it (sysctl, kernel version, seccomp) and what to do.
        reason: String,
        /// The error the kernel returned.
        #[source]
        source: io::Error,
    },
    /// The kernel has io_uring but lacks an operation the engine needs.
    #[error("io_uring lacks {0}, which the engine needs (Linux 6.0 or newer is required)")]
    MissingOperation(&'static str),
    /// A CPU in the list does not exist or is not allowed for this process.
    #[error("CPU {cpu} is not available to this process (allowed: {allowed:?})")]
    CpuUnavailable {
        /// The CPU that was asked for.
        cpu: usize,
        /// The CPUs this process may run on.
        allowed: Vec<usize>,
    },
    /// Pinning a worker thread to its CPU failed.
    #[error("could not pin worker {worker} to CPU {cpu}")]
    Pin {
        /// Worker index.
        worker: usize,
        /// CPU it was meant for.
        cpu: usize,
    },
    /// Locking memory for registered buffers failed because of `RLIMIT_MEMLOCK`.
    #[error(
        "registering {wanted} bytes of buffers exceeds the locked-memory limit of {limit} bytes \
         (raise `ulimit -l` or disable buffer registration)"
    )]
    MemLockLimit {
        /// Bytes the engine tried to register.
        wanted: u64,
        /// The soft `RLIMIT_MEMLOCK`.
        limit: u64,
    },
    /// Setting up a worker failed for another reason.
    #[error("worker {worker} failed to start: {what}")]
    WorkerSetup {
        /// Worker index.
        worker: usize,
        /// What was being set up.
        what: &'static str,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// A worker thread died from a bug in the engine itself.
    #[error("worker {worker} stopped abnormally: {message}")]
    WorkerDied {
        /// Worker index.
        worker: usize,
        /// Panic message.
        message: String,
    },
}

/// Why a task gave no result.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TaskError {
    /// The task panicked; the engine caught it and carries on.
    #[error("task panicked: {0}")]
    Panicked(String),
    /// The task was dropped before it finished (engine shut down, or cancelled).
    #[error("task was cancelled before it finished")]
    Cancelled,
    /// The engine was stopped, or is stopping, and took no new work.
    #[error("engine is shut down")]
    EngineStopped,
    /// The target core's inbox is full and the caller may not wait.
    #[error("inbox of core {core} is full")]
    Busy {
        /// Core asked for.
        core: usize,
    },
    /// The target core does not exist.
    #[error("no worker for core {core} (engine has {workers})")]
    NoSuchCore {
        /// Core asked for.
        core: usize,
        /// Workers the engine has.
        workers: usize,
    },
}

/// Turns a panic payload into text.
pub(crate) fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_string()
    }
}

/// Builds the error for an `io_uring_setup` failure, naming the reason.
pub(crate) fn io_uring_unavailable(source: io::Error) -> EngineError {
    let disabled = std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled")
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok());
    let reason = match (source.raw_os_error(), disabled) {
        (Some(libc::EPERM), Some(2)) => {
            "the sysctl kernel.io_uring_disabled is 2, which disables io_uring for every process"
                .to_string()
        }
        (Some(libc::EPERM), Some(1)) => "the sysctl kernel.io_uring_disabled is 1, which allows \
             io_uring only to processes in kernel.io_uring_group (or with CAP_SYS_ADMIN)"
            .to_string(),
        (Some(libc::EPERM), _) => "io_uring_setup was denied (EPERM): a seccomp filter or a \
             security module blocks it (common in containers)"
            .to_string(),
        (Some(libc::ENOSYS), _) => "the kernel has no io_uring_setup system call: the kernel is \
             older than 5.1, built without CONFIG_IO_URING, or a seccomp filter hides it"
            .to_string(),
        (Some(libc::ENOMEM), _) => "the kernel could not allocate the ring: the locked-memory \
             limit (ulimit -l) may be too low for the ring size"
            .to_string(),
        (Some(libc::EINVAL), _) => "the kernel rejected the ring parameters: it is older than \
             the engine needs (Linux 6.0 or newer)"
            .to_string(),
        _ => "io_uring_setup failed".to_string(),
    };
    EngineError::IoUringUnavailable { reason, source }
}
