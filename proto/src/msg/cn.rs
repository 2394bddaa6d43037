//! Bodies of the gateway ↔ CN conversation: AKA, batches, revocation
//! and the listing of children.

use minicbor::{Decode, Encode};

pub use crate::attestation::AttestationChain;
pub use crate::binding::KeyBinding;
use crate::codec::open_enum;
use crate::ids::{DeviceId, RequestId, Supi};

use super::*;

/// `AuthStart` (0x10), gateway → CN, and `AttachRequest` (0x30), device → CN.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
#[cbor(map)]
pub struct AuthStart {
    /// The client's SUPI: the companion's own, or the provisioned child's when attaching.
    #[n(0)]
    pub supi: Supi,
    /// The serving network name the client (USIM) computes RES* with.
    #[n(1)]
    pub serving_network_name: String,
}

/// `AuthChallenge` (0x11) and `AttachChallenge` (0x31), CN → client.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
#[cbor(map)]
pub struct Challenge {
    /// RAND.
    #[cbor(n(0), with = "crate::codec::fixed")]
    pub rand: [u8; 16],
    /// AUTN = (SQN ⊕ AK) ‖ AMF ‖ MAC-A.
    #[cbor(n(1), with = "crate::codec::fixed")]
    pub autn: [u8; 16],
}

/// `AuthResponse` (0x12) and `AttachResponse` (0x32), client → CN.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
#[cbor(map)]
pub struct ChallengeResponse {
    /// RES* (TS 33.501 A.4).
    #[cbor(n(0), with = "crate::codec::fixed")]
    pub res_star: [u8; 16],
    /// Session binding: KDF(CK‖IK, FC=0xF0, label, TLS exporter).
    #[cbor(n(1), with = "crate::codec::fixed")]
    pub binding: [u8; 32],
}

/// `AuthResync` (0x13) and `AttachResync` (0x33), client → CN.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
#[cbor(map)]
pub struct Resync {
    /// AUTS = (SQN_MS ⊕ AK*) ‖ MAC-S.
    #[cbor(n(0), with = "crate::codec::fixed")]
    pub auts: [u8; 14],
}

/// `AuthResult` (0x14), CN → gateway: the session is authenticated; policy summary.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
#[cbor(map)]
pub struct AuthResult {
    /// Most child credentials the subscription may hold.
    #[n(0)]
    pub max_children: u64,
    /// Child credentials currently active.
    #[n(1)]
    pub active_children: u64,
    /// Longest lifetime the CN grants, seconds.
    #[n(2)]
    pub max_lifetime_s: u64,
    /// Whether children may roam.
    #[n(3)]
    pub roaming_allowed: bool,
    /// Most items the CN accepts in one `BatchProvision`.
    #[n(4)]
    pub max_batch_items: u64,
    /// DNNs children may use, if restricted.
    #[n(5)]
    pub dnns: Option<Vec<String>>,
}

open_enum! {
    /// Kind of a batch item.
    pub enum ItemKind {
        /// A first credential for a device.
        Provision = 0,
        /// Replace the credential `supi`.
        Renew = 1,
    }
}

/// One item of a `BatchProvision`.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
#[cbor(map)]
pub struct BatchItem {
    /// Provision or renew.
    #[n(0)]
    pub kind: ItemKind,
    /// The device's request id (idempotency key at the CN).
    #[n(1)]
    pub request_id: RequestId,
    /// The device.
    #[n(2)]
    pub device_id: DeviceId,
    /// SHA-256 of the device's TLS SubjectPublicKeyInfo (DER), as paired.
    #[cbor(n(3), with = "crate::codec::fixed")]
    pub device_key_fingerprint: [u8; 32],
    /// The key to seal the bundle to.
    #[cbor(n(4), with = "crate::codec::fixed")]
    pub hpke_public_key: [u8; 32],
    /// Requested parameters.
    #[n(5)]
    pub params: Params,
    /// For `Renew`: the credential being replaced.
    #[n(6)]
    pub supi: Option<Supi>,
    /// The device's SubjectPublicKeyInfo (DER), as paired; SHA-256 of it is
    /// `device_key_fingerprint`.
    #[cbor(n(7), with = "minicbor::bytes")]
    pub device_spki: Vec<u8>,
    /// The device's key-binding signature over this item (`binding::binding_message`).
    #[n(8)]
    pub binding: KeyBinding,
    /// The device's manufacturer certificate chain (§4.5), when its TLS client certificate is
    /// not self-issued: the CN checks that it certifies `device_spki` for `device_id`.
    #[n(9)]
    pub attestation: Option<AttestationChain>,
}

/// `BatchProvision` (0x20), gateway → CN.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
#[cbor(map)]
pub struct BatchProvision {
    /// Gateway-chosen batch number, echoed in the result.
    #[n(0)]
    pub batch_id: u64,
    /// The items (at most `AuthResult.max_batch_items`).
    #[n(1)]
    pub items: Vec<BatchItem>,
}

open_enum! {
    /// Outcome of one batch item.
    pub enum Outcome {
        /// Issued: `supi`, `expires_at` and `sealed` are present.
        Issued = 0,
        /// The parent's quota is used up.
        QuotaExhausted = 1,
        /// Policy forbids the requested parameters.
        PolicyDenied = 2,
        /// The item is invalid (bad key, unknown kind, missing SUPI for renew...).
        Invalid = 3,
        /// Renew of a SUPI that is not a child of this parent.
        NotFound = 4,
        /// Temporary failure: send the item again in a later batch.
        RetryLater = 5,
        /// Renew of a credential that has already expired: provision a new one.
        CredentialExpired = 6,
        /// Renew of a credential that was revoked (or whose parent was).
        CredentialRevoked = 7,
    }
}

/// One item of a `BatchResult`.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
#[cbor(map)]
pub struct ItemResult {
    /// The item's request id.
    #[n(0)]
    pub request_id: RequestId,
    /// What happened.
    #[n(1)]
    pub outcome: Outcome,
    /// Issued SUPI.
    #[n(2)]
    pub supi: Option<Supi>,
    /// Issued credential's expiry, Unix seconds.
    #[n(3)]
    pub expires_at: Option<u64>,
    /// The sealed bundle.
    #[n(4)]
    pub sealed: Option<Sealed>,
    /// Why not issued, for logs.
    #[n(5)]
    pub reason: Option<String>,
    /// `retry_later`: when the item may succeed, in milliseconds (absent: the gateway's own
    /// backoff).
    #[n(6)]
    pub retry_after_ms: Option<u64>,
}

/// `BatchResult` (0x21), CN → gateway.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
#[cbor(map)]
pub struct BatchResult {
    /// Echo of `BatchProvision.batch_id`.
    #[n(0)]
    pub batch_id: u64,
    /// One result per item, in any order.
    #[n(1)]
    pub items: Vec<ItemResult>,
}

/// `Revoke` (0x22), gateway → CN: exactly one of `supi` and `device_id`.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
#[cbor(map)]
pub struct Revoke {
    /// Revoke this child credential.
    #[n(0)]
    pub supi: Option<Supi>,
    /// Revoke every child credential issued for this device.
    #[n(1)]
    pub device_id: Option<DeviceId>,
}

/// `RevokeResult` (0x23), CN → gateway.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
#[cbor(map)]
pub struct RevokeResult {
    /// The SUPIs revoked (empty if none matched).
    #[n(0)]
    pub revoked: Vec<Supi>,
}

/// `ListChildren` (0x24), gateway → CN. Empty map.
#[derive(Debug, Clone, Default, PartialEq, Eq, Encode, Decode)]
#[cbor(map)]
pub struct ListChildren {}

open_enum! {
    /// State of a child credential.
    pub enum ChildState {
        /// Usable.
        Active = 0,
        /// Revoked.
        Revoked = 1,
        /// Past its expiry.
        Expired = 2,
    }
}

/// One entry of a `ChildList`.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
#[cbor(map)]
pub struct Child {
    /// The child's SUPI.
    #[n(0)]
    pub supi: Supi,
    /// The device it was issued to.
    #[n(1)]
    pub device_id: DeviceId,
    /// Issue time, Unix seconds.
    #[n(2)]
    pub issued_at: u64,
    /// Expiry, Unix seconds.
    #[n(3)]
    pub expires_at: u64,
    /// Current state.
    #[n(4)]
    pub state: ChildState,
}

/// `ChildList` (0x25), CN → gateway.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
#[cbor(map)]
pub struct ChildList {
    /// The parent's children.
    #[n(0)]
    pub children: Vec<Child>,
}
