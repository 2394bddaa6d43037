//! Subscription policy (seed step 5, Notes 1–3) as pure functions.
//!
//! Nothing here touches storage or clocks: the store reads the parent, counts its children and
//! passes `now`; these functions decide. That keeps the rules unit-testable and identical for every
//! storage engine.
//!
//! - Lifetime (Note 1): `min(requested, parent policy, operator maximum)`.
//! - Quota (Note 2): active, unexpired, unrevoked children of a parent `< max_children`.
//! - Restrictions (Note 3): narrowed, never widened, relative to the parent: roaming only if the
//!   parent allows it (a request for roaming is silently narrowed), DNNs are the intersection
//!   (explicitly requesting a DNN the parent does not allow is refused), bitrate is the minimum.
//! - Idempotency: (parent, device ID, request ID) identifies a request; a retry returns the stored
//!   answer.
//! - Renewal keeps SUPI, K and OPc, sets `expires_at = now + lifetime` (same lifetime rule) and
//!   re-narrows the restrictions against the parent's *current* policy; only an active, unexpired
//!   credential can be renewed.

use thiserror::Error;

use crate::model::{
    ChildCredential, ChildStatus, DeviceId, Dnn, Parent, ParentPolicy, RequestId, Restrictions,
    SubscriptionStatus, Supi, Timestamp, canonical_dnns,
};

/// Operator-wide limits that apply on top of every subscription's own policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OperatorPolicy {
    /// Longest lifetime of any child credential, in seconds.
    pub max_lifetime_s: u64,
    /// Cap on new child SUPIs per parent per unit of time.
    pub allocation_cap: AllocationCap,
}

impl Default for OperatorPolicy {
    fn default() -> Self {
        Self {
            max_lifetime_s: 90 * 24 * 3600,
            allocation_cap: AllocationCap::default(),
        }
    }
}

/// At most `max` new child credentials (each a SUPI taken from the operator's range) per parent
/// within any `window_s` seconds. The quota bounds a parent's *live* credentials; this bounds
/// how fast it can churn through the range by revoking (or letting expire) and issuing again.
/// Renewals keep their SUPI and do not count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AllocationCap {
    /// New credentials allowed per window (at least 1).
    pub max: u32,
    /// The sliding window, in seconds (at least 1).
    pub window_s: u64,
}

/// Default [`AllocationCap::max`]: far above a household's devices, and above the project's own
/// largest provisioning runs (8,000 devices through one companion).
pub const DEFAULT_ALLOCATION_MAX: u32 = 10_000;
/// Default [`AllocationCap::window_s`]: one hour.
pub const DEFAULT_ALLOCATION_WINDOW_S: u64 = 3600;

impl Default for AllocationCap {
    fn default() -> Self {
        Self {
            max: DEFAULT_ALLOCATION_MAX,
            window_s: DEFAULT_ALLOCATION_WINDOW_S,
        }
    }
}

/// Control parameters a companion sends with a provisioning request (seed step 4). `None` and
/// empty mean "as much as the parent allows".
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RequestedParams {
    /// Requested lifetime in seconds.
    pub lifetime_s: Option<u64>,
    /// Requested roaming permission.
    pub roaming: Option<bool>,
    /// Requested DNNs; empty means all the parent allows.
    pub dnns: Vec<Dnn>,
    /// Requested bitrate cap in kbit/s.
    pub max_bitrate_kbps: Option<u32>,
}

/// Identifies one request for idempotency: a retry with the same key gets the same answer.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct IdempotencyKey {
    /// The companion subscription that asked.
    pub parent: Supi,
    /// The device it asked for.
    pub device_id: DeviceId,
    /// The device-chosen request ID.
    pub request_id: RequestId,
}

/// Why policy refused a request that was well-formed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum Denial {
    /// The request names a DNN the parent does not allow.
    #[error("DNN {0} is not allowed by the parent subscription")]
    DnnNotAllowed(Dnn),
    /// Re-narrowing a credential's DNNs against the parent's current policy leaves none.
    #[error("no DNN of the credential is still allowed by the parent subscription")]
    NoCommonDnn,
    /// The credential to renew has already expired; a new one must be provisioned.
    #[error("credential expired at {0}")]
    Expired(Timestamp),
    /// The credential to renew was revoked.
    #[error("credential is revoked")]
    Revoked,
    /// The parent requires a manufacturer attestation of the device key, and the item has
    /// none that verifies (the reason).
    #[error("the subscription requires a manufacturer attestation of the device key: {0}")]
    NotAttested(String),
}

/// What the wire layer found of an item's manufacturer attestation (PROTOCOL.md §4.5).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Attestation {
    /// The item carries no attestation chain.
    #[default]
    Absent,
    /// The chain certifies the item's device key for its device ID under the named root.
    Verified {
        /// The installed manufacturer root the chain leads to.
        root: String,
    },
    /// The item carries a chain that does not attest its key (why).
    Failed(String),
}

/// A parent with `require_attestation` accepts only items whose attestation verified. Without
/// it the attestation is informational: counted, never a reason to refuse.
pub fn check_attestation(policy: &ParentPolicy, attestation: &Attestation) -> Result<(), Denial> {
    if !policy.require_attestation {
        return Ok(());
    }
    match attestation {
        Attestation::Verified { .. } => Ok(()),
        Attestation::Absent => Err(Denial::NotAttested(
            "the device presented no manufacturer certificate".into(),
        )),
        Attestation::Failed(why) => Err(Denial::NotAttested(why.clone())),
    }
}

/// A request that is malformed in a way syntax checks cannot catch.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum Invalid {
    /// A lifetime of zero seconds was requested.
    #[error("requested lifetime must be at least one second")]
    ZeroLifetime,
    /// A bitrate cap of zero was requested.
    #[error("requested bitrate cap must be at least 1 kbit/s")]
    ZeroBitrate,
    /// The request ID is already used by a different request of this device.
    #[error("request ID already used for a different request")]
    RequestIdReused,
    /// The credential could not be sealed to the device key.
    #[error("sealing failed: {0}")]
    Seal(String),
    /// A renewal (a re-seal of existing K/OPc) not signed by the device key the credential was
    /// issued to, or for another device (PROTOCOL.md §4.4).
    #[error("renewal not signed by the key the credential was issued to")]
    KeyNotBound,
    /// A credential issued before key binding existed: it records no device key, so nothing
    /// can authorise a re-seal of it.
    #[error("credential predates key binding and cannot be renewed; provision a new one")]
    Unbound,
}

/// The outcome of a policy decision that did not grant.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum Refusal {
    /// The parent subscription is suspended or revoked.
    #[error("parent subscription is {0}")]
    ParentInactive(SubscriptionStatus),
    /// The parent already has `limit` active children.
    #[error("quota of {limit} active credentials exhausted")]
    QuotaExhausted {
        /// The parent's `max_children`.
        limit: u32,
    },
    /// The parent reached the operator's cap on new credentials per unit of time.
    #[error(
        "{limit} new credentials within {window_s} s already issued; retry in {retry_after_s} s"
    )]
    RateLimited {
        /// [`AllocationCap::max`].
        limit: u32,
        /// [`AllocationCap::window_s`].
        window_s: u64,
        /// Seconds until the oldest credential of the window leaves it (at least 1).
        retry_after_s: u64,
    },
    /// Policy refused.
    #[error("policy denied: {0}")]
    Denied(#[from] Denial),
    /// Malformed request.
    #[error("invalid request: {0}")]
    Invalid(#[from] Invalid),
}

/// What policy granted: the validity window and the narrowed restrictions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// Granted lifetime in seconds.
    pub lifetime_s: u64,
    /// `now + lifetime_s`.
    pub expires_at: Timestamp,
    /// Narrowed restrictions.
    pub restrictions: Restrictions,
}

/// Note 1: `min(requested, parent, operator)`; a requested zero is invalid.
pub fn grant_lifetime(
    requested: Option<u64>,
    parent_max: u64,
    operator_max: u64,
) -> Result<u64, Invalid> {
    if requested == Some(0) {
        return Err(Invalid::ZeroLifetime);
    }
    let cap = parent_max.min(operator_max).max(1);
    Ok(requested.map_or(cap, |r| r.min(cap)))
}

/// `None` is "no cap".
fn min_cap(a: Option<u32>, b: Option<u32>) -> Option<u32> {
    match (a, b) {
        (Some(x), Some(y)) => Some(x.min(y)),
        (x, None) => x,
        (None, y) => y,
    }
}

/// Intersection of two DNN lists where empty means "any". `None` if both restrict and share none.
pub fn intersect_dnns(a: &[Dnn], b: &[Dnn]) -> Option<Vec<Dnn>> {
    match (a.is_empty(), b.is_empty()) {
        (true, _) => Some(canonical_dnns(b.to_vec())),
        (_, true) => Some(canonical_dnns(a.to_vec())),
        _ => {
            let common: Vec<Dnn> = a.iter().filter(|d| b.contains(d)).cloned().collect();
            if common.is_empty() {
                None
            } else {
                Some(canonical_dnns(common))
            }
        }
    }
}

/// Note 3 for a new credential: narrows the requested parameters to the parent's policy.
pub fn narrow_restrictions(
    parent: &ParentPolicy,
    requested: &RequestedParams,
) -> Result<Restrictions, Refusal> {
    if requested.max_bitrate_kbps == Some(0) {
        return Err(Invalid::ZeroBitrate.into());
    }
    if !parent.allowed_dnns.is_empty()
        && let Some(bad) = requested
            .dnns
            .iter()
            .find(|d| !parent.allowed_dnns.contains(d))
    {
        return Err(Denial::DnnNotAllowed(bad.clone()).into());
    }
    let allowed_dnns =
        intersect_dnns(&parent.allowed_dnns, &requested.dnns).ok_or(Denial::NoCommonDnn)?;
    Ok(Restrictions {
        roaming_allowed: parent.roaming_allowed && requested.roaming.unwrap_or(true),
        allowed_dnns,
        max_bitrate_kbps: min_cap(parent.max_bitrate_kbps, requested.max_bitrate_kbps),
    })
}

/// Re-narrows existing restrictions against a (possibly tightened) parent policy.
pub fn renarrow(current: &Restrictions, parent: &ParentPolicy) -> Result<Restrictions, Denial> {
    Ok(Restrictions {
        roaming_allowed: current.roaming_allowed && parent.roaming_allowed,
        allowed_dnns: intersect_dnns(&current.allowed_dnns, &parent.allowed_dnns)
            .ok_or(Denial::NoCommonDnn)?,
        max_bitrate_kbps: min_cap(current.max_bitrate_kbps, parent.max_bitrate_kbps),
    })
}

/// Note 2: may a parent with `active_children` active children get one more?
pub fn check_quota(active_children: u32, max_children: u32) -> Result<(), Refusal> {
    if active_children >= max_children {
        return Err(Refusal::QuotaExhausted {
            limit: max_children,
        });
    }
    Ok(())
}

/// May a parent that got `recent` new credentials in the window `[now - window_s, now]`, the
/// oldest at `oldest`, get one more? The retry time is when the oldest leaves the window: the
/// earliest moment a slot can free up.
pub fn check_allocation_rate(
    recent: u32,
    oldest: Option<Timestamp>,
    cap: &AllocationCap,
    now: Timestamp,
) -> Result<(), Refusal> {
    if recent < cap.max {
        return Ok(());
    }
    let frees_at = oldest.unwrap_or(now).plus_secs(cap.window_s);
    let retry_after_s = u64::try_from(frees_at.0.saturating_sub(now.0))
        .unwrap_or(0)
        .max(1);
    Err(Refusal::RateLimited {
        limit: cap.max,
        window_s: cap.window_s,
        retry_after_s,
    })
}

/// Start of the allocation window ending at `now`.
pub fn allocation_window_start(cap: &AllocationCap, now: Timestamp) -> Timestamp {
    Timestamp(
        now.0
            .saturating_sub(i64::try_from(cap.window_s).unwrap_or(i64::MAX))
            .saturating_add(1),
    )
}

fn check_parent_active(parent: &Parent) -> Result<(), Refusal> {
    match parent.status {
        SubscriptionStatus::Active => Ok(()),
        other => Err(Refusal::ParentInactive(other)),
    }
}

/// The whole decision for a new child credential.
///
/// Checks run in a fixed order so every engine reports the same reason: parent status, request
/// validity and restrictions, then quota (a request that policy would refuse anyway is reported as
/// refused by policy, not by quota).
pub fn decide_provision(
    parent: &Parent,
    active_children: u32,
    requested: &RequestedParams,
    operator: &OperatorPolicy,
    now: Timestamp,
) -> Result<Grant, Refusal> {
    check_parent_active(parent)?;
    let lifetime_s = grant_lifetime(
        requested.lifetime_s,
        parent.policy.max_lifetime_s,
        operator.max_lifetime_s,
    )?;
    let restrictions = narrow_restrictions(&parent.policy, requested)?;
    check_quota(active_children, parent.policy.max_children)?;
    Ok(Grant {
        lifetime_s,
        expires_at: now.plus_secs(lifetime_s),
        restrictions,
    })
}

/// The whole decision for renewing `child` (which must belong to `parent`).
///
/// Renewal is allowed only before expiry and only while both are active; it does not count
/// against the quota (the credential is already counted).
pub fn decide_renewal(
    parent: &Parent,
    child: &ChildCredential,
    requested_lifetime_s: Option<u64>,
    operator: &OperatorPolicy,
    now: Timestamp,
) -> Result<Grant, Refusal> {
    check_parent_active(parent)?;
    if child.status == ChildStatus::Revoked {
        return Err(Denial::Revoked.into());
    }
    if now >= child.expires_at {
        return Err(Denial::Expired(child.expires_at).into());
    }
    let lifetime_s = grant_lifetime(
        requested_lifetime_s,
        parent.policy.max_lifetime_s,
        operator.max_lifetime_s,
    )?;
    let restrictions = renarrow(&child.restrictions, &parent.policy)?;
    Ok(Grant {
        lifetime_s,
        expires_at: now.plus_secs(lifetime_s),
        restrictions,
    })
}

/// Why a device attach is refused (issue 3, item 4).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum AttachRefusal {
    /// The credential was revoked.
    #[error("credential revoked")]
    Revoked,
    /// The credential expired.
    #[error("credential expired at {0}")]
    Expired(Timestamp),
    /// The parent subscription is not active.
    #[error("parent subscription is {0}")]
    ParentInactive(SubscriptionStatus),
    /// A visited serving network was used and roaming is not allowed.
    #[error("roaming not allowed")]
    RoamingNotAllowed,
}

/// May `child` attach at `now`? `roaming` is true when the serving network is not the home
/// network. On success returns the restrictions the answer must carry.
pub fn check_attach(
    child: &ChildCredential,
    parent_status: SubscriptionStatus,
    now: Timestamp,
    roaming: bool,
) -> Result<&Restrictions, AttachRefusal> {
    if child.status == ChildStatus::Revoked {
        return Err(AttachRefusal::Revoked);
    }
    if parent_status != SubscriptionStatus::Active {
        return Err(AttachRefusal::ParentInactive(parent_status));
    }
    if now >= child.expires_at {
        return Err(AttachRefusal::Expired(child.expires_at));
    }
    if roaming && !child.restrictions.roaming_allowed {
        return Err(AttachRefusal::RoamingNotAllowed);
    }
    Ok(&child.restrictions)
}

#[cfg(test)]
mod tests;
