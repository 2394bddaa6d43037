//! The schema: the append-only list of migrations and the loop that applies them.

use crate::state::CachedSql;
use rusqlite::{Connection, TransactionBehavior};

use super::StateError;

/// The migrations, in order; `MIGRATIONS[i]` brings the schema from version `i` to `i + 1`.
/// Append only; never edit a released one.
pub const MIGRATIONS: &[&str] = &[
    // v1
    r#"
CREATE TABLE pairings (
    device_id   TEXT PRIMARY KEY,
    spki        BLOB NOT NULL,
    fingerprint BLOB NOT NULL UNIQUE CHECK (length(fingerprint) = 32),
    label       TEXT,
    paired_at   INTEGER NOT NULL,
    paired_via  TEXT NOT NULL CHECK (paired_via IN ('code', 'window'))
) STRICT;

CREATE TABLE credentials (
    device_id       TEXT PRIMARY KEY,
    supi            TEXT NOT NULL,
    expires_at      INTEGER NOT NULL,
    request_id      BLOB NOT NULL CHECK (length(request_id) = 16),
    acknowledged_at INTEGER
) STRICT;
CREATE INDEX credentials_by_expiry ON credentials (expires_at);

CREATE TABLE deliveries (
    request_id BLOB PRIMARY KEY CHECK (length(request_id) = 16),
    device_id  TEXT NOT NULL,
    supi       TEXT NOT NULL,
    expires_at INTEGER NOT NULL,
    sealed     BLOB NOT NULL,
    created_at INTEGER NOT NULL
) STRICT;
CREATE INDEX deliveries_by_device ON deliveries (device_id);

CREATE TABLE requests (
    request_id BLOB PRIMARY KEY CHECK (length(request_id) = 16),
    device_id  TEXT NOT NULL UNIQUE,
    kind       TEXT NOT NULL CHECK (kind IN ('provision', 'renew')),
    hpke_pk    BLOB NOT NULL,
    created_at INTEGER NOT NULL
) STRICT;

CREATE TABLE revocations (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    device_id       TEXT NOT NULL,
    supi            TEXT,
    revoked_at      INTEGER NOT NULL,
    cn_confirmed_at INTEGER
) STRICT;

CREATE TABLE blocks (
    addr       TEXT PRIMARY KEY,
    until      INTEGER,
    created_at INTEGER NOT NULL
) STRICT;
"#,
    // v2: what a request needs to be resent after a restart (params, the SUPI renewed), and the
    // HPKE key of the request that issued a credential (the device's renewal key: pre-fetched
    // renewals are sealed to it).
    r#"
ALTER TABLE requests ADD COLUMN params TEXT;
ALTER TABLE requests ADD COLUMN renew_supi TEXT;
ALTER TABLE credentials ADD COLUMN hpke_pk BLOB;
"#,
    // v3: key binding (PROTOCOL.md §4.4). A request keeps the device's signature over it and its
    // authorisation for the renewal of what it produces; a credential keeps that authorisation,
    // which the pre-fetched renewal is sent with.
    r#"
ALTER TABLE requests ADD COLUMN binding BLOB;
ALTER TABLE requests ADD COLUMN renewal_binding BLOB;
ALTER TABLE credentials ADD COLUMN renewal_binding BLOB;
ALTER TABLE deliveries ADD COLUMN kind TEXT;
ALTER TABLE revocations ADD COLUMN scope TEXT NOT NULL DEFAULT 'device'
    CHECK (scope IN ('device', 'child'));
"#,
    // v4: manufacturer attestation (PROTOCOL.md §4.5). The certificate chain the paired device
    // last presented (CBOR, as in BatchItem key 9), forwarded with each of its batch items,
    // including renewals the gateway pre-fetches while the device is away.
    r#"
ALTER TABLE pairings ADD COLUMN attestation BLOB;
"#,
];

/// Applies every migration the database lacks, each in its own immediate transaction; returns
/// the resulting version. [`StateError::TooNew`] for a database newer than this program.
pub(super) fn migrate(conn: &mut Connection) -> Result<u32, StateError> {
    let supported = MIGRATIONS.len() as u32;
    loop {
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let version: u32 = tx.query_row_cached("PRAGMA user_version", [], |r| r.get(0))?;
        if version > supported {
            return Err(StateError::TooNew {
                found: version,
                supported,
            });
        }
        let Some(sql) = MIGRATIONS.get(version as usize) else {
            return Ok(version);
        };
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", version + 1)?;
        tx.commit()?;
    }
}
