//! End-to-end tests against the real `cn-backend` binary on loopback, driven through the
//! `companion-transport` client drivers, the CLI and the admin HTTP API.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use companion_crypto::secret::Key128;
use companion_crypto::usim::{SoftUsim, SqnState};
use companion_proto::msg::{
    BatchProvision, CnMessage, ErrorCode, ItemKind, Message, Outcome, Params, Revoke,
};
use companion_transport::attach_client::attach;
use companion_transport::cn_client::CnSession;

const P1: &str = "imsi-001010000000001";
const P2: &str = "imsi-001010000000002";

fn batch(id: u64, reqs: &[DeviceReq]) -> BatchProvision {
    BatchProvision {
        batch_id: id,
        items: reqs.iter().map(DeviceReq::item).collect(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aka_right_key_wrong_key_and_resync() {
    let dir = Dir::init("aka_max_failures = 3\naka_lockout = \"60s\"");
    dir.add_parent(P1, &["--max-children", "7", "--max-lifetime", "1d"]);
    let srv = dir.serve();
    let ep = client_endpoint();

    // Right key: authenticated, with the subscription's policy summary.
    let mut u = parent_usim(P1);
    let (s, policy) = CnSession::connect(&ep, &srv.target(HOME_SNN), &mut u)
        .await
        .unwrap();
    assert_eq!(policy.max_children, 7);
    assert_eq!(policy.max_lifetime_s, 86_400);
    assert_eq!(policy.active_children, 0);
    assert!(s.list_children().await.unwrap().children.is_empty());
    s.close();

    // The companion's USIM is far ahead of the CN (e.g. restored from another HSS): resync.
    let mut ahead = parent_usim(P1).with_sqn_state(SqnState::new([5000; 32]).unwrap());
    let (s, _) = CnSession::connect(&ep, &srv.target(HOME_SNN), &mut ahead)
        .await
        .unwrap();
    assert!(ahead.sqn_state().highest_seq() > 5000);
    s.close();
    let shown = dir.cli_json(&["subscriber", "show", P1]);
    assert!(shown["subscriber"]["sqn"].as_u64().unwrap() >> 5 > 5000);

    // Unknown subscriber.
    let mut stranger = parent_usim("imsi-001019999999999");
    let err = CnSession::connect(&ep, &srv.target(HOME_SNN), &mut stranger)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::UnknownSubscriber), "{err}");

    // Wrong key: the USIM rejects the CN's AUTN and the client says auth_failed. A client's
    // error never counts towards a lock-out (anyone could send it; security.rs): the right key
    // authenticates at once afterwards. Wrong RES* lock-outs: security.rs.
    for _ in 0..3 {
        let mut bad = SoftUsim::new(P1.into(), Key128::from_bytes([0x11; 16]), key(OPC));
        let err = CnSession::connect(&ep, &srv.target(HOME_SNN), &mut bad)
            .await
            .unwrap_err();
        assert_eq!(err.code(), Some(ErrorCode::AuthFailed), "{err}");
        assert!(!err.is_retryable());
    }
    let (s, _) = CnSession::connect(&ep, &srv.target(HOME_SNN), &mut ahead)
        .await
        .unwrap();
    s.close();

    let (_, metrics) = srv.http("GET", "/metrics", None, "");
    assert!(
        metrics.contains(r#"cn_backend_aka_outcomes_total{conversation="cn",result="success"} 3"#)
    );
    assert!(!metrics.contains(r#"result="locked_out""#));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_batches_never_exceed_quota() {
    let dir = Dir::init("");
    dir.add_parent(P1, &["--max-children", "12"]);
    let srv = dir.serve();
    // Several gateway sessions of the same companion.
    let mut sessions = Vec::new();
    for _ in 0..4 {
        sessions.push(connect(&srv, P1).await);
    }
    // Use 9 of the 12 slots first.
    let first: Vec<DeviceReq> = (0..9).map(DeviceReq::new).collect();
    let r = sessions[0].batch(batch(1, &first)).await.unwrap();
    assert!(r.items.iter().all(|i| i.outcome == Outcome::Issued));

    // 16 batches of 4 new requests race for the last 3 slots.
    let mut tasks = Vec::new();
    for b in 0..16u64 {
        let s = sessions[(b % 4) as usize].clone();
        let reqs: Vec<DeviceReq> = (0..4).map(|i| DeviceReq::new(1000 + b * 10 + i)).collect();
        tasks.push(tokio::spawn(
            async move { s.batch(batch(100 + b, &reqs)).await },
        ));
    }
    let mut issued = Vec::new();
    let mut quota = 0;
    for t in tasks {
        for it in t.await.unwrap().unwrap().items {
            match it.outcome {
                Outcome::Issued => issued.push(it.supi.unwrap().as_str().to_owned()),
                Outcome::QuotaExhausted => quota += 1,
                o => panic!("unexpected outcome {o:?}"),
            }
        }
    }
    assert_eq!(issued.len(), 3, "exactly the 3 free slots were issued");
    assert_eq!(quota, 16 * 4 - 3);
    let list = sessions[1].list_children().await.unwrap().children;
    assert_eq!(list.len(), 12);
    let unique: HashSet<_> = list.iter().map(|c| c.supi.as_str().to_owned()).collect();
    assert_eq!(unique.len(), 12, "no SUPI issued twice");
    assert_eq!(
        dir.cli_json(&["subscriber", "show", P1])["subscriber"]["active_children"],
        12
    );
    let (_, metrics) = srv.http("GET", "/metrics", None, "");
    assert!(metrics.contains("cn_backend_credentials_issued_total 12"));
    assert!(metrics.contains("cn_backend_quota_rejections_total 61"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_under_load_loses_nothing_acknowledged() {
    let dir = Dir::init("");
    dir.add_parent(P1, &["--max-children", "100000"]);
    let mut srv = dir.serve();
    // A short exchange timeout: the killed server never answers the batches in flight.
    let opts = companion_transport::cn_client::ClientOptions {
        exchange_timeout: Duration::from_secs(2),
        ..Default::default()
    };
    let session = connect_with(&srv, P1, opts).await;

    // A load: batches of 8 fresh requests in a loop, two in parallel.
    let answered: Arc<Mutex<HashMap<u64, String>>> = Arc::default();
    let sent: Arc<Mutex<HashSet<u64>>> = Arc::default();
    let t0 = Instant::now();
    let mut loaders = Vec::new();
    for w in 0..2u64 {
        let s = session.clone();
        let answered = answered.clone();
        let sent = sent.clone();
        loaders.push(tokio::spawn(async move {
            for b in 0..10_000u64 {
                let base = (w * 1_000_000) + b * 8;
                let reqs: Vec<DeviceReq> = (base..base + 8).map(DeviceReq::new).collect();
                sent.lock().unwrap().extend(base..base + 8);
                match s.batch(batch(base, &reqs)).await {
                    Ok(r) => {
                        let mut a = answered.lock().unwrap();
                        for (i, it) in r.items.iter().enumerate() {
                            assert_eq!(it.outcome, Outcome::Issued);
                            let n = u64::from_be_bytes(
                                it.request_id.as_bytes()[..8].try_into().unwrap(),
                            );
                            let _ = i;
                            a.insert(n, it.supi.as_ref().unwrap().as_str().to_owned());
                        }
                    }
                    Err(_) => return,
                }
            }
        }));
    }
    // Kill at a pseudo-random moment between 0.4 and 1.2 s into the load.
    let jitter = u64::from(std::process::id() % 800);
    tokio::time::sleep(Duration::from_millis(400 + jitter)).await;
    srv.kill9();
    let load_time = t0.elapsed();
    for l in loaders {
        tokio::time::timeout(Duration::from_secs(40), l)
            .await
            .expect("loaders stop once the server is gone")
            .unwrap();
    }
    let answered = answered.lock().unwrap().clone();
    let sent = sent.lock().unwrap().clone();
    eprintln!(
        "load: {} credentials acknowledged in {:.2} s ({:.0}/s) before SIGKILL; {} requests sent",
        answered.len(),
        load_time.as_secs_f64(),
        answered.len() as f64 / load_time.as_secs_f64(),
        sent.len()
    );
    assert!(!answered.is_empty(), "the load ran before the kill");

    // Restart on the same directory: the database opens and is consistent.
    let srv = dir.serve();
    let shown = dir.cli_json(&["subscriber", "show", P1]);
    let children = shown["children"].as_array().unwrap();
    let stored: HashMap<String, String> = children
        .iter()
        .map(|c| {
            (
                c["supi"].as_str().unwrap().to_owned(),
                c["device_id"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    for (n, supi) in &answered {
        assert_eq!(
            stored.get(supi).map(String::as_str),
            Some(format!("dev-{n}").as_str()),
            "acknowledged credential {supi} survived"
        );
    }
    assert!(stored.len() >= answered.len() && stored.len() <= sent.len());

    // Re-send every request id: exactly one credential per request id, same SUPI if answered.
    let session = connect(&srv, P1).await;
    let mut ids: Vec<u64> = sent.iter().copied().collect();
    ids.sort_unstable();
    let mut resent: HashMap<u64, String> = HashMap::new();
    for (k, chunk) in ids.chunks(64).enumerate() {
        let reqs: Vec<DeviceReq> = chunk.iter().copied().map(DeviceReq::new).collect();
        let r = session.batch(batch(k as u64, &reqs)).await.unwrap();
        for (it, rq) in r.items.iter().zip(&reqs) {
            assert_eq!(it.outcome, Outcome::Issued, "{:?}", it.reason);
            let n = u64::from_be_bytes(it.request_id.as_bytes()[..8].try_into().unwrap());
            // The sealed bundle opens for the device and names the same SUPI.
            let rq = reqs
                .iter()
                .find(|q| q.request_id == it.request_id)
                .unwrap_or(rq);
            let b = rq.open(it);
            assert_eq!(b.supi, *it.supi.as_ref().unwrap());
            resent.insert(n, it.supi.as_ref().unwrap().as_str().to_owned());
        }
    }
    for (n, supi) in &answered {
        assert_eq!(
            resent.get(n),
            Some(supi),
            "request {n} got the same SUPI again"
        );
    }
    let supis: HashSet<&String> = resent.values().collect();
    assert_eq!(
        supis.len(),
        sent.len(),
        "one distinct credential per request id"
    );
    let after = dir.cli_json(&["subscriber", "show", P1]);
    assert_eq!(after["children"].as_array().unwrap().len(), sent.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attach_checks_revocation_expiry_roaming_and_parent() {
    let dir = Dir::init("");
    dir.add_parent(P1, &["--max-children", "10", "--roaming", "false"]);
    dir.add_parent(
        P2,
        &[
            "--max-children",
            "10",
            "--roaming",
            "true",
            "--dnn",
            "internet",
        ],
    );
    let srv = dir.serve();
    let ep = client_endpoint();
    let s1 = connect(&srv, P1).await;
    let s2 = connect(&srv, P2).await;

    let mut short = DeviceReq::new(2);
    short.params = Params {
        lifetime_s: Some(1),
        ..Params::default()
    };
    let reqs = vec![DeviceReq::new(1), short, DeviceReq::new(3)];
    let r = s1.batch(batch(1, &reqs)).await.unwrap();
    let bundles: Vec<_> = reqs
        .iter()
        .zip(&r.items)
        .map(|(q, it)| q.open(it))
        .collect();
    let b = &bundles[0];
    assert_eq!(b.attach.server_name, "localhost");
    assert_eq!(b.attach.endpoint, format!("localhost:{}", srv.quic.port()));
    assert_eq!(b.attach.trust_anchor, srv.anchor.as_ref());
    assert!(!b.restrictions.roaming_allowed);
    assert_eq!(b.sqn_start, 0);

    // A fresh credential attaches at home; the answer carries expiry and restrictions.
    let mut u = device_usim(b);
    let acc = attach(&ep, &srv.target(HOME_SNN), &mut u).await.unwrap();
    assert_eq!(acc.expires_at, b.expires_at);
    assert!(!acc.restrictions.roaming_allowed);
    // Roaming refused: the parent forbids it.
    let err = attach(&ep, &srv.target(VISITED_SNN), &mut u)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::RoamingNotAllowed), "{err}");
    // A wrong key does not attach.
    let mut wrong = SoftUsim::new(
        b.supi.as_str().into(),
        Key128::from_bytes([1; 16]),
        b.opc.clone(),
    );
    let err = attach(&ep, &srv.target(HOME_SNN), &mut wrong)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::AuthFailed), "{err}");

    // Roaming allowed when the parent allows it (and the request asked for it).
    let mut roam = DeviceReq::new(20);
    roam.params.roaming = Some(true);
    let r2 = s2.batch(batch(2, &[roam.clone()])).await.unwrap();
    let rb = roam.open(&r2.items[0]);
    assert!(rb.restrictions.roaming_allowed);
    assert_eq!(rb.restrictions.dnns, vec!["internet".to_owned()]);
    let mut ru = device_usim(&rb);
    let acc = attach(&ep, &srv.target(VISITED_SNN), &mut ru)
        .await
        .unwrap();
    assert!(acc.restrictions.roaming_allowed);

    // Renewal through the gateway: same SUPI and keys, a new expiry, sealed for the renewal's
    // own request id and key; the renewed credential still attaches.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let mut renew = DeviceReq::new(1);
    renew.request_id = companion_proto::RequestId::from([0xee; 16]);
    renew.hpke = companion_crypto::hpke::DeviceHpkeKey::derive(&[0xab; 32]);
    let item = renew.renew_item(&b.supi);
    let rr = issued_one(&s1, 3, item).await;
    let nb = renew.open(&rr);
    assert_eq!(nb.supi, b.supi);
    assert_eq!(nb.k, b.k);
    assert!(nb.expires_at > b.expires_at);
    let acc = attach(&ep, &srv.target(HOME_SNN), &mut u).await.unwrap();
    assert_eq!(acc.expires_at, nb.expires_at);

    // Revoked child.
    let rev = s1
        .revoke(Revoke {
            supi: Some(bundles[2].supi.clone()),
            device_id: None,
        })
        .await
        .unwrap();
    assert_eq!(rev.revoked, vec![bundles[2].supi.clone()]);
    let mut u3 = device_usim(&bundles[2]);
    let err = attach(&ep, &srv.target(HOME_SNN), &mut u3)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::CredentialRevoked), "{err}");
    // A companion cannot revoke another companion's child.
    let rev = s1
        .revoke(Revoke {
            supi: Some(rb.supi.clone()),
            device_id: None,
        })
        .await
        .unwrap();
    assert!(rev.revoked.is_empty());

    // Expired child (lifetime 1 s).
    assert!(bundles[1].expires_at - bundles[1].issued_at <= 1);
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let mut u2 = device_usim(&bundles[1]);
    let err = attach(&ep, &srv.target(HOME_SNN), &mut u2)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::CredentialExpired), "{err}");

    // Suspending the parent ends its children; so does revoking the other parent.
    dir.cli_ok(&["subscriber", "suspend", P1]);
    let err = attach(&ep, &srv.target(HOME_SNN), &mut u)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::CredentialRevoked), "{err}");
    dir.cli_ok(&["subscriber", "revoke", P2]);
    let err = attach(&ep, &srv.target(VISITED_SNN), &mut ru)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::CredentialRevoked), "{err}");
    // A suspended companion's batches are refused as a whole.
    let err = s1.batch(batch(9, &[DeviceReq::new(99)])).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::SubscriptionSuspended), "{err}");
    // A parent SUPI cannot attach as a device.
    let mut pu = parent_usim(P1);
    let err = attach(&ep, &srv.target(HOME_SNN), &mut pu)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::UnknownSubscriber), "{err}");

    let (_, metrics) = srv.http("GET", "/metrics", None, "");
    assert!(metrics.contains(r#"cn_backend_attach_outcomes_total{result="accepted"} 3"#));
    assert!(
        metrics.contains(r#"cn_backend_attach_outcomes_total{result="roaming_not_allowed"} 1"#)
    );
}

#[test]
fn csv_import_of_ten_thousand_rows() {
    let dir = Dir::init("");
    let mut csv = String::from("supi,k,opc,amf,sqn,max_children,max_lifetime_s,roaming,dnns\n");
    for i in 0..10_000u32 {
        csv.push_str(&format!(
            "imsi-00101{:010},{K},{OPC},8000,0,5,86400,false,internet\n",
            5_000_000 + i
        ));
    }
    let path = dir.tmp.path().join("subs.csv");
    std::fs::write(&path, &csv).unwrap();
    let t0 = Instant::now();
    let out = dir.cli_json(&["subscriber", "import", path_str(&path)]);
    eprintln!(
        "imported 10,000 rows in {:.2} s",
        t0.elapsed().as_secs_f64()
    );
    assert_eq!(out["imported"], 10_000);
    let list = dir.cli_json(&["subscriber", "list", "--limit", "20000"]);
    assert_eq!(list.as_array().unwrap().len(), 10_000);
    // All or nothing: a file with one bad row imports nothing.
    let bad = "supi,k,opc,amf,sqn,max_children,max_lifetime_s,roaming,dnns\n\
               imsi-001010000000777,465b5ce8b199b49faa5f0a2ee238a6bc,cd63cb71954a9f4e48a5994e37a02baf,8000,0,5,86400,false,\n\
               imsi-001010005000000,465b5ce8b199b49faa5f0a2ee238a6bc,cd63cb71954a9f4e48a5994e37a02baf,8000,0,5,86400,false,\n";
    let bad_path = dir.tmp.path().join("bad.csv");
    std::fs::write(&bad_path, bad).unwrap();
    let (ok, _, err) = dir.cli(&["subscriber", "import", path_str(&bad_path)]);
    assert!(!ok);
    assert!(err.contains("line 3"), "{err}");
    let (ok, _, _) = dir.cli(&["subscriber", "show", "imsi-001010000000777"]);
    assert!(!ok, "nothing of the failed import was committed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_frames_and_oversized_batches_touch_nothing() {
    let dir = Dir::init("max_batch_items = 4");
    dir.add_parent(P1, &["--max-children", "100"]);
    let srv = dir.serve();
    let s = connect(&srv, P1).await;
    let conn = s.connection().clone();

    async fn exchange(conn: &quinn::Connection, bytes: &[u8]) -> CnMessage {
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        send.write_all(bytes).await.unwrap();
        send.finish().unwrap();
        let got = tokio::time::timeout(Duration::from_secs(10), recv.read_to_end(1 << 20))
            .await
            .unwrap()
            .unwrap();
        let mut msgs = CnMessage::decode_stream(&got).unwrap();
        assert_eq!(msgs.len(), 1);
        msgs.remove(0)
    }
    fn code(m: CnMessage) -> ErrorCode {
        match m {
            CnMessage::Error(e) => e.code,
            other => panic!("expected Error, got {other:?}"),
        }
    }
    // Garbage header (version 0x47).
    assert_eq!(
        code(exchange(&conn, b"GET / HTTP/1.1\r\n\r\n").await),
        ErrorCode::UnsupportedVersion
    );
    // Valid header, body that is not CBOR for the type.
    let mut f = vec![1, 0x20, 0, 0, 0, 0, 0, 3];
    f.extend_from_slice(&[0xff, 0x00, 0x01]);
    assert_eq!(code(exchange(&conn, &f).await), ErrorCode::Malformed);
    // A body length over the 4 MiB limit is refused from the header alone.
    let huge = [1u8, 0x20, 0, 0, 0x7f, 0xff, 0xff, 0xff];
    assert_eq!(code(exchange(&conn, &huge).await), ErrorCode::TooLarge);
    // Reserved flags set.
    let flags = [1u8, 0x24, 0, 1, 0, 0, 0, 1, 0xa0];
    assert_eq!(code(exchange(&conn, &flags).await), ErrorCode::Malformed);
    // A well-formed batch with more items than the session allows.
    let reqs: Vec<DeviceReq> = (0..5).map(DeviceReq::new).collect();
    let big = CnMessage::BatchProvision(batch(1, &reqs)).encode().unwrap();
    assert_eq!(code(exchange(&conn, &big).await), ErrorCode::TooLarge);
    // Duplicate request ids.
    let dup = CnMessage::BatchProvision(batch(2, &[DeviceReq::new(1), DeviceReq::new(1)]))
        .encode()
        .unwrap();
    assert_eq!(code(exchange(&conn, &dup).await), ErrorCode::Malformed);
    // A message of the wrong direction.
    let wrong = CnMessage::ChildList(companion_proto::msg::ChildList { children: vec![] })
        .encode()
        .unwrap();
    assert_eq!(
        code(exchange(&conn, &wrong).await),
        ErrorCode::UnexpectedMessage
    );
    // The client driver refuses an oversized batch before sending it.
    let err = s.batch(batch(3, &reqs)).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::TooLarge));
    // An item with an unknown kind gets `invalid`, the others are judged on their own.
    let mut odd = DeviceReq::new(50).item();
    odd.kind = ItemKind::Unknown(9);
    let r = s
        .batch(BatchProvision {
            batch_id: 4,
            items: vec![odd],
        })
        .await
        .unwrap();
    assert_eq!(r.items[0].outcome, Outcome::Invalid);

    // The session still works, and nothing was issued or audited as issued.
    assert!(s.list_children().await.unwrap().children.is_empty());
    let audit = dir.cli_json(&["audit", "--supi", P1]);
    assert!(
        audit
            .as_array()
            .unwrap()
            .iter()
            .all(|a| a["action"] != "issue")
    );

    // A gateway that vanishes right after sending a batch: the batch is committed whole or not
    // at all, and the retry with the same request ids gets exactly one credential each.
    let vanish_reqs: Vec<DeviceReq> = (60..64).map(DeviceReq::new).collect();
    {
        let gone = connect(&srv, P1).await;
        let (mut send, _recv) = gone.connection().open_bi().await.unwrap();
        let bytes = CnMessage::BatchProvision(batch(7, &vanish_reqs))
            .encode()
            .unwrap();
        send.write_all(&bytes).await.unwrap();
        send.finish().unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
        gone.connection().close(0u32.into(), b"vanish");
    }
    let n = s.list_children().await.unwrap().children.len();
    assert!(n == 0 || n == 4, "all or nothing, got {n}");
    let r = s.batch(batch(8, &vanish_reqs)).await.unwrap();
    assert!(r.items.iter().all(|i| i.outcome == Outcome::Issued));
    assert_eq!(s.list_children().await.unwrap().children.len(), 4);

    // Garbage on the AKA stream of a new connection: a typed error, the server lives on.
    let ep = client_endpoint();
    let cfg = companion_transport::client_config(
        companion_transport::ServerTrust::Anchors(vec![srv.anchor.clone()]),
        None,
        companion_transport::ALPN_CN,
        &companion_transport::Limits::cn_link(),
    )
    .unwrap();
    let raw = ep
        .connect_with(cfg, srv.quic, "localhost")
        .unwrap()
        .await
        .unwrap();
    let body = CnMessage::ListChildren(Default::default())
        .encode()
        .unwrap();
    assert_eq!(
        code(exchange(&raw, &body).await),
        ErrorCode::UnexpectedMessage
    );
    let again = connect(&srv, P1).await;
    assert_eq!(again.list_children().await.unwrap().children.len(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_api_auth_crud_metrics_and_clean_shutdown() {
    let dir = Dir::init("");
    let mut srv = dir.serve();
    let token = dir.token();
    assert_eq!(srv.http("GET", "/healthz", None, "").0, 200);
    assert_eq!(srv.http("GET", "/api/v1/subscribers", None, "").0, 401);
    assert_eq!(
        srv.http("GET", "/api/v1/subscribers", Some("wrong-token-123456"), "")
            .0,
        401
    );

    let body = format!(
        r#"{{"supi":"{P1}","k":"{K}","op_from_operator":true,"max_children":2,"max_lifetime":"2h","roaming":false,"dnns":["internet"]}}"#
    );
    let (st, v) = srv.http_json("POST", "/api/v1/subscribers", Some(&token), &body);
    assert_eq!(st, 201, "{v}");
    assert_eq!(v["max_lifetime_s"], 7200);
    let (st, _) = srv.http_json("POST", "/api/v1/subscribers", Some(&token), &body);
    assert_eq!(st, 409);
    let (st, v) = srv.http_json("GET", "/api/v1/subscribers/imsi-0010", Some(&token), "");
    assert_eq!(st, 400, "{v}");
    let (st, _) = srv.http_json(
        "GET",
        "/api/v1/subscribers/imsi-001019999999999",
        Some(&token),
        "",
    );
    assert_eq!(st, 404);
    let (st, v) = srv.http_json(
        "PATCH",
        &format!("/api/v1/subscribers/{P1}/policy"),
        Some(&token),
        r#"{"max_children":3}"#,
    );
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["max_children"], 3);

    // OPc was derived from op.key: the companion (holding OPc) authenticates. Its OPc is the
    // one the operator would have put on the SIM.
    let op = Key128::from_hex(
        std::fs::read_to_string(dir.path().join("op.key"))
            .unwrap()
            .trim(),
    )
    .unwrap();
    let opc = companion_crypto::milenage::Milenage::compute_opc(&key(K), op.expose());
    let mut u = SoftUsim::new(P1.into(), key(K), opc);
    let ep = client_endpoint();
    let (s, _) = CnSession::connect(&ep, &srv.target(HOME_SNN), &mut u)
        .await
        .unwrap();
    let r = s.batch(batch(1, &[DeviceReq::new(1)])).await.unwrap();
    assert_eq!(r.items[0].outcome, Outcome::Issued);
    let child = r.items[0].supi.as_ref().unwrap().as_str().to_owned();

    let (st, v) = srv.http_json(
        "GET",
        &format!("/api/v1/subscribers/{P1}"),
        Some(&token),
        "",
    );
    assert_eq!(st, 200);
    assert_eq!(v["children"][0]["supi"], child.as_str());
    assert_eq!(v["subscriber"]["active_children"], 1);
    let (_, v) = srv.http_json(
        "GET",
        &format!("/api/v1/subscribers/{P1}/children"),
        Some(&token),
        "",
    );
    assert_eq!(v.as_array().unwrap().len(), 1);
    let (st, v) = srv.http_json(
        "POST",
        &format!("/api/v1/children/{child}/revoke"),
        Some(&token),
        "",
    );
    assert_eq!((st, v["revoked"].as_bool()), (200, Some(true)));
    let (st, v) = srv.http_json(
        "POST",
        &format!("/api/v1/subscribers/{P1}/suspend"),
        Some(&token),
        "",
    );
    assert_eq!((st, v["to"].as_str()), (200, Some("suspended")));
    let (st, _) = srv.http_json(
        "POST",
        &format!("/api/v1/subscribers/{P1}/resume"),
        Some(&token),
        "",
    );
    assert_eq!(st, 200);
    let (st, v) = srv.http_json(
        "GET",
        &format!("/api/v1/audit?supi={P1}&limit=50"),
        Some(&token),
        "",
    );
    assert_eq!(st, 200);
    let actions: Vec<&str> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["action"].as_str().unwrap())
        .collect();
    assert_eq!(
        actions,
        ["add", "policy", "issue", "revoke", "suspend", "resume"]
    );
    let csv = format!(
        "supi,k,opc,amf,sqn,max_children,max_lifetime_s,roaming,dnns\nimsi-001010000000003,{K},{OPC},8000,0,1,60,false,\n"
    );
    let (st, v) = srv.http_json("POST", "/api/v1/subscribers/import", Some(&token), &csv);
    assert_eq!((st, v["imported"].as_u64()), (200, Some(1)));
    let (_, list) = srv.http_json("GET", "/api/v1/subscribers", Some(&token), "");
    assert_eq!(list.as_array().unwrap().len(), 2);

    let (st, metrics) = srv.http("GET", "/metrics", None, "");
    assert_eq!(st, 200);
    assert!(metrics.contains("# HELP cn_backend_credentials_issued_total"));
    assert!(metrics.contains("cn_backend_credentials_issued_total 1"));
    assert!(metrics.contains("cn_backend_credentials_revoked_total 1"));
    assert!(metrics.contains("cn_backend_gateway_sessions_active 1"));
    assert!(metrics.contains("cn_backend_tx_commit_seconds_count 1"));

    // SIGTERM: drains and exits 0.
    assert!(srv.terminate(), "clean exit: {}", srv.log_text());
    assert!(s.list_children().await.is_err());
}
