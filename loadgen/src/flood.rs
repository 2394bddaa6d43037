//! `loadgen flood`: a bounded UDP flood at gatewayd's QUIC port, to exercise the LAN filter.
//!
//! Patterns: `junk` (random datagrams, never QUIC long headers), `short-initial` (QUIC v1
//! Initials padded to far less than 1200 bytes, dropped by the filter per RFC 9000 §14.1) and
//! `initial` (well-formed 1200-byte Initials with random connection IDs — each one costs the
//! server an Initial key derivation and a failed decryption unless the filter's token bucket
//! stops it), sent from one or many source addresses. Sends go through `tokio-uring`, a batch of
//! send operations submitted together per round.
//!
//! Safety rule (enforced, not advisory): the target must be a loopback address, or the flood
//! must run inside a network namespace other than the host's (e.g. one a test created with
//! `ip netns add`) AND be given `--allow-target`. Many sources are "spoofed" honestly: each is
//! an address assigned to the namespace's interface, and the flood binds a socket to each —
//! no raw sockets. Every flood is bounded by `--count` and `--duration` (at most 300 s).

use std::net::{IpAddr, SocketAddr};
use std::rc::Rc;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use serde::Serialize;

/// Longest flood allowed, whatever `--duration` says.
pub const MAX_DURATION: Duration = Duration::from_secs(300);

/// What the datagrams look like.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Pattern {
    /// Random bytes: not QUIC at all.
    Junk,
    /// QUIC Initials below the 1200-byte minimum (RFC 9000 §14.1).
    ShortInitial,
    /// Full-size QUIC Initials with a random connection ID.
    Initial,
}

impl std::str::FromStr for Pattern {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "junk" => Ok(Pattern::Junk),
            "short-initial" => Ok(Pattern::ShortInitial),
            "initial" => Ok(Pattern::Initial),
            _ => Err(format!(
                "unknown pattern {s:?} (junk, short-initial, initial)"
            )),
        }
    }
}

/// A flood to run.
#[derive(Debug, Clone)]
pub struct FloodOptions {
    /// Where the datagrams go.
    pub target: SocketAddr,
    /// What the datagrams look like.
    pub pattern: Pattern,
    /// Source addresses to send from (empty: the kernel's choice).
    pub sources: Vec<IpAddr>,
    /// Datagrams per second over all sources; 0 = as fast as possible.
    pub rate: u64,
    /// Most datagrams to send.
    pub count: u64,
    /// Longest run.
    pub duration: Duration,
    /// Send operations submitted together.
    pub batch: usize,
    /// The caller asked for a non-loopback target (`--allow-target`).
    pub allow_target: bool,
}

/// What was sent.
#[derive(Debug, Clone, Serialize)]
pub struct FloodReport {
    /// Where the datagrams went.
    pub target: String,
    /// What the datagrams looked like.
    pub pattern: Pattern,
    /// Source addresses sent from (1 for the kernel's choice).
    pub sources: usize,
    /// Datagrams the kernel accepted.
    pub sent: u64,
    /// Sends the kernel refused (full buffers, unreachable).
    pub send_errors: u64,
    /// Payload bytes sent.
    pub bytes: u64,
    /// Length of the run, seconds.
    pub elapsed_s: f64,
    /// Datagrams sent per second.
    pub pps: f64,
}

impl FloodReport {
    /// The one-line human summary.
    pub fn human(&self) -> String {
        format!(
            "flood {:?} -> {} from {} source(s): {} datagrams ({} bytes, {} send errors) in {:.2}s = {:.0} pps\n",
            self.pattern,
            self.target,
            self.sources.max(1),
            self.sent,
            self.bytes,
            self.send_errors,
            self.elapsed_s,
            self.pps
        )
    }
}

/// The inode of a process's network namespace.
fn netns_inode(pid: &str) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(format!("/proc/{pid}/ns/net"))
        .ok()
        .map(|m| m.ino())
}

/// Whether this process runs in a named network namespace (`ip netns add`, listed in
/// `/run/netns`) — the kind a test creates — rather than the host's.
pub fn in_separate_netns() -> bool {
    use std::os::unix::fs::MetadataExt;
    let Some(me) = netns_inode("self") else {
        return false;
    };
    let named = std::fs::read_dir("/run/netns")
        .map(|d| {
            d.filter_map(Result::ok)
                .filter_map(|e| std::fs::metadata(e.path()).ok())
                .any(|m| m.ino() == me)
        })
        .unwrap_or(false);
    named && netns_inode("1") != Some(me)
}

/// The targeting rule (see the module docs).
pub fn check_target(
    target: IpAddr,
    allow_target: bool,
    separate_netns: bool,
) -> anyhow::Result<()> {
    let loopback = match target {
        IpAddr::V4(a) => a.is_loopback(),
        IpAddr::V6(a) => a.is_loopback() || a.to_ipv4_mapped().is_some_and(|m| m.is_loopback()),
    };
    if loopback {
        return Ok(());
    }
    if !allow_target {
        bail!(
            "refusing to flood {target}: only loopback targets are allowed without --allow-target"
        );
    }
    if !separate_netns {
        bail!(
            "refusing to flood {target}: a non-loopback target is allowed only from inside a test \
             network namespace (run with `ip netns exec <ns> loadgen flood ...`)"
        );
    }
    Ok(())
}

/// Parses `A`, `A,B,C` or `A-B` (IPv4 last-octet range, or IPv6 last-16-bit range).
pub fn parse_sources(spec: &str) -> anyhow::Result<Vec<IpAddr>> {
    let mut out = Vec::new();
    for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        if let Some((a, b)) = part.split_once('-') {
            let a: IpAddr = a.trim().parse().with_context(|| format!("source {a:?}"))?;
            let b: IpAddr = b.trim().parse().with_context(|| format!("source {b:?}"))?;
            match (a, b) {
                (IpAddr::V4(a), IpAddr::V4(b)) if a.octets()[..3] == b.octets()[..3] => {
                    let (lo, hi) = (a.octets()[3], b.octets()[3]);
                    if lo > hi {
                        bail!("empty source range {part}");
                    }
                    for x in lo..=hi {
                        let mut o = a.octets();
                        o[3] = x;
                        out.push(IpAddr::from(o));
                    }
                }
                (IpAddr::V6(a), IpAddr::V6(b)) if a.segments()[..7] == b.segments()[..7] => {
                    let (lo, hi) = (a.segments()[7], b.segments()[7]);
                    if lo > hi || hi - lo > 4096 {
                        bail!("bad source range {part}");
                    }
                    for x in lo..=hi {
                        let mut s = a.segments();
                        s[7] = x;
                        out.push(IpAddr::from(s));
                    }
                }
                _ => bail!("source range {part} must stay within one /24 (IPv4) or /112 (IPv6)"),
            }
        } else {
            out.push(part.parse().with_context(|| format!("source {part:?}"))?);
        }
    }
    if out.len() > 4096 {
        bail!("at most 4096 source addresses");
    }
    Ok(out)
}

/// A tiny xorshift generator (datagram contents need no cryptographic randomness).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    fn fill(&mut self, b: &mut [u8]) {
        for c in b.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}

/// One datagram of `pattern`.
pub fn datagram(pattern: Pattern, seed: u64) -> Vec<u8> {
    let mut rng = Rng(seed | 1);
    match pattern {
        Pattern::Junk => {
            let len = 20 + (rng.next() % 1000) as usize;
            let mut d = vec![0u8; len];
            rng.fill(&mut d);
            d[0] &= 0x7f; // never a long header: junk, not an Initial
            d
        }
        Pattern::ShortInitial => initial_packet(&mut rng, 200),
        Pattern::Initial => initial_packet(&mut rng, 1200),
    }
}

/// A QUIC v1 Initial of `total` bytes: long header, random 8-byte DCID/SCID, no token, a
/// 2-byte length, and a random (undecryptable) protected payload.
fn initial_packet(rng: &mut Rng, total: usize) -> Vec<u8> {
    let mut d = Vec::with_capacity(total);
    d.push(0xc3); // long header, fixed bit, Initial, 4-byte packet number
    d.extend_from_slice(&1u32.to_be_bytes());
    for _ in 0..2 {
        d.push(8);
        let mut cid = [0u8; 8];
        rng.fill(&mut cid);
        d.extend_from_slice(&cid);
    }
    d.push(0); // token length
    let rest = total - d.len() - 2;
    d.extend_from_slice(&(0x4000u16 | rest as u16).to_be_bytes());
    let mut body = vec![0u8; rest];
    rng.fill(&mut body);
    d.extend_from_slice(&body);
    d
}

/// Runs the flood on a tokio-uring runtime of its own (on a fresh thread, so it can be called
/// from inside a tokio runtime too).
pub fn flood(opts: FloodOptions) -> anyhow::Result<FloodReport> {
    check_target(opts.target.ip(), opts.allow_target, in_separate_netns())?;
    if opts.duration.is_zero() || opts.duration > MAX_DURATION {
        bail!(
            "--duration must be between 1s and {}s",
            MAX_DURATION.as_secs()
        );
    }
    if opts.count == 0 {
        bail!("--count must be at least 1");
    }
    std::thread::spawn(move || tokio_uring::start(run(opts)))
        .join()
        .map_err(|_| anyhow!("the flood thread failed"))?
}

async fn run(opts: FloodOptions) -> anyhow::Result<FloodReport> {
    let unspecified: IpAddr = if opts.target.is_ipv4() {
        [0, 0, 0, 0].into()
    } else {
        std::net::Ipv6Addr::UNSPECIFIED.into()
    };
    let sources = if opts.sources.is_empty() {
        vec![unspecified]
    } else {
        opts.sources.clone()
    };
    let mut sockets = Vec::with_capacity(sources.len());
    for s in &sources {
        let sock = tokio_uring::net::UdpSocket::bind(SocketAddr::new(*s, 0))
            .await
            .with_context(|| format!("binding a flood socket to {s} (is it assigned here?)"))?;
        sockets.push(Rc::new(sock));
    }
    // A small pool of distinct datagrams, reused round-robin.
    let pool: Vec<Rc<Vec<u8>>> = (0..64u64)
        .map(|i| {
            Rc::new(datagram(
                opts.pattern,
                0x9e37_79b9_7f4a_7c15 ^ ((i + 1) * 7919),
            ))
        })
        .collect();
    let batch = opts.batch.clamp(1, 1024);
    let start = Instant::now();
    let (mut sent, mut errors, mut bytes, mut n) = (0u64, 0u64, 0u64, 0usize);
    while sent + errors < opts.count && start.elapsed() < opts.duration {
        if opts.rate > 0 {
            // Pace: do not get ahead of rate × elapsed.
            let due = (start.elapsed().as_secs_f64() * opts.rate as f64) as u64;
            if sent + errors >= due {
                let ahead = (sent + errors + 1) as f64 / opts.rate as f64;
                let wait = Duration::from_secs_f64(ahead).saturating_sub(start.elapsed());
                std::thread::sleep(wait.min(Duration::from_millis(10)));
                continue;
            }
        }
        let this = (opts.count - sent - errors).min(batch as u64) as usize;
        let mut handles = Vec::with_capacity(this);
        for _ in 0..this {
            let sock = sockets[n % sockets.len()].clone();
            let buf: Vec<u8> = pool[n % pool.len()].as_ref().clone();
            n += 1;
            let target = opts.target;
            handles.push(tokio_uring::spawn(async move {
                let (r, _buf) = sock.send_to(buf, target).await;
                r
            }));
        }
        for h in handles {
            match h.await {
                Ok(Ok(len)) => {
                    sent += 1;
                    bytes += len as u64;
                }
                _ => errors += 1,
            }
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    Ok(FloodReport {
        target: opts.target.to_string(),
        pattern: opts.pattern,
        sources: opts.sources.len(),
        sent,
        send_errors: errors,
        bytes,
        elapsed_s: elapsed,
        pps: if elapsed > 0.0 {
            sent as f64 / elapsed
        } else {
            0.0
        },
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn targets_outside_loopback_need_a_namespace_and_the_flag() {
        assert!(check_target("127.0.0.1".parse().unwrap(), false, false).is_ok());
        assert!(check_target("::1".parse().unwrap(), false, false).is_ok());
        assert!(check_target("10.1.2.3".parse().unwrap(), false, true).is_err());
        assert!(check_target("10.1.2.3".parse().unwrap(), true, false).is_err());
        assert!(check_target("10.1.2.3".parse().unwrap(), true, true).is_ok());
    }

    #[test]
    fn patterns() {
        let i = datagram(Pattern::Initial, 1);
        assert_eq!(i.len(), 1200);
        assert_eq!(i[0] & 0xb0, 0x80);
        assert_eq!(&i[1..5], &[0, 0, 0, 1]);
        let s = datagram(Pattern::ShortInitial, 2);
        assert_eq!(s.len(), 200);
        assert_eq!(s[0], 0xc3);
        let j = datagram(Pattern::Junk, 3);
        assert_eq!(j[0] & 0x80, 0);
    }

    #[test]
    fn source_ranges() {
        let v = parse_sources("10.0.0.1-10.0.0.3,fd00::1").unwrap();
        assert_eq!(v.len(), 4);
        assert!(parse_sources("10.0.0.3-10.0.1.3").is_err());
    }

    #[test]
    fn loopback_flood_is_bounded_in_count() {
        let sink = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let r = flood(FloodOptions {
            target: sink.local_addr().unwrap(),
            pattern: Pattern::Initial,
            sources: vec![],
            rate: 0,
            count: 500,
            duration: Duration::from_secs(5),
            batch: 64,
            allow_target: false,
        })
        .unwrap();
        assert_eq!(r.sent + r.send_errors, 500);
        assert!(r.sent > 0);
        // Rate control: 200 pps for 100 datagrams takes about half a second.
        let r = flood(FloodOptions {
            target: sink.local_addr().unwrap(),
            pattern: Pattern::Junk,
            sources: vec![],
            rate: 200,
            count: 100,
            duration: Duration::from_secs(5),
            batch: 16,
            allow_target: false,
        })
        .unwrap();
        assert_eq!(r.sent, 100);
        assert!(r.elapsed_s > 0.35, "{}", r.elapsed_s);
        // A non-loopback target is refused outside a test namespace.
        let e = flood(FloodOptions {
            target: "192.0.2.1:4433".parse().unwrap(),
            pattern: Pattern::Junk,
            sources: vec![],
            rate: 0,
            count: 1,
            duration: Duration::from_secs(1),
            batch: 1,
            allow_target: false,
        })
        .unwrap_err();
        assert!(e.to_string().contains("refusing"), "{e}");
    }
}

/// `loadgen flood` arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct FloodArgs {
    /// Target `ip:port` (gatewayd's device QUIC port). Loopback, or — with --allow-target — an
    /// address reached from inside a test network namespace.
    #[arg(long)]
    pub target: SocketAddr,
    /// junk | short-initial | initial
    #[arg(long, default_value = "initial")]
    pub pattern: Pattern,
    /// Source addresses, each assigned to a local interface: `A`, `A,B`, `A-B` (last octet).
    #[arg(long)]
    pub sources: Option<String>,
    /// Datagrams per second over all sources (0 = as fast as possible).
    #[arg(long, default_value_t = 0)]
    pub rate: u64,
    /// Most datagrams to send.
    #[arg(long, default_value_t = 100_000)]
    pub count: u64,
    /// Longest run, seconds (at most 300).
    #[arg(long, default_value_t = 10)]
    pub duration: u64,
    /// Send operations submitted to io_uring together.
    #[arg(long, default_value_t = 64)]
    pub batch: usize,
    /// Allow a non-loopback target (also requires running inside a test network namespace).
    #[arg(long)]
    pub allow_target: bool,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Runs `loadgen flood`; prints the report.
pub fn main(args: FloodArgs) -> anyhow::Result<bool> {
    let sources = match &args.sources {
        Some(s) => parse_sources(s)?,
        None => Vec::new(),
    };
    let report = flood(FloodOptions {
        target: args.target,
        pattern: args.pattern,
        sources,
        rate: args.rate,
        count: args.count,
        duration: Duration::from_secs(args.duration),
        batch: args.batch,
        allow_target: args.allow_target,
    })?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{}", report.human());
    }
    Ok(report.sent > 0)
}
