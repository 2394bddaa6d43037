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
//!
//! Files: `state.rs` (opening, the two connections, counts), `state/schema.rs` (migrations),
//! `state/committer.rs` (the group committer), `state/rows.rs` (row decoding), one file per
//! table: `pairings`, `requests`, `pending` (deliveries), `credentials`, `revocations`, `blocks`.

use std::fs;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use rusqlite::Connection;

use committer::{GroupJob, group_committer};
use schema::migrate;

mod blocks;
mod committer;
mod credentials;
mod pairings;
mod pending;
mod requests;
mod revocations;
mod rows;
mod schema;
#[cfg(test)]
mod tests;

pub use blocks::Block;
pub use credentials::HeldCredential;
pub use pairings::{PairedVia, Pairing};
pub use pending::{AckOutcome, PendingDelivery};
pub use requests::{OutstandingRequest, RenewalKey, RequestKind, pack_binding, unpack_binding};
pub use revocations::{Revocation, RevocationScope};
pub use schema::MIGRATIONS;

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
    /// Creating the state directory, the database file or the writer thread failed.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory concerned.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// SQLite refused an operation.
    #[error("gateway database error: {0}")]
    Db(#[from] rusqlite::Error),
    /// The database was written by a newer gatewayd (its schema version is unknown here).
    #[error(
        "gateway database schema version {found} is newer than this gatewayd supports ({supported}); \
         run the newer gatewayd or restore a backup"
    )]
    TooNew {
        /// The database's schema version.
        found: u32,
        /// The newest schema version this program knows.
        supported: u32,
    },
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

/// Row counts for status reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Counts {
    /// Paired devices.
    pub pairings: u64,
    /// Devices holding a child credential.
    pub credentials: u64,
    /// Sealed credentials waiting for their device's acknowledgement.
    pub pending_deliveries: u64,
    /// Requests the CN has not answered yet.
    pub outstanding_requests: u64,
    /// Revocations the CN has not confirmed yet.
    pub unconfirmed_revocations: u64,
}

/// The gateway's database. Shareable (`Arc<State>`); every call is one short transaction (or
/// one savepoint of a group commit, see the module documentation).
#[derive(Debug)]
pub struct State {
    conn: Arc<Mutex<Connection>>,
    reader: Mutex<Connection>,
    group: Mutex<mpsc::Sender<GroupJob>>,
    path: PathBuf,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock cannot leave a half transaction: the group committer rolls
    // back on error and rusqlite on drop. The connection itself stays usable.
    m.lock().unwrap_or_else(PoisonError::into_inner)
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
        conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
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
        reader.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
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

    /// How many rows each table holds (for `gatewayctl status` and the metrics).
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

/// Statements through the connection's prepared-statement cache: a device request runs a
/// dozen statements, and preparing each anew (SQLite's parser and planner) was 5.6% of
/// gatewayd's CPU in a provisioning profile (issue 17). The SQL strings are constants, so the
/// cache (capacity [`STATEMENT_CACHE`]) holds every one of them.
pub(crate) trait CachedSql {
    /// [`Connection::query_row`] through the statement cache.
    fn query_row_cached<T, P, F>(&self, sql: &str, params: P, f: F) -> rusqlite::Result<T>
    where
        P: rusqlite::Params,
        F: FnOnce(&rusqlite::Row<'_>) -> rusqlite::Result<T>;
    /// [`Connection::execute`] through the statement cache.
    fn execute_cached<P: rusqlite::Params>(&self, sql: &str, params: P) -> rusqlite::Result<usize>;
}

impl CachedSql for Connection {
    fn query_row_cached<T, P, F>(&self, sql: &str, params: P, f: F) -> rusqlite::Result<T>
    where
        P: rusqlite::Params,
        F: FnOnce(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
    {
        self.prepare_cached(sql)?.query_row(params, f)
    }

    fn execute_cached<P: rusqlite::Params>(&self, sql: &str, params: P) -> rusqlite::Result<usize> {
        self.prepare_cached(sql)?.execute(params)
    }
}

/// Prepared statements kept per connection (more than the distinct SQL strings of this module).
const STATEMENT_CACHE: usize = 96;
