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
DEMO=fleet
. scripts/lib/demo.sh
need_cargo
bash scripts/setup.sh --build

pg_bin() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1; }
if [ -z "$(pg_bin)" ] || [ ! -x "$(pg_bin)/initdb" ]; then
  [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null && bash scripts/setup.sh --postgres
  [ -n "$(pg_bin)" ] && [ -x "$(pg_bin)/initdb" ] ||
    die "PostgreSQL server binaries (initdb, pg_ctl) not found under /usr/lib/postgresql/*/bin: install Debian's postgresql package (sudo apt-get install postgresql, or sudo scripts/setup.sh --postgres)"
fi
PG=$(pg_bin)

build_bins cn-backend gatewayd loadgen

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
stop_demo() {
  stop_pids "${PIDS[@]}" ${GW_PID:+"$GW_PID"}
  if [ "$PG_STARTED" = 1 ]; then
    "${AS[@]}" "$PG/pg_ctl" -D "$T/pg/data" -m fast -w stop >/dev/null 2>&1 || true
  fi
}
trap_cleanup "cn-a.log, cn-b.log, gatewayd.log, loadgen.log, pg/log; report.json"

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

write_gatewayd_config "[\"$A_QUIC\", \"$B_QUIC\"]" 4 info 200ms 5s 64
say "starting gatewayd with [cn] endpoints = [a, b], 4 sessions"
start_gatewayd
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
