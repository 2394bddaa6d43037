//! Held credentials: the child credential each device holds as far as the gateway knows, and
//! when it expires.

use crate::state::CachedSql;
use companion_proto::{DeviceId, RequestId, Supi};
use rusqlite::{OptionalExtension, Row};

use super::rows::{device_at, request_id_at, supi_at, unwrap_err};
use super::{State, StateError, UnixTime};

/// The child credential a device holds (as far as the gateway knows).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldCredential {
    /// The device holding it.
    pub device_id: DeviceId,
    /// The child credential's SUPI.
    pub supi: Supi,
    /// When it expires.
    pub expires_at: UnixTime,
    /// The request that issued it.
    pub request_id: RequestId,
    /// When the device acknowledged the delivery; `None` while it is still pending.
    pub acknowledged_at: Option<UnixTime>,
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

impl State {
    /// The credential `device` holds, if any.
    pub fn credential(&self, device: &DeviceId) -> Result<Option<HeldCredential>, StateError> {
        self.reader()
            .query_row_cached(
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
        let mut stmt = conn.prepare_cached(&format!(
            "SELECT device_id, supi, expires_at, request_id, acknowledged_at
             FROM credentials WHERE {cond} ORDER BY {order}"
        ))?;
        let rows = match t {
            Some(t) => stmt.query_map([t], credential_from_row)?,
            None => stmt.query_map([], credential_from_row)?,
        };
        rows.collect::<Result<_, _>>().map_err(unwrap_err)
    }
}
