//! The operations of the service, written once over any [`Store`](crate::store::Store): batch
//! issuance, lifecycle changes, AKA support and subscriber administration. Each runs in one
//! write transaction and appends its audit entries in that same transaction.
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
//! only then, item by item in the batch transaction, given their SUPI, sealed and written: an
//! item whose encapsulation fails never allocates, and one whose seal fails has written nothing
//! yet (an allocation is only a choice until the child row takes it). Nothing is consumed for an
//! item that is not issued, no savepoint is needed per item, and the expensive half still runs in
//! parallel. The outcomes are exactly those of deciding and committing the items one after
//! another: a renewal, a repeated request ID, or a quota or rate refusal that could depend on the
//! credentials still pending first seals and writes those.
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
//!
//! # Modules
//! `batch` holds batch issuance, `lifecycle` the changes to subscriptions and credentials,
//! `aka` the SQN and failure counter; this module holds the types a batch is made of and
//! answered with, and the [`Sealer`] the server plugs HPKE into.

mod aka;
mod batch;
mod lifecycle;

pub use aka::{aka_material, aka_vector, apply_resync, clear_aka_failures, record_aka_failure};
pub use batch::issue_batch;
pub use lifecycle::{StatusChange, add_parent, revoke_child, set_parent_policy, set_parent_status};

use companion_crypto::secret::Key128;
use thiserror::Error;

use crate::model::{
    Amf, ChildCredential, DeviceId, ImsiRange, KeyFingerprint, RequestId, SubscriberKeys,
    SubscriptionStatus, Supi, Timestamp,
};
use crate::policy::{Attestation, Denial, Invalid, OperatorPolicy, Refusal, RequestedParams};
use crate::store::IssuanceKind;

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

    /// Seals `child` with its `keys`. Runs in item order, after the SUPI is allocated and before
    /// anything of the item is written; after an error nothing is, and the SUPI stays free.
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

#[cfg(test)]
mod tests;
