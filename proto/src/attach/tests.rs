use std::time::Duration;

use companion_crypto::aka::{sqn_after_resync, verify_auts};
use companion_crypto::usim::Usim;

use super::*;
use crate::aka::ClientEvent as CE;
use crate::error::ProtoError;
use crate::msg::{ErrorCode, ErrorMsg, Message, Restrictions};
use crate::testutil::*;

const EXP_A: [u8; 32] = [0xa1; 32];
const EXP_B: [u8; 32] = [0xb2; 32];

fn accept_msg() -> AttachAccept {
    AttachAccept {
        expires_at: 1_767_225_600,
        restrictions: Restrictions {
            roaming_allowed: false,
            dnns: vec![],
            max_bitrate_kbps: None,
        },
    }
}

/// Runs client and server up to the server's `Verified` (or failure); returns the server result.
fn run_to_response(
    usim: &mut dyn Usim,
    client: &mut Client,
    server: &mut Server,
    seq: u64,
    server_snn: &str,
) -> Result<(), ProtoError> {
    let now = t0();
    pump!(client, server, now)?;
    assert!(matches!(
        events!(server)[..],
        [ServerEvent::VectorNeeded { .. }]
    ));
    server.provide_vector(now, vector_for(seq, server_snn))?;
    pump!(server, client, now)?;
    assert_eq!(events!(client), vec![CE::ChallengeReceived]);
    client.answer_challenge(now, usim)?;
    pump!(client, server, now)
}

#[test]
fn happy_path() {
    let now = t0();
    let mut usim = usim();
    let mut c = Client::new(&usim, SNN, EXP_A, now, cfg()).unwrap();
    let mut s = Server::new(EXP_A, now, cfg());
    run_to_response(&mut usim, &mut c, &mut s, 1, SNN).unwrap();
    let ev = events!(s);
    assert_eq!(
        ev,
        vec![ServerEvent::Verified {
            supi: SUPI.parse().unwrap()
        }]
    );
    s.accept(accept_msg()).unwrap();
    pump!(s, c, now).unwrap();
    assert_eq!(events!(c), vec![CE::Authenticated(accept_msg())]);
    assert!(c.is_authenticated() && s.is_authenticated());
    assert_eq!(c.poll_timeout(), None);
    c.handle_end_of_stream().unwrap();
    s.handle_end_of_stream().unwrap();
}

#[test]
fn wrong_res_star_fails_with_auth_failed() {
    let now = t0();
    let mut usim = usim();
    let mut c = Client::new(&usim, SNN, EXP_A, now, cfg()).unwrap();
    let mut s = Server::new(EXP_A, now, cfg());
    // The server computes XRES* for another serving network: RES* cannot match.
    let r = run_to_response(
        &mut usim,
        &mut c,
        &mut s,
        1,
        "5G:mnc002.mcc001.3gppnetwork.org",
    );
    assert!(
        matches!(r, Err(ProtoError::AuthFailed(ref m)) if m.contains("RES*")),
        "{r:?}"
    );
    assert!(s.is_closed());
    pump!(s, c, now).unwrap();
    let ev = events!(c);
    assert!(
        matches!(&ev[..], [CE::Failed { error, .. }] if error.code == ErrorCode::AuthFailed
        && error.reason == "authentication failed")
    );
    assert!(c.is_closed());
}

#[test]
fn answer_replayed_into_another_session_fails_binding() {
    let now = t0();
    let mut usim = usim();
    // Session 1 (exporter A): record the client's response.
    let mut c1 = Client::new(&usim, SNN, EXP_A, now, cfg()).unwrap();
    let mut s1 = Server::new(EXP_A, now, cfg());
    pump!(c1, s1, now).unwrap();
    events!(s1);
    let v = vector_for(1, SNN);
    s1.provide_vector(now, v.clone()).unwrap();
    pump!(s1, c1, now).unwrap();
    c1.answer_challenge(now, &mut usim).unwrap();
    let response = c1.poll_transmit().unwrap();

    // Session 2 (exporter B): an attacker relays the same start and replays the answer.
    let mut s2 = Server::new(EXP_B, now, cfg());
    let start = AttachMessage::AttachRequest(crate::msg::AttachRequest {
        supi: SUPI.parse().unwrap(),
        serving_network_name: SNN.into(),
    });
    s2.handle_bytes(now, &start.encode().unwrap()).unwrap();
    s2.provide_vector(now, v).unwrap();
    let r = s2.handle_bytes(now, &response);
    assert!(
        matches!(r, Err(ProtoError::AuthFailed(ref m)) if m.contains("binding")),
        "{r:?}"
    );
    let sent = sent!(s2, AttachMessage);
    assert!(
        matches!(sent.last(), Some(AttachMessage::Error(e)) if e.code == ErrorCode::AuthFailed)
    );

    // The same answer in its own session passes.
    s1.handle_bytes(now, &response).unwrap();
    assert!(matches!(events!(s1)[..], [ServerEvent::Verified { .. }]));
}

#[test]
fn resync_then_success() {
    let now = t0();
    let mut usim = usim();
    // Advance the USIM to SEQ 5 with a first, successful attach.
    {
        let mut c = Client::new(&usim, SNN, EXP_A, now, cfg()).unwrap();
        let mut s = Server::new(EXP_A, now, cfg());
        run_to_response(&mut usim, &mut c, &mut s, 5, SNN).unwrap();
    }
    let mut c = Client::new(&usim, SNN, EXP_A, now, cfg()).unwrap();
    let mut s = Server::new(EXP_A, now, cfg());
    // The CN lost track: SEQ 1 is stale.
    answer_challenge_for(&mut usim, &mut c, &mut s, 1, now);
    assert!(matches!(
        sent!(c, AttachMessage)[..],
        [AttachMessage::AttachResync(_)]
    ));
    // Replay into the server through a fresh pair to see the event.
    let mut c = Client::new(&usim, SNN, EXP_A, now, cfg()).unwrap();
    let mut s = Server::new(EXP_A, now, cfg());
    answer_challenge_for(&mut usim, &mut c, &mut s, 1, now);
    pump!(c, s, now).unwrap();
    let ev = events!(s);
    let [ServerEvent::ResyncNeeded { rand, auts, .. }] = &ev[..] else {
        panic!("{ev:?}")
    };
    let sqn_ms = verify_auts(&milenage(), rand, auts).unwrap();
    assert_eq!(sqn_ms.seq(), 5);
    s.provide_vector(now, vector_sqn(sqn_after_resync(sqn_ms), SNN))
        .unwrap();
    pump!(s, c, now).unwrap();
    assert_eq!(events!(c), vec![CE::ChallengeReceived]);
    c.answer_challenge(now, &mut usim).unwrap();
    pump!(c, s, now).unwrap();
    assert!(matches!(events!(s)[..], [ServerEvent::Verified { .. }]));
    s.accept(accept_msg()).unwrap();
    pump!(s, c, now).unwrap();
    assert!(c.is_authenticated());
}

#[test]
fn resync_limit() {
    let now = t0();
    let mut usim = usim();
    {
        let mut c = Client::new(&usim, SNN, EXP_A, now, cfg()).unwrap();
        let mut s = Server::new(EXP_A, now, cfg());
        run_to_response(&mut usim, &mut c, &mut s, 9, SNN).unwrap();
    }
    // A patient client, so that the server's limit is the one hit.
    let patient = crate::Config {
        max_resyncs: 10,
        ..cfg()
    };
    let mut c = Client::new(&usim, SNN, EXP_A, now, patient).unwrap();
    let mut s = Server::new(EXP_A, now, cfg());
    pump!(c, s, now).unwrap();
    events!(s);
    let mut last = Ok(());
    for _ in 0..3 {
        s.provide_vector(now, vector_for(1, SNN)).unwrap();
        pump!(s, c, now).unwrap();
        events!(c);
        c.answer_challenge(now, &mut usim).unwrap();
        last = pump!(c, s, now);
        if last.is_err() {
            break;
        }
        events!(s);
    }
    assert!(matches!(last, Err(ProtoError::SyncFailure(_))), "{last:?}");
    pump!(s, c, now).unwrap();
    assert!(
        matches!(&events!(c)[..], [CE::Failed { error, .. }] if error.code == ErrorCode::SyncFailure)
    );
}

#[test]
fn unexpected_order_and_garbage() {
    let now = t0();
    // A response before any challenge.
    let mut s = Server::new(EXP_A, now, cfg());
    let resp = AttachMessage::AttachResponse(crate::msg::ChallengeResponse {
        res_star: [0; 16],
        binding: [0; 32],
    });
    let r = s.handle_bytes(now, &resp.encode().unwrap());
    assert!(
        matches!(
            r,
            Err(ProtoError::Unexpected {
                state: "AwaitStart",
                ..
            })
        ),
        "{r:?}"
    );
    assert!(
        matches!(&sent!(s, AttachMessage)[..], [AttachMessage::Error(e)] if e.code == ErrorCode::UnexpectedMessage)
    );
    assert_eq!(s.handle_bytes(now, &[1]), Err(ProtoError::Closed));

    // Garbage.
    let mut s = Server::new(EXP_A, now, cfg());
    let r = s.handle_bytes(now, b"GET / HTTP/1.1\r\n\r\n");
    assert!(matches!(r, Err(ProtoError::Frame(_))), "{r:?}");
    assert!(
        matches!(&sent!(s, AttachMessage)[..], [AttachMessage::Error(e)] if e.code == ErrorCode::UnsupportedVersion)
    );

    // A valid header with a garbage body.
    let mut s = Server::new(EXP_A, now, cfg());
    let r = s.handle_bytes(now, &[1, 0x30, 0, 0, 0, 0, 0, 2, 0xff, 0xff]);
    assert!(matches!(r, Err(ProtoError::Body { .. })), "{r:?}");
    assert!(
        matches!(&sent!(s, AttachMessage)[..], [AttachMessage::Error(e)] if e.code == ErrorCode::Malformed)
    );

    // The client gets an Accept before answering.
    let usim = usim();
    let mut c = Client::new(&usim, SNN, EXP_A, now, cfg()).unwrap();
    let r = c.handle_bytes(
        now,
        &AttachMessage::AttachAccept(accept_msg()).encode().unwrap(),
    );
    assert!(matches!(r, Err(ProtoError::Unexpected { .. })));
    // answer_challenge without a challenge is an API error.
    let mut c = Client::new(&usim, SNN, EXP_A, now, cfg()).unwrap();
    let mut u2 = crate::testutil::usim();
    assert!(matches!(
        c.answer_challenge(now, &mut u2),
        Err(ProtoError::InvalidState(_))
    ));
}

#[test]
fn server_rejects_and_timeouts() {
    let now = t0();
    let usim = usim();
    let mut c = Client::new(&usim, SNN, EXP_A, now, cfg()).unwrap();
    let mut s = Server::new(EXP_A, now, cfg());
    pump!(c, s, now).unwrap();
    events!(s);
    s.reject(ErrorMsg::new(ErrorCode::CredentialRevoked, "revoked"))
        .unwrap();
    pump!(s, c, now).unwrap();
    assert!(
        matches!(&events!(c)[..], [CE::Failed { error, retry_at: None }] if error.code == ErrorCode::CredentialRevoked)
    );

    let mut c = Client::new(&usim, SNN, EXP_A, now, cfg()).unwrap();
    let deadline = c.poll_timeout().unwrap();
    assert_eq!(deadline, now + Duration::from_secs(10));
    c.handle_timeout(now + Duration::from_secs(1)).unwrap();
    assert!(matches!(
        c.handle_timeout(deadline),
        Err(ProtoError::Timeout("AwaitChallenge"))
    ));
    c.poll_transmit(); // AttachRequest
    assert!(
        matches!(&sent!(c, AttachMessage)[..], [AttachMessage::Error(e)] if e.code == ErrorCode::Timeout)
    );

    // End of stream in the middle.
    let mut s = Server::new(EXP_A, now, cfg());
    assert!(matches!(
        s.handle_end_of_stream(),
        Err(ProtoError::UnexpectedEnd("AwaitStart"))
    ));
    let mut s = Server::new(EXP_A, now, cfg());
    s.handle_bytes(now, &[1, 0x30, 0]).unwrap();
    assert!(matches!(
        s.handle_end_of_stream(),
        Err(ProtoError::Frame(_))
    ));
}

#[test]
fn mac_failure_closes_with_auth_failed() {
    let now = t0();
    let mut usim = usim();
    let mut c = Client::new(&usim, SNN, EXP_A, now, cfg()).unwrap();
    let ch = AttachMessage::AttachChallenge(crate::msg::Challenge {
        rand: [1; 16],
        autn: [2; 16],
    });
    c.handle_bytes(now, &ch.encode().unwrap()).unwrap();
    let r = c.answer_challenge(now, &mut usim);
    assert!(matches!(r, Err(ProtoError::AuthFailed(_))), "{r:?}");
    c.poll_transmit();
    assert!(
        matches!(&sent!(c, AttachMessage)[..], [AttachMessage::Error(e)] if e.code == ErrorCode::AuthFailed)
    );
}
