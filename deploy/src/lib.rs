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
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The companion (router) subscription: TS 35.208 test set 1 keys.
pub const COMPANION_SUPI: &str = "imsi-001010000000001";
/// K of the companion subscription.
pub const COMPANION_K: &str = "465b5ce8b199b49faa5f0a2ee238a6bc";
/// OPc of the companion subscription.
pub const COMPANION_OPC: &str = "cd63cb71954a9f4e48a5994e37a02baf";

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

/// The directory holding the workspace's native binaries.
pub fn bin_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("DEPLOY_BIN_DIR") {
        return PathBuf::from(d);
    }
    // <target>/<profile>/deps/<test binary>
    let exe = std::env::current_exe().unwrap();
    exe.parent().unwrap().parent().unwrap().to_path_buf()
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

/// A child process, SIGKILLed when dropped.
#[derive(Debug)]
pub struct Proc(pub Child);

impl Proc {
    /// The process id.
    pub fn pid(&self) -> u32 {
        self.0.id()
    }

    /// SIGTERM, then waits up to `timeout` for the exit.
    pub fn terminate(&mut self, timeout: Duration) -> ExitStatus {
        let ok = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -TERM {} failed", self.0.id());
        let until = Instant::now() + timeout;
        loop {
            if let Some(st) = self.0.try_wait().unwrap() {
                return st;
            }
            assert!(Instant::now() < until, "no exit {timeout:?} after SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits for `path` to hold JSON (a ready file), failing early if `child` exits.
pub fn wait_json(path: &Path, child: &mut Child, what: &str, timeout: Duration) -> Value {
    let until = Instant::now() + timeout;
    loop {
        if let Ok(text) = std::fs::read_to_string(path)
            && let Ok(v) = serde_json::from_str(&text)
        {
            return v;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("{what} exited before it was ready: {status}");
        }
        assert!(Instant::now() < until, "{what} not ready after {timeout:?}");
        std::thread::sleep(Duration::from_millis(20));
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

/// `GET path` over HTTP/1.1 on `addr`: (status, body).
pub fn http_get(addr: &str, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let chunked = head
        .lines()
        .any(|l| l.eq_ignore_ascii_case("transfer-encoding: chunked"));
    let body = if chunked {
        dechunk(body)
    } else {
        body.to_string()
    };
    Ok((status, body))
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
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

/// Runs `c` and returns its output; panics with both streams unless it succeeded.
pub fn run_ok(c: &mut Command, what: &str) -> Output {
    let out = c.output().unwrap();
    assert!(
        out.status.success(),
        "{what} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
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
        let b = bin("cn-backend");
        let mut c = Command::new(&b);
        c.arg("--dir")
            .arg(dir)
            .args(["init", "--mcc", "001", "--mnc", "01"]);
        run_ok(&mut c, "cn-backend init");
        let mut c = Command::new(&b);
        c.arg("--dir").arg(dir).args([
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
        run_ok(&mut c, "cn-backend subscriber add");
        let ready = dir.join("ready.json");
        let log = std::fs::File::create(dir.join("cn-backend.log")).unwrap();
        let mut child = Command::new(&b)
            .arg("--dir")
            .arg(dir)
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--http-listen",
                "127.0.0.1:0",
            ])
            .arg("--ready-file")
            .arg(&ready)
            .env_remove("NOTIFY_SOCKET")
            .env_remove("WATCHDOG_USEC")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let v = wait_json(&ready, &mut child, "cn-backend", Duration::from_secs(30));
        Cn {
            dir: dir.to_path_buf(),
            proc: Proc(child),
            quic: v["quic"].as_str().unwrap().to_string(),
            http: v["http"].as_str().unwrap().to_string(),
        }
    }
}

/// gatewayd's configuration for the tests: everything on loopback, port 0, under `dir`.
pub fn gateway_config(dir: &Path, cn: &Cn) -> String {
    format!(
        r#"state_dir = "{state}"
drain_timeout = "5s"
[devices]
listen = "127.0.0.1:0"
[cn]
endpoint = "{quic}"
server_name = "localhost"
ca_file = "{ca}"
reconnect_min = "100ms"
reconnect_max = "1s"
request_timeout = "20s"
[companion]
credential_file = "{cred}"
[control]
socket = "{sock}"
[metrics]
listen = "127.0.0.1:0"
"#,
        state = dir.join("state").display(),
        quic = cn.quic,
        ca = cn.dir.join("ca.pem").display(),
        cred = dir.join("companion.toml").display(),
        sock = dir.join("control.sock").display(),
    )
}

/// Writes the companion credential (0600) to `path`.
pub fn write_companion(path: &Path) {
    std::fs::write(
        path,
        format!("supi = \"{COMPANION_SUPI}\"\nk = \"{COMPANION_K}\"\nopc = \"{COMPANION_OPC}\"\n"),
    )
    .unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
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
        std::fs::create_dir_all(dir).unwrap();
        let cred = dir.join("companion.toml");
        if !cred.exists() {
            write_companion(&cred);
        }
        let path = dir.join("gatewayd.toml");
        std::fs::write(&path, config).unwrap();
        let ready = dir.join("ready.json");
        let log = std::fs::File::create(dir.join("gatewayd.log")).unwrap();
        let mut child = runner
            .cmd("gatewayd")
            .arg("--config")
            .arg(&path)
            .arg("--ready-file")
            .arg(&ready)
            .env_remove("RUST_LOG")
            .env_remove("NOTIFY_SOCKET")
            .env_remove("WATCHDOG_USEC")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let v = wait_json(&ready, &mut child, "gatewayd", Duration::from_secs(90));
        let gw = Gw {
            dir: dir.to_path_buf(),
            proc: Proc(child),
            devices: v["devices"].as_str().unwrap().to_string(),
            metrics: v["metrics"].as_str().unwrap().to_string(),
            control: PathBuf::from(v["control"].as_str().unwrap()),
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
        let until = Instant::now() + Duration::from_secs(60);
        loop {
            let v: Value = serde_json::from_str(&self.ctl(&["status", "--json"])).unwrap();
            if v["cn_link"] == "up" {
                return;
            }
            assert!(
                Instant::now() < until,
                "CN link not up after 60 s: {v}; log: {}",
                std::fs::read_to_string(self.dir.join("gatewayd.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
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
