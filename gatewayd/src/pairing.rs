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
//! - **Pairing window** (`gatewayctl pair --window 2m`, like Matter's commissioning window with
//!   its setup code): opening it draws a **one-time code** that only the owner sees. While the
//!   window is open an unknown key passes the TLS handshake, but nothing is issued to it unless
//!   its `ProvisionRequest` carries that code (PROTOCOL.md §10.1). The first request with the
//!   right code binds its device ID to its key, durably, *before* the request is queued
//!   ([`PairingRegistry::bind_with_code`]), and closes the window; a request without the code
//!   is refused `not_paired` and claims nothing, so whoever merely connects first (from
//!   anywhere the device port is reachable) gains nothing. After [`MAX_WRONG_CODES`] wrong
//!   codes the window closes (the code has 50 bits; the cap stops online guessing).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use companion_proto::DeviceId;
use companion_proto::msg::AttestationChain;
use companion_proto::pairing::PairingCode;
use companion_transport::KeyPolicy;

use crate::clock::Clock;
use crate::state::{PairedVia, Pairing, Revocation, State, StateError, UnixTime};

/// Wrong window codes after which the window closes.
pub const MAX_WRONG_CODES: u32 = 5;
/// The window code's alphabet: Crockford's base32 (no I, L, O, U), 5 bits per character.
const CODE_ALPHABET: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";
/// Longest label, in characters.
pub const MAX_LABEL: usize = 64;

/// Why a pairing operation was refused.
#[derive(Debug, thiserror::Error)]
pub enum PairingError {
    /// The pairing code does not parse.
    #[error("pairing code rejected: {0}")]
    Code(#[from] companion_proto::pairing::PairingError),
    /// The device ID is paired with another key.
    #[error("device {0} is already paired with a different key; revoke it first")]
    DeviceAlreadyPaired(DeviceId),
    /// The key is paired under another device ID.
    #[error("this key is already paired as device {0}")]
    KeyAlreadyPaired(DeviceId),
    /// No such paired device.
    #[error("device {0} is not paired")]
    NotPaired(DeviceId),
    /// The window asked for is longer than allowed.
    #[error(
        "a pairing window of {} is longer than the allowed {} ([pairing] max_window)",
        humantime::format_duration(*.requested),
        humantime::format_duration(*.max)
    )]
    WindowTooLong {
        /// The length asked for.
        requested: Duration,
        /// `[pairing] max_window`.
        max: Duration,
    },
    /// A window of zero length was asked for.
    #[error("pairing window must be longer than 0s")]
    WindowZero,
    /// No window is open.
    #[error("no pairing window is open for a new device")]
    WindowClosed,
    /// A device sent a wrong window code.
    #[error("wrong pairing-window code ({attempts} of {MAX_WRONG_CODES} wrong codes{})", if *.closed { "; the window is now closed" } else { "" })]
    WrongCode {
        /// Wrong codes so far in this window.
        attempts: u32,
        /// Whether the window closed because of it.
        closed: bool,
    },
    /// The device sent no window code.
    #[error("a device pairing through the window must send the window's one-time code")]
    CodeMissing,
    /// The operating system's random source failed.
    #[error("the random source failed; cannot draw a window code")]
    Rng,
    /// A paired key claims another device ID.
    #[error("device presents the key paired as {paired} but claims to be {presented}")]
    DeviceMismatch {
        /// The device ID claimed in the handshake.
        presented: DeviceId,
        /// The device ID the key is paired as.
        paired: DeviceId,
    },
    /// The label is too long or holds control characters.
    #[error("invalid label: {0}")]
    Label(String),
    /// The database failed.
    #[error(transparent)]
    State(#[from] StateError),
}

/// What the handshake-time check found, for the connection handler after the handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// The key is paired to this device.
    Paired(DeviceId),
    /// Unknown key admitted by the open window: it may pair by sending the window's code
    /// ([`PairingRegistry::bind_with_code`]).
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
    /// The one-time code a device must send to pair through this window; only in the answer
    /// to the owner who opened it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    /// Wrong codes received so far.
    #[serde(default)]
    pub wrong_codes: u32,
}

struct Window {
    deadline: Instant,
    closes_at: UnixTime,
    /// The code without its separator, upper case.
    code: zeroize::Zeroizing<String>,
    wrong_codes: u32,
}

impl std::fmt::Debug for Window {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Window")
            .field("closes_at", &self.closes_at)
            .field("code", &"<redacted>")
            .field("wrong_codes", &self.wrong_codes)
            .finish()
    }
}

/// Draws a window code: 10 characters of [`CODE_ALPHABET`] (50 bits), without separator.
fn draw_code() -> Result<String, PairingError> {
    let r = companion_crypto::secret::Secret::<10>::try_random().map_err(|_| PairingError::Rng)?;
    Ok(r.expose()
        .iter()
        .map(|b| char::from(CODE_ALPHABET[usize::from(b & 31)]))
        .collect())
}

/// A code as a person may type it: separators and spaces dropped, upper case, and Crockford's
/// look-alikes folded (I, L → 1; O → 0).
fn normalise_code(c: &str) -> String {
    c.chars()
        .filter(|c| !matches!(c, '-' | ' '))
        .map(|c| match c.to_ascii_uppercase() {
            'I' | 'L' => '1',
            'O' => '0',
            c => c,
        })
        .collect()
}

/// The code as shown to the owner: `XXXXX-XXXXX`.
fn display_code(c: &str) -> String {
    let (a, b) = c.split_at(c.len() / 2);
    format!("{a}-{b}")
}

#[derive(Debug, Default)]
struct Inner {
    by_fp: HashMap<[u8; 32], Pairing>,
    by_device: HashMap<DeviceId, [u8; 32]>,
    /// The manufacturer chain each paired device last presented (PROTOCOL.md §4.5).
    attestations: HashMap<DeviceId, AttestationChain>,
    window: Option<Window>,
}

impl Inner {
    /// Drops a window that has lapsed at `now`.
    fn expire(&mut self, now: Instant) {
        if self.window.as_ref().is_some_and(|w| now >= w.deadline) {
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
        for (device, cbor) in state.attestations()? {
            // A stored chain that no longer decodes is dropped; the device sends it again.
            if let Ok(chain) = AttestationChain::from_cbor(&cbor) {
                inner.attestations.insert(device, chain);
            }
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

    /// Opens (or reopens, with a new code) the pairing window for `duration`; the status carries
    /// the one-time code for the owner.
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
        let code = draw_code()?;
        let shown = display_code(&code);
        let mut inner = self.lock();
        inner.window = Some(Window {
            deadline: now + duration,
            closes_at,
            code: zeroize::Zeroizing::new(code),
            wrong_codes: 0,
        });
        Ok(WindowStatus {
            closes_at,
            remaining_secs: duration.as_secs(),
            code: Some(shown),
            wrong_codes: 0,
        })
    }

    /// Closes the window now.
    pub fn close_window(&self) {
        self.lock().window = None;
    }

    /// The window, if one is open (without its code).
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
                code: None,
                wrong_codes: w.wrong_codes,
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
            Some(_) => Admission::WindowCandidate,
            None => Admission::Refused,
        }
    }

    /// After a completed handshake by a [`Admission::WindowCandidate`] key: whether the window
    /// is still open. It reserves nothing: only [`bind_with_code`](Self::bind_with_code) pairs.
    pub fn window_still_open(&self) -> Result<(), PairingError> {
        let now = self.clock.now();
        let mut inner = self.lock();
        inner.expire(now);
        inner
            .window
            .as_ref()
            .map(|_| ())
            .ok_or(PairingError::WindowClosed)
    }

    /// A window candidate presents `code` with its first request as `device_id`: if it is the
    /// open window's code, binds `device_id` to the key (durably, paired via window) and closes
    /// the window. A wrong code counts; the [`MAX_WRONG_CODES`]th closes the window.
    pub fn bind_with_code(
        &self,
        fingerprint: &[u8; 32],
        spki_der: &[u8],
        device_id: &DeviceId,
        code: Option<&str>,
    ) -> Result<Pairing, PairingError> {
        let now = self.clock.now();
        let mut inner = self.lock();
        if let Some(p) = inner.by_fp.get(fingerprint) {
            // Already bound (a retry of the request that paired it).
            return if p.device_id == *device_id {
                Ok(p.clone())
            } else {
                Err(PairingError::DeviceMismatch {
                    presented: device_id.clone(),
                    paired: p.device_id.clone(),
                })
            };
        }
        inner.expire(now);
        let w = inner.window.as_mut().ok_or(PairingError::WindowClosed)?;
        let code = code.ok_or(PairingError::CodeMissing)?;
        let given = normalise_code(code);
        if !companion_crypto::secret::ct_eq(given.as_bytes(), w.code.as_bytes()) {
            w.wrong_codes += 1;
            let attempts = w.wrong_codes;
            let closed = attempts >= MAX_WRONG_CODES;
            if closed {
                inner.window = None;
            }
            return Err(PairingError::WrongCode { attempts, closed });
        }
        if inner.by_device.contains_key(device_id) {
            return Err(PairingError::DeviceAlreadyPaired(device_id.clone()));
        }
        let p = Pairing {
            device_id: device_id.clone(),
            spki_der: spki_der.to_vec(),
            fingerprint: *fingerprint,
            label: None,
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
        inner.attestations.remove(device);
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

    /// Records the manufacturer chain the paired `device` presented on its current connection
    /// (`None`: a self-issued certificate), written through to the state when it changed. The
    /// chain proves nothing to the gateway; the CN checks it.
    pub fn note_attestation(
        &self,
        device: &DeviceId,
        chain: Option<&AttestationChain>,
    ) -> Result<(), PairingError> {
        let mut inner = self.lock();
        if !inner.by_device.contains_key(device) || inner.attestations.get(device) == chain {
            return Ok(());
        }
        self.state
            .set_attestation(device, chain.map(AttestationChain::to_cbor).as_deref())?;
        match chain {
            Some(c) => inner.attestations.insert(device.clone(), c.clone()),
            None => inner.attestations.remove(device),
        };
        Ok(())
    }

    /// The manufacturer chain `device` last presented, if any.
    pub fn attestation(&self, device: &DeviceId) -> Option<AttestationChain> {
        self.lock().attestations.get(device).cloned()
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

    /// Whether no device is paired.
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
mod tests;
