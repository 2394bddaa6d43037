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

use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use companion_crypto::usim::Usim;
use companion_transport::cn_client::{ClientOptions, CnClientError, CnSession, CnTarget};
use rustls::pki_types::CertificateDer;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::control::CnLinkState;
use crate::metrics::Metrics;

/// Reconnection settings.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    /// First delay after a failure.
    pub min: Duration,
    /// Longest delay (the doubling stops here).
    pub max: Duration,
}

impl Backoff {
    /// The delay after `failures` consecutive failures, before jitter: `min * 2^(failures-1)`,
    /// capped at `max`.
    pub fn delay(&self, failures: u32) -> Duration {
        let exp = failures.saturating_sub(1).min(20);
        self.min.saturating_mul(1u32 << exp).min(self.max)
    }

    /// `d` scaled by a random factor in [0.5, 1.0] ("equal jitter"), so many gateways that lost
    /// the same CN do not come back in lockstep.
    pub fn jitter(d: Duration) -> Duration {
        let r = std::collections::hash_map::RandomState::new().hash_one(Instant::now());
        let frac = 0.5 + (r % 1000) as f64 / 2000.0;
        d.mul_f64(frac)
    }
}

/// Health of one CN endpoint.
#[derive(Debug, Clone, Default)]
struct Health {
    /// Consecutive failures (attempts refused or unanswered, sessions lost).
    failures: u32,
    /// Not to be tried before this instant (backoff after a failure).
    retry_at: Option<Instant>,
    /// Slots whose session is on this endpoint (connecting or up).
    sessions: usize,
}

/// Which endpoint each slot uses: the failover state, without I/O (times are passed in).
#[derive(Debug)]
pub struct Endpoints {
    health: Vec<Health>,
}

impl Endpoints {
    /// `n` endpoints, all usable.
    pub fn new(n: usize) -> Self {
        Self {
            health: vec![Health::default(); n],
        }
    }

    /// Whether endpoint `i` waits out its backoff at `now`.
    pub fn in_backoff(&self, i: usize, now: Instant) -> bool {
        self.health
            .get(i)
            .and_then(|h| h.retry_at)
            .is_some_and(|t| t > now)
    }

    /// Consecutive failures of endpoint `i` (0: healthy).
    pub fn failures(&self, i: usize) -> u32 {
        self.health.get(i).map_or(0, |h| h.failures)
    }

    /// Slots on endpoint `i`.
    pub fn sessions(&self, i: usize) -> usize {
        self.health.get(i).map_or(0, |h| h.sessions)
    }

    /// The endpoint slot `slot` should use now: among the endpoints not in backoff, the one with
    /// the fewest sessions (ties broken by `slot`, so slots spread). `Err(t)`: every endpoint
    /// waits out its backoff; the earliest may be tried at `t`.
    pub fn pick(&self, slot: usize, now: Instant) -> Result<usize, Instant> {
        let n = self.health.len();
        let usable = (0..n)
            .map(|k| (slot + k) % n)
            .filter(|&i| !self.in_backoff(i, now));
        if let Some(i) = usable.min_by_key(|&i| self.health[i].sessions) {
            return Ok(i);
        }
        Err(self
            .health
            .iter()
            .filter_map(|h| h.retry_at)
            .min()
            .unwrap_or(now))
    }

    /// Where a slot on endpoint `from` should move to even the load out: a usable endpoint with
    /// at least two sessions fewer (one that failed earlier and whose backoff has ended, or that
    /// came up later). `None` when the spread is even enough.
    pub fn rebalance(&self, from: usize, now: Instant) -> Option<usize> {
        let have = self.sessions(from);
        (0..self.health.len())
            .filter(|&j| j != from && !self.in_backoff(j, now))
            .filter(|&j| self.health[j].sessions + 2 <= have)
            .min_by_key(|&j| self.health[j].sessions)
    }

    /// A slot starts using endpoint `i`.
    pub fn attach(&mut self, i: usize) {
        if let Some(h) = self.health.get_mut(i) {
            h.sessions += 1;
        }
    }

    /// A slot stops using endpoint `i`.
    pub fn detach(&mut self, i: usize) {
        if let Some(h) = self.health.get_mut(i) {
            h.sessions = h.sessions.saturating_sub(1);
        }
    }

    /// A session on `i` was authenticated: the endpoint is healthy again.
    pub fn succeeded(&mut self, i: usize) {
        if let Some(h) = self.health.get_mut(i) {
            h.failures = 0;
            h.retry_at = None;
        }
    }

    /// An attempt on `i` failed or its session was lost at `now`: the endpoint waits
    /// `jitter(backoff.delay(failures))` before it is tried again. A failure seen while the
    /// endpoint already waits (another slot's attempt, started earlier, failed too) does not
    /// lengthen the wait. Returns the endpoint's retry time.
    pub fn failed(&mut self, i: usize, now: Instant, backoff: &Backoff) -> Instant {
        let Some(h) = self.health.get_mut(i) else {
            return now;
        };
        if let Some(t) = h.retry_at.filter(|&t| t > now) {
            return t;
        }
        h.failures = h.failures.saturating_add(1);
        let t = now + Backoff::jitter(backoff.delay(h.failures));
        h.retry_at = Some(t);
        t
    }
}

/// One CN endpoint: its configured `host:port` and the TLS name its certificate must carry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CnEndpoint {
    /// `host:port` as configured (resolved at each attempt).
    pub label: String,
    /// The DNS name the CN's certificate must carry.
    pub server_name: String,
}

/// What every endpoint shares: the operator CA and the serving network name.
#[derive(Debug, Clone)]
pub struct CnTargets {
    /// The configured endpoints, in order of preference.
    pub endpoints: Vec<CnEndpoint>,
    /// The operator CA certificates the CN's chain must lead to.
    pub trust_anchors: Vec<CertificateDer<'static>>,
    /// The serving network name bound into RES* (TS 33.501 §6.1.1.4).
    pub serving_network_name: String,
}

impl CnTargets {
    /// Resolves endpoint `i` (at each attempt, so DNS changes are followed).
    async fn resolve(&self, i: usize) -> Result<CnTarget, String> {
        let e = &self.endpoints[i];
        let mut addrs = tokio::net::lookup_host(e.label.as_str())
            .await
            .map_err(|err| format!("cannot resolve {}: {err}", e.label))?;
        let addr = addrs
            .next()
            .ok_or_else(|| format!("{} resolves to no address", e.label))?;
        Ok(CnTarget {
            addr,
            server_name: e.server_name.clone(),
            trust_anchors: self.trust_anchors.clone(),
            serving_network_name: self.serving_network_name.clone(),
        })
    }
}

/// The gateway's QUIC client endpoints towards the CN, one per address family.
#[derive(Debug, Clone)]
pub struct CnClients {
    /// The IPv4 client endpoint, if one could be bound.
    pub v4: Option<quinn::Endpoint>,
    /// The IPv6 client endpoint, if the host has IPv6.
    pub v6: Option<quinn::Endpoint>,
}

impl CnClients {
    /// Binds an IPv4 and (where the host has IPv6) an IPv6 client endpoint.
    pub fn bind() -> std::io::Result<Self> {
        let v4 = quinn::Endpoint::client(std::net::SocketAddr::from(([0, 0, 0, 0], 0)));
        let v6 = quinn::Endpoint::client(std::net::SocketAddr::from((
            std::net::Ipv6Addr::UNSPECIFIED,
            0,
        )));
        match (v4, v6) {
            (Err(e), Err(_)) => Err(e),
            (v4, v6) => Ok(Self {
                v4: v4.ok(),
                v6: v6.ok(),
            }),
        }
    }

    fn for_addr(&self, addr: &std::net::SocketAddr) -> Option<&quinn::Endpoint> {
        if addr.is_ipv4() {
            self.v4.as_ref()
        } else {
            self.v6.as_ref()
        }
    }

    /// Closes both endpoints (shutdown).
    pub fn close(&self) {
        for e in [&self.v4, &self.v6].into_iter().flatten() {
            e.close(0u32.into(), b"gatewayd stopping");
        }
    }
}

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

/// How a session ended, for the slot's next step.
enum Ended {
    Shutdown,
    Lost(quinn::ConnectionError),
}

/// A QUIC handshake with `target` (TLS verified, no AKA), closed at once: whether the endpoint
/// answers at all.
async fn reachable(
    client: &quinn::Endpoint,
    target: &CnTarget,
    opts: &ClientOptions,
) -> Result<(), String> {
    let cfg = companion_transport::quic::client_config(
        companion_transport::quic::ServerTrust::Anchors(target.trust_anchors.clone()),
        None,
        companion_transport::ALPN_CN,
        &companion_transport::quic::Limits::cn_link_client(),
    )
    .map_err(|e| e.to_string())?;
    let connecting = client
        .connect_with(cfg, target.addr, &target.server_name)
        .map_err(|e| e.to_string())?;
    match tokio::time::timeout(opts.connect_timeout, connecting).await {
        Ok(Ok(conn)) => {
            conn.close(0u32.into(), b"reachability probe");
            Ok(())
        }
        Ok(Err(e)) => Err(format!("connection to the CN failed: {e}")),
        Err(_) => Err(format!(
            "QUIC handshake with {} did not complete within {:?}",
            target.addr, opts.connect_timeout
        )),
    }
}

/// One connection attempt to endpoint `ep`: resolve, connect, authenticate. The error carries
/// whether the CN answered with a stateless reset (it restarted during the attempt).
///
/// The companion USIM is locked for the whole attempt (two AKA runs never interleave), so an
/// attempt stuck on a dead endpoint would hold every other slot back for the connect timeout.
/// An endpoint that failed before (`suspect`: retried after its backoff, or probed to move a
/// session back) is therefore first checked with a bare handshake, without the lock.
async fn connect_endpoint(
    clients: &CnClients,
    targets: &CnTargets,
    usim: &tokio::sync::Mutex<Box<dyn Usim>>,
    ep: usize,
    suspect: bool,
    opts: ClientOptions,
) -> Result<(CnSession, companion_proto::msg::AuthResult), (String, bool)> {
    let target = targets.resolve(ep).await.map_err(|e| (e, false))?;
    let Some(client) = clients.for_addr(&target.addr) else {
        return Err((
            format!("no local socket for the address family of {}", target.addr),
            false,
        ));
    };
    if suspect {
        reachable(client, &target, &opts)
            .await
            .map_err(|e| (e, false))?;
    }
    let mut usim = usim.lock().await;
    CnSession::connect_with(client, &target, usim.as_mut(), opts)
        .await
        .map_err(|e| {
            let reset = matches!(e, CnClientError::Connection(quinn::ConnectionError::Reset));
            (e.to_string(), reset)
        })
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
    fn update_state(&self, metrics: &Metrics, connecting: bool) {
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

    /// Waits `delay` (or until shutdown), publishing when the next attempt is due.
    async fn sleep_before_attempt(&self, delay: Duration, shutdown: &mut watch::Receiver<bool>) {
        let at = self.epoch.elapsed() + delay;
        self.next_attempt_ms
            .store(at.as_millis() as u64, Ordering::Relaxed);
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            _ = shutdown.wait_for(|s| *s) => {}
        }
    }

    /// Sets slot `index`'s endpoint (moving its count in [`Endpoints`]).
    fn set_slot_endpoint(&self, index: usize, endpoint: Option<usize>) {
        let mut slot = lock(&self.slots[index]);
        if slot.endpoint == endpoint {
            return;
        }
        let mut e = lock(&self.endpoints);
        if let Some(old) = slot.endpoint {
            e.detach(old);
        }
        if let Some(new) = endpoint {
            e.attach(new);
        }
        slot.endpoint = endpoint;
    }

    /// Records a failure of endpoint `i` (attempt failed or session lost) and returns what slot
    /// `index` can do next: `Ok(())` another endpoint may be tried at once, `Err(t)` every endpoint
    /// waits out its backoff, the first until `t`.
    fn endpoint_failed(
        &self,
        i: usize,
        index: usize,
        backoff: &Backoff,
        metrics: &Metrics,
    ) -> Result<(), Instant> {
        let now = Instant::now();
        let mut e = lock(&self.endpoints);
        e.failed(i, now, backoff);
        if let Some(label) = self.labels.get(i) {
            metrics
                .cn_endpoint_failures
                .with_label_values(&[label])
                .inc();
        }
        e.pick(index, now).map(|_| ())
    }

    /// Keeps slot `index` connected until `shutdown` turns true, on the endpoint
    /// [`Endpoints::pick`] chooses, moving to another when its endpoint fails.
    ///
    /// A lost session is noticed the moment its connection closes: at once when the CN answers
    /// with a stateless reset (it restarted; [`companion_transport::restart`]), within
    /// [`companion_transport::quic::CN_LIVENESS`] when it went silent. A reset means the
    /// instance is already back: the slot reconnects at once (to the least used endpoint, quite
    /// possibly the same). Any other loss puts the endpoint in backoff and the slot moves on to
    /// another one after a short jitter. Losses are counted by reason
    /// (`gatewayd_cn_link_losses_total`) and by endpoint (`gatewayd_cn_endpoint_failures_total`).
    #[allow(clippy::too_many_arguments)]
    pub async fn run_slot(
        self: Arc<Self>,
        index: usize,
        clients: CnClients,
        targets: Arc<CnTargets>,
        usim: Arc<tokio::sync::Mutex<Box<dyn Usim>>>,
        backoff: Backoff,
        metrics: Arc<Metrics>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let opts = ClientOptions {
            connect_timeout: Duration::from_secs(5),
            exchange_timeout: Duration::from_secs(15),
        };
        let mut failures = 0u32;
        let mut resets_in_a_row = 0u32;
        while !*shutdown.borrow() {
            let picked = lock(&self.endpoints).pick(index, Instant::now());
            let ep = match picked {
                Ok(ep) => ep,
                Err(at) => {
                    // Every endpoint waits out its backoff: wait for the first (its retry time
                    // already carries jitter).
                    self.set_slot_endpoint(index, None);
                    self.update_state(&metrics, false);
                    let delay = at.saturating_duration_since(Instant::now());
                    self.sleep_before_attempt(delay.max(Duration::from_millis(10)), &mut shutdown)
                        .await;
                    continue;
                }
            };
            self.set_slot_endpoint(index, Some(ep));
            let mut ep = ep;
            let mut label = targets.endpoints[ep].label.clone();
            let suspect = lock(&self.endpoints).failures(ep) > 0;
            let attempt = connect_endpoint(&clients, &targets, &usim, ep, suspect, opts);
            let result = tokio::select! {
                r = attempt => r,
                _ = shutdown.changed() => break,
            };
            match result {
                Ok((mut session, policy)) => {
                    resets_in_a_row = 0;
                    if failures > 0 {
                        tracing::info!(slot = index, cn = %label, after_failures = failures, "CN link restored");
                    } else {
                        tracing::info!(slot = index, cn = %label, remote = %session.remote_address(), "CN link up");
                    }
                    failures = 0;
                    lock(&self.endpoints).succeeded(ep);
                    self.max_batch_items
                        .store(policy.max_batch_items, Ordering::Relaxed);
                    lock(&self.slots[index]).session = Some(session.clone());
                    self.update_state(&metrics, false);
                    let ended = loop {
                        // Now and then (jittered), see whether the load should be evened out:
                        // an endpoint that failed earlier and whose backoff has ended (or came
                        // up later) gets this slot back — make before break: the new session
                        // is authenticated first, the old one closes once the operations on it
                        // finished (their clones dropped).
                        let check = Backoff::jitter(backoff.max.min(Duration::from_secs(30)));
                        tokio::select! {
                            e = session.connection().closed() => break Ended::Lost(e),
                            _ = shutdown.wait_for(|s| *s) => break Ended::Shutdown,
                            () = tokio::time::sleep(check) => {}
                        }
                        let to = {
                            let mut e = lock(&self.endpoints);
                            let to = e.rebalance(ep, Instant::now());
                            if let Some(to) = to {
                                // Reserved now, so slots checking at the same time do not all
                                // move.
                                e.attach(to);
                            }
                            to
                        };
                        let Some(to) = to else { continue };
                        let to_label = targets.endpoints[to].label.clone();
                        let probe = tokio::select! {
                            r = connect_endpoint(&clients, &targets, &usim, to, true, opts) => r,
                            _ = shutdown.wait_for(|s| *s) => {
                                lock(&self.endpoints).detach(to);
                                break Ended::Shutdown;
                            }
                        };
                        match probe {
                            Ok((new, _)) => {
                                tracing::info!(slot = index, from = %label, to = %to_label, "CN session moved to even the load out");
                                {
                                    let mut slot = lock(&self.slots[index]);
                                    let mut e = lock(&self.endpoints);
                                    e.detach(ep);
                                    e.succeeded(to);
                                    slot.endpoint = Some(to);
                                    slot.session = Some(new.clone());
                                }
                                session = new;
                                ep = to;
                                label = to_label;
                                self.update_state(&metrics, false);
                            }
                            Err((err, _)) => {
                                lock(&self.endpoints).detach(to);
                                let _ = self.endpoint_failed(to, index, &backoff, &metrics);
                                self.update_state(&metrics, false);
                                tracing::debug!(slot = index, cn = %to_label, error = %err, "endpoint still unusable; staying");
                            }
                        }
                    };
                    lock(&self.slots[index]).session = None;
                    let Ended::Lost(e) = ended else { break };
                    let reason = crate::metrics::link_loss::of(&e);
                    metrics.cn_link_losses.with_label_values(&[reason]).inc();
                    // A stateless reset comes from an instance that is already back: reconnect
                    // at once (a little jitter, so the gateways of one CN do not all arrive in
                    // the same millisecond). Anything else puts the endpoint in backoff and
                    // moves the slot to another endpoint after the first backoff step's jitter.
                    let delay = if reason == crate::metrics::link_loss::RESET {
                        Backoff::jitter(backoff.min.min(Duration::from_millis(100))) / 2
                    } else {
                        let next = self.endpoint_failed(ep, index, &backoff, &metrics);
                        self.set_slot_endpoint(index, None);
                        match next {
                            Ok(()) => Backoff::jitter(backoff.min.min(Duration::from_millis(200))),
                            // No other endpoint: wait for this one's retry time (the link stays
                            // `connecting` meanwhile; no attempt has failed yet).
                            Err(at) => at.saturating_duration_since(Instant::now()),
                        }
                    };
                    // Reconnecting: requests keep queueing until an attempt fails.
                    self.update_state(&metrics, true);
                    tracing::warn!(slot = index, cn = %label, reason, error = %e, "CN session lost; reconnecting");
                    self.sleep_before_attempt(delay, &mut shutdown).await;
                    continue;
                }
                Err((_, true)) if resets_in_a_row < 3 => {
                    // The instance restarted (again) while this attempt was under way: it is
                    // back, so try again at once instead of declaring it failed.
                    resets_in_a_row += 1;
                    metrics
                        .cn_link_losses
                        .with_label_values(&[crate::metrics::link_loss::RESET])
                        .inc();
                    tracing::info!(
                        slot = index,
                        cn = %label,
                        "the CN restarted during the connection attempt; retrying at once"
                    );
                    self.update_state(&metrics, true);
                    let delay = Backoff::jitter(backoff.min.min(Duration::from_millis(100))) / 2;
                    self.sleep_before_attempt(delay, &mut shutdown).await;
                    continue;
                }
                Err((e, _)) => {
                    resets_in_a_row = 0;
                    failures += 1;
                    let level_warn = failures == 1 || failures.is_power_of_two();
                    if level_warn {
                        tracing::warn!(slot = index, cn = %label, error = %e, failures, "cannot reach the CN");
                    } else {
                        tracing::debug!(slot = index, cn = %label, error = %e, failures, "cannot reach the CN");
                    }
                    let elsewhere = self.endpoint_failed(ep, index, &backoff, &metrics).is_ok();
                    self.set_slot_endpoint(index, None);
                    self.update_state(&metrics, elsewhere);
                    if elsewhere {
                        // Another endpoint is usable: try it after a short jitter.
                        let d = Backoff::jitter(backoff.min.min(Duration::from_millis(200)));
                        self.sleep_before_attempt(d, &mut shutdown).await;
                    }
                    // Otherwise the next pick waits for the earliest endpoint's retry time.
                }
            }
        }
        let taken = lock(&self.slots[index]).session.take();
        if let Some(s) = taken {
            s.close();
        }
        self.set_slot_endpoint(index, None);
        self.update_state(&metrics, false);
    }
}

#[cfg(test)]
mod tests;
