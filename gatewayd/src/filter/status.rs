//! What the filter reports: where it runs ([`FilterMode`]), its per-reason packet counters and
//! the status `gatewayctl status` shows.

use companion_filter_common::Reason;
use serde::{Deserialize, Serialize};

/// Where the policy runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FilterMode {
    /// XDP in the driver.
    Xdp,
    /// XDP in generic (skb) mode.
    XdpGeneric,
    /// TC ingress classifier.
    Tc,
    /// On the QUIC socket in gatewayd.
    Userspace,
}

impl FilterMode {
    /// Every mode, most preferred first.
    pub const ALL: [FilterMode; 4] = [
        FilterMode::Xdp,
        FilterMode::XdpGeneric,
        FilterMode::Tc,
        FilterMode::Userspace,
    ];

    /// The mode as configured and reported.
    pub fn as_str(self) -> &'static str {
        match self {
            FilterMode::Xdp => "xdp",
            FilterMode::XdpGeneric => "xdp_generic",
            FilterMode::Tc => "tc",
            FilterMode::Userspace => "userspace",
        }
    }
}

/// Per-reason packet counters (UDP to the QUIC port only).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FilterCounters {
    /// Passed to the QUIC server.
    pub passed: u64,
    /// Client Initials shorter than 1200 bytes, dropped.
    pub dropped_short_initial: u64,
    /// Initials over the source's rate, dropped.
    pub rate_limited: u64,
    /// From a blocked source, dropped.
    pub denied: u64,
    /// From an unpaired source in strict mode, dropped.
    pub not_paired: u64,
    /// May be UDP to the port, but the headers could not be walked (fail closed).
    #[serde(default)]
    pub dropped_unparsed: u64,
    /// IP fragments of UDP to the port.
    #[serde(default)]
    pub dropped_fragment: u64,
}

impl FilterCounters {
    /// Reads the counters indexed by [`Reason`].
    pub fn from_array(a: [u64; Reason::COUNT as usize]) -> Self {
        Self {
            passed: a[Reason::Passed as usize],
            dropped_short_initial: a[Reason::DroppedShortInitial as usize],
            rate_limited: a[Reason::RateLimited as usize],
            denied: a[Reason::Denied as usize],
            not_paired: a[Reason::NotPaired as usize],
            dropped_unparsed: a[Reason::DroppedUnparsed as usize],
            dropped_fragment: a[Reason::DroppedFragment as usize],
        }
    }

    /// Every packet dropped, whatever the reason.
    pub fn dropped(&self) -> u64 {
        self.dropped_short_initial
            + self.rate_limited
            + self.denied
            + self.not_paired
            + self.dropped_unparsed
            + self.dropped_fragment
    }
}

/// What `gatewayctl status` shows of the filter.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FilterStatus {
    /// Where the filter runs.
    pub mode: FilterMode,
    /// Interfaces the eBPF program is attached to (empty in userspace mode).
    pub interfaces: Vec<String>,
    /// Why eBPF is not used, in userspace mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback_reason: Option<String>,
    /// The QUIC port filtered.
    pub port: u16,
    /// Strict mode: only paired sources (or anyone while the window is open).
    pub strict: bool,
    /// Initials per second per source (0 = unlimited) and bucket size.
    pub initial_rate: u32,
    /// Token-bucket size (Initials a source may send at once).
    pub initial_burst: u32,
    /// Blocked sources in the deny map.
    pub deny_entries: u64,
    /// Sources in the paired-source map.
    pub paired_sources: u64,
    /// Learned paired-device addresses evicted (least recently seen first) to keep the
    /// paired-source map within its capacity, since start.
    #[serde(default)]
    pub paired_evicted: u64,
    /// Packets passed and dropped, by reason, since start.
    pub counters: FilterCounters,
}
