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

use std::collections::HashMap;
use std::ops::ControlFlow;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use postgres::error::SqlState;
use postgres::types::ToSql;
use postgres::{Client, GenericClient, IsolationLevel, NoTls, Row, Statement};

use super::engine::{
    self, CHILDREN, EncKeys, EngineTx, PARENTS, random_msin, range_supi, seal_keys,
};
use super::pg_migrations;
use super::rows::{self, CHILD_COLS, Columns, PARENT_COLS, corrupt, join_dnns, sql_sqn, sql_u64};
use super::{
    AkaFailures, AkaMaterial, AuditEvent, AuditQuery, AuditRecord, Issuance, ManufacturerRoot,
    NewChild, OutboxEntry, Store, StoreError, SyncBacklog, SyncState, WriteTx,
};
use crate::kek::Kek;
use crate::model::{
    ChildCredential, DeviceId, ImsiRange, NewParent, Parent, ParentPolicy, Restrictions,
    SubscriberKeys, SubscriptionStatus, Supi, Timestamp,
};
use crate::policy::IdempotencyKey;
use companion_crypto::aka::Sqn;

/// How often [`PgStore::write_tx`] runs a transaction that hit a serialisation failure.
const MAX_ATTEMPTS: u32 = 50;

/// Where and how to connect, parsed from a `postgres://` URL.
#[derive(Clone)]
pub struct PgConfig {
    config: postgres::Config,
    /// CA certificate file for TLS (`sslrootcert`); TLS is used iff set.
    ca: Option<PathBuf>,
    /// Idle connections kept open for reuse.
    pub max_idle: usize,
}

impl std::fmt::Debug for PgConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Not the password.
        f.debug_struct("PgConfig")
            .field("hosts", &self.config.get_hosts())
            .field("dbname", &self.config.get_dbname())
            .field("user", &self.config.get_user())
            .field("ca", &self.ca)
            .finish()
    }
}

/// Whether `url` selects the PostgreSQL engine.
pub fn is_postgres_url(url: &str) -> bool {
    url.starts_with("postgres://") || url.starts_with("postgresql://")
}

impl PgConfig {
    /// Parses a `postgres://user:password@host:port/dbname?…` URL (without a password in it,
    /// `PGPASSWORD` is used if set). Besides what the driver
    /// understands (`host=/socket/dir`, `connect_timeout`, …) it takes `sslmode=disable` or
    /// `sslmode=verify-full` with `sslrootcert=/path/ca.pem`. Without TLS, every host must be a
    /// Unix socket directory or a loopback address.
    pub fn from_url(url: &str) -> Result<Self, StoreError> {
        let bad = |m: String| StoreError::Database(format!("store URL: {m}"));
        if !is_postgres_url(url) {
            return Err(bad("expected postgres://…".into()));
        }
        let (base, query) = url.split_once('?').unwrap_or((url, ""));
        let mut sslmode = None;
        let mut ca = None;
        let mut rest = Vec::new();
        for kv in query.split('&').filter(|s| !s.is_empty()) {
            match kv.split_once('=') {
                Some(("sslmode", v)) => sslmode = Some(v.to_owned()),
                Some(("sslrootcert", v)) => ca = Some(PathBuf::from(v)),
                _ => rest.push(kv),
            }
        }
        let stripped = if rest.is_empty() {
            base.to_owned()
        } else {
            format!("{base}?{}", rest.join("&"))
        };
        let mut config: postgres::Config = stripped
            .parse()
            .map_err(|e: postgres::Error| bad(e.to_string()))?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(Duration::from_secs(10));
        }
        config.application_name("cn-backend");
        // Server notices ("relation … already exists, skipping" from the idempotent first
        // migration step, on every start against an existing database) are detail for
        // debugging; the driver would log them at info, in front of the one line a failed start
        // prints.
        config.notice_callback(|n| {
            tracing::debug!(
                severity = n.severity(),
                "PostgreSQL notice: {}",
                n.message()
            );
        });
        // A password kept out of the (world-readable) configuration file.
        if config.get_password().is_none()
            && let Some(pw) = std::env::var_os("PGPASSWORD").filter(|p| !p.is_empty())
        {
            config.password(pw.as_encoded_bytes());
        }
        match sslmode.as_deref() {
            Some("verify-full") => {
                if ca.is_none() {
                    return Err(bad(
                        "sslmode=verify-full needs sslrootcert=/path/ca.pem".into()
                    ));
                }
                config.ssl_mode(postgres::config::SslMode::Require);
            }
            None | Some("disable") => {
                if ca.is_some() {
                    return Err(bad("sslrootcert given without sslmode=verify-full".into()));
                }
                ca = None;
                let local = config.get_hosts().iter().all(|h| match h {
                    postgres::config::Host::Unix(_) => true,
                    postgres::config::Host::Tcp(name) => {
                        name == "localhost"
                            || name
                                .parse::<std::net::IpAddr>()
                                .is_ok_and(|a| a.is_loopback())
                    }
                });
                if !local {
                    return Err(bad(
                        "a connection without TLS is allowed only over a Unix socket or to a \
                         loopback address; add sslmode=verify-full&sslrootcert=/path/ca.pem"
                            .into(),
                    ));
                }
                config.ssl_mode(postgres::config::SslMode::Disable);
            }
            Some(other) => {
                return Err(bad(format!(
                    "sslmode={other} is not supported (use verify-full, or disable for a local \
                     socket)"
                )));
            }
        }
        Ok(Self {
            config,
            ca,
            max_idle: 8,
        })
    }
}

/// Whether `e` says the server is unreachable or gone (closed connection, I/O error,
/// SQLSTATE class 08, or the server shutting down or starting up), rather than refusing the
/// statement.
fn is_connection_error(e: &postgres::Error) -> bool {
    if let Some(db) = e.as_db_error() {
        let c = db.code().code();
        return c.starts_with("08") || matches!(c, "57P01" | "57P02" | "57P03");
    }
    if e.is_closed() {
        return true;
    }
    let mut src = std::error::Error::source(e);
    while let Some(s) = src {
        if s.is::<std::io::Error>() {
            return true;
        }
        src = s.source();
    }
    false
}

/// Maps a driver error onto [`StoreError`], with the server's message when there is one.
pub(crate) fn pg_err(e: postgres::Error) -> StoreError {
    if is_connection_error(&e) {
        return StoreError::Unavailable(format!("PostgreSQL unavailable: {}", error_text(&e)));
    }
    if let Some(db) = e.as_db_error() {
        return StoreError::Database(format!(
            "{}: {} (SQLSTATE {})",
            db.severity(),
            db.message(),
            db.code().code()
        ));
    }
    StoreError::Database(error_text(&e))
}

/// The driver's message with its sources, on one line.
fn error_text(e: &postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return format!(
            "{}: {} (SQLSTATE {})",
            db.severity(),
            db.message(),
            db.code().code()
        );
    }
    let mut msg = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(s) = src {
        let s_msg = s.to_string();
        if !msg.contains(&s_msg) {
            msg = format!("{msg}: {s_msg}");
        }
        src = s.source();
    }
    msg.replace('\n', " ")
}

fn is_retryable(e: &postgres::Error) -> bool {
    matches!(
        e.code(),
        Some(c) if *c == SqlState::T_R_SERIALIZATION_FAILURE || *c == SqlState::T_R_DEADLOCK_DETECTED
    )
}

fn is_retryable_store_err(e: &StoreError) -> bool {
    matches!(e, StoreError::Database(m)
        if m.ends_with("(SQLSTATE 40001)") || m.ends_with("(SQLSTATE 40P01)"))
}

fn is_unique_violation(e: &postgres::Error) -> bool {
    e.code() == Some(&SqlState::UNIQUE_VIOLATION)
}

fn get<'a, T: postgres::types::FromSql<'a>>(row: &'a Row, idx: usize) -> Result<T, StoreError> {
    row.try_get(idx)
        .map_err(|e| corrupt(format!("column {idx}: {e}")))
}

impl Columns for Row {
    fn int(&self, idx: usize) -> Result<i64, StoreError> {
        get(self, idx)
    }
    fn opt_int(&self, idx: usize) -> Result<Option<i64>, StoreError> {
        get(self, idx)
    }
    fn boolean(&self, idx: usize) -> Result<bool, StoreError> {
        get(self, idx)
    }
    fn text(&self, idx: usize) -> Result<String, StoreError> {
        get(self, idx)
    }
    fn opt_text(&self, idx: usize) -> Result<Option<String>, StoreError> {
        get(self, idx)
    }
    fn blob(&self, idx: usize) -> Result<Vec<u8>, StoreError> {
        get(self, idx)
    }
    fn opt_blob(&self, idx: usize) -> Result<Option<Vec<u8>>, StoreError> {
        get(self, idx)
    }
}

/// A count or other non-negative integer that fits a `u32`.
fn u32_at(row: &Row, idx: usize) -> Result<u32, StoreError> {
    u32::try_from(rows::uint(row, idx)?).map_err(corrupt)
}

/// A connection or transaction with the statement cache of its connection.
struct Db<'a, C> {
    c: &'a mut C,
    stmts: &'a mut HashMap<String, Statement>,
    trips: &'a AtomicU64,
}

type Params<'p> = &'p [&'p (dyn ToSql + Sync)];

impl<C: GenericClient> Db<'_, C> {
    /// The prepared statement for `sql`, prepared on first use on this connection.
    fn stmt(&mut self, sql: &str) -> Result<Statement, postgres::Error> {
        self.trips.fetch_add(1, Ordering::Relaxed);
        if let Some(s) = self.stmts.get(sql) {
            return Ok(s.clone());
        }
        self.trips.fetch_add(1, Ordering::Relaxed);
        let s = self.c.prepare(sql)?;
        self.stmts.insert(sql.to_owned(), s.clone());
        Ok(s)
    }

    fn query(&mut self, sql: &str, params: Params<'_>) -> Result<Vec<Row>, postgres::Error> {
        let s = self.stmt(sql)?;
        self.c.query(&s, params)
    }

    fn query_opt(&mut self, sql: &str, params: Params<'_>) -> Result<Option<Row>, postgres::Error> {
        let s = self.stmt(sql)?;
        self.c.query_opt(&s, params)
    }

    fn query_one(&mut self, sql: &str, params: Params<'_>) -> Result<Row, postgres::Error> {
        let s = self.stmt(sql)?;
        self.c.query_one(&s, params)
    }

    fn execute(&mut self, sql: &str, params: Params<'_>) -> Result<u64, postgres::Error> {
        let s = self.stmt(sql)?;
        self.c.execute(&s, params)
    }
}

/// A pooled connection and its prepared statements.
struct Conn {
    client: Client,
    stmts: HashMap<String, Statement>,
}

// ---- queries shared by the pooled connections and the write transaction ----

fn q_parent(
    c: &mut Db<'_, impl GenericClient>,
    supi: &Supi,
    lock: bool,
) -> Result<Option<Parent>, StoreError> {
    let sql = if lock {
        format!("SELECT {PARENT_COLS} FROM parents WHERE supi = $1 FOR UPDATE")
    } else {
        format!("SELECT {PARENT_COLS} FROM parents WHERE supi = $1")
    };
    c.query_opt(&sql, &[&supi.as_str()])
        .map_err(pg_err)?
        .map(|r| rows::parent(&r))
        .transpose()
}

fn q_child(
    c: &mut Db<'_, impl GenericClient>,
    supi: &Supi,
    lock: bool,
) -> Result<Option<ChildCredential>, StoreError> {
    let sql = if lock {
        format!("SELECT {CHILD_COLS} FROM children c WHERE c.supi = $1 FOR UPDATE")
    } else {
        format!("SELECT {CHILD_COLS} FROM children c WHERE c.supi = $1")
    };
    c.query_opt(&sql, &[&supi.as_str()])
        .map_err(pg_err)?
        .map(|r| rows::child(&r))
        .transpose()
}

fn q_count_active(
    c: &mut Db<'_, impl GenericClient>,
    parent: &Supi,
    now: Timestamp,
) -> Result<u32, StoreError> {
    let row = c
        .query_one(
            "SELECT count(*) FROM children \
             WHERE parent_supi = $1 AND status = 'active' AND expires_at > $2",
            &[&parent.as_str(), &now.0],
        )
        .map_err(pg_err)?;
    u32_at(&row, 0)
}

fn q_issuance(
    c: &mut Db<'_, impl GenericClient>,
    key: &IdempotencyKey,
) -> Result<Option<Issuance>, StoreError> {
    let row = c
        .query_opt(
            "SELECT child_supi, kind, sealed, created_at FROM issuances \
             WHERE parent_supi = $1 AND device_id = $2 AND request_id = $3",
            &[
                &key.parent.as_str(),
                &key.device_id.as_str(),
                &key.request_id.0.as_slice(),
            ],
        )
        .map_err(pg_err)?;
    row.map(|r| rows::issuance(&r)).transpose()
}

fn q_supi_taken(c: &mut Db<'_, impl GenericClient>, supi: &Supi) -> Result<bool, StoreError> {
    let row = c
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM parents WHERE supi = $1) \
                 OR EXISTS (SELECT 1 FROM children WHERE supi = $1)",
            &[&supi.as_str()],
        )
        .map_err(pg_err)?;
    get(&row, 0)
}

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

fn tls_connector(ca: &PathBuf) -> Result<tokio_postgres_rustls::MakeRustlsConnect, StoreError> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let bad = |m: String| StoreError::Database(format!("sslrootcert {}: {m}", ca.display()));
    let mut roots = rustls::RootCertStore::empty();
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(ca)
        .map_err(|e| bad(e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| bad(e.to_string()))?;
    if certs.is_empty() {
        return Err(bad("no certificate in the file".into()));
    }
    for c in certs {
        roots.add(c).map_err(|e| bad(e.to_string()))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| bad(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
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

/// Rows a batch writes (new children with their encrypted K and OPc, ledger entries, audit
/// entries), kept in memory until a statement needs them in the database or the transaction
/// commits, then written with one multi-row statement per table: a batch's new credentials cost
/// a constant number of round trips, not three per credential.
#[derive(Default)]
struct Deferred {
    children: Vec<(ChildCredential, Vec<u8>, Vec<u8>)>,
    issuances: Vec<(IdempotencyKey, Issuance)>,
    audit: Vec<AuditEvent>,
    /// Sync outbox rows (SUPI, created_at), when the outbox is on.
    sync: Vec<(Supi, i64)>,
}

/// Lengths of the four [`Deferred`] lists.
type Mark = (usize, usize, usize, usize);

impl Deferred {
    fn is_empty(&self) -> bool {
        self.children.is_empty()
            && self.issuances.is_empty()
            && self.audit.is_empty()
            && self.sync.is_empty()
    }

    fn mark(&self) -> Mark {
        (
            self.children.len(),
            self.issuances.len(),
            self.audit.len(),
            self.sync.len(),
        )
    }

    fn truncate(&mut self, (c, i, a, o): Mark) {
        self.children.truncate(c);
        self.issuances.truncate(i);
        self.audit.truncate(a);
        self.sync.truncate(o);
    }

    /// Keeps the rows before `mark`, returns the rest.
    fn split_off(&mut self, (c, i, a, o): Mark) -> Deferred {
        Deferred {
            children: self.children.split_off(c),
            issuances: self.issuances.split_off(i),
            audit: self.audit.split_off(a),
            sync: self.sync.split_off(o),
        }
    }
}

/// Candidate SUPIs checked against the database at once by [`WriteTx::allocate_supi`], at
/// least; a batch announces how many it may need ([`WriteTx::prefetch_issuances`]).
const SUPI_CANDIDATES: usize = 16;

/// A write transaction on the PostgreSQL engine.
struct PgTx<'a, 'c> {
    tx: &'a mut postgres::Transaction<'c>,
    stmts: &'a mut HashMap<String, Statement>,
    trips: &'a AtomicU64,
    kek: &'a Kek,
    /// The sync outbox is on ([`Store::set_sync_outbox`]).
    sync_outbox: bool,
    /// Set when a statement failed with a serialisation failure or deadlock: the whole
    /// transaction is then retried.
    retry: bool,
    /// Writes not sent yet. Invariant: every other statement runs after [`PgTx::flush`], except
    /// the reads that consult these rows first ([`WriteTx::issuance`], [`WriteTx::child`],
    /// [`WriteTx::allocate_supi`]'s candidates).
    deferred: Deferred,
    /// The open item savepoint: where its rows begin in `deferred`. The SQL savepoint is only
    /// opened when something of the item must reach the database before it ends.
    item: Option<Mark>,
    /// Whether `SAVEPOINT batch_item` was sent for the open item.
    savepoint_open: bool,
    /// Ledger lookups answered in advance ([`WriteTx::prefetch_issuances`]); a key is dropped
    /// when its entry is written, after which the database answers.
    known_issuances: Vec<(IdempotencyKey, Option<Issuance>)>,
    /// SUPIs of the range `reserve_range` found free in this transaction, not handed out yet.
    reserve: Vec<Supi>,
    reserve_range: Option<(String, u64, u64)>,
    /// SUPIs the batch may still allocate (its provision items), for the size of a refill.
    expected_allocations: usize,
}

impl<'c> PgTx<'_, 'c> {
    /// Sends the deferred rows. Inside an item whose SQL savepoint is not open yet, the rows
    /// before the item go first, then the savepoint, then the item's, so that
    /// [`WriteTx::rollback_item`] still undoes exactly the item.
    fn flush(&mut self) -> Result<(), StoreError> {
        if self.deferred.is_empty() {
            return Ok(());
        }
        if let Some(mark) = self.item
            && !self.savepoint_open
        {
            let tail = self.deferred.split_off(mark);
            self.write_deferred()?;
            self.exec("SAVEPOINT batch_item", &[])?;
            self.savepoint_open = true;
            self.deferred = tail;
        }
        self.write_deferred()?;
        if self.item.is_some() {
            self.item = Some((0, 0, 0, 0));
        }
        Ok(())
    }

    /// Writes `deferred` with one statement per table (children before the ledger entries
    /// that reference them) and empties it. A unique violation can only come from another
    /// transaction that took a SUPI meanwhile: the transaction is run again.
    fn write_deferred(&mut self) -> Result<(), StoreError> {
        let d = std::mem::take(&mut self.deferred);
        if !d.children.is_empty() {
            let cs = &d.children;
            let supi: Vec<&str> = cs.iter().map(|(c, _, _)| c.supi.as_str()).collect();
            let parent: Vec<&str> = cs.iter().map(|(c, _, _)| c.parent.as_str()).collect();
            let device: Vec<&str> = cs.iter().map(|(c, _, _)| c.device_id.as_str()).collect();
            let fp: Vec<&[u8]> = cs
                .iter()
                .map(|(c, _, _)| c.device_key_fingerprint.0.as_slice())
                .collect();
            let rid: Vec<&[u8]> = cs
                .iter()
                .map(|(c, _, _)| c.request_id.0.as_slice())
                .collect();
            let k: Vec<&[u8]> = cs.iter().map(|(_, k, _)| k.as_slice()).collect();
            let opc: Vec<&[u8]> = cs.iter().map(|(_, _, o)| o.as_slice()).collect();
            let amf: Vec<&[u8]> = cs.iter().map(|(c, _, _)| c.amf.0.as_slice()).collect();
            let sqn: Vec<i64> = cs.iter().map(|(c, _, _)| sql_sqn(c.sqn)).collect();
            let issued: Vec<i64> = cs.iter().map(|(c, _, _)| c.issued_at.0).collect();
            let expires: Vec<i64> = cs.iter().map(|(c, _, _)| c.expires_at.0).collect();
            let renewed: Vec<Option<i64>> = cs
                .iter()
                .map(|(c, _, _)| c.renewed_at.map(|t| t.0))
                .collect();
            let roaming: Vec<bool> = cs
                .iter()
                .map(|(c, _, _)| c.restrictions.roaming_allowed)
                .collect();
            let dnns: Vec<String> = cs
                .iter()
                .map(|(c, _, _)| join_dnns(&c.restrictions.allowed_dnns))
                .collect();
            let rate: Vec<Option<i64>> = cs
                .iter()
                .map(|(c, _, _)| c.restrictions.max_bitrate_kbps.map(i64::from))
                .collect();
            let status: Vec<&str> = cs.iter().map(|(c, _, _)| c.status.as_str()).collect();
            let revoked: Vec<Option<i64>> = cs
                .iter()
                .map(|(c, _, _)| c.revoked_at.map(|t| t.0))
                .collect();
            let spki: Vec<Option<&[u8]>> = cs
                .iter()
                .map(|(c, _, _)| c.device_spki.as_deref())
                .collect();
            self.exec_rows(
                "INSERT INTO children (supi, parent_supi, device_id, device_key_fp, request_id, \
                 k_enc, opc_enc, amf, sqn, issued_at, expires_at, renewed_at, roaming_allowed, \
                 allowed_dnns, max_bitrate_kbps, status, revoked_at, device_spki) \
                 SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::bytea[], \
                 $5::bytea[], $6::bytea[], $7::bytea[], $8::bytea[], $9::int8[], $10::int8[], \
                 $11::int8[], $12::int8[], $13::bool[], $14::text[], $15::int8[], $16::text[], \
                 $17::int8[], $18::bytea[])",
                &[
                    &supi, &parent, &device, &fp, &rid, &k, &opc, &amf, &sqn, &issued, &expires,
                    &renewed, &roaming, &dnns, &rate, &status, &revoked, &spki,
                ],
            )?;
        }
        if !d.issuances.is_empty() {
            let is = &d.issuances;
            self.known_issuances
                .retain(|(k, _)| !is.iter().any(|(w, _)| w == k));
            let parent: Vec<&str> = is.iter().map(|(k, _)| k.parent.as_str()).collect();
            let device: Vec<&str> = is.iter().map(|(k, _)| k.device_id.as_str()).collect();
            let rid: Vec<&[u8]> = is.iter().map(|(k, _)| k.request_id.0.as_slice()).collect();
            let child: Vec<&str> = is.iter().map(|(_, i)| i.child_supi.as_str()).collect();
            let kind: Vec<&str> = is.iter().map(|(_, i)| i.kind.as_str()).collect();
            let sealed: Vec<&[u8]> = is.iter().map(|(_, i)| i.sealed.as_slice()).collect();
            let at: Vec<i64> = is.iter().map(|(_, i)| i.created_at.0).collect();
            self.exec_rows(
                "INSERT INTO issuances (parent_supi, device_id, request_id, child_supi, kind, \
                 sealed, created_at) SELECT * FROM unnest($1::text[], $2::text[], $3::bytea[], \
                 $4::text[], $5::text[], $6::bytea[], $7::int8[])",
                &[&parent, &device, &rid, &child, &kind, &sealed, &at],
            )?;
        }
        if !d.audit.is_empty() {
            let es = &d.audit;
            let at: Vec<i64> = es.iter().map(|e| e.at.0).collect();
            let actor: Vec<&str> = es.iter().map(|e| e.actor.as_str()).collect();
            let action: Vec<&str> = es.iter().map(|e| e.action.as_str()).collect();
            let supi: Vec<&str> = es.iter().map(|e| e.supi.as_str()).collect();
            let parent: Vec<Option<&str>> = es
                .iter()
                .map(|e| e.parent.as_ref().map(Supi::as_str))
                .collect();
            let device: Vec<Option<&str>> = es
                .iter()
                .map(|e| e.device_id.as_ref().map(DeviceId::as_str))
                .collect();
            let rid: Vec<Option<&[u8]>> = es
                .iter()
                .map(|e| e.request_id.as_ref().map(|r| r.0.as_slice()))
                .collect();
            let detail: Vec<&str> = es.iter().map(|e| e.detail.as_str()).collect();
            // WITH ORDINALITY + ORDER BY: identities follow the order of the entries.
            self.exec_rows(
                "INSERT INTO audit (at, actor, action, supi, parent_supi, device_id, request_id, \
                 detail) SELECT a, b, c, d, e, f, g, h FROM unnest($1::int8[], $2::text[], \
                 $3::text[], $4::text[], $5::text[], $6::text[], $7::bytea[], $8::text[]) \
                 WITH ORDINALITY AS u(a, b, c, d, e, f, g, h, n) ORDER BY n",
                &[&at, &actor, &action, &supi, &parent, &device, &rid, &detail],
            )?;
        }
        if !d.sync.is_empty() {
            let supi: Vec<&str> = d.sync.iter().map(|(s, _)| s.as_str()).collect();
            let at: Vec<i64> = d.sync.iter().map(|(_, t)| *t).collect();
            // WITH ORDINALITY + ORDER BY: outbox ids follow the order of the changes.
            self.exec_rows(
                "INSERT INTO sync_outbox (supi, created_at) SELECT s, t FROM                  unnest($1::text[], $2::int8[]) WITH ORDINALITY AS u(s, t, n) ORDER BY n",
                &[&supi, &at],
            )?;
        }
        Ok(())
    }

    /// [`PgTx::exec`] for the multi-row inserts: a unique violation retries the transaction.
    fn exec_rows(&mut self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<(), StoreError> {
        match self.db().execute(sql, params) {
            Ok(_) => Ok(()),
            Err(e) if is_unique_violation(&e) => {
                self.retry = true;
                Err(pg_err(e))
            }
            Err(e) => Err(self.err(e)),
        }
    }

    fn db(&mut self) -> Db<'_, postgres::Transaction<'c>> {
        Db {
            trips: self.trips,
            c: &mut *self.tx,
            stmts: &mut *self.stmts,
        }
    }

    fn err(&mut self, e: postgres::Error) -> StoreError {
        if is_retryable(&e) {
            self.retry = true;
        }
        pg_err(e)
    }

    fn exec(&mut self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<u64, StoreError> {
        match self.db().execute(sql, params) {
            Ok(n) => Ok(n),
            Err(e) => Err(self.err(e)),
        }
    }

    /// Runs a shared query helper, noting retryable failures (by the SQLSTATE that
    /// [`pg_err`] keeps in the message).
    fn q<T>(
        &mut self,
        f: impl FnOnce(&mut Db<'_, postgres::Transaction<'c>>) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let r = f(&mut self.db());
        if let Err(e) = &r
            && is_retryable_store_err(e)
        {
            self.retry = true;
        }
        r
    }
}

impl EngineTx for PgTx<'_, '_> {
    fn kek(&self) -> &Kek {
        self.kek
    }

    fn parent_row(&mut self, supi: &Supi, lock: bool) -> Result<Option<Parent>, StoreError> {
        self.q(|c| q_parent(c, supi, lock))
    }

    fn child_row(
        &mut self,
        supi: &Supi,
        lock: bool,
    ) -> Result<Option<ChildCredential>, StoreError> {
        self.q(|c| q_child(c, supi, lock))
    }

    fn enc_keys(&mut self, table: &str, supi: &Supi) -> Result<Option<EncKeys>, StoreError> {
        let sql = if table == PARENTS {
            "SELECT k_enc, opc_enc FROM parents WHERE supi = $1"
        } else {
            "SELECT k_enc, opc_enc FROM children WHERE supi = $1"
        };
        let row = match self.db().query_opt(sql, &[&supi.as_str()]) {
            Ok(r) => r,
            Err(e) => return Err(self.err(e)),
        };
        row.map(|r| Ok((get(&r, 0)?, get(&r, 1)?))).transpose()
    }

    fn supi_taken(&mut self, supi: &Supi) -> Result<bool, StoreError> {
        self.q(|c| q_supi_taken(c, supi))
    }

    fn walk_taken(
        &mut self,
        lo: &Supi,
        hi: &Supi,
        visit: &mut dyn FnMut(&str) -> ControlFlow<()>,
    ) -> Result<(), StoreError> {
        let rows = self.q(|c| {
            c.query(
                "SELECT supi FROM children WHERE supi BETWEEN $1 AND $2 \
                 UNION SELECT supi FROM parents WHERE supi BETWEEN $1 AND $2 ORDER BY 1",
                &[&lo.as_str(), &hi.as_str()],
            )
            .map_err(pg_err)
        })?;
        for row in &rows {
            if visit(&row.text(0)?).is_break() {
                break;
            }
        }
        Ok(())
    }
}

impl WriteTx for PgTx<'_, '_> {
    fn lock_parent(&mut self, supi: &Supi) -> Result<Option<Parent>, StoreError> {
        self.flush()?;
        match self.db().query_opt(
            &format!("SELECT {PARENT_COLS} FROM parents WHERE supi = $1 FOR UPDATE"),
            &[&supi.as_str()],
        ) {
            Ok(r) => r.map(|r| rows::parent(&r)).transpose(),
            Err(e) => Err(self.err(e)),
        }
    }

    fn insert_parent(&mut self, parent: &NewParent, now: Timestamp) -> Result<(), StoreError> {
        self.flush()?;
        if self.q(|c| q_supi_taken(c, &parent.supi))? {
            return Err(StoreError::Duplicate(parent.supi.clone()));
        }
        let (k, opc) = seal_keys(self.kek, PARENTS, &parent.supi, &parent.keys)?;
        let p = &parent.policy;
        let r = self.db().execute(
            "INSERT INTO parents (supi, k_enc, opc_enc, amf, sqn, status, max_children, \
             max_lifetime_s, roaming_allowed, allowed_dnns, max_bitrate_kbps, created_at, \
             updated_at, require_attestation) \
             VALUES ($1, $2, $3, $4, $5, 'active', $6, $7, $8, $9, $10, $11, $11, $12)",
            &[
                &parent.supi.as_str(),
                &k,
                &opc,
                &parent.amf.0.as_slice(),
                &sql_sqn(parent.sqn),
                &i64::from(p.max_children),
                &sql_u64(p.max_lifetime_s)?,
                &p.roaming_allowed,
                &join_dnns(&p.allowed_dnns),
                &p.max_bitrate_kbps.map(i64::from),
                &now.0,
                &p.require_attestation,
            ],
        );
        match r {
            Ok(_) => Ok(()),
            Err(e) if is_unique_violation(&e) => Err(StoreError::Duplicate(parent.supi.clone())),
            Err(e) => Err(self.err(e)),
        }
    }

    fn set_parent_status(
        &mut self,
        supi: &Supi,
        status: SubscriptionStatus,
        now: Timestamp,
    ) -> Result<(), StoreError> {
        self.flush()?;
        let n = self.exec(
            "UPDATE parents SET status = $2, updated_at = $3 WHERE supi = $1",
            &[&supi.as_str(), &status.as_str(), &now.0],
        )?;
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
        self.flush()?;
        let n = self.exec(
            "UPDATE parents SET max_children = $2, max_lifetime_s = $3, roaming_allowed = $4, \
             allowed_dnns = $5, max_bitrate_kbps = $6, updated_at = $7, \
             require_attestation = $8 WHERE supi = $1",
            &[
                &supi.as_str(),
                &i64::from(policy.max_children),
                &sql_u64(policy.max_lifetime_s)?,
                &policy.roaming_allowed,
                &join_dnns(&policy.allowed_dnns),
                &policy.max_bitrate_kbps.map(i64::from),
                &now.0,
                &policy.require_attestation,
            ],
        )?;
        if n == 0 {
            return Err(StoreError::ParentNotFound(supi.clone()));
        }
        Ok(())
    }

    /// O(1) per parent (amortised), as on SQLite (see `SqliteTx::count_active_children` for
    /// the invariants I1 and I2): one update flips `quota_counted` to `expires_at > now` on the
    /// active children where they differ (two partial-index range scans), the triggers move the
    /// counter, and the counter is read. The caller holds the parent row (`lock_parent`), so a
    /// racing instance's batch for the same parent waits until this one commits and then, at
    /// READ COMMITTED, reads the counter it left.
    fn count_active_children(&mut self, parent: &Supi, now: Timestamp) -> Result<u32, StoreError> {
        self.flush()?;
        self.exec(
            "UPDATE children SET quota_counted = NOT quota_counted WHERE supi IN ( \
               SELECT supi FROM children \
                WHERE parent_supi = $1 AND status = 'active' AND quota_counted \
                  AND expires_at <= $2 \
               UNION ALL \
               SELECT supi FROM children \
                WHERE parent_supi = $1 AND status = 'active' AND NOT quota_counted \
                  AND expires_at > $2)",
            &[&parent.as_str(), &now.0],
        )?;
        let row = match self.db().query_opt(
            "SELECT live_children FROM parents WHERE supi = $1",
            &[&parent.as_str()],
        ) {
            Ok(r) => r,
            Err(e) => return Err(self.err(e)),
        };
        let row = row.ok_or_else(|| StoreError::ParentNotFound(parent.clone()))?;
        u32_at(&row, 0)
    }

    fn issuance(&mut self, key: &IdempotencyKey) -> Result<Option<Issuance>, StoreError> {
        if let Some((_, i)) = self.deferred.issuances.iter().find(|(k, _)| k == key) {
            return Ok(Some(i.clone()));
        }
        if let Some((_, i)) = self.known_issuances.iter().find(|(k, _)| k == key) {
            return Ok(i.clone());
        }
        self.q(|c| q_issuance(c, key))
    }

    fn prefetch_issuances(&mut self, keys: &[IdempotencyKey]) -> Result<(), StoreError> {
        if keys.is_empty() {
            return Ok(());
        }
        let parent: Vec<&str> = keys.iter().map(|k| k.parent.as_str()).collect();
        let device: Vec<&str> = keys.iter().map(|k| k.device_id.as_str()).collect();
        let rid: Vec<&[u8]> = keys.iter().map(|k| k.request_id.0.as_slice()).collect();
        let rows = match self.db().query(
            "SELECT s.child_supi, s.kind, s.sealed, s.created_at, k.n \
             FROM unnest($1::text[], $2::text[], $3::bytea[]) WITH ORDINALITY AS k(p, d, r, n) \
             JOIN issuances s ON s.parent_supi = k.p AND s.device_id = k.d AND s.request_id = k.r",
            &[&parent, &device, &rid],
        ) {
            Ok(r) => r,
            Err(e) => return Err(self.err(e)),
        };
        let mut found: Vec<Option<Issuance>> = vec![None; keys.len()];
        for r in &rows {
            let n: i64 = get(r, 4)?;
            let slot = usize::try_from(n - 1)
                .ok()
                .and_then(|i| found.get_mut(i))
                .ok_or_else(|| corrupt("ledger lookup out of range"))?;
            *slot = Some(rows::issuance(r)?);
        }
        self.known_issuances.extend(keys.iter().cloned().zip(found));
        self.expected_allocations += keys.len();
        Ok(())
    }

    fn insert_issuance(
        &mut self,
        key: &IdempotencyKey,
        issuance: &Issuance,
    ) -> Result<(), StoreError> {
        self.deferred
            .issuances
            .push((key.clone(), issuance.clone()));
        Ok(())
    }

    fn child(&mut self, supi: &Supi) -> Result<Option<ChildCredential>, StoreError> {
        if let Some((c, _, _)) = self
            .deferred
            .children
            .iter()
            .find(|(c, _, _)| c.supi == *supi)
        {
            return Ok(Some(c.clone()));
        }
        self.q(|c| q_child(c, supi, false))
    }

    fn keys(&mut self, supi: &Supi) -> Result<Option<SubscriberKeys>, StoreError> {
        self.flush()?;
        engine::keys(self, supi)
    }

    fn allocate_supi(&mut self, range: &ImsiRange) -> Result<Supi, StoreError> {
        // Uniform draws checked in bulk: SUPI_CANDIDATES random ones, one query for those a
        // parent or child holds, the free ones kept for the next calls of this transaction.
        let key = (
            range.plmn().to_owned(),
            range.first_msin(),
            range.last_msin(),
        );
        if self.reserve_range.as_ref() != Some(&key) {
            self.reserve.clear();
            self.reserve_range = Some(key);
        }
        for refill in 0..2 {
            while let Some(s) = self.reserve.pop() {
                if !self.deferred.children.iter().any(|(c, _, _)| c.supi == s) {
                    self.expected_allocations = self.expected_allocations.saturating_sub(1);
                    return Ok(s);
                }
            }
            if refill == 1 {
                break;
            }
            // Enough for the rest of the batch, with a margin for draws that are taken.
            let want =
                SUPI_CANDIDATES.max(self.expected_allocations + self.expected_allocations / 4);
            let mut candidates: Vec<String> = Vec::with_capacity(want);
            for _ in 0..want {
                let s = range_supi(range, random_msin(range)?)?.as_str().to_owned();
                if !candidates.contains(&s) {
                    candidates.push(s);
                }
            }
            let rows = match self.db().query(
                "SELECT supi FROM children WHERE supi = ANY($1) \
                 UNION ALL SELECT supi FROM parents WHERE supi = ANY($1)",
                &[&candidates],
            ) {
                Ok(r) => r,
                Err(e) => return Err(self.err(e)),
            };
            let taken: Vec<String> = rows
                .iter()
                .map(|r| get::<String>(r, 0))
                .collect::<Result<_, _>>()?;
            for c in candidates {
                if !taken.contains(&c) {
                    self.reserve.push(Supi::parse(&c).map_err(corrupt)?);
                }
            }
        }
        // A nearly full range: the rows in flight first, then the probes and walks.
        self.flush()?;
        engine::allocate_by_probing(self, range)
    }

    fn children_issued_since(
        &mut self,
        parent: &Supi,
        since: Timestamp,
    ) -> Result<(u32, Option<Timestamp>), StoreError> {
        self.flush()?;
        let row = match self.db().query_one(
            "SELECT count(*), min(issued_at) FROM children \
             WHERE parent_supi = $1 AND issued_at >= $2",
            &[&parent.as_str(), &since.0],
        ) {
            Ok(r) => r,
            Err(e) => return Err(self.err(e)),
        };
        Ok((
            u32_at(&row, 0)?,
            get::<Option<i64>>(&row, 1)?.map(Timestamp),
        ))
    }

    fn item_savepoint(&mut self) -> Result<(), StoreError> {
        self.item = Some(self.deferred.mark());
        self.savepoint_open = false;
        Ok(())
    }

    fn release_item(&mut self) -> Result<(), StoreError> {
        if std::mem::take(&mut self.savepoint_open) {
            self.exec("RELEASE SAVEPOINT batch_item", &[])?;
        }
        self.item = None;
        Ok(())
    }

    fn rollback_item(&mut self) -> Result<(), StoreError> {
        if std::mem::take(&mut self.savepoint_open) {
            self.exec("ROLLBACK TO SAVEPOINT batch_item", &[])?;
            self.exec("RELEASE SAVEPOINT batch_item", &[])?;
        }
        if let Some(mark) = self.item.take() {
            self.deferred.truncate(mark);
        }
        Ok(())
    }

    fn insert_child(&mut self, new: &NewChild) -> Result<(), StoreError> {
        let c = &new.child;
        if self
            .deferred
            .children
            .iter()
            .any(|(d, _, _)| d.supi == c.supi)
        {
            return Err(StoreError::Duplicate(c.supi.clone()));
        }
        let (k, opc) = seal_keys(self.kek, CHILDREN, &c.supi, &new.keys)?;
        self.deferred.children.push((c.clone(), k, opc));
        Ok(())
    }

    fn renew_child(
        &mut self,
        supi: &Supi,
        expires_at: Timestamp,
        restrictions: &Restrictions,
        now: Timestamp,
    ) -> Result<(), StoreError> {
        self.flush()?;
        let n = self.exec(
            "UPDATE children SET expires_at = $2, roaming_allowed = $3, allowed_dnns = $4, \
             max_bitrate_kbps = $5, renewed_at = $6 WHERE supi = $1",
            &[
                &supi.as_str(),
                &expires_at.0,
                &restrictions.roaming_allowed,
                &join_dnns(&restrictions.allowed_dnns),
                &restrictions.max_bitrate_kbps.map(i64::from),
                &now.0,
            ],
        )?;
        if n == 0 {
            return Err(StoreError::ChildNotFound(supi.clone()));
        }
        Ok(())
    }

    fn revoke_child(&mut self, supi: &Supi, now: Timestamp) -> Result<bool, StoreError> {
        self.flush()?;
        let n = self.exec(
            "UPDATE children SET status = 'revoked', revoked_at = $2 \
             WHERE supi = $1 AND status = 'active'",
            &[&supi.as_str(), &now.0],
        )?;
        if n == 0 && self.q(|c| q_child(c, supi, false))?.is_none() {
            return Err(StoreError::ChildNotFound(supi.clone()));
        }
        Ok(n == 1)
    }

    fn revoke_children_of(
        &mut self,
        parent: &Supi,
        now: Timestamp,
    ) -> Result<Vec<ChildCredential>, StoreError> {
        self.flush()?;
        let rows = match self.db().query(
            &format!(
                "UPDATE children c SET status = 'revoked', revoked_at = $2 \
                 WHERE c.parent_supi = $1 AND c.status = 'active' RETURNING {CHILD_COLS}"
            ),
            &[&parent.as_str(), &now.0],
        ) {
            Ok(r) => r,
            Err(e) => return Err(self.err(e)),
        };
        let mut revoked = rows
            .iter()
            .map(|r| rows::child(r))
            .collect::<Result<Vec<_>, _>>()?;
        revoked.sort_by(|a, b| a.supi.as_str().cmp(b.supi.as_str()));
        Ok(revoked)
    }

    fn aka_material(&mut self, supi: &Supi) -> Result<Option<AkaMaterial>, StoreError> {
        self.flush()?;
        engine::aka_material(self, supi)
    }

    fn set_sqn(&mut self, supi: &Supi, sqn: Sqn) -> Result<(), StoreError> {
        self.flush()?;
        let sqn = sql_sqn(sqn);
        for sql in [
            "UPDATE parents SET sqn = $2 WHERE supi = $1",
            "UPDATE children SET sqn = $2 WHERE supi = $1",
        ] {
            if self.exec(sql, &[&supi.as_str(), &sqn])? > 0 {
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
        self.flush()?;
        let row = match self.db().query_one(
            "INSERT INTO aka_failures AS f (supi, count, first_at, last_at) \
             VALUES ($1, 1, $2, $2) \
             ON CONFLICT (supi) DO UPDATE SET count = f.count + 1, last_at = excluded.last_at \
             RETURNING count, first_at, last_at",
            &[&supi.as_str(), &now.0],
        ) {
            Ok(r) => r,
            Err(e) => return Err(self.err(e)),
        };
        rows::aka_failures(&row)
    }

    fn clear_aka_failures(&mut self, supi: &Supi) -> Result<(), StoreError> {
        self.flush()?;
        self.exec(
            "DELETE FROM aka_failures WHERE supi = $1",
            &[&supi.as_str()],
        )
        .map(drop)
    }

    fn enqueue_sync(&mut self, supi: &Supi, now: Timestamp) -> Result<(), StoreError> {
        if self.sync_outbox {
            // Deferred like the batch's other rows (one statement per batch); no other row
            // refers to the outbox, so its order among them does not matter.
            self.deferred.sync.push((supi.clone(), now.0));
        }
        Ok(())
    }

    fn ack_sync(
        &mut self,
        supi: &Supi,
        up_to: i64,
        present: bool,
        now: Timestamp,
    ) -> Result<(), StoreError> {
        self.flush()?;
        self.exec(
            "DELETE FROM sync_outbox WHERE supi = $1 AND id <= $2",
            &[&supi.as_str(), &up_to],
        )?;
        self.exec(
            "INSERT INTO sync_state (supi, present, pushed_at) VALUES ($1, $2, $3) \
             ON CONFLICT (supi) DO UPDATE SET present = excluded.present, \
             pushed_at = excluded.pushed_at",
            &[&supi.as_str(), &present, &now.0],
        )?;
        Ok(())
    }

    fn sync_lease(
        &mut self,
        holder: &str,
        now: Timestamp,
        until: Timestamp,
    ) -> Result<bool, StoreError> {
        self.flush()?;
        self.exec(
            "INSERT INTO sync_lease (id, holder, until) VALUES (1, $1, $2) \
             ON CONFLICT (id) DO UPDATE SET holder = excluded.holder, until = excluded.until \
             WHERE sync_lease.holder = excluded.holder OR sync_lease.until < $3",
            &[&holder, &until.0, &now.0],
        )?;
        let row = match self
            .db()
            .query_one("SELECT holder FROM sync_lease WHERE id = 1", &[])
        {
            Ok(r) => r,
            Err(e) => return Err(self.err(e)),
        };
        let held: String = get(&row, 0)?;
        Ok(held == holder)
    }

    fn append_audit(&mut self, e: &AuditEvent) -> Result<(), StoreError> {
        self.deferred.audit.push(e.clone());
        Ok(())
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
            item: None,
            savepoint_open: false,
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

    fn set_sync_outbox(&self, on: bool) {
        self.sync_outbox.store(on, Ordering::Relaxed);
    }

    fn sync_outbox(&self) -> bool {
        self.sync_outbox.load(Ordering::Relaxed)
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
