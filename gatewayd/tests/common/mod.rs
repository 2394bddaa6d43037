//! What gatewayd's process suites (`e2e.rs`, `netns.rs`, `failover.rs`) share on top of
//! `companion-testkit`: the binaries of this target directory, a CN data directory with the
//! companion subscription, and the gateway configuration every suite starts from.
// Each test crate uses a different subset.
#![allow(
    dead_code,
    unused_imports,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic
)]

use std::path::{Path, PathBuf};
use std::time::Duration;

pub use companion_testkit::{
    Bins, COMPANION_K, COMPANION_OPC, COMPANION_SUPI, GatewayToml, Gatewayd, Proc, http, scratch,
    wait_until,
};
use companion_testkit::{cn, gateway};

/// The workspace binaries of this test's target directory (`GATEWAYD_BIN`, `CN_BACKEND_BIN`
/// and the like name another build of one of them).
pub fn bins() -> Bins {
    Bins::of_test("GATEWAYD_TESTS_BIN_DIR")
}

/// A workspace binary (panics with the command that builds it when missing).
pub fn bin(name: &str) -> PathBuf {
    companion_testkit::bin(name)
}

/// `cn-backend init` in `dir` with the companion's subscription allowed `max_children` children.
pub fn init_cn_dir(dir: &Path, max_children: u32) {
    cn::init_with_companion(&bins(), dir, max_children.into()).unwrap();
}

/// The configuration the suites start from: logs at info (gatewayd's own at `gatewayd_log`),
/// reconnects between 100 ms and 500 ms, no per-source connection rate limit.
pub fn gw_toml<'a>(dir: &'a Path, cn_quic: &str, cn_dir: &Path) -> GatewayToml<'a> {
    let mut t = GatewayToml::new(dir, cn_quic, &cn_dir.join("ca.pem"));
    t.top = "log_level = \"info,gatewayd=debug\"\ndrain_timeout = \"5s\"";
    t.cn = "reconnect_min = \"100ms\"\nreconnect_max = \"500ms\"\nrequest_timeout = \"3s\"";
    t
}

/// Starts gatewayd on `toml` (inside network namespace `netns` when given), with `env` added.
pub fn spawn_gw(toml: &GatewayToml, netns: Option<&str>, env: &[(String, String)]) -> Gatewayd {
    let config = toml.write().unwrap();
    let mut c = gateway::command(&bins(), &config, &toml.dir.join("ready.json"), netns);
    c.envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    Gatewayd::start(toml.dir, c).unwrap()
}

/// `gatewayctl status --json` on `control`.
pub fn ctl_status(control: &Path) -> serde_json::Value {
    let out = gateway::ctl(&bins(), control, &["status", "--json"]).unwrap();
    assert!(out.success(), "{}", out.stderr);
    out.json()
}

/// Waits up to `limit` for the CN link of the gateway on `control` to be `want`.
pub fn wait_cn(control: &Path, want: &str, limit: Duration) {
    wait_until(&format!("the CN link {want}"), limit, || {
        ctl_status(control)["cn_link"] == want
    });
}
