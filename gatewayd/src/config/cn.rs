//! The operator side: `[cn]` (the CN endpoints, sessions, timeouts) and `[companion]` (the
//! companion's own 3GPP credential).

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::*;

/// The link to the operator's core network (`cn-backend`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CnConfig {
    /// `host:port` of `cn-backend`: the same as `endpoints` with one element (set one or the
    /// other). No default: without a CN endpoint the daemon still serves paired devices and
    /// pending deliveries but answers new requests "retry later".
    pub endpoint: Option<String>,
    /// `host:port` of each `cn-backend` instance of the operator's fleet (one database behind
    /// them). Sessions spread over the healthy ones and move to another when one fails.
    pub endpoints: Vec<String>,
    /// The name every CN certificate must carry. Default: the host part of each endpoint.
    pub server_name: Option<String>,
    /// The operator CA certificate (PEM) the CN's certificate must chain to.
    /// Default `/etc/gatewayd/operator-ca.pem`.
    pub ca_file: PathBuf,
    /// Serving network name for AKA (TS 33.501 §6.1.1.4). Default: the home network of the
    /// companion SUPI, assuming a 2-digit MNC (`5G:mnc0NN.mccMMM.3gppnetwork.org`).
    pub serving_network_name: Option<String>,
    /// Parallel authenticated QUIC connections to the CN. Default 1.
    pub sessions: usize,
    /// Reconnection backoff: first delay, doubled (with jitter) up to `reconnect_max`.
    /// Defaults `500ms` and `30s`.
    #[serde(with = "duration_str")]
    pub reconnect_min: Duration,
    /// Longest reconnection delay (see `reconnect_min`).
    #[serde(with = "duration_str")]
    pub reconnect_max: Duration,
    /// Longest a device waits (kept informed with `Pending`) for the CN before it is told
    /// "cn_unavailable, retry after"; the request stays queued and its credential is kept for the
    /// device's retry. Default `10s`.
    #[serde(with = "duration_str")]
    pub request_timeout: Duration,
}

impl Default for CnConfig {
    fn default() -> Self {
        Self {
            endpoint: None,
            endpoints: Vec::new(),
            server_name: None,
            ca_file: PathBuf::from("/etc/gatewayd/operator-ca.pem"),
            serving_network_name: None,
            sessions: 1,
            reconnect_min: Duration::from_millis(500),
            reconnect_max: Duration::from_secs(30),
            request_timeout: Duration::from_secs(10),
        }
    }
}

/// Most CN endpoints in `[cn] endpoints`.
pub const MAX_CN_ENDPOINTS: usize = 16;

impl CnConfig {
    /// The configured CN endpoints (`host:port`), in order: `endpoints`, or `endpoint` as a
    /// one-element list; empty when no CN is configured.
    pub fn endpoint_list(&self) -> Vec<String> {
        match &self.endpoint {
            Some(e) => vec![e.clone()],
            None => self.endpoints.clone(),
        }
    }

    /// Whether a CN endpoint is configured.
    pub fn configured(&self) -> bool {
        self.endpoint.is_some() || !self.endpoints.is_empty()
    }

    /// The TLS server name to verify for `endpoint`: `server_name`, else the host part of the
    /// endpoint (`[v6]:port` and `host:port` forms).
    pub fn server_name_for(&self, endpoint: &str) -> String {
        if let Some(name) = &self.server_name {
            return name.clone();
        }
        let host = match endpoint.strip_prefix('[') {
            Some(rest) => rest.split(']').next().unwrap_or(rest),
            None => endpoint.rsplit_once(':').map_or(endpoint, |(h, _)| h),
        };
        host.to_string()
    }

    /// The TLS server name of the first endpoint (`None` when no endpoint is configured).
    pub fn effective_server_name(&self) -> Option<String> {
        self.endpoint_list()
            .first()
            .map(|e| self.server_name_for(e))
    }

    /// Checks `endpoint` / `endpoints`: not both, no empty list, each `host:port`, no duplicate,
    /// at most [`MAX_CN_ENDPOINTS`].
    pub(super) fn validate_endpoints(&self) -> Result<(), ConfigError> {
        let invalid = |m: String| Err(ConfigError::Invalid(m));
        if self.endpoint.is_some() && !self.endpoints.is_empty() {
            return invalid(
                "[cn] sets both endpoint and endpoints: keep one (endpoint = \"h:p\" is the same \
                 as endpoints = [\"h:p\"])"
                    .into(),
            );
        }
        if self.endpoints.len() > MAX_CN_ENDPOINTS {
            return invalid(format!(
                "[cn] endpoints lists {} CN endpoints; at most {MAX_CN_ENDPOINTS} are allowed",
                self.endpoints.len()
            ));
        }
        let key = if self.endpoint.is_some() {
            "endpoint"
        } else {
            "endpoints"
        };
        let list = self.endpoint_list();
        for (i, e) in list.iter().enumerate() {
            let ok = e.rsplit_once(':').is_some_and(|(h, p)| {
                !h.is_empty()
                    && !h.contains(char::is_whitespace)
                    && p.parse::<u16>().is_ok_and(|p| p > 0)
            });
            if !ok {
                return invalid(format!(
                    "[cn] {key} {e:?} must be host:port (e.g. \"cn.example.net:4434\")"
                ));
            }
            if list[..i].iter().any(|o| o.eq_ignore_ascii_case(e)) {
                return invalid(format!("[cn] endpoints lists {e:?} twice"));
            }
        }
        if self
            .server_name
            .as_deref()
            .is_some_and(|n| n.trim().is_empty())
        {
            return invalid(
                "[cn] server_name must not be empty (omit it to use each endpoint's host)".into(),
            );
        }
        Ok(())
    }
}

/// The companion's own 3GPP credential.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CompanionConfig {
    /// TOML file with `supi`, `k`, `opc` (or `op`) and optional `amf`; must be mode 0600 or
    /// stricter. Default `/etc/gatewayd/companion.toml`.
    pub credential_file: PathBuf,
}

impl Default for CompanionConfig {
    fn default() -> Self {
        Self {
            credential_file: PathBuf::from("/etc/gatewayd/companion.toml"),
        }
    }
}
