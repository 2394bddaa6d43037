#!/usr/bin/env bash
# Resident memory and CPU of a static gatewayd under load (docs/OPERATIONS.md, "Sizes and
# memory"): a native cn-backend, the gatewayd from target/dist/<TARGET> (aarch64 through
# qemu-user) or GW=<path>, and loadgen provisioning DEVICES devices through it; prints gatewayd's
# VmRSS/VmHWM, the provisioning rate and gatewayd's CPU time per provisioned device (utime + stime
# from /proc, while loadgen pairs and provisions: start-up and the CN link excluded).
#   TARGET=aarch64-unknown-linux-musl DEVICES=300 scripts/measure-gateway.sh
#   GW=target/static/x86_64-unknown-linux-musl/release/gatewayd scripts/measure-gateway.sh
set -euo pipefail
cd "$(dirname "$0")/.."
TARGET=${TARGET:-x86_64-unknown-linux-musl}
DEVICES=${DEVICES:-500}
CONCURRENCY=${CONCURRENCY:-64}
BIN=${BIN:-target/debug}   # cn-backend and loadgen (native)
GW=${GW:-target/dist/$TARGET/gatewayd}
[ -x "$GW" ] || { echo "no $GW: run scripts/build-static.sh" >&2; exit 1; }
[ -x "$BIN/cn-backend" ] && [ -x "$BIN/loadgen" ] ||
  { echo "no $BIN/cn-backend or $BIN/loadgen: cargo build -p cn-backend -p loadgen (BIN=target/release after --release)" >&2; exit 1; }
EMU=()
case "$TARGET" in aarch64-*) [ "$(uname -m)" = aarch64 ] || EMU=(qemu-aarch64-static) ;; esac

D=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$D"; }
trap cleanup EXIT
wait_file() { for _ in $(seq 600); do [ -s "$1" ] && return 0; sleep 0.1; done; echo "timeout: $1" >&2; exit 1; }
json() { python3 -c "import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])" "$1" "$2"; }

"$BIN/cn-backend" --dir "$D/cn" init >/dev/null
"$BIN/cn-backend" --dir "$D/cn" subscriber add --supi imsi-001010000000001 \
  --k 465b5ce8b199b49faa5f0a2ee238a6bc --opc cd63cb71954a9f4e48a5994e37a02baf \
  --max-children $((DEVICES + 10)) >/dev/null
"$BIN/cn-backend" --dir "$D/cn" serve --listen 127.0.0.1:0 --http-listen 127.0.0.1:0 \
  --ready-file "$D/cn.json" 2>"$D/cn.log" & pids+=($!)
wait_file "$D/cn.json"
printf 'supi = "imsi-001010000000001"\nk = "465b5ce8b199b49faa5f0a2ee238a6bc"\nopc = "cd63cb71954a9f4e48a5994e37a02baf"\n' >"$D/companion.toml"
chmod 600 "$D/companion.toml"
cat >"$D/gatewayd.toml" <<TOML
state_dir = "$D/gw"
[devices]
listen = "127.0.0.1:0"
# Every loadgen device comes from 127.0.0.1: no per-address admission limit (its default, 200
# new connections/s per address, would bound the rate measured here), room for all at once.
new_connections_per_ip = 0
max_connections = 8192
[cn]
endpoint = "$(json "$D/cn.json" quic)"
server_name = "localhost"
ca_file = "$D/cn/ca.pem"
[companion]
credential_file = "$D/companion.toml"
[control]
socket = "$D/control.sock"
[metrics]
listen = "127.0.0.1:0"
[filter]
mode = "userspace"
TOML
"${EMU[@]}" "$GW" --config "$D/gatewayd.toml" --ready-file "$D/gw.json" 2>"$D/gw.log" & gwpid=$!
pids+=($gwpid)
wait_file "$D/gw.json"
rss() { awk '/^VmRSS|^VmHWM/ {printf "%s %s kB  ", $1, $2}' "/proc/$gwpid/status"; echo; }
# utime + stime of gatewayd, in clock ticks (fields 14 and 15 of /proc/<pid>/stat; the command
# name in field 2 has no spaces here).
ticks() { awk '{ print $14 + $15 }' "/proc/$gwpid/stat"; }
echo "idle:            $(rss)"
t0=$(ticks)
"$BIN/loadgen" provision --devices "$DEVICES" --concurrency "$CONCURRENCY" \
  --gateway "$(json "$D/gw.json" devices)" --control-socket "$D/control.sock" \
  --retry-for 120 --progress never --json "$D/report.json" >/dev/null
t1=$(ticks)
echo "after $DEVICES devices: $(rss)"
python3 - "$D/report.json" "$((t1 - t0))" "$(getconf CLK_TCK)" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
ticks, hz = int(sys.argv[2]), int(sys.argv[3])
print("succeeded", r["succeeded"], "of", r["devices"], "; p50", r["latency_ms"]["p50_ms"],
      "ms p99", r["latency_ms"]["p99_ms"], "ms")
print("rate %.0f devices/s; gatewayd CPU %.2f s, %.0f us per provisioned device"
      % (r["throughput_per_s"], ticks / hz, 1e6 * ticks / hz / max(r["succeeded"], 1)))
PY
echo "stripped size: $(stat -c %s "$GW") bytes ($TARGET)"
