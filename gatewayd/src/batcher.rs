//! Smart batching of credential requests towards the CN, as a plain state machine.
//!
//! The rule, in the spirit of a database's group commit:
//! - with **no batch in flight**, whatever is queued goes out at once — an idle gateway adds no
//!   latency;
//! - while batches are in flight, new requests **accumulate** into the next batch, which leaves
//!   when it is full (`max_batch`), when its oldest request has waited `max_wait`, and only while
//!   fewer than `max_in_flight` batches are outstanding;
//! - the queue is **bounded**: when it is full a request is refused with a "busy, retry after"
//!   estimate derived from the measured batch service time, instead of growing memory.
//!
//! The batcher owns no clock and no task: the caller passes `now`, sleeps until
//! [`Batcher::next_deadline`] and reports completions. Tests drive it deterministically.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

/// Batching limits (all from the gateway's configuration).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BatcherConfig {
    /// Most requests in one batch.
    pub max_batch: usize,
    /// Longest a queued request waits for company while other batches are in flight.
    pub max_wait: Duration,
    /// Most batches outstanding at the CN at once.
    pub max_in_flight: usize,
    /// Most requests waiting in the queue; beyond it requests are refused as busy.
    pub queue_capacity: usize,
}

impl Default for BatcherConfig {
    fn default() -> Self {
        Self {
            max_batch: 256,
            max_wait: Duration::from_millis(5),
            max_in_flight: 4,
            queue_capacity: 8192,
        }
    }
}

impl BatcherConfig {
    /// Every limit must be at least one.
    pub fn validate(&self) -> Result<(), String> {
        if self.max_batch == 0 || self.max_in_flight == 0 || self.queue_capacity == 0 {
            return Err("max_batch, max_in_flight and queue_capacity must be at least 1".into());
        }
        Ok(())
    }
}

/// A request refused because the queue is full.
#[derive(Debug, PartialEq, Eq)]
pub struct Busy<T> {
    /// The refused request, handed back.
    pub item: T,
    /// When the caller should try again.
    pub retry_after: Duration,
}

/// A batch ready to send; report it back with [`Batcher::complete`] once the CN has answered (or
/// the attempt failed).
#[derive(Debug, PartialEq, Eq)]
pub struct Batch<T> {
    /// Sequence number, for [`Batcher::complete`].
    pub id: u64,
    /// The items, in arrival order.
    pub items: Vec<T>,
}

#[derive(Debug)]
struct Queued<T> {
    item: T,
    since: Instant,
}

/// Service time assumed before any batch has completed.
const INITIAL_SERVICE_TIME: Duration = Duration::from_millis(50);
const MIN_RETRY: Duration = Duration::from_millis(50);
const MAX_RETRY: Duration = Duration::from_secs(30);

/// The batching state machine; `T` is whatever the caller queues (a request and its reply path).
#[derive(Debug)]
pub struct Batcher<T> {
    cfg: BatcherConfig,
    queue: VecDeque<Queued<T>>,
    /// Batches lost with their CN session, to send again as they were (same id, same items)
    /// before any new batch.
    resend: VecDeque<(Batch<T>, Instant)>,
    in_flight: HashMap<u64, Instant>,
    next_id: u64,
    /// Exponentially weighted mean time from sending a batch to its completion.
    service_time: Duration,
}

impl<T> Batcher<T> {
    /// A batcher with `cfg`; call [`BatcherConfig::validate`] first (zero limits are raised to 1).
    pub fn new(mut cfg: BatcherConfig) -> Self {
        cfg.max_batch = cfg.max_batch.max(1);
        cfg.max_in_flight = cfg.max_in_flight.max(1);
        cfg.queue_capacity = cfg.queue_capacity.max(1);
        Self {
            cfg,
            queue: VecDeque::new(),
            resend: VecDeque::new(),
            in_flight: HashMap::new(),
            next_id: 1,
            service_time: INITIAL_SERVICE_TIME,
        }
    }

    /// The limits in force.
    pub fn config(&self) -> &BatcherConfig {
        &self.cfg
    }

    /// Replaces the limits (configuration reload). Queued and in-flight work is kept.
    pub fn reconfigure(&mut self, cfg: BatcherConfig) {
        let Self {
            queue,
            resend,
            in_flight,
            next_id,
            service_time,
            ..
        } = std::mem::replace(self, Self::new(cfg));
        self.queue = queue;
        self.resend = resend;
        self.in_flight = in_flight;
        self.next_id = next_id;
        self.service_time = service_time;
    }

    /// Requests waiting for a batch.
    pub fn queue_len(&self) -> usize {
        self.queue.len()
    }

    /// Batches waiting to be sent again ([`Batcher::resend`]).
    pub fn resend_len(&self) -> usize {
        self.resend.len()
    }

    /// Batches sent and not yet completed.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// The current estimate of one batch's round trip to the CN.
    pub fn service_time(&self) -> Duration {
        self.service_time
    }

    /// Queues a request, or refuses it when the queue is full.
    pub fn push(&mut self, item: T, now: Instant) -> Result<(), Busy<T>> {
        if self.queue.len() >= self.cfg.queue_capacity {
            return Err(Busy {
                item,
                retry_after: self.retry_after(),
            });
        }
        self.queue.push_back(Queued { item, since: now });
        Ok(())
    }

    /// Puts requests back at the head of the queue (a batch whose send failed), oldest first,
    /// keeping their original arrival time. May exceed the capacity briefly: these requests were
    /// already admitted and are not refused twice.
    pub fn requeue_front(&mut self, items: Vec<T>, since: Instant) {
        for item in items.into_iter().rev() {
            self.queue.push_front(Queued { item, since });
        }
    }

    /// How long a refused caller should wait: the time to drain the current queue at the measured
    /// service rate, bounded to [50 ms, 30 s].
    pub fn retry_after(&self) -> Duration {
        let batches = self.queue.len().div_ceil(self.cfg.max_batch) as u32;
        let rounds = batches.div_ceil(self.cfg.max_in_flight as u32).max(1);
        (self.service_time * rounds).clamp(MIN_RETRY, MAX_RETRY)
    }

    /// Takes back batch `batch`, which was in flight on a CN session that was lost: its slot is
    /// freed (no service-time sample: a lost session says nothing about the CN's speed) and the
    /// batch is sent again **as it was** — same id, same items, so the same request IDs, which
    /// the CN's idempotency ledger answers with the credentials it already issued — before any
    /// new batch, on whatever session [`Batcher::poll_batch`]'s caller picks. Never re-formed
    /// into new requests.
    pub fn resend(&mut self, batch: Batch<T>, now: Instant) {
        self.in_flight.remove(&batch.id);
        self.resend.push_back((batch, now));
    }

    /// The next batch to send now, if the rule allows one: a batch to send again first
    /// ([`Batcher::resend`], while fewer than `max_in_flight` are out), else a new one.
    pub fn poll_batch(&mut self, now: Instant) -> Option<Batch<T>> {
        if !self.resend.is_empty() && self.in_flight.len() < self.cfg.max_in_flight {
            let (batch, _) = self.resend.pop_front()?;
            self.in_flight.insert(batch.id, now);
            return Some(batch);
        }
        let oldest = self.queue.front()?.since;
        let ready = self.in_flight.is_empty()
            || (self.in_flight.len() < self.cfg.max_in_flight
                && (self.queue.len() >= self.cfg.max_batch
                    || now.saturating_duration_since(oldest) >= self.cfg.max_wait));
        if !ready {
            return None;
        }
        let n = self.queue.len().min(self.cfg.max_batch);
        let items = self.queue.drain(..n).map(|q| q.item).collect();
        let id = self.next_id;
        self.next_id += 1;
        self.in_flight.insert(id, now);
        Some(Batch { id, items })
    }

    /// When [`Batcher::poll_batch`] may next return a batch although nothing else happens; `None`
    /// when only a push or a completion can change that.
    pub fn next_deadline(&self) -> Option<Instant> {
        if let Some((_, since)) = self.resend.front() {
            return (self.in_flight.len() < self.cfg.max_in_flight).then_some(*since);
        }
        let oldest = self.queue.front()?.since;
        if self.in_flight.is_empty() {
            // Ready immediately.
            return Some(oldest);
        }
        if self.in_flight.len() >= self.cfg.max_in_flight {
            return None;
        }
        Some(oldest + self.cfg.max_wait)
    }

    /// Reports that batch `id` finished (answered or failed); frees its in-flight slot and feeds
    /// the service-time estimate. Unknown ids are ignored.
    pub fn complete(&mut self, id: u64, now: Instant) {
        if let Some(sent) = self.in_flight.remove(&id) {
            let took = now.saturating_duration_since(sent);
            // EWMA with weight 1/4 for the newest sample.
            self.service_time = (self.service_time * 3 + took) / 4;
        }
    }

    /// Frees batch `id`'s in-flight slot without a service-time sample: its session was lost,
    /// which says nothing about how fast the CN serves. Unknown ids are ignored.
    pub fn abandon(&mut self, id: u64) {
        self.in_flight.remove(&id);
    }

    /// Empties the queue and the batches to send again (shutdown, or CN unreachable): the
    /// caller answers each request itself.
    pub fn drain(&mut self) -> Vec<T> {
        let mut out: Vec<T> = self.resend.drain(..).flat_map(|(b, _)| b.items).collect();
        out.extend(self.queue.drain(..).map(|q| q.item));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn cfg(max_batch: usize, wait_ms: u64, in_flight: usize, cap: usize) -> BatcherConfig {
        BatcherConfig {
            max_batch,
            max_wait: Duration::from_millis(wait_ms),
            max_in_flight: in_flight,
            queue_capacity: cap,
        }
    }

    #[test]
    fn idle_gateway_sends_at_once() {
        let t0 = Instant::now();
        let mut b = Batcher::new(cfg(8, 5, 2, 100));
        b.push(1, t0).unwrap();
        assert_eq!(b.next_deadline(), Some(t0));
        assert_eq!(
            b.poll_batch(t0),
            Some(Batch {
                id: 1,
                items: vec![1]
            })
        );
        assert_eq!(b.in_flight(), 1);
    }

    #[test]
    fn requests_accumulate_while_a_batch_is_in_flight() {
        let t0 = Instant::now();
        let mut b = Batcher::new(cfg(4, 5, 2, 100));
        b.push(0, t0).unwrap();
        let first = b.poll_batch(t0).unwrap();
        for i in 1..=3 {
            b.push(i, t0).unwrap();
        }
        assert_eq!(b.poll_batch(t0), None, "waits for company");
        assert_eq!(b.next_deadline(), Some(t0 + Duration::from_millis(5)));
        b.push(4, t0).unwrap();
        let second = b.poll_batch(t0).unwrap();
        assert_eq!(
            second.items,
            vec![1, 2, 3, 4],
            "a full batch leaves without waiting"
        );
        // Two in flight = the limit: nothing leaves, whatever the wait.
        b.push(5, t0).unwrap();
        assert_eq!(b.poll_batch(t0 + Duration::from_secs(1)), None);
        assert_eq!(b.next_deadline(), None);
        b.complete(first.id, t0 + Duration::from_millis(2));
        assert_eq!(
            b.poll_batch(t0 + Duration::from_millis(2)),
            None,
            "5 has waited only 2 ms"
        );
        let third = b.poll_batch(t0 + Duration::from_millis(5)).unwrap();
        assert_eq!(third.items, vec![5], "max_wait releases a partial batch");
    }

    #[test]
    fn after_all_batches_complete_the_queue_leaves_at_once() {
        let t0 = Instant::now();
        let mut b = Batcher::new(cfg(4, 1000, 1, 100));
        b.push(0, t0).unwrap();
        let first = b.poll_batch(t0).unwrap();
        b.push(1, t0).unwrap();
        b.complete(first.id, t0);
        assert_eq!(b.poll_batch(t0).unwrap().items, vec![1]);
    }

    #[test]
    fn a_full_queue_answers_busy_with_a_measured_retry() {
        let t0 = Instant::now();
        let mut b = Batcher::new(cfg(2, 5, 1, 4));
        b.push(0, t0).unwrap();
        let first = b.poll_batch(t0).unwrap();
        b.complete(first.id, t0 + Duration::from_millis(400));
        b.push(1, t0).unwrap();
        let _second = b.poll_batch(t0).unwrap();
        for i in 2..6 {
            b.push(i, t0).unwrap();
        }
        let busy = b.push(99, t0).unwrap_err();
        assert_eq!(busy.item, 99);
        // Service time ~ (50*3+400)/4 = 137.5 ms; 4 queued = 2 batches = 2 rounds at 1 in flight.
        assert_eq!(busy.retry_after, Duration::from_micros(137_500) * 2);
    }

    #[test]
    fn failed_batches_are_requeued_in_order_and_drained() {
        let t0 = Instant::now();
        let mut b = Batcher::new(cfg(3, 5, 1, 10));
        for i in 0..5 {
            b.push(i, t0).unwrap();
        }
        let batch = b.poll_batch(t0).unwrap();
        assert_eq!(batch.items, vec![0, 1, 2]);
        b.complete(batch.id, t0);
        b.requeue_front(batch.items, t0);
        assert_eq!(b.drain(), vec![0, 1, 2, 3, 4]);
        assert_eq!(b.queue_len(), 0);
    }

    #[test]
    fn a_batch_lost_with_its_session_is_sent_again_unchanged_before_new_ones() {
        let t0 = Instant::now();
        let mut b = Batcher::new(cfg(3, 5, 2, 100));
        for i in 0..3 {
            b.push(i, t0).unwrap();
        }
        let lost = b.poll_batch(t0).unwrap();
        assert_eq!((lost.id, lost.items.clone()), (1, vec![0, 1, 2]));
        // New requests arrive while it is out; another batch leaves too.
        for i in 3..7 {
            b.push(i, t0).unwrap();
        }
        let other = b.poll_batch(t0).unwrap();
        assert_eq!(other.items, vec![3, 4, 5]);
        assert_eq!(b.in_flight(), 2);
        // Its session dies: the batch comes back, its slot is free, the service time unchanged.
        let st = b.service_time();
        b.resend(lost, t0 + Duration::from_millis(1));
        assert_eq!((b.in_flight(), b.resend_len()), (1, 1));
        assert_eq!(b.service_time(), st);
        assert_eq!(b.next_deadline(), Some(t0 + Duration::from_millis(1)));
        // It leaves first, identical (same id, same items: same request IDs), not merged with
        // the queued request 6 and not given a new id.
        let again = b.poll_batch(t0 + Duration::from_millis(1)).unwrap();
        assert_eq!(
            again,
            Batch {
                id: 1,
                items: vec![0, 1, 2]
            }
        );
        assert_eq!(b.in_flight(), 2);
        // Answered this time: complete() accepts the same id.
        b.complete(again.id, t0 + Duration::from_millis(3));
        b.complete(other.id, t0 + Duration::from_millis(3));
        let next = b.poll_batch(t0 + Duration::from_millis(3)).unwrap();
        assert_eq!(
            (next.id, next.items),
            (3, vec![6]),
            "new batches get new ids"
        );
        // With one batch in flight at most: the resent batch takes the freed slot, and the
        // queue waits behind it.
        let mut b = Batcher::new(cfg(2, 5, 1, 100));
        b.push(0, t0).unwrap();
        b.push(1, t0).unwrap();
        let x = b.poll_batch(t0).unwrap();
        b.push(2, t0).unwrap();
        b.resend(x, t0);
        let x = b.poll_batch(t0).unwrap();
        assert_eq!((x.id, x.items.clone()), (1, vec![0, 1]));
        assert_eq!(
            b.poll_batch(t0 + Duration::from_secs(1)),
            None,
            "one in flight at most"
        );
        // Lost again and the link is down: drain hands back the batch to resend and the queue.
        b.resend(x, t0);
        assert_eq!(b.drain(), vec![0, 1, 2]);
        assert_eq!((b.resend_len(), b.queue_len()), (0, 0));
    }

    #[derive(Debug, Clone)]
    enum Op {
        Push,
        Poll,
        Complete,
        Advance(u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => Just(Op::Push),
            3 => Just(Op::Poll),
            2 => Just(Op::Complete),
            1 => (0u64..20).prop_map(Op::Advance),
        ]
    }

    proptest! {
        /// Whatever the interleaving: every admitted request leaves exactly once and in order, no
        /// batch exceeds max_batch, in-flight never exceeds max_in_flight, the queue never exceeds
        /// its capacity, and an idle batcher never holds a request back.
        #[test]
        fn batching_invariants(
            max_batch in 1usize..8, wait in 0u64..10, max_in_flight in 1usize..4, cap in 1usize..32,
            ops in proptest::collection::vec(op(), 1..300),
        ) {
            let mut now = Instant::now();
            let mut b = Batcher::new(cfg(max_batch, wait, max_in_flight, cap));
            let (mut next, mut admitted, mut sent) = (0u32, Vec::new(), Vec::new());
            let mut outstanding = VecDeque::new();
            for op in ops {
                match op {
                    Op::Push => {
                        match b.push(next, now) {
                            Ok(()) => admitted.push(next),
                            Err(busy) => {
                                prop_assert_eq!(b.queue_len(), cap);
                                prop_assert!(busy.retry_after >= MIN_RETRY && busy.retry_after <= MAX_RETRY);
                            }
                        }
                        next += 1;
                    }
                    Op::Poll => {
                        let idle = b.in_flight() == 0 && b.queue_len() > 0;
                        match b.poll_batch(now) {
                            Some(batch) => {
                                prop_assert!(!batch.items.is_empty() && batch.items.len() <= max_batch);
                                sent.extend(batch.items);
                                outstanding.push_back(batch.id);
                            }
                            None => prop_assert!(!idle, "idle batcher held requests back"),
                        }
                    }
                    Op::Complete => if let Some(id) = outstanding.pop_front() { b.complete(id, now) },
                    Op::Advance(ms) => now += Duration::from_millis(ms),
                }
                prop_assert!(b.in_flight() <= max_in_flight);
                prop_assert!(b.queue_len() <= cap);
            }
            sent.extend(b.drain());
            prop_assert_eq!(sent, admitted);
        }
    }

    proptest! {
        /// With sessions lost at random: a lost batch comes back with the same id and the same
        /// items, before new ones (never re-formed, never merged with new requests); every
        /// request is answered exactly once in the end (completed, or drained when the link goes
        /// down); no request is in two batches at once; in-flight stays within its limit.
        #[test]
        fn lost_batches_come_back_unchanged(
            max_batch in 1usize..6, max_in_flight in 1usize..4,
            ops in proptest::collection::vec(0u8..5, 1..300),
        ) {
            let now = Instant::now();
            let mut b = Batcher::new(cfg(max_batch, 0, max_in_flight, 1000));
            let mut next = 0u32;
            let mut admitted = Vec::new();
            let mut out: Vec<Batch<u32>> = Vec::new();
            // Lost batches not sent again yet: id -> items.
            let mut lost: HashMap<u64, Vec<u32>> = HashMap::new();
            let mut answered = Vec::new();
            for op in ops {
                match op {
                    0 | 1 => {
                        b.push(next, now).unwrap();
                        admitted.push(next);
                        next += 1;
                    }
                    2 => {
                        let mut resend_first = !lost.is_empty() && out.len() < max_in_flight;
                        while let Some(batch) = b.poll_batch(now) {
                            if std::mem::take(&mut resend_first) {
                                prop_assert!(lost.contains_key(&batch.id), "a lost batch leaves first");
                            }
                            for i in &batch.items {
                                let home = lost.iter().find(|(_, items)| items.contains(i)).map(|(id, _)| *id);
                                prop_assert!(home.is_none_or(|id| id == batch.id), "request {} re-formed into batch {}", i, batch.id);
                                prop_assert!(!out.iter().any(|o| o.items.contains(i)), "request {} twice in flight", i);
                            }
                            if let Some(items) = lost.remove(&batch.id) {
                                prop_assert_eq!(&batch.items, &items, "resent batch changed");
                            }
                            out.push(batch);
                        }
                    }
                    3 => if !out.is_empty() {
                        // The session of the oldest batch is lost.
                        let batch = out.remove(0);
                        lost.insert(batch.id, batch.items.clone());
                        b.resend(batch, now);
                    },
                    _ => if !out.is_empty() {
                        let batch = out.remove(0);
                        b.complete(batch.id, now);
                        answered.extend(batch.items);
                    },
                }
                prop_assert!(b.in_flight() <= max_in_flight);
                prop_assert_eq!(b.in_flight(), out.len());
            }
            for batch in out.drain(..) {
                b.complete(batch.id, now);
                answered.extend(batch.items);
            }
            answered.extend(b.drain());
            answered.sort_unstable();
            prop_assert_eq!(answered, admitted);
        }
    }
}
