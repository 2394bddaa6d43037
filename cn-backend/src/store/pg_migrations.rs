//! Versioned schema migrations for the PostgreSQL engine.
//!
//! They mirror [`super::migrations`] step for step (version `n` here has the tables and
//! columns of SQLite's version `n`), so one version number describes the schema on both
//! engines. `schema_version` holds the number of migrations applied. All pending steps run in
//! one transaction under a transaction-scoped advisory lock, so two processes starting at once
//! cannot both apply a step; a database newer than this program is refused.

use postgres::Client;

use super::postgres::pg_err;
use super::{StoreError, check_schema_version};

/// Advisory lock key held while migrating (any constant unique to this program).
const MIGRATION_LOCK: i64 = 0x636e_2d62_6b65_6e64; // "cn-bkend"

/// The migrations, in order; `MIGRATIONS[i]` brings the schema from version `i` to `i + 1`.
pub const MIGRATIONS: &[&str] = &[
    // v1: the initial schema.
    r#"
CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value BYTEA NOT NULL
);

CREATE TABLE parents (
    supi             TEXT PRIMARY KEY,
    k_enc            BYTEA NOT NULL,
    opc_enc          BYTEA NOT NULL,
    amf              BYTEA NOT NULL CHECK (length(amf) = 2),
    sqn              BIGINT NOT NULL CHECK (sqn BETWEEN 0 AND 281474976710655),
    status           TEXT NOT NULL CHECK (status IN ('active', 'suspended', 'revoked')),
    max_children     BIGINT NOT NULL CHECK (max_children >= 0),
    max_lifetime_s   BIGINT NOT NULL CHECK (max_lifetime_s > 0),
    roaming_allowed  BOOLEAN NOT NULL,
    allowed_dnns     TEXT NOT NULL,
    max_bitrate_kbps BIGINT CHECK (max_bitrate_kbps > 0),
    created_at       BIGINT NOT NULL,
    updated_at       BIGINT NOT NULL
);

CREATE TABLE children (
    supi             TEXT PRIMARY KEY,
    parent_supi      TEXT NOT NULL REFERENCES parents (supi),
    device_id        TEXT NOT NULL,
    device_key_fp    BYTEA NOT NULL CHECK (length(device_key_fp) = 32),
    request_id       BYTEA NOT NULL CHECK (length(request_id) = 16),
    k_enc            BYTEA NOT NULL,
    opc_enc          BYTEA NOT NULL,
    amf              BYTEA NOT NULL CHECK (length(amf) = 2),
    sqn              BIGINT NOT NULL CHECK (sqn BETWEEN 0 AND 281474976710655),
    issued_at        BIGINT NOT NULL,
    expires_at       BIGINT NOT NULL,
    renewed_at       BIGINT,
    roaming_allowed  BOOLEAN NOT NULL,
    allowed_dnns     TEXT NOT NULL,
    max_bitrate_kbps BIGINT CHECK (max_bitrate_kbps > 0),
    status           TEXT NOT NULL CHECK (status IN ('active', 'revoked')),
    revoked_at       BIGINT
);
CREATE INDEX children_by_parent ON children (parent_supi, status, expires_at);

CREATE TABLE issuances (
    parent_supi TEXT NOT NULL REFERENCES parents (supi),
    device_id   TEXT NOT NULL,
    request_id  BYTEA NOT NULL CHECK (length(request_id) = 16),
    child_supi  TEXT NOT NULL REFERENCES children (supi),
    kind        TEXT NOT NULL CHECK (kind IN ('provision', 'renew')),
    sealed      BYTEA NOT NULL,
    created_at  BIGINT NOT NULL,
    PRIMARY KEY (parent_supi, device_id, request_id)
);
CREATE INDEX issuances_by_child ON issuances (child_supi);

CREATE TABLE aka_failures (
    supi     TEXT PRIMARY KEY,
    count    BIGINT NOT NULL,
    first_at BIGINT NOT NULL,
    last_at  BIGINT NOT NULL
);

CREATE TABLE audit (
    id          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at          BIGINT NOT NULL,
    actor       TEXT NOT NULL,
    action      TEXT NOT NULL CHECK (action IN
                  ('add', 'import', 'policy', 'issue', 'renew', 'revoke', 'suspend', 'resume')),
    supi        TEXT NOT NULL,
    parent_supi TEXT,
    device_id   TEXT,
    request_id  BYTEA,
    detail      TEXT NOT NULL DEFAULT ''
);
CREATE INDEX audit_by_supi ON audit (supi);
CREATE INDEX audit_by_parent ON audit (parent_supi);
CREATE FUNCTION audit_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit trail is append-only';
END;
$$;
CREATE TRIGGER audit_no_update BEFORE UPDATE OR DELETE ON audit
    FOR EACH ROW EXECUTE FUNCTION audit_append_only();
CREATE TRIGGER audit_no_truncate BEFORE TRUNCATE ON audit
    FOR EACH STATEMENT EXECUTE FUNCTION audit_append_only();
"#,
    // 2: per-parent allocation rate.
    r#"
CREATE INDEX children_by_parent_issued ON children (parent_supi, issued_at);
"#,
    // 3: key binding (PROTOCOL.md §4.4).
    r#"
ALTER TABLE children ADD COLUMN device_spki BYTEA;
"#,
    // 4: manufacturer attestation (PROTOCOL.md §4.5).
    r#"
ALTER TABLE parents ADD COLUMN require_attestation BOOLEAN NOT NULL DEFAULT false;
CREATE TABLE manufacturer_roots (
    name        TEXT PRIMARY KEY,
    cert        BYTEA NOT NULL,
    fingerprint BYTEA NOT NULL UNIQUE CHECK (length(fingerprint) = 32),
    subject     TEXT NOT NULL,
    added_at    BIGINT NOT NULL
);
"#,
    // 5: the quota check in O(1) per parent; the same invariant as SQLite's version 5:
    // `parents.live_children` = the parent's children that are active and `quota_counted` (I1),
    // kept by triggers in the writing transaction (statement-level for inserts, so a multi-row
    // insert updates the parent once). The counter's row is the parent row, which every batch
    // has locked first (`SELECT … FOR UPDATE`), so racing instances are serialised on it.
    r#"
ALTER TABLE children ADD COLUMN quota_counted BOOLEAN NOT NULL DEFAULT true;
ALTER TABLE parents ADD COLUMN live_children BIGINT NOT NULL DEFAULT 0
    CHECK (live_children >= 0);
UPDATE parents SET live_children =
    (SELECT count(*) FROM children c WHERE c.parent_supi = parents.supi AND c.status = 'active');
CREATE INDEX children_counted_expiry ON children (parent_supi, expires_at)
    WHERE status = 'active' AND quota_counted;
CREATE INDEX children_uncounted_expiry ON children (parent_supi, expires_at)
    WHERE status = 'active' AND NOT quota_counted;
CREATE FUNCTION children_live_insert() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE parents p SET live_children = p.live_children + n.added
    FROM (SELECT parent_supi, count(*) AS added FROM new_children
          WHERE status = 'active' AND quota_counted GROUP BY parent_supi) n
    WHERE p.supi = n.parent_supi;
    RETURN NULL;
END;
$$;
CREATE TRIGGER children_live_insert AFTER INSERT ON children
    REFERENCING NEW TABLE AS new_children
    FOR EACH STATEMENT EXECUTE FUNCTION children_live_insert();
CREATE FUNCTION children_live_change() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    was BOOLEAN := false;
    is_now BOOLEAN := false;
BEGIN
    IF TG_OP <> 'INSERT' THEN
        was := OLD.status = 'active' AND OLD.quota_counted;
    END IF;
    IF TG_OP <> 'DELETE' THEN
        is_now := NEW.status = 'active' AND NEW.quota_counted;
    END IF;
    IF TG_OP = 'UPDATE' AND was = is_now AND OLD.parent_supi = NEW.parent_supi THEN
        RETURN NULL;
    END IF;
    IF was THEN
        UPDATE parents SET live_children = live_children - 1 WHERE supi = OLD.parent_supi;
    END IF;
    IF is_now THEN
        UPDATE parents SET live_children = live_children + 1 WHERE supi = NEW.parent_supi;
    END IF;
    RETURN NULL;
END;
$$;
CREATE TRIGGER children_live_change
    AFTER UPDATE OF status, quota_counted, parent_supi OR DELETE ON children
    FOR EACH ROW EXECUTE FUNCTION children_live_change();
"#,
    // 6: Open5GS subscriber sync: the transactional outbox and the last pushed state per
    // credential (see SQLite's version 6).
    r#"
CREATE TABLE sync_outbox (
    id         BIGSERIAL PRIMARY KEY,
    supi       TEXT NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE INDEX sync_outbox_by_supi ON sync_outbox (supi, id);
CREATE TABLE sync_state (
    supi      TEXT PRIMARY KEY,
    present   BOOLEAN NOT NULL,
    pushed_at BIGINT NOT NULL
);
CREATE TABLE sync_lease (
    id     INTEGER PRIMARY KEY CHECK (id = 1),
    holder TEXT NOT NULL,
    until  BIGINT NOT NULL
);
"#,
];

/// The schema version this program writes.
pub fn latest_version() -> u32 {
    MIGRATIONS.len() as u32
}

fn read_version(tx: &mut postgres::Transaction<'_>) -> Result<u32, StoreError> {
    tx.batch_execute("CREATE TABLE IF NOT EXISTS schema_version (version BIGINT NOT NULL)")
        .map_err(pg_err)?;
    let v: Option<i64> = tx
        .query_opt("SELECT max(version) FROM schema_version", &[])
        .map_err(pg_err)?
        .and_then(|r| r.get(0));
    stored_version(v)
}

/// The version in `schema_version` (none: 0).
fn stored_version(v: Option<i64>) -> Result<u32, StoreError> {
    u32::try_from(v.unwrap_or(0))
        .map_err(|_| StoreError::Schema(format!("invalid schema version {v:?}")))
}

/// The schema version of the database `client` is connected to.
pub fn current_version(client: &mut Client) -> Result<u32, StoreError> {
    let v: Option<i64> = client
        .query_opt(
            "SELECT CASE WHEN to_regclass('schema_version') IS NULL THEN 0 \
             ELSE (SELECT coalesce(max(version), 0) FROM schema_version) END",
            &[],
        )
        .map_err(pg_err)?
        .and_then(|r| r.get(0));
    stored_version(v)
}

/// Applies every pending migration; returns the resulting version.
pub fn migrate(client: &mut Client) -> Result<u32, StoreError> {
    let mut tx = client.transaction().map_err(pg_err)?;
    // Held until commit or rollback: a second process waits here, then sees the new version.
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .map_err(pg_err)?;
    let mut version = read_version(&mut tx)?;
    let latest = latest_version();
    check_schema_version(version, latest)?;
    while let Some(sql) = MIGRATIONS.get(version as usize) {
        tx.batch_execute(sql).map_err(pg_err)?;
        version += 1;
        tx.execute("DELETE FROM schema_version", &[])
            .map_err(pg_err)?;
        tx.execute(
            "INSERT INTO schema_version (version) VALUES ($1)",
            &[&i64::from(version)],
        )
        .map_err(pg_err)?;
    }
    tx.commit().map_err(pg_err)?;
    Ok(version)
}
