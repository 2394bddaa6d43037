//! The static router binaries from `scripts/build-static.sh`: statically linked ELF files for the
//! right machine, and a device provisioned through them — the aarch64 gatewayd, gatewayctl and
//! iotdev under qemu-user (`qemu-aarch64-static`) against a native cn-backend, and the x86_64
//! ones natively — on loopback. Prints the gateway's resident memory after the run.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;

use deploy_tests::{Cn, Gw, Runner, provision_device, rss_kib, static_dir, tool};

/// ELF header: 64-bit, little-endian, machine `machine`, no PT_INTERP (static).
fn assert_static_elf(path: &Path, machine: u16) {
    let b = std::fs::read(path).unwrap();
    assert_eq!(&b[..4], b"\x7fELF", "{} is not ELF", path.display());
    assert_eq!(b[4], 2, "{}: not 64-bit", path.display());
    assert_eq!(b[5], 1, "{}: not little-endian", path.display());
    let m = u16::from_le_bytes([b[18], b[19]]);
    assert_eq!(m, machine, "{}: e_machine {m}", path.display());
    let phoff = u64::from_le_bytes(b[32..40].try_into().unwrap()) as usize;
    let phentsize = u16::from_le_bytes([b[54], b[55]]) as usize;
    let phnum = u16::from_le_bytes([b[56], b[57]]) as usize;
    for i in 0..phnum {
        let p = phoff + i * phentsize;
        let kind = u32::from_le_bytes(b[p..p + 4].try_into().unwrap());
        assert_ne!(
            kind,
            3,
            "{} has an ELF interpreter: not static",
            path.display()
        );
    }
}

fn provision_through(runner: &Runner, label: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let cn = Cn::start(&tmp.path().join("cn"), 5, &[]);
    let gw = Gw::start(&tmp.path().join("gw"), &cn, runner);
    let supi = provision_device(tmp.path(), &gw, runner, "watch-01");
    assert!(supi.starts_with("imsi-00101"), "{supi}");
    let v: serde_json::Value = serde_json::from_str(&gw.ctl(&["devices", "--json"])).unwrap();
    assert_eq!(v[0]["status"], "provisioned", "{v}");
    assert_eq!(v[0]["supi"], supi.as_str());
    let metrics = gw.scrape();
    assert!(
        metrics.contains("gatewayd_requests_total{kind=\"provision\",outcome=\"issued\"} 1"),
        "{metrics}"
    );
    let (rss, hwm) = rss_kib(gw.proc.pid());
    eprintln!("{label}: gatewayd RSS {rss} KiB (peak {hwm} KiB) after one provisioning");
}

#[test]
fn aarch64_binaries_provision_a_device_under_qemu() {
    let Some(dir) = static_dir("aarch64-unknown-linux-musl") else {
        return;
    };
    for b in ["gatewayd", "gatewayctl", "iotdev"] {
        assert_static_elf(&dir.join(b), 183); // EM_AARCH64
    }
    let Some(qemu) = tool("qemu-aarch64-static", "qemu-user-static") else {
        return;
    };
    let runner = Runner {
        dir,
        emulator: Some(qemu),
    };
    provision_through(&runner, "aarch64 under qemu-user");
}

#[test]
fn x86_64_static_binaries_provision_a_device() {
    let Some(dir) = static_dir("x86_64-unknown-linux-musl") else {
        return;
    };
    for b in ["gatewayd", "gatewayctl", "iotdev"] {
        assert_static_elf(&dir.join(b), 62); // EM_X86_64
    }
    let runner = Runner {
        dir,
        emulator: None,
    };
    provision_through(&runner, "x86_64 musl");
}
