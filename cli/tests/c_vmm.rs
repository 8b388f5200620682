//! The C VMM (`ffi/examples/kvm_vmm.c`), built with `cc` against libdwcp,
//! live-migrates its KVM guest between two processes: on loopback, and (as
//! root) over a tbf-limited veth pair between two network namespaces, next
//! to `dwcp migrate` (`dwcp bench migration --vmm`). The guest must keep
//! counting and both sides' memory must match. Skipped, with the reason,
//! without `/dev/kvm` or `cc`.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

const DWCP: &str = env!("CARGO_BIN_EXE_dwcp");

/// A child killed on drop.
struct Kill(Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A scratch directory removed on drop.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn skip_reason() -> Option<&'static str> {
    if !Path::new("/dev/kvm").exists() {
        return Some("no /dev/kvm");
    }
    if Command::new("cc").arg("--version").output().is_err() {
        return Some("no C compiler (cc)");
    }
    None
}

/// Builds libdwcp (into this test's target directory) and the C VMM
/// against its static library; returns the VMM's path.
fn build_vmm(dir: &Path) -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    // target/<profile>/deps/c_vmm-x -> target
    let exe = std::env::current_exe().unwrap();
    let target = exe.ancestors().nth(3).unwrap();
    let profile = exe.ancestors().nth(2).unwrap();
    let mut cargo = Command::new(env!("CARGO"));
    cargo
        .args(["build", "-p", "dwcp-ffi", "--lib", "--locked"])
        .current_dir(root)
        .env("CARGO_TARGET_DIR", target);
    if profile.file_name().is_some_and(|n| n == "release") {
        cargo.arg("--release");
    }
    let st = cargo.status().expect("running cargo");
    assert!(st.success(), "building libdwcp failed");
    let out = dir.join("kvm_vmm");
    let cc = Command::new("cc")
        .args(["-std=c11", "-Wall", "-Wextra", "-Werror", "-O2", "-pthread"])
        .arg(root.join("ffi/examples/kvm_vmm.c"))
        .arg("-I")
        .arg(root.join("ffi/include"))
        .arg(profile.join("libdwcp.a"))
        .args(["-lgcc_s", "-lutil", "-lrt", "-lpthread", "-lm", "-ldl"])
        .arg("-o")
        .arg(&out)
        .output()
        .expect("running cc");
    assert!(
        cc.status.success(),
        "cc failed:\n{}",
        String::from_utf8_lossy(&cc.stderr)
    );
    out
}

fn scratch(name: &str) -> Scratch {
    let p = std::env::temp_dir().join(format!("dwcp-cvmm-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&p);
    std::fs::create_dir_all(&p).unwrap();
    Scratch(p)
}

fn keygen(dir: &Path) -> PathBuf {
    let key = dir.join("key");
    let st = Command::new(DWCP).arg("keygen").arg(&key).output().unwrap();
    assert!(st.status.success(), "dwcp keygen failed");
    key
}

/// Lines of a child's stdout, as they come.
fn lines(child: &mut Child) -> mpsc::Receiver<String> {
    let out = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for l in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(l).is_err() {
                return;
            }
        }
    });
    rx
}

/// The last JSON line a child prints before it exits (within `limit`).
fn report(child: &mut Kill, rx: &mpsc::Receiver<String>, limit: Duration, what: &str) -> Value {
    let deadline = Instant::now() + limit;
    let mut last = None;
    loop {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(l) => last = Some(l),
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                panic!("{what} did not finish within {limit:?}")
            }
        }
    }
    let st = child.0.wait().unwrap();
    let last = last.unwrap_or_else(|| panic!("{what} printed nothing (exit {st})"));
    let v: Value = serde_json::from_str(&last).unwrap_or_else(|e| panic!("{what}: {e}: {last}"));
    assert!(st.success(), "{what} failed (exit {st}): {v}");
    v
}

#[test]
fn the_c_vmm_migrates_its_guest_between_two_processes_on_loopback() {
    if let Some(why) = skip_reason() {
        eprintln!("C VMM migration: skipped: {why}");
        return;
    }
    let dir = scratch("loop");
    let vmm = build_vmm(&dir.0);
    let key = keygen(&dir.0);
    let common = |c: &mut Command| {
        c.args(["--ram", "64MiB", "--json", "--key"])
            .arg(&key)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
    };
    let mut dst = Command::new(&vmm);
    dst.args(["--incoming", "127.0.0.1:0", "--run-after", "300ms"]);
    common(&mut dst);
    let mut dst = Kill(dst.spawn().unwrap());
    let dst_lines = lines(&mut dst.0);
    let listening: Value = serde_json::from_str(
        &dst_lines
            .recv_timeout(Duration::from_secs(30))
            .expect("the destination did not say where it listens"),
    )
    .unwrap();
    assert_eq!(listening["name"], "listening", "{listening}");
    let addr = listening["addr"].as_str().unwrap().to_string();

    let mut src = Command::new(&vmm);
    src.args(["--migrate-to", &addr, "--dirty", "30"]);
    common(&mut src);
    let mut src = Kill(src.spawn().unwrap());
    let src_lines = lines(&mut src.0);
    let s = report(&mut src, &src_lines, Duration::from_secs(120), "source");
    let d = report(&mut dst, &dst_lines, Duration::from_secs(60), "destination");

    assert_eq!(s["result"], "ok", "{s}");
    assert_eq!(d["result"], "ok", "{d}");
    assert_eq!(s["converged"], true, "{s}");
    let n = |v: &Value, k: &str| v[k].as_u64().unwrap_or_else(|| panic!("no {k}: {v}"));
    assert!(n(&s, "rounds") >= 1, "{s}");
    assert!(s["downtime_ms"].as_f64().unwrap() > 0.0, "{s}");
    // The guest counts on from where the source stopped.
    assert!(
        n(&s, "counter_at_pause") > 0,
        "the source guest never wrote: {s}"
    );
    assert!(
        n(&d, "counter_at_start") >= n(&s, "counter_at_pause"),
        "{s} {d}"
    );
    assert!(n(&d, "counter_after") > n(&d, "counter_at_start"), "{d}");
    // Both sides hold the same memory at the pause.
    assert!(
        s["memory_digest"].as_str().is_some_and(|h| h.len() == 64),
        "{s}"
    );
    assert_eq!(s["memory_digest"], d["memory_digest"], "memory differs");
}

#[test]
fn the_c_vmm_and_dwcp_migrate_move_the_guest_over_a_limited_link() {
    if let Some(why) = skip_reason() {
        eprintln!("C VMM over veth: skipped: {why}");
        return;
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("C VMM over veth: skipped: needs root to create network namespaces");
        return;
    }
    let dir = scratch("veth");
    let vmm = build_vmm(&dir.0);
    let out = Command::new(DWCP)
        .args(["bench", "migration", "--ram", "64MiB", "--dirty", "10"])
        .args(["--rate", "1gbit", "--repeat", "1", "--no-warmup", "--json"])
        .arg("--vmm")
        .arg(&vmm)
        .stderr(Stdio::inherit())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "bench migration --vmm failed: {text}");
    let v: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert_eq!(v.len(), 3, "{text}");
    for (r, vmm) in [(&v[0], "rust"), (&v[1], "c")] {
        assert_eq!(r["vmm"], vmm, "{r}");
        assert_eq!(r["verified"], true, "{r}");
        assert_eq!(r["converged"], true, "{r}");
        assert_eq!(r["rate"], 1_000_000_000u64, "{r}");
    }
    assert_eq!(v[2]["name"], "migration-c-vs-rust", "{}", v[2]);
    assert!(
        v[2]["total_ratio"].as_f64().is_some_and(|x| x > 0.0),
        "{}",
        v[2]
    );
}
