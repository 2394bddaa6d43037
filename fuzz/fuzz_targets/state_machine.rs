//! Every state machine fed attacker bytes, in chunks, after a valid prefix that brings it to an
//! interesting state. Nothing may panic; after an error the machine must be closed.
#![no_main]
use std::time::{Duration, Instant};

use companion_crypto::secret::Key128;
use companion_crypto::usim::SoftUsim;
use companion_proto::Config;
use companion_proto::aka::ClientEvent;
use companion_proto::device::{ClientExchange, ServerExchange};
use companion_proto::ids::{DeviceId, RequestId};
use companion_proto::msg::{Params, ProvisionRequest};
use companion_proto::{attach, cn};
use libfuzzer_sys::fuzz_target;

const SNN: &str = "5G:mnc001.mcc001.3gppnetwork.org";

fn usim() -> SoftUsim {
    SoftUsim::new(
        "imsi-001010000000001".into(),
        Key128::from_bytes([0x46; 16]),
        Key128::from_bytes([0xcd; 16]),
    )
}

fn vector(snn: &str) -> companion_crypto::aka::AuthVector {
    let m = companion_crypto::milenage::Milenage::new(
        &Key128::from_bytes([0x46; 16]),
        &Key128::from_bytes([0xcd; 16]),
    );
    let sqn = companion_crypto::aka::Sqn::from_parts(1, 0).unwrap();
    companion_crypto::aka::generate_vector(&m, sqn, &[0x80, 0], [9; 16], snn)
}

fn policy() -> companion_proto::msg::AuthResult {
    companion_proto::msg::AuthResult {
        max_children: 5,
        active_children: 0,
        max_lifetime_s: 60,
        roaming_allowed: false,
        max_batch_items: 4,
        dnns: None,
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    let now = Instant::now();
    let cfg = Config::default();
    let step = usize::from(sel >> 3) + 1;
    let chunks = rest.chunks(step);
    match sel % 8 {
        0 => {
            let mut s = ServerExchange::new(now, cfg, Some(DeviceId::new("watch-01").unwrap()));
            for c in chunks {
                if s.handle_bytes(now, c).is_err() {
                    assert!(s.is_closed());
                }
                while s.poll_event().is_some() {}
            }
            let _ = s.handle_end_of_stream();
            let _ = s.handle_timeout(now + Duration::from_secs(3600));
        }
        1 => {
            let req = ProvisionRequest {
                request_id: RequestId([1; 16]),
                device_id: DeviceId::new("watch-01").unwrap(),
                hpke_public_key: [2; 32],
                params: Params::default(),
                binding: companion_proto::binding::KeyBinding {
                    scheme: 0x0403,
                    signature: vec![3; 8],
                },
                renewal_binding: None,
                window_code: None,
            };
            let mut c = ClientExchange::provision(req, now, cfg).unwrap();
            for ch in chunks {
                if c.handle_bytes(now, ch).is_err() {
                    assert!(c.is_closed());
                }
                if let Some(companion_proto::device::ClientEvent::Delivery(_)) = c.poll_event() {
                    let _ = c.accept(now);
                }
            }
            let _ = c.handle_end_of_stream();
        }
        2 | 3 => {
            let mut s = attach::Server::new([7; 32], now, cfg);
            for c in chunks {
                if s.handle_bytes(now, c).is_err() {
                    assert!(s.is_closed());
                }
                while let Some(e) = s.poll_event() {
                    if let companion_proto::aka::ServerEvent::VectorNeeded {
                        serving_network_name,
                        ..
                    }
                    | companion_proto::aka::ServerEvent::ResyncNeeded {
                        serving_network_name,
                        ..
                    } = &e
                    {
                        let _ = s.provide_vector(now, vector(serving_network_name));
                    }
                    if let companion_proto::aka::ServerEvent::Verified { .. } = e {
                        let _ = s.reject(companion_proto::msg::ErrorMsg::new(
                            companion_proto::msg::ErrorCode::CredentialRevoked,
                            "x",
                        ));
                    }
                }
            }
            let _ = s.handle_end_of_stream();
        }
        4 | 5 => {
            let mut u = usim();
            let mut c = attach::Client::new(&u, SNN, [7; 32], now, cfg).unwrap();
            for ch in chunks {
                if c.handle_bytes(now, ch).is_err() {
                    assert!(c.is_closed());
                }
                while let Some(e) = c.poll_event() {
                    if e == ClientEvent::ChallengeReceived {
                        let _ = c.answer_challenge(now, &mut u);
                    }
                }
            }
            let _ = c.handle_end_of_stream();
        }
        6 => {
            let mut s = cn::ServerSession::new([7; 32], now, cfg);
            let mut op: Option<cn::ServerRequest> = None;
            for c in chunks {
                if let Some(r) = op.as_mut() {
                    let _ = r.handle_bytes(now, c);
                    while r.poll_event().is_some() {}
                    continue;
                }
                let _ = s.handle_bytes(now, c);
                while let Some(e) = s.poll_event() {
                    match e {
                        cn::ServerEvent::VectorNeeded {
                            serving_network_name,
                            ..
                        }
                        | cn::ServerEvent::ResyncNeeded {
                            serving_network_name,
                            ..
                        } => {
                            let _ = s.provide_vector(now, vector(&serving_network_name));
                        }
                        cn::ServerEvent::Verified { .. } => {
                            let _ = s.accept(policy());
                            op = s.accept_request(now).ok();
                        }
                        cn::ServerEvent::Failed(_) => {}
                    }
                }
            }
        }
        _ => {
            let mut u = usim();
            let mut c = cn::ClientSession::new(&u, SNN, [7; 32], now, cfg).unwrap();
            for ch in chunks {
                let _ = c.handle_bytes(now, ch);
                while let Some(e) = c.poll_event() {
                    if e == ClientEvent::ChallengeReceived {
                        let _ = c.answer_challenge(now, &mut u);
                    }
                }
            }
            let _ = c.list_children(now);
        }
    }
});
