//! Types shared by the eBPF LAN filter (`companion-filter-ebpf`) and `gatewayd`, and the pure
//! policy arithmetic both sides run (so the XDP/TC program and the userspace fallback cannot
//! disagree on what an Initial is, how a token bucket refills or when a block expires).
//!
//! Every map value is `#[repr(C)]`, padding-free and derives zerocopy's traits; with the `user`
//! feature they also implement `aya::Pod` so gatewayd can read and write the maps.
#![warn(missing_docs)]
#![no_std]
#![deny(unsafe_code)]

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// Smallest UDP payload of a client Initial (RFC 9000 §14.1).
pub const MIN_INITIAL_LEN: u32 = 1200;
/// QUIC version 2 (RFC 9369), whose Initial long-header type is 0b01.
pub const QUIC_V2: u32 = 0x6b33_43cf;
/// Token-bucket arithmetic is done in thousandths of a token.
pub const MILLI: u64 = 1000;
/// Longest refill interval taken into account (keeps the multiplication far from overflow).
pub const MAX_REFILL_NS: u64 = 60_000_000_000;
/// Largest rate and burst honoured (tokens per second / tokens); larger values are clamped.
/// With `MAX_REFILL_NS` this keeps every product below 2^64 without 128-bit arithmetic, which
/// the BPF target lacks.
pub const MAX_RATE: u64 = 1_000_000;

/// Map names in the object file.
pub mod maps {
    /// Global configuration (one [`FilterConfig`](crate::FilterConfig) entry).
    pub const CONFIG: &str = "FILTER_CONFIG";
    /// Per-source Initial token buckets (LRU hash).
    pub const BUCKETS: &str = "FILTER_BUCKETS";
    /// Blocked sources and when each block ends.
    pub const DENY: &str = "FILTER_DENY";
    /// Sources of paired devices (strict mode lets only these through).
    pub const PAIRED: &str = "FILTER_PAIRED";
    /// Per-CPU per-reason packet counters.
    pub const COUNTERS: &str = "FILTER_COUNTERS";
}
/// Program names in the object file.
pub mod programs {
    /// The XDP program.
    pub const XDP: &str = "companion_filter_xdp";
    /// The TC ingress classifier (where XDP cannot attach).
    pub const TC: &str = "companion_filter_tc";
}
/// Capacities of the maps.
pub const BUCKETS_MAX: u32 = 65_536;
/// Most entries of the deny map.
pub const DENY_MAX: u32 = 16_384;
/// Most entries of the paired-source map.
pub const PAIRED_MAX: u32 = 16_384;

/// The parser's bound: the transport (UDP) header must start at or before this byte of the
/// frame (Ethernet header included). Anything that needs more is not parsed but judged by the
/// fail-closed rule (see [`Reason::DroppedUnparsed`]). Legitimate frames need at most
/// 14 (Ethernet) + 8 (two VLAN tags) + 60 (IPv4 with options) or 40 (IPv6) + a few short
/// extension headers.
pub const MAX_L4_OFFSET: usize = 200;
/// How many IPv6 extension headers the parser walks: the longest chain RFC 8200 §4.1's order
/// allows before the upper-layer header (hop-by-hop, destination options, routing, fragment,
/// AH, destination options). A longer chain is dropped if it may be UDP to the port.
pub const MAX_EXT_HEADERS: usize = 6;

/// Next-header values of the IPv6 extension headers the parser walks: hop-by-hop (0),
/// routing (43), fragment (44), AH (51, length in 4-byte units), destination options (60).
/// Anything else ends the chain (ESP, "no next header", and transports).
#[inline(always)]
pub const fn is_ext_header(next: u8) -> bool {
    matches!(next, 0 | 43 | 44 | 51 | 60)
}

/// Why a packet was passed or dropped; the index into the per-CPU counter array.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Reason {
    /// UDP to the QUIC port, admitted.
    Passed = 0,
    /// A QUIC Initial whose UDP payload is shorter than 1200 bytes.
    DroppedShortInitial = 1,
    /// A QUIC Initial beyond the source's token bucket.
    RateLimited = 2,
    /// The source is on the deny list.
    Denied = 3,
    /// Strict mode, window closed, and the source is not a paired device's.
    NotPaired = 4,
    /// A packet that may be UDP to the QUIC port but whose headers the filter cannot walk to
    /// the transport header: an IPv6 chain of more than [`MAX_EXT_HEADERS`] extension headers,
    /// one reaching past [`MAX_L4_OFFSET`], or cut short; or an IPv4/IPv6 UDP header past the
    /// bound or cut short. Dropped before any other check (fail closed): the filter cannot
    /// tell such a packet from one to the port, and no legitimate device needs it.
    DroppedUnparsed = 5,
    /// An IP fragment of UDP to the QUIC port (IPv4 with MF set at offset 0, or IPv6 with a
    /// Fragment header at offset 0), or a first fragment too short to hold the UDP ports.
    /// QUIC sizes its datagrams to the path and never needs IP fragmentation. Non-first
    /// fragments carry no UDP header and pass uncounted: without their first fragment the
    /// kernel can never reassemble them.
    DroppedFragment = 6,
}

impl Reason {
    /// Number of reasons (size of the counter array).
    pub const COUNT: u32 = 7;
    /// Every reason, in counter-index order.
    pub const ALL: [Reason; 7] = [
        Reason::Passed,
        Reason::DroppedShortInitial,
        Reason::RateLimited,
        Reason::Denied,
        Reason::NotPaired,
        Reason::DroppedUnparsed,
        Reason::DroppedFragment,
    ];

    /// The label used in metrics and `gatewayctl status`.
    pub const fn label(self) -> &'static str {
        match self {
            Reason::Passed => "passed",
            Reason::DroppedShortInitial => "dropped_short_initial",
            Reason::RateLimited => "rate_limited",
            Reason::Denied => "denied",
            Reason::NotPaired => "not_paired",
            Reason::DroppedUnparsed => "dropped_unparsed",
            Reason::DroppedFragment => "dropped_fragment",
        }
    }

    /// Whether the packet goes on.
    pub const fn admits(self) -> bool {
        matches!(self, Reason::Passed)
    }
}

/// What the filter does with a packet: not ours (other protocol/port: untouched, uncounted), or
/// counted under a reason.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Not UDP to the QUIC port: passes, not counted.
    NotOurs,
    /// UDP to the QUIC port: counted; passes iff `Reason::Passed`.
    Counted(Reason),
}

/// A source address: IPv6, or IPv4 as an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`).
#[repr(C)]
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, Default, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct SourceKey {
    /// The 16 bytes of the IPv6 (or IPv4-mapped) address, network order.
    pub addr: [u8; 16],
}

impl SourceKey {
    /// From IPv4 octets (network order).
    pub const fn v4(o: [u8; 4]) -> Self {
        // Built from words: written byte by byte, LLVM's BPF backend zeroes the first ten bytes
        // with a call to a byte-loop `memset`, on every packet the program judges.
        let words: [u32; 4] = [
            0,
            0,
            u32::from_ne_bytes([0, 0, 0xff, 0xff]),
            u32::from_ne_bytes(o),
        ];
        Self {
            addr: zerocopy::transmute!(words),
        }
    }
    /// From IPv6 octets.
    pub const fn v6(addr: [u8; 16]) -> Self {
        Self { addr }
    }
}

/// The filter's configuration: one entry of the `FILTER_CONFIG` array.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Default, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct FilterConfig {
    /// gatewayd's QUIC port (host order); 0 = filter disabled (everything passes uncounted).
    pub port: u16,
    /// 1 = strict mode: only paired sources (or anyone while the window is open).
    pub strict: u8,
    /// 1 = a pairing window is open.
    pub window_open: u8,
    /// Explicit padding (keeps the layout padding-free); always 0.
    pub _pad: u32,
    /// Initials per second per source (token refill); 0 = no rate limit.
    pub initial_rate: u64,
    /// Bucket size (tokens).
    pub initial_burst: u64,
}

/// A source's token bucket (`FILTER_BUCKETS`, LRU hash).
#[repr(C)]
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Default, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct Bucket {
    /// Tokens, in thousandths.
    pub milli_tokens: u64,
    /// Monotonic time of the last refill (ns, `bpf_ktime_get_ns` / `CLOCK_MONOTONIC`).
    pub last_ns: u64,
}

/// A deny-list entry (`FILTER_DENY`).
#[repr(C)]
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Default, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct DenyEntry {
    /// Monotonic time (ns) the block ends; 0 = until lifted.
    pub until_ns: u64,
}

/// A paired source (`FILTER_PAIRED`); the value is a marker.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Default, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct PairedEntry {
    /// Reserved; 0.
    pub flags: u32,
}

#[cfg(feature = "user")]
#[allow(unsafe_code)]
mod pod {
    // SAFETY: all four are `#[repr(C)]`, contain only integers/byte arrays and have no padding
    // (checked by zerocopy's `IntoBytes` derive), so every bit pattern is valid.
    unsafe impl aya::Pod for super::SourceKey {}
    unsafe impl aya::Pod for super::FilterConfig {}
    unsafe impl aya::Pod for super::Bucket {}
    unsafe impl aya::Pod for super::DenyEntry {}
    unsafe impl aya::Pod for super::PairedEntry {}
}

/// Whether a UDP payload starting with `first` and then the 4-byte `version` is a QUIC client
/// Initial (long header, non-zero version, Initial type for that version).
#[inline(always)]
pub const fn is_initial(first: u8, version: u32) -> bool {
    if first & 0x80 == 0 || version == 0 {
        return false;
    }
    let ty = (first >> 4) & 0x03;
    if version == QUIC_V2 { ty == 1 } else { ty == 0 }
}

/// The policy on one UDP datagram to the QUIC port, given the lookups already done. Shared by
/// the eBPF program and the userspace fallback. `bucket` is the source's bucket (`None` when it
/// has none yet); it is updated in place (and must be stored by the caller when `Some` was
/// returned in `new_bucket`).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub fn decide(
    cfg: &FilterConfig,
    denied_until: Option<u64>,
    paired: bool,
    payload_len: u32,
    first: u8,
    version: u32,
    now_ns: u64,
    bucket: Option<&mut Bucket>,
    new_bucket: &mut Bucket,
) -> (Reason, BucketAction) {
    if let Some(until) = denied_until
        && (until == 0 || now_ns < until)
    {
        return (Reason::Denied, BucketAction::None);
    }
    if cfg.strict != 0 && cfg.window_open == 0 && !paired {
        return (Reason::NotPaired, BucketAction::None);
    }
    if !is_initial(first, version) {
        return (Reason::Passed, BucketAction::None);
    }
    if payload_len < MIN_INITIAL_LEN {
        return (Reason::DroppedShortInitial, BucketAction::None);
    }
    if cfg.initial_rate == 0 {
        return (Reason::Passed, BucketAction::None);
    }
    match bucket {
        Some(b) => {
            let ok = take(cfg, b, now_ns);
            (
                if ok {
                    Reason::Passed
                } else {
                    Reason::RateLimited
                },
                BucketAction::Updated,
            )
        }
        None => {
            *new_bucket = Bucket {
                milli_tokens: clamp(cfg.initial_burst).wrapping_mul(MILLI),
                last_ns: now_ns,
            };
            let ok = take(cfg, new_bucket, now_ns);
            (
                if ok {
                    Reason::Passed
                } else {
                    Reason::RateLimited
                },
                BucketAction::Insert,
            )
        }
    }
}

/// What the caller must do with the bucket after [`decide`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BucketAction {
    /// Nothing to write back (the packet was dropped or the filter is off).
    None,
    /// The existing bucket was updated in place.
    Updated,
    /// `new_bucket` must be inserted.
    Insert,
}

#[inline(always)]
const fn clamp(v: u64) -> u64 {
    if v > MAX_RATE { MAX_RATE } else { v }
}

/// Refills `b` up to `now_ns` and takes one token if there is one.
#[inline(always)]
pub fn take(cfg: &FilterConfig, b: &mut Bucket, now_ns: u64) -> bool {
    let cap = clamp(cfg.initial_burst).wrapping_mul(MILLI);
    let mut elapsed = now_ns.saturating_sub(b.last_ns);
    if elapsed > MAX_REFILL_NS {
        elapsed = MAX_REFILL_NS;
    }
    // tokens/s * ns / 1e9 * 1000 = tokens/s * ns / 1e6
    let refill = elapsed.wrapping_mul(clamp(cfg.initial_rate)) / 1_000_000;
    let mut t = b.milli_tokens.wrapping_add(refill);
    if t > cap {
        t = cap;
    }
    b.last_ns = now_ns;
    if t >= MILLI {
        b.milli_tokens = t - MILLI;
        true
    } else {
        b.milli_tokens = t;
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_keys_are_ipv4_mapped_ipv6() {
        assert_eq!(
            SourceKey::v4([192, 0, 2, 7]).addr,
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 192, 0, 2, 7]
        );
    }

    #[test]
    fn initial_detection() {
        assert!(is_initial(0xc0, 1));
        assert!(is_initial(0xc3, 1));
        assert!(!is_initial(0xe0, 1)); // Handshake
        assert!(!is_initial(0x40, 1)); // short header
        assert!(!is_initial(0xc0, 0)); // version negotiation
        assert!(is_initial(0xd0, QUIC_V2));
        assert!(!is_initial(0xc0, QUIC_V2));
    }

    #[test]
    fn bucket_refills_and_caps() {
        let cfg = FilterConfig {
            port: 4433,
            initial_rate: 10,
            initial_burst: 2,
            ..Default::default()
        };
        let mut b = Bucket {
            milli_tokens: 2 * MILLI,
            last_ns: 0,
        };
        assert!(take(&cfg, &mut b, 0));
        assert!(take(&cfg, &mut b, 0));
        assert!(!take(&cfg, &mut b, 0));
        assert!(!take(&cfg, &mut b, 50_000_000)); // 0.5 token
        assert!(take(&cfg, &mut b, 100_000_000)); // 1.0 token
        assert!(take(&cfg, &mut b, 10_000_000_000));
        assert!(take(&cfg, &mut b, 10_000_000_000));
        assert!(!take(&cfg, &mut b, 10_000_000_000));
    }
}
