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
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use companion_testkit::{CnServer, cn, gateway};

mod common;
use common::*;

#[path = "../../cn-backend/tests/pg/mod.rs"]
mod pg;

const DEVICES: usize = 300;
const SESSIONS: usize = 4;

/// One `cn-backend serve` of the fleet (the data directory, so the KEK and the TLS identity,
/// is shared; the database is named in its cn-backend.toml), listening on `listen`.
fn instance(dir: &Path, name: &str, listen: &str) -> CnServer {
    let ready = dir.join(format!("ready-{name}.json"));
    let log = dir.join(format!("cn-{name}.log"));
    let mut s = CnServer::serve(&bins(), dir, listen, &ready, &log).unwrap();
    s.proc.name = format!("cn-backend {name}");
    s
}

/// The value of the series starting with `prefix` (name and labels), 0 when absent.
fn series(text: &str, prefix: &str) -> f64 {
    http::sum(text, prefix)
}

/// gatewayd with both instances' endpoints, `SESSIONS` sessions spread over them.
fn gateway(dir: &Path, ca: &Path, endpoints: &[&str]) -> Gatewayd {
    let mut toml = gw_toml(dir, endpoints[0], ca.parent().unwrap());
    toml.endpoints = endpoints.iter().map(|e| (*e).to_owned()).collect();
    toml.devices = "max_connections = 4096\nnew_connections_per_ip = 0";
    let cn = format!(
        "sessions = {SESSIONS}\nreconnect_min = \"200ms\"\nreconnect_max = \"2s\"\n\
         request_timeout = \"20s\""
    );
    toml.cn = &cn;
    toml.tables = "[filter]\nmode = \"userspace\"\nblock_after_failures = 0\n\
                   [batching]\nmax_batch = 16\nmax_in_flight = 4";
    spawn_gw(&toml, None, &[])
}

/// `gatewayctl status` (the text) of `gw`.
fn status_text(gw: &Gatewayd) -> String {
    gateway::ctl(&bins(), &gw.control, &["status"])
        .unwrap()
        .stdout
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
    let tmp = scratch();
    let cn_dir = tmp.path().join("cn");
    let bins = bins();
    cn::init(
        &bins,
        &cn_dir,
        &["--store", &url, "--server-name", "localhost"],
    )
    .unwrap();
    let max_children = (DEVICES + 50).to_string();
    cn::add_companion(&bins, &cn_dir, &["--max-children", &max_children]).unwrap();
    let mut a = instance(&cn_dir, "a", "127.0.0.1:0");
    let b = instance(&cn_dir, "b", "127.0.0.1:0");
    let gw = gateway(
        &tmp.path().join("gw"),
        &cn_dir.join("ca.pem"),
        &[&a.quic, &b.quic],
    );
    // The sessions spread over both instances.
    wait_until(
        "sessions on both endpoints",
        Duration::from_secs(30),
        || {
            let m = sessions_by_endpoint(&ctl_status(&gw.control));
            m.get(&a.quic).copied().unwrap_or(0) == SESSIONS / 2
                && m.get(&b.quic).copied().unwrap_or(0) == SESSIONS / 2
        },
    );
    let before = http::get_ok(&gw.metrics, "/metrics");
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
    let mut loadgen = Proc::new(
        "loadgen",
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
        Some(&tmp.path().join("loadgen.log")),
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
        ctl_status(&gw.control)["batching"]["batches_in_flight"]
            .as_u64()
            .unwrap_or(0)
            >= 2
    });
    let at_kill = issued(&mut db);
    a.proc.kill9();
    let killed_at = Instant::now();

    let until = Instant::now() + Duration::from_secs(300);
    let status = loop {
        if let Some(st) = loadgen.child.try_wait().unwrap() {
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
    let m = http::get_ok(&gw.metrics, "/metrics");
    let resent = series(&m, "gatewayd_batches_resent_total");
    let a_failures = series(
        &m,
        &format!(
            "gatewayd_cn_endpoint_failures_total{{endpoint=\"{}\"}}",
            a.quic
        ),
    );
    let replayed = series(
        &http::get_ok(&b.http, "/metrics"),
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
        sessions_by_endpoint(&ctl_status(&gw.control))
            == HashMap::from([(b.quic.clone(), SESSIONS)])
    });
    let st = ctl_status(&gw.control);
    let ep_a = st["cn_endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["endpoint"] == a.quic.as_str())
        .unwrap();
    assert!(ep_a["failures"].as_u64().unwrap() >= 1, "{st}");
    assert_eq!(st["requests_outstanding"], 0, "{st}");
    let text = status_text(&gw);
    assert!(
        text.contains(&format!("CN session 0           up {}", b.quic)),
        "{text}"
    );
    let m = http::get_ok(&gw.metrics, "/metrics");
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
    let back = instance(&cn_dir, "a2", &a.quic);
    assert_eq!(back.quic, a.quic);
    let t = Instant::now();
    wait_until("sessions spread again", Duration::from_secs(30), || {
        sessions_by_endpoint(&ctl_status(&gw.control))
            == HashMap::from([
                (a.quic.clone(), SESSIONS / 2),
                (b.quic.clone(), SESSIONS / 2),
            ])
    });
    eprintln!(
        "failover: instance a restarted; sessions spread 2/2 again after {:.1}s",
        t.elapsed().as_secs_f64()
    );
    let st = ctl_status(&gw.control);
    assert_eq!(st["cn_link"], "up", "{st}");
    drop(gw.proc);
}
