//! Sample messages for tests of the machines and of the code that drives them (feature
//! `fixtures`; never in a release build): one provisioning request, its delivery, one batch item.
//! Each is well formed but carries placeholder keys and signatures, so only code that does not
//! verify them (the machines, the stream driver, the CN client) may use it.

#![allow(clippy::expect_used)] // fixed literals that are valid by construction

use crate::ids::{DeviceId, RequestId, Supi};
use crate::msg::{
    BatchItem, CredentialDelivery, ItemKind, KeyBinding, Params, ProvisionRequest, Sealed,
};

/// The request ID of [`provision_request`] and [`delivery`].
pub const REQUEST_ID: RequestId = RequestId([0x42; 16]);

/// A placeholder key binding (ECDSA P-256 scheme code, signature bytes `fill`).
fn binding(fill: u8) -> KeyBinding {
    KeyBinding {
        scheme: 0x0403,
        signature: vec![fill; 8],
    }
}

/// A first-credential request from `watch-01` (request ID [`REQUEST_ID`]).
pub fn provision_request() -> ProvisionRequest {
    ProvisionRequest {
        request_id: REQUEST_ID,
        device_id: DeviceId::new("watch-01").expect("a valid device ID"),
        hpke_public_key: [0x11; 32],
        params: Default::default(),
        binding: binding(0x44),
        renewal_binding: None,
        window_code: None,
    }
}

/// The delivery answering [`provision_request`]: child `imsi-001010000000042`.
pub fn delivery() -> CredentialDelivery {
    CredentialDelivery {
        request_id: REQUEST_ID,
        supi: Supi::new("imsi-001010000000042").expect("a valid SUPI"),
        expires_at: 1_767_225_600,
        sealed: Sealed {
            enc: [0x22; 32],
            ciphertext: vec![1, 2, 3],
        },
    }
}

/// Batch item `n`: device `dev-<n>`, request ID, key fingerprint, HPKE key and signature all
/// filled with `n`.
pub fn batch_item(n: u8) -> BatchItem {
    BatchItem {
        attestation: None,
        kind: ItemKind::Provision,
        request_id: RequestId([n; 16]),
        device_id: DeviceId::new(&format!("dev-{n}")).expect("a valid device ID"),
        device_key_fingerprint: [n; 32],
        hpke_public_key: [n; 32],
        params: Params::default(),
        supi: None,
        device_spki: vec![0x30, 0x00],
        binding: binding(n),
    }
}
