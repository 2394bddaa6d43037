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

mod attach;
mod cn;
mod device;

pub use attach::*;
pub use cn::*;
pub use device::*;

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
