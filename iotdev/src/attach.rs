//! Attaching to the operator's core network with a provisioned credential
//! (`companion-attach/1`): 5G AKA with the credential's K/OPc in a software USIM, straight to the
//! CN named in the bundle, verified with the bundle's trust anchor.
//!
//! - [`attach`]: one attach, with the device's [`SoftUsim`] (whose SQN memory the caller keeps);
//! - [`initial_sqn_state`]: the USIM's SEQ_MS array for a new credential, from `sqn_start`;
//! - [`load_sqn_state`] / [`save_sqn_state`]: the SQN memory persisted next to the device
//!   state (`usim-sqn.json`, 0600), so a replayed challenge is refused across restarts;
//! - [`AttachError`]: every refusal and failure, with a message that says what to do.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use companion_crypto::Key128;
use companion_crypto::aka::{IND_BITS, IND_COUNT, SEQ_MAX};
use companion_crypto::usim::{SoftUsim, SqnState};
use companion_proto::bundle::CredentialBundle;
use companion_proto::msg::{AttachAccept, ErrorCode};
use companion_transport::attach_client::{self, AttachClientError};
use companion_transport::cn_client::{ClientOptions, CnTarget};
use rustls::pki_types::CertificateDer;
use serde::{Deserialize, Serialize};

/// The serving network name used when none is given: the test PLMN 001/01.
pub const DEFAULT_SERVING_NETWORK: &str = "5G:mnc001.mcc001.3gppnetwork.org";

/// File (in the device directory) holding the USIM's SEQ_MS array.
pub const SQN_FILE: &str = "usim-sqn.json";

/// Why an attach did not succeed. Messages never contain key material.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    /// The device holds no credential.
    #[error(
        "this device holds no credential: provision it first (`iotdev provision --gateway <addr>`)"
    )]
    NoCredential,
    /// The CN says the credential expired.
    #[error(
        "the credential expired (at {expires_at} Unix time): renew credentials before they expire \
         (`iotdev renew`); an expired one must be provisioned again (`iotdev provision`)"
    )]
    Expired {
        /// When it expired, Unix seconds.
        expires_at: u64,
    },
    /// The credential, or its parent subscription, was revoked.
    #[error(
        "the network refused the credential: it was revoked (the device was unpaired or the owner's \
         subscription ended){}; ask the gateway's owner to pair and provision it again",
        detail(.0)
    )]
    Revoked(String),
    /// A visited network was used and the credential may not roam.
    #[error(
        "the network refused the attach: this credential may not roam and {snn} is not its home \
         network; attach from the home network or ask the operator to allow roaming"
    )]
    RoamingNotAllowed {
        /// The serving network name used.
        snn: String,
    },
    /// The owner's subscription is suspended.
    #[error("the owner's subscription is suspended{}: ask the operator to resume it", detail(.0))]
    SubscriptionSuspended(String),
    /// The CN does not know the SUPI, or AKA failed (wrong keys).
    #[error("the network does not accept this credential ({what}){}: provision the device again", detail(.reason))]
    NotAccepted {
        /// Which check failed (unknown SUPI, authentication).
        what: &'static str,
        /// The CN's words.
        reason: String,
    },
    /// The CN could not be reached (down, wrong address, network).
    #[error("cannot reach the operator's network at {endpoint}: {reason}; retry later")]
    CnUnreachable {
        /// The CN address from the credential.
        endpoint: String,
        /// Why the connection failed.
        reason: String,
    },
    /// The CN asked to retry later.
    #[error("the operator's network is busy ({reason}); retry in {} ms", .retry_after.as_millis())]
    CnBusy {
        /// The CN's words.
        reason: String,
        /// How long the CN asked to wait.
        retry_after: Duration,
    },
    /// Another refusal.
    #[error("the operator's network refused the attach: {} ({reason})", .code.name())]
    Rejected {
        /// The CN's error code.
        code: ErrorCode,
        /// The CN's words.
        reason: String,
    },
    /// The credential's attach information is unusable, or a local failure.
    #[error("{0}")]
    Local(String),
}

fn detail(s: &str) -> String {
    if s.is_empty() {
        String::new()
    } else {
        format!(" ({s})")
    }
}

impl AttachError {
    /// Whether the same attach may succeed later.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            AttachError::CnUnreachable { .. } | AttachError::CnBusy { .. }
        )
    }

    /// When to retry, if retryable.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            AttachError::CnBusy { retry_after, .. } => Some(*retry_after),
            AttachError::CnUnreachable { .. } => Some(Duration::from_secs(1)),
            _ => None,
        }
    }

    /// A short stable name, for reports (`expired`, `revoked`, `roaming_not_allowed`, ...).
    pub fn reason(&self) -> &'static str {
        match self {
            AttachError::NoCredential => "no_credential",
            AttachError::Expired { .. } => "credential_expired",
            AttachError::Revoked(_) => "credential_revoked",
            AttachError::RoamingNotAllowed { .. } => "roaming_not_allowed",
            AttachError::SubscriptionSuspended(_) => "subscription_suspended",
            AttachError::NotAccepted { what, .. } => what,
            AttachError::CnUnreachable { .. } => "cn_unreachable",
            AttachError::CnBusy { .. } => "cn_busy",
            AttachError::Rejected { code, .. } => code.name(),
            AttachError::Local(_) => "local",
        }
    }

    fn from_client(e: AttachClientError, bundle: &CredentialBundle, snn: &str) -> Self {
        let endpoint = bundle.attach.endpoint.clone();
        if let AttachClientError::Rejected {
            code,
            reason,
            retry_after,
        } = &e
        {
            let reason = reason.clone();
            return match code {
                ErrorCode::CredentialExpired => AttachError::Expired {
                    expires_at: bundle.expires_at,
                },
                ErrorCode::CredentialRevoked => AttachError::Revoked(reason),
                ErrorCode::RoamingNotAllowed => AttachError::RoamingNotAllowed { snn: snn.into() },
                ErrorCode::SubscriptionSuspended => AttachError::SubscriptionSuspended(reason),
                ErrorCode::UnknownSubscriber => AttachError::NotAccepted {
                    what: "unknown_subscriber",
                    reason,
                },
                ErrorCode::AuthFailed => AttachError::NotAccepted {
                    what: "auth_failed",
                    reason,
                },
                c if c.is_retryable() || retry_after.is_some() => AttachError::CnBusy {
                    reason,
                    retry_after: retry_after.unwrap_or(Duration::from_secs(1)),
                },
                c => AttachError::Rejected { code: *c, reason },
            };
        }
        if e.is_retryable() {
            AttachError::CnUnreachable {
                endpoint,
                reason: e.to_string(),
            }
        } else {
            match e {
                AttachClientError::Config(_) | AttachClientError::Connect(_) => AttachError::Local(
                    format!("the credential's attach information is unusable ({endpoint}): {e}"),
                ),
                other => AttachError::CnUnreachable {
                    endpoint,
                    reason: other.to_string(),
                },
            }
        }
    }
}

/// The USIM's SEQ_MS array for a fresh credential: every slot at `sqn_start`'s SEQ, so the first
/// challenge the CN sends (SEQ + 1) is fresh and anything older is refused.
pub fn initial_sqn_state(bundle: &CredentialBundle) -> SqnState {
    let seq = (bundle.sqn_start >> IND_BITS).min(SEQ_MAX);
    SqnState::new([seq; IND_COUNT]).unwrap_or_default()
}

/// A software USIM holding the credential's K/OPc, with `state` (or [`initial_sqn_state`]).
pub fn usim(bundle: &CredentialBundle, state: Option<SqnState>) -> SoftUsim {
    SoftUsim::new(
        bundle.supi.to_string(),
        Key128::from_bytes(*bundle.k.expose()),
        Key128::from_bytes(*bundle.opc.expose()),
    )
    .with_sqn_state(state.unwrap_or_else(|| initial_sqn_state(bundle)))
}

/// Resolves the bundle's attach endpoint (`host:port`; IPv4 addresses first) into a target.
pub async fn cn_target(bundle: &CredentialBundle, snn: &str) -> Result<CnTarget, AttachError> {
    let endpoint = &bundle.attach.endpoint;
    let addr = match endpoint.parse::<SocketAddr>() {
        Ok(a) => a,
        Err(_) => {
            let mut addrs: Vec<SocketAddr> = tokio::net::lookup_host(endpoint.as_str())
                .await
                .map_err(|e| AttachError::CnUnreachable {
                    endpoint: endpoint.clone(),
                    reason: format!("cannot resolve the address: {e}"),
                })?
                .collect();
            addrs.sort_by_key(|a| !a.is_ipv4());
            addrs
                .first()
                .copied()
                .ok_or_else(|| AttachError::CnUnreachable {
                    endpoint: endpoint.clone(),
                    reason: "the name has no address".into(),
                })?
        }
    };
    Ok(CnTarget {
        addr,
        server_name: bundle.attach.server_name.clone(),
        trust_anchors: vec![CertificateDer::from(bundle.attach.trust_anchor.clone())],
        serving_network_name: snn.to_string(),
    })
}

/// One attach of the credential in `bundle` from serving network `snn`, with `usim` (whose SQN
/// memory advances on success: persist it).
pub async fn attach(
    endpoint: &quinn::Endpoint,
    bundle: &CredentialBundle,
    snn: &str,
    usim: &mut SoftUsim,
    opts: ClientOptions,
) -> Result<AttachAccept, AttachError> {
    let target = cn_target(bundle, snn).await?;
    attach_client::attach_with(endpoint, &target, usim, opts)
        .await
        .map_err(|e| AttachError::from_client(e, bundle, snn))
}

#[derive(Serialize, Deserialize)]
struct SqnFile {
    supi: String,
    seq_ms: Vec<u64>,
}

/// The SQN memory stored in `dir` for `supi`; `None` if none is stored (or it belongs to another
/// SUPI, i.e. an earlier credential).
pub fn load_sqn_state(dir: &Path, supi: &str) -> Result<Option<SqnState>, AttachError> {
    let path = dir.join(SQN_FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(AttachError::Local(format!("{}: {e}", path.display()))),
    };
    let f: SqnFile = serde_json::from_str(&text).map_err(|e| {
        AttachError::Local(format!("{} is damaged ({e}); delete it", path.display()))
    })?;
    if f.supi != supi {
        return Ok(None);
    }
    SqnState::from_slice(&f.seq_ms)
        .map(Some)
        .map_err(|e| AttachError::Local(format!("{} is damaged ({e}); delete it", path.display())))
}

/// Persists the SQN memory of `supi` in `dir` (0600, atomic replace).
pub fn save_sqn_state(dir: &Path, supi: &str, state: &SqnState) -> Result<(), AttachError> {
    let f = SqnFile {
        supi: supi.to_string(),
        seq_ms: state.seq_ms().to_vec(),
    };
    let text = serde_json::to_vec(&f).map_err(|e| AttachError::Local(e.to_string()))?;
    companion_transport::pki::write_file(&dir.join(SQN_FILE), &text, 0o600)
        .map_err(|e| AttachError::Local(format!("saving the USIM's SQN state: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqn_state_round_trips_and_ignores_other_supis() {
        let dir = tempfile::tempdir().unwrap();
        assert!(
            load_sqn_state(dir.path(), "imsi-001010000000001")
                .unwrap()
                .is_none()
        );
        let mut seq = [0u64; IND_COUNT];
        seq[3] = 77;
        let st = SqnState::new(seq).unwrap();
        save_sqn_state(dir.path(), "imsi-001010000000001", &st).unwrap();
        assert_eq!(
            load_sqn_state(dir.path(), "imsi-001010000000001").unwrap(),
            Some(st)
        );
        assert!(
            load_sqn_state(dir.path(), "imsi-001010000000002")
                .unwrap()
                .is_none()
        );
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join(SQN_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn refusals_say_what_to_do() {
        let e = AttachError::Expired { expires_at: 5 };
        assert!(e.to_string().contains("provisioned again"), "{e}");
        assert!(!e.is_retryable());
        let r = AttachError::RoamingNotAllowed {
            snn: "5G:mnc002.mcc208.3gppnetwork.org".into(),
        };
        assert!(r.to_string().contains("may not roam"));
        let u = AttachError::CnUnreachable {
            endpoint: "x:1".into(),
            reason: "timed out".into(),
        };
        assert!(u.is_retryable() && u.to_string().contains("retry later"));
    }
}
