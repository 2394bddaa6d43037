//! The PostgreSQL rows of the suite: a throwaway server with the statement counter, one and two
//! cn-backend instances over one database, and their targets and markdown.

use super::*;

/// The PostgreSQL server of the bench, its database and what measures it.
pub(super) struct PgProbe {
    /// A superuser connection to the bench's database (reset and read the statement counter).
    pub(super) db: postgres::Client,
    /// Kept for its drop, after `db`'s: stops the server and removes its directory.
    pub(super) _server: pg::PgServer,
    /// The bench database's URL for cn-backend.
    pub(super) url: String,
    pub(super) postmaster: u32,
    pub(super) version: String,
    pub(super) fsync: String,
}

/// The statements counted: the bench database's, without the probe's own.
pub(super) const PG_COUNTED: &str = "FROM pg_stat_statements \
     WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database()) \
     AND query NOT LIKE '%pg_stat_statements%'";

impl PgProbe {
    /// Starts the server with [`PG_OPTIONS`] and makes database `bench` with pg_stat_statements.
    /// `Ok(Err(why))` when there is no PostgreSQL to start (binaries missing).
    pub(super) fn start() -> anyhow::Result<Result<Self, String>> {
        // The tests' helper panics when initdb or pg_ctl fails: a real failure here too.
        let server = match std::panic::catch_unwind(|| pg::PgServer::start_private_with(PG_OPTIONS))
        {
            Ok(Ok(s)) => s,
            Ok(Err(why)) => return Ok(Err(why)),
            Err(_) => bail!("PostgreSQL did not start (initdb or pg_ctl failed, see above)"),
        };
        let connect = |db: &str| {
            postgres::Config::new()
                .host_path(server.socket_dir())
                .user("postgres")
                .dbname(db)
                .connect(postgres::NoTls)
                .with_context(|| format!("connecting to PostgreSQL database {db}"))
        };
        connect("postgres")?
            .batch_execute("CREATE DATABASE bench")
            .context("CREATE DATABASE bench")?;
        let mut db = connect("bench")?;
        db.batch_execute("CREATE EXTENSION pg_stat_statements")
            .context("CREATE EXTENSION pg_stat_statements")?;
        let show = |db: &mut postgres::Client, what: &str| -> anyhow::Result<String> {
            Ok(db
                .query_one(&format!("SHOW {what}"), &[])
                .with_context(|| format!("SHOW {what}"))?
                .get(0))
        };
        let (version, fsync) = (show(&mut db, "server_version")?, show(&mut db, "fsync")?);
        let pidfile = server.dir.join("data").join("postmaster.pid");
        let postmaster = fs::read_to_string(&pidfile)
            .with_context(|| format!("reading {}", pidfile.display()))?
            .lines()
            .next()
            .and_then(|l| l.trim().parse().ok())
            .ok_or_else(|| anyhow!("no pid on the first line of {}", pidfile.display()))?;
        let url = server.url("bench");
        Ok(Ok(Self {
            _server: server,
            db,
            url,
            postmaster,
            version,
            fsync,
        }))
    }

    pub(super) fn cpu(&self) -> anyhow::Result<Duration> {
        tree_cpu_time(self.postmaster)
    }

    pub(super) fn reset_statements(&mut self) -> anyhow::Result<()> {
        self.db
            .batch_execute("SELECT pg_stat_statements_reset()")
            .context("pg_stat_statements_reset()")
    }

    pub(super) fn statements(&mut self) -> anyhow::Result<i64> {
        Ok(self
            .db
            .query_one(
                &format!("SELECT coalesce(sum(calls), 0)::bigint {PG_COUNTED}"),
                &[],
            )
            .context("reading pg_stat_statements")?
            .get(0))
    }

    /// The statements since the last reset that took the server longest: (calls, total
    /// execution ms, the statement's start).
    pub(super) fn top_statements(&mut self, n: i64) -> anyhow::Result<Vec<(i64, f64, String)>> {
        Ok(self
            .db
            .query(
                &format!(
                    "SELECT calls, round(total_exec_time::numeric, 1)::float8, \
                     left(regexp_replace(query, '\\s+', ' ', 'g'), 100) \
                     {PG_COUNTED} ORDER BY total_exec_time DESC LIMIT $1"
                ),
                &[&n],
            )
            .context("reading pg_stat_statements")?
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect())
    }
}

/// The PostgreSQL rows of one run.
#[derive(Debug, Clone, Serialize)]
pub struct PgRuns {
    /// The PostgreSQL server's version.
    pub server_version: String,
    /// The server's `fsync` setting during the runs (`on`: durable commits).
    pub fsync: String,
    /// One instance, batches of 1 (to show that statements per batch do not grow with its size).
    pub one_instance_batches_of_1: CnRun,
    /// One instance, full batches.
    pub one_instance: CnRun,
    /// Two instances over the same database, full batches, driven concurrently.
    pub two_instances: CnRun,
    /// The statements of the one-instance full-batch run that took the server longest:
    /// (calls, total execution ms, statement).
    pub top_statements: Vec<(i64, f64, String)>,
}

/// The PostgreSQL runs, `n` fresh devices for each full-batch run (twice that for two
/// instances). `Ok(Err(why))` when there is no PostgreSQL to run them on.
pub(super) fn postgres_runs(
    env: &Env,
    dir: &Path,
    budget: Duration,
    n: usize,
) -> anyhow::Result<Result<PgRuns, String>> {
    let mut probe = match PgProbe::start()? {
        Ok(p) => p,
        Err(why) => return Ok(Err(why)),
    };
    let n1 = if env.quick { 32 } else { 4_000 };
    eprintln!("issuance: {} fresh device keys for PostgreSQL", n1 + 3 * n);
    let d1 = devices("pg1", n1)?;
    let d_one = devices("pga", n)?;
    let d_two = devices("pgb", 2 * n)?;
    let quota = (n1 + 3 * n + 1000) as u64;
    let bins = &env.bins;
    let (dir_a, dir_b) = (dir.join("pg-a"), dir.join("pg-b"));
    fs::create_dir_all(&dir_a).with_context(|| format!("creating {}", dir_a.display()))?;
    let cn_dir = Cn::init(bins, &dir_a, Some(&probe.url))?;
    for c in [COMPANION_1, COMPANION_2] {
        Cn::add_companion(bins, &cn_dir, c, quota)?;
    }
    // The second instance's host: a copy of the one data directory (same KEK, keys, config).
    let cn_dir_b = Cn::copy_dir(&cn_dir, &dir_b)?;
    let a = Cn::serve(bins, &cn_dir, &dir_a, None)?;
    let ca = connect(&a, COMPANION_1)?;
    let full = ca.max_batch;
    eprintln!("issuance: PostgreSQL, one instance, batches of 1");
    let one_1 = drive(&[(&a, &ca)], &d1, 1, budget / 2, Some(&mut probe))
        .context("PostgreSQL, batches of 1")?;
    eprintln!("issuance: PostgreSQL, one instance, batches of {full}");
    let one = drive(&[(&a, &ca)], &d_one, full, budget, Some(&mut probe))
        .context("PostgreSQL, one instance, full batches")?;
    let top_statements = probe.top_statements(12)?;
    let b = Cn::serve(bins, &cn_dir_b, &dir_b, None)?;
    let cb = connect(&b, COMPANION_2)?;
    let full = full.min(cb.max_batch);
    eprintln!("issuance: PostgreSQL, two instances, batches of {full}");
    let two = drive(
        &[(&a, &ca), (&b, &cb)],
        &d_two,
        full,
        budget,
        Some(&mut probe),
    )
    .context("PostgreSQL, two instances, full batches")?;
    for client in [ca, cb] {
        for s in &client.sessions {
            s.close();
        }
    }
    a.daemon.stop()?;
    b.daemon.stop()?;
    Ok(Ok(PgRuns {
        server_version: probe.version.clone(),
        fsync: probe.fsync.clone(),
        one_instance_batches_of_1: one_1,
        one_instance: one,
        two_instances: two,
        top_statements,
    }))
}

/// The issue 16 targets: PostgreSQL's per-CPU-second rate against SQLite's, and statements per
/// batch that do not grow with the batch.
pub(super) fn pg_targets(sqlite: &CnRun, p: &PgRuns) -> Vec<Target> {
    let share = |r: &CnRun| r.per_cn_cpu_s / sqlite.per_cn_cpu_s.max(1.0);
    let (one, two) = (&p.one_instance, &p.two_instances);
    let stmts = |r: &CnRun| r.statements_per_batch.unwrap_or(f64::NAN);
    let (s1, sn, s2) = (stmts(&p.one_instance_batches_of_1), stmts(one), stmts(two));
    // BEGIN and COMMIT are statements but ride on the round trips the unit test counts.
    let bound = PG_ROUND_TRIPS_PER_BATCH + 2.0;
    let constant = (sn - s1).abs() < 1.0 && (s2 - s1).abs() < 1.0 && sn <= bound;
    vec![
        Target {
            goal: format!(
                "PostgreSQL store ≥ {:.0}% of SQLite's credentials per cn-backend CPU-second \
                 (full batches)",
                TARGET_PG_SHARE * 100.0
            ),
            measured: format!(
                "one instance {:.0}/CPU-s ({:.0}%), two instances {:.0}/CPU-s ({:.0}%), \
                 SQLite {:.0}/CPU-s; PostgreSQL server CPU {:.1} and {:.1} µs per credential",
                one.per_cn_cpu_s,
                share(one) * 100.0,
                two.per_cn_cpu_s,
                share(two) * 100.0,
                sqlite.per_cn_cpu_s,
                one.pg_cpu_us_per_credential.unwrap_or(f64::NAN),
                two.pg_cpu_us_per_credential.unwrap_or(f64::NAN),
            ),
            holds: share(one) >= TARGET_PG_SHARE && share(two) >= TARGET_PG_SHARE,
        },
        Target {
            goal: format!(
                "a batch costs PostgreSQL a constant number of round trips ({} by \
                 tests/postgres.rs), whatever its size",
                PG_ROUND_TRIPS_PER_BATCH
            ),
            measured: format!(
                "statements per batch (pg_stat_statements): {s1} for batches of 1, {sn} for \
                 batches of {} on one instance, {s2} on two",
                one.batch_size
            ),
            holds: constant,
        },
    ]
}

/// The PostgreSQL table and what would limit 10 or 100 instances.
pub(super) fn pg_markdown(quick: bool, sqlite: &CnRun, pg: &Result<PgRuns, String>) -> String {
    let mut m = String::new();
    let _ = writeln!(
        m,
        "\n### Issuance on the PostgreSQL store: one and two instances\n"
    );
    let p = match pg {
        Ok(p) => p,
        Err(why) => {
            let _ = writeln!(
                m,
                "*Left out in this run: no PostgreSQL server could be started ({why}).*"
            );
            return m;
        }
    };
    let _ = writeln!(
        m,
        "The same full batches on a throwaway PostgreSQL {} server on this machine (Unix socket, \
         `fsync={}`, `synchronous_commit=on`: every commit durable, as SQLite's \
         `synchronous=FULL`), first one cn-backend instance, then two instances over the same \
         database, each from a copy of one data directory, driven at once by a client of its own \
         (a companion of its own: one companion's batches queue for its parent row on any \
         instance). cn-backend CPU is summed over the instances; the server's CPU is the \
         postmaster's and all its children's (backends, WAL writer, checkpointer; user + system, \
         from `/proc`); statements are `pg_stat_statements` calls (BEGIN and COMMIT included) \
         divided by batches.{}\n",
        p.server_version,
        p.fsync,
        if quick {
            " *Quick run: tiny counts, the figures mean little.*"
        } else {
            ""
        }
    );
    let _ = writeln!(
        m,
        "| store | instances | batch | credentials | wall s | per second (wall) | per cn-backend \
         CPU-s | of SQLite's | cn-backend CPU µs per credential | PostgreSQL CPU µs per \
         credential | statements per batch |"
    );
    let _ = writeln!(m, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let opt = |v: Option<f64>| v.map_or_else(|| "–".to_owned(), |v| v.to_string());
    for r in [
        sqlite,
        &p.one_instance_batches_of_1,
        &p.one_instance,
        &p.two_instances,
    ] {
        let _ = writeln!(
            m,
            "| {} | {} | {} | {} | {} | {} | **{}** | {:.0}% | {} | {} | {} |",
            if r.store == "sqlite" {
                "SQLite"
            } else {
                "PostgreSQL"
            },
            r.instances,
            r.batch_size,
            r.credentials,
            r.wall_s,
            r.per_wall_s,
            r.per_cn_cpu_s,
            r.per_cn_cpu_s * 100.0 / sqlite.per_cn_cpu_s.max(1.0),
            r.cn_cpu_us_per_credential,
            opt(r.pg_cpu_us_per_credential),
            opt(r.statements_per_batch),
        );
    }
    let _ = writeln!(m);
    if !p.top_statements.is_empty() {
        let _ = writeln!(
            m,
            "The statements of the one-instance run of full batches ({} batches), longest total \
             execution time first (`pg_stat_statements.total_exec_time`: the server's wall time in \
             the statement, lock waits and waits for a core included, so the parent row's \
             `FOR UPDATE`, where a companion's batches queue, leads without costing CPU):\n",
            p.one_instance.batches
        );
        let _ = writeln!(m, "| calls | total ms | statement |");
        let _ = writeln!(m, "|---:|---:|---|");
        for (calls, ms, q) in &p.top_statements {
            let _ = writeln!(m, "| {calls} | {ms} | `{}` |", q.replace('|', "\\|"));
        }
        let _ = writeln!(m);
    }
    // What one PostgreSQL core could take, from the measured server CPU per credential.
    let two = &p.two_instances;
    let pg_us = two
        .pg_cpu_us_per_credential
        .or(p.one_instance.pg_cpu_us_per_credential)
        .unwrap_or(f64::NAN)
        .max(0.01);
    let pg_core = 1e6 / pg_us;
    let cn_core = two.per_cn_cpu_s.max(1.0);
    let per_pg_core = pg_core / cn_core;
    let need = |instances: f64| instances * cn_core * pg_us / 1e6;
    let stmts = two.statements_per_batch.unwrap_or(f64::NAN);
    let batch = two.batch_size as f64;
    let _ = writeln!(
        m,
        "**What would limit 10 or 100 instances.** With two instances the server spent {pg_us:.1} \
         µs of CPU per credential, so one PostgreSQL core could take about {pg_core:.0} \
         credentials per second in batches of {batch}, while one cn-backend core issues \
         {cn_core:.0}: the database's CPU becomes the bottleneck at about {per_pg_core:.1} \
         busy cn-backend cores per PostgreSQL core. 10 instances with a busy core each \
         ({:.0} credentials/s) would need about {:.1} PostgreSQL cores, 100 instances ({:.0}/s) \
         about {:.0}, all on the one primary: a single-primary database scales up, not out, \
         so 100 instances are held to what one server's cores, commit rate and WAL bandwidth \
         allow ({:.0} commits/s and {:.0} statements/s at 100 instances, at {stmts} statements \
         per batch). Before the CPU: connections (a pool of up to 8 per instance, 800 for 100 \
         instances: raise `max_connections` or put PgBouncer in between), and one companion's \
         batches queue for its parent row whatever the number of instances. Measured on one \
         machine whose cores the server, the instances and this driver share; the CPU per \
         credential is the figure that carries over, the wall rates do not.",
        10.0 * cn_core,
        need(10.0),
        100.0 * cn_core,
        need(100.0),
        100.0 * cn_core / batch,
        100.0 * cn_core / batch * stmts,
    );
    m
}
