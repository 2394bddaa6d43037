//! Every end-to-end benchmark suite runs (in `--quick` mode: small counts, figures not
//! meaningful) against the real binaries that `scripts/test.sh` builds into target/debug, and
//! writes its report and plots (also when criterion's results are missing). The filter suite needs root (namespaces, XDP) and is left out
//! otherwise, visibly. Targets are reported by the benchmarks, never asserted here.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;
use std::process::Command;

/// Whether PostgreSQL's server binaries are here (`PG_BIN_DIR`, or Debian's
/// `/usr/lib/postgresql/<version>/bin`), as `cn-backend/tests/pg` looks for them.
fn pg_binaries() -> bool {
    if let Some(d) = std::env::var_os("PG_BIN_DIR") {
        return PathBuf::from(d).join("initdb").exists();
    }
    std::fs::read_dir("/usr/lib/postgresql").is_ok_and(|dirs| {
        dirs.flatten()
            .any(|e| e.path().join("bin").join("initdb").exists())
    })
}

fn bin_dir() -> PathBuf {
    std::env::var_os("E2E_BENCH_BIN_DIR").map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/debug"),
        PathBuf::from,
    )
}

#[test]
fn every_suite_runs_in_quick_mode_and_reports() {
    let root = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false);
    let mut suites = vec!["provisioning", "issuance", "resources", "recovery"];
    if root {
        suites.push("filter");
    } else {
        eprintln!("SKIPPED the filter suite: it needs root (network namespaces, XDP)");
    }
    let out = tempfile::tempdir().unwrap();
    let doc = out.path().join("BENCHMARKS.md");
    std::fs::write(&doc, "# Benchmarks\n\nhand-written text\n").unwrap();
    let status = Command::new(env!("CARGO_BIN_EXE_e2e-bench"))
        .arg("--bin-dir")
        .arg(bin_dir())
        .arg("--out")
        .arg(out.path())
        .arg("--plots")
        .arg(out.path())
        .arg("--update-doc")
        .arg(&doc)
        .arg("--quick")
        // No criterion results on this machine: the micro-benchmark table is left out, and
        // nothing else is lost.
        .arg("--criterion")
        .arg(out.path().join("no-criterion-here"))
        .arg("--suites")
        .arg(suites.join(","))
        .status()
        .unwrap();
    let results: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.path().join("results.json")).unwrap())
            .unwrap();
    assert!(status.success(), "e2e-bench failed: {}", results["errors"]);
    assert_eq!(results["errors"], serde_json::json!([]));
    for s in &suites {
        assert!(
            results["suites"][s].is_object(),
            "no figures for suite {s}: {results}"
        );
    }
    assert!(
        results["targets"].as_array().is_some_and(|t| !t.is_empty()),
        "no target was evaluated"
    );
    // The issuance suite's PostgreSQL rows (one instance, two over one database) run wherever the
    // server binaries are, and always in CI (scripts/setup.sh installs them); else they are left
    // out with a note.
    let pg = &results["suites"]["issuance"]["postgres"];
    if pg_binaries() || std::env::var_os("CI").is_some_and(|v| !v.is_empty()) {
        for (run, instances) in [("one_instance", 1), ("two_instances", 2)] {
            assert_eq!(pg[run]["instances"], instances, "{pg}");
            assert!(
                pg[run]["credentials"].as_u64().is_some_and(|n| n > 0),
                "{pg}"
            );
            assert!(pg[run]["pg_cpu_us_per_credential"].is_number(), "{pg}");
            assert!(
                pg[run]["statements_per_batch"]
                    .as_f64()
                    .is_some_and(|s| s > 0.0),
                "{pg}"
            );
        }
        assert_eq!(pg["fsync"], "on", "{pg}");
    } else {
        eprintln!("SKIPPED the issuance suite's PostgreSQL rows: no PostgreSQL binaries");
        assert!(pg["left_out"].is_string(), "{pg}");
    }
    // The provisioning plots are real SVG documents with a line per series.
    for plot in ["provisioning-throughput.svg", "provisioning-latency.svg"] {
        let svg = std::fs::read_to_string(out.path().join(plot)).unwrap();
        assert!(svg.contains("<svg") && svg.contains("<polyline"), "{plot}");
    }
    // The generated section replaced nothing hand-written and is between its markers.
    let doc = std::fs::read_to_string(&doc).unwrap();
    assert!(doc.starts_with("# Benchmarks\n\nhand-written text\n"));
    assert!(doc.contains("<!-- e2e-bench:begin") && doc.contains("<!-- e2e-bench:end -->"));
    assert!(doc.contains("### Targets"));
    assert!(doc.contains("### Recovery: cn-backend restarts under load"));
    assert!(doc.contains("### Issuance on the PostgreSQL store: one and two instances"));
    assert!(!doc.contains("Micro-benchmarks (criterion)"));
    assert!(results["micro"].is_null());
}
