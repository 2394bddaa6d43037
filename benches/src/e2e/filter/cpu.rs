//! CPU accounting of the flood: ticks per CPU from `/proc/stat`, the reaped children's time, and
//! the BPF programs' own run time (`run_time_ns` with `kernel.bpf_stats_enabled`, restored by a
//! guard).

use super::*;

/// `/proc/stat` and `/proc/<pid>/stat` count in USER_HZ ticks.
pub(super) const USER_HZ: f64 = 100.0;

/// Online CPUs (`cpuN` lines of /proc/stat).
pub(super) fn online_cpus() -> anyhow::Result<usize> {
    let s = fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    Ok(s.lines()
        .filter(|l| {
            l.strip_prefix("cpu")
                .is_some_and(|r| r.starts_with(|c: char| c.is_ascii_digit()))
        })
        .count())
}

/// Ticks from `/proc/stat`.
#[derive(Debug, Clone, Copy)]
pub(super) struct Ticks {
    /// All CPUs: user + nice + system + irq + softirq (not idle, iowait, steal; guest is in
    /// user).
    pub(super) busy: u64,
    /// All CPUs' softirq.
    pub(super) softirq: u64,
    /// The flooder's CPU's softirq (all CPUs' when it is not pinned).
    pub(super) flooder_softirq: u64,
}

pub(super) fn busy_ticks(flooder_cpu: Option<usize>) -> anyhow::Result<Ticks> {
    let s = fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    let fields = |name: &str| -> anyhow::Result<Vec<u64>> {
        let line = s
            .lines()
            .find(|l| l.split_whitespace().next() == Some(name))
            .ok_or_else(|| anyhow!("no {name} line in /proc/stat"))?;
        let f: Vec<u64> = line
            .split_whitespace()
            .skip(1)
            .map(|x| x.parse().context("parsing /proc/stat"))
            .collect::<anyhow::Result<_>>()?;
        ensure!(f.len() >= 7, "unexpected /proc/stat line: {line}");
        Ok(f)
    };
    // user nice system idle iowait irq softirq ...
    let all = fields("cpu")?;
    let flooder_softirq = match flooder_cpu {
        Some(n) => fields(&format!("cpu{n}"))?[6],
        None => all[6],
    };
    Ok(Ticks {
        busy: all[0] + all[1] + all[2] + all[5] + all[6],
        softirq: all[6],
        flooder_softirq,
    })
}

/// CPU ticks of this process's reaped children (cutime + cstime of /proc/self/stat).
pub(super) fn children_cpu() -> anyhow::Result<u64> {
    let stat = fs::read_to_string("/proc/self/stat").context("reading /proc/self/stat")?;
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or_else(|| anyhow!("unexpected /proc/self/stat: {stat}"))?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After the ')': field 3 is f[0], so cutime (16) is f[13] and cstime (17) f[14].
    let tick = |i: usize| -> anyhow::Result<u64> {
        f.get(i)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| anyhow!("unexpected /proc/self/stat: {stat}"))
    };
    Ok(tick(13)? + tick(14)?)
}

pub(super) const PROG_TYPE_SCHED_CLS: u32 = 3;

pub(super) const PROG_TYPE_XDP: u32 = 6;

#[derive(Debug, Clone, Copy, Default)]
pub(super) struct ProgStats {
    pub(super) run_time_ns: u64,
    pub(super) run_cnt: u64,
}

/// Run time and count of the BPF programs of type `prog_type` that process `pid` holds
/// (fdinfo of its `anon_inode:bpf-prog` descriptors), summed.
pub(super) fn bpf_prog_stats(pid: u32, prog_type: u32) -> anyhow::Result<ProgStats> {
    let fd_dir = format!("/proc/{pid}/fd");
    let mut total = ProgStats::default();
    let mut found = false;
    for e in fs::read_dir(&fd_dir).with_context(|| format!("reading {fd_dir}"))? {
        let e = e?;
        let Ok(link) = fs::read_link(e.path()) else {
            continue;
        };
        if link.as_os_str() != "anon_inode:bpf-prog" {
            continue;
        }
        let info_path = format!("/proc/{pid}/fdinfo/{}", e.file_name().to_string_lossy());
        let Ok(info) = fs::read_to_string(&info_path) else {
            continue;
        };
        let field = |k: &str| -> Option<u64> {
            info.lines()
                .find_map(|l| l.strip_prefix(k))
                .and_then(|r| r.strip_prefix(':'))
                .and_then(|v| v.trim().parse().ok())
        };
        if field("prog_type") != Some(u64::from(prog_type)) {
            continue;
        }
        let (Some(t), Some(n)) = (field("run_time_ns"), field("run_cnt")) else {
            bail!("{info_path} has no run_time_ns/run_cnt (kernel without BPF stats?)");
        };
        total.run_time_ns += t;
        total.run_cnt += n;
        found = true;
    }
    ensure!(
        found,
        "gatewayd (pid {pid}) holds no BPF program of type {prog_type}"
    );
    Ok(total)
}

/// `kernel.bpf_stats_enabled` on while alive; the old value restored on drop.
pub(super) struct BpfStats {
    pub(super) old: String,
}

pub(super) const BPF_STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";

impl BpfStats {
    pub(super) fn enable() -> anyhow::Result<Self> {
        let old = fs::read_to_string(BPF_STATS)
            .with_context(|| format!("reading {BPF_STATS}"))?
            .trim()
            .to_string();
        fs::write(BPF_STATS, "1").with_context(|| format!("writing {BPF_STATS}"))?;
        Ok(Self { old })
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        if let Err(e) = fs::write(BPF_STATS, &self.old) {
            eprintln!(
                "filter suite: could not restore {BPF_STATS} to {}: {e}",
                self.old
            );
        }
    }
}
