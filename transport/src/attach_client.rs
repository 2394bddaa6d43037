//! The device's attach client (`companion-attach/1`): 5G AKA with a provisioned credential,
//! straight to the CN, bound to the TLS session. Success proves the credential is real and
//! usable; the answer carries its expiry and restrictions.
//!
//! Every wait for the CN is bounded ([`crate::cn_client::ClientOptions`]).

use companion_crypto::usim::Usim;
use companion_proto::msg::{AttachAccept, AttachMessage};

use crate::cn_client::{ClientOptions, CnTarget, authenticate, open_connection};

/// Why an attach failed; the same kinds as a CN session's errors. A refusal by the CN is
/// [`AttachClientError::Rejected`] with `credential_revoked`, `credential_expired`,
/// `roaming_not_allowed`, `subscription_suspended`, `auth_failed` or `unknown_subscriber`.
pub type AttachClientError = crate::cn_client::CnClientError;

/// Attaches with `usim` (the provisioned credential) to the CN at `target`; `target.trust_anchors`
/// and `target.server_name` come from the credential bundle's `attach` section.
pub async fn attach(
    endpoint: &quinn::Endpoint,
    target: &CnTarget,
    usim: &mut dyn Usim,
) -> Result<AttachAccept, AttachClientError> {
    attach_with(endpoint, target, usim, ClientOptions::default()).await
}

/// [`attach`] with explicit timeouts.
pub async fn attach_with(
    endpoint: &quinn::Endpoint,
    target: &CnTarget,
    usim: &mut dyn Usim,
    opts: ClientOptions,
) -> Result<AttachAccept, AttachClientError> {
    let conn = open_connection(
        endpoint,
        target,
        crate::ALPN_ATTACH,
        "companion-attach/1",
        &opts,
    )
    .await?;
    let result = authenticate::<AttachMessage>(&conn, target, usim, &opts)
        .await
        .map(|(_, accept)| accept);
    conn.close(0u32.into(), b"attach done");
    result
}
