//! The link to the CN: one or more authenticated [`CnSession`]s, each kept up by its own task
//! (a *slot*) that reconnects with exponential backoff and jitter.
//!
//! With several CN endpoints (`[cn] endpoints`, cn-backend instances sharing one database) the
//! slots spread over the healthy ones ([`Endpoints::pick`]: fewest sessions first). An endpoint
//! whose connection attempt failed, or whose session was lost other than by a stateless reset,
//! waits out its own backoff (exponential, with jitter, so many gateways do not return to it in
//! lockstep) while the slot moves to another endpoint at once; it is retried when its backoff
//! ends. Batches in flight on a lost session are sent again on another session with the same
//! request IDs ([`crate::delivery`]), which the CN answers idempotently.
//!
//! Every session authenticates with the companion USIM (AKA bound to the TLS session); the USIM
//! is shared behind an async mutex, so two sessions never run AUTHENTICATE at once and the SQN
//! state file ([`crate::companion::PersistentSoftUsim`]) is written after each success.
//!
//! Files: `cn_link.rs` (the link, its slots and status), `cn_link/failover.rs` (backoff and
//! endpoint choice, no I/O), `cn_link/targets.rs` (endpoints, client sockets, one attempt),
//! `cn_link/slot.rs` (one slot's reconnecting task).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use companion_transport::cn_client::CnSession;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::control::CnLinkState;
use crate::metrics::Metrics;

mod failover;
mod slot;
mod targets;

pub use failover::{Backoff, Endpoints};
pub use targets::{CnClients, CnEndpoint, CnTargets};

/// One slot as `gatewayctl status` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CnSessionInfo {
    /// The slot's index (0-based, `[cn] sessions` slots).
    pub slot: usize,
    /// The endpoint (`host:port` as configured) the slot uses or tries; none while it waits.
    pub endpoint: Option<String>,
    /// `up`, `connecting` or `waiting` (every endpoint in backoff).
    pub state: String,
    /// The address the endpoint resolved to, while up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote: Option<String>,
}

/// One endpoint as `gatewayctl status` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CnEndpointInfo {
    /// `host:port` as configured.
    pub endpoint: String,
    /// Authenticated sessions on it.
    pub sessions: usize,
    /// A slot is connecting to it (a reconnection, or a probe to move a session back).
    #[serde(default)]
    pub attempting: bool,
    /// Consecutive failures; 0 when healthy.
    pub failures: u32,
    /// Milliseconds until it is tried again, while in backoff.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_in_ms: Option<u64>,
}

#[derive(Debug, Default)]
struct Slot {
    session: Option<CnSession>,
    /// Index into the endpoints of the one in use (connecting or up).
    endpoint: Option<usize>,
}

/// The sessions to the CN and the link's state.
#[derive(Debug)]
pub struct CnLink {
    slots: Vec<Mutex<Slot>>,
    labels: Vec<String>,
    endpoints: Mutex<Endpoints>,
    state: watch::Sender<CnLinkState>,
    next: AtomicUsize,
    /// Millis (since `epoch`) of the next reconnection attempt while down.
    next_attempt_ms: AtomicU64,
    /// `AuthResult.max_batch_items` of the last authenticated session (0 = unknown).
    max_batch_items: AtomicU64,
    epoch: Instant,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl CnLink {
    /// A link with `sessions` slots over `endpoints` (`host:port` labels); no endpoint means no
    /// CN configured (state `not_configured` forever).
    pub fn new(sessions: usize, endpoints: Vec<String>) -> Arc<Self> {
        let initial = if endpoints.is_empty() {
            CnLinkState::NotConfigured
        } else {
            CnLinkState::Connecting
        };
        Arc::new(Self {
            slots: (0..sessions.max(1)).map(|_| Mutex::default()).collect(),
            endpoints: Mutex::new(Endpoints::new(endpoints.len())),
            labels: endpoints,
            state: watch::channel(initial).0,
            next: AtomicUsize::new(0),
            next_attempt_ms: AtomicU64::new(0),
            max_batch_items: AtomicU64::new(0),
            epoch: Instant::now(),
        })
    }

    /// The link's state.
    pub fn state(&self) -> CnLinkState {
        *self.state.borrow()
    }

    /// Watch the link's state.
    pub fn subscribe(&self) -> watch::Receiver<CnLinkState> {
        self.state.subscribe()
    }

    /// An authenticated session, round-robin over the live ones; a session on an endpoint in
    /// backoff (another session there was just lost: it is probably dead too) only when no
    /// other is up.
    pub fn session(&self) -> Option<CnSession> {
        let n = self.slots.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let now = Instant::now();
        let mut fallback = None;
        for i in 0..n {
            let slot = lock(&self.slots[(start + i) % n]);
            let Some(s) = slot.session.as_ref().filter(|s| !s.is_closed()) else {
                continue;
            };
            let suspect = slot
                .endpoint
                .is_some_and(|e| lock(&self.endpoints).in_backoff(e, now));
            if !suspect {
                return Some(s.clone());
            }
            fallback.get_or_insert_with(|| s.clone());
        }
        fallback
    }

    /// Each slot: its endpoint and state, for `gatewayctl status`.
    pub fn sessions_info(&self) -> Vec<CnSessionInfo> {
        self.slots
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let s = lock(s);
                let live = s.session.as_ref().filter(|s| !s.is_closed());
                CnSessionInfo {
                    slot: i,
                    endpoint: s.endpoint.and_then(|e| self.labels.get(e).cloned()),
                    state: match (live, s.endpoint) {
                        (Some(_), _) => "up",
                        (None, Some(_)) => "connecting",
                        (None, None) => "waiting",
                    }
                    .into(),
                    remote: live.map(|s| s.remote_address().to_string()),
                }
            })
            .collect()
    }

    /// Each endpoint: sessions, failures, backoff, for `gatewayctl status`.
    pub fn endpoints_info(&self) -> Vec<CnEndpointInfo> {
        let now = Instant::now();
        let mut live = vec![0usize; self.labels.len()];
        for s in &self.slots {
            let s = lock(s);
            if s.session.as_ref().is_some_and(|s| !s.is_closed())
                && let Some(c) = s.endpoint.and_then(|e| live.get_mut(e))
            {
                *c += 1;
            }
        }
        let e = lock(&self.endpoints);
        self.labels
            .iter()
            .enumerate()
            .map(|(i, label)| CnEndpointInfo {
                endpoint: label.clone(),
                sessions: live[i],
                attempting: e.sessions(i) > live[i],
                failures: e.health[i].failures,
                retry_in_ms: e.health[i]
                    .retry_at
                    .filter(|&t| t > now)
                    .map(|t| t.duration_since(now).as_millis() as u64),
            })
            .collect()
    }

    /// Most items the CN accepts in one batch (0 = not known yet).
    pub fn max_batch_items(&self) -> u64 {
        self.max_batch_items.load(Ordering::Relaxed)
    }

    /// How long a device should wait before retrying while the link is down: until the next
    /// reconnection attempt (at least 500 ms, at most 30 s).
    pub fn retry_after(&self) -> Duration {
        let now = self.epoch.elapsed().as_millis() as u64;
        let at = self.next_attempt_ms.load(Ordering::Relaxed);
        Duration::from_millis(at.saturating_sub(now) + 250)
            .clamp(Duration::from_millis(500), Duration::from_secs(30))
    }

    /// Publishes the link's state: `Up` while any session is, else `Connecting` when a slot is
    /// about to (re)connect, else `Down` (every endpoint failed and waits out its backoff).
    pub(super) fn update_state(&self, metrics: &Metrics, connecting: bool) {
        let mut per_endpoint = vec![0i64; self.labels.len()];
        let mut up = false;
        for s in &self.slots {
            let s = lock(s);
            if s.session.as_ref().is_some_and(|s| !s.is_closed()) {
                up = true;
                if let Some(c) = s.endpoint.and_then(|e| per_endpoint.get_mut(e)) {
                    *c += 1;
                }
            }
        }
        let now = Instant::now();
        {
            let e = lock(&self.endpoints);
            for (i, label) in self.labels.iter().enumerate() {
                metrics
                    .cn_sessions
                    .with_label_values(&[label])
                    .set(per_endpoint[i]);
                metrics
                    .cn_endpoint_up
                    .with_label_values(&[label])
                    .set(i64::from(!e.in_backoff(i, now)));
            }
        }
        let st = if up {
            CnLinkState::Up
        } else if connecting {
            CnLinkState::Connecting
        } else {
            CnLinkState::Down
        };
        metrics.set_cn_link(st);
        self.state.send_if_modified(|s| {
            let changed = *s != st;
            *s = st;
            changed
        });
    }

    /// Closes every session (shutdown).
    pub fn close_all(&self) {
        for s in &self.slots {
            if let Some(s) = lock(s).session.take() {
                s.close();
            }
        }
    }
}

#[cfg(test)]
mod tests;
