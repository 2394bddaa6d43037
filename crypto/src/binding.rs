//! Binding the AKA result to one TLS session.
//!
//! After AKA the UE side proves it holds CK/IK *for this TLS session*:
//!
//! ```text
//! tls_exporter = TLS-Exporter(label = "EXPORTER-companion-aka-binding", context = "", L = 32)  (RFC 8446 §7.5)
//! binding      = KDF(CK ‖ IK, FC = 0xF0, P0 = "companion session binding", P1 = tls_exporter)   (TS 33.220 B.2)
//! ```
//!
//! The full 32-byte KDF output is sent. A binding captured in one TLS session is useless in
//! another, because the exporter differs (docs/ARCHITECTURE.md, "Fixed choices").

use zeroize::Zeroizing;

use crate::kdf::kdf;
use crate::secret::{Key128, ct_eq};

/// FC of the session binding derivation.
pub const BINDING_FC: u8 = 0xF0;
/// TLS exporter label (RFC 8446 §7.5), used with an empty context and 32 output bytes.
pub const EXPORTER_LABEL: &[u8] = b"EXPORTER-companion-aka-binding";
/// The exporter output length.
pub const EXPORTER_LEN: usize = 32;
/// P0 of the binding derivation.
pub const BINDING_P0: &[u8] = b"companion session binding";

/// `KDF(CK ‖ IK, 0xF0, "companion session binding", tls_exporter)`, all 32 bytes.
pub fn session_binding(ck: &Key128, ik: &Key128, tls_exporter: &[u8; 32]) -> [u8; 32] {
    let mut key = Zeroizing::new([0u8; 32]);
    key[..16].copy_from_slice(ck.expose());
    key[16..].copy_from_slice(ik.expose());
    kdf(&*key, BINDING_FC, &[BINDING_P0, tls_exporter])
}

/// Recomputes the binding and compares it with `presented` in constant time.
pub fn verify_session_binding(
    ck: &Key128,
    ik: &Key128,
    tls_exporter: &[u8; 32],
    presented: &[u8; 32],
) -> bool {
    let expected = Zeroizing::new(session_binding(ck, ik, tls_exporter));
    ct_eq(&*expected, presented)
}

#[cfg(test)]
mod tests {
    use super::*;
    use hmac::{Hmac, KeyInit, Mac};
    use sha2::Sha256;

    #[test]
    fn binding_is_the_ts33220_kdf_with_fc_f0() {
        let ck = Key128::from_bytes([1; 16]);
        let ik = Key128::from_bytes([2; 16]);
        let exp = [3u8; 32];
        // S = 0xF0 || P0 || L0 || P1 || L1, key = CK || IK, computed by hand.
        let mut key = [1u8; 32];
        key[16..].fill(2);
        let mut mac = Hmac::<Sha256>::new_from_slice(&key).unwrap();
        mac.update(&[0xF0]);
        mac.update(b"companion session binding");
        mac.update(&[0x00, 25]);
        mac.update(&exp);
        mac.update(&[0x00, 32]);
        let want: [u8; 32] = mac.finalize().into_bytes().into();
        assert_eq!(session_binding(&ck, &ik, &exp), want);
        assert!(verify_session_binding(&ck, &ik, &exp, &want));
    }

    #[test]
    fn binding_depends_on_every_input() {
        let ck = Key128::from_bytes([1; 16]);
        let ik = Key128::from_bytes([2; 16]);
        let exp = [3u8; 32];
        let b = session_binding(&ck, &ik, &exp);
        assert!(
            !verify_session_binding(&ck, &ik, &[4u8; 32], &b),
            "other TLS session"
        );
        assert!(!verify_session_binding(&ik, &ck, &exp, &b), "CK/IK swapped");
        assert!(!verify_session_binding(
            &Key128::from_bytes([9; 16]),
            &ik,
            &exp,
            &b
        ));
        let mut tampered = b;
        tampered[31] ^= 0x80;
        assert!(!verify_session_binding(&ck, &ik, &exp, &tampered));
    }
}
