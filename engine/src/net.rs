//! TCP through the ring: listen, accept, connect, send (plain, vectored,
//! zero-copy), receive (plain, vectored, multishot into provided buffers),
//! shutdown, cancel and close.

use std::cell::Cell;
use std::io;
use std::marker::PhantomData;
use std::mem::{size_of, zeroed};
use std::net::{Shutdown, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::rc::Rc;
use std::task::{Context, Poll};

use io_uring::{cqueue, opcode, squeue, types};

use crate::buf::{BufResult, IoBuf, IoBufMut};
use crate::bufring::{LocalBufRing, RingBuf};
use crate::driver::Completion;
use crate::op::{Op, Operation};
use crate::runtime::{self, count_in, count_out, not_on_worker};

/// A socket address in the kernel's layout, boxed so its address is stable.
struct RawAddr {
    storage: libc::sockaddr_storage,
    len: libc::socklen_t,
}

impl RawAddr {
    fn empty() -> Box<Self> {
        Box::new(Self {
            // SAFETY: all-zero is a valid sockaddr_storage.
            storage: unsafe { zeroed() },
            len: size_of::<libc::sockaddr_storage>() as libc::socklen_t,
        })
    }

    fn from_addr(addr: SocketAddr) -> Box<Self> {
        let mut raw = Self::empty();
        match addr {
            SocketAddr::V4(a) => {
                let sin = libc::sockaddr_in {
                    sin_family: libc::AF_INET as libc::sa_family_t,
                    sin_port: a.port().to_be(),
                    sin_addr: libc::in_addr {
                        s_addr: u32::from_ne_bytes(a.ip().octets()),
                    },
                    sin_zero: [0; 8],
                };
                // SAFETY: sockaddr_storage is larger than and aligned for
                // sockaddr_in.
                unsafe { std::ptr::write((&raw mut raw.storage).cast::<libc::sockaddr_in>(), sin) };
                raw.len = size_of::<libc::sockaddr_in>() as libc::socklen_t;
            }
            SocketAddr::V6(a) => {
                let sin6 = libc::sockaddr_in6 {
                    sin6_family: libc::AF_INET6 as libc::sa_family_t,
                    sin6_port: a.port().to_be(),
                    sin6_flowinfo: a.flowinfo(),
                    sin6_addr: libc::in6_addr {
                        s6_addr: a.ip().octets(),
                    },
                    sin6_scope_id: a.scope_id(),
                };
                // SAFETY: sockaddr_storage is larger than and aligned for
                // sockaddr_in6.
                unsafe {
                    std::ptr::write((&raw mut raw.storage).cast::<libc::sockaddr_in6>(), sin6)
                };
                raw.len = size_of::<libc::sockaddr_in6>() as libc::socklen_t;
            }
        }
        raw
    }

    fn to_addr(&self) -> Option<SocketAddr> {
        match self.storage.ss_family as libc::c_int {
            libc::AF_INET => {
                // SAFETY: the family says the storage holds a sockaddr_in.
                let sin = unsafe { &*(&raw const self.storage).cast::<libc::sockaddr_in>() };
                Some(SocketAddr::V4(SocketAddrV4::new(
                    u32::from_be(sin.sin_addr.s_addr).into(),
                    u16::from_be(sin.sin_port),
                )))
            }
            libc::AF_INET6 => {
                // SAFETY: the family says the storage holds a sockaddr_in6.
                let sin6 = unsafe { &*(&raw const self.storage).cast::<libc::sockaddr_in6>() };
                Some(SocketAddr::V6(SocketAddrV6::new(
                    sin6.sin6_addr.s6_addr.into(),
                    u16::from_be(sin6.sin6_port),
                    sin6.sin6_flowinfo,
                    sin6.sin6_scope_id,
                )))
            }
            _ => None,
        }
    }
}

/// A TCP listener whose accepts go through the ring. `!Send`.
pub struct LocalTcpListener {
    inner: std::net::TcpListener,
    _local: PhantomData<Rc<()>>,
}

impl LocalTcpListener {
    /// Binds and listens (`SO_REUSEADDR` on, as `std` does).
    pub fn bind(addr: SocketAddr) -> io::Result<Self> {
        Ok(Self::from_std(std::net::TcpListener::bind(addr)?))
    }

    /// Wraps a listening socket.
    pub fn from_std(inner: std::net::TcpListener) -> Self {
        Self {
            inner,
            _local: PhantomData,
        }
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    /// Accepts one connection.
    pub async fn accept(&self) -> io::Result<(LocalTcpStream, SocketAddr)> {
        Op::new(AcceptOp {
            fd: self.inner.as_raw_fd(),
            addr: RawAddr::empty(),
        })
        .await
    }
}

struct AcceptOp {
    fd: RawFd,
    addr: Box<RawAddr>,
}

impl Operation for AcceptOp {
    type Output = io::Result<(LocalTcpStream, SocketAddr)>;
    fn entry(&mut self) -> squeue::Entry {
        opcode::Accept::new(
            types::Fd(self.fd),
            (&raw mut self.addr.storage).cast(),
            &raw mut self.addr.len,
        )
        .flags(libc::SOCK_CLOEXEC)
        .build()
    }
    fn complete(self, c: Completion) -> Self::Output {
        let fd = c.into_io()? as RawFd;
        // SAFETY: the kernel returned a new descriptor that nothing else owns.
        let stream = LocalTcpStream::from_owned(unsafe { OwnedFd::from_raw_fd(fd) });
        let peer = self
            .addr
            .to_addr()
            .ok_or_else(|| io::Error::other("accepted a connection of an unknown family"))?;
        Ok((stream, peer))
    }
    fn fail(self, e: io::Error) -> Self::Output {
        Err(e)
    }
}

struct ConnectOp {
    fd: RawFd,
    addr: Box<RawAddr>,
}

impl Operation for ConnectOp {
    type Output = io::Result<()>;
    fn entry(&mut self) -> squeue::Entry {
        opcode::Connect::new(
            types::Fd(self.fd),
            (&raw const self.addr.storage).cast(),
            self.addr.len,
        )
        .build()
    }
    fn complete(self, c: Completion) -> Self::Output {
        c.into_io().map(drop)
    }
    fn fail(self, e: io::Error) -> Self::Output {
        Err(e)
    }
}

/// A connected TCP socket whose IO goes through its core's ring. `!Send`:
/// move it to another core with [`LocalTcpStream::into_std`] and
/// [`LocalTcpStream::from_std`].
pub struct LocalTcpStream {
    fd: Option<OwnedFd>,
    /// Whether `SEND_ZC` has paid on this socket; see [`ZeroCopy`].
    zero_copy: Cell<ZeroCopy>,
    _local: PhantomData<Rc<()>>,
}

/// What `SEND_ZC` has done on one socket. The route of a connected socket
/// does not change, so the first notification decides: where the kernel
/// reports that it copied anyway (loopback, a device without
/// scatter-gather), zero copy only adds a second completion and page
/// pinning, and [`LocalTcpStream::send_zc`] sends plainly from then on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ZeroCopy {
    /// No `SEND_ZC` completed yet on this socket.
    Untried,
    /// The kernel sent from the pinned pages.
    Works,
    /// The kernel copied; sends are plain from now on.
    Copies,
    /// The kernel has no `SEND_ZC`.
    Unsupported,
}

impl std::fmt::Debug for LocalTcpStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalTcpStream")
            .field("fd", &self.raw_fd())
            .finish()
    }
}

impl LocalTcpStream {
    fn from_owned(fd: OwnedFd) -> Self {
        Self {
            fd: Some(fd),
            zero_copy: Cell::new(ZeroCopy::Untried),
            _local: PhantomData,
        }
    }

    fn raw_fd(&self) -> RawFd {
        self.fd.as_ref().map_or(-1, AsRawFd::as_raw_fd)
    }

    /// What [`LocalTcpStream::send_zc`] has learnt about zero copy on this
    /// socket.
    pub fn zero_copy(&self) -> ZeroCopy {
        self.zero_copy.get()
    }

    /// Connects to `addr`.
    pub async fn connect(addr: SocketAddr) -> io::Result<Self> {
        let domain = if addr.is_ipv4() {
            libc::AF_INET
        } else {
            libc::AF_INET6
        };
        // SAFETY: plain socket(2) call; the result is checked.
        let fd = unsafe { libc::socket(domain, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a new descriptor nothing else owns.
        let stream = Self::from_owned(unsafe { OwnedFd::from_raw_fd(fd) });
        Op::new(ConnectOp {
            fd,
            addr: RawAddr::from_addr(addr),
        })
        .await?;
        Ok(stream)
    }

    /// Wraps a connected std socket (for example one moved from another core).
    pub fn from_std(stream: std::net::TcpStream) -> io::Result<Self> {
        // io_uring does its own readiness handling; blocking mode avoids
        // needless EAGAIN retries inside the kernel.
        stream.set_nonblocking(false)?;
        Ok(Self::from_owned(OwnedFd::from(stream)))
    }

    /// Gives the socket back as a std socket (to move it to another core).
    pub fn into_std(mut self) -> std::net::TcpStream {
        match self.fd.take() {
            Some(fd) => std::net::TcpStream::from(fd),
            // Unreachable: `fd` is only taken here and in `close`/`drop`,
            // which consume the stream.
            None => {
                // SAFETY: -1 is never a valid descriptor; the std socket will
                // fail every call, which is the honest state of a closed one.
                unsafe { std::net::TcpStream::from_raw_fd(-1) }
            }
        }
    }

    fn borrow_std<R>(&self, f: impl FnOnce(&std::net::TcpStream) -> R) -> R {
        // SAFETY: the descriptor is ours and stays open for this call;
        // ManuallyDrop keeps the temporary from closing it.
        let s =
            std::mem::ManuallyDrop::new(unsafe { std::net::TcpStream::from_raw_fd(self.raw_fd()) });
        f(&s)
    }

    /// The local address.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.borrow_std(|s| s.local_addr())
    }

    /// The peer's address.
    pub fn peer_addr(&self) -> io::Result<SocketAddr> {
        self.borrow_std(|s| s.peer_addr())
    }

    /// Sets `TCP_NODELAY`.
    pub fn set_nodelay(&self, on: bool) -> io::Result<()> {
        self.borrow_std(|s| s.set_nodelay(on))
    }

    /// Sets the congestion control algorithm (`TCP_CONGESTION`), e.g. `bbr`.
    pub fn set_congestion(&self, name: &str) -> io::Result<()> {
        setsockopt_bytes(
            self.raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_CONGESTION,
            name.as_bytes(),
        )
    }

    /// Makes a peer that vanished (host down, link cut: no FIN, no RST)
    /// show up as an error within about `after`: TCP keepalive probes start
    /// after a third of it idle and go every sixth of it, and
    /// `TCP_USER_TIMEOUT` fails the socket when sent data stays
    /// unacknowledged that long. Whole seconds for keepalive (at least 1).
    pub fn set_dead_peer_timeout(&self, after: std::time::Duration) -> io::Result<()> {
        let secs = |d: std::time::Duration| d.as_secs().clamp(1, i32::MAX as u64) as i32;
        let int = |v: i32| v.to_ne_bytes();
        let fd = self.raw_fd();
        setsockopt_bytes(fd, libc::SOL_SOCKET, libc::SO_KEEPALIVE, &int(1))?;
        setsockopt_bytes(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_KEEPIDLE,
            &int(secs(after / 3)),
        )?;
        setsockopt_bytes(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_KEEPINTVL,
            &int(secs(after / 6)),
        )?;
        setsockopt_bytes(fd, libc::IPPROTO_TCP, libc::TCP_KEEPCNT, &int(3))?;
        let ms = after.as_millis().clamp(1, i32::MAX as u128) as i32;
        setsockopt_bytes(fd, libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT, &int(ms))
    }

    /// Sends from `buf` (one `send(2)`, `MSG_NOSIGNAL`); may send less.
    pub async fn send<B: IoBuf>(&self, buf: B) -> BufResult<usize, B> {
        let (res, buf, _) = Op::new(SendOp {
            fd: self.raw_fd(),
            buf,
            offset: 0,
            zero_copy: false,
        })
        .await;
        (res, buf)
    }

    /// Sends all of `buf`.
    pub async fn send_all<B: IoBuf>(&self, buf: B) -> BufResult<(), B> {
        self.send_whole(buf, false).await
    }

    /// Sends all of `buf` with `SEND_ZC` (the kernel pins the pages instead
    /// of copying, where the device allows). Falls back to a plain send
    /// where the kernel lacks `SEND_ZC`, and from the first time it reports
    /// that it copied anyway ([`ZeroCopy::Copies`]). The buffer comes back
    /// only after the kernel's notification that it no longer uses it.
    pub async fn send_zc<B: IoBuf>(&self, buf: B) -> BufResult<(), B> {
        if self.zero_copy.get() == ZeroCopy::Untried
            && !runtime::with_local(|l| l.features.send_zc).unwrap_or(false)
        {
            self.zero_copy.set(ZeroCopy::Unsupported);
        }
        let zero_copy = matches!(self.zero_copy.get(), ZeroCopy::Untried | ZeroCopy::Works);
        self.send_whole(buf, zero_copy).await
    }

    async fn send_whole<B: IoBuf>(&self, buf: B, mut zero_copy: bool) -> BufResult<(), B> {
        let total = buf.bytes_init();
        let mut op = SendOp {
            fd: self.raw_fd(),
            buf,
            offset: 0,
            zero_copy,
        };
        while op.offset < total {
            let offset = op.offset;
            let (res, buf, copied) = Op::new(op).await;
            if zero_copy && self.zero_copy.get() == ZeroCopy::Untried {
                match &res {
                    Ok(_) if copied => self.zero_copy.set(ZeroCopy::Copies),
                    Ok(_) => self.zero_copy.set(ZeroCopy::Works),
                    // Kernels before 6.2 have SEND_ZC but reject the
                    // usage report: send plainly, nothing was sent.
                    Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                        self.zero_copy.set(ZeroCopy::Unsupported);
                        zero_copy = false;
                        op = SendOp {
                            fd: self.raw_fd(),
                            buf,
                            offset,
                            zero_copy,
                        };
                        continue;
                    }
                    Err(_) => {}
                }
                zero_copy = self.zero_copy.get() != ZeroCopy::Copies;
            }
            match res {
                Ok(0) => return (Err(io::ErrorKind::WriteZero.into()), buf),
                Ok(n) => {
                    op = SendOp {
                        fd: self.raw_fd(),
                        buf,
                        offset: offset + n,
                        zero_copy,
                    }
                }
                Err(e) => return (Err(e), buf),
            }
        }
        (Ok(()), op.buf)
    }

    /// Sends the buffers in order with one `sendmsg(2)`; may send less than
    /// all of them.
    pub async fn send_vectored<B: IoBuf>(&self, bufs: Vec<B>) -> BufResult<usize, Vec<B>> {
        self.sendmsg_from(bufs, 0).await
    }

    /// Sends all of the buffers, in order, as one byte stream: `sendmsg(2)`
    /// again from where a short send stopped, until every byte is out.
    pub async fn send_all_vectored<B: IoBuf>(&self, bufs: Vec<B>) -> BufResult<(), Vec<B>> {
        let total: usize = bufs.iter().map(IoBuf::bytes_init).sum();
        let mut done = 0usize;
        let mut bufs = bufs;
        while done < total {
            let (res, b) = self.sendmsg_from(bufs, done).await;
            bufs = b;
            match res {
                Ok(0) => return (Err(io::ErrorKind::WriteZero.into()), bufs),
                Ok(n) => done += n,
                Err(e) => return (Err(e), bufs),
            }
        }
        (Ok(()), bufs)
    }

    /// One `sendmsg(2)` of the buffers' bytes after the first `skip`.
    async fn sendmsg_from<B: IoBuf>(&self, bufs: Vec<B>, skip: usize) -> BufResult<usize, Vec<B>> {
        let mut skip = skip;
        let iov: Box<[libc::iovec]> = bufs
            .iter()
            .filter_map(|b| {
                let len = b.bytes_init();
                if skip >= len {
                    skip -= len;
                    return None;
                }
                let from = std::mem::take(&mut skip);
                Some(libc::iovec {
                    // SAFETY: `from < len`, within the buffer's initialized
                    // bytes.
                    iov_base: unsafe { b.stable_ptr().add(from) } as *mut libc::c_void,
                    iov_len: len - from,
                })
            })
            .collect();
        Op::new(MsgOp {
            fd: self.raw_fd(),
            bufs,
            iov,
            // SAFETY: all-zero is a valid msghdr.
            msg: Box::new(unsafe { zeroed() }),
            send: true,
        })
        .await
    }

    /// Receives into the buffers in order with one `recvmsg(2)`.
    pub async fn recv_vectored<B: IoBufMut>(&self, mut bufs: Vec<B>) -> BufResult<usize, Vec<B>> {
        let iov: Box<[libc::iovec]> = bufs
            .iter_mut()
            .map(|b| libc::iovec {
                iov_base: b.stable_mut_ptr().cast(),
                iov_len: b.bytes_total(),
            })
            .collect();
        Op::new(MsgOp {
            fd: self.raw_fd(),
            bufs,
            iov,
            // SAFETY: all-zero is a valid msghdr.
            msg: Box::new(unsafe { zeroed() }),
            send: false,
        })
        .await
    }

    /// Receives into `buf` (one `recv(2)`); `Ok(0)` means the peer closed.
    pub async fn recv<B: IoBufMut>(&self, buf: B) -> BufResult<usize, B> {
        Op::new(RecvOp {
            fd: self.raw_fd(),
            buf,
            offset: 0,
        })
        .await
    }

    /// Receives until `buf` is full. Fails with `UnexpectedEof` if the peer
    /// closes first.
    pub async fn recv_exact<B: IoBufMut>(&self, mut buf: B) -> BufResult<(), B> {
        let total = buf.bytes_total();
        let mut filled = 0;
        while filled < total {
            let (res, b) = Op::new(RecvOp {
                fd: self.raw_fd(),
                buf,
                offset: filled,
            })
            .await;
            buf = b;
            match res {
                Ok(0) => return (Err(io::ErrorKind::UnexpectedEof.into()), buf),
                Ok(n) => filled += n,
                Err(e) => return (Err(e), buf),
            }
        }
        (Ok(()), buf)
    }

    /// A multishot receive: one request, many completions, each into a
    /// buffer the kernel picks from this core's provided-buffer ring. Falls
    /// back to single receives where the kernel lacks it.
    pub fn recv_multishot(&self) -> io::Result<RecvStream<'_>> {
        let ring = runtime::with_local(|l| l.recv_ring.clone())
            .ok_or_else(not_on_worker)?
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::Unsupported,
                    "this engine has no provided-buffer ring (multishot receive unavailable)",
                )
            })?;
        Ok(RecvStream {
            stream: self,
            ring,
            key: None,
            eof: false,
        })
    }

    /// Shuts down one or both directions.
    pub async fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        let how = match how {
            Shutdown::Read => libc::SHUT_RD,
            Shutdown::Write => libc::SHUT_WR,
            Shutdown::Both => libc::SHUT_RDWR,
        };
        Op::new(ShutdownOp {
            fd: self.raw_fd(),
            how,
        })
        .await
    }

    /// Cancels every operation in flight on this socket; they complete with
    /// `ECANCELED` (`io::ErrorKind::Other`, raw error 125).
    pub fn cancel_all(&self) -> io::Result<()> {
        runtime::with_local(|l| l.driver.borrow_mut().cancel_fd(self.raw_fd()))
            .ok_or_else(not_on_worker)?
    }

    /// Closes the socket through the ring and reports the result.
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

impl Drop for LocalTcpStream {
    fn drop(&mut self) {
        if let Some(fd) = self.fd.take() {
            close_on_drop(fd);
        }
    }
}

/// Closes `fd` through the ring when on a worker with room, else inline.
pub(crate) fn close_on_drop(fd: OwnedFd) {
    let raw = fd.as_raw_fd();
    let queued = runtime::with_local(|l| {
        let entry = opcode::Close::new(types::Fd(raw)).build();
        // SAFETY: a close points to no memory.
        unsafe { l.driver.borrow_mut().submit_detached(entry, Box::new(())) }
    })
    .unwrap_or(false);
    if queued {
        // The ring owns the close now.
        let _ = fd.into_raw_fd();
    }
}

fn setsockopt_bytes(fd: RawFd, level: i32, name: i32, value: &[u8]) -> io::Result<()> {
    // SAFETY: `value` is a live slice of the given length.
    let r = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            value.as_ptr().cast(),
            value.len() as libc::socklen_t,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// `send(2)` of `buf[offset..]`, as `SEND_ZC` when `zero_copy`.
struct SendOp<B> {
    fd: RawFd,
    buf: B,
    offset: usize,
    zero_copy: bool,
}

/// `IORING_SEND_ZC_REPORT_USAGE`: ask the notification to say whether the
/// kernel copied.
const SEND_ZC_REPORT_USAGE: u16 = 1 << 3;

impl<B: IoBuf> Operation for SendOp<B> {
    /// The result, the buffer, and whether a `SEND_ZC` was copied anyway.
    type Output = (io::Result<usize>, B, bool);
    fn entry(&mut self) -> squeue::Entry {
        let init = self.buf.bytes_init();
        let offset = self.offset.min(init);
        let len = (init - offset).min(u32::MAX as usize) as u32;
        // SAFETY: `offset <= bytes_init`, inside the buffer.
        let ptr = unsafe { self.buf.stable_ptr().add(offset) };
        let fd = types::Fd(self.fd);
        if self.zero_copy {
            opcode::SendZc::new(fd, ptr, len)
                .buf_index(self.buf.fixed_index())
                .flags(libc::MSG_NOSIGNAL)
                .zc_flags(SEND_ZC_REPORT_USAGE)
                .build()
        } else {
            opcode::Send::new(fd, ptr, len)
                .flags(libc::MSG_NOSIGNAL)
                .build()
        }
    }
    fn complete(self, c: Completion) -> Self::Output {
        let copied = c.zc_copied;
        let r = c.into_io().map(|n| {
            count_out(n);
            n as usize
        });
        (r, self.buf, copied)
    }
    fn fail(self, e: io::Error) -> Self::Output {
        (Err(e), self.buf, false)
    }
}

/// `recv(2)` into `buf[offset..]`.
struct RecvOp<B> {
    fd: RawFd,
    buf: B,
    offset: usize,
}

impl<B: IoBufMut> Operation for RecvOp<B> {
    type Output = BufResult<usize, B>;
    fn entry(&mut self) -> squeue::Entry {
        let total = self.buf.bytes_total();
        let offset = self.offset.min(total);
        let len = (total - offset).min(u32::MAX as usize) as u32;
        // SAFETY: `offset <= bytes_total`, inside the buffer.
        let ptr = unsafe { self.buf.stable_mut_ptr().add(offset) };
        opcode::Recv::new(types::Fd(self.fd), ptr, len).build()
    }
    fn complete(mut self, c: Completion) -> Self::Output {
        let r = c.into_io().map(|n| {
            count_in(n);
            // SAFETY: bytes before `offset` were written by earlier receives,
            // and the kernel wrote `n` more.
            unsafe { self.buf.set_init(self.offset + n as usize) };
            n as usize
        });
        (r, self.buf)
    }
    fn fail(self, e: io::Error) -> Self::Output {
        (Err(e), self.buf)
    }
}

struct MsgOp<B> {
    fd: RawFd,
    bufs: Vec<B>,
    iov: Box<[libc::iovec]>,
    msg: Box<libc::msghdr>,
    send: bool,
}

impl<B: IoBuf> Operation for MsgOp<B>
where
    Vec<B>: Unpin,
{
    type Output = BufResult<usize, Vec<B>>;
    fn entry(&mut self) -> squeue::Entry {
        self.msg.msg_iov = self.iov.as_mut_ptr();
        self.msg.msg_iovlen = self.iov.len() as _;
        if self.send {
            opcode::SendMsg::new(types::Fd(self.fd), &raw const *self.msg)
                .flags(libc::MSG_NOSIGNAL as u32)
                .build()
        } else {
            opcode::RecvMsg::new(types::Fd(self.fd), &raw mut *self.msg).build()
        }
    }
    fn complete(self, c: Completion) -> Self::Output {
        let r = c.into_io().map(|n| {
            if self.send {
                count_out(n);
            } else {
                count_in(n);
            }
            n as usize
        });
        (r, self.bufs)
    }
    fn fail(self, e: io::Error) -> Self::Output {
        (Err(e), self.bufs)
    }
}

struct ShutdownOp {
    fd: RawFd,
    how: i32,
}

impl Operation for ShutdownOp {
    type Output = io::Result<()>;
    fn entry(&mut self) -> squeue::Entry {
        opcode::Shutdown::new(types::Fd(self.fd), self.how).build()
    }
    fn complete(self, c: Completion) -> Self::Output {
        c.into_io().map(drop)
    }
    fn fail(self, e: io::Error) -> Self::Output {
        Err(e)
    }
}

pub(crate) struct CloseOp {
    pub fd: RawFd,
}

impl Operation for CloseOp {
    type Output = io::Result<()>;
    fn entry(&mut self) -> squeue::Entry {
        opcode::Close::new(types::Fd(self.fd)).build()
    }
    fn complete(self, c: Completion) -> Self::Output {
        c.into_io().map(drop)
    }
    fn fail(self, e: io::Error) -> Self::Output {
        // Not submitted: close it here so the descriptor does not leak.
        // SAFETY: we own `fd` (taken out of an OwnedFd).
        drop(unsafe { OwnedFd::from_raw_fd(self.fd) });
        Err(e)
    }
}

/// Chunks received by a multishot receive ([`LocalTcpStream::recv_multishot`]).
pub struct RecvStream<'a> {
    stream: &'a LocalTcpStream,
    ring: LocalBufRing,
    key: Option<usize>,
    eof: bool,
}

impl RecvStream<'_> {
    /// The next chunk; `None` once the peer closed.
    pub async fn next(&mut self) -> Option<io::Result<RingBuf>> {
        std::future::poll_fn(|cx| self.poll_next(cx)).await
    }

    /// Polls for the next chunk.
    pub fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<io::Result<RingBuf>>> {
        let Some(local) = runtime::with_local(Rc::clone) else {
            return Poll::Ready(Some(Err(not_on_worker())));
        };
        loop {
            if self.eof {
                return Poll::Ready(None);
            }
            let key = match self.key {
                Some(k) => k,
                None => {
                    if !self.ring.has_free() {
                        // Every buffer is held by the application: wait for
                        // one to come back before asking the kernel again.
                        self.ring.wait_for_buffer(cx.waker().clone());
                        return Poll::Pending;
                    }
                    let entry = opcode::RecvMulti::new(
                        types::Fd(self.stream.raw_fd()),
                        self.ring.inner.bgid,
                    )
                    .build();
                    // SAFETY: the receive writes only into ring buffers,
                    // which live as long as the worker's ring (freed only
                    // after every operation finished).
                    match unsafe { local.driver.borrow_mut().submit(entry, true, cx) } {
                        Poll::Pending => return Poll::Pending,
                        Poll::Ready(Ok(k)) => {
                            self.key = Some(k);
                            k
                        }
                        Poll::Ready(Err(e)) => return Poll::Ready(Some(Err(e))),
                    }
                }
            };
            let polled = local.driver.borrow_mut().poll_multi(key, cx);
            match polled {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => {
                    // The kernel ended this request: re-arm.
                    self.key = None;
                }
                Poll::Ready(Some(c)) => {
                    if c.result < 0 {
                        if c.result == -libc::ENOBUFS {
                            continue;
                        }
                        return Poll::Ready(Some(Err(io::Error::from_raw_os_error(-c.result))));
                    }
                    let Some(bid) = cqueue::buffer_select(c.flags) else {
                        if c.result == 0 {
                            self.eof = true;
                            return Poll::Ready(None);
                        }
                        return Poll::Ready(Some(Err(io::Error::other(
                            "multishot receive completed without a buffer",
                        ))));
                    };
                    let buf = self.ring.take(bid, c.result as u32);
                    if c.result == 0 {
                        drop(buf);
                        self.eof = true;
                        return Poll::Ready(None);
                    }
                    count_in(c.result as u32);
                    return Poll::Ready(Some(Ok(buf)));
                }
            }
        }
    }
}

impl Drop for RecvStream<'_> {
    fn drop(&mut self) {
        let Some(key) = self.key.take() else { return };
        let ring = self.ring.inner.clone();
        let _ = runtime::with_local(|l| {
            let queued = l.driver.borrow_mut().drain_multi(key);
            for c in queued {
                ring.recycle_flags(c.flags);
            }
            let r2 = ring.clone();
            l.driver.borrow_mut().abandon(
                key,
                Box::new(()),
                Some(Box::new(move |flags| r2.recycle_flags(flags))),
            );
        });
    }
}
