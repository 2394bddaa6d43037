//! Decoding credential bundles (HPKE plaintexts).
#![no_main]
use companion_proto::bundle::CredentialBundle;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(b) = CredentialBundle::decode(data) {
        let enc = b.encode().expect("a decoded bundle re-encodes");
        let again = CredentialBundle::decode(&enc).expect("a re-encoded bundle decodes");
        assert_eq!(again, b);
    }
});
