//! The conformance suite against the PostgreSQL engine on a real server (started by
//! `tests/pg`), the same list as `tests/sqlite.rs`, plus PostgreSQL-specific checks and one run
//! of the real binary on PostgreSQL.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;
mod conformance;
mod pg;

use cn_backend::kek::Kek;
use cn_backend::ops::{self, BatchItem, ItemOutcome};
use cn_backend::store::{PgConfig, PgStore, Store, StoreError};
use conformance::*;

const KEK: [u8; 32] = [0x5a; 32];

fn latest() -> u32 {
    cn_backend::store::pg_migrations::latest_version()
}

fn open(url: &str) -> PgStore {
    PgStore::open_url(url, Kek::from_bytes(&KEK)).unwrap()
}

macro_rules! conformance_tests {
    ($($name:ident),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                let Some(srv) = pg::server() else { return };
                let store = open(&srv.create_db());
                conformance::$name(&store);
            }
        )*
    };
}

conformance::all_tests!(conformance_tests);

#[test]
fn schema_version_and_append_only_audit() {
    let Some(srv) = pg::server() else { return };
    let url = srv.create_db();
    let store = open(&url);
    assert_eq!(store.schema_version().unwrap(), latest());
    add_parent(&store, 1, 1);
    let mut c = srv.client(&url);
    let upd = c.execute("UPDATE audit SET actor = 'mallory'", &[]);
    assert!(format!("{:?}", upd.unwrap_err()).contains("append-only"));
    let del = c.execute("DELETE FROM audit", &[]);
    assert!(format!("{:?}", del.unwrap_err()).contains("append-only"));
    let n: i64 = c
        .query_one("SELECT count(*) FROM audit", &[])
        .unwrap()
        .get(0);
    assert_eq!(n, 1);
}

#[test]
fn secrets_are_encrypted_and_bound_to_their_row() {
    let Some(srv) = pg::server() else { return };
    let url = srv.create_db();
    let store = open(&url);
    let a = add_parent(&store, 1, 1);
    let b = add_parent(&store, 2, 1);
    let mut c = srv.client(&url);
    let k_enc: Vec<u8> = c
        .query_one("SELECT k_enc FROM parents WHERE supi = $1", &[&a.as_str()])
        .unwrap()
        .get(0);
    assert!(
        !k_enc.windows(16).any(|w| w == [1u8; 16]),
        "K stored in clear"
    );
    c.execute(
        "UPDATE parents SET k_enc = $1 WHERE supi = $2",
        &[&k_enc, &b.as_str()],
    )
    .unwrap();
    assert!(matches!(
        ops::aka_vector(&store, &b),
        Err(StoreError::Kek(_))
    ));
    assert!(ops::aka_vector(&store, &a).is_ok());
}

#[test]
fn reopen_keeps_data_and_checks_kek() {
    let Some(srv) = pg::server() else { return };
    let url = srv.create_db();
    let store = reopen_keeps_issued(|| open(&url));
    drop(store);
    let wrong = PgStore::open_url(&url, Kek::from_bytes(&[1; 32]));
    assert!(matches!(wrong, Err(StoreError::WrongKek)));
}

#[test]
fn newer_schema_is_refused() {
    let Some(srv) = pg::server() else { return };
    let url = srv.create_db();
    drop(open(&url));
    srv.client(&url)
        .execute("UPDATE schema_version SET version = 99", &[])
        .unwrap();
    let r = PgStore::open_url(&url, Kek::from_bytes(&KEK));
    assert!(
        matches!(&r, Err(StoreError::Schema(m)) if m.contains("newer")),
        "{r:?}"
    );
}

/// Several processes' worth of stores starting at once on an empty database: the advisory lock
/// lets exactly one apply each migration, and every store opens.
#[test]
fn concurrent_first_open_migrates_once() {
    let Some(srv) = pg::server() else { return };
    let url = srv.create_db();
    std::thread::scope(|s| {
        let hs: Vec<_> = (0..4).map(|_| s.spawn(|| open(&url))).collect();
        for h in hs {
            assert_eq!(h.join().unwrap().schema_version().unwrap(), latest());
        }
    });
    let n: i64 = srv
        .client(&url)
        .query_one("SELECT count(*) FROM schema_version", &[])
        .unwrap()
        .get(0);
    assert_eq!(n, 1);
}

/// Two stores (two processes' connections) racing for one parent's quota.
#[test]
fn separate_stores_respect_quota() {
    let Some(srv) = pg::server() else { return };
    let url = srv.create_db();
    let stores = [open(&url), open(&url), open(&url)];
    let (p, outcomes) = race_for_quota(&stores);
    let issued = outcomes
        .iter()
        .filter(|o| matches!(o, ItemOutcome::Issued { .. }))
        .count();
    assert_eq!(issued, 10);
    assert_eq!(stores[1].count_active_children(&p, T0).unwrap(), 10);
}

#[test]
fn unreachable_server_and_bad_urls_are_one_clear_error() {
    let r = PgStore::open_url(
        "postgres://cn@/cn?host=/nonexistent-cn-pg-dir",
        Kek::from_bytes(&KEK),
    );
    let e = r.unwrap_err().to_string();
    assert!(e.contains("cannot connect to PostgreSQL"), "{e}");
    assert!(!e.contains('\n'), "{e}");
    // Plain TCP to a remote host is refused before connecting; verify-full needs a CA.
    let e = PgConfig::from_url("postgres://cn@db.example.net/cn").unwrap_err();
    assert!(e.to_string().contains("sslmode=verify-full"), "{e}");
    let e = PgConfig::from_url("postgres://cn@db.example.net/cn?sslmode=verify-full").unwrap_err();
    assert!(e.to_string().contains("sslrootcert"), "{e}");
    let e = PgConfig::from_url("postgres://cn@db.example.net/cn?sslmode=require").unwrap_err();
    assert!(e.to_string().contains("not supported"), "{e}");
    assert!(PgConfig::from_url("postgres://cn@127.0.0.1/cn").is_ok());
    assert!(PgConfig::from_url("postgres://cn@/cn?host=/run/postgresql").is_ok());
    assert!(
        PgConfig::from_url(
            "postgres://cn@db.example.net/cn?sslmode=verify-full&sslrootcert=/etc/ca.pem"
        )
        .is_ok()
    );
}

#[test]
fn unknown_role_is_one_clear_error() {
    let Some(srv) = pg::server() else { return };
    let url = srv
        .create_db()
        .replace("postgres://postgres@", "postgres://nosuchrole@");
    let e = PgStore::open_url(&url, Kek::from_bytes(&KEK))
        .unwrap_err()
        .to_string();
    assert!(e.contains("nosuchrole"), "{e}");
    assert!(!e.contains('\n'), "{e}");
}

/// The real binary on PostgreSQL: `init --store`, `subscriber add`, `serve`, one gateway
/// session issuing a batch, then `subscriber show` lists the child; import, list, policy,
/// suspend/resume/revoke, the attestation roots and the audit trail work on it; a second data
/// directory (another KEK) is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_runs_on_postgres() {
    use common::*;
    use companion_proto::msg::{BatchProvision, Outcome};
    const P1: &str = "imsi-001010000000001";

    // The synchronous client runs its own runtime: not on this test's async worker.
    let Some(srv) = tokio::task::block_in_place(pg::server) else {
        return;
    };
    let url = tokio::task::block_in_place(|| srv.create_db());
    let dir = Dir::init_store(&url);
    assert!(!dir.path().join("cn-backend.db").exists());
    let toml = std::fs::read_to_string(dir.path().join("cn-backend.toml")).unwrap();
    assert!(toml.contains("[store]") && toml.contains(&url), "{toml}");
    // From here on the configuration names the database.
    dir.add_parent(P1, &["--max-children", "5"]);
    let server = dir.serve();
    let s = connect(&server, P1).await;
    let dev = DeviceReq::new(1);
    let r = s
        .batch(BatchProvision {
            batch_id: 1,
            items: vec![dev.item()],
        })
        .await
        .unwrap();
    let item = r.items.into_iter().next().unwrap();
    assert_eq!(item.outcome, Outcome::Issued, "{:?}", item.reason);
    let bundle = dev.open(&item);
    drop(s);
    drop(server);
    let show = dir.cli_json(&["subscriber", "show", P1]);
    let text = show.to_string();
    assert!(
        text.contains(bundle.supi.as_str()),
        "child {} not in {text}",
        bundle.supi.as_str()
    );
    assert!(!dir.path().join("cn-backend.db").exists());
    // The rest of the CLI on the same database: import, list, policy, lifecycle, roots, audit.
    const P2: &str = "imsi-001010000000002";
    let csv = dir.tmp.path().join("p.csv");
    std::fs::write(
        &csv,
        format!(
            "supi,k,opc,amf,sqn,max_children,max_lifetime_s,roaming,dnns\n\
             {P2},{K},{OPC},8000,0,5,86400,false,internet\n"
        ),
    )
    .unwrap();
    assert_eq!(
        dir.cli_json(&["subscriber", "import", path_str(&csv)])["imported"],
        1
    );
    let list = dir.cli_json(&["subscriber", "list"]);
    assert_eq!(list.as_array().unwrap().len(), 2, "{list}");
    dir.cli_ok(&["subscriber", "policy", P2, "--max-children", "7"]);
    let shown = dir.cli_json(&["subscriber", "show", P2]).to_string();
    assert!(shown.contains("\"max_children\":7"), "{shown}");
    dir.cli_ok(&["subscriber", "suspend", P2]);
    dir.cli_ok(&["subscriber", "resume", P2]);
    dir.cli_ok(&["subscriber", "revoke", P2]);
    let (ok, _, err) = dir.cli(&["subscriber", "resume", P2]);
    assert!(!ok && err.contains("cannot change status"), "{err}");
    let root = dir.tmp.path().join("acme.pem");
    std::fs::write(
        &root,
        companion_transport::ManufacturerCa::generate("Acme devices")
            .unwrap()
            .cert_pem(),
    )
    .unwrap();
    dir.cli_ok(&["attestation", "add-root", "--name", "acme", path_str(&root)]);
    let roots = dir.cli_json(&["attestation", "list-roots"]);
    assert_eq!(roots[0]["name"], "acme", "{roots}");
    dir.cli_ok(&["attestation", "remove-root", "acme"]);
    assert_eq!(
        dir.cli_json(&["attestation", "list-roots"]),
        serde_json::json!([])
    );
    let audit = dir.cli_ok(&["audit", "--limit", "100"]);
    for action in [
        "add", "issue", "import", "policy", "suspend", "resume", "revoke",
    ] {
        assert!(audit.contains(action), "{action} missing from {audit}");
    }
    // Another directory (another KEK) pointed at the same database is refused in one line.
    let other = Dir {
        tmp: companion_testkit::scratch(),
    };
    let (ok, _, err) = other.cli(&["init", "--store", &url, "--server-name", "localhost"]);
    assert!(!ok);
    assert!(err.contains("KEK does not match"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
}

/// TLS with verify-full semantics against a server on a loopback port: the server's certificate
/// must chain to `sslrootcert` and name the host connected to.
#[test]
fn tls_verify_full() {
    use companion_transport::OperatorCa;
    if pg::server().is_none() {
        return;
    }
    let ca = OperatorCa::generate("database CA").unwrap();
    let id = ca.issue_server(&["localhost".to_owned()]).unwrap();
    let srv = pg::PgServer::start_tls(&pg::TlsFiles {
        cert_pem: id.cert_pem(),
        key_pem: id.key_pem().to_string(),
    })
    .unwrap();
    let port = srv.port.unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let ca_file = tmp.path().join("ca.pem");
    std::fs::write(&ca_file, ca.cert_pem()).unwrap();
    let other = tmp.path().join("other.pem");
    std::fs::write(&other, OperatorCa::generate("other").unwrap().cert_pem()).unwrap();
    let url = |host: &str, ca: &std::path::Path| {
        format!(
            "postgres://postgres@{host}:{port}/postgres?sslmode=verify-full&sslrootcert={}",
            ca.display()
        )
    };
    let store = open(&url("localhost", &ca_file));
    add_parent(&store, 1, 1);
    assert_eq!(store.count_parents().unwrap(), 1);
    // A certificate from another CA, or one that does not name the host: refused.
    let e = PgStore::open_url(&url("localhost", &other), Kek::from_bytes(&KEK))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("cannot connect") && e.contains("certificate"),
        "{e}"
    );
    let e = PgStore::open_url(&url("127.0.0.1", &ca_file), Kek::from_bytes(&KEK))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("cannot connect") && e.contains("certificate"),
        "{e}"
    );
    drop(store);
}

/// Schema v5's backfill on PostgreSQL: a database written by a v4 program gets a
/// live-children counter that the quota check can use at once.
#[test]
fn live_counter_backfill() {
    use cn_backend::store::pg_migrations::MIGRATIONS;
    let Some(srv) = pg::server() else { return };
    let url = srv.create_db();
    let mut c = srv.client(&url);
    c.batch_execute("CREATE TABLE schema_version (version BIGINT NOT NULL)")
        .unwrap();
    for sql in &MIGRATIONS[..4] {
        c.batch_execute(sql).unwrap();
    }
    c.batch_execute("INSERT INTO schema_version VALUES (4)")
        .unwrap();
    c.batch_execute(&v4_rows_sql(
        |n| format!("decode(repeat('00', {n}), 'hex')"),
        "false",
    ))
    .unwrap();
    drop(c);
    let store = open(&url);
    assert_eq!(store.schema_version().unwrap(), latest());
    check_backfill(&store);
}

/// A batch of 256 new credentials costs a constant number of round trips (multi-row
/// statements), whatever its size: measured on the store's statement counter, prepared
/// statements warm.
#[test]
fn batch_round_trips_are_constant() {
    let Some(srv) = pg::server() else { return };
    let store = open(&srv.create_db());
    let p = add_parent(&store, 1, 10_000);
    let mut cfg = cfg();
    cfg.max_batch_items = 256;
    let mut next = 0u32;
    let mut run = |n: u32| {
        let items = (0..n)
            .map(|_| {
                next += 1;
                let mut it = prov(&format!("d{next}"), 1);
                it.request_id.0[..4].copy_from_slice(&next.to_be_bytes());
                BatchItem::Provision(it)
            })
            .collect();
        let before = store.round_trips();
        let out = ops::issue_batch(&store, &cfg, &batch(&p, T0, items), &sealer()).unwrap();
        assert!(out.iter().all(|o| matches!(o, ItemOutcome::Issued { .. })));
        store.round_trips() - before
    };
    run(4); // prepares the statements
    let (one, many) = (run(1), run(256));
    eprintln!("round trips per batch: 1 credential {one}, 256 credentials {many}");
    assert_eq!(one, many, "a batch's round trips grow with its size");
    assert!(many <= 16, "{many} round trips for a batch of 256");
}
