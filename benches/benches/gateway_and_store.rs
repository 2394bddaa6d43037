//! The gateway's smart batcher (pure state machine) and the CN store's group commit: one
//! SQLite transaction (WAL, synchronous=FULL) issuing a whole batch, with K/OPc sealed under the
//! KEK and a stand-in for HPKE sealing so the store's own ceiling is measured (HPKE is benched in
//! `crypto`).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use cn_backend::model::{
    Amf, DeviceId, ImsiRange, KeyFingerprint, NewParent, ParentPolicy, RequestId, SubscriberKeys,
    Supi, Timestamp,
};
use cn_backend::ops::{self, Batch, BatchItem, IssuerConfig, ProvisionItem, SealError};
use cn_backend::policy::{AllocationCap, OperatorPolicy, RequestedParams};
use cn_backend::store::sqlite::SqliteConfig;
use cn_backend::{ChildCredential, Kek, SqliteStore};
use companion_crypto::aka::Sqn;
use companion_crypto::secret::Key128;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use gatewayd::batcher::{Batcher, BatcherConfig};

fn batcher(c: &mut Criterion) {
    let mut g = c.benchmark_group("batcher");
    let n = 10_000u64;
    g.throughput(Throughput::Elements(n));
    g.bench_function("10k requests, max_batch 256, 4 in flight", |b| {
        b.iter(|| {
            let now = Instant::now();
            let mut bt = Batcher::new(BatcherConfig {
                max_batch: 256,
                max_wait: Duration::from_millis(5),
                max_in_flight: 4,
                queue_capacity: 16_384,
            });
            let mut inflight = Vec::new();
            let mut sent = 0u64;
            for i in 0..n {
                bt.push(i, now).unwrap();
                if let Some(batch) = bt.poll_batch(now) {
                    sent += batch.items.len() as u64;
                    inflight.push(batch.id);
                }
                if inflight.len() == 4 {
                    for id in inflight.drain(..) {
                        bt.complete(id, now);
                    }
                }
            }
            sent += bt.drain().len() as u64;
            assert_eq!(black_box(sent), n);
        })
    });
    g.finish();
}

fn store_commit(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let kek = Kek::from_bytes(&[0x42; 32]);
    let store = SqliteStore::open(&dir.path().join("cn.db"), kek, SqliteConfig::default()).unwrap();
    let parent = Supi::parse("imsi-001010000000001").unwrap();
    ops::add_parent(
        &store,
        &NewParent {
            supi: parent.clone(),
            keys: SubscriberKeys {
                k: Key128::from_bytes([1; 16]),
                opc: Key128::from_bytes([2; 16]),
            },
            amf: Amf([0x80, 0x00]),
            sqn: Sqn::ZERO,
            policy: ParentPolicy {
                max_children: 1_000_000,
                max_lifetime_s: 86_400,
                roaming_allowed: false,
                allowed_dnns: vec![],
                max_bitrate_kbps: None,
                require_attestation: false,
            },
        },
        "bench",
        Timestamp(1_700_000_000),
    )
    .unwrap();
    let cfg = IssuerConfig {
        imsi_range: ImsiRange::new("001", "01", 1_000_000_000, 9_999_999_999).unwrap(),
        op: Key128::from_bytes([0x11; 16]),
        amf: Amf::DEFAULT,
        operator: OperatorPolicy {
            max_lifetime_s: 7 * 86_400,
            // Every item of every iteration is issued at the same instant: no cap.
            allocation_cap: AllocationCap {
                max: u32::MAX,
                window_s: 1,
            },
        },
        max_batch_items: 1024,
    };
    // Stands in for HPKE: the store keeps whatever the sealer returns.
    let sealer = |_: &[u8],
                  _: &ChildCredential,
                  _: &SubscriberKeys|
     -> Result<Vec<u8>, SealError> { Ok(vec![0xa5; 648]) };
    let next = AtomicU64::new(0);
    let mut g = c.benchmark_group("store");
    g.sample_size(20);
    for size in [1usize, 64, 256] {
        g.throughput(Throughput::Elements(size as u64));
        g.bench_function(format!("issue_batch, {size} items, one transaction"), |b| {
            b.iter(|| {
                let items = (0..size)
                    .map(|_| {
                        let n = next.fetch_add(1, Ordering::Relaxed);
                        let mut rid = [0u8; 16];
                        rid[..8].copy_from_slice(&n.to_be_bytes());
                        BatchItem::Provision(ProvisionItem {
                            attestation: Default::default(),
                            device_id: DeviceId::parse(&format!("dev-{n}")).unwrap(),
                            device_key_fingerprint: KeyFingerprint([3; 32]),
                            device_spki: vec![0x30, 3],
                            request_id: RequestId(rid),
                            recipient: vec![4; 32],
                            params: RequestedParams::default(),
                        })
                    })
                    .collect();
                let batch = Batch {
                    parent: parent.clone(),
                    actor: "bench".into(),
                    now: Timestamp(1_700_000_000),
                    items,
                };
                ops::issue_batch(&store, &cfg, &batch, &sealer).unwrap()
            })
        });
    }
    g.finish();
}

criterion_group!(benches, batcher, store_commit);
criterion_main!(benches);
