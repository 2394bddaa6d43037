//! Unit tests of [`super`].

use super::*;
use std::path::Path;

use companion_proto::DeviceId;

use crate::state::{HeldCredential, PairedVia, Pairing};

#[test]
fn wire_format_is_stable() {
    let r: Request = serde_json::from_str(r#"{"op":"open_window","seconds":120}"#).unwrap();
    assert_eq!(r, Request::OpenWindow { seconds: Some(120) });
    let r: Request = serde_json::from_str(r#"{"op":"devices"}"#).unwrap();
    assert_eq!(r, Request::Devices);
    let r: Request = serde_json::from_str(r#"{"op":"block","addr":"192.168.1.9"}"#).unwrap();
    assert_eq!(
        r,
        Request::Block {
            addr: "192.168.1.9".parse().unwrap(),
            seconds: None
        }
    );
    assert_eq!(
        serde_json::to_string(&Request::Pair {
            code: "CPN:x".into(),
            label: None
        })
        .unwrap(),
        r#"{"op":"pair","code":"CPN:x"}"#
    );
    let e = Response::from(ControlError::new(ErrorKind::NotFound, "gone"));
    assert_eq!(
        serde_json::to_string(&e).unwrap(),
        r#"{"result":"error","kind":"not_found","message":"gone"}"#
    );
    assert!(serde_json::from_str::<Request>(r#"{"op":"reboot"}"#).is_err());
}

#[test]
fn access_policy() {
    let p = AccessPolicy {
        own_uid: 990,
        group: Some(AllowedGroup {
            name: "gatewayd".into(),
            gid: 991,
            members: vec!["alice".into()],
        }),
    };
    let peer = |uid, gid| Peer {
        uid,
        gid,
        pid: None,
    };
    assert!(p.allows(&peer(0, 0), &[], None));
    assert!(p.allows(&peer(990, 990), &[], None));
    assert!(p.allows(&peer(1000, 991), &[], None), "primary group");
    assert!(
        p.allows(&peer(1000, 1000), &[4, 991], None),
        "supplementary"
    );
    assert!(
        p.allows(&peer(1000, 1000), &[], Some("alice")),
        "listed member"
    );
    assert!(!p.allows(&peer(1001, 1001), &[4], Some("mallory")));
    let no_group = AccessPolicy {
        own_uid: 990,
        group: None,
    };
    assert!(!no_group.allows(&peer(1000, 991), &[991], Some("alice")));
    let e = no_group.check(&peer(4242, 4242)).unwrap_err();
    assert_eq!(e.kind, ErrorKind::Forbidden);
    assert!(e.message.contains("permission denied"), "{}", e.message);
}

#[test]
fn client_errors_read_like_wg() {
    let e = call(
        Path::new("/nonexistent/gatewayd.sock"),
        &Request::Status,
        Duration::from_secs(1),
    )
    .unwrap_err();
    assert_eq!(
        e.to_string(),
        "cannot reach gatewayd at /nonexistent/gatewayd.sock: No such file or directory \
         (is gatewayd running?)"
    );
}

#[test]
fn device_status() {
    let p = Pairing {
        device_id: DeviceId::new("w").unwrap(),
        spki_der: vec![],
        fingerprint: [0xab; 32],
        label: None,
        paired_at: 0,
        paired_via: PairedVia::Code,
    };
    let c = |exp, ack| HeldCredential {
        device_id: p.device_id.clone(),
        supi: companion_proto::Supi::new("imsi-001010000000001").unwrap(),
        expires_at: exp,
        request_id: companion_proto::RequestId([0; 16]),
        acknowledged_at: ack,
    };
    let day = Duration::from_secs(86_400);
    let st =
        |cred: Option<&HeldCredential>, req| DeviceInfo::build(&p, cred, req, 1000, day).status;
    assert_eq!(st(None, false), DeviceStatus::Paired);
    assert_eq!(st(None, true), DeviceStatus::Requesting);
    assert_eq!(st(Some(&c(1000, Some(1))), false), DeviceStatus::Expired);
    assert_eq!(
        st(Some(&c(500_000, None)), false),
        DeviceStatus::DeliveryPending
    );
    assert_eq!(st(Some(&c(50_000, Some(1))), false), DeviceStatus::Expiring);
    assert_eq!(
        st(Some(&c(500_000, Some(1))), false),
        DeviceStatus::Provisioned
    );
    assert_eq!(
        DeviceInfo::build(&p, None, false, 0, day).fingerprint,
        "ab".repeat(32)
    );
}
