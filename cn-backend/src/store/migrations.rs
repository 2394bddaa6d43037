//! Versioned schema migrations for the SQLite engine.
//!
//! `PRAGMA user_version` holds the number of migrations applied. Each migration runs in its own
//! `BEGIN IMMEDIATE` transaction together with the version bump, so a crash leaves the schema at
//! a whole version. A database with a newer version than this program knows is refused. Append
//! new migrations at the end; never edit a released one.
//!
//! v1's `imsi_allocator` is no longer read or written: child SUPIs are drawn at random and a
//! SUPI is taken by its child row (`SqliteStore::allocate_supi`). The table stays, so an older
//! binary run on this database still works (it skips SUPIs already taken).

use rusqlite::{Connection, TransactionBehavior};

use super::sqlite::db_err;
use super::{StoreError, check_schema_version};

/// The migrations, in order; `MIGRATIONS[i]` brings the schema from version `i` to `i + 1`.
pub const MIGRATIONS: &[&str] = &[
    // v1: the initial schema.
    r#"
CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value BLOB NOT NULL
) STRICT;

CREATE TABLE parents (
    supi             TEXT PRIMARY KEY,
    k_enc            BLOB NOT NULL,
    opc_enc          BLOB NOT NULL,
    amf              BLOB NOT NULL CHECK (length(amf) = 2),
    sqn              INTEGER NOT NULL CHECK (sqn BETWEEN 0 AND 281474976710655),
    status           TEXT NOT NULL CHECK (status IN ('active', 'suspended', 'revoked')),
    max_children     INTEGER NOT NULL CHECK (max_children >= 0),
    max_lifetime_s   INTEGER NOT NULL CHECK (max_lifetime_s > 0),
    roaming_allowed  INTEGER NOT NULL CHECK (roaming_allowed IN (0, 1)),
    allowed_dnns     TEXT NOT NULL,            -- comma-separated, '' = any
    max_bitrate_kbps INTEGER CHECK (max_bitrate_kbps > 0),
    created_at       INTEGER NOT NULL,
    updated_at       INTEGER NOT NULL
) STRICT;

CREATE TABLE children (
    supi             TEXT PRIMARY KEY,
    parent_supi      TEXT NOT NULL REFERENCES parents (supi),
    device_id        TEXT NOT NULL,
    device_key_fp    BLOB NOT NULL CHECK (length(device_key_fp) = 32),
    request_id       BLOB NOT NULL CHECK (length(request_id) = 16),
    k_enc            BLOB NOT NULL,
    opc_enc          BLOB NOT NULL,
    amf              BLOB NOT NULL CHECK (length(amf) = 2),
    sqn              INTEGER NOT NULL CHECK (sqn BETWEEN 0 AND 281474976710655),
    issued_at        INTEGER NOT NULL,
    expires_at       INTEGER NOT NULL,
    renewed_at       INTEGER,
    roaming_allowed  INTEGER NOT NULL CHECK (roaming_allowed IN (0, 1)),
    allowed_dnns     TEXT NOT NULL,
    max_bitrate_kbps INTEGER CHECK (max_bitrate_kbps > 0),
    status           TEXT NOT NULL CHECK (status IN ('active', 'revoked')),
    revoked_at       INTEGER
) STRICT;
CREATE INDEX children_by_parent ON children (parent_supi, status, expires_at);

-- The idempotency ledger: the answer to every provision/renew request, replayed on retry.
CREATE TABLE issuances (
    parent_supi TEXT NOT NULL REFERENCES parents (supi),
    device_id   TEXT NOT NULL,
    request_id  BLOB NOT NULL CHECK (length(request_id) = 16),
    child_supi  TEXT NOT NULL REFERENCES children (supi),
    kind        TEXT NOT NULL CHECK (kind IN ('provision', 'renew')),
    sealed      BLOB NOT NULL,
    created_at  INTEGER NOT NULL,
    PRIMARY KEY (parent_supi, device_id, request_id)
) STRICT;
CREATE INDEX issuances_by_child ON issuances (child_supi);

-- Next MSIN to try per PLMN; advanced in the same transaction as the child insert.
CREATE TABLE imsi_allocator (
    plmn      TEXT PRIMARY KEY,
    next_msin INTEGER NOT NULL CHECK (next_msin >= 0)
) STRICT;

CREATE TABLE aka_failures (
    supi     TEXT PRIMARY KEY,
    count    INTEGER NOT NULL,
    first_at INTEGER NOT NULL,
    last_at  INTEGER NOT NULL
) STRICT;

CREATE TABLE audit (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    at          INTEGER NOT NULL,
    actor       TEXT NOT NULL,
    action      TEXT NOT NULL CHECK (action IN
                  ('add', 'import', 'policy', 'issue', 'renew', 'revoke', 'suspend', 'resume')),
    supi        TEXT NOT NULL,
    parent_supi TEXT,
    device_id   TEXT,
    request_id  BLOB,
    detail      TEXT NOT NULL DEFAULT ''
) STRICT;
CREATE INDEX audit_by_supi ON audit (supi);
CREATE INDEX audit_by_parent ON audit (parent_supi);
CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit
BEGIN
    SELECT RAISE(ABORT, 'audit trail is append-only');
END;
CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit
BEGIN
    SELECT RAISE(ABORT, 'audit trail is append-only');
END;
"#,
    // 2: per-parent allocation rate (ops::issue_batch counts a parent's children issued within
    // the operator's window before it allocates another SUPI).
    r#"
CREATE INDEX children_by_parent_issued ON children (parent_supi, issued_at);
"#,
    // 3: key binding (PROTOCOL.md §4.4): the device key (SPKI DER) that signed the provisioning
    // request; renewals must be signed by it. NULL for children issued before.
    r#"
ALTER TABLE children ADD COLUMN device_spki BLOB;
"#,
    // 4: manufacturer attestation (PROTOCOL.md §4.5): a parent policy that requires it, and the
    // manufacturer roots the operator trusts (`cn-backend attestation add-root`).
    r#"
ALTER TABLE parents ADD COLUMN require_attestation INTEGER NOT NULL DEFAULT 0
    CHECK (require_attestation IN (0, 1));
CREATE TABLE manufacturer_roots (
    name        TEXT PRIMARY KEY,
    cert        BLOB NOT NULL,
    fingerprint BLOB NOT NULL UNIQUE CHECK (length(fingerprint) = 32),
    subject     TEXT NOT NULL,
    added_at    INTEGER NOT NULL
) STRICT;
"#,
    // 5: the quota check in O(1) per parent (see `SqliteStore`'s `count_active_children`).
    // `parents.live_children` counts the parent's children that are active and
    // `quota_counted`, kept by the triggers below on every insert, update of status,
    // quota_counted or parent, and delete (invariant I1). A batch first flips `quota_counted`
    // to `expires_at > now` on the few active children where they differ (the partial indexes
    // find exactly those), so afterwards the counter is the number of live children (I2).
    // Backfill: every existing child counted, the counter = its active children (I1 holds).
    r#"
ALTER TABLE children ADD COLUMN quota_counted INTEGER NOT NULL DEFAULT 1
    CHECK (quota_counted IN (0, 1));
ALTER TABLE parents ADD COLUMN live_children INTEGER NOT NULL DEFAULT 0
    CHECK (live_children >= 0);
UPDATE parents SET live_children =
    (SELECT count(*) FROM children c WHERE c.parent_supi = parents.supi AND c.status = 'active');
CREATE INDEX children_counted_expiry ON children (parent_supi, expires_at)
    WHERE status = 'active' AND quota_counted = 1;
CREATE INDEX children_uncounted_expiry ON children (parent_supi, expires_at)
    WHERE status = 'active' AND quota_counted = 0;
CREATE TRIGGER children_live_insert AFTER INSERT ON children
    WHEN NEW.status = 'active' AND NEW.quota_counted = 1
BEGIN
    UPDATE parents SET live_children = live_children + 1 WHERE supi = NEW.parent_supi;
END;
CREATE TRIGGER children_live_update AFTER UPDATE OF status, quota_counted, parent_supi ON children
    WHEN (OLD.status = 'active' AND OLD.quota_counted = 1)
         IS NOT (NEW.status = 'active' AND NEW.quota_counted = 1)
      OR OLD.parent_supi IS NOT NEW.parent_supi
BEGIN
    UPDATE parents SET live_children = live_children - 1
        WHERE supi = OLD.parent_supi AND OLD.status = 'active' AND OLD.quota_counted = 1;
    UPDATE parents SET live_children = live_children + 1
        WHERE supi = NEW.parent_supi AND NEW.status = 'active' AND NEW.quota_counted = 1;
END;
CREATE TRIGGER children_live_delete AFTER DELETE ON children
    WHEN OLD.status = 'active' AND OLD.quota_counted = 1
BEGIN
    UPDATE parents SET live_children = live_children - 1 WHERE supi = OLD.parent_supi;
END;
"#,
    // 6: Open5GS subscriber sync (docs/OPERATIONS.md, "With Open5GS"): the transactional outbox
    // (a row per child lifecycle change, written in the transaction that makes the change and
    // deleted once the core's store acknowledged the push) and what the core's store was last
    // told per credential (present = a document was upserted, 0 = it was deleted).
    r#"
CREATE TABLE sync_outbox (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    supi       TEXT NOT NULL,
    created_at INTEGER NOT NULL
) STRICT;
CREATE INDEX sync_outbox_by_supi ON sync_outbox (supi, id);
CREATE TABLE sync_state (
    supi      TEXT PRIMARY KEY,
    present   INTEGER NOT NULL CHECK (present IN (0, 1)),
    pushed_at INTEGER NOT NULL
) STRICT;
CREATE TABLE sync_lease (
    id     INTEGER PRIMARY KEY CHECK (id = 1),
    holder TEXT NOT NULL,
    until  INTEGER NOT NULL
) STRICT;
"#,
];

/// The schema version this program writes.
pub fn latest_version() -> u32 {
    MIGRATIONS.len() as u32
}

/// The schema version of `conn`.
pub fn current_version(conn: &Connection) -> Result<u32, StoreError> {
    conn.query_row("PRAGMA user_version", [], |r| r.get::<_, u32>(0))
        .map_err(db_err)
}

/// Applies every pending migration; returns the resulting version.
pub fn migrate(conn: &mut Connection) -> Result<u32, StoreError> {
    loop {
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(db_err)?;
        // Read inside the write lock so two processes cannot both apply the same step.
        let version = current_version(&tx)?;
        let latest = latest_version();
        check_schema_version(version, latest)?;
        let Some(sql) = MIGRATIONS.get(version as usize) else {
            return Ok(version);
        };
        tx.execute_batch(sql).map_err(db_err)?;
        tx.pragma_update(None, "user_version", version + 1)
            .map_err(db_err)?;
        tx.commit().map_err(db_err)?;
    }
}
