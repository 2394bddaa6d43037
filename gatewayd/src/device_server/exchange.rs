//! One device exchange on one stream: the [`ServerExchange`] machine run by the shared
//! [`StreamDriver`], the provisioner's work it waits on, the `Pending` keep-alives that keep the
//! device waiting meanwhile (on the schedule of [`next_pending_after`]), the acknowledgement, and
//! the give-ups counted when a device abandons its exchange before the answer.

use std::time::{Duration, Instant};

use companion_proto::device::{DeviceRequest, ServerEvent, ServerExchange};
use companion_proto::msg::{CredentialDelivery, ErrorCode, ErrorMsg};
use companion_proto::{Config, DeviceId, ProtoError, RequestId};
use companion_transport::drive::{DriveError, Step, StreamDriver};

use super::{BusyGuard, DeviceServer, Work, lock, unix_now};
use crate::delivery::{Peer, Reply, decode_sealed};
use crate::metrics::{giveup, kind};
use crate::state::AckOutcome;

/// When the first `Pending` goes to a device whose request is not answered at once.
const FIRST_PENDING_AFTER: Duration = Duration::from_millis(300);

/// How long the last frames get to reach the device after the exchange ends.
const LINGER: Duration = Duration::from_secs(2);

/// How long after sending `Pending{wait}` the next `Pending` is due, if the answer has not gone
/// first: early enough that it reaches the device before `wait` runs out there. The margin is
/// the larger of half the promise and two round trips plus 100 ms of scheduling slack (never more
/// than the whole promise), so a Pending that is itself delayed by one round trip still arrives
/// in time.
pub fn next_pending_after(wait: Duration, rtt: Duration) -> Duration {
    let margin = (wait / 2)
        .max(rtt.saturating_mul(2) + Duration::from_millis(100))
        .min(wait);
    (wait - margin).max(Duration::from_millis(50))
}

/// How a stream ended.
pub(super) enum StreamEnd {
    /// The exchange ended (completed, failed or abandoned) without the device breaking the
    /// protocol.
    Normal,
    /// The device broke the protocol (garbage): cut the whole connection off.
    Garbage,
}

/// What one stream's exchange has seen so far, beyond the machine's own state.
struct Exchange<'a> {
    peer: &'a Peer,
    /// The provisioner's answer to the request, while it is awaited.
    work: Option<Work>,
    /// Held while this device's request is in progress (one at a time per device).
    busy: Option<BusyGuard<'a>>,
    /// When the next `Pending` is due while `work` runs.
    next_pending: Option<Instant>,
    pendings: u32,
    started: Instant,
    req_kind: &'static str,
    device: Option<DeviceId>,
    request_id: Option<RequestId>,
}

impl DeviceServer {
    /// Runs one exchange on a stream the device opened, until it ends.
    pub(super) async fn stream(
        &self,
        send: quinn::SendStream,
        recv: quinn::RecvStream,
        peer: &Peer,
        paired: Option<DeviceId>,
        stream_timeout: Duration,
        conn: &quinn::Connection,
    ) -> StreamEnd {
        let mut drv = StreamDriver::new(send, recv, stream_timeout);
        let mut ex = ServerExchange::new(
            Instant::now(),
            Config {
                timeout: stream_timeout,
                ..Config::default()
            },
            paired.clone(),
        );
        let mut x = Exchange {
            peer,
            work: None,
            busy: None,
            next_pending: None,
            pendings: 0,
            started: Instant::now(),
            req_kind: kind::PROVISION,
            device: paired,
            request_id: None,
        };
        loop {
            let pending_at = x.next_pending.filter(|_| x.work.is_some());
            match drv
                .next(&mut ex, ServerExchange::is_closed, &mut x.work, pending_at)
                .await
            {
                Ok(Step::Event(ev)) => self.on_event(&mut ex, &mut x, ev).await,
                Ok(Step::Done(reply)) => {
                    x.next_pending = None;
                    self.on_reply(&mut ex, &x, reply);
                }
                Ok(Step::Wake) => {
                    // The device may give up `wait` after it receives this Pending: the answer or
                    // the next Pending leaves well before (see `next_pending_after`).
                    let wait = self.provisioner.wait_estimate();
                    let now = Instant::now();
                    if ex.pending(now, wait.as_millis() as u64).is_ok() {
                        x.pendings += 1;
                        self.metrics.pendings_sent.inc();
                    }
                    x.next_pending = Some(now + next_pending_after(wait, conn.rtt()));
                }
                Ok(Step::Closed) => {
                    // Let the last frames reach the device before the stream is dropped.
                    drv.wait_delivered(LINGER).await;
                    return StreamEnd::Normal;
                }
                Err(DriveError::Read(e)) => {
                    if x.work.is_some() {
                        self.gave_up(giveup::DISCONNECTED, &x, &e.to_string());
                    }
                    return StreamEnd::Normal;
                }
                Err(DriveError::Proto(e)) => {
                    tracing::debug!(error = %e, "device stream error");
                    drv.wait_delivered(LINGER).await;
                    // What the device sent broke the protocol; ending its stream early did not.
                    return if is_garbage(&e) && !drv.peer_finished() {
                        StreamEnd::Garbage
                    } else {
                        StreamEnd::Normal
                    };
                }
                Err(e) => {
                    // Stalled (the device's deadline passed, or it does not read) or lost.
                    tracing::debug!(error = %e, "device stream cut off");
                    drv.wait_delivered(LINGER).await;
                    return StreamEnd::Normal;
                }
            }
        }
    }

    /// Acts on one event of the machine.
    async fn on_event<'a>(
        &'a self,
        ex: &mut ServerExchange,
        x: &mut Exchange<'a>,
        ev: ServerEvent,
    ) {
        match ev {
            ServerEvent::Request(r) => {
                x.started = Instant::now();
                x.request_id = Some(r.request_id());
                if let DeviceRequest::Provision(p) = &r {
                    x.device.get_or_insert_with(|| p.device_id.clone());
                } else {
                    x.req_kind = kind::RENEW;
                }
                let newly = lock(&self.busy).insert(x.peer.fingerprint);
                if !newly {
                    let _ = ex.fail(ErrorMsg::retry_after(
                        ErrorCode::Busy,
                        "this device already has an exchange in progress",
                        500,
                    ));
                    return;
                }
                x.busy = Some(BusyGuard(self, x.peer.fingerprint));
                let prov = self.provisioner.clone();
                let peer = x.peer.clone();
                x.work = Some(Box::pin(async move { prov.handle(&peer, r).await }));
                x.next_pending = Some(Instant::now() + FIRST_PENDING_AFTER);
            }
            ServerEvent::Acked { request_id, supi } => {
                drop(x.busy.take());
                if let Some(d) = &x.device {
                    match self
                        .state
                        .acknowledge_async(d.clone(), request_id, unix_now())
                        .await
                    {
                        Ok(AckOutcome::Acknowledged) => {
                            tracing::info!(device = %d, %supi, "credential delivered and acknowledged");
                        }
                        Ok(_) => {}
                        Err(e) => {
                            tracing::error!(error = %e, "cannot record an acknowledgement")
                        }
                    }
                }
            }
            ServerEvent::Failed(e) => {
                if x.work.is_some() {
                    let reason = if e.code == ErrorCode::Timeout {
                        giveup::TIMEOUT
                    } else {
                        giveup::ERROR
                    };
                    self.gave_up(reason, x, &e.reason);
                }
                if e.code == ErrorCode::CredentialUnusable
                    && let (Some(d), Some(rid)) = (&x.device, x.request_id)
                {
                    tracing::warn!(device = %d, reason = %e.reason, "device could not use its credential; dropping it");
                    self.provisioner.credential_unusable(d, &rid);
                }
            }
        }
    }

    /// Hands the provisioner's answer to the machine (a delivery or an error).
    fn on_reply(&self, ex: &mut ServerExchange, x: &Exchange<'_>, reply: Reply) {
        match reply {
            Reply::Deliver(d) => {
                let Some(sealed) = decode_sealed(&d.sealed) else {
                    let _ = ex.fail(ErrorMsg::new(
                        ErrorCode::Internal,
                        "stored credential is damaged",
                    ));
                    return;
                };
                let delivery = CredentialDelivery {
                    request_id: d.request_id,
                    supi: d.supi.clone(),
                    expires_at: u64::try_from(d.expires_at).unwrap_or(0),
                    sealed,
                };
                if ex.deliver(Instant::now(), delivery).is_ok() {
                    self.metrics
                        .request_latency
                        .with_label_values(&[x.req_kind])
                        .observe(x.started.elapsed().as_secs_f64());
                }
            }
            Reply::Fail(e) => {
                let _ = ex.fail(e);
            }
        }
    }

    /// A device abandoned its exchange before the gateway answered: logged and counted
    /// (`gatewayd_device_giveups_total`), so a gateway that breaks its `Pending` promise shows.
    fn gave_up(&self, reason: &'static str, x: &Exchange<'_>, detail: &str) {
        self.metrics
            .device_giveups
            .with_label_values(&[reason])
            .inc();
        tracing::info!(
            device = %x.device.as_ref().map_or_else(|| "?".to_string(), |d| d.to_string()),
            request_id = %x.request_id.map_or_else(|| "?".to_string(), |r| r.to_string()),
            waited_ms = x.started.elapsed().as_millis() as u64,
            pendings = x.pendings,
            reason,
            detail,
            "the device gave up before its answer"
        );
    }
}

/// Errors that mean the device sent bytes that break the protocol (not a timeout or an end).
fn is_garbage(e: &ProtoError) -> bool {
    matches!(
        e,
        ProtoError::Frame(_)
            | ProtoError::Body { .. }
            | ProtoError::Unexpected { .. }
            | ProtoError::Violation(_)
    )
}
