//! `loadgen`: simulated devices against a real gatewayd (and cn-backend). See `README.md`.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, anyhow};
use clap::{Parser, Subcommand, ValueEnum};
use companion_proto::msg::Params;
use loadgen::run::{Options, run};

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

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Pair N simulated devices in bulk, provision each through gatewayd (credential opened and
    /// checked), optionally attach each at the CN; report throughput and latency percentiles.
    /// Exits 1 when any device failed.
    Provision {
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
        /// Also attach every provisioned device at the CN (5G AKA with its new credential).
        #[arg(long)]
        attach: bool,
        /// Serving network name for the attaches.
        #[arg(long, default_value = iotdev::attach::DEFAULT_SERVING_NETWORK)]
        serving_network: String,
        /// Write the JSON report here (`-` = stdout).
        #[arg(long, value_name = "FILE")]
        json: Option<PathBuf>,
        /// Include every device's outcome in the JSON report.
        #[arg(long)]
        per_device: bool,
        /// quinn client endpoints (UDP sockets) shared by the devices.
        #[arg(long, default_value_t = 4)]
        endpoints: usize,
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
        /// Device IDs are `<prefix>-<n>` [default: lg-<random>].
        #[arg(long)]
        id_prefix: Option<String>,
        /// Progress bar on stderr.
        #[arg(long, value_enum, default_value = "auto")]
        progress: Progress,
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
    let Cmd::Provision {
        devices,
        concurrency,
        gateway,
        control_socket,
        attach,
        serving_network,
        json,
        per_device,
        endpoints,
        retry_for,
        max_retries,
        patience,
        lifetime,
        id_prefix,
        progress,
    } = cli.cmd
    else {
        return Err(anyhow!("unexpected subcommand"));
    };
    let gateway = resolve(&gateway).await?;
    let id_prefix = match id_prefix {
        Some(p) => p,
        None => {
            let r = iotdev::random_request_id().map_err(|e| anyhow!("{e}"))?;
            format!("lg-{}", hex::encode(&r.as_bytes()[..3]))
        }
    };
    let progress = match progress {
        Progress::Always => true,
        Progress::Never => false,
        Progress::Auto => std::io::stderr().is_terminal(),
    };
    let opts = Options {
        devices,
        concurrency,
        gateway,
        control_socket,
        attach,
        serving_network,
        endpoints,
        retry_for: Duration::from_secs(retry_for),
        max_retries,
        id_prefix,
        progress,
        per_device,
        params: Params {
            lifetime_s: lifetime,
            ..Params::default()
        },
        patience: Duration::from_secs(patience),
    };
    let report = run(opts).await?;
    print!("{}", report.human());
    if let Some(path) = json {
        let text = serde_json::to_string_pretty(&report).context("encoding the report")?;
        if path.as_os_str() == "-" {
            println!("{text}");
        } else {
            std::fs::write(&path, text + "\n")
                .with_context(|| format!("writing the report to {}", path.display()))?;
            println!("  report       {}", path.display());
        }
    }
    Ok(report.all_ok())
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
