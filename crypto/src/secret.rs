//! Fixed-size secrets that zeroize on drop and never print their bytes.
//!
//! [`Secret<N>`] is the one type for K, OPc, CK, IK, private keys and other key material in this
//! workspace. It implements `Debug` (always redacted, e.g. `Secret<16>(<redacted>)`), never
//! `Display`, compares in constant time ([`subtle`]), and wipes its bytes when dropped
//! ([`zeroize`]). The bytes are reachable only through [`Secret::expose`], so every place that
//! touches key material is visible with a grep.

use core::fmt;

use subtle::ConstantTimeEq;
use zeroize::{Zeroize, ZeroizeOnDrop};

use crate::Error;

/// An `N`-byte secret: zeroized on drop, redacted in `Debug`, no `Display`, constant-time `==`.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct Secret<const N: usize>([u8; N]);

/// A 128-bit key (K, OPc, CK, IK).
pub type Key128 = Secret<16>;
/// A 256-bit key (X25519 private key, KDF outputs used as keys).
pub type Key256 = Secret<32>;

impl<const N: usize> Secret<N> {
    /// Wraps `b`. The caller's copy (if any) is the caller's to wipe.
    pub fn from_bytes(b: [u8; N]) -> Self {
        Self(b)
    }

    /// Copies a secret out of a slice of exactly `N` bytes.
    pub fn from_slice(b: &[u8]) -> Result<Self, Error> {
        let mut s = Self([0u8; N]);
        if b.len() != N {
            return Err(Error::InvalidLength {
                expected: N,
                actual: b.len(),
            });
        }
        s.0.copy_from_slice(b);
        Ok(s)
    }

    /// Draws `N` bytes from the operating system's RNG.
    pub fn try_random() -> Result<Self, Error> {
        let mut s = Self([0u8; N]);
        getrandom::fill(&mut s.0).map_err(|_| Error::Rng)?;
        Ok(s)
    }

    /// Draws `N` bytes from the operating system's RNG.
    ///
    /// # Panics
    /// Only if the OS RNG fails (see [`Secret::try_random`] for the fallible form).
    pub fn random() -> Self {
        match Self::try_random() {
            Ok(s) => s,
            // INVARIANT: getrandom on the supported targets (Linux getrandom(2), /dev/urandom
            // fallback) fails only if the kernel cannot provide randomness at all; continuing
            // without randomness would produce predictable keys, so stopping is the only safe
            // behaviour. Callers that must not stop use `try_random`.
            #[allow(clippy::panic)]
            Err(e) => panic!("OS random number generator failed: {e}"),
        }
    }

    /// Parses `2 * N` hex digits (upper or lower case). The error never contains the input.
    pub fn from_hex(s: &str) -> Result<Self, Error> {
        let mut out = Self([0u8; N]);
        // Decoding straight into the secret's own storage: no intermediate Vec to forget to wipe.
        hex::decode_to_slice(s.trim(), &mut out.0).map_err(|_| Error::InvalidHex {
            expected_len: 2 * N,
        })?;
        Ok(out)
    }

    /// The secret bytes. Keep the borrow short; do not copy them into types that do not zeroize.
    pub fn expose(&self) -> &[u8; N] {
        &self.0
    }

    /// Constant-time equality.
    pub fn ct_eq(&self, other: &Self) -> bool {
        bool::from(self.0.ct_eq(&other.0))
    }
}

impl<const N: usize> fmt::Debug for Secret<N> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Secret<{N}>(<redacted>)")
    }
}

/// Constant-time, so that `==` on secrets is never a timing oracle.
impl<const N: usize> PartialEq for Secret<N> {
    fn eq(&self, other: &Self) -> bool {
        Secret::ct_eq(self, other)
    }
}

impl<const N: usize> Eq for Secret<N> {}

impl<const N: usize> ConstantTimeEq for Secret<N> {
    fn ct_eq(&self, other: &Self) -> subtle::Choice {
        self.0.ct_eq(&other.0)
    }
}

impl<const N: usize> From<[u8; N]> for Secret<N> {
    fn from(b: [u8; N]) -> Self {
        Self(b)
    }
}

/// Constant-time comparison of two byte strings ([`subtle`]); `false` when the lengths differ
/// (the length itself is not treated as secret).
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && bool::from(a.ct_eq(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_is_redacted() {
        let k = Key128::from_hex("465b5ce8b199b49faa5f0a2ee238a6bc").unwrap();
        let dbg = format!("{k:?}");
        assert_eq!(dbg, "Secret<16>(<redacted>)");
        let alt = format!("{k:#?}");
        for needle in ["465b", "46 5b", "70, 91", "0x46", "465B"] {
            assert!(!dbg.contains(needle), "{dbg}");
            assert!(!alt.contains(needle), "{alt}");
        }
        // Every byte value in any common rendering must be absent.
        let bytes = k.expose();
        let decimal = format!("{:?}", bytes);
        assert!(!dbg.contains(&decimal[1..decimal.len() - 1]));
        let k32 = Key256::from_bytes([0xAB; 32]);
        let d32 = format!("{k32:?} {k32:#?}");
        assert!(!d32.to_lowercase().contains("ab"), "{d32}");
        assert!(!d32.contains("171"), "{d32}");
    }

    #[test]
    fn debug_of_containing_struct_is_redacted() {
        #[derive(Debug)]
        #[allow(dead_code)]
        struct Holder {
            k: Key128,
        }
        let h = Holder {
            k: Key128::from_bytes([0x5a; 16]),
        };
        let s = format!("{h:?}");
        assert!(!s.contains("5a") && !s.contains("90"), "{s}");
    }

    #[test]
    fn hex_round_trip_and_errors() {
        let k = Key128::from_hex("CD63CB71954A9F4E48A5994E37A02BAF").unwrap();
        assert_eq!(hex::encode(k.expose()), "cd63cb71954a9f4e48a5994e37a02baf");
        assert_eq!(
            Key128::from_hex("cd63"),
            Err(Error::InvalidHex { expected_len: 32 })
        );
        let bad = "zz63cb71954a9f4e48a5994e37a02baf";
        let e = Key128::from_hex(bad).unwrap_err();
        assert!(!e.to_string().contains("63cb"));
        assert!(Key128::from_hex("").is_err());
        assert!(Key128::from_hex("cd63cb71954a9f4e48a5994e37a02bafff").is_err());
    }

    #[test]
    fn from_slice_checks_length() {
        assert!(Key128::from_slice(&[0u8; 15]).is_err());
        assert!(Key128::from_slice(&[0u8; 17]).is_err());
        assert_eq!(
            Key128::from_slice(&[7u8; 16]).unwrap(),
            Key128::from_bytes([7u8; 16])
        );
    }

    #[test]
    fn ct_eq_works() {
        let a = Key128::from_bytes([1; 16]);
        let b = Key128::from_bytes([1; 16]);
        let mut c_bytes = [1; 16];
        c_bytes[15] = 2;
        let c = Key128::from_bytes(c_bytes);
        assert!(a.ct_eq(&b));
        assert!(!a.ct_eq(&c));
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert!(ct_eq(b"abc", b"abc"));
        assert!(!ct_eq(b"abc", b"abd"));
        assert!(!ct_eq(b"abc", b"abcd"));
        assert!(ct_eq(b"", b""));
    }

    #[test]
    fn random_differs() {
        let a = Key256::random();
        let b = Key256::random();
        assert_ne!(a, b);
        assert!(Key128::try_random().is_ok());
    }
}
