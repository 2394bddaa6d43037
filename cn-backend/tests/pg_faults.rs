//! PostgreSQL faults (issue 16, item 5), each on a server of this test's own (it is stopped and
//! reconfigured): a restart during a run of batches, and a database unreachable at start, a
//! wrong password or a schema newer than the binary.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;
mod pg;

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::*;
use companion_proto::msg::{BatchProvision, ErrorCode, Outcome};

const P1: &str = "imsi-001010000000001";

fn private_server() -> Option<pg::PgServer> {
    // The shared server's rule: missing binaries fail in CI, else skip.
    pg::server()?;
    Some(pg::PgServer::start_private().unwrap())
}

/// PostgreSQL stopped (`pg_ctl stop -m fast`) for 2 s during a run of batches, then started
/// again: meanwhile cn-backend answers `busy` with `retry_after_ms`, it reconnects by itself,
/// and every credential it acknowledged is in the database afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restart_during_batches() {
    let Some(srv) = tokio::task::block_in_place(private_server) else {
        return;
    };
    let srv = Arc::new(srv);
    let url = tokio::task::block_in_place(|| srv.create_db());
    let dir = tokio::task::block_in_place(|| {
        let d = Dir::init_store(&url);
        d.add_parent(P1, &["--max-children", "100000"]);
        d
    });
    let server = dir.serve();
    let s = connect(&server, P1).await;

    let restarted = Arc::new(AtomicBool::new(false));
    let (stop_at, start_at) = (Duration::from_millis(1500), Duration::from_millis(3500));
    let t0 = Instant::now();
    let fault = {
        let (srv, restarted) = (srv.clone(), restarted.clone());
        std::thread::spawn(move || {
            std::thread::sleep(stop_at);
            let stopped = t0.elapsed();
            srv.stop_fast();
            std::thread::sleep(start_at.saturating_sub(t0.elapsed()));
            srv.start_again();
            let started = t0.elapsed();
            restarted.store(true, Ordering::SeqCst);
            (stopped, started)
        })
    };

    let mut acknowledged: Vec<String> = Vec::new();
    let (mut busy, mut other_errors, mut batches) = (0u32, Vec::new(), 0u64);
    let mut first_ok_after_restart = None;
    let mut n = 0u64;
    loop {
        let done_after = restarted.load(Ordering::SeqCst);
        let reqs: Vec<DeviceReq> = (0..8)
            .map(|_| {
                n += 1;
                DeviceReq::new(n)
            })
            .collect();
        let b = BatchProvision {
            batch_id: n,
            items: reqs.iter().map(DeviceReq::item).collect(),
        };
        // The same batch until it is answered, as a gateway does.
        let r = loop {
            match s.batch(b.clone()).await {
                Ok(r) => break r,
                Err(e) if e.code() == Some(ErrorCode::Busy) => {
                    busy += 1;
                    let wait = e.retry_after().expect("busy carries retry_after_ms");
                    assert!(wait <= Duration::from_secs(5), "{wait:?}");
                    tokio::time::sleep(wait.min(Duration::from_millis(200))).await;
                }
                Err(e) => {
                    other_errors.push(e.to_string());
                    assert!(other_errors.len() < 20, "{other_errors:?}");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
            assert!(t0.elapsed() < Duration::from_secs(60), "no recovery");
        };
        batches += 1;
        for (q, it) in reqs.iter().zip(&r.items) {
            assert_eq!(it.outcome, Outcome::Issued, "{:?}", it.reason);
            q.open(it);
            acknowledged.push(it.supi.as_ref().unwrap().as_str().to_owned());
        }
        if restarted.load(Ordering::SeqCst) && first_ok_after_restart.is_none() {
            first_ok_after_restart = Some(t0.elapsed());
        }
        if done_after && t0.elapsed() > start_at + Duration::from_secs(1) {
            break;
        }
    }
    let (stopped, started) = fault.join().unwrap();
    let recovered = first_ok_after_restart.unwrap();

    let in_db: HashSet<String> = tokio::task::block_in_place(|| {
        srv.client(&url)
            .query(
                "SELECT supi FROM children WHERE parent_supi = $1 AND status = 'active'",
                &[&P1],
            )
            .unwrap()
            .iter()
            .map(|r| r.get::<_, String>(0))
            .collect()
    });
    let lost = acknowledged.iter().filter(|s| !in_db.contains(*s)).count();
    let unique: HashSet<_> = acknowledged.iter().collect();
    eprintln!(
        "PostgreSQL restart: stopped at {stopped:.1?}, started at {started:.1?}; {batches} batches \
         ({} credentials) acknowledged, {busy} busy answers meanwhile, other errors {:?}; first \
         batch answered {:.1?} after the start; {} in the database, {lost} acknowledged but lost",
        acknowledged.len(),
        other_errors,
        recovered.saturating_sub(started),
        in_db.len()
    );
    assert!(busy > 0, "no busy answer while PostgreSQL was down");
    assert!(other_errors.is_empty(), "{other_errors:?}");
    assert_eq!(lost, 0);
    assert_eq!(unique.len(), acknowledged.len());
    assert_eq!(in_db.len(), acknowledged.len(), "nothing issued twice");
    assert!(recovered.saturating_sub(started) < Duration::from_secs(5));
}

/// The database unreachable at start, a wrong password, a schema newer than the binary: each
/// time `serve` exits non-zero with one line saying what happened and what to do.
#[test]
fn startup_failures_are_one_clear_line() {
    let Some(srv) = private_server() else { return };
    let url = srv.create_db();
    let dir = Dir::init_store(&url);

    // Unreachable: no server behind the socket directory.
    let (line, took) = dir.serve_fails(
        Some("postgres://postgres@/cn?host=/nonexistent-cn-pg"),
        None,
    );
    eprintln!("unreachable ({took:.1?}): {line}");
    assert!(line.contains("cannot connect to PostgreSQL"), "{line}");
    assert!(line.contains("check that the server is running"), "{line}");

    // Wrong password: a role with a password, password authentication for it.
    srv.client(&url)
        .batch_execute("CREATE ROLE cnpw LOGIN SUPERUSER PASSWORD 'right'")
        .unwrap();
    srv.set_hba("local all cnpw scram-sha-256\nlocal all all trust\n");
    let pw_url = url.replace("postgres://postgres@", "postgres://cnpw@");
    let (line, took) = dir.serve_fails(Some(&pw_url), Some(("PGPASSWORD", "wrong")));
    eprintln!("wrong password ({took:.1?}): {line}");
    assert!(line.contains("PostgreSQL refused the login"), "{line}");
    assert!(line.contains("password"), "{line}");

    // A schema newer than this binary.
    srv.client(&url)
        .batch_execute("UPDATE schema_version SET version = 99")
        .unwrap();
    let (line, took) = dir.serve_fails(None, None);
    eprintln!("newer schema ({took:.1?}): {line}");
    assert!(line.contains("schema version 99 is newer"), "{line}");
    assert!(line.contains("run the cn-backend release"), "{line}");
}
