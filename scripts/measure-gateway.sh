#!/usr/bin/env bash
# Resident memory of a static gatewayd under load (docs/OPERATIONS.md, "Sizes and memory"):
# a native cn-backend, the gatewayd from target/dist/<TARGET> (aarch64 through qemu-user), and
# loadgen provisioning DEVICES devices through it; prints gatewayd's VmRSS/VmHWM.
#   TARGET=aarch64-unknown-linux-musl DEVICES=300 scripts/measure-gateway.sh
set -euo pipefail
cd "$(dirname "$0")/.."
TARGET=${TARGET:-x86_64-unknown-linux-musl}
DEVICES=${DEVICES:-500}
CONCURRENCY=${CONCURRENCY:-64}
BIN=${BIN:-target/debug}   # cn-backend and loadgen (native)
GW=target/dist/$TARGET/gatewayd
[ -x "$GW" ] || { echo "no $GW: run scripts/build-static.sh" >&2; exit 1; }
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
echo "idle:            $(rss)"
"$BIN/loadgen" provision --devices "$DEVICES" --concurrency "$CONCURRENCY" \
  --gateway "$(json "$D/gw.json" devices)" --control-socket "$D/control.sock" \
  --retry-for 120 --progress never --json "$D/report.json" >/dev/null
echo "after $DEVICES devices: $(rss)"
python3 -c "import json; r=json.load(open('$D/report.json')); print('succeeded', r['succeeded'], 'of', r['devices'], '; p50', r['latency_ms']['p50_ms'], 'ms p99', r['latency_ms']['p99_ms'], 'ms')"
echo "stripped size: $(stat -c %s "$GW") bytes ($TARGET)"
