//! Pending deliveries: sealed credentials the CN issued, kept until their device acknowledges
//! them; recording an issue updates the held credential and supersedes older deliveries.

use crate::state::CachedSql;
use companion_proto::{DeviceId, RequestId, Supi};
use rusqlite::{Connection, OptionalExtension, Row, params};

use super::requests::{RenewalKey, RequestKind};
use super::rows::{device_at, request_id_at, supi_at, unwrap_err};
use super::{State, StateError, UnixTime};

/// A sealed credential waiting for its device's acknowledgement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingDelivery {
    /// The request that issued it.
    pub request_id: RequestId,
    /// The device it is for.
    pub device_id: DeviceId,
    /// The child credential's SUPI.
    pub supi: Supi,
    /// When the credential expires.
    pub expires_at: UnixTime,
    /// The encoded `Sealed` bundle exactly as the CN returned it; the gateway cannot open it.
    pub sealed: Vec<u8>,
    /// When the CN's answer was recorded.
    pub created_at: UnixTime,
}

/// What [`State::acknowledge`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckOutcome {
    /// The delivery was pending and is now forgotten; the credential is marked acknowledged.
    Acknowledged,
    /// Already acknowledged earlier (a repeated ack): nothing changed.
    AlreadyAcknowledged,
    /// No delivery with this request ID for this device.
    Unknown,
}

fn delivery_from_row(row: &Row<'_>) -> rusqlite::Result<PendingDelivery> {
    Ok(PendingDelivery {
        request_id: request_id_at(row, 0)?,
        device_id: device_at(row, 1)?,
        supi: supi_at(row, 2)?,
        expires_at: row.get(3)?,
        sealed: row.get(4)?,
        created_at: row.get(5)?,
    })
}

/// Records one issued credential (see [`State::record_issued`]); runs inside a transaction.
fn record_issued_in(tx: &Connection, d: &PendingDelivery) -> Result<(), StateError> {
    let inserted = tx.execute_cached(
        "INSERT OR IGNORE INTO deliveries
             (request_id, device_id, supi, expires_at, sealed, created_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![
            d.request_id.as_bytes().as_slice(),
            d.device_id.as_str(),
            d.supi.as_str(),
            d.expires_at,
            d.sealed,
            d.created_at
        ],
    )?;
    if inserted > 0 {
        type Row = (Option<Vec<u8>>, Option<Vec<u8>>, Option<String>);
        let (hpke_pk, renewal_binding, kind): Row = tx
            .query_row_cached(
                "SELECT hpke_pk, renewal_binding, kind FROM requests WHERE request_id = ?1",
                [d.request_id.as_bytes().as_slice()],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()?
            .unwrap_or((None, None, None));
        tx.execute_cached(
            "UPDATE deliveries SET kind = ?2 WHERE request_id = ?1",
            params![d.request_id.as_bytes().as_slice(), kind],
        )?;
        // The renewal authorisation belongs to the request that produced this credential: a
        // new credential without one leaves none behind (an older one would not verify).
        tx.execute_cached(
            "INSERT INTO credentials
                 (device_id, supi, expires_at, request_id, acknowledged_at, hpke_pk,
                  renewal_binding)
             VALUES (?1, ?2, ?3, ?4, NULL, ?5, ?6)
             ON CONFLICT (device_id) DO UPDATE SET supi = excluded.supi,
                 expires_at = excluded.expires_at, request_id = excluded.request_id,
                 acknowledged_at = NULL,
                 hpke_pk = coalesce(excluded.hpke_pk, credentials.hpke_pk),
                 renewal_binding = excluded.renewal_binding",
            params![
                d.device_id.as_str(),
                d.supi.as_str(),
                d.expires_at,
                d.request_id.as_bytes().as_slice(),
                hpke_pk,
                renewal_binding
            ],
        )?;
        // Deliveries of older requests of this device are superseded.
        tx.execute_cached(
            "DELETE FROM deliveries WHERE device_id = ?1 AND request_id <> ?2",
            params![d.device_id.as_str(), d.request_id.as_bytes().as_slice()],
        )?;
    }
    tx.execute_cached(
        "DELETE FROM requests WHERE request_id = ?1",
        [d.request_id.as_bytes().as_slice()],
    )?;
    Ok(())
}

/// Records an acknowledgement (see [`State::acknowledge`]); runs inside a transaction.
fn acknowledge_in(
    tx: &Connection,
    device: &DeviceId,
    request_id: &RequestId,
    at: UnixTime,
) -> Result<AckOutcome, StateError> {
    let removed = tx.execute_cached(
        "DELETE FROM deliveries WHERE request_id = ?1 AND device_id = ?2",
        params![request_id.as_bytes().as_slice(), device.as_str()],
    )?;
    if removed > 0 {
        tx.execute_cached(
            "UPDATE credentials SET acknowledged_at = ?3
             WHERE device_id = ?1 AND request_id = ?2",
            params![device.as_str(), request_id.as_bytes().as_slice(), at],
        )?;
        return Ok(AckOutcome::Acknowledged);
    }
    let acked: Option<Option<i64>> = tx
        .query_row_cached(
            "SELECT acknowledged_at FROM credentials
             WHERE device_id = ?1 AND request_id = ?2",
            params![device.as_str(), request_id.as_bytes().as_slice()],
            |r| r.get(0),
        )
        .optional()?;
    Ok(match acked {
        Some(Some(_)) => AckOutcome::AlreadyAcknowledged,
        _ => AckOutcome::Unknown,
    })
}

impl State {
    /// The CN issued a credential: in one transaction, keep the sealed blob until the device
    /// acknowledges it, record the credential as held (unacknowledged) and close the request.
    /// Idempotent: recording the same request ID twice changes nothing.
    pub fn record_issued(&self, d: &PendingDelivery) -> Result<(), StateError> {
        let d = d.clone();
        self.write_grouped(move |c| record_issued_in(c, &d))
    }

    /// [`record_issued`](Self::record_issued) for every credential of a CN batch, in one
    /// savepoint of a group commit: all are recorded or none. Hands the deliveries back once
    /// they are durable.
    pub async fn record_issued_all_async(
        &self,
        ds: Vec<PendingDelivery>,
    ) -> Result<Vec<PendingDelivery>, StateError> {
        self.write_grouped_async(move |c| {
            ds.iter().try_for_each(|d| record_issued_in(c, d))?;
            Ok(ds)
        })
        .await
    }

    /// Deliveries not yet acknowledged by `device`, oldest first (redeliver on reconnect).
    pub fn pending_for_device(
        &self,
        device: &DeviceId,
    ) -> Result<Vec<PendingDelivery>, StateError> {
        let conn = self.reader();
        let mut stmt = conn.prepare_cached(
            "SELECT request_id, device_id, supi, expires_at, sealed, created_at
             FROM deliveries WHERE device_id = ?1 ORDER BY created_at, request_id",
        )?;
        let rows = stmt.query_map([device.as_str()], delivery_from_row)?;
        rows.collect::<Result<_, _>>().map_err(unwrap_err)
    }

    /// Every pending delivery.
    pub fn pending_deliveries(&self) -> Result<Vec<PendingDelivery>, StateError> {
        let conn = self.reader();
        let mut stmt = conn.prepare_cached(
            "SELECT request_id, device_id, supi, expires_at, sealed, created_at
             FROM deliveries ORDER BY created_at, request_id",
        )?;
        let rows = stmt.query_map([], delivery_from_row)?;
        rows.collect::<Result<_, _>>().map_err(unwrap_err)
    }

    /// The device acknowledged delivery `request_id`: forget the blob, mark the credential
    /// acknowledged. Only the device the delivery belongs to can acknowledge it.
    pub fn acknowledge(
        &self,
        device: &DeviceId,
        request_id: &RequestId,
        at: UnixTime,
    ) -> Result<AckOutcome, StateError> {
        let (device, request_id) = (device.clone(), *request_id);
        self.write_grouped(move |c| acknowledge_in(c, &device, &request_id, at))
    }

    /// [`acknowledge`](Self::acknowledge) for async callers (group-committed).
    pub async fn acknowledge_async(
        &self,
        device: DeviceId,
        request_id: RequestId,
        at: UnixTime,
    ) -> Result<AckOutcome, StateError> {
        self.write_grouped_async(move |c| acknowledge_in(c, &device, &request_id, at))
            .await
    }

    /// The device rejected delivery `request_id` (`credential_unusable`): drop the blob.
    pub fn discard_delivery(
        &self,
        device: &DeviceId,
        request_id: &RequestId,
    ) -> Result<bool, StateError> {
        let n = self.conn().execute_cached(
            "DELETE FROM deliveries WHERE request_id = ?1 AND device_id = ?2",
            params![request_id.as_bytes().as_slice(), device.as_str()],
        )?;
        Ok(n > 0)
    }

    /// The SUPI and kind of pending delivery `request_id` of `device` (kind `None` for
    /// deliveries recorded before schema v3).
    pub fn delivery_kind(
        &self,
        device: &DeviceId,
        request_id: &RequestId,
    ) -> Result<Option<(Supi, Option<RequestKind>)>, StateError> {
        let row: Option<(String, Option<String>)> = self
            .reader()
            .query_row_cached(
                "SELECT supi, kind FROM deliveries WHERE request_id = ?1 AND device_id = ?2",
                params![request_id.as_bytes().as_slice(), device.as_str()],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        row.map(|(supi, kind)| {
            Ok((
                Supi::new(&supi).map_err(|e| StateError::Corrupt(e.to_string()))?,
                kind.as_deref().and_then(RequestKind::parse),
            ))
        })
        .transpose()
    }

    /// The pending delivery with this request ID for `device`, if any.
    pub fn delivery(
        &self,
        device: &DeviceId,
        request_id: &RequestId,
    ) -> Result<Option<PendingDelivery>, StateError> {
        self.reader()
            .query_row_cached(
                "SELECT request_id, device_id, supi, expires_at, sealed, created_at
                 FROM deliveries WHERE request_id = ?1 AND device_id = ?2",
                params![request_id.as_bytes().as_slice(), device.as_str()],
                delivery_from_row,
            )
            .optional()
            .map_err(unwrap_err)
    }

    /// The HPKE public key of the request that issued `device`'s credential (its renewal key)
    /// and the device's signature authorising a renewal sealed to it, when both are known.
    pub fn renewal_key(&self, device: &DeviceId) -> Result<Option<RenewalKey>, StateError> {
        type Row = (Option<Vec<u8>>, Option<Vec<u8>>);
        let v: Option<Row> = self
            .conn()
            .query_row_cached(
                "SELECT hpke_pk, renewal_binding FROM credentials WHERE device_id = ?1",
                [device.as_str()],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        Ok(match v {
            Some((Some(pk), Some(b))) => Some((pk, b)),
            _ => None,
        })
    }
}
