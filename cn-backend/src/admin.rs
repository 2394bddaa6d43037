//! Subscriber administration shared by the CLI and the admin HTTP API: request types, JSON views
//! and the blocking operations behind `cn-backend subscriber ...` and `/api/v1/...`.

use companion_crypto::aka::Sqn;
use companion_crypto::milenage::Milenage;
use companion_crypto::secret::Key128;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::import::{ImportError, import_csv};
use crate::model::{
    Amf, ChildCredential, ChildStatus, Dnn, NewParent, Parent, ParentPolicy, SubscriberKeys,
    SubscriptionStatus, Supi, Timestamp,
};
use crate::ops;
use crate::store::{AuditQuery, AuditRecord, Store, StoreError, SyncState};

/// Why an administrative operation failed.
#[derive(Debug, Error)]
pub enum AdminError {
    /// The request is invalid; the message says which value and why.
    #[error("{0}")]
    BadRequest(String),
    /// No such subscriber or credential.
    #[error("{0}")]
    NotFound(String),
    /// The change conflicts with the current state (duplicate SUPI, revoked subscription).
    #[error("{0}")]
    Conflict(String),
    /// Storage failed.
    #[error("database: {0}")]
    Store(StoreError),
    /// The CSV import failed; nothing was imported.
    #[error("import failed, nothing was imported: {0}")]
    Import(ImportError),
}

impl From<StoreError> for AdminError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::ParentNotFound(_)
            | StoreError::ChildNotFound(_)
            | StoreError::UnknownSupi(_) => AdminError::NotFound(e.to_string()),
            StoreError::Duplicate(_)
            | StoreError::InvalidTransition { .. }
            | StoreError::RootExists(_) => AdminError::Conflict(e.to_string()),
            StoreError::Model(m) => AdminError::BadRequest(m.to_string()),
            other => AdminError::Store(other),
        }
    }
}

/// A manufacturer root as shown to operators.
#[derive(Debug, Clone, Serialize)]
pub struct RootView {
    /// The operator's name for the root.
    pub name: String,
    /// The certificate's subject.
    pub subject: String,
    /// SHA-256 of the certificate (DER), hex.
    pub fingerprint: String,
    /// When it was installed (Unix seconds).
    pub added_at: i64,
}

impl RootView {
    fn of(r: &crate::store::ManufacturerRoot) -> Self {
        Self {
            name: r.name.clone(),
            subject: r.subject.clone(),
            fingerprint: hex::encode(r.fingerprint),
            added_at: r.added_at.as_secs(),
        }
    }
}

/// Installs a manufacturer root (PROTOCOL.md §4.5) from PEM or DER: a CA certificate whose
/// device certificates then attest device keys to parents that `require_attestation`.
pub fn add_root<S: Store + ?Sized>(
    store: &S,
    name: &str,
    cert: &[u8],
    now: Timestamp,
) -> Result<RootView, AdminError> {
    let ok_name = (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if !ok_name {
        return Err(bad("a root name is 1 to 64 characters of [A-Za-z0-9._-]"));
    }
    let der =
        companion_transport::attestation::certificate_der(cert).map_err(|e| bad(e.to_string()))?;
    let info = companion_transport::attestation::inspect_root(&der)
        .map_err(|e| bad(format!("not usable as a manufacturer root: {e}")))?;
    if info.not_after <= now.as_secs() {
        return Err(bad(format!(
            "the certificate expired at {} (Unix time)",
            info.not_after
        )));
    }
    let root = crate::store::ManufacturerRoot {
        name: name.to_owned(),
        fingerprint: companion_transport::spki_fingerprint(&der),
        cert_der: der,
        subject: info.subject,
        added_at: now,
    };
    store.add_manufacturer_root(&root)?;
    Ok(RootView::of(&root))
}

/// The installed manufacturer roots.
pub fn list_roots<S: Store + ?Sized>(store: &S) -> Result<Vec<RootView>, AdminError> {
    Ok(store
        .manufacturer_roots()?
        .iter()
        .map(RootView::of)
        .collect())
}

/// Removes the manufacturer root `name`. Credentials already issued stay valid; new items
/// chaining only to it no longer count as attested.
pub fn remove_root<S: Store + ?Sized>(store: &S, name: &str) -> Result<(), AdminError> {
    if store.remove_manufacturer_root(name)? {
        Ok(())
    } else {
        Err(AdminError::NotFound(format!(
            "no manufacturer root named {name:?}"
        )))
    }
}

impl From<ImportError> for AdminError {
    fn from(e: ImportError) -> Self {
        match e {
            ImportError::Store(s) => AdminError::Store(s),
            other => AdminError::Import(other),
        }
    }
}

fn bad(msg: impl Into<String>) -> AdminError {
    AdminError::BadRequest(msg.into())
}

/// Parses a SUPI given by an operator.
pub fn parse_supi(s: &str) -> Result<Supi, AdminError> {
    Supi::parse(s).map_err(|e| bad(e.to_string()))
}

/// Parses a lifetime: seconds, or a humantime duration such as `30d`.
pub fn parse_lifetime(s: &str) -> Result<u64, AdminError> {
    if let Ok(n) = s.parse::<u64>() {
        return Ok(n);
    }
    humantime::parse_duration(s)
        .map(|d| d.as_secs())
        .map_err(|e| bad(format!("lifetime {s:?}: {e} (e.g. 3600, 12h, 30d)")))
}

fn key(name: &str, hex_str: &str) -> Result<Key128, AdminError> {
    Key128::from_hex(hex_str.trim())
        .map_err(|_| bad(format!("{name} must be 32 hexadecimal digits")))
}

fn dnns(list: &[String]) -> Result<Vec<Dnn>, AdminError> {
    list.iter()
        .map(|d| Dnn::parse(d).map_err(|e| bad(e.to_string())))
        .collect()
}

/// A new parent subscription (CLI `subscriber add`, `POST /api/v1/subscribers`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddSubscriber {
    /// `imsi-...`.
    pub supi: String,
    /// K, 32 hex digits.
    pub k: String,
    /// OPc, 32 hex digits (or set `op_from_operator`).
    pub opc: Option<String>,
    /// Compute OPc from the operator's OP (`op.key`).
    #[serde(default)]
    pub op_from_operator: bool,
    /// AMF, 4 hex digits (default 8000).
    pub amf: Option<String>,
    /// Initial SQN_HE (default 0).
    pub sqn: Option<u64>,
    /// Most active children (default 10).
    pub max_children: Option<u32>,
    /// Longest child lifetime: seconds or humantime (default 30d).
    pub max_lifetime: Option<String>,
    /// Whether children may roam (default false).
    pub roaming: Option<bool>,
    /// DNNs children may use (default: any).
    #[serde(default)]
    pub dnns: Vec<String>,
    /// Bitrate cap of children in kbit/s (default: none).
    pub max_bitrate_kbps: Option<u32>,
    /// Whether devices need a manufacturer attestation (default false).
    #[serde(default)]
    pub require_attestation: bool,
}

/// Defaults of `subscriber add`.
pub const DEFAULT_MAX_CHILDREN: u32 = 10;
/// Default longest child lifetime of a new subscription.
pub const DEFAULT_MAX_LIFETIME: &str = "30d";

/// A partial policy change (CLI `subscriber policy`, `PATCH /api/v1/subscribers/{supi}/policy`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyUpdate {
    /// New quota.
    pub max_children: Option<u32>,
    /// New longest lifetime: seconds or humantime.
    pub max_lifetime: Option<String>,
    /// Roaming allowed.
    pub roaming: Option<bool>,
    /// Replace the DNN list (empty list = any).
    pub dnns: Option<Vec<String>>,
    /// New bitrate cap; 0 removes the cap.
    pub max_bitrate_kbps: Option<u32>,
    /// Require (or stop requiring) manufacturer attestation.
    pub require_attestation: Option<bool>,
}

/// A parent subscription as shown to operators.
#[derive(Debug, Clone, Serialize)]
pub struct ParentView {
    /// The parent SUPI (`imsi-…`).
    pub supi: String,
    /// `active`, `suspended` or `revoked`.
    pub status: String,
    /// AMF put in AUTN, 4 hex digits.
    pub amf: String,
    /// SQN_HE: the last SQN handed out (0: none yet).
    pub sqn: u64,
    /// Most active children at once (quota).
    pub max_children: u32,
    /// Longest lifetime of a child credential, seconds.
    pub max_lifetime_s: u64,
    /// Whether children may attach from a visited network.
    pub roaming_allowed: bool,
    /// DNNs children may use (empty: any).
    pub dnns: Vec<String>,
    /// Bitrate cap of children in kbit/s (none: no cap).
    pub max_bitrate_kbps: Option<u32>,
    /// Whether devices need a manufacturer attestation.
    pub require_attestation: bool,
    /// When the subscription was added (Unix seconds).
    pub created_at: i64,
    /// When its status or policy last changed (Unix seconds).
    pub updated_at: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    /// Live children counted now (`subscriber show` only).
    pub active_children: Option<u32>,
}

impl ParentView {
    /// The view of `p`.
    pub fn of(p: &Parent) -> Self {
        ParentView {
            supi: p.supi.to_string(),
            status: p.status.to_string(),
            amf: p.amf.to_string(),
            sqn: p.sqn.value(),
            max_children: p.policy.max_children,
            max_lifetime_s: p.policy.max_lifetime_s,
            roaming_allowed: p.policy.roaming_allowed,
            dnns: p
                .policy
                .allowed_dnns
                .iter()
                .map(ToString::to_string)
                .collect(),
            max_bitrate_kbps: p.policy.max_bitrate_kbps,
            require_attestation: p.policy.require_attestation,
            created_at: p.created_at.as_secs(),
            updated_at: p.updated_at.as_secs(),
            active_children: None,
        }
    }
}

/// A child credential as shown to operators (never its keys).
#[derive(Debug, Clone, Serialize)]
pub struct ChildView {
    /// The child SUPI.
    pub supi: String,
    /// The parent's SUPI.
    pub parent: String,
    /// The device it was issued to.
    pub device_id: String,
    /// SHA-256 of the device's identity key, hex.
    pub device_key_fingerprint: String,
    /// The request ID it was provisioned under, hex.
    pub request_id: String,
    /// `active`, `revoked` or `expired`.
    pub state: String,
    /// When it was issued (Unix seconds).
    pub issued_at: i64,
    /// When it expires (Unix seconds).
    pub expires_at: i64,
    /// When it was last renewed (Unix seconds), if ever.
    pub renewed_at: Option<i64>,
    /// When it was revoked (Unix seconds), if it was.
    pub revoked_at: Option<i64>,
    /// Whether it may attach from a visited network.
    pub roaming_allowed: bool,
    /// DNNs it may use (empty: any).
    pub dnns: Vec<String>,
    /// Its bitrate cap in kbit/s (none: no cap).
    pub max_bitrate_kbps: Option<u32>,
    /// Where the 5G core's subscriber store stands (`[sync.open5gs]` configured only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sync: Option<SyncView>,
}

/// The sync state of one credential in the 5G core's subscriber store.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct SyncView {
    /// `pending` (changes not yet acknowledged), `present` (the document is in the core),
    /// `deleted` (it was removed), or `not_synced` (nothing was ever queued).
    pub state: String,
    /// Changes waiting in the outbox.
    pub pending: u64,
    /// When the core last acknowledged a push (Unix seconds).
    pub pushed_at: Option<i64>,
}

impl SyncView {
    /// The view of `s` (`None`: never queued).
    pub fn of(s: Option<SyncState>) -> Self {
        match s {
            None => SyncView {
                state: "not_synced".into(),
                pending: 0,
                pushed_at: None,
            },
            Some(s) => SyncView {
                state: match (s.pending, s.present) {
                    (1.., _) | (0, None) => "pending",
                    (0, Some(true)) => "present",
                    (0, Some(false)) => "deleted",
                }
                .into(),
                pending: s.pending,
                pushed_at: s.pushed_at.map(Timestamp::as_secs),
            },
        }
    }
}

/// `c`'s view with its sync state when the store has the outbox on.
fn child_view<S: Store + ?Sized>(
    store: &S,
    c: &ChildCredential,
    now: Timestamp,
) -> Result<ChildView, AdminError> {
    let mut v = ChildView::of(c, now);
    if store.sync_outbox() {
        v.sync = Some(SyncView::of(store.sync_state(&c.supi)?));
    }
    Ok(v)
}

/// `active`, `revoked` or `expired` at `now`.
pub fn child_state(c: &ChildCredential, now: Timestamp) -> &'static str {
    match c.status {
        ChildStatus::Revoked => "revoked",
        ChildStatus::Active if now >= c.expires_at => "expired",
        ChildStatus::Active => "active",
    }
}

impl ChildView {
    /// The view of `c` at `now`.
    pub fn of(c: &ChildCredential, now: Timestamp) -> Self {
        ChildView {
            supi: c.supi.to_string(),
            parent: c.parent.to_string(),
            device_id: c.device_id.to_string(),
            device_key_fingerprint: c.device_key_fingerprint.to_string(),
            request_id: c.request_id.to_string(),
            state: child_state(c, now).to_owned(),
            issued_at: c.issued_at.as_secs(),
            expires_at: c.expires_at.as_secs(),
            renewed_at: c.renewed_at.map(Timestamp::as_secs),
            revoked_at: c.revoked_at.map(Timestamp::as_secs),
            roaming_allowed: c.restrictions.roaming_allowed,
            dnns: c
                .restrictions
                .allowed_dnns
                .iter()
                .map(ToString::to_string)
                .collect(),
            max_bitrate_kbps: c.restrictions.max_bitrate_kbps,
            sync: None,
        }
    }
}

/// A subscriber with its children (`subscriber show`).
#[derive(Debug, Clone, Serialize)]
pub struct SubscriberDetail {
    /// The parent subscription.
    pub subscriber: ParentView,
    /// Every child credential of it, active or not.
    pub children: Vec<ChildView>,
}

/// An audit entry as shown to operators.
#[derive(Debug, Clone, Serialize)]
pub struct AuditView {
    /// Position in the trail (increasing).
    pub id: i64,
    /// When it happened (Unix seconds).
    pub at: i64,
    /// Who did it (`cli`, `api`, `gateway:<parent SUPI>`, …).
    pub actor: String,
    /// What was done (`issue`, `renew`, `revoke`, …).
    pub action: String,
    /// The subscriber it concerns.
    pub supi: String,
    /// The parent's SUPI, for an entry about a child.
    pub parent: Option<String>,
    /// The device, for an entry about a child.
    pub device_id: Option<String>,
    /// The request ID, for an issuance or renewal, hex.
    pub request_id: Option<String>,
    /// Free-form detail (new expiry, reason); never secrets.
    pub detail: String,
}

impl AuditView {
    fn of(r: &AuditRecord) -> Self {
        let e = &r.event;
        AuditView {
            id: r.id,
            at: e.at.as_secs(),
            actor: e.actor.clone(),
            action: e.action.as_str().to_owned(),
            supi: e.supi.to_string(),
            parent: e.parent.as_ref().map(ToString::to_string),
            device_id: e.device_id.as_ref().map(ToString::to_string),
            request_id: e.request_id.map(|r| r.to_string()),
            detail: e.detail.clone(),
        }
    }
}

/// The result of suspend/resume/revoke.
#[derive(Debug, Clone, Serialize)]
pub struct StatusView {
    /// The parent SUPI.
    pub supi: String,
    /// Its status before.
    pub from: String,
    /// Its status now.
    pub to: String,
    /// The children revoked with it (suspend, revoke).
    pub revoked_children: Vec<String>,
}

/// Adds a parent subscription. `op` is the operator OP, needed for `op_from_operator`.
pub fn add_subscriber<S: Store + ?Sized>(
    store: &S,
    req: &AddSubscriber,
    op: Option<&Key128>,
    actor: &str,
    now: Timestamp,
) -> Result<ParentView, AdminError> {
    let supi = parse_supi(&req.supi)?;
    let k = key("k", &req.k)?;
    let opc = match (&req.opc, req.op_from_operator) {
        (Some(h), false) => key("opc", h)?,
        (None, true) => {
            let op = op.ok_or_else(|| bad("the operator OP (op.key) is not available"))?;
            Milenage::compute_opc(&k, op.expose())
        }
        _ => return Err(bad("give exactly one of opc and op_from_operator")),
    };
    let amf = match &req.amf {
        None => Amf::DEFAULT,
        Some(h) => {
            let b = hex::decode(h.trim()).map_err(|_| bad("amf must be 4 hexadecimal digits"))?;
            let arr: [u8; 2] = b
                .try_into()
                .map_err(|_| bad("amf must be 4 hexadecimal digits"))?;
            Amf(arr)
        }
    };
    let sqn = Sqn::new(req.sqn.unwrap_or(0)).map_err(|_| bad("sqn must fit in 48 bits"))?;
    let policy = ParentPolicy {
        max_children: req.max_children.unwrap_or(DEFAULT_MAX_CHILDREN),
        max_lifetime_s: parse_lifetime(
            req.max_lifetime.as_deref().unwrap_or(DEFAULT_MAX_LIFETIME),
        )?,
        roaming_allowed: req.roaming.unwrap_or(false),
        allowed_dnns: dnns(&req.dnns)?,
        max_bitrate_kbps: req.max_bitrate_kbps,
        require_attestation: req.require_attestation,
    };
    let parent = NewParent {
        supi: supi.clone(),
        keys: SubscriberKeys { k, opc },
        amf,
        sqn,
        policy,
    };
    ops::add_parent(store, &parent, actor, now)?;
    let p = store
        .parent(&supi)?
        .ok_or_else(|| AdminError::NotFound(format!("{supi} vanished after insert")))?;
    Ok(ParentView::of(&p))
}

/// Lists subscribers in SUPI order.
pub fn list_subscribers<S: Store + ?Sized>(
    store: &S,
    after: Option<&str>,
    limit: u32,
) -> Result<Vec<ParentView>, AdminError> {
    let after = after.map(parse_supi).transpose()?;
    let limit = if limit == 0 { 1000 } else { limit.min(100_000) };
    Ok(store
        .list_parents(after.as_ref(), limit)?
        .iter()
        .map(ParentView::of)
        .collect())
}

/// One subscriber with its children.
pub fn show_subscriber<S: Store + ?Sized>(
    store: &S,
    supi: &str,
    now: Timestamp,
) -> Result<SubscriberDetail, AdminError> {
    let supi = parse_supi(supi)?;
    let p = store
        .parent(&supi)?
        .ok_or_else(|| AdminError::NotFound(format!("unknown subscriber {supi}")))?;
    let children = store.children_of(&supi)?;
    let mut view = ParentView::of(&p);
    view.active_children = Some(store.count_active_children(&supi, now)?);
    Ok(SubscriberDetail {
        subscriber: view,
        children: children
            .iter()
            .map(|c| child_view(store, c, now))
            .collect::<Result<_, _>>()?,
    })
}

/// The children of one subscriber (`child list --parent`), with their sync state.
pub fn list_children<S: Store + ?Sized>(
    store: &S,
    parent: &str,
    now: Timestamp,
) -> Result<Vec<ChildView>, AdminError> {
    Ok(show_subscriber(store, parent, now)?.children)
}

/// One child credential (`child show`), with its sync state.
pub fn show_child<S: Store + ?Sized>(
    store: &S,
    supi: &str,
    now: Timestamp,
) -> Result<ChildView, AdminError> {
    let supi = parse_supi(supi)?;
    let c = store
        .child(&supi)?
        .ok_or_else(|| AdminError::NotFound(format!("unknown credential {supi}")))?;
    child_view(store, &c, now)
}

/// Changes a subscriber's policy; unspecified fields keep their value.
pub fn update_policy<S: Store + ?Sized>(
    store: &S,
    supi: &str,
    upd: &PolicyUpdate,
    actor: &str,
    now: Timestamp,
) -> Result<ParentView, AdminError> {
    let supi = parse_supi(supi)?;
    let p = store
        .parent(&supi)?
        .ok_or_else(|| AdminError::NotFound(format!("unknown subscriber {supi}")))?;
    let mut policy = p.policy.clone();
    if let Some(n) = upd.max_children {
        policy.max_children = n;
    }
    if let Some(l) = &upd.max_lifetime {
        policy.max_lifetime_s = parse_lifetime(l)?;
    }
    if let Some(r) = upd.roaming {
        policy.roaming_allowed = r;
    }
    if let Some(d) = &upd.dnns {
        policy.allowed_dnns = dnns(d)?;
    }
    if let Some(b) = upd.max_bitrate_kbps {
        policy.max_bitrate_kbps = (b != 0).then_some(b);
    }
    if let Some(r) = upd.require_attestation {
        policy.require_attestation = r;
    }
    ops::set_parent_policy(store, &supi, &policy, actor, now)?;
    let p = store
        .parent(&supi)?
        .ok_or_else(|| AdminError::NotFound(format!("unknown subscriber {supi}")))?;
    Ok(ParentView::of(&p))
}

/// Suspends, resumes or revokes a subscriber (suspend and revoke revoke its children).
pub fn set_status<S: Store + ?Sized>(
    store: &S,
    supi: &str,
    to: SubscriptionStatus,
    actor: &str,
    now: Timestamp,
) -> Result<StatusView, AdminError> {
    let supi = parse_supi(supi)?;
    let c = ops::set_parent_status(store, &supi, to, actor, now)?;
    Ok(StatusView {
        supi: supi.to_string(),
        from: c.from.to_string(),
        to: c.to.to_string(),
        revoked_children: c.revoked_children.iter().map(ToString::to_string).collect(),
    })
}

/// Revokes one child credential; false if it was already revoked.
pub fn revoke_child<S: Store + ?Sized>(
    store: &S,
    supi: &str,
    actor: &str,
    now: Timestamp,
) -> Result<bool, AdminError> {
    let supi = parse_supi(supi)?;
    Ok(ops::revoke_child(store, &supi, actor, now)?)
}

/// Imports a CSV of subscribers in one transaction; returns how many.
pub fn import<S: Store + ?Sized, R: std::io::Read>(
    store: &S,
    csv: R,
    actor: &str,
    now: Timestamp,
) -> Result<usize, AdminError> {
    Ok(import_csv(store, csv, actor, now)?)
}

/// The newest `limit` audit entries (about `supi` if given), oldest first.
pub fn audit<S: Store + ?Sized>(
    store: &S,
    supi: Option<&str>,
    limit: u32,
) -> Result<Vec<AuditView>, AdminError> {
    let supi = supi.map(parse_supi).transpose()?;
    let limit = if limit == 0 { 100 } else { limit };
    // Page through the trail and keep the newest `limit` entries.
    let mut out: std::collections::VecDeque<AuditView> = std::collections::VecDeque::new();
    let mut after = None;
    loop {
        let page = store.audit(&AuditQuery {
            supi: supi.clone(),
            after_id: after,
            limit: 10_000,
        })?;
        let Some(last) = page.last() else { break };
        after = Some(last.id);
        for r in &page {
            out.push_back(AuditView::of(r));
            if out.len() > limit as usize {
                out.pop_front();
            }
        }
        if page.len() < 10_000 {
            break;
        }
    }
    Ok(out.into())
}
