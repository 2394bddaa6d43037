//! The device ↔ CN attach (`companion-attach/1`): 5G-AKA with the provisioned credential,
//! bound to the TLS session, ending in `AttachAccept`. The state machine is
//! [`crate::aka`]'s, instantiated on [`AttachMessage`].
//!
//! * [`Client`] (device): `new(usim, snn, exporter, now, config)` queues `AttachRequest`;
//!   on [`ClientEvent::ChallengeReceived`] call `answer_challenge(now, usim)`;
//!   [`ClientEvent::Authenticated`] carries the [`AttachAccept`].
//! * [`Server`] (CN): [`ServerEvent::VectorNeeded`] → `provide_vector`;
//!   [`ServerEvent::ResyncNeeded`] → verify AUTS, `provide_vector`;
//!   [`ServerEvent::Verified`] → check expiry, revocation, roaming, then `accept(AttachAccept)`
//!   or `reject(ErrorMsg)` (`credential_expired`, `credential_revoked`, `roaming_not_allowed`,
//!   `subscription_suspended`).

use crate::aka::{AkaClient, AkaServer};
use crate::msg::{AttachAccept, AttachMessage};

pub use crate::aka::ServerEvent;

/// Device side of the attach.
pub type Client = AkaClient<AttachMessage>;
/// CN side of the attach.
pub type Server = AkaServer<AttachMessage>;
/// Events of the device side.
pub type ClientEvent = crate::aka::ClientEvent<AttachAccept>;

#[cfg(test)]
mod tests;
