//! Child processes of a test: [`Proc`] (SIGKILLed and reaped when dropped; its log's tail printed
//! when the test is failing), [`start`] (spawn, stderr to a log, wait for the ready file the
//! daemon writes once it listens), [`Out`] (what a finished command printed) and [`wait_until`].

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::{Error, Result, io};

/// How many log lines a failing test prints of each of its processes.
const TAIL_LINES: usize = 40;

/// A child process, SIGKILLed and reaped when dropped (also when the test panics, when the end
/// of its log, if it has one, is printed on stderr).
#[derive(Debug)]
pub struct Proc {
    /// The process.
    pub child: Child,
    /// What it is, for messages.
    pub name: String,
    /// Where its stderr goes, if to a file.
    pub log: Option<PathBuf>,
}

impl Proc {
    /// Wraps a spawned `child` named `name`, whose stderr goes to `log`.
    pub fn new(name: &str, child: Child, log: Option<&Path>) -> Self {
        Self {
            child,
            name: name.to_owned(),
            log: log.map(Path::to_path_buf),
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether it still runs.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Sends `signal` (`"-TERM"`, `"-STOP"`, ...) with kill(1).
    pub fn signal(&self, signal: &str) -> Result<()> {
        let pid = self.pid().to_string();
        let st = io(Command::new("kill").args([signal, &pid]).status(), || {
            format!("kill {signal} {pid}")
        })?;
        if st.success() {
            Ok(())
        } else {
            Err(Error::Failed {
                what: format!("kill {signal} {pid}"),
                status: st,
                stderr: String::new(),
            })
        }
    }

    /// Waits up to `limit` for the exit; `None` if it still runs then.
    pub fn wait_exit(&mut self, limit: Duration) -> Result<Option<ExitStatus>> {
        let until = Instant::now() + limit;
        loop {
            if let Some(st) = io(self.child.try_wait(), || {
                format!("waiting for {}", self.name)
            })? {
                return Ok(Some(st));
            }
            if Instant::now() >= until {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, then up to `limit` for the exit (`None` if it still runs then).
    pub fn terminate(&mut self, limit: Duration) -> Result<Option<ExitStatus>> {
        self.signal("-TERM")?;
        self.wait_exit(limit)
    }

    /// SIGKILL now, and reap.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The whole log, or "" without one.
    pub fn log_text(&self) -> String {
        self.log
            .as_deref()
            .and_then(|l| fs::read_to_string(l).ok())
            .unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
        if std::thread::panicking()
            && let Some(log) = &self.log
        {
            eprintln!(
                "--- {} (log {}), last {TAIL_LINES} lines:\n{}",
                self.name,
                log.display(),
                tail(log, TAIL_LINES)
            );
        }
    }
}

/// The last `n` lines of a log file (for error messages).
pub fn tail(path: &Path, n: usize) -> String {
    let t = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = t.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// A daemon that wrote its ready file.
#[derive(Debug)]
pub struct Started {
    /// The process.
    pub proc: Proc,
    /// Its ready file, parsed.
    pub ready: serde_json::Value,
    /// From spawn to the ready file.
    pub start_to_ready: Duration,
}

impl Started {
    /// A string field of the ready file (`quic`, `http`, `devices`, `control`, `metrics`).
    pub fn ready_str(&self, key: &str) -> Result<String> {
        ready_str(&self.ready, key, &self.proc.name)
    }
}

/// A string field of a ready file.
pub fn ready_str(ready: &serde_json::Value, key: &str, name: &str) -> Result<String> {
    ready[key]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| Error::Unexpected {
            what: format!("{name}'s ready file"),
            detail: format!("no {key:?} in {ready}"),
        })
}

/// Spawns `cmd` (stdin and stdout to /dev/null, stderr to a new `log`), after removing a
/// stale `ready` file, and waits up to `limit` for the daemon to write JSON there. A daemon that
/// exits first, or is not ready in time (then it is killed), is an error carrying its log's end.
/// The log of an earlier start on the same path (a restart) is kept as `<log>.1`, `<log>.2`, ...
pub fn start(
    name: &str,
    mut cmd: Command,
    ready: &Path,
    log: &Path,
    limit: Duration,
) -> Result<Started> {
    let _ = fs::remove_file(ready);
    keep_old_log(log);
    let err = io(fs::File::create(log), || {
        format!("creating {}", log.display())
    })?;
    let started = Instant::now();
    let child = io(
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(err)
            .spawn(),
        || format!("starting {name}"),
    )?;
    let mut proc = Proc::new(name, child, Some(log));
    let ready = wait_ready(&mut proc, ready, limit)?;
    Ok(Started {
        proc,
        ready,
        start_to_ready: started.elapsed(),
    })
}

/// Renames an existing `log` to the first free `<log>.N`.
fn keep_old_log(log: &Path) {
    if !log.exists() {
        return;
    }
    for n in 1.. {
        let mut old = log.as_os_str().to_owned();
        old.push(format!(".{n}"));
        if !Path::new(&old).exists() {
            let _ = fs::rename(log, &old);
            return;
        }
    }
}

/// Waits up to `limit` for `proc` to write JSON to `path`; fails (with its log) if it exits
/// first or is not ready in time.
pub fn wait_ready(proc: &mut Proc, path: &Path, limit: Duration) -> Result<serde_json::Value> {
    let until = Instant::now() + limit;
    loop {
        if let Ok(t) = fs::read_to_string(path)
            && let Ok(v) = serde_json::from_str(&t)
        {
            return Ok(v);
        }
        if let Ok(Some(status)) = proc.child.try_wait() {
            return Err(Error::Exited {
                name: proc.name.clone(),
                status,
                log: log_tail(proc),
            });
        }
        if Instant::now() > until {
            proc.kill9();
            return Err(Error::NotReady {
                name: proc.name.clone(),
                limit,
                log: log_tail(proc),
            });
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn log_tail(proc: &Proc) -> String {
    proc.log.as_deref().map(|l| tail(l, 30)).unwrap_or_default()
}

/// What a finished command printed, and how it exited.
#[derive(Debug)]
pub struct Out {
    /// Exit code (-1 when killed by a signal).
    pub code: i32,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

impl Out {
    /// Runs `cmd` to completion (stdin from /dev/null) and captures what it printed.
    pub fn of(cmd: &mut Command) -> Result<Self> {
        let o = io(cmd.stdin(Stdio::null()).output(), || {
            format!("running {cmd:?}")
        })?;
        Ok(o.into())
    }

    /// Whether it exited 0.
    pub fn success(&self) -> bool {
        self.code == 0
    }

    /// Itself, after asserting that it exited 0.
    pub fn ok(self) -> Self {
        assert_eq!(self.code, 0, "expected success: {self:#?}");
        self
    }

    /// Standard output parsed as JSON (`Null` when it is not JSON).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout).unwrap_or(serde_json::Value::Null)
    }
}

impl From<std::process::Output> for Out {
    fn from(o: std::process::Output) -> Self {
        Out {
            code: o.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }
}

/// Runs `cmd` to completion; its output, or [`Error::Failed`] with its stderr when it exits
/// non-zero.
pub fn run(mut cmd: Command, what: &str) -> Result<std::process::Output> {
    let out = io(cmd.stdin(Stdio::null()).output(), || {
        format!("starting {what}")
    })?;
    if !out.status.success() {
        return Err(Error::Failed {
            what: what.to_owned(),
            status: out.status,
            stderr: format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
            .trim()
            .to_owned(),
        });
    }
    Ok(out)
}

/// Polls `f` every 20 ms until it holds; panics naming `what` after `limit`.
pub fn wait_until(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let until = Instant::now() + limit;
    while !f() {
        assert!(
            Instant::now() < until,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
