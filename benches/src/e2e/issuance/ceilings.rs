//! The ceilings cn-backend cannot beat on this machine, each measured on one thread: HPKE seals,
//! the whole per-credential crypto, and durable SQLite inserts of credential-sized rows.

use super::*;

/// One ceiling measurement on one thread.
#[derive(Debug, Clone, Serialize)]
pub struct Ceiling {
    /// What was measured.
    pub what: String,
    /// Operations done.
    pub ops: u64,
    /// Wall-clock seconds.
    pub wall_s: f64,
    /// CPU time of the measuring thread.
    pub cpu_s: f64,
    /// Operations per wall-clock second.
    pub per_wall_s: f64,
    /// Operations per CPU-second of the measuring thread.
    pub per_cpu_s: f64,
    /// CPU microseconds per operation.
    pub cpu_us_per_op: f64,
}

impl Ceiling {
    pub(super) fn new(what: String, ops: u64, wall: Duration, cpu: Duration) -> Self {
        let (w, c) = (wall.as_secs_f64(), cpu.as_secs_f64().max(1e-9));
        Self {
            what,
            ops,
            wall_s: round(w, 3),
            cpu_s: round(c, 3),
            per_wall_s: round(ops as f64 / w, 0),
            per_cpu_s: round(ops as f64 / c, 0),
            cpu_us_per_op: round(c * 1e6 / ops as f64, 2),
        }
    }
}

pub(crate) fn thread_cpu() -> anyhow::Result<Duration> {
    // The first field of schedstat is the time this thread spent on a CPU, in nanoseconds.
    let s = fs::read_to_string("/proc/thread-self/schedstat")
        .context("reading /proc/thread-self/schedstat")?;
    let ns: u64 = s
        .split_whitespace()
        .next()
        .and_then(|f| f.parse().ok())
        .ok_or_else(|| anyhow!("unexpected /proc/thread-self/schedstat: {s}"))?;
    Ok(Duration::from_nanos(ns))
}

/// Runs `op` on this thread until `budget` has passed (at least `min_ops` times).
pub(crate) fn measure(
    what: String,
    budget: Duration,
    min_ops: u64,
    mut op: impl FnMut() -> anyhow::Result<u64>,
) -> anyhow::Result<Ceiling> {
    let (t0, c0) = (Instant::now(), thread_cpu()?);
    let mut ops = 0u64;
    while ops < min_ops || t0.elapsed() < budget {
        ops += op()?;
    }
    let (wall, cpu) = (t0.elapsed(), thread_cpu()?.saturating_sub(c0));
    Ok(Ceiling::new(what, ops, wall, cpu))
}

/// HPKE seal of a bundle-sized plaintext to a fixed device key.
pub(super) fn seal_ceiling(budget: Duration) -> anyhow::Result<Ceiling> {
    let device = DeviceHpkeKey::try_generate()?;
    let pk = device.public_key();
    let pt = bundle_sized_plaintext();
    let rid = [7u8; 16];
    let what = format!(
        "HPKE seal ({} B plaintext, X25519 + ChaCha20-Poly1305)",
        pt.len()
    );
    measure(what, budget, 20, || {
        seal_credential(&pk, "bench-device", &rid, &pt)?;
        Ok(1)
    })
}

/// Everything cn-backend computes per credential: the device's key binding checked (SPKI
/// fingerprint and one ECDSA P-256 verification, PROTOCOL.md §4.4), fresh K, OPc from the
/// operator OP, K and OPc encrypted under the KEK (XChaCha20-Poly1305, random nonces), the CBOR
/// bundle (with the operator CA certificate) signed with the CN's key (one ECDSA P-256
/// signature, §4.6) and the HPKE seal.
pub(super) fn credential_crypto_ceiling(budget: Duration) -> anyhow::Result<Ceiling> {
    let device = DeviceHpkeKey::try_generate()?;
    let pk = device.public_key();
    let op = Key128::try_random()?;
    let kek = cn_backend::kek::Kek::from_bytes(&[0x42; cn_backend::kek::KEK_LEN]);
    let ca = OperatorCa::generate("issuance bench CA")?;
    let attach = AttachInfo {
        endpoint: "127.0.0.1:4433".into(),
        server_name: "localhost".into(),
        trust_anchor: ca.cert_der().as_ref().to_vec(),
    };
    let device_id = DeviceId::new("bench-device-000001")?;
    let supi = Supi::new("imsi-001010900000001")?;
    let rid = [9u8; 16];
    // The device's key and its binding of the HPKE key to this request, as a gateway forwards
    // them; the CN's bundle-signing key (its server identity under the operator CA).
    let device_key = companion_transport::Identity::self_signed(device_id.as_str())?;
    let spki = device_key.spki_der()?;
    let fingerprint = companion_transport::spki_fingerprint(&spki);
    let binding_msg = companion_proto::binding::binding_message(
        companion_proto::binding::BindingOp::Provision,
        &RequestId::from(rid),
        &device_id,
        &pk,
    );
    let binding = companion_transport::sign_binding(&device_key, &binding_msg)?;
    let signer =
        companion_transport::IdentitySigner::new(&ca.issue_server(&["localhost".into()])?)?;
    let leaf: Vec<Vec<u8>> = signer.chain().iter().take(1).cloned().collect();
    let mut bundle_len = 0;
    let mut c = measure(
        "all per-credential crypto (key binding check, K, OPc, KEK wrap x2, signed bundle, HPKE \
         seal)"
            .into(),
        budget,
        20,
        || {
            ensure!(
                companion_transport::spki_fingerprint(&spki) == fingerprint,
                "fingerprint"
            );
            companion_transport::verify_binding(&spki, &binding_msg, &binding)?;
            let k = Key128::try_random()?;
            let opc = Milenage::compute_opc(&k, op.expose());
            let row = |column| cn_backend::kek::RowId {
                table: "children",
                row: supi.as_str(),
                column,
            };
            let k_enc = kek.seal(row("k"), &k)?;
            let opc_enc = kek.seal(row("opc"), &opc)?;
            std::hint::black_box((k_enc, opc_enc));
            let bundle = CredentialBundle {
                version: BUNDLE_VERSION,
                device_id: device_id.clone(),
                request_id: RequestId::from(rid),
                supi: supi.clone(),
                k,
                opc,
                amf: [0x80, 0x00],
                sqn_start: 0,
                issued_at: 1_800_000_000,
                expires_at: 1_802_592_000,
                restrictions: Restrictions::default(),
                attach: attach.clone(),
                home_network: companion_proto::bundle::HomeNetwork {
                    mcc: "001".into(),
                    mnc: "01".into(),
                },
                operator_signature: None,
            };
            let sig = signer.sign(&bundle.signed_message()?)?;
            let pt = CredentialBundle {
                operator_signature: Some(companion_proto::bundle::BundleSignature::new(
                    leaf.clone(),
                    sig.scheme,
                    sig.signature,
                )),
                ..bundle
            }
            .encode()?;
            bundle_len = pt.len();
            seal_credential(&pk, device_id.as_str(), &rid, &pt)?;
            Ok(1)
        },
    )?;
    c.what = format!("{} ({bundle_len} B bundle)", c.what);
    Ok(c)
}

/// Durable inserts of credential-sized rows with cn-backend's pragmas, `rows_per_tx` rows per
/// `BEGIN IMMEDIATE ... COMMIT`.
pub(super) fn sqlite_ceiling(
    path: &Path,
    rows_per_tx: usize,
    budget: Duration,
) -> anyhow::Result<Ceiling> {
    let conn = Connection::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
    ensure!(mode.eq_ignore_ascii_case("wal"), "WAL refused: {mode}");
    conn.execute_batch(
        "PRAGMA synchronous = FULL;
         PRAGMA foreign_keys = ON;
         PRAGMA trusted_schema = OFF;
         CREATE TABLE credentials (
             supi TEXT PRIMARY KEY,
             device_id TEXT NOT NULL,
             request_id BLOB NOT NULL,
             k_enc BLOB NOT NULL,
             opc_enc BLOB NOT NULL,
             sealed BLOB NOT NULL,
             issued_at INTEGER NOT NULL,
             expires_at INTEGER NOT NULL
         ) STRICT;",
    )?;
    // What cn-backend keeps per credential: K and OPc under the KEK (57 B each) and the sealed
    // bundle (enc + ciphertext + tag).
    let key_enc = vec![0xa5u8; cn_backend::kek::SEALED_KEY_LEN];
    let sealed = vec![0x5au8; 32 + bundle_sized_plaintext().len() + 16];
    let mut conn = conn;
    let mut next = 0u64;
    let what = format!(
        "SQLite durable insert, {rows_per_tx} row{} per transaction ({} B per row)",
        if rows_per_tx == 1 { "" } else { "s" },
        20 + 24 + 16 + 2 * key_enc.len() + sealed.len() + 16
    );
    measure(what, budget, 2 * rows_per_tx as u64, || {
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        {
            let mut st = tx.prepare_cached(
                "INSERT INTO credentials (supi, device_id, request_id, k_enc, opc_enc, sealed, \
                 issued_at, expires_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            )?;
            for _ in 0..rows_per_tx {
                next += 1;
                st.execute(params![
                    format!("imsi-00101{next:010}"),
                    format!("bench-device-{next:08}"),
                    next.to_be_bytes().repeat(2),
                    key_enc,
                    key_enc,
                    sealed,
                    1_800_000_000i64,
                    1_802_592_000i64,
                ])?;
            }
        }
        tx.commit()?;
        Ok(rows_per_tx as u64)
    })
}
