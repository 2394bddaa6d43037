//! The daemon: wiring of every part, the control handler, signals, systemd notifications and
//! the ready file.
//!
//! Start-up order: configuration → state database → gateway identity → pairing registry →
//! companion USIM and CN link → device QUIC server → control socket → metrics → ready file and
//! `READY=1`. SIGTERM/SIGINT: `STOPPING=1`, stop accepting devices, drain in-flight batches (up
//! to `drain_timeout`), close, exit 0. SIGHUP: reload the configuration file (batching limits,
//! log level, pairing window default, credential defaults, device limits for new connections)
//! and log what changed; settings that need a restart (listen addresses, state directory, CN
//! endpoint) are reported as such.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, Instant};

use anyhow::Context;
use companion_crypto::usim::Usim;
use companion_proto::DeviceId;
use companion_proto::pairing::PairingCode;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use tokio::sync::watch;

use crate::clock::{Clock, SystemClock};
use crate::cn_link::{Backoff, CnClients, CnEndpoint, CnLink, CnTargets};
use crate::config::Config;
use crate::control::{
    AccessPolicy, BatchingStatus, CnRevocation, ControlError, ControlHandler, ControlServer,
    DeviceInfo, ErrorKind, PairOutcome, RevokeOutcome, StatusInfo, list_devices,
};
use crate::delivery::{Provisioner, Settings};
use crate::device_server::DeviceServer;
use crate::filter::{Filter, UserspacePolicy};
use crate::metrics::Metrics;
use crate::pairing::{PairingRegistry, WindowStatus};
use crate::state::{Block, State};

/// Command-line options of `gatewayd`.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Configuration file (default: /etc/gatewayd/gatewayd.toml if it exists).
    pub config: Option<PathBuf>,
    /// Where to write `{"devices":..,"metrics":..,"control":..}` once ready.
    pub ready_file: Option<PathBuf>,
}

/// Changes the log filter at run time (SIGHUP); `Err` explains an invalid filter.
pub type LogReload = Box<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

fn notify(states: &[sd_notify::NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::debug!(error = %e, "systemd notification failed");
    }
}

/// Loads the configuration file and the environment overrides.
pub fn load_config(path: Option<&Path>) -> anyhow::Result<(Config, Option<PathBuf>)> {
    let (mut cfg, file) = Config::load_or_default(path)?;
    cfg.apply_env()?;
    Ok((cfg, file))
}

/// The control handler of the running daemon.
#[derive(Debug)]
pub struct Handler {
    cfg: RwLock<Config>,
    state: Arc<State>,
    registry: Arc<PairingRegistry>,
    provisioner: Arc<Provisioner>,
    server: Arc<DeviceServer>,
    link: Arc<CnLink>,
    clock: Arc<dyn Clock>,
    started: Instant,
    companion_supi: Option<String>,
    gateway_fingerprint: String,
    filter: Arc<Filter>,
}

impl Handler {
    /// Pushes the stored blocks and the pairing window to the LAN filter.
    fn sync_filter(&self) {
        let now = self.clock.unix_now();
        match self.state.blocks(now) {
            Ok(blocks) => self
                .filter
                .sync(&blocks, self.registry.window().is_some(), now),
            Err(e) => tracing::error!(error = %e, "cannot read blocks for the LAN filter"),
        }
    }

    fn cfg(&self) -> Config {
        self.cfg
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

impl ControlHandler for Handler {
    async fn pair(
        &self,
        code: PairingCode,
        label: Option<String>,
    ) -> Result<PairOutcome, ControlError> {
        let (p, new) = self.registry.pair_code(&code, label)?;
        if new {
            tracing::info!(device = %p.device_id, "device paired by code");
            self.provisioner.refresh_gauges();
        }
        let cred = self.state.credential(&p.device_id)?;
        let requesting = self.state.request_for_device(&p.device_id)?.is_some();
        Ok(PairOutcome {
            new,
            device: DeviceInfo::build(
                &p,
                cred.as_ref(),
                requesting,
                self.clock.unix_now(),
                self.cfg().credentials.renewal_margin,
            ),
        })
    }

    async fn open_window(&self, d: Option<Duration>) -> Result<WindowStatus, ControlError> {
        let d = d.unwrap_or(self.cfg().pairing.window);
        let w = self.registry.open_window(d)?;
        tracing::info!(seconds = d.as_secs(), "pairing window opened");
        self.sync_filter();
        Ok(w)
    }

    async fn devices(&self) -> Result<Vec<DeviceInfo>, ControlError> {
        Ok(list_devices(
            &self.state,
            self.clock.unix_now(),
            self.cfg().credentials.renewal_margin,
        )?)
    }

    async fn revoke(&self, device: DeviceId) -> Result<RevokeOutcome, ControlError> {
        let fingerprint = self.registry.get(&device).map(|p| p.fingerprint);
        let r = self.registry.revoke(&device)?;
        if let Some(fp) = fingerprint {
            self.server.disconnect(&fp);
            let n = self.filter.forget_device(&fp);
            tracing::info!(device = %device, sources = n, "LAN filter: the revoked device's learned addresses left the paired-source map");
        }
        tracing::info!(device = %device, supi = ?r.supi.as_ref().map(|s| s.as_str()), "device revoked");
        // Always asked of the CN, by device ID: every child issued to this device under this
        // parent is revoked there, not only the one held here (an older one, or one whose
        // answer is still in flight). Until the CN confirms, the revocation stays persisted
        // and is retried; the device ID is not provisioned again meanwhile.
        let cn = match self.provisioner.revoke_at_cn(&r).await {
            Ok(revoked) if revoked.is_empty() => CnRevocation::NoCredential,
            Ok(_) => CnRevocation::Revoked,
            Err(reason) => CnRevocation::Pending {
                reason: format!("{reason}; retried automatically"),
            },
        };
        self.provisioner.refresh_gauges();
        Ok(RevokeOutcome {
            supi: r.supi.map(|s| s.to_string()),
            cn,
        })
    }

    async fn status(&self) -> Result<StatusInfo, ControlError> {
        let now = self.clock.unix_now();
        let c = self.state.counts()?;
        let b = self.provisioner.batching();
        Ok(StatusInfo {
            version: env!("CARGO_PKG_VERSION").into(),
            uptime_secs: self.started.elapsed().as_secs(),
            companion_supi: self.companion_supi.clone(),
            gateway_fingerprint: Some(self.gateway_fingerprint.clone()),
            cn_link: self.link.state(),
            devices_paired: c.pairings,
            credentials_held: c.credentials,
            credentials_expiring_24h: self.state.credentials_expiring_by(now + 86_400)?.len()
                as u64,
            deliveries_pending: c.pending_deliveries,
            requests_outstanding: c.outstanding_requests,
            revocations_unconfirmed: c.unconfirmed_revocations,
            queue_depth: self.provisioner.queue_depth() as u64,
            active_connections: self.server.connections() as u64,
            pairing_window: self.registry.window(),
            blocks: self.state.blocks(now)?,
            batching: Some(BatchingStatus {
                max_batch: b.max_batch,
                max_wait_ms: b.max_wait.as_millis() as u64,
                max_in_flight: b.max_in_flight,
                queue_capacity: b.queue_capacity,
                batches_in_flight: self.provisioner.batches_in_flight(),
            }),
            filter: Some(Box::new(self.filter.status())),
            cn_sessions: self.link.sessions_info(),
            cn_endpoints: self.link.endpoints_info(),
        })
    }

    async fn block(
        &self,
        addr: std::net::IpAddr,
        d: Option<Duration>,
    ) -> Result<Block, ControlError> {
        let now = self.clock.unix_now();
        let b = Block {
            addr,
            until: d.map(|d| now + d.as_secs() as i64),
            created_at: now,
        };
        self.state.block(&b)?;
        self.sync_filter();
        tracing::info!(addr = %addr, until = ?b.until, "source blocked");
        Ok(b)
    }

    async fn unblock(&self, addr: std::net::IpAddr) -> Result<bool, ControlError> {
        let was = self.state.unblock(addr)?;
        self.sync_filter();
        Ok(was)
    }
}

/// The CN endpoints, their TLS names and what they share (operator CA, serving network name)
/// from the configuration; `None` without a CN. Endpoints are resolved at each connection
/// attempt, not here: one whose name does not resolve yet must not keep the others from serving.
fn cn_targets(cfg: &Config, companion_supi: &str) -> anyhow::Result<Option<CnTargets>> {
    let list = cfg.cn.endpoint_list();
    if list.is_empty() {
        return Ok(None);
    }
    let anchors = CertificateDer::pem_file_iter(&cfg.cn.ca_file)
        .with_context(|| format!("[cn] ca_file {}", cfg.cn.ca_file.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("[cn] ca_file {}", cfg.cn.ca_file.display()))?;
    if anchors.is_empty() {
        anyhow::bail!(
            "[cn] ca_file {} holds no certificate",
            cfg.cn.ca_file.display()
        );
    }
    let snn = match &cfg.cn.serving_network_name {
        Some(s) => s.clone(),
        None => {
            let imsi = companion_supi.trim_start_matches("imsi-");
            let (mcc, mnc) = (
                imsi.get(..3).unwrap_or("001"),
                imsi.get(3..5).unwrap_or("01"),
            );
            companion_proto::ids::serving_network_name(mcc, mnc)?
        }
    };
    Ok(Some(CnTargets {
        endpoints: list
            .iter()
            .map(|e| CnEndpoint {
                label: e.clone(),
                server_name: cfg.cn.server_name_for(e),
            })
            .collect(),
        trust_anchors: anchors,
        serving_network_name: snn,
    }))
}

fn write_ready_file(
    path: &Path,
    devices: SocketAddr,
    metrics: Option<SocketAddr>,
    control: &Path,
) -> anyhow::Result<()> {
    let v = serde_json::json!({
        "devices": devices.to_string(),
        "metrics": metrics.map(|m| m.to_string()),
        "control": control.display().to_string(),
    });
    companion_transport::pki::write_file(path, v.to_string().as_bytes(), 0o644)
        .with_context(|| format!("ready file {}", path.display()))
}

fn settings(cfg: &Config) -> Settings {
    Settings {
        credentials: cfg.credentials.clone(),
        request_timeout: cfg.cn.request_timeout,
    }
}

/// Runs the daemon until SIGTERM/SIGINT.
pub async fn run(opts: Options, log_reload: LogReload) -> anyhow::Result<()> {
    let (cfg, file) = load_config(opts.config.as_deref())?;
    log_reload(&cfg.log_level).map_err(|e| anyhow::anyhow!("log_level: {e}"))?;
    tracing::info!(config = ?file, state_dir = %cfg.state_dir.display(), "gatewayd starting");
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let state = Arc::new(State::open(&cfg.state_dir)?);
    let (identity, origin) = crate::identity::load_or_generate(&cfg.state_dir, "gatewayd")?;
    let gateway_fp = hex::encode(identity.fingerprint()?);
    tracing::info!(fingerprint = %gateway_fp, ?origin, "gateway identity");
    let metrics = Arc::new(Metrics::new()?);
    let registry = Arc::new(PairingRegistry::load(
        state.clone(),
        clock.clone(),
        cfg.pairing.max_window,
    )?);
    metrics.devices_paired.set(registry.len() as i64);

    let (shutdown_tx, shutdown) = watch::channel(false);
    let mut tasks = tokio::task::JoinSet::new();

    // The companion USIM and the CN link.
    let (usim, companion_supi): (Option<Box<dyn Usim>>, Option<String>) = if cfg.cn.configured() {
        let u = crate::companion::open(&cfg)?;
        let supi = u.supi().to_string();
        (Some(u), Some(supi))
    } else {
        tracing::warn!("no [cn] endpoint configured: new requests are answered \"retry later\"");
        (None, None)
    };
    let targets = match &companion_supi {
        Some(s) => cn_targets(&cfg, s)?,
        None => None,
    };
    let labels: Vec<String> = targets
        .as_ref()
        .map(|t| t.endpoints.iter().map(|e| e.label.clone()).collect())
        .unwrap_or_default();
    metrics.init_cn_endpoints(&labels);
    let link = CnLink::new(cfg.cn.sessions, labels);
    metrics.set_cn_link(link.state());
    let provisioner = Provisioner::new(
        state.clone(),
        registry.clone(),
        link.clone(),
        metrics.clone(),
        clock.clone(),
        cfg.batching.batcher(),
        settings(&cfg),
    );
    let mut cn_clients = None;
    if let (Some(targets), Some(usim)) = (targets, usim) {
        let clients = CnClients::bind().context("CN client endpoint")?;
        let usim = Arc::new(tokio::sync::Mutex::new(usim));
        let backoff = Backoff {
            min: cfg.cn.reconnect_min,
            max: cfg.cn.reconnect_max,
        };
        let names: Vec<&str> = targets.endpoints.iter().map(|e| e.label.as_str()).collect();
        tracing::info!(cn = %names.join(", "), snn = %targets.serving_network_name, sessions = cfg.cn.sessions, "connecting to the CN");
        let targets = Arc::new(targets);
        for i in 0..cfg.cn.sessions {
            tasks.spawn(link.clone().run_slot(
                i,
                clients.clone(),
                targets.clone(),
                usim.clone(),
                backoff,
                metrics.clone(),
                shutdown.clone(),
            ));
        }
        cn_clients = Some(clients);
    }
    tasks.spawn(provisioner.clone().run_batcher(shutdown.clone()));
    tasks.spawn(
        provisioner
            .clone()
            .maintain(Duration::from_secs(5), shutdown.clone()),
    );

    // Devices.
    let policy = UserspacePolicy::new();
    let reset_key = companion_transport::restart::load_or_create_reset_key(
        &cfg.state_dir.join(crate::state::RESET_KEY_FILE),
    )?;
    let endpoint = crate::device_server::bind_filtered(
        &cfg.devices,
        &identity,
        registry.clone(),
        policy.clone(),
        &reset_key,
    )
    .with_context(|| format!("device server on {}", cfg.devices.listen))?;
    let devices_addr = endpoint.local_addr()?;
    // The LAN filter: eBPF on the configured interfaces, or the same policy on the socket.
    let filter = Filter::start(&cfg, devices_addr.port(), policy, metrics.clone());
    let server = DeviceServer::new(
        cfg.devices.clone(),
        provisioner.clone(),
        registry.clone(),
        state.clone(),
        metrics.clone(),
        cfg.filter.max_tracked_sources,
    );
    server.set_filter(filter.clone());
    let (accept_tx, accept_rx) = watch::channel(false);
    let accept_task = tokio::spawn(server.clone().serve(endpoint.clone(), accept_rx));
    tracing::info!(addr = %devices_addr, "device server listening");

    // Control socket.
    let access = AccessPolicy::resolve(cfg.control.group.as_deref())?;
    let control = ControlServer::bind(&cfg.control.socket, access)?;
    let control_path = control.path().to_path_buf();
    let handler = Arc::new(Handler {
        cfg: RwLock::new(cfg.clone()),
        state: state.clone(),
        registry: registry.clone(),
        provisioner: provisioner.clone(),
        server: server.clone(),
        link: link.clone(),
        clock: clock.clone(),
        started: Instant::now(),
        companion_supi: companion_supi.clone(),
        gateway_fingerprint: gateway_fp.clone(),
        filter: filter.clone(),
    });
    handler.sync_filter();
    {
        // Keep the filter's maps in line (block expiry, window closing) and export counters.
        let mut s = shutdown.clone();
        let h = handler.clone();
        tasks.spawn(async move {
            loop {
                h.sync_filter();
                h.filter.export_metrics();
                tokio::select! {
                    () = tokio::time::sleep(crate::filter::SYNC_PERIOD) => {}
                    _ = s.wait_for(|v| *v) => break,
                }
            }
        });
    }
    {
        let mut s = shutdown.clone();
        let h = handler.clone();
        tasks.spawn(async move {
            control
                .serve(h, async move {
                    let _ = s.wait_for(|v| *v).await;
                })
                .await;
        });
    }

    // Metrics.
    let mut metrics_addr = None;
    if cfg.metrics.enabled {
        let listener = crate::metrics::bind(cfg.metrics.listen)
            .await
            .with_context(|| format!("metrics listener {}", cfg.metrics.listen))?;
        metrics_addr = Some(listener.local_addr()?);
        let st = state.clone();
        let health: crate::metrics::HealthCheck =
            Arc::new(move || st.counts().map(|_| ()).map_err(|e| e.to_string()));
        let mut s = shutdown.clone();
        let m = metrics.clone();
        tasks.spawn(async move {
            let _ = crate::metrics::serve(listener, m, health, async move {
                let _ = s.wait_for(|v| *v).await;
            })
            .await;
        });
    }

    if let Some(path) = &opts.ready_file {
        write_ready_file(path, devices_addr, metrics_addr, &control_path)?;
    }
    notify(&[
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status(&format!(
            "serving devices on {devices_addr}; {} paired",
            registry.len()
        )),
    ]);
    tracing::info!("gatewayd ready");

    // Watchdog and periodic status.
    if let Some(wd) = sd_notify::watchdog_enabled() {
        let mut s = shutdown.clone();
        let p = provisioner.clone();
        let l = link.clone();
        let srv = server.clone();
        tasks.spawn(async move {
            let period = (wd / 2).max(Duration::from_millis(100));
            loop {
                let status = format!(
                    "CN link {}; {} device connections; queue {}",
                    l.state().as_str(),
                    srv.connections(),
                    p.queue_depth()
                );
                notify(&[
                    sd_notify::NotifyState::Watchdog,
                    sd_notify::NotifyState::Status(&status),
                ]);
                tokio::select! {
                    () = tokio::time::sleep(period) => {}
                    _ = s.wait_for(|v| *v) => break,
                }
            }
        });
    }

    // Signals.
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => {
                notify(&[sd_notify::NotifyState::Reloading]);
                reload(file.as_deref().or(opts.config.as_deref()), &handler, &provisioner, &server, &log_reload);
                notify(&[sd_notify::NotifyState::Ready]);
            }
        }
    }

    // Drain.
    notify(&[
        sd_notify::NotifyState::Stopping,
        sd_notify::NotifyState::Status("draining"),
    ]);
    tracing::info!("shutting down: no new device connections; draining in-flight work");
    let _ = accept_tx.send(true);
    let _ = accept_task.await;
    let drain_limit = handler.cfg().drain_timeout;
    let until = Instant::now() + drain_limit;
    let drained = provisioner.drain(drain_limit).await;
    while server.streams() > 0 && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tracing::info!(drained, streams_left = server.streams(), "drain finished");
    let _ = shutdown_tx.send(true);
    endpoint.close(
        crate::device_server::close::SHUTDOWN.into(),
        b"gateway shutting down",
    );
    link.close_all();
    let _ = tokio::time::timeout(Duration::from_secs(3), async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    tasks.abort_all();
    if let Some(clients) = cn_clients {
        for ep in [clients.v4, clients.v6].into_iter().flatten() {
            let _ = tokio::time::timeout(Duration::from_secs(1), ep.wait_idle()).await;
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
    filter.stop();
    if let Some(path) = &opts.ready_file {
        let _ = std::fs::remove_file(path);
    }
    tracing::info!("gatewayd stopped");
    Ok(())
}

/// SIGHUP: re-reads the configuration and applies what can change at run time.
fn reload(
    path: Option<&Path>,
    handler: &Handler,
    provisioner: &Provisioner,
    server: &DeviceServer,
    log_reload: &LogReload,
) {
    let new = match load_config(path) {
        Ok((c, _)) => c,
        Err(e) => {
            tracing::error!(error = %e, "configuration reload failed; keeping the running configuration");
            return;
        }
    };
    let old = handler.cfg();
    let mut changed = Vec::new();
    if new.batching != old.batching {
        changed.push(format!("batching {:?} -> {:?}", old.batching, new.batching));
    }
    if new.log_level != old.log_level {
        if let Err(e) = log_reload(&new.log_level) {
            tracing::error!(error = %e, "log_level not applied");
        } else {
            changed.push(format!(
                "log_level {:?} -> {:?}",
                old.log_level, new.log_level
            ));
        }
    }
    if new.pairing != old.pairing {
        changed.push(format!("pairing {:?} -> {:?}", old.pairing, new.pairing));
    }
    if new.credentials != old.credentials {
        changed.push("credentials defaults".to_string());
    }
    if new.cn.request_timeout != old.cn.request_timeout {
        changed.push(format!(
            "cn.request_timeout {:?} -> {:?}",
            old.cn.request_timeout, new.cn.request_timeout
        ));
    }
    if new.devices != old.devices {
        changed.push("device limits (for new connections)".to_string());
    }
    if new.drain_timeout != old.drain_timeout {
        changed.push(format!(
            "drain_timeout {:?} -> {:?}",
            old.drain_timeout, new.drain_timeout
        ));
    }
    let restart_needed = new.state_dir != old.state_dir
        || new.devices.listen != old.devices.listen
        || new.metrics != old.metrics
        || new.control != old.control
        || new.cn.endpoint != old.cn.endpoint
        || new.cn.endpoints != old.cn.endpoints
        || new.cn.server_name != old.cn.server_name
        || new.cn.sessions != old.cn.sessions
        || new.companion != old.companion;
    provisioner.reconfigure(new.batching.batcher(), settings(&new));
    server.reconfigure(new.devices.clone());
    server.set_max_tracked_sources(new.filter.max_tracked_sources);
    if new.filter != old.filter || new.devices != old.devices {
        handler.filter.reconfigure(&new);
        if new.filter.mode != old.filter.mode || new.filter.interfaces != old.filter.interfaces {
            changed.push("filter mode/interfaces (need a restart)".to_string());
        } else if new.filter != old.filter {
            changed.push("filter limits".to_string());
        }
    }
    *handler.cfg.write().unwrap_or_else(PoisonError::into_inner) = new;
    if changed.is_empty() {
        tracing::info!("configuration reloaded: nothing changed");
    } else {
        tracing::info!(changes = %changed.join("; "), "configuration reloaded");
    }
    if restart_needed {
        tracing::warn!(
            "some changed settings (listen addresses, state_dir, [cn] endpoint(s)/server_name/sessions, [control], [metrics], [companion]) take effect only after a restart"
        );
    }
}

/// `ControlError` for a failed dependency.
pub fn unavailable(msg: impl Into<String>) -> ControlError {
    ControlError::new(ErrorKind::Unavailable, msg)
}
