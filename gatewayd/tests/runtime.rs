//! The async runtime's size (`--worker-threads` / `GATEWAYD_WORKER_THREADS`): the real binary
//! runs exactly the workers asked for, so a single-core router can give gatewayd one thread.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;

/// Runtime worker threads of process `pid` (tokio names them `tokio-rt-worker`).
fn workers(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|c| c.trim() == "tokio-rt-worker")
        .count()
}

#[test]
fn worker_threads_sets_the_number_of_runtime_threads() {
    let tmp = scratch();
    let cn_dir = tmp.path().join("cn");
    init_cn_dir(&cn_dir, 10);
    for n in [1usize, 3] {
        let dir = tmp.path().join(format!("gw{n}"));
        // No CN runs: gatewayd is ready (and its runtime running) without its CN link.
        let toml = gw_toml(&dir, "127.0.0.1:9", &cn_dir);
        let gw = spawn_gw(
            &toml,
            None,
            &[("GATEWAYD_WORKER_THREADS".into(), n.to_string())],
        );
        assert_eq!(workers(gw.proc.pid()), n, "GATEWAYD_WORKER_THREADS={n}");
    }
}
