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

use std::fs::OpenOptions;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use std::ops::ControlFlow;

use rusqlite::{
    Connection, ErrorCode, OpenFlags, OptionalExtension, Row, TransactionBehavior, params,
};

use super::engine::{self, CHILDREN, EncKeys, EngineTx, PARENTS, seal_keys};
use super::migrations;
use super::rows::{
    self, AUDIT_COLS, CHILD_COLS, Columns, PARENT_COLS, join_dnns, sql_sqn, sql_u64,
};
use super::{
    AkaFailures, AkaMaterial, AuditEvent, AuditQuery, AuditRecord, Issuance, ManufacturerRoot,
    NewChild, OutboxEntry, Store, StoreError, SyncBacklog, SyncState, WriteTx,
};
use crate::kek::Kek;
use crate::model::{
    ChildCredential, ChildStatus, DeviceId, ImsiRange, NewParent, Parent, ParentPolicy,
    Restrictions, SubscriberKeys, SubscriptionStatus, Supi, Timestamp,
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

/// `Duplicate`/`RootExists`-style errors for a unique violation, [`db_err`] for the rest.
fn unique_or(e: rusqlite::Error, dup: impl FnOnce() -> StoreError) -> StoreError {
    if is_unique_violation(&e) {
        dup()
    } else {
        db_err(e)
    }
}

impl Columns for Row<'_> {
    fn int(&self, idx: usize) -> Result<i64, StoreError> {
        self.get(idx).map_err(db_err)
    }
    fn opt_int(&self, idx: usize) -> Result<Option<i64>, StoreError> {
        self.get(idx).map_err(db_err)
    }
    fn boolean(&self, idx: usize) -> Result<bool, StoreError> {
        self.get(idx).map_err(db_err)
    }
    fn text(&self, idx: usize) -> Result<String, StoreError> {
        self.get(idx).map_err(db_err)
    }
    fn opt_text(&self, idx: usize) -> Result<Option<String>, StoreError> {
        self.get(idx).map_err(db_err)
    }
    fn blob(&self, idx: usize) -> Result<Vec<u8>, StoreError> {
        self.get(idx).map_err(db_err)
    }
    fn opt_blob(&self, idx: usize) -> Result<Option<Vec<u8>>, StoreError> {
        self.get(idx).map_err(db_err)
    }
}

/// The one row of `sql` (cached statement) with `params`, decoded by `decode`; `None` if none.
fn row_opt<T>(
    conn: &Connection,
    sql: &str,
    params: impl rusqlite::Params,
    decode: impl FnOnce(&dyn Columns) -> Result<T, StoreError>,
) -> Result<Option<T>, StoreError> {
    conn.prepare_cached(sql)
        .and_then(|mut s| s.query_row(params, |r| Ok(decode(r))).optional())
        .map_err(db_err)?
        .transpose()
}

/// Every row of `sql` (cached statement) with `params`, decoded by `decode`.
fn rows_all<T>(
    conn: &Connection,
    sql: &str,
    params: impl rusqlite::Params,
    mut decode: impl FnMut(&dyn Columns) -> Result<T, StoreError>,
) -> Result<Vec<T>, StoreError> {
    let mut stmt = conn.prepare_cached(sql).map_err(db_err)?;
    let mut rows = stmt.query(params).map_err(db_err)?;
    let mut out = Vec::new();
    while let Some(r) = rows.next().map_err(db_err)? {
        out.push(decode(r)?);
    }
    Ok(out)
}

// ---- queries shared by the reader connections and the write transaction ----

fn q_parent(conn: &Connection, supi: &Supi) -> Result<Option<Parent>, StoreError> {
    let sql = format!("SELECT {PARENT_COLS} FROM parents WHERE supi = ?1");
    row_opt(conn, &sql, [supi.as_str()], rows::parent)
}

fn q_child(conn: &Connection, supi: &Supi) -> Result<Option<ChildCredential>, StoreError> {
    let sql = format!("SELECT {CHILD_COLS} FROM children c WHERE c.supi = ?1");
    row_opt(conn, &sql, [supi.as_str()], rows::child)
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
    row_opt(
        conn,
        "SELECT child_supi, kind, sealed, created_at FROM issuances \
         WHERE parent_supi = ?1 AND device_id = ?2 AND request_id = ?3",
        params![
            key.parent.as_str(),
            key.device_id.as_str(),
            key.request_id.0.as_slice()
        ],
        rows::issuance,
    )
}

fn q_aka_failures(conn: &Connection, supi: &Supi) -> Result<AkaFailures, StoreError> {
    row_opt(
        conn,
        "SELECT count, first_at, last_at FROM aka_failures WHERE supi = ?1",
        [supi.as_str()],
        rows::aka_failures,
    )
    .map(Option::unwrap_or_default)
}

fn q_supi_taken(conn: &Connection, supi: &Supi) -> Result<bool, StoreError> {
    conn.prepare_cached(
        "SELECT EXISTS (SELECT 1 FROM parents WHERE supi = ?1) \
             OR EXISTS (SELECT 1 FROM children WHERE supi = ?1)",
    )
    .and_then(|mut s| s.query_row([supi.as_str()], |r| r.get(0)))
    .map_err(db_err)
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

/// A write transaction on the SQLite engine.
struct SqliteTx<'a> {
    conn: &'a Connection,
    kek: &'a Kek,
    /// The sync outbox is on ([`Store::set_sync_outbox`]).
    sync_outbox: bool,
}

impl EngineTx for SqliteTx<'_> {
    fn kek(&self) -> &Kek {
        self.kek
    }

    // BEGIN IMMEDIATE already holds the database's single write lock: no row locks.
    fn parent_row(&mut self, supi: &Supi, _lock: bool) -> Result<Option<Parent>, StoreError> {
        q_parent(self.conn, supi)
    }

    fn child_row(
        &mut self,
        supi: &Supi,
        _lock: bool,
    ) -> Result<Option<ChildCredential>, StoreError> {
        q_child(self.conn, supi)
    }

    fn enc_keys(&mut self, table: &str, supi: &Supi) -> Result<Option<EncKeys>, StoreError> {
        let sql = if table == PARENTS {
            "SELECT k_enc, opc_enc FROM parents WHERE supi = ?1"
        } else {
            "SELECT k_enc, opc_enc FROM children WHERE supi = ?1"
        };
        row_opt(self.conn, sql, [supi.as_str()], |r| {
            Ok((r.blob(0)?, r.blob(1)?))
        })
    }

    fn supi_taken(&mut self, supi: &Supi) -> Result<bool, StoreError> {
        q_supi_taken(self.conn, supi)
    }

    fn walk_taken(
        &mut self,
        lo: &Supi,
        hi: &Supi,
        visit: &mut dyn FnMut(&str) -> ControlFlow<()>,
    ) -> Result<(), StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT supi FROM children WHERE supi BETWEEN ?1 AND ?2 \
                 UNION SELECT supi FROM parents WHERE supi BETWEEN ?1 AND ?2 ORDER BY 1",
            )
            .map_err(db_err)?;
        let mut rows = stmt.query([lo.as_str(), hi.as_str()]).map_err(db_err)?;
        while let Some(row) = rows.next().map_err(db_err)? {
            if visit(&row.text(0)?).is_break() {
                break;
            }
        }
        Ok(())
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
        let (k, opc) = seal_keys(self.kek, PARENTS, &parent.supi, &parent.keys)?;
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
            .map_err(|e| unique_or(e, || StoreError::Duplicate(parent.supi.clone())))?;
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
        engine::keys(self, supi)
    }

    fn allocate_supi(&mut self, range: &ImsiRange) -> Result<Supi, StoreError> {
        engine::allocate_by_probing(self, range)
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
        let (k, opc) = seal_keys(self.kek, CHILDREN, &c.supi, &new.keys)?;
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
            .map_err(|e| unique_or(e, || StoreError::Duplicate(c.supi.clone())))?;
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
        let sql = format!(
            "SELECT {CHILD_COLS} FROM children c \
             WHERE c.parent_supi = ?1 AND c.status = 'active' ORDER BY c.supi"
        );
        let mut revoked = rows_all(self.conn, &sql, [parent.as_str()], rows::child)?;
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
        engine::aka_material(self, supi)
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
        row_opt(
            self.conn,
            "INSERT INTO aka_failures (supi, count, first_at, last_at) VALUES (?1, 1, ?2, ?2) \
             ON CONFLICT (supi) DO UPDATE SET count = count + 1, last_at = excluded.last_at \
             RETURNING count, first_at, last_at",
            params![supi.as_str(), now.0],
            rows::aka_failures,
        )?
        .ok_or_else(|| StoreError::Database("INSERT … RETURNING returned no row".into()))
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
        let sql =
            format!("SELECT {PARENT_COLS} FROM parents WHERE supi > ?1 ORDER BY supi LIMIT ?2");
        self.read(|c| {
            rows_all(
                c,
                &sql,
                params![after.map_or("", Supi::as_str), limit],
                rows::parent,
            )
        })
    }

    fn count_parents(&self) -> Result<u64, StoreError> {
        self.read(|c| {
            row_opt(c, "SELECT count(*) FROM parents", [], |r| rows::uint(r, 0))
                .map(Option::unwrap_or_default)
        })
    }

    fn child(&self, supi: &Supi) -> Result<Option<ChildCredential>, StoreError> {
        self.read(|c| q_child(c, supi))
    }

    fn children_of(&self, parent: &Supi) -> Result<Vec<ChildCredential>, StoreError> {
        let sql =
            format!("SELECT {CHILD_COLS} FROM children c WHERE c.parent_supi = ?1 ORDER BY c.supi");
        self.read(|c| rows_all(c, &sql, [parent.as_str()], rows::child))
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
            rows_all(
                c,
                "SELECT name, cert, fingerprint, subject, added_at FROM manufacturer_roots \
                 ORDER BY name",
                [],
                rows::manufacturer_root,
            )
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
        .map_err(|e| unique_or(e, || StoreError::RootExists(root.name.clone())))?;
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
            rows_all(
                c,
                "SELECT id, supi, created_at FROM sync_outbox ORDER BY id LIMIT ?1",
                [limit],
                rows::outbox_entry,
            )
        })
    }

    fn sync_backlog(&self) -> Result<SyncBacklog, StoreError> {
        self.read(|c| {
            c.query_row(
                "SELECT count(*), min(created_at) FROM sync_outbox",
                [],
                |r| Ok((r.get::<_, i64>(0)?, r.get::<_, Option<i64>>(1)?)),
            )
            .map_err(db_err)
            .map(|(pending, oldest)| SyncBacklog {
                pending: u64::try_from(pending).unwrap_or(0),
                oldest: oldest.map(Timestamp),
            })
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
            Ok(rows::sync_state(pushed, pending))
        })
    }

    fn sync_expired(&self, now: Timestamp, limit: u32) -> Result<Vec<Supi>, StoreError> {
        self.read(|c| {
            rows_all(
                c,
                "SELECT s.supi FROM sync_state s JOIN children c ON c.supi = s.supi \
                 WHERE s.present = 1 AND c.expires_at <= ?1 \
                 AND NOT EXISTS (SELECT 1 FROM sync_outbox o WHERE o.supi = s.supi) \
                 ORDER BY s.supi LIMIT ?2",
                params![now.0, limit],
                |r| rows::supi(r, 0),
            )
        })
    }

    fn audit(&self, query: &AuditQuery) -> Result<Vec<AuditRecord>, StoreError> {
        let limit = if query.limit == 0 { 100 } else { query.limit };
        let sql = format!(
            "SELECT {AUDIT_COLS} FROM audit WHERE (?1 IS NULL OR supi = ?1 OR parent_supi = ?1) \
             AND id > ?2 ORDER BY id LIMIT ?3"
        );
        self.read(|c| {
            rows_all(
                c,
                &sql,
                params![
                    query.supi.as_ref().map(Supi::as_str),
                    query.after_id.unwrap_or(0),
                    limit
                ],
                rows::audit,
            )
        })
    }
}
