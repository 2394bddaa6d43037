//! The operations of the service, written once over any [`Store`]: batch issuance, lifecycle
//! changes, AKA support and subscriber administration. Each runs in one write transaction and
//! appends its audit entries in that same transaction.
//!
//! # Batch issuance
//! [`issue_batch`] decides and commits a whole batch for one parent in ONE transaction (group
//! commit). The parent row is locked first and its active children counted once; every issued
//! item bumps that count, so the quota check and the insert are atomic with respect to every
//! other writer. Each item gets its own [`ItemOutcome`]; only storage failures abort the batch
//! (and then nothing of it is committed).
//!
//! Sealing (HPKE, tens of microseconds per credential) dominates a batch's CPU time, so new
//! credentials are decided and given their SUPI and keys one by one, then sealed together on
//! all cores, then written. The outcomes are exactly those of deciding and committing the items
//! one after another: a renewal, a repeated request ID, or a quota refusal that could depend on
//! the credentials still waiting for their seal first seals and writes those.
//!
//! # Renewal
//! Renewal keeps the SUPI, K and OPc (the device keeps its USIM state and nothing needs
//! re-provisioning in the network) and sets `expires_at = now + lifetime` under the same lifetime
//! rule as issuance, re-narrowing the restrictions against the parent's current policy. It is
//! allowed only before expiry; an expired credential must be provisioned anew (counted against
//! the quota). The renewed credential is sealed again to the device key in the request, so the
//! device learns its new expiry through the same end-to-end protected channel.
//!
//! # SQN
//! The stored SQN is SQN_HE, the last SQN handed out (0 = none yet). [`aka_vector`] reserves
//! `next_sqn(SQN_HE)` (SEQ + 1, IND rotated, TS 33.102 C.3.2) and stores it in the same
//! transaction, so two sessions never get the same SQN. [`apply_resync`] stores the SQN_MS a
//! verified AUTS reported, so the next vector uses `sqn_after_resync(SQN_MS)`.

use companion_crypto::aka::{Sqn, next_sqn};
use companion_crypto::milenage::Milenage;
use companion_crypto::secret::Key128;
use thiserror::Error;

use crate::model::{
    Amf, ChildCredential, ChildStatus, DeviceId, ImsiRange, KeyFingerprint, NewParent, Parent,
    ParentPolicy, RequestId, SubscriberKeys, SubscriptionStatus, Supi, Timestamp,
};
use crate::policy::{
    self, Denial, IdempotencyKey, Invalid, OperatorPolicy, Refusal, RequestedParams,
};
use crate::store::{
    AkaFailures, AkaMaterial, AuditAction, AuditEvent, Issuance, IssuanceKind, NewChild, Store,
    StoreError, WriteTx, transact,
};

/// Default largest batch accepted by [`issue_batch`].
pub const DEFAULT_MAX_BATCH_ITEMS: usize = 256;

/// Operator configuration for issuing child credentials.
#[derive(Debug, Clone)]
pub struct IssuerConfig {
    /// Range child SUPIs are allocated from.
    pub imsi_range: ImsiRange,
    /// The operator variant OP; children get OPc = AES_K(OP) xor OP.
    pub op: Key128,
    /// AMF of child credentials.
    pub amf: Amf,
    /// Operator-wide limits.
    pub operator: OperatorPolicy,
    /// Largest batch accepted.
    pub max_batch_items: usize,
}

/// Sealing a credential failed (bad device key, HPKE error). Must not contain secrets.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{0}")]
pub struct SealError(pub String);

/// Seals a freshly issued or renewed credential to the device's key (HPKE in the server; any
/// deterministic stand-in in tests). The store keeps the result as an opaque blob so a retried
/// request gets exactly the same bytes.
pub trait Sealer: Sync {
    /// Seals `child` with its `keys` to `recipient` (the device's public key as sent with the
    /// request, uninterpreted by the store).
    fn seal(
        &self,
        recipient: &[u8],
        child: &ChildCredential,
        keys: &SubscriberKeys,
    ) -> Result<Vec<u8>, SealError>;
}

impl<F> Sealer for F
where
    F: Fn(&[u8], &ChildCredential, &SubscriberKeys) -> Result<Vec<u8>, SealError> + Sync,
{
    fn seal(
        &self,
        recipient: &[u8],
        child: &ChildCredential,
        keys: &SubscriberKeys,
    ) -> Result<Vec<u8>, SealError> {
        self(recipient, child, keys)
    }
}

/// A request for a new child credential.
#[derive(Debug, Clone)]
pub struct ProvisionItem {
    /// The device's identity (seed step 2).
    pub device_id: DeviceId,
    /// Fingerprint of the device key pinned at pairing.
    pub device_key_fingerprint: KeyFingerprint,
    /// Device-chosen request ID (idempotency).
    pub request_id: RequestId,
    /// The device's HPKE public key to seal to; passed to the [`Sealer`] untouched.
    pub recipient: Vec<u8>,
    /// Control parameters (seed step 4).
    pub params: RequestedParams,
}

/// A request to renew an existing child credential.
#[derive(Debug, Clone)]
pub struct RenewItem {
    /// The credential to renew.
    pub child: Supi,
    /// Request ID (idempotency, together with the child's device ID).
    pub request_id: RequestId,
    /// The device's HPKE public key to seal the renewed credential to.
    pub recipient: Vec<u8>,
    /// Requested lifetime from now, in seconds.
    pub lifetime_s: Option<u64>,
}

/// One item of a batch.
#[derive(Debug, Clone)]
pub enum BatchItem {
    /// Issue a new credential.
    Provision(ProvisionItem),
    /// Renew an existing one.
    Renew(RenewItem),
}

/// A batch of requests from one companion.
#[derive(Debug, Clone)]
pub struct Batch {
    /// The authenticated companion subscription.
    pub parent: Supi,
    /// Recorded in the audit trail, e.g. `gateway:<parent SUPI>`.
    pub actor: String,
    /// The time of the decision.
    pub now: Timestamp,
    /// The requests, answered in order.
    pub items: Vec<BatchItem>,
}

/// The answer to one batch item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ItemOutcome {
    /// A new credential was issued.
    Issued {
        /// The credential.
        child: ChildCredential,
        /// The sealed credential for the device.
        sealed: Vec<u8>,
    },
    /// The credential was renewed.
    Renewed {
        /// The credential with its new expiry and restrictions.
        child: ChildCredential,
        /// The sealed renewed credential for the device.
        sealed: Vec<u8>,
    },
    /// A retry of a request already answered: the stored answer, byte for byte.
    AlreadyIssued {
        /// Whether the original request was a provision or a renewal.
        kind: IssuanceKind,
        /// The credential as it is now.
        child: ChildCredential,
        /// The sealed credential returned the first time.
        sealed: Vec<u8>,
    },
    /// The parent already has its maximum of active credentials.
    QuotaExhausted {
        /// The parent's `max_children`.
        limit: u32,
    },
    /// Policy refused the request.
    PolicyDenied(Denial),
    /// The request is malformed or could not be sealed.
    Invalid(Invalid),
    /// Renewal of a credential this parent does not have.
    NotFound,
    /// The parent subscription is suspended or revoked.
    ParentInactive(SubscriptionStatus),
}

impl From<Refusal> for ItemOutcome {
    fn from(r: Refusal) -> Self {
        match r {
            Refusal::ParentInactive(s) => Self::ParentInactive(s),
            Refusal::QuotaExhausted { limit } => Self::QuotaExhausted { limit },
            Refusal::Denied(d) => Self::PolicyDenied(d),
            Refusal::Invalid(i) => Self::Invalid(i),
        }
    }
}

struct BatchCtx<'a> {
    cfg: &'a IssuerConfig,
    sealer: &'a dyn Sealer,
    parent: &'a Parent,
    actor: &'a str,
    now: Timestamp,
}

/// Decides and commits a batch in one transaction; one outcome per item, in order.
///
/// Errors: [`StoreError::BatchTooLarge`], [`StoreError::ParentNotFound`], storage failures and
/// [`StoreError::ImsiRangeExhausted`]; on error nothing of the batch is committed.
pub fn issue_batch<S: Store + ?Sized>(
    store: &S,
    cfg: &IssuerConfig,
    batch: &Batch,
    sealer: &dyn Sealer,
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
        let ctx = BatchCtx {
            cfg,
            sealer,
            parent: &parent,
            actor: &batch.actor,
            now: batch.now,
        };
        // Active children, counting the pending ones as issued.
        let mut active = tx.count_active_children(&parent.supi, batch.now)?;
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
                        flush(tx, &ctx, &mut pending, &mut out, &mut active)?;
                    }
                    let mut prepared = prepare_provision(tx, &ctx, active, p, out.len())?;
                    // Counted as issued, a pending credential whose seal fails could be what
                    // exhausts the quota: decide again on the committed count.
                    if matches!(prepared, Prepared::Done(ItemOutcome::QuotaExhausted { .. }))
                        && !pending.is_empty()
                    {
                        flush(tx, &ctx, &mut pending, &mut out, &mut active)?;
                        prepared = prepare_provision(tx, &ctx, active, p, out.len())?;
                    }
                    match prepared {
                        Prepared::Done(o) => out.push(Some(o)),
                        Prepared::Pending(q) => {
                            active += 1;
                            out.push(None);
                            pending.push(q);
                        }
                    }
                }
                BatchItem::Renew(r) => {
                    flush(tx, &ctx, &mut pending, &mut out, &mut active)?;
                    out.push(Some(renew_one(tx, &ctx, r)?));
                }
            }
        }
        flush(tx, &ctx, &mut pending, &mut out, &mut active)?;
        out.into_iter()
            .map(|o| {
                o.ok_or_else(|| StoreError::Corrupt("batch item left without an outcome".into()))
            })
            .collect()
    })
}

/// A new credential decided, with its SUPI and keys, waiting for its seal.
struct Pending<'i> {
    /// Position of the item in the batch.
    slot: usize,
    item: &'i ProvisionItem,
    child: ChildCredential,
    keys: SubscriberKeys,
}

enum Prepared<'i> {
    /// Answered without a new credential (retry, refusal).
    Done(ItemOutcome),
    /// To be sealed and written.
    Pending(Pending<'i>),
}

/// Fewest credentials worth a sealing thread of their own (a thread costs far less than one
/// HPKE seal, but not nothing).
const MIN_SEALS_PER_THREAD: usize = 4;

fn prepare_provision<'i>(
    tx: &mut dyn WriteTx,
    ctx: &BatchCtx<'_>,
    active: u32,
    item: &'i ProvisionItem,
    slot: usize,
) -> Result<Prepared<'i>, StoreError> {
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
        active,
        &item.params,
        &ctx.cfg.operator,
        ctx.now,
    ) {
        Ok(g) => g,
        Err(r) => return Ok(Prepared::Done(r.into())),
    };
    let supi = tx.allocate_supi(&ctx.cfg.imsi_range)?;
    let k = Key128::try_random().map_err(|_| StoreError::Rng)?;
    let opc = Milenage::compute_opc(&k, ctx.cfg.op.expose());
    let child = ChildCredential {
        supi,
        parent: ctx.parent.supi.clone(),
        device_id: item.device_id.clone(),
        device_key_fingerprint: item.device_key_fingerprint,
        request_id: item.request_id,
        amf: ctx.cfg.amf,
        sqn: Sqn::ZERO,
        issued_at: ctx.now,
        expires_at: grant.expires_at,
        renewed_at: None,
        restrictions: grant.restrictions,
        status: ChildStatus::Active,
        revoked_at: None,
    };
    Ok(Prepared::Pending(Pending {
        slot,
        item,
        child,
        keys: SubscriberKeys { k, opc },
    }))
}

/// Seals every pending credential (on all cores) and writes the sealed ones. A seal failure
/// costs its item (and its allocated SUPI, which is never reused) but not the batch.
fn flush(
    tx: &mut dyn WriteTx,
    ctx: &BatchCtx<'_>,
    pending: &mut Vec<Pending<'_>>,
    out: &mut [Option<ItemOutcome>],
    active: &mut u32,
) -> Result<(), StoreError> {
    if pending.is_empty() {
        return Ok(());
    }
    let sealed = seal_all(ctx.sealer, pending);
    for (p, sealed) in pending.drain(..).zip(sealed) {
        let outcome = match sealed {
            Ok(sealed) => write_provision(tx, ctx, p.child, p.keys, sealed)?,
            Err(e) => {
                *active = active.saturating_sub(1);
                ItemOutcome::Invalid(Invalid::Seal(e.0))
            }
        };
        let slot = out
            .get_mut(p.slot)
            .ok_or_else(|| StoreError::Corrupt("pending item outside its batch".into()))?;
        *slot = Some(outcome);
    }
    Ok(())
}

fn seal_chunk(sealer: &dyn Sealer, chunk: &[Pending<'_>]) -> Vec<Result<Vec<u8>, SealError>> {
    chunk
        .iter()
        .map(|p| sealer.seal(&p.item.recipient, &p.child, &p.keys))
        .collect()
}

/// Seals `pending` in order, split across the available cores.
fn seal_all(sealer: &dyn Sealer, pending: &[Pending<'_>]) -> Vec<Result<Vec<u8>, SealError>> {
    let cores = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
    let threads = cores.min(pending.len() / MIN_SEALS_PER_THREAD).max(1);
    if threads == 1 {
        return seal_chunk(sealer, pending);
    }
    let per_thread = pending.len().div_ceil(threads);
    std::thread::scope(|scope| {
        let mut chunks = pending.chunks(per_thread);
        let mine = chunks.next().unwrap_or_default();
        // Threads that could not be started leave their chunk to this thread.
        let others: Vec<_> = chunks
            .map(|c| {
                let h = std::thread::Builder::new()
                    .name("cn-seal".into())
                    .spawn_scoped(scope, move || seal_chunk(sealer, c));
                (c, h.ok())
            })
            .collect();
        let mut out = seal_chunk(sealer, mine);
        for (c, h) in others {
            match h.map(std::thread::ScopedJoinHandle::join) {
                Some(Ok(sealed)) => out.extend(sealed),
                Some(Err(_)) => out.extend(
                    c.iter()
                        .map(|_| Err(SealError("the sealing thread panicked".into()))),
                ),
                None => out.extend(seal_chunk(sealer, c)),
            }
        }
        out
    })
}

fn write_provision(
    tx: &mut dyn WriteTx,
    ctx: &BatchCtx<'_>,
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
    tx.insert_issuance(
        &key,
        &Issuance {
            child_supi: child.supi.clone(),
            kind: IssuanceKind::Provision,
            sealed: sealed.clone(),
            created_at: ctx.now,
        },
    )?;
    tx.append_audit(&AuditEvent {
        at: ctx.now,
        actor: ctx.actor.to_owned(),
        action: AuditAction::Issue,
        supi: child.supi.clone(),
        parent: Some(child.parent.clone()),
        device_id: Some(child.device_id.clone()),
        request_id: Some(child.request_id),
        detail: format!("expires_at={}", child.expires_at),
    })?;
    Ok(ItemOutcome::Issued { child, sealed })
}

fn renew_one(
    tx: &mut dyn WriteTx,
    ctx: &BatchCtx<'_>,
    item: &RenewItem,
) -> Result<ItemOutcome, StoreError> {
    let Some(child) = tx
        .child(&item.child)?
        .filter(|c| c.parent == ctx.parent.supi)
    else {
        return Ok(ItemOutcome::NotFound);
    };
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
    let sealed = match ctx.sealer.seal(&item.recipient, &renewed, &keys) {
        Ok(s) => s,
        Err(e) => return Ok(ItemOutcome::Invalid(Invalid::Seal(e.0))),
    };
    tx.renew_child(
        &renewed.supi,
        renewed.expires_at,
        &renewed.restrictions,
        ctx.now,
    )?;
    tx.insert_issuance(
        &key,
        &Issuance {
            child_supi: renewed.supi.clone(),
            kind: IssuanceKind::Renew,
            sealed: sealed.clone(),
            created_at: ctx.now,
        },
    )?;
    tx.append_audit(&AuditEvent {
        at: ctx.now,
        actor: ctx.actor.to_owned(),
        action: AuditAction::Renew,
        supi: renewed.supi.clone(),
        parent: Some(renewed.parent.clone()),
        device_id: Some(renewed.device_id.clone()),
        request_id: Some(item.request_id),
        detail: format!("expires_at={}", renewed.expires_at),
    })?;
    Ok(ItemOutcome::Renewed {
        child: renewed,
        sealed,
    })
}

/// Revokes one child credential. Returns false (and audits nothing) if it was already revoked.
pub fn revoke_child<S: Store + ?Sized>(
    store: &S,
    supi: &Supi,
    actor: &str,
    now: Timestamp,
) -> Result<bool, StoreError> {
    transact(store, |tx| {
        let child = tx
            .child(supi)?
            .ok_or_else(|| StoreError::ChildNotFound(supi.clone()))?;
        let changed = tx.revoke_child(supi, now)?;
        if changed {
            tx.append_audit(&AuditEvent {
                at: now,
                actor: actor.to_owned(),
                action: AuditAction::Revoke,
                supi: supi.clone(),
                parent: Some(child.parent.clone()),
                device_id: Some(child.device_id.clone()),
                request_id: None,
                detail: String::new(),
            })?;
        }
        Ok(changed)
    })
}

/// Result of a parent status change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusChange {
    /// Status before.
    pub from: SubscriptionStatus,
    /// Status after.
    pub to: SubscriptionStatus,
    /// Children revoked by the change (suspend and revoke revoke every active child).
    pub revoked_children: Vec<Supi>,
}

/// Changes a parent's status. Suspending or revoking also revokes all its active children in the
/// same transaction. `revoked` is terminal; setting the current status again is a no-op.
pub fn set_parent_status<S: Store + ?Sized>(
    store: &S,
    supi: &Supi,
    to: SubscriptionStatus,
    actor: &str,
    now: Timestamp,
) -> Result<StatusChange, StoreError> {
    transact(store, |tx| {
        let parent = tx
            .lock_parent(supi)?
            .ok_or_else(|| StoreError::ParentNotFound(supi.clone()))?;
        let from = parent.status;
        if from == to {
            return Ok(StatusChange {
                from,
                to,
                revoked_children: Vec::new(),
            });
        }
        if from == SubscriptionStatus::Revoked {
            return Err(StoreError::InvalidTransition {
                supi: supi.clone(),
                from,
                to,
            });
        }
        tx.set_parent_status(supi, to, now)?;
        let action = match to {
            SubscriptionStatus::Active => AuditAction::Resume,
            SubscriptionStatus::Suspended => AuditAction::Suspend,
            SubscriptionStatus::Revoked => AuditAction::Revoke,
        };
        tx.append_audit(&AuditEvent {
            at: now,
            actor: actor.to_owned(),
            action,
            supi: supi.clone(),
            parent: None,
            device_id: None,
            request_id: None,
            detail: format!("{from} -> {to}"),
        })?;
        let mut revoked_children = Vec::new();
        if to != SubscriptionStatus::Active {
            for child in tx.revoke_children_of(supi, now)? {
                tx.append_audit(&AuditEvent {
                    at: now,
                    actor: actor.to_owned(),
                    action: AuditAction::Revoke,
                    supi: child.supi.clone(),
                    parent: Some(supi.clone()),
                    device_id: Some(child.device_id.clone()),
                    request_id: None,
                    detail: format!("parent {to}"),
                })?;
                revoked_children.push(child.supi);
            }
        }
        Ok(StatusChange {
            from,
            to,
            revoked_children,
        })
    })
}

/// Adds one parent subscription.
pub fn add_parent<S: Store + ?Sized>(
    store: &S,
    parent: &NewParent,
    actor: &str,
    now: Timestamp,
) -> Result<(), StoreError> {
    let policy = parent.policy.clone().validated()?;
    transact(store, |tx| {
        let p = NewParent {
            policy: policy.clone(),
            ..parent.clone()
        };
        tx.insert_parent(&p, now)?;
        tx.append_audit(&AuditEvent {
            at: now,
            actor: actor.to_owned(),
            action: AuditAction::Add,
            supi: p.supi.clone(),
            parent: None,
            device_id: None,
            request_id: None,
            detail: String::new(),
        })
    })
}

/// Replaces a parent's policy. Existing children keep their restrictions until they are renewed
/// (then re-narrowed) and count against the new quota.
pub fn set_parent_policy<S: Store + ?Sized>(
    store: &S,
    supi: &Supi,
    policy: &ParentPolicy,
    actor: &str,
    now: Timestamp,
) -> Result<(), StoreError> {
    let policy = policy.clone().validated()?;
    transact(store, |tx| {
        tx.lock_parent(supi)?
            .ok_or_else(|| StoreError::ParentNotFound(supi.clone()))?;
        tx.set_parent_policy(supi, &policy, now)?;
        tx.append_audit(&AuditEvent {
            at: now,
            actor: actor.to_owned(),
            action: AuditAction::Policy,
            supi: supi.clone(),
            parent: None,
            device_id: None,
            request_id: None,
            detail: format!(
                "max_children={} max_lifetime_s={} roaming={} dnns={} max_bitrate_kbps={}",
                policy.max_children,
                policy.max_lifetime_s,
                policy.roaming_allowed,
                policy
                    .allowed_dnns
                    .iter()
                    .map(|d| d.as_str())
                    .collect::<Vec<_>>()
                    .join(";"),
                policy
                    .max_bitrate_kbps
                    .map_or_else(|| "none".to_owned(), |b| b.to_string()),
            ),
        })
    })
}

/// Reserves the SQN for one authentication vector of a parent or child and returns it with the
/// key material. Status checks (suspended parent, revoked or expired child) are the caller's,
/// with [`crate::policy::check_attach`] and [`crate::store::Subscriber`].
pub fn aka_vector<S: Store + ?Sized>(store: &S, supi: &Supi) -> Result<AkaMaterial, StoreError> {
    transact(store, |tx| {
        let mut m = tx
            .aka_material(supi)?
            .ok_or_else(|| StoreError::UnknownSupi(supi.clone()))?;
        let sqn = next_sqn(m.sqn);
        tx.set_sqn(supi, sqn)?;
        m.sqn = sqn;
        Ok(m)
    })
}

/// Applies a resynchronisation: `sqn_ms` is the SQN the USIM reported in a verified AUTS. The
/// next [`aka_vector`] then uses `sqn_after_resync(sqn_ms)`.
pub fn apply_resync<S: Store + ?Sized>(
    store: &S,
    supi: &Supi,
    sqn_ms: Sqn,
) -> Result<(), StoreError> {
    transact(store, |tx| tx.set_sqn(supi, sqn_ms))
}

/// Counts one failed AKA attempt for `supi`. Call only for SUPIs that exist (or rate-limit per
/// connection first), so an attacker cannot grow the table with invented SUPIs.
pub fn record_aka_failure<S: Store + ?Sized>(
    store: &S,
    supi: &Supi,
    now: Timestamp,
) -> Result<AkaFailures, StoreError> {
    transact(store, |tx| tx.record_aka_failure(supi, now))
}

/// Clears the AKA failure counter of `supi` (after a success).
pub fn clear_aka_failures<S: Store + ?Sized>(store: &S, supi: &Supi) -> Result<(), StoreError> {
    transact(store, |tx| tx.clear_aka_failures(supi))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kek::Kek;
    use crate::model::{Amf, KeyFingerprint, ParentPolicy, Supi};
    use crate::policy::RequestedParams;
    use crate::store::{SqliteConfig, SqliteStore};

    #[test]
    fn parallel_sealing_keeps_items_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(
            &dir.path().join("cn.db"),
            Kek::from_bytes(&[7; 32]),
            SqliteConfig::default(),
        )
        .unwrap();
        let parent = Supi::parse("imsi-001010000000001").unwrap();
        add_parent(
            &store,
            &NewParent {
                supi: parent.clone(),
                keys: SubscriberKeys {
                    k: Key128::from_bytes([1; 16]),
                    opc: Key128::from_bytes([2; 16]),
                },
                amf: Amf::DEFAULT,
                sqn: Sqn::ZERO,
                policy: ParentPolicy {
                    max_children: 1000,
                    max_lifetime_s: 86_400,
                    roaming_allowed: false,
                    allowed_dnns: Vec::new(),
                    max_bitrate_kbps: None,
                },
            },
            "test",
            Timestamp(1_700_000_000),
        )
        .unwrap();
        let cfg = IssuerConfig {
            imsi_range: ImsiRange::new("001", "01", 9_000_000_000, 9_000_999_999).unwrap(),
            op: Key128::from_bytes([3; 16]),
            amf: Amf::DEFAULT,
            operator: OperatorPolicy {
                max_lifetime_s: 86_400,
            },
            max_batch_items: 256,
        };
        // Every 10th item fails to seal; the others get a blob naming their own item and SUPI.
        let sealer = |recipient: &[u8], child: &ChildCredential, _: &SubscriberKeys| {
            if recipient.ends_with(b"0") {
                return Err(SealError(format!("refused {}", child.device_id.as_str())));
            }
            let mut out = recipient.to_vec();
            out.extend_from_slice(child.supi.as_str().as_bytes());
            Ok(out)
        };
        let items: Vec<BatchItem> = (1..=200u8)
            .map(|i| {
                BatchItem::Provision(ProvisionItem {
                    device_id: DeviceId::parse(&format!("dev-{i}")).unwrap(),
                    device_key_fingerprint: KeyFingerprint([i; 32]),
                    request_id: RequestId([i; 16]),
                    recipient: format!("pk-{i}").into_bytes(),
                    params: RequestedParams::default(),
                })
            })
            .collect();
        let batch = Batch {
            parent: parent.clone(),
            actor: "test".into(),
            now: Timestamp(1_700_000_000),
            items,
        };
        let out = issue_batch(&store, &cfg, &batch, &sealer).unwrap();
        assert_eq!(out.len(), 200);
        let mut supis = Vec::new();
        for (i, o) in (1..=200u32).zip(&out) {
            match o {
                ItemOutcome::Issued { child, sealed } => {
                    assert_ne!(i % 10, 0);
                    assert_eq!(child.device_id.as_str(), format!("dev-{i}"));
                    let want = format!("pk-{i}{}", child.supi.as_str());
                    assert_eq!(sealed.as_slice(), want.as_bytes());
                    supis.push(child.supi.clone());
                }
                ItemOutcome::Invalid(Invalid::Seal(m)) => {
                    assert_eq!(i % 10, 0);
                    assert_eq!(m, &format!("refused dev-{i}"));
                }
                other => panic!("item {i}: {other:?}"),
            }
        }
        // SUPIs are allocated in item order (the failed items' SUPIs are skipped, not reused).
        let mut sorted = supis.clone();
        sorted.sort();
        assert_eq!(supis, sorted);
        assert_eq!(supis.len(), 180);
        assert_eq!(store.children_of(&parent).unwrap().len(), 180);
    }
}
