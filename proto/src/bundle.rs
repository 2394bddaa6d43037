//! The credential bundle: the HPKE plaintext the CN seals to a device.
//!
//! Sealing (done by `companion_crypto::hpke`): RFC 9180 base mode, suite
//! DHKEM(X25519, HKDF-SHA256) / HKDF-SHA256 / ChaCha20-Poly1305 (0x0020/0x0001/0x0003),
//! `info` = [`HPKE_INFO`], `aad` = [`aad`]`(device_id, request_id)`.

use minicbor::{Decode, Encode};
use zeroize::Zeroizing;

use crate::codec::decode_body;
use crate::error::{DecodeError, EncodeError};
use crate::ids::{DeviceId, RequestId, Supi};
use crate::msg::Restrictions;
pub use crate::secret::Key128;

/// The bundle format version: 2 added `home_network` (key 12).
pub const BUNDLE_VERSION: u64 = 2;
/// HPKE `info` string.
pub const HPKE_INFO: &[u8] = b"companion credential v1";
/// Largest SQN (48 bits).
pub const SQN_MAX: u64 = (1 << 48) - 1;

/// The HPKE associated data: `u16-BE(len(device_id)) || device_id || request_id`.
pub fn aad(device_id: &DeviceId, request_id: &RequestId) -> Vec<u8> {
    let id = device_id.as_str().as_bytes();
    let mut out = Vec::with_capacity(2 + id.len() + 16);
    // DeviceId is at most 64 bytes, so the length always fits a u16.
    out.extend_from_slice(&(id.len() as u16).to_be_bytes());
    out.extend_from_slice(id);
    out.extend_from_slice(request_id.as_bytes());
    out
}

/// Where and how the device attaches with its new credential.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
#[cbor(map)]
pub struct AttachInfo {
    /// `host:port` of the CN's attach endpoint.
    #[n(0)]
    pub endpoint: String,
    /// TLS server name to verify.
    #[n(1)]
    pub server_name: String,
    /// DER of the operator CA certificate the CN's certificate chains to.
    #[cbor(n(2), with = "minicbor::bytes")]
    pub trust_anchor: Vec<u8>,
}

/// The home network (PLMN) the SUPI belongs to: what a device needs to build its serving
/// network name at home and to tell home from visited networks. The MNC keeps its length (2 or
/// 3 digits), which the IMSI alone does not tell.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
#[cbor(map)]
pub struct HomeNetwork {
    /// Mobile country code, 3 digits.
    #[n(0)]
    pub mcc: String,
    /// Mobile network code, 2 or 3 digits.
    #[n(1)]
    pub mnc: String,
}

impl HomeNetwork {
    /// The home serving network name, `5G:mnc<MNC, 3 digits>.mcc<MCC>.3gppnetwork.org`.
    pub fn serving_network_name(&self) -> Result<String, crate::ids::IdError> {
        crate::ids::serving_network_name(&self.mcc, &self.mnc)
    }
}

/// The context prefix of the CN's signature over a bundle (§9.1 of PROTOCOL.md).
pub const BUNDLE_SIGNATURE_CONTEXT: &[u8] = b"companion bundle signature v2";

/// The CN's signature over a bundle: made with the key of a certificate that chains to the
/// operator CA, so a device with that CA as its factory trust anchor can tell a bundle from the
/// CN from one a gateway (or anyone posing as one) made up.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
#[cbor(map)]
pub struct BundleSignature {
    /// The signer's certificate chain (DER), leaf first; the operator CA itself need not be
    /// included.
    #[n(0)]
    pub chain: Vec<minicbor::bytes::ByteVec>,
    /// TLS 1.3 SignatureScheme code point of the leaf's key.
    #[n(1)]
    pub scheme: u16,
    /// The signature over [`CredentialBundle::signed_message`].
    #[cbor(n(2), with = "minicbor::bytes")]
    pub signature: Vec<u8>,
}

impl BundleSignature {
    /// A signature by the leaf of `chain` (DER certificates, leaf first).
    pub fn new(chain: Vec<Vec<u8>>, scheme: u16, signature: Vec<u8>) -> Self {
        Self {
            chain: chain.into_iter().map(Into::into).collect(),
            scheme,
            signature,
        }
    }
}

/// The credential bundle. `Debug` never shows K or OPc.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
#[cbor(map)]
pub struct CredentialBundle {
    /// [`BUNDLE_VERSION`].
    #[n(0)]
    pub version: u64,
    /// The device it was issued to.
    #[n(1)]
    pub device_id: DeviceId,
    /// The request it answers.
    #[n(2)]
    pub request_id: RequestId,
    /// The new SUPI.
    #[n(3)]
    pub supi: Supi,
    /// Subscriber key K.
    #[cbor(n(4), with = "crate::secret::key128")]
    pub k: Key128,
    /// OPc = AES_K(OP) ⊕ OP.
    #[cbor(n(5), with = "crate::secret::key128")]
    pub opc: Key128,
    /// Authentication management field.
    #[cbor(n(6), with = "crate::codec::fixed")]
    pub amf: [u8; 2],
    /// First SQN the USIM should accept above (48 bits).
    #[n(7)]
    pub sqn_start: u64,
    /// Issue time, Unix seconds.
    #[n(8)]
    pub issued_at: u64,
    /// Expiry, Unix seconds.
    #[n(9)]
    pub expires_at: u64,
    /// What the credential may do.
    #[n(10)]
    pub restrictions: Restrictions,
    /// How to attach.
    #[n(11)]
    pub attach: AttachInfo,
    /// The SUPI's home network, with the MNC's length.
    #[n(12)]
    pub home_network: HomeNetwork,
    /// The CN's signature over the rest of the bundle (absent: unsigned).
    #[n(13)]
    pub operator_signature: Option<BundleSignature>,
}

/// Why a bundle was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BundleError {
    /// Not a valid bundle encoding.
    #[error("bundle does not decode: {0}")]
    Decode(#[from] DecodeError),
    /// A version this implementation does not know.
    #[error("unsupported bundle version {0}")]
    UnsupportedVersion(u64),
    /// A field is out of range (SQN over 48 bits, expiry before issue).
    #[error("invalid bundle: {0}")]
    Invalid(&'static str),
    /// The bundle is for another device or request than the one expected.
    #[error("bundle is for another {0}")]
    Mismatch(&'static str),
}

impl CredentialBundle {
    /// The deterministic CBOR plaintext, in a buffer that is wiped on drop (it holds K and OPc).
    pub fn encode(&self) -> Result<Zeroizing<Vec<u8>>, EncodeError> {
        // Reserve an upper bound first so the buffer never reallocates (which would leave an
        // unwiped copy of the keys behind): fixed fields < 160 bytes, each string/byte string
        // at most 9 header bytes plus its length.
        let var = |n: usize| n + 9;
        let dnns: usize = self.restrictions.dnns.iter().map(|d| var(d.len())).sum();
        let cap = 256
            + var(self.device_id.as_str().len())
            + var(self.supi.as_str().len())
            + var(self.attach.endpoint.len())
            + var(self.attach.server_name.len())
            + var(self.attach.trust_anchor.len())
            + 32
            + self.operator_signature.as_ref().map_or(0, |s| {
                16 + var(s.signature.len()) + s.chain.iter().map(|c| var(c.len())).sum::<usize>()
            })
            + dnns;
        let mut buf = Zeroizing::new(Vec::with_capacity(cap));
        minicbor::encode(self, &mut *buf).map_err(|e| EncodeError::Cbor(e.to_string()))?;
        Ok(buf)
    }

    /// What the CN signs: [`BUNDLE_SIGNATURE_CONTEXT`] followed by the deterministic encoding
    /// of the bundle without `operator_signature` (in a buffer wiped on drop: it holds K/OPc).
    pub fn signed_message(&self) -> Result<Zeroizing<Vec<u8>>, EncodeError> {
        let unsigned = CredentialBundle {
            operator_signature: None,
            ..self.clone()
        };
        let body = unsigned.encode()?;
        let mut m = Zeroizing::new(Vec::with_capacity(
            BUNDLE_SIGNATURE_CONTEXT.len() + body.len(),
        ));
        m.extend_from_slice(BUNDLE_SIGNATURE_CONTEXT);
        m.extend_from_slice(&body);
        Ok(m)
    }

    /// Decodes and checks a plaintext (version, SQN range, expiry after issue).
    pub fn decode(bytes: &[u8]) -> Result<Self, BundleError> {
        let b: CredentialBundle = decode_body(bytes)?;
        if b.version != BUNDLE_VERSION {
            return Err(BundleError::UnsupportedVersion(b.version));
        }
        if b.sqn_start > SQN_MAX {
            return Err(BundleError::Invalid("sqn_start exceeds 48 bits"));
        }
        if b.expires_at <= b.issued_at {
            return Err(BundleError::Invalid("expires_at is not after issued_at"));
        }
        let digits = |s: &str, n: std::ops::RangeInclusive<usize>| {
            n.contains(&s.len()) && s.bytes().all(|c| c.is_ascii_digit())
        };
        let h = &b.home_network;
        if !digits(&h.mcc, 3..=3) || !digits(&h.mnc, 2..=3) {
            return Err(BundleError::Invalid(
                "home_network needs a 3-digit MCC and a 2- or 3-digit MNC",
            ));
        }
        if !b.supi.imsi().starts_with(&format!("{}{}", h.mcc, h.mnc)) {
            return Err(BundleError::Invalid("the SUPI is not in home_network"));
        }
        Ok(b)
    }

    /// Checks that the bundle answers `request_id` of `device_id` (after opening it).
    pub fn check_for(
        &self,
        device_id: &DeviceId,
        request_id: &RequestId,
    ) -> Result<(), BundleError> {
        if &self.device_id != device_id {
            return Err(BundleError::Mismatch("device"));
        }
        if &self.request_id != request_id {
            return Err(BundleError::Mismatch("request"));
        }
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::msg::tests::{hex, unhex};

    pub(crate) fn sample() -> CredentialBundle {
        CredentialBundle {
            version: BUNDLE_VERSION,
            device_id: DeviceId::new("watch-01").unwrap(),
            request_id: RequestId(core::array::from_fn(|i| i as u8)),
            supi: Supi::new("imsi-001010000000042").unwrap(),
            k: Key128::from_bytes([0x46; 16]),
            opc: Key128::from_bytes([0xcd; 16]),
            amf: [0x80, 0x00],
            sqn_start: 32,
            issued_at: 1_764_633_600,
            expires_at: 1_767_225_600,
            restrictions: Restrictions {
                roaming_allowed: false,
                dnns: vec![],
                max_bitrate_kbps: None,
            },
            attach: AttachInfo {
                endpoint: "cn.example.net:4433".into(),
                server_name: "cn.example.net".into(),
                trust_anchor: vec![0x30, 0x00],
            },
            home_network: HomeNetwork {
                mcc: "001".into(),
                mnc: "01".into(),
            },
            operator_signature: None,
        }
    }

    pub(crate) const GOLDEN: &str = "ad0002016877617463682d30310250000102030405060708090a0b0c0d0e0f0374696d73692d3030\
        313031303030303030303034320450464646464646464646464646464646460550cdcdcdcdcdcdcd\
        cdcdcdcdcdcdcdcdcd06428000071820081a692e2c00091a6955b9000aa200f401800ba30073636e\
        2e6578616d706c652e6e65743a34343333016e636e2e6578616d706c652e6e6574024230000ca200\
        6330303101623031";

    #[test]
    fn golden_and_round_trip() {
        let b = sample();
        let enc = b.encode().unwrap();
        assert_eq!(hex(&enc), hex(&unhex(GOLDEN)));
        let d = CredentialBundle::decode(&enc).unwrap();
        assert_eq!(d, b);
        d.check_for(&b.device_id, &b.request_id).unwrap();
        assert_eq!(
            d.check_for(&DeviceId::new("other").unwrap(), &b.request_id),
            Err(BundleError::Mismatch("device"))
        );
        // Debug never shows the keys.
        let dbg = format!("{d:?}");
        assert!(!dbg.contains("70, 70") && !dbg.contains("4646") && dbg.contains("redacted"));
    }

    #[test]
    fn the_signature_covers_everything_but_itself() {
        let plain = sample();
        let mut signed = sample();
        signed.operator_signature = Some(BundleSignature::new(
            vec![vec![0x30, 0x00]],
            0x0403,
            vec![0x44; 8],
        ));
        let enc = signed.encode().unwrap();
        assert_eq!(CredentialBundle::decode(&enc).unwrap(), signed);
        let m = plain.signed_message().unwrap();
        assert_eq!(
            &m[..BUNDLE_SIGNATURE_CONTEXT.len()],
            BUNDLE_SIGNATURE_CONTEXT
        );
        assert_eq!(
            &m[BUNDLE_SIGNATURE_CONTEXT.len()..],
            &plain.encode().unwrap()[..]
        );
        assert_eq!(signed.signed_message().unwrap(), m);
        signed.expires_at += 1;
        assert_ne!(signed.signed_message().unwrap(), m);
    }

    #[test]
    fn aad_layout() {
        let a = aad(&DeviceId::new("ab").unwrap(), &RequestId([9; 16]));
        assert_eq!(&a[..4], &[0, 2, b'a', b'b']);
        assert_eq!(&a[4..], &[9; 16]);
    }

    #[test]
    fn checks() {
        let mut b = sample();
        b.version = 1;
        assert_eq!(
            CredentialBundle::decode(&b.encode().unwrap()),
            Err(BundleError::UnsupportedVersion(1))
        );
        let mut b = sample();
        b.home_network.mnc = "011".into();
        assert_eq!(
            CredentialBundle::decode(&b.encode().unwrap()),
            Err(BundleError::Invalid("the SUPI is not in home_network"))
        );
        let mut b = sample();
        b.home_network.mnc = "1".into();
        assert!(matches!(
            CredentialBundle::decode(&b.encode().unwrap()),
            Err(BundleError::Invalid(_))
        ));
        let mut b = sample();
        b.sqn_start = 1 << 48;
        assert!(matches!(
            CredentialBundle::decode(&b.encode().unwrap()),
            Err(BundleError::Invalid(_))
        ));
        let mut b = sample();
        b.expires_at = b.issued_at;
        assert!(matches!(
            CredentialBundle::decode(&b.encode().unwrap()),
            Err(BundleError::Invalid(_))
        ));
        assert!(matches!(
            CredentialBundle::decode(&[0xa0]),
            Err(BundleError::Decode(_))
        ));
    }
}

#[cfg(test)]
mod crypto_tests {
    use super::*;

    #[test]
    fn aad_matches_crypto_crate() {
        let d = DeviceId::new("watch-01").unwrap();
        let r = RequestId([7; 16]);
        assert_eq!(
            aad(&d, &r),
            companion_crypto::hpke::credential_aad(d.as_str(), &r.0)
        );
        assert_eq!(HPKE_INFO, companion_crypto::hpke::INFO);
    }
}
