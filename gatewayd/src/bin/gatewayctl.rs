//! `gatewayctl`: the router owner's command-line tool for `gatewayd`.
//!
//! ```text
//! gatewayctl pair 'CPN:V:1;I:watch-01;K:MFkw...;;' [--label kitchen]
//! gatewayctl pair --window [120s]
//! gatewayctl devices [--json]
//! gatewayctl revoke <device>
//! gatewayctl status [--json]
//! gatewayctl block <addr> [--for 10m]
//! gatewayctl unblock <addr>
//! ```
//!
//! It talks to the daemon over its control socket (`--socket`, else `$GATEWAYD_CONTROL_SOCKET`,
//! else `[control] socket` from the configuration, else `/run/gatewayd/control.sock`).
#![warn(missing_docs)]

use std::io::Write;
use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, anyhow, bail};
use clap::{Parser, Subcommand};
use gatewayd::clock::unix_seconds;
use gatewayd::config::Config;
use gatewayd::control::{self, CnRevocation, DeviceInfo, Request, Response, StatusInfo};

/// How long to wait for the daemon (a revocation may wait for the CN).
const TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Parser, Debug)]
#[command(
    name = "gatewayctl",
    version,
    about = "Pair, list and revoke the devices of gatewayd, the companion-UE daemon"
)]
struct Cli {
    /// gatewayd's control socket [default: [control] socket of the configuration]
    #[arg(
        long,
        global = true,
        value_name = "PATH",
        env = "GATEWAYD_CONTROL_SOCKET"
    )]
    socket: Option<PathBuf>,

    /// Configuration file to read the socket path from [default: /etc/gatewayd/gatewayd.toml]
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Pair a device from its pairing code, or open a pairing window for a new device
    Pair {
        /// The device's pairing code, e.g. 'CPN:V:1;I:watch-01;K:MFkw...;;'
        #[arg(required_unless_present = "window", conflicts_with = "window")]
        code: Option<String>,
        /// A name for the device, shown by `gatewayctl devices`
        #[arg(long)]
        label: Option<String>,
        /// Instead of a code: accept the next new device that connects within DURATION
        /// (e.g. 120s, 5m) [default: [pairing] window of the configuration]
        // The text is the --help output: `[pairing]` names the TOML section, not an item.
        #[allow(rustdoc::broken_intra_doc_links)]
        #[arg(long, value_name = "DURATION", num_args = 0..=1, value_parser = parse_duration)]
        window: Option<Option<Duration>>,
    },
    /// List paired devices, their credentials and when those expire
    Devices {
        /// Print JSON instead of a table
        #[arg(long)]
        json: bool,
    },
    /// Unpair a device and revoke its credential at the core network
    Revoke {
        /// Device ID, as shown by `gatewayctl devices`
        device: String,
    },
    /// Show the daemon's state
    Status {
        /// Print JSON instead of text
        #[arg(long)]
        json: bool,
    },
    /// Block a LAN address from reaching gatewayd
    Block {
        /// IPv4 or IPv6 address
        addr: IpAddr,
        /// How long (e.g. 10m, 1h) [default: until unblocked]
        #[arg(long = "for", value_name = "DURATION", value_parser = parse_duration)]
        duration: Option<Duration>,
    },
    /// Lift a block
    Unblock {
        /// IPv4 or IPv6 address
        addr: IpAddr,
    },
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| format!("{e} (examples: 90s, 10m, 2h)"))?;
    if d.is_zero() {
        return Err("must be longer than 0s".into());
    }
    Ok(d)
}

/// Whole seconds, rounding up (the protocol counts seconds).
fn secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("gatewayctl: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn socket_path(cli: &Cli) -> Result<PathBuf> {
    if let Some(s) = &cli.socket {
        return Ok(s.clone());
    }
    let (cfg, _) = Config::load_or_default(cli.config.as_deref())
        .context("cannot read gatewayd's configuration to find its control socket (pass --socket PATH to skip it)")?;
    Ok(cfg.control.socket)
}

fn call(socket: &std::path::Path, req: Request) -> Result<Response> {
    match control::call(socket, &req, TIMEOUT)? {
        Response::Error { message, .. } => Err(anyhow!(message)),
        other => Ok(other),
    }
}

fn unexpected(r: &Response) -> anyhow::Error {
    anyhow!(
        "gatewayd sent an unexpected answer ({r:?}); are gatewayctl and gatewayd the same version?"
    )
}

fn run(cli: Cli) -> Result<()> {
    let socket = socket_path(&cli)?;
    let mut out = std::io::stdout().lock();
    match cli.command {
        Command::Pair {
            code: Some(code),
            label,
            window: None,
        } => match call(&socket, Request::Pair { code, label })? {
            Response::Paired { new, device } => {
                let name = match &device.label {
                    Some(l) => format!("{} ({l})", device.device),
                    None => device.device.clone(),
                };
                if new {
                    writeln!(out, "paired {name}, key sha256:{}", device.fingerprint)?;
                } else {
                    writeln!(
                        out,
                        "{name} was already paired with this key; label kept up to date"
                    )?;
                }
            }
            r => return Err(unexpected(&r)),
        },
        Command::Pair {
            window: Some(d), ..
        } => match call(
            &socket,
            Request::OpenWindow {
                seconds: d.map(secs),
            },
        )? {
            Response::WindowOpened { window } => {
                let until = UNIX_EPOCH + Duration::from_secs(window.closes_at.max(0) as u64);
                writeln!(
                    out,
                    "pairing window open for {} (until {}).\n\
                     one-time code: {}\n\
                     Give this code to the new device (e.g. `iotdev provision --window-code ...`): \
                     the first device that sends it is paired, and the window closes. \
                     {} wrong codes close it early.",
                    humantime::format_duration(Duration::from_secs(window.remaining_secs)),
                    humantime::format_rfc3339_seconds(until),
                    window.code.as_deref().unwrap_or("(not shown)"),
                    gatewayd::pairing::MAX_WRONG_CODES
                )?;
            }
            r => return Err(unexpected(&r)),
        },
        Command::Pair { .. } => bail!("give either a pairing code or --window, not both"),
        Command::Devices { json } => match call(&socket, Request::Devices)? {
            Response::Devices { devices } => {
                if json {
                    serde_json::to_writer_pretty(&mut out, &devices)?;
                    writeln!(out)?;
                } else {
                    write!(
                        out,
                        "{}",
                        devices_table(&devices, unix_seconds(SystemTime::now()))
                    )?;
                }
            }
            r => return Err(unexpected(&r)),
        },
        Command::Revoke { device } => match call(&socket, Request::Revoke { device })? {
            Response::Revoked { device, supi, cn } => {
                let cn = match (cn, supi) {
                    (CnRevocation::Revoked, Some(s)) => format!(
                        "every credential of the device (held here: {s}) revoked at the core network"
                    ),
                    (CnRevocation::Revoked, None) => {
                        "every credential of the device revoked at the core network".into()
                    }
                    (CnRevocation::NoCredential, _) => {
                        "the core network confirmed it held no active credential for it".into()
                    }
                    (CnRevocation::Pending { reason }, _) => format!(
                        "revoking its credentials at the core network is pending ({reason}); \
                         gatewayd retries until the core network confirms, and does not \
                         provision this device ID again before"
                    ),
                };
                writeln!(out, "revoked {device}: {cn}")?;
            }
            r => return Err(unexpected(&r)),
        },
        Command::Status { json } => match call(&socket, Request::Status)? {
            Response::Status { status } => {
                if json {
                    serde_json::to_writer_pretty(&mut out, &status)?;
                    writeln!(out)?;
                } else {
                    write!(
                        out,
                        "{}",
                        status_text(&status, unix_seconds(SystemTime::now()))
                    )?;
                }
            }
            r => return Err(unexpected(&r)),
        },
        Command::Block { addr, duration } => match call(
            &socket,
            Request::Block {
                addr,
                seconds: duration.map(secs),
            },
        )? {
            Response::Blocked { block } => match block.until {
                Some(_) => writeln!(
                    out,
                    "blocked {} for {}",
                    block.addr,
                    humantime::format_duration(Duration::from_secs(duration.map_or(0, secs)))
                )?,
                None => writeln!(out, "blocked {} until unblocked", block.addr)?,
            },
            r => return Err(unexpected(&r)),
        },
        Command::Unblock { addr } => match call(&socket, Request::Unblock { addr })? {
            Response::Unblocked { addr, was_blocked } => {
                if was_blocked {
                    writeln!(out, "unblocked {addr}")?;
                } else {
                    writeln!(out, "{addr} was not blocked")?;
                }
            }
            r => return Err(unexpected(&r)),
        },
    }
    Ok(())
}

/// "29d 23h", "5h 2m", "3m 10s", "42s".
fn coarse(secs: u64) -> String {
    let (d, h, m, s) = (secs / 86_400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) => format!("{m}m {s}s"),
        (0, _, _) => format!("{h}h {m}m"),
        _ => format!("{d}d {h}h"),
    }
}

fn expires_in(expires_at: Option<i64>, now: i64) -> String {
    match expires_at {
        None => "-".into(),
        Some(t) if t <= now => format!("expired {} ago", coarse((now - t) as u64)),
        Some(t) => coarse((t - now) as u64),
    }
}

fn devices_table(devices: &[DeviceInfo], now: i64) -> String {
    if devices.is_empty() {
        return "no devices paired (pair one with: gatewayctl pair '<pairing code>')\n".into();
    }
    let rows: Vec<[String; 5]> = devices
        .iter()
        .map(|d| {
            [
                d.device.clone(),
                d.label.clone().unwrap_or_else(|| "-".into()),
                d.supi.clone().unwrap_or_else(|| "-".into()),
                expires_in(d.expires_at, now),
                d.status.as_str().into(),
            ]
        })
        .collect();
    let header = ["DEVICE", "LABEL", "SUPI", "EXPIRES IN", "STATUS"].map(String::from);
    let mut widths = header.clone().map(|h| h.chars().count());
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut text = String::new();
    for r in std::iter::once(&header).chain(&rows) {
        let line: Vec<String> = r
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        text.push_str(line.join("  ").trim_end());
        text.push('\n');
    }
    text
}

/// Milliseconds as `850ms` or `12s`.
fn coarse_ms(ms: u64) -> String {
    if ms < 1000 {
        format!("{ms}ms")
    } else {
        coarse(ms / 1000)
    }
}

fn status_text(s: &StatusInfo, now: i64) -> String {
    let mut t = String::new();
    let mut line = |k: &str, v: String| t.push_str(&format!("{k:<22} {v}\n"));
    line(
        "gatewayd",
        format!("{} (up {})", s.version, coarse(s.uptime_secs)),
    );
    if let Some(supi) = &s.companion_supi {
        line("companion SUPI", supi.clone());
    }
    if let Some(fp) = &s.gateway_fingerprint {
        line("gateway key", format!("sha256:{fp}"));
    }
    line("core network link", s.cn_link.as_str().into());
    for e in &s.cn_endpoints {
        let health = match (e.failures, e.retry_in_ms) {
            (0, _) => "healthy".to_string(),
            (n, Some(ms)) => format!("{n} failures, retried in {}", coarse_ms(ms)),
            (n, None) if e.attempting => format!("{n} failures, being retried"),
            (n, None) => format!("{n} failures, usable again at the next connection"),
        };
        line(
            "CN endpoint",
            format!("{}  {} sessions, {health}", e.endpoint, e.sessions),
        );
    }
    for c in &s.cn_sessions {
        let at = match (&c.endpoint, &c.remote) {
            (Some(e), Some(r)) if *e != *r => format!("{e} ({r})"),
            (Some(e), _) => e.clone(),
            (None, _) => "every endpoint in backoff".into(),
        };
        line(
            &format!("CN session {}", c.slot),
            format!("{} {at}", c.state),
        );
    }
    line("devices paired", s.devices_paired.to_string());
    line(
        "credentials held",
        format!(
            "{} ({} expiring within 24h)",
            s.credentials_held, s.credentials_expiring_24h
        ),
    );
    line("deliveries pending", s.deliveries_pending.to_string());
    line("requests outstanding", s.requests_outstanding.to_string());
    if s.revocations_unconfirmed > 0 {
        line("revocations pending", s.revocations_unconfirmed.to_string());
    }
    line("queue depth", s.queue_depth.to_string());
    if let Some(b) = &s.batching {
        line(
            "batching",
            format!(
                "up to {} per batch, wait {} ms, {} in flight (max {}), queue capacity {}",
                b.max_batch, b.max_wait_ms, b.batches_in_flight, b.max_in_flight, b.queue_capacity
            ),
        );
    }
    line("device connections", s.active_connections.to_string());
    line(
        "pairing window",
        match &s.pairing_window {
            None => "closed".into(),
            Some(w) => format!(
                "open for {} ({} wrong codes)",
                coarse(w.remaining_secs),
                w.wrong_codes
            ),
        },
    );
    if s.blocks.is_empty() {
        line("blocked addresses", "none".into());
    } else {
        for b in &s.blocks {
            let until = match b.until {
                Some(u) => format!("for {}", coarse(u.saturating_sub(now).max(0) as u64)),
                None => "until unblocked".into(),
            };
            line("blocked", format!("{} {until}", b.addr));
        }
    }
    if let Some(f) = &s.filter {
        let mode = match (f.mode, f.interfaces.is_empty()) {
            (gatewayd::filter::FilterMode::Userspace, _) => format!(
                "userspace (fallback: {})",
                f.fallback_reason.as_deref().unwrap_or("eBPF not used")
            ),
            (m, _) => format!("{} on {}", m.as_str(), f.interfaces.join(", ")),
        };
        line("LAN filter", mode);
        line(
            "filter policy",
            format!(
                "UDP port {}, Initials {}/s per source (burst {}), strict {}, {} denied, {} paired sources ({} evicted for room)",
                f.port,
                f.initial_rate,
                f.initial_burst,
                if f.strict { "on" } else { "off" },
                f.deny_entries,
                f.paired_sources,
                f.paired_evicted
            ),
        );
        let c = &f.counters;
        line(
            "filter packets",
            format!(
                "passed {}, dropped_short_initial {}, rate_limited {}, denied {}, not_paired {}, \
                 dropped_unparsed {}, dropped_fragment {}",
                c.passed,
                c.dropped_short_initial,
                c.rate_limited,
                c.denied,
                c.not_paired,
                c.dropped_unparsed,
                c.dropped_fragment
            ),
        );
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn coarse_durations() {
        assert_eq!(coarse(42), "42s");
        assert_eq!(coarse(190), "3m 10s");
        assert_eq!(coarse(3600 * 5 + 120), "5h 2m");
        assert_eq!(coarse(86_400 * 29 + 3600 * 23 + 5), "29d 23h");
        assert_eq!(expires_in(None, 0), "-");
        assert_eq!(expires_in(Some(10), 100), "expired 1m 30s ago");
    }
}
