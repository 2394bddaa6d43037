#!/usr/bin/env bash
# Reproduces every table and plot of docs/BENCHMARKS.md on this machine:
#   1. builds the release binaries (cn-backend, gatewayd, gatewayctl, loadgen, e2e-bench);
#   2. runs the criterion micro-benchmarks (MICRO=0 skips them, keeping the previous results);
#   3. runs the end-to-end suites against the real binaries (e2e-bench): provisioning (smart
#      batching vs batch size 1 vs the handshake ceiling), issuance (cn-backend vs the store's
#      and HPKE's ceilings), filter (XDP vs userspace; needs root), resources (memory, start-up);
#   4. writes target/bench/results.{json,md}, the plots into docs/bench/, and replaces the
#      generated section of docs/BENCHMARKS.md.
# Extra arguments go to e2e-bench, e.g. `scripts/bench.sh --suites provisioning` or `--quick`.
# Run it on an otherwise idle machine: every figure is a rate or a latency on shared cores.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '\033[1;34mbench:\033[0m %s\n' "$*" >&2; }

command -v cargo >/dev/null || [ ! -f "$HOME/.cargo/env" ] || . "$HOME/.cargo/env"
# What the release build needs (the nightly's rust-src, bpf-linker); a no-op once installed.
bash scripts/setup.sh --build

args=("$@")
if [ "$(id -u)" != 0 ] && ! printf '%s\n' "${args[@]}" | grep -q -- '--suites'; then
  say "not root: the filter suite (network namespaces, XDP) is skipped"
  args+=(--suites provisioning,issuance,resources)
fi

say "building the release binaries"
cargo build --release --locked -p cn-backend -p gatewayd -p loadgen -p companion-benches --bins

if [ "${MICRO:-1}" = 1 ]; then
  say "criterion micro-benchmarks"
  cargo bench --locked -p companion-benches -- --warm-up-time 1 --measurement-time 3
fi

say "end-to-end suites"
mkdir -p docs/bench
target/release/e2e-bench --bin-dir target/release --out target/bench --plots docs/bench \
  --criterion target/criterion --update-doc docs/BENCHMARKS.md "${args[@]}"
say "done: docs/BENCHMARKS.md, docs/bench/*.svg, target/bench/results.{json,md}"
