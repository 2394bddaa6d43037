//! End-to-end tests across REAL processes: `cn-backend`, `gatewayd`, `gatewayctl`, `iotdev` and
//! `loadgen`, each started as its own process on loopback (port 0 + ready files) in a temporary
//! directory, talking QUIC/TLS and the control socket exactly as in production.
//!
//! The binaries are taken from the workspace target directory this test was built into
//! (`target/debug`, or `$E2E_BIN_DIR`); `cargo test --workspace` (scripts/test.sh) builds them all.
//! A missing binary fails the test with the command that builds it.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{HashMap, HashSet};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use companion_testkit::process::wait_ready;
use companion_testkit::{
    Bins, CnServer, GatewayToml, Gatewayd, Out, Proc, Scratch, cn, gateway, http, scratch,
};
use serde_json::Value;

const COMPANION_SUPI: &str = companion_testkit::COMPANION_SUPI;
const VISITED_SNN: &str = companion_testkit::VISITED_SNN;

// ------------------------------------------------------------------------------------ harness

/// The workspace binaries of this test's target directory, or of `$E2E_BIN_DIR`.
fn bins() -> Bins {
    Bins::of_test("E2E_BIN_DIR")
}

fn bin(name: &str) -> PathBuf {
    if name == "loadgen" {
        return PathBuf::from(env!("CARGO_BIN_EXE_loadgen"));
    }
    let p = bins().path(name);
    assert!(
        p.exists(),
        "the `{name}` binary is missing at {}: build the workspace's binaries first with \
         `cargo build --workspace --bins` (scripts/test.sh does), or set E2E_BIN_DIR",
        p.display()
    );
    p
}

/// `command` spawned with stdout and stderr piped, SIGKILLed when dropped.
fn spawn(what: &str, command: &mut Command) -> Proc {
    let child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    Proc::new(what, child, None)
}

/// Waits up to `limit` for `p` to exit; its status and what it printed on stdout.
fn finish(p: &mut Proc, limit: Duration) -> (ExitStatus, String) {
    let st = p.wait_exit(limit).unwrap();
    let st = st.unwrap_or_else(|| panic!("{} did not finish in {limit:?}", p.name));
    let mut stdout = String::new();
    use std::io::Read;
    p.child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut stdout)
        .unwrap();
    (st, stdout)
}

fn http_get(addr: &str, path: &str) -> String {
    http::get_ok(addr, path)
}

fn metric(text: &str, name: &str) -> f64 {
    http::metric(text, name).unwrap_or(0.0)
}

/// The value of the series `name` (with its labels) in a Prometheus text page; fails the test if
/// the series is missing, so a zero read is a real zero.
fn series(text: &str, name: &str) -> f64 {
    http::series(text, name).unwrap_or_else(|| panic!("no series {name} in:\n{text}"))
}

/// cn-backend: a data directory, the companion (parent) subscription, and the server.
struct Cn {
    dir: PathBuf,
    proc: Option<Proc>,
    quic: String,
    http: String,
}

impl Cn {
    /// `init` + `subscriber add` of the companion with `policy` (extra `subscriber add` flags),
    /// then `serve`.
    fn start_new(dir: &Path, policy: &[&str]) -> Self {
        cn::init(&bins(), dir, &[]).unwrap();
        cn::add_companion(&bins(), dir, policy).unwrap();
        let mut cn = Cn {
            dir: dir.to_path_buf(),
            proc: None,
            quic: "127.0.0.1:0".into(),
            http: String::new(),
        };
        cn.start();
        cn
    }

    fn cli(&self, args: &[&str]) -> Out {
        Out::of(&mut cn::cli(&bins(), &self.dir, args)).unwrap()
    }

    /// Starts the server (on the same QUIC port as before, if it ran already).
    fn start(&mut self) {
        let ready = self.dir.join("ready.json");
        let log = self.dir.join("serve.log");
        let s = CnServer::serve(&bins(), &self.dir, &self.quic, &ready, &log).unwrap();
        self.quic = s.quic;
        self.http = s.http;
        self.proc = Some(s.proc);
    }

    /// SIGKILL: no drain, no goodbye.
    fn kill9(&mut self) {
        drop(self.proc.take());
    }

    fn subscriber(&self) -> Value {
        self.cli(&["--json", "subscriber", "show", COMPANION_SUPI])
            .ok()
            .json()
    }
}

/// gatewayd with a companion credential file (0600) and a config on loopback ports.
struct Gw {
    proc: Option<Proc>,
    dir: PathBuf,
    config: PathBuf,
    devices: String,
    control: PathBuf,
    metrics: String,
}

impl Gw {
    /// `devices`: lines added to `[devices]`; `extra`: tables appended.
    fn start(dir: &Path, cn: &Cn, devices: &str, extra: &str) -> Self {
        let mut toml = GatewayToml::new(dir, &cn.quic, &cn.dir.join("ca.pem"));
        toml.top = "log_level = \"info\"\ndrain_timeout = \"2s\"";
        let devices = format!("new_connections_per_ip = 0\n{devices}");
        toml.devices = &devices;
        toml.cn = "reconnect_min = \"100ms\"\nreconnect_max = \"500ms\"\nrequest_timeout = \"3s\"";
        let tables = format!("[filter]\nmode = \"userspace\"\nblock_after_failures = 0\n{extra}");
        toml.tables = &tables;
        let mut gw = Gw {
            proc: None,
            dir: dir.to_path_buf(),
            config: toml.write().unwrap(),
            devices: String::new(),
            control: PathBuf::new(),
            metrics: String::new(),
        };
        gw.spawn();
        gw.wait_cn_up();
        gw
    }

    fn spawn(&mut self) {
        let cmd = gateway::command(&bins(), &self.config, &self.dir.join("ready.json"), None);
        let g = Gatewayd::start(&self.dir, cmd).unwrap();
        self.devices = g.devices;
        self.control = g.control;
        self.metrics = g.metrics;
        self.proc = Some(g.proc);
    }

    /// SIGKILL, then a new process on the same state directory and the same device port.
    fn kill9_and_restart(&mut self) {
        drop(self.proc.take());
        let config = std::fs::read_to_string(&self.config).unwrap();
        let pinned = config.replacen(
            "listen = \"127.0.0.1:0\"",
            &format!("listen = \"{}\"", self.devices),
            1,
        );
        std::fs::write(&self.config, pinned).unwrap();
        self.spawn();
    }

    fn ctl(&self, args: &[&str]) -> Out {
        gateway::ctl(&bins(), &self.control, args).unwrap()
    }

    fn wait_cn_up(&self) {
        gateway::wait_cn(&self.control, "up", Duration::from_secs(20)).unwrap();
    }
}

/// A temporary directory with a CN (the companion allowed what `policy` says: extra
/// `subscriber add` flags) and a gateway on it (`gw_tables` appended to its configuration).
fn stack(policy: &[&str], gw_tables: &str) -> (Scratch, Cn, Gw) {
    let tmp = scratch();
    let cn = Cn::start_new(&tmp.path().join("cn"), policy);
    let gw = Gw::start(&tmp.path().join("gw"), &cn, "", gw_tables);
    (tmp, cn, gw)
}

/// Fails unless the gateway's metrics `m` count no device giving up, for any reason.
fn assert_no_giveups(m: &str) {
    for reason in ["timeout", "error", "disconnected"] {
        let name = format!("gatewayd_device_giveups_total{{reason=\"{reason}\"}}");
        assert_eq!(series(m, &name), 0.0, "{m}");
    }
}

/// One `iotdev` device directory.
struct Dev {
    dir: PathBuf,
}

impl Dev {
    fn init(root: &Path, id: &str) -> (Self, String) {
        Self::init_with(root, id, &[])
    }

    fn init_with(root: &Path, id: &str, extra: &[&str]) -> (Self, String) {
        let d = Dev { dir: root.join(id) };
        let mut args = vec!["init", "--id", id];
        args.extend_from_slice(extra);
        let out = d.run(&args).ok();
        let code = out
            .stdout
            .lines()
            .find(|l| l.starts_with("CPN:"))
            .unwrap_or_else(|| panic!("no pairing code printed: {out:?}"))
            .to_string();
        (d, code)
    }

    fn run(&self, args: &[&str]) -> Out {
        Command::new(bin("iotdev"))
            .arg("--dir")
            .arg(&self.dir)
            .args(args)
            .env_remove("IOTDEV_GATEWAY")
            .output()
            .unwrap()
            .into()
    }

    fn provision(&self, gw: &Gw, extra: &[&str]) -> Out {
        let mut a = vec!["provision", "--gateway", &gw.devices, "--retry-for", "10s"];
        a.extend_from_slice(extra);
        self.run(&a)
    }

    fn show(&self) -> Value {
        serde_json::from_str(&self.run(&["show", "--json"]).ok().stdout).unwrap()
    }
}

fn paired_device(root: &Path, gw: &Gw, id: &str) -> Dev {
    let (d, code) = Dev::init(root, id);
    let out = gw.ctl(&["pair", &code]);
    assert_eq!(out.code, 0, "pair: {out:?}");
    d
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

// -------------------------------------------------------------------------------------- tests

/// The whole procedure with the `iotdev` CLI: init (pairing code + QR), refused before pairing,
/// `gatewayctl pair`, provision (stored 0600), show (secrets only with --reveal), attach (twice:
/// the USIM's SQN memory is persisted), a changed gateway key detected, and the CN going away
/// reported as "retry later" both by the gateway (provision) and at attach. (Recovery after the
/// CN comes back is covered by `cn_killed_and_restarted_during_a_loadgen_run`.)
#[test]
fn whole_procedure_with_the_iotdev_cli() {
    let (tmp, mut cn, gw) = stack(&["--max-children", "10"], "");

    // The device's factory configuration holds the operator CA: every credential must be
    // signed by the CN under it (PROTOCOL.md §9.1).
    let ca = cn.dir.join("ca.pem");
    let (dev, code) = Dev::init_with(
        tmp.path(),
        "watch-01",
        &["--operator-anchor", ca.to_str().unwrap()],
    );
    assert!(code.starts_with("CPN:V:1;I:watch-01;K:"), "{code}");
    let init_out = dev.run(&["pairing-code"]).ok();
    assert!(
        init_out.stdout.contains('█'),
        "no QR code drawn: {init_out:?}"
    );

    // Not paired yet: a clear, non-retryable refusal.
    let out = dev.provision(&gw, &[]);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stderr.contains("not paired"), "{out:?}");
    assert!(out.stderr.contains("gatewayctl pair"), "{out:?}");

    let paired = gw.ctl(&["pair", &code, "--label", "wrist"]);
    assert_eq!(paired.code, 0, "{paired:?}");
    let out = dev.provision(&gw, &[]).ok();
    assert!(out.stdout.contains("provisioned watch-01"), "{out:?}");
    assert!(out.stdout.contains("acknowledged"), "{out:?}");
    let mode = std::fs::metadata(dev.dir.join("device.json"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(
        mode & 0o077,
        0,
        "device.json is readable by others: {mode:o}"
    );

    // show: the credential, without secrets unless --reveal.
    let v = dev.show();
    let supi = v["credential"]["supi"].as_str().unwrap().to_string();
    assert!(supi.starts_with("imsi-00101"), "{v}");
    assert!(v["credential"].get("k").is_none(), "{v}");
    assert!(v["gateway_pin"].is_string(), "gateway key not pinned: {v}");
    let text = dev.run(&["show"]).ok().stdout;
    assert!(text.contains(&supi) && text.contains("--reveal"), "{text}");
    let revealed: Value =
        serde_json::from_str(&dev.run(&["show", "--json", "--reveal"]).ok().stdout).unwrap();
    assert_eq!(revealed["credential"]["k"].as_str().unwrap().len(), 32);
    assert_eq!(revealed["credential"]["opc"].as_str().unwrap().len(), 32);
    // The gateway sees the device provisioned.
    let devices: Value = serde_json::from_str(&gw.ctl(&["devices", "--json"]).ok().stdout).unwrap();
    assert_eq!(devices[0]["status"], "provisioned", "{devices}");
    assert_eq!(devices[0]["supi"], supi.as_str());

    // A second provisioning would use quota: refused unless asked for.
    let out = dev.provision(&gw, &[]);
    assert_eq!(out.code, 1);
    assert!(
        out.stderr.contains("already holds a valid credential"),
        "{out:?}"
    );

    // Attach: 5G AKA at the CN with the new credential; twice (SQN memory persisted).
    let out = dev.run(&["attach"]).ok();
    assert!(
        out.stdout.contains("attached") && out.stdout.contains(&supi),
        "{out:?}"
    );
    let sqn_mode = std::fs::metadata(dev.dir.join("usim-sqn.json"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(sqn_mode & 0o777, 0o600);
    let sqn1: Value =
        serde_json::from_str(&std::fs::read_to_string(dev.dir.join("usim-sqn.json")).unwrap())
            .unwrap();
    let out = dev.run(&["attach", "--json"]).ok();
    let a: Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(a["attached"], true);
    assert_eq!(a["restrictions"]["roaming_allowed"], false);
    let sqn2: Value =
        serde_json::from_str(&std::fs::read_to_string(dev.dir.join("usim-sqn.json")).unwrap())
            .unwrap();
    assert_ne!(sqn1, sqn2, "the USIM's SQN memory did not advance");
    let m = http_get(&cn.http, "/metrics");
    assert!(
        metric(&m, "cn_backend_attach_outcomes_total{result=\"accepted\"}") >= 2.0,
        "{m}"
    );

    // The gateway's key "changed" (simulated by corrupting the pin): detected and explained.
    let state_path = dev.dir.join("device.json");
    let mut state: Value =
        serde_json::from_str(&std::fs::read_to_string(&state_path).unwrap()).unwrap();
    let real_pin = state["gateway_fingerprint"].clone();
    state["gateway_fingerprint"] = Value::from("00".repeat(32));
    std::fs::write(&state_path, serde_json::to_vec(&state).unwrap()).unwrap();
    let out = dev.run(&["renew", "--gateway", &gw.devices, "--retry-for", "0s"]);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(
        out.stderr.contains("key changed") && out.stderr.contains("reset-gateway-pin"),
        "{out:?}"
    );
    state["gateway_fingerprint"] = real_pin;
    std::fs::write(&state_path, serde_json::to_vec(&state).unwrap()).unwrap();

    // The CN goes away: a new device is told "retry later" (exit 75), and attach says the
    // operator's network is unreachable.
    let other = paired_device(tmp.path(), &gw, "sensor-02");
    cn.kill9();
    let out = other.run(&["provision", "--gateway", &gw.devices, "--retry-for", "0s"]);
    assert_eq!(out.code, 75, "{out:?}");
    assert!(
        out.stderr.contains("unreachable from the gateway") || out.stderr.contains("retry"),
        "{out:?}"
    );
    let out = dev.run(&["attach", "--timeout", "2s"]);
    assert_eq!(out.code, 75, "{out:?}");
    assert!(
        out.stderr.contains("cannot reach the operator's network"),
        "{out:?}"
    );
}

/// The parent's quota (max 1 child) reaches the second device as a clear, final error.
#[test]
fn quota_exhaustion_reaches_the_device() {
    let (tmp, _cn, gw) = stack(&["--max-children", "1"], "");
    let first = paired_device(tmp.path(), &gw, "tag-1");
    let second = paired_device(tmp.path(), &gw, "tag-2");
    first.provision(&gw, &[]).ok();
    let out = second.provision(&gw, &[]);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stderr.contains("quota exhausted"), "{out:?}");
    assert!(
        out.stderr.contains("raise the limit") || out.stderr.contains("revoke"),
        "{out:?}"
    );
    assert!(second.show()["credential"].is_null());
}

/// Short lifetimes (3 s, the parent's maximum): renewal before expiry extends the credential
/// (same SUPI); after expiry the CN refuses the attach as expired, renewal says "provision
/// again", and a new provisioning works.
#[test]
fn expiry_and_renewal_with_short_lifetimes() {
    // No pre-fetched renewals: the device renews itself.
    let (tmp, _cn, gw) = stack(
        &["--max-children", "5", "--max-lifetime", "3"],
        "[credentials]\nrenewal_margin = \"0s\"\n",
    );
    let dev = paired_device(tmp.path(), &gw, "meter-9");
    dev.provision(&gw, &["--lifetime", "3s"]).ok();
    let c1 = dev.show()["credential"].clone();
    let supi = c1["supi"].as_str().unwrap().to_string();
    let life = c1["expires_at"].as_u64().unwrap() - c1["issued_at"].as_u64().unwrap();
    assert!(life <= 3, "lifetime {life} s > the parent's 3 s");
    dev.run(&["attach"]).ok();

    std::thread::sleep(Duration::from_millis(1100));
    let out = dev.run(&["renew", "--gateway", &gw.devices]).ok();
    assert!(out.stdout.contains("renewed"), "{out:?}");
    let c2 = dev.show()["credential"].clone();
    assert_eq!(c2["supi"], supi.as_str());
    assert!(
        c2["expires_at"].as_u64() > c1["expires_at"].as_u64(),
        "{c1} -> {c2}"
    );
    dev.run(&["attach"]).ok();

    // Let it expire.
    let wait = c2["expires_at"].as_u64().unwrap() + 1
        - now_unix().min(c2["expires_at"].as_u64().unwrap() + 1);
    std::thread::sleep(Duration::from_secs(wait) + Duration::from_millis(200));
    let out = dev.run(&["attach"]);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stderr.contains("expired"), "{out:?}");
    assert!(out.stderr.contains("provision"), "{out:?}");
    let out = dev.run(&["renew", "--gateway", &gw.devices, "--retry-for", "0s"]);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(
        out.stderr.contains("expired") && out.stderr.contains("provision"),
        "{out:?}"
    );

    // A fresh credential after expiry (no --again needed: the old one is expired).
    dev.provision(&gw, &[]).ok();
    let c3 = dev.show()["credential"].clone();
    assert!(c3["expires_at"].as_u64().unwrap() > now_unix());
    dev.run(&["attach"]).ok();
}

/// The parent forbids roaming: a device asking for roaming gets a credential without it, and
/// an attach from a visited network is refused (home works).
#[test]
fn roaming_is_refused_at_attach_when_the_parent_forbids_it() {
    let (tmp, cn, gw) = stack(&["--max-children", "5", "--roaming", "false"], "");
    let dev = paired_device(tmp.path(), &gw, "car-3");
    dev.provision(&gw, &["--roaming"]).ok();
    assert_eq!(
        dev.show()["credential"]["restrictions"]["roaming_allowed"],
        false
    );
    let out = dev.run(&["attach", "--serving-network", VISITED_SNN]);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stderr.contains("may not roam"), "{out:?}");
    dev.run(&["attach"]).ok();
    let m = http_get(&cn.http, "/metrics");
    assert!(m.contains("roaming"), "no roaming refusal counted: {m}");
}

/// Revoking the parent subscription (`cn-backend subscriber revoke`) revokes every child: each
/// device's attach fails with "revoked".
#[test]
fn revoking_the_parent_makes_every_child_attach_fail() {
    let (tmp, cn, gw) = stack(&["--max-children", "10"], "");
    let devs: Vec<Dev> = (0..3)
        .map(|i| paired_device(tmp.path(), &gw, &format!("bulb-{i}")))
        .collect();
    for d in &devs {
        d.provision(&gw, &[]).ok();
        d.run(&["attach"]).ok();
    }
    let out = cn.cli(&["subscriber", "revoke", COMPANION_SUPI]).ok();
    assert!(out.stdout.contains("revoked 3 child"), "{out:?}");
    for d in &devs {
        let out = d.run(&["attach"]);
        assert_eq!(out.code, 1, "{out:?}");
        assert!(out.stderr.contains("revoked"), "{out:?}");
    }
    let v = cn.subscriber();
    assert!(
        v["children"]
            .as_array()
            .unwrap()
            .iter()
            .all(|c| c["state"] == "revoked"),
        "{v}"
    );
}

/// cn-backend is SIGKILLed and restarted (same port, same data directory) while loadgen
/// provisions and attaches a few hundred devices. The restarted CN answers the gateway's old
/// connections with a stateless reset (its connection IDs and reset tokens derive from its
/// persisted `reset.key`), so gatewayd counts the loss as `reset`, never as an idle timeout, and
/// is back at once: the batches lost with the session go again on the next one, and no device
/// waits so long that it gives up (no `timeout` retry, no give-up counted at gatewayd). Every
/// device ends with a credential that attached, and nothing was issued twice: the CN holds
/// exactly one child per device.
#[test]
fn cn_killed_and_restarted_during_a_loadgen_run() {
    let (tmp, mut cn, gw) = stack(&["--max-children", "1000"], "[batching]\nmax_batch = 16\n");
    let report = tmp.path().join("report.json");
    let devices = 300;
    let mut lg = spawn(
        "loadgen",
        Command::new(bin("loadgen"))
            .args([
                "provision",
                "--devices",
                &devices.to_string(),
                "--concurrency",
                "24",
            ])
            .args(["--gateway", &gw.devices, "--control-socket"])
            .arg(&gw.control)
            .args([
                "--attach",
                "--per-device",
                "--retry-for",
                "100",
                "--progress",
                "never",
            ])
            .args(["--id-prefix", "kill"])
            .arg("--json")
            .arg(&report),
    );
    // Kill once the CN has issued some credentials, i.e. mid-run.
    let until = Instant::now() + Duration::from_secs(60);
    loop {
        let m = http_get(&cn.http, "/metrics");
        if metric(&m, "cn_backend_credentials_issued_total") >= 40.0 {
            break;
        }
        assert!(lg.running(), "loadgen ended before the kill");
        assert!(Instant::now() < until, "the CN issued too little: {m}");
        std::thread::sleep(Duration::from_millis(20));
    }
    cn.kill9();
    // Down for less than the gateway's liveness timeout (2 s): what decides how fast the link
    // comes back is the reset, which the new process sends at the gateway's next packet.
    std::thread::sleep(Duration::from_millis(300));
    cn.start();

    let (status, stdout) = finish(&mut lg, Duration::from_secs(120));
    let r: Value = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    eprintln!("{stdout}");
    let results = r["results"].as_array().unwrap();
    assert_eq!(results.len(), devices);
    let mut succeeded = HashSet::new();
    for d in results {
        if d["reason"].is_null() {
            assert_eq!(d["provisioned"], true, "{d}");
            assert_eq!(d["attached"], true, "{d}");
            succeeded.insert(d["device"].as_str().unwrap().to_string());
        } else {
            assert_eq!(d["retryable"], true, "a device failed for good: {d}");
            assert!(!d["error"].as_str().unwrap().is_empty(), "{d}");
        }
    }
    assert!(status.success(), "{stdout}");
    assert_eq!(succeeded.len(), devices, "{stdout}");
    let retries = r["retries_by_reason"]
        .as_object()
        .cloned()
        .unwrap_or_default();
    assert!(
        !retries.contains_key("timeout"),
        "devices gave up waiting for the gateway: {retries:?}"
    );
    let m = http_get(&gw.metrics, "/metrics");
    assert!(
        series(&m, "gatewayd_cn_link_losses_total{reason=\"reset\"}") >= 1.0,
        "the restarted CN did not reset the old session: {m}"
    );
    assert_eq!(
        series(&m, "gatewayd_cn_link_losses_total{reason=\"idle_timeout\"}"),
        0.0,
        "the old session ended by idle timeout, not by a reset: {m}"
    );
    assert_no_giveups(&m);

    // No request was issued twice: one child per device at most; every device that succeeded
    // has exactly one; a device that ended with a retryable error may have one waiting at the
    // gateway for its retry.
    let v = cn.subscriber();
    let children = v["children"].as_array().unwrap();
    let mut per_device: HashMap<&str, usize> = HashMap::new();
    for c in children {
        *per_device
            .entry(c["device_id"].as_str().unwrap())
            .or_default() += 1;
    }
    let twice: Vec<_> = per_device.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "devices with two children: {twice:?}");
    for d in &succeeded {
        assert_eq!(
            per_device.get(d.as_str()),
            Some(&1),
            "{d} has no child at the CN"
        );
    }
    let unfinished = per_device
        .keys()
        .filter(|d| !succeeded.contains(**d))
        .count();
    assert_eq!(children.len(), succeeded.len() + unfinished);
    assert!(unfinished <= devices - succeeded.len());
    if succeeded.len() == devices {
        assert_eq!(children.len(), devices);
    }
    eprintln!(
        "after the CN restart: {} devices attached, {} ended retryable, {} children at the CN",
        succeeded.len(),
        devices - succeeded.len(),
        children.len()
    );
}

/// `loadgen` with `args` against `gw` (devices address and control socket appended).
fn loadgen(gw: &Gw, args: &[&str]) -> Command {
    let mut c = Command::new(bin("loadgen"));
    c.args(args)
        .args(["--gateway", &gw.devices, "--control-socket"])
        .arg(&gw.control)
        .args(["--progress", "never"]);
    c
}

fn read_json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// `loadgen` with `args` against `gw`, device IDs starting with `prefix`, its JSON report
/// written to `dir/<prefix>.json`: the run's output and the report.
fn loadgen_report(gw: &Gw, dir: &Path, args: &[&str], prefix: &str) -> (Out, Value) {
    let report = dir.join(format!("{prefix}.json"));
    let out: Out = loadgen(gw, args)
        .args(["--id-prefix", prefix, "--json"])
        .arg(&report)
        .output()
        .unwrap()
        .into();
    let r = read_json(&report);
    (out, r)
}

fn gateway_status(gw: &Gw) -> Value {
    serde_json::from_str(&gw.ctl(&["status", "--json"]).ok().stdout).unwrap()
}

/// `loadgen handshake`: every paired device's QUIC + mutual TLS handshake is confirmed by the
/// real gatewayd (and the devices are really paired there); devices whose keys were never
/// paired are refused in the TLS handshake, each reported as `not_paired`, exit status 1.
#[test]
fn handshake_baseline_counts_confirmed_handshakes_and_refuses_unpaired_keys() {
    let (tmp, _cn, gw) = stack(&["--max-children", "10"], "");
    let (out, r) = loadgen_report(
        &gw,
        tmp.path(),
        &["handshake", "--devices", "40", "--concurrency", "8"],
        "hs",
    );
    assert_eq!(out.code, 0, "{out:#?}");
    assert_eq!(r["devices"], 40, "{r}");
    assert_eq!(r["paired"], true, "{r}");
    assert_eq!(r["succeeded"], 40, "{r}");
    assert_eq!(r["failed"], 0, "{r}");
    assert_eq!(r["latency_ms"]["count"], 40, "{r}");
    let l = &r["latency_ms"];
    assert!(l["p50_ms"].as_f64().unwrap() > 0.0, "{r}");
    assert!(l["p50_ms"].as_f64() <= l["p99_ms"].as_f64(), "{r}");
    // Confirmation comes after the device's own side of the handshake completed.
    assert!(
        r["client_side_latency_ms"]["max_ms"].as_f64() <= l["max_ms"].as_f64(),
        "{r}"
    );
    assert!(r["throughput_per_s"].as_f64().unwrap() > 0.0, "{r}");
    assert!(out.stdout.contains("40 confirmed"), "{}", out.stdout);
    let st = gateway_status(&gw);
    assert_eq!(st["devices_paired"], 40, "{st}");

    let (out, r) = loadgen_report(
        &gw,
        tmp.path(),
        &["handshake", "--devices", "5", "--unpaired"],
        "stranger",
    );
    assert_eq!(out.code, 1, "unpaired keys must fail: {out:#?}");
    assert_eq!(r["paired"], false, "{r}");
    assert_eq!(r["succeeded"], 0, "{r}");
    assert_eq!(r["failed"], 5, "{r}");
    assert_eq!(
        r["failures_by_reason"],
        serde_json::json!({"not_paired": 5}),
        "{r}"
    );
    assert!(out.stdout.contains("FAILED"), "{}", out.stdout);
    // Nothing was paired behind our back.
    assert_eq!(gateway_status(&gw)["devices_paired"], 40);
}

/// A herd larger than gatewayd's handshake slots (`[devices] max_handshakes = 1`, 48 devices at
/// once): the connections beyond the slot wait their turn in arrival order instead of being
/// dropped or refused, so every device is provisioned with no retry and no give-up, and the
/// metrics show the queue was used and is empty again.
#[test]
fn a_herd_beyond_the_handshake_slots_waits_its_turn_and_every_device_succeeds() {
    let tmp = scratch();
    let cn = Cn::start_new(&tmp.path().join("cn"), &["--max-children", "100"]);
    let gw = Gw::start(&tmp.path().join("gw"), &cn, "max_handshakes = 1", "");
    let (out, r) = loadgen_report(
        &gw,
        tmp.path(),
        &["provision", "--devices", "48", "--concurrency", "48"],
        "herd",
    );
    assert_eq!(out.code, 0, "{out:#?}");
    assert_eq!(r["succeeded"], 48, "{r}");
    assert_eq!(r["failed"], 0, "{r}");
    let m = http_get(&gw.metrics, "/metrics");
    assert!(
        metric(&m, "gatewayd_device_handshakes_queued_total") >= 1.0,
        "48 devices at once through one slot must have queued: {m}"
    );
    assert_eq!(r["retries_by_reason"], serde_json::json!({}), "{r}");
    assert_eq!(
        series(&m, "gatewayd_device_handshake_wait_expired_total"),
        0.0
    );
    assert_eq!(series(&m, "gatewayd_device_handshakes_waiting"), 0.0);
    assert_eq!(series(&m, "gatewayd_device_handshakes_in_progress"), 0.0);
    assert_no_giveups(&m);
}

/// `loadgen hold`: N devices connect and stay connected — the gateway's status and its metrics
/// both count them — until SIGTERM; loadgen then closes them, reports all N still connected at
/// the end, exits 0, removes its ready file, and the gateway sees every connection go.
#[test]
fn hold_keeps_devices_connected_until_sigterm() {
    let (tmp, _cn, gw) = stack(&["--max-children", "10"], "");
    let ready = tmp.path().join("hold-ready.json");
    let report = tmp.path().join("hold.json");
    let n = 60;
    let mut lg = spawn(
        "loadgen",
        loadgen(
            &gw,
            &["hold", "--devices", &n.to_string(), "--concurrency", "16"],
        )
        .args(["--id-prefix", "hold", "--keep-alive", "1", "--ready-file"])
        .arg(&ready)
        .arg("--json")
        .arg(&report),
    );
    let r = wait_ready(&mut lg, &ready, Duration::from_secs(30)).unwrap();
    assert_eq!(r["connected"], n, "{r}");
    assert_eq!(r["failed"], 0, "{r}");
    // Held past a few keep-alive intervals: still all there, on both counts.
    std::thread::sleep(Duration::from_millis(2500));
    let st = gateway_status(&gw);
    assert_eq!(st["active_connections"], n, "{st}");
    let m = http_get(&gw.metrics, "/metrics");
    assert_eq!(
        metric(&m, "gatewayd_active_quic_connections"),
        f64::from(n),
        "{m}"
    );
    assert!(lg.running(), "loadgen hold ended early");

    lg.signal("-TERM").unwrap();
    let (status, stdout) = finish(&mut lg, Duration::from_secs(20));
    assert!(status.success(), "{status}: {stdout}");
    let r = read_json(&report);
    assert_eq!(r["succeeded"], n, "{r}");
    assert_eq!(r["still_connected"], n, "{r}");
    assert_eq!(r["closed_early"], 0, "{r}");
    assert_eq!(r["ended_by"], "SIGTERM", "{r}");
    assert!(r["held_s"].as_f64().unwrap() >= 2.0, "{r}");
    assert!(!ready.exists(), "the ready file outlived the hold");
    // The gateway saw every connection close (not time out: that would take 30 s).
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let st = gateway_status(&gw);
        if st["active_connections"] == 0 {
            break;
        }
        assert!(
            Instant::now() < until,
            "connections left open at the gateway: {st}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// gatewayd is SIGKILLed and restarted (same port, same state directory) under devices held
/// connected by `loadgen hold`. The new process recognises the connection IDs its predecessor
/// issued (they derive from its persisted `reset.key`) and answers each held device's next
/// packet with a stateless reset: every held connection ends `reset`, none by idle timeout, and
/// the same devices then provision at once through the restarted gateway.
#[test]
fn a_restarted_gateway_resets_its_held_devices_at_once() {
    let (tmp, _cn, mut gw) = stack(&["--max-children", "100"], "");
    let ready = tmp.path().join("hold-ready.json");
    let report = tmp.path().join("hold.json");
    let n = 20;
    let mut lg = spawn(
        "loadgen",
        loadgen(
            &gw,
            &["hold", "--devices", &n.to_string(), "--concurrency", "10"],
        )
        .args([
            "--id-prefix",
            "held",
            "--keep-alive",
            "1",
            "--hold-for",
            "6",
        ])
        .arg("--ready-file")
        .arg(&ready)
        .arg("--json")
        .arg(&report),
    );
    let r = wait_ready(&mut lg, &ready, Duration::from_secs(30)).unwrap();
    assert_eq!(r["connected"], n, "{r}");
    gw.kill9_and_restart();
    finish(&mut lg, Duration::from_secs(30));
    let r = read_json(&report);
    // Keep-alives every second, so within about a second of the restart each device sent a
    // packet and got the reset; the idle timeout (30 s) is far beyond the 6 s hold.
    assert_eq!(r["still_connected"], 0, "{r}");
    assert_eq!(
        r["closed_by_reason"],
        serde_json::json!({ "reset": n }),
        "every held connection must end with a stateless reset: {r}"
    );

    // The same devices (already paired) provision through the restarted gateway.
    let report = tmp.path().join("provision.json");
    let out: Out = loadgen(
        &gw,
        &[
            "provision",
            "--devices",
            &n.to_string(),
            "--concurrency",
            "10",
        ],
    )
    .args(["--id-prefix", "after-restart", "--json"])
    .arg(&report)
    .output()
    .unwrap()
    .into();
    assert_eq!(out.code, 0, "{out:#?}");
    assert_eq!(read_json(&report)["succeeded"], n);
}

/// cn-backend frozen with SIGSTOP while a device provisions: gatewayd keeps its `Pending`
/// promise — the answer or the next `Pending` always arrives before the `wait_ms` it announced
/// runs out — so the device never decides the gateway went silent. gatewayd notices the frozen
/// CN (liveness), tells the device `cn_unavailable, retry after` once its `request_timeout`
/// (3 s here) is spent, and the device's retry gets the credential once the CN thaws. No give-up
/// is counted at gatewayd.
#[test]
fn a_frozen_cn_never_makes_a_device_think_the_gateway_went_silent() {
    let (tmp, cn, gw) = stack(&["--max-children", "10"], "");
    let dev = paired_device(tmp.path(), &gw, "frozen-cn-watch");
    let cn_pid = cn.proc.as_ref().unwrap().pid().to_string();
    let signal = |sig: &str| {
        assert!(
            Command::new("kill")
                .args([sig, &cn_pid])
                .status()
                .unwrap()
                .success()
        );
    };
    signal("-STOP");
    let mut provision = Command::new(bin("iotdev"))
        .arg("--dir")
        .arg(&dev.dir)
        .args(["provision", "--gateway", &gw.devices, "--retry-for", "60s"])
        .env_remove("IOTDEV_GATEWAY")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Frozen past the request timeout (3 s) and the gateway's liveness timeout (2 s).
    std::thread::sleep(Duration::from_secs(5));
    signal("-CONT");
    let until = Instant::now() + Duration::from_secs(60);
    while provision.try_wait().unwrap().is_none() {
        assert!(Instant::now() < until, "iotdev provision did not finish");
        std::thread::sleep(Duration::from_millis(50));
    }
    let out: Out = provision.wait_with_output().unwrap().into();
    assert_eq!(out.code, 0, "{out:#?}");
    assert!(
        !out.stderr.contains("went silent"),
        "the device gave up on the gateway: {out:#?}"
    );
    let m = http_get(&gw.metrics, "/metrics");
    assert!(
        series(&m, "gatewayd_pendings_sent_total") >= 2.0,
        "the device was not kept informed: {m}"
    );
    assert_no_giveups(&m);
    let shown = dev.show();
    assert!(
        shown["credential"]["supi"]
            .as_str()
            .is_some_and(|s| s.starts_with("imsi-")),
        "{shown}"
    );
}
