//! Builds the eBPF LAN filter (`ebpf/filter-ebpf`, outside the workspace) from source with
//! aya-build (nightly `rust-src` + `bpf-linker`, installed by `scripts/setup.sh`) and leaves the
//! object at `$OUT_DIR/companion-filter`, which `src/filter` embeds.
//!
//! `AYA_BUILD_SKIP=1` skips it (for machines without the BPF toolchain): an empty object is
//! embedded and gatewayd runs the filter in userspace, saying so.
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let ebpf_dir = manifest.join("../ebpf/filter-ebpf").canonicalize()?;
    let common_dir = manifest.join("../ebpf/filter-common").canonicalize()?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    println!("cargo:rerun-if-changed={}", common_dir.display());
    println!("cargo:rustc-check-cfg=cfg(filter_ebpf_skipped)");
    let root = ebpf_dir.to_string_lossy().into_owned();
    // The eBPF crate is its own workspace: run its cargo from its directory.
    std::env::set_current_dir(&ebpf_dir)?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "companion-filter-ebpf",
            root_dir: &root,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )?;
    let obj = out.join("companion-filter");
    if !obj.exists() {
        std::fs::write(&obj, b"")?;
        println!("cargo:rustc-cfg=filter_ebpf_skipped");
    }
    Ok(())
}
