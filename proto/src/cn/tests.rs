use companion_crypto::usim::SoftUsim;

use super::*;
use crate::ids::DeviceId;
use crate::msg::{BatchItem, Child, ChildState, ErrorCode, ItemResult, Sealed};
use crate::testutil::*;

const EXP: [u8; 32] = [0x5e; 32];

fn policy() -> AuthResult {
    AuthResult {
        max_children: 10,
        active_children: 0,
        max_lifetime_s: 86_400,
        roaming_allowed: false,
        max_batch_items: 2,
        dnns: None,
    }
}

fn authenticated(usim: &mut SoftUsim) -> (ClientSession, ServerSession) {
    let now = t0();
    let mut c = ClientSession::new(usim, SNN, EXP, now, cfg()).unwrap();
    let mut s = ServerSession::new(EXP, now, cfg());
    // Operations before authentication are refused locally.
    assert!(matches!(
        c.list_children(now),
        Err(ProtoError::InvalidState(_))
    ));
    assert!(matches!(
        s.accept_request(now),
        Err(ProtoError::InvalidState(_))
    ));
    pump!(c, s, now).unwrap();
    let ev = events!(s);
    let [
        ServerEvent::VectorNeeded {
            supi,
            serving_network_name,
        },
    ] = &ev[..]
    else {
        panic!("{ev:?}")
    };
    assert_eq!(supi.as_str(), SUPI);
    s.provide_vector(now, vector_for(1, serving_network_name))
        .unwrap();
    pump!(s, c, now).unwrap();
    events!(c);
    c.answer_challenge(now, usim).unwrap();
    pump!(c, s, now).unwrap();
    assert!(matches!(events!(s)[..], [ServerEvent::Verified { .. }]));
    // Accepted before AuthResult is sent? Not yet.
    assert!(matches!(
        s.accept_request(now),
        Err(ProtoError::InvalidState(_))
    ));
    s.accept(policy()).unwrap();
    pump!(s, c, now).unwrap();
    assert_eq!(events!(c), vec![ClientEvent::Authenticated(policy())]);
    (c, s)
}

fn item(n: u8) -> BatchItem {
    crate::fixtures::batch_item(n)
}

fn issued(n: u8) -> ItemResult {
    ItemResult {
        request_id: RequestId([n; 16]),
        outcome: Outcome::Issued,
        supi: Some(Supi::new(&format!("imsi-00101000000{n:04}")).unwrap()),
        expires_at: Some(100),
        sealed: Some(Sealed {
            enc: [n; 32],
            ciphertext: vec![n; 48],
        }),
        reason: None,
        retry_after_ms: None,
    }
}

#[test]
fn auth_then_batch_revoke_list() {
    let now = t0();
    let mut usim = usim();
    let (c, s) = authenticated(&mut usim);
    assert_eq!(c.result(), Some(&policy()));

    // Batch.
    let batch = BatchProvision {
        batch_id: 9,
        items: vec![item(1), item(2)],
    };
    let mut cr = c.batch(now, batch.clone()).unwrap();
    let mut sr = s.accept_request(now).unwrap();
    assert_eq!(sr.parent().as_str(), SUPI);
    pump!(cr, sr, now).unwrap();
    assert_eq!(
        events!(sr),
        vec![OperationEvent::Request(Operation::Batch(batch))]
    );
    sr.handle_end_of_stream().unwrap(); // the gateway finished its side after the request
    let mut quota = issued(2);
    quota.outcome = Outcome::QuotaExhausted;
    quota.supi = None;
    quota.sealed = None;
    quota.expires_at = None;
    let result = BatchResult {
        batch_id: 9,
        items: vec![issued(1), quota],
    };
    sr.respond_batch(result.clone()).unwrap();
    assert!(sr.is_done());
    pump!(sr, cr, now).unwrap();
    assert_eq!(events!(cr), vec![RequestEvent::BatchResult(result)]);
    assert!(cr.is_done());
    cr.handle_end_of_stream().unwrap();

    // Revoke.
    let sup = Supi::new("imsi-001010000000001").unwrap();
    let mut cr = c
        .revoke(
            now,
            Revoke {
                supi: None,
                device_id: Some(DeviceId::new("dev-1").unwrap()),
            },
        )
        .unwrap();
    let mut sr = s.accept_request(now).unwrap();
    pump!(cr, sr, now).unwrap();
    assert!(matches!(
        events!(sr)[..],
        [OperationEvent::Request(Operation::Revoke(_))]
    ));
    assert!(matches!(
        sr.respond_children(ChildList { children: vec![] }),
        Err(ProtoError::InvalidState(_))
    ));
    sr.respond_revoke(RevokeResult {
        revoked: vec![sup.clone()],
    })
    .unwrap();
    pump!(sr, cr, now).unwrap();
    assert_eq!(
        events!(cr),
        vec![RequestEvent::RevokeResult(RevokeResult {
            revoked: vec![sup.clone()]
        })]
    );

    // List.
    let mut cr = c.list_children(now).unwrap();
    let mut sr = s.accept_request(now).unwrap();
    pump!(cr, sr, now).unwrap();
    assert_eq!(
        events!(sr),
        vec![OperationEvent::Request(Operation::ListChildren)]
    );
    let list = ChildList {
        children: vec![Child {
            supi: sup,
            device_id: DeviceId::new("dev-1").unwrap(),
            issued_at: 1,
            expires_at: 2,
            state: ChildState::Revoked,
        }],
    };
    sr.respond_children(list.clone()).unwrap();
    pump!(sr, cr, now).unwrap();
    assert_eq!(events!(cr), vec![RequestEvent::ChildList(list)]);
}

#[test]
fn batch_limits_and_bad_results() {
    let now = t0();
    let mut usim = usim();
    let (c, s) = authenticated(&mut usim);
    // Local checks.
    let big = BatchProvision {
        batch_id: 1,
        items: vec![item(1), item(2), item(3)],
    };
    assert!(matches!(
        c.batch(now, big.clone()),
        Err(ProtoError::TooManyItems { n: 3, max: 2 })
    ));
    let dup = BatchProvision {
        batch_id: 1,
        items: vec![item(1), item(1)],
    };
    assert!(matches!(c.batch(now, dup), Err(ProtoError::Violation(_))));
    assert!(matches!(
        c.revoke(
            now,
            Revoke {
                supi: None,
                device_id: None
            }
        ),
        Err(ProtoError::Violation(_))
    ));

    // The CN checks the same on the wire.
    let mut sr = s.accept_request(now).unwrap();
    let r = sr.handle_bytes(now, &CnMessage::BatchProvision(big).encode().unwrap());
    assert!(matches!(r, Err(ProtoError::TooManyItems { .. })), "{r:?}");
    let sent = sent!(sr, CnMessage);
    assert!(matches!(&sent[..], [CnMessage::Error(e)] if e.code == ErrorCode::TooLarge));

    // Results that do not match the batch.
    let batch = BatchProvision {
        batch_id: 5,
        items: vec![item(1)],
    };
    for bad in [
        BatchResult {
            batch_id: 6,
            items: vec![issued(1)],
        },
        BatchResult {
            batch_id: 5,
            items: vec![issued(2)],
        },
        BatchResult {
            batch_id: 5,
            items: vec![issued(1), issued(1)],
        },
        BatchResult {
            batch_id: 5,
            items: vec![ItemResult {
                sealed: None,
                ..issued(1)
            }],
        },
    ] {
        let mut cr = c.batch(now, batch.clone()).unwrap();
        cr.poll_transmit();
        let r = cr.handle_bytes(now, &CnMessage::BatchResult(bad).encode().unwrap());
        assert!(matches!(r, Err(ProtoError::Violation(_))), "{r:?}");
        assert!(cr.is_closed());
    }
    // Wrong response type.
    let mut cr = c.list_children(now).unwrap();
    let r = cr.handle_bytes(
        now,
        &CnMessage::RevokeResult(RevokeResult { revoked: vec![] })
            .encode()
            .unwrap(),
    );
    assert!(matches!(r, Err(ProtoError::Unexpected { .. })));
    // CN busy.
    let mut cr = c.list_children(now).unwrap();
    let busy = crate::msg::ErrorMsg::retry_after(ErrorCode::Busy, "busy", 100);
    cr.handle_bytes(now, &CnMessage::Error(busy.clone()).encode().unwrap())
        .unwrap();
    assert_eq!(
        events!(cr),
        vec![RequestEvent::Failed {
            error: busy,
            retry_at: Some(now + std::time::Duration::from_millis(100))
        }]
    );
    // An AKA message on an operation stream.
    let mut sr = s.accept_request(now).unwrap();
    let r = sr.handle_bytes(
        now,
        &CnMessage::AuthResync(crate::msg::Resync { auts: [0; 14] })
            .encode()
            .unwrap(),
    );
    assert!(matches!(r, Err(ProtoError::Unexpected { .. })));
}

#[test]
fn binding_from_another_session_is_refused() {
    let now = t0();
    let mut usim = usim();
    let mut c = ClientSession::new(&usim, SNN, [1; 32], now, cfg()).unwrap();
    let mut s = ServerSession::new([2; 32], now, cfg());
    answer_challenge_for(&mut usim, &mut c, &mut s, 1, now);
    let r = pump!(c, s, now);
    assert!(matches!(r, Err(ProtoError::AuthFailed(_))));
    assert!(matches!(
        s.accept(policy()),
        Err(ProtoError::InvalidState(_))
    ));
    pump!(s, c, now).unwrap();
    assert!(
        matches!(&events!(c)[..], [ClientEvent::Failed { error, .. }] if error.code == ErrorCode::AuthFailed)
    );
}

#[test]
fn unknown_subscriber_and_order() {
    let now = t0();
    let usim = usim();
    let mut c = ClientSession::new(&usim, SNN, EXP, now, cfg()).unwrap();
    let mut s = ServerSession::new(EXP, now, cfg());
    pump!(c, s, now).unwrap();
    events!(s);
    s.reject(crate::msg::ErrorMsg::new(
        ErrorCode::UnknownSubscriber,
        "who?",
    ))
    .unwrap();
    pump!(s, c, now).unwrap();
    assert!(
        matches!(&events!(c)[..], [ClientEvent::Failed { error, .. }] if error.code == ErrorCode::UnknownSubscriber)
    );

    // A batch on the AKA stream before authentication.
    let mut s = ServerSession::new(EXP, now, cfg());
    let b = CnMessage::BatchProvision(BatchProvision {
        batch_id: 1,
        items: vec![item(1)],
    });
    let r = s.handle_bytes(now, &b.encode().unwrap());
    assert!(matches!(
        r,
        Err(ProtoError::Unexpected {
            state: "AwaitStart",
            ..
        })
    ));
    // An attach message on the CN conversation is an unknown type here.
    let mut s = ServerSession::new(EXP, now, cfg());
    let a = crate::msg::AttachMessage::AttachRequest(crate::msg::AttachRequest {
        supi: SUPI.parse().unwrap(),
        serving_network_name: SNN.into(),
    });
    let r = s.handle_bytes(now, &a.encode().unwrap());
    assert!(matches!(
        r,
        Err(ProtoError::Frame(crate::frame::FrameError::UnknownType(
            0x30
        )))
    ));
}
