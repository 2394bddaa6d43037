//! The daemon's configuration: a TOML file whose every key has a documented default, so the
//! daemon (and `gatewayctl`) also run with no file at all.
//!
//! The annotated reference is `gatewayd/gatewayd.example.toml`. Unknown keys are errors (a typo
//! must not silently fall back to a default); the error names the key. Durations are written the
//! `humantime` way: `"30s"`, `"10m"`, `"1day"`, `"30days"`.
//!
//! A few settings can be overridden from the environment (tests, containers, systemd drop-ins),
//! applied by [`Config::apply_env`] after the file: `GATEWAYD_DEVICE_LISTEN`,
//! `GATEWAYD_STATE_DIR`, `GATEWAYD_CONTROL_SOCKET`, `GATEWAYD_METRICS_LISTEN`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::batcher::BatcherConfig;

/// Where the daemon and `gatewayctl` look for the configuration when no path is given.
pub const DEFAULT_PATH: &str = "/etc/gatewayd/gatewayd.toml";

/// Why the configuration could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read configuration {path}: {source}")]
    Read {
        /// The configuration file.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema (unknown key, wrong type, bad value).
    #[error("invalid configuration {path}: {message}")]
    Parse {
        /// The configuration file.
        path: String,
        /// The parser's message.
        message: String,
    },
    /// A value parsed but is out of range or inconsistent with another.
    #[error("invalid configuration: {0}")]
    Invalid(String),
    /// An environment override could not be parsed.
    #[error("invalid environment override {var}={value:?}: {message}")]
    Env {
        /// The environment variable.
        var: &'static str,
        /// Its value.
        value: String,
        /// Why the value was refused.
        message: String,
    },
}

/// The whole configuration. `Config::default()` is what the daemon runs with when there is no file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Where the database, the gateway's TLS identity and the USIM's SQN state live.
    /// Default `/var/lib/gatewayd`.
    pub state_dir: PathBuf,
    /// Log filter (`error`, `warn`, `info`, `debug`, `trace`, or a `tracing` directive list such
    /// as `"info,gatewayd=debug"`); `RUST_LOG` wins when set. Reloaded on SIGHUP. Default `info`.
    pub log_level: String,
    /// On SIGTERM, longest wait for in-flight work (batches at the CN, deliveries) before exiting.
    /// Default `10s`.
    #[serde(with = "duration_str")]
    pub drain_timeout: Duration,
    /// `[devices]`: the device-facing QUIC server.
    pub devices: DevicesConfig,
    /// `[cn]`: the link to the operator's core network.
    pub cn: CnConfig,
    /// `[companion]`: the companion's own 3GPP credential.
    pub companion: CompanionConfig,
    /// `[control]`: the `gatewayctl` socket.
    pub control: ControlConfig,
    /// `[metrics]`: the Prometheus endpoint.
    pub metrics: MetricsConfig,
    /// `[batching]`: how requests are grouped towards the CN.
    pub batching: BatchingConfig,
    /// `[credentials]`: the child credentials asked for and their renewal.
    pub credentials: CredentialsConfig,
    /// `[pairing]`: the pairing window.
    pub pairing: PairingConfig,
    /// `[filter]`: the LAN filter.
    pub filter: FilterConfig,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            state_dir: PathBuf::from("/var/lib/gatewayd"),
            log_level: "info".into(),
            drain_timeout: Duration::from_secs(10),
            devices: DevicesConfig::default(),
            cn: CnConfig::default(),
            companion: CompanionConfig::default(),
            control: ControlConfig::default(),
            metrics: MetricsConfig::default(),
            batching: BatchingConfig::default(),
            credentials: CredentialsConfig::default(),
            pairing: PairingConfig::default(),
            filter: FilterConfig::default(),
        }
    }
}

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
        }
    }
}

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
    fn validate_endpoints(&self) -> Result<(), ConfigError> {
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

/// The Unix control socket `gatewayctl` talks to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ControlConfig {
    /// Default `/run/gatewayd/control.sock`.
    pub socket: PathBuf,
    /// Group (name) whose members may use the socket besides root and the daemon's own user.
    /// Default: none.
    pub group: Option<String>,
}

impl Default for ControlConfig {
    fn default() -> Self {
        Self {
            socket: PathBuf::from("/run/gatewayd/control.sock"),
            group: None,
        }
    }
}

/// The Prometheus endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// Default `true`.
    pub enabled: bool,
    /// TCP address serving `GET /metrics` and `GET /healthz`. Default `127.0.0.1:9464`.
    pub listen: SocketAddr,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            listen: SocketAddr::from(([127, 0, 0, 1], 9464)),
        }
    }
}

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

impl Config {
    /// Parses TOML text; `origin` names it in errors.
    pub fn from_toml_str(text: &str, origin: &str) -> Result<Self, ConfigError> {
        let cfg: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: origin.to_string(),
            message: e.to_string().trim_end().to_string(),
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Reads and validates `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_toml_str(&text, &path.display().to_string())
    }

    /// `path` if given (it must exist); otherwise [`DEFAULT_PATH`] if it exists, else the
    /// defaults. Returns the file actually read, if any.
    pub fn load_or_default(path: Option<&Path>) -> Result<(Self, Option<PathBuf>), ConfigError> {
        match path {
            Some(p) => Ok((Self::load(p)?, Some(p.to_path_buf()))),
            None => {
                let p = Path::new(DEFAULT_PATH);
                if p.exists() {
                    Ok((Self::load(p)?, Some(p.to_path_buf())))
                } else {
                    Ok((Self::default(), None))
                }
            }
        }
    }

    /// Applies the `GATEWAYD_*` overrides from the process environment.
    pub fn apply_env(&mut self) -> Result<(), ConfigError> {
        self.apply_env_from(|k| std::env::var(k).ok())
    }

    /// Applies the `GATEWAYD_*` overrides read through `get` (testable form of [`Config::apply_env`]).
    pub fn apply_env_from(
        &mut self,
        get: impl Fn(&str) -> Option<String>,
    ) -> Result<(), ConfigError> {
        let addr = |var: &'static str, value: String| {
            value.parse::<SocketAddr>().map_err(|e| ConfigError::Env {
                var,
                value,
                message: e.to_string(),
            })
        };
        if let Some(v) = get("GATEWAYD_DEVICE_LISTEN") {
            self.devices.listen = addr("GATEWAYD_DEVICE_LISTEN", v)?;
        }
        if let Some(v) = get("GATEWAYD_METRICS_LISTEN") {
            self.metrics.listen = addr("GATEWAYD_METRICS_LISTEN", v)?;
        }
        if let Some(v) = get("GATEWAYD_STATE_DIR") {
            self.state_dir = PathBuf::from(v);
        }
        if let Some(v) = get("GATEWAYD_CONTROL_SOCKET") {
            self.control.socket = PathBuf::from(v);
        }
        self.validate()
    }

    /// Range and consistency checks.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |m: &str| Err(ConfigError::Invalid(m.to_string()));
        self.batching
            .batcher()
            .validate()
            .map_err(|m| ConfigError::Invalid(format!("[batching] {m}")))?;
        if self.devices.max_connections == 0 {
            return invalid("[devices] max_connections must be at least 1");
        }
        if self.devices.stream_timeout.is_zero() || self.devices.max_connections_per_device == 0 {
            return invalid(
                "[devices] stream_timeout must be longer than 0s and max_connections_per_device at least 1",
            );
        }
        if self.cn.sessions == 0 || self.cn.sessions > 16 {
            return invalid("[cn] sessions must be between 1 and 16");
        }
        if self.cn.reconnect_min.is_zero() || self.cn.reconnect_max < self.cn.reconnect_min {
            return invalid("[cn] reconnect_min must be > 0s and at most reconnect_max");
        }
        if self.cn.request_timeout.is_zero() {
            return invalid("[cn] request_timeout must be longer than 0s");
        }
        if self.log_level.trim().is_empty() {
            return invalid("log_level must not be empty");
        }
        if self.devices.idle_timeout.is_zero() {
            return invalid("[devices] idle_timeout must be longer than 0s");
        }
        if self.pairing.window.is_zero() || self.pairing.window > self.pairing.max_window {
            return invalid("[pairing] window must be longer than 0s and at most max_window");
        }
        if self.credentials.default_lifetime.is_zero() {
            return invalid("[credentials] default_lifetime must be longer than 0s");
        }
        if self.credentials.renewal_margin >= self.credentials.default_lifetime {
            return invalid("[credentials] renewal_margin must be shorter than default_lifetime");
        }
        if self.state_dir.as_os_str().is_empty() {
            return invalid("state_dir must not be empty");
        }
        self.cn.validate_endpoints()?;
        if self.filter.allowed_sources.len() > companion_filter_common::PAIRED_MAX as usize / 2 {
            return Err(ConfigError::Invalid(format!(
                "[filter] allowed_sources lists {} addresses; at most {} fit (the other half of \
                 the eBPF paired-source map is kept for addresses learned from paired devices): \
                 list fewer, or rely on learning",
                self.filter.allowed_sources.len(),
                companion_filter_common::PAIRED_MAX / 2
            )));
        }
        if self.filter.block_for.is_zero() || self.filter.failure_window.is_zero() {
            return invalid("[filter] block_for and failure_window must be longer than 0s");
        }
        if self.devices.retry_load_handshakes == 0 {
            return invalid("[devices] retry_load_handshakes must be at least 1");
        }
        if !(16..=MAX_TRACKED_SOURCES).contains(&self.filter.max_tracked_sources) {
            return Err(ConfigError::Invalid(format!(
                "[filter] max_tracked_sources = {} is out of range: set it between 16 and {} \
                 (the size of the eBPF bucket map)",
                self.filter.max_tracked_sources, MAX_TRACKED_SOURCES
            )));
        }
        if self
            .filter
            .interfaces
            .iter()
            .any(|i| i.is_empty() || i.len() > 15)
        {
            return invalid("[filter] interfaces must be interface names (1 to 15 characters)");
        }
        if matches!(&self.control.group, Some(g) if g.is_empty()) {
            return invalid("[control] group must not be empty (omit it for no group)");
        }
        Ok(())
    }

    /// Path of the SQLite database inside the state directory.
    pub fn database_path(&self) -> PathBuf {
        self.state_dir.join(crate::state::DB_FILE)
    }
}

/// `Duration` as a humantime string (`"30s"`, `"2h 5m"`, `"30days"`).
pub mod duration_str {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer, de::Error as _};

    /// Writes `d` as a humantime string.
    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }

    /// Reads a humantime string.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_duration(&text).map_err(|e| {
            D::Error::custom(format!(
                "invalid duration {text:?}: {e} (examples: \"30s\", \"10m\", \"1day\")"
            ))
        })
    }
}

#[cfg(test)]
mod tests;
