//! Pairings: which device ID is bound to which TLS key, how it was paired, its label and the
//! manufacturer attestation it last presented.

use crate::state::CachedSql;
use companion_proto::DeviceId;
use rusqlite::{OptionalExtension, Row, params};

use super::rows::{corrupt, device_at, is_unique_violation, unwrap_err};
use super::{State, StateError, UnixTime};

/// How a device came to be paired.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PairedVia {
    /// The owner entered the device's pairing code.
    Code,
    /// The device connected during an open pairing window.
    Window,
}

impl PairedVia {
    /// The value stored and reported.
    pub fn as_str(self) -> &'static str {
        match self {
            PairedVia::Code => "code",
            PairedVia::Window => "window",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s {
            "code" => Some(PairedVia::Code),
            "window" => Some(PairedVia::Window),
            _ => None,
        }
    }
}

/// A paired device: its ID bound to its TLS key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pairing {
    /// The device's ID.
    pub device_id: DeviceId,
    /// DER SubjectPublicKeyInfo of the device's TLS key.
    pub spki_der: Vec<u8>,
    /// SHA-256 of `spki_der`.
    pub fingerprint: [u8; 32],
    /// The owner's name for the device.
    pub label: Option<String>,
    /// When it was paired.
    pub paired_at: UnixTime,
    /// How it was paired.
    pub paired_via: PairedVia,
}

fn pairing_from_row(row: &Row<'_>) -> rusqlite::Result<Pairing> {
    let fp: Vec<u8> = row.get(2)?;
    let via: String = row.get(5)?;
    Ok(Pairing {
        device_id: device_at(row, 0)?,
        spki_der: row.get(1)?,
        fingerprint: <[u8; 32]>::try_from(fp)
            .map_err(|_| corrupt(2, "fingerprint is not 32 bytes"))?,
        label: row.get(3)?,
        paired_at: row.get(4)?,
        paired_via: PairedVia::parse(&via).ok_or_else(|| corrupt(5, "unknown paired_via"))?,
    })
}

impl State {
    /// Records a new pairing. [`StateError::Conflict`] if the device ID or the key is already
    /// paired.
    pub fn insert_pairing(&self, p: &Pairing) -> Result<(), StateError> {
        let r = self.conn().execute_cached(
            "INSERT INTO pairings (device_id, spki, fingerprint, label, paired_at, paired_via)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![
                p.device_id.as_str(),
                p.spki_der,
                p.fingerprint.as_slice(),
                p.label,
                p.paired_at,
                p.paired_via.as_str()
            ],
        );
        match r {
            Ok(_) => Ok(()),
            Err(e) if is_unique_violation(&e) => Err(StateError::Conflict(format!(
                "device {} or its key is already paired",
                p.device_id
            ))),
            Err(e) => Err(e.into()),
        }
    }

    /// Changes a pairing's label; `false` if the device is not paired.
    pub fn set_label(&self, device: &DeviceId, label: Option<&str>) -> Result<bool, StateError> {
        let n = self.conn().execute_cached(
            "UPDATE pairings SET label = ?2 WHERE device_id = ?1",
            params![device.as_str(), label],
        )?;
        Ok(n > 0)
    }

    /// The pairing of `device`, if it is paired.
    pub fn pairing(&self, device: &DeviceId) -> Result<Option<Pairing>, StateError> {
        self.reader()
            .query_row_cached(
                "SELECT device_id, spki, fingerprint, label, paired_at, paired_via
                 FROM pairings WHERE device_id = ?1",
                [device.as_str()],
                pairing_from_row,
            )
            .optional()
            .map_err(unwrap_err)
    }

    /// Records the manufacturer chain (CBOR) the paired `device` presents, or clears it.
    pub fn set_attestation(
        &self,
        device: &DeviceId,
        chain: Option<&[u8]>,
    ) -> Result<bool, StateError> {
        let n = self.conn().execute_cached(
            "UPDATE pairings SET attestation = ?2 WHERE device_id = ?1",
            params![device.as_str(), chain],
        )?;
        Ok(n > 0)
    }

    /// Every recorded manufacturer chain (CBOR), by device.
    pub fn attestations(&self) -> Result<Vec<(DeviceId, Vec<u8>)>, StateError> {
        let conn = self.reader();
        let mut stmt = conn.prepare_cached(
            "SELECT device_id, attestation FROM pairings WHERE attestation IS NOT NULL",
        )?;
        let rows = stmt.query_map([], |r| Ok((device_at(r, 0)?, r.get(1)?)))?;
        rows.collect::<Result<_, _>>().map_err(unwrap_err)
    }

    /// Every pairing, by device ID.
    pub fn pairings(&self) -> Result<Vec<Pairing>, StateError> {
        let conn = self.reader();
        let mut stmt = conn.prepare_cached(
            "SELECT device_id, spki, fingerprint, label, paired_at, paired_via
             FROM pairings ORDER BY device_id",
        )?;
        let rows = stmt.query_map([], pairing_from_row)?;
        rows.collect::<Result<_, _>>().map_err(unwrap_err)
    }
}
