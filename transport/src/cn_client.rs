//! The gateway's client for the CN (`companion-cn/2`): connect, authenticate with the
//! companion's USIM (AKA bound to the TLS session), then run operations, one QUIC stream each.
//!
//! ```no_run
//! # async fn demo(ep: &quinn::Endpoint, target: &companion_transport::cn_client::CnTarget,
//! #   usim: &mut dyn companion_crypto::usim::Usim) -> Result<(), Box<dyn std::error::Error>> {
//! use companion_transport::cn_client::CnSession;
//! let (session, policy) = CnSession::connect(ep, target, usim).await?;
//! println!("may issue up to {} items per batch", policy.max_batch_items);
//! let children = session.list_children().await?;
//! # Ok(()) }
//! ```
//!
//! Every wait for the peer is bounded: the handshake by [`ClientOptions::connect_timeout`],
//! every exchange by the proto machine's deadline ([`ClientOptions::exchange_timeout`]).
//! [`CnSession`] is a cheap handle: clone it and run operations concurrently.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use companion_crypto::binding::EXPORTER_LABEL;
use companion_crypto::usim::Usim;
use companion_proto::aka::ClientEvent as AkaEvent;
use companion_proto::cn::{ClientRequest, ClientSession, RequestEvent};
use companion_proto::msg::{
    AuthResult, BatchProvision, BatchResult, ChildList, ErrorCode, ErrorMsg, Revoke, RevokeResult,
};
use companion_proto::{Config, ProtoError};
use rustls::pki_types::CertificateDer;

use crate::drive::{DriveError, StreamDriver};
use crate::quic::{ConfigError, Limits, ServerTrust, client_config, negotiated_alpn, tls_exporter};

/// Where the CN is and how to recognise it.
#[derive(Debug, Clone)]
pub struct CnTarget {
    /// UDP address of the CN's QUIC endpoint.
    pub addr: SocketAddr,
    /// The name the CN's certificate must carry (DNS name or IP address).
    pub server_name: String,
    /// Operator CA certificates (DER) the CN's chain must lead to.
    pub trust_anchors: Vec<CertificateDer<'static>>,
    /// The serving network name RES* is computed with, e.g.
    /// `5G:mnc001.mcc001.3gppnetwork.org` (TS 33.501 §6.1.1.4).
    pub serving_network_name: String,
}

/// Timeouts of a client connection.
#[derive(Debug, Clone, Copy)]
pub struct ClientOptions {
    /// Longest wait for the QUIC/TLS handshake.
    pub connect_timeout: Duration,
    /// Longest silence of the CN within one exchange (AKA step, batch answer...).
    pub exchange_timeout: Duration,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            connect_timeout: Duration::from_secs(10),
            exchange_timeout: Duration::from_secs(30),
        }
    }
}

impl ClientOptions {
    pub(crate) fn proto_config(&self) -> Config {
        Config {
            timeout: self.exchange_timeout,
            ..Config::default()
        }
    }
}

/// Why a CN operation (or the session) failed.
#[derive(Debug, thiserror::Error)]
pub enum CnClientError {
    /// The client configuration could not be built (bad trust anchor...). Fix the configuration.
    #[error("client configuration: {0}")]
    Config(#[from] ConfigError),
    /// The connection attempt could not start (bad server name, endpoint closed).
    #[error("cannot connect to the CN: {0}")]
    Connect(#[from] quinn::ConnectError),
    /// The connection failed or was lost (handshake refused, certificate not trusted, idle
    /// timeout, CN closed). Reconnect.
    #[error("connection to the CN failed: {0}")]
    Connection(#[from] quinn::ConnectionError),
    /// The CN offered an application protocol other than `companion-cn/2` / `companion-attach/1`.
    #[error("the server does not speak {0}")]
    WrongAlpn(&'static str),
    /// The CN did not answer in time. Retry (same request IDs).
    #[error("timed out: {0}")]
    Timeout(String),
    /// The CN answered with `Error`. See [`ErrorCode`] for what to do.
    #[error("the CN refused: {} ({reason})", code.name())]
    Rejected {
        /// The registry code.
        code: ErrorCode,
        /// The CN's reason, for logs.
        reason: String,
        /// When to retry, if the CN said so.
        retry_after: Option<Duration>,
    },
    /// The CN (or the local USIM) broke the protocol; an `Error` was sent where possible.
    #[error("protocol error: {0}")]
    Protocol(#[from] ProtoError),
    /// A stream failed (reset, connection lost). Retry on a new session.
    #[error("stream failed: {0}")]
    Stream(String),
    /// The session was closed locally or by the CN. Connect again.
    #[error("the CN session is closed")]
    Closed,
}

impl CnClientError {
    /// Whether the same operation may succeed later (on this or a new session): timeouts,
    /// lost connections, and CN errors that say so (`busy`, `internal`, ..., or any error that
    /// carries a retry time, such as an AKA lock-out).
    pub fn is_retryable(&self) -> bool {
        match self {
            CnClientError::Connection(_)
            | CnClientError::Timeout(_)
            | CnClientError::Stream(_)
            | CnClientError::Closed => true,
            CnClientError::Rejected {
                code, retry_after, ..
            } => code.is_retryable() || retry_after.is_some(),
            CnClientError::Protocol(e) => matches!(e, ProtoError::Timeout(_)),
            CnClientError::Config(_) | CnClientError::Connect(_) | CnClientError::WrongAlpn(_) => {
                false
            }
        }
    }

    /// How long the CN asked to wait before retrying.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            CnClientError::Rejected { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// The registry code of a CN refusal (or of the local protocol error).
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            CnClientError::Rejected { code, .. } => Some(*code),
            CnClientError::Protocol(e) => Some(e.error_code()),
            CnClientError::Timeout(_) => Some(ErrorCode::Timeout),
            _ => None,
        }
    }

    pub(crate) fn rejected(e: ErrorMsg) -> Self {
        CnClientError::Rejected {
            code: e.code,
            reason: e.reason,
            retry_after: e.retry_after_ms.map(Duration::from_millis),
        }
    }

    pub(crate) fn from_drive(e: DriveError, conn: &quinn::Connection) -> Self {
        match e {
            DriveError::Proto(ProtoError::Peer(m)) => Self::rejected(m),
            DriveError::Proto(p) => CnClientError::Protocol(p),
            DriveError::Timeout(s) => CnClientError::Timeout(s),
            DriveError::Ended => CnClientError::Stream("the CN ended the stream early".into()),
            // Clients set no read budget; kept for completeness.
            DriveError::OverBudget { .. } => CnClientError::Stream(e.to_string()),
            DriveError::Read(_) | DriveError::Write(_) => match conn.close_reason() {
                Some(reason) => CnClientError::Connection(reason),
                None => CnClientError::Stream(e.to_string()),
            },
        }
    }
}

/// Opens a QUIC connection to `target` speaking `alpn`, bounded by the connect timeout.
pub(crate) async fn open_connection(
    endpoint: &quinn::Endpoint,
    target: &CnTarget,
    alpn: &'static [u8],
    alpn_name: &'static str,
    opts: &ClientOptions,
) -> Result<quinn::Connection, CnClientError> {
    let cfg = client_config(
        ServerTrust::Anchors(target.trust_anchors.clone()),
        None,
        alpn,
        &Limits::cn_link_client(),
    )?;
    let connecting = endpoint.connect_with(cfg, target.addr, &target.server_name)?;
    let conn = match tokio::time::timeout(opts.connect_timeout, connecting).await {
        Ok(r) => r?,
        Err(_) => {
            return Err(CnClientError::Timeout(format!(
                "QUIC handshake with {} did not complete within {:?}",
                target.addr, opts.connect_timeout
            )));
        }
    };
    if negotiated_alpn(&conn).as_deref() != Some(alpn) {
        conn.close(0u32.into(), b"wrong ALPN");
        return Err(CnClientError::WrongAlpn(alpn_name));
    }
    Ok(conn)
}

/// Opens one bidirectional stream, bounded by `wait`.
pub(crate) async fn open_stream(
    conn: &quinn::Connection,
    wait: Duration,
) -> Result<StreamDriver, CnClientError> {
    match tokio::time::timeout(wait, conn.open_bi()).await {
        Ok(Ok((send, recv))) => Ok(StreamDriver::new(send, recv, wait)),
        Ok(Err(e)) => Err(CnClientError::Connection(e)),
        Err(_) => Err(CnClientError::Timeout(
            "the CN allows no new stream (too many operations in flight)".into(),
        )),
    }
}

/// 5G AKA as a client on a new stream of `conn`, bound to its TLS session (the exporter): the
/// machine (kept by a CN session for its operations) and what the server sent on success.
pub(crate) async fn authenticate<W: companion_proto::aka::AkaWire>(
    conn: &quinn::Connection,
    target: &CnTarget,
    usim: &mut dyn Usim,
    opts: &ClientOptions,
) -> Result<(companion_proto::aka::AkaClient<W>, W::Final), CnClientError> {
    let exporter = tls_exporter(conn, EXPORTER_LABEL)?;
    let mut machine = companion_proto::aka::AkaClient::<W>::new(
        usim,
        &target.serving_network_name,
        exporter,
        Instant::now(),
        opts.proto_config(),
    )?;
    let mut drv = open_stream(conn, opts.exchange_timeout).await?;
    let last = run_aka(&mut drv, &mut machine, usim, conn).await?;
    Ok((machine, last))
}

/// Runs the AKA client machine to completion on `drv`.
pub(crate) async fn run_aka<W: companion_proto::aka::AkaWire>(
    drv: &mut StreamDriver,
    machine: &mut companion_proto::aka::AkaClient<W>,
    usim: &mut dyn Usim,
    conn: &quinn::Connection,
) -> Result<W::Final, CnClientError> {
    loop {
        match drv.next_event(machine).await {
            Ok(AkaEvent::ChallengeReceived) => {
                if let Err(e) = machine.answer_challenge(Instant::now(), usim) {
                    // Tell the CN (it counts failed authentications) before the caller closes.
                    if drv.flush_and_finish(machine).await.is_ok() {
                        drv.wait_delivered(Duration::from_secs(2)).await;
                    }
                    return Err(CnClientError::Protocol(e));
                }
            }
            Ok(AkaEvent::Authenticated(f)) => {
                drv.finish();
                return Ok(f);
            }
            Ok(AkaEvent::Failed { error, .. }) => return Err(CnClientError::rejected(error)),
            Err(e) => return Err(CnClientError::from_drive(e, conn)),
        }
    }
}

#[derive(Debug)]
struct Inner {
    conn: quinn::Connection,
    session: ClientSession,
    opts: ClientOptions,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.conn.close(0u32.into(), b"session dropped");
    }
}

/// An authenticated session with the CN. Cheap to clone; operations may run concurrently, each
/// on its own QUIC stream. Dropping the last clone closes the connection.
#[derive(Debug, Clone)]
pub struct CnSession {
    inner: Arc<Inner>,
}

impl CnSession {
    /// Connects to the CN and authenticates with `usim` (5G AKA bound to this TLS session,
    /// resynchronising if the USIM reports a SQN failure). Returns the session and the
    /// subscription's policy summary.
    pub async fn connect(
        endpoint: &quinn::Endpoint,
        target: &CnTarget,
        usim: &mut dyn Usim,
    ) -> Result<(CnSession, AuthResult), CnClientError> {
        Self::connect_with(endpoint, target, usim, ClientOptions::default()).await
    }

    /// [`connect`](Self::connect) with explicit timeouts.
    pub async fn connect_with(
        endpoint: &quinn::Endpoint,
        target: &CnTarget,
        usim: &mut dyn Usim,
        opts: ClientOptions,
    ) -> Result<(CnSession, AuthResult), CnClientError> {
        let conn =
            open_connection(endpoint, target, crate::ALPN_CN, "companion-cn/2", &opts).await?;
        let result = Self::authenticate(&conn, target, usim, &opts).await;
        match result {
            Ok((session, policy)) => Ok((
                CnSession {
                    inner: Arc::new(Inner {
                        conn,
                        session,
                        opts,
                    }),
                },
                policy,
            )),
            Err(e) => {
                conn.close(0u32.into(), b"authentication failed");
                Err(e)
            }
        }
    }

    async fn authenticate(
        conn: &quinn::Connection,
        target: &CnTarget,
        usim: &mut dyn Usim,
        opts: &ClientOptions,
    ) -> Result<(ClientSession, AuthResult), CnClientError> {
        authenticate(conn, target, usim, opts).await
    }

    /// The policy summary the CN sent when the session was authenticated.
    pub fn auth_result(&self) -> Option<&AuthResult> {
        self.inner.session.result()
    }

    /// The companion SUPI this session authenticated as.
    pub fn supi(&self) -> &str {
        self.inner.session.supi().as_str()
    }

    /// The underlying QUIC connection (statistics, or raw streams in tests).
    pub fn connection(&self) -> &quinn::Connection {
        &self.inner.conn
    }

    /// The CN's address.
    pub fn remote_address(&self) -> SocketAddr {
        self.inner.conn.remote_address()
    }

    /// Sends a batch (at most `AuthResult.max_batch_items` items, unique request IDs) and
    /// returns the per-item results. A retry with the same request IDs (on any session of the
    /// same companion) returns the same credentials.
    pub async fn batch(&self, b: BatchProvision) -> Result<BatchResult, CnClientError> {
        let req = self.inner.session.batch(Instant::now(), b)?;
        match self.run(req).await? {
            RequestEvent::BatchResult(r) => Ok(r),
            _ => Err(CnClientError::Stream("unexpected answer to a batch".into())),
        }
    }

    /// Revokes a child credential of this companion (by SUPI or by device).
    pub async fn revoke(&self, r: Revoke) -> Result<RevokeResult, CnClientError> {
        let req = self.inner.session.revoke(Instant::now(), r)?;
        match self.run(req).await? {
            RequestEvent::RevokeResult(r) => Ok(r),
            _ => Err(CnClientError::Stream(
                "unexpected answer to a revoke".into(),
            )),
        }
    }

    /// Lists this companion's child credentials.
    pub async fn list_children(&self) -> Result<ChildList, CnClientError> {
        let req = self.inner.session.list_children(Instant::now())?;
        match self.run(req).await? {
            RequestEvent::ChildList(l) => Ok(l),
            _ => Err(CnClientError::Stream("unexpected answer to a list".into())),
        }
    }

    async fn run(&self, mut req: ClientRequest) -> Result<RequestEvent, CnClientError> {
        if self.is_closed() {
            return Err(CnClientError::Closed);
        }
        let conn = &self.inner.conn;
        let mut drv = open_stream(conn, self.inner.opts.exchange_timeout).await?;
        // The request is the whole of our side of the exchange.
        if let Err(e) = drv.flush_and_finish(&mut req).await {
            return Err(CnClientError::from_drive(e, conn));
        }
        match drv.next_event(&mut req).await {
            Ok(RequestEvent::Failed { error, .. }) => Err(CnClientError::rejected(error)),
            Ok(ev) => Ok(ev),
            Err(e) => Err(CnClientError::from_drive(e, conn)),
        }
    }

    /// Whether the connection is closed (then connect again).
    pub fn is_closed(&self) -> bool {
        self.inner.conn.close_reason().is_some()
    }

    /// Closes the connection; operations in flight fail with a retryable error.
    pub fn close(&self) {
        self.inner.conn.close(0u32.into(), b"closed by the gateway");
    }
}
