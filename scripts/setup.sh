#!/usr/bin/env bash
# Installs what building and testing this project needs on a fresh machine. Idempotent: every step
# checks before it installs, so running it again costs seconds.
set -euo pipefail

log() { printf '\033[1;34msetup:\033[0m %s\n' "$*" >&2; }

need_rustup_component() { # toolchain component
  if ! rustup component list --toolchain "$1" --installed 2>/dev/null | grep -q "^$2"; then
    log "rustup component add $2 --toolchain $1"
    rustup component add "$2" --toolchain "$1"
  fi
}

command -v rustup >/dev/null || { echo "setup: rustup is required (https://rustup.rs)" >&2; exit 1; }

# Stable builds the workspace.
need_rustup_component stable clippy
need_rustup_component stable rustfmt

# Nightly builds the fuzz targets (cargo-fuzz needs -Zsanitizer) and, later, the eBPF program.
if ! rustup toolchain list | grep -q '^nightly'; then
  log "rustup toolchain install nightly --profile minimal"
  rustup toolchain install nightly --profile minimal
fi
need_rustup_component nightly rust-src

if ! command -v cargo-fuzz >/dev/null; then
  log "cargo install cargo-fuzz --locked"
  cargo install cargo-fuzz --locked --quiet
fi

# bpf-linker links the eBPF program (ebpf/); 0.10.4 with its rust-llvm-22 feature uses the nightly's
# LLVM 22, so no system LLVM is needed. Newer releases need LLVM 23.
if ! command -v bpf-linker >/dev/null || ! bpf-linker --version 2>/dev/null | grep -q '0\.10\.4'; then
  log "cargo install bpf-linker@0.10.4 --locked (about two minutes)"
  cargo install bpf-linker@0.10.4 --locked --quiet
fi

# Deployment tests and static router builds (issue 7): systemd, prometheus, qemu-user-static,
# musl targets, zig, cargo-zigbuild.
bash "$(dirname "$0")/setup-deploy.sh"

# The eBPF program is built from source by gatewayd/build.rs (aya-build: nightly + rust-src +
# bpf-linker, above). The namespace tests of the LAN filter (gatewayd/tests/netns.rs, run as root)
# need iproute2's `ip`.
if ! command -v ip >/dev/null; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    log "apt-get install iproute2"
    apt-get update -qq && apt-get install -y -qq iproute2 >/dev/null
  else
    log "iproute2 (ip) is missing: the namespace tests will fail; install it"
  fi
fi

log "toolchains ready"
