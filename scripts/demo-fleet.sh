#!/usr/bin/env bash
# The operator's fleet end to end, without touching the machine's own PostgreSQL:
#   build -> a throwaway PostgreSQL server (initdb + pg_ctl in a temporary directory, Unix socket
#   only, as an unprivileged user) -> cn-backend init on it + a parent subscription -> two
#   cn-backend instances on that one database -> gatewayd with both as [cn] endpoints -> loadgen
#   provisions DEVICES simulated devices through gatewayd -> one instance is SIGKILLed mid-run ->
#   the database is checked against what every device received: all completed, nothing lost,
#   nothing issued twice -> clean up.
# Exits non-zero if any device failed or anything was lost or issued twice. Everything lives in a
# temporary directory that is removed at the end, also on failure or Ctrl-C (KEEP=1 keeps it).
#
# Needs Debian's `postgresql` package (its server binaries; the packaged cluster is not used):
# run as root, the script installs it when missing; `scripts/setup.sh` (as root) does too.
#
# Knobs (environment): DEVICES (2000), CONCURRENCY (256), PROFILE (release | debug),
# KILL_AT (percent of the devices issued when instance a is killed; 25).
set -euo pipefail
cd "$(dirname "$0")/.."

DEVICES=${DEVICES:-2000}
CONCURRENCY=${CONCURRENCY:-256}
PROFILE=${PROFILE:-release}
KILL_AT=${KILL_AT:-25}
COMPANION_SUPI=imsi-001010000000001
# TS 35.208 test set 1: the companion UE's (the router's) own 3GPP credential in this demo.
COMPANION_K=465b5ce8b199b49faa5f0a2ee238a6bc
COMPANION_OPC=cd63cb71954a9f4e48a5994e37a02baf

say() { printf '\033[1;34mfleet:\033[0m %s\n' "$*" >&2; }
die() { printf '\033[1;31mfleet: %s\033[0m\n' "$*" >&2; exit 1; }

command -v cargo >/dev/null || [ ! -f "$HOME/.cargo/env" ] || . "$HOME/.cargo/env"
command -v cargo >/dev/null || die "cargo not found: install Rust with rustup (https://rustup.rs), then run this again"
bash scripts/setup.sh --build

pg_bin() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1; }
if [ -z "$(pg_bin)" ] || [ ! -x "$(pg_bin)/initdb" ]; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    say "apt-get install postgresql (server binaries only; its own cluster is not started)"
    apt-get update -qq
    rc_d_added=0
    if [ ! -e /usr/sbin/policy-rc.d ]; then
      printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d
      rc_d_added=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql >/dev/null
    if [ "$rc_d_added" = 1 ]; then rm -f /usr/sbin/policy-rc.d; fi
  else
    die "PostgreSQL server binaries (initdb, pg_ctl) not found under /usr/lib/postgresql/*/bin: install Debian's postgresql package (sudo apt-get install postgresql, or sudo scripts/setup.sh)"
  fi
fi
PG=$(pg_bin)

say "building cn-backend, gatewayd, loadgen ($PROFILE)"
if [ "$PROFILE" = release ]; then
  cargo build --release --locked -p cn-backend -p gatewayd -p loadgen
  BIN=target/release
else
  cargo build --locked -p cn-backend -p gatewayd -p loadgen
  BIN=target/debug
fi
BIN=$(cd "$BIN" && pwd)

# Under /tmp, not TMPDIR: the socket path must stay short and reachable by the server's user.
T=$(mktemp -d /tmp/companion-fleet.XXXXXX)
chmod 755 "$T"
# PostgreSQL refuses to run as root: as root, the server runs as nobody.
AS=()
if [ "$(id -u)" = 0 ]; then
  id nobody >/dev/null 2>&1 || die "no user nobody to run PostgreSQL as"
  AS=(runuser -u nobody --)
fi
PIDS=()
PG_STARTED=0
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  if [ "$PG_STARTED" = 1 ]; then
    "${AS[@]}" "$PG/pg_ctl" -D "$T/pg/data" -m fast -w stop >/dev/null 2>&1 || true
  fi
  if [ "${KEEP:-0}" = 1 ]; then
    say "kept $T (logs: cn-a.log, cn-b.log, gatewayd.log, loadgen.log, pg/log; report.json)"
  else
    rm -rf "$T"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

wait_ready() { # file pid name log
  for _ in $(seq 1 300); do
    [ -s "$1" ] && return 0
    kill -0 "$2" 2>/dev/null || { tail -n 20 "$4" >&2; die "$3 exited before it was ready (log above)"; }
    sleep 0.1
  done
  tail -n 20 "$4" >&2; die "$3 not ready after 30 s (log above)"
}
json_field() { sed -n "s/.*\"$2\" *: *\"\([^\"]*\)\".*/\1/p" "$1" | head -n 1; }
scrape() { # host:port
  local host=${1%:*} port=${1##*:}
  exec 3<>"/dev/tcp/$host/$port"
  printf 'GET /metrics HTTP/1.0\r\nHost: %s\r\n\r\n' "$1" >&3
  cat <&3
  exec 3<&-
}
sql() { "$PG/psql" -h "$T/pg" -U postgres -d cn -X -q -At "$@"; }

say "PostgreSQL: a throwaway server in $T/pg (Unix socket only)"
mkdir -p "$T/pg"
[ ${#AS[@]} = 0 ] || chown nobody "$T/pg"
"${AS[@]}" "$PG/initdb" -D "$T/pg/data" -U postgres --auth=trust -E UTF8 --no-locale --no-sync >/dev/null
"${AS[@]}" "$PG/pg_ctl" -D "$T/pg/data" -l "$T/pg/log" -w -t 60 \
  -o "-k $T/pg -c listen_addresses='' -c max_connections=100" start >/dev/null
PG_STARTED=1
"$PG/createdb" -h "$T/pg" -U postgres cn
URL="postgres://postgres@/cn?host=$T/pg"

say "operator: cn-backend init on PostgreSQL + parent subscription $COMPANION_SUPI (quota $((DEVICES + 100)) children)"
"$BIN/cn-backend" --dir "$T/cn" init --store "$URL" --mcc 001 --mnc 01 --server-name localhost >/dev/null
"$BIN/cn-backend" --dir "$T/cn" subscriber add --supi "$COMPANION_SUPI" \
  --k "$COMPANION_K" --opc "$COMPANION_OPC" --max-children $((DEVICES + 100)) --max-lifetime 30d >/dev/null

start_cn() { # name -> sets CN_PID
  "$BIN/cn-backend" --dir "$T/cn" serve --listen 127.0.0.1:0 --http-listen 127.0.0.1:0 \
    --ready-file "$T/cn-$1-ready.json" 2>"$T/cn-$1.log" &
  CN_PID=$!
  PIDS+=("$CN_PID")
  wait_ready "$T/cn-$1-ready.json" "$CN_PID" "cn-backend $1" "$T/cn-$1.log"
}
say "starting two cn-backend instances on the one database"
start_cn a; A_PID=$CN_PID; A_QUIC=$(json_field "$T/cn-a-ready.json" quic)
start_cn b; B_QUIC=$(json_field "$T/cn-b-ready.json" quic); B_HTTP=$(json_field "$T/cn-b-ready.json" http)
echo "  instance a: $A_QUIC    instance b: $B_QUIC" >&2

umask 077
cat >"$T/companion.toml" <<EOF
supi = "$COMPANION_SUPI"
k = "$COMPANION_K"
opc = "$COMPANION_OPC"
EOF
umask 022
cat >"$T/gatewayd.toml" <<EOF
state_dir = "$T/gw-state"
log_level = "info"
[devices]
listen = "127.0.0.1:0"
max_connections = 4096
new_connections_per_ip = 0
[cn]
endpoints = ["$A_QUIC", "$B_QUIC"]
server_name = "localhost"
ca_file = "$T/cn/ca.pem"
sessions = 4
reconnect_min = "200ms"
reconnect_max = "5s"
request_timeout = "20s"
[companion]
credential_file = "$T/companion.toml"
[control]
socket = "$T/control.sock"
[metrics]
listen = "127.0.0.1:0"
[filter]
mode = "userspace"
block_after_failures = 0
[batching]
max_batch = 64
max_in_flight = 4
queue_capacity = 16384
EOF
say "starting gatewayd with [cn] endpoints = [a, b], 4 sessions"
"$BIN/gatewayd" --config "$T/gatewayd.toml" --ready-file "$T/gw-ready.json" 2>"$T/gatewayd.log" &
GW_PID=$!
PIDS+=("$GW_PID")
wait_ready "$T/gw-ready.json" "$GW_PID" gatewayd "$T/gatewayd.log"
GW_DEVICES=$(json_field "$T/gw-ready.json" devices)
GW_METRICS=$(json_field "$T/gw-ready.json" metrics)
GW_CONTROL=$(json_field "$T/gw-ready.json" control)
for _ in $(seq 1 100); do
  [ "$("$BIN/gatewayctl" --socket "$GW_CONTROL" status | grep -c '^CN session .* up ')" = 4 ] && break
  sleep 0.1
done
"$BIN/gatewayctl" --socket "$GW_CONTROL" status | grep -E '^(core network link|CN endpoint|CN session)' | sed 's/^/  /' >&2

say "loadgen: $DEVICES devices provisioned through gatewayd; instance a is SIGKILLed once $KILL_AT% are issued"
"$BIN/loadgen" provision --devices "$DEVICES" --concurrency "$CONCURRENCY" --gateway "$GW_DEVICES" \
  --control-socket "$GW_CONTROL" --id-prefix fleet --per-device --retry-for 300 --progress never \
  --json "$T/report.json" >"$T/loadgen.log" 2>&1 &
LG_PID=$!
PIDS+=("$LG_PID")
threshold=$((DEVICES * KILL_AT / 100))
killed=0
while kill -0 "$LG_PID" 2>/dev/null; do
  n=$(sql -c "SELECT count(*) FROM children")
  if [ "$n" -ge "$threshold" ]; then
    kill -KILL "$A_PID"
    wait "$A_PID" 2>/dev/null || true
    killed=1
    say "SIGKILLed instance a ($A_QUIC) with $n of $DEVICES devices issued"
    break
  fi
  sleep 0.05
done
[ "$killed" = 1 ] || say "the run ended before $KILL_AT% were issued: instance a was not killed (raise DEVICES)"
set +e
wait "$LG_PID"
LOADGEN_RC=$?
set -e
sed 's/^/  /' "$T/loadgen.log"

# What every device received (loadgen's per-device report) against what the database issued.
[ -s "$T/report.json" ] || die "loadgen wrote no report (exit $LOADGEN_RC)"
read -r devices completed children ledger twice lost mismatched < <(
  sql -F ' ' -v parent="$COMPANION_SUPI" <<SQL
\\set report \`cat $T/report.json\`
WITH r AS (
  SELECT e->>'device' AS device, e->>'supi' AS supi, (e->>'provisioned')::bool AS ok
  FROM json_array_elements((:'report')::json->'results') e),
c AS (
  SELECT device_id, count(*) AS n, min(supi) AS supi FROM children
  WHERE parent_supi = :'parent' GROUP BY device_id)
SELECT
  (SELECT count(*) FROM r),
  (SELECT count(*) FROM r WHERE ok),
  (SELECT count(*) FROM children WHERE parent_supi = :'parent'),
  (SELECT count(*) FROM issuances WHERE parent_supi = :'parent'),
  (SELECT count(*) FROM c WHERE n > 1),
  (SELECT count(*) FROM r LEFT JOIN c ON c.device_id = r.device WHERE c.device_id IS NULL OR NOT r.ok),
  (SELECT count(*) FROM r JOIN c ON c.device_id = r.device WHERE c.supi IS DISTINCT FROM r.supi);
SQL
)
gw_metrics=$(scrape "$GW_METRICS")
resent=$(printf '%s\n' "$gw_metrics" | sed -n 's/^gatewayd_batches_resent_total \(.*\)/\1/p')
replayed=$(scrape "$B_HTTP" | sed -n 's/^cn_backend_credentials_replayed_total \(.*\)/\1/p')

echo
echo "gatewayctl status (after the run):"
"$BIN/gatewayctl" --socket "$GW_CONTROL" status | grep -E '^(core network link|CN endpoint|CN session|requests outstanding)' | sed 's/^/  /'
echo "gatewayd /metrics (excerpt):"
printf '%s\n' "$gw_metrics" | grep -E '^gatewayd_(cn_sessions|cn_endpoint_up|cn_endpoint_failures_total|batches_resent_total|cn_link_losses_total\{reason="idle_timeout"\})' | sed 's/^/  /' || true
echo
echo "fleet summary:"
echo "  devices                      $devices ($completed completed)"
echo "  instance a SIGKILLed         $([ "$killed" = 1 ] && echo "yes, at $threshold+ issued" || echo no)"
echo "  child credentials in the DB  $children (idempotency-ledger entries: $ledger)"
echo "  lost                         $lost"
echo "  issued twice                 $twice"
echo "  received != database         $mismatched"
echo "  batches resent by gatewayd   ${resent:-0} (same request IDs, on instance b)"
echo "  answered from b's ledger     ${replayed:-0}"
echo
if [ "$LOADGEN_RC" = 0 ] && [ "$killed" = 1 ] && [ "$devices" = "$DEVICES" ] && [ "$completed" = "$DEVICES" ] \
  && [ "$children" = "$DEVICES" ] && [ "$lost" = 0 ] && [ "$twice" = 0 ] && [ "$mismatched" = 0 ]; then
  say "done: every device completed through the surviving instance; nothing lost, nothing issued twice"
  exit 0
fi
say "FAILED (loadgen exit $LOADGEN_RC): see the summary above; KEEP=1 keeps the logs"
exit 1
