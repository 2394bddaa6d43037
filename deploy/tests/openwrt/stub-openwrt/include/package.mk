# Stand-in for an OpenWrt buildroot's include/package.mk with the .ipk packing of
# include/package-pack.mk (deploy/tests/openwrt.rs; openwrt/README.md says what is real and what
# is a stand-in). It keeps what a package Makefile relies on:
# - the directories (PKG_BUILD_DIR, PKG_INSTALL_DIR) and the steps Build/Prepare, Build/Configure,
#   Build/Compile, run once each in that order (stamp files), on `make compile`;
# - for each BuildPackage: Package/<name>/install into a fresh directory, CONTROL/control with the
#   fields OpenWrt writes (Depends from DEPENDS without the @ conditions and with libc, Require-User
#   from USERID, Installed-Size, Description), CONTROL/conffiles, the postinst and prerm wrappers
#   that run default_postinst/default_prerm of /lib/functions.sh, then scripts/ipkg-build;
# - `make show-compile` prints Build/Compile (expanded once), without running it.
# Left out: .config selection, dependency resolution between packages, stripping (RSTRIP), the
# library dependency check, ABI versions, apk packages, host builds, downloads and patches.

PKG_BUILD_DIR ?= $(BUILD_DIR)/$(PKG_NAME)-$(PKG_VERSION)
PKG_INSTALL_DIR ?= $(PKG_BUILD_DIR)/ipkg-install
PKGARCH ?= $(ARCH_PACKAGES)
VERSION = $(PKG_VERSION)-$(PKG_RELEASE)
PKG_DEFAULT_DEPENDS := +libc
MAKE_PATH ?= .

STAMP_PREPARED := $(PKG_BUILD_DIR)/.prepared
STAMP_CONFIGURED := $(PKG_BUILD_DIR)/.configured
STAMP_BUILT := $(PKG_BUILD_DIR)/.built

define Build/Prepare/Default
	mkdir -p $(PKG_BUILD_DIR)
endef
Build/Prepare = $(Build/Prepare/Default)
Build/Configure =
Build/Compile =

.PHONY: prepare configure compile clean show-compile
all: compile
prepare: $(STAMP_PREPARED)
configure: $(STAMP_CONFIGURED)

show-compile:
	$(info $(Build/Compile))
	@:

clean:
	rm -rf $(PKG_BUILD_DIR)

# The variables a Package/<name> definition sets, cleared before each one.
PACKAGE_VARS := SECTION CATEGORY SUBMENU TITLE URL DEPENDS USERID PROVIDES CONFLICTS MAINTAINER
define Package/Reset
$(foreach v,$(PACKAGE_VARS),$(v):=
)
endef

# Depends: the DEPENDS entries without conditions (@...) and without their leading +.
ipk_depends = $(subst $(space),$(comma)$(space),$(strip $(subst +,,$(filter-out @%,$(1)))))

# The steps, as rules written by the first BuildPackage: like upstream, Build/* are expanded once
# by $(call) and once more as recipes, so `$$$$` in a Build/* definition is one `$` for the shell.
define Build/DefaultTargets
$(STAMP_PREPARED):
	$(Build/Prepare)
	mkdir -p $(PKG_BUILD_DIR) && touch $$@
$(STAMP_CONFIGURED): $(STAMP_PREPARED)
	$(Build/Configure)
	touch $$@
$(STAMP_BUILT): $(STAMP_CONFIGURED)
	$(Build/Compile)
	touch $$@
endef

define BuildPackage
$(if $(_default_targets),,$(eval _default_targets:=1)$(Build/DefaultTargets))
$(eval $(Package/Reset))
$(eval $(Package/$(1)))
IPK_$(1) := $(PACKAGE_DIR)/$(1)_$(VERSION)_$(PKGARCH).ipk
IDIR_$(1) := $(PKG_BUILD_DIR)/ipkg-$(PKGARCH)/$(1)
compile: $$(IPK_$(1))
$$(IPK_$(1)): export DESCRIPTION=$$(Package/$(1)/description)
$$(IPK_$(1)): export CONFFILES=$$(Package/$(1)/conffiles)
$$(IPK_$(1)): $(STAMP_BUILT) $(SCRIPT_DIR)/ipkg-build
	rm -rf $$(IDIR_$(1)) $(PACKAGE_DIR)/$(1)_*.ipk
	mkdir -p $$(IDIR_$(1)) $(PACKAGE_DIR)
	$(call Package/$(1)/install,$$(IDIR_$(1)))
	mkdir -p $$(IDIR_$(1))/CONTROL
	size=$$$$(cd $$(IDIR_$(1)) && du -bs --exclude=./CONTROL . | cut -f1); \
	{ \
		echo 'Package: $(1)'; \
		echo 'Version: $(VERSION)'; \
		echo 'Depends: $(call ipk_depends,$(PKG_DEFAULT_DEPENDS) $(DEPENDS))'; \
		echo 'Source: feeds/$(PKG_NAME)'; \
		echo 'SourceName: $(PKG_NAME)'; \
		echo 'License: $(PKG_LICENSE)'; \
		echo 'Section: $(SECTION)'; \
		$(if $(USERID),echo 'Require-User: $(USERID)';) \
		$(if $(URL),echo 'URL: $(URL)';) \
		echo 'Maintainer: $(PKG_MAINTAINER)'; \
		echo 'Architecture: $(PKGARCH)'; \
		echo "Installed-Size: $$$$size"; \
		printf 'Description: '; printf '%s\n' "$$$$DESCRIPTION" | sed -e 's,^[[:space:]]*, ,'; \
	} > $$(IDIR_$(1))/CONTROL/control
	[ -z "$$$$CONFFILES" ] || printf '%s\n' "$$$$CONFFILES" > $$(IDIR_$(1))/CONTROL/conffiles
	printf '%s\n' '#!/bin/sh' '[ "$$$${IPKG_NO_SCRIPT}" = "1" ] && exit 0' \
		'[ -s "$$$${IPKG_INSTROOT}/lib/functions.sh" ] || exit 0' \
		'. "$$$${IPKG_INSTROOT}/lib/functions.sh"' 'default_postinst "$$$$0" "$$$$@"' \
		> $$(IDIR_$(1))/CONTROL/postinst
	printf '%s\n' '#!/bin/sh' \
		'[ -s "$$$${IPKG_INSTROOT}/lib/functions.sh" ] || exit 0' \
		'. "$$$${IPKG_INSTROOT}/lib/functions.sh"' 'default_prerm "$$$$0" "$$$$@"' \
		> $$(IDIR_$(1))/CONTROL/prerm
	chmod 0644 $$(IDIR_$(1))/CONTROL/control
	chmod 0755 $$(IDIR_$(1))/CONTROL/postinst $$(IDIR_$(1))/CONTROL/prerm
	$(SCRIPT_DIR)/ipkg-build -o 0 -g 0 $$(IDIR_$(1)) $(PACKAGE_DIR)
	@[ -f $$@ ]
endef
