//! The LAN side: `[devices]` (the device-facing QUIC server) and `[filter]` (the LAN filter).

use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::*;

/// How the LAN filter runs (see [`crate::filter`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FilterModeSetting {
    /// XDP on `interfaces` when any are configured and eBPF is usable, else userspace.
    Auto,
    /// XDP (native, falling back to generic/skb mode); userspace if eBPF is unusable.
    Xdp,
    /// TC ingress classifier (bridges, interfaces where XDP does not fit); userspace if unusable.
    Tc,
    /// The same policy in userspace, on the QUIC socket, before any handshake work.
    Userspace,
}

/// The LAN filter in front of the device QUIC port: short Initials, per-source token bucket on
/// Initials, deny list, strict (paired-only) mode. Applied by eBPF (XDP/TC) on `interfaces`, or
/// in userspace when eBPF cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FilterConfig {
    /// `auto`, `xdp`, `tc` or `userspace`. Default `auto`.
    pub mode: FilterModeSetting,
    /// LAN interfaces to attach the eBPF program to (e.g. `["br-lan"]`). Default: none
    /// (userspace filter).
    pub interfaces: Vec<String>,
    /// QUIC Initial packets per second admitted from one source address. Default: none, meaning
    /// 4 × `[devices] new_connections_per_ip` (0 = unlimited): the device server refuses
    /// honest clients beyond their rate with an answer; the filter stops floods above it.
    pub initial_rate: Option<u32>,
    /// Token-bucket size (burst) for Initials per source. Default: twice the rate.
    pub initial_burst: Option<u32>,
    /// Admit only source addresses of paired devices (learned when a paired device completes a
    /// handshake, plus `allowed_sources`), and anyone while a pairing window is open.
    /// Default `false`.
    pub strict: bool,
    /// Source addresses always admitted in strict mode. Default `[]`.
    pub allowed_sources: Vec<std::net::IpAddr>,
    /// Block a source automatically after this many failed handshakes (unpaired key, bad TLS)
    /// within `failure_window`; 0 = never. Default 10.
    pub block_after_failures: u32,
    /// Default `1m`.
    #[serde(with = "duration_str")]
    pub failure_window: Duration,
    /// How long an automatic block lasts. Default `10m`.
    #[serde(with = "duration_str")]
    pub block_for: Duration,
    /// Most source addresses each per-address table keeps: the Initial token buckets (userspace
    /// mode; the eBPF map holds 65,536), the handshake-failure counters, the per-address
    /// connection rate and the addresses suspected of failing handshakes. A full table evicts
    /// its least recently used address (`gatewayd_address_table_evictions_total{table}`).
    /// 16 to 65536. Default 65536.
    pub max_tracked_sources: usize,
}

impl Default for FilterConfig {
    fn default() -> Self {
        Self {
            mode: FilterModeSetting::Auto,
            interfaces: Vec::new(),
            initial_rate: None,
            initial_burst: None,
            strict: false,
            allowed_sources: Vec::new(),
            block_after_failures: 10,
            failure_window: Duration::from_secs(60),
            block_for: Duration::from_secs(600),
            max_tracked_sources: MAX_TRACKED_SOURCES,
        }
    }
}

/// Largest (and default) `[filter] max_tracked_sources`: the size of the eBPF bucket map.
pub const MAX_TRACKED_SOURCES: usize = companion_filter_common::BUCKETS_MAX as usize;

/// When the device server answers a new connection with a QUIC Retry (RFC 9000 §8.1), so the
/// client proves it receives packets at its source address before any handshake work is done.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RetryPolicy {
    /// Every connection from an address not yet validated (costs one round trip per connection).
    Always,
    /// Only while `retry_load_handshakes` or more handshakes are in progress, and for addresses
    /// that recently failed a handshake; handshake failures from unvalidated addresses are then
    /// not counted towards automatic blocks.
    UnderLoad,
    /// Never: no failure before the client proved its address counts towards a block, so only
    /// failures after the handshake (a key unpaired meanwhile) can block an address.
    Never,
}

/// The device-facing QUIC server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DevicesConfig {
    /// UDP address the QUIC server binds. Default `[::]:4433` (all interfaces, IPv4 and IPv6);
    /// tests use `127.0.0.1:0`.
    pub listen: SocketAddr,
    /// A device connection with no packet for this long is closed. Default `30s`.
    #[serde(with = "duration_str")]
    pub idle_timeout: Duration,
    /// Most simultaneous device connections; more are refused. Default 4096.
    pub max_connections: usize,
    /// A device stream silent this long (mid-message, or no request) is cut off. Default `10s`.
    #[serde(with = "duration_str")]
    pub stream_timeout: Duration,
    /// New connections accepted per second from one IP address (bursts of twice as many); a
    /// device reconnecting in a loop is refused beyond it. 0 = unlimited. Default 200.
    pub new_connections_per_ip: u32,
    /// Most simultaneous connections with one device key. Default 2.
    pub max_connections_per_device: usize,
    /// Kernel receive and send buffer asked for the device UDP socket, bytes. Hundreds of
    /// devices connecting at once overflow the kernel's default (~208 KiB) and every dropped
    /// Initial costs that device a retransmission timeout. Beyond `net.core.rmem_max` /
    /// `wmem_max` only with CAP_NET_ADMIN. Default 4 MiB (4194304).
    pub socket_buffer: usize,
    /// QUIC address validation: `always`, `under_load` or `never` (see [`RetryPolicy`]).
    /// Default `always`.
    pub retry: RetryPolicy,
    /// With `retry = "under_load"`: handshakes in progress from which new connections get a
    /// Retry. Default 64.
    pub retry_load_handshakes: usize,
    /// Most device TLS handshakes worked on at once. Further connections from validated
    /// addresses wait for a slot in arrival order (their Initials are held, not dropped) for
    /// up to 10 s, so a power-cut herd is served at the rate of a small burst instead of
    /// overflowing the socket buffer and costing every device retransmission timeouts.
    /// Default 64.
    pub max_handshakes: usize,
}

impl Default for DevicesConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0u16; 8], 4433)),
            idle_timeout: Duration::from_secs(30),
            max_connections: 4096,
            stream_timeout: Duration::from_secs(10),
            new_connections_per_ip: 200,
            max_connections_per_device: 2,
            socket_buffer: 4 * 1024 * 1024,
            retry: RetryPolicy::Always,
            retry_load_handshakes: 64,
            max_handshakes: 64,
        }
    }
}
