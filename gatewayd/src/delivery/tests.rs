//! Unit tests of [`super`].

use super::*;

#[test]
fn sealed_round_trips() {
    let s = Sealed {
        enc: [7; 32],
        ciphertext: vec![1, 2, 3],
    };
    assert_eq!(decode_sealed(&encode_sealed(&s)), Some(s));
    assert_eq!(decode_sealed(&[0; 31]), None);
}

#[test]
fn params_round_trip_through_json() {
    let p = Params {
        lifetime_s: Some(60),
        roaming: Some(true),
        dnns: Some(vec!["iot".into()]),
        max_bitrate_kbps: None,
    };
    assert_eq!(params_from_json(params_to_json(&p).as_deref()), p);
    assert_eq!(params_from_json(None), Params::default());
}

#[test]
fn renewal_ids_match_the_reference_device() {
    let r = RequestId([9; 16]);
    assert_ne!(renewal_request_id(&r), r);
    assert_eq!(renewal_request_id(&r), renewal_request_id(&r));
}
