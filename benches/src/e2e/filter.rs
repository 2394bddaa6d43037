//! The LAN filter under a flood: the eBPF program (XDP, and TC ingress) against the userspace
//! fallback, on the same flood, in one run.
//!
//! Topology: two network namespaces joined by a veth pair; `cn-backend` and `gatewayd` run in the
//! gateway namespace (`ip netns exec`), `loadgen flood` in the attacker namespace sends short QUIC
//! Initials (200 bytes, dropped by every mode: RFC 9000 §14.1) from ten source addresses as fast
//! as it can. For each mode a fresh gatewayd is started with `[filter] mode` set, and the flood's
//! report, the filter's counters (`gatewayctl status --json`) and the CPU time are compared:
//!
//! - the filter's **own** CPU: the BPF program's run time (`run_time_ns` in the fdinfo of
//!   gatewayd's program descriptor, with `kernel.bpf_stats_enabled=1` during the flood and the
//!   old value restored after) for XDP/TC; gatewayd's CPU time for the userspace fallback;
//! - the **receive path** CPU: the softirq time of the flooder's CPU (`/proc/stat`) plus
//!   gatewayd's CPU time. On a veth the receiver's work (the veth's NAPI poll with native XDP,
//!   the backlog with TC and the socket path) runs in softirq on the sending CPU; the flooder is
//!   pinned to CPU 0 and gatewayd to CPU 1, so each is counted once, whatever else the machine
//!   is doing (other work rarely runs in softirq). The target is judged on this figure;
//! - the **machine-wide** CPU: busy time of every CPU from `/proc/stat` (user, system, irq,
//!   softirq) minus the flooder's own sending. The kernel here accounts CPU by ticks, so the
//!   softirq work that runs in the flooder's context is charged to the flooder too (its rusage,
//!   read as the suite's reaped children's time); the flooder's own sending is taken as its CPU
//!   time minus its CPU's softirq time. Meaningful only on an otherwise idle machine.
//!
//! No steering (RPS, threaded NAPI) is used: every mode's receive path runs where a flood's
//! would, in softirq, without inter-processor interrupts (costly in a VM) that would tax some
//! modes more than others.
//!
//! Needs root. Namespaces and the sysctl are restored by guards, also when the suite fails.

use std::fmt::Write as _;
use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail, ensure};
use serde::Serialize;

use super::harness::{self, Cn, Daemon, Gateway, GatewaySettings, gateway_status};
use super::{Env, SuiteReport, Target, round};

mod cpu;
mod report;
mod topology;

use cpu::*;
use report::*;
use topology::*;

/// The gateway's address on the veth and the QUIC port gatewayd listens on.
const GW_ADDR: &str = "10.210.0.1";
const PORT: u16 = 4433;
/// The attacker's source addresses (assigned to its veth end).
const SOURCES: std::ops::RangeInclusive<u8> = 10..=19;
/// Filter modes measured, in order: the eBPF program first, then the fallback.
const MODES: [&str; 3] = ["xdp", "tc", "userspace"];
/// The target: XDP drops at least this many times more packets per CPU-second.
const TARGET_RATIO: f64 = 10.0;
/// One filter mode under the flood.
#[derive(Debug, Clone, Serialize)]
pub struct ModeRun {
    /// `[filter] mode` asked for.
    pub requested: &'static str,
    /// The mode gatewayd reports (`xdp`, `xdp_generic`, `tc`, `userspace`).
    pub mode: String,
    /// Datagrams the flooder sent, and over how long.
    pub offered: u64,
    /// Length of the flood, seconds.
    pub elapsed_s: f64,
    /// Datagrams per second the flooder sent.
    pub offered_pps: f64,
    /// Datagrams the filter dropped (its counters, every drop reason).
    pub dropped: u64,
    /// Datagrams per second the filter dropped.
    pub dropped_pps: f64,
    /// Dropped as a share of sent, percent.
    pub dropped_pct_of_offered: f64,
    /// Datagrams the filter let through (0 expected: every datagram is a short Initial).
    pub passed: u64,
    /// Lost before the filter saw them: the veth's drop counters (NAPI ring or backlog full).
    pub lost_in_veth: u64,
    /// Lost at gatewayd's UDP socket (receive buffer full: `RcvbufErrors`), userspace mode.
    pub lost_at_socket: u64,
    /// Whether the receive side, rather than the flooder, bounded the drop rate (more than 1%
    /// of the offered datagrams lost before the filter).
    pub receive_side_saturated: bool,
    /// CPU seconds: the filter's own (BPF run time, or gatewayd's CPU in userspace).
    pub own_cpu_s: f64,
    /// How the filter's own CPU was measured (BPF run time or gatewayd's CPU).
    pub own_cpu_measure: &'static str,
    /// The receive path: softirq time of the flooder's CPU + gatewayd's CPU time.
    pub rx_cpu_s: f64,
    /// Machine-wide busy CPU seconds minus the flooder's own sending.
    pub machine_cpu_s: f64,
    /// Machine-wide busy CPU seconds during the flood (all CPUs), the flooder's CPU time
    /// (including the softirq work run in its context) and the softirq time of its CPU.
    pub machine_busy_s: f64,
    /// The flooder's CPU seconds (with the softirq work charged to it).
    pub flooder_cpu_s: f64,
    /// Softirq seconds of the flooder's CPU.
    pub flooder_cpu_softirq_s: f64,
    /// Softirq time of all CPUs.
    pub softirq_s: f64,
    /// Busy CPUs (in cores) just before the flood: what other work the machine was doing.
    pub background_busy_cores: f64,
    /// gatewayd's CPU seconds during the flood (in eBPF modes: its map syncs only).
    pub gatewayd_cpu_s: f64,
    /// Program runs counted by the kernel (eBPF modes).
    pub bpf_run_cnt: Option<u64>,
    /// Derived: ns of CPU per dropped packet and dropped packets per CPU-second.
    pub own_ns_per_drop: f64,
    /// Drops per CPU-second of the filter's own work.
    pub own_drops_per_cpu_s: f64,
    /// Receive-path CPU nanoseconds per dropped datagram.
    pub rx_ns_per_drop: f64,
    /// Drops per receive-path CPU-second (the figure the target judges).
    pub rx_drops_per_cpu_s: f64,
    /// Machine-wide CPU nanoseconds per dropped datagram.
    pub machine_ns_per_drop: f64,
    /// Drops per machine-wide CPU-second.
    pub machine_drops_per_cpu_s: f64,
}

/// Runs the filter suite (needs root).
pub fn run(env: &Env) -> anyhow::Result<SuiteReport> {
    ensure_root()?;
    for tool in ["ip", "taskset"] {
        ensure!(
            Command::new(tool)
                .arg("-V")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok(),
            "the filter suite needs `{tool}` (iproute2 / util-linux)"
        );
    }
    let cpus = online_cpus()?;
    let pin = cpus >= 2;
    let secs: u64 = if env.quick { 2 } else { 10 };
    let dir = env.scratch("filter")?;
    // Dropped last: after every daemon in its namespace is gone.
    let topo = Topology::create(std::process::id() % 100_000)?;
    let cn = Cn::start_in(&env.bins, &dir, 10, Some(&topo.gw))?;
    let mut runs = Vec::new();
    for mode in MODES {
        let r = one(env, &topo, &cn, &dir, mode, secs, pin)
            .with_context(|| format!("filter mode {mode}"))?;
        eprintln!(
            "  filter {:<11} offered {:>7.0} pps, dropped {:>7.0} pps ({:.1}%); ns/drop: own {:.0}, receive path {:.0}, machine {:.0}",
            r.mode,
            r.offered_pps,
            r.dropped_pps,
            r.dropped_pct_of_offered,
            r.own_ns_per_drop,
            r.rx_ns_per_drop,
            r.machine_ns_per_drop
        );
        runs.push(r);
    }
    drop(cn);
    drop(topo);
    report(&runs, cpus, pin, secs, env.quick)
}

/// One mode: a fresh gatewayd, the flood, the figures.
fn one(
    env: &Env,
    topo: &Topology,
    cn: &Cn,
    dir: &Path,
    requested: &'static str,
    secs: u64,
    pin: bool,
) -> anyhow::Result<ModeRun> {
    let gw_dir = dir.join(format!("gw-{requested}"));
    let settings = GatewaySettings {
        filter_mode: requested,
        cn_sessions: 1,
        ..GatewaySettings::default()
    };
    let cfg = Gateway::write_config(&gw_dir, cn, &settings, &format!("0.0.0.0:{PORT}"))?;
    if requested != "userspace" {
        // The eBPF modes attach to the gateway's LAN side.
        let text = fs::read_to_string(&cfg)?;
        let patched = text.replacen(
            "[filter]\n",
            &format!("[filter]\ninterfaces = [\"{}\"]\n", topo.gw_if),
            1,
        );
        ensure!(patched != text, "no [filter] table in {}", cfg.display());
        fs::write(&cfg, patched)?;
    }
    let ready = gw_dir.join("gw-ready.json");
    // gatewayd on CPU 1, away from the flooder's CPU and the softirq work there.
    let mut c = if pin {
        let mut c = Command::new("taskset");
        c.args(["-c", "1", "ip"]);
        c
    } else {
        Command::new("ip")
    };
    c.args(["netns", "exec", &topo.gw])
        .arg(env.bins.path("gatewayd"))
        .arg("--config")
        .arg(&cfg)
        .arg("--ready-file")
        .arg(&ready);
    let daemon = Daemon::spawn("gatewayd", c, &ready, &gw_dir.join("gatewayd.log"))?;
    let gw = Gateway {
        dir: gw_dir.clone(),
        daemon,
    };
    let control = gw.control()?;
    let st = gateway_status(Path::new(&control))?;
    let mode = st["filter"]["mode"]
        .as_str()
        .ok_or_else(|| anyhow!("no filter mode in gatewayctl status: {st}"))?
        .to_string();
    let expected: &[&str] = match requested {
        "xdp" => &["xdp", "xdp_generic"],
        "tc" => &["tc"],
        _ => &["userspace"],
    };
    ensure!(
        expected.contains(&mode.as_str()),
        "gatewayd runs the filter in mode {mode}, not {requested}: {}",
        st["filter"]["fallback_reason"]
            .as_str()
            .unwrap_or("(no reason given)")
    );
    let ebpf = mode != "userspace";
    // What the machine does without the flood, for the reader to judge the noise.
    let bg_window = if env.quick {
        Duration::from_millis(300)
    } else {
        Duration::from_secs(1)
    };
    let flooder_cpu = pin.then_some(0);
    let b0 = busy_ticks(flooder_cpu)?;
    let t0 = Instant::now();
    std::thread::sleep(bg_window);
    let background_busy_cores = busy_ticks(flooder_cpu)?.busy.saturating_sub(b0.busy) as f64
        / USER_HZ
        / t0.elapsed().as_secs_f64();

    let stats = if ebpf {
        Some(BpfStats::enable()?)
    } else {
        None
    };
    let prog_type = if mode == "tc" {
        PROG_TYPE_SCHED_CLS
    } else {
        PROG_TYPE_XDP
    };
    let pid = gw.daemon.pid();
    let counters0 = counters(&control)?;
    let bpf0 = if ebpf {
        Some(bpf_prog_stats(pid, prog_type)?)
    } else {
        None
    };
    let gw_cpu0 = gw.daemon.cpu()?;
    let veth0 = topo.veth_drops()?;
    let sock0 = rcvbuf_errors(&topo.gw)?;
    let children0 = children_cpu()?;
    let busy0 = busy_ticks(flooder_cpu)?;

    let flood = flood(env, topo, secs, pin)?;

    // The flooder has been reaped: its CPU time is now in ours as a child's. Read before any
    // other child (gatewayctl) is reaped.
    let busy1 = busy_ticks(flooder_cpu)?;
    let children1 = children_cpu()?;
    // Userspace: let gatewayd drain its socket buffer before reading the counters.
    std::thread::sleep(Duration::from_millis(300));
    let bpf1 = if ebpf {
        Some(bpf_prog_stats(pid, prog_type)?)
    } else {
        None
    };
    let gw_cpu1 = gw.daemon.cpu()?;
    let veth1 = topo.veth_drops()?;
    let sock1 = rcvbuf_errors(&topo.gw)?;
    let counters1 = counters(&control)?;
    drop(stats);
    gw.daemon.stop()?;

    let offered = json_u64(&flood, "sent")?;
    let elapsed_s = flood["elapsed_s"]
        .as_f64()
        .ok_or_else(|| anyhow!("flood report without elapsed_s: {flood}"))?;
    let dropped = dropped(&counters1)?.saturating_sub(dropped(&counters0)?);
    let passed = json_u64(&counters1, "passed")?.saturating_sub(json_u64(&counters0, "passed")?);
    let lost_in_veth = veth1.saturating_sub(veth0);
    let lost_at_socket = sock1.saturating_sub(sock0);
    let gatewayd_cpu_s = (gw_cpu1.saturating_sub(gw_cpu0)).as_secs_f64();
    let (own_cpu_s, own_cpu_measure, bpf_run_cnt) = match (bpf0, bpf1) {
        (Some(a), Some(b)) => (
            b.run_time_ns.saturating_sub(a.run_time_ns) as f64 / 1e9,
            "BPF program run time (kernel.bpf_stats_enabled)",
            Some(b.run_cnt.saturating_sub(a.run_cnt)),
        ),
        _ => (gatewayd_cpu_s, "gatewayd CPU time (user + system)", None),
    };
    let ticks = |a: u64, b: u64| b.saturating_sub(a) as f64 / USER_HZ;
    let machine_busy_s = ticks(busy0.busy, busy1.busy);
    let softirq_s = ticks(busy0.softirq, busy1.softirq);
    let flooder_cpu_softirq_s = ticks(busy0.flooder_softirq, busy1.flooder_softirq);
    let flooder_cpu_s = ticks(children0, children1);
    let rx_cpu_s = flooder_cpu_softirq_s + gatewayd_cpu_s;
    let machine_cpu_s =
        (machine_busy_s - (flooder_cpu_s - flooder_cpu_softirq_s).max(0.0)).max(0.0);
    ensure!(
        offered > 0 && dropped > 0,
        "the filter dropped {dropped} of {offered} datagrams offered: the flood did not reach it \
         (counters {counters0} -> {counters1})"
    );
    if let Some(n) = bpf_run_cnt {
        ensure!(
            n > 0 && own_cpu_s > 0.0,
            "the BPF program ran {n} times for {own_cpu_s} s: were the BPF stats turned off \
             (kernel.bpf_stats_enabled) during the flood?"
        );
    }
    let per = |cpu: f64| {
        if dropped == 0 || cpu <= 0.0 {
            (0.0, 0.0)
        } else {
            (cpu * 1e9 / dropped as f64, dropped as f64 / cpu)
        }
    };
    let (own_ns_per_drop, own_drops_per_cpu_s) = per(own_cpu_s);
    let (rx_ns_per_drop, rx_drops_per_cpu_s) = per(rx_cpu_s);
    let (machine_ns_per_drop, machine_drops_per_cpu_s) = per(machine_cpu_s);
    Ok(ModeRun {
        requested,
        mode,
        offered,
        elapsed_s,
        offered_pps: offered as f64 / elapsed_s.max(1e-9),
        dropped,
        dropped_pps: dropped as f64 / elapsed_s.max(1e-9),
        dropped_pct_of_offered: 100.0 * dropped as f64 / offered.max(1) as f64,
        passed,
        lost_in_veth,
        lost_at_socket,
        receive_side_saturated: (lost_in_veth + lost_at_socket) * 100 > offered,
        own_cpu_s,
        own_cpu_measure,
        rx_cpu_s,
        machine_cpu_s,
        machine_busy_s,
        flooder_cpu_s,
        flooder_cpu_softirq_s,
        softirq_s,
        background_busy_cores,
        gatewayd_cpu_s,
        bpf_run_cnt,
        own_ns_per_drop,
        own_drops_per_cpu_s,
        rx_ns_per_drop,
        rx_drops_per_cpu_s,
        machine_ns_per_drop,
        machine_drops_per_cpu_s,
    })
}

/// `loadgen flood` of short Initials from the attacker namespace, as fast as it goes for
/// `secs` seconds, pinned to CPU 0; returns its JSON report.
fn flood(env: &Env, topo: &Topology, secs: u64, pin: bool) -> anyhow::Result<serde_json::Value> {
    let mut c = if pin {
        let mut c = Command::new("taskset");
        c.args(["-c", "0", "ip"]);
        c
    } else {
        Command::new("ip")
    };
    c.args(["netns", "exec", &topo.atk])
        .arg(env.bins.path("loadgen"))
        .args([
            "flood",
            "--allow-target",
            "--json",
            "--pattern",
            "short-initial",
        ])
        .arg("--target")
        .arg(format!("{GW_ADDR}:{PORT}"))
        .arg("--sources")
        .arg(format!(
            "{}-{}",
            topo.addr(*SOURCES.start()),
            topo.addr(*SOURCES.end())
        ))
        .args(["--count", "1000000000", "--batch", "64"])
        .arg("--duration")
        .arg(secs.to_string());
    let out = harness::run(c, "loadgen flood")?;
    serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "parsing loadgen flood's report: {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

fn ensure_root() -> anyhow::Result<()> {
    let s = fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    let euid = s
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|r| r.split_whitespace().nth(1))
        .ok_or_else(|| anyhow!("no Uid line in /proc/self/status"))?;
    if euid != "0" {
        bail!(
            "the filter suite needs root (network namespaces, XDP/TC, kernel.bpf_stats_enabled); \
             run e2e-bench as root, or leave `filter` out of --suites"
        );
    }
    Ok(())
}

fn counters(control: &str) -> anyhow::Result<serde_json::Value> {
    Ok(gateway_status(Path::new(control))?["filter"]["counters"].clone())
}

fn json_u64(v: &serde_json::Value, k: &str) -> anyhow::Result<u64> {
    v[k].as_u64()
        .ok_or_else(|| anyhow!("no integer {k:?} in {v}"))
}

/// Every drop reason of the filter's counters.
fn dropped(c: &serde_json::Value) -> anyhow::Result<u64> {
    [
        "dropped_short_initial",
        "rate_limited",
        "denied",
        "not_paired",
    ]
    .iter()
    .map(|k| json_u64(c, k))
    .sum()
}
