//! The daemons a benchmark runs: a CN ([`Cn`]: `cn-backend` initialised with the companion
//! subscription and served on loopback) and a gateway ([`Gateway`]) with the settings the
//! benchmarks vary ([`GatewaySettings`]).

use std::fs;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, anyhow};
use companion_testkit::{GatewayToml, cn};

use super::{Bins, COMPANION_K, COMPANION_OPC, COMPANION_SUPI, Daemon, run};

/// A cn-backend in its own directory, initialised with the companion subscription.
#[derive(Debug)]
pub struct Cn {
    /// Its data directory.
    pub dir: PathBuf,
    /// The served process.
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
        let store_args: &[&str] = match store {
            Some(url) => &["--store", url],
            None => &[],
        };
        cn::init(bins, &cn_dir, store_args)?;
        // The benches issue far more than the operator's default cap on new credentials per
        // parent and hour (child_allocation_limit, 10,000): lift it, since a bench is a flood
        // by design. Every key of the generated file is top level, so appending sets it.
        let path = cn_dir.join("cn-backend.toml");
        let mut f = fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        writeln!(
            f,
            "\n# set by the benches\nchild_allocation_limit = 4000000000"
        )
        .with_context(|| format!("writing {}", path.display()))?;
        Ok(cn_dir)
    }

    /// `cn-backend subscriber add` of a companion `(supi, k, opc)` allowed `max_children`.
    pub fn add_companion(
        bins: &Bins,
        cn_dir: &Path,
        (supi, k, opc): (&str, &str, &str),
        max_children: u64,
    ) -> anyhow::Result<()> {
        let max = max_children.to_string();
        let args = [
            "subscriber",
            "add",
            "--supi",
            supi,
            "--k",
            k,
            "--opc",
            opc,
            "--max-children",
            &max,
            "--max-lifetime",
            "30d",
        ];
        run(cn::cli(bins, cn_dir, &args), "cn-backend subscriber add")?;
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
        Self::serve_on(bins, cn_dir, dir, netns, "127.0.0.1:0", "cn-backend.log")
    }

    fn serve_on(
        bins: &Bins,
        cn_dir: &Path,
        dir: &Path,
        netns: Option<&str>,
        listen: &str,
        log: &str,
    ) -> anyhow::Result<Self> {
        let ready = dir.join("cn-ready.json");
        let c = cn::serve_command(bins, cn_dir, listen, &ready, netns);
        let daemon = Daemon::spawn("cn-backend", c, &ready, &dir.join(log))?;
        Ok(Self {
            dir: cn_dir.to_path_buf(),
            daemon,
        })
    }

    /// SIGKILL (no drain), then `serve` again on the same data directory and QUIC port (its
    /// HTTP port is new). Returns the instant the new process was ready.
    pub fn kill9_and_restart(&mut self, bins: &Bins) -> anyhow::Result<Instant> {
        let quic = self.quic()?;
        self.daemon.proc.kill9();
        let parent = self
            .dir
            .parent()
            .ok_or_else(|| anyhow!("the CN directory has no parent"))?;
        *self = Self::serve_on(
            bins,
            &self.dir,
            parent,
            None,
            &quic,
            "cn-backend-restarted.log",
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
    /// Reach the CN at this address instead of its own (a [`DelayProxy`](super::DelayProxy) in front of it).
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

/// See [`Gateway::set_extra_devices`].
static EXTRA_DEVICES: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// A gatewayd connected to a [`Cn`].
#[derive(Debug)]
pub struct Gateway {
    /// Its directory (configuration, state, log).
    pub dir: PathBuf,
    /// The process.
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

    /// Lines added to the `[devices]` table of every gatewayd the suites start from now on
    /// (`e2e-bench --gateway-devices`), to measure a setting; once per process.
    pub fn set_extra_devices(lines: String) -> anyhow::Result<()> {
        EXTRA_DEVICES
            .set(lines)
            .map_err(|_| anyhow::anyhow!("the extra [devices] lines were already set"))
    }

    /// Writes `gatewayd.toml` (and `companion.toml`) into `dir`; returns the configuration's path.
    pub fn write_config(
        dir: &Path,
        cn: &Cn,
        s: &GatewaySettings,
        listen: &str,
    ) -> anyhow::Result<PathBuf> {
        let endpoint = match s.cn_via {
            Some(a) => a.to_string(),
            None => cn.quic()?,
        };
        let mut t = GatewayToml::new(dir, &endpoint, &cn.ca_file());
        t.listen = listen;
        t.top = "log_level = \"warn\"";
        let devices = format!(
            "max_connections = {}\nnew_connections_per_ip = 0\n{}",
            s.max_connections,
            EXTRA_DEVICES.get().map_or("", String::as_str)
        );
        t.devices = &devices;
        let cn_keys = format!(
            "sessions = {}\nreconnect_min = \"100ms\"\nreconnect_max = \"2s\"\n\
             request_timeout = \"20s\"",
            s.cn_sessions
        );
        t.cn = &cn_keys;
        let tables = format!(
            "[filter]\nmode = \"{}\"\nblock_after_failures = 0\n[batching]\nmax_batch = {}\n\
             max_in_flight = {}\nqueue_capacity = 16384\n{}",
            s.filter_mode, s.max_batch, s.max_in_flight, s.extra_toml
        );
        t.tables = &tables;
        // The companion credential is rewritten (0600) on every start.
        let _ = fs::remove_file(dir.join("companion.toml"));
        Ok(t.write()?)
    }

    /// `loadgen <sub>` arguments for `devices` devices, `concurrency` at a time, against this
    /// gateway (device address and control socket), without progress output, device IDs
    /// starting with `prefix`; `extra` appended.
    pub fn loadgen_args(
        &self,
        sub: &str,
        devices: u64,
        concurrency: u64,
        prefix: &str,
        extra: &[&str],
    ) -> anyhow::Result<Vec<String>> {
        let args = [sub, "--devices", &devices.to_string()]
            .into_iter()
            .chain(["--concurrency", &concurrency.to_string()])
            .chain([
                "--gateway",
                &self.devices()?,
                "--control-socket",
                &self.control()?,
            ])
            .chain(["--progress", "never"])
            .chain(extra.iter().copied())
            .chain(["--id-prefix", prefix])
            .map(str::to_owned)
            .collect();
        Ok(args)
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
