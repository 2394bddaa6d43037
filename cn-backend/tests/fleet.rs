//! Several real `cn-backend` processes over one PostgreSQL database (issue 16, item 3): the
//! quota, the SQN reservation, idempotent batches and administrative changes hold across
//! instances, and an instance with another KEK refuses to start. The server is the throwaway
//! PostgreSQL of `tests/pg`; every instance runs from its own copy of one data directory (the
//! same configuration, KEK, operator CA and OP, as a fleet's hosts have).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;
mod pg;

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use common::*;
use companion_proto::msg::{BatchProvision, BatchResult, ErrorCode, Outcome};
use companion_transport::attach_client::attach;
use companion_transport::cn_client::CnSession;

const P1: &str = "imsi-001010000000001";
const P2: &str = "imsi-001010000000002";

/// A fleet: the database URL, one data directory per instance, the running instances.
struct Fleet {
    url: String,
    dirs: Vec<Dir>,
    servers: Vec<Server>,
}

/// `cn-backend init --store URL` on a new database, `setup` (adds subscribers through the CLI),
/// then `n` instances, each from its own copy of the directory.
fn fleet(srv: &pg::PgServer, n: usize, setup: impl FnOnce(&Dir)) -> Fleet {
    let url = srv.create_db();
    let first = Dir::init_store(&url);
    setup(&first);
    let mut dirs = vec![first];
    for _ in 1..n {
        dirs.push(dirs[0].copy());
    }
    let servers = dirs.iter().map(Dir::serve).collect();
    Fleet { url, dirs, servers }
}

fn batch(id: u64, reqs: &[DeviceReq]) -> BatchProvision {
    BatchProvision {
        batch_id: id,
        items: reqs.iter().map(DeviceReq::item).collect(),
    }
}

/// Sends a batch, retrying (same batch, same idempotency keys) while the answer is retryable.
async fn send(s: &CnSession, b: &BatchProvision) -> BatchResult {
    let t0 = Instant::now();
    loop {
        match s.batch(b.clone()).await {
            Ok(r) => return r,
            Err(e) if e.is_retryable() && t0.elapsed() < Duration::from_secs(120) => {
                let wait = e.retry_after().unwrap_or(Duration::from_millis(50));
                tokio::time::sleep(wait.min(Duration::from_millis(500))).await;
            }
            Err(e) => panic!("batch {}: {e}", b.batch_id),
        }
    }
}

/// One number from the database.
fn db_count(srv: &pg::PgServer, url: &str, sql: &str, supi: &str) -> i64 {
    tokio::task::block_in_place(|| {
        srv.client(url)
            .query_one(sql, &[&supi])
            .unwrap()
            .get::<_, i64>(0)
    })
}

fn active_children(srv: &pg::PgServer, url: &str, parent: &str) -> i64 {
    db_count(
        srv,
        url,
        "SELECT count(*) FROM children WHERE parent_supi = $1 AND status = 'active' \
         AND expires_at > extract(epoch FROM now())::bigint",
        parent,
    )
}

/// 10,000 provisioning requests, in 100 batches over 3 instances × 2 gateway sessions, race for
/// the last 5 slots of a quota of 20: exactly 5 are issued and the database holds 20 live
/// children afterwards (0 overruns).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quota_never_exceeded_across_instances() {
    const QUOTA: i64 = 20;
    const FIRST: u64 = 15;
    const BATCHES: u64 = 100;
    const PER_BATCH: u64 = 100;
    let Some(srv) = tokio::task::block_in_place(pg::server) else {
        return;
    };
    let f = tokio::task::block_in_place(|| {
        fleet(srv, 3, |d| d.add_parent(P1, &["--max-children", "20"]))
    });
    let mut sessions = Vec::new();
    for s in &f.servers {
        for _ in 0..2 {
            sessions.push(connect(s, P1).await);
        }
    }
    let first: Vec<DeviceReq> = (0..FIRST).map(DeviceReq::new).collect();
    let r = send(&sessions[0], &batch(1, &first)).await;
    assert!(r.items.iter().all(|i| i.outcome == Outcome::Issued));

    // Signed items first (the device side's work), then every batch at once.
    let batches: Vec<BatchProvision> = tokio::task::block_in_place(|| {
        (0..BATCHES)
            .map(|b| {
                let reqs: Vec<DeviceReq> = (0..PER_BATCH)
                    .map(|i| DeviceReq::new(100_000 + b * PER_BATCH + i))
                    .collect();
                batch(100 + b, &reqs)
            })
            .collect()
    });
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for (i, b) in batches.into_iter().enumerate() {
        let s = sessions[i % sessions.len()].clone();
        tasks.push(tokio::spawn(async move { send(&s, &b).await }));
    }
    let (mut issued, mut refused) = (Vec::new(), 0u64);
    for t in tasks {
        for it in t.await.unwrap().items {
            match it.outcome {
                Outcome::Issued => issued.push(it.supi.unwrap().as_str().to_owned()),
                Outcome::QuotaExhausted => refused += 1,
                o => panic!("unexpected outcome {o:?}: {:?}", it.reason),
            }
        }
    }
    let elapsed = t0.elapsed();
    let in_db = active_children(srv, &f.url, P1);
    let counter = db_count(
        srv,
        &f.url,
        "SELECT live_children FROM parents WHERE supi = $1",
        P1,
    );
    let overruns = (in_db - QUOTA).max(0);
    eprintln!(
        "fleet quota: {} requests over {} instances in {elapsed:.1?}: issued {}, refused {refused}; \
         live children in the database {in_db} (counter {counter}) of a quota of {QUOTA}: \
         {overruns} overruns",
        BATCHES * PER_BATCH,
        f.servers.len(),
        issued.len()
    );
    assert_eq!(issued.len() as u64, QUOTA as u64 - FIRST);
    assert_eq!(refused, BATCHES * PER_BATCH - (QUOTA as u64 - FIRST));
    assert_eq!(in_db, QUOTA);
    assert_eq!(overruns, 0);
    assert_eq!(counter, QUOTA);
    assert_eq!(issued.iter().collect::<HashSet<_>>().len(), issued.len());
}

/// AKA SQN reservation across instances: 12 clients (each from its own /24, so no vector is
/// offered again) authenticate 10 times each, against 3 instances at once, as a device (attach)
/// and as the companion (gateway session). Each authentication starts from a fresh USIM, which
/// records the SEQ it accepted: no SEQ may appear twice for one subscriber.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqn_never_handed_out_twice_across_instances() {
    const CLIENTS: usize = 12;
    const ROUNDS: usize = 10;
    let Some(srv) = tokio::task::block_in_place(pg::server) else {
        return;
    };
    let f = tokio::task::block_in_place(|| {
        fleet(srv, 3, |d| d.add_parent(P1, &["--max-children", "5"]))
    });
    let s = connect(&f.servers[0], P1).await;
    let dev = DeviceReq::new(1);
    let r = send(&s, &batch(1, std::slice::from_ref(&dev))).await;
    let bundle = dev.open(&r.items[0]);
    s.close();

    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..CLIENTS {
        let target = f.servers[c % f.servers.len()].target(HOME_SNN);
        let bundle = bundle.clone();
        tasks.push(tokio::spawn(async move {
            let ep = client_endpoint_at(&format!("127.0.{}.1", c + 1));
            let mut seqs = Vec::new();
            for _ in 0..ROUNDS {
                if c % 2 == 0 {
                    let mut u = device_usim(&bundle);
                    attach(&ep, &target, &mut u).await.unwrap();
                    seqs.push(("device", u.sqn_state().highest_seq()));
                } else {
                    let mut u = parent_usim(P1);
                    let (s, _) = CnSession::connect(&ep, &target, &mut u).await.unwrap();
                    s.close();
                    seqs.push(("companion", u.sqn_state().highest_seq()));
                }
            }
            seqs
        }));
    }
    let mut by_subscriber: HashMap<&str, Vec<u64>> = HashMap::new();
    for t in tasks {
        for (who, seq) in t.await.unwrap() {
            by_subscriber.entry(who).or_default().push(seq);
        }
    }
    let elapsed = t0.elapsed();
    let mut duplicates = 0;
    for seqs in by_subscriber.values() {
        let unique: HashSet<_> = seqs.iter().collect();
        duplicates += seqs.len() - unique.len();
    }
    eprintln!(
        "fleet SQN: {} authentications over {} instances in {elapsed:.1?}: {duplicates} SQNs \
         handed out twice",
        CLIENTS * ROUNDS,
        f.servers.len()
    );
    assert_eq!(
        by_subscriber.values().map(Vec::len).sum::<usize>(),
        CLIENTS * ROUNDS
    );
    assert_eq!(duplicates, 0);
}

/// A batch retried on another instance with the same idempotency keys gets the same sealed
/// answer, byte for byte; the same batch sent to two instances at once too; and nothing is
/// issued twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_retried_on_another_instance_gets_the_same_answer() {
    let Some(srv) = tokio::task::block_in_place(pg::server) else {
        return;
    };
    let f = tokio::task::block_in_place(|| {
        fleet(srv, 2, |d| d.add_parent(P1, &["--max-children", "50"]))
    });
    let s0 = connect(&f.servers[0], P1).await;
    let s1 = connect(&f.servers[1], P1).await;
    let same = |a: &BatchResult, b: &BatchResult| {
        assert_eq!(a.items.len(), b.items.len());
        for (x, y) in a.items.iter().zip(&b.items) {
            assert_eq!(x.outcome, Outcome::Issued, "{:?}", x.reason);
            assert_eq!(y.outcome, Outcome::Issued, "{:?}", y.reason);
            assert_eq!(x.supi, y.supi);
            let (sx, sy) = (x.sealed.as_ref().unwrap(), y.sealed.as_ref().unwrap());
            assert_eq!(sx.enc, sy.enc);
            assert_eq!(sx.ciphertext, sy.ciphertext);
        }
    };
    // Retried on the other instance after the first answered (e.g. the answer was lost).
    let reqs: Vec<DeviceReq> = (0..8).map(DeviceReq::new).collect();
    let b = batch(1, &reqs);
    let first = send(&s0, &b).await;
    let retried = send(&s1, &b).await;
    same(&first, &retried);
    for (q, it) in reqs.iter().zip(&retried.items) {
        q.open(it);
    }
    // Sent to both at once (a gateway failing over while the first is still working).
    let reqs: Vec<DeviceReq> = (100..108).map(DeviceReq::new).collect();
    let b = batch(2, &reqs);
    let (a, c) = tokio::join!(send(&s0, &b), send(&s1, &b));
    same(&a, &c);

    let children = db_count(
        srv,
        &f.url,
        "SELECT count(*) FROM children WHERE parent_supi = $1",
        P1,
    );
    let ledger = db_count(
        srv,
        &f.url,
        "SELECT count(*) FROM issuances WHERE parent_supi = $1",
        P1,
    );
    let audited = db_count(
        srv,
        &f.url,
        "SELECT count(*) FROM audit WHERE parent_supi = $1 AND action = 'issue'",
        P1,
    );
    eprintln!(
        "fleet idempotency: 2 × 8 requests each answered by 2 instances: {children} children, \
         {ledger} ledger entries, {audited} issue audit entries"
    );
    assert_eq!((children, ledger, audited), (16, 16, 16));
}

/// Suspend, revoke and policy changes made through instance 1 (its admin API and its host's
/// CLI) hold at the next attach or batch through instance 2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_changes_hold_on_every_instance() {
    let Some(srv) = tokio::task::block_in_place(pg::server) else {
        return;
    };
    let f = tokio::task::block_in_place(|| {
        fleet(srv, 2, |d| {
            d.add_parent(P1, &["--max-children", "10"]);
            d.add_parent(P2, &["--max-children", "10"]);
        })
    });
    let (one, two) = (&f.servers[0], &f.servers[1]);
    let token = f.dirs[0].token();
    let ep = client_endpoint();
    let s1 = connect(one, P1).await;
    let s2 = connect(one, P2).await;
    let reqs: Vec<DeviceReq> = (0..3).map(DeviceReq::new).collect();
    let r = send(&s1, &batch(1, &reqs)).await;
    let b: Vec<_> = reqs.iter().zip(&r.items).map(|(q, i)| q.open(i)).collect();
    let d = DeviceReq::new(10);
    let r = send(&s2, &batch(2, std::slice::from_ref(&d))).await;
    let bd = d.open(&r.items[0]);
    let mut u: Vec<_> = b.iter().map(device_usim).collect();
    let mut ud = device_usim(&bd);
    // Everything attaches through instance 2 first.
    for u in u.iter_mut().chain([&mut ud]) {
        attach(&ep, &two.target(HOME_SNN), u).await.unwrap();
    }

    // A child revoked through instance 1's admin API.
    let (st, v) = tokio::task::block_in_place(|| {
        one.http_json(
            "POST",
            &format!("/api/v1/children/{}/revoke", b[1].supi.as_str()),
            Some(&token),
            "",
        )
    });
    assert_eq!((st, v["revoked"].as_bool()), (200, Some(true)), "{v}");
    let err = attach(&ep, &two.target(HOME_SNN), &mut u[1])
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::CredentialRevoked), "{err}");

    // A policy change through instance 1's host's CLI: 2 live children, quota lowered to 2.
    f.dirs[0].cli_ok(&["subscriber", "policy", P1, "--max-children", "2"]);
    let s1b = connect(two, P1).await;
    let r = send(&s1b, &batch(3, &[DeviceReq::new(20)])).await;
    assert_eq!(r.items[0].outcome, Outcome::QuotaExhausted);

    // The companion suspended through instance 1's admin API: its children no longer attach
    // and its batches are refused through instance 2.
    let (st, v) = tokio::task::block_in_place(|| {
        one.http_json(
            "POST",
            &format!("/api/v1/subscribers/{P1}/suspend"),
            Some(&token),
            "",
        )
    });
    assert_eq!((st, v["to"].as_str()), (200, Some("suspended")), "{v}");
    let err = attach(&ep, &two.target(HOME_SNN), &mut u[0])
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::CredentialRevoked), "{err}");
    let err = s1b
        .batch(batch(4, &[DeviceReq::new(21)]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::SubscriptionSuspended), "{err}");

    // The other companion revoked through instance 1's host's CLI.
    f.dirs[0].cli_ok(&["subscriber", "revoke", P2]);
    let err = attach(&ep, &two.target(HOME_SNN), &mut ud)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::CredentialRevoked), "{err}");
}

/// A copy of the data directory with another KEK refuses to start against the database: a
/// non-zero exit and one line on stderr naming the KEK; the database is left as it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instance_with_another_kek_refuses_to_start() {
    let Some(srv) = tokio::task::block_in_place(pg::server) else {
        return;
    };
    let f = tokio::task::block_in_place(|| {
        fleet(srv, 1, |d| d.add_parent(P1, &["--max-children", "5"]))
    });
    let other = f.dirs[0].copy();
    let kek = other.path().join("kek.key");
    std::fs::remove_file(&kek).unwrap();
    cn_backend::kek::Kek::init(&kek).unwrap();
    let (line, took) = tokio::task::block_in_place(|| other.serve_fails(None, None));
    eprintln!("fleet KEK: another KEK exits after {took:.1?}: {line}");
    assert!(
        line.contains("KEK does not match") && line.contains("kek.key"),
        "{line}"
    );
    // The CLI refuses too; the first instance still serves.
    let (ok, _, err) = other.cli(&["subscriber", "list"]);
    assert!(!ok && err.contains("KEK"), "{err}");
    let s = connect(&f.servers[0], P1).await;
    let dev = DeviceReq::new(1);
    let r = send(&s, &batch(1, std::slice::from_ref(&dev))).await;
    assert_eq!(r.items[0].outcome, Outcome::Issued);
}
