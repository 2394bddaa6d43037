//! The LAN filter on real interfaces: network namespaces and veth pairs, the real `gatewayd`
//! (with the real `cn-backend`) in one namespace with the filter attached to its LAN side,
//! `loadgen flood` from an attacker namespace (50 source addresses), honest devices
//! (`loadgen provision`) from a device namespace — once with XDP, once in userspace-fallback
//! mode (and once with the TC ingress variant). Shows that the counters account for the flood and every honest device gets its
//! credential; prints the figures (flood pps, per-reason counts, honest success rate).
//! Also: a blocked IPv6 source behind IPv6 extension headers (issue 15 item 4) cannot reach
//! gatewayd's socket through the XDP filter.
//!
//! Needs root (namespaces, XDP); skips with a visible message otherwise. Namespaces are
//! removed even when the test fails (guard). Traffic only goes to addresses inside the
//! namespaces the test creates.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use companion_testkit::net::static_neighbour;
use companion_testkit::{CnServer, cn};

mod common;
use common::*;

fn is_root() -> bool {
    nix::unistd::Uid::effective().is_root()
}

fn sh(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Network namespaces removed on drop (also when the test panics).
struct Netns(Vec<String>);

impl Drop for Netns {
    fn drop(&mut self) {
        for n in &self.0 {
            let _ = Command::new("ip").args(["netns", "del", n]).status();
        }
    }
}

/// gw ⟷ dev on 10.201.0.0/24, gw ⟷ atk on 10.202.0.0/24 (attacker sources .10 to .59).
fn topology(tag: &str) -> (Netns, [String; 3]) {
    let gw = format!("fgw{tag}");
    let dev = format!("fdev{tag}");
    let atk = format!("fatk{tag}");
    let guard = Netns(vec![gw.clone(), dev.clone(), atk.clone()]);
    for n in &guard.0 {
        let _ = Command::new("ip")
            .args(["netns", "del", n])
            .stderr(Stdio::null())
            .status();
        sh(&["ip", "netns", "add", n]);
        sh(&["ip", "-n", n, "link", "set", "lo", "up"]);
    }
    let pairs = [
        (
            "vd",
            &dev,
            "02:00:00:00:01:01",
            "02:00:00:00:01:02",
            "10.201.0",
        ),
        (
            "va",
            &atk,
            "02:00:00:00:02:01",
            "02:00:00:00:02:02",
            "10.202.0",
        ),
    ];
    for (name, peer_ns, gw_mac, peer_mac, net) in pairs {
        sh(&[
            "ip", "-n", &gw, "link", "add", name, "address", gw_mac, "type", "veth", "peer",
            "name", "eth0", "address", peer_mac, "netns", peer_ns,
        ]);
        sh(&[
            "ip",
            "-n",
            &gw,
            "addr",
            "add",
            &format!("{net}.1/24"),
            "dev",
            name,
        ]);
        sh(&["ip", "-n", &gw, "link", "set", name, "up"]);
        sh(&[
            "ip",
            "-n",
            peer_ns,
            "addr",
            "add",
            &format!("{net}.2/24"),
            "dev",
            "eth0",
        ]);
        sh(&["ip", "-n", peer_ns, "link", "set", "eth0", "up"]);
        // Static neighbours: the XDP program never sees ARP resolution trouble.
        static_neighbour(peer_ns, &format!("{net}.1"), gw_mac, "eth0").unwrap();
        static_neighbour(&gw, &format!("{net}.2"), peer_mac, name).unwrap();
    }
    for i in 10..60 {
        sh(&[
            "ip",
            "-n",
            &atk,
            "addr",
            "add",
            &format!("10.202.0.{i}/24"),
            "dev",
            "eth0",
        ]);
    }
    (guard, [gw, dev, atk])
}

fn start_cn(ns: &str, dir: &Path) -> (CnServer, String) {
    init_cn_dir(dir, 1000);
    let ready = dir.join("ready.json");
    let cmd = cn::serve_command(&bins(), dir, "127.0.0.1:0", &ready, Some(ns));
    let s = CnServer::start(dir, cmd, &ready, &dir.with_extension("log")).unwrap();
    let quic = s.quic.clone();
    (s, quic)
}

fn start_gw(ns: &str, dir: &Path, cn: &str, cn_dir: &Path, filter: &str) -> (Proc, PathBuf) {
    start_gw_on(ns, dir, cn, cn_dir, filter, "0.0.0.0:4433")
}

/// `GATEWAYD_BIN` runs another build of gatewayd (before/after measurements).
fn start_gw_on(
    ns: &str,
    dir: &Path,
    cn: &str,
    cn_dir: &Path,
    filter: &str,
    listen: &str,
) -> (Proc, PathBuf) {
    let mut toml = gw_toml(dir, cn, cn_dir);
    toml.top = "log_level = \"info\"\ndrain_timeout = \"3s\"";
    toml.listen = listen;
    toml.devices = "new_connections_per_ip = 0";
    toml.cn = "reconnect_min = \"100ms\"\nreconnect_max = \"500ms\"\nrequest_timeout = \"5s\"";
    let tables = format!("[filter]\n{filter}");
    toml.tables = &tables;
    let g = spawn_gw(&toml, Some(ns), &[]);
    (g.proc, g.control)
}

fn status(control: &Path) -> serde_json::Value {
    ctl_status(control)
}

fn wait_cn_up(control: &Path) {
    wait_cn(control, "up", Duration::from_secs(30));
}

fn flood(ns: &str, pattern: &str, sources: Option<&str>, count: u64, secs: u64) -> Child {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns])
        .arg(bin("loadgen"))
        .args([
            "flood",
            "--target",
            "10.202.0.1:4433",
            "--allow-target",
            "--json",
        ])
        .args(["--pattern", pattern, "--count", &count.to_string()])
        .args(["--duration", &secs.to_string(), "--batch", "64"]);
    if let Some(s) = sources {
        c.args(["--sources", s]);
    }
    c.stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn flood_report(c: Child) -> serde_json::Value {
    let out = c.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "flood: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn counters(control: &Path) -> serde_json::Value {
    status(control)["filter"]["counters"].clone()
}

fn n(v: &serde_json::Value, k: &str) -> u64 {
    v[k].as_u64().unwrap_or(0)
}

/// One scenario: returns the summary line.
fn scenario(mode: &str, filter_cfg: &str, expect_mode: &[&str]) -> String {
    let tag = format!("{}{}", std::process::id() % 100_000, &mode[..1]);
    let (_ns, [gw, dev, atk]) = topology(&tag);
    let tmp = scratch();
    let cn_dir = tmp.path().join("cn");
    let (_cn, cn_addr) = start_cn(&gw, &cn_dir);
    let (mut gw_proc, control) =
        start_gw(&gw, &tmp.path().join("gw"), &cn_addr, &cn_dir, filter_cfg);
    wait_cn_up(&control);
    let st = status(&control);
    let got_mode = st["filter"]["mode"].as_str().unwrap().to_string();
    assert!(
        expect_mode.contains(&got_mode.as_str()),
        "{mode}: filter mode {got_mode}, expected one of {expect_mode:?}: {st}"
    );
    let before = counters(&control);

    // 1. Short Initials and junk: dropped / passed by reason.
    let short = flood_report(flood(
        &atk,
        "short-initial",
        Some("10.202.0.10-10.202.0.19"),
        2000,
        10,
    ));
    let junk = flood_report(flood(&atk, "junk", None, 1000, 10));
    std::thread::sleep(Duration::from_millis(700));
    let mid = counters(&control);
    let short_dropped = n(&mid, "dropped_short_initial") - n(&before, "dropped_short_initial");

    // 2. Well-formed Initials from 50 sources while honest devices provision.
    let flood_child = flood(&atk, "initial", Some("10.202.0.10-10.202.0.59"), 300_000, 8);
    std::thread::sleep(Duration::from_millis(300));
    let report_path = tmp.path().join("provision.json");
    let devices = 30;
    let out = Command::new("ip")
        .args(["netns", "exec", &dev])
        .arg(bin("loadgen"))
        .args([
            "provision",
            "--devices",
            &devices.to_string(),
            "--concurrency",
            "10",
        ])
        .args(["--gateway", "10.201.0.1:4433", "--control-socket"])
        .arg(&control)
        .args([
            "--progress",
            "never",
            "--retry-for",
            "60",
            "--patience",
            "30",
            "--json",
        ])
        .arg(&report_path)
        .output()
        .unwrap();
    let init = flood_report(flood_child);
    std::thread::sleep(Duration::from_millis(700));
    let after = counters(&control);
    let provision: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report_path).unwrap_or_default())
            .unwrap_or_else(|_| {
                panic!(
                    "loadgen provision produced no report: {}",
                    String::from_utf8_lossy(&out.stderr)
                )
            });
    let ok = n(&provision, "succeeded");
    let rate_limited = n(&after, "rate_limited") - n(&mid, "rate_limited");
    let passed = n(&after, "passed") - n(&mid, "passed");
    // Sources whose admitted Initials failed their handshakes are blocked automatically.
    let denied = n(&after, "denied") - n(&mid, "denied");
    let sent = n(&init, "sent");
    let counted = rate_limited + passed + denied;
    let line = format!(
        "{mode}: mode={got_mode}; short-Initial flood {} sent / {} dropped_short_initial; junk {} sent; \
         Initial flood {} sent at {:.0} pps from 50 sources: {} rate_limited, {} denied (auto-blocked), \
         {} passed ({:.1}% of the flood counted, {:.1}% dropped); honest devices {}/{} provisioned ({:.0}%)",
        n(&short, "sent"),
        short_dropped,
        n(&junk, "sent"),
        sent,
        init["pps"].as_f64().unwrap_or(0.0),
        rate_limited,
        denied,
        passed,
        100.0 * counted as f64 / sent.max(1) as f64,
        100.0 * (rate_limited + denied) as f64 / sent.max(1) as f64,
        ok,
        devices,
        100.0 * ok as f64 / devices as f64,
    );
    eprintln!("FILTER RESULT {line}");
    let log = std::fs::read_to_string(tmp.path().join("gw/gatewayd.log")).unwrap_or_default();
    for l in log
        .lines()
        .filter(|l| l.contains("LAN filter") || l.contains("source blocked"))
        .take(4)
    {
        eprintln!("  gatewayd log: {l}");
    }
    for l in log
        .lines()
        .filter(|l| l.contains("handshake failed"))
        .take(2)
    {
        eprintln!("  gatewayd log: {l}");
    }
    assert_eq!(
        ok, devices,
        "{mode}: every honest device gets its credential: {provision}"
    );
    assert!(
        rate_limited > 0,
        "{mode}: the Initial flood is rate-limited: {after}"
    );
    // SIGTERM: gatewayd stops cleanly and the program is detached from the interfaces.
    let xdp_attached = |ifname: &str| {
        let out = Command::new("ip")
            .args(["-n", &gw, "link", "show", ifname])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).contains("xdp")
    };
    if mode == "xdp" {
        assert!(
            xdp_attached("vd") && xdp_attached("va"),
            "XDP attached while running"
        );
    }
    sh(&["kill", "-TERM", &gw_proc.child.id().to_string()]);
    let until = Instant::now() + Duration::from_secs(15);
    let code = loop {
        if let Some(s) = gw_proc.child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < until, "gatewayd did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(code.success(), "{mode}: gatewayd exit {code}");
    assert!(
        !xdp_attached("vd") && !xdp_attached("va"),
        "{mode}: XDP detached at stop"
    );
    if mode != "userspace" {
        // In the kernel nothing is lost before the program: every datagram is accounted for.
        assert_eq!(short_dropped, n(&short, "sent"), "{mode}: {mid}");
        assert!(
            counted >= sent,
            "{mode}: {counted} counted < {sent} sent: {after}"
        );
    } else {
        // In userspace the socket buffer may overflow under the flood before the filter sees
        // a datagram; what reaches it is judged.
        assert!(short_dropped > 0, "{mode}: {mid}");
        assert!(
            counted > sent / 10,
            "{mode}: {counted} counted of {sent} sent: {after}"
        );
    }
    line
}

#[test]
fn flood_is_absorbed_and_honest_devices_are_served_xdp_and_userspace() {
    if !is_root() {
        eprintln!("SKIPPED: the namespace/XDP test needs root (CI runs it as root)");
        return;
    }
    let filter = "initial_rate = 20\ninitial_burst = 40\n";
    let xdp = scenario(
        "xdp",
        &format!("mode = \"xdp\"\ninterfaces = [\"vd\", \"va\"]\n{filter}"),
        &["xdp", "xdp_generic"],
    );
    let tc = scenario(
        "tc",
        &format!("mode = \"tc\"\ninterfaces = [\"vd\", \"va\"]\n{filter}"),
        &["tc"],
    );
    let user = scenario(
        "userspace",
        &format!("mode = \"userspace\"\n{filter}"),
        &["userspace"],
    );
    eprintln!("\nFILTER SUMMARY\n  {xdp}\n  {tc}\n  {user}\n");
}

/// Udp6InDatagrams of a namespace: UDP datagrams over IPv6 the kernel delivered to a socket.
fn udp6_in(ns: &str) -> u64 {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "cat", "/proc/net/snmp6"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.strip_prefix("Udp6InDatagrams"))
        .map(|v| v.trim().parse().unwrap())
        .unwrap()
}

/// An IPv6 packet (header included) from `src` to `dst`: `n_opts` Destination Options headers
/// of 8 bytes (PadN), then UDP to port 4433 with a correct checksum and a 1200-byte QUIC
/// Initial-looking payload.
fn dest_opts_packet(src: [u8; 16], dst: [u8; 16], n_opts: usize) -> Vec<u8> {
    let mut payload = vec![0u8; 1200];
    payload[0] = 0xc3;
    payload[1..5].copy_from_slice(&1u32.to_be_bytes());
    let ulen = (8 + payload.len()) as u16;
    let mut udp = Vec::new();
    udp.extend_from_slice(&40000u16.to_be_bytes());
    udp.extend_from_slice(&4433u16.to_be_bytes());
    udp.extend_from_slice(&ulen.to_be_bytes());
    udp.extend_from_slice(&[0, 0]);
    udp.extend_from_slice(&payload);
    // RFC 8200 §8.1 pseudo-header: src, dst, upper-layer length, next header 17.
    let mut sum: u32 = 0;
    let mut add = |b: &[u8]| {
        for c in b.chunks(2) {
            sum += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
        }
    };
    add(&src);
    add(&dst);
    add(&u32::from(ulen).to_be_bytes());
    add(&[0, 0, 0, 17]);
    add(&udp);
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    let ck = match !(sum as u16) {
        0 => 0xffff,
        c => c,
    };
    udp[6..8].copy_from_slice(&ck.to_be_bytes());
    let mut p = vec![0x60, 0, 0, 0];
    p.extend_from_slice(&((udp.len() + 8 * n_opts) as u16).to_be_bytes());
    p.push(if n_opts > 0 { 60 } else { 17 });
    p.push(64);
    p.extend_from_slice(&src);
    p.extend_from_slice(&dst);
    for i in 0..n_opts {
        let next = if i + 1 < n_opts { 60 } else { 17 };
        p.extend_from_slice(&[next, 0, 1, 4, 0, 0, 0, 0]); // PadN
    }
    p.extend_from_slice(&udp);
    p
}

/// Sends `count` copies of `packet` (a whole IPv6 packet) from inside namespace `ns` through an
/// IPPROTO_RAW socket (header included), in a thread that joins the namespace.
fn send_raw6(ns: &str, packet: Vec<u8>, dst: std::net::Ipv6Addr, count: usize) {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        use nix::sys::socket::{
            AddressFamily, MsgFlags, SockFlag, SockProtocol, SockType, SockaddrIn6, sendto, socket,
        };
        use std::os::fd::AsRawFd;
        let f = std::fs::File::open(path).unwrap();
        nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        let s = socket(
            AddressFamily::Inet6,
            SockType::Raw,
            SockFlag::empty(),
            SockProtocol::Raw,
        )
        .unwrap();
        let to = SockaddrIn6::from(std::net::SocketAddrV6::new(dst, 0, 0, 0));
        for _ in 0..count {
            sendto(s.as_raw_fd(), &packet, &to, MsgFlags::empty()).unwrap();
        }
    })
    .join()
    .unwrap();
}

/// Issue 15 item 4, against the real gatewayd with the filter attached (XDP, generic mode on
/// veth): a blocked IPv6 source sends QUIC Initials behind 5 and behind 7 Destination Options
/// headers. Before the fix the program passed both uncounted and the kernel delivered them to
/// gatewayd's socket (Udp6InDatagrams in gatewayd's namespace counts them); now the 5-header
/// packets are judged (denied) and the 7-header ones dropped as unparsed, and none reaches the
/// socket. A normal packet from an unblocked source still does.
#[test]
fn blocked_ipv6_source_cannot_pass_the_xdp_filter_behind_extension_headers() {
    if !is_root() {
        eprintln!("SKIPPED: needs root (namespaces, XDP)");
        return;
    }
    let tag = format!("{}e", std::process::id() % 100_000);
    let (_ns, [gw, _dev, atk]) = topology(&tag);
    for (ns, dev, addr) in [
        (&gw, "va", "fd00:202::1/64"),
        (&atk, "eth0", "fd00:202::2/64"),
    ] {
        sh(&["ip", "-n", ns, "addr", "add", addr, "dev", dev, "nodad"]);
    }
    for (ns, dev, addr) in [(&gw, "va", "fd00:202::3"), (&atk, "eth0", "fd00:202::4")] {
        sh(&[
            "ip",
            "-n",
            ns,
            "addr",
            "add",
            &format!("{addr}/64"),
            "dev",
            dev,
            "nodad",
        ]);
    }
    sh(&[
        "ip",
        "-n",
        &atk,
        "neigh",
        "replace",
        "fd00:202::1",
        "lladdr",
        "02:00:00:00:02:01",
        "dev",
        "eth0",
        "nud",
        "permanent",
    ]);
    let tmp = scratch();
    let cn_dir = tmp.path().join("cn");
    let (_cn, cn_addr) = start_cn(&gw, &cn_dir);
    let (_gw_proc, control) = start_gw_on(
        &gw,
        &tmp.path().join("gw"),
        &cn_addr,
        &cn_dir,
        "mode = \"xdp\"\ninterfaces = [\"va\"]",
        "[::]:4433",
    );
    let st = status(&control);
    assert!(
        st["filter"]["mode"].as_str().unwrap().starts_with("xdp"),
        "{st}"
    );
    let blocked: std::net::Ipv6Addr = "fd00:202::2".parse().unwrap();
    let honest: std::net::Ipv6Addr = "fd00:202::4".parse().unwrap();
    let gw_addr: std::net::Ipv6Addr = "fd00:202::1".parse().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_gatewayctl"))
        .arg("--socket")
        .arg(&control)
        .args(["block", "fd00:202::2"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::thread::sleep(Duration::from_millis(1200)); // the deny list syncs every 500 ms

    let deliver = |src: std::net::Ipv6Addr, opts: usize, count: usize| {
        let before_udp = udp6_in(&gw);
        let before = counters(&control);
        send_raw6(
            &atk,
            dest_opts_packet(src.octets(), gw_addr.octets(), opts),
            gw_addr,
            count,
        );
        std::thread::sleep(Duration::from_millis(1200)); // counters export every 500 ms
        let after = counters(&control);
        let delta = |k: &str| n(&after, k) - n(&before, k);
        let udp = udp6_in(&gw) - before_udp;
        eprintln!(
            "{src} behind {opts} Destination Options x{count}: {udp} delivered to gatewayd's \
             socket; filter counters: denied +{}, dropped_unparsed +{}, passed +{}",
            delta("denied"),
            delta("dropped_unparsed"),
            delta("passed")
        );
        (
            udp,
            delta("denied"),
            delta("dropped_unparsed"),
            delta("passed"),
        )
    };
    let five = deliver(blocked, 5, 1000);
    let seven = deliver(blocked, 7, 1000);
    let normal = deliver(honest, 0, 10);
    if std::env::var_os("GATEWAYD_BIN").is_some() {
        return; // measuring another build: report only
    }
    assert_eq!(
        five,
        (0, 1000, 0, 0),
        "5 Destination Options from a blocked source"
    );
    assert_eq!(
        seven,
        (0, 0, 1000, 0),
        "7 Destination Options from a blocked source"
    );
    assert_eq!(
        normal.0, 10,
        "an honest IPv6 datagram still reaches gatewayd"
    );
    assert_eq!(normal.3, 10);
}
