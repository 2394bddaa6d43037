//! `cn-backend serve`: binds the QUIC endpoint and the admin HTTP server, announces them in the
//! ready file and to systemd (`READY=1`, `WATCHDOG=1` every `WATCHDOG_USEC/2` when set,
//! `STOPPING=1`; nothing without `NOTIFY_SOCKET`), and drains in-flight batches on SIGTERM/SIGINT.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::Context;
use companion_transport::{ALPN_ATTACH, ALPN_CN, server_config};
use tracing::{info, warn};

use crate::config::Layout;
use crate::http::{HttpState, router};
use crate::metrics::Metrics;
use crate::service::{self, Service};

/// Options of `serve`.
#[derive(Debug, Clone, Default)]
pub struct ServeOptions {
    /// Overrides `listen`.
    pub listen: Option<SocketAddr>,
    /// Overrides `http_listen`.
    pub http_listen: Option<SocketAddr>,
    /// Where to write `{"quic": "...", "http": "..."}` once both listeners are bound.
    pub ready_file: Option<PathBuf>,
}

fn notify(states: &[sd_notify::NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::debug!(error = %e, "systemd notification failed");
    }
}

/// Pings the systemd watchdog every `WATCHDOG_USEC/2` while the runtime, the blocking pool (where
/// every database transaction runs) and the service answer; a wedged pool misses the deadline and
/// systemd restarts the process.
fn spawn_watchdog(svc: Arc<Service>) -> Option<tokio::task::JoinHandle<()>> {
    let wd = sd_notify::watchdog_enabled()?;
    let period = (wd / 2).max(Duration::from_millis(100));
    Some(tokio::spawn(async move {
        loop {
            let alive = tokio::time::timeout(period, tokio::task::spawn_blocking(|| ())).await;
            if matches!(alive, Ok(Ok(()))) {
                let status = format!(
                    "serving; {} gateway sessions; {} batches in flight",
                    svc.metrics.sessions.get(),
                    svc.inflight.load(Ordering::Acquire)
                );
                notify(&[
                    sd_notify::NotifyState::Watchdog,
                    sd_notify::NotifyState::Status(&status),
                ]);
            } else {
                warn!("blocking pool did not answer within {period:?}; skipping a watchdog ping");
            }
            tokio::time::sleep(period).await;
        }
    }))
}

fn write_ready(path: &Path, quic: SocketAddr, http: SocketAddr) -> anyhow::Result<()> {
    let body = serde_json::json!({ "quic": quic.to_string(), "http": http.to_string() });
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, format!("{body}\n"))
        .with_context(|| format!("writing ready file {}", tmp.display()))?;
    std::fs::rename(&tmp, path)
        .with_context(|| format!("renaming ready file to {}", path.display()))?;
    Ok(())
}

/// Runs the service until SIGTERM/SIGINT, then drains and returns.
pub async fn serve(layout: &Layout, opts: ServeOptions) -> anyhow::Result<()> {
    // The store may connect to PostgreSQL through a blocking client: not on an async worker.
    let loaded = tokio::task::block_in_place(|| service::load(layout))
        .with_context(|| format!("loading the data directory {}", layout.dir.display()))?;
    let listen = opts.listen.unwrap_or(loaded.settings.listen);
    let http_listen = opts.http_listen.unwrap_or(loaded.settings.http_listen);
    // Unauthenticated peers get the small pre-authentication windows; a gateway session is
    // raised to the full ones once its AKA succeeded (server::gateway_session).
    let limits =
        crate::server::authenticated_limits().until_authenticated(&crate::server::PRE_AUTH);
    let qcfg = server_config(&loaded.identity, None, &[ALPN_CN, ALPN_ATTACH], &limits)
        .context("building the QUIC server configuration")?;
    // Reset tokens and connection IDs derive from reset.key, kept across restarts: a restarted
    // CN answers the packets of its predecessor's connections with a stateless reset, so
    // gateways reconnect within one round trip instead of an idle timeout.
    let reset_key = companion_transport::restart::load_or_create_reset_key(&layout.reset_key())?;
    let endpoint_cfg = companion_transport::restart::endpoint_config(&reset_key);
    let socket = std::net::UdpSocket::bind(listen).with_context(|| {
        format!("binding the QUIC endpoint on {listen} (in use? change --listen)")
    })?;
    let endpoint = quinn::Endpoint::new(
        endpoint_cfg,
        Some(qcfg),
        socket,
        Arc::new(quinn::TokioRuntime),
    )
    .with_context(|| format!("starting the QUIC endpoint on {listen}"))?;
    let quic_addr = endpoint
        .local_addr()
        .context("reading the QUIC endpoint's address")?;
    let attach_endpoint = if loaded.settings.attach_endpoint.is_empty() {
        let host = loaded
            .settings
            .server_names
            .first()
            .cloned()
            .unwrap_or_else(|| quic_addr.ip().to_string());
        if host.contains(':') {
            format!("[{host}]:{}", quic_addr.port())
        } else {
            format!("{host}:{}", quic_addr.port())
        }
    } else {
        loaded.settings.attach_endpoint.clone()
    };
    let token = service::load_admin_token(layout).context("loading admin.token")?;
    let metrics = Metrics::new().context("creating metrics")?;
    let svc = Arc::new(Service::new(loaded, attach_endpoint.clone(), metrics)?);
    let http = tokio::net::TcpListener::bind(http_listen)
        .await
        .with_context(|| {
            format!("binding the admin HTTP server on {http_listen} (in use? change --http-listen)")
        })?;
    let http_addr = http.local_addr().context("reading the HTTP address")?;
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let app = router(HttpState {
        svc: svc.clone(),
        token: Arc::new(token),
    });
    let http_task = tokio::spawn(async move {
        let r = axum::serve(http, app)
            .with_graceful_shutdown(async move {
                let _ = stop_rx.wait_for(|s| *s).await;
            })
            .await;
        if let Err(e) = r {
            warn!("admin HTTP server failed: {e}");
        }
    });
    let sync_task = match &svc.settings.sync.open5gs {
        Some(o5) if o5.push => {
            let pusher =
                crate::sync::Pusher::new(svc.store.clone(), o5.clone(), svc.metrics.clone())
                    .await
                    .context("configuring [sync.open5gs]")?;
            Some(tokio::spawn(pusher.run(stop_tx.subscribe())))
        }
        _ => None,
    };
    let quic_task = tokio::spawn(crate::server::run(svc.clone(), endpoint.clone()));
    if let Some(p) = &opts.ready_file {
        write_ready(p, quic_addr, http_addr)?;
    }
    info!(quic = %quic_addr, http = %http_addr, attach = %attach_endpoint, "cn-backend serving");
    notify(&[
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status(&format!(
            "serving QUIC on {quic_addr}, HTTP on {http_addr}"
        )),
    ]);
    let watchdog = spawn_watchdog(svc.clone());

    wait_for_signal().await?;
    info!("shutting down: refusing new work, draining in-flight batches");
    notify(&[
        sd_notify::NotifyState::Stopping,
        sd_notify::NotifyState::Status("draining"),
    ]);
    if let Some(w) = watchdog {
        w.abort();
    }
    svc.shutting_down.store(true, Ordering::Release);
    endpoint.set_server_config(None);
    let drain = svc
        .settings
        .drain_timeout()
        .unwrap_or(Duration::from_secs(30));
    let started = Instant::now();
    while svc.inflight.load(Ordering::Acquire) > 0 && started.elapsed() < drain {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let left = svc.inflight.load(Ordering::Acquire);
    if left > 0 {
        warn!(left, "drain timeout: closing with batches still in flight");
    }
    endpoint.close(0u32.into(), b"shutting down");
    let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
    quic_task.abort();
    let _ = stop_tx.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(5), http_task).await;
    if let Some(t) = sync_task {
        // Whatever was not pushed stays in the outbox for the next start.
        let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
    }
    info!("stopped");
    Ok(())
}

async fn wait_for_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    tokio::select! {
        _ = term.recv() => info!("SIGTERM"),
        _ = int.recv() => info!("SIGINT"),
    }
    Ok(())
}
