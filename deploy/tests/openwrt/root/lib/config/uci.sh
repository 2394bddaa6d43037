# Test stand-in for OpenWrt's /lib/config/uci.sh (package uci): uci_load only, the one function
# config_load calls. Upstream runs `uci export PACKAGE` and evaluates its output; there is no uci
# binary here, so the stand-in evaluates `package PACKAGE` followed by the file
# $UCI_CONFIG_DIR/PACKAGE itself (default /etc/config), which is the same `config`/`option`/`list`
# shell syntax that uci export prints for files written with single quotes (openwrt/README.md).
# shellcheck disable=SC3043,SC1090,SC2034

CONFIG_APPEND=

# uci_load PACKAGE: forgets what an earlier load left (unless CONFIG_APPEND is set), loads
# PACKAGE, calls config_cb once more with no arguments if a section was read, and returns
# non-zero when the package does not exist, as `uci export` does.
uci_load() {
	local _package="$1" _file _var _ret=0
	_C=0
	if [ -z "$CONFIG_APPEND" ]; then
		for _var in ${CONFIG_LIST_STATE-}; do
			eval "CONFIG_${_var}="
			eval "CONFIG_${_var}_LENGTH="
		done
		CONFIG_LIST_STATE=
		CONFIG_SECTIONS=
		CONFIG_NUM_SECTIONS=0
		CONFIG_SECTION=
	fi
	_file="${UCI_CONFIG_DIR:-/etc/config}/$_package"
	if [ -f "$_file" ]; then
		package "$_package"
		. "$_file"
	else
		_ret=1
	fi
	${CONFIG_SECTION:+config_cb}
	return "$_ret"
}
