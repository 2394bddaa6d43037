//! Key binding against the real `cn-backend` binary (issue 14, PROTOCOL.md §4.4): the CN seals
//! a credential only to an HPKE key the device signed for, and re-seals an existing credential
//! (a renewal) only at the request of the device key it was issued to. Each test plays a
//! compromised gateway — the party that holds the parent session and builds the batch items —
//! and shows that it cannot obtain a bundle it can open.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use companion_crypto::hpke::{DeviceHpkeKey, SealedCredential, open_credential};
use companion_proto::msg::Outcome;
use companion_proto::{DeviceId, RequestId};
use companion_transport::Identity;

const P1: &str = "imsi-001010000000001";

fn children(srv: &Server, dir: &Dir) -> usize {
    let (code, body) = srv.http(
        "GET",
        &format!("/api/v1/subscribers/{P1}/children"),
        Some(&dir.token()),
        "",
    );
    assert_eq!(code, 200, "{body}");
    serde_json::from_str::<serde_json::Value>(&body)
        .unwrap()
        .as_array()
        .map_or(0, Vec::len)
}

/// Before: a gateway put its own X25519 key into a `BatchItem` and got a bundle it could open.
/// Now the device's signature covers the HPKE key: swapping it (keeping the device's signature),
/// or re-signing with a key of the gateway's own that is not the device's (the fingerprint no
/// longer matches), is refused `invalid` and nothing is issued.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_cannot_substitute_its_own_hpke_key() {
    let dir = Dir::init("");
    dir.add_parent(P1, &["--max-children", "10"]);
    let srv = dir.serve();
    let s = connect(&srv, P1).await;

    let honest = DeviceReq::new(1);
    let gateway_key = DeviceHpkeKey::generate();

    // 1. The device's signed item with the HPKE key swapped for the gateway's.
    let mut swapped = honest.item();
    swapped.hpke_public_key = gateway_key.public_key();
    let r = one(&s, 1, swapped).await;
    assert_eq!(r.outcome, Outcome::Invalid, "{:?}", r.reason);
    assert!(r.sealed.is_none());
    assert!(r.reason.unwrap_or_default().contains("key binding"));

    // 2. The gateway signs the swapped item with its own key and claims it is the device's:
    //    the fingerprint the gateway paired (and sends) is of the device's key, not of this one.
    let gw = Identity::self_signed("evil-gateway").unwrap();
    let mut resigned = honest.item();
    resigned.hpke_public_key = gateway_key.public_key();
    let fingerprint = resigned.device_key_fingerprint;
    sign(&mut resigned, &gw);
    resigned.device_key_fingerprint = fingerprint;
    let r = one(&s, 2, resigned).await;
    assert_eq!(r.outcome, Outcome::Invalid, "{:?}", r.reason);

    // 3. A missing or garbage signature.
    let mut garbage = honest.item();
    garbage.binding.signature = vec![0x30, 0x06, 0x02, 0x01, 0x01, 0x02, 0x01, 0x01];
    assert_eq!(one(&s, 3, garbage).await.outcome, Outcome::Invalid);
    let mut other_scheme = honest.item();
    other_scheme.binding.scheme = 0x0807;
    assert_eq!(one(&s, 4, other_scheme).await.outcome, Outcome::Invalid);
    assert_eq!(children(&srv, &dir), 0);

    // The honest item is issued, and only the device's key opens it.
    let r = one(&s, 5, honest.item()).await;
    assert_eq!(r.outcome, Outcome::Issued, "{:?}", r.reason);
    let bundle = honest.open(&r);
    assert_eq!(bundle.device_id, honest.device_id);
    let sealed = r.sealed.unwrap();
    let blob = SealedCredential {
        enc: sealed.enc,
        ciphertext: sealed.ciphertext,
    };
    assert!(
        open_credential(
            &gateway_key,
            honest.device_id.as_str(),
            honest.request_id.as_bytes(),
            &blob
        )
        .is_err()
    );
    let m = srv.http("GET", "/metrics", None, "").1;
    assert!(m.contains("cn_backend_binding_refused_total 4"), "{m}");
}

/// A signature is for one request: replayed with another request ID (to obtain a second
/// credential, or one under another device ID), it does not verify.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_binding_signature_cannot_be_replayed_for_another_request() {
    let dir = Dir::init("");
    dir.add_parent(P1, &["--max-children", "10"]);
    let srv = dir.serve();
    let s = connect(&srv, P1).await;
    let honest = DeviceReq::new(7);
    let signed = honest.item();

    let mut other_request = signed.clone();
    other_request.request_id = RequestId::from([0x99; 16]);
    assert_eq!(one(&s, 1, other_request).await.outcome, Outcome::Invalid);
    let mut other_device = signed.clone();
    other_device.device_id = DeviceId::new("someone-else").unwrap();
    assert_eq!(one(&s, 2, other_device).await.outcome, Outcome::Invalid);
    // The provisioning signature presented as a renewal's.
    let first = one(&s, 3, signed.clone()).await;
    assert_eq!(first.outcome, Outcome::Issued);
    let mut as_renewal = signed.clone();
    as_renewal.kind = companion_proto::msg::ItemKind::Renew;
    as_renewal.supi = first.supi.clone();
    as_renewal.request_id = RequestId::from([0x98; 16]);
    assert_eq!(one(&s, 4, as_renewal).await.outcome, Outcome::Invalid);
    assert_eq!(children(&srv, &dir), 1);
}

/// Before: a renewal re-sealed any child's K/OPc to whatever HPKE key it carried, so whoever
/// held the parent session could read every child it ever issued. Now a renewal must be signed
/// by the device key recorded at issuance: a renewal signed by any other key — under that key's
/// own SPKI, or claiming the recorded SPKI — is refused, and the device's own renewal works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewal_signed_by_another_key_is_refused() {
    let dir = Dir::init("");
    dir.add_parent(P1, &["--max-children", "10"]);
    let srv = dir.serve();
    let s = connect(&srv, P1).await;
    let honest = DeviceReq::new(11);
    let r = one(&s, 1, honest.item()).await;
    assert_eq!(r.outcome, Outcome::Issued);
    let child = r.supi.unwrap();

    let attacker = Identity::self_signed("evil-gateway").unwrap();
    let mut theft = DeviceReq::new(12);
    theft.device_id = honest.device_id.clone();
    // Signed by the attacker's key, under the attacker's SPKI.
    let mut item = theft.renew_item(&child);
    sign(&mut item, &attacker);
    let r = one(&s, 2, item).await;
    assert_eq!(r.outcome, Outcome::Invalid, "{:?}", r.reason);
    assert!(r.sealed.is_none());
    // Signed by the attacker's key, claiming the device's SPKI.
    let mut item = theft.renew_item(&child);
    let spki = item.device_spki.clone();
    let fp = item.device_key_fingerprint;
    sign(&mut item, &attacker);
    item.device_spki = spki;
    item.device_key_fingerprint = fp;
    assert_eq!(one(&s, 3, item).await.outcome, Outcome::Invalid);

    // The device's own renewal (its key, a fresh HPKE key) goes through.
    let mut renewal = DeviceReq::new(13);
    renewal.device_id = honest.device_id.clone();
    let r = one(&s, 4, renewal.renew_item(&child)).await;
    assert_eq!(r.outcome, Outcome::Issued, "{:?}", r.reason);
    assert_eq!(renewal.open(&r).supi, child);
}
