#!/bin/bash
# The real-systemd suite, run INSIDE the booted Debian container by deb-suite.service (a oneshot
# unit that powers the container off when this script ends): deploy/tests/debian.rs builds the
# root, puts the packages in /root/debs/{prev,new}/ and iotdev in /usr/local/bin, boots it with
# systemd-nspawn and reads what this script writes to /out:
#   /out/results   one line per check: "PASS <check>: <detail>" or "FAIL <check>: <detail>"
#   /out/suite.log every command's output; /out/journal.txt both units' journal; /out/done at the end
# Every command that could hang runs under `timeout`.
set -u
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export DEBIAN_FRONTEND=noninteractive
OUT=/out
RES=$OUT/results
LOG=$OUT/suite.log
: >"$RES"
. /root/debs/versions # PREV_VERSION, NEW_VERSION, WATCHDOG_SEC

SUPI=imsi-001010000000001
K=465b5ce8b199b49faa5f0a2ee238a6bc
OPC=cd63cb71954a9f4e48a5994e37a02baf
CN=(runuser -u cn-backend -- cn-backend --dir /var/lib/cn-backend)
DEV=/root/devices

log() { printf '[%s] %s\n' "$(date +%T.%3N)" "$*" >>"$LOG"; }
# t SECONDS CMD...: runs CMD under timeout, its output to the log; its status.
t() {
  local s=$1
  shift
  log "\$ $*"
  timeout -k 5 "$s" "$@" >>"$LOG" 2>&1
}
# q SECONDS CMD...: like t, but prints CMD's stdout (for $(...)).
q() {
  local s=$1
  shift
  timeout -k 5 "$s" "$@" 2>>"$LOG"
}
DETAIL=""
# check NAME FUNCTION: runs FUNCTION, records PASS/FAIL with the DETAIL it set.
check() {
  DETAIL=""
  log "=== check $1"
  local start=$SECONDS
  if "$2"; then
    echo "PASS $1: ${DETAIL:-ok} ($((SECONDS - start)) s)" >>"$RES"
  else
    echo "FAIL $1: ${DETAIL:-failed} ($((SECONDS - start)) s)" >>"$RES"
  fi
}
# note NAME TEXT: a finding that is neither a pass nor a failure (e.g. what the container lacks).
note() { echo "NOTE $1: $2" >>"$RES"; }
bad() {
  DETAIL="$*"
  log "FAILED: $*"
  return 1
}
prop() { systemctl show -p "$2" --value "$1"; }
# wait_until SECONDS CMD...: polls CMD every 0.2 s.
wait_until() {
  local until=$((SECONDS + $1))
  shift
  while ! "$@" >/dev/null 2>&1; do
    [ "$SECONDS" -lt "$until" ] || return 1
    sleep 0.2
  done
}
gw_status() { q 30 gatewayctl status; }
gw_field() { gw_status | sed -n "s/^$1 *//p" | head -n 1; }
cn_link_up() { gw_field "core network link" | grep -qx up; }
# Distinct child SUPIs the CN has issued under the companion subscription (from its database).
cn_children() { q 30 "${CN[@]}" subscriber show "$SUPI" | grep -c '^  child '; }
installed_version() { dpkg-query -W -f='${Version}' "$1" 2>/dev/null; }

# provision ID: a device end to end through both daemons (iotdev init, gatewayctl pair, provision,
# attach at the CN with the new credential).
provision() {
  local id=$1 code
  t 30 iotdev --dir "$DEV/$id" init --id "$id" || return 1
  code=$(q 30 iotdev --dir "$DEV/$id" pairing-code --no-qr | grep '^CPN:') || return 1
  t 30 gatewayctl pair "$code" || return 1
  t 90 iotdev --dir "$DEV/$id" provision --gateway 127.0.0.1:4433 --retry-for 60s || return 1
  t 30 iotdev --dir "$DEV/$id" attach || return 1
}
holds_credential() { q 10 iotdev --dir "$DEV/$1" show --json | grep -q '"supi"'; }

# ready UNIT: `systemctl start` returned (Type=notify: only after READY=1) and the service is
# really ready at that moment, not some time later.
ready() {
  local u=$1 t0
  t0=$(date +%s%N)
  t 90 systemctl start "$u" || bad "systemctl start $u failed: $(systemctl status --no-pager "$u" 2>&1 | tail -n 5)" || return 1
  local ms=$((($(date +%s%N) - t0) / 1000000))
  [ "$(prop "$u" Type)" = notify ] || bad "$u: Type=$(prop "$u" Type)" || return 1
  [ "$(prop "$u" ActiveState)/$(prop "$u" SubState)" = active/running ] ||
    bad "$u: $(prop "$u" ActiveState)/$(prop "$u" SubState) after start" || return 1
  local status
  status=$(prop "$u" StatusText)
  case $u in
    cn-backend)
      # READY=1 is sent once the QUIC endpoint and the admin API are bound: both must be now.
      ss -Hlun 'sport = :4434' | grep -q . || bad "cn-backend active but UDP 4434 not bound" || return 1
      ss -Hltn 'sport = :8480' | grep -q . || bad "cn-backend active but TCP 8480 not bound" || return 1
      ;;
    gatewayd)
      ss -Hlun 'sport = :4433' | grep -q . || bad "gatewayd active but UDP 4433 not bound" || return 1
      [ -S /run/gatewayd/control.sock ] || bad "gatewayd active but no control socket" || return 1
      ss -Hltn 'sport = :9464' | grep -q . || bad "gatewayd active but metrics port 9464 not bound" || return 1
      # The CN link is reported from the first moment, and comes up.
      local link
      link=$(gw_field "core network link")
      [ -n "$link" ] || bad "gatewayctl status reports no CN link state" || return 1
      wait_until 30 cn_link_up || bad "CN link not up 30 s after READY (was '$link')" || return 1
      status="$status; CN link at READY: $link"
      ;;
  esac
  DETAIL="${DETAIL:+$DETAIL; }$u active ${ms} ms after start, sockets bound at once, STATUS=\"$status\""
}

# --- install (the previous version) -----------------------------------------------------------
c_install() {
  t 120 dpkg -i /root/debs/prev/*.deb || bad "dpkg -i of version $PREV_VERSION failed" || return 1
  for p in gatewayd cn-backend; do
    [ "$(installed_version $p)" = "$PREV_VERSION" ] || bad "$p: version $(installed_version $p)" || return 1
    getent passwd $p | grep -q nologin || bad "no system user $p" || return 1
    [ "$(prop $p LoadState)" = loaded ] || bad "$p.service not loaded" || return 1
    # Not started at installation (they need configuration first), not enabled.
    [ "$(prop $p ActiveState)" = inactive ] || bad "$p started at installation" || return 1
    [ "$(systemctl is-enabled $p 2>/dev/null)" = disabled ] || bad "$p is $(systemctl is-enabled $p 2>&1) at installation" || return 1
  done
  dpkg-query -W -f='${Conffiles}' gatewayd | grep -q ' /etc/gatewayd/gatewayd.toml ' ||
    bad "/etc/gatewayd/gatewayd.toml is not a conffile" || return 1
  [ "$(stat -c %U:%a /var/lib/cn-backend)" = cn-backend:700 ] || bad "/var/lib/cn-backend: $(stat -c %U:%a /var/lib/cn-backend)" || return 1
  [ -d /etc/gatewayd ] || bad "no /etc/gatewayd" || return 1
  for f in /usr/share/man/man8/gatewayd.8.gz /usr/share/man/man8/gatewayctl.8.gz /usr/share/man/man8/cn-backend.8.gz; do
    [ -s "$f" ] || bad "no $f" || return 1
  done
  DETAIL="$PREV_VERSION installed with dpkg -i: users, units (inactive, disabled), conffile, man pages"
}

# The operator's and the router owner's configuration, as docs/OPERATIONS.md tells them.
configure() {
  t 60 "${CN[@]}" init --mcc 001 --mnc 01 --server-name localhost --listen 127.0.0.1:4434 \
    --http-listen 127.0.0.1:8480 || return 1
  t 60 "${CN[@]}" subscriber add --supi "$SUPI" --k "$K" --opc "$OPC" --max-children 100 || return 1
  install -m 0644 /var/lib/cn-backend/ca.pem /etc/gatewayd/operator-ca.pem
  printf 'supi = "%s"\nk = "%s"\nopc = "%s"\n' "$SUPI" "$K" "$OPC" >/etc/gatewayd/companion.toml
  chown gatewayd:gatewayd /etc/gatewayd/companion.toml
  chmod 0600 /etc/gatewayd/companion.toml
  # Local edits of the conffile (kept across the upgrade): the CN, and the XDP filter on lo.
  sed -i -e 's|^endpoint = .*|endpoint = "127.0.0.1:4434"\nserver_name = "localhost"|' \
    -e 's|^interfaces = \[\]|interfaces = ["lo"]|' /etc/gatewayd/gatewayd.toml
  grep -q '^endpoint = "127.0.0.1:4434"' /etc/gatewayd/gatewayd.toml
}

c_configure_and_start_prev() {
  configure || bad "configuration failed (see suite.log)" || return 1
  # As docs/OPERATIONS.md says: systemctl enable --now (enable, then the readiness check's start).
  t 30 systemctl enable cn-backend gatewayd || bad "systemctl enable failed" || return 1
  ready cn-backend || return 1
  ready gatewayd || return 1
  provision dev-before-upgrade || bad "device dev-before-upgrade not provisioned on $PREV_VERSION" || return 1
  DETAIL="$PREV_VERSION configured, enabled, started, device dev-before-upgrade provisioned"
}

# --- upgrade --------------------------------------------------------------------------------
c_upgrade() {
  local gw_pid cn_pid paired_before held_before children_before
  gw_pid=$(prop gatewayd MainPID)
  cn_pid=$(prop cn-backend MainPID)
  paired_before=$(gw_field "devices paired")
  held_before=$(gw_field "credentials held" | awk '{print $1}')
  children_before=$(cn_children)
  t 180 dpkg -i /root/debs/new/*.deb || bad "dpkg -i of version $NEW_VERSION failed" || return 1
  for p in gatewayd cn-backend; do
    [ "$(installed_version $p)" = "$NEW_VERSION" ] || bad "$p: version $(installed_version $p) after upgrade" || return 1
    [ "$(prop $p ActiveState)" = active ] || bad "$p not active after upgrade" || return 1
  done
  [ "$(prop gatewayd MainPID)" != "$gw_pid" ] || bad "gatewayd not restarted by the upgrade" || return 1
  [ "$(prop cn-backend MainPID)" != "$cn_pid" ] || bad "cn-backend not restarted by the upgrade" || return 1
  grep -q '^endpoint = "127.0.0.1:4434"' /etc/gatewayd/gatewayd.toml || bad "local conffile edits lost" || return 1
  [ "$(systemctl is-enabled gatewayd)/$(systemctl is-enabled cn-backend)" = enabled/enabled ] || bad "enablement lost in the upgrade" || return 1
  [ ! -e /etc/gatewayd/gatewayd.toml.dpkg-new ] || bad "conffile prompt left gatewayd.toml.dpkg-new" || return 1
  wait_until 30 cn_link_up || bad "CN link not up after the upgrade" || return 1
  [ "$(gw_field "devices paired")" = "$paired_before" ] || bad "devices paired: $paired_before -> $(gw_field "devices paired")" || return 1
  [ "$(gw_field "credentials held" | awk '{print $1}')" = "$held_before" ] || bad "credentials held changed" || return 1
  [ "$(cn_children)" = "$children_before" ] || bad "CN children: $children_before -> $(cn_children)" || return 1
  gatewayctl devices 2>>"$LOG" | grep -q 'dev-before-upgrade' || bad "dev-before-upgrade no longer listed" || return 1
  holds_credential dev-before-upgrade || bad "dev-before-upgrade lost its credential" || return 1
  t 30 iotdev --dir "$DEV/dev-before-upgrade" attach || bad "the pre-upgrade credential no longer attaches" || return 1
  DETAIL="$PREV_VERSION -> $NEW_VERSION with both daemons running: restarted, still enabled, conffile edits kept, $paired_before paired / $held_before credential(s) held / $children_before CN child(ren) unchanged, old credential attaches"
}

# --- readiness (the new version, restarted cold) -----------------------------------------------
c_ready() {
  t 60 systemctl stop gatewayd cn-backend || bad "stop failed" || return 1
  # A gatewayd that cannot get ready (its CA file missing) fails `systemctl start`: systemd
  # waited for READY=1 instead of assuming it.
  mv /etc/gatewayd/operator-ca.pem /etc/gatewayd/operator-ca.pem.away
  if t 60 systemctl start gatewayd; then
    mv /etc/gatewayd/operator-ca.pem.away /etc/gatewayd/operator-ca.pem
    bad "systemctl start succeeded for a gatewayd that cannot start"
    return 1
  fi
  local state
  state=$(prop gatewayd ActiveState)
  t 30 systemctl stop gatewayd
  t 30 systemctl reset-failed gatewayd
  mv /etc/gatewayd/operator-ca.pem.away /etc/gatewayd/operator-ca.pem
  [ "$state" != active ] || bad "gatewayd active without being ready" || return 1
  DETAIL="a gatewayd that cannot get ready fails systemctl start ($state)"
  ready cn-backend && ready gatewayd
}

c_e2e() {
  provision dev-e2e || bad "device dev-e2e not provisioned (suite.log)" || return 1
  gatewayctl devices 2>>"$LOG" | grep 'dev-e2e' | grep -q provisioned || bad "gatewayctl devices: dev-e2e not provisioned" || return 1
  DETAIL="iotdev init, gatewayctl pair, iotdev provision through gatewayd (XDP/userspace filter), iotdev attach at cn-backend: both under systemd"
}

# --- hardening ------------------------------------------------------------------------------
# In the daemon's own mount namespace (nsenter as root, so only the sandbox can refuse).
in_ns() { nsenter -t "$1" -m -- "${@:2}"; }
c_hardening() {
  local u pid st caps want
  for u in gatewayd cn-backend; do
    pid=$(prop $u MainPID)
    st=$(cat /proc/"$pid"/status)
    [ "$(stat -c %U /proc/"$pid")" = "$u" ] || bad "$u runs as $(stat -c %U /proc/"$pid")" || return 1
    grep -q '^NoNewPrivs:[[:space:]]*1' <<<"$st" || bad "$u: NoNewPrivs not set" || return 1
    grep -q '^Seccomp:[[:space:]]*2' <<<"$st" || bad "$u: no seccomp filter (SystemCallFilter)" || return 1
    caps=$(sed -n 's/^CapEff:[[:space:]]*//p' <<<"$st")
    if [ $u = gatewayd ]; then want=000000c000001000; else want=0000000000000000; fi # CAP_BPF|CAP_PERFMON|CAP_NET_ADMIN
    [ "$caps" = "$want" ] || bad "$u: CapEff $caps, expected $want" || return 1
    [ "$(sed -n 's/^CapBnd:[[:space:]]*//p' <<<"$st")" = "$want" ] || bad "$u: CapBnd is not $want" || return 1
    # ProtectSystem=strict: /usr and /etc read-only; ProtectHome: /root empty; PrivateTmp.
    if in_ns "$pid" touch /usr/lib/hardening-probe 2>/dev/null; then bad "$u: /usr writable"; return 1; fi
    if in_ns "$pid" touch /etc/hardening-probe 2>/dev/null; then bad "$u: /etc writable"; return 1; fi
    if in_ns "$pid" ls /root/devices >/dev/null 2>&1; then bad "$u: /root visible (ProtectHome)"; return 1; fi
    touch /tmp/host-tmp-probe
    if in_ns "$pid" test -e /tmp/host-tmp-probe; then bad "$u: /tmp shared (PrivateTmp)"; return 1; fi
    # Its state directory stays writable for it.
    in_ns "$pid" test -w /var/lib/$u || bad "$u: /var/lib/$u not writable in its namespace" || return 1
  done
  DETAIL="as their users, NoNewPrivs, seccomp, CapEff/CapBnd gatewayd=CAP_NET_ADMIN+CAP_BPF+CAP_PERFMON cn-backend=none, /usr+/etc read-only, /root hidden, private /tmp; provisioning works under it (e2e)"
}

# http_get PORT PATH: GET from 127.0.0.1 (bash /dev/tcp; no curl in the root).
http_get() {
  exec 3<>"/dev/tcp/127.0.0.1/$1" || return 1
  printf 'GET %s HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n' "$2" >&3
  timeout 10 cat <&3
  exec 3<&-
}
metrics() { http_get 9464 /metrics; } # gatewayd's
c_ebpf() {
  local mode bnd
  mode=$(metrics | grep '^gatewayd_filter_mode{' | grep ' 1$' | sed 's/.*mode="\([^"]*\)".*/\1/')
  log "filter mode: $mode"
  case "$mode" in
    xdp* | tc*)
      ip link show lo | grep -q xdp || [ "$mode" = tc ] || bad "metric says $mode but no XDP program on lo" || return 1
      DETAIL="the eBPF filter runs in the kernel ($mode on lo) inside the unit's sandbox (CAP_BPF+CAP_PERFMON+CAP_NET_ADMIN only), and the e2e device passed through it"
      ;;
    *)
      bnd=$(sed -n 's/^CapBnd:[[:space:]]*//p' /proc/1/status)
      if (((0x$bnd >> 39) & 1)) && (((0x$bnd >> 38) & 1)); then
        bad "filter mode '$mode' though the container has CAP_BPF and CAP_PERFMON: $(journalctl -u gatewayd --no-pager | grep -A 3 -m 1 'USERSPACE fallback' | tail -n 4)"
        return 1
      fi
      note ebpf-filter "the container lacks CAP_BPF or CAP_PERFMON (CapBnd $bnd): gatewayd filters in userspace ($mode)"
      DETAIL="userspace filter (container without CAP_BPF/CAP_PERFMON)"
      ;;
  esac
}

# --- reload ---------------------------------------------------------------------------------
batching() { gw_field batching | awk '{print $3}'; }
c_reload() {
  local pid before restarts
  pid=$(prop gatewayd MainPID)
  restarts=$(prop gatewayd NRestarts)
  before=$(batching)
  [ "$before" = 256 ] || bad "batching before reload: '$before', expected 256" || return 1
  sed -i 's/^max_batch = 256$/max_batch = 77/' /etc/gatewayd/gatewayd.toml
  t 30 systemctl reload gatewayd || bad "systemctl reload failed" || return 1
  wait_until 10 sh -c '[ "$(gatewayctl status | sed -n "s/^batching *//p" | awk "{print \$3}")" = 77 ]' ||
    bad "max_batch still $(batching) 10 s after reload" || return 1
  [ "$(prop gatewayd MainPID)" = "$pid" ] || bad "reload restarted gatewayd" || return 1
  [ "$(prop gatewayd NRestarts)" = "$restarts" ] || bad "NRestarts changed on reload" || return 1
  journalctl -u gatewayd --no-pager | grep -q 'configuration reloaded' || bad "no 'configuration reloaded' in the journal" || return 1
  [ "$(prop gatewayd ActiveState)" = active ] || bad "not active after reload" || return 1
  DETAIL="systemctl reload = SIGHUP to PID $pid (same process): [batching] max_batch 256 -> 77 in effect"
}

# --- watchdog -------------------------------------------------------------------------------
c_watchdog() {
  local gw cn start ms paired children
  paired=$(gw_field "devices paired")
  children=$(cn_children)
  gw=$(prop gatewayd MainPID)
  cn=$(prop cn-backend MainPID)
  [ "$(prop gatewayd WatchdogUSec)" = "${WATCHDOG_SEC}s" ] || bad "WatchdogUSec=$(prop gatewayd WatchdogUSec)" || return 1
  start=$(date +%s%N)
  kill -STOP "$gw" "$cn"
  log "SIGSTOP gatewayd $gw, cn-backend $cn"
  # Killed (WatchdogSignal=SIGABRT) after WatchdogSec without a ping, restarted after RestartSec.
  local limit=$((WATCHDOG_SEC + 2 + 10))
  wait_until "$limit" sh -c "[ \"\$(systemctl show -p MainPID --value gatewayd)\" != $gw ] && [ \"\$(systemctl show -p MainPID --value cn-backend)\" != $cn ] && systemctl is-active -q gatewayd cn-backend" ||
    bad "not restarted within $limit s of SIGSTOP (WatchdogSec=$WATCHDOG_SEC)" || return 1
  ms=$((($(date +%s%N) - start) / 1000000))
  [ "$ms" -ge $((WATCHDOG_SEC * 1000 - 1000)) ] || bad "restarted after $ms ms: before WatchdogSec, not by the watchdog" || return 1
  journalctl -u gatewayd --no-pager | grep -qi 'watchdog timeout' || bad "no watchdog timeout logged for gatewayd" || return 1
  journalctl -u cn-backend --no-pager | grep -qi 'watchdog timeout' || bad "no watchdog timeout logged for cn-backend" || return 1
  wait_until 30 cn_link_up || bad "CN link not up after the restart" || return 1
  [ "$(gw_field "devices paired")" = "$paired" ] || bad "devices paired $paired -> $(gw_field "devices paired")" || return 1
  [ "$(cn_children)" = "$children" ] || bad "CN children $children -> $(cn_children)" || return 1
  holds_credential dev-e2e && t 30 iotdev --dir "$DEV/dev-e2e" attach || bad "dev-e2e cannot attach after the restart" || return 1
  DETAIL="both SIGSTOPped: killed by the watchdog and active again (new PIDs) ${ms} ms later (WatchdogSec=${WATCHDOG_SEC}s, RestartSec=2s); $paired paired, $children CN children kept"
}

# --- stop drains ----------------------------------------------------------------------------
outstanding() { [ "$(gw_field "requests outstanding")" -ge "$1" ]; }
c_stop_drains() {
  local n=8 i pids=() ok=0 children_before t0 ms cn_pid stop_pid stop_rc inflight
  children_before=$(cn_children)
  for i in $(seq 1 $n); do
    t 30 iotdev --dir "$DEV/drain-$i" init --id "drain-$i" || bad "iotdev init" || return 1
    t 30 gatewayctl pair "$(q 30 iotdev --dir "$DEV/drain-$i" pairing-code --no-qr | grep '^CPN:')" || bad "pair drain-$i" || return 1
  done
  # The CN frozen, so that the devices' requests are at the CN, unanswered, when the stop comes.
  cn_pid=$(prop cn-backend MainPID)
  kill -STOP "$cn_pid"
  for i in $(seq 1 $n); do
    timeout -k 5 120 iotdev --dir "$DEV/drain-$i" provision --gateway 127.0.0.1:4433 --retry-for 90s \
      >"$OUT/drain-$i.log" 2>&1 &
    pids+=($!)
  done
  if ! wait_until 30 outstanding "$n"; then
    kill -CONT "$cn_pid"
    bad "requests outstanding $(gw_field "requests outstanding"), expected $n"
    return 1
  fi
  inflight=$(gw_field "requests outstanding")
  # systemctl stop (SIGTERM: gatewayd drains its batches at the CN), and the CN resumes a second
  # later, within gatewayd's drain_timeout (10 s): the answers arrive during the drain.
  t0=$(date +%s%N)
  timeout -k 5 60 systemctl stop gatewayd >>"$LOG" 2>&1 &
  stop_pid=$!
  sleep 1
  kill -CONT "$cn_pid"
  wait "$stop_pid"
  stop_rc=$?
  ms=$((($(date +%s%N) - t0) / 1000000))
  [ "$stop_rc" = 0 ] || bad "systemctl stop gatewayd failed ($stop_rc)" || return 1
  [ "$(prop gatewayd Result)/$(prop gatewayd ExecMainStatus)" = success/0 ] ||
    bad "gatewayd stop: Result=$(prop gatewayd Result) status=$(prop gatewayd ExecMainStatus) (killed, not drained?)" || return 1
  journalctl -u gatewayd --no-pager | grep 'drain finished' | tail -n 1 | grep -q 'drained=true' ||
    bad "gatewayd did not drain: $(journalctl -u gatewayd --no-pager | grep 'drain finished' | tail -n 1)" || return 1
  [ "$ms" -ge 900 ] || bad "stop returned after $ms ms: before the CN answered (no drain)" || return 1
  ready gatewayd || return 1
  for p in "${pids[@]}"; do wait "$p" && ok=$((ok + 1)); done
  [ "$ok" = "$n" ] || bad "$ok of $n devices provisioned across the stop (drain-*.log)" || return 1
  for i in $(seq 1 $n); do holds_credential "drain-$i" || bad "drain-$i holds no credential" || return 1; done
  # Nothing lost, nothing issued twice: the CN issued exactly one credential per device, and the
  # ones it answered during the drain were delivered after the restart.
  [ "$(cn_children)" = $((children_before + n)) ] || bad "CN children $children_before -> $(cn_children), expected +$n" || return 1
  t0=$(date +%s%N)
  t 60 systemctl stop cn-backend || bad "systemctl stop cn-backend failed" || return 1
  [ "$(prop cn-backend Result)/$(prop cn-backend ExecMainStatus)" = success/0 ] || bad "cn-backend stop: $(prop cn-backend Result)" || return 1
  local cms=$((($(date +%s%N) - t0) / 1000000))
  ready cn-backend || return 1
  DETAIL="systemctl stop gatewayd with $inflight requests unanswered at a frozen CN, CN resumed 1 s later: stop took $ms ms (drained=true, exit 0); all $n devices hold their credential (delivered during the drain, or after the restart), CN issued exactly $n; cn-backend stopped cleanly in $cms ms"
}

# --- several instances from the template ----------------------------------------------------
# cn-backend@.service as docs/OPERATIONS.md ("Running a fleet") describes it: instances a and b
# serve from the one data directory, each on the addresses of /etc/cn-backend/NAME.env; an
# instance without its file does not start.
c_instances() {
  local i u udp tcp pid
  install -d -m 0755 /etc/cn-backend
  printf 'LISTEN=127.0.0.1:4435\nHTTP_LISTEN=127.0.0.1:8481\n' >/etc/cn-backend/a.env
  printf 'LISTEN=127.0.0.1:4436\nHTTP_LISTEN=127.0.0.1:8482\n' >/etc/cn-backend/b.env
  t 90 systemctl start cn-backend@a cn-backend@b || bad "systemctl start cn-backend@a cn-backend@b failed: $(systemctl status --no-pager cn-backend@a cn-backend@b 2>&1 | tail -n 8)" || return 1
  for i in a:4435:8481 b:4436:8482; do
    IFS=: read -r u udp tcp <<<"$i"
    u=cn-backend@$u
    [ "$(prop "$u" ActiveState)/$(prop "$u" SubState)" = active/running ] || bad "$u: $(prop "$u" ActiveState)/$(prop "$u" SubState)" || return 1
    [ "$(prop "$u" User)" = cn-backend ] || bad "$u runs as $(prop "$u" User)" || return 1
    ss -Hlun "sport = :$udp" | grep -q . || bad "$u active but UDP $udp not bound" || return 1
    http_get "$tcp" /metrics | grep -q '^cn_backend_' || bad "$u: no metrics on $tcp" || return 1
  done
  # Both processes distinct, both alive, next to the single-instance unit's.
  pid=$(prop cn-backend@a MainPID)
  [ "$pid" != "$(prop cn-backend@b MainPID)" ] && [ "$pid" != 0 ] || bad "instances share a PID" || return 1
  if t 30 systemctl start cn-backend@c; then
    bad "cn-backend@c started without /etc/cn-backend/c.env"
    return 1
  fi
  t 60 systemctl stop cn-backend@a cn-backend@b || bad "systemctl stop of the instances failed" || return 1
  for u in cn-backend@a cn-backend@b; do
    [ "$(prop "$u" Result)" = success ] || bad "$u stop: Result=$(prop "$u" Result)" || return 1
  done
  t 30 systemctl reset-failed cn-backend@c
  rm -rf /etc/cn-backend
  DETAIL="cn-backend@a and @b active on 4435/8481 and 4436/8482 from one data directory, beside cn-backend.service; cn-backend@c without its env file refused; both stopped cleanly"
}

# --- remove and purge -----------------------------------------------------------------------
c_remove() {
  t 120 apt-get remove -y gatewayd cn-backend || bad "apt-get remove failed" || return 1
  [ ! -e /usr/bin/gatewayd ] && [ ! -e /usr/bin/cn-backend ] && [ ! -e /usr/bin/gatewayctl ] || bad "binaries left" || return 1
  t 30 systemctl daemon-reload
  # deb-systemd-helper masks the unit of a removed (not purged) package; purge unmasks it.
  case "$(prop gatewayd LoadState)" in not-found | masked) ;; *) bad "gatewayd.service still loaded" || return 1 ;; esac
  [ ! -e /usr/lib/systemd/system/gatewayd.service ] || bad "unit file left" || return 1
  pgrep -x gatewayd >/dev/null && { bad "gatewayd still running"; return 1; }
  pgrep -x cn-backend >/dev/null && { bad "cn-backend still running"; return 1; }
  [ -f /etc/gatewayd/gatewayd.toml ] || bad "remove deleted the conffile" || return 1
  [ -f /var/lib/gatewayd/gatewayd.db ] && [ -f /var/lib/cn-backend/cn-backend.db ] || bad "remove deleted state" || return 1
  dpkg -l gatewayd cn-backend | grep -q '^rc' || bad "not in config-files state" || return 1
  DETAIL="apt-get remove: binaries and units gone, daemons stopped; conffile, state and users kept (dpkg state rc)"
}
c_purge() {
  t 120 apt-get purge -y gatewayd cn-backend || bad "apt-get purge failed" || return 1
  [ ! -e /etc/gatewayd/gatewayd.toml ] || bad "conffile left" || return 1
  [ ! -e /var/lib/gatewayd ] || bad "/var/lib/gatewayd left" || return 1
  [ ! -e /usr/lib/sysusers.d/gatewayd.conf ] && [ ! -e /usr/lib/tmpfiles.d/gatewayd.conf ] || bad "sysusers/tmpfiles left" || return 1
  local left
  left=$(find /etc/systemd /usr/lib/systemd/system /lib/systemd/system /var/lib/systemd/deb-systemd-helper-enabled \
    \( -name 'gatewayd*' -o -name 'cn-backend*' \) 2>/dev/null)
  [ -z "$left" ] || bad "unit files or links left: $left" || return 1
  # Kept: the operator's database (keys, subscribers), the administrator's own files, the users.
  [ -f /var/lib/cn-backend/cn-backend.db ] || bad "purge deleted cn-backend's database" || return 1
  [ -f /etc/gatewayd/companion.toml ] && [ -f /etc/gatewayd/operator-ca.pem ] || bad "purge deleted the administrator's files" || return 1
  getent passwd gatewayd >/dev/null && getent passwd cn-backend >/dev/null || bad "system users removed" || return 1
  dpkg -l gatewayd cn-backend 2>/dev/null | grep -q '^[a-z][a-z] ' && { bad "still known to dpkg: $(dpkg -l gatewayd cn-backend | tail -n 2)"; return 1; }
  DETAIL="apt-get purge: conffile, /var/lib/gatewayd, units, sysusers/tmpfiles entries and enable links gone; kept: /var/lib/cn-backend (operator data), /etc/gatewayd/{companion.toml,operator-ca.pem} (administrator's), system users"
}

log "suite starts; previous $PREV_VERSION, new $NEW_VERSION"
# (No wait for is-system-running: this unit is part of the boot transaction, which stays
# "starting" until it ends. Its default dependencies order it after basic.target.)
check install c_install
check start-previous-version c_configure_and_start_prev
check upgrade c_upgrade
check ready-after-notify c_ready
check provision-end-to-end c_e2e
check hardening c_hardening
check ebpf-filter c_ebpf
check reload-sighup c_reload
# The watchdog check runs with a shorter WatchdogSec (a drop-in) to keep the suite fast.
mkdir -p /etc/systemd/system/gatewayd.service.d /etc/systemd/system/cn-backend.service.d
printf '[Service]\nWatchdogSec=%ss\n' "$WATCHDOG_SEC" | tee /etc/systemd/system/gatewayd.service.d/test-watchdog.conf \
  >/etc/systemd/system/cn-backend.service.d/test-watchdog.conf
t 30 systemctl daemon-reload
t 60 systemctl restart cn-backend gatewayd
check watchdog c_watchdog
rm -rf /etc/systemd/system/gatewayd.service.d /etc/systemd/system/cn-backend.service.d
t 30 systemctl daemon-reload
check stop-drains c_stop_drains
check instances c_instances
journalctl --no-pager -o short-monotonic -u gatewayd -u cn-backend -u 'cn-backend@*' >"$OUT/journal.txt" 2>&1
check remove c_remove
check purge c_purge
log "suite ends"
touch "$OUT/done"
