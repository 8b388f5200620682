//! Status codes, the per-thread last error, and the wrapper every export
//! runs in (no panic crosses the boundary).

use std::cell::RefCell;
use std::ffi::c_char;
use std::panic::{AssertUnwindSafe, catch_unwind};

use ::dwcp_migration::precopy::MigrationError;
use dwcp_transport::TransportError;

/// What a call did. `DWCP_STATUS_OK` is 0; every other value is an error
/// whose message `dwcp_last_error()` copies out. Values are grouped by area
/// (1xx the call itself, 2xx the system, 3xx sessions, 4xx migration) and
/// never reused; a value this header does not name may appear in a later
/// release, so treat unknown values as errors.
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(non_camel_case_types)]
pub enum dwcp_status {
    /// Success.
    Ok = 0,
    /// A required pointer was NULL.
    NullArgument = 100,
    /// An argument or option was out of range or malformed (the message
    /// names it).
    InvalidArgument = 101,
    /// The caller's buffer is too small for the result; nothing was written.
    BufferTooSmall = 102,
    /// The library panicked: a bug in libdwcp. The handle involved should
    /// be freed.
    Panic = 103,
    /// Nothing happened within the given time; the call may be repeated.
    Timeout = 104,
    /// Cancelled by the caller.
    Cancelled = 105,
    /// The handle is in a state that does not allow the call (used up, or
    /// busy in another call).
    Busy = 106,
    /// A file, socket or system call failed.
    Io = 200,
    /// The engine (io_uring workers) could not start or failed.
    Engine = 201,
    /// Not available in this build or on this system.
    Unsupported = 202,
    /// The peer could not be authenticated (wrong key, or no key where
    /// one is required).
    Auth = 300,
    /// The peer broke the protocol.
    Protocol = 301,
    /// The peer refused (its message says why).
    Refused = 302,
    /// Every connection failed and the session could not be resumed in
    /// time.
    SessionLost = 303,
    /// The receiver could not place or verify what was sent.
    Verify = 304,
    /// The migration gave up (deadline, round limit, not converging); the
    /// source guest runs on.
    MigrationCancelled = 400,
    /// A hypervisor callback returned failure; the migration was cancelled
    /// and the source guest runs on.
    CallbackFailed = 401,
    /// A hypervisor callback returned bad data (a bitmap of the wrong
    /// length, a device state over the limit); the migration was
    /// cancelled and the source guest runs on.
    CallbackBadData = 402,
    /// The destination discarded the migration; no guest was started there.
    MigrationDiscarded = 403,
    /// The page codec refused data.
    Codec = 404,
    /// The session failed after the final part was sent and before the
    /// destination confirmed it: the destination may be running the guest,
    /// so the source guest stays **paused** (never two copies running).
    /// Find out from the destination (its `dwcp_migration_wait_incoming`)
    /// before resuming or discarding the source.
    MigrationOutcomeUnknown = 405,
}

/// An error on its way to the caller.
#[derive(Debug)]
pub(crate) struct Error {
    pub(crate) status: dwcp_status,
    pub(crate) message: String,
}

impl Error {
    pub(crate) fn new(status: dwcp_status, message: impl Into<String>) -> Self {
        Error {
            status,
            message: message.into(),
        }
    }

    pub(crate) fn null(what: &str) -> Self {
        Error::new(dwcp_status::NullArgument, format!("{what} is NULL"))
    }

    pub(crate) fn invalid(message: impl Into<String>) -> Self {
        Error::new(dwcp_status::InvalidArgument, message)
    }
}

impl From<TransportError> for Error {
    fn from(e: TransportError) -> Self {
        let status = match &e {
            TransportError::Wire { .. }
            | TransportError::Protocol { .. }
            | TransportError::Frame { .. } => dwcp_status::Protocol,
            TransportError::Auth(_) => dwcp_status::Auth,
            TransportError::Refused { .. } => dwcp_status::Refused,
            TransportError::Io { .. } => dwcp_status::Io,
            TransportError::Config(_) => dwcp_status::InvalidArgument,
            TransportError::Region { .. } => dwcp_status::Verify,
            TransportError::SessionLost(why) if why.starts_with(CANCELLED) => {
                dwcp_status::Cancelled
            }
            TransportError::SessionLost(_) => dwcp_status::SessionLost,
            TransportError::Cancelled => dwcp_status::Cancelled,
            TransportError::Timeout(_) => dwcp_status::Timeout,
            TransportError::Engine(_) => dwcp_status::Engine,
            TransportError::Codec(_) => dwcp_status::Codec,
        };
        Error::new(status, e.to_string())
    }
}

impl From<MigrationError> for Error {
    fn from(e: MigrationError) -> Self {
        match e {
            MigrationError::Cancelled(why)
                if why == ::dwcp_migration::precopy::CANCELLED_BY_CALLER =>
            {
                Error::new(
                    dwcp_status::Cancelled,
                    format!("migration cancelled: {why}"),
                )
            }
            MigrationError::Cancelled(why) => Error::new(
                dwcp_status::MigrationCancelled,
                format!("migration cancelled: {why}"),
            ),
            MigrationError::Hypervisor(h) => Error::new(dwcp_status::CallbackFailed, h.to_string()),
            MigrationError::Transport(t) => Error::from(t),
            MigrationError::Codec(c) => Error::new(dwcp_status::Codec, c.to_string()),
            e @ MigrationError::OutcomeUnknown(_) => {
                Error::new(dwcp_status::MigrationOutcomeUnknown, e.to_string())
            }
        }
    }
}

/// The reason [`dwcp_transport::Sender::abort`] is given when the caller
/// cancels, so that the error it causes maps to `DWCP_STATUS_CANCELLED`.
pub(crate) const CANCELLED: &str = "cancelled by the caller";

pub(crate) type Result<T> = std::result::Result<T, Error>;

thread_local! {
    static LAST_ERROR: RefCell<String> = const { RefCell::new(String::new()) };
}

fn set_last_error(message: &str) {
    LAST_ERROR.with(|l| {
        let mut l = l.borrow_mut();
        l.clear();
        // A C string ends at the first NUL: keep the message whole.
        l.extend(message.chars().map(|c| if c == '\0' { ' ' } else { c }));
    });
}

/// Runs the body of an export: its error becomes the thread's last error
/// and its status; a panic becomes `DWCP_STATUS_PANIC`.
pub(crate) fn call(f: impl FnOnce() -> Result<()>) -> dwcp_status {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => {
            set_last_error("");
            dwcp_status::Ok
        }
        Ok(Err(e)) => {
            set_last_error(&e.message);
            e.status
        }
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            set_last_error(&format!("libdwcp panicked (a bug): {what}"));
            dwcp_status::Panic
        }
    }
}

/// Runs the body of an export that returns nothing (`_free`): a panic is
/// swallowed, recorded as the thread's last error.
pub(crate) fn call_void(f: impl FnOnce()) {
    let _ = call(|| {
        f();
        Ok(())
    });
}

/// Copies `text` and a terminating NUL into `buf` (`len` bytes) and its
/// length (without the NUL) into `*written`.
///
/// # Safety
/// `buf` must be NULL or valid for `len` bytes of writes; `written` NULL or
/// valid for a write.
pub(crate) unsafe fn copy_str_out(
    text: &str,
    buf: *mut c_char,
    len: usize,
    written: *mut usize,
) -> Result<()> {
    if buf.is_null() {
        return Err(Error::null("buf"));
    }
    if written.is_null() {
        return Err(Error::null("written"));
    }
    if text.len() >= len {
        return Err(Error::new(
            dwcp_status::BufferTooSmall,
            format!(
                "the text needs {} bytes with its NUL, the buffer has {len}",
                text.len() + 1
            ),
        ));
    }
    // SAFETY: `buf` is valid for `len > text.len()` bytes (caller's
    // contract, length checked above) and cannot overlap `text`, which this
    // library owns.
    unsafe {
        std::ptr::copy_nonoverlapping(text.as_ptr(), buf.cast::<u8>(), text.len());
        *buf.add(text.len()) = 0;
        *written = text.len();
    }
    Ok(())
}

/// Copies the calling thread's last error message (empty after a call that
/// succeeded) into `buf`, NUL-terminated, and its length without the NUL
/// into `*written`.
///
/// The message describes the last call made on this thread that failed;
/// any later call on this thread replaces it (this one does not).
/// Returns `DWCP_STATUS_BUFFER_TOO_SMALL`, writing nothing, when `len` is
/// not more than the message's length (see `dwcp_last_error_len()`).
///
/// # Safety
/// `buf` must be valid for `len` bytes of writes; `written` for one write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn dwcp_last_error(
    buf: *mut c_char,
    len: usize,
    written: *mut usize,
) -> dwcp_status {
    // Not through `call`: reading the last error must not replace it.
    let r = catch_unwind(AssertUnwindSafe(|| {
        LAST_ERROR.with(|l| {
            // SAFETY: the caller's contract on `buf`, `len` and `written`.
            unsafe { copy_str_out(&l.borrow(), buf, len, written) }
        })
    }));
    match r {
        Ok(Ok(())) => dwcp_status::Ok,
        Ok(Err(e)) => e.status,
        Err(_) => dwcp_status::Panic,
    }
}

/// Writes into `*out` the length in bytes of the calling thread's last
/// error message, without its NUL (0 when the last call succeeded).
///
/// # Safety
/// `out` must be valid for one write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn dwcp_last_error_len(out: *mut usize) -> dwcp_status {
    if out.is_null() {
        return dwcp_status::NullArgument;
    }
    let n = LAST_ERROR.with(|l| l.borrow().len());
    // SAFETY: `out` is non-NULL and valid for a write (caller's contract).
    unsafe { *out = n };
    dwcp_status::Ok
}

/// The name of a status code (`"DWCP_STATUS_OK"`, ...), as a static
/// NUL-terminated string that must not be freed; `"DWCP_STATUS_UNKNOWN"`
/// for a value this library does not know.
#[unsafe(no_mangle)]
pub extern "C" fn dwcp_status_name(status: u32) -> *const c_char {
    let s: &'static [u8] = match status {
        0 => b"DWCP_STATUS_OK\0",
        100 => b"DWCP_STATUS_NULL_ARGUMENT\0",
        101 => b"DWCP_STATUS_INVALID_ARGUMENT\0",
        102 => b"DWCP_STATUS_BUFFER_TOO_SMALL\0",
        103 => b"DWCP_STATUS_PANIC\0",
        104 => b"DWCP_STATUS_TIMEOUT\0",
        105 => b"DWCP_STATUS_CANCELLED\0",
        106 => b"DWCP_STATUS_BUSY\0",
        200 => b"DWCP_STATUS_IO\0",
        201 => b"DWCP_STATUS_ENGINE\0",
        202 => b"DWCP_STATUS_UNSUPPORTED\0",
        300 => b"DWCP_STATUS_AUTH\0",
        301 => b"DWCP_STATUS_PROTOCOL\0",
        302 => b"DWCP_STATUS_REFUSED\0",
        303 => b"DWCP_STATUS_SESSION_LOST\0",
        304 => b"DWCP_STATUS_VERIFY\0",
        400 => b"DWCP_STATUS_MIGRATION_CANCELLED\0",
        401 => b"DWCP_STATUS_CALLBACK_FAILED\0",
        402 => b"DWCP_STATUS_CALLBACK_BAD_DATA\0",
        403 => b"DWCP_STATUS_MIGRATION_DISCARDED\0",
        404 => b"DWCP_STATUS_CODEC\0",
        405 => b"DWCP_STATUS_MIGRATION_OUTCOME_UNKNOWN\0",
        _ => b"DWCP_STATUS_UNKNOWN\0",
    };
    s.as_ptr().cast()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn last_error() -> String {
        let mut buf = vec![0 as c_char; 512];
        let mut n = 0usize;
        // SAFETY: `buf` is valid for its length; `n` for a write.
        let s = unsafe { dwcp_last_error(buf.as_mut_ptr(), buf.len(), &mut n) };
        assert_eq!(s, dwcp_status::Ok);
        let bytes: Vec<u8> = buf[..n].iter().map(|c| *c as u8).collect();
        String::from_utf8(bytes).unwrap()
    }

    #[test]
    fn a_panic_becomes_a_status_and_a_message() {
        let s = call(|| panic!("boom"));
        assert_eq!(s, dwcp_status::Panic);
        assert!(last_error().contains("boom"), "{}", last_error());
        // Reading it does not clear it; the next call does.
        assert!(last_error().contains("boom"));
        assert_eq!(call(|| Ok(())), dwcp_status::Ok);
        assert_eq!(last_error(), "");
    }

    #[test]
    fn errors_are_copied_out_whole_or_not_at_all() {
        let s = call(|| Err(Error::invalid("streams 99 is more than 64")));
        assert_eq!(s, dwcp_status::InvalidArgument);
        let mut len = 0;
        // SAFETY: `len` is valid for a write.
        assert_eq!(unsafe { dwcp_last_error_len(&mut len) }, dwcp_status::Ok);
        assert_eq!(len, "streams 99 is more than 64".len());
        let mut small = [7 as c_char; 4];
        let mut n = 99usize;
        // SAFETY: valid buffers of the given lengths.
        let s = unsafe { dwcp_last_error(small.as_mut_ptr(), small.len(), &mut n) };
        assert_eq!(s, dwcp_status::BufferTooSmall);
        assert_eq!((small, n), ([7; 4], 99), "nothing written on failure");
        // SAFETY: NULL is checked.
        let s = unsafe { dwcp_last_error(std::ptr::null_mut(), 10, &mut n) };
        assert_eq!(s, dwcp_status::NullArgument);
        assert_eq!(last_error(), "streams 99 is more than 64");
    }

    #[test]
    fn a_nul_inside_a_message_does_not_cut_it() {
        let _ = call(|| Err(Error::invalid("a\0b")));
        assert_eq!(last_error(), "a b");
    }

    #[test]
    fn every_status_has_its_name() {
        use std::ffi::CStr;
        let name = |v: u32| {
            // SAFETY: a static NUL-terminated string.
            unsafe { CStr::from_ptr(dwcp_status_name(v)) }
                .to_str()
                .unwrap()
                .to_string()
        };
        assert_eq!(
            name(dwcp_status::CallbackBadData as u32),
            "DWCP_STATUS_CALLBACK_BAD_DATA"
        );
        assert_eq!(name(dwcp_status::Ok as u32), "DWCP_STATUS_OK");
        assert_eq!(name(12345), "DWCP_STATUS_UNKNOWN");
        for v in [
            100, 101, 102, 103, 104, 105, 106, 200, 201, 202, 300, 301, 302, 303, 304,
        ] {
            assert_ne!(name(v), "DWCP_STATUS_UNKNOWN", "{v}");
        }
        for v in 400..=405 {
            assert_ne!(name(v), "DWCP_STATUS_UNKNOWN", "{v}");
        }
    }

    #[test]
    fn transport_errors_map_to_their_area() {
        let e = Error::from(TransportError::Auth("bad tag".into()));
        assert_eq!(e.status, dwcp_status::Auth);
        let e = Error::from(TransportError::SessionLost(CANCELLED.into()));
        assert_eq!(e.status, dwcp_status::Cancelled);
        let e = Error::from(TransportError::SessionLost("every stream failed".into()));
        assert_eq!(e.status, dwcp_status::SessionLost);
        let e = Error::from(MigrationError::Cancelled(
            ::dwcp_migration::precopy::CANCELLED_BY_CALLER.into(),
        ));
        assert_eq!(e.status, dwcp_status::Cancelled);
        let e = Error::from(MigrationError::Cancelled("deadline exceeded".into()));
        assert_eq!(e.status, dwcp_status::MigrationCancelled);
    }
}
