//! The pairing (bootstrapping) code, modelled on Wi-Fi Easy Connect's `DPP:` URI:
//!
//! ```text
//! CPN:V:1;I:<device-id>;K:<base64 DER SubjectPublicKeyInfo>;;
//! ```
//!
//! Fields come in any order, each `TAG:value;`, and the code ends with an empty field (`;;`).
//! `V` (version, `1`), `I` (device id) and `K` (the device's TLS public key) are mandatory;
//! unknown tags are ignored, a repeated known tag is an error. Leading/trailing ASCII whitespace
//! around the whole code (as left by scanners) is trimmed.

use std::fmt;
use std::str::FromStr;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use sha2::{Digest, Sha256};

use crate::ids::DeviceId;

/// Scheme prefix.
pub const PREFIX: &str = "CPN:";
/// Longest accepted code, in bytes (an RSA-4096 SPKI in base64 fits comfortably).
pub const MAX_LEN: usize = 2048;

/// A parsed pairing code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PairingCode {
    /// The device's identifier.
    pub device_id: DeviceId,
    /// DER SubjectPublicKeyInfo of the device's TLS key (self-signed certificate's key).
    pub spki_der: Vec<u8>,
}

/// Why a pairing code was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PairingError {
    /// Longer than [`MAX_LEN`].
    #[error("pairing code too long ({0} bytes, at most {MAX_LEN})")]
    TooLong(usize),
    /// Does not start with `CPN:`.
    #[error("pairing code must start with \"CPN:\"")]
    MissingPrefix,
    /// Not terminated by `;;`, or text after the terminator.
    #[error("pairing code must end with \";;\"")]
    MissingTerminator,
    /// A field without `TAG:`.
    #[error("malformed field {0:?} (expected TAG:value)")]
    MalformedField(String),
    /// A known tag appears twice.
    #[error("field {0} appears more than once")]
    DuplicateField(String),
    /// A mandatory field is absent.
    #[error("missing mandatory field {0}")]
    MissingField(&'static str),
    /// `V` is not `1`.
    #[error("unsupported pairing code version {0:?}")]
    UnsupportedVersion(String),
    /// `I` is not a valid device id.
    #[error("invalid device id: {0}")]
    DeviceId(#[from] crate::ids::IdError),
    /// `K` is not base64.
    #[error("K is not valid base64")]
    Base64,
    /// `K` does not hold a DER SubjectPublicKeyInfo.
    #[error("K is not a DER SubjectPublicKeyInfo")]
    Spki,
}

fn truncated(s: &str) -> String {
    s.chars().take(40).collect()
}

impl PairingCode {
    /// Builds a code after checking the SPKI's DER structure.
    pub fn new(device_id: DeviceId, spki_der: Vec<u8>) -> Result<Self, PairingError> {
        check_spki(&spki_der)?;
        Ok(PairingCode {
            device_id,
            spki_der,
        })
    }

    /// Parses a code.
    pub fn parse(s: &str) -> Result<Self, PairingError> {
        if s.len() > MAX_LEN {
            return Err(PairingError::TooLong(s.len()));
        }
        let s = s.trim_matches(|c: char| c.is_ascii_whitespace());
        let rest = s.strip_prefix(PREFIX).ok_or(PairingError::MissingPrefix)?;
        let body = rest
            .strip_suffix(";;")
            .ok_or(PairingError::MissingTerminator)?;
        let (mut v, mut i, mut k) = (None, None, None);
        for field in body.split(';') {
            let (tag, value) = field
                .split_once(':')
                .filter(|(t, _)| !t.is_empty() && t.bytes().all(|b| b.is_ascii_uppercase()))
                .ok_or_else(|| match field {
                    // An empty field before the end means ";;" appeared early.
                    "" => PairingError::MissingTerminator,
                    f => PairingError::MalformedField(truncated(f)),
                })?;
            let slot = match tag {
                "V" => &mut v,
                "I" => &mut i,
                "K" => &mut k,
                _ => continue,
            };
            if slot.replace(value).is_some() {
                return Err(PairingError::DuplicateField(tag.to_owned()));
            }
        }
        let v = v.ok_or(PairingError::MissingField("V"))?;
        if v != "1" {
            return Err(PairingError::UnsupportedVersion(truncated(v)));
        }
        let device_id = DeviceId::new(i.ok_or(PairingError::MissingField("I"))?)?;
        let spki_der = STANDARD
            .decode(k.ok_or(PairingError::MissingField("K"))?)
            .map_err(|_| PairingError::Base64)?;
        PairingCode::new(device_id, spki_der)
    }

    /// SHA-256 of the SPKI DER: the key fingerprint carried in `BatchItem`.
    pub fn fingerprint(&self) -> [u8; 32] {
        spki_fingerprint(&self.spki_der)
    }
}

/// SHA-256 of a DER SubjectPublicKeyInfo.
pub fn spki_fingerprint(spki_der: &[u8]) -> [u8; 32] {
    Sha256::digest(spki_der).into()
}

impl fmt::Display for PairingCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{PREFIX}V:1;I:{};K:{};;",
            self.device_id,
            STANDARD.encode(&self.spki_der)
        )
    }
}

impl FromStr for PairingCode {
    type Err = PairingError;
    fn from_str(s: &str) -> Result<Self, PairingError> {
        PairingCode::parse(s)
    }
}

/// Reads one DER TLV at the start of `b`: (tag, contents, rest).
fn der_tlv(b: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, b) = b.split_first()?;
    let (&l0, b) = b.split_first()?;
    let (len, b) = if l0 < 0x80 {
        (usize::from(l0), b)
    } else {
        let n = usize::from(l0 & 0x7f);
        if n == 0 || n > 2 || b.len() < n {
            return None;
        }
        let len = b[..n]
            .iter()
            .fold(0usize, |a, &x| (a << 8) | usize::from(x));
        // DER: shortest length form.
        if len < 0x80 || (n == 2 && len < 0x100) {
            return None;
        }
        (len, &b[n..])
    };
    (b.len() >= len).then(|| (tag, &b[..len], &b[len..]))
}

/// Structural check: `SEQUENCE { SEQUENCE { ... }, BIT STRING }` filling the input exactly.
fn check_spki(der: &[u8]) -> Result<(), PairingError> {
    let ok = (|| {
        let (tag, inner, rest) = der_tlv(der)?;
        if tag != 0x30 || !rest.is_empty() {
            return None;
        }
        let (alg_tag, _, inner) = der_tlv(inner)?;
        let (key_tag, key, inner) = der_tlv(inner)?;
        (alg_tag == 0x30 && key_tag == 0x03 && inner.is_empty() && key.len() >= 2).then_some(())
    })();
    ok.ok_or(PairingError::Spki)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An Ed25519 SPKI (RFC 8410 example key).
    pub(crate) const ED25519_SPKI: [u8; 44] = [
        0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00, 0x19, 0xbf, 0x44,
        0x09, 0x69, 0x84, 0xcd, 0xfe, 0x85, 0x41, 0xba, 0xc1, 0x67, 0xdc, 0x3b, 0x96, 0xc8, 0x50,
        0x86, 0xaa, 0x30, 0xb6, 0xb6, 0xcb, 0x0c, 0x5c, 0x38, 0xad, 0x70, 0x31, 0x66, 0xe1,
    ];

    #[test]
    fn round_trip_and_golden() {
        let code =
            PairingCode::new(DeviceId::new("watch-01").unwrap(), ED25519_SPKI.to_vec()).unwrap();
        let s = code.to_string();
        assert_eq!(
            s,
            "CPN:V:1;I:watch-01;K:MCowBQYDK2VwAyEAGb9ECWmEzf6FQbrBZ9w7lshQhqowtrbLDFw4rXAxZuE=;;"
        );
        assert_eq!(PairingCode::parse(&s).unwrap(), code);
        // Any order, unknown fields ignored, whitespace trimmed.
        let t = " CPN:K:MCowBQYDK2VwAyEAGb9ECWmEzf6FQbrBZ9w7lshQhqowtrbLDFw4rXAxZuE=;X:whatever;I:watch-01;V:1;;\n";
        assert_eq!(PairingCode::parse(t).unwrap(), code);
        assert_eq!(hex(&code.fingerprint()), hex(&Sha256::digest(ED25519_SPKI)));
    }

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    #[test]
    fn errors() {
        let k = "MCowBQYDK2VwAyEAGb9ECWmEzf6FQbrBZ9w7lshQhqowtrbLDFw4rXAxZuE=";
        let p = |s: &str| PairingCode::parse(s).unwrap_err();
        assert_eq!(p("DPP:V:1;;"), PairingError::MissingPrefix);
        assert_eq!(
            p(&format!("CPN:V:1;I:a;K:{k};")),
            PairingError::MissingTerminator
        );
        assert_eq!(
            p(&format!("CPN:V:1;;I:a;K:{k};;")),
            PairingError::MissingTerminator
        );
        assert_eq!(
            p(&format!("CPN:I:a;K:{k};;")),
            PairingError::MissingField("V")
        );
        assert_eq!(p("CPN:V:1;I:a;;"), PairingError::MissingField("K"));
        assert_eq!(
            p(&format!("CPN:V:2;I:a;K:{k};;")),
            PairingError::UnsupportedVersion("2".into())
        );
        assert_eq!(
            p(&format!("CPN:V:1;V:1;I:a;K:{k};;")),
            PairingError::DuplicateField("V".into())
        );
        assert!(matches!(
            p(&format!("CPN:V:1;I:a b;K:{k};;")),
            PairingError::DeviceId(_)
        ));
        assert_eq!(p("CPN:V:1;I:a;K:!!!;;"), PairingError::Base64);
        assert_eq!(p("CPN:V:1;I:a;K:AAAA;;"), PairingError::Spki);
        assert!(matches!(
            p("CPN:V:1;junk;;"),
            PairingError::MalformedField(_)
        ));
        assert!(matches!(p(&"x".repeat(3000)), PairingError::TooLong(3000)));
    }
}
