//! The link to the CN: one or more authenticated [`CnSession`]s, each kept up by its own task
//! that reconnects with exponential backoff and jitter.
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
use tokio::sync::watch;

use crate::control::CnLinkState;
use crate::metrics::Metrics;

/// Reconnection settings.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    pub min: Duration,
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

/// The sessions to the CN and the link's state.
#[derive(Debug)]
pub struct CnLink {
    slots: Vec<Mutex<Option<CnSession>>>,
    state: watch::Sender<CnLinkState>,
    next: AtomicUsize,
    /// Unix-ish millis (since `epoch`) of the next reconnection attempt while down.
    next_attempt_ms: AtomicU64,
    /// `AuthResult.max_batch_items` of the last authenticated session (0 = unknown).
    max_batch_items: AtomicU64,
    epoch: Instant,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl CnLink {
    /// A link with `sessions` slots; `configured = false` means no CN endpoint (state
    /// `not_configured` forever).
    pub fn new(sessions: usize, configured: bool) -> Arc<Self> {
        let initial = if configured {
            CnLinkState::Connecting
        } else {
            CnLinkState::NotConfigured
        };
        Arc::new(Self {
            slots: (0..sessions.max(1)).map(|_| Mutex::new(None)).collect(),
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

    /// An authenticated session, round-robin over the live ones.
    pub fn session(&self) -> Option<CnSession> {
        let n = self.slots.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        (0..n).find_map(|i| {
            let slot = lock(&self.slots[(start + i) % n]);
            slot.as_ref().filter(|s| !s.is_closed()).cloned()
        })
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

    /// Publishes the link's state: `Up` while any session is, else `Connecting` when a slot has
    /// just lost its session and is about to reconnect, else `Down` (an attempt failed).
    fn update_state(&self, metrics: &Metrics, connecting: bool) {
        let up = self
            .slots
            .iter()
            .any(|s| lock(s).as_ref().is_some_and(|s| !s.is_closed()));
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
            if let Some(s) = lock(s).take() {
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

    /// Keeps slot `index` connected until `shutdown` turns true.
    ///
    /// A lost session is noticed the moment its connection closes: at once when the CN answers
    /// with a stateless reset (it restarted; [`companion_transport::restart`]), within
    /// [`companion_transport::quic::CN_LIVENESS`] when it went silent. Either way the slot
    /// reconnects, and the loss is counted by reason (`gatewayd_cn_link_losses_total`).
    #[allow(clippy::too_many_arguments)]
    pub async fn run_slot(
        self: Arc<Self>,
        index: usize,
        endpoint: quinn::Endpoint,
        target: CnTarget,
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
            let attempt = async {
                let mut usim = usim.lock().await;
                CnSession::connect_with(&endpoint, &target, usim.as_mut(), opts).await
            };
            let result = tokio::select! {
                r = attempt => r,
                _ = shutdown.changed() => break,
            };
            match result {
                Ok((session, policy)) => {
                    resets_in_a_row = 0;
                    if failures > 0 {
                        tracing::info!(slot = index, after_failures = failures, "CN link restored");
                    } else {
                        tracing::info!(slot = index, cn = %target.addr, "CN link up");
                    }
                    failures = 0;
                    self.max_batch_items
                        .store(policy.max_batch_items, Ordering::Relaxed);
                    *lock(&self.slots[index]) = Some(session.clone());
                    self.update_state(&metrics, false);
                    let lost = tokio::select! {
                        e = session.connection().closed() => Some(e),
                        _ = shutdown.wait_for(|s| *s) => None,
                    };
                    *lock(&self.slots[index]) = None;
                    let Some(e) = lost else { break };
                    // Reconnecting: requests keep queueing until an attempt fails.
                    self.update_state(&metrics, true);
                    let reason = crate::metrics::link_loss::of(&e);
                    metrics.cn_link_losses.with_label_values(&[reason]).inc();
                    tracing::warn!(slot = index, reason, error = %e, "CN link lost; reconnecting");
                    // A stateless reset comes from a CN that is already back: reconnect at once
                    // (a little jitter, so the gateways of one CN do not all arrive in the same
                    // millisecond). Anything else reconnects after the first backoff step.
                    let delay = if reason == crate::metrics::link_loss::RESET {
                        Backoff::jitter(backoff.min.min(Duration::from_millis(100))) / 2
                    } else {
                        Backoff::jitter(backoff.delay(1))
                    };
                    self.sleep_before_attempt(delay, &mut shutdown).await;
                    continue;
                }
                Err(e)
                    if resets_in_a_row < 3
                        && matches!(
                            e,
                            CnClientError::Connection(quinn::ConnectionError::Reset)
                        ) =>
                {
                    // The CN restarted (again) while this attempt was under way: it is back, so
                    // try again at once instead of declaring the link down.
                    resets_in_a_row += 1;
                    metrics
                        .cn_link_losses
                        .with_label_values(&[crate::metrics::link_loss::RESET])
                        .inc();
                    tracing::info!(
                        slot = index,
                        "the CN restarted during the connection attempt; retrying at once"
                    );
                    self.update_state(&metrics, true);
                    let delay = Backoff::jitter(backoff.min.min(Duration::from_millis(100))) / 2;
                    self.sleep_before_attempt(delay, &mut shutdown).await;
                    continue;
                }
                Err(e) => {
                    resets_in_a_row = 0;
                    failures += 1;
                    let level_warn = failures == 1 || failures.is_power_of_two();
                    if level_warn {
                        tracing::warn!(slot = index, error = %e, failures, "cannot reach the CN");
                    } else {
                        tracing::debug!(slot = index, error = %e, failures, "cannot reach the CN");
                    }
                    self.update_state(&metrics, false);
                }
            }
            let delay = Backoff::jitter(backoff.delay(failures.max(1)));
            self.sleep_before_attempt(delay, &mut shutdown).await;
        }
        if let Some(s) = lock(&self.slots[index]).take() {
            s.close();
        }
        self.update_state(&metrics, false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_caps_with_jitter() {
        let b = Backoff {
            min: Duration::from_millis(500),
            max: Duration::from_secs(30),
        };
        assert_eq!(b.delay(1), Duration::from_millis(500));
        assert_eq!(b.delay(2), Duration::from_secs(1));
        assert_eq!(b.delay(4), Duration::from_secs(4));
        assert_eq!(b.delay(100), Duration::from_secs(30));
        for _ in 0..50 {
            let j = Backoff::jitter(Duration::from_secs(2));
            assert!(
                j >= Duration::from_secs(1) && j <= Duration::from_secs(2),
                "{j:?}"
            );
        }
    }

    #[test]
    fn unconfigured_link_has_no_session() {
        let l = CnLink::new(2, false);
        assert_eq!(l.state(), CnLinkState::NotConfigured);
        assert!(l.session().is_none());
        assert!(l.retry_after() >= Duration::from_millis(500));
    }
}
