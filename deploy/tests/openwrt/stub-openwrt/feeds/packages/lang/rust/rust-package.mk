# Stand-in for the packages feed's lang/rust/rust-package.mk (deploy/tests/openwrt.rs), written
# from the behaviour of the upstream file: Build/Compile/Cargo is `cargo install` of a crate of
# the package's source into $(PKG_INSTALL_DIR) with the target environment of rust-values.mk;
# RustBinPackage installs every binary in /usr/bin. Package variables: RUST_PKG_FEATURES
# (features to enable), RUST_PKG_LOCKED (default 1: --locked).

ifeq ($(origin RUST_INCLUDE_DIR),undefined)
  RUST_INCLUDE_DIR:=$(dir $(lastword $(MAKEFILE_LIST)))
endif
include $(RUST_INCLUDE_DIR)/rust-values.mk

RUST_PKG_LOCKED ?= 1

CARGO_PKG_VARS= \
	$(CARGO_PKG_CONFIG_VARS) \
	CC=$(HOSTCC_NOCACHE) \
	MAKEFLAGS="$(PKG_JOBS)"

CARGO_PKG_ARGS=
ifeq ($(strip $(RUST_PKG_LOCKED)),1)
  CARGO_PKG_ARGS+= --locked
endif

# Build/Compile/Cargo [PATH IN PKG_BUILD_DIR (default MAKE_PATH)] [MORE CARGO ARGUMENTS]
define Build/Compile/Cargo
	+$(CARGO_PKG_VARS) \
	cargo install -v \
		--profile $(CARGO_PKG_PROFILE) \
		$(if $(strip $(RUST_PKG_FEATURES)),--features "$(strip $(RUST_PKG_FEATURES))") \
		--root $(PKG_INSTALL_DIR) \
		--path "$(PKG_BUILD_DIR)/$(if $(strip $(1)),$(strip $(1)),$(strip $(MAKE_PATH)))" \
		$(if $(filter --jobserver%,$(PKG_JOBS)),,-j1) \
		$(CARGO_PKG_ARGS) \
		$(2)
endef

define RustBinPackage
  ifndef Package/$(1)/install
    define Package/$(1)/install
	$$(INSTALL_DIR) $$(1)/usr/bin/
	$$(INSTALL_BIN) $$(PKG_INSTALL_DIR)/bin/* $$(1)/usr/bin/
    endef
  endif
endef

Build/Compile=$(call Build/Compile/Cargo)
