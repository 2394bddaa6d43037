//! End-to-end benchmarks: the real binaries (release build), each stage measured against the
//! ceiling it cannot beat on the same machine, side by side in one run. Driven by the
//! `e2e-bench` binary (`scripts/bench.sh`); figures and method in `docs/BENCHMARKS.md`.
//!
//! Every suite returns a [`SuiteReport`]: its raw figures (JSON), a markdown section, and the
//! performance targets of issue #8 it checks. Targets are reported, never asserted.

pub mod filter;
pub mod harness;
pub mod issuance;
pub mod plot;
pub mod provisioning;
pub mod recovery;
pub mod resources;

use std::path::PathBuf;

use serde::Serialize;

use harness::Bins;

/// What every suite gets.
#[derive(Debug)]
pub struct Env {
    /// The binaries under test.
    pub bins: Bins,
    /// Scratch space for daemons' directories (removed after the run).
    pub work: PathBuf,
    /// Where plots (SVG) go.
    pub out: PathBuf,
    /// Small counts and short runs: checks that the suites work, figures mean little.
    pub quick: bool,
    /// Provisioning suite: run only these concurrencies (empty = the whole plan).
    pub concurrencies: Vec<usize>,
    /// Provisioning suite: run only these modes (`handshake`, `smart`, `size1`, `smart-wan`,
    /// `size1-wan`; empty = all).
    pub modes: Vec<String>,
}

impl Env {
    /// A fresh scratch directory `work/<name>`.
    pub fn scratch(&self, name: &str) -> anyhow::Result<PathBuf> {
        let d = self.work.join(name);
        if d.exists() {
            std::fs::remove_dir_all(&d)?;
        }
        std::fs::create_dir_all(&d)?;
        Ok(d)
    }
}

/// A performance target and whether this run met it.
#[derive(Debug, Clone, Serialize)]
pub struct Target {
    /// What is promised, e.g. "smart batching ≥ 5× batch size 1 at concurrency 512".
    pub goal: String,
    /// What was measured, e.g. "7.9× (1412/s vs 179/s)".
    pub measured: String,
    /// Whether the measurement meets the goal.
    pub holds: bool,
}

/// One suite's results.
#[derive(Debug, Clone, Serialize)]
pub struct SuiteReport {
    /// The suite's name (`issuance`, `provisioning`, ...).
    pub name: &'static str,
    /// Raw figures.
    pub data: serde_json::Value,
    /// A markdown section (starting with a `###` heading): tables and a few lines on what bounds
    /// the stage.
    #[serde(skip)]
    pub markdown: String,
    /// The targets the suite checks.
    pub targets: Vec<Target>,
}

/// Rounds to `digits` decimals (for reports).
pub fn round(x: f64, digits: i32) -> f64 {
    let m = 10f64.powi(digits);
    (x * m).round() / m
}
