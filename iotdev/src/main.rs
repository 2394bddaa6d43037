//! `iotdev`: the reference device agent's command line.
//!
//! ```text
//! iotdev --dir D init --id watch-01          identity key + first HPKE key, pairing code + QR code
//! iotdev --dir D provision --gateway ADDR    seed steps 1, 2, 6: request, open, check, store 0600, ack
//! iotdev --dir D show [--json] [--reveal]    what the device holds (K/OPc only with --reveal)
//! iotdev --dir D attach [--serving-network SNN]   5G AKA with the CN named in the credential
//! iotdev --dir D renew --gateway ADDR        a fresh expiry for the same SUPI
//! ```
//!
//! Exit status: 0 success, 1 failure, 75 (EX_TEMPFAIL) for a failure worth retrying later
//! (gateway busy, operator network unreachable).
//!
//! This file parses the arguments and maps failures to the exit status; each subcommand lives
//! in `cmd/` (`setup`: factory, init, pairing-code; `credential`: provision, renew; `show`;
//! `attach`).
#![warn(missing_docs)]

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, anyhow};
use clap::{Args, Parser, Subcommand};
use companion_proto::msg::Params;
use iotdev::attach::AttachError;
use iotdev::{Device, DeviceError};

mod cmd;

/// Exit status for "failed, but retrying later may succeed" (sysexits EX_TEMPFAIL).
const EXIT_RETRY: u8 = 75;

#[derive(Debug, Parser)]
#[command(
    name = "iotdev",
    version,
    about = "Reference IoT device agent: pairing code, credential provisioning through the companion \
             gateway (gatewayd), attach to the operator's network"
)]
struct Cli {
    /// The device's state directory (identity key, credential; created 0700 by `init`).
    #[arg(
        long,
        global = true,
        env = "IOTDEV_DIR",
        default_value = "iotdev-state"
    )]
    dir: PathBuf,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Create the device: TLS identity key (pairing), HPKE key (sealing); print the pairing code
    /// and its QR code.
    Init {
        /// The device ID (letters, digits, `-`, `_`, `.`; at most 64 characters). With
        /// --factory-cert, defaults to the ID the certificate names.
        #[arg(long, required_unless_present = "factory_cert")]
        id: Option<String>,
        /// The manufacturer's certificate chain for the device's key (PEM, leaf first): the
        /// device presents it in TLS and the operator's CN checks it (manufacturer attestation,
        /// PROTOCOL.md §4.5). Needs --factory-key.
        #[arg(long, requires = "factory_key")]
        factory_cert: Option<PathBuf>,
        /// The factory-installed private key (PKCS#8 PEM) that --factory-cert certifies.
        #[arg(long, requires = "factory_cert")]
        factory_key: Option<PathBuf>,
        /// Do not draw the QR code.
        #[arg(long)]
        no_qr: bool,
        /// The operator CA certificate (PEM or DER) the device trusts from the factory: every
        /// credential must then be signed by the operator's CN under it (a gateway, or anyone
        /// posing as one, cannot make one up). cn-backend's `<dir>/ca.pem`.
        #[arg(long)]
        operator_anchor: Option<PathBuf>,
    },
    /// Print the pairing code (and its QR code) again.
    PairingCode {
        /// Do not draw the QR code.
        #[arg(long)]
        no_qr: bool,
    },
    /// Get a credential through the gateway: request, open the sealed credential, check it was
    /// sealed for this device, store it (0600), acknowledge.
    Provision {
        #[command(flatten)]
        gw: GatewayArgs,
        #[command(flatten)]
        params: ParamArgs,
        /// Request a new credential although the device holds a valid one (uses quota).
        #[arg(long)]
        again: bool,
    },
    /// Show the device and its credential (K and OPc only with --reveal).
    Show {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
        /// Include K, OPc (secrets!).
        #[arg(long)]
        reveal: bool,
    },
    /// Authenticate to the operator's network with the credential (5G AKA, endpoint and trust
    /// anchor from the credential).
    Attach {
        /// Serving network name (a visited network tests roaming). Default: the home network's,
        /// from the credential (`5G:mnc<MNC>.mcc<MCC>.3gppnetwork.org`).
        #[arg(long)]
        serving_network: Option<String>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
        /// Longest wait for the network.
        #[arg(long, default_value = "10s", value_parser = parse_duration)]
        timeout: Duration,
    },
    /// Renew the credential through the gateway (same SUPI, new expiry).
    Renew {
        #[command(flatten)]
        gw: GatewayArgs,
        /// Requested lifetime (e.g. 3s, 12h, 30d; the operator may grant less).
        #[arg(long, value_parser = parse_duration)]
        lifetime: Option<Duration>,
    },
    /// Forget the pinned gateway key (after the gateway was really replaced).
    ResetGatewayPin,
    /// A test manufacturer: make a device CA and factory identities it certifies (for tests and
    /// the demo; a real manufacturer's CA lives in its factory's HSM).
    #[command(subcommand)]
    Factory(FactoryCmd),
}

#[derive(Debug, Subcommand)]
enum FactoryCmd {
    /// Create a manufacturer CA: <out>/manufacturer-ca.pem and manufacturer-ca.key (0600).
    /// The operator installs the .pem with `cn-backend attestation add-root`.
    Ca {
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
        /// The CA's common name.
        #[arg(long, default_value = "Test device manufacturer CA")]
        name: String,
    },
    /// Certify a new device key: <out>/<id>.pem (chain, leaf first) and <out>/<id>.key (0600),
    /// for `iotdev init --factory-cert <id>.pem --factory-key <id>.key`.
    Device {
        /// The directory holding manufacturer-ca.pem and manufacturer-ca.key.
        #[arg(long)]
        ca: PathBuf,
        /// The device ID the certificate names.
        #[arg(long)]
        id: String,
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Debug, Args)]
struct GatewayArgs {
    /// The gateway's device address, host:port (`devices` in gatewayd's ready file).
    #[arg(long, env = "IOTDEV_GATEWAY")]
    gateway: String,
    /// Keep retrying a busy/unreachable gateway (same request) for this long; 0 = one try.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    retry_for: Duration,
    /// Longest wait for one exchange with the gateway.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    timeout: Duration,
    /// The one-time code of the owner's pairing window (`gatewayctl pair --window` prints it),
    /// for a device that is not paired by pairing code.
    #[arg(long, env = "IOTDEV_WINDOW_CODE")]
    window_code: Option<String>,
}

#[derive(Debug, Args)]
struct ParamArgs {
    /// Requested lifetime (e.g. 3s, 12h, 30d; the operator may grant less).
    #[arg(long, value_parser = parse_duration)]
    lifetime: Option<Duration>,
    /// Ask for roaming (granted only if the owner's subscription allows it).
    #[arg(long)]
    roaming: bool,
    /// Data network names needed (repeat).
    #[arg(long = "dnn")]
    dnns: Vec<String>,
}

impl ParamArgs {
    fn params(&self) -> Params {
        Params {
            lifetime_s: self.lifetime.map(|d| d.as_secs().max(1)),
            roaming: self.roaming.then_some(true),
            dnns: (!self.dnns.is_empty()).then(|| self.dnns.clone()),
            max_bitrate_kbps: None,
        }
    }

    fn given(&self) -> bool {
        self.lifetime.is_some() || self.roaming || !self.dnns.is_empty()
    }
}

/// `3s`, `500ms`, `2m`, `1h`, `30d`, or plain seconds.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a duration (examples: 3s, 500ms, 2m, 1h, 30d)"))?;
    let d = match unit.trim() {
        "" | "s" => Duration::from_secs(n),
        "ms" => Duration::from_millis(n),
        "m" | "min" => Duration::from_secs(n * 60),
        "h" => Duration::from_secs(n * 3600),
        "d" | "day" | "days" => Duration::from_secs(n * 86_400),
        other => {
            return Err(format!(
                "unknown unit `{other}` in `{s}` (use ms, s, m, h or d)"
            ));
        }
    };
    Ok(d)
}

/// An error together with whether retrying later may help.
struct Failure {
    error: anyhow::Error,
    retryable: bool,
}

impl<E: Into<anyhow::Error>> From<E> for Failure {
    fn from(e: E) -> Self {
        Failure {
            error: e.into(),
            retryable: false,
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("iotdev: error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            eprintln!("iotdev: error: {:#}", f.error);
            if f.retryable {
                ExitCode::from(EXIT_RETRY)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

async fn run(cli: Cli) -> Result<(), Failure> {
    let dir = cli.dir.clone();
    match cli.cmd {
        Cmd::Init {
            id,
            no_qr,
            operator_anchor,
            factory_cert,
            factory_key,
        } => {
            let factory = factory_cert.zip(factory_key);
            cmd::setup::init(
                &dir,
                id.as_deref(),
                no_qr,
                operator_anchor.as_deref(),
                factory.as_ref().map(|(c, k)| (c.as_path(), k.as_path())),
            )
        }
        Cmd::Factory(cmd) => cmd::setup::factory(cmd),
        Cmd::PairingCode { no_qr } => {
            let d = open(&dir)?;
            cmd::setup::print_pairing_code(&d, no_qr)
        }
        Cmd::Provision { gw, params, again } => {
            cmd::credential::provision(&dir, &gw, &params, again).await
        }
        Cmd::Show { json, reveal } => cmd::show::show(&dir, json, reveal),
        Cmd::Attach {
            serving_network,
            json,
            timeout,
        } => cmd::attach::attach_cmd(&dir, serving_network.as_deref(), json, timeout).await,
        Cmd::Renew { gw, lifetime } => cmd::credential::renew(&dir, &gw, lifetime).await,
        Cmd::ResetGatewayPin => {
            let mut d = open(&dir)?;
            d.reset_gateway_pin().map_err(device_failure)?;
            println!(
                "forgot the pinned gateway key; the next provisioning trusts the gateway it reaches \
                 and pins its key"
            );
            Ok(())
        }
    }
}

fn state_file(dir: &Path) -> PathBuf {
    dir.join("device.json")
}

fn open(dir: &Path) -> Result<Device, Failure> {
    if !state_file(dir).exists() {
        return Err(anyhow!(
            "no device in {}: create one with `iotdev --dir {} init --id <device-id>`",
            dir.display(),
            dir.display()
        )
        .into());
    }
    Device::open(dir)
        .with_context(|| format!("reading the device in {}", dir.display()))
        .map_err(Failure::from)
}

fn device_failure(e: DeviceError) -> Failure {
    let retryable = e.is_retryable();
    let hint = match &e {
        DeviceError::GatewayKeyChanged { .. } => Some(
            "if you replaced the gateway, run `iotdev reset-gateway-pin`, then provision again",
        ),
        DeviceError::GatewayUnreachable { .. } => Some(
            "check the address (gatewayd's `devices` address) and that gatewayd is running, then retry",
        ),
        DeviceError::ConnectionLost(_)
        | DeviceError::Timeout(_)
        | DeviceError::GatewayRestarted => {
            Some("retry the same command: the request is resumed, not repeated")
        }
        DeviceError::Busy { .. } | DeviceError::CnUnavailable { .. } => {
            Some("run the same command again later: the request is resumed, not repeated")
        }
        _ => None,
    };
    let error = match hint {
        Some(h) => anyhow!("{e}\n  hint: {h}"),
        None => anyhow!("{e}"),
    };
    Failure { error, retryable }
}

fn attach_failure(e: AttachError) -> Failure {
    Failure {
        retryable: e.is_retryable(),
        error: anyhow!("{e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("3s"), Ok(Duration::from_secs(3)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("30d"), Ok(Duration::from_secs(30 * 86_400)));
        assert_eq!(parse_duration("7"), Ok(Duration::from_secs(7)));
        assert!(parse_duration("x").is_err());
        assert!(parse_duration("3y").is_err());
    }
}
