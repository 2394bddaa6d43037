//! The running service's shared state, the data directory's creation (`init`) and loading, and
//! the HPKE sealing of credential bundles.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use companion_crypto::secret::Key128;
use companion_proto::bundle::{
    AttachInfo, BUNDLE_VERSION, BundleSignature, CredentialBundle, HomeNetwork,
};
use companion_transport::{Identity, OperatorCa};
use thiserror::Error;
use zeroize::Zeroizing;

use crate::aka_guard::AkaGuard;
use crate::config::{ConfigError, Layout, Settings};
use crate::kek::{Kek, KekError};
use crate::metrics::Metrics;
use crate::model::{ChildCredential, DeviceId, RequestId, Restrictions, SubscriberKeys};
use crate::ops::{IssuerConfig, SealError, Sealer};
use crate::policy::{AllocationCap, OperatorPolicy};
use crate::store::{PgStore, SqliteConfig, SqliteStore, Store, StoreError, is_postgres_url};
use companion_crypto::hpke::CredentialSealer;

/// Errors creating or loading the data directory.
#[derive(Debug, Error)]
pub enum SetupError {
    /// `init` on a directory that already holds a service.
    #[error(
        "{0} is already initialised (it has cn-backend.toml or kek.key); refusing to overwrite it. Use another --dir or remove it first"
    )]
    AlreadyInitialised(String),
    /// `serve`/admin on a directory that was never initialised.
    #[error("{0} is not initialised (no kek.key): run `cn-backend init --dir {0}` first")]
    NotInitialised(String),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// A key file has the wrong content or permissions.
    #[error("{0}")]
    Key(String),
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The KEK could not be created or loaded.
    #[error(transparent)]
    Kek(#[from] KekError),
    /// The database could not be opened (the message says so once: "database error: …").
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Certificates could not be made or loaded.
    #[error("certificates: {0}")]
    Pki(#[from] companion_transport::PkiError),
    /// The random number generator failed.
    #[error("random number generator failed")]
    Rng,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> SetupError + '_ {
    move |source| SetupError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Writes a new secret file with mode 0600 (never overwrites).
fn write_secret(path: &Path, data: &[u8]) -> Result<(), SetupError> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io_err(path))?;
    f.write_all(data).map_err(io_err(path))?;
    f.sync_all().map_err(io_err(path))
}

/// Reads a secret file, refusing one readable by group or others.
fn read_secret(path: &Path) -> Result<Zeroizing<String>, SetupError> {
    let meta = fs::metadata(path).map_err(io_err(path))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(SetupError::Key(format!(
            "{} has mode {mode:o}; it must not be accessible by group or others (chmod 600)",
            path.display()
        )));
    }
    Ok(Zeroizing::new(
        fs::read_to_string(path).map_err(io_err(path))?,
    ))
}

/// What `init` created.
#[derive(Debug, Clone, serde::Serialize)]
pub struct InitReport {
    /// The data directory.
    pub dir: String,
    /// The files written into it (configuration, keys, certificates, database).
    pub files: Vec<String>,
    /// The names the server certificate is valid for.
    pub server_names: Vec<String>,
    /// The IMSI range child SUPIs are drawn from (`PLMN:first-last`).
    pub imsi_range: String,
}

/// Creates a data directory: configuration, KEK, OP, operator CA, server certificate, admin
/// token, QUIC stateless-reset key and database. Refuses an initialised directory.
pub fn init(layout: &Layout, settings: &Settings) -> Result<InitReport, SetupError> {
    settings.validate()?;
    let dir = &layout.dir;
    let mut settings = settings.clone();
    if let Some(url) = &layout.store_url {
        settings.store.url.clone_from(url);
    }
    let settings = &settings;
    if layout.config().exists() || layout.kek().exists() || layout.database().exists() {
        return Err(SetupError::AlreadyInitialised(dir.display().to_string()));
    }
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io_err(dir))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(io_err(dir))?;

    let kek = Kek::init(&layout.kek())?;
    let op = Key128::try_random().map_err(|_| SetupError::Rng)?;
    write_secret(
        &layout.op(),
        Zeroizing::new(format!("{}\n", hex::encode(op.expose()))).as_bytes(),
    )?;
    let ca = OperatorCa::generate("cn-backend operator CA")?;
    ca.save(&layout.ca_cert(), &layout.ca_key())?;
    let server = ca.issue_server(&settings.server_names)?;
    server.save(&layout.server_cert(), &layout.server_key())?;
    let token = companion_crypto::Secret::<32>::try_random().map_err(|_| SetupError::Rng)?;
    write_secret(
        &layout.admin_token(),
        Zeroizing::new(format!("{}\n", hex::encode(token.expose()))).as_bytes(),
    )?;
    // The stateless-reset key now rather than at the first `serve`, so that a copy of the
    // directory made for another instance of a fleet shares it (docs/OPERATIONS.md, "Running a
    // fleet").
    companion_transport::restart::load_or_create_reset_key(&layout.reset_key())
        .map_err(|e| SetupError::Key(e.to_string()))?;
    let postgres = !settings.store.url.is_empty();
    open_engine(layout, &settings.store.url, kek)?;
    // The configuration last: its presence marks a complete directory.
    let cfg = layout.config();
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(&cfg)
        .map_err(io_err(&cfg))?;
    f.write_all(settings.to_toml().as_bytes())
        .map_err(io_err(&cfg))?;
    f.sync_all().map_err(io_err(&cfg))?;
    let files = [
        layout.config(),
        layout.kek(),
        layout.op(),
        layout.ca_cert(),
        layout.ca_key(),
        layout.server_cert(),
        layout.server_key(),
        layout.admin_token(),
        layout.reset_key(),
    ]
    .iter()
    .chain((!postgres).then(|| layout.database()).iter())
    .map(|p| p.display().to_string())
    .collect();
    let r = settings.imsi_range()?;
    Ok(InitReport {
        dir: dir.display().to_string(),
        files,
        server_names: settings.server_names.clone(),
        imsi_range: format!(
            "imsi-{}{:0w$}..imsi-{}{:0w$}",
            r.plmn(),
            r.first_msin(),
            r.plmn(),
            r.last_msin(),
            w = 15 - r.plmn().len()
        ),
    })
}

/// Opens the database of an initialised directory: `--store URL` if given, else `[store] url`
/// of its configuration, else its SQLite file.
pub fn open_store(layout: &Layout) -> Result<Box<dyn Store>, SetupError> {
    if !layout.kek().exists() {
        return Err(SetupError::NotInitialised(layout.dir.display().to_string()));
    }
    let kek = Kek::load(&layout.kek())?;
    let settings = Settings::load(&layout.config())?;
    let url = match &layout.store_url {
        Some(u) => u.clone(),
        None => settings.store.url.clone(),
    };
    let store = open_engine(layout, &url, kek)?;
    // With a subscriber store to keep in step, every lifecycle change (from `serve` or from an
    // operator command) records its outbox row; `serve` pushes them.
    store.set_sync_outbox(settings.sync.open5gs.is_some());
    Ok(store)
}

/// Opens the engine `url` names: empty for the directory's SQLite file, `postgres://…` for
/// PostgreSQL.
fn open_engine(layout: &Layout, url: &str, kek: Kek) -> Result<Box<dyn Store>, SetupError> {
    if url.is_empty() {
        return Ok(Box::new(SqliteStore::open(
            &layout.database(),
            kek,
            SqliteConfig::default(),
        )?));
    }
    if !is_postgres_url(url) {
        return Err(SetupError::Store(StoreError::Database(format!(
            "store URL must start with postgres:// (got {:?})",
            url.split("://").next().unwrap_or_default()
        ))));
    }
    Ok(Box::new(PgStore::open_url(url, kek)?))
}

/// Loads the operator OP.
pub fn load_op(layout: &Layout) -> Result<Key128, SetupError> {
    let text = read_secret(&layout.op())?;
    Key128::from_hex(text.trim()).map_err(|_| {
        SetupError::Key(format!(
            "{} must hold 32 hexadecimal digits (the operator OP)",
            layout.op().display()
        ))
    })
}

/// Loads the admin token.
pub fn load_admin_token(layout: &Layout) -> Result<Zeroizing<String>, SetupError> {
    let t = read_secret(&layout.admin_token())?;
    let t = Zeroizing::new(t.trim().to_owned());
    if t.len() < 16 {
        return Err(SetupError::Key(format!(
            "{} holds a token shorter than 16 characters",
            layout.admin_token().display()
        )));
    }
    Ok(t)
}

/// What sealing puts in every bundle besides the credential.
#[derive(Debug, Clone)]
pub struct AttachTemplate {
    /// `host:port` of the attach endpoint.
    pub endpoint: String,
    /// TLS server name.
    pub server_name: String,
    /// Operator CA certificate, DER.
    pub trust_anchor: Vec<u8>,
}

/// Open QUIC connections: the total and, per source address key (IPv4 address, IPv6 /64), how
/// many. An address leaves the map with its last connection, so the map holds at most
/// `max_connections` entries.
#[derive(Debug, Default)]
pub struct ConnectionCount {
    /// All open connections.
    pub total: usize,
    /// Open connections per source address key.
    pub per_address: std::collections::HashMap<std::net::IpAddr, usize>,
}

/// The state every connection and request handler shares.
#[derive(Debug)]
pub struct Service {
    /// The database.
    pub store: Arc<dyn Store>,
    /// The configuration.
    pub settings: Settings,
    /// Issuing configuration (IMSI range, OP, limits).
    pub issuer: IssuerConfig,
    /// Attach information sealed into bundles.
    pub attach: AttachTemplate,
    /// Signs every bundle with the server key (its certificate chains to the operator CA), so
    /// a device with the CA as its factory trust anchor can check it (PROTOCOL.md §9.1).
    pub bundle_signer: companion_transport::IdentitySigner,
    /// Home PLMN: MCC and three-digit MNC.
    pub home_plmn: (String, String),
    /// Metrics.
    pub metrics: Metrics,
    /// AKA lock-out (per SUPI and source prefix, per source prefix) and vector reuse.
    pub aka_guard: Mutex<AkaGuard>,
    /// Open connections, in all and per source address ([`crate::server`] takes and returns
    /// the slots).
    pub connections: Mutex<ConnectionCount>,
    /// Batches being processed.
    pub inflight: AtomicUsize,
    /// Set once shutdown began.
    pub shutting_down: AtomicBool,
    /// Per-exchange timeout.
    pub exchange_timeout: Duration,
    /// AKA lock-out period.
    pub lockout: Duration,
}

/// Loaded material for [`Service::new`].
#[derive(Debug)]
pub struct Loaded {
    /// The database.
    pub store: Box<dyn Store>,
    /// The configuration.
    pub settings: Settings,
    /// Operator OP.
    pub op: Key128,
    /// CA certificate DER.
    pub ca_der: Vec<u8>,
    /// The server's TLS identity.
    pub identity: Identity,
}

/// Loads everything `serve` needs from an initialised directory.
pub fn load(layout: &Layout) -> Result<Loaded, SetupError> {
    let store = open_store(layout)?;
    let settings = Settings::load(&layout.config())?;
    let op = load_op(layout)?;
    read_secret(&layout.server_key())?;
    let identity = Identity::load(&layout.server_cert(), &layout.server_key())?;
    let ca_der = identity
        .chain()
        .get(1)
        .map(|c| c.as_ref().to_vec())
        .ok_or_else(|| {
            SetupError::Key(format!(
                "{} must hold the server certificate followed by the operator CA",
                layout.server_cert().display()
            ))
        })?;
    Ok(Loaded {
        store,
        settings,
        op,
        ca_der,
        identity,
    })
}

impl Service {
    /// Builds the shared state; `attach_endpoint` is the `host:port` put in bundles.
    pub fn new(
        loaded: Loaded,
        attach_endpoint: String,
        metrics: Metrics,
    ) -> Result<Self, SetupError> {
        let s = loaded.settings;
        let issuer = IssuerConfig {
            imsi_range: s.imsi_range()?,
            op: loaded.op,
            amf: crate::model::Amf(companion_crypto::aka::AMF_5G),
            operator: OperatorPolicy {
                max_lifetime_s: s.max_lifetime()?.as_secs(),
                allocation_cap: AllocationCap {
                    max: s.child_allocation_limit,
                    window_s: s.child_allocation_window()?.as_secs(),
                },
            },
            max_batch_items: s.max_batch_items,
        };
        let attach = AttachTemplate {
            endpoint: attach_endpoint,
            server_name: s.server_names.first().cloned().unwrap_or_default(),
            trust_anchor: loaded.ca_der,
        };
        let mnc3 = format!("{:0>3}", s.mnc);
        let bundle_signer = companion_transport::IdentitySigner::new(&loaded.identity)
            .map_err(|e| SetupError::Key(format!("the server key cannot sign bundles: {e}")))?;
        Ok(Service {
            bundle_signer,
            store: Arc::from(loaded.store),
            home_plmn: (s.mcc.clone(), mnc3),
            exchange_timeout: s.exchange_timeout()?,
            lockout: s.aka_lockout()?,
            settings: s,
            issuer,
            attach,
            metrics,
            aka_guard: Mutex::new(AkaGuard::default()),
            connections: Mutex::new(ConnectionCount::default()),
            inflight: AtomicUsize::new(0),
            shutting_down: AtomicBool::new(false),
        })
    }

    /// Whether shutdown began.
    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::Acquire)
    }

    /// Whether the serving network name names a PLMN other than home (an unparsable name
    /// counts as visited).
    pub fn is_roaming(&self, snn: &str) -> bool {
        match parse_snn(snn) {
            Some((mcc, mnc)) => {
                (mcc, mnc) != (self.home_plmn.0.as_str(), self.home_plmn.1.as_str())
            }
            None => true,
        }
    }

    /// The HPKE [`Sealer`] of batch issuance, sealing bundles with this service's attach
    /// information.
    pub fn sealer(&self) -> HpkeSealer<'_> {
        HpkeSealer { svc: self }
    }

    /// The credential bundle of `child` for the request `request_id` (for a renewal, the
    /// renewal's request ID, not the child's original one), CBOR-encoded.
    fn bundle(
        &self,
        child: &ChildCredential,
        keys: &SubscriberKeys,
        request_id: [u8; 16],
    ) -> Result<Zeroizing<Vec<u8>>, SealError> {
        let device_id = companion_proto::DeviceId::new(child.device_id.as_str())
            .map_err(|e| SealError(format!("device id: {e}")))?;
        let supi = companion_proto::Supi::new(child.supi.as_str())
            .map_err(|e| SealError(format!("supi: {e}")))?;
        let bundle = CredentialBundle {
            version: BUNDLE_VERSION,
            device_id,
            request_id: companion_proto::RequestId::from(request_id),
            supi,
            k: keys.k.clone(),
            opc: keys.opc.clone(),
            amf: child.amf.0,
            sqn_start: child.sqn.value(),
            issued_at: u64::try_from(child.issued_at.as_secs()).unwrap_or(0),
            expires_at: u64::try_from(child.expires_at.as_secs()).unwrap_or(0),
            restrictions: proto_restrictions(&child.restrictions),
            attach: AttachInfo {
                endpoint: self.attach.endpoint.clone(),
                server_name: self.attach.server_name.clone(),
                trust_anchor: self.attach.trust_anchor.clone(),
            },
            // The configured MNC as written (2 or 3 digits): its length is what the device
            // cannot learn from the IMSI.
            home_network: HomeNetwork {
                mcc: self.settings.mcc.clone(),
                mnc: self.settings.mnc.clone(),
            },
            operator_signature: None,
        };
        let msg = bundle
            .signed_message()
            .map_err(|e| SealError(format!("bundle encoding: {e}")))?;
        let sig = self
            .bundle_signer
            .sign(&msg)
            .map_err(|e| SealError(format!("bundle signature: {e}")))?;
        // The leaf only: the device holds the operator CA (its trust anchor).
        let chain = self.bundle_signer.chain().iter().take(1).cloned().collect();
        CredentialBundle {
            operator_signature: Some(BundleSignature::new(chain, sig.scheme, sig.signature)),
            ..bundle
        }
        .encode()
        .map_err(|e| SealError(format!("bundle encoding: {e}")))
    }
}

/// Seals credential bundles with HPKE ([`companion_crypto::hpke`]): the encapsulation
/// (checks the device key, X25519, key schedule) before the SUPI is allocated, the bundle's
/// encoding and AEAD seal after. The stored blob is `enc ‖ ciphertext`.
#[derive(Debug, Clone, Copy)]
pub struct HpkeSealer<'a> {
    svc: &'a Service,
}

impl Sealer for HpkeSealer<'_> {
    /// The HPKE context and the request ID it is bound to.
    type Encapsulated = (CredentialSealer, [u8; 16]);

    fn encapsulate(
        &self,
        recipient: &[u8],
        device_id: &DeviceId,
        request_id: &RequestId,
    ) -> Result<Self::Encapsulated, SealError> {
        let pk: [u8; 32] = recipient
            .try_into()
            .map_err(|_| SealError("HPKE public key must be 32 bytes".into()))?;
        let ctx = companion_crypto::hpke::encapsulate(&pk, device_id.as_str(), &request_id.0)
            .map_err(|e| SealError(format!("HPKE public key refused: {e}")))?;
        Ok((ctx, request_id.0))
    }

    fn seal(
        &self,
        (ctx, request_id): Self::Encapsulated,
        child: &ChildCredential,
        keys: &SubscriberKeys,
    ) -> Result<Vec<u8>, SealError> {
        let plaintext = self.svc.bundle(child, keys, request_id)?;
        let sealed = ctx.seal(&plaintext).map_err(|e| SealError(e.to_string()))?;
        let mut out = Vec::with_capacity(32 + sealed.ciphertext.len());
        out.extend_from_slice(&sealed.enc);
        out.extend_from_slice(&sealed.ciphertext);
        Ok(out)
    }
}

/// Splits a stored sealed blob (`enc || ciphertext`) into the wire form.
pub fn sealed_to_wire(blob: &[u8]) -> Option<companion_proto::msg::Sealed> {
    if blob.len() < 32 + 16 {
        return None;
    }
    let (enc, ct) = blob.split_at(32);
    Some(companion_proto::msg::Sealed {
        enc: enc.try_into().ok()?,
        ciphertext: ct.to_vec(),
    })
}

/// Model restrictions as sent on the wire.
pub fn proto_restrictions(r: &Restrictions) -> companion_proto::msg::Restrictions {
    companion_proto::msg::Restrictions {
        roaming_allowed: r.roaming_allowed,
        dnns: r.allowed_dnns.iter().map(ToString::to_string).collect(),
        max_bitrate_kbps: r.max_bitrate_kbps.map(u64::from),
    }
}

/// `5G:mnc<MNC>.mcc<MCC>.3gppnetwork.org` → (MCC, three-digit MNC).
pub fn parse_snn(snn: &str) -> Option<(&str, &str)> {
    let rest = snn.strip_prefix("5G:mnc")?;
    let (mnc, rest) = rest.split_once(".mcc")?;
    let (mcc, tail) = rest.split_once('.')?;
    let digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if mnc.len() != 3 || mcc.len() != 3 || !digits(mnc) || !digits(mcc) {
        return None;
    }
    if !tail.eq_ignore_ascii_case("3gppnetwork.org") {
        return None;
    }
    Some((mcc, mnc))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snn_parsing() {
        assert_eq!(
            parse_snn("5G:mnc001.mcc001.3gppnetwork.org"),
            Some(("001", "001"))
        );
        assert_eq!(parse_snn("5G:mnc01.mcc001.3gppnetwork.org"), None);
        assert_eq!(parse_snn("garbage"), None);
    }
}
