//! The SQLite engine (the default: one process on an embedded database).
//!
//! - One writer connection behind a mutex serialises writes inside this process; every write
//!   transaction is `BEGIN IMMEDIATE`, so writers in *other* processes on the same file are
//!   serialised too (they wait up to the busy timeout).
//! - WAL journal with `synchronous=FULL`: a transaction is on disk when `COMMIT` returns, and
//!   readers never block the writer.
//! - Readers use a small pool of extra connections.
//! - The database file is created with mode 0600; SQLite gives its `-wal`/`-shm` files the same.
//! - Foreign keys are enforced; the audit table refuses UPDATE and DELETE by trigger.

use std::error::Error as StdError;
use std::fs::OpenOptions;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use rusqlite::types::Type;
use rusqlite::{
    Connection, ErrorCode, OpenFlags, OptionalExtension, Row, TransactionBehavior, params,
};

use super::migrations;
use super::{
    AkaFailures, AkaMaterial, AuditAction, AuditEvent, AuditQuery, AuditRecord, Issuance,
    IssuanceKind, ManufacturerRoot, NewChild, OutboxEntry, Store, StoreError, Subscriber,
    SyncBacklog, SyncState, WriteTx,
};
use crate::kek::{Kek, RowId};
use crate::model::{
    Amf, ChildCredential, ChildStatus, DeviceId, Dnn, ImsiRange, KeyFingerprint, NewParent, Parent,
    ParentPolicy, RequestId, Restrictions, SubscriberKeys, SubscriptionStatus, Supi, Timestamp,
};
use crate::policy::IdempotencyKey;
use companion_crypto::aka::Sqn;

/// Tuning of the SQLite engine; the defaults suit one `cn-backend` process.
#[derive(Debug, Clone)]
pub struct SqliteConfig {
    /// How long a writer waits for another process's write lock before [`StoreError::Busy`].
    pub busy_timeout: Duration,
    /// Read connections kept open for reuse.
    pub max_idle_readers: usize,
}

impl Default for SqliteConfig {
    fn default() -> Self {
        Self {
            busy_timeout: Duration::from_secs(10),
            max_idle_readers: 8,
        }
    }
}

/// What [`SqliteStore::settings`] reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SqliteSettings {
    /// `wal` when the write-ahead log is on.
    pub journal_mode: String,
    /// `synchronous = FULL`: commits are fsynced before they return.
    pub synchronous_full: bool,
    /// Foreign keys are enforced.
    pub foreign_keys: bool,
}

/// A [`Store`] on one SQLite database file.
#[derive(Debug)]
pub struct SqliteStore {
    path: PathBuf,
    config: SqliteConfig,
    kek: Kek,
    writer: Mutex<Connection>,
    readers: Mutex<Vec<Connection>>,
    sync_outbox: AtomicBool,
}

const PARENTS: &str = "parents";
const CHILDREN: &str = "children";

/// Maps a rusqlite error onto the engine-neutral [`StoreError`].
pub(crate) fn db_err(e: rusqlite::Error) -> StoreError {
    match &e {
        rusqlite::Error::SqliteFailure(f, _)
            if matches!(f.code, ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) =>
        {
            StoreError::Busy
        }
        rusqlite::Error::FromSqlConversionFailure(..)
        | rusqlite::Error::InvalidColumnType(..)
        | rusqlite::Error::IntegralValueOutOfRange(..) => StoreError::Corrupt(e.to_string()),
        _ => StoreError::Database(e.to_string()),
    }
}

fn is_unique_violation(e: &rusqlite::Error) -> bool {
    matches!(e, rusqlite::Error::SqliteFailure(f, _)
        if f.code == ErrorCode::ConstraintViolation
            && (f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_PRIMARYKEY
                || f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE))
}

fn conv<T, E>(idx: usize, ty: Type, r: Result<T, E>) -> rusqlite::Result<T>
where
    E: StdError + Send + Sync + 'static,
{
    r.map_err(|e| rusqlite::Error::FromSqlConversionFailure(idx, ty, Box::new(e)))
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct BadValue(&'static str);

fn fixed<const N: usize>(row: &Row<'_>, idx: usize) -> rusqlite::Result<[u8; N]> {
    let v: Vec<u8> = row.get(idx)?;
    conv(
        idx,
        Type::Blob,
        v.try_into().map_err(|_| BadValue("wrong blob length")),
    )
}

fn supi_at(row: &Row<'_>, idx: usize) -> rusqlite::Result<Supi> {
    let s: String = row.get(idx)?;
    conv(idx, Type::Text, Supi::parse(&s))
}

fn dnns_at(row: &Row<'_>, idx: usize) -> rusqlite::Result<Vec<Dnn>> {
    let s: String = row.get(idx)?;
    s.split(',')
        .filter(|d| !d.is_empty())
        .map(|d| conv(idx, Type::Text, Dnn::parse(d)))
        .collect()
}

fn join_dnns(dnns: &[Dnn]) -> String {
    dnns.iter().map(Dnn::as_str).collect::<Vec<_>>().join(",")
}

fn u64_at(row: &Row<'_>, idx: usize) -> rusqlite::Result<u64> {
    let v: i64 = row.get(idx)?;
    conv(idx, Type::Integer, u64::try_from(v))
}

fn sqn_at(row: &Row<'_>, idx: usize) -> rusqlite::Result<Sqn> {
    let v = u64_at(row, idx)?;
    conv(idx, Type::Integer, Sqn::new(v))
}

/// A 48-bit SQN always fits in an SQLite integer.
fn sql_sqn(sqn: Sqn) -> i64 {
    i64::try_from(sqn.value()).unwrap_or(i64::MAX)
}

fn sql_u64(v: u64) -> Result<i64, StoreError> {
    i64::try_from(v).map_err(|_| StoreError::Database(format!("value {v} out of range")))
}

const PARENT_COLS: &str = "supi, amf, sqn, status, max_children, max_lifetime_s, roaming_allowed, \
                           allowed_dnns, max_bitrate_kbps, created_at, updated_at, \
                           require_attestation";

fn parent_from_row(row: &Row<'_>) -> rusqlite::Result<Parent> {
    let status: String = row.get(3)?;
    Ok(Parent {
        supi: supi_at(row, 0)?,
        amf: Amf(fixed(row, 1)?),
        sqn: sqn_at(row, 2)?,
        status: conv(3, Type::Text, SubscriptionStatus::parse(&status))?,
        policy: ParentPolicy {
            max_children: row.get(4)?,
            max_lifetime_s: u64_at(row, 5)?,
            roaming_allowed: row.get(6)?,
            allowed_dnns: dnns_at(row, 7)?,
            max_bitrate_kbps: row.get(8)?,
            require_attestation: row.get(11)?,
        },
        created_at: Timestamp(row.get(9)?),
        updated_at: Timestamp(row.get(10)?),
    })
}

const CHILD_COLS: &str = "c.supi, c.parent_supi, c.device_id, c.device_key_fp, c.request_id, \
                          c.amf, c.sqn, c.issued_at, c.expires_at, c.renewed_at, \
                          c.roaming_allowed, c.allowed_dnns, c.max_bitrate_kbps, c.status, \
                          c.revoked_at, c.device_spki";

fn child_from_row(row: &Row<'_>) -> rusqlite::Result<ChildCredential> {
    let device_id: String = row.get(2)?;
    let status: String = row.get(13)?;
    Ok(ChildCredential {
        supi: supi_at(row, 0)?,
        parent: supi_at(row, 1)?,
        device_id: conv(2, Type::Text, DeviceId::parse(&device_id))?,
        device_key_fingerprint: KeyFingerprint(fixed(row, 3)?),
        device_spki: row.get(15)?,
        request_id: RequestId(fixed(row, 4)?),
        amf: Amf(fixed(row, 5)?),
        sqn: sqn_at(row, 6)?,
        issued_at: Timestamp(row.get(7)?),
        expires_at: Timestamp(row.get(8)?),
        renewed_at: row.get::<_, Option<i64>>(9)?.map(Timestamp),
        restrictions: Restrictions {
            roaming_allowed: row.get(10)?,
            allowed_dnns: dnns_at(row, 11)?,
            max_bitrate_kbps: row.get(12)?,
        },
        status: conv(13, Type::Text, ChildStatus::parse(&status))?,
        revoked_at: row.get::<_, Option<i64>>(14)?.map(Timestamp),
    })
}

// ---- queries shared by the reader connections and the write transaction ----

fn q_parent(conn: &Connection, supi: &Supi) -> Result<Option<Parent>, StoreError> {
    conn.prepare_cached(&format!(
        "SELECT {PARENT_COLS} FROM parents WHERE supi = ?1"
    ))
    .and_then(|mut s| s.query_row([supi.as_str()], parent_from_row).optional())
    .map_err(db_err)
}

fn q_child(conn: &Connection, supi: &Supi) -> Result<Option<ChildCredential>, StoreError> {
    conn.prepare_cached(&format!(
        "SELECT {CHILD_COLS} FROM children c WHERE c.supi = ?1"
    ))
    .and_then(|mut s| s.query_row([supi.as_str()], child_from_row).optional())
    .map_err(db_err)
}

fn q_count_active(conn: &Connection, parent: &Supi, now: Timestamp) -> Result<u32, StoreError> {
    conn.prepare_cached(
        "SELECT count(*) FROM children \
         WHERE parent_supi = ?1 AND status = 'active' AND expires_at > ?2",
    )
    .and_then(|mut s| s.query_row(params![parent.as_str(), now.0], |r| r.get(0)))
    .map_err(db_err)
}

fn q_issuance(conn: &Connection, key: &IdempotencyKey) -> Result<Option<Issuance>, StoreError> {
    conn.prepare_cached(
        "SELECT child_supi, kind, sealed, created_at FROM issuances \
         WHERE parent_supi = ?1 AND device_id = ?2 AND request_id = ?3",
    )
    .and_then(|mut s| {
        s.query_row(
            params![
                key.parent.as_str(),
                key.device_id.as_str(),
                key.request_id.0.as_slice()
            ],
            |r| {
                let kind: String = r.get(1)?;
                Ok(Issuance {
                    child_supi: supi_at(r, 0)?,
                    kind: conv(
                        1,
                        Type::Text,
                        IssuanceKind::parse(&kind).ok_or(BadValue("unknown issuance kind")),
                    )?,
                    sealed: r.get(2)?,
                    created_at: Timestamp(r.get(3)?),
                })
            },
        )
        .optional()
    })
    .map_err(db_err)
}

fn q_aka_failures(conn: &Connection, supi: &Supi) -> Result<AkaFailures, StoreError> {
    conn.prepare_cached("SELECT count, first_at, last_at FROM aka_failures WHERE supi = ?1")
        .and_then(|mut s| {
            s.query_row([supi.as_str()], |r| {
                Ok(AkaFailures {
                    count: r.get(0)?,
                    first_at: Some(Timestamp(r.get(1)?)),
                    last_at: Some(Timestamp(r.get(2)?)),
                })
            })
            .optional()
        })
        .map(Option::unwrap_or_default)
        .map_err(db_err)
}

/// Uniform random draws [`SqliteStore`]'s allocator makes before it falls back to a scan.
const RANDOM_PROBES: usize = 32;

/// A uniformly random MSIN of `range`, from the operating system's CSPRNG (rejection
/// sampling: no modulo bias), so a child SUPI says nothing about the others.
fn random_msin(range: &ImsiRange) -> Result<u64, StoreError> {
    let span = range.last_msin() - range.first_msin() + 1;
    // The largest multiple of `span` that fits in u64: draws at or above it are redrawn
    // (fewer than half of them, as span <= 10^10 < 2^63).
    let zone = u64::MAX - (u64::MAX % span);
    loop {
        let mut b = [0u8; 8];
        getrandom::fill(&mut b).map_err(|_| StoreError::Kek(crate::kek::KekError::Rng))?;
        let x = u64::from_le_bytes(b);
        if x < zone {
            return Ok(range.first_msin() + x % span);
        }
    }
}

/// The SUPI of `msin`, which the caller drew from `range`.
fn range_supi(range: &ImsiRange, msin: u64) -> Result<Supi, StoreError> {
    range.supi(msin).ok_or_else(|| {
        StoreError::Database(format!(
            "MSIN {msin} outside the IMSI range {}",
            range.plmn()
        ))
    })
}

/// The first MSIN in `from..=to` of `range` that no parent or child holds: one walk, in order,
/// over the SUPIs taken in that span (same width within a PLMN, so text order is numeric).
fn first_free(
    conn: &Connection,
    range: &ImsiRange,
    from: u64,
    to: u64,
) -> Result<Option<u64>, StoreError> {
    let (Some(lo), Some(hi)) = (range.supi(from), range.supi(to)) else {
        return Ok(None);
    };
    let prefix_len = "imsi-".len() + range.plmn().len();
    let mut stmt = conn
        .prepare_cached(
            "SELECT supi FROM children WHERE supi BETWEEN ?1 AND ?2 \
             UNION SELECT supi FROM parents WHERE supi BETWEEN ?1 AND ?2 ORDER BY 1",
        )
        .map_err(db_err)?;
    let mut rows = stmt.query([lo.as_str(), hi.as_str()]).map_err(db_err)?;
    let mut expected = from;
    while let Some(row) = rows.next().map_err(db_err)? {
        let taken: String = row.get(0).map_err(db_err)?;
        let Some(msin) = taken.get(prefix_len..).and_then(|d| d.parse::<u64>().ok()) else {
            continue;
        };
        if msin > expected {
            return Ok(Some(expected));
        }
        expected = expected.max(msin + 1);
        if expected > to {
            return Ok(None);
        }
    }
    Ok((expected <= to).then_some(expected))
}

fn q_supi_taken(conn: &Connection, supi: &Supi) -> Result<bool, StoreError> {
    conn.prepare_cached(
        "SELECT EXISTS (SELECT 1 FROM parents WHERE supi = ?1) \
             OR EXISTS (SELECT 1 FROM children WHERE supi = ?1)",
    )
    .and_then(|mut s| s.query_row([supi.as_str()], |r| r.get(0)))
    .map_err(db_err)
}

fn audit_from_row(row: &Row<'_>) -> rusqlite::Result<AuditRecord> {
    let action: String = row.get(3)?;
    let parent: Option<String> = row.get(5)?;
    let device: Option<String> = row.get(6)?;
    let request: Option<Vec<u8>> = row.get(7)?;
    Ok(AuditRecord {
        id: row.get(0)?,
        event: AuditEvent {
            at: Timestamp(row.get(1)?),
            actor: row.get(2)?,
            action: conv(
                3,
                Type::Text,
                AuditAction::parse(&action).ok_or(BadValue("unknown audit action")),
            )?,
            supi: supi_at(row, 4)?,
            parent: parent
                .map(|p| conv(5, Type::Text, Supi::parse(&p)))
                .transpose()?,
            device_id: device
                .map(|d| conv(6, Type::Text, DeviceId::parse(&d)))
                .transpose()?,
            request_id: request
                .map(|r| {
                    conv(
                        7,
                        Type::Blob,
                        <[u8; 16]>::try_from(r).map_err(|_| BadValue("wrong request ID length")),
                    )
                    .map(RequestId)
                })
                .transpose()?,
            detail: row.get(8)?,
        },
    })
}

fn configure(conn: &Connection, config: &SqliteConfig) -> Result<(), StoreError> {
    conn.busy_timeout(config.busy_timeout).map_err(db_err)?;
    let mode: String = conn
        .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
        .map_err(db_err)?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(StoreError::Database(format!(
            "could not enable WAL journal mode (got {mode})"
        )));
    }
    conn.execute_batch(
        "PRAGMA synchronous = FULL;
         PRAGMA foreign_keys = ON;
         PRAGMA trusted_schema = OFF;",
    )
    .map_err(db_err)?;
    Ok(())
}

impl SqliteStore {
    /// Opens (creating if needed, mode 0600) the database at `path`, applies pending migrations
    /// and checks that `kek` is the key the database was created with.
    pub fn open(path: &Path, kek: Kek, config: SqliteConfig) -> Result<Self, StoreError> {
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path)
            .map_err(|e| StoreError::Database(format!("{}: {e}", path.display())))?;
        let mut writer = Self::connect(path, &config)?;
        // The writer walks the parent's index for the quota count and appends to four tables
        // and five indexes in every batch; with SQLite's default 2 MiB page cache a store of a
        // few ten thousand credentials no longer fits, and every batch re-reads pages through
        // pread(2) (seen in profiles of batch issuance). The cache only grows as pages are used.
        writer
            .execute_batch("PRAGMA cache_size = -32768;")
            .map_err(db_err)?;
        migrations::migrate(&mut writer)?;
        let store = Self {
            path: path.to_owned(),
            config,
            kek,
            writer: Mutex::new(writer),
            readers: Mutex::new(Vec::new()),
            sync_outbox: AtomicBool::new(false),
        };
        store.check_kek()?;
        Ok(store)
    }

    fn connect(path: &Path, config: &SqliteConfig) -> Result<Connection, StoreError> {
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_WRITE
                | OpenFlags::SQLITE_OPEN_NO_MUTEX
                | OpenFlags::SQLITE_OPEN_URI,
        )
        .map_err(db_err)?;
        configure(&conn, config)?;
        Ok(conn)
    }

    fn check_kek(&self) -> Result<(), StoreError> {
        let mut conn = self.writer.lock().unwrap_or_else(PoisonError::into_inner);
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(db_err)?;
        let stored: Option<Vec<u8>> = tx
            .query_row("SELECT value FROM meta WHERE key = 'kek_check'", [], |r| {
                r.get(0)
            })
            .optional()
            .map_err(db_err)?;
        match stored {
            Some(v) if self.kek.verify_check(&v) => Ok(()),
            Some(_) => Err(StoreError::WrongKek),
            None => {
                tx.execute(
                    "INSERT INTO meta (key, value) VALUES ('kek_check', ?1)",
                    [self.kek.check_value()?],
                )
                .map_err(db_err)?;
                tx.commit().map_err(db_err)
            }
        }
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The durability-relevant settings of the writer connection, as SQLite reports them.
    pub fn settings(&self) -> Result<SqliteSettings, StoreError> {
        let conn = self.writer.lock().unwrap_or_else(PoisonError::into_inner);
        let get = |pragma: &str| -> Result<String, StoreError> {
            conn.query_row(&format!("PRAGMA {pragma}"), [], |r| {
                r.get::<_, rusqlite::types::Value>(0)
            })
            .map(|v| match v {
                rusqlite::types::Value::Integer(i) => i.to_string(),
                rusqlite::types::Value::Text(t) => t,
                other => format!("{other:?}"),
            })
            .map_err(db_err)
        };
        Ok(SqliteSettings {
            journal_mode: get("journal_mode")?,
            synchronous_full: get("synchronous")? == "2",
            foreign_keys: get("foreign_keys")? == "1",
        })
    }

    /// The schema version of the open database.
    pub fn schema_version(&self) -> Result<u32, StoreError> {
        self.read(migrations::current_version)
    }

    fn read<T>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let pooled = self
            .readers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop();
        let conn = match pooled {
            Some(c) => c,
            None => Self::connect(&self.path, &self.config)?,
        };
        let out = f(&conn);
        let mut pool = self.readers.lock().unwrap_or_else(PoisonError::into_inner);
        if pool.len() < self.config.max_idle_readers {
            pool.push(conn);
        }
        out
    }
}

/// Encrypted K and OPc as stored.
type EncKeys = (Vec<u8>, Vec<u8>);

/// A write transaction on the SQLite engine.
struct SqliteTx<'a> {
    conn: &'a Connection,
    kek: &'a Kek,
    /// The sync outbox is on ([`Store::set_sync_outbox`]).
    sync_outbox: bool,
}

impl SqliteTx<'_> {
    fn seal_keys(
        &self,
        table: &str,
        supi: &Supi,
        keys: &SubscriberKeys,
    ) -> Result<(Vec<u8>, Vec<u8>), StoreError> {
        let id = |column| RowId {
            table,
            row: supi.as_str(),
            column,
        };
        Ok((
            self.kek.seal(id("k"), &keys.k)?,
            self.kek.seal(id("opc"), &keys.opc)?,
        ))
    }

    fn open_keys(
        &self,
        table: &str,
        supi: &Supi,
        k: &[u8],
        opc: &[u8],
    ) -> Result<SubscriberKeys, StoreError> {
        let id = |column| RowId {
            table,
            row: supi.as_str(),
            column,
        };
        Ok(SubscriberKeys {
            k: self.kek.open(id("k"), k)?,
            opc: self.kek.open(id("opc"), opc)?,
        })
    }

    fn enc_keys(&self, table: &str, supi: &Supi) -> Result<Option<EncKeys>, StoreError> {
        let sql = if table == PARENTS {
            "SELECT k_enc, opc_enc FROM parents WHERE supi = ?1"
        } else {
            "SELECT k_enc, opc_enc FROM children WHERE supi = ?1"
        };
        self.conn
            .prepare_cached(sql)
            .and_then(|mut s| {
                s.query_row([supi.as_str()], |r| Ok((r.get(0)?, r.get(1)?)))
                    .optional()
            })
            .map_err(db_err)
    }
}

impl WriteTx for SqliteTx<'_> {
    fn lock_parent(&mut self, supi: &Supi) -> Result<Option<Parent>, StoreError> {
        // BEGIN IMMEDIATE already holds the database's single write lock.
        q_parent(self.conn, supi)
    }

    fn insert_parent(&mut self, parent: &NewParent, now: Timestamp) -> Result<(), StoreError> {
        if q_supi_taken(self.conn, &parent.supi)? {
            return Err(StoreError::Duplicate(parent.supi.clone()));
        }
        let (k, opc) = self.seal_keys(PARENTS, &parent.supi, &parent.keys)?;
        let p = &parent.policy;
        let max_lifetime_s = sql_u64(p.max_lifetime_s)?;
        self.conn
            .prepare_cached(
                "INSERT INTO parents (supi, k_enc, opc_enc, amf, sqn, status, max_children, \
                 max_lifetime_s, roaming_allowed, allowed_dnns, max_bitrate_kbps, created_at, \
                 updated_at, require_attestation) \
                 VALUES (?1, ?2, ?3, ?4, ?5, 'active', ?6, ?7, ?8, ?9, ?10, ?11, ?11, ?12)",
            )
            .and_then(|mut s| {
                s.execute(params![
                    parent.supi.as_str(),
                    k,
                    opc,
                    parent.amf.0.as_slice(),
                    sql_sqn(parent.sqn),
                    p.max_children,
                    max_lifetime_s,
                    p.roaming_allowed,
                    join_dnns(&p.allowed_dnns),
                    p.max_bitrate_kbps,
                    now.0,
                    p.require_attestation,
                ])
            })
            .map_err(|e| {
                if is_unique_violation(&e) {
                    StoreError::Duplicate(parent.supi.clone())
                } else {
                    db_err(e)
                }
            })?;
        Ok(())
    }

    fn set_parent_status(
        &mut self,
        supi: &Supi,
        status: SubscriptionStatus,
        now: Timestamp,
    ) -> Result<(), StoreError> {
        let n = self
            .conn
            .execute(
                "UPDATE parents SET status = ?2, updated_at = ?3 WHERE supi = ?1",
                params![supi.as_str(), status.as_str(), now.0],
            )
            .map_err(db_err)?;
        if n == 0 {
            return Err(StoreError::ParentNotFound(supi.clone()));
        }
        Ok(())
    }

    fn set_parent_policy(
        &mut self,
        supi: &Supi,
        policy: &ParentPolicy,
        now: Timestamp,
    ) -> Result<(), StoreError> {
        let n = self
            .conn
            .execute(
                "UPDATE parents SET max_children = ?2, max_lifetime_s = ?3, roaming_allowed = ?4, \
                 allowed_dnns = ?5, max_bitrate_kbps = ?6, updated_at = ?7, \
                 require_attestation = ?8 WHERE supi = ?1",
                params![
                    supi.as_str(),
                    policy.max_children,
                    sql_u64(policy.max_lifetime_s)?,
                    policy.roaming_allowed,
                    join_dnns(&policy.allowed_dnns),
                    policy.max_bitrate_kbps,
                    now.0,
                    policy.require_attestation
                ],
            )
            .map_err(db_err)?;
        if n == 0 {
            return Err(StoreError::ParentNotFound(supi.clone()));
        }
        Ok(())
    }

    /// O(1) per parent (amortised): the parent's counter after the reconciliation below.
    ///
    /// Invariant I1 (schema v5's triggers, whatever writes the row): `parents.live_children`
    /// = #{children of the parent with `status = 'active'` and `quota_counted = 1`}.
    /// The update below sets `quota_counted = (expires_at > now)` on exactly the active
    /// children where the two differ, found through the two partial indexes; afterwards every
    /// active child is counted iff it has not expired at `now`, so by I1 the counter equals
    /// #{active children with `expires_at > now`}, what the scan of `q_count_active` returns
    /// (I2, for any `now`, also one earlier than a previous batch's). Each child flips when time
    /// passes its expiry (once, on monotonic clocks), so the work is amortised O(1) per child.
    /// The write lock of the transaction serialises it with every other writer.
    fn count_active_children(&mut self, parent: &Supi, now: Timestamp) -> Result<u32, StoreError> {
        self.conn
            .prepare_cached(
                "UPDATE children SET quota_counted = 1 - quota_counted WHERE supi IN ( \
                   SELECT supi FROM children INDEXED BY children_counted_expiry \
                    WHERE parent_supi = ?1 AND status = 'active' AND quota_counted = 1 \
                      AND expires_at <= ?2 \
                   UNION ALL \
                   SELECT supi FROM children INDEXED BY children_uncounted_expiry \
                    WHERE parent_supi = ?1 AND status = 'active' AND quota_counted = 0 \
                      AND expires_at > ?2)",
            )
            .and_then(|mut s| s.execute(params![parent.as_str(), now.0]))
            .map_err(db_err)?;
        self.conn
            .prepare_cached("SELECT live_children FROM parents WHERE supi = ?1")
            .and_then(|mut s| s.query_row([parent.as_str()], |r| r.get(0)).optional())
            .map_err(db_err)?
            .ok_or_else(|| StoreError::ParentNotFound(parent.clone()))
    }

    fn issuance(&mut self, key: &IdempotencyKey) -> Result<Option<Issuance>, StoreError> {
        q_issuance(self.conn, key)
    }

    fn insert_issuance(
        &mut self,
        key: &IdempotencyKey,
        issuance: &Issuance,
    ) -> Result<(), StoreError> {
        self.conn
            .prepare_cached(
                "INSERT INTO issuances (parent_supi, device_id, request_id, child_supi, kind, \
                 sealed, created_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )
            .and_then(|mut s| {
                s.execute(params![
                    key.parent.as_str(),
                    key.device_id.as_str(),
                    key.request_id.0.as_slice(),
                    issuance.child_supi.as_str(),
                    issuance.kind.as_str(),
                    issuance.sealed,
                    issuance.created_at.0,
                ])
            })
            .map_err(db_err)?;
        Ok(())
    }

    fn child(&mut self, supi: &Supi) -> Result<Option<ChildCredential>, StoreError> {
        q_child(self.conn, supi)
    }

    fn keys(&mut self, supi: &Supi) -> Result<Option<SubscriberKeys>, StoreError> {
        for table in [PARENTS, CHILDREN] {
            if let Some((k, opc)) = self.enc_keys(table, supi)? {
                return self.open_keys(table, supi, &k, &opc).map(Some);
            }
        }
        Ok(None)
    }

    fn allocate_supi(&mut self, range: &ImsiRange) -> Result<Supi, StoreError> {
        // Uniform draws first: while the range is less than ~90 % taken, one of them is free
        // with near certainty (all RANDOM_PROBES taken at a fill of f happens with f^32).
        for _ in 0..RANDOM_PROBES {
            let msin = random_msin(range)?;
            let supi = range_supi(range, msin)?;
            // Skip SUPIs already issued or imported as parents.
            if !q_supi_taken(self.conn, &supi)? {
                return Ok(supi);
            }
        }
        // Nearly full: the first free MSIN at or after a random point (wrapping around), found
        // with one ordered walk over the taken SUPIs of the range instead of more draws.
        let start = random_msin(range)?;
        if let Some(msin) = first_free(self.conn, range, start, range.last_msin())? {
            return range_supi(range, msin);
        }
        if start > range.first_msin()
            && let Some(msin) = first_free(self.conn, range, range.first_msin(), start - 1)?
        {
            return range_supi(range, msin);
        }
        Err(StoreError::ImsiRangeExhausted(format!(
            "{}:{}-{}",
            range.plmn(),
            range.first_msin(),
            range.last_msin()
        )))
    }

    fn children_issued_since(
        &mut self,
        parent: &Supi,
        since: Timestamp,
    ) -> Result<(u32, Option<Timestamp>), StoreError> {
        self.conn
            .prepare_cached(
                "SELECT count(*), min(issued_at) FROM children \
                 WHERE parent_supi = ?1 AND issued_at >= ?2",
            )
            .and_then(|mut s| {
                s.query_row(params![parent.as_str(), since.0], |r| {
                    Ok((r.get(0)?, r.get::<_, Option<i64>>(1)?.map(Timestamp)))
                })
            })
            .map_err(db_err)
    }

    fn item_savepoint(&mut self) -> Result<(), StoreError> {
        self.conn
            .execute_batch("SAVEPOINT batch_item")
            .map_err(db_err)
    }

    fn release_item(&mut self) -> Result<(), StoreError> {
        self.conn
            .execute_batch("RELEASE batch_item")
            .map_err(db_err)
    }

    fn rollback_item(&mut self) -> Result<(), StoreError> {
        self.conn
            .execute_batch("ROLLBACK TO batch_item; RELEASE batch_item")
            .map_err(db_err)
    }

    fn insert_child(&mut self, new: &NewChild) -> Result<(), StoreError> {
        let c = &new.child;
        let (k, opc) = self.seal_keys(CHILDREN, &c.supi, &new.keys)?;
        self.conn
            .prepare_cached(
                "INSERT INTO children (supi, parent_supi, device_id, device_key_fp, request_id, \
                 k_enc, opc_enc, amf, sqn, issued_at, expires_at, renewed_at, roaming_allowed, \
                 allowed_dnns, max_bitrate_kbps, status, revoked_at, device_spki) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, \
                 ?18)",
            )
            .and_then(|mut s| {
                s.execute(params![
                    c.supi.as_str(),
                    c.parent.as_str(),
                    c.device_id.as_str(),
                    c.device_key_fingerprint.0.as_slice(),
                    c.request_id.0.as_slice(),
                    k,
                    opc,
                    c.amf.0.as_slice(),
                    sql_sqn(c.sqn),
                    c.issued_at.0,
                    c.expires_at.0,
                    c.renewed_at.map(|t| t.0),
                    c.restrictions.roaming_allowed,
                    join_dnns(&c.restrictions.allowed_dnns),
                    c.restrictions.max_bitrate_kbps,
                    c.status.as_str(),
                    c.revoked_at.map(|t| t.0),
                    c.device_spki,
                ])
            })
            .map_err(|e| {
                if is_unique_violation(&e) {
                    StoreError::Duplicate(c.supi.clone())
                } else {
                    db_err(e)
                }
            })?;
        Ok(())
    }

    fn renew_child(
        &mut self,
        supi: &Supi,
        expires_at: Timestamp,
        restrictions: &Restrictions,
        now: Timestamp,
    ) -> Result<(), StoreError> {
        let n = self
            .conn
            .execute(
                "UPDATE children SET expires_at = ?2, roaming_allowed = ?3, allowed_dnns = ?4, \
                 max_bitrate_kbps = ?5, renewed_at = ?6 WHERE supi = ?1",
                params![
                    supi.as_str(),
                    expires_at.0,
                    restrictions.roaming_allowed,
                    join_dnns(&restrictions.allowed_dnns),
                    restrictions.max_bitrate_kbps,
                    now.0
                ],
            )
            .map_err(db_err)?;
        if n == 0 {
            return Err(StoreError::ChildNotFound(supi.clone()));
        }
        Ok(())
    }

    fn revoke_child(&mut self, supi: &Supi, now: Timestamp) -> Result<bool, StoreError> {
        let n = self
            .conn
            .execute(
                "UPDATE children SET status = 'revoked', revoked_at = ?2 \
                 WHERE supi = ?1 AND status = 'active'",
                params![supi.as_str(), now.0],
            )
            .map_err(db_err)?;
        if n == 0 && q_child(self.conn, supi)?.is_none() {
            return Err(StoreError::ChildNotFound(supi.clone()));
        }
        Ok(n == 1)
    }

    fn revoke_children_of(
        &mut self,
        parent: &Supi,
        now: Timestamp,
    ) -> Result<Vec<ChildCredential>, StoreError> {
        let mut revoked: Vec<ChildCredential> = self
            .conn
            .prepare_cached(&format!(
                "SELECT {CHILD_COLS} FROM children c \
                 WHERE c.parent_supi = ?1 AND c.status = 'active' ORDER BY c.supi"
            ))
            .and_then(|mut s| {
                s.query_map([parent.as_str()], child_from_row)?
                    .collect::<rusqlite::Result<Vec<_>>>()
            })
            .map_err(db_err)?;
        self.conn
            .execute(
                "UPDATE children SET status = 'revoked', revoked_at = ?2 \
                 WHERE parent_supi = ?1 AND status = 'active'",
                params![parent.as_str(), now.0],
            )
            .map_err(db_err)?;
        for c in &mut revoked {
            c.status = ChildStatus::Revoked;
            c.revoked_at = Some(now);
        }
        Ok(revoked)
    }

    fn aka_material(&mut self, supi: &Supi) -> Result<Option<AkaMaterial>, StoreError> {
        if let Some(parent) = q_parent(self.conn, supi)? {
            let Some((k, opc)) = self.enc_keys(PARENTS, supi)? else {
                return Ok(None);
            };
            let keys = self.open_keys(PARENTS, supi, &k, &opc)?;
            return Ok(Some(AkaMaterial {
                amf: parent.amf,
                sqn: parent.sqn,
                keys,
                subscriber: Subscriber::Parent(parent),
            }));
        }
        let Some(child) = q_child(self.conn, supi)? else {
            return Ok(None);
        };
        let parent = q_parent(self.conn, &child.parent)?
            .ok_or_else(|| StoreError::Corrupt(format!("{supi} has no parent row")))?;
        let Some((k, opc)) = self.enc_keys(CHILDREN, supi)? else {
            return Ok(None);
        };
        let keys = self.open_keys(CHILDREN, supi, &k, &opc)?;
        Ok(Some(AkaMaterial {
            amf: child.amf,
            sqn: child.sqn,
            keys,
            subscriber: Subscriber::Child {
                child,
                parent_status: parent.status,
            },
        }))
    }

    fn set_sqn(&mut self, supi: &Supi, sqn: Sqn) -> Result<(), StoreError> {
        let sqn = sql_sqn(sqn);
        for sql in [
            "UPDATE parents SET sqn = ?2 WHERE supi = ?1",
            "UPDATE children SET sqn = ?2 WHERE supi = ?1",
        ] {
            let n = self
                .conn
                .prepare_cached(sql)
                .and_then(|mut s| s.execute(params![supi.as_str(), sqn]))
                .map_err(db_err)?;
            if n > 0 {
                return Ok(());
            }
        }
        Err(StoreError::UnknownSupi(supi.clone()))
    }

    fn record_aka_failure(
        &mut self,
        supi: &Supi,
        now: Timestamp,
    ) -> Result<AkaFailures, StoreError> {
        self.conn
            .prepare_cached(
                "INSERT INTO aka_failures (supi, count, first_at, last_at) VALUES (?1, 1, ?2, ?2) \
                 ON CONFLICT (supi) DO UPDATE SET count = count + 1, last_at = excluded.last_at \
                 RETURNING count, first_at, last_at",
            )
            .and_then(|mut s| {
                s.query_row(params![supi.as_str(), now.0], |r| {
                    Ok(AkaFailures {
                        count: r.get(0)?,
                        first_at: Some(Timestamp(r.get(1)?)),
                        last_at: Some(Timestamp(r.get(2)?)),
                    })
                })
            })
            .map_err(db_err)
    }

    fn clear_aka_failures(&mut self, supi: &Supi) -> Result<(), StoreError> {
        self.conn
            .execute("DELETE FROM aka_failures WHERE supi = ?1", [supi.as_str()])
            .map_err(db_err)?;
        Ok(())
    }

    fn enqueue_sync(&mut self, supi: &Supi, now: Timestamp) -> Result<(), StoreError> {
        if !self.sync_outbox {
            return Ok(());
        }
        self.conn
            .prepare_cached("INSERT INTO sync_outbox (supi, created_at) VALUES (?1, ?2)")
            .and_then(|mut s| s.execute(params![supi.as_str(), now.0]))
            .map_err(db_err)?;
        Ok(())
    }

    fn ack_sync(
        &mut self,
        supi: &Supi,
        up_to: i64,
        present: bool,
        now: Timestamp,
    ) -> Result<(), StoreError> {
        self.conn
            .execute(
                "DELETE FROM sync_outbox WHERE supi = ?1 AND id <= ?2",
                params![supi.as_str(), up_to],
            )
            .map_err(db_err)?;
        self.conn
            .execute(
                "INSERT INTO sync_state (supi, present, pushed_at) VALUES (?1, ?2, ?3) \
                 ON CONFLICT (supi) DO UPDATE SET present = excluded.present, \
                 pushed_at = excluded.pushed_at",
                params![supi.as_str(), present, now.0],
            )
            .map_err(db_err)?;
        Ok(())
    }

    fn sync_lease(
        &mut self,
        holder: &str,
        now: Timestamp,
        until: Timestamp,
    ) -> Result<bool, StoreError> {
        self.conn
            .execute(
                "INSERT INTO sync_lease (id, holder, until) VALUES (1, ?1, ?2) \
                 ON CONFLICT (id) DO UPDATE SET holder = excluded.holder, until = excluded.until \
                 WHERE sync_lease.holder = excluded.holder OR sync_lease.until < ?3",
                params![holder, until.0, now.0],
            )
            .map_err(db_err)?;
        let held: String = self
            .conn
            .query_row("SELECT holder FROM sync_lease WHERE id = 1", [], |r| {
                r.get(0)
            })
            .map_err(db_err)?;
        Ok(held == holder)
    }

    fn append_audit(&mut self, e: &AuditEvent) -> Result<(), StoreError> {
        self.conn
            .prepare_cached(
                "INSERT INTO audit (at, actor, action, supi, parent_supi, device_id, request_id, \
                 detail) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            )
            .and_then(|mut s| {
                s.execute(params![
                    e.at.0,
                    e.actor,
                    e.action.as_str(),
                    e.supi.as_str(),
                    e.parent.as_ref().map(Supi::as_str),
                    e.device_id.as_ref().map(DeviceId::as_str),
                    e.request_id.as_ref().map(|r| r.0.to_vec()),
                    e.detail,
                ])
            })
            .map_err(db_err)?;
        Ok(())
    }
}

impl Store for SqliteStore {
    fn write_tx(
        &self,
        f: &mut dyn FnMut(&mut dyn WriteTx) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let mut conn = self.writer.lock().unwrap_or_else(PoisonError::into_inner);
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(db_err)?;
        let mut stx = SqliteTx {
            conn: &tx,
            kek: &self.kek,
            sync_outbox: self.sync_outbox.load(Ordering::Relaxed),
        };
        // On error `tx` is dropped, which rolls back.
        f(&mut stx)?;
        tx.commit().map_err(db_err)
    }

    fn parent(&self, supi: &Supi) -> Result<Option<Parent>, StoreError> {
        self.read(|c| q_parent(c, supi))
    }

    fn list_parents(&self, after: Option<&Supi>, limit: u32) -> Result<Vec<Parent>, StoreError> {
        self.read(|c| {
            c.prepare_cached(&format!(
                "SELECT {PARENT_COLS} FROM parents WHERE supi > ?1 ORDER BY supi LIMIT ?2"
            ))
            .and_then(|mut s| {
                s.query_map(
                    params![after.map_or("", Supi::as_str), limit],
                    parent_from_row,
                )?
                .collect()
            })
            .map_err(db_err)
        })
    }

    fn count_parents(&self) -> Result<u64, StoreError> {
        self.read(|c| {
            c.query_row("SELECT count(*) FROM parents", [], |r| u64_at(r, 0))
                .map_err(db_err)
        })
    }

    fn child(&self, supi: &Supi) -> Result<Option<ChildCredential>, StoreError> {
        self.read(|c| q_child(c, supi))
    }

    fn children_of(&self, parent: &Supi) -> Result<Vec<ChildCredential>, StoreError> {
        self.read(|c| {
            c.prepare_cached(&format!(
                "SELECT {CHILD_COLS} FROM children c WHERE c.parent_supi = ?1 ORDER BY c.supi"
            ))
            .and_then(|mut s| s.query_map([parent.as_str()], child_from_row)?.collect())
            .map_err(db_err)
        })
    }

    fn count_active_children(&self, parent: &Supi, now: Timestamp) -> Result<u32, StoreError> {
        self.read(|c| q_count_active(c, parent, now))
    }

    fn issuance(&self, key: &IdempotencyKey) -> Result<Option<Issuance>, StoreError> {
        self.read(|c| q_issuance(c, key))
    }

    fn aka_failures(&self, supi: &Supi) -> Result<AkaFailures, StoreError> {
        self.read(|c| q_aka_failures(c, supi))
    }

    fn manufacturer_roots(&self) -> Result<Vec<ManufacturerRoot>, StoreError> {
        self.read(|c| {
            c.prepare_cached(
                "SELECT name, cert, fingerprint, subject, added_at FROM manufacturer_roots \
                 ORDER BY name",
            )
            .and_then(|mut s| {
                s.query_map([], |row| {
                    Ok(ManufacturerRoot {
                        name: row.get(0)?,
                        cert_der: row.get(1)?,
                        fingerprint: fixed(row, 2)?,
                        subject: row.get(3)?,
                        added_at: Timestamp(row.get(4)?),
                    })
                })?
                .collect()
            })
            .map_err(db_err)
        })
    }

    fn add_manufacturer_root(&self, root: &ManufacturerRoot) -> Result<(), StoreError> {
        let conn = self.writer.lock().unwrap_or_else(PoisonError::into_inner);
        conn.execute(
            "INSERT INTO manufacturer_roots (name, cert, fingerprint, subject, added_at) \
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![
                root.name,
                root.cert_der,
                root.fingerprint.as_slice(),
                root.subject,
                root.added_at.0
            ],
        )
        .map_err(|e| {
            if is_unique_violation(&e) {
                StoreError::RootExists(root.name.clone())
            } else {
                db_err(e)
            }
        })?;
        Ok(())
    }

    fn remove_manufacturer_root(&self, name: &str) -> Result<bool, StoreError> {
        let conn = self.writer.lock().unwrap_or_else(PoisonError::into_inner);
        let n = conn
            .execute("DELETE FROM manufacturer_roots WHERE name = ?1", [name])
            .map_err(db_err)?;
        Ok(n > 0)
    }

    fn set_sync_outbox(&self, on: bool) {
        self.sync_outbox.store(on, Ordering::Relaxed);
    }

    fn sync_outbox(&self) -> bool {
        self.sync_outbox.load(Ordering::Relaxed)
    }

    fn sync_pending(&self, limit: u32) -> Result<Vec<OutboxEntry>, StoreError> {
        self.read(|c| {
            c.prepare_cached("SELECT id, supi, created_at FROM sync_outbox ORDER BY id LIMIT ?1")
                .and_then(|mut s| {
                    s.query_map([limit], |r| {
                        Ok(OutboxEntry {
                            id: r.get(0)?,
                            supi: supi_at(r, 1)?,
                            created_at: Timestamp(r.get(2)?),
                        })
                    })?
                    .collect()
                })
                .map_err(db_err)
        })
    }

    fn sync_backlog(&self) -> Result<SyncBacklog, StoreError> {
        self.read(|c| {
            c.query_row(
                "SELECT count(*), min(created_at) FROM sync_outbox",
                [],
                |r| {
                    Ok(SyncBacklog {
                        pending: u64_at(r, 0)?,
                        oldest: r.get::<_, Option<i64>>(1)?.map(Timestamp),
                    })
                },
            )
            .map_err(db_err)
        })
    }

    fn sync_state(&self, supi: &Supi) -> Result<Option<SyncState>, StoreError> {
        self.read(|c| {
            let pushed: Option<(bool, i64)> = c
                .query_row(
                    "SELECT present, pushed_at FROM sync_state WHERE supi = ?1",
                    [supi.as_str()],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()
                .map_err(db_err)?;
            let pending: i64 = c
                .query_row(
                    "SELECT count(*) FROM sync_outbox WHERE supi = ?1",
                    [supi.as_str()],
                    |r| r.get(0),
                )
                .map_err(db_err)?;
            if pushed.is_none() && pending == 0 {
                return Ok(None);
            }
            Ok(Some(SyncState {
                present: pushed.map(|p| p.0),
                pushed_at: pushed.map(|p| Timestamp(p.1)),
                pending: u64::try_from(pending).unwrap_or(0),
            }))
        })
    }

    fn sync_expired(&self, now: Timestamp, limit: u32) -> Result<Vec<Supi>, StoreError> {
        self.read(|c| {
            c.prepare_cached(
                "SELECT s.supi FROM sync_state s JOIN children c ON c.supi = s.supi \
                 WHERE s.present = 1 AND c.expires_at <= ?1 \
                 AND NOT EXISTS (SELECT 1 FROM sync_outbox o WHERE o.supi = s.supi) \
                 ORDER BY s.supi LIMIT ?2",
            )
            .and_then(|mut s| {
                s.query_map(params![now.0, limit], |r| supi_at(r, 0))?
                    .collect()
            })
            .map_err(db_err)
        })
    }

    fn audit(&self, query: &AuditQuery) -> Result<Vec<AuditRecord>, StoreError> {
        let limit = if query.limit == 0 { 100 } else { query.limit };
        self.read(|c| {
            c.prepare_cached(
                "SELECT id, at, actor, action, supi, parent_supi, device_id, request_id, detail \
                 FROM audit WHERE (?1 IS NULL OR supi = ?1 OR parent_supi = ?1) AND id > ?2 \
                 ORDER BY id LIMIT ?3",
            )
            .and_then(|mut s| {
                s.query_map(
                    params![
                        query.supi.as_ref().map(Supi::as_str),
                        query.after_id.unwrap_or(0),
                        limit
                    ],
                    audit_from_row,
                )?
                .collect()
            })
            .map_err(db_err)
        })
    }
}
