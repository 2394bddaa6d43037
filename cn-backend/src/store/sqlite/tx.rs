//! The SQLite write transaction ([`SqliteTx`]): runs inside `BEGIN IMMEDIATE`, which holds the
//! database's single write lock, and implements every [`WriteTx`] primitive in this engine's SQL.

use std::ops::ControlFlow;

use rusqlite::{Connection, OptionalExtension, params};

use crate::kek::Kek;
use crate::model::{
    ChildCredential, ChildStatus, DeviceId, ImsiRange, NewParent, Parent, ParentPolicy,
    SubscriberKeys, SubscriptionStatus, Supi, Timestamp,
};
use crate::policy::IdempotencyKey;
use crate::store::engine::{self, CHILDREN, EncKeys, EngineTx, PARENTS, seal_keys};
use crate::store::rows::{self, CHILD_COLS, Columns, join_dnns, sql_sqn, sql_u64};
use crate::store::{AkaFailures, AkaMaterial, AuditEvent, Issuance, NewChild, StoreError, WriteTx};
use companion_crypto::aka::Sqn;

use super::db::{
    db_err, q_child, q_issuance, q_parent, q_supi_taken, row_opt, rows_all, unique_or,
};

/// A write transaction on the SQLite engine.
pub(super) struct SqliteTx<'a> {
    pub(super) conn: &'a Connection,
    pub(super) kek: &'a Kek,
    /// The sync outbox is on ([`Store::set_sync_outbox`](crate::store::Store::set_sync_outbox)).
    pub(super) sync_outbox: bool,
}

impl EngineTx for SqliteTx<'_> {
    fn kek(&self) -> &Kek {
        self.kek
    }

    // BEGIN IMMEDIATE already holds the database's single write lock: no row locks.
    fn parent_row(&mut self, supi: &Supi, _lock: bool) -> Result<Option<Parent>, StoreError> {
        q_parent(self.conn, supi)
    }

    fn child_row(
        &mut self,
        supi: &Supi,
        _lock: bool,
    ) -> Result<Option<ChildCredential>, StoreError> {
        q_child(self.conn, supi)
    }

    fn enc_keys(&mut self, table: &str, supi: &Supi) -> Result<Option<EncKeys>, StoreError> {
        let sql = if table == PARENTS {
            "SELECT k_enc, opc_enc FROM parents WHERE supi = ?1"
        } else {
            "SELECT k_enc, opc_enc FROM children WHERE supi = ?1"
        };
        row_opt(self.conn, sql, [supi.as_str()], |r| {
            Ok((r.blob(0)?, r.blob(1)?))
        })
    }

    fn supi_taken(&mut self, supi: &Supi) -> Result<bool, StoreError> {
        q_supi_taken(self.conn, supi)
    }

    fn walk_taken(
        &mut self,
        lo: &Supi,
        hi: &Supi,
        visit: &mut dyn FnMut(&str) -> ControlFlow<()>,
    ) -> Result<(), StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT supi FROM children WHERE supi BETWEEN ?1 AND ?2 \
                 UNION SELECT supi FROM parents WHERE supi BETWEEN ?1 AND ?2 ORDER BY 1",
            )
            .map_err(db_err)?;
        let mut rows = stmt.query([lo.as_str(), hi.as_str()]).map_err(db_err)?;
        while let Some(row) = rows.next().map_err(db_err)? {
            if visit(&row.text(0)?).is_break() {
                break;
            }
        }
        Ok(())
    }
}

impl WriteTx for SqliteTx<'_> {
    fn lock_parent(&mut self, supi: &Supi) -> Result<Option<Parent>, StoreError> {
        // BEGIN IMMEDIATE already holds the database's single write lock.
        q_parent(self.conn, supi)
    }

    fn insert_parent(&mut self, parent: &NewParent, now: Timestamp) -> Result<(), StoreError> {
        if q_supi_taken(self.conn, &parent.supi)? {
            return Err(StoreError::Duplicate(parent.supi.clone()));
        }
        let (k, opc) = seal_keys(self.kek, PARENTS, &parent.supi, &parent.keys)?;
        let p = &parent.policy;
        let max_lifetime_s = sql_u64(p.max_lifetime_s)?;
        self.conn
            .prepare_cached(
                "INSERT INTO parents (supi, k_enc, opc_enc, amf, sqn, status, max_children, \
                 max_lifetime_s, roaming_allowed, allowed_dnns, max_bitrate_kbps, created_at, \
                 updated_at, require_attestation) \
                 VALUES (?1, ?2, ?3, ?4, ?5, 'active', ?6, ?7, ?8, ?9, ?10, ?11, ?11, ?12)",
            )
            .and_then(|mut s| {
                s.execute(params![
                    parent.supi.as_str(),
                    k,
                    opc,
                    parent.amf.0.as_slice(),
                    sql_sqn(parent.sqn),
                    p.max_children,
                    max_lifetime_s,
                    p.roaming_allowed,
                    join_dnns(&p.allowed_dnns),
                    p.max_bitrate_kbps,
                    now.0,
                    p.require_attestation,
                ])
            })
            .map_err(|e| unique_or(e, || StoreError::Duplicate(parent.supi.clone())))?;
        Ok(())
    }

    fn set_parent_status(
        &mut self,
        supi: &Supi,
        status: SubscriptionStatus,
        now: Timestamp,
    ) -> Result<(), StoreError> {
        let n = self
            .conn
            .execute(
                "UPDATE parents SET status = ?2, updated_at = ?3 WHERE supi = ?1",
                params![supi.as_str(), status.as_str(), now.0],
            )
            .map_err(db_err)?;
        if n == 0 {
            return Err(StoreError::ParentNotFound(supi.clone()));
        }
        Ok(())
    }

    fn set_parent_policy(
        &mut self,
        supi: &Supi,
        policy: &ParentPolicy,
        now: Timestamp,
    ) -> Result<(), StoreError> {
        let n = self
            .conn
            .execute(
                "UPDATE parents SET max_children = ?2, max_lifetime_s = ?3, roaming_allowed = ?4, \
                 allowed_dnns = ?5, max_bitrate_kbps = ?6, updated_at = ?7, \
                 require_attestation = ?8 WHERE supi = ?1",
                params![
                    supi.as_str(),
                    policy.max_children,
                    sql_u64(policy.max_lifetime_s)?,
                    policy.roaming_allowed,
                    join_dnns(&policy.allowed_dnns),
                    policy.max_bitrate_kbps,
                    now.0,
                    policy.require_attestation
                ],
            )
            .map_err(db_err)?;
        if n == 0 {
            return Err(StoreError::ParentNotFound(supi.clone()));
        }
        Ok(())
    }

    /// O(1) per parent (amortised): the parent's counter after the reconciliation below.
    ///
    /// Invariant I1 (schema v5's triggers, whatever writes the row): `parents.live_children`
    /// = #{children of the parent with `status = 'active'` and `quota_counted = 1`}.
    /// The update below sets `quota_counted = (expires_at > now)` on exactly the active
    /// children where the two differ, found through the two partial indexes; afterwards every
    /// active child is counted iff it has not expired at `now`, so by I1 the counter equals
    /// #{active children with `expires_at > now`}, what the scan of `q_count_active` returns
    /// (I2, for any `now`, also one earlier than a previous batch's). Each child flips when time
    /// passes its expiry (once, on monotonic clocks), so the work is amortised O(1) per child.
    /// The write lock of the transaction serialises it with every other writer.
    fn count_active_children(&mut self, parent: &Supi, now: Timestamp) -> Result<u32, StoreError> {
        self.conn
            .prepare_cached(
                "UPDATE children SET quota_counted = 1 - quota_counted WHERE supi IN ( \
                   SELECT supi FROM children INDEXED BY children_counted_expiry \
                    WHERE parent_supi = ?1 AND status = 'active' AND quota_counted = 1 \
                      AND expires_at <= ?2 \
                   UNION ALL \
                   SELECT supi FROM children INDEXED BY children_uncounted_expiry \
                    WHERE parent_supi = ?1 AND status = 'active' AND quota_counted = 0 \
                      AND expires_at > ?2)",
            )
            .and_then(|mut s| s.execute(params![parent.as_str(), now.0]))
            .map_err(db_err)?;
        self.conn
            .prepare_cached("SELECT live_children FROM parents WHERE supi = ?1")
            .and_then(|mut s| s.query_row([parent.as_str()], |r| r.get(0)).optional())
            .map_err(db_err)?
            .ok_or_else(|| StoreError::ParentNotFound(parent.clone()))
    }

    fn issuance(&mut self, key: &IdempotencyKey) -> Result<Option<Issuance>, StoreError> {
        q_issuance(self.conn, key)
    }

    fn insert_issuance(
        &mut self,
        key: &IdempotencyKey,
        issuance: &Issuance,
    ) -> Result<(), StoreError> {
        self.conn
            .prepare_cached(
                "INSERT INTO issuances (parent_supi, device_id, request_id, child_supi, kind, \
                 sealed, created_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )
            .and_then(|mut s| {
                s.execute(params![
                    key.parent.as_str(),
                    key.device_id.as_str(),
                    key.request_id.0.as_slice(),
                    issuance.child_supi.as_str(),
                    issuance.kind.as_str(),
                    issuance.sealed,
                    issuance.created_at.0,
                ])
            })
            .map_err(db_err)?;
        Ok(())
    }

    fn child(&mut self, supi: &Supi) -> Result<Option<ChildCredential>, StoreError> {
        q_child(self.conn, supi)
    }

    fn keys(&mut self, supi: &Supi) -> Result<Option<SubscriberKeys>, StoreError> {
        engine::keys(self, supi)
    }

    fn allocate_supi(&mut self, range: &ImsiRange) -> Result<Supi, StoreError> {
        engine::allocate_by_probing(self, range)
    }

    fn children_issued_since(
        &mut self,
        parent: &Supi,
        since: Timestamp,
    ) -> Result<(u32, Option<Timestamp>), StoreError> {
        self.conn
            .prepare_cached(
                "SELECT count(*), min(issued_at) FROM children \
                 WHERE parent_supi = ?1 AND issued_at >= ?2",
            )
            .and_then(|mut s| {
                s.query_row(params![parent.as_str(), since.0], |r| {
                    Ok((r.get(0)?, r.get::<_, Option<i64>>(1)?.map(Timestamp)))
                })
            })
            .map_err(db_err)
    }

    fn insert_child(&mut self, new: &NewChild) -> Result<(), StoreError> {
        let c = &new.child;
        let (k, opc) = seal_keys(self.kek, CHILDREN, &c.supi, &new.keys)?;
        self.conn
            .prepare_cached(
                "INSERT INTO children (supi, parent_supi, device_id, device_key_fp, request_id, \
                 k_enc, opc_enc, amf, sqn, issued_at, expires_at, renewed_at, roaming_allowed, \
                 allowed_dnns, max_bitrate_kbps, status, revoked_at, device_spki) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, \
                 ?18)",
            )
            .and_then(|mut s| {
                s.execute(params![
                    c.supi.as_str(),
                    c.parent.as_str(),
                    c.device_id.as_str(),
                    c.device_key_fingerprint.0.as_slice(),
                    c.request_id.0.as_slice(),
                    k,
                    opc,
                    c.amf.0.as_slice(),
                    sql_sqn(c.sqn),
                    c.issued_at.0,
                    c.expires_at.0,
                    c.renewed_at.map(|t| t.0),
                    c.restrictions.roaming_allowed,
                    join_dnns(&c.restrictions.allowed_dnns),
                    c.restrictions.max_bitrate_kbps,
                    c.status.as_str(),
                    c.revoked_at.map(|t| t.0),
                    c.device_spki,
                ])
            })
            .map_err(|e| unique_or(e, || StoreError::Duplicate(c.supi.clone())))?;
        Ok(())
    }

    fn renew_child(&mut self, renewed: &ChildCredential) -> Result<(), StoreError> {
        let (supi, restrictions) = (&renewed.supi, &renewed.restrictions);
        let n = self
            .conn
            .execute(
                "UPDATE children SET expires_at = ?2, roaming_allowed = ?3, allowed_dnns = ?4, \
                 max_bitrate_kbps = ?5, renewed_at = ?6 WHERE supi = ?1",
                params![
                    supi.as_str(),
                    renewed.expires_at.0,
                    restrictions.roaming_allowed,
                    join_dnns(&restrictions.allowed_dnns),
                    restrictions.max_bitrate_kbps,
                    renewed.renewed_at.map(|t| t.0)
                ],
            )
            .map_err(db_err)?;
        if n == 0 {
            return Err(StoreError::ChildNotFound(supi.clone()));
        }
        Ok(())
    }

    fn revoke_child(&mut self, supi: &Supi, now: Timestamp) -> Result<bool, StoreError> {
        let n = self
            .conn
            .execute(
                "UPDATE children SET status = 'revoked', revoked_at = ?2 \
                 WHERE supi = ?1 AND status = 'active'",
                params![supi.as_str(), now.0],
            )
            .map_err(db_err)?;
        if n == 0 && q_child(self.conn, supi)?.is_none() {
            return Err(StoreError::ChildNotFound(supi.clone()));
        }
        Ok(n == 1)
    }

    fn revoke_children_of(
        &mut self,
        parent: &Supi,
        now: Timestamp,
    ) -> Result<Vec<ChildCredential>, StoreError> {
        let sql = format!(
            "SELECT {CHILD_COLS} FROM children c \
             WHERE c.parent_supi = ?1 AND c.status = 'active' ORDER BY c.supi"
        );
        let mut revoked = rows_all(self.conn, &sql, [parent.as_str()], rows::child)?;
        self.conn
            .execute(
                "UPDATE children SET status = 'revoked', revoked_at = ?2 \
                 WHERE parent_supi = ?1 AND status = 'active'",
                params![parent.as_str(), now.0],
            )
            .map_err(db_err)?;
        for c in &mut revoked {
            c.status = ChildStatus::Revoked;
            c.revoked_at = Some(now);
        }
        Ok(revoked)
    }

    fn aka_material(&mut self, supi: &Supi) -> Result<Option<AkaMaterial>, StoreError> {
        engine::aka_material(self, supi)
    }

    fn set_sqn(&mut self, supi: &Supi, sqn: Sqn) -> Result<(), StoreError> {
        let sqn = sql_sqn(sqn);
        for sql in [
            "UPDATE parents SET sqn = ?2 WHERE supi = ?1",
            "UPDATE children SET sqn = ?2 WHERE supi = ?1",
        ] {
            let n = self
                .conn
                .prepare_cached(sql)
                .and_then(|mut s| s.execute(params![supi.as_str(), sqn]))
                .map_err(db_err)?;
            if n > 0 {
                return Ok(());
            }
        }
        Err(StoreError::UnknownSupi(supi.clone()))
    }

    fn record_aka_failure(
        &mut self,
        supi: &Supi,
        now: Timestamp,
    ) -> Result<AkaFailures, StoreError> {
        row_opt(
            self.conn,
            "INSERT INTO aka_failures (supi, count, first_at, last_at) VALUES (?1, 1, ?2, ?2) \
             ON CONFLICT (supi) DO UPDATE SET count = count + 1, last_at = excluded.last_at \
             RETURNING count, first_at, last_at",
            params![supi.as_str(), now.0],
            rows::aka_failures,
        )?
        .ok_or_else(|| StoreError::Database("INSERT … RETURNING returned no row".into()))
    }

    fn clear_aka_failures(&mut self, supi: &Supi) -> Result<(), StoreError> {
        self.conn
            .execute("DELETE FROM aka_failures WHERE supi = ?1", [supi.as_str()])
            .map_err(db_err)?;
        Ok(())
    }

    fn enqueue_sync(&mut self, supi: &Supi, now: Timestamp) -> Result<(), StoreError> {
        if !self.sync_outbox {
            return Ok(());
        }
        self.conn
            .prepare_cached("INSERT INTO sync_outbox (supi, created_at) VALUES (?1, ?2)")
            .and_then(|mut s| s.execute(params![supi.as_str(), now.0]))
            .map_err(db_err)?;
        Ok(())
    }

    fn ack_sync(
        &mut self,
        supi: &Supi,
        up_to: i64,
        present: bool,
        now: Timestamp,
    ) -> Result<(), StoreError> {
        self.conn
            .execute(
                "DELETE FROM sync_outbox WHERE supi = ?1 AND id <= ?2",
                params![supi.as_str(), up_to],
            )
            .map_err(db_err)?;
        self.conn
            .execute(
                "INSERT INTO sync_state (supi, present, pushed_at) VALUES (?1, ?2, ?3) \
                 ON CONFLICT (supi) DO UPDATE SET present = excluded.present, \
                 pushed_at = excluded.pushed_at",
                params![supi.as_str(), present, now.0],
            )
            .map_err(db_err)?;
        Ok(())
    }

    fn sync_lease(
        &mut self,
        holder: &str,
        now: Timestamp,
        until: Timestamp,
    ) -> Result<bool, StoreError> {
        self.conn
            .execute(
                "INSERT INTO sync_lease (id, holder, until) VALUES (1, ?1, ?2) \
                 ON CONFLICT (id) DO UPDATE SET holder = excluded.holder, until = excluded.until \
                 WHERE sync_lease.holder = excluded.holder OR sync_lease.until < ?3",
                params![holder, until.0, now.0],
            )
            .map_err(db_err)?;
        let held: String = self
            .conn
            .query_row("SELECT holder FROM sync_lease WHERE id = 1", [], |r| {
                r.get(0)
            })
            .map_err(db_err)?;
        Ok(held == holder)
    }

    fn append_audit(&mut self, e: &AuditEvent) -> Result<(), StoreError> {
        self.conn
            .prepare_cached(
                "INSERT INTO audit (at, actor, action, supi, parent_supi, device_id, request_id, \
                 detail) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            )
            .and_then(|mut s| {
                s.execute(params![
                    e.at.0,
                    e.actor,
                    e.action.as_str(),
                    e.supi.as_str(),
                    e.parent.as_ref().map(Supi::as_str),
                    e.device_id.as_ref().map(DeviceId::as_str),
                    e.request_id.as_ref().map(|r| r.0.to_vec()),
                    e.detail,
                ])
            })
            .map_err(db_err)?;
        Ok(())
    }
}
