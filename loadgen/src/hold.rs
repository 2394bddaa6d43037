//! `loadgen hold`: N paired devices connected to gatewayd at once, held open — to measure what
//! idle connected devices cost the gateway (resident memory, CPU).
//!
//! 1. [`Fleet::prepare`]: keys and bulk pairing.
//! 2. At most C devices connect at a time, each through the same handshake as
//!    `loadgen handshake` ([`crate::handshake::connect`]: established once the gateway confirmed
//!    it), then keeps its connection open: no stream, QUIC keep-alives every `--keep-alive`
//!    seconds (below gatewayd's `[devices] idle_timeout`, 30 s by default).
//! 3. Once every device has connected or failed, writes the ready file
//!    `{"connected": n, "failed": m, ...}` (atomically: written aside, then renamed).
//! 4. Holds until SIGTERM or SIGINT, or `--hold-for` seconds; then counts the connections still
//!    open (and why the others ended), closes them (application code 0) and reports.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use companion_transport::Limits;
use serde_json::json;
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio::sync::Semaphore;

use crate::fleet::{Fleet, Load, client_endpoints, progress_bar};
use crate::handshake::{Connects, HandshakeError, per_second, spawn_connects};
use crate::report::{HoldReport, Recorder};

/// What `loadgen hold` does.
#[derive(Debug, Clone)]
pub struct HoldOptions {
    /// The devices, how many at once, and the gateway they go to.
    pub load: Load,
    /// Longest single handshake.
    pub timeout: Duration,
    /// QUIC keep-alive interval of the held connections.
    pub keep_alive: Duration,
    /// End the hold after this long (`None`: on SIGTERM/SIGINT only).
    pub hold_for: Option<Duration>,
    /// Written once every device has connected or failed.
    pub ready_file: Option<PathBuf>,
}

/// The signals that end a hold.
struct Stop {
    term: Signal,
    int: Signal,
}

impl Stop {
    fn new() -> anyhow::Result<Self> {
        Ok(Self {
            term: signal(SignalKind::terminate()).context("SIGTERM handler")?,
            int: signal(SignalKind::interrupt()).context("SIGINT handler")?,
        })
    }

    /// Waits for a signal (or `deadline`); names what ended the wait.
    async fn wait(&mut self, deadline: Option<tokio::time::Instant>) -> &'static str {
        let timer = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
            () = timer => "hold-for",
        }
    }
}

/// Connects the devices, holds them, closes them; returns the report.
pub async fn run(opts: HoldOptions) -> anyhow::Result<HoldReport> {
    anyhow::ensure!(
        opts.load.concurrency > 0,
        "--concurrency must be at least 1"
    );
    anyhow::ensure!(
        !opts.keep_alive.is_zero(),
        "--keep-alive must be longer than 0 s"
    );
    // Installed first: a SIGTERM during pairing or connecting ends the run cleanly too.
    let mut stop = Stop::new()?;
    let fleet = Fleet::prepare(&opts.load.fleet(false, true)).await?;
    let endpoints = client_endpoints(opts.load.gateway, opts.load.endpoints)?;
    let limits = Arc::new(Limits {
        keep_alive: Some(opts.keep_alive),
        ..Limits::device_link()
    });

    let bar = progress_bar(opts.load.progress, opts.load.devices as u64, "connecting");
    let sem = Arc::new(Semaphore::new(opts.load.concurrency));
    let started = Instant::now();
    let connects = Connects {
        gateway: opts.load.gateway,
        timeout: opts.timeout,
    };
    let mut tasks = spawn_connects(
        &fleet,
        &endpoints,
        &connects,
        limits,
        sem,
        bar.clone(),
        |r| r,
    );
    let mut latency = Recorder::new().context("latency histogram")?;
    let mut conns: Vec<quinn::Connection> = Vec::with_capacity(opts.load.devices);
    let mut failures: BTreeMap<String, u64> = BTreeMap::new();
    let mut last_error: Option<String> = None;
    let mut note_failure = |failures: &mut BTreeMap<String, u64>, e: &HandshakeError| {
        *failures.entry(e.reason().to_string()).or_default() += 1;
        last_error = Some(e.to_string());
    };
    let connect_all = async {
        while let Some(r) = tasks.join_next().await {
            match r {
                Ok(Ok(e)) => {
                    latency.record(e.confirmed);
                    conns.push(e.conn);
                }
                Ok(Err(e)) => note_failure(&mut failures, &e),
                Err(e) => note_failure(
                    &mut failures,
                    &HandshakeError::Local(format!("device task: {e}")),
                ),
            }
        }
    };
    let interrupted = tokio::select! {
        () = connect_all => None,
        why = stop.wait(None) => Some(why),
    };
    let connect_s = started.elapsed().as_secs_f64();
    bar.finish_and_clear();
    // Devices still connecting when a signal came count as failed.
    let unfinished = tasks.len() as u64;
    tasks.abort_all();
    if unfinished > 0 {
        *failures.entry("interrupted".into()).or_default() += unfinished;
    }
    let connected = conns.len() as u64;
    let failed = failures.values().sum::<u64>();

    if let Some(path) = &opts.ready_file {
        let ready = json!({
            "connected": connected,
            "failed": failed,
            "devices": opts.load.devices,
            "pid": std::process::id(),
            "connect_duration_s": (connect_s * 1000.0).round() / 1000.0,
            "failures_by_reason": failures,
        });
        write_atomically(path, &ready.to_string())?;
    }
    eprintln!(
        "loadgen hold: {connected} connected, {failed} failed; holding until {}",
        match (interrupted, opts.hold_for) {
            (Some(_), _) => "now (interrupted)".to_string(),
            (None, Some(d)) => format!("{} s have passed or SIGTERM/SIGINT", d.as_secs_f64()),
            (None, None) => "SIGTERM/SIGINT".to_string(),
        }
    );

    let held_from = Instant::now();
    let ended_by = match interrupted {
        Some(why) => why,
        None => {
            let deadline = opts
                .hold_for
                .map(|d| tokio::time::Instant::from_std(held_from + d));
            stop.wait(deadline).await
        }
    };
    let held_s = held_from.elapsed().as_secs_f64();

    let mut closed_by_reason: BTreeMap<String, u64> = BTreeMap::new();
    let mut still = 0u64;
    for c in &conns {
        match c.close_reason() {
            Some(e) => *closed_by_reason.entry(end_reason(&e)).or_default() += 1,
            None => still += 1,
        }
        c.close(0u32.into(), b"done");
    }
    drop(conns);
    for ep in &endpoints {
        let _ = tokio::time::timeout(Duration::from_secs(2), ep.wait_idle()).await;
        ep.close(0u32.into(), b"done");
    }
    if let Some(path) = &opts.ready_file {
        let _ = std::fs::remove_file(path);
    }
    Ok(HoldReport {
        devices: opts.load.devices as u64,
        concurrency: opts.load.concurrency as u64,
        succeeded: connected,
        failed,
        duration_s: (connect_s * 1000.0).round() / 1000.0,
        throughput_per_s: per_second(connected, connect_s),
        latency_ms: latency.latency(),
        pairing_s: fleet.pairing_s,
        keep_alive_s: opts.keep_alive.as_secs_f64(),
        held_s: (held_s * 1000.0).round() / 1000.0,
        ended_by: ended_by.to_string(),
        still_connected: still,
        closed_early: closed_by_reason.values().sum(),
        closed_by_reason,
        failures_by_reason: failures,
        last_error,
        gateway: opts.load.gateway.to_string(),
    })
}

/// Why a held connection ended before the hold did.
fn end_reason(e: &quinn::ConnectionError) -> String {
    use quinn::ConnectionError as C;
    match e {
        C::ApplicationClosed(a) => format!("closed_by_gateway_{}", u64::from(a.error_code)),
        C::ConnectionClosed(_) => "transport_closed".into(),
        C::TimedOut => "timed_out".into(),
        C::Reset => "reset".into(),
        C::LocallyClosed => "locally_closed".into(),
        C::VersionMismatch => "version_mismatch".into(),
        C::TransportError(_) => "transport_error".into(),
        C::CidsExhausted => "cids_exhausted".into(),
    }
}

/// Writes `text` beside `path` and renames it into place, so a reader never sees half of it.
fn write_atomically(path: &Path, text: &str) -> anyhow::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))
}
