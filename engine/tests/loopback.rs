//! Loopback integration tests of the engine. Each one is bounded in time:
//! results are collected with `join_timeout`, so a hang fails the test
//! instead of stalling the suite.

use std::io;
use std::net::{Shutdown, SocketAddr, TcpListener};
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use dwcp_engine::{
    Elapsed, Engine, EngineError, LocalBufPool, LocalFile, LocalTcpListener, LocalTcpStream,
    OpenOptions, RemoteHandle, TaskError, local_state, sleep, spawn_local, spawn_on, timeout,
};

const LIMIT: Duration = Duration::from_secs(20);

fn engine(workers: usize) -> Engine {
    Engine::builder()
        .workers(workers)
        .buffer_count(16)
        .buffer_size(64 * 1024)
        .recv_buffers(16)
        .recv_buffer_size(16 * 1024)
        .build()
        .expect("io_uring works on the test machines")
}

fn wait<T>(h: RemoteHandle<T>) -> Result<T, TaskError> {
    match h.join_timeout(LIMIT) {
        Ok(r) => r,
        Err(_) => panic!("task did not finish within {LIMIT:?}"),
    }
}

fn listener() -> (TcpListener, SocketAddr) {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind loopback");
    let a = l.local_addr().expect("local addr");
    (l, a)
}

fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[test]
fn many_connections_spread_over_cores() {
    let engine = engine(2);
    let (l, addr) = listener();
    const CONNS: usize = 16;
    const LEN: usize = 200_000;
    let server = engine
        .spawn_on(0, move || async move {
            let l = Rc::new(LocalTcpListener::from_std(l));
            let mut handles = Vec::new();
            for _ in 0..CONNS {
                let (c, _) = l.accept().await?;
                // Echo everything back, on this core.
                handles.push(
                    spawn_local(async move {
                        let mut buf = vec![0u8; 32 * 1024];
                        loop {
                            let (n, b) = c.recv(buf).await;
                            let n = n?;
                            if n == 0 {
                                c.shutdown(Shutdown::Write).await?;
                                return Ok::<_, io::Error>(());
                            }
                            let mut out = b;
                            out.truncate(n);
                            let (r, mut b) = c.send_all(out).await;
                            r?;
                            b.resize(32 * 1024, 0);
                            buf = b;
                        }
                    })
                    .expect("spawn"),
                );
            }
            for h in handles {
                h.await.expect("echo task")?;
            }
            Ok::<_, io::Error>(())
        })
        .expect("spawn server");
    let clients: Vec<_> = (0..CONNS)
        .map(|i| {
            engine
                .spawn_on(i % 2, move || async move {
                    let c = LocalTcpStream::connect(addr).await?;
                    let data = pattern(LEN, i as u64);
                    let expect = data.clone();
                    // Send and receive concurrently so neither side's
                    // socket buffer fills up.
                    let c = Rc::new(c);
                    let c2 = c.clone();
                    let sender = spawn_local(async move {
                        let (r, _) = c2.send_all(data).await;
                        r?;
                        c2.shutdown(Shutdown::Write).await
                    })
                    .expect("spawn");
                    let mut got = Vec::with_capacity(LEN);
                    loop {
                        let (n, b) = c.recv(vec![0u8; 16 * 1024]).await;
                        let n = n?;
                        if n == 0 {
                            break;
                        }
                        got.extend_from_slice(&b[..n]);
                    }
                    sender.await.expect("sender")?;
                    Ok::<_, io::Error>(got == expect)
                })
                .expect("spawn client")
        })
        .collect();
    for c in clients {
        assert!(
            wait(c).expect("client task").expect("client io"),
            "echo mismatch"
        );
    }
    wait(server).expect("server task").expect("server io");
    let m = engine.metrics();
    assert!(m.iter().all(|c| c.bytes_in > 0 && c.bytes_out > 0), "{m:?}");
    assert!(m.iter().all(|c| c.ops_completed > 0));
    engine.shutdown(Duration::from_secs(1)).expect("shutdown");
}

#[test]
fn timeout_cancels_a_pending_recv_and_returns_its_buffer() {
    let engine = engine(1);
    let (l, addr) = listener();
    let out = engine
        .spawn_on(0, move || async move {
            let _peer = std::thread::spawn(move || {
                let (s, _) = l.accept().expect("accept");
                std::thread::sleep(Duration::from_millis(800));
                drop(s);
            });
            let c = LocalTcpStream::connect(addr).await?;
            let pool = LocalBufPool::current().expect("on a worker");
            let before = pool.available();
            let buf = pool.get().await;
            let start = Instant::now();
            let r = timeout(Duration::from_millis(50), c.recv(buf)).await;
            let waited = start.elapsed();
            assert_eq!(r.err(), Some(Elapsed));
            // The cancelled receive gives its buffer back once the kernel
            // confirms the cancellation.
            let deadline = Instant::now() + Duration::from_secs(2);
            while pool.available() != before && Instant::now() < deadline {
                sleep(Duration::from_millis(1)).await?;
            }
            Ok::<_, io::Error>((waited, pool.available() == before))
        })
        .expect("spawn");
    let (waited, returned) = wait(out).expect("task").expect("io");
    assert!(waited >= Duration::from_millis(50), "{waited:?}");
    assert!(waited < Duration::from_millis(700), "{waited:?}");
    assert!(returned, "buffer not returned to the pool");
}

#[test]
fn cancel_all_ends_pending_operations_on_a_socket() {
    let engine = engine(1);
    let (l, addr) = listener();
    let out = engine
        .spawn_on(0, move || async move {
            let peer = std::thread::spawn(move || {
                let (s, _) = l.accept().expect("accept");
                std::thread::sleep(Duration::from_millis(500));
                drop(s);
            });
            let c = Rc::new(LocalTcpStream::connect(addr).await?);
            let c2 = c.clone();
            let pending =
                spawn_local(async move { c2.recv(vec![0u8; 64]).await.0 }).expect("spawn");
            sleep(Duration::from_millis(20)).await?;
            c.cancel_all()?;
            let r = timeout(Duration::from_millis(300), pending).await;
            let _ = peer.join();
            Ok::<_, io::Error>(r)
        })
        .expect("spawn");
    let r = wait(out).expect("task").expect("io");
    let recv = r.expect("cancel took effect in time").expect("task");
    let err = recv.expect_err("cancelled recv must fail");
    assert_eq!(err.raw_os_error(), Some(libc_ecanceled()), "{err}");
}

fn libc_ecanceled() -> i32 {
    125
}

#[test]
fn sleep_waits_at_least_its_duration() {
    let engine = engine(1);
    let h = engine
        .spawn_on(0, || async {
            let start = Instant::now();
            sleep(Duration::from_millis(30)).await?;
            Ok::<_, io::Error>(start.elapsed())
        })
        .expect("spawn");
    let e = wait(h).expect("task").expect("io");
    assert!(
        e >= Duration::from_millis(30) && e < Duration::from_secs(2),
        "{e:?}"
    );
}

#[test]
fn peer_reset_mid_transfer_is_an_error_not_a_hang() {
    let engine = engine(2);
    let (l, addr) = listener();
    let peer = std::thread::spawn(move || {
        let (s, _) = l.accept().expect("accept");
        let mut buf = vec![0u8; 100_000];
        let _ = std::io::Read::read(&mut &s, &mut buf);
        // SO_LINGER 0: close sends RST instead of FIN.
        let sock = socket_linger_zero(&s);
        drop(s);
        sock
    });
    let h = engine
        .spawn_on(1, move || async move {
            let c = LocalTcpStream::connect(addr).await?;
            let chunk = pattern(1 << 20, 3);
            for _ in 0..1000 {
                let (r, _) = c.send_all(chunk.clone()).await;
                if let Err(e) = r {
                    return Ok::<_, io::Error>(Some(e.kind()));
                }
            }
            Ok::<_, io::Error>(None)
        })
        .expect("spawn");
    let kind = wait(h).expect("task").expect("io");
    assert!(peer.join().expect("peer thread"));
    let kind = kind.expect("send after a reset must fail");
    assert!(
        matches!(
            kind,
            io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
        ),
        "{kind:?}"
    );
    // The engine is still fine.
    let ok = engine.block_on(1, || async { 7 }).expect("engine alive");
    assert_eq!(ok, 7);
}

fn socket_linger_zero(s: &std::net::TcpStream) -> bool {
    use std::os::fd::AsRawFd;
    #[repr(C)]
    struct Linger {
        onoff: i32,
        linger: i32,
    }
    let l = Linger {
        onoff: 1,
        linger: 0,
    };
    // SAFETY: setsockopt with a valid fd and a live struct of the right size.
    let r = unsafe {
        setsockopt(
            s.as_raw_fd(),
            1,  /* SOL_SOCKET */
            13, /* SO_LINGER */
            (&raw const l).cast(),
            std::mem::size_of::<Linger>() as u32,
        )
    };
    r == 0
}

unsafe extern "C" {
    fn setsockopt(fd: i32, level: i32, name: i32, val: *const u8, len: u32) -> i32;
}

#[test]
fn shutdown_under_load_cancels_and_returns() {
    let engine = engine(2);
    let (l, addr) = listener();
    let sink = std::thread::spawn(move || {
        let mut total = 0u64;
        let mut conns = Vec::new();
        for _ in 0..4 {
            conns.push(l.accept().expect("accept").0);
        }
        let mut buf = vec![0u8; 1 << 16];
        // Read a little, then stop reading: senders block in the kernel.
        for c in &conns {
            if let Ok(n) = std::io::Read::read(&mut &*c, &mut buf) {
                total += n as u64;
            }
        }
        std::thread::sleep(Duration::from_millis(600));
        total
    });
    let handles: Vec<_> = (0..4)
        .map(|i| {
            engine
                .spawn_on(i % 2, move || async move {
                    let c = LocalTcpStream::connect(addr).await?;
                    let data = pattern(1 << 20, 9);
                    loop {
                        let (r, _) = c.send_all(data.clone()).await;
                        r?;
                    }
                    #[allow(unreachable_code)]
                    Ok::<_, io::Error>(())
                })
                .expect("spawn")
        })
        .collect();
    std::thread::sleep(Duration::from_millis(150));
    let start = Instant::now();
    engine
        .shutdown(Duration::from_millis(100))
        .expect("clean shutdown");
    let took = start.elapsed();
    assert!(took < Duration::from_secs(5), "shutdown took {took:?}");
    for h in handles {
        assert_eq!(wait(h).err(), Some(TaskError::Cancelled));
    }
    assert!(sink.join().expect("sink") > 0);
}

#[test]
fn full_ring_makes_operations_wait_not_fail() {
    let engine = Engine::builder()
        .workers(1)
        .ring_entries(2)
        .build()
        .expect("engine");
    let h = engine
        .spawn_on(0, || async {
            let done = Rc::new(std::cell::Cell::new(0));
            let mut hs = Vec::new();
            for i in 0..200u64 {
                let done = done.clone();
                hs.push(
                    spawn_local(async move {
                        sleep(Duration::from_micros(100 + i % 7)).await?;
                        done.set(done.get() + 1);
                        Ok::<_, io::Error>(())
                    })
                    .expect("spawn"),
                );
            }
            for h in hs {
                h.await.expect("task")?;
            }
            Ok::<_, io::Error>(done.get())
        })
        .expect("spawn");
    assert_eq!(wait(h).expect("task").expect("io"), 200);
    let m = &engine.metrics()[0];
    assert!(m.ring_full_waits > 0, "{m:?}");
    assert_eq!(m.ring_depth, 0);
}

#[test]
fn empty_buffer_pool_makes_tasks_wait_for_a_buffer() {
    let engine = Engine::builder()
        .workers(1)
        .buffer_count(2)
        .buffer_size(4096)
        .build()
        .expect("engine");
    let h = engine
        .spawn_on(0, || async {
            let pool = LocalBufPool::current().expect("on a worker");
            let a = pool.get().await;
            let b = pool.get().await;
            assert_eq!(pool.available(), 0);
            assert!(pool.try_get().is_none());
            let waiter = spawn_local({
                let pool = pool.clone();
                async move {
                    let c = pool.get().await;
                    c.capacity()
                }
            })
            .expect("spawn");
            sleep(Duration::from_millis(20)).await.expect("sleep");
            assert!(!waiter.is_finished(), "got a buffer from an empty pool");
            drop(a);
            let cap = waiter.await.expect("waiter");
            drop(b);
            (cap, pool.available())
        })
        .expect("spawn");
    assert_eq!(wait(h).expect("task"), (4096, 2));
    assert!(engine.metrics()[0].buffer_waits >= 1);
}

#[test]
fn a_panicking_task_is_reported_and_the_engine_runs_on() {
    let engine = engine(2);
    let h = engine
        .spawn_on(0, || async {
            let inner = spawn_local(async {
                sleep(Duration::from_millis(1)).await.expect("sleep");
                panic!("boom in a task");
            })
            .expect("spawn");
            inner.await
        })
        .expect("spawn");
    let inner: Result<(), TaskError> = wait(h).expect("outer task");
    assert_eq!(
        inner,
        Err(TaskError::Panicked("boom in a task".to_string()))
    );
    let direct = engine
        .spawn_on(1, || async { panic!("boom at top level") })
        .expect("spawn");
    let r: Result<(), _> = wait(direct);
    assert_eq!(r, Err(TaskError::Panicked("boom at top level".into())));
    assert_eq!(engine.block_on(0, || async { 1 + 1 }), Ok(2));
    let panics: u64 = engine.metrics().iter().map(|m| m.tasks_panicked).sum();
    assert_eq!(panics, 2);
    engine.shutdown(Duration::from_secs(1)).expect("shutdown");
}

#[test]
fn files_are_written_and_read_through_the_ring() {
    let engine = engine(1);
    let dir = std::env::temp_dir().join(format!("dwcp-engine-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join("data.bin");
    let p = path.clone();
    let h = engine
        .spawn_on(0, move || async move {
            let data = pattern(150_000, 5);
            let f =
                LocalFile::open(&p, OpenOptions::new().read_write().create().truncate()).await?;
            let (r, _) = f.write_all_at(data.clone(), 0).await;
            r?;
            // A registered pool buffer takes the fixed-buffer path.
            let pool = LocalBufPool::current().expect("on a worker");
            let mut b = pool.get().await;
            b.fill_from(b"tail");
            let (r, _) = f.write_all_at(b, 150_000).await;
            r?;
            f.sync_all().await?;
            let mut got = Vec::new();
            let mut off = 0u64;
            loop {
                let buf = pool.get().await;
                let (n, buf) = f.read_at(buf, off).await;
                let n = n?;
                if n == 0 {
                    break;
                }
                got.extend_from_slice(&buf[..n]);
                off += n as u64;
            }
            f.close().await?;
            let mut expect = data;
            expect.extend_from_slice(b"tail");
            Ok::<_, io::Error>(got == expect)
        })
        .expect("spawn");
    assert!(wait(h).expect("task").expect("io"));
    assert_eq!(std::fs::metadata(&path).expect("file").len(), 150_004);
    let _ = std::fs::remove_dir_all(&dir);
    let missing = engine
        .block_on(0, || async {
            LocalFile::open("/nonexistent/dwcp/x", OpenOptions::new())
                .await
                .err()
                .map(|e| e.kind())
        })
        .expect("task");
    assert_eq!(missing, Some(io::ErrorKind::NotFound));
}

#[test]
fn cores_send_requests_to_each_other_and_get_replies() {
    let engine = engine(2);
    let h = engine
        .spawn_on(0, || async {
            let mut sum = 0usize;
            for i in 0..50usize {
                let reply = spawn_on(
                    1,
                    move || async move { (i * 2, dwcp_engine::current_core()) },
                )
                .await
                .expect("send");
                let (v, core) = reply.await.expect("reply");
                assert_eq!(core, Some(1));
                sum += v;
            }
            (sum, dwcp_engine::current_core())
        })
        .expect("spawn");
    assert_eq!(wait(h).expect("task"), (2450, Some(0)));
}

#[test]
fn full_inbox_slows_the_producer_and_loses_nothing() {
    let engine = Engine::builder()
        .workers(1)
        .inbox_capacity(1)
        .build()
        .expect("engine");
    let count = Arc::new(AtomicUsize::new(0));
    let handles: Vec<_> = (0..500)
        .map(|_| {
            let count = count.clone();
            engine
                .spawn_on(0, move || async move {
                    count.fetch_add(1, Ordering::Relaxed);
                })
                .expect("spawn blocks instead of failing")
        })
        .collect();
    for h in handles {
        wait(h).expect("task");
    }
    assert_eq!(count.load(Ordering::Relaxed), 500);
}

#[test]
fn multishot_receive_survives_running_out_of_buffers() {
    let engine = Engine::builder()
        .workers(2)
        .recv_buffers(4)
        .recv_buffer_size(4096)
        .build()
        .expect("engine");
    if !engine.features().recv_multishot {
        eprintln!("skipped: kernel lacks multishot receive with provided buffers");
        return;
    }
    let (l, addr) = listener();
    const LEN: usize = 3 << 20;
    let data = pattern(LEN, 11);
    let expect = data.clone();
    let sender = std::thread::spawn(move || {
        let (mut s, _) = l.accept().expect("accept");
        std::io::Write::write_all(&mut s, &data).expect("send");
    });
    let h = engine
        .spawn_on(0, move || async move {
            let c = LocalTcpStream::connect(addr).await?;
            let mut rx = c.recv_multishot()?;
            let mut got = Vec::with_capacity(LEN);
            let mut held = Vec::new();
            while let Some(chunk) = rx.next().await {
                let chunk = chunk?;
                got.extend_from_slice(&chunk);
                // Hold buffers for a while so the ring runs dry.
                held.push(chunk);
                if held.len() == 4 {
                    sleep(Duration::from_millis(1)).await?;
                    held.clear();
                }
            }
            Ok::<_, io::Error>(got)
        })
        .expect("spawn");
    let got = wait(h).expect("task").expect("io");
    sender.join().expect("sender");
    assert_eq!(got.len(), expect.len());
    assert!(got == expect, "multishot data corrupted");
}

#[test]
fn builder_rejects_bad_configuration_with_a_reason() {
    let e = Engine::builder().workers(0).build().err().expect("error");
    assert!(matches!(e, EngineError::InvalidConfig(_)), "{e}");
    let e = Engine::builder()
        .ring_entries(3)
        .build()
        .err()
        .expect("error");
    assert!(e.to_string().contains("power of two"), "{e}");
    let e = Engine::builder()
        .cpus(vec![100_000])
        .build()
        .err()
        .expect("error");
    assert!(
        matches!(e, EngineError::CpuUnavailable { cpu: 100_000, .. }),
        "{e}"
    );
    let e = Engine::builder()
        .buffer_size(0)
        .build()
        .err()
        .expect("error");
    assert!(e.to_string().contains("buffer size"), "{e}");
}

#[test]
fn per_core_state_stays_on_its_core() {
    #[derive(Default)]
    struct Hits(std::cell::Cell<u32>);
    let engine = engine(2);
    for _ in 0..3 {
        for core in 0..2 {
            engine
                .block_on(core, || async {
                    let s = local_state::<Hits>().expect("on a worker");
                    s.0.set(s.0.get() + 1);
                })
                .expect("task");
        }
    }
    let counts: Vec<u32> = (0..2)
        .map(|core| {
            engine
                .block_on(core, || async {
                    local_state::<Hits>().expect("on a worker").0.get()
                })
                .expect("task")
        })
        .collect();
    assert_eq!(counts, vec![3, 3]);
}

#[test]
fn work_after_shutdown_is_refused() {
    let engine = engine(1);
    let handle = engine.handle();
    engine.shutdown(Duration::ZERO).expect("shutdown");
    let r = handle.spawn_on(0, || async {});
    assert_eq!(r.err(), Some(TaskError::EngineStopped));
    let r = handle.spawn_on(5, || async {});
    assert!(r.is_err());
}

#[test]
fn dropping_the_engine_stops_its_workers() {
    let engine = engine(2);
    let h = engine
        .spawn_on(0, || async {
            sleep(Duration::from_secs(60)).await.expect("sleep");
        })
        .expect("spawn");
    let start = Instant::now();
    drop(engine);
    assert!(start.elapsed() < Duration::from_secs(5));
    assert_eq!(wait(h).err(), Some(TaskError::Cancelled));
}

#[test]
fn send_zc_learns_that_loopback_copies_and_delivers_every_byte() {
    use dwcp_engine::ZeroCopy;
    let engine = engine(1);
    let zc = engine.features().send_zc;
    let (l, addr) = listener();
    const SENDS: usize = 40;
    const LEN: usize = 48 * 1024;
    let reader = std::thread::spawn(move || {
        let (mut s, _) = l.accept().expect("accept");
        let mut got = Vec::new();
        io::Read::read_to_end(&mut s, &mut got).expect("read");
        got
    });
    let h = engine.spawn_on(0, move || async move {
        let s = LocalTcpStream::connect(addr).await?;
        let before = s.zero_copy();
        for i in 0..SENDS {
            let (r, _) = s.send_zc(pattern(LEN, i as u64)).await;
            r?;
        }
        let after = s.zero_copy();
        s.shutdown(Shutdown::Write).await?;
        Ok::<_, io::Error>((before, after))
    });
    let (before, after) = wait(h.expect("spawn")).unwrap().unwrap();
    assert_eq!(before, ZeroCopy::Untried);
    // Loopback never sends from pinned pages: the kernel copies and says so
    // (6.2+), or rejects the report (older), or has no SEND_ZC at all.
    if zc {
        assert!(
            matches!(after, ZeroCopy::Copies | ZeroCopy::Unsupported),
            "{after:?}"
        );
    } else {
        assert_eq!(after, ZeroCopy::Unsupported);
    }
    let got = reader.join().unwrap();
    let want: Vec<u8> = (0..SENDS).flat_map(|i| pattern(LEN, i as u64)).collect();
    assert_eq!(got.len(), want.len());
    assert!(got == want, "stream corrupted");
}

#[test]
fn vectored_send_all_sends_every_piece_in_order_across_short_sends() {
    let engine = engine(1);
    let (l, addr) = listener();
    // A reader that drains slowly, so the sender's socket buffer fills and
    // sendmsg returns short counts that end mid-piece.
    let reader = std::thread::spawn(move || -> io::Result<Vec<u8>> {
        use std::io::Read;
        let (mut s, _) = l.accept()?;
        s.set_read_timeout(Some(LIMIT))?;
        let mut got = Vec::new();
        let mut buf = vec![0u8; 7 * 1024];
        loop {
            let n = s.read(&mut buf)?;
            if n == 0 {
                return Ok(got);
            }
            got.extend_from_slice(&buf[..n]);
            if got.len() < (2 << 20) {
                std::thread::sleep(Duration::from_micros(200));
            }
        }
    });
    // Pieces of odd sizes, one empty, some large.
    let sizes = [40usize, 3 << 20, 0, 1, 4096 + 17, 5 << 20, 32];
    let pieces: Vec<Vec<u8>> = sizes
        .iter()
        .enumerate()
        .map(|(i, &n)| pattern(n, i as u64 + 1))
        .collect();
    let want = pieces.concat();
    let h = engine
        .spawn_on(0, move || async move {
            let c = LocalTcpStream::connect(addr).await?;
            let (r, back) = c.send_all_vectored(pieces).await;
            r?;
            c.shutdown(Shutdown::Write).await?;
            Ok::<_, io::Error>(back.iter().map(Vec::len).collect::<Vec<_>>())
        })
        .expect("spawn sender");
    let back = wait(h).expect("sender task").expect("sender io");
    assert_eq!(back, sizes, "the buffers come back as they went");
    let got = reader.join().expect("reader thread").expect("reader io");
    assert_eq!(got.len(), want.len());
    assert!(got == want, "bytes differ");
    engine.shutdown(Duration::from_secs(1)).expect("shutdown");
}
