//! Bodies of the device ↔ CN attach conversation.

use minicbor::{Decode, Encode};

use super::*;

/// `AttachRequest` (0x30), device → CN: the same body as [`AuthStart`] (the provisioned SUPI and
/// the serving network name the device computes RES* with).
pub type AttachRequest = AuthStart;

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
