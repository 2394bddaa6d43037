//! Process harness shared by the integration tests that start the real binaries
//! (`e2e.rs`, `netns.rs`).
// Each test crate uses a different subset.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

/// The companion's own subscription: TS 35.208 test set 1 keys.
pub const COMPANION_SUPI: &str = "imsi-001010000000001";
pub const COMPANION_K: &str = "465b5ce8b199b49faa5f0a2ee238a6bc";
pub const COMPANION_OPC: &str = "cd63cb71954a9f4e48a5994e37a02baf";

/// A workspace binary in `target/debug` (`scripts/test.sh` builds them all first), or the path in
/// `$<NAME>_BIN` (e.g. `CN_BACKEND_BIN`).
pub fn bin(name: &str) -> PathBuf {
    let var = format!("{}_BIN", name.to_uppercase().replace('-', "_"));
    if let Some(p) = std::env::var_os(&var) {
        return PathBuf::from(p);
    }
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../target/debug")
        .join(name);
    assert!(
        p.exists(),
        "{} not found: run `cargo build --workspace --bins` first (or set {var})",
        p.display()
    );
    p
}

/// A process killed when dropped (also when the test panics).
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits up to 30 s for a daemon's ready file; fails early (with `log`'s text) if it exits.
pub fn wait_json(
    path: &Path,
    child: &mut Child,
    what: &str,
    log: Option<&Path>,
) -> serde_json::Value {
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(t) = std::fs::read_to_string(path)
            && let Ok(v) = serde_json::from_str(&t)
        {
            return v;
        }
        if let Ok(Some(s)) = child.try_wait() {
            let log = log
                .and_then(|l| std::fs::read_to_string(l).ok())
                .unwrap_or_default();
            panic!("{what} exited before it was ready: {s}\n{log}");
        }
        assert!(Instant::now() < until, "{what} not ready after 30 s");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `cn-backend init` in `dir` with the companion's subscription allowed `max_children` children.
pub fn init_cn_dir(dir: &Path, max_children: u32) {
    let cn = bin("cn-backend");
    let run = |args: &[&str]| {
        let out = Command::new(&cn)
            .arg("--dir")
            .arg(dir)
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "cn-backend {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(&["init", "--mcc", "001", "--mnc", "01"]);
    run(&[
        "subscriber",
        "add",
        "--supi",
        COMPANION_SUPI,
        "--k",
        COMPANION_K,
        "--opc",
        COMPANION_OPC,
        "--max-children",
        &max_children.to_string(),
    ]);
}
