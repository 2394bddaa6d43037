//! The LAN filter in front of gatewayd's QUIC port: one parser and policy, two entry points —
//! `companion_filter_xdp` (XDP; native or generic mode) and `companion_filter_tc` (TC ingress
//! classifier, for bridges and interfaces where XDP does not fit).
//!
//! Only UDP to `FILTER_CONFIG.port` is judged (IPv4 and IPv6, Ethernet with up to two 802.1Q /
//! 802.1ad tags, IPv6 extension headers skipped); everything else passes untouched and uncounted.
//! The parser fails closed: an IPv6 header chain it cannot walk to the transport header (more
//! than `MAX_EXT_HEADERS` extension headers, past `MAX_L4_OFFSET`, or cut short) is dropped as
//! `dropped_unparsed`, since it may hide UDP to the port; a first fragment of UDP to the port
//! (IPv4 MF, IPv6 Fragment header) is dropped as `dropped_fragment`.
//! Judged packets go through, in order: deny list (with expiry) → strict mode (paired sources
//! only unless the pairing window is open) → short-Initial check (RFC 9000 §14.1) → per-source
//! token bucket on Initials. Each judged packet increments one per-CPU counter.
#![no_std]
#![no_main]
// No `#![warn(missing_docs)]` here, unlike every workspace crate: aya-ebpf's `#[xdp]` and
// `#[classifier]` generate the exported wrapper functions without the items' doc comments.

use aya_ebpf::bindings::{TC_ACT_OK, TC_ACT_SHOT, xdp_action};
use aya_ebpf::helpers::bpf_ktime_get_ns;
use aya_ebpf::macros::{classifier, map, xdp};
use aya_ebpf::maps::{Array, HashMap, LruHashMap, PerCpuArray};
use aya_ebpf::programs::{TcContext, XdpContext};
use companion_filter_common::{
    BUCKETS_MAX, Bucket, BucketAction, DENY_MAX, DenyEntry, FilterConfig, MAX_EXT_HEADERS,
    MAX_L4_OFFSET, MIN_INITIAL_LEN, PAIRED_MAX, PairedEntry, Reason, SourceKey, decide,
    is_ext_header, is_initial,
};

#[map(name = "FILTER_CONFIG")]
static FILTER_CONFIG: Array<FilterConfig> = Array::with_max_entries(1, 0);
#[map(name = "FILTER_BUCKETS")]
static FILTER_BUCKETS: LruHashMap<SourceKey, Bucket> = LruHashMap::with_max_entries(BUCKETS_MAX, 0);
#[map(name = "FILTER_DENY")]
static FILTER_DENY: HashMap<SourceKey, DenyEntry> = HashMap::with_max_entries(DENY_MAX, 0);
#[map(name = "FILTER_PAIRED")]
static FILTER_PAIRED: HashMap<SourceKey, PairedEntry> = HashMap::with_max_entries(PAIRED_MAX, 0);
#[map(name = "FILTER_COUNTERS")]
static FILTER_COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Reason::COUNT, 0);

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
const IPPROTO_UDP: u8 = 17;

/// Verdict of the shared parser/policy: pass (counted or not) or drop.
enum Out {
    Pass,
    Drop,
}

/// The XDP entry point (native or generic mode): the shared verdict as `XDP_PASS`/`XDP_DROP`.
#[xdp]
pub fn companion_filter_xdp(ctx: XdpContext) -> u32 {
    match filter(ctx.data(), ctx.data_end()) {
        Out::Pass => xdp_action::XDP_PASS,
        Out::Drop => xdp_action::XDP_DROP,
    }
}

/// The TC ingress entry point: the headers made linear first, then the shared verdict as
/// `TC_ACT_OK`/`TC_ACT_SHOT`.
#[classifier]
pub fn companion_filter_tc(ctx: TcContext) -> i32 {
    // Make the headers (and the first payload bytes) linear, up to everything the parser may
    // read (MAX_L4_OFFSET + UDP header + 5 payload bytes); a failure only means they may
    // already be, or the packet is shorter — the bounds checks below decide (and headers that
    // stay out of reach are dropped as unparsed, never passed unjudged).
    let want = if ctx.len() < 256 { ctx.len() } else { 256 };
    let _ = ctx.pull_data(want);
    match filter(ctx.data(), ctx.data_end()) {
        Out::Pass => TC_ACT_OK as i32,
        Out::Drop => TC_ACT_SHOT as i32,
    }
}

#[inline(always)]
fn ptr_at<T>(data: usize, end: usize, off: usize) -> Option<*const T> {
    if data + off + core::mem::size_of::<T>() > end {
        return None;
    }
    Some((data + off) as *const T)
}

/// Two bytes at `off`. (No single-byte reads: LLVM turns `p + 1 > end` into `p >= end`, a
/// form the verifier does not accept as a bounds check.)
#[inline(always)]
fn pair_at(data: usize, end: usize, off: usize) -> Option<[u8; 2]> {
    ptr_at::<[u8; 2]>(data, end, off).map(|p| unsafe { *p })
}

#[inline(always)]
fn be16_at(data: usize, end: usize, off: usize) -> Option<u16> {
    ptr_at::<[u8; 2]>(data, end, off).map(|p| u16::from_be_bytes(unsafe { *p }))
}

#[inline(always)]
fn filter(data: usize, end: usize) -> Out {
    match judge(data, end) {
        None => Out::Pass,
        Some(reason) => {
            if let Some(c) = FILTER_COUNTERS.get_ptr_mut(reason as u32) {
                unsafe { *c += 1 };
            }
            if reason.admits() {
                Out::Pass
            } else {
                Out::Drop
            }
        }
    }
}

/// `None`: not UDP to our port: pass uncounted. Fails closed: a packet that may be UDP to our
/// port but whose headers cannot be walked is `Some(DroppedUnparsed)`, a fragment of UDP to
/// our port `Some(DroppedFragment)` (the rule is spelled out on those reasons in
/// `companion_filter_common`; `gatewayd`'s `parse_frame` is the same parser in userspace).
#[inline(always)]
fn judge(data: usize, end: usize) -> Option<Reason> {
    let cfg = FILTER_CONFIG.get(0)?;
    if cfg.port == 0 {
        return None;
    }
    let mut off = ETH_HLEN;
    let mut proto = be16_at(data, end, 12)?;
    // Up to two VLAN tags (802.1ad outer, 802.1Q inner).
    if proto == ETH_P_8021AD || proto == ETH_P_8021Q {
        proto = be16_at(data, end, off + 2)?;
        off += 4;
        if proto == ETH_P_8021AD || proto == ETH_P_8021Q {
            proto = be16_at(data, end, off + 2)?;
            off += 4;
        }
    }
    let src: SourceKey;
    // A first fragment (more follow): to our port it is dropped, not judged.
    let fragment: bool;
    if proto == ETH_P_IP {
        let vihl = pair_at(data, end, off)?[0];
        if vihl >> 4 != 4 {
            return None;
        }
        let ihl = ((vihl & 0x0f) as usize) * 4;
        if ihl < 20 {
            return None;
        }
        if pair_at(data, end, off + 8)?[1] != IPPROTO_UDP {
            return None;
        }
        // Non-first fragments carry no UDP header; the kernel cannot reassemble them without
        // their first fragment, which is judged (and dropped if it is to our port).
        let frag = be16_at(data, end, off + 6)?;
        if frag & 0x1fff != 0 {
            return None;
        }
        fragment = frag & 0x2000 != 0;
        let a = ptr_at::<[u8; 4]>(data, end, off + 12)?;
        src = SourceKey::v4(unsafe { *a });
        off += ihl;
    } else if proto == ETH_P_IPV6 {
        let a = ptr_at::<[u8; 16]>(data, end, off + 8)?;
        src = SourceKey::v6(unsafe { *a });
        let mut next = pair_at(data, end, off + 6)?[0];
        off += 40;
        let mut frag = false;
        // Walk the extension headers (hop-by-hop, routing, fragment, destination options,
        // AH) to the transport header. A chain that cannot be walked — longer than
        // MAX_EXT_HEADERS, reaching past MAX_L4_OFFSET, or cut short — may hide UDP to our
        // port: dropped.
        let mut i = 0;
        while i <= MAX_EXT_HEADERS {
            if !is_ext_header(next) {
                break;
            }
            if i == MAX_EXT_HEADERS || off > MAX_L4_OFFSET {
                return Some(Reason::DroppedUnparsed);
            }
            // `off` is at most MAX_L4_OFFSET here; keep the verifier's view of it exact.
            let o = off & 0xff;
            let Some(h) = ptr_at::<[u8; 4]>(data, end, o) else {
                return Some(Reason::DroppedUnparsed);
            };
            let h = unsafe { *h };
            let this = next;
            next = h[0];
            if this == 44 {
                if u16::from_be_bytes([h[2], h[3]]) & 0xfff8 != 0 {
                    // Non-first fragment: no transport header (see IPv4 above).
                    return None;
                }
                frag = true;
                off = o + 8;
            } else if this == 51 {
                off = o + (h[1] as usize + 2) * 4;
            } else {
                off = o + (h[1] as usize + 1) * 8;
            }
            i += 1;
        }
        if next != IPPROTO_UDP {
            return None;
        }
        fragment = frag;
    } else {
        return None;
    }
    if off > MAX_L4_OFFSET {
        // Only IPv6 gets here with UDP past the bound (IPv4 ends by byte 82).
        return Some(Reason::DroppedUnparsed);
    }
    // Keep the verifier's view of `off` small and exact.
    let off = off & 0xff;
    let Some(dport) = be16_at(data, end, off + 2) else {
        // UDP whose ports are not there: a first fragment too short to hold them, or a
        // packet cut short. Either may be to our port.
        return Some(if fragment {
            Reason::DroppedFragment
        } else {
            Reason::DroppedUnparsed
        });
    };
    if dport != cfg.port {
        return None;
    }
    if fragment {
        return Some(Reason::DroppedFragment);
    }
    let Some(udp_len) = be16_at(data, end, off + 4) else {
        return Some(Reason::DroppedUnparsed);
    };
    let udp_len = udp_len as u32;
    let payload_len = udp_len.saturating_sub(8);
    // First byte and version; a payload shorter than 5 bytes cannot be an Initial (and
    // `is_initial` needs a non-zero version), so (0, 0) judges it the same.
    let (first, version) = match ptr_at::<[u8; 5]>(data, end, off + 8) {
        Some(p) => {
            let h = unsafe { *p };
            (h[0], u32::from_be_bytes([h[1], h[2], h[3], h[4]]))
        }
        None => (0, 0),
    };
    let denied_until = unsafe { FILTER_DENY.get(&src) }.map(|d| d.until_ns);
    let paired = if cfg.strict != 0 && cfg.window_open == 0 {
        FILTER_PAIRED.get_ptr(&src).is_some()
    } else {
        true
    };
    // Only a full-size Initial under a rate limit reaches the token bucket, and only it or a
    // deny entry with an expiry needs the clock: junk and short Initials (what a flood is made
    // of) skip the LRU lookup and the helper call. `decide` reads `now` on no other path.
    let needs_bucket =
        cfg.initial_rate != 0 && payload_len >= MIN_INITIAL_LEN && is_initial(first, version);
    let now = if needs_bucket || matches!(denied_until, Some(u) if u != 0) {
        unsafe { bpf_ktime_get_ns() }
    } else {
        0
    };
    let bucket_ptr = if needs_bucket {
        FILTER_BUCKETS.get_ptr_mut(&src)
    } else {
        None
    };
    let mut fresh = Bucket::default();
    // SAFETY: a pointer from the lookup above; the entry outlives this program run (RCU) and
    // the reference ends before the insert below.
    let bucket = bucket_ptr.map(|p| unsafe { &mut *p });
    let (reason, action) = decide(
        cfg,
        denied_until,
        paired,
        payload_len,
        first,
        version,
        now,
        bucket,
        &mut fresh,
    );
    if let BucketAction::Insert = action {
        let _ = FILTER_BUCKETS.insert(&src, &fresh, 0);
    }
    Some(reason)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
