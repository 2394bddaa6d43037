//! The device-facing QUIC server (`companion-device/2`, seed steps 1, 2 and 6).
//!
//! - TLS 1.3 with mandatory client certificates admitted by the [`PairingRegistry`] through
//!   [`PinnedClientVerifier`]: an unpaired key fails the handshake (unless a pairing window is
//!   open, in which case the first key to complete a handshake claims it).
//! - Limits for thousands of small devices: idle timeout, at most `max_connections` connections,
//!   at most 2 bidirectional streams per connection (transport limit), at most
//!   `max_connections_per_device` connections per key, a per-IP rate of new connections, and
//!   one provisioning at a time per device.
//! - Address validation ([`RetryPolicy`](crate::config::RetryPolicy)): a QUIC Retry to new connections from addresses that
//!   have not proved they receive our packets (always, by default), so a forged source address
//!   costs no handshake work; only failures from validated addresses count towards an automatic
//!   block. Every table keyed by address is bounded ([`BoundedMap`]).
//! - At most `max_handshakes` TLS handshakes at once: further validated connections wait for a
//!   slot in arrival order, their Initials held by quinn, so a power-cut herd is worked through
//!   as a queue instead of overflowing the socket buffer (every dropped Initial costs its device
//!   a retransmission timeout).
//! - One [`ServerExchange`](companion_proto::device::ServerExchange) per stream with a per-stream silence deadline; a device that sends
//!   garbage is cut off (connection closed), one that stalls loses its stream, one that
//!   reconnects in a loop is refused at the door — none of it affects other devices.
//!
//! This module owns the endpoint, the accept loop and each connection's admission by key;
//! `admission` decides who may connect at all (rate, Retry, automatic blocks), and
//! `exchange` runs one exchange per stream through the shared
//! [`StreamDriver`](companion_transport::drive::StreamDriver).

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use companion_transport::{
    ALPN_DEVICE, Identity, KeyPolicy, Limits, PinnedClientVerifier, negotiated_alpn, peer_chain,
    peer_fingerprint, server_config,
};
use rustls::pki_types::CertificateDer;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};

use crate::bounded::BoundedMap;
use crate::config::DevicesConfig;
use crate::delivery::{Peer, Provisioner, Reply};
use crate::filter::{Filter, FilteredSocket, UserspacePolicy};
use crate::metrics::Metrics;
use crate::pairing::{Admission, PairingRegistry};
use crate::state::State;

mod admission;
mod exchange;

use admission::Bucket;
use exchange::StreamEnd;

/// How long a validated connection waits for a handshake slot (`[devices] max_handshakes`)
/// before it is dropped: a device that waited this long is retransmitting into a long queue
/// (the client gives up by its own idle timeout).
const HANDSHAKE_SLOT_WAIT: Duration = Duration::from_secs(10);
pub use exchange::next_pending_after;

/// Application close codes sent to devices.
pub mod close {
    /// The exchange is over; the device closes or the idle timeout does.
    pub const DONE: u32 = 0;
    /// The device's key is not paired (or presented no certificate).
    pub const NOT_PAIRED: u32 = 1;
    /// The device broke the protocol (garbage on a stream, or the wrong ALPN).
    pub const PROTOCOL: u32 = 2;
    /// The device already holds `max_connections_per_device` connections.
    pub const TOO_MANY: u32 = 3;
    /// The device was revoked by its owner.
    pub const REVOKED: u32 = 4;
    /// gatewayd is shutting down (SIGTERM).
    pub const SHUTDOWN: u32 = 5;
}

/// Binds the QUIC endpoint on a socket wrapped by the LAN filter's userspace policy (which
/// judges every datagram when the filter runs in userspace mode, and passes them otherwise).
///
/// `reset_key` (`<state_dir>/reset.key`) keys the stateless-reset tokens and the connection IDs
/// ([`companion_transport::restart`]): after a restart, devices still holding a connection to the
/// previous process get a stateless reset at their next packet and reconnect at once.
pub fn bind_filtered(
    cfg: &DevicesConfig,
    identity: &Identity,
    registry: Arc<PairingRegistry>,
    filter_policy: Arc<UserspacePolicy>,
    reset_key: &[u8; 32],
) -> anyhow::Result<quinn::Endpoint> {
    let limits = Limits {
        idle_timeout: cfg.idle_timeout,
        keep_alive: None,
        max_bidi_streams: 2,
        stream_window: 64 * 1024,
        connection_window: 128 * 1024,
    };
    let policy: Arc<dyn KeyPolicy> = registry;
    let verifier = Arc::new(PinnedClientVerifier::new(policy));
    let mut server = server_config(identity, Some(verifier), &[ALPN_DEVICE], &limits)?;
    server.max_incoming(cfg.max_connections.saturating_mul(2).max(16));
    let runtime = quinn::default_runtime()
        .ok_or_else(|| anyhow::anyhow!("no async runtime for the device QUIC endpoint"))?;
    let socket = std::net::UdpSocket::bind(cfg.listen)?;
    let (rcv, snd) = set_socket_buffers(&socket, cfg.socket_buffer);
    tracing::debug!(
        requested = cfg.socket_buffer,
        receive = rcv,
        send = snd,
        "device socket buffers"
    );
    if rcv < cfg.socket_buffer {
        tracing::warn!(
            requested = cfg.socket_buffer,
            granted = rcv,
            "the kernel granted a smaller device socket receive buffer; bursts of handshakes may \
             be dropped (raise net.core.rmem_max or give gatewayd CAP_NET_ADMIN)"
        );
    }
    let inner = runtime.wrap_udp_socket(socket)?;
    let socket = Arc::new(FilteredSocket::new(inner, filter_policy));
    let endpoint = quinn::Endpoint::new_with_abstract_socket(
        companion_transport::restart::endpoint_config(reset_key),
        Some(server),
        socket,
        runtime,
    )?;
    Ok(endpoint)
}

/// Asks for `bytes` of kernel receive and send buffer on `socket`: first past the system maximum
/// (needs CAP_NET_ADMIN), else up to it. Returns what the kernel granted (its usable halves:
/// Linux reports twice the usable size). Failures leave the defaults, which only cost
/// retransmissions under bursts.
fn set_socket_buffers(socket: &std::net::UdpSocket, bytes: usize) -> (usize, usize) {
    use nix::sys::socket::{getsockopt, setsockopt, sockopt};
    if setsockopt(socket, sockopt::RcvBufForce, &bytes).is_err() {
        let _ = setsockopt(socket, sockopt::RcvBuf, &bytes);
    }
    if setsockopt(socket, sockopt::SndBufForce, &bytes).is_err() {
        let _ = setsockopt(socket, sockopt::SndBuf, &bytes);
    }
    (
        getsockopt(socket, sockopt::RcvBuf).map_or(0, |b| b / 2),
        getsockopt(socket, sockopt::SndBuf).map_or(0, |b| b / 2),
    )
}

/// A connection and its local id.
type ConnEntry = (usize, quinn::Connection);

/// Shared state of the server.
#[derive(Debug)]
pub struct DeviceServer {
    cfg: Mutex<DevicesConfig>,
    provisioner: Arc<Provisioner>,
    registry: Arc<PairingRegistry>,
    state: Arc<State>,
    metrics: Arc<Metrics>,
    active: AtomicUsize,
    streams: AtomicUsize,
    /// Per-address connection rate, bounded by `[filter] max_tracked_sources`.
    rate: Mutex<BoundedMap<IpAddr, Bucket>>,
    /// Addresses that failed a handshake before proving their address, and when: with
    /// `retry = "under_load"` they get a Retry for `failure_window`, so their next failure is
    /// attributable and counts. Bounded like `rate`.
    suspects: Mutex<BoundedMap<IpAddr, Instant>>,
    /// Handshakes in progress (the load `retry = "under_load"` looks at).
    handshaking: AtomicUsize,
    /// Handshake slots (`cfg.max_handshakes` of them); replaced when a reload changes the
    /// limit (connections already waiting keep the old set).
    slots: Mutex<Arc<Semaphore>>,
    /// Open connections by device key.
    conns: Mutex<HashMap<[u8; 32], Vec<ConnEntry>>>,
    /// Device keys with an exchange in progress (one provisioning at a time per device).
    busy: Mutex<HashSet<[u8; 32]>>,
    /// The LAN filter: told about failed handshakes (automatic blocks) and paired sources.
    filter: std::sync::OnceLock<Arc<Filter>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

struct ActiveGuard<'a>(&'a DeviceServer, [u8; 32], usize);

impl Drop for ActiveGuard<'_> {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
        self.0.metrics.active_connections.dec();
        let mut conns = lock(&self.0.conns);
        if let Some(v) = conns.get_mut(&self.1) {
            v.retain(|(id, _)| *id != self.2);
            if v.is_empty() {
                conns.remove(&self.1);
            }
        }
    }
}

struct BusyGuard<'a>(&'a DeviceServer, [u8; 32]);

impl Drop for BusyGuard<'_> {
    fn drop(&mut self) {
        lock(&self.0.busy).remove(&self.1);
    }
}

/// Counts a handshake in progress until dropped.
struct HandshakeGuard(Arc<DeviceServer>);

impl Drop for HandshakeGuard {
    fn drop(&mut self) {
        self.0.handshaking.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Counts a stream (exchange) in progress until dropped.
struct StreamGuard<'a>(&'a AtomicUsize);

impl Drop for StreamGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The provisioner's answer to a device's request, awaited by the stream's exchange.
type Work = Pin<Box<dyn Future<Output = Reply> + Send>>;

impl DeviceServer {
    /// A server with no connections yet; `max_tracked_sources` bounds every table kept per
    /// source address.
    pub fn new(
        cfg: DevicesConfig,
        provisioner: Arc<Provisioner>,
        registry: Arc<PairingRegistry>,
        state: Arc<State>,
        metrics: Arc<Metrics>,
        max_tracked_sources: usize,
    ) -> Arc<Self> {
        let slots = Mutex::new(Arc::new(Semaphore::new(cfg.max_handshakes)));
        Arc::new(Self {
            cfg: Mutex::new(cfg),
            provisioner,
            registry,
            state,
            metrics,
            active: AtomicUsize::new(0),
            streams: AtomicUsize::new(0),
            rate: Mutex::new(BoundedMap::new(max_tracked_sources)),
            suspects: Mutex::new(BoundedMap::new(max_tracked_sources)),
            handshaking: AtomicUsize::new(0),
            slots,
            conns: Mutex::new(HashMap::new()),
            busy: Mutex::new(HashSet::new()),
            filter: std::sync::OnceLock::new(),
        })
    }

    /// Connects the LAN filter (failed handshakes feed automatic blocks; paired devices'
    /// addresses feed strict mode).
    pub fn set_filter(&self, filter: Arc<Filter>) {
        let _ = self.filter.set(filter);
    }

    /// Limits that apply to new connections from now on (SIGHUP).
    pub fn reconfigure(&self, cfg: DevicesConfig) {
        let mut current = lock(&self.cfg);
        if current.max_handshakes != cfg.max_handshakes {
            *lock(&self.slots) = Arc::new(Semaphore::new(cfg.max_handshakes));
        }
        *current = cfg;
    }

    /// Waits, in arrival order, for one of the `max_handshakes` slots; `None` after
    /// [`HANDSHAKE_SLOT_WAIT`].
    async fn handshake_slot(&self) -> Option<OwnedSemaphorePermit> {
        let slots = lock(&self.slots).clone();
        if let Ok(p) = slots.clone().try_acquire_owned() {
            return Some(p);
        }
        self.metrics.handshakes_queued.inc();
        self.metrics.handshakes_waiting.inc();
        let got = tokio::time::timeout(HANDSHAKE_SLOT_WAIT, slots.acquire_owned()).await;
        self.metrics.handshakes_waiting.dec();
        // The semaphore is never closed: an error cannot come back.
        got.ok().and_then(Result::ok)
    }

    /// Open device connections.
    pub fn connections(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }

    /// Device streams (exchanges) in progress.
    pub fn streams(&self) -> usize {
        self.streams.load(Ordering::Relaxed)
    }

    /// Closes every connection of the device with this key (revocation).
    pub fn disconnect(&self, fingerprint: &[u8; 32]) -> usize {
        let conns = lock(&self.conns).remove(fingerprint).unwrap_or_default();
        for (_, c) in &conns {
            c.close(close::REVOKED.into(), b"device revoked");
        }
        conns.len()
    }

    /// Accepts connections until `shutdown` turns true; then refuses new ones.
    pub async fn serve(
        self: Arc<Self>,
        endpoint: quinn::Endpoint,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let mut next_id = 0usize;
        loop {
            let incoming = tokio::select! {
                i = endpoint.accept() => match i { Some(i) => i, None => break },
                _ = shutdown.changed() => { if *shutdown.borrow() { break } else { continue } }
            };
            let cfg = lock(&self.cfg).clone();
            if self.active.load(Ordering::Relaxed) >= cfg.max_connections {
                tracing::debug!(remote = %incoming.remote_address(), "refused: too many connections");
                incoming.refuse();
                continue;
            }
            let validated = incoming.remote_address_validated();
            let window = self
                .filter
                .get()
                .map_or(Duration::from_secs(60), |f| f.failure_window());
            let mut incoming = incoming;
            if !validated && self.wants_retry(&cfg, incoming.remote_address().ip(), window) {
                // Stateless: the client comes back with a token proving its address. Nothing
                // per address is kept for it, so forged sources cost one small packet each.
                match incoming.retry() {
                    Ok(()) => {
                        self.metrics.retries_sent.inc();
                        continue;
                    }
                    Err(e) => incoming = e.into_incoming(),
                }
            }
            if !self.admit_rate(incoming.remote_address().ip(), cfg.new_connections_per_ip) {
                tracing::debug!(remote = %incoming.remote_address(), "refused: connection rate");
                incoming.refuse();
                continue;
            }
            next_id += 1;
            let me = self.clone();
            let id = next_id;
            self.handshaking.fetch_add(1, Ordering::Relaxed);
            let guard = HandshakeGuard(self.clone());
            tokio::spawn(async move { me.connection(incoming, id, cfg, validated, guard).await });
        }
        tracing::info!("device server stopped accepting connections");
    }

    async fn connection(
        self: Arc<Self>,
        incoming: quinn::Incoming,
        id: usize,
        cfg: DevicesConfig,
        validated: bool,
        handshake: HandshakeGuard,
    ) {
        let remote = incoming.remote_address();
        // A bounded number of handshakes at once: the others' Initials wait in quinn (arrival
        // order), so a herd does not overflow the socket buffer and every started handshake
        // gets the CPU to finish quickly.
        let Some(slot) = self.handshake_slot().await else {
            tracing::debug!(%remote, "no handshake slot within 10 s; the device will retry");
            self.metrics.handshake_wait_expired.inc();
            incoming.ignore();
            return;
        };
        self.metrics.handshakes_in_progress.inc();
        let done = tokio::time::timeout(Duration::from_secs(10), async { incoming.await }).await;
        self.metrics.handshakes_in_progress.dec();
        drop(slot);
        drop(handshake);
        let conn = match done {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                tracing::info!(%remote, error = %e, "device handshake failed (unpaired key or bad TLS)");
                // Only a handshake the peer got wrong (refused certificate, TLS or QUIC protocol
                // error) counts towards an automatic block; a timeout or a client that gave up
                // is what an honest device does on a loaded network.
                // And only from a validated address: a single forged Initial (bad ALPN, say)
                // fails here too, from whatever source address the sender wrote in it.
                if matches!(e, quinn::ConnectionError::TransportError(_)) {
                    self.handshake_failed(remote.ip(), validated);
                }
                return;
            }
            Err(_) => {
                tracing::debug!(%remote, "device handshake timed out");
                return;
            }
        };
        if negotiated_alpn(&conn).as_deref() != Some(ALPN_DEVICE) {
            conn.close(close::PROTOCOL.into(), b"wrong ALPN");
            return;
        }
        let Some((fingerprint, spki_der)) = peer_key(&conn) else {
            conn.close(close::NOT_PAIRED.into(), b"no client certificate");
            return;
        };
        let paired = match self.registry.classify(&fingerprint) {
            Admission::Paired(d) => Some(d),
            Admission::WindowCandidate => {
                if let Err(e) = self.registry.window_still_open() {
                    tracing::info!(%remote, error = %e, "pairing window refused a new device");
                    conn.close(close::NOT_PAIRED.into(), b"not paired");
                    return;
                }
                tracing::info!(%remote, fingerprint = %hex::encode(fingerprint), "new device admitted by the open pairing window (it pairs only with the window's code)");
                None
            }
            Admission::Refused => {
                conn.close(close::NOT_PAIRED.into(), b"not paired");
                // The handshake completed: the client received our packets at this address.
                self.handshake_failed(remote.ip(), true);
                return;
            }
        };
        if let Some(f) = self.filter.get() {
            f.learn_paired(remote.ip(), fingerprint);
        }
        {
            let mut conns = lock(&self.conns);
            let v = conns.entry(fingerprint).or_default();
            if v.len() >= cfg.max_connections_per_device {
                drop(conns);
                tracing::debug!(%remote, "refused: too many connections for this device");
                conn.close(
                    close::TOO_MANY.into(),
                    b"too many connections for this device",
                );
                return;
            }
            v.push((id, conn.clone()));
        }
        self.active.fetch_add(1, Ordering::Relaxed);
        self.metrics.active_connections.inc();
        let _guard = ActiveGuard(&self, fingerprint, id);
        // A manufacturer chain (a leaf that is not self-issued) is forwarded with the device's
        // items for the CN to check; one over the size limits is not (the device is then
        // simply not attested).
        let attestation =
            match companion_transport::attestation::forwardable_chain(&peer_chain(&conn)) {
                Ok(c) => c,
                Err(e) => {
                    tracing::info!(%remote, error = %e, "device certificate chain not forwarded");
                    None
                }
            };
        let peer = Peer {
            fingerprint,
            spki_der,
            attestation,
        };
        tracing::debug!(%remote, device = ?paired, "device connected");
        loop {
            let (send, recv) = match conn.accept_bi().await {
                Ok(s) => s,
                Err(_) => break,
            };
            let me = self.clone();
            let peer = peer.clone();
            let paired = paired.clone();
            let conn2 = conn.clone();
            let stream_timeout = cfg.stream_timeout;
            tokio::spawn(async move {
                me.streams.fetch_add(1, Ordering::Relaxed);
                let _g = StreamGuard(&me.streams);
                if let StreamEnd::Garbage = me
                    .stream(send, recv, &peer, paired, stream_timeout, &conn2)
                    .await
                {
                    tracing::info!(remote = %conn2.remote_address(), "device sent garbage: connection cut off");
                    conn2.close(close::PROTOCOL.into(), b"protocol violation");
                }
            });
        }
    }
}

/// Now, Unix seconds.
fn unix_now() -> i64 {
    crate::clock::unix_seconds(std::time::SystemTime::now())
}

/// The peer's SPKI fingerprint and DER.
fn peer_key(conn: &quinn::Connection) -> Option<([u8; 32], Vec<u8>)> {
    let fp = peer_fingerprint(conn)?;
    let certs = conn
        .peer_identity()?
        .downcast::<Vec<CertificateDer<'static>>>()
        .ok()?;
    let spki = companion_transport::spki_from_cert(certs.first()?).ok()?;
    Some((fp, spki))
}

#[cfg(test)]
mod tests;
