# Shared by scripts/demo.sh and scripts/demo-fleet.sh (sourced, not run): messages, the build,
# readiness, the router's companion credential and gatewayd's configuration and start.
# The caller sets DEMO (the message prefix), PROFILE (release | debug) and, before
# write_gatewayd_config, T (its temporary directory).

# TS 35.208 test set 1: the companion UE's (the router's) own 3GPP credential in the demos.
COMPANION_SUPI=imsi-001010000000001
COMPANION_K=465b5ce8b199b49faa5f0a2ee238a6bc
COMPANION_OPC=cd63cb71954a9f4e48a5994e37a02baf

say() { printf '\033[1;34m%s:\033[0m %s\n' "$DEMO" "$*" >&2; }
die() { printf '\033[1;31m%s: %s\033[0m\n' "$DEMO" "$*" >&2; exit 1; }

# cargo on PATH (rustup's env file if need be), or a message saying how to get it.
need_cargo() {
  command -v cargo >/dev/null || [ ! -f "$HOME/.cargo/env" ] || . "$HOME/.cargo/env"
  command -v cargo >/dev/null ||
    die "cargo not found: install Rust with rustup (https://rustup.rs), then run this again"
}

# Builds the given packages in $PROFILE and sets BIN to the absolute directory of the binaries.
build_bins() { # package...
  local args=()
  for p in "$@"; do args+=(-p "$p"); done
  say "building $* ($PROFILE)"
  if [ "$PROFILE" = release ]; then
    cargo build --release --locked "${args[@]}"
    BIN=target/release
  else
    cargo build --locked "${args[@]}"
    BIN=target/debug
  fi
  BIN=$(cd "$BIN" && pwd)
}

# Sends SIGTERM to every pid, waits up to 10 s for each, then SIGKILL.
stop_pids() { # pid...
  local pid
  for pid in "$@"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "$@"; do
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
}

# The exit trap: the caller's stop_demo (its processes) first, then $T removed, or kept with
# KEEP=1 and said so with the logs it holds.
trap_cleanup() { # "what $T holds"
  KEPT_LOGS=$1
  trap demo_exit EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM
}
demo_exit() {
  local rc=$?
  trap - EXIT INT TERM
  stop_demo
  if [ "${KEEP:-0}" = 1 ]; then
    say "kept $T (logs: $KEPT_LOGS)"
  else
    rm -rf "$T"
  fi
  exit "$rc"
}

# Waits for a ready file written by a daemon, failing if the daemon dies first.
wait_ready() { # file pid name log
  for _ in $(seq 1 300); do
    [ -s "$1" ] && return 0
    kill -0 "$2" 2>/dev/null || { tail -n 20 "$4" >&2; die "$3 exited before it was ready (log above)"; }
    sleep 0.1
  done
  tail -n 20 "$4" >&2; die "$3 not ready after 30 s (log above)"
}
json_field() { # file key -> value of "key":"value"
  sed -n "s/.*\"$2\" *: *\"\([^\"]*\)\".*/\1/p" "$1" | head -n 1
}
# GET /metrics with bash's /dev/tcp (no curl needed).
scrape() { # host:port
  local host=${1%:*} port=${1##*:}
  exec 3<>"/dev/tcp/$host/$port"
  printf 'GET /metrics HTTP/1.0\r\nHost: %s\r\n\r\n' "$1" >&3
  cat <&3
  exec 3<&-
}

# The router's side: its companion credential ($T/companion.toml, 0600) and
# $T/gatewayd.toml. CN_ENDPOINTS is the TOML value of [cn] endpoints (a quoted list);
# the rest are the knobs the two demos set differently.
write_gatewayd_config() { # cn_endpoints sessions log_level reconnect_min reconnect_max max_batch
  (umask 077 && printf 'supi = "%s"\nk = "%s"\nopc = "%s"\n' \
    "$COMPANION_SUPI" "$COMPANION_K" "$COMPANION_OPC" >"$T/companion.toml")
  chmod 600 "$T/companion.toml"
  cat >"$T/gatewayd.toml" <<TOML
state_dir = "$T/gw-state"
log_level = "$3"
[devices]
listen = "127.0.0.1:0"
max_connections = 4096
new_connections_per_ip = 0
[cn]
endpoints = $1
server_name = "localhost"
ca_file = "$T/cn/ca.pem"
sessions = $2
reconnect_min = "$4"
reconnect_max = "$5"
request_timeout = "20s"
[companion]
credential_file = "$T/companion.toml"
[control]
socket = "$T/control.sock"
[metrics]
listen = "127.0.0.1:0"
[filter]
# loadgen's thousands of devices share one source address (127.0.0.1): no automatic block of a
# source after failed handshakes (a slow handshake on a busy machine must not lock them all out).
mode = "userspace"
block_after_failures = 0
[batching]
max_batch = $6
max_in_flight = 4
queue_capacity = 16384
TOML
}

# Starts gatewayd on $T/gatewayd.toml and waits for it: sets GW_PID, GW_DEVICES, GW_METRICS,
# GW_CONTROL.
start_gatewayd() {
  "$BIN/gatewayd" --config "$T/gatewayd.toml" --ready-file "$T/gw-ready.json" 2>"$T/gatewayd.log" &
  GW_PID=$!
  wait_ready "$T/gw-ready.json" "$GW_PID" gatewayd "$T/gatewayd.log"
  GW_DEVICES=$(json_field "$T/gw-ready.json" devices)
  GW_METRICS=$(json_field "$T/gw-ready.json" metrics)
  GW_CONTROL=$(json_field "$T/gw-ready.json" control)
}
