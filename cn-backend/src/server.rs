//! The QUIC server: one endpoint offering `companion-cn/2` (gateway sessions) and
//! `companion-attach/1` (device attach).
//!
//! * Gateway session: AKA on the first stream with the parent's K/OPc/SQN, resync through AUTS,
//!   RES* and the TLS-exporter binding checked by the proto machine; then one operation per
//!   stream (batch, revoke, list) for that parent only.
//! * Attach: AKA with the child's credential, then the attach policy
//!   ([`crate::policy::check_attach`]): active, unexpired, unrevoked, parent active, roaming.
//! * Only the server's own verification failing (wrong RES* or binding, an AUTS that does not
//!   verify) counts as a failed authentication, never an `Error` the client sends. Failures are
//!   counted in memory per (SUPI, source prefix) and per source prefix
//!   ([`crate::aka_guard`]): a pair with `aka_max_failures` failures, or a prefix with
//!   `aka_addr_max_failures`, is refused with `auth_failed` + `retry_after_ms` for
//!   `aka_lockout`; failures from one network never lock the SUPI out for another.
//! * An unanswered vector is sent again to the next start of the same SUPI from the same
//!   prefix instead of reserving a new SQN each time ([`crate::aka_guard`], TS 33.102 Annex C).
//! * Store calls are blocking and run on `spawn_blocking`; a batch is one transaction
//!   (`ops::issue_batch`), so a peer vanishing mid-batch leaves it committed (a retry with the
//!   same request IDs gets the same sealed credentials) or not at all.
//! * Every error a peer provokes ends at most its stream or connection; nothing panics.

use std::collections::HashSet;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use companion_crypto::aka::{AMF_5G, generate_vector, try_random_rand, verify_auts};
use companion_crypto::binding::EXPORTER_LABEL;
use companion_crypto::milenage::Milenage;
use companion_proto::aka::{AkaServer, AkaWire, ServerEvent};
use companion_proto::cn::{Operation, OperationEvent, ServerRequest, ServerSession};
use companion_proto::msg::{
    AttachAccept, AttachMessage, AuthResult, BatchProvision, BatchResult, Child, ChildList,
    ChildState, ErrorCode, ErrorMsg, ItemKind, ItemResult, Outcome, Revoke, RevokeResult,
};
use companion_proto::{Config, ProtoError};
use companion_transport::drive::{DriveError, StreamDriver};
use companion_transport::{ALPN_ATTACH, ALPN_CN, Limits, PreAuth, negotiated_alpn, tls_exporter};
use tracing::{debug, info, warn};

use crate::aka_guard::{Reserved, SourcePrefix, VectorPlan};
use crate::model::{
    ChildCredential, DeviceId, Dnn, KeyFingerprint, RequestId, SubscriberKeys, SubscriptionStatus,
    Supi, Timestamp,
};
use crate::ops::{self, Batch, BatchItem, ItemOutcome, ProvisionItem, RenewItem};
use crate::policy::{self, AttachRefusal, Attestation, Denial, RequestedParams};
use crate::service::{Service, proto_restrictions, sealed_to_wire};
use crate::store::{Store, StoreError, Subscriber};

/// Runs `f` on the blocking pool (store calls); a panicking or cancelled task is an internal error.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(StoreError::Database(format!("store task failed: {e}"))))
}

fn internal(e: &StoreError) -> ErrorMsg {
    match e {
        StoreError::Busy => ErrorMsg::retry_after(ErrorCode::Busy, "database busy", 1000),
        StoreError::Unavailable(_) => {
            ErrorMsg::retry_after(ErrorCode::Busy, "database unavailable", 1000)
        }
        _ => ErrorMsg::retry_after(ErrorCode::Internal, "internal error", 2000),
    }
}

fn proto_config(svc: &Service) -> Config {
    Config {
        timeout: svc.exchange_timeout,
        ..Config::default()
    }
}

/// What an unauthenticated peer is granted (see [`Limits::until_authenticated`]): the AKA stream
/// only, and 16 KiB of unread data for the whole connection. With [`AKA_READ_BUDGET`] on that
/// stream, a connection that never authenticates makes the CN hold a few tens of KiB, not the
/// 32 MiB window of an authenticated gateway session.
pub const PRE_AUTH: PreAuth = PreAuth {
    max_bidi_streams: 1,
    connection_window: 16 * 1024,
};

/// Most bytes a peer may send on the AKA stream before AKA succeeded: AuthStart, AuthResponse
/// and resynchronisations are a few hundred bytes in all, so a peer that announces a large
/// frame there is refused with `too_large` before the CN buffers it.
pub const AKA_READ_BUDGET: u64 = 4 * 1024;

/// The limits of an authenticated connection (a gateway session once AKA succeeded); the
/// endpoint advertises them narrowed to [`PRE_AUTH`], and [`Limits::grant`] raises a
/// connection to them.
pub fn authenticated_limits() -> Limits {
    let mut limits = Limits::cn_link();
    limits.keep_alive = None;
    limits.max_bidi_streams = 64;
    limits
}

/// The key of the per-address connection cap: the IPv4 address (also IPv4-mapped IPv6), the
/// IPv6 /64 (one subscriber's LAN gets a /64 or more, so a host can pick any address in it).
pub fn address_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(a) => IpAddr::V4(a),
        IpAddr::V6(a) => match a.to_ipv4_mapped() {
            Some(m) => IpAddr::V4(m),
            None => IpAddr::V6(std::net::Ipv6Addr::from(u128::from(a) & (u128::MAX << 64))),
        },
    }
}

/// One connection's place in [`Service::connections`], taken in the accept loop before the
/// connection's task is spawned (so a burst of connections cannot overshoot the caps), and
/// given back when dropped, however the connection ends.
struct Slot {
    svc: Arc<Service>,
    key: IpAddr,
}

/// Why a connection was refused at its first packet (the metric's label).
#[derive(Debug, Clone, Copy)]
enum Refusal {
    Total,
    PerAddress,
}

impl Slot {
    fn take(svc: &Arc<Service>, ip: IpAddr) -> Result<Slot, Refusal> {
        let key = address_key(ip);
        // A poisoned lock still holds consistent counts (every update is one statement).
        let mut c = svc
            .connections
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if c.total >= svc.settings.max_connections {
            return Err(Refusal::Total);
        }
        let n = c.per_address.entry(key).or_insert(0);
        if *n >= svc.settings.max_connections_per_address {
            if *n == 0 {
                c.per_address.remove(&key);
            }
            return Err(Refusal::PerAddress);
        }
        *n += 1;
        c.total += 1;
        svc.metrics.connections.inc();
        Ok(Slot {
            svc: svc.clone(),
            key,
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut c = self
            .svc
            .connections
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        c.total = c.total.saturating_sub(1);
        if let Some(n) = c.per_address.get_mut(&self.key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                c.per_address.remove(&self.key);
            }
        }
        self.svc.metrics.connections.dec();
    }
}

/// Accepts connections until the endpoint is closed.
pub async fn run(svc: Arc<Service>, endpoint: quinn::Endpoint) {
    let refused = |reason: &str| {
        svc.metrics
            .connections_refused
            .with_label_values(&[reason])
            .inc();
    };
    while let Some(incoming) = endpoint.accept().await {
        if svc.is_shutting_down() {
            refused("shutting_down");
            incoming.refuse();
            continue;
        }
        let peer = incoming.remote_address();
        let slot = match Slot::take(&svc, peer.ip()) {
            Ok(s) => s,
            Err(Refusal::Total) => {
                refused("max_connections");
                warn!(
                    %peer,
                    "connection limit reached (max_connections = {}); refusing",
                    svc.settings.max_connections
                );
                incoming.refuse();
                continue;
            }
            Err(Refusal::PerAddress) => {
                // Debug only: a flood from one address must not flood the log too; the
                // metric counts them.
                refused("per_address");
                debug!(
                    %peer,
                    "per-address connection limit reached (max_connections_per_address = {}); \
                     refusing",
                    svc.settings.max_connections_per_address
                );
                incoming.refuse();
                continue;
            }
        };
        let svc = svc.clone();
        tokio::spawn(async move {
            let _slot = slot;
            match incoming.await {
                Ok(conn) => handle_connection(&svc, conn).await,
                Err(e) => debug!(%peer, "handshake failed: {e}"),
            }
        });
    }
}

async fn handle_connection(svc: &Arc<Service>, conn: quinn::Connection) {
    let peer = conn.remote_address();
    let alpn = negotiated_alpn(&conn);
    let Ok(exporter) = tls_exporter(&conn, EXPORTER_LABEL) else {
        conn.close(1u32.into(), b"no TLS exporter");
        return;
    };
    let first = tokio::time::timeout(svc.exchange_timeout, conn.accept_bi()).await;
    let Ok(Ok((send, recv))) = first else {
        conn.close(0u32.into(), b"no AKA stream");
        return;
    };
    let mut drv = StreamDriver::new(send, recv, svc.exchange_timeout);
    drv.set_read_budget(Some(AKA_READ_BUDGET));
    match alpn.as_deref() {
        Some(a) if a == ALPN_CN => gateway_session(svc, &conn, drv, exporter).await,
        Some(a) if a == ALPN_ATTACH => attach(svc, &conn, &mut drv, exporter).await,
        _ => conn.close(1u32.into(), b"unsupported ALPN"),
    }
    debug!(%peer, "connection done");
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Conv {
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
struct Verified {
    supi: Supi,
    snn: String,
    subscriber: Subscriber,
}

fn now_ts() -> Timestamp {
    Timestamp::now()
}

/// The vector an exchange holds; given back to the [`AkaGuard`](crate::aka_guard::AkaGuard)
/// when the exchange ends, however it ends (kept for reuse unless a correct RES* consumed it).
struct Lease<'a> {
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
async fn run_aka<W: AkaWire>(
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

fn lockout_msg(what: &str, wait: Duration) -> ErrorMsg {
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
fn addr_failure(svc: &Service, src: SourcePrefix) {
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
fn aka_failure(svc: &Service, supi: &Supi, src: SourcePrefix) {
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

enum VectorError {
    Refuse(&'static str, ErrorMsg),
}

fn unknown() -> VectorError {
    VectorError::Refuse(
        "unknown_subscriber",
        ErrorMsg::new(ErrorCode::UnknownSubscriber, "unknown subscriber"),
    )
}

/// Checks `supi` is the right kind of subscriber for `conv` (reads only, so probing costs no
/// write).
async fn check_kind(svc: &Arc<Service>, supi: &Supi, conv: Conv) -> Result<(), VectorError> {
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
async fn vector(
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

/// Decrements the active-session gauge when a gateway session ends.
struct SessionGuard<'a>(&'a Service);
impl Drop for SessionGuard<'_> {
    fn drop(&mut self) {
        self.0.metrics.sessions.dec();
    }
}

async fn gateway_session(
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

async fn wait_closed(svc: &Service, conn: &quinn::Connection) {
    // Give the peer time to read the refusal, then close.
    let _ = tokio::time::timeout(
        Duration::from_secs(2).min(svc.exchange_timeout),
        conn.closed(),
    )
    .await;
    conn.close(0u32.into(), b"authentication failed");
}

/// Counts a batch in flight until dropped (shutdown drains these).
struct Inflight<'a>(&'a Service);
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

async fn operation(
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

fn convert_params(p: &companion_proto::msg::Params) -> Result<RequestedParams, String> {
    let dnns = p
        .dnns
        .iter()
        .flatten()
        .map(|d| Dnn::parse(d).map_err(|e| e.to_string()))
        .collect::<Result<Vec<_>, _>>()?;
    let max_bitrate_kbps = p
        .max_bitrate_kbps
        .map(|b| u32::try_from(b).unwrap_or(u32::MAX));
    Ok(RequestedParams {
        lifetime_s: p.lifetime_s,
        roaming: p.roaming,
        dnns,
        max_bitrate_kbps,
    })
}

fn item_result(
    request_id: companion_proto::RequestId,
    outcome: Outcome,
    reason: impl Into<String>,
) -> ItemResult {
    ItemResult {
        request_id,
        outcome,
        supi: None,
        expires_at: None,
        sealed: None,
        reason: Some(reason.into()),
        retry_after_ms: None,
    }
}

fn issued(
    request_id: companion_proto::RequestId,
    child: &ChildCredential,
    sealed: &[u8],
) -> ItemResult {
    match (
        companion_proto::Supi::new(child.supi.as_str()),
        sealed_to_wire(sealed),
    ) {
        (Ok(supi), Some(sealed)) => ItemResult {
            request_id,
            outcome: Outcome::Issued,
            supi: Some(supi),
            expires_at: Some(u64::try_from(child.expires_at.as_secs()).unwrap_or(0)),
            sealed: Some(sealed),
            reason: None,
            retry_after_ms: None,
        },
        _ => item_result(
            request_id,
            Outcome::RetryLater,
            "stored credential unreadable",
        ),
    }
}

/// Checks one item's key binding: the SPKI is the fingerprinted one, and the signature over
/// (kind, request ID, device ID, HPKE key) verifies under it. `Err` is the reason sent back with
/// outcome `invalid`.
fn check_binding(it: &companion_proto::msg::BatchItem) -> Result<(), String> {
    use companion_proto::binding::{BindingOp, binding_message};
    if companion_transport::spki_fingerprint(&it.device_spki) != it.device_key_fingerprint {
        return Err("device_spki does not match device_key_fingerprint".into());
    }
    let op = match it.kind {
        ItemKind::Provision => BindingOp::Provision,
        ItemKind::Renew => BindingOp::Renew,
        // Refused below with its own reason.
        ItemKind::Unknown(_) => return Ok(()),
    };
    let msg = binding_message(op, &it.request_id, &it.device_id, &it.hpke_public_key);
    companion_transport::verify_binding(&it.device_spki, &msg, &it.binding)
        .map_err(|e| format!("key binding refused: {e}"))
}

/// Checks one item's manufacturer attestation (PROTOCOL.md §4.5), if it carries a chain: it must
/// certify the item's (binding-checked) device key for its device ID under an installed root.
fn check_attestation(
    it: &companion_proto::msg::BatchItem,
    roots: &companion_transport::ManufacturerRoots,
) -> Attestation {
    let Some(chain) = &it.attestation else {
        return Attestation::Absent;
    };
    match companion_transport::verify_attestation(
        chain.certs(),
        &it.device_spki,
        it.device_id.as_str(),
        roots,
        companion_transport::attestation::UnixTime::now(),
    ) {
        Ok(root) => Attestation::Verified { root },
        Err(e) => Attestation::Failed(e.to_string()),
    }
}

/// The installed manufacturer roots; a stored root that is no longer a usable trust anchor is
/// skipped with a warning (it cannot attest anything).
fn load_roots(store: &dyn Store) -> Result<companion_transport::ManufacturerRoots, StoreError> {
    let mut roots = companion_transport::ManufacturerRoots::default();
    for r in store.manufacturer_roots()? {
        if let Err(e) = roots.add(&r.name, &r.cert_der) {
            warn!(root = %r.name, "manufacturer root skipped: {e}");
        }
    }
    Ok(roots)
}

/// One item's key-binding verdict (`Err`: the reason it is refused) and attestation.
type ItemCheck = (Result<(), String>, Attestation);

/// [`check_binding`], then (for a bound item) [`check_attestation`], for every item, in order,
/// split across the available cores (an ECDSA verification costs about as much as the HPKE seal
/// of the same item). The roots are read only when some item carries a chain.
fn check_items(
    store: &dyn Store,
    items: &[companion_proto::msg::BatchItem],
) -> Result<Vec<ItemCheck>, StoreError> {
    let roots = if items.iter().any(|it| it.attestation.is_some()) {
        load_roots(store)?
    } else {
        companion_transport::ManufacturerRoots::default()
    };
    Ok(crate::parallel::map_in_order(
        items,
        16,
        "cn-binding",
        |it| {
            let bound = check_binding(it);
            let attested = if bound.is_ok() {
                check_attestation(it, &roots)
            } else {
                Attestation::Absent
            };
            (bound, attested)
        },
        || (Err("key binding check failed".into()), Attestation::Absent),
    ))
}

async fn batch(
    svc: &Arc<Service>,
    req: &mut ServerRequest,
    b: BatchProvision,
    parent: &Supi,
) -> Result<(), ErrorMsg> {
    if svc.is_shutting_down() {
        return Err(ErrorMsg::retry_after(
            ErrorCode::Busy,
            "shutting down; retry on another session",
            1000,
        ));
    }
    svc.metrics.batch_size.observe(b.items.len() as f64);
    // Key binding (PROTOCOL.md §4.4): each item's signature must verify under the device key it
    // carries, and that key must be the one fingerprinted. Signature checks cost tens of
    // microseconds each, so a whole batch is checked on the blocking pool.
    let st = svc.store.clone();
    let (b, checked) = blocking(move || {
        let checked = check_items(&*st, &b.items)?;
        Ok((b, checked))
    })
    .await
    .map_err(|e| internal(&e))?;
    // Items the CN can judge without the store get their answer here; the rest go to one
    // transaction. `slots[i]` is the wire request id of item i and its answer if already known.
    let mut answers: Vec<Option<ItemResult>> = Vec::with_capacity(b.items.len());
    let mut items = Vec::new();
    let mut index = Vec::new();
    // A renewal's HPKE key is fresh per request (PROTOCOL.md §4.1): one key, one renewal.
    let mut renew_keys: HashSet<[u8; 32]> = HashSet::new();
    let refused = checked.iter().filter(|(b, _)| b.is_err()).count();
    if refused > 0 {
        // Once per batch: a gateway that substitutes keys is authenticated, and this names it.
        warn!(
            parent = %parent,
            refused,
            items = b.items.len(),
            "batch items refused: their key binding does not verify (a gateway substituting \
             HPKE or device keys, or replaying signatures)"
        );
    }
    for ((i, it), (bound, attestation)) in b.items.iter().enumerate().zip(checked) {
        let rid = it.request_id;
        if let Err(why) = bound {
            svc.metrics.binding_refused.inc();
            answers.push(Some(item_result(rid, Outcome::Invalid, why)));
            continue;
        }
        svc.metrics
            .attestation
            .with_label_values(&[match &attestation {
                Attestation::Verified { .. } => "verified",
                Attestation::Absent => "absent",
                Attestation::Failed(why) => {
                    debug!(device = %it.device_id, "attestation does not verify: {why}");
                    "failed"
                }
            }])
            .inc();
        let Ok(device_id) = DeviceId::parse(it.device_id.as_str()) else {
            answers.push(Some(item_result(rid, Outcome::Invalid, "bad device id")));
            continue;
        };
        let params = match convert_params(&it.params) {
            Ok(p) => p,
            Err(e) => {
                answers.push(Some(item_result(rid, Outcome::Invalid, e)));
                continue;
            }
        };
        let model_rid = RequestId(*rid.as_bytes());
        let item = match it.kind {
            ItemKind::Provision => BatchItem::Provision(ProvisionItem {
                device_id,
                device_key_fingerprint: KeyFingerprint(it.device_key_fingerprint),
                device_spki: it.device_spki.clone(),
                request_id: model_rid,
                recipient: it.hpke_public_key.to_vec(),
                params,
                attestation,
            }),
            ItemKind::Renew => {
                let Some(Ok(child)) = it.supi.as_ref().map(|s| Supi::parse(s.as_str())) else {
                    answers.push(Some(item_result(
                        rid,
                        Outcome::Invalid,
                        "renew needs the SUPI being renewed",
                    )));
                    continue;
                };
                if !renew_keys.insert(it.hpke_public_key) {
                    answers.push(Some(item_result(
                        rid,
                        Outcome::Invalid,
                        "HPKE key reused within the batch",
                    )));
                    continue;
                }
                BatchItem::Renew(RenewItem {
                    child,
                    device_id,
                    device_spki: it.device_spki.clone(),
                    request_id: model_rid,
                    recipient: it.hpke_public_key.to_vec(),
                    lifetime_s: params.lifetime_s,
                    attestation,
                })
            }
            ItemKind::Unknown(k) => {
                answers.push(Some(item_result(
                    rid,
                    Outcome::Invalid,
                    format!("unknown item kind {k}"),
                )));
                continue;
            }
        };
        answers.push(None);
        index.push(i);
        items.push(item);
    }
    if !items.is_empty() {
        let batch = Batch {
            parent: parent.clone(),
            actor: format!("gateway:{parent}"),
            now: now_ts(),
            items,
        };
        let st = svc.store.clone();
        let svc2 = svc.clone();
        let started = Instant::now();
        let outcomes =
            blocking(move || ops::issue_batch(&*st, &svc2.issuer, &batch, &svc2.sealer())).await;
        svc.metrics
            .commit_seconds
            .observe(started.elapsed().as_secs_f64());
        let outcomes = match outcomes {
            Ok(o) => o,
            Err(StoreError::ParentNotFound(_)) => {
                return Err(ErrorMsg::new(
                    ErrorCode::UnknownSubscriber,
                    "the subscription no longer exists",
                ));
            }
            Err(StoreError::ImsiRangeExhausted(r)) => {
                warn!("IMSI range {r} exhausted: extend imsi_count in cn-backend.toml");
                return Err(ErrorMsg::new(
                    ErrorCode::Internal,
                    "the operator's IMSI range is exhausted",
                ));
            }
            Err(e) => {
                warn!("batch transaction failed, nothing committed: {e}");
                return Err(internal(&e));
            }
        };
        if let Some(ItemOutcome::ParentInactive(s)) = outcomes.first() {
            return Err(ErrorMsg::new(
                ErrorCode::SubscriptionSuspended,
                format!("subscription is {s}"),
            ));
        }
        let mut rate_limited = false;
        for (o, i) in outcomes.iter().zip(index) {
            let rid = b.items[i].request_id;
            let r = match o {
                ItemOutcome::Issued { child, sealed } => {
                    svc.metrics.issued.inc();
                    issued(rid, child, sealed)
                }
                ItemOutcome::Renewed { child, sealed } => {
                    svc.metrics.renewed.inc();
                    issued(rid, child, sealed)
                }
                ItemOutcome::AlreadyIssued { child, sealed, .. } => {
                    svc.metrics.replayed.inc();
                    issued(rid, child, sealed)
                }
                ItemOutcome::QuotaExhausted { limit } => {
                    svc.metrics.quota_rejections.inc();
                    item_result(
                        rid,
                        Outcome::QuotaExhausted,
                        format!("quota of {limit} active credentials used up"),
                    )
                }
                ItemOutcome::RateLimited {
                    limit,
                    window_s,
                    retry_after_s,
                } => {
                    svc.metrics.allocation_rate_limited.inc();
                    rate_limited = true;
                    ItemResult {
                        retry_after_ms: Some(retry_after_s.saturating_mul(1000)),
                        ..item_result(
                            rid,
                            Outcome::RetryLater,
                            format!(
                                "{limit} new credentials within {window_s} s: the operator's \
                                 cap; retry in {retry_after_s} s"
                            ),
                        )
                    }
                }
                ItemOutcome::PolicyDenied(Denial::Expired(at)) => item_result(
                    rid,
                    Outcome::CredentialExpired,
                    format!("credential expired at {at}; provision a new one"),
                ),
                ItemOutcome::PolicyDenied(Denial::Revoked) => {
                    item_result(rid, Outcome::CredentialRevoked, "credential is revoked")
                }
                ItemOutcome::PolicyDenied(d) => {
                    svc.metrics.policy_rejections.inc();
                    item_result(rid, Outcome::PolicyDenied, d.to_string())
                }
                ItemOutcome::ParentInactive(s) => {
                    svc.metrics.policy_rejections.inc();
                    item_result(rid, Outcome::PolicyDenied, format!("subscription is {s}"))
                }
                ItemOutcome::Invalid(e) => {
                    svc.metrics.invalid_items.inc();
                    item_result(rid, Outcome::Invalid, e.to_string())
                }
                ItemOutcome::NotFound => item_result(
                    rid,
                    Outcome::NotFound,
                    "not a credential of this subscription",
                ),
            };
            if let Some(slot) = answers.get_mut(i) {
                *slot = Some(r);
            }
        }
        if rate_limited {
            warn!(
                %parent,
                limit = svc.issuer.operator.allocation_cap.max,
                window_s = svc.issuer.operator.allocation_cap.window_s,
                "new credentials refused: the parent reached the allocation cap"
            );
        }
    }
    let items: Vec<ItemResult> = answers.into_iter().flatten().collect();
    req.respond_batch(BatchResult {
        batch_id: b.batch_id,
        items,
    })
    .map_err(|_| ErrorMsg::new(ErrorCode::Internal, "internal error"))
}

async fn revoke(
    svc: &Arc<Service>,
    req: &mut ServerRequest,
    r: Revoke,
    parent: &Supi,
) -> Result<(), ErrorMsg> {
    let st = svc.store.clone();
    let p = parent.clone();
    let actor = format!("gateway:{parent}");
    let revoked = blocking(move || {
        let now = now_ts();
        let targets: Vec<Supi> = match (&r.supi, &r.device_id) {
            (Some(s), _) => match Supi::parse(s.as_str()) {
                Ok(s) => st
                    .child(&s)?
                    .filter(|c| c.parent == p)
                    .map(|c| vec![c.supi])
                    .unwrap_or_default(),
                Err(_) => Vec::new(),
            },
            (None, Some(d)) => st
                .children_of(&p)?
                .into_iter()
                .filter(|c| c.device_id.as_str() == d.as_str())
                .map(|c| c.supi)
                .collect(),
            (None, None) => Vec::new(),
        };
        let mut out = Vec::new();
        for t in targets {
            if ops::revoke_child(&*st, &t, &actor, now)? {
                out.push(t);
            }
        }
        Ok(out)
    })
    .await
    .map_err(|e| internal(&e))?;
    svc.metrics.revoked.inc_by(revoked.len() as u64);
    let revoked = revoked
        .iter()
        .filter_map(|s| companion_proto::Supi::new(s.as_str()).ok())
        .collect();
    req.respond_revoke(RevokeResult { revoked })
        .map_err(|_| ErrorMsg::new(ErrorCode::Internal, "internal error"))
}

async fn list(svc: &Arc<Service>, req: &mut ServerRequest, parent: &Supi) -> Result<(), ErrorMsg> {
    let st = svc.store.clone();
    let p = parent.clone();
    let children = blocking(move || st.children_of(&p))
        .await
        .map_err(|e| internal(&e))?;
    let now = now_ts();
    let children = children
        .iter()
        .filter_map(|c| {
            Some(Child {
                supi: companion_proto::Supi::new(c.supi.as_str()).ok()?,
                device_id: companion_proto::DeviceId::new(c.device_id.as_str()).ok()?,
                issued_at: u64::try_from(c.issued_at.as_secs()).ok()?,
                expires_at: u64::try_from(c.expires_at.as_secs()).ok()?,
                state: match crate::admin::child_state(c, now) {
                    "revoked" => ChildState::Revoked,
                    "expired" => ChildState::Expired,
                    _ => ChildState::Active,
                },
            })
        })
        .collect();
    req.respond_children(ChildList { children })
        .map_err(|_| ErrorMsg::new(ErrorCode::Internal, "internal error"))
}

async fn attach(
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
