//! The driver over a real QUIC connection on loopback, with both device-exchange machines:
//! outside work with `Pending` keep-alives, a give-up time, the end of a conversation, and the
//! failures a peer can cause (silence, garbage, an early end of stream).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use companion_proto::device::{
    ClientEvent, ClientExchange, DeviceRequest, ServerEvent, ServerExchange,
};
use companion_proto::msg::{CredentialDelivery, ErrorCode, ProvisionRequest};
use companion_proto::{Config, ProtoError};

use super::*;
use crate::{
    ALPN_DEVICE, Identity, Limits, PinnedServerVerifier, ServerTrust, client_config, server_config,
};

/// A connected pair on loopback; the endpoints live as long as this.
struct Pair {
    client: quinn::Connection,
    server: quinn::Connection,
    _endpoints: (quinn::Endpoint, quinn::Endpoint),
}

async fn pair() -> Pair {
    let id = Identity::self_signed("gateway.test").unwrap();
    let cfg = server_config(&id, None, &[ALPN_DEVICE], &Limits::device_link()).unwrap();
    let server_ep = quinn::Endpoint::server(cfg, "127.0.0.1:0".parse().unwrap()).unwrap();
    let mut client_ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let trust = ServerTrust::Verifier(Arc::new(PinnedServerVerifier::new(None)));
    client_ep.set_default_client_config(
        client_config(trust, None, ALPN_DEVICE, &Limits::device_link()).unwrap(),
    );
    let connecting = client_ep
        .connect(server_ep.local_addr().unwrap(), "gateway.test")
        .unwrap();
    let (client, server) = tokio::join!(connecting, async {
        server_ep.accept().await.unwrap().await
    });
    Pair {
        client: client.unwrap(),
        server: server.unwrap(),
        _endpoints: (server_ep, client_ep),
    }
}

const WRITE: Duration = Duration::from_secs(5);

fn cfg(timeout: Duration) -> Config {
    Config {
        timeout,
        ..Config::default()
    }
}

fn request() -> ProvisionRequest {
    companion_proto::fixtures::provision_request()
}

fn delivery() -> CredentialDelivery {
    companion_proto::fixtures::delivery()
}

/// The device side: runs its exchange to the end and reports the `Pending`s it saw and how it
/// ended. `give_up` bounds the whole exchange, as `iotdev`'s patience does.
async fn device(
    conn: quinn::Connection,
    timeout: Duration,
    give_up: Duration,
) -> (u32, Result<&'static str, DriveError>) {
    let (send, recv) = conn.open_bi().await.unwrap();
    let mut drv = StreamDriver::new(send, recv, WRITE);
    let mut ex = ClientExchange::provision(request(), Instant::now(), cfg(timeout)).unwrap();
    let give_up = Some(Instant::now() + give_up);
    let mut none: Option<std::future::Ready<()>> = None;
    let mut pendings = 0;
    loop {
        let step = match drv
            .next(&mut ex, ClientExchange::is_closed, &mut none, give_up)
            .await
        {
            Ok(s) => s,
            Err(e) => return (pendings, Err(e)),
        };
        match step {
            Step::Event(ClientEvent::Pending { .. }) => pendings += 1,
            Step::Event(ClientEvent::Delivery(_)) => ex.accept(Instant::now()).unwrap(),
            Step::Event(ClientEvent::Confirmed { .. }) => return (pendings, Ok("confirmed")),
            Step::Event(ClientEvent::Failed { .. }) => return (pendings, Ok("failed")),
            Step::Wake => return (pendings, Ok("gave up")),
            Step::Done(()) | Step::Closed => return (pendings, Ok("closed")),
        }
    }
}

/// What the gateway side saw.
#[derive(Debug, PartialEq, Eq)]
enum Seen {
    Acked,
    DeviceFailed(ErrorCode),
    Stopped(String),
}

/// The gateway side: answers the request after `work` (sleeping), sending `Pending{wait}` every
/// `every` meanwhile when `every` is given.
async fn gateway(
    conn: quinn::Connection,
    timeout: Duration,
    work: Duration,
    every: Option<(Duration, u64)>,
) -> (u32, Seen) {
    let (send, recv) = conn.accept_bi().await.unwrap();
    let mut drv = StreamDriver::new(send, recv, WRITE);
    let mut ex = ServerExchange::new(Instant::now(), cfg(timeout), None);
    let mut job: Option<std::pin::Pin<Box<tokio::time::Sleep>>> = None;
    let mut wake = None;
    let mut pendings = 0;
    let mut seen = None;
    loop {
        let at = wake.filter(|_| job.is_some());
        match drv
            .next(&mut ex, ServerExchange::is_closed, &mut job, at)
            .await
        {
            Ok(Step::Event(ServerEvent::Request(DeviceRequest::Provision(_)))) => {
                job = Some(Box::pin(tokio::time::sleep(work)));
                wake = every.map(|(e, _)| Instant::now() + e);
            }
            Ok(Step::Event(ServerEvent::Request(_))) => panic!("not a provisioning"),
            Ok(Step::Event(ServerEvent::Acked { .. })) => seen = Some(Seen::Acked),
            Ok(Step::Event(ServerEvent::Failed(e))) => seen = Some(Seen::DeviceFailed(e.code)),
            Ok(Step::Done(())) => ex.deliver(Instant::now(), delivery()).unwrap(),
            Ok(Step::Wake) => {
                let (e, wait_ms) = every.unwrap();
                ex.pending(Instant::now(), wait_ms).unwrap();
                pendings += 1;
                wake = Some(Instant::now() + e);
            }
            Ok(Step::Closed) => {
                drv.wait_delivered(Duration::from_secs(2)).await;
                return (pendings, seen.unwrap_or(Seen::Stopped("closed".into())));
            }
            Err(e) => return (pendings, seen.unwrap_or(Seen::Stopped(e.to_string()))),
        }
    }
}

#[tokio::test]
async fn pending_keep_alives_carry_a_device_past_its_silence_timeout_to_the_credential() {
    let p = pair().await;
    let timeout = Duration::from_millis(300);
    // The answer takes three silence timeouts; a Pending every 100 ms promising 300 ms more.
    let (dev, gw) = tokio::join!(
        device(p.client.clone(), timeout, Duration::from_secs(10)),
        gateway(
            p.server.clone(),
            timeout,
            Duration::from_millis(900),
            Some((Duration::from_millis(100), 300))
        ),
    );
    assert_eq!(dev.1.unwrap(), "confirmed");
    assert!(dev.0 >= 5, "the device saw {} Pendings", dev.0);
    assert_eq!(dev.0, gw.0, "every Pending sent arrived");
    assert_eq!(gw.1, Seen::Acked);
}

#[tokio::test]
async fn without_keep_alives_the_device_times_out_and_the_gateway_hears_it_while_working() {
    let p = pair().await;
    let (dev, gw) = tokio::join!(
        device(
            p.client.clone(),
            Duration::from_millis(200),
            Duration::from_secs(10)
        ),
        gateway(
            p.server.clone(),
            Duration::from_secs(5),
            Duration::from_secs(3),
            None
        ),
    );
    let err = dev.1.unwrap_err();
    assert!(
        matches!(&err, DriveError::Timeout(s) if s.contains("AwaitDelivery")),
        "{err}"
    );
    // The device's `Error(timeout)` reached the gateway before its work was done.
    assert_eq!(gw.1, Seen::DeviceFailed(ErrorCode::Timeout));
}

#[tokio::test]
async fn the_wake_up_time_comes_before_the_machine_deadline_and_ends_nothing() {
    let p = pair().await;
    let started = Instant::now();
    let (dev, _gw) = tokio::join!(
        device(
            p.client.clone(),
            Duration::from_secs(5),
            Duration::from_millis(200)
        ),
        async {
            // A gateway that reads the request and says nothing.
            let (_send, mut recv) = p.server.accept_bi().await.unwrap();
            let _ = recv.read_chunk(1024, true).await;
            tokio::time::sleep(Duration::from_millis(600)).await;
        },
    );
    assert_eq!(dev.1.unwrap(), "gave up");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(200) && waited < Duration::from_secs(2),
        "{waited:?}"
    );
}

#[tokio::test]
async fn garbage_is_a_protocol_error_sent_back_to_the_peer() {
    let p = pair().await;
    let (gw, peer_saw) = tokio::join!(
        gateway(
            p.server.clone(),
            Duration::from_secs(5),
            Duration::from_millis(10),
            None
        ),
        async {
            let (mut send, mut recv) = p.client.open_bi().await.unwrap();
            send.write_all(&[0xff; 64]).await.unwrap();
            recv.read_to_end(4096).await.unwrap()
        },
    );
    assert!(gw.1 != Seen::Acked, "{gw:?}");
    let Seen::Stopped(reason) = gw.1 else {
        panic!("{gw:?}")
    };
    assert!(reason.starts_with("protocol"), "{reason}");
    // The gateway's `Error` frame arrived, then its end of stream.
    let mut c = ClientExchange::provision(request(), Instant::now(), cfg(WRITE)).unwrap();
    let _ = c.handle_bytes(Instant::now(), &peer_saw);
    assert!(
        matches!(c.poll_event(), Some(ClientEvent::Failed { .. })),
        "{peer_saw:?}"
    );
}

#[tokio::test]
async fn an_end_of_stream_mid_exchange_is_reported_as_the_peer_finishing() {
    let p = pair().await;
    let (send, recv) = p.client.open_bi().await.unwrap();
    let mut drv = StreamDriver::new(send, recv, WRITE);
    let mut ex = ClientExchange::provision(request(), Instant::now(), cfg(WRITE)).unwrap();
    let mut none: Option<std::future::Ready<()>> = None;
    let (r, ()) = tokio::join!(
        drv.next(&mut ex, ClientExchange::is_closed, &mut none, None),
        async {
            let (mut send, mut recv) = p.server.accept_bi().await.unwrap();
            let _ = recv.read_chunk(1024, true).await;
            send.finish().unwrap();
        }
    );
    assert!(
        matches!(r, Err(DriveError::Proto(ProtoError::UnexpectedEnd(_)))),
        "{r:?}"
    );
    assert!(drv.peer_finished());
}

#[tokio::test]
async fn next_event_still_reports_a_silent_peer_as_a_timeout() {
    let p = pair().await;
    let (send, recv) = p.client.open_bi().await.unwrap();
    let mut drv = StreamDriver::new(send, recv, WRITE);
    let mut ex =
        ClientExchange::provision(request(), Instant::now(), cfg(Duration::from_millis(150)))
            .unwrap();
    let (r, _keep) = tokio::join!(drv.next_event(&mut ex), async {
        let s = p.server.accept_bi().await.unwrap();
        tokio::time::sleep(Duration::from_millis(400)).await;
        s
    });
    assert!(matches!(r, Err(DriveError::Timeout(_))), "{r:?}");
}

#[tokio::test]
async fn the_caller_acts_on_an_event_before_the_answer_queued_with_it_leaves() {
    let p = pair().await;
    let timeout = Duration::from_secs(5);
    let gw = async {
        let (send, recv) = p.server.accept_bi().await.unwrap();
        let mut drv = StreamDriver::new(send, recv, WRITE);
        let mut ex = ServerExchange::new(Instant::now(), cfg(timeout), None);
        let mut none: Option<std::future::Ready<()>> = None;
        let mut recorded = None;
        loop {
            match drv
                .next(&mut ex, ServerExchange::is_closed, &mut none, None)
                .await
            {
                Ok(Step::Event(ServerEvent::Request(_))) => {
                    ex.deliver(Instant::now(), delivery()).unwrap();
                }
                Ok(Step::Event(ServerEvent::Acked { .. })) => {
                    // Recording the acknowledgement takes a while; `AckConfirmed` is queued.
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    recorded = Some(Instant::now());
                }
                Ok(Step::Closed) => {
                    drv.wait_delivered(Duration::from_secs(2)).await;
                    return recorded.unwrap();
                }
                other => panic!("{other:?}"),
            }
        }
    };
    let dev = async {
        let r = device(p.client.clone(), timeout, Duration::from_secs(10)).await;
        (r, Instant::now())
    };
    let (recorded, ((_, r), confirmed)) = tokio::join!(gw, dev);
    assert_eq!(r.unwrap(), "confirmed");
    assert!(confirmed >= recorded, "confirmed before it was recorded");
}
