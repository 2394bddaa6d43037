//! Starting the real binaries for the end-to-end benchmarks (on `companion-testkit`), and reading
//! what the kernel knows about them.
//!
//! - this module: [`Daemon`] (a started binary with its ready file, killed on drop), running
//!   commands and `loadgen` to completion;
//! - [`daemons`]: the CN ([`Cn`]) and the gateway ([`Gateway`], [`GatewaySettings`]);
//! - [`delay`]: a UDP relay that delays every datagram ([`DelayProxy`]);
//! - [`stats`]: CPU time and resident memory from `/proc`.

pub mod daemons;
pub mod delay;
pub mod stats;

use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use companion_testkit::process::{self, Proc};

pub use companion_testkit::process::tail;
pub use companion_testkit::{Bins, COMPANION_K, COMPANION_OPC, COMPANION_SUPI};
pub use daemons::{Cn, Gateway, GatewaySettings};
pub use delay::DelayProxy;
pub use stats::{cpu_time, snmp_udp_rcvbuf_errors, status_kib, tree_cpu_time};

/// The release binaries in `dir` (`cargo build --release` output), after checking that every
/// binary the benchmarks start is there.
pub fn release_bins(dir: &Path) -> anyhow::Result<Bins> {
    let bins = Bins::new(dir);
    bins.require(
        &["cn-backend", "gatewayd", "gatewayctl", "loadgen"],
        "build the release binaries first \
         (`cargo build --release -p cn-backend -p gatewayd -p loadgen`) or pass --bin-dir",
    )?;
    Ok(bins)
}

/// A daemon started by a benchmark: killed (SIGKILL) and reaped when dropped.
#[derive(Debug)]
pub struct Daemon {
    /// What it is (`cn-backend`, `gatewayd`, `loadgen hold`).
    pub name: &'static str,
    /// The process.
    pub proc: Proc,
    /// Where its stderr goes.
    pub log: std::path::PathBuf,
    /// The daemon's ready file, parsed.
    pub ready: serde_json::Value,
    /// From spawn to the ready file appearing.
    pub start_to_ready: Duration,
}

impl Daemon {
    /// Spawns `cmd` (stderr to `log`) and waits up to 60 s for it to write `ready_file`.
    pub fn spawn(
        name: &'static str,
        cmd: Command,
        ready_file: &Path,
        log: &Path,
    ) -> anyhow::Result<Self> {
        Self::spawn_within(name, cmd, ready_file, log, Duration::from_secs(60))
    }

    /// [`spawn`](Self::spawn), waiting up to `limit` for the ready file.
    pub fn spawn_within(
        name: &'static str,
        cmd: Command,
        ready_file: &Path,
        log: &Path,
        limit: Duration,
    ) -> anyhow::Result<Self> {
        let s = process::start(name, cmd, ready_file, log, limit)?;
        Ok(Self {
            name,
            proc: s.proc,
            log: log.to_path_buf(),
            ready: s.ready,
            start_to_ready: s.start_to_ready,
        })
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// A string field of the ready file (`quic`, `http`, `devices`, `control`, `metrics`).
    pub fn ready_str(&self, key: &str) -> anyhow::Result<String> {
        Ok(process::ready_str(&self.ready, key, self.name)?)
    }

    /// CPU time (user + system) the daemon has used so far.
    pub fn cpu(&self) -> anyhow::Result<Duration> {
        cpu_time(self.pid())
    }

    /// Resident set size now, KiB.
    pub fn rss_kib(&self) -> anyhow::Result<u64> {
        status_kib(self.pid(), "VmRSS")
    }

    /// Peak resident set size, KiB.
    pub fn hwm_kib(&self) -> anyhow::Result<u64> {
        status_kib(self.pid(), "VmHWM")
    }

    /// SIGTERM, then up to 30 s for a clean exit (a daemon's final report is written by then)
    /// before the SIGKILL of `Drop`.
    pub fn stop(mut self) -> anyhow::Result<()> {
        let _ = self.proc.signal("-TERM");
        self.proc.wait_exit(Duration::from_secs(30))?;
        Ok(())
    }
}

/// Runs a command to completion; fails with its stderr when it exits non-zero.
pub fn run(cmd: Command, what: &str) -> anyhow::Result<std::process::Output> {
    Ok(process::run(cmd, what)?)
}

/// The figures of a loadgen report (`--json`) that the suites tabulate, read once here.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LoadgenFigures {
    /// Simulated devices.
    pub devices: u64,
    /// Devices that completed.
    pub succeeded: u64,
    /// Devices that failed.
    pub failed: u64,
    /// The run's wall time, seconds.
    pub duration_s: f64,
    /// Completed devices per second of wall time.
    pub throughput_per_s: f64,
    /// Latency percentiles of the completed devices, milliseconds.
    pub p50_ms: f64,
    /// 90th percentile, milliseconds.
    pub p90_ms: f64,
    /// 99th percentile, milliseconds.
    pub p99_ms: f64,
    /// Longest, milliseconds.
    pub max_ms: f64,
    /// Retries by reason, as loadgen counted them.
    pub retries_by_reason: serde_json::Value,
}

impl LoadgenFigures {
    /// Reads `rep`; a missing field reads as zero.
    pub fn of(rep: &serde_json::Value) -> Self {
        let f = |k: &str| rep[k].as_f64().unwrap_or(0.0);
        let n = |k: &str| rep[k].as_u64().unwrap_or(0);
        let lat = |k: &str| rep["latency_ms"][k].as_f64().unwrap_or(0.0);
        Self {
            devices: n("devices"),
            succeeded: n("succeeded"),
            failed: n("failed"),
            duration_s: f("duration_s"),
            throughput_per_s: f("throughput_per_s"),
            p50_ms: lat("p50_ms"),
            p90_ms: lat("p90_ms"),
            p99_ms: lat("p99_ms"),
            max_ms: lat("max_ms"),
            retries_by_reason: rep["retries_by_reason"].clone(),
        }
    }

    /// Retries of every reason.
    pub fn retries(&self) -> u64 {
        self.retries_by_reason
            .as_object()
            .map_or(0, |m| m.values().filter_map(|v| v.as_u64()).sum())
    }
}

/// Runs `loadgen <args>` with `--json <file>` appended and returns the parsed report. A loadgen
/// that reports failed devices (exit 1) still yields its report; any other failure is an error.
pub fn loadgen_json(bins: &Bins, dir: &Path, args: &[String]) -> anyhow::Result<serde_json::Value> {
    let out_file = dir.join(format!("loadgen-{}.json", std::process::id() ^ rand_tag()));
    let out = bins
        .command("loadgen")
        .args(args)
        .arg("--json")
        .arg(&out_file)
        .stdin(Stdio::null())
        .output()
        .context("starting loadgen")?;
    let code = out.status.code();
    if code != Some(0) && code != Some(1) {
        bail!(
            "loadgen {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let text = fs::read_to_string(&out_file)
        .with_context(|| format!("loadgen wrote no report ({})", out_file.display()))?;
    let _ = fs::remove_file(&out_file);
    serde_json::from_str(&text).context("parsing loadgen's JSON report")
}

fn rand_tag() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos())
}

/// Whether this process runs as root (network namespaces, XDP).
pub fn is_root() -> bool {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|r| r.split_whitespace().nth(1).map(|e| e == "0"))
        })
        .unwrap_or(false)
}

/// One JSON-lines request on gatewayd's control socket (`{"op":"status"}`): the status object
/// (what `gatewayctl status --json` prints).
pub fn gateway_status(control: &Path) -> anyhow::Result<serde_json::Value> {
    Ok(companion_testkit::gateway::status(control)?)
}

/// Polls gatewayd's status every millisecond until its CN link is up; when it was seen up.
pub fn wait_cn_up(control: &Path, limit: Duration) -> anyhow::Result<Instant> {
    Ok(companion_testkit::gateway::wait_cn(control, "up", limit)?)
}
