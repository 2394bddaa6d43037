//! Key binding: the device's signature that ties an HPKE recipient key to its identity key.
//!
//! A device signs, with the private key of the TLS identity its owner paired (the pairing code's
//! `K`), the message built by [`binding_message`]: the operation, the request ID, its device ID
//! and the HPKE public key the credential is to be sealed to. The gateway forwards the signature
//! and the device's SubjectPublicKeyInfo in every `BatchItem`; the CN verifies it, records the
//! SPKI with the child it issues, and accepts a renewal (a re-seal of the same K/OPc to a
//! possibly different key) only when it is signed by that recorded SPKI. A gateway that swaps
//! the HPKE key, replays a signature for another request, or renews someone else's child is
//! refused (`docs/PROTOCOL.md` §4.4, `docs/SECURITY.md`).
//!
//! The signature itself is made and checked in `companion-transport` (it owns the TLS keys);
//! this module only fixes the bytes that are signed.

use minicbor::{Decode, Encode};

use crate::ids::{DeviceId, RequestId};

/// The context prefix of every signed binding message (24 ASCII bytes, no terminator).
pub const BINDING_CONTEXT: &[u8] = b"companion key binding v2";

/// The largest signature accepted in a [`KeyBinding`] (an RSA-4096 signature is 512 bytes;
/// ECDSA P-256 at most 72, Ed25519 64).
pub const MAX_SIGNATURE_LEN: usize = 512;

/// What the signed request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BindingOp {
    /// A new credential (`ProvisionRequest`, `BatchItem` kind provision).
    Provision = 0,
    /// A renewal, i.e. a re-seal of an existing credential (`RenewRequest`, kind renew).
    Renew = 1,
}

/// The exact bytes a device signs:
/// `BINDING_CONTEXT || op (1 byte) || request_id (16) || u16-BE(len(device_id)) || device_id ||
/// hpke_public_key (32)`.
pub fn binding_message(
    op: BindingOp,
    request_id: &RequestId,
    device_id: &DeviceId,
    hpke_public_key: &[u8; 32],
) -> Vec<u8> {
    let id = device_id.as_str().as_bytes();
    let mut m = Vec::with_capacity(BINDING_CONTEXT.len() + 1 + 16 + 2 + id.len() + 32);
    m.extend_from_slice(BINDING_CONTEXT);
    m.push(op as u8);
    m.extend_from_slice(request_id.as_bytes());
    // A DeviceId is at most 64 bytes, so its length always fits a u16.
    m.extend_from_slice(&(id.len() as u16).to_be_bytes());
    m.extend_from_slice(id);
    m.extend_from_slice(hpke_public_key);
    m
}

/// A key-binding signature: `{0: scheme, 1: signature}`. `scheme` is a TLS 1.3
/// `SignatureScheme` code point (RFC 8446 §4.2.3) matching the identity key:
/// `0x0403` ecdsa_secp256r1_sha256 (DER-encoded ECDSA-Sig-Value), `0x0503`
/// ecdsa_secp384r1_sha384, `0x0807` ed25519.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
#[cbor(map)]
pub struct KeyBinding {
    /// TLS SignatureScheme code point.
    #[n(0)]
    pub scheme: u16,
    /// The signature over [`binding_message`].
    #[cbor(n(1), with = "minicbor::bytes")]
    pub signature: Vec<u8>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_layout() {
        let m = binding_message(
            BindingOp::Renew,
            &RequestId([7; 16]),
            &DeviceId::new("ab").unwrap_or_else(|e| panic!("{e}")),
            &[0x11; 32],
        );
        assert_eq!(&m[..24], BINDING_CONTEXT);
        assert_eq!(m[24], 1);
        assert_eq!(&m[25..41], &[7; 16]);
        assert_eq!(&m[41..45], &[0, 2, b'a', b'b']);
        assert_eq!(&m[45..], &[0x11; 32]);
        assert_eq!(m.len(), 24 + 1 + 16 + 2 + 2 + 32);
    }
}
