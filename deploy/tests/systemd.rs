//! The systemd units in `systemd/`: `systemd-analyze verify` in a temporary root (the binaries at
//! their ExecStart paths, the distribution's units beside them), proven to catch a typo; their
//! hardening exposure and capability sets; sysusers.d/tmpfiles.d applied to a temporary root; and
//! cn-backend's notifications to a real notification socket (READY=1, WATCHDOG=1, STOPPING=1).
//!
//! gatewayd's notifications (READY=1, WATCHDOG=1 at WATCHDOG_USEC/2, STATUS=, RELOADING=1 on
//! SIGHUP, STOPPING=1 on SIGTERM) are tested the same way by
//! `gatewayd/tests/e2e.rs::systemd_notifications_sighup_reload_and_sigterm`, and gatewayd with no
//! NOTIFY_SOCKET at all (as under procd) by every other test there.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use deploy_tests::{Cn, printed, repo, tool};

const UNITS: [&str; 2] = ["gatewayd.service", "cn-backend.service"];

/// A temporary root with the distribution's units, fake executables at the units' ExecStart and
/// ExecReload paths, and `units` (name, text) in /etc/systemd/system.
fn root_with(units: &[(&str, String)]) -> tempfile::TempDir {
    let root = tempfile::tempdir().unwrap();
    let sys = ["/usr/lib/systemd/system", "/lib/systemd/system"]
        .into_iter()
        .map(Path::new)
        .find(|p| p.join("sysinit.target").exists())
        .expect("no systemd unit directory with sysinit.target");
    let dest = root.path().join("usr/lib/systemd/system");
    std::fs::create_dir_all(&dest).unwrap();
    for e in std::fs::read_dir(sys).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_file() {
            std::fs::copy(e.path(), dest.join(e.file_name())).unwrap();
        }
    }
    let etc = root.path().join("etc/systemd/system");
    std::fs::create_dir_all(&etc).unwrap();
    for (name, text) in units {
        std::fs::write(etc.join(name), text).unwrap();
        for line in text.lines() {
            let Some((key, cmd)) = line.split_once('=') else {
                continue;
            };
            if !key.starts_with("Exec") {
                continue;
            }
            let exe = cmd
                .trim_start_matches(['-', '@', '+', '!', ':'])
                .split_whitespace()
                .next()
                .unwrap();
            let p = root.path().join(exe.trim_start_matches('/'));
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(&p, "#!/bin/sh\nexit 0\n").unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
    }
    root
}

fn unit_text(name: &str) -> String {
    std::fs::read_to_string(repo().join("systemd").join(name)).unwrap()
}

/// `systemd-analyze verify` in `root`: (success, everything it printed). Any diagnostic counts as
/// a failure: systemd only warns ("Unknown key ... ignoring") and exits 0 on many unit errors.
fn verify(analyze: &Path, root: &Path, names: &[&str]) -> (bool, String) {
    let out = Command::new(analyze)
        .arg("verify")
        .arg(format!("--root={}", root.display()))
        .args(names)
        .env("SYSTEMD_LOG_LEVEL", "notice")
        .output()
        .unwrap();
    let text = printed(&out);
    (out.status.success() && text.trim().is_empty(), text)
}

#[test]
fn units_pass_systemd_analyze_verify_and_a_typo_is_caught() {
    let Some(analyze) = tool("systemd-analyze", "systemd") else {
        return;
    };
    let units: Vec<(&str, String)> = UNITS.iter().map(|n| (*n, unit_text(n))).collect();
    let root = root_with(&units);
    let (ok, text) = verify(&analyze, root.path(), &UNITS);
    assert!(ok, "systemd-analyze verify: {text}");

    // The check is real: a misspelt key, a bad value, a missing binary each make it fail.
    let mutations: [(&str, &str, &str); 4] = [
        (
            "gatewayd.service",
            "ProtectSystem=strict",
            "ProtectSytem=strict",
        ),
        (
            "cn-backend.service",
            "ProtectSystem=strict",
            "ProtectSystem=strickt",
        ),
        (
            "gatewayd.service",
            "RestrictAddressFamilies=AF_INET",
            "RestrictAddressFamilies=AF_INTE",
        ),
        ("cn-backend.service", "Type=notify", "Type=notfy"),
    ];
    for (name, from, to) in mutations {
        let text = unit_text(name);
        assert!(text.contains(from), "{name} lacks {from}");
        let root = root_with(&[(name, text.replacen(from, to, 1))]);
        let (ok, out) = verify(&analyze, root.path(), &[name]);
        assert!(!ok, "verify accepted {name} with {to:?}: {out}");
    }
    let root = root_with(&[]);
    std::fs::write(
        root.path().join("etc/systemd/system/cn-backend.service"),
        unit_text("cn-backend.service"),
    )
    .unwrap();
    let (ok, out) = verify(&analyze, root.path(), &["cn-backend.service"]);
    assert!(
        !ok && out.contains("/usr/bin/cn-backend"),
        "missing binary not reported: {out}"
    );
}

/// `cn-backend@.service`, the template for several instances on one host: an instance passes
/// `systemd-analyze verify`, it takes its listen addresses from `/etc/cn-backend/%i.env`, and its
/// settings are `cn-backend.service`'s line for line apart from those (so hardening cannot drift
/// between the two).
#[test]
fn the_instance_template_is_the_single_unit_plus_its_addresses() {
    let single = unit_text("cn-backend.service");
    let template = unit_text("cn-backend@.service");
    let settings = |text: &str| -> Vec<String> {
        text.lines()
            .filter(|l| !l.starts_with('#') && l.contains('='))
            .filter(|l| {
                ![
                    "Description=",
                    "ExecStart=",
                    "EnvironmentFile=",
                    "DefaultInstance=",
                ]
                .iter()
                .any(|k| l.starts_with(k))
            })
            .map(str::to_string)
            .collect()
    };
    assert_eq!(settings(&single), settings(&template));
    assert!(template.contains("EnvironmentFile=/etc/cn-backend/%i.env"));
    assert!(template.contains(
        "ExecStart=/usr/bin/cn-backend --dir /var/lib/cn-backend serve --listen ${LISTEN} --http-listen ${HTTP_LISTEN}"
    ));

    let Some(analyze) = tool("systemd-analyze", "systemd") else {
        return;
    };
    let root = root_with(&[("cn-backend@.service", template.clone())]);
    let (ok, text) = verify(&analyze, root.path(), &["cn-backend@a.service"]);
    assert!(ok, "systemd-analyze verify cn-backend@a.service: {text}");
    let root = root_with(&[(
        "cn-backend@.service",
        template.replacen("ProtectSystem=strict", "ProtectSystem=stric", 1),
    )]);
    let (ok, text) = verify(&analyze, root.path(), &["cn-backend@a.service"]);
    assert!(!ok, "verify accepted a broken template: {text}");
}

/// Each unit's `systemd-analyze security` exposure (0 = locked down, 10 = unprotected) stays at
/// or below `max`, and the settings that matter are present.
#[test]
fn units_are_hardened_with_least_capabilities() {
    let gw = unit_text("gatewayd.service");
    let cn = unit_text("cn-backend.service");
    let setting = |text: &str, key: &str| -> Vec<String> {
        text.lines()
            .filter_map(|l| l.strip_prefix(&format!("{key}=")))
            .map(str::to_string)
            .collect()
    };
    for (name, text) in [("gatewayd", &gw), ("cn-backend", &cn)] {
        for (k, v) in [
            ("Type", "notify"),
            ("Restart", "on-failure"),
            ("NoNewPrivileges", "yes"),
            ("ProtectSystem", "strict"),
            ("ProtectHome", "yes"),
            ("PrivateTmp", "yes"),
            ("PrivateDevices", "yes"),
            ("MemoryDenyWriteExecute", "yes"),
            ("LockPersonality", "yes"),
            ("ProtectKernelTunables", "yes"),
            ("ProtectKernelModules", "yes"),
            ("ProtectControlGroups", "yes"),
            ("User", name),
            ("StateDirectory", name),
        ] {
            assert_eq!(setting(text, k), [v], "{name}: {k}");
        }
        assert!(
            !setting(text, "WatchdogSec").is_empty(),
            "{name}: WatchdogSec"
        );
        assert!(
            !setting(text, "StartLimitBurst").is_empty(),
            "{name}: restart limits"
        );
    }
    // gatewayd: exactly what loading (as a non-root user) and attaching XDP/TC needs; cn-backend:
    // nothing.
    assert_eq!(
        setting(&gw, "CapabilityBoundingSet"),
        ["CAP_NET_ADMIN CAP_BPF CAP_PERFMON"]
    );
    assert_eq!(
        setting(&gw, "AmbientCapabilities"),
        ["CAP_NET_ADMIN CAP_BPF CAP_PERFMON"]
    );
    assert_eq!(setting(&cn, "CapabilityBoundingSet"), [""]);
    assert_eq!(
        setting(&gw, "RestrictAddressFamilies"),
        ["AF_INET AF_INET6 AF_UNIX AF_NETLINK"]
    );
    assert_eq!(
        setting(&cn, "RestrictAddressFamilies"),
        ["AF_INET AF_INET6 AF_UNIX"]
    );
    assert_eq!(setting(&gw, "SystemCallFilter")[0], "@system-service bpf");
    assert_eq!(setting(&cn, "SystemCallFilter")[0], "@system-service");
    assert_eq!(setting(&gw, "RuntimeDirectory"), ["gatewayd"]);
    assert_eq!(setting(&gw, "ConfigurationDirectory"), ["gatewayd"]);

    let Some(analyze) = tool("systemd-analyze", "systemd") else {
        return;
    };
    let units: Vec<(&str, String)> = UNITS.iter().map(|n| (*n, unit_text(n))).collect();
    let root = root_with(&units);
    // --threshold is the exposure × 10: the command fails above it.
    for (name, max) in [("gatewayd.service", 25), ("cn-backend.service", 15)] {
        let out = Command::new(&analyze)
            .args(["security", "--offline=yes", "--no-pager"])
            .arg(format!("--root={}", root.path().display()))
            .arg(format!("--threshold={max}"))
            .arg(name)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let level = text
            .lines()
            .find(|l| l.contains("Overall exposure level"))
            .unwrap_or_default()
            .to_string();
        assert!(
            out.status.success(),
            "{name}: exposure above {}: {level}\n{text}{}",
            f64::from(max) / 10.0,
            String::from_utf8_lossy(&out.stderr)
        );
        eprintln!("{name}: {}", level.trim());
    }
}

/// sysusers.d creates the two users, tmpfiles.d the /etc/gatewayd directory, in a temporary root.
#[test]
fn sysusers_and_tmpfiles_apply_to_a_root() {
    let (Some(sysusers), Some(tmpfiles)) = (
        tool("systemd-sysusers", "systemd"),
        tool("systemd-tmpfiles", "systemd"),
    ) else {
        return;
    };
    let root = tempfile::tempdir().unwrap();
    let sys = repo().join("systemd");
    std::fs::create_dir_all(root.path().join("etc")).unwrap();
    for f in ["sysusers.d/gatewayd.conf", "sysusers.d/cn-backend.conf"] {
        let out = Command::new(&sysusers)
            .arg(format!("--root={}", root.path().display()))
            .arg(sys.join(f))
            .output()
            .unwrap();
        // It reports what it creates ("Creating user ..."); anything else is a complaint.
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && err.lines().all(|l| l.starts_with("Creating ")),
            "systemd-sysusers {f}: {err}"
        );
    }
    let passwd = std::fs::read_to_string(root.path().join("etc/passwd")).unwrap();
    for u in ["gatewayd", "cn-backend"] {
        let line = passwd
            .lines()
            .find(|l| l.starts_with(&format!("{u}:")))
            .unwrap_or_else(|| panic!("no user {u}: {passwd}"));
        let uid: u32 = line.split(':').nth(2).unwrap().parse().unwrap();
        assert!(uid > 0 && uid < 1000, "{u} is not a system user: {line}");
        assert!(line.ends_with("nologin"), "{line}");
    }
    let out = Command::new(&tmpfiles)
        .arg(format!("--root={}", root.path().display()))
        .arg("--create")
        .arg(sys.join("tmpfiles.d/gatewayd.conf"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "systemd-tmpfiles: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(root.path().join("etc/gatewayd").is_dir());
}

fn recv_until(sock: &UnixDatagram, want: &[&str], seen: &mut String, timeout: Duration) {
    let until = Instant::now() + timeout;
    let mut buf = [0u8; 4096];
    while !want.iter().all(|w| seen.contains(w)) {
        assert!(
            Instant::now() < until,
            "waiting for {want:?}; notifications so far: {seen:?}"
        );
        if let Ok(n) = sock.recv(&mut buf) {
            seen.push_str(&String::from_utf8_lossy(&buf[..n]));
            seen.push('\n');
        }
    }
}

/// cn-backend under a real notification socket: READY=1 once it serves (after its ready file),
/// WATCHDOG=1 repeatedly at WATCHDOG_USEC/2, STOPPING=1 on SIGTERM and a clean exit.
#[test]
fn cn_backend_notifies_ready_watchdog_and_stopping() {
    let tmp = tempfile::tempdir().unwrap();
    let sock_path: PathBuf = tmp.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let sock_env = sock_path.display().to_string();
    let mut cn = Cn::start(
        &tmp.path().join("cn"),
        1,
        &[
            ("NOTIFY_SOCKET", sock_env.as_str()),
            ("WATCHDOG_USEC", "200000"),
        ],
    );
    let mut seen = String::new();
    recv_until(
        &sock,
        &["READY=1", "STATUS=serving"],
        &mut seen,
        Duration::from_secs(10),
    );
    // At 100 ms intervals: several pings within a second.
    let started = Instant::now();
    let mut pings = 0;
    let mut buf = [0u8; 4096];
    while started.elapsed() < Duration::from_millis(1200) {
        if let Ok(n) = sock.recv(&mut buf) {
            pings += String::from_utf8_lossy(&buf[..n])
                .matches("WATCHDOG=1")
                .count();
        }
    }
    assert!(
        pings >= 5,
        "only {pings} WATCHDOG=1 in 1.2 s at WATCHDOG_USEC=200000"
    );
    let status = cn.proc.terminate(Duration::from_secs(30)).unwrap();
    let status = status.expect("no exit 30 s after SIGTERM");
    assert!(
        status.success(),
        "cn-backend exited with {status} after SIGTERM"
    );
    let mut rest = String::new();
    recv_until(&sock, &["STOPPING=1"], &mut rest, Duration::from_secs(2));
}
