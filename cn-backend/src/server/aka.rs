//! The server side of AKA for both conversations: the subscriber's kind checked, the vector built
//! (reused while unanswered, else with a newly reserved SQN), RES*, binding and AUTS verified by
//! the proto machine, and failures counted per (SUPI, source prefix) and per prefix for lock-out.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use companion_crypto::aka::{AMF_5G, generate_vector, try_random_rand, verify_auts};
use companion_crypto::milenage::Milenage;
use companion_proto::ProtoError;
use companion_proto::aka::{AkaServer, AkaWire, ServerEvent};
use companion_proto::msg::{ErrorCode, ErrorMsg};
use companion_transport::drive::{DriveError, StreamDriver};
use tracing::{debug, info};

use crate::aka_guard::{Reserved, SourcePrefix, VectorPlan};
use crate::model::{SubscriberKeys, SubscriptionStatus, Supi};
use crate::ops::{self};
use crate::service::Service;
use crate::store::{StoreError, Subscriber};

use super::{blocking, internal};

#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Conv {
    Cn,
    Attach,
}

impl Conv {
    fn label(self) -> &'static str {
        match self {
            Conv::Cn => "cn",
            Conv::Attach => "attach",
        }
    }
}

/// What a verified AKA yields.
pub(super) struct Verified {
    pub(super) supi: Supi,
    pub(super) snn: String,
    pub(super) subscriber: Subscriber,
}

/// The vector an exchange holds; given back to the [`AkaGuard`](crate::aka_guard::AkaGuard)
/// when the exchange ends, however it ends (kept for reuse unless a correct RES* consumed it).
pub(super) struct Lease<'a> {
    svc: &'a Service,
    supi: Supi,
    src: SourcePrefix,
    held: Option<(Reserved, Instant)>,
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        if let Ok(mut g) = self.svc.aka_guard.lock() {
            g.end(&self.supi, self.src, self.held.take(), Instant::now());
        }
    }
}

/// The server side of AKA up to `Verified` (or a refusal, already sent).
pub(super) async fn run_aka<W: AkaWire>(
    svc: &Arc<Service>,
    drv: &mut StreamDriver,
    m: &mut AkaServer<W>,
    ip: IpAddr,
    conv: Conv,
) -> Option<Verified> {
    let aka_metric = |r: &str| svc.metrics.aka.with_label_values(&[conv.label(), r]).inc();
    let src = SourcePrefix::of(ip);
    // The SUPI once a vector was issued for it (then failed verifications count against it
    // and this source prefix).
    let mut known: Option<Supi> = None;
    let mut lease: Option<Lease<'_>> = None;
    let mut keys: Option<SubscriberKeys> = None;
    let mut snn_seen = String::new();
    let mut subscriber: Option<Subscriber> = None;
    loop {
        let ev = drv.next_event(m).await;
        let reject = |m: &mut AkaServer<W>, e: ErrorMsg| {
            // Rejecting can only fail if the machine is already closed: nothing to send then.
            let _ = m.reject(e);
        };
        match ev {
            Ok(ServerEvent::VectorNeeded {
                supi,
                serving_network_name,
            }) => {
                let locked = svc
                    .aka_guard
                    .lock()
                    .map(|mut g| g.source_locked(src, Instant::now()))
                    .unwrap_or(None);
                if let Some(wait) = locked {
                    aka_metric("locked_out");
                    reject(m, lockout_msg("this network", wait));
                    break;
                }
                let Ok(supi) = Supi::parse(supi.as_str()) else {
                    reject(
                        m,
                        ErrorMsg::new(ErrorCode::UnknownSubscriber, "unknown subscriber"),
                    );
                    break;
                };
                let locked = svc
                    .aka_guard
                    .lock()
                    .map(|mut g| g.pair_locked(&supi, src, Instant::now()))
                    .unwrap_or(None);
                if let Some(wait) = locked {
                    aka_metric("locked_out");
                    reject(m, lockout_msg("this network for this subscriber", wait));
                    break;
                }
                if let Err(VectorError::Refuse(result, msg)) = check_kind(svc, &supi, conv).await {
                    aka_metric(result);
                    if result == "unknown_subscriber" {
                        addr_failure(svc, src);
                    }
                    reject(m, msg);
                    break;
                }
                let plan = match svc.aka_guard.lock() {
                    Ok(mut g) => g.start(&supi, src, Instant::now()),
                    Err(_) => VectorPlan::Busy,
                };
                let reuse = match plan {
                    VectorPlan::Busy => {
                        aka_metric("busy");
                        reject(
                            m,
                            ErrorMsg::retry_after(
                                ErrorCode::Busy,
                                "too many authentications of this subscriber under way from \
                                 this network",
                                1000,
                            ),
                        );
                        break;
                    }
                    VectorPlan::Reuse(r, at) => Some((r, at)),
                    VectorPlan::Fresh => None,
                };
                let l = lease.insert(Lease {
                    svc,
                    supi: supi.clone(),
                    src,
                    held: None,
                });
                match vector(svc, &supi, &serving_network_name, reuse.map(|(r, _)| r)).await {
                    Ok((v, k, sub, r)) => {
                        l.held = Some((r, reuse.map_or_else(Instant::now, |(_, at)| at)));
                        if reuse.is_some() {
                            aka_metric("vector_reused");
                        }
                        if m.provide_vector(Instant::now(), v).is_err() {
                            break;
                        }
                        known = Some(supi);
                        keys = Some(k);
                        subscriber = Some(sub);
                        snn_seen = serving_network_name;
                    }
                    Err(VectorError::Refuse(result, msg)) => {
                        aka_metric(result);
                        reject(m, msg);
                        break;
                    }
                }
            }
            Ok(ServerEvent::ResyncNeeded {
                rand,
                auts,
                serving_network_name,
                ..
            }) => {
                let (Some(supi), Some(k)) = (known.clone(), keys.as_ref()) else {
                    break;
                };
                let mil = Milenage::new(&k.k, &k.opc);
                match verify_auts(&mil, &rand, &auts) {
                    Ok(sqn_ms) => {
                        aka_metric("resync");
                        // The USIM will not take the vector held: forget it.
                        if let Some(l) = lease.as_mut() {
                            l.held = None;
                        }
                        let s = supi.clone();
                        let st = svc.store.clone();
                        if let Err(e) = blocking(move || ops::apply_resync(&*st, &s, sqn_ms)).await
                        {
                            reject(m, internal(&e));
                            break;
                        }
                        match vector(svc, &supi, &serving_network_name, None).await {
                            Ok((v, k2, sub, r)) => {
                                if let Some(l) = lease.as_mut() {
                                    l.held = Some((r, Instant::now()));
                                }
                                if m.provide_vector(Instant::now(), v).is_err() {
                                    break;
                                }
                                keys = Some(k2);
                                subscriber = Some(sub);
                            }
                            Err(VectorError::Refuse(result, msg)) => {
                                aka_metric(result);
                                reject(m, msg);
                                break;
                            }
                        }
                    }
                    Err(_) => {
                        // The server's own check of MAC-S failed: counted like a wrong RES*.
                        aka_metric("sync_failure");
                        aka_failure(svc, &supi, src);
                        reject(
                            m,
                            ErrorMsg::new(ErrorCode::SyncFailure, "AUTS does not verify"),
                        );
                        break;
                    }
                }
            }
            Ok(ServerEvent::Verified { .. }) => {
                let (Some(supi), Some(sub)) = (known.clone(), subscriber.take()) else {
                    break;
                };
                aka_metric("success");
                // A correct RES* consumed the vector.
                if let Some(l) = lease.as_mut() {
                    l.held = None;
                }
                if let Ok(mut g) = svc.aka_guard.lock() {
                    g.success(&supi, src, Instant::now());
                }
                return Some(Verified {
                    supi,
                    snn: snn_seen,
                    subscriber: sub,
                });
            }
            Ok(ServerEvent::Failed(e)) => {
                // The client gave up with `Error`. Never counted towards a lock-out: anyone can
                // send `auth_failed` for any SUPI without its key. (From a real USIM it means
                // the network's AUTN did not verify, e.g. a wrong K or OPc at either end, so it
                // still shows in the metrics.)
                aka_metric(if e.code == ErrorCode::AuthFailed {
                    "auth_failed"
                } else {
                    "client_error"
                });
                return None;
            }
            Err(DriveError::Proto(ProtoError::AuthFailed(why))) => {
                // Wrong RES* or session binding: the server's own verification failed.
                aka_metric("auth_failed");
                debug!("AKA failed: {why}");
                if let Some(s) = &known {
                    aka_failure(svc, s, src);
                } else {
                    addr_failure(svc, src);
                }
                return None;
            }
            Err(DriveError::Proto(ProtoError::SyncFailure(_))) => {
                // Too many resynchronisations, each with an AUTS that verified.
                aka_metric("sync_failure");
                if let Some(s) = &known {
                    aka_failure(svc, s, src);
                }
                return None;
            }
            Err(DriveError::OverBudget { budget }) => {
                aka_metric("too_large");
                debug!("AKA stream over its budget of {budget} bytes");
                reject(
                    m,
                    ErrorMsg::new(
                        ErrorCode::TooLarge,
                        format!(
                            "AKA messages are at most {budget} bytes in all before \
                             authentication; send AuthStart and the answers only"
                        ),
                    ),
                );
                break;
            }
            Err(e) => {
                aka_metric(if matches!(e, DriveError::Timeout(_)) {
                    "timeout"
                } else {
                    "error"
                });
                debug!("AKA stream failed: {e}");
                return None;
            }
        }
    }
    drop(lease);
    // A refusal was queued: deliver it.
    let _ = drv.flush_and_finish(m).await;
    drv.wait_delivered(Duration::from_secs(2)).await;
    None
}

pub(super) fn lockout_msg(what: &str, wait: Duration) -> ErrorMsg {
    let ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX).max(1);
    ErrorMsg::retry_after(
        ErrorCode::AuthFailed,
        format!(
            "too many failed authentications from {what}; locked out for {} s",
            ms.div_ceil(1000)
        ),
        ms,
    )
}

/// A failure from `src` not tied to a known SUPI (unknown SUPI).
pub(super) fn addr_failure(svc: &Service, src: SourcePrefix) {
    if let Ok(mut g) = svc.aka_guard.lock() {
        g.source_failure(
            src,
            Instant::now(),
            svc.settings.aka_addr_max_failures,
            svc.lockout,
        );
    }
}

/// A failed verification (RES*, binding, AUTS) of `supi` from `src`.
pub(super) fn aka_failure(svc: &Service, supi: &Supi, src: SourcePrefix) {
    if let Ok(mut g) = svc.aka_guard.lock() {
        g.failure(
            supi,
            src,
            Instant::now(),
            svc.settings.aka_max_failures,
            svc.settings.aka_addr_max_failures,
            svc.lockout,
        );
    }
    info!(%supi, source = %src, "AKA verification failed");
}

pub(super) enum VectorError {
    Refuse(&'static str, ErrorMsg),
}

pub(super) fn unknown() -> VectorError {
    VectorError::Refuse(
        "unknown_subscriber",
        ErrorMsg::new(ErrorCode::UnknownSubscriber, "unknown subscriber"),
    )
}

/// Checks `supi` is the right kind of subscriber for `conv` (reads only, so probing costs no
/// write).
pub(super) async fn check_kind(
    svc: &Arc<Service>,
    supi: &Supi,
    conv: Conv,
) -> Result<(), VectorError> {
    let s = supi.clone();
    let st = svc.store.clone();
    let kind = blocking(move || Ok((st.parent(&s)?, st.child(&s)?.is_some()))).await;
    match (conv, kind) {
        (_, Err(e)) => Err(VectorError::Refuse("error", internal(&e))),
        (Conv::Cn, Ok((Some(p), _))) => {
            if p.status == SubscriptionStatus::Active {
                Ok(())
            } else {
                Err(VectorError::Refuse(
                    "subscription_suspended",
                    ErrorMsg::new(
                        ErrorCode::SubscriptionSuspended,
                        format!("subscription is {}", p.status),
                    ),
                ))
            }
        }
        // SQN ownership (docs/OPERATIONS.md, "With Open5GS"): a child synced to a 5G core
        // authenticates there, and the core's UDM owns its SQN. Refused before a vector is
        // made, so cn-backend never runs a second SQN sequence for the same credential.
        (Conv::Attach, Ok((_, true))) if svc.settings.sync.open5gs.is_some() => {
            Err(VectorError::Refuse(
                "synced_to_core",
                ErrorMsg::new(
                    ErrorCode::PolicyDenied,
                    "this credential authenticates at the operator's 5G core, not here",
                ),
            ))
        }
        (Conv::Attach, Ok((_, true))) => Ok(()),
        _ => Err(unknown()),
    }
}

/// Builds a vector for `supi`: again from `reuse` (SQN and RAND of an unanswered vector, no
/// write), or with a newly reserved SQN and a fresh RAND.
pub(super) async fn vector(
    svc: &Arc<Service>,
    supi: &Supi,
    snn: &str,
    reuse: Option<Reserved>,
) -> Result<
    (
        companion_crypto::aka::AuthVector,
        SubscriberKeys,
        Subscriber,
        Reserved,
    ),
    VectorError,
> {
    let s = supi.clone();
    let st = svc.store.clone();
    let material = match reuse {
        Some(_) => blocking(move || ops::aka_material(&*st, &s)).await,
        None => blocking(move || ops::aka_vector(&*st, &s)).await,
    };
    let material = match material {
        Ok(m) => m,
        Err(StoreError::UnknownSupi(_)) => return Err(unknown()),
        Err(e) => return Err(VectorError::Refuse("error", internal(&e))),
    };
    let r = match reuse {
        Some(r) => r,
        None => Reserved {
            sqn: material.sqn,
            rand: try_random_rand().map_err(|_| {
                VectorError::Refuse(
                    "error",
                    ErrorMsg::retry_after(ErrorCode::Internal, "internal error", 2000),
                )
            })?,
        },
    };
    let mil = Milenage::new(&material.keys.k, &material.keys.opc);
    let v = generate_vector(&mil, r.sqn, &AMF_5G, r.rand, snn);
    Ok((v, material.keys, material.subscriber, r))
}
