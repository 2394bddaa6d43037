//! Monitoring: `monitoring/prometheus/rules.yml` checked and unit-tested with promtool; the real
//! daemons' `/metrics` (after a device was provisioned and attached) passing `promtool check
//! metrics`; every metric name the rules and the Grafana dashboard use exists in that output; a
//! real Prometheus server scraping both daemons and answering a provisioning counter through its
//! HTTP API (with the rules loaded).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeSet;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use deploy_tests::{
    Cn, Gw, Proc, Runner, exposed_names, free_port, http_get, provision_device, repo, tool,
    url_encode,
};
use serde_json::Value;

fn rules() -> std::path::PathBuf {
    repo().join("monitoring/prometheus/rules.yml")
}

#[test]
fn rules_pass_promtool_check_and_unit_tests() {
    let Some(promtool) = tool("promtool", "prometheus") else {
        return;
    };
    let out = Command::new(&promtool)
        .args(["check", "rules"])
        .arg(rules())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "promtool check rules: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new(&promtool)
        .args(["test", "rules"])
        .arg(repo().join("monitoring/prometheus/rules_test.yml"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "promtool test rules: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CN and a gateway with one device provisioned and attached, so that every labelled series
/// (AKA outcomes, attach outcomes, operations, histograms) has appeared.
struct Stack {
    _tmp: tempfile::TempDir,
    cn: Cn,
    gw: Gw,
}

fn stack() -> Stack {
    let tmp = tempfile::tempdir().unwrap();
    let cn = Cn::start(&tmp.path().join("cn"), 10, &[]);
    let runner = Runner::native();
    let gw = Gw::start(&tmp.path().join("gw"), &cn, &runner);
    provision_device(tmp.path(), &gw, &runner, "watch-01");
    Stack { _tmp: tmp, cn, gw }
}

fn check_metrics(promtool: &Path, what: &str, text: &str) {
    let mut child = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // promtool exits non-zero on parse errors and on lint problems (missing HELP, bad suffixes,
    // non-base units...), printing each.
    assert!(
        out.status.success() && said.trim().is_empty(),
        "promtool check metrics on {what}'s /metrics:\n{said}"
    );
}

/// Metric names in PromQL expressions: identifiers starting with a daemon prefix.
fn names_in(expr: &str, out: &mut BTreeSet<String>) {
    let bytes = expr.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let rest = &expr[i..];
        let boundary = i == 0
            || !(bytes[i - 1].is_ascii_alphanumeric()
                || bytes[i - 1] == b'_'
                || bytes[i - 1] == b':');
        if boundary && (rest.starts_with("gatewayd_") || rest.starts_with("cn_backend_")) {
            let end = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(rest.len());
            out.insert(rest[..end].to_string());
            i += end;
        } else {
            i += 1;
        }
    }
}

fn rule_exprs() -> Vec<String> {
    let text = std::fs::read_to_string(rules()).unwrap();
    // The rules file is YAML; its expressions are either `expr: ...` on one line or a folded
    // block (`expr: >`) continuing on the more-indented lines below.
    let mut exprs = Vec::new();
    let mut lines = text.lines().peekable();
    while let Some(line) = lines.next() {
        let Some(rest) = line.trim_start().strip_prefix("expr:") else {
            continue;
        };
        let indent = line.len() - line.trim_start().len();
        let mut e = rest.trim().trim_start_matches(['>', '|']).to_string();
        while let Some(next) = lines.peek() {
            let ni = next.len() - next.trim_start().len();
            if next.trim().is_empty() || ni <= indent {
                break;
            }
            e.push(' ');
            e.push_str(next.trim());
            lines.next();
        }
        exprs.push(e);
    }
    exprs
}

fn dashboard_exprs() -> Vec<String> {
    let v: Value = serde_json::from_str(
        &std::fs::read_to_string(repo().join("monitoring/grafana/companion.json")).unwrap(),
    )
    .unwrap();
    let mut out = Vec::new();
    fn walk(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Object(m) => {
                for (k, x) in m {
                    if (k == "expr" || k == "query" || k == "definition")
                        && let Some(s) = x.as_str()
                    {
                        out.push(s.to_string());
                    }
                    walk(x, out);
                }
            }
            Value::Array(a) => a.iter().for_each(|x| walk(x, out)),
            _ => {}
        }
    }
    walk(&v, &mut out);
    out
}

#[test]
fn live_metrics_pass_promtool_and_cover_the_rules_and_the_dashboard() {
    let s = stack();
    let gw_text = s.gw.scrape();
    let (status, cn_text) = http_get(&s.cn.http, "/metrics").unwrap();
    assert_eq!(status, 200);

    if let Some(promtool) = tool("promtool", "prometheus") {
        check_metrics(&promtool, "gatewayd", &gw_text);
        check_metrics(&promtool, "cn-backend", &cn_text);
    }

    let mut exposed = exposed_names(&gw_text);
    exposed.extend(exposed_names(&cn_text));
    let exprs = rule_exprs();
    assert!(
        exprs.len() >= 20,
        "expressions not found in rules.yml: {exprs:?}"
    );
    let dash = dashboard_exprs();
    assert!(
        dash.len() >= 30,
        "expressions not found in the dashboard: {dash:?}"
    );
    let mut used = BTreeSet::new();
    for e in exprs.iter().chain(&dash) {
        names_in(e, &mut used);
    }
    let missing: Vec<&String> = used.iter().filter(|n| !exposed.contains(*n)).collect();
    assert!(
        missing.is_empty(),
        "metric names used in rules.yml/companion.json but not exported by the daemons: \
         {missing:?}\nexported: {exposed:?}"
    );
    // And the dashboard covers both daemons' main families.
    for family in [
        "gatewayd_requests_total",
        "gatewayd_request_duration_seconds_bucket",
        "gatewayd_cn_link_state",
        "gatewayd_filter_packets_total",
        "gatewayd_credentials_expiring_24h",
        "cn_backend_credentials_issued_total",
        "cn_backend_quota_rejections_total",
        "cn_backend_aka_outcomes_total",
        "cn_backend_tx_commit_seconds_bucket",
        "cn_backend_gateway_sessions_active",
    ] {
        assert!(
            dash.iter().any(|e| e.contains(family)),
            "the dashboard does not show {family}"
        );
    }
    // The device provisioned: the counters say so.
    assert!(
        gw_text.contains("gatewayd_requests_total{kind=\"provision\",outcome=\"issued\"} 1"),
        "{gw_text}"
    );
    assert!(
        cn_text.contains("cn_backend_credentials_issued_total 1"),
        "{cn_text}"
    );
}

fn prom_query(addr: &str, q: &str) -> Value {
    let (status, body) = http_get(addr, &format!("/api/v1/query?query={}", url_encode(q))).unwrap();
    assert_eq!(status, 200, "{q}: {body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["status"], "success", "{v}");
    v
}

fn first_value(v: &Value) -> Option<f64> {
    v["data"]["result"][0]["value"][1]
        .as_str()
        .and_then(|s| s.parse().ok())
}

#[test]
fn a_real_prometheus_scrapes_both_daemons() {
    let Some(prometheus) = tool("prometheus", "prometheus") else {
        return;
    };
    let s = stack();
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(rules(), dir.path().join("rules.yml")).unwrap();
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             rule_files: [rules.yml]\n\
             scrape_configs:\n\
             \x20 - job_name: gatewayd\n    static_configs: [{{targets: ['{gw}']}}]\n\
             \x20 - job_name: cn-backend\n    static_configs: [{{targets: ['{cn}']}}]\n",
            gw = s.gw.metrics,
            cn = s.cn.http
        ),
    )
    .unwrap();
    let addr = format!("127.0.0.1:{}", free_port());
    let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
    let _prom = Proc::new(
        "prometheus",
        Command::new(prometheus)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
        Some(&dir.path().join("prometheus.log")),
    );
    let log_text =
        || std::fs::read_to_string(dir.path().join("prometheus.log")).unwrap_or_default();
    let until = Instant::now() + Duration::from_secs(60);
    let wait = |q: &str, want: f64| loop {
        if let Ok((200, _)) = http_get(&addr, "/-/ready") {
            let v = prom_query(&addr, q);
            if first_value(&v) == Some(want) {
                return v;
            }
        }
        assert!(
            Instant::now() < until,
            "Prometheus never answered {q} = {want}; log:\n{}",
            log_text()
        );
        std::thread::sleep(Duration::from_millis(250));
    };
    wait(r#"up{job="gatewayd"}"#, 1.0);
    wait(r#"up{job="cn-backend"}"#, 1.0);
    // The provisioning counters, read back through the HTTP API.
    let v = wait(
        r#"cn_backend_credentials_issued_total{job="cn-backend"}"#,
        1.0,
    );
    assert_eq!(
        v["data"]["result"][0]["metric"]["instance"],
        s.cn.http.as_str()
    );
    wait(
        r#"gatewayd_requests_total{job="gatewayd",kind="provision",outcome="issued"}"#,
        1.0,
    );
    wait(r#"gatewayd_cn_link_state{job="gatewayd"}"#, 2.0);
    // The rules loaded and evaluate in a real server; none of them is broken.
    let (status, body) = http_get(&addr, "/api/v1/rules").unwrap();
    assert_eq!(status, 200);
    let r: Value = serde_json::from_str(&body).unwrap();
    let groups = r["data"]["groups"].as_array().unwrap();
    assert_eq!(groups.len(), 2, "{r}");
    // The recording group runs every 30 s: its first evaluation comes within 30 s.
    let until = Instant::now() + Duration::from_secs(45);
    loop {
        let (_, body) = http_get(&addr, "/api/v1/rules").unwrap();
        let r: Value = serde_json::from_str(&body).unwrap();
        let rules: Vec<&Value> = r["data"]["groups"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|g| g["rules"].as_array().unwrap())
            .collect();
        let bad: Vec<&&Value> = rules.iter().filter(|r| r["health"] == "err").collect();
        assert!(bad.is_empty(), "rules failing in Prometheus: {bad:?}");
        if rules.iter().all(|r| r["health"] == "ok") {
            break;
        }
        assert!(Instant::now() < until, "rules not evaluated: {r}");
        std::thread::sleep(Duration::from_millis(250));
    }
    // No alert fires on this healthy pair.
    let v = prom_query(&addr, r#"ALERTS{alertstate="firing"}"#);
    assert_eq!(v["data"]["result"], serde_json::json!([]), "{v}");
}
