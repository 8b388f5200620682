//! The `dwcp` binary as users run it: `keygen`, `serve` and `send` as
//! separate processes on loopback, and `bench transport` across two network
//! namespaces (root only; skipped with the reason otherwise). Every child is
//! killed when a test ends, pass or fail, and every wait is bounded.

use std::fs;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const DWCP: &str = env!("CARGO_BIN_EXE_dwcp");

/// A scratch directory removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let p = std::env::temp_dir().join(format!("dwcp-cli-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&p);
        fs::create_dir_all(&p).unwrap();
        Scratch(p)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A child killed on drop.
struct Kill(Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs `dwcp args` to completion within `limit`; returns status success,
/// stdout and stderr.
fn dwcp(args: &[&str], limit: Duration) -> (bool, String, String) {
    let (ok, out, err, _) = dwcp_pid(args, limit);
    (ok, out, err)
}

/// [`dwcp`], with the child's pid.
fn dwcp_pid(args: &[&str], limit: Duration) -> (bool, String, String, u32) {
    let mut child = Kill(
        Command::new(DWCP)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + limit;
    loop {
        if child.0.try_wait().unwrap().is_some() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "dwcp {args:?} ran past {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut out = String::new();
    let mut err = String::new();
    use std::io::Read;
    child
        .0
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    child
        .0
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    let ok = child.0.wait().unwrap().success();
    (ok, out, err, child.0.id())
}

/// Starts `dwcp serve` into `dir` on a free loopback port; returns it and
/// its address.
fn serve(dir: &Path, key: &Path) -> (Kill, String) {
    let mut child = Command::new(DWCP)
        .args(["serve", "--listen", "127.0.0.1:0", "--dir"])
        .arg(dir)
        .arg("--key")
        .arg(key)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let rx = stderr_lines(&mut child);
    let child = Kill(child);
    let line = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("serve says where it listens");
    let addr = line
        .split("listening on ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_owned();
    (child, addr)
}

#[test]
fn serve_and_send_move_a_tree_between_two_processes() {
    let s = Scratch::new("tree");
    let key = s.0.join("key");
    let (ok, _, err) = dwcp(&["keygen", key.to_str().unwrap()], Duration::from_secs(10));
    assert!(ok, "{err}");
    assert_eq!(fs::metadata(&key).unwrap().mode() & 0o777, 0o600);
    let src = s.0.join("src/tree");
    fs::create_dir_all(src.join("sub/deeper")).unwrap();
    let big: Vec<u8> = (0..3_500_000u32)
        .map(|i| i.wrapping_mul(2_654_435_761).to_le_bytes()[3])
        .collect();
    fs::write(src.join("big.bin"), &big).unwrap();
    fs::write(src.join("sub/text.txt"), "hello\n".repeat(10_000)).unwrap();
    fs::write(src.join("sub/deeper/empty"), b"").unwrap();
    fs::set_permissions(src.join("sub/text.txt"), fs::Permissions::from_mode(0o640)).unwrap();
    let dst = s.0.join("dst");
    fs::create_dir_all(&dst).unwrap();
    let (_server, addr) = serve(&dst, &key);
    let (ok, out, err) = dwcp(
        &[
            "send",
            src.to_str().unwrap(),
            "--to",
            &addr,
            "--key",
            key.to_str().unwrap(),
            "--streams",
            "3",
            "--json",
        ],
        Duration::from_secs(60),
    );
    assert!(ok, "send failed: {err}");
    let report: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(report["files"], 3, "{report}");
    for rel in ["big.bin", "sub/text.txt", "sub/deeper/empty"] {
        let a = src.join(rel);
        let b = dst.join("tree").join(rel);
        assert_eq!(fs::read(&a).unwrap(), fs::read(&b).unwrap(), "{rel}");
        let (ma, mb) = (fs::metadata(&a).unwrap(), fs::metadata(&b).unwrap());
        assert_eq!(ma.mode() & 0o777, mb.mode() & 0o777, "{rel} mode");
        assert_eq!(ma.mtime(), mb.mtime(), "{rel} mtime");
    }
    // No temporary files are left behind.
    let leftovers: Vec<_> = walk(&dst)
        .into_iter()
        .filter(|p| p.to_string_lossy().contains(".dwcp-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn send_dash_streams_standard_input_into_a_named_file() {
    let s = Scratch::new("stdin");
    let key = s.0.join("key");
    assert!(dwcp(&["keygen", key.to_str().unwrap()], Duration::from_secs(10)).0);
    let data: Vec<u8> = (0..5_000_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8 | (i % 3 == 0) as u8)
        .collect();
    fs::write(s.0.join("input"), &data).unwrap();
    let dst = s.0.join("dst");
    fs::create_dir_all(&dst).unwrap();
    let (_server, addr) = serve(&dst, &key);
    let mut child = Kill(
        Command::new(DWCP)
            .args([
                "send",
                "-",
                "--name",
                "logs/piped.bin",
                "--to",
                &addr,
                "--key",
            ])
            .arg(&key)
            .args(["--streams", "3", "--json"])
            .stdin(fs::File::open(s.0.join("input")).unwrap())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let (ok, out, err) = finish_within(&mut child, Duration::from_secs(60), "send -");
    assert!(ok, "send - failed: {err}");
    let report: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(report["bytes"], data.len() as u64, "{report}");
    assert_eq!(fs::read(dst.join("logs/piped.bin")).unwrap(), data);
    // A name that would leave the directory is refused before sending.
    let (ok, _, err) = dwcp(
        &[
            "send",
            "-",
            "--name",
            "../out",
            "--to",
            &addr,
            "--key",
            key.to_str().unwrap(),
        ],
        Duration::from_secs(30),
    );
    assert!(!ok && err.contains("--name"), "{err}");
}

#[test]
fn migrate_moves_a_running_guest_between_two_processes() {
    if !Path::new("/dev/kvm").exists() {
        eprintln!("migrate_moves_a_running_guest_between_two_processes: skipped: no /dev/kvm");
        return;
    }
    let s = Scratch::new("migrate");
    let key = s.0.join("key");
    assert!(dwcp(&["keygen", key.to_str().unwrap()], Duration::from_secs(10)).0);
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let addr = format!("127.0.0.1:{port}");
    let (mut dst, rx) = spawn_with_stderr_lines(&[
        "migrate",
        "--incoming",
        &addr,
        "--ram",
        "64MiB",
        "--json",
        "--run-after",
        "500ms",
        "--key",
        key.to_str().unwrap(),
    ]);
    // The destination is listening once it says so.
    let line = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("the destination starts");
    assert!(line.contains("listening"), "{line}");
    let (ok, out, err) = dwcp(
        &[
            "migrate",
            "--to",
            &addr,
            "--ram",
            "64MiB",
            "--dirty",
            "30",
            "--json",
            "--key",
            key.to_str().unwrap(),
        ],
        Duration::from_secs(60),
    );
    assert!(ok, "source failed: {err}");
    let src: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(src["result"], "ok", "{src}");
    assert_eq!(src["converged"], true, "{src}");
    let (ok, out, _) = finish_within(&mut dst, Duration::from_secs(30), "the destination");
    assert!(ok, "destination failed: {out}");
    // The last line is the result (a first one says where it listens).
    let d: serde_json::Value = serde_json::from_str(out.trim().lines().last().unwrap()).unwrap();
    assert_eq!(
        src["memory_digest"], d["memory_digest"],
        "memory at the pause differs: {src} vs {d}"
    );
    let at_pause = src["counter_at_pause"].as_u64().unwrap();
    assert!(
        d["counter_at_start"].as_u64().unwrap() >= at_pause,
        "{d} vs {src}"
    );
    assert!(
        d["counter_after"].as_u64().unwrap() > d["counter_at_start"].as_u64().unwrap(),
        "{d}"
    );
}

#[test]
fn demo_migrates_a_guest_and_checks_its_memory() {
    let mut runs = vec![vec!["demo", "--synthetic", "--ram", "64MiB", "--json"]];
    if Path::new("/dev/kvm").exists() {
        runs.push(vec!["demo", "--ram", "64MiB", "--json"]);
    } else {
        eprintln!("demo with KVM: skipped: no /dev/kvm");
    }
    for args in runs {
        let (ok, out, err) = dwcp(&args, Duration::from_secs(60));
        assert!(ok, "{args:?}: {err}");
        let r: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
        assert_eq!(r["verified"], true, "{r}");
        assert_eq!(r["converged"], true, "{r}");
        assert!(
            r["counter_after"].as_u64() > r["counter_at_pause"].as_u64(),
            "{r}"
        );
    }
}

#[test]
fn send_with_the_wrong_key_is_refused_and_writes_nothing() {
    let s = Scratch::new("wrongkey");
    let (k1, k2) = (s.0.join("k1"), s.0.join("k2"));
    for k in [&k1, &k2] {
        assert!(dwcp(&["keygen", k.to_str().unwrap()], Duration::from_secs(10)).0);
    }
    fs::write(s.0.join("f"), b"secret").unwrap();
    let dst = s.0.join("dst");
    fs::create_dir_all(&dst).unwrap();
    let (_server, addr) = serve(&dst, &k1);
    let (ok, _, err) = dwcp(
        &[
            "send",
            s.0.join("f").to_str().unwrap(),
            "--to",
            &addr,
            "--key",
            k2.to_str().unwrap(),
        ],
        Duration::from_secs(30),
    );
    assert!(!ok);
    assert!(err.contains("key"), "{err}");
    assert!(walk(&dst).is_empty());
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// Whether this process may create network namespaces (root); prints why
/// not otherwise.
fn root() -> bool {
    let status = fs::read_to_string("/proc/self/status").unwrap_or_default();
    let euid_root = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|v| v.split_whitespace().nth(1))
        == Some("0");
    if !euid_root {
        println!("skipping: needs root to create network namespaces");
    }
    euid_root
}

#[test]
fn bench_transport_moves_data_between_namespaces_and_survives_a_cut_stream() {
    if !root() {
        return;
    }
    let (ok, out, err, pid) = dwcp_pid(
        &[
            "bench",
            "transport",
            "--size",
            "48MiB",
            "--rate",
            "1gbit",
            "--streams",
            "2",
            "--mode",
            "none,datacenter",
            "--repeat",
            "1",
            "--kill-stream",
            "--no-iperf3",
            "--json",
        ],
        Duration::from_secs(120),
    );
    assert!(ok, "bench failed: {err}");
    let rows: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 2, "{out}");
    for (r, mode) in rows.iter().zip(["none", "datacenter"]) {
        assert_eq!(r["name"], "dwcp");
        assert_eq!(r["mode"], mode);
        assert_eq!(r["rate"], 1_000_000_000u64);
        assert_eq!(r["data"], "random");
        assert_eq!(r["bytes"], 48u64 << 20);
        let goodput = r["goodput_gbps"].as_f64().unwrap();
        // Bounds that only a broken measurement breaks: above zero, and
        // not above the tbf rate (random data does not compress).
        assert!(goodput > 0.0 && goodput < 1.0, "{r}");
        assert!(r["cpu_s"].as_f64().unwrap() > 0.0, "{r}");
        assert!(r["stream_failures"].as_u64().unwrap() >= 1, "{r}");
        let window = r["window"].as_u64().unwrap();
        assert!(
            r["retransmitted_bytes"].as_u64().unwrap() < 2 * window,
            "{r}"
        );
    }
    let ns = Command::new("ip").args(["netns", "list"]).output().unwrap();
    let me = format!("dwcp-{pid}-");
    assert!(
        !String::from_utf8_lossy(&ns.stdout).contains(&me),
        "namespaces left behind"
    );
}

/// Starts `dwcp args` with piped output; returns it and a channel of its
/// stderr lines.
fn spawn_with_stderr_lines(args: &[&str]) -> (Kill, mpsc::Receiver<String>) {
    let mut child = Command::new(DWCP)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let rx = stderr_lines(&mut child);
    (Kill(child), rx)
}

/// The lines `child` writes to its (piped) stderr, as they come.
fn stderr_lines(child: &mut Child) -> mpsc::Receiver<String> {
    let err = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(err).lines() {
            let Ok(line) = line else { break };
            let _ = tx.send(line);
        }
    });
    rx
}

/// Waits up to `limit` for `child` to exit; returns success, stdout and
/// stderr (empty when it is read elsewhere).
fn finish_within(child: &mut Kill, limit: Duration, what: &str) -> (bool, String, String) {
    let deadline = Instant::now() + limit;
    while child.0.try_wait().unwrap().is_none() {
        assert!(
            Instant::now() < deadline,
            "{what} did not exit within {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut out = String::new();
    use std::io::Read;
    child
        .0
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    let mut err = String::new();
    if let Some(mut e) = child.0.stderr.take() {
        e.read_to_string(&mut err).unwrap();
    }
    (child.0.wait().unwrap().success(), out, err)
}

#[test]
fn ctrl_c_on_the_source_cancels_a_migration_and_the_guest_runs_on() {
    if !Path::new("/dev/kvm").exists() {
        eprintln!("ctrl_c_on_the_source_cancels_a_migration: skipped: no /dev/kvm");
        return;
    }
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let addr = format!("127.0.0.1:{port}");
    let common = ["--ram", "128MiB", "--json", "--insecure-no-auth"];
    let mut incoming = vec!["migrate", "--incoming", &addr];
    incoming.extend(common);
    let (mut dst, dst_err) = spawn_with_stderr_lines(&incoming);
    let line = dst_err
        .recv_timeout(Duration::from_secs(20))
        .expect("the destination starts");
    assert!(line.contains("listening"), "{line}");
    // 128 MiB at 100 Mbit/s: round 0 takes seconds.
    let mut to = vec!["migrate", "--to", &addr, "--rate-limit", "100mbit"];
    to.extend(common);
    let (mut src, src_err) = spawn_with_stderr_lines(&to);
    let line = src_err
        .recv_timeout(Duration::from_secs(20))
        .expect("the source starts");
    assert!(line.contains("source guest"), "{line}");
    std::thread::sleep(Duration::from_millis(1000));
    let pid = src.0.id() as libc::pid_t;
    // SAFETY: kill(2) with the pid of a child this test owns (not yet
    // reaped, so the pid is still its own) and a valid signal number.
    let rc = unsafe { libc::kill(pid, libc::SIGINT) };
    assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
    let sent = Instant::now();
    let (ok, out, _) = finish_within(&mut src, Duration::from_secs(20), "the source");
    let took = sent.elapsed();
    let err: Vec<String> = src_err.try_iter().collect();
    assert!(!ok, "the source must fail: {out} {err:?}");
    let r: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(r["result"], "cancelled", "{r} {err:?}");
    assert_eq!(r["interrupted"], true, "{r}");
    assert_eq!(r["source_runs"], true, "{r}");
    assert!(
        r["error"]
            .as_str()
            .unwrap()
            .contains("cancelled by the caller"),
        "{r}"
    );
    assert!(
        err.iter().any(|l| l.contains("the source guest runs on")),
        "{err:?}"
    );
    eprintln!("the source exited {took:?} after SIGINT");
    // The destination discards it and says why.
    let (ok, out, _) = finish_within(&mut dst, Duration::from_secs(20), "the destination");
    assert!(!ok, "the destination must fail: {out}");
    let d: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    assert_eq!(d["result"], "discarded", "{d}");
    assert!(
        d["error"]
            .as_str()
            .unwrap()
            .contains("cancelled by the caller"),
        "{d}"
    );
}

#[test]
fn bench_migration_moves_a_guest_between_namespaces_and_verifies_it() {
    if !root() {
        return;
    }
    if !Path::new("/dev/kvm").exists() {
        eprintln!("bench migration: skipped: no /dev/kvm");
        return;
    }
    let (ok, out, err, pid) = dwcp_pid(
        &[
            "bench",
            "migration",
            "--ram",
            "64MiB",
            "--dirty",
            "10",
            "--rate",
            "1gbit",
            "--repeat",
            "1",
            "--no-warmup",
            "--json",
        ],
        Duration::from_secs(120),
    );
    assert!(ok, "bench migration failed: {err}");
    let r: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    for k in [
        "total_ms",
        "downtime_ms",
        "rounds",
        "guest_bytes",
        "wire_bytes",
        "converged",
        "throttled",
        "guest_dirty_mibps",
        "verified",
    ] {
        assert!(!r[k].is_null(), "no {k}: {r}");
    }
    assert_eq!(r["verified"], true, "{r}");
    assert_eq!(r["converged"], true, "{r}");
    assert_eq!(r["rate"], 1_000_000_000u64, "{r}");
    // Both processes worked: some CPU, and no more than two processes
    // could use over the run (loose: the count of CPUs is not known here).
    let cpu = r["cpu_s"].as_f64().unwrap_or(-1.0);
    assert!(cpu > 0.0 && cpu < 600.0, "cpu_s {cpu}: {r}");
    let ns = Command::new("ip").args(["netns", "list"]).output().unwrap();
    assert!(
        !String::from_utf8_lossy(&ns.stdout).contains(&format!("dwcp-{pid}-")),
        "namespaces left behind"
    );
}
