//! Prometheus metrics (`gatewayd_*`) and the small HTTP server that exposes them.
//!
//! `GET /metrics` answers the text exposition format; `GET /healthz` answers `200 ok` while the
//! daemon's health check passes and `503` with the reason otherwise.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::State as AxumState;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

use crate::control::CnLinkState;

/// Outcome labels of `gatewayd_requests_total`.
pub mod outcome {
    /// A credential was issued and delivered (or queued for delivery).
    pub const ISSUED: &str = "issued";
    /// The CN refused (quota, policy, revoked parent).
    pub const REFUSED: &str = "refused";
    /// The queue was full; the device was told to retry after N ms.
    pub const BUSY: &str = "busy";
    /// The CN was unreachable or slow; the device was told to retry later.
    pub const RETRY_LATER: &str = "retry_later";
    /// The device's request was malformed or not allowed (unpaired device ID, ...).
    pub const INVALID: &str = "invalid";
    /// Any other failure.
    pub const ERROR: &str = "error";
}

/// Kinds of `gatewayd_requests_total`.
pub mod kind {
    /// A first credential for a device.
    pub const PROVISION: &str = "provision";
    /// A renewal of a credential the device holds.
    pub const RENEW: &str = "renew";
}

/// Every metric the daemon exports, registered in one registry.
#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Registry,
    /// Paired devices.
    pub devices_paired: IntGauge,
    /// Credential requests by kind and outcome.
    pub requests: IntCounterVec,
    /// Seconds from a device's request arriving to its credential being sent back, by kind.
    pub request_latency: HistogramVec,
    /// Requests per batch sent to the CN.
    pub batch_size: Histogram,
    /// Requests waiting in the batcher's queue.
    pub queue_depth: IntGauge,
    /// CN link: 0 down, 1 connecting, 2 up, -1 not configured.
    pub cn_link_state: IntGauge,
    /// Open device QUIC connections.
    pub active_connections: IntGauge,
    /// Device handshakes in progress (`[devices] max_handshakes` at most).
    pub handshakes_in_progress: IntGauge,
    /// Device connections waiting for a handshake slot.
    pub handshakes_waiting: IntGauge,
    /// Device connections that had to wait for a handshake slot.
    pub handshakes_queued: prometheus::IntCounter,
    /// Device connections that waited too long for a handshake slot and were dropped.
    pub handshake_wait_expired: prometheus::IntCounter,
    /// Sealed credentials waiting for their device's acknowledgement.
    pub deliveries_pending: IntGauge,
    /// Credentials held by paired devices that expire within 24 hours.
    pub credentials_expiring_24h: IntGauge,
    /// 1 for the mode the LAN filter runs in (xdp, xdp_generic, tc, userspace), 0 for the others.
    pub filter_mode: IntGaugeVec,
    /// Packets to the QUIC port judged by the LAN filter, by reason.
    pub filter_packets: IntCounterVec,
    /// Learned paired-device addresses evicted from the full paired-source map.
    pub filter_paired_evictions: prometheus::IntCounter,
    /// Paired-source map updates the kernel refused.
    pub filter_paired_sync_failures: prometheus::IntCounter,
    /// CN sessions lost, by why ([`link_loss`]).
    pub cn_link_losses: IntCounterVec,
    /// Authenticated CN sessions, by endpoint (`[cn] endpoints`).
    pub cn_sessions: IntGaugeVec,
    /// Whether an endpoint is usable (1) or waiting out its backoff after a failure (0).
    pub cn_endpoint_up: IntGaugeVec,
    /// Failed connection attempts and lost sessions, by endpoint.
    pub cn_endpoint_failures: IntCounterVec,
    /// Batches sent again on another session after theirs was lost, same request IDs.
    pub batches_resent: prometheus::IntCounter,
    /// Device exchanges the device abandoned before the gateway answered, by why ([`giveup`]).
    pub device_giveups: IntCounterVec,
    /// `Pending` messages sent to devices.
    pub pendings_sent: prometheus::IntCounter,
    /// Device requests refused because their key-binding signature did not verify.
    pub binding_refused: prometheus::IntCounter,
    /// Child credentials revoked at the CN because no device will use them: issued for a device
    /// revoked or unpaired meanwhile, or reported `credential_unusable`.
    pub orphans_revoked: prometheus::IntCounter,
    /// QUIC Retry packets sent to unvalidated source addresses.
    pub retries_sent: prometheus::IntCounter,
    /// Failed device handshakes, by whether the source address was validated
    /// ([`address`]; only validated ones count towards automatic blocks).
    pub handshake_failures: IntCounterVec,
    /// Entries in each per-source-address table ([`table`]).
    pub address_table_entries: IntGaugeVec,
    /// Entries evicted from a full per-source-address table ([`table`]).
    pub address_table_evictions: IntCounterVec,
}

/// Labels of `gatewayd_device_handshake_failures_total`.
pub mod address {
    /// The client proved it receives packets at its address (Retry token, or a failure after
    /// the handshake completed): counted towards an automatic block.
    pub const VALIDATED: &str = "validated";
    /// The source address may be forged: not counted.
    pub const UNVALIDATED: &str = "unvalidated";
    /// Every value of the label.
    pub const ALL: [&str; 2] = [VALIDATED, UNVALIDATED];
}

/// Tables of `gatewayd_address_table_entries` / `gatewayd_address_table_evictions_total`.
pub mod table {
    /// The userspace filter's Initial token buckets.
    pub const FILTER_BUCKETS: &str = "filter_buckets";
    /// The userspace filter's deny list (blocks in force).
    pub const FILTER_DENY: &str = "filter_deny";
    /// Failed-handshake counters towards automatic blocks.
    pub const HANDSHAKE_FAILURES: &str = "handshake_failures";
    /// The device server's per-address connection rate.
    pub const CONNECTION_RATE: &str = "connection_rate";
    /// Addresses that recently failed a handshake (always sent a Retry, `retry = "under_load"`).
    pub const RETRY_SUSPECTS: &str = "retry_suspects";
    /// Stored blocks (an automatic block evicts the one ending soonest when the deny list is full).
    pub const BLOCKS: &str = "blocks";
    /// Every value of the label.
    pub const ALL: [&str; 6] = [
        FILTER_BUCKETS,
        FILTER_DENY,
        HANDSHAKE_FAILURES,
        CONNECTION_RATE,
        RETRY_SUSPECTS,
        BLOCKS,
    ];
}

/// Reasons of `gatewayd_cn_link_losses_total`.
pub mod link_loss {
    /// The CN answered with a stateless reset: it restarted and forgot the connection.
    pub const RESET: &str = "reset";
    /// Nothing came back from the CN within the liveness timeout (dead, frozen or cut off).
    pub const IDLE_TIMEOUT: &str = "idle_timeout";
    /// The CN closed the connection (shutdown, or it refused something).
    pub const CLOSED_BY_CN: &str = "closed_by_cn";
    /// A QUIC or TLS protocol error.
    pub const TRANSPORT_ERROR: &str = "transport_error";
    /// Closed by this gateway (a batch answered too late, shutdown).
    pub const LOCAL: &str = "local";
    /// Every reason, for pre-created series.
    pub const ALL: [&str; 5] = [RESET, IDLE_TIMEOUT, CLOSED_BY_CN, TRANSPORT_ERROR, LOCAL];

    /// The reason label of a lost connection.
    pub fn of(e: &quinn::ConnectionError) -> &'static str {
        use quinn::ConnectionError as C;
        match e {
            C::Reset => RESET,
            C::TimedOut => IDLE_TIMEOUT,
            C::ApplicationClosed(_) => CLOSED_BY_CN,
            C::LocallyClosed => LOCAL,
            C::ConnectionClosed(_)
            | C::TransportError(_)
            | C::VersionMismatch
            | C::CidsExhausted => TRANSPORT_ERROR,
        }
    }
}

/// Reasons of `gatewayd_device_giveups_total`.
pub mod giveup {
    /// The device sent `Error(timeout)`: its deadline passed before an answer or a `Pending`.
    pub const TIMEOUT: &str = "timeout";
    /// The device sent another `Error` while waiting.
    pub const ERROR: &str = "error";
    /// The device reset its stream or its connection ended while waiting.
    pub const DISCONNECTED: &str = "disconnected";
    /// Every reason, for pre-created series.
    pub const ALL: [&str; 3] = [TIMEOUT, ERROR, DISCONNECTED];
}

fn opts(name: &str, help: &str) -> Opts {
    Opts::new(name, help).namespace("gatewayd")
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let devices_paired = IntGauge::with_opts(opts(
            "devices_paired",
            "Number of devices paired with this gateway.",
        ))?;
        let requests = IntCounterVec::new(
            opts(
                "requests_total",
                "Credential requests from devices, by kind (provision, renew) and outcome \
                 (issued, refused, busy, retry_later, invalid, error).",
            ),
            &["kind", "outcome"],
        )?;
        let request_latency = HistogramVec::new(
            HistogramOpts::from(opts(
                "request_duration_seconds",
                "End-to-end time from a device's credential request to the sealed credential \
                 being sent back to it, by kind.",
            ))
            .buckets(vec![
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ]),
            &["kind"],
        )?;
        let batch_size = Histogram::with_opts(
            HistogramOpts::from(opts(
                "batch_size",
                "Number of requests in each batch sent to the core network.",
            ))
            .buckets(vec![
                1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0,
            ]),
        )?;
        let queue_depth = IntGauge::with_opts(opts(
            "queue_depth",
            "Credential requests waiting in the batching queue.",
        ))?;
        let cn_link_state = IntGauge::with_opts(opts(
            "cn_link_state",
            "State of the link to the core network: 2 up (authenticated), 1 connecting, 0 down, \
             -1 not configured.",
        ))?;
        let active_connections = IntGauge::with_opts(opts(
            "active_quic_connections",
            "Open QUIC connections from devices.",
        ))?;
        let handshakes_in_progress = IntGauge::with_opts(opts(
            "device_handshakes_in_progress",
            "Device TLS handshakes being worked on ([devices] max_handshakes at most).",
        ))?;
        let handshakes_waiting = IntGauge::with_opts(opts(
            "device_handshakes_waiting",
            "Device connections (validated addresses) waiting for a handshake slot.",
        ))?;
        let handshakes_queued = prometheus::IntCounter::with_opts(opts(
            "device_handshakes_queued_total",
            "Device connections that found every handshake slot taken and waited for one.",
        ))?;
        let handshake_wait_expired = prometheus::IntCounter::with_opts(opts(
            "device_handshake_wait_expired_total",
            "Device connections dropped after waiting 10 s for a handshake slot (the device \
             retries): sustained overload.",
        ))?;
        let deliveries_pending = IntGauge::with_opts(opts(
            "deliveries_pending",
            "Sealed credentials kept until their device acknowledges them.",
        ))?;
        let credentials_expiring_24h = IntGauge::with_opts(opts(
            "credentials_expiring_24h",
            "Credentials held by paired devices that expire within the next 24 hours.",
        ))?;
        let filter_mode = IntGaugeVec::new(
            opts(
                "filter_mode",
                "Where the LAN filter runs: 1 for the active mode (xdp, xdp_generic, tc, \
                 userspace), 0 for the others.",
            ),
            &["mode"],
        )?;
        let filter_packets = IntCounterVec::new(
            opts(
                "filter_packets_total",
                "UDP packets to the device QUIC port judged by the LAN filter, by reason \
                 (passed, dropped_short_initial, rate_limited, denied, not_paired, \
                 dropped_unparsed: headers the filter cannot walk, dropped_fragment: IP \
                 fragments).",
            ),
            &["reason"],
        )?;
        for r in companion_filter_common::Reason::ALL {
            filter_packets.with_label_values(&[r.label()]);
        }
        let filter_paired_evictions = prometheus::IntCounter::with_opts(opts(
            "filter_paired_evictions_total",
            "Learned paired-device source addresses evicted (least recently seen first) to keep \
             the LAN filter's paired-source map within its capacity; in strict mode such a \
             device needs a pairing window or [filter] allowed_sources to be admitted again.",
        ))?;
        let filter_paired_sync_failures = prometheus::IntCounter::with_opts(opts(
            "filter_paired_sync_failures_total",
            "Updates of the eBPF paired-source map the kernel refused (the source is then \
             judged as before the update).",
        ))?;
        let cn_link_losses = IntCounterVec::new(
            opts(
                "cn_link_losses_total",
                "CN sessions lost, by reason (reset: the CN restarted and answered with a \
                 stateless reset; idle_timeout: nothing came back within the liveness timeout; \
                 closed_by_cn; transport_error; local).",
            ),
            &["reason"],
        )?;
        for r in link_loss::ALL {
            cn_link_losses.with_label_values(&[r]);
        }
        let cn_sessions = IntGaugeVec::new(
            opts(
                "cn_sessions",
                "Authenticated CN sessions, by CN endpoint ([cn] endpoints).",
            ),
            &["endpoint"],
        )?;
        let cn_endpoint_up = IntGaugeVec::new(
            opts(
                "cn_endpoint_up",
                "1 while a CN endpoint may be used, 0 while it waits out its backoff after a \
                 failed attempt or a lost session.",
            ),
            &["endpoint"],
        )?;
        let cn_endpoint_failures = IntCounterVec::new(
            opts(
                "cn_endpoint_failures_total",
                "Failed connection attempts and lost sessions, by CN endpoint.",
            ),
            &["endpoint"],
        )?;
        let batches_resent = prometheus::IntCounter::with_opts(opts(
            "batches_resent_total",
            "Batches whose CN session was lost, sent again on another session with the same \
             request IDs (the CN answers them idempotently).",
        ))?;
        let device_giveups = IntCounterVec::new(
            opts(
                "device_giveups_total",
                "Device exchanges abandoned by the device before the gateway answered, by \
                 reason (timeout: the device's deadline passed; error; disconnected).",
            ),
            &["reason"],
        )?;
        for r in giveup::ALL {
            device_giveups.with_label_values(&[r]);
        }
        let pendings_sent = prometheus::IntCounter::with_opts(opts(
            "pendings_sent_total",
            "Pending messages sent to devices waiting for a batch or for the CN.",
        ))?;
        let binding_refused = prometheus::IntCounter::with_opts(opts(
            "binding_refused_total",
            "Device requests refused because their key-binding signature (PROTOCOL.md §4.4) \
             does not verify under the paired key: a broken or foreign device implementation.",
        ))?;
        registry.register(Box::new(binding_refused.clone()))?;
        let orphans_revoked = prometheus::IntCounter::with_opts(opts(
            "orphan_credentials_revoked_total",
            "Child credentials revoked at the CN because no device will use them: issued for a \
             device revoked or unpaired while its request was at the CN, or a new credential \
             the device reported credential_unusable (its quota slot is freed).",
        ))?;
        registry.register(Box::new(orphans_revoked.clone()))?;
        let retries_sent = prometheus::IntCounter::with_opts(opts(
            "quic_retries_sent_total",
            "QUIC Retry packets sent to device source addresses not yet validated ([devices] retry).",
        ))?;
        let handshake_failures = IntCounterVec::new(
            opts(
                "device_handshake_failures_total",
                "Failed or refused device handshakes, by address (validated: counted towards an \
                 automatic block; unvalidated: the source may be forged, not counted).",
            ),
            &["address"],
        )?;
        for a in address::ALL {
            handshake_failures.with_label_values(&[a]);
        }
        let address_table_entries = IntGaugeVec::new(
            opts(
                "address_table_entries",
                "Entries in each per-source-address table (filter_buckets, filter_deny, \
                 handshake_failures, connection_rate, retry_suspects, blocks); each is bounded \
                 by [filter] max_tracked_sources (the deny list and blocks by 16384).",
            ),
            &["table"],
        )?;
        let address_table_evictions = IntCounterVec::new(
            opts(
                "address_table_evictions_total",
                "Entries evicted from a full per-source-address table, by table: a flood of \
                 distinct source addresses (or a table sized too small).",
            ),
            &["table"],
        )?;
        for t in table::ALL {
            address_table_entries.with_label_values(&[t]);
            address_table_evictions.with_label_values(&[t]);
        }
        registry.register(Box::new(retries_sent.clone()))?;
        registry.register(Box::new(handshake_failures.clone()))?;
        registry.register(Box::new(address_table_entries.clone()))?;
        registry.register(Box::new(address_table_evictions.clone()))?;
        registry.register(Box::new(cn_link_losses.clone()))?;
        registry.register(Box::new(cn_sessions.clone()))?;
        registry.register(Box::new(cn_endpoint_up.clone()))?;
        registry.register(Box::new(cn_endpoint_failures.clone()))?;
        registry.register(Box::new(batches_resent.clone()))?;
        registry.register(Box::new(device_giveups.clone()))?;
        registry.register(Box::new(pendings_sent.clone()))?;
        registry.register(Box::new(filter_mode.clone()))?;
        registry.register(Box::new(filter_packets.clone()))?;
        registry.register(Box::new(filter_paired_evictions.clone()))?;
        registry.register(Box::new(filter_paired_sync_failures.clone()))?;
        registry.register(Box::new(devices_paired.clone()))?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(request_latency.clone()))?;
        registry.register(Box::new(batch_size.clone()))?;
        registry.register(Box::new(queue_depth.clone()))?;
        registry.register(Box::new(cn_link_state.clone()))?;
        registry.register(Box::new(active_connections.clone()))?;
        registry.register(Box::new(handshakes_in_progress.clone()))?;
        registry.register(Box::new(handshakes_waiting.clone()))?;
        registry.register(Box::new(handshakes_queued.clone()))?;
        registry.register(Box::new(handshake_wait_expired.clone()))?;
        registry.register(Box::new(deliveries_pending.clone()))?;
        registry.register(Box::new(credentials_expiring_24h.clone()))?;
        // Pre-create the common series so dashboards see zeros instead of gaps.
        for k in [kind::PROVISION, kind::RENEW] {
            for o in [
                outcome::ISSUED,
                outcome::REFUSED,
                outcome::BUSY,
                outcome::RETRY_LATER,
                outcome::INVALID,
                outcome::ERROR,
            ] {
                requests.with_label_values(&[k, o]);
            }
            request_latency.with_label_values(&[k]);
        }
        cn_link_state.set(-1);
        Ok(Self {
            registry,
            devices_paired,
            requests,
            request_latency,
            batch_size,
            queue_depth,
            cn_link_state,
            active_connections,
            handshakes_in_progress,
            handshakes_waiting,
            handshakes_queued,
            handshake_wait_expired,
            deliveries_pending,
            credentials_expiring_24h,
            filter_mode,
            filter_packets,
            filter_paired_evictions,
            filter_paired_sync_failures,
            cn_link_losses,
            cn_sessions,
            cn_endpoint_up,
            cn_endpoint_failures,
            batches_resent,
            device_giveups,
            pendings_sent,
            binding_refused,
            orphans_revoked,
            retries_sent,
            handshake_failures,
            address_table_entries,
            address_table_evictions,
        })
    }

    /// The registry, to add more collectors.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Records a per-address table's size and how many entries it just evicted.
    pub fn address_table(&self, table: &str, entries: usize, evicted: usize) {
        self.address_table_entries
            .with_label_values(&[table])
            .set(i64::try_from(entries).unwrap_or(i64::MAX));
        if evicted > 0 {
            self.address_table_evictions
                .with_label_values(&[table])
                .inc_by(evicted as u64);
        }
    }

    /// Counts one request outcome.
    pub fn count_request(&self, kind: &str, outcome: &str) {
        self.requests.with_label_values(&[kind, outcome]).inc();
    }

    /// Sets the CN link gauge.
    pub fn set_cn_link(&self, s: CnLinkState) {
        self.cn_link_state.set(match s {
            CnLinkState::NotConfigured => -1,
            CnLinkState::Down => 0,
            CnLinkState::Connecting => 1,
            CnLinkState::Up => 2,
        });
    }

    /// Creates the per-endpoint series (0 sessions, usable, no failure) so they exist before
    /// the first connection.
    pub fn init_cn_endpoints(&self, endpoints: &[String]) {
        for e in endpoints {
            self.cn_sessions.with_label_values(&[e]).set(0);
            self.cn_endpoint_up.with_label_values(&[e]).set(1);
            self.cn_endpoint_failures.with_label_values(&[e]);
        }
    }

    /// Everything in the text exposition format.
    pub fn render(&self) -> Result<String, prometheus::Error> {
        let mut buf = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut buf)?;
        String::from_utf8(buf).map_err(|e| prometheus::Error::Msg(e.to_string()))
    }
}

/// The daemon's health for `/healthz`: `Ok(())`, or why it is unhealthy.
pub type HealthCheck = Arc<dyn Fn() -> Result<(), String> + Send + Sync>;

#[derive(Clone)]
struct HttpState {
    metrics: Arc<Metrics>,
    health: HealthCheck,
}

async fn metrics_handler(AxumState(s): AxumState<HttpState>) -> Response {
    match s.metrics.render() {
        Ok(body) => ([(header::CONTENT_TYPE, prometheus::TEXT_FORMAT)], body).into_response(),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot encode metrics: {e}\n"),
        )
            .into_response(),
    }
}

async fn health_handler(AxumState(s): AxumState<HttpState>) -> Response {
    match (s.health)() {
        Ok(()) => (StatusCode::OK, "ok\n").into_response(),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")).into_response(),
    }
}

/// The HTTP routes (`/metrics`, `/healthz`).
pub fn router(metrics: Arc<Metrics>, health: HealthCheck) -> Router {
    Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(health_handler))
        .with_state(HttpState { metrics, health })
}

/// Binds the metrics listener (so a busy port is reported at start-up, not later).
pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await
}

/// Serves `/metrics` and `/healthz` on `listener` until `shutdown` completes.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    health: HealthCheck,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(metrics, health))
        .with_graceful_shutdown(shutdown)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        let status = out
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap();
        let body = out
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        (status, body)
    }

    #[tokio::test]
    async fn serves_metrics_and_health_over_http() {
        let m = Arc::new(Metrics::new().unwrap());
        m.devices_paired.set(3);
        m.count_request(kind::PROVISION, outcome::ISSUED);
        m.batch_size.observe(17.0);
        m.request_latency
            .with_label_values(&[kind::PROVISION])
            .observe(0.004);
        m.set_cn_link(CnLinkState::Up);
        let healthy = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let h = healthy.clone();
        let health: HealthCheck = Arc::new(move || {
            if h.load(std::sync::atomic::Ordering::SeqCst) {
                Ok(())
            } else {
                Err("database unavailable".into())
            }
        });
        let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(listener, m.clone(), health, async {
            let _ = rx.await;
        }));

        let (status, body) = get(addr, "/metrics").await;
        assert_eq!(status, 200);
        for needle in [
            "# HELP gatewayd_devices_paired ",
            "gatewayd_devices_paired 3",
            "gatewayd_requests_total{kind=\"provision\",outcome=\"issued\"} 1",
            "gatewayd_requests_total{kind=\"renew\",outcome=\"busy\"} 0",
            "gatewayd_request_duration_seconds_bucket{kind=\"provision\",le=\"0.005\"} 1",
            "gatewayd_batch_size_count 1",
            "gatewayd_queue_depth 0",
            "gatewayd_cn_link_state 2",
            "gatewayd_active_quic_connections 0",
            "gatewayd_deliveries_pending 0",
            "gatewayd_credentials_expiring_24h 0",
        ] {
            assert!(body.contains(needle), "missing {needle:?} in:\n{body}");
        }
        assert_eq!(get(addr, "/healthz").await, (200, "ok\n".into()));
        healthy.store(false, std::sync::atomic::Ordering::SeqCst);
        assert_eq!(
            get(addr, "/healthz").await,
            (503, "database unavailable\n".into())
        );
        assert_eq!(get(addr, "/nope").await.0, 404);

        tx.send(()).unwrap();
        server.await.unwrap().unwrap();
    }
}
