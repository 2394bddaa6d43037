//! Typed errors. Every error a peer can provoke is one of these, never a panic.

use crate::frame::{FrameError, MsgType};
use crate::msg::{ErrorCode, ErrorMsg};

/// A message body that could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The body ended inside a data item.
    #[error("body truncated")]
    Truncated,
    /// A data item has the wrong CBOR major type (or tag).
    #[error("wrong CBOR type: {0}")]
    WrongType(String),
    /// A mandatory map key is absent.
    #[error("missing field: {0}")]
    MissingField(String),
    /// Well-formed CBOR carrying an unacceptable value (length, syntax, range).
    #[error("invalid value: {0}")]
    InvalidValue(String),
    /// Bytes follow the body's single data item.
    #[error("{0} trailing bytes after the body")]
    TrailingBytes(usize),
    /// Anything else that is not well-formed CBOR for this message.
    #[error("malformed CBOR: {0}")]
    Malformed(String),
}

/// A message that could not be encoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    /// The encoded body is over the conversation's limit (split the batch).
    #[error("encoded body of {len} bytes exceeds the maximum of {max}")]
    TooLarge {
        /// Encoded length.
        len: usize,
        /// The conversation's maximum.
        max: usize,
    },
    /// The CBOR encoder failed (not expected with in-memory buffers).
    #[error("CBOR encoding failed: {0}")]
    Cbor(String),
}

/// Any error of the protocol layer: framing, decoding, or the state machines.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtoError {
    /// Bad frame header or framing.
    #[error("framing: {0}")]
    Frame(#[from] FrameError),
    /// A frame whose body does not decode as its type.
    #[error("malformed {msg_type:?} body: {source}")]
    Body {
        /// The frame's type.
        msg_type: MsgType,
        /// What was wrong.
        source: DecodeError,
    },
    /// A valid message that is not allowed in the current state.
    #[error("unexpected {got:?} in state {state}")]
    Unexpected {
        /// The message received.
        got: MsgType,
        /// The receiving machine's state.
        state: &'static str,
    },
    /// A message whose fields contradict the exchange (wrong request id, SUPI, ...).
    #[error("protocol violation: {0}")]
    Violation(String),
    /// The peer sent an `Error` message.
    #[error("peer error {code:?}: {reason}", code = .0.code, reason = .0.reason)]
    Peer(ErrorMsg),
    /// Authentication failed (wrong RES*, wrong binding, bad AUTN, too many attempts).
    #[error("authentication failed: {0}")]
    AuthFailed(String),
    /// The local side could not encode what it wanted to send.
    #[error("encoding: {0}")]
    Encode(#[from] EncodeError),
    /// The machine is closed and accepts no more input.
    #[error("connection closed")]
    Closed,
    /// The local caller misused the API (called a method in the wrong state).
    #[error("invalid API use: {0}")]
    InvalidState(&'static str),
    /// The stream ended before the exchange was complete.
    #[error("stream ended early in state {0}")]
    UnexpectedEnd(&'static str),
    /// The device id in the request is not the one paired with the peer's TLS key.
    #[error("device id {0} is not paired with this key")]
    NotPaired(String),
    /// AKA resynchronisation failed or was asked for too often.
    #[error("synchronisation failure: {0}")]
    SyncFailure(String),
    /// A batch with more items than the session allows.
    #[error("batch of {n} items exceeds the maximum of {max}")]
    TooManyItems {
        /// Items in the batch.
        n: usize,
        /// The session's `max_batch_items`.
        max: u64,
    },
    /// The local USIM could not be used.
    #[error("USIM unavailable: {0}")]
    Usim(String),
    /// The deadline given by the caller passed.
    #[error("timed out in state {0}")]
    Timeout(&'static str),
}

impl ProtoError {
    /// The registry code to send to the peer for this error.
    pub fn error_code(&self) -> ErrorCode {
        match self {
            ProtoError::Frame(FrameError::UnsupportedVersion(_)) => ErrorCode::UnsupportedVersion,
            ProtoError::Frame(FrameError::TooLarge { .. }) => ErrorCode::TooLarge,
            ProtoError::Frame(_) | ProtoError::Body { .. } | ProtoError::Violation(_) => {
                ErrorCode::Malformed
            }
            ProtoError::Unexpected { .. } | ProtoError::UnexpectedEnd(_) => {
                ErrorCode::UnexpectedMessage
            }
            ProtoError::Peer(m) => m.code,
            ProtoError::AuthFailed(_) => ErrorCode::AuthFailed,
            ProtoError::NotPaired(_) => ErrorCode::NotPaired,
            ProtoError::SyncFailure(_) => ErrorCode::SyncFailure,
            ProtoError::TooManyItems { .. } => ErrorCode::TooLarge,
            ProtoError::Timeout(_) => ErrorCode::Timeout,
            ProtoError::Encode(_)
            | ProtoError::Closed
            | ProtoError::InvalidState(_)
            | ProtoError::Usim(_) => ErrorCode::Internal,
        }
    }
}
