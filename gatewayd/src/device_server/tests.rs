//! The `Pending` schedule and the block list's eviction order.

use super::admission::blocks_to_evict;
use super::*;

#[test]
fn the_next_pending_leaves_before_the_promise_runs_out_by_two_round_trips() {
    let ms = Duration::from_millis;
    for wait in [1_000u64, 1_500, 2_000, 5_000, 10_000] {
        for rtt in [0u64, 1, 20, 150, 400] {
            let after = next_pending_after(ms(wait), ms(rtt));
            // Sent `after` past the last Pending; even if it takes a whole round trip more
            // than the last one to arrive, the device still sees it before its deadline.
            assert!(
                after + ms(2 * rtt) < ms(wait),
                "wait {wait} ms, rtt {rtt} ms: next after {after:?}"
            );
            assert!(after >= ms(50), "not a busy loop: {after:?}");
        }
    }
    // Half the promise at least on a LAN.
    assert_eq!(next_pending_after(ms(2_000), ms(1)), ms(1_000));
}

#[test]
fn a_full_block_list_makes_room_by_lifting_the_block_ending_soonest() {
    use crate::state::Block;
    let b = |last: u8, until: Option<i64>| Block {
        addr: IpAddr::from([10, 0, 0, last]),
        until,
        created_at: 0,
    };
    let blocks = vec![b(1, None), b(2, Some(50)), b(3, Some(20)), b(4, None)];
    assert!(blocks_to_evict(&blocks, 5).is_empty());
    assert_eq!(
        blocks_to_evict(&blocks, 4),
        vec![(20, IpAddr::from([10, 0, 0, 3]))]
    );
    assert_eq!(blocks_to_evict(&blocks, 3).len(), 2);
    // Only indefinite blocks: nothing is lifted (the new block still goes in, over the
    // bound the filter's sync enforces by leaving the soonest-ending out).
    assert!(blocks_to_evict(&[b(1, None), b(2, None)], 2).is_empty());
}

#[test]
fn pending_waits_span_what_the_schedule_assumes() {
    // The schedule above is checked for promises of 1..10 s: what the provisioner promises.
    assert_eq!(crate::delivery::MIN_PENDING_WAIT, Duration::from_secs(1));
    assert_eq!(crate::delivery::MAX_PENDING_WAIT, Duration::from_secs(10));
}
