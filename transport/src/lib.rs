//! QUIC and TLS plumbing shared by `cn-backend`, `gatewayd`, `iotdev` and `loadgen`.
//!
//! - [`pki`]: the operator CA and the self-signed P-256 identities devices and gateways present;
//! - [`attestation`]: manufacturer certificate chains that certify a device's identity key;
//! - [`verify`]: rustls verifiers that admit peers by public-key fingerprint (pairing, pinning);
//! - [`quic`]: quinn endpoint configurations (TLS 1.3 only, ring, one ALPN per conversation),
//!   transport limits, and the TLS exporter the AKA session binding uses;
//! - [`restart`]: connection IDs and stateless resets that survive a daemon's restart;
//! - [`drive`]: runs a `companion-proto` sans-IO machine over one QUIC stream, with timeouts,
//!   outside work and keep-alives: the one stream loop of the CN client and server, gatewayd's
//!   device server and the `iotdev` client;
//! - [`cn_client`]: the gateway's authenticated session with the CN (AKA, batches, revoke, list);
//! - [`attach_client`]: the device's attach to the CN with a provisioned credential.
//!
//! Protocol logic lives in `companion-proto`; this crate moves bytes securely and drives the
//! protocol machines over QUIC.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod attach_client;
pub mod attestation;
pub mod binding;
pub mod cn_client;
pub mod drive;
pub mod pki;
pub mod quic;
pub mod restart;
pub mod verify;

pub use attestation::{AttestationError, ManufacturerRoots, verify_attestation};
pub use binding::{
    BindingError, BundleAuthError, IdentitySigner, sign_binding, verify_binding, verify_bundle,
};
pub use pki::{
    CertificateAuthority, Identity, ManufacturerCa, OperatorCa, PkiError, spki_fingerprint,
    spki_from_cert,
};
pub use quic::{
    ConfigError, Limits, PreAuth, ServerTrust, client_config, negotiated_alpn, peer_chain,
    peer_fingerprint, server_config, tls_exporter,
};
pub use verify::{KeyPolicy, PinnedClientVerifier, PinnedServerVerifier};

/// ALPN of the device ↔ gateway conversation.
pub const ALPN_DEVICE: &[u8] = b"companion-device/2";
/// ALPN of the gateway ↔ CN conversation.
pub const ALPN_CN: &[u8] = b"companion-cn/2";
/// ALPN of the device ↔ CN attach conversation.
pub const ALPN_ATTACH: &[u8] = b"companion-attach/1";
