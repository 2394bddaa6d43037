//! `[sync]` of `cn-backend.toml`: the 5G cores kept in step with the child credentials, today one
//! Open5GS subscriber store (`[sync.open5gs]`) with the operator defaults for what a credential
//! does not say, and its validation.

use std::time::Duration;

use serde::Deserialize;

/// `[sync]` of `cn-backend.toml`: the 5G cores whose subscriber stores cn-backend keeps in step
/// with its child credentials.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyncSettings {
    /// `[sync.open5gs]`: an Open5GS subscriber store (MongoDB).
    #[serde(default)]
    pub open5gs: Option<Open5gsSettings>,
}

use super::{ConfigError, duration};

fn default_o5_database() -> String {
    "open5gs".into()
}
fn default_o5_collection() -> String {
    "subscribers".into()
}
fn default_o5_sst() -> u8 {
    1
}
fn default_o5_dnns() -> Vec<String> {
    vec!["internet".into()]
}
fn default_o5_session_type() -> u8 {
    3
}
fn default_o5_qos_index() -> u8 {
    9
}
fn default_o5_arp_priority() -> u8 {
    8
}
fn default_o5_arp_disabled() -> u8 {
    1
}
fn default_o5_ambr_kbps() -> u32 {
    1_000_000
}
fn default_o5_access_restriction() -> u32 {
    32
}
fn default_o5_rau_tau() -> u32 {
    12
}
fn default_o5_retry_max() -> String {
    "30s".into()
}
fn default_o5_sweep() -> String {
    "1s".into()
}
fn default_true() -> bool {
    true
}

/// `[sync.open5gs]`: where the Open5GS subscriber documents live and the operator defaults for
/// what a child credential does not say (docs/OPERATIONS.md, "With Open5GS").
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Open5gsSettings {
    /// `mongodb://host:port/…` of the core's database (Open5GS's `db_uri`).
    pub uri: String,
    /// Database name. default: `open5gs`.
    #[serde(default = "default_o5_database")]
    pub database: String,
    /// Collection. default: `subscribers`.
    #[serde(default = "default_o5_collection")]
    pub collection: String,
    /// Slice/service type of the one slice every document gets. default: 1 (eMBB).
    #[serde(default = "default_o5_sst")]
    pub sst: u8,
    /// Slice differentiator, 6 hex digits; empty = none. default: none.
    #[serde(default)]
    pub sd: String,
    /// Sessions of a credential whose restrictions allow any DNN (Open5GS lists each DNN).
    /// default: `["internet"]`.
    #[serde(default = "default_o5_dnns")]
    pub default_dnns: Vec<String>,
    /// PDU session type of every session: 1 IPv4, 2 IPv6, 3 IPv4v6. default: 3.
    #[serde(default = "default_o5_session_type")]
    pub session_type: u8,
    /// 5QI of every session. default: 9.
    #[serde(default = "default_o5_qos_index")]
    pub qos_index: u8,
    /// ARP priority level (1..15). default: 8.
    #[serde(default = "default_o5_arp_priority")]
    pub arp_priority_level: u8,
    /// ARP pre-emption capability: 1 disabled, 2 enabled. default: 1.
    #[serde(default = "default_o5_arp_disabled")]
    pub arp_pre_emption_capability: u8,
    /// ARP pre-emption vulnerability: 1 disabled, 2 enabled. default: 1.
    #[serde(default = "default_o5_arp_disabled")]
    pub arp_pre_emption_vulnerability: u8,
    /// UE and session AMBR downlink, kbit/s, of a credential without a bitrate limit.
    /// default: 1000000 (1 Gbit/s).
    #[serde(default = "default_o5_ambr_kbps")]
    pub ambr_downlink_kbps: u32,
    /// Likewise uplink. default: 1000000.
    #[serde(default = "default_o5_ambr_kbps")]
    pub ambr_uplink_kbps: u32,
    /// `access_restriction_data` (TS 29.272 bit mask; 32 = handover to non-3GPP access not
    /// allowed, the WebUI's default).
    #[serde(default = "default_o5_access_restriction")]
    pub access_restriction_data: u32,
    /// `network_access_mode`: 0 packet and circuit, 2 packet only. default: 0.
    #[serde(default)]
    pub network_access_mode: u32,
    /// `subscribed_rau_tau_timer`, minutes. default: 12.
    #[serde(default = "default_o5_rau_tau")]
    pub subscribed_rau_tau_timer: u32,
    /// Longest pause between two attempts of a failing push (backoff doubles from 100 ms).
    /// default: `30s`.
    #[serde(default = "default_o5_retry_max")]
    pub retry_max: String,
    /// How often the expiry sweeper looks for expired credentials still in the core.
    /// default: `1s`.
    #[serde(default = "default_o5_sweep")]
    pub sweep_interval: String,
    /// Whether `serve` runs the pusher and the expiry sweeper. `false` only records outbox rows
    /// (an instance that must never push). Several instances that push take turns through the
    /// pusher lease, one at a time. default: true.
    #[serde(default = "default_true")]
    pub push: bool,
}

impl Open5gsSettings {
    /// Settings with every default and `uri`.
    pub fn with_uri(uri: &str) -> Self {
        toml::from_str(&format!("uri = {uri:?}")).unwrap_or_else(|_| Open5gsSettings {
            uri: uri.to_owned(),
            database: default_o5_database(),
            collection: default_o5_collection(),
            sst: default_o5_sst(),
            sd: String::new(),
            default_dnns: default_o5_dnns(),
            session_type: default_o5_session_type(),
            qos_index: default_o5_qos_index(),
            arp_priority_level: default_o5_arp_priority(),
            arp_pre_emption_capability: default_o5_arp_disabled(),
            arp_pre_emption_vulnerability: default_o5_arp_disabled(),
            ambr_downlink_kbps: default_o5_ambr_kbps(),
            ambr_uplink_kbps: default_o5_ambr_kbps(),
            access_restriction_data: default_o5_access_restriction(),
            network_access_mode: 0,
            subscribed_rau_tau_timer: default_o5_rau_tau(),
            retry_max: default_o5_retry_max(),
            sweep_interval: default_o5_sweep(),
            push: true,
        })
    }

    /// Checks values Open5GS would misread.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(format!("[sync.open5gs] {m}")));
        if !self.uri.starts_with("mongodb://") {
            return bad(format!(
                "uri must start with mongodb:// (got {:?})",
                self.uri
            ));
        }
        if self.database.is_empty() || self.collection.is_empty() {
            return bad("database and collection must not be empty".into());
        }
        if !self.sd.is_empty()
            && (self.sd.len() != 6 || !self.sd.bytes().all(|b| b.is_ascii_hexdigit()))
        {
            return bad(format!("sd must be 6 hex digits (got {:?})", self.sd));
        }
        if !(1..=3).contains(&self.session_type) {
            return bad("session_type must be 1 (IPv4), 2 (IPv6) or 3 (IPv4v6)".into());
        }
        if !(1..=15).contains(&self.arp_priority_level) {
            return bad("arp_priority_level must be 1..15".into());
        }
        for v in [
            self.arp_pre_emption_capability,
            self.arp_pre_emption_vulnerability,
        ] {
            if !(1..=2).contains(&v) {
                return bad("arp pre-emption values must be 1 (disabled) or 2 (enabled)".into());
            }
        }
        if self.ambr_downlink_kbps == 0 || self.ambr_uplink_kbps == 0 {
            return bad("AMBR must be positive".into());
        }
        for d in &self.default_dnns {
            crate::model::Dnn::parse(d)
                .map_err(|e| ConfigError::Invalid(format!("[sync.open5gs] default_dnns: {e}")))?;
        }
        if self.default_dnns.is_empty() {
            return bad("default_dnns must name at least one DNN".into());
        }
        duration("sync.open5gs.retry_max", &self.retry_max)?;
        duration("sync.open5gs.sweep_interval", &self.sweep_interval)?;
        Ok(())
    }

    /// `retry_max` parsed.
    pub fn retry_max(&self) -> Result<Duration, ConfigError> {
        duration("sync.open5gs.retry_max", &self.retry_max)
    }

    /// `sweep_interval` parsed.
    pub fn sweep_interval(&self) -> Result<Duration, ConfigError> {
        duration("sync.open5gs.sweep_interval", &self.sweep_interval)
    }
}
