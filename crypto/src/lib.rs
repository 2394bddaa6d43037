//! 3GPP AKA (Milenage, KDF, RES*, AUTN/AUTS) and HPKE credential sealing.
//!
//! Pure functions, no I/O (the OS random number generator is the only thing touched outside
//! the process' memory). Every secret is held in a type that zeroizes itself on drop and never
//! prints its bytes.
//!
//! | module | what | specification |
//! |---|---|---|
//! | [`secret`] | fixed-size secrets, constant-time comparison | — |
//! | [`milenage`] | f1, f1*, f2, f3, f4, f5, f5*, OPc | 3GPP TS 35.206 §4 (test data TS 35.208) |
//! | [`kdf`] | the generic 3GPP key derivation function | 3GPP TS 33.220 Annex B.2 |
//! | [`aka`] | SQN, AUTN, RES*/XRES*, authentication vectors, AUTS | 3GPP TS 33.102 §6.3, Annex C; TS 33.501 §6.1.3.2, Annex A.4 |
//! | [`usim`] | the `Usim` trait and a software USIM | 3GPP TS 33.102 §6.3.3, Annex C.2; TS 31.102 §7.1.2 |
//! | [`binding`] | binding of CK/IK to a TLS session | RFC 8446 §7.5 exporter + TS 33.220 KDF |
//! | [`hpke`] | sealing credentials to a device key | RFC 9180 base mode |
//!
//! # Example: one 5G AKA bound to a TLS session, then a sealed credential
//!
//! ```
//! use companion_crypto::aka::{self, AMF_5G, Sqn};
//! use companion_crypto::binding::{session_binding, verify_session_binding};
//! use companion_crypto::hpke::{DeviceHpkeKey, open_credential, seal_credential};
//! use companion_crypto::milenage::Milenage;
//! use companion_crypto::usim::{SoftUsim, Usim, UsimResponse};
//! use companion_crypto::Key128;
//!
//! let k = Key128::random();
//! let opc = Milenage::compute_opc(&k, &[0x11; 16]);
//! let snn = aka::serving_network_name("001", "01");
//!
//! // Home network (cn-backend): next SQN, vector.
//! let hn = Milenage::new(&k, &opc);
//! let sqn = aka::next_sqn(Sqn::ZERO); // stored SQN was ZERO; store `sqn` now
//! let av = aka::generate_vector(&hn, sqn, &AMF_5G, aka::random_rand(), &snn);
//!
//! // Companion (gatewayd) with its USIM.
//! let mut usim = SoftUsim::new("imsi-001010000000001".into(), k.clone(), opc.clone());
//! let exporter = [0x42; 32]; // TLS exporter, label binding::EXPORTER_LABEL, empty context
//! let (res_star, binding) = match usim.authenticate(&av.rand, &av.autn, &snn).unwrap() {
//!     UsimResponse::Success { res_star, ck, ik, .. } => (res_star, session_binding(&ck, &ik, &exporter)),
//!     UsimResponse::SyncFailure { auts } => {
//!         // CN: let sqn_ms = aka::verify_auts(&hn, &av.rand, &auts)?;
//!         //     store aka::sqn_after_resync(sqn_ms) and send a new challenge.
//!         unreachable!("{auts:?}")
//!     }
//! };
//!
//! // CN checks RES* and the binding (both constant time).
//! assert!(av.verify_res_star(&res_star));
//! assert!(verify_session_binding(&av.ck, &av.ik, &exporter, &binding));
//!
//! // CN seals a child credential to the device's HPKE key; only the device can open it.
//! let device_key = DeviceHpkeKey::generate();
//! let request_id = [7u8; 16];
//! let sealed = seal_credential(&device_key.public_key(), "watch-1", &request_id, b"bundle").unwrap();
//! let bundle = open_credential(&device_key, "watch-1", &request_id, &sealed).unwrap();
//! assert_eq!(bundle.as_slice(), b"bundle");
//! ```
#![warn(missing_docs)]
#![forbid(unsafe_code)]

pub mod aka;
pub mod binding;
mod error;
pub mod hpke;
pub mod kdf;
pub mod milenage;
pub mod secret;
pub mod usim;

pub use error::Error;
pub use secret::{Key128, Key256, Secret};
