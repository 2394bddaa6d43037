//! A throwaway PostgreSQL server for the tests: `initdb` + `pg_ctl` of Debian's `postgresql`
//! package (`/usr/lib/postgresql/<version>/bin`, or `PG_BIN_DIR`) in a temporary directory,
//! listening only on a Unix socket in that directory (no TCP). One server per test binary; every
//! test gets its own database. As root the server runs as `nobody` (PostgreSQL refuses root).
//!
//! Missing binaries fail the tests when `CI` or `DEPLOY_TESTS_STRICT=1` is set, else the tests
//! print a note and pass without running.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    dead_code,
    missing_debug_implementations
)]

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};

use companion_testkit::strict;

/// The running server of this test binary.
pub struct PgServer {
    /// The temporary directory: `data/`, the socket, `log`.
    pub dir: PathBuf,
    bin: PathBuf,
    run_as: Option<String>,
    run_as_uid: Option<u32>,
    next_db: AtomicU32,
    /// The loopback TCP port of a TLS server ([`PgServer::start_tls`]); none for the Unix-socket
    /// server.
    pub port: Option<u16>,
}

/// A server certificate chain and key (PEM) for [`PgServer::start_tls`].
pub struct TlsFiles {
    pub cert_pem: String,
    pub key_pem: String,
}

/// The directory with `initdb` and `pg_ctl`: `PG_BIN_DIR`, else the newest
/// `/usr/lib/postgresql/<version>/bin`.
fn bin_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("PG_BIN_DIR") {
        let d = PathBuf::from(d);
        return d.join("initdb").exists().then_some(d);
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| {
            let e = e.ok()?;
            let v: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((v, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, b)| b)
}

fn run(cmd: &mut Command, what: &str) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot run: {e}"));
    assert!(
        out.status.success(),
        "{what} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl PgServer {
    fn cmd(&self, tool: &str) -> Command {
        let path = self.bin.join(tool);
        match &self.run_as {
            Some(user) => {
                let mut c = Command::new("runuser");
                c.args(["-u", user, "--"]).arg(path);
                c
            }
            None => Command::new(path),
        }
    }

    fn start() -> Result<Self, String> {
        Self::start_with(None, "")
    }

    /// A second, separate Unix-socket server of this test's own (for fault tests that stop and
    /// reconfigure it); stopped when dropped.
    pub fn start_private() -> Result<Self, String> {
        Self::start_with(None, "")
    }

    /// [`PgServer::start_private`] with `extra` appended to the server's options (`-c name=value
    /// …`, after the defaults, so it overrides them), e.g. `-c fsync=on -c
    /// shared_preload_libraries=pg_stat_statements` for the issuance bench.
    pub fn start_private_with(extra: &str) -> Result<Self, String> {
        Self::start_with(None, extra)
    }

    /// `pg_ctl stop -m fast`: clients are disconnected, the server shuts down cleanly.
    pub fn stop_fast(&self) {
        run(
            self.cmd("pg_ctl")
                .arg("-D")
                .arg(self.dir.join("data"))
                .args(["-w", "-m", "fast", "stop"])
                .stdout(Stdio::null()),
            "pg_ctl stop",
        );
    }

    /// Starts the server again after [`PgServer::stop_fast`], with the same options: those
    /// PostgreSQL recorded in `postmaster.opts` (the command line, each argument quoted, after
    /// the binary's path), handed back through `pg_ctl -o`.
    pub fn start_again(&self) {
        let recorded =
            std::fs::read_to_string(self.dir.join("data").join("postmaster.opts")).unwrap();
        let opts = recorded
            .trim()
            .split_once(' ')
            .map(|(_, args)| args.to_owned())
            .unwrap_or_default();
        run(
            self.cmd("pg_ctl")
                .arg("-D")
                .arg(self.dir.join("data"))
                .arg("-l")
                .arg(self.dir.join("log"))
                .args(["-w", "-t", "60", "-o", &opts, "start"])
                .stdout(Stdio::null()),
            "pg_ctl start",
        );
    }

    /// Replaces `pg_hba.conf` with `rules` and reloads the configuration.
    pub fn set_hba(&self, rules: &str) {
        let path = self.dir.join("data").join("pg_hba.conf");
        std::fs::write(&path, rules).unwrap();
        std::os::unix::fs::chown(&path, self.run_as_uid, None).unwrap();
        run(
            self.cmd("pg_ctl")
                .arg("-D")
                .arg(self.dir.join("data"))
                .arg("reload")
                .stdout(Stdio::null()),
            "pg_ctl reload",
        );
    }

    /// A second, separate server that also listens on a free loopback TCP port with TLS on
    /// (`ssl=on`, the given certificate); stopped when dropped.
    pub fn start_tls(tls: &TlsFiles) -> Result<Self, String> {
        Self::start_with(Some(tls), "")
    }

    fn start_with(tls: Option<&TlsFiles>, extra: &str) -> Result<Self, String> {
        let bin = bin_dir().ok_or(
            "no PostgreSQL server binaries (initdb, pg_ctl) found under \
                                    /usr/lib/postgresql/*/bin; install Debian's `postgresql` \
                                    package (scripts/setup.sh) or set PG_BIN_DIR",
        )?;
        let root = std::fs::metadata("/proc/self")
            .map_err(|e| e.to_string())?
            .uid()
            == 0;
        // Under /tmp, not TMPDIR: the socket path must stay short and reachable by `nobody`.
        let dir = tempfile::Builder::new()
            .prefix("cn-pg-")
            .tempdir_in("/tmp")
            .map_err(|e| e.to_string())?
            .keep();
        let mut run_as_uid = None;
        let run_as = if root {
            let out = Command::new("id")
                .args(["-u", "nobody"])
                .output()
                .map_err(|e| e.to_string())?;
            let uid: u32 = String::from_utf8_lossy(&out.stdout)
                .trim()
                .parse()
                .map_err(|_| "no user nobody to run PostgreSQL as")?;
            std::os::unix::fs::chown(&dir, Some(uid), None).map_err(|e| e.to_string())?;
            run_as_uid = Some(uid);
            Some("nobody".to_owned())
        } else {
            None
        };
        let port = match tls {
            Some(_) => Some(
                std::net::TcpListener::bind("127.0.0.1:0")
                    .and_then(|l| l.local_addr())
                    .map_err(|e| e.to_string())?
                    .port(),
            ),
            None => None,
        };
        let server = PgServer {
            dir,
            bin,
            run_as,
            run_as_uid,
            next_db: AtomicU32::new(0),
            port,
        };
        let data = server.dir.join("data");
        run(
            server
                .cmd("initdb")
                .arg("-D")
                .arg(&data)
                .args([
                    "-U",
                    "postgres",
                    "--auth=trust",
                    "-E",
                    "UTF8",
                    "--no-locale",
                    "--no-sync",
                ])
                .stdout(Stdio::null()),
            "initdb",
        );
        let mut opts = format!(
            "-k {} -F -c max_connections=300 -c shared_buffers=32MB",
            server.dir.display()
        );
        match (tls, port) {
            (Some(t), Some(port)) => {
                let (cert, key) = (server.dir.join("server.pem"), server.dir.join("server.key"));
                std::fs::write(&cert, &t.cert_pem).map_err(|e| e.to_string())?;
                std::fs::write(&key, &t.key_pem).map_err(|e| e.to_string())?;
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600))
                    .map_err(|e| e.to_string())?;
                for f in [&cert, &key] {
                    std::os::unix::fs::chown(f, server.run_as_uid, None)
                        .map_err(|e| e.to_string())?;
                }
                opts.push_str(&format!(
                    " -c listen_addresses=127.0.0.1 -p {port} -c ssl=on -c ssl_cert_file={} \
                     -c ssl_key_file={}",
                    cert.display(),
                    key.display()
                ));
            }
            _ => opts.push_str(" -c listen_addresses=''"),
        }
        if !extra.is_empty() {
            opts.push(' ');
            opts.push_str(extra);
        }
        run(
            server
                .cmd("pg_ctl")
                .arg("-D")
                .arg(&data)
                .arg("-l")
                .arg(server.dir.join("log"))
                .args(["-w", "-t", "60", "-o", &opts, "start"])
                .stdout(Stdio::null()),
            "pg_ctl start",
        );
        server.watchdog();
        Ok(server)
    }

    /// A static is never dropped: a small shell process stops the server and removes the
    /// directory once this test process has exited.
    fn watchdog(&self) {
        let stop = format!(
            "{}{} -D {} -m immediate stop",
            self.run_as
                .as_ref()
                .map_or(String::new(), |u| format!("runuser -u {u} -- ")),
            self.bin.join("pg_ctl").display(),
            self.dir.join("data").display()
        );
        let script = format!(
            "while kill -0 {pid} 2>/dev/null; do sleep 0.5; done; {stop} >/dev/null 2>&1; rm -rf {dir}",
            pid = std::process::id(),
            dir = self.dir.display()
        );
        let _ = Command::new("sh")
            .args(["-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
    }

    /// The socket directory.
    pub fn socket_dir(&self) -> &Path {
        &self.dir
    }

    fn admin(&self) -> postgres::Client {
        postgres::Config::new()
            .host_path(&self.dir)
            .user("postgres")
            .dbname("postgres")
            .connect(postgres::NoTls)
            .unwrap()
    }

    /// Creates a new, empty database and returns its URL.
    pub fn create_db(&self) -> String {
        let name = format!(
            "t{}_{}",
            std::process::id(),
            self.next_db.fetch_add(1, Ordering::Relaxed)
        );
        self.admin()
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .unwrap();
        self.url(&name)
    }

    /// The URL of database `name`.
    pub fn url(&self, name: &str) -> String {
        format!("postgres://postgres@/{name}?host={}", self.dir.display())
    }

    /// A superuser connection to the database of `url` (for tampering in tests).
    pub fn client(&self, url: &str) -> postgres::Client {
        let name = url
            .split('/')
            .nth(3)
            .and_then(|s| s.split('?').next())
            .unwrap();
        postgres::Config::new()
            .host_path(&self.dir)
            .user("postgres")
            .dbname(name)
            .connect(postgres::NoTls)
            .unwrap()
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        let _ = self
            .cmd("pg_ctl")
            .arg("-D")
            .arg(self.dir.join("data"))
            .args(["-m", "immediate", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The server of this test binary, started on first use; `None` (after a printed note) when the
/// binaries are missing and strict mode is off.
pub fn server() -> Option<&'static PgServer> {
    static SERVER: OnceLock<Result<PgServer, String>> = OnceLock::new();
    match SERVER.get_or_init(PgServer::start) {
        Ok(s) => Some(s),
        Err(e) if strict() => panic!("PostgreSQL tests cannot run (CI/DEPLOY_TESTS_STRICT): {e}"),
        Err(e) => {
            eprintln!("note: skipping a PostgreSQL test: {e}");
            None
        }
    }
}

/// Streaming replication, for the high-availability tests: a hot standby of a server, its
/// promotion, and stopping a server as a crash would.
impl PgServer {
    /// A hot standby of this server: `pg_basebackup -R` over this server's socket into a new
    /// temporary directory, started on its own socket there. It follows this server by streaming
    /// replication (`primary_conninfo` written by `-R`); `application_name` is `standby`.
    pub fn start_standby(&self) -> Result<PgServer, String> {
        let dir = tempfile::Builder::new()
            .prefix("cn-pg-standby-")
            .tempdir_in("/tmp")
            .map_err(|e| e.to_string())?
            .keep();
        if let Some(uid) = self.run_as_uid {
            std::os::unix::fs::chown(&dir, Some(uid), None).map_err(|e| e.to_string())?;
        }
        let standby = PgServer {
            dir,
            bin: self.bin.clone(),
            run_as: self.run_as.clone(),
            run_as_uid: self.run_as_uid,
            next_db: AtomicU32::new(0),
            port: None,
        };
        let data = standby.dir.join("data");
        run(
            standby
                .cmd("pg_basebackup")
                .arg("-D")
                .arg(&data)
                .arg("-h")
                .arg(&self.dir)
                .args([
                    "-U",
                    "postgres",
                    "-R",
                    "-X",
                    "stream",
                    "-c",
                    "fast",
                    "--no-sync",
                    "-d",
                ])
                .arg(format!(
                    "application_name=standby host={}",
                    self.dir.display()
                ))
                .stdout(Stdio::null()),
            "pg_basebackup",
        );
        let opts = format!(
            "-k {} -F -c max_connections=300 -c shared_buffers=32MB -c listen_addresses='' \
             -c hot_standby=on",
            standby.dir.display()
        );
        run(
            standby
                .cmd("pg_ctl")
                .arg("-D")
                .arg(&data)
                .arg("-l")
                .arg(standby.dir.join("log"))
                .args(["-w", "-t", "60", "-o", &opts, "start"])
                .stdout(Stdio::null()),
            "pg_ctl start (standby)",
        );
        Ok(standby)
    }

    /// Runs SQL as the superuser on the `postgres` database of this server.
    pub fn admin_sql(&self, sql: &str) -> Vec<postgres::Row> {
        self.admin().query(sql, &[]).unwrap()
    }

    /// `pg_ctl promote`: this standby becomes a primary (waits until it accepts writes).
    pub fn promote(&self) {
        run(
            self.cmd("pg_ctl")
                .arg("-D")
                .arg(self.dir.join("data"))
                .args(["-w", "-t", "60", "promote"])
                .stdout(Stdio::null()),
            "pg_ctl promote",
        );
    }

    /// Stops the server as a crash would (`-m immediate`: no checkpoint, clients cut off).
    pub fn crash(&self) {
        run(
            self.cmd("pg_ctl")
                .arg("-D")
                .arg(self.dir.join("data"))
                .args(["-m", "immediate", "stop"])
                .stdout(Stdio::null()),
            "pg_ctl stop -m immediate",
        );
    }

    /// A new, separate server of this binary's kind (its own directory and socket), stopped
    /// when dropped: for tests that need a primary of their own (replication, crashes).
    pub fn start_own() -> Option<PgServer> {
        match PgServer::start() {
            Ok(s) => Some(s),
            Err(e) if strict() => {
                panic!("PostgreSQL tests cannot run (CI/DEPLOY_TESTS_STRICT): {e}")
            }
            Err(e) => {
                eprintln!("note: skipping a PostgreSQL test: {e}");
                None
            }
        }
    }
}
