#!/usr/bin/env bash
# Tools for the deployment tests and the static router builds (issue 7), called by setup.sh.
# Idempotent: each step checks first.
#   Debian packages: systemd (systemd-analyze, -sysusers, -tmpfiles), prometheus (promtool and the
#   server), qemu-user-static (runs the aarch64 and armv7 binaries), make, file; for the Debian packages and
#   their real-systemd suite (deploy/tests/debian.rs): debootstrap, systemd-container
#   (systemd-nspawn), lintian, help2man, dpkg-dev (dpkg-shlibdeps).
#   Rust: cargo-deb (scripts/build-deb.sh).
#   Rust: the x86_64/aarch64 musl targets (armv7 needs none: its std is built from the nightly's
#   rust-src, installed by setup.sh); zig (PyPI `ziglang`) as the cross C compiler/linker
#   for SQLite, ring and mimalloc; cargo-zigbuild.
set -euo pipefail

log() { printf '\033[1;34msetup:\033[0m %s\n' "$*" >&2; }

debs=()
command -v systemd-analyze >/dev/null || debs+=(systemd)
{ command -v promtool >/dev/null && command -v prometheus >/dev/null; } || debs+=(prometheus)
{ command -v qemu-aarch64-static >/dev/null && command -v qemu-arm-static >/dev/null; } || debs+=(qemu-user-static)
command -v make >/dev/null || debs+=(make)
command -v file >/dev/null || debs+=(file)
command -v debootstrap >/dev/null || debs+=(debootstrap)
command -v systemd-nspawn >/dev/null || debs+=(systemd-container)
command -v lintian >/dev/null || debs+=(lintian)
command -v help2man >/dev/null || debs+=(help2man)
command -v dpkg-shlibdeps >/dev/null || debs+=(dpkg-dev)
if ((${#debs[@]})); then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    log "apt-get install ${debs[*]}"
    apt-get update -qq
    # The prometheus package would start a server where systemd runs; the tests start their own.
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${debs[@]}" >/dev/null
  else
    log "WARNING: missing Debian packages ${debs[*]}: run setup as root (their tests are skipped, or fail under DEPLOY_TESTS_STRICT=1)"
  fi
fi

for t in x86_64-unknown-linux-musl aarch64-unknown-linux-musl; do
  if ! rustup target list --installed --toolchain stable | grep -qx "$t"; then
    log "rustup target add $t"
    rustup target add --toolchain stable "$t"
  fi
done

ZIG_VERSION=0.17.1
if ! python3 -m ziglang version 2>/dev/null | grep -qx "$ZIG_VERSION"; then
  log "pip install ziglang==$ZIG_VERSION (zig: the cross C compiler for the static builds)"
  python3 -m pip install --quiet "ziglang==$ZIG_VERSION" 2>/dev/null ||
    python3 -m pip install --quiet --break-system-packages "ziglang==$ZIG_VERSION"
fi

ZIGBUILD_VERSION=0.24.1
if ! cargo-zigbuild --version 2>/dev/null | grep -q "$ZIGBUILD_VERSION"; then
  log "cargo install cargo-zigbuild@$ZIGBUILD_VERSION --locked (about a minute)"
  cargo install "cargo-zigbuild@$ZIGBUILD_VERSION" --locked --quiet
fi

CARGO_DEB_VERSION=3.8.0
if ! cargo deb --version 2>/dev/null | grep -q "$CARGO_DEB_VERSION"; then
  log "cargo install cargo-deb@$CARGO_DEB_VERSION --locked (about two minutes)"
  cargo install "cargo-deb@$CARGO_DEB_VERSION" --locked --quiet
fi
