//! Where the workspace's binaries are: the target directory the running test binary was built
//! into (`target/<profile>`, next to its `deps/`), a directory named by an environment variable,
//! or one binary named by `$<NAME>_BIN` (e.g. `GATEWAYD_BIN`, to measure another build).

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{Error, Result};

/// A directory of binaries.
#[derive(Debug, Clone)]
pub struct Bins {
    /// The directory.
    pub dir: PathBuf,
}

impl Bins {
    /// The binaries in `dir`.
    pub fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_path_buf(),
        }
    }

    /// The directory named by `$dir_var` when set, else the target directory of the running
    /// executable (`target/<profile>/deps/<test>` → `target/<profile>`).
    pub fn of_test(dir_var: &str) -> Self {
        if let Some(d) = std::env::var_os(dir_var) {
            return Self::new(Path::new(&d));
        }
        let exe = std::env::current_exe().unwrap_or_default();
        let dir = exe
            .parent()
            .and_then(Path::parent)
            .map_or_else(PathBuf::new, Path::to_path_buf);
        Self { dir }
    }

    /// `$<NAME>_BIN` when set (`cn-backend` → `CN_BACKEND_BIN`), else `name` in this directory.
    pub fn path(&self, name: &str) -> PathBuf {
        let var = format!("{}_BIN", name.to_uppercase().replace('-', "_"));
        std::env::var_os(var).map_or_else(|| self.dir.join(name), PathBuf::from)
    }

    /// Fails, with the command that builds them, unless every one of `names` exists.
    pub fn require(&self, names: &[&str], build_hint: &str) -> Result<()> {
        for n in names {
            let p = self.path(n);
            if !p.exists() {
                return Err(Error::Unexpected {
                    what: format!("the `{n}` binary"),
                    detail: format!("{} not found: {build_hint}", p.display()),
                });
            }
        }
        Ok(())
    }

    /// A command running `name`.
    pub fn command(&self, name: &str) -> Command {
        Command::new(self.path(name))
    }

    /// A command running daemon `name` without the service manager's variables
    /// (`NOTIFY_SOCKET`, `WATCHDOG_*`) the test runner may have inherited; inside network
    /// namespace `netns` (`ip netns exec`) when given.
    pub fn daemon(&self, name: &str, netns: Option<&str>) -> Command {
        let mut c = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(self.path(name));
                c
            }
            None => self.command(name),
        };
        c.env_remove("NOTIFY_SOCKET")
            .env_remove("WATCHDOG_USEC")
            .env_remove("WATCHDOG_PID");
        c
    }
}

/// A binary of the running test's target directory (or `$<NAME>_BIN`); panics, with the command
/// that builds it, when it is missing.
pub fn bin(name: &str) -> PathBuf {
    let bins = Bins::of_test("TESTKIT_BIN_DIR");
    let p = bins.path(name);
    assert!(
        p.exists(),
        "the `{name}` binary is missing at {}: build the workspace's binaries first with \
         `cargo build --workspace --bins` (scripts/test.sh does), or set TESTKIT_BIN_DIR",
        p.display()
    );
    p
}
