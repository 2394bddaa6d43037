//! gatewayd's footprint on a router: time from start to ready, and resident memory with 0, 1,000
//! and 5,000 devices held connected (`loadgen hold`).
//!
//! - **Start-up**: the release `gatewayd` is spawned (`harness::Gateway::start`) and timed until
//!   its ready file appears, polling every millisecond — with a fresh state directory (the state
//!   database is created and the gateway's identity key generated) and with a populated one (the
//!   state directory of the largest memory run, holding its pairings). The ready file is written
//!   once the state database is open, the identity loaded, the device port bound and the control
//!   socket and metrics listening (`gatewayd/src/daemon.rs`); it does **not** wait for the CN
//!   link, whose TLS handshake and 5G AKA run in the background. When that link is up is
//!   measured separately, by polling gatewayd's control socket (`status`, `cn_link`) every
//!   millisecond from the ready file on.
//! - **Memory**: for each device count a fresh gatewayd, its CN link up; `loadgen hold` pairs and
//!   connects the devices (64 at a time) and keeps them connected; once its ready file says all are
//!   connected, one second to settle, then `VmRSS` and `VmHWM` from `/proc/<pid>/status` and
//!   `AnonHugePages` from `smaps_rollup`; gatewayd's own count of connections
//!   (`active_connections`) is read from its status to check the hold.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use serde::Serialize;

use super::harness::{
    Cn, Daemon, Gateway, GatewaySettings, gateway_status, status_kib, tail, wait_cn_up,
};
use super::{Env, SuiteReport, Target, round};

/// The targets.
const RSS_TARGET_KIB: u64 = 64 * 1024;
const RSS_TARGET_DEVICES: usize = 1000;
const READY_TARGET_MS: f64 = 100.0;

/// Devices connecting at once in `loadgen hold`.
const HOLD_CONCURRENCY: usize = 64;

/// One start-up of gatewayd.
#[derive(Debug, Clone, Serialize)]
pub struct Startup {
    /// Spawn to ready file, milliseconds.
    pub ready_ms: f64,
    /// Spawn to the CN link up (TLS to the CN and 5G AKA done; gatewayd's "CN link up" log
    /// line), milliseconds.
    pub cn_up_ms: f64,
    /// Phases, from gatewayd's log (info level): spawn to the first log line (exec, runtime,
    /// configuration), milliseconds ...
    pub process_ms: f64,
    /// ... to "gateway identity": state database opened (or created) and identity loaded (or
    /// generated) ...
    pub state_identity_ms: f64,
    /// ... to "device server listening": pairings loaded, companion USIM, CN target, device
    /// socket ...
    pub device_port_ms: f64,
    /// ... to "gatewayd ready": control socket, metrics listener, ready file.
    pub control_metrics_ms: f64,
    /// Resident memory right after the ready file appeared, KiB.
    pub rss_at_ready_kib: u64,
}

/// Median and maximum of a series of start-ups.
#[derive(Debug, Clone, Serialize)]
pub struct StartupSummary {
    /// The state directory gatewayd started on (`fresh` or `populated`).
    pub state: &'static str,
    /// Start-ups measured.
    pub runs: usize,
    /// Median spawn-to-ready time, milliseconds.
    pub ready_median_ms: f64,
    /// Longest spawn-to-ready time, milliseconds.
    pub ready_max_ms: f64,
    /// Median spawn-to-CN-link-up time, milliseconds.
    pub cn_up_median_ms: f64,
    /// Longest spawn-to-CN-link-up time, milliseconds.
    pub cn_up_max_ms: f64,
    /// Medians of the phases (see [`Startup`]).
    pub process_median_ms: f64,
    /// Median time to open the state and the identity, milliseconds.
    pub state_identity_median_ms: f64,
    /// Median time to the device port listening, milliseconds.
    pub device_port_median_ms: f64,
    /// Median time to the control socket and metrics, milliseconds.
    pub control_metrics_median_ms: f64,
    /// Every start-up.
    pub startups: Vec<Startup>,
}

/// gatewayd's memory with `devices` held connected.
#[derive(Debug, Clone, Serialize)]
pub struct Memory {
    /// Devices connected.
    pub devices: usize,
    /// Devices `loadgen hold` reported connected.
    pub connected: u64,
    /// gatewayd's own count of open device connections when the memory was read.
    pub gateway_connections: u64,
    /// gatewayd's resident set size with them connected, KiB.
    pub rss_kib: u64,
    /// gatewayd's peak resident set size, KiB.
    pub hwm_kib: u64,
    /// Of `rss_kib`, anonymous memory backed by transparent huge pages.
    pub anon_huge_kib: u64,
    /// (RSS - RSS with no device) / devices, KiB.
    pub per_device_kib: Option<f64>,
    /// loadgen: time to connect every device, and their handshake latency.
    pub connect_s: f64,
    /// Median connection time, milliseconds.
    pub connect_p50_ms: f64,
    /// 99th-percentile connection time, milliseconds.
    pub connect_p99_ms: f64,
    /// loadgen's final report: connections still open when the hold ended.
    pub still_connected: u64,
}

fn plan(quick: bool) -> (Vec<usize>, usize) {
    if quick {
        (vec![0, 50], 2)
    } else {
        (vec![0, 1000, 5000], 10)
    }
}

/// Runs the resources suite.
pub fn run(env: &Env) -> anyhow::Result<SuiteReport> {
    let (levels, startups) = plan(env.quick);
    let root = env.scratch("resources")?;
    let cn = Cn::start(&env.bins, &root, 10)?;

    let mut fresh = Vec::with_capacity(startups);
    for i in 0..startups {
        let s = startup(env, &cn, &root.join(format!("fresh-{i}")))
            .with_context(|| format!("fresh start-up {i}"))?;
        fresh.push(s);
    }
    let fresh = summarize("fresh", fresh);
    eprintln!(
        "  start-up (fresh state): ready median {:.1} ms, max {:.1} ms; CN link up median {:.1} ms",
        fresh.ready_median_ms, fresh.ready_max_ms, fresh.cn_up_median_ms
    );

    let mut memory: Vec<Memory> = Vec::new();
    let mut populated_dir = None;
    for &n in &levels {
        let dir = root.join(format!("mem-{n}"));
        let mut m = hold(env, &cn, &dir, n).with_context(|| format!("{n} devices held"))?;
        if let Some(base) = memory.iter().find(|m| m.devices == 0)
            && n > 0
        {
            m.per_device_kib = Some(round(
                (m.rss_kib as f64 - base.rss_kib as f64) / n as f64,
                1,
            ));
        }
        eprintln!(
            "  {n:>5} devices held: VmRSS {:.1} MiB, VmHWM {:.1} MiB{}",
            mib(m.rss_kib),
            mib(m.hwm_kib),
            m.per_device_kib
                .map(|k| format!(", {k:.1} KiB per device"))
                .unwrap_or_default()
        );
        memory.push(m);
        populated_dir = Some((n, dir));
    }

    let (paired, dir) = populated_dir.ok_or_else(|| anyhow!("no memory level ran"))?;
    let mut populated = Vec::with_capacity(startups);
    for i in 0..startups {
        let s = startup(env, &cn, &dir).with_context(|| format!("populated start-up {i}"))?;
        populated.push(s);
    }
    let populated = summarize("populated", populated);
    eprintln!(
        "  start-up ({paired} pairings): ready median {:.1} ms, max {:.1} ms",
        populated.ready_median_ms, populated.ready_max_ms
    );

    let thp = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into());
    let mut targets = targets(&memory, &fresh, &populated);
    targets.extend(router_targets(&memory));
    match static_size(Path::new(STATIC_SIZES)) {
        Ok(t) => targets.push(t),
        Err(why) => eprintln!("resources: note: the router binary's size is left out: {why}"),
    }
    let markdown = markdown(&memory, &fresh, &populated, paired, &thp, env.quick);
    Ok(SuiteReport {
        name: "resources",
        data: serde_json::json!({
            "startup": { "fresh": fresh, "populated": populated, "populated_pairings": paired },
            "memory": memory,
            "hold_concurrency": HOLD_CONCURRENCY,
            "transparent_hugepage": thp,
        }),
        markdown,
        targets,
    })
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn ms(d: Duration) -> f64 {
    round(d.as_secs_f64() * 1000.0, 1)
}

/// Starts gatewayd in `dir` (logging at info level), times it to ready, reads the phases and
/// the CN link's arrival from its log, stops it.
fn startup(env: &Env, cn: &Cn, dir: &Path) -> anyhow::Result<Startup> {
    let cfg = Gateway::write_config(dir, cn, &GatewaySettings::default(), "127.0.0.1:0")?;
    let ready = dir.join("gw-ready.json");
    let log = dir.join("gatewayd.log");
    let mut c = env.bins.command("gatewayd");
    c.arg("--config")
        .arg(&cfg)
        .arg("--ready-file")
        .arg(&ready)
        .env("RUST_LOG", "info")
        .env_remove("NOTIFY_SOCKET");
    let daemon = Daemon::spawn("gatewayd", c, &ready, &log)?;
    let rss_at_ready_kib = daemon.rss_kib()?;
    let control = PathBuf::from(daemon.ready_str("control")?);
    wait_cn_up(&control, Duration::from_secs(30))
        .with_context(|| format!("gatewayd's log:\n{}", tail(&log, 20)))?;
    let text = std::fs::read_to_string(&log)?;
    let at = |what: &str| {
        log_time_s(&text, what)
            .ok_or_else(|| anyhow!("no {what:?} line in gatewayd's log:\n{}", tail(&log, 20)))
    };
    let (t0, t_id, t_dev, t_ready, t_cn) = (
        at("gatewayd starting")?,
        at("gateway identity")?,
        at("device server listening")?,
        at("gatewayd ready")?,
        at("CN link up")?,
    );
    let ready_ms = ms(daemon.start_to_ready);
    let span = |a: f64, b: f64| round(since(a, b) * 1000.0, 1);
    let s = Startup {
        ready_ms,
        cn_up_ms: round(ready_ms + since(t_ready, t_cn) * 1000.0, 1),
        process_ms: round((ready_ms - span(t0, t_ready)).max(0.0), 1),
        state_identity_ms: span(t0, t_id),
        device_port_ms: span(t_id, t_dev),
        control_metrics_ms: span(t_dev, t_ready),
        rss_at_ready_kib,
    };
    daemon.stop()?;
    Ok(s)
}

/// Seconds from `a` to `b`, both seconds of the day (a log that crosses midnight wraps).
fn since(a: f64, b: f64) -> f64 {
    let d = b - a;
    if d < -43_200.0 { d + 86_400.0 } else { d }
}

/// The time of day (seconds) of the first log line containing `what`. tracing's format:
/// `2026-11-28T02:10:12.359773Z  INFO target: message ...`, possibly with ANSI colours.
fn log_time_s(log: &str, what: &str) -> Option<f64> {
    let line = log.lines().find(|l| l.contains(what))?;
    let plain = strip_ansi(line);
    let stamp = plain.split_whitespace().next()?;
    let time = stamp.split_once('T')?.1.trim_end_matches('Z');
    let mut parts = time.split(':');
    let h: f64 = parts.next()?.parse().ok()?;
    let m: f64 = parts.next()?.parse().ok()?;
    let sec: f64 = parts.next()?.parse().ok()?;
    Some(h * 3600.0 + m * 60.0 + sec)
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // ESC [ ... final byte in @..~
            for d in chars.by_ref() {
                if ('@'..='~').contains(&d) && d != '[' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The phase of start-up that took longest (median), and its median.
fn largest_phase(s: &StartupSummary) -> (&'static str, f64) {
    [
        (
            "starting the process: exec, runtime, configuration",
            s.process_median_ms,
        ),
        (
            "opening the state database and loading the identity, or creating both",
            s.state_identity_median_ms,
        ),
        (
            "loading the pairings and the companion USIM and binding the device port",
            s.device_port_median_ms,
        ),
        (
            "binding the control socket and the metrics listener",
            s.control_metrics_median_ms,
        ),
    ]
    .into_iter()
    .fold(("", -1.0), |best, p| if p.1 > best.1 { p } else { best })
}

fn summarize(state: &'static str, startups: Vec<Startup>) -> StartupSummary {
    let ready: Vec<f64> = startups.iter().map(|s| s.ready_ms).collect();
    let cn: Vec<f64> = startups.iter().map(|s| s.cn_up_ms).collect();
    let med = |f: fn(&Startup) -> f64| median(&startups.iter().map(f).collect::<Vec<_>>());
    StartupSummary {
        process_median_ms: med(|s| s.process_ms),
        state_identity_median_ms: med(|s| s.state_identity_ms),
        device_port_median_ms: med(|s| s.device_port_ms),
        control_metrics_median_ms: med(|s| s.control_metrics_ms),
        state,
        runs: startups.len(),
        ready_median_ms: median(&ready),
        ready_max_ms: max(&ready),
        cn_up_median_ms: median(&cn),
        cn_up_max_ms: max(&cn),
        startups,
    }
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => round((v[n / 2 - 1] + v[n / 2]) / 2.0, 1),
    }
}

fn max(v: &[f64]) -> f64 {
    v.iter().copied().fold(0.0, f64::max)
}

/// A `kB` line of `/proc/<pid>/smaps_rollup` (0 if absent).
fn smaps_kib(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix(key)
                .and_then(|r| r.strip_prefix(':'))
                .and_then(|r| r.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// A fresh gatewayd with `n` devices held connected: its memory.
fn hold(env: &Env, cn: &Cn, dir: &Path, n: usize) -> anyhow::Result<Memory> {
    let gw = Gateway::start(&env.bins, dir, cn, &GatewaySettings::default())?;
    let control = PathBuf::from(gw.control()?);
    wait_cn_up(&control, Duration::from_secs(30))?;
    let ready = dir.join("hold-ready.json");
    let report = dir.join("hold-report.json");
    let mut proc = None;
    let mut connected = 0;
    if n > 0 {
        let mut c = env.bins.command("loadgen");
        c.args(["hold", "--devices", &n.to_string()])
            .args(["--concurrency", &HOLD_CONCURRENCY.to_string()])
            .args([
                "--gateway",
                &gw.devices()?,
                "--control-socket",
                &gw.control()?,
            ])
            .args(["--progress", "never", "--id-prefix", "res"])
            .arg("--ready-file")
            .arg(&ready)
            .arg("--json")
            .arg(&report);
        let p = Daemon::spawn_within(
            "loadgen hold",
            c,
            &ready,
            &dir.join("loadgen-hold.log"),
            Duration::from_secs(600),
        )?;
        let r = &p.ready;
        connected = r["connected"].as_u64().unwrap_or(0);
        if connected != n as u64 {
            bail!("loadgen hold connected {connected} of {n} devices: {r}");
        }
        proc = Some(p);
    }
    std::thread::sleep(Duration::from_secs(1));
    let pid = gw.daemon.pid();
    let rss_kib = status_kib(pid, "VmRSS")?;
    let hwm_kib = status_kib(pid, "VmHWM")?;
    let anon_huge_kib = smaps_kib(pid, "AnonHugePages");
    let gateway_connections = gateway_status(&control)?["active_connections"]
        .as_u64()
        .unwrap_or(0);
    let mut m = Memory {
        devices: n,
        connected,
        gateway_connections,
        rss_kib,
        hwm_kib,
        anon_huge_kib,
        per_device_kib: None,
        connect_s: 0.0,
        connect_p50_ms: 0.0,
        connect_p99_ms: 0.0,
        still_connected: 0,
    };
    if let Some(p) = proc {
        p.stop()?;
        let r: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(&report).context("loadgen hold's report")?,
        )
        .context("parsing loadgen hold's report")?;
        m.connect_s = r["duration_s"].as_f64().unwrap_or(0.0);
        m.connect_p50_ms = r["latency_ms"]["p50_ms"].as_f64().unwrap_or(0.0);
        m.connect_p99_ms = r["latency_ms"]["p99_ms"].as_f64().unwrap_or(0.0);
        m.still_connected = r["still_connected"].as_u64().unwrap_or(0);
    }
    gw.daemon.stop()?;
    Ok(m)
}

/// The memory target is checked only where it was measured (not in quick mode).
fn targets(memory: &[Memory], fresh: &StartupSummary, populated: &StartupSummary) -> Vec<Target> {
    let mut t = Vec::new();
    let goal = format!(
        "gatewayd < 64 MiB resident with {} connected devices",
        RSS_TARGET_DEVICES
    );
    if let Some(m) = memory.iter().find(|m| m.devices == RSS_TARGET_DEVICES) {
        t.push(Target {
            goal,
            measured: format!(
                "{:.1} MiB VmRSS ({:.1} MiB peak) with {} connected",
                mib(m.rss_kib),
                mib(m.hwm_kib),
                m.gateway_connections
            ),
            holds: m.rss_kib < RSS_TARGET_KIB && m.gateway_connections == m.devices as u64,
        });
    }
    let worst = fresh.ready_max_ms.max(populated.ready_max_ms);
    t.push(Target {
        goal: "gatewayd ready within 100 ms of start".into(),
        measured: format!(
            "median {:.1} ms fresh, {:.1} ms populated; max {:.1} ms",
            fresh.ready_median_ms, populated.ready_median_ms, worst
        ),
        holds: worst <= READY_TARGET_MS,
    });
    t
}

/// What `scripts/build-static.sh` writes for the aarch64 router binaries (run from the
/// repository's root, as `scripts/bench.sh` does).
const STATIC_SIZES: &str = "target/dist/aarch64-unknown-linux-musl/SIZES";

/// The router binary's size target (issue 17), from `scripts/build-static.sh`'s SIZES file.
fn static_size(sizes: &Path) -> anyhow::Result<Target> {
    let text = std::fs::read_to_string(sizes).with_context(|| {
        format!(
            "reading {} (run scripts/build-static.sh first)",
            sizes.display()
        )
    })?;
    // "gatewayd      6036488 bytes    5.76 MiB  aarch64-unknown-linux-musl  profile router"
    let line = text
        .lines()
        .find(|l| l.split_whitespace().next() == Some("gatewayd"))
        .with_context(|| format!("no gatewayd line in {}", sizes.display()))?;
    let words: Vec<&str> = line.split_whitespace().collect();
    let bytes: u64 = words
        .get(1)
        .and_then(|b| b.parse().ok())
        .with_context(|| format!("unexpected line in {}: {line}", sizes.display()))?;
    let profile = words.last().copied().unwrap_or("?");
    let mib = bytes as f64 / (1024.0 * 1024.0);
    Ok(Target {
        goal: "static aarch64-musl gatewayd, stripped, ≤ 6 MiB".into(),
        measured: format!(
            "{mib:.2} MiB ({bytes} bytes, profile {profile}; scripts/build-static.sh)"
        ),
        holds: mib <= 6.0,
    })
}

/// The router-class memory targets (issue 17): idle, 1,000 and 5,000 devices held connected.
fn router_targets(memory: &[Memory]) -> Vec<Target> {
    [(0usize, 12.0f64), (1000, 28.0), (5000, 96.0)]
        .iter()
        .filter_map(|&(devices, limit_mib)| {
            let m = memory.iter().find(|m| m.devices == devices)?;
            let all = m.gateway_connections == m.devices as u64;
            Some(Target {
                goal: if devices == 0 {
                    format!("gatewayd idle RSS ≤ {limit_mib:.0} MiB")
                } else {
                    format!(
                        "gatewayd RSS with {devices} devices held connected ≤ {limit_mib:.0} MiB"
                    )
                },
                measured: format!(
                    "{:.1} MiB VmRSS{}",
                    mib(m.rss_kib),
                    if devices == 0 || all {
                        String::new()
                    } else {
                        format!(" ({} of {devices} connected)", m.gateway_connections)
                    }
                ),
                holds: mib(m.rss_kib) <= limit_mib && all,
            })
        })
        .collect()
}

fn markdown(
    memory: &[Memory],
    fresh: &StartupSummary,
    populated: &StartupSummary,
    paired: usize,
    thp: &str,
    quick: bool,
) -> String {
    let mut md = String::new();
    md.push_str("### gatewayd footprint: start-up and resident memory\n\n");
    md.push_str(
        "The release `gatewayd` (userspace LAN filter, CN link to a local `cn-backend`). \
         **Start-up**: spawn to ready file, polled every millisecond; the ready file means state \
         database open, identity loaded, device port bound, control socket and metrics \
         listening — it does not wait for the CN link, whose TLS handshake and 5G AKA follow in \
         the background (\"CN link up\": gatewayd's own log line; the phases come from its \
         info-level log too). *Fresh*: a \
         new state directory (database created, identity key generated); *populated*: ",
    );
    let _ = write!(
        md,
        "the state directory of the {paired}-device run ({paired} pairings). **Memory**: a fresh \
         gatewayd per row; `loadgen hold` pairs the devices and keeps them connected (QUIC + \
         mutual TLS, no stream, keep-alive every 10 s, {HOLD_CONCURRENCY} connecting at a time); \
         one second after all are connected, `VmRSS`/`VmHWM` from `/proc/<pid>/status`. \
         Transparent huge pages on this machine: `{thp}`.\n\n"
    );
    md.push_str(
        "| state directory | start-ups | ready, median | ready, max | CN link up, median | CN link up, max | RSS at ready | phases (medians): process / state + identity / device port / control + metrics |\n\
         |---|---:|---:|---:|---:|---:|---:|---|\n",
    );
    for s in [fresh, populated] {
        let rss = s
            .startups
            .iter()
            .map(|x| x.rss_at_ready_kib)
            .max()
            .unwrap_or(0);
        let _ = writeln!(
            md,
            "| {} | {} | {:.1} ms | {:.1} ms | {:.1} ms | {:.1} ms | {:.1} MiB | {:.1} / {:.1} / {:.1} / {:.1} ms |",
            if s.state == "fresh" {
                "fresh".to_string()
            } else {
                format!("populated ({paired} pairings)")
            },
            s.runs,
            s.ready_median_ms,
            s.ready_max_ms,
            s.cn_up_median_ms,
            s.cn_up_max_ms,
            mib(rss),
            s.process_median_ms,
            s.state_identity_median_ms,
            s.device_port_median_ms,
            s.control_metrics_median_ms,
        );
    }
    md.push_str(
        "\n| devices connected | VmRSS | VmHWM | per device | connect all (loadgen) | handshake p50 / p99 | still connected at the end |\n\
         |---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for m in memory {
        let _ = writeln!(
            md,
            "| {} | {:.1} MiB | {:.1} MiB | {} | {} | {} | {} |",
            m.gateway_connections,
            mib(m.rss_kib),
            mib(m.hwm_kib),
            m.per_device_kib
                .map(|k| format!("{k:.1} KiB"))
                .unwrap_or_else(|| "—".into()),
            if m.devices > 0 {
                format!("{:.2} s", m.connect_s)
            } else {
                "—".into()
            },
            if m.devices > 0 {
                format!("{:.1} / {:.1} ms", m.connect_p50_ms, m.connect_p99_ms)
            } else {
                "—".into()
            },
            if m.devices > 0 {
                format!("{} of {}", m.still_connected, m.devices)
            } else {
                "—".into()
            },
        );
    }
    md.push('\n');
    let base = memory.iter().find(|m| m.devices == 0);
    let per = memory.iter().rev().find_map(|m| m.per_device_kib);
    if let (Some(b), Some(per)) = (base, per) {
        let _ = write!(
            md,
            "An idle gatewayd holds {:.1} MiB (code, tokio's workers, SQLite's page cache, the CN \
             session); each connected device adds about {per:.0} KiB. Most of it is quinn's \
             per-connection state: heaptrack on the client side of the same connections \
             (`loadgen hold`, system allocator) puts ~6 KiB in the connection state machine and \
             ~6 KiB in the first block of the event channel quinn opens between the endpoint and \
             each connection, then the TLS session kept after the handshake (keys, handshake \
             buffers) and the sent-packet bookkeeping; gatewayd adds its connection task and an \
             entry in its connection table. The target was first missed (73 MiB with 1,000 \
             devices, 23 MiB idle): mimalloc `madvise`d its arenas for transparent huge pages, so \
             every touched 2 MiB became resident; gatewayd now builds mimalloc with `no_thp`. ",
            mib(b.rss_kib)
        );
    }
    let at_ready = |s: &StartupSummary| {
        s.startups
            .iter()
            .map(|x| x.rss_at_ready_kib)
            .max()
            .unwrap_or(0) as f64
    };
    if paired > 0 {
        let per_pairing = (at_ready(populated) - at_ready(fresh)) / paired as f64;
        let _ = write!(
            md,
            "Pairings cost memory of their own, kept when devices disconnect: {:.1} KiB each \
             (RSS at ready with {paired} stored pairings against a fresh directory), included \
             in the per-device figure above. ",
            per_pairing.max(0.0)
        );
    }
    let (fname, fms) = largest_phase(fresh);
    let (pname, pms) = largest_phase(populated);
    let _ = write!(
        md,
        "Start-up: with a fresh state directory the largest phase is {fname} ({fms:.1} of \
         {:.1} ms, median); with {paired} pairings it is {pname} ({pms:.1} of {:.1} ms). The CN \
         link is up {:.1} ms after the ready file (one QUIC/TLS handshake and one 5G AKA round \
         trip to the local CN): devices can be provisioned {:.1} ms after the start.",
        fresh.ready_median_ms,
        populated.ready_median_ms,
        (fresh.cn_up_median_ms - fresh.ready_median_ms).max(0.0),
        fresh.cn_up_median_ms,
    );
    if quick {
        md.push_str(" *(Quick mode: small counts; the per-device figure is noisy.)*");
    }
    md.push('\n');
    md
}

#[cfg(test)]
mod tests;
