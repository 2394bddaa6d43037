//! The conformance suite against the SQLite engine, plus SQLite-specific checks (durability
//! settings, file modes, the append-only trigger, several processes' worth of connections).
#![allow(clippy::unwrap_used, clippy::panic)] // fixture helpers outside #[test] fns

mod conformance;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use cn_backend::kek::Kek;
use cn_backend::model::SubscriptionStatus;
use cn_backend::ops::{self, BatchItem, ItemOutcome};
use cn_backend::store::{SqliteConfig, SqliteStore, Store, StoreError};
use conformance::*;
use tempfile::TempDir;

const KEK: [u8; 32] = [0x5a; 32];

struct Fixture {
    dir: TempDir,
    store: SqliteStore,
}

fn open(path: &Path) -> SqliteStore {
    SqliteStore::open(path, Kek::from_bytes(&KEK), SqliteConfig::default()).unwrap()
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir.path().join("cn.db"));
    Fixture { dir, store }
}

macro_rules! conformance_tests {
    ($($name:ident),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                let f = fixture();
                conformance::$name(&f.store);
            }
        )*
    };
}

conformance::all_tests!(conformance_tests);

#[test]
fn durability_settings_and_file_mode() {
    let f = fixture();
    let path = f.dir.path().join("cn.db");
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    assert_eq!(
        f.store.schema_version().unwrap(),
        cn_backend::store::migrations::latest_version()
    );
    let settings = f.store.settings().unwrap();
    assert_eq!(settings.journal_mode, "wal");
    assert!(settings.synchronous_full);
    assert!(settings.foreign_keys);
}

#[test]
fn audit_trail_is_append_only() {
    let f = fixture();
    add_parent(&f.store, 1, 1);
    let conn = rusqlite::Connection::open(f.dir.path().join("cn.db")).unwrap();
    let upd = conn.execute("UPDATE audit SET actor = 'mallory'", []);
    assert!(upd.unwrap_err().to_string().contains("append-only"));
    let del = conn.execute("DELETE FROM audit", []);
    assert!(del.unwrap_err().to_string().contains("append-only"));
    let n: i64 = conn
        .query_row("SELECT count(*) FROM audit", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, 1);
}

#[test]
fn secrets_are_encrypted_and_bound_to_their_row() {
    let f = fixture();
    let a = add_parent(&f.store, 1, 1);
    let b = add_parent(&f.store, 2, 1);
    let conn = rusqlite::Connection::open(f.dir.path().join("cn.db")).unwrap();
    let k_enc: Vec<u8> = conn
        .query_row(
            "SELECT k_enc FROM parents WHERE supi = ?1",
            [a.as_str()],
            |r| r.get(0),
        )
        .unwrap();
    assert!(
        !k_enc.windows(16).any(|w| w == [1u8; 16]),
        "K stored in clear"
    );
    // Swap A's encrypted K into B's row: B's keys no longer decrypt.
    conn.execute(
        "UPDATE parents SET k_enc = ?1 WHERE supi = ?2",
        rusqlite::params![k_enc, b.as_str()],
    )
    .unwrap();
    assert!(matches!(
        ops::aka_vector(&f.store, &b),
        Err(StoreError::Kek(_))
    ));
    assert!(ops::aka_vector(&f.store, &a).is_ok());
}

#[test]
fn reopen_keeps_data_and_checks_kek() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cn.db");
    let store = reopen_keeps_issued(|| open(&path));
    let p = supi(1);
    // After a restart, allocation sees the SUPI taken before it: a new request gets another.
    let out = issue(
        &store,
        &batch(&p, T0, vec![BatchItem::Provision(prov("v", 2))]),
    );
    let first = store.children_of(&p).unwrap();
    assert_eq!(first.len(), 2);
    assert!(
        matches!(&out[0], ItemOutcome::Issued { child, .. } if first.iter().any(|c| c.supi == child.supi))
    );
    assert_ne!(first[0].supi, first[1].supi);
    drop(store);
    let wrong = SqliteStore::open(&path, Kek::from_bytes(&[1; 32]), SqliteConfig::default());
    assert!(matches!(wrong, Err(StoreError::WrongKek)));
}

#[test]
fn kek_file_init_and_load() {
    let dir = tempfile::tempdir().unwrap();
    let kek_path = dir.path().join("kek.key");
    let db = dir.path().join("cn.db");
    let kek = Kek::init(&kek_path).unwrap();
    let store = SqliteStore::open(&db, kek, SqliteConfig::default()).unwrap();
    add_parent(&store, 1, 1);
    drop(store);
    let store =
        SqliteStore::open(&db, Kek::load(&kek_path).unwrap(), SqliteConfig::default()).unwrap();
    assert!(ops::aka_vector(&store, &supi(1)).is_ok());
}

#[test]
fn newer_schema_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cn.db");
    drop(open(&path));
    let conn = rusqlite::Connection::open(&path).unwrap();
    conn.pragma_update(None, "user_version", 99).unwrap();
    drop(conn);
    let r = SqliteStore::open(&path, Kek::from_bytes(&KEK), SqliteConfig::default());
    assert!(matches!(r, Err(StoreError::Schema(_))));
}

/// Two independent stores (separate writer connections, as two processes would have) race for
/// the same quota: `BEGIN IMMEDIATE` serialises them at the database level.
#[test]
fn separate_connections_respect_quota() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cn.db");
    let stores = [open(&path), open(&path), open(&path)];
    let (p, outcomes) = race_for_quota(&stores);
    let issued: Vec<_> = outcomes
        .iter()
        .filter_map(|o| match o {
            ItemOutcome::Issued { child, .. } => Some(child.supi.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(issued.len(), 10);
    let unique: std::collections::HashSet<_> = issued.iter().collect();
    assert_eq!(unique.len(), 10);
    assert_eq!(stores[1].count_active_children(&p, T0).unwrap(), 10);
    assert_eq!(
        stores[2].parent(&p).unwrap().unwrap().status,
        SubscriptionStatus::Active
    );
}

/// Two fresh stores given the same requests hand out different SUPIs (the allocation is drawn
/// from the CSPRNG, not derived from the store's state).
#[test]
fn fresh_stores_allocate_different_sequences() {
    let (a, b) = (fixture(), fixture());
    let pa = add_parent(&a.store, 1, 100);
    let pb = add_parent(&b.store, 1, 100);
    let sa = issue_many(&a.store, &cfg(), &pa, 20);
    let sb = issue_many(&b.store, &cfg(), &pb, 20);
    assert_ne!(sa, sb);
}

/// Schema v5's backfill: a database written by a v4 program (children active, expired and
/// revoked) gets a live-children counter that the quota check can use at once.
#[test]
fn live_counter_backfill() {
    use cn_backend::store::migrations::MIGRATIONS;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cn.db");
    let conn = rusqlite::Connection::open(&path).unwrap();
    for sql in &MIGRATIONS[..4] {
        conn.execute_batch(sql).unwrap();
    }
    conn.pragma_update(None, "user_version", 4).unwrap();
    conn.execute_batch(&v4_rows_sql(|n| format!("zeroblob({n})"), "0"))
        .unwrap();
    drop(conn);
    let store = open(&path);
    assert_eq!(
        store.schema_version().unwrap(),
        cn_backend::store::migrations::latest_version()
    );
    check_backfill(&store);
}
