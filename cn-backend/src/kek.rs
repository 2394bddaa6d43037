//! Secrets at rest: K and OPc are stored encrypted under a key-encryption key (KEK) that lives in
//! a file outside the database.
//!
//! - Key file: exactly 32 raw random bytes, mode 0600, created by [`Kek::init`] (never
//!   overwritten) and refused by [`Kek::load`] if it has the wrong length or is readable by group
//!   or others.
//! - Cipher: XChaCha20-Poly1305 (`chacha20poly1305` 0.11, the `aead` 0.6 generation `hpke` uses in
//!   `companion-crypto`), a fresh random 192-bit nonce per value.
//! - Stored value: `0x01 (format version) || nonce (24) || ciphertext (16) || tag (16)` = 57 bytes.
//! - AAD: `"cn-backend/kek/v1" || 0 || table || 0 || SUPI || 0 || column`, so a ciphertext copied
//!   into another row or column fails to decrypt instead of silently swapping keys.
//! - A check value (an encryption of a constant under the row identity `meta/kek/check`) is kept in
//!   the database so opening it with the wrong KEK fails at once with a clear error.

use std::fmt;
use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use chacha20poly1305::aead::{AeadInOut, KeyInit};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use companion_crypto::secret::Key128;
use thiserror::Error;
use zeroize::Zeroizing;

/// Length of the KEK file, in bytes.
pub const KEK_LEN: usize = 32;
const VERSION: u8 = 1;
const NONCE_LEN: usize = 24;
const TAG_LEN: usize = 16;
/// Length of one encrypted 16-byte secret as stored.
pub const SEALED_KEY_LEN: usize = 1 + NONCE_LEN + 16 + TAG_LEN;
const AAD_LABEL: &[u8] = b"cn-backend/kek/v1";
const CHECK_PLAINTEXT: [u8; 16] = *b"cn-backend kek  ";

/// KEK file and decryption errors. Never carries secret material.
#[derive(Debug, Error)]
pub enum KekError {
    /// The key file could not be read or written.
    #[error("KEK file {path}: {source}")]
    Io {
        /// The key file.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// `init` found an existing file and refuses to overwrite it.
    #[error("KEK file {0} already exists; refusing to overwrite it")]
    Exists(PathBuf),
    /// The file is not exactly 32 bytes.
    #[error("KEK file {path} must hold exactly 32 bytes, found {len}")]
    Length {
        /// The key file.
        path: PathBuf,
        /// Its length.
        len: u64,
    },
    /// The file is readable or writable by group or others.
    #[error(
        "KEK file {path} has mode {mode:o}; it must not be accessible by group or others (chmod 600)"
    )]
    Permissions {
        /// The key file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The operating system's random source failed.
    #[error("random number generator failed")]
    Rng,
    /// A stored value failed authentication: wrong KEK, corruption, or a value moved between rows.
    #[error("encrypted {0} failed to decrypt (wrong KEK, corrupted or moved value)")]
    Decrypt(String),
}

/// The key-encryption key. Its bytes are zeroized on drop; Debug prints nothing secret.
pub struct Kek {
    cipher: XChaCha20Poly1305,
}

impl fmt::Debug for Kek {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Kek(<redacted>)")
    }
}

/// Where an encrypted value belongs: its table, row and column.
#[derive(Debug, Clone, Copy)]
pub struct RowId<'a> {
    /// Table name, e.g. `parents`.
    pub table: &'a str,
    /// The row's SUPI (or another unique name).
    pub row: &'a str,
    /// Column name, e.g. `k`.
    pub column: &'a str,
}

impl RowId<'_> {
    fn aad(&self) -> Vec<u8> {
        let mut aad = Vec::with_capacity(AAD_LABEL.len() + self.table.len() + self.row.len() + 16);
        for part in [
            AAD_LABEL,
            self.table.as_bytes(),
            self.row.as_bytes(),
            self.column.as_bytes(),
        ] {
            aad.extend_from_slice(part);
            aad.push(0);
        }
        aad
    }

    fn describe(&self) -> String {
        format!("{}.{} of {}", self.table, self.column, self.row)
    }
}

const CHECK_ROW: RowId<'static> = RowId {
    table: "meta",
    row: "kek",
    column: "check",
};

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> KekError + '_ {
    move |source| KekError::Io {
        path: path.to_owned(),
        source,
    }
}

impl Kek {
    /// Creates a new random KEK file with mode 0600 (fails if the file exists) and returns it.
    pub fn init(path: &Path) -> Result<Self, KekError> {
        let mut bytes = Zeroizing::new([0u8; KEK_LEN]);
        getrandom::fill(bytes.as_mut()).map_err(|_| KekError::Rng)?;
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| {
                if e.kind() == io::ErrorKind::AlreadyExists {
                    KekError::Exists(path.to_owned())
                } else {
                    io_err(path)(e)
                }
            })?;
        file.write_all(bytes.as_ref()).map_err(io_err(path))?;
        file.sync_all().map_err(io_err(path))?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
            && let Ok(d) = fs::File::open(dir)
        {
            // Make the new directory entry durable too; best effort on odd filesystems.
            let _ = d.sync_all();
        }
        Ok(Self::from_bytes(&bytes))
    }

    /// Loads a KEK file, refusing one with the wrong size or permissions.
    pub fn load(path: &Path) -> Result<Self, KekError> {
        let meta = fs::metadata(path).map_err(io_err(path))?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(KekError::Permissions {
                path: path.to_owned(),
                mode,
            });
        }
        if meta.len() != KEK_LEN as u64 {
            return Err(KekError::Length {
                path: path.to_owned(),
                len: meta.len(),
            });
        }
        let data = Zeroizing::new(fs::read(path).map_err(io_err(path))?);
        let bytes: Zeroizing<[u8; KEK_LEN]> =
            Zeroizing::new(data.as_slice().try_into().map_err(|_| KekError::Length {
                path: path.to_owned(),
                len: data.len() as u64,
            })?);
        Ok(Self::from_bytes(&bytes))
    }

    /// A KEK from raw bytes (tests, or keys held in an HSM-backed loader later).
    pub fn from_bytes(bytes: &[u8; KEK_LEN]) -> Self {
        Self {
            cipher: XChaCha20Poly1305::new(&(*bytes).into()),
        }
    }

    /// Encrypts a 16-byte secret for the given row and column.
    pub fn seal(&self, id: RowId<'_>, secret: &Key128) -> Result<Vec<u8>, KekError> {
        self.seal_bytes(id, secret.expose())
    }

    fn seal_bytes(&self, id: RowId<'_>, secret: &[u8; 16]) -> Result<Vec<u8>, KekError> {
        let mut nonce = [0u8; NONCE_LEN];
        getrandom::fill(&mut nonce).map_err(|_| KekError::Rng)?;
        let mut out = Vec::with_capacity(SEALED_KEY_LEN);
        out.push(VERSION);
        out.extend_from_slice(&nonce);
        let mut buf = Zeroizing::new(secret.to_vec());
        buf.reserve(TAG_LEN);
        self.cipher
            .encrypt_in_place(&XNonce::from(nonce), &id.aad(), &mut *buf)
            .map_err(|_| KekError::Rng)?;
        out.extend_from_slice(&buf);
        Ok(out)
    }

    /// Decrypts a value sealed by [`Kek::seal`] for the same row and column.
    pub fn open(&self, id: RowId<'_>, stored: &[u8]) -> Result<Key128, KekError> {
        self.open_bytes(id, stored).map(|b| Key128::from_bytes(*b))
    }

    fn open_bytes(&self, id: RowId<'_>, stored: &[u8]) -> Result<Zeroizing<[u8; 16]>, KekError> {
        let fail = || KekError::Decrypt(id.describe());
        if stored.len() != SEALED_KEY_LEN || stored[0] != VERSION {
            return Err(fail());
        }
        let nonce: [u8; NONCE_LEN] = stored[1..1 + NONCE_LEN].try_into().map_err(|_| fail())?;
        let mut buf = Zeroizing::new(stored[1 + NONCE_LEN..].to_vec());
        self.cipher
            .decrypt_in_place(&XNonce::from(nonce), &id.aad(), &mut *buf)
            .map_err(|_| fail())?;
        let out: [u8; 16] = buf.as_slice().try_into().map_err(|_| fail())?;
        Ok(Zeroizing::new(out))
    }

    /// A value to store beside the data so [`Kek::verify_check`] can detect a wrong KEK.
    pub fn check_value(&self) -> Result<Vec<u8>, KekError> {
        self.seal_bytes(CHECK_ROW, &CHECK_PLAINTEXT)
    }

    /// Whether `stored` is a check value made by this KEK.
    pub fn verify_check(&self, stored: &[u8]) -> bool {
        self.open_bytes(CHECK_ROW, stored)
            .is_ok_and(|b| *b == CHECK_PLAINTEXT)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROW: RowId<'static> = RowId {
        table: "parents",
        row: "imsi-001010000000001",
        column: "k",
    };

    #[test]
    fn roundtrip_and_binding() {
        let kek = Kek::from_bytes(&[7; 32]);
        let k = Key128::from_bytes([0x42; 16]);
        let sealed = kek.seal(ROW, &k).unwrap();
        assert_eq!(sealed.len(), SEALED_KEY_LEN);
        assert_eq!(kek.open(ROW, &sealed).unwrap().expose(), &[0x42; 16]);
        // Same plaintext, different nonce.
        assert_ne!(kek.seal(ROW, &k).unwrap(), sealed);
        // Moved to another column or row: refused.
        let other_col = RowId {
            column: "opc",
            ..ROW
        };
        assert!(kek.open(other_col, &sealed).is_err());
        let other_row = RowId {
            row: "imsi-001010000000002",
            ..ROW
        };
        assert!(kek.open(other_row, &sealed).is_err());
        // Wrong key, truncation, tampering: refused.
        assert!(Kek::from_bytes(&[8; 32]).open(ROW, &sealed).is_err());
        assert!(kek.open(ROW, &sealed[..40]).is_err());
        let mut bad = sealed.clone();
        bad[30] ^= 1;
        assert!(kek.open(ROW, &bad).is_err());
        let check = kek.check_value().unwrap();
        assert!(kek.verify_check(&check));
        assert!(!Kek::from_bytes(&[8; 32]).verify_check(&check));
    }

    #[test]
    fn key_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kek");
        let kek = Kek::init(&path).unwrap();
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(matches!(Kek::init(&path), Err(KekError::Exists(_))));
        let loaded = Kek::load(&path).unwrap();
        let sealed = kek.seal(ROW, &Key128::from_bytes([1; 16])).unwrap();
        assert_eq!(loaded.open(ROW, &sealed).unwrap().expose(), &[1; 16]);
        assert_eq!(format!("{loaded:?}"), "Kek(<redacted>)");

        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            Kek::load(&path),
            Err(KekError::Permissions { .. })
        ));
        let short = dir.path().join("short");
        fs::write(&short, [0u8; 31]).unwrap();
        fs::set_permissions(&short, fs::Permissions::from_mode(0o600)).unwrap();
        assert!(matches!(
            Kek::load(&short),
            Err(KekError::Length { len: 31, .. })
        ));
    }
}
