//! Revocations: unpairing a device or revoking one child forgets it locally at once and records
//! what the CN still has to confirm.

use crate::state::CachedSql;
use companion_proto::{DeviceId, Supi};
use rusqlite::{OptionalExtension, Row, TransactionBehavior, params};

use super::rows::{corrupt, device_at, unwrap_err};
use super::{State, StateError, UnixTime};

/// What a revocation revokes at the CN.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RevocationScope {
    /// Every child credential of the device under this gateway's parent (`Revoke{device_id}`):
    /// the owner revoked the device.
    Device,
    /// One child (`Revoke{supi}`): a credential issued for a device that was revoked or
    /// unpaired meanwhile, or one the device reported unusable.
    Child,
}

impl RevocationScope {
    /// The value stored.
    pub fn as_str(self) -> &'static str {
        match self {
            RevocationScope::Device => "device",
            RevocationScope::Child => "child",
        }
    }
}

/// A revocation to carry out at the CN; `cn_confirmed_at` stays `None` until the CN confirms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revocation {
    /// Row ID.
    pub id: i64,
    /// The revoked device.
    pub device_id: DeviceId,
    /// `Device` scope: the child the device held when revoked (informational: every child of
    /// the device is revoked). `Child` scope: the child to revoke.
    pub supi: Option<Supi>,
    /// What is revoked at the CN.
    pub scope: RevocationScope,
    /// When it was revoked locally.
    pub revoked_at: UnixTime,
    /// When the CN confirmed it.
    pub cn_confirmed_at: Option<UnixTime>,
}

fn revocation_from_row(row: &Row<'_>) -> rusqlite::Result<Revocation> {
    let supi: Option<String> = row.get(2)?;
    let scope: String = row.get(5)?;
    Ok(Revocation {
        scope: match scope.as_str() {
            "child" => RevocationScope::Child,
            _ => RevocationScope::Device,
        },
        id: row.get(0)?,
        device_id: device_at(row, 1)?,
        supi: supi
            .map(|s| Supi::new(&s).map_err(|e| corrupt(2, e.to_string())))
            .transpose()?,
        revoked_at: row.get(3)?,
        cn_confirmed_at: row.get(4)?,
    })
}

impl State {
    /// Unpairs `device` and forgets everything about it (credential, pending deliveries,
    /// outstanding request) in one transaction, recording a revocation for the CN to confirm.
    /// `None` if the device was not paired (nothing changes).
    pub fn revoke_device(
        &self,
        device: &DeviceId,
        at: UnixTime,
    ) -> Result<Option<Revocation>, StateError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let removed = tx.execute_cached(
            "DELETE FROM pairings WHERE device_id = ?1",
            [device.as_str()],
        )?;
        if removed == 0 {
            return Ok(None);
        }
        let supi: Option<String> = tx
            .query_row_cached(
                "SELECT supi FROM credentials WHERE device_id = ?1",
                [device.as_str()],
                |r| r.get(0),
            )
            .optional()?;
        for table in ["credentials", "deliveries", "requests"] {
            tx.execute_cached(
                &format!("DELETE FROM {table} WHERE device_id = ?1"),
                [device.as_str()],
            )?;
        }
        tx.execute_cached(
            "INSERT INTO revocations (device_id, supi, revoked_at, cn_confirmed_at)
             VALUES (?1, ?2, ?3, NULL)",
            params![device.as_str(), supi, at],
        )?;
        let id = tx.last_insert_rowid();
        tx.commit()?;
        Ok(Some(Revocation {
            id,
            device_id: device.clone(),
            supi: supi
                .map(|s| Supi::new(&s).map_err(|e| StateError::Corrupt(e.to_string())))
                .transpose()?,
            scope: RevocationScope::Device,
            revoked_at: at,
            cn_confirmed_at: None,
        }))
    }

    /// Records that child `supi` of `device` must be revoked at the CN, and forgets it here: its
    /// pending deliveries, and the held credential if it is that one. One transaction.
    pub fn revoke_child(
        &self,
        device: &DeviceId,
        supi: &Supi,
        at: UnixTime,
    ) -> Result<Revocation, StateError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        tx.execute_cached(
            "DELETE FROM deliveries WHERE device_id = ?1 AND supi = ?2",
            params![device.as_str(), supi.as_str()],
        )?;
        tx.execute_cached(
            "DELETE FROM credentials WHERE device_id = ?1 AND supi = ?2",
            params![device.as_str(), supi.as_str()],
        )?;
        tx.execute_cached(
            "INSERT INTO revocations (device_id, supi, revoked_at, cn_confirmed_at, scope)
             VALUES (?1, ?2, ?3, NULL, 'child')",
            params![device.as_str(), supi.as_str(), at],
        )?;
        let id = tx.last_insert_rowid();
        tx.commit()?;
        Ok(Revocation {
            id,
            device_id: device.clone(),
            supi: Some(supi.clone()),
            scope: RevocationScope::Child,
            revoked_at: at,
            cn_confirmed_at: None,
        })
    }

    /// Whether a revocation of the whole `device` still waits for the CN's confirmation (the
    /// device ID must not be provisioned again until it has: the CN revokes by device ID).
    pub fn device_revocation_pending(&self, device: &DeviceId) -> Result<bool, StateError> {
        let n: i64 = self.reader().query_row_cached(
            "SELECT count(*) FROM revocations
             WHERE device_id = ?1 AND scope = 'device' AND cn_confirmed_at IS NULL",
            [device.as_str()],
            |r| r.get(0),
        )?;
        Ok(n > 0)
    }

    /// Revocations the CN has not confirmed yet (retry them after a reconnect), oldest first.
    pub fn unconfirmed_revocations(&self) -> Result<Vec<Revocation>, StateError> {
        let conn = self.reader();
        let mut stmt = conn.prepare_cached(
            "SELECT id, device_id, supi, revoked_at, cn_confirmed_at, scope FROM revocations
             WHERE cn_confirmed_at IS NULL ORDER BY id",
        )?;
        let rows = stmt.query_map([], revocation_from_row)?;
        rows.collect::<Result<_, _>>().map_err(unwrap_err)
    }

    /// The CN confirmed revocation `id`; `false` if unknown.
    pub fn confirm_revocation(&self, id: i64, at: UnixTime) -> Result<bool, StateError> {
        let n = self.conn().execute_cached(
            "UPDATE revocations SET cn_confirmed_at = ?2 WHERE id = ?1",
            params![id, at],
        )?;
        Ok(n > 0)
    }
}
