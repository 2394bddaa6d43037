//! The crypto floor of the device leg: what gatewayd cannot avoid computing per device, measured
//! on one thread with the library gatewayd uses (ring, through rustls and quinn). Everything
//! else gatewayd spends per device (QUIC, TLS messages, certificate parsing, the state writes,
//! CBOR, the task hops) is above this floor.

use std::time::Duration;

use anyhow::anyhow;
use ring::aead::{AES_128_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use ring::agreement::{EphemeralPrivateKey, UnparsedPublicKey, X25519, agree_ephemeral};
use ring::hmac;
use ring::rand::SystemRandom;
use ring::signature::{
    ECDSA_P256_SHA256_ASN1, ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair, KeyPair,
};
use serde::Serialize;

use crate::e2e::issuance::ceilings::measure;
use crate::e2e::round;

/// Bytes a handshake moves through the AEAD on the server (both directions: the server's
/// certificate flight, the client's certificate and CertificateVerify, Finished messages).
const HANDSHAKE_AEAD_BYTES: usize = 4096;
/// Bytes one provisioning adds (the request with its key binding, the sealed credential of
/// about 1 KiB, the acknowledgement).
const PROVISIONING_AEAD_BYTES: usize = 2048;
/// HMAC-SHA256 operations of one TLS 1.3 key schedule (Derive-Secret and HKDF-Expand-Label for
/// the handshake and application secrets, keys and IVs, the Finished keys and MACs).
const KEY_SCHEDULE_HMACS: usize = 24;

/// The floor, in CPU microseconds per device.
#[derive(Debug, Clone, Serialize)]
pub struct Floor {
    /// One X25519 key generation and agreement.
    pub x25519_us: f64,
    /// One ECDSA P-256 signature (gatewayd's CertificateVerify).
    pub p256_sign_us: f64,
    /// One ECDSA P-256 verification (the device's CertificateVerify; each key binding).
    pub p256_verify_us: f64,
    /// One HMAC-SHA256 over a 64-byte input.
    pub hmac_us: f64,
    /// AES-128-GCM per KiB.
    pub aead_us_per_kib: f64,
    /// Server side of one QUIC + TLS 1.3 handshake with mutual authentication: X25519, one
    /// signature, one verification, the key schedule and the handshake's AEAD.
    pub handshake_us: f64,
    /// One provisioning: the handshake, plus the verification of the request's two key bindings
    /// (the request's own and the renewal authorisation, PROTOCOL.md §4.4) and its AEAD.
    pub provisioning_us: f64,
}

/// Measures the floor for about `budget` per primitive.
pub fn measure_floor(budget: Duration) -> anyhow::Result<Floor> {
    let rng = SystemRandom::new();
    // The server's share: its ephemeral key, its public key, the agreement with the client's.
    let peer = EphemeralPrivateKey::generate(&X25519, &rng).map_err(|_| anyhow!("rng"))?;
    let peer_pub = peer.compute_public_key().map_err(|_| anyhow!("x25519"))?;
    let kx = measure("x25519".into(), budget, 50, || {
        let mine = EphemeralPrivateKey::generate(&X25519, &rng).map_err(|_| anyhow!("rng"))?;
        std::hint::black_box(mine.compute_public_key().map_err(|_| anyhow!("x25519"))?);
        agree_ephemeral(
            mine,
            &UnparsedPublicKey::new(&X25519, peer_pub.as_ref()),
            |s| std::hint::black_box(s.len()),
        )
        .map_err(|_| anyhow!("x25519 agreement"))?;
        Ok(1)
    })?;
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &rng)
        .map_err(|_| anyhow!("P-256 key generation"))?;
    let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, pkcs8.as_ref(), &rng)
        .map_err(|_| anyhow!("P-256 key"))?;
    // What TLS 1.3 signs: 64 spaces, the context string, a zero byte and the transcript hash.
    let mut content = vec![b' '; 64];
    content.extend_from_slice(b"TLS 1.3, server CertificateVerify\0");
    content.extend_from_slice(&[0x5a; 32]);
    let sign = measure("p256 sign".into(), budget, 50, || {
        std::hint::black_box(key.sign(&rng, &content).map_err(|_| anyhow!("sign"))?);
        Ok(1)
    })?;
    let sig = key.sign(&rng, &content).map_err(|_| anyhow!("sign"))?;
    let public =
        ring::signature::UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, key.public_key().as_ref());
    let verify = measure("p256 verify".into(), budget, 50, || {
        public
            .verify(&content, sig.as_ref())
            .map_err(|_| anyhow!("verify"))?;
        Ok(1)
    })?;
    let mac_key = hmac::Key::new(hmac::HMAC_SHA256, &[7; 32]);
    let hmacs = measure("hmac".into(), budget, 1000, || {
        std::hint::black_box(hmac::sign(&mac_key, &[9; 64]));
        Ok(1)
    })?;
    let aead_key =
        LessSafeKey::new(UnboundKey::new(&AES_128_GCM, &[3; 16]).map_err(|_| anyhow!("aes key"))?);
    let mut buf = vec![0u8; 1024];
    let aead = measure("aes-128-gcm 1 KiB".into(), budget, 1000, || {
        let tag = aead_key
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key([1; 12]),
                Aad::empty(),
                &mut buf,
            )
            .map_err(|_| anyhow!("seal"))?;
        let _ = std::hint::black_box(tag);
        Ok(1)
    })?;
    let x25519_us = kx.cpu_us_per_op;
    let handshake_us = x25519_us
        + sign.cpu_us_per_op
        + verify.cpu_us_per_op
        + KEY_SCHEDULE_HMACS as f64 * hmacs.cpu_us_per_op
        + (HANDSHAKE_AEAD_BYTES / 1024) as f64 * aead.cpu_us_per_op;
    let provisioning_us = handshake_us
        + 2.0 * verify.cpu_us_per_op
        + (PROVISIONING_AEAD_BYTES / 1024) as f64 * aead.cpu_us_per_op;
    Ok(Floor {
        x25519_us: round(x25519_us, 1),
        p256_sign_us: round(sign.cpu_us_per_op, 1),
        p256_verify_us: round(verify.cpu_us_per_op, 1),
        hmac_us: round(hmacs.cpu_us_per_op, 2),
        aead_us_per_kib: round(aead.cpu_us_per_op, 2),
        handshake_us: round(handshake_us, 1),
        provisioning_us: round(provisioning_us, 1),
    })
}
