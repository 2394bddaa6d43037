//! The gateway's embedded database (`<state_dir>/gatewayd.db`, SQLite).
//!
//! What must survive a restart: the pairings, which child credential each device holds and when
//! it expires, sealed credentials not yet acknowledged by their device, requests sent (or about
//! to be sent) to the CN and not yet answered — so a retry after a reconnect reuses the same
//! request ID and the CN answers it idempotently — revocations still to confirm at the CN, and
//! the owner's block list.
//!
//! - WAL journal, `synchronous = FULL`: a change is on disk when the call returns.
//! - `PRAGMA user_version` counts the applied [`MIGRATIONS`]; each one runs in its own immediate
//!   transaction with the version bump. A database newer than this program is refused.
//! - The file is created 0600 in a 0700 directory.
//! - Times are Unix seconds (`i64`).
//!
//! Two connections: a writer and a read-only reader (WAL lets reads proceed while a commit is
//! being fsynced). Control-path writes are short synchronous transactions on the writer. The hot
//! path — recording a request, recording a batch's issued credentials, an acknowledgement — goes
//! through the *group committer*: a thread that takes every write waiting for it, runs each in
//! its own savepoint inside one `BEGIN IMMEDIATE` transaction and commits once, so N devices
//! arriving together cost one fsync instead of N. A write's caller is answered only after the
//! commit is on disk (same durability as a transaction of its own); a failing write is rolled
//! back to its savepoint without touching the others in the group. Async callers use the
//! `*_async` variants and never block a runtime thread on the disk.

use std::fs;
use std::net::IpAddr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use companion_proto::binding::KeyBinding;
use companion_proto::{DeviceId, RequestId, Supi};
use rusqlite::types::Type;
use rusqlite::{Connection, OptionalExtension, Row, TransactionBehavior, params};

/// The database file's name inside the state directory.
pub const DB_FILE: &str = "gatewayd.db";

/// The device endpoint's QUIC stateless-reset key (0600) inside the state directory, kept across
/// restarts ([`companion_transport::restart`]).
pub const RESET_KEY_FILE: &str = "reset.key";

/// Unix time in seconds.
pub type UnixTime = i64;

/// Why a state operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("gateway database error: {0}")]
    Db(#[from] rusqlite::Error),
    #[error(
        "gateway database schema version {found} is newer than this gatewayd supports ({supported}); \
         run the newer gatewayd or restore a backup"
    )]
    TooNew { found: u32, supported: u32 },
    /// A uniqueness rule would be broken (device already paired, key already used, ...).
    #[error("{0}")]
    Conflict(String),
    /// A stored value no longer parses.
    #[error("gateway database holds an invalid value: {0}")]
    Corrupt(String),
    /// The group commit that carried this write failed (the write was rolled back).
    #[error("gateway database commit failed: {0}; the change was not recorded")]
    CommitFailed(String),
    /// The group committer thread is gone (gatewayd is shutting down or it panicked).
    #[error("the gateway database writer has stopped; restart gatewayd")]
    WriterStopped,
}

/// How a device came to be paired.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PairedVia {
    /// The owner entered the device's pairing code.
    Code,
    /// The device connected during an open pairing window.
    Window,
}

impl PairedVia {
    pub fn as_str(self) -> &'static str {
        match self {
            PairedVia::Code => "code",
            PairedVia::Window => "window",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s {
            "code" => Some(PairedVia::Code),
            "window" => Some(PairedVia::Window),
            _ => None,
        }
    }
}

/// A paired device: its ID bound to its TLS key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pairing {
    pub device_id: DeviceId,
    /// DER SubjectPublicKeyInfo of the device's TLS key.
    pub spki_der: Vec<u8>,
    /// SHA-256 of `spki_der`.
    pub fingerprint: [u8; 32],
    pub label: Option<String>,
    pub paired_at: UnixTime,
    pub paired_via: PairedVia,
}

/// The child credential a device holds (as far as the gateway knows).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldCredential {
    pub device_id: DeviceId,
    pub supi: Supi,
    pub expires_at: UnixTime,
    /// The request that issued it.
    pub request_id: RequestId,
    /// When the device acknowledged the delivery; `None` while it is still pending.
    pub acknowledged_at: Option<UnixTime>,
}

/// A sealed credential waiting for its device's acknowledgement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingDelivery {
    pub request_id: RequestId,
    pub device_id: DeviceId,
    pub supi: Supi,
    pub expires_at: UnixTime,
    /// The encoded `Sealed` bundle exactly as the CN returned it; the gateway cannot open it.
    pub sealed: Vec<u8>,
    pub created_at: UnixTime,
}

/// Provisioning or renewal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RequestKind {
    Provision,
    Renew,
}

impl RequestKind {
    pub fn as_str(self) -> &'static str {
        match self {
            RequestKind::Provision => "provision",
            RequestKind::Renew => "renew",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s {
            "provision" => Some(RequestKind::Provision),
            "renew" => Some(RequestKind::Renew),
            _ => None,
        }
    }
}

/// A request the CN has not answered yet (at most one per device).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutstandingRequest {
    pub request_id: RequestId,
    pub device_id: DeviceId,
    pub kind: RequestKind,
    /// The device's HPKE (X25519) public key the CN seals to.
    pub hpke_public_key: Vec<u8>,
    pub created_at: UnixTime,
    /// The control parameters asked for, as JSON (v2; `None` for older rows: use defaults).
    pub params: Option<String>,
    /// Renewals: the SUPI being renewed (v2).
    pub renew_supi: Option<Supi>,
    /// The device's key-binding signature over this request (v3; [`pack_binding`]).
    pub binding: Option<Vec<u8>>,
    /// The device's signature authorising the pre-fetch of this credential's renewal (v3).
    pub renewal_binding: Option<Vec<u8>>,
}

/// A credential's renewal key (the HPKE public key) and the device's packed signature
/// authorising a renewal sealed to it.
pub type RenewalKey = (Vec<u8>, Vec<u8>);

/// Stores a [`KeyBinding`] as one blob: `u16-BE(scheme) || signature`.
pub fn pack_binding(b: &KeyBinding) -> Vec<u8> {
    let mut v = Vec::with_capacity(2 + b.signature.len());
    v.extend_from_slice(&b.scheme.to_be_bytes());
    v.extend_from_slice(&b.signature);
    v
}

/// The inverse of [`pack_binding`]; `None` for a blob too short to hold a scheme.
pub fn unpack_binding(v: &[u8]) -> Option<KeyBinding> {
    let (scheme, sig) = v.split_first_chunk::<2>()?;
    Some(KeyBinding {
        scheme: u16::from_be_bytes(*scheme),
        signature: sig.to_vec(),
    })
}

/// What a revocation revokes at the CN.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RevocationScope {
    /// Every child credential of the device under this gateway's parent (`Revoke{device_id}`):
    /// the owner revoked the device.
    Device,
    /// One child (`Revoke{supi}`): a credential issued for a device that was revoked or
    /// unpaired meanwhile, or one the device reported unusable.
    Child,
}

impl RevocationScope {
    pub fn as_str(self) -> &'static str {
        match self {
            RevocationScope::Device => "device",
            RevocationScope::Child => "child",
        }
    }
}

/// A revocation to carry out at the CN; `cn_confirmed_at` stays `None` until the CN confirms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revocation {
    pub id: i64,
    pub device_id: DeviceId,
    /// `Device` scope: the child the device held when revoked (informational: every child of
    /// the device is revoked). `Child` scope: the child to revoke.
    pub supi: Option<Supi>,
    pub scope: RevocationScope,
    pub revoked_at: UnixTime,
    pub cn_confirmed_at: Option<UnixTime>,
}

/// An owner's block of a LAN address (enforced by the eBPF filter).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Block {
    pub addr: IpAddr,
    /// Unix time the block ends; `None` = until unblocked.
    pub until: Option<UnixTime>,
    pub created_at: UnixTime,
}

/// Row counts for status reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Counts {
    pub pairings: u64,
    pub credentials: u64,
    pub pending_deliveries: u64,
    pub outstanding_requests: u64,
    pub unconfirmed_revocations: u64,
}

/// What [`State::acknowledge`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckOutcome {
    /// The delivery was pending and is now forgotten; the credential is marked acknowledged.
    Acknowledged,
    /// Already acknowledged earlier (a repeated ack): nothing changed.
    AlreadyAcknowledged,
    /// No delivery with this request ID for this device.
    Unknown,
}

/// The migrations, in order; `MIGRATIONS[i]` brings the schema from version `i` to `i + 1`.
/// Append only; never edit a released one.
pub const MIGRATIONS: &[&str] = &[
    // v1
    r#"
CREATE TABLE pairings (
    device_id   TEXT PRIMARY KEY,
    spki        BLOB NOT NULL,
    fingerprint BLOB NOT NULL UNIQUE CHECK (length(fingerprint) = 32),
    label       TEXT,
    paired_at   INTEGER NOT NULL,
    paired_via  TEXT NOT NULL CHECK (paired_via IN ('code', 'window'))
) STRICT;

CREATE TABLE credentials (
    device_id       TEXT PRIMARY KEY,
    supi            TEXT NOT NULL,
    expires_at      INTEGER NOT NULL,
    request_id      BLOB NOT NULL CHECK (length(request_id) = 16),
    acknowledged_at INTEGER
) STRICT;
CREATE INDEX credentials_by_expiry ON credentials (expires_at);

CREATE TABLE deliveries (
    request_id BLOB PRIMARY KEY CHECK (length(request_id) = 16),
    device_id  TEXT NOT NULL,
    supi       TEXT NOT NULL,
    expires_at INTEGER NOT NULL,
    sealed     BLOB NOT NULL,
    created_at INTEGER NOT NULL
) STRICT;
CREATE INDEX deliveries_by_device ON deliveries (device_id);

CREATE TABLE requests (
    request_id BLOB PRIMARY KEY CHECK (length(request_id) = 16),
    device_id  TEXT NOT NULL UNIQUE,
    kind       TEXT NOT NULL CHECK (kind IN ('provision', 'renew')),
    hpke_pk    BLOB NOT NULL,
    created_at INTEGER NOT NULL
) STRICT;

CREATE TABLE revocations (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    device_id       TEXT NOT NULL,
    supi            TEXT,
    revoked_at      INTEGER NOT NULL,
    cn_confirmed_at INTEGER
) STRICT;

CREATE TABLE blocks (
    addr       TEXT PRIMARY KEY,
    until      INTEGER,
    created_at INTEGER NOT NULL
) STRICT;
"#,
    // v2: what a request needs to be resent after a restart (params, the SUPI renewed), and the
    // HPKE key of the request that issued a credential (the device's renewal key: pre-fetched
    // renewals are sealed to it).
    r#"
ALTER TABLE requests ADD COLUMN params TEXT;
ALTER TABLE requests ADD COLUMN renew_supi TEXT;
ALTER TABLE credentials ADD COLUMN hpke_pk BLOB;
"#,
    // v3: key binding (PROTOCOL.md §4.4). A request keeps the device's signature over it and its
    // authorisation for the renewal of what it produces; a credential keeps that authorisation,
    // which the pre-fetched renewal is sent with.
    r#"
ALTER TABLE requests ADD COLUMN binding BLOB;
ALTER TABLE requests ADD COLUMN renewal_binding BLOB;
ALTER TABLE credentials ADD COLUMN renewal_binding BLOB;
ALTER TABLE deliveries ADD COLUMN kind TEXT;
ALTER TABLE revocations ADD COLUMN scope TEXT NOT NULL DEFAULT 'device'
    CHECK (scope IN ('device', 'child'));
"#,
    // v4: manufacturer attestation (PROTOCOL.md §4.5). The certificate chain the paired device
    // last presented (CBOR, as in BatchItem key 9), forwarded with each of its batch items,
    // including renewals the gateway pre-fetches while the device is away.
    r#"
ALTER TABLE pairings ADD COLUMN attestation BLOB;
"#,
];

/// The gateway's database. Shareable (`Arc<State>`); every call is one short transaction (or
/// one savepoint of a group commit, see the module documentation).
#[derive(Debug)]
pub struct State {
    conn: Arc<Mutex<Connection>>,
    reader: Mutex<Connection>,
    group: Mutex<mpsc::Sender<GroupJob>>,
    path: PathBuf,
}

/// Most writes committed together.
const MAX_GROUP: usize = 1024;

/// Told whether the group's commit succeeded (`None`) or why not.
type Completion = Box<dyn FnOnce(Option<&StateError>) + Send>;
/// One write of a group: runs in its savepoint (or is told why the group could not start) and
/// returns what to do once the commit's outcome is known.
type GroupJob = Box<dyn FnOnce(Result<&Connection, &StateError>) -> Completion + Send>;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock cannot leave a half transaction: the group committer rolls
    // back on error and rusqlite on drop. The connection itself stays usable.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The group committer: one transaction per group of waiting writes, until every sender is gone.
fn group_committer(conn: Arc<Mutex<Connection>>, rx: mpsc::Receiver<GroupJob>) {
    while let Ok(first) = rx.recv() {
        let mut jobs = vec![first];
        while jobs.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(j) => jobs.push(j),
                Err(_) => break,
            }
        }
        let conn = lock(&conn);
        if let Err(e) = conn.execute_batch("BEGIN IMMEDIATE") {
            let e = StateError::from(e);
            for job in jobs {
                job(Err(&e))(Some(&e));
            }
            continue;
        }
        let done: Vec<Completion> = jobs.into_iter().map(|job| job(Ok(&conn))).collect();
        match conn.execute_batch("COMMIT") {
            Ok(()) => done.into_iter().for_each(|d| d(None)),
            Err(e) => {
                let _ = conn.execute_batch("ROLLBACK");
                let e = StateError::CommitFailed(e.to_string());
                done.into_iter().for_each(|d| d(Some(&e)));
            }
        }
    }
}

/// Runs `f` inside a savepoint: its changes are kept if it succeeds, undone if it fails.
fn in_savepoint<R>(
    conn: &Connection,
    f: impl FnOnce(&Connection) -> Result<R, StateError>,
) -> Result<R, StateError> {
    conn.execute_batch("SAVEPOINT op")?;
    match f(conn) {
        Ok(r) => {
            conn.execute_batch("RELEASE op")?;
            Ok(r)
        }
        Err(e) => {
            let _ = conn.execute_batch("ROLLBACK TO op; RELEASE op");
            Err(e)
        }
    }
}

/// Wraps a write for the group committer; `reply` gets its result once the commit's outcome is
/// known.
fn group_job<R: Send + 'static>(
    f: impl FnOnce(&Connection) -> Result<R, StateError> + Send + 'static,
    reply: impl FnOnce(Result<R, StateError>) + Send + 'static,
) -> GroupJob {
    Box::new(move |conn| {
        let result = match conn {
            Ok(c) => in_savepoint(c, f),
            Err(e) => Err(StateError::CommitFailed(e.to_string())),
        };
        Box::new(move |commit: Option<&StateError>| {
            reply(match (result, commit) {
                (Ok(_), Some(e)) => Err(StateError::CommitFailed(e.to_string())),
                (r, _) => r,
            })
        })
    })
}

fn corrupt(col: usize, what: impl Into<String>) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(
        col,
        Type::Text,
        Box::new(StateError::Corrupt(what.into())),
    )
}

fn device_at(row: &Row<'_>, col: usize) -> rusqlite::Result<DeviceId> {
    let s: String = row.get(col)?;
    DeviceId::new(&s).map_err(|e| corrupt(col, e.to_string()))
}

fn supi_at(row: &Row<'_>, col: usize) -> rusqlite::Result<Supi> {
    let s: String = row.get(col)?;
    Supi::new(&s).map_err(|e| corrupt(col, e.to_string()))
}

fn request_id_at(row: &Row<'_>, col: usize) -> rusqlite::Result<RequestId> {
    let b: Vec<u8> = row.get(col)?;
    <[u8; 16]>::try_from(b)
        .map(RequestId)
        .map_err(|_| corrupt(col, "request ID is not 16 bytes"))
}

fn pairing_from_row(row: &Row<'_>) -> rusqlite::Result<Pairing> {
    let fp: Vec<u8> = row.get(2)?;
    let via: String = row.get(5)?;
    Ok(Pairing {
        device_id: device_at(row, 0)?,
        spki_der: row.get(1)?,
        fingerprint: <[u8; 32]>::try_from(fp)
            .map_err(|_| corrupt(2, "fingerprint is not 32 bytes"))?,
        label: row.get(3)?,
        paired_at: row.get(4)?,
        paired_via: PairedVia::parse(&via).ok_or_else(|| corrupt(5, "unknown paired_via"))?,
    })
}

fn credential_from_row(row: &Row<'_>) -> rusqlite::Result<HeldCredential> {
    Ok(HeldCredential {
        device_id: device_at(row, 0)?,
        supi: supi_at(row, 1)?,
        expires_at: row.get(2)?,
        request_id: request_id_at(row, 3)?,
        acknowledged_at: row.get(4)?,
    })
}

fn delivery_from_row(row: &Row<'_>) -> rusqlite::Result<PendingDelivery> {
    Ok(PendingDelivery {
        request_id: request_id_at(row, 0)?,
        device_id: device_at(row, 1)?,
        supi: supi_at(row, 2)?,
        expires_at: row.get(3)?,
        sealed: row.get(4)?,
        created_at: row.get(5)?,
    })
}

fn request_from_row(row: &Row<'_>) -> rusqlite::Result<OutstandingRequest> {
    let kind: String = row.get(2)?;
    let supi: Option<String> = row.get(6)?;
    Ok(OutstandingRequest {
        request_id: request_id_at(row, 0)?,
        device_id: device_at(row, 1)?,
        kind: RequestKind::parse(&kind).ok_or_else(|| corrupt(2, "unknown request kind"))?,
        hpke_public_key: row.get(3)?,
        created_at: row.get(4)?,
        params: row.get(5)?,
        renew_supi: supi
            .map(|s| Supi::new(&s).map_err(|e| corrupt(6, e.to_string())))
            .transpose()?,
        binding: row.get(7)?,
        renewal_binding: row.get(8)?,
    })
}

fn revocation_from_row(row: &Row<'_>) -> rusqlite::Result<Revocation> {
    let supi: Option<String> = row.get(2)?;
    let scope: String = row.get(5)?;
    Ok(Revocation {
        scope: match scope.as_str() {
            "child" => RevocationScope::Child,
            _ => RevocationScope::Device,
        },
        id: row.get(0)?,
        device_id: device_at(row, 1)?,
        supi: supi
            .map(|s| Supi::new(&s).map_err(|e| corrupt(2, e.to_string())))
            .transpose()?,
        revoked_at: row.get(3)?,
        cn_confirmed_at: row.get(4)?,
    })
}

fn block_from_row(row: &Row<'_>) -> rusqlite::Result<Block> {
    let addr: String = row.get(0)?;
    Ok(Block {
        addr: addr
            .parse()
            .map_err(|_| corrupt(0, format!("{addr:?} is not an IP address")))?,
        until: row.get(1)?,
        created_at: row.get(2)?,
    })
}

/// Turns a conversion failure carrying a [`StateError::Corrupt`] back into it.
fn unwrap_err(e: rusqlite::Error) -> StateError {
    if let rusqlite::Error::FromSqlConversionFailure(_, _, inner) = &e
        && let Some(StateError::Corrupt(m)) = inner.downcast_ref::<StateError>()
    {
        return StateError::Corrupt(m.clone());
    }
    StateError::Db(e)
}

fn is_unique_violation(e: &rusqlite::Error) -> bool {
    matches!(e, rusqlite::Error::SqliteFailure(f, _)
        if f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE
            || f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_PRIMARYKEY)
}

/// `execute` through the connection's statement cache: the hot path's statements are parsed
/// once per connection, not once per device.
fn exec(conn: &Connection, sql: &str, params: impl rusqlite::Params) -> rusqlite::Result<usize> {
    conn.prepare_cached(sql)?.execute(params)
}

/// Records an outstanding request (see [`State::insert_request`]).
fn insert_request_in(conn: &Connection, r: &OutstandingRequest) -> Result<(), StateError> {
    let res = exec(
        conn,
        "INSERT INTO requests (request_id, device_id, kind, hpke_pk, created_at, params,
             renew_supi, binding, renewal_binding)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
        params![
            r.request_id.as_bytes().as_slice(),
            r.device_id.as_str(),
            r.kind.as_str(),
            r.hpke_public_key,
            r.created_at,
            r.params,
            r.renew_supi.as_ref().map(|s| s.as_str()),
            r.binding,
            r.renewal_binding
        ],
    );
    match res {
        Ok(_) => Ok(()),
        Err(e) if is_unique_violation(&e) => Err(StateError::Conflict(format!(
            "device {} already has a request outstanding",
            r.device_id
        ))),
        Err(e) => Err(e.into()),
    }
}

/// Records one issued credential (see [`State::record_issued`]); runs inside a transaction.
fn record_issued_in(tx: &Connection, d: &PendingDelivery) -> Result<(), StateError> {
    let inserted = exec(
        tx,
        "INSERT OR IGNORE INTO deliveries
             (request_id, device_id, supi, expires_at, sealed, created_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![
            d.request_id.as_bytes().as_slice(),
            d.device_id.as_str(),
            d.supi.as_str(),
            d.expires_at,
            d.sealed,
            d.created_at
        ],
    )?;
    if inserted > 0 {
        type Row = (Option<Vec<u8>>, Option<Vec<u8>>, Option<String>);
        let (hpke_pk, renewal_binding, kind): Row = tx
            .query_row(
                "SELECT hpke_pk, renewal_binding, kind FROM requests WHERE request_id = ?1",
                [d.request_id.as_bytes().as_slice()],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()?
            .unwrap_or((None, None, None));
        exec(
            tx,
            "UPDATE deliveries SET kind = ?2 WHERE request_id = ?1",
            params![d.request_id.as_bytes().as_slice(), kind],
        )?;
        // The renewal authorisation belongs to the request that produced this credential: a
        // new credential without one leaves none behind (an older one would not verify).
        exec(
            tx,
            "INSERT INTO credentials
                 (device_id, supi, expires_at, request_id, acknowledged_at, hpke_pk,
                  renewal_binding)
             VALUES (?1, ?2, ?3, ?4, NULL, ?5, ?6)
             ON CONFLICT (device_id) DO UPDATE SET supi = excluded.supi,
                 expires_at = excluded.expires_at, request_id = excluded.request_id,
                 acknowledged_at = NULL,
                 hpke_pk = coalesce(excluded.hpke_pk, credentials.hpke_pk),
                 renewal_binding = excluded.renewal_binding",
            params![
                d.device_id.as_str(),
                d.supi.as_str(),
                d.expires_at,
                d.request_id.as_bytes().as_slice(),
                hpke_pk,
                renewal_binding
            ],
        )?;
        // Deliveries of older requests of this device are superseded.
        exec(
            tx,
            "DELETE FROM deliveries WHERE device_id = ?1 AND request_id <> ?2",
            params![d.device_id.as_str(), d.request_id.as_bytes().as_slice()],
        )?;
    }
    exec(
        tx,
        "DELETE FROM requests WHERE request_id = ?1",
        [d.request_id.as_bytes().as_slice()],
    )?;
    Ok(())
}

/// Records an acknowledgement (see [`State::acknowledge`]); runs inside a transaction.
fn acknowledge_in(
    tx: &Connection,
    device: &DeviceId,
    request_id: &RequestId,
    at: UnixTime,
) -> Result<AckOutcome, StateError> {
    let removed = exec(
        tx,
        "DELETE FROM deliveries WHERE request_id = ?1 AND device_id = ?2",
        params![request_id.as_bytes().as_slice(), device.as_str()],
    )?;
    if removed > 0 {
        exec(
            tx,
            "UPDATE credentials SET acknowledged_at = ?3
             WHERE device_id = ?1 AND request_id = ?2",
            params![device.as_str(), request_id.as_bytes().as_slice(), at],
        )?;
        return Ok(AckOutcome::Acknowledged);
    }
    let acked: Option<Option<i64>> = tx
        .query_row(
            "SELECT acknowledged_at FROM credentials
             WHERE device_id = ?1 AND request_id = ?2",
            params![device.as_str(), request_id.as_bytes().as_slice()],
            |r| r.get(0),
        )
        .optional()?;
    Ok(match acked {
        Some(Some(_)) => AckOutcome::AlreadyAcknowledged,
        _ => AckOutcome::Unknown,
    })
}

/// Creates `dir` (and parents) with mode 0700 if it does not exist.
pub fn ensure_private_dir(dir: &Path) -> Result<(), StateError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| StateError::Io {
            path: dir.to_path_buf(),
            source,
        })
}

impl State {
    /// Opens (creating if needed) `<state_dir>/gatewayd.db` and applies pending migrations.
    pub fn open(state_dir: &Path) -> Result<Self, StateError> {
        ensure_private_dir(state_dir)?;
        let path = state_dir.join(DB_FILE);
        // Create the file ourselves so it is 0600 from the first byte; SQLite gives its -wal and
        // -shm files the database file's permissions.
        fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(|source| StateError::Io {
                path: path.clone(),
                source,
            })?;
        let mut conn = Connection::open(&path)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(StateError::Corrupt(format!(
                "could not enable WAL journal mode (got {mode})"
            )));
        }
        conn.execute_batch(
            "PRAGMA synchronous = FULL;
             PRAGMA foreign_keys = ON;
             PRAGMA trusted_schema = OFF;",
        )?;
        migrate(&mut conn)?;
        let reader = Connection::open_with_flags(
            &path,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        reader.busy_timeout(std::time::Duration::from_secs(5))?;
        reader.execute_batch("PRAGMA trusted_schema = OFF;")?;
        let conn = Arc::new(Mutex::new(conn));
        let (tx, rx) = mpsc::channel();
        let writer = conn.clone();
        std::thread::Builder::new()
            .name("state-commit".into())
            .spawn(move || group_committer(writer, rx))
            .map_err(|source| StateError::Io {
                path: path.clone(),
                source,
            })?;
        Ok(Self {
            conn,
            reader: Mutex::new(reader),
            group: Mutex::new(tx),
            path,
        })
    }

    /// Runs the write `f` in the next group commit and waits (blocking) for its durable result.
    fn write_grouped<R: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> Result<R, StateError> + Send + 'static,
    ) -> Result<R, StateError> {
        let (tx, rx) = mpsc::sync_channel(1);
        let job = group_job(f, move |r| {
            let _ = tx.send(r);
        });
        lock(&self.group)
            .send(job)
            .map_err(|_| StateError::WriterStopped)?;
        rx.recv().map_err(|_| StateError::WriterStopped)?
    }

    /// [`write_grouped`](Self::write_grouped) for async callers: waits without blocking a
    /// runtime thread.
    async fn write_grouped_async<R: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> Result<R, StateError> + Send + 'static,
    ) -> Result<R, StateError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let job = group_job(f, move |r| {
            let _ = tx.send(r);
        });
        lock(&self.group)
            .send(job)
            .map_err(|_| StateError::WriterStopped)?;
        rx.await.map_err(|_| StateError::WriterStopped)?
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The writer connection (control-path writes; the group committer takes it per group).
    fn conn(&self) -> MutexGuard<'_, Connection> {
        lock(&self.conn)
    }

    /// The read-only connection: never waits for a commit's fsync.
    fn reader(&self) -> MutexGuard<'_, Connection> {
        lock(&self.reader)
    }

    /// The schema version of the open database.
    pub fn schema_version(&self) -> Result<u32, StateError> {
        Ok(self
            .conn()
            .query_row("PRAGMA user_version", [], |r| r.get(0))?)
    }

    // ---- pairings ----

    /// Records a new pairing. [`StateError::Conflict`] if the device ID or the key is already
    /// paired.
    pub fn insert_pairing(&self, p: &Pairing) -> Result<(), StateError> {
        let r = self.conn().execute(
            "INSERT INTO pairings (device_id, spki, fingerprint, label, paired_at, paired_via)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![
                p.device_id.as_str(),
                p.spki_der,
                p.fingerprint.as_slice(),
                p.label,
                p.paired_at,
                p.paired_via.as_str()
            ],
        );
        match r {
            Ok(_) => Ok(()),
            Err(e) if is_unique_violation(&e) => Err(StateError::Conflict(format!(
                "device {} or its key is already paired",
                p.device_id
            ))),
            Err(e) => Err(e.into()),
        }
    }

    /// Changes a pairing's label; `false` if the device is not paired.
    pub fn set_label(&self, device: &DeviceId, label: Option<&str>) -> Result<bool, StateError> {
        let n = self.conn().execute(
            "UPDATE pairings SET label = ?2 WHERE device_id = ?1",
            params![device.as_str(), label],
        )?;
        Ok(n > 0)
    }

    pub fn pairing(&self, device: &DeviceId) -> Result<Option<Pairing>, StateError> {
        self.reader()
            .query_row(
                "SELECT device_id, spki, fingerprint, label, paired_at, paired_via
                 FROM pairings WHERE device_id = ?1",
                [device.as_str()],
                pairing_from_row,
            )
            .optional()
            .map_err(unwrap_err)
    }

    /// Records the manufacturer chain (CBOR) the paired `device` presents, or clears it.
    pub fn set_attestation(
        &self,
        device: &DeviceId,
        chain: Option<&[u8]>,
    ) -> Result<bool, StateError> {
        let n = self.conn().execute(
            "UPDATE pairings SET attestation = ?2 WHERE device_id = ?1",
            params![device.as_str(), chain],
        )?;
        Ok(n > 0)
    }

    /// Every recorded manufacturer chain (CBOR), by device.
    pub fn attestations(&self) -> Result<Vec<(DeviceId, Vec<u8>)>, StateError> {
        let conn = self.reader();
        let mut stmt = conn
            .prepare("SELECT device_id, attestation FROM pairings WHERE attestation IS NOT NULL")?;
        let rows = stmt.query_map([], |r| Ok((device_at(r, 0)?, r.get(1)?)))?;
        rows.collect::<Result<_, _>>().map_err(unwrap_err)
    }

    /// Every pairing, by device ID.
    pub fn pairings(&self) -> Result<Vec<Pairing>, StateError> {
        let conn = self.reader();
        let mut stmt = conn.prepare(
            "SELECT device_id, spki, fingerprint, label, paired_at, paired_via
             FROM pairings ORDER BY device_id",
        )?;
        let rows = stmt.query_map([], pairing_from_row)?;
        rows.collect::<Result<_, _>>().map_err(unwrap_err)
    }

    // ---- requests ----

    /// Records a request before it is sent to the CN. [`StateError::Conflict`] if the device
    /// already has one outstanding (one provisioning at a time per device) or the ID is reused.
    pub fn insert_request(&self, r: &OutstandingRequest) -> Result<(), StateError> {
        let r = r.clone();
        self.write_grouped(move |c| insert_request_in(c, &r))
    }

    /// [`insert_request`](Self::insert_request) for async callers (group-committed).
    pub async fn insert_request_async(&self, r: OutstandingRequest) -> Result<(), StateError> {
        self.write_grouped_async(move |c| insert_request_in(c, &r))
            .await
    }

    /// The device's outstanding request, if any (reuse its ID when retrying).
    pub fn request_for_device(
        &self,
        device: &DeviceId,
    ) -> Result<Option<OutstandingRequest>, StateError> {
        self.reader()
            .query_row(
                "SELECT request_id, device_id, kind, hpke_pk, created_at, params, renew_supi,
                    binding, renewal_binding
                 FROM requests WHERE device_id = ?1",
                [device.as_str()],
                request_from_row,
            )
            .optional()
            .map_err(unwrap_err)
    }

    /// Every outstanding request, oldest first (to resend after a CN reconnect).
    pub fn outstanding_requests(&self) -> Result<Vec<OutstandingRequest>, StateError> {
        let conn = self.reader();
        let mut stmt = conn.prepare(
            "SELECT request_id, device_id, kind, hpke_pk, created_at, params, renew_supi,
                    binding, renewal_binding
             FROM requests ORDER BY created_at, request_id",
        )?;
        let rows = stmt.query_map([], request_from_row)?;
        rows.collect::<Result<_, _>>().map_err(unwrap_err)
    }

    /// Forgets a request the CN refused for good; `false` if unknown.
    pub fn remove_request(&self, id: &RequestId) -> Result<bool, StateError> {
        let n = self.conn().execute(
            "DELETE FROM requests WHERE request_id = ?1",
            [id.as_bytes().as_slice()],
        )?;
        Ok(n > 0)
    }

    // ---- issuance, delivery, acknowledgement ----

    /// The CN issued a credential: in one transaction, keep the sealed blob until the device
    /// acknowledges it, record the credential as held (unacknowledged) and close the request.
    /// Idempotent: recording the same request ID twice changes nothing.
    pub fn record_issued(&self, d: &PendingDelivery) -> Result<(), StateError> {
        let d = d.clone();
        self.write_grouped(move |c| record_issued_in(c, &d))
    }

    /// [`record_issued`](Self::record_issued) for every credential of a CN batch, in one
    /// savepoint of a group commit: all are recorded or none. Hands the deliveries back once
    /// they are durable.
    pub async fn record_issued_all_async(
        &self,
        ds: Vec<PendingDelivery>,
    ) -> Result<Vec<PendingDelivery>, StateError> {
        self.write_grouped_async(move |c| {
            ds.iter().try_for_each(|d| record_issued_in(c, d))?;
            Ok(ds)
        })
        .await
    }

    /// Deliveries not yet acknowledged by `device`, oldest first (redeliver on reconnect).
    pub fn pending_for_device(
        &self,
        device: &DeviceId,
    ) -> Result<Vec<PendingDelivery>, StateError> {
        let conn = self.reader();
        let mut stmt = conn.prepare(
            "SELECT request_id, device_id, supi, expires_at, sealed, created_at
             FROM deliveries WHERE device_id = ?1 ORDER BY created_at, request_id",
        )?;
        let rows = stmt.query_map([device.as_str()], delivery_from_row)?;
        rows.collect::<Result<_, _>>().map_err(unwrap_err)
    }

    /// Every pending delivery.
    pub fn pending_deliveries(&self) -> Result<Vec<PendingDelivery>, StateError> {
        let conn = self.reader();
        let mut stmt = conn.prepare(
            "SELECT request_id, device_id, supi, expires_at, sealed, created_at
             FROM deliveries ORDER BY created_at, request_id",
        )?;
        let rows = stmt.query_map([], delivery_from_row)?;
        rows.collect::<Result<_, _>>().map_err(unwrap_err)
    }

    /// The device acknowledged delivery `request_id`: forget the blob, mark the credential
    /// acknowledged. Only the device the delivery belongs to can acknowledge it.
    pub fn acknowledge(
        &self,
        device: &DeviceId,
        request_id: &RequestId,
        at: UnixTime,
    ) -> Result<AckOutcome, StateError> {
        let (device, request_id) = (device.clone(), *request_id);
        self.write_grouped(move |c| acknowledge_in(c, &device, &request_id, at))
    }

    /// [`acknowledge`](Self::acknowledge) for async callers (group-committed).
    pub async fn acknowledge_async(
        &self,
        device: DeviceId,
        request_id: RequestId,
        at: UnixTime,
    ) -> Result<AckOutcome, StateError> {
        self.write_grouped_async(move |c| acknowledge_in(c, &device, &request_id, at))
            .await
    }

    /// The device rejected delivery `request_id` (`credential_unusable`): drop the blob.
    pub fn discard_delivery(
        &self,
        device: &DeviceId,
        request_id: &RequestId,
    ) -> Result<bool, StateError> {
        let n = self.conn().execute(
            "DELETE FROM deliveries WHERE request_id = ?1 AND device_id = ?2",
            params![request_id.as_bytes().as_slice(), device.as_str()],
        )?;
        Ok(n > 0)
    }

    /// The SUPI and kind of pending delivery `request_id` of `device` (kind `None` for
    /// deliveries recorded before schema v3).
    pub fn delivery_kind(
        &self,
        device: &DeviceId,
        request_id: &RequestId,
    ) -> Result<Option<(Supi, Option<RequestKind>)>, StateError> {
        let row: Option<(String, Option<String>)> = self
            .reader()
            .query_row(
                "SELECT supi, kind FROM deliveries WHERE request_id = ?1 AND device_id = ?2",
                params![request_id.as_bytes().as_slice(), device.as_str()],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        row.map(|(supi, kind)| {
            Ok((
                Supi::new(&supi).map_err(|e| StateError::Corrupt(e.to_string()))?,
                kind.as_deref().and_then(RequestKind::parse),
            ))
        })
        .transpose()
    }

    /// The pending delivery with this request ID for `device`, if any.
    pub fn delivery(
        &self,
        device: &DeviceId,
        request_id: &RequestId,
    ) -> Result<Option<PendingDelivery>, StateError> {
        self.reader()
            .query_row(
                "SELECT request_id, device_id, supi, expires_at, sealed, created_at
                 FROM deliveries WHERE request_id = ?1 AND device_id = ?2",
                params![request_id.as_bytes().as_slice(), device.as_str()],
                delivery_from_row,
            )
            .optional()
            .map_err(unwrap_err)
    }

    /// The HPKE public key of the request that issued `device`'s credential (its renewal key)
    /// and the device's signature authorising a renewal sealed to it, when both are known.
    pub fn renewal_key(&self, device: &DeviceId) -> Result<Option<RenewalKey>, StateError> {
        type Row = (Option<Vec<u8>>, Option<Vec<u8>>);
        let v: Option<Row> = self
            .conn()
            .query_row(
                "SELECT hpke_pk, renewal_binding FROM credentials WHERE device_id = ?1",
                [device.as_str()],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        Ok(match v {
            Some((Some(pk), Some(b))) => Some((pk, b)),
            _ => None,
        })
    }

    // ---- credentials ----

    pub fn credential(&self, device: &DeviceId) -> Result<Option<HeldCredential>, StateError> {
        self.reader()
            .query_row(
                "SELECT device_id, supi, expires_at, request_id, acknowledged_at
                 FROM credentials WHERE device_id = ?1",
                [device.as_str()],
                credential_from_row,
            )
            .optional()
            .map_err(unwrap_err)
    }

    /// Every credential held, by device ID.
    pub fn credentials(&self) -> Result<Vec<HeldCredential>, StateError> {
        self.credentials_where("1", None)
    }

    /// Credentials expiring at or before `t` (renewal candidates, the 24 h gauge), soonest first.
    pub fn credentials_expiring_by(&self, t: UnixTime) -> Result<Vec<HeldCredential>, StateError> {
        self.credentials_where("expires_at <= ?1", Some(t))
    }

    fn credentials_where(
        &self,
        cond: &str,
        t: Option<UnixTime>,
    ) -> Result<Vec<HeldCredential>, StateError> {
        let conn = self.conn();
        let order = if t.is_some() {
            "expires_at, device_id"
        } else {
            "device_id"
        };
        let mut stmt = conn.prepare(&format!(
            "SELECT device_id, supi, expires_at, request_id, acknowledged_at
             FROM credentials WHERE {cond} ORDER BY {order}"
        ))?;
        let rows = match t {
            Some(t) => stmt.query_map([t], credential_from_row)?,
            None => stmt.query_map([], credential_from_row)?,
        };
        rows.collect::<Result<_, _>>().map_err(unwrap_err)
    }

    // ---- revocation ----

    /// Unpairs `device` and forgets everything about it (credential, pending deliveries,
    /// outstanding request) in one transaction, recording a revocation for the CN to confirm.
    /// `None` if the device was not paired (nothing changes).
    pub fn revoke_device(
        &self,
        device: &DeviceId,
        at: UnixTime,
    ) -> Result<Option<Revocation>, StateError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let removed = tx.execute(
            "DELETE FROM pairings WHERE device_id = ?1",
            [device.as_str()],
        )?;
        if removed == 0 {
            return Ok(None);
        }
        let supi: Option<String> = tx
            .query_row(
                "SELECT supi FROM credentials WHERE device_id = ?1",
                [device.as_str()],
                |r| r.get(0),
            )
            .optional()?;
        for table in ["credentials", "deliveries", "requests"] {
            tx.execute(
                &format!("DELETE FROM {table} WHERE device_id = ?1"),
                [device.as_str()],
            )?;
        }
        tx.execute(
            "INSERT INTO revocations (device_id, supi, revoked_at, cn_confirmed_at)
             VALUES (?1, ?2, ?3, NULL)",
            params![device.as_str(), supi, at],
        )?;
        let id = tx.last_insert_rowid();
        tx.commit()?;
        Ok(Some(Revocation {
            id,
            device_id: device.clone(),
            supi: supi
                .map(|s| Supi::new(&s).map_err(|e| StateError::Corrupt(e.to_string())))
                .transpose()?,
            scope: RevocationScope::Device,
            revoked_at: at,
            cn_confirmed_at: None,
        }))
    }

    /// Records that child `supi` of `device` must be revoked at the CN, and forgets it here: its
    /// pending deliveries, and the held credential if it is that one. One transaction.
    pub fn revoke_child(
        &self,
        device: &DeviceId,
        supi: &Supi,
        at: UnixTime,
    ) -> Result<Revocation, StateError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        tx.execute(
            "DELETE FROM deliveries WHERE device_id = ?1 AND supi = ?2",
            params![device.as_str(), supi.as_str()],
        )?;
        tx.execute(
            "DELETE FROM credentials WHERE device_id = ?1 AND supi = ?2",
            params![device.as_str(), supi.as_str()],
        )?;
        tx.execute(
            "INSERT INTO revocations (device_id, supi, revoked_at, cn_confirmed_at, scope)
             VALUES (?1, ?2, ?3, NULL, 'child')",
            params![device.as_str(), supi.as_str(), at],
        )?;
        let id = tx.last_insert_rowid();
        tx.commit()?;
        Ok(Revocation {
            id,
            device_id: device.clone(),
            supi: Some(supi.clone()),
            scope: RevocationScope::Child,
            revoked_at: at,
            cn_confirmed_at: None,
        })
    }

    /// Whether a revocation of the whole `device` still waits for the CN's confirmation (the
    /// device ID must not be provisioned again until it has: the CN revokes by device ID).
    pub fn device_revocation_pending(&self, device: &DeviceId) -> Result<bool, StateError> {
        let n: i64 = self.reader().query_row(
            "SELECT count(*) FROM revocations
             WHERE device_id = ?1 AND scope = 'device' AND cn_confirmed_at IS NULL",
            [device.as_str()],
            |r| r.get(0),
        )?;
        Ok(n > 0)
    }

    /// Revocations the CN has not confirmed yet (retry them after a reconnect), oldest first.
    pub fn unconfirmed_revocations(&self) -> Result<Vec<Revocation>, StateError> {
        let conn = self.reader();
        let mut stmt = conn.prepare(
            "SELECT id, device_id, supi, revoked_at, cn_confirmed_at, scope FROM revocations
             WHERE cn_confirmed_at IS NULL ORDER BY id",
        )?;
        let rows = stmt.query_map([], revocation_from_row)?;
        rows.collect::<Result<_, _>>().map_err(unwrap_err)
    }

    /// The CN confirmed revocation `id`; `false` if unknown.
    pub fn confirm_revocation(&self, id: i64, at: UnixTime) -> Result<bool, StateError> {
        let n = self.conn().execute(
            "UPDATE revocations SET cn_confirmed_at = ?2 WHERE id = ?1",
            params![id, at],
        )?;
        Ok(n > 0)
    }

    // ---- blocks ----

    /// Blocks `addr` until `until` (`None` = indefinitely); replaces an existing block.
    pub fn block(&self, b: &Block) -> Result<(), StateError> {
        self.conn().execute(
            "INSERT INTO blocks (addr, until, created_at) VALUES (?1, ?2, ?3)
             ON CONFLICT (addr) DO UPDATE SET until = excluded.until,
                 created_at = excluded.created_at",
            params![b.addr.to_string(), b.until, b.created_at],
        )?;
        Ok(())
    }

    /// Lifts a block; `false` if `addr` was not blocked.
    pub fn unblock(&self, addr: IpAddr) -> Result<bool, StateError> {
        let n = self
            .conn()
            .execute("DELETE FROM blocks WHERE addr = ?1", [addr.to_string()])?;
        Ok(n > 0)
    }

    /// Blocks in force at `now` (expired ones are deleted on the way).
    pub fn blocks(&self, now: UnixTime) -> Result<Vec<Block>, StateError> {
        let conn = self.conn();
        conn.execute(
            "DELETE FROM blocks WHERE until IS NOT NULL AND until <= ?1",
            [now],
        )?;
        let mut stmt = conn.prepare("SELECT addr, until, created_at FROM blocks ORDER BY addr")?;
        let rows = stmt.query_map([], block_from_row)?;
        rows.collect::<Result<_, _>>().map_err(unwrap_err)
    }

    // ---- status ----

    pub fn counts(&self) -> Result<Counts, StateError> {
        let conn = self.reader();
        let count = |sql: &str| conn.query_row(sql, [], |r| r.get::<_, i64>(0));
        Ok(Counts {
            pairings: count("SELECT count(*) FROM pairings")? as u64,
            credentials: count("SELECT count(*) FROM credentials")? as u64,
            pending_deliveries: count("SELECT count(*) FROM deliveries")? as u64,
            outstanding_requests: count("SELECT count(*) FROM requests")? as u64,
            unconfirmed_revocations: count(
                "SELECT count(*) FROM revocations WHERE cn_confirmed_at IS NULL",
            )? as u64,
        })
    }
}

fn migrate(conn: &mut Connection) -> Result<u32, StateError> {
    let supported = MIGRATIONS.len() as u32;
    loop {
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let version: u32 = tx.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        if version > supported {
            return Err(StateError::TooNew {
                found: version,
                supported,
            });
        }
        let Some(sql) = MIGRATIONS.get(version as usize) else {
            return Ok(version);
        };
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", version + 1)?;
        tx.commit()?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn dev(s: &str) -> DeviceId {
        DeviceId::new(s).unwrap()
    }

    fn supi(n: u32) -> Supi {
        Supi::new(&format!("imsi-00101{n:010}")).unwrap()
    }

    fn pairing(id: &str, key: u8) -> Pairing {
        let spki = vec![0x30, 0x03, key, key, key];
        Pairing {
            device_id: dev(id),
            fingerprint: companion_transport::spki_fingerprint(&spki),
            spki_der: spki,
            label: Some(format!("{id} label")),
            paired_at: 1000,
            paired_via: PairedVia::Code,
        }
    }

    fn request(id: u8, device: &str) -> OutstandingRequest {
        OutstandingRequest {
            request_id: RequestId([id; 16]),
            device_id: dev(device),
            kind: RequestKind::Provision,
            hpke_public_key: vec![9; 32],
            binding: Some(vec![4, 3, 1, 2, 3]),
            renewal_binding: None,
            created_at: 2000 + i64::from(id),
            params: None,
            renew_supi: None,
        }
    }

    fn delivery(id: u8, device: &str, n: u32) -> PendingDelivery {
        PendingDelivery {
            request_id: RequestId([id; 16]),
            device_id: dev(device),
            supi: supi(n),
            expires_at: 100_000,
            sealed: vec![id; 100],
            created_at: 3000,
        }
    }

    #[test]
    fn group_commit_isolates_a_failing_write() {
        // Many writers at once land in shared group commits; the one that breaks a uniqueness
        // rule is rolled back to its savepoint without taking the others with it.
        let dir = tempfile::tempdir().unwrap();
        let s = Arc::new(State::open(dir.path()).unwrap());
        let handles: Vec<_> = (0..64u8)
            .map(|i| {
                let s = s.clone();
                // Requests 0 and 63 are for the same device: exactly one of them must fail.
                let device = if i == 63 {
                    "d-0".to_string()
                } else {
                    format!("d-{i}")
                };
                std::thread::spawn(move || s.insert_request(&request(i, &device)))
            })
            .collect();
        let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        let conflicts = results
            .iter()
            .filter(|r| matches!(r, Err(StateError::Conflict(_))))
            .count();
        assert_eq!(conflicts, 1, "{results:?}");
        assert_eq!(results.iter().filter(|r| r.is_ok()).count(), 63);
        assert_eq!(s.counts().unwrap().outstanding_requests, 63);
        assert_eq!(s.outstanding_requests().unwrap().len(), 63);
    }

    #[test]
    fn async_group_writes_are_durable_when_answered() {
        let dir = tempfile::tempdir().unwrap();
        let s = Arc::new(State::open(dir.path()).unwrap());
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(async {
            let mut set = tokio::task::JoinSet::new();
            for i in 0..100u8 {
                let s = s.clone();
                set.spawn(
                    async move { s.insert_request_async(request(i, &format!("d-{i}"))).await },
                );
            }
            while let Some(r) = set.join_next().await {
                r.unwrap().unwrap();
            }
            // One CN batch's answers in one savepoint.
            let ds: Vec<_> = (0..100u8)
                .map(|i| delivery(i, &format!("d-{i}"), u32::from(i)))
                .collect();
            s.record_issued_all_async(ds).await.unwrap();
            let ack = s
                .acknowledge_async(dev("d-7"), RequestId([7; 16]), 4000)
                .await
                .unwrap();
            assert_eq!(ack, AckOutcome::Acknowledged);
        });
        // A second connection (as after a restart) sees everything answered above.
        drop(s);
        let s = State::open(dir.path()).unwrap();
        let c = s.counts().unwrap();
        assert_eq!(c.outstanding_requests, 0);
        assert_eq!(c.credentials, 100);
        assert_eq!(c.pending_deliveries, 99);
    }

    #[test]
    fn fresh_database_is_private_and_migrated() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("state");
        let s = State::open(&sub).unwrap();
        assert_eq!(s.schema_version().unwrap(), MIGRATIONS.len() as u32);
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&sub), 0o700);
        assert_eq!(mode(s.path()), 0o600);
        assert_eq!(s.counts().unwrap(), Counts::default());
    }

    #[test]
    fn pairings_are_unique_by_device_and_key() {
        let dir = tempfile::tempdir().unwrap();
        let s = State::open(dir.path()).unwrap();
        s.insert_pairing(&pairing("watch-1", 1)).unwrap();
        assert!(matches!(
            s.insert_pairing(&pairing("watch-1", 2)),
            Err(StateError::Conflict(_))
        ));
        assert!(matches!(
            s.insert_pairing(&pairing("watch-2", 1)),
            Err(StateError::Conflict(_))
        ));
        assert!(s.set_label(&dev("watch-1"), Some("wrist")).unwrap());
        assert!(!s.set_label(&dev("nope"), None).unwrap());
        assert_eq!(
            s.pairing(&dev("watch-1"))
                .unwrap()
                .unwrap()
                .label
                .as_deref(),
            Some("wrist")
        );
    }

    #[test]
    fn request_issue_deliver_acknowledge() {
        let dir = tempfile::tempdir().unwrap();
        let s = State::open(dir.path()).unwrap();
        s.insert_pairing(&pairing("watch-1", 1)).unwrap();
        s.insert_request(&request(7, "watch-1")).unwrap();
        // One at a time per device.
        assert!(matches!(
            s.insert_request(&request(8, "watch-1")),
            Err(StateError::Conflict(_))
        ));
        assert_eq!(
            s.request_for_device(&dev("watch-1")).unwrap(),
            Some(request(7, "watch-1"))
        );

        let d = delivery(7, "watch-1", 42);
        s.record_issued(&d).unwrap();
        s.record_issued(&d).unwrap(); // idempotent
        assert_eq!(s.request_for_device(&dev("watch-1")).unwrap(), None);
        assert_eq!(s.pending_for_device(&dev("watch-1")).unwrap(), vec![d]);
        let c = s.credential(&dev("watch-1")).unwrap().unwrap();
        assert_eq!((c.supi.clone(), c.acknowledged_at), (supi(42), None));

        // Another device cannot acknowledge it.
        assert_eq!(
            s.acknowledge(&dev("other"), &RequestId([7; 16]), 5)
                .unwrap(),
            AckOutcome::Unknown
        );
        assert_eq!(
            s.acknowledge(&dev("watch-1"), &RequestId([7; 16]), 5000)
                .unwrap(),
            AckOutcome::Acknowledged
        );
        assert_eq!(
            s.acknowledge(&dev("watch-1"), &RequestId([7; 16]), 5001)
                .unwrap(),
            AckOutcome::AlreadyAcknowledged
        );
        assert!(s.pending_deliveries().unwrap().is_empty());
        assert_eq!(
            s.credential(&dev("watch-1"))
                .unwrap()
                .unwrap()
                .acknowledged_at,
            Some(5000)
        );
        assert_eq!(s.credentials_expiring_by(99_999).unwrap(), vec![]);
        assert_eq!(s.credentials_expiring_by(100_000).unwrap().len(), 1);
    }

    #[test]
    fn revoke_forgets_everything_and_awaits_cn_confirmation() {
        let dir = tempfile::tempdir().unwrap();
        let s = State::open(dir.path()).unwrap();
        s.insert_pairing(&pairing("watch-1", 1)).unwrap();
        s.insert_request(&request(7, "watch-1")).unwrap();
        s.record_issued(&delivery(7, "watch-1", 42)).unwrap();
        s.insert_request(&request(8, "watch-1")).unwrap();
        let r = s.revoke_device(&dev("watch-1"), 9000).unwrap().unwrap();
        assert_eq!(r.supi, Some(supi(42)));
        assert_eq!(s.counts().unwrap().unconfirmed_revocations, 1);
        let c = s.counts().unwrap();
        assert_eq!(
            (
                c.pairings,
                c.credentials,
                c.pending_deliveries,
                c.outstanding_requests
            ),
            (0, 0, 0, 0)
        );
        assert_eq!(s.revoke_device(&dev("watch-1"), 9001).unwrap(), None);
        assert_eq!(s.unconfirmed_revocations().unwrap(), vec![r.clone()]);
        assert!(s.confirm_revocation(r.id, 9100).unwrap());
        assert!(s.unconfirmed_revocations().unwrap().is_empty());
    }

    #[test]
    fn blocks_expire() {
        let dir = tempfile::tempdir().unwrap();
        let s = State::open(dir.path()).unwrap();
        let a: IpAddr = "192.168.1.50".parse().unwrap();
        let b: IpAddr = "fe80::1".parse().unwrap();
        s.block(&Block {
            addr: a,
            until: Some(100),
            created_at: 10,
        })
        .unwrap();
        s.block(&Block {
            addr: b,
            until: None,
            created_at: 10,
        })
        .unwrap();
        assert_eq!(s.blocks(50).unwrap().len(), 2);
        assert_eq!(s.blocks(100).unwrap().len(), 1);
        assert!(s.unblock(b).unwrap());
        assert!(!s.unblock(b).unwrap());
        assert!(s.blocks(0).unwrap().is_empty());
    }

    #[test]
    fn reopen_after_drop_keeps_everything() {
        let dir = tempfile::tempdir().unwrap();
        let (pairings, creds, pending, reqs, revs, blocks);
        {
            let s = State::open(dir.path()).unwrap();
            s.insert_pairing(&pairing("watch-1", 1)).unwrap();
            s.insert_pairing(&pairing("sensor-2", 2)).unwrap();
            s.insert_pairing(&pairing("gone", 3)).unwrap();
            s.insert_request(&request(1, "watch-1")).unwrap();
            s.record_issued(&delivery(1, "watch-1", 1)).unwrap();
            s.insert_request(&request(2, "sensor-2")).unwrap();
            s.revoke_device(&dev("gone"), 77).unwrap();
            s.block(&Block {
                addr: "10.0.0.9".parse().unwrap(),
                until: None,
                created_at: 1,
            })
            .unwrap();
            pairings = s.pairings().unwrap();
            creds = s.credentials().unwrap();
            pending = s.pending_deliveries().unwrap();
            reqs = s.outstanding_requests().unwrap();
            revs = s.unconfirmed_revocations().unwrap();
            blocks = s.blocks(0).unwrap();
        }
        let s = State::open(dir.path()).unwrap();
        assert_eq!(s.pairings().unwrap(), pairings);
        assert_eq!(pairings.len(), 2);
        assert_eq!(s.credentials().unwrap(), creds);
        assert_eq!(s.pending_deliveries().unwrap(), pending);
        assert_eq!(pending.len(), 1);
        assert_eq!(s.outstanding_requests().unwrap(), reqs);
        assert_eq!(reqs, vec![request(2, "sensor-2")]);
        assert_eq!(s.unconfirmed_revocations().unwrap(), revs);
        assert_eq!(s.blocks(0).unwrap(), blocks);
    }

    #[test]
    fn newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        drop(State::open(dir.path()).unwrap());
        let conn = Connection::open(dir.path().join(DB_FILE)).unwrap();
        conn.pragma_update(None, "user_version", 99).unwrap();
        drop(conn);
        let err = State::open(dir.path()).unwrap_err();
        assert!(matches!(err, StateError::TooNew { found: 99, .. }), "{err}");
    }

    #[test]
    fn corrupt_rows_are_typed_errors() {
        let dir = tempfile::tempdir().unwrap();
        let s = State::open(dir.path()).unwrap();
        s.conn()
            .execute(
                "INSERT INTO credentials (device_id, supi, expires_at, request_id)
                 VALUES ('bad id!', 'imsi-001010000000001', 1, zeroblob(16))",
                [],
            )
            .unwrap();
        assert!(matches!(s.credentials(), Err(StateError::Corrupt(_))));
    }

    #[test]
    fn renewal_key_and_superseded_deliveries() {
        let dir = tempfile::tempdir().unwrap();
        let s = State::open(dir.path()).unwrap();
        s.insert_pairing(&pairing("watch-1", 1)).unwrap();
        let mut r = request(7, "watch-1");
        r.params = Some("{}".into());
        r.renewal_binding = Some(vec![4, 3, 7, 7]);
        s.insert_request(&r).unwrap();
        assert_eq!(s.request_for_device(&dev("watch-1")).unwrap(), Some(r));
        s.record_issued(&delivery(7, "watch-1", 42)).unwrap();
        // The renewal key comes with the device's authorisation to renew to it.
        assert_eq!(
            s.renewal_key(&dev("watch-1")).unwrap(),
            Some((vec![9; 32], vec![4, 3, 7, 7]))
        );
        // A renewal issued before the first delivery was acknowledged supersedes it.
        let mut renew = request(8, "watch-1");
        renew.kind = RequestKind::Renew;
        renew.renew_supi = Some(supi(42));
        renew.hpke_public_key = vec![5; 32];
        renew.renewal_binding = Some(vec![4, 3, 8, 8]);
        s.insert_request(&renew).unwrap();
        s.record_issued(&delivery(8, "watch-1", 42)).unwrap();
        let pending = s.pending_for_device(&dev("watch-1")).unwrap();
        assert_eq!(pending.len(), 1);
        assert_eq!(pending[0].request_id, RequestId([8; 16]));
        assert!(
            s.delivery(&dev("watch-1"), &RequestId([8; 16]))
                .unwrap()
                .is_some()
        );
        assert!(
            s.discard_delivery(&dev("watch-1"), &RequestId([8; 16]))
                .unwrap()
        );
        assert_eq!(
            s.renewal_key(&dev("watch-1")).unwrap(),
            Some((vec![5; 32], vec![4, 3, 8, 8]))
        );
        // A credential from a request without an authorisation: no pre-fetch possible.
        let mut bare = request(9, "watch-1");
        bare.kind = RequestKind::Renew;
        bare.renew_supi = Some(supi(42));
        s.insert_request(&bare).unwrap();
        s.record_issued(&delivery(9, "watch-1", 42)).unwrap();
        assert_eq!(s.renewal_key(&dev("watch-1")).unwrap(), None);
    }
    #[test]
    fn bindings_pack_round_trip() {
        let b = KeyBinding {
            scheme: 0x0403,
            signature: vec![1, 2, 3],
        };
        assert_eq!(pack_binding(&b), vec![4, 3, 1, 2, 3]);
        assert_eq!(unpack_binding(&pack_binding(&b)), Some(b));
        assert_eq!(unpack_binding(&[4]), None);
    }
}
