//! One provisioning or renewal over QUIC, driving the sans-IO
//! [`companion_proto::device::ClientExchange`].
//!
//! ```text
//! connect (ALPN companion-device/2; the device presents its self-signed certificate; the
//!          gateway's key is pinned, or trusted on first use)
//! open a bidirectional stream
//! -> ProvisionRequest | RenewRequest        (request ID reused across retries of an Attempt)
//! <- Pending*                               (the deadline moves)
//! <- CredentialDelivery                     open with the HPKE key, check device/request/SUPI
//!                                           store (the caller's sink) — only then:
//! -> DeliveryAck
//! <- AckConfirmed
//! ```

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use companion_crypto::hpke::{DeviceHpkeKey, SealedCredential, open_credential};
use companion_proto::binding::{BindingOp, KeyBinding, binding_message};
use companion_proto::bundle::CredentialBundle;
use companion_proto::device::{ClientEvent, ClientExchange};
use companion_proto::msg::{CredentialDelivery, Params, ProvisionRequest, RenewRequest};
use companion_proto::{Config, RequestId, Supi};
use companion_transport::drive::{DriveError, Step, StreamDriver};
use companion_transport::{
    ALPN_DEVICE, Limits, PinnedServerVerifier, ServerTrust, client_config, negotiated_alpn,
};

use crate::{DeviceError, DeviceKeys, random_request_id, renewal_request_id};

/// Provisioning or renewal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AttemptKind {
    /// A first credential with these control parameters.
    Provision {
        /// The control parameters asked for.
        params: Params,
    },
    /// A fresh expiry for `supi` (`None` params: keep the current ones).
    Renew {
        /// The SUPI of the credential renewed.
        supi: Supi,
        /// New control parameters, or `None` to keep the current ones.
        params: Option<Params>,
    },
}

/// One logical request: its ID and HPKE key are kept across retries so the gateway and the CN
/// answer a retry idempotently (same credential, no second quota unit).
#[derive(Debug, Clone)]
pub struct Attempt {
    /// The request ID, the same on every retry.
    pub request_id: RequestId,
    /// Provisioning or renewal, with its parameters.
    pub kind: AttemptKind,
    /// The key the credential is sealed to.
    pub hpke: DeviceHpkeKey,
}

impl Attempt {
    /// A new provisioning: random request ID, fresh HPKE key.
    pub fn provision(params: Params) -> Result<Self, DeviceError> {
        Ok(Self {
            request_id: random_request_id()?,
            kind: AttemptKind::Provision { params },
            hpke: DeviceHpkeKey::try_generate()
                .map_err(|e| DeviceError::Local(format!("HPKE key: {e}")))?,
        })
    }

    /// The renewal of the credential issued for `previous` (SUPI `supi`), sealed to the renewal
    /// key kept with it; its request ID is [`renewal_request_id`]`(previous)`.
    pub fn renew(
        previous: &RequestId,
        supi: Supi,
        renewal_key: DeviceHpkeKey,
        params: Option<Params>,
    ) -> Self {
        Self {
            request_id: renewal_request_id(previous),
            kind: AttemptKind::Renew { supi, params },
            hpke: renewal_key,
        }
    }
}

/// How a client behaves on the wire.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Longest wait for the QUIC/TLS handshake.
    pub connect_timeout: Duration,
    /// Longest silence from the gateway on the stream (a `Pending` extends it).
    pub stream_timeout: Duration,
    /// Longest total time for the exchange, `Pending`s included.
    pub patience: Duration,
    /// Send `DeliveryAck` after storing. `false` is a test hook: the device opens and checks the
    /// credential but never acknowledges it (the gateway must keep and redeliver it).
    pub acknowledge: bool,
    /// TLS server name sent (not verified: the gateway's key is pinned).
    pub server_name: String,
    /// The owner's pairing-window code, for a device that pairs through the window
    /// (PROTOCOL.md §10.1); sent with provisioning requests only.
    pub window_code: Option<String>,
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(5),
            stream_timeout: Duration::from_secs(30),
            patience: Duration::from_secs(60),
            acknowledge: true,
            server_name: "gateway.local".into(),
            window_code: None,
        }
    }
}

/// Parameters of [`provision`].
#[derive(Debug, Clone, Default)]
pub struct ProvisionParams {
    /// Control parameters asked for (lifetime, roaming, DNNs, bitrate).
    pub params: Params,
    /// How the client behaves on the wire.
    pub options: ClientOptions,
    /// Keep retrying retryable failures (busy, CN unavailable, unreachable) with the same
    /// request ID for this long; zero = one try.
    pub retry_for: Duration,
}

/// A credential received, opened and checked.
#[derive(Debug)]
pub struct ProvisionedCredential {
    /// The opened bundle (K and OPc wipe themselves on drop).
    pub bundle: CredentialBundle,
    /// The request that obtained it.
    pub request_id: RequestId,
    /// The key the bundle was sealed to: keep it as the renewal key.
    pub hpke: DeviceHpkeKey,
    /// The gateway's key fingerprint seen in this connection (pin it after first use).
    pub gateway_fingerprint: [u8; 32],
    /// Whether the gateway confirmed the acknowledgement.
    pub acknowledged: bool,
    /// `Pending` messages received before the delivery.
    pub pendings: u32,
    /// Time from connecting to the end of the exchange.
    pub elapsed: Duration,
}

/// Provisions a new credential: one [`Attempt`], retried with the same request ID on retryable
/// failures for up to `p.retry_for`.
pub async fn provision(
    endpoint: &quinn::Endpoint,
    gateway: SocketAddr,
    keys: &DeviceKeys,
    p: &ProvisionParams,
) -> Result<ProvisionedCredential, DeviceError> {
    let attempt = Attempt::provision(p.params.clone())?;
    run_with_retries(endpoint, gateway, keys, &attempt, p).await
}

/// Renews the credential issued for `previous`.
pub async fn renew(
    endpoint: &quinn::Endpoint,
    gateway: SocketAddr,
    keys: &DeviceKeys,
    previous: &RequestId,
    supi: Supi,
    renewal_key: DeviceHpkeKey,
    p: &ProvisionParams,
) -> Result<ProvisionedCredential, DeviceError> {
    let attempt = Attempt::renew(previous, supi, renewal_key, Some(p.params.clone()));
    run_with_retries(endpoint, gateway, keys, &attempt, p).await
}

async fn run_with_retries(
    endpoint: &quinn::Endpoint,
    gateway: SocketAddr,
    keys: &DeviceKeys,
    attempt: &Attempt,
    p: &ProvisionParams,
) -> Result<ProvisionedCredential, DeviceError> {
    let until = Instant::now() + p.retry_for;
    loop {
        match run(endpoint, gateway, keys, attempt, &p.options).await {
            Err(e) if e.is_retryable() => {
                let wait = e.retry_after().unwrap_or(Duration::from_secs(1));
                if Instant::now() + wait > until {
                    return Err(e);
                }
                tracing::debug!(error = %e, ?wait, "retrying with the same request id");
                tokio::time::sleep(wait).await;
            }
            r => return r,
        }
    }
}

/// One try of `attempt` (no retry), acknowledging per `opts.acknowledge`.
pub async fn run(
    endpoint: &quinn::Endpoint,
    gateway: SocketAddr,
    keys: &DeviceKeys,
    attempt: &Attempt,
    opts: &ClientOptions,
) -> Result<ProvisionedCredential, DeviceError> {
    run_with_sink(endpoint, gateway, keys, attempt, opts, &mut |_| Ok(())).await
}

/// Test hook: runs `attempt` but never sends `DeliveryAck` (the gateway keeps the credential and
/// must redeliver it to a retry of the same attempt).
pub async fn provision_without_ack(
    endpoint: &quinn::Endpoint,
    gateway: SocketAddr,
    keys: &DeviceKeys,
    attempt: &Attempt,
    opts: &ClientOptions,
) -> Result<ProvisionedCredential, DeviceError> {
    let opts = ClientOptions {
        acknowledge: false,
        ..opts.clone()
    };
    run(endpoint, gateway, keys, attempt, &opts).await
}

/// A delivered, checked credential handed to storage before it is acknowledged.
pub type Sink<'a> = dyn FnMut(&ProvisionedCredential) -> Result<(), DeviceError> + Send + 'a;

/// One try of `attempt`; `sink` must store the credential durably before it returns `Ok`
/// (the acknowledgement is sent only after it).
pub async fn run_with_sink(
    endpoint: &quinn::Endpoint,
    gateway: SocketAddr,
    keys: &DeviceKeys,
    attempt: &Attempt,
    opts: &ClientOptions,
    sink: &mut Sink<'_>,
) -> Result<ProvisionedCredential, DeviceError> {
    let started = Instant::now();
    let verifier = Arc::new(PinnedServerVerifier::new(keys.gateway_pin));
    let cfg = client_config(
        ServerTrust::Verifier(verifier.clone()),
        Some(&keys.identity),
        ALPN_DEVICE,
        &Limits::device_link(),
    )
    .map_err(|e| DeviceError::Local(format!("TLS configuration: {e}")))?;
    let unreachable = |reason: String| DeviceError::GatewayUnreachable {
        addr: gateway.to_string(),
        reason,
    };
    let connecting = endpoint
        .connect_with(cfg, gateway, &opts.server_name)
        .map_err(|e| unreachable(e.to_string()))?;
    let conn = match tokio::time::timeout(opts.connect_timeout, connecting).await {
        Err(_) => return Err(unreachable("no answer to the QUIC handshake".into())),
        Ok(Err(e)) => return Err(connection_error(e, keys, &verifier, gateway)),
        Ok(Ok(c)) => c,
    };
    let result = exchange(
        &conn, keys, attempt, opts, sink, &verifier, gateway, started,
    )
    .await;
    match &result {
        Ok(_) => conn.close(0u32.into(), b"done"),
        Err(_) => conn.close(1u32.into(), b"failed"),
    }
    result
}

fn connection_error(
    e: quinn::ConnectionError,
    keys: &DeviceKeys,
    verifier: &PinnedServerVerifier,
    gateway: SocketAddr,
) -> DeviceError {
    use quinn::ConnectionError as C;
    let is_crypto = |code: quinn::TransportErrorCode| (0x100..0x200).contains(&u64::from(code));
    if let (Some(pin), Some(seen)) = (keys.gateway_pin, verifier.seen())
        && pin != seen
    {
        return DeviceError::GatewayKeyChanged {
            pinned: hex::encode(pin),
            presented: hex::encode(seen),
        };
    }
    match e {
        // The gateway's TLS stack refused our certificate: the key is not paired.
        C::ConnectionClosed(c) if is_crypto(c.error_code) => {
            DeviceError::NotPaired(format!("TLS handshake refused: {}", c.error_code))
        }
        C::TimedOut => DeviceError::GatewayUnreachable {
            addr: gateway.to_string(),
            reason: "timed out".into(),
        },
        C::Reset => DeviceError::GatewayRestarted,
        C::ApplicationClosed(a) => DeviceError::ConnectionLost(format!(
            "the gateway closed the connection: {}",
            String::from_utf8_lossy(&a.reason)
        )),
        other => DeviceError::ConnectionLost(other.to_string()),
    }
}

#[allow(clippy::too_many_arguments)]
async fn exchange(
    conn: &quinn::Connection,
    keys: &DeviceKeys,
    attempt: &Attempt,
    opts: &ClientOptions,
    sink: &mut Sink<'_>,
    verifier: &PinnedServerVerifier,
    gateway: SocketAddr,
    started: Instant,
) -> Result<ProvisionedCredential, DeviceError> {
    let lost = |e: quinn::ConnectionError| connection_error(e, keys, verifier, gateway);
    if negotiated_alpn(conn).as_deref() != Some(ALPN_DEVICE) {
        return Err(DeviceError::Protocol(
            "the gateway did not agree on ALPN companion-device/2".into(),
        ));
    }
    let gateway_fingerprint = companion_transport::peer_fingerprint(conn)
        .or_else(|| verifier.seen())
        .ok_or_else(|| DeviceError::Protocol("the gateway presented no certificate".into()))?;
    let (send, recv) = conn.open_bi().await.map_err(lost)?;
    // Writes are not bounded on their own (the gateway's flow control paces them); the
    // patience bounds the wait for the gateway's answers.
    let mut drv = StreamDriver::new(send, recv, Duration::MAX);
    let now = Instant::now();
    let config = Config {
        timeout: opts.stream_timeout,
        ..Config::default()
    };
    let proto = |e: companion_proto::ProtoError| DeviceError::Protocol(e.to_string());
    let hpke_public_key = attempt.hpke.public_key();
    let op = match attempt.kind {
        AttemptKind::Provision { .. } => BindingOp::Provision,
        AttemptKind::Renew { .. } => BindingOp::Renew,
    };
    let (binding, renewal_binding) =
        sign_bindings(keys, op, &attempt.request_id, &hpke_public_key)?;
    let mut ex = match &attempt.kind {
        AttemptKind::Provision { params } => ClientExchange::provision(
            ProvisionRequest {
                request_id: attempt.request_id,
                device_id: keys.device_id.clone(),
                hpke_public_key,
                params: params.clone(),
                binding,
                renewal_binding: Some(renewal_binding),
                window_code: opts.window_code.clone(),
            },
            now,
            config,
        ),
        AttemptKind::Renew { supi, params } => ClientExchange::renew(
            RenewRequest {
                request_id: attempt.request_id,
                supi: supi.clone(),
                hpke_public_key,
                params: params.clone(),
                binding,
                renewal_binding: Some(renewal_binding),
            },
            now,
            config,
        ),
    }
    .map_err(proto)?;
    // The patience is the driver's wake-up time: reaching it ends the exchange.
    let give_up = Some(started + opts.patience);
    let mut no_work: Option<std::future::Pending<()>> = None;
    let mut pendings = 0u32;
    let mut opened: Option<ProvisionedCredential> = None;
    loop {
        let step = drv
            .next(&mut ex, ClientExchange::is_closed, &mut no_work, give_up)
            .await
            .map_err(|e| drive_error(e, &drv, &lost))?;
        let ev = match step {
            Step::Event(ev) => ev,
            Step::Wake => {
                return Err(DeviceError::Timeout(format!(
                    "no credential after {} s",
                    opts.patience.as_secs()
                )));
            }
            Step::Closed | Step::Done(()) => {
                return Err(DeviceError::Protocol(
                    "the exchange ended without a credential".into(),
                ));
            }
        };
        match ev {
            ClientEvent::Pending { .. } => pendings += 1,
            ClientEvent::Delivery(d) => match open_delivery(keys, attempt, &d) {
                Ok(bundle) => {
                    let cred = ProvisionedCredential {
                        bundle,
                        request_id: attempt.request_id,
                        hpke: attempt.hpke.clone(),
                        gateway_fingerprint,
                        acknowledged: false,
                        pendings,
                        elapsed: started.elapsed(),
                    };
                    if !opts.acknowledge {
                        // Test hook: walk away with the credential, unacknowledged.
                        drv.abort(0);
                        return Ok(cred);
                    }
                    sink(&cred)?;
                    ex.accept(Instant::now()).map_err(proto)?;
                    opened = Some(cred);
                }
                Err(reason) => {
                    let _ = ex.reject(&reason);
                    drv.flush(&mut ex)
                        .await
                        .map_err(|e| drive_error(e, &drv, &lost))?;
                    drv.finish();
                    return Err(DeviceError::CredentialUnusable(reason));
                }
            },
            ClientEvent::Confirmed { .. } => {
                drv.finish();
                let mut cred = opened
                    .take()
                    .ok_or_else(|| DeviceError::Protocol("confirmation without delivery".into()))?;
                cred.acknowledged = true;
                cred.elapsed = started.elapsed();
                return Ok(cred);
            }
            ClientEvent::Failed { error, .. } => return Err(DeviceError::from_gateway(error)),
        }
    }
}

/// The device's error for a failure of the stream driver (`lost` maps a lost connection).
fn drive_error(
    e: DriveError,
    drv: &StreamDriver,
    lost: &dyn Fn(quinn::ConnectionError) -> DeviceError,
) -> DeviceError {
    match e {
        // The gateway ended its side in the middle of the exchange.
        DriveError::Proto(e) if drv.peer_finished() => {
            DeviceError::ConnectionLost(format!("the gateway ended the stream: {e}"))
        }
        DriveError::Proto(e) => DeviceError::Protocol(e.to_string()),
        DriveError::Timeout(_) => DeviceError::Timeout("the gateway went silent".into()),
        DriveError::Read(quinn::ReadError::ConnectionLost(c))
        | DriveError::Write(quinn::WriteError::ConnectionLost(c)) => lost(c),
        DriveError::Read(e) => DeviceError::ConnectionLost(e.to_string()),
        DriveError::Write(e) => DeviceError::ConnectionLost(e.to_string()),
        DriveError::Ended | DriveError::OverBudget { .. } => {
            DeviceError::Protocol("the exchange ended without a credential".into())
        }
    }
}

/// Opens the sealed bundle and checks it answers this device's request.
/// Opens and checks a delivered credential as the device does (public for tests that play a
/// forging gateway): HPKE open, bundle checks, device/request/SUPI match, and the operator
/// signature when the device has a factory trust anchor. `Err` is the reason sent with
/// `credential_unusable`.
pub fn open_delivery(
    keys: &DeviceKeys,
    attempt: &Attempt,
    d: &CredentialDelivery,
) -> Result<CredentialBundle, String> {
    let sealed = SealedCredential {
        enc: d.sealed.enc,
        ciphertext: d.sealed.ciphertext.clone(),
    };
    let plain = open_credential(
        &attempt.hpke,
        keys.device_id.as_str(),
        attempt.request_id.as_bytes(),
        &sealed,
    )
    .map_err(|e| e.to_string())?;
    let bundle = CredentialBundle::decode(&plain).map_err(|e| e.to_string())?;
    bundle
        .check_for(&keys.device_id, &attempt.request_id)
        .map_err(|e| e.to_string())?;
    // With a factory trust anchor, only a bundle the CN signed is accepted (PROTOCOL.md §9.1).
    if let Some(anchor) = &keys.operator_anchor {
        companion_transport::verify_bundle(&bundle, anchor).map_err(|e| e.to_string())?;
    }
    if bundle.supi != d.supi {
        return Err("the SUPI inside the bundle differs from the delivery's".into());
    }
    if let AttemptKind::Renew { supi, .. } = &attempt.kind
        && &bundle.supi != supi
    {
        return Err("the renewed credential carries another SUPI".into());
    }
    Ok(bundle)
}

/// The key-binding signatures of a request (PROTOCOL.md §4.4): one over this request, made
/// with the device's TLS identity key, and one authorising the gateway to pre-fetch the
/// renewal of the credential it produces (request ID `request_id.renewal()`, same HPKE key).
pub fn sign_bindings(
    keys: &DeviceKeys,
    op: BindingOp,
    request_id: &RequestId,
    hpke_public_key: &[u8; 32],
) -> Result<(KeyBinding, KeyBinding), DeviceError> {
    let sign = |op, rid: &RequestId| {
        companion_transport::sign_binding(
            &keys.identity,
            &binding_message(op, rid, &keys.device_id, hpke_public_key),
        )
        .map_err(|e| DeviceError::Local(format!("cannot sign the key binding: {e}")))
    };
    Ok((
        sign(op, request_id)?,
        sign(BindingOp::Renew, &request_id.renewal())?,
    ))
}
