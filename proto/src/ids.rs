//! Validated identifiers: [`Supi`], [`DeviceId`], [`RequestId`], and the serving network name.

use std::fmt;
use std::str::FromStr;

use minicbor::decode::{Decoder, Error as CborError};
use minicbor::encode::{Encoder, Error as EncError, Write};

use crate::codec::invalid;

/// Why an identifier string was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    /// A SUPI that is not `imsi-` followed by 6 to 15 digits.
    #[error("invalid SUPI {0:?}: expected imsi- followed by 6..=15 digits (MCC 3, MNC 2-3, MSIN)")]
    Supi(String),
    /// A device id that is not 1..=64 characters of `[A-Za-z0-9._:-]`.
    #[error("invalid device id {0:?}: expected 1..=64 characters of [A-Za-z0-9._:-]")]
    DeviceId(String),
    /// MCC/MNC of the wrong shape.
    #[error("invalid PLMN: MCC must be 3 digits and MNC 2 or 3 digits")]
    Plmn,
}

fn truncated(s: &str) -> String {
    s.chars().take(80).collect()
}

/// A subscription permanent identifier in IMSI form: `imsi-<MCC><MNC><MSIN>`.
///
/// Validation: the prefix `imsi-` then 6 to 15 ASCII digits (MCC is 3 digits, MNC 2 or 3, the
/// MSIN at least 1; an IMSI is at most 15 digits, TS 23.003 §2.2). The MNC length cannot be read
/// off the digits; callers that need it know their PLMN.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Supi(String);

impl Supi {
    /// Length bounds of the digit part.
    pub const MIN_DIGITS: usize = 6;
    /// An IMSI is at most 15 digits.
    pub const MAX_DIGITS: usize = 15;

    /// Validates `s`.
    pub fn new(s: &str) -> Result<Self, IdError> {
        let digits = s
            .strip_prefix("imsi-")
            .ok_or_else(|| IdError::Supi(truncated(s)))?;
        if !(Self::MIN_DIGITS..=Self::MAX_DIGITS).contains(&digits.len())
            || !digits.bytes().all(|b| b.is_ascii_digit())
        {
            return Err(IdError::Supi(truncated(s)));
        }
        Ok(Supi(s.to_owned()))
    }

    /// Builds `imsi-<mcc><mnc><msin>`; checks the MCC/MNC shape and the total length.
    pub fn from_parts(mcc: &str, mnc: &str, msin: &str) -> Result<Self, IdError> {
        check_plmn(mcc, mnc)?;
        Supi::new(&format!("imsi-{mcc}{mnc}{msin}"))
    }

    /// The string form, `imsi-...`.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The IMSI digits.
    pub fn imsi(&self) -> &str {
        &self.0[5..]
    }

    /// The mobile country code (first 3 digits).
    pub fn mcc(&self) -> &str {
        &self.0[5..8]
    }
}

impl fmt::Display for Supi {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Supi {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Supi({})", self.0)
    }
}

impl FromStr for Supi {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        Supi::new(s)
    }
}

impl AsRef<str> for Supi {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

fn check_plmn(mcc: &str, mnc: &str) -> Result<(), IdError> {
    let digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if mcc.len() == 3 && (mnc.len() == 2 || mnc.len() == 3) && digits(mcc) && digits(mnc) {
        Ok(())
    } else {
        Err(IdError::Plmn)
    }
}

/// The 5G serving network name of a PLMN (TS 24.501 §9.12.1, TS 33.501 §6.1.1.4):
/// `5G:mnc<MNC, 3 digits, zero-padded>.mcc<MCC>.3gppnetwork.org`.
pub fn serving_network_name(mcc: &str, mnc: &str) -> Result<String, IdError> {
    check_plmn(mcc, mnc)?;
    Ok(format!("5G:mnc{mnc:0>3}.mcc{mcc}.3gppnetwork.org"))
}

/// A device identifier: 1 to 64 characters of `[A-Za-z0-9._:-]`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeviceId(String);

impl DeviceId {
    /// Longest device id.
    pub const MAX_LEN: usize = 64;

    /// Validates `s`.
    pub fn new(s: &str) -> Result<Self, IdError> {
        let ok = (1..=Self::MAX_LEN).contains(&s.len())
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'));
        if ok {
            Ok(DeviceId(s.to_owned()))
        } else {
            Err(IdError::DeviceId(truncated(s)))
        }
    }

    /// The string form.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DeviceId({})", self.0)
    }
}

impl FromStr for DeviceId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        DeviceId::new(s)
    }
}

impl AsRef<str> for DeviceId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

/// A 16-byte request identifier chosen at random by the requester; idempotency key of a
/// provisioning from device to CN.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RequestId(pub [u8; 16]);

impl RequestId {
    /// The raw bytes.
    pub fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }

    /// The request ID of the renewal that follows the credential issued for `self`:
    /// the first 16 bytes of `SHA-256("companion renewal v1" || self)` (PROTOCOL.md §4.2). The
    /// device and the gateway derive the same value, so a renewal the gateway pre-fetched is
    /// found by the device's own `RenewRequest`, and retries stay idempotent at the CN.
    pub fn renewal(&self) -> RequestId {
        use sha2::{Digest, Sha256};
        let digest = Sha256::new()
            .chain_update(b"companion renewal v1")
            .chain_update(self.0)
            .finalize();
        let mut out = [0u8; 16];
        out.copy_from_slice(&digest[..16]);
        RequestId(out)
    }
}

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

impl fmt::Debug for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RequestId({self})")
    }
}

impl From<[u8; 16]> for RequestId {
    fn from(b: [u8; 16]) -> Self {
        RequestId(b)
    }
}

macro_rules! string_codec {
    ($t:ident) => {
        impl<C> minicbor::Encode<C> for $t {
            fn encode<W: Write>(
                &self,
                e: &mut Encoder<W>,
                _: &mut C,
            ) -> Result<(), EncError<W::Error>> {
                e.str(&self.0)?;
                Ok(())
            }
        }

        impl<'b, C> minicbor::Decode<'b, C> for $t {
            fn decode(d: &mut Decoder<'b>, _: &mut C) -> Result<Self, CborError> {
                let s = d.str()?;
                $t::new(s).map_err(|e| invalid(e.to_string()))
            }
        }
    };
}
string_codec!(Supi);
string_codec!(DeviceId);

impl<C> minicbor::Encode<C> for RequestId {
    fn encode<W: Write>(&self, e: &mut Encoder<W>, c: &mut C) -> Result<(), EncError<W::Error>> {
        crate::codec::fixed::encode(&self.0, e, c)
    }
}

impl<'b, C> minicbor::Decode<'b, C> for RequestId {
    fn decode(d: &mut Decoder<'b>, c: &mut C) -> Result<Self, CborError> {
        crate::codec::fixed::decode(d, c).map(RequestId)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn supi_validation() {
        assert!(Supi::new("imsi-001010000000001").is_ok());
        assert!(Supi::new("imsi-00101").is_err()); // 5 digits
        assert!(Supi::new("imsi-001011").is_ok()); // 6 digits
        assert!(Supi::new("imsi-0010100000000011").is_err()); // 16 digits
        assert!(Supi::new("nai-foo").is_err());
        assert!(Supi::new("imsi-00101a000000001").is_err());
        assert!(Supi::new("imsi-٣٣٣٣٣٣").is_err());
        let s = Supi::from_parts("001", "01", "0000000001").unwrap();
        assert_eq!(s.as_str(), "imsi-001010000000001");
        assert_eq!(s.mcc(), "001");
        assert!(Supi::from_parts("01", "01", "1").is_err());
    }

    #[test]
    fn device_id_validation() {
        assert!(DeviceId::new("watch-42:a_b.c").is_ok());
        assert!(DeviceId::new("").is_err());
        assert!(DeviceId::new(&"a".repeat(64)).is_ok());
        assert!(DeviceId::new(&"a".repeat(65)).is_err());
        assert!(DeviceId::new("a b").is_err());
        assert!(DeviceId::new("é").is_err());
    }

    #[test]
    fn snn() {
        assert_eq!(
            serving_network_name("001", "01").unwrap(),
            "5G:mnc001.mcc001.3gppnetwork.org"
        );
        assert_eq!(
            serving_network_name("310", "410").unwrap(),
            "5G:mnc410.mcc310.3gppnetwork.org"
        );
        assert!(serving_network_name("31", "410").is_err());
    }
}

#[cfg(test)]
mod renewal_tests {
    use super::RequestId;

    #[test]
    fn renewal_request_id_vector() {
        let r = RequestId(core::array::from_fn(|i| i as u8));
        // SHA-256("companion renewal v1" || 000102..0f), first 16 bytes; the vector quoted in
        // PROTOCOL.md §4.2.
        assert_eq!(r.renewal().to_string(), RENEWAL_OF_0_TO_15);
        assert_ne!(r.renewal(), r.renewal().renewal());
    }

    const RENEWAL_OF_0_TO_15: &str = "da9d1c5ff2df036e5d80769b71b530b4";
}
