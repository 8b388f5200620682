//! The C clients of libdwcp, run by `cargo test`:
//!
//! - `api.c` (every export, NULL and error paths) built against the shared
//!   and against the static library, under AddressSanitizer (leaks
//!   included) and UBSan;
//! - `api.c --quick`, built without sanitizers, under valgrind;
//! - `smoke.py`, a Python ctypes client of the shared library.
//!
//! A test whose tool (`cc`, `valgrind`, `python3`) is missing prints why and
//! passes. The libraries are built by a nested `cargo build -p dwcp-ffi`
//! into the target directory this test runs from; the C programs go to a
//! temporary directory that is removed unless a test fails.

mod common;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

/// The workspace root.
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("ffi/ has a parent")
        .to_path_buf()
}

/// Where cargo puts the libraries of this test's profile
/// (`target/debug/deps/c_clients-…` → `target/debug`).
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the test's own path");
    exe.ancestors()
        .nth(2)
        .expect("the test runs from target/<profile>/deps")
        .to_path_buf()
}

fn have(tool: &str, arg: &str) -> bool {
    Command::new(tool)
        .arg(arg)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The C programs run one at a time: api.c measures cancellations and
/// deadlines, and the machines may have two cores.
fn one_at_a_time() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

/// What a program did.
struct Ran {
    /// Exit code; `None` when killed (by a signal or the time limit).
    code: Option<i32>,
    timed_out: bool,
    stdout: String,
    stderr: String,
    took: Duration,
}

impl Ran {
    fn ok(&self) -> bool {
        self.code == Some(0) && !self.timed_out
    }

    fn report(&self, what: &str) -> String {
        format!(
            "{what}: {} after {:.1} s\n--- stdout ---\n{}\n--- stderr ---\n{}",
            if self.timed_out {
                "killed at its time limit".to_string()
            } else {
                match self.code {
                    Some(c) => format!("exit code {c}"),
                    None => "killed by a signal".to_string(),
                }
            },
            self.took.as_secs_f64(),
            self.stdout,
            self.stderr
        )
    }
}

/// Runs `cmd` with its output in files under `dir` (`tag.out`, `tag.err`),
/// killing it after `limit`.
fn run(cmd: &mut Command, dir: &Path, tag: &str, limit: Duration) -> Ran {
    let out_path = dir.join(format!("{tag}.out"));
    let err_path = dir.join(format!("{tag}.err"));
    let start = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(File::create(&out_path).expect("creating the output file"))
        .stderr(File::create(&err_path).expect("creating the error file"))
        .spawn()
        .unwrap_or_else(|e| panic!("starting {cmd:?}: {e}"));
    let mut timed_out = false;
    let status = loop {
        if let Some(s) = child.try_wait().expect("waiting for a child") {
            break s;
        }
        if start.elapsed() > limit {
            timed_out = true;
            let _ = child.kill();
            break child.wait().expect("waiting for a killed child");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let read =
        |p: &Path| String::from_utf8_lossy(&std::fs::read(p).unwrap_or_default()).into_owned();
    Ran {
        code: status.code(),
        timed_out,
        stdout: read(&out_path),
        stderr: read(&err_path),
        took: start.elapsed(),
    }
}

/// Runs a build step that must succeed.
fn build(cmd: &mut Command, dir: &Path, tag: &str) {
    let r = run(cmd, dir, tag, Duration::from_secs(900));
    assert!(r.ok(), "{}", r.report(&format!("{cmd:?}")));
}

/// A scratch directory, removed when the test passes and kept (and named)
/// when it fails.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("dwcp-c-clients-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("creating a scratch directory");
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("kept {} for a look", self.0.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// Builds libdwcp.so and libdwcp.a (once per test process) and returns the
/// directory that holds them.
fn libraries() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = profile_dir();
        let scratch = Scratch::new("cargo");
        let mut cmd = Command::new(env!("CARGO"));
        cmd.args(["build", "-p", "dwcp-ffi", "--lib", "--locked"])
            .current_dir(root());
        match dir.file_name().and_then(|n| n.to_str()) {
            Some("debug") => {}
            Some("release") => {
                cmd.arg("--release");
            }
            Some(profile) => {
                cmd.args(["--profile", profile]);
            }
            None => panic!("no profile directory above {}", dir.display()),
        }
        build(&mut cmd, &scratch.0, "cargo-build");
        for lib in ["libdwcp.so", "libdwcp.a"] {
            assert!(
                dir.join(lib).is_file(),
                "`cargo build -p dwcp-ffi` left no {lib} in {} (a --target build?)",
                dir.display()
            );
        }
        dir
    })
}

/// What the static library needs besides itself: `Libs.private` of
/// ffi/dwcp.pc.in (rustc --print native-static-libs; pkgconfig.rs keeps it
/// current).
fn static_libs() -> Vec<String> {
    let pc =
        std::fs::read_to_string(root().join("ffi/dwcp.pc.in")).expect("reading ffi/dwcp.pc.in");
    pc.lines()
        .find_map(|l| l.strip_prefix("Libs.private:"))
        .expect("ffi/dwcp.pc.in has Libs.private")
        .split_whitespace()
        .map(String::from)
        .collect()
}

const CFLAGS: &[&str] = &["-std=c11", "-Wall", "-Wextra", "-Werror", "-g"];
const SANITIZE: &[&str] = &[
    "-fsanitize=address,undefined",
    "-fno-omit-frame-pointer",
    "-fno-sanitize-recover=undefined",
];

fn api_c() -> PathBuf {
    root().join("ffi/tests/api.c")
}

fn include_dir() -> PathBuf {
    root().join("ffi/include")
}

enum Link {
    Shared,
    Static,
}

/// Compiles api.c into `dir/name`.
fn compile_api(dir: &Path, name: &str, flags: &[&str], link: Link) -> PathBuf {
    let libs = libraries();
    let exe = dir.join(name);
    let mut cmd = Command::new("cc");
    cmd.args(CFLAGS)
        .args(flags)
        .arg("-I")
        .arg(include_dir())
        .arg(api_c());
    match link {
        Link::Shared => {
            cmd.arg("-L").arg(libs).args(["-ldwcp", "-lpthread"]);
        }
        Link::Static => {
            cmd.arg(libs.join("libdwcp.a")).args(static_libs());
        }
    }
    cmd.arg("-o").arg(&exe);
    build(&mut cmd, dir, &format!("cc-{name}"));
    exe
}

/// Runs api.c under the sanitizers; panics with its output on failure.
fn run_api_sanitized(link: Link, tag: &str) {
    if !have("cc", "--version") {
        eprintln!("skipped: no C compiler `cc` (apt-get install gcc)");
        return;
    }
    let _one = one_at_a_time();
    let scratch = Scratch::new(tag);
    let exe = compile_api(&scratch.0, tag, SANITIZE, link);
    let mut cmd = Command::new(&exe);
    cmd.env("LD_LIBRARY_PATH", libraries())
        .env("TMPDIR", &scratch.0)
        .env(
            "ASAN_OPTIONS",
            "detect_leaks=1:detect_stack_use_after_return=1",
        )
        .env("UBSAN_OPTIONS", "halt_on_error=1:print_stacktrace=1");
    let r = run(&mut cmd, &scratch.0, tag, Duration::from_secs(300));
    assert!(
        r.ok(),
        "{}",
        r.report(&format!("{tag} (api.c, ASan and UBSan)"))
    );
    println!("{tag}: {:.1} s\n{}", r.took.as_secs_f64(), r.stdout);
}

#[test]
fn api_c_shared_library_under_asan_and_ubsan() {
    run_api_sanitized(Link::Shared, "api-asan-shared");
}

#[test]
fn api_c_static_library_under_asan_and_ubsan() {
    run_api_sanitized(Link::Static, "api-asan-static");
}

/// Starts and stops an engine: what valgrind must manage before api.c is
/// worth running under it.
const VALGRIND_PROBE: &str = r#"
#include "dwcp.h"
int main(void) {
    dwcp_engine_options o;
    dwcp_engine *e = 0;
    if (dwcp_engine_options_default(&o) != DWCP_STATUS_OK) return 2;
    o.workers = 1;
    o.pin = 0;
    if (dwcp_engine_new(&o, &e) != DWCP_STATUS_OK) return 3;
    dwcp_engine_free(e);
    return 0;
}
"#;

#[test]
fn api_c_under_valgrind() {
    for (tool, arg) in [("cc", "--version"), ("valgrind", "--version")] {
        if !have(tool, arg) {
            eprintln!("skipped: no `{tool}` (apt-get install {tool})");
            return;
        }
    }
    let scratch = Scratch::new("valgrind");
    let dir = &scratch.0;
    let valgrind = |exe: &Path| {
        let mut cmd = Command::new("valgrind");
        cmd.args([
            "--error-exitcode=1",
            "--leak-check=full",
            "--errors-for-leak-kinds=definite",
            "--track-origins=yes",
        ])
        .arg(exe)
        .env("LD_LIBRARY_PATH", libraries())
        .env("TMPDIR", dir);
        cmd
    };

    // A valgrind that does not know io_uring_enter blocks keeps its lock
    // while an engine worker waits in it: nothing else runs again.
    let probe_c = dir.join("probe.c");
    std::fs::write(&probe_c, VALGRIND_PROBE).expect("writing the probe");
    let probe = dir.join("probe");
    build(
        Command::new("cc")
            .args(CFLAGS)
            .arg("-I")
            .arg(include_dir())
            .arg(&probe_c)
            .arg("-L")
            .arg(libraries())
            .arg("-ldwcp")
            .arg("-o")
            .arg(&probe),
        dir,
        "cc-probe",
    );
    let r = run(&mut valgrind(&probe), dir, "probe", Duration::from_secs(20));
    if r.timed_out {
        let version = Command::new("valgrind")
            .arg("--version")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default();
        eprintln!(
            "skipped: {version} cannot run libdwcp: starting an engine hung for {:.0} s \
             (this valgrind does not treat io_uring_enter as a blocking call, so a worker \
             waiting in it keeps every other thread from running)",
            r.took.as_secs_f64()
        );
        return;
    }
    assert!(
        r.ok(),
        "{}",
        r.report("the valgrind probe (engine start and stop)")
    );

    let _one = one_at_a_time();
    let exe = compile_api(dir, "api-valgrind", &["-O1"], Link::Shared);
    let mut cmd = valgrind(&exe);
    cmd.arg("--quick");
    let r = run(&mut cmd, dir, "api-valgrind", Duration::from_secs(600));
    assert!(r.ok(), "{}", r.report("api.c --quick under valgrind"));
    println!("api-valgrind: {:.1} s\n{}", r.took.as_secs_f64(), r.stdout);
}

#[test]
fn smoke_py_through_ctypes() {
    if !have("python3", "--version") {
        eprintln!("skipped: no python3 (apt-get install python3)");
        return;
    }
    let _one = one_at_a_time();
    let scratch = Scratch::new("smoke");
    let mut cmd = Command::new("python3");
    cmd.arg(root().join("ffi/tests/smoke.py"))
        .arg(libraries().join("libdwcp.so"))
        .env("TMPDIR", &scratch.0);
    let r = run(&mut cmd, &scratch.0, "smoke", Duration::from_secs(120));
    assert!(r.ok(), "{}", r.report("smoke.py"));
    print!("{}", r.stdout);
}

/// api.c calls every export the library has (the header declares them all:
/// header.rs).
#[test]
fn api_c_calls_every_export() {
    let api = std::fs::read_to_string(api_c()).expect("reading api.c");
    let exports = common::exports();
    let n = exports.len();
    let missing: Vec<String> = exports
        .into_iter()
        .filter(|name| !api.contains(&format!("{name}(")))
        .collect();
    assert!(n > 40, "found only {n} exports in ffi/src");
    assert!(
        missing.is_empty(),
        "api.c never calls {}",
        missing.join(", ")
    );
}
