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
//! Sealing (HPKE, tens of microseconds per credential) dominates a batch's CPU time. It comes
//! in two halves ([`Sealer`]): the encapsulation (ephemeral key, X25519, key schedule: all the
//! public-key work, and the only step a bad device key can fail) needs nothing but the request,
//! while the seal proper (encoding the bundle, one AEAD pass) needs the SUPI. So new credentials
//! are decided and given their keys one by one, then *encapsulated* together on all cores, and
//! only then, item by item in a savepoint of the batch transaction, given their SUPI, sealed and
//! written: an item whose encapsulation fails never allocates, and one whose seal fails rolls
//! its savepoint (and with it the allocation) back. Nothing is consumed for an item that is not
//! issued, SUPIs stay contiguous, and the expensive half still runs in parallel. The outcomes
//! are exactly those of deciding and committing the items one after another: a renewal, a
//! repeated request ID, or a quota or rate refusal that could depend on the credentials still
//! pending first seals and writes those.
//!
//! # Allocation cap
//! Besides the quota (live credentials), the operator caps how many new credentials (SUPIs) a
//! parent may get within a sliding window ([`crate::policy::AllocationCap`]), counted from the
//! children table in the same transaction; an item over the cap is answered
//! [`ItemOutcome::RateLimited`] with the time until a slot frees up.
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
//! verified AUTS reported, so the next vector uses `sqn_after_resync(SQN_MS)`. The server does
//! not call [`aka_vector`] for every start: an unanswered vector is sent again to the same SUPI
//! and source prefix for a while ([`crate::aka_guard`]), rebuilt from [`aka_material`], so
//! unauthenticated starts cannot advance SQN_HE without bound.

use companion_crypto::aka::{Sqn, next_sqn};
use companion_crypto::milenage::Milenage;
use companion_crypto::secret::Key128;
use thiserror::Error;

use crate::model::{
    Amf, ChildCredential, ChildStatus, DeviceId, ImsiRange, KeyFingerprint, NewParent, Parent,
    ParentPolicy, RequestId, SubscriberKeys, SubscriptionStatus, Supi, Timestamp,
};
use crate::policy::{
    self, Attestation, Denial, IdempotencyKey, Invalid, OperatorPolicy, Refusal, RequestedParams,
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
/// deterministic stand-in in tests), in two halves so that nothing is allocated for a request
/// whose key is bad (see the module docs). The store keeps the result as an opaque blob so a
/// retried request gets exactly the same bytes.
pub trait Sealer: Sync {
    /// What [`Sealer::encapsulate`] hands to [`Sealer::seal`].
    type Encapsulated: Send;

    /// The half that depends only on the request: checks `recipient` (the device's public key
    /// as sent with the request, uninterpreted by the store) and does the public-key work,
    /// bound to the device and the request being answered. Runs on several threads at once,
    /// before any SUPI is allocated; an error here consumes nothing.
    fn encapsulate(
        &self,
        recipient: &[u8],
        device_id: &DeviceId,
        request_id: &RequestId,
    ) -> Result<Self::Encapsulated, SealError>;

    /// Seals `child` with its `keys`. Runs in item order, after the SUPI is allocated in the
    /// item's savepoint; an error rolls the allocation back.
    fn seal(
        &self,
        encapsulated: Self::Encapsulated,
        child: &ChildCredential,
        keys: &SubscriberKeys,
    ) -> Result<Vec<u8>, SealError>;
}

/// A one-step stand-in (tests, benchmarks): `encapsulate` keeps the recipient, the function
/// does everything in `seal`.
impl<F> Sealer for F
where
    F: Fn(&[u8], &ChildCredential, &SubscriberKeys) -> Result<Vec<u8>, SealError> + Sync,
{
    type Encapsulated = Vec<u8>;

    fn encapsulate(
        &self,
        recipient: &[u8],
        _device_id: &DeviceId,
        _request_id: &RequestId,
    ) -> Result<Vec<u8>, SealError> {
        Ok(recipient.to_vec())
    }

    fn seal(
        &self,
        recipient: Vec<u8>,
        child: &ChildCredential,
        keys: &SubscriberKeys,
    ) -> Result<Vec<u8>, SealError> {
        self(&recipient, child, keys)
    }
}

/// A request for a new child credential.
#[derive(Debug, Clone)]
pub struct ProvisionItem {
    /// The device's identity (seed step 2).
    pub device_id: DeviceId,
    /// Fingerprint of the device key pinned at pairing.
    pub device_key_fingerprint: KeyFingerprint,
    /// The device key (DER SubjectPublicKeyInfo) whose key-binding signature over this item the
    /// wire layer has verified; recorded with the child.
    pub device_spki: Vec<u8>,
    /// Device-chosen request ID (idempotency).
    pub request_id: RequestId,
    /// The device's HPKE public key to seal to; passed to the [`Sealer`] untouched.
    pub recipient: Vec<u8>,
    /// Control parameters (seed step 4).
    pub params: RequestedParams,
    /// The manufacturer attestation of `device_spki`, as the wire layer checked it.
    pub attestation: Attestation,
}

/// A request to renew an existing child credential.
#[derive(Debug, Clone)]
pub struct RenewItem {
    /// The credential to renew.
    pub child: Supi,
    /// The device the renewal is for, as signed.
    pub device_id: DeviceId,
    /// The device key whose key-binding signature over this item the wire layer has verified;
    /// it must be the key the credential was issued to.
    pub device_spki: Vec<u8>,
    /// Request ID (idempotency, together with the child's device ID).
    pub request_id: RequestId,
    /// The device's HPKE public key to seal the renewed credential to.
    pub recipient: Vec<u8>,
    /// Requested lifetime from now, in seconds.
    pub lifetime_s: Option<u64>,
    /// The manufacturer attestation of `device_spki`, as the wire layer checked it.
    pub attestation: Attestation,
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
    /// The parent reached the operator's cap on new credentials per unit of time; the same
    /// request may succeed after `retry_after_s`.
    RateLimited {
        /// New credentials allowed per window.
        limit: u32,
        /// The window, in seconds.
        window_s: u64,
        /// Seconds until a slot frees up, at the earliest.
        retry_after_s: u64,
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
            Refusal::RateLimited {
                limit,
                window_s,
                retry_after_s,
            } => Self::RateLimited {
                limit,
                window_s,
                retry_after_s,
            },
            Refusal::Denied(d) => Self::PolicyDenied(d),
            Refusal::Invalid(i) => Self::Invalid(i),
        }
    }
}

struct BatchCtx<'a, Se: ?Sized> {
    cfg: &'a IssuerConfig,
    sealer: &'a Se,
    parent: &'a Parent,
    actor: &'a str,
    now: Timestamp,
}

/// What the batch has used so far, the pending credentials counted as issued.
struct Usage {
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
struct Pending<'i> {
    /// Position of the item in the batch.
    slot: usize,
    item: &'i ProvisionItem,
    expires_at: Timestamp,
    restrictions: crate::model::Restrictions,
    keys: SubscriberKeys,
}

enum Prepared<'i> {
    /// Answered without a new credential (retry, refusal).
    Done(ItemOutcome),
    /// To be sealed and written.
    Pending(Pending<'i>),
}

/// Fewest credentials worth a sealing thread of their own (a thread costs far less than one
/// HPKE encapsulation, but not nothing).
const MIN_SEALS_PER_THREAD: usize = 4;

fn prepare_provision<'i, Se: Sealer + ?Sized>(
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
/// allocates, seals and writes each in its own savepoint. An item that fails either step costs
/// only itself, and consumes no SUPI.
fn flush<Se: Sealer + ?Sized>(
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

/// Allocates the SUPI of one encapsulated credential, seals and writes it, all in the item
/// savepoint: a seal error rolls the allocation back (`Ok(Err(_))`); a storage error aborts the
/// batch.
fn issue_one<Se: Sealer + ?Sized>(
    tx: &mut dyn WriteTx,
    ctx: &BatchCtx<'_, Se>,
    p: Pending<'_>,
    enc: Se::Encapsulated,
) -> Result<Result<ItemOutcome, SealError>, StoreError> {
    tx.item_savepoint()?;
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
        Ok(sealed) => {
            let outcome = write_provision(tx, ctx, child, p.keys, sealed)?;
            tx.release_item()?;
            Ok(Ok(outcome))
        }
        Err(e) => {
            tx.rollback_item()?;
            Ok(Err(e))
        }
    }
}

/// Encapsulates `pending` in order, split across the available cores.
fn encapsulate_all<Se: Sealer + ?Sized>(
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

fn write_provision<Se: Sealer + ?Sized>(
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
    tx.enqueue_sync(&child.supi, ctx.now)?;
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

fn renew_one<Se: Sealer + ?Sized>(
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
    tx.renew_child(
        &renewed.supi,
        renewed.expires_at,
        &renewed.restrictions,
        ctx.now,
    )?;
    tx.enqueue_sync(&renewed.supi, ctx.now)?;
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
        // Parent before child, the order of every batch: the revocation moves the parent's
        // live-children counter (PostgreSQL would otherwise see a lock-order deadlock).
        tx.lock_parent(&child.parent)?;
        let changed = tx.revoke_child(supi, now)?;
        if changed {
            tx.enqueue_sync(supi, now)?;
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
                tx.enqueue_sync(&child.supi, now)?;
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

/// The key material of `supi` with its stored SQN_HE, reserving nothing: for sending an
/// unanswered vector again ([`crate::aka_guard`]), whose SQN was reserved by [`aka_vector`].
pub fn aka_material<S: Store + ?Sized>(store: &S, supi: &Supi) -> Result<AkaMaterial, StoreError> {
    transact(store, |tx| {
        tx.aka_material(supi)?
            .ok_or_else(|| StoreError::UnknownSupi(supi.clone()))
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

    /// A store in `dir` holding one parent (1,000 children, 1-day lifetime) added at `at`.
    fn store_with_parent(dir: &std::path::Path, at: Timestamp) -> (SqliteStore, Supi) {
        let store = SqliteStore::open(
            &dir.join("cn.db"),
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
                    require_attestation: false,
                },
            },
            "test",
            at,
        )
        .unwrap();
        (store, parent)
    }

    #[test]
    fn parallel_sealing_keeps_items_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let (store, parent) = store_with_parent(dir.path(), Timestamp(1_700_000_000));
        let cfg = IssuerConfig {
            // Exactly the 160 SUPIs the good items need: an item that consumed one and failed
            // would leave the batch short, and it would fail with range exhausted.
            imsi_range: ImsiRange::new("001", "01", 9_000_000_000, 9_000_000_159).unwrap(),
            op: Key128::from_bytes([3; 16]),
            amf: Amf::DEFAULT,
            operator: OperatorPolicy {
                max_lifetime_s: 86_400,
                ..OperatorPolicy::default()
            },
            max_batch_items: 256,
        };
        // Items 10, 20, ... fail their encapsulation (a bad key: before any allocation), items
        // 5, 15, ... their seal (after the SUPI was allocated in the item's savepoint); the
        // others get a blob naming their own item and SUPI.
        struct TwoStep;
        impl Sealer for TwoStep {
            type Encapsulated = Vec<u8>;
            fn encapsulate(
                &self,
                recipient: &[u8],
                device_id: &DeviceId,
                _: &RequestId,
            ) -> Result<Vec<u8>, SealError> {
                if recipient.ends_with(b"0") {
                    return Err(SealError(format!("bad key of {}", device_id.as_str())));
                }
                Ok(recipient.to_vec())
            }
            fn seal(
                &self,
                recipient: Vec<u8>,
                child: &ChildCredential,
                _: &SubscriberKeys,
            ) -> Result<Vec<u8>, SealError> {
                if recipient.ends_with(b"5") {
                    return Err(SealError(format!("refused {}", child.device_id.as_str())));
                }
                let mut out = recipient;
                out.extend_from_slice(child.supi.as_str().as_bytes());
                Ok(out)
            }
        }
        let items = |range: std::ops::RangeInclusive<u8>| -> Vec<BatchItem> {
            range
                .map(|i| {
                    BatchItem::Provision(ProvisionItem {
                        attestation: Default::default(),
                        device_id: DeviceId::parse(&format!("dev-{i}")).unwrap(),
                        device_key_fingerprint: KeyFingerprint([i; 32]),
                        device_spki: vec![0x30, i],
                        request_id: RequestId([i; 16]),
                        recipient: format!("pk-{i}").into_bytes(),
                        params: RequestedParams::default(),
                    })
                })
                .collect()
        };
        let batch = Batch {
            parent: parent.clone(),
            actor: "test".into(),
            now: Timestamp(1_700_000_000),
            items: items(1..=200),
        };
        let out = issue_batch(&store, &cfg, &batch, &TwoStep).unwrap();
        assert_eq!(out.len(), 200);
        let mut msins = Vec::new();
        for (i, o) in (1..=200u32).zip(&out) {
            match o {
                ItemOutcome::Issued { child, sealed } => {
                    assert_ne!(i % 5, 0);
                    assert_eq!(child.device_id.as_str(), format!("dev-{i}"));
                    let want = format!("pk-{i}{}", child.supi.as_str());
                    assert_eq!(sealed.as_slice(), want.as_bytes());
                    msins.push(child.supi.as_str()[10..].parse::<u64>().unwrap());
                }
                ItemOutcome::Invalid(Invalid::Seal(m)) if i % 10 == 0 => {
                    assert_eq!(m, &format!("bad key of dev-{i}"));
                }
                ItemOutcome::Invalid(Invalid::Seal(m)) if i % 10 == 5 => {
                    assert_eq!(m, &format!("refused dev-{i}"));
                }
                other => panic!("item {i}: {other:?}"),
            }
        }
        // Every SUPI of the range is taken exactly once (in random order): the items that
        // failed, before or after their allocation, consumed nothing.
        msins.sort_unstable();
        let want: Vec<u64> = (0..160).map(|n| 9_000_000_000 + n).collect();
        assert_eq!(msins, want);
        assert_eq!(store.children_of(&parent).unwrap().len(), 160);
        // The range is full: the next credential cannot be issued.
        let next = Batch {
            items: items(201..=201),
            ..batch
        };
        assert!(matches!(
            issue_batch(&store, &cfg, &next, &TwoStep),
            Err(StoreError::ImsiRangeExhausted(_))
        ));
    }

    #[test]
    fn allocation_cap_answers_rate_limited_and_frees_with_time() {
        let dir = tempfile::tempdir().unwrap();
        let (store, parent) = store_with_parent(dir.path(), Timestamp(0));
        let cfg = IssuerConfig {
            imsi_range: ImsiRange::new("001", "01", 9_000_000_000, 9_000_999_999).unwrap(),
            op: Key128::from_bytes([3; 16]),
            amf: Amf::DEFAULT,
            operator: OperatorPolicy {
                max_lifetime_s: 86_400,
                allocation_cap: crate::policy::AllocationCap {
                    max: 5,
                    window_s: 100,
                },
            },
            max_batch_items: 256,
        };
        // Fails to seal for recipient "bad": such items must not use the cap either.
        let sealer = |recipient: &[u8], child: &ChildCredential, _: &SubscriberKeys| {
            if recipient == b"bad" {
                return Err(SealError("bad".into()));
            }
            Ok(child.supi.as_str().as_bytes().to_vec())
        };
        let item = |n: u32, recipient: &[u8]| {
            BatchItem::Provision(ProvisionItem {
                attestation: Default::default(),
                device_id: DeviceId::parse(&format!("dev-{n}")).unwrap(),
                device_key_fingerprint: KeyFingerprint([1; 32]),
                device_spki: vec![0x30, 1],
                request_id: RequestId([n as u8; 16]),
                recipient: recipient.to_vec(),
                params: RequestedParams::default(),
            })
        };
        let run = |now: i64, items: Vec<BatchItem>| {
            let b = Batch {
                parent: parent.clone(),
                actor: "test".into(),
                now: Timestamp(now),
                items,
            };
            issue_batch(&store, &cfg, &b, &sealer).unwrap()
        };
        // t=1000: two bad seals among seven items: the five good ones use the cap exactly.
        let mut first: Vec<BatchItem> = (0..5).map(|n| item(n, b"pk")).collect();
        first.insert(2, item(50, b"bad"));
        first.insert(4, item(51, b"bad"));
        let out = run(1000, first);
        let issued = out
            .iter()
            .filter(|o| matches!(o, ItemOutcome::Issued { .. }))
            .count();
        assert_eq!(issued, 5, "{out:?}");
        // t=1040: over the cap; the retry time is when the window (100 s) frees a slot.
        let out = run(1040, vec![item(6, b"pk"), item(7, b"pk")]);
        for o in &out {
            assert_eq!(
                o,
                &ItemOutcome::RateLimited {
                    limit: 5,
                    window_s: 100,
                    retry_after_s: 60
                }
            );
        }
        // A retry of an issued request is still answered (no allocation).
        assert!(matches!(
            run(1040, vec![item(0, b"pk")])[0],
            ItemOutcome::AlreadyIssued { .. }
        ));
        // t=1100: the first five left the window.
        assert!(matches!(
            run(1100, vec![item(6, b"pk")])[0],
            ItemOutcome::Issued { .. }
        ));
        assert_eq!(store.children_of(&parent).unwrap().len(), 6);
    }
}
