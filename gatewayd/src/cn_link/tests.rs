//! Unit tests of [`super`].

use super::*;

#[test]
fn backoff_doubles_and_caps_with_jitter() {
    let b = Backoff {
        min: Duration::from_millis(500),
        max: Duration::from_secs(30),
    };
    assert_eq!(b.delay(1), Duration::from_millis(500));
    assert_eq!(b.delay(2), Duration::from_secs(1));
    assert_eq!(b.delay(4), Duration::from_secs(4));
    assert_eq!(b.delay(100), Duration::from_secs(30));
    for _ in 0..50 {
        let j = Backoff::jitter(Duration::from_secs(2));
        assert!(
            j >= Duration::from_secs(1) && j <= Duration::from_secs(2),
            "{j:?}"
        );
    }
}

#[test]
fn slots_spread_over_endpoints_and_leave_a_failed_one() {
    let b = Backoff {
        min: Duration::from_millis(500),
        max: Duration::from_secs(30),
    };
    let t0 = Instant::now();
    let mut e = Endpoints::new(2);
    // Four slots spread two and two.
    for slot in 0..4 {
        let i = e.pick(slot, t0).unwrap();
        e.attach(i);
        e.succeeded(i);
    }
    assert_eq!((e.sessions(0), e.sessions(1)), (2, 2));
    // Endpoint 1 dies: its two slots lose their sessions and move to endpoint 0.
    let retry = e.failed(1, t0, &b);
    assert!(
        retry >= t0 + Duration::from_millis(250) && retry <= t0 + Duration::from_millis(500),
        "first backoff step with jitter: {:?}",
        retry - t0
    );
    for slot in [1, 3] {
        e.detach(1);
        assert!(e.in_backoff(1, t0));
        assert_eq!(e.pick(slot, t0), Ok(0), "a failed endpoint is avoided");
        e.attach(0);
    }
    assert_eq!((e.sessions(0), e.sessions(1)), (4, 0));
    // A second slot noticing the same failure does not lengthen the wait.
    assert_eq!(e.failed(1, t0 + Duration::from_millis(10), &b), retry);
    // Once its backoff ends it is tried again, and preferred (fewest sessions).
    assert_eq!(e.pick(5, retry), Ok(1));
    // It fails again: the wait doubles (with jitter), independently of endpoint 0.
    let retry2 = e.failed(1, retry, &b);
    assert!(
        retry2 - retry >= Duration::from_millis(500) && retry2 - retry <= Duration::from_secs(1)
    );
    assert!(!e.in_backoff(0, retry));
    // Both down: the slot waits for the earliest retry time.
    let r0 = e.failed(0, retry, &b);
    assert_eq!(e.pick(0, retry), Err(r0.min(retry2)));
    // A success clears the failure count.
    e.succeeded(1);
    assert!(!e.in_backoff(1, retry));
    assert_eq!(e.pick(0, retry), Ok(1));
}

#[test]
fn a_returning_endpoint_gets_sessions_back_one_at_a_time() {
    let b = Backoff {
        min: Duration::from_millis(500),
        max: Duration::from_secs(30),
    };
    let t0 = Instant::now();
    let mut e = Endpoints::new(2);
    // Endpoint 0 failed: all four sessions on 1.
    let retry = e.failed(0, t0, &b);
    for _ in 0..4 {
        e.attach(1);
    }
    assert_eq!(
        e.rebalance(1, t0),
        None,
        "not while it waits out its backoff"
    );
    assert_eq!(e.rebalance(1, retry), Some(0));
    // Moves reserve their place: after two, the spread is even and nothing else moves.
    e.attach(0);
    e.detach(1);
    assert_eq!(e.rebalance(1, retry), Some(0));
    e.attach(0);
    e.detach(1);
    assert_eq!(e.rebalance(1, retry), None);
    assert_eq!(e.rebalance(0, retry), None);
    // 2/1 is even enough (a difference of one never moves back and forth).
    e.detach(0);
    assert_eq!(e.rebalance(1, retry), None);
}

#[test]
fn backoff_spreads_many_gateways() {
    // 1,000 gateways losing the same endpoint at the same instant come back spread over
    // half the backoff step, not in lockstep.
    let b = Backoff {
        min: Duration::from_secs(2),
        max: Duration::from_secs(30),
    };
    let t0 = Instant::now();
    let mut at: Vec<Duration> = (0..1000)
        .map(|_| {
            let mut e = Endpoints::new(1);
            e.failed(0, t0, &b) - t0
        })
        .collect();
    at.sort();
    assert!(at[0] >= Duration::from_secs(1) && at[999] <= Duration::from_secs(2));
    let distinct = at.windows(2).filter(|w| w[0] != w[1]).count();
    assert!(distinct > 500, "only {distinct} distinct retry times");
    // No 10 ms bucket holds more than 5% of them.
    let mut buckets = std::collections::HashMap::new();
    for d in &at {
        *buckets.entry(d.as_millis() / 10).or_insert(0u32) += 1;
    }
    assert!(buckets.values().all(|&n| n <= 50), "{buckets:?}");
}

#[test]
fn unconfigured_link_has_no_session() {
    let l = CnLink::new(2, Vec::new());
    assert_eq!(l.state(), CnLinkState::NotConfigured);
    assert!(l.session().is_none());
    assert!(l.retry_after() >= Duration::from_millis(500));
}
