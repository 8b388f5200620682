//! `ffi/install.sh` installs a library, header and `dwcp.pc` that a C
//! program builds against with pkg-config, shared and static (which keeps
//! the static link's `Libs.private` current).

use std::path::{Path, PathBuf};
use std::process::Command;

fn have(tool: &str) -> bool {
    Command::new(tool)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The target directory this test was built into (`target/debug/deps/x`
/// → `target`).
fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.ancestors().nth(3).unwrap().to_path_buf()
}

const PROGRAM: &str = r#"
#include <dwcp.h>
#include <stdio.h>
#include <string.h>
int main(void) {
    if (strcmp(dwcp_version(), DWCP_VERSION_STRING) != 0) {
        fprintf(stderr, "library %s, header %s\n", dwcp_version(), DWCP_VERSION_STRING);
        return 1;
    }
    dwcp_engine *e = NULL;
    dwcp_engine_options o;
    if (dwcp_engine_options_default(&o) != DWCP_STATUS_OK) return 2;
    o.workers = 1;
    if (dwcp_engine_new(&o, &e) != DWCP_STATUS_OK || e == NULL) return 3;
    dwcp_engine_free(e);
    puts("ok");
    return 0;
}
"#;

#[test]
fn install_and_build_with_pkg_config() {
    for tool in ["cc", "pkg-config"] {
        if !have(tool) {
            eprintln!("skipped: {tool} is not installed (apt-get install gcc pkg-config)");
            return;
        }
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let tmp = std::env::temp_dir().join(format!("dwcp-pc-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).unwrap();
    let prefix = tmp.join("prefix");
    run(Command::new(root.join("ffi/install.sh"))
        .arg("--debug")
        .arg(&prefix)
        .current_dir(root)
        .env("CARGO_TARGET_DIR", target_dir()));
    let pc = |args: &[&str]| {
        run(Command::new("pkg-config")
            .args(args)
            .arg("dwcp")
            .env("PKG_CONFIG_PATH", prefix.join("lib/pkgconfig")))
    };
    assert_eq!(pc(&["--modversion"]).trim(), env!("CARGO_PKG_VERSION"));
    let src = tmp.join("app.c");
    std::fs::write(&src, PROGRAM).unwrap();
    let words = |s: String| s.split_whitespace().map(String::from).collect::<Vec<_>>();

    // Shared: what `pkg-config --cflags --libs` says.
    let shared = tmp.join("app-shared");
    run(Command::new("cc")
        .args(["-std=c11", "-Wall", "-Werror"])
        .arg(&src)
        .args(words(pc(&["--cflags", "--libs"])))
        .arg("-o")
        .arg(&shared));
    let out = run(Command::new(&shared).env("LD_LIBRARY_PATH", prefix.join("lib")));
    assert_eq!(out.trim(), "ok");

    // Static: the archive and exactly the libraries `Libs.private` lists.
    let libs: Vec<String> = words(pc(&["--static", "--libs-only-l"]))
        .into_iter()
        .filter(|l| l != "-ldwcp")
        .collect();
    let fixed = tmp.join("app-static");
    run(Command::new("cc")
        .args(["-std=c11", "-Wall", "-Werror"])
        .arg(&src)
        .args(words(pc(&["--cflags"])))
        .arg(prefix.join("lib/libdwcp.a"))
        .args(&libs)
        .arg("-o")
        .arg(&fixed));
    assert_eq!(run(&mut Command::new(&fixed)).trim(), "ok");
    let _ = std::fs::remove_dir_all(&tmp);
}
