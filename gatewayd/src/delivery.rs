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
//!
//! Files: `delivery.rs` (the provisioner, its settings and stored forms), `delivery/request.rs`
//! (one device request), `delivery/batches.rs` (the batch driver), `delivery/upkeep.rs`
//! (resends, renewals, revocations, drain).

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

mod batches;
mod request;
mod upkeep;

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
    /// Builds the provisioner; its tasks are [`Provisioner::run_batcher`] and [`Provisioner::maintain`].
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
}

#[cfg(test)]
mod tests;
