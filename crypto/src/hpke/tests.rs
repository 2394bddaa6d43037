//! Unit tests of [`super`].

use super::*;

fn h(s: &str) -> Vec<u8> {
    hex::decode(s).unwrap()
}

fn h32(s: &str) -> [u8; 32] {
    h(s).try_into().unwrap()
}

// RFC 9180 Appendix A.2.1: DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, ChaCha20Poly1305,
// base mode (values from the RFC's source, cfrg/draft-irtf-cfrg-hpke draft-irtf-cfrg-hpke.md).
const INFO_A21: &str = "4f6465206f6e2061204772656369616e2055726e";
const IKM_E: &str = "909a9b35d3dc4713a5e72a4da274b55d3d3821a37e5d099e74a647db583a904b";
const PK_EM: &str = "1afa08d3dec047a643885163f1180476fa7ddb54c6a8029ea33f95796bf2ac4a";
const SK_EM: &str = "f4ec9b33b792c372c1d2c2063507b684ef925b8c75a42dbcbf57d63ccd381600";
const IKM_R: &str = "1ac01f181fdf9f352797655161c58b75c656a6cc2716dcb66372da835542e1df";
const PK_RM: &str = "4310ee97d88cc1f088a5576c77ab0cf5c3ac797f3d95139c6c84b5429c59662a";
const SK_RM: &str = "8057991eef8f1f1af18f4a9491d16a1ce333f695d4db8e38da75975c4478e0fb";
const PT: &str = "4265617574792069732074727574682c20747275746820626561757479";
/// (sequence number, aad, ct)
const ENCRYPTIONS: [(u32, &str, &str); 6] = [
    (
        0,
        "436f756e742d30",
        "1c5250d8034ec2b784ba2cfd69dbdb8af406cfe3ff938e131f0def8c8b60b4db21993c62ce81883d2dd1b51a28",
    ),
    (
        1,
        "436f756e742d31",
        "6b53c051e4199c518de79594e1c4ab18b96f081549d45ce015be002090bb119e85285337cc95ba5f59992dc98c",
    ),
    (
        2,
        "436f756e742d32",
        "71146bd6795ccc9c49ce25dda112a48f202ad220559502cef1f34271e0cb4b02b4f10ecac6f48c32f878fae86b",
    ),
    (
        4,
        "436f756e742d34",
        "63357a2aa291f5a4e5f27db6baa2af8cf77427c7c1a909e0b37214dd47db122bb153495ff0b02e9e54a50dbe16",
    ),
    (
        255,
        "436f756e742d323535",
        "18ab939d63ddec9f6ac2b60d61d36a7375d2070c9b683861110757062c52b8880a5f6b3936da9cd6c23ef2a95c",
    ),
    (
        256,
        "436f756e742d323536",
        "7a4a13e9ef23978e2c520fd4d2e757514ae160cd0cd05e556ef692370ca53076214c0c40d4c728d6ed9e727a5b",
    ),
];
/// (exporter_context, exported_value), L = 32
const EXPORTS: [(&str, &str); 3] = [
    (
        "",
        "4bbd6243b8bb54cec311fac9df81841b6fd61f56538a775e7c80a9f40160606e",
    ),
    (
        "00",
        "8c1df14732580e5501b00f82b10a1647b40713191b7c1240ac80e2b68808ba69",
    ),
    (
        "54657374436f6e74657874",
        "5acb09211139c43b3090489a9da433e8a30ee7188ba8b0a9a1ccf0c229283e53",
    ),
];

fn clamp(mut k: [u8; 32]) -> [u8; 32] {
    k[0] &= 248;
    k[31] &= 127;
    k[31] |= 64;
    k
}

#[test]
fn suite_ids() {
    assert_eq!(<Kem as KemTrait>::KEM_ID, KEM_ID);
    assert_eq!(<Kdf as hpke::kdf::Kdf>::KDF_ID, KDF_ID);
    assert_eq!(<Aead as hpke::aead::Aead>::AEAD_ID, AEAD_ID);
}

#[test]
fn rfc9180_a21_derive_keypairs() {
    let eph = DeviceHpkeKey::derive(&h(IKM_E));
    assert_eq!(hex::encode(eph.public_key()), PK_EM);
    assert_eq!(eph.to_bytes().expose(), &clamp(h32(SK_EM)));
    let r = DeviceHpkeKey::derive(&h(IKM_R));
    assert_eq!(hex::encode(r.public_key()), PK_RM);
    assert_eq!(r.to_bytes().expose(), &clamp(h32(SK_RM)));
    // skRm as printed in the RFC (unclamped) deserializes to the same key.
    let r2 = DeviceHpkeKey::from_bytes(h32(SK_RM));
    assert_eq!(hex::encode(r2.public_key()), PK_RM);
    let r3 = DeviceHpkeKey::from_bytes(*r.to_bytes().expose());
    assert_eq!(r3.public_key(), r.public_key());
}

#[test]
fn rfc9180_a21_sender_encryptions_and_exports() {
    let (enc, mut ctx) =
        setup_sender(&h32(PK_RM), &h(INFO_A21), Zeroizing::new(h32(IKM_E))).unwrap();
    assert_eq!(hex::encode(enc), PK_EM, "enc");
    let mut seq = 0u32;
    for (want_seq, aad, ct) in ENCRYPTIONS {
        // Advance the context's sequence number to `want_seq` with throw-away encryptions.
        while seq < want_seq {
            ctx.seal(b"", b"").unwrap();
            seq += 1;
        }
        assert_eq!(
            hex::encode(ctx.seal(&h(PT), &h(aad)).unwrap()),
            ct,
            "seq {want_seq}"
        );
        seq += 1;
    }
    for (exp_ctx, want) in EXPORTS {
        let mut out = [0u8; 32];
        ctx.export(&h(exp_ctx), &mut out).unwrap();
        assert_eq!(hex::encode(out), want, "export {exp_ctx:?}");
    }
}

#[test]
fn rfc9180_a21_receiver_decryptions() {
    let r = DeviceHpkeKey::derive(&h(IKM_R));
    let mut ctx = setup_receiver(&r, &h32(PK_EM), &h(INFO_A21)).unwrap();
    // A sender with the RFC's ephemeral key steps the receiver over the skipped sequence
    // numbers (3, 5..=254): the receiver only advances on a successful open.
    let (_, mut step) =
        setup_sender(&h32(PK_RM), &h(INFO_A21), Zeroizing::new(h32(IKM_E))).unwrap();
    let mut seq = 0u32;
    for (want_seq, aad, ct) in ENCRYPTIONS {
        while seq < want_seq {
            let filler = step.seal(b"", b"").unwrap();
            ctx.open(&filler, b"").unwrap();
            seq += 1;
        }
        let pt = ctx.open(&h(ct), &h(aad)).unwrap();
        assert_eq!(hex::encode(pt), PT, "seq {want_seq}");
        step.seal(b"", b"").unwrap();
        seq += 1;
    }
    for (exp_ctx, want) in EXPORTS {
        let mut out = [0u8; 32];
        ctx.export(&h(exp_ctx), &mut out).unwrap();
        assert_eq!(hex::encode(out), want);
    }
}

#[test]
fn seal_with_fixed_ikm_gives_rfc_enc() {
    // The production path (INFO and credential AAD) with the RFC's ephemeral IKM: `enc`
    // depends only on ikmE, so it must equal pkEm; the device key opens the result.
    let r = DeviceHpkeKey::derive(&h(IKM_R));
    let aad = credential_aad("watch-1", &[9; 16]);
    let sealed = seal_with_ikm(&r.public_key(), INFO, &aad, b"bundle", &h(IKM_E)).unwrap();
    assert_eq!(hex::encode(sealed.enc), PK_EM);
    assert_eq!(sealed.ciphertext.len(), 6 + TAG_LEN);
    let pt = open_credential(&r, "watch-1", &[9; 16], &sealed).unwrap();
    assert_eq!(pt.as_slice(), b"bundle");
}

fn random<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    getrandom::fill(&mut b).unwrap();
    b
}

/// Low-order X25519 u-coordinates (RFC 7748 §6.1 discussions; the list libsodium and
/// BoringSSL reject), with and without bit 255: the suites' one copy.
fn low_order_points() -> Vec<[u8; 32]> {
    companion_testkit::vectors::x25519_low_order_keys()
}

#[test]
fn rfc9180_a21_through_seal_with_dh() {
    // The shared key schedule and AEAD code, fed by the test sender with the RFC's ikmE,
    // give the RFC's enc and its sequence-0 ciphertext.
    let (_, aad, ct) = ENCRYPTIONS[0];
    let sealed = seal_with_ikm(&h32(PK_RM), &h(INFO_A21), &h(aad), &h(PT), &h(IKM_E)).unwrap();
    assert_eq!(hex::encode(sealed.enc), PK_EM);
    assert_eq!(hex::encode(&sealed.ciphertext), ct);
}

#[test]
fn seal_with_dh_matches_hpke_crate_byte_for_byte() {
    // For the same ephemeral IKM, the module's key schedule + AEAD and the `hpke` crate's
    // SealBase agree on arbitrary recipient keys (incl. bit 255 set / non-canonical ones),
    // info, AAD and plaintext lengths.
    for i in 0..200usize {
        let ikm: [u8; 32] = random();
        let pk: [u8; 32] = random();
        let info = &random::<64>()[..i % 64];
        let aad = &random::<64>()[..(i * 7) % 64];
        let pt = vec![i as u8; (i * 13) % 700];
        let ours = seal_with_ikm(&pk, info, aad, &pt, &ikm);
        let theirs = setup_sender(&pk, info, Zeroizing::new(ikm))
            .map(|(enc, mut ctx)| (enc, ctx.seal(&pt, aad).unwrap()));
        match (ours, theirs) {
            (Ok(o), Ok((enc, ct))) => {
                assert_eq!(o.enc, enc, "case {i}");
                assert_eq!(o.ciphertext, ct, "case {i}");
            }
            (o, t) => panic!("case {i}: {o:?} vs {t:?}"),
        }
    }
}

#[test]
fn ring_seals_open_with_hpke_crate_and_tampering_fails() {
    let fail = Err(HpkeError::OpenFailed);
    let mut dev = DeviceHpkeKey::generate();
    for i in 0..300usize {
        if i % 25 == 0 {
            dev = DeviceHpkeKey::generate();
        }
        let device_id = format!("dev-{i}");
        let req: [u8; 16] = random();
        let pt: Vec<u8> = (0..(i * 37) % 900).map(|j| (i ^ j) as u8).collect();
        let sealed = seal_credential(&dev.public_key(), &device_id, &req, &pt).unwrap();
        assert_eq!(sealed.ciphertext.len(), pt.len() + TAG_LEN);
        let opened = open_credential(&dev, &device_id, &req, &sealed).unwrap();
        assert_eq!(opened.as_slice(), pt.as_slice(), "case {i}");

        let bit = i % 8;
        let mut t = sealed.clone();
        t.enc[i % 32] ^= 1 << bit;
        assert_eq!(open_credential(&dev, &device_id, &req, &t), fail, "enc {i}");
        let mut t = sealed.clone();
        let n = t.ciphertext.len();
        t.ciphertext[(i * 5) % n] ^= 1 << bit;
        assert_eq!(open_credential(&dev, &device_id, &req, &t), fail, "ct {i}");
        let mut req2 = req;
        req2[i % 16] ^= 1 << bit;
        assert_eq!(
            open_credential(&dev, &device_id, &req2, &sealed),
            fail,
            "rid {i}"
        );
        let other_id = format!("dev-{i}x");
        assert_eq!(
            open_credential(&dev, &other_id, &req, &sealed),
            fail,
            "id {i}"
        );
    }
}

#[test]
fn ring_dh_equals_dalek_dh_on_non_canonical_recipient_key() {
    // bit 255 set: X25519 ignores it (RFC 7748 §5), but kem_context carries the raw bytes.
    // Decrypt by hand with a dalek DH on the device side and the raw pkR.
    let dev = DeviceHpkeKey::generate();
    let mut pk = dev.public_key();
    pk[31] |= 0x80;
    let aad = credential_aad("d", &[1; 16]);
    let sealed = seal_credential(&pk, "d", &[1; 16], b"masked").unwrap();
    let dh = curve25519_dalek::MontgomeryPoint(sealed.enc)
        .mul_clamped(*dev.to_bytes().expose())
        .to_bytes();
    let (key, nonce) = base_key_and_nonce(&dh, &sealed.enc, &pk, INFO).unwrap();
    let cipher = chacha20poly1305::ChaCha20Poly1305::new((&*key).into());
    let mut buf = sealed.ciphertext.clone();
    cipher
        .decrypt_in_place((&*nonce).into(), &aad, &mut buf)
        .unwrap();
    assert_eq!(buf, b"masked");
}

#[test]
fn low_order_recipient_keys_are_refused() {
    for p in low_order_points() {
        assert_eq!(
            seal_credential(&p, "d", &[0; 16], b"x"),
            Err(HpkeError::InvalidPublicKey),
            "ring path {}",
            hex::encode(p)
        );
        assert_eq!(
            seal_with_ikm(&p, INFO, b"", b"x", &h(IKM_E)),
            Err(HpkeError::InvalidPublicKey),
            "dalek path {}",
            hex::encode(p)
        );
    }
    assert_eq!(
        base_key_and_nonce(&[0; 32], &[1; 32], &[2; 32], INFO).map(|_| ()),
        Err(HpkeError::InvalidPublicKey)
    );
}

#[test]
fn check_public_key_refuses_exactly_the_low_order_points() {
    for p in low_order_points() {
        assert_eq!(
            check_public_key(&p),
            Err(HpkeError::InvalidPublicKey),
            "{}",
            hex::encode(p)
        );
        assert_eq!(
            encapsulate(&p, "d", &[0; 16]).map(|_| ()),
            Err(HpkeError::InvalidPublicKey),
            "{}",
            hex::encode(p)
        );
    }
    // The small-order set derived independently of the list: the eight torsion points of
    // the curve, and each of them added to a point of the prime-order subgroup (a "mixed"
    // key: X25519 with it is not zero, so it is usable and must be accepted).
    for (i, t) in curve25519_dalek::constants::EIGHT_TORSION
        .iter()
        .enumerate()
    {
        let u = t.to_montgomery().to_bytes();
        assert_eq!(
            check_public_key(&u),
            Err(HpkeError::InvalidPublicKey),
            "T{i}"
        );
        let s = curve25519_dalek::Scalar::from_bytes_mod_order(random());
        let mixed = (curve25519_dalek::constants::ED25519_BASEPOINT_POINT * s + t)
            .to_montgomery()
            .to_bytes();
        assert_eq!(check_public_key(&mixed), Ok(()), "B*s + T{i}");
        assert!(encapsulate(&mixed, "d", &[0; 16]).is_ok(), "B*s + T{i}");
    }
    // Real device keys and arbitrary bytes (incl. bit 255 set) pass, as with a real seal.
    for i in 0..200 {
        let pk = if i % 2 == 0 {
            DeviceHpkeKey::generate().public_key()
        } else {
            random()
        };
        assert_eq!(check_public_key(&pk), Ok(()), "{}", hex::encode(pk));
        assert!(encapsulate(&pk, "d", &[0; 16]).is_ok());
    }
}

#[test]
fn encapsulate_then_seal_opens_with_the_device_key() {
    let dev = DeviceHpkeKey::generate();
    let sealer = encapsulate(&dev.public_key(), "cam-7", &[5; 16]).unwrap();
    let enc = sealer.enc();
    let dbg = format!("{sealer:?}");
    assert!(
        dbg.contains(&hex::encode(enc)) && dbg.contains("redacted"),
        "{dbg}"
    );
    let sealed = sealer.seal(b"bundle bytes").unwrap();
    assert_eq!(sealed.enc, enc);
    let pt = open_credential(&dev, "cam-7", &[5; 16], &sealed).unwrap();
    assert_eq!(pt.as_slice(), b"bundle bytes");
    assert_eq!(
        open_credential(&dev, "cam-7", &[6; 16], &sealed),
        Err(HpkeError::OpenFailed)
    );
    let long = "x".repeat(MAX_DEVICE_ID_LEN + 1);
    assert_eq!(
        encapsulate(&dev.public_key(), &long, &[0; 16]).map(|_| ()),
        Err(HpkeError::DeviceIdTooLong(MAX_DEVICE_ID_LEN + 1))
    );
}

#[test]
fn aad_layout() {
    let aad = credential_aad("dev", &[0xAA; 16]);
    let mut want = vec![0x00, 0x03, b'd', b'e', b'v'];
    want.extend_from_slice(&[0xAA; 16]);
    assert_eq!(aad, want);
    assert_eq!(credential_aad("", &[0; 16]).len(), 18);
    // Non-ASCII: length is in bytes.
    assert_eq!(&credential_aad("ü", &[0; 16])[..2], &[0, 2]);
    let long = "x".repeat(70_000);
    assert_eq!(&credential_aad(&long, &[0; 16])[..2], &[0xff, 0xff]);
}

#[test]
fn seal_open_round_trip_and_failures() {
    let dev = DeviceHpkeKey::generate();
    let other = DeviceHpkeKey::generate();
    let req = [7u8; 16];
    let bundle = b"supi=imsi-001010000000042;k=...;opc=...".to_vec();
    let sealed = seal_credential(&dev.public_key(), "sensor-42", &req, &bundle).unwrap();
    assert_eq!(sealed.ciphertext.len(), bundle.len() + TAG_LEN);
    assert_ne!(&sealed.ciphertext[..bundle.len()], bundle.as_slice());
    let pt = open_credential(&dev, "sensor-42", &req, &sealed).unwrap();
    assert_eq!(pt.as_slice(), bundle.as_slice());

    // Two seals of the same bundle differ (fresh ephemeral key).
    let sealed2 = seal_credential(&dev.public_key(), "sensor-42", &req, &bundle).unwrap();
    assert_ne!(sealed.enc, sealed2.enc);

    let fail = Err(HpkeError::OpenFailed);
    assert_eq!(
        open_credential(&other, "sensor-42", &req, &sealed),
        fail,
        "wrong key"
    );
    assert_eq!(
        open_credential(&dev, "sensor-43", &req, &sealed),
        fail,
        "wrong device"
    );
    assert_eq!(
        open_credential(&dev, "sensor-42", &[8; 16], &sealed),
        fail,
        "wrong request"
    );
    let mut t = sealed.clone();
    t.ciphertext[0] ^= 1;
    assert_eq!(
        open_credential(&dev, "sensor-42", &req, &t),
        fail,
        "tampered ct"
    );
    let mut t = sealed.clone();
    t.enc[0] ^= 1;
    assert_eq!(
        open_credential(&dev, "sensor-42", &req, &t),
        fail,
        "tampered enc"
    );
    let mut t = sealed.clone();
    t.ciphertext.truncate(5);
    assert_eq!(
        open_credential(&dev, "sensor-42", &req, &t),
        fail,
        "truncated"
    );
    t.ciphertext.clear();
    assert_eq!(open_credential(&dev, "sensor-42", &req, &t), fail, "empty");
    let zero_enc = SealedCredential {
        enc: [0; 32],
        ciphertext: sealed.ciphertext.clone(),
    };
    assert_eq!(
        open_credential(&dev, "sensor-42", &req, &zero_enc),
        fail,
        "low-order enc"
    );

    // Empty plaintext works.
    let e = seal_credential(&dev.public_key(), "d", &req, b"").unwrap();
    assert!(open_credential(&dev, "d", &req, &e).unwrap().is_empty());
}

#[test]
fn bad_inputs_are_errors() {
    // Low-order recipient key: all-zero DH output must be refused (RFC 9180 §7.1.4).
    assert_eq!(
        seal_credential(&[0u8; 32], "d", &[0; 16], b"x"),
        Err(HpkeError::InvalidPublicKey)
    );
    let mut one = [0u8; 32];
    one[0] = 1;
    assert_eq!(
        seal_credential(&one, "d", &[0; 16], b"x"),
        Err(HpkeError::InvalidPublicKey)
    );
    let long = "x".repeat(MAX_DEVICE_ID_LEN + 1);
    let dev = DeviceHpkeKey::generate();
    assert_eq!(
        seal_credential(&dev.public_key(), &long, &[0; 16], b"x"),
        Err(HpkeError::DeviceIdTooLong(MAX_DEVICE_ID_LEN + 1))
    );
    let ok_long = "x".repeat(MAX_DEVICE_ID_LEN);
    let s = seal_credential(&dev.public_key(), &ok_long, &[0; 16], b"x").unwrap();
    assert!(open_credential(&dev, &ok_long, &[0; 16], &s).is_ok());
}

#[test]
fn key_debug_is_redacted() {
    let k = DeviceHpkeKey::derive(&h(IKM_R));
    let s = format!("{k:?}");
    assert!(s.contains(PK_RM));
    let sk = hex::encode(k.to_bytes().expose());
    assert!(
        !s.contains(&sk) && !s.contains(&sk[..8]) && !s.contains("8057991e"),
        "{s}"
    );
}

#[test]
fn ikm_rng_overdraw_uses_os_rng() {
    let mut r = IkmRng::new(Zeroizing::new([1u8; 32]));
    let mut a = [0u8; 40];
    r.try_fill_bytes(&mut a).unwrap();
    assert_eq!(&a[..32], &[1u8; 32]);
    let _ = (r.try_next_u32().unwrap(), r.try_next_u64().unwrap());
    assert!(!r.failed);
}

/// The derivation [`check_public_key`]'s list stands for: one X25519 with a fixed scalar,
/// which, once clamped (`8·s`, `2^251 ≤ s < 2^252`), kills the curve's 8-torsion and the twist's
/// 4-torsion and no point of either prime-order subgroup, so it is zero exactly on the low-order
/// keys.
fn zero_for_a_clamped_scalar(pk: &[u8; 32]) -> bool {
    curve25519_dalek::MontgomeryPoint(*pk)
        .mul_clamped(*b"companion hpke public key check!")
        .to_bytes()
        == [0u8; 32]
}

#[test]
fn the_low_order_list_agrees_with_the_scalar_multiplication() {
    let mut keys: Vec<[u8; 32]> = Vec::new();
    for u in LOW_ORDER_U {
        // Each listed key, with bit 255 set, and its neighbours in every byte and bit.
        keys.push(u);
        let mut hi = u;
        hi[31] |= 0x80;
        keys.push(hi);
        for i in 0..32 {
            for bit in 0..8 {
                let mut k = u;
                k[i] ^= 1 << bit;
                keys.push(k);
            }
            let mut k = u;
            k[i] = k[i].wrapping_add(1);
            keys.push(k);
            let mut k = u;
            k[i] = k[i].wrapping_sub(1);
            keys.push(k);
        }
    }
    for _ in 0..2000 {
        keys.push(random());
    }
    keys.sort_unstable();
    keys.dedup();
    let mut refused = 0;
    for k in &keys {
        let expected = zero_for_a_clamped_scalar(k);
        assert_eq!(
            check_public_key(k).is_err(),
            expected,
            "{}: the list and the scalar multiplication disagree",
            hex::encode(k)
        );
        refused += usize::from(expected);
    }
    // Every listed key and its bit-255 twin (neighbours of one listed key that are another
    // listed key, such as 0 and 1, are the same keys), and nothing else among these keys.
    assert_eq!(refused, 14);
}

proptest::proptest! {
    #[test]
    fn check_public_key_matches_the_scalar_multiplication(k in proptest::array::uniform32(0u8..)) {
        proptest::prop_assert_eq!(check_public_key(&k).is_err(), zero_for_a_clamped_scalar(&k));
    }
}
