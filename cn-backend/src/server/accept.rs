//! The accept loop: connection caps (in total and per address or IPv6 /64) taken before a
//! connection's task is spawned, the handshake, and the first stream handed to a gateway session
//! or a device attach by ALPN.

use std::net::IpAddr;
use std::sync::Arc;

use companion_crypto::binding::EXPORTER_LABEL;
use companion_transport::drive::StreamDriver;
use companion_transport::{ALPN_ATTACH, ALPN_CN, negotiated_alpn, tls_exporter};
use tracing::{debug, warn};

use crate::service::Service;

use super::attach::attach;
use super::session::gateway_session;
use super::{AKA_READ_BUDGET, address_key};

/// One connection's place in [`Service::connections`], taken in the accept loop before the
/// connection's task is spawned (so a burst of connections cannot overshoot the caps), and
/// given back when dropped, however the connection ends.
pub(super) struct Slot {
    svc: Arc<Service>,
    key: IpAddr,
}

/// Why a connection was refused at its first packet (the metric's label).
#[derive(Debug, Clone, Copy)]
pub(super) enum Refusal {
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

pub(super) async fn handle_connection(svc: &Arc<Service>, conn: quinn::Connection) {
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
