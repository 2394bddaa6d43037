//! The PostgreSQL engine: several processes (or hosts) on one database.
//!
//! - Driver: the synchronous `postgres` client of the rust-postgres family; TLS through rustls
//!   (`tokio-postgres-rustls`, ring provider) with `sslmode=verify-full` semantics: the server
//!   certificate must chain to the CA in `sslrootcert` and name the host connected to. Without
//!   TLS only a Unix socket or a loopback address is accepted.
//! - Write transactions run at READ COMMITTED with explicit row locks: [`WriteTx::lock_parent`]
//!   is `SELECT … FOR UPDATE`, and the SQN read of [`WriteTx::aka_material`] locks its row too,
//!   so concurrent batches of one parent, and concurrent SQN reservations of one subscriber,
//!   are serialised by the database whichever process runs them. Every later statement of a
//!   READ COMMITTED transaction sees what the previous lock holder committed. A serialisation
//!   failure or deadlock (SQLSTATE 40001/40P01) rolls back and runs the closure again, as
//!   [`Store::write_tx`] allows.
//! - A small pool of connections (`Mutex<Vec<…>>`): connections are opened on demand, kept
//!   up to [`PgConfig::max_idle`], and dropped when the server closed them. Each keeps its
//!   prepared statements, so a statement costs one round trip after its first use.
//! - K and OPc are sealed under the KEK, bound to their table, row and column, as on SQLite;
//!   `meta.kek_check` refuses a different KEK.
//!
//! Here: the store, its connection pool and its reads. `config` parses the URL and builds the
//! TLS connector, `db` maps errors and caches statements, `tx` is the write transaction.

mod config;
mod db;
mod tx;

pub use config::{PgConfig, is_postgres_url};
pub(crate) use db::pg_err;

use config::tls_connector;
use db::{
    Conn, Db, error_text, get, is_connection_error, is_retryable, is_retryable_store_err,
    is_unique_violation, q_child, q_count_active, q_issuance, q_parent,
};
use tx::{Deferred, PgTx};

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use postgres::error::SqlState;
use postgres::{Client, IsolationLevel, NoTls};

use super::pg_migrations;
use super::rows::{self, CHILD_COLS, PARENT_COLS};
use super::{
    AkaFailures, AuditQuery, AuditRecord, Issuance, ManufacturerRoot, OutboxEntry, Store,
    StoreError, SyncBacklog, SyncState, WriteTx,
};
use crate::kek::Kek;
use crate::model::{ChildCredential, Parent, Supi, Timestamp};
use crate::policy::IdempotencyKey;

/// How often [`PgStore::write_tx`] runs a transaction that hit a serialisation failure.
const MAX_ATTEMPTS: u32 = 50;

/// A [`Store`] on one PostgreSQL database, shareable by several processes.
pub struct PgStore {
    config: PgConfig,
    tls: Option<tokio_postgres_rustls::MakeRustlsConnect>,
    kek: Kek,
    pool: Mutex<Vec<Conn>>,
    /// Statements sent (prepares, executions, BEGIN/COMMIT): [`PgStore::round_trips`].
    trips: AtomicU64,
    sync_outbox: AtomicBool,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl PgStore {
    /// Connects, applies pending migrations and checks that `kek` is the key the database was
    /// created with.
    pub fn open(config: PgConfig, kek: Kek) -> Result<Self, StoreError> {
        let tls = config.ca.as_ref().map(tls_connector).transpose()?;
        let store = Self {
            config,
            tls,
            kek,
            pool: Mutex::new(Vec::new()),
            trips: AtomicU64::new(0),
            sync_outbox: AtomicBool::new(false),
        };
        let mut conn = store.take()?;
        pg_migrations::migrate(&mut conn.client)?;
        store.check_kek(&mut conn.client)?;
        store.put_back(conn);
        Ok(store)
    }

    /// Parses `url` ([`PgConfig::from_url`]) and opens the store.
    pub fn open_url(url: &str, kek: Kek) -> Result<Self, StoreError> {
        Self::open(PgConfig::from_url(url)?, kek)
    }

    fn connect(&self) -> Result<Client, StoreError> {
        let r = match &self.tls {
            Some(tls) => self.config.config.connect(tls.clone()),
            None => self.config.config.connect(NoTls),
        };
        r.map_err(|e| {
            let m = error_text(&e);
            match e.code().map(SqlState::code) {
                // invalid_authorization_specification, invalid_password
                Some("28000" | "28P01") => StoreError::Database(format!(
                    "PostgreSQL refused the login: {m}; check the user and password of the \
                     store URL ([store] url in cn-backend.toml, or --store)"
                )),
                Some("3D000") => StoreError::Database(format!(
                    "cannot connect to PostgreSQL: {m}; create the database or correct the \
                     store URL ([store] url in cn-backend.toml, or --store)"
                )),
                _ => StoreError::Unavailable(format!(
                    "cannot connect to PostgreSQL: {m}; check that the server is running and \
                     reachable at the host of the store URL ([store] url in cn-backend.toml, or \
                     --store)"
                )),
            }
        })
    }

    fn take(&self) -> Result<Conn, StoreError> {
        let pooled = self
            .pool
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop();
        match pooled {
            Some(c) if !c.client.is_closed() => Ok(c),
            _ => Ok(Conn {
                client: self.connect()?,
                stmts: HashMap::new(),
            }),
        }
    }

    fn put_back(&self, conn: Conn) {
        if conn.client.is_closed() {
            return;
        }
        let mut pool = self.pool.lock().unwrap_or_else(PoisonError::into_inner);
        if pool.len() < self.config.max_idle {
            pool.push(conn);
        }
    }

    /// Runs a read on a pooled connection. A pooled connection the server closed since (a
    /// restart) fails its first statement: a read has no effect, so it runs once more on a
    /// new connection.
    fn read<T>(
        &self,
        mut f: impl FnMut(&mut Db<'_, Client>) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut conn = self.take()?;
        let mut out = f(&mut Db {
            c: &mut conn.client,
            stmts: &mut conn.stmts,
            trips: &self.trips,
        });
        if matches!(out, Err(StoreError::Unavailable(_))) && conn.client.is_closed() {
            conn = Conn {
                client: self.connect()?,
                stmts: HashMap::new(),
            };
            out = f(&mut Db {
                c: &mut conn.client,
                stmts: &mut conn.stmts,
                trips: &self.trips,
            });
        }
        self.put_back(conn);
        out
    }

    fn check_kek(&self, client: &mut Client) -> Result<(), StoreError> {
        client
            .execute(
                "INSERT INTO meta (key, value) VALUES ('kek_check', $1) \
                 ON CONFLICT (key) DO NOTHING",
                &[&self.kek.check_value()?],
            )
            .map_err(pg_err)?;
        let row = client
            .query_one("SELECT value FROM meta WHERE key = 'kek_check'", &[])
            .map_err(pg_err)?;
        let stored: Vec<u8> = get(&row, 0)?;
        if self.kek.verify_check(&stored) {
            Ok(())
        } else {
            Err(StoreError::WrongKek)
        }
    }

    /// Statements this store has sent so far (executions, prepares on first use, BEGIN and
    /// COMMIT): what the round trips of an operation cost, for tests and benchmarks.
    pub fn round_trips(&self) -> u64 {
        self.trips.load(Ordering::Relaxed)
    }

    /// The schema version of the database.
    pub fn schema_version(&self) -> Result<u32, StoreError> {
        self.read(|db| pg_migrations::current_version(db.c))
    }
}

impl Drop for PgStore {
    fn drop(&mut self) {
        // Closing a `postgres::Client` blocks on the driver's own runtime, which panics inside
        // an async context (a service dropped at the end of `serve`): close them on a thread.
        let clients =
            std::mem::take(&mut *self.pool.lock().unwrap_or_else(PoisonError::into_inner));
        if clients.is_empty() {
            return;
        }
        if tokio::runtime::Handle::try_current().is_ok() {
            let _ = std::thread::spawn(move || drop(clients)).join();
        }
    }
}

impl PgStore {
    /// One attempt of a write transaction: `Ok(Err(e))` when it failed with a serialisation
    /// conflict (retry), `Err` for any other failure.
    fn attempt(
        &self,
        conn: &mut Conn,
        f: &mut dyn FnMut(&mut dyn WriteTx) -> Result<(), StoreError>,
    ) -> Result<Result<(), StoreError>, StoreError> {
        let Conn { client, stmts } = conn;
        // BEGIN and COMMIT (or ROLLBACK).
        self.trips.fetch_add(2, Ordering::Relaxed);
        let mut tx = match client
            .build_transaction()
            .isolation_level(IsolationLevel::ReadCommitted)
            .start()
        {
            Ok(tx) => tx,
            // Nothing ran on a connection lost before BEGIN (a pooled connection the server
            // closed since): `write_tx` reconnects and runs the transaction again.
            Err(e) if is_connection_error(&e) => return Ok(Err(pg_err(e))),
            Err(e) => return Err(pg_err(e)),
        };
        let mut ptx = PgTx {
            tx: &mut tx,
            stmts,
            trips: &self.trips,
            kek: &self.kek,
            sync_outbox: self.sync_outbox.load(Ordering::Relaxed),
            retry: false,
            deferred: Deferred::default(),
            known_issuances: Vec::new(),
            reserve: Vec::new(),
            reserve_range: None,
            expected_allocations: 0,
        };
        let mut r = f(&mut ptx);
        if r.is_ok() {
            r = ptx.flush();
        }
        let retry = ptx.retry;
        match r {
            // Dropping `tx` rolls back.
            Err(e) if retry || is_retryable_store_err(&e) => Ok(Err(e)),
            Err(e) => Err(e),
            Ok(()) => match tx.commit() {
                Ok(()) => Ok(Ok(())),
                Err(e) if is_retryable(&e) => Ok(Err(pg_err(e))),
                Err(e) => Err(pg_err(e)),
            },
        }
    }
}

impl Store for PgStore {
    fn write_tx(
        &self,
        f: &mut dyn FnMut(&mut dyn WriteTx) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let mut conn = self.take()?;
        let mut attempt = 0u32;
        let out = loop {
            attempt += 1;
            if conn.client.is_closed() {
                // Only after a connection lost before BEGIN (see `attempt`): a loss later in
                // the transaction is an error of its own and not retried here.
                conn = Conn {
                    client: self.connect()?,
                    stmts: HashMap::new(),
                };
            }
            match self.attempt(&mut conn, f) {
                Ok(Ok(())) => break Ok(()),
                Ok(Err(e)) if attempt >= MAX_ATTEMPTS => {
                    tracing::warn!(error = %e, "write transaction conflicted {attempt} times");
                    break Err(StoreError::Busy);
                }
                Ok(Err(_)) => {
                    // Short, growing pause so the conflicting writer can finish.
                    std::thread::sleep(Duration::from_millis(u64::from(attempt.min(20))));
                }
                Err(e) => break Err(e),
            }
        };
        self.put_back(conn);
        out
    }

    fn parent(&self, supi: &Supi) -> Result<Option<Parent>, StoreError> {
        self.read(|c| q_parent(c, supi, false))
    }

    fn list_parents(&self, after: Option<&Supi>, limit: u32) -> Result<Vec<Parent>, StoreError> {
        self.read(|c| {
            c.query(
                &format!(
                    "SELECT {PARENT_COLS} FROM parents WHERE supi > $1 ORDER BY supi LIMIT $2"
                ),
                &[&after.map_or("", Supi::as_str), &i64::from(limit)],
            )
            .map_err(pg_err)?
            .iter()
            .map(|r| rows::parent(r))
            .collect()
        })
    }

    fn count_parents(&self) -> Result<u64, StoreError> {
        self.read(|c| {
            let row = c
                .query_one("SELECT count(*) FROM parents", &[])
                .map_err(pg_err)?;
            rows::uint(&row, 0)
        })
    }

    fn child(&self, supi: &Supi) -> Result<Option<ChildCredential>, StoreError> {
        self.read(|c| q_child(c, supi, false))
    }

    fn children_of(&self, parent: &Supi) -> Result<Vec<ChildCredential>, StoreError> {
        self.read(|c| {
            c.query(
                &format!(
                    "SELECT {CHILD_COLS} FROM children c WHERE c.parent_supi = $1 \
                     ORDER BY c.supi"
                ),
                &[&parent.as_str()],
            )
            .map_err(pg_err)?
            .iter()
            .map(|r| rows::child(r))
            .collect()
        })
    }

    fn count_active_children(&self, parent: &Supi, now: Timestamp) -> Result<u32, StoreError> {
        self.read(|c| q_count_active(c, parent, now))
    }

    fn issuance(&self, key: &IdempotencyKey) -> Result<Option<Issuance>, StoreError> {
        self.read(|c| q_issuance(c, key))
    }

    fn aka_failures(&self, supi: &Supi) -> Result<AkaFailures, StoreError> {
        self.read(|c| {
            c.query_opt(
                "SELECT count, first_at, last_at FROM aka_failures WHERE supi = $1",
                &[&supi.as_str()],
            )
            .map_err(pg_err)?
            .as_ref()
            .map(|r| rows::aka_failures(r))
            .transpose()
            .map(Option::unwrap_or_default)
        })
    }

    fn audit(&self, query: &AuditQuery) -> Result<Vec<AuditRecord>, StoreError> {
        let limit = if query.limit == 0 { 100 } else { query.limit };
        self.read(|c| {
            c.query(
                "SELECT id, at, actor, action, supi, parent_supi, device_id, request_id, detail \
                 FROM audit WHERE ($1::text IS NULL OR supi = $1 OR parent_supi = $1) \
                 AND id > $2 ORDER BY id LIMIT $3",
                &[
                    &query.supi.as_ref().map(Supi::as_str),
                    &query.after_id.unwrap_or(0),
                    &i64::from(limit),
                ],
            )
            .map_err(pg_err)?
            .iter()
            .map(|r| rows::audit(r))
            .collect()
        })
    }

    fn manufacturer_roots(&self) -> Result<Vec<ManufacturerRoot>, StoreError> {
        self.read(|c| {
            c.query(
                "SELECT name, cert, fingerprint, subject, added_at FROM manufacturer_roots \
                 ORDER BY name",
                &[],
            )
            .map_err(pg_err)?
            .iter()
            .map(|r| rows::manufacturer_root(r))
            .collect()
        })
    }

    fn add_manufacturer_root(&self, root: &ManufacturerRoot) -> Result<(), StoreError> {
        self.read(|c| {
            match c.execute(
                "INSERT INTO manufacturer_roots (name, cert, fingerprint, subject, added_at) \
                 VALUES ($1, $2, $3, $4, $5)",
                &[
                    &root.name,
                    &root.cert_der,
                    &root.fingerprint.as_slice(),
                    &root.subject,
                    &root.added_at.0,
                ],
            ) {
                Ok(_) => Ok(()),
                Err(e) if is_unique_violation(&e) => Err(StoreError::RootExists(root.name.clone())),
                Err(e) => Err(pg_err(e)),
            }
        })
    }

    fn remove_manufacturer_root(&self, name: &str) -> Result<bool, StoreError> {
        self.read(|c| {
            let n = c
                .execute("DELETE FROM manufacturer_roots WHERE name = $1", &[&name])
                .map_err(pg_err)?;
            Ok(n > 0)
        })
    }

    fn sync_outbox_flag(&self) -> &AtomicBool {
        &self.sync_outbox
    }

    fn sync_pending(&self, limit: u32) -> Result<Vec<OutboxEntry>, StoreError> {
        self.read(|c| {
            c.query(
                "SELECT id, supi, created_at FROM sync_outbox ORDER BY id LIMIT $1",
                &[&i64::from(limit)],
            )
            .map_err(pg_err)?
            .iter()
            .map(|r| rows::outbox_entry(r))
            .collect()
        })
    }

    fn sync_backlog(&self) -> Result<SyncBacklog, StoreError> {
        self.read(|c| {
            let r = c
                .query_one("SELECT count(*), min(created_at) FROM sync_outbox", &[])
                .map_err(pg_err)?;
            let n: i64 = get(&r, 0)?;
            Ok(SyncBacklog {
                pending: u64::try_from(n).unwrap_or(0),
                oldest: get::<Option<i64>>(&r, 1)?.map(Timestamp),
            })
        })
    }

    fn sync_state(&self, supi: &Supi) -> Result<Option<SyncState>, StoreError> {
        self.read(|c| {
            let pushed = c
                .query_opt(
                    "SELECT present, pushed_at FROM sync_state WHERE supi = $1",
                    &[&supi.as_str()],
                )
                .map_err(pg_err)?
                .map(|r| Ok::<_, StoreError>((get::<bool>(&r, 0)?, get::<i64>(&r, 1)?)))
                .transpose()?;
            let r = c
                .query_one(
                    "SELECT count(*) FROM sync_outbox WHERE supi = $1",
                    &[&supi.as_str()],
                )
                .map_err(pg_err)?;
            let pending: i64 = get(&r, 0)?;
            Ok(rows::sync_state(pushed, pending))
        })
    }

    fn sync_expired(&self, now: Timestamp, limit: u32) -> Result<Vec<Supi>, StoreError> {
        self.read(|c| {
            c.query(
                "SELECT s.supi FROM sync_state s JOIN children c ON c.supi = s.supi \
                 WHERE s.present AND c.expires_at <= $1 \
                 AND NOT EXISTS (SELECT 1 FROM sync_outbox o WHERE o.supi = s.supi) \
                 ORDER BY s.supi LIMIT $2",
                &[&now.0, &i64::from(limit)],
            )
            .map_err(pg_err)?
            .iter()
            .map(|r| rows::supi(r, 0))
            .collect()
        })
    }
}
