//! The static router binaries from `scripts/build-static.sh`: statically linked ELF files for the
//! right machine, and a device provisioned through them — the aarch64 and armv7 gatewayd,
//! gatewayctl and iotdev under qemu-user (`qemu-aarch64-static`, `qemu-arm-static`) against a
//! native cn-backend, and the x86_64 ones natively — on loopback. Prints the gateway's resident memory after the run.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;

use deploy_tests::{Cn, Gw, Runner, provision_device, rss_kib, static_dir, tool};

/// ELF header: little-endian, machine `machine`, 64-bit or 32-bit (`elf64`), no PT_INTERP
/// (static). Returns e_flags.
fn assert_static_elf(path: &Path, machine: u16, elf64: bool) -> u32 {
    let b = std::fs::read(path).unwrap();
    let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]) as usize;
    let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
    assert_eq!(&b[..4], b"\x7fELF", "{} is not ELF", path.display());
    assert_eq!(
        b[4],
        if elf64 { 2 } else { 1 },
        "{}: ELF class",
        path.display()
    );
    assert_eq!(b[5], 1, "{}: not little-endian", path.display());
    let m = u16_at(18) as u16;
    assert_eq!(m, machine, "{}: e_machine {m}", path.display());
    // e_phoff, e_flags, e_phentsize, e_phnum: offsets differ between the two classes.
    let (phoff, flags, phentsize, phnum) = if elf64 {
        let phoff = u64::from_le_bytes(b[32..40].try_into().unwrap()) as usize;
        (phoff, u32_at(48), u16_at(54), u16_at(56))
    } else {
        (u32_at(28) as usize, u32_at(36), u16_at(42), u16_at(44))
    };
    for i in 0..phnum {
        let kind = u32_at(phoff + i * phentsize);
        assert_ne!(
            kind,
            3,
            "{} has an ELF interpreter: not static",
            path.display()
        );
    }
    flags
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
        assert_static_elf(&dir.join(b), 183, true); // EM_AARCH64
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

/// armv7 (hard-float EABI5, the IPQ40xx and most ARM home routers): built with the nightly's
/// build-std (rustup has no prebuilt std for this target here), run under qemu-arm.
#[test]
fn armv7_binaries_provision_a_device_under_qemu() {
    let Some(dir) = static_dir("armv7-unknown-linux-musleabihf") else {
        return;
    };
    for b in ["gatewayd", "gatewayctl", "iotdev"] {
        let flags = assert_static_elf(&dir.join(b), 40, false); // EM_ARM
        assert_eq!(
            flags & 0xff00_0000,
            0x0500_0000,
            "{b}: EABI version, e_flags {flags:#x}"
        );
        assert_ne!(
            flags & 0x400,
            0,
            "{b}: not hard-float (EF_ARM_ABI_FLOAT_HARD), e_flags {flags:#x}"
        );
    }
    let Some(qemu) = tool("qemu-arm-static", "qemu-user-static") else {
        return;
    };
    let runner = Runner {
        dir,
        emulator: Some(qemu),
    };
    provision_through(&runner, "armv7 under qemu-user");
}

#[test]
fn x86_64_static_binaries_provision_a_device() {
    let Some(dir) = static_dir("x86_64-unknown-linux-musl") else {
        return;
    };
    for b in ["gatewayd", "gatewayctl", "iotdev"] {
        assert_static_elf(&dir.join(b), 62, true); // EM_X86_64
    }
    let runner = Runner {
        dir,
        emulator: None,
    };
    provision_through(&runner, "x86_64 musl");
}
