//! Engine-neutral conformance suite: every function takes any [`Store`] (freshly created and
//! empty) and checks one behaviour. `tests/sqlite.rs` runs it against SQLite; a PostgreSQL engine
//! runs the same functions.
//!
//! These are test helpers outside `#[test]` functions, so clippy does not see them as tests;
//! the workspace allows unwrap/expect/panic in tests (clippy.toml) and so does this module.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};

use cn_backend::model::{
    Amf, ChildStatus, DeviceId, Dnn, ImsiRange, KeyFingerprint, NewParent, ParentPolicy, RequestId,
    SubscriberKeys, SubscriptionStatus, Supi, Timestamp,
};
use cn_backend::ops::{
    self, Batch, BatchItem, IssuerConfig, ItemOutcome, ProvisionItem, RenewItem, SealError,
};
use cn_backend::policy::{Denial, IdempotencyKey, Invalid, OperatorPolicy, RequestedParams};
use cn_backend::store::{
    AuditAction, AuditQuery, IssuanceKind, ManufacturerRoot, Store, StoreError, Subscriber,
    SyncState, transact,
};
use cn_backend::{ChildCredential, import};
use companion_crypto::aka::{Sqn, next_sqn, sqn_after_resync};
use companion_crypto::milenage::Milenage;
use companion_crypto::secret::Key128;

pub const T0: Timestamp = Timestamp(1_700_000_000);
pub const OP: [u8; 16] = [0x11; 16];

/// Every conformance test, by name: each engine's test file defines a macro that turns a list of
/// names into `#[test]`s over its own store and passes it here, so a new test runs on every
/// engine (`conformance::all_tests!(conformance_tests);`).
macro_rules! all_tests {
    ($engine:ident) => {
        $engine!(
            parents_add_list_policy,
            secrets_round_trip,
            issue_narrows_and_seals,
            idempotent_replay,
            quota_counts_active_unexpired,
            policy_denials,
            seal_failure_is_per_item,
            renewal,
            revoke_child,
            parent_lifecycle_cascades,
            batch_errors_commit_nothing,
            supi_allocation_skips_taken,
            supi_allocation_is_unpredictable,
            sqn_advances_and_resyncs,
            sqn_unique_under_concurrency,
            aka_failure_counter,
            audit_paging,
            import_all_or_nothing,
            import_ten_thousand,
            concurrent_batches_respect_quota,
            manufacturer_roots,
            live_counter_matches_scan,
            sync_outbox_follows_lifecycle,
            sync_lease_admits_one_pusher_at_a_time,
        );
    };
}
pub(crate) use all_tests;

pub fn supi(n: u64) -> Supi {
    Supi::parse(&format!("imsi-00101{n:010}")).unwrap()
}

pub fn dnn(s: &str) -> Dnn {
    Dnn::parse(s).unwrap()
}

pub fn config(first: u64, last: u64) -> IssuerConfig {
    IssuerConfig {
        imsi_range: ImsiRange::new("001", "01", first, last).unwrap(),
        op: Key128::from_bytes(OP),
        amf: Amf::DEFAULT,
        operator: OperatorPolicy {
            max_lifetime_s: 7 * 24 * 3600,
            ..OperatorPolicy::default()
        },
        max_batch_items: 64,
    }
}

pub fn cfg() -> IssuerConfig {
    config(9_000_000_000, 9_000_999_999)
}

pub fn policy(max_children: u32) -> ParentPolicy {
    ParentPolicy {
        max_children,
        max_lifetime_s: 24 * 3600,
        roaming_allowed: false,
        allowed_dnns: vec![dnn("internet"), dnn("ims")],
        max_bitrate_kbps: Some(2000),
        require_attestation: false,
    }
}

/// `ops::add_parent` of `supi` with all-zero keys and one child allowed (for the refusals).
pub fn add_zero_key_parent<S: Store + ?Sized>(store: &S, supi: Supi) -> Result<(), StoreError> {
    let parent = NewParent {
        supi,
        keys: SubscriberKeys {
            k: Key128::from_bytes([0; 16]),
            opc: Key128::from_bytes([0; 16]),
        },
        amf: Amf::DEFAULT,
        sqn: Sqn::ZERO,
        policy: policy(1),
    };
    ops::add_parent(store, &parent, "test", T0)
}

pub fn add_parent<S: Store + ?Sized>(store: &S, n: u64, max_children: u32) -> Supi {
    let s = supi(n);
    let byte = u8::try_from(n % 251).unwrap();
    ops::add_parent(
        store,
        &NewParent {
            supi: s.clone(),
            keys: SubscriberKeys {
                k: Key128::from_bytes([byte; 16]),
                opc: Key128::from_bytes([byte ^ 0xff; 16]),
            },
            amf: Amf([0x80, 0x00]),
            sqn: Sqn::ZERO,
            policy: policy(max_children),
        },
        "test",
        T0,
    )
    .unwrap();
    s
}

/// A sealer whose output is unique per call (a counter), so replays are recognisable, and which
/// embeds SUPI and K so tests can check what it was given. Fails for recipient `b"bad"`.
pub fn sealer()
-> impl Fn(&[u8], &ChildCredential, &SubscriberKeys) -> Result<Vec<u8>, SealError> + Sync {
    static CALLS: AtomicU64 = AtomicU64::new(0);
    |recipient: &[u8], child: &ChildCredential, keys: &SubscriberKeys| {
        if recipient == b"bad" {
            return Err(SealError("bad recipient key".into()));
        }
        let mut out = recipient.to_vec();
        out.extend_from_slice(child.supi.as_str().as_bytes());
        out.extend_from_slice(keys.k.expose());
        out.extend_from_slice(&child.expires_at.0.to_be_bytes());
        out.extend_from_slice(&CALLS.fetch_add(1, Ordering::Relaxed).to_be_bytes());
        Ok(out)
    }
}

/// The device key of the items made by [`prov`] with `req` (the store only compares keys; the
/// signature over the item is checked on the wire, before the store).
pub fn spki(req: u8) -> Vec<u8> {
    vec![0x30, 0x01, req]
}

pub fn prov(device: &str, req: u8) -> ProvisionItem {
    ProvisionItem {
        attestation: Default::default(),
        device_id: DeviceId::parse(device).unwrap(),
        device_key_fingerprint: KeyFingerprint([req; 32]),
        device_spki: spki(req),
        request_id: RequestId([req; 16]),
        recipient: b"device-pk".to_vec(),
        params: RequestedParams::default(),
    }
}

pub fn batch(parent: &Supi, now: Timestamp, items: Vec<BatchItem>) -> Batch {
    Batch {
        parent: parent.clone(),
        actor: format!("gateway:{parent}"),
        now,
        items,
    }
}

/// A batch of provisioning `items` for `parent` at `now`: their outcomes.
pub fn provision<S: Store + ?Sized>(
    store: &S,
    parent: &Supi,
    now: Timestamp,
    items: Vec<ProvisionItem>,
) -> Vec<ItemOutcome> {
    let items = items.into_iter().map(BatchItem::Provision).collect();
    issue(store, &batch(parent, now, items))
}

/// One provisioning item (device `device`, request `req`) for `parent` at `now`: its outcome.
pub fn provision_one<S: Store + ?Sized>(
    store: &S,
    parent: &Supi,
    now: Timestamp,
    device: &str,
    req: u8,
) -> Vec<ItemOutcome> {
    issue(
        store,
        &batch(parent, now, vec![BatchItem::Provision(prov(device, req))]),
    )
}

pub fn issue<S: Store + ?Sized>(store: &S, b: &Batch) -> Vec<ItemOutcome> {
    ops::issue_batch(store, &cfg(), b, &sealer()).unwrap()
}

fn issued(o: &ItemOutcome) -> (&ChildCredential, &[u8]) {
    match o {
        ItemOutcome::Issued { child, sealed } | ItemOutcome::Renewed { child, sealed } => {
            (child, sealed)
        }
        other => panic!("expected an issued credential, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------

pub fn parents_add_list_policy<S: Store + ?Sized>(store: &S) {
    for n in [3, 1, 2] {
        add_parent(store, n, 5);
    }
    let dup = add_zero_key_parent(store, supi(1));
    assert!(matches!(dup, Err(StoreError::Duplicate(s)) if s == supi(1)));
    assert_eq!(store.count_parents().unwrap(), 3);
    let page1 = store.list_parents(None, 2).unwrap();
    assert_eq!(
        page1.iter().map(|p| p.supi.clone()).collect::<Vec<_>>(),
        vec![supi(1), supi(2)]
    );
    let page2 = store.list_parents(Some(&supi(2)), 2).unwrap();
    assert_eq!(page2.len(), 1);
    assert_eq!(page2[0].supi, supi(3));

    let p = store.parent(&supi(1)).unwrap().unwrap();
    assert_eq!(p.status, SubscriptionStatus::Active);
    assert_eq!(p.policy, policy(5).validated().unwrap());
    assert_eq!(p.amf, Amf([0x80, 0x00]));
    assert!(store.parent(&supi(9)).unwrap().is_none());

    let new_policy = ParentPolicy {
        max_children: 1,
        roaming_allowed: true,
        allowed_dnns: vec![],
        max_bitrate_kbps: None,
        require_attestation: true,
        ..policy(1)
    };
    ops::set_parent_policy(store, &supi(1), &new_policy, "op", T0.plus_secs(5)).unwrap();
    let p = store.parent(&supi(1)).unwrap().unwrap();
    assert_eq!(p.policy, new_policy);
    assert_eq!(p.updated_at, T0.plus_secs(5));
    assert!(matches!(
        ops::set_parent_policy(store, &supi(9), &new_policy, "op", T0),
        Err(StoreError::ParentNotFound(_))
    ));
    let bad = ParentPolicy {
        max_lifetime_s: 0,
        ..policy(1)
    };
    assert!(ops::set_parent_policy(store, &supi(1), &bad, "op", T0).is_err());

    let audit = store
        .audit(&AuditQuery {
            supi: Some(supi(1)),
            ..Default::default()
        })
        .unwrap();
    let actions: Vec<_> = audit.iter().map(|a| a.event.action).collect();
    assert_eq!(actions, vec![AuditAction::Add, AuditAction::Policy]);
}

pub fn secrets_round_trip<S: Store + ?Sized>(store: &S) {
    let p = add_parent(store, 7, 5);
    let m = ops::aka_vector(store, &p).unwrap();
    assert_eq!(m.keys.k.expose(), &[7; 16]);
    assert_eq!(m.keys.opc.expose(), &[7 ^ 0xff; 16]);
    assert!(matches!(m.subscriber, Subscriber::Parent(ref pp) if pp.supi == p));
    assert_eq!(m.amf, Amf([0x80, 0x00]));
}

/// A credential issued before the store is closed is there after `open` opens it again: the
/// same request is answered `AlreadyIssued` with the same sealed bundle. The reopened store.
pub fn reopen_keeps_issued<S: Store>(open: impl Fn() -> S) -> S {
    let request = |p: &Supi| batch(p, T0, vec![BatchItem::Provision(prov("w", 1))]);
    let sealed = {
        let store = open();
        let p = add_parent(&store, 1, 2);
        match &issue(&store, &request(&p))[0] {
            ItemOutcome::Issued { sealed, .. } => sealed.clone(),
            o => panic!("{o:?}"),
        }
    };
    let store = open();
    let out = issue(&store, &request(&supi(1)));
    assert!(matches!(&out[0], ItemOutcome::AlreadyIssued { sealed: s, .. } if *s == sealed));
    store
}

/// Nine threads on three stores (three connections, as three processes would have) each ask
/// for four credentials of one parent allowed ten; the parent and every outcome.
pub fn race_for_quota<S: Store + Sync>(stores: &[S; 3]) -> (Supi, Vec<ItemOutcome>) {
    let p = add_parent(&stores[0], 1, 10);
    let outcomes = std::thread::scope(|s| {
        let handles: Vec<_> = (0..9u8)
            .map(|t| {
                let store = &stores[usize::from(t % 3)];
                let p = &p;
                s.spawn(move || {
                    let items = (0..4u8)
                        .map(|i| {
                            let mut it = prov(&format!("d{t}-{i}"), t);
                            it.request_id.0[1] = i;
                            BatchItem::Provision(it)
                        })
                        .collect();
                    ops::issue_batch(store, &cfg(), &batch(p, T0, items), &sealer()).unwrap()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    });
    (p, outcomes)
}

pub fn issue_narrows_and_seals<S: Store + ?Sized>(store: &S) {
    let p = add_parent(store, 1, 5);
    let mut item = prov("watch-1", 1);
    item.params = RequestedParams {
        lifetime_s: Some(3600),
        roaming: Some(true),
        dnns: vec![dnn("ims")],
        max_bitrate_kbps: Some(5000),
    };
    let out = provision(store, &p, T0, vec![item, prov("watch-2", 2)]);
    assert_eq!(out.len(), 2);
    let (c1, sealed1) = issued(&out[0]);
    let (c2, _) = issued(&out[1]);
    assert_ne!(c1.supi, c2.supi);
    for c in [c1, c2] {
        assert!(c.supi.imsi().starts_with("00101"));
        assert_eq!(c.parent, p);
        assert_eq!(c.status, ChildStatus::Active);
        assert_eq!(c.issued_at, T0);
        assert_eq!(c.amf, Amf::DEFAULT);
    }
    assert_eq!(c1.expires_at, T0.plus_secs(3600));
    assert!(!c1.restrictions.roaming_allowed);
    assert_eq!(c1.restrictions.allowed_dnns, vec![dnn("ims")]);
    assert_eq!(c1.restrictions.max_bitrate_kbps, Some(2000));
    // Defaults: the parent's ceiling and min(parent, operator) lifetime.
    assert_eq!(c2.expires_at, T0.plus_secs(24 * 3600));
    assert_eq!(
        c2.restrictions.allowed_dnns,
        vec![dnn("ims"), dnn("internet")]
    );

    // Stored as returned; the sealer saw the stored K; OPc derives from the operator OP.
    assert_eq!(store.child(&c1.supi).unwrap().as_ref(), Some(c1));
    let m = ops::aka_vector(store, &c1.supi).unwrap();
    assert!(sealed1.windows(16).any(|w| w == m.keys.k.expose()));
    assert_eq!(Milenage::compute_opc(&m.keys.k, &OP), m.keys.opc);
    let m2 = ops::aka_vector(store, &c2.supi).unwrap();
    assert_ne!(m.keys.k, m2.keys.k, "fresh K per child");
    match &m.subscriber {
        Subscriber::Child {
            child,
            parent_status,
        } => {
            assert_eq!(child.supi, c1.supi);
            assert_eq!(*parent_status, SubscriptionStatus::Active);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(store.children_of(&p).unwrap().len(), 2);
    assert_eq!(store.count_active_children(&p, T0).unwrap(), 2);

    let key = IdempotencyKey {
        parent: p.clone(),
        device_id: c1.device_id.clone(),
        request_id: c1.request_id,
    };
    let iss = store.issuance(&key).unwrap().unwrap();
    assert_eq!(iss.sealed, sealed1);
    assert_eq!(iss.kind, IssuanceKind::Provision);

    let audit = store
        .audit(&AuditQuery {
            supi: Some(c1.supi.clone()),
            ..Default::default()
        })
        .unwrap();
    assert_eq!(audit.len(), 1);
    let e = &audit[0].event;
    assert_eq!(e.action, AuditAction::Issue);
    assert_eq!(e.parent.as_ref(), Some(&p));
    assert_eq!(e.device_id.as_ref(), Some(&c1.device_id));
    assert_eq!(e.request_id, Some(c1.request_id));
    assert_eq!(e.actor, format!("gateway:{p}"));
}

pub fn idempotent_replay<S: Store + ?Sized>(store: &S) {
    let p = add_parent(store, 1, 2);
    let b = batch(&p, T0, vec![BatchItem::Provision(prov("watch", 1))]);
    let first = issue(store, &b);
    let (child, sealed) = issued(&first[0]);
    // Retried later, alone and twice in one batch: same bytes, no new credential.
    let later = batch(
        &p,
        T0.plus_secs(60),
        vec![
            BatchItem::Provision(prov("watch", 1)),
            BatchItem::Provision(prov("watch", 1)),
        ],
    );
    for o in issue(store, &later) {
        assert_eq!(
            o,
            ItemOutcome::AlreadyIssued {
                kind: IssuanceKind::Provision,
                child: child.clone(),
                sealed: sealed.to_vec()
            }
        );
    }
    assert_eq!(store.children_of(&p).unwrap().len(), 1);
    // A duplicate inside the first batch is a replay too.
    let out = provision(store, &p, T0, vec![prov("cam", 2), prov("cam", 2)]);
    let (c, s) = issued(&out[0]);
    assert!(
        matches!(&out[1], ItemOutcome::AlreadyIssued { child, sealed, .. } if child == c && sealed.as_slice() == s)
    );
    // Same request ID from the same device with another key: not a retry.
    let mut other_key = prov("watch", 1);
    other_key.device_key_fingerprint = KeyFingerprint([0xee; 32]);
    other_key.device_spki = spki(0xee);
    assert_eq!(
        issue(store, &batch(&p, T0, vec![BatchItem::Provision(other_key)]))[0],
        ItemOutcome::Invalid(Invalid::RequestIdReused)
    );
    // Same request ID for another device is a different request (and here over quota).
    assert_eq!(
        provision_one(store, &p, T0, "lamp", 1)[0],
        ItemOutcome::QuotaExhausted { limit: 2 }
    );
}

pub fn quota_counts_active_unexpired<S: Store + ?Sized>(store: &S) {
    let p = add_parent(store, 1, 2);
    let mut short = prov("a", 1);
    short.params.lifetime_s = Some(10);
    let out = provision(store, &p, T0, vec![short, prov("b", 2), prov("c", 3)]);
    issued(&out[0]);
    issued(&out[1]);
    assert_eq!(out[2], ItemOutcome::QuotaExhausted { limit: 2 });
    assert_eq!(store.count_active_children(&p, T0).unwrap(), 2);
    // After the short one expires a slot is free again.
    let later = T0.plus_secs(10);
    assert_eq!(store.count_active_children(&p, later).unwrap(), 1);
    let out = provision_one(store, &p, later, "c", 3);
    let (c, _) = issued(&out[0]);
    // Revoking frees a slot.
    assert!(ops::revoke_child(store, &c.supi, "op", later).unwrap());
    let out = provision_one(store, &p, later, "d", 4);
    issued(&out[0]);
    // Zero quota.
    let z = add_parent(store, 2, 0);
    assert_eq!(
        provision_one(store, &z, T0, "a", 1)[0],
        ItemOutcome::QuotaExhausted { limit: 0 }
    );
}

pub fn policy_denials<S: Store + ?Sized>(store: &S) {
    let p = add_parent(store, 1, 5);
    let mut bad_dnn = prov("a", 1);
    bad_dnn.params.dnns = vec![dnn("corp")];
    let mut zero = prov("b", 2);
    zero.params.lifetime_s = Some(0);
    let out = issue(
        store,
        &batch(
            &p,
            T0,
            vec![BatchItem::Provision(bad_dnn), BatchItem::Provision(zero)],
        ),
    );
    assert_eq!(
        out,
        vec![
            ItemOutcome::PolicyDenied(Denial::DnnNotAllowed(dnn("corp"))),
            ItemOutcome::Invalid(Invalid::ZeroLifetime)
        ]
    );
    assert!(store.children_of(&p).unwrap().is_empty());
    // The refused request IDs are not burnt: fixing the request works.
    let out = provision_one(store, &p, T0, "a", 1);
    issued(&out[0]);
}

pub fn seal_failure_is_per_item<S: Store + ?Sized>(store: &S) {
    let p = add_parent(store, 1, 2);
    let mut bad = prov("a", 1);
    bad.recipient = b"bad".to_vec();
    let out = provision(store, &p, T0, vec![bad, prov("b", 2), prov("c", 3)]);
    assert!(matches!(&out[0], ItemOutcome::Invalid(Invalid::Seal(m)) if m == "bad recipient key"));
    // The failed item took no SUPI: the store holds exactly the two issued children.
    assert_eq!(store.children_of(&p).unwrap().len(), 2);
    let more = provision_one(store, &p, T0, "d", 4);
    assert!(matches!(more[0], ItemOutcome::QuotaExhausted { limit: 2 }));
    let mut bad = prov("e", 5);
    bad.recipient = b"bad".to_vec();
    ops::revoke_child(store, &issued(&out[1]).0.supi, "test", T0).unwrap();
    let more = provision(store, &p, T0, vec![bad, prov("d", 4)]);
    assert!(matches!(&more[0], ItemOutcome::Invalid(Invalid::Seal(_))));
    issued(&more[1]);
    // Three children in all (one revoked): the second failed seal took nothing either.
    assert_eq!(store.children_of(&p).unwrap().len(), 3);
}

pub fn renewal<S: Store + ?Sized>(store: &S) {
    let p = add_parent(store, 1, 5);
    let out = provision_one(store, &p, T0, "w", 1);
    let (child, _) = issued(&out[0]);
    let k_before = ops::aka_vector(store, &child.supi).unwrap().keys.k;

    // Tighten the parent: renewal re-narrows.
    let tighter = ParentPolicy {
        allowed_dnns: vec![dnn("internet")],
        max_bitrate_kbps: Some(100),
        require_attestation: false,
        ..policy(5)
    };
    ops::set_parent_policy(store, &p, &tighter, "op", T0).unwrap();
    let renew = |req: u8, lifetime: Option<u64>, s: &Supi| {
        BatchItem::Renew(RenewItem {
            attestation: Default::default(),
            child: s.clone(),
            device_id: DeviceId::parse("w").unwrap(),
            device_spki: spki(1),
            request_id: RequestId([req; 16]),
            recipient: b"device-pk".to_vec(),
            lifetime_s: lifetime,
        })
    };
    // Key binding: a renewal (a re-seal of the same K/OPc) signed by any key but the one the
    // child was issued to, or claimed for another device, is refused before anything else.
    for (device, key) in [("w", spki(2)), ("x", spki(1))] {
        let foreign = BatchItem::Renew(RenewItem {
            attestation: Default::default(),
            child: child.supi.clone(),
            device_id: DeviceId::parse(device).unwrap(),
            device_spki: key,
            request_id: RequestId([40; 16]),
            recipient: b"gateway-pk".to_vec(),
            lifetime_s: None,
        });
        assert_eq!(
            issue(store, &batch(&p, T0.plus_secs(50), vec![foreign]))[0],
            ItemOutcome::Invalid(Invalid::KeyNotBound)
        );
    }
    let now = T0.plus_secs(100);
    let out = issue(
        store,
        &batch(&p, now, vec![renew(9, Some(7200), &child.supi)]),
    );
    let (renewed, sealed) = issued(&out[0]);
    assert!(matches!(out[0], ItemOutcome::Renewed { .. }));
    assert_eq!(renewed.supi, child.supi);
    assert_eq!(renewed.expires_at, now.plus_secs(7200));
    assert_eq!(renewed.renewed_at, Some(now));
    assert_eq!(renewed.issued_at, T0);
    assert_eq!(renewed.restrictions.allowed_dnns, vec![dnn("internet")]);
    assert_eq!(renewed.restrictions.max_bitrate_kbps, Some(100));
    assert_eq!(store.child(&child.supi).unwrap().as_ref(), Some(renewed));
    assert_eq!(
        ops::aka_vector(store, &child.supi).unwrap().keys.k,
        k_before
    );
    assert_eq!(store.children_of(&p).unwrap().len(), 1);
    // Replay of the renewal.
    let out2 = issue(
        store,
        &batch(
            &p,
            now.plus_secs(5),
            vec![renew(9, Some(7200), &child.supi)],
        ),
    );
    assert!(
        matches!(&out2[0], ItemOutcome::AlreadyIssued { kind: IssuanceKind::Renew, sealed: s, .. } if s.as_slice() == sealed)
    );
    // Request ID of the original provisioning reused for a renewal: refused.
    assert_eq!(
        issue(store, &batch(&p, now, vec![renew(1, None, &child.supi)]))[0],
        ItemOutcome::Invalid(Invalid::RequestIdReused)
    );
    // Unknown child, and another parent's child: not found.
    let q = add_parent(store, 2, 5);
    assert_eq!(
        issue(store, &batch(&p, now, vec![renew(10, None, &supi(999))]))[0],
        ItemOutcome::NotFound
    );
    assert_eq!(
        issue(store, &batch(&q, now, vec![renew(10, None, &child.supi)]))[0],
        ItemOutcome::NotFound
    );
    // After expiry: refused.
    let expired_at = renewed.expires_at;
    assert_eq!(
        issue(
            store,
            &batch(&p, expired_at, vec![renew(11, None, &child.supi)])
        )[0],
        ItemOutcome::PolicyDenied(Denial::Expired(expired_at))
    );
    // Revoked: refused.
    ops::revoke_child(store, &child.supi, "op", now).unwrap();
    assert_eq!(
        issue(store, &batch(&p, now, vec![renew(12, None, &child.supi)]))[0],
        ItemOutcome::PolicyDenied(Denial::Revoked)
    );
    let audit = store
        .audit(&AuditQuery {
            supi: Some(child.supi.clone()),
            ..Default::default()
        })
        .unwrap();
    let actions: Vec<_> = audit.iter().map(|a| a.event.action).collect();
    assert_eq!(
        actions,
        vec![AuditAction::Issue, AuditAction::Renew, AuditAction::Revoke]
    );
}

pub fn revoke_child<S: Store + ?Sized>(store: &S) {
    let p = add_parent(store, 1, 5);
    let out = provision_one(store, &p, T0, "w", 1);
    let (child, _) = issued(&out[0]);
    assert!(ops::revoke_child(store, &child.supi, "op", T0.plus_secs(1)).unwrap());
    assert!(!ops::revoke_child(store, &child.supi, "op", T0.plus_secs(2)).unwrap());
    let c = store.child(&child.supi).unwrap().unwrap();
    assert_eq!(c.status, ChildStatus::Revoked);
    assert_eq!(c.revoked_at, Some(T0.plus_secs(1)));
    assert!(matches!(
        ops::revoke_child(store, &supi(999), "op", T0),
        Err(StoreError::ChildNotFound(_))
    ));
    // A replay of the provisioning request still answers with the stored credential, whose
    // status now shows it is revoked.
    let out = provision_one(store, &p, T0, "w", 1);
    assert!(
        matches!(&out[0], ItemOutcome::AlreadyIssued { child, .. } if child.status == ChildStatus::Revoked)
    );
}

pub fn parent_lifecycle_cascades<S: Store + ?Sized>(store: &S) {
    let p = add_parent(store, 1, 5);
    let other = add_parent(store, 2, 5);
    let out = provision(store, &p, T0, vec![prov("a", 1), prov("b", 2)]);
    let mut kids: Vec<Supi> = out.iter().map(|o| issued(o).0.supi.clone()).collect();
    // Cascades report children in SUPI order; random SUPIs come in any order.
    kids.sort_by(|a, b| a.as_str().cmp(b.as_str()));
    let out = provision_one(store, &other, T0, "x", 1);
    let other_kid = issued(&out[0]).0.supi.clone();

    let ch = ops::set_parent_status(store, &p, SubscriptionStatus::Suspended, "op", T0).unwrap();
    assert_eq!(ch.from, SubscriptionStatus::Active);
    assert_eq!(ch.revoked_children, kids);
    for k in &kids {
        assert_eq!(
            store.child(k).unwrap().unwrap().status,
            ChildStatus::Revoked
        );
    }
    assert_eq!(
        store.child(&other_kid).unwrap().unwrap().status,
        ChildStatus::Active
    );
    assert_eq!(store.count_active_children(&p, T0).unwrap(), 0);
    // A suspended parent gets nothing, replays included.
    let out = provision(store, &p, T0, vec![prov("a", 1), prov("c", 3)]);
    assert!(
        out.iter()
            .all(|o| *o == ItemOutcome::ParentInactive(SubscriptionStatus::Suspended))
    );
    // Setting the same status again is a no-op.
    let again = ops::set_parent_status(store, &p, SubscriptionStatus::Suspended, "op", T0).unwrap();
    assert!(again.revoked_children.is_empty());
    // Resume: parent active again, children stay revoked, new ones can be issued.
    ops::set_parent_status(store, &p, SubscriptionStatus::Active, "op", T0).unwrap();
    assert_eq!(
        store.child(&kids[0]).unwrap().unwrap().status,
        ChildStatus::Revoked
    );
    let out = provision_one(store, &p, T0, "c", 3);
    let new_kid = issued(&out[0]).0.supi.clone();
    // Revoke: terminal, cascades.
    let ch = ops::set_parent_status(store, &p, SubscriptionStatus::Revoked, "op", T0).unwrap();
    assert_eq!(ch.revoked_children, vec![new_kid]);
    assert!(matches!(
        ops::set_parent_status(store, &p, SubscriptionStatus::Active, "op", T0),
        Err(StoreError::InvalidTransition { .. })
    ));
    assert!(matches!(
        ops::set_parent_status(store, &supi(77), SubscriptionStatus::Revoked, "op", T0),
        Err(StoreError::ParentNotFound(_))
    ));
    let m = ops::aka_vector(store, &kids[0]).unwrap();
    assert!(matches!(
        m.subscriber,
        Subscriber::Child {
            parent_status: SubscriptionStatus::Revoked,
            ..
        }
    ));
    let audit = store
        .audit(&AuditQuery {
            supi: Some(p.clone()),
            limit: 1000,
            ..Default::default()
        })
        .unwrap();
    let parent_actions: Vec<_> = audit
        .iter()
        .filter(|a| a.event.supi == p)
        .map(|a| a.event.action)
        .collect();
    assert_eq!(
        parent_actions,
        vec![
            AuditAction::Add,
            AuditAction::Suspend,
            AuditAction::Resume,
            AuditAction::Revoke
        ]
    );
    let child_revokes = audit
        .iter()
        .filter(|a| a.event.parent.as_ref() == Some(&p) && a.event.action == AuditAction::Revoke)
        .count();
    assert_eq!(child_revokes, 3);
}

pub fn batch_errors_commit_nothing<S: Store + ?Sized>(store: &S) {
    let p = add_parent(store, 1, 100);
    assert!(matches!(
        ops::issue_batch(
            store,
            &cfg(),
            &batch(&supi(5), T0, vec![BatchItem::Provision(prov("a", 1))]),
            &sealer()
        ),
        Err(StoreError::ParentNotFound(_))
    ));
    let big: Vec<BatchItem> = (0..65u8)
        .map(|i| BatchItem::Provision(prov("a", i)))
        .collect();
    assert!(matches!(
        ops::issue_batch(store, &cfg(), &batch(&p, T0, big), &sealer()),
        Err(StoreError::BatchTooLarge { len: 65, max: 64 })
    ));
    // Range of two SUPIs, three requests: the batch fails as a whole.
    let tiny = config(5, 6);
    let three: Vec<BatchItem> = (0..3u8)
        .map(|i| BatchItem::Provision(prov("a", i)))
        .collect();
    assert!(matches!(
        ops::issue_batch(store, &tiny, &batch(&p, T0, three), &sealer()),
        Err(StoreError::ImsiRangeExhausted(_))
    ));
    assert!(store.children_of(&p).unwrap().is_empty());
    assert!(
        store
            .audit(&AuditQuery {
                supi: Some(p.clone()),
                ..Default::default()
            })
            .unwrap()
            .iter()
            .all(|a| a.event.action == AuditAction::Add)
    );
}

pub fn supi_allocation_skips_taken<S: Store + ?Sized>(store: &S) {
    // A range of four SUPIs with a parent's SUPI inside it: the three others are handed out
    // (in random order), never the parent's.
    let range = config(9_000_000_000, 9_000_000_003);
    let p = add_parent(store, 9_000_000_001, 10);
    let out = ops::issue_batch(
        store,
        &range,
        &batch(
            &p,
            T0,
            vec![
                BatchItem::Provision(prov("a", 1)),
                BatchItem::Provision(prov("b", 2)),
            ],
        ),
        &sealer(),
    )
    .unwrap();
    let mut got: Vec<Supi> = out.iter().map(|o| issued(o).0.supi.clone()).collect();
    // A request whose sealing failed consumes no SUPI: the last free one is still there.
    let mut bad = prov("c", 3);
    bad.recipient = b"bad".to_vec();
    ops::issue_batch(
        store,
        &range,
        &batch(&p, T0, vec![BatchItem::Provision(bad)]),
        &sealer(),
    )
    .unwrap();
    let out = ops::issue_batch(
        store,
        &range,
        &batch(&p, T0, vec![BatchItem::Provision(prov("d", 4))]),
        &sealer(),
    )
    .unwrap();
    got.push(issued(&out[0]).0.supi.clone());
    got.sort_by(|a, b| a.as_str().cmp(b.as_str()));
    assert_eq!(
        got,
        vec![
            supi(9_000_000_000),
            supi(9_000_000_002),
            supi(9_000_000_003)
        ]
    );
    // Full: the next request fails with range exhausted, and takes nothing.
    assert!(matches!(
        ops::issue_batch(
            store,
            &range,
            &batch(&p, T0, vec![BatchItem::Provision(prov("e", 5))]),
            &sealer(),
        ),
        Err(StoreError::ImsiRangeExhausted(_))
    ));
    assert_eq!(store.children_of(&p).unwrap().len(), 3);
    // Importing a parent over an existing child SUPI is refused.
    let dup = add_zero_key_parent(store, supi(9_000_000_000));
    assert!(matches!(dup, Err(StoreError::Duplicate(_))));
}

/// Issues `n` children of `p` from `range` in batches of at most 64; returns their SUPIs'
/// MSINs in the order they were issued.
pub fn issue_many<S: Store + ?Sized>(
    store: &S,
    range: &IssuerConfig,
    p: &Supi,
    n: usize,
) -> Vec<u64> {
    let mut msins = Vec::new();
    let mut i = 0usize;
    while i < n {
        let items: Vec<BatchItem> = (i..n.min(i + 64))
            .map(|j| {
                let mut it = prov(&format!("dev-{j}"), u8::try_from(j % 256).unwrap());
                it.request_id = RequestId([u8::try_from(j / 256).unwrap(); 16]);
                it.request_id.0[0] = u8::try_from(j % 256).unwrap();
                BatchItem::Provision(it)
            })
            .collect();
        i += items.len();
        for o in ops::issue_batch(store, range, &batch(p, T0, items), &sealer()).unwrap() {
            let s = issued(&o).0.supi.as_str().to_owned();
            msins.push(s[s.len() - 10..].parse().unwrap());
        }
    }
    msins
}

/// Child SUPIs are not sequential: drawn at random over the range, never twice, and a nearly
/// full small range is filled to the last SUPI without a collision.
pub fn supi_allocation_is_unpredictable<S: Store + ?Sized>(store: &S) {
    // A large range: 200 children. Sequential allocation gives gaps of exactly 1.
    let p = add_parent(store, 1, 1000);
    let msins = issue_many(store, &cfg(), &p, 200);
    let mut sorted = msins.clone();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(sorted.len(), 200, "a SUPI was handed out twice");
    let consecutive = msins.windows(2).filter(|w| w[1] == w[0] + 1).count();
    // Uniform draws over 10^6 SUPIs: a consecutive pair has probability ~10^-6 each.
    assert!(
        consecutive < 5,
        "{consecutive} of 199 allocations were sequential"
    );
    let (lo, hi) = (sorted[0], sorted[199]);
    assert!(
        hi - lo > 500_000,
        "200 draws over 10^6 spread over {lo}..{hi} only"
    );

    // A small range, nearly full before it starts: 50 SUPIs, two of them parents'. All 48
    // free ones are handed out, each once, then the range is exhausted.
    let small = config(9_100_000_000, 9_100_000_049);
    add_parent(store, 9_100_000_007, 1);
    add_parent(store, 9_100_000_031, 1);
    let q = add_parent(store, 2, 1000);
    let msins = issue_many(store, &small, &q, 48);
    let mut sorted = msins.clone();
    sorted.sort_unstable();
    let expected: Vec<u64> = (9_100_000_000..=9_100_000_049)
        .filter(|m| *m != 9_100_000_007 && *m != 9_100_000_031)
        .collect();
    assert_eq!(sorted, expected);
    assert_ne!(msins, expected, "the small range was filled in order");
    assert!(matches!(
        ops::issue_batch(
            store,
            &small,
            &batch(&q, T0, vec![BatchItem::Provision(prov("last", 1))]),
            &sealer()
        ),
        Err(StoreError::ImsiRangeExhausted(_))
    ));
}

pub fn sqn_advances_and_resyncs<S: Store + ?Sized>(store: &S) {
    let p = add_parent(store, 1, 5);
    let a = ops::aka_vector(store, &p).unwrap().sqn;
    let b = ops::aka_vector(store, &p).unwrap().sqn;
    assert_eq!(a, next_sqn(Sqn::ZERO));
    assert_eq!(b, next_sqn(a));
    assert_eq!(store.parent(&p).unwrap().unwrap().sqn, b);
    let sqn_ms = Sqn::from_parts(1000, 3).unwrap();
    ops::apply_resync(store, &p, sqn_ms).unwrap();
    assert_eq!(
        ops::aka_vector(store, &p).unwrap().sqn,
        sqn_after_resync(sqn_ms)
    );
    // Children have their own SQN.
    let out = provision_one(store, &p, T0, "a", 1);
    let c = issued(&out[0]).0.supi.clone();
    assert_eq!(ops::aka_vector(store, &c).unwrap().sqn, next_sqn(Sqn::ZERO));
    assert!(matches!(
        ops::aka_vector(store, &supi(999)),
        Err(StoreError::UnknownSupi(_))
    ));
    assert!(matches!(
        ops::apply_resync(store, &supi(999), sqn_ms),
        Err(StoreError::UnknownSupi(_))
    ));
}

pub fn sqn_unique_under_concurrency<S: Store + ?Sized>(store: &S) {
    let p = add_parent(store, 1, 5);
    let seen: Vec<Vec<Sqn>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..8)
            .map(|_| {
                s.spawn(|| {
                    (0..25)
                        .map(|_| ops::aka_vector(store, &p).unwrap().sqn)
                        .collect()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let all: HashSet<Sqn> = seen.iter().flatten().copied().collect();
    assert_eq!(all.len(), 200);
}

pub fn aka_failure_counter<S: Store + ?Sized>(store: &S) {
    let p = add_parent(store, 1, 5);
    assert_eq!(store.aka_failures(&p).unwrap().count, 0);
    for i in 1..=3u32 {
        let f = ops::record_aka_failure(store, &p, T0.plus_secs(u64::from(i))).unwrap();
        assert_eq!(f.count, i);
        assert_eq!(f.first_at, Some(T0.plus_secs(1)));
        assert_eq!(f.last_at, Some(T0.plus_secs(u64::from(i))));
    }
    assert_eq!(store.aka_failures(&p).unwrap().count, 3);
    ops::clear_aka_failures(store, &p).unwrap();
    assert_eq!(store.aka_failures(&p).unwrap().count, 0);
}

pub fn audit_paging<S: Store + ?Sized>(store: &S) {
    for n in 1..=5 {
        add_parent(store, n, 1);
    }
    let all = store.audit(&AuditQuery::default()).unwrap();
    assert_eq!(all.len(), 5);
    assert!(all.windows(2).all(|w| w[0].id < w[1].id));
    let page = store
        .audit(&AuditQuery {
            after_id: Some(all[1].id),
            limit: 2,
            ..Default::default()
        })
        .unwrap();
    assert_eq!(
        page.iter().map(|r| r.id).collect::<Vec<_>>(),
        vec![all[2].id, all[3].id]
    );
    assert!(
        all.iter()
            .all(|r| r.event.at == T0 && r.event.actor == "test")
    );
}

const CSV_HEADER: &str = "supi,k,opc,amf,sqn,max_children,max_lifetime_s,roaming,dnns\n";

fn csv_row(n: u64) -> String {
    format!(
        "imsi-00101{n:010},{:032x},{:032x},8000,{n},3,86400,{},internet;ims\n",
        u128::from(n) + 1,
        u128::from(n) << 64 | 7,
        n.is_multiple_of(2)
    )
}

pub fn import_all_or_nothing<S: Store + ?Sized>(store: &S) {
    add_parent(store, 5, 1);
    // Bad syntax on line 4: nothing imported.
    let bad = format!("{CSV_HEADER}{}{}imsi-1,zz\n", csv_row(1), csv_row(2));
    let e = import::import_csv(store, bad.as_bytes(), "import", T0).unwrap_err();
    assert!(matches!(e, import::ImportError::Row { line: 4, .. }), "{e}");
    // Line 3 collides with a subscriber already in the database: nothing imported.
    let dup = format!("{CSV_HEADER}{}{}{}", csv_row(1), csv_row(5), csv_row(6));
    let e = import::import_csv(store, dup.as_bytes(), "import", T0).unwrap_err();
    assert!(matches!(e, import::ImportError::Row { line: 3, .. }), "{e}");
    assert_eq!(store.count_parents().unwrap(), 1);
    assert!(store.parent(&supi(1)).unwrap().is_none());
    // A good file.
    let good = format!("{CSV_HEADER}{}{}", csv_row(1), csv_row(2));
    assert_eq!(
        import::import_csv(store, good.as_bytes(), "import", T0).unwrap(),
        2
    );
    let p = store.parent(&supi(2)).unwrap().unwrap();
    assert!(p.policy.roaming_allowed);
    assert_eq!(p.sqn, Sqn::new(2).unwrap());
    assert_eq!(p.policy.max_children, 3);
    let m = ops::aka_vector(store, &supi(1)).unwrap();
    assert_eq!(m.keys.k.expose(), &2u128.to_be_bytes());
    assert_eq!(m.keys.opc.expose(), &(1u128 << 64 | 7).to_be_bytes());
    let audit = store
        .audit(&AuditQuery {
            supi: Some(supi(2)),
            ..Default::default()
        })
        .unwrap();
    assert_eq!(audit.len(), 1);
    assert_eq!(audit[0].event.action, AuditAction::Import);
    assert_eq!(audit[0].event.detail, "line 3");
}

pub fn import_ten_thousand<S: Store + ?Sized>(store: &S) {
    let mut csv = String::from(CSV_HEADER);
    for n in 0..10_000 {
        csv.push_str(&csv_row(100_000 + n));
    }
    let start = std::time::Instant::now();
    assert_eq!(
        import::import_csv(store, csv.as_bytes(), "import", T0).unwrap(),
        10_000
    );
    eprintln!("imported 10,000 subscribers in {:?}", start.elapsed());
    assert_eq!(store.count_parents().unwrap(), 10_000);
    let last = store.parent(&supi(109_999)).unwrap().unwrap();
    assert_eq!(last.status, SubscriptionStatus::Active);
    assert_eq!(store.list_parents(None, 20_000).unwrap().len(), 10_000);
}

/// Many threads race batches for the last quota slots of a few parents: no parent ever exceeds
/// its quota and no SUPI is handed out twice.
pub fn concurrent_batches_respect_quota<S: Store + ?Sized>(store: &S) {
    const PARENTS: u64 = 3;
    const QUOTA: u32 = 7;
    const THREADS: u8 = 12;
    const PER_BATCH: u8 = 3;
    const ROUNDS: u8 = 4;
    let parents: Vec<Supi> = (1..=PARENTS).map(|n| add_parent(store, n, QUOTA)).collect();
    let outcomes: Vec<ItemOutcome> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..THREADS)
            .map(|t| {
                let parents = &parents;
                s.spawn(move || {
                    let sealer = sealer();
                    let mut out = Vec::new();
                    for r in 0..ROUNDS {
                        let p = &parents[usize::from((t + r) % PARENTS as u8)];
                        let items = (0..PER_BATCH)
                            .map(|i| {
                                let mut it = prov(&format!("dev-{t}-{r}-{i}"), t);
                                it.request_id =
                                    RequestId([t, r, i, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
                                BatchItem::Provision(it)
                            })
                            .collect();
                        out.extend(
                            ops::issue_batch(store, &cfg(), &batch(p, T0, items), &sealer).unwrap(),
                        );
                    }
                    out
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    });
    let total = usize::from(THREADS) * usize::from(ROUNDS) * usize::from(PER_BATCH);
    assert_eq!(outcomes.len(), total);
    let issued: Vec<&ChildCredential> = outcomes
        .iter()
        .filter_map(|o| match o {
            ItemOutcome::Issued { child, .. } => Some(child),
            _ => None,
        })
        .collect();
    let exhausted = outcomes
        .iter()
        .filter(|o| matches!(o, ItemOutcome::QuotaExhausted { limit: QUOTA }))
        .count();
    assert_eq!(issued.len(), PARENTS as usize * QUOTA as usize);
    assert_eq!(issued.len() + exhausted, total);
    let supis: HashSet<&Supi> = issued.iter().map(|c| &c.supi).collect();
    assert_eq!(supis.len(), issued.len(), "a SUPI was issued twice");
    for p in &parents {
        assert_eq!(store.count_active_children(p, T0).unwrap(), QUOTA);
        assert_eq!(store.children_of(p).unwrap().len(), QUOTA as usize);
    }
}

/// Manufacturer roots (PROTOCOL.md §4.5): installed by name, unique by name and by certificate,
/// listed by name, removed by name.
pub fn manufacturer_roots<S: Store + ?Sized>(store: &S) {
    let root = |name: &str, fp: u8| ManufacturerRoot {
        name: name.to_owned(),
        cert_der: vec![0x30, 0x03, 0x02, 0x01, fp],
        fingerprint: [fp; 32],
        subject: format!("CN={name}"),
        added_at: T0,
    };
    assert!(store.manufacturer_roots().unwrap().is_empty());
    store.add_manufacturer_root(&root("zeta", 1)).unwrap();
    store.add_manufacturer_root(&root("acme", 2)).unwrap();
    assert!(matches!(
        store.add_manufacturer_root(&root("acme", 3)),
        Err(StoreError::RootExists(_))
    ));
    assert!(matches!(
        store.add_manufacturer_root(&root("other-name", 1)),
        Err(StoreError::RootExists(_))
    ));
    let all = store.manufacturer_roots().unwrap();
    assert_eq!(all, vec![root("acme", 2), root("zeta", 1)]);
    assert!(store.remove_manufacturer_root("acme").unwrap());
    assert!(!store.remove_manufacturer_root("acme").unwrap());
    assert_eq!(store.manufacturer_roots().unwrap(), vec![root("zeta", 1)]);
}

/// The quota count of a batch (`WriteTx::count_active_children`: the parent's counter after
/// reconciliation) at `now`, as `issue_batch` reads it: parent locked first.
pub fn counted<S: Store + ?Sized>(store: &S, p: &Supi, now: Timestamp) -> u32 {
    transact(store, |tx| {
        tx.lock_parent(p)?;
        tx.count_active_children(p, now)
    })
    .unwrap()
}

/// Property: after any sequence of issues (short and long lifetimes), renewals, revocations,
/// suspend/resume cascades and clock moves (backwards too, as between instances whose clocks
/// differ), the O(1) counter the quota check reads equals the scan of the parent's active,
/// unexpired children, at the current time and at another one.
pub fn live_counter_matches_scan<S: Store + ?Sized>(store: &S) {
    use proptest::prelude::*;
    use proptest::test_runner::{Config, TestRunner};
    static NEXT_PARENT: AtomicU64 = AtomicU64::new(5000);
    let mut runner = TestRunner::new(Config {
        cases: 24,
        failure_persistence: None,
        ..Config::default()
    });
    let ops = proptest::collection::vec((0u8..6, 0u32..1000), 1..40);
    runner
        .run(&ops, |ops| {
            let p = add_parent(store, NEXT_PARENT.fetch_add(1, Ordering::Relaxed), 5);
            let mut t = T0;
            let mut children: Vec<(Supi, u8)> = Vec::new();
            let mut next_req = 0u8;
            let mut renewals = 0u16;
            for (op, arg) in ops {
                match op {
                    0 | 1 => {
                        let items = (0..arg % 4 + 1)
                            .map(|_| {
                                next_req = next_req.wrapping_add(1);
                                let mut it = prov(&format!("d{next_req}"), next_req);
                                it.params.lifetime_s = Some(u64::from(10 + arg % 3 * 50));
                                BatchItem::Provision(it)
                            })
                            .collect();
                        for o in issue(store, &batch(&p, t, items)) {
                            if let ItemOutcome::Issued { child, .. } = o {
                                let req = child.request_id.0[0];
                                children.push((child.supi, req));
                            }
                        }
                    }
                    2 if !children.is_empty() => {
                        let (c, _) = &children[arg as usize % children.len()];
                        ops::revoke_child(store, c, "op", t).unwrap();
                    }
                    3 if !children.is_empty() => {
                        let (c, req) = &children[arg as usize % children.len()];
                        renewals += 1;
                        let [r0, r1] = renewals.to_be_bytes();
                        let mut request_id = [0u8; 16];
                        request_id[..4].copy_from_slice(&[*req, 0xee, r0, r1]);
                        issue(
                            store,
                            &batch(
                                &p,
                                t,
                                vec![BatchItem::Renew(RenewItem {
                                    attestation: Default::default(),
                                    child: c.clone(),
                                    device_id: DeviceId::parse(&format!("d{req}")).unwrap(),
                                    device_spki: spki(*req),
                                    request_id: RequestId(request_id),
                                    recipient: b"device-pk".to_vec(),
                                    lifetime_s: Some(u64::from(arg % 200 + 1)),
                                })],
                            ),
                        );
                    }
                    4 => t = Timestamp(t.0 + i64::from(arg % 120) - 40),
                    5 if arg % 5 == 0 => {
                        ops::set_parent_status(store, &p, SubscriptionStatus::Suspended, "op", t)
                            .unwrap();
                        ops::set_parent_status(store, &p, SubscriptionStatus::Active, "op", t)
                            .unwrap();
                    }
                    _ => {}
                }
                let other = Timestamp(t.0 + i64::from(arg % 200) - 100);
                for now in [t, other, t] {
                    prop_assert_eq!(
                        counted(store, &p, now),
                        store.count_active_children(&p, now).unwrap(),
                        "counter and scan differ at {:?}",
                        now
                    );
                }
            }
            Ok(())
        })
        .unwrap();
}

/// Rows written by a schema-v4 program, for the v5 backfill tests: `blob(n)` is an `n`-byte
/// literal and `f` the false literal of the engine. Parent 1 has 3 live children (expiring
/// at T0 + 100), 2 active but expired at T0 - 1 and 2 revoked; parent 2 has none.
pub fn v4_rows_sql(blob: impl Fn(usize) -> String, f: &str) -> String {
    let mut sql = String::new();
    for n in [1u64, 2] {
        sql += &format!(
            "INSERT INTO parents (supi, k_enc, opc_enc, amf, sqn, status, max_children, \
             max_lifetime_s, roaming_allowed, allowed_dnns, max_bitrate_kbps, created_at, \
             updated_at) VALUES ('{}', {}, {}, {}, 0, 'active', 10, 3600, {f}, '', NULL, {t}, {t});\n",
            supi(n),
            blob(40),
            blob(40),
            blob(2),
            t = T0.0,
        );
    }
    let rows = [
        (3, T0.0 + 100, "active"),
        (2, T0.0 - 1, "active"),
        (2, T0.0 + 100, "revoked"),
    ];
    let mut m = 100u64;
    for (count, expires, status) in rows {
        for _ in 0..count {
            m += 1;
            sql += &format!(
                "INSERT INTO children (supi, parent_supi, device_id, device_key_fp, request_id, \
                 k_enc, opc_enc, amf, sqn, issued_at, expires_at, renewed_at, roaming_allowed, \
                 allowed_dnns, max_bitrate_kbps, status, revoked_at) VALUES ('{}', '{}', 'd{m}', \
                 {}, {}, {}, {}, {}, 0, {}, {expires}, NULL, {f}, '', NULL, '{status}', NULL);\n",
                supi(m),
                supi(1),
                blob(32),
                blob(16),
                blob(40),
                blob(40),
                blob(2),
                T0.0 - 3600,
            );
        }
    }
    sql
}

/// After the v5 migration over [`v4_rows_sql`]: the backfilled counter, reconciled, is the
/// scan at every time, and a batch respects the quota it gives.
pub fn check_backfill<S: Store + ?Sized>(store: &S) {
    let (p1, p2) = (supi(1), supi(2));
    for now in [T0, Timestamp(T0.0 - 10), T0.plus_secs(200), T0] {
        assert_eq!(
            counted(store, &p1, now),
            store.count_active_children(&p1, now).unwrap()
        );
        assert_eq!(counted(store, &p2, now), 0);
    }
    assert_eq!(counted(store, &p1, T0), 3);
    assert_eq!(counted(store, &p1, Timestamp(T0.0 - 10)), 5);
    // Quota 10 with 3 live: exactly 7 more.
    let items = (0..9u8)
        .map(|i| BatchItem::Provision(prov(&format!("n{i}"), i)))
        .collect();
    let out = issue(store, &batch(&p1, T0, items));
    let n = out
        .iter()
        .filter(|o| matches!(o, ItemOutcome::Issued { .. }))
        .count();
    assert_eq!(n, 7);
    assert_eq!(counted(store, &p1, T0), 10);
    assert_eq!(store.count_active_children(&p1, T0).unwrap(), 10);
}

/// The sync outbox (docs/OPERATIONS.md, "With Open5GS"): off, nothing is recorded; on, every
/// child lifecycle change records a row in its own transaction, an acknowledgement removes the
/// rows it covered (and no later ones), and expired credentials still in the core are found.
pub fn sync_outbox_follows_lifecycle<S: Store + ?Sized>(store: &S) {
    let pending = |s: &S| -> Vec<(Supi, Timestamp)> {
        s.sync_pending(100)
            .unwrap()
            .into_iter()
            .map(|e| (e.supi, e.created_at))
            .collect()
    };
    let p = add_parent(store, 1, 5);
    assert!(!store.sync_outbox());
    let out = provision_one(store, &p, T0, "off", 9);
    let untracked = issued(&out[0]).0.supi.clone();
    assert!(pending(store).is_empty(), "outbox off: nothing recorded");
    assert_eq!(store.sync_state(&untracked).unwrap(), None);

    store.set_sync_outbox(true);
    assert!(store.sync_outbox());
    let out = provision(store, &p, T0, vec![prov("a", 1), prov("b", 2)]);
    let a = issued(&out[0]).0.clone();
    let b = issued(&out[1]).0.clone();
    let rows = pending(store);
    assert_eq!(rows.len(), 2);
    assert!(rows.contains(&(a.supi.clone(), T0)) && rows.contains(&(b.supi.clone(), T0)));
    // A replay commits nothing new, so it records nothing.
    provision_one(store, &p, T0, "a", 1);
    assert_eq!(pending(store).len(), 2);
    let backlog = store.sync_backlog().unwrap();
    assert_eq!((backlog.pending, backlog.oldest), (2, Some(T0)));

    // Renewal.
    let t1 = T0.plus_secs(10);
    let renew = BatchItem::Renew(RenewItem {
        attestation: Default::default(),
        child: a.supi.clone(),
        device_id: DeviceId::parse("a").unwrap(),
        device_spki: spki(1),
        request_id: RequestId([50; 16]),
        recipient: b"device-pk".to_vec(),
        lifetime_s: Some(3600),
    });
    let out = issue(store, &batch(&p, t1, vec![renew]));
    assert!(matches!(out[0], ItemOutcome::Renewed { .. }), "{out:?}");
    let rows = store.sync_pending(100).unwrap();
    assert_eq!(rows.len(), 3);
    assert_eq!(rows[2].supi, a.supi);
    assert!(rows[0].id < rows[1].id && rows[1].id < rows[2].id);
    assert_eq!(
        store.sync_state(&a.supi).unwrap(),
        Some(SyncState {
            present: None,
            pushed_at: None,
            pending: 2
        })
    );

    // An acknowledgement up to the first row of `a` keeps its later row.
    let first_a = rows.iter().find(|r| r.supi == a.supi).unwrap().id;
    transact(store, |tx| tx.ack_sync(&a.supi, first_a, true, t1)).unwrap();
    assert_eq!(
        store.sync_state(&a.supi).unwrap(),
        Some(SyncState {
            present: Some(true),
            pushed_at: Some(t1),
            pending: 1
        })
    );
    transact(store, |tx| tx.ack_sync(&a.supi, rows[2].id, true, t1)).unwrap();
    transact(store, |tx| {
        tx.ack_sync(&b.supi, rows[1].id.max(rows[0].id), true, t1)
    })
    .unwrap();
    assert!(pending(store).is_empty());
    assert_eq!(store.sync_backlog().unwrap().pending, 0);
    assert_eq!(store.sync_backlog().unwrap().oldest, None);

    // Expiry: the sweeper's query finds a credential still in the core once it expired.
    let a_exp = store.child(&a.supi).unwrap().unwrap().expires_at;
    let b_exp = store.child(&b.supi).unwrap().unwrap().expires_at;
    assert_ne!(a_exp, b_exp);
    let (first, first_exp, second, second_exp) = if a_exp < b_exp {
        (&a.supi, a_exp, &b.supi, b_exp)
    } else {
        (&b.supi, b_exp, &a.supi, a_exp)
    };
    assert!(
        store
            .sync_expired(Timestamp(first_exp.0 - 1), 10)
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        store.sync_expired(first_exp, 10).unwrap(),
        vec![first.clone()]
    );
    // Queued for deletion: no longer reported.
    transact(store, |tx| tx.enqueue_sync(first, first_exp)).unwrap();
    assert!(store.sync_expired(first_exp, 10).unwrap().is_empty());
    let id = store.sync_pending(10).unwrap()[0].id;
    transact(store, |tx| tx.ack_sync(first, id, false, first_exp)).unwrap();
    assert_eq!(
        store.sync_expired(second_exp, 10).unwrap(),
        vec![second.clone()]
    );

    // Revoking a child, and suspending the parent (which revokes the rest), record rows.
    let t2 = T0.plus_secs(20);
    assert!(ops::revoke_child(store, &a.supi, "op", t2).unwrap());
    assert_eq!(pending(store), vec![(a.supi.clone(), t2)]);
    let out = provision_one(store, &p, t2, "c", 3);
    let c = issued(&out[0]).0.clone();
    let ch = ops::set_parent_status(store, &p, SubscriptionStatus::Suspended, "op", t2).unwrap();
    assert!(ch.revoked_children.contains(&c.supi));
    let rows = pending(store);
    // The untracked child issued while the outbox was off is revoked too: recorded now.
    for s in [&a.supi, &c.supi, &untracked] {
        assert!(rows.iter().any(|(x, _)| x == s), "{s} not queued: {rows:?}");
    }
    // A failed transaction records nothing.
    let before = pending(store).len();
    assert!(ops::revoke_child(store, &supi(999), "op", t2).is_err());
    assert_eq!(pending(store).len(), before);
    store.set_sync_outbox(false);
}

/// The pusher lease of a fleet: one holder at a time; it renews its own lease; another takes
/// over only once the lease has ended; the old holder then no longer holds it.
pub fn sync_lease_admits_one_pusher_at_a_time<S: Store + ?Sized>(store: &S) {
    let lease = |who: &str, now: i64| -> bool {
        transact(store, |tx| {
            tx.sync_lease(who, Timestamp(now), Timestamp(now + 10))
        })
        .unwrap()
    };
    assert!(lease("a", 100), "a free lease is taken");
    assert!(!lease("b", 105), "b must wait while a's lease runs");
    assert!(lease("a", 108), "a renews its own lease (now until 118)");
    assert!(!lease("b", 117), "a's renewal holds b off");
    assert!(!lease("b", 118), "the lease runs to its end inclusive");
    assert!(lease("b", 119), "b takes over once a stopped renewing");
    assert!(!lease("a", 120), "a lost it: it must not push any more");
    assert!(lease("b", 125));
}
