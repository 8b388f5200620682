//! Files through the ring: open, positional read and write (fixed-buffer
//! variants for registered pool buffers), sync and close.

use std::ffi::CString;
use std::io;
use std::marker::PhantomData;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::rc::Rc;

use io_uring::{opcode, squeue, types};

use crate::buf::{BufResult, IoBuf, IoBufMut};
use crate::driver::Completion;
use crate::net::{CloseOp, close_on_drop};
use crate::op::{Op, Operation};
use crate::runtime::{count_in, count_out};

/// A file whose reads and writes go through its core's ring. `!Send`.
pub struct LocalFile {
    fd: Option<OwnedFd>,
    _local: PhantomData<Rc<()>>,
}

/// How to open a file: the `open(2)` flags, in a small builder.
#[derive(Debug, Clone, Copy)]
pub struct OpenOptions {
    flags: i32,
    mode: u32,
}

impl Default for OpenOptions {
    fn default() -> Self {
        Self::new()
    }
}

impl OpenOptions {
    /// Read-only.
    pub fn new() -> Self {
        Self {
            flags: libc::O_RDONLY | libc::O_CLOEXEC,
            mode: 0o644,
        }
    }
    /// Read and write.
    pub fn read_write(mut self) -> Self {
        self.flags = (self.flags & !libc::O_ACCMODE) | libc::O_RDWR;
        self
    }
    /// Write-only.
    pub fn write_only(mut self) -> Self {
        self.flags = (self.flags & !libc::O_ACCMODE) | libc::O_WRONLY;
        self
    }
    /// Create if missing.
    pub fn create(mut self) -> Self {
        self.flags |= libc::O_CREAT;
        self
    }
    /// Truncate to zero length.
    pub fn truncate(mut self) -> Self {
        self.flags |= libc::O_TRUNC;
        self
    }
    /// Fail if it exists (with `create`).
    pub fn create_new(mut self) -> Self {
        self.flags |= libc::O_CREAT | libc::O_EXCL;
        self
    }
    /// Permission bits for a created file.
    pub fn mode(mut self, mode: u32) -> Self {
        self.mode = mode;
        self
    }
}

struct OpenOp {
    path: CString,
    flags: i32,
    mode: u32,
}

impl Operation for OpenOp {
    type Output = io::Result<LocalFile>;
    fn entry(&mut self) -> squeue::Entry {
        opcode::OpenAt::new(types::Fd(libc::AT_FDCWD), self.path.as_ptr())
            .flags(self.flags)
            .mode(self.mode)
            .build()
    }
    fn complete(self, c: Completion) -> Self::Output {
        let fd = c.into_io()? as RawFd;
        // SAFETY: a new descriptor from the kernel, owned by nobody else.
        Ok(LocalFile::from_owned(unsafe { OwnedFd::from_raw_fd(fd) }))
    }
    fn fail(self, e: io::Error) -> Self::Output {
        Err(e)
    }
}

impl LocalFile {
    fn from_owned(fd: OwnedFd) -> Self {
        Self {
            fd: Some(fd),
            _local: PhantomData,
        }
    }

    fn raw_fd(&self) -> RawFd {
        self.fd.as_ref().map_or(-1, AsRawFd::as_raw_fd)
    }

    /// Opens `path` through the ring.
    pub async fn open(path: impl AsRef<Path>, options: OpenOptions) -> io::Result<Self> {
        let path = CString::new(path.as_ref().as_os_str().as_bytes())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))?;
        Op::new(OpenOp {
            path,
            flags: options.flags,
            mode: options.mode,
        })
        .await
    }

    /// Wraps an open std file.
    pub fn from_std(file: std::fs::File) -> Self {
        Self::from_owned(OwnedFd::from(file))
    }

    /// Gives the file back as a std file.
    pub fn into_std(mut self) -> Option<std::fs::File> {
        self.fd.take().map(std::fs::File::from)
    }

    /// Reads into `buf` at `offset`; may read less (0 at end of file).
    pub async fn read_at<B: IoBufMut>(&self, buf: B, offset: u64) -> BufResult<usize, B> {
        Op::new(ReadOp {
            fd: self.raw_fd(),
            buf,
            offset,
        })
        .await
    }

    /// Writes `buf` at `offset`; may write less.
    pub async fn write_at<B: IoBuf>(&self, buf: B, offset: u64) -> BufResult<usize, B> {
        Op::new(WriteOp {
            fd: self.raw_fd(),
            buf,
            offset,
            skip: 0,
        })
        .await
    }

    /// Writes all of `buf` at `offset`.
    pub async fn write_all_at<B: IoBuf>(&self, buf: B, offset: u64) -> BufResult<(), B> {
        let total = buf.bytes_init();
        let mut op = WriteOp {
            fd: self.raw_fd(),
            buf,
            offset,
            skip: 0,
        };
        while op.skip < total {
            let skip = op.skip;
            let (res, buf) = Op::new(op).await;
            match res {
                Ok(0) => return (Err(io::ErrorKind::WriteZero.into()), buf),
                Ok(n) => {
                    op = WriteOp {
                        fd: self.raw_fd(),
                        buf,
                        offset,
                        skip: skip + n,
                    }
                }
                Err(e) => return (Err(e), buf),
            }
        }
        (Ok(()), op.buf)
    }

    /// Flushes data and metadata to the device (`fsync`).
    pub async fn sync_all(&self) -> io::Result<()> {
        Op::new(FsyncOp { fd: self.raw_fd() }).await
    }

    /// Closes the file through the ring and reports the result.
    pub async fn close(mut self) -> io::Result<()> {
        let Some(fd) = self.fd.take() else {
            return Ok(());
        };
        Op::new(CloseOp {
            fd: fd.into_raw_fd(),
        })
        .await
    }
}

impl Drop for LocalFile {
    fn drop(&mut self) {
        if let Some(fd) = self.fd.take() {
            close_on_drop(fd);
        }
    }
}

struct ReadOp<B> {
    fd: RawFd,
    buf: B,
    offset: u64,
}

impl<B: IoBufMut> Operation for ReadOp<B> {
    type Output = BufResult<usize, B>;
    fn entry(&mut self) -> squeue::Entry {
        let len = self.buf.bytes_total().min(u32::MAX as usize) as u32;
        let ptr = self.buf.stable_mut_ptr();
        match self.buf.fixed_index() {
            Some(idx) => opcode::ReadFixed::new(types::Fd(self.fd), ptr, len, idx)
                .offset(self.offset)
                .build(),
            None => opcode::Read::new(types::Fd(self.fd), ptr, len)
                .offset(self.offset)
                .build(),
        }
    }
    fn complete(mut self, c: Completion) -> Self::Output {
        let r = c.into_io().map(|n| {
            count_in(n);
            // SAFETY: the kernel wrote `n` bytes at the start of the buffer.
            unsafe { self.buf.set_init(n as usize) };
            n as usize
        });
        (r, self.buf)
    }
    fn fail(self, e: io::Error) -> Self::Output {
        (Err(e), self.buf)
    }
}

struct WriteOp<B> {
    fd: RawFd,
    buf: B,
    offset: u64,
    skip: usize,
}

impl<B: IoBuf> Operation for WriteOp<B> {
    type Output = BufResult<usize, B>;
    fn entry(&mut self) -> squeue::Entry {
        let init = self.buf.bytes_init();
        let skip = self.skip.min(init);
        let len = (init - skip).min(u32::MAX as usize) as u32;
        // SAFETY: `skip <= bytes_init`, inside the buffer.
        let ptr = unsafe { self.buf.stable_ptr().add(skip) };
        let offset = self.offset + skip as u64;
        match self.buf.fixed_index() {
            Some(idx) => opcode::WriteFixed::new(types::Fd(self.fd), ptr, len, idx)
                .offset(offset)
                .build(),
            None => opcode::Write::new(types::Fd(self.fd), ptr, len)
                .offset(offset)
                .build(),
        }
    }
    fn complete(self, c: Completion) -> Self::Output {
        let r = c.into_io().map(|n| {
            count_out(n);
            n as usize
        });
        (r, self.buf)
    }
    fn fail(self, e: io::Error) -> Self::Output {
        (Err(e), self.buf)
    }
}

struct FsyncOp {
    fd: RawFd,
}

impl Operation for FsyncOp {
    type Output = io::Result<()>;
    fn entry(&mut self) -> squeue::Entry {
        opcode::Fsync::new(types::Fd(self.fd)).build()
    }
    fn complete(self, c: Completion) -> Self::Output {
        c.into_io().map(drop)
    }
    fn fail(self, e: io::Error) -> Self::Output {
        Err(e)
    }
}
