//! Keys and certificates: the operator CA that signs `cn-backend`'s server certificate, and the
//! self-signed identities that devices and gateways present and pin.
//!
//! All keys are ECDSA P-256 (the curve Wi-Fi Easy Connect bootstrapping keys use and every embedded
//! TLS stack supports). Private keys leave this module only as PKCS#8 in zeroizing buffers.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SanType,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

/// Errors from key and certificate handling.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// rcgen could not make the key or the certificate.
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    /// The bytes are not a certificate this crate can read.
    #[error("not a valid X.509 certificate: {0}")]
    BadCertificate(String),
    /// The PEM text has no block of the expected label.
    #[error("PEM input holds no {0}")]
    MissingPem(&'static str),
    /// A server name is neither a DNS name nor an IP address.
    #[error("invalid subject name {0:?}: expected a DNS name or an IP address")]
    BadName(String),
    /// Reading or writing a key or certificate file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// What the system said.
        #[source]
        source: std::io::Error,
    },
}

/// SHA-256 of a DER SubjectPublicKeyInfo: how pairings, pins and the CN name a device key.
pub fn spki_fingerprint(spki_der: &[u8]) -> [u8; 32] {
    Sha256::digest(spki_der).into()
}

/// The DER SubjectPublicKeyInfo inside a DER certificate.
pub fn spki_from_cert(cert_der: &[u8]) -> Result<Vec<u8>, PkiError> {
    let (rest, cert) = x509_parser::parse_x509_certificate(cert_der)
        .map_err(|e| PkiError::BadCertificate(e.to_string()))?;
    if !rest.is_empty() {
        return Err(PkiError::BadCertificate(
            "trailing bytes after the certificate".into(),
        ));
    }
    Ok(cert.public_key().raw.to_vec())
}

fn distinguished_name(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn
}

fn validity(params: &mut CertificateParams, days: i64) {
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(days);
}

fn san(name: &str) -> Result<SanType, PkiError> {
    if let Ok(ip) = name.parse::<std::net::IpAddr>() {
        return Ok(SanType::IpAddress(ip));
    }
    name.try_into()
        .map(SanType::DnsName)
        .map_err(|_| PkiError::BadName(name.to_string()))
}

/// A certificate chain and its private key, as TLS needs them.
pub struct Identity {
    chain: Vec<CertificateDer<'static>>,
    key_pkcs8: Zeroizing<Vec<u8>>,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("certificates", &self.chain.len())
            .field("key", &"<redacted>")
            .finish()
    }
}

impl Clone for Identity {
    fn clone(&self) -> Self {
        Self {
            chain: self.chain.clone(),
            key_pkcs8: self.key_pkcs8.clone(),
        }
    }
}

impl Identity {
    /// A fresh P-256 key with a self-signed certificate: what a device or a gateway presents.
    /// Peers do not validate it against any CA; they pin its public key.
    pub fn self_signed(common_name: &str) -> Result<Self, PkiError> {
        Self::self_signed_with(common_name, &PKCS_ECDSA_P256_SHA256)
    }

    /// [`self_signed`](Self::self_signed) with an Ed25519 key (RFC 8410), for devices that
    /// prefer it: TLS 1.3 and key bindings accept it (`ed25519`, 0x0807).
    pub fn self_signed_ed25519(common_name: &str) -> Result<Self, PkiError> {
        Self::self_signed_with(common_name, &rcgen::PKCS_ED25519)
    }

    fn self_signed_with(
        common_name: &str,
        alg: &'static rcgen::SignatureAlgorithm,
    ) -> Result<Self, PkiError> {
        let key = KeyPair::generate_for(alg)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = distinguished_name(common_name);
        // Devices often have no clock before they are provisioned; pins, not dates, carry trust.
        validity(&mut params, 365 * 30);
        params.subject_alt_names = san(common_name).into_iter().collect();
        let cert = params.self_signed(&key)?;
        Ok(Self {
            chain: vec![cert.der().clone()],
            key_pkcs8: Zeroizing::new(key.serialize_der()),
        })
    }

    /// Loads a certificate chain and PKCS#8 key from PEM text.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, PkiError> {
        let chain = pem_blocks(cert_pem, "CERTIFICATE")
            .into_iter()
            .map(CertificateDer::from)
            .collect::<Vec<_>>();
        if chain.is_empty() {
            return Err(PkiError::MissingPem("CERTIFICATE"));
        }
        let key = pem_blocks(key_pem, "PRIVATE KEY")
            .into_iter()
            .next()
            .ok_or(PkiError::MissingPem("PRIVATE KEY"))?;
        Ok(Self {
            chain,
            key_pkcs8: Zeroizing::new(key),
        })
    }

    /// Loads `cert_path` and `key_path` (PEM).
    pub fn load(cert_path: &Path, key_path: &Path) -> Result<Self, PkiError> {
        let (cert, key) = read_pem_pair(cert_path, key_path)?;
        Self::from_pem(&cert, &key)
    }

    /// Writes the chain (0644) and the key (0600) as PEM.
    pub fn save(&self, cert_path: &Path, key_path: &Path) -> Result<(), PkiError> {
        write_file(cert_path, self.cert_pem().as_bytes(), 0o644)?;
        write_file(key_path, self.key_pem().as_bytes(), 0o600)
    }

    /// The certificate chain as PEM, leaf first.
    pub fn cert_pem(&self) -> String {
        self.chain
            .iter()
            .map(|c| to_pem("CERTIFICATE", c))
            .collect()
    }

    /// The private key as PKCS#8 PEM (wiped on drop).
    pub fn key_pem(&self) -> Zeroizing<String> {
        Zeroizing::new(to_pem("PRIVATE KEY", &self.key_pkcs8))
    }

    /// The certificate chain, leaf first, as presented in TLS.
    pub fn chain(&self) -> &[CertificateDer<'static>] {
        &self.chain
    }

    /// The private key for rustls. The copy rustls keeps is its own concern.
    pub fn private_key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_pkcs8.to_vec()))
    }

    /// DER SubjectPublicKeyInfo of the leaf certificate.
    pub fn spki_der(&self) -> Result<Vec<u8>, PkiError> {
        let leaf = self
            .chain
            .first()
            .ok_or(PkiError::MissingPem("CERTIFICATE"))?;
        spki_from_cert(leaf)
    }

    /// SHA-256 of the leaf's SubjectPublicKeyInfo.
    pub fn fingerprint(&self) -> Result<[u8; 32], PkiError> {
        Ok(spki_fingerprint(&self.spki_der()?))
    }
}

/// A certificate authority: a P-256 key and its self-signed CA certificate (path length 0).
///
/// As [`OperatorCa`] it is created once by `cn-backend init`, signs the CN server certificate, and
/// travels to gateways and devices as their trust anchor for the CN. As [`ManufacturerCa`] it
/// stands for a device maker's factory CA (`iotdev factory`), for tests and the demo: it certifies
/// device identity keys for manufacturer attestation (`crate::attestation`).
pub struct CertificateAuthority {
    cert_der: CertificateDer<'static>,
    key: KeyPair,
}

/// The operator's CA (see [`CertificateAuthority`]).
pub type OperatorCa = CertificateAuthority;
/// A manufacturer's device CA (see [`CertificateAuthority`]).
pub type ManufacturerCa = CertificateAuthority;

impl std::fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateAuthority")
            .field("key", &"<redacted>")
            .finish()
    }
}

impl CertificateAuthority {
    /// A new CA with a fresh P-256 key, valid for 20 years.
    pub fn generate(common_name: &str) -> Result<Self, PkiError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = distinguished_name(common_name);
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        validity(&mut params, 365 * 20);
        let cert = params.self_signed(&key)?;
        Ok(Self {
            cert_der: cert.der().clone(),
            key,
        })
    }

    /// The CA from its certificate and key in PEM.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, PkiError> {
        let cert = pem_blocks(cert_pem, "CERTIFICATE")
            .into_iter()
            .next()
            .ok_or(PkiError::MissingPem("CERTIFICATE"))?;
        let key = KeyPair::from_pem(key_pem)?;
        Ok(Self {
            cert_der: CertificateDer::from(cert),
            key,
        })
    }

    /// Loads the CA's certificate and key from `cert_path` and `key_path` (PEM).
    pub fn load(cert_path: &Path, key_path: &Path) -> Result<Self, PkiError> {
        let (cert, key) = read_pem_pair(cert_path, key_path)?;
        Self::from_pem(&cert, &key)
    }

    /// Writes the CA certificate (0644) and key (0600) as PEM.
    pub fn save(&self, cert_path: &Path, key_path: &Path) -> Result<(), PkiError> {
        write_file(cert_path, self.cert_pem().as_bytes(), 0o644)?;
        write_file(
            key_path,
            Zeroizing::new(self.key.serialize_pem()).as_bytes(),
            0o600,
        )
    }

    /// The CA certificate (DER), the trust anchor clients are given.
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// The CA certificate as PEM.
    pub fn cert_pem(&self) -> String {
        to_pem("CERTIFICATE", &self.cert_der)
    }

    /// Issues a server certificate for `names` (DNS names or IP addresses), valid for two years;
    /// the returned chain is leaf then CA.
    pub fn issue_server(&self, names: &[String]) -> Result<Identity, PkiError> {
        let issuer = Issuer::from_ca_cert_der(&self.cert_der, &self.key)?;
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        params.distinguished_name =
            distinguished_name(names.first().map(String::as_str).unwrap_or("cn-backend"));
        params.subject_alt_names = names.iter().map(|n| san(n)).collect::<Result<_, _>>()?;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        validity(&mut params, 365 * 2);
        let cert = params.signed_by(&key, &issuer)?;
        Ok(Identity {
            chain: vec![cert.der().clone(), self.cert_der.clone()],
            key_pkcs8: Zeroizing::new(key.serialize_der()),
        })
    }

    /// Issues a device identity as a factory would: a fresh P-256 key and a certificate for it
    /// naming `device_id` in a subjectAltName URI (`urn:companion:device:<id>`), for TLS client
    /// authentication, valid for 30 years (devices outlive their makers' support cycles, and
    /// their clock is not trusted). The chain is leaf then CA.
    pub fn issue_device(&self, device_id: &str) -> Result<Identity, PkiError> {
        let issuer = Issuer::from_ca_cert_der(&self.cert_der, &self.key)?;
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = distinguished_name(device_id);
        let uri = format!("{}{device_id}", crate::attestation::DEVICE_URI_PREFIX);
        params.subject_alt_names = vec![SanType::URI(
            uri.as_str()
                .try_into()
                .map_err(|_| PkiError::BadName(device_id.to_owned()))?,
        )];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        validity(&mut params, 365 * 30);
        let cert = params.signed_by(&key, &issuer)?;
        Ok(Identity {
            chain: vec![cert.der().clone(), self.cert_der.clone()],
            key_pkcs8: Zeroizing::new(key.serialize_der()),
        })
    }
}

/// A certificate file and its key file, both PEM text (the key wiped on drop).
fn read_pem_pair(
    cert_path: &Path,
    key_path: &Path,
) -> Result<(String, Zeroizing<String>), PkiError> {
    Ok((
        read_to_string(cert_path)?,
        Zeroizing::new(read_to_string(key_path)?),
    ))
}

fn read_to_string(path: &Path) -> Result<String, PkiError> {
    fs::read_to_string(path).map_err(|source| PkiError::Io {
        path: path.display().to_string(),
        source,
    })
}

/// Writes `data` to `path` with `mode`, replacing the file atomically (write to a temporary name,
/// fsync, rename), so a crash never leaves a half-written key.
pub fn write_file(path: &Path, data: &[u8], mode: u32) -> Result<(), PkiError> {
    let io = |source| PkiError::Io {
        path: path.display().to_string(),
        source,
    };
    let tmp = path.with_extension("tmp");
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io)?;
    // `mode` only applies when the file is created; enforce it on a leftover temporary too.
    f.set_permissions(fs::Permissions::from_mode(mode))
        .map_err(io)?;
    f.write_all(data).map_err(io)?;
    f.sync_all().map_err(io)?;
    fs::rename(&tmp, path).map_err(io)
}

fn to_pem(tag: &str, der: &[u8]) -> String {
    pem::encode_config(
        &pem::Pem::new(tag, der.to_vec()),
        pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
    )
}

fn pem_blocks(text: &str, tag: &str) -> Vec<Vec<u8>> {
    pem::parse_many(text)
        .map(|blocks| {
            blocks
                .into_iter()
                .filter(|b| {
                    b.tag() == tag || (tag == "PRIVATE KEY" && b.tag().ends_with("PRIVATE KEY"))
                })
                .map(pem::Pem::into_contents)
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn self_signed_identity_round_trips_through_pem() {
        let id = Identity::self_signed("watch-01").unwrap();
        let again = Identity::from_pem(&id.cert_pem(), &id.key_pem()).unwrap();
        assert_eq!(id.fingerprint().unwrap(), again.fingerprint().unwrap());
        assert_eq!(again.chain().len(), 1);
        assert!(!format!("{id:?}").contains("BEGIN"));
    }

    #[test]
    fn operator_ca_issues_a_chain_and_reloads() {
        let dir = tempfile::tempdir().unwrap();
        let ca = OperatorCa::generate("Example Operator CA").unwrap();
        ca.save(&dir.path().join("ca.pem"), &dir.path().join("ca.key"))
            .unwrap();
        let mode = fs::metadata(dir.path().join("ca.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let ca = OperatorCa::load(&dir.path().join("ca.pem"), &dir.path().join("ca.key")).unwrap();
        let server = ca
            .issue_server(&["localhost".into(), "127.0.0.1".into()])
            .unwrap();
        assert_eq!(server.chain().len(), 2);
        assert_eq!(server.chain()[1], *ca.cert_der());
    }

    #[test]
    fn garbage_is_not_a_certificate() {
        assert!(matches!(
            spki_from_cert(b"\x30\x03\x02\x01"),
            Err(PkiError::BadCertificate(_))
        ));
        assert!(matches!(
            Identity::from_pem("nothing", "nothing"),
            Err(PkiError::MissingPem(_))
        ));
    }
}
