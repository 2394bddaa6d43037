//! Creating a device: the manufacturer CA and factory certificates (`factory`), the device's
//! keys and state directory (`init`), and the pairing code its owner scans (`pairing-code`).

use std::path::Path;

use anyhow::{Context, anyhow};
use companion_proto::DeviceId;
use companion_proto::msg::Params;
use iotdev::Device;

use crate::{FactoryCmd, Failure, device_failure, state_file};

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

/// `factory ca|device`: a manufacturer CA, or a device identity certified by one.
pub(crate) fn factory(cmd: FactoryCmd) -> Result<(), Failure> {
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

/// `init`: creates the device's state directory, keys and first attempt, then prints the
/// pairing code.
pub(crate) fn init(
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

/// Prints the `CPN:` pairing code, and its QR code unless `no_qr`.
pub(crate) fn print_pairing_code(d: &Device, no_qr: bool) -> Result<(), Failure> {
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
