//! Test support for the workspace's suites and for `e2e-bench`: one way to start each binary
//! (`cn-backend`, `gatewayd`, `gatewayctl`, `iotdev`, `loadgen`) with its configuration, wait for
//! its ready file, kill it when the handle is dropped, and keep its log and its directory when a
//! test fails.
//!
//! - [`bins`]: where the binaries are (the target directory of the running test, or overrides).
//! - [`process`]: [`Proc`] (SIGKILL on drop, log tail printed on failure), [`start`] (spawn and
//!   wait for a ready file), [`Out`] (what a finished command printed).
//! - [`scratch`](mod@scratch): temporary directories kept (and named on stderr) when the test panics.
//! - [`cn`]: `cn-backend init`, the companion subscription, `cn-backend serve`.
//! - [`gateway`]: `gatewayd`'s configuration, the daemon, `gatewayctl` and the control socket.
//! - [`http`]: plain HTTP/1.1 GETs and Prometheus text parsing.
//! - [`net`]: `ip` commands and static neighbour entries in network namespaces.
//! - [`vectors`]: test vectors the suites share.
#![warn(missing_docs)]

pub mod bins;
pub mod cn;
pub mod gateway;
pub mod http;
pub mod net;
pub mod process;
pub mod scratch;
pub mod vectors;

pub use bins::{Bins, bin};
pub use cn::CnServer;
pub use gateway::{GatewayToml, Gatewayd};
pub use process::{Out, Proc, Started, start, wait_until};
pub use scratch::{Scratch, scratch};

/// The companion's own subscription (the router's SIM): TS 35.208 test set 1.
pub const COMPANION_SUPI: &str = "imsi-001010000000001";
/// K of the companion subscription (TS 35.208 test set 1).
pub const COMPANION_K: &str = "465b5ce8b199b49faa5f0a2ee238a6bc";
/// OPc of the companion subscription (TS 35.208 test set 1).
pub const COMPANION_OPC: &str = "cd63cb71954a9f4e48a5994e37a02baf";
/// The home serving network name of the test PLMN (MCC 001, MNC 01).
pub const HOME_SNN: &str = "5G:mnc001.mcc001.3gppnetwork.org";
/// A visited network's serving network name (MCC 208, MNC 02): a roaming attach.
pub const VISITED_SNN: &str = "5G:mnc002.mcc208.3gppnetwork.org";

/// Whether a missing external program (PostgreSQL's server, a MongoDB stand-in) fails the
/// test instead of skipping it: on CI (`CI` set) or with `DEPLOY_TESTS_STRICT=1`.
pub fn strict() -> bool {
    std::env::var_os("CI").is_some_and(|v| !v.is_empty())
        || std::env::var("DEPLOY_TESTS_STRICT").is_ok_and(|v| v == "1")
}

/// What can go wrong while starting or driving a binary.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file or process operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The process exited before it wrote its ready file.
    #[error("{name} exited before it was ready ({status}); its log:\n{log}")]
    Exited {
        /// The process's name.
        name: String,
        /// How it exited.
        status: std::process::ExitStatus,
        /// The end of its log.
        log: String,
    },
    /// No ready file within the limit.
    #[error("{name} not ready after {limit:?}; its log:\n{log}")]
    NotReady {
        /// The process's name.
        name: String,
        /// How long it was given.
        limit: std::time::Duration,
        /// The end of its log.
        log: String,
    },
    /// A command ran and exited non-zero.
    #[error("{what} failed ({status}): {stderr}")]
    Failed {
        /// The command.
        what: String,
        /// How it exited.
        status: std::process::ExitStatus,
        /// Its standard error (and output), trimmed.
        stderr: String,
    },
    /// A daemon or tool answered something this kit does not understand.
    #[error("{what}: {detail}")]
    Unexpected {
        /// What was read.
        what: String,
        /// What was wrong with it.
        detail: String,
    },
}

/// Results of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Attaches a description to an I/O error.
pub(crate) fn io<T>(r: std::io::Result<T>, what: impl FnOnce() -> String) -> Result<T> {
    r.map_err(|source| Error::Io {
        what: what(),
        source,
    })
}
