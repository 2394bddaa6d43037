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

log "toolchains ready"
