//! Unit tests of [`super`]: encoding vectors, decoding errors, forward compatibility.

use super::*;
use crate::frame::FrameError;
use crate::ids::{DeviceId, RequestId, Supi};

pub(crate) fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

pub(crate) fn unhex(s: &str) -> Vec<u8> {
    let s: String = s.chars().filter(|c| !c.is_whitespace()).collect();
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

fn rid() -> RequestId {
    RequestId(core::array::from_fn(|i| i as u8))
}

fn supi() -> Supi {
    Supi::new("imsi-001010000000042").unwrap()
}

fn dev() -> DeviceId {
    DeviceId::new("watch-01").unwrap()
}

/// One example per message type: (name, message frame bytes).
/// The AKA bodies of the golden examples, the same in the CN and attach conversations.
const CHALLENGE: Challenge = Challenge {
    rand: [0x23; 16],
    autn: [0x55; 16],
};
const RESPONSE: ChallengeResponse = ChallengeResponse {
    res_star: [0xa5; 16],
    binding: [0xb6; 32],
};
const RESYNC: Resync = Resync { auts: [0x77; 14] };

/// The golden examples' AKA start (`AuthStart` / `AttachRequest`) for `supi`.
fn aka_start(supi: Supi) -> AuthStart {
    AuthStart {
        supi,
        serving_network_name: "5G:mnc001.mcc001.3gppnetwork.org".into(),
    }
}

pub(crate) fn examples() -> Vec<(&'static str, Vec<u8>)> {
    let sealed = Sealed {
        enc: [0x22; 32],
        ciphertext: vec![0xc0, 0xff, 0xee],
    };
    let binding = |b: u8| KeyBinding {
        scheme: 0x0403,
        signature: vec![b; 8],
    };
    let d = |m: DeviceMessage| m.encode().unwrap();
    let c = |m: CnMessage| m.encode().unwrap();
    let a = |m: AttachMessage| m.encode().unwrap();
    vec![
        (
            "ProvisionRequest",
            d(DeviceMessage::ProvisionRequest(ProvisionRequest {
                request_id: rid(),
                device_id: dev(),
                hpke_public_key: [0x11; 32],
                params: Params {
                    lifetime_s: Some(86400),
                    roaming: Some(false),
                    ..Params::default()
                },
                binding: binding(0x44),
                renewal_binding: Some(binding(0x45)),
                window_code: None,
            })),
        ),
        (
            "RenewRequest",
            d(DeviceMessage::RenewRequest(RenewRequest {
                request_id: rid(),
                supi: supi(),
                hpke_public_key: [0x11; 32],
                params: None,
                binding: binding(0x44),
                renewal_binding: None,
            })),
        ),
        (
            "CredentialDelivery",
            d(DeviceMessage::CredentialDelivery(CredentialDelivery {
                request_id: rid(),
                supi: supi(),
                expires_at: 1_767_225_600,
                sealed: sealed.clone(),
            })),
        ),
        (
            "DeliveryAck",
            d(DeviceMessage::DeliveryAck(DeliveryAck {
                request_id: rid(),
                supi: supi(),
            })),
        ),
        (
            "AckConfirmed",
            d(DeviceMessage::AckConfirmed(AckConfirmed {
                request_id: rid(),
            })),
        ),
        (
            "Pending",
            d(DeviceMessage::Pending(Pending {
                request_id: rid(),
                wait_ms: 5000,
            })),
        ),
        (
            "Error",
            d(DeviceMessage::Error(ErrorMsg::retry_after(
                ErrorCode::Busy,
                "busy",
                2000,
            ))),
        ),
        (
            "AuthStart",
            c(CnMessage::AuthStart(aka_start(
                Supi::new("imsi-001010000000001").unwrap(),
            ))),
        ),
        ("AuthChallenge", c(CnMessage::AuthChallenge(CHALLENGE))),
        ("AuthResponse", c(CnMessage::AuthResponse(RESPONSE))),
        ("AuthResync", c(CnMessage::AuthResync(RESYNC))),
        (
            "AuthResult",
            c(CnMessage::AuthResult(AuthResult {
                max_children: 10,
                active_children: 2,
                max_lifetime_s: 2_592_000,
                roaming_allowed: false,
                max_batch_items: 256,
                dnns: None,
            })),
        ),
        (
            "BatchProvision",
            c(CnMessage::BatchProvision(BatchProvision {
                batch_id: 7,
                items: vec![BatchItem {
                    attestation: None,
                    kind: ItemKind::Provision,
                    request_id: rid(),
                    device_id: dev(),
                    device_key_fingerprint: [0x33; 32],
                    hpke_public_key: [0x11; 32],
                    params: Params::default(),
                    supi: None,
                    device_spki: vec![0x30, 0x00],
                    binding: binding(0x44),
                }],
            })),
        ),
        (
            "BatchResult",
            c(CnMessage::BatchResult(BatchResult {
                batch_id: 7,
                items: vec![ItemResult {
                    request_id: rid(),
                    outcome: Outcome::Issued,
                    supi: Some(supi()),
                    expires_at: Some(1_767_225_600),
                    sealed: Some(sealed),
                    reason: None,
                    retry_after_ms: None,
                }],
            })),
        ),
        (
            "Revoke",
            c(CnMessage::Revoke(Revoke {
                supi: Some(supi()),
                device_id: None,
            })),
        ),
        (
            "RevokeResult",
            c(CnMessage::RevokeResult(RevokeResult {
                revoked: vec![supi()],
            })),
        ),
        ("ListChildren", c(CnMessage::ListChildren(ListChildren {}))),
        (
            "ChildList",
            c(CnMessage::ChildList(ChildList {
                children: vec![Child {
                    supi: supi(),
                    device_id: dev(),
                    issued_at: 1_764_633_600,
                    expires_at: 1_767_225_600,
                    state: ChildState::Active,
                }],
            })),
        ),
        (
            "AttachRequest",
            a(AttachMessage::AttachRequest(aka_start(supi()))),
        ),
        (
            "AttachChallenge",
            a(AttachMessage::AttachChallenge(CHALLENGE)),
        ),
        ("AttachResponse", a(AttachMessage::AttachResponse(RESPONSE))),
        ("AttachResync", a(AttachMessage::AttachResync(RESYNC))),
        (
            "AttachAccept",
            a(AttachMessage::AttachAccept(AttachAccept {
                expires_at: 1_767_225_600,
                restrictions: Restrictions {
                    roaming_allowed: false,
                    dnns: vec!["internet".into()],
                    max_bitrate_kbps: Some(512),
                },
            })),
        ),
    ]
}

/// Golden encodings (also in docs/PROTOCOL.md).
pub(crate) const GOLDEN: &[(&str, &str)] = &[
    (
        "ProvisionRequest",
        "010100000000006aa60050000102030405060708090a0b0c0d0e0f016877617463682d3031025820111111111111111111111111111111111111111111111111111111111111111103a2001a0001518001f404a2001904030148444444444444444405a20019040301484545454545454545",
    ),
    (
        "RenewRequest",
        "010200000000005ca40050000102030405060708090a0b0c0d0e0f0174696d73692d303031303130303030303030303432025820111111111111111111111111111111111111111111111111111111111111111104a20019040301484444444444444444",
    ),
    (
        "CredentialDelivery",
        "0103000000000059a40050000102030405060708090a0b0c0d0e0f0174696d73692d303031303130303030303030303432021a6955b90003a200582022222222222222222222222222222222222222222222222222222222222222220143c0ffee",
    ),
    (
        "DeliveryAck",
        "0104000000000029a20050000102030405060708090a0b0c0d0e0f0174696d73692d303031303130303030303030303432",
    ),
    (
        "AckConfirmed",
        "0105000000000013a10050000102030405060708090a0b0c0d0e0f",
    ),
    (
        "Pending",
        "0106000000000017a20050000102030405060708090a0b0c0d0e0f01191388",
    ),
    ("Error", "017f00000000000da30008016462757379021907d0"),
    (
        "AuthStart",
        "011000000000003aa20074696d73692d30303130313030303030303030303101782035473a6d6e633030312e6d63633030312e336770706e6574776f726b2e6f7267",
    ),
    (
        "AuthChallenge",
        "0111000000000025a2005023232323232323232323232323232323015055555555555555555555555555555555",
    ),
    (
        "AuthResponse",
        "0112000000000036a20050a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5015820b6b6b6b6b6b6b6b6b6b6b6b6b6b6b6b6b6b6b6b6b6b6b6b6b6b6b6b6b6b6b6b6",
    ),
    (
        "AuthResync",
        "0113000000000011a1004e7777777777777777777777777777",
    ),
    (
        "AuthResult",
        "0114000000000011a5000a0102021a00278d0003f404190100",
    ),
    (
        "BatchProvision",
        "0120000000000080a200070181a800000150000102030405060708090a0b0c0d0e0f026877617463682d30310358203333333333333333333333333333333333333333333333333333333333333333045820111111111111111111111111111111111111111111111111111111111111111105a00742300008a20019040301484444444444444444",
    ),
    (
        "BatchResult",
        "0121000000000060a200070181a50050000102030405060708090a0b0c0d0e0f01000274696d73692d303031303130303030303030303432031a6955b90004a200582022222222222222222222222222222222222222222222222222222222222222220143c0ffee",
    ),
    (
        "Revoke",
        "0122000000000017a10074696d73692d303031303130303030303030303432",
    ),
    (
        "RevokeResult",
        "0123000000000018a1008174696d73692d303031303130303030303030303432",
    ),
    ("ListChildren", "0124000000000001a0"),
    (
        "ChildList",
        "0125000000000032a10081a50074696d73692d303031303130303030303030303432016877617463682d3031021a692e2c00031a6955b9000400",
    ),
    (
        "AttachRequest",
        "013000000000003aa20074696d73692d30303130313030303030303030343201782035473a6d6e633030312e6d63633030312e336770706e6574776f726b2e6f7267",
    ),
    (
        "AttachChallenge",
        "0131000000000025a2005023232323232323232323232323232323015055555555555555555555555555555555",
    ),
    (
        "AttachResponse",
        "0132000000000036a20050a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5015820b6b6b6b6b6b6b6b6b6b6b6b6b6b6b6b6b6b6b6b6b6b6b6b6b6b6b6b6b6b6b6b6",
    ),
    (
        "AttachResync",
        "0133000000000011a1004e7777777777777777777777777777",
    ),
    (
        "AttachAccept",
        "013400000000001aa2001a6955b90001a300f4018168696e7465726e657402190200",
    ),
];

#[test]
fn golden_encodings() {
    let ex = examples();
    assert_eq!(ex.len(), GOLDEN.len());
    for ((name, bytes), (gname, ghex)) in ex.iter().zip(GOLDEN) {
        assert_eq!(name, gname);
        assert_eq!(&hex(bytes), ghex, "{name}");
    }
    // Every message type is covered.
    assert_eq!(GOLDEN.len(), MsgType::ALL.len() - 1 + 1);
}

fn roundtrip_any(bytes: &[u8]) {
    match bytes[1] {
        0x01..=0x06 => {
            let m = DeviceMessage::decode(bytes).unwrap();
            assert_eq!(m.encode().unwrap(), bytes);
        }
        0x10..=0x2f => {
            let m = CnMessage::decode(bytes).unwrap();
            assert_eq!(m.encode().unwrap(), bytes);
        }
        0x30..=0x3f => {
            let m = AttachMessage::decode(bytes).unwrap();
            assert_eq!(m.encode().unwrap(), bytes);
        }
        _ => {
            let m = DeviceMessage::decode(bytes).unwrap();
            assert_eq!(m.encode().unwrap(), bytes);
            // Error is valid on every conversation.
            assert!(CnMessage::decode(bytes).is_ok());
            assert!(AttachMessage::decode(bytes).is_ok());
        }
    }
}

#[test]
fn golden_round_trip() {
    for (_, h) in GOLDEN {
        roundtrip_any(&unhex(h));
    }
}

fn dev_body(t: MsgType, body: &[u8]) -> Result<DeviceMessage, ProtoError> {
    DeviceMessage::from_frame(&Frame {
        msg_type: t,
        body: body.to_vec(),
    })
}

fn body_err(r: Result<DeviceMessage, ProtoError>) -> DecodeError {
    match r {
        Err(ProtoError::Body { source, .. }) => source,
        other => panic!("expected body error, got {other:?}"),
    }
}

#[test]
fn unknown_keys_are_ignored() {
    // AckConfirmed {0: rid, 9: "future", 23: [1, {}]}
    let mut b = vec![0xa3, 0x00, 0x50];
    b.extend(rid().0);
    b.extend([0x09, 0x66]);
    b.extend(b"future");
    b.extend([0x17, 0x82, 0x01, 0xa0]);
    let m = dev_body(MsgType::AckConfirmed, &b).unwrap();
    assert_eq!(
        m,
        DeviceMessage::AckConfirmed(AckConfirmed { request_id: rid() })
    );
}

#[test]
fn typed_body_errors() {
    let mut ok = vec![0xa1, 0x00, 0x50];
    ok.extend(rid().0);
    // Trailing bytes after the map.
    let mut t = ok.clone();
    t.push(0x00);
    assert_eq!(
        body_err(dev_body(MsgType::AckConfirmed, &t)),
        DecodeError::TrailingBytes(1)
    );
    // Truncated.
    assert_eq!(
        body_err(dev_body(MsgType::AckConfirmed, &ok[..10])),
        DecodeError::Truncated
    );
    // Wrong type: request_id as text.
    let e = body_err(dev_body(MsgType::AckConfirmed, &[0xa1, 0x00, 0x61, 0x41]));
    assert!(matches!(e, DecodeError::WrongType(_)), "{e:?}");
    // Not a map at all.
    let e = body_err(dev_body(MsgType::AckConfirmed, &[0x80]));
    assert!(matches!(e, DecodeError::WrongType(_)), "{e:?}");
    // Missing mandatory key.
    let e = body_err(dev_body(MsgType::AckConfirmed, &[0xa0]));
    assert!(matches!(e, DecodeError::MissingField(_)), "{e:?}");
    // request_id of 15 bytes.
    let mut short = vec![0xa1, 0x00, 0x4f];
    short.extend(&rid().0[..15]);
    let e = body_err(dev_body(MsgType::AckConfirmed, &short));
    assert!(matches!(e, DecodeError::InvalidValue(_)), "{e:?}");
    // Invalid SUPI in DeliveryAck.
    let mut bad = vec![0xa2, 0x00, 0x50];
    bad.extend(rid().0);
    bad.extend([0x01, 0x64]);
    bad.extend(b"imsi");
    let e = body_err(dev_body(MsgType::DeliveryAck, &bad));
    assert!(matches!(e, DecodeError::InvalidValue(_)), "{e:?}");
    // Empty body.
    assert_eq!(
        body_err(dev_body(MsgType::AckConfirmed, &[])),
        DecodeError::Truncated
    );
}

#[test]
fn frame_level_errors_through_messages() {
    let ack = unhex(GOLDEN[4].1);
    let mut t = ack.clone();
    t.push(0);
    assert!(matches!(
        DeviceMessage::decode(&t),
        Err(ProtoError::Frame(FrameError::TrailingBytes(1)))
    ));
    assert!(matches!(
        CnMessage::decode(&ack),
        Err(ProtoError::Frame(FrameError::UnknownType(0x05)))
    ));
    let two = [ack.clone(), ack.clone()].concat();
    assert_eq!(DeviceMessage::decode_stream(&two).unwrap().len(), 2);
    assert!(DeviceMessage::decode_stream(&two[..two.len() - 1]).is_err());
}

#[test]
fn oversize_batch_is_refused_at_encode() {
    let item = ItemResult {
        request_id: rid(),
        outcome: Outcome::Issued,
        supi: Some(supi()),
        expires_at: Some(1),
        sealed: Some(Sealed {
            enc: [0; 32],
            ciphertext: vec![0; 64 * 1024],
        }),
        reason: None,
        retry_after_ms: None,
    };
    let m = CnMessage::BatchResult(BatchResult {
        batch_id: 1,
        items: vec![item; 70],
    });
    assert!(matches!(m.encode(), Err(EncodeError::TooLarge { .. })));
}

#[test]
fn open_enums_keep_unknown_codes() {
    let e = ErrorMsg::new(ErrorCode::Unknown(999), "x");
    let b = DeviceMessage::Error(e.clone()).encode().unwrap();
    assert_eq!(DeviceMessage::decode(&b).unwrap(), DeviceMessage::Error(e));
    assert_eq!(ErrorCode::from_code(8), ErrorCode::Busy);
    assert!(ErrorCode::Busy.is_retryable());
    assert!(!ErrorCode::QuotaExhausted.is_retryable());
}

/// Conformance with the specification: the example frames of docs/PROTOCOL.md Appendix A are
/// read out of the document; each decodes, re-encodes to exactly the same bytes and is the
/// reference message ([`examples`]); every message type has one. The bundle plaintext of §9
/// decodes to the reference bundle, and the §4.3 `Error` example is the golden `Error` frame.
#[test]
fn protocol_doc_frames_are_the_golden_frames() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/PROTOCOL.md");
    let doc = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (the spec is part of the repository)",
            path.display()
        )
    });
    let appendix = doc
        .split("## Appendix A")
        .nth(1)
        .expect("PROTOCOL.md has Appendix A");
    let block = appendix
        .split("```")
        .nth(1)
        .expect("Appendix A has a code block");
    let mut frames: Vec<(String, Vec<u8>)> = Vec::new();
    for line in block.lines() {
        let t = line.trim();
        if let Some(name) = t.strip_suffix(':') {
            frames.push((name.to_string(), Vec::new()));
        } else if !t.is_empty() {
            let (_, bytes) = frames.last_mut().expect("hex before a name");
            bytes.extend(unhex(t));
        }
    }
    let examples = examples();
    assert_eq!(frames.len(), examples.len(), "one frame per message type");
    for ((name, bytes), (ename, ebytes)) in frames.iter().zip(&examples) {
        assert_eq!(name, ename);
        assert_eq!(&hex(bytes), &hex(ebytes), "{name}: the document's frame");
        roundtrip_any(bytes);
    }
    let squashed: String = doc.split_whitespace().collect();
    let bundle_hex = crate::bundle::tests::GOLDEN.replace(char::is_whitespace, "");
    assert!(squashed.contains(&bundle_hex), "§9 example plaintext");
    let b = crate::bundle::CredentialBundle::decode(&unhex(&bundle_hex)).unwrap();
    assert_eq!(b, crate::bundle::tests::sample());
    assert!(squashed.contains("017f00000000000da30008016462757379021907d0"));
}

/// Prints the example frames (regenerate `GOLDEN` and PROTOCOL.md Appendix A):
/// `cargo test -p companion-proto print_golden -- --ignored --nocapture`.
#[test]
#[ignore]
fn print_golden() {
    for (name, bytes) in examples() {
        println!("GOLDEN {name} {}", hex(&bytes));
    }
    println!(
        "BUNDLE {}",
        hex(&crate::bundle::tests::sample().encode().unwrap())
    );
}
