//! Checked conversions of pointers from C.
//!
//! Every pointer a caller passes is checked for NULL before use; strings
//! are checked for UTF-8; outputs are written only once a call has
//! succeeded.

use std::ffi::{CStr, c_char};

use crate::status::{Error, Result};

/// A shared reference to a handle.
///
/// # Safety
/// `p` must be NULL or point to a live `T` made by this library and not
/// freed.
pub(crate) unsafe fn handle<'a, T>(p: *const T, what: &str) -> Result<&'a T> {
    // SAFETY: the caller's contract: NULL or a live `T`.
    unsafe { p.as_ref() }.ok_or_else(|| Error::null(what))
}

/// A NUL-terminated UTF-8 string.
///
/// # Safety
/// `p` must be NULL or point to a NUL-terminated string that stays valid
/// for `'a`.
pub(crate) unsafe fn string<'a>(p: *const c_char, what: &str) -> Result<&'a str> {
    if p.is_null() {
        return Err(Error::null(what));
    }
    // SAFETY: non-NULL and NUL-terminated (caller's contract).
    let c = unsafe { CStr::from_ptr(p) };
    c.to_str()
        .map_err(|_| Error::invalid(format!("{what} is not valid UTF-8")))
}

/// Like [`string`], `None` for NULL.
///
/// # Safety
/// As for [`string`].
pub(crate) unsafe fn opt_string<'a>(p: *const c_char, what: &str) -> Result<Option<&'a str>> {
    if p.is_null() {
        Ok(None)
    } else {
        // SAFETY: as for `string`.
        unsafe { string(p, what) }.map(Some)
    }
}

/// An options struct from C, or `default()` when `p` is NULL.
///
/// # Safety
/// `p` must be NULL or valid for one read of `T`.
pub(crate) unsafe fn or_default<T: Copy>(p: *const T, default: impl FnOnce() -> T) -> T {
    // SAFETY: NULL or valid for a read (caller's contract).
    unsafe { p.as_ref() }.copied().unwrap_or_else(default)
}

/// `len` bytes at `p`; NULL is allowed when `len` is 0.
///
/// # Safety
/// `p` must be NULL or valid for `len` bytes of reads for `'a`, not written
/// meanwhile.
pub(crate) unsafe fn bytes<'a>(p: *const u8, len: usize, what: &str) -> Result<&'a [u8]> {
    if len == 0 {
        return Ok(&[]);
    }
    if p.is_null() {
        return Err(Error::null(what));
    }
    if len > isize::MAX as usize {
        return Err(Error::invalid(format!("{what}: {len} bytes is too long")));
    }
    // SAFETY: non-NULL, valid for `len` bytes (caller's contract), and
    // `len` fits a slice.
    Ok(unsafe { std::slice::from_raw_parts(p, len) })
}

/// `n` values at `p`; NULL is allowed when `n` is 0.
///
/// # Safety
/// `p` must be NULL or valid for `n` reads of `T` for `'a`.
pub(crate) unsafe fn array<'a, T>(p: *const T, n: usize, what: &str) -> Result<&'a [T]> {
    if n == 0 {
        return Ok(&[]);
    }
    if p.is_null() {
        return Err(Error::null(what));
    }
    if n.checked_mul(size_of::<T>())
        .is_none_or(|b| b > isize::MAX as usize)
    {
        return Err(Error::invalid(format!("{what}: {n} entries is too many")));
    }
    // SAFETY: non-NULL, valid for `n` values (caller's contract).
    Ok(unsafe { std::slice::from_raw_parts(p, n) })
}

/// Checks that an output pointer is not NULL (before the work, so that a
/// call with nowhere to put its result fails without side effects).
pub(crate) fn out<T>(p: *mut T, what: &str) -> Result<*mut T> {
    if p.is_null() {
        Err(Error::null(what))
    } else {
        Ok(p)
    }
}

/// Writes a result into an output checked by [`out`].
///
/// # Safety
/// `p` must be valid for one write of `T`.
pub(crate) unsafe fn write<T>(p: *mut T, v: T) {
    // SAFETY: valid for a write (caller's contract); `T`s from C are plain
    // data, so the old value needs no drop.
    unsafe { p.write(v) }
}

/// A caller's `void *user`, passed back to its callbacks from any thread.
#[derive(Debug, Clone, Copy)]
pub(crate) struct User(pub(crate) *mut std::ffi::c_void);

// SAFETY: the pointer is never dereferenced by this library, only handed
// back to the caller's callbacks; the header tells callers that callbacks
// run on library threads, so the context must be usable from them.
unsafe impl Send for User {}
// SAFETY: as for `Send`.
unsafe impl Sync for User {}

/// Milliseconds from C as a duration; `what` names it in errors.
pub(crate) fn millis(ms: u32) -> std::time::Duration {
    std::time::Duration::from_millis(u64::from(ms))
}
