//! Security suite against the real `cn-backend` binary (issue 15): each test repeats an attack
//! and shows it defended.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use companion_proto::msg::{BatchItem, BatchProvision, ItemKind, Outcome, Params};
use companion_proto::{DeviceId, RequestId};

const P1: &str = "imsi-001010000000001";

/// The X25519 public keys whose shared secret is all-zero (RFC 7748 §6.1): 0, 1, the two
/// order-8 points, p − 1, p, p + 1, each also with bit 255 set.
fn low_order_keys() -> Vec<[u8; 32]> {
    [
        "0000000000000000000000000000000000000000000000000000000000000000",
        "0100000000000000000000000000000000000000000000000000000000000000",
        "e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800",
        "5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157",
        "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
        "edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
        "eeffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
    ]
    .iter()
    .flat_map(|h| {
        let k: [u8; 32] = hex::decode(h).unwrap().try_into().unwrap();
        let mut hi = k;
        hi[31] |= 0x80;
        [k, hi]
    })
    .collect()
}

/// The persistent SUPI allocator's next MSIN (None before the first allocation), read from the
/// database file while the server runs (WAL: a reader sees the last commit).
fn next_msin(dir: &Dir) -> Option<i64> {
    let db = rusqlite::Connection::open_with_flags(
        dir.path().join("cn-backend.db"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .unwrap();
    db.query_row("SELECT next_msin FROM imsi_allocator", [], |r| r.get(0))
        .ok()
}

fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or(0)
}

/// Attack 1 (IMSI range burn): a paired device, or a greedy gateway, sends requests whose HPKE
/// key is all-zero or another low-order point. Before the fix every such item consumed a SUPI
/// (allocated, then the seal failed, and the allocation was committed anyway) without using any
/// quota. Now: 10,000 such items leave the allocator where it was, issue nothing, use no quota,
/// and the next good request gets the very next SUPI.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn low_order_hpke_keys_burn_no_supi_and_no_quota() {
    const BAD_ITEMS: usize = 10_000;
    let dir = Dir::init("");
    dir.add_parent(P1, &["--max-children", "100"]);
    let srv = dir.serve();
    let s = connect(&srv, P1).await;
    let max = s.auth_result().unwrap().max_batch_items;
    let max = usize::try_from(max).unwrap();

    // One good credential first, so the allocator has a row and a known position.
    let good = DeviceReq::new(1);
    let r = s
        .batch(BatchProvision {
            batch_id: 1,
            items: vec![good.item()],
        })
        .await
        .unwrap();
    assert_eq!(r.items[0].outcome, Outcome::Issued);
    let first_supi = good.open(&r.items[0]).supi;
    let before = next_msin(&dir).unwrap();

    let keys = low_order_keys();
    let mut outcomes = std::collections::HashMap::<Outcome, usize>::new();
    let mut sent = 0usize;
    let mut batch_id = 10;
    while sent < BAD_ITEMS {
        let n = max.min(BAD_ITEMS - sent);
        let items = (sent..sent + n)
            .map(|i| {
                let mut rid = [0u8; 16];
                rid[..8].copy_from_slice(&(i as u64).to_be_bytes());
                BatchItem {
                    kind: ItemKind::Provision,
                    request_id: RequestId::from(rid),
                    device_id: DeviceId::new(&format!("evil-{i}")).unwrap(),
                    device_key_fingerprint: [0xee; 32],
                    hpke_public_key: keys[i % keys.len()],
                    params: Params::default(),
                    supi: None,
                }
            })
            .collect();
        batch_id += 1;
        let r = s.batch(BatchProvision { batch_id, items }).await.unwrap();
        assert_eq!(r.items.len(), n);
        for it in r.items {
            assert!(it.supi.is_none() && it.sealed.is_none(), "{it:?}");
            *outcomes.entry(it.outcome).or_default() += 1;
        }
        sent += n;
    }
    let after = next_msin(&dir).unwrap();
    eprintln!(
        "{BAD_ITEMS} items with low-order HPKE keys: next_msin {before} -> {after} \
         ({} SUPIs burned); outcomes {outcomes:?}",
        after - before
    );
    assert_eq!(after, before, "SUPIs burned by bad keys");
    assert_eq!(outcomes.get(&Outcome::Invalid), Some(&BAD_ITEMS));
    let show = dir.cli_json(&["subscriber", "show", P1]);
    assert_eq!(show["subscriber"]["active_children"], 1, "{show}");
    assert_eq!(s.list_children().await.unwrap().children.len(), 1);

    // The next good request gets the SUPI right after the first one: nothing was skipped.
    let good2 = DeviceReq::new(2);
    let r = s
        .batch(BatchProvision {
            batch_id: 99,
            items: vec![good2.item()],
        })
        .await
        .unwrap();
    assert_eq!(r.items[0].outcome, Outcome::Issued);
    let second_supi = good2.open(&r.items[0]).supi;
    let msin = |s: &str| s[s.len() - 10..].parse::<u64>().unwrap();
    assert_eq!(
        msin(second_supi.as_str()),
        msin(first_supi.as_str()) + 1,
        "{first_supi} then {second_supi}"
    );
    assert_eq!(next_msin(&dir).unwrap(), before + 1);
    let (_, m) = srv.http("GET", "/metrics", None, "");
    assert_eq!(metric(&m, "cn_backend_credentials_issued_total"), 2);
    assert_eq!(
        metric(&m, "cn_backend_invalid_items_total"),
        BAD_ITEMS as u64
    );
}

/// Attack 1, the churn variant: the quota bounds live credentials, but a gateway can revoke its
/// children and ask again. The operator's per-parent cap on new credentials per window stops
/// it: items over the cap are answered `retry_later` with the time until a slot frees, counted
/// in `cn_backend_allocation_rate_limited_total`, and allocate nothing; renewals (same SUPI)
/// are not capped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allocation_cap_stops_revoke_and_reissue_churn() {
    let dir = Dir::init("child_allocation_limit = 5\nchild_allocation_window = \"1h\"");
    dir.add_parent(P1, &["--max-children", "2"]);
    let srv = dir.serve();
    let s = connect(&srv, P1).await;
    let mut issued = Vec::new();
    let mut refused = Vec::new();
    // Issue two, revoke them, and again: the quota never stops it, the cap does.
    for n in 0..5u64 {
        let reqs = [DeviceReq::new(2 * n), DeviceReq::new(2 * n + 1)];
        let r = s
            .batch(BatchProvision {
                batch_id: n,
                items: reqs.iter().map(DeviceReq::item).collect(),
            })
            .await
            .unwrap();
        for (it, req) in r.items.iter().zip(&reqs) {
            match it.outcome {
                Outcome::Issued => {
                    let supi = req.open(it).supi;
                    issued.push((req.clone(), supi.clone()));
                    s.revoke(companion_proto::msg::Revoke {
                        supi: Some(supi),
                        device_id: None,
                    })
                    .await
                    .unwrap();
                }
                Outcome::RetryLater => refused.push(it.clone()),
                o => panic!("unexpected {o:?}: {:?}", it.reason),
            }
        }
    }
    assert_eq!(issued.len(), 5, "the cap: 5 new credentials per hour");
    assert_eq!(refused.len(), 5);
    for it in &refused {
        let ms = it
            .retry_after_ms
            .expect("retry_later carries the retry time");
        assert!(ms > 0 && ms <= 3_600_000, "{ms}");
        assert!(it.supi.is_none() && it.sealed.is_none());
    }
    let (_, m) = srv.http("GET", "/metrics", None, "");
    assert_eq!(metric(&m, "cn_backend_allocation_rate_limited_total"), 5);
    assert_eq!(metric(&m, "cn_backend_credentials_issued_total"), 5);
    // Exactly five SUPIs were taken from the range.
    assert_eq!(next_msin(&dir), Some(100_005));
    assert!(srv.log_text().contains("allocation cap"));

    // Renewal keeps its SUPI: not capped. Issue-then-renew needs a live child, so use a fresh
    // parent whose window is empty, fill its cap, then renew.
    let p2 = "imsi-001010000000002";
    dir.add_parent(p2, &["--max-children", "10"]);
    let s2 = connect(&srv, p2).await;
    let reqs: Vec<DeviceReq> = (100..106).map(DeviceReq::new).collect();
    let r = s2
        .batch(BatchProvision {
            batch_id: 1,
            items: reqs.iter().map(DeviceReq::item).collect(),
        })
        .await
        .unwrap();
    let outcomes: Vec<Outcome> = r.items.iter().map(|i| i.outcome).collect();
    assert_eq!(&outcomes[..5], &[Outcome::Issued; 5]);
    assert_eq!(outcomes[5], Outcome::RetryLater);
    let child = reqs[0].open(&r.items[0]).supi;
    let mut renew = DeviceReq::new(200);
    renew.device_id = reqs[0].device_id.clone();
    let mut item = renew.item();
    item.kind = ItemKind::Renew;
    item.supi = Some(child.clone());
    let rr = s2
        .batch(BatchProvision {
            batch_id: 2,
            items: vec![item],
        })
        .await
        .unwrap();
    assert_eq!(
        rr.items[0].outcome,
        Outcome::Issued,
        "{:?}",
        rr.items[0].reason
    );
    assert_eq!(renew.open(&rr.items[0]).supi, child);
}
