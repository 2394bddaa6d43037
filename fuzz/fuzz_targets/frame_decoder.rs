//! The incremental frame decoder, fed in chunks whose sizes come from the input.
#![no_main]
use companion_proto::frame::{Conversation, FrameDecoder, HEADER_LEN, decode_frame};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&split, rest)) = data.split_first() else {
        return;
    };
    for conv in [Conversation::Device, Conversation::Cn, Conversation::Attach] {
        let _ = decode_frame(conv, rest);
        let mut d = FrameDecoder::new(conv);
        let step = usize::from(split % 17) + 1;
        let mut total = 0usize;
        for chunk in rest.chunks(step) {
            d.push(chunk);
            loop {
                match d.next_frame() {
                    Ok(Some(f)) => {
                        total += HEADER_LEN + f.body.len();
                        assert!(f.body.len() <= conv.max_body_len());
                    }
                    Ok(None) | Err(_) => break,
                }
            }
        }
        assert!(total <= rest.len());
        let _ = d.finish();
    }
});
