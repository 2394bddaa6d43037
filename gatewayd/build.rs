//! Builds the eBPF LAN filter (`ebpf/filter-ebpf`, outside the workspace) from source with
//! aya-build (nightly `rust-src` + `bpf-linker`, installed by `scripts/setup.sh --build`) and
//! leaves the object at `$OUT_DIR/companion-filter`, which `src/filter` embeds.
//!
//! `AYA_BUILD_SKIP=1` skips it (for machines without the BPF toolchain): an empty object is
//! embedded and gatewayd runs the filter in userspace, saying so.
//!
//! Before handing over to aya-build, the script checks the two pieces a fresh machine lacks and,
//! if one is missing, fails with one short paragraph that names it and the command that installs
//! it, instead of aya-build's error chain.
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

/// The toolchain aya-build compiles the eBPF crate with (`aya_build::Toolchain::default()`).
const EBPF_TOOLCHAIN: &str = "nightly";

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            // Cargo prints a failed build script's stderr verbatim: one paragraph, no backtrace.
            eprintln!("\n{message}\n");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), String> {
    let env = |name: &str| {
        std::env::var(name)
            .map_err(|_| format!("gatewayd build: {name} is not set (run this through cargo)"))
    };
    let manifest = PathBuf::from(env("CARGO_MANIFEST_DIR")?);
    let ebpf_dir = canonical(&manifest.join("../ebpf/filter-ebpf"))?;
    let common_dir = canonical(&manifest.join("../ebpf/filter-common"))?;
    let out = PathBuf::from(env("OUT_DIR")?);
    println!("cargo:rerun-if-changed={}", common_dir.display());
    println!("cargo:rerun-if-env-changed=AYA_BUILD_SKIP");
    println!("cargo:rustc-check-cfg=cfg(filter_ebpf_skipped)");

    if !skip_requested()
        && let Some(missing) = missing_ebpf_toolchain()
    {
        return Err(format!(
            "error: gatewayd's in-kernel LAN filter (eBPF) cannot be built: {missing} is missing.\n\
             Install it with `scripts/setup.sh --build` (once; about 3 minutes, idempotent), \
             or build without the in-kernel filter with `AYA_BUILD_SKIP=1 cargo build …` \
             (gatewayd then filters in userspace and says so at start)."
        ));
    }

    let root = ebpf_dir.to_string_lossy().into_owned();
    // The eBPF crate is its own workspace: run its cargo from its directory.
    std::env::set_current_dir(&ebpf_dir)
        .map_err(|e| format!("gatewayd build: cannot enter {}: {e}", ebpf_dir.display()))?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "companion-filter-ebpf",
            root_dir: &root,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
    .map_err(|e| {
        format!(
            "error: building gatewayd's eBPF LAN filter (ebpf/filter-ebpf) failed: {e:#}\n\
             `AYA_BUILD_SKIP=1` builds gatewayd without the in-kernel filter."
        )
    })?;
    let obj = out.join("companion-filter");
    if !obj.exists() {
        std::fs::write(&obj, b"")
            .map_err(|e| format!("gatewayd build: writing {}: {e}", obj.display()))?;
        println!("cargo:rustc-cfg=filter_ebpf_skipped");
    }
    Ok(())
}

fn canonical(path: &Path) -> Result<PathBuf, String> {
    path.canonicalize()
        .map_err(|e| format!("gatewayd build: {}: {e}", path.display()))
}

/// `AYA_BUILD_SKIP=1` (or `true`), as aya-build reads it.
fn skip_requested() -> bool {
    std::env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"))
}

/// Names the first missing piece of the eBPF toolchain, or `None` when all are there.
fn missing_ebpf_toolchain() -> Option<String> {
    if find_on_path("bpf-linker").is_none() {
        return Some("`bpf-linker` (0.10.4)".into());
    }
    // Without rustup aya-build uses the current toolchain; only rustup's nightly can be checked.
    find_on_path("rustup")?;
    let sysroot = Command::new("rustup")
        .args(["run", EBPF_TOOLCHAIN, "rustc", "--print", "sysroot"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()));
    let Some(sysroot) = sysroot else {
        return Some(format!("the `{EBPF_TOOLCHAIN}` Rust toolchain"));
    };
    let library = sysroot.join("lib/rustlib/src/rust/library/core/Cargo.toml");
    if !library.exists() {
        return Some(format!(
            "the `rust-src` component of the `{EBPF_TOOLCHAIN}` toolchain"
        ));
    }
    None
}

fn find_on_path(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
}
