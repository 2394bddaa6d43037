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

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, anyhow};
use clap::{Args, Parser, Subcommand};
use companion_proto::DeviceId;
use companion_proto::msg::Params;
use companion_transport::cn_client;
use iotdev::attach::{self, AttachError};
use iotdev::client::{AttemptKind, ClientOptions};
use iotdev::store::StoredCredential;
use iotdev::{Device, DeviceError};

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
            init(
                &dir,
                id.as_deref(),
                no_qr,
                operator_anchor.as_deref(),
                factory.as_ref().map(|(c, k)| (c.as_path(), k.as_path())),
            )
        }
        Cmd::Factory(cmd) => factory(cmd),
        Cmd::PairingCode { no_qr } => {
            let d = open(&dir)?;
            print_pairing_code(&d, no_qr)
        }
        Cmd::Provision { gw, params, again } => provision(&dir, &gw, &params, again).await,
        Cmd::Show { json, reveal } => show(&dir, json, reveal),
        Cmd::Attach {
            serving_network,
            json,
            timeout,
        } => attach_cmd(&dir, serving_network.as_deref(), json, timeout).await,
        Cmd::Renew { gw, lifetime } => renew(&dir, &gw, lifetime).await,
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

/// Reads a certificate file, PEM (first CERTIFICATE block) or DER.
fn read_certificate(path: &Path) -> Result<Vec<u8>, Failure> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let bytes = std::fs::read(path)
        .with_context(|| format!("reading the operator CA certificate {}", path.display()))?;
    if bytes.starts_with(b"-----") {
        return Ok(CertificateDer::from_pem_slice(&bytes)
            .map_err(|e| anyhow!("{}: no readable CERTIFICATE block ({e:?})", path.display()))?
            .as_ref()
            .to_vec());
    }
    Ok(bytes)
}

fn factory(cmd: FactoryCmd) -> Result<(), Failure> {
    use companion_transport::ManufacturerCa;
    let mkdir = |out: &Path| {
        std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))
    };
    match cmd {
        FactoryCmd::Ca { out, name } => {
            mkdir(&out)?;
            let ca = ManufacturerCa::generate(&name).context("creating the CA")?;
            let (cert, key) = (
                out.join("manufacturer-ca.pem"),
                out.join("manufacturer-ca.key"),
            );
            ca.save(&cert, &key).context("writing the CA")?;
            println!(
                "created manufacturer CA {name:?}: {} (key {}, 0600)",
                cert.display(),
                key.display()
            );
            println!(
                "operator: cn-backend attestation add-root --name <name> {}",
                cert.display()
            );
        }
        FactoryCmd::Device { ca, id, out } => {
            DeviceId::new(&id).map_err(|e| anyhow!("`{id}` is not a valid device ID ({e})"))?;
            let ca = ManufacturerCa::load(
                &ca.join("manufacturer-ca.pem"),
                &ca.join("manufacturer-ca.key"),
            )
            .with_context(|| format!("loading the manufacturer CA from {}", ca.display()))?;
            mkdir(&out)?;
            let identity = ca.issue_device(&id).context("certifying the device key")?;
            let (cert, key) = (out.join(format!("{id}.pem")), out.join(format!("{id}.key")));
            identity
                .save(&cert, &key)
                .context("writing the device identity")?;
            println!(
                "certified device {id}: {} (key {}, 0600)",
                cert.display(),
                key.display()
            );
            println!(
                "device: iotdev --dir <dir> init --factory-cert {} --factory-key {}",
                cert.display(),
                key.display()
            );
        }
    }
    Ok(())
}

fn init(
    dir: &Path,
    id: Option<&str>,
    no_qr: bool,
    anchor: Option<&Path>,
    factory: Option<(&Path, &Path)>,
) -> Result<(), Failure> {
    if state_file(dir).exists() {
        return Err(anyhow!(
            "{} already holds a device; use another --dir, or remove it to start over (its \
             credential is lost)",
            dir.display()
        )
        .into());
    }
    let identity = factory
        .map(|(cert, key)| {
            companion_transport::Identity::load(cert, key).with_context(|| {
                format!(
                    "loading the factory identity {} / {}",
                    cert.display(),
                    key.display()
                )
            })
        })
        .transpose()?;
    let named = identity
        .as_ref()
        .and_then(|i| i.chain().first())
        .and_then(|leaf| companion_transport::attestation::certified_device_id(leaf));
    let id = id.or(named.as_deref()).ok_or_else(|| {
        anyhow!("the factory certificate names no device (urn:companion:device:<id>): give --id")
    })?;
    let device_id = DeviceId::new(id).map_err(|e| {
        anyhow!("`{id}` is not a valid device ID ({e}): use letters, digits, `-`, `_` or `.`")
    })?;
    let anchor = anchor.map(read_certificate).transpose()?;
    let mut d = match identity {
        None => Device::create(dir, device_id),
        Some(identity) => iotdev::DeviceKeys::from_factory(device_id, identity)
            .and_then(|keys| Device::create_with(dir, keys)),
    }
    .map_err(device_failure)?;
    if factory.is_some() {
        println!(
            "  factory identity: the manufacturer's certificate chain is presented to the gateway \
             and checked by the operator (attestation)"
        );
    }
    if let Some(der) = anchor {
        d.set_operator_anchor(der).map_err(device_failure)?;
        println!(
            "  factory trust anchor: the operator CA; unsigned or foreign credentials are refused"
        );
    }
    let hpke = d
        .prepare_provision(Params::default())
        .map_err(device_failure)?
        .hpke
        .public_key();
    println!("created device {} in {}", id, dir.display());
    println!(
        "  identity key (TLS, P-256): {}/device.key (0600), fingerprint {}",
        dir.display(),
        hex::encode(d.keys().fingerprint().map_err(device_failure)?)
    );
    println!(
        "  HPKE key (X25519, credentials are sealed to it): {}/device.json (0600), public {}",
        dir.display(),
        hex::encode(hpke)
    );
    println!();
    print_pairing_code(&d, no_qr)?;
    println!(
        "next: on the gateway, `gatewayctl pair '<code above>'`; then here, `iotdev --dir {} \
         provision --gateway <gateway address>`",
        dir.display()
    );
    Ok(())
}

fn print_pairing_code(d: &Device, no_qr: bool) -> Result<(), Failure> {
    let code = d.pairing_code().map_err(device_failure)?;
    println!("pairing code:\n{code}\n");
    if !no_qr {
        let qr = qrcode::QrCode::with_error_correction_level(code.as_bytes(), qrcode::EcLevel::L)
            .context("drawing the QR code")?;
        let text = qr
            .render::<qrcode::render::unicode::Dense1x2>()
            .dark_color(qrcode::render::unicode::Dense1x2::Light)
            .light_color(qrcode::render::unicode::Dense1x2::Dark)
            .quiet_zone(true)
            .build();
        println!("{text}\n");
    }
    Ok(())
}

async fn resolve(addr: &str) -> Result<SocketAddr, Failure> {
    if let Ok(a) = addr.parse::<SocketAddr>() {
        return Ok(a);
    }
    let mut addrs: Vec<SocketAddr> = tokio::net::lookup_host(addr)
        .await
        .with_context(|| format!("`{addr}` is not a host:port address that resolves"))?
        .collect();
    addrs.sort_by_key(|a| !a.is_ipv4());
    addrs
        .first()
        .copied()
        .ok_or_else(|| anyhow!("`{addr}` resolves to no address").into())
}

fn endpoint_for(peer: SocketAddr) -> Result<quinn::Endpoint, Failure> {
    let bind: SocketAddr = if peer.is_ipv4() {
        SocketAddr::from(([0, 0, 0, 0], 0))
    } else {
        SocketAddr::from(([0u16; 8], 0))
    };
    quinn::Endpoint::client(bind)
        .context("opening a UDP socket for QUIC")
        .map_err(Failure::from)
}

fn client_options(gw: &GatewayArgs) -> ClientOptions {
    let d = ClientOptions::default();
    ClientOptions {
        patience: gw.timeout,
        connect_timeout: d.connect_timeout.min(gw.timeout),
        window_code: gw.window_code.clone(),
        ..d
    }
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

async fn provision(
    dir: &Path,
    gw: &GatewayArgs,
    pa: &ParamArgs,
    again: bool,
) -> Result<(), Failure> {
    let mut d = open(dir)?;
    if let Some(c) = d.credential()
        && c.bundle.expires_at > now_unix()
        && !again
        && d.attempt()
            .is_none_or(|a| matches!(a.kind, AttemptKind::Renew { .. }))
    {
        return Err(anyhow!(
            "this device already holds a valid credential ({}, expires {}): `iotdev renew` extends \
             it; `provision --again` requests another one (it uses the subscription's quota)",
            c.bundle.supi,
            fmt_time(c.bundle.expires_at)
        )
        .into());
    }
    let params = pa.params();
    match d.attempt().map(|a| a.kind.clone()) {
        Some(AttemptKind::Provision { params: p }) if pa.given() && p != params => {
            eprintln!("note: replacing the unfinished request with one for the new parameters");
            d.abandon_attempt().map_err(device_failure)?;
        }
        Some(AttemptKind::Renew { .. }) => d.abandon_attempt().map_err(device_failure)?,
        _ => {}
    }
    d.prepare_provision(params.clone())
        .map_err(device_failure)?;
    let addr = resolve(&gw.gateway).await?;
    let ep = endpoint_for(addr)?;
    let opts = client_options(gw);
    let started = Instant::now();
    let until = started + gw.retry_for;
    let cred = loop {
        match d.provision(&ep, addr, params.clone(), &opts).await {
            Ok(c) => break c,
            Err(e) if e.is_retryable() => {
                let wait = e.retry_after().unwrap_or(Duration::from_secs(1));
                if Instant::now() + wait > until {
                    return Err(device_failure(e));
                }
                eprintln!("{e}; retrying in {} ms", wait.as_millis());
                tokio::time::sleep(wait).await;
            }
            Err(e) => return Err(device_failure(e)),
        }
    };
    ep.wait_idle().await;
    println!(
        "provisioned {} in {} ms: credential opened, checked (sealed for {} and this request), \
         stored in {} (0600), acknowledged",
        d.keys().device_id,
        started.elapsed().as_millis(),
        d.keys().device_id,
        state_file(dir).display()
    );
    print_credential_summary(&cred);
    println!(
        "next: `iotdev --dir {} attach` authenticates to the network with it",
        dir.display()
    );
    Ok(())
}

async fn renew(dir: &Path, gw: &GatewayArgs, lifetime: Option<Duration>) -> Result<(), Failure> {
    let mut d = open(dir)?;
    let Some(c) = d.credential() else {
        return Err(anyhow!(
            "this device holds no credential to renew: `iotdev --dir {} provision --gateway {}` \
             first",
            dir.display(),
            gw.gateway
        )
        .into());
    };
    let old_expiry = c.bundle.expires_at;
    if let Some(a) = d.attempt()
        && matches!(a.kind, AttemptKind::Provision { .. })
    {
        // The attempt prepared by `init` or an abandoned one; a pending provisioning that was
        // sent would have been finished by `provision`.
        d.abandon_attempt().map_err(device_failure)?;
    }
    let params = lifetime.map(|l| Params {
        lifetime_s: Some(l.as_secs().max(1)),
        ..Params::default()
    });
    let addr = resolve(&gw.gateway).await?;
    let ep = endpoint_for(addr)?;
    let opts = client_options(gw);
    let until = Instant::now() + gw.retry_for;
    let cred = loop {
        match d.renew(&ep, addr, params.clone(), &opts).await {
            Ok(c) => break c,
            Err(e) if e.is_retryable() => {
                let wait = e.retry_after().unwrap_or(Duration::from_secs(1));
                if Instant::now() + wait > until {
                    return Err(device_failure(e));
                }
                eprintln!("{e}; retrying in {} ms", wait.as_millis());
                tokio::time::sleep(wait).await;
            }
            Err(e) => return Err(device_failure(e)),
        }
    };
    ep.wait_idle().await;
    println!(
        "renewed {}: expiry {} -> {}",
        cred.bundle.supi,
        fmt_time(old_expiry),
        fmt_time(cred.bundle.expires_at)
    );
    print_credential_summary(&cred);
    Ok(())
}

fn print_credential_summary(c: &StoredCredential) {
    let b = &c.bundle;
    println!("  SUPI        {}", b.supi);
    println!(
        "  expires     {} ({})",
        fmt_time(b.expires_at),
        remaining(b.expires_at)
    );
    println!(
        "  may         roaming={} dnns=[{}] max_bitrate_kbps={}",
        if b.restrictions.roaming_allowed {
            "yes"
        } else {
            "no"
        },
        b.restrictions.dnns.join(","),
        b.restrictions
            .max_bitrate_kbps
            .map_or_else(|| "none".into(), |v| v.to_string())
    );
    println!(
        "  attach to   {} (TLS name {})",
        b.attach.endpoint, b.attach.server_name
    );
}

fn show(dir: &Path, json: bool, reveal: bool) -> Result<(), Failure> {
    let d = open(dir)?;
    let keys = d.keys();
    let fingerprint = hex::encode(keys.fingerprint().map_err(device_failure)?);
    let code = d.pairing_code().map_err(device_failure)?;
    let cred = d.credential().map(|c| {
        let b = &c.bundle;
        let mut v = serde_json::json!({
            "supi": b.supi.to_string(),
            "request_id": hex::encode(c.request_id.as_bytes()),
            "issued_at": b.issued_at,
            "expires_at": b.expires_at,
            "expired": b.expires_at <= now_unix(),
            "amf": hex::encode(b.amf),
            "sqn_start": b.sqn_start,
            "restrictions": {
                "roaming_allowed": b.restrictions.roaming_allowed,
                "dnns": b.restrictions.dnns,
                "max_bitrate_kbps": b.restrictions.max_bitrate_kbps,
            },
            "attach": {
                "endpoint": b.attach.endpoint,
                "server_name": b.attach.server_name,
                "trust_anchor_sha256": hex::encode(companion_transport::spki_fingerprint(&b.attach.trust_anchor)),
            },
        });
        if reveal {
            v["k"] = hex::encode(b.k.expose()).into();
            v["opc"] = hex::encode(b.opc.expose()).into();
        }
        v
    });
    let attempt = d.attempt().map(|a| {
        serde_json::json!({
            "request_id": hex::encode(a.request_id.as_bytes()),
            "kind": match a.kind { AttemptKind::Provision { .. } => "provision", AttemptKind::Renew { .. } => "renew" },
            "hpke_public_key": hex::encode(a.hpke.public_key()),
        })
    });
    if json {
        let v = serde_json::json!({
            "device_id": keys.device_id.to_string(),
            "dir": dir.display().to_string(),
            "fingerprint": fingerprint,
            "pairing_code": code,
            "gateway_pin": keys.gateway_pin.map(hex::encode),
            "attempt": attempt,
            "credential": cred,
        });
        println!("{}", serde_json::to_string_pretty(&v).context("JSON")?);
        return Ok(());
    }
    println!("device      {}  ({})", keys.device_id, dir.display());
    println!("key         {fingerprint}");
    println!("pairing     {code}");
    println!(
        "gateway     {}",
        keys.gateway_pin.map_or_else(
            || "not pinned yet (first provisioning pins it)".into(),
            hex::encode
        )
    );
    if let Some(a) = d.attempt() {
        let kind = match a.kind {
            AttemptKind::Provision { .. } => "provisioning",
            AttemptKind::Renew { .. } => "renewal",
        };
        println!(
            "in flight   {kind} request {} (resumed by the next command)",
            hex::encode(a.request_id.as_bytes())
        );
    }
    match d.credential() {
        None => println!("credential  none: `iotdev provision --gateway <addr>`"),
        Some(c) => {
            println!("credential");
            print_credential_summary(c);
            println!("  issued      {}", fmt_time(c.bundle.issued_at));
            if reveal {
                println!("  K           {}", hex::encode(c.bundle.k.expose()));
                println!("  OPc         {}", hex::encode(c.bundle.opc.expose()));
            } else {
                println!("  K, OPc      stored 0600 (show them with --reveal)");
            }
        }
    }
    Ok(())
}

async fn attach_cmd(
    dir: &Path,
    snn: Option<&str>,
    json: bool,
    timeout: Duration,
) -> Result<(), Failure> {
    let d = open(dir)?;
    let Some(c) = d.credential() else {
        return Err(attach_failure(AttachError::NoCredential));
    };
    let b = &c.bundle;
    let home_snn;
    let snn = match snn {
        Some(s) => s,
        None => {
            home_snn = b.home_network.serving_network_name().map_err(|e| {
                anyhow::anyhow!(
                    "the credential's home network is invalid ({e}); pass --serving-network"
                )
            })?;
            home_snn.as_str()
        }
    };
    if b.expires_at <= now_unix() {
        eprintln!(
            "note: the credential expired at {}; asking the network anyway",
            fmt_time(b.expires_at)
        );
    }
    let supi = b.supi.to_string();
    let initial = attach::initial_sqn_state(b);
    let state = match attach::load_sqn_state(dir, &supi).map_err(attach_failure)? {
        // A renewed bundle may start higher than what the USIM has seen: keep the maximum.
        Some(s) => {
            let mut seq = *s.seq_ms();
            for (a, b) in seq.iter_mut().zip(initial.seq_ms()) {
                *a = (*a).max(*b);
            }
            companion_crypto::usim::SqnState::new(seq).unwrap_or(initial)
        }
        None => initial,
    };
    let mut usim = attach::usim(b, Some(state.clone()));
    let target = attach::cn_target(b, snn).await.map_err(attach_failure)?;
    let ep = endpoint_for(target.addr)?;
    let opts = cn_client::ClientOptions {
        connect_timeout: timeout,
        exchange_timeout: timeout,
    };
    let started = Instant::now();
    let r = attach::attach(&ep, b, snn, &mut usim, opts).await;
    let after = usim.sqn_state();
    if after != state {
        attach::save_sqn_state(dir, &supi, &after).map_err(attach_failure)?;
    }
    ep.wait_idle().await;
    let accept = r.map_err(attach_failure)?;
    if json {
        let v = serde_json::json!({
            "attached": true,
            "supi": supi,
            "serving_network": snn,
            "expires_at": accept.expires_at,
            "restrictions": {
                "roaming_allowed": accept.restrictions.roaming_allowed,
                "dnns": accept.restrictions.dnns,
                "max_bitrate_kbps": accept.restrictions.max_bitrate_kbps,
            },
            "elapsed_ms": started.elapsed().as_millis() as u64,
        });
        println!("{}", serde_json::to_string_pretty(&v).context("JSON")?);
    } else {
        println!(
            "attached: the network at {} authenticated {} (5G AKA, {snn}) in {} ms",
            b.attach.endpoint,
            supi,
            started.elapsed().as_millis()
        );
        println!(
            "  valid until {} ({}); roaming {}",
            fmt_time(accept.expires_at),
            remaining(accept.expires_at),
            if accept.restrictions.roaming_allowed {
                "allowed"
            } else {
                "not allowed"
            }
        );
    }
    Ok(())
}

fn remaining(expires_at: u64) -> String {
    let now = now_unix();
    if expires_at <= now {
        return format!("expired {} ago", human(expires_at.abs_diff(now)));
    }
    format!("{} left", human(expires_at - now))
}

fn human(s: u64) -> String {
    match s {
        0..120 => format!("{s}s"),
        120..7200 => format!("{}m", s / 60),
        7200..172_800 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86_400),
    }
}

/// Unix seconds as `YYYY-MM-DD hh:mm:ss UTC`.
fn fmt_time(t: u64) -> String {
    let days = (t / 86_400) as i64;
    let secs = t % 86_400;
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
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

    #[test]
    fn times_format() {
        assert_eq!(fmt_time(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(fmt_time(1_764_633_600), "2025-12-02 00:00:00 UTC");
    }
}
