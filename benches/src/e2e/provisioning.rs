//! Provisioning through the whole chain — loadgen's simulated devices → gatewayd → cn-backend
//! and back — at several concurrencies, with smart batching and with batches forced to size 1,
//! next to the handshake-only ceiling of the device leg (`loadgen handshake` against the same
//! gatewayd configuration). Twice: with cn-backend on loopback, and with cn-backend behind an
//! emulated wide-area link (a relay that holds every datagram for half the round-trip time each
//! way), as between a home router and the operator's data centre. Every configuration gets
//! fresh daemons and a fresh store; the runs for one concurrency follow each other so they share
//! the machine's state.

use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use serde::Serialize;

use super::harness::{
    Cn, DelayProxy, Gateway, GatewaySettings, LoadgenFigures, loadgen_json, snmp_udp_rcvbuf_errors,
};
use super::plot::{Series, line_chart};
use super::{Env, SuiteReport, Target, round};

mod floor;
pub use floor::Floor;

/// One measured configuration.
#[derive(Debug, Clone, Serialize)]
pub struct Run {
    /// `smart`, `size1` or `handshake`.
    pub mode: &'static str,
    /// Round-trip time added between gatewayd and cn-backend (0 = loopback).
    pub cn_rtt_ms: u64,
    /// Devices in flight at once.
    pub concurrency: usize,
    /// Devices in the run.
    pub devices: usize,
    /// Devices that completed.
    pub succeeded: u64,
    /// Devices that did not.
    pub failed: u64,
    /// Length of the run, seconds.
    pub duration_s: f64,
    /// Devices completed per second.
    pub throughput_per_s: f64,
    /// Median device latency, milliseconds.
    pub p50_ms: f64,
    /// 99th-percentile device latency, milliseconds.
    pub p99_ms: f64,
    /// Retries the devices needed (busy, CN unavailable...).
    pub retries: u64,
    /// Mean requests per batch at the CN (gatewayd's histogram); absent for `handshake`.
    pub mean_batch: Option<f64>,
    /// CPU seconds used by gatewayd and cn-backend during the run.
    pub gatewayd_cpu_s: f64,
    /// CPU seconds cn-backend used during the run.
    pub cn_backend_cpu_s: f64,
    /// gatewayd's CPU microseconds per device of the run.
    pub gatewayd_cpu_us_per_device: f64,
    /// UDP datagrams the kernel dropped on full receive buffers during the run, machine-wide
    /// (`UdpRcvbufErrors` + `Udp6RcvbufErrors`): every one costs a device a retransmission.
    pub rcvbuf_errors: u64,
    /// gatewayd's peak resident memory (`VmHWM`; a fresh process per row), MiB.
    pub gatewayd_peak_rss_mib: f64,
}

/// `UdpRcvbufErrors` + `Udp6RcvbufErrors` of the machine (0 where a counter is missing).
fn rcvbuf_errors() -> u64 {
    let v4 = std::fs::read_to_string("/proc/net/snmp")
        .ok()
        .and_then(|t| snmp_udp_rcvbuf_errors(&t));
    // /proc/net/snmp6: one "name value" pair per line.
    let v6 = std::fs::read_to_string("/proc/net/snmp6")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("Udp6RcvbufErrors"))
                .and_then(|v| v.trim().parse().ok())
        });
    v4.unwrap_or(0) + v6.unwrap_or(0)
}

/// Round-trip time of the emulated link to the CN.
const WAN_RTT: Duration = Duration::from_millis(20);

/// (mode, over the emulated WAN link?) in the order they run at each concurrency.
const MODES: [(&str, bool); 5] = [
    ("handshake", false),
    ("smart", false),
    ("size1", false),
    ("smart", true),
    ("size1", true),
];

fn plan(quick: bool) -> Vec<(usize, usize)> {
    // (concurrency, devices): enough devices that the steady state dominates the ramp.
    if quick {
        vec![(1, 10), (64, 128)]
    } else {
        vec![(1, 300), (64, 3000), (512, 6000), (2000, 8000)]
    }
}

/// Runs the provisioning suite.
pub fn run(env: &Env) -> anyhow::Result<SuiteReport> {
    let mut runs = Vec::new();
    let plan: Vec<(usize, usize)> = plan(env.quick)
        .into_iter()
        .filter(|(c, _)| env.concurrencies.is_empty() || env.concurrencies.contains(c))
        .collect();
    anyhow::ensure!(
        !plan.is_empty(),
        "no provisioning row at concurrency {:?} (the plan has {:?})",
        env.concurrencies,
        self::plan(env.quick)
    );
    for (c, n) in plan {
        for (mode, over_wan) in MODES {
            let name = if over_wan {
                format!("{mode}-wan")
            } else {
                mode.to_owned()
            };
            if !env.modes.is_empty() && !env.modes.contains(&name) {
                continue;
            }
            let rtt = if over_wan { Some(WAN_RTT) } else { None };
            let r = one(env, mode, rtt, c, n)
                .with_context(|| format!("{mode} at concurrency {c} ({n} devices)"))?;
            eprintln!(
                "  {mode:>9} rtt {:>2} ms c={c:<5} {:>8.1}/s  p50 {:>8.1} ms  p99 {:>8.1} ms  ok {}/{}{}",
                r.cn_rtt_ms,
                r.throughput_per_s,
                r.p50_ms,
                r.p99_ms,
                r.succeeded,
                r.devices,
                r.mean_batch
                    .map(|b| format!("  mean batch {b:.1}"))
                    .unwrap_or_default()
            );
            runs.push(r);
        }
    }
    let floor = floor::measure_floor(if env.quick {
        Duration::from_millis(50)
    } else {
        Duration::from_secs(1)
    })
    .context("measuring the crypto floor")?;
    eprintln!(
        "  crypto floor: handshake {} µs, provisioning {} µs (CPU per device, one thread)",
        floor.handshake_us, floor.provisioning_us
    );
    let plots = plots(env, &runs)?;
    let mut targets = targets(&runs);
    targets.extend(router_targets(&runs, &floor));
    let markdown = markdown(&runs, &plots, &floor);
    Ok(SuiteReport {
        name: "provisioning",
        data: serde_json::json!({ "runs": runs, "plots": plots, "crypto_floor": floor }),
        markdown,
        targets,
    })
}

fn one(
    env: &Env,
    mode: &'static str,
    rtt: Option<Duration>,
    c: usize,
    n: usize,
) -> anyhow::Result<Run> {
    let rtt_ms = rtt.map_or(0, |r| r.as_millis() as u64);
    let dir = env.scratch(&format!("prov-{mode}-{rtt_ms}-{c}"))?;
    let cn = Cn::start(&env.bins, &dir, (n + 100) as u64)?;
    let proxy = match rtt {
        Some(rtt) => Some(DelayProxy::start(cn.quic()?.parse()?, rtt)?),
        None => None,
    };
    let settings = GatewaySettings {
        max_batch: if mode == "size1" { 1 } else { 256 },
        cn_via: proxy.as_ref().map(|p| p.addr),
        ..GatewaySettings::default()
    };
    let gw = Gateway::start(&env.bins, &dir.join("gw"), &cn, &settings)?;
    let sub = if mode == "handshake" {
        "handshake"
    } else {
        "provision"
    };
    let prefix = format!("b{c}{}{rtt_ms}", &mode[..2]);
    let args = gw.loadgen_args(sub, n as u64, c as u64, &prefix, &[])?;
    let (gw_cpu0, cn_cpu0) = (gw.daemon.cpu()?, cn.daemon.cpu()?);
    let drops0 = rcvbuf_errors();
    let rep = loadgen_json(&env.bins, &dir, &args)?;
    let drops = rcvbuf_errors().saturating_sub(drops0);
    let peak_kib = gw.daemon.hwm_kib()?;
    let (gw_cpu, cn_cpu) = (
        gw.daemon.cpu()?.saturating_sub(gw_cpu0),
        cn.daemon.cpu()?.saturating_sub(cn_cpu0),
    );
    let mean_batch = if mode == "handshake" {
        None
    } else {
        let metrics = gw.daemon.ready_str("metrics")?;
        batch_mean(&metrics).ok()
    };
    let lg = LoadgenFigures::of(&rep);
    let r = Run {
        mode,
        cn_rtt_ms: rtt_ms,
        concurrency: c,
        devices: n,
        succeeded: lg.succeeded,
        failed: lg.failed,
        duration_s: lg.duration_s,
        throughput_per_s: lg.throughput_per_s,
        p50_ms: lg.p50_ms,
        p99_ms: lg.p99_ms,
        retries: lg.retries(),
        mean_batch,
        gatewayd_cpu_s: round(gw_cpu.as_secs_f64(), 2),
        cn_backend_cpu_s: round(cn_cpu.as_secs_f64(), 2),
        gatewayd_cpu_us_per_device: round(gw_cpu.as_secs_f64() * 1e6 / n.max(1) as f64, 0),
        rcvbuf_errors: drops,
        gatewayd_peak_rss_mib: round(peak_kib as f64 / 1024.0, 1),
    };
    if r.failed > 0 {
        anyhow::bail!(
            "{} of {} devices failed ({}); logs in {}",
            r.failed,
            n,
            rep["failures_by_reason"],
            dir.display()
        );
    }
    gw.daemon.stop()?;
    cn.daemon.stop()?;
    Ok(r)
}

/// `sum / count` of gatewayd's `gatewayd_batch_size` histogram, read from its /metrics.
fn batch_mean(addr: &str) -> anyhow::Result<f64> {
    let text = http_get(addr, "/metrics")?;
    let value = |name: &str| -> anyhow::Result<f64> {
        text.lines()
            .find_map(|l| {
                l.strip_prefix(name)
                    .and_then(|r| r.trim().parse::<f64>().ok())
            })
            .with_context(|| format!("no {name} in gatewayd's metrics"))
    };
    let (sum, count) = (
        value("gatewayd_batch_size_sum")?,
        value("gatewayd_batch_size_count")?,
    );
    anyhow::ensure!(count > 0.0, "gatewayd sent no batch");
    Ok(round(sum / count, 1))
}

/// A minimal HTTP/1.0 GET (the daemons' metrics endpoints are plain HTTP on loopback).
pub fn http_get(addr: &str, path: &str) -> anyhow::Result<String> {
    let (status, body) = companion_testkit::http::get(addr, path)
        .with_context(|| format!("GET {path} from {addr}"))?;
    anyhow::ensure!(status == 200, "GET {path} from {addr}: status {status}");
    Ok(body)
}

fn find<'a>(runs: &'a [Run], mode: &str, rtt: u64, c: usize) -> Option<&'a Run> {
    runs.iter()
        .find(|r| r.mode == mode && r.cn_rtt_ms == rtt && r.concurrency == c)
}

fn link_name(rtt: u64) -> String {
    if rtt == 0 {
        "CN on loopback".into()
    } else {
        format!("CN across a {rtt} ms RTT link")
    }
}

fn targets(runs: &[Run]) -> Vec<Target> {
    let mut t = Vec::new();
    let top_c = runs.iter().map(|r| r.concurrency).max().unwrap_or(0);
    let c512 = if runs.iter().any(|r| r.concurrency == 512) {
        512
    } else {
        top_c
    };
    let mut rtts: Vec<u64> = runs.iter().map(|r| r.cn_rtt_ms).collect();
    rtts.sort_unstable();
    rtts.dedup();
    for &rtt in &rtts {
        if let (Some(s), Some(one)) = (
            find(runs, "smart", rtt, c512),
            find(runs, "size1", rtt, c512),
        ) {
            let ratio = s.throughput_per_s / one.throughput_per_s.max(f64::MIN_POSITIVE);
            t.push(Target {
                goal: format!(
                    "smart batching ≥ 5× the throughput of batch size 1 at concurrency {c512} ({})",
                    link_name(rtt)
                ),
                measured: format!(
                    "{ratio:.1}× ({:.0}/s vs {:.0}/s)",
                    s.throughput_per_s, one.throughput_per_s
                ),
                holds: ratio >= 5.0,
            });
        }
    }
    for &rtt in &rtts {
        if let (Some(s), Some(one)) = (find(runs, "smart", rtt, 1), find(runs, "size1", rtt, 1)) {
            let worse = (s.p50_ms / one.p50_ms.max(f64::MIN_POSITIVE) - 1.0) * 100.0;
            t.push(Target {
                goal: format!(
                    "smart batching's p50 at concurrency 1 ≤ 10% worse than batch size 1 ({})",
                    link_name(rtt)
                ),
                measured: format!("{:.2} ms vs {:.2} ms ({worse:+.1}%)", s.p50_ms, one.p50_ms),
                holds: worse <= 10.0,
            });
        }
    }
    // Provisioning against the handshake-only rate, at each concurrency (CN on loopback); the
    // target is judged on the best of each.
    let best = |mode: &str| {
        runs.iter()
            .filter(|r| r.mode == mode && r.cn_rtt_ms == 0)
            .max_by(|a, b| a.throughput_per_s.total_cmp(&b.throughput_per_s))
    };
    if let (Some(p), Some(h)) = (best("smart"), best("handshake")) {
        let share = p.throughput_per_s / h.throughput_per_s.max(f64::MIN_POSITIVE);
        t.push(Target {
            goal: "end-to-end provisioning ≥ ½ the handshake-only rate (best of each)".into(),
            measured: format!(
                "{:.0}% ({:.0}/s at c={} vs {:.0}/s at c={})",
                share * 100.0,
                p.throughput_per_s,
                p.concurrency,
                h.throughput_per_s,
                h.concurrency
            ),
            holds: share >= 0.5,
        });
    }
    t
}

/// The router-class targets (issue 17): the power-cut herd, gatewayd's CPU per device against
/// the crypto floor, provisioning against the bare handshake, and the herd's peak memory.
fn router_targets(runs: &[Run], floor: &Floor) -> Vec<Target> {
    let mut t = Vec::new();
    if let (Some(herd), Some(c512)) = (find(runs, "smart", 0, 2000), find(runs, "smart", 0, 512)) {
        let ratio = herd.throughput_per_s / c512.throughput_per_s.max(f64::MIN_POSITIVE);
        t.push(Target {
            goal: "throughput at C=2,000 ÷ at C=512 ≥ 0.9, with p99 ≤ 2 s and 0 device retries \
                   (smart batching, CN on loopback)"
                .into(),
            measured: format!(
                "{ratio:.2} ({:.0}/s vs {:.0}/s), p99 {:.2} s, {} retries, {} receive-buffer drops",
                herd.throughput_per_s,
                c512.throughput_per_s,
                herd.p99_ms / 1000.0,
                herd.retries,
                herd.rcvbuf_errors
            ),
            holds: ratio >= 0.9 && herd.p99_ms <= 2000.0 && herd.retries == 0,
        });
        t.push(Target {
            goal: "gatewayd peak RSS during the C=2,000 herd ≤ 64 MiB".into(),
            measured: format!("{:.1} MiB (VmHWM)", herd.gatewayd_peak_rss_mib),
            holds: herd.gatewayd_peak_rss_mib <= 64.0,
        });
    }
    if let Some(p) = find(runs, "smart", 0, 64) {
        let us = p.gatewayd_cpu_us_per_device;
        t.push(Target {
            goal: format!(
                "gatewayd CPU per provisioned device at C=64 ≤ 400 µs (crypto floor measured \
                 here: {:.0} µs per provisioning, {:.0} µs per handshake)",
                floor.provisioning_us, floor.handshake_us
            ),
            measured: format!(
                "{us:.0} µs ({:.1}× the provisioning floor)",
                us / floor.provisioning_us.max(f64::MIN_POSITIVE)
            ),
            holds: us <= 400.0,
        });
        if let Some(h) = find(runs, "handshake", 0, 64) {
            let ratio = us / h.gatewayd_cpu_us_per_device.max(f64::MIN_POSITIVE);
            t.push(Target {
                goal: "gatewayd CPU per provisioning ÷ per bare handshake at C=64 ≤ 1.25".into(),
                measured: format!(
                    "{ratio:.2} ({us:.0} µs vs {:.0} µs)",
                    h.gatewayd_cpu_us_per_device
                ),
                holds: ratio <= 1.25,
            });
        }
    }
    t
}

fn plots(env: &Env, runs: &[Run]) -> anyhow::Result<Vec<String>> {
    let series = |mode: &str, rtt: u64, label: &str, f: &dyn Fn(&Run) -> f64| Series {
        label: label.to_string(),
        points: runs
            .iter()
            .filter(|r| r.mode == mode && r.cn_rtt_ms == rtt)
            .map(|r| (r.concurrency as f64, f(r)))
            .collect(),
    };
    let wan = runs.iter().map(|r| r.cn_rtt_ms).max().unwrap_or(0);
    let tput = |r: &Run| r.throughput_per_s;
    let mut tp_series = vec![
        series(
            "handshake",
            0,
            "QUIC + mTLS handshake only (ceiling)",
            &tput,
        ),
        series("smart", 0, "smart batching, CN on loopback", &tput),
        series("size1", 0, "batch size 1, CN on loopback", &tput),
    ];
    let p50 = |r: &Run| r.p50_ms;
    let p99 = |r: &Run| r.p99_ms;
    let mut lat_series = vec![
        series("handshake", 0, "handshake only p50", &p50),
        series("smart", 0, "smart batching p50, loopback", &p50),
        series("smart", 0, "smart batching p99, loopback", &p99),
        series("size1", 0, "batch size 1 p50, loopback", &p50),
        series("size1", 0, "batch size 1 p99, loopback", &p99),
    ];
    if wan > 0 {
        tp_series.push(series(
            "smart",
            wan,
            &format!("smart batching, CN at {wan} ms RTT"),
            &tput,
        ));
        tp_series.push(series(
            "size1",
            wan,
            &format!("batch size 1, CN at {wan} ms RTT"),
            &tput,
        ));
        lat_series.push(series(
            "smart",
            wan,
            &format!("smart batching p50, {wan} ms RTT"),
            &p50,
        ));
        lat_series.push(series(
            "size1",
            wan,
            &format!("batch size 1 p50, {wan} ms RTT"),
            &p50,
        ));
    }
    let tp = env.out.join("provisioning-throughput.svg");
    line_chart(
        &tp,
        "Provisioning throughput against concurrency",
        "devices in flight (log)",
        "completed per second",
        false,
        &tp_series,
    )?;
    let lat = env.out.join("provisioning-latency.svg");
    line_chart(
        &lat,
        "Provisioning latency against concurrency",
        "devices in flight (log)",
        "latency, ms (log)",
        true,
        &lat_series,
    )?;
    Ok([tp, lat].iter().map(|p| file_name(p)).collect())
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn markdown(runs: &[Run], plots: &[String], floor: &Floor) -> String {
    let mut md = String::from(
        "### Provisioning: smart batching, batch size 1, and the handshake ceiling\n\n\
         `loadgen` (its own process, sharing the 2 cores) drives N simulated devices through the \
         real device flow (QUIC + mTLS to gatewayd, request, sealed credential, opened and \
         checked, acknowledged) with C in flight at once; gatewayd batches towards a real \
         cn-backend (fsync per batch), either on loopback (CN RTT 0) or behind a UDP relay \
         holding every datagram half the RTT each way (a home router reaching the operator's \
         data centre). `smart`: gatewayd's default batching (up to 256 per batch, 4 batches in \
         flight); `size1`: `max_batch = 1`, still 4 in flight. `handshake` is `loadgen \
         handshake` against the same gatewayd configuration: connect with mutual TLS until the \
         gateway confirms it admitted the key, then close. Fresh daemons and store per row; \
         throughput = devices completed / wall time of the phase; retries are a device's \
         retry-after answers (busy, CN slow) and reconnections; drops are the UDP datagrams \
         the kernel dropped on full receive buffers during the row (machine-wide \
         `UdpRcvbufErrors`); peak RSS is gatewayd's `VmHWM`.\n\n\
         | C | mode | CN RTT ms | devices | per s | p50 ms | p99 ms | mean batch | retries | drops | gatewayd CPU s | gatewayd µs per device | gatewayd peak RSS MiB | cn-backend CPU s |\n\
         |---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in runs {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {:.1} | {:.2} | {:.2} | {} | {} | {} | {:.2} | {:.0} | {:.1} | {:.2} |",
            r.concurrency,
            r.mode,
            if r.mode == "handshake" {
                "–".to_string()
            } else {
                r.cn_rtt_ms.to_string()
            },
            r.devices,
            r.throughput_per_s,
            r.p50_ms,
            r.p99_ms,
            r.mean_batch.map_or("–".into(), |b| format!("{b:.1}")),
            r.retries,
            r.rcvbuf_errors,
            r.gatewayd_cpu_s,
            r.gatewayd_cpu_us_per_device,
            r.gatewayd_peak_rss_mib,
            r.cn_backend_cpu_s
        );
    }
    md.push('\n');
    let _ = writeln!(
        md,
        "**The crypto floor** (one thread, ring, as gatewayd uses it through rustls and quinn): \
         the server side of one mutually authenticated QUIC + TLS 1.3 handshake is one X25519 \
         key generation and agreement ({} µs), one ECDSA P-256 signature ({} µs), one ECDSA \
         P-256 verification ({} µs), the key schedule (24 HMAC-SHA256, {} µs each) and about \
         4 KiB of AES-128-GCM ({} µs per KiB): **{} µs**. A provisioning adds the verification \
         of the request's two key bindings (its own and the renewal authorisation, PROTOCOL.md \
         §4.4) and 2 KiB more AEAD: **{} µs**. Everything gatewayd spends above it is QUIC and \
         TLS processing, certificate parsing, the state writes (SQLite, fsync per group \
         commit), CBOR and the task hops.\n",
        floor.x25519_us,
        floor.p256_sign_us,
        floor.p256_verify_us,
        floor.hmac_us,
        floor.aead_us_per_kib,
        floor.handshake_us,
        floor.provisioning_us
    );
    for p in plots {
        let _ = writeln!(md, "![{p}](bench/{p})\n");
    }
    md
}
