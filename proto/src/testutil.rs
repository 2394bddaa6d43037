//! Helpers for the deterministic state-machine tests.

use std::time::{Duration, Instant};

use companion_crypto::aka::{AuthVector, Sqn, generate_vector};
use companion_crypto::milenage::Milenage;
use companion_crypto::secret::Key128;
use companion_crypto::usim::SoftUsim;

use crate::Config;
use crate::aka::{AkaClient, AkaServer, AkaWire};

pub(crate) const SNN: &str = "5G:mnc001.mcc001.3gppnetwork.org";
pub(crate) const K: [u8; 16] = [
    0x46, 0x5b, 0x5c, 0xe8, 0xb1, 0x99, 0xb4, 0x9f, 0xaa, 0x5f, 0x0a, 0x2e, 0xe2, 0x38, 0xa6, 0xbc,
];
pub(crate) const OPC: [u8; 16] = [
    0xcd, 0x63, 0xcb, 0x71, 0x95, 0x4a, 0x9f, 0x4e, 0x48, 0xa5, 0x99, 0x4e, 0x37, 0xa0, 0x2b, 0xaf,
];
pub(crate) const SUPI: &str = "imsi-001010000000001";

pub(crate) fn usim() -> SoftUsim {
    SoftUsim::new(SUPI.into(), Key128::from_bytes(K), Key128::from_bytes(OPC))
}

pub(crate) fn milenage() -> Milenage {
    Milenage::new(&Key128::from_bytes(K), &Key128::from_bytes(OPC))
}

/// A vector for SEQ `seq`, IND 0, with the 5G AMF separation bit set.
pub(crate) fn vector_for(seq: u64, snn: &str) -> AuthVector {
    let sqn = Sqn::from_parts(seq, 0).unwrap();
    vector_sqn(sqn, snn)
}

pub(crate) fn vector_sqn(sqn: Sqn, snn: &str) -> AuthVector {
    let rand: [u8; 16] = core::array::from_fn(|i| (sqn.value() as u8).wrapping_add(i as u8 * 7));
    generate_vector(&milenage(), sqn, &[0x80, 0x00], rand, snn)
}

pub(crate) fn cfg() -> Config {
    Config {
        timeout: Duration::from_secs(10),
        max_resyncs: 2,
    }
}

pub(crate) fn t0() -> Instant {
    Instant::now()
}

/// Moves every queued frame from `$from` to `$to` (returns the last result of `handle_bytes`).
macro_rules! pump {
    ($from:expr, $to:expr, $now:expr) => {{
        let mut r = Ok(());
        while let Some(b) = $from.poll_transmit() {
            r = $to.handle_bytes($now, &b);
            if r.is_err() {
                break;
            }
        }
        r
    }};
}
pub(crate) use pump;

/// Collects all queued events.
macro_rules! events {
    ($m:expr) => {{
        let mut v = Vec::new();
        while let Some(e) = $m.poll_event() {
            v.push(e);
        }
        v
    }};
}
pub(crate) use events;

/// Decodes the frames a machine queued, as messages of type `$t`.
macro_rules! sent {
    ($m:expr, $t:ty) => {{
        let mut v = Vec::new();
        while let Some(b) = $m.poll_transmit() {
            v.push(<$t as crate::msg::Message>::decode(&b).unwrap());
        }
        v
    }};
}
pub(crate) use sent;

/// Runs AKA from the client's start until the client has answered the challenge for SEQ `seq`
/// (the answer is queued at the client, not yet delivered); the events before it are consumed.
pub(crate) fn answer_challenge_for<W: AkaWire>(
    usim: &mut SoftUsim,
    c: &mut AkaClient<W>,
    s: &mut AkaServer<W>,
    seq: u64,
    now: Instant,
) {
    pump!(c, s, now).unwrap();
    events!(s);
    s.provide_vector(now, vector_for(seq, SNN)).unwrap();
    pump!(s, c, now).unwrap();
    events!(c);
    c.answer_challenge(now, usim).unwrap();
}
