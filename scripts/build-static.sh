#!/usr/bin/env bash
# Static (musl) router binaries of gatewayd, gatewayctl and iotdev, for x86_64, aarch64 and armv7
# (hard-float; IPQ40xx and most ARM home routers):
#
#   scripts/build-static.sh                 # all targets -> target/dist/<target>/{gatewayd,gatewayctl,iotdev}
#   TARGETS=aarch64-unknown-linux-musl scripts/build-static.sh
#
# armv7-unknown-linux-musleabihf is built with the nightly toolchain and `-Zbuild-std` (std compiled
# from the nightly's rust-src, which setup.sh installs for the eBPF build anyway): rustup offers no
# prebuilt std for that target here (`rustup target add` fails with HTTP 404). The other targets
# use the stable toolchain and rustup's std. A first armv7 build takes about as long as aarch64's
# plus std (a few minutes more).
#
# C code (SQLite via rusqlite's bundled build, ring, mimalloc) is cross-compiled with zig as the C
# compiler and linker (cargo-zigbuild); `scripts/setup.sh` installs zig (PyPI `ziglang`),
# cargo-zigbuild and the rustup targets. The eBPF filter object gatewayd embeds is built by
# gatewayd's build.rs with nightly + bpf-linker for bpfel-unknown-none; it is target-independent
# (all three targets are little-endian), so it is the same object in every binary. AYA_BUILD_SKIP=1
# builds without it (gatewayd then filters in userspace and says so).
#
# The `router` cargo profile (Cargo.toml: the release profile with opt-level "s", fat LTO, one
# codegen unit, no debug info, symbols stripped; issue 17 measures its size and speed against
# release in docs/BENCHMARKS.md). PROFILE=release builds with the release profile instead, for
# comparison. A separate target directory
# ($STATIC_TARGET_DIR, default target/static) keeps the shared target/ untouched and is reused
# between runs (CI caches it). Prints each binary's size; writes target/dist/<target>/SIZES.
set -euo pipefail
cd "$(dirname "$0")/.."

TARGETS=${TARGETS:-"x86_64-unknown-linux-musl aarch64-unknown-linux-musl armv7-unknown-linux-musleabihf"}
# Targets whose std is built from source by the nightly (see above).
BUILD_STD_TARGETS=" armv7-unknown-linux-musleabihf "
DIST=${DIST:-target/dist}
export CARGO_TARGET_DIR=${STATIC_TARGET_DIR:-$PWD/target/static}
PROFILE=${PROFILE:-router}
export CARGO_PROFILE_RELEASE_STRIP=symbols
export CARGO_PROFILE_RELEASE_DEBUG=0

die() { echo "build-static: $*" >&2; exit 1; }
command -v cargo-zigbuild >/dev/null || die "cargo-zigbuild not found: run scripts/setup.sh"
python3 -m ziglang version >/dev/null 2>&1 || command -v zig >/dev/null ||
  die "zig not found (PyPI ziglang): run scripts/setup.sh"

for t in $TARGETS; do
  echo "build-static: $t" >&2
  case "$BUILD_STD_TARGETS" in
  *" $t "*)
    [ -f "$(rustc +nightly --print sysroot 2>/dev/null)/lib/rustlib/src/rust/library/std/Cargo.toml" ] ||
      die "the nightly toolchain's rust-src (to build std for $t) is missing: run scripts/setup.sh"
    # std built from source has no self-contained musl start files (crt1.o, ...) in the sysroot:
    # -C link-self-contained=no lets zig supply them, with musl and libunwind. `cargo rustc` passes
    # that to the linking crate only (one binary per call; the dependencies are built once).
    for pb in gatewayd:gatewayd gatewayd:gatewayctl iotdev:iotdev; do
      rustup run nightly cargo-zigbuild rustc -Zbuild-std=std,panic_abort --profile "$PROFILE" --locked \
        --target "$t" -p "${pb%%:*}" --bin "${pb#*:}" -- -C link-self-contained=no
    done
    ;;
  *)
    rustup target list --installed | grep -qx "$t" || die "rustup target $t missing: run scripts/setup.sh"
    cargo zigbuild --profile "$PROFILE" --locked --target "$t" \
      -p gatewayd --bin gatewayd --bin gatewayctl -p iotdev --bin iotdev
    ;;
  esac
  mkdir -p "$DIST/$t"
  : > "$DIST/$t/SIZES"
  for b in gatewayd gatewayctl iotdev; do
    install -m 0755 "$CARGO_TARGET_DIR/$t/$PROFILE/$b" "$DIST/$t/$b"
    file_info=$(file -b "$DIST/$t/$b" 2>/dev/null || true)
    case "$file_info" in *dynamically*) die "$DIST/$t/$b is dynamically linked: $file_info" ;; esac
    size=$(stat -c %s "$DIST/$t/$b")
    printf '%-11s %9d bytes  %6.2f MiB  %s  profile %s\n' "$b" "$size" \
      "$(awk -v s="$size" 'BEGIN { print s / 1048576 }')" "$t" "$PROFILE" | tee -a "$DIST/$t/SIZES"
  done
done
