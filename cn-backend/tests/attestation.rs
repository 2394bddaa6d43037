//! Manufacturer attestation against the real `cn-backend` binary (issue 14, PROTOCOL.md §4.5).
//!
//! A parent with `require_attestation` gets credentials only for items whose device key a
//! manufacturer root, installed with `cn-backend attestation add-root`, certifies for the item's
//! device ID. Each test plays a compromised gateway, which holds the parent session and builds
//! the items, and shows that it cannot obtain a credential for an attested device with a key of
//! its own, whatever chain it attaches.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use companion_proto::msg::{AttestationChain, BatchItem, ItemResult, Outcome};
use companion_transport::{Identity, ManufacturerCa};

const P1: &str = "imsi-001010000000001";
const P2: &str = "imsi-001010000000002";

fn chain_of(id: &Identity) -> AttestationChain {
    AttestationChain::new(id.chain().iter().map(|c| c.to_vec()).collect()).unwrap()
}

/// `req`'s item for `device` (its own device ID), signed by `key`, carrying `chain`.
fn item(req: &DeviceReq, key: &Identity, chain: Option<AttestationChain>) -> BatchItem {
    let mut it = req.item();
    sign(&mut it, key);
    it.attestation = chain;
    it
}

fn metric(srv: &Server, line: &str) -> bool {
    srv.http("GET", "/metrics", None, "").1.contains(line)
}

fn denied(r: &ItemResult, why: &str) {
    assert_eq!(r.outcome, Outcome::PolicyDenied, "{:?}", r.reason);
    assert!(r.sealed.is_none());
    let reason = r.reason.clone().unwrap_or_default();
    assert!(
        reason.contains("manufacturer attestation") && reason.contains(why),
        "{reason}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parent_that_requires_attestation_issues_only_to_certified_device_keys() {
    let dir = Dir::init("");
    let tmp = tempfile::tempdir().unwrap();
    let acme = ManufacturerCa::generate("Acme devices").unwrap();
    let other_maker = ManufacturerCa::generate("Unknown maker").unwrap();
    let acme_pem = tmp.path().join("acme.pem");
    std::fs::write(&acme_pem, acme.cert_pem()).unwrap();

    // The root is refused when it is not a CA certificate, and installed when it is.
    let leaf_pem = tmp.path().join("leaf.pem");
    std::fs::write(&leaf_pem, acme.issue_device("x").unwrap().cert_pem()).unwrap();
    let (ok, _, err) = dir.cli(&[
        "attestation",
        "add-root",
        "--name",
        "leaf",
        path_str(&leaf_pem),
    ]);
    assert!(!ok && err.contains("not a CA certificate"), "{err}");
    dir.cli_ok(&[
        "attestation",
        "add-root",
        "--name",
        "acme",
        path_str(&acme_pem),
    ]);
    let (ok, _, err) = dir.cli(&[
        "attestation",
        "add-root",
        "--name",
        "acme-again",
        path_str(&acme_pem),
    ]);
    assert!(!ok && err.contains("already installed"), "{err}");
    let roots = dir.cli_json(&["attestation", "list-roots"]);
    assert_eq!(roots[0]["name"], "acme");
    assert_eq!(roots[0]["subject"], "CN=Acme devices");

    dir.add_parent(P1, &["--max-children", "10", "--require-attestation"]);
    dir.add_parent(P2, &["--max-children", "10"]);
    let shown = dir.cli_json(&["subscriber", "show", P1]);
    assert_eq!(shown["subscriber"]["require_attestation"], true, "{shown}");
    let srv = dir.serve();
    let s = connect(&srv, P1).await;

    // The device: a factory key certified by Acme for its device ID ("dev-1").
    let honest = DeviceReq::new(1);
    let device = acme.issue_device(honest.device_id.as_str()).unwrap();
    let gateway = Identity::self_signed("evil-gateway").unwrap();

    // 1. The gateway's own key, no chain.
    denied(
        &one(&s, 1, item(&honest, &gateway, None)).await,
        "no manufacturer certificate",
    );
    // 2. The gateway's own key with the device's genuine chain attached.
    denied(
        &one(&s, 2, item(&honest, &gateway, Some(chain_of(&device)))).await,
        "another key",
    );
    // 3. A genuine Acme device certified for another device ID, claiming this one.
    let other_device = acme.issue_device("dev-999").unwrap();
    denied(
        &one(
            &s,
            3,
            item(&honest, &other_device, Some(chain_of(&other_device))),
        )
        .await,
        "does not name device dev-1",
    );
    // 4. A chain from a maker the operator does not trust (the gateway's own CA).
    let forged = other_maker.issue_device(honest.device_id.as_str()).unwrap();
    denied(
        &one(&s, 4, item(&honest, &forged, Some(chain_of(&forged)))).await,
        "does not verify",
    );
    // 5. The device's leaf, re-signed as an "intermediate" for the gateway's key: a leaf is
    //    not a CA.
    let as_ca = ManufacturerCa::from_pem(&device.cert_pem(), &device.key_pem()).unwrap();
    let pseudo = as_ca.issue_device(honest.device_id.as_str()).unwrap();
    let mut chain = vec![pseudo.chain()[0].to_vec(), device.chain()[0].to_vec()];
    chain.push(acme.cert_der().to_vec());
    denied(
        &one(
            &s,
            5,
            item(
                &honest,
                &pseudo,
                Some(AttestationChain::new(chain).unwrap()),
            ),
        )
        .await,
        "does not verify",
    );

    // The honest device: issued, and a renewal carrying its chain too.
    let r = one(&s, 6, item(&honest, &device, Some(chain_of(&device)))).await;
    assert_eq!(r.outcome, Outcome::Issued, "{:?}", r.reason);
    let supi = honest.open(&r).supi;
    let mut renew = item(&honest, &device, Some(chain_of(&device)));
    renew.kind = companion_proto::msg::ItemKind::Renew;
    renew.supi = Some(supi.clone());
    renew.request_id = companion_proto::RequestId::from([0x42; 16]);
    sign(&mut renew, &device);
    let unattested_renewal = BatchItem {
        attestation: None,
        ..renew.clone()
    };
    denied(
        &one(&s, 7, unattested_renewal).await,
        "no manufacturer certificate",
    );
    let r = one(&s, 8, renew).await;
    assert_eq!(r.outcome, Outcome::Issued, "{:?}", r.reason);
    assert!(metric(
        &srv,
        "cn_backend_attestation_total{result=\"verified\"} 2"
    ));
    assert!(metric(
        &srv,
        "cn_backend_attestation_total{result=\"failed\"} 4"
    ));

    // Without the policy the attestation is informational: an unattested item is issued.
    let s2 = connect(&srv, P2).await;
    let plain = DeviceReq::new(2);
    let r = one(&s2, 1, plain.item()).await;
    assert_eq!(r.outcome, Outcome::Issued, "{:?}", r.reason);

    // A removed root attests nothing any more (takes effect without a restart).
    dir.cli_ok(&["attestation", "remove-root", "acme"]);
    let next = DeviceReq::new(3);
    let device3 = acme.issue_device(next.device_id.as_str()).unwrap();
    denied(
        &one(&s, 9, item(&next, &device3, Some(chain_of(&device3)))).await,
        "no manufacturer root is installed",
    );
    // And the policy can be lifted.
    dir.cli_ok(&["subscriber", "policy", P1, "--require-attestation", "false"]);
    let r = one(&s, 10, item(&next, &device3, None)).await;
    assert_eq!(r.outcome, Outcome::Issued, "{:?}", r.reason);
}

/// The admin API manages roots as the CLI does: bearer token required, CA certificates only,
/// names unique, and a root added over the API attests at the next batch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roots_are_managed_through_the_admin_api() {
    let dir = Dir::init("");
    dir.add_parent(P1, &["--max-children", "10", "--require-attestation"]);
    let srv = dir.serve();
    let token = dir.token();
    let acme = ManufacturerCa::generate("Acme devices").unwrap();
    let path = "/api/v1/attestation/roots/acme";

    let (code, _) = srv.http("POST", path, None, &acme.cert_pem());
    assert_eq!(code, 401);
    let leaf = acme.issue_device("x").unwrap().cert_pem();
    let (code, body) = srv.http("POST", path, Some(&token), &leaf);
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("not a CA certificate"), "{body}");
    let (code, body) = srv.http("POST", path, Some(&token), &acme.cert_pem());
    assert_eq!(code, 201, "{body}");
    let (code, _) = srv.http("POST", path, Some(&token), &acme.cert_pem());
    assert_eq!(code, 409);
    let (code, body) = srv.http("GET", "/api/v1/attestation/roots", Some(&token), "");
    assert_eq!(code, 200);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v[0]["name"], "acme");

    let s = connect(&srv, P1).await;
    let req = DeviceReq::new(5);
    let device = acme.issue_device(req.device_id.as_str()).unwrap();
    let r = one(&s, 1, item(&req, &device, Some(chain_of(&device)))).await;
    assert_eq!(r.outcome, Outcome::Issued, "{:?}", r.reason);

    let (code, _) = srv.http("DELETE", path, Some(&token), "");
    assert_eq!(code, 200);
    let (code, _) = srv.http("DELETE", path, Some(&token), "");
    assert_eq!(code, 404);
}
