//! Batch issuance ([`issue_batch`]): one transaction per batch, the parent locked and its quota
//! and allocation window counted once; new credentials decided one by one, encapsulated together
//! on all cores, then given their SUPI, sealed and written one by one; renewals
//! re-sealed to the key the child was issued to.

use companion_crypto::aka::Sqn;
use companion_crypto::milenage::Milenage;
use companion_crypto::secret::Key128;

use crate::model::{
    ChildCredential, ChildStatus, Parent, SubscriberKeys, SubscriptionStatus, Timestamp,
};
use crate::policy::{self, IdempotencyKey, Invalid};
use crate::store::{
    AuditAction, AuditEvent, Issuance, IssuanceKind, NewChild, Store, StoreError, WriteTx, transact,
};

use super::{
    Batch, BatchItem, IssuerConfig, ItemOutcome, ProvisionItem, RenewItem, SealError, Sealer,
};

pub(super) struct BatchCtx<'a, Se: ?Sized> {
    cfg: &'a IssuerConfig,
    sealer: &'a Se,
    parent: &'a Parent,
    actor: &'a str,
    now: Timestamp,
}

/// What the batch has used so far, the pending credentials counted as issued.
pub(super) struct Usage {
    /// Active children (quota).
    active: u32,
    /// Children issued within the allocation window (rate cap).
    recent: u32,
    /// The oldest `issued_at` among those.
    oldest: Option<Timestamp>,
}

impl Usage {
    fn take(&mut self, now: Timestamp) {
        self.active += 1;
        self.recent += 1;
        self.oldest.get_or_insert(now);
    }

    /// A pending credential that was not issued after all.
    fn give_back(&mut self) {
        self.active = self.active.saturating_sub(1);
        self.recent = self.recent.saturating_sub(1);
    }
}

/// Decides and commits a batch in one transaction; one outcome per item, in order.
///
/// Errors: [`StoreError::BatchTooLarge`], [`StoreError::ParentNotFound`], storage failures and
/// [`StoreError::ImsiRangeExhausted`]; on error nothing of the batch is committed.
pub fn issue_batch<S: Store + ?Sized, Se: Sealer + ?Sized>(
    store: &S,
    cfg: &IssuerConfig,
    batch: &Batch,
    sealer: &Se,
) -> Result<Vec<ItemOutcome>, StoreError> {
    if batch.items.len() > cfg.max_batch_items {
        return Err(StoreError::BatchTooLarge {
            len: batch.items.len(),
            max: cfg.max_batch_items,
        });
    }
    transact(store, |tx| {
        let parent = tx
            .lock_parent(&batch.parent)?
            .ok_or_else(|| StoreError::ParentNotFound(batch.parent.clone()))?;
        // The ledger entries the provision items will look up, in one round trip.
        let keys: Vec<IdempotencyKey> = batch
            .items
            .iter()
            .filter_map(|i| match i {
                BatchItem::Provision(p) => Some(IdempotencyKey {
                    parent: parent.supi.clone(),
                    device_id: p.device_id.clone(),
                    request_id: p.request_id,
                }),
                BatchItem::Renew(_) => None,
            })
            .collect();
        tx.prefetch_issuances(&keys)?;
        let ctx = BatchCtx {
            cfg,
            sealer,
            parent: &parent,
            actor: &batch.actor,
            now: batch.now,
        };
        // Active children and recent allocations, counting the pending ones as issued.
        let cap = &cfg.operator.allocation_cap;
        let (recent, oldest) = tx.children_issued_since(
            &parent.supi,
            policy::allocation_window_start(cap, batch.now),
        )?;
        let mut usage = Usage {
            active: tx.count_active_children(&parent.supi, batch.now)?,
            recent,
            oldest,
        };
        let mut out: Vec<Option<ItemOutcome>> = Vec::with_capacity(batch.items.len());
        let mut pending: Vec<Pending<'_>> = Vec::new();
        for item in &batch.items {
            if parent.status != SubscriptionStatus::Active {
                out.push(Some(ItemOutcome::ParentInactive(parent.status)));
                continue;
            }
            match item {
                BatchItem::Provision(p) => {
                    // A repeated request must find the first one committed.
                    if pending.iter().any(|q| {
                        q.item.device_id == p.device_id && q.item.request_id == p.request_id
                    }) {
                        flush(tx, &ctx, &mut pending, &mut out, &mut usage)?;
                    }
                    let mut prepared = prepare_provision(tx, &ctx, &usage, p, out.len())?;
                    // Counted as issued, a pending credential whose seal fails could be what
                    // exhausts the quota or the cap: decide again on the committed count.
                    if matches!(
                        prepared,
                        Prepared::Done(
                            ItemOutcome::QuotaExhausted { .. } | ItemOutcome::RateLimited { .. }
                        )
                    ) && !pending.is_empty()
                    {
                        flush(tx, &ctx, &mut pending, &mut out, &mut usage)?;
                        prepared = prepare_provision(tx, &ctx, &usage, p, out.len())?;
                    }
                    match prepared {
                        Prepared::Done(o) => out.push(Some(o)),
                        Prepared::Pending(q) => {
                            usage.take(batch.now);
                            out.push(None);
                            pending.push(q);
                        }
                    }
                }
                BatchItem::Renew(r) => {
                    flush(tx, &ctx, &mut pending, &mut out, &mut usage)?;
                    out.push(Some(renew_one(tx, &ctx, r)?));
                }
            }
        }
        flush(tx, &ctx, &mut pending, &mut out, &mut usage)?;
        out.into_iter()
            .map(|o| {
                o.ok_or_else(|| StoreError::Corrupt("batch item left without an outcome".into()))
            })
            .collect()
    })
}

/// A new credential decided, with its keys, waiting for its encapsulation, SUPI and seal.
pub(super) struct Pending<'i> {
    /// Position of the item in the batch.
    slot: usize,
    item: &'i ProvisionItem,
    expires_at: Timestamp,
    restrictions: crate::model::Restrictions,
    keys: SubscriberKeys,
}

pub(super) enum Prepared<'i> {
    /// Answered without a new credential (retry, refusal).
    Done(ItemOutcome),
    /// To be sealed and written.
    Pending(Pending<'i>),
}

/// Fewest credentials worth a sealing thread of their own (a thread costs far less than one
/// HPKE encapsulation, but not nothing).
pub(super) const MIN_SEALS_PER_THREAD: usize = 4;

pub(super) fn prepare_provision<'i, Se: Sealer + ?Sized>(
    tx: &mut dyn WriteTx,
    ctx: &BatchCtx<'_, Se>,
    usage: &Usage,
    item: &'i ProvisionItem,
    slot: usize,
) -> Result<Prepared<'i>, StoreError> {
    // A parent that requires attestation gives nothing, not even a stored answer, to a key no
    // manufacturer certified for this device.
    if let Err(d) = policy::check_attestation(&ctx.parent.policy, &item.attestation) {
        return Ok(Prepared::Done(ItemOutcome::PolicyDenied(d)));
    }
    let key = IdempotencyKey {
        parent: ctx.parent.supi.clone(),
        device_id: item.device_id.clone(),
        request_id: item.request_id,
    };
    if let Some(prior) = tx.issuance(&key)? {
        let child = tx.child(&prior.child_supi)?.ok_or_else(|| {
            StoreError::Corrupt(format!("issuance of missing {}", prior.child_supi))
        })?;
        // Same request ID but a different kind or device key: not a retry of the same request.
        if prior.kind != IssuanceKind::Provision
            || child.device_key_fingerprint != item.device_key_fingerprint
            || child.device_spki.as_deref() != Some(item.device_spki.as_slice())
        {
            return Ok(Prepared::Done(ItemOutcome::Invalid(
                Invalid::RequestIdReused,
            )));
        }
        return Ok(Prepared::Done(ItemOutcome::AlreadyIssued {
            kind: prior.kind,
            child,
            sealed: prior.sealed,
        }));
    }
    let grant = match policy::decide_provision(
        ctx.parent,
        usage.active,
        &item.params,
        &ctx.cfg.operator,
        ctx.now,
    )
    .and_then(|g| {
        policy::check_allocation_rate(
            usage.recent,
            usage.oldest,
            &ctx.cfg.operator.allocation_cap,
            ctx.now,
        )
        .map(|()| g)
    }) {
        Ok(g) => g,
        Err(r) => return Ok(Prepared::Done(r.into())),
    };
    let k = Key128::try_random().map_err(|_| StoreError::Rng)?;
    let opc = Milenage::compute_opc(&k, ctx.cfg.op.expose());
    Ok(Prepared::Pending(Pending {
        slot,
        item,
        expires_at: grant.expires_at,
        restrictions: grant.restrictions,
        keys: SubscriberKeys { k, opc },
    }))
}

/// Issues every pending credential: encapsulates them all (on all cores), then, in item order,
/// allocates, seals and writes each. An item that fails either step costs only itself, and
/// consumes no SUPI.
pub(super) fn flush<Se: Sealer + ?Sized>(
    tx: &mut dyn WriteTx,
    ctx: &BatchCtx<'_, Se>,
    pending: &mut Vec<Pending<'_>>,
    out: &mut [Option<ItemOutcome>],
    usage: &mut Usage,
) -> Result<(), StoreError> {
    if pending.is_empty() {
        return Ok(());
    }
    let encapsulated = encapsulate_all(ctx.sealer, pending);
    for (p, enc) in pending.drain(..).zip(encapsulated) {
        let slot = p.slot;
        let issued = match enc {
            Ok(enc) => issue_one(tx, ctx, p, enc)?,
            Err(e) => Err(e),
        };
        let outcome = issued.unwrap_or_else(|e| {
            usage.give_back();
            ItemOutcome::Invalid(Invalid::Seal(e.0))
        });
        let slot = out
            .get_mut(slot)
            .ok_or_else(|| StoreError::Corrupt("pending item outside its batch".into()))?;
        *slot = Some(outcome);
    }
    Ok(())
}

/// Allocates the SUPI of one encapsulated credential, seals and writes it. A seal error
/// (`Ok(Err(_))`) comes before any write, so the item costs nothing: an allocation is only a
/// choice until the child row takes it ([`WriteTx::allocate_supi`]), and no savepoint is needed
/// to give it back. A storage error aborts the batch.
pub(super) fn issue_one<Se: Sealer + ?Sized>(
    tx: &mut dyn WriteTx,
    ctx: &BatchCtx<'_, Se>,
    p: Pending<'_>,
    enc: Se::Encapsulated,
) -> Result<Result<ItemOutcome, SealError>, StoreError> {
    let supi = tx.allocate_supi(&ctx.cfg.imsi_range)?;
    let child = ChildCredential {
        supi,
        parent: ctx.parent.supi.clone(),
        device_id: p.item.device_id.clone(),
        device_key_fingerprint: p.item.device_key_fingerprint,
        device_spki: Some(p.item.device_spki.clone()),
        request_id: p.item.request_id,
        amf: ctx.cfg.amf,
        sqn: Sqn::ZERO,
        issued_at: ctx.now,
        expires_at: p.expires_at,
        renewed_at: None,
        restrictions: p.restrictions,
        status: ChildStatus::Active,
        revoked_at: None,
    };
    match ctx.sealer.seal(enc, &child, &p.keys) {
        Ok(sealed) => Ok(Ok(write_provision(tx, ctx, child, p.keys, sealed)?)),
        Err(e) => Ok(Err(e)),
    }
}

/// Encapsulates `pending` in order, split across the available cores.
pub(super) fn encapsulate_all<Se: Sealer + ?Sized>(
    sealer: &Se,
    pending: &[Pending<'_>],
) -> Vec<Result<Se::Encapsulated, SealError>> {
    crate::parallel::map_in_order(
        pending,
        MIN_SEALS_PER_THREAD,
        "cn-seal",
        |p| sealer.encapsulate(&p.item.recipient, &p.item.device_id, &p.item.request_id),
        || Err(SealError("the sealing thread panicked".into())),
    )
}

pub(super) fn write_provision<Se: Sealer + ?Sized>(
    tx: &mut dyn WriteTx,
    ctx: &BatchCtx<'_, Se>,
    child: ChildCredential,
    keys: SubscriberKeys,
    sealed: Vec<u8>,
) -> Result<ItemOutcome, StoreError> {
    let key = IdempotencyKey {
        parent: ctx.parent.supi.clone(),
        device_id: child.device_id.clone(),
        request_id: child.request_id,
    };
    tx.insert_child(&NewChild {
        child: child.clone(),
        keys,
    })?;
    record_issued(tx, ctx, &key, &child, IssuanceKind::Provision, &sealed)?;
    Ok(ItemOutcome::Issued { child, sealed })
}

/// What follows every issued or renewed credential in its transaction: the sync outbox row,
/// the ledger entry answering a retry of `key` with `sealed`, and the audit entry.
pub(super) fn record_issued<Se: Sealer + ?Sized>(
    tx: &mut dyn WriteTx,
    ctx: &BatchCtx<'_, Se>,
    key: &IdempotencyKey,
    child: &ChildCredential,
    kind: IssuanceKind,
    sealed: &[u8],
) -> Result<(), StoreError> {
    tx.enqueue_sync(&child.supi, ctx.now)?;
    tx.insert_issuance(
        key,
        &Issuance {
            child_supi: child.supi.clone(),
            kind,
            sealed: sealed.to_vec(),
            created_at: ctx.now,
        },
    )?;
    tx.append_audit(&AuditEvent {
        at: ctx.now,
        actor: ctx.actor.to_owned(),
        action: match kind {
            IssuanceKind::Provision => AuditAction::Issue,
            IssuanceKind::Renew => AuditAction::Renew,
        },
        supi: child.supi.clone(),
        parent: Some(child.parent.clone()),
        device_id: Some(child.device_id.clone()),
        request_id: Some(key.request_id),
        detail: format!("expires_at={}", child.expires_at),
    })
}

pub(super) fn renew_one<Se: Sealer + ?Sized>(
    tx: &mut dyn WriteTx,
    ctx: &BatchCtx<'_, Se>,
    item: &RenewItem,
) -> Result<ItemOutcome, StoreError> {
    let Some(child) = tx
        .child(&item.child)?
        .filter(|c| c.parent == ctx.parent.supi)
    else {
        return Ok(ItemOutcome::NotFound);
    };
    // A renewal re-seals the child's K/OPc to a new key: only the device key the child was
    // issued to may ask for it (its signature over this item was verified against
    // `item.device_spki`). Checked before the idempotency lookup, so not even a stored answer
    // goes to anyone else.
    match child.device_spki.as_deref() {
        None => return Ok(ItemOutcome::Invalid(Invalid::Unbound)),
        Some(spki) if spki != item.device_spki.as_slice() || child.device_id != item.device_id => {
            return Ok(ItemOutcome::Invalid(Invalid::KeyNotBound));
        }
        Some(_) => {}
    }
    if let Err(d) = policy::check_attestation(&ctx.parent.policy, &item.attestation) {
        return Ok(ItemOutcome::PolicyDenied(d));
    }
    let key = IdempotencyKey {
        parent: ctx.parent.supi.clone(),
        device_id: child.device_id.clone(),
        request_id: item.request_id,
    };
    if let Some(prior) = tx.issuance(&key)? {
        if prior.kind != IssuanceKind::Renew || prior.child_supi != child.supi {
            return Ok(ItemOutcome::Invalid(Invalid::RequestIdReused));
        }
        return Ok(ItemOutcome::AlreadyIssued {
            kind: prior.kind,
            child,
            sealed: prior.sealed,
        });
    }
    let grant = match policy::decide_renewal(
        ctx.parent,
        &child,
        item.lifetime_s,
        &ctx.cfg.operator,
        ctx.now,
    ) {
        Ok(g) => g,
        Err(r) => return Ok(r.into()),
    };
    let keys = tx
        .keys(&child.supi)?
        .ok_or_else(|| StoreError::Corrupt(format!("{} has no keys", child.supi)))?;
    let renewed = ChildCredential {
        expires_at: grant.expires_at,
        restrictions: grant.restrictions,
        renewed_at: Some(ctx.now),
        ..child
    };
    // Sealed to the renewal's own request ID (the AAD the device checks).
    let sealed = match ctx
        .sealer
        .encapsulate(&item.recipient, &renewed.device_id, &item.request_id)
        .and_then(|enc| ctx.sealer.seal(enc, &renewed, &keys))
    {
        Ok(s) => s,
        Err(e) => return Ok(ItemOutcome::Invalid(Invalid::Seal(e.0))),
    };
    tx.renew_child(&renewed)?;
    record_issued(tx, ctx, &key, &renewed, IssuanceKind::Renew, &sealed)?;
    Ok(ItemOutcome::Renewed {
        child: renewed,
        sealed,
    })
}
