//! What every load shares: the simulated devices' identities, their bulk pairing over gatewayd's
//! control socket, the shared quinn client endpoints and the progress bar.
//!
//! 1. Asks gatewayd (control socket) for its status — optionally waiting for its CN link — and
//!    reads the gateway's key fingerprint, which every simulated device pins (as a device does
//!    after first use).
//! 2. Creates N devices `<prefix>-000000`…, each with its own P-256 identity key (on the blocking
//!    pool, in parallel).
//! 3. Pairs them in bulk over a few control-socket connections (`{"op":"pair","code":...}`
//!    lines, what `gatewayctl pair` sends) — unless told not to.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow};
use companion_proto::DeviceId;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use iotdev::DeviceKeys;
use tokio::task::JoinSet;

use crate::control::Control;

/// Control-socket connections used for bulk pairing.
const PAIRING_CONNECTIONS: usize = 4;

/// How to build the fleet.
#[derive(Debug, Clone)]
pub struct FleetOptions {
    /// How many simulated devices.
    pub devices: usize,
    /// gatewayd's control socket (status and bulk pairing).
    pub control_socket: PathBuf,
    /// Device IDs are `<prefix>-<n>`.
    pub id_prefix: String,
    /// Draw a progress bar on stderr.
    pub progress: bool,
    /// Wait (30 s at most) for gatewayd's CN link to be up before starting.
    pub wait_cn_up: bool,
    /// Pair the devices (`false`: their keys are unknown to the gateway, every handshake must
    /// be refused).
    pub pair: bool,
}

/// What every load shares: the devices, how many at once, and the gateway they go to.
#[derive(Debug, Clone)]
pub struct Load {
    /// How many simulated devices.
    pub devices: usize,
    /// Devices in their flow at once.
    pub concurrency: usize,
    /// gatewayd's device address.
    pub gateway: SocketAddr,
    /// gatewayd's control socket (status and bulk pairing).
    pub control_socket: PathBuf,
    /// quinn client endpoints shared by the simulated devices.
    pub endpoints: usize,
    /// Device IDs are `<prefix>-<n>`.
    pub id_prefix: String,
    /// Draw a progress bar on stderr.
    pub progress: bool,
}

impl Load {
    /// How to build this load's fleet: waiting for the CN link first (`wait_cn_up`), paired
    /// with the gateway or not (`pair`).
    pub fn fleet(&self, wait_cn_up: bool, pair: bool) -> FleetOptions {
        FleetOptions {
            devices: self.devices,
            control_socket: self.control_socket.clone(),
            id_prefix: self.id_prefix.clone(),
            progress: self.progress,
            wait_cn_up,
            pair,
        }
    }
}

/// N simulated devices, paired (or not) with the gateway.
#[derive(Debug, Clone)]
pub struct Fleet {
    /// The devices' identities, in device-ID order.
    pub keys: Arc<Vec<DeviceKeys>>,
    /// The gateway's key fingerprint every device pins (`None` if the status did not say).
    pub gateway_pin: Option<[u8; 32]>,
    /// Time spent pairing over the control socket, seconds (0 without pairing).
    pub pairing_s: f64,
    /// Whether the devices were paired with the gateway.
    pub paired: bool,
}

impl Fleet {
    /// Reads the gateway's status, creates the devices' keys and pairs them.
    pub async fn prepare(opts: &FleetOptions) -> anyhow::Result<Self> {
        anyhow::ensure!(opts.devices > 0, "--devices must be at least 1");
        let mut control = Control::connect(&opts.control_socket).await?;
        let status = if opts.wait_cn_up {
            control.wait_cn_up(Duration::from_secs(30)).await?
        } else {
            control.status().await?
        };
        let gateway_pin = status["gateway_fingerprint"].as_str().and_then(|h| {
            let mut out = [0u8; 32];
            hex::decode_to_slice(h, &mut out).ok().map(|()| out)
        });

        let what = if opts.pair { "keys + pairing" } else { "keys" };
        let bar = progress_bar(opts.progress, opts.devices as u64, what);
        let keys = Arc::new(generate_keys(opts.devices, &opts.id_prefix, gateway_pin).await?);

        let pair_started = Instant::now();
        if opts.pair {
            let conns = PAIRING_CONNECTIONS.min(opts.devices);
            let mut pairing = JoinSet::new();
            for c in 0..conns {
                let (keys, path, bar) = (keys.clone(), opts.control_socket.clone(), bar.clone());
                pairing.spawn(async move {
                    let mut ctl = Control::connect(&path).await?;
                    for k in keys.iter().skip(c).step_by(conns) {
                        let code = k.pairing_code().map_err(|e| anyhow!("{e}"))?.to_string();
                        ctl.pair(&code, "loadgen")
                            .await
                            .with_context(|| format!("pairing {}", k.device_id))?;
                        bar.inc(1);
                    }
                    Ok::<_, anyhow::Error>(())
                });
            }
            while let Some(r) = pairing.join_next().await {
                r.context("pairing task")??;
            }
        }
        let pairing_s = if opts.pair {
            pair_started.elapsed().as_secs_f64()
        } else {
            0.0
        };
        bar.finish_and_clear();
        Ok(Self {
            keys,
            gateway_pin,
            pairing_s: (pairing_s * 1000.0).round() / 1000.0,
            paired: opts.pair,
        })
    }

    /// How many devices.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether the fleet has no device.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

/// Kernel buffer asked for each client socket: hundreds of devices' handshake flights arrive
/// at once and the default (~208 KiB) drops them, which a device pays for with a retransmission
/// timeout (capped by `net.core.rmem_max` / `wmem_max`).
const SOCKET_BUFFER: usize = 4 * 1024 * 1024;

/// `n` quinn client endpoints (UDP sockets) of the gateway's address family, shared by the
/// simulated devices round-robin.
pub fn client_endpoints(gateway: SocketAddr, n: usize) -> anyhow::Result<Vec<quinn::Endpoint>> {
    let bind: SocketAddr = if gateway.is_ipv4() {
        SocketAddr::from(([0, 0, 0, 0], 0))
    } else {
        SocketAddr::from(([0u16; 8], 0))
    };
    let runtime =
        quinn::default_runtime().ok_or_else(|| anyhow!("no async runtime for the QUIC client"))?;
    (0..n.max(1))
        .map(|_| {
            let socket =
                std::net::UdpSocket::bind(bind).context("opening a UDP socket for QUIC")?;
            let s = socket2::SockRef::from(&socket);
            // Best effort: smaller buffers only cost retransmissions.
            let _ = s.set_recv_buffer_size(SOCKET_BUFFER);
            let _ = s.set_send_buffer_size(SOCKET_BUFFER);
            quinn::Endpoint::new(
                quinn::EndpointConfig::default(),
                None,
                socket,
                runtime.clone(),
            )
            .context("opening a QUIC client endpoint")
        })
        .collect()
}

/// A progress bar on stderr, or a hidden one.
pub fn progress_bar(enabled: bool, len: u64, what: &str) -> ProgressBar {
    if !enabled {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr());
    if let Ok(style) = ProgressStyle::with_template(
        "{prefix:>13} [{elapsed_precise}] {wide_bar} {pos}/{len} ({per_sec}) {msg}",
    ) {
        bar.set_style(style);
    }
    bar.set_prefix(what.to_string());
    bar
}

/// `devices` identities `<prefix>-000000`…, generated on the blocking pool, one worker per core.
async fn generate_keys(
    devices: usize,
    prefix: &str,
    pin: Option<[u8; 32]>,
) -> anyhow::Result<Vec<DeviceKeys>> {
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get());
    let per = devices.div_ceil(workers);
    let mut set = JoinSet::new();
    for w in 0..workers {
        let (lo, hi) = ((w * per).min(devices), ((w + 1) * per).min(devices));
        let prefix = prefix.to_string();
        set.spawn_blocking(move || {
            (lo..hi)
                .map(|i| {
                    let id = DeviceId::new(&format!("{prefix}-{i:06}")).map_err(|e| {
                        anyhow!("device ID {prefix}-{i:06}: {e} (change --id-prefix)")
                    })?;
                    let mut k = DeviceKeys::generate(id).map_err(|e| anyhow!("{e}"))?;
                    k.gateway_pin = pin;
                    Ok((i, k))
                })
                .collect::<anyhow::Result<Vec<_>>>()
        });
    }
    let mut all = Vec::with_capacity(devices);
    while let Some(r) = set.join_next().await {
        all.extend(r.context("key generation task")??);
    }
    all.sort_by_key(|(i, _)| *i);
    Ok(all.into_iter().map(|(_, k)| k).collect())
}
