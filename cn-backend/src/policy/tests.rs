//! Unit tests of the policy functions: lifetime, quota, narrowing, renewal and attach decisions.

use super::*;
use crate::model::{Amf, KeyFingerprint};

fn dnn(s: &str) -> Dnn {
    Dnn::parse(s).unwrap()
}

fn policy() -> ParentPolicy {
    ParentPolicy {
        max_children: 2,
        max_lifetime_s: 3600,
        roaming_allowed: false,
        allowed_dnns: vec![dnn("internet"), dnn("ims")],
        max_bitrate_kbps: Some(1000),
        require_attestation: false,
    }
    .validated()
    .unwrap()
}

fn parent(status: SubscriptionStatus) -> Parent {
    Parent {
        supi: Supi::parse("imsi-001010000000001").unwrap(),
        amf: Amf::DEFAULT,
        sqn: companion_crypto::aka::Sqn::ZERO,
        status,
        policy: policy(),
        created_at: Timestamp(0),
        updated_at: Timestamp(0),
    }
}

fn child(expires_at: i64, status: ChildStatus) -> ChildCredential {
    ChildCredential {
        supi: Supi::parse("imsi-001019000000001").unwrap(),
        parent: Supi::parse("imsi-001010000000001").unwrap(),
        device_id: DeviceId::parse("watch").unwrap(),
        device_key_fingerprint: KeyFingerprint([1; 32]),
        device_spki: Some(vec![0x30, 0x00]),
        request_id: RequestId([2; 16]),
        amf: Amf::DEFAULT,
        sqn: companion_crypto::aka::Sqn::ZERO,
        issued_at: Timestamp(0),
        expires_at: Timestamp(expires_at),
        renewed_at: None,
        restrictions: Restrictions {
            roaming_allowed: true,
            allowed_dnns: vec![dnn("internet")],
            max_bitrate_kbps: Some(5000),
        },
        status,
        revoked_at: None,
    }
}

#[test]
fn allocation_cap_is_a_sliding_window() {
    let cap = AllocationCap {
        max: 3,
        window_s: 60,
    };
    let now = Timestamp(1_000);
    // The window is (now - 60, now]: issued at 941 is in, at 940 is out.
    assert_eq!(allocation_window_start(&cap, now), Timestamp(941));
    assert_eq!(check_allocation_rate(0, None, &cap, now), Ok(()));
    assert_eq!(
        check_allocation_rate(2, Some(Timestamp(990)), &cap, now),
        Ok(())
    );
    // Full: retry when the oldest leaves the window.
    assert_eq!(
        check_allocation_rate(3, Some(Timestamp(950)), &cap, now),
        Err(Refusal::RateLimited {
            limit: 3,
            window_s: 60,
            retry_after_s: 10
        })
    );
    // All of them issued just now (pending in the same batch): a whole window.
    assert_eq!(
        check_allocation_rate(5, Some(now), &cap, now),
        Err(Refusal::RateLimited {
            limit: 3,
            window_s: 60,
            retry_after_s: 60
        })
    );
    // Never less than a second.
    assert!(matches!(
        check_allocation_rate(3, Some(Timestamp(941)), &cap, now),
        Err(Refusal::RateLimited {
            retry_after_s: 1,
            ..
        })
    ));
    assert!(matches!(
        check_allocation_rate(3, None, &cap, now),
        Err(Refusal::RateLimited {
            retry_after_s: 60,
            ..
        })
    ));
}

#[test]
fn lifetime_is_the_minimum() {
    assert_eq!(grant_lifetime(None, 100, 50), Ok(50));
    assert_eq!(grant_lifetime(None, 10, 50), Ok(10));
    assert_eq!(grant_lifetime(Some(5), 10, 50), Ok(5));
    assert_eq!(grant_lifetime(Some(500), 10, 50), Ok(10));
    assert_eq!(grant_lifetime(Some(0), 10, 50), Err(Invalid::ZeroLifetime));
}

#[test]
fn restrictions_never_widen() {
    let p = policy();
    // Asking for everything yields the parent's ceiling with roaming narrowed off.
    let r = narrow_restrictions(
        &p,
        &RequestedParams {
            roaming: Some(true),
            max_bitrate_kbps: Some(10_000),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(r, p.ceiling());
    assert!(!r.roaming_allowed);
    // A subset of DNNs and a lower bitrate are kept.
    let r = narrow_restrictions(
        &p,
        &RequestedParams {
            dnns: vec![dnn("IMS")],
            max_bitrate_kbps: Some(10),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(r.allowed_dnns, vec![dnn("ims")]);
    assert_eq!(r.max_bitrate_kbps, Some(10));
    // A DNN outside the parent's list is refused.
    let e = narrow_restrictions(
        &p,
        &RequestedParams {
            dnns: vec![dnn("ims"), dnn("corp")],
            ..Default::default()
        },
    )
    .unwrap_err();
    assert_eq!(e, Refusal::Denied(Denial::DnnNotAllowed(dnn("corp"))));
    // A parent allowing any DNN passes the request through; roaming can be declined.
    let any = ParentPolicy {
        allowed_dnns: vec![],
        roaming_allowed: true,
        max_bitrate_kbps: None,
        require_attestation: false,
        ..p
    };
    let r = narrow_restrictions(
        &any,
        &RequestedParams {
            dnns: vec![dnn("corp")],
            roaming: Some(false),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(r.allowed_dnns, vec![dnn("corp")]);
    assert!(!r.roaming_allowed);
    assert_eq!(r.max_bitrate_kbps, None);
    let r = narrow_restrictions(&any, &RequestedParams::default()).unwrap();
    assert!(r.roaming_allowed);
    assert!(r.allowed_dnns.is_empty());
    assert!(matches!(
        narrow_restrictions(
            &any,
            &RequestedParams {
                max_bitrate_kbps: Some(0),
                ..Default::default()
            }
        ),
        Err(Refusal::Invalid(Invalid::ZeroBitrate))
    ));
}

#[test]
fn dnn_intersection() {
    assert_eq!(intersect_dnns(&[], &[]), Some(vec![]));
    assert_eq!(intersect_dnns(&[dnn("a")], &[]), Some(vec![dnn("a")]));
    assert_eq!(intersect_dnns(&[], &[dnn("b")]), Some(vec![dnn("b")]));
    assert_eq!(
        intersect_dnns(&[dnn("a"), dnn("b")], &[dnn("b"), dnn("c")]),
        Some(vec![dnn("b")])
    );
    assert_eq!(intersect_dnns(&[dnn("a")], &[dnn("c")]), None);
}

#[test]
fn quota() {
    assert!(check_quota(0, 1).is_ok());
    assert_eq!(check_quota(1, 1), Err(Refusal::QuotaExhausted { limit: 1 }));
    assert_eq!(check_quota(0, 0), Err(Refusal::QuotaExhausted { limit: 0 }));
}

#[test]
fn provision_decision_order() {
    let op = OperatorPolicy {
        max_lifetime_s: 1800,
        ..OperatorPolicy::default()
    };
    let now = Timestamp(1000);
    let g = decide_provision(
        &parent(SubscriptionStatus::Active),
        1,
        &RequestedParams::default(),
        &op,
        now,
    )
    .unwrap();
    assert_eq!(g.lifetime_s, 1800);
    assert_eq!(g.expires_at, Timestamp(2800));
    assert_eq!(
        decide_provision(
            &parent(SubscriptionStatus::Active),
            2,
            &RequestedParams::default(),
            &op,
            now
        ),
        Err(Refusal::QuotaExhausted { limit: 2 })
    );
    // Policy refusal wins over quota, parent status over everything.
    let bad = RequestedParams {
        dnns: vec![dnn("corp")],
        ..Default::default()
    };
    assert!(matches!(
        decide_provision(&parent(SubscriptionStatus::Active), 2, &bad, &op, now),
        Err(Refusal::Denied(_))
    ));
    assert_eq!(
        decide_provision(&parent(SubscriptionStatus::Suspended), 0, &bad, &op, now),
        Err(Refusal::ParentInactive(SubscriptionStatus::Suspended))
    );
}

#[test]
fn renewal() {
    let op = OperatorPolicy::default();
    let p = parent(SubscriptionStatus::Active);
    let g = decide_renewal(
        &p,
        &child(2000, ChildStatus::Active),
        Some(60),
        &op,
        Timestamp(1000),
    )
    .unwrap();
    assert_eq!(g.expires_at, Timestamp(1060));
    // Renarrowed against the parent: roaming off, bitrate 1000.
    assert!(!g.restrictions.roaming_allowed);
    assert_eq!(g.restrictions.max_bitrate_kbps, Some(1000));
    assert_eq!(g.restrictions.allowed_dnns, vec![dnn("internet")]);
    assert_eq!(
        decide_renewal(
            &p,
            &child(1000, ChildStatus::Active),
            None,
            &op,
            Timestamp(1000)
        ),
        Err(Refusal::Denied(Denial::Expired(Timestamp(1000))))
    );
    assert_eq!(
        decide_renewal(
            &p,
            &child(2000, ChildStatus::Revoked),
            None,
            &op,
            Timestamp(1000)
        ),
        Err(Refusal::Denied(Denial::Revoked))
    );
    // Parent dropped the child's only DNN: renewal refused rather than widened to "any".
    let mut tightened = p.clone();
    tightened.policy.allowed_dnns = vec![dnn("ims")];
    assert_eq!(
        decide_renewal(
            &tightened,
            &child(2000, ChildStatus::Active),
            None,
            &op,
            Timestamp(0)
        ),
        Err(Refusal::Denied(Denial::NoCommonDnn))
    );
}

#[test]
fn attach() {
    let c = child(2000, ChildStatus::Active);
    assert!(check_attach(&c, SubscriptionStatus::Active, Timestamp(10), true).is_ok());
    assert_eq!(
        check_attach(&c, SubscriptionStatus::Active, Timestamp(2000), false),
        Err(AttachRefusal::Expired(Timestamp(2000)))
    );
    assert_eq!(
        check_attach(&c, SubscriptionStatus::Suspended, Timestamp(10), false),
        Err(AttachRefusal::ParentInactive(SubscriptionStatus::Suspended))
    );
    let mut no_roam = c.clone();
    no_roam.restrictions.roaming_allowed = false;
    assert_eq!(
        check_attach(&no_roam, SubscriptionStatus::Active, Timestamp(10), true),
        Err(AttachRefusal::RoamingNotAllowed)
    );
    assert!(check_attach(&no_roam, SubscriptionStatus::Active, Timestamp(10), false).is_ok());
    assert_eq!(
        check_attach(
            &child(2000, ChildStatus::Revoked),
            SubscriptionStatus::Active,
            Timestamp(10),
            false
        ),
        Err(AttachRefusal::Revoked)
    );
}
