//! Open5GS subscriber sync (`[sync.open5gs]`) against a real MongoDB wire-protocol server
//! (`nx-27017`, started by `tests/mongo`), with the real `cn-backend` binary: every lifecycle
//! change and the document it leaves, the BSON types Open5GS insists on, the expiry sweeper, the
//! server down and back, and outbox replay after a kill -9 between commit and push.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;
mod mongo;

use std::time::{Duration, Instant};

use common::*;
use companion_proto::msg::{ErrorCode, Outcome, Params};
use companion_transport::attach_client::attach;
use mongodb::bson::{Bson, Document, RawDocumentBuf, doc};
use mongodb::{Client, Collection};

const P1: &str = "imsi-001010000000001";

async fn collections(uri: &str) -> (Collection<Document>, Collection<RawDocumentBuf>) {
    let mut opts = mongodb::options::ClientOptions::parse(uri).await.unwrap();
    opts.server_selection_timeout = Some(Duration::from_secs(5));
    let c = Client::with_options(opts).unwrap();
    let db = c.database("open5gs");
    (
        db.collection::<Document>("subscribers"),
        db.collection::<RawDocumentBuf>("subscribers"),
    )
}

fn sync_config(uri: &str) -> String {
    format!("[sync.open5gs]\nuri = \"{uri}\"\nretry_max = \"500ms\"\nsweep_interval = \"200ms\"\n")
}

fn imsi(supi: &str) -> String {
    supi.trim_start_matches("imsi-").to_owned()
}

/// Waits until the document of `supi` is present (`true`) or absent (`false`); returns it.
async fn wait_doc(c: &Collection<Document>, supi: &str, present: bool) -> Option<Document> {
    let t0 = Instant::now();
    loop {
        let d = c.find_one(doc! { "imsi": imsi(supi) }).await.unwrap();
        if d.is_some() == present {
            return d;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "{supi}: document still {}",
            if present { "absent" } else { "present" }
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The value of the metric line starting with `prefix` (0 when absent).
fn metric(srv: &Server, prefix: &str) -> f64 {
    let (st, body) = srv.http("GET", "/metrics", None, "");
    assert_eq!(st, 200);
    body.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .map_or(0.0, |v| v.parse().unwrap())
}

fn wait_metric(srv: &Server, prefix: &str, pred: impl Fn(f64) -> bool) -> f64 {
    let t0 = Instant::now();
    loop {
        let v = metric(srv, prefix);
        if pred(v) {
            return v;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "{prefix} = {v}: condition not met; log: {}",
            srv.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

const BACKLOG: &str = "cn_backend_sync_outbox_backlog ";
const UPSERTS_OK: &str = "cn_backend_sync_pushes_total{operation=\"upsert\",result=\"ok\"}";
const PUSH_ERRORS: &str = "cn_backend_sync_pushes_total{operation=\"upsert\",result=\"error\"}";

async fn issue(s: &companion_transport::cn_client::CnSession, id: u64, q: &DeviceReq) -> String {
    let r = one(s, id, q.item()).await;
    assert_eq!(r.outcome, Outcome::Issued, "{r:?}");
    r.supi.unwrap().as_str().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_changes_upsert_and_delete_documents() {
    let Some(mongo) = mongo::MongoServer::start() else {
        return;
    };
    let (coll, raw) = collections(&mongo.uri()).await;
    let dir = Dir::init(&sync_config(&mongo.uri()));
    dir.add_parent(
        P1,
        &[
            "--max-children",
            "10",
            "--dnn",
            "internet",
            "--dnn",
            "iot",
            "--max-bitrate-kbps",
            "5000",
        ],
    );
    let srv = dir.serve();
    let s = connect(&srv, P1).await;

    // Issue: the document appears, in the shape and with the types Open5GS reads.
    let mut q1 = DeviceReq::new(1);
    q1.params = Params {
        dnns: Some(vec!["iot".into()]),
        max_bitrate_kbps: Some(2000),
        ..Params::default()
    };
    let r1 = one(&s, 1, q1.item()).await;
    assert_eq!(r1.outcome, Outcome::Issued);
    let c1 = r1.supi.clone().unwrap().as_str().to_owned();
    let bundle = q1.open(&r1);
    let d = wait_doc(&coll, &c1, true).await.unwrap();
    assert_eq!(d.get_str("imsi").unwrap(), imsi(&c1));
    let sec = d.get_document("security").unwrap();
    assert_eq!(
        sec.get_str("k").unwrap(),
        hex::encode_upper(bundle.k.expose())
    );
    assert_eq!(
        sec.get_str("opc").unwrap(),
        hex::encode_upper(bundle.opc.expose())
    );
    assert_eq!(sec.get_str("amf").unwrap(), "8000");
    assert_eq!(sec.get("op"), Some(&Bson::Null));
    // The SQN starts at the bundle's sqn_start. nx-27017 answers an int64 below 2^31 as an
    // int32, so the type of this small value cannot be checked here (the mapping's unit tests
    // check that it is built as an int64); the large value below can.
    assert_eq!(bundle.sqn_start, 0);
    assert!(matches!(
        sec.get("sqn"),
        Some(Bson::Int64(0) | Bson::Int32(0))
    ));
    let slice = d.get_array("slice").unwrap()[0]
        .as_document()
        .unwrap()
        .clone();
    assert_eq!(slice.get("sst"), Some(&Bson::Int32(1)));
    assert_eq!(slice.get("default_indicator"), Some(&Bson::Boolean(true)));
    let sessions = slice.get_array("session").unwrap();
    assert_eq!(
        sessions.len(),
        1,
        "only the DNN the credential got: {sessions:?}"
    );
    let sess = sessions[0].as_document().unwrap();
    assert_eq!(sess.get_str("name").unwrap(), "iot");
    assert_eq!(sess.get("type"), Some(&Bson::Int32(3)));
    assert_eq!(
        sess.get_document("qos").unwrap().get("index"),
        Some(&Bson::Int32(9))
    );
    let two_mbit = doc! { "value": Bson::Int32(2_000_000), "unit": Bson::Int32(0) };
    assert_eq!(
        sess.get_document("ambr")
            .unwrap()
            .get_document("downlink")
            .unwrap(),
        &two_mbit
    );
    assert_eq!(
        d.get_document("ambr")
            .unwrap()
            .get_document("uplink")
            .unwrap(),
        &two_mbit
    );
    for (k, v) in [
        ("schema_version", 1),
        ("access_restriction_data", 32),
        ("subscriber_status", 0),
        ("network_access_mode", 0),
        ("subscribed_rau_tau_timer", 12),
    ] {
        assert_eq!(d.get(k), Some(&Bson::Int32(v)), "{k}");
    }
    // Canonical extended JSON shows the BSON type of every number.
    let canonical = Bson::Document(d.clone()).into_canonical_extjson();
    println!(
        "synced document as stored: {}",
        serde_json::to_string_pretty(&canonical).unwrap()
    );

    // SQN ownership: a synced child authenticates at the core; cn-backend's own attach
    // service refuses it before making a vector (no second SQN sequence).
    let mut u = device_usim(&bundle);
    let err = attach(&client_endpoint(), &srv.target(HOME_SNN), &mut u)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::PolicyDenied), "{err}");

    // The core's UDM advances the SQN (as Open5GS does, with $inc on an int64)...
    coll.update_one(
        doc! { "imsi": imsi(&c1) },
        doc! { "$set": { "security.sqn": Bson::Int64(1 << 33) } },
    )
    .await
    .unwrap();
    // ...and a renewal, pushed again, leaves the core's SQN alone.
    let upserts = metric(&srv, UPSERTS_OK);
    let sup: companion_proto::Supi = r1.supi.clone().unwrap();
    let mut renewal = DeviceReq::new(11);
    renewal.device_id = q1.device_id.clone();
    let rr = one(&s, 2, renewal.renew_item(&sup)).await;
    assert_eq!(rr.outcome, Outcome::Issued, "renewal: {rr:?}");
    wait_metric(&srv, UPSERTS_OK, |v| v > upserts);
    wait_metric(&srv, BACKLOG, |v| v == 0.0);
    let rd = raw
        .find_one(doc! { "imsi": imsi(&c1) })
        .await
        .unwrap()
        .unwrap();
    let sqn = rd.get_document("security").unwrap().get("sqn").unwrap();
    // Above 2^31 the server keeps the type: a BSON int64 (0x12), what Open5GS requires.
    assert_eq!(
        sqn,
        Some(mongodb::bson::RawBsonRef::Int64(1 << 33)),
        "sqn must stay the core's int64"
    );

    // A credential without DNN or bitrate of its own gets the parent's DNNs as sessions.
    let c2 = issue(&s, 3, &DeviceReq::new(2)).await;
    let d2 = wait_doc(&coll, &c2, true).await.unwrap();
    let names: Vec<String> = d2.get_array("slice").unwrap()[0]
        .as_document()
        .unwrap()
        .get_array("session")
        .unwrap()
        .iter()
        .map(|x| x.as_document().unwrap().get_str("name").unwrap().to_owned())
        .collect();
    assert_eq!(names, ["internet", "iot"]);

    // Expiry: a short-lived credential is deleted by the sweeper soon after it expires.
    // Expiry times are whole seconds, so a one-second credential can already be expired when
    // the pusher first reads it (it then rightly never appears): give it room to appear.
    let mut short = DeviceReq::new(3);
    short.params = Params {
        lifetime_s: Some(4),
        ..Params::default()
    };
    let t0 = Instant::now();
    let c3 = issue(&s, 4, &short).await;
    wait_doc(&coll, &c3, true).await;
    wait_doc(&coll, &c3, false).await;
    // Gone within the lifetime (plus the second it may round to) and a few sweeps.
    assert!(
        t0.elapsed() < Duration::from_secs(4 + 1 + 3),
        "{:?}",
        t0.elapsed()
    );

    // Revoke one child (admin API): deleted.
    let token = dir.token();
    let (st, body) = srv.http(
        "POST",
        &format!("/api/v1/children/{c2}/revoke"),
        Some(&token),
        "",
    );
    assert_eq!(st, 200, "{body}");
    wait_doc(&coll, &c2, false).await;
    wait_metric(&srv, BACKLOG, |v| v == 0.0);

    // The operator's view of single credentials, with the sync state (CLI and admin API agree).
    let shown = dir.cli_json(&["child", "show", &c2]);
    assert_eq!(shown["state"], "revoked");
    assert_eq!(shown["sync"]["state"], "deleted", "{shown}");
    let (st, api) = srv.http_json("GET", &format!("/api/v1/children/{c2}"), Some(&token), "");
    assert_eq!(st, 200);
    assert_eq!(api["sync"], shown["sync"]);
    assert_eq!(
        dir.cli_json(&["child", "show", &c1])["sync"]["state"],
        "present"
    );
    let listed = dir.cli_json(&["child", "list", "--parent", P1]);
    assert_eq!(listed.as_array().unwrap().len(), 3);
    let detail = dir.cli_json(&["subscriber", "show", P1]);
    assert!(
        detail["children"]
            .as_array()
            .unwrap()
            .iter()
            .all(|c| c["sync"]["state"].is_string()),
        "{detail}"
    );
    let text = dir.cli_ok(&["child", "show", &c1]);
    assert!(text.contains("core=present"), "{text}");
    // Revoking from the CLI (its own process) is pushed by the running service.
    let c5 = issue(&s, 6, &DeviceReq::new(5)).await;
    wait_doc(&coll, &c5, true).await;
    let r = dir.cli_json(&["child", "revoke", &c5]);
    assert_eq!(r, serde_json::json!({ "supi": c5, "revoked": true }));
    wait_doc(&coll, &c5, false).await;
    let (ok, _, err) = dir.cli(&["child", "show", "imsi-001019999999999"]);
    assert!(!ok && err.contains("unknown credential"), "{err}");

    // Suspending the parent revokes its children: deleted; resuming brings nothing back (the
    // children stay revoked).
    assert!(
        coll.find_one(doc! { "imsi": imsi(&c1) })
            .await
            .unwrap()
            .is_some()
    );
    dir.cli_ok(&["subscriber", "suspend", P1]);
    wait_doc(&coll, &c1, false).await;
    dir.cli_ok(&["subscriber", "resume", P1]);
    wait_metric(&srv, BACKLOG, |v| v == 0.0);
    assert_eq!(coll.count_documents(doc! {}).await.unwrap(), 0);
    // A new credential after the resume is synced again.
    let c4 = issue(&s, 5, &DeviceReq::new(4)).await;
    wait_doc(&coll, &c4, true).await;
    // Revoking the parent for good deletes it too.
    dir.cli_ok(&["subscriber", "revoke", P1]);
    wait_doc(&coll, &c4, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_down_and_back_and_kill_9_between_commit_and_push() {
    let Some(mut mongo) = mongo::MongoServer::start() else {
        return;
    };
    let (coll, _) = collections(&mongo.uri()).await;
    let dir = Dir::init(&sync_config(&mongo.uri()));
    dir.add_parent(P1, &["--max-children", "10"]);
    let token = dir.token();
    let mut srv = dir.serve();
    let s = connect(&srv, P1).await;
    let c1 = issue(&s, 1, &DeviceReq::new(1)).await;
    wait_doc(&coll, &c1, true).await;

    // The core's store goes down: changes are committed and kept, pushes fail and are retried.
    mongo.stop();
    let c2 = issue(&s, 2, &DeviceReq::new(2)).await;
    let (st, _) = srv.http(
        "POST",
        &format!("/api/v1/children/{c1}/revoke"),
        Some(&token),
        "",
    );
    assert_eq!(st, 200);
    wait_metric(&srv, PUSH_ERRORS, |v| v >= 2.0);
    wait_metric(&srv, BACKLOG, |v| v >= 2.0);
    // ...and back: the same process catches up.
    mongo.start_again();
    wait_doc(&coll, &c2, true).await;
    wait_doc(&coll, &c1, false).await;
    wait_metric(&srv, BACKLOG, |v| v == 0.0);

    // Down again; changes committed by the service; kill -9 before it could push them.
    mongo.stop();
    let c3 = issue(&s, 3, &DeviceReq::new(3)).await;
    let (st, _) = srv.http(
        "POST",
        &format!("/api/v1/children/{c2}/revoke"),
        Some(&token),
        "",
    );
    assert_eq!(st, 200);
    wait_metric(&srv, BACKLOG, |v| v >= 2.0);
    srv.kill9();
    drop(s);
    mongo.start_again();
    // Nothing pushed them: the core still has the old state.
    assert!(
        coll.find_one(doc! { "imsi": imsi(&c3) })
            .await
            .unwrap()
            .is_none()
    );
    assert!(
        coll.find_one(doc! { "imsi": imsi(&c2) })
            .await
            .unwrap()
            .is_some()
    );
    // The restarted service replays its outbox.
    let srv2 = dir.serve();
    wait_doc(&coll, &c3, true).await;
    wait_doc(&coll, &c2, false).await;
    wait_metric(&srv2, BACKLOG, |v| v == 0.0);
    assert_eq!(coll.count_documents(doc! {}).await.unwrap(), 1);
}

const ACTIVE: &str = "cn_backend_sync_pusher_active ";

/// Two instances with `[sync.open5gs]` on one store: exactly one pushes (holds the lease), never
/// both; when it is killed, the other takes over once the lease runs out and pushes what was
/// committed meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_push_one_at_a_time_and_the_other_takes_over() {
    let Some(mongo) = mongo::MongoServer::start() else {
        return;
    };
    let (coll, _) = collections(&mongo.uri()).await;
    let dir = Dir::init(&sync_config(&mongo.uri()));
    dir.add_parent(P1, &["--max-children", "10"]);
    // Two `serve` processes on the one data directory (and store).
    let mut servers = [dir.serve(), dir.serve()];
    let actives =
        |servers: &[Server]| -> Vec<f64> { servers.iter().map(|s| metric(s, ACTIVE)).collect() };
    let t0 = Instant::now();
    let pusher = loop {
        let v = actives(&servers);
        assert!(v[0] + v[1] <= 1.0, "both instances push at once: {v:?}");
        if v[0] + v[1] == 1.0 {
            break usize::from(v[1] == 1.0);
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "nobody took the lease"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let other = 1 - pusher;
    // A credential issued through the other instance is pushed by the pusher.
    let s = connect(&servers[other], P1).await;
    let c1 = issue(&s, 1, &DeviceReq::new(1)).await;
    wait_doc(&coll, &c1, true).await;
    for _ in 0..10 {
        let v = actives(&servers);
        assert_eq!(v[pusher] + v[other], 1.0, "pusher_active {v:?}");
        assert_eq!(
            v[pusher], 1.0,
            "the lease moved while its holder renews it: {v:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The pusher is killed: the other takes the lease when it runs out (10 s), then pushes.
    servers[pusher].kill9();
    let killed_at = Instant::now();
    let c2 = issue(&s, 2, &DeviceReq::new(2)).await;
    wait_metric(&servers[other], ACTIVE, |v| v == 1.0);
    let took_over = killed_at.elapsed();
    wait_doc(&coll, &c2, true).await;
    eprintln!(
        "pusher lease: the other instance took over {took_over:?} after the pusher was killed"
    );
    assert!(
        took_over >= Duration::from_secs(5),
        "lease taken over before it ran out: {took_over:?}"
    );
}
