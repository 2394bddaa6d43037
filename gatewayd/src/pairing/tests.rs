//! Unit tests of [`super`].

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
fn window_pairs_only_the_holder_of_its_code() {
    let f = fixture();
    let (a_spki, a) = key();
    let (b_spki, b) = key();
    let (_, c) = key();
    assert_eq!(f.reg.classify(&a), Admission::Refused);
    let w = f.reg.open_window(Duration::from_secs(120)).unwrap();
    assert_eq!(w.closes_at, 1_700_000_120);
    let code = w.code.unwrap();
    assert_eq!(code.len(), 11, "{code}");
    // The status never shows the code again.
    assert_eq!(f.reg.window().unwrap().code, None);
    // Every unknown key may try; connecting reserves nothing.
    assert!(f.reg.admit(&a, &[]) && f.reg.admit(&b, &[]));
    f.reg.window_still_open().unwrap();
    // Without the code, or with a wrong one: nothing is paired.
    assert!(matches!(
        f.reg.bind_with_code(&b, &b_spki, &dev("intruder"), None),
        Err(PairingError::CodeMissing)
    ));
    assert!(matches!(
        f.reg
            .bind_with_code(&b, &b_spki, &dev("intruder"), Some("00000-00000")),
        Err(PairingError::WrongCode {
            attempts: 1,
            closed: false
        })
    ));
    assert_eq!(f.reg.window().unwrap().wrong_codes, 1);
    // The right code, typed loosely (lower case, no dash): paired at once, window closed.
    let typed = code.replace('-', "").to_lowercase();
    let p = f
        .reg
        .bind_with_code(&a, &a_spki, &dev("bracelet-7"), Some(&typed))
        .unwrap();
    assert_eq!(p.paired_via, PairedVia::Window);
    assert_eq!(f.reg.window(), None);
    assert_eq!(f.reg.classify(&a), Admission::Paired(dev("bracelet-7")));
    assert!(!f.reg.admit(&c, &[]) && !f.reg.admit(&b, &[]));
    assert_eq!(
        f.state
            .pairing(&dev("bracelet-7"))
            .unwrap()
            .unwrap()
            .fingerprint,
        a
    );
    // A retry of the pairing request is idempotent; the key cannot take another ID.
    f.reg
        .bind_with_code(&a, &a_spki, &dev("bracelet-7"), None)
        .unwrap();
    assert!(matches!(
        f.reg.bind_with_code(&a, &a_spki, &dev("other"), None),
        Err(PairingError::DeviceMismatch { .. })
    ));
}

#[test]
fn wrong_codes_close_the_window_and_expiry_closes_it() {
    let f = fixture();
    let (a_spki, a) = key();
    let code = f
        .reg
        .open_window(Duration::from_secs(60))
        .unwrap()
        .code
        .unwrap();
    for n in 1..MAX_WRONG_CODES {
        assert!(matches!(
            f.reg.bind_with_code(&a, &a_spki, &dev("guess"), Some("ZZZZZ-ZZZZZ")),
            Err(PairingError::WrongCode { attempts, closed: false }) if attempts == n
        ));
    }
    assert!(matches!(
        f.reg
            .bind_with_code(&a, &a_spki, &dev("guess"), Some("ZZZZZ-ZZZZZ")),
        Err(PairingError::WrongCode { closed: true, .. })
    ));
    // Closed: even the right code is refused now.
    assert!(matches!(
        f.reg
            .bind_with_code(&a, &a_spki, &dev("guess"), Some(&code)),
        Err(PairingError::WindowClosed)
    ));
    assert!(!f.reg.admit(&a, &[]));

    let code = f
        .reg
        .open_window(Duration::from_secs(60))
        .unwrap()
        .code
        .unwrap();
    f.clock.advance(Duration::from_secs(59));
    assert!(f.reg.admit(&a, &[]));
    f.clock.advance(Duration::from_secs(1));
    assert!(!f.reg.admit(&a, &[]), "closed at exactly the deadline");
    assert_eq!(f.reg.window(), None);
    assert!(matches!(
        f.reg.bind_with_code(&a, &a_spki, &dev("late"), Some(&code)),
        Err(PairingError::WindowClosed)
    ));
    // Each opening draws a new code.
    let c1 = f.reg.open_window(Duration::from_secs(60)).unwrap().code;
    let c2 = f.reg.open_window(Duration::from_secs(60)).unwrap().code;
    assert_ne!(c1, c2);
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
fn window_cannot_take_a_paired_device_id() {
    let f = fixture();
    let (p_spki, _) = key();
    let (a_spki, a) = key();
    f.reg.pair_code(&code("watch-1", &p_spki), None).unwrap();
    let c = f
        .reg
        .open_window(Duration::from_secs(60))
        .unwrap()
        .code
        .unwrap();
    f.reg.window_still_open().unwrap();
    assert!(matches!(
        f.reg.authorize(&a, &dev("watch-1")),
        Err(PairingError::DeviceAlreadyPaired(_))
    ));
    assert!(matches!(
        f.reg.bind_with_code(&a, &a_spki, &dev("watch-1"), Some(&c)),
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
        PairingRegistry::load(f.state.clone(), f.clock.clone(), Duration::from_secs(60)).unwrap();
    assert_eq!(again.len(), 1);
    assert!(again.admit(&fp2, &spki2));
    assert!(!again.admit(&fp, &spki));
    assert_eq!(again.window(), None);
}

#[test]
fn attestation_chains_are_kept_per_pairing_and_survive_reload() {
    use companion_proto::msg::AttestationChain;
    let f = fixture();
    let (spki, _) = key();
    f.reg.pair_code(&code("meter-1", &spki), None).unwrap();
    let chain = AttestationChain::new(vec![vec![0x30, 1], vec![0x30, 2]]).unwrap();
    // Unknown devices are ignored; a paired one keeps what it presented.
    f.reg
        .note_attestation(&dev("stranger"), Some(&chain))
        .unwrap();
    assert_eq!(f.reg.attestation(&dev("stranger")), None);
    f.reg
        .note_attestation(&dev("meter-1"), Some(&chain))
        .unwrap();
    assert_eq!(f.reg.attestation(&dev("meter-1")), Some(chain.clone()));
    let again =
        PairingRegistry::load(f.state.clone(), f.clock.clone(), Duration::from_secs(60)).unwrap();
    assert_eq!(again.attestation(&dev("meter-1")), Some(chain));
    // A later connection without a chain clears it, durably; so does a revoke.
    again.note_attestation(&dev("meter-1"), None).unwrap();
    let third =
        PairingRegistry::load(f.state.clone(), f.clock.clone(), Duration::from_secs(60)).unwrap();
    assert_eq!(third.attestation(&dev("meter-1")), None);
}
