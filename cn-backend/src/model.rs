//! Domain types: parent subscriptions, child credentials, identifiers and restrictions.
//!
//! Every constructor validates, so a value of these types is always well-formed; the store and the
//! policy functions never re-check syntax. Secrets (K, OPc, OP) live in
//! [`Key128`], which zeroizes on drop and never prints.

use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

use companion_crypto::aka::Sqn;
use companion_crypto::secret::Key128;
use thiserror::Error;

/// Longest device identifier accepted, in bytes.
pub const MAX_DEVICE_ID_LEN: usize = 128;

/// Longest data network name accepted, in bytes (TS 23.003 §9.1: an APN is at most 100 octets).
pub const MAX_DNN_LEN: usize = 100;

/// A syntactically invalid value.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ModelError {
    /// Not `imsi-` followed by 6 to 15 decimal digits.
    #[error("invalid SUPI {0:?}: expected imsi-<MCC><MNC><MSIN> with 6 to 15 digits")]
    Supi(String),
    /// MCC/MNC/MSIN range that does not describe 15-digit IMSIs.
    #[error("invalid IMSI range: {0}")]
    ImsiRange(String),
    /// Empty, too long or containing control characters.
    #[error("invalid device ID: {0}")]
    DeviceId(&'static str),
    /// Not a DNN label sequence of `[a-z0-9-]` separated by dots.
    #[error("invalid DNN {0:?}")]
    Dnn(String),
    /// A status string that is not one of the known values.
    #[error("invalid status {0:?}")]
    Status(String),
    /// A sequence number above 2^48 - 1.
    #[error("SQN {0} does not fit in 48 bits")]
    Sqn(u64),
    /// A policy value out of range.
    #[error("invalid policy: {0}")]
    Policy(&'static str),
}

/// Seconds since the Unix epoch. Every time the library uses is passed in by the caller, so
/// policy and storage are deterministic under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp(pub i64);

impl Timestamp {
    /// The current wall-clock time (for the daemon edges; the library itself never calls it).
    pub fn now() -> Self {
        let secs = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
        Self(secs)
    }

    /// Seconds since the epoch.
    pub fn as_secs(self) -> i64 {
        self.0
    }

    /// `self + secs`, saturating.
    pub fn plus_secs(self, secs: u64) -> Self {
        Self(
            self.0
                .saturating_add(i64::try_from(secs).unwrap_or(i64::MAX)),
        )
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A subscription permanent identifier in IMSI form: `imsi-<MCC><MNC><MSIN>`: the protocol's
/// [`companion_proto::ids::Supi`] (which validates it), with this crate's error type.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Supi(companion_proto::ids::Supi);

impl Supi {
    /// Parses `imsi-` followed by 6 to 15 decimal digits.
    pub fn parse(s: &str) -> Result<Self, ModelError> {
        companion_proto::ids::Supi::new(s)
            .map(Self)
            .map_err(|_| ModelError::Supi(truncate(s)))
    }

    /// The full `imsi-…` string.
    pub fn as_str(&self) -> &str {
        self.0.as_str()
    }

    /// The IMSI digits without the `imsi-` prefix.
    pub fn imsi(&self) -> &str {
        self.0.imsi()
    }
}

impl fmt::Display for Supi {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl fmt::Debug for Supi {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl std::str::FromStr for Supi {
    type Err = ModelError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

fn truncate(s: &str) -> String {
    s.chars().take(40).collect()
}

/// The operator-configured range child SUPIs are allocated from: 15-digit IMSIs
/// `<MCC><MNC><MSIN>` with MSIN in `first_msin..=last_msin`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImsiRange {
    plmn: String,
    first_msin: u64,
    last_msin: u64,
}

impl ImsiRange {
    /// A range for MCC (3 digits) and MNC (2 or 3 digits); the MSIN fills the IMSI to 15 digits.
    pub fn new(mcc: &str, mnc: &str, first_msin: u64, last_msin: u64) -> Result<Self, ModelError> {
        let digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
        if mcc.len() != 3 || !digits(mcc) {
            return Err(ModelError::ImsiRange("MCC must be 3 digits".into()));
        }
        if !(2..=3).contains(&mnc.len()) || !digits(mnc) {
            return Err(ModelError::ImsiRange("MNC must be 2 or 3 digits".into()));
        }
        let plmn = format!("{mcc}{mnc}");
        let width = 15 - plmn.len();
        let max = 10u64.pow(u32::try_from(width).unwrap_or(9)) - 1;
        if first_msin > last_msin || last_msin > max {
            return Err(ModelError::ImsiRange(format!(
                "MSIN range {first_msin}..={last_msin} must be ordered and fit in {width} digits"
            )));
        }
        Ok(Self {
            plmn,
            first_msin,
            last_msin,
        })
    }

    /// MCC followed by MNC.
    pub fn plmn(&self) -> &str {
        &self.plmn
    }

    /// First MSIN of the range.
    pub fn first_msin(&self) -> u64 {
        self.first_msin
    }

    /// Last MSIN of the range (inclusive).
    pub fn last_msin(&self) -> u64 {
        self.last_msin
    }

    /// Number of SUPIs in the range.
    pub fn len(&self) -> u64 {
        self.last_msin - self.first_msin + 1
    }

    /// A range is never empty; provided for API symmetry with `len`.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The SUPI for `msin`, if it lies in the range.
    pub fn supi(&self, msin: u64) -> Option<Supi> {
        if !(self.first_msin..=self.last_msin).contains(&msin) {
            return None;
        }
        let width = 15 - self.plmn.len();
        Supi::parse(&format!("imsi-{}{msin:0width$}", self.plmn)).ok()
    }
}

/// Status of a parent (companion) subscription.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SubscriptionStatus {
    /// May authenticate and obtain child credentials.
    Active,
    /// Temporarily barred; its children were revoked when it was suspended. May be resumed.
    Suspended,
    /// Permanently barred; terminal.
    Revoked,
}

impl SubscriptionStatus {
    /// The lower-case name stored in the database.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Suspended => "suspended",
            Self::Revoked => "revoked",
        }
    }

    /// Parses the lower-case name.
    pub fn parse(s: &str) -> Result<Self, ModelError> {
        match s {
            "active" => Ok(Self::Active),
            "suspended" => Ok(Self::Suspended),
            "revoked" => Ok(Self::Revoked),
            _ => Err(ModelError::Status(truncate(s))),
        }
    }
}

impl fmt::Display for SubscriptionStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Status of a child credential. Expiry is not a status: it is derived from `expires_at`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ChildStatus {
    /// Usable until it expires.
    Active,
    /// Revoked (directly or through its parent); terminal.
    Revoked,
}

impl ChildStatus {
    /// The lower-case name stored in the database.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Revoked => "revoked",
        }
    }

    /// Parses the lower-case name.
    pub fn parse(s: &str) -> Result<Self, ModelError> {
        match s {
            "active" => Ok(Self::Active),
            "revoked" => Ok(Self::Revoked),
            _ => Err(ModelError::Status(truncate(s))),
        }
    }
}

impl fmt::Display for ChildStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A data network name, normalised to lower case (DNNs compare case-insensitively).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Dnn(String);

impl Dnn {
    /// Parses dot-separated labels of `[A-Za-z0-9-]`, 1 to 100 bytes.
    pub fn parse(s: &str) -> Result<Self, ModelError> {
        let ok = !s.is_empty()
            && s.len() <= MAX_DNN_LEN
            && s.split('.').all(|label| {
                !label.is_empty()
                    && label
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-')
            });
        if !ok {
            return Err(ModelError::Dnn(truncate(s)));
        }
        Ok(Self(s.to_ascii_lowercase()))
    }

    /// The normalised name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Dnn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Sorts and de-duplicates a DNN list (the canonical form stored and compared).
pub fn canonical_dnns(mut dnns: Vec<Dnn>) -> Vec<Dnn> {
    dnns.sort();
    dnns.dedup();
    dnns
}

/// Authentication management field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Amf(pub [u8; 2]);

impl Amf {
    /// AMF with the separation bit set (TS 33.102 Annex H), as used for 5G/EPS vectors.
    pub const DEFAULT: Amf = Amf([0x80, 0x00]);
}

impl fmt::Display for Amf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

/// A device identifier as sent by the device (seed step 2): 1 to 128 bytes of UTF-8 without
/// control characters.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DeviceId(String);

impl DeviceId {
    /// Validates a device identifier.
    pub fn parse(s: &str) -> Result<Self, ModelError> {
        if s.is_empty() {
            return Err(ModelError::DeviceId("empty"));
        }
        if s.len() > MAX_DEVICE_ID_LEN {
            return Err(ModelError::DeviceId("longer than 128 bytes"));
        }
        if s.chars().any(char::is_control) {
            return Err(ModelError::DeviceId("contains control characters"));
        }
        Ok(Self(s.to_owned()))
    }

    /// The identifier.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A 16-byte request identifier chosen by the device; the idempotency key of a request.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RequestId(pub [u8; 16]);

impl fmt::Debug for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RequestId({})", hex::encode(self.0))
    }
}

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

/// SHA-256 fingerprint of the device's public key (the key pinned at pairing).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyFingerprint(pub [u8; 32]);

impl fmt::Debug for KeyFingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyFingerprint({})", hex::encode(self.0))
    }
}

impl fmt::Display for KeyFingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

/// K and OPc of one subscriber. Both zeroize on drop and print as redacted.
#[derive(Debug, Clone)]
pub struct SubscriberKeys {
    /// The permanent key K.
    pub k: Key128,
    /// OPc = AES_K(OP) xor OP.
    pub opc: Key128,
}

/// What a parent subscription allows its children (Notes 1–3 of the seed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParentPolicy {
    /// How many active, unexpired child credentials may exist at once.
    pub max_children: u32,
    /// Longest lifetime of a child credential, in seconds (at least 1).
    pub max_lifetime_s: u64,
    /// Whether children may be granted roaming.
    pub roaming_allowed: bool,
    /// DNNs children may use; empty means any.
    pub allowed_dnns: Vec<Dnn>,
    /// Bitrate cap for children in kbit/s; `None` means no cap.
    pub max_bitrate_kbps: Option<u32>,
    /// Issue and renew only for devices whose identity key a manufacturer root certifies for
    /// their device ID (PROTOCOL.md §4.5).
    pub require_attestation: bool,
}

impl ParentPolicy {
    /// Checks ranges and puts the DNN list in canonical order.
    pub fn validated(mut self) -> Result<Self, ModelError> {
        if self.max_lifetime_s == 0 {
            return Err(ModelError::Policy("max_lifetime_s must be at least 1"));
        }
        if self.max_lifetime_s > i64::MAX as u64 {
            return Err(ModelError::Policy("max_lifetime_s is too large"));
        }
        if self.max_bitrate_kbps == Some(0) {
            return Err(ModelError::Policy("max_bitrate_kbps must be at least 1"));
        }
        if self.max_children > i32::MAX as u32 {
            return Err(ModelError::Policy("max_children is too large"));
        }
        self.allowed_dnns = canonical_dnns(self.allowed_dnns);
        Ok(self)
    }

    /// The widest restrictions a child of this parent could have.
    pub fn ceiling(&self) -> Restrictions {
        Restrictions {
            roaming_allowed: self.roaming_allowed,
            allowed_dnns: self.allowed_dnns.clone(),
            max_bitrate_kbps: self.max_bitrate_kbps,
        }
    }
}

/// A parent (companion UE) subscription as stored, without its secrets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parent {
    /// The companion's SUPI.
    pub supi: Supi,
    /// AMF used in its authentication vectors.
    pub amf: Amf,
    /// SQN_HE: the last SQN handed out in an authentication vector (0 = none yet).
    pub sqn: Sqn,
    /// Lifecycle status.
    pub status: SubscriptionStatus,
    /// What the subscription allows its children.
    pub policy: ParentPolicy,
    /// When the subscription was added.
    pub created_at: Timestamp,
    /// When status or policy last changed.
    pub updated_at: Timestamp,
}

/// A parent subscription to add (one CLI `subscriber add`, or one CSV row).
#[derive(Debug, Clone)]
pub struct NewParent {
    /// The companion's SUPI.
    pub supi: Supi,
    /// K and OPc.
    pub keys: SubscriberKeys,
    /// AMF used in its authentication vectors.
    pub amf: Amf,
    /// Initial SQN_HE (the last SQN used; 0 for a new USIM).
    pub sqn: Sqn,
    /// Child policy.
    pub policy: ParentPolicy,
}

/// What a child credential is allowed to do; always within its parent's [`ParentPolicy`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Restrictions {
    /// Whether the credential may attach through a visited network.
    pub roaming_allowed: bool,
    /// DNNs the credential may use; empty means any (only possible if the parent allows any).
    pub allowed_dnns: Vec<Dnn>,
    /// Bitrate cap in kbit/s; `None` means no cap.
    pub max_bitrate_kbps: Option<u32>,
}

/// A child credential as stored, without its secrets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChildCredential {
    /// Allocated from the operator's IMSI range; never reused.
    pub supi: Supi,
    /// The companion subscription this credential is tied to.
    pub parent: Supi,
    /// The device it was issued for.
    pub device_id: DeviceId,
    /// Fingerprint of the device key it was issued to.
    pub device_key_fingerprint: KeyFingerprint,
    /// The device key itself (DER SubjectPublicKeyInfo) that signed the provisioning request's
    /// key binding: renewals must be signed by it. `None` for credentials issued before key
    /// binding (schema v3), which cannot be renewed.
    pub device_spki: Option<Vec<u8>>,
    /// Request ID of the provisioning request that created it.
    pub request_id: RequestId,
    /// AMF used in its authentication vectors.
    pub amf: Amf,
    /// SQN_HE: the last SQN handed out in an authentication vector (0 = none yet).
    pub sqn: Sqn,
    /// When it was first issued.
    pub issued_at: Timestamp,
    /// When it stops being valid (exclusive).
    pub expires_at: Timestamp,
    /// When it was last renewed, if ever.
    pub renewed_at: Option<Timestamp>,
    /// Narrowed restrictions.
    pub restrictions: Restrictions,
    /// Active or revoked.
    pub status: ChildStatus,
    /// When it was revoked, if it was.
    pub revoked_at: Option<Timestamp>,
}

impl ChildCredential {
    /// Active and not yet expired at `now`.
    pub fn is_usable(&self, now: Timestamp) -> bool {
        self.status == ChildStatus::Active && now < self.expires_at
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn supi_parsing() {
        assert!(Supi::parse("imsi-001010000000001").is_ok());
        assert!(Supi::parse("imsi-00101").is_err());
        assert!(Supi::parse("imsi-0010100000000011").is_err());
        assert!(Supi::parse("nai-foo").is_err());
        assert!(Supi::parse("imsi-00101a000000001").is_err());
        let s = Supi::parse("imsi-001010000000001").unwrap();
        assert_eq!(s.imsi(), "001010000000001");
    }

    #[test]
    fn imsi_range() {
        let r = ImsiRange::new("001", "01", 5, 7).unwrap();
        assert_eq!(r.supi(5).unwrap().as_str(), "imsi-001010000000005");
        assert!(r.supi(8).is_none());
        assert_eq!(r.len(), 3);
        let r3 = ImsiRange::new("310", "410", 1, 1).unwrap();
        assert_eq!(r3.supi(1).unwrap().as_str(), "imsi-310410000000001");
        assert!(ImsiRange::new("001", "01", 0, 10_000_000_000).is_err());
        assert!(ImsiRange::new("01", "01", 0, 1).is_err());
        assert!(ImsiRange::new("001", "01", 2, 1).is_err());
    }

    #[test]
    fn dnn_and_device_id() {
        assert_eq!(Dnn::parse("Internet").unwrap().as_str(), "internet");
        assert!(Dnn::parse("ims.mnc001.mcc001.gprs").is_ok());
        assert!(Dnn::parse("a..b").is_err());
        assert!(Dnn::parse("").is_err());
        assert!(Dnn::parse("a,b").is_err());
        assert!(DeviceId::parse("watch-1").is_ok());
        assert!(DeviceId::parse("").is_err());
        assert!(DeviceId::parse("a\nb").is_err());
        assert!(DeviceId::parse(&"x".repeat(129)).is_err());
    }

    #[test]
    fn policy_validation() {
        let p = ParentPolicy {
            max_children: 1,
            max_lifetime_s: 0,
            roaming_allowed: false,
            allowed_dnns: vec![],
            max_bitrate_kbps: None,
            require_attestation: false,
        };
        assert!(p.clone().validated().is_err());
        let p = ParentPolicy {
            max_lifetime_s: 10,
            allowed_dnns: vec![
                Dnn::parse("b").unwrap(),
                Dnn::parse("a").unwrap(),
                Dnn::parse("B").unwrap(),
            ],
            ..p
        }
        .validated()
        .unwrap();
        assert_eq!(
            p.allowed_dnns,
            vec![Dnn::parse("a").unwrap(), Dnn::parse("b").unwrap()]
        );
    }
}
