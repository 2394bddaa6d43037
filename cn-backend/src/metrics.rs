//! Prometheus metrics of the service (prefix `cn_backend_`), served at `GET /metrics`.

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};

/// Every metric the service exports.
#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Registry,
    /// New child credentials issued.
    pub issued: IntCounter,
    /// Child credentials renewed.
    pub renewed: IntCounter,
    /// Retried requests answered from the idempotency ledger.
    pub replayed: IntCounter,
    /// Child credentials revoked through this process (gateway revoke, admin API).
    pub revoked: IntCounter,
    /// Batch items refused because the parent's quota was used up.
    pub quota_rejections: IntCounter,
    /// Batch items answered `retry_later` because the parent reached the operator's cap on new
    /// credentials per unit of time.
    pub allocation_rate_limited: IntCounter,
    /// Batch items refused by policy (DNN, expired renewal, inactive parent...).
    pub policy_rejections: IntCounter,
    /// Batch items that were invalid.
    pub invalid_items: IntCounter,
    /// Batch items whose key-binding signature did not verify (or whose key was not the one
    /// fingerprinted): a gateway that substitutes keys, or a broken device.
    pub binding_refused: IntCounter,
    /// Manufacturer attestations of batch items by result (`verified`, `absent`, `failed`).
    pub attestation: IntCounterVec,
    /// AKA outcomes by conversation (`cn`, `attach`) and result.
    pub aka: IntCounterVec,
    /// Attach outcomes by result.
    pub attach: IntCounterVec,
    /// Items per batch.
    pub batch_size: Histogram,
    /// Latency of one batch transaction (decide, seal, commit), seconds.
    pub commit_seconds: Histogram,
    /// Authenticated gateway sessions open now.
    pub sessions: IntGauge,
    /// Operation streams by operation (`batch`, `revoke`, `list`) and result (`ok`, error code).
    pub operations: IntCounterVec,
    /// QUIC connections open now (authenticated or not, handshakes included).
    pub connections: IntGauge,
    /// Connections refused before the handshake, by reason (`max_connections`,
    /// `per_address`, `shutting_down`).
    pub connections_refused: IntCounterVec,
    /// Sync outbox rows not yet acknowledged by the core's subscriber store.
    pub sync_backlog: IntGauge,
    /// Age of the oldest unacknowledged outbox row, seconds (0 when the outbox is empty).
    pub sync_oldest_age: IntGauge,
    /// 1 while this instance holds the fleet's pusher lease and pushes, else 0.
    pub sync_pusher_active: IntGauge,
    /// Pushes to the core's subscriber store by operation (`upsert`, `delete`) and result
    /// (`ok`, `error`).
    pub sync_pushes: IntCounterVec,
    /// Commit-to-acknowledgement time of a pushed change, seconds.
    pub sync_push_lag: Histogram,
}

fn counter(r: &Registry, name: &str, help: &str) -> Result<IntCounter, prometheus::Error> {
    let c = IntCounter::with_opts(Opts::new(name, help))?;
    r.register(Box::new(c.clone()))?;
    Ok(c)
}

fn counter_vec(
    r: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> Result<IntCounterVec, prometheus::Error> {
    let c = IntCounterVec::new(Opts::new(name, help), labels)?;
    r.register(Box::new(c.clone()))?;
    Ok(c)
}

fn histogram(
    r: &Registry,
    name: &str,
    help: &str,
    buckets: Vec<f64>,
) -> Result<Histogram, prometheus::Error> {
    let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))?;
    r.register(Box::new(h.clone()))?;
    Ok(h)
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Result<Self, prometheus::Error> {
        let r = Registry::new();
        Ok(Metrics {
            issued: counter(
                &r,
                "cn_backend_credentials_issued_total",
                "Child credentials newly issued (committed).",
            )?,
            renewed: counter(
                &r,
                "cn_backend_credentials_renewed_total",
                "Child credentials renewed (committed).",
            )?,
            replayed: counter(
                &r,
                "cn_backend_credentials_replayed_total",
                "Retried requests answered with the credential issued the first time.",
            )?,
            revoked: counter(
                &r,
                "cn_backend_credentials_revoked_total",
                "Child credentials revoked through this process (gateway revoke, admin API, parent suspend/revoke).",
            )?,
            quota_rejections: counter(
                &r,
                "cn_backend_quota_rejections_total",
                "Batch items refused because the parent subscription's quota is used up.",
            )?,
            allocation_rate_limited: counter(
                &r,
                "cn_backend_allocation_rate_limited_total",
                "Batch items answered retry_later: the parent subscription reached the \
                 operator's cap on new credentials (SUPIs) per window.",
            )?,
            policy_rejections: counter(
                &r,
                "cn_backend_policy_rejections_total",
                "Batch items refused by subscription policy.",
            )?,
            invalid_items: counter(
                &r,
                "cn_backend_invalid_items_total",
                "Batch items refused as invalid (bad key, reused request id, unknown kind).",
            )?,
            binding_refused: counter(
                &r,
                "cn_backend_binding_refused_total",
                "Batch items refused because the device's key-binding signature does not verify \
                 under the device key in the item (a gateway that substitutes HPKE or device \
                 keys, or replays a signature), or that key is not the fingerprinted one.",
            )?,
            attestation: counter_vec(
                &r,
                "cn_backend_attestation_total",
                "Batch items by manufacturer attestation result: verified (the chain certifies \
                 the device key for its ID under an installed root), absent, or failed. Items \
                 of parents that require attestation are refused unless verified.",
                &["result"],
            )?,
            aka: counter_vec(
                &r,
                "cn_backend_aka_outcomes_total",
                "AKA runs by conversation (cn = gateway session, attach = device) and result.",
                &["conversation", "result"],
            )?,
            attach: counter_vec(
                &r,
                "cn_backend_attach_outcomes_total",
                "Device attach decisions by result (accepted or the error code sent).",
                &["result"],
            )?,
            batch_size: histogram(
                &r,
                "cn_backend_batch_size",
                "Items per BatchProvision.",
                vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0],
            )?,
            commit_seconds: histogram(
                &r,
                "cn_backend_tx_commit_seconds",
                "Duration of one batch transaction (decide, seal, commit), seconds.",
                vec![
                    0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0,
                ],
            )?,
            sessions: {
                let g = IntGauge::with_opts(Opts::new(
                    "cn_backend_gateway_sessions_active",
                    "Authenticated gateway sessions currently open.",
                ))?;
                r.register(Box::new(g.clone()))?;
                g
            },
            operations: counter_vec(
                &r,
                "cn_backend_operations_total",
                "Gateway operation streams by operation and result (ok or the error code sent).",
                &["operation", "result"],
            )?,
            connections: {
                let g = IntGauge::with_opts(Opts::new(
                    "cn_backend_connections_open",
                    "QUIC connections currently open, authenticated or not (handshakes included).",
                ))?;
                r.register(Box::new(g.clone()))?;
                g
            },
            connections_refused: counter_vec(
                &r,
                "cn_backend_connections_refused_total",
                "QUIC connections refused at the first packet, by reason (max_connections, \
                 per_address: max_connections_per_address from one address, shutting_down).",
                &["reason"],
            )?,
            sync_backlog: {
                let g = IntGauge::with_opts(Opts::new(
                    "cn_backend_sync_outbox_backlog",
                    "Credential changes committed but not yet acknowledged by the 5G core's \
                     subscriber store ([sync.open5gs]).",
                ))?;
                r.register(Box::new(g.clone()))?;
                g
            },
            sync_oldest_age: {
                let g = IntGauge::with_opts(Opts::new(
                    "cn_backend_sync_outbox_oldest_age_seconds",
                    "Age of the oldest unacknowledged change in the sync outbox, seconds \
                     (0 when empty): how far the core's subscriber store lags behind.",
                ))?;
                r.register(Box::new(g.clone()))?;
                g
            },
            sync_pusher_active: {
                let g = IntGauge::with_opts(Opts::new(
                    "cn_backend_sync_pusher_active",
                    "1 while this instance holds the pusher lease and pushes to the 5G core's \
                     subscriber store (one instance of a fleet at a time), else 0.",
                ))?;
                r.register(Box::new(g.clone()))?;
                g
            },
            sync_pushes: counter_vec(
                &r,
                "cn_backend_sync_pushes_total",
                "Pushes to the 5G core's subscriber store by operation (upsert, delete) and \
                 result (ok, error).",
                &["operation", "result"],
            )?,
            sync_push_lag: histogram(
                &r,
                "cn_backend_sync_push_lag_seconds",
                "Time from the commit of a credential change to the core's acknowledgement.",
                vec![0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0],
            )?,
            registry: r,
        })
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        // Encoding into a Vec cannot fail for well-formed metrics; an empty page is the fallback.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}
