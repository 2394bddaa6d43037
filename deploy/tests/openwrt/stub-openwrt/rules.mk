# Stand-in for an OpenWrt buildroot's rules.mk (deploy/tests/openwrt.rs; openwrt/README.md says
# what is real and what is a stand-in): the variables a package Makefile and rust-package.mk use,
# for one of three targets chosen with OPENWRT_TARGET (default ipq40xx):
#   ipq40xx           ARM Cortex-A7 with NEON/VFPv4 (most ARM home routers), arm_cortex-a7_neon-vfpv4
#   mediatek-filogic  ARM Cortex-A53, aarch64_cortex-a53
#   x86-64            x86_64
# Only what the package needs: no .config, no toolchain, no host tools; everything is built
# under $(TOPDIR)/build (override TMP_ROOT to build elsewhere).
TMP_ROOT ?= $(TOPDIR)/build
OPENWRT_TARGET ?= ipq40xx

ifeq ($(OPENWRT_TARGET),ipq40xx)
  ARCH:=arm
  CPU_TYPE:=cortex-a7
  CPU_SUBTYPE:=neon-vfpv4
  CONFIG_arm_v7:=y
  CONFIG_HAS_FPU:=y
  ARCH_PACKAGES:=arm_cortex-a7_neon-vfpv4
  REAL_GNU_TARGET_NAME:=arm-openwrt-linux-muslgnueabi
else ifeq ($(OPENWRT_TARGET),mediatek-filogic)
  ARCH:=aarch64
  CPU_TYPE:=cortex-a53
  ARCH_PACKAGES:=aarch64_cortex-a53
  REAL_GNU_TARGET_NAME:=aarch64-openwrt-linux-musl
else ifeq ($(OPENWRT_TARGET),x86-64)
  ARCH:=x86_64
  ARCH_PACKAGES:=x86_64
  REAL_GNU_TARGET_NAME:=x86_64-openwrt-linux-musl
else
  $(error OPENWRT_TARGET must be ipq40xx, mediatek-filogic or x86-64, not '$(OPENWRT_TARGET)')
endif
CONFIG_USE_MUSL:=y
GNU_TARGET_NAME:=$(REAL_GNU_TARGET_NAME)
GNU_HOST_NAME:=x86_64-pc-linux-gnu
HOST_ARCH:=x86_64
HOST_OS:=Linux

INCLUDE_DIR:=$(TOPDIR)/include
SCRIPT_DIR:=$(TOPDIR)/scripts
BUILD_DIR:=$(TMP_ROOT)/build_dir/target-$(ARCH_PACKAGES)_musl
STAGING_DIR:=$(TMP_ROOT)/staging_dir/target-$(ARCH_PACKAGES)_musl
STAGING_DIR_ROOT:=$(STAGING_DIR)/root-$(OPENWRT_TARGET)
BIN_DIR:=$(TMP_ROOT)/bin
PACKAGE_DIR:=$(BIN_DIR)/packages/$(ARCH_PACKAGES)
DL_DIR:=$(TMP_ROOT)/dl
TMP_DIR:=$(TMP_ROOT)/tmp

# The cross toolchain's compiler (named, never run here).
TARGET_CROSS:=$(REAL_GNU_TARGET_NAME)-
TARGET_CC:=$(TARGET_CROSS)gcc
TARGET_CC_NOCACHE:=$(TARGET_CC)
TARGET_CFLAGS:=-Os -pipe
HOSTCC:=gcc
HOSTCC_NOCACHE:=$(HOSTCC)
PKG_JOBS:=-j1

INSTALL_DIR:=install -d -m0755
INSTALL_BIN:=install -m0755
INSTALL_SUID:=install -m4755
INSTALL_DATA:=install -m0644
INSTALL_CONF:=install -m0600
CP:=cp -fpR
TAR:=tar

toupper=$(shell echo '$(1)' | tr 'a-z' 'A-Z')
qstrip=$(strip $(subst ",,$(1)))
comma:=,
empty:=
space:=$(empty) $(empty)
