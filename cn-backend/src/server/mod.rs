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
//!
//! | module | what it owns |
//! |---|---|
//! | `accept` | the accept loop, connection caps, dispatch by ALPN |
//! | `aka` | the server side of AKA for both ALPNs: vectors, verification, lock-out |
//! | `session` | an authenticated gateway session and its operation streams |
//! | `operations` | batch, revoke and list for the session's parent |
//! | `attach` | device attach and the attach policy |
//!
//! This module keeps what they share: the limits before and after authentication, the
//! address key of the per-address cap, and the mapping of store errors onto protocol errors.

mod accept;
mod aka;
mod attach;
mod operations;
mod session;

pub use accept::run;

use std::net::IpAddr;

use companion_proto::Config;
use companion_proto::msg::{ErrorCode, ErrorMsg};
use companion_transport::{Limits, PreAuth};

use crate::model::Timestamp;
use crate::service::Service;
use crate::store::StoreError;

/// Runs `f` on the blocking pool (store calls); a panicking or cancelled task is an internal error.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(StoreError::Database(format!("store task failed: {e}"))))
}

/// The protocol error a peer gets for a store failure: `busy` (retry soon) when the database
/// is busy or unreachable, else `internal`.
fn internal(e: &StoreError) -> ErrorMsg {
    match e {
        StoreError::Busy => ErrorMsg::retry_after(ErrorCode::Busy, "database busy", 1000),
        StoreError::Unavailable(_) => {
            ErrorMsg::retry_after(ErrorCode::Busy, "database unavailable", 1000)
        }
        _ => ErrorMsg::retry_after(ErrorCode::Internal, "internal error", 2000),
    }
}

/// The proto machines' configuration: the service's exchange timeout.
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

fn now_ts() -> Timestamp {
    Timestamp::now()
}
