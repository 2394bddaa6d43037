//! The batch driver: releases batches while the link is up, sends them on the CN sessions and
//! records what the CN issued (persisted before any waiting device is answered).

use super::*;

impl Provisioner {
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
    pub(super) fn release_queue(&self, why: &str) {
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

    pub(super) async fn send_batch(self: Arc<Self>, batch: Batch<Job>) {
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
    pub(super) fn fail_jobs(
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
    pub(super) async fn record(&self, jobs: Vec<Job>, result: BatchResult) {
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
}
