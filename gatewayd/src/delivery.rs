//! Credential requests from devices to the CN and the sealed credentials back (seed steps 4–6).
//!
//! [`Provisioner::handle`] takes one device request to its answer:
//! 1. authorization (the key's pairing, or the pairing window's claimant);
//! 2. a sealed credential already waiting for this request ID (an unacknowledged delivery, a
//!    retry after `cn_unavailable`, a pre-fetched renewal, also after a restart) is delivered at
//!    once;
//! 3. otherwise the request is **persisted** in [`State`] (so retries across CN reconnects and
//!    gateway restarts reuse its ID and the CN answers idempotently) and queued in the smart
//!    [`Batcher`] — refused with `busy, retry after` when the queue is full, or answered
//!    `cn_unavailable, retry after` at once when the link is down (the request stays persisted
//!    and is sent when the link returns, so the credential waits for the device's retry);
//! 4. the device waits up to `[cn] request_timeout` (informed by `Pending`), then gets
//!    `cn_unavailable, retry after`.
//!
//! The batch driver ([`Provisioner::run_batcher`]) sends batches on the link's sessions and
//! records results; [`Provisioner::maintain`] resends persisted requests after a reconnect,
//! pre-fetches renewals of credentials inside the renewal margin, retries revocations at the CN
//! and refreshes gauges.
//!
//! Sealed credentials are stored as `enc (32 bytes) || ciphertext`, exactly the CN's bytes.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use companion_proto::binding::{BindingOp, binding_message};
use companion_proto::device::DeviceRequest;
use companion_proto::msg::{
    AttestationChain, BatchItem, BatchProvision, BatchResult, ErrorCode, ErrorMsg, ItemKind,
    Outcome, Params, Revoke, Sealed,
};
use companion_proto::{DeviceId, RequestId, Supi};
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, oneshot, watch};

use crate::batcher::{Batch, Batcher, BatcherConfig};
use crate::clock::Clock;
use crate::cn_link::CnLink;
use crate::config::CredentialsConfig;
use crate::control::CnLinkState;
use crate::metrics::{Metrics, kind};
use crate::pairing::{Admission, PairingRegistry};
use crate::state::{
    OutstandingRequest, PendingDelivery, RequestKind, Revocation, RevocationScope, State,
};
use companion_transport::cn_client::CnClientError;

/// The request ID of the renewal following the credential issued for `previous`
/// ([`RequestId::renewal`], shared with the device).
pub fn renewal_request_id(previous: &RequestId) -> RequestId {
    previous.renewal()
}

/// `enc || ciphertext`.
pub fn encode_sealed(s: &Sealed) -> Vec<u8> {
    let mut v = Vec::with_capacity(32 + s.ciphertext.len());
    v.extend_from_slice(&s.enc);
    v.extend_from_slice(&s.ciphertext);
    v
}

/// Inverse of [`encode_sealed`].
pub fn decode_sealed(b: &[u8]) -> Option<Sealed> {
    if b.len() < 32 {
        return None;
    }
    let mut enc = [0u8; 32];
    enc.copy_from_slice(&b[..32]);
    Some(Sealed {
        enc,
        ciphertext: b[32..].to_vec(),
    })
}

/// `Params` as stored with a persisted request.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct StoredParams {
    lifetime_s: Option<u64>,
    roaming: Option<bool>,
    dnns: Option<Vec<String>>,
    max_bitrate_kbps: Option<u64>,
}

fn params_to_json(p: &Params) -> Option<String> {
    serde_json::to_string(&StoredParams {
        lifetime_s: p.lifetime_s,
        roaming: p.roaming,
        dnns: p.dnns.clone(),
        max_bitrate_kbps: p.max_bitrate_kbps,
    })
    .ok()
}

fn params_from_json(s: Option<&str>) -> Params {
    let p: StoredParams = s
        .and_then(|s| serde_json::from_str(s).ok())
        .unwrap_or_default();
    Params {
        lifetime_s: p.lifetime_s,
        roaming: p.roaming,
        dnns: p.dnns,
        max_bitrate_kbps: p.max_bitrate_kbps,
    }
}

/// The answer for a device stream.
#[derive(Debug, Clone)]
pub enum Reply {
    /// Send this sealed credential.
    Deliver(PendingDelivery),
    /// End the exchange with this error.
    Fail(ErrorMsg),
}

/// What the device side of a connection proved in its handshake.
#[derive(Debug, Clone)]
pub struct Peer {
    /// SHA-256 of the device key's SPKI.
    pub fingerprint: [u8; 32],
    /// DER SubjectPublicKeyInfo of the device's TLS key.
    pub spki_der: Vec<u8>,
    /// The manufacturer chain the device presented as its TLS certificate chain, when its leaf
    /// is not self-issued (PROTOCOL.md §4.5); forwarded, never trusted here.
    pub attestation: Option<AttestationChain>,
}

#[derive(Debug, Clone)]
enum Done {
    Issued(PendingDelivery),
    Refused(ErrorMsg),
    Retry(ErrorMsg),
}

/// A queued request.
#[derive(Debug)]
pub struct Job {
    item: BatchItem,
    /// Batches this request was in that were lost with their CN session.
    link_failures: u32,
}

impl Job {
    fn new(item: BatchItem) -> Self {
        Self {
            item,
            link_failures: 0,
        }
    }
}

/// Shortest `Pending.wait_ms` promised to a device.
pub const MIN_PENDING_WAIT: Duration = Duration::from_secs(1);
/// Longest `Pending.wait_ms` promised to a device.
pub const MAX_PENDING_WAIT: Duration = Duration::from_secs(10);

/// A request whose batch was lost with its CN session this many times is answered
/// `cn_unavailable` instead of being sent again (its persisted request stays for a later retry).
const MAX_LINK_FAILURES: u32 = 3;

#[derive(Debug, Default)]
struct Hub {
    /// Request IDs queued or at the CN.
    tracked: HashSet<RequestId>,
    waiters: HashMap<RequestId, Vec<oneshot::Sender<Done>>>,
}

/// Settings that SIGHUP may change.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The child credentials asked for and the renewal margin.
    pub credentials: CredentialsConfig,
    /// Longest a device waits for the CN before it is told to retry.
    pub request_timeout: Duration,
}

/// Requests, batches, deliveries, renewals and revocations.
#[derive(Debug)]
pub struct Provisioner {
    state: Arc<State>,
    registry: Arc<PairingRegistry>,
    link: Arc<CnLink>,
    metrics: Arc<Metrics>,
    clock: Arc<dyn Clock>,
    batcher: Mutex<Batcher<Job>>,
    configured: Mutex<BatcherConfig>,
    wake: Notify,
    hub: Mutex<Hub>,
    settings: RwLock<Settings>,
    batches_in_flight: AtomicUsize,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn err(code: ErrorCode, reason: impl Into<String>) -> ErrorMsg {
    ErrorMsg::new(code, reason)
}

fn millis(d: Duration) -> u64 {
    d.as_millis().min(u128::from(u64::MAX)) as u64
}

impl Provisioner {
    /// Builds the provisioner; its tasks start with [`Provisioner::run`].
    pub fn new(
        state: Arc<State>,
        registry: Arc<PairingRegistry>,
        link: Arc<CnLink>,
        metrics: Arc<Metrics>,
        clock: Arc<dyn Clock>,
        batching: BatcherConfig,
        settings: Settings,
    ) -> Arc<Self> {
        Arc::new(Self {
            state,
            registry,
            link,
            metrics,
            clock,
            batcher: Mutex::new(Batcher::new(batching.clone())),
            configured: Mutex::new(batching),
            wake: Notify::new(),
            hub: Mutex::new(Hub::default()),
            settings: RwLock::new(settings),
            batches_in_flight: AtomicUsize::new(0),
        })
    }

    fn settings(&self) -> Settings {
        self.settings
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// New batching limits and settings (SIGHUP); queued and in-flight work is kept.
    pub fn reconfigure(&self, batching: BatcherConfig, settings: Settings) {
        *lock(&self.configured) = batching;
        *self
            .settings
            .write()
            .unwrap_or_else(PoisonError::into_inner) = settings;
        self.apply_limits();
        self.wake.notify_one();
    }

    /// The configured batch size, lowered to what the CN accepts.
    fn apply_limits(&self) {
        let mut cfg = lock(&self.configured).clone();
        let cn_max = self.link.max_batch_items();
        if cn_max > 0 {
            cfg.max_batch = cfg.max_batch.min(cn_max as usize).max(1);
        }
        let mut b = lock(&self.batcher);
        if *b.config() != cfg {
            b.reconfigure(cfg);
        }
    }

    /// The batching limits in force.
    pub fn batching(&self) -> BatcherConfig {
        lock(&self.batcher).config().clone()
    }

    /// Requests waiting in the queue.
    pub fn queue_depth(&self) -> usize {
        lock(&self.batcher).queue_len()
    }

    /// Batches sent and not answered.
    pub fn batches_in_flight(&self) -> usize {
        self.batches_in_flight.load(Ordering::Relaxed)
    }

    /// `Pending.wait_ms` for a device whose request is queued or at the CN: about how long until
    /// its answer, from the real queue (the batches ahead of it at the measured service time) or,
    /// while the link is reconnecting, the next attempt — at least [`MIN_PENDING_WAIT`], at most
    /// [`MAX_PENDING_WAIT`]. It is a promise: the device server sends the answer or the next
    /// `Pending` well before it runs out ([`crate::device_server`]).
    pub fn wait_estimate(&self) -> Duration {
        let queued = {
            let b = lock(&self.batcher);
            let cfg = b.config();
            let rounds = b.queue_len().div_ceil(cfg.max_batch.max(1)) as u32 + 1;
            let rounds = rounds.div_ceil(cfg.max_in_flight.max(1) as u32).max(1);
            b.service_time() * rounds
        };
        let estimate = if self.link.state() == CnLinkState::Up {
            queued
        } else {
            queued.max(self.link.retry_after())
        };
        estimate.clamp(MIN_PENDING_WAIT, MAX_PENDING_WAIT)
    }

    fn finish(&self, id: &RequestId, done: Done) {
        let waiters = {
            let mut hub = lock(&self.hub);
            hub.tracked.remove(id);
            hub.waiters.remove(id).unwrap_or_default()
        };
        for w in waiters {
            let _ = w.send(done.clone());
        }
    }

    /// Pushes a job unless its request is already tracked; `Err(retry_after)` when the queue is
    /// full.
    fn enqueue(&self, job: Job) -> Result<(), Duration> {
        let id = job.item.request_id;
        let mut hub = lock(&self.hub);
        if hub.tracked.contains(&id) {
            return Ok(());
        }
        let mut b = lock(&self.batcher);
        match b.push(job, self.clock.now()) {
            Ok(()) => {
                hub.tracked.insert(id);
                self.metrics.queue_depth.set(b.queue_len() as i64);
                drop(b);
                drop(hub);
                self.wake.notify_one();
                Ok(())
            }
            Err(busy) => Err(busy.retry_after),
        }
    }

    /// Registers a waiter for a tracked request; `None` if it is not tracked.
    fn wait_for(&self, id: &RequestId) -> Option<oneshot::Receiver<Done>> {
        let mut hub = lock(&self.hub);
        if !hub.tracked.contains(id) {
            return None;
        }
        let (tx, rx) = oneshot::channel();
        hub.waiters.entry(*id).or_default().push(tx);
        Some(rx)
    }

    /// The `BatchItem` of a persisted request, with the device's SPKI as paired (`spki`) and its
    /// key-binding signature. A request without a signature (recorded before v3) cannot be sent:
    /// the CN would refuse it.
    fn build_item(
        &self,
        o: &OutstandingRequest,
        fingerprint: [u8; 32],
        spki: &[u8],
    ) -> Result<BatchItem, ErrorMsg> {
        let hpke: [u8; 32] = o
            .hpke_public_key
            .as_slice()
            .try_into()
            .map_err(|_| err(ErrorCode::Internal, "stored HPKE key is not 32 bytes"))?;
        let binding = o
            .binding
            .as_deref()
            .and_then(crate::state::unpack_binding)
            .ok_or_else(|| {
                err(
                    ErrorCode::Malformed,
                    "the request carries no key-binding signature; send it again",
                )
            })?;
        let params = self
            .settings()
            .credentials
            .fill_params(params_from_json(o.params.as_deref()));
        Ok(BatchItem {
            kind: match o.kind {
                RequestKind::Provision => ItemKind::Provision,
                RequestKind::Renew => ItemKind::Renew,
            },
            request_id: o.request_id,
            device_id: o.device_id.clone(),
            device_key_fingerprint: fingerprint,
            hpke_public_key: hpke,
            params,
            supi: o.renew_supi.clone(),
            device_spki: spki.to_vec(),
            binding,
            attestation: self.registry.attestation(&o.device_id),
        })
    }

    /// Takes one device request to its answer (see the module documentation).
    pub async fn handle(&self, peer: &Peer, req: DeviceRequest) -> Reply {
        let request_kind = match &req {
            DeviceRequest::Provision(_) => kind::PROVISION,
            DeviceRequest::Renew(_) => kind::RENEW,
        };
        let reply = self.handle_inner(peer, req).await;
        let outcome = match &reply {
            Reply::Deliver(_) => crate::metrics::outcome::ISSUED,
            Reply::Fail(e) => match e.code {
                ErrorCode::Busy => crate::metrics::outcome::BUSY,
                ErrorCode::CnUnavailable => crate::metrics::outcome::RETRY_LATER,
                ErrorCode::QuotaExhausted
                | ErrorCode::PolicyDenied
                | ErrorCode::CredentialRevoked
                | ErrorCode::CredentialExpired => crate::metrics::outcome::REFUSED,
                ErrorCode::NotPaired | ErrorCode::NotFound | ErrorCode::Malformed => {
                    crate::metrics::outcome::INVALID
                }
                _ => crate::metrics::outcome::ERROR,
            },
        };
        self.metrics.count_request(request_kind, outcome);
        reply
    }

    async fn handle_inner(&self, peer: &Peer, req: DeviceRequest) -> Reply {
        let request_id = req.request_id();
        // 1. Who is asking.
        let (device, kind, hpke, params, renew_supi, bindings) = match &req {
            DeviceRequest::Provision(r) => {
                if let Err(e) = self.registry.authorize(&peer.fingerprint, &r.device_id) {
                    return Reply::Fail(err(ErrorCode::NotPaired, e.to_string()));
                }
                // A new key admitted by the pairing window: it pairs only by presenting the
                // window's one-time code, and is bound (durably) before anything is queued.
                if !matches!(
                    self.registry.classify(&peer.fingerprint),
                    Admission::Paired(_)
                ) {
                    match self.registry.bind_with_code(
                        &peer.fingerprint,
                        &peer.spki_der,
                        &r.device_id,
                        r.window_code.as_deref(),
                    ) {
                        Ok(_) => {
                            tracing::info!(device = %r.device_id, "device paired through the pairing window");
                            self.metrics.devices_paired.set(self.registry.len() as i64);
                        }
                        Err(e) => {
                            tracing::info!(device = %r.device_id, error = %e, "pairing window refused a device");
                            return Reply::Fail(err(
                                ErrorCode::NotPaired,
                                format!("{e}; ask the owner for the window's code"),
                            ));
                        }
                    }
                }
                (
                    r.device_id.clone(),
                    RequestKind::Provision,
                    r.hpke_public_key,
                    Some(r.params.clone()),
                    None,
                    (r.binding.clone(), r.renewal_binding.clone()),
                )
            }
            DeviceRequest::Renew(r) => {
                let Admission::Paired(device) = self.registry.classify(&peer.fingerprint) else {
                    return Reply::Fail(err(
                        ErrorCode::NotPaired,
                        "only a paired device can renew a credential",
                    ));
                };
                match self.state.credential(&device) {
                    Ok(Some(c)) if c.supi == r.supi => {}
                    Ok(_) => {
                        return Reply::Fail(err(
                            ErrorCode::NotFound,
                            format!(
                                "{} is not the credential this gateway holds for {device}",
                                r.supi
                            ),
                        ));
                    }
                    Err(e) => return Reply::Fail(err(ErrorCode::Internal, e.to_string())),
                }
                (
                    device,
                    RequestKind::Renew,
                    r.hpke_public_key,
                    r.params.clone(),
                    Some(r.supi.clone()),
                    (r.binding.clone(), r.renewal_binding.clone()),
                )
            }
        };
        // A key every seal to would fail (all-zero or another low-order X25519 point): refused
        // here, before the request is recorded or sent to the CN (PROTOCOL.md §8, `malformed`).
        if companion_crypto::hpke::check_public_key(&hpke).is_err() {
            return Reply::Fail(err(
                ErrorCode::Malformed,
                "hpke_public_key is not a usable X25519 public key (low-order point); \
                 generate a new key pair",
            ));
        }
        // A revocation of this device ID that the CN has not confirmed yet: the CN revokes by
        // device ID, so nothing is issued under this ID until it has (try it now).
        if matches!(self.state.device_revocation_pending(&device), Ok(true)) {
            self.retry_revocations().await;
            if !matches!(self.state.device_revocation_pending(&device), Ok(false)) {
                return Reply::Fail(ErrorMsg::retry_after(
                    ErrorCode::CnUnavailable,
                    "an earlier revocation of this device ID is still pending at the core network",
                    millis(self.link.retry_after().max(Duration::from_secs(1))),
                ));
            }
        }
        // The device's signature binding this HPKE key to this request, under the key it
        // authenticated with (PROTOCOL.md §4.4). The CN checks it again and is the one that
        // counts; checking here refuses garbage before it is recorded or queued. A renewal
        // authorisation that does not verify is dropped (the renewal is then not pre-fetched).
        let op = match kind {
            RequestKind::Provision => BindingOp::Provision,
            RequestKind::Renew => BindingOp::Renew,
        };
        let (binding, renewal_binding) = bindings;
        if let Err(e) = companion_transport::verify_binding(
            &peer.spki_der,
            &binding_message(op, &request_id, &device, &hpke),
            &binding,
        ) {
            self.metrics.binding_refused.inc();
            return Reply::Fail(err(
                ErrorCode::Malformed,
                format!("{e}; sign the request with the paired TLS key (PROTOCOL.md §4.4)"),
            ));
        }
        let renewal_binding = renewal_binding.filter(|b| {
            companion_transport::verify_binding(
                &peer.spki_der,
                &binding_message(BindingOp::Renew, &request_id.renewal(), &device, &hpke),
                b,
            )
            .is_ok()
        });
        // The manufacturer chain of this connection goes with every item of the device,
        // including renewals pre-fetched while it is away (PROTOCOL.md §4.5).
        if let Err(e) = self
            .registry
            .note_attestation(&device, peer.attestation.as_ref())
        {
            return Reply::Fail(err(ErrorCode::Internal, e.to_string()));
        }
        // What is persisted if this request is new (see step 3).
        let record = OutstandingRequest {
            request_id,
            device_id: device.clone(),
            kind,
            hpke_public_key: hpke.to_vec(),
            created_at: self.clock.unix_now(),
            params: params.as_ref().and_then(params_to_json),
            renew_supi: renew_supi.clone(),
            binding: Some(crate::state::pack_binding(&binding)),
            renewal_binding: renewal_binding.as_ref().map(crate::state::pack_binding),
        };
        // 2. Already issued and waiting (redelivery, pre-fetched renewal, after a restart).
        match self.state.delivery(&device, &request_id) {
            Ok(Some(d)) => return Reply::Deliver(d),
            Ok(None) => {}
            Err(e) => return Reply::Fail(err(ErrorCode::Internal, e.to_string())),
        }
        let timeout = self.settings().request_timeout;
        // 3. Already queued or at the CN: wait for it.
        if let Some(rx) = self.wait_for(&request_id) {
            return self.await_done(rx, timeout).await;
        }
        match self.state.request_for_device(&device) {
            Ok(Some(o)) if o.request_id == request_id => {}
            Ok(Some(o)) => {
                if lock(&self.hub).tracked.contains(&o.request_id) {
                    return Reply::Fail(ErrorMsg::retry_after(
                        ErrorCode::Busy,
                        "another request of this device is in progress",
                        1000,
                    ));
                }
                // An abandoned earlier attempt of this device: replaced by this one.
                if let Err(e) = self.state.remove_request(&o.request_id) {
                    return Reply::Fail(err(ErrorCode::Internal, e.to_string()));
                }
                if let Err(e) = self.persist(record.clone()).await {
                    return Reply::Fail(e);
                }
            }
            Ok(None) => {
                if let Err(e) = self.persist(record.clone()).await {
                    return Reply::Fail(e);
                }
            }
            Err(e) => return Reply::Fail(err(ErrorCode::Internal, e.to_string())),
        }
        // 4. The CN must be reachable; otherwise the request waits in the database for the link.
        //    A link that is only reconnecting (a session just lost, typically to a CN restart
        //    answered with a stateless reset) is back within a round trip: queue and wait.
        if matches!(
            self.link.state(),
            CnLinkState::Down | CnLinkState::NotConfigured
        ) {
            let why = match self.link.state() {
                CnLinkState::NotConfigured => "no core network is configured on this gateway",
                _ => "the core network is unreachable; the request is kept",
            };
            return Reply::Fail(ErrorMsg::retry_after(
                ErrorCode::CnUnavailable,
                why,
                millis(self.link.retry_after()),
            ));
        }
        let outstanding = match self.state.request_for_device(&device) {
            Ok(Some(o)) => o,
            Ok(None) => return Reply::Fail(err(ErrorCode::Internal, "request vanished")),
            Err(e) => return Reply::Fail(err(ErrorCode::Internal, e.to_string())),
        };
        let item = match self.build_item(&outstanding, peer.fingerprint, &peer.spki_der) {
            Ok(i) => i,
            Err(e) => return Reply::Fail(e),
        };
        let rx = {
            // Register before pushing, so a fast answer is not missed.
            let mut hub = lock(&self.hub);
            let (tx, rx) = oneshot::channel();
            hub.waiters.entry(request_id).or_default().push(tx);
            rx
        };
        if let Err(retry) = self.enqueue(Job::new(item)) {
            lock(&self.hub).waiters.remove(&request_id);
            // Shed load: the device retries with the same ID.
            let _ = self.state.remove_request(&request_id);
            return Reply::Fail(ErrorMsg::retry_after(
                ErrorCode::Busy,
                "the gateway's queue is full",
                millis(retry),
            ));
        }
        self.await_done(rx, timeout).await
    }

    async fn persist(&self, record: OutstandingRequest) -> Result<(), ErrorMsg> {
        self.state
            .insert_request_async(record)
            .await
            .map_err(|e| match e {
                crate::state::StateError::Conflict(m) => {
                    ErrorMsg::retry_after(ErrorCode::Busy, m, 1000)
                }
                e => err(ErrorCode::Internal, e.to_string()),
            })
    }

    async fn await_done(&self, rx: oneshot::Receiver<Done>, timeout: Duration) -> Reply {
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(Done::Issued(d))) => Reply::Deliver(d),
            Ok(Ok(Done::Refused(e) | Done::Retry(e))) => Reply::Fail(e),
            Ok(Err(_)) => Reply::Fail(ErrorMsg::retry_after(
                ErrorCode::CnUnavailable,
                "the request was dropped; retry",
                1000,
            )),
            Err(_) => Reply::Fail(ErrorMsg::retry_after(
                ErrorCode::CnUnavailable,
                "the core network is slow; the request stays queued",
                millis(self.wait_estimate().max(Duration::from_secs(1))),
            )),
        }
    }

    /// Sends batches as the batcher releases them, until `shutdown`.
    ///
    /// Batches are released only while the link is up. While it reconnects the queue waits (its
    /// devices are kept informed with `Pending`); once it is down (an attempt failed) every
    /// queued request is answered `cn_unavailable, retry after`, and stays persisted for the
    /// device's retry or [`Provisioner::resend_outstanding`].
    pub async fn run_batcher(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let mut link = self.link.subscribe();
        loop {
            let state = self.link.state();
            if state == CnLinkState::Down {
                self.release_queue("the core network is unreachable; the request is kept");
            }
            let (batches, deadline) = {
                let mut b = lock(&self.batcher);
                let now = self.clock.now();
                let mut out = Vec::new();
                if state == CnLinkState::Up {
                    while let Some(batch) = b.poll_batch(now) {
                        out.push(batch);
                    }
                }
                self.metrics.queue_depth.set(b.queue_len() as i64);
                let deadline = if state == CnLinkState::Up {
                    b.next_deadline()
                } else {
                    None
                };
                (out, deadline)
            };
            for batch in batches {
                self.batches_in_flight.fetch_add(1, Ordering::Relaxed);
                let me = self.clone();
                tokio::spawn(async move { me.send_batch(batch).await });
            }
            let sleep = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = self.wake.notified() => {}
                () = sleep => {}
                r = link.changed() => {
                    if r.is_err() { break; }
                }
                _ = shutdown.changed() => {
                    if *shutdown.borrow() { break; }
                }
            }
        }
    }

    /// Answers every queued request `cn_unavailable, retry after` (the link is down). The
    /// requests stay persisted.
    fn release_queue(&self, why: &str) {
        let jobs = lock(&self.batcher).drain();
        if jobs.is_empty() {
            return;
        }
        tracing::info!(
            requests = jobs.len(),
            "CN link down: queued requests answered \"retry later\""
        );
        let after = millis(self.link.retry_after());
        for j in jobs {
            self.finish(
                &j.item.request_id,
                Done::Retry(ErrorMsg::retry_after(ErrorCode::CnUnavailable, why, after)),
            );
        }
    }

    async fn send_batch(self: Arc<Self>, batch: Batch<Job>) {
        let Batch { id, items: jobs } = batch;
        self.metrics.batch_size.observe(jobs.len() as f64);
        let timeout = self.settings().request_timeout.max(Duration::from_secs(5)) * 3;
        // Err((why, retryable, retry_after, lost_with_the_link)).
        let result = match self.link.session() {
            None => Err((
                "the core network is unreachable".to_string(),
                true,
                None,
                true,
            )),
            Some(s) => {
                let b = BatchProvision {
                    batch_id: id,
                    items: jobs.iter().map(|j| j.item.clone()).collect(),
                };
                match tokio::time::timeout(timeout, s.batch(b)).await {
                    Ok(Ok(r)) => Ok(r),
                    Ok(Err(e)) => {
                        let lost = matches!(
                            e,
                            CnClientError::Connection(_)
                                | CnClientError::Closed
                                | CnClientError::Stream(_)
                        ) || s.is_closed();
                        Err((e.to_string(), e.is_retryable(), e.retry_after(), lost))
                    }
                    Err(_) => {
                        // A CN this slow is as good as down for this connection.
                        s.close();
                        Err((
                            "the core network did not answer".to_string(),
                            true,
                            None,
                            true,
                        ))
                    }
                }
            }
        };
        {
            let mut b = lock(&self.batcher);
            match &result {
                // A lost session says nothing about the CN's service time.
                Err((_, _, _, true)) => b.abandon(id),
                _ => b.complete(id, self.clock.now()),
            }
        }
        self.batches_in_flight.fetch_sub(1, Ordering::Relaxed);
        match result {
            Ok(r) => {
                self.wake.notify_one();
                self.record(jobs, r).await
            }
            Err((why, true, None, true)) => {
                // Lost with the session (the CN instance died, restarted or went silent): the
                // same batch — same id, same items, so the same request IDs — goes again on
                // another session, before any new batch; the CN (any instance sharing the
                // database) answers it from its idempotency ledger, never as a new request.
                // The devices keep waiting, informed by `Pending`.
                let (again, give_up): (Vec<Job>, Vec<Job>) = jobs
                    .into_iter()
                    .map(|mut j| {
                        j.link_failures += 1;
                        j
                    })
                    .partition(|j| j.link_failures < MAX_LINK_FAILURES);
                tracing::info!(batch = id, resent = again.len(), dropped = give_up.len(), error = %why, "batch lost with its CN session; sending it again on another one");
                if !again.is_empty() {
                    self.metrics.batches_resent.inc();
                    lock(&self.batcher).resend(Batch { id, items: again }, self.clock.now());
                }
                self.wake.notify_one();
                self.fail_jobs(id, give_up, &why, true, None);
            }
            Err((why, retryable, after, _)) => {
                self.wake.notify_one();
                tracing::warn!(batch = id, items = jobs.len(), error = %why, "batch failed");
                self.fail_jobs(id, jobs, &why, retryable, after);
            }
        }
    }

    /// Answers the devices of a failed batch: `cn_unavailable, retry after` when the failure is
    /// retryable (their requests stay persisted), an error otherwise.
    fn fail_jobs(
        &self,
        _batch: u64,
        jobs: Vec<Job>,
        why: &str,
        retryable: bool,
        after: Option<Duration>,
    ) {
        for j in jobs {
            let rid = j.item.request_id;
            if retryable {
                let after = after.unwrap_or_else(|| self.link.retry_after());
                self.finish(
                    &rid,
                    Done::Retry(ErrorMsg::retry_after(
                        ErrorCode::CnUnavailable,
                        format!("the core network failed: {why}; retry"),
                        millis(after),
                    )),
                );
            } else {
                let _ = self.state.remove_request(&rid);
                self.finish(
                    &rid,
                    Done::Refused(err(
                        ErrorCode::Internal,
                        format!("the core network refused the batch: {why}"),
                    )),
                );
            }
        }
    }

    /// Records a batch's answers: every issued credential in one group-committed savepoint,
    /// then answers each waiting device.
    async fn record(&self, jobs: Vec<Job>, result: BatchResult) {
        let mut by_id: HashMap<RequestId, Job> =
            jobs.into_iter().map(|j| (j.item.request_id, j)).collect();
        let now = self.clock.unix_now();
        let mut issued = Vec::new();
        let mut answers = Vec::new();
        for r in result.items {
            let Some(job) = by_id.remove(&r.request_id) else {
                continue;
            };
            let reason = r.reason.clone().unwrap_or_default();
            let done = match r.outcome {
                Outcome::Issued => match (r.supi, r.expires_at, r.sealed) {
                    (Some(supi), Some(expires_at), Some(sealed)) => {
                        // Issued for a device that was revoked or unpaired while the batch was
                        // out (or re-paired with another key): never recorded or delivered;
                        // revoked at the CN, which frees its quota slot.
                        if !self.still_paired(&job.item) {
                            self.revoke_orphan(&job.item.device_id, &supi);
                            answers.push((
                                r.request_id,
                                Done::Refused(err(
                                    ErrorCode::NotPaired,
                                    "the device was revoked or unpaired while its request was at the CN",
                                )),
                            ));
                            continue;
                        }
                        let d = PendingDelivery {
                            request_id: r.request_id,
                            device_id: job.item.device_id.clone(),
                            supi,
                            expires_at: i64::try_from(expires_at).unwrap_or(i64::MAX),
                            sealed: encode_sealed(&sealed),
                            created_at: now,
                        };
                        issued.push(d);
                        continue;
                    }
                    _ => Done::Retry(ErrorMsg::retry_after(
                        ErrorCode::Internal,
                        "incomplete answer from the CN",
                        1000,
                    )),
                },
                Outcome::RetryLater => Done::Retry(ErrorMsg::retry_after(
                    ErrorCode::Busy,
                    format!("the core network asked to retry later {reason}"),
                    r.retry_after_ms.unwrap_or(1000),
                )),
                other => {
                    let _ = self.state.remove_request(&r.request_id);
                    let code = match other {
                        Outcome::QuotaExhausted => ErrorCode::QuotaExhausted,
                        Outcome::PolicyDenied | Outcome::Invalid => ErrorCode::PolicyDenied,
                        Outcome::NotFound => ErrorCode::NotFound,
                        Outcome::CredentialExpired => ErrorCode::CredentialExpired,
                        Outcome::CredentialRevoked => ErrorCode::CredentialRevoked,
                        _ => ErrorCode::Internal,
                    };
                    tracing::info!(device = %job.item.device_id, code = code.name(), %reason, "the CN refused a request");
                    Done::Refused(err(code, reason))
                }
            };
            answers.push((r.request_id, done));
        }
        if !issued.is_empty() {
            let ids: Vec<RequestId> = issued.iter().map(|d| d.request_id).collect();
            match self.state.record_issued_all_async(issued).await {
                Ok(recorded) => answers.extend(
                    recorded
                        .into_iter()
                        .map(|d| (d.request_id, Done::Issued(d))),
                ),
                Err(e) => {
                    tracing::error!(error = %e, items = ids.len(), "cannot record issued credentials");
                    answers.extend(ids.into_iter().map(|id| {
                        (
                            id,
                            Done::Retry(ErrorMsg::retry_after(
                                ErrorCode::Internal,
                                "gateway storage failed",
                                1000,
                            )),
                        )
                    }));
                }
            }
        }
        for (id, done) in answers {
            self.finish(&id, done);
        }
        for (id, _) in by_id {
            self.finish(
                &id,
                Done::Retry(ErrorMsg::retry_after(
                    ErrorCode::CnUnavailable,
                    "no answer for this request",
                    1000,
                )),
            );
        }
    }

    /// Queues every persisted request that is not queued yet (after a reconnect, a restart, or a
    /// `retry_later`). Requests of devices no longer paired are dropped.
    pub fn resend_outstanding(&self) -> usize {
        if self.link.state() != CnLinkState::Up {
            return 0;
        }
        let Ok(reqs) = self.state.outstanding_requests() else {
            return 0;
        };
        let mut sent = 0;
        for o in reqs {
            if lock(&self.hub).tracked.contains(&o.request_id) {
                continue;
            }
            let Some(p) = self.registry.get(&o.device_id) else {
                let _ = self.state.remove_request(&o.request_id);
                continue;
            };
            let Ok(item) = self.build_item(&o, p.fingerprint, &p.spki_der) else {
                let _ = self.state.remove_request(&o.request_id);
                continue;
            };
            if self.enqueue(Job::new(item)).is_err() {
                break;
            }
            sent += 1;
        }
        sent
    }

    /// Persists renewal requests for acknowledged credentials expiring within the renewal
    /// margin, sealed to the key of the request that issued them (the device's renewal key).
    pub fn prefetch_renewals(&self) -> usize {
        let now = self.clock.unix_now();
        let margin = self.settings().credentials.renewal_margin.as_secs() as i64;
        let Ok(creds) = self.state.credentials_expiring_by(now + margin) else {
            return 0;
        };
        let mut n = 0;
        for c in creds {
            if c.acknowledged_at.is_none() || c.expires_at <= now {
                continue;
            }
            if !matches!(self.state.request_for_device(&c.device_id), Ok(None)) {
                continue;
            }
            // Only with the device's signed authorisation: the CN refuses an unsigned renewal.
            let Ok(Some((pk, binding))) = self.state.renewal_key(&c.device_id) else {
                continue;
            };
            let rid = renewal_request_id(&c.request_id);
            if !matches!(self.state.delivery(&c.device_id, &rid), Ok(None)) {
                continue;
            }
            let r = self.state.insert_request(&OutstandingRequest {
                request_id: rid,
                device_id: c.device_id.clone(),
                kind: RequestKind::Renew,
                hpke_public_key: pk,
                created_at: now,
                params: None,
                renew_supi: Some(c.supi.clone()),
                binding: Some(binding),
                // The next renewal needs the device's own RenewRequest (which brings one).
                renewal_binding: None,
            });
            if r.is_ok() {
                tracing::info!(device = %c.device_id, expires_at = c.expires_at, "pre-fetching a renewal");
                n += 1;
            }
        }
        n
    }

    /// Whether the device of `item` is still paired with the key the item was built for.
    fn still_paired(&self, item: &BatchItem) -> bool {
        self.registry
            .get(&item.device_id)
            .is_some_and(|p| p.fingerprint == item.device_key_fingerprint)
    }

    /// Records the revocation of child `supi` of `device` (persisted, so it survives a restart)
    /// and carries it out at the CN in the background.
    pub fn revoke_orphan(&self, device: &DeviceId, supi: &Supi) {
        match self.state.revoke_child(device, supi, self.clock.unix_now()) {
            Ok(rev) => {
                tracing::warn!(device = %device, supi = %supi, "revoking a child credential no device will use");
                self.metrics.orphans_revoked.inc();
                let link = self.link.clone();
                let state = self.state.clone();
                let clock = self.clock.clone();
                tokio::spawn(async move {
                    if let Err(e) = revoke_with(&link, &state, &*clock, &rev).await {
                        tracing::debug!(device = %rev.device_id, error = %e, "revocation left for the next retry");
                    }
                });
            }
            Err(e) => {
                tracing::error!(device = %device, supi = %supi, error = %e, "cannot record a revocation")
            }
        }
    }

    /// The device answered delivery `request_id` with `credential_unusable`: the blob is
    /// dropped; a new credential (not a renewal of the one the device holds) is revoked at the
    /// CN so that it does not keep a quota slot.
    pub fn credential_unusable(&self, device: &DeviceId, request_id: &RequestId) {
        match self.state.delivery_kind(device, request_id) {
            Ok(Some((supi, Some(RequestKind::Provision)))) => self.revoke_orphan(device, &supi),
            Ok(_) => {
                let _ = self.state.discard_delivery(device, request_id);
            }
            Err(e) => tracing::error!(device = %device, error = %e, "cannot read the delivery"),
        }
        self.refresh_gauges();
    }

    /// Revokes at the CN what was revoked locally and not confirmed yet.
    pub async fn retry_revocations(&self) {
        let Ok(revs) = self.state.unconfirmed_revocations() else {
            return;
        };
        for r in revs {
            if let Err(e) = self.revoke_at_cn(&r).await {
                tracing::debug!(device = %r.device_id, error = %e, "revocation still pending at the CN");
                return;
            }
        }
    }

    /// Carries out one revocation at the CN — every child of the device (`Device` scope), or
    /// one child — and records the CN's confirmation. Unconfirmed revocations stay persisted and
    /// are retried by [`Provisioner::maintain`] until the CN confirms.
    pub async fn revoke_at_cn(&self, r: &Revocation) -> Result<Vec<Supi>, String> {
        revoke_with(&self.link, &self.state, &*self.clock, r).await
    }

    /// Gauges from the database.
    pub fn refresh_gauges(&self) {
        let now = self.clock.unix_now();
        if let Ok(c) = self.state.counts() {
            self.metrics
                .deliveries_pending
                .set(c.pending_deliveries as i64);
        }
        if let Ok(v) = self.state.credentials_expiring_by(now + 86_400) {
            self.metrics.credentials_expiring_24h.set(v.len() as i64);
        }
        self.metrics.devices_paired.set(self.registry.len() as i64);
        self.metrics.queue_depth.set(self.queue_depth() as i64);
    }

    /// Background upkeep until `shutdown`: on every link-up and every `period`, resend persisted
    /// requests, pre-fetch renewals, retry revocations, refresh gauges.
    pub async fn maintain(self: Arc<Self>, period: Duration, mut shutdown: watch::Receiver<bool>) {
        let mut link = self.link.subscribe();
        loop {
            self.apply_limits();
            self.refresh_gauges();
            if self.link.state() == CnLinkState::Up {
                // Revocations first: a device ID with one pending is not provisioned again.
                self.retry_revocations().await;
                self.prefetch_renewals();
                self.resend_outstanding();
            }
            tokio::select! {
                () = tokio::time::sleep(period) => {}
                r = link.changed() => { if r.is_err() { break; } }
                _ = shutdown.changed() => { if *shutdown.borrow() { break; } }
            }
        }
    }

    /// Waits (up to `limit`) until nothing is queued or at the CN. Returns whether it drained.
    pub async fn drain(&self, limit: Duration) -> bool {
        let until = Instant::now() + limit;
        loop {
            let idle = self.batches_in_flight() == 0 && self.queue_depth() == 0;
            if idle || self.link.state() != CnLinkState::Up && self.batches_in_flight() == 0 {
                return idle;
            }
            if Instant::now() >= until {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Carries out revocation `r` at the CN and records the confirmation (see
/// [`Provisioner::revoke_at_cn`]).
async fn revoke_with(
    link: &CnLink,
    state: &State,
    clock: &dyn Clock,
    r: &Revocation,
) -> Result<Vec<Supi>, String> {
    let (id, device) = (r.id, &r.device_id);
    let session = link
        .session()
        .ok_or_else(|| "the core network is unreachable".to_string())?;
    let req = match (r.scope, &r.supi) {
        (RevocationScope::Child, Some(s)) => Revoke {
            supi: Some(s.clone()),
            device_id: None,
        },
        _ => Revoke {
            supi: None,
            device_id: Some(device.clone()),
        },
    };
    let r = tokio::time::timeout(Duration::from_secs(5), session.revoke(req))
        .await
        .map_err(|_| "the core network did not answer".to_string())?;
    match r {
        Ok(res) => {
            let _ = state.confirm_revocation(id, clock.unix_now());
            tracing::info!(device = %device, revoked = res.revoked.len(), "revoked at the CN");
            Ok(res.revoked)
        }
        // Nothing to revoke there any more: confirmed.
        Err(e) if e.code() == Some(ErrorCode::NotFound) => {
            let _ = state.confirm_revocation(id, clock.unix_now());
            Ok(Vec::new())
        }
        Err(e) => Err(e.to_string()),
    }
}

#[cfg(test)]
mod tests;
