#!/usr/bin/env bash
# Debian packages of cn-backend and gatewayd (with gatewayctl), built by cargo-deb from the
# `[package.metadata.deb]` tables of cn-backend/Cargo.toml and gatewayd/Cargo.toml:
#
#   scripts/build-deb.sh                        # release build -> target/debian/{cn-backend,gatewayd}_<v>_<arch>.deb
#   DEB_PROFILE=debug scripts/build-deb.sh      # package the debug build instead (CI, see below)
#   DEB_VERSION=0.1.0-0~prev1 DEB_OUT=target/debian-prev scripts/build-deb.sh   # (cargo-deb then
#                                               # deletes older .debs of the package from target/debian/)
#   LINTIAN=1 scripts/build-deb.sh              # then run lintian on both (fails on any tag not overridden)
#   DEB_FAST=1 ...                              # faster, lighter compression
#
# (target/ is $CARGO_TARGET_DIR when set.) The packages carry the binaries, the units of systemd/
# with their sysusers.d and tmpfiles.d entries (cargo-deb generates the maintainer-script fragments:
# systemd-sysusers, systemd-tmpfiles, deb-systemd-helper), gatewayd's default configuration
# /etc/gatewayd/gatewayd.toml as a conffile,
# README/OPERATIONS.md and man pages generated from --help by help2man.
#
# DEB_PROFILE=debug packages target/debug (the build scripts/test.sh has already made), so the
# test suite needs no release build (minutes on 2 cores): the binaries are the same code, built
# with opt-level 2 for dependencies, dynamically linked against the build machine's glibc, so such
# packages install on that Debian release (bookworm in CI) and later ones only. Distribute the
# release packages. The binaries are stripped in both cases. (cargo-deb 3.8 warns that it may
# refuse the dev profile in a future version: setup.sh pins 3.8.0.)
#
# Needs cargo-deb and help2man (scripts/setup.sh installs both); `dpkg-shlibdeps` (dpkg-dev)
# computes the dependencies on the C library.
set -euo pipefail
cd "$(dirname "$0")/.."

PROFILE=${DEB_PROFILE:-release}
CARGO_DEB_VERSION=3.8.0

die() { echo "build-deb: $*" >&2; exit 1; }
cargo deb --version 2>/dev/null | grep -q "$CARGO_DEB_VERSION" ||
  die "cargo-deb $CARGO_DEB_VERSION not found: run scripts/setup.sh (cargo install cargo-deb@$CARGO_DEB_VERSION --locked)"
command -v help2man >/dev/null || die "help2man not found: run scripts/setup.sh (Debian package help2man)"

TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}
OUT=${DEB_OUT:-$TARGET_DIR/debian}
case "$PROFILE" in
  release) cargo_profile=release; bin="$TARGET_DIR/release" ;;
  debug) cargo_profile=dev; bin="$TARGET_DIR/debug" ;;
  *) die "DEB_PROFILE must be release or debug, not '$PROFILE'" ;;
esac

# A no-op when scripts/test.sh (or a previous run) has built them. The debug build is the
# workspace's (`--workspace`, as scripts/test.sh builds it): selecting packages would unify
# features differently and rebuild dependencies.
if [ "$PROFILE" = debug ]; then
  cargo build --locked --workspace --bins
else
  cargo build --locked --release -p cn-backend -p gatewayd --bins
fi

# Man pages from --help (section 8: daemons and administration tools).
mkdir -p "$bin/man"
man_page() { # binary description
  help2man --no-info --section=8 --name="$2" --version-string="$("$bin/$1" --version | awk '{print $2}')" \
    "$bin/$1" | gzip -9n >"$bin/man/$1.8.gz"
}
man_page gatewayd "companion-UE credential provisioning daemon for home routers"
man_page gatewayctl "pair, list and revoke the devices of gatewayd"
man_page cn-backend "operator credential service for companion-UE provisioning"

mkdir -p "$OUT"
# --strip: the release profile keeps line tables (debug = "line-tables-only"), and cargo-deb would
# then ship them; lintian refuses unstripped binaries.
args=(--no-build --locked --strip --profile "$cargo_profile" --output "$OUT")
if [ -n "${DEB_VERSION:-}" ]; then
  args+=(--deb-version "$DEB_VERSION")
fi
if [ "${DEB_FAST:-0}" = 1 ]; then
  args+=(--fast) # lighter compression (the CI's throwaway packages)
fi
debs=()
for p in cn-backend gatewayd; do
  deb=$(cargo deb -p "$p" "${args[@]}" | tail -n 1)
  [ -f "$deb" ] || die "cargo deb -p $p did not report a .deb ($deb)"
  debs+=("$deb")
  # cargo-deb's stripped copies of the binaries (target/<package>/*.stripped-*.tmp).
  rm -f "$TARGET_DIR/$p/"*.stripped-*.tmp && rmdir "$TARGET_DIR/$p" 2>/dev/null || true
  echo "build-deb: $deb ($(stat -c %s "$deb") bytes)" >&2
done

if [ "${LINTIAN:-0}" = 1 ]; then
  command -v lintian >/dev/null || die "lintian not found: run scripts/setup.sh"
  # --fail-on warning: errors and warnings fail; overrides live in <crate>/debian/lintian-overrides.
  lintian --fail-on error,warning --info "${debs[@]}"
fi
printf '%s\n' "${debs[@]}"
