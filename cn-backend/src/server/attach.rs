//! Device attach (`companion-attach/1`): AKA with the child's own credential, then the attach
//! policy on the current state (active, unexpired, unrevoked, parent active, roaming).

use std::sync::Arc;
use std::time::Instant;

use companion_proto::aka::AkaServer;
use companion_proto::msg::{AttachAccept, AttachMessage, ErrorCode, ErrorMsg};
use companion_transport::drive::StreamDriver;
use tracing::info;

use crate::model::SubscriptionStatus;
use crate::policy::{self, AttachRefusal};
use crate::service::{Service, proto_restrictions};

use super::aka::{Conv, run_aka};
use super::session::wait_closed;
use super::{blocking, internal, now_ts, proto_config};

pub(super) async fn attach(
    svc: &Arc<Service>,
    conn: &quinn::Connection,
    drv: &mut StreamDriver,
    exporter: [u8; 32],
) {
    let ip = conn.remote_address().ip();
    let mut m: AkaServer<AttachMessage> =
        AkaServer::new(exporter, Instant::now(), proto_config(svc));
    let Some(v) = run_aka(svc, drv, &mut m, ip, Conv::Attach).await else {
        svc.metrics.attach.with_label_values(&["auth_failed"]).inc();
        wait_closed(svc, conn).await;
        return;
    };
    let _ = v.subscriber;
    // Decide on the current state, not on what was read before AKA.
    let st = svc.store.clone();
    let supi = v.supi.clone();
    let state = blocking(move || {
        let Some(child) = st.child(&supi)? else {
            return Ok(None);
        };
        let parent_status = st
            .parent(&child.parent)?
            .map_or(SubscriptionStatus::Revoked, |p| p.status);
        Ok(Some((child, parent_status)))
    })
    .await;
    let roaming = svc.is_roaming(&v.snn);
    let decision = match state {
        Ok(Some((child, parent_status))) => {
            match policy::check_attach(&child, parent_status, now_ts(), roaming) {
                Ok(r) => Ok(AttachAccept {
                    expires_at: u64::try_from(child.expires_at.as_secs()).unwrap_or(0),
                    restrictions: proto_restrictions(r),
                }),
                Err(AttachRefusal::Revoked) => Err(ErrorMsg::new(
                    ErrorCode::CredentialRevoked,
                    "credential revoked: discard it and provision again",
                )),
                Err(AttachRefusal::Expired(at)) => Err(ErrorMsg::new(
                    ErrorCode::CredentialExpired,
                    format!("credential expired at {at}: renew through the gateway"),
                )),
                Err(AttachRefusal::ParentInactive(s)) => Err(ErrorMsg::new(
                    ErrorCode::SubscriptionSuspended,
                    format!("parent subscription is {s}"),
                )),
                Err(AttachRefusal::RoamingNotAllowed) => Err(ErrorMsg::new(
                    ErrorCode::RoamingNotAllowed,
                    "this credential may not attach from a visited network",
                )),
            }
        }
        Ok(None) => Err(ErrorMsg::new(
            ErrorCode::UnknownSubscriber,
            "unknown subscriber",
        )),
        Err(e) => Err(internal(&e)),
    };
    let label = match &decision {
        Ok(_) => "accepted",
        Err(e) => e.code.name(),
    };
    svc.metrics.attach.with_label_values(&[label]).inc();
    info!(supi = %v.supi, roaming, result = label, "attach");
    let _ = match decision {
        Ok(a) => m.accept(a),
        Err(e) => m.reject(e),
    };
    if drv.flush_and_finish(&mut m).await.is_ok() {
        drv.wait_delivered(svc.exchange_timeout).await;
    }
    wait_closed(svc, conn).await;
}
