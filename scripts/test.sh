#!/usr/bin/env bash
# The whole test suite: formatting, lints, unit/property/integration tests, and the fuzz targets
# (built, then each run briefly on its corpus). FUZZ_SECONDS=0 skips the fuzz runs.
set -euo pipefail
cd "$(dirname "$0")/.."

step() {
  printf '\n\033[1;32m==> %s\033[0m\n' "$*" >&2
  # CI_DISK_REPORT=1 (set by .ci/run): free disk and target/ size at each step, since the suite's
  # builds are large and a full disk fails in the middle of a compiler run.
  if [ "${CI_DISK_REPORT:-0}" = 1 ]; then
    printf '    disk: %s free; target/ %s\n' "$(df -h --output=avail . | tail -n 1 | tr -d ' ')" \
      "$(du -sh target 2>/dev/null | cut -f1)" >&2
  fi
}

step "setup"
bash scripts/setup.sh

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "cargo doc --no-deps, warnings denied (every crate warns on missing docs)"
RUSTDOCFLAGS="${RUSTDOCFLAGS:-} -D warnings" cargo doc --workspace --no-deps --locked

step "cargo build --bins (the end-to-end tests start the real binaries)"
cargo build --workspace --bins --locked

step "static router binaries (scripts/build-static.sh: x86_64, aarch64, armv7 musl; target/static cached)"
bash scripts/build-static.sh

step "Debian packages (scripts/build-deb.sh): the debug build above, as the new and a previous version"
# The systemd container suite (deploy/tests/debian.rs) upgrades from the previous to the new
# version. Packaging only: the binaries are the debug build above (same Debian release as the
# container root), so no release build is needed.
deb_version=$(awk -F'"' '/^version = /{print $2; exit}' Cargo.toml)
# The previous version first: cargo-deb clears older .debs of a package from target/debian/.
DEB_FAST=1 DEB_PROFILE=debug DEB_VERSION="${deb_version}-0~prev1" DEB_OUT="${CARGO_TARGET_DIR:-target}/debian-prev" \
  bash scripts/build-deb.sh >/dev/null
DEB_FAST=1 DEB_PROFILE=debug bash scripts/build-deb.sh >/dev/null

step "the README's first command: DEVICES=200 scripts/demo.sh"
# The main job, for real, on a small device count: both README commands are proven at every run.
# PROFILE=debug reuses the build above (the release build is the same code and the same build.rs,
# and would add minutes); the demo's own setup step runs as it does on a fresh machine.
DEVICES=${DEMO_DEVICES:-200} CONCURRENCY=64 PROFILE=debug bash scripts/demo.sh

step "cargo test"
# deploy/tests: a missing tool (promtool, prometheus, systemd-analyze, qemu) or static binary
# fails instead of skipping, since setup.sh installed them; DEPLOY_TESTS_STRICT=0 to skip.
DEPLOY_TESTS_STRICT=${DEPLOY_TESTS_STRICT:-1} cargo test --workspace --locked

FUZZ_SECONDS=${FUZZ_SECONDS:-10}
if [ -f fuzz/Cargo.toml ] && [ "$FUZZ_SECONDS" != 0 ]; then
  step "fuzz targets: build, then ${FUZZ_SECONDS}s each"
  ( cd fuzz
    cargo +nightly fuzz build --release
    log=$(mktemp)
    for t in $(cargo +nightly fuzz list); do
      if ! cargo +nightly fuzz run --release "$t" -- -max_total_time="$FUZZ_SECONDS" >"$log" 2>&1; then
        tail -n 60 "$log" >&2; echo "fuzz target $t found a crash (see above)" >&2; exit 1
      fi
      echo "fuzz $t: $(grep -Eo 'Done [0-9]+ runs in [0-9]+ second\(s\)' "$log" | tail -n 1)"
    done
    rm -f "$log" )
fi

step "all tests passed"
