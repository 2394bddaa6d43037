//! One device request's path to its answer: authorization, a delivery already waiting, persisting
//! and queueing a new request, and waiting (informed by `Pending`) for the batch that carries it.

use super::*;

impl Provisioner {
    pub(super) fn finish(&self, id: &RequestId, done: Done) {
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
    pub(super) fn enqueue(&self, job: Job) -> Result<(), Duration> {
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
    pub(super) fn wait_for(&self, id: &RequestId) -> Option<oneshot::Receiver<Done>> {
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
    pub(super) fn build_item(
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

    pub(super) async fn handle_inner(&self, peer: &Peer, req: DeviceRequest) -> Reply {
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

    pub(super) async fn persist(&self, record: OutstandingRequest) -> Result<(), ErrorMsg> {
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

    pub(super) async fn await_done(&self, rx: oneshot::Receiver<Done>, timeout: Duration) -> Reply {
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
}
