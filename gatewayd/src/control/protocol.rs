//! The messages of the control protocol: [`Request`], [`Response`] and what they carry (the
//! device listing, the status report, error categories).

use std::net::IpAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::pairing::WindowStatus;
use crate::state::{Block, HeldCredential, PairedVia, Pairing, UnixTime};

/// A request from `gatewayctl`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Pair a device from its pairing code.
    Pair {
        /// The `CPN:` pairing code.
        code: String,
        /// The owner's name for the device.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        label: Option<String>,
    },
    /// Open the pairing window; `None` = the configured default length.
    OpenWindow {
        /// Window length in seconds.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        seconds: Option<u64>,
    },
    /// List paired devices.
    Devices,
    /// Unpair a device and revoke its credential at the CN.
    Revoke {
        /// The device ID.
        device: String,
    },
    /// Daemon status.
    Status,
    /// Block a LAN address, for `seconds` or indefinitely.
    Block {
        /// The LAN address to block.
        addr: IpAddr,
        /// Block length in seconds; `None` = until unblocked.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        seconds: Option<u64>,
    },
    /// Lift a block.
    Unblock {
        /// The blocked address.
        addr: IpAddr,
    },
}

/// Where a device stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceStatus {
    /// Paired, no credential yet.
    Paired,
    /// A request is at the CN (or queued for it).
    Requesting,
    /// A credential was issued and waits for the device to fetch/acknowledge it.
    DeliveryPending,
    /// The device holds an acknowledged, valid credential.
    Provisioned,
    /// The credential expires within the renewal margin.
    Expiring,
    /// The credential has expired.
    Expired,
}

impl DeviceStatus {
    /// The status as `gatewayctl devices` prints it.
    pub fn as_str(self) -> &'static str {
        match self {
            DeviceStatus::Paired => "paired",
            DeviceStatus::Requesting => "requesting",
            DeviceStatus::DeliveryPending => "delivery pending",
            DeviceStatus::Provisioned => "provisioned",
            DeviceStatus::Expiring => "expiring",
            DeviceStatus::Expired => "expired",
        }
    }
}

/// One device, as listed by `gatewayctl devices`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceInfo {
    /// The device ID.
    pub device: String,
    /// The owner's name for the device.
    pub label: Option<String>,
    /// SHA-256 of the device key's SPKI, hex.
    pub fingerprint: String,
    /// When the device was paired.
    pub paired_at: UnixTime,
    /// How the device was paired.
    pub paired_via: PairedVia,
    /// The child credential's SUPI, if one was issued.
    pub supi: Option<String>,
    /// When the child credential expires, if one was issued.
    pub expires_at: Option<UnixTime>,
    /// Where the device stands.
    pub status: DeviceStatus,
}

impl DeviceInfo {
    /// Builds the listing entry from what the state knows about a device.
    pub fn build(
        p: &Pairing,
        credential: Option<&HeldCredential>,
        request_outstanding: bool,
        now: UnixTime,
        renewal_margin: Duration,
    ) -> Self {
        let status = match credential {
            _ if request_outstanding => DeviceStatus::Requesting,
            None => DeviceStatus::Paired,
            Some(c) if c.expires_at <= now => DeviceStatus::Expired,
            Some(c) if c.acknowledged_at.is_none() => DeviceStatus::DeliveryPending,
            Some(c) if c.expires_at - now <= renewal_margin.as_secs() as i64 => {
                DeviceStatus::Expiring
            }
            Some(_) => DeviceStatus::Provisioned,
        };
        Self {
            device: p.device_id.to_string(),
            label: p.label.clone(),
            fingerprint: hex::encode(p.fingerprint),
            paired_at: p.paired_at,
            paired_via: p.paired_via,
            supi: credential.map(|c| c.supi.to_string()),
            expires_at: credential.map(|c| c.expires_at),
            status,
        }
    }
}

/// Every paired device as [`DeviceInfo`], from the database: what a daemon's
/// [`ControlHandler::devices`](super::ControlHandler::devices) answers.
pub fn list_devices(
    state: &crate::state::State,
    now: UnixTime,
    renewal_margin: Duration,
) -> Result<Vec<DeviceInfo>, crate::state::StateError> {
    let credentials: std::collections::HashMap<_, _> = state
        .credentials()?
        .into_iter()
        .map(|c| (c.device_id.clone(), c))
        .collect();
    let requesting: std::collections::HashSet<_> = state
        .outstanding_requests()?
        .into_iter()
        .map(|r| r.device_id)
        .collect();
    Ok(state
        .pairings()?
        .iter()
        .map(|p| {
            DeviceInfo::build(
                p,
                credentials.get(&p.device_id),
                requesting.contains(&p.device_id),
                now,
                renewal_margin,
            )
        })
        .collect())
}

/// State of the link to the CN.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CnLinkState {
    /// No `[cn] endpoint` configured.
    NotConfigured,
    /// Connecting or authenticating (AKA under way).
    Connecting,
    /// Connected and authenticated (AKA done).
    Up,
    /// Unreachable or refused; reconnecting with backoff.
    Down,
}

impl CnLinkState {
    /// The state as `gatewayctl status` prints it.
    pub fn as_str(self) -> &'static str {
        match self {
            CnLinkState::NotConfigured => "not configured",
            CnLinkState::Connecting => "connecting",
            CnLinkState::Up => "up",
            CnLinkState::Down => "down",
        }
    }
}

/// What `gatewayctl status` shows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusInfo {
    /// The daemon's version.
    pub version: String,
    /// Seconds since the daemon started.
    pub uptime_secs: u64,
    /// The companion's own SUPI.
    pub companion_supi: Option<String>,
    /// SHA-256 of the gateway's TLS key (devices pin it), hex.
    pub gateway_fingerprint: Option<String>,
    /// The link to the CN.
    pub cn_link: CnLinkState,
    /// Paired devices.
    pub devices_paired: u64,
    /// Devices holding a child credential.
    pub credentials_held: u64,
    /// Credentials expiring within 24 hours.
    pub credentials_expiring_24h: u64,
    /// Sealed credentials waiting for their device's acknowledgement.
    pub deliveries_pending: u64,
    /// Requests the CN has not answered yet.
    pub requests_outstanding: u64,
    /// Revocations the CN has not confirmed yet.
    pub revocations_unconfirmed: u64,
    /// Requests queued for the next batch.
    pub queue_depth: u64,
    /// Open device connections.
    pub active_connections: u64,
    /// The pairing window, while open.
    pub pairing_window: Option<WindowStatus>,
    /// The owner's blocks in force.
    pub blocks: Vec<Block>,
    /// The smart batcher's limits and load (absent from daemons that predate it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batching: Option<BatchingStatus>,
    /// The LAN filter: mode (xdp, xdp_generic, tc, userspace) and per-reason counters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filter: Option<Box<crate::filter::FilterStatus>>,
    /// Each CN session slot: the endpoint it uses and its state (absent from older daemons).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cn_sessions: Vec<crate::cn_link::CnSessionInfo>,
    /// Each configured CN endpoint: sessions, failures, backoff (absent from older daemons).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cn_endpoints: Vec<crate::cn_link::CnEndpointInfo>,
}

/// Batching limits in force and the batcher's load, for `gatewayctl status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchingStatus {
    /// Most requests in one batch.
    pub max_batch: usize,
    /// Longest a request waits for its batch to fill, milliseconds.
    pub max_wait_ms: u64,
    /// Most batches at the CN at once.
    pub max_in_flight: usize,
    /// Most requests queued before new ones are refused.
    pub queue_capacity: usize,
    /// Batches sent to the CN and not answered yet.
    pub batches_in_flight: usize,
}

/// What happened at the CN when a device was revoked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "state")]
pub enum CnRevocation {
    /// The CN revoked the credential.
    Revoked,
    /// The device held no credential; nothing to revoke at the CN.
    NoCredential,
    /// Not confirmed yet (CN unreachable); retried until it is.
    Pending {
        /// Why the CN has not confirmed.
        reason: String,
    },
}

/// Error categories, for scripts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// Malformed request (not JSON, unknown op, bad field).
    BadRequest,
    /// The pairing code does not parse.
    PairingCode,
    /// Pairing refused (already paired, window too long, ...).
    Pairing,
    /// No such device.
    NotFound,
    /// The peer may not use the control socket.
    Forbidden,
    /// A dependency (the CN, the database) is unavailable; retry later.
    Unavailable,
    /// A bug or an unexpected failure inside the daemon.
    Internal,
}

/// A refused or failed request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct ControlError {
    /// The category.
    pub kind: ErrorKind,
    /// What went wrong, for the owner.
    pub message: String,
}

impl ControlError {
    /// An error of `kind` with `message`.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }
}

impl From<crate::pairing::PairingError> for ControlError {
    fn from(e: crate::pairing::PairingError) -> Self {
        use crate::pairing::PairingError as P;
        let kind = match &e {
            P::Code(_) => ErrorKind::PairingCode,
            P::NotPaired(_) => ErrorKind::NotFound,
            P::State(_) => ErrorKind::Internal,
            _ => ErrorKind::Pairing,
        };
        Self::new(kind, e.to_string())
    }
}

impl From<crate::state::StateError> for ControlError {
    fn from(e: crate::state::StateError) -> Self {
        Self::new(ErrorKind::Internal, e.to_string())
    }
}

/// A response to `gatewayctl`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Response {
    /// The device is paired.
    Paired {
        /// `false` when the device was already paired with this key (label updated).
        new: bool,
        /// The device as now listed.
        device: DeviceInfo,
    },
    /// The pairing window is open.
    WindowOpened {
        /// The window's code and end.
        window: WindowStatus,
    },
    /// The paired devices.
    Devices {
        /// One entry per device, by device ID.
        devices: Vec<DeviceInfo>,
    },
    /// The device is unpaired.
    Revoked {
        /// The device ID.
        device: String,
        /// The child credential it held, if any.
        supi: Option<String>,
        /// What happened at the CN.
        cn: CnRevocation,
    },
    /// The daemon's status.
    Status {
        /// The status.
        status: StatusInfo,
    },
    /// The address is blocked.
    Blocked {
        /// The block as stored.
        block: Block,
    },
    /// The block is lifted.
    Unblocked {
        /// The address.
        addr: IpAddr,
        /// Whether a block was in force.
        was_blocked: bool,
    },
    /// The request was refused or failed.
    Error {
        /// The category.
        kind: ErrorKind,
        /// What went wrong, for the owner.
        message: String,
    },
}

impl From<ControlError> for Response {
    fn from(e: ControlError) -> Self {
        Response::Error {
            kind: e.kind,
            message: e.message,
        }
    }
}
