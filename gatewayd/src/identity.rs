//! The gateway's own TLS identity: a P-256 key and self-signed certificate that devices pin on
//! first use. Generated on first start into the state directory (`gateway.key` 0600,
//! `gateway.crt` 0644) and loaded on every start after that.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use companion_transport::{Identity, PkiError};

/// Certificate file name inside the state directory.
pub const CERT_FILE: &str = "gateway.crt";
/// Private key file name inside the state directory.
pub const KEY_FILE: &str = "gateway.key";

/// Why the identity could not be loaded or created.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// The key or certificate could not be parsed or generated.
    #[error("gateway identity: {0}")]
    Pki(#[from] PkiError),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// The key exists without its certificate.
    #[error(
        "{key} exists but {cert} does not; restore the certificate, or delete the key to create a \
         new identity (paired devices will then see a new gateway key)"
    )]
    CertMissing {
        /// The key file (present).
        key: PathBuf,
        /// The certificate file (missing).
        cert: PathBuf,
    },
    /// The certificate exists without its key.
    #[error(
        "{cert} exists but {key} does not; restore the key, or delete the certificate to create a \
         new identity (paired devices will then see a new gateway key)"
    )]
    KeyMissing {
        /// The key file (missing).
        key: PathBuf,
        /// The certificate file (present).
        cert: PathBuf,
    },
    /// The key file is readable by group or others.
    #[error("{path} is readable by group or others (mode {mode:04o}); run: chmod 600 {path}")]
    KeyPermissions {
        /// The key file.
        path: PathBuf,
        /// Its mode bits.
        mode: u32,
    },
}

/// Whether [`load_or_generate`] created a new identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// A new key and certificate were written.
    Generated,
    /// The stored key and certificate were loaded.
    Loaded,
}

/// Loads `<state_dir>/gateway.{crt,key}`, or creates them if neither exists. `common_name` goes
/// into a new certificate (the router's host name, say); it does not matter for trust.
pub fn load_or_generate(
    state_dir: &Path,
    common_name: &str,
) -> Result<(Identity, Origin), IdentityError> {
    crate::state::ensure_private_dir(state_dir).map_err(|e| match e {
        crate::state::StateError::Io { path, source } => IdentityError::Io { path, source },
        other => IdentityError::Io {
            path: state_dir.to_path_buf(),
            source: std::io::Error::other(other.to_string()),
        },
    })?;
    let cert = state_dir.join(CERT_FILE);
    let key = state_dir.join(KEY_FILE);
    match (cert.exists(), key.exists()) {
        (true, true) => {
            let mode = std::fs::metadata(&key)
                .map_err(|source| IdentityError::Io {
                    path: key.clone(),
                    source,
                })?
                .permissions()
                .mode()
                & 0o777;
            if mode & 0o077 != 0 {
                return Err(IdentityError::KeyPermissions { path: key, mode });
            }
            Ok((Identity::load(&cert, &key)?, Origin::Loaded))
        }
        (false, false) => {
            let id = Identity::self_signed(common_name)?;
            // Key first: a crash in between leaves "key without cert", which is reported, never
            // a certificate whose key was lost.
            companion_transport::pki::write_file(&key, id.key_pem().as_bytes(), 0o600)?;
            companion_transport::pki::write_file(&cert, id.cert_pem().as_bytes(), 0o644)?;
            Ok((id, Origin::Generated))
        }
        (false, true) => Err(IdentityError::CertMissing { key, cert }),
        (true, false) => Err(IdentityError::KeyMissing { key, cert }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_once_then_loaded() {
        let dir = tempfile::tempdir().unwrap();
        let (a, o) = load_or_generate(dir.path(), "gateway.lan").unwrap();
        assert_eq!(o, Origin::Generated);
        let mode = |f: &str| {
            std::fs::metadata(dir.path().join(f))
                .unwrap()
                .permissions()
                .mode()
                & 0o777
        };
        assert_eq!(mode(KEY_FILE), 0o600);
        assert_eq!(mode(CERT_FILE), 0o644);
        let (b, o) = load_or_generate(dir.path(), "ignored").unwrap();
        assert_eq!(o, Origin::Loaded);
        assert_eq!(a.fingerprint().unwrap(), b.fingerprint().unwrap());
    }

    #[test]
    fn half_an_identity_is_reported_not_replaced() {
        let dir = tempfile::tempdir().unwrap();
        load_or_generate(dir.path(), "gw").unwrap();
        std::fs::remove_file(dir.path().join(CERT_FILE)).unwrap();
        let e = load_or_generate(dir.path(), "gw").unwrap_err();
        assert!(matches!(e, IdentityError::CertMissing { .. }), "{e}");
        assert!(dir.path().join(KEY_FILE).exists());
    }

    #[test]
    fn loose_key_permissions_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        load_or_generate(dir.path(), "gw").unwrap();
        let key = dir.path().join(KEY_FILE);
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = load_or_generate(dir.path(), "gw").unwrap_err();
        assert!(e.to_string().contains("chmod 600"), "{e}");
    }
}
