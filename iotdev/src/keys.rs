//! The device's identity as the gateway sees it.

use companion_proto::DeviceId;
use companion_proto::pairing::PairingCode;
use companion_transport::Identity;

use crate::DeviceError;

/// Device ID, TLS identity and pinned gateway key: what a connection to the gateway needs.
#[derive(Debug, Clone)]
pub struct DeviceKeys {
    /// The device's identifier (the `I` of its pairing code).
    pub device_id: DeviceId,
    /// The self-signed certificate and key presented in the TLS handshake.
    pub identity: Identity,
    /// SHA-256 of the gateway's SPKI, once pinned; `None` = trust on first use.
    pub gateway_pin: Option<[u8; 32]>,
    /// The operator CA (DER) from the device's factory configuration, if it has one: every
    /// bundle must then carry the CN's signature chaining to it (PROTOCOL.md §9.1), so a bundle
    /// made up by the gateway or anyone posing as it is refused.
    pub operator_anchor: Option<Vec<u8>>,
}

impl DeviceKeys {
    /// A new device identity (fresh P-256 key, self-signed certificate), no gateway pinned.
    pub fn generate(device_id: DeviceId) -> Result<Self, DeviceError> {
        let identity = Identity::self_signed(device_id.as_str())
            .map_err(|e| DeviceError::Local(format!("cannot create the device key: {e}")))?;
        Ok(Self {
            device_id,
            identity,
            gateway_pin: None,
            operator_anchor: None,
        })
    }

    /// A device identity from the factory: a key and the manufacturer's certificate chain for it
    /// (PROTOCOL.md §4.5). The chain must certify this key (checked by signing with it) and, if
    /// it names a device (`urn:companion:device:<id>`), name `device_id`.
    pub fn from_factory(device_id: DeviceId, identity: Identity) -> Result<Self, DeviceError> {
        let spki = identity
            .spki_der()
            .map_err(|e| DeviceError::Local(format!("factory certificate: {e}")))?;
        let probe = b"companion factory identity check";
        let signed = companion_transport::sign_binding(&identity, probe)
            .map_err(|e| DeviceError::Local(format!("factory key: {e}")))?;
        if companion_transport::verify_binding(&spki, probe, &signed).is_err() {
            return Err(DeviceError::Local(
                "the factory key is not the key the factory certificate certifies".into(),
            ));
        }
        if let Some(named) = identity
            .chain()
            .first()
            .and_then(|leaf| companion_transport::attestation::certified_device_id(leaf))
            && named != device_id.as_str()
        {
            return Err(DeviceError::Local(format!(
                "the factory certificate is for device {named}, not {device_id}"
            )));
        }
        Ok(Self {
            device_id,
            identity,
            gateway_pin: None,
            operator_anchor: None,
        })
    }

    /// The DER SubjectPublicKeyInfo of the TLS key.
    pub fn spki_der(&self) -> Result<Vec<u8>, DeviceError> {
        self.identity
            .spki_der()
            .map_err(|e| DeviceError::Local(format!("device certificate: {e}")))
    }

    /// SHA-256 of the TLS key's SPKI (what the gateway pairs).
    pub fn fingerprint(&self) -> Result<[u8; 32], DeviceError> {
        Ok(companion_transport::spki_fingerprint(&self.spki_der()?))
    }

    /// The pairing code the owner gives `gatewayctl pair`.
    pub fn pairing_code(&self) -> Result<PairingCode, DeviceError> {
        PairingCode::new(self.device_id.clone(), self.spki_der()?)
            .map_err(|e| DeviceError::Local(format!("pairing code: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairing_code_round_trips() {
        let k = DeviceKeys::generate(DeviceId::new("watch-01").unwrap()).unwrap();
        let code = k.pairing_code().unwrap().to_string();
        assert!(code.starts_with("CPN:V:1;I:watch-01;K:"), "{code}");
        let parsed = PairingCode::parse(&code).unwrap();
        assert_eq!(parsed.fingerprint(), k.fingerprint().unwrap());
    }
}
