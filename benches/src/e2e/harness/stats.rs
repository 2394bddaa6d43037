//! What the kernel knows about a benchmarked process: CPU time (its own, or with its children's)
//! and resident memory, from `/proc/<pid>/stat` and `/proc/<pid>/status`.

use std::fs;
use std::time::Duration;

use anyhow::{Context, anyhow};

/// Clock ticks per second for `/proc/<pid>/stat` (USER_HZ; 100 on every Linux ABI we build for).
const USER_HZ: f64 = 100.0;

/// User + system CPU time of a process (and its reaped children are not included).
pub fn cpu_time(pid: u32) -> anyhow::Result<Duration> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // The command name (field 2) is in parentheses and may hold spaces: split after the last ')'.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or_else(|| anyhow!("unexpected /proc/{pid}/stat: {stat}"))?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After the ')': field 3 (state) is f[0], so utime (14) is f[11] and stime (15) f[12].
    let ticks = |i: usize| -> anyhow::Result<f64> {
        f.get(i)
            .and_then(|s| s.parse::<f64>().ok())
            .ok_or_else(|| anyhow!("unexpected /proc/{pid}/stat: {stat}"))
    };
    Ok(Duration::from_secs_f64((ticks(11)? + ticks(12)?) / USER_HZ))
}

/// User + system CPU time of process `pid` and of its children: the live ones (every process
/// whose parent is `pid`) and the reaped ones (`cutime` + `cstime` of `pid`). For a PostgreSQL
/// server: the postmaster and its backends and auxiliary processes.
pub fn tree_cpu_time(pid: u32) -> anyhow::Result<Duration> {
    let fields = |p: u32| -> Option<Vec<u64>> {
        let stat = fs::read_to_string(format!("/proc/{p}/stat")).ok()?;
        let rest = stat.rsplit_once(')')?.1;
        // After the ')': state f[0], ppid f[1], utime f[11], stime f[12], cutime f[13], cstime f[14].
        let f: Vec<&str> = rest.split_whitespace().collect();
        let n = |i: usize| f.get(i).and_then(|s| s.parse::<u64>().ok());
        Some(vec![n(1)?, n(11)?, n(12)?, n(13)?, n(14)?])
    };
    let root = fields(pid).ok_or_else(|| anyhow!("cannot read /proc/{pid}/stat"))?;
    let mut ticks = root[1] + root[2] + root[3] + root[4];
    for e in fs::read_dir("/proc").context("listing /proc")? {
        let Some(p) = e
            .ok()
            .and_then(|e| e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()))
        else {
            continue;
        };
        // A child that exits meanwhile is skipped here and counted in the parent's cutime.
        if let Some(f) = fields(p)
            && f[0] == u64::from(pid)
        {
            ticks += f[1] + f[2];
        }
    }
    Ok(Duration::from_secs_f64(ticks as f64 / USER_HZ))
}

/// A `kB` line of `/proc/<pid>/status` (`VmRSS`, `VmHWM`).
pub fn status_kib(pid: u32, key: &str) -> anyhow::Result<u64> {
    let s = fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    s.lines()
        .find_map(|l| {
            l.strip_prefix(key)
                .and_then(|r| r.strip_prefix(':'))
                .and_then(|r| r.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .ok_or_else(|| anyhow!("no {key} in /proc/{pid}/status"))
}

/// UDP `RcvbufErrors` (datagrams dropped at a full socket receive buffer) from the text of
/// `/proc/net/snmp`: its `Udp:` header line of names, then the line of values.
pub fn snmp_udp_rcvbuf_errors(snmp: &str) -> Option<u64> {
    let mut udp = snmp.lines().filter(|l| l.starts_with("Udp:"));
    let (names, values) = (udp.next()?, udp.next()?);
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(k, _)| *k == "RcvbufErrors")
        .and_then(|(_, v)| v.parse().ok())
}

#[cfg(test)]
mod tests {
    #[test]
    fn rcvbuf_errors_are_read_from_the_udp_lines_only() {
        let snmp = "Ip: Forwarding DefaultTTL\nIp: 1 64\n\
                    Udp: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors SndbufErrors\n\
                    Udp: 100 2 7 90 7 0\n\
                    UdpLite: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors SndbufErrors\n\
                    UdpLite: 0 0 0 0 99 0\n";
        assert_eq!(super::snmp_udp_rcvbuf_errors(snmp), Some(7));
        assert_eq!(super::snmp_udp_rcvbuf_errors("Ip: a\nIp: 1\n"), None);
    }
}
