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
//!
//! Here: the store, its connections and its reads. `db` maps errors and holds the queries the
//! readers and the writer share, `tx` is the write transaction.

mod db;
mod tx;

pub(crate) use db::db_err;
use db::{
    q_aka_failures, q_child, q_count_active, q_issuance, q_parent, row_opt, rows_all, unique_or,
};
use tx::SqliteTx;

use std::fs::OpenOptions;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, OptionalExtension, TransactionBehavior, params};

use super::migrations;
use super::rows::{self, AUDIT_COLS, CHILD_COLS, PARENT_COLS};
use super::{
    AkaFailures, AuditQuery, AuditRecord, Issuance, ManufacturerRoot, OutboxEntry, Store,
    StoreError, SyncBacklog, SyncState, WriteTx,
};
use crate::kek::Kek;
use crate::model::{ChildCredential, Parent, Supi, Timestamp};
use crate::policy::IdempotencyKey;

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

    fn sync_outbox_flag(&self) -> &AtomicBool {
        &self.sync_outbox
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
