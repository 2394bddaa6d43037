//! Row decoding and statement helpers shared by the tables: typed column readers that turn a
//! stored value that no longer parses into [`StateError::Corrupt`].

use companion_proto::{DeviceId, RequestId, Supi};
use rusqlite::Row;
use rusqlite::types::Type;

use super::StateError;

/// A conversion failure carrying [`StateError::Corrupt`] for column `col`.
pub(super) fn corrupt(col: usize, what: impl Into<String>) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(
        col,
        Type::Text,
        Box::new(StateError::Corrupt(what.into())),
    )
}

pub(super) fn device_at(row: &Row<'_>, col: usize) -> rusqlite::Result<DeviceId> {
    let s: String = row.get(col)?;
    DeviceId::new(&s).map_err(|e| corrupt(col, e.to_string()))
}

pub(super) fn supi_at(row: &Row<'_>, col: usize) -> rusqlite::Result<Supi> {
    let s: String = row.get(col)?;
    Supi::new(&s).map_err(|e| corrupt(col, e.to_string()))
}

pub(super) fn request_id_at(row: &Row<'_>, col: usize) -> rusqlite::Result<RequestId> {
    let b: Vec<u8> = row.get(col)?;
    <[u8; 16]>::try_from(b)
        .map(RequestId)
        .map_err(|_| corrupt(col, "request ID is not 16 bytes"))
}

/// Turns a conversion failure carrying a [`StateError::Corrupt`] back into it.
pub(super) fn unwrap_err(e: rusqlite::Error) -> StateError {
    if let rusqlite::Error::FromSqlConversionFailure(_, _, inner) = &e
        && let Some(StateError::Corrupt(m)) = inner.downcast_ref::<StateError>()
    {
        return StateError::Corrupt(m.clone());
    }
    StateError::Db(e)
}

pub(super) fn is_unique_violation(e: &rusqlite::Error) -> bool {
    matches!(e, rusqlite::Error::SqliteFailure(f, _)
        if f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE
            || f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_PRIMARYKEY)
}
