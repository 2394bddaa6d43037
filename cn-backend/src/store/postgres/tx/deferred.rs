//! Deferred writes of the PostgreSQL transaction: the rows a batch writes (children, ledger
//! entries, audit, sync outbox) kept in memory and sent with one multi-row statement per table
//! when a statement needs them or the transaction commits.

use postgres::types::ToSql;

use crate::model::{ChildCredential, DeviceId, Supi};
use crate::policy::IdempotencyKey;
use crate::store::rows::{join_dnns, sql_sqn};
use crate::store::{AuditEvent, Issuance, StoreError};

use super::PgTx;
use crate::store::postgres::db::{is_unique_violation, pg_err};

/// Rows a batch writes (new children with their encrypted K and OPc, ledger entries, audit
/// entries), kept in memory until a statement needs them in the database or the transaction
/// commits, then written with one multi-row statement per table: a batch's new credentials cost
/// a constant number of round trips, not three per credential.
#[derive(Default)]
pub(in crate::store::postgres) struct Deferred {
    pub(in crate::store::postgres) children: Vec<(ChildCredential, Vec<u8>, Vec<u8>)>,
    pub(in crate::store::postgres) issuances: Vec<(IdempotencyKey, Issuance)>,
    pub(in crate::store::postgres) audit: Vec<AuditEvent>,
    /// Sync outbox rows (SUPI, created_at), when the outbox is on.
    pub(in crate::store::postgres) sync: Vec<(Supi, i64)>,
}

impl<'c> PgTx<'_, 'c> {
    /// Sends the deferred rows: one statement per non-empty table (children before the ledger
    /// entries that reference them), nothing when there are none; empties `deferred`. A unique
    /// violation can only come from another transaction that took a SUPI meanwhile: the
    /// transaction is run again.
    pub(in crate::store::postgres) fn flush(&mut self) -> Result<(), StoreError> {
        let d = std::mem::take(&mut self.deferred);
        if !d.children.is_empty() {
            let cs = &d.children;
            let supi: Vec<&str> = cs.iter().map(|(c, _, _)| c.supi.as_str()).collect();
            let parent: Vec<&str> = cs.iter().map(|(c, _, _)| c.parent.as_str()).collect();
            let device: Vec<&str> = cs.iter().map(|(c, _, _)| c.device_id.as_str()).collect();
            let fp: Vec<&[u8]> = cs
                .iter()
                .map(|(c, _, _)| c.device_key_fingerprint.0.as_slice())
                .collect();
            let rid: Vec<&[u8]> = cs
                .iter()
                .map(|(c, _, _)| c.request_id.0.as_slice())
                .collect();
            let k: Vec<&[u8]> = cs.iter().map(|(_, k, _)| k.as_slice()).collect();
            let opc: Vec<&[u8]> = cs.iter().map(|(_, _, o)| o.as_slice()).collect();
            let amf: Vec<&[u8]> = cs.iter().map(|(c, _, _)| c.amf.0.as_slice()).collect();
            let sqn: Vec<i64> = cs.iter().map(|(c, _, _)| sql_sqn(c.sqn)).collect();
            let issued: Vec<i64> = cs.iter().map(|(c, _, _)| c.issued_at.0).collect();
            let expires: Vec<i64> = cs.iter().map(|(c, _, _)| c.expires_at.0).collect();
            let renewed: Vec<Option<i64>> = cs
                .iter()
                .map(|(c, _, _)| c.renewed_at.map(|t| t.0))
                .collect();
            let roaming: Vec<bool> = cs
                .iter()
                .map(|(c, _, _)| c.restrictions.roaming_allowed)
                .collect();
            let dnns: Vec<String> = cs
                .iter()
                .map(|(c, _, _)| join_dnns(&c.restrictions.allowed_dnns))
                .collect();
            let rate: Vec<Option<i64>> = cs
                .iter()
                .map(|(c, _, _)| c.restrictions.max_bitrate_kbps.map(i64::from))
                .collect();
            let status: Vec<&str> = cs.iter().map(|(c, _, _)| c.status.as_str()).collect();
            let revoked: Vec<Option<i64>> = cs
                .iter()
                .map(|(c, _, _)| c.revoked_at.map(|t| t.0))
                .collect();
            let spki: Vec<Option<&[u8]>> = cs
                .iter()
                .map(|(c, _, _)| c.device_spki.as_deref())
                .collect();
            self.exec_rows(
                "INSERT INTO children (supi, parent_supi, device_id, device_key_fp, request_id, \
                 k_enc, opc_enc, amf, sqn, issued_at, expires_at, renewed_at, roaming_allowed, \
                 allowed_dnns, max_bitrate_kbps, status, revoked_at, device_spki) \
                 SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::bytea[], \
                 $5::bytea[], $6::bytea[], $7::bytea[], $8::bytea[], $9::int8[], $10::int8[], \
                 $11::int8[], $12::int8[], $13::bool[], $14::text[], $15::int8[], $16::text[], \
                 $17::int8[], $18::bytea[])",
                &[
                    &supi, &parent, &device, &fp, &rid, &k, &opc, &amf, &sqn, &issued, &expires,
                    &renewed, &roaming, &dnns, &rate, &status, &revoked, &spki,
                ],
            )?;
        }
        if !d.issuances.is_empty() {
            let is = &d.issuances;
            self.known_issuances
                .retain(|(k, _)| !is.iter().any(|(w, _)| w == k));
            let parent: Vec<&str> = is.iter().map(|(k, _)| k.parent.as_str()).collect();
            let device: Vec<&str> = is.iter().map(|(k, _)| k.device_id.as_str()).collect();
            let rid: Vec<&[u8]> = is.iter().map(|(k, _)| k.request_id.0.as_slice()).collect();
            let child: Vec<&str> = is.iter().map(|(_, i)| i.child_supi.as_str()).collect();
            let kind: Vec<&str> = is.iter().map(|(_, i)| i.kind.as_str()).collect();
            let sealed: Vec<&[u8]> = is.iter().map(|(_, i)| i.sealed.as_slice()).collect();
            let at: Vec<i64> = is.iter().map(|(_, i)| i.created_at.0).collect();
            self.exec_rows(
                "INSERT INTO issuances (parent_supi, device_id, request_id, child_supi, kind, \
                 sealed, created_at) SELECT * FROM unnest($1::text[], $2::text[], $3::bytea[], \
                 $4::text[], $5::text[], $6::bytea[], $7::int8[])",
                &[&parent, &device, &rid, &child, &kind, &sealed, &at],
            )?;
        }
        if !d.audit.is_empty() {
            let es = &d.audit;
            let at: Vec<i64> = es.iter().map(|e| e.at.0).collect();
            let actor: Vec<&str> = es.iter().map(|e| e.actor.as_str()).collect();
            let action: Vec<&str> = es.iter().map(|e| e.action.as_str()).collect();
            let supi: Vec<&str> = es.iter().map(|e| e.supi.as_str()).collect();
            let parent: Vec<Option<&str>> = es
                .iter()
                .map(|e| e.parent.as_ref().map(Supi::as_str))
                .collect();
            let device: Vec<Option<&str>> = es
                .iter()
                .map(|e| e.device_id.as_ref().map(DeviceId::as_str))
                .collect();
            let rid: Vec<Option<&[u8]>> = es
                .iter()
                .map(|e| e.request_id.as_ref().map(|r| r.0.as_slice()))
                .collect();
            let detail: Vec<&str> = es.iter().map(|e| e.detail.as_str()).collect();
            // WITH ORDINALITY + ORDER BY: identities follow the order of the entries.
            self.exec_rows(
                "INSERT INTO audit (at, actor, action, supi, parent_supi, device_id, request_id, \
                 detail) SELECT a, b, c, d, e, f, g, h FROM unnest($1::int8[], $2::text[], \
                 $3::text[], $4::text[], $5::text[], $6::text[], $7::bytea[], $8::text[]) \
                 WITH ORDINALITY AS u(a, b, c, d, e, f, g, h, n) ORDER BY n",
                &[&at, &actor, &action, &supi, &parent, &device, &rid, &detail],
            )?;
        }
        if !d.sync.is_empty() {
            let supi: Vec<&str> = d.sync.iter().map(|(s, _)| s.as_str()).collect();
            let at: Vec<i64> = d.sync.iter().map(|(_, t)| *t).collect();
            // WITH ORDINALITY + ORDER BY: outbox ids follow the order of the changes.
            self.exec_rows(
                "INSERT INTO sync_outbox (supi, created_at) SELECT s, t FROM                  unnest($1::text[], $2::int8[]) WITH ORDINALITY AS u(s, t, n) ORDER BY n",
                &[&supi, &at],
            )?;
        }
        Ok(())
    }

    /// [`PgTx::exec`] for the multi-row inserts: a unique violation retries the transaction.
    pub(in crate::store::postgres) fn exec_rows(
        &mut self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<(), StoreError> {
        match self.db().execute(sql, params) {
            Ok(_) => Ok(()),
            Err(e) if is_unique_violation(&e) => {
                self.retry = true;
                Err(pg_err(e))
            }
            Err(e) => Err(self.err(e)),
        }
    }
}
