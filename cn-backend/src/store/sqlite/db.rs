//! The connection layer of the SQLite engine: errors mapped onto [`StoreError`] (busy, corrupt,
//! unique violations), a fetched row read through [`Columns`](crate::store::rows::Columns), cached
//! statements fetching one or all rows, and the queries both the reader connections and the
//! write transaction run.

use rusqlite::{Connection, ErrorCode, OptionalExtension, Row, params};

use crate::model::{ChildCredential, Parent, Supi, Timestamp};
use crate::policy::IdempotencyKey;
use crate::store::rows::{self, CHILD_COLS, Columns, PARENT_COLS};
use crate::store::{AkaFailures, Issuance, StoreError};

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

pub(super) fn is_unique_violation(e: &rusqlite::Error) -> bool {
    matches!(e, rusqlite::Error::SqliteFailure(f, _)
        if f.code == ErrorCode::ConstraintViolation
            && (f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_PRIMARYKEY
                || f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE))
}

/// `Duplicate`/`RootExists`-style errors for a unique violation, [`db_err`] for the rest.
pub(super) fn unique_or(e: rusqlite::Error, dup: impl FnOnce() -> StoreError) -> StoreError {
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
pub(super) fn row_opt<T>(
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
pub(super) fn rows_all<T>(
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

pub(super) fn q_parent(conn: &Connection, supi: &Supi) -> Result<Option<Parent>, StoreError> {
    let sql = format!("SELECT {PARENT_COLS} FROM parents WHERE supi = ?1");
    row_opt(conn, &sql, [supi.as_str()], rows::parent)
}

pub(super) fn q_child(
    conn: &Connection,
    supi: &Supi,
) -> Result<Option<ChildCredential>, StoreError> {
    let sql = format!("SELECT {CHILD_COLS} FROM children c WHERE c.supi = ?1");
    row_opt(conn, &sql, [supi.as_str()], rows::child)
}

pub(super) fn q_count_active(
    conn: &Connection,
    parent: &Supi,
    now: Timestamp,
) -> Result<u32, StoreError> {
    conn.prepare_cached(
        "SELECT count(*) FROM children \
         WHERE parent_supi = ?1 AND status = 'active' AND expires_at > ?2",
    )
    .and_then(|mut s| s.query_row(params![parent.as_str(), now.0], |r| r.get(0)))
    .map_err(db_err)
}

pub(super) fn q_issuance(
    conn: &Connection,
    key: &IdempotencyKey,
) -> Result<Option<Issuance>, StoreError> {
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

pub(super) fn q_aka_failures(conn: &Connection, supi: &Supi) -> Result<AkaFailures, StoreError> {
    row_opt(
        conn,
        "SELECT count, first_at, last_at FROM aka_failures WHERE supi = ?1",
        [supi.as_str()],
        rows::aka_failures,
    )
    .map(Option::unwrap_or_default)
}

pub(super) fn q_supi_taken(conn: &Connection, supi: &Supi) -> Result<bool, StoreError> {
    conn.prepare_cached(
        "SELECT EXISTS (SELECT 1 FROM parents WHERE supi = ?1) \
             OR EXISTS (SELECT 1 FROM children WHERE supi = ?1)",
    )
    .and_then(|mut s| s.query_row([supi.as_str()], |r| r.get(0)))
    .map_err(db_err)
}
