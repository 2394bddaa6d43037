//! Where the CN is and how to reach it: the configured endpoints, the shared trust anchors and
//! serving network name, the QUIC client endpoints, and one connection attempt.

use companion_crypto::usim::Usim;
use companion_transport::cn_client::{ClientOptions, CnClientError, CnSession, CnTarget};
use rustls::pki_types::CertificateDer;

/// One CN endpoint: its configured `host:port` and the TLS name its certificate must carry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CnEndpoint {
    /// `host:port` as configured (resolved at each attempt).
    pub label: String,
    /// The DNS name the CN's certificate must carry.
    pub server_name: String,
}

/// What every endpoint shares: the operator CA and the serving network name.
#[derive(Debug, Clone)]
pub struct CnTargets {
    /// The configured endpoints, in order of preference.
    pub endpoints: Vec<CnEndpoint>,
    /// The operator CA certificates the CN's chain must lead to.
    pub trust_anchors: Vec<CertificateDer<'static>>,
    /// The serving network name bound into RES* (TS 33.501 §6.1.1.4).
    pub serving_network_name: String,
}

impl CnTargets {
    /// Resolves endpoint `i` (at each attempt, so DNS changes are followed).
    async fn resolve(&self, i: usize) -> Result<CnTarget, String> {
        let e = &self.endpoints[i];
        let mut addrs = tokio::net::lookup_host(e.label.as_str())
            .await
            .map_err(|err| format!("cannot resolve {}: {err}", e.label))?;
        let addr = addrs
            .next()
            .ok_or_else(|| format!("{} resolves to no address", e.label))?;
        Ok(CnTarget {
            addr,
            server_name: e.server_name.clone(),
            trust_anchors: self.trust_anchors.clone(),
            serving_network_name: self.serving_network_name.clone(),
        })
    }
}

/// The gateway's QUIC client endpoints towards the CN, one per address family.
#[derive(Debug, Clone)]
pub struct CnClients {
    /// The IPv4 client endpoint, if one could be bound.
    pub v4: Option<quinn::Endpoint>,
    /// The IPv6 client endpoint, if the host has IPv6.
    pub v6: Option<quinn::Endpoint>,
}

impl CnClients {
    /// Binds an IPv4 and (where the host has IPv6) an IPv6 client endpoint.
    pub fn bind() -> std::io::Result<Self> {
        let v4 = quinn::Endpoint::client(std::net::SocketAddr::from(([0, 0, 0, 0], 0)));
        let v6 = quinn::Endpoint::client(std::net::SocketAddr::from((
            std::net::Ipv6Addr::UNSPECIFIED,
            0,
        )));
        match (v4, v6) {
            (Err(e), Err(_)) => Err(e),
            (v4, v6) => Ok(Self {
                v4: v4.ok(),
                v6: v6.ok(),
            }),
        }
    }

    fn for_addr(&self, addr: &std::net::SocketAddr) -> Option<&quinn::Endpoint> {
        if addr.is_ipv4() {
            self.v4.as_ref()
        } else {
            self.v6.as_ref()
        }
    }

    /// Closes both endpoints (shutdown).
    pub fn close(&self) {
        for e in [&self.v4, &self.v6].into_iter().flatten() {
            e.close(0u32.into(), b"gatewayd stopping");
        }
    }
}

/// A QUIC handshake with `target` (TLS verified, no AKA), closed at once: whether the endpoint
/// answers at all.
pub(super) async fn reachable(
    client: &quinn::Endpoint,
    target: &CnTarget,
    opts: &ClientOptions,
) -> Result<(), String> {
    let cfg = companion_transport::quic::client_config(
        companion_transport::quic::ServerTrust::Anchors(target.trust_anchors.clone()),
        None,
        companion_transport::ALPN_CN,
        &companion_transport::quic::Limits::cn_link_client(),
    )
    .map_err(|e| e.to_string())?;
    let connecting = client
        .connect_with(cfg, target.addr, &target.server_name)
        .map_err(|e| e.to_string())?;
    match tokio::time::timeout(opts.connect_timeout, connecting).await {
        Ok(Ok(conn)) => {
            conn.close(0u32.into(), b"reachability probe");
            Ok(())
        }
        Ok(Err(e)) => Err(format!("connection to the CN failed: {e}")),
        Err(_) => Err(format!(
            "QUIC handshake with {} did not complete within {:?}",
            target.addr, opts.connect_timeout
        )),
    }
}

/// One connection attempt to endpoint `ep`: resolve, connect, authenticate. The error carries
/// whether the CN answered with a stateless reset (it restarted during the attempt).
///
/// The companion USIM is locked for the whole attempt (two AKA runs never interleave), so an
/// attempt stuck on a dead endpoint would hold every other slot back for the connect timeout.
/// An endpoint that failed before (`suspect`: retried after its backoff, or probed to move a
/// session back) is therefore first checked with a bare handshake, without the lock.
pub(super) async fn connect_endpoint(
    clients: &CnClients,
    targets: &CnTargets,
    usim: &tokio::sync::Mutex<Box<dyn Usim>>,
    ep: usize,
    suspect: bool,
    opts: ClientOptions,
) -> Result<(CnSession, companion_proto::msg::AuthResult), (String, bool)> {
    let target = targets.resolve(ep).await.map_err(|e| (e, false))?;
    let Some(client) = clients.for_addr(&target.addr) else {
        return Err((
            format!("no local socket for the address family of {}", target.addr),
            false,
        ));
    };
    if suspect {
        reachable(client, &target, &opts)
            .await
            .map_err(|e| (e, false))?;
    }
    let mut usim = usim.lock().await;
    CnSession::connect_with(client, &target, usim.as_mut(), opts)
        .await
        .map_err(|e| {
            let reset = matches!(e, CnClientError::Connection(quinn::ConnectionError::Reset));
            (e.to_string(), reset)
        })
}
