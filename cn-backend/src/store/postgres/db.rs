//! The connection layer of the PostgreSQL engine: errors mapped onto [`StoreError`] (connection
//! lost, retryable conflicts, unique violations), a fetched row read through
//! [`Columns`](crate::store::rows::Columns), the per-connection statement cache ([`Db`]) and the
//! queries both the pooled connections and the write transaction run.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};

use postgres::error::SqlState;
use postgres::types::ToSql;
use postgres::{Client, GenericClient, Row, Statement};

use crate::model::{ChildCredential, Parent, Supi, Timestamp};
use crate::policy::IdempotencyKey;
use crate::store::rows::{self, CHILD_COLS, Columns, PARENT_COLS, corrupt};
use crate::store::{Issuance, StoreError};

/// Whether `e` says the server is unreachable or gone (closed connection, I/O error,
/// SQLSTATE class 08, or the server shutting down or starting up), rather than refusing the
/// statement.
pub(super) fn is_connection_error(e: &postgres::Error) -> bool {
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
pub(super) fn error_text(e: &postgres::Error) -> String {
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

pub(super) fn is_retryable(e: &postgres::Error) -> bool {
    matches!(
        e.code(),
        Some(c) if *c == SqlState::T_R_SERIALIZATION_FAILURE || *c == SqlState::T_R_DEADLOCK_DETECTED
    )
}

pub(super) fn is_retryable_store_err(e: &StoreError) -> bool {
    matches!(e, StoreError::Database(m)
        if m.ends_with("(SQLSTATE 40001)") || m.ends_with("(SQLSTATE 40P01)"))
}

pub(super) fn is_unique_violation(e: &postgres::Error) -> bool {
    e.code() == Some(&SqlState::UNIQUE_VIOLATION)
}

pub(super) fn get<'a, T: postgres::types::FromSql<'a>>(
    row: &'a Row,
    idx: usize,
) -> Result<T, StoreError> {
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
pub(super) fn u32_at(row: &Row, idx: usize) -> Result<u32, StoreError> {
    u32::try_from(rows::uint(row, idx)?).map_err(corrupt)
}

/// A connection or transaction with the statement cache of its connection.
pub(super) struct Db<'a, C> {
    pub(super) c: &'a mut C,
    pub(super) stmts: &'a mut HashMap<String, Statement>,
    pub(super) trips: &'a AtomicU64,
}

pub(super) type Params<'p> = &'p [&'p (dyn ToSql + Sync)];

impl<C: GenericClient> Db<'_, C> {
    /// The prepared statement for `sql`, prepared on first use on this connection.
    pub(super) fn stmt(&mut self, sql: &str) -> Result<Statement, postgres::Error> {
        self.trips.fetch_add(1, Ordering::Relaxed);
        if let Some(s) = self.stmts.get(sql) {
            return Ok(s.clone());
        }
        self.trips.fetch_add(1, Ordering::Relaxed);
        let s = self.c.prepare(sql)?;
        self.stmts.insert(sql.to_owned(), s.clone());
        Ok(s)
    }

    pub(super) fn query(
        &mut self,
        sql: &str,
        params: Params<'_>,
    ) -> Result<Vec<Row>, postgres::Error> {
        let s = self.stmt(sql)?;
        self.c.query(&s, params)
    }

    pub(super) fn query_opt(
        &mut self,
        sql: &str,
        params: Params<'_>,
    ) -> Result<Option<Row>, postgres::Error> {
        let s = self.stmt(sql)?;
        self.c.query_opt(&s, params)
    }

    pub(super) fn query_one(
        &mut self,
        sql: &str,
        params: Params<'_>,
    ) -> Result<Row, postgres::Error> {
        let s = self.stmt(sql)?;
        self.c.query_one(&s, params)
    }

    pub(super) fn execute(
        &mut self,
        sql: &str,
        params: Params<'_>,
    ) -> Result<u64, postgres::Error> {
        let s = self.stmt(sql)?;
        self.c.execute(&s, params)
    }
}

/// A pooled connection and its prepared statements.
pub(super) struct Conn {
    pub(super) client: Client,
    pub(super) stmts: HashMap<String, Statement>,
}

// ---- queries shared by the pooled connections and the write transaction ----

pub(super) fn q_parent(
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

pub(super) fn q_child(
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

pub(super) fn q_count_active(
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

pub(super) fn q_issuance(
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

pub(super) fn q_supi_taken(
    c: &mut Db<'_, impl GenericClient>,
    supi: &Supi,
) -> Result<bool, StoreError> {
    let row = c
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM parents WHERE supi = $1) \
                 OR EXISTS (SELECT 1 FROM children WHERE supi = $1)",
            &[&supi.as_str()],
        )
        .map_err(pg_err)?;
    get(&row, 0)
}
