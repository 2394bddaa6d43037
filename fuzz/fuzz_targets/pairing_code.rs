//! Parsing pairing codes.
#![no_main]
use companion_proto::pairing::PairingCode;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(code) = PairingCode::parse(s) {
        let again = PairingCode::parse(&code.to_string()).expect("a formatted code parses");
        assert_eq!(again, code);
        let _ = code.fingerprint();
    }
});
