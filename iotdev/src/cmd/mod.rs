//! The subcommands of the `iotdev` command line, one module each (`main.rs` parses the
//! arguments and maps failures to the exit status), and what several of them share: resolving
//! the gateway, a QUIC endpoint, the client options and the clock.

pub(crate) mod attach;
pub(crate) mod credential;
pub(crate) mod setup;
pub(crate) mod show;

use std::net::SocketAddr;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, anyhow};
use iotdev::client::ClientOptions;

use crate::{Failure, GatewayArgs};

/// The gateway's address: `host:port` parsed, or resolved (IPv4 first).
pub(crate) async fn resolve(addr: &str) -> Result<SocketAddr, Failure> {
    if let Ok(a) = addr.parse::<SocketAddr>() {
        return Ok(a);
    }
    let mut addrs: Vec<SocketAddr> = tokio::net::lookup_host(addr)
        .await
        .with_context(|| format!("`{addr}` is not a host:port address that resolves"))?
        .collect();
    addrs.sort_by_key(|a| !a.is_ipv4());
    addrs
        .first()
        .copied()
        .ok_or_else(|| anyhow!("`{addr}` resolves to no address").into())
}

/// A client QUIC endpoint on an ephemeral port of `peer`'s address family.
pub(crate) fn endpoint_for(peer: SocketAddr) -> Result<quinn::Endpoint, Failure> {
    let bind: SocketAddr = if peer.is_ipv4() {
        SocketAddr::from(([0, 0, 0, 0], 0))
    } else {
        SocketAddr::from(([0u16; 8], 0))
    };
    quinn::Endpoint::client(bind)
        .context("opening a UDP socket for QUIC")
        .map_err(Failure::from)
}

/// The client options for the `--gateway` arguments (`--timeout` is the patience).
pub(crate) fn client_options(gw: &GatewayArgs) -> ClientOptions {
    let d = ClientOptions::default();
    ClientOptions {
        patience: gw.timeout,
        connect_timeout: d.connect_timeout.min(gw.timeout),
        window_code: gw.window_code.clone(),
        ..d
    }
}

/// Now, Unix seconds.
pub(crate) fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
