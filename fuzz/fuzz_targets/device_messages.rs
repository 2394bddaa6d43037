//! Decoding DeviceMessage frames: never panics; what decodes re-encodes to something that decodes equal.
#![no_main]
use companion_proto::msg::{DeviceMessage, Message};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = DeviceMessage::decode(data) {
        let bytes = m.encode().expect("a decoded message re-encodes");
        let again = DeviceMessage::decode(&bytes).expect("a re-encoded message decodes");
        assert_eq!(again, m);
        assert_eq!(
            again.encode().expect("encodes"),
            bytes,
            "encoding is deterministic"
        );
    }
    let _ = DeviceMessage::decode_stream(data);
});
