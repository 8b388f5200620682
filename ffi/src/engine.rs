//! The engine handle, keys, version and capability queries.

use std::ffi::c_char;
use std::path::Path;
use std::sync::Arc;

use ::dwcp_engine::Engine;
use dwcp_transport::Key;

use crate::ptr::{self, handle, out, write};
use crate::status::{Error, Result, call, call_void, dwcp_status};

/// The library's version, as a static NUL-terminated string (`"0.1.0"`)
/// that must not be freed. Compare with `DWCP_VERSION_STRING` to catch a
/// header and a library from different releases.
#[unsafe(no_mangle)]
pub extern "C" fn dwcp_version() -> *const c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr().cast()
}

/// The library's version as `major << 16 | minor << 8 | patch`, like
/// `DWCP_VERSION_NUMBER`.
#[unsafe(no_mangle)]
pub extern "C" fn dwcp_version_number() -> u32 {
    let part = |s: &str| s.parse::<u32>().unwrap_or(0);
    part(env!("CARGO_PKG_VERSION_MAJOR")) << 16
        | part(env!("CARGO_PKG_VERSION_MINOR")) << 8
        | part(env!("CARGO_PKG_VERSION_PATCH"))
}

/// Capability: TCP transport on io_uring.
pub const DWCP_CAP_TCP: u64 = 1 << 0;
/// Capability: RDMA verbs transport (not in this build).
pub const DWCP_CAP_RDMA: u64 = 1 << 1;
/// Capability: LZ4 compression (`DWCP_MODE_DATACENTER`).
pub const DWCP_CAP_LZ4: u64 = 1 << 2;
/// Capability: ZStd compression (`DWCP_MODE_INTERNET`).
pub const DWCP_CAP_ZSTD: u64 = 1 << 3;
/// Capability: pre-copy live migration (`dwcp_migration_*`).
pub const DWCP_CAP_MIGRATION: u64 = 1 << 4;
/// Capability: sessions authenticated with a pre-shared key.
pub const DWCP_CAP_AUTH: u64 = 1 << 5;

/// Engine feature: zero-copy sends (`IORING_OP_SEND_ZC`).
pub const DWCP_ENGINE_SEND_ZC: u64 = 1 << 0;
/// Engine feature: multishot receive into provided-buffer rings.
pub const DWCP_ENGINE_RECV_MULTISHOT: u64 = 1 << 1;
/// Engine feature: buffers registered with the rings.
pub const DWCP_ENGINE_REGISTERED_BUFFERS: u64 = 1 << 2;
/// Engine feature: rings run with `SINGLE_ISSUER | DEFER_TASKRUN`.
pub const DWCP_ENGINE_DEFER_TASKRUN: u64 = 1 << 3;

/// Writes into `*out` the `DWCP_CAP_*` bits of what this build of the
/// library can do.
///
/// # Safety
/// `out` must be valid for one write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn dwcp_capabilities(out_caps: *mut u64) -> dwcp_status {
    call(|| {
        let o = out(out_caps, "out")?;
        let caps = DWCP_CAP_TCP | DWCP_CAP_LZ4 | DWCP_CAP_ZSTD | DWCP_CAP_MIGRATION | DWCP_CAP_AUTH;
        // SAFETY: checked non-NULL; valid for a write (caller's contract).
        unsafe { write(o, caps) };
        Ok(())
    })
}

/// Options of an engine. Initialise with `dwcp_engine_options_default()`,
/// then change what you need.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct dwcp_engine_options {
    /// Worker threads, one io_uring each; 0 for one per CPU this process
    /// may run on.
    pub workers: u32,
    /// Pin each worker to its CPU.
    pub pin: bool,
}

/// One worker per CPU, pinned.
const ENGINE_DEFAULTS: dwcp_engine_options = dwcp_engine_options {
    workers: 0,
    pin: true,
};

/// Writes the default engine options into `*out`.
///
/// # Safety
/// `out` must be valid for one write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn dwcp_engine_options_default(
    out_opts: *mut dwcp_engine_options,
) -> dwcp_status {
    call(|| {
        let o = out(out_opts, "out")?;
        // SAFETY: checked non-NULL; valid for a write (caller's contract).
        unsafe { write(o, ENGINE_DEFAULTS) };
        Ok(())
    })
}

/// A running engine: worker threads, one io_uring each. Sessions,
/// listeners and migrations made from it keep it alive: freeing the handle
/// while they live is allowed, the workers stop when the last of them is
/// freed. Thread-safe: may be used from any number of threads at once.
pub struct dwcp_engine {
    pub(crate) engine: Arc<Engine>,
}

/// The most workers an engine may have.
const MAX_WORKERS: u32 = 1024;

/// Starts an engine with `opts` (NULL for the defaults) and writes its
/// handle into `*out`; free it with `dwcp_engine_free()`.
///
/// # Safety
/// `opts` must be NULL or valid for a read; `out` valid for one write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn dwcp_engine_new(
    opts: *const dwcp_engine_options,
    out_engine: *mut *mut dwcp_engine,
) -> dwcp_status {
    call(|| {
        let o = out(out_engine, "out")?;
        // SAFETY: NULL or valid for a read (caller's contract).
        let opts = unsafe { ptr::or_default(opts, || ENGINE_DEFAULTS) };
        if opts.workers > MAX_WORKERS {
            return Err(Error::invalid(format!(
                "engine options: workers {} is more than {MAX_WORKERS}",
                opts.workers
            )));
        }
        let mut b = Engine::builder().pin(opts.pin);
        if opts.workers > 0 {
            b = b.workers(opts.workers as usize);
        }
        let engine = b
            .build()
            .map_err(|e| Error::new(dwcp_status::Engine, format!("starting the engine: {e}")))?;
        let h = Box::new(dwcp_engine {
            engine: Arc::new(engine),
        });
        // SAFETY: checked non-NULL; valid for a write (caller's contract).
        unsafe { write(o, Box::into_raw(h)) };
        Ok(())
    })
}

/// Writes the number of workers of `engine` into `*out`.
///
/// # Safety
/// `engine` must be NULL or a live engine; `out` valid for one write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn dwcp_engine_workers(
    engine: *const dwcp_engine,
    out_workers: *mut u32,
) -> dwcp_status {
    call(|| {
        // SAFETY: NULL or a live engine (caller's contract).
        let e = unsafe { handle(engine, "engine") }?;
        let o = out(out_workers, "out")?;
        let n = u32::try_from(e.engine.workers()).unwrap_or(u32::MAX);
        // SAFETY: checked non-NULL; valid for a write.
        unsafe { write(o, n) };
        Ok(())
    })
}

/// Writes the `DWCP_ENGINE_*` bits of what the kernel offered `engine`
/// into `*out`.
///
/// # Safety
/// `engine` must be NULL or a live engine; `out` valid for one write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn dwcp_engine_features(
    engine: *const dwcp_engine,
    out_features: *mut u64,
) -> dwcp_status {
    call(|| {
        // SAFETY: NULL or a live engine (caller's contract).
        let e = unsafe { handle(engine, "engine") }?;
        let o = out(out_features, "out")?;
        let f = e.engine.features();
        let bits = [
            (f.send_zc, DWCP_ENGINE_SEND_ZC),
            (f.recv_multishot, DWCP_ENGINE_RECV_MULTISHOT),
            (f.registered_buffers, DWCP_ENGINE_REGISTERED_BUFFERS),
            (f.defer_taskrun, DWCP_ENGINE_DEFER_TASKRUN),
        ]
        .iter()
        .filter(|(on, _)| *on)
        .fold(0, |a, (_, b)| a | b);
        // SAFETY: checked non-NULL; valid for a write.
        unsafe { write(o, bits) };
        Ok(())
    })
}

/// Frees an engine handle (NULL is fine). The workers stop once nothing
/// made from it (sessions, listeners, migrations) is alive.
///
/// # Safety
/// `engine` must be NULL or a live engine, not used after this call.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn dwcp_engine_free(engine: *mut dwcp_engine) {
    call_void(|| {
        if !engine.is_null() {
            // SAFETY: made by `Box::into_raw` in `dwcp_engine_new`, freed
            // once (caller's contract).
            drop(unsafe { Box::from_raw(engine) });
        }
    })
}

/// Length of a key in bytes.
pub const DWCP_KEY_LEN: usize = 32;

/// Reads a key file (as `dwcp keygen` writes it) into `out` (32 bytes).
///
/// # Safety
/// `path` must be NULL or a NUL-terminated string; `out` valid for 32
/// bytes of writes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn dwcp_key_load(path: *const c_char, out_key: *mut u8) -> dwcp_status {
    call(|| {
        // SAFETY: NULL or NUL-terminated (caller's contract).
        let path = unsafe { ptr::string(path, "path") }?;
        let o = out(out_key, "out")?;
        let key = Key::load(Path::new(path))
            .map_err(|e| Error::new(dwcp_status::Io, format!("key file {path}: {e}")))?;
        // SAFETY: `o` is valid for 32 bytes (caller's contract).
        unsafe { std::ptr::copy_nonoverlapping(key.as_bytes().as_ptr(), o, DWCP_KEY_LEN) };
        Ok(())
    })
}

/// Makes a new random key, writes it to a new file at `path` (mode 0600;
/// an existing file is not overwritten) and into `out` (32 bytes).
///
/// # Safety
/// `path` must be NULL or a NUL-terminated string; `out` valid for 32
/// bytes of writes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn dwcp_key_generate(path: *const c_char, out_key: *mut u8) -> dwcp_status {
    call(|| {
        // SAFETY: NULL or NUL-terminated (caller's contract).
        let path = unsafe { ptr::string(path, "path") }?;
        let o = out(out_key, "out")?;
        let key = Key::write_new(Path::new(path))
            .map_err(|e| Error::new(dwcp_status::Io, format!("key file {path}: {e}")))?;
        // SAFETY: `o` is valid for 32 bytes (caller's contract).
        unsafe { std::ptr::copy_nonoverlapping(key.as_bytes().as_ptr(), o, DWCP_KEY_LEN) };
        Ok(())
    })
}

/// The key of an options struct: 32 bytes, or none when `insecure` says
/// so.
///
/// # Safety
/// `key` must be NULL or valid for 32 bytes of reads.
pub(crate) unsafe fn key_of(key: *const u8, insecure: bool, what: &str) -> Result<Option<Key>> {
    match (key.is_null(), insecure) {
        (false, false) => {
            // SAFETY: valid for 32 bytes (caller's contract).
            let b = unsafe { ptr::bytes(key, DWCP_KEY_LEN, what) }?;
            let mut k = [0u8; DWCP_KEY_LEN];
            k.copy_from_slice(b);
            Ok(Some(Key::from_bytes(k)))
        }
        (true, true) => Ok(None),
        (true, false) => Err(Error::new(
            dwcp_status::Auth,
            format!("{what}: no key given; set insecure_no_auth to run without authentication"),
        )),
        (false, true) => Err(Error::invalid(format!(
            "{what}: both a key and insecure_no_auth given; choose one"
        ))),
    }
}
