//! The PostgreSQL write transaction ([`PgTx`]): row locks, SUPI candidates checked in bulk,
//! ledger lookups answered in advance, and every [`WriteTx`] primitive in this engine's SQL.

use std::collections::HashMap;
use std::ops::ControlFlow;
use std::sync::atomic::AtomicU64;

use postgres::Statement;
use postgres::types::ToSql;

use crate::kek::Kek;
use crate::model::{
    ChildCredential, ImsiRange, NewParent, Parent, ParentPolicy, SubscriberKeys,
    SubscriptionStatus, Supi, Timestamp,
};
use crate::policy::IdempotencyKey;
use crate::store::engine::{
    self, CHILDREN, EncKeys, EngineTx, PARENTS, random_msin, range_supi, seal_keys,
};
use crate::store::rows::{
    self, CHILD_COLS, Columns, PARENT_COLS, corrupt, join_dnns, sql_sqn, sql_u64,
};
use crate::store::{AkaFailures, AkaMaterial, AuditEvent, Issuance, NewChild, StoreError, WriteTx};
use companion_crypto::aka::Sqn;

mod deferred;

pub(super) use deferred::Deferred;

use super::db::{
    Db, get, is_retryable, is_retryable_store_err, is_unique_violation, pg_err, q_child,
    q_issuance, q_parent, q_supi_taken, u32_at,
};

/// Candidate SUPIs checked against the database at once by [`WriteTx::allocate_supi`], at
/// least; a batch announces how many it may need ([`WriteTx::prefetch_issuances`]).
pub(super) const SUPI_CANDIDATES: usize = 16;

/// A write transaction on the PostgreSQL engine.
pub(super) struct PgTx<'a, 'c> {
    pub(super) tx: &'a mut postgres::Transaction<'c>,
    pub(super) stmts: &'a mut HashMap<String, Statement>,
    pub(super) trips: &'a AtomicU64,
    pub(super) kek: &'a Kek,
    /// The sync outbox is on ([`Store::set_sync_outbox`](crate::store::Store::set_sync_outbox)).
    pub(super) sync_outbox: bool,
    /// Set when a statement failed with a serialisation failure or deadlock: the whole
    /// transaction is then retried.
    pub(super) retry: bool,
    /// Writes not sent yet. Invariant: every other statement runs after [`PgTx::flush`], except
    /// the reads that consult these rows first ([`WriteTx::issuance`], [`WriteTx::child`],
    /// [`WriteTx::allocate_supi`]'s candidates).
    pub(super) deferred: Deferred,
    /// Ledger lookups answered in advance ([`WriteTx::prefetch_issuances`]); a key is dropped
    /// when its entry is written, after which the database answers.
    pub(super) known_issuances: Vec<(IdempotencyKey, Option<Issuance>)>,
    /// SUPIs of the range `reserve_range` found free in this transaction, not handed out yet.
    pub(super) reserve: Vec<Supi>,
    pub(super) reserve_range: Option<(String, u64, u64)>,
    /// SUPIs the batch may still allocate (its provision items), for the size of a refill.
    pub(super) expected_allocations: usize,
}

impl<'c> PgTx<'_, 'c> {
    pub(super) fn db(&mut self) -> Db<'_, postgres::Transaction<'c>> {
        Db {
            trips: self.trips,
            c: &mut *self.tx,
            stmts: &mut *self.stmts,
        }
    }

    pub(super) fn err(&mut self, e: postgres::Error) -> StoreError {
        if is_retryable(&e) {
            self.retry = true;
        }
        pg_err(e)
    }

    pub(super) fn exec(
        &mut self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<u64, StoreError> {
        match self.db().execute(sql, params) {
            Ok(n) => Ok(n),
            Err(e) => Err(self.err(e)),
        }
    }

    /// Runs a shared query helper, noting retryable failures (by the SQLSTATE that
    /// [`pg_err`] keeps in the message).
    pub(super) fn q<T>(
        &mut self,
        f: impl FnOnce(&mut Db<'_, postgres::Transaction<'c>>) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let r = f(&mut self.db());
        if let Err(e) = &r
            && is_retryable_store_err(e)
        {
            self.retry = true;
        }
        r
    }
}

impl EngineTx for PgTx<'_, '_> {
    fn kek(&self) -> &Kek {
        self.kek
    }

    fn parent_row(&mut self, supi: &Supi, lock: bool) -> Result<Option<Parent>, StoreError> {
        self.q(|c| q_parent(c, supi, lock))
    }

    fn child_row(
        &mut self,
        supi: &Supi,
        lock: bool,
    ) -> Result<Option<ChildCredential>, StoreError> {
        self.q(|c| q_child(c, supi, lock))
    }

    fn enc_keys(&mut self, table: &str, supi: &Supi) -> Result<Option<EncKeys>, StoreError> {
        let sql = if table == PARENTS {
            "SELECT k_enc, opc_enc FROM parents WHERE supi = $1"
        } else {
            "SELECT k_enc, opc_enc FROM children WHERE supi = $1"
        };
        let row = match self.db().query_opt(sql, &[&supi.as_str()]) {
            Ok(r) => r,
            Err(e) => return Err(self.err(e)),
        };
        row.map(|r| Ok((get(&r, 0)?, get(&r, 1)?))).transpose()
    }

    fn supi_taken(&mut self, supi: &Supi) -> Result<bool, StoreError> {
        self.q(|c| q_supi_taken(c, supi))
    }

    fn walk_taken(
        &mut self,
        lo: &Supi,
        hi: &Supi,
        visit: &mut dyn FnMut(&str) -> ControlFlow<()>,
    ) -> Result<(), StoreError> {
        let rows = self.q(|c| {
            c.query(
                "SELECT supi FROM children WHERE supi BETWEEN $1 AND $2 \
                 UNION SELECT supi FROM parents WHERE supi BETWEEN $1 AND $2 ORDER BY 1",
                &[&lo.as_str(), &hi.as_str()],
            )
            .map_err(pg_err)
        })?;
        for row in &rows {
            if visit(&row.text(0)?).is_break() {
                break;
            }
        }
        Ok(())
    }
}

impl WriteTx for PgTx<'_, '_> {
    fn lock_parent(&mut self, supi: &Supi) -> Result<Option<Parent>, StoreError> {
        self.flush()?;
        match self.db().query_opt(
            &format!("SELECT {PARENT_COLS} FROM parents WHERE supi = $1 FOR UPDATE"),
            &[&supi.as_str()],
        ) {
            Ok(r) => r.map(|r| rows::parent(&r)).transpose(),
            Err(e) => Err(self.err(e)),
        }
    }

    fn insert_parent(&mut self, parent: &NewParent, now: Timestamp) -> Result<(), StoreError> {
        self.flush()?;
        if self.q(|c| q_supi_taken(c, &parent.supi))? {
            return Err(StoreError::Duplicate(parent.supi.clone()));
        }
        let (k, opc) = seal_keys(self.kek, PARENTS, &parent.supi, &parent.keys)?;
        let p = &parent.policy;
        let r = self.db().execute(
            "INSERT INTO parents (supi, k_enc, opc_enc, amf, sqn, status, max_children, \
             max_lifetime_s, roaming_allowed, allowed_dnns, max_bitrate_kbps, created_at, \
             updated_at, require_attestation) \
             VALUES ($1, $2, $3, $4, $5, 'active', $6, $7, $8, $9, $10, $11, $11, $12)",
            &[
                &parent.supi.as_str(),
                &k,
                &opc,
                &parent.amf.0.as_slice(),
                &sql_sqn(parent.sqn),
                &i64::from(p.max_children),
                &sql_u64(p.max_lifetime_s)?,
                &p.roaming_allowed,
                &join_dnns(&p.allowed_dnns),
                &p.max_bitrate_kbps.map(i64::from),
                &now.0,
                &p.require_attestation,
            ],
        );
        match r {
            Ok(_) => Ok(()),
            Err(e) if is_unique_violation(&e) => Err(StoreError::Duplicate(parent.supi.clone())),
            Err(e) => Err(self.err(e)),
        }
    }

    fn set_parent_status(
        &mut self,
        supi: &Supi,
        status: SubscriptionStatus,
        now: Timestamp,
    ) -> Result<(), StoreError> {
        self.flush()?;
        let n = self.exec(
            "UPDATE parents SET status = $2, updated_at = $3 WHERE supi = $1",
            &[&supi.as_str(), &status.as_str(), &now.0],
        )?;
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
        self.flush()?;
        let n = self.exec(
            "UPDATE parents SET max_children = $2, max_lifetime_s = $3, roaming_allowed = $4, \
             allowed_dnns = $5, max_bitrate_kbps = $6, updated_at = $7, \
             require_attestation = $8 WHERE supi = $1",
            &[
                &supi.as_str(),
                &i64::from(policy.max_children),
                &sql_u64(policy.max_lifetime_s)?,
                &policy.roaming_allowed,
                &join_dnns(&policy.allowed_dnns),
                &policy.max_bitrate_kbps.map(i64::from),
                &now.0,
                &policy.require_attestation,
            ],
        )?;
        if n == 0 {
            return Err(StoreError::ParentNotFound(supi.clone()));
        }
        Ok(())
    }

    /// O(1) per parent (amortised), as on SQLite (see `SqliteTx::count_active_children` for
    /// the invariants I1 and I2): one update flips `quota_counted` to `expires_at > now` on the
    /// active children where they differ (two partial-index range scans), the triggers move the
    /// counter, and the counter is read. The caller holds the parent row (`lock_parent`), so a
    /// racing instance's batch for the same parent waits until this one commits and then, at
    /// READ COMMITTED, reads the counter it left.
    fn count_active_children(&mut self, parent: &Supi, now: Timestamp) -> Result<u32, StoreError> {
        self.flush()?;
        self.exec(
            "UPDATE children SET quota_counted = NOT quota_counted WHERE supi IN ( \
               SELECT supi FROM children \
                WHERE parent_supi = $1 AND status = 'active' AND quota_counted \
                  AND expires_at <= $2 \
               UNION ALL \
               SELECT supi FROM children \
                WHERE parent_supi = $1 AND status = 'active' AND NOT quota_counted \
                  AND expires_at > $2)",
            &[&parent.as_str(), &now.0],
        )?;
        let row = match self.db().query_opt(
            "SELECT live_children FROM parents WHERE supi = $1",
            &[&parent.as_str()],
        ) {
            Ok(r) => r,
            Err(e) => return Err(self.err(e)),
        };
        let row = row.ok_or_else(|| StoreError::ParentNotFound(parent.clone()))?;
        u32_at(&row, 0)
    }

    fn issuance(&mut self, key: &IdempotencyKey) -> Result<Option<Issuance>, StoreError> {
        if let Some((_, i)) = self.deferred.issuances.iter().find(|(k, _)| k == key) {
            return Ok(Some(i.clone()));
        }
        if let Some((_, i)) = self.known_issuances.iter().find(|(k, _)| k == key) {
            return Ok(i.clone());
        }
        self.q(|c| q_issuance(c, key))
    }

    fn prefetch_issuances(&mut self, keys: &[IdempotencyKey]) -> Result<(), StoreError> {
        if keys.is_empty() {
            return Ok(());
        }
        let parent: Vec<&str> = keys.iter().map(|k| k.parent.as_str()).collect();
        let device: Vec<&str> = keys.iter().map(|k| k.device_id.as_str()).collect();
        let rid: Vec<&[u8]> = keys.iter().map(|k| k.request_id.0.as_slice()).collect();
        let rows = match self.db().query(
            "SELECT s.child_supi, s.kind, s.sealed, s.created_at, k.n \
             FROM unnest($1::text[], $2::text[], $3::bytea[]) WITH ORDINALITY AS k(p, d, r, n) \
             JOIN issuances s ON s.parent_supi = k.p AND s.device_id = k.d AND s.request_id = k.r",
            &[&parent, &device, &rid],
        ) {
            Ok(r) => r,
            Err(e) => return Err(self.err(e)),
        };
        let mut found: Vec<Option<Issuance>> = vec![None; keys.len()];
        for r in &rows {
            let n: i64 = get(r, 4)?;
            let slot = usize::try_from(n - 1)
                .ok()
                .and_then(|i| found.get_mut(i))
                .ok_or_else(|| corrupt("ledger lookup out of range"))?;
            *slot = Some(rows::issuance(r)?);
        }
        self.known_issuances.extend(keys.iter().cloned().zip(found));
        self.expected_allocations += keys.len();
        Ok(())
    }

    fn insert_issuance(
        &mut self,
        key: &IdempotencyKey,
        issuance: &Issuance,
    ) -> Result<(), StoreError> {
        self.deferred
            .issuances
            .push((key.clone(), issuance.clone()));
        Ok(())
    }

    fn child(&mut self, supi: &Supi) -> Result<Option<ChildCredential>, StoreError> {
        if let Some((c, _, _)) = self
            .deferred
            .children
            .iter()
            .find(|(c, _, _)| c.supi == *supi)
        {
            return Ok(Some(c.clone()));
        }
        self.q(|c| q_child(c, supi, false))
    }

    fn keys(&mut self, supi: &Supi) -> Result<Option<SubscriberKeys>, StoreError> {
        self.flush()?;
        engine::keys(self, supi)
    }

    fn allocate_supi(&mut self, range: &ImsiRange) -> Result<Supi, StoreError> {
        // Uniform draws checked in bulk: SUPI_CANDIDATES random ones, one query for those a
        // parent or child holds, the free ones kept for the next calls of this transaction.
        let key = (
            range.plmn().to_owned(),
            range.first_msin(),
            range.last_msin(),
        );
        if self.reserve_range.as_ref() != Some(&key) {
            self.reserve.clear();
            self.reserve_range = Some(key);
        }
        for refill in 0..2 {
            while let Some(s) = self.reserve.pop() {
                if !self.deferred.children.iter().any(|(c, _, _)| c.supi == s) {
                    self.expected_allocations = self.expected_allocations.saturating_sub(1);
                    return Ok(s);
                }
            }
            if refill == 1 {
                break;
            }
            // Enough for the rest of the batch, with a margin for draws that are taken.
            let want =
                SUPI_CANDIDATES.max(self.expected_allocations + self.expected_allocations / 4);
            let mut candidates: Vec<String> = Vec::with_capacity(want);
            for _ in 0..want {
                let s = range_supi(range, random_msin(range)?)?.as_str().to_owned();
                if !candidates.contains(&s) {
                    candidates.push(s);
                }
            }
            let rows = match self.db().query(
                "SELECT supi FROM children WHERE supi = ANY($1) \
                 UNION ALL SELECT supi FROM parents WHERE supi = ANY($1)",
                &[&candidates],
            ) {
                Ok(r) => r,
                Err(e) => return Err(self.err(e)),
            };
            let taken: Vec<String> = rows
                .iter()
                .map(|r| get::<String>(r, 0))
                .collect::<Result<_, _>>()?;
            for c in candidates {
                if !taken.contains(&c) {
                    self.reserve.push(Supi::parse(&c).map_err(corrupt)?);
                }
            }
        }
        // A nearly full range: the rows in flight first, then the probes and walks.
        self.flush()?;
        engine::allocate_by_probing(self, range)
    }

    fn children_issued_since(
        &mut self,
        parent: &Supi,
        since: Timestamp,
    ) -> Result<(u32, Option<Timestamp>), StoreError> {
        self.flush()?;
        let row = match self.db().query_one(
            "SELECT count(*), min(issued_at) FROM children \
             WHERE parent_supi = $1 AND issued_at >= $2",
            &[&parent.as_str(), &since.0],
        ) {
            Ok(r) => r,
            Err(e) => return Err(self.err(e)),
        };
        Ok((
            u32_at(&row, 0)?,
            get::<Option<i64>>(&row, 1)?.map(Timestamp),
        ))
    }

    fn insert_child(&mut self, new: &NewChild) -> Result<(), StoreError> {
        let c = &new.child;
        if self
            .deferred
            .children
            .iter()
            .any(|(d, _, _)| d.supi == c.supi)
        {
            return Err(StoreError::Duplicate(c.supi.clone()));
        }
        let (k, opc) = seal_keys(self.kek, CHILDREN, &c.supi, &new.keys)?;
        self.deferred.children.push((c.clone(), k, opc));
        Ok(())
    }

    fn renew_child(&mut self, renewed: &ChildCredential) -> Result<(), StoreError> {
        let (supi, restrictions) = (&renewed.supi, &renewed.restrictions);
        self.flush()?;
        let n = self.exec(
            "UPDATE children SET expires_at = $2, roaming_allowed = $3, allowed_dnns = $4, \
             max_bitrate_kbps = $5, renewed_at = $6 WHERE supi = $1",
            &[
                &supi.as_str(),
                &renewed.expires_at.0,
                &restrictions.roaming_allowed,
                &join_dnns(&restrictions.allowed_dnns),
                &restrictions.max_bitrate_kbps.map(i64::from),
                &renewed.renewed_at.map(|t| t.0),
            ],
        )?;
        if n == 0 {
            return Err(StoreError::ChildNotFound(supi.clone()));
        }
        Ok(())
    }

    fn revoke_child(&mut self, supi: &Supi, now: Timestamp) -> Result<bool, StoreError> {
        self.flush()?;
        let n = self.exec(
            "UPDATE children SET status = 'revoked', revoked_at = $2 \
             WHERE supi = $1 AND status = 'active'",
            &[&supi.as_str(), &now.0],
        )?;
        if n == 0 && self.q(|c| q_child(c, supi, false))?.is_none() {
            return Err(StoreError::ChildNotFound(supi.clone()));
        }
        Ok(n == 1)
    }

    fn revoke_children_of(
        &mut self,
        parent: &Supi,
        now: Timestamp,
    ) -> Result<Vec<ChildCredential>, StoreError> {
        self.flush()?;
        let rows = match self.db().query(
            &format!(
                "UPDATE children c SET status = 'revoked', revoked_at = $2 \
                 WHERE c.parent_supi = $1 AND c.status = 'active' RETURNING {CHILD_COLS}"
            ),
            &[&parent.as_str(), &now.0],
        ) {
            Ok(r) => r,
            Err(e) => return Err(self.err(e)),
        };
        let mut revoked = rows
            .iter()
            .map(|r| rows::child(r))
            .collect::<Result<Vec<_>, _>>()?;
        revoked.sort_by(|a, b| a.supi.as_str().cmp(b.supi.as_str()));
        Ok(revoked)
    }

    fn aka_material(&mut self, supi: &Supi) -> Result<Option<AkaMaterial>, StoreError> {
        self.flush()?;
        engine::aka_material(self, supi)
    }

    fn set_sqn(&mut self, supi: &Supi, sqn: Sqn) -> Result<(), StoreError> {
        self.flush()?;
        let sqn = sql_sqn(sqn);
        for sql in [
            "UPDATE parents SET sqn = $2 WHERE supi = $1",
            "UPDATE children SET sqn = $2 WHERE supi = $1",
        ] {
            if self.exec(sql, &[&supi.as_str(), &sqn])? > 0 {
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
        self.flush()?;
        let row = match self.db().query_one(
            "INSERT INTO aka_failures AS f (supi, count, first_at, last_at) \
             VALUES ($1, 1, $2, $2) \
             ON CONFLICT (supi) DO UPDATE SET count = f.count + 1, last_at = excluded.last_at \
             RETURNING count, first_at, last_at",
            &[&supi.as_str(), &now.0],
        ) {
            Ok(r) => r,
            Err(e) => return Err(self.err(e)),
        };
        rows::aka_failures(&row)
    }

    fn clear_aka_failures(&mut self, supi: &Supi) -> Result<(), StoreError> {
        self.flush()?;
        self.exec(
            "DELETE FROM aka_failures WHERE supi = $1",
            &[&supi.as_str()],
        )
        .map(drop)
    }

    fn enqueue_sync(&mut self, supi: &Supi, now: Timestamp) -> Result<(), StoreError> {
        if self.sync_outbox {
            // Deferred like the batch's other rows (one statement per batch); no other row
            // refers to the outbox, so its order among them does not matter.
            self.deferred.sync.push((supi.clone(), now.0));
        }
        Ok(())
    }

    fn ack_sync(
        &mut self,
        supi: &Supi,
        up_to: i64,
        present: bool,
        now: Timestamp,
    ) -> Result<(), StoreError> {
        self.flush()?;
        self.exec(
            "DELETE FROM sync_outbox WHERE supi = $1 AND id <= $2",
            &[&supi.as_str(), &up_to],
        )?;
        self.exec(
            "INSERT INTO sync_state (supi, present, pushed_at) VALUES ($1, $2, $3) \
             ON CONFLICT (supi) DO UPDATE SET present = excluded.present, \
             pushed_at = excluded.pushed_at",
            &[&supi.as_str(), &present, &now.0],
        )?;
        Ok(())
    }

    fn sync_lease(
        &mut self,
        holder: &str,
        now: Timestamp,
        until: Timestamp,
    ) -> Result<bool, StoreError> {
        self.flush()?;
        self.exec(
            "INSERT INTO sync_lease (id, holder, until) VALUES (1, $1, $2) \
             ON CONFLICT (id) DO UPDATE SET holder = excluded.holder, until = excluded.until \
             WHERE sync_lease.holder = excluded.holder OR sync_lease.until < $3",
            &[&holder, &until.0, &now.0],
        )?;
        let row = match self
            .db()
            .query_one("SELECT holder FROM sync_lease WHERE id = 1", &[])
        {
            Ok(r) => r,
            Err(e) => return Err(self.err(e)),
        };
        let held: String = get(&row, 0)?;
        Ok(held == holder)
    }

    fn append_audit(&mut self, e: &AuditEvent) -> Result<(), StoreError> {
        self.deferred.audit.push(e.clone());
        Ok(())
    }
}
