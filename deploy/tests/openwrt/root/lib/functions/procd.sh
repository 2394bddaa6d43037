# Test stand-in for OpenWrt's /lib/functions/procd.sh (package procd), written for
# deploy/tests/openwrt.rs from the behaviour of the upstream file. Upstream builds one JSON
# message per service with libubox's jshn and sends it to procd with
# `ubus call service set|add|delete MESSAGE`; so does this stand-in, with a small JSON writer of
# its own instead of jshn, and with the `ubus` found on PATH (the tests put a stand-in there that
# records each call). The messages have upstream's shape and types: parameter tables (env, data,
# limits), arrays of strings (command, file, respawn, netdev, watch, watchdog, error), integers
# (nice, term_timeout, reload_signal), strings (user, group, capabilities, ...), booleans
# (stdout, stderr, no_new_privs); an unknown parameter is dropped without a word, as upstream.
# openwrt/README.md lists what is modelled and what is left out.
# `local` as in lib/functions.sh; $initscript is set by etc/rc.common, which sources this file.
# shellcheck disable=SC3043,SC2154,SC2119,SC2120

PROCD_RELOAD_DELAY=1000
_PROCD_SERVICE=

# --- JSON writer: _jb_* build one message in $_JB. $_JB_FIRST holds one flag per open container
# (1: nothing written in it yet), $_JB_KIND one letter (o: object, a: array), innermost first.
_jb_init() { _JB=; _JB_FIRST=1; _JB_KIND=o; }
_jb_quote() {
	printf '"%s"' "$(printf '%s' "$1" | sed -e 's/\\/\\\\/g' -e 's/"/\\"/g' -e 's/\t/\\t/g' |
		awk 'NR > 1 { printf "\\n" } { printf "%s", $0 }')"
}
# _jb_key NAME: the separator, and "NAME": when the innermost container is an object.
_jb_key() {
	case "$_JB_FIRST" in
	1*) _JB_FIRST="0${_JB_FIRST#?}" ;;
	*) _JB="$_JB," ;;
	esac
	case "$_JB_KIND" in
	o*) _JB="$_JB$(_jb_quote "$1"):" ;;
	esac
}
_jb_open() { # KIND NAME
	_jb_key "$2"
	if [ "$1" = o ]; then _JB="$_JB{"; else _JB="${_JB}["; fi
	_JB_FIRST="1$_JB_FIRST"
	_JB_KIND="$1$_JB_KIND"
}
_jb_close() {
	case "$_JB_KIND" in
	o*) _JB="$_JB}" ;;
	*) _JB="$_JB]" ;;
	esac
	_JB_FIRST="${_JB_FIRST#?}"
	_JB_KIND="${_JB_KIND#?}"
}
_jb_string() { _jb_key "$1"; _JB="$_JB$(_jb_quote "$2")"; }
_jb_int() { _jb_key "$1"; _JB="$_JB$(printf '%d' "$2")"; }
_jb_boolean() {
	_jb_key "$1"
	case "$2" in
	'' | *[!0-9]* | 0 | 00*) _JB="${_JB}false" ;;
	*) _JB="${_JB}true" ;;
	esac
}
_jb_dump() { printf '{%s}' "$_JB"; }

_procd_ubus_call() { # METHOD
	[ -n "${PROCD_DEBUG-}" ] && _jb_dump >&2
	ubus call service "$1" "$(_jb_dump)"
	_jb_init
}

_procd_service_name() {
	local _script
	_script=$(readlink "$initscript")
	basename "${_script:-$initscript}"
}

# procd_open_service NAME [SCRIPT]: a new message {name, script, instances: {...}}.
procd_open_service() {
	_PROCD_SERVICE="$1"
	_PROCD_INSTANCE_SEQ=0
	_procd_trigger_open=0
	_procd_data_open=0
	_jb_init
	_jb_string name "$1"
	[ -n "${2-}" ] && _jb_string script "$2"
	_jb_open o instances
}

# procd_close_service [METHOD]: the triggers from service_triggers, the data from service_data
# (when the script defines it), then `ubus call service METHOD` (default set).
procd_close_service() {
	_jb_close
	procd_open_trigger
	service_triggers
	procd_close_trigger
	if type service_data >/dev/null 2>&1; then
		_procd_open_data
		service_data
		_procd_close_data
	fi
	_procd_ubus_call "${1:-set}"
}

# procd_open_instance [NAME]: NAME defaults to instanceN, N counting from 1 per service.
procd_open_instance() {
	local _name="${1-}"
	_PROCD_INSTANCE_SEQ=$((_PROCD_INSTANCE_SEQ + 1))
	_jb_open o "${_name:-instance$_PROCD_INSTANCE_SEQ}"
	[ -n "${TRACE_SYSCALLS-}" ] && _jb_boolean trace 1
}

# procd_set_param TYPE [VALUE...]
procd_set_param() {
	local _type="$1" _kv _k _v
	shift
	case "$_type" in
	env | data | limits)
		_jb_open o "$_type"
		for _kv in "$@"; do
			_k="${_kv%%=*}"
			_v="${_kv#*=}"
			[ "$_kv" = "$_v" ] && _v=
			_jb_string "$_k" "$_v"
		done
		_jb_close
		;;
	command | netdev | file | respawn | watch | watchdog)
		_jb_open a "$_type"
		# An empty respawn takes the defaults procd_close_instance fills in upstream (those of
		# /etc/config/system's service section there; its defaults here).
		[ "$_type" = respawn ] && [ "$#" = 0 ] && set -- 3600 5 5
		for _v in "$@"; do _jb_string "" "$_v"; done
		_jb_close
		;;
	error)
		_jb_open a "$_type"
		_jb_string "" "$*"
		_jb_close
		;;
	nice | term_timeout) _jb_int "$_type" "$1" ;;
	reload_signal) _jb_int "$_type" "$(kill -l "$1")" ;;
	pidfile | user | group | seccomp | capabilities | facility | extroot | overlaydir | tmpoverlaysize | vrf)
		_jb_string "$_type" "$1"
		;;
	stdout | stderr | no_new_privs) _jb_boolean "$_type" "$1" ;;
	esac
}

procd_close_instance() { _jb_close; }

# procd_add_instance COMMAND...: an instance that only has a command line.
procd_add_instance() {
	procd_open_instance
	procd_set_param command "$@"
	procd_close_instance
}

# The "triggers" array is opened once however deep the open/close calls nest.
procd_open_trigger() {
	_procd_trigger_open=$((${_procd_trigger_open:-0} + 1))
	[ "$_procd_trigger_open" -gt 1 ] && return 0
	_jb_open a triggers
}
procd_close_trigger() {
	_procd_trigger_open=$((${_procd_trigger_open:-0} - 1))
	[ "$_procd_trigger_open" -lt 1 ] || return 0
	_jb_close
}
_procd_open_data() {
	_procd_data_open=$((${_procd_data_open:-0} + 1))
	[ "$_procd_data_open" -gt 1 ] && return 0
	_jb_open o data
}
_procd_close_data() {
	_procd_data_open=$((${_procd_data_open:-0} - 1))
	[ "$_procd_data_open" -lt 1 ] || return 0
	_jb_close
}

# procd_add_config_trigger EVENT PACKAGE COMMAND...:
#   [EVENT, ["if", ["eq", "package", PACKAGE], ["run_script", COMMAND...]], PROCD_RELOAD_DELAY]
procd_add_config_trigger() {
	local _v
	_jb_open a ""
	_jb_string "" "$1"
	_jb_open a ""
	_jb_string "" if
	_jb_open a ""
	for _v in eq package "$2"; do _jb_string "" "$_v"; done
	_jb_close
	shift 2
	_jb_open a ""
	_jb_string "" run_script
	for _v in "$@"; do _jb_string "" "$_v"; done
	_jb_close
	_jb_close
	[ "$PROCD_RELOAD_DELAY" -gt 0 ] && _jb_int "" "$PROCD_RELOAD_DELAY"
	_jb_close
}

# procd_add_reload_trigger PACKAGE...: a change of /etc/config/PACKAGE (`reload_config`) runs
# `/etc/init.d/<this script> reload`.
procd_add_reload_trigger() {
	local _name _file
	_name=$(_procd_service_name)
	procd_open_trigger
	for _file in "$@"; do
		procd_add_config_trigger config.change "$_file" "/etc/init.d/$_name" reload
	done
	procd_close_trigger
}

# procd_kill SERVICE [INSTANCE]: `ubus call service delete {name[, instance]}`.
procd_kill() {
	_jb_init
	[ -n "${1-}" ] && _jb_string name "$1"
	[ -n "${2-}" ] && _jb_string instance "$2"
	_procd_ubus_call delete
}

# procd_send_signal SERVICE [INSTANCE] [SIGNAL]: a signal name is sent as its number.
procd_send_signal() {
	local _signal="${3-}"
	case "$_signal" in
	[A-Z]*) _signal="$(kill -l "$_signal" 2>/dev/null)" || return 1 ;;
	esac
	_jb_init
	_jb_string name "$1"
	[ -n "${2-}" ] && [ "$2" != "*" ] && _jb_string instance "$2"
	[ -n "$_signal" ] && _jb_int signal "$_signal"
	_procd_ubus_call signal
}

_jb_init
