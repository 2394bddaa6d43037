//! The userspace fallback: the SAME policy as the eBPF program (the decision itself is
//! `companion_filter_common::decide`, shared with the XDP/TC code), applied to every datagram
//! the device QUIC socket receives, before quinn parses it.
//!
//! Why a socket wrapper rather than quinn's `Incoming` hook: `Incoming` is created only after
//! quinn-proto has parsed and buffered the Initial (and quinn silently drops short Initials
//! itself, so they could not be counted), and it sees nothing of datagrams for connections that
//! already exist. A [`quinn::AsyncUdpSocket`] wrapper sees every datagram exactly where the
//! XDP program would, can count every reason, and costs nothing but a few map lookups.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::io::{self, IoSliceMut};
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use companion_filter_common::{
    BUCKETS_MAX, Bucket, BucketAction, DENY_MAX, DenyEntry, FilterConfig, MAX_EXT_HEADERS,
    MAX_L4_OFFSET, Reason, SourceKey, Verdict, decide, is_ext_header,
};
use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, UdpPoller};

use super::{monotonic_ns, source_key};
use crate::bounded::BoundedMap;

#[derive(Debug)]
struct Tables {
    cfg: FilterConfig,
    /// Bounded like the eBPF LRU map (`[filter] max_tracked_sources`, at most `BUCKETS_MAX`): a
    /// flood of distinct sources evicts the least recently seen ones, whose next Initial starts
    /// a fresh bucket.
    buckets: BoundedMap<SourceKey, Bucket>,
    /// At most `DENY_MAX` entries, like the eBPF hash map.
    deny: HashMap<SourceKey, DenyEntry>,
    paired: HashSet<SourceKey>,
}

impl Default for Tables {
    fn default() -> Self {
        Self {
            cfg: FilterConfig::default(),
            buckets: BoundedMap::new(BUCKETS_MAX as usize),
            deny: HashMap::new(),
            paired: HashSet::new(),
        }
    }
}

/// Sizes of the userspace policy's per-source tables and their evictions so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TableStats {
    /// Sources with a token bucket.
    pub buckets: usize,
    /// Buckets evicted to make room, since start.
    pub bucket_evictions: u64,
    /// Blocked sources.
    pub deny: usize,
    /// Blocks evicted to make room, since start.
    pub deny_evictions: u64,
}

/// The policy and its state in userspace, with the same counters as the eBPF program.
#[derive(Debug, Default)]
pub struct UserspacePolicy {
    /// Only judged while active (userspace mode); otherwise the socket wrapper passes all.
    active: AtomicBool,
    tables: Mutex<Tables>,
    counters: [AtomicU64; Reason::COUNT as usize],
    bucket_evictions: AtomicU64,
    deny_evictions: AtomicU64,
}

impl UserspacePolicy {
    /// An inactive policy with the default configuration and empty tables.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Most sources with a token bucket (clamped to `1..=BUCKETS_MAX`); evicts the least
    /// recently seen beyond it.
    pub fn set_bucket_capacity(&self, capacity: usize) {
        let evicted = self
            .tables()
            .buckets
            .set_capacity(capacity.clamp(1, BUCKETS_MAX as usize));
        self.bucket_evictions
            .fetch_add(evicted as u64, Ordering::Relaxed);
    }

    /// Table sizes and evictions (for `gatewayd_address_table_*`).
    pub fn table_stats(&self) -> TableStats {
        let t = self.tables();
        TableStats {
            buckets: t.buckets.len(),
            bucket_evictions: self.bucket_evictions.load(Ordering::Relaxed),
            deny: t.deny.len(),
            deny_evictions: self.deny_evictions.load(Ordering::Relaxed),
        }
    }

    fn tables(&self) -> std::sync::MutexGuard<'_, Tables> {
        self.tables.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Turns filtering on (userspace mode) or off (eBPF does the work).
    pub fn set_active(&self, on: bool) {
        self.active.store(on, Ordering::Relaxed);
    }

    /// Whether filtering is on.
    pub fn is_active(&self) -> bool {
        self.active.load(Ordering::Relaxed)
    }

    /// Replaces the configuration (rate, burst, strict mode, window).
    pub fn set_config(&self, cfg: FilterConfig) {
        self.tables().cfg = cfg;
    }

    /// Denies `key` until `e`. A full deny list (`DENY_MAX`, the eBPF map's size) first evicts
    /// the entry that ends soonest, if it ends before this one (never an indefinite block);
    /// otherwise the new entry is not added (logged; [`super::Filter::sync`] trims the list to
    /// `DENY_MAX` first, so this only guards the table's bound).
    pub fn set_deny(&self, key: SourceKey, e: DenyEntry) {
        let mut t = self.tables();
        if !t.deny.contains_key(&key) && t.deny.len() >= DENY_MAX as usize {
            // 0 = indefinite: ends last.
            let ends = |d: &DenyEntry| {
                if d.until_ns == 0 {
                    u64::MAX
                } else {
                    d.until_ns
                }
            };
            let soonest = t
                .deny
                .iter()
                .min_by_key(|(_, d)| ends(d))
                .map(|(k, d)| (*k, ends(d)));
            match soonest {
                Some((k, end)) if end < ends(&e) => {
                    t.deny.remove(&k);
                    self.deny_evictions.fetch_add(1, Ordering::Relaxed);
                }
                _ => {
                    tracing::warn!(
                        addr = %key_ip(&key),
                        "userspace deny list full ({DENY_MAX} blocks ending later): block not applied"
                    );
                    return;
                }
            }
        }
        t.deny.insert(key, e);
    }

    /// Lifts the block of `key`.
    pub fn remove_deny(&self, key: &SourceKey) {
        self.tables().deny.remove(key);
    }

    /// The blocked sources.
    pub fn deny_keys(&self) -> Vec<SourceKey> {
        self.tables().deny.keys().copied().collect()
    }

    /// Replaces the paired sources.
    pub fn set_paired(&self, keys: HashSet<SourceKey>) {
        self.tables().paired = keys;
    }

    /// Adds a paired source.
    pub fn add_paired(&self, key: SourceKey) {
        self.tables().paired.insert(key);
    }

    /// Removes a paired source.
    pub fn remove_paired(&self, key: &SourceKey) {
        self.tables().paired.remove(key);
    }

    /// Whether `key` is a paired source.
    pub fn is_paired(&self, key: &SourceKey) -> bool {
        self.tables().paired.contains(key)
    }

    /// Packets counted so far, indexed by [`Reason`].
    pub fn counters(&self) -> [u64; Reason::COUNT as usize] {
        std::array::from_fn(|i| self.counters[i].load(Ordering::Relaxed))
    }

    /// Judges one UDP datagram to the QUIC port from `src` at monotonic time `now_ns`, and
    /// counts it.
    pub fn judge(&self, src: SourceKey, payload: &[u8], now_ns: u64) -> Reason {
        let first = payload.first().copied().unwrap_or(0);
        let version = payload
            .get(1..5)
            .and_then(|v| <[u8; 4]>::try_from(v).ok())
            .map_or(0, u32::from_be_bytes);
        let len = u32::try_from(payload.len()).unwrap_or(u32::MAX);
        let reason = {
            let mut guard = self.tables();
            let t = &mut *guard;
            let denied_until = t.deny.get(&src).map(|d| d.until_ns);
            let paired = t.paired.contains(&src);
            let cfg = t.cfg;
            let mut fresh = Bucket::default();
            let (reason, action) = decide(
                &cfg,
                denied_until,
                paired,
                len,
                first,
                version,
                now_ns,
                t.buckets.get_mut(&src),
                &mut fresh,
            );
            if action == BucketAction::Insert && t.buckets.insert(src, fresh).is_some() {
                // Like the LRU map: the least recently seen source makes room.
                self.bucket_evictions.fetch_add(1, Ordering::Relaxed);
            }
            reason
        };
        self.counters[reason as usize].fetch_add(1, Ordering::Relaxed);
        reason
    }

    /// Parses an Ethernet frame the way the eBPF program does and judges it (the parity tests
    /// feed both the same frames).
    pub fn judge_frame(&self, frame: &[u8], now_ns: u64) -> Verdict {
        let port = self.tables().cfg.port;
        match parse_frame(frame, port) {
            Parsed::NotOurs => Verdict::NotOurs,
            Parsed::Drop(reason) => {
                self.counters[reason as usize].fetch_add(1, Ordering::Relaxed);
                Verdict::Counted(reason)
            }
            Parsed::Udp(src, payload_len, head) => {
                // The frame may be cut short of the UDP length: judge on the UDP length field,
                // like the kernel program does.
                let mut payload = vec![0u8; payload_len as usize];
                let n = head.len().min(payload.len());
                payload[..n].copy_from_slice(&head[..n]);
                Verdict::Counted(self.judge(src, &payload, now_ns))
            }
        }
    }
}

/// What [`parse_frame`] makes of a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parsed<'a> {
    /// Not UDP to the port (or not IP at all): passes uncounted.
    NotOurs,
    /// Dropped before the policy: [`Reason::DroppedUnparsed`] or [`Reason::DroppedFragment`].
    Drop(Reason),
    /// UDP to the port: the source, the UDP payload length (from the UDP header) and the
    /// payload bytes present.
    Udp(SourceKey, u32, &'a [u8]),
}

/// Ethernet (+ up to two VLAN tags) → IPv4/IPv6 (+ extension headers) → UDP to `port`, exactly
/// as the eBPF program parses it, failing closed the same way (see [`Reason::DroppedUnparsed`]
/// and [`Reason::DroppedFragment`]).
///
/// The socket wrapper never calls this: the kernel has already walked the headers and
/// reassembled fragments of what a UDP socket receives, so there is nothing to fail open on.
/// It exists so the parity tests can hand the same frames to both implementations.
pub fn parse_frame(f: &[u8], port: u16) -> Parsed<'_> {
    parse_frame_inner(f, port).unwrap_or(Parsed::NotOurs)
}

/// `None` = not ours (what the eBPF program's `?` on a bounds check means).
fn parse_frame_inner(f: &[u8], port: u16) -> Option<Parsed<'_>> {
    if port == 0 {
        return None;
    }
    let be16 = |o: usize| f.get(o..o + 2).map(|b| u16::from_be_bytes([b[0], b[1]]));
    let mut off = 14;
    let mut proto = be16(12)?;
    for _ in 0..2 {
        if proto == 0x8100 || proto == 0x88a8 {
            proto = be16(off + 2)?;
            off += 4;
        }
    }
    let src;
    let fragment;
    match proto {
        0x0800 => {
            let vihl = *f.get(off)?;
            let ihl = usize::from(vihl & 0x0f) * 4;
            if vihl >> 4 != 4 || ihl < 20 || *f.get(off + 9)? != 17 {
                return None;
            }
            let frag = be16(off + 6)?;
            if frag & 0x1fff != 0 {
                return None;
            }
            fragment = frag & 0x2000 != 0;
            src = SourceKey::v4(f.get(off + 12..off + 16)?.try_into().ok()?);
            off += ihl;
        }
        0x86dd => {
            src = SourceKey::v6(f.get(off + 8..off + 24)?.try_into().ok()?);
            let mut next = *f.get(off + 6)?;
            off += 40;
            let mut frag = false;
            let mut walked = 0;
            while is_ext_header(next) {
                if walked == MAX_EXT_HEADERS || off > MAX_L4_OFFSET {
                    return Some(Parsed::Drop(Reason::DroppedUnparsed));
                }
                let Some(h) = f.get(off..off + 4) else {
                    return Some(Parsed::Drop(Reason::DroppedUnparsed));
                };
                let this = next;
                next = h[0];
                off += match this {
                    44 => {
                        if u16::from_be_bytes([h[2], h[3]]) & 0xfff8 != 0 {
                            return None;
                        }
                        frag = true;
                        8
                    }
                    51 => (usize::from(h[1]) + 2) * 4,
                    _ => (usize::from(h[1]) + 1) * 8,
                };
                walked += 1;
            }
            if next != 17 {
                return None;
            }
            fragment = frag;
        }
        _ => return None,
    }
    if off > MAX_L4_OFFSET {
        return Some(Parsed::Drop(Reason::DroppedUnparsed));
    }
    let Some(dport) = be16(off + 2) else {
        return Some(Parsed::Drop(if fragment {
            Reason::DroppedFragment
        } else {
            Reason::DroppedUnparsed
        }));
    };
    if dport != port {
        return None;
    }
    if fragment {
        return Some(Parsed::Drop(Reason::DroppedFragment));
    }
    let Some(udp_len) = be16(off + 4) else {
        return Some(Parsed::Drop(Reason::DroppedUnparsed));
    };
    let udp_len = u32::from(udp_len).saturating_sub(8);
    Some(Parsed::Udp(src, udp_len, f.get(off + 8..).unwrap_or(&[])))
}

/// The device QUIC socket, judged by a [`UserspacePolicy`] before quinn sees a datagram.
pub struct FilteredSocket {
    inner: Arc<dyn AsyncUdpSocket>,
    policy: Arc<UserspacePolicy>,
}

impl fmt::Debug for FilteredSocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FilteredSocket")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl FilteredSocket {
    /// Wraps `inner` so every received datagram passes `policy` first.
    pub fn new(inner: Arc<dyn AsyncUdpSocket>, policy: Arc<UserspacePolicy>) -> Self {
        Self { inner, policy }
    }

    /// Filters the received batch in place; returns how many entries remain.
    fn filter_batch(&self, n: usize, bufs: &mut [IoSliceMut<'_>], meta: &mut [RecvMeta]) -> usize {
        let now = monotonic_ns();
        let mut kept = 0;
        for i in 0..n {
            let m = meta[i];
            let src = source_key(m.addr.ip());
            let stride = if m.stride == 0 { m.len } else { m.stride };
            // GRO may have coalesced several datagrams of one source: judge each segment and
            // keep the admitted ones contiguous (only the last segment may be shorter).
            let mut write = 0;
            let mut read = 0;
            {
                let buf = &mut bufs[i][..m.len];
                while read < m.len {
                    let end = (read + stride).min(m.len);
                    let seg_len = end - read;
                    if self.policy.judge(src, &buf[read..end], now).admits() {
                        if write != read {
                            buf.copy_within(read..end, write);
                        }
                        write += seg_len;
                    }
                    read = end;
                }
            }
            if write == 0 {
                continue;
            }
            if kept != i {
                let (lo, hi) = bufs.split_at_mut(i);
                lo[kept][..write].copy_from_slice(&hi[0][..write]);
                meta[kept] = m;
            }
            meta[kept].len = write;
            kept += 1;
        }
        kept
    }
}

impl AsyncUdpSocket for FilteredSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        self.inner.clone().create_io_poller()
    }

    fn try_send(&self, transmit: &Transmit<'_>) -> io::Result<()> {
        self.inner.try_send(transmit)
    }

    fn poll_recv(
        &self,
        cx: &mut Context<'_>,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        loop {
            let n = match self.inner.poll_recv(cx, bufs, meta) {
                Poll::Ready(Ok(n)) => n,
                other => return other,
            };
            if !self.policy.is_active() {
                return Poll::Ready(Ok(n));
            }
            let kept = self.filter_batch(n, bufs, meta);
            if kept > 0 {
                return Poll::Ready(Ok(kept));
            }
            // Everything dropped: read again (the inner socket registers the waker when empty).
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        self.inner.max_transmit_segments()
    }

    fn max_receive_segments(&self) -> usize {
        self.inner.max_receive_segments()
    }

    fn may_fragment(&self) -> bool {
        self.inner.may_fragment()
    }
}

/// `IpAddr` of a key (for logs and the deny-list sync).
pub fn key_ip(k: &SourceKey) -> IpAddr {
    let v6 = std::net::Ipv6Addr::from(k.addr);
    match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    }
}

#[cfg(test)]
mod table_tests {
    use super::*;

    fn key(i: u32) -> SourceKey {
        let mut a = [0u8; 16];
        a[0] = 0xfd;
        a[12..].copy_from_slice(&i.to_be_bytes());
        SourceKey::v6(a)
    }

    #[test]
    fn the_deny_list_stays_at_its_bound_and_keeps_the_blocks_ending_last() {
        let p = UserspacePolicy::default();
        let max = DENY_MAX;
        // Full: half indefinite (owner), half ending at 1000 + i.
        for i in 0..max {
            let until_ns = if i % 2 == 0 { 0 } else { 1000 + u64::from(i) };
            p.set_deny(key(i), DenyEntry { until_ns });
        }
        assert_eq!(p.table_stats().deny, max as usize);
        // A block ending later than the soonest finite one replaces it (key 1, until 1001).
        p.set_deny(
            key(max),
            DenyEntry {
                until_ns: 1_000_000,
            },
        );
        let s = p.table_stats();
        assert_eq!((s.deny, s.deny_evictions), (max as usize, 1));
        assert!(!p.deny_keys().contains(&key(1)));
        assert!(p.deny_keys().contains(&key(max)));
        // One ending sooner than every finite one is not added; indefinite ones never go.
        p.set_deny(key(max + 1), DenyEntry { until_ns: 1 });
        assert!(!p.deny_keys().contains(&key(max + 1)));
        assert_eq!(p.table_stats().deny, max as usize);
        for i in (0..max).step_by(2) {
            assert!(p.deny_keys().contains(&key(i)));
        }
    }

    #[test]
    fn a_flood_of_sources_keeps_the_bucket_table_at_its_bound() {
        let p = UserspacePolicy::default();
        p.set_config(FilterConfig {
            port: 4433,
            initial_rate: 10,
            initial_burst: 20,
            ..FilterConfig::default()
        });
        p.set_bucket_capacity(100);
        let mut initial = vec![0u8; 1200];
        initial[0] = 0xc0;
        initial[1..5].copy_from_slice(&1u32.to_be_bytes());
        for i in 0..10_000 {
            p.judge(key(i), &initial, 1_000_000);
        }
        let s = p.table_stats();
        assert_eq!(s.buckets, 100);
        assert_eq!(s.bucket_evictions, 10_000 - 100);
    }
}
