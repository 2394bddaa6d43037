//! Recovery suite: how fast provisioning resumes when cn-backend restarts, and what a run that
//! suffers many such restarts costs its devices.
//!
//! 1. **Without faults**: `loadgen provision` of N devices through gatewayd — the baseline
//!    percentiles, and the devices that gave up waiting (`timeout` retries), which must be none
//!    when gatewayd keeps its `Pending` promise.
//! 2. **With CN kills**: the same run while cn-backend is SIGKILLed and restarted (same data
//!    directory, same QUIC port) K times at random moments. For each restart the suite measures
//!    the time from the new process being ready to its first issued credential (its
//!    `cn_backend_credentials_issued_total` starts at 0, polled every 2 ms): that is the
//!    gateway noticing the restart (the stateless reset), reconnecting, authenticating (AKA) and
//!    resending the lost batch. Then the run's percentiles and retries, next to the baseline.
//!
//! Target (issue #13): a CN restart → the next issued credential ≤ 2 s (it was ≈ 60 s while the
//! gateway waited for an idle timeout).

use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::json;

use super::harness::{Cn, Gateway, GatewaySettings, LoadgenFigures, loadgen_json, tail};
use super::provisioning::http_get;
use super::{Env, SuiteReport, Target, round};

/// Restart → first credential must stay under this.
const RECOVERY_TARGET: Duration = Duration::from_secs(2);

/// One run's figures.
type RunFigures = LoadgenFigures;

fn loadgen_args(
    gw: &Gateway,
    devices: u64,
    concurrency: u64,
    prefix: &str,
) -> anyhow::Result<Vec<String>> {
    gw.loadgen_args(
        "provision",
        devices,
        concurrency,
        prefix,
        &["--retry-for", "300"],
    )
}

/// The CN's `cn_backend_credentials_issued_total`, or `None` while it does not answer.
fn issued(http: &str) -> Option<f64> {
    let text = http_get(http, "/metrics").ok()?;
    text.lines()
        .find(|l| l.starts_with("cn_backend_credentials_issued_total "))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// A uniformly random duration in [lo, hi).
fn random_between(lo: Duration, hi: Duration) -> Duration {
    use std::hash::BuildHasher;
    let r = std::collections::hash_map::RandomState::new().hash_one(Instant::now());
    let span = hi.saturating_sub(lo).as_millis().max(1) as u64;
    lo + Duration::from_millis(r % span)
}

/// Runs the recovery suite.
pub fn run(env: &Env) -> anyhow::Result<SuiteReport> {
    // Quick mode: fewer devices in flight, so the run lasts several batches and both kills land
    // inside it on any machine.
    let (devices, kills, concurrency): (u64, usize, u64) = if env.quick {
        (400, 2, 32)
    } else {
        (3000, 30, 256)
    };
    let baseline_devices: u64 = if env.quick { 200 } else { 2000 };
    let dir = env.scratch("recovery")?;

    // 1. Without faults.
    let base_dir = dir.join("baseline");
    let cn = Cn::start(&env.bins, &base_dir, baseline_devices + 100)?;
    let gw = Gateway::start(
        &env.bins,
        &base_dir.join("gw"),
        &cn,
        &GatewaySettings::default(),
    )?;
    let rep = loadgen_json(
        &env.bins,
        &base_dir,
        &loadgen_args(&gw, baseline_devices, concurrency, "rb")?,
    )?;
    let baseline = LoadgenFigures::of(&rep);
    let gw_metrics = gw.daemon.ready_str("metrics")?;
    let base_giveups = giveups(&gw_metrics);
    drop(gw);
    drop(cn);

    // 2. With K CN kills.
    let kill_dir = dir.join("kills");
    let mut cn = Cn::start(&env.bins, &kill_dir, devices + 100)?;
    let gw = Gateway::start(
        &env.bins,
        &kill_dir.join("gw"),
        &cn,
        &GatewaySettings::default(),
    )?;
    let report = kill_dir.join("loadgen.json");
    let mut lg: Child = env
        .bins
        .command("loadgen")
        .args(loadgen_args(&gw, devices, concurrency, "rk")?)
        .arg("--json")
        .arg(&report)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(
            std::fs::File::create(kill_dir.join("loadgen.log")).context("creating loadgen.log")?,
        )
        .spawn()
        .context("starting loadgen")?;
    let mut recoveries_ms: Vec<f64> = Vec::new();
    let mut unrecovered = 0usize;
    let result = (|| -> anyhow::Result<()> {
        // Wait for the run to be under way.
        wait_issued(
            &cn.daemon.ready_str("http")?,
            1.0,
            &mut lg,
            Duration::from_secs(60),
        )?;
        for k in 0..kills {
            // The first kill as soon as the CN has issued something (so a quick run cannot end
            // before it), the next ones at random moments after each recovery.
            if k > 0 {
                std::thread::sleep(random_between(
                    Duration::from_millis(10),
                    Duration::from_millis(60),
                ));
            }
            if lg.try_wait()?.is_some() {
                break;
            }
            let ready_at = cn.kill9_and_restart(&env.bins)?;
            let http = cn.daemon.ready_str("http")?;
            match wait_first_credential(&http, &mut lg, Duration::from_secs(120))? {
                Some(at) => recoveries_ms.push(round(
                    at.saturating_duration_since(ready_at).as_secs_f64() * 1000.0,
                    1,
                )),
                // loadgen finished before the restarted CN had anything left to issue.
                None => {
                    unrecovered += 1;
                    break;
                }
            }
        }
        Ok(())
    })();
    let until = Instant::now() + Duration::from_secs(600);
    while lg.try_wait()?.is_none() {
        if Instant::now() > until {
            let _ = lg.kill();
            anyhow::bail!("loadgen did not finish within 10 minutes of the last CN restart");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    result?;
    let text = std::fs::read_to_string(&report).with_context(|| {
        format!(
            "loadgen wrote no report; its log:\n{}",
            tail(&kill_dir.join("loadgen.log"), 20)
        )
    })?;
    let faulted =
        LoadgenFigures::of(&serde_json::from_str(&text).context("parsing loadgen's report")?);
    let gw_metrics = gw.daemon.ready_str("metrics")?;
    let losses = link_losses(&gw_metrics);
    let kill_giveups = giveups(&gw_metrics);
    drop(gw);
    drop(cn);

    anyhow::ensure!(
        !recoveries_ms.is_empty(),
        "no CN restart was measured (loadgen finished too soon)"
    );
    let mut sorted = recoveries_ms.clone();
    sorted.sort_by(f64::total_cmp);
    let median = sorted[sorted.len() / 2];
    let max = sorted[sorted.len() - 1];
    let target = Target {
        goal: format!(
            "a CN restart → the next issued credential ≤ {} s",
            RECOVERY_TARGET.as_secs()
        ),
        measured: format!(
            "median {median:.0} ms, max {max:.0} ms over {} restarts during a {devices}-device run",
            sorted.len()
        ),
        holds: max <= RECOVERY_TARGET.as_secs_f64() * 1000.0,
    };
    let markdown = markdown(
        &baseline,
        &faulted,
        &sorted,
        &losses,
        base_giveups,
        kill_giveups,
    );
    Ok(SuiteReport {
        name: "recovery",
        data: json!({
            "baseline": baseline,
            "with_kills": faulted,
            "cn_restarts": sorted.len(),
            "restart_to_first_credential_ms": recoveries_ms,
            "restart_to_first_credential_median_ms": median,
            "restart_to_first_credential_max_ms": max,
            "restarts_without_anything_left_to_issue": unrecovered,
            "gateway_cn_link_losses": losses,
            "gateway_device_giveups": { "baseline": base_giveups, "with_kills": kill_giveups },
        }),
        markdown,
        targets: vec![target],
    })
}

/// Waits until the CN at `http` reports at least `n` issued credentials.
fn wait_issued(http: &str, n: f64, lg: &mut Child, limit: Duration) -> anyhow::Result<()> {
    let until = Instant::now() + limit;
    while issued(http).unwrap_or(0.0) < n {
        anyhow::ensure!(
            lg.try_wait()?.is_none(),
            "loadgen ended before the CN issued anything"
        );
        anyhow::ensure!(Instant::now() < until, "the CN issued nothing in {limit:?}");
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

/// The instant the restarted CN at `http` issued its first credential; `None` if loadgen ended
/// first.
fn wait_first_credential(
    http: &str,
    lg: &mut Child,
    limit: Duration,
) -> anyhow::Result<Option<Instant>> {
    let until = Instant::now() + limit;
    loop {
        if issued(http).unwrap_or(0.0) >= 1.0 {
            return Ok(Some(Instant::now()));
        }
        if lg.try_wait()?.is_some() {
            return Ok(None);
        }
        anyhow::ensure!(
            Instant::now() < until,
            "the restarted CN issued nothing in {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn counter_by_reason(metrics_addr: &str, name: &str) -> serde_json::Value {
    let Ok(text) = http_get(metrics_addr, "/metrics") else {
        return json!(null);
    };
    let prefix = format!("{name}{{reason=\"");
    let mut m = serde_json::Map::new();
    for l in text.lines().filter(|l| l.starts_with(&prefix)) {
        let rest = &l[prefix.len()..];
        if let (Some((reason, _)), Some(v)) = (rest.split_once('"'), l.rsplit(' ').next())
            && let Ok(v) = v.parse::<f64>()
        {
            m.insert(reason.to_string(), json!(v as u64));
        }
    }
    serde_json::Value::Object(m)
}

fn link_losses(metrics_addr: &str) -> serde_json::Value {
    counter_by_reason(metrics_addr, "gatewayd_cn_link_losses_total")
}

fn giveups(metrics_addr: &str) -> u64 {
    counter_by_reason(metrics_addr, "gatewayd_device_giveups_total")
        .as_object()
        .map_or(0, |m| m.values().filter_map(|v| v.as_u64()).sum())
}

fn markdown(
    base: &RunFigures,
    kills: &RunFigures,
    recoveries: &[f64],
    losses: &serde_json::Value,
    base_giveups: u64,
    kill_giveups: u64,
) -> String {
    let retries = |v: &serde_json::Value| {
        v.as_object()
            .filter(|m| !m.is_empty())
            .map_or("none".to_string(), |m| {
                m.iter()
                    .map(|(k, v)| format!("{k} {v}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            })
    };
    let row = |name: &str, r: &RunFigures, giveups: u64| {
        format!(
            "| {name} | {}/{} | {:.1} | {:.0} | {:.0} | {:.0} | {:.0} | {} | {giveups} |\n",
            r.succeeded,
            r.devices,
            r.duration_s,
            r.p50_ms,
            r.p90_ms,
            r.p99_ms,
            r.max_ms,
            retries(&r.retries_by_reason)
        )
    };
    let median = recoveries[recoveries.len() / 2];
    let max = recoveries[recoveries.len() - 1];
    let mut md = String::from("### Recovery: cn-backend restarts under load\n\n");
    md.push_str(
        "`loadgen provision` (concurrency 256; 32 in quick mode) through gatewayd, first without faults, then while \
         cn-backend is SIGKILLed and restarted on the same data directory and port at random \
         moments. *Restart → credential* is the time from the new process being ready to its \
         first issued credential: the gateway's next packet draws a stateless reset, it \
         reconnects, authenticates (AKA) and resends the batch lost with the old session.\n\n",
    );
    md.push_str(
        "| run | ok | wall s | p50 ms | p90 ms | p99 ms | max ms | device retries | give-ups at gatewayd |\n\
         |---|---|---|---|---|---|---|---|---|\n",
    );
    md.push_str(&row("no faults", base, base_giveups));
    md.push_str(&row(
        &format!("{} CN kills", recoveries.len()),
        kills,
        kill_giveups,
    ));
    md.push_str(&format!(
        "\nRestart → next issued credential over {} restarts: median {median:.0} ms, max \
         {max:.0} ms. gatewayd's CN sessions lost, by reason: {}.\n",
        recoveries.len(),
        retries(losses)
    ));
    md
}
