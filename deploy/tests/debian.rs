//! The Debian packages (`scripts/build-deb.sh`) installed, upgraded and purged in a real Debian
//! system booted under a real systemd (issue 18):
//!
//! - `lintian_is_clean`: lintian on both packages, errors and warnings fail.
//! - `packages_under_real_systemd`: a Debian root (the machine's release, else bookworm) made once
//!   by `debootstrap` and cached
//!   in `target/systemd-root/` (rebuilt when its stamp, the debootstrap command, changes), copied
//!   per run, booted with `systemd-nspawn -b` (systemd as PID 1, a private network with only
//!   `lo`, CAP_BPF, CAP_PERFMON and bpf(2) granted so that the XDP filter can load). A oneshot unit inside runs
//!   `deploy/tests/debian/suite.sh`, which installs the previous package version, configures and
//!   starts both daemons, provisions a device, upgrades to the new version, and checks readiness,
//!   end-to-end provisioning, the units' hardening, the eBPF filter, reload, the watchdog,
//!   draining stops, removal and purge; each check is reported on its own and asserted here.
//!
//! The packages come from `target/debian/` (new) and `target/debian-prev/` (the same tree under
//! an older version), which `scripts/test.sh` builds before `cargo test` with
//! `DEB_PROFILE=debug scripts/build-deb.sh` (twice). Needs root, debootstrap,
//! systemd-container, lintian and the Debian mirror of the machine's apt sources (once).
//! Without them the tests skip, or fail under `DEPLOY_TESTS_STRICT=1`.
//! `DEB_SUITE_KEEP=1` keeps the run's root copy and its `/out` (`target/systemd-root/run-*`,
//! `out-*`: results, suite.log, journal.txt, console.log) for inspection.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use deploy_tests::{bin, printed, repo, run_ok, skip, tool};

/// What the cached root is made of. Changing it (or anything in the stamp) rebuilds the root.
/// The Debian release of the root when the machine's own cannot be told (see `suite`).
const DEFAULT_SUITE: &str = "bookworm";
/// procps: gatewayd's `ExecReload=/bin/kill` (the package depends on it; minbase lacks it).
const INCLUDE: &str = "systemd,systemd-sysv,dbus,iproute2,procps";
/// Bumped when the root needs rebuilding for a reason the command line does not show.
const ROOT_FORMAT: u32 = 1;
/// The watchdog check's WatchdogSec (a drop-in; the shipped units say 30 s).
const WATCHDOG_SEC: u32 = 5;
/// Longest the container may run before it is killed (and the test fails).
const CONTAINER_TIMEOUT: Duration = Duration::from_secs(600);

/// Every check the suite must report as passed, in its order.
const CHECKS: [&str; 13] = [
    "install",
    "start-previous-version",
    "upgrade",
    "ready-after-notify",
    "provision-end-to-end",
    "hardening",
    "ebpf-filter",
    "reload-sighup",
    "watchdog",
    "stop-drains",
    "instances",
    "remove",
    "purge",
];

fn target_dir() -> PathBuf {
    // <target>/<profile>/deps/<test binary>
    let exe = std::env::current_exe().unwrap();
    exe.ancestors().nth(3).unwrap().to_path_buf()
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
}

/// The packages of one version in `dir`: (cn-backend, gatewayd), if both are there.
fn debs(dir: &Path) -> Option<(PathBuf, PathBuf, String)> {
    let mut cn = None;
    let mut gw = None;
    for e in std::fs::read_dir(dir).ok()? {
        let p = e.ok()?.path();
        let name = p.file_name()?.to_str()?.to_string();
        if !name.ends_with(".deb") {
            continue;
        }
        if name.starts_with("cn-backend_") {
            cn = Some(p);
        } else if name.starts_with("gatewayd_") {
            gw = Some(p);
        }
    }
    let (cn, gw) = (cn?, gw?);
    let out = Command::new("dpkg-deb")
        .args(["-f"])
        .arg(&gw)
        .arg("Version")
        .output()
        .ok()?;
    let version = String::from_utf8_lossy(&out.stdout).trim().to_string();
    Some((cn, gw, version))
}

fn package_dirs() -> Option<(PathBuf, PathBuf)> {
    let new = target_dir().join("debian");
    let prev = target_dir().join("debian-prev");
    if debs(&new).is_none() || debs(&prev).is_none() {
        skip(&format!(
            "no packages in {} and {}: run `DEB_PROFILE=debug DEB_VERSION=0.1.0-0~prev1 \
             DEB_OUT=target/debian-prev scripts/build-deb.sh` and `DEB_PROFILE=debug scripts/build-deb.sh`",
            new.display(),
            prev.display()
        ));
        return None;
    }
    Some((new, prev))
}

/// The machine's own Debian release (`VERSION_CODENAME` of /etc/os-release), else bookworm: the
/// packages under test hold the machine's debug binaries, linked against its C library, so the
/// root must be the same release (or a later one). `$DEBOOTSTRAP_SUITE` overrides it.
fn suite() -> String {
    if let Ok(s) = std::env::var("DEBOOTSTRAP_SUITE") {
        return s;
    }
    let os = std::fs::read_to_string("/etc/os-release").unwrap_or_default();
    let field = |k: &str| {
        os.lines()
            .find_map(|l| l.strip_prefix(k))
            .map(|v| v.trim_matches('"').to_string())
    };
    match (field("ID="), field("VERSION_CODENAME=")) {
        (Some(id), Some(code)) if id == "debian" && !code.is_empty() => code,
        _ => DEFAULT_SUITE.to_string(),
    }
}

/// The Debian mirror of the machine's apt sources (one-line `.list` or deb822 `.sources`), or
/// `$DEBOOTSTRAP_MIRROR`.
fn debian_mirror(suite: &str) -> Option<String> {
    if let Ok(m) = std::env::var("DEBOOTSTRAP_MIRROR") {
        return Some(m);
    }
    let mut files = vec![PathBuf::from("/etc/apt/sources.list")];
    if let Ok(rd) = std::fs::read_dir("/etc/apt/sources.list.d") {
        let mut more: Vec<PathBuf> = rd.filter_map(|e| e.ok().map(|e| e.path())).collect();
        more.sort();
        files.extend(more);
    }
    for f in files {
        let name = f.to_string_lossy().to_string();
        let Ok(text) = std::fs::read_to_string(&f) else {
            continue;
        };
        if name.ends_with(".sources") {
            // deb822 stanzas: URIs + Suites.
            for stanza in text.split("\n\n") {
                let field = |k: &str| {
                    stanza
                        .lines()
                        .find_map(|l| l.strip_prefix(k).map(|v| v.trim().to_string()))
                };
                let (Some(uris), Some(suites)) = (field("URIs:"), field("Suites:")) else {
                    continue;
                };
                if suites.split_whitespace().any(|s| s == suite)
                    && let Some(u) = uris.split_whitespace().find(|u| u.ends_with("/debian"))
                {
                    return Some(u.to_string());
                }
            }
        } else if name.ends_with(".list") {
            for l in text.lines() {
                let mut w = l.split_whitespace().filter(|w| !w.starts_with('['));
                if w.next() != Some("deb") {
                    continue;
                }
                let (Some(uri), Some(s)) = (w.next(), w.next()) else {
                    continue;
                };
                if s == suite && uri.trim_end_matches('/').ends_with("/debian") {
                    return Some(uri.to_string());
                }
            }
        }
    }
    None
}

/// The cached root: built once by debootstrap, rebuilt when the stamp changes. The mirror is not
/// part of the stamp (another mirror gives the same root).
fn cached_root(debootstrap: &Path) -> PathBuf {
    let base = target_dir().join("systemd-root");
    std::fs::create_dir_all(&base).unwrap();
    let suite = suite();
    let root = base.join(&suite);
    let stamp = format!(
        "format {ROOT_FORMAT}: debootstrap --variant=minbase --include={INCLUDE} {suite}\n"
    );
    let stamp_file = base.join(format!("{suite}.stamp"));
    if root.join("sbin/init").exists()
        && std::fs::read_to_string(&stamp_file).is_ok_and(|s| s == stamp)
    {
        return root;
    }
    let mirror = debian_mirror(&suite).unwrap_or_else(|| {
        panic!("no Debian {suite} mirror in /etc/apt/sources.list(.d); set DEBOOTSTRAP_MIRROR")
    });
    // One cached root: another release's goes.
    for e in std::fs::read_dir(&base).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if let Some(other) = name.strip_suffix(".stamp")
            && other != suite
        {
            let _ = std::fs::remove_dir_all(base.join(other));
            let _ = std::fs::remove_file(e.path());
        }
    }
    let tmp = base.join(format!("{suite}.tmp"));
    for d in [&tmp, &root] {
        if d.exists() {
            std::fs::remove_dir_all(d).unwrap();
        }
    }
    let _ = std::fs::remove_file(&stamp_file);
    let started = Instant::now();
    eprintln!("debootstrap {suite} from {mirror} into {}", tmp.display());
    let out = Command::new("timeout")
        .args(["-k", "10", "900"])
        .arg(debootstrap)
        .args(["--variant=minbase", &format!("--include={INCLUDE}"), &suite])
        .arg(&tmp)
        .arg(&mirror)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "debootstrap failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // No package downloads are left behind in the cache.
    let archives = tmp.join("var/cache/apt/archives");
    if let Ok(rd) = std::fs::read_dir(&archives) {
        for e in rd.flatten() {
            if e.path().extension().is_some_and(|x| x == "deb") {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    std::fs::rename(&tmp, &root).unwrap();
    std::fs::write(&stamp_file, stamp).unwrap();
    eprintln!("debootstrap took {:.0?}", started.elapsed());
    root
}

/// A directory removed (recursively) when dropped.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        if std::env::var_os("DEB_SUITE_KEEP").is_none() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

fn copy_file(from: &Path, to: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(to.parent().unwrap()).unwrap();
    std::fs::copy(from, to).unwrap();
    std::fs::set_permissions(to, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// The suite's results: check name -> (passed, line).
fn results(text: &str) -> Vec<(String, bool, String)> {
    text.lines()
        .filter_map(|l| {
            let (kind, rest) = l.split_once(' ')?;
            let (name, _) = rest.split_once(':')?;
            match kind {
                "PASS" => Some((name.to_string(), true, l.to_string())),
                "FAIL" => Some((name.to_string(), false, l.to_string())),
                _ => None,
            }
        })
        .collect()
}

fn lintian_report(lintian: &Path, debs: &[&Path]) -> (bool, String) {
    let out = Command::new("timeout")
        .args(["-k", "10", "300"])
        .arg(lintian)
        .args(["--fail-on", "error,warning", "--info"])
        .args(debs)
        .output()
        .unwrap();
    (out.status.success(), printed(&out))
}

#[test]
fn lintian_is_clean() {
    let Some(lintian) = tool("lintian", "lintian") else {
        return;
    };
    let Some((new, _)) = package_dirs() else {
        return;
    };
    let (cn, gw, _) = debs(&new).unwrap();
    let (ok, text) = lintian_report(&lintian, &[&cn, &gw]);
    assert!(ok, "lintian found errors or warnings:\n{text}");
    eprintln!(
        "lintian: clean{}",
        if text.trim().is_empty() {
            ""
        } else {
            " (info/pedantic tags below)"
        }
    );
    eprint!("{text}");
}

#[test]
fn packages_under_real_systemd() {
    if !is_root() {
        skip("the systemd container suite needs root (debootstrap, systemd-nspawn)");
        return;
    }
    let (Some(debootstrap), Some(nspawn), Some(_dpkg_deb)) = (
        tool("debootstrap", "debootstrap"),
        tool("systemd-nspawn", "systemd-container"),
        tool("dpkg-deb", "dpkg"),
    ) else {
        return;
    };
    let Some((new_dir, prev_dir)) = package_dirs() else {
        return;
    };
    let (new_cn, new_gw, new_version) = debs(&new_dir).unwrap();
    let (prev_cn, prev_gw, prev_version) = debs(&prev_dir).unwrap();
    assert_ne!(
        new_version, prev_version,
        "both package sets have version {new_version}"
    );
    let suite_started = Instant::now();
    let root = cached_root(&debootstrap);
    let cached_after = suite_started.elapsed();

    // A per-run copy of the root (deleted at the end) and the directory bound at /out.
    let base = target_dir().join("systemd-root");
    // Copies left by a run that was killed (a panic removes its own).
    for e in std::fs::read_dir(&base).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if (name.starts_with("run-") || name.starts_with("out-"))
            && std::env::var_os("DEB_SUITE_KEEP").is_none()
        {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
    let run = Scratch(base.join(format!("run-{}", std::process::id())));
    let out_dir = Scratch(base.join(format!("out-{}", std::process::id())));
    for d in [&run.0, &out_dir.0] {
        if d.exists() {
            std::fs::remove_dir_all(d).unwrap();
        }
    }
    std::fs::create_dir_all(&out_dir.0).unwrap();
    run_ok(
        Command::new("cp")
            .args(["-a", "--reflink=auto"])
            .arg(&root)
            .arg(&run.0),
        "copying the cached root",
    );
    let r = &run.0;
    for (deb, dir) in [
        (&prev_cn, "prev"),
        (&prev_gw, "prev"),
        (&new_cn, "new"),
        (&new_gw, "new"),
    ] {
        copy_file(
            deb,
            &r.join("root/debs").join(dir).join(deb.file_name().unwrap()),
            0o644,
        );
    }
    std::fs::write(
        r.join("root/debs/versions"),
        format!("PREV_VERSION='{prev_version}'\nNEW_VERSION='{new_version}'\nWATCHDOG_SEC={WATCHDOG_SEC}\n"),
    )
    .unwrap();
    // The device side: iotdev from this build (same Debian release, same C library).
    copy_file(&bin("iotdev"), &r.join("usr/local/bin/iotdev"), 0o755);
    copy_file(
        &repo().join("deploy/tests/debian/suite.sh"),
        &r.join("usr/local/lib/deb-suite/suite.sh"),
        0o755,
    );
    let timeout_start = CONTAINER_TIMEOUT.as_secs() - 60;
    std::fs::write(
        r.join("etc/systemd/system/deb-suite.service"),
        format!(
            "[Unit]\nDescription=Debian package suite (deploy/tests/debian.rs)\n\
             SuccessAction=poweroff\nFailureAction=poweroff\n\
             [Service]\nType=oneshot\nExecStart=/usr/local/lib/deb-suite/suite.sh\n\
             TimeoutStartSec={timeout_start}\nStandardOutput=append:/out/suite.log\n\
             StandardError=append:/out/suite.log\n\
             [Install]\nWantedBy=multi-user.target\n"
        ),
    )
    .unwrap();
    let wants = r.join("etc/systemd/system/multi-user.target.wants");
    std::fs::create_dir_all(&wants).unwrap();
    std::os::unix::fs::symlink(
        "/etc/systemd/system/deb-suite.service",
        wants.join("deb-suite.service"),
    )
    .unwrap();
    let hosts = r.join("etc/hosts");
    let text = std::fs::read_to_string(&hosts).unwrap_or_default();
    if !text
        .lines()
        .any(|l| l.split_whitespace().skip(1).any(|h| h == "localhost"))
    {
        std::fs::write(
            &hosts,
            format!("127.0.0.1 localhost\n::1 localhost\n{text}"),
        )
        .unwrap();
    }

    // Boot. systemd-nspawn's own SIGTERM handling powers the container off (SIGRTMIN+3); timeout
    // sends it at CONTAINER_TIMEOUT and SIGKILLs 20 s later, so a hung container fails the test.
    let console = std::fs::File::create(out_dir.0.join("console.log")).unwrap();
    let booted = Instant::now();
    let status = Command::new("timeout")
        .args(["-k", "20", &CONTAINER_TIMEOUT.as_secs().to_string()])
        .arg(&nspawn)
        .args(["-q", "-D"])
        .arg(r)
        .args([
            "--register=no",
            "--keep-unit",
            "--private-network",
            // What gatewayd's unit and eBPF filter need from the container: CAP_BPF and
            // CAP_PERFMON (outside nspawn's default set), and bpf(2), which nspawn's own system
            // call filter does not allow by default.
            "--capability=CAP_BPF,CAP_PERFMON",
            "--system-call-filter=bpf",
            "--kill-signal=SIGRTMIN+3",
            "--console=pipe",
        ])
        .arg(format!("--bind={}:/out", out_dir.0.display()))
        .arg("-b")
        .stdin(Stdio::null())
        .stdout(console.try_clone().unwrap())
        .stderr(console)
        .status()
        .unwrap();
    let container_time = booted.elapsed();
    let read = |f: &str| std::fs::read_to_string(out_dir.0.join(f)).unwrap_or_default();
    let tail = |f: &str, n: usize| {
        let t = read(f);
        let lines: Vec<&str> = t.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    };
    let diagnostics = || {
        format!(
            "\n--- results\n{}\n--- suite.log (tail)\n{}\n--- journal.txt (tail)\n{}\n--- console (tail)\n{}",
            read("results"),
            tail("suite.log", 80),
            tail("journal.txt", 60),
            tail("console.log", 40)
        )
    };
    assert!(
        out_dir.0.join("done").exists(),
        "the suite did not finish (container exit {status}, after {container_time:.0?}){}",
        diagnostics()
    );

    let res = results(&read("results"));
    eprintln!(
        "systemd container suite: root ready in {cached_after:.1?} (cached unless debootstrap ran), \
         container {container_time:.1?}, total {:.1?}",
        suite_started.elapsed()
    );
    for (_, _, line) in &res {
        eprintln!("  {line}");
    }
    for note in read("results").lines().filter(|l| l.starts_with("NOTE")) {
        eprintln!("  {note}");
    }
    let failed: Vec<&str> = CHECKS
        .iter()
        .copied()
        .filter(|c| !res.iter().any(|(n, ok, _)| n == c && *ok))
        .collect();
    assert!(
        failed.is_empty(),
        "checks failed or missing: {failed:?}{}",
        diagnostics()
    );
}
