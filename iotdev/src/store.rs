//! A device with persistent state in a directory:
//!
//! | file | what | mode |
//! |---|---|---|
//! | `device.crt`, `device.key` | the TLS identity (self-signed P-256) | 0644 / 0600 |
//! | `device.json` | device ID, pinned gateway fingerprint, the attempt in flight (request ID and HPKE key, so a retry reuses them), the stored credential (K, OPc, renewal key) | 0600 |
//!
//! Every write replaces the file atomically (temporary file, fsync, rename).

use std::net::SocketAddr;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use companion_crypto::hpke::DeviceHpkeKey;
use companion_proto::bundle::{AttachInfo, CredentialBundle, HomeNetwork, Key128};
use companion_proto::msg::{Params, Restrictions};
use companion_proto::{DeviceId, RequestId, Supi};
use companion_transport::Identity;
use serde::{Deserialize, Serialize};
use zeroize::{Zeroize, Zeroizing};

use crate::client::{self, Attempt, AttemptKind, ClientOptions, ProvisionedCredential};
use crate::{DeviceError, DeviceKeys};

const CERT: &str = "device.crt";
const KEY: &str = "device.key";
const STATE: &str = "device.json";

fn local(what: &str, e: impl std::fmt::Display) -> DeviceError {
    DeviceError::Local(format!("{what}: {e}"))
}

#[derive(Serialize, Deserialize, Default)]
struct ParamsFile {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    lifetime_s: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    roaming: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    dnns: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    max_bitrate_kbps: Option<u64>,
}

impl From<&Params> for ParamsFile {
    fn from(p: &Params) -> Self {
        Self {
            lifetime_s: p.lifetime_s,
            roaming: p.roaming,
            dnns: p.dnns.clone(),
            max_bitrate_kbps: p.max_bitrate_kbps,
        }
    }
}

impl From<&ParamsFile> for Params {
    fn from(p: &ParamsFile) -> Self {
        Params {
            lifetime_s: p.lifetime_s,
            roaming: p.roaming,
            dnns: p.dnns.clone(),
            max_bitrate_kbps: p.max_bitrate_kbps,
        }
    }
}

#[derive(Serialize, Deserialize)]
struct AttemptFile {
    request_id: String,
    /// `None`: provisioning; `Some`: renewal of this SUPI.
    renew_supi: Option<String>,
    params: Option<ParamsFile>,
    hpke_sk: String,
}

impl Drop for AttemptFile {
    fn drop(&mut self) {
        self.hpke_sk.zeroize();
    }
}

#[derive(Serialize, Deserialize)]
struct CredentialFile {
    request_id: String,
    supi: String,
    k: String,
    opc: String,
    amf: String,
    sqn_start: u64,
    issued_at: u64,
    expires_at: u64,
    roaming_allowed: bool,
    dnns: Vec<String>,
    max_bitrate_kbps: Option<u64>,
    attach_endpoint: String,
    attach_server_name: String,
    attach_trust_anchor: String,
    renewal_hpke_sk: String,
    /// The home network (bundle v2); empty in files written before it.
    #[serde(default)]
    home_mcc: String,
    #[serde(default)]
    home_mnc: String,
}

impl Drop for CredentialFile {
    fn drop(&mut self) {
        self.k.zeroize();
        self.opc.zeroize();
        self.renewal_hpke_sk.zeroize();
    }
}

#[derive(Serialize, Deserialize)]
struct StateFile {
    device_id: String,
    gateway_fingerprint: Option<String>,
    attempt: Option<AttemptFile>,
    credential: Option<CredentialFile>,
    /// The factory trust anchor (operator CA, DER, hex), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    operator_anchor: Option<String>,
}

/// The credential a device holds, as stored.
#[derive(Debug, Clone)]
pub struct StoredCredential {
    /// The opened, checked bundle (K and OPc wipe themselves on drop).
    pub bundle: CredentialBundle,
    /// The request that issued (or last renewed) it.
    pub request_id: RequestId,
    /// The HPKE key it was sealed to: the renewal key.
    pub renewal_key: DeviceHpkeKey,
}

fn hex16(s: &str) -> Result<[u8; 16], DeviceError> {
    let mut out = [0u8; 16];
    hex::decode_to_slice(s, &mut out).map_err(|e| local("device state", e))?;
    Ok(out)
}

fn hex_key(s: &str) -> Result<DeviceHpkeKey, DeviceError> {
    let mut b = Zeroizing::new([0u8; 32]);
    hex::decode_to_slice(s, &mut *b).map_err(|e| local("device state", e))?;
    Ok(DeviceHpkeKey::from_bytes(*b))
}

impl CredentialFile {
    fn from_stored(c: &StoredCredential) -> Self {
        let b = &c.bundle;
        Self {
            request_id: hex::encode(c.request_id.as_bytes()),
            supi: b.supi.to_string(),
            k: hex::encode(b.k.expose()),
            opc: hex::encode(b.opc.expose()),
            amf: hex::encode(b.amf),
            sqn_start: b.sqn_start,
            issued_at: b.issued_at,
            expires_at: b.expires_at,
            roaming_allowed: b.restrictions.roaming_allowed,
            dnns: b.restrictions.dnns.clone(),
            max_bitrate_kbps: b.restrictions.max_bitrate_kbps,
            attach_endpoint: b.attach.endpoint.clone(),
            attach_server_name: b.attach.server_name.clone(),
            attach_trust_anchor: hex::encode(&b.attach.trust_anchor),
            renewal_hpke_sk: hex::encode(c.renewal_key.to_bytes().expose()),
            home_mcc: b.home_network.mcc.clone(),
            home_mnc: b.home_network.mnc.clone(),
        }
    }

    fn to_stored(&self, device_id: &DeviceId) -> Result<StoredCredential, DeviceError> {
        let mut amf = [0u8; 2];
        hex::decode_to_slice(&self.amf, &mut amf).map_err(|e| local("device state", e))?;
        let request_id = RequestId(hex16(&self.request_id)?);
        let supi = Supi::new(&self.supi).map_err(|e| local("device state", e))?;
        // A file from before bundle v2: MCC from the IMSI, and a 2-digit MNC assumed.
        let home_network = if self.home_mcc.is_empty() {
            HomeNetwork {
                mcc: supi.imsi().get(..3).unwrap_or_default().to_string(),
                mnc: supi.imsi().get(3..5).unwrap_or_default().to_string(),
            }
        } else {
            HomeNetwork {
                mcc: self.home_mcc.clone(),
                mnc: self.home_mnc.clone(),
            }
        };
        Ok(StoredCredential {
            bundle: CredentialBundle {
                version: companion_proto::bundle::BUNDLE_VERSION,
                device_id: device_id.clone(),
                request_id,
                supi,
                k: Key128::from_bytes(hex16(&self.k)?),
                opc: Key128::from_bytes(hex16(&self.opc)?),
                amf,
                sqn_start: self.sqn_start,
                issued_at: self.issued_at,
                expires_at: self.expires_at,
                restrictions: Restrictions {
                    roaming_allowed: self.roaming_allowed,
                    dnns: self.dnns.clone(),
                    max_bitrate_kbps: self.max_bitrate_kbps,
                },
                attach: AttachInfo {
                    endpoint: self.attach_endpoint.clone(),
                    server_name: self.attach_server_name.clone(),
                    trust_anchor: hex::decode(&self.attach_trust_anchor)
                        .map_err(|e| local("device state", e))?,
                },
                home_network,
                // Checked when the credential arrived; not kept.
                operator_signature: None,
            },
            request_id,
            renewal_key: hex_key(&self.renewal_hpke_sk)?,
        })
    }
}

/// A device whose identity, gateway pin, attempt in flight and credential live in a directory.
#[derive(Debug)]
pub struct Device {
    dir: PathBuf,
    keys: DeviceKeys,
    attempt: Option<Attempt>,
    credential: Option<StoredCredential>,
}

impl Device {
    /// Opens the device in `dir`, or creates it there (new key) with `device_id`.
    pub fn open_or_create(dir: &Path, device_id: &DeviceId) -> Result<Self, DeviceError> {
        if dir.join(STATE).exists() {
            Self::open(dir)
        } else {
            Self::create(dir, device_id.clone())
        }
    }

    /// A new device in `dir` (created 0700) with a fresh self-signed identity.
    pub fn create(dir: &Path, device_id: DeviceId) -> Result<Self, DeviceError> {
        let keys = DeviceKeys::generate(device_id)?;
        Self::create_with(dir, keys)
    }

    /// A new device in `dir` (created 0700) with the given identity (a factory one, say).
    pub fn create_with(dir: &Path, keys: DeviceKeys) -> Result<Self, DeviceError> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| local(&dir.display().to_string(), e))?;
        let d = Self {
            dir: dir.to_path_buf(),
            keys,
            attempt: None,
            credential: None,
        };
        companion_transport::pki::write_file(
            &dir.join(KEY),
            d.keys.identity.key_pem().as_bytes(),
            0o600,
        )
        .map_err(|e| local("device key", e))?;
        companion_transport::pki::write_file(
            &dir.join(CERT),
            d.keys.identity.cert_pem().as_bytes(),
            0o644,
        )
        .map_err(|e| local("device certificate", e))?;
        d.save()?;
        Ok(d)
    }

    /// Sets the factory trust anchor (the operator CA, DER): from now on every bundle must be
    /// signed by the CN under it.
    pub fn set_operator_anchor(&mut self, der: Vec<u8>) -> Result<(), DeviceError> {
        self.keys.operator_anchor = Some(der);
        self.save()
    }

    /// Opens an existing device.
    pub fn open(dir: &Path) -> Result<Self, DeviceError> {
        let identity = Identity::load(&dir.join(CERT), &dir.join(KEY))
            .map_err(|e| local("device identity", e))?;
        let text = Zeroizing::new(
            std::fs::read_to_string(dir.join(STATE)).map_err(|e| local("device state", e))?,
        );
        let f: StateFile = serde_json::from_str(&text).map_err(|e| local("device state", e))?;
        let device_id = DeviceId::new(&f.device_id).map_err(|e| local("device state", e))?;
        let gateway_pin = f.gateway_fingerprint.as_deref().map(|h| {
            let mut out = [0u8; 32];
            hex::decode_to_slice(h, &mut out).map(|()| out)
        });
        let gateway_pin = gateway_pin
            .transpose()
            .map_err(|e| local("device state", e))?;
        let attempt = f
            .attempt
            .as_ref()
            .map(|a| -> Result<Attempt, DeviceError> {
                let params = a.params.as_ref().map(Params::from);
                Ok(Attempt {
                    request_id: RequestId(hex16(&a.request_id)?),
                    kind: match &a.renew_supi {
                        None => AttemptKind::Provision {
                            params: params.unwrap_or_default(),
                        },
                        Some(s) => AttemptKind::Renew {
                            supi: Supi::new(s).map_err(|e| local("device state", e))?,
                            params,
                        },
                    },
                    hpke: hex_key(&a.hpke_sk)?,
                })
            })
            .transpose()?;
        let credential = f
            .credential
            .as_ref()
            .map(|c| c.to_stored(&device_id))
            .transpose()?;
        Ok(Self {
            dir: dir.to_path_buf(),
            keys: DeviceKeys {
                device_id,
                identity,
                gateway_pin,
                operator_anchor: f
                    .operator_anchor
                    .as_deref()
                    .map(hex::decode)
                    .transpose()
                    .map_err(|e| local("device state", e))?,
            },
            attempt,
            credential,
        })
    }

    fn save(&self) -> Result<(), DeviceError> {
        let f = StateFile {
            device_id: self.keys.device_id.to_string(),
            gateway_fingerprint: self.keys.gateway_pin.map(hex::encode),
            operator_anchor: self.keys.operator_anchor.as_ref().map(hex::encode),
            attempt: self.attempt.as_ref().map(|a| {
                let (renew_supi, params) = match &a.kind {
                    AttemptKind::Provision { params } => (None, Some(ParamsFile::from(params))),
                    AttemptKind::Renew { supi, params } => (
                        Some(supi.to_string()),
                        params.as_ref().map(ParamsFile::from),
                    ),
                };
                AttemptFile {
                    request_id: hex::encode(a.request_id.as_bytes()),
                    renew_supi,
                    params,
                    hpke_sk: hex::encode(a.hpke.to_bytes().expose()),
                }
            }),
            credential: self.credential.as_ref().map(CredentialFile::from_stored),
        };
        let text =
            Zeroizing::new(serde_json::to_vec_pretty(&f).map_err(|e| local("device state", e))?);
        companion_transport::pki::write_file(&self.dir.join(STATE), &text, 0o600)
            .map_err(|e| local("device state", e))
    }

    /// The device's ID, TLS identity and gateway pin.
    pub fn keys(&self) -> &DeviceKeys {
        &self.keys
    }

    /// The device's state directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The pairing code to give the gateway's owner.
    pub fn pairing_code(&self) -> Result<String, DeviceError> {
        Ok(self.keys.pairing_code()?.to_string())
    }

    /// The stored credential, if any.
    pub fn credential(&self) -> Option<&StoredCredential> {
        self.credential.as_ref()
    }

    /// The attempt in flight (its request ID is reused by the next try), if any.
    pub fn attempt(&self) -> Option<&Attempt> {
        self.attempt.as_ref()
    }

    /// Forgets the pinned gateway key (the owner replaced the gateway).
    pub fn reset_gateway_pin(&mut self) -> Result<(), DeviceError> {
        self.keys.gateway_pin = None;
        self.save()
    }

    /// Whether the credential expires within `margin` of `now_unix` (or there is none).
    pub fn needs_renewal(&self, now_unix: u64, margin: Duration) -> bool {
        self.credential
            .as_ref()
            .is_none_or(|c| c.bundle.expires_at <= now_unix + margin.as_secs())
    }

    /// Prepares a provisioning attempt (fresh request ID and HPKE key, stored 0600) without
    /// sending anything, unless one is already in flight; returns the attempt the next
    /// [`Device::provision`] will use.
    pub fn prepare_provision(&mut self, params: Params) -> Result<&Attempt, DeviceError> {
        if self.attempt.is_none() {
            self.attempt = Some(Attempt::provision(params)?);
            self.save()?;
        }
        self.attempt
            .as_ref()
            .ok_or_else(|| DeviceError::Local("no attempt".into()))
    }

    /// Forgets the attempt in flight (the next provisioning or renewal starts a new request).
    pub fn abandon_attempt(&mut self) -> Result<(), DeviceError> {
        self.attempt = None;
        self.save()
    }

    /// Provisions a credential through the gateway at `gateway`. An attempt left unfinished by
    /// an earlier call is resumed with the same request ID; a new one is created (and stored
    /// before anything is sent) otherwise. The credential is stored before it is acknowledged.
    pub async fn provision(
        &mut self,
        endpoint: &quinn::Endpoint,
        gateway: SocketAddr,
        params: Params,
        opts: &ClientOptions,
    ) -> Result<StoredCredential, DeviceError> {
        if self.attempt.is_none() {
            self.attempt = Some(Attempt::provision(params)?);
            self.save()?;
        }
        self.run_attempt(endpoint, gateway, opts).await
    }

    /// Renews the stored credential (request ID derived from the current one, sealed to the
    /// renewal key, so a renewal the gateway pre-fetched is delivered at once).
    pub async fn renew(
        &mut self,
        endpoint: &quinn::Endpoint,
        gateway: SocketAddr,
        params: Option<Params>,
        opts: &ClientOptions,
    ) -> Result<StoredCredential, DeviceError> {
        if self.attempt.is_none() {
            let c = self.credential.as_ref().ok_or_else(|| {
                DeviceError::Local("no credential to renew; provision first".into())
            })?;
            self.attempt = Some(Attempt::renew(
                &c.request_id,
                c.bundle.supi.clone(),
                c.renewal_key.clone(),
                params,
            ));
            self.save()?;
        }
        self.run_attempt(endpoint, gateway, opts).await
    }

    async fn run_attempt(
        &mut self,
        endpoint: &quinn::Endpoint,
        gateway: SocketAddr,
        opts: &ClientOptions,
    ) -> Result<StoredCredential, DeviceError> {
        let attempt = self
            .attempt
            .clone()
            .ok_or_else(|| DeviceError::Local("no attempt".into()))?;
        let keys = self.keys.clone();
        let mut stored: Option<StoredCredential> = None;
        let r = {
            let mut sink = |c: &ProvisionedCredential| -> Result<(), DeviceError> {
                let s = StoredCredential {
                    bundle: c.bundle.clone(),
                    request_id: c.request_id,
                    renewal_key: c.hpke.clone(),
                };
                self.credential = Some(s.clone());
                if self.keys.gateway_pin.is_none() {
                    self.keys.gateway_pin = Some(c.gateway_fingerprint);
                }
                self.save()?;
                stored = Some(s);
                Ok(())
            };
            client::run_with_sink(endpoint, gateway, &keys, &attempt, opts, &mut sink).await
        };
        match r {
            Ok(c) => {
                self.attempt = None;
                self.save()?;
                match stored {
                    Some(s) => Ok(s),
                    // Acknowledgement disabled (test hook): nothing was stored.
                    None => Ok(StoredCredential {
                        bundle: c.bundle,
                        request_id: c.request_id,
                        renewal_key: c.hpke,
                    }),
                }
            }
            Err(e) => {
                if !e.is_retryable() {
                    // A definitive answer: the next call starts a new attempt.
                    self.attempt = None;
                    self.save()?;
                }
                Err(e)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn state_survives_reopen_and_is_private() {
        let dir = tempfile::tempdir().unwrap();
        let id = DeviceId::new("sensor-7").unwrap();
        let mut d = Device::create(dir.path(), id.clone()).unwrap();
        d.attempt = Some(Attempt::provision(Params::default()).unwrap());
        d.keys.gateway_pin = Some([3; 32]);
        d.credential = Some(StoredCredential {
            bundle: CredentialBundle {
                version: companion_proto::bundle::BUNDLE_VERSION,
                device_id: id.clone(),
                request_id: RequestId([1; 16]),
                supi: Supi::new("imsi-001010000000042").unwrap(),
                k: Key128::from_bytes([0x46; 16]),
                opc: Key128::from_bytes([0xcd; 16]),
                amf: [0x80, 0],
                sqn_start: 32,
                issued_at: 10,
                expires_at: 20,
                restrictions: Restrictions::default(),
                attach: AttachInfo {
                    endpoint: "127.0.0.1:1".into(),
                    server_name: "cn".into(),
                    trust_anchor: vec![0x30, 0],
                },
                home_network: HomeNetwork {
                    mcc: "001".into(),
                    mnc: "01".into(),
                },
                operator_signature: None,
            },
            request_id: RequestId([1; 16]),
            renewal_key: DeviceHpkeKey::generate(),
        });
        d.save().unwrap();
        let mode = std::fs::metadata(dir.path().join(STATE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let e = Device::open_or_create(dir.path(), &id).unwrap();
        assert_eq!(e.keys.gateway_pin, Some([3; 32]));
        assert_eq!(
            e.attempt.as_ref().unwrap().request_id,
            d.attempt.as_ref().unwrap().request_id
        );
        let c = e.credential().unwrap();
        assert_eq!(c.bundle, d.credential().unwrap().bundle);
        assert_eq!(
            c.renewal_key.public_key(),
            d.credential().unwrap().renewal_key.public_key()
        );
        assert_eq!(e.keys.fingerprint().unwrap(), d.keys.fingerprint().unwrap());
        assert!(e.needs_renewal(15, Duration::from_secs(5)));
        assert!(!e.needs_renewal(5, Duration::from_secs(5)));
    }
}
