use std::time::Duration;

use super::*;
use crate::msg::KeyBinding;
use crate::testutil::*;

fn rid() -> RequestId {
    RequestId([0x42; 16])
}

fn dev() -> DeviceId {
    DeviceId::new("watch-01").unwrap()
}

fn child() -> Supi {
    Supi::new("imsi-001010000000042").unwrap()
}

fn req() -> ProvisionRequest {
    crate::fixtures::provision_request()
}

fn delivery() -> CredentialDelivery {
    crate::fixtures::delivery()
}

/// A server exchange (no device ID expected) that has received [`req`].
fn requested(now: std::time::Instant) -> ServerExchange {
    let mut s = ServerExchange::new(now, cfg(), None);
    s.handle_bytes(
        now,
        &DeviceMessage::ProvisionRequest(req()).encode().unwrap(),
    )
    .unwrap();
    s
}

#[test]
fn provision_with_pending_delivery_ack_confirm() {
    let now = t0();
    let mut c = ClientExchange::provision(req(), now, cfg()).unwrap();
    let mut s = ServerExchange::new(now, cfg(), Some(dev()));
    pump!(c, s, now).unwrap();
    assert_eq!(
        events!(s),
        vec![ServerEvent::Request(DeviceRequest::Provision(req()))]
    );

    // Under load: tell the device to wait up to a minute.
    s.pending(now, 60_000).unwrap();
    pump!(s, c, now).unwrap();
    let deadline = now + Duration::from_secs(60);
    assert_eq!(
        events!(c),
        vec![ClientEvent::Pending {
            wait_ms: 60_000,
            deadline
        }]
    );
    assert_eq!(c.poll_timeout(), Some(deadline));
    c.handle_timeout(now + Duration::from_secs(30)).unwrap();

    s.deliver(now, delivery()).unwrap();
    pump!(s, c, now).unwrap();
    assert_eq!(events!(c), vec![ClientEvent::Delivery(delivery())]);
    c.accept(now).unwrap();
    pump!(c, s, now).unwrap();
    assert_eq!(
        events!(s),
        vec![ServerEvent::Acked {
            request_id: rid(),
            supi: child()
        }]
    );
    assert!(s.is_done());
    pump!(s, c, now).unwrap();
    assert_eq!(
        events!(c),
        vec![ClientEvent::Confirmed {
            request_id: rid(),
            supi: child()
        }]
    );
    assert!(c.is_done() && c.is_closed());
    assert_eq!(c.poll_timeout(), None);
    c.handle_end_of_stream().unwrap();
    s.handle_end_of_stream().unwrap();
}

#[test]
fn renew_and_busy_with_retry_after() {
    let now = t0();
    let r = RenewRequest {
        request_id: rid(),
        supi: child(),
        hpke_public_key: [3; 32],
        params: None,
        binding: KeyBinding {
            scheme: 0x0807,
            signature: vec![0x44; 64],
        },
        renewal_binding: None,
    };
    let mut c = ClientExchange::renew(r.clone(), now, cfg()).unwrap();
    let mut s = ServerExchange::new(now, cfg(), Some(dev()));
    pump!(c, s, now).unwrap();
    assert_eq!(
        events!(s),
        vec![ServerEvent::Request(DeviceRequest::Renew(r))]
    );
    s.fail(ErrorMsg::retry_after(ErrorCode::Busy, "batcher full", 2500))
        .unwrap();
    assert!(s.is_closed());
    pump!(s, c, now).unwrap();
    let ev = events!(c);
    assert_eq!(
        ev,
        vec![ClientEvent::Failed {
            error: ErrorMsg::retry_after(ErrorCode::Busy, "batcher full", 2500),
            retry_at: Some(now + Duration::from_millis(2500)),
        }]
    );
    assert!(c.is_closed() && !c.is_done());
    // No Error is sent back for a peer's Error.
    assert!(c.poll_transmit().is_none());
}

#[test]
fn not_paired() {
    let now = t0();
    let mut c = ClientExchange::provision(req(), now, cfg()).unwrap();
    let mut s = ServerExchange::new(now, cfg(), Some(DeviceId::new("other").unwrap()));
    let r = pump!(c, s, now);
    assert!(matches!(r, Err(ProtoError::NotPaired(_))), "{r:?}");
    assert!(events!(s).is_empty());
    pump!(s, c, now).unwrap();
    assert!(
        matches!(&events!(c)[..], [ClientEvent::Failed { error, .. }] if error.code == ErrorCode::NotPaired)
    );
}

#[test]
fn device_rejects_unusable_credential() {
    let now = t0();
    let mut c = ClientExchange::provision(req(), now, cfg()).unwrap();
    let mut s = ServerExchange::new(now, cfg(), None);
    pump!(c, s, now).unwrap();
    events!(s);
    assert!(matches!(c.accept(now), Err(ProtoError::InvalidState(_))));
    s.deliver(now, delivery()).unwrap();
    pump!(s, c, now).unwrap();
    events!(c);
    c.reject("HPKE open failed").unwrap();
    pump!(c, s, now).unwrap();
    assert!(
        matches!(&events!(s)[..], [ServerEvent::Failed(e)] if e.code == ErrorCode::CredentialUnusable)
    );
}

#[test]
fn wrong_request_id_and_order() {
    let now = t0();
    // Delivery for another request id.
    let mut c = ClientExchange::provision(req(), now, cfg()).unwrap();
    c.poll_transmit();
    let mut d = delivery();
    d.request_id = RequestId([0; 16]);
    let r = c.handle_bytes(now, &DeviceMessage::CredentialDelivery(d).encode().unwrap());
    assert!(matches!(r, Err(ProtoError::Violation(_))), "{r:?}");
    assert!(
        matches!(&sent!(c, DeviceMessage)[..], [DeviceMessage::Error(e)] if e.code == ErrorCode::Malformed)
    );

    // AckConfirmed before any delivery.
    let mut c = ClientExchange::provision(req(), now, cfg()).unwrap();
    c.poll_transmit();
    let r = c.handle_bytes(
        now,
        &DeviceMessage::AckConfirmed(AckConfirmed { request_id: rid() })
            .encode()
            .unwrap(),
    );
    assert!(
        matches!(
            r,
            Err(ProtoError::Unexpected {
                state: "AwaitDelivery",
                ..
            })
        ),
        "{r:?}"
    );

    // The server gets a DeliveryAck first, then anything after closing.
    let mut s = ServerExchange::new(now, cfg(), None);
    let ack = DeviceMessage::DeliveryAck(DeliveryAck {
        request_id: rid(),
        supi: child(),
    });
    let r = s.handle_bytes(now, &ack.encode().unwrap());
    assert!(matches!(
        r,
        Err(ProtoError::Unexpected {
            state: "AwaitRequest",
            ..
        })
    ));
    assert!(
        matches!(&sent!(s, DeviceMessage)[..], [DeviceMessage::Error(e)] if e.code == ErrorCode::UnexpectedMessage)
    );
    assert_eq!(
        s.handle_bytes(now, &ack.encode().unwrap()),
        Err(ProtoError::Closed)
    );

    // Ack for another SUPI.
    let mut s = requested(now);
    s.deliver(now, delivery()).unwrap();
    let bad = DeviceMessage::DeliveryAck(DeliveryAck {
        request_id: rid(),
        supi: Supi::new("imsi-001019999999999").unwrap(),
    });
    assert!(matches!(
        s.handle_bytes(now, &bad.encode().unwrap()),
        Err(ProtoError::Violation(_))
    ));

    // Two requests on one stream.
    let mut s = ServerExchange::new(now, cfg(), None);
    let two = [
        DeviceMessage::ProvisionRequest(req()).encode().unwrap(),
        DeviceMessage::ProvisionRequest(req()).encode().unwrap(),
    ]
    .concat();
    assert!(matches!(
        s.handle_bytes(now, &two),
        Err(ProtoError::Unexpected {
            state: "Processing",
            ..
        })
    ));
}

#[test]
fn garbage_oversize_and_early_end() {
    let now = t0();
    let mut s = ServerExchange::new(now, cfg(), None);
    let r = s.handle_bytes(now, &[1, 1, 0, 0, 0x00, 0x01, 0x00, 0x00]);
    assert!(
        matches!(r, Err(ProtoError::Frame(FrameError::TooLarge { .. }))),
        "{r:?}"
    );
    assert!(
        matches!(&sent!(s, DeviceMessage)[..], [DeviceMessage::Error(e)] if e.code == ErrorCode::TooLarge)
    );

    let mut s = ServerExchange::new(now, cfg(), None);
    let r = s.handle_bytes(now, &[0xde, 0xad, 0xbe, 0xef, 0, 0, 0, 0, 0]);
    assert!(matches!(
        r,
        Err(ProtoError::Frame(FrameError::UnsupportedVersion(0xde)))
    ));

    let mut s = requested(now);
    assert!(matches!(s.handle_end_of_stream(), Ok(()) | Err(_)));
    let mut c = ClientExchange::provision(req(), now, cfg()).unwrap();
    assert!(matches!(
        c.handle_end_of_stream(),
        Err(ProtoError::UnexpectedEnd("AwaitDelivery"))
    ));

    // Server-side timeout while waiting for the ack.
    let mut s = requested(now);
    s.deliver(now, delivery()).unwrap();
    s.poll_transmit();
    let late = now + Duration::from_secs(11);
    assert!(matches!(
        s.handle_timeout(late),
        Err(ProtoError::Timeout("AwaitAck"))
    ));
    assert!(
        matches!(&sent!(s, DeviceMessage)[..], [DeviceMessage::Error(e)] if e.code == ErrorCode::Timeout)
    );
}

use crate::frame::FrameError;
