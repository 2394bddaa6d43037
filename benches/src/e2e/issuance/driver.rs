//! The stand-in gateway that drives the real cn-backend: fresh devices and their signed items,
//! authenticated sessions with batches in flight, every result checked and a sample of the
//! sealed credentials opened with the devices' keys.

use super::*;

/// Fresh devices: one batch item each (own HPKE key, request ID, key fingerprint).
pub(super) struct Devices {
    pub(super) items: Arc<Vec<BatchItem>>,
    pub(super) keys: Vec<DeviceHpkeKey>,
}

pub(super) fn devices(tag: &str, n: usize) -> anyhow::Result<Devices> {
    let mut items = Vec::with_capacity(n);
    let mut keys = Vec::with_capacity(n);
    // One device identity signs every item's key binding (the CN verifies each signature; it
    // does not care that the devices share a key). Signing is set-up, outside the timed part.
    let identity = companion_transport::Identity::self_signed("bench-device")?;
    let spki = identity.spki_der()?;
    let fp = companion_transport::spki_fingerprint(&spki);
    for i in 0..n {
        let key = DeviceHpkeKey::try_generate()?;
        let rid = RequestId::from(*Secret::<16>::try_random()?.expose());
        let device_id = DeviceId::new(&format!("bench-{tag}-{i:07}"))?;
        let msg = companion_proto::binding::binding_message(
            companion_proto::binding::BindingOp::Provision,
            &rid,
            &device_id,
            &key.public_key(),
        );
        items.push(BatchItem {
            attestation: None,
            kind: ItemKind::Provision,
            request_id: rid,
            device_id,
            device_key_fingerprint: fp,
            hpke_public_key: key.public_key(),
            params: Params::default(),
            supi: None,
            device_spki: spki.clone(),
            binding: companion_transport::sign_binding(&identity, &msg)?,
        });
        keys.push(key);
    }
    Ok(Devices {
        items: Arc::new(items),
        keys,
    })
}

/// What the batch workers bring back.
#[derive(Default)]
pub(super) struct Tally {
    pub(super) credentials: u64,
    pub(super) batches: u64,
    pub(super) latencies: Vec<Duration>,
    /// (index of the device, its result) for the opening check.
    pub(super) sample: Vec<(usize, ItemResult)>,
}

pub(super) fn check_result(
    start: usize,
    sent: &[BatchItem],
    r: &BatchResult,
) -> anyhow::Result<()> {
    ensure!(
        r.items.len() == sent.len(),
        "batch {start}: {} results for {} items",
        r.items.len(),
        sent.len()
    );
    for (it, res) in sent.iter().zip(&r.items) {
        ensure!(
            res.request_id == it.request_id,
            "batch {start}: results out of order"
        );
        if res.outcome != Outcome::Issued || res.sealed.is_none() || res.supi.is_none() {
            bail!(
                "batch {start}: item {} was not issued: {:?} ({})",
                it.device_id.as_str(),
                res.outcome,
                res.reason.as_deref().unwrap_or("no reason given")
            );
        }
    }
    Ok(())
}

pub(super) async fn worker(
    session: CnSession,
    items: Arc<Vec<BatchItem>>,
    cursor: Arc<AtomicUsize>,
    batch: usize,
    until: Instant,
) -> anyhow::Result<Tally> {
    let mut t = Tally::default();
    loop {
        if Instant::now() >= until {
            break;
        }
        let start = cursor.fetch_add(batch, Ordering::Relaxed);
        if start >= items.len() {
            break;
        }
        let end = (start + batch).min(items.len());
        let sent = &items[start..end];
        let t0 = Instant::now();
        let r = session
            .batch(BatchProvision {
                batch_id: start as u64,
                items: sent.to_vec(),
            })
            .await
            .with_context(|| format!("batch of {} items at {start}", sent.len()))?;
        t.latencies.push(t0.elapsed());
        check_result(start, sent, &r)?;
        t.credentials += sent.len() as u64;
        t.batches += 1;
        if t.sample.len() < OPEN_SAMPLE
            && let Some(first) = r.items.into_iter().next()
        {
            t.sample.push((start, first));
        }
    }
    Ok(t)
}

/// Opens a sealed credential with its device's key and checks what it carries.
pub(super) fn open_check(d: &Devices, index: usize, r: &ItemResult) -> anyhow::Result<()> {
    let item = d
        .items
        .get(index)
        .ok_or_else(|| anyhow!("no device {index}"))?;
    let key = d.keys.get(index).ok_or_else(|| anyhow!("no key {index}"))?;
    let sealed = r
        .sealed
        .as_ref()
        .ok_or_else(|| anyhow!("no sealed credential"))?;
    let pt = open_credential(
        key,
        item.device_id.as_str(),
        item.request_id.as_bytes(),
        &SealedCredential {
            enc: sealed.enc,
            ciphertext: sealed.ciphertext.clone(),
        },
    )
    .with_context(|| format!("opening the credential of {}", item.device_id.as_str()))?;
    let b = CredentialBundle::decode(&pt)?;
    b.check_for(&item.device_id, &item.request_id)?;
    ensure!(
        Some(&b.supi) == r.supi.as_ref(),
        "the sealed SUPI differs from the announced one"
    );
    Ok(())
}

pub(super) struct Client {
    pub(super) rt: tokio::runtime::Runtime,
    pub(super) _endpoint: quinn::Endpoint,
    pub(super) sessions: Vec<CnSession>,
    pub(super) max_batch: usize,
}

/// Authenticated sessions to `cn` as `companion` (supi, K, OPc).
pub(super) fn connect(cn: &Cn, companion: (&str, &str, &str)) -> anyhow::Result<Client> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("building the driver's runtime")?;
    let addr: SocketAddr = cn.quic()?.parse().context("the CN's QUIC address")?;
    let anchors = CertificateDer::pem_file_iter(cn.ca_file())
        .with_context(|| format!("reading {}", cn.ca_file().display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("parsing {}", cn.ca_file().display()))?;
    let target = CnTarget {
        addr,
        server_name: "localhost".into(),
        trust_anchors: anchors,
        serving_network_name: SNN.into(),
    };
    let (endpoint, sessions, max_batch) = rt.block_on(async {
        let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse()?)
            .context("the driver's QUIC endpoint")?;
        let mut usim = SoftUsim::new(
            companion.0.into(),
            Key128::from_hex(companion.1)?,
            Key128::from_hex(companion.2)?,
        );
        let opts = ClientOptions {
            connect_timeout: Duration::from_secs(10),
            exchange_timeout: Duration::from_secs(60),
        };
        let mut sessions = Vec::new();
        let mut max_batch = usize::MAX;
        for _ in 0..SESSIONS {
            let (s, policy) = CnSession::connect_with(&endpoint, &target, &mut usim, opts)
                .await
                .context("authenticating to cn-backend as the companion")?;
            max_batch = max_batch.min(usize::try_from(policy.max_batch_items)?);
            sessions.push(s);
        }
        anyhow::Ok((endpoint, sessions, max_batch))
    })?;
    ensure!(max_batch > 0, "the CN allows no batch items");
    Ok(Client {
        rt,
        _endpoint: endpoint,
        sessions,
        max_batch,
    })
}

/// Issues `d` in batches of `batch` through every (instance, client) of `fleet` at once until
/// `budget` has passed or the devices run out. With `pg`, also measures the PostgreSQL server.
pub(super) fn drive(
    fleet: &[(&Cn, &Client)],
    d: &Devices,
    batch: usize,
    budget: Duration,
    mut pg: Option<&mut PgProbe>,
) -> anyhow::Result<CnRun> {
    let cursor = Arc::new(AtomicUsize::new(0));
    let me = std::process::id();
    if let Some(p) = pg.as_deref_mut() {
        p.reset_statements()?;
    }
    let pg0 = pg.as_deref().map(PgProbe::cpu).transpose()?;
    let cn0 = fleet
        .iter()
        .map(|(cn, _)| cn.daemon.cpu())
        .collect::<anyhow::Result<Vec<_>>>()?;
    let me0 = cpu_time(me)?;
    let t0 = Instant::now();
    let until = t0 + budget;
    // One thread per client, each running its client's runtime: the instances are driven
    // concurrently.
    let tallies = std::thread::scope(|scope| {
        let handles: Vec<_> = fleet
            .iter()
            .map(|(_, client)| {
                let cursor = cursor.clone();
                scope.spawn(move || {
                    client.rt.block_on(async {
                        let mut set = tokio::task::JoinSet::new();
                        for s in &client.sessions {
                            for _ in 0..IN_FLIGHT_PER_SESSION {
                                set.spawn(worker(
                                    s.clone(),
                                    d.items.clone(),
                                    cursor.clone(),
                                    batch,
                                    until,
                                ));
                            }
                        }
                        let mut out = Vec::new();
                        while let Some(r) = set.join_next().await {
                            out.push(r.context("batch worker panicked")??);
                        }
                        anyhow::Ok(out)
                    })
                })
            })
            .collect();
        let mut out = Vec::new();
        for h in handles {
            out.extend(
                h.join()
                    .map_err(|_| anyhow!("a driver thread panicked"))??,
            );
        }
        anyhow::Ok(out)
    })?;
    let wall = t0.elapsed();
    let mut cn_cpu = 0.0;
    for ((cn, _), c0) in fleet.iter().zip(cn0) {
        cn_cpu += cn.daemon.cpu()?.saturating_sub(c0).as_secs_f64();
    }
    let me_cpu = cpu_time(me)?.saturating_sub(me0).as_secs_f64();
    let pg_cpu = match (pg.as_deref(), pg0) {
        (Some(p), Some(c0)) => Some(p.cpu()?.saturating_sub(c0).as_secs_f64()),
        _ => None,
    };
    let statements = pg.as_deref_mut().map(PgProbe::statements).transpose()?;
    let mut all = Tally::default();
    for t in tallies {
        all.credentials += t.credentials;
        all.batches += t.batches;
        all.latencies.extend(t.latencies);
        all.sample.extend(t.sample);
    }
    ensure!(all.credentials > 0, "no credential was issued");
    all.sample.truncate(OPEN_SAMPLE);
    for (i, r) in &all.sample {
        open_check(d, *i, r)?;
    }
    all.latencies.sort_unstable();
    let pct = |p: f64| {
        let i = ((all.latencies.len() as f64 - 1.0) * p).round() as usize;
        all.latencies
            .get(i)
            .map_or(0.0, |l| round(l.as_secs_f64() * 1e3, 2))
    };
    let w = wall.as_secs_f64();
    let n = all.credentials as f64;
    let sessions: usize = fleet.iter().map(|(_, c)| c.sessions.len()).sum();
    Ok(CnRun {
        store: if pg.is_some() { "postgres" } else { "sqlite" },
        instances: fleet.len(),
        batch_size: batch,
        sessions,
        batches_in_flight: sessions * IN_FLIGHT_PER_SESSION,
        credentials: all.credentials,
        batches: all.batches,
        wall_s: round(w, 3),
        per_wall_s: round(n / w, 0),
        cn_cpu_s: round(cn_cpu, 2),
        per_cn_cpu_s: round(n / cn_cpu.max(0.01), 0),
        cn_cpu_us_per_credential: round(cn_cpu * 1e6 / n, 1),
        cn_cores_busy: round(cn_cpu / w, 2),
        driver_cores_busy: round(me_cpu / w, 2),
        batch_p50_ms: pct(0.5),
        batch_p99_ms: pct(0.99),
        opened: all.sample.len(),
        pg_cpu_s: pg_cpu.map(|c| round(c, 2)),
        pg_cpu_us_per_credential: pg_cpu.map(|c| round(c * 1e6 / n, 1)),
        statements_per_batch: statements.map(|s| round(s as f64 / all.batches as f64, 2)),
    })
}
