//! The operations of a gateway session, for its parent only: a batch (items converted and
//! checked: key binding, attestation against the manufacturer roots; then one transaction), a
//! revocation, and the list of the parent's children.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Instant;

use companion_proto::cn::ServerRequest;
use companion_proto::msg::{
    BatchProvision, BatchResult, Child, ChildList, ChildState, ErrorCode, ErrorMsg, ItemKind,
    ItemResult, Outcome, Revoke, RevokeResult,
};
use tracing::{debug, warn};

use crate::model::{ChildCredential, DeviceId, Dnn, KeyFingerprint, RequestId, Supi};
use crate::ops::{self, Batch, BatchItem, ItemOutcome, ProvisionItem, RenewItem};
use crate::policy::{Attestation, Denial, RequestedParams};
use crate::service::{Service, sealed_to_wire};
use crate::store::{Store, StoreError};

use super::{blocking, internal, now_ts};

pub(super) fn convert_params(p: &companion_proto::msg::Params) -> Result<RequestedParams, String> {
    let dnns = p
        .dnns
        .iter()
        .flatten()
        .map(|d| Dnn::parse(d).map_err(|e| e.to_string()))
        .collect::<Result<Vec<_>, _>>()?;
    let max_bitrate_kbps = p
        .max_bitrate_kbps
        .map(|b| u32::try_from(b).unwrap_or(u32::MAX));
    Ok(RequestedParams {
        lifetime_s: p.lifetime_s,
        roaming: p.roaming,
        dnns,
        max_bitrate_kbps,
    })
}

pub(super) fn item_result(
    request_id: companion_proto::RequestId,
    outcome: Outcome,
    reason: impl Into<String>,
) -> ItemResult {
    ItemResult {
        request_id,
        outcome,
        supi: None,
        expires_at: None,
        sealed: None,
        reason: Some(reason.into()),
        retry_after_ms: None,
    }
}

pub(super) fn issued(
    request_id: companion_proto::RequestId,
    child: &ChildCredential,
    sealed: &[u8],
) -> ItemResult {
    match (
        companion_proto::Supi::new(child.supi.as_str()),
        sealed_to_wire(sealed),
    ) {
        (Ok(supi), Some(sealed)) => ItemResult {
            request_id,
            outcome: Outcome::Issued,
            supi: Some(supi),
            expires_at: Some(u64::try_from(child.expires_at.as_secs()).unwrap_or(0)),
            sealed: Some(sealed),
            reason: None,
            retry_after_ms: None,
        },
        _ => item_result(
            request_id,
            Outcome::RetryLater,
            "stored credential unreadable",
        ),
    }
}

/// Checks one item's key binding: the SPKI is the fingerprinted one, and the signature over
/// (kind, request ID, device ID, HPKE key) verifies under it. `Err` is the reason sent back with
/// outcome `invalid`.
pub(super) fn check_binding(it: &companion_proto::msg::BatchItem) -> Result<(), String> {
    use companion_proto::binding::{BindingOp, binding_message};
    if companion_transport::spki_fingerprint(&it.device_spki) != it.device_key_fingerprint {
        return Err("device_spki does not match device_key_fingerprint".into());
    }
    let op = match it.kind {
        ItemKind::Provision => BindingOp::Provision,
        ItemKind::Renew => BindingOp::Renew,
        // Refused below with its own reason.
        ItemKind::Unknown(_) => return Ok(()),
    };
    let msg = binding_message(op, &it.request_id, &it.device_id, &it.hpke_public_key);
    companion_transport::verify_binding(&it.device_spki, &msg, &it.binding)
        .map_err(|e| format!("key binding refused: {e}"))
}

/// Checks one item's manufacturer attestation (PROTOCOL.md §4.5), if it carries a chain: it must
/// certify the item's (binding-checked) device key for its device ID under an installed root.
pub(super) fn check_attestation(
    it: &companion_proto::msg::BatchItem,
    roots: &companion_transport::ManufacturerRoots,
) -> Attestation {
    let Some(chain) = &it.attestation else {
        return Attestation::Absent;
    };
    match companion_transport::verify_attestation(
        chain.certs(),
        &it.device_spki,
        it.device_id.as_str(),
        roots,
        companion_transport::attestation::UnixTime::now(),
    ) {
        Ok(root) => Attestation::Verified { root },
        Err(e) => Attestation::Failed(e.to_string()),
    }
}

/// The installed manufacturer roots; a stored root that is no longer a usable trust anchor is
/// skipped with a warning (it cannot attest anything).
pub(super) fn load_roots(
    store: &dyn Store,
) -> Result<companion_transport::ManufacturerRoots, StoreError> {
    let mut roots = companion_transport::ManufacturerRoots::default();
    for r in store.manufacturer_roots()? {
        if let Err(e) = roots.add(&r.name, &r.cert_der) {
            warn!(root = %r.name, "manufacturer root skipped: {e}");
        }
    }
    Ok(roots)
}

/// One item's key-binding verdict (`Err`: the reason it is refused) and attestation.
pub(super) type ItemCheck = (Result<(), String>, Attestation);

/// [`check_binding`], then (for a bound item) [`check_attestation`], for every item, in order,
/// split across the available cores (an ECDSA verification costs about as much as the HPKE seal
/// of the same item). The roots are read only when some item carries a chain.
pub(super) fn check_items(
    store: &dyn Store,
    items: &[companion_proto::msg::BatchItem],
) -> Result<Vec<ItemCheck>, StoreError> {
    let roots = if items.iter().any(|it| it.attestation.is_some()) {
        load_roots(store)?
    } else {
        companion_transport::ManufacturerRoots::default()
    };
    Ok(crate::parallel::map_in_order(
        items,
        16,
        "cn-binding",
        |it| {
            let bound = check_binding(it);
            let attested = if bound.is_ok() {
                check_attestation(it, &roots)
            } else {
                Attestation::Absent
            };
            (bound, attested)
        },
        || (Err("key binding check failed".into()), Attestation::Absent),
    ))
}

pub(super) async fn batch(
    svc: &Arc<Service>,
    req: &mut ServerRequest,
    b: BatchProvision,
    parent: &Supi,
) -> Result<(), ErrorMsg> {
    if svc.is_shutting_down() {
        return Err(ErrorMsg::retry_after(
            ErrorCode::Busy,
            "shutting down; retry on another session",
            1000,
        ));
    }
    svc.metrics.batch_size.observe(b.items.len() as f64);
    // Key binding (PROTOCOL.md §4.4): each item's signature must verify under the device key it
    // carries, and that key must be the one fingerprinted. Signature checks cost tens of
    // microseconds each, so a whole batch is checked on the blocking pool.
    let st = svc.store.clone();
    let (b, checked) = blocking(move || {
        let checked = check_items(&*st, &b.items)?;
        Ok((b, checked))
    })
    .await
    .map_err(|e| internal(&e))?;
    // Items the CN can judge without the store get their answer here; the rest go to one
    // transaction. `slots[i]` is the wire request id of item i and its answer if already known.
    let mut answers: Vec<Option<ItemResult>> = Vec::with_capacity(b.items.len());
    let mut items = Vec::new();
    let mut index = Vec::new();
    // A renewal's HPKE key is fresh per request (PROTOCOL.md §4.1): one key, one renewal.
    let mut renew_keys: HashSet<[u8; 32]> = HashSet::new();
    let refused = checked.iter().filter(|(b, _)| b.is_err()).count();
    if refused > 0 {
        // Once per batch: a gateway that substitutes keys is authenticated, and this names it.
        warn!(
            parent = %parent,
            refused,
            items = b.items.len(),
            "batch items refused: their key binding does not verify (a gateway substituting \
             HPKE or device keys, or replaying signatures)"
        );
    }
    for ((i, it), (bound, attestation)) in b.items.iter().enumerate().zip(checked) {
        let rid = it.request_id;
        if let Err(why) = bound {
            svc.metrics.binding_refused.inc();
            answers.push(Some(item_result(rid, Outcome::Invalid, why)));
            continue;
        }
        svc.metrics
            .attestation
            .with_label_values(&[match &attestation {
                Attestation::Verified { .. } => "verified",
                Attestation::Absent => "absent",
                Attestation::Failed(why) => {
                    debug!(device = %it.device_id, "attestation does not verify: {why}");
                    "failed"
                }
            }])
            .inc();
        let Ok(device_id) = DeviceId::parse(it.device_id.as_str()) else {
            answers.push(Some(item_result(rid, Outcome::Invalid, "bad device id")));
            continue;
        };
        let params = match convert_params(&it.params) {
            Ok(p) => p,
            Err(e) => {
                answers.push(Some(item_result(rid, Outcome::Invalid, e)));
                continue;
            }
        };
        let model_rid = RequestId(*rid.as_bytes());
        let item = match it.kind {
            ItemKind::Provision => BatchItem::Provision(ProvisionItem {
                device_id,
                device_key_fingerprint: KeyFingerprint(it.device_key_fingerprint),
                device_spki: it.device_spki.clone(),
                request_id: model_rid,
                recipient: it.hpke_public_key.to_vec(),
                params,
                attestation,
            }),
            ItemKind::Renew => {
                let Some(Ok(child)) = it.supi.as_ref().map(|s| Supi::parse(s.as_str())) else {
                    answers.push(Some(item_result(
                        rid,
                        Outcome::Invalid,
                        "renew needs the SUPI being renewed",
                    )));
                    continue;
                };
                if !renew_keys.insert(it.hpke_public_key) {
                    answers.push(Some(item_result(
                        rid,
                        Outcome::Invalid,
                        "HPKE key reused within the batch",
                    )));
                    continue;
                }
                BatchItem::Renew(RenewItem {
                    child,
                    device_id,
                    device_spki: it.device_spki.clone(),
                    request_id: model_rid,
                    recipient: it.hpke_public_key.to_vec(),
                    lifetime_s: params.lifetime_s,
                    attestation,
                })
            }
            ItemKind::Unknown(k) => {
                answers.push(Some(item_result(
                    rid,
                    Outcome::Invalid,
                    format!("unknown item kind {k}"),
                )));
                continue;
            }
        };
        answers.push(None);
        index.push(i);
        items.push(item);
    }
    if !items.is_empty() {
        let batch = Batch {
            parent: parent.clone(),
            actor: format!("gateway:{parent}"),
            now: now_ts(),
            items,
        };
        let st = svc.store.clone();
        let svc2 = svc.clone();
        let started = Instant::now();
        let outcomes =
            blocking(move || ops::issue_batch(&*st, &svc2.issuer, &batch, &svc2.sealer())).await;
        svc.metrics
            .commit_seconds
            .observe(started.elapsed().as_secs_f64());
        let outcomes = match outcomes {
            Ok(o) => o,
            Err(StoreError::ParentNotFound(_)) => {
                return Err(ErrorMsg::new(
                    ErrorCode::UnknownSubscriber,
                    "the subscription no longer exists",
                ));
            }
            Err(StoreError::ImsiRangeExhausted(r)) => {
                warn!("IMSI range {r} exhausted: extend imsi_count in cn-backend.toml");
                return Err(ErrorMsg::new(
                    ErrorCode::Internal,
                    "the operator's IMSI range is exhausted",
                ));
            }
            Err(e) => {
                warn!("batch transaction failed, nothing committed: {e}");
                return Err(internal(&e));
            }
        };
        if let Some(ItemOutcome::ParentInactive(s)) = outcomes.first() {
            return Err(ErrorMsg::new(
                ErrorCode::SubscriptionSuspended,
                format!("subscription is {s}"),
            ));
        }
        let mut rate_limited = false;
        for (o, i) in outcomes.iter().zip(index) {
            let rid = b.items[i].request_id;
            let r = match o {
                ItemOutcome::Issued { child, sealed } => {
                    svc.metrics.issued.inc();
                    issued(rid, child, sealed)
                }
                ItemOutcome::Renewed { child, sealed } => {
                    svc.metrics.renewed.inc();
                    issued(rid, child, sealed)
                }
                ItemOutcome::AlreadyIssued { child, sealed, .. } => {
                    svc.metrics.replayed.inc();
                    issued(rid, child, sealed)
                }
                ItemOutcome::QuotaExhausted { limit } => {
                    svc.metrics.quota_rejections.inc();
                    item_result(
                        rid,
                        Outcome::QuotaExhausted,
                        format!("quota of {limit} active credentials used up"),
                    )
                }
                ItemOutcome::RateLimited {
                    limit,
                    window_s,
                    retry_after_s,
                } => {
                    svc.metrics.allocation_rate_limited.inc();
                    rate_limited = true;
                    ItemResult {
                        retry_after_ms: Some(retry_after_s.saturating_mul(1000)),
                        ..item_result(
                            rid,
                            Outcome::RetryLater,
                            format!(
                                "{limit} new credentials within {window_s} s: the operator's \
                                 cap; retry in {retry_after_s} s"
                            ),
                        )
                    }
                }
                ItemOutcome::PolicyDenied(Denial::Expired(at)) => item_result(
                    rid,
                    Outcome::CredentialExpired,
                    format!("credential expired at {at}; provision a new one"),
                ),
                ItemOutcome::PolicyDenied(Denial::Revoked) => {
                    item_result(rid, Outcome::CredentialRevoked, "credential is revoked")
                }
                ItemOutcome::PolicyDenied(d) => {
                    svc.metrics.policy_rejections.inc();
                    item_result(rid, Outcome::PolicyDenied, d.to_string())
                }
                ItemOutcome::ParentInactive(s) => {
                    svc.metrics.policy_rejections.inc();
                    item_result(rid, Outcome::PolicyDenied, format!("subscription is {s}"))
                }
                ItemOutcome::Invalid(e) => {
                    svc.metrics.invalid_items.inc();
                    item_result(rid, Outcome::Invalid, e.to_string())
                }
                ItemOutcome::NotFound => item_result(
                    rid,
                    Outcome::NotFound,
                    "not a credential of this subscription",
                ),
            };
            if let Some(slot) = answers.get_mut(i) {
                *slot = Some(r);
            }
        }
        if rate_limited {
            warn!(
                %parent,
                limit = svc.issuer.operator.allocation_cap.max,
                window_s = svc.issuer.operator.allocation_cap.window_s,
                "new credentials refused: the parent reached the allocation cap"
            );
        }
    }
    let items: Vec<ItemResult> = answers.into_iter().flatten().collect();
    req.respond_batch(BatchResult {
        batch_id: b.batch_id,
        items,
    })
    .map_err(|_| ErrorMsg::new(ErrorCode::Internal, "internal error"))
}

pub(super) async fn revoke(
    svc: &Arc<Service>,
    req: &mut ServerRequest,
    r: Revoke,
    parent: &Supi,
) -> Result<(), ErrorMsg> {
    let st = svc.store.clone();
    let p = parent.clone();
    let actor = format!("gateway:{parent}");
    let revoked = blocking(move || {
        let now = now_ts();
        let targets: Vec<Supi> = match (&r.supi, &r.device_id) {
            (Some(s), _) => match Supi::parse(s.as_str()) {
                Ok(s) => st
                    .child(&s)?
                    .filter(|c| c.parent == p)
                    .map(|c| vec![c.supi])
                    .unwrap_or_default(),
                Err(_) => Vec::new(),
            },
            (None, Some(d)) => st
                .children_of(&p)?
                .into_iter()
                .filter(|c| c.device_id.as_str() == d.as_str())
                .map(|c| c.supi)
                .collect(),
            (None, None) => Vec::new(),
        };
        let mut out = Vec::new();
        for t in targets {
            if ops::revoke_child(&*st, &t, &actor, now)? {
                out.push(t);
            }
        }
        Ok(out)
    })
    .await
    .map_err(|e| internal(&e))?;
    svc.metrics.revoked.inc_by(revoked.len() as u64);
    let revoked = revoked
        .iter()
        .filter_map(|s| companion_proto::Supi::new(s.as_str()).ok())
        .collect();
    req.respond_revoke(RevokeResult { revoked })
        .map_err(|_| ErrorMsg::new(ErrorCode::Internal, "internal error"))
}

pub(super) async fn list(
    svc: &Arc<Service>,
    req: &mut ServerRequest,
    parent: &Supi,
) -> Result<(), ErrorMsg> {
    let st = svc.store.clone();
    let p = parent.clone();
    let children = blocking(move || st.children_of(&p))
        .await
        .map_err(|e| internal(&e))?;
    let now = now_ts();
    let children = children
        .iter()
        .filter_map(|c| {
            Some(Child {
                supi: companion_proto::Supi::new(c.supi.as_str()).ok()?,
                device_id: companion_proto::DeviceId::new(c.device_id.as_str()).ok()?,
                issued_at: u64::try_from(c.issued_at.as_secs()).ok()?,
                expires_at: u64::try_from(c.expires_at.as_secs()).ok()?,
                state: match crate::admin::child_state(c, now) {
                    "revoked" => ChildState::Revoked,
                    "expired" => ChildState::Expired,
                    _ => ChildState::Active,
                },
            })
        })
        .collect();
    req.respond_children(ChildList { children })
        .map_err(|_| ErrorMsg::new(ErrorCode::Internal, "internal error"))
}
