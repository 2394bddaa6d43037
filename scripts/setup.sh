#!/usr/bin/env bash
# Installs what this project needs on a fresh machine (rustup with stable and nightly). Idempotent:
# every step checks before it installs, so a second run costs seconds.
#
#   scripts/setup.sh --build   what building the binaries needs, nothing more (scripts/demo.sh):
#                              the nightly's rust-src and bpf-linker, for the eBPF LAN filter.
#   scripts/setup.sh           everything the tests need on top (scripts/test.sh): clippy, rustfmt,
#                              cargo-fuzz, the Debian tools of the deployment and namespace tests,
#                              the musl targets, zig and cargo-zigbuild, and the MongoDB
#                              wire-protocol server of the Open5GS sync tests (target/mongo-venv).
#   scripts/setup.sh --mongo   only that server (SYNC=open5gs scripts/demo.sh).
#   scripts/setup.sh --postgres  only Debian's PostgreSQL server binaries, its own cluster kept
#                              stopped (scripts/demo-fleet.sh; as root).
set -euo pipefail

MODE=all
case "${1:-}" in
  --build) MODE=build ;;
  "" | --all) MODE=all ;;
  --mongo) MODE=mongo ;;
  --postgres) MODE=postgres ;;
  -h | --help) sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
  *) echo "setup: unknown option '$1' (use --build, or nothing for everything)" >&2; exit 2 ;;
esac

log() { printf '\033[1;34msetup:\033[0m %s\n' "$*" >&2; }

has_rustup_component() { # toolchain component
  rustup component list --toolchain "$1" --installed 2>/dev/null | grep -q "^$2"
}
need_rustup_component() { # toolchain component
  if ! has_rustup_component "$1" "$2"; then
    log "rustup component add $2 --toolchain $1"
    rustup component add "$2" --toolchain "$1"
  fi
}
has_nightly() { rustup toolchain list 2>/dev/null | grep -q '^nightly'; }
has_bpf_linker() { command -v bpf-linker >/dev/null && bpf-linker --version 2>/dev/null | grep -q '0\.10\.4'; }

# The MongoDB wire-protocol server of the Open5GS sync tests (cn-backend/tests/open5gs.rs) and
# of `SYNC=open5gs scripts/demo.sh`: PyPI's nx-27017 (MongoDB's wire protocol on SQLite; Debian
# 12 has no MongoDB server), pinned to the tested versions, in a venv under target/ so nothing
# is installed system-wide. Idempotent: a venv with the pinned version is left alone.
MONGO_VENV="$(cd "$(dirname "$0")/.." && pwd)/target/mongo-venv"
NX_PINS=(nx-27017==0.8.1 neosqlite==1.17.2 pymongo==4.20.1)
need_mongo_wire_server() {
  if [ -x "$MONGO_VENV/bin/nx-27017" ] &&
    compgen -G "$MONGO_VENV/lib/python3*/site-packages/nx_27017-0.8.1.dist-info" >/dev/null; then
    return 0
  fi
  if ! python3 -c 'import venv, ensurepip' 2>/dev/null; then
    if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
      log "apt-get install python3-venv (for the MongoDB wire-protocol test server)"
      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
    else
      log "WARNING: python3 with venv is missing: the Open5GS sync tests are skipped (or fail under CI)"
      return 0
    fi
  fi
  log "installing ${NX_PINS[*]} into $MONGO_VENV (MongoDB wire-protocol server for the Open5GS sync tests)"
  mkdir -p "$(dirname "$MONGO_VENV")"
  python3 -m venv "$MONGO_VENV"
  "$MONGO_VENV/bin/pip" install --quiet --disable-pip-version-check "${NX_PINS[@]}"
}

# The PostgreSQL store's tests (cn-backend/tests/postgres.rs) start their own throwaway server
# with initdb + pg_ctl from Debian's postgresql package; a missing server fails them under CI.
# The package's own cluster is not wanted: stop it and keep it from starting at boot (no
# systemd here usually; policy-rc.d keeps apt from starting it at all during the install).
need_postgres_server() {
  if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
    if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
      log "apt-get install postgresql (the PostgreSQL store's tests run their own server)"
      apt-get update -qq
      rc_d_added=0
      if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d
        rc_d_added=1
      fi
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql >/dev/null
      if [ "$rc_d_added" = 1 ]; then rm -f /usr/sbin/policy-rc.d; fi
    else
      log "WARNING: PostgreSQL server binaries missing: run setup as root (the PostgreSQL store's tests are skipped, or fail under CI/DEPLOY_TESTS_STRICT=1)"
    fi
  fi
  # Whether installed now or before: no system cluster running beside the tests' servers.
  if command -v pg_lsclusters >/dev/null && [ "$(id -u)" = 0 ]; then
    pg_lsclusters --no-header 2>/dev/null | while read -r ver name _port status _rest; do
      if [ "$status" = online ]; then
        log "stopping the system PostgreSQL cluster $ver/$name (not used)"
        pg_ctlcluster "$ver" "$name" stop || true
      fi
      conf="/etc/postgresql/$ver/$name/start.conf"
      if [ -f "$conf" ] && ! grep -qx manual "$conf"; then
        echo manual >"$conf"
      fi
    done
    if command -v systemctl >/dev/null && systemctl is-enabled postgresql >/dev/null 2>&1; then
      systemctl disable --now postgresql >/dev/null 2>&1 || true
    fi
  fi
}

if [ "$MODE" = postgres ]; then
  need_postgres_server
  exit 0
fi
if [ "$MODE" = mongo ]; then
  need_mongo_wire_server
  exit 0
fi

command -v rustup >/dev/null || { echo "setup: rustup is required (https://rustup.rs)" >&2; exit 1; }

# --- What building the binaries needs --------------------------------------------------------
# The eBPF program (ebpf/filter-ebpf) is built from source by gatewayd/build.rs with aya-build:
# the nightly toolchain with rust-src, and bpf-linker 0.10.4, whose rust-llvm-22 feature uses the
# nightly's LLVM 22 (no system LLVM needed; newer releases need LLVM 23).
missing=()
has_nightly || missing+=("the nightly toolchain")
{ has_nightly && has_rustup_component nightly rust-src; } || missing+=("the nightly's rust-src")
has_bpf_linker || missing+=("bpf-linker 0.10.4 (about 2 minutes to compile)")
if ((${#missing[@]})); then
  list=$(printf '%s, ' "${missing[@]}")
  log "installing what the build needs: ${list%, } (once; about 3 minutes in all)"
fi
if ! has_nightly; then
  log "rustup toolchain install nightly --profile minimal"
  rustup toolchain install nightly --profile minimal
fi
need_rustup_component nightly rust-src
if ! has_bpf_linker; then
  log "cargo install bpf-linker@0.10.4 --locked"
  cargo install bpf-linker@0.10.4 --locked --quiet
fi

if [ "$MODE" = build ]; then
  exit 0
fi

# --- What only the tests need ----------------------------------------------------------------
need_rustup_component stable clippy
need_rustup_component stable rustfmt

# cargo-fuzz builds and runs the fuzz targets (nightly, -Zsanitizer).
if ! command -v cargo-fuzz >/dev/null; then
  log "cargo install cargo-fuzz --locked (about a minute)"
  cargo install cargo-fuzz --locked --quiet
fi

# Deployment tests and static router builds: systemd, prometheus, qemu-user-static, musl targets,
# zig, cargo-zigbuild.
bash "$(dirname "$0")/setup-deploy.sh"

# The namespace tests of the LAN filter (gatewayd/tests/netns.rs, run as root) need iproute2's `ip`.
if ! command -v ip >/dev/null; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    log "apt-get install iproute2"
    apt-get update -qq && apt-get install -y -qq iproute2 >/dev/null
  else
    log "iproute2 (ip) is missing: the namespace tests will fail; install it"
  fi
fi

need_postgres_server

need_mongo_wire_server

log "toolchains ready"
