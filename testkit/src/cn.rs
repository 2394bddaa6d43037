//! `cn-backend` for tests: `init` of a data directory, the companion subscription, and `serve`
//! on loopback ports chosen by the kernel (port 0, addresses read from the ready file).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::process::{self, Proc, Started, ready_str, run};
use crate::{Bins, COMPANION_K, COMPANION_OPC, COMPANION_SUPI, Result};

/// How long `serve` may take to write its ready file (a PostgreSQL store migrates first).
pub const READY_LIMIT: Duration = Duration::from_secs(60);

/// `cn-backend --dir <dir> <args>`.
pub fn cli(bins: &Bins, dir: &Path, args: &[&str]) -> Command {
    let mut c = bins.command("cn-backend");
    c.arg("--dir").arg(dir).args(args);
    c
}

/// `cn-backend init --mcc 001 --mnc 01 <extra>` into `dir`.
pub fn init(bins: &Bins, dir: &Path, extra: &[&str]) -> Result<()> {
    let mut args = vec!["init", "--mcc", "001", "--mnc", "01"];
    args.extend_from_slice(extra);
    run(cli(bins, dir, &args), "cn-backend init").map(drop)
}

/// `cn-backend subscriber add` of the companion subscription (test set 1) with `policy` (more
/// `subscriber add` flags: `--max-children N`, ...).
pub fn add_companion(bins: &Bins, dir: &Path, policy: &[&str]) -> Result<()> {
    let mut args = vec![
        "subscriber",
        "add",
        "--supi",
        COMPANION_SUPI,
        "--k",
        COMPANION_K,
        "--opc",
        COMPANION_OPC,
    ];
    args.extend_from_slice(policy);
    run(cli(bins, dir, &args), "cn-backend subscriber add").map(drop)
}

/// [`init`], then [`add_companion`] allowed `max_children` children.
pub fn init_with_companion(bins: &Bins, dir: &Path, max_children: u64) -> Result<()> {
    init(bins, dir, &[])?;
    add_companion(bins, dir, &["--max-children", &max_children.to_string()])
}

/// `cn-backend --dir <dir> serve --listen <listen> --http-listen 127.0.0.1:0 --ready-file
/// <ready>`, inside network namespace `netns` when given. Not yet spawned: add environment
/// variables, then [`CnServer::start`].
pub fn serve_command(
    bins: &Bins,
    dir: &Path,
    listen: &str,
    ready: &Path,
    netns: Option<&str>,
) -> Command {
    let mut c = bins.daemon("cn-backend", netns);
    c.arg("--dir").arg(dir).args([
        "serve",
        "--listen",
        listen,
        "--http-listen",
        "127.0.0.1:0",
        "--ready-file",
    ]);
    c.arg(ready);
    c
}

/// A running `cn-backend serve`: SIGKILLed when dropped.
#[derive(Debug)]
pub struct CnServer {
    /// Its data directory (`ca.pem` is the operator CA the clients trust).
    pub dir: PathBuf,
    /// The process.
    pub proc: Proc,
    /// Its QUIC address (`ip:port`).
    pub quic: String,
    /// Its admin HTTP address (`/metrics`, the REST API).
    pub http: String,
    /// From spawn to the ready file.
    pub start_to_ready: std::time::Duration,
}

impl CnServer {
    /// Spawns `cmd` (from [`serve_command`]) serving `dir`, stderr to `log`, and waits for
    /// `ready`.
    pub fn start(dir: &Path, cmd: Command, ready: &Path, log: &Path) -> Result<Self> {
        let s = process::start("cn-backend", cmd, ready, log, READY_LIMIT)?;
        Self::from_started(dir, s)
    }

    /// `serve` of `dir` on loopback (QUIC on `listen`), ready file `ready`, log `log`.
    pub fn serve(bins: &Bins, dir: &Path, listen: &str, ready: &Path, log: &Path) -> Result<Self> {
        Self::start(
            dir,
            serve_command(bins, dir, listen, ready, None),
            ready,
            log,
        )
    }

    fn from_started(dir: &Path, s: Started) -> Result<Self> {
        Ok(Self {
            dir: dir.to_path_buf(),
            quic: ready_str(&s.ready, "quic", "cn-backend")?,
            http: ready_str(&s.ready, "http", "cn-backend")?,
            proc: s.proc,
            start_to_ready: s.start_to_ready,
        })
    }

    /// The operator CA certificate (PEM) the CN's certificate chains to.
    pub fn ca_file(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }
}
