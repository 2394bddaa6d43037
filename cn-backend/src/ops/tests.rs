//! Unit tests of the operations on a real SQLite store.

use super::*;
use crate::kek::Kek;
use crate::model::{Amf, KeyFingerprint, NewParent, ParentPolicy, Supi};
use crate::policy::RequestedParams;
use crate::store::{SqliteConfig, SqliteStore, Store, StoreError};
use companion_crypto::aka::Sqn;

/// A store in `dir` holding one parent (1,000 children, 1-day lifetime) added at `at`.
fn store_with_parent(dir: &std::path::Path, at: Timestamp) -> (SqliteStore, Supi) {
    let store = SqliteStore::open(
        &dir.join("cn.db"),
        Kek::from_bytes(&[7; 32]),
        SqliteConfig::default(),
    )
    .unwrap();
    let parent = Supi::parse("imsi-001010000000001").unwrap();
    add_parent(
        &store,
        &NewParent {
            supi: parent.clone(),
            keys: SubscriberKeys {
                k: Key128::from_bytes([1; 16]),
                opc: Key128::from_bytes([2; 16]),
            },
            amf: Amf::DEFAULT,
            sqn: Sqn::ZERO,
            policy: ParentPolicy {
                max_children: 1000,
                max_lifetime_s: 86_400,
                roaming_allowed: false,
                allowed_dnns: Vec::new(),
                max_bitrate_kbps: None,
                require_attestation: false,
            },
        },
        "test",
        at,
    )
    .unwrap();
    (store, parent)
}

#[test]
fn parallel_sealing_keeps_items_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let (store, parent) = store_with_parent(dir.path(), Timestamp(1_700_000_000));
    let cfg = IssuerConfig {
        // Exactly the 160 SUPIs the good items need: an item that consumed one and failed
        // would leave the batch short, and it would fail with range exhausted.
        imsi_range: ImsiRange::new("001", "01", 9_000_000_000, 9_000_000_159).unwrap(),
        op: Key128::from_bytes([3; 16]),
        amf: Amf::DEFAULT,
        operator: OperatorPolicy {
            max_lifetime_s: 86_400,
            ..OperatorPolicy::default()
        },
        max_batch_items: 256,
    };
    // Items 10, 20, ... fail their encapsulation (a bad key: before any allocation), items
    // 5, 15, ... their seal (after the SUPI was allocated, before any write); the
    // others get a blob naming their own item and SUPI.
    struct TwoStep;
    impl Sealer for TwoStep {
        type Encapsulated = Vec<u8>;
        fn encapsulate(
            &self,
            recipient: &[u8],
            device_id: &DeviceId,
            _: &RequestId,
        ) -> Result<Vec<u8>, SealError> {
            if recipient.ends_with(b"0") {
                return Err(SealError(format!("bad key of {}", device_id.as_str())));
            }
            Ok(recipient.to_vec())
        }
        fn seal(
            &self,
            recipient: Vec<u8>,
            child: &ChildCredential,
            _: &SubscriberKeys,
        ) -> Result<Vec<u8>, SealError> {
            if recipient.ends_with(b"5") {
                return Err(SealError(format!("refused {}", child.device_id.as_str())));
            }
            let mut out = recipient;
            out.extend_from_slice(child.supi.as_str().as_bytes());
            Ok(out)
        }
    }
    let items = |range: std::ops::RangeInclusive<u8>| -> Vec<BatchItem> {
        range
            .map(|i| {
                BatchItem::Provision(ProvisionItem {
                    attestation: Default::default(),
                    device_id: DeviceId::parse(&format!("dev-{i}")).unwrap(),
                    device_key_fingerprint: KeyFingerprint([i; 32]),
                    device_spki: vec![0x30, i],
                    request_id: RequestId([i; 16]),
                    recipient: format!("pk-{i}").into_bytes(),
                    params: RequestedParams::default(),
                })
            })
            .collect()
    };
    let batch = Batch {
        parent: parent.clone(),
        actor: "test".into(),
        now: Timestamp(1_700_000_000),
        items: items(1..=200),
    };
    let out = issue_batch(&store, &cfg, &batch, &TwoStep).unwrap();
    assert_eq!(out.len(), 200);
    let mut msins = Vec::new();
    for (i, o) in (1..=200u32).zip(&out) {
        match o {
            ItemOutcome::Issued { child, sealed } => {
                assert_ne!(i % 5, 0);
                assert_eq!(child.device_id.as_str(), format!("dev-{i}"));
                let want = format!("pk-{i}{}", child.supi.as_str());
                assert_eq!(sealed.as_slice(), want.as_bytes());
                msins.push(child.supi.as_str()[10..].parse::<u64>().unwrap());
            }
            ItemOutcome::Invalid(Invalid::Seal(m)) if i % 10 == 0 => {
                assert_eq!(m, &format!("bad key of dev-{i}"));
            }
            ItemOutcome::Invalid(Invalid::Seal(m)) if i % 10 == 5 => {
                assert_eq!(m, &format!("refused dev-{i}"));
            }
            other => panic!("item {i}: {other:?}"),
        }
    }
    // Every SUPI of the range is taken exactly once (in random order): the items that
    // failed, before or after their allocation, consumed nothing.
    msins.sort_unstable();
    let want: Vec<u64> = (0..160).map(|n| 9_000_000_000 + n).collect();
    assert_eq!(msins, want);
    assert_eq!(store.children_of(&parent).unwrap().len(), 160);
    // The range is full: the next credential cannot be issued.
    let next = Batch {
        items: items(201..=201),
        ..batch
    };
    assert!(matches!(
        issue_batch(&store, &cfg, &next, &TwoStep),
        Err(StoreError::ImsiRangeExhausted(_))
    ));
}

#[test]
fn allocation_cap_answers_rate_limited_and_frees_with_time() {
    let dir = tempfile::tempdir().unwrap();
    let (store, parent) = store_with_parent(dir.path(), Timestamp(0));
    let cfg = IssuerConfig {
        imsi_range: ImsiRange::new("001", "01", 9_000_000_000, 9_000_999_999).unwrap(),
        op: Key128::from_bytes([3; 16]),
        amf: Amf::DEFAULT,
        operator: OperatorPolicy {
            max_lifetime_s: 86_400,
            allocation_cap: crate::policy::AllocationCap {
                max: 5,
                window_s: 100,
            },
        },
        max_batch_items: 256,
    };
    // Fails to seal for recipient "bad": such items must not use the cap either.
    let sealer = |recipient: &[u8], child: &ChildCredential, _: &SubscriberKeys| {
        if recipient == b"bad" {
            return Err(SealError("bad".into()));
        }
        Ok(child.supi.as_str().as_bytes().to_vec())
    };
    let item = |n: u32, recipient: &[u8]| {
        BatchItem::Provision(ProvisionItem {
            attestation: Default::default(),
            device_id: DeviceId::parse(&format!("dev-{n}")).unwrap(),
            device_key_fingerprint: KeyFingerprint([1; 32]),
            device_spki: vec![0x30, 1],
            request_id: RequestId([n as u8; 16]),
            recipient: recipient.to_vec(),
            params: RequestedParams::default(),
        })
    };
    let run = |now: i64, items: Vec<BatchItem>| {
        let b = Batch {
            parent: parent.clone(),
            actor: "test".into(),
            now: Timestamp(now),
            items,
        };
        issue_batch(&store, &cfg, &b, &sealer).unwrap()
    };
    // t=1000: two bad seals among seven items: the five good ones use the cap exactly.
    let mut first: Vec<BatchItem> = (0..5).map(|n| item(n, b"pk")).collect();
    first.insert(2, item(50, b"bad"));
    first.insert(4, item(51, b"bad"));
    let out = run(1000, first);
    let issued = out
        .iter()
        .filter(|o| matches!(o, ItemOutcome::Issued { .. }))
        .count();
    assert_eq!(issued, 5, "{out:?}");
    // t=1040: over the cap; the retry time is when the window (100 s) frees a slot.
    let out = run(1040, vec![item(6, b"pk"), item(7, b"pk")]);
    for o in &out {
        assert_eq!(
            o,
            &ItemOutcome::RateLimited {
                limit: 5,
                window_s: 100,
                retry_after_s: 60
            }
        );
    }
    // A retry of an issued request is still answered (no allocation).
    assert!(matches!(
        run(1040, vec![item(0, b"pk")])[0],
        ItemOutcome::AlreadyIssued { .. }
    ));
    // t=1100: the first five left the window.
    assert!(matches!(
        run(1100, vec![item(6, b"pk")])[0],
        ItemOutcome::Issued { .. }
    ));
    assert_eq!(store.children_of(&parent).unwrap().len(), 6);
}
