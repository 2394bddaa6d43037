//! Starting the real binaries for the end-to-end benchmarks, and reading what the kernel knows
//! about them (CPU time, resident memory).

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};

/// The companion's own subscription (TS 35.208 test set 1), as in the demo.
pub const COMPANION_SUPI: &str = "imsi-001010000000001";
pub const COMPANION_K: &str = "465b5ce8b199b49faa5f0a2ee238a6bc";
pub const COMPANION_OPC: &str = "cd63cb71954a9f4e48a5994e37a02baf";

/// Where the release binaries are (`cargo build --release` output).
#[derive(Debug, Clone)]
pub struct Bins {
    pub dir: PathBuf,
}

impl Bins {
    /// Checks that every binary the benchmarks start exists in `dir`.
    pub fn new(dir: &Path) -> anyhow::Result<Self> {
        for b in ["cn-backend", "gatewayd", "gatewayctl", "loadgen"] {
            let p = dir.join(b);
            if !p.exists() {
                bail!(
                    "{} not found: build the release binaries first \
                     (`cargo build --release -p cn-backend -p gatewayd -p loadgen`) or pass --bin-dir",
                    p.display()
                );
            }
        }
        Ok(Self {
            dir: dir.to_path_buf(),
        })
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    pub fn command(&self, name: &str) -> Command {
        Command::new(self.path(name))
    }
}

/// A daemon started by a benchmark: killed (SIGKILL) and reaped when dropped.
#[derive(Debug)]
pub struct Daemon {
    pub name: &'static str,
    pub child: Child,
    pub log: PathBuf,
    /// The daemon's ready file, parsed.
    pub ready: serde_json::Value,
    /// From spawn to the ready file appearing.
    pub start_to_ready: Duration,
}

impl Daemon {
    /// Spawns `cmd` (stderr to `log`) and waits up to 60 s for it to write `ready_file`.
    pub fn spawn(
        name: &'static str,
        cmd: Command,
        ready_file: &Path,
        log: &Path,
    ) -> anyhow::Result<Self> {
        Self::spawn_within(name, cmd, ready_file, log, Duration::from_secs(60))
    }

    /// [`spawn`](Self::spawn), waiting up to `limit` for the ready file.
    pub fn spawn_within(
        name: &'static str,
        mut cmd: Command,
        ready_file: &Path,
        log: &Path,
        limit: Duration,
    ) -> anyhow::Result<Self> {
        let _ = fs::remove_file(ready_file);
        let err = fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let started = Instant::now();
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(err)
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        let until = started + limit;
        loop {
            if let Ok(t) = fs::read_to_string(ready_file)
                && let Ok(ready) = serde_json::from_str::<serde_json::Value>(&t)
            {
                return Ok(Self {
                    name,
                    child,
                    log: log.to_path_buf(),
                    ready,
                    start_to_ready: started.elapsed(),
                });
            }
            if let Ok(Some(status)) = child.try_wait() {
                bail!(
                    "{name} exited before it was ready ({status}); its log:\n{}",
                    tail(log, 30)
                );
            }
            if Instant::now() > until {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "{name} not ready after {limit:?}; its log:\n{}",
                    tail(log, 30)
                );
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// A string field of the ready file (`quic`, `http`, `devices`, `control`, `metrics`).
    pub fn ready_str(&self, key: &str) -> anyhow::Result<String> {
        self.ready[key]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| anyhow!("{}'s ready file has no {key:?}: {}", self.name, self.ready))
    }

    /// CPU time (user + system) the daemon has used so far.
    pub fn cpu(&self) -> anyhow::Result<Duration> {
        cpu_time(self.pid())
    }

    /// Resident set size now, KiB.
    pub fn rss_kib(&self) -> anyhow::Result<u64> {
        status_kib(self.pid(), "VmRSS")
    }

    /// Peak resident set size, KiB.
    pub fn hwm_kib(&self) -> anyhow::Result<u64> {
        status_kib(self.pid(), "VmHWM")
    }

    /// SIGTERM, then up to 30 s for a clean exit (a daemon's final report is written by then)
    /// before the SIGKILL of `Drop`.
    pub fn stop(mut self) -> anyhow::Result<()> {
        let pid = self.pid();
        let _ = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status();
        let until = Instant::now() + Duration::from_secs(30);
        while Instant::now() < until {
            if self.child.try_wait()?.is_some() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The last `n` lines of a log file (for error messages).
pub fn tail(path: &Path, n: usize) -> String {
    let t = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = t.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Clock ticks per second for `/proc/<pid>/stat` (USER_HZ; 100 on every Linux ABI we build for).
const USER_HZ: f64 = 100.0;

/// User + system CPU time of a process (and its reaped children are not included).
pub fn cpu_time(pid: u32) -> anyhow::Result<Duration> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // The command name (field 2) is in parentheses and may hold spaces: split after the last ')'.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or_else(|| anyhow!("unexpected /proc/{pid}/stat: {stat}"))?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After the ')': field 3 (state) is f[0], so utime (14) is f[11] and stime (15) f[12].
    let ticks = |i: usize| -> anyhow::Result<f64> {
        f.get(i)
            .and_then(|s| s.parse::<f64>().ok())
            .ok_or_else(|| anyhow!("unexpected /proc/{pid}/stat: {stat}"))
    };
    Ok(Duration::from_secs_f64((ticks(11)? + ticks(12)?) / USER_HZ))
}

/// User + system CPU time of process `pid` and of its children: the live ones (every process
/// whose parent is `pid`) and the reaped ones (`cutime` + `cstime` of `pid`). For a PostgreSQL
/// server: the postmaster and its backends and auxiliary processes.
pub fn tree_cpu_time(pid: u32) -> anyhow::Result<Duration> {
    let fields = |p: u32| -> Option<Vec<u64>> {
        let stat = fs::read_to_string(format!("/proc/{p}/stat")).ok()?;
        let rest = stat.rsplit_once(')')?.1;
        // After the ')': state f[0], ppid f[1], utime f[11], stime f[12], cutime f[13], cstime f[14].
        let f: Vec<&str> = rest.split_whitespace().collect();
        let n = |i: usize| f.get(i).and_then(|s| s.parse::<u64>().ok());
        Some(vec![n(1)?, n(11)?, n(12)?, n(13)?, n(14)?])
    };
    let root = fields(pid).ok_or_else(|| anyhow!("cannot read /proc/{pid}/stat"))?;
    let mut ticks = root[1] + root[2] + root[3] + root[4];
    for e in fs::read_dir("/proc").context("listing /proc")? {
        let Some(p) = e
            .ok()
            .and_then(|e| e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()))
        else {
            continue;
        };
        // A child that exits meanwhile is skipped here and counted in the parent's cutime.
        if let Some(f) = fields(p)
            && f[0] == u64::from(pid)
        {
            ticks += f[1] + f[2];
        }
    }
    Ok(Duration::from_secs_f64(ticks as f64 / USER_HZ))
}

/// A `kB` line of `/proc/<pid>/status` (`VmRSS`, `VmHWM`).
pub fn status_kib(pid: u32, key: &str) -> anyhow::Result<u64> {
    let s = fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    s.lines()
        .find_map(|l| {
            l.strip_prefix(key)
                .and_then(|r| r.strip_prefix(':'))
                .and_then(|r| r.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .ok_or_else(|| anyhow!("no {key} in /proc/{pid}/status"))
}

/// Runs a command to completion; fails with its stderr when it exits non-zero.
pub fn run(mut cmd: Command, what: &str) -> anyhow::Result<std::process::Output> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("starting {what}"))?;
    if !out.status.success() {
        bail!(
            "{what} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out)
}

/// A cn-backend in its own directory, initialised with the companion subscription.
#[derive(Debug)]
pub struct Cn {
    pub dir: PathBuf,
    pub daemon: Daemon,
}

impl Cn {
    /// `cn-backend init` + the companion subscription (`max_children` children) + `serve` on
    /// loopback ports chosen by the kernel.
    pub fn start(bins: &Bins, dir: &Path, max_children: u64) -> anyhow::Result<Self> {
        Self::start_in(bins, dir, max_children, None)
    }

    /// [`start`](Self::start), serving inside network namespace `netns` when given
    /// (`ip netns exec`; its loopback).
    pub fn start_in(
        bins: &Bins,
        dir: &Path,
        max_children: u64,
        netns: Option<&str>,
    ) -> anyhow::Result<Self> {
        let cn_dir = Self::init(bins, dir, None)?;
        Self::add_companion(
            bins,
            &cn_dir,
            (COMPANION_SUPI, COMPANION_K, COMPANION_OPC),
            max_children,
        )?;
        Self::serve(bins, &cn_dir, dir, netns)
    }

    /// `cn-backend init` into `dir/cn` (on the database of `store`, a `postgres://` URL, when
    /// given; else SQLite), with the bench's allocation limit. Returns the data directory.
    pub fn init(bins: &Bins, dir: &Path, store: Option<&str>) -> anyhow::Result<PathBuf> {
        let cn_dir = dir.join("cn");
        let mut c = bins.command("cn-backend");
        c.arg("--dir")
            .arg(&cn_dir)
            .args(["init", "--mcc", "001", "--mnc", "01"]);
        if let Some(url) = store {
            c.args(["--store", url]);
        }
        run(c, "cn-backend init")?;
        // The benches issue far more than the operator's default cap on new credentials per
        // parent and hour (child_allocation_limit, 10,000): lift it, since a bench is a flood
        // by design. Every key of the generated file is top level, so appending sets it.
        {
            use std::io::Write as _;
            let path = cn_dir.join("cn-backend.toml");
            let mut f = std::fs::OpenOptions::new()
                .append(true)
                .open(&path)
                .with_context(|| format!("opening {}", path.display()))?;
            writeln!(
                f,
                "\n# set by the benches\nchild_allocation_limit = 4000000000"
            )
            .with_context(|| format!("writing {}", path.display()))?;
        }
        Ok(cn_dir)
    }

    /// `cn-backend subscriber add` of a companion `(supi, k, opc)` allowed `max_children`.
    pub fn add_companion(
        bins: &Bins,
        cn_dir: &Path,
        (supi, k, opc): (&str, &str, &str),
        max_children: u64,
    ) -> anyhow::Result<()> {
        let mut c = bins.command("cn-backend");
        c.arg("--dir").arg(cn_dir).args([
            "subscriber",
            "add",
            "--supi",
            supi,
            "--k",
            k,
            "--opc",
            opc,
            "--max-children",
            &max_children.to_string(),
            "--max-lifetime",
            "30d",
        ]);
        run(c, "cn-backend subscriber add")?;
        Ok(())
    }

    /// A copy of the data directory `cn_dir` as `dir/cn` (`cp -a`: another host's copy of a
    /// fleet's directory, same KEK and keys). Returns the copy.
    pub fn copy_dir(cn_dir: &Path, dir: &Path) -> anyhow::Result<PathBuf> {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let copy = dir.join("cn");
        let mut c = Command::new("cp");
        c.arg("-a").arg(cn_dir).arg(&copy);
        run(c, "cp -a of the CN directory")?;
        Ok(copy)
    }

    /// `cn-backend serve` of data directory `cn_dir` on loopback ports chosen by the kernel
    /// (inside network namespace `netns` when given); its ready file and log go in `dir`.
    pub fn serve(
        bins: &Bins,
        cn_dir: &Path,
        dir: &Path,
        netns: Option<&str>,
    ) -> anyhow::Result<Self> {
        let mut c = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(bins.path("cn-backend"));
                c
            }
            None => bins.command("cn-backend"),
        };
        c.arg("--dir").arg(cn_dir).args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
            "--ready-file",
        ]);
        let ready = dir.join("cn-ready.json");
        c.arg(&ready);
        let daemon = Daemon::spawn("cn-backend", c, &ready, &dir.join("cn-backend.log"))?;
        Ok(Self {
            dir: cn_dir.to_path_buf(),
            daemon,
        })
    }

    /// SIGKILL (no drain), then `serve` again on the same data directory and QUIC port (its
    /// HTTP port is new). Returns the instant the new process was ready.
    pub fn kill9_and_restart(&mut self, bins: &Bins) -> anyhow::Result<Instant> {
        let quic = self.quic()?;
        let _ = self.daemon.child.kill();
        let _ = self.daemon.child.wait();
        let parent = self
            .dir
            .parent()
            .ok_or_else(|| anyhow!("the CN directory has no parent"))?;
        let ready = parent.join("cn-ready.json");
        let mut c = bins.command("cn-backend");
        c.arg("--dir").arg(&self.dir).args([
            "serve",
            "--listen",
            &quic,
            "--http-listen",
            "127.0.0.1:0",
            "--ready-file",
        ]);
        c.arg(&ready);
        self.daemon = Daemon::spawn(
            "cn-backend",
            c,
            &ready,
            &parent.join("cn-backend-restarted.log"),
        )?;
        Ok(Instant::now())
    }

    /// The CN's QUIC address (`ip:port`).
    pub fn quic(&self) -> anyhow::Result<String> {
        self.daemon.ready_str("quic")
    }

    /// The operator CA certificate (PEM) the CN's certificate chains to.
    pub fn ca_file(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }
}

/// A gatewayd's settings that the benchmarks vary.
#[derive(Debug, Clone)]
pub struct GatewaySettings {
    /// `[batching] max_batch` (1 = batching off).
    pub max_batch: usize,
    /// `[batching] max_in_flight`.
    pub max_in_flight: usize,
    /// `[devices] max_connections`.
    pub max_connections: usize,
    /// `[filter] mode`.
    pub filter_mode: &'static str,
    /// `[cn] sessions`.
    pub cn_sessions: usize,
    /// Extra TOML appended verbatim (whole tables).
    pub extra_toml: String,
    /// Reach the CN at this address instead of its own (a [`DelayProxy`] in front of it).
    pub cn_via: Option<SocketAddr>,
}

impl Default for GatewaySettings {
    fn default() -> Self {
        Self {
            max_batch: 256,
            max_in_flight: 4,
            max_connections: 8192,
            filter_mode: "userspace",
            cn_sessions: 2,
            extra_toml: String::new(),
            cn_via: None,
        }
    }
}

/// A gatewayd connected to a [`Cn`].
#[derive(Debug)]
pub struct Gateway {
    pub dir: PathBuf,
    pub daemon: Daemon,
}

impl Gateway {
    /// Writes the companion credential (0600) and a configuration, starts gatewayd on loopback
    /// and waits for its ready file (written once the device port and the control socket are
    /// open; the CN link comes up in the background — loadgen waits for it).
    pub fn start(bins: &Bins, dir: &Path, cn: &Cn, s: &GatewaySettings) -> anyhow::Result<Self> {
        let cfg = Self::write_config(dir, cn, s, "127.0.0.1:0")?;
        let ready = dir.join("gw-ready.json");
        let mut c = bins.command("gatewayd");
        c.arg("--config").arg(&cfg).arg("--ready-file").arg(&ready);
        let daemon = Daemon::spawn("gatewayd", c, &ready, &dir.join("gatewayd.log"))?;
        Ok(Self {
            dir: dir.to_path_buf(),
            daemon,
        })
    }

    /// Writes `gatewayd.toml` (and `companion.toml`) into `dir`; returns the configuration's path.
    pub fn write_config(
        dir: &Path,
        cn: &Cn,
        s: &GatewaySettings,
        listen: &str,
    ) -> anyhow::Result<PathBuf> {
        fs::create_dir_all(dir)?;
        let companion = dir.join("companion.toml");
        write_secret(
            &companion,
            &format!(
                "supi = \"{COMPANION_SUPI}\"\nk = \"{COMPANION_K}\"\nopc = \"{COMPANION_OPC}\"\n"
            ),
        )?;
        let toml = format!(
            r#"state_dir = "{state}"
log_level = "warn"
[devices]
listen = "{listen}"
max_connections = {max_conn}
new_connections_per_ip = 0
[cn]
endpoint = "{cn_quic}"
server_name = "localhost"
ca_file = "{ca}"
sessions = {sessions}
reconnect_min = "100ms"
reconnect_max = "2s"
request_timeout = "20s"
[companion]
credential_file = "{companion}"
[control]
socket = "{control}"
[metrics]
listen = "127.0.0.1:0"
[filter]
mode = "{filter}"
block_after_failures = 0
[batching]
max_batch = {max_batch}
max_in_flight = {in_flight}
queue_capacity = 16384
{extra}"#,
            state = dir.join("state").display(),
            max_conn = s.max_connections,
            cn_quic = match s.cn_via {
                Some(a) => a.to_string(),
                None => cn.quic()?,
            },
            ca = cn.ca_file().display(),
            sessions = s.cn_sessions,
            companion = companion.display(),
            control = dir.join("control.sock").display(),
            filter = s.filter_mode,
            max_batch = s.max_batch,
            in_flight = s.max_in_flight,
            extra = s.extra_toml,
        );
        let path = dir.join("gatewayd.toml");
        fs::write(&path, toml)?;
        Ok(path)
    }

    /// The device-facing QUIC address.
    pub fn devices(&self) -> anyhow::Result<String> {
        self.daemon.ready_str("devices")
    }

    /// The control socket.
    pub fn control(&self) -> anyhow::Result<String> {
        self.daemon.ready_str("control")
    }
}

/// Writes a file readable by its owner only.
pub fn write_secret(path: &Path, text: &str) -> anyhow::Result<()> {
    let mut f = fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.set_permissions(fs::Permissions::from_mode(0o600))?;
    f.write_all(text.as_bytes())?;
    Ok(())
}

/// Runs `loadgen <args>` with `--json <file>` appended and returns the parsed report. A loadgen
/// that reports failed devices (exit 1) still yields its report; any other failure is an error.
pub fn loadgen_json(bins: &Bins, dir: &Path, args: &[String]) -> anyhow::Result<serde_json::Value> {
    let out_file = dir.join(format!("loadgen-{}.json", std::process::id() ^ rand_tag()));
    let out = bins
        .command("loadgen")
        .args(args)
        .arg("--json")
        .arg(&out_file)
        .stdin(Stdio::null())
        .output()
        .context("starting loadgen")?;
    let code = out.status.code();
    if code != Some(0) && code != Some(1) {
        bail!(
            "loadgen {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let text = fs::read_to_string(&out_file)
        .with_context(|| format!("loadgen wrote no report ({})", out_file.display()))?;
    let _ = fs::remove_file(&out_file);
    serde_json::from_str(&text).context("parsing loadgen's JSON report")
}

fn rand_tag() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos())
}

/// Whether this process runs as root (network namespaces, XDP).
pub fn is_root() -> bool {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|r| r.split_whitespace().nth(1).map(|e| e == "0"))
        })
        .unwrap_or(false)
}

/// A UDP relay on loopback that holds every datagram for `one_way` in each direction: a
/// wide-area link between a home router and the operator's data centre (this kernel has no
/// netem). Each client address gets its own upstream socket; order is kept per direction. Runs
/// on its own thread until dropped.
#[derive(Debug)]
pub struct DelayProxy {
    /// Where clients send (stands in for the upstream's address).
    pub addr: SocketAddr,
    pub rtt: std::time::Duration,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl DelayProxy {
    pub fn start(upstream: SocketAddr, rtt: Duration) -> anyhow::Result<Self> {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").context("binding the delay proxy")?;
        socket.set_nonblocking(true)?;
        let addr = socket.local_addr()?;
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel();
        let one_way = rtt / 2;
        let thread = std::thread::Builder::new()
            .name("delay-proxy".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        eprintln!("delay proxy: no runtime: {e}");
                        return;
                    }
                };
                rt.block_on(async move {
                    tokio::select! {
                        r = relay(socket, upstream, one_way) => {
                            if let Err(e) = r { eprintln!("delay proxy stopped: {e:#}"); }
                        }
                        _ = stop_rx => {}
                    }
                });
            })?;
        Ok(Self {
            addr,
            rtt,
            stop: Some(stop_tx),
            thread: Some(thread),
        })
    }
}

impl Drop for DelayProxy {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

type Delayed = tokio::sync::mpsc::UnboundedSender<(tokio::time::Instant, Vec<u8>)>;

/// Sends what arrives on the returned channel to `to` through `socket`, each datagram at its
/// due time (FIFO: the delay is constant, so due times are in order).
fn delayed_sender(
    socket: std::sync::Arc<tokio::net::UdpSocket>,
    to: Option<SocketAddr>,
) -> Delayed {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(tokio::time::Instant, Vec<u8>)>();
    tokio::spawn(async move {
        while let Some((due, data)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            let _ = match to {
                Some(a) => socket.send_to(&data, a).await,
                None => socket.send(&data).await,
            };
        }
    });
    tx
}

async fn relay(
    socket: std::net::UdpSocket,
    upstream: SocketAddr,
    one_way: Duration,
) -> anyhow::Result<()> {
    let front = std::sync::Arc::new(tokio::net::UdpSocket::from_std(socket)?);
    // Client address → the delayed sender towards the upstream on that client's own socket.
    let mut clients: HashMap<SocketAddr, Delayed> = HashMap::new();
    let mut buf = vec![0u8; 65_536];
    loop {
        let (n, from) = front.recv_from(&mut buf).await?;
        let due = tokio::time::Instant::now() + one_way;
        let tx = match clients.get(&from) {
            Some(tx) => tx.clone(),
            None => {
                let up = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
                up.connect(upstream).await?;
                let up = std::sync::Arc::new(up);
                let tx = delayed_sender(up.clone(), None);
                // Answers: upstream → (delay) → this client.
                let back = delayed_sender(front.clone(), Some(from));
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 65_536];
                    while let Ok(n) = up.recv(&mut buf).await {
                        let due = tokio::time::Instant::now() + one_way;
                        if back.send((due, buf[..n].to_vec())).is_err() {
                            break;
                        }
                    }
                });
                clients.insert(from, tx.clone());
                tx
            }
        };
        let _ = tx.send((due, buf[..n].to_vec()));
    }
}

/// One JSON-lines request on gatewayd's control socket (`{"op":"status"}`): the status object
/// (what `gatewayctl status --json` prints).
pub fn gateway_status(control: &Path) -> anyhow::Result<serde_json::Value> {
    use std::io::{BufRead, BufReader};
    let mut s = std::os::unix::net::UnixStream::connect(control).with_context(|| {
        format!(
            "connecting to gatewayd's control socket {}",
            control.display()
        )
    })?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(b"{\"op\":\"status\"}\n")?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line)?;
    let v: serde_json::Value =
        serde_json::from_str(&line).with_context(|| format!("control answer {line:?}"))?;
    if v["result"] != "status" {
        bail!("gatewayd refused the status request: {v}");
    }
    Ok(v["status"].clone())
}

/// Polls gatewayd's status every millisecond until its CN link is up; when it was seen up.
pub fn wait_cn_up(control: &Path, limit: Duration) -> anyhow::Result<Instant> {
    let until = Instant::now() + limit;
    loop {
        let st = gateway_status(control)?;
        if st["cn_link"] == "up" {
            return Ok(Instant::now());
        }
        if Instant::now() > until {
            bail!("gatewayd's CN link is {} after {limit:?}", st["cn_link"]);
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}
