//! PostgreSQL high availability as docs/OPERATIONS.md ("Running a fleet") describes it, with
//! real servers: a primary and a hot standby under synchronous streaming replication, a store
//! URL that lists both hosts with `target_session_attrs=read-write`, and a failover (the primary
//! crashes, the standby is promoted) while a real `cn-backend serve` keeps answering a gateway.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;
mod pg;

use std::time::{Duration, Instant};

use common::*;
use companion_proto::msg::{BatchProvision, Outcome};
use companion_transport::cn_client::CnSession;

const P1: &str = "imsi-001010000000001";

/// Provisions `reqs` in one batch, again and again (as a gateway does with items answered
/// "retry later", or when its session broke) until every item is issued or `deadline` passes.
/// Returns the issued SUPIs and how many attempts it took.
async fn provision_until_issued(
    srv: &Server,
    session: &mut CnSession,
    first_batch_id: u64,
    reqs: &[DeviceReq],
    deadline: Duration,
) -> (Vec<String>, u32) {
    let t0 = Instant::now();
    let mut attempts = 0;
    loop {
        attempts += 1;
        let batch = BatchProvision {
            batch_id: first_batch_id + u64::from(attempts),
            items: reqs.iter().map(DeviceReq::item).collect(),
        };
        match session.batch(batch).await {
            Ok(r) if r.items.iter().all(|i| i.outcome == Outcome::Issued) => {
                let supis = r
                    .items
                    .iter()
                    .map(|i| i.supi.as_ref().unwrap().as_str().to_owned())
                    .collect();
                return (supis, attempts);
            }
            Ok(_) => {}
            Err(_) => {
                // The CN answered with an error or the session broke: a new session, as gatewayd
                // reconnects its slot.
                let mut u = parent_usim(P1);
                if let Ok((s, _)) =
                    CnSession::connect(&client_endpoint(), &srv.target(HOME_SNN), &mut u).await
                {
                    *session = s;
                }
            }
        }
        assert!(
            t0.elapsed() < deadline,
            "items not issued {deadline:?} after the failover ({attempts} attempts): {}",
            srv.log_text()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn children(db: &mut postgres::Client) -> Vec<String> {
    db.query("SELECT supi FROM children ORDER BY supi", &[])
        .unwrap()
        .iter()
        .map(|r| r.get::<_, String>(0))
        .collect()
}

#[test]
fn failover_to_a_synchronous_standby_loses_no_acknowledged_credential() {
    // The synchronous PostgreSQL client (for the checks) runs outside the runtime that drives
    // the gateway's session.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let Some(primary) = pg::PgServer::start_own() else {
        return;
    };
    primary.admin_sql("CREATE DATABASE cn");
    let standby = primary.start_standby().unwrap();
    primary.admin_sql("ALTER SYSTEM SET synchronous_standby_names = 'standby'");
    primary.admin_sql("SELECT pg_reload_conf()");
    let t0 = Instant::now();
    loop {
        let rows = primary.admin_sql("SELECT sync_state::text FROM pg_stat_replication");
        if rows.iter().any(|r| r.get::<_, String>(0) == "sync") {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "the standby never became synchronous"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // The standby first in the list: the driver skips it (read-only) and writes to the primary.
    // (Socket directories are listed by repeating `host=`; TCP hosts go in the authority,
    // `postgres://user@db1,db2/cn`.)
    let url = format!(
        "postgres://postgres@/cn?host={}&host={}&target_session_attrs=read-write",
        standby.socket_dir().display(),
        primary.socket_dir().display()
    );
    let dir = Dir::init_store(&url);
    dir.add_parent(P1, &["--max-children", "1000"]);
    let srv = dir.serve();
    let mut session = rt.block_on(connect(&srv, P1));

    let before: Vec<DeviceReq> = (0..20).map(DeviceReq::new).collect();
    let (issued_before, attempts) = rt.block_on(provision_until_issued(
        &srv,
        &mut session,
        1000,
        &before,
        Duration::from_secs(30),
    ));
    assert_eq!(attempts, 1, "the healthy cluster refused items");

    // The failover: the primary crashes, the standby is promoted.
    primary.crash();
    let t_fail = Instant::now();
    standby.promote();
    let promoted_after = t_fail.elapsed();

    // Everything the CN acknowledged is on the new primary.
    let mut db = standby.client(&url);
    let on_new_primary = children(&mut db);
    for s in &issued_before {
        assert!(
            on_new_primary.contains(s),
            "acknowledged credential {s} lost in the failover"
        );
    }

    // The same cn-backend process carries on against the new primary by itself.
    let after: Vec<DeviceReq> = (100..120).map(DeviceReq::new).collect();
    let (issued_after, attempts) = rt.block_on(provision_until_issued(
        &srv,
        &mut session,
        2000,
        &after,
        Duration::from_secs(60),
    ));
    let recovered_after = t_fail.elapsed();
    eprintln!(
        "failover: standby promoted in {promoted_after:?}; {} credentials acknowledged before it \
         all on the new primary; the next batch issued {recovered_after:?} after the crash, on \
         attempt {attempts}",
        issued_before.len()
    );

    // Nothing issued twice: one child per device, across the retries.
    let all = children(&mut db);
    assert_eq!(
        all.len(),
        issued_before.len() + issued_after.len(),
        "children on the new primary: {all:?}"
    );
    let parent_rows = db
        .query(
            "SELECT count(*) FROM children WHERE parent_supi = $1",
            &[&P1],
        )
        .unwrap();
    assert_eq!(parent_rows[0].get::<_, i64>(0), 40);
}
