//! OpenWrt: the procd init script and the scripts parse (`sh -n`, POSIX sh); the UCI → TOML
//! mapping in the init script, run with a stand-in for /lib/functions.sh, turns the shipped
//! /etc/config/gatewayd into a configuration gatewayd's own loader accepts with the intended
//! values, and turns a test UCI file into one a real gatewayd starts with and links to a real
//! cn-backend; `start_service` hands procd the command, respawn, watched files and limits; the
//! package Makefile installs the binaries and files (with a stand-in for OpenWrt's rules.mk).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use deploy_tests::{Cn, Gw, Runner, provision_device, repo, tool, write_companion};
use gatewayd::config::Config;

fn init_script() -> std::path::PathBuf {
    repo().join("openwrt/files/gatewayd.init")
}

fn stub() -> std::path::PathBuf {
    repo().join("deploy/tests/openwrt/functions.sh")
}

/// Runs `body` in `sh` after sourcing the functions stub and the init script, with UCI files
/// from `uci_dir`. Returns stdout; panics with stderr on failure.
fn run_sh(uci_dir: &Path, procd_log: &Path, env: &[(&str, &str)], body: &str) -> String {
    let script = format!(
        ". '{}'\n. '{}'\n{body}\n",
        stub().display(),
        init_script().display()
    );
    let out = Command::new("sh")
        .arg("-c")
        .arg(&script)
        .env("UCI_CONFIG_DIR", uci_dir)
        .env("PROCD_LOG", procd_log)
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
    for f in [
        "openwrt/files/gatewayd.init",
        "deploy/tests/openwrt/functions.sh",
    ] {
        let out = Command::new("sh")
            .arg("-n")
            .arg(repo().join(f))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "sh -n {f}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    for f in [
        "scripts/build-static.sh",
        "scripts/setup.sh",
        "scripts/test.sh",
    ] {
        let out = Command::new("bash")
            .arg("-n")
            .arg(repo().join(f))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "bash -n {f}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let caps: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(repo().join("openwrt/files/gatewayd.capabilities.json")).unwrap(),
    )
    .unwrap();
    for set in [
        "bounding",
        "effective",
        "ambient",
        "permitted",
        "inheritable",
    ] {
        assert_eq!(
            caps[set],
            serde_json::json!(["CAP_NET_ADMIN", "CAP_BPF", "CAP_PERFMON"]),
            "{set}"
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
    let toml = run_sh(
        tmp.path(),
        &tmp.path().join("procd.log"),
        &[],
        "gatewayd_uci_to_toml",
    );
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
    let toml = run_sh(
        tmp.path(),
        &tmp.path().join("procd.log"),
        &[],
        "gatewayd_uci_to_toml",
    );
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
        .env("UCI_CONFIG_DIR", tmp.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("batching.max_batch must be a whole number, not 'lots'"),
        "{err}"
    );
}

/// A UCI file for a loopback test: start_service generates the TOML and hands procd its
/// instance; the real gatewayd runs with that TOML (no systemd: no NOTIFY_SOCKET), links to a
/// real cn-backend and provisions a device.
#[test]
fn start_service_runs_a_gatewayd_that_provisions() {
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
    let toml_path = gwdir.join("generated.toml");
    let procd_log = tmp.path().join("procd.log");
    run_sh(
        &uci,
        &procd_log,
        &[("GATEWAYD_TOML", toml_path.to_str().unwrap())],
        "start_service\nservice_triggers",
    );
    let procd = std::fs::read_to_string(&procd_log).unwrap();
    for want in [
        format!(
            "procd: set_param command /usr/sbin/gatewayd --config {}",
            toml_path.display()
        ),
        format!(
            "procd: set_param file /etc/config/gatewayd {}",
            cred.display()
        ),
        "procd: set_param respawn 3600 5 5".to_string(),
        "procd: set_param stderr 1".to_string(),
        "procd: set_param limits memlock=unlimited".to_string(),
        "procd: close_instance".to_string(),
        "procd: reload_trigger gatewayd".to_string(),
    ] {
        assert!(procd.contains(&want), "procd calls lack {want:?}:\n{procd}");
    }
    let mode = std::fs::metadata(gwdir.join("state"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o700, "state_dir mode {mode:o}");
    assert!(gwdir.join("run").is_dir(), "socket directory not created");

    let toml = std::fs::read_to_string(&toml_path).unwrap();
    let cfg = Config::from_toml_str(&toml, "generated").unwrap_or_else(|e| panic!("{e}\n{toml}"));
    assert_eq!(cfg.batching.max_batch, 32);
    let runner = Runner::native();
    let gw = Gw::start_with(&gwdir, &toml, &runner, &[]);
    let status: serde_json::Value = serde_json::from_str(&gw.ctl(&["status", "--json"])).unwrap();
    assert_eq!(status["batching"]["max_batch"], 32, "{status}");
    let supi = provision_device(tmp.path(), &gw, &runner, "sensor-01");
    assert!(supi.starts_with("imsi-00101"), "{supi}");
}

/// The package Makefile, with a stand-in for OpenWrt's rules.mk/package.mk: it refuses to build
/// without the static binaries and installs every file with OpenWrt's modes.
#[test]
fn package_makefile_installs_the_files() {
    let Some(make) = tool("make", "make") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let dist = tmp.path().join("dist/aarch64-unknown-linux-musl");
    std::fs::create_dir_all(&dist).unwrap();
    let run = |targets: &[&str]| {
        Command::new(&make)
            .arg("-s")
            .arg("-C")
            .arg(repo().join("openwrt"))
            .arg(format!(
                "TOPDIR={}",
                repo().join("deploy/tests/openwrt/stub-openwrt").display()
            ))
            .arg("ARCH=aarch64")
            .arg(format!(
                "GATEWAYD_DIST={}",
                tmp.path().join("dist").display()
            ))
            .arg(format!("STAGING={}", tmp.path().join("staging").display()))
            .arg(format!("BUILD_DIR={}", tmp.path().join("build").display()))
            .args(targets)
            .output()
            .unwrap()
    };
    let out = run(&["install-gatewayd"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("run scripts/build-static.sh"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for b in ["gatewayd", "gatewayctl", "iotdev"] {
        std::fs::write(dist.join(b), "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(dist.join(b), std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let out = run(&["install-gatewayd", "install-iotdev"]);
    assert!(
        out.status.success(),
        "make: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let st = tmp.path().join("staging");
    for (f, mode) in [
        ("gatewayd/usr/sbin/gatewayd", 0o755),
        ("gatewayd/usr/bin/gatewayctl", 0o755),
        ("gatewayd/etc/init.d/gatewayd", 0o755),
        ("gatewayd/etc/config/gatewayd", 0o600),
        ("gatewayd/etc/capabilities/gatewayd.json", 0o644),
        ("iotdev/usr/bin/iotdev", 0o755),
    ] {
        let m = std::fs::metadata(st.join(f))
            .unwrap_or_else(|e| panic!("{f}: {e}"))
            .permissions()
            .mode();
        assert_eq!(m & 0o777, mode, "{f}: mode {m:o}");
    }
    assert!(st.join("gatewayd/etc/gatewayd").is_dir());
}
