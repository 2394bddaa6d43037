//! `loadgen provision`: N simulated devices through the real device flow.
//!
//! 1-2. [`Fleet::prepare`]: waits for gatewayd's CN link, reads the gateway's key fingerprint
//!    (pinned by every simulated device), creates N devices, each with its own P-256 identity
//!    key, and pairs them in bulk over the control socket.
//! 3. Runs at most C devices at once, sharing a few quinn client endpoints: the `iotdev` library's
//!    provisioning (request, `Pending`, sealed delivery opened with the device's HPKE key and
//!    checked for this device and request, acknowledgement), retrying retryable answers (busy,
//!    CN unavailable, connection lost) after their retry-after with the same request ID,
//!    bounded in count and time; with `--attach`, then a 5G AKA attach at the CN with the new
//!    credential (`iotdev::attach`, i.e. `companion_transport::attach_client`).
//! 4. Records each device's latency in HDR histograms and reports.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use companion_proto::msg::Params;
use companion_transport::cn_client;
use iotdev::attach::{self, AttachError};
use iotdev::client::{self, Attempt, ClientOptions};
use iotdev::{DeviceError, DeviceKeys};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::fleet::{Fleet, Load, client_endpoints, progress_bar};
use crate::report::{DeviceResult, Recorder, Report};

/// What `loadgen provision` does.
#[derive(Debug, Clone)]
pub struct Options {
    /// The devices, how many at once, and the gateway they go to.
    pub load: Load,
    /// After provisioning, attach at the CN with the new credential.
    pub attach: bool,
    /// The serving network name the devices attach in.
    pub serving_network: String,
    /// Longest a device keeps retrying retryable failures (per phase).
    pub retry_for: Duration,
    /// Most retries per device and phase.
    pub max_retries: u32,
    /// Include every device's outcome in the report.
    pub per_device: bool,
    /// The parameters every device asks for.
    pub params: Params,
    /// Longest single exchange with the gateway.
    pub patience: Duration,
}

/// A stable name for a provisioning failure.
pub fn reason(e: &DeviceError) -> String {
    match e {
        DeviceError::NotPaired(_) => "not_paired".into(),
        DeviceError::QuotaExhausted(_) => "quota_exhausted".into(),
        DeviceError::PolicyDenied(_) => "policy_denied".into(),
        DeviceError::Busy { .. } => "busy".into(),
        DeviceError::CnUnavailable { .. } => "cn_unavailable".into(),
        DeviceError::Expired => "credential_expired".into(),
        DeviceError::Revoked(_) => "credential_revoked".into(),
        DeviceError::NotFound(_) => "not_found".into(),
        DeviceError::GatewayUnreachable { .. } => "gateway_unreachable".into(),
        DeviceError::GatewayKeyChanged { .. } => "gateway_key_changed".into(),
        DeviceError::Timeout(_) => "timeout".into(),
        DeviceError::CredentialUnusable(_) => "credential_unusable".into(),
        DeviceError::ConnectionLost(_) => "connection_lost".into(),
        DeviceError::GatewayRestarted => "gateway_restarted".into(),
        DeviceError::Gateway { code, .. } => code.name().into(),
        DeviceError::Protocol(_) => "protocol".into(),
        DeviceError::Local(_) => "local".into(),
    }
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

struct Outcome {
    result: DeviceResult,
    provision_latency: Option<Duration>,
    attach_latency: Option<Duration>,
    retries: Vec<String>,
}

/// Runs the whole load and returns the report.
pub async fn run(opts: Options) -> anyhow::Result<Report> {
    anyhow::ensure!(
        opts.load.concurrency > 0,
        "--concurrency must be at least 1"
    );
    let fleet = Fleet::prepare(&opts.load.fleet(true, true)).await?;
    let (keys, pairing_s) = (fleet.keys.clone(), fleet.pairing_s);
    let endpoints = client_endpoints(opts.load.gateway, opts.load.endpoints)?;

    let bar = progress_bar(opts.load.progress, opts.load.devices as u64, "provisioning");
    let sem = Arc::new(Semaphore::new(opts.load.concurrency));
    let opts = Arc::new(opts);
    let started = Instant::now();
    let mut tasks = JoinSet::new();
    for (i, _) in keys.iter().enumerate() {
        let (keys, opts, sem, bar) = (keys.clone(), opts.clone(), sem.clone(), bar.clone());
        let ep = endpoints[i % endpoints.len()].clone();
        tasks.spawn(async move {
            let _permit = sem.acquire_owned().await;
            let out = one_device(&ep, &keys[i], &opts).await;
            bar.inc(1);
            out
        });
    }
    let mut prov = Recorder::new().context("latency histogram")?;
    let mut att = Recorder::new().context("latency histogram")?;
    let mut failures: BTreeMap<String, u64> = BTreeMap::new();
    let mut retries: BTreeMap<String, u64> = BTreeMap::new();
    let mut results = Vec::with_capacity(opts.load.devices);
    let (mut ok, mut attached) = (0u64, 0u64);
    while let Some(r) = tasks.join_next().await {
        let o = r.context("device task")?;
        for why in &o.retries {
            *retries.entry(why.clone()).or_default() += 1;
        }
        if let Some(d) = o.provision_latency {
            prov.record(d);
            ok += 1;
        }
        if let Some(d) = o.attach_latency {
            att.record(d);
            attached += 1;
        }
        if let Some(why) = &o.result.reason {
            *failures.entry(why.clone()).or_default() += 1;
        }
        bar.set_message(format!(
            "ok {ok}, failed {}, retries {}",
            failures.values().sum::<u64>(),
            retries.values().sum::<u64>()
        ));
        results.push(o.result);
    }
    let duration = started.elapsed();
    bar.finish_and_clear();
    for ep in &endpoints {
        ep.close(0u32.into(), b"done");
    }
    results.sort_by(|a, b| a.device.cmp(&b.device));
    let failed = results.iter().filter(|r| r.reason.is_some()).count() as u64;
    let duration_s = duration.as_secs_f64();
    Ok(Report {
        devices: opts.load.devices as u64,
        concurrency: opts.load.concurrency as u64,
        succeeded: results.iter().filter(|r| r.reason.is_none()).count() as u64,
        failed,
        duration_s: (duration_s * 1000.0).round() / 1000.0,
        throughput_per_s: if duration_s > 0.0 {
            ((ok as f64 / duration_s) * 10.0).round() / 10.0
        } else {
            0.0
        },
        latency_ms: prov.latency(),
        attach: opts.attach,
        attaches_succeeded: attached,
        attach_latency_ms: att.latency(),
        pairing_s,
        failures_by_reason: failures,
        retries_by_reason: retries,
        gateway: opts.load.gateway.to_string(),
        results: opts.per_device.then_some(results),
    })
}

/// One simulated device: provision (with retries), check, optionally attach (with retries).
async fn one_device(ep: &quinn::Endpoint, keys: &DeviceKeys, opts: &Options) -> Outcome {
    let mut out = Outcome {
        result: DeviceResult {
            device: keys.device_id.to_string(),
            provisioned: false,
            supi: None,
            attached: None,
            reason: None,
            error: None,
            retryable: false,
            retries: 0,
        },
        provision_latency: None,
        attach_latency: None,
        retries: Vec::new(),
    };
    let fail = |out: &mut Outcome, why: String, msg: String, retryable: bool| {
        out.result.reason = Some(why);
        out.result.error = Some(msg);
        out.result.retryable = retryable;
    };
    let attempt = match Attempt::provision(opts.params.clone()) {
        Ok(a) => a,
        Err(e) => {
            fail(&mut out, reason(&e), e.to_string(), false);
            return out;
        }
    };
    let copts = ClientOptions {
        patience: opts.patience,
        ..ClientOptions::default()
    };
    let started = Instant::now();
    let cred = loop {
        match client::run(ep, opts.load.gateway, keys, &attempt, &copts).await {
            Ok(c) => break c,
            Err(e) => {
                let why = reason(&e);
                let wait = e.retry_after().unwrap_or(Duration::from_millis(500));
                if e.is_retryable()
                    && out.result.retries < opts.max_retries
                    && started.elapsed() + wait <= opts.retry_for
                {
                    out.retries.push(why);
                    out.result.retries += 1;
                    tokio::time::sleep(wait).await;
                    continue;
                }
                let retryable = e.is_retryable();
                fail(&mut out, why, e.to_string(), retryable);
                return out;
            }
        }
    };
    // The library already opened the bundle with this attempt's HPKE key and checked device ID,
    // request ID and SUPI; check what the device relies on next.
    let b = &cred.bundle;
    let problem = if !cred.acknowledged {
        Some("the gateway did not confirm the acknowledgement")
    } else if b.device_id != keys.device_id || b.request_id != attempt.request_id {
        Some("the credential names another device or request")
    } else if !b.supi.as_str().starts_with("imsi-") {
        Some("the SUPI is not in IMSI form")
    } else if b.expires_at <= now_unix() {
        Some("the credential arrived expired")
    } else if b.attach.trust_anchor.is_empty() || b.attach.endpoint.is_empty() {
        Some("the credential carries no attach information")
    } else {
        None
    };
    if let Some(p) = problem {
        fail(&mut out, "credential_check".into(), p.into(), false);
        return out;
    }
    out.provision_latency = Some(started.elapsed());
    out.result.provisioned = true;
    out.result.supi = Some(b.supi.to_string());
    if !opts.attach {
        return out;
    }
    out.result.attached = Some(false);
    let mut usim = attach::usim(b, None);
    let aopts = cn_client::ClientOptions {
        connect_timeout: Duration::from_secs(10),
        exchange_timeout: Duration::from_secs(15),
    };
    let a_started = Instant::now();
    let mut a_retries = 0u32;
    loop {
        match attach::attach(ep, b, &opts.serving_network, &mut usim, aopts).await {
            Ok(_) => break,
            Err(e) => {
                let why = format!("attach_{}", e.reason());
                let wait = e.retry_after().unwrap_or(Duration::from_millis(500));
                if e.is_retryable()
                    && a_retries < opts.max_retries
                    && a_started.elapsed() + wait <= opts.retry_for
                {
                    out.retries.push(why);
                    a_retries += 1;
                    out.result.retries += 1;
                    tokio::time::sleep(wait).await;
                    continue;
                }
                let retryable = e.is_retryable();
                fail(&mut out, why, attach_message(&e), retryable);
                return out;
            }
        }
    }
    out.attach_latency = Some(a_started.elapsed());
    out.result.attached = Some(true);
    out
}

fn attach_message(e: &AttachError) -> String {
    e.to_string()
}
