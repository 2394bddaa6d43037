//! One slot's task: connect to the endpoint failover picks, authenticate, keep the session until it
//! is lost, then back off and move on.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use companion_crypto::usim::Usim;
use companion_transport::cn_client::ClientOptions;
use tokio::sync::watch;

use crate::metrics::Metrics;

use super::targets::connect_endpoint;
use super::*;

/// How a session ended, for the slot's next step.
enum Ended {
    Shutdown,
    Lost(quinn::ConnectionError),
}

impl CnLink {
    /// Waits `delay` (or until shutdown), publishing when the next attempt is due.
    pub(super) async fn sleep_before_attempt(
        &self,
        delay: Duration,
        shutdown: &mut watch::Receiver<bool>,
    ) {
        let at = self.epoch.elapsed() + delay;
        self.next_attempt_ms
            .store(at.as_millis() as u64, Ordering::Relaxed);
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            _ = shutdown.wait_for(|s| *s) => {}
        }
    }

    /// Sets slot `index`'s endpoint (moving its count in [`Endpoints`]).
    pub(super) fn set_slot_endpoint(&self, index: usize, endpoint: Option<usize>) {
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
    pub(super) fn endpoint_failed(
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
