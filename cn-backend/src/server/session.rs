//! An authenticated gateway session: its AuthResult, the raised connection limits, and one task
//! per operation stream, each counted in flight until it ends (shutdown drains them).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use companion_proto::cn::{Operation, OperationEvent, ServerRequest, ServerSession};
use companion_proto::msg::{AuthResult, ErrorCode, ErrorMsg};
use companion_transport::drive::{DriveError, StreamDriver};
use tracing::{debug, info};

use crate::model::Supi;
use crate::service::Service;

use super::aka::{Conv, run_aka};
use super::operations::{batch, list, revoke};
use super::{authenticated_limits, blocking, now_ts, proto_config};

/// Decrements the active-session gauge when a gateway session ends.
pub(super) struct SessionGuard<'a>(&'a Service);
impl Drop for SessionGuard<'_> {
    fn drop(&mut self) {
        self.0.metrics.sessions.dec();
    }
}

pub(super) async fn gateway_session(
    svc: &Arc<Service>,
    conn: &quinn::Connection,
    mut drv: StreamDriver,
    exporter: [u8; 32],
) {
    let ip = conn.remote_address().ip();
    let mut m = ServerSession::new(exporter, Instant::now(), proto_config(svc));
    let Some(v) = run_aka(svc, &mut drv, &mut m, ip, Conv::Cn).await else {
        wait_closed(svc, conn).await;
        return;
    };
    let parent = v.supi.clone();
    let st = svc.store.clone();
    let p = parent.clone();
    let now = now_ts();
    let summary = blocking(move || Ok((st.parent(&p)?, st.count_active_children(&p, now)?))).await;
    let result = match summary {
        Ok((Some(p), active)) => AuthResult {
            max_children: u64::from(p.policy.max_children),
            active_children: u64::from(active),
            max_lifetime_s: p
                .policy
                .max_lifetime_s
                .min(svc.issuer.operator.max_lifetime_s),
            roaming_allowed: p.policy.roaming_allowed,
            max_batch_items: u64::try_from(svc.issuer.max_batch_items).unwrap_or(256),
            dnns: (!p.policy.allowed_dnns.is_empty()).then(|| {
                p.policy
                    .allowed_dnns
                    .iter()
                    .map(ToString::to_string)
                    .collect()
            }),
        },
        Ok((None, _)) | Err(_) => {
            let _ = m.reject(ErrorMsg::retry_after(
                ErrorCode::Internal,
                "internal error",
                2000,
            ));
            let _ = drv.flush_and_finish(&mut m).await;
            return;
        }
    };
    // Authenticated: the full windows and operation streams (MAX_DATA and MAX_STREAMS go out
    // with or before AuthResult, so the gateway's first operation does not wait for them).
    authenticated_limits().grant(conn);
    if m.accept(result).is_err() || drv.flush_and_finish(&mut m).await.is_err() {
        return;
    }
    info!(supi = %parent, peer = %conn.remote_address(), "gateway session authenticated");
    svc.metrics.sessions.inc();
    let _guard = SessionGuard(svc);
    let session = Arc::new(m);
    loop {
        let Ok((send, recv)) = conn.accept_bi().await else {
            break;
        };
        let svc = svc.clone();
        let session = session.clone();
        let parent = parent.clone();
        tokio::spawn(async move {
            let mut drv = StreamDriver::new(send, recv, svc.exchange_timeout);
            match session.accept_request(Instant::now()) {
                Ok(req) => operation(&svc, &mut drv, req, &parent).await,
                Err(_) => drv.abort(1),
            }
        });
    }
    debug!(supi = %parent, "gateway session closed");
}

pub(super) async fn wait_closed(svc: &Service, conn: &quinn::Connection) {
    // Give the peer time to read the refusal, then close.
    let _ = tokio::time::timeout(
        Duration::from_secs(2).min(svc.exchange_timeout),
        conn.closed(),
    )
    .await;
    conn.close(0u32.into(), b"authentication failed");
}

/// Counts a batch in flight until dropped (shutdown drains these).
pub(super) struct Inflight<'a>(&'a Service);
impl<'a> Inflight<'a> {
    fn new(s: &'a Service) -> Self {
        s.inflight.fetch_add(1, Ordering::AcqRel);
        Inflight(s)
    }
}
impl Drop for Inflight<'_> {
    fn drop(&mut self) {
        self.0.inflight.fetch_sub(1, Ordering::AcqRel);
    }
}

pub(super) async fn operation(
    svc: &Arc<Service>,
    drv: &mut StreamDriver,
    mut req: ServerRequest,
    parent: &Supi,
) {
    let op = match drv.next_event(&mut req).await {
        Ok(OperationEvent::Request(op)) => op,
        Ok(OperationEvent::Failed(e)) => {
            debug!("gateway sent an error: {:?}", e.code);
            return;
        }
        Err(e) => {
            let code = match &e {
                DriveError::Proto(p) => p.error_code().name(),
                DriveError::Timeout(_) => "timeout",
                _ => "transport",
            };
            svc.metrics
                .operations
                .with_label_values(&["unknown", code])
                .inc();
            debug!("operation stream failed: {e}");
            drv.wait_delivered(Duration::from_secs(2)).await;
            return;
        }
    };
    let _inflight = Inflight::new(svc);
    let (name, r) = match op {
        Operation::Batch(b) => ("batch", batch(svc, &mut req, b, parent).await),
        Operation::Revoke(r) => ("revoke", revoke(svc, &mut req, r, parent).await),
        Operation::ListChildren => ("list", list(svc, &mut req, parent).await),
    };
    let result = match &r {
        Ok(()) => "ok",
        Err(e) => e.code.name(),
    };
    svc.metrics
        .operations
        .with_label_values(&[name, result])
        .inc();
    if let Err(e) = r {
        let _ = req.fail(e);
    }
    if drv.flush_and_finish(&mut req).await.is_ok() {
        drv.wait_delivered(svc.exchange_timeout).await;
    }
}
