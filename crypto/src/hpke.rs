//! Sealing credentials to a key the device holds: HPKE (RFC 9180), base mode,
//! DHKEM(X25519, HKDF-SHA256) (KEM 0x0020), HKDF-SHA256 (KDF 0x0001), ChaCha20-Poly1305
//! (AEAD 0x0003), one single-shot message per encapsulation (RFC 9180 §6.1).
//!
//! ```text
//! info = "companion credential v1"                               (INFO)
//! aad  = u16-BE(len(device_id)) ‖ device_id (UTF-8) ‖ request_id (16 bytes)
//! (enc, ciphertext) = SealBase(pkR = device HPKE public key, info, aad, credential bundle)
//! ```
//!
//! The AAD ties the blob to the device and to the request it answers, so a companion that
//! relays it cannot hand it to another device or replay it against another request; it cannot
//! read it either (it has no device private key).
//!
//! # Which implementation does what
//!
//! - **Sealing** ([`seal_credential`], the hot path of credential issuance in cn-backend) does
//!   its X25519 with `ring` (assembly field arithmetic, a precomputed fixed-base table, and one
//!   public-key computation; the `hpke` crate's encap uses curve25519-dalek's portable code and
//!   computes the ephemeral public key twice). The rest is this module's own RFC 9180 code:
//!   DHKEM ExtractAndExpand (§4.1), the base-mode KeySchedule (§5.1) with HKDF-SHA256 written
//!   out over `hmac` (every output is at most Nh = 32 bytes, so HKDF-Expand is the single block
//!   T(1)), and one ChaCha20-Poly1305 seal (`chacha20poly1305`) under `base_nonce` (sequence
//!   number 0, §5.2). For a given ephemeral key the output is byte-for-byte what the `hpke`
//!   crate's SealBase produces (tests compare the two).
//! - The tests' **fixed-IKM sender** derives the ephemeral key with DeriveKeyPair (§7.1.3, the
//!   `hpke` crate) and does its DH with curve25519-dalek, then runs the *same* key-schedule and
//!   AEAD code, so RFC 9180 Appendix A.2.1 checks that code.
//! - **Opening** ([`open_credential`]) and device keys ([`DeviceHpkeKey`]) stay on the `hpke`
//!   crate (RustCrypto X25519/HKDF/ChaCha20-Poly1305), an independent implementation: every
//!   seal in the tests is opened by it.
//!
//! - Sealing comes in two halves: [`encapsulate`] (ephemeral key, X25519, key schedule: all
//!   the public-key work, and the only step a bad recipient key can fail) and
//!   [`CredentialSealer::seal`] (one AEAD seal). cn-backend runs the first half before it
//!   allocates the SUPI the bundle carries, so a bad key consumes nothing.
//! - [`check_public_key`] refuses a low-order recipient key up front (one X25519 with a fixed
//!   scalar, curve25519-dalek), for a relay that wants to refuse a request before queueing it.
//!
//! An all-zero X25519 shared secret (a low-order recipient key) is refused on every path
//! (§7.1.4): `ring`'s `agree_ephemeral` fails on it, the key schedule checks it again, and
//! [`check_public_key`] gives the same answer without an ephemeral key.
//! Secrets this module holds (shared secret, PRKs, AEAD key, base nonce) are zeroized on drop;
//! `ring` does not zeroize its ephemeral private key or the DH output buffer it lends out.
//!
//! Conformance: RFC 9180 Appendix A.2.1 (tests below).

#[cfg(test)]
use core::convert::Infallible;
use core::fmt;

use chacha20poly1305::aead::AeadInOut;
use hmac::{Hmac, KeyInit, Mac};
use hpke::aead::{AeadCtxR, ChaCha20Poly1305};
use hpke::kdf::HkdfSha256;
use hpke::kem::X25519HkdfSha256;
#[cfg(test)]
use hpke::rand_core::{TryCryptoRng, TryRng};
use hpke::{Deserializable, Kem as KemTrait, OpModeR, Serializable};
use ring::agreement::{self, EphemeralPrivateKey, UnparsedPublicKey, X25519};
use ring::rand::SystemRandom;
use sha2::Sha256;
use subtle::ConstantTimeEq;
use zeroize::{Zeroize, Zeroizing};

use crate::secret::Secret;

type Kem = X25519HkdfSha256;
type Kdf = HkdfSha256;
type Aead = ChaCha20Poly1305;
type PrivateKey = <Kem as KemTrait>::PrivateKey;
#[cfg(test)]
type PublicKey = <Kem as KemTrait>::PublicKey;
type EncappedKey = <Kem as KemTrait>::EncappedKey;
#[cfg(test)]
type SenderCtx = hpke::aead::AeadCtxS<Aead, Kdf, Kem>;
type ReceiverCtx = AeadCtxR<Aead, Kdf, Kem>;

/// HPKE `info` for credential sealing.
pub const INFO: &[u8] = b"companion credential v1";
/// KEM identifier, DHKEM(X25519, HKDF-SHA256) (RFC 9180 §7.1).
pub const KEM_ID: u16 = 0x0020;
/// KDF identifier, HKDF-SHA256 (RFC 9180 §7.2).
pub const KDF_ID: u16 = 0x0001;
/// AEAD identifier, ChaCha20-Poly1305 (RFC 9180 §7.3).
pub const AEAD_ID: u16 = 0x0003;
/// Length of `enc` and of public keys (Nenc = Npk = 32).
pub const ENC_LEN: usize = 32;
/// ChaCha20-Poly1305 tag length: `ciphertext.len() == plaintext.len() + TAG_LEN`.
pub const TAG_LEN: usize = 16;
/// Longest device ID the AAD's 16-bit length field can carry.
pub const MAX_DEVICE_ID_LEN: usize = u16::MAX as usize;

/// Mode identifier of base mode (RFC 9180 §5, Table 1).
const MODE_BASE: u8 = 0x00;
/// Prefix of every labeled KDF input (RFC 9180 §4).
const HPKE_V1: &[u8] = b"HPKE-v1";
/// `suite_id` of the KEM's own labeled KDF calls: `"KEM" ‖ I2OSP(kem_id, 2)` (RFC 9180 §4.1).
const KEM_SUITE_ID: [u8; 5] = {
    let k = KEM_ID.to_be_bytes();
    [b'K', b'E', b'M', k[0], k[1]]
};
/// `suite_id` of the key schedule: `"HPKE" ‖ I2OSP(kem_id, 2) ‖ I2OSP(kdf_id, 2) ‖
/// I2OSP(aead_id, 2)` (RFC 9180 §5.1).
const HPKE_SUITE_ID: [u8; 10] = {
    let (k, d, a) = (
        KEM_ID.to_be_bytes(),
        KDF_ID.to_be_bytes(),
        AEAD_ID.to_be_bytes(),
    );
    [b'H', b'P', b'K', b'E', k[0], k[1], d[0], d[1], a[0], a[1]]
};
/// Hash output length of SHA-256 (Nh).
const NH: usize = 32;
/// ChaCha20-Poly1305 key length (Nk).
const NK: usize = 32;
/// ChaCha20-Poly1305 nonce length (Nn).
const NN: usize = 12;

type HmacSha256 = Hmac<Sha256>;
/// AEAD key and base nonce of an HPKE context (RFC 9180 §5.1), wiped on drop.
type KeyAndNonce = (Zeroizing<[u8; NK]>, Zeroizing<[u8; NN]>);

/// HPKE failures. Opening reports one error for every kind of mismatch (wrong key, device ID,
/// request ID, tampered blob) so the cause cannot be probed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HpkeError {
    /// The recipient public key is unusable (a low-order X25519 point gives an all-zero shared
    /// secret, RFC 9180 §7.1.4).
    #[error("invalid recipient public key")]
    InvalidPublicKey,
    /// The device ID is longer than 65535 bytes.
    #[error("device ID too long: {0} bytes (max 65535)")]
    DeviceIdTooLong(usize),
    /// The credential could not be opened: wrong key, wrong device ID or request ID, or a
    /// modified `enc`/ciphertext.
    #[error("sealed credential could not be opened")]
    OpenFailed,
    /// Encryption failed.
    #[error("sealing failed")]
    SealFailed,
    /// The OS random number generator failed.
    #[error("OS random number generator failed")]
    Rng,
}

/// `u16-BE(len(device_id)) ‖ device_id ‖ request_id`. A device ID longer than 65535 bytes is
/// written with length 0xFFFF (the encoding stays unambiguous because `request_id` has a fixed
/// length), but [`seal_credential`]/[`open_credential`] refuse such IDs.
pub fn credential_aad(device_id: &str, request_id: &[u8; 16]) -> Vec<u8> {
    let id = device_id.as_bytes();
    let len = u16::try_from(id.len()).unwrap_or(u16::MAX);
    let mut aad = Vec::with_capacity(2 + id.len() + 16);
    aad.extend_from_slice(&len.to_be_bytes());
    aad.extend_from_slice(id);
    aad.extend_from_slice(request_id);
    aad
}

/// The device's X25519 private key. Zeroized on drop (the `hpke` crate wraps
/// `x25519_dalek::StaticSecret` with its `zeroize` feature); `Debug` shows only the public key.
#[derive(Clone)]
pub struct DeviceHpkeKey {
    sk: PrivateKey,
}

impl fmt::Debug for DeviceHpkeKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeviceHpkeKey")
            .field("public_key", &hex::encode(self.public_key()))
            .field("private_key", &"<redacted>")
            .finish()
    }
}

impl DeviceHpkeKey {
    /// A new key pair from the OS RNG (RFC 9180 §7.1.3: DeriveKeyPair of 32 random bytes).
    pub fn try_generate() -> Result<Self, HpkeError> {
        let ikm = Secret::<32>::try_random().map_err(|_| HpkeError::Rng)?;
        Ok(Self::derive(ikm.expose()))
    }

    /// A new key pair from the OS RNG.
    ///
    /// # Panics
    /// Only if the OS RNG fails (see [`DeviceHpkeKey::try_generate`]).
    pub fn generate() -> Self {
        match Self::try_generate() {
            Ok(k) => k,
            // INVARIANT: fails only when the kernel cannot provide randomness at all; a
            // predictable private key must never be produced. Use `try_generate` to handle it.
            #[allow(clippy::panic)]
            Err(e) => panic!("{e}"),
        }
    }

    /// RFC 9180 §7.1.3 DeriveKeyPair(ikm) for DHKEM(X25519, HKDF-SHA256). `ikm` should hold at
    /// least 32 bytes of entropy (e.g. a per-device seed in firmware).
    pub fn derive(ikm: &[u8]) -> Self {
        let (sk, _pk) = Kem::derive_keypair(ikm);
        Self { sk }
    }

    /// From the 32-byte private key (RFC 9180 DeserializePrivateKey: clamped on input).
    pub fn from_bytes(b: [u8; 32]) -> Self {
        let mut b = Zeroizing::new(b);
        #[allow(clippy::expect_used)]
        // INVARIANT: X25519 private-key deserialization only checks that the input is 32 bytes
        // long, which the array type guarantees; it cannot fail.
        let sk = PrivateKey::from_bytes(&*b).expect("32-byte X25519 private key");
        b.zeroize();
        Self { sk }
    }

    /// The 32-byte (clamped) private key, for storage in a 0600 file or a secure element.
    /// `from_bytes(k.to_bytes())` gives back the same key.
    pub fn to_bytes(&self) -> Secret<32> {
        let mut arr = self.sk.to_bytes();
        let mut out = [0u8; 32];
        out.copy_from_slice(&arr);
        arr.as_mut_slice().zeroize();
        let s = Secret::from_bytes(out);
        out.zeroize();
        s
    }

    /// The X25519 public key (RFC 9180 SerializePublicKey).
    pub fn public_key(&self) -> [u8; 32] {
        Kem::sk_to_pk(&self.sk).to_bytes().into()
    }
}

/// A credential sealed to a device key: the encapsulated key and the AEAD ciphertext (tag last).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SealedCredential {
    /// HPKE `enc` (the sender's ephemeral X25519 public key).
    pub enc: [u8; 32],
    /// ChaCha20-Poly1305 ciphertext ‖ 16-byte tag.
    pub ciphertext: Vec<u8>,
}

/// An RNG that yields the given 32 bytes of ephemeral IKM, so the ephemeral key can be drawn
/// fallibly (and, in tests, reproduced from RFC 9180's ikmE). If the KEM ever asks for more, the
/// extra bytes come from the OS RNG and a failure there is reported through `failed`.
#[cfg(test)]
struct IkmRng {
    ikm: Zeroizing<[u8; 32]>,
    used: usize,
    failed: bool,
}

#[cfg(test)]
impl IkmRng {
    fn new(ikm: Zeroizing<[u8; 32]>) -> Self {
        Self {
            ikm,
            used: 0,
            failed: false,
        }
    }
}

#[cfg(test)]
impl TryRng for IkmRng {
    type Error = Infallible;

    fn try_next_u32(&mut self) -> Result<u32, Infallible> {
        let mut b = [0u8; 4];
        self.try_fill_bytes(&mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    fn try_next_u64(&mut self) -> Result<u64, Infallible> {
        let mut b = [0u8; 8];
        self.try_fill_bytes(&mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    fn try_fill_bytes(&mut self, dst: &mut [u8]) -> Result<(), Infallible> {
        let from_ikm = dst.len().min(self.ikm.len() - self.used);
        dst[..from_ikm].copy_from_slice(&self.ikm[self.used..self.used + from_ikm]);
        self.used += from_ikm;
        let rest = &mut dst[from_ikm..];
        if !rest.is_empty() && getrandom::fill(rest).is_err() {
            self.failed = true;
        }
        Ok(())
    }
}

#[cfg(test)]
impl TryCryptoRng for IkmRng {}

/// The `hpke` crate's own SealBase sender (tests: RFC vectors and the byte-for-byte comparison
/// with [`seal_with_dh`]).
#[cfg(test)]
fn setup_sender(
    recipient_pk: &[u8; 32],
    info: &[u8],
    ikm_e: Zeroizing<[u8; 32]>,
) -> Result<([u8; 32], SenderCtx), HpkeError> {
    let pk = PublicKey::from_bytes(recipient_pk).map_err(|_| HpkeError::InvalidPublicKey)?;
    let mut rng = IkmRng::new(ikm_e);
    let (enc, ctx) =
        hpke::setup_sender_with_rng::<Aead, Kdf, Kem>(&hpke::OpModeS::Base, &pk, info, &mut rng)
            .map_err(|_| HpkeError::InvalidPublicKey)?;
    if rng.failed {
        return Err(HpkeError::Rng);
    }
    Ok((enc.to_bytes().into(), ctx))
}

fn setup_receiver(
    key: &DeviceHpkeKey,
    enc: &[u8; 32],
    info: &[u8],
) -> Result<ReceiverCtx, HpkeError> {
    let enc = EncappedKey::from_bytes(enc).map_err(|_| HpkeError::OpenFailed)?;
    hpke::setup_receiver::<Aead, Kdf, Kem>(&OpModeR::Base, &key.sk, &enc, info)
        .map_err(|_| HpkeError::OpenFailed)
}

fn check_device_id(device_id: &str) -> Result<(), HpkeError> {
    if device_id.len() > MAX_DEVICE_ID_LEN {
        return Err(HpkeError::DeviceIdTooLong(device_id.len()));
    }
    Ok(())
}

/// `HMAC-SHA-256(key, parts[0] ‖ parts[1] ‖ …)`.
fn hmac_sha256(key: &[u8], parts: &[&[u8]]) -> Result<Zeroizing<[u8; NH]>, HpkeError> {
    // HMAC takes keys of any length (RFC 2104 §2), so this never fails; no panic path anyway.
    let mut mac = HmacSha256::new_from_slice(key).map_err(|_| HpkeError::SealFailed)?;
    for p in parts {
        mac.update(p);
    }
    let mut tag = mac.finalize().into_bytes();
    let mut out = Zeroizing::new([0u8; NH]);
    out.copy_from_slice(&tag);
    tag.as_mut_slice().zeroize();
    Ok(out)
}

/// `LabeledExtract(salt, label, ikm) = HKDF-Extract(salt, "HPKE-v1" ‖ suite_id ‖ label ‖ ikm)`
/// (RFC 9180 §4). HKDF-Extract is `HMAC(salt, ikm)` (RFC 5869 §2.2); the empty salt is an empty
/// HMAC key, which HMAC pads to the same block as RFC 5869's HashLen zero bytes.
fn labeled_extract(
    suite_id: &[u8],
    salt: &[u8],
    label: &[u8],
    ikm: &[u8],
) -> Result<Zeroizing<[u8; NH]>, HpkeError> {
    hmac_sha256(salt, &[HPKE_V1, suite_id, label, ikm])
}

/// `LabeledExpand(prk, label, info, L) = HKDF-Expand(prk, I2OSP(L, 2) ‖ "HPKE-v1" ‖ suite_id ‖
/// label ‖ info, L)` (RFC 9180 §4), with `info` given in pieces. Every `L` used here is at most
/// Nh, so HKDF-Expand is its first block `T(1) = HMAC(prk, labeled_info ‖ 0x01)` truncated to
/// `L` (RFC 5869 §2.3).
fn labeled_expand<const L: usize>(
    suite_id: &[u8],
    prk: &[u8; NH],
    label: &[u8],
    info: &[&[u8]],
) -> Result<Zeroizing<[u8; L]>, HpkeError> {
    const { assert!(L <= NH, "single-block HKDF-Expand") };
    let len = u16::try_from(L)
        .map_err(|_| HpkeError::SealFailed)?
        .to_be_bytes();
    let mut mac = HmacSha256::new_from_slice(prk).map_err(|_| HpkeError::SealFailed)?;
    for p in [&len[..], HPKE_V1, suite_id, label] {
        mac.update(p);
    }
    for p in info {
        mac.update(p);
    }
    mac.update(&[0x01]);
    let mut t1 = mac.finalize().into_bytes();
    let mut out = Zeroizing::new([0u8; L]);
    out.copy_from_slice(&t1[..L]);
    t1.as_mut_slice().zeroize();
    Ok(out)
}

/// AEAD key and base nonce of a base-mode HPKE context, from the X25519 output `dh`:
/// DHKEM(X25519, HKDF-SHA256) ExtractAndExpand with `kem_context = enc ‖ pkR` (RFC 9180 §4.1),
/// then KeySchedule(mode_base, shared_secret, info, psk = "", psk_id = "") (§5.1).
/// An all-zero `dh` (low-order `pkR`) is refused (§7.1.4).
fn base_key_and_nonce(
    dh: &[u8],
    enc: &[u8; ENC_LEN],
    recipient_pk: &[u8; ENC_LEN],
    info: &[u8],
) -> Result<KeyAndNonce, HpkeError> {
    if dh.len() != 32 || bool::from(dh.ct_eq(&[0u8; 32])) {
        return Err(HpkeError::InvalidPublicKey);
    }
    let eae_prk = labeled_extract(&KEM_SUITE_ID, b"", b"eae_prk", dh)?;
    let shared_secret = labeled_expand::<NH>(
        &KEM_SUITE_ID,
        &eae_prk,
        b"shared_secret",
        &[enc, recipient_pk],
    )?;
    drop(eae_prk);

    let psk_id_hash = labeled_extract(&HPKE_SUITE_ID, b"", b"psk_id_hash", b"")?;
    let info_hash = labeled_extract(&HPKE_SUITE_ID, b"", b"info_hash", info)?;
    let key_schedule_context: [&[u8]; 3] = [&[MODE_BASE], &psk_id_hash[..], &info_hash[..]];
    let secret = labeled_extract(&HPKE_SUITE_ID, &shared_secret[..], b"secret", b"")?;
    drop(shared_secret);
    let key = labeled_expand::<NK>(&HPKE_SUITE_ID, &secret, b"key", &key_schedule_context)?;
    let base_nonce = labeled_expand::<NN>(
        &HPKE_SUITE_ID,
        &secret,
        b"base_nonce",
        &key_schedule_context,
    )?;
    Ok((key, base_nonce))
}

/// ChaCha20-Poly1305 seal of the single message of a base-mode context: nonce `base_nonce XOR
/// I2OSP(0, Nn) = base_nonce` (sequence number 0, RFC 9180 §5.2).
fn aead_seal(
    key: &[u8; NK],
    base_nonce: &[u8; NN],
    aad: &[u8],
    plaintext: &[u8],
) -> Result<Vec<u8>, HpkeError> {
    // The cipher keeps a copy of the key and wipes it on drop (`zeroize` feature).
    let cipher = chacha20poly1305::ChaCha20Poly1305::new(key.into());
    let mut ciphertext = Vec::with_capacity(plaintext.len() + TAG_LEN);
    ciphertext.extend_from_slice(plaintext);
    if cipher
        .encrypt_in_place(base_nonce.into(), aad, &mut ciphertext)
        .is_err()
    {
        ciphertext.zeroize();
        return Err(HpkeError::SealFailed);
    }
    Ok(ciphertext)
}

/// SealBase's single message from the X25519 output `dh` and the ephemeral public key `enc`:
/// [`base_key_and_nonce`], then [`aead_seal`]. The test sender's path.
#[cfg(test)]
fn seal_with_dh(
    dh: &[u8],
    enc: &[u8; ENC_LEN],
    recipient_pk: &[u8; ENC_LEN],
    info: &[u8],
    aad: &[u8],
    plaintext: &[u8],
) -> Result<SealedCredential, HpkeError> {
    let (key, base_nonce) = base_key_and_nonce(dh, enc, recipient_pk, info)?;
    Ok(SealedCredential {
        enc: *enc,
        ciphertext: aead_seal(&key, &base_nonce, aad, plaintext)?,
    })
}

/// The sender's half of one HPKE base-mode context for one credential (RFC 9180 §5.1): the
/// encapsulated key `enc`, the AEAD key and base nonce, and the credential AAD. Made by
/// [`encapsulate`], which does all the public-key work and refuses a low-order recipient key;
/// [`CredentialSealer::seal`] then seals exactly one plaintext (it consumes the sealer, so no
/// second message can reuse sequence number 0). Key and nonce are wiped on drop.
///
/// This split lets a caller check the recipient key and pay for the X25519 *before* it commits
/// to what the plaintext says (cn-backend allocates the SUPI the bundle carries only once
/// the key is known to be good).
pub struct CredentialSealer {
    enc: [u8; ENC_LEN],
    key: Zeroizing<[u8; NK]>,
    base_nonce: Zeroizing<[u8; NN]>,
    aad: Vec<u8>,
}

impl fmt::Debug for CredentialSealer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CredentialSealer")
            .field("enc", &hex::encode(self.enc))
            .field("key", &"<redacted>")
            .finish_non_exhaustive()
    }
}

impl CredentialSealer {
    /// The encapsulated key (the sender's ephemeral X25519 public key).
    pub fn enc(&self) -> [u8; ENC_LEN] {
        self.enc
    }

    /// Seals `plaintext` (the credential bundle): ChaCha20-Poly1305 under the context's key and
    /// base nonce, with the AAD of the device ID and request ID given to [`encapsulate`].
    pub fn seal(self, plaintext: &[u8]) -> Result<SealedCredential, HpkeError> {
        Ok(SealedCredential {
            enc: self.enc,
            ciphertext: aead_seal(&self.key, &self.base_nonce, &self.aad, plaintext)?,
        })
    }
}

/// The u-coordinates (little-endian, bit 255 clear) whose X25519 output is zero for every
/// clamped scalar: 0, 1, the two points of order 8, p − 1, and the non-canonical p and p + 1
/// (RFC 7748 §6.1; the same list as libsodium's `has_small_order`).
const LOW_ORDER_U: [[u8; 32]; 7] = [
    [0; 32],
    {
        let mut u = [0u8; 32];
        u[0] = 1;
        u
    },
    [
        0xe0, 0xeb, 0x7a, 0x7c, 0x3b, 0x41, 0xb8, 0xae, 0x16, 0x56, 0xe3, 0xfa, 0xf1, 0x9f, 0xc4,
        0x6a, 0xda, 0x09, 0x8d, 0xeb, 0x9c, 0x32, 0xb1, 0xfd, 0x86, 0x62, 0x05, 0x16, 0x5f, 0x49,
        0xb8, 0x00,
    ],
    [
        0x5f, 0x9c, 0x95, 0xbc, 0xa3, 0x50, 0x8c, 0x24, 0xb1, 0xd0, 0xb1, 0x55, 0x9c, 0x83, 0xef,
        0x5b, 0x04, 0x44, 0x5c, 0xc4, 0x58, 0x1c, 0x8e, 0x86, 0xd8, 0x22, 0x4e, 0xdd, 0xd0, 0x9f,
        0x11, 0x57,
    ],
    p_plus(0xec),
    p_plus(0xed),
    p_plus(0xee),
];

/// p − 1, p and p + 1 (p = 2^255 − 19): `low` then 30 bytes of 0xff and 0x7f.
const fn p_plus(low: u8) -> [u8; 32] {
    let mut u = [0xffu8; 32];
    u[0] = low;
    u[31] = 0x7f;
    u
}

/// Refuses an X25519 public key for which every HPKE encapsulation would give an all-zero
/// shared secret (RFC 7748 §6.1, RFC 9180 §7.1.4): the all-zero key and the other low-order
/// points of Curve25519 and its twist, in any encoding (bit 255 set, u ≥ p).
///
/// A comparison with the seven such u-coordinates, bit 255 ignored as X25519 ignores it: the
/// curve's 8-torsion has the u-coordinates 0, 1 and two of order 8, the twist's 4-torsion adds
/// p − 1, and only 0 and 1 have a second encoding below 2^255 (p and p + 1). The tests check
/// the list against an independent derivation (one X25519 with a fixed clamped scalar, which
/// is zero exactly on these points) on the list, its neighbours and random keys. It replaced
/// that scalar multiplication here: about 40 µs of gatewayd's CPU per device request (issue
/// 17). [`encapsulate`] and [`seal_credential`] check the real shared secret anyway.
pub fn check_public_key(pk: &[u8; 32]) -> Result<(), HpkeError> {
    let mut u = *pk;
    u[31] &= 0x7f;
    let mut low = subtle::Choice::from(0);
    for bad in &LOW_ORDER_U {
        low |= u.ct_eq(bad);
    }
    if bool::from(low) {
        return Err(HpkeError::InvalidPublicKey);
    }
    Ok(())
}

/// Starts one credential seal to the device key `recipient_pk`, bound to `device_id` and
/// `request_id` (the AAD): a fresh ephemeral key from `ring`'s system RNG, `enc` and the DH with
/// `ring`'s X25519, then the key schedule. A low-order recipient key is refused with
/// [`HpkeError::InvalidPublicKey`]: `agree_ephemeral` fails on an all-zero shared secret (ring
/// 0.17 `x25519_ecdh`), and the key schedule checks it again.
pub fn encapsulate(
    recipient_pk: &[u8; 32],
    device_id: &str,
    request_id: &[u8; 16],
) -> Result<CredentialSealer, HpkeError> {
    check_device_id(device_id)?;
    let sk_e =
        EphemeralPrivateKey::generate(&X25519, &SystemRandom::new()).map_err(|_| HpkeError::Rng)?;
    let enc: [u8; ENC_LEN] = sk_e
        .compute_public_key()
        .map_err(|_| HpkeError::SealFailed)?
        .as_ref()
        .try_into()
        .map_err(|_| HpkeError::SealFailed)?;
    let pk_r = UnparsedPublicKey::new(&X25519, recipient_pk);
    let (key, base_nonce) = agreement::agree_ephemeral(sk_e, &pk_r, |dh| {
        base_key_and_nonce(dh, &enc, recipient_pk, INFO)
    })
    .map_err(|_| HpkeError::InvalidPublicKey)??;
    Ok(CredentialSealer {
        enc,
        key,
        base_nonce,
        aad: credential_aad(device_id, request_id),
    })
}

/// Test sender: ephemeral key from DeriveKeyPair(ikmE) (RFC 9180 §7.1.3, the `hpke` crate), DH
/// with curve25519-dalek, then the same [`seal_with_dh`] as production.
#[cfg(test)]
fn seal_with_ikm(
    recipient_pk: &[u8; ENC_LEN],
    info: &[u8],
    aad: &[u8],
    plaintext: &[u8],
    ikm_e: &[u8],
) -> Result<SealedCredential, HpkeError> {
    let (sk_e, pk_e) = Kem::derive_keypair(ikm_e);
    let enc: [u8; ENC_LEN] = pk_e.to_bytes().into();
    let mut sk = Zeroizing::new([0u8; 32]);
    let mut sk_bytes = sk_e.to_bytes();
    sk.copy_from_slice(&sk_bytes);
    sk_bytes.as_mut_slice().zeroize();
    let dh = Zeroizing::new(
        curve25519_dalek::MontgomeryPoint(*recipient_pk)
            .mul_clamped(*sk)
            .to_bytes(),
    );
    seal_with_dh(&dh[..], &enc, recipient_pk, info, aad, plaintext)
}

/// Seals `plaintext` (the credential bundle) to the device key `recipient_pk`, bound to
/// `device_id` and `request_id` through the AAD: [`encapsulate`], then
/// [`CredentialSealer::seal`]. A fresh ephemeral key is drawn from the OS RNG (`ring`'s
/// `SystemRandom`); see the module docs for which implementation does what.
pub fn seal_credential(
    recipient_pk: &[u8; 32],
    device_id: &str,
    request_id: &[u8; 16],
    plaintext: &[u8],
) -> Result<SealedCredential, HpkeError> {
    encapsulate(recipient_pk, device_id, request_id)?.seal(plaintext)
}

/// Opens a sealed credential with the device key; `device_id` and `request_id` must be the
/// ones it was sealed for. The plaintext is wiped when the returned buffer is dropped.
pub fn open_credential(
    key: &DeviceHpkeKey,
    device_id: &str,
    request_id: &[u8; 16],
    sealed: &SealedCredential,
) -> Result<Zeroizing<Vec<u8>>, HpkeError> {
    check_device_id(device_id)?;
    let mut ctx = setup_receiver(key, &sealed.enc, INFO)?;
    let aad = credential_aad(device_id, request_id);
    ctx.open(&sealed.ciphertext, &aad)
        .map(Zeroizing::new)
        .map_err(|_| HpkeError::OpenFailed)
}

#[cfg(test)]
mod tests;
