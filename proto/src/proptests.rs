//! Property tests: every message, the header, the pairing code and the bundle round-trip
//! (decode(encode(x)) == x, and the encoding is stable); arbitrary bytes never panic a decoder
//! or a state machine.

use std::time::Instant;

use proptest::collection::vec;
use proptest::option::of;
use proptest::prelude::*;
use zerocopy::{FromBytes, IntoBytes};

use crate::bundle::{AttachInfo, CredentialBundle, Key128};
use crate::frame::{Conversation, FrameDecoder, Header, MsgType, parse_header};
use crate::ids::{DeviceId, RequestId, Supi};
use crate::msg::*;
use crate::pairing::PairingCode;

fn rid() -> impl Strategy<Value = RequestId> {
    any::<[u8; 16]>().prop_map(RequestId)
}
fn supi() -> impl Strategy<Value = Supi> {
    "imsi-[0-9]{6,15}".prop_map(|s| Supi::new(&s).unwrap())
}
fn dev() -> impl Strategy<Value = DeviceId> {
    "[A-Za-z0-9._:-]{1,64}".prop_map(|s| DeviceId::new(&s).unwrap())
}
fn text() -> impl Strategy<Value = String> {
    ".{0,40}"
}
fn strings() -> impl Strategy<Value = Vec<String>> {
    vec(text(), 0..4)
}
fn params() -> impl Strategy<Value = Params> {
    (
        of(any::<u64>()),
        of(any::<bool>()),
        of(strings()),
        of(any::<u64>()),
    )
        .prop_map(|(lifetime_s, roaming, dnns, max_bitrate_kbps)| Params {
            lifetime_s,
            roaming,
            dnns,
            max_bitrate_kbps,
        })
}
fn restrictions() -> impl Strategy<Value = Restrictions> {
    (any::<bool>(), strings(), of(any::<u64>())).prop_map(
        |(roaming_allowed, dnns, max_bitrate_kbps)| Restrictions {
            roaming_allowed,
            dnns,
            max_bitrate_kbps,
        },
    )
}
fn sealed() -> impl Strategy<Value = Sealed> {
    (any::<[u8; 32]>(), vec(any::<u8>(), 0..200))
        .prop_map(|(enc, ciphertext)| Sealed { enc, ciphertext })
}
fn error_msg() -> impl Strategy<Value = ErrorMsg> {
    (any::<u64>(), text(), of(any::<u64>())).prop_map(|(c, reason, retry_after_ms)| ErrorMsg {
        code: ErrorCode::from_code(c),
        reason,
        retry_after_ms,
    })
}
fn challenge() -> impl Strategy<Value = Challenge> {
    (any::<[u8; 16]>(), any::<[u8; 16]>()).prop_map(|(rand, autn)| Challenge { rand, autn })
}
fn response() -> impl Strategy<Value = ChallengeResponse> {
    (any::<[u8; 16]>(), any::<[u8; 32]>())
        .prop_map(|(res_star, binding)| ChallengeResponse { res_star, binding })
}
fn resync() -> impl Strategy<Value = Resync> {
    any::<[u8; 14]>().prop_map(|auts| Resync { auts })
}

fn device_msg() -> impl Strategy<Value = DeviceMessage> {
    prop_oneof![
        (
            (rid(), dev(), any::<[u8; 32]>(), params()),
            (key_binding(), of(key_binding()), of("[0-9A-Z-]{0,12}"))
        )
            .prop_map(
                |(
                    (request_id, device_id, hpke_public_key, params),
                    (binding, renewal_binding, window_code),
                )| {
                    DeviceMessage::ProvisionRequest(ProvisionRequest {
                        request_id,
                        device_id,
                        hpke_public_key,
                        params,
                        binding,
                        renewal_binding,
                        window_code,
                    })
                }
            ),
        (
            rid(),
            supi(),
            any::<[u8; 32]>(),
            of(params()),
            key_binding(),
            of(key_binding())
        )
            .prop_map(
                |(request_id, supi, hpke_public_key, params, binding, renewal_binding)| {
                    DeviceMessage::RenewRequest(RenewRequest {
                        request_id,
                        supi,
                        hpke_public_key,
                        params,
                        binding,
                        renewal_binding,
                    })
                }
            ),
        (rid(), supi(), any::<u64>(), sealed()).prop_map(
            |(request_id, supi, expires_at, sealed)| {
                DeviceMessage::CredentialDelivery(CredentialDelivery {
                    request_id,
                    supi,
                    expires_at,
                    sealed,
                })
            }
        ),
        (rid(), supi()).prop_map(
            |(request_id, supi)| DeviceMessage::DeliveryAck(DeliveryAck { request_id, supi })
        ),
        rid().prop_map(|request_id| DeviceMessage::AckConfirmed(AckConfirmed { request_id })),
        (rid(), any::<u64>()).prop_map(|(request_id, wait_ms)| DeviceMessage::Pending(Pending {
            request_id,
            wait_ms
        })),
        error_msg().prop_map(DeviceMessage::Error),
    ]
}

fn batch_item() -> impl Strategy<Value = BatchItem> {
    (
        any::<u64>(),
        rid(),
        dev(),
        any::<[u8; 32]>(),
        any::<[u8; 32]>(),
        params(),
        of(supi()),
        (
            proptest::collection::vec(any::<u8>(), 0..100),
            key_binding(),
            of(proptest::collection::vec(
                proptest::collection::vec(any::<u8>(), 0..64),
                1..=crate::attestation::MAX_CHAIN_CERTS,
            )),
        ),
    )
        .prop_map(
            |(
                k,
                request_id,
                device_id,
                device_key_fingerprint,
                hpke_public_key,
                params,
                supi,
                (device_spki, binding, attestation),
            )| {
                BatchItem {
                    attestation: attestation.and_then(|c| AttestationChain::new(c).ok()),
                    kind: ItemKind::from_code(k % 3),
                    request_id,
                    device_id,
                    device_key_fingerprint,
                    hpke_public_key,
                    params,
                    supi,
                    device_spki,
                    binding,
                }
            },
        )
}

fn key_binding() -> impl Strategy<Value = KeyBinding> {
    (any::<u16>(), proptest::collection::vec(any::<u8>(), 0..80))
        .prop_map(|(scheme, signature)| KeyBinding { scheme, signature })
}

fn item_result() -> impl Strategy<Value = ItemResult> {
    (
        rid(),
        any::<u64>(),
        of(supi()),
        of(any::<u64>()),
        of(sealed()),
        of(text()),
        of(any::<u64>()),
    )
        .prop_map(
            |(request_id, o, supi, expires_at, sealed, reason, retry_after_ms)| ItemResult {
                request_id,
                outcome: Outcome::from_code(o % 8),
                supi,
                expires_at,
                sealed,
                reason,
                retry_after_ms,
            },
        )
}

fn child() -> impl Strategy<Value = Child> {
    (supi(), dev(), any::<u64>(), any::<u64>(), any::<u64>()).prop_map(
        |(supi, device_id, issued_at, expires_at, s)| Child {
            supi,
            device_id,
            issued_at,
            expires_at,
            state: ChildState::from_code(s % 4),
        },
    )
}

fn cn_msg() -> impl Strategy<Value = CnMessage> {
    prop_oneof![
        (supi(), text()).prop_map(
            |(supi, serving_network_name)| CnMessage::AuthStart(AuthStart {
                supi,
                serving_network_name
            })
        ),
        challenge().prop_map(CnMessage::AuthChallenge),
        response().prop_map(CnMessage::AuthResponse),
        resync().prop_map(CnMessage::AuthResync),
        (
            any::<u64>(),
            any::<u64>(),
            any::<u64>(),
            any::<bool>(),
            any::<u64>(),
            of(strings())
        )
            .prop_map(
                |(
                    max_children,
                    active_children,
                    max_lifetime_s,
                    roaming_allowed,
                    max_batch_items,
                    dnns,
                )| {
                    CnMessage::AuthResult(AuthResult {
                        max_children,
                        active_children,
                        max_lifetime_s,
                        roaming_allowed,
                        max_batch_items,
                        dnns,
                    })
                }
            ),
        (any::<u64>(), vec(batch_item(), 0..4)).prop_map(|(batch_id, items)| {
            CnMessage::BatchProvision(BatchProvision { batch_id, items })
        }),
        (any::<u64>(), vec(item_result(), 0..4))
            .prop_map(|(batch_id, items)| CnMessage::BatchResult(BatchResult { batch_id, items })),
        (of(supi()), of(dev()))
            .prop_map(|(supi, device_id)| CnMessage::Revoke(Revoke { supi, device_id })),
        vec(supi(), 0..4).prop_map(|revoked| CnMessage::RevokeResult(RevokeResult { revoked })),
        Just(CnMessage::ListChildren(ListChildren {})),
        vec(child(), 0..4).prop_map(|children| CnMessage::ChildList(ChildList { children })),
        error_msg().prop_map(CnMessage::Error),
    ]
}

fn attach_msg() -> impl Strategy<Value = AttachMessage> {
    prop_oneof![
        (supi(), text()).prop_map(|(supi, serving_network_name)| AttachMessage::AttachRequest(
            AttachRequest {
                supi,
                serving_network_name
            }
        )),
        challenge().prop_map(AttachMessage::AttachChallenge),
        response().prop_map(AttachMessage::AttachResponse),
        resync().prop_map(AttachMessage::AttachResync),
        (any::<u64>(), restrictions()).prop_map(|(expires_at, restrictions)| {
            AttachMessage::AttachAccept(AttachAccept {
                expires_at,
                restrictions,
            })
        }),
        error_msg().prop_map(AttachMessage::Error),
    ]
}

fn bundle() -> impl Strategy<Value = CredentialBundle> {
    (
        (
            dev(),
            rid(),
            supi(),
            any::<[u8; 16]>(),
            any::<[u8; 16]>(),
            any::<[u8; 2]>(),
        ),
        (
            0..=crate::bundle::SQN_MAX,
            0..u64::MAX / 2,
            1..u64::MAX / 2,
            restrictions(),
        ),
        (text(), text(), vec(any::<u8>(), 0..100)),
    )
        .prop_map(
            |(
                (device_id, request_id, supi, k, opc, amf),
                (sqn_start, issued_at, life, restrictions),
                (endpoint, server_name, trust_anchor),
            )| {
                CredentialBundle {
                    version: crate::bundle::BUNDLE_VERSION,
                    device_id,
                    request_id,
                    supi: supi.clone(),
                    k: Key128::from_bytes(k),
                    opc: Key128::from_bytes(opc),
                    amf,
                    sqn_start,
                    issued_at,
                    expires_at: issued_at + life,
                    restrictions,
                    attach: AttachInfo {
                        endpoint,
                        server_name,
                        trust_anchor,
                    },
                    home_network: crate::bundle::HomeNetwork {
                        mcc: supi.imsi()[..3].to_string(),
                        mnc: supi.imsi()[3..5].to_string(),
                    },
                    operator_signature: None,
                }
            },
        )
}

fn round_trip<M: Message + PartialEq + std::fmt::Debug>(m: &M) -> Result<(), TestCaseError> {
    let bytes = m.encode().map_err(|e| TestCaseError::fail(e.to_string()))?;
    let back = M::decode(&bytes).map_err(|e| TestCaseError::fail(e.to_string()))?;
    prop_assert_eq!(&back, m);
    prop_assert_eq!(
        back.encode()
            .map_err(|e| TestCaseError::fail(e.to_string()))?,
        bytes.clone()
    );
    // Split anywhere, the stream decoder yields the same message.
    let mut d = FrameDecoder::new(M::CONVERSATION);
    let mid = bytes.len() / 2;
    d.push(&bytes[..mid]);
    prop_assert!(
        d.next_frame()
            .map_err(|e| TestCaseError::fail(e.to_string()))?
            .is_none()
            || mid >= bytes.len()
    );
    d.push(&bytes[mid..]);
    let f = d
        .next_frame()
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
    let f = f.ok_or_else(|| TestCaseError::fail("no frame"))?;
    prop_assert_eq!(
        &M::from_frame(&f).map_err(|e| TestCaseError::fail(e.to_string()))?,
        m
    );
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn device_messages_round_trip(m in device_msg()) { round_trip(&m)?; }

    #[test]
    fn cn_messages_round_trip(m in cn_msg()) { round_trip(&m)?; }

    #[test]
    fn attach_messages_round_trip(m in attach_msg()) { round_trip(&m)?; }

    #[test]
    fn bundle_round_trip(b in bundle()) {
        let enc = b.encode().unwrap();
        let back = CredentialBundle::decode(&enc).unwrap();
        prop_assert_eq!(&back, &b);
        prop_assert_eq!(&back.encode().unwrap()[..], &enc[..]);
    }

    #[test]
    fn header_round_trip(t in proptest::sample::select(MsgType::ALL), len in 0u32..=16384) {
        let h = Header::new(t, len);
        let bytes = h.as_bytes().to_vec();
        let back = Header::read_from_bytes(&bytes).unwrap();
        prop_assert_eq!(back, h);
        let conv = t.conversation().unwrap_or(Conversation::Device);
        prop_assert_eq!(parse_header(conv, &bytes), Ok((t, len as usize)));
    }

    #[test]
    fn pairing_round_trip(id in dev(), key in any::<[u8; 32]>(), extra in "[A-UW-Z]:[a-z0-9]{0,8}") {
        let mut spki = vec![0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00];
        spki.extend(key);
        let code = PairingCode::new(id, spki).unwrap();
        let s = code.to_string();
        prop_assert_eq!(&PairingCode::parse(&s).unwrap(), &code);
        // An unknown field anywhere is ignored (tags I and K excluded from `extra` by construction
        // only when they collide; skip those).
        if !extra.starts_with("I:") && !extra.starts_with("K:") {
            let with_extra = s.replacen("CPN:", &format!("CPN:{extra};"), 1);
            prop_assert_eq!(PairingCode::parse(&with_extra).unwrap(), code);
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic(data in vec(any::<u8>(), 0..600)) {
        let _ = DeviceMessage::decode(&data);
        let _ = CnMessage::decode(&data);
        let _ = AttachMessage::decode(&data);
        let _ = CredentialBundle::decode(&data);
        let _ = PairingCode::parse(&String::from_utf8_lossy(&data));
        for conv in [Conversation::Device, Conversation::Cn, Conversation::Attach] {
            let mut d = FrameDecoder::new(conv);
            d.push(&data);
            while let Ok(Some(_)) = d.next_frame() {}
            let _ = d.finish();
        }
    }

    #[test]
    fn arbitrary_bodies_never_panic(t in proptest::sample::select(MsgType::ALL), body in vec(any::<u8>(), 0..300)) {
        let f = crate::frame::Frame { msg_type: t, body };
        let _ = DeviceMessage::from_frame(&f);
        let _ = CnMessage::from_frame(&f);
        let _ = AttachMessage::from_frame(&f);
    }

    #[test]
    fn machines_survive_arbitrary_input(chunks in vec(vec(any::<u8>(), 0..64), 0..6)) {
        let now = Instant::now();
        let cfg = crate::Config::default();
        let mut s = crate::device::ServerExchange::new(now, cfg, None);
        let mut a = crate::attach::Server::new([0; 32], now, cfg);
        let mut c = crate::cn::ServerSession::new([0; 32], now, cfg);
        for ch in &chunks {
            let _ = s.handle_bytes(now, ch);
            let _ = a.handle_bytes(now, ch);
            let _ = c.handle_bytes(now, ch);
        }
        let _ = s.handle_end_of_stream();
        while s.poll_transmit().is_some() {}
    }
}
