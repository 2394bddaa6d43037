//! Sans-IO protocol core: framing, messages and state machines of the device, gateway and
//! core-network conversations.
//!
//! In the style of `quinn-proto`: nothing here opens a socket, reads a clock or spawns a thread.
//! Bytes go in (`handle_bytes`), encoded frames (`poll_transmit`) and events (`poll_event`) come
//! out, and every error an attacker can provoke is a typed value, never a panic.
//!
//! * [`frame`]: the fixed 8-byte header and the incremental [`frame::FrameDecoder`].
//! * [`msg`]: the messages of the three conversations as deterministic CBOR bodies, and the error
//!   registry [`msg::ErrorCode`].
//! * [`ids`]: validated identifiers ([`ids::Supi`], [`ids::DeviceId`], [`ids::RequestId`]).
//! * [`bundle`]: the credential bundle the CN seals to a device.
//! * [`pairing`]: the `CPN:` pairing (bootstrapping) code.
//! * [`device`], [`cn`], [`attach`]: one state machine per conversation and role.
//!
//! The wire format is specified in `docs/PROTOCOL.md`.
#![warn(missing_docs)]

pub mod aka;
pub mod attach;
pub mod attestation;
pub mod binding;
pub mod bundle;
pub mod cn;
mod codec;
pub mod device;
pub mod error;
#[cfg(any(test, feature = "fixtures"))]
pub mod fixtures;
pub mod frame;
pub mod ids;
mod machine;
pub mod msg;
pub mod pairing;
#[cfg(test)]
mod proptests;
mod secret;
#[cfg(test)]
mod testutil;

pub use error::{DecodeError, EncodeError, ProtoError};
pub use frame::{Conversation, Frame, FrameDecoder, FrameError, MsgType};
pub use ids::{DeviceId, RequestId, Supi};
pub use machine::{Config, SansIo};
