//! The device-facing QUIC server (`companion-device/2`, seed steps 1, 2 and 6).
//!
//! - TLS 1.3 with mandatory client certificates admitted by the [`PairingRegistry`] through
//!   [`PinnedClientVerifier`]: an unpaired key fails the handshake (unless a pairing window is
//!   open, in which case the first key to complete a handshake claims it).
//! - Limits for thousands of small devices: idle timeout, at most `max_connections` connections,
//!   at most 2 bidirectional streams per connection (transport limit), at most
//!   `max_connections_per_device` connections per key, a per-IP rate of new connections, and
//!   one provisioning at a time per device.
//! - Address validation ([`RetryPolicy`]): a QUIC Retry to new connections from addresses that
//!   have not proved they receive our packets (always, by default), so a forged source address
//!   costs no handshake work; only failures from validated addresses count towards an automatic
//!   block. Every table keyed by address is bounded ([`BoundedMap`]).
//! - One [`ServerExchange`] per stream with a per-stream silence deadline; a device that sends
//!   garbage is cut off (connection closed), one that stalls loses its stream, one that
//!   reconnects in a loop is refused at the door — none of it affects other devices.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use companion_proto::device::{DeviceRequest, ServerEvent, ServerExchange};
use companion_proto::msg::{CredentialDelivery, ErrorCode, ErrorMsg};
use companion_proto::{Config, DeviceId, ProtoError};
use companion_transport::{
    ALPN_DEVICE, Identity, KeyPolicy, Limits, PinnedClientVerifier, negotiated_alpn, peer_chain,
    peer_fingerprint, server_config,
};
use rustls::pki_types::CertificateDer;
use tokio::sync::watch;

use crate::bounded::BoundedMap;
use crate::config::{DevicesConfig, RetryPolicy};
use crate::delivery::{Peer, Provisioner, Reply, decode_sealed};
use crate::filter::{Filter, FilteredSocket, UserspacePolicy};
use crate::metrics::{Metrics, address, giveup, kind, table};
use crate::pairing::{Admission, PairingRegistry};
use crate::state::{AckOutcome, State};

/// Application close codes sent to devices.
pub mod close {
    pub const DONE: u32 = 0;
    pub const NOT_PAIRED: u32 = 1;
    pub const PROTOCOL: u32 = 2;
    pub const TOO_MANY: u32 = 3;
    pub const REVOKED: u32 = 4;
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

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

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

struct StreamGuard<'a>(&'a AtomicUsize);

impl Drop for StreamGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// How a stream ended.
enum StreamEnd {
    Normal,
    /// The device broke the protocol (garbage): cut the whole connection off.
    Garbage,
}

type Work = Pin<Box<dyn Future<Output = Reply> + Send>>;

impl DeviceServer {
    pub fn new(
        cfg: DevicesConfig,
        provisioner: Arc<Provisioner>,
        registry: Arc<PairingRegistry>,
        state: Arc<State>,
        metrics: Arc<Metrics>,
        max_tracked_sources: usize,
    ) -> Arc<Self> {
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

    /// A handshake from `ip` failed or was refused. Counted towards an automatic block only if
    /// the address was `validated` (the client proved it receives our packets there: a Retry
    /// token, or a completed handshake); otherwise the source may be forged, and the address
    /// only becomes a Retry suspect (`retry = "under_load"`).
    fn handshake_failed(&self, ip: IpAddr, validated: bool) {
        let label = if validated {
            address::VALIDATED
        } else {
            address::UNVALIDATED
        };
        self.metrics
            .handshake_failures
            .with_label_values(&[label])
            .inc();
        if !validated {
            let (evicted, len) = {
                let mut s = lock(&self.suspects);
                let evicted = s.insert(ip, Instant::now()).is_some();
                (evicted, s.len())
            };
            self.metrics
                .address_table(table::RETRY_SUSPECTS, len, usize::from(evicted));
            return;
        }
        let Some(f) = self.filter.get() else { return };
        let now = unix_now();
        if let Some(b) = f.note_failure(ip, now) {
            tracing::warn!(addr = %ip, until = ?b.until, "repeated failed handshakes: source blocked");
            self.make_room_for_a_block(now);
            if let Err(e) = self.state.block(&b) {
                tracing::error!(error = %e, "cannot store an automatic block");
            }
            if let Ok(blocks) = self.state.blocks(now) {
                self.metrics.address_table(table::BLOCKS, blocks.len(), 0);
                f.sync(&blocks, self.registry.window().is_some(), now);
            }
        }
    }

    /// Keeps the stored blocks within the deny list's size (`DENY_MAX`): a full list loses the
    /// block that ends soonest (never an indefinite one, the owner's) to the new one.
    fn make_room_for_a_block(&self, now: i64) {
        let max = companion_filter_common::DENY_MAX as usize;
        let Ok(blocks) = self.state.blocks(now) else {
            return;
        };
        for (until, addr) in blocks_to_evict(&blocks, max) {
            match self.state.unblock(addr) {
                Ok(_) => {
                    tracing::warn!(
                        addr = %addr,
                        until,
                        "deny list full ({max} blocks): the block ending soonest makes room"
                    );
                    self.metrics
                        .address_table_evictions
                        .with_label_values(&[table::BLOCKS])
                        .inc();
                }
                Err(e) => tracing::error!(error = %e, "cannot lift a block to make room"),
            }
        }
    }

    /// Whether a new connection from `ip`, not yet validated, gets a Retry.
    fn wants_retry(&self, cfg: &DevicesConfig, ip: IpAddr, window: Duration) -> bool {
        match cfg.retry {
            RetryPolicy::Always => true,
            RetryPolicy::Never => false,
            RetryPolicy::UnderLoad => {
                if self.handshaking.load(Ordering::Relaxed) >= cfg.retry_load_handshakes {
                    return true;
                }
                let mut s = lock(&self.suspects);
                match s.peek(&ip) {
                    Some(t) if t.elapsed() < window => true,
                    Some(_) => {
                        s.remove(&ip);
                        false
                    }
                    None => false,
                }
            }
        }
    }

    /// Bounds the per-address tables to `max_tracked_sources` (SIGHUP).
    pub fn set_max_tracked_sources(&self, max: usize) {
        let (evicted, len) = {
            let mut r = lock(&self.rate);
            (r.set_capacity(max), r.len())
        };
        self.metrics
            .address_table(table::CONNECTION_RATE, len, evicted);
        let (evicted, len) = {
            let mut s = lock(&self.suspects);
            (s.set_capacity(max), s.len())
        };
        self.metrics
            .address_table(table::RETRY_SUSPECTS, len, evicted);
    }

    /// A device abandoned its exchange before the gateway answered: logged and counted
    /// (`gatewayd_device_giveups_total`), so a gateway that breaks its `Pending` promise shows.
    fn gave_up(
        &self,
        reason: &'static str,
        device: Option<&DeviceId>,
        request_id: Option<companion_proto::RequestId>,
        started: Instant,
        pendings: u32,
        detail: &str,
    ) {
        self.metrics
            .device_giveups
            .with_label_values(&[reason])
            .inc();
        tracing::info!(
            device = %device.map_or_else(|| "?".to_string(), |d| d.to_string()),
            request_id = %request_id.map_or_else(|| "?".to_string(), |r| r.to_string()),
            waited_ms = started.elapsed().as_millis() as u64,
            pendings,
            reason,
            detail,
            "the device gave up before its answer"
        );
    }

    /// Limits that apply to new connections from now on (SIGHUP).
    pub fn reconfigure(&self, cfg: DevicesConfig) {
        *lock(&self.cfg) = cfg;
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

    fn admit_rate(&self, ip: IpAddr, per_sec: u32) -> bool {
        if per_sec == 0 {
            return true;
        }
        let now = Instant::now();
        let burst = f64::from(per_sec) * 2.0;
        let mut rate = lock(&self.rate);
        if !rate.contains_key(&ip) {
            let evicted = rate
                .insert(
                    ip,
                    Bucket {
                        tokens: burst,
                        at: now,
                    },
                )
                .is_some();
            self.metrics
                .address_table(table::CONNECTION_RATE, rate.len(), usize::from(evicted));
        }
        // Just inserted if it was missing (the invariant the `else` relies on).
        let Some(b) = rate.get_mut(&ip) else {
            return true;
        };
        b.tokens =
            (b.tokens + now.duration_since(b.at).as_secs_f64() * f64::from(per_sec)).min(burst);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            true
        } else {
            false
        }
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
        let done = tokio::time::timeout(Duration::from_secs(10), async { incoming.await }).await;
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

    async fn stream(
        &self,
        mut send: quinn::SendStream,
        mut recv: quinn::RecvStream,
        peer: &Peer,
        paired: Option<DeviceId>,
        stream_timeout: Duration,
        conn: &quinn::Connection,
    ) -> StreamEnd {
        let rtt = || conn.rtt();
        let mut pendings = 0u32;
        let mut ex = ServerExchange::new(
            Instant::now(),
            Config {
                timeout: stream_timeout,
                ..Config::default()
            },
            paired.clone(),
        );
        let mut work: Option<Work> = None;
        let mut busy_guard: Option<BusyGuard<'_>> = None;
        let mut next_pending: Option<Instant> = None;
        let mut started = Instant::now();
        let mut req_kind = kind::PROVISION;
        let mut device: Option<DeviceId> = paired;
        let mut end = StreamEnd::Normal;
        let mut current_rid = None;
        loop {
            while let Some(ev) = ex.poll_event() {
                match ev {
                    ServerEvent::Request(r) => {
                        started = Instant::now();
                        current_rid = Some(r.request_id());
                        if let DeviceRequest::Provision(p) = &r {
                            device.get_or_insert_with(|| p.device_id.clone());
                        } else {
                            req_kind = kind::RENEW;
                        }
                        let newly = lock(&self.busy).insert(peer.fingerprint);
                        if !newly {
                            let _ = ex.fail(ErrorMsg::retry_after(
                                ErrorCode::Busy,
                                "this device already has an exchange in progress",
                                500,
                            ));
                            continue;
                        }
                        busy_guard = Some(BusyGuard(self, peer.fingerprint));
                        let prov = self.provisioner.clone();
                        let peer = peer.clone();
                        work = Some(Box::pin(async move { prov.handle(&peer, r).await }));
                        next_pending = Some(Instant::now() + FIRST_PENDING_AFTER);
                    }
                    ServerEvent::Acked { request_id, supi } => {
                        drop(busy_guard.take());
                        if let Some(d) = &device {
                            match self
                                .state
                                .acknowledge_async(d.clone(), request_id, unix_now())
                                .await
                            {
                                Ok(AckOutcome::Acknowledged) => {
                                    tracing::info!(device = %d, %supi, "credential delivered and acknowledged");
                                }
                                Ok(_) => {}
                                Err(e) => {
                                    tracing::error!(error = %e, "cannot record an acknowledgement")
                                }
                            }
                        }
                    }
                    ServerEvent::Failed(e) => {
                        if work.is_some() {
                            let reason = if e.code == ErrorCode::Timeout {
                                giveup::TIMEOUT
                            } else {
                                giveup::ERROR
                            };
                            self.gave_up(
                                reason,
                                device.as_ref(),
                                current_rid,
                                started,
                                pendings,
                                &e.reason,
                            );
                        }
                        if e.code == ErrorCode::CredentialUnusable
                            && let (Some(d), Some(rid)) = (&device, current_rid)
                        {
                            tracing::warn!(device = %d, reason = %e.reason, "device could not use its credential; dropping it");
                            self.provisioner.credential_unusable(d, &rid);
                        }
                    }
                }
            }
            while let Some(frame) = ex.poll_transmit() {
                let w = tokio::time::timeout(stream_timeout, send.write_all(&frame)).await;
                if !matches!(w, Ok(Ok(()))) {
                    return end;
                }
            }
            if ex.is_closed() {
                let _ = send.finish();
                // Let the last frames reach the device before the stream is dropped.
                let _ = tokio::time::timeout(Duration::from_secs(2), send.stopped()).await;
                return end;
            }
            let deadline = ex.poll_timeout();
            let pending_at = next_pending.filter(|_| work.is_some());
            tokio::select! {
                chunk = recv.read_chunk(16 * 1024, true) => match chunk {
                    Ok(Some(c)) => {
                        if let Err(e) = ex.handle_bytes(Instant::now(), &c.bytes) {
                            if is_garbage(&e) {
                                end = StreamEnd::Garbage;
                            }
                            tracing::debug!(error = %e, "device stream error");
                        }
                    }
                    Ok(None) => {
                        let _ = ex.handle_end_of_stream();
                    }
                    Err(e) => {
                        if work.is_some() {
                            self.gave_up(giveup::DISCONNECTED, device.as_ref(), current_rid, started, pendings, &e.to_string());
                        }
                        return end;
                    }
                },
                reply = async { match work.as_mut() { Some(w) => w.await, None => std::future::pending().await } } => {
                    work = None;
                    next_pending = None;
                    match reply {
                        Reply::Deliver(d) => {
                            let Some(sealed) = decode_sealed(&d.sealed) else {
                                let _ = ex.fail(ErrorMsg::new(ErrorCode::Internal, "stored credential is damaged"));
                                continue;
                            };
                            let delivery = CredentialDelivery {
                                request_id: d.request_id,
                                supi: d.supi.clone(),
                                expires_at: u64::try_from(d.expires_at).unwrap_or(0),
                                sealed,
                            };
                            if ex.deliver(Instant::now(), delivery).is_ok() {
                                self.metrics
                                    .request_latency
                                    .with_label_values(&[req_kind])
                                    .observe(started.elapsed().as_secs_f64());
                            }
                        }
                        Reply::Fail(e) => {
                            let _ = ex.fail(e);
                        }
                    }
                },
                () = sleep_opt(pending_at) => {
                    // The device may give up `wait` after it receives this Pending: the answer or
                    // the next Pending leaves well before (see `next_pending_after`).
                    let wait = self.provisioner.wait_estimate();
                    let now = Instant::now();
                    if ex.pending(now, wait.as_millis() as u64).is_ok() {
                        pendings += 1;
                        self.metrics.pendings_sent.inc();
                    }
                    next_pending = Some(now + next_pending_after(wait, rtt()));
                },
                () = sleep_opt(deadline) => {
                    if ex.handle_timeout(Instant::now()).is_err() {
                        tracing::debug!("device stream stalled: cut off");
                    }
                }
            }
        }
    }
}

/// The blocks to lift so that one more fits within `max`: those ending soonest, never an
/// indefinite one (the owner's).
fn blocks_to_evict(blocks: &[crate::state::Block], max: usize) -> Vec<(i64, IpAddr)> {
    if blocks.len() < max {
        return Vec::new();
    }
    let mut finite: Vec<_> = blocks
        .iter()
        .filter_map(|b| b.until.map(|u| (u, b.addr)))
        .collect();
    finite.sort_unstable();
    finite.truncate(blocks.len() + 1 - max);
    finite
}

/// When the first `Pending` goes to a device whose request is not answered at once.
const FIRST_PENDING_AFTER: Duration = Duration::from_millis(300);

/// How long after sending `Pending{wait}` the next `Pending` is due, if the answer has not gone
/// first: early enough that it reaches the device before `wait` runs out there. The margin is
/// the larger of half the promise and two round trips plus 100 ms of scheduling slack (never more
/// than the whole promise), so a Pending that is itself delayed by one round trip still arrives
/// in time.
pub fn next_pending_after(wait: Duration, rtt: Duration) -> Duration {
    let margin = (wait / 2)
        .max(rtt.saturating_mul(2) + Duration::from_millis(100))
        .min(wait);
    (wait - margin).max(Duration::from_millis(50))
}

async fn sleep_opt(at: Option<Instant>) {
    match at {
        Some(t) => tokio::time::sleep_until(t.into()).await,
        None => std::future::pending().await,
    }
}

fn is_garbage(e: &ProtoError) -> bool {
    matches!(
        e,
        ProtoError::Frame(_)
            | ProtoError::Body { .. }
            | ProtoError::Unexpected { .. }
            | ProtoError::Violation(_)
    )
}

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
mod tests {
    use super::*;

    #[test]
    fn the_next_pending_leaves_before_the_promise_runs_out_by_two_round_trips() {
        let ms = Duration::from_millis;
        for wait in [1_000u64, 1_500, 2_000, 5_000, 10_000] {
            for rtt in [0u64, 1, 20, 150, 400] {
                let after = next_pending_after(ms(wait), ms(rtt));
                // Sent `after` past the last Pending; even if it takes a whole round trip more
                // than the last one to arrive, the device still sees it before its deadline.
                assert!(
                    after + ms(2 * rtt) < ms(wait),
                    "wait {wait} ms, rtt {rtt} ms: next after {after:?}"
                );
                assert!(after >= ms(50), "not a busy loop: {after:?}");
            }
        }
        // Half the promise at least on a LAN.
        assert_eq!(next_pending_after(ms(2_000), ms(1)), ms(1_000));
    }

    #[test]
    fn a_full_block_list_makes_room_by_lifting_the_block_ending_soonest() {
        use crate::state::Block;
        let b = |last: u8, until: Option<i64>| Block {
            addr: IpAddr::from([10, 0, 0, last]),
            until,
            created_at: 0,
        };
        let blocks = vec![b(1, None), b(2, Some(50)), b(3, Some(20)), b(4, None)];
        assert!(blocks_to_evict(&blocks, 5).is_empty());
        assert_eq!(
            blocks_to_evict(&blocks, 4),
            vec![(20, IpAddr::from([10, 0, 0, 3]))]
        );
        assert_eq!(blocks_to_evict(&blocks, 3).len(), 2);
        // Only indefinite blocks: nothing is lifted (the new block still goes in, over the
        // bound the filter's sync enforces by leaving the soonest-ending out).
        assert!(blocks_to_evict(&[b(1, None), b(2, None)], 2).is_empty());
    }

    #[test]
    fn pending_waits_span_what_the_schedule_assumes() {
        // The schedule above is checked for promises of 1..10 s: what the provisioner promises.
        assert_eq!(crate::delivery::MIN_PENDING_WAIT, Duration::from_secs(1));
        assert_eq!(crate::delivery::MAX_PENDING_WAIT, Duration::from_secs(10));
    }
}
