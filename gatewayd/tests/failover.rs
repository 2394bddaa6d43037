//! Gateway failover across a cn-backend fleet (issue 16, items 4 and 5), with REAL processes:
//! one throwaway PostgreSQL server (the cn-backend test harness, `initdb` + `pg_ctl` on a Unix
//! socket), two `cn-backend serve` instances on one database, `gatewayd` configured with both
//! endpoints, and `loadgen` provisioning devices through it. One instance is SIGKILLed in the
//! middle of the run. Every device must complete through the other instance, and the database
//! must show exactly one child credential (and one idempotency-ledger entry) per device, the one
//! the device received: 0 lost, 0 double-issued.
//!
//! Needs the workspace binaries (`cargo build --workspace --bins`, as `scripts/test.sh` does)
//! and Debian's `postgresql` package; without the server binaries the test prints a note and
//! passes, unless `CI` or `DEPLOY_TESTS_STRICT=1` is set (then it fails).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::*;

#[path = "../../cn-backend/tests/pg/mod.rs"]
mod pg;

const DEVICES: usize = 300;
const SESSIONS: usize = 4;

fn cn_cli(dir: &Path, args: &[&str]) {
    let out = Command::new(bin("cn-backend"))
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
}

/// One `cn-backend serve` of the fleet (the data directory, so the KEK and the TLS identity,
/// is shared; the database is named in its cn-backend.toml).
struct Instance {
    proc: Option<Proc>,
    quic: String,
    http: String,
}

impl Instance {
    fn start(dir: &Path, name: &str) -> Self {
        Self::start_at(dir, name, "127.0.0.1:0")
    }

    fn start_at(dir: &Path, name: &str, listen: &str) -> Self {
        let ready = dir.join(format!("ready-{name}.json"));
        let log_path = dir.join(format!("cn-{name}.log"));
        let log = std::fs::File::create(&log_path).unwrap();
        let mut child = Command::new(bin("cn-backend"))
            .arg("--dir")
            .arg(dir)
            .args([
                "serve",
                "--listen",
                listen,
                "--http-listen",
                "127.0.0.1:0",
                "--ready-file",
            ])
            .arg(&ready)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let v = wait_json(&ready, &mut child, name, Some(&log_path));
        Instance {
            proc: Some(Proc(child)),
            quic: v["quic"].as_str().unwrap().to_string(),
            http: v["http"].as_str().unwrap().to_string(),
        }
    }

    /// SIGKILL: no goodbye, no stateless reset; the gateway notices by the liveness timeout.
    fn kill9(&mut self) {
        let mut p = self.proc.take().unwrap();
        p.0.kill().unwrap();
        p.0.wait().unwrap();
    }
}

fn http_get(addr: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

/// The value of the series starting with `prefix` (name and labels), 0 when absent.
fn series(text: &str, prefix: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

struct Gateway {
    proc: Proc,
    devices: String,
    metrics: String,
    control: PathBuf,
}

impl Gateway {
    fn start(dir: &Path, ca: &Path, endpoints: &[&str]) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let cred = dir.join("companion.toml");
        std::fs::write(
            &cred,
            format!(
                "supi = \"{COMPANION_SUPI}\"\nk = \"{COMPANION_K}\"\nopc = \"{COMPANION_OPC}\"\n"
            ),
        )
        .unwrap();
        std::fs::set_permissions(&cred, std::fs::Permissions::from_mode(0o600)).unwrap();
        let list: Vec<String> = endpoints.iter().map(|e| format!("\"{e}\"")).collect();
        let config = dir.join("gatewayd.toml");
        std::fs::write(
            &config,
            format!(
                r#"state_dir = "{state}"
log_level = "info,gatewayd=debug"
drain_timeout = "5s"
[devices]
listen = "127.0.0.1:0"
max_connections = 4096
new_connections_per_ip = 0
[cn]
endpoints = [{list}]
server_name = "localhost"
ca_file = "{ca}"
sessions = {SESSIONS}
reconnect_min = "200ms"
reconnect_max = "2s"
request_timeout = "20s"
[companion]
credential_file = "{cred}"
[control]
socket = "{sock}"
[metrics]
listen = "127.0.0.1:0"
[filter]
mode = "userspace"
block_after_failures = 0
[batching]
max_batch = 16
max_in_flight = 4
"#,
                state = dir.join("state").display(),
                list = list.join(", "),
                ca = ca.display(),
                cred = cred.display(),
                sock = dir.join("control.sock").display(),
            ),
        )
        .unwrap();
        let ready = dir.join("ready.json");
        let log_path = dir.join("gatewayd.log");
        let log = std::fs::File::create(&log_path).unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_gatewayd"))
            .arg("--config")
            .arg(&config)
            .arg("--ready-file")
            .arg(&ready)
            .env_remove("RUST_LOG")
            .env_remove("NOTIFY_SOCKET")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let v = wait_json(&ready, &mut child, "gatewayd", Some(&log_path));
        Gateway {
            proc: Proc(child),
            devices: v["devices"].as_str().unwrap().to_string(),
            metrics: v["metrics"].as_str().unwrap().to_string(),
            control: PathBuf::from(v["control"].as_str().unwrap()),
        }
    }

    fn status(&self) -> serde_json::Value {
        let out = Command::new(env!("CARGO_BIN_EXE_gatewayctl"))
            .arg("--socket")
            .arg(&self.control)
            .args(["status", "--json"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    fn status_text(&self) -> String {
        let out = Command::new(env!("CARGO_BIN_EXE_gatewayctl"))
            .arg("--socket")
            .arg(&self.control)
            .arg("status")
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn metrics(&self) -> String {
        http_get(&self.metrics, "/metrics")
    }
}

fn wait_until(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let until = Instant::now() + limit;
    while !f() {
        assert!(Instant::now() < until, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Sessions per endpoint label, from `gatewayctl status --json`.
fn sessions_by_endpoint(status: &serde_json::Value) -> HashMap<String, usize> {
    let mut m = HashMap::new();
    for s in status["cn_sessions"].as_array().unwrap() {
        if s["state"] == "up" {
            *m.entry(s["endpoint"].as_str().unwrap().to_string())
                .or_default() += 1;
        }
    }
    m
}

#[test]
fn an_instance_killed_mid_run_loses_nothing_and_issues_nothing_twice() {
    let Some(srv) = pg::server() else { return };
    let url = srv.create_db();
    let tmp = tempfile::tempdir().unwrap();
    let cn_dir = tmp.path().join("cn");
    cn_cli(
        &cn_dir,
        &[
            "init",
            "--store",
            &url,
            "--mcc",
            "001",
            "--mnc",
            "01",
            "--server-name",
            "localhost",
        ],
    );
    cn_cli(
        &cn_dir,
        &[
            "subscriber",
            "add",
            "--supi",
            COMPANION_SUPI,
            "--k",
            COMPANION_K,
            "--opc",
            COMPANION_OPC,
            "--max-children",
            &(DEVICES + 50).to_string(),
        ],
    );
    let mut a = Instance::start(&cn_dir, "a");
    let b = Instance::start(&cn_dir, "b");
    let gw = Gateway::start(
        &tmp.path().join("gw"),
        &cn_dir.join("ca.pem"),
        &[&a.quic, &b.quic],
    );
    // The sessions spread over both instances.
    wait_until(
        "sessions on both endpoints",
        Duration::from_secs(30),
        || {
            let m = sessions_by_endpoint(&gw.status());
            m.get(&a.quic).copied().unwrap_or(0) == SESSIONS / 2
                && m.get(&b.quic).copied().unwrap_or(0) == SESSIONS / 2
        },
    );
    let before = gw.metrics();
    assert_eq!(
        series(
            &before,
            &format!("gatewayd_cn_sessions{{endpoint=\"{}\"}}", a.quic)
        ),
        (SESSIONS / 2) as f64,
        "{before}"
    );

    let report = tmp.path().join("report.json");
    let lg_log = std::fs::File::create(tmp.path().join("loadgen.log")).unwrap();
    let mut loadgen = Proc(
        Command::new(bin("loadgen"))
            .args([
                "provision",
                "--devices",
                &DEVICES.to_string(),
                "--concurrency",
                "48",
                "--gateway",
                &gw.devices,
                "--control-socket",
            ])
            .arg(&gw.control)
            .args([
                "--id-prefix",
                "fo",
                "--per-device",
                "--retry-for",
                "180",
                "--progress",
                "never",
                "--json",
            ])
            .arg(&report)
            .stdout(Stdio::null())
            .stderr(lg_log)
            .spawn()
            .unwrap(),
    );

    // Mid-run: a quarter of the devices issued and batches at the CN, then SIGKILL instance a.
    let mut db = srv.client(&url);
    let issued = |db: &mut postgres::Client| -> i64 {
        db.query_one("SELECT count(*) FROM children", &[])
            .unwrap()
            .get(0)
    };
    wait_until(
        "a quarter of the devices issued",
        Duration::from_secs(120),
        || issued(&mut db) >= (DEVICES / 4) as i64,
    );
    wait_until("batches in flight", Duration::from_secs(30), || {
        gw.status()["batching"]["batches_in_flight"]
            .as_u64()
            .unwrap_or(0)
            >= 2
    });
    let at_kill = issued(&mut db);
    a.kill9();
    let killed_at = Instant::now();

    let until = Instant::now() + Duration::from_secs(300);
    let status = loop {
        if let Some(st) = loadgen.0.try_wait().unwrap() {
            break st;
        }
        assert!(Instant::now() < until, "loadgen did not finish in 300 s");
        std::thread::sleep(Duration::from_millis(100));
    };
    let run_after_kill = killed_at.elapsed();
    let log = std::fs::read_to_string(tmp.path().join("loadgen.log")).unwrap_or_default();
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    let results = r["results"].as_array().unwrap();
    let received: HashMap<String, String> = results
        .iter()
        .filter_map(|d| {
            Some((
                d["device"].as_str()?.to_string(),
                d["supi"].as_str()?.to_string(),
            ))
        })
        .collect();

    // What the database issued, per device, and its idempotency ledger.
    let mut in_db: HashMap<String, Vec<String>> = HashMap::new();
    for row in db
        .query(
            "SELECT device_id, supi FROM children WHERE parent_supi = $1",
            &[&COMPANION_SUPI],
        )
        .unwrap()
    {
        in_db
            .entry(row.get::<_, String>(0))
            .or_default()
            .push(row.get(1));
    }
    let ledger: i64 = db
        .query_one(
            "SELECT count(*) FROM issuances WHERE parent_supi = $1",
            &[&COMPANION_SUPI],
        )
        .unwrap()
        .get(0);
    let children: usize = in_db.values().map(Vec::len).sum();
    let double_issued = in_db.values().filter(|v| v.len() > 1).count();
    let lost =
        results.len().max(DEVICES) - results.iter().filter(|d| d["provisioned"] == true).count();
    let mismatched = received
        .iter()
        .filter(|(dev, supi)| in_db.get(*dev).is_none_or(|v| v != &vec![(*supi).clone()]))
        .count();
    let m = gw.metrics();
    let resent = series(&m, "gatewayd_batches_resent_total");
    let a_failures = series(
        &m,
        &format!(
            "gatewayd_cn_endpoint_failures_total{{endpoint=\"{}\"}}",
            a.quic
        ),
    );
    let replayed = series(
        &http_get(&b.http, "/metrics"),
        "cn_backend_credentials_replayed_total",
    );
    eprintln!(
        "failover: {DEVICES} devices, {} succeeded, {} failed; instance a SIGKILLed after {at_kill} \
         issued; run finished {:.1}s after the kill; database: {children} children, {ledger} \
         ledger entries, {double_issued} devices issued twice, {lost} lost, {mismatched} \
         devices whose credential differs from the database's; gateway: {resent} batches resent \
         on another session, {a_failures} failures of endpoint a; instance b answered {replayed} \
         items from its idempotency ledger",
        r["succeeded"],
        r["failed"],
        run_after_kill.as_secs_f64(),
    );
    assert!(status.success(), "loadgen failed: {status}\n{log}\n{r}");
    assert_eq!(r["succeeded"], DEVICES as u64, "{r}");
    assert_eq!(lost, 0, "lost devices: {r}");
    assert_eq!(double_issued, 0, "devices issued twice: {in_db:?}");
    assert_eq!(children, DEVICES, "one child per device, no more");
    assert_eq!(
        ledger, DEVICES as i64,
        "one ledger entry (request ID) per device"
    );
    assert_eq!(received.len(), DEVICES);
    assert_eq!(mismatched, 0, "devices got what the database issued");
    // The kill was noticed and the sessions moved: every session is up on instance b.
    assert!(a_failures >= 1.0, "{m}");
    wait_until("all sessions on b", Duration::from_secs(20), || {
        sessions_by_endpoint(&gw.status()) == HashMap::from([(b.quic.clone(), SESSIONS)])
    });
    let st = gw.status();
    let ep_a = st["cn_endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["endpoint"] == a.quic.as_str())
        .unwrap();
    assert!(ep_a["failures"].as_u64().unwrap() >= 1, "{st}");
    assert_eq!(st["requests_outstanding"], 0, "{st}");
    let text = gw.status_text();
    assert!(
        text.contains(&format!("CN session 0           up {}", b.quic)),
        "{text}"
    );
    let m = gw.metrics();
    assert_eq!(
        series(
            &m,
            &format!("gatewayd_cn_sessions{{endpoint=\"{}\"}}", b.quic)
        ),
        SESSIONS as f64
    );
    assert_eq!(
        series(
            &m,
            &format!("gatewayd_cn_sessions{{endpoint=\"{}\"}}", a.quic)
        ),
        0.0
    );

    // Instance a comes back on its address: once its backoff has ended, sessions move back one
    // at a time (a new session is authenticated before the old one is let go) until the spread
    // is even again.
    let back = Instance::start_at(&cn_dir, "a2", &a.quic);
    assert_eq!(back.quic, a.quic);
    let t = Instant::now();
    wait_until("sessions spread again", Duration::from_secs(30), || {
        sessions_by_endpoint(&gw.status())
            == HashMap::from([
                (a.quic.clone(), SESSIONS / 2),
                (b.quic.clone(), SESSIONS / 2),
            ])
    });
    eprintln!(
        "failover: instance a restarted; sessions spread 2/2 again after {:.1}s",
        t.elapsed().as_secs_f64()
    );
    let st = gw.status();
    assert_eq!(st["cn_link"], "up", "{st}");
    drop(gw.proc);
}
