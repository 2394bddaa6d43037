//! Manufacturer attestation (`docs/PROTOCOL.md` §4.5): a certificate chain from the device's
//! manufacturer that certifies its identity key for its device ID.
//!
//! The device presents the chain as its TLS client certificate chain to the gateway. The gateway
//! forwards it with each of the device's batch items ([`forwardable_chain`]); it proves nothing to
//! the gateway, which admits the device by its paired key as before. The CN checks it
//! ([`verify_attestation`]) against the manufacturer roots its operator installed
//! (`cn-backend attestation add-root`). A parent whose policy sets `require_attestation` gets
//! credentials only for items whose key a manufacturer certified for that device ID, so a
//! compromised gateway cannot substitute a key of its own for an attested device.
//!
//! The certificate profile:
//! - the leaf's SubjectPublicKeyInfo is the device's identity key (the key-binding key);
//! - the leaf carries a subjectAltName URI `urn:companion:device:<device ID>`;
//! - the leaf's extended key usage, if present, includes id-kp-clientAuth;
//! - the chain (leaf first, then intermediates) leads to an installed root under RFC 5280 path
//!   validation at the CN's clock: signatures, validity, basic constraints, name constraints.

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, TrustAnchor};

pub use rustls::pki_types::UnixTime;

use crate::pki::spki_from_cert;

/// The subjectAltName URI prefix naming the device a manufacturer certificate is for.
pub const DEVICE_URI_PREFIX: &str = "urn:companion:device:";
pub use companion_proto::attestation::{AttestationChain, MAX_CHAIN_BYTES, MAX_CHAIN_CERTS};

/// Why an attestation chain does not attest a device key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AttestationError {
    /// The chain has no certificate.
    #[error("the attestation chain is empty")]
    Empty,
    /// The chain is over [`MAX_CHAIN_CERTS`] or [`MAX_CHAIN_BYTES`].
    #[error(
        "the attestation chain is too large ({certs} certificates, {bytes} bytes; at most {MAX_CHAIN_CERTS} and {MAX_CHAIN_BYTES})"
    )]
    TooLarge {
        /// Certificates in the chain.
        certs: usize,
        /// Their DER bytes together.
        bytes: usize,
    },
    /// A certificate does not parse.
    #[error("attestation certificate does not parse: {0}")]
    BadCertificate(String),
    /// No manufacturer root is installed.
    #[error("no manufacturer root is installed (cn-backend attestation add-root)")]
    NoRoots,
    /// The chain does not lead to an installed root, or fails path validation.
    #[error("the attestation chain does not verify to an installed manufacturer root: {0}")]
    Untrusted(String),
    /// The leaf certifies another key than the device's identity key.
    #[error("the attestation certificate is for another key than the device's identity key")]
    OtherKey,
    /// The leaf names no device, or another device.
    #[error("the attestation certificate does not name device {0} ({DEVICE_URI_PREFIX}<id>)")]
    OtherDevice(String),
}

/// What of a TLS client's certificate chain the gateway forwards as the device's attestation:
/// nothing for a self-issued leaf (a device without a manufacturer certificate), else the whole
/// chain as presented. `Err` for a chain over the wire limits ([`AttestationChain::new`]) or a leaf
/// that does not parse.
pub fn forwardable_chain(
    chain: &[CertificateDer<'_>],
) -> Result<Option<AttestationChain>, AttestationError> {
    let Some(leaf) = chain.first() else {
        return Ok(None);
    };
    let (_, cert) = x509_parser::parse_x509_certificate(leaf)
        .map_err(|e| AttestationError::BadCertificate(e.to_string()))?;
    if cert.issuer().as_raw() == cert.subject().as_raw() {
        return Ok(None);
    }
    AttestationChain::new(chain.iter().map(|c| c.to_vec()).collect())
        .map(Some)
        .map_err(|e| AttestationError::TooLarge {
            certs: e.certs,
            bytes: e.bytes,
        })
}

/// The device ID a manufacturer certificate (DER) names in its `urn:companion:device:` URI, if
/// it names one.
pub fn certified_device_id(cert_der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|n| match n {
        x509_parser::extensions::GeneralName::URI(u) => {
            u.strip_prefix(DEVICE_URI_PREFIX).map(str::to_owned)
        }
        _ => None,
    })
}

/// The manufacturer roots an operator installed, by name.
#[derive(Debug, Default)]
pub struct ManufacturerRoots {
    names: Vec<String>,
    anchors: Vec<TrustAnchor<'static>>,
}

impl ManufacturerRoots {
    /// Builds the set from `(name, DER certificate)` pairs; `Err` names the first root that is
    /// not a usable trust anchor.
    pub fn new<'a>(
        roots: impl IntoIterator<Item = (&'a str, &'a [u8])>,
    ) -> Result<Self, (String, AttestationError)> {
        let mut out = Self::default();
        for (name, der) in roots {
            out.add(name, der).map_err(|e| (name.to_owned(), e))?;
        }
        Ok(out)
    }

    /// Adds a root (DER certificate) under `name`.
    pub fn add(&mut self, name: &str, der: &[u8]) -> Result<(), AttestationError> {
        let anchor = root_anchor(der)?;
        self.names.push(name.to_owned());
        self.anchors.push(anchor);
        Ok(())
    }

    /// How many roots are installed.
    pub fn len(&self) -> usize {
        self.anchors.len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.anchors.is_empty()
    }
}

/// A certificate file's DER: the first CERTIFICATE block of PEM text, else the bytes as given.
pub fn certificate_der(file: &[u8]) -> Result<Vec<u8>, AttestationError> {
    if file.first() == Some(&0x30) {
        return Ok(file.to_vec());
    }
    CertificateDer::from_pem_slice(file)
        .map(|c| c.to_vec())
        .map_err(|e| AttestationError::BadCertificate(format!("no PEM certificate found: {e}")))
}

/// What an operator sees of a root certificate before trusting it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RootInfo {
    /// The subject, RFC 4514 text.
    pub subject: String,
    /// End of validity, Unix seconds.
    pub not_after: i64,
}

/// Checks that `der` is a CA certificate usable as a manufacturer root (a trust anchor with
/// basicConstraints cA = true) and describes it. A device certificate installed as a root by
/// mistake is refused here: it certifies nothing.
pub fn inspect_root(der: &[u8]) -> Result<RootInfo, AttestationError> {
    root_anchor(der)?;
    let (rest, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| AttestationError::BadCertificate(e.to_string()))?;
    if !rest.is_empty() {
        return Err(AttestationError::BadCertificate(
            "trailing bytes after the certificate".into(),
        ));
    }
    let is_ca = cert
        .basic_constraints()
        .map_err(|e| AttestationError::BadCertificate(e.to_string()))?
        .is_some_and(|bc| bc.value.ca);
    if !is_ca {
        return Err(AttestationError::BadCertificate(
            "not a CA certificate (basicConstraints cA is not set)".into(),
        ));
    }
    Ok(RootInfo {
        subject: cert.subject().to_string(),
        not_after: cert.validity().not_after.timestamp(),
    })
}

/// The trust anchor of a root certificate (DER), as `cn-backend attestation add-root` checks it.
pub fn root_anchor(der: &[u8]) -> Result<TrustAnchor<'static>, AttestationError> {
    let cert = CertificateDer::from(der);
    webpki::anchor_from_trusted_cert(&cert)
        .map(|a| a.to_owned())
        .map_err(|e| AttestationError::BadCertificate(format!("{e:?}")))
}

/// Checks that `chain` (leaf first) certifies `device_spki` for `device_id` under one of `roots`
/// at `now`; returns the name of the root it leads to.
pub fn verify_attestation(
    chain: &[Vec<u8>],
    device_spki: &[u8],
    device_id: &str,
    roots: &ManufacturerRoots,
    now: UnixTime,
) -> Result<String, AttestationError> {
    if roots.is_empty() {
        return Err(AttestationError::NoRoots);
    }
    let (leaf, intermediates) = chain.split_first().ok_or(AttestationError::Empty)?;
    let leaf_der = CertificateDer::from(leaf.as_slice());
    let ee = webpki::EndEntityCert::try_from(&leaf_der)
        .map_err(|e| AttestationError::BadCertificate(format!("{e:?}")))?;
    let inter: Vec<CertificateDer<'_>> = intermediates
        .iter()
        .map(|c| CertificateDer::from(c.as_slice()))
        .collect();
    let path = ee
        .verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &roots.anchors,
            &inter,
            now,
            webpki::KeyUsage::client_auth(),
            None,
            None,
        )
        .map_err(|e| AttestationError::Untrusted(format!("{e:?}")))?;
    let anchor = path.anchor();
    let root = roots
        .anchors
        .iter()
        .position(|a| {
            a.subject == anchor.subject
                && a.subject_public_key_info == anchor.subject_public_key_info
        })
        .and_then(|i| roots.names.get(i))
        .cloned()
        .unwrap_or_default();
    let spki = spki_from_cert(leaf).map_err(|e| AttestationError::BadCertificate(e.to_string()))?;
    if spki != device_spki {
        return Err(AttestationError::OtherKey);
    }
    let (_, cert) = x509_parser::parse_x509_certificate(leaf)
        .map_err(|e| AttestationError::BadCertificate(e.to_string()))?;
    let wanted = format!("{DEVICE_URI_PREFIX}{device_id}");
    let names = cert
        .subject_alternative_name()
        .map_err(|e| AttestationError::BadCertificate(e.to_string()))?;
    let named = names.is_some_and(|san| {
        san.value
            .general_names
            .iter()
            .any(|n| matches!(n, x509_parser::extensions::GeneralName::URI(u) if *u == wanted))
    });
    if !named {
        return Err(AttestationError::OtherDevice(device_id.to_owned()));
    }
    Ok(root)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::pki::{Identity, ManufacturerCa};

    fn roots(ca: &ManufacturerCa) -> ManufacturerRoots {
        ManufacturerRoots::new([("acme", ca.cert_der().as_ref())]).unwrap()
    }

    fn der_chain(id: &Identity) -> Vec<Vec<u8>> {
        id.chain().iter().map(|c| c.to_vec()).collect()
    }

    #[test]
    fn a_device_certificate_attests_its_key_for_its_id() {
        let ca = ManufacturerCa::generate("Acme devices").unwrap();
        let dev = ca.issue_device("sensor-1").unwrap();
        let chain = der_chain(&dev);
        let spki = dev.spki_der().unwrap();
        assert_eq!(
            verify_attestation(&chain, &spki, "sensor-1", &roots(&ca), UnixTime::now()),
            Ok("acme".to_owned())
        );
        // Leaf alone (the root is not needed in the chain) verifies too.
        assert!(
            verify_attestation(&chain[..1], &spki, "sensor-1", &roots(&ca), UnixTime::now())
                .is_ok()
        );
    }

    #[test]
    fn another_id_another_key_another_root_or_no_root_is_refused() {
        let ca = ManufacturerCa::generate("Acme devices").unwrap();
        let other_ca = ManufacturerCa::generate("Acme devices").unwrap();
        let dev = ca.issue_device("sensor-1").unwrap();
        let chain = der_chain(&dev);
        let spki = dev.spki_der().unwrap();
        let now = UnixTime::now();
        assert_eq!(
            verify_attestation(&chain, &spki, "sensor-2", &roots(&ca), now),
            Err(AttestationError::OtherDevice("sensor-2".into()))
        );
        let gateway_key = Identity::self_signed("gw").unwrap().spki_der().unwrap();
        assert_eq!(
            verify_attestation(&chain, &gateway_key, "sensor-1", &roots(&ca), now),
            Err(AttestationError::OtherKey)
        );
        assert!(matches!(
            verify_attestation(&chain, &spki, "sensor-1", &roots(&other_ca), now),
            Err(AttestationError::Untrusted(_))
        ));
        assert_eq!(
            verify_attestation(
                &chain,
                &spki,
                "sensor-1",
                &ManufacturerRoots::default(),
                now
            ),
            Err(AttestationError::NoRoots)
        );
        // A self-signed device certificate naming the device is no attestation.
        let own = Identity::self_signed("sensor-1").unwrap();
        assert!(matches!(
            verify_attestation(
                &der_chain(&own),
                &own.spki_der().unwrap(),
                "sensor-1",
                &roots(&ca),
                now
            ),
            Err(AttestationError::Untrusted(_))
        ));
        // Past the leaf's validity.
        let later = UnixTime::since_unix_epoch(std::time::Duration::from_secs(
            now.as_secs() + 31 * 366 * 86_400,
        ));
        assert!(matches!(
            verify_attestation(&chain, &spki, "sensor-1", &roots(&ca), later),
            Err(AttestationError::Untrusted(_))
        ));
    }

    #[test]
    fn a_device_certificate_cannot_act_as_an_intermediate() {
        // The device's key signs a "certificate" for another key: webpki refuses a leaf (no CA
        // basic constraint) as an issuer.
        let ca = ManufacturerCa::generate("Acme devices").unwrap();
        let dev = ca.issue_device("sensor-1").unwrap();
        let as_ca = ManufacturerCa::from_pem(&dev.cert_pem(), &dev.key_pem()).unwrap();
        let forged = as_ca.issue_device("sensor-9").unwrap();
        let mut chain = der_chain(&forged)[..1].to_vec();
        chain.push(dev.chain()[0].to_vec());
        assert!(matches!(
            verify_attestation(
                &chain,
                &forged.spki_der().unwrap(),
                "sensor-9",
                &roots(&ca),
                UnixTime::now()
            ),
            Err(AttestationError::Untrusted(_))
        ));
    }

    #[test]
    fn only_issued_chains_within_limits_are_forwarded() {
        let own = Identity::self_signed("sensor-1").unwrap();
        assert_eq!(forwardable_chain(own.chain()), Ok(None));
        assert_eq!(forwardable_chain(&[]), Ok(None));
        let ca = ManufacturerCa::generate("Acme devices").unwrap();
        let dev = ca.issue_device("sensor-1").unwrap();
        assert_eq!(
            forwardable_chain(dev.chain()),
            Ok(Some(AttestationChain::new(der_chain(&dev)).unwrap()))
        );
        assert_eq!(
            certified_device_id(&dev.chain()[0]).as_deref(),
            Some("sensor-1")
        );
        assert_eq!(certified_device_id(&own.chain()[0]), None);
        let mut long = dev.chain().to_vec();
        long.extend(std::iter::repeat_n(ca.cert_der().clone(), MAX_CHAIN_CERTS));
        assert!(matches!(
            forwardable_chain(&long),
            Err(AttestationError::TooLarge { .. })
        ));
        assert!(matches!(
            forwardable_chain(&[CertificateDer::from(vec![0x30, 0x03, 1, 2, 3])]),
            Err(AttestationError::BadCertificate(_))
        ));
    }

    #[test]
    fn roots_must_be_ca_certificates() {
        assert!(ManufacturerRoots::new([("junk", &b"not a certificate"[..])]).is_err());
        let ca = ManufacturerCa::generate("Acme devices").unwrap();
        let info = inspect_root(ca.cert_der()).unwrap();
        assert_eq!(info.subject, "CN=Acme devices");
        let dev = ca.issue_device("sensor-1").unwrap();
        assert!(matches!(
            inspect_root(&dev.chain()[0]),
            Err(AttestationError::BadCertificate(_))
        ));
        assert!(inspect_root(b"junk").is_err());
    }

    mod props {
        use super::*;
        use proptest::prelude::*;
        use std::sync::OnceLock;

        /// One maker, one device (key generation is too slow to repeat per case).
        fn fixture() -> &'static (ManufacturerCa, Identity) {
            static F: OnceLock<(ManufacturerCa, Identity)> = OnceLock::new();
            F.get_or_init(|| {
                let ca = ManufacturerCa::generate("Acme devices").unwrap();
                let dev = ca.issue_device("sensor-1").unwrap();
                (ca, dev)
            })
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(256))]

            /// Whatever a gateway or device sends as a chain, the CN answers with an error,
            /// never a panic and never a verified attestation.
            #[test]
            fn arbitrary_chains_never_verify(
                chain in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..600), 0..6)
            ) {
                let (ca, dev) = fixture();
                let spki = dev.spki_der().unwrap();
                prop_assert!(verify_attestation(&chain, &spki, "sensor-1", &roots(ca), UnixTime::now()).is_err());
                let certs: Vec<CertificateDer<'_>> = chain.iter().map(|c| CertificateDer::from(c.as_slice())).collect();
                let _ = forwardable_chain(&certs);
                let _ = certified_device_id(chain.first().map_or(&[][..], Vec::as_slice));
            }

            /// Any single-byte change to the genuine leaf stops it verifying.
            #[test]
            fn a_modified_leaf_never_verifies(pos in any::<prop::sample::Index>(), xor in 1u8..=255) {
                let (ca, dev) = fixture();
                let mut chain = der_chain(dev);
                let i = pos.index(chain[0].len());
                chain[0][i] ^= xor;
                let spki = dev.spki_der().unwrap();
                prop_assert!(verify_attestation(&chain, &spki, "sensor-1", &roots(ca), UnixTime::now()).is_err());
            }
        }
    }
}
