//! Bodies of the device ↔ gateway conversation: provisioning, renewal, delivery and its
//! acknowledgement.

use minicbor::{Decode, Encode};

pub use crate::binding::KeyBinding;
use crate::ids::{DeviceId, RequestId, Supi};

use super::*;

/// `ProvisionRequest` (0x01), device → gateway.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
#[cbor(map)]
pub struct ProvisionRequest {
    /// Random idempotency key chosen by the device.
    #[n(0)]
    pub request_id: RequestId,
    /// The device's identity (must match its pairing).
    #[n(1)]
    pub device_id: DeviceId,
    /// X25519 public key the credential is sealed to.
    #[cbor(n(2), with = "crate::codec::fixed")]
    pub hpke_public_key: [u8; 32],
    /// Requested parameters (may be empty).
    #[n(3)]
    pub params: Params,
    /// The device's signature binding `hpke_public_key` to this request and its identity key
    /// (`binding::binding_message(Provision, ..)`).
    #[n(4)]
    pub binding: KeyBinding,
    /// The device's signature authorising the gateway to pre-fetch the renewal of the
    /// credential this request produces: over `binding_message(Renew, request_id.renewal(),
    /// device_id, hpke_public_key)`. Absent: the gateway does not pre-fetch.
    #[n(5)]
    pub renewal_binding: Option<KeyBinding>,
    /// The pairing window's one-time code, from the owner; only for a device that is not
    /// paired yet and pairs through the window (PROTOCOL.md §10.1).
    #[n(6)]
    pub window_code: Option<String>,
}

/// `RenewRequest` (0x02), device → gateway: a fresh credential replacing `supi`.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
#[cbor(map)]
pub struct RenewRequest {
    /// Random idempotency key.
    #[n(0)]
    pub request_id: RequestId,
    /// The credential being renewed.
    #[n(1)]
    pub supi: Supi,
    /// X25519 public key for the new credential.
    #[cbor(n(2), with = "crate::codec::fixed")]
    pub hpke_public_key: [u8; 32],
    /// New parameters; absent keeps the current ones.
    #[n(3)]
    pub params: Option<Params>,
    /// The device's signature: `binding_message(Renew, request_id, device_id,
    /// hpke_public_key)`, made with the key the credential was issued to.
    #[n(4)]
    pub binding: KeyBinding,
    /// Authorisation to pre-fetch the next renewal (`request_id.renewal()`, same HPKE key).
    #[n(5)]
    pub renewal_binding: Option<KeyBinding>,
}

/// `CredentialDelivery` (0x03), gateway → device.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
#[cbor(map)]
pub struct CredentialDelivery {
    /// Echo of the request.
    #[n(0)]
    pub request_id: RequestId,
    /// The SUPI inside the sealed bundle (in clear for the gateway's bookkeeping).
    #[n(1)]
    pub supi: Supi,
    /// Expiry, Unix seconds.
    #[n(2)]
    pub expires_at: u64,
    /// The sealed bundle.
    #[n(3)]
    pub sealed: Sealed,
}

/// `DeliveryAck` (0x04), device → gateway: the credential is stored.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
#[cbor(map)]
pub struct DeliveryAck {
    /// Echo of the request.
    #[n(0)]
    pub request_id: RequestId,
    /// The SUPI the device stored.
    #[n(1)]
    pub supi: Supi,
}

/// `AckConfirmed` (0x05), gateway → device: the gateway dropped the sealed blob.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
#[cbor(map)]
pub struct AckConfirmed {
    /// Echo of the request.
    #[n(0)]
    pub request_id: RequestId,
}

/// `Pending` (0x06), gateway → device: accepted and queued; keep the stream open.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
#[cbor(map)]
pub struct Pending {
    /// Echo of the request.
    #[n(0)]
    pub request_id: RequestId,
    /// How much longer the device should wait before giving up, in milliseconds.
    #[n(1)]
    pub wait_ms: u64,
}
