//! Bodies of the device ↔ CN attach conversation.

use minicbor::{Decode, Encode};

use crate::ids::Supi;

use super::*;

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
