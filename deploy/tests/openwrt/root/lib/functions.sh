# Test stand-in for OpenWrt's /lib/functions.sh (package base-files), written for
# deploy/tests/openwrt.rs from the behaviour of the upstream file: the functions below keep the
# upstream names, arguments, variables and results; openwrt/README.md lists what is modelled and
# what is left out. POSIX sh (dash runs it here; OpenWrt runs busybox ash).
#
# Differences that do not change what an init script sees: upstream stores every value with
# `export -n` (a shell variable that is not exported; NO_EXPORT=1); plain assignments do the same
# in POSIX sh. The stand-in root ($STANDIN_ROOT, the directory holding lib/ and etc/) replaces the
# absolute paths; upstream's $IPKG_INSTROOT keeps its meaning (config_load is a no-op under it).
# `local` is in busybox ash and dash (upstream uses it too); the variables are read by the scripts
# that source this file; the files it sources are found at run time.
# shellcheck disable=SC3043,SC2034,SC1090,SC1091,SC2013

# The stand-in root; under $IPKG_INSTROOT (package scripts run for an offline root) that root.
STANDIN_ROOT=${STANDIN_ROOT:-${IPKG_INSTROOT-}}

N="
"
_C=0
NO_EXPORT=1
LOAD_STATE=1
LIST_SEP=" "

debug() { ${DEBUG:-:} "$@"; }

# append VAR VALUE [SEP]: VAR="$VAR${SEP}VALUE" (no separator while VAR is empty).
append() {
	local _var="$1" _value="$2" _sep="${3:- }" _old
	eval "_old=\${$_var-}"
	if [ -n "$_old" ] && [ -n "$_value" ]; then
		eval "$_var=\$_old\$_sep\$_value"
	else
		eval "$_var=\$_old\$_value"
	fi
}

# list_contains VAR WORD: whether the space-separated list in VAR holds WORD.
list_contains() {
	local _words
	eval "_words=\" \${$1-} \""
	case "$_words" in
	*" $2 "*) return 0 ;;
	*) return 1 ;;
	esac
}

# Callbacks a script may redefine; config_load calls them while it reads a package.
reset_cb() {
	config_cb() { return 0; }
	option_cb() { return 0; }
	list_cb() { return 0; }
}
reset_cb

package() { return 0; }

# config TYPE [NAME]: starts a section (anonymous sections are named cfgN, N counting from 1).
config() {
	local _type="$1" _name="$2"
	CONFIG_NUM_SECTIONS=$((${CONFIG_NUM_SECTIONS:-0} + 1))
	[ -n "$_name" ] || _name="cfg$CONFIG_NUM_SECTIONS"
	append CONFIG_SECTIONS "$_name"
	CONFIG_SECTION="$_name"
	config_set "$CONFIG_SECTION" TYPE "$_type"
	[ -n "${NO_CALLBACK-}" ] || config_cb "$_type" "$_name"
}

# option NAME VALUE...: the value is all remaining words joined by spaces.
option() {
	local _name="$1"
	shift
	config_set "$CONFIG_SECTION" "$_name" "$*"
	[ -n "${NO_CALLBACK-}" ] || option_cb "$_name" "$*"
}

# list NAME VALUE...: items in NAME_ITEM1.., their count in NAME_LENGTH, and all items joined by
# $LIST_SEP in NAME itself; the first item of a list records it in CONFIG_LIST_STATE.
list() {
	local _name="$1" _len
	shift
	config_get _len "$CONFIG_SECTION" "${_name}_LENGTH" 0
	[ "$_len" != 0 ] || append CONFIG_LIST_STATE "${CONFIG_SECTION}_${_name}"
	_len=$((_len + 1))
	config_set "$CONFIG_SECTION" "${_name}_ITEM$_len" "$*"
	config_set "$CONFIG_SECTION" "${_name}_LENGTH" "$_len"
	append "CONFIG_${CONFIG_SECTION}_${_name}" "$*" "$LIST_SEP"
	[ -n "${NO_CALLBACK-}" ] || list_cb "$_name" "$*"
}

config_set() { eval "CONFIG_$1_$2=\$3"; }

config_unset() { config_set "$1" "$2" ""; }

# config_get VAR SECTION OPTION [DEFAULT]: VAR gets the value, or DEFAULT when it is unset or
# empty. config_get SECTION OPTION: prints the value. Names with characters other than
# [A-Za-z0-9_] do nothing at all (VAR is left as it was).
config_get() {
	case "$2${3:-$1}" in
	*[!A-Za-z0-9_]*) return 0 ;;
	esac
	if [ -z "$3" ]; then
		eval "printf '%s\n' \"\${CONFIG_$1_$2-}\""
	else
		eval "$1=\${CONFIG_$2_$3:-\${4-}}"
	fi
}

# get_bool VALUE [DEFAULT]: prints 1 or 0 for UCI's spellings, else DEFAULT (possibly empty).
get_bool() {
	case "$1" in
	1 | on | true | yes | enabled) printf 1 ;;
	0 | off | false | no | disabled) printf 0 ;;
	*) printf '%s' "${2-}" ;;
	esac
}

# config_get_bool VAR SECTION OPTION [DEFAULT]
config_get_bool() {
	local _raw
	config_get _raw "$2" "$3" "${4-}"
	_raw="$(get_bool "$_raw" "${4-}")"
	eval "$1=\$_raw"
}

# config_foreach FUNCTION [TYPE [ARGS...]]: FUNCTION SECTION ARGS... for each section (of TYPE).
config_foreach() {
	local _fn="$1" _type="" _section _t
	[ "$#" -ge 1 ] && shift
	_type="${1-}"
	[ "$#" -ge 1 ] && shift
	[ -n "${CONFIG_SECTIONS-}" ] || return 0
	for _section in $CONFIG_SECTIONS; do
		config_get _t "$_section" TYPE
		[ -n "$_type" ] && [ "$_t" != "$_type" ] && continue
		"$_fn" "$_section" "$@"
	done
}

# config_list_foreach SECTION OPTION FUNCTION [ARGS...]: FUNCTION ITEM ARGS... for each item.
config_list_foreach() {
	[ "$#" -ge 3 ] || return 0
	local _section="$1" _option="$2" _fn="$3" _len _item _i=1
	shift 3
	config_get _len "$_section" "${_option}_LENGTH"
	[ -n "$_len" ] || return 0
	while [ "$_i" -le "$_len" ]; do
		config_get _item "$_section" "${_option}_ITEM$_i"
		"$_fn" "$_item" "$@"
		_i=$((_i + 1))
	done
}

# --- Package scripts: what an .ipk's postinst and prerm call (they source this file).

group_exists() { grep -qs "^$1:" "${IPKG_INSTROOT-}/etc/group"; }
user_exists() { grep -qs "^$1:" "${IPKG_INSTROOT-}/etc/passwd"; }
# group_add NAME GID
group_add() {
	[ -f "${IPKG_INSTROOT-}/etc/group" ] || return 1
	echo "$1:x:$2:" >>"${IPKG_INSTROOT-}/etc/group"
}
# group_add_next NAME: prints the GID of NAME, adding it with the first free GID from 32768.
group_add_next() {
	local _gid _gids
	_gid=$(grep -s "^$1:" "${IPKG_INSTROOT-}/etc/group" | cut -d: -f3)
	if [ -n "$_gid" ]; then echo "$_gid"; return 0; fi
	_gids=$(cut -d: -f3 "${IPKG_INSTROOT-}/etc/group")
	_gid=32768
	while echo "$_gids" | grep -qx "$_gid"; do _gid=$((_gid + 1)); done
	group_add "$1" "$_gid"
	echo "$_gid"
}
# group_add_user GROUP USER: USER becomes a member of GROUP.
group_add_user() {
	local _line _sep=,
	_line=$(grep -s "^$1:" "${IPKG_INSTROOT-}/etc/group")
	echo "$_line" | cut -d: -f4 | grep -q "$2" && return 0
	case "$_line" in *:) _sep= ;; esac
	sed -i "s/^$_line\$/$_line$_sep$2/" "${IPKG_INSTROOT-}/etc/group"
}
# user_add NAME [UID [GID [DESC [HOME [SHELL]]]]]: no UID: the first free one from 32768; home
# /var/run/NAME, shell /bin/false; a locked shadow entry.
user_add() {
	local _uid="${2-}" _gid="${3-}" _uids
	if [ -z "$_uid" ]; then
		_uids=$(cut -d: -f3 "${IPKG_INSTROOT-}/etc/passwd")
		_uid=32768
		while echo "$_uids" | grep -qx "$_uid"; do _uid=$((_uid + 1)); done
	fi
	[ -n "$_gid" ] || _gid=$_uid
	[ -f "${IPKG_INSTROOT-}/etc/passwd" ] || return 1
	echo "$1:x:$_uid:$_gid:${4:-$1}:${5:-/var/run/$1}:${6:-/bin/false}" >>"${IPKG_INSTROOT-}/etc/passwd"
	echo "$1:x:0:0:99999:7:::" >>"${IPKG_INSTROOT-}/etc/shadow"
}

# add_group_and_user PACKAGE: the users and groups of the package's Require-User field
# (USER[=UID]:GROUP[=GID][:GROUP2[=GID2],...] ...), each created unless it exists.
add_group_and_user() {
	local _pkg="${pkgname:-$(basename "${1%.*}")}" _rusers _tuple _u _g _extra _uid _gid _eg _egid
	_rusers=$(sed -ne 's/^Require-User: *//p' "${IPKG_INSTROOT-}/usr/lib/opkg/info/$_pkg.control" 2>/dev/null)
	for _tuple in $_rusers; do
		_u=$(echo "$_tuple" | cut -d: -f1) _g=$(echo "$_tuple" | cut -s -d: -f2)
		_extra=$(echo "$_tuple" | cut -s -d: -f3)
		_uid=$(echo "$_u" | cut -s -d= -f2) _u=${_u%%=*}
		_gid=$(echo "$_g" | cut -s -d= -f2) _g=${_g%%=*}
		if [ -n "$_g" ] && [ -n "$_gid" ]; then
			group_exists "$_g" || group_add "$_g" "$_gid"
		elif [ -n "$_g" ]; then
			_gid=$(group_add_next "$_g")
		fi
		[ -z "$_u" ] || user_exists "$_u" || user_add "$_u" "$_uid" "$_gid"
		[ -z "$_u" ] || [ -z "$_g" ] || group_add_user "$_g" "$_u"
		for _eg in $(echo "$_extra" | tr , ' '); do
			_egid=$(echo "$_eg" | cut -s -d= -f2) _eg=${_eg%%=*}
			if [ -n "$_egid" ]; then
				group_exists "$_eg" || group_add "$_eg" "$_egid"
			else
				group_add_next "$_eg" >/dev/null
			fi
			group_add_user "$_eg" "$_u"
		done
	done
}

# default_postinst SCRIPT: after opkg unpacked the package: its users and groups, its
# postinst-pkg, then for each /etc/init.d script it installed: `enable` (and, on a running
# system, `start`; neither enable on an upgrade, PKG_UPGRADE=1). Under $IPKG_INSTROOT (an image
# or offline root) the scripts are enabled through that root's /etc/rc.common.
default_postinst() {
	local _root="${IPKG_INSTROOT-}" _pkg="${pkgname:-$(basename "${1%.*}")}" _list _ret=0 _i
	_list="$_root/usr/lib/opkg/info/$_pkg.list"
	[ -e "$_list" ] && pkgname="$_pkg" add_group_and_user "$_pkg"
	if [ -f "$_root/usr/lib/opkg/info/$_pkg.postinst-pkg" ]; then
		(. "$_root/usr/lib/opkg/info/$_pkg.postinst-pkg")
		_ret=$?
	fi
	for _i in $(grep -s "^/etc/init.d/" "$_list"); do
		if [ -n "$_root" ]; then
			/bin/sh "$_root/etc/rc.common" "$_root$_i" enable
		else
			[ "${PKG_UPGRADE-}" = 1 ] || "$_i" enable
			"$_i" start
		fi
	done
	return $_ret
}

# default_prerm SCRIPT: before opkg removes the package: its prerm-pkg, then `disable` (not on an
# upgrade) and `stop` for each of its /etc/init.d scripts.
default_prerm() {
	local _root="${IPKG_INSTROOT-}" _pkg="${pkgname:-$(basename "${1%.*}")}" _list _ret=0 _i
	_list="$_root/usr/lib/opkg/info/$_pkg.list"
	if [ -f "$_root/usr/lib/opkg/info/$_pkg.prerm-pkg" ]; then
		(. "$_root/usr/lib/opkg/info/$_pkg.prerm-pkg")
		_ret=$?
	fi
	for _i in $(grep -s "^/etc/init.d/" "$_list"); do
		if [ -n "$_root" ]; then
			/bin/sh "$_root/etc/rc.common" "$_root$_i" disable
		else
			[ "${PKG_UPGRADE-}" = 1 ] || "$_i" disable
			"$_i" stop
		fi
	done
	return $_ret
}

# config_load PACKAGE: uci_load (lib/config/uci.sh), except while building an image.
config_load() {
	[ -n "${IPKG_INSTROOT-}" ] && return 0
	uci_load "$@"
}

if [ -z "${IPKG_INSTROOT-}" ]; then
	. "${STANDIN_ROOT:?set STANDIN_ROOT to the stand-in root (deploy/tests/openwrt/root)}/lib/config/uci.sh"
fi
