//! `gatewayd`: the companion-UE daemon. See the crate documentation and `README.md`.
#![warn(missing_docs)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::prelude::*;

#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The companion-UE daemon: pairs LAN devices, provisions them 3GPP credentials from the
/// operator's core network and relays them sealed.
#[derive(Debug, Parser)]
#[command(name = "gatewayd", version)]
struct Args {
    /// Configuration file [default: /etc/gatewayd/gatewayd.toml if it exists]. Environment
    /// overrides: GATEWAYD_DEVICE_LISTEN, GATEWAYD_STATE_DIR, GATEWAYD_CONTROL_SOCKET,
    /// GATEWAYD_METRICS_LISTEN.
    #[arg(long, value_name = "PATH")]
    config: Option<PathBuf>,
    /// Write {"devices":"ip:port","metrics":"ip:port","control":"path"} here once ready.
    #[arg(long, value_name = "PATH")]
    ready_file: Option<PathBuf>,
    /// Threads of the async runtime [default: one per CPU core]. A single-core router, or one
    /// that shares its cores with hostapd and dnsmasq, can run on fewer; every handshake,
    /// request and batch runs on these (the state database commits on a thread of its own).
    #[arg(long, value_name = "N", env = "GATEWAYD_WORKER_THREADS", value_parser = clap::value_parser!(u16).range(1..=1024))]
    worker_threads: Option<u16>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let env_filter = std::env::var("RUST_LOG").ok();
    // `Targets` (a level, then `target=level` pairs: "info,gatewayd=debug") rather than
    // `EnvFilter`: the same directives a router operator writes, without the regular-expression
    // engine that span-field filters need (339 KB of the aarch64 router binary; issue 17).
    let initial = env_filter
        .as_deref()
        .unwrap_or("info")
        .parse::<Targets>()
        .unwrap_or_else(|_| Targets::new().with_default(tracing::Level::INFO));
    let (filter, handle) = tracing_subscriber::reload::Layer::new(initial);
    tracing_subscriber::registry()
        .with(filter)
        .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
        .init();
    let log_reload: gatewayd::daemon::LogReload = Box::new(move |level: &str| {
        if env_filter.is_some() {
            return Ok(()); // RUST_LOG wins.
        }
        let f = level.parse::<Targets>().map_err(|e| e.to_string())?;
        handle.reload(f).map_err(|e| e.to_string())
    });
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = args.worker_threads {
        builder.worker_threads(usize::from(n));
    }
    let rt = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("gatewayd: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let opts = gatewayd::daemon::Options {
        config: args.config,
        ready_file: args.ready_file,
    };
    match rt.block_on(gatewayd::daemon::run(opts, log_reload)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("gatewayd: {e:#}");
            ExitCode::FAILURE
        }
    }
}
