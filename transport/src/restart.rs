//! Connection IDs and stateless resets that survive a restart (RFC 9000 §10.3).
//!
//! A QUIC server that restarts loses its connection state. Its peers keep sending on the old
//! connections until an idle timeout unless the new process answers them with a **stateless
//! reset**, which quinn sends only for packets whose destination connection ID its
//! [`ConnectionIdGenerator`](quinn::ConnectionIdGenerator) recognises and whose reset token it
//! can recompute. Both therefore derive here from one 32-byte key kept on disk (0600):
//!
//! - the reset token: HMAC-SHA-256 under the key (quinn's `reset_key`), so the token a restarted
//!   process sends matches the one the peer learned from the previous process;
//! - the connection-ID generator: quinn's [`HashedConnectionIdGenerator`] keyed with 64 bits
//!   derived from the key (HMAC-SHA-256 with the label [`CID_KEY_LABEL`]), so the restarted
//!   process validates the IDs its predecessor issued instead of dropping the packets as
//!   "invalid CID".
//!
//! Resets are rate-limited per endpoint ([`MIN_RESET_INTERVAL`]); a packet that carries no ID
//! this endpoint issued never provokes one, and a reset is always smaller than the packet that
//! provoked it (quinn), so the endpoint is no amplifier.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use quinn_proto::HashedConnectionIdGenerator;
use zeroize::Zeroizing;

/// Label of the connection-ID key derived from the reset key.
pub const CID_KEY_LABEL: &[u8] = b"companion quic connection-id key v1";

/// Shortest interval between two stateless resets sent by one endpoint. quinn's default (20 ms)
/// would reset at most 50 peers a second; a gateway restarting under thousands of held devices
/// needs more. Garbage cannot trigger resets (only IDs this endpoint issued do).
pub const MIN_RESET_INTERVAL: Duration = Duration::from_millis(1);

/// Why the reset key could not be loaded or created.
#[derive(Debug, thiserror::Error)]
pub enum ResetKeyError {
    /// The file exists but is not a 32-byte key.
    #[error("{path} holds {len} bytes, expected 32: delete it and restart to create a new one")]
    BadLength {
        /// The key file.
        path: String,
        /// Its length, bytes.
        len: usize,
    },
    /// The file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The key file.
        path: String,
        /// What the system said.
        #[source]
        source: std::io::Error,
    },
    /// A new key could not be drawn or written.
    #[error("creating {path}: {reason}")]
    Create {
        /// The key file.
        path: String,
        /// Why it could not be made.
        reason: String,
    },
}

/// Reads the endpoint's 32-byte reset key from `path`, or creates it (random, 0600) on the first
/// start.
pub fn load_or_create_reset_key(path: &Path) -> Result<Zeroizing<[u8; 32]>, ResetKeyError> {
    let shown = || path.display().to_string();
    match std::fs::read(path) {
        Ok(bytes) => {
            let bytes = Zeroizing::new(bytes);
            let key: [u8; 32] =
                bytes
                    .as_slice()
                    .try_into()
                    .map_err(|_| ResetKeyError::BadLength {
                        path: shown(),
                        len: bytes.len(),
                    })?;
            Ok(Zeroizing::new(key))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = companion_crypto::Secret::<32>::try_random().map_err(|e| {
                ResetKeyError::Create {
                    path: shown(),
                    reason: format!("the OS random generator failed: {e}"),
                }
            })?;
            crate::pki::write_file(path, key.expose(), 0o600).map_err(|e| {
                ResetKeyError::Create {
                    path: shown(),
                    reason: e.to_string(),
                }
            })?;
            Ok(Zeroizing::new(*key.expose()))
        }
        Err(source) => Err(ResetKeyError::Read {
            path: shown(),
            source,
        }),
    }
}

/// The 64-bit key of the connection-ID generator, derived from the reset key.
pub fn cid_key(reset_key: &[u8; 32]) -> u64 {
    let k = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, reset_key);
    let tag = ring::hmac::sign(&k, CID_KEY_LABEL);
    let mut first = [0u8; 8];
    first.copy_from_slice(&tag.as_ref()[..8]);
    u64::from_be_bytes(first)
}

/// A quinn endpoint configuration whose reset tokens and connection IDs are stable across
/// restarts for as long as `reset_key` is (see the module documentation).
pub fn endpoint_config(reset_key: &[u8; 32]) -> quinn::EndpointConfig {
    let mut cfg = quinn::EndpointConfig::new(Arc::new(ring::hmac::Key::new(
        ring::hmac::HMAC_SHA256,
        reset_key,
    )));
    let key = cid_key(reset_key);
    cfg.cid_generator(move || Box::new(HashedConnectionIdGenerator::from_key(key)));
    cfg.min_reset_interval(MIN_RESET_INTERVAL);
    cfg
}

#[cfg(test)]
mod tests {
    use super::*;
    use quinn::ConnectionIdGenerator;

    #[test]
    fn key_is_created_once_with_mode_0600_and_reread() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("reset.key");
        let a = load_or_create_reset_key(&path).expect("create");
        let mode = std::fs::metadata(&path).expect("stat").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let b = load_or_create_reset_key(&path).expect("reread");
        assert_eq!(*a, *b);
        std::fs::write(&path, [1u8; 31]).expect("truncate");
        let e = load_or_create_reset_key(&path).expect_err("short key");
        assert!(e.to_string().contains("31 bytes"), "{e}");
    }

    #[test]
    fn ids_issued_before_a_restart_validate_after_it_and_not_under_another_key() {
        let key = [7u8; 32];
        let before = HashedConnectionIdGenerator::from_key(cid_key(&key)).generate_cid();
        let after = HashedConnectionIdGenerator::from_key(cid_key(&key));
        assert!(after.validate(&before).is_ok());
        let other = HashedConnectionIdGenerator::from_key(cid_key(&[8u8; 32]));
        // 40-bit tag: a false accept here has probability 2^-40.
        assert!(other.validate(&before).is_err());
        assert_ne!(cid_key(&key), cid_key(&[8u8; 32]));
    }
}
