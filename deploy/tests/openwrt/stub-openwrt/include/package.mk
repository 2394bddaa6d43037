# Stand-in for OpenWrt's package.mk: BuildPackage defines `compile` (Build/Prepare, Configure,
# Compile) and `install-<package>` (Package/<package>/install into $(STAGING)/<package>), with
# the same expansion depth as the real one ($(eval $(call ...))), so `$$$$` escapes behave alike.
PKG_BUILD_DIR:=$(BUILD_DIR)/$(PKG_NAME)
STAGING?=$(TOPDIR)/staging

define BuildPackage
compile: compile-$(1)
compile-$(1):
	$(Build/Prepare)
	$(Build/Configure)
	$(Build/Compile)
install-$(1): compile-$(1)
	$(call Package/$(1)/install,$(STAGING)/$(1))
endef
