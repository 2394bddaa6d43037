//! OpenWrt: the procd init script, run through stand-ins for OpenWrt's /etc/rc.common,
//! /lib/functions.sh and /lib/functions/procd.sh (`deploy/tests/openwrt/root/`, which follow the
//! upstream files call for call; openwrt/README.md lists what they model), and the package
//! Makefile, run against stand-ins for the build system's rules.mk, package.mk and the packages
//! feed's rust-package.mk (`deploy/tests/openwrt/stub-openwrt/`).
//! - The scripts parse (`sh -n`, POSIX sh); the UCI → TOML mapping turns the shipped
//!   /etc/config/gatewayd into a configuration gatewayd's own loader accepts, and handles every type;
//! - `/etc/init.d/gatewayd start` sends procd the message upstream's procd.sh would (`ubus call
//!   service set`, checked as JSON: command, respawn, watched files, limits, reload trigger), and
//!   the command in it starts a real gatewayd that provisions a device through a real cn-backend;
//!   `stop` deletes the service;
//! - the Makefile's from-source build is the feed's `cargo install` for the right Rust target;
//! - the Makefile builds real .ipk files (with the static armv7 binaries) that opkg's offline
//!   install steps unpack into a root: files and modes, control fields, conffiles, the user from
//!   Require-User and the rc.d links made by the package's own postinst.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use deploy_tests::{
    Cn, Gw, Runner, assert_ok, provision_device, repo, static_dir, tool, write_companion,
};
use gatewayd::config::Config;

fn init_script() -> std::path::PathBuf {
    repo().join("openwrt/files/gatewayd.init")
}

/// The stand-in root: etc/rc.common, lib/functions.sh, lib/functions/procd.sh, bin/ubus.
fn standin() -> std::path::PathBuf {
    repo().join("deploy/tests/openwrt/root")
}

fn stub() -> std::path::PathBuf {
    standin().join("lib/functions.sh")
}

/// Runs `body` in `sh` after sourcing /lib/functions.sh (the stand-in) and the init script, with
/// UCI files from `uci_dir`. Returns stdout; panics with stderr on failure.
fn run_sh(uci_dir: &Path, env: &[(&str, &str)], body: &str) -> String {
    let script = format!(
        ". '{}'\n. '{}'\n{body}\n",
        stub().display(),
        init_script().display()
    );
    let out = Command::new("sh")
        .arg("-c")
        .arg(&script)
        .env("STANDIN_ROOT", standin())
        .env("UCI_CONFIG_DIR", uci_dir)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "sh failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn scripts_parse_as_posix_sh() {
    let sh = [
        "openwrt/files/gatewayd.init",
        "deploy/tests/openwrt/root/etc/rc.common",
        "deploy/tests/openwrt/root/lib/functions.sh",
        "deploy/tests/openwrt/root/lib/functions/procd.sh",
        "deploy/tests/openwrt/root/lib/config/uci.sh",
        "deploy/tests/openwrt/root/bin/ubus",
        "deploy/tests/openwrt/stub-openwrt/scripts/ipkg-build",
    ];
    let bash = [
        "scripts/build-static.sh",
        "scripts/setup.sh",
        "scripts/test.sh",
    ];
    let checks = sh
        .iter()
        .map(|f| ("sh", f))
        .chain(bash.iter().map(|f| ("bash", f)));
    for (shell, f) in checks {
        let out = Command::new(shell)
            .arg("-n")
            .arg(repo().join(f))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{shell} -n {f}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// The shipped /etc/config/gatewayd maps to a configuration gatewayd's loader accepts, with the
/// UCI values where they were set and gatewayd's defaults elsewhere.
#[test]
fn shipped_uci_config_maps_to_a_valid_gatewayd_config() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::copy(
        repo().join("openwrt/files/gatewayd.config"),
        tmp.path().join("gatewayd"),
    )
    .unwrap();
    let toml = run_sh(tmp.path(), &[], "gatewayd_uci_to_toml");
    let cfg = Config::from_toml_str(&toml, "generated from UCI")
        .unwrap_or_else(|e| panic!("{e}\n{toml}"));
    assert_eq!(cfg.state_dir, Path::new("/etc/gatewayd/state"));
    assert_eq!(cfg.log_level, "info");
    assert_eq!(cfg.devices.listen.to_string(), "[::]:4433");
    assert_eq!(cfg.cn.endpoint.as_deref(), Some("cn.operator.example:4434"));
    assert_eq!(
        cfg.control.socket,
        Path::new("/var/run/gatewayd/control.sock")
    );
    assert_eq!(cfg.filter.interfaces, ["br-lan"]);
    assert!(!cfg.filter.strict);
    assert!(cfg.metrics.enabled);
    assert!(!cfg.credentials.roaming);
    // Options the UCI file does not set keep gatewayd's defaults.
    assert_eq!(cfg.batching, Config::default().batching);
}

/// Every type of the mapping: strings with quotes and backslashes, numbers, UCI booleans in their
/// spellings, lists; a non-numeric number is refused with a message naming the option.
#[test]
fn uci_types_and_escaping() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(
        tmp.path().join("gatewayd"),
        r#"
config gatewayd 'main'
	option log_level 'info,gatewayd="debug"\x'
config devices 'devices'
	option max_connections '17'
config metrics 'metrics'
	option enabled 'no'
config cn 'cn'
	list endpoints 'cn1.operator.example:4434'
	list endpoints '[2001:db8::2]:4434'
config credentials 'credentials'
	option roaming 'yes'
	list dnns 'internet'
	list dnns 'iot.m2m'
	option max_bitrate_kbps '64'
config filter 'filter'
	option mode 'userspace'
	option strict 'on'
	list allowed_sources '192.168.1.10'
	list allowed_sources 'fd00::10'
"#,
    )
    .unwrap();
    let toml = run_sh(tmp.path(), &[], "gatewayd_uci_to_toml");
    assert!(
        toml.contains(r#"log_level = "info,gatewayd=\"debug\"\\x""#),
        "{toml}"
    );
    let v: toml::Value = toml::from_str(&toml).unwrap_or_else(|e| panic!("{e}\n{toml}"));
    assert_eq!(v["log_level"].as_str(), Some(r#"info,gatewayd="debug"\x"#));
    assert_eq!(v["devices"]["max_connections"].as_integer(), Some(17));
    assert_eq!(v["metrics"]["enabled"].as_bool(), Some(false));
    assert_eq!(v["credentials"]["roaming"].as_bool(), Some(true));
    assert_eq!(
        v["credentials"]["dnns"],
        toml::Value::Array(vec!["internet".into(), "iot.m2m".into()])
    );
    assert_eq!(v["filter"]["strict"].as_bool(), Some(true));
    assert_eq!(
        v["cn"]["endpoints"],
        toml::Value::Array(vec![
            "cn1.operator.example:4434".into(),
            "[2001:db8::2]:4434".into()
        ])
    );
    assert_eq!(
        v["filter"]["allowed_sources"],
        toml::Value::Array(vec!["192.168.1.10".into(), "fd00::10".into()])
    );
    // gatewayd's loader takes the log filter as given and the rest as typed values.
    let cfg = Config::from_toml_str(&toml, "generated").unwrap_or_else(|e| panic!("{e}\n{toml}"));
    assert_eq!(cfg.cn.endpoint_list().len(), 2);

    std::fs::write(
        tmp.path().join("gatewayd"),
        "config batching 'batching'\n\toption max_batch 'lots'\n",
    )
    .unwrap();
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            ". '{}'; . '{}'; gatewayd_uci_to_toml",
            stub().display(),
            init_script().display()
        ))
        .env("STANDIN_ROOT", standin())
        .env("UCI_CONFIG_DIR", tmp.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("batching.max_batch must be a whole number, not 'lots'"),
        "{err}"
    );
}

/// `sh <stand-in>/etc/rc.common SCRIPT ACTION`, which is what the kernel runs for
/// `/etc/init.d/gatewayd ACTION` (the script's first line is `#!/bin/sh /etc/rc.common`), with the
/// ubus stand-in first on PATH.
fn rc_common(
    script: &Path,
    action: &str,
    env: &[(&str, &std::ffi::OsStr)],
) -> std::process::Output {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut dirs = vec![standin().join("bin")];
    dirs.extend(std::env::split_paths(&path));
    Command::new("sh")
        .arg(standin().join("etc/rc.common"))
        .arg(script)
        .arg(action)
        .env("STANDIN_ROOT", standin())
        .env("PATH", std::env::join_paths(dirs).unwrap())
        .envs(env.iter().copied())
        .output()
        .unwrap()
}

/// The `ubus call service METHOD MESSAGE` lines the stand-in recorded, as (METHOD, JSON).
fn ubus_calls(log: &Path) -> Vec<(String, serde_json::Value)> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .map(|l| {
            let rest = l
                .strip_prefix("service ")
                .unwrap_or_else(|| panic!("not a service call: {l}"));
            let (method, msg) = rest.split_once(' ').unwrap();
            let v = serde_json::from_str(msg).unwrap_or_else(|e| panic!("{e}: {msg}"));
            (method.to_string(), v)
        })
        .collect()
}

/// `/etc/init.d/gatewayd start` with a UCI file for a loopback test: the init script generates
/// the TOML and procd receives the service with upstream's types (arrays of strings, integers,
/// booleans, tables) and the reload trigger; the command procd would run starts a real gatewayd
/// (no systemd: no NOTIFY_SOCKET) that links to a real cn-backend and provisions a device.
/// `reload` sends the same service again (procd restarts only what changed); `stop` deletes it.
#[test]
fn init_script_start_hands_procd_a_gatewayd_that_provisions() {
    let tmp = tempfile::tempdir().unwrap();
    let cn = Cn::start(&tmp.path().join("cn"), 5, &[]);
    let gwdir = tmp.path().join("gw");
    std::fs::create_dir_all(&gwdir).unwrap();
    let cred = gwdir.join("companion.toml");
    write_companion(&cred);
    let uci = tmp.path().join("uci");
    std::fs::create_dir_all(&uci).unwrap();
    std::fs::write(
        uci.join("gatewayd"),
        format!(
            "config gatewayd 'main'\n\toption enabled '1'\n\toption state_dir '{state}'\n\
             \toption log_level 'info'\n\toption drain_timeout '3s'\n\
             config devices 'devices'\n\toption listen '127.0.0.1:0'\n\
             config cn 'cn'\n\toption endpoint '{quic}'\n\toption server_name 'localhost'\n\
             \toption ca_file '{ca}'\n\toption reconnect_min '100ms'\n\toption reconnect_max '1s'\n\
             config companion 'companion'\n\toption credential_file '{cred}'\n\
             config control 'control'\n\toption socket '{sock}'\n\
             config metrics 'metrics'\n\toption enabled '1'\n\toption listen '127.0.0.1:0'\n\
             config batching 'batching'\n\toption max_batch '32'\n\
             config credentials 'credentials'\n\toption roaming '0'\n\
             config filter 'filter'\n\toption mode 'userspace'\n\toption strict '0'\n",
            state = gwdir.join("state").display(),
            quic = cn.quic,
            ca = cn.dir.join("ca.pem").display(),
            cred = cred.display(),
            sock = gwdir.join("run/control.sock").display(),
        ),
    )
    .unwrap();
    // Installed as /etc/init.d/gatewayd: procd's service name is the script's file name.
    let initd = tmp.path().join("etc/init.d");
    std::fs::create_dir_all(&initd).unwrap();
    let script = initd.join("gatewayd");
    std::fs::copy(init_script(), &script).unwrap();
    let toml_path = gwdir.join("generated.toml");
    let ubus_log = tmp.path().join("ubus.log");
    let env = [
        ("UCI_CONFIG_DIR", uci.as_os_str()),
        ("UBUS_LOG", ubus_log.as_os_str()),
        ("GATEWAYD_TOML", toml_path.as_os_str()),
    ];
    assert_ok(&rc_common(&script, "start", &env), "start");

    let calls = ubus_calls(&ubus_log);
    assert_eq!(calls.len(), 1, "{calls:?}");
    let (method, msg) = &calls[0];
    assert_eq!(method, "set");
    assert_eq!(msg["name"], "gatewayd", "{msg}");
    assert_eq!(msg["script"], script.to_str().unwrap());
    let inst = &msg["instances"]["instance1"];
    assert_eq!(
        inst["command"],
        serde_json::json!([
            "/usr/sbin/gatewayd",
            "--config",
            toml_path.to_str().unwrap()
        ]),
        "{msg}"
    );
    assert_eq!(
        inst["file"],
        serde_json::json!(["/etc/config/gatewayd", cred.to_str().unwrap()])
    );
    assert_eq!(inst["respawn"], serde_json::json!(["3600", "5", "5"]));
    assert_eq!(inst["term_timeout"], 15);
    assert_eq!(inst["stdout"], true);
    assert_eq!(inst["stderr"], true);
    assert_eq!(inst["limits"], serde_json::json!({"memlock": "unlimited"}));
    // No `gatewayd` user on this machine: the init script runs gatewayd as root, without the
    // user, group and capabilities parameters.
    let has_user = std::fs::read_to_string("/etc/passwd")
        .unwrap_or_default()
        .lines()
        .any(|l| l.starts_with("gatewayd:"));
    if has_user {
        assert_eq!(inst["user"], "gatewayd", "{msg}");
        assert_eq!(inst["group"], "gatewayd", "{msg}");
    } else {
        assert!(inst.get("user").is_none(), "{msg}");
    }
    assert_eq!(
        msg["triggers"],
        serde_json::json!([[
            "config.change",
            [
                "if",
                ["eq", "package", "gatewayd"],
                ["run_script", "/etc/init.d/gatewayd", "reload"]
            ],
            1000
        ]]),
        "{msg}"
    );
    let mode = std::fs::metadata(gwdir.join("state"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o700, "state_dir mode {mode:o}");
    assert!(gwdir.join("run").is_dir(), "socket directory not created");

    // What procd would run: the TOML named in the command, read by a real gatewayd.
    let toml = std::fs::read_to_string(&toml_path).unwrap();
    let cfg = Config::from_toml_str(&toml, "generated").unwrap_or_else(|e| panic!("{e}\n{toml}"));
    assert_eq!(cfg.batching.max_batch, 32);
    let runner = Runner::native();
    let gw = Gw::start_with(&gwdir, &toml, &runner, &[]);
    let status: serde_json::Value = serde_json::from_str(&gw.ctl(&["status", "--json"])).unwrap();
    assert_eq!(status["batching"]["max_batch"], 32, "{status}");
    let supi = provision_device(tmp.path(), &gw, &runner, "sensor-01");
    assert!(supi.starts_with("imsi-00101"), "{supi}");

    assert_ok(&rc_common(&script, "reload", &env), "reload");
    assert_ok(&rc_common(&script, "stop", &env), "stop");
    let calls = ubus_calls(&ubus_log);
    assert_eq!(calls.len(), 3, "{calls:?}");
    assert_eq!(calls[1], calls[0], "reload sends the same service");
    assert_eq!(calls[2].0, "delete");
    assert_eq!(calls[2].1, serde_json::json!({"name": "gatewayd"}));
    // An unknown action prints rc.common's help and changes nothing.
    let out = rc_common(&script, "frobnicate", &env);
    assert!(String::from_utf8_lossy(&out.stdout).contains("Syntax: "));
    assert_eq!(ubus_calls(&ubus_log).len(), 3);
}

/// `make` in openwrt/ with the stand-in build system for one OpenWrt target.
fn openwrt_make(
    target: &str,
    tmp_root: &Path,
    vars: &[&str],
    goals: &[&str],
) -> Option<std::process::Output> {
    let make = tool("make", "make")?;
    Some(
        Command::new(make)
            .arg("-s")
            .arg("-C")
            .arg(repo().join("openwrt"))
            .arg(format!(
                "TOPDIR={}",
                repo().join("deploy/tests/openwrt/stub-openwrt").display()
            ))
            .arg(format!("OPENWRT_TARGET={target}"))
            .arg(format!("TMP_ROOT={}", tmp_root.display()))
            .args(vars)
            .args(goals)
            .output()
            .unwrap(),
    )
}

/// From source, the OpenWrt way: Build/Prepare copies this repository (without target/) into the
/// build directory, and Build/Compile is the packages feed's `cargo install` of gatewayd and of
/// iotdev from that copy, for the Rust target of each OpenWrt target, with the lock file, the
/// feed's size-optimised release profile and the SDK's C cross compiler; the eBPF object is
/// skipped unless GATEWAYD_EBPF=1.
#[test]
fn package_makefile_compiles_from_source_with_the_feeds_cargo() {
    let tmp = tempfile::tempdir().unwrap();
    for (target, triple, gcc) in [
        (
            "ipq40xx",
            "armv7-unknown-linux-musleabihf",
            "arm-openwrt-linux-muslgnueabi-gcc",
        ),
        (
            "mediatek-filogic",
            "aarch64-unknown-linux-musl",
            "aarch64-openwrt-linux-musl-gcc",
        ),
        (
            "x86-64",
            "x86_64-unknown-linux-musl",
            "x86_64-openwrt-linux-musl-gcc",
        ),
    ] {
        let root = tmp.path().join(target);
        let Some(out) = openwrt_make(target, &root, &[], &["prepare", "show-compile"]) else {
            return;
        };
        assert_ok(&out, "make prepare show-compile");
        let shown = String::from_utf8(out.stdout).unwrap();
        let cargo: Vec<&str> = shown
            .lines()
            .filter(|l| l.contains("cargo install"))
            .collect();
        assert_eq!(cargo.len(), 2, "{shown}");
        let build = std::fs::read_dir(root.join("build_dir"))
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path()
            .join("gatewayd-0.1.0");
        for (line, krate) in cargo.iter().zip(["gatewayd", "iotdev"]) {
            let linker = format!(
                "CARGO_TARGET_{}_LINKER={gcc}",
                triple.to_uppercase().replace('-', "_")
            );
            for want in [
                format!("CARGO_BUILD_TARGET={triple} "),
                linker,
                format!("TARGET_CC={gcc} "),
                "CARGO_PROFILE_RELEASE_OPT_LEVEL=z".into(),
                "RUSTFLAGS=\"-Ctarget-feature=-crt-static".into(),
                "AYA_BUILD_SKIP=1 ".into(),
                format!("CARGO_TARGET_DIR={}/target ", build.display()),
                "cargo install -v --profile release".into(),
                format!("--root {}/ipkg-install ", build.display()),
                format!("--path \"{}/{krate}\"", build.display()),
                " --locked".into(),
            ] {
                assert!(
                    line.contains(&want),
                    "{target}: {want:?} missing in\n{line}"
                );
            }
            // The crate it installs is in the prepared copy, with the repository's lock file.
            let manifest = std::fs::read_to_string(build.join(krate).join("Cargo.toml")).unwrap();
            assert!(
                manifest.contains(&format!("name = \"{krate}\"")),
                "{manifest}"
            );
        }
        assert_eq!(
            std::fs::read(build.join("Cargo.lock")).unwrap(),
            std::fs::read(repo().join("Cargo.lock")).unwrap()
        );
        assert!(!build.join("target/release").exists() && !build.join(".git").exists());
    }
    let root = tmp.path().join("ebpf");
    let out = openwrt_make("ipq40xx", &root, &["GATEWAYD_EBPF=1"], &["show-compile"]).unwrap();
    assert_ok(&out, "make show-compile GATEWAYD_EBPF=1");
    let shown = String::from_utf8(out.stdout).unwrap();
    assert!(
        shown.contains("AYA_BUILD_SKIP=0 ") && !shown.contains("AYA_BUILD_SKIP=1"),
        "{shown}"
    );
}

/// The entries of a tar archive (`tar -tvzf`): (mode string, owner/group, path).
fn tar_list(archive: &Path) -> Vec<(String, String, String)> {
    let out = Command::new("tar")
        .arg("-tvzf")
        .arg(archive)
        .output()
        .unwrap();
    assert_ok(&out, "tar -tvzf");
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f[0].to_string(), f[1].to_string(), f[5..].join(" "))
        })
        .collect()
}

fn untar(archive: &Path, into: &Path) {
    std::fs::create_dir_all(into).unwrap();
    let out = Command::new("tar")
        .arg("-C")
        .arg(into)
        .arg("-xzf")
        .arg(archive)
        .output()
        .unwrap();
    assert_ok(&out, "tar -xzf");
}

/// What `opkg install` does to an offline root (IPKG_INSTROOT, as when an image is built):
/// unpack the files, keep the control files in /usr/lib/opkg/info/<package>.*, run the postinst.
fn opkg_install_offline(
    ipk: &Path,
    rootfs: &Path,
    work: &Path,
) -> std::collections::BTreeMap<String, String> {
    let outer = work.join(ipk.file_name().unwrap());
    untar(ipk, &outer);
    assert_eq!(
        std::fs::read_to_string(outer.join("debian-binary")).unwrap(),
        "2.0\n"
    );
    let control = outer.join("CONTROL");
    untar(&outer.join("control.tar.gz"), &control);
    untar(&outer.join("data.tar.gz"), rootfs);
    let fields: std::collections::BTreeMap<String, String> =
        std::fs::read_to_string(control.join("control"))
            .unwrap()
            .lines()
            .filter_map(|l| l.split_once(": "))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
    let pkg = &fields["Package"];
    let info = rootfs.join("usr/lib/opkg/info");
    std::fs::create_dir_all(&info).unwrap();
    let files: Vec<String> = tar_list(&outer.join("data.tar.gz"))
        .into_iter()
        .filter(|(mode, _, _)| !mode.starts_with('d'))
        .map(|(_, _, p)| p.trim_start_matches('.').to_string())
        .collect();
    std::fs::write(info.join(format!("{pkg}.list")), files.join("\n") + "\n").unwrap();
    for f in ["control", "conffiles", "postinst", "prerm"] {
        if control.join(f).exists() {
            std::fs::copy(control.join(f), info.join(format!("{pkg}.{f}"))).unwrap();
        }
    }
    let out = Command::new("sh")
        .arg(info.join(format!("{pkg}.postinst")))
        .env("IPKG_INSTROOT", rootfs)
        .env_remove("STANDIN_ROOT")
        .output()
        .unwrap();
    assert_ok(&out, "postinst");
    fields
}

/// The package Makefile's own install rules, run by the stand-in build system with the static
/// armv7 binaries (GATEWAYD_PREBUILT) for an IPQ40xx router, make real .ipk files: the outer
/// archive opkg reads, control fields, conffiles, modes and root ownership. Installed into an
/// offline root as opkg does, the package's postinst creates the `gatewayd` user (Require-User)
/// and enables the init script (rc.d links from START/STOP); the installed binaries are the
/// static ones and run (under qemu-arm); the prerm disables the script again. Without the
/// binaries the build stops and says what to run.
#[test]
fn package_makefile_builds_ipks_that_install_offline() {
    let Some(dist) = static_dir("armv7-unknown-linux-musleabihf") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let empty = tmp.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let Some(out) = openwrt_make(
        "ipq40xx",
        &tmp.path().join("sdk0"),
        &[&format!("GATEWAYD_PREBUILT={}", empty.display())],
        &["compile"],
    ) else {
        return;
    };
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("run scripts/build-static.sh"), "{err}");

    let sdk = tmp.path().join("sdk");
    let out = openwrt_make(
        "ipq40xx",
        &sdk,
        &[&format!("GATEWAYD_PREBUILT={}", dist.display())],
        &["compile"],
    )
    .unwrap();
    assert_ok(&out, "make compile");
    let pkgs = sdk.join("bin/packages/arm_cortex-a7_neon-vfpv4");
    let gw_ipk = pkgs.join("gatewayd_0.1.0-1_arm_cortex-a7_neon-vfpv4.ipk");
    let dev_ipk = pkgs.join("iotdev_0.1.0-1_arm_cortex-a7_neon-vfpv4.ipk");
    let outer: Vec<String> = tar_list(&gw_ipk).into_iter().map(|e| e.2).collect();
    assert_eq!(
        outer,
        ["./debian-binary", "./data.tar.gz", "./control.tar.gz"]
    );

    // The files of the gatewayd package: modes, and owned by root.
    let work = tmp.path().join("work");
    untar(&gw_ipk, &work.join("raw"));
    let data = tar_list(&work.join("raw/data.tar.gz"));
    for (path, mode) in [
        ("./usr/sbin/gatewayd", "-rwxr-xr-x"),
        ("./usr/bin/gatewayctl", "-rwxr-xr-x"),
        ("./etc/init.d/gatewayd", "-rwxr-xr-x"),
        ("./etc/config/gatewayd", "-rw-------"),
        ("./etc/capabilities/gatewayd.json", "-rw-r--r--"),
        ("./etc/gatewayd/", "drwxr-xr-x"),
    ] {
        let e = data
            .iter()
            .find(|e| e.2 == path)
            .unwrap_or_else(|| panic!("{path} not in the package: {data:?}"));
        assert_eq!(e.0, mode, "{path}");
    }
    assert!(data.iter().all(|e| e.1 == "0/0"), "{data:?}");

    // Offline install into a root with base-files' pieces (the stand-ins) and its users.
    let rootfs = tmp.path().join("rootfs");
    for d in ["etc/rc.d", "lib/functions", "lib/config"] {
        std::fs::create_dir_all(rootfs.join(d)).unwrap();
    }
    for f in [
        "etc/rc.common",
        "lib/functions.sh",
        "lib/functions/procd.sh",
        "lib/config/uci.sh",
    ] {
        std::fs::copy(standin().join(f), rootfs.join(f)).unwrap();
    }
    std::fs::write(
        rootfs.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/ash\n",
    )
    .unwrap();
    std::fs::write(rootfs.join("etc/group"), "root:x:0:\n").unwrap();
    std::fs::write(rootfs.join("etc/shadow"), "").unwrap();
    let fields = opkg_install_offline(&gw_ipk, &rootfs, &work);
    for (k, v) in [
        ("Package", "gatewayd"),
        ("Version", "0.1.0-1"),
        ("Architecture", "arm_cortex-a7_neon-vfpv4"),
        ("Depends", "libc"),
        ("Section", "net"),
        ("License", "Apache-2.0"),
        ("Require-User", "gatewayd=455:gatewayd=455"),
    ] {
        assert_eq!(
            fields.get(k).map(String::as_str),
            Some(v),
            "{k}: {fields:?}"
        );
    }
    let size: u64 = fields["Installed-Size"].parse().unwrap();
    assert!(
        size > std::fs::metadata(dist.join("gatewayd")).unwrap().len(),
        "{size}"
    );
    assert!(fields["Description"].contains("companion UE"), "{fields:?}");
    assert_eq!(
        std::fs::read_to_string(rootfs.join("usr/lib/opkg/info/gatewayd.conffiles")).unwrap(),
        "/etc/config/gatewayd\n/etc/gatewayd/\n"
    );
    let dev_fields = opkg_install_offline(&dev_ipk, &rootfs, &work);
    assert_eq!(dev_fields["Package"], "iotdev");
    assert!(!dev_fields.contains_key("Require-User"));

    let passwd = std::fs::read_to_string(rootfs.join("etc/passwd")).unwrap();
    assert!(
        passwd.contains("\ngatewayd:x:455:455:gatewayd:/var/run/gatewayd:/bin/false\n"),
        "{passwd}"
    );
    let group = std::fs::read_to_string(rootfs.join("etc/group")).unwrap();
    assert!(group.contains("\ngatewayd:x:455:gatewayd\n"), "{group}");
    for link in ["S95gatewayd", "K10gatewayd"] {
        assert_eq!(
            std::fs::read_link(rootfs.join("etc/rc.d").join(link)).unwrap(),
            Path::new("../init.d/gatewayd"),
            "{link}"
        );
    }
    for (installed, built) in [
        ("usr/sbin/gatewayd", "gatewayd"),
        ("usr/bin/gatewayctl", "gatewayctl"),
        ("usr/bin/iotdev", "iotdev"),
    ] {
        assert!(
            std::fs::read(rootfs.join(installed)).unwrap()
                == std::fs::read(dist.join(built)).unwrap(),
            "{installed} differs from {}",
            dist.join(built).display()
        );
    }
    if let Some(qemu) = tool("qemu-arm-static", "qemu-user-static") {
        let out = Command::new(qemu)
            .arg(rootfs.join("usr/sbin/gatewayd"))
            .arg("--version")
            .output()
            .unwrap();
        assert_ok(&out, "gatewayd --version under qemu-arm");
        assert!(String::from_utf8_lossy(&out.stdout).starts_with("gatewayd "));
    }

    let out = Command::new("sh")
        .arg(rootfs.join("usr/lib/opkg/info/gatewayd.prerm"))
        .env("IPKG_INSTROOT", &rootfs)
        .env_remove("STANDIN_ROOT")
        .output()
        .unwrap();
    assert_ok(&out, "prerm");
    assert_eq!(
        std::fs::read_dir(rootfs.join("etc/rc.d")).unwrap().count(),
        0
    );
}
