//! Rows as both engines store them: the column lists, the decoding of a fetched row into the
//! domain types, and the values bound for them. Each engine fetches with its own SQL and reads
//! the columns through [`Columns`]; what a column *means* is decided here, once.

use companion_crypto::aka::Sqn;

use super::{
    AkaFailures, AuditAction, AuditEvent, AuditRecord, Issuance, IssuanceKind, ManufacturerRoot,
    OutboxEntry, StoreError, SyncState,
};
use crate::model::{
    Amf, ChildCredential, ChildStatus, DeviceId, Dnn, KeyFingerprint, Parent, ParentPolicy,
    RequestId, Restrictions, SubscriptionStatus, Supi, Timestamp,
};

/// The `parents` columns [`parent`] decodes, in its order.
pub(crate) const PARENT_COLS: &str = "supi, amf, sqn, status, max_children, max_lifetime_s, \
                                      roaming_allowed, allowed_dnns, max_bitrate_kbps, \
                                      created_at, updated_at, require_attestation";

/// The `children c` columns [`child`] decodes, in its order.
pub(crate) const CHILD_COLS: &str = "c.supi, c.parent_supi, c.device_id, c.device_key_fp, \
                                     c.request_id, c.amf, c.sqn, c.issued_at, c.expires_at, \
                                     c.renewed_at, c.roaming_allowed, c.allowed_dnns, \
                                     c.max_bitrate_kbps, c.status, c.revoked_at, c.device_spki";

/// One fetched row of an engine, read by column index as the engine-neutral SQL types both
/// schemas use (integers are 64-bit, booleans native or 0/1, text, blobs). A value of the wrong
/// type is [`StoreError::Corrupt`].
pub(crate) trait Columns {
    /// A non-null integer.
    fn int(&self, idx: usize) -> Result<i64, StoreError>;
    /// A nullable integer.
    fn opt_int(&self, idx: usize) -> Result<Option<i64>, StoreError>;
    /// A boolean.
    fn boolean(&self, idx: usize) -> Result<bool, StoreError>;
    /// Non-null text.
    fn text(&self, idx: usize) -> Result<String, StoreError>;
    /// Nullable text.
    fn opt_text(&self, idx: usize) -> Result<Option<String>, StoreError>;
    /// A non-null blob.
    fn blob(&self, idx: usize) -> Result<Vec<u8>, StoreError>;
    /// A nullable blob.
    fn opt_blob(&self, idx: usize) -> Result<Option<Vec<u8>>, StoreError>;
}

/// A stored value that does not decode.
pub(crate) fn corrupt(what: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(what.to_string())
}

/// A fixed-length blob (AMF, request ID, key fingerprint).
pub(crate) fn fixed<const N: usize>(row: &dyn Columns, idx: usize) -> Result<[u8; N], StoreError> {
    row.blob(idx)?
        .try_into()
        .map_err(|_| corrupt(format!("column {idx}: wrong length")))
}

/// A SUPI stored as text.
pub(crate) fn supi(row: &dyn Columns, idx: usize) -> Result<Supi, StoreError> {
    Supi::parse(&row.text(idx)?).map_err(corrupt)
}

fn opt_supi(row: &dyn Columns, idx: usize) -> Result<Option<Supi>, StoreError> {
    row.opt_text(idx)?
        .map(|s| Supi::parse(&s).map_err(corrupt))
        .transpose()
}

/// A non-negative integer.
pub(crate) fn uint(row: &dyn Columns, idx: usize) -> Result<u64, StoreError> {
    u64::try_from(row.int(idx)?).map_err(corrupt)
}

fn u32_at(row: &dyn Columns, idx: usize) -> Result<u32, StoreError> {
    u32::try_from(row.int(idx)?).map_err(corrupt)
}

fn opt_u32(row: &dyn Columns, idx: usize) -> Result<Option<u32>, StoreError> {
    row.opt_int(idx)?
        .map(|v| u32::try_from(v).map_err(corrupt))
        .transpose()
}

fn opt_time(row: &dyn Columns, idx: usize) -> Result<Option<Timestamp>, StoreError> {
    Ok(row.opt_int(idx)?.map(Timestamp))
}

fn sqn(row: &dyn Columns, idx: usize) -> Result<Sqn, StoreError> {
    Sqn::new(uint(row, idx)?).map_err(corrupt)
}

/// A comma-separated DNN list (empty: none).
fn dnns(row: &dyn Columns, idx: usize) -> Result<Vec<Dnn>, StoreError> {
    row.text(idx)?
        .split(',')
        .filter(|d| !d.is_empty())
        .map(|d| Dnn::parse(d).map_err(corrupt))
        .collect()
}

/// A DNN list as stored: comma-separated.
pub(crate) fn join_dnns(dnns: &[Dnn]) -> String {
    dnns.iter().map(Dnn::as_str).collect::<Vec<_>>().join(",")
}

/// A `u64` as the 64-bit signed integer both engines store.
pub(crate) fn sql_u64(v: u64) -> Result<i64, StoreError> {
    i64::try_from(v).map_err(|_| StoreError::Database(format!("value {v} out of range")))
}

/// A 48-bit SQN always fits in a 64-bit signed integer.
pub(crate) fn sql_sqn(sqn: Sqn) -> i64 {
    i64::try_from(sqn.value()).unwrap_or(i64::MAX)
}

/// A parent row selected with [`PARENT_COLS`].
pub(crate) fn parent(row: &dyn Columns) -> Result<Parent, StoreError> {
    Ok(Parent {
        supi: supi(row, 0)?,
        amf: Amf(fixed(row, 1)?),
        sqn: sqn(row, 2)?,
        status: SubscriptionStatus::parse(&row.text(3)?).map_err(corrupt)?,
        policy: ParentPolicy {
            max_children: u32_at(row, 4)?,
            max_lifetime_s: uint(row, 5)?,
            roaming_allowed: row.boolean(6)?,
            allowed_dnns: dnns(row, 7)?,
            max_bitrate_kbps: opt_u32(row, 8)?,
            require_attestation: row.boolean(11)?,
        },
        created_at: Timestamp(row.int(9)?),
        updated_at: Timestamp(row.int(10)?),
    })
}

/// A child row selected with [`CHILD_COLS`].
pub(crate) fn child(row: &dyn Columns) -> Result<ChildCredential, StoreError> {
    Ok(ChildCredential {
        supi: supi(row, 0)?,
        parent: supi(row, 1)?,
        device_id: DeviceId::parse(&row.text(2)?).map_err(corrupt)?,
        device_key_fingerprint: KeyFingerprint(fixed(row, 3)?),
        device_spki: row.opt_blob(15)?,
        request_id: RequestId(fixed(row, 4)?),
        amf: Amf(fixed(row, 5)?),
        sqn: sqn(row, 6)?,
        issued_at: Timestamp(row.int(7)?),
        expires_at: Timestamp(row.int(8)?),
        renewed_at: opt_time(row, 9)?,
        restrictions: Restrictions {
            roaming_allowed: row.boolean(10)?,
            allowed_dnns: dnns(row, 11)?,
            max_bitrate_kbps: opt_u32(row, 12)?,
        },
        status: ChildStatus::parse(&row.text(13)?).map_err(corrupt)?,
        revoked_at: opt_time(row, 14)?,
    })
}

/// The audit columns, in the order [`audit`] decodes them.
pub(crate) const AUDIT_COLS: &str =
    "id, at, actor, action, supi, parent_supi, device_id, request_id, detail";

/// An audit row selected with [`AUDIT_COLS`].
pub(crate) fn audit(row: &dyn Columns) -> Result<AuditRecord, StoreError> {
    let action = row.text(3)?;
    Ok(AuditRecord {
        id: row.int(0)?,
        event: AuditEvent {
            at: Timestamp(row.int(1)?),
            actor: row.text(2)?,
            action: AuditAction::parse(&action)
                .ok_or_else(|| corrupt(format!("unknown audit action {action:?}")))?,
            supi: supi(row, 4)?,
            parent: opt_supi(row, 5)?,
            device_id: row
                .opt_text(6)?
                .map(|d| DeviceId::parse(&d).map_err(corrupt))
                .transpose()?,
            request_id: row
                .opt_blob(7)?
                .map(|r| {
                    <[u8; 16]>::try_from(r)
                        .map(RequestId)
                        .map_err(|_| corrupt("wrong request ID length"))
                })
                .transpose()?,
            detail: row.text(8)?,
        },
    })
}

/// An issuance row: `child_supi, kind, sealed, created_at`.
pub(crate) fn issuance(row: &dyn Columns) -> Result<Issuance, StoreError> {
    let kind = row.text(1)?;
    Ok(Issuance {
        child_supi: supi(row, 0)?,
        kind: IssuanceKind::parse(&kind)
            .ok_or_else(|| corrupt(format!("unknown issuance kind {kind:?}")))?,
        sealed: row.blob(2)?,
        created_at: Timestamp(row.int(3)?),
    })
}

/// An AKA failure counter row: `count, first_at, last_at`.
pub(crate) fn aka_failures(row: &dyn Columns) -> Result<AkaFailures, StoreError> {
    Ok(AkaFailures {
        count: u32_at(row, 0)?,
        first_at: Some(Timestamp(row.int(1)?)),
        last_at: Some(Timestamp(row.int(2)?)),
    })
}

/// A manufacturer root row: `name, cert, fingerprint, subject, added_at`.
pub(crate) fn manufacturer_root(row: &dyn Columns) -> Result<ManufacturerRoot, StoreError> {
    Ok(ManufacturerRoot {
        name: row.text(0)?,
        cert_der: row.blob(1)?,
        fingerprint: fixed(row, 2)?,
        subject: row.text(3)?,
        added_at: Timestamp(row.int(4)?),
    })
}

/// An outbox row: `id, supi, created_at`.
pub(crate) fn outbox_entry(row: &dyn Columns) -> Result<OutboxEntry, StoreError> {
    Ok(OutboxEntry {
        id: row.int(0)?,
        supi: supi(row, 1)?,
        created_at: Timestamp(row.int(2)?),
    })
}

/// A credential's sync state from its `sync_state` row (`present, pushed_at`), if any, and
/// the number of its outbox rows; `None` when the core was never told of it.
pub(crate) fn sync_state(pushed: Option<(bool, i64)>, pending: i64) -> Option<SyncState> {
    if pushed.is_none() && pending == 0 {
        return None;
    }
    Some(SyncState {
        present: pushed.map(|p| p.0),
        pushed_at: pushed.map(|p| Timestamp(p.1)),
        pending: u64::try_from(pending).unwrap_or(0),
    })
}
