//! Messages of the three conversations, their deterministic CBOR bodies, and the error registry.
//!
//! Every body is one CBOR map with small unsigned-integer keys (0..=23, one byte each), written
//! in ascending key order with shortest-form integers and definite lengths: the RFC 8949 §4.2.1
//! deterministic encoding. Optional fields are omitted when absent. Decoders ignore map keys
//! they do not know (forward compatibility), reject wrong CBOR types, missing mandatory keys,
//! invalid values and trailing bytes with a [`DecodeError`].

use minicbor::{Decode, Encode};

pub use crate::attestation::AttestationChain;
pub use crate::binding::KeyBinding;
use crate::codec::{decode_body, encode_body, open_enum};
use crate::error::{DecodeError, EncodeError, ProtoError};
use crate::frame::{Conversation, Frame, FrameDecoder, MsgType, decode_frame, encode_frame};
use crate::ids::{DeviceId, RequestId, Supi};

open_enum! {
    /// The error registry, shared by all conversations. See `docs/PROTOCOL.md` for what a peer
    /// must do on each.
    pub enum ErrorCode {
        /// The frame or body could not be decoded. Not retryable: fix the sender.
        Malformed = 1,
        /// The frame header's version is not spoken. Not retryable.
        UnsupportedVersion = 2,
        /// A valid message arrived in a state where it is not allowed. Not retryable as is.
        UnexpectedMessage = 3,
        /// The frame is over the conversation's size limit. Split (batches) or give up.
        TooLarge = 4,
        /// The device's TLS key matches no pairing at the gateway. Pair again.
        NotPaired = 5,
        /// The parent subscription has no room for another child credential.
        QuotaExhausted = 6,
        /// Operator or gateway policy forbids the request (lifetime, DNN, bitrate...).
        PolicyDenied = 7,
        /// Overloaded: retry after `retry_after_ms`.
        Busy = 8,
        /// The gateway cannot reach the CN: retry after `retry_after_ms`.
        CnUnavailable = 9,
        /// AKA or session-binding verification failed.
        AuthFailed = 10,
        /// AKA resynchronisation failed (bad AUTS, or repeated sync failures).
        SyncFailure = 11,
        /// The SUPI is not known to the CN.
        UnknownSubscriber = 12,
        /// The credential's lifetime is over: renew through the gateway.
        CredentialExpired = 13,
        /// The credential (or its parent) was revoked: discard it and provision again.
        CredentialRevoked = 14,
        /// Attach from a visited network with a credential that may not roam.
        RoamingNotAllowed = 15,
        /// The parent subscription is suspended.
        SubscriptionSuspended = 16,
        /// Unexpected failure at the sender. Retry with backoff.
        Internal = 17,
        /// The referenced SUPI, device or request does not exist.
        NotFound = 18,
        /// The device could not open or accept the delivered credential.
        CredentialUnusable = 19,
        /// The sender's deadline for this exchange passed. Retry.
        Timeout = 20,
    }
}

impl ErrorCode {
    /// Whether the same request may succeed if sent again later (after `retry_after_ms` if given,
    /// else with exponential backoff).
    pub const fn is_retryable(self) -> bool {
        matches!(
            self,
            ErrorCode::Busy
                | ErrorCode::CnUnavailable
                | ErrorCode::Internal
                | ErrorCode::Timeout
                | ErrorCode::SyncFailure
        )
    }

    /// The snake_case registry name.
    pub const fn name(self) -> &'static str {
        match self {
            ErrorCode::Malformed => "malformed",
            ErrorCode::UnsupportedVersion => "unsupported_version",
            ErrorCode::UnexpectedMessage => "unexpected_message",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::NotPaired => "not_paired",
            ErrorCode::QuotaExhausted => "quota_exhausted",
            ErrorCode::PolicyDenied => "policy_denied",
            ErrorCode::Busy => "busy",
            ErrorCode::CnUnavailable => "cn_unavailable",
            ErrorCode::AuthFailed => "auth_failed",
            ErrorCode::SyncFailure => "sync_failure",
            ErrorCode::UnknownSubscriber => "unknown_subscriber",
            ErrorCode::CredentialExpired => "credential_expired",
            ErrorCode::CredentialRevoked => "credential_revoked",
            ErrorCode::RoamingNotAllowed => "roaming_not_allowed",
            ErrorCode::SubscriptionSuspended => "subscription_suspended",
            ErrorCode::Internal => "internal",
            ErrorCode::NotFound => "not_found",
            ErrorCode::CredentialUnusable => "credential_unusable",
            ErrorCode::Timeout => "timeout",
            ErrorCode::Unknown(_) => "unknown",
        }
    }
}

/// `Error` (0x7F): the exchange failed. The sender closes the stream after it.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
#[cbor(map)]
pub struct ErrorMsg {
    /// Registry code.
    #[n(0)]
    pub code: ErrorCode,
    /// Human-readable reason, for logs; never parsed.
    #[n(1)]
    pub reason: String,
    /// When to retry, for retryable codes.
    #[n(2)]
    pub retry_after_ms: Option<u64>,
}

impl ErrorMsg {
    /// An error without retry hint.
    pub fn new(code: ErrorCode, reason: impl Into<String>) -> Self {
        ErrorMsg {
            code,
            reason: reason.into(),
            retry_after_ms: None,
        }
    }

    /// An error with a retry hint.
    pub fn retry_after(code: ErrorCode, reason: impl Into<String>, ms: u64) -> Self {
        ErrorMsg {
            code,
            reason: reason.into(),
            retry_after_ms: Some(ms),
        }
    }
}

/// Control parameters a requester asks for (seed Note 1 and 3); the CN may grant less.
#[derive(Debug, Clone, Default, PartialEq, Eq, Encode, Decode)]
#[cbor(map)]
pub struct Params {
    /// Requested lifetime in seconds.
    #[n(0)]
    pub lifetime_s: Option<u64>,
    /// Whether roaming is wanted.
    #[n(1)]
    pub roaming: Option<bool>,
    /// Data network names the device needs.
    #[n(2)]
    pub dnns: Option<Vec<String>>,
    /// Bitrate cap in kbit/s.
    #[n(3)]
    pub max_bitrate_kbps: Option<u64>,
}

/// What a credential may do, as granted by the CN.
#[derive(Debug, Clone, Default, PartialEq, Eq, Encode, Decode)]
#[cbor(map)]
pub struct Restrictions {
    /// Whether the credential may attach from a visited network.
    #[n(0)]
    pub roaming_allowed: bool,
    /// Allowed data network names; empty means the operator's default.
    #[n(1)]
    pub dnns: Vec<String>,
    /// Bitrate cap in kbit/s, if any.
    #[n(2)]
    pub max_bitrate_kbps: Option<u64>,
}

/// An HPKE-sealed credential bundle (RFC 9180 base mode; see `docs/PROTOCOL.md`).
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
#[cbor(map)]
pub struct Sealed {
    /// The HPKE encapsulated key (X25519 public key).
    #[cbor(n(0), with = "crate::codec::fixed")]
    pub enc: [u8; 32],
    /// AEAD ciphertext of the CBOR bundle, tag included.
    #[cbor(n(1), with = "minicbor::bytes")]
    pub ciphertext: Vec<u8>,
}

// ---------------------------------------------------------------- device ↔ gateway

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

// ---------------------------------------------------------------- gateway ↔ CN

/// `AuthStart` (0x10), gateway → CN.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
#[cbor(map)]
pub struct AuthStart {
    /// The companion's own SUPI.
    #[n(0)]
    pub supi: Supi,
    /// The serving network name the USIM computes RES* with.
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

// ---------------------------------------------------------------- device ↔ CN attach

/// `AttachRequest` (0x30), device → CN.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
#[cbor(map)]
pub struct AttachRequest {
    /// The provisioned SUPI.
    #[n(0)]
    pub supi: Supi,
    /// The serving network name the device computes RES* with.
    #[n(1)]
    pub serving_network_name: String,
}

/// `AttachAccept` (0x34), CN → device.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
#[cbor(map)]
pub struct AttachAccept {
    /// Credential expiry, Unix seconds.
    #[n(0)]
    pub expires_at: u64,
    /// What the credential may do.
    #[n(1)]
    pub restrictions: Restrictions,
}

// ---------------------------------------------------------------- conversation enums

/// A message of one conversation: framing, encoding and decoding in one place.
pub trait Message: Sized {
    /// The conversation the message belongs to.
    const CONVERSATION: Conversation;

    /// The frame type code.
    fn msg_type(&self) -> MsgType;

    /// The deterministic CBOR body.
    fn encode_body(&self) -> Result<Vec<u8>, EncodeError>;

    /// Decodes a frame's body according to its type.
    fn from_frame(frame: &Frame) -> Result<Self, ProtoError>;

    /// The complete frame: header and body.
    fn encode(&self) -> Result<Vec<u8>, EncodeError> {
        let body = self.encode_body()?;
        encode_frame(Self::CONVERSATION, self.msg_type(), &body).map_err(|_| {
            EncodeError::TooLarge {
                len: body.len(),
                max: Self::CONVERSATION.max_body_len(),
            }
        })
    }

    /// Decodes exactly one complete frame (nothing may follow it).
    fn decode(bytes: &[u8]) -> Result<Self, ProtoError> {
        let frame = decode_frame(Self::CONVERSATION, bytes)?;
        Self::from_frame(&frame)
    }

    /// Decodes every complete frame of a finished stream.
    fn decode_stream(bytes: &[u8]) -> Result<Vec<Self>, ProtoError> {
        let mut d = FrameDecoder::new(Self::CONVERSATION);
        d.push(bytes);
        let mut out = Vec::new();
        while let Some(f) = d.next_frame()? {
            out.push(Self::from_frame(&f)?);
        }
        d.finish()?;
        Ok(out)
    }
}

fn body<'b, T: Decode<'b, ()>>(frame: &'b Frame) -> Result<T, ProtoError> {
    decode_body(&frame.body).map_err(|source: DecodeError| ProtoError::Body {
        msg_type: frame.msg_type,
        source,
    })
}

/// A message of the device ↔ gateway conversation (`companion-device/2`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceMessage {
    /// 0x01
    ProvisionRequest(ProvisionRequest),
    /// 0x02
    RenewRequest(RenewRequest),
    /// 0x03
    CredentialDelivery(CredentialDelivery),
    /// 0x04
    DeliveryAck(DeliveryAck),
    /// 0x05
    AckConfirmed(AckConfirmed),
    /// 0x06
    Pending(Pending),
    /// 0x7F
    Error(ErrorMsg),
}

/// A message of the gateway ↔ CN conversation (`companion-cn/2`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CnMessage {
    /// 0x10
    AuthStart(AuthStart),
    /// 0x11
    AuthChallenge(Challenge),
    /// 0x12
    AuthResponse(ChallengeResponse),
    /// 0x13
    AuthResync(Resync),
    /// 0x14
    AuthResult(AuthResult),
    /// 0x20
    BatchProvision(BatchProvision),
    /// 0x21
    BatchResult(BatchResult),
    /// 0x22
    Revoke(Revoke),
    /// 0x23
    RevokeResult(RevokeResult),
    /// 0x24
    ListChildren(ListChildren),
    /// 0x25
    ChildList(ChildList),
    /// 0x7F
    Error(ErrorMsg),
}

/// A message of the device ↔ CN attach conversation (`companion-attach/1`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AttachMessage {
    /// 0x30
    AttachRequest(AttachRequest),
    /// 0x31
    AttachChallenge(Challenge),
    /// 0x32
    AttachResponse(ChallengeResponse),
    /// 0x33
    AttachResync(Resync),
    /// 0x34
    AttachAccept(AttachAccept),
    /// 0x7F
    Error(ErrorMsg),
}

/// Implements [`Message`] for an enum whose variants share payload types (so no `From`).
macro_rules! impl_message {
    ($name:ident, $conv:expr, { $($var:ident,)* }) => {
        impl Message for $name {
            const CONVERSATION: Conversation = $conv;

            fn msg_type(&self) -> MsgType {
                match self {
                    $($name::$var(_) => MsgType::$var,)*
                    $name::Error(_) => MsgType::Error,
                }
            }

            fn encode_body(&self) -> Result<Vec<u8>, EncodeError> {
                let body = match self {
                    $($name::$var(m) => encode_body(m)?,)*
                    $name::Error(m) => encode_body(m)?,
                };
                let max = Self::CONVERSATION.max_body_len();
                if body.len() > max {
                    return Err(EncodeError::TooLarge { len: body.len(), max });
                }
                Ok(body)
            }

            fn from_frame(frame: &Frame) -> Result<Self, ProtoError> {
                match frame.msg_type {
                    $(MsgType::$var => body(frame).map($name::$var),)*
                    MsgType::Error => body(frame).map($name::Error),
                    other => Err(ProtoError::Frame(crate::frame::FrameError::UnknownType(other as u8))),
                }
            }
        }

        impl From<ErrorMsg> for $name {
            fn from(m: ErrorMsg) -> Self {
                $name::Error(m)
            }
        }
    };
}

impl_message!(DeviceMessage, Conversation::Device, {
    ProvisionRequest, RenewRequest, CredentialDelivery, DeliveryAck, AckConfirmed, Pending,
});
impl_message!(CnMessage, Conversation::Cn, {
    AuthStart, AuthChallenge, AuthResponse, AuthResync, AuthResult, BatchProvision, BatchResult,
    Revoke, RevokeResult, ListChildren, ChildList,
});
impl_message!(AttachMessage, Conversation::Attach, {
    AttachRequest, AttachChallenge, AttachResponse, AttachResync, AttachAccept,
});

#[cfg(test)]
pub(crate) mod tests;
