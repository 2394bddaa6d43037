//! Connection IDs and stateless resets that survive a restart (RFC 9000 §10.3).
//!
//! A QUIC server that restarts loses its connection state. Its peers keep sending on the old
//! connections until an idle timeout unless the new process answers them with a **stateless
//! reset**, which quinn sends only for packets whose destination connection ID its
//! [`ConnectionIdGenerator`] recognises and whose reset token it
//! can recompute. Both therefore derive here from one 32-byte key kept on disk (0600):
//!
//! - the reset token: HMAC-SHA-256 under the key (quinn's `reset_key`), so the token a restarted
//!   process sends matches the one the peer learned from the previous process;
//! - the connection-ID generator, [`KeyedCidGenerator`]: 16-byte IDs, 8 random bytes and an
//!   8-byte HMAC-SHA-256 tag under a key derived from the reset key (label [`CID_KEY_LABEL`]),
//!   so the restarted process validates the IDs its predecessor issued instead of dropping the
//!   packets as "invalid CID".
//!
//! The ID's random part is 64 bits because quinn (0.11) draws the source ID of a **Retry**
//! without checking it against the IDs its live connections use (it does check for the IDs it
//! issues to connections). quinn's own `HashedConnectionIdGenerator` has a 24-bit random part:
//! with 5,000 devices connected (about 25,000 live IDs) one Retry in 700 collided, the device's
//! next Initial was routed to the other connection and dropped, and the device waited out its
//! handshake timeout (measured: 2–5 of 5,000 `loadgen hold` devices, none with `retry =
//! "never"`). At 64 bits a collision needs about 2^64 / live IDs Retries.
//!
//! Resets are rate-limited per endpoint ([`MIN_RESET_INTERVAL`]); a packet that carries no ID
//! this endpoint issued never provokes one, and a reset is always smaller than the packet that
//! provoked it (quinn), so the endpoint is no amplifier.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use quinn_proto::{ConnectionId, ConnectionIdGenerator, InvalidCid};
use zeroize::Zeroizing;

/// Label of the connection-ID key derived from the reset key (v2: the 16-byte IDs of
/// [`KeyedCidGenerator`]; v1 keyed quinn's 8-byte hashed IDs).
pub const CID_KEY_LABEL: &[u8] = b"companion quic connection-id key v2";

/// Random bytes of a connection ID.
const CID_NONCE_LEN: usize = 8;
/// Tag bytes of a connection ID (truncated HMAC-SHA-256 of the random part).
const CID_TAG_LEN: usize = 8;

/// Connection IDs of 8 random bytes and an 8-byte HMAC-SHA-256 tag of them under a key
/// derived from the reset key ([`cid_key`]): a restarted process recognises its predecessor's
/// IDs ([`ConnectionIdGenerator::validate`]), and the 64-bit random part keeps the IDs quinn
/// draws unchecked (a Retry's) clear of the live ones (see the module documentation).
#[derive(Clone)]
pub struct KeyedCidGenerator {
    key: ring::hmac::Key,
}

impl std::fmt::Debug for KeyedCidGenerator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KeyedCidGenerator { key: <redacted> }")
    }
}

impl KeyedCidGenerator {
    /// A generator under the connection-ID key derived from `reset_key`.
    pub fn new(reset_key: &[u8; 32]) -> Self {
        Self {
            key: cid_key(reset_key),
        }
    }

    fn tag(&self, nonce: &[u8]) -> [u8; CID_TAG_LEN] {
        let t = ring::hmac::sign(&self.key, nonce);
        let mut out = [0u8; CID_TAG_LEN];
        out.copy_from_slice(&t.as_ref()[..CID_TAG_LEN]);
        out
    }
}

impl ConnectionIdGenerator for KeyedCidGenerator {
    fn generate_cid(&mut self) -> ConnectionId {
        let mut id = [0u8; CID_NONCE_LEN + CID_TAG_LEN];
        // quinn's own generators draw from the thread RNG the same way; a connection ID is an
        // identifier, not a secret (the tag is what an off-path peer cannot forge).
        rand_fill(&mut id[..CID_NONCE_LEN]);
        let tag = self.tag(&id[..CID_NONCE_LEN]);
        id[CID_NONCE_LEN..].copy_from_slice(&tag);
        ConnectionId::new(&id)
    }

    fn validate(&self, cid: &ConnectionId) -> Result<(), InvalidCid> {
        if cid.len() != CID_NONCE_LEN + CID_TAG_LEN {
            return Err(InvalidCid);
        }
        let (nonce, tag) = cid.split_at(CID_NONCE_LEN);
        let expected = self.tag(nonce);
        if bool::from(subtle::ConstantTimeEq::ct_eq(&expected[..], tag)) {
            Ok(())
        } else {
            Err(InvalidCid)
        }
    }

    fn cid_len(&self) -> usize {
        CID_NONCE_LEN + CID_TAG_LEN
    }

    fn cid_lifetime(&self) -> Option<Duration> {
        None
    }
}

/// Fills `buf` from the system RNG. Without one a connection ID cannot be drawn and quinn's
/// trait leaves no way to fail: fall back to a hash of the time and a counter, which still
/// gives distinct IDs (an invariant documented here rather than a panic in the server).
fn rand_fill(buf: &mut [u8]) {
    use ring::rand::SecureRandom;
    if ring::rand::SystemRandom::new().fill(buf).is_ok() {
        return;
    }
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let d = ring::digest::digest(
        &ring::digest::SHA256,
        &[n.to_le_bytes().as_slice(), &t.to_le_bytes()].concat(),
    );
    for (b, x) in buf.iter_mut().zip(d.as_ref()) {
        *b = *x;
    }
}

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
pub fn cid_key(reset_key: &[u8; 32]) -> ring::hmac::Key {
    let k = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, reset_key);
    let derived = ring::hmac::sign(&k, CID_KEY_LABEL);
    ring::hmac::Key::new(ring::hmac::HMAC_SHA256, derived.as_ref())
}

/// A quinn endpoint configuration whose reset tokens and connection IDs are stable across
/// restarts for as long as `reset_key` is (see the module documentation).
pub fn endpoint_config(reset_key: &[u8; 32]) -> quinn::EndpointConfig {
    let mut cfg = quinn::EndpointConfig::new(Arc::new(ring::hmac::Key::new(
        ring::hmac::HMAC_SHA256,
        reset_key,
    )));
    let generator = KeyedCidGenerator::new(reset_key);
    cfg.cid_generator(move || Box::new(generator.clone()));
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
        let before = KeyedCidGenerator::new(&key).generate_cid();
        assert_eq!(before.len(), 16);
        let after = KeyedCidGenerator::new(&key);
        assert!(after.validate(&before).is_ok());
        let other = KeyedCidGenerator::new(&[8u8; 32]);
        // 64-bit tag: a false accept here has probability 2^-64.
        assert!(other.validate(&before).is_err());
        // A changed byte, a truncated ID and an ID of another length are refused.
        for i in 0..16 {
            let mut b = before.to_vec();
            b[i] ^= 0x01;
            assert!(after.validate(&ConnectionId::new(&b)).is_err(), "byte {i}");
        }
        assert!(after.validate(&ConnectionId::new(&before[..8])).is_err());
        let mut longer = before.to_vec();
        longer.push(0);
        assert!(after.validate(&ConnectionId::new(&longer)).is_err());
    }

    /// The property the Retry path needs: IDs drawn independently do not repeat. With quinn's
    /// 24-bit hashed IDs, 200,000 draws repeat about 1,200 times (birthday bound); with 64
    /// random bits, a repeat has probability about 2^-30 here.
    #[test]
    fn two_hundred_thousand_ids_do_not_repeat() {
        let mut g = KeyedCidGenerator::new(&[9u8; 32]);
        let mut seen = std::collections::HashSet::new();
        for _ in 0..200_000 {
            let id = g.generate_cid();
            assert!(g.validate(&id).is_ok());
            assert!(seen.insert(id.to_vec()), "a connection ID repeated");
        }
    }
}
