//! The companion's own 3GPP credential — the subscription the router authenticates to the CN
//! with (seed step 3).
//!
//! The daemon only ever sees a `Box<dyn companion_crypto::usim::Usim>`: today a software USIM
//! built from a credential file ([`PersistentSoftUsim`]); later a real USIM reached over PC/SC or
//! a modem's `AT+CSIM`, implementing the same trait, selected in [`open`].
//!
//! Credential file (TOML, mode 0600 or stricter, group/world-readable files are refused):
//!
//! ```toml
//! supi = "imsi-001010000000001"
//! k    = "465b5ce8b199b49faa5f0a2ee238a6bc"
//! opc  = "cd63cb71954a9f4e48a5994e37a02baf"   # or: op = "<32 hex digits>" (OPc is derived)
//! amf  = "8000"                               # optional, informational
//! ```
//!
//! The USIM's sequence-number memory (SEQ_MS, TS 33.102 Annex C) is written to
//! `<state_dir>/companion-sqn.json` (0600, atomically) after every successful authentication, so a
//! restart never accepts an AUTN again.

use std::fmt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use companion_crypto::Key128;
use companion_crypto::milenage::Milenage;
use companion_crypto::usim::{SoftUsim, SqnState, Usim, UsimError, UsimResponse};
use companion_proto::Supi;
use serde::{Deserialize, Serialize};
use zeroize::{Zeroize, Zeroizing};

use crate::config::Config;

/// The SQN state file's name inside the state directory.
pub const SQN_FILE: &str = "companion-sqn.json";

/// Why the companion credential could not be used. Messages never contain key material.
#[derive(Debug, thiserror::Error)]
pub enum CompanionError {
    /// The file could not be read.
    #[error("cannot read companion credential {path}: {source}")]
    Read {
        /// The credential file.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// The file is readable by group or others.
    #[error(
        "companion credential {path} is readable by group or others (mode {mode:04o}); it holds \
         the subscription key K: run `chmod 600 {path}`"
    )]
    Permissions {
        /// The credential file.
        path: PathBuf,
        /// Its mode bits.
        mode: u32,
    },
    /// The file does not hold a valid credential.
    #[error("companion credential {path}: {message}")]
    Invalid {
        /// The credential file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// The SQN state file exists but cannot be read.
    #[error(
        "USIM sequence-number state {path} is unreadable ({message}); refusing to start from zero \
         because that would accept replayed challenges. Restore the file, or delete it if the \
         subscription was re-provisioned at the operator"
    )]
    SqnState {
        /// The SQN state file.
        path: PathBuf,
        /// Why it could not be read.
        message: String,
    },
    /// The SQN state file could not be written.
    #[error("cannot write USIM sequence-number state {path}: {message}")]
    SqnWrite {
        /// The SQN state file.
        path: PathBuf,
        /// Why it could not be written.
        message: String,
    },
}

/// The parsed credential file; key fields are wiped when dropped.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CredentialFile {
    supi: String,
    k: String,
    opc: Option<String>,
    op: Option<String>,
    amf: Option<String>,
}

impl Drop for CredentialFile {
    fn drop(&mut self) {
        self.k.zeroize();
        self.opc.zeroize();
        self.op.zeroize();
    }
}

/// The companion's credential in memory (K and OPc zeroize on drop; `Debug` shows the SUPI only).
pub struct CompanionCredential {
    /// The companion's own subscription identifier.
    pub supi: Supi,
    /// The subscription key K.
    pub k: Key128,
    /// OPc (TS 35.206), derived from the operator key OP.
    pub opc: Key128,
    /// The AMF written in the file, if any (the USIM reads the AMF from each AUTN).
    pub amf: Option<[u8; 2]>,
}

impl fmt::Debug for CompanionCredential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CompanionCredential")
            .field("supi", &self.supi)
            .field("k", &self.k)
            .field("opc", &self.opc)
            .finish()
    }
}

impl CompanionCredential {
    /// Reads `path`, refusing a file that group or others can read.
    pub fn load(path: &Path) -> Result<Self, CompanionError> {
        let read_err = |source| CompanionError::Read {
            path: path.to_path_buf(),
            source,
        };
        let meta = std::fs::metadata(path).map_err(read_err)?;
        let mode = meta.permissions().mode() & 0o7777;
        if mode & 0o077 != 0 {
            return Err(CompanionError::Permissions {
                path: path.to_path_buf(),
                mode,
            });
        }
        let text = Zeroizing::new(std::fs::read_to_string(path).map_err(read_err)?);
        Self::parse(&text).map_err(|message| CompanionError::Invalid {
            path: path.to_path_buf(),
            message,
        })
    }

    /// Parses the file's text; the error is a message without any key material.
    pub fn parse(text: &str) -> Result<Self, String> {
        let file: CredentialFile = toml::from_str(text).map_err(|e| {
            // toml's messages quote the offending line, which may hold a key: keep only the
            // first line of the message (the reason) unless it is about an unknown field.
            e.message().to_string()
        })?;
        let supi = Supi::new(file.supi.trim()).map_err(|e| e.to_string())?;
        let k = Key128::from_hex(&file.k).map_err(|e| format!("k: {e}"))?;
        let opc = match (&file.opc, &file.op) {
            (Some(opc), None) => Key128::from_hex(opc).map_err(|e| format!("opc: {e}"))?,
            (None, Some(op)) => {
                let op = Key128::from_hex(op).map_err(|e| format!("op: {e}"))?;
                Milenage::compute_opc(&k, op.expose())
            }
            (Some(_), Some(_)) => return Err("give either opc or op, not both".into()),
            (None, None) => return Err("missing opc (or op)".into()),
        };
        let amf = file
            .amf
            .as_deref()
            .map(|a| {
                let mut out = [0u8; 2];
                hex::decode_to_slice(a.trim(), &mut out)
                    .map_err(|_| format!("amf {a:?}: expected 4 hex digits"))?;
                Ok::<_, String>(out)
            })
            .transpose()?;
        Ok(Self { supi, k, opc, amf })
    }
}

/// What `companion-sqn.json` holds.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SqnFile {
    supi: String,
    seq_ms: Vec<u64>,
}

/// A [`SoftUsim`] whose SQN memory is persisted after every successful authentication.
pub struct PersistentSoftUsim {
    inner: SoftUsim,
    sqn_path: PathBuf,
}

impl fmt::Debug for PersistentSoftUsim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PersistentSoftUsim")
            .field("usim", &self.inner)
            .field("sqn_path", &self.sqn_path)
            .finish()
    }
}

impl PersistentSoftUsim {
    /// A software USIM for `cred`, restoring the SQN memory from `<state_dir>/companion-sqn.json`
    /// (a missing file, or one for another SUPI, means a fresh USIM).
    pub fn open(cred: CompanionCredential, state_dir: &Path) -> Result<Self, CompanionError> {
        crate::state::ensure_private_dir(state_dir).map_err(|e| CompanionError::SqnWrite {
            path: state_dir.to_path_buf(),
            message: e.to_string(),
        })?;
        let sqn_path = state_dir.join(SQN_FILE);
        let state = load_sqn(&sqn_path, cred.supi.as_str())?;
        let CompanionCredential { supi, k, opc, .. } = cred;
        let inner = SoftUsim::new(supi.as_str().to_string(), k, opc).with_sqn_state(state);
        Ok(Self { inner, sqn_path })
    }

    /// The SQN memory as it is now.
    pub fn sqn_state(&self) -> SqnState {
        self.inner.sqn_state()
    }

    fn persist(&self) -> Result<(), CompanionError> {
        let file = SqnFile {
            supi: self.inner.supi().to_string(),
            seq_ms: self.inner.sqn_state().seq_ms().to_vec(),
        };
        let err = |message: String| CompanionError::SqnWrite {
            path: self.sqn_path.clone(),
            message,
        };
        let text = serde_json::to_vec_pretty(&file).map_err(|e| err(e.to_string()))?;
        companion_transport::pki::write_file(&self.sqn_path, &text, 0o600)
            .map_err(|e| err(e.to_string()))
    }
}

fn load_sqn(path: &Path, supi: &str) -> Result<SqnState, CompanionError> {
    let err = |message: String| CompanionError::SqnState {
        path: path.to_path_buf(),
        message,
    };
    let text = match std::fs::read(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(SqnState::default()),
        Err(e) => return Err(err(e.to_string())),
    };
    let file: SqnFile = serde_json::from_slice(&text).map_err(|e| err(e.to_string()))?;
    if file.supi != supi {
        // Another subscription: its SQN space is unrelated to this one.
        return Ok(SqnState::default());
    }
    SqnState::from_slice(&file.seq_ms).map_err(|e| err(e.to_string()))
}

impl Usim for PersistentSoftUsim {
    fn supi(&self) -> &str {
        self.inner.supi()
    }

    fn authenticate(
        &mut self,
        rand: &[u8; 16],
        autn: &[u8; 16],
        snn: &str,
    ) -> Result<UsimResponse, UsimError> {
        let r = self.inner.authenticate(rand, autn, snn)?;
        if matches!(r, UsimResponse::Success { .. }) {
            // Fail closed: if the new SEQ_MS cannot be stored, the answer is not used (the USIM in
            // memory has still advanced, so this process will not accept the AUTN again either).
            self.persist()
                .map_err(|e| UsimError::Unavailable(e.to_string()))?;
        }
        Ok(r)
    }
}

/// The companion USIM the configuration asks for (today: the software USIM from
/// `[companion] credential_file`, SQN state in `state_dir`).
pub fn open(cfg: &Config) -> Result<Box<dyn Usim>, CompanionError> {
    let cred = CompanionCredential::load(&cfg.companion.credential_file)?;
    Ok(Box::new(PersistentSoftUsim::open(cred, &cfg.state_dir)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use companion_crypto::aka::{AMF_5G, Sqn, generate_vector, next_sqn};

    const K: &str = "465b5ce8b199b49faa5f0a2ee238a6bc";
    const OP: &str = "cdc202d5123e20f62b6d676ac72cb318";
    const OPC: &str = "cd63cb71954a9f4e48a5994e37a02baf";
    const SUPI: &str = "imsi-001010000000001";

    fn write(dir: &Path, text: &str, mode: u32) -> PathBuf {
        let p = dir.join("companion.toml");
        std::fs::write(&p, text).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        p
    }

    #[test]
    fn op_and_opc_forms_agree() {
        let a = CompanionCredential::parse(&format!("supi=\"{SUPI}\"\nk=\"{K}\"\nopc=\"{OPC}\""))
            .unwrap();
        let b = CompanionCredential::parse(&format!(
            "supi=\"{SUPI}\"\nk=\"{K}\"\nop=\"{OP}\"\namf=\"8000\""
        ))
        .unwrap();
        assert_eq!(a.opc, b.opc);
        assert_eq!(b.amf, Some([0x80, 0]));
        assert!(!format!("{a:?}").contains("465b5ce8"));
    }

    #[test]
    fn bad_files_are_explained_without_leaking_keys() {
        let p = |t: &str| CompanionCredential::parse(t).unwrap_err();
        assert!(p(&format!("supi=\"{SUPI}\"\nk=\"{K}\"")).contains("missing opc"));
        assert!(
            p(&format!(
                "supi=\"{SUPI}\"\nk=\"{K}\"\nop=\"{OP}\"\nopc=\"{OPC}\""
            ))
            .contains("not both")
        );
        let e = p(&format!("supi=\"{SUPI}\"\nk=\"{K}00\"\nopc=\"{OPC}\""));
        assert!(e.contains("k:") && !e.contains(K), "{e}");
        assert!(p(&format!("supi=\"imsi-1\"\nk=\"{K}\"\nopc=\"{OPC}\"")).contains("SUPI"));
        let e = p(&format!(
            "supi=\"{SUPI}\"\nk=\"{K}\"\nopc=\"{OPC}\"\nki=\"x\""
        ));
        assert!(e.contains("ki") && !e.contains(K), "{e}");
    }

    #[test]
    fn group_readable_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(
            dir.path(),
            &format!("supi=\"{SUPI}\"\nk=\"{K}\"\nopc=\"{OPC}\""),
            0o640,
        );
        let e = CompanionCredential::load(&path).unwrap_err();
        assert!(matches!(e, CompanionError::Permissions { mode: 0o640, .. }));
        assert!(e.to_string().contains("chmod 600"), "{e}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(
            CompanionCredential::load(&path).unwrap().supi.as_str(),
            SUPI
        );
    }

    #[test]
    fn sqn_state_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let cred = || {
            CompanionCredential::parse(&format!("supi=\"{SUPI}\"\nk=\"{K}\"\nopc=\"{OPC}\""))
                .unwrap()
        };
        let hn = Milenage::new(
            &Key128::from_hex(K).unwrap(),
            &Key128::from_hex(OPC).unwrap(),
        );
        let v = generate_vector(&hn, next_sqn(Sqn::ZERO), &AMF_5G, [3; 16], "5G:x");
        {
            let mut usim = PersistentSoftUsim::open(cred(), &state).unwrap();
            assert!(matches!(
                usim.authenticate(&v.rand, &v.autn, "5G:x").unwrap(),
                UsimResponse::Success { .. }
            ));
        }
        let mode = std::fs::metadata(state.join(SQN_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        // After a "restart" the same challenge is a replay.
        let mut usim: Box<dyn Usim> = Box::new(PersistentSoftUsim::open(cred(), &state).unwrap());
        assert!(matches!(
            usim.authenticate(&v.rand, &v.autn, "5G:x").unwrap(),
            UsimResponse::SyncFailure { .. }
        ));
        // A corrupt state file stops the start instead of resetting to zero.
        std::fs::write(state.join(SQN_FILE), b"{").unwrap();
        let e = PersistentSoftUsim::open(cred(), &state).unwrap_err();
        assert!(matches!(e, CompanionError::SqnState { .. }), "{e}");
    }

    #[test]
    fn open_from_config() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(
            dir.path(),
            &format!("supi=\"{SUPI}\"\nk=\"{K}\"\nop=\"{OP}\""),
            0o600,
        );
        let mut cfg = Config::default();
        cfg.companion.credential_file = path;
        cfg.state_dir = dir.path().join("s");
        let usim = open(&cfg).unwrap();
        assert_eq!(usim.supi(), SUPI);
    }
}
