//! Frame encode/decode of the largest message (a 256-item `BatchResult`) and of a small device
//! message, and the incremental frame decoder over a stream of frames.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::hint::black_box;

use companion_proto::msg::{BatchResult, CnMessage, ItemResult, Message, Outcome, Sealed};
use companion_proto::{Conversation, FrameDecoder, RequestId, Supi};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

fn batch_result(n: usize) -> CnMessage {
    let items = (0..n)
        .map(|i| ItemResult {
            request_id: RequestId([i as u8; 16]),
            outcome: Outcome::Issued,
            supi: Some(Supi::new(&format!("imsi-00101{:010}", i)).unwrap()),
            expires_at: Some(1_800_000_000),
            sealed: Some(Sealed {
                enc: [i as u8; 32],
                ciphertext: vec![0xa5; 616],
            }),
            reason: None,
            retry_after_ms: None,
        })
        .collect();
    CnMessage::BatchResult(BatchResult { batch_id: 1, items })
}

fn frames(c: &mut Criterion) {
    let msg = batch_result(256);
    let bytes = msg.encode().unwrap();
    let mut g = c.benchmark_group("frame");
    g.throughput(Throughput::Bytes(bytes.len() as u64));
    g.bench_function("encode BatchResult x256", |b| {
        b.iter(|| black_box(&msg).encode().unwrap())
    });
    g.bench_function("decode BatchResult x256", |b| {
        b.iter(|| CnMessage::decode(black_box(&bytes)).unwrap())
    });
    // The same bytes arriving in 1,200-byte pieces, as QUIC STREAM frames might deliver them.
    g.bench_function("FrameDecoder, 1200-byte chunks", |b| {
        b.iter(|| {
            let mut d = FrameDecoder::new(Conversation::Cn);
            let mut n = 0;
            for chunk in bytes.chunks(1200) {
                d.push(chunk);
                while d.next_frame().unwrap().is_some() {
                    n += 1;
                }
            }
            assert_eq!(n, 1);
        })
    });
    g.finish();
}

criterion_group!(benches, frames);
criterion_main!(benches);
