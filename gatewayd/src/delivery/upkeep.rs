//! Background upkeep: resending persisted requests after a reconnect, pre-fetching renewals,
//! revocations at the CN and their retries, gauges, and the drain on shutdown.

use super::*;

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

impl Provisioner {
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
    pub(super) fn still_paired(&self, item: &BatchItem) -> bool {
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
