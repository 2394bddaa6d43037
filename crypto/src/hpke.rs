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

/// A fixed scalar for [`check_public_key`]; any value works once clamped (see there).
const KEY_CHECK_SCALAR: [u8; 32] = *b"companion hpke public key check!";

/// Refuses an X25519 public key for which every HPKE encapsulation would give an all-zero
/// shared secret (RFC 7748 §6.1, RFC 9180 §7.1.4): the all-zero key and the other low-order
/// points of Curve25519 and its twist, in any encoding (bit 255 set, u ≥ p).
///
/// It computes one X25519 with a fixed scalar and checks the result is not zero, which is exact,
/// not a list: a clamped scalar is `8·s` with `2^251 ≤ s < 2^252`, so it kills the whole
/// 8-torsion of the curve (and the 4-torsion of the twist) and no point of the prime-order
/// subgroups (both primes exceed `s` and are odd). The output is therefore zero for this
/// scalar exactly when it is zero for every clamped scalar, the ephemeral one of a real
/// encapsulation included. Deterministic, no RNG; one variable-base scalar multiplication
/// (curve25519-dalek), for callers that want to refuse a key before doing anything with it.
/// [`encapsulate`] and [`seal_credential`] check the real shared secret anyway.
pub fn check_public_key(pk: &[u8; 32]) -> Result<(), HpkeError> {
    let dh = Zeroizing::new(
        curve25519_dalek::MontgomeryPoint(*pk)
            .mul_clamped(KEY_CHECK_SCALAR)
            .to_bytes(),
    );
    if bool::from(dh.ct_eq(&[0u8; 32])) {
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
mod tests {
    use super::*;

    fn h(s: &str) -> Vec<u8> {
        hex::decode(s).unwrap()
    }

    fn h32(s: &str) -> [u8; 32] {
        h(s).try_into().unwrap()
    }

    // RFC 9180 Appendix A.2.1: DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, ChaCha20Poly1305,
    // base mode (values from the RFC's source, cfrg/draft-irtf-cfrg-hpke draft-irtf-cfrg-hpke.md).
    const INFO_A21: &str = "4f6465206f6e2061204772656369616e2055726e";
    const IKM_E: &str = "909a9b35d3dc4713a5e72a4da274b55d3d3821a37e5d099e74a647db583a904b";
    const PK_EM: &str = "1afa08d3dec047a643885163f1180476fa7ddb54c6a8029ea33f95796bf2ac4a";
    const SK_EM: &str = "f4ec9b33b792c372c1d2c2063507b684ef925b8c75a42dbcbf57d63ccd381600";
    const IKM_R: &str = "1ac01f181fdf9f352797655161c58b75c656a6cc2716dcb66372da835542e1df";
    const PK_RM: &str = "4310ee97d88cc1f088a5576c77ab0cf5c3ac797f3d95139c6c84b5429c59662a";
    const SK_RM: &str = "8057991eef8f1f1af18f4a9491d16a1ce333f695d4db8e38da75975c4478e0fb";
    const PT: &str = "4265617574792069732074727574682c20747275746820626561757479";
    /// (sequence number, aad, ct)
    const ENCRYPTIONS: [(u32, &str, &str); 6] = [
        (
            0,
            "436f756e742d30",
            "1c5250d8034ec2b784ba2cfd69dbdb8af406cfe3ff938e131f0def8c8b60b4db21993c62ce81883d2dd1b51a28",
        ),
        (
            1,
            "436f756e742d31",
            "6b53c051e4199c518de79594e1c4ab18b96f081549d45ce015be002090bb119e85285337cc95ba5f59992dc98c",
        ),
        (
            2,
            "436f756e742d32",
            "71146bd6795ccc9c49ce25dda112a48f202ad220559502cef1f34271e0cb4b02b4f10ecac6f48c32f878fae86b",
        ),
        (
            4,
            "436f756e742d34",
            "63357a2aa291f5a4e5f27db6baa2af8cf77427c7c1a909e0b37214dd47db122bb153495ff0b02e9e54a50dbe16",
        ),
        (
            255,
            "436f756e742d323535",
            "18ab939d63ddec9f6ac2b60d61d36a7375d2070c9b683861110757062c52b8880a5f6b3936da9cd6c23ef2a95c",
        ),
        (
            256,
            "436f756e742d323536",
            "7a4a13e9ef23978e2c520fd4d2e757514ae160cd0cd05e556ef692370ca53076214c0c40d4c728d6ed9e727a5b",
        ),
    ];
    /// (exporter_context, exported_value), L = 32
    const EXPORTS: [(&str, &str); 3] = [
        (
            "",
            "4bbd6243b8bb54cec311fac9df81841b6fd61f56538a775e7c80a9f40160606e",
        ),
        (
            "00",
            "8c1df14732580e5501b00f82b10a1647b40713191b7c1240ac80e2b68808ba69",
        ),
        (
            "54657374436f6e74657874",
            "5acb09211139c43b3090489a9da433e8a30ee7188ba8b0a9a1ccf0c229283e53",
        ),
    ];

    fn clamp(mut k: [u8; 32]) -> [u8; 32] {
        k[0] &= 248;
        k[31] &= 127;
        k[31] |= 64;
        k
    }

    #[test]
    fn suite_ids() {
        assert_eq!(<Kem as KemTrait>::KEM_ID, KEM_ID);
        assert_eq!(<Kdf as hpke::kdf::Kdf>::KDF_ID, KDF_ID);
        assert_eq!(<Aead as hpke::aead::Aead>::AEAD_ID, AEAD_ID);
    }

    #[test]
    fn rfc9180_a21_derive_keypairs() {
        let eph = DeviceHpkeKey::derive(&h(IKM_E));
        assert_eq!(hex::encode(eph.public_key()), PK_EM);
        assert_eq!(eph.to_bytes().expose(), &clamp(h32(SK_EM)));
        let r = DeviceHpkeKey::derive(&h(IKM_R));
        assert_eq!(hex::encode(r.public_key()), PK_RM);
        assert_eq!(r.to_bytes().expose(), &clamp(h32(SK_RM)));
        // skRm as printed in the RFC (unclamped) deserializes to the same key.
        let r2 = DeviceHpkeKey::from_bytes(h32(SK_RM));
        assert_eq!(hex::encode(r2.public_key()), PK_RM);
        let r3 = DeviceHpkeKey::from_bytes(*r.to_bytes().expose());
        assert_eq!(r3.public_key(), r.public_key());
    }

    #[test]
    fn rfc9180_a21_sender_encryptions_and_exports() {
        let (enc, mut ctx) =
            setup_sender(&h32(PK_RM), &h(INFO_A21), Zeroizing::new(h32(IKM_E))).unwrap();
        assert_eq!(hex::encode(enc), PK_EM, "enc");
        let mut seq = 0u32;
        for (want_seq, aad, ct) in ENCRYPTIONS {
            // Advance the context's sequence number to `want_seq` with throw-away encryptions.
            while seq < want_seq {
                ctx.seal(b"", b"").unwrap();
                seq += 1;
            }
            assert_eq!(
                hex::encode(ctx.seal(&h(PT), &h(aad)).unwrap()),
                ct,
                "seq {want_seq}"
            );
            seq += 1;
        }
        for (exp_ctx, want) in EXPORTS {
            let mut out = [0u8; 32];
            ctx.export(&h(exp_ctx), &mut out).unwrap();
            assert_eq!(hex::encode(out), want, "export {exp_ctx:?}");
        }
    }

    #[test]
    fn rfc9180_a21_receiver_decryptions() {
        let r = DeviceHpkeKey::derive(&h(IKM_R));
        let mut ctx = setup_receiver(&r, &h32(PK_EM), &h(INFO_A21)).unwrap();
        // A sender with the RFC's ephemeral key steps the receiver over the skipped sequence
        // numbers (3, 5..=254): the receiver only advances on a successful open.
        let (_, mut step) =
            setup_sender(&h32(PK_RM), &h(INFO_A21), Zeroizing::new(h32(IKM_E))).unwrap();
        let mut seq = 0u32;
        for (want_seq, aad, ct) in ENCRYPTIONS {
            while seq < want_seq {
                let filler = step.seal(b"", b"").unwrap();
                ctx.open(&filler, b"").unwrap();
                seq += 1;
            }
            let pt = ctx.open(&h(ct), &h(aad)).unwrap();
            assert_eq!(hex::encode(pt), PT, "seq {want_seq}");
            step.seal(b"", b"").unwrap();
            seq += 1;
        }
        for (exp_ctx, want) in EXPORTS {
            let mut out = [0u8; 32];
            ctx.export(&h(exp_ctx), &mut out).unwrap();
            assert_eq!(hex::encode(out), want);
        }
    }

    #[test]
    fn seal_with_fixed_ikm_gives_rfc_enc() {
        // The production path (INFO and credential AAD) with the RFC's ephemeral IKM: `enc`
        // depends only on ikmE, so it must equal pkEm; the device key opens the result.
        let r = DeviceHpkeKey::derive(&h(IKM_R));
        let aad = credential_aad("watch-1", &[9; 16]);
        let sealed = seal_with_ikm(&r.public_key(), INFO, &aad, b"bundle", &h(IKM_E)).unwrap();
        assert_eq!(hex::encode(sealed.enc), PK_EM);
        assert_eq!(sealed.ciphertext.len(), 6 + TAG_LEN);
        let pt = open_credential(&r, "watch-1", &[9; 16], &sealed).unwrap();
        assert_eq!(pt.as_slice(), b"bundle");
    }

    fn random<const N: usize>() -> [u8; N] {
        let mut b = [0u8; N];
        getrandom::fill(&mut b).unwrap();
        b
    }

    /// Low-order X25519 u-coordinates (RFC 7748 §6.1 discussions; the list libsodium and
    /// BoringSSL reject): 0, 1, the two order-8 points, p − 1, p, p + 1, and the same values
    /// with bit 255 set (which X25519 ignores).
    fn low_order_points() -> Vec<[u8; 32]> {
        let base = [
            "0000000000000000000000000000000000000000000000000000000000000000",
            "0100000000000000000000000000000000000000000000000000000000000000",
            "e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800",
            "5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157",
            "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
            "edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
            "eeffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
        ];
        let mut all = Vec::new();
        for p in base {
            let p = h32(p);
            let mut hi = p;
            hi[31] |= 0x80;
            all.extend([p, hi]);
        }
        all
    }

    #[test]
    fn rfc9180_a21_through_seal_with_dh() {
        // The shared key schedule and AEAD code, fed by the test sender with the RFC's ikmE,
        // give the RFC's enc and its sequence-0 ciphertext.
        let (_, aad, ct) = ENCRYPTIONS[0];
        let sealed = seal_with_ikm(&h32(PK_RM), &h(INFO_A21), &h(aad), &h(PT), &h(IKM_E)).unwrap();
        assert_eq!(hex::encode(sealed.enc), PK_EM);
        assert_eq!(hex::encode(&sealed.ciphertext), ct);
    }

    #[test]
    fn seal_with_dh_matches_hpke_crate_byte_for_byte() {
        // For the same ephemeral IKM, the module's key schedule + AEAD and the `hpke` crate's
        // SealBase agree on arbitrary recipient keys (incl. bit 255 set / non-canonical ones),
        // info, AAD and plaintext lengths.
        for i in 0..200usize {
            let ikm: [u8; 32] = random();
            let pk: [u8; 32] = random();
            let info = &random::<64>()[..i % 64];
            let aad = &random::<64>()[..(i * 7) % 64];
            let pt = vec![i as u8; (i * 13) % 700];
            let ours = seal_with_ikm(&pk, info, aad, &pt, &ikm);
            let theirs = setup_sender(&pk, info, Zeroizing::new(ikm))
                .map(|(enc, mut ctx)| (enc, ctx.seal(&pt, aad).unwrap()));
            match (ours, theirs) {
                (Ok(o), Ok((enc, ct))) => {
                    assert_eq!(o.enc, enc, "case {i}");
                    assert_eq!(o.ciphertext, ct, "case {i}");
                }
                (o, t) => panic!("case {i}: {o:?} vs {t:?}"),
            }
        }
    }

    #[test]
    fn ring_seals_open_with_hpke_crate_and_tampering_fails() {
        let fail = Err(HpkeError::OpenFailed);
        let mut dev = DeviceHpkeKey::generate();
        for i in 0..300usize {
            if i % 25 == 0 {
                dev = DeviceHpkeKey::generate();
            }
            let device_id = format!("dev-{i}");
            let req: [u8; 16] = random();
            let pt: Vec<u8> = (0..(i * 37) % 900).map(|j| (i ^ j) as u8).collect();
            let sealed = seal_credential(&dev.public_key(), &device_id, &req, &pt).unwrap();
            assert_eq!(sealed.ciphertext.len(), pt.len() + TAG_LEN);
            let opened = open_credential(&dev, &device_id, &req, &sealed).unwrap();
            assert_eq!(opened.as_slice(), pt.as_slice(), "case {i}");

            let bit = i % 8;
            let mut t = sealed.clone();
            t.enc[i % 32] ^= 1 << bit;
            assert_eq!(open_credential(&dev, &device_id, &req, &t), fail, "enc {i}");
            let mut t = sealed.clone();
            let n = t.ciphertext.len();
            t.ciphertext[(i * 5) % n] ^= 1 << bit;
            assert_eq!(open_credential(&dev, &device_id, &req, &t), fail, "ct {i}");
            let mut req2 = req;
            req2[i % 16] ^= 1 << bit;
            assert_eq!(
                open_credential(&dev, &device_id, &req2, &sealed),
                fail,
                "rid {i}"
            );
            let other_id = format!("dev-{i}x");
            assert_eq!(
                open_credential(&dev, &other_id, &req, &sealed),
                fail,
                "id {i}"
            );
        }
    }

    #[test]
    fn ring_dh_equals_dalek_dh_on_non_canonical_recipient_key() {
        // bit 255 set: X25519 ignores it (RFC 7748 §5), but kem_context carries the raw bytes.
        // Decrypt by hand with a dalek DH on the device side and the raw pkR.
        let dev = DeviceHpkeKey::generate();
        let mut pk = dev.public_key();
        pk[31] |= 0x80;
        let aad = credential_aad("d", &[1; 16]);
        let sealed = seal_credential(&pk, "d", &[1; 16], b"masked").unwrap();
        let dh = curve25519_dalek::MontgomeryPoint(sealed.enc)
            .mul_clamped(*dev.to_bytes().expose())
            .to_bytes();
        let (key, nonce) = base_key_and_nonce(&dh, &sealed.enc, &pk, INFO).unwrap();
        let cipher = chacha20poly1305::ChaCha20Poly1305::new((&*key).into());
        let mut buf = sealed.ciphertext.clone();
        cipher
            .decrypt_in_place((&*nonce).into(), &aad, &mut buf)
            .unwrap();
        assert_eq!(buf, b"masked");
    }

    #[test]
    fn low_order_recipient_keys_are_refused() {
        for p in low_order_points() {
            assert_eq!(
                seal_credential(&p, "d", &[0; 16], b"x"),
                Err(HpkeError::InvalidPublicKey),
                "ring path {}",
                hex::encode(p)
            );
            assert_eq!(
                seal_with_ikm(&p, INFO, b"", b"x", &h(IKM_E)),
                Err(HpkeError::InvalidPublicKey),
                "dalek path {}",
                hex::encode(p)
            );
        }
        assert_eq!(
            base_key_and_nonce(&[0; 32], &[1; 32], &[2; 32], INFO).map(|_| ()),
            Err(HpkeError::InvalidPublicKey)
        );
    }

    #[test]
    fn check_public_key_refuses_exactly_the_low_order_points() {
        for p in low_order_points() {
            assert_eq!(
                check_public_key(&p),
                Err(HpkeError::InvalidPublicKey),
                "{}",
                hex::encode(p)
            );
            assert_eq!(
                encapsulate(&p, "d", &[0; 16]).map(|_| ()),
                Err(HpkeError::InvalidPublicKey),
                "{}",
                hex::encode(p)
            );
        }
        // The small-order set derived independently of the list: the eight torsion points of
        // the curve, and each of them added to a point of the prime-order subgroup (a "mixed"
        // key: X25519 with it is not zero, so it is usable and must be accepted).
        for (i, t) in curve25519_dalek::constants::EIGHT_TORSION
            .iter()
            .enumerate()
        {
            let u = t.to_montgomery().to_bytes();
            assert_eq!(
                check_public_key(&u),
                Err(HpkeError::InvalidPublicKey),
                "T{i}"
            );
            let s = curve25519_dalek::Scalar::from_bytes_mod_order(random());
            let mixed = (curve25519_dalek::constants::ED25519_BASEPOINT_POINT * s + t)
                .to_montgomery()
                .to_bytes();
            assert_eq!(check_public_key(&mixed), Ok(()), "B*s + T{i}");
            assert!(encapsulate(&mixed, "d", &[0; 16]).is_ok(), "B*s + T{i}");
        }
        // Real device keys and arbitrary bytes (incl. bit 255 set) pass, as with a real seal.
        for i in 0..200 {
            let pk = if i % 2 == 0 {
                DeviceHpkeKey::generate().public_key()
            } else {
                random()
            };
            assert_eq!(check_public_key(&pk), Ok(()), "{}", hex::encode(pk));
            assert!(encapsulate(&pk, "d", &[0; 16]).is_ok());
        }
    }

    #[test]
    fn encapsulate_then_seal_opens_with_the_device_key() {
        let dev = DeviceHpkeKey::generate();
        let sealer = encapsulate(&dev.public_key(), "cam-7", &[5; 16]).unwrap();
        let enc = sealer.enc();
        let dbg = format!("{sealer:?}");
        assert!(
            dbg.contains(&hex::encode(enc)) && dbg.contains("redacted"),
            "{dbg}"
        );
        let sealed = sealer.seal(b"bundle bytes").unwrap();
        assert_eq!(sealed.enc, enc);
        let pt = open_credential(&dev, "cam-7", &[5; 16], &sealed).unwrap();
        assert_eq!(pt.as_slice(), b"bundle bytes");
        assert_eq!(
            open_credential(&dev, "cam-7", &[6; 16], &sealed),
            Err(HpkeError::OpenFailed)
        );
        let long = "x".repeat(MAX_DEVICE_ID_LEN + 1);
        assert_eq!(
            encapsulate(&dev.public_key(), &long, &[0; 16]).map(|_| ()),
            Err(HpkeError::DeviceIdTooLong(MAX_DEVICE_ID_LEN + 1))
        );
    }

    #[test]
    fn aad_layout() {
        let aad = credential_aad("dev", &[0xAA; 16]);
        let mut want = vec![0x00, 0x03, b'd', b'e', b'v'];
        want.extend_from_slice(&[0xAA; 16]);
        assert_eq!(aad, want);
        assert_eq!(credential_aad("", &[0; 16]).len(), 18);
        // Non-ASCII: length is in bytes.
        assert_eq!(&credential_aad("ü", &[0; 16])[..2], &[0, 2]);
        let long = "x".repeat(70_000);
        assert_eq!(&credential_aad(&long, &[0; 16])[..2], &[0xff, 0xff]);
    }

    #[test]
    fn seal_open_round_trip_and_failures() {
        let dev = DeviceHpkeKey::generate();
        let other = DeviceHpkeKey::generate();
        let req = [7u8; 16];
        let bundle = b"supi=imsi-001010000000042;k=...;opc=...".to_vec();
        let sealed = seal_credential(&dev.public_key(), "sensor-42", &req, &bundle).unwrap();
        assert_eq!(sealed.ciphertext.len(), bundle.len() + TAG_LEN);
        assert_ne!(&sealed.ciphertext[..bundle.len()], bundle.as_slice());
        let pt = open_credential(&dev, "sensor-42", &req, &sealed).unwrap();
        assert_eq!(pt.as_slice(), bundle.as_slice());

        // Two seals of the same bundle differ (fresh ephemeral key).
        let sealed2 = seal_credential(&dev.public_key(), "sensor-42", &req, &bundle).unwrap();
        assert_ne!(sealed.enc, sealed2.enc);

        let fail = Err(HpkeError::OpenFailed);
        assert_eq!(
            open_credential(&other, "sensor-42", &req, &sealed),
            fail,
            "wrong key"
        );
        assert_eq!(
            open_credential(&dev, "sensor-43", &req, &sealed),
            fail,
            "wrong device"
        );
        assert_eq!(
            open_credential(&dev, "sensor-42", &[8; 16], &sealed),
            fail,
            "wrong request"
        );
        let mut t = sealed.clone();
        t.ciphertext[0] ^= 1;
        assert_eq!(
            open_credential(&dev, "sensor-42", &req, &t),
            fail,
            "tampered ct"
        );
        let mut t = sealed.clone();
        t.enc[0] ^= 1;
        assert_eq!(
            open_credential(&dev, "sensor-42", &req, &t),
            fail,
            "tampered enc"
        );
        let mut t = sealed.clone();
        t.ciphertext.truncate(5);
        assert_eq!(
            open_credential(&dev, "sensor-42", &req, &t),
            fail,
            "truncated"
        );
        t.ciphertext.clear();
        assert_eq!(open_credential(&dev, "sensor-42", &req, &t), fail, "empty");
        let zero_enc = SealedCredential {
            enc: [0; 32],
            ciphertext: sealed.ciphertext.clone(),
        };
        assert_eq!(
            open_credential(&dev, "sensor-42", &req, &zero_enc),
            fail,
            "low-order enc"
        );

        // Empty plaintext works.
        let e = seal_credential(&dev.public_key(), "d", &req, b"").unwrap();
        assert!(open_credential(&dev, "d", &req, &e).unwrap().is_empty());
    }

    #[test]
    fn bad_inputs_are_errors() {
        // Low-order recipient key: all-zero DH output must be refused (RFC 9180 §7.1.4).
        assert_eq!(
            seal_credential(&[0u8; 32], "d", &[0; 16], b"x"),
            Err(HpkeError::InvalidPublicKey)
        );
        let mut one = [0u8; 32];
        one[0] = 1;
        assert_eq!(
            seal_credential(&one, "d", &[0; 16], b"x"),
            Err(HpkeError::InvalidPublicKey)
        );
        let long = "x".repeat(MAX_DEVICE_ID_LEN + 1);
        let dev = DeviceHpkeKey::generate();
        assert_eq!(
            seal_credential(&dev.public_key(), &long, &[0; 16], b"x"),
            Err(HpkeError::DeviceIdTooLong(MAX_DEVICE_ID_LEN + 1))
        );
        let ok_long = "x".repeat(MAX_DEVICE_ID_LEN);
        let s = seal_credential(&dev.public_key(), &ok_long, &[0; 16], b"x").unwrap();
        assert!(open_credential(&dev, &ok_long, &[0; 16], &s).is_ok());
    }

    #[test]
    fn key_debug_is_redacted() {
        let k = DeviceHpkeKey::derive(&h(IKM_R));
        let s = format!("{k:?}");
        assert!(s.contains(PK_RM));
        let sk = hex::encode(k.to_bytes().expose());
        assert!(
            !s.contains(&sk) && !s.contains(&sk[..8]) && !s.contains("8057991e"),
            "{s}"
        );
    }

    #[test]
    fn ikm_rng_overdraw_uses_os_rng() {
        let mut r = IkmRng::new(Zeroizing::new([1u8; 32]));
        let mut a = [0u8; 40];
        r.try_fill_bytes(&mut a).unwrap();
        assert_eq!(&a[..32], &[1u8; 32]);
        let _ = (r.try_next_u32().unwrap(), r.try_next_u64().unwrap());
        assert!(!r.failed);
    }
}
