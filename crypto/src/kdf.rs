//! The generic 3GPP key derivation function, TS 33.220 Annex B.2.
//!
//! `derived key = HMAC-SHA-256(Key, S)` with `S = FC || P0 || L0 || P1 || L1 || … || Pn || Ln`,
//! where `FC` is one octet identifying the derivation and `Li` is the length of `Pi` in octets as
//! a 2-octet big-endian integer (TS 33.220 B.2.1.2). Users in this crate: RES*/XRES*
//! (TS 33.501 A.4, FC = 0x6B) and the session binding ([`crate::binding`], FC = 0xF0, the value
//! fixed by this project's docs/ARCHITECTURE.md).

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

use crate::Error;

type HmacSha256 = Hmac<Sha256>;

/// `HMAC-SHA-256(key, FC || P0 || L0 || … || Pn || Ln)`, the full 256-bit output.
///
/// A parameter longer than 65535 octets cannot be described by the 2-octet `Li` of TS 33.220;
/// this function then writes `Li = 0xFFFF` (never panics). Use [`try_kdf`] to reject such input.
pub fn kdf(key: &[u8], fc: u8, params: &[&[u8]]) -> [u8; 32] {
    kdf_inner(key, fc, params)
}

/// Like [`kdf`], but rejects parameters longer than 65535 octets.
pub fn try_kdf(key: &[u8], fc: u8, params: &[&[u8]]) -> Result<[u8; 32], Error> {
    if let Some(p) = params.iter().find(|p| p.len() > usize::from(u16::MAX)) {
        return Err(Error::KdfParamTooLong(p.len()));
    }
    Ok(kdf_inner(key, fc, params))
}

fn kdf_inner(key: &[u8], fc: u8, params: &[&[u8]]) -> [u8; 32] {
    #[allow(clippy::expect_used)]
    // INVARIANT: HMAC accepts keys of any length (longer ones are hashed, RFC 2104 §2); the
    // `hmac` crate's `new_from_slice` for HMAC-SHA-256 always returns `Ok`.
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC accepts keys of any length");
    mac.update(&[fc]);
    for p in params {
        mac.update(p);
        let len = u16::try_from(p.len()).unwrap_or(u16::MAX);
        mac.update(&len.to_be_bytes());
    }
    mac.finalize().into_bytes().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(s: &str) -> Vec<u8> {
        hex::decode(s).unwrap()
    }

    /// RFC 5448 Appendix C, test case 1: CK' || IK' = KDF(CK || IK, FC = 0x20,
    /// P0 = access network identity "WLAN", P1 = SQN ⊕ AK) (TS 33.402 A.2, which uses the
    /// TS 33.220 KDF). The same vector is the KDF unit test of free5gc/util ueauth/ueauth_test.go.
    #[test]
    fn rfc5448_test_case_1_ck_ik_prime() {
        let key = h("5349fbe098649f948f5d2e973a81c00f9744871ad32bf9bbd1dd5ce54e3e2e5a");
        let out = kdf(&key, 0x20, &[b"WLAN", &h("bb52e91c747a")]);
        assert_eq!(
            hex::encode(out),
            "0093962d0dd84aa5684b045c9edffa04ccfc230ca74fcc96c0a5d61164f5a76c"
        );
        // A different P0 gives a different key.
        assert_ne!(kdf(&key, 0x20, &[b"WLANN", &h("bb52e91c747a")]), out);
    }

    #[test]
    fn matches_explicit_s_construction() {
        // S built by hand: FC || P0 || L0 || P1 || L1, HMAC-SHA-256 over it.
        let key = [0x0bu8; 32];
        let mut s = vec![0x6b];
        s.extend_from_slice(b"abc");
        s.extend_from_slice(&[0, 3]);
        s.extend_from_slice(&[9u8; 300]);
        s.extend_from_slice(&[1, 44]);
        let mut mac = HmacSha256::new_from_slice(&key).unwrap();
        mac.update(&s);
        let want: [u8; 32] = mac.finalize().into_bytes().into();
        assert_eq!(kdf(&key, 0x6b, &[b"abc", &[9u8; 300]]), want);
        // No parameters: S = FC.
        let mut mac = HmacSha256::new_from_slice(&key).unwrap();
        mac.update(&[0x6b]);
        let want: [u8; 32] = mac.finalize().into_bytes().into();
        assert_eq!(kdf(&key, 0x6b, &[]), want);
    }

    #[test]
    fn long_params() {
        let big = vec![0u8; 70_000];
        assert_eq!(
            try_kdf(b"k", 1, &[&big]),
            Err(Error::KdfParamTooLong(70_000))
        );
        let _ = kdf(b"k", 1, &[&big]); // no panic
        assert!(try_kdf(&[7u8; 200], 1, &[&[0u8; 65535]]).is_ok());
    }
}
