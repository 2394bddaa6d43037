//! Decoding AttachMessage frames: never panics; what decodes re-encodes to something that decodes equal.
#![no_main]
use companion_proto::msg::{AttachMessage, Message};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = AttachMessage::decode(data) {
        let bytes = m.encode().expect("a decoded message re-encodes");
        let again = AttachMessage::decode(&bytes).expect("a re-encoded message decodes");
        assert_eq!(again, m);
        assert_eq!(
            again.encode().expect("encodes"),
            bytes,
            "encoding is deterministic"
        );
    }
    let _ = AttachMessage::decode_stream(data);
});
