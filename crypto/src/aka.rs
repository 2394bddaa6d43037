//! 5G AKA building blocks: SQN, AUTN, RES*/XRES*, authentication vectors and AUTS.
//!
//! * AUTN = (SQN ⊕ AK) ‖ AMF ‖ MAC-A, MAC-A = f1_K(SQN ‖ RAND ‖ AMF), AK = f5_K(RAND)
//!   (TS 33.102 §6.3.2).
//! * RES*/XRES* = the 128 least significant bits of KDF(CK ‖ IK, FC = 0x6B,
//!   P0 = serving network name, P1 = RAND, P2 = RES) (TS 33.501 Annex A.4, KDF of TS 33.220
//!   Annex B.2). HRES*/HXRES* (Annex A.5) is [`hxres_star`].
//! * Serving network name `5G:mnc<MNC>.mcc<MCC>.3gppnetwork.org`, MNC always three digits
//!   (TS 33.501 §6.1.1.4, TS 24.501 §9.12.1).
//! * Resynchronisation (TS 33.102 §6.3.5): AUTS = (SQN_MS ⊕ AK*) ‖ MAC-S with
//!   AK* = f5*_K(RAND) and MAC-S = f1*_K(SQN_MS ‖ RAND ‖ AMF) where AMF is the dummy 0x0000
//!   (TS 33.102 §6.3.3).
//! * SQN management (TS 33.102 Annex C): SQN = SEQ (43 bits) ‖ IND (5 bits). The home network
//!   ([`next_sqn`]) increments SEQ for every vector and rotates IND through the 32 slots; the
//!   USIM ([`crate::usim::SqnState`]) keeps an array SEQ_MS(0..32) and accepts SQN when
//!   SEQ > SEQ_MS(IND) and SEQ − max(SEQ_MS) ≤ Δ = 2^28 (Annex C.2.2). The age limit L is not used.
//!
//! **Home-network SQN bookkeeping**: store the SQN of the last vector issued (start at
//! [`Sqn::ZERO`]); for each new vector use `next_sqn(stored)` and store that; after a
//! resynchronisation store `sqn_after_resync(verify_auts(..)?)` and use it for the next vector.

use core::borrow::Borrow;
use core::fmt;

use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::Error;
use crate::kdf::kdf;
use crate::milenage::Milenage;
use crate::secret::{Key128, ct_eq};

/// FC of the RES*/XRES* derivation (TS 33.501 A.4).
pub const RES_STAR_FC: u8 = 0x6B;
/// Number of IND bits in SQN (5, the profile of TS 33.102 Annex C.3.2).
pub const IND_BITS: u32 = 5;
/// Number of SEQ_MS slots in the USIM's array (2^IND_BITS).
pub const IND_COUNT: usize = 1 << IND_BITS;
/// Largest SEQ (43 bits).
pub const SEQ_MAX: u64 = (1 << 43) - 1;
/// Largest SQN (48 bits).
pub const SQN_MAX: u64 = (1 << 48) - 1;
/// Δ: the largest step in SEQ a USIM accepts above the highest SEQ it has seen (TS 33.102 C.2.2;
/// 2^28 as in the profile of Annex C.3.2).
pub const DELTA: u64 = 1 << 28;
/// AMF with the "separation bit" (bit 0, the most significant) set, as 5G AKA requires
/// (TS 33.501 §6.1.3.2, TS 33.102 Annex H); the other bits are zero. Use this when issuing vectors.
pub const AMF_5G: [u8; 2] = [0x80, 0x00];
/// The dummy AMF used in MAC-S (TS 33.102 §6.3.3).
pub const AMF_RESYNC: [u8; 2] = [0x00, 0x00];

/// True if the AMF separation bit (TS 33.102 Annex H, bit 0) is set.
pub fn amf_separation_bit(amf: &[u8; 2]) -> bool {
    amf[0] & 0x80 != 0
}

/// A 48-bit sequence number, SEQ (43 bits) ‖ IND (5 bits) (TS 33.102 Annex C.3.2).
///
/// Not secret (it is stored by the CN in the clear) but concealed with AK on the air.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Sqn(u64);

impl Sqn {
    /// SQN 0 (SEQ 0, IND 0): the initial value; a USIM never accepts it, so the first vector
    /// uses `next_sqn(Sqn::ZERO)`.
    pub const ZERO: Sqn = Sqn(0);

    /// `v` must fit in 48 bits.
    pub fn new(v: u64) -> Result<Self, Error> {
        if v > SQN_MAX {
            return Err(Error::SqnOutOfRange(v));
        }
        Ok(Self(v))
    }

    /// SEQ ‖ IND; `seq` must fit in 43 bits, `ind` in 5.
    pub fn from_parts(seq: u64, ind: u8) -> Result<Self, Error> {
        if seq > SEQ_MAX {
            return Err(Error::SqnOutOfRange(seq));
        }
        if usize::from(ind) >= IND_COUNT {
            return Err(Error::SqnOutOfRange(u64::from(ind)));
        }
        Ok(Self((seq << IND_BITS) | u64::from(ind)))
    }

    /// From the 6-octet big-endian encoding (accepts `[u8; 6]` or `&[u8; 6]`); every value is valid.
    pub fn from_bytes<B: Borrow<[u8; 6]>>(b: B) -> Self {
        let b = b.borrow();
        let mut w = [0u8; 8];
        w[2..].copy_from_slice(b);
        Self(u64::from_be_bytes(w))
    }

    /// From a 6-octet slice.
    pub fn from_slice(b: &[u8]) -> Result<Self, Error> {
        let arr: [u8; 6] = b.try_into().map_err(|_| Error::InvalidLength {
            expected: 6,
            actual: b.len(),
        })?;
        Ok(Self::from_bytes(arr))
    }

    /// The 6-octet big-endian encoding.
    pub fn to_bytes(self) -> [u8; 6] {
        let w = self.0.to_be_bytes();
        let mut o = [0u8; 6];
        o.copy_from_slice(&w[2..]);
        o
    }

    /// The 48-bit value.
    pub fn value(self) -> u64 {
        self.0
    }

    /// SEQ, the 43 most significant bits.
    pub fn seq(self) -> u64 {
        self.0 >> IND_BITS
    }

    /// IND, the 5 least significant bits.
    pub fn ind(self) -> u8 {
        // Masked to 5 bits, so the cast cannot truncate.
        (self.0 & (IND_COUNT as u64 - 1)) as u8
    }
}

impl fmt::Display for Sqn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:012x} (SEQ {}, IND {})",
            self.0,
            self.seq(),
            self.ind()
        )
    }
}

/// Errors of the AKA checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AkaError {
    /// MAC-A (in AUTN) or MAC-S (in AUTS) did not verify: wrong key, or a forged/corrupted token.
    #[error("MAC verification failed")]
    MacFailure,
    /// The sequence number was not fresh (replay, or the two sides are out of step).
    #[error("synchronisation failure: sequence number not acceptable")]
    SyncFailure,
}

/// The serving network name for 5G AKA: `5G:mnc<MNC>.mcc<MCC>.3gppnetwork.org`, with a 2-digit
/// MNC zero-padded to 3 digits (TS 33.501 §6.1.1.4, TS 24.501 §9.12.1, TS 23.003 §28.2).
///
/// Inputs are used as given apart from the padding; [`try_serving_network_name`] validates them.
pub fn serving_network_name(mcc: &str, mnc: &str) -> String {
    let mnc = mnc.trim();
    let mcc = mcc.trim();
    if mnc.len() == 2 {
        format!("5G:mnc0{mnc}.mcc{mcc}.3gppnetwork.org")
    } else {
        format!("5G:mnc{mnc}.mcc{mcc}.3gppnetwork.org")
    }
}

/// Like [`serving_network_name`], but requires a 3-digit MCC and a 2- or 3-digit MNC.
pub fn try_serving_network_name(mcc: &str, mnc: &str) -> Result<String, Error> {
    let digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if mcc.len() != 3 || !digits(mcc) || !(2..=3).contains(&mnc.len()) || !digits(mnc) {
        return Err(Error::InvalidPlmn);
    }
    Ok(serving_network_name(mcc, mnc))
}

/// RES* (UE) or XRES* (home network): the 128 least significant bits of
/// KDF(CK ‖ IK, 0x6B, serving network name, RAND, RES) (TS 33.501 A.4).
pub fn res_star(ck: &Key128, ik: &Key128, snn: &str, rand: &[u8; 16], res: &[u8]) -> [u8; 16] {
    let mut key = Zeroizing::new([0u8; 32]);
    key[..16].copy_from_slice(ck.expose());
    key[16..].copy_from_slice(ik.expose());
    let out = Zeroizing::new(kdf(&*key, RES_STAR_FC, &[snn.as_bytes(), rand, res]));
    let mut o = [0u8; 16];
    o.copy_from_slice(&out[16..]);
    o
}

/// HRES*/HXRES*: the 128 least significant bits of SHA-256(RAND ‖ (X)RES*) (TS 33.501 A.5).
pub fn hxres_star(rand: &[u8; 16], xres_star: &[u8; 16]) -> [u8; 16] {
    let mut h = Sha256::new();
    h.update(rand);
    h.update(xres_star);
    let d = h.finalize();
    let mut o = [0u8; 16];
    o.copy_from_slice(&d[16..]);
    o
}

/// AUTN = (SQN ⊕ AK) ‖ AMF ‖ MAC-A (TS 33.102 §6.3.2).
pub fn autn(m: &Milenage, sqn: Sqn, amf: &[u8; 2], rand: &[u8; 16]) -> [u8; 16] {
    let sqn_b = sqn.to_bytes();
    let ak = Zeroizing::new(m.f5(rand));
    let mac_a = m.f1(rand, &sqn_b, amf);
    let mut o = [0u8; 16];
    for i in 0..6 {
        o[i] = sqn_b[i] ^ ak[i];
    }
    o[6..8].copy_from_slice(amf);
    o[8..].copy_from_slice(&mac_a);
    o
}

/// USIM side of AUTN: recovers SQN and AMF and checks MAC-A in constant time
/// (TS 33.102 §6.3.3). Does *not* judge freshness (that needs the USIM's SEQ_MS array).
pub fn open_autn(
    m: &Milenage,
    rand: &[u8; 16],
    autn: &[u8; 16],
) -> Result<(Sqn, [u8; 2]), AkaError> {
    let ak = Zeroizing::new(m.f5(rand));
    let mut sqn_b = [0u8; 6];
    for i in 0..6 {
        sqn_b[i] = autn[i] ^ ak[i];
    }
    let amf = [autn[6], autn[7]];
    let xmac = m.f1(rand, &sqn_b, &amf);
    if !ct_eq(&xmac, &autn[8..16]) {
        return Err(AkaError::MacFailure);
    }
    Ok((Sqn::from_bytes(sqn_b), amf))
}

/// A 5G home-environment authentication vector (TS 33.501 §6.1.3.2, step 1), kept by the CN to
/// check the answer. `Debug` redacts `xres_star`, `ck` and `ik`.
#[derive(Clone)]
pub struct AuthVector {
    /// The challenge.
    pub rand: [u8; 16],
    /// The authentication token sent with RAND.
    pub autn: [u8; 16],
    /// The expected RES*; compare with [`crate::secret::ct_eq`].
    pub xres_star: [u8; 16],
    /// The cipher key (input to the session binding).
    pub ck: Key128,
    /// The integrity key (input to the session binding).
    pub ik: Key128,
}

impl fmt::Debug for AuthVector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthVector")
            .field("rand", &hex::encode(self.rand))
            .field("autn", &hex::encode(self.autn))
            .field("xres_star", &"<redacted>")
            .field("ck", &self.ck)
            .field("ik", &self.ik)
            .finish()
    }
}

impl AuthVector {
    /// Constant-time check of a presented RES* against XRES*.
    pub fn verify_res_star(&self, res_star: &[u8]) -> bool {
        ct_eq(&self.xres_star, res_star)
    }
}

/// Home-network side: builds the vector for `sqn` (TS 33.102 §6.3.2, TS 33.501 A.4).
pub fn generate_vector(
    m: &Milenage,
    sqn: Sqn,
    amf: &[u8; 2],
    rand: [u8; 16],
    snn: &str,
) -> AuthVector {
    let autn = autn(m, sqn, amf, &rand);
    let f = m.f2345(&rand);
    let xres_star = res_star(&f.ck, &f.ik, snn, &rand, &f.res);
    AuthVector {
        rand,
        autn,
        xres_star,
        ck: f.ck,
        ik: f.ik,
    }
}

/// A fresh RAND from the OS RNG.
pub fn try_random_rand() -> Result<[u8; 16], Error> {
    let mut r = [0u8; 16];
    getrandom::fill(&mut r).map_err(|_| Error::Rng)?;
    Ok(r)
}

/// A fresh RAND from the OS RNG.
///
/// # Panics
/// Only if the OS RNG fails (see [`try_random_rand`]).
pub fn random_rand() -> [u8; 16] {
    match try_random_rand() {
        Ok(r) => r,
        // INVARIANT: the OS RNG fails only when the kernel cannot provide randomness at all; a
        // predictable RAND would break AKA, so stopping is the only safe behaviour. Callers that
        // must not stop use `try_random_rand`.
        #[allow(clippy::panic)]
        Err(e) => panic!("OS random number generator failed: {e}"),
    }
}

/// USIM side of resynchronisation: AUTS = (SQN_MS ⊕ AK*) ‖ MAC-S (TS 33.102 §6.3.3).
pub fn auts(m: &Milenage, rand: &[u8; 16], sqn_ms: Sqn) -> [u8; 14] {
    let sqn_b = sqn_ms.to_bytes();
    let ak_star = Zeroizing::new(m.f5_star(rand));
    let mac_s = m.f1_star(rand, &sqn_b, &AMF_RESYNC);
    let mut o = [0u8; 14];
    for i in 0..6 {
        o[i] = sqn_b[i] ^ ak_star[i];
    }
    o[6..].copy_from_slice(&mac_s);
    o
}

/// Home-network side of resynchronisation (TS 33.102 §6.3.5): recovers SQN_MS from AUTS and
/// checks MAC-S = f1*(SQN_MS ‖ RAND ‖ AMF = 0x0000) in constant time. `rand` is the RAND of the
/// challenge that failed. Any 14 bytes are accepted as input; garbage yields
/// [`AkaError::MacFailure`].
pub fn verify_auts(m: &Milenage, rand: &[u8; 16], auts: &[u8; 14]) -> Result<Sqn, AkaError> {
    let ak_star = Zeroizing::new(m.f5_star(rand));
    let mut sqn_b = [0u8; 6];
    for i in 0..6 {
        sqn_b[i] = auts[i] ^ ak_star[i];
    }
    let xmac_s = m.f1_star(rand, &sqn_b, &AMF_RESYNC);
    if !ct_eq(&xmac_s, &auts[6..14]) {
        return Err(AkaError::MacFailure);
    }
    Ok(Sqn::from_bytes(sqn_b))
}

/// The SQN for the next vector after `current` (the last one issued): SEQ + 1 and the next IND
/// (cyclic), so consecutive vectors land in different USIM slots (TS 33.102 C.1.1, C.3.2).
/// SEQ saturates at 2^43 − 1 (unreachable in practice: 2^43 vectors).
pub fn next_sqn(current: Sqn) -> Sqn {
    let seq = current.seq().saturating_add(1).min(SEQ_MAX);
    let ind = (usize::from(current.ind()) + 1) % IND_COUNT;
    // Both parts are in range by construction; the fallback keeps this total without panicking.
    Sqn::from_parts(seq, ind as u8).unwrap_or(current)
}

/// The SQN for the first vector after a resynchronisation that reported `sqn_ms`
/// ([`verify_auts`]'s result): the next SEQ above SQN_MS's SEQ, IND rotated. Store it as the
/// home network's current SQN.
pub fn sqn_after_resync(sqn_ms: Sqn) -> Sqn {
    next_sqn(sqn_ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h<const N: usize>(s: &str) -> [u8; N] {
        let mut o = [0u8; N];
        hex::decode_to_slice(s, &mut o).unwrap();
        o
    }

    /// The "normal" case of wmnsk/milenage milenage_test.go (Go MILENAGE library, MIT):
    /// K = OP = RAND = 00112233445566778899aabbccddeeff, SQN = 1, AMF = 8000, MCC 001, MNC 01.
    fn wmnsk_case() -> Milenage {
        let k = Key128::from_hex("00112233445566778899aabbccddeeff").unwrap();
        let opc = Milenage::compute_opc(&k, &h("00112233445566778899aabbccddeeff"));
        assert_eq!(
            hex::encode(opc.expose()),
            "62e75b8d6fa5bf46ec87a9276f9df54d"
        );
        Milenage::new(&k, &opc)
    }

    #[test]
    fn serving_network_name_format() {
        assert_eq!(
            serving_network_name("208", "93"),
            "5G:mnc093.mcc208.3gppnetwork.org"
        );
        assert_eq!(
            serving_network_name("001", "01"),
            "5G:mnc001.mcc001.3gppnetwork.org"
        );
        assert_eq!(
            serving_network_name("310", "410"),
            "5G:mnc410.mcc310.3gppnetwork.org"
        );
        assert_eq!(
            try_serving_network_name("208", "093").unwrap(),
            "5G:mnc093.mcc208.3gppnetwork.org"
        );
        assert_eq!(
            try_serving_network_name("20", "93"),
            Err(Error::InvalidPlmn)
        );
        assert_eq!(
            try_serving_network_name("208", "9"),
            Err(Error::InvalidPlmn)
        );
        assert_eq!(
            try_serving_network_name("2o8", "93"),
            Err(Error::InvalidPlmn)
        );
        assert_eq!(
            try_serving_network_name("208", "9345"),
            Err(Error::InvalidPlmn)
        );
    }

    /// RES* published in wmnsk/milenage milenage_test.go (TestComputeRESStar, "001"/"01"):
    /// RES 700eb2300b2c4799, CK b379874b3d183d2a21291d439e7761e1,
    /// IK f4706f66629cf7ddf881d80025bf1255 → RES* 31b6d938a5290ccc65bc829f9820a8d9.
    #[test]
    fn res_star_published_vector() {
        let m = wmnsk_case();
        let rand: [u8; 16] = h("00112233445566778899aabbccddeeff");
        let f = m.f2345(&rand);
        assert_eq!(hex::encode(f.res), "700eb2300b2c4799");
        assert_eq!(
            hex::encode(f.ck.expose()),
            "b379874b3d183d2a21291d439e7761e1"
        );
        assert_eq!(
            hex::encode(f.ik.expose()),
            "f4706f66629cf7ddf881d80025bf1255"
        );
        assert_eq!(hex::encode(f.ak), "de656c8b0bce");
        let snn = serving_network_name("001", "01");
        let rs = res_star(&f.ck, &f.ik, &snn, &rand, &f.res);
        assert_eq!(hex::encode(rs), "31b6d938a5290ccc65bc829f9820a8d9");

        // The HN side produces the same value as XRES*, and the AUTN of the same source.
        let sqn = Sqn::new(1).unwrap();
        let v = generate_vector(&m, sqn, &AMF_5G, rand, &snn);
        assert_eq!(hex::encode(v.xres_star), "31b6d938a5290ccc65bc829f9820a8d9");
        assert_eq!(hex::encode(v.autn), "de656c8b0bcf80004af30b82a8531115");
        assert!(v.verify_res_star(&rs));
        assert!(!v.verify_res_star(&rs[..15]));
    }

    /// HXRES* for the same case, as printed by wmnsk/milenage's 5G-AKA example output
    /// ("HXRESStar= 3308fb7cf06a35f1cd086b904ce82ecf").
    #[test]
    fn hxres_star_published_vector() {
        let rand: [u8; 16] = h("00112233445566778899aabbccddeeff");
        let xs: [u8; 16] = h("31b6d938a5290ccc65bc829f9820a8d9");
        assert_eq!(
            hex::encode(hxres_star(&rand, &xs)),
            "3308fb7cf06a35f1cd086b904ce82ecf"
        );
    }

    /// AUTN vector from free5gc/util milenage/milenage_test.go (TestRAND): K 5122…5fc0,
    /// OP c9e8…887b, SQN 16f3b3f70fc2, RAND 81e9…dfa5, AMF c3ab.
    #[test]
    fn autn_free5gc_vector() {
        let k = Key128::from_hex("5122250214c33e723a5dd523fc145fc0").unwrap();
        let opc = Milenage::compute_opc(&k, &h("c9e8763286b5b9ffbdf56e1297d0887b"));
        assert_eq!(
            hex::encode(opc.expose()),
            "981d464c7c52eb6e5036234984ad0bcf"
        );
        let m = Milenage::new(&k, &opc);
        let rand: [u8; 16] = h("81e92b6c0ee0e12ebceba8d92a99dfa5");
        let sqn = Sqn::from_bytes(h::<6>("16f3b3f70fc2"));
        let a = autn(&m, sqn, &h("c3ab"), &rand);
        assert_eq!(hex::encode(a), "bb52e91c747ac3ab2a5c23d15ee351d5");
        let f = m.f2345(&rand);
        assert_eq!(
            hex::encode(f.ck.expose()),
            "5349fbe098649f948f5d2e973a81c00f"
        );
        assert_eq!(
            hex::encode(f.ik.expose()),
            "9744871ad32bf9bbd1dd5ce54e3e2e5a"
        );
        assert_eq!(open_autn(&m, &rand, &a), Ok((sqn, h("c3ab"))));
        let mut bad = a;
        bad[15] ^= 1;
        assert_eq!(open_autn(&m, &rand, &bad), Err(AkaError::MacFailure));
    }

    /// AUTS from wmnsk/milenage milenage_test.go: SQN_MS = 1, AK* = b9ac50c48a83,
    /// MAC-S (AMF 0000) = cdf74673bc86e7ab → AUTS b9ac50c48a82cdf74673bc86e7ab.
    #[test]
    fn auts_published_vector() {
        let m = wmnsk_case();
        let rand: [u8; 16] = h("00112233445566778899aabbccddeeff");
        assert_eq!(hex::encode(m.f5_star(&rand)), "b9ac50c48a83");
        let a = auts(&m, &rand, Sqn::new(1).unwrap());
        assert_eq!(hex::encode(a), "b9ac50c48a82cdf74673bc86e7ab");
        assert_eq!(verify_auts(&m, &rand, &a), Ok(Sqn::new(1).unwrap()));
    }

    #[test]
    fn verify_auts_rejects_garbage() {
        let m = wmnsk_case();
        let rand: [u8; 16] = h("00112233445566778899aabbccddeeff");
        for auts in [[0u8; 14], [0xffu8; 14], h("b9ac50c48a82cdf74673bc86e7aa")] {
            assert_eq!(verify_auts(&m, &rand, &auts), Err(AkaError::MacFailure));
        }
        // Right AUTS, wrong RAND.
        let a = auts(&m, &rand, Sqn::new(77).unwrap());
        assert_eq!(verify_auts(&m, &[0u8; 16], &a), Err(AkaError::MacFailure));
    }

    #[test]
    fn sqn_encoding_and_parts() {
        assert!(Sqn::new(SQN_MAX).is_ok());
        assert_eq!(
            Sqn::new(SQN_MAX + 1),
            Err(Error::SqnOutOfRange(SQN_MAX + 1))
        );
        let s = Sqn::from_parts(12345, 31).unwrap();
        assert_eq!(s.seq(), 12345);
        assert_eq!(s.ind(), 31);
        assert_eq!(Sqn::from_bytes(s.to_bytes()), s);
        let by_ref: &[u8; 6] = &s.to_bytes();
        assert_eq!(Sqn::from_bytes(by_ref), s);
        assert!(Sqn::from_parts(SEQ_MAX + 1, 0).is_err());
        assert!(Sqn::from_parts(0, 32).is_err());
        assert_eq!(Sqn::from_bytes([0xff; 6]).value(), SQN_MAX);
        assert_eq!(Sqn::from_slice(&[0, 0, 0, 0, 0, 33]).unwrap().value(), 33);
        assert!(Sqn::from_slice(&[0; 5]).is_err());
        assert_eq!(
            Sqn::from_bytes(h::<6>("ff9bb4d0b607")).to_bytes(),
            h::<6>("ff9bb4d0b607")
        );
        assert!(!Sqn::new(5).unwrap().to_string().is_empty());
    }

    #[test]
    fn next_sqn_rotates_ind() {
        let mut s = Sqn::ZERO;
        for i in 1..=70u64 {
            s = next_sqn(s);
            assert_eq!(s.seq(), i);
            assert_eq!(u64::from(s.ind()), i % 32);
        }
        let top = Sqn::from_parts(SEQ_MAX, 3).unwrap();
        assert_eq!(next_sqn(top).seq(), SEQ_MAX);
        let after = sqn_after_resync(Sqn::from_parts(1000, 7).unwrap());
        assert_eq!(after.seq(), 1001);
        assert_eq!(after.ind(), 8);
    }

    #[test]
    fn amf_bit() {
        assert!(amf_separation_bit(&AMF_5G));
        assert!(amf_separation_bit(&[0xb9, 0xb9]));
        assert!(!amf_separation_bit(&[0x00, 0x00]));
        assert!(!amf_separation_bit(&[0x7f, 0xff]));
    }

    #[test]
    fn auth_vector_debug_redacts() {
        let m = wmnsk_case();
        let v = generate_vector(&m, Sqn::new(1).unwrap(), &AMF_5G, [0; 16], "5G:x");
        let s = format!("{v:?}");
        assert!(!s.contains(&hex::encode(v.ck.expose())));
        assert!(!s.contains(&hex::encode(v.ik.expose())));
        assert!(!s.contains(&hex::encode(v.xres_star)));
        assert!(s.contains(&hex::encode(v.autn)));
    }
}
