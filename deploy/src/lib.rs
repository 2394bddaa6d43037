//! Helpers for the deployment tests in `deploy/tests/` (issue 7): finding the workspace's
//! binaries and the external tools (systemd-analyze, promtool, prometheus, qemu-aarch64-static),
//! and starting the real `cn-backend` and `gatewayd` on loopback in temporary directories.
//!
//! Tools: a test that needs a tool which is not installed prints `SKIPPED: ...` on stderr and
//! passes — unless `DEPLOY_TESTS_STRICT=1` (set by `scripts/test.sh`, after `scripts/setup.sh`
//! installed everything), where a missing tool or artefact fails the test instead.
//!
//! Binaries: the native ones come from the target directory this test binary was built in
//! (`cargo build --workspace --bins` first) or `$DEPLOY_BIN_DIR`; the static router binaries from
//! `scripts/build-static.sh` (`target/dist/<target>/`, or `$DEPLOY_STATIC_DIR/<target>/`).
#![warn(missing_docs)]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use companion_testkit::{Bins, CnServer, GatewayToml, Gatewayd, cn, gateway};
use serde_json::Value;

pub use companion_testkit::http::get as http_get;
pub use companion_testkit::{COMPANION_K, COMPANION_OPC, COMPANION_SUPI, Proc};

/// The repository root.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Whether missing tools and artefacts fail (`DEPLOY_TESTS_STRICT=1`) instead of skipping.
pub fn strict() -> bool {
    std::env::var("DEPLOY_TESTS_STRICT").is_ok_and(|v| v == "1")
}

/// Reports a skipped test (or fails it in strict mode).
pub fn skip(why: &str) {
    assert!(!strict(), "DEPLOY_TESTS_STRICT=1 and {why}");
    eprintln!("SKIPPED: {why}");
}

/// Finds `name` on `PATH` (and in /usr/sbin, /sbin); `None` after reporting the skip.
pub fn tool(name: &str, package: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut dirs: Vec<PathBuf> = std::env::split_paths(&path).collect();
    dirs.extend(["/usr/sbin", "/sbin", "/usr/bin"].map(PathBuf::from));
    for d in dirs {
        let p = d.join(name);
        if p.metadata()
            .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        {
            return Some(p);
        }
    }
    skip(&format!(
        "`{name}` is not installed (Debian package `{package}`; scripts/setup.sh installs it)"
    ));
    None
}

/// The directory holding the workspace's native binaries (`$DEPLOY_BIN_DIR`, else this test's
/// target directory).
pub fn bin_dir() -> PathBuf {
    Bins::of_test("DEPLOY_BIN_DIR").dir
}

/// A native workspace binary.
pub fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.exists(),
        "{} not found: run `cargo build --workspace --bins` first (or set DEPLOY_BIN_DIR)",
        p.display()
    );
    p
}

/// Where `scripts/build-static.sh` put the binaries for `target`, if it did.
pub fn static_dir(target: &str) -> Option<PathBuf> {
    let base = std::env::var_os("DEPLOY_STATIC_DIR")
        .map_or_else(|| repo().join("target/dist"), PathBuf::from);
    let d = base.join(target);
    if ["gatewayd", "gatewayctl", "iotdev"]
        .iter()
        .all(|b| d.join(b).exists())
    {
        Some(d)
    } else {
        skip(&format!(
            "no static binaries in {} (run scripts/build-static.sh)",
            d.display()
        ));
        None
    }
}

/// How to run the gateway-side binaries: natively from a directory, or through qemu-user.
#[derive(Debug, Clone)]
pub struct Runner {
    /// Directory with gatewayd, gatewayctl and iotdev.
    pub dir: PathBuf,
    /// `qemu-aarch64-static` (or another emulator) prefixed to every command.
    pub emulator: Option<PathBuf>,
}

impl Runner {
    /// The workspace's own (native) binaries.
    pub fn native() -> Self {
        Runner {
            dir: bin_dir(),
            emulator: None,
        }
    }

    /// A command running `name` from this runner's directory.
    pub fn cmd(&self, name: &str) -> Command {
        let exe = self.dir.join(name);
        match &self.emulator {
            Some(emu) => {
                let mut c = Command::new(emu);
                c.arg(exe);
                c
            }
            None => Command::new(exe),
        }
    }
}

/// A free TCP port on 127.0.0.1 (for tools that cannot bind port 0 and report it).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Percent-encodes a query parameter value.
pub fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Resident set size and its high-water mark of a process, in KiB (`/proc/PID/status`).
pub fn rss_kib(pid: u32) -> (u64, u64) {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// What a command printed: its standard output, then its standard error.
pub fn printed(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Fails the test, with everything the command printed, unless `out` is a success.
pub fn assert_ok(out: &Output, what: &str) {
    assert!(
        out.status.success(),
        "{what} failed ({}): {}",
        out.status,
        printed(out)
    );
}

/// Runs `c` and returns its output; panics with both streams unless it succeeded.
pub fn run_ok(c: &mut Command, what: &str) -> Output {
    let out = c.output().unwrap();
    assert_ok(&out, what);
    out
}

/// A running native `cn-backend` with the companion subscription, on loopback.
#[derive(Debug)]
pub struct Cn {
    /// Its `--dir`.
    pub dir: PathBuf,
    /// The server.
    pub proc: Proc,
    /// QUIC address.
    pub quic: String,
    /// Admin HTTP address (`/metrics`).
    pub http: String,
}

impl Cn {
    /// `init`, `subscriber add` (up to `max_children` devices) and `serve` on port 0, with `env`.
    pub fn start(dir: &Path, max_children: u32, env: &[(&str, &str)]) -> Self {
        let bins = Bins::new(&bin_dir());
        cn::init_with_companion(&bins, dir, max_children.into()).unwrap();
        let ready = dir.join("ready.json");
        let mut c = cn::serve_command(&bins, dir, "127.0.0.1:0", &ready, None);
        c.envs(env.iter().copied());
        let s = CnServer::start(dir, c, &ready, &dir.join("cn-backend.log")).unwrap();
        Cn {
            dir: dir.to_path_buf(),
            proc: s.proc,
            quic: s.quic,
            http: s.http,
        }
    }
}

/// gatewayd's configuration for the tests: everything on loopback, port 0, under `dir`.
pub fn gateway_config(dir: &Path, cn: &Cn) -> String {
    let mut t = GatewayToml::new(dir, &cn.quic, &cn.dir.join("ca.pem"));
    t.top = "drain_timeout = \"5s\"";
    t.cn = "reconnect_min = \"100ms\"\nreconnect_max = \"1s\"\nrequest_timeout = \"20s\"";
    t.render()
}

/// Writes the companion credential (0600) to `path`.
pub fn write_companion(path: &Path) {
    gateway::write_companion(path).unwrap();
}

/// A running `gatewayd` (native or emulated).
#[derive(Debug)]
pub struct Gw {
    /// Its directory (configuration, state, log).
    pub dir: PathBuf,
    /// The daemon.
    pub proc: Proc,
    /// Device QUIC address.
    pub devices: String,
    /// Metrics HTTP address.
    pub metrics: String,
    /// Control socket.
    pub control: PathBuf,
    /// How its tools are run.
    pub runner: Runner,
}

impl Gw {
    /// Starts gatewayd with `config` (written to `dir/gatewayd.toml`) and the companion credential.
    pub fn start_with(dir: &Path, config: &str, runner: &Runner, env: &[(&str, &str)]) -> Self {
        let path = gateway::write_config(dir, config).unwrap();
        let mut c = runner.cmd("gatewayd");
        c.arg("--config")
            .arg(&path)
            .arg("--ready-file")
            .arg(dir.join("ready.json"))
            .env_remove("RUST_LOG")
            .env_remove("NOTIFY_SOCKET")
            .env_remove("WATCHDOG_USEC")
            .envs(env.iter().copied());
        let g = Gatewayd::start_within(dir, c, Duration::from_secs(90)).unwrap();
        let gw = Gw {
            dir: dir.to_path_buf(),
            proc: g.proc,
            devices: g.devices,
            metrics: g.metrics,
            control: g.control,
            runner: runner.clone(),
        };
        gw.wait_cn_up();
        gw
    }

    /// Starts gatewayd against `cn` with the test configuration.
    pub fn start(dir: &Path, cn: &Cn, runner: &Runner) -> Self {
        Self::start_with(dir, &gateway_config(dir, cn), runner, &[])
    }

    /// `gatewayctl --socket ... ARGS`, which must succeed; its stdout.
    pub fn ctl(&self, args: &[&str]) -> String {
        let mut c = self.runner.cmd("gatewayctl");
        c.arg("--socket").arg(&self.control).args(args);
        String::from_utf8(run_ok(&mut c, &format!("gatewayctl {args:?}")).stdout).unwrap()
    }

    /// Waits until `gatewayctl status` reports the CN link up.
    pub fn wait_cn_up(&self) {
        companion_testkit::wait_until("the CN link up", Duration::from_secs(60), || {
            let v: Value = serde_json::from_str(&self.ctl(&["status", "--json"])).unwrap();
            v["cn_link"] == "up"
        });
    }

    /// GET /metrics.
    pub fn scrape(&self) -> String {
        let (status, body) = http_get(&self.metrics, "/metrics").unwrap();
        assert_eq!(status, 200, "{body}");
        body
    }
}

/// One device through the `iotdev` CLI of `runner`: init, `gatewayctl pair`, provision (through
/// `gw`), attach (at the CN with the new credential). Returns the device's SUPI.
pub fn provision_device(root: &Path, gw: &Gw, runner: &Runner, id: &str) -> String {
    let dir = root.join(id);
    let iot = |args: &[&str]| {
        let mut c = runner.cmd("iotdev");
        c.arg("--dir")
            .arg(&dir)
            .args(args)
            .env_remove("IOTDEV_GATEWAY");
        String::from_utf8(run_ok(&mut c, &format!("iotdev {args:?}")).stdout).unwrap()
    };
    let out = iot(&["init", "--id", id]);
    let code = out
        .lines()
        .find(|l| l.starts_with("CPN:"))
        .unwrap_or_else(|| panic!("no pairing code printed: {out}"))
        .to_string();
    gw.ctl(&["pair", &code]);
    let out = iot(&["provision", "--gateway", &gw.devices, "--retry-for", "60s"]);
    assert!(out.contains(&format!("provisioned {id}")), "{out}");
    let out = iot(&["attach"]);
    assert!(out.contains("attached"), "{out}");
    let v: Value = serde_json::from_str(&iot(&["show", "--json"])).unwrap();
    v["credential"]["supi"].as_str().unwrap().to_string()
}

/// Every metric family name in a Prometheus text exposition (`# TYPE` lines and samples, with
/// histogram/summary suffixes kept as they appear).
pub fn exposed_names(text: &str) -> std::collections::BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            l.split(|c: char| c == '{' || c.is_whitespace())
                .next()
                .unwrap()
                .to_string()
        })
        .collect()
}
