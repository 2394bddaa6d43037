//! `loadgen handshake`: the ceiling of the device leg — N paired devices each open a QUIC
//! connection with mutual TLS to gatewayd, exactly as a device does before it provisions, and
//! close it as soon as both sides hold the connection as established. No stream is opened.
//!
//! What one handshake covers, from the device's point of view (timed from `connect` to the last
//! step):
//!
//! 1. QUIC Initial/Handshake exchange with TLS 1.3: the device checks the gateway's key against
//!    its pin ([`PinnedServerVerifier`]) and ALPN `companion-device/2`, presents its own
//!    self-signed certificate and signs the transcript (`CertificateVerify`) — the client config
//!    `iotdev` uses ([`device_client_config`]).
//! 2. The gateway checks the certificate against its pairings (`PinnedClientVerifier` on the
//!    pairing registry) and the device's `Finished`, completes its side of the handshake and
//!    sends `HANDSHAKE_DONE` (RFC 9001 §4.1.2). Only the receipt of that frame tells the device
//!    the gateway admitted its key: quinn reports a client connection as established one step
//!    earlier, when the device has sent its `Finished` — an unpaired key is refused after that.
//!    quinn has no event for `HANDSHAKE_DONE`, so [`connect`] watches the connection's frame
//!    counters (every millisecond, the timer's granularity) until it has arrived.
//! 3. The device closes the connection (`CONNECTION_CLOSE`, application code 0); the close is
//!    sent without waiting for anything, as QUIC closes are not acknowledged.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use companion_transport::{
    ALPN_DEVICE, Limits, PinnedServerVerifier, ServerTrust, client_config, negotiated_alpn,
};
use iotdev::DeviceKeys;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::fleet::{Fleet, Load, client_endpoints, progress_bar};
use crate::report::{HandshakeReport, Recorder};

/// TLS server name the devices send (not verified: the gateway's key is pinned), as `iotdev`.
pub const SERVER_NAME: &str = "gateway.local";

/// How often [`connect`] looks for the gateway's `HANDSHAKE_DONE`.
const CONFIRM_POLL: Duration = Duration::from_millis(1);

/// gatewayd's application close code for a key it does not know (`device_server::close`).
const CLOSE_NOT_PAIRED: u64 = 1;

/// Why a device's handshake failed.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// The gateway refused the device's certificate (its key is not paired).
    #[error("the gateway refused the device's key: {0}")]
    NotPaired(String),
    /// The gateway presented another key than the pinned one.
    #[error("the gateway's key changed: pinned {pinned}, presented {presented}")]
    GatewayKeyChanged {
        /// The fingerprint the device pinned.
        pinned: String,
        /// The fingerprint of the key the gateway presented.
        presented: String,
    },
    /// No answer in time (what was awaited).
    #[error("timed out: {0}")]
    Timeout(&'static str),
    /// The gateway closed the connection for another reason.
    #[error("the gateway closed the connection (code {code}): {reason}")]
    Closed {
        /// The application close code.
        code: u64,
        /// The close reason.
        reason: String,
    },
    /// The connection failed otherwise (transport error, reset).
    #[error("connection lost: {0}")]
    ConnectionLost(String),
    /// The gateway selected no or another application protocol.
    #[error("the gateway did not agree on ALPN companion-device/2")]
    Alpn,
    /// This side could not set the connection up (configuration, endpoint).
    #[error("{0}")]
    Local(String),
}

impl HandshakeError {
    /// A stable name for the report's `failures_by_reason`.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::NotPaired(_) => "not_paired",
            Self::GatewayKeyChanged { .. } => "gateway_key_changed",
            Self::Timeout(_) => "timeout",
            Self::Closed { .. } => "closed_by_gateway",
            Self::ConnectionLost(_) => "connection_lost",
            Self::Alpn => "protocol",
            Self::Local(_) => "local",
        }
    }
}

/// A connection both sides hold as established.
#[derive(Debug)]
pub struct Established {
    /// The connection.
    pub conn: quinn::Connection,
    /// From `connect` to quinn's "connected" (the device sent its `Finished`).
    pub client_side: Duration,
    /// From `connect` to the gateway's `HANDSHAKE_DONE` (the gateway admitted the key).
    pub confirmed: Duration,
}

/// The QUIC client configuration of a device: `iotdev`'s (pinned gateway key, the device's
/// certificate, ALPN `companion-device/2`) with `limits`.
pub fn device_client_config(
    keys: &DeviceKeys,
    limits: &Limits,
) -> Result<(quinn::ClientConfig, Arc<PinnedServerVerifier>), HandshakeError> {
    let verifier = Arc::new(PinnedServerVerifier::new(keys.gateway_pin));
    let cfg = client_config(
        ServerTrust::Verifier(verifier.clone()),
        Some(&keys.identity),
        ALPN_DEVICE,
        limits,
    )
    .map_err(|e| HandshakeError::Local(format!("TLS configuration: {e}")))?;
    Ok((cfg, verifier))
}

/// Connects one device to the gateway and waits until the gateway has confirmed the handshake
/// (see the module documentation); fails after `timeout`.
pub async fn connect(
    ep: &quinn::Endpoint,
    gateway: SocketAddr,
    keys: &DeviceKeys,
    limits: &Limits,
    timeout: Duration,
) -> Result<Established, HandshakeError> {
    let started = Instant::now();
    let until = tokio::time::Instant::from_std(started + timeout);
    let (cfg, verifier) = device_client_config(keys, limits)?;
    let connecting = ep
        .connect_with(cfg, gateway, SERVER_NAME)
        .map_err(|e| HandshakeError::Local(format!("cannot connect to {gateway}: {e}")))?;
    let conn = match tokio::time::timeout_at(until, connecting).await {
        Err(_) => return Err(HandshakeError::Timeout("no answer to the QUIC handshake")),
        Ok(Err(e)) => return Err(classify(e, keys, &verifier)),
        Ok(Ok(c)) => c,
    };
    let client_side = started.elapsed();
    if negotiated_alpn(&conn).as_deref() != Some(ALPN_DEVICE) {
        conn.close(2u32.into(), b"wrong ALPN");
        return Err(HandshakeError::Alpn);
    }
    {
        let mut closed = std::pin::pin!(conn.closed());
        while conn.stats().frame_rx.handshake_done == 0 {
            if tokio::time::Instant::now() >= until {
                conn.close(1u32.into(), b"handshake not confirmed");
                return Err(HandshakeError::Timeout(
                    "the gateway never confirmed the handshake",
                ));
            }
            let next = (tokio::time::Instant::now() + CONFIRM_POLL).min(until);
            tokio::select! {
                e = &mut closed => return Err(classify(e, keys, &verifier)),
                () = tokio::time::sleep_until(next) => {}
            }
        }
    }
    Ok(Established {
        conn,
        client_side,
        confirmed: started.elapsed(),
    })
}

/// Names a connection error the way a device understands it.
pub fn classify(
    e: quinn::ConnectionError,
    keys: &DeviceKeys,
    verifier: &PinnedServerVerifier,
) -> HandshakeError {
    use quinn::ConnectionError as C;
    if let (Some(pin), Some(seen)) = (keys.gateway_pin, verifier.seen())
        && pin != seen
    {
        return HandshakeError::GatewayKeyChanged {
            pinned: hex::encode(pin),
            presented: hex::encode(seen),
        };
    }
    // TLS alerts travel as QUIC CRYPTO_ERROR codes 0x100-0x1ff.
    let is_crypto = |code: quinn::TransportErrorCode| (0x100..0x200).contains(&u64::from(code));
    match e {
        C::ConnectionClosed(c) if is_crypto(c.error_code) => {
            HandshakeError::NotPaired(format!("TLS handshake refused: {}", c.error_code))
        }
        C::ApplicationClosed(a) if u64::from(a.error_code) == CLOSE_NOT_PAIRED => {
            HandshakeError::NotPaired(String::from_utf8_lossy(&a.reason).into_owned())
        }
        C::ApplicationClosed(a) => HandshakeError::Closed {
            code: a.error_code.into(),
            reason: String::from_utf8_lossy(&a.reason).into_owned(),
        },
        C::TimedOut => HandshakeError::Timeout("the connection went idle"),
        other => HandshakeError::ConnectionLost(other.to_string()),
    }
}

/// What `loadgen handshake` does.
#[derive(Debug, Clone)]
pub struct HandshakeOptions {
    /// The devices, how many at once, and the gateway they go to.
    pub load: Load,
    /// Pair the devices first (`false`: every handshake must be refused).
    pub pair: bool,
    /// Longest single handshake.
    pub timeout: Duration,
}

type Outcome = Result<(Duration, Duration), HandshakeError>;

/// Where and how long each device of a fleet connects.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Connects {
    /// gatewayd's device address.
    pub gateway: SocketAddr,
    /// Longest single handshake.
    pub timeout: Duration,
}

impl HandshakeOptions {
    fn as_connects(&self) -> Connects {
        Connects {
            gateway: self.load.gateway,
            timeout: self.timeout,
        }
    }
}

/// Spawns one task per device of `fleet` (on `endpoints` in turn, at most as many at once as
/// `sem` allows) that connects it to the gateway with `limits`, ticks `bar` and hands the
/// outcome to `then`, inside the task.
pub(crate) fn spawn_connects<T: Send + 'static>(
    fleet: &Fleet,
    endpoints: &[quinn::Endpoint],
    c: &Connects,
    limits: Arc<Limits>,
    sem: Arc<Semaphore>,
    bar: indicatif::ProgressBar,
    then: fn(Result<Established, HandshakeError>) -> T,
) -> JoinSet<T> {
    let mut tasks = JoinSet::new();
    for i in 0..fleet.len() {
        let (keys, sem, bar, limits) =
            (fleet.keys.clone(), sem.clone(), bar.clone(), limits.clone());
        let ep = endpoints[i % endpoints.len()].clone();
        let (gateway, timeout) = (c.gateway, c.timeout);
        tasks.spawn(async move {
            let _permit = sem.acquire_owned().await;
            let r = connect(&ep, gateway, &keys[i], &limits, timeout).await;
            bar.inc(1);
            then(r)
        });
    }
    tasks
}

/// Runs the handshakes and returns the report.
pub async fn run(opts: HandshakeOptions) -> anyhow::Result<HandshakeReport> {
    anyhow::ensure!(
        opts.load.concurrency > 0,
        "--concurrency must be at least 1"
    );
    let fleet = Fleet::prepare(&opts.load.fleet(false, opts.pair)).await?;
    let endpoints = client_endpoints(opts.load.gateway, opts.load.endpoints)?;
    let limits = Arc::new(Limits::device_link());

    let bar = progress_bar(opts.load.progress, opts.load.devices as u64, "handshakes");
    let sem = Arc::new(Semaphore::new(opts.load.concurrency));
    let started = Instant::now();
    let mut tasks: JoinSet<Outcome> = spawn_connects(
        &fleet,
        &endpoints,
        &opts.as_connects(),
        limits,
        sem,
        bar.clone(),
        |r| {
            let e = r?;
            e.conn.close(0u32.into(), b"done");
            Ok((e.client_side, e.confirmed))
        },
    );
    let mut confirmed = Recorder::new().context("latency histogram")?;
    let mut client_side = Recorder::new().context("latency histogram")?;
    let mut failures: BTreeMap<String, u64> = BTreeMap::new();
    let mut last_error = None;
    while let Some(r) = tasks.join_next().await {
        match r.context("device task")? {
            Ok((c, d)) => {
                client_side.record(c);
                confirmed.record(d);
            }
            Err(e) => {
                *failures.entry(e.reason().to_string()).or_default() += 1;
                last_error = Some(e.to_string());
            }
        }
    }
    let duration = started.elapsed();
    bar.finish_and_clear();
    for ep in &endpoints {
        // Connections are already closed; this lets their CONNECTION_CLOSE go out.
        let _ = tokio::time::timeout(Duration::from_secs(1), ep.wait_idle()).await;
        ep.close(0u32.into(), b"done");
    }
    let ok = confirmed.latency().count;
    let failed = failures.values().sum::<u64>();
    let duration_s = duration.as_secs_f64();
    Ok(HandshakeReport {
        devices: opts.load.devices as u64,
        concurrency: opts.load.concurrency as u64,
        paired: fleet.paired,
        succeeded: ok,
        failed,
        duration_s: (duration_s * 1000.0).round() / 1000.0,
        throughput_per_s: per_second(ok, duration_s),
        latency_ms: confirmed.latency(),
        client_side_latency_ms: client_side.latency(),
        pairing_s: fleet.pairing_s,
        failures_by_reason: failures,
        last_error,
        gateway: opts.load.gateway.to_string(),
    })
}

/// `n` per second of `secs`, one decimal.
pub fn per_second(n: u64, secs: f64) -> f64 {
    if secs > 0.0 {
        ((n as f64 / secs) * 10.0).round() / 10.0
    } else {
        0.0
    }
}
