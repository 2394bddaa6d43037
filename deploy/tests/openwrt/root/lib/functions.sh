# A minimal stand-in for OpenWrt's /lib/functions.sh and procd.sh, enough to run
# openwrt/files/gatewayd.init outside OpenWrt (deploy/tests/openwrt.rs):
# - config_load NAME reads $UCI_CONFIG_DIR/NAME. UCI files are `config TYPE 'NAME'`,
#   `option KEY 'VALUE'` and `list KEY 'VALUE'` lines, which is shell syntax: like OpenWrt's
#   uci_load did, the file is sourced with `config`, `option` and `list` defined as functions
#   that store CONFIG_<section>_<option> (lists also _ITEM<n> and _LENGTH, as functions.sh does).
# - config_get, config_get_bool, config_list_foreach: the semantics of functions.sh.
# - procd_*: each call is printed as `procd: <args>` to $PROCD_LOG.

CONFIG_SECTION=
config() { CONFIG_SECTION="$2"; }
option() { eval "CONFIG_${CONFIG_SECTION}_$1=\$2"; }
list() {
	local len
	eval "len=\${CONFIG_${CONFIG_SECTION}_$1_LENGTH:-0}"
	len=$((len + 1))
	eval "CONFIG_${CONFIG_SECTION}_$1_ITEM$len=\$2"
	eval "CONFIG_${CONFIG_SECTION}_$1_LENGTH=$len"
	eval "CONFIG_${CONFIG_SECTION}_$1=\"\${CONFIG_${CONFIG_SECTION}_$1:+\$CONFIG_${CONFIG_SECTION}_$1 }\$2\""
}
config_load() { [ -f "$UCI_CONFIG_DIR/$1" ] && . "$UCI_CONFIG_DIR/$1"; }
config_get() {
	local __v
	eval "__v=\${CONFIG_$2_$3-}"
	[ -n "$__v" ] || __v="${4-}"
	eval "$1=\$__v"
}
config_get_bool() {
	local __b
	config_get __b "$2" "$3" "${4-}"
	case "$__b" in
	1|on|true|yes|enabled) __b=1 ;;
	0|off|false|no|disabled) __b=0 ;;
	*) __b="${4-0}" ;;
	esac
	eval "$1=\$__b"
}
config_list_foreach() {
	local section="$1" option="$2" fn="$3" len i item
	shift 3
	eval "len=\${CONFIG_${section}_${option}_LENGTH:-0}"
	i=1
	while [ "$i" -le "$len" ]; do
		eval "item=\$CONFIG_${section}_${option}_ITEM$i"
		"$fn" "$item" "$@"
		i=$((i + 1))
	done
}
procd_open_instance() { echo "procd: open_instance $*" >> "$PROCD_LOG"; }
procd_set_param() { echo "procd: set_param $*" >> "$PROCD_LOG"; }
procd_close_instance() { echo "procd: close_instance" >> "$PROCD_LOG"; }
procd_add_reload_trigger() { echo "procd: reload_trigger $*" >> "$PROCD_LOG"; }
