//! Certificate verifiers that trust *keys*, not names or CAs.
//!
//! On the LAN a device presents a self-signed certificate; the gateway admits it only if the SHA-256
//! of its SubjectPublicKeyInfo belongs to a pairing (or a pairing window is open). The device, in
//! turn, pins the gateway's key on first use. Both still verify the TLS 1.3 CertificateVerify
//! signature with the certificate's key, so possession of the private key is proven.

use std::fmt;
use std::sync::{Arc, Mutex};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{
    CryptoProvider, WebPkiSupportedAlgorithms, verify_tls12_signature, verify_tls13_signature,
};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};

use crate::pki::{spki_fingerprint, spki_from_cert};

/// Decides whether a presented public key may connect. Called during the handshake, so it must be
/// cheap and must not block.
pub trait KeyPolicy: Send + Sync + fmt::Debug {
    /// `fingerprint` is SHA-256 of `spki_der`.
    fn admit(&self, fingerprint: &[u8; 32], spki_der: &[u8]) -> bool;
}

fn algorithms() -> WebPkiSupportedAlgorithms {
    rustls::crypto::ring::default_provider().signature_verification_algorithms
}

fn fingerprint_of(cert: &CertificateDer<'_>) -> Result<([u8; 32], Vec<u8>), rustls::Error> {
    let spki = spki_from_cert(cert)
        .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadEncoding))?;
    Ok((spki_fingerprint(&spki), spki))
}

/// The handshake-signature half of a verifier, the same for both below: the TLS
/// CertificateVerify signature is checked with the presented certificate's own key (proof of
/// possession), with ring's algorithms kept in the verifier's `algorithms` field. The traits
/// for the two sides declare these methods separately, hence one macro rather than a helper.
macro_rules! handshake_signatures {
    () => {
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            verify_tls12_signature(message, cert, dss, &self.algorithms)
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            verify_tls13_signature(message, cert, dss, &self.algorithms)
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.algorithms.supported_schemes()
        }
    };
}

/// Server-side verifier for client certificates: mandatory client auth, admitted by a [`KeyPolicy`].
pub struct PinnedClientVerifier {
    policy: Arc<dyn KeyPolicy>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl fmt::Debug for PinnedClientVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PinnedClientVerifier")
            .field("policy", &self.policy)
            .finish()
    }
}

impl PinnedClientVerifier {
    /// A verifier that admits the client keys `policy` admits.
    pub fn new(policy: Arc<dyn KeyPolicy>) -> Self {
        Self {
            policy,
            algorithms: algorithms(),
        }
    }
}

impl ClientCertVerifier for PinnedClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let (fingerprint, spki) = fingerprint_of(end_entity)?;
        if self.policy.admit(&fingerprint, &spki) {
            Ok(ClientCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::ApplicationVerificationFailure,
            ))
        }
    }

    handshake_signatures!();
}

/// Client-side verifier that pins the server's key: a fixed fingerprint, or trust on first use
/// (the first key seen is remembered and reported through [`PinnedServerVerifier::seen`]).
pub struct PinnedServerVerifier {
    expected: Option<[u8; 32]>,
    seen: Mutex<Option<[u8; 32]>>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl fmt::Debug for PinnedServerVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PinnedServerVerifier")
            .field("pinned", &self.expected.is_some())
            .finish()
    }
}

impl PinnedServerVerifier {
    /// `expected = None` accepts any key once and remembers it (trust on first use).
    pub fn new(expected: Option<[u8; 32]>) -> Self {
        Self {
            expected,
            seen: Mutex::new(None),
            algorithms: algorithms(),
        }
    }

    /// The fingerprint of the key the server presented, once a handshake got that far.
    pub fn seen(&self) -> Option<[u8; 32]> {
        *self
            .seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl ServerCertVerifier for PinnedServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let (fingerprint, _) = fingerprint_of(end_entity)?;
        *self
            .seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(fingerprint);
        match self.expected {
            Some(pin) if pin != fingerprint => Err(rustls::Error::InvalidCertificate(
                CertificateError::ApplicationVerificationFailure,
            )),
            _ => Ok(ServerCertVerified::assertion()),
        }
    }

    handshake_signatures!();
}

/// The crypto provider every endpoint in this project uses (ring).
///
/// Cipher suites: TLS 1.3's AES-128-GCM-SHA256 first, then ChaCha20-Poly1305-SHA256, then
/// AES-256-GCM-SHA384. Both ends are ours, so the first one always wins: the handshake's key
/// schedule then runs on SHA-256, which this class of CPU has in hardware (SHA-NI), instead of
/// SHA-384 in software — a few percent of a gateway's CPU per device handshake (measured with
/// perf for issue #8). AES-128-GCM is QUIC's own Initial protection and TLS 1.3's mandatory suite.
pub fn provider() -> Arc<CryptoProvider> {
    use rustls::crypto::ring::cipher_suite as cs;
    let mut p = rustls::crypto::ring::default_provider();
    p.cipher_suites = vec![
        cs::TLS13_AES_128_GCM_SHA256,
        cs::TLS13_CHACHA20_POLY1305_SHA256,
        cs::TLS13_AES_256_GCM_SHA384,
    ];
    Arc::new(p)
}
