//! Milenage, the 3GPP KDF / RES*, a whole AKA round, HPKE sealing of a credential bundle, and the
//! signatures of key binding and bundle authenticity.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::hint::black_box;

use companion_benches::{RAND, SNN, bundle_sized_plaintext, milenage};
use companion_crypto::aka::{AMF_5G, Sqn, generate_vector, next_sqn, res_star};
use companion_crypto::hpke::{DeviceHpkeKey, open_credential, seal_credential};
use companion_crypto::kdf::kdf;
use companion_crypto::secret::Key128;
use companion_crypto::usim::{SoftUsim, Usim};
use criterion::{BatchSize, Criterion, criterion_group, criterion_main};

fn milenage_and_kdf(c: &mut Criterion) {
    let m = milenage();
    let sqn = [0xff, 0x9b, 0xb4, 0xd0, 0xb6, 0x07];
    c.bench_function("milenage/f1", |b| {
        b.iter(|| m.f1(black_box(&RAND), &sqn, &AMF_5G))
    });
    c.bench_function("milenage/f2345", |b| b.iter(|| m.f2345(black_box(&RAND))));
    let key = [0x5a; 32];
    c.bench_function("kdf/hmac_sha256_3_params", |b| {
        b.iter(|| kdf(black_box(&key), 0x6b, &[SNN.as_bytes(), &RAND, &[0u8; 8]]))
    });
    let f = m.f2345(&RAND);
    c.bench_function("aka/res_star", |b| {
        b.iter(|| res_star(&f.ck, &f.ik, SNN, black_box(&RAND), &f.res))
    });
    c.bench_function("aka/generate_vector (home network)", |b| {
        b.iter(|| generate_vector(&m, Sqn::new(32).unwrap(), &AMF_5G, black_box(RAND), SNN))
    });
    c.bench_function("aka/usim_authenticate (device or companion)", |b| {
        b.iter_batched(
            || {
                let usim = SoftUsim::new(
                    "imsi-001010000000001".into(),
                    Key128::from_bytes(companion_benches::K),
                    Key128::from_bytes(companion_benches::OPC),
                );
                let v = generate_vector(&m, next_sqn(Sqn::ZERO), &AMF_5G, RAND, SNN);
                (usim, v)
            },
            |(mut usim, v)| usim.authenticate(&v.rand, &v.autn, SNN).unwrap(),
            BatchSize::SmallInput,
        )
    });
}

fn hpke(c: &mut Criterion) {
    let device = DeviceHpkeKey::generate();
    let pk = device.public_key();
    let rid = [7u8; 16];
    let pt = bundle_sized_plaintext();
    c.bench_function("hpke/seal_credential (600 B bundle)", |b| {
        b.iter(|| seal_credential(black_box(&pk), "watch-01", &rid, &pt).unwrap())
    });
    let sealed = seal_credential(&pk, "watch-01", &rid, &pt).unwrap();
    c.bench_function("hpke/open_credential (600 B bundle)", |b| {
        b.iter(|| open_credential(&device, "watch-01", &rid, black_box(&sealed)).unwrap())
    });
}

/// What key binding and bundle signing add per credential: the device's signature (device side),
/// its verification (gateway and CN, once each) and the CN's bundle signature (CN side).
fn signatures(c: &mut Criterion) {
    use companion_proto::binding::{BindingOp, binding_message};
    use companion_proto::{DeviceId, RequestId};
    let device = companion_transport::Identity::self_signed("watch-01").unwrap();
    let spki = device.spki_der().unwrap();
    let signer = companion_transport::IdentitySigner::new(&device).unwrap();
    let msg = binding_message(
        BindingOp::Provision,
        &RequestId([7; 16]),
        &DeviceId::new("watch-01").unwrap(),
        &[0x11; 32],
    );
    c.bench_function("binding/sign (ECDSA P-256, device)", |b| {
        b.iter(|| signer.sign(black_box(&msg)).unwrap())
    });
    let sig = signer.sign(&msg).unwrap();
    c.bench_function("binding/verify (ECDSA P-256, gateway and CN)", |b| {
        b.iter(|| companion_transport::verify_binding(&spki, black_box(&msg), &sig).unwrap())
    });
    let pt = bundle_sized_plaintext();
    c.bench_function("bundle/sign (ECDSA P-256, CN, 600 B bundle)", |b| {
        b.iter(|| signer.sign(black_box(&pt)).unwrap())
    });
    // The same with an Ed25519 identity key (a device's choice; see BENCHMARKS.md).
    let ed = companion_transport::Identity::self_signed_ed25519("watch-01").unwrap();
    let ed_spki = ed.spki_der().unwrap();
    let ed_signer = companion_transport::IdentitySigner::new(&ed).unwrap();
    c.bench_function("binding/sign (Ed25519, device)", |b| {
        b.iter(|| ed_signer.sign(black_box(&msg)).unwrap())
    });
    let ed_sig = ed_signer.sign(&msg).unwrap();
    c.bench_function("binding/verify (Ed25519, gateway and CN)", |b| {
        b.iter(|| companion_transport::verify_binding(&ed_spki, black_box(&msg), &ed_sig).unwrap())
    });
}

/// What manufacturer attestation (PROTOCOL.md §4.5) adds per item at the CN: path validation of
/// a two-certificate chain (one ECDSA P-256 signature) plus the device-ID check.
fn attestation(c: &mut Criterion) {
    let maker = companion_transport::ManufacturerCa::generate("Acme devices").unwrap();
    let device = maker.issue_device("watch-01").unwrap();
    let chain: Vec<Vec<u8>> = device.chain().iter().map(|c| c.to_vec()).collect();
    let spki = device.spki_der().unwrap();
    let roots =
        companion_transport::ManufacturerRoots::new([("acme", maker.cert_der().as_ref())]).unwrap();
    let now = companion_transport::attestation::UnixTime::now();
    c.bench_function("attestation/verify (P-256 leaf + CA, CN, per item)", |b| {
        b.iter(|| {
            companion_transport::verify_attestation(
                black_box(&chain),
                &spki,
                "watch-01",
                &roots,
                now,
            )
            .unwrap()
        })
    });
}

criterion_group!(benches, milenage_and_kdf, hpke, signatures, attestation);
criterion_main!(benches);
