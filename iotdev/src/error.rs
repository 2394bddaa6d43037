//! Every failure a device owner (or a firmware's caller) can meet.

use std::time::Duration;

use companion_proto::msg::{ErrorCode, ErrorMsg};

/// Why a provisioning or renewal did not complete. Messages never contain key material.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// The gateway does not know this device's key (refused in the TLS handshake) or the device
    /// ID does not match the pairing.
    #[error(
        "the gateway refused this device: it is not paired (pair it with `gatewayctl pair '<code>'` \
         or open a pairing window with `gatewayctl pair --window`){}",
        detail(.0)
    )]
    NotPaired(String),
    /// The owner's subscription has no room for another device credential.
    #[error(
        "the subscription allows no further device credential (quota exhausted): revoke another \
         device or ask the operator to raise the limit{}",
        detail(.0)
    )]
    QuotaExhausted(String),
    /// The requested parameters are not allowed by the operator or the gateway.
    #[error("the operator refused the requested parameters (policy denied){}", detail(.0))]
    PolicyDenied(String),
    /// The gateway is overloaded.
    #[error("the gateway is busy; retry in {} ms", .retry_after.as_millis())]
    Busy {
        /// How long the gateway asked to wait.
        retry_after: Duration,
    },
    /// The gateway cannot reach the operator's core network right now.
    #[error("the operator's network is unreachable from the gateway; retry in {} ms", .retry_after.as_millis())]
    CnUnavailable {
        /// How long the gateway asked to wait.
        retry_after: Duration,
    },
    /// The credential to renew has expired: provision a new one.
    #[error("the credential has expired and cannot be renewed; provision the device again")]
    Expired,
    /// The credential (or the owner's subscription) was revoked.
    #[error("the credential was revoked{}", detail(.0))]
    Revoked(String),
    /// The referenced credential is unknown to the gateway or the CN.
    #[error("the gateway does not know this credential{}: provision the device again", detail(.0))]
    NotFound(String),
    /// No answer from the gateway (address wrong, gateway down, network).
    #[error("cannot reach the gateway at {addr}: {reason}")]
    GatewayUnreachable {
        /// The gateway address tried.
        addr: String,
        /// Why the connection failed.
        reason: String,
    },
    /// The gateway presents another key than the one pinned at first use.
    #[error(
        "the gateway's key changed (pinned {pinned}, presented {presented}): this may be an attack; \
         if the gateway was really replaced, reset the device's gateway pin"
    )]
    GatewayKeyChanged {
        /// The pinned fingerprint, hex.
        pinned: String,
        /// The fingerprint presented now, hex.
        presented: String,
    },
    /// The gateway or the device gave up waiting.
    #[error("timed out: {0}")]
    Timeout(String),
    /// The delivered credential could not be opened or is not for this device/request.
    #[error("the delivered credential is unusable: {0}")]
    CredentialUnusable(String),
    /// The connection broke during the exchange.
    #[error("connection to the gateway lost: {0}")]
    ConnectionLost(String),
    /// The gateway answered with a QUIC stateless reset: it restarted and no longer knows this
    /// connection. It is up again, so the same request is retried at once on a new connection.
    #[error("the gateway restarted and forgot this connection (stateless reset)")]
    GatewayRestarted,
    /// The gateway answered with another error.
    #[error("the gateway answered {}: {reason}", .code.name())]
    Gateway {
        /// The gateway's error code.
        code: ErrorCode,
        /// The gateway's words.
        reason: String,
        /// How long to wait before retrying, if the gateway said.
        retry_after: Option<Duration>,
    },
    /// The gateway broke the protocol.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// Local storage, RNG or configuration failure.
    #[error("{0}")]
    Local(String),
}

/// A random delay in [0, 250) ms.
fn restart_jitter() -> Duration {
    use std::hash::BuildHasher;
    let r = std::collections::hash_map::RandomState::new().hash_one(std::time::Instant::now());
    Duration::from_millis(r % 250)
}

fn detail(s: &str) -> String {
    if s.is_empty() {
        String::new()
    } else {
        format!(" ({s})")
    }
}

impl DeviceError {
    /// Whether the same attempt (same request ID) may succeed later.
    pub fn is_retryable(&self) -> bool {
        match self {
            DeviceError::Busy { .. }
            | DeviceError::CnUnavailable { .. }
            | DeviceError::GatewayUnreachable { .. }
            | DeviceError::Timeout(_)
            | DeviceError::ConnectionLost(_)
            | DeviceError::GatewayRestarted => true,
            DeviceError::Gateway {
                code, retry_after, ..
            } => code.is_retryable() || retry_after.is_some(),
            _ => false,
        }
    }

    /// When to retry, if the gateway said (or a sensible default for transient failures).
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            DeviceError::Busy { retry_after } | DeviceError::CnUnavailable { retry_after } => {
                Some(*retry_after)
            }
            DeviceError::Gateway { retry_after, .. } if retry_after.is_some() => *retry_after,
            // The gateway is back (it sent the reset): reconnect within a quarter second, spread
            // so that every device of a restarted gateway does not arrive in the same instant.
            DeviceError::GatewayRestarted => Some(restart_jitter()),
            e if e.is_retryable() => Some(Duration::from_secs(1)),
            _ => None,
        }
    }

    /// The registry code the gateway sent, if this error came from an `Error` message.
    pub fn code(&self) -> Option<ErrorCode> {
        Some(match self {
            DeviceError::NotPaired(_) => ErrorCode::NotPaired,
            DeviceError::QuotaExhausted(_) => ErrorCode::QuotaExhausted,
            DeviceError::PolicyDenied(_) => ErrorCode::PolicyDenied,
            DeviceError::Busy { .. } => ErrorCode::Busy,
            DeviceError::CnUnavailable { .. } => ErrorCode::CnUnavailable,
            DeviceError::Expired => ErrorCode::CredentialExpired,
            DeviceError::Revoked(_) => ErrorCode::CredentialRevoked,
            DeviceError::NotFound(_) => ErrorCode::NotFound,
            DeviceError::Timeout(_) => ErrorCode::Timeout,
            DeviceError::Gateway { code, .. } => *code,
            _ => return None,
        })
    }

    /// The device-side error for an `Error` message from the gateway.
    pub fn from_gateway(e: ErrorMsg) -> Self {
        let after = e.retry_after_ms.map(Duration::from_millis);
        let reason = e.reason;
        match e.code {
            ErrorCode::NotPaired => DeviceError::NotPaired(reason),
            ErrorCode::QuotaExhausted => DeviceError::QuotaExhausted(reason),
            ErrorCode::PolicyDenied => DeviceError::PolicyDenied(reason),
            ErrorCode::Busy => DeviceError::Busy {
                retry_after: after.unwrap_or(Duration::from_secs(1)),
            },
            ErrorCode::CnUnavailable => DeviceError::CnUnavailable {
                retry_after: after.unwrap_or(Duration::from_secs(1)),
            },
            ErrorCode::CredentialExpired => DeviceError::Expired,
            ErrorCode::CredentialRevoked => DeviceError::Revoked(reason),
            ErrorCode::NotFound => DeviceError::NotFound(reason),
            ErrorCode::Timeout => DeviceError::Timeout(format!("the gateway timed out: {reason}")),
            code => DeviceError::Gateway {
                code,
                reason,
                retry_after: after,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gateway_errors_map_and_classify() {
        let busy = DeviceError::from_gateway(ErrorMsg::retry_after(ErrorCode::Busy, "busy", 250));
        assert!(busy.is_retryable());
        assert_eq!(busy.retry_after(), Some(Duration::from_millis(250)));
        assert!(busy.to_string().contains("250 ms"));
        let cn = DeviceError::from_gateway(ErrorMsg::retry_after(ErrorCode::CnUnavailable, "x", 9));
        assert!(matches!(cn, DeviceError::CnUnavailable { .. }) && cn.is_retryable());
        let q = DeviceError::from_gateway(ErrorMsg::new(ErrorCode::QuotaExhausted, "full"));
        assert!(!q.is_retryable() && q.retry_after().is_none());
        assert!(
            q.to_string().contains("quota exhausted") && q.to_string().ends_with("(full)"),
            "{q}"
        );
        let np = DeviceError::from_gateway(ErrorMsg::new(ErrorCode::NotPaired, ""));
        assert!(np.to_string().contains("not paired"));
        assert_eq!(np.code(), Some(ErrorCode::NotPaired));
        let unknown =
            DeviceError::from_gateway(ErrorMsg::retry_after(ErrorCode::Unknown(99), "?", 5));
        assert!(unknown.is_retryable());
    }
}
