//! The registry of paired device keys — the owner's side of "mutual trust" (seed step 1).
//!
//! A device is admitted to the TLS handshake iff the SHA-256 of its certificate's
//! SubjectPublicKeyInfo is paired, or a pairing window is open. Pairings live in memory (the
//! handshake asks on every connection) and are mirrored in [`State`]; every change is written to
//! the database first, so memory never shows what is not on disk.
//!
//! Two ways to pair:
//! - **Pairing code** (`gatewayctl pair 'CPN:V:1;I:<id>;K:<base64 SPKI>;;'`): binds the device ID
//!   to the key in the code. The device must later present exactly that key, and its
//!   `ProvisionRequest` must carry exactly that device ID ([`PairingRegistry::authorize`]).
//! - **Pairing window** (`gatewayctl pair --window 2m`, like Matter's commissioning window):
//!   while open, an unknown key passes the handshake. The first such device whose handshake
//!   completes *claims* the window ([`PairingRegistry::claim_window`]) — it is only called after
//!   the handshake, once the device has proven it holds the private key, so a peer replaying
//!   someone else's certificate cannot burn the window. From then on the window admits no other
//!   new key. The claimant's first successful provisioning binds its device ID to its key
//!   ([`PairingRegistry::bind_window_claim`]) and closes the window. A claim is held until the
//!   later of the window's end and [`CLAIM_HOLD`] after the claim (time for a "retry later"
//!   from the CN), then lapses.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use companion_proto::DeviceId;
use companion_proto::pairing::PairingCode;
use companion_transport::KeyPolicy;

use crate::clock::Clock;
use crate::state::{PairedVia, Pairing, Revocation, State, StateError, UnixTime};

/// How long a claimed window keeps admitting its claimant, counted from the claim.
pub const CLAIM_HOLD: Duration = Duration::from_secs(600);
/// Longest label, in characters.
pub const MAX_LABEL: usize = 64;

/// Why a pairing operation was refused.
#[derive(Debug, thiserror::Error)]
pub enum PairingError {
    #[error("pairing code rejected: {0}")]
    Code(#[from] companion_proto::pairing::PairingError),
    #[error("device {0} is already paired with a different key; revoke it first")]
    DeviceAlreadyPaired(DeviceId),
    #[error("this key is already paired as device {0}")]
    KeyAlreadyPaired(DeviceId),
    #[error("device {0} is not paired")]
    NotPaired(DeviceId),
    #[error(
        "a pairing window of {} is longer than the allowed {} ([pairing] max_window)",
        humantime::format_duration(*.requested),
        humantime::format_duration(*.max)
    )]
    WindowTooLong { requested: Duration, max: Duration },
    #[error("pairing window must be longer than 0s")]
    WindowZero,
    #[error("no pairing window is open for a new device")]
    WindowClosed,
    #[error("the pairing window was claimed by another device")]
    NotClaimant,
    #[error("device presents the key paired as {paired} but claims to be {presented}")]
    DeviceMismatch {
        presented: DeviceId,
        paired: DeviceId,
    },
    #[error("invalid label: {0}")]
    Label(String),
    #[error(transparent)]
    State(#[from] StateError),
}

/// What the handshake-time check found, for the connection handler after the handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// The key is paired to this device.
    Paired(DeviceId),
    /// Unknown key admitted by the open window: call [`PairingRegistry::claim_window`].
    WindowCandidate,
    /// Neither paired nor covered by a window.
    Refused,
}

/// A snapshot of the pairing window.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct WindowStatus {
    /// Unix time the window closes to new devices.
    pub closes_at: UnixTime,
    /// Seconds until then.
    pub remaining_secs: u64,
    /// A device has claimed the window and it admits no other new key.
    pub claimed: bool,
}

#[derive(Debug)]
struct Claim {
    fingerprint: [u8; 32],
    hold_until: Instant,
}

#[derive(Debug)]
struct Window {
    deadline: Instant,
    closes_at: UnixTime,
    claim: Option<Claim>,
}

#[derive(Debug, Default)]
struct Inner {
    by_fp: HashMap<[u8; 32], Pairing>,
    by_device: HashMap<DeviceId, [u8; 32]>,
    window: Option<Window>,
}

impl Inner {
    /// Drops a window (or claim) that has lapsed at `now`.
    fn expire(&mut self, now: Instant) {
        let lapsed = match &self.window {
            Some(Window { claim: Some(c), .. }) => now >= c.hold_until,
            Some(w) => now >= w.deadline,
            None => false,
        };
        if lapsed {
            self.window = None;
        }
    }

    fn insert(&mut self, p: Pairing) {
        self.by_device.insert(p.device_id.clone(), p.fingerprint);
        self.by_fp.insert(p.fingerprint, p);
    }
}

/// The paired keys and the pairing window. Share it as `Arc<PairingRegistry>`; it is the
/// [`KeyPolicy`] of the device server's TLS configuration.
pub struct PairingRegistry {
    state: Arc<State>,
    clock: Arc<dyn Clock>,
    max_window: Duration,
    inner: Mutex<Inner>,
}

impl std::fmt::Debug for PairingRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let inner = self.lock();
        f.debug_struct("PairingRegistry")
            .field("paired", &inner.by_fp.len())
            .field("window_open", &inner.window.is_some())
            .finish()
    }
}

fn check_label(label: Option<String>) -> Result<Option<String>, PairingError> {
    let Some(l) = label else { return Ok(None) };
    let l = l.trim().to_string();
    if l.is_empty() {
        return Ok(None);
    }
    if l.chars().count() > MAX_LABEL {
        return Err(PairingError::Label(format!(
            "longer than {MAX_LABEL} characters"
        )));
    }
    if l.chars().any(char::is_control) {
        return Err(PairingError::Label("contains control characters".into()));
    }
    Ok(Some(l))
}

impl PairingRegistry {
    /// Loads every pairing from `state`. No window is open after a start.
    pub fn load(
        state: Arc<State>,
        clock: Arc<dyn Clock>,
        max_window: Duration,
    ) -> Result<Self, PairingError> {
        let mut inner = Inner::default();
        for p in state.pairings()? {
            inner.insert(p);
        }
        Ok(Self {
            state,
            clock,
            max_window,
            inner: Mutex::new(inner),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Parses an owner-entered pairing code.
    pub fn parse_code(code: &str) -> Result<PairingCode, PairingError> {
        Ok(PairingCode::parse(code)?)
    }

    /// Pairs the device of `code`. Pairing the same device with the same key again only updates
    /// the label (returns `false` for "not new").
    pub fn pair_code(
        &self,
        code: &PairingCode,
        label: Option<String>,
    ) -> Result<(Pairing, bool), PairingError> {
        let label = check_label(label)?;
        let fingerprint = code.fingerprint();
        let mut inner = self.lock();
        if let Some(existing) = inner.by_fp.get(&fingerprint) {
            if existing.device_id != code.device_id {
                return Err(PairingError::KeyAlreadyPaired(existing.device_id.clone()));
            }
            let device = existing.device_id.clone();
            if label.is_some() {
                self.state.set_label(&device, label.as_deref())?;
                if let Some(p) = inner.by_fp.get_mut(&fingerprint) {
                    p.label = label;
                }
            }
            let p = inner.by_fp.get(&fingerprint).cloned();
            return p.map(|p| (p, false)).ok_or(PairingError::NotPaired(device));
        }
        if inner.by_device.contains_key(&code.device_id) {
            return Err(PairingError::DeviceAlreadyPaired(code.device_id.clone()));
        }
        let p = Pairing {
            device_id: code.device_id.clone(),
            spki_der: code.spki_der.clone(),
            fingerprint,
            label,
            paired_at: self.clock.unix_now(),
            paired_via: PairedVia::Code,
        };
        self.state.insert_pairing(&p)?;
        inner.insert(p.clone());
        Ok((p, true))
    }

    /// Opens (or reopens, resetting any claim) the pairing window for `duration`.
    pub fn open_window(&self, duration: Duration) -> Result<WindowStatus, PairingError> {
        if duration.is_zero() {
            return Err(PairingError::WindowZero);
        }
        if duration > self.max_window {
            return Err(PairingError::WindowTooLong {
                requested: duration,
                max: self.max_window,
            });
        }
        let now = self.clock.now();
        let closes_at = self.clock.unix_now() + duration.as_secs() as i64;
        let mut inner = self.lock();
        inner.window = Some(Window {
            deadline: now + duration,
            closes_at,
            claim: None,
        });
        Ok(WindowStatus {
            closes_at,
            remaining_secs: duration.as_secs(),
            claimed: false,
        })
    }

    /// Closes the window now (a claim in progress is dropped too).
    pub fn close_window(&self) {
        self.lock().window = None;
    }

    /// The window, if one is open (or held by a claim).
    pub fn window(&self) -> Option<WindowStatus> {
        let now = self.clock.now();
        let mut inner = self.lock();
        inner.expire(now);
        inner.window.as_ref().map(|w| {
            let left = w.deadline.saturating_duration_since(now);
            WindowStatus {
                closes_at: w.closes_at,
                // Rounded up: a window just opened for 90 s shows 90, not 89.
                remaining_secs: left.as_secs() + u64::from(left.subsec_nanos() > 0),
                claimed: w.claim.is_some(),
            }
        })
    }

    /// How a key stands right now.
    pub fn classify(&self, fingerprint: &[u8; 32]) -> Admission {
        let now = self.clock.now();
        let mut inner = self.lock();
        if let Some(p) = inner.by_fp.get(fingerprint) {
            return Admission::Paired(p.device_id.clone());
        }
        inner.expire(now);
        match &inner.window {
            Some(Window { claim: None, .. }) => Admission::WindowCandidate,
            Some(Window { claim: Some(c), .. }) if c.fingerprint == *fingerprint => {
                Admission::WindowCandidate
            }
            _ => Admission::Refused,
        }
    }

    /// After a completed handshake by a [`Admission::WindowCandidate`] key: takes the window for
    /// this key, or confirms it already holds it. Any other new key is refused from now on.
    pub fn claim_window(&self, fingerprint: &[u8; 32]) -> Result<(), PairingError> {
        let now = self.clock.now();
        let mut inner = self.lock();
        if inner.by_fp.contains_key(fingerprint) {
            return Ok(());
        }
        inner.expire(now);
        let w = inner.window.as_mut().ok_or(PairingError::WindowClosed)?;
        match &w.claim {
            None => {
                w.claim = Some(Claim {
                    fingerprint: *fingerprint,
                    hold_until: w.deadline.max(now + CLAIM_HOLD),
                });
                Ok(())
            }
            Some(c) if c.fingerprint == *fingerprint => Ok(()),
            Some(_) => Err(PairingError::NotClaimant),
        }
    }

    /// The claimant's first provisioning succeeded: bind `device_id` to its key (paired via
    /// window) and close the window.
    pub fn bind_window_claim(
        &self,
        fingerprint: &[u8; 32],
        spki_der: &[u8],
        device_id: &DeviceId,
        label: Option<String>,
    ) -> Result<Pairing, PairingError> {
        let label = check_label(label)?;
        let now = self.clock.now();
        let mut inner = self.lock();
        inner.expire(now);
        let holds = matches!(&inner.window, Some(Window { claim: Some(c), .. }) if c.fingerprint == *fingerprint);
        if !holds {
            return Err(match inner.window {
                Some(_) => PairingError::NotClaimant,
                None => PairingError::WindowClosed,
            });
        }
        if inner.by_device.contains_key(device_id) {
            return Err(PairingError::DeviceAlreadyPaired(device_id.clone()));
        }
        let p = Pairing {
            device_id: device_id.clone(),
            spki_der: spki_der.to_vec(),
            fingerprint: *fingerprint,
            label,
            paired_at: self.clock.unix_now(),
            paired_via: PairedVia::Window,
        };
        self.state.insert_pairing(&p)?;
        inner.insert(p.clone());
        inner.window = None;
        Ok(p)
    }

    /// Checks that the device behind `fingerprint` may act as `device_id`: a paired key only as
    /// the device it is paired to; a window claimant as a device ID not yet paired.
    pub fn authorize(
        &self,
        fingerprint: &[u8; 32],
        device_id: &DeviceId,
    ) -> Result<(), PairingError> {
        match self.classify(fingerprint) {
            Admission::Paired(paired) if paired == *device_id => Ok(()),
            Admission::Paired(paired) => Err(PairingError::DeviceMismatch {
                presented: device_id.clone(),
                paired,
            }),
            Admission::WindowCandidate => {
                if self.lock().by_device.contains_key(device_id) {
                    Err(PairingError::DeviceAlreadyPaired(device_id.clone()))
                } else {
                    Ok(())
                }
            }
            Admission::Refused => Err(PairingError::WindowClosed),
        }
    }

    /// Unpairs `device`: its key is refused from the next handshake on; its credential, pending
    /// deliveries and outstanding request are forgotten and a revocation is recorded for the CN.
    /// Open connections of that device must be closed by the caller.
    pub fn revoke(&self, device: &DeviceId) -> Result<Revocation, PairingError> {
        let mut inner = self.lock();
        let revocation = self
            .state
            .revoke_device(device, self.clock.unix_now())?
            .ok_or_else(|| PairingError::NotPaired(device.clone()))?;
        if let Some(fp) = inner.by_device.remove(device) {
            inner.by_fp.remove(&fp);
        }
        Ok(revocation)
    }

    /// The pairing of `device`.
    pub fn get(&self, device: &DeviceId) -> Option<Pairing> {
        let inner = self.lock();
        let fp = inner.by_device.get(device)?;
        inner.by_fp.get(fp).cloned()
    }

    /// Every pairing, by device ID.
    pub fn devices(&self) -> Vec<Pairing> {
        let mut v: Vec<_> = self.lock().by_fp.values().cloned().collect();
        v.sort_by(|a, b| a.device_id.cmp(&b.device_id));
        v
    }

    /// Number of paired devices.
    pub fn len(&self) -> usize {
        self.lock().by_fp.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl KeyPolicy for PairingRegistry {
    fn admit(&self, fingerprint: &[u8; 32], _spki_der: &[u8]) -> bool {
        self.classify(fingerprint) != Admission::Refused
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use companion_transport::{Identity, spki_fingerprint};

    struct Fixture {
        _dir: tempfile::TempDir,
        clock: Arc<ManualClock>,
        state: Arc<State>,
        reg: PairingRegistry,
    }

    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let clock = Arc::new(ManualClock::new(1_700_000_000));
        let state = Arc::new(State::open(dir.path()).unwrap());
        let reg =
            PairingRegistry::load(state.clone(), clock.clone(), Duration::from_secs(3600)).unwrap();
        Fixture {
            _dir: dir,
            clock,
            state,
            reg,
        }
    }

    fn key() -> (Vec<u8>, [u8; 32]) {
        let id = Identity::self_signed("dev").unwrap();
        let spki = id.spki_der().unwrap();
        let fp = spki_fingerprint(&spki);
        (spki, fp)
    }

    fn dev(s: &str) -> DeviceId {
        DeviceId::new(s).unwrap()
    }

    fn code(id: &str, spki: &[u8]) -> PairingCode {
        PairingCode::new(dev(id), spki.to_vec()).unwrap()
    }

    #[test]
    fn pairing_code_admits_exactly_that_key_as_that_device() {
        let f = fixture();
        let (spki, fp) = key();
        let (other_spki, other_fp) = key();
        assert!(!f.reg.admit(&fp, &spki));
        let text = code("watch-1", &spki).to_string();
        let parsed = PairingRegistry::parse_code(&text).unwrap();
        let (p, new) = f.reg.pair_code(&parsed, Some("kitchen".into())).unwrap();
        assert!(new);
        assert_eq!(p.paired_via, PairedVia::Code);
        assert_eq!(p.paired_at, 1_700_000_000);
        assert!(f.reg.admit(&fp, &spki));
        assert!(!f.reg.admit(&other_fp, &other_spki));
        assert_eq!(f.reg.classify(&fp), Admission::Paired(dev("watch-1")));
        f.reg.authorize(&fp, &dev("watch-1")).unwrap();
        assert!(matches!(
            f.reg.authorize(&fp, &dev("watch-2")),
            Err(PairingError::DeviceMismatch { .. })
        ));
        // Same code again: not new, label updated.
        let (p, new) = f.reg.pair_code(&parsed, Some("hall".into())).unwrap();
        assert!(!new);
        assert_eq!(p.label.as_deref(), Some("hall"));
        // Same device with another key, or same key as another device: refused.
        assert!(matches!(
            f.reg.pair_code(&code("watch-1", &other_spki), None),
            Err(PairingError::DeviceAlreadyPaired(_))
        ));
        assert!(matches!(
            f.reg.pair_code(&code("watch-9", &spki), None),
            Err(PairingError::KeyAlreadyPaired(_))
        ));
        assert!(matches!(
            PairingRegistry::parse_code("DPP:nope;;"),
            Err(PairingError::Code(_))
        ));
        assert!(matches!(
            f.reg
                .pair_code(&code("watch-3", &other_spki), Some("x\u{7}".into())),
            Err(PairingError::Label(_))
        ));
    }

    #[test]
    fn window_admits_one_new_key_then_closes() {
        let f = fixture();
        let (a_spki, a) = key();
        let (_, b) = key();
        let (_, c) = key();
        assert_eq!(f.reg.classify(&a), Admission::Refused);
        let w = f.reg.open_window(Duration::from_secs(120)).unwrap();
        assert_eq!(w.closes_at, 1_700_000_120);
        // Before any handshake completes, every unknown key may try.
        assert!(f.reg.admit(&a, &[]) && f.reg.admit(&b, &[]));
        f.clock.advance(Duration::from_secs(10));
        f.reg.claim_window(&a).unwrap();
        f.reg.claim_window(&a).unwrap(); // idempotent for the claimant
        assert!(matches!(
            f.reg.claim_window(&b),
            Err(PairingError::NotClaimant)
        ));
        assert!(!f.reg.admit(&b, &[]), "window now belongs to the claimant");
        assert!(f.reg.admit(&a, &[]));
        assert!(f.reg.window().unwrap().claimed);
        f.reg.authorize(&a, &dev("bracelet-7")).unwrap();
        // First successful provisioning binds the device ID and closes the window.
        let p = f
            .reg
            .bind_window_claim(&a, &a_spki, &dev("bracelet-7"), None)
            .unwrap();
        assert_eq!(p.paired_via, PairedVia::Window);
        assert_eq!(f.reg.window(), None);
        assert_eq!(f.reg.classify(&a), Admission::Paired(dev("bracelet-7")));
        assert!(!f.reg.admit(&c, &[]));
        assert_eq!(
            f.state
                .pairing(&dev("bracelet-7"))
                .unwrap()
                .unwrap()
                .fingerprint,
            a
        );
    }

    #[test]
    fn window_closes_at_expiry_and_claims_lapse() {
        let f = fixture();
        let (_, a) = key();
        let (b_spki, b) = key();
        f.reg.open_window(Duration::from_secs(60)).unwrap();
        f.clock.advance(Duration::from_secs(59));
        assert!(f.reg.admit(&a, &[]));
        f.clock.advance(Duration::from_secs(1));
        assert!(!f.reg.admit(&a, &[]), "closed at exactly the deadline");
        assert_eq!(f.reg.window(), None);
        assert!(matches!(
            f.reg.claim_window(&a),
            Err(PairingError::WindowClosed)
        ));

        // A claim made just before the end is held for CLAIM_HOLD, then lapses.
        f.reg.open_window(Duration::from_secs(60)).unwrap();
        f.clock.advance(Duration::from_secs(59));
        f.reg.claim_window(&b).unwrap();
        f.clock.advance(Duration::from_secs(300));
        assert!(f.reg.admit(&b, &[]));
        assert!(!f.reg.admit(&a, &[]));
        f.clock.advance(CLAIM_HOLD);
        assert!(!f.reg.admit(&b, &[]));
        assert!(matches!(
            f.reg.bind_window_claim(&b, &b_spki, &dev("late"), None),
            Err(PairingError::WindowClosed)
        ));
    }

    #[test]
    fn window_limits_and_closing() {
        let f = fixture();
        let (_, a) = key();
        assert!(matches!(
            f.reg.open_window(Duration::from_secs(7200)),
            Err(PairingError::WindowTooLong { .. })
        ));
        assert!(matches!(
            f.reg.open_window(Duration::ZERO),
            Err(PairingError::WindowZero)
        ));
        f.reg.open_window(Duration::from_secs(60)).unwrap();
        f.reg.close_window();
        assert!(!f.reg.admit(&a, &[]));
    }

    #[test]
    fn window_claimant_cannot_take_a_paired_device_id() {
        let f = fixture();
        let (p_spki, _) = key();
        let (a_spki, a) = key();
        f.reg.pair_code(&code("watch-1", &p_spki), None).unwrap();
        f.reg.open_window(Duration::from_secs(60)).unwrap();
        f.reg.claim_window(&a).unwrap();
        assert!(matches!(
            f.reg.authorize(&a, &dev("watch-1")),
            Err(PairingError::DeviceAlreadyPaired(_))
        ));
        assert!(matches!(
            f.reg.bind_window_claim(&a, &a_spki, &dev("watch-1"), None),
            Err(PairingError::DeviceAlreadyPaired(_))
        ));
    }

    #[test]
    fn revoke_removes_the_key_and_survives_reload() {
        let f = fixture();
        let (spki, fp) = key();
        let (spki2, fp2) = key();
        f.reg.pair_code(&code("watch-1", &spki), None).unwrap();
        f.reg.pair_code(&code("watch-2", &spki2), None).unwrap();
        let r = f.reg.revoke(&dev("watch-1")).unwrap();
        assert_eq!(r.device_id, dev("watch-1"));
        assert!(!f.reg.admit(&fp, &spki));
        assert!(matches!(
            f.reg.revoke(&dev("watch-1")),
            Err(PairingError::NotPaired(_))
        ));
        // A fresh registry over the same database knows exactly the remaining device.
        let again =
            PairingRegistry::load(f.state.clone(), f.clock.clone(), Duration::from_secs(60))
                .unwrap();
        assert_eq!(again.len(), 1);
        assert!(again.admit(&fp2, &spki2));
        assert!(!again.admit(&fp, &spki));
        assert_eq!(again.window(), None);
    }
}
