//! Unit tests of the resources suite: its targets and its log reading.

use super::*;

#[test]
fn median_and_max_of_start_ups() {
    assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
    assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
    assert_eq!(median(&[]), 0.0);
    assert_eq!(max(&[1.5, 7.25, 3.0]), 7.25);
}

fn startup(ready_ms: f64) -> StartupSummary {
    summarize(
        "fresh",
        vec![Startup {
            ready_ms,
            cn_up_ms: ready_ms + 5.0,
            process_ms: 1.0,
            state_identity_ms: 2.0,
            device_port_ms: 3.0,
            control_metrics_ms: 4.0,
            rss_at_ready_kib: 1,
        }],
    )
}

/// A memory level with `connected` of `devices` connected.
fn level(devices: usize, rss_kib: u64, connected: u64) -> Memory {
    Memory {
        devices,
        connected,
        gateway_connections: connected,
        rss_kib,
        hwm_kib: rss_kib,
        anon_huge_kib: 0,
        per_device_kib: None,
        connect_s: 0.0,
        connect_p50_ms: 0.0,
        connect_p99_ms: 0.0,
        still_connected: connected,
    }
}

#[test]
fn targets_follow_the_figures() {
    let m = |devices: usize, rss_kib: u64| level(devices, rss_kib, devices as u64);
    let t = targets(
        &[m(0, 12_000), m(1000, 70_000)],
        &startup(20.0),
        &startup(30.0),
    );
    assert_eq!(t.len(), 2);
    assert!(!t[0].holds, "{t:?}");
    assert!(t[1].holds, "{t:?}");
    let t = targets(
        &[m(0, 12_000), m(1000, 50_000)],
        &startup(20.0),
        &startup(130.0),
    );
    assert!(t[0].holds, "{t:?}");
    assert!(!t[1].holds, "{t:?}");
    // Quick mode (no 1,000-device level): the memory target is not claimed either way.
    let t = targets(
        &[m(0, 12_000), m(50, 14_000)],
        &startup(20.0),
        &startup(20.0),
    );
    assert_eq!(t.len(), 1, "{t:?}");
}

#[test]
fn the_size_target_reads_build_statics_sizes_file() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("SIZES");
    std::fs::write(
        &p,
        "gatewayd      6036488 bytes    5.76 MiB  aarch64-unknown-linux-musl  profile router\n\
         gatewayctl    1092560 bytes    1.04 MiB  aarch64-unknown-linux-musl  profile router\n",
    )
    .unwrap();
    let t = static_size(&p).unwrap();
    assert!(t.holds, "{t:?}");
    assert!(
        t.measured.contains("5.76 MiB") && t.measured.contains("router"),
        "{t:?}"
    );
    std::fs::write(
        &p,
        "gatewayd 9667080 bytes 9.22 MiB aarch64 profile release\n",
    )
    .unwrap();
    assert!(!static_size(&p).unwrap().holds);
    assert!(static_size(&dir.path().join("none")).is_err());
}

#[test]
fn router_targets_follow_the_figures() {
    let m = level;
    let t = router_targets(&[
        m(0, 12_000, 0),
        m(1000, 29_000, 1000),
        m(5000, 90_000, 4999),
    ]);
    assert_eq!(t.len(), 3, "{t:?}");
    assert!(t[0].holds, "{t:?}");
    assert!(!t[1].holds, "29 MiB is over 28: {t:?}");
    assert!(!t[2].holds, "one device short: {t:?}");
    // Quick mode has no 1,000- or 5,000-device level: only the idle target is claimed.
    assert_eq!(
        router_targets(&[m(0, 13_000, 0), m(50, 14_000, 50)]).len(),
        1
    );
}

#[test]
fn log_times_are_read_through_ansi_colours() {
    let log = "\u{1b}[2m2026-11-28T02:10:12.359773Z\u{1b}[0m \u{1b}[32m INFO\u{1b}[0m \
               gatewayd::daemon: gatewayd starting\n\
               2026-11-28T02:10:12.410460Z  INFO gatewayd::daemon: gatewayd ready\n";
    let a = log_time_s(log, "gatewayd starting").unwrap();
    let b = log_time_s(log, "gatewayd ready").unwrap();
    assert!((since(a, b) - 0.050687).abs() < 1e-6, "{a} {b}");
    assert!(log_time_s(log, "CN link up").is_none());
    assert!((since(86_399.5, 0.25) - 0.75).abs() < 1e-9);
}
