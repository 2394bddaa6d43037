//! The filter suite's report: per-mode figures, the target, and the markdown section.

use super::*;

pub(super) fn report(
    runs: &[ModeRun],
    cpus: usize,
    pin: bool,
    secs: u64,
    quick: bool,
) -> anyhow::Result<SuiteReport> {
    let find = |m: &str| runs.iter().find(|r| r.requested == m);
    let xdp = find("xdp").ok_or_else(|| anyhow!("no XDP run"))?;
    let user = find("userspace").ok_or_else(|| anyhow!("no userspace run"))?;
    let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { 0.0 };
    let rx_ratio = ratio(xdp.rx_drops_per_cpu_s, user.rx_drops_per_cpu_s);
    let machine_ratio = ratio(xdp.machine_drops_per_cpu_s, user.machine_drops_per_cpu_s);
    let own_ratio = ratio(xdp.own_drops_per_cpu_s, user.own_drops_per_cpu_s);

    let mut md = String::new();
    md.push_str("### LAN filter: XDP and TC against the userspace fallback\n\n");
    let _ = writeln!(
        md,
        "A {secs} s flood of 200-byte QUIC Initials (dropped by every mode, RFC 9000 §14.1) from 10 \
         source addresses, `loadgen flood` as fast as it goes, from an attacker namespace over a \
         veth pair into the namespace where gatewayd (and cn-backend) run; a fresh gatewayd per \
         mode{}. CPU per dropped packet, three ways: *own*, the BPF program's run time \
         (`kernel.bpf_stats_enabled`) for XDP/TC and gatewayd's CPU time for userspace; \
         *receive path*, the softirq time of the flooder's CPU (where a veth's receiver runs: \
         NAPI poll with native XDP, backlog with TC and the socket path) plus gatewayd's CPU time \
         — the target's measure, as it charges every mode for everything the kernel and gatewayd \
         do with the flood and is immune to unrelated work; *machine*, busy time of all {cpus} \
         CPUs (`/proc/stat`) minus the flooder's sending (its CPU time minus its CPU's softirq, \
         which tick accounting also charges to it), meaningful on an idle machine only.\n",
        if pin {
            "; the flooder is pinned to CPU 0, gatewayd to CPU 1"
        } else {
            " (one CPU, nothing pinned)"
        }
    );
    md.push_str(
        "| mode | offered pps | dropped pps | dropped % | lost in veth | lost at socket |\n\
         |---|---:|---:|---:|---:|---:|\n",
    );
    for r in runs {
        let _ = writeln!(
            md,
            "| {} | {:.0} | {:.0} | {:.1}% | {} | {} |",
            r.mode,
            r.offered_pps,
            r.dropped_pps,
            r.dropped_pct_of_offered,
            r.lost_in_veth,
            r.lost_at_socket,
        );
    }
    md.push_str(
        "\n| mode | own ns/drop | drops per own CPU-s | receive path ns/drop | drops per \
         receive-path CPU-s | machine ns/drop | drops per machine CPU-s |\n\
         |---|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in runs {
        let _ = writeln!(
            md,
            "| {} | {:.0} | {} | {:.0} | {} | {:.0} | {} |",
            r.mode,
            r.own_ns_per_drop,
            human(r.own_drops_per_cpu_s),
            r.rx_ns_per_drop,
            human(r.rx_drops_per_cpu_s),
            r.machine_ns_per_drop,
            human(r.machine_drops_per_cpu_s),
        );
    }
    md.push('\n');
    let _ = writeln!(
        md,
        "XDP vs userspace, drops per CPU-second: **{rx_ratio:.1}×** on the receive path, \
         {own_ratio:.1}× on the filters' own CPU, {machine_ratio:.1}× machine-wide. Background \
         load before the floods: {} cores busy.\n",
        runs.iter()
            .map(|r| format!("{:.2}", r.background_busy_cores))
            .collect::<Vec<_>>()
            .join(" / ")
    );
    let busiest = runs
        .iter()
        .map(|r| r.background_busy_cores)
        .fold(0.0, f64::max);
    if busiest > 0.25 {
        let _ = writeln!(
            md,
            "**The machine was not idle ({busiest:.2} cores busy before a flood): the machine-wide \
             figures include that other work and do not mean much, and the other figures are \
             provisional; rerun on a quiet machine.**\n"
        );
    }
    let _ = write!(
        md,
        "The XDP program itself costs {:.0} ns per packet, but its receive path {:.0} ns per drop: \
         on veth, native XDP gets skbs the sender already built and copies each into a page-pool \
         page with XDP headroom before running the program (in a profile, `skb_pp_cow_data` is \
         half of the veth's NAPI poll, the program under a tenth), whereas on a NIC driver it \
         runs on the DMA buffer before any skb exists. ",
        xdp.own_ns_per_drop, xdp.rx_ns_per_drop
    );
    if let Some(tc) = find("tc") {
        let _ = write!(
            md,
            "TC ingress judges the skb after the veth's backlog ({:.0} ns per drop, {:.0} ns of it \
             the program). ",
            tc.rx_ns_per_drop, tc.own_ns_per_drop
        );
    }
    let _ = write!(
        md,
        "The userspace fallback pays the whole UDP receive path (IP, socket lookup and buffer, \
         wake-up, `recvmmsg` copy; {:.0} ns per drop, {:.0} ns of it in gatewayd) before judging a \
         datagram, and judging itself is a few percent of gatewayd's profile",
        user.rx_ns_per_drop, user.own_ns_per_drop
    );
    if user.lost_at_socket > 0 {
        let _ = write!(
            md,
            "; its socket buffer overflowed for {:.1}% of the offered datagrams, lost after the \
             kernel's receive work",
            100.0 * user.lost_at_socket as f64 / user.offered.max(1) as f64
        );
    }
    md.push_str(". ");
    let saturated: Vec<&str> = runs
        .iter()
        .filter(|r| r.receive_side_saturated)
        .map(|r| r.mode.as_str())
        .collect();
    if saturated.is_empty() {
        md.push_str(
            "No mode lost more than 1% before its filter: the flooder, which also runs the \
             receive path on its CPU, bounded every drop rate, so the CPU per drop is the figure \
             to compare.",
        );
    } else {
        let _ = write!(
            md,
            "The receive side could not keep up with the flooder in: {}.",
            saturated.join(", ")
        );
    }
    md.push('\n');
    if quick {
        md.push_str("\n(quick mode: 2 s floods; figures are indicative only)\n");
    }

    let target = Target {
        goal: format!(
            "XDP filter drops ≥ {TARGET_RATIO:.0}× more packets per CPU-second than the userspace fallback"
        ),
        measured: format!(
            "{rx_ratio:.1}× on receive-path CPU ({} vs {} drops per CPU-s, {}); own CPU (BPF run \
             time vs gatewayd): {own_ratio:.1}× ({} vs {}); machine-wide: {machine_ratio:.1}×",
            human(xdp.rx_drops_per_cpu_s),
            human(user.rx_drops_per_cpu_s),
            xdp.mode,
            human(xdp.own_drops_per_cpu_s),
            human(user.own_drops_per_cpu_s),
        ),
        holds: rx_ratio >= TARGET_RATIO,
    };
    let data = serde_json::json!({
        "flood": {"pattern": "short-initial", "payload_bytes": 200, "sources": SOURCES.len(), "seconds": secs},
        "cpus": cpus,
        "pinned": pin,
        "target_measure": "receive_path",
        "xdp_vs_userspace_receive_path": round(rx_ratio, 2),
        "xdp_vs_userspace_machine": round(machine_ratio, 2),
        "xdp_vs_userspace_own": round(own_ratio, 2),
        "runs": runs,
    });
    Ok(SuiteReport {
        name: "filter",
        data,
        markdown: md,
        targets: vec![target],
    })
}

/// `12.3 M`, `456 k`.
pub(super) fn human(x: f64) -> String {
    if x >= 1e6 {
        format!("{:.1} M", x / 1e6)
    } else if x >= 1e3 {
        format!("{:.0} k", x / 1e3)
    } else {
        format!("{x:.0}")
    }
}
