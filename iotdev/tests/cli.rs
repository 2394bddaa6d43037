//! The `iotdev` CLI on its own (no gateway): init, files and modes, pairing code, and the
//! messages a device owner gets before anything is provisioned. The procedure against real
//! daemons is in `loadgen/tests/e2e.rs`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use companion_testkit::{Out, scratch};

/// `iotdev --dir <dir> <args>` (without a gateway from the environment): exit code, stdout,
/// stderr.
fn iotdev(dir: &Path, args: &[&str]) -> (i32, String, String) {
    let mut c = Command::new(env!("CARGO_BIN_EXE_iotdev"));
    c.arg("--dir")
        .arg(dir)
        .args(args)
        .env_remove("IOTDEV_GATEWAY");
    let o = Out::of(&mut c).unwrap();
    (o.code, o.stdout, o.stderr)
}

#[test]
fn init_creates_private_keys_and_prints_the_pairing_code() {
    let tmp = scratch();
    let dir = tmp.path().join("dev");
    let (code, out, err) = iotdev(&dir, &["init", "--id", "watch-01"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("CPN:V:1;I:watch-01;K:"), "{out}");
    assert!(out.contains('█') || out.contains('▀'), "no QR code: {out}");
    assert!(out.contains("HPKE key"), "{out}");
    for (f, want) in [("device.key", 0o600), ("device.json", 0o600)] {
        let mode = std::fs::metadata(dir.join(f)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, want, "{f}");
    }
    let dmode = std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
    assert_eq!(dmode, 0o700);

    // The same code again, without the QR code.
    let (code, again, _) = iotdev(&dir, &["pairing-code", "--no-qr"]);
    assert_eq!(code, 0);
    let line = |s: &str| {
        s.lines()
            .find(|l| l.starts_with("CPN:"))
            .unwrap()
            .to_string()
    };
    assert_eq!(line(&out), line(&again));
    assert!(!again.contains('█'));

    // Twice: refused, nothing overwritten.
    let (code, _, err) = iotdev(&dir, &["init", "--id", "watch-01"]);
    assert_eq!(code, 1);
    assert!(err.contains("already holds a device"), "{err}");

    // Nothing provisioned yet.
    let (code, out, _) = iotdev(&dir, &["show", "--json"]);
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["device_id"], "watch-01");
    assert!(v["credential"].is_null());
    let (code, _, err) = iotdev(&dir, &["attach"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("holds no credential") && err.contains("iotdev provision"),
        "{err}"
    );
    let (code, _, err) = iotdev(&dir, &["renew", "--gateway", "127.0.0.1:1"]);
    assert_eq!(code, 1);
    assert!(err.contains("no credential to renew"), "{err}");
}

#[test]
fn clear_errors_without_a_device_or_with_bad_input() {
    let tmp = scratch();
    let dir = tmp.path().join("none");
    let (code, _, err) = iotdev(&dir, &["show"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("no device in") && err.contains("init --id"),
        "{err}"
    );
    let (code, _, err) = iotdev(&dir, &["init", "--id", "bad id!"]);
    assert_eq!(code, 1);
    assert!(err.contains("not a valid device ID"), "{err}");
    let (code, _, err) = iotdev(
        &dir,
        &["provision", "--gateway", "127.0.0.1:1", "--retry-for", "x"],
    );
    assert_eq!(code, 2, "{err}");
}

#[test]
fn an_unreachable_gateway_is_a_retryable_failure() {
    let tmp = scratch();
    let dir = tmp.path().join("dev");
    assert_eq!(iotdev(&dir, &["init", "--id", "s-1", "--no-qr"]).0, 0);
    // Nothing listens on this UDP port: the handshake times out.
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = sock.local_addr().unwrap().to_string();
    drop(sock);
    let (code, _, err) = iotdev(
        &dir,
        &[
            "provision",
            "--gateway",
            &addr,
            "--retry-for",
            "0s",
            "--timeout",
            "2s",
        ],
    );
    assert_eq!(code, 75, "{err}");
    assert!(err.contains("cannot reach the gateway"), "{err}");
    assert!(err.contains("hint:"), "{err}");
}
