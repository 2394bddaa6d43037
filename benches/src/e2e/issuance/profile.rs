//! An extra run of full batches profiled with `perf record -g` (`E2E_BENCH_PERF=1`): the hottest
//! symbols of cn-backend.

use super::*;

/// One line of `perf report`.
#[derive(Debug, Clone, Serialize)]
pub struct Hot {
    /// Share of the samples, percent.
    pub percent: f64,
    /// The binary or library.
    pub dso: String,
    /// The function.
    pub symbol: String,
}

/// Profiles cn-backend (`perf record -g`) while full batches run; returns the hottest symbols.
pub(super) fn profile(
    cn: &Cn,
    client: &Client,
    d: &Devices,
    batch: usize,
    budget: Duration,
    dir: &Path,
    out: &Path,
) -> anyhow::Result<Vec<Hot>> {
    let data = dir.join("perf.data");
    let mut rec = Command::new("perf")
        .args(["record", "-g", "-F", "999", "-o"])
        .arg(&data)
        .args(["-p", &cn.daemon.pid().to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting perf record (is perf installed?)")?;
    std::thread::sleep(Duration::from_millis(300));
    let driven = drive(&[(cn, client)], d, batch, budget, None);
    // perf record writes its data on SIGINT.
    let _ = Command::new("kill")
        .args(["-INT", &rec.id().to_string()])
        .status();
    rec.wait().context("waiting for perf record")?;
    driven?;
    let report = |children: &str, limit: &str| -> anyhow::Result<String> {
        let out = Command::new("perf")
            .args([
                "report",
                children,
                "--stdio",
                "-g",
                "none",
                "--sort",
                "dso,symbol",
            ])
            .args(["--percent-limit", limit, "-i"])
            .arg(&data)
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .output()
            .context("running perf report")?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let flat = report("--no-children", "0.3")?;
    let inclusive = report("--children", "2")?;
    let saved = out.join("issuance-perf.txt");
    fs::write(
        &saved,
        format!(
            "# cn-backend issuing batches of {batch}: self time\n{flat}\n\
             # the same samples, time including callees\n{inclusive}"
        ),
    )
    .with_context(|| format!("writing {}", saved.display()))?;
    let mut hot = Vec::new();
    for line in flat.lines() {
        let l = line.trim();
        let Some((pct, rest)) = l.split_once('%') else {
            continue;
        };
        let Ok(percent) = pct.trim().parse::<f64>() else {
            continue;
        };
        let mut f = rest.split_whitespace();
        let dso = f.next().unwrap_or_default().to_owned();
        // "[.] symbol" (user) or "[k] symbol" (kernel); perf may pad with "-" columns.
        let mut symbol: Vec<&str> = f.skip(1).collect();
        while symbol.last().is_some_and(|w| *w == "-") {
            symbol.pop();
        }
        hot.push(Hot {
            percent,
            dso,
            symbol: symbol.join(" "),
        });
        if hot.len() == 15 {
            break;
        }
    }
    Ok(hot)
}
