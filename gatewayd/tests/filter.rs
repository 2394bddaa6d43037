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
    }
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
            f.extend_from_slice(&[0, 1, 0x40, 0, 64, p.proto, 0, 0]);
            f.extend_from_slice(&src);
            f.extend_from_slice(&[10, 99, 0, 254]);
        }
        L3::V6(src) | L3::V6Hbh(src) => {
            let hbh = matches!(p.l3, L3::V6Hbh(_));
            let plen = (l4.len() + if hbh { 8 } else { 0 }) as u16;
            f.extend_from_slice(&[0x60, 0, 0, 0]);
            f.extend_from_slice(&plen.to_be_bytes());
            f.push(if hbh { 0 } else { p.proto });
            f.push(64);
            f.extend_from_slice(&src);
            let mut dst = [0u8; 16];
            dst[0] = 0xfd;
            dst[15] = 0xfe;
            f.extend_from_slice(&dst);
            if hbh {
                f.extend_from_slice(&[p.proto, 0, 1, 4, 0, 0, 0, 0]); // PadN
            }
        }
    }
    f.extend_from_slice(&l4);
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
    fn counters(&mut self) -> [u64; 5];
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
    fn counters(&mut self) -> [u64; 5] {
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
                self.0.set_paired(&keys).unwrap()
            }
            Setup::Sleep(d) => std::thread::sleep(*d),
        }
    }
    fn send(&mut self, frame: &[u8]) -> bool {
        self.0.test_run(self.1, frame).unwrap()
    }
    fn counters(&mut self) -> [u64; 5] {
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
                Send(pkt(v4(1), initial(1200)), Want::Is(Reason::Passed)),
                Send(
                    pkt(v4(1), initial(1199)),
                    Want::Is(Reason::DroppedShortInitial),
                ),
                Send(pkt(v6(1), initial(1350)), Want::Is(Reason::Passed)),
                Send(
                    pkt(v6(1), initial(40)),
                    Want::Is(Reason::DroppedShortInitial),
                ),
                Send(
                    pkt(L3::V6Hbh(hbh), initial(40)),
                    Want::Is(Reason::DroppedShortInitial),
                ),
                Send(pkt(L3::V6Hbh(hbh), initial(1200)), Want::Is(Reason::Passed)),
            ],
        ),
        (
            "VLAN-tagged frames (802.1Q, 802.1ad QinQ) are parsed",
            vec![
                S(Setup::Config(open)),
                Send(vlan_q, Want::Is(Reason::DroppedShortInitial)),
                Send(vlan_qinq, Want::Is(Reason::DroppedShortInitial)),
                Send(vlan_ok, Want::Is(Reason::Passed)),
            ],
        ),
        (
            "non-UDP and other ports pass untouched; short non-Initial QUIC packets pass",
            vec![
                S(Setup::Config(open)),
                Send(tcp, Want::NotOurs),
                Send(other_port, Want::NotOurs),
                Send(other_port6, Want::NotOurs),
                Send(pkt(v4(6), short_header(40)), Want::Is(Reason::Passed)),
                Send(pkt(v4(6), handshake(80)), Want::Is(Reason::Passed)),
                Send(pkt(v4(6), vec![]), Want::Is(Reason::Passed)),
            ],
        ),
        (
            "token bucket: burst 3 per source, then rate-limited; other sources unaffected; \
             non-Initials never limited",
            vec![
                S(Setup::Config(cfg(1, 3, false, false))),
                Send(pkt(v4(7), initial(1200)), Want::Is(Reason::Passed)),
                Send(pkt(v4(7), initial(1200)), Want::Is(Reason::Passed)),
                Send(pkt(v4(7), initial(1200)), Want::Is(Reason::Passed)),
                Send(pkt(v4(7), initial(1200)), Want::Is(Reason::RateLimited)),
                Send(pkt(v4(7), initial(1200)), Want::Is(Reason::RateLimited)),
                Send(pkt(v4(7), short_header(100)), Want::Is(Reason::Passed)),
                Send(pkt(v6(7), initial(1200)), Want::Is(Reason::Passed)),
                // Short Initials are dropped before they cost a token.
                Send(
                    pkt(v4(8), initial(100)),
                    Want::Is(Reason::DroppedShortInitial),
                ),
                S(Setup::Config(cfg(20, 1, false, false))),
                Send(pkt(v4(9), initial(1200)), Want::Is(Reason::Passed)),
                Send(pkt(v4(9), initial(1200)), Want::Is(Reason::RateLimited)),
                S(Setup::Sleep(Duration::from_millis(120))), // 20/s: 2.4 tokens, capped at 1
                Send(pkt(v4(9), initial(1200)), Want::Is(Reason::Passed)),
                Send(pkt(v4(9), initial(1200)), Want::Is(Reason::RateLimited)),
            ],
        ),
        (
            "deny list: every packet to the port dropped while blocked; expiry; unblock",
            vec![
                S(Setup::Config(open)),
                S(Setup::Deny(src_ip(v4(10)), None)),
                Send(pkt(v4(10), initial(1200)), Want::Is(Reason::Denied)),
                Send(pkt(v4(10), short_header(50)), Want::Is(Reason::Denied)),
                Send(pkt(v4(11), initial(1200)), Want::Is(Reason::Passed)),
                S(Setup::Undeny(src_ip(v4(10)))),
                Send(pkt(v4(10), initial(1200)), Want::Is(Reason::Passed)),
                S(Setup::Deny(src_ip(v6(10)), Some(-1000))), // expired a second ago
                Send(pkt(v6(10), initial(1200)), Want::Is(Reason::Passed)),
                S(Setup::Deny(src_ip(v6(10)), Some(150))),
                Send(pkt(v6(10), initial(1200)), Want::Is(Reason::Denied)),
                S(Setup::Sleep(Duration::from_millis(200))),
                Send(pkt(v6(10), initial(1200)), Want::Is(Reason::Passed)),
                // Deny wins over everything else, even for other traffic to the port.
                S(Setup::Deny(src_ip(v4(12)), None)),
                Send(pkt(v4(12), initial(10)), Want::Is(Reason::Denied)),
            ],
        ),
        (
            "strict mode: only paired sources, unless the pairing window is open",
            vec![
                S(Setup::Config(cfg(0, 0, true, false))),
                S(Setup::Paired(vec![src_ip(v4(20)), src_ip(v6(20))])),
                Send(pkt(v4(20), initial(1200)), Want::Is(Reason::Passed)),
                Send(pkt(v6(20), short_header(60)), Want::Is(Reason::Passed)),
                Send(pkt(v4(21), initial(1200)), Want::Is(Reason::NotPaired)),
                Send(pkt(v4(21), short_header(60)), Want::Is(Reason::NotPaired)),
                S(Setup::Config(cfg(0, 0, true, true))),
                Send(pkt(v4(21), initial(1200)), Want::Is(Reason::Passed)),
                Send(
                    pkt(v4(21), initial(300)),
                    Want::Is(Reason::DroppedShortInitial),
                ),
                S(Setup::Config(cfg(0, 0, true, false))),
                S(Setup::Paired(vec![src_ip(v6(20))])),
                Send(pkt(v4(20), initial(1200)), Want::Is(Reason::NotPaired)),
                // Deny is checked before pairing.
                S(Setup::Deny(src_ip(v6(20)), None)),
                Send(pkt(v6(20), initial(1200)), Want::Is(Reason::Denied)),
            ],
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
