//! The LAN filter's policy, verdict by verdict, on crafted frames: through the real eBPF
//! programs (XDP and TC, `BPF_PROG_TEST_RUN`, no interface needed) and through the userspace
//! fallback, table-driven, asserting that all three agree on the verdict AND on the counters.
//!
//! The eBPF half needs root (CAP_BPF + CAP_NET_ADMIN); without it those checks are skipped with
//! a visible message and only the userspace half runs. CI runs as root.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashSet;
use std::net::IpAddr;
use std::time::Duration;

use companion_filter_common::{DenyEntry, FilterConfig, Reason, SourceKey, Verdict};
use gatewayd::filter::ebpf::EbpfFilter;
use gatewayd::filter::{UserspacePolicy, monotonic_ns, source_key};

const PORT: u16 = 4433;

fn is_root() -> bool {
    nix::unistd::Uid::effective().is_root()
}

#[derive(Clone, Copy)]
enum L3 {
    V4([u8; 4]),
    V6([u8; 16]),
    /// IPv6 with a hop-by-hop extension header before UDP.
    V6Hbh([u8; 16]),
}

#[derive(Clone)]
struct Pkt {
    vlans: Vec<u16>, // outer first: 0x88a8 or 0x8100
    l3: L3,
    proto: u8,
    dport: u16,
    payload: Vec<u8>,
    /// IPv6 extension headers before the transport (`L3::V6` only): next-header type and
    /// whole length in bytes (a multiple of 8; a Fragment header is 8 bytes).
    ext: Vec<(u8, usize)>,
    /// IPv6 Fragment headers' (offset in 8-byte units, more fragments).
    frag6: (u16, bool),
    /// IPv4 fragment field: (offset in 8-byte units, more fragments).
    frag4: Option<(u16, bool)>,
    /// Cut the frame to this many bytes.
    cut: Option<usize>,
}

fn initial(len: usize) -> Vec<u8> {
    let mut p = vec![0u8; len];
    p[0] = 0xc3; // long header, fixed bit, type Initial
    p[1..5].copy_from_slice(&1u32.to_be_bytes());
    p
}

fn handshake(len: usize) -> Vec<u8> {
    let mut p = initial(len);
    p[0] = 0xe3;
    p
}

fn short_header(len: usize) -> Vec<u8> {
    let mut p = vec![0x5au8; len];
    p[0] = 0x41;
    p
}

fn v4(last: u8) -> L3 {
    L3::V4([10, 99, 0, last])
}

fn v6(last: u8) -> L3 {
    let mut a = [0u8; 16];
    a[0] = 0xfd;
    a[15] = last;
    L3::V6(a)
}

fn pkt(l3: L3, payload: Vec<u8>) -> Pkt {
    Pkt {
        vlans: vec![],
        l3,
        proto: 17,
        dport: PORT,
        payload,
        ext: vec![],
        frag6: (0, true),
        frag4: None,
        cut: None,
    }
}

/// IPv6 from `v6(last)` with `n` Destination Options headers (8 bytes each) before UDP.
fn dest_opts(l3: L3, n: usize, payload: Vec<u8>) -> Pkt {
    let mut p = pkt(l3, payload);
    p.ext = vec![(60, 8); n];
    p
}

fn src_ip(l3: L3) -> IpAddr {
    match l3 {
        L3::V4(a) => IpAddr::from(a),
        L3::V6(a) | L3::V6Hbh(a) => IpAddr::from(a),
    }
}

fn frame(p: &Pkt) -> Vec<u8> {
    let mut f = vec![0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2];
    let ethertype: u16 = match p.l3 {
        L3::V4(_) => 0x0800,
        _ => 0x86dd,
    };
    for v in &p.vlans {
        f.extend_from_slice(&v.to_be_bytes());
        f.extend_from_slice(&[0x00, 0x07]); // TCI: VLAN 7
    }
    f.extend_from_slice(&ethertype.to_be_bytes());
    let mut l4 = Vec::new();
    l4.extend_from_slice(&40000u16.to_be_bytes());
    l4.extend_from_slice(&p.dport.to_be_bytes());
    if p.proto == 17 {
        l4.extend_from_slice(&((8 + p.payload.len()) as u16).to_be_bytes());
        l4.extend_from_slice(&[0, 0]);
    } else {
        // TCP: seq, ack, offset...
        l4.extend_from_slice(&[0; 16]);
        l4[12] = 0x50;
    }
    l4.extend_from_slice(&p.payload);
    match p.l3 {
        L3::V4(src) => {
            let total = (20 + l4.len()) as u16;
            f.extend_from_slice(&[0x45, 0]);
            f.extend_from_slice(&total.to_be_bytes());
            let frag: u16 = match p.frag4 {
                None => 0x4000, // DF
                Some((off, more)) => off | if more { 0x2000 } else { 0 },
            };
            f.extend_from_slice(&[0, 1]);
            f.extend_from_slice(&frag.to_be_bytes());
            f.extend_from_slice(&[64, p.proto, 0, 0]);
            f.extend_from_slice(&src);
            f.extend_from_slice(&[10, 99, 0, 254]);
        }
        L3::V6(src) | L3::V6Hbh(src) => {
            let mut ext = p.ext.clone();
            if matches!(p.l3, L3::V6Hbh(_)) {
                ext.insert(0, (0, 8));
            }
            let mut chain = Vec::new();
            for (i, (ty, len)) in ext.iter().enumerate() {
                let next = ext.get(i + 1).map_or(p.proto, |e| e.0);
                let mut h = vec![0u8; *len];
                h[0] = next;
                match ty {
                    44 => {
                        let (off, more) = p.frag6;
                        h[2..4].copy_from_slice(&((off << 3) | u16::from(more)).to_be_bytes());
                        h[4..8].copy_from_slice(&0x1234_5678u32.to_be_bytes());
                    }
                    51 => h[1] = (len / 4 - 2) as u8,
                    _ => {
                        h[1] = (len / 8 - 1) as u8;
                        if *len > 2 {
                            // PadN over the rest of the header.
                            h[2] = 1;
                            h[3] = (len - 4) as u8;
                        }
                    }
                }
                chain.extend_from_slice(&h);
            }
            let plen = (l4.len() + chain.len()) as u16;
            f.extend_from_slice(&[0x60, 0, 0, 0]);
            f.extend_from_slice(&plen.to_be_bytes());
            f.push(ext.first().map_or(p.proto, |e| e.0));
            f.push(64);
            f.extend_from_slice(&src);
            let mut dst = [0u8; 16];
            dst[0] = 0xfd;
            dst[15] = 0xfe;
            f.extend_from_slice(&dst);
            f.extend_from_slice(&chain);
        }
    }
    f.extend_from_slice(&l4);
    if let Some(n) = p.cut {
        f.truncate(n);
    }
    f
}

/// What a step expects.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Want {
    NotOurs,
    Is(Reason),
}

/// A change of the filter's tables between packets.
#[derive(Clone)]
enum Setup {
    Config(FilterConfig),
    /// Deny `ip` until now + `ms` (None = forever; Some(negative) = already expired).
    Deny(IpAddr, Option<i64>),
    Undeny(IpAddr),
    Paired(Vec<IpAddr>),
    Sleep(Duration),
}

#[derive(Clone)]
enum Step {
    Setup(Setup),
    Send(Pkt, Want),
}

fn cfg(rate: u64, burst: u64, strict: bool, window: bool) -> FilterConfig {
    FilterConfig {
        port: PORT,
        strict: u8::from(strict),
        window_open: u8::from(window),
        _pad: 0,
        initial_rate: rate,
        initial_burst: burst,
    }
}

/// One implementation under test.
trait Impl {
    fn name(&self) -> String;
    fn setup(&mut self, s: &Setup, now_mono: u64);
    /// `Some(passes)` when counted; the counter deltas are compared separately.
    fn send(&mut self, frame: &[u8]) -> bool;
    fn counters(&mut self) -> [u64; Reason::COUNT as usize];
}

fn deny_entry(ms: Option<i64>, now: u64) -> DenyEntry {
    DenyEntry {
        until_ns: match ms {
            None => 0,
            Some(ms) if ms < 0 => now - ((-ms) as u64) * 1_000_000,
            Some(ms) => now + (ms as u64) * 1_000_000,
        },
    }
}

struct User(std::sync::Arc<UserspacePolicy>);

impl Impl for User {
    fn name(&self) -> String {
        "userspace".into()
    }
    fn setup(&mut self, s: &Setup, now: u64) {
        match s {
            Setup::Config(c) => self.0.set_config(*c),
            Setup::Deny(ip, ms) => self.0.set_deny(source_key(*ip), deny_entry(*ms, now)),
            Setup::Undeny(ip) => self.0.remove_deny(&source_key(*ip)),
            Setup::Paired(ips) => self
                .0
                .set_paired(ips.iter().map(|i| source_key(*i)).collect()),
            Setup::Sleep(d) => std::thread::sleep(*d),
        }
    }
    fn send(&mut self, frame: &[u8]) -> bool {
        match self.0.judge_frame(frame, monotonic_ns()) {
            Verdict::NotOurs => true,
            Verdict::Counted(r) => r.admits(),
        }
    }
    fn counters(&mut self) -> [u64; Reason::COUNT as usize] {
        self.0.counters()
    }
}

struct Kernel(EbpfFilter, bool);

impl Impl for Kernel {
    fn name(&self) -> String {
        if self.1 { "eBPF TC" } else { "eBPF XDP" }.into()
    }
    fn setup(&mut self, s: &Setup, now: u64) {
        match s {
            Setup::Config(c) => self.0.set_config(*c).unwrap(),
            Setup::Deny(ip, ms) => self
                .0
                .set_deny(source_key(*ip), deny_entry(*ms, now))
                .unwrap(),
            Setup::Undeny(ip) => self.0.remove_deny(&source_key(*ip)).unwrap(),
            Setup::Paired(ips) => {
                let keys: HashSet<SourceKey> = ips.iter().map(|i| source_key(*i)).collect();
                let r = self.0.set_paired(&keys).unwrap();
                assert_eq!(r.failed, 0, "{r:?}");
            }
            Setup::Sleep(d) => std::thread::sleep(*d),
        }
    }
    fn send(&mut self, frame: &[u8]) -> bool {
        self.0.test_run(self.1, frame).unwrap()
    }
    fn counters(&mut self) -> [u64; Reason::COUNT as usize] {
        self.0.counters().unwrap()
    }
}

/// Runs a scenario against one implementation; returns each step's (verdict, counter delta).
fn run(imp: &mut dyn Impl, steps: &[Step]) -> Vec<(bool, Option<Reason>)> {
    let mut out = Vec::new();
    for s in steps {
        match s {
            Step::Setup(x) => imp.setup(x, monotonic_ns()),
            Step::Send(p, want) => {
                let before = imp.counters();
                let pass = imp.send(&frame(p));
                let after = imp.counters();
                let moved: Vec<Reason> = Reason::ALL
                    .into_iter()
                    .filter(|r| after[*r as usize] != before[*r as usize])
                    .collect();
                assert!(moved.len() <= 1, "{}: several counters moved", imp.name());
                let got = moved.first().copied();
                let expect_reason = match want {
                    Want::NotOurs => None,
                    Want::Is(r) => Some(*r),
                };
                assert_eq!(
                    got,
                    expect_reason,
                    "{}: counter for step {:?}",
                    imp.name(),
                    want
                );
                let expect_pass = expect_reason.is_none_or(|r| r.admits());
                assert_eq!(pass, expect_pass, "{}: verdict for {:?}", imp.name(), want);
                out.push((pass, got));
            }
        }
    }
    out
}

/// A step sending `p`, which must get `reason`.
fn is(p: Pkt, reason: Reason) -> Step {
    Step::Send(p, Want::Is(reason))
}

fn scenarios() -> Vec<(&'static str, Vec<Step>)> {
    use Step::{Send, Setup as S};
    let open = cfg(0, 0, false, false);
    let mut vlan_q = pkt(v4(3), initial(600));
    vlan_q.vlans = vec![0x8100];
    let mut vlan_qinq = pkt(v6(4), initial(600));
    vlan_qinq.vlans = vec![0x88a8, 0x8100];
    let mut vlan_ok = pkt(v4(3), initial(1200));
    vlan_ok.vlans = vec![0x8100];
    let mut tcp = pkt(v4(5), initial(100));
    tcp.proto = 6;
    let mut other_port = pkt(v4(5), initial(100));
    other_port.dport = 53;
    let mut other_port6 = pkt(v6(5), initial(100));
    other_port6.dport = 4434;
    let mut hbh = [0u8; 16];
    hbh[0] = 0xfd;
    hbh[15] = 9;
    vec![
        (
            "IPv4 and IPv6 Initials: 1200 bytes pass, 1199 are dropped",
            vec![
                S(Setup::Config(open)),
                is(pkt(v4(1), initial(1200)), Reason::Passed),
                is(pkt(v4(1), initial(1199)), Reason::DroppedShortInitial),
                is(pkt(v6(1), initial(1350)), Reason::Passed),
                is(pkt(v6(1), initial(40)), Reason::DroppedShortInitial),
                is(
                    pkt(L3::V6Hbh(hbh), initial(40)),
                    Reason::DroppedShortInitial,
                ),
                is(pkt(L3::V6Hbh(hbh), initial(1200)), Reason::Passed),
            ],
        ),
        (
            "VLAN-tagged frames (802.1Q, 802.1ad QinQ) are parsed",
            vec![
                S(Setup::Config(open)),
                is(vlan_q, Reason::DroppedShortInitial),
                is(vlan_qinq, Reason::DroppedShortInitial),
                is(vlan_ok, Reason::Passed),
            ],
        ),
        (
            "non-UDP and other ports pass untouched; short non-Initial QUIC packets pass",
            vec![
                S(Setup::Config(open)),
                Send(tcp, Want::NotOurs),
                Send(other_port, Want::NotOurs),
                Send(other_port6, Want::NotOurs),
                is(pkt(v4(6), short_header(40)), Reason::Passed),
                is(pkt(v4(6), handshake(80)), Reason::Passed),
                is(pkt(v4(6), vec![]), Reason::Passed),
            ],
        ),
        (
            "token bucket: burst 3 per source, then rate-limited; other sources unaffected; \
             non-Initials never limited",
            vec![
                S(Setup::Config(cfg(1, 3, false, false))),
                is(pkt(v4(7), initial(1200)), Reason::Passed),
                is(pkt(v4(7), initial(1200)), Reason::Passed),
                is(pkt(v4(7), initial(1200)), Reason::Passed),
                is(pkt(v4(7), initial(1200)), Reason::RateLimited),
                is(pkt(v4(7), initial(1200)), Reason::RateLimited),
                is(pkt(v4(7), short_header(100)), Reason::Passed),
                is(pkt(v6(7), initial(1200)), Reason::Passed),
                // Short Initials are dropped before they cost a token.
                is(pkt(v4(8), initial(100)), Reason::DroppedShortInitial),
                S(Setup::Config(cfg(20, 1, false, false))),
                is(pkt(v4(9), initial(1200)), Reason::Passed),
                is(pkt(v4(9), initial(1200)), Reason::RateLimited),
                S(Setup::Sleep(Duration::from_millis(120))), // 20/s: 2.4 tokens, capped at 1
                is(pkt(v4(9), initial(1200)), Reason::Passed),
                is(pkt(v4(9), initial(1200)), Reason::RateLimited),
            ],
        ),
        (
            "deny list: every packet to the port dropped while blocked; expiry; unblock",
            vec![
                S(Setup::Config(open)),
                S(Setup::Deny(src_ip(v4(10)), None)),
                is(pkt(v4(10), initial(1200)), Reason::Denied),
                is(pkt(v4(10), short_header(50)), Reason::Denied),
                is(pkt(v4(11), initial(1200)), Reason::Passed),
                S(Setup::Undeny(src_ip(v4(10)))),
                is(pkt(v4(10), initial(1200)), Reason::Passed),
                S(Setup::Deny(src_ip(v6(10)), Some(-1000))), // expired a second ago
                is(pkt(v6(10), initial(1200)), Reason::Passed),
                S(Setup::Deny(src_ip(v6(10)), Some(150))),
                is(pkt(v6(10), initial(1200)), Reason::Denied),
                S(Setup::Sleep(Duration::from_millis(200))),
                is(pkt(v6(10), initial(1200)), Reason::Passed),
                // Deny wins over everything else, even for other traffic to the port.
                S(Setup::Deny(src_ip(v4(12)), None)),
                is(pkt(v4(12), initial(10)), Reason::Denied),
            ],
        ),
        (
            "strict mode: only paired sources, unless the pairing window is open",
            vec![
                S(Setup::Config(cfg(0, 0, true, false))),
                S(Setup::Paired(vec![src_ip(v4(20)), src_ip(v6(20))])),
                is(pkt(v4(20), initial(1200)), Reason::Passed),
                is(pkt(v6(20), short_header(60)), Reason::Passed),
                is(pkt(v4(21), initial(1200)), Reason::NotPaired),
                is(pkt(v4(21), short_header(60)), Reason::NotPaired),
                S(Setup::Config(cfg(0, 0, true, true))),
                is(pkt(v4(21), initial(1200)), Reason::Passed),
                is(pkt(v4(21), initial(300)), Reason::DroppedShortInitial),
                S(Setup::Config(cfg(0, 0, true, false))),
                S(Setup::Paired(vec![src_ip(v6(20))])),
                is(pkt(v4(20), initial(1200)), Reason::NotPaired),
                // Deny is checked before pairing.
                S(Setup::Deny(src_ip(v6(20)), None)),
                is(pkt(v6(20), initial(1200)), Reason::Denied),
            ],
        ),
        (
            "fail closed: an IPv6 header chain the filter cannot walk is dropped, whoever sent \
             it; a chain it can walk is judged (issue 15: five Destination Options headers \
             carried a blocked source past the filter)",
            fail_closed_ipv6(),
        ),
        (
            "fragments of UDP to the port are dropped (IPv4 MF, IPv6 Fragment header); \
             non-first fragments and fragments to other ports pass untouched",
            fragments(),
        ),
        (
            "port 0 (not configured) judges nothing",
            vec![
                S(Setup::Config(FilterConfig::default())),
                Send(pkt(v4(30), initial(10)), Want::NotOurs),
            ],
        ),
    ]
}

#[test]
fn userspace_fallback_applies_every_verdict() {
    for (name, steps) in scenarios() {
        eprintln!("scenario (userspace): {name}");
        let mut u = User(UserspacePolicy::new());
        run(&mut u, &steps);
    }
}

#[test]
fn ebpf_programs_apply_every_verdict_and_agree_with_userspace() {
    if !is_root() {
        eprintln!(
            "SKIPPED: BPF_PROG_TEST_RUN needs root (CAP_BPF/CAP_NET_ADMIN); run as root (CI does)"
        );
        return;
    }
    for (name, steps) in scenarios() {
        let mut u = User(UserspacePolicy::new());
        let user = run(&mut u, &steps);
        for tc in [false, true] {
            let mut k = Kernel(EbpfFilter::load_detached().unwrap(), tc);
            eprintln!("scenario ({}): {name}", k.name());
            let kernel = run(&mut k, &steps);
            assert_eq!(
                kernel,
                user,
                "{}: disagrees with userspace on {name}",
                k.name()
            );
        }
    }
}

#[test]
fn frame_parser_refuses_truncated_frames_without_panicking() {
    let p = UserspacePolicy::new();
    p.set_config(cfg(0, 0, false, false));
    let f = frame(&pkt(v4(1), initial(1200)));
    for cut in 0..60 {
        let _ = p.judge_frame(&f[..cut], monotonic_ns());
    }
}

/// `n` bytes of Ethernet + IPv6 + `ext` + the first `k` bytes of the UDP header.
fn cut_after_ext(ext: usize, k: usize) -> usize {
    14 + 40 + ext + k
}

fn fail_closed_ipv6() -> Vec<Step> {
    use Step::{Send, Setup as S};
    let blocked = v6(40);
    let honest = v6(41);
    let mut tcp7 = dest_opts(honest, 7, initial(100));
    tcp7.proto = 6;
    let mut tcp6 = dest_opts(honest, 6, initial(100));
    tcp6.proto = 6;
    let mut icmp = pkt(honest, vec![0x80, 0, 0, 0]);
    icmp.proto = 58;
    icmp.ext = vec![(0, 8)];
    let with_ext = |l3: L3, ext: Vec<(u8, usize)>| {
        let mut p = pkt(l3, initial(1200));
        p.ext = ext;
        p
    };
    let mut truncated = dest_opts(honest, 2, initial(1200));
    truncated.cut = Some(cut_after_ext(8, 0) + 2); // the second header cut after 2 bytes
    let mut udp_cut = dest_opts(honest, 1, initial(1200));
    udp_cut.cut = Some(cut_after_ext(8, 2)); // UDP ports cut in half
    let mut other_port = dest_opts(honest, 6, initial(1200));
    other_port.dport = 53;
    vec![
        S(Setup::Config(cfg(0, 0, false, false))),
        S(Setup::Deny(src_ip(blocked), None)),
        // The attack of issue 15: five Destination Options headers. Walked and judged now.
        is(dest_opts(blocked, 5, initial(1200)), Reason::Denied),
        is(dest_opts(blocked, 5, short_header(60)), Reason::Denied),
        is(dest_opts(blocked, 6, initial(1200)), Reason::Denied),
        // Legitimate packets with extension headers still pass.
        is(dest_opts(honest, 5, initial(1200)), Reason::Passed),
        is(dest_opts(honest, 6, initial(1200)), Reason::Passed),
        is(
            dest_opts(honest, 6, initial(300)),
            Reason::DroppedShortInitial,
        ),
        Send(other_port, Want::NotOurs),
        Send(tcp6, Want::NotOurs),
        Send(icmp, Want::NotOurs),
        // More than MAX_EXT_HEADERS (6): cannot be walked, dropped whatever it carries.
        is(
            dest_opts(blocked, 7, initial(1200)),
            Reason::DroppedUnparsed,
        ),
        is(dest_opts(honest, 7, initial(1200)), Reason::DroppedUnparsed),
        is(tcp7, Reason::DroppedUnparsed),
        // A header ending past byte 200: UDP would start at 14 + 40 + 168 = 222.
        is(with_ext(blocked, vec![(60, 168)]), Reason::DroppedUnparsed),
        is(with_ext(honest, vec![(60, 168)]), Reason::DroppedUnparsed),
        // The second of two headers crossing the bound (198 → 206).
        is(
            with_ext(blocked, vec![(60, 144), (60, 8)]),
            Reason::DroppedUnparsed,
        ),
        // UDP starting exactly at the bound (14 + 40 + 144 = 198 ≤ 200) is judged.
        is(with_ext(blocked, vec![(60, 144)]), Reason::Denied),
        is(with_ext(honest, vec![(60, 144)]), Reason::Passed),
        // AH (length in 4-byte units) is walked too: a blocked source behind it is denied.
        is(with_ext(blocked, vec![(51, 24), (60, 8)]), Reason::Denied),
        // Cut short inside the chain or inside the UDP ports.
        is(truncated, Reason::DroppedUnparsed),
        is(udp_cut, Reason::DroppedUnparsed),
    ]
}

fn fragments() -> Vec<Step> {
    use Step::{Send, Setup as S};
    let frag4 = |l3: L3, off: u16, more: bool, payload: Vec<u8>| {
        let mut p = pkt(l3, payload);
        p.frag4 = Some((off, more));
        p
    };
    let frag6 = |l3: L3, off: u16, more: bool, payload: Vec<u8>| {
        let mut p = pkt(l3, payload);
        p.ext = vec![(44, 8)];
        p.frag6 = (off, more);
        p
    };
    let mut f4_other = frag4(v4(43), 0, true, initial(1200));
    f4_other.dport = 53;
    let mut f6_other = frag6(v6(43), 0, true, initial(1200));
    f6_other.dport = 53;
    let mut f4_tiny = frag4(v4(43), 0, true, initial(1200));
    f4_tiny.cut = Some(14 + 20 + 2); // a first fragment without the UDP ports
    let mut f6_tiny = frag6(v6(43), 0, true, initial(1200));
    f6_tiny.cut = Some(cut_after_ext(8, 2));
    let mut v4_cut = pkt(v4(43), initial(1200));
    v4_cut.cut = Some(14 + 20 + 2);
    let mut f6_behind_opts = frag6(v6(42), 0, true, initial(1200));
    f6_behind_opts.ext = vec![(0, 8), (60, 8), (44, 8), (60, 8)];
    vec![
        S(Setup::Config(cfg(0, 0, false, false))),
        S(Setup::Deny(src_ip(v4(42)), None)),
        S(Setup::Deny(src_ip(v6(42)), None)),
        // First fragments (more follow) of UDP to the port: dropped, blocked source or not.
        is(
            frag4(v4(42), 0, true, initial(1200)),
            Reason::DroppedFragment,
        ),
        is(
            frag4(v4(43), 0, true, initial(1200)),
            Reason::DroppedFragment,
        ),
        is(
            frag6(v6(42), 0, true, initial(1200)),
            Reason::DroppedFragment,
        ),
        is(
            frag6(v6(43), 0, true, initial(1200)),
            Reason::DroppedFragment,
        ),
        is(f6_behind_opts, Reason::DroppedFragment),
        // An IPv6 atomic fragment (offset 0, no more; RFC 8021 deprecates them).
        is(
            frag6(v6(43), 0, false, initial(1200)),
            Reason::DroppedFragment,
        ),
        // First fragments too short to hold the UDP ports may be to the port.
        is(f4_tiny, Reason::DroppedFragment),
        is(f6_tiny, Reason::DroppedFragment),
        // An unfragmented IPv4 packet cut inside the UDP ports.
        is(v4_cut, Reason::DroppedUnparsed),
        // Non-first fragments carry no UDP header; the kernel cannot reassemble them without
        // their (dropped) first fragment: untouched.
        Send(frag4(v4(42), 100, false, initial(1200)), Want::NotOurs),
        Send(frag4(v4(43), 100, true, initial(1200)), Want::NotOurs),
        Send(frag6(v6(42), 100, false, initial(1200)), Want::NotOurs),
        // Fragments to other ports are not ours.
        Send(f4_other, Want::NotOurs),
        Send(f6_other, Want::NotOurs),
        // Unfragmented datagrams are judged as before.
        is(pkt(v4(43), initial(1200)), Reason::Passed),
        is(pkt(v6(43), initial(1200)), Reason::Passed),
        is(pkt(v4(42), initial(1200)), Reason::Denied),
    ]
}

/// The attack packets of issue 15 item 4 through one build of the program, printing the
/// `BPF_PROG_TEST_RUN` return codes and the `passed`/`denied` counters. Runs this build's
/// program; with `FILTER_OBJECT=<path to a companion-filter object>` another build's (e.g.
/// main's, `target/debug/build/gatewayd-*/out/companion-filter`), for before/after figures.
#[test]
fn attack_packets_verdicts_report() {
    if !is_root() {
        eprintln!("SKIPPED: BPF_PROG_TEST_RUN needs root");
        return;
    }
    let other = std::env::var_os("FILTER_OBJECT").map(|p| std::fs::read(p).unwrap());
    let blocked = v6(40);
    let mut past200 = pkt(blocked, initial(1200));
    past200.ext = vec![(60, 168)];
    let mut f4 = pkt(v4(42), initial(1200));
    f4.frag4 = Some((0, true));
    let mut f6 = pkt(v6(42), initial(1200));
    f6.ext = vec![(44, 8)];
    let attacks: Vec<(&str, Pkt)> = vec![
        (
            "5 Destination Options, blocked source",
            dest_opts(blocked, 5, initial(1200)),
        ),
        (
            "7 Destination Options, blocked source",
            dest_opts(blocked, 7, initial(1200)),
        ),
        ("headers ending past byte 200, blocked source", past200),
        ("IPv4 first fragment, blocked source", f4.clone()),
        ("IPv6 first fragment, blocked source", f6.clone()),
        ("IPv4 first fragment, unblocked source", {
            let mut p = f4.clone();
            p.l3 = v4(43);
            p
        }),
        ("IPv6 first fragment, unblocked source", {
            let mut p = f6;
            p.l3 = v6(43);
            p
        }),
        (
            "plain IPv6 Initial, blocked source",
            pkt(blocked, initial(1200)),
        ),
    ];
    for tc in [false, true] {
        let mut k = match &other {
            Some(o) => EbpfFilter::load_detached_object(o).unwrap(),
            None => EbpfFilter::load_detached().unwrap(),
        };
        k.set_config(cfg(0, 0, false, false)).unwrap();
        k.set_deny(source_key(src_ip(blocked)), DenyEntry { until_ns: 0 })
            .unwrap();
        k.set_deny(source_key(src_ip(v4(42))), DenyEntry { until_ns: 0 })
            .unwrap();
        k.set_deny(source_key(src_ip(v6(42))), DenyEntry { until_ns: 0 })
            .unwrap();
        let mut passed_attacks = 0;
        // An older object may have fewer counters: read those it has.
        let snapshot = |k: &mut EbpfFilter| -> Vec<Option<u64>> {
            Reason::ALL.iter().map(|r| k.counter(*r).ok()).collect()
        };
        for (name, p) in &attacks {
            let before = snapshot(&mut k);
            let pass = k.test_run(tc, &frame(p)).unwrap();
            let after = snapshot(&mut k);
            let moved: Vec<&str> = Reason::ALL
                .iter()
                .zip(before.iter().zip(&after))
                .filter(|(_, (b, a))| b != a)
                .map(|(r, _)| r.label())
                .collect();
            passed_attacks += u32::from(pass);
            eprintln!(
                "{}: {name}: {} (counted: {})",
                if tc { "TC " } else { "XDP" },
                match (tc, pass) {
                    (false, true) => "XDP_PASS (2)",
                    (false, false) => "XDP_DROP (1)",
                    (true, true) => "TC_ACT_OK (0)",
                    (true, false) => "TC_ACT_SHOT (2)",
                },
                if moved.is_empty() {
                    "nothing".to_string()
                } else {
                    moved.join(", ")
                }
            );
        }
        // 1,000 copies of the 5-Destination-Options attack.
        let p5 = frame(&dest_opts(blocked, 5, initial(1200)));
        let mut through = 0;
        for _ in 0..1000 {
            through += u32::from(k.test_run(tc, &p5).unwrap());
        }
        eprintln!(
            "{}: 5-dest-opts attack x1000: {through} packets passed; counters passed {} \
             denied {}; attack packets passed {passed_attacks}/{}",
            if tc { "TC " } else { "XDP" },
            k.counter(Reason::Passed).unwrap(),
            k.counter(Reason::Denied).unwrap(),
            attacks.len()
        );
        if other.is_none() {
            assert_eq!(through, 0);
            assert_eq!(passed_attacks, 0);
        }
    }
}

/// `set_paired` inserts every source it can: more sources than `FILTER_PAIRED` holds fill it
/// to capacity, the rest are reported as failures; nothing stops at the first refusal.
#[test]
fn set_paired_inserts_all_it_can_and_reports_the_rest() {
    if !is_root() {
        eprintln!("SKIPPED: needs root");
        return;
    }
    let mut k = EbpfFilter::load_detached().unwrap();
    let cap = companion_filter_common::PAIRED_MAX as usize;
    let key = |i: usize| {
        let mut a = [0u8; 16];
        a[0] = 0xfd;
        a[12..16].copy_from_slice(&(i as u32).to_be_bytes());
        SourceKey::v6(a)
    };
    let keys: HashSet<SourceKey> = (0..cap + 100).map(key).collect();
    let r = k.set_paired(&keys).unwrap();
    assert_eq!(r.inserted as usize, cap, "{r:?}");
    assert_eq!(r.failed, 100, "{r:?}");
    assert!(r.first_error.is_some());
    assert_eq!(k.paired_len().unwrap(), cap);
    // A smaller set afterwards: the extra keys leave first, so every key fits.
    let fewer: HashSet<SourceKey> = (cap / 2..cap / 2 + cap).map(key).collect();
    let r = k.set_paired(&fewer).unwrap();
    assert_eq!(r.failed, 0, "{r:?}");
    assert_eq!(k.paired_len().unwrap(), cap);
    for i in [cap / 2, cap, cap / 2 + cap - 1] {
        assert!(k.is_paired(&key(i)).unwrap(), "key {i}");
    }
    assert!(!k.is_paired(&key(0)).unwrap());
}

/// The learned paired sources are bounded: past the paired-source map's capacity the least
/// recently seen is evicted (counted), a source seen again is kept, `allowed_sources` are never
/// evicted, and a revoked device's addresses leave the kernel map — shown through the real
/// program in strict mode.
#[test]
fn learned_paired_sources_are_bounded_and_trimmed_on_revoke() {
    if !is_root() {
        eprintln!("SKIPPED: needs root");
        return;
    }
    use gatewayd::filter::Filter;
    let allowed: IpAddr = "10.77.0.1".parse().unwrap();
    let mut config = gatewayd::config::Config::default();
    config.filter.strict = true;
    config.filter.allowed_sources = vec![allowed];
    let metrics = std::sync::Arc::new(gatewayd::metrics::Metrics::new().unwrap());
    let f = Filter::start_detached(
        &config,
        PORT,
        UserspacePolicy::new(),
        metrics.clone(),
        EbpfFilter::load_detached().unwrap(),
    );
    let cap = companion_filter_common::PAIRED_MAX as usize - 1; // one slot is `allowed`
    let ip = |i: usize| {
        let mut a = [0u8; 16];
        a[0] = 0xfd;
        a[12..16].copy_from_slice(&(i as u32).to_be_bytes());
        IpAddr::from(a)
    };
    let (dev_a, dev_b) = ([0xa; 32], [0xb; 32]);
    for i in 0..cap {
        f.learn_paired(ip(i), if i < 100 { dev_a } else { dev_b });
    }
    // Source 5 seen again (and now also from device B): the most recent.
    f.learn_paired(ip(5), dev_b);
    for i in cap..cap + 10 {
        f.learn_paired(ip(i), dev_b);
    }
    let len = f.with_ebpf(|e| e.paired_len().unwrap()).unwrap();
    assert_eq!(len, cap + 1, "the map stays within PAIRED_MAX");
    let paired = |i: IpAddr| {
        f.with_ebpf(|e| e.is_paired(&source_key(i)).unwrap())
            .unwrap()
    };
    // The 11 least recently seen but source 5 were evicted: 0..=10 without 5.
    for i in (0..=10).filter(|i| *i != 5) {
        assert!(!paired(ip(i)), "{i} evicted");
    }
    assert!(paired(ip(5)) && paired(ip(11)) && paired(ip(cap + 9)) && paired(allowed));
    assert_eq!(f.status().paired_evicted, 10);
    assert_eq!(metrics.filter_paired_evictions.get(), 10);
    assert_eq!(metrics.filter_paired_sync_failures.get(), 0);

    // Revoking device A: its addresses (11..100) leave; 5 stays (device B too).
    assert_eq!(f.forget_device(&dev_a), 89);
    for i in [11, 50, 99] {
        assert!(!paired(ip(i)), "{i} revoked");
    }
    assert!(paired(ip(5)) && paired(ip(100)) && paired(allowed));

    // Through the program: strict mode, window closed.
    let send = |i: IpAddr| {
        let l3 = match i {
            IpAddr::V4(a) => L3::V4(a.octets()),
            IpAddr::V6(a) => L3::V6(a.octets()),
        };
        f.with_ebpf(|e| e.test_run(false, &frame(&pkt(l3, initial(1200)))).unwrap())
            .unwrap()
    };
    assert!(send(ip(5)), "learned, seen again");
    assert!(send(allowed), "allowed_sources");
    assert!(!send(ip(50)), "revoked device's address");
    assert!(!send(ip(0)), "evicted address");
    assert!(send(ip(cap + 9)), "newest");
}
