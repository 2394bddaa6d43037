//! `iotdev`: the reference device agent, library part.
//!
//! What a factory-fresh IoT device needs to get a 3GPP credential through the companion gateway
//! (`gatewayd`), reusable by the `iotdev` CLI and by `loadgen`:
//!
//! - [`DeviceKeys`]: the device ID, its TLS identity (a self-signed P-256 certificate, whose
//!   public key the owner pairs through the `CPN:` pairing code) and the pinned gateway key;
//! - [`client`]: one provisioning or renewal over QUIC (`companion-device/2`, mutual TLS), driving
//!   the sans-IO [`companion_proto::device::ClientExchange`]: request, `Pending`, delivery, HPKE
//!   opening and checks, acknowledgement;
//! - [`store::Device`]: the same with persistent state in a directory (identity 0600, pinned
//!   gateway fingerprint after first use, the in-flight attempt so a retry reuses its request ID,
//!   the stored credential bundle 0600);
//! - [`DeviceError`]: every failure an owner can meet, with a clear message,
//!   [`DeviceError::is_retryable`] and [`DeviceError::retry_after`].
//!
//! # Renewal keys
//! A provisioning uses a fresh HPKE key and a random request ID. The device keeps that HPKE key
//! with its credential (0600) as its *renewal key*, and a renewal uses the request ID
//! [`renewal_request_id`]`(current request ID)`. The gateway, which saw both, can therefore
//! pre-fetch a renewal sealed to the device before the device asks; the device's own
//! `RenewRequest` then finds it waiting (same request ID, idempotent at the CN).
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod attach;
pub mod client;
mod error;
mod keys;
pub mod store;

pub use client::{Attempt, AttemptKind, ClientOptions, ProvisionParams, ProvisionedCredential};
pub use error::DeviceError;
pub use keys::DeviceKeys;
pub use store::Device;

use companion_proto::RequestId;

/// The request ID of the renewal that follows the credential issued for `previous`
/// ([`RequestId::renewal`]; the gateway derives the same value to pre-fetch renewals).
pub fn renewal_request_id(previous: &RequestId) -> RequestId {
    previous.renewal()
}

/// A fresh random request ID (16 bytes from the OS RNG).
pub fn random_request_id() -> Result<RequestId, DeviceError> {
    let s = companion_crypto::Secret::<16>::try_random()
        .map_err(|e| DeviceError::Local(format!("random number generator: {e}")))?;
    Ok(RequestId(*s.expose()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_ids_chain_and_differ() {
        let a = RequestId([7; 16]);
        let b = renewal_request_id(&a);
        assert_ne!(a, b);
        assert_eq!(b, renewal_request_id(&a));
        assert_ne!(renewal_request_id(&b), b);
    }
}
