//! Key-binding signatures (`docs/PROTOCOL.md` §4.4): made by a device with its TLS identity key,
//! checked by the gateway (early, to refuse garbage before it is queued) and by the CN (the
//! check that counts: it records the SPKI with the child and holds renewals to it).
//!
//! Signing uses rustls' ring signers; checking parses the SubjectPublicKeyInfo with webpki, so
//! the key's algorithm must agree with the signature scheme (an ECDSA P-256 key only verifies
//! `ecdsa_secp256r1_sha256`, never an Ed25519 or RSA scheme).

use companion_proto::binding::{KeyBinding, MAX_SIGNATURE_LEN};
use rustls::SignatureScheme;
use rustls::pki_types::{SignatureVerificationAlgorithm, SubjectPublicKeyInfoDer};

use crate::pki::Identity;

/// The signature schemes a key binding may use, most preferred first. Only schemes whose
/// signatures are deterministic to verify and that TLS 1.3 allows (no RSA PKCS#1 v1.5).
pub const BINDING_SCHEMES: [SignatureScheme; 3] = [
    SignatureScheme::ECDSA_NISTP256_SHA256,
    SignatureScheme::ED25519,
    SignatureScheme::ECDSA_NISTP384_SHA384,
];

/// Why a key binding was refused or could not be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BindingError {
    /// The scheme is not one of [`BINDING_SCHEMES`].
    #[error(
        "key-binding signature scheme 0x{0:04x} is not accepted (use ecdsa_secp256r1_sha256, ed25519 or ecdsa_secp384r1_sha384)"
    )]
    UnsupportedScheme(u16),
    /// The signature is longer than any accepted scheme produces.
    #[error("key-binding signature of {0} bytes is too long")]
    TooLong(usize),
    /// The device's SubjectPublicKeyInfo does not parse.
    #[error("the device key (SPKI) does not parse: {0}")]
    BadKey(String),
    /// The signature does not verify under the key for this message (wrong key, wrong message,
    /// or a scheme that does not match the key's algorithm).
    #[error("the key-binding signature does not verify under the device key")]
    BadSignature,
    /// The identity key cannot sign with any accepted scheme.
    #[error("the identity key cannot sign a key binding: {0}")]
    CannotSign(String),
}

fn algorithm(scheme: u16) -> Result<&'static dyn SignatureVerificationAlgorithm, BindingError> {
    match SignatureScheme::from(scheme) {
        SignatureScheme::ECDSA_NISTP256_SHA256 => Ok(webpki::ring::ECDSA_P256_SHA256),
        SignatureScheme::ED25519 => Ok(webpki::ring::ED25519),
        SignatureScheme::ECDSA_NISTP384_SHA384 => Ok(webpki::ring::ECDSA_P384_SHA384),
        _ => Err(BindingError::UnsupportedScheme(scheme)),
    }
}

/// Checks `binding` over `message` under the DER SubjectPublicKeyInfo `spki`.
pub fn verify_binding(
    spki: &[u8],
    message: &[u8],
    binding: &KeyBinding,
) -> Result<(), BindingError> {
    let alg = algorithm(binding.scheme)?;
    if binding.signature.len() > MAX_SIGNATURE_LEN {
        return Err(BindingError::TooLong(binding.signature.len()));
    }
    let spki = SubjectPublicKeyInfoDer::from(spki);
    let key = webpki::RawPublicKeyEntity::try_from(&spki)
        .map_err(|e| BindingError::BadKey(format!("{e:?}")))?;
    key.verify_signature(alg, message, &binding.signature)
        .map_err(|_| BindingError::BadSignature)
}

/// A private key ready to sign many messages (key bindings, bundles) without parsing the key
/// each time.
pub struct IdentitySigner {
    key: std::sync::Arc<dyn rustls::sign::SigningKey>,
    chain: Vec<Vec<u8>>,
}

impl std::fmt::Debug for IdentitySigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdentitySigner")
            .field("algorithm", &self.key.algorithm())
            .field("certificates", &self.chain.len())
            .finish()
    }
}

impl IdentitySigner {
    /// Loads the identity's private key (and keeps its certificate chain, DER, leaf first).
    pub fn new(identity: &Identity) -> Result<Self, BindingError> {
        let key = rustls::crypto::ring::sign::any_supported_type(&identity.private_key())
            .map_err(|e| BindingError::CannotSign(e.to_string()))?;
        Ok(Self {
            key,
            chain: identity
                .chain()
                .iter()
                .map(|c| c.as_ref().to_vec())
                .collect(),
        })
    }

    /// The certificate chain, DER, leaf first.
    pub fn chain(&self) -> &[Vec<u8>] {
        &self.chain
    }

    /// Signs `message` with the first of [`BINDING_SCHEMES`] the key supports.
    pub fn sign(&self, message: &[u8]) -> Result<KeyBinding, BindingError> {
        let signer = self.key.choose_scheme(&BINDING_SCHEMES).ok_or_else(|| {
            BindingError::CannotSign("no accepted signature scheme for this key type".into())
        })?;
        let signature = signer
            .sign(message)
            .map_err(|e| BindingError::CannotSign(e.to_string()))?;
        Ok(KeyBinding {
            scheme: u16::from(signer.scheme()),
            signature,
        })
    }
}

/// Signs `message` with the identity's private key, choosing the first of [`BINDING_SCHEMES`]
/// the key supports.
pub fn sign_binding(identity: &Identity, message: &[u8]) -> Result<KeyBinding, BindingError> {
    IdentitySigner::new(identity)?.sign(message)
}

/// Why a device refused a bundle's operator signature.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BundleAuthError {
    /// The bundle carries no operator signature, and the device has a trust anchor.
    #[error("the bundle is not signed by the operator")]
    Unsigned,
    /// The signer's certificate does not chain to the device's trust anchor for the bundle's
    /// attach server name.
    #[error("the bundle's signer is not certified by the operator CA: {0}")]
    Untrusted(String),
    /// The signature does not verify.
    #[error("the bundle's operator signature does not verify: {0}")]
    BadSignature(BindingError),
    /// The bundle names another attach trust anchor than the device's own.
    #[error("the bundle names another operator CA than the device's factory trust anchor")]
    OtherAnchor,
    /// The bundle could not be re-encoded for checking.
    #[error("the bundle cannot be encoded: {0}")]
    Encode(String),
}

/// Checks a bundle against the device's factory trust anchor (the operator CA, DER): the signer's
/// certificate chains to it as a server certificate for the bundle's attach server name, the
/// signature over the bundle's [`signed_message`] verifies under that certificate's key, and the
/// bundle's attach trust anchor is that same CA.
///
/// [`signed_message`]: companion_proto::bundle::CredentialBundle::signed_message
pub fn verify_bundle(
    bundle: &companion_proto::bundle::CredentialBundle,
    anchor_der: &[u8],
) -> Result<(), BundleAuthError> {
    use rustls::client::danger::ServerCertVerifier;
    use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
    let sig = bundle
        .operator_signature
        .as_ref()
        .ok_or(BundleAuthError::Unsigned)?;
    if bundle.attach.trust_anchor != anchor_der {
        return Err(BundleAuthError::OtherAnchor);
    }
    let (leaf, intermediates) = sig
        .chain
        .split_first()
        .ok_or_else(|| BundleAuthError::Untrusted("empty certificate chain".into()))?;
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from(anchor_der.to_vec()))
        .map_err(|e| BundleAuthError::Untrusted(format!("trust anchor: {e}")))?;
    let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
        std::sync::Arc::new(roots),
        std::sync::Arc::new(rustls::crypto::ring::default_provider()),
    )
    .build()
    .map_err(|e| BundleAuthError::Untrusted(e.to_string()))?;
    let name = ServerName::try_from(bundle.attach.server_name.clone())
        .map_err(|e| BundleAuthError::Untrusted(format!("server name: {e}")))?;
    let inter: Vec<CertificateDer<'_>> = intermediates
        .iter()
        .map(|c| CertificateDer::from(c.as_slice()))
        .collect();
    verifier
        .verify_server_cert(
            &CertificateDer::from(leaf.as_slice()),
            &inter,
            &name,
            &[],
            UnixTime::now(),
        )
        .map_err(|e| BundleAuthError::Untrusted(e.to_string()))?;
    let spki =
        crate::pki::spki_from_cert(leaf).map_err(|e| BundleAuthError::Untrusted(e.to_string()))?;
    let msg = bundle
        .signed_message()
        .map_err(|e| BundleAuthError::Encode(e.to_string()))?;
    verify_binding(
        &spki,
        &msg,
        &KeyBinding {
            scheme: sig.scheme,
            signature: sig.signature.clone(),
        },
    )
    .map_err(BundleAuthError::BadSignature)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id() -> Identity {
        Identity::self_signed("watch-01").unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn signs_and_verifies_and_refuses_every_substitution() {
        let a = id();
        let b = id();
        let spki_a = a.spki_der().unwrap_or_else(|e| panic!("{e}"));
        let spki_b = b.spki_der().unwrap_or_else(|e| panic!("{e}"));
        let sig = sign_binding(&a, b"message one").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(sig.scheme, 0x0403);
        assert_eq!(verify_binding(&spki_a, b"message one", &sig), Ok(()));
        // Another message (a replay for another request), another key, another scheme claimed.
        assert_eq!(
            verify_binding(&spki_a, b"message two", &sig),
            Err(BindingError::BadSignature)
        );
        assert_eq!(
            verify_binding(&spki_b, b"message one", &sig),
            Err(BindingError::BadSignature)
        );
        let mut ed = sig.clone();
        ed.scheme = 0x0807;
        assert_eq!(
            verify_binding(&spki_a, b"message one", &ed),
            Err(BindingError::BadSignature)
        );
        let mut rsa = sig.clone();
        rsa.scheme = 0x0401;
        assert_eq!(
            verify_binding(&spki_a, b"message one", &rsa),
            Err(BindingError::UnsupportedScheme(0x0401))
        );
        let mut long = sig.clone();
        long.signature = vec![0; MAX_SIGNATURE_LEN + 1];
        assert_eq!(
            verify_binding(&spki_a, b"message one", &long),
            Err(BindingError::TooLong(513))
        );
        assert!(matches!(
            verify_binding(b"\x30\x00", b"message one", &sig),
            Err(BindingError::BadKey(_))
        ));
        // An Ed25519 identity signs with scheme 0x0807, and its signature verifies only as that.
        let ed = Identity::self_signed_ed25519("watch-02").unwrap_or_else(|e| panic!("{e}"));
        let spki_ed = ed.spki_der().unwrap_or_else(|e| panic!("{e}"));
        let sig_ed = sign_binding(&ed, b"message one").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(sig_ed.scheme, 0x0807);
        assert_eq!(verify_binding(&spki_ed, b"message one", &sig_ed), Ok(()));
        assert_eq!(
            verify_binding(&spki_a, b"message one", &sig_ed),
            Err(BindingError::BadSignature)
        );
    }
}
