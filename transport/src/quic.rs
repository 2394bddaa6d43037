//! QUIC endpoint configuration: TLS 1.3 only, ring provider, one ALPN per conversation, and
//! transport limits sized for many small, slow peers.

use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::RootCertStore;
use rustls::client::danger::ServerCertVerifier;
use rustls::pki_types::CertificateDer;
use rustls::server::danger::ClientCertVerifier;

use crate::pki::Identity;
use crate::verify::provider;

/// Errors building an endpoint configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// rustls refused the configuration (protocol versions, key, certificate).
    #[error("TLS configuration rejected: {0}")]
    Tls(#[from] rustls::Error),
    /// The TLS configuration does not suit QUIC (it needs TLS 1.3 and an initial suite).
    #[error("TLS configuration cannot be used for QUIC: {0}")]
    Quic(String),
    /// A [`Limits`] value does not fit QUIC's variable-length integers.
    #[error("transport limit out of range: {0}")]
    Limit(String),
    /// A CA certificate given as a trust anchor cannot be used.
    #[error("trust anchor rejected: {0}")]
    TrustAnchor(String),
}

/// How long a client of the CN waits without receiving anything (not even an acknowledgement of
/// its keep-alives) before it declares the connection dead.
pub const CN_LIVENESS: Duration = Duration::from_secs(2);

/// Transport limits for one side of a conversation.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Close a connection after this long without any packet.
    pub idle_timeout: Duration,
    /// Send keep-alives this often (clients, to hold a NAT binding and detect a dead peer).
    pub keep_alive: Option<Duration>,
    /// Bidirectional streams a peer may have open at once.
    pub max_bidi_streams: u32,
    /// Flow-control window for one stream, bytes.
    pub stream_window: u32,
    /// Flow-control window for a whole connection, bytes.
    pub connection_window: u32,
}

/// What a server grants a connection before its peer authenticated (see
/// [`Limits::until_authenticated`]).
#[derive(Clone, Debug)]
pub struct PreAuth {
    /// Bidirectional streams the peer may have open at once (1: the authentication stream).
    pub max_bidi_streams: u32,
    /// Flow-control window for the whole connection, bytes: the most unread data the peer can
    /// make the server hold.
    pub connection_window: u32,
}

impl Limits {
    /// A device talking to the gateway: one exchange at a time, small messages.
    pub fn device_link() -> Self {
        Self {
            idle_timeout: Duration::from_secs(30),
            keep_alive: Some(Duration::from_secs(10)),
            max_bidi_streams: 2,
            stream_window: 64 * 1024,
            connection_window: 128 * 1024,
        }
    }

    /// The gateway's link to the CN: several batches in flight, each up to a few MiB.
    pub fn cn_link() -> Self {
        Self {
            idle_timeout: Duration::from_secs(60),
            keep_alive: Some(Duration::from_secs(15)),
            max_bidi_streams: 64,
            stream_window: 8 * 1024 * 1024,
            connection_window: 32 * 1024 * 1024,
        }
    }

    /// The client side of a CN link (gateway sessions, device attach): the CN link's windows, but
    /// a dead or frozen CN is noticed within [`CN_LIVENESS`] — a keep-alive every quarter of it,
    /// and the connection is closed when nothing at all came back for that long. QUIC's idle
    /// timeout is the smaller of both sides' values, so this decides for the client's connection
    /// whatever the CN advertises.
    pub fn cn_link_client() -> Self {
        Self {
            idle_timeout: CN_LIVENESS,
            keep_alive: Some(CN_LIVENESS / 4),
            ..Self::cn_link()
        }
    }

    /// These limits narrowed to `pre` for the handshake: what a server advertises to a peer
    /// that has not authenticated yet. [`Limits::grant`] raises a connection to `self` later.
    ///
    /// Only the connection-wide window and the stream count change: quinn (0.11) fixes the
    /// per-stream window for the whole connection at the handshake (every stream's
    /// MAX_STREAM_DATA is its bytes read plus that window), so it cannot be raised for later
    /// streams. It need not be: the connection window bounds the unread bytes of all streams
    /// together, so with `pre.connection_window` and one stream an unauthenticated peer can
    /// make the server buffer at most that much.
    pub fn until_authenticated(&self, pre: &PreAuth) -> Limits {
        Limits {
            max_bidi_streams: pre.max_bidi_streams.min(self.max_bidi_streams),
            connection_window: pre.connection_window.min(self.connection_window),
            ..self.clone()
        }
    }

    /// Raises `conn` (configured with [`Limits::until_authenticated`]) to these limits, once
    /// its peer authenticated: sends MAX_DATA and MAX_STREAMS with the full values.
    pub fn grant(&self, conn: &quinn::Connection) {
        conn.set_receive_window(self.connection_window.into());
        conn.set_max_concurrent_bi_streams(self.max_bidi_streams.into());
    }

    fn transport(&self) -> Result<quinn::TransportConfig, ConfigError> {
        let mut t = quinn::TransportConfig::default();
        let idle = quinn::IdleTimeout::try_from(self.idle_timeout)
            .map_err(|e| ConfigError::Limit(format!("idle timeout: {e}")))?;
        t.max_idle_timeout(Some(idle))
            .keep_alive_interval(self.keep_alive)
            .max_concurrent_bidi_streams(self.max_bidi_streams.into())
            .max_concurrent_uni_streams(0u8.into())
            .stream_receive_window(self.stream_window.into())
            .receive_window(self.connection_window.into());
        Ok(t)
    }
}

fn tls13_server(
    verifier: Option<Arc<dyn ClientCertVerifier>>,
    identity: &Identity,
    alpns: &[&[u8]],
) -> Result<rustls::ServerConfig, ConfigError> {
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?;
    let builder = match verifier {
        Some(v) => builder.with_client_cert_verifier(v),
        None => builder.with_no_client_auth(),
    };
    let mut tls = builder.with_single_cert(identity.chain().to_vec(), identity.private_key())?;
    tls.alpn_protocols = alpns.iter().map(|a| a.to_vec()).collect();
    tls.max_early_data_size = 0;
    // No resumption: every connection presents its key in full (pairing admission and the AKA
    // binding are decided per handshake), so tickets would only cost the server an encryption
    // and a datagram's worth of bytes per handshake.
    tls.send_tls13_tickets = 0;
    tls.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    Ok(tls)
}

/// A QUIC server configuration presenting `identity` and offering `alpns` (one endpoint may serve
/// several conversations; [`negotiated_alpn`] tells a connection's); with `client_verifier`, every
/// client must present a certificate the verifier admits.
pub fn server_config(
    identity: &Identity,
    client_verifier: Option<Arc<dyn ClientCertVerifier>>,
    alpns: &[&[u8]],
    limits: &Limits,
) -> Result<quinn::ServerConfig, ConfigError> {
    let tls = tls13_server(client_verifier, identity, alpns)?;
    let quic = QuicServerConfig::try_from(tls).map_err(|e| ConfigError::Quic(e.to_string()))?;
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(quic));
    cfg.transport_config(Arc::new(limits.transport()?));
    Ok(cfg)
}

/// How a client decides to trust the server.
#[derive(Debug)]
pub enum ServerTrust {
    /// The server's chain must lead to one of these CA certificates (the operator CA for the CN).
    Anchors(Vec<CertificateDer<'static>>),
    /// A custom verifier, such as [`crate::verify::PinnedServerVerifier`] on the LAN.
    Verifier(Arc<dyn ServerCertVerifier>),
}

/// A QUIC client configuration; `identity` is presented when the server asks for a certificate.
pub fn client_config(
    trust: ServerTrust,
    identity: Option<&Identity>,
    alpn: &[u8],
    limits: &Limits,
) -> Result<quinn::ClientConfig, ConfigError> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?;
    let builder = match trust {
        ServerTrust::Anchors(anchors) => {
            let mut roots = RootCertStore::empty();
            for anchor in anchors {
                roots
                    .add(anchor)
                    .map_err(|e| ConfigError::TrustAnchor(e.to_string()))?;
            }
            builder.with_root_certificates(roots)
        }
        ServerTrust::Verifier(v) => builder.dangerous().with_custom_certificate_verifier(v),
    };
    let mut tls = match identity {
        Some(id) => builder.with_client_auth_cert(id.chain().to_vec(), id.private_key())?,
        None => builder.with_no_client_auth(),
    };
    tls.alpn_protocols = vec![alpn.to_vec()];
    let quic = QuicClientConfig::try_from(tls).map_err(|e| ConfigError::Quic(e.to_string()))?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(quic));
    cfg.transport_config(Arc::new(limits.transport()?));
    Ok(cfg)
}

/// The 32-byte TLS exporter (RFC 8446 §7.5, empty context) under `label` for this connection —
/// the value AKA answers are bound to.
pub fn tls_exporter(conn: &quinn::Connection, label: &[u8]) -> Result<[u8; 32], ConfigError> {
    let mut out = [0u8; 32];
    conn.export_keying_material(&mut out, label, b"")
        .map_err(|_| {
            ConfigError::Quic("TLS exporter unavailable before the handshake completes".into())
        })?;
    Ok(out)
}

/// The application protocol the handshake settled on.
pub fn negotiated_alpn(conn: &quinn::Connection) -> Option<Vec<u8>> {
    let data = conn.handshake_data()?;
    let data = data
        .downcast::<quinn::crypto::rustls::HandshakeData>()
        .ok()?;
    data.protocol
}

/// The SHA-256 SPKI fingerprint of the certificate the peer presented, if any.
/// The certificate chain the peer presented in the handshake (leaf first); empty if none.
pub fn peer_chain(conn: &quinn::Connection) -> Vec<CertificateDer<'static>> {
    conn.peer_identity()
        .and_then(|i| i.downcast::<Vec<CertificateDer<'static>>>().ok())
        .map(|b| *b)
        .unwrap_or_default()
}

/// SHA-256 of the SubjectPublicKeyInfo of the peer's leaf certificate (the key pairings and
/// pins are made of); `None` before the handshake or without a certificate.
pub fn peer_fingerprint(conn: &quinn::Connection) -> Option<[u8; 32]> {
    let identity = conn.peer_identity()?;
    let certs = identity.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    let leaf = certs.first()?;
    let spki = crate::pki::spki_from_cert(leaf).ok()?;
    Some(crate::pki::spki_fingerprint(&spki))
}
