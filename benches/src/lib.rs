//! Fixtures shared by the criterion benchmarks in `benches/` (run them with
//! `cargo bench -p companion-benches`; figures and method in `docs/BENCHMARKS.md`).
#![forbid(unsafe_code)]
#![warn(missing_docs)]

use companion_crypto::milenage::Milenage;
use companion_crypto::secret::Key128;

/// TS 35.208 test set 1: K and OPc.
pub const K: [u8; 16] = [
    0x46, 0x5b, 0x5c, 0xe8, 0xb1, 0x99, 0xb4, 0x9f, 0xaa, 0x5f, 0x0a, 0x2e, 0xe2, 0x38, 0xa6, 0xbc,
];
/// TS 35.208 test set 1: OPc.
pub const OPC: [u8; 16] = [
    0xcd, 0x63, 0xcb, 0x71, 0x95, 0x4a, 0x9f, 0x4e, 0x48, 0xa5, 0x99, 0x4e, 0x37, 0xa0, 0x2b, 0xaf,
];
/// TS 35.208 test set 1: RAND.
pub const RAND: [u8; 16] = [
    0x23, 0x55, 0x3c, 0xbe, 0x96, 0x37, 0xa8, 0x9d, 0x21, 0x8a, 0xe6, 0x4d, 0xae, 0x47, 0xbf, 0x35,
];
/// The serving network name used throughout (MCC 001, MNC 01).
pub const SNN: &str = "5G:mnc001.mcc001.3gppnetwork.org";

/// Milenage keyed with test set 1.
pub fn milenage() -> Milenage {
    Milenage::new(&Key128::from_bytes(K), &Key128::from_bytes(OPC))
}

/// A credential-bundle-sized plaintext (the sealed bundle carries SUPI, K, OPc, restrictions and
/// the operator CA certificate: about 600 bytes).
pub fn bundle_sized_plaintext() -> Vec<u8> {
    (0..600u32).map(|i| (i % 251) as u8).collect()
}

pub mod e2e;
