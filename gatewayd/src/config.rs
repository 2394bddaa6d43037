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
//!
//! Files: `config.rs` (the whole file, loading, overrides, validation, `[control]`, `[metrics]`),
//! `config/lan.rs` (`[devices]`, `[filter]`), `config/cn.rs` (`[cn]`, `[companion]`),
//! `config/provisioning.rs` (`[batching]`, `[credentials]`, `[pairing]`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

mod cn;
mod lan;
mod provisioning;

pub use cn::{CnConfig, CompanionConfig, MAX_CN_ENDPOINTS};
pub use lan::{DevicesConfig, FilterConfig, FilterModeSetting, MAX_TRACKED_SOURCES, RetryPolicy};
pub use provisioning::{BatchingConfig, CredentialsConfig, PairingConfig};

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
        if self.devices.max_handshakes == 0 {
            return invalid(
                "[devices] max_handshakes must be at least 1 (64 suits most routers; raise it \
                 on machines with many cores)",
            );
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
