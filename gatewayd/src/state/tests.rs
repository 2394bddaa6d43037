//! Unit tests of the gateway database.

use super::*;
use std::net::IpAddr;

use companion_proto::binding::KeyBinding;
use companion_proto::{DeviceId, RequestId, Supi};
use std::os::unix::fs::PermissionsExt;

fn dev(s: &str) -> DeviceId {
    DeviceId::new(s).unwrap()
}

fn supi(n: u32) -> Supi {
    Supi::new(&format!("imsi-00101{n:010}")).unwrap()
}

fn pairing(id: &str, key: u8) -> Pairing {
    let spki = vec![0x30, 0x03, key, key, key];
    Pairing {
        device_id: dev(id),
        fingerprint: companion_transport::spki_fingerprint(&spki),
        spki_der: spki,
        label: Some(format!("{id} label")),
        paired_at: 1000,
        paired_via: PairedVia::Code,
    }
}

fn request(id: u8, device: &str) -> OutstandingRequest {
    OutstandingRequest {
        request_id: RequestId([id; 16]),
        device_id: dev(device),
        kind: RequestKind::Provision,
        hpke_public_key: vec![9; 32],
        binding: Some(vec![4, 3, 1, 2, 3]),
        renewal_binding: None,
        created_at: 2000 + i64::from(id),
        params: None,
        renew_supi: None,
    }
}

fn delivery(id: u8, device: &str, n: u32) -> PendingDelivery {
    PendingDelivery {
        request_id: RequestId([id; 16]),
        device_id: dev(device),
        supi: supi(n),
        expires_at: 100_000,
        sealed: vec![id; 100],
        created_at: 3000,
    }
}

#[test]
fn group_commit_isolates_a_failing_write() {
    // Many writers at once land in shared group commits; the one that breaks a uniqueness
    // rule is rolled back to its savepoint without taking the others with it.
    let dir = tempfile::tempdir().unwrap();
    let s = Arc::new(State::open(dir.path()).unwrap());
    let handles: Vec<_> = (0..64u8)
        .map(|i| {
            let s = s.clone();
            // Requests 0 and 63 are for the same device: exactly one of them must fail.
            let device = if i == 63 {
                "d-0".to_string()
            } else {
                format!("d-{i}")
            };
            std::thread::spawn(move || s.insert_request(&request(i, &device)))
        })
        .collect();
    let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let conflicts = results
        .iter()
        .filter(|r| matches!(r, Err(StateError::Conflict(_))))
        .count();
    assert_eq!(conflicts, 1, "{results:?}");
    assert_eq!(results.iter().filter(|r| r.is_ok()).count(), 63);
    assert_eq!(s.counts().unwrap().outstanding_requests, 63);
    assert_eq!(s.outstanding_requests().unwrap().len(), 63);
}

#[test]
fn async_group_writes_are_durable_when_answered() {
    let dir = tempfile::tempdir().unwrap();
    let s = Arc::new(State::open(dir.path()).unwrap());
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut set = tokio::task::JoinSet::new();
        for i in 0..100u8 {
            let s = s.clone();
            set.spawn(async move { s.insert_request_async(request(i, &format!("d-{i}"))).await });
        }
        while let Some(r) = set.join_next().await {
            r.unwrap().unwrap();
        }
        // One CN batch's answers in one savepoint.
        let ds: Vec<_> = (0..100u8)
            .map(|i| delivery(i, &format!("d-{i}"), u32::from(i)))
            .collect();
        s.record_issued_all_async(ds).await.unwrap();
        let ack = s
            .acknowledge_async(dev("d-7"), RequestId([7; 16]), 4000)
            .await
            .unwrap();
        assert_eq!(ack, AckOutcome::Acknowledged);
    });
    // A second connection (as after a restart) sees everything answered above.
    drop(s);
    let s = State::open(dir.path()).unwrap();
    let c = s.counts().unwrap();
    assert_eq!(c.outstanding_requests, 0);
    assert_eq!(c.credentials, 100);
    assert_eq!(c.pending_deliveries, 99);
}

#[test]
fn fresh_database_is_private_and_migrated() {
    let dir = tempfile::tempdir().unwrap();
    let sub = dir.path().join("state");
    let s = State::open(&sub).unwrap();
    assert_eq!(s.schema_version().unwrap(), MIGRATIONS.len() as u32);
    let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&sub), 0o700);
    assert_eq!(mode(s.path()), 0o600);
    assert_eq!(s.counts().unwrap(), Counts::default());
}

#[test]
fn pairings_are_unique_by_device_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let s = State::open(dir.path()).unwrap();
    s.insert_pairing(&pairing("watch-1", 1)).unwrap();
    assert!(matches!(
        s.insert_pairing(&pairing("watch-1", 2)),
        Err(StateError::Conflict(_))
    ));
    assert!(matches!(
        s.insert_pairing(&pairing("watch-2", 1)),
        Err(StateError::Conflict(_))
    ));
    assert!(s.set_label(&dev("watch-1"), Some("wrist")).unwrap());
    assert!(!s.set_label(&dev("nope"), None).unwrap());
    assert_eq!(
        s.pairing(&dev("watch-1"))
            .unwrap()
            .unwrap()
            .label
            .as_deref(),
        Some("wrist")
    );
}

#[test]
fn request_issue_deliver_acknowledge() {
    let dir = tempfile::tempdir().unwrap();
    let s = State::open(dir.path()).unwrap();
    s.insert_pairing(&pairing("watch-1", 1)).unwrap();
    s.insert_request(&request(7, "watch-1")).unwrap();
    // One at a time per device.
    assert!(matches!(
        s.insert_request(&request(8, "watch-1")),
        Err(StateError::Conflict(_))
    ));
    assert_eq!(
        s.request_for_device(&dev("watch-1")).unwrap(),
        Some(request(7, "watch-1"))
    );

    let d = delivery(7, "watch-1", 42);
    s.record_issued(&d).unwrap();
    s.record_issued(&d).unwrap(); // idempotent
    assert_eq!(s.request_for_device(&dev("watch-1")).unwrap(), None);
    assert_eq!(s.pending_for_device(&dev("watch-1")).unwrap(), vec![d]);
    let c = s.credential(&dev("watch-1")).unwrap().unwrap();
    assert_eq!((c.supi.clone(), c.acknowledged_at), (supi(42), None));

    // Another device cannot acknowledge it.
    assert_eq!(
        s.acknowledge(&dev("other"), &RequestId([7; 16]), 5)
            .unwrap(),
        AckOutcome::Unknown
    );
    assert_eq!(
        s.acknowledge(&dev("watch-1"), &RequestId([7; 16]), 5000)
            .unwrap(),
        AckOutcome::Acknowledged
    );
    assert_eq!(
        s.acknowledge(&dev("watch-1"), &RequestId([7; 16]), 5001)
            .unwrap(),
        AckOutcome::AlreadyAcknowledged
    );
    assert!(s.pending_deliveries().unwrap().is_empty());
    assert_eq!(
        s.credential(&dev("watch-1"))
            .unwrap()
            .unwrap()
            .acknowledged_at,
        Some(5000)
    );
    assert_eq!(s.credentials_expiring_by(99_999).unwrap(), vec![]);
    assert_eq!(s.credentials_expiring_by(100_000).unwrap().len(), 1);
}

#[test]
fn revoke_forgets_everything_and_awaits_cn_confirmation() {
    let dir = tempfile::tempdir().unwrap();
    let s = State::open(dir.path()).unwrap();
    s.insert_pairing(&pairing("watch-1", 1)).unwrap();
    s.insert_request(&request(7, "watch-1")).unwrap();
    s.record_issued(&delivery(7, "watch-1", 42)).unwrap();
    s.insert_request(&request(8, "watch-1")).unwrap();
    let r = s.revoke_device(&dev("watch-1"), 9000).unwrap().unwrap();
    assert_eq!(r.supi, Some(supi(42)));
    assert_eq!(s.counts().unwrap().unconfirmed_revocations, 1);
    let c = s.counts().unwrap();
    assert_eq!(
        (
            c.pairings,
            c.credentials,
            c.pending_deliveries,
            c.outstanding_requests
        ),
        (0, 0, 0, 0)
    );
    assert_eq!(s.revoke_device(&dev("watch-1"), 9001).unwrap(), None);
    assert_eq!(s.unconfirmed_revocations().unwrap(), vec![r.clone()]);
    assert!(s.confirm_revocation(r.id, 9100).unwrap());
    assert!(s.unconfirmed_revocations().unwrap().is_empty());
}

#[test]
fn blocks_expire() {
    let dir = tempfile::tempdir().unwrap();
    let s = State::open(dir.path()).unwrap();
    let a: IpAddr = "192.168.1.50".parse().unwrap();
    let b: IpAddr = "fe80::1".parse().unwrap();
    s.block(&Block {
        addr: a,
        until: Some(100),
        created_at: 10,
    })
    .unwrap();
    s.block(&Block {
        addr: b,
        until: None,
        created_at: 10,
    })
    .unwrap();
    assert_eq!(s.blocks(50).unwrap().len(), 2);
    assert_eq!(s.blocks(100).unwrap().len(), 1);
    assert!(s.unblock(b).unwrap());
    assert!(!s.unblock(b).unwrap());
    assert!(s.blocks(0).unwrap().is_empty());
}

#[test]
fn reopen_after_drop_keeps_everything() {
    let dir = tempfile::tempdir().unwrap();
    let (pairings, creds, pending, reqs, revs, blocks);
    {
        let s = State::open(dir.path()).unwrap();
        s.insert_pairing(&pairing("watch-1", 1)).unwrap();
        s.insert_pairing(&pairing("sensor-2", 2)).unwrap();
        s.insert_pairing(&pairing("gone", 3)).unwrap();
        s.insert_request(&request(1, "watch-1")).unwrap();
        s.record_issued(&delivery(1, "watch-1", 1)).unwrap();
        s.insert_request(&request(2, "sensor-2")).unwrap();
        s.revoke_device(&dev("gone"), 77).unwrap();
        s.block(&Block {
            addr: "10.0.0.9".parse().unwrap(),
            until: None,
            created_at: 1,
        })
        .unwrap();
        pairings = s.pairings().unwrap();
        creds = s.credentials().unwrap();
        pending = s.pending_deliveries().unwrap();
        reqs = s.outstanding_requests().unwrap();
        revs = s.unconfirmed_revocations().unwrap();
        blocks = s.blocks(0).unwrap();
    }
    let s = State::open(dir.path()).unwrap();
    assert_eq!(s.pairings().unwrap(), pairings);
    assert_eq!(pairings.len(), 2);
    assert_eq!(s.credentials().unwrap(), creds);
    assert_eq!(s.pending_deliveries().unwrap(), pending);
    assert_eq!(pending.len(), 1);
    assert_eq!(s.outstanding_requests().unwrap(), reqs);
    assert_eq!(reqs, vec![request(2, "sensor-2")]);
    assert_eq!(s.unconfirmed_revocations().unwrap(), revs);
    assert_eq!(s.blocks(0).unwrap(), blocks);
}

#[test]
fn newer_schema_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    drop(State::open(dir.path()).unwrap());
    let conn = Connection::open(dir.path().join(DB_FILE)).unwrap();
    conn.pragma_update(None, "user_version", 99).unwrap();
    drop(conn);
    let err = State::open(dir.path()).unwrap_err();
    assert!(matches!(err, StateError::TooNew { found: 99, .. }), "{err}");
}

#[test]
fn corrupt_rows_are_typed_errors() {
    let dir = tempfile::tempdir().unwrap();
    let s = State::open(dir.path()).unwrap();
    s.conn()
        .execute(
            "INSERT INTO credentials (device_id, supi, expires_at, request_id)
             VALUES ('bad id!', 'imsi-001010000000001', 1, zeroblob(16))",
            [],
        )
        .unwrap();
    assert!(matches!(s.credentials(), Err(StateError::Corrupt(_))));
}

#[test]
fn renewal_key_and_superseded_deliveries() {
    let dir = tempfile::tempdir().unwrap();
    let s = State::open(dir.path()).unwrap();
    s.insert_pairing(&pairing("watch-1", 1)).unwrap();
    let mut r = request(7, "watch-1");
    r.params = Some("{}".into());
    r.renewal_binding = Some(vec![4, 3, 7, 7]);
    s.insert_request(&r).unwrap();
    assert_eq!(s.request_for_device(&dev("watch-1")).unwrap(), Some(r));
    s.record_issued(&delivery(7, "watch-1", 42)).unwrap();
    // The renewal key comes with the device's authorisation to renew to it.
    assert_eq!(
        s.renewal_key(&dev("watch-1")).unwrap(),
        Some((vec![9; 32], vec![4, 3, 7, 7]))
    );
    // A renewal issued before the first delivery was acknowledged supersedes it.
    let mut renew = request(8, "watch-1");
    renew.kind = RequestKind::Renew;
    renew.renew_supi = Some(supi(42));
    renew.hpke_public_key = vec![5; 32];
    renew.renewal_binding = Some(vec![4, 3, 8, 8]);
    s.insert_request(&renew).unwrap();
    s.record_issued(&delivery(8, "watch-1", 42)).unwrap();
    let pending = s.pending_for_device(&dev("watch-1")).unwrap();
    assert_eq!(pending.len(), 1);
    assert_eq!(pending[0].request_id, RequestId([8; 16]));
    assert!(
        s.delivery(&dev("watch-1"), &RequestId([8; 16]))
            .unwrap()
            .is_some()
    );
    assert!(
        s.discard_delivery(&dev("watch-1"), &RequestId([8; 16]))
            .unwrap()
    );
    assert_eq!(
        s.renewal_key(&dev("watch-1")).unwrap(),
        Some((vec![5; 32], vec![4, 3, 8, 8]))
    );
    // A credential from a request without an authorisation: no pre-fetch possible.
    let mut bare = request(9, "watch-1");
    bare.kind = RequestKind::Renew;
    bare.renew_supi = Some(supi(42));
    s.insert_request(&bare).unwrap();
    s.record_issued(&delivery(9, "watch-1", 42)).unwrap();
    assert_eq!(s.renewal_key(&dev("watch-1")).unwrap(), None);
}
#[test]
fn bindings_pack_round_trip() {
    let b = KeyBinding {
        scheme: 0x0403,
        signature: vec![1, 2, 3],
    };
    assert_eq!(pack_binding(&b), vec![4, 3, 1, 2, 3]);
    assert_eq!(unpack_binding(&pack_binding(&b)), Some(b));
    assert_eq!(unpack_binding(&[4]), None);
}
