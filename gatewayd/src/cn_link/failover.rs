//! Endpoint failover without I/O: the reconnection backoff and which endpoint each slot uses
//! (fewest sessions first, failed endpoints waiting out their own backoff).

use std::hash::BuildHasher;
use std::time::{Duration, Instant};

/// Reconnection settings.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    /// First delay after a failure.
    pub min: Duration,
    /// Longest delay (the doubling stops here).
    pub max: Duration,
}

impl Backoff {
    /// The delay after `failures` consecutive failures, before jitter: `min * 2^(failures-1)`,
    /// capped at `max`.
    pub fn delay(&self, failures: u32) -> Duration {
        let exp = failures.saturating_sub(1).min(20);
        self.min.saturating_mul(1u32 << exp).min(self.max)
    }

    /// `d` scaled by a random factor in [0.5, 1.0] ("equal jitter"), so many gateways that lost
    /// the same CN do not come back in lockstep.
    pub fn jitter(d: Duration) -> Duration {
        let r = std::collections::hash_map::RandomState::new().hash_one(Instant::now());
        let frac = 0.5 + (r % 1000) as f64 / 2000.0;
        d.mul_f64(frac)
    }
}

/// Health of one CN endpoint.
#[derive(Debug, Clone, Default)]
pub(super) struct Health {
    /// Consecutive failures (attempts refused or unanswered, sessions lost).
    pub(super) failures: u32,
    /// Not to be tried before this instant (backoff after a failure).
    pub(super) retry_at: Option<Instant>,
    /// Slots whose session is on this endpoint (connecting or up).
    sessions: usize,
}

/// Which endpoint each slot uses: the failover state, without I/O (times are passed in).
#[derive(Debug)]
pub struct Endpoints {
    pub(super) health: Vec<Health>,
}

impl Endpoints {
    /// `n` endpoints, all usable.
    pub fn new(n: usize) -> Self {
        Self {
            health: vec![Health::default(); n],
        }
    }

    /// Whether endpoint `i` waits out its backoff at `now`.
    pub fn in_backoff(&self, i: usize, now: Instant) -> bool {
        self.health
            .get(i)
            .and_then(|h| h.retry_at)
            .is_some_and(|t| t > now)
    }

    /// Consecutive failures of endpoint `i` (0: healthy).
    pub fn failures(&self, i: usize) -> u32 {
        self.health.get(i).map_or(0, |h| h.failures)
    }

    /// Slots on endpoint `i`.
    pub fn sessions(&self, i: usize) -> usize {
        self.health.get(i).map_or(0, |h| h.sessions)
    }

    /// The endpoint slot `slot` should use now: among the endpoints not in backoff, the one with
    /// the fewest sessions (ties broken by `slot`, so slots spread). `Err(t)`: every endpoint
    /// waits out its backoff; the earliest may be tried at `t`.
    pub fn pick(&self, slot: usize, now: Instant) -> Result<usize, Instant> {
        let n = self.health.len();
        let usable = (0..n)
            .map(|k| (slot + k) % n)
            .filter(|&i| !self.in_backoff(i, now));
        if let Some(i) = usable.min_by_key(|&i| self.health[i].sessions) {
            return Ok(i);
        }
        Err(self
            .health
            .iter()
            .filter_map(|h| h.retry_at)
            .min()
            .unwrap_or(now))
    }

    /// Where a slot on endpoint `from` should move to even the load out: a usable endpoint with
    /// at least two sessions fewer (one that failed earlier and whose backoff has ended, or that
    /// came up later). `None` when the spread is even enough.
    pub fn rebalance(&self, from: usize, now: Instant) -> Option<usize> {
        let have = self.sessions(from);
        (0..self.health.len())
            .filter(|&j| j != from && !self.in_backoff(j, now))
            .filter(|&j| self.health[j].sessions + 2 <= have)
            .min_by_key(|&j| self.health[j].sessions)
    }

    /// A slot starts using endpoint `i`.
    pub fn attach(&mut self, i: usize) {
        if let Some(h) = self.health.get_mut(i) {
            h.sessions += 1;
        }
    }

    /// A slot stops using endpoint `i`.
    pub fn detach(&mut self, i: usize) {
        if let Some(h) = self.health.get_mut(i) {
            h.sessions = h.sessions.saturating_sub(1);
        }
    }

    /// A session on `i` was authenticated: the endpoint is healthy again.
    pub fn succeeded(&mut self, i: usize) {
        if let Some(h) = self.health.get_mut(i) {
            h.failures = 0;
            h.retry_at = None;
        }
    }

    /// An attempt on `i` failed or its session was lost at `now`: the endpoint waits
    /// `jitter(backoff.delay(failures))` before it is tried again. A failure seen while the
    /// endpoint already waits (another slot's attempt, started earlier, failed too) does not
    /// lengthen the wait. Returns the endpoint's retry time.
    pub fn failed(&mut self, i: usize, now: Instant, backoff: &Backoff) -> Instant {
        let Some(h) = self.health.get_mut(i) else {
            return now;
        };
        if let Some(t) = h.retry_at.filter(|&t| t > now) {
            return t;
        }
        h.failures = h.failures.saturating_add(1);
        let t = now + Backoff::jitter(backoff.delay(h.failures));
        h.retry_at = Some(t);
        t
    }
}
