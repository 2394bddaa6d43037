//! The control protocol between `gatewayctl` and the daemon, over a Unix socket.
//!
//! JSON lines: the client writes one [`Request`] as a JSON object on one line, the server answers
//! with one [`Response`] on one line; a connection may carry several exchanges in turn. Requests
//! are tagged by `"op"`, responses by `"result"`:
//!
//! ```text
//! > {"op":"pair","code":"CPN:V:1;I:watch-1;K:MCow...;;","label":"kitchen"}
//! < {"result":"paired","new":true,"device":{"device":"watch-1",...}}
//! > {"op":"open_window","seconds":120}
//! < {"result":"window_opened","window":{"closes_at":1700000120,"remaining_secs":120,"code":"7KQ2M-X9D4T","wrong_codes":0}}
//! > {"op":"revoke","device":"nope"}
//! < {"result":"error","kind":"not_found","message":"device nope is not paired"}
//! ```
//!
//! Access: the socket is created 0660 with the configured group, and every connection's peer
//! credentials (`SO_PEERCRED`) must be uid 0, the daemon's own uid, or a member of that group
//! (primary or supplementary); anyone else gets a `forbidden` error and the connection is closed.
//!
//! The server validates what it can (pairing code syntax, device ID syntax, durations) and hands
//! typed values to a [`ControlHandler`], which the daemon implements.

use std::future::Future;
use std::io::{BufRead, BufReader as StdBufReader, Write};
use std::net::IpAddr;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use companion_proto::DeviceId;
use companion_proto::pairing::PairingCode;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use crate::pairing::WindowStatus;
use crate::state::{Block, HeldCredential, PairedVia, Pairing, UnixTime};

/// Longest request line, bytes (a pairing code is at most 2 KiB).
pub const MAX_LINE: usize = 16 * 1024;
/// A connection idle this long between requests is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

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
/// [`ControlHandler::devices`] answers.
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

/// Result of [`ControlHandler::pair`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PairOutcome {
    /// `false` when the device was already paired with this key (label updated).
    pub new: bool,
    /// The device as now listed.
    pub device: DeviceInfo,
}

/// Result of [`ControlHandler::revoke`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RevokeOutcome {
    /// The child credential the device held, if any.
    pub supi: Option<String>,
    /// What happened at the CN.
    pub cn: CnRevocation,
}

/// What the daemon does for each control request. Inputs are already validated.
pub trait ControlHandler: Send + Sync + 'static {
    /// Pair the device of `code` (see [`crate::pairing::PairingRegistry::pair_code`]).
    fn pair(
        &self,
        code: PairingCode,
        label: Option<String>,
    ) -> impl Future<Output = Result<PairOutcome, ControlError>> + Send;

    /// Open the pairing window for `duration`, or the configured default when `None`.
    fn open_window(
        &self,
        duration: Option<Duration>,
    ) -> impl Future<Output = Result<WindowStatus, ControlError>> + Send;

    /// Every paired device with its credential's state.
    fn devices(&self) -> impl Future<Output = Result<Vec<DeviceInfo>, ControlError>> + Send;

    /// Unpair `device` locally (at once, durably), close its connections, and revoke its
    /// credential at the CN — waiting a bounded time for the CN, answering
    /// [`CnRevocation::Pending`] if it does not confirm in time.
    fn revoke(
        &self,
        device: DeviceId,
    ) -> impl Future<Output = Result<RevokeOutcome, ControlError>> + Send;

    /// The daemon's status.
    fn status(&self) -> impl Future<Output = Result<StatusInfo, ControlError>> + Send;

    /// Store a block of `addr` for `duration` (`None` = until unblocked).
    fn block(
        &self,
        addr: IpAddr,
        duration: Option<Duration>,
    ) -> impl Future<Output = Result<Block, ControlError>> + Send;

    /// Lift a block; `Ok(false)` if there was none.
    fn unblock(&self, addr: IpAddr) -> impl Future<Output = Result<bool, ControlError>> + Send;
}

/// Validates `req` and runs it on `handler`.
pub async fn dispatch<H: ControlHandler>(handler: &H, req: Request) -> Response {
    let bad = |m: String| Response::from(ControlError::new(ErrorKind::BadRequest, m));
    let r = match req {
        Request::Pair { code, label } => {
            let code = match PairingCode::parse(&code) {
                Ok(c) => c,
                Err(e) => {
                    return ControlError::new(
                        ErrorKind::PairingCode,
                        format!("pairing code rejected: {e}"),
                    )
                    .into();
                }
            };
            handler.pair(code, label).await.map(|o| Response::Paired {
                new: o.new,
                device: o.device,
            })
        }
        Request::OpenWindow { seconds: Some(0) } => {
            return bad("pairing window must be longer than 0s".into());
        }
        Request::OpenWindow { seconds } => handler
            .open_window(seconds.map(Duration::from_secs))
            .await
            .map(|window| Response::WindowOpened { window }),
        Request::Devices => handler
            .devices()
            .await
            .map(|devices| Response::Devices { devices }),
        Request::Revoke { device } => {
            let id = match DeviceId::new(&device) {
                Ok(id) => id,
                Err(e) => return bad(e.to_string()),
            };
            handler.revoke(id).await.map(|o| Response::Revoked {
                device,
                supi: o.supi,
                cn: o.cn,
            })
        }
        Request::Status => handler
            .status()
            .await
            .map(|status| Response::Status { status }),
        Request::Block {
            seconds: Some(0), ..
        } => return bad("block duration must be longer than 0s".into()),
        Request::Block { addr, seconds } => handler
            .block(addr, seconds.map(Duration::from_secs))
            .await
            .map(|block| Response::Blocked { block }),
        Request::Unblock { addr } => handler
            .unblock(addr)
            .await
            .map(|was_blocked| Response::Unblocked { addr, was_blocked }),
    };
    r.unwrap_or_else(Response::from)
}

// ---------------------------------------------------------------------------------------------
// Access control

/// Who may use the socket besides root.
#[derive(Debug, Clone)]
pub struct AccessPolicy {
    /// The daemon's own (effective) uid.
    pub own_uid: u32,
    /// The allowed group: name, gid, and its listed members (from the group database).
    pub group: Option<AllowedGroup>,
}

/// The configured control group, resolved.
#[derive(Debug, Clone)]
pub struct AllowedGroup {
    /// The group's name.
    pub name: String,
    /// Its numeric ID.
    pub gid: u32,
    /// Its supplementary members' user names.
    pub members: Vec<String>,
}

/// A connecting process, as the kernel reports it.
#[derive(Debug, Clone)]
pub struct Peer {
    /// The peer's user ID.
    pub uid: u32,
    /// The peer's primary group ID.
    pub gid: u32,
    /// The peer's process ID, when the kernel reports it.
    pub pid: Option<i32>,
}

impl AccessPolicy {
    /// The daemon's uid, and `group` looked up in the group database.
    pub fn resolve(group: Option<&str>) -> Result<Self, ControlServerError> {
        let own_uid = nix::unistd::geteuid().as_raw();
        let group = match group {
            None => None,
            Some(name) => {
                let g = nix::unistd::Group::from_name(name)
                    .map_err(|e| ControlServerError::Group {
                        name: name.to_string(),
                        reason: e.to_string(),
                    })?
                    .ok_or_else(|| ControlServerError::Group {
                        name: name.to_string(),
                        reason:
                            "no such group (create it with `groupadd`, or change [control] group)"
                                .into(),
                    })?;
                Some(AllowedGroup {
                    name: name.to_string(),
                    gid: g.gid.as_raw(),
                    members: g.mem,
                })
            }
        };
        Ok(Self { own_uid, group })
    }

    /// Whether `peer` may use the socket. `supplementary` are the peer process's supplementary
    /// groups and `user_name` its login name, when known.
    pub fn allows(&self, peer: &Peer, supplementary: &[u32], user_name: Option<&str>) -> bool {
        if peer.uid == 0 || peer.uid == self.own_uid {
            return true;
        }
        let Some(g) = &self.group else { return false };
        peer.gid == g.gid
            || supplementary.contains(&g.gid)
            || user_name.is_some_and(|n| g.members.iter().any(|m| m == n))
    }

    fn check(&self, peer: &Peer) -> Result<(), ControlError> {
        let supplementary = peer.pid.map(supplementary_groups).unwrap_or_default();
        let name = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(peer.uid))
            .ok()
            .flatten()
            .map(|u| u.name);
        if self.allows(peer, &supplementary, name.as_deref()) {
            return Ok(());
        }
        let who = name.map_or_else(|| format!("uid {}", peer.uid), |n| format!("user {n}"));
        let how = match &self.group {
            Some(g) => format!(
                "root, gatewayd's own user or a member of group {:?}",
                g.name
            ),
            None => "root or gatewayd's own user (no [control] group is configured)".into(),
        };
        Err(ControlError::new(
            ErrorKind::Forbidden,
            format!("permission denied: {who} may not control gatewayd; only {how} may"),
        ))
    }
}

/// Supplementary groups of process `pid`, from `/proc/<pid>/status` (empty if unreadable).
fn supplementary_groups(pid: i32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("Groups:").map(|g| {
                    g.split_whitespace()
                        .filter_map(|x| x.parse().ok())
                        .collect()
                })
            })
        })
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------------------------
// Server

/// Why the control socket could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ControlServerError {
    /// The configured control group does not exist or cannot be read.
    #[error("control group {name:?}: {reason}")]
    Group {
        /// The configured group.
        name: String,
        /// Why it cannot be used.
        reason: String,
    },
    /// The socket could not be created or its permissions set.
    #[error("control socket {path}: {source}")]
    Io {
        /// The socket path.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// Another process answers on the socket.
    #[error("control socket {0} is in use: another gatewayd is running")]
    InUse(PathBuf),
    /// The path exists and is something else.
    #[error("{0} exists and is not a socket; remove it or change [control] socket")]
    NotASocket(PathBuf),
}

/// The listening control socket. Dropping it removes the socket file.
#[derive(Debug)]
pub struct ControlServer {
    listener: UnixListener,
    path: PathBuf,
    access: Arc<AccessPolicy>,
}

impl ControlServer {
    /// Binds `path` (creating its directory), mode 0660, group `access.group`. A stale socket
    /// left by a crashed daemon is replaced; a live one is an error. Must run inside a tokio
    /// runtime.
    pub fn bind(path: &Path, access: AccessPolicy) -> Result<Self, ControlServerError> {
        let io = |source| ControlServerError::Io {
            path: path.to_path_buf(),
            source,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| ControlServerError::Io {
                path: dir.to_path_buf(),
                source,
            })?;
        }
        match std::fs::symlink_metadata(path) {
            Ok(m) if m.file_type().is_socket() => {
                if std::os::unix::net::UnixStream::connect(path).is_ok() {
                    return Err(ControlServerError::InUse(path.to_path_buf()));
                }
                std::fs::remove_file(path).map_err(io)?;
            }
            Ok(_) => return Err(ControlServerError::NotASocket(path.to_path_buf())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(e)),
        }
        let listener = UnixListener::bind(path).map_err(io)?;
        // From here on the file is ours: remove it again if setup fails.
        let server = Self {
            listener,
            path: path.to_path_buf(),
            access: Arc::new(access),
        };
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660)).map_err(io)?;
        if let Some(g) = &server.access.group {
            std::os::unix::fs::chown(path, None, Some(g.gid)).map_err(io)?;
        }
        Ok(server)
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Accepts connections until `shutdown` completes; each runs on its own task.
    pub async fn serve<H: ControlHandler>(
        self,
        handler: Arc<H>,
        shutdown: impl Future<Output = ()>,
    ) {
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                accepted = self.listener.accept() => {
                    let Ok((stream, _)) = accepted else {
                        // EMFILE and friends: back off briefly instead of spinning.
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    };
                    let handler = handler.clone();
                    let access = self.access.clone();
                    tokio::spawn(async move {
                        let _ = serve_connection(stream, &*handler, &access).await;
                    });
                }
            }
        }
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

async fn write_response(
    stream: &mut (impl AsyncWriteExt + Unpin),
    r: &Response,
) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(r).map_err(std::io::Error::other)?;
    line.push(b'\n');
    stream.write_all(&line).await?;
    stream.flush().await
}

async fn serve_connection<H: ControlHandler>(
    stream: UnixStream,
    handler: &H,
    access: &AccessPolicy,
) -> std::io::Result<()> {
    let cred = stream.peer_cred()?;
    let peer = Peer {
        uid: cred.uid(),
        gid: cred.gid(),
        pid: cred.pid(),
    };
    let (read, mut write) = stream.into_split();
    if let Err(e) = access.check(&peer) {
        return write_response(&mut write, &e.into()).await;
    }
    let mut reader = BufReader::new(read);
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = match tokio::time::timeout(
            IDLE_TIMEOUT,
            (&mut reader)
                .take(MAX_LINE as u64 + 1)
                .read_until(b'\n', &mut line),
        )
        .await
        {
            Ok(r) => r?,
            Err(_) => return Ok(()),
        };
        if n == 0 {
            return Ok(());
        }
        if line.last() != Some(&b'\n') {
            let e = ControlError::new(
                ErrorKind::BadRequest,
                format!("request longer than {MAX_LINE} bytes or not newline-terminated"),
            );
            return write_response(&mut write, &e.into()).await;
        }
        let response = match serde_json::from_slice::<Request>(&line) {
            Ok(req) => dispatch(handler, req).await,
            Err(e) => {
                ControlError::new(ErrorKind::BadRequest, format!("invalid request: {e}")).into()
            }
        };
        write_response(&mut write, &response).await?;
    }
}

// ---------------------------------------------------------------------------------------------
// Client

/// Why `gatewayctl` could not get an answer.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The socket could not be connected to. (The I/O error is part of the message, not a
    /// `source`, so `{:#}` chains do not repeat it.)
    #[error("cannot reach gatewayd at {path}: {}{}", describe(.error), hint(.error))]
    Connect {
        /// The socket path.
        path: PathBuf,
        /// The operating system's error.
        error: std::io::Error,
    },
    /// The connection broke mid-request.
    #[error("connection to gatewayd at {path} failed: {}", describe(.error))]
    Io {
        /// The socket path.
        path: PathBuf,
        /// The operating system's error.
        error: std::io::Error,
    },
    /// The daemon's answer did not parse.
    #[error("gatewayd at {path} sent an invalid answer: {message}")]
    Protocol {
        /// The socket path.
        path: PathBuf,
        /// What was wrong with the answer.
        message: String,
    },
}

/// An I/O error's description without the "(os error N)" suffix.
fn describe(e: &std::io::Error) -> String {
    let s = e.to_string();
    match s.find(" (os error") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

fn hint(e: &std::io::Error) -> &'static str {
    match e.kind() {
        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
            " (is gatewayd running?)"
        }
        std::io::ErrorKind::PermissionDenied => {
            " (run as root or as a member of gatewayd's control group)"
        }
        _ => "",
    }
}

/// Sends one request and waits (at most `timeout`) for its response. Blocking.
pub fn call(socket: &Path, req: &Request, timeout: Duration) -> Result<Response, ClientError> {
    let stream =
        std::os::unix::net::UnixStream::connect(socket).map_err(|error| ClientError::Connect {
            path: socket.to_path_buf(),
            error,
        })?;
    let io = |error| ClientError::Io {
        path: socket.to_path_buf(),
        error,
    };
    stream.set_read_timeout(Some(timeout)).map_err(io)?;
    stream.set_write_timeout(Some(timeout)).map_err(io)?;
    let mut line = serde_json::to_vec(req).map_err(|e| ClientError::Protocol {
        path: socket.to_path_buf(),
        message: e.to_string(),
    })?;
    line.push(b'\n');
    (&stream).write_all(&line).map_err(io)?;
    let mut answer = String::new();
    StdBufReader::new(&stream)
        .read_line(&mut answer)
        .map_err(io)?;
    if answer.is_empty() {
        return Err(ClientError::Protocol {
            path: socket.to_path_buf(),
            message: "connection closed without an answer".into(),
        });
    }
    serde_json::from_str(&answer).map_err(|e| ClientError::Protocol {
        path: socket.to_path_buf(),
        message: e.to_string(),
    })
}

#[cfg(test)]
mod tests;
