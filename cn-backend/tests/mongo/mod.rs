//! A throwaway MongoDB-wire server for the tests: PyPI's `nx-27017` (a MongoDB wire-protocol
//! server on SQLite), installed by `scripts/setup.sh` into the venv `target/mongo-venv` (or the
//! program named by `NX_27017`). Each server gets its own temporary directory and a free
//! loopback port, and is killed when dropped; [`MongoServer::stop`] and
//! [`MongoServer::start_again`] take it down and bring it back on the same port and data.
//!
//! A missing server fails the tests when `CI` or `DEPLOY_TESTS_STRICT=1` is set (as
//! `scripts/test.sh` does), else the tests print a note and pass without running.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    dead_code,
    missing_debug_implementations
)]

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use companion_testkit::strict;

/// The `nx-27017` program: `NX_27017`, else the venv `scripts/setup.sh` makes.
fn program() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("NX_27017") {
        let p = PathBuf::from(p);
        return p.exists().then_some(p);
    }
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/mongo-venv/bin/nx-27017");
    p.exists().then_some(p)
}

/// One running (or stopped) server.
pub struct MongoServer {
    dir: tempfile::TempDir,
    program: PathBuf,
    port: u16,
    child: Option<Child>,
}

impl MongoServer {
    /// Starts a server, or `None` (with a note) when `nx-27017` is not installed and the run is
    /// not strict.
    pub fn start() -> Option<Self> {
        let Some(program) = program() else {
            let msg = "nx-27017 (MongoDB wire-protocol server) not found: run scripts/setup.sh \
                       (it installs it into target/mongo-venv) or set NX_27017";
            if strict() {
                panic!("{msg}");
            }
            eprintln!("note: skipping, {msg}");
            return None;
        };
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .unwrap()
            .port();
        let mut s = MongoServer {
            dir: tempfile::tempdir().unwrap(),
            program,
            port,
            child: None,
        };
        s.start_again();
        Some(s)
    }

    /// `mongodb://127.0.0.1:<port>`.
    pub fn uri(&self) -> String {
        format!("mongodb://127.0.0.1:{}", self.port)
    }

    /// (Re)starts the server on the same port and data file; waits until it accepts.
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "already running");
        let log = std::fs::File::create(self.dir.path().join("server.log")).unwrap();
        let child = Command::new(&self.program)
            .arg("--db")
            .arg(self.dir.path().join("data.db"))
            .args(["--host", "127.0.0.1", "-p", &self.port.to_string()])
            // Its own PID file: the default is one per machine, which would refuse a second
            // server (tests run in parallel).
            .arg("--pid-file")
            .arg(self.dir.path().join("nx.pid"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", self.program.display()));
        self.child = Some(child);
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("nx-27017 exited with {st}: {}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "nx-27017 did not listen: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Kills the server (SIGKILL) and waits for it; its data stays.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The server's log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }
}

impl Drop for MongoServer {
    fn drop(&mut self) {
        self.stop();
    }
}
