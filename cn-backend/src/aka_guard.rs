//! In-memory AKA abuse limits of the server: lock-out by source prefix and SUPI, and reuse of
//! unanswered authentication vectors so that unauthenticated starts cannot move a SQN.
//!
//! # Source prefix
//! Every limit here is keyed by the client's *source prefix*, not its exact address: the
//! address masked to **/24 for IPv4** and **/56 for IPv6** ([`SourcePrefix::of`]; an IPv4-mapped
//! IPv6 address counts as IPv4). /56 is the usual delegation to one end site (RIPE-690), so an
//! attacker holding a /48 counts as 256 sources, not 65,536, while two customers never share a
//! key. A QUIC client cannot spoof its address and still complete the handshake, so an attacker
//! can only ever spend the budget of prefixes it really holds.
//!
//! # Lock-out
//! Only a failure of the server's own verification counts: a wrong RES* or session binding, or
//! an AUTS whose MAC-S does not verify. An `Error` the client sends (for example `auth_failed`
//! after the USIM rejected AUTN) is never counted: anyone can send it for any SUPI without its
//! key. Failures are counted per (SUPI, source prefix) — `aka_max_failures` locks that pair out
//! for `aka_lockout` — and per source prefix for any SUPI (also unknown SUPIs) —
//! `aka_addr_max_failures` locks the prefix out. A SUPI is therefore never locked out for the
//! real device or gateway by failures sent from another prefix. The state is in memory (lost on
//! restart, which an attacker cannot cause) and bounded.
//!
//! # SQN reservation (TS 33.102 Annex C)
//! Before, every AuthStart reserved and stored a fresh SQN (one write, SEQ + 1), so anyone
//! knowing a SUPI could advance its SEQ without limit: a write per packet, and SQN_HE running so
//! far ahead of SEQ_MS that a USIM enforcing the optional Δ limit (C.2.1) would answer every
//! challenge with a resynchronisation. Now a vector handed out and never answered with a correct
//! RES* is kept, as (SQN, RAND) only — no key material — for [`VECTOR_REUSE`] per (SUPI,
//! source prefix), and the next start from the same prefix gets the same challenge again
//! (AUTN depends on K, SQN, AMF and RAND only; XRES* is recomputed for the new serving network
//! name). Like an AMF retransmitting an AUTHENTICATION REQUEST with the same RAND (TS 24.501
//! 5.4.1.3.7), this is fresh for the USIM as long as it has not used that SQN: the IND array
//! (C.1.2, C.3.2) accepts an older SEQ in another IND slot, so a reused vector stays valid
//! while the same SUPI authenticates from elsewhere. If the USIM had already accepted it (a
//! response lost on the way), it answers with AUTS, and the verified resynchronisation reserves
//! a new SQN as before. A vector is consumed by a verified RES*; a RES* answer binds to one TLS
//! session, so a challenge seen twice gives an attacker nothing.
//!
//! A start finding no idle vector for its key reserves a new SQN; at most
//! [`MAX_INFLIGHT_PER_KEY`] such vectors may be out at once per (SUPI, prefix), further starts
//! from that prefix are answered `busy`, and an exchange that ends unanswered puts its vector
//! back. So unauthenticated starts from one prefix advance SEQ by at most 1 per
//! [`VECTOR_REUSE`] when they come one after another, and by at most [`MAX_INFLIGHT_PER_KEY`]
//! per [`VECTOR_REUSE`] however many run at once; for one SUPI the bound is that times the
//! prefixes an attacker holds.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};

use companion_crypto::aka::Sqn;

use crate::model::Supi;

/// Prefix length that groups IPv4 sources.
pub const IPV4_PREFIX: u8 = 24;
/// Prefix length that groups IPv6 sources.
pub const IPV6_PREFIX: u8 = 56;
/// How long an unanswered vector is offered again to the same (SUPI, source prefix).
pub const VECTOR_REUSE: Duration = Duration::from_secs(300);
/// Vectors (idle or out) one (SUPI, source prefix) may have; gatewayd opens at most 16
/// sessions of one companion at once (`[cn] sessions`), so a real gateway never waits.
pub const MAX_INFLIGHT_PER_KEY: u32 = 16;
/// Capacity of each map (entries beyond it evict the expired, then the least recently used).
pub const CAPACITY: usize = 65_536;

/// A source address reduced to its prefix (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SourcePrefix(IpAddr);

impl SourcePrefix {
    /// The prefix of `ip`: /24 for IPv4 (also IPv4-mapped IPv6), /56 for IPv6.
    pub fn of(ip: IpAddr) -> Self {
        let v4 = |a: Ipv4Addr| {
            let mask = u32::MAX << (32 - u32::from(IPV4_PREFIX));
            IpAddr::V4(Ipv4Addr::from(u32::from(a) & mask))
        };
        SourcePrefix(match ip {
            IpAddr::V4(a) => v4(a),
            IpAddr::V6(a) => match a.to_ipv4_mapped() {
                Some(m) => v4(m),
                None => {
                    let mask = u128::MAX << (128 - u32::from(IPV6_PREFIX));
                    IpAddr::V6(Ipv6Addr::from(u128::from(a) & mask))
                }
            },
        })
    }
}

impl std::fmt::Display for SourcePrefix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            IpAddr::V4(a) => write!(f, "{a}/{IPV4_PREFIX}"),
            IpAddr::V6(a) => write!(f, "{a}/{IPV6_PREFIX}"),
        }
    }
}

/// Something kept in a [`Bounded`] map: when it was last touched and whether it may go.
trait Entry {
    fn touched(&self) -> Instant;
    fn expired(&self, now: Instant) -> bool;
}

/// A map of fixed capacity: inserting into a full map first drops expired entries, then the
/// least recently touched one.
#[derive(Debug)]
struct Bounded<K, V> {
    map: HashMap<K, V>,
    cap: usize,
}

impl<K: Hash + Eq + Clone, V: Entry> Bounded<K, V> {
    fn new(cap: usize) -> Self {
        Bounded {
            map: HashMap::new(),
            cap: cap.max(1),
        }
    }

    fn get_mut(&mut self, k: &K) -> Option<&mut V> {
        self.map.get_mut(k)
    }

    fn remove(&mut self, k: &K) -> Option<V> {
        self.map.remove(k)
    }

    fn entry(&mut self, k: K, now: Instant, new: impl FnOnce() -> V) -> &mut V {
        if !self.map.contains_key(&k) && self.map.len() >= self.cap {
            self.map.retain(|_, v| !v.expired(now));
            if self.map.len() >= self.cap
                && let Some(oldest) = self
                    .map
                    .iter()
                    .min_by_key(|(_, v)| v.touched())
                    .map(|(k, _)| k.clone())
            {
                self.map.remove(&oldest);
            }
        }
        self.map.entry(k).or_insert_with(new)
    }

    fn len(&self) -> usize {
        self.map.len()
    }
}

#[derive(Debug, Clone, Copy)]
struct Failures {
    count: u32,
    last: Instant,
    locked_until: Option<Instant>,
    window: Duration,
}

impl Failures {
    fn new(now: Instant, window: Duration) -> Self {
        Failures {
            count: 0,
            last: now,
            locked_until: None,
            window,
        }
    }

    fn locked(&self, now: Instant) -> Option<Duration> {
        match self.locked_until {
            Some(t) if t > now => Some(t - now),
            _ => None,
        }
    }

    /// Counts one failure; locks after `max` within `window` (failures older than `window`
    /// are forgotten).
    fn count(&mut self, now: Instant, max: u32, window: Duration) {
        self.window = window;
        if now.duration_since(self.last) >= window {
            self.count = 0;
        }
        self.count = self.count.saturating_add(1);
        self.last = now;
        if self.count >= max {
            self.locked_until = Some(now + window);
            self.count = 0;
        }
    }
}

impl Entry for Failures {
    fn touched(&self) -> Instant {
        self.last
    }
    fn expired(&self, now: Instant) -> bool {
        self.locked(now).is_none() && now.duration_since(self.last) >= self.window
    }
}

/// The non-secret part of an authentication vector: enough to rebuild it with the key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reserved {
    /// The SQN reserved (and stored as SQN_HE) for it.
    pub sqn: Sqn,
    /// Its RAND.
    pub rand: [u8; 16],
}

#[derive(Debug, Clone)]
struct Slot {
    /// Unanswered vectors (at most [`MAX_INFLIGHT_PER_KEY`]) and when each was reserved.
    idle: Vec<(Reserved, Instant)>,
    /// Vectors with a fresh SQN out now.
    inflight: u32,
    touched: Instant,
}

impl Entry for Slot {
    fn touched(&self) -> Instant {
        self.touched
    }
    fn expired(&self, now: Instant) -> bool {
        self.inflight == 0
            && self
                .idle
                .iter()
                .all(|(_, at)| now.duration_since(*at) >= VECTOR_REUSE)
    }
}

/// What a start gets from [`AkaGuard::start`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VectorPlan {
    /// Send this unanswered vector again (no SQN write); `issued` is when it was reserved.
    Reuse(Reserved, Instant),
    /// Reserve a new SQN; call [`AkaGuard::end`] when the exchange ends.
    Fresh,
    /// Too many vectors out for this SUPI and prefix: answer `busy`.
    Busy,
}

/// The AKA limits of one server (see the module documentation).
#[derive(Debug)]
pub struct AkaGuard {
    pairs: Bounded<(Supi, SourcePrefix), Failures>,
    sources: Bounded<SourcePrefix, Failures>,
    vectors: Bounded<(Supi, SourcePrefix), Slot>,
}

impl Default for AkaGuard {
    fn default() -> Self {
        Self::with_capacity(CAPACITY)
    }
}

impl AkaGuard {
    /// Maps of `cap` entries each.
    pub fn with_capacity(cap: usize) -> Self {
        AkaGuard {
            pairs: Bounded::new(cap),
            sources: Bounded::new(cap),
            vectors: Bounded::new(cap),
        }
    }

    /// How long `src` must still wait, if it is locked out (any SUPI).
    pub fn source_locked(&mut self, src: SourcePrefix, now: Instant) -> Option<Duration> {
        self.sources.get_mut(&src)?.locked(now)
    }

    /// How long `supi` must still wait from `src`, if that pair is locked out.
    pub fn pair_locked(
        &mut self,
        supi: &Supi,
        src: SourcePrefix,
        now: Instant,
    ) -> Option<Duration> {
        self.pairs.get_mut(&(supi.clone(), src))?.locked(now)
    }

    /// Counts a failure from `src` not tied to a known SUPI (unknown SUPI).
    pub fn source_failure(&mut self, src: SourcePrefix, now: Instant, max: u32, window: Duration) {
        self.sources
            .entry(src, now, || Failures::new(now, window))
            .count(now, max, window);
    }

    /// Counts a failed verification of `supi` from `src`: against the pair (`pair_max`) and
    /// against the source (`source_max`).
    pub fn failure(
        &mut self,
        supi: &Supi,
        src: SourcePrefix,
        now: Instant,
        pair_max: u32,
        source_max: u32,
        window: Duration,
    ) {
        self.pairs
            .entry((supi.clone(), src), now, || Failures::new(now, window))
            .count(now, pair_max, window);
        self.source_failure(src, now, source_max, window);
    }

    /// A verified authentication of `supi` from `src`: its failure counts start again (a
    /// running lock-out stays).
    pub fn success(&mut self, supi: &Supi, src: SourcePrefix, now: Instant) {
        let key = (supi.clone(), src);
        if self
            .pairs
            .get_mut(&key)
            .is_some_and(|f| f.locked(now).is_none())
        {
            self.pairs.remove(&key);
        }
        if let Some(f) = self.sources.get_mut(&src)
            && f.locked(now).is_none()
        {
            f.count = 0;
        }
    }

    /// A start for `supi` from `src`: the most recent idle vector of that pair if there is one
    /// younger than [`VECTOR_REUSE`] (taken: no other exchange gets it meanwhile), else leave
    /// to reserve a fresh SQN, unless the pair has [`MAX_INFLIGHT_PER_KEY`] vectors out. Idle
    /// plus out never exceeds [`MAX_INFLIGHT_PER_KEY`], so neither does the number of SQNs
    /// reserved for unanswered starts within [`VECTOR_REUSE`].
    pub fn start(&mut self, supi: &Supi, src: SourcePrefix, now: Instant) -> VectorPlan {
        let slot = self.vectors.entry((supi.clone(), src), now, || Slot {
            idle: Vec::new(),
            inflight: 0,
            touched: now,
        });
        slot.touched = now;
        slot.idle
            .retain(|(_, at)| now.duration_since(*at) < VECTOR_REUSE);
        if let Some(i) = (0..slot.idle.len()).max_by_key(|&i| slot.idle[i].1) {
            let (r, at) = slot.idle.swap_remove(i);
            slot.inflight = slot.inflight.saturating_add(1);
            return VectorPlan::Reuse(r, at);
        }
        if slot.inflight >= MAX_INFLIGHT_PER_KEY {
            return VectorPlan::Busy;
        }
        slot.inflight = slot.inflight.saturating_add(1);
        VectorPlan::Fresh
    }

    /// The exchange that got [`VectorPlan::Reuse`] or [`VectorPlan::Fresh`] ended. `unanswered`
    /// is the vector it holds if no correct RES* consumed it, with when it was reserved: it is
    /// kept for the next start from `src` (the oldest goes if more than
    /// [`MAX_INFLIGHT_PER_KEY`] would be kept).
    pub fn end(
        &mut self,
        supi: &Supi,
        src: SourcePrefix,
        unanswered: Option<(Reserved, Instant)>,
        now: Instant,
    ) {
        let slot = self.vectors.entry((supi.clone(), src), now, || Slot {
            idle: Vec::new(),
            inflight: 1,
            touched: now,
        });
        slot.inflight = slot.inflight.saturating_sub(1);
        slot.touched = now;
        if let Some((r, at)) = unanswered
            && now.duration_since(at) < VECTOR_REUSE
        {
            slot.idle.push((r, at));
            while slot.idle.len() > MAX_INFLIGHT_PER_KEY as usize {
                if let Some(i) = (0..slot.idle.len()).min_by_key(|&i| slot.idle[i].1) {
                    slot.idle.swap_remove(i);
                }
            }
        }
    }

    /// Entries held in the three maps (pairs, sources, vectors).
    pub fn sizes(&self) -> (usize, usize, usize) {
        (self.pairs.len(), self.sources.len(), self.vectors.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn supi(n: u64) -> Supi {
        Supi::parse(&format!("imsi-00101{n:010}")).unwrap_or_else(|e| panic!("{e}"))
    }

    fn ip(s: &str) -> SourcePrefix {
        SourcePrefix::of(s.parse().unwrap_or_else(|e| panic!("{e}")))
    }

    #[test]
    fn prefixes() {
        assert_eq!(ip("192.0.2.1"), ip("192.0.2.254"));
        assert_ne!(ip("192.0.2.1"), ip("192.0.3.1"));
        assert_eq!(ip("::ffff:192.0.2.9"), ip("192.0.2.1"));
        assert_eq!(ip("2001:db8:0:ff::1"), ip("2001:db8:0:1::2"));
        assert_ne!(ip("2001:db8:0:100::1"), ip("2001:db8:0:1::2"));
        assert_eq!(ip("2001:db8::1").to_string(), "2001:db8::/56");
        assert_eq!(ip("127.0.0.2").to_string(), "127.0.0.0/24");
    }

    #[test]
    fn lockout_is_per_pair_and_per_source() {
        let mut g = AkaGuard::default();
        let (p, w, t) = (supi(1), Duration::from_secs(60), Instant::now());
        let (a, b) = (ip("10.0.0.1"), ip("10.0.1.1"));
        for _ in 0..4 {
            g.failure(&p, a, t, 5, 20, w);
        }
        assert!(g.pair_locked(&p, a, t).is_none());
        g.failure(&p, a, t, 5, 20, w);
        assert!(g.pair_locked(&p, a, t).is_some());
        assert!(
            g.pair_locked(&p, b, t).is_none(),
            "another prefix is not locked"
        );
        assert!(g.source_locked(a, t).is_none());
        assert!(g.pair_locked(&p, a, t + w).is_none(), "expires");
        for i in 0..20 {
            g.failure(&supi(100 + i), a, t, 5, 20, w);
        }
        assert!(g.source_locked(a, t).is_some());
        assert!(g.source_locked(b, t).is_none());
    }

    #[test]
    fn maps_are_bounded() {
        let mut g = AkaGuard::with_capacity(8);
        let t = Instant::now();
        for i in 0..100u32 {
            let src = SourcePrefix::of(IpAddr::V4(Ipv4Addr::from(i << 8)));
            g.failure(&supi(u64::from(i)), src, t, 5, 20, Duration::from_secs(60));
            let _ = g.start(&supi(u64::from(i)), src, t);
        }
        let (a, b, c) = g.sizes();
        assert!(a <= 8 && b <= 8 && c <= 8, "{:?}", g.sizes());
    }

    #[test]
    fn vectors_are_reused_until_answered_or_old() {
        let mut g = AkaGuard::default();
        let (p, a, t) = (supi(1), ip("10.0.0.1"), Instant::now());
        let r = Reserved {
            sqn: Sqn::from_parts(7, 7).unwrap_or_else(|e| panic!("{e}")),
            rand: [3; 16],
        };
        assert_eq!(g.start(&p, a, t), VectorPlan::Fresh);
        g.end(&p, a, Some((r, t)), t);
        for _ in 0..1000 {
            assert_eq!(g.start(&p, a, t), VectorPlan::Reuse(r, t));
            g.end(&p, a, Some((r, t)), t);
        }
        // Another prefix has its own.
        assert_eq!(g.start(&p, ip("10.9.0.1"), t), VectorPlan::Fresh);
        // Answered: consumed.
        assert_eq!(g.start(&p, a, t), VectorPlan::Reuse(r, t));
        g.end(&p, a, None, t);
        assert_eq!(g.start(&p, a, t), VectorPlan::Fresh);
        g.end(&p, a, Some((r, t)), t);
        // Too old: fresh.
        assert_eq!(g.start(&p, a, t + VECTOR_REUSE), VectorPlan::Fresh);
        // Concurrent starts: at most MAX_INFLIGHT_PER_KEY fresh, then they come back and are
        // reused; nothing new is reserved while the pool is full.
        let q = supi(2);
        for _ in 0..MAX_INFLIGHT_PER_KEY {
            assert_eq!(g.start(&q, a, t), VectorPlan::Fresh);
        }
        assert_eq!(g.start(&q, a, t), VectorPlan::Busy);
        for i in 0..MAX_INFLIGHT_PER_KEY {
            let ri = Reserved {
                sqn: Sqn::from_parts(100 + u64::from(i), 0).unwrap_or_else(|e| panic!("{e}")),
                rand: [0; 16],
            };
            g.end(&q, a, Some((ri, t + Duration::from_secs(u64::from(i)))), t);
        }
        for _ in 0..1000 {
            let VectorPlan::Reuse(r, at) = g.start(&q, a, t) else {
                panic!("a kept vector is reused");
            };
            g.end(&q, a, Some((r, at)), t);
        }
        g.end(&q, a, None, t);
        assert!(matches!(g.start(&q, a, t), VectorPlan::Reuse(..)));
    }
}
