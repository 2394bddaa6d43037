//! Outstanding requests: what was sent (or is about to be sent) to the CN and not yet answered,
//! so a retry after a reconnect reuses the same request ID; and the packed key-binding
//! signatures they carry.

use crate::state::CachedSql;
use companion_proto::binding::KeyBinding;
use companion_proto::{DeviceId, RequestId, Supi};
use rusqlite::{Connection, OptionalExtension, Row, params};

use super::rows::{corrupt, device_at, is_unique_violation, request_id_at, unwrap_err};
use super::{State, StateError, UnixTime};

/// Provisioning or renewal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RequestKind {
    /// A first credential for a device.
    Provision,
    /// A new credential replacing the one the device holds.
    Renew,
}

impl RequestKind {
    /// The value stored and reported.
    pub fn as_str(self) -> &'static str {
        match self {
            RequestKind::Provision => "provision",
            RequestKind::Renew => "renew",
        }
    }

    pub(super) fn parse(s: &str) -> Option<Self> {
        match s {
            "provision" => Some(RequestKind::Provision),
            "renew" => Some(RequestKind::Renew),
            _ => None,
        }
    }
}

/// A request the CN has not answered yet (at most one per device).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutstandingRequest {
    /// The request's ID (reused on every retry).
    pub request_id: RequestId,
    /// The device it is for.
    pub device_id: DeviceId,
    /// Provisioning or renewal.
    pub kind: RequestKind,
    /// The device's HPKE (X25519) public key the CN seals to.
    pub hpke_public_key: Vec<u8>,
    /// When it was recorded.
    pub created_at: UnixTime,
    /// The control parameters asked for, as JSON (v2; `None` for older rows: use defaults).
    pub params: Option<String>,
    /// Renewals: the SUPI being renewed (v2).
    pub renew_supi: Option<Supi>,
    /// The device's key-binding signature over this request (v3; [`pack_binding`]).
    pub binding: Option<Vec<u8>>,
    /// The device's signature authorising the pre-fetch of this credential's renewal (v3).
    pub renewal_binding: Option<Vec<u8>>,
}

/// A credential's renewal key (the HPKE public key) and the device's packed signature
/// authorising a renewal sealed to it.
pub type RenewalKey = (Vec<u8>, Vec<u8>);

/// Stores a [`KeyBinding`] as one blob: `u16-BE(scheme) || signature`.
pub fn pack_binding(b: &KeyBinding) -> Vec<u8> {
    let mut v = Vec::with_capacity(2 + b.signature.len());
    v.extend_from_slice(&b.scheme.to_be_bytes());
    v.extend_from_slice(&b.signature);
    v
}

/// The inverse of [`pack_binding`]; `None` for a blob too short to hold a scheme.
pub fn unpack_binding(v: &[u8]) -> Option<KeyBinding> {
    let (scheme, sig) = v.split_first_chunk::<2>()?;
    Some(KeyBinding {
        scheme: u16::from_be_bytes(*scheme),
        signature: sig.to_vec(),
    })
}

fn request_from_row(row: &Row<'_>) -> rusqlite::Result<OutstandingRequest> {
    let kind: String = row.get(2)?;
    let supi: Option<String> = row.get(6)?;
    Ok(OutstandingRequest {
        request_id: request_id_at(row, 0)?,
        device_id: device_at(row, 1)?,
        kind: RequestKind::parse(&kind).ok_or_else(|| corrupt(2, "unknown request kind"))?,
        hpke_public_key: row.get(3)?,
        created_at: row.get(4)?,
        params: row.get(5)?,
        renew_supi: supi
            .map(|s| Supi::new(&s).map_err(|e| corrupt(6, e.to_string())))
            .transpose()?,
        binding: row.get(7)?,
        renewal_binding: row.get(8)?,
    })
}

/// Records an outstanding request (see [`State::insert_request`]).
fn insert_request_in(conn: &Connection, r: &OutstandingRequest) -> Result<(), StateError> {
    let res = conn.execute_cached(
        "INSERT INTO requests (request_id, device_id, kind, hpke_pk, created_at, params,
             renew_supi, binding, renewal_binding)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
        params![
            r.request_id.as_bytes().as_slice(),
            r.device_id.as_str(),
            r.kind.as_str(),
            r.hpke_public_key,
            r.created_at,
            r.params,
            r.renew_supi.as_ref().map(|s| s.as_str()),
            r.binding,
            r.renewal_binding
        ],
    );
    match res {
        Ok(_) => Ok(()),
        Err(e) if is_unique_violation(&e) => Err(StateError::Conflict(format!(
            "device {} already has a request outstanding",
            r.device_id
        ))),
        Err(e) => Err(e.into()),
    }
}

impl State {
    /// Records a request before it is sent to the CN. [`StateError::Conflict`] if the device
    /// already has one outstanding (one provisioning at a time per device) or the ID is reused.
    pub fn insert_request(&self, r: &OutstandingRequest) -> Result<(), StateError> {
        let r = r.clone();
        self.write_grouped(move |c| insert_request_in(c, &r))
    }

    /// [`insert_request`](Self::insert_request) for async callers (group-committed).
    pub async fn insert_request_async(&self, r: OutstandingRequest) -> Result<(), StateError> {
        self.write_grouped_async(move |c| insert_request_in(c, &r))
            .await
    }

    /// The device's outstanding request, if any (reuse its ID when retrying).
    pub fn request_for_device(
        &self,
        device: &DeviceId,
    ) -> Result<Option<OutstandingRequest>, StateError> {
        self.reader()
            .query_row_cached(
                "SELECT request_id, device_id, kind, hpke_pk, created_at, params, renew_supi,
                    binding, renewal_binding
                 FROM requests WHERE device_id = ?1",
                [device.as_str()],
                request_from_row,
            )
            .optional()
            .map_err(unwrap_err)
    }

    /// Every outstanding request, oldest first (to resend after a CN reconnect).
    pub fn outstanding_requests(&self) -> Result<Vec<OutstandingRequest>, StateError> {
        let conn = self.reader();
        let mut stmt = conn.prepare_cached(
            "SELECT request_id, device_id, kind, hpke_pk, created_at, params, renew_supi,
                    binding, renewal_binding
             FROM requests ORDER BY created_at, request_id",
        )?;
        let rows = stmt.query_map([], request_from_row)?;
        rows.collect::<Result<_, _>>().map_err(unwrap_err)
    }

    /// Forgets a request the CN refused for good; `false` if unknown.
    pub fn remove_request(&self, id: &RequestId) -> Result<bool, StateError> {
        let n = self.conn().execute_cached(
            "DELETE FROM requests WHERE request_id = ?1",
            [id.as_bytes().as_slice()],
        )?;
        Ok(n > 0)
    }
}
