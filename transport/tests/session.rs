//! Sessions over loopback: transfers, authentication, and faults (a stream
//! cut mid-transfer, garbage, replay). Each test is bounded in time.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use dwcp_codec::Policy;
use dwcp_engine::Engine;
use dwcp_transport::{
    Key, MemorySink, Receiver, ReceiverConfig, Sender, SenderConfig, Source, StreamCount,
    TransportError,
};

/// Every region `sink` finished (verified) so far, in order, with its
/// metadata and bytes; taken out of the sink.
fn received(sink: &MemorySink) -> Vec<(Vec<u8>, Vec<u8>)> {
    std::iter::from_fn(|| sink.take(Duration::ZERO))
        .map(|r| (r.meta, r.bytes.unwrap_or_default()))
        .collect()
}

fn engine() -> Engine {
    Engine::builder()
        .workers(2)
        .build()
        .expect("io_uring works on the test machines")
}

fn data(len: usize, seed: u64) -> Arc<[u8]> {
    // Half text-like (compressible), half pseudo-random.
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|i| {
            if (i / 65536) % 2 == 0 {
                b"the quick brown fox jumps over the lazy dog "[i % 44]
            } else {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            }
        })
        .collect()
}

fn receiver(engine: &Engine, key: Option<Key>) -> (Receiver, MemorySink) {
    let sink = MemorySink::new(1 << 30);
    let cfg = ReceiverConfig {
        key,
        grace: Duration::from_secs(5),
        ..ReceiverConfig::default()
    };
    let r =
        Receiver::bind(engine, "127.0.0.1:0".parse().unwrap(), cfg, sink.handle()).expect("bind");
    (r, sink)
}

fn sender_cfg(key: Option<Key>, streams: u16) -> SenderConfig {
    SenderConfig {
        key,
        streams: StreamCount::Fixed(streams),
        policy: Policy::Datacenter,
        chunk: 256 << 10,
        stall_timeout: Duration::from_secs(3),
        resume_for: Duration::from_secs(5),
        connect_timeout: Duration::from_secs(3),
        ..SenderConfig::default()
    }
}

/// Runs `f` on a thread and fails the test if it takes longer than `limit`.
fn bounded<T: Send + 'static>(limit: Duration, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(limit) {
        Ok(t) => t,
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
            panic!("did not finish within {limit:?}")
        }
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => panic!("the test body panicked"),
    }
}

#[test]
fn regions_arrive_whole_over_many_streams() {
    // `none` sends chunks of in-memory sources from where they lie (the
    // frame in three pieces), the others assemble each frame.
    for policy in [Policy::Datacenter, Policy::Stored] {
        regions_arrive_whole_under(policy);
    }
}

fn regions_arrive_whole_under(policy: Policy) {
    bounded(Duration::from_secs(60), move || {
        let key = Key::generate().unwrap();
        let (rx_engine, tx_engine) = (engine(), engine());
        let (recv, sink) = receiver(&rx_engine, Some(key.clone()));
        let cfg = SenderConfig {
            policy,
            ..sender_cfg(Some(key), 4)
        };
        let s = Sender::connect(&tx_engine, recv.local_addr(), cfg).unwrap();
        let a = data(10 << 20, 1);
        let b = data(3 << 20 | 12345, 2);
        let empty: Arc<[u8]> = Arc::from(&[][..]);
        s.send_region(b"a".to_vec(), Arc::new(a.clone())).unwrap();
        s.send_region(b"b".to_vec(), Arc::new(b.clone())).unwrap();
        s.send_region(b"empty".to_vec(), Arc::new(empty)).unwrap();
        let m = s.close().unwrap();
        assert_eq!(m.bytes_acked, Source::len(&a) + Source::len(&b));
        if policy == Policy::Stored {
            assert!(m.wire_bytes > m.bytes_acked, "stored: {m:?}");
        } else {
            assert!(m.wire_bytes < m.bytes_acked, "text halves compress: {m:?}");
        }
        assert!(m.stream_connects >= 4, "{m:?}");
        assert_eq!(m.streams, 4, "streams live when the session closed: {m:?}");
        let done = received(&sink);
        assert_eq!(done.len(), 3);
        assert_eq!((&done[0].0[..], &done[0].1[..]), (&b"a"[..], &a[..]));
        assert_eq!((&done[1].0[..], &done[1].1[..]), (&b"b"[..], &b[..]));
        assert!(done[2].1.is_empty());
        recv.close().unwrap();
    });
}

#[test]
fn wrong_or_missing_key_is_refused_with_a_reason() {
    bounded(Duration::from_secs(30), || {
        let (rx_engine, tx_engine) = (engine(), engine());
        let (recv, sink) = receiver(&rx_engine, Some(Key::generate().unwrap()));
        // The receiver tells its owner (it never prints).
        let failures = Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = failures.clone();
        recv.on_event(move |e| {
            if let dwcp_transport::Event::ConnectionFailed { reason, .. } = e {
                seen.lock().unwrap().push(reason.clone());
            }
        });
        let addr = recv.local_addr();
        let e = Sender::connect(
            &tx_engine,
            addr,
            sender_cfg(Some(Key::generate().unwrap()), 2),
        )
        .err()
        .expect("a wrong key must fail");
        assert!(e.to_string().contains("wrong key"), "{e}");
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while failures.lock().unwrap().is_empty() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(
            failures.lock().unwrap().iter().any(|r| r.contains("key")),
            "no ConnectionFailed event: {:?}",
            failures.lock().unwrap()
        );
        let e = Sender::connect(&tx_engine, addr, sender_cfg(None, 2))
            .err()
            .expect("no key must fail");
        assert!(e.to_string().contains("requires a key"), "{e}");
        assert!(received(&sink).is_empty());
        // And the other way round: an insecure receiver refuses a keyed sender.
        let (open, _) = receiver(&rx_engine, None);
        let e = Sender::connect(
            &tx_engine,
            open.local_addr(),
            sender_cfg(Some(Key::generate().unwrap()), 2),
        )
        .err()
        .expect("mismatch must fail");
        assert!(e.to_string().contains("without authentication"), "{e}");
        // Both insecure: works.
        let s = Sender::connect(&tx_engine, open.local_addr(), sender_cfg(None, 1)).unwrap();
        s.send_region(b"x".to_vec(), Arc::new(data(100_000, 3)))
            .unwrap();
        s.close().unwrap();
    });
}

/// A TCP proxy that forwards every connection, and cuts connection number
/// `cut` (0-based, in accept order) after it has forwarded `after` bytes
/// towards the receiver. Records every byte it forwarded of connection
/// `record` so a test can replay it.
struct Proxy {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    cut_done: Arc<AtomicBool>,
}

impl Proxy {
    fn start(upstream: SocketAddr, cut: usize, after: u64) -> Proxy {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.set_nonblocking(true).unwrap();
        let addr = l.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let cut_done = Arc::new(AtomicBool::new(false));
        let (st, cd) = (stop.clone(), cut_done.clone());
        thread::spawn(move || {
            let mut n = 0;
            while !st.load(Ordering::Relaxed) {
                let Ok((down, _)) = l.accept() else {
                    thread::sleep(Duration::from_millis(2));
                    continue;
                };
                down.set_nonblocking(false).unwrap();
                let up = TcpStream::connect(upstream).unwrap();
                let limit = (n == cut).then_some(after);
                n += 1;
                let (d2, u2) = (down.try_clone().unwrap(), up.try_clone().unwrap());
                let cd = cd.clone();
                thread::spawn(move || pump(down, up, limit, cd));
                thread::spawn(move || pump(u2, d2, None, Arc::new(AtomicBool::new(false))));
            }
        });
        Proxy {
            addr,
            stop,
            cut_done,
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn pump(mut from: TcpStream, mut to: TcpStream, limit: Option<u64>, cut: Arc<AtomicBool>) {
    let mut buf = vec![0u8; 64 << 10];
    let mut moved = 0u64;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if let Some(l) = limit
            && moved + n as u64 > l
        {
            let _ = to.write_all(&buf[..(l - moved) as usize]);
            cut.store(true, Ordering::Relaxed);
            let _ = from.shutdown(Shutdown::Both);
            let _ = to.shutdown(Shutdown::Both);
            return;
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
        moved += n as u64;
    }
    let _ = to.shutdown(Shutdown::Write);
}

#[test]
fn a_stream_cut_mid_transfer_is_survived_and_retransmission_is_bounded() {
    bounded(Duration::from_secs(60), || {
        let key = Key::generate().unwrap();
        let (rx_engine, tx_engine) = (engine(), engine());
        let (recv, sink) = receiver(&rx_engine, Some(key.clone()));
        // Connection 0 is the control stream; cut connection 2 (the second
        // data stream) after 3 MiB.
        let proxy = Proxy::start(recv.local_addr(), 2, 3 << 20);
        let s = Sender::connect(&tx_engine, proxy.addr, sender_cfg(Some(key), 4)).unwrap();
        let a = data(64 << 20, 7);
        s.send_region(b"big".to_vec(), Arc::new(a.clone())).unwrap();
        let m = s.close().unwrap();
        assert!(
            proxy.cut_done.load(Ordering::Relaxed),
            "the proxy cut a stream"
        );
        assert!(m.stream_failures >= 1, "{m:?}");
        assert!(m.stream_connects >= 5, "the stream was re-opened: {m:?}");
        // At most that stream's window went out again (4 MiB default).
        assert!(m.retransmitted_bytes <= 2 * (4 << 20), "{m:?}");
        let done = received(&sink);
        assert_eq!(done.len(), 1);
        assert!(done[0].1[..] == a[..], "placed bytes differ");
        recv.close().unwrap();
    });
}

#[test]
fn garbage_truncated_and_oversized_input_is_refused_and_the_receiver_goes_on() {
    bounded(Duration::from_secs(30), || {
        let key = Key::generate().unwrap();
        let (rx_engine, tx_engine) = (engine(), engine());
        let (recv, sink) = receiver(&rx_engine, Some(key.clone()));
        let addr = recv.local_addr();
        let attempts: Vec<Vec<u8>> = vec![
            b"GET / HTTP/1.1\r\n\r\n".to_vec(),
            // Right magic, absurd length.
            [&b"AMST"[..], &[1, 0, 0, 0], &u32::MAX.to_le_bytes()].concat(),
            // A DATA message before any handshake.
            [
                &b"AMST"[..],
                &[16, 0, 0, 0],
                &100u32.to_le_bytes(),
                &[0; 100],
            ]
            .concat(),
            // A truncated HELLO.
            [&b"AMST"[..], &[1, 0, 0, 0], &68u32.to_le_bytes(), &[1; 10]].concat(),
            // A JOIN to a session that does not exist.
            [&b"AMST"[..], &[6, 0, 0, 0], &84u32.to_le_bytes(), &[7; 84]].concat(),
        ];
        for junk in attempts {
            let mut c = TcpStream::connect(addr).unwrap();
            c.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
            let _ = c.write_all(&junk);
            let _ = c.shutdown(Shutdown::Write);
            // The receiver answers (REFUSE) or closes; it never hangs.
            let mut sink_buf = Vec::new();
            let _ = c.read_to_end(&mut sink_buf);
        }
        // Flood without reading: the receiver's memory stays bounded (it
        // reads at most one message body at a time) and it goes on.
        let flood = thread::spawn(move || {
            let mut c = TcpStream::connect(addr).unwrap();
            let junk = vec![0x41u8; 1 << 20];
            let t = Instant::now();
            while t.elapsed() < Duration::from_secs(1) {
                if c.write_all(&junk).is_err() {
                    break;
                }
            }
        });
        let s = Sender::connect(&tx_engine, addr, sender_cfg(Some(key), 2)).unwrap();
        let a = data(2 << 20, 9);
        s.send_region(b"ok".to_vec(), Arc::new(a.clone())).unwrap();
        s.close().unwrap();
        flood.join().unwrap();
        assert_eq!(received(&sink)[0].1[..], a[..]);
        recv.close().unwrap();
    });
}

#[test]
fn a_recorded_session_replayed_later_fails() {
    bounded(Duration::from_secs(30), || {
        let key = Key::generate().unwrap();
        let (rx_engine, tx_engine) = (engine(), engine());
        let (recv, sink) = receiver(&rx_engine, Some(key.clone()));
        // Record the control connection (connection 0) of a real session.
        let recorded = Arc::new(Mutex::new(Vec::new()));
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let proxy_addr = l.local_addr().unwrap();
        let upstream = recv.local_addr();
        let rec = recorded.clone();
        let stop = Arc::new(AtomicU64::new(0));
        thread::spawn(move || {
            for (i, down) in l.incoming().enumerate() {
                let Ok(down) = down else { break };
                let up = TcpStream::connect(upstream).unwrap();
                let (mut d2, mut u2) = (down.try_clone().unwrap(), up.try_clone().unwrap());
                let rec = rec.clone();
                thread::spawn(move || {
                    let mut from = down;
                    let mut to = up;
                    let mut buf = vec![0u8; 65536];
                    while let Ok(n) = from.read(&mut buf) {
                        if n == 0 || to.write_all(&buf[..n]).is_err() {
                            break;
                        }
                        if i == 0 {
                            rec.lock().unwrap().extend_from_slice(&buf[..n]);
                        }
                    }
                    let _ = to.shutdown(Shutdown::Write);
                });
                thread::spawn(move || {
                    let _ = std::io::copy(&mut u2, &mut d2);
                    let _ = d2.shutdown(Shutdown::Write);
                });
            }
        });
        let s = Sender::connect(&tx_engine, proxy_addr, sender_cfg(Some(key), 1)).unwrap();
        s.send_region(b"first".to_vec(), Arc::new(data(300_000, 4)))
            .unwrap();
        s.close().unwrap();
        stop.store(1, Ordering::Relaxed);
        let bytes = recorded.lock().unwrap().clone();
        assert!(bytes.len() > 100);
        // Replay the whole recorded control stream to the receiver.
        let mut c = TcpStream::connect(upstream).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let _ = c.write_all(&bytes);
        let mut back = Vec::new();
        let _ = c.read_to_end(&mut back);
        // The receiver's fresh nonce makes the recorded proof wrong: it
        // refuses, and no region is opened by the replay.
        let text = String::from_utf8_lossy(&back);
        assert!(text.contains("wrong key"), "{text:?}");
        assert_eq!(received(&sink).len(), 1);
        recv.close().unwrap();
    });
}

#[test]
fn a_source_error_fails_the_region_with_a_clear_error() {
    struct Failing;
    impl Source for Failing {
        fn len(&self) -> u64 {
            1 << 20
        }
        fn read_at(&self, _: u64, _: &mut [u8]) -> std::io::Result<()> {
            Err(std::io::Error::other("disk on fire"))
        }
    }
    bounded(Duration::from_secs(30), || {
        let (rx_engine, tx_engine) = (engine(), engine());
        let (recv, sink) = receiver(&rx_engine, None);
        // Whoever reads first (the caller for the digest, or a core for a
        // chunk) fails, and says why.
        let s = Sender::connect(&tx_engine, recv.local_addr(), sender_cfg(None, 1)).unwrap();
        let e: TransportError = s.send_region(b"f".to_vec(), Arc::new(Failing)).unwrap_err();
        assert!(e.to_string().contains("disk on fire"), "{e}");
        s.cancel();
        // Chunks read on the engine's cores fail the session, not retried.
        let s = Sender::connect(&tx_engine, recv.local_addr(), sender_cfg(None, 1)).unwrap();
        let id = s.open_region(b"g".to_vec(), Arc::new(Failing)).unwrap();
        let _ = s.close_region(id, [0; 32]);
        let e = s.wait_region(id).unwrap_err();
        assert!(e.to_string().contains("disk on fire"), "{e}");
        s.cancel();
        assert!(received(&sink).is_empty());
    });
}

/// A proxy that, once `after` bytes in all have gone towards the receiver,
/// cuts every connection it carries at once (a full disconnect: control
/// and data streams), and passes later connections untouched.
struct CutAll {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    cut: Arc<AtomicBool>,
}

impl CutAll {
    fn start(upstream: SocketAddr, after: u64) -> CutAll {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.set_nonblocking(true).unwrap();
        let addr = l.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let cut = Arc::new(AtomicBool::new(false));
        let (st, ct) = (stop.clone(), cut.clone());
        let total = Arc::new(AtomicU64::new(0));
        let live: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        thread::spawn(move || {
            while !st.load(Ordering::Relaxed) {
                let Ok((down, _)) = l.accept() else {
                    thread::sleep(Duration::from_millis(2));
                    continue;
                };
                down.set_nonblocking(false).unwrap();
                let up = TcpStream::connect(upstream).unwrap();
                if !ct.load(Ordering::Relaxed) {
                    let mut v = live.lock().unwrap();
                    v.push(down.try_clone().unwrap());
                    v.push(up.try_clone().unwrap());
                }
                let (d2, u2) = (down.try_clone().unwrap(), up.try_clone().unwrap());
                let (total, live, ct) = (total.clone(), live.clone(), ct.clone());
                thread::spawn(move || {
                    let mut buf = vec![0u8; 64 << 10];
                    let (mut from, mut to) = (down, up);
                    loop {
                        let n = match from.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        if to.write_all(&buf[..n]).is_err() {
                            break;
                        }
                        let t = total.fetch_add(n as u64, Ordering::Relaxed) + n as u64;
                        if t > after && !ct.swap(true, Ordering::Relaxed) {
                            for s in live.lock().unwrap().drain(..) {
                                let _ = s.shutdown(Shutdown::Both);
                            }
                        }
                    }
                    let _ = to.shutdown(Shutdown::Write);
                });
                thread::spawn(move || {
                    let (mut from, mut to) = (u2, d2);
                    let _ = std::io::copy(&mut from, &mut to);
                    let _ = to.shutdown(Shutdown::Write);
                });
            }
        });
        CutAll { addr, stop, cut }
    }
}

impl Drop for CutAll {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

#[test]
fn a_full_disconnect_resumes_without_resending_what_was_acknowledged() {
    bounded(Duration::from_secs(90), || {
        let key = Key::generate().unwrap();
        let (rx_engine, tx_engine) = (engine(), engine());
        let (recv, sink) = receiver(&rx_engine, Some(key.clone()));
        let proxy = CutAll::start(recv.local_addr(), 24 << 20);
        let s = Sender::connect(&tx_engine, proxy.addr, sender_cfg(Some(key), 4)).unwrap();
        let window = s.window();
        let a = data(64 << 20, 11);
        let b = data(5 << 20, 12);
        s.send_region(b"a".to_vec(), Arc::new(a.clone())).unwrap();
        s.send_region(b"b".to_vec(), Arc::new(b.clone())).unwrap();
        let m = s.close().unwrap();
        assert!(
            proxy.cut.load(Ordering::Relaxed),
            "the proxy cut everything"
        );
        assert!(m.resumes >= 1, "the control stream resumed: {m:?}");
        assert!(m.stream_failures >= 4, "every data stream failed: {m:?}");
        // Only what was in flight goes again: at most every stream's window.
        assert!(m.retransmitted_bytes <= 4 * window, "{m:?}");
        assert!(recv.metrics().resumes >= 1);
        let done = received(&sink);
        assert_eq!(done.len(), 2, "each region finished once");
        assert!(done[0].1[..] == a[..] && done[1].1[..] == b[..]);
        recv.close().unwrap();
    });
}

#[test]
fn a_restarted_receiver_fails_the_session_with_a_reason_and_holds_nothing() {
    bounded(Duration::from_secs(60), || {
        let key = Key::generate().unwrap();
        let (rx_engine, tx_engine) = (engine(), engine());
        let (recv, sink) = receiver(&rx_engine, Some(key.clone()));
        let addr = recv.local_addr();
        let s = Sender::connect(&tx_engine, addr, sender_cfg(Some(key.clone()), 2)).unwrap();
        let a = data(256 << 20, 3);
        let id = s.open_region(b"a".to_vec(), Arc::new(a)).unwrap();
        while s.metrics().bytes_acked < 4 << 20 {
            thread::sleep(Duration::from_millis(5));
        }
        // The receiver goes away with its session state; a new one starts
        // on the same address.
        recv.close().unwrap();
        drop(rx_engine);
        let rx2 = engine();
        let cfg = ReceiverConfig {
            key: Some(key),
            ..ReceiverConfig::default()
        };
        let sink2 = MemorySink::new(1 << 30);
        let recv2 = Receiver::bind(&rx2, addr, cfg, sink2.handle()).unwrap();
        let e = s.wait_region(id).unwrap_err();
        let text = e.to_string();
        assert!(text.contains("session"), "{text}");
        assert!(received(&sink).is_empty());
        assert_eq!(sink.failed(), 1, "the region was discarded");
        assert!(received(&sink2).is_empty());
        drop(s);
        recv2.close().unwrap();
    });
}

/// A reader that hands out `data` in short, uneven reads, as a pipe does.
struct Trickle {
    data: Arc<[u8]>,
    at: usize,
    step: usize,
}

impl Read for Trickle {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.step = self.step * 7 % 65521 + 1;
        let n = buf.len().min(self.step).min(self.data[..].len() - self.at);
        buf[..n].copy_from_slice(&self.data[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

#[test]
fn a_byte_stream_arrives_in_order_with_progress_events() {
    bounded(Duration::from_secs(60), || {
        let key = Key::generate().unwrap();
        let (rx_engine, tx_engine) = (engine(), engine());
        let sink = MemorySink::new(1 << 30);
        // A reorder window of 1 MiB: four chunks of 256 KiB, shared by
        // four streams; the sender must keep within it.
        let cfg = ReceiverConfig {
            key: Some(key.clone()),
            reorder_bytes: 1 << 20,
            ..ReceiverConfig::default()
        };
        let recv = Receiver::bind(
            &rx_engine,
            "127.0.0.1:0".parse().unwrap(),
            cfg,
            sink.handle(),
        )
        .unwrap();
        let placed = Arc::new(Mutex::new(Vec::new()));
        let p = placed.clone();
        recv.on_event(move |e| p.lock().unwrap().push(e.clone()));
        let s = Sender::connect(&tx_engine, recv.local_addr(), sender_cfg(Some(key), 4)).unwrap();
        let events = Arc::new(Mutex::new(Vec::new()));
        let ev = events.clone();
        s.on_event(move |e| ev.lock().unwrap().push(e.clone()));
        let want = data((9 << 20) + 777, 5);
        let mut reader = Trickle {
            data: want.clone(),
            at: 0,
            step: 1,
        };
        let n = s.send_stream(b"pipe".to_vec(), &mut reader).unwrap();
        assert_eq!(n, want[..].len() as u64);
        // An empty stream is a region of no bytes.
        assert_eq!(
            s.send_stream(b"none".to_vec(), &mut std::io::empty())
                .unwrap(),
            0
        );
        s.close().unwrap();
        let done = received(&sink);
        assert_eq!(done.len(), 2);
        assert_eq!(&done[0].0[..], b"pipe");
        assert!(
            done[0].1 == want[..],
            "the stream arrived intact and in order"
        );
        assert!(done[1].1.is_empty());
        let events = events.lock().unwrap();
        let mut last = 0;
        for e in events.iter() {
            if let dwcp_transport::Event::Progress {
                region: 0, done, ..
            } = e
            {
                assert!(*done > last, "progress only grows");
                last = *done;
            }
        }
        assert_eq!(last, want[..].len() as u64);
        assert!(events.iter().any(|e| matches!(
            e,
            dwcp_transport::Event::RegionDone {
                region: 0,
                error: None,
                ..
            }
        )));
        let placed = placed.lock().unwrap();
        assert!(placed.iter().any(|e| matches!(
            e,
            dwcp_transport::Event::RegionDone {
                region: 0,
                error: None,
                ..
            }
        )));
        assert!(placed.iter().any(|e| matches!(
            e,
            dwcp_transport::Event::Progress {
                region: 0,
                len: None,
                ..
            }
        )));
        recv.close().unwrap();
    });
}

#[test]
fn a_byte_stream_survives_a_cut_stream() {
    bounded(Duration::from_secs(60), || {
        let (rx_engine, tx_engine) = (engine(), engine());
        let key = Key::generate().unwrap();
        let (recv, sink) = receiver(&rx_engine, Some(key.clone()));
        let s = Arc::new(
            Sender::connect(&tx_engine, recv.local_addr(), sender_cfg(Some(key), 3)).unwrap(),
        );
        let failed = Arc::new(AtomicU64::new(0));
        let f = failed.clone();
        s.on_event(move |e| {
            if let dwcp_transport::Event::StreamFailed { stream: 1, .. } = e {
                f.fetch_add(1, Ordering::Relaxed);
            }
        });
        let want = data(24 << 20, 9);
        let killer = {
            let s = s.clone();
            thread::spawn(move || {
                while s.metrics().bytes_acked < 4 << 20 {
                    thread::sleep(Duration::from_millis(1));
                }
                assert!(s.reset_stream(1));
            })
        };
        let mut reader = &want[..];
        assert_eq!(
            s.send_stream(Vec::new(), &mut reader).unwrap(),
            want[..].len() as u64
        );
        killer.join().unwrap();
        let s = Arc::into_inner(s).unwrap();
        let m = s.close().unwrap();
        assert!(m.stream_failures >= 1, "{m:?}");
        assert!(failed.load(Ordering::Relaxed) >= 1, "the failure was told");
        let done = received(&sink);
        assert!(done[0].1 == want[..]);
        recv.close().unwrap();
    });
}

#[test]
fn a_receiver_without_a_reorder_window_refuses_byte_streams_clearly() {
    bounded(Duration::from_secs(30), || {
        let (rx_engine, tx_engine) = (engine(), engine());
        let sink = MemorySink::new(1 << 20);
        let cfg = ReceiverConfig {
            key: None,
            reorder_bytes: 0,
            ..ReceiverConfig::default()
        };
        let recv = Receiver::bind(
            &rx_engine,
            "127.0.0.1:0".parse().unwrap(),
            cfg,
            sink.handle(),
        )
        .unwrap();
        let s = Sender::connect(&tx_engine, recv.local_addr(), sender_cfg(None, 2)).unwrap();
        let e = s
            .send_stream(Vec::new(), &mut &b"abc"[..])
            .unwrap_err()
            .to_string();
        assert!(e.contains("no ordered regions"), "{e}");
        // The session goes on.
        s.send_region(Vec::new(), Arc::new(b"abc".to_vec()))
            .unwrap();
        s.close().unwrap();
        recv.close().unwrap();
    });
}
