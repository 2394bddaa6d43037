//! Provisioning: `[batching]` towards the CN, `[credentials]` asked for and renewed, and
//! `[pairing]` (the pairing window).

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::batcher::BatcherConfig;

use super::*;

/// Smart batching towards the CN (see [`crate::batcher`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BatchingConfig {
    /// Most requests in one batch. Default 256.
    pub max_batch: usize,
    /// Longest a request waits for company while other batches are in flight, ms. Default 5.
    pub max_wait_ms: u64,
    /// Most batches outstanding at the CN at once. Default 4.
    pub max_in_flight: usize,
    /// Most queued requests; beyond it devices are told "busy, retry after". Default 8192.
    pub queue_capacity: usize,
}

impl Default for BatchingConfig {
    fn default() -> Self {
        let b = BatcherConfig::default();
        Self {
            max_batch: b.max_batch,
            max_wait_ms: b.max_wait.as_millis() as u64,
            max_in_flight: b.max_in_flight,
            queue_capacity: b.queue_capacity,
        }
    }
}

impl BatchingConfig {
    /// The batcher's limits.
    pub fn batcher(&self) -> BatcherConfig {
        BatcherConfig {
            max_batch: self.max_batch,
            max_wait: Duration::from_millis(self.max_wait_ms),
            max_in_flight: self.max_in_flight,
            queue_capacity: self.queue_capacity,
        }
    }
}

/// What the gateway asks the CN for on behalf of a device, and when it renews.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CredentialsConfig {
    /// Lifetime requested when the device asks for none, and the longest a device may ask for
    /// (the CN may grant less). Default `30days`.
    #[serde(with = "duration_str")]
    pub default_lifetime: Duration,
    /// Renew a paired device's credential when it expires within this. Default `1day`.
    #[serde(with = "duration_str")]
    pub renewal_margin: Duration,
    /// Roaming: asked for by default when `true`; when `false` no device can ask for it.
    /// Default `false`.
    pub roaming: bool,
    /// Data network names requested by default, and the only ones a device may ask for; empty =
    /// the operator's default, and any DNN the device asks for. Default `[]`.
    pub dnns: Vec<String>,
    /// Bitrate cap requested by default, and the highest a device may ask for, kbit/s. Default:
    /// none.
    pub max_bitrate_kbps: Option<u64>,
}

impl Default for CredentialsConfig {
    fn default() -> Self {
        Self {
            default_lifetime: Duration::from_secs(30 * 86_400),
            renewal_margin: Duration::from_secs(86_400),
            roaming: false,
            dnns: Vec::new(),
            max_bitrate_kbps: None,
        }
    }
}

impl CredentialsConfig {
    /// The control parameters the gateway asks the CN for: the device's request **narrowed** to
    /// what the owner allows here, and the owner's settings where the device asked nothing. A
    /// device can never widen them (the CN's per-subscription policy narrows again):
    /// - lifetime: at most `default_lifetime`;
    /// - roaming: only where `roaming = true`;
    /// - DNNs: within `dnns` when the owner lists any (the owner's list if none of the device's
    ///   is allowed);
    /// - bitrate: at most `max_bitrate_kbps`.
    pub fn fill_params(&self, mut p: companion_proto::msg::Params) -> companion_proto::msg::Params {
        let owner_lifetime = self.default_lifetime.as_secs();
        p.lifetime_s = Some(
            p.lifetime_s
                .map_or(owner_lifetime, |l| l.min(owner_lifetime)),
        );
        p.roaming = Some(p.roaming.unwrap_or(self.roaming) && self.roaming);
        if !self.dnns.is_empty() {
            let allowed: Vec<String> = p
                .dnns
                .take()
                .unwrap_or_default()
                .into_iter()
                .filter(|d| self.dnns.contains(d))
                .collect();
            p.dnns = Some(if allowed.is_empty() {
                self.dnns.clone()
            } else {
                allowed
            });
        }
        p.max_bitrate_kbps = match (p.max_bitrate_kbps, self.max_bitrate_kbps) {
            (Some(device), Some(owner)) => Some(device.min(owner)),
            (device, owner) => device.or(owner),
        };
        p
    }
}

/// The pairing window (`gatewayctl pair --window`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PairingConfig {
    /// Window length when `gatewayctl pair --window` gives none. Default `120s`.
    #[serde(with = "duration_str")]
    pub window: Duration,
    /// Longest window the daemon agrees to open. Default `1h`.
    #[serde(with = "duration_str")]
    pub max_window: Duration,
}

impl Default for PairingConfig {
    fn default() -> Self {
        Self {
            window: Duration::from_secs(120),
            max_window: Duration::from_secs(3600),
        }
    }
}
