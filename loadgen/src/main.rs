//! `loadgen`: simulated devices against a real gatewayd (and cn-backend): `provision`,
//! `handshake`, `hold`, `flood`. See `README.md`.
#![warn(missing_docs)]

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, anyhow};
use clap::{Args, Parser, Subcommand, ValueEnum};
use companion_proto::msg::Params;
use loadgen::fleet::Load;
use loadgen::handshake::HandshakeOptions;
use loadgen::hold::HoldOptions;
use loadgen::report::Summary;
use loadgen::run::{Options, run};
use serde::Serialize;

#[derive(Debug, Parser)]
#[command(
    name = "loadgen",
    version,
    about = "Simulated IoT devices through the real device flow against a real gatewayd"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Progress {
    /// When stderr is a terminal.
    Auto,
    Always,
    Never,
}

/// Options every device load shares.
#[derive(Debug, Args)]
struct Common {
    /// Number of simulated devices.
    #[arg(long, default_value_t = 100)]
    devices: usize,
    /// Devices in flight at once.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// gatewayd's device address (`devices` in its ready file).
    #[arg(long)]
    gateway: String,
    /// gatewayd's control socket (`control` in its ready file).
    #[arg(long, env = "GATEWAYD_CONTROL_SOCKET")]
    control_socket: PathBuf,
    /// Write the JSON report here (`-` = stdout).
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// quinn client endpoints (UDP sockets) shared by the devices.
    #[arg(long, default_value_t = 4)]
    endpoints: usize,
    /// Device IDs are `<prefix>-<n>` [default: lg-<random>].
    #[arg(long)]
    id_prefix: Option<String>,
    /// Progress bar on stderr.
    #[arg(long, value_enum, default_value = "auto")]
    progress: Progress,
}

impl Common {
    /// The load these options describe, with the gateway's address resolved, the device-ID
    /// prefix drawn when not given, and the progress bar decided.
    async fn load(&self) -> anyhow::Result<Load> {
        let gateway = resolve(&self.gateway).await?;
        let id_prefix = match &self.id_prefix {
            Some(p) => p.clone(),
            None => {
                let r = iotdev::random_request_id().map_err(|e| anyhow!("{e}"))?;
                format!("lg-{}", hex::encode(&r.as_bytes()[..3]))
            }
        };
        let progress = match self.progress {
            Progress::Always => true,
            Progress::Never => false,
            Progress::Auto => std::io::stderr().is_terminal(),
        };
        Ok(Load {
            devices: self.devices,
            concurrency: self.concurrency,
            gateway,
            control_socket: self.control_socket.clone(),
            endpoints: self.endpoints,
            id_prefix,
            progress,
        })
    }
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Pair N simulated devices in bulk, provision each through gatewayd (credential opened and
    /// checked), optionally attach each at the CN; report throughput and latency percentiles.
    /// Exits 1 when any device failed.
    Provision {
        #[command(flatten)]
        common: Common,
        /// Also attach every provisioned device at the CN (5G AKA with its new credential).
        #[arg(long)]
        attach: bool,
        /// Serving network name for the attaches.
        #[arg(long, default_value = iotdev::attach::DEFAULT_SERVING_NETWORK)]
        serving_network: String,
        /// Include every device's outcome in the JSON report.
        #[arg(long)]
        per_device: bool,
        /// Longest a device keeps retrying busy / CN-unavailable answers, seconds (per phase).
        #[arg(long, default_value_t = 60)]
        retry_for: u64,
        /// Most retries per device and phase.
        #[arg(long, default_value_t = 100)]
        max_retries: u32,
        /// Longest single exchange with the gateway, seconds.
        #[arg(long, default_value_t = 30)]
        patience: u64,
        /// Requested credential lifetime, seconds (the operator may grant less).
        #[arg(long)]
        lifetime: Option<u64>,
    },
    /// The ceiling of the device leg: N devices (paired in bulk, as `provision` does) each open a
    /// QUIC connection with mutual TLS to gatewayd and close it once the gateway has confirmed
    /// the handshake (its HANDSHAKE_DONE arrived: it admitted the device's key). No stream is
    /// opened. Exits 1 when any handshake failed.
    Handshake {
        #[command(flatten)]
        common: Common,
        /// Do not pair the devices: every handshake must then be refused (`not_paired`).
        #[arg(long)]
        unpaired: bool,
        /// Longest single handshake, seconds.
        #[arg(long, default_value_t = 10)]
        timeout: u64,
    },
    /// Connect N paired devices (C at a time) and hold every connection open (QUIC keep-alives)
    /// until SIGTERM/SIGINT or --hold-for; the ready file says when all are connected; then
    /// close them and report how many stayed connected. Exits 1 when any device failed to
    /// connect or lost its connection.
    Hold {
        #[command(flatten)]
        common: Common,
        /// End the hold after this many seconds [default: hold until SIGTERM/SIGINT].
        #[arg(long, value_name = "SECS")]
        hold_for: Option<f64>,
        /// Write `{"connected": n, "failed": m, ...}` here once every device has connected or
        /// failed (removed at the end).
        #[arg(long, value_name = "FILE")]
        ready_file: Option<PathBuf>,
        /// QUIC keep-alive interval, seconds; must stay below gatewayd's `[devices]
        /// idle_timeout` (30 s by default).
        #[arg(long, default_value_t = 10.0)]
        keep_alive: f64,
        /// Longest single handshake, seconds.
        #[arg(long, default_value_t = 10)]
        timeout: u64,
    },
    /// A bounded UDP flood at gatewayd's QUIC port (junk, short Initials, or well-formed
    /// Initials from many source addresses) to exercise the LAN filter. Loopback targets only,
    /// unless run inside a test network namespace with --allow-target.
    Flood(loadgen::flood::FloodArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Cmd::Flood(args) = cli.cmd {
        return match loadgen::flood::main(args) {
            Ok(true) => ExitCode::SUCCESS,
            Ok(false) => ExitCode::FAILURE,
            Err(e) => {
                eprintln!("loadgen: error: {e:#}");
                ExitCode::from(2)
            }
        };
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("loadgen: error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(main_async(cli)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("loadgen: error: {e:#}");
            ExitCode::from(2)
        }
    }
}

async fn main_async(cli: Cli) -> anyhow::Result<bool> {
    match cli.cmd {
        Cmd::Provision {
            common,
            attach,
            serving_network,
            per_device,
            retry_for,
            max_retries,
            patience,
            lifetime,
        } => {
            let opts = Options {
                load: common.load().await?,
                attach,
                serving_network,
                retry_for: Duration::from_secs(retry_for),
                max_retries,
                per_device,
                params: Params {
                    lifetime_s: lifetime,
                    ..Params::default()
                },
                patience: Duration::from_secs(patience),
            };
            let report = run(opts).await?;
            emit(&report, common.json.as_deref())
        }
        Cmd::Handshake {
            common,
            unpaired,
            timeout,
        } => {
            let report = loadgen::handshake::run(HandshakeOptions {
                load: common.load().await?,
                pair: !unpaired,
                timeout: Duration::from_secs(timeout),
            })
            .await?;
            emit(&report, common.json.as_deref())
        }
        Cmd::Hold {
            common,
            hold_for,
            ready_file,
            keep_alive,
            timeout,
        } => {
            let secs = |what: &str, v: f64| {
                Duration::try_from_secs_f64(v)
                    .map_err(|e| anyhow!("{what} must be a number of seconds: {e}"))
            };
            let report = loadgen::hold::run(HoldOptions {
                load: common.load().await?,
                timeout: Duration::from_secs(timeout),
                keep_alive: secs("--keep-alive", keep_alive)?,
                hold_for: hold_for.map(|h| secs("--hold-for", h)).transpose()?,
                ready_file,
            })
            .await?;
            emit(&report, common.json.as_deref())
        }
        Cmd::Flood(_) => Err(anyhow!("unexpected subcommand")),
    }
}

/// Prints `report`'s human summary, writes its JSON to `json` when asked, and says whether
/// every device succeeded.
fn emit<R: Summary + Serialize>(report: &R, json: Option<&Path>) -> anyhow::Result<bool> {
    print!("{}", report.human());
    write_json(json, report)?;
    Ok(report.all_ok())
}

/// Writes the JSON report to `path` (`-` = stdout), if asked.
fn write_json(path: Option<&Path>, report: &impl Serialize) -> anyhow::Result<()> {
    let Some(path) = path else { return Ok(()) };
    let text = serde_json::to_string_pretty(report).context("encoding the report")?;
    if path.as_os_str() == "-" {
        println!("{text}");
    } else {
        std::fs::write(path, text + "\n")
            .with_context(|| format!("writing the report to {}", path.display()))?;
        println!("  report       {}", path.display());
    }
    Ok(())
}

async fn resolve(addr: &str) -> anyhow::Result<SocketAddr> {
    if let Ok(a) = addr.parse::<SocketAddr>() {
        return Ok(a);
    }
    let mut addrs: Vec<SocketAddr> = tokio::net::lookup_host(addr)
        .await
        .with_context(|| format!("--gateway `{addr}` is not a host:port that resolves"))?
        .collect();
    addrs.sort_by_key(|a| !a.is_ipv4());
    addrs
        .first()
        .copied()
        .ok_or_else(|| anyhow!("--gateway `{addr}` resolves to no address"))
}
