//! The service configuration (`cn-backend.toml` in the data directory) and the directory layout.
//!
//! Every key is optional: a missing file or key takes the default documented in
//! [`TEMPLATE`], which `cn-backend init` writes with the values it was given.

mod sync;

pub use sync::{Open5gsSettings, SyncSettings};

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use thiserror::Error;

use crate::model::{ImsiRange, ModelError};

/// Default QUIC listen address.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:4433";
/// Default admin HTTP listen address.
pub const DEFAULT_HTTP_LISTEN: &str = "127.0.0.1:8480";
/// Default data directory.
pub const DEFAULT_DIR: &str = "/var/lib/cn-backend";

/// Files of a data directory.
#[derive(Debug, Clone)]
pub struct Layout {
    /// The directory.
    pub dir: PathBuf,
    /// `--store URL`: the database to use instead of `[store] url` of the configuration (and
    /// of the SQLite file of the directory).
    pub store_url: Option<String>,
}

impl Layout {
    /// The layout of `dir`.
    pub fn new(dir: &Path) -> Self {
        Layout {
            dir: dir.to_owned(),
            store_url: None,
        }
    }
    /// `cn-backend.toml`.
    pub fn config(&self) -> PathBuf {
        self.dir.join("cn-backend.toml")
    }
    /// `kek.key`: the key-encryption key (0600).
    pub fn kek(&self) -> PathBuf {
        self.dir.join("kek.key")
    }
    /// `op.key`: the operator variant OP, 32 hex digits (0600).
    pub fn op(&self) -> PathBuf {
        self.dir.join("op.key")
    }
    /// `ca.pem`: the operator CA certificate.
    pub fn ca_cert(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }
    /// `ca.key`: the operator CA key (0600).
    pub fn ca_key(&self) -> PathBuf {
        self.dir.join("ca.key")
    }
    /// `server.pem`: the CN's certificate chain.
    pub fn server_cert(&self) -> PathBuf {
        self.dir.join("server.pem")
    }
    /// `server.key`: the CN's TLS key (0600).
    pub fn server_key(&self) -> PathBuf {
        self.dir.join("server.key")
    }
    /// `reset.key`: the QUIC stateless-reset key (0600), kept across restarts so a gateway whose
    /// connection outlived a restart learns at its next packet that the connection is gone.
    pub fn reset_key(&self) -> PathBuf {
        self.dir.join("reset.key")
    }

    /// `admin.token`: the admin API bearer token (0600).
    pub fn admin_token(&self) -> PathBuf {
        self.dir.join("admin.token")
    }
    /// `cn-backend.db`: the SQLite database.
    pub fn database(&self) -> PathBuf {
        self.dir.join("cn-backend.db")
    }
}

/// Configuration errors.
#[derive(Debug, Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema.
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message.
        message: String,
    },
    /// A value is out of range.
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

fn default_mcc() -> String {
    "001".into()
}
fn default_mnc() -> String {
    "01".into()
}
fn default_imsi_start() -> u64 {
    900_000_000
}
fn default_imsi_count() -> u64 {
    99_999_999
}
fn default_server_names() -> Vec<String> {
    vec!["localhost".into(), "127.0.0.1".into()]
}
fn default_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 4433))
}
fn default_http_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8480))
}
fn default_max_batch_items() -> usize {
    crate::ops::DEFAULT_MAX_BATCH_ITEMS
}
fn default_max_lifetime() -> String {
    "90d".into()
}
fn default_child_allocation_limit() -> u32 {
    crate::policy::DEFAULT_ALLOCATION_MAX
}
fn default_child_allocation_window() -> String {
    "1h".into()
}
fn default_max_failures() -> u32 {
    5
}
fn default_lockout() -> String {
    "60s".into()
}
fn default_addr_max_failures() -> u32 {
    20
}
fn default_max_sessions() -> usize {
    10_000
}
fn default_max_per_address() -> usize {
    256
}
fn default_timeout() -> String {
    "30s".into()
}
fn default_drain() -> String {
    "30s".into()
}

/// `[store]` of `cn-backend.toml`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreSettings {
    /// `postgres://…` for the PostgreSQL engine; empty for the SQLite file of the data
    /// directory.
    #[serde(default)]
    pub url: String,
}

/// `cn-backend.toml`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// Home PLMN MCC.
    #[serde(default = "default_mcc")]
    pub mcc: String,
    /// Home PLMN MNC (2 or 3 digits).
    #[serde(default = "default_mnc")]
    pub mnc: String,
    /// First MSIN of the child credential range.
    #[serde(default = "default_imsi_start")]
    pub imsi_start: u64,
    /// Number of SUPIs in the child range.
    #[serde(default = "default_imsi_count")]
    pub imsi_count: u64,
    /// Names in the server certificate; the first is the attach server name put in bundles.
    #[serde(default = "default_server_names")]
    pub server_names: Vec<String>,
    /// QUIC listen address (both ALPNs).
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Admin HTTP listen address.
    #[serde(default = "default_http_listen")]
    pub http_listen: SocketAddr,
    /// `host:port` devices attach to, put in every bundle; empty = the first server name and
    /// the bound QUIC port.
    #[serde(default)]
    pub attach_endpoint: String,
    /// Most items in one batch.
    #[serde(default = "default_max_batch_items")]
    pub max_batch_items: usize,
    /// `[store]`: which database (default: the SQLite file of the data directory).
    #[serde(default)]
    pub store: StoreSettings,
    /// Operator-wide longest credential lifetime (humantime, e.g. `90d`).
    #[serde(default = "default_max_lifetime")]
    pub max_lifetime: String,
    /// Most new child credentials (SUPIs) one parent may get within `child_allocation_window`.
    #[serde(default = "default_child_allocation_limit")]
    pub child_allocation_limit: u32,
    /// The sliding window of `child_allocation_limit` (humantime, e.g. `1h`).
    #[serde(default = "default_child_allocation_window")]
    pub child_allocation_window: String,
    /// Failed verifications (wrong RES*, binding or AUTS) of one SUPI from one source prefix
    /// (IPv4 /24, IPv6 /56) before the SUPI is locked out for that prefix.
    #[serde(default = "default_max_failures")]
    pub aka_max_failures: u32,
    /// How long a (SUPI, source prefix) or a source prefix stays locked out, and the window
    /// failures are counted in.
    #[serde(default = "default_lockout")]
    pub aka_lockout: String,
    /// Failures from one source prefix (any SUPI, unknown SUPIs too) before the prefix is
    /// locked out.
    #[serde(default = "default_addr_max_failures")]
    pub aka_addr_max_failures: u32,
    /// Most concurrent connections (gateway sessions and attaches).
    #[serde(default = "default_max_sessions")]
    pub max_connections: usize,
    /// Most concurrent connections from one source address (IPv4 address, IPv6 /64), counted
    /// from the first packet (before the handshake completes): one address cannot take the
    /// slots of `max_connections`. Raise it when many gateways share an address (CGNAT).
    #[serde(default = "default_max_per_address")]
    pub max_connections_per_address: usize,
    /// Longest silence of a peer within one exchange.
    #[serde(default = "default_timeout")]
    pub exchange_timeout: String,
    /// How long shutdown waits for in-flight batches.
    #[serde(default = "default_drain")]
    pub drain_timeout: String,
    /// `[sync]`: 5G core subscriber stores kept in step (none by default).
    #[serde(default)]
    pub sync: SyncSettings,
}

impl Default for Settings {
    fn default() -> Self {
        // An empty document takes every default.
        toml::from_str::<Settings>("").unwrap_or_else(|_| Settings {
            mcc: default_mcc(),
            mnc: default_mnc(),
            imsi_start: default_imsi_start(),
            imsi_count: default_imsi_count(),
            server_names: default_server_names(),
            listen: default_listen(),
            http_listen: default_http_listen(),
            attach_endpoint: String::new(),
            max_batch_items: default_max_batch_items(),
            store: StoreSettings::default(),
            max_lifetime: default_max_lifetime(),
            child_allocation_limit: default_child_allocation_limit(),
            child_allocation_window: default_child_allocation_window(),
            aka_max_failures: default_max_failures(),
            aka_lockout: default_lockout(),
            aka_addr_max_failures: default_addr_max_failures(),
            max_connections: default_max_sessions(),
            max_connections_per_address: default_max_per_address(),
            exchange_timeout: default_timeout(),
            drain_timeout: default_drain(),
            sync: SyncSettings::default(),
        })
    }
}

fn duration(name: &str, s: &str) -> Result<Duration, ConfigError> {
    humantime::parse_duration(s)
        .map_err(|e| ConfigError::Invalid(format!("{name} = {s:?}: {e} (e.g. \"30s\", \"90d\")")))
}

impl Settings {
    /// Reads `path`; a missing file gives the defaults.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Self::default()),
            Err(source) => {
                return Err(ConfigError::Io {
                    path: path.to_owned(),
                    source,
                });
            }
        };
        let s: Settings = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        s.validate()?;
        Ok(s)
    }

    /// Checks ranges and durations.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.imsi_range()?;
        if let Some(o5) = &self.sync.open5gs {
            o5.validate()?;
        }
        if self.server_names.is_empty() {
            return Err(ConfigError::Invalid(
                "server_names needs at least one name".into(),
            ));
        }
        if !(1..=crate::ops::DEFAULT_MAX_BATCH_ITEMS * 16).contains(&self.max_batch_items) {
            return Err(ConfigError::Invalid(
                "max_batch_items must be between 1 and 4096".into(),
            ));
        }
        if self.aka_max_failures == 0 || self.aka_addr_max_failures == 0 {
            return Err(ConfigError::Invalid(
                "aka_max_failures and aka_addr_max_failures must be at least 1".into(),
            ));
        }
        if self.child_allocation_limit == 0 {
            return Err(ConfigError::Invalid(
                "child_allocation_limit must be at least 1".into(),
            ));
        }
        if self.max_connections == 0 || self.max_connections_per_address == 0 {
            return Err(ConfigError::Invalid(
                "max_connections and max_connections_per_address must be at least 1".into(),
            ));
        }
        self.max_lifetime()?;
        self.child_allocation_window()?;
        self.aka_lockout()?;
        self.exchange_timeout()?;
        self.drain_timeout()?;
        Ok(())
    }

    /// The child IMSI range.
    pub fn imsi_range(&self) -> Result<ImsiRange, ConfigError> {
        let last = self
            .imsi_start
            .checked_add(self.imsi_count.saturating_sub(1))
            .filter(|_| self.imsi_count > 0)
            .ok_or_else(|| ConfigError::Invalid("imsi_count must be at least 1".into()))?;
        ImsiRange::new(&self.mcc, &self.mnc, self.imsi_start, last)
            .map_err(|e: ModelError| ConfigError::Invalid(e.to_string()))
    }

    /// Operator maximum lifetime.
    pub fn max_lifetime(&self) -> Result<Duration, ConfigError> {
        let d = duration("max_lifetime", &self.max_lifetime)?;
        if d.as_secs() == 0 {
            return Err(ConfigError::Invalid(
                "max_lifetime must be at least 1s".into(),
            ));
        }
        Ok(d)
    }

    /// The window of the per-parent allocation cap (at least 1 s).
    pub fn child_allocation_window(&self) -> Result<Duration, ConfigError> {
        let d = duration("child_allocation_window", &self.child_allocation_window)?;
        if d.as_secs() == 0 {
            return Err(ConfigError::Invalid(
                "child_allocation_window must be at least 1s".into(),
            ));
        }
        Ok(d)
    }

    /// AKA lock-out period.
    pub fn aka_lockout(&self) -> Result<Duration, ConfigError> {
        duration("aka_lockout", &self.aka_lockout)
    }

    /// Per-exchange timeout.
    pub fn exchange_timeout(&self) -> Result<Duration, ConfigError> {
        duration("exchange_timeout", &self.exchange_timeout)
    }

    /// Shutdown drain limit.
    pub fn drain_timeout(&self) -> Result<Duration, ConfigError> {
        duration("drain_timeout", &self.drain_timeout)
    }

    /// The commented file `init` writes.
    pub fn to_toml(&self) -> String {
        let names = self
            .server_names
            .iter()
            .map(|n| format!("{n:?}"))
            .collect::<Vec<_>>()
            .join(", ");
        TEMPLATE
            .replace("@MCC@", &format!("{:?}", self.mcc))
            .replace("@MNC@", &format!("{:?}", self.mnc))
            .replace("@IMSI_START@", &self.imsi_start.to_string())
            .replace("@IMSI_COUNT@", &self.imsi_count.to_string())
            .replace("@SERVER_NAMES@", &names)
            .replace("@LISTEN@", &format!("{:?}", self.listen.to_string()))
            .replace(
                "@HTTP_LISTEN@",
                &format!("{:?}", self.http_listen.to_string()),
            )
            + &if self.store.url.is_empty() {
                STORE_TEMPLATE.replace(
                    "@STORE@",
                    "# store = { url = \"postgres://cn-backend@/cn?host=/run/postgresql\" }",
                )
            } else {
                STORE_TEMPLATE.replace(
                    "@STORE@",
                    &format!("store = {{ url = {:?} }}", self.store.url),
                )
            }
    }
}

/// The `store` key appended to [`TEMPLATE`]. Written as an inline table (`store = { url = … }`,
/// the same as a `[store]` table) so that keys appended to the file later stay top-level.
const STORE_TEMPLATE: &str = r#"
# The database. Default: the SQLite file cn-backend.db of this directory. A postgres:// URL
# selects PostgreSQL (docs/OPERATIONS.md, "PostgreSQL store"); `--store URL` overrides it.
# Without TLS only a Unix socket (?host=/dir) or a loopback address is accepted; otherwise add
# sslmode=verify-full&sslrootcert=/path/ca.pem. A password belongs in PGPASSWORD, not here.
# Same as a [store] table with the url key (which would have to come after every other key).
@STORE@

# Keep an Open5GS core's subscriber store (MongoDB) in step with the child credentials: add a
# [sync.open5gs] table at the end of this file (docs/OPERATIONS.md, "With Open5GS"), e.g.
# [sync.open5gs]
# uri = "mongodb://127.0.0.1:27017"
"#;

/// The configuration file written by `cn-backend init`; every key shows its default.
pub const TEMPLATE: &str = r#"# cn-backend configuration. Every key is optional; the comment above each one gives its
# default. `cn-backend serve --listen/--http-listen` override the two addresses.

# Home PLMN. Attaches whose serving network name names another PLMN are roaming.
# default: mcc = "001", mnc = "01"
mcc = @MCC@
mnc = @MNC@

# Child credentials get SUPIs imsi-<MCC><MNC><MSIN> with MSIN in
# imsi_start .. imsi_start + imsi_count - 1 (zero-padded to 15 digits in all). SUPIs are never
# reused. default: imsi_start = 900000000, imsi_count = 99999999
imsi_start = @IMSI_START@
imsi_count = @IMSI_COUNT@

# Names in the server certificate (DNS names or IP addresses). The first one is the TLS server
# name devices are told to verify when they attach. Changing this needs a new server.pem.
# default: ["localhost", "127.0.0.1"]
server_names = [@SERVER_NAMES@]

# QUIC endpoint for gateways (ALPN companion-cn/2) and device attach (companion-attach/1).
# default: "0.0.0.0:4433"
listen = @LISTEN@

# Admin HTTP API and /metrics, /healthz. Keep it on loopback or a management network.
# default: "127.0.0.1:8480"
http_listen = @HTTP_LISTEN@

# "host:port" put in every credential bundle as the attach endpoint.
# default: "" = the first server name and the port QUIC is bound to.
# attach_endpoint = "cn.example.net:4433"

# Most items accepted in one BatchProvision (1..4096). default: 256
# max_batch_items = 256

# Operator-wide longest credential lifetime; each subscription may allow less.
# default: "90d"
# max_lifetime = "90d"

# Per-parent cap on new child credentials: at most child_allocation_limit new SUPIs per parent
# subscription within any child_allocation_window (renewals keep their SUPI and do not count).
# The quota (max_children) bounds live credentials; this bounds how fast one companion can
# churn through the IMSI range by revoking and issuing again. Items over the cap are answered
# retry_later with the time until a slot frees (metric cn_backend_allocation_rate_limited_total).
# defaults: child_allocation_limit = 10000, child_allocation_window = "1h"
# child_allocation_limit = 10000
# child_allocation_window = "1h"

# AKA rate limiting: only the CN's own verification failing counts (wrong RES*, binding, AUTS),
# never an error the client sends. After aka_max_failures failures of one SUPI from one source
# prefix (IPv4 /24, IPv6 /56), new AKA for that SUPI from that prefix is refused (auth_failed
# with retry_after_ms) for aka_lockout; a prefix with aka_addr_max_failures failures (any SUPI)
# is refused for aka_lockout too. Other prefixes are never locked out by them.
# defaults: aka_max_failures = 5, aka_lockout = "60s", aka_addr_max_failures = 20
# aka_max_failures = 5
# aka_lockout = "60s"
# aka_addr_max_failures = 20

# Most concurrent QUIC connections, and most from one source address (IPv4 address, IPv6 /64);
# counted from the first packet. Past either, new connections are refused (QUIC
# CONNECTION_REFUSED; metric cn_backend_connections_refused_total{reason}). Raise the per-address
# cap when many gateways share one address (carrier-grade NAT).
# defaults: max_connections = 10000, max_connections_per_address = 256
# max_connections = 10000
# max_connections_per_address = 256

# Longest silence of a peer inside one exchange. default: "30s"
# exchange_timeout = "30s"

# On SIGTERM/SIGINT, how long to wait for in-flight batches to commit and be answered.
# default: "30s"
# drain_timeout = "30s"
"#;

#[cfg(test)]
mod tests;
