#!/usr/bin/env bash
# The whole procedure end to end, on the embedded defaults, without root:
#   build (release) -> cn-backend init + a parent (companion) subscription -> start cn-backend and
#   gatewayd on loopback -> loadgen pairs and provisions DEVICES simulated devices through gatewayd
#   and attaches each to cn-backend with its new credential -> one more device with a factory
#   identity from a test maker (manufacturer attestation), with the iotdev CLI -> summary + metrics
#   -> clean up.
# Exits non-zero if any device failed. Everything lives in a temporary directory that is removed
# at the end, also on failure or Ctrl-C (KEEP=1 keeps it for inspection).
#
# Knobs (environment): DEVICES (2000), CONCURRENCY (256), PROFILE (release | debug),
# SYNC=open5gs: cn-backend also keeps an Open5GS subscriber store in step ([sync.open5gs], on a
# local MongoDB wire-protocol server, nx-27017, installed by scripts/setup.sh --mongo): documents
# appear as devices are provisioned and disappear on revoke and suspend. Synced credentials
# authenticate at the 5G core, so cn-backend's own attach refuses them and the demo skips attach.
set -euo pipefail
cd "$(dirname "$0")/.."

DEVICES=${DEVICES:-2000}
CONCURRENCY=${CONCURRENCY:-256}
PROFILE=${PROFILE:-release}
SYNC=${SYNC:-}
case "$SYNC" in "" | open5gs) ;; *) echo "demo: SYNC must be empty or open5gs" >&2; exit 2 ;; esac
DEMO=demo
. scripts/lib/demo.sh
need_cargo
# What the build needs and a fresh machine lacks (the nightly's rust-src, bpf-linker for the eBPF
# filter); nothing that only the tests need. A no-op taking a second once installed.
bash scripts/setup.sh --build
if [ "$SYNC" = open5gs ]; then bash scripts/setup.sh --mongo; fi

build_bins cn-backend gatewayd iotdev loadgen

T=$(mktemp -d "${TMPDIR:-/tmp}/companion-demo.XXXXXX")
CN_PID=""
GW_PID=""
MONGO_PID=""
# shellcheck disable=SC2086 # empty ones drop out
stop_demo() { stop_pids $GW_PID $CN_PID $MONGO_PID; }
trap_cleanup "cn-backend.log, gatewayd.log; report.json"

say "operator: cn-backend init + parent subscription $COMPANION_SUPI (quota $((DEVICES + 100)) children)"
"$BIN/cn-backend" --dir "$T/cn" init --mcc 001 --mnc 01 >/dev/null
"$BIN/cn-backend" --dir "$T/cn" subscriber add --supi "$COMPANION_SUPI" \
  --k "$COMPANION_K" --opc "$COMPANION_OPC" --max-children $((DEVICES + 100)) --max-lifetime 30d >/dev/null

ATTACH=(--attach)
if [ "$SYNC" = open5gs ]; then
  MONGO_PY="$(pwd)/target/mongo-venv/bin/python"
  MONGO_PORT=$("$MONGO_PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  say "Open5GS subscriber store: nx-27017 (MongoDB wire protocol) on 127.0.0.1:$MONGO_PORT"
  target/mongo-venv/bin/nx-27017 --db "$T/open5gs.db" --host 127.0.0.1 -p "$MONGO_PORT" \
    --pid-file "$T/mongo.pid" >"$T/mongo.log" 2>&1 &
  MONGO_PID=$!
  for _ in $(seq 1 300); do
    (exec 3<>"/dev/tcp/127.0.0.1/$MONGO_PORT") 2>/dev/null && break
    kill -0 "$MONGO_PID" 2>/dev/null || { tail -n 20 "$T/mongo.log" >&2; die "nx-27017 exited (log above)"; }
    sleep 0.1
  done
  printf '
[sync.open5gs]
uri = "mongodb://127.0.0.1:%s"
' "$MONGO_PORT" >>"$T/cn/cn-backend.toml"
  ATTACH=()
fi
# The Open5GS subscriber store, as the core's UDM reads it: `count`, `show IMSI`.
subscribers() {
  "$MONGO_PY" - "$MONGO_PORT" "$@" <<'PY'
import sys
from bson import json_util
from pymongo import MongoClient
port, what = sys.argv[1], sys.argv[2]
c = MongoClient(f"mongodb://127.0.0.1:{port}", serverSelectionTimeoutMS=5000).open5gs.subscribers
if what == "count":
    print(c.count_documents({}))
else:
    d = c.find_one({"imsi": sys.argv[3]}, {"_id": 0})
    print(json_util.dumps(d, indent=2, json_options=json_util.CANONICAL_JSON_OPTIONS) if d else "(no document)")
PY
}
# Waits until the store holds $1 documents (the pusher runs every 200 ms).
wait_subscribers() {
  local n=""
  for _ in $(seq 1 300); do
    n=$(subscribers count) && [ "$n" = "$1" ] && return 0
    sleep 0.1
  done
  die "the Open5GS store holds $n documents, expected $1 (cn-backend.log: $(tail -n 3 "$T/cn-backend.log"))"
}

say "starting cn-backend (QUIC and HTTP on loopback, any free port)"
"$BIN/cn-backend" --dir "$T/cn" serve --listen 127.0.0.1:0 --http-listen 127.0.0.1:0 \
  --ready-file "$T/cn-ready.json" 2>"$T/cn-backend.log" &
CN_PID=$!
wait_ready "$T/cn-ready.json" "$CN_PID" cn-backend "$T/cn-backend.log"
CN_QUIC=$(json_field "$T/cn-ready.json" quic)
CN_HTTP=$(json_field "$T/cn-ready.json" http)

say "router: companion credential (0600) and gatewayd configuration"
write_gatewayd_config "[\"$CN_QUIC\"]" 2 warn 100ms 2s 256
say "starting gatewayd"
start_gatewayd

say "loadgen: $DEVICES devices (own keys each), paired in bulk, provisioned through gatewayd${ATTACH[*]:+, attached at the CN}"
set +e
"$BIN/loadgen" provision --devices "$DEVICES" --concurrency "$CONCURRENCY" \
  --gateway "$GW_DEVICES" --control-socket "$GW_CONTROL" "${ATTACH[@]}" --json "$T/report.json"
LOADGEN_RC=$?
set -e

if [ "$SYNC" = open5gs ] && [ "$LOADGEN_RC" = 0 ]; then
  wait_subscribers "$DEVICES"
  say "Open5GS store: $DEVICES subscriber documents appeared, one per device credential"
  FIRST=$("$BIN/cn-backend" --dir "$T/cn" child list --parent "$COMPANION_SUPI" | head -n 1 | cut -d' ' -f1)
  "$BIN/cn-backend" --dir "$T/cn" child show "$FIRST"
  echo "  its document, as the core's UDM reads it:"
  subscribers show "${FIRST#imsi-}" | sed 's/^/    /'
  say "operator: cn-backend child revoke $FIRST -> its document disappears"
  "$BIN/cn-backend" --dir "$T/cn" child revoke "$FIRST"
  wait_subscribers $((DEVICES - 1))
  "$BIN/cn-backend" --dir "$T/cn" child show "$FIRST"
  echo "  $(subscribers show "${FIRST#imsi-}")"
fi

say "iotdev: one device with a factory identity (a test maker's CA, trusted by the operator), provisioned and attached with the CLI"
# Manufacturer attestation (docs/PROTOCOL.md §4.5): the device presents its maker's certificate
# chain; gatewayd forwards it; cn-backend checks it against the roots the operator installed
# (counted in cn_backend_attestation_total; a subscription with --require-attestation would
# refuse devices without one). The device also refuses any bundle not signed under the operator CA.
ATTEST_RC=0
{
  "$BIN/iotdev" factory ca --out "$T/maker" --name "Demo device maker" &&
  "$BIN/iotdev" factory device --ca "$T/maker" --id demo-meter-1 --out "$T/maker" &&
  "$BIN/cn-backend" --dir "$T/cn" attestation add-root --name demo-maker "$T/maker/manufacturer-ca.pem" &&
  "$BIN/iotdev" --dir "$T/demo-meter-1" init --no-qr --operator-anchor "$T/cn/ca.pem" \
    --factory-cert "$T/maker/demo-meter-1.pem" --factory-key "$T/maker/demo-meter-1.key" &&
  CODE=$("$BIN/iotdev" --dir "$T/demo-meter-1" pairing-code --no-qr | grep '^CPN:') &&
  "$BIN/gatewayctl" --socket "$GW_CONTROL" pair "$CODE" --label "attested meter" &&
  "$BIN/iotdev" --dir "$T/demo-meter-1" provision --gateway "$GW_DEVICES" &&
  { [ "$SYNC" = open5gs ] || "$BIN/iotdev" --dir "$T/demo-meter-1" attach; }
} >"$T/iotdev.log" 2>&1 || ATTEST_RC=$?
if [ "$ATTEST_RC" = 0 ]; then
  echo "  demo-meter-1: provisioned${ATTACH[*]:+ and attached}; its maker's certificate verified at the CN"
else
  echo "  the attested device failed (exit $ATTEST_RC):"; sed 's/^/    /' "$T/iotdev.log"
fi

echo
echo "metrics (Prometheus text format, while the daemons run):"
echo "  gatewayd    http://$GW_METRICS/metrics"
echo "  cn-backend  http://$CN_HTTP/metrics"
echo
echo "gatewayd /metrics (excerpt):"
scrape "$GW_METRICS" | grep -E '^gatewayd_(requests_total\{kind="provision"|batch_size_(count|sum)|devices_paired|cn_link_state|deliveries_pending)' | sed 's/^/  /' || true
echo "cn-backend /metrics (excerpt):"
scrape "$CN_HTTP" | grep -E '^cn_backend_(credentials_issued_total|attach_outcomes_total|batch_size_(count|sum)|aka_outcomes_total|attestation_total)' | sed 's/^/  /' || true
if [ "$SYNC" = open5gs ] && [ "$LOADGEN_RC" = 0 ] && [ "$ATTEST_RC" = 0 ]; then
  # The attested device's credential was synced too: DEVICES documents again.
  wait_subscribers "$DEVICES"
  say "operator: cn-backend subscriber suspend $COMPANION_SUPI -> every child revoked, every document gone"
  "$BIN/cn-backend" --dir "$T/cn" subscriber suspend "$COMPANION_SUPI"
  wait_subscribers 0
  echo "  Open5GS store: $(subscribers count) documents"
  scrape "$CN_HTTP" | grep -E '^cn_backend_sync_(outbox_backlog|pushes_total)' | sed 's/^/  /' || true
fi
echo
if [ "$LOADGEN_RC" = 0 ] && [ "$ATTEST_RC" = 0 ]; then
  say "done: every device provisioned${ATTACH[*]:+ and attached}${SYNC:+, and synced to the Open5GS store}"
  exit 0
fi
say "failures: loadgen exit $LOADGEN_RC, attested device exit $ATTEST_RC; run with KEEP=1 to keep the logs"
exit $((LOADGEN_RC != 0 ? LOADGEN_RC : ATTEST_RC))
