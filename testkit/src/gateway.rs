//! `gatewayd` for tests: its configuration ([`GatewayToml`]: everything under one directory,
//! loopback, port 0), the companion credential file, the daemon ([`Gatewayd`]), `gatewayctl`,
//! and the control socket's status (the CN link coming up).

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::process::{self, Out, Proc, ready_str};
use crate::{Bins, COMPANION_K, COMPANION_OPC, COMPANION_SUPI, Error, Result, io};

/// How long gatewayd may take to write its ready file (it loads the eBPF filter first).
pub const READY_LIMIT: Duration = Duration::from_secs(60);

/// The companion credential file's text (test set 1).
pub fn companion_toml() -> String {
    format!("supi = \"{COMPANION_SUPI}\"\nk = \"{COMPANION_K}\"\nopc = \"{COMPANION_OPC}\"\n")
}

/// Writes a file readable by its owner only (gatewayd refuses a credential others can read).
pub fn write_secret(path: &Path, text: &str) -> Result<()> {
    let mut f = io(
        fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .open(path),
        || format!("creating {}", path.display()),
    )?;
    io(f.set_permissions(fs::Permissions::from_mode(0o600)), || {
        format!("chmod 600 {}", path.display())
    })?;
    io(f.write_all(text.as_bytes()), || {
        format!("writing {}", path.display())
    })
}

/// Writes the companion credential (0600) to `path`.
pub fn write_companion(path: &Path) -> Result<()> {
    write_secret(path, &companion_toml())
}

/// A test gatewayd's configuration: state, companion credential and control socket under `dir`,
/// metrics on loopback port 0, and what the suite adds to each part.
#[derive(Debug, Clone)]
pub struct GatewayToml<'a> {
    /// The gateway's directory.
    pub dir: &'a Path,
    /// `[devices] listen`.
    pub listen: &'a str,
    /// The CN endpoints (one: `endpoint = `; more: `endpoints = [...]`).
    pub endpoints: Vec<String>,
    /// `[cn] ca_file`: the operator CA.
    pub ca: PathBuf,
    /// Top-level keys after `state_dir` (`log_level`, `drain_timeout`).
    pub top: &'a str,
    /// More `[devices]` keys.
    pub devices: &'a str,
    /// More `[cn]` keys (`sessions`, `reconnect_min`, `request_timeout`, ...).
    pub cn: &'a str,
    /// Whole tables after `[metrics]` (`[filter]`, `[batching]`, ...).
    pub tables: &'a str,
}

impl<'a> GatewayToml<'a> {
    /// Devices on `127.0.0.1:0`, one CN endpoint, nothing added.
    pub fn new(dir: &'a Path, endpoint: &str, ca: &Path) -> Self {
        Self {
            dir,
            listen: "127.0.0.1:0",
            endpoints: vec![endpoint.to_owned()],
            ca: ca.to_path_buf(),
            top: "",
            devices: "",
            cn: "",
            tables: "",
        }
    }

    /// The configuration's text.
    pub fn render(&self) -> String {
        let endpoints = match self.endpoints.as_slice() {
            [one] => format!("endpoint = \"{one}\""),
            many => {
                let list: Vec<String> = many.iter().map(|e| format!("\"{e}\"")).collect();
                format!("endpoints = [{}]", list.join(", "))
            }
        };
        format!(
            r#"state_dir = "{state}"
{top}
[devices]
listen = "{listen}"
{devices}
[cn]
{endpoints}
server_name = "localhost"
ca_file = "{ca}"
{cn}
[companion]
credential_file = "{cred}"
[control]
socket = "{sock}"
[metrics]
listen = "127.0.0.1:0"
{tables}
"#,
            state = self.dir.join("state").display(),
            top = self.top,
            listen = self.listen,
            devices = self.devices,
            ca = self.ca.display(),
            cn = self.cn,
            cred = self.dir.join("companion.toml").display(),
            sock = self.dir.join("control.sock").display(),
            tables = self.tables,
        )
    }

    /// Creates the directory and writes the companion credential and `gatewayd.toml` into it;
    /// the configuration's path.
    pub fn write(&self) -> Result<PathBuf> {
        write_config(self.dir, &self.render())
    }
}

/// Writes `config` as `dir/gatewayd.toml`, with the companion credential beside it (unless one
/// is there already); the configuration's path.
pub fn write_config(dir: &Path, config: &str) -> Result<PathBuf> {
    io(fs::create_dir_all(dir), || {
        format!("creating {}", dir.display())
    })?;
    let cred = dir.join("companion.toml");
    if !cred.exists() {
        write_companion(&cred)?;
    }
    let path = dir.join("gatewayd.toml");
    io(fs::write(&path, config), || {
        format!("writing {}", path.display())
    })?;
    Ok(path)
}

/// `gatewayd --config <config> --ready-file <ready>` (inside network namespace `netns` when
/// given), without the caller's `RUST_LOG` (the configuration's `log_level` applies). Not yet
/// spawned: add environment variables, then [`Gatewayd::start`].
pub fn command(bins: &Bins, config: &Path, ready: &Path, netns: Option<&str>) -> Command {
    let mut c = bins.daemon("gatewayd", netns);
    c.arg("--config")
        .arg(config)
        .arg("--ready-file")
        .arg(ready)
        .env_remove("RUST_LOG");
    c
}

/// A running gatewayd: SIGKILLed when dropped.
#[derive(Debug)]
pub struct Gatewayd {
    /// Its directory (configuration, state, log, ready file).
    pub dir: PathBuf,
    /// The process.
    pub proc: Proc,
    /// The device-facing QUIC address.
    pub devices: String,
    /// The metrics HTTP address.
    pub metrics: String,
    /// The control socket.
    pub control: PathBuf,
    /// From spawn to the ready file.
    pub start_to_ready: Duration,
}

impl Gatewayd {
    /// Spawns `cmd` (from [`command`]) with stderr appended to `dir/gatewayd.log` and waits for
    /// the ready file `dir/ready.json`, written once the device port and the control socket are
    /// open (the CN link comes up in the background: [`Gatewayd::wait_cn`]).
    pub fn start(dir: &Path, cmd: Command) -> Result<Self> {
        Self::start_within(dir, cmd, READY_LIMIT)
    }

    /// [`Gatewayd::start`], waiting up to `limit` for the ready file (an emulated build is slow).
    pub fn start_within(dir: &Path, cmd: Command, limit: Duration) -> Result<Self> {
        let s = process::start(
            "gatewayd",
            cmd,
            &dir.join("ready.json"),
            &dir.join("gatewayd.log"),
            limit,
        )?;
        Ok(Self {
            dir: dir.to_path_buf(),
            devices: ready_str(&s.ready, "devices", "gatewayd")?,
            metrics: ready_str(&s.ready, "metrics", "gatewayd")?,
            control: PathBuf::from(ready_str(&s.ready, "control", "gatewayd")?),
            proc: s.proc,
            start_to_ready: s.start_to_ready,
        })
    }

    /// Writes `config` into `dir` and starts gatewayd on it (natively, from `bins`).
    pub fn start_with(bins: &Bins, dir: &Path, config: &str) -> Result<Self> {
        let path = write_config(dir, config)?;
        Self::start(dir, command(bins, &path, &dir.join("ready.json"), None))
    }

    /// `gatewayctl --socket <control> <args>` from `bins`.
    pub fn ctl(&self, bins: &Bins, args: &[&str]) -> Result<Out> {
        ctl(bins, &self.control, args)
    }

    /// The status object on the control socket.
    pub fn status(&self) -> Result<serde_json::Value> {
        status(&self.control)
    }

    /// Waits up to `limit` for the CN link to be `want` (`"up"`, `"down"`); when it was seen.
    pub fn wait_cn(&self, want: &str, limit: Duration) -> Result<Instant> {
        wait_cn(&self.control, want, limit)
    }
}

/// `gatewayctl --socket <control> <args>`, run to completion.
pub fn ctl(bins: &Bins, control: &Path, args: &[&str]) -> Result<Out> {
    let mut c = bins.command("gatewayctl");
    c.arg("--socket").arg(control).args(args);
    Out::of(&mut c)
}

/// One JSON-lines request on gatewayd's control socket (`{"op":"status"}`): the status object
/// (what `gatewayctl status --json` prints).
pub fn status(control: &Path) -> Result<serde_json::Value> {
    let what = || format!("gatewayd's control socket {}", control.display());
    let mut s = io(std::os::unix::net::UnixStream::connect(control), what)?;
    io(s.set_read_timeout(Some(Duration::from_secs(10))), what)?;
    io(s.write_all(b"{\"op\":\"status\"}\n"), what)?;
    let mut line = String::new();
    io(BufReader::new(s).read_line(&mut line), what)?;
    let v: serde_json::Value = serde_json::from_str(&line).map_err(|e| Error::Unexpected {
        what: what(),
        detail: format!("{e}: {line:?}"),
    })?;
    if v["result"] != "status" {
        return Err(Error::Unexpected {
            what: what(),
            detail: format!("refused the status request: {v}"),
        });
    }
    Ok(v["status"].clone())
}

/// Polls the status every millisecond until the CN link is `want`; when it was seen so.
pub fn wait_cn(control: &Path, want: &str, limit: Duration) -> Result<Instant> {
    let until = Instant::now() + limit;
    loop {
        let st = status(control);
        if let Ok(st) = &st
            && st["cn_link"] == want
        {
            return Ok(Instant::now());
        }
        if Instant::now() > until {
            return Err(Error::Unexpected {
                what: format!("gatewayd's CN link after {limit:?}"),
                detail: match st {
                    Ok(st) => format!("{} (not {want})", st["cn_link"]),
                    Err(e) => e.to_string(),
                },
            });
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}
