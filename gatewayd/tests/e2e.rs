//! End-to-end tests with REAL processes: `cn-backend` (built by `cargo build -p cn-backend`,
//! found in this target directory or at `$CN_BACKEND_BIN`) and `gatewayd`, on loopback with
//! port 0 and ready files, in temporary directories (started through `companion-testkit`);
//! devices are driven through the `iotdev` library.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use companion_crypto::Key128;
use companion_crypto::usim::SoftUsim;
use companion_proto::DeviceId;
use companion_proto::msg::Params;
use companion_testkit::{CnServer, Out, Scratch, cn, gateway};
use companion_transport::attach_client;
use companion_transport::cn_client::CnTarget;
use iotdev::client::{self, Attempt, ClientOptions, ProvisionParams};
use iotdev::{DeviceError, DeviceKeys};
use rustls::pki_types::CertificateDer;

mod common;
use common::*;

const SNN: &str = companion_testkit::HOME_SNN;

/// cn-backend: a data directory with the companion subscription, and its server (restartable
/// on the same QUIC port).
struct Cn {
    dir: PathBuf,
    proc: Option<Proc>,
    quic: SocketAddr,
    http: String,
}

impl Cn {
    fn init(dir: &Path, max_children: u32) -> Self {
        init_cn_dir(dir, max_children);
        let mut cn = Cn {
            dir: dir.to_path_buf(),
            proc: None,
            quic: "127.0.0.1:0".parse().unwrap(),
            http: String::new(),
        };
        cn.start();
        cn
    }

    fn start(&mut self) {
        let s = CnServer::serve(
            &bins(),
            &self.dir,
            &self.quic.to_string(),
            &self.dir.join("ready.json"),
            &self.dir.with_extension("log"),
        )
        .unwrap();
        self.quic = s.quic.parse().unwrap();
        self.http = s.http;
        self.proc = Some(s.proc);
    }

    /// SIGTERM (a clean stop) and wait for the exit.
    fn stop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.terminate(Duration::from_secs(10)).unwrap();
        }
    }

    fn signal(&self, sig: &str) {
        self.proc.as_ref().unwrap().signal(sig).unwrap();
    }

    /// `cn-backend --dir <dir> <args>`, which must succeed.
    fn cli(&self, args: &[&str]) -> Out {
        Out::of(&mut cn::cli(&bins(), &self.dir, args))
            .unwrap()
            .ok()
    }
}

struct Gw {
    dir: PathBuf,
    config: PathBuf,
    proc: Option<Proc>,
    devices: SocketAddr,
    metrics: SocketAddr,
    control: PathBuf,
    env: Vec<(String, String)>,
}

impl Gw {
    fn new(dir: &Path, cn: &Cn, batching: &str) -> Self {
        Self::with_devices(dir, cn, batching, "")
    }

    fn with_devices(dir: &Path, cn: &Cn, batching: &str, devices: &str) -> Self {
        let mut toml = gw_toml(dir, &cn.quic.to_string(), &cn.dir);
        toml.devices = devices;
        let tables = format!("[batching]\n{batching}");
        toml.tables = &tables;
        let mut gw = Gw {
            dir: dir.to_path_buf(),
            config: toml.write().unwrap(),
            proc: None,
            devices: "127.0.0.1:0".parse().unwrap(),
            metrics: "127.0.0.1:0".parse().unwrap(),
            control: PathBuf::new(),
            env: Vec::new(),
        };
        gw.start();
        gw
    }

    fn start(&mut self) {
        let mut c = gateway::command(&bins(), &self.config, &self.dir.join("ready.json"), None);
        c.envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        let g = Gatewayd::start(&self.dir, c).unwrap();
        self.devices = g.devices.parse().unwrap();
        self.metrics = g.metrics.parse().unwrap();
        self.control = g.control;
        self.proc = Some(g.proc);
    }

    fn signal(&self, sig: &str) {
        self.proc.as_ref().unwrap().signal(sig).unwrap();
    }

    /// SIGTERM, and the exit status must be success (drained).
    fn stop(&mut self) {
        let mut p = self.proc.take().unwrap();
        let st = p.terminate(Duration::from_secs(20)).unwrap();
        let st = st.expect("gatewayd did not stop after SIGTERM");
        assert!(st.success(), "gatewayd exited with {st} after SIGTERM");
    }

    fn ctl(&self, args: &[&str]) -> (bool, String) {
        let out = gateway::ctl(&bins(), &self.control, args).unwrap();
        (out.success(), format!("{}{}", out.stdout, out.stderr))
    }

    fn status(&self) -> serde_json::Value {
        ctl_status(&self.control)
    }

    fn wait_cn(&self, want: &str) {
        wait_cn(&self.control, want, Duration::from_secs(20));
    }

    fn pair(&self, keys: &DeviceKeys) {
        let code = keys.pairing_code().unwrap().to_string();
        let (ok, text) = self.ctl(&["pair", &code]);
        assert!(ok, "pair: {text}");
    }

    async fn metrics(&self) -> String {
        let addr = self.metrics.to_string();
        tokio::task::spawn_blocking(move || http::get_ok(&addr, "/metrics"))
            .await
            .unwrap()
    }
}

/// A temporary directory with a CN (the companion allowed 10 children) and a gateway on it
/// (`batching`: its `[batching]` keys) whose CN link is up.
fn stack(batching: &str) -> (Scratch, Cn, Gw) {
    stack_with(batching, "")
}

/// [`stack`] with more `[devices]` keys.
fn stack_with(batching: &str, devices: &str) -> (Scratch, Cn, Gw) {
    let tmp = scratch();
    let cn = Cn::init(&tmp.path().join("cn"), 10);
    let gw = Gw::with_devices(&tmp.path().join("gw"), &cn, batching, devices);
    gw.wait_cn("up");
    (tmp, cn, gw)
}

/// Renews `cred` through `gw` with default parameters, which must succeed.
async fn renew(
    ep: &quinn::Endpoint,
    gw: &Gw,
    keys: &DeviceKeys,
    cred: &iotdev::ProvisionedCredential,
) -> iotdev::ProvisionedCredential {
    let (supi, hpke) = (cred.bundle.supi.clone(), cred.hpke.clone());
    client::renew(
        ep,
        gw.devices,
        keys,
        &cred.request_id,
        supi,
        hpke,
        &Default::default(),
    )
    .await
    .unwrap()
}

/// A device's client configuration that trusts any gateway key, with ALPN `alpn`.
fn unpinned_client_config(keys: &DeviceKeys, alpn: &[u8]) -> quinn::ClientConfig {
    companion_transport::client_config(
        companion_transport::ServerTrust::Verifier(std::sync::Arc::new(
            companion_transport::PinnedServerVerifier::new(None),
        )),
        Some(&keys.identity),
        alpn,
        &companion_transport::Limits::device_link(),
    )
    .unwrap()
}

fn device(name: &str) -> DeviceKeys {
    DeviceKeys::generate(DeviceId::new(name).unwrap()).unwrap()
}

fn endpoint() -> quinn::Endpoint {
    quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap()
}

fn opts() -> ClientOptions {
    ClientOptions {
        connect_timeout: Duration::from_secs(5),
        stream_timeout: Duration::from_secs(10),
        patience: Duration::from_secs(20),
        ..ClientOptions::default()
    }
}

fn metric(text: &str, line_start: &str) -> f64 {
    http::metric(text, line_start).unwrap_or_else(|| panic!("metric {line_start} missing"))
}

/// Attaches to the CN with a provisioned credential.
async fn attach(
    ep: &quinn::Endpoint,
    b: &companion_proto::bundle::CredentialBundle,
) -> Result<companion_proto::msg::AttachAccept, attach_client::AttachClientError> {
    let target = CnTarget {
        addr: tokio::net::lookup_host(b.attach.endpoint.as_str())
            .await
            .unwrap()
            .find(SocketAddr::is_ipv4)
            .unwrap(),
        server_name: b.attach.server_name.clone(),
        trust_anchors: vec![CertificateDer::from(b.attach.trust_anchor.clone())],
        serving_network_name: SNN.into(),
    };
    let mut usim = SoftUsim::new(
        b.supi.to_string(),
        Key128::from_bytes(*b.k.expose()),
        Key128::from_bytes(*b.opc.expose()),
    );
    attach_client::attach(ep, &target, &mut usim).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paired_device_is_provisioned_renews_and_revocation_reaches_the_cn() {
    let (_tmp, _cn, gw) = stack("");
    let ep = endpoint();

    let mut keys = device("watch-01");
    gw.pair(&keys);
    let t0 = Instant::now();
    let attempt = Attempt::provision(Params::default()).unwrap();
    let cred = client::run(&ep, gw.devices, &keys, &attempt, &opts())
        .await
        .unwrap();
    let first_latency = t0.elapsed();
    assert!(cred.acknowledged);
    assert_eq!(cred.bundle.device_id, keys.device_id);
    assert_eq!(cred.bundle.request_id, attempt.request_id);
    assert!(cred.bundle.supi.as_str().starts_with("imsi-00101"));
    assert!(cred.bundle.expires_at > cred.bundle.issued_at);

    // A second device through the warm path, for a latency figure.
    let keys2 = device("sensor-02");
    gw.pair(&keys2);
    let t1 = Instant::now();
    let cred2 = client::provision(&ep, gw.devices, &keys2, &Default::default())
        .await
        .unwrap();
    let warm_latency = t1.elapsed();
    assert_ne!(cred2.bundle.supi, cred.bundle.supi);
    eprintln!("provisioning latency: first {first_latency:?}, warm {warm_latency:?}");

    // The credential is real: the child attaches at the CN.
    let accept = attach(&ep, &cred.bundle).await.unwrap();
    assert_eq!(accept.expires_at, cred.bundle.expires_at);

    // Renewal (pinned gateway from now on): same SUPI, request ID derived from the first.
    keys.gateway_pin = Some(cred.gateway_fingerprint);
    let renewed = renew(&ep, &gw, &keys, &cred).await;
    assert_eq!(renewed.bundle.supi, cred.bundle.supi);
    assert_eq!(
        renewed.request_id,
        gatewayd::delivery::renewal_request_id(&cred.request_id)
    );
    assert_eq!(
        renewed.request_id,
        iotdev::renewal_request_id(&cred.request_id)
    );
    assert!(renewed.bundle.expires_at >= cred.bundle.expires_at);

    let m = gw.metrics().await;
    assert!(
        metric(
            &m,
            "gatewayd_requests_total{kind=\"provision\",outcome=\"issued\"}"
        ) >= 2.0,
        "{m}"
    );
    assert!(
        metric(
            &m,
            "gatewayd_requests_total{kind=\"renew\",outcome=\"issued\"}"
        ) >= 1.0
    );
    assert!(metric(&m, "gatewayd_batch_size_count") >= 3.0);
    assert_eq!(metric(&m, "gatewayd_cn_link_state"), 2.0);
    assert_eq!(metric(&m, "gatewayd_devices_paired"), 2.0);
    let st = gw.status();
    assert_eq!(st["batching"]["max_batch"], 256);

    // Revocation: local and at the CN; the child can no longer attach.
    let (ok, text) = gw.ctl(&["revoke", "watch-01"]);
    assert!(ok, "{text}");
    assert!(text.contains(cred.bundle.supi.as_str()), "{text}");
    let (_, devices) = gw.ctl(&["devices", "--json"]);
    assert!(!devices.contains("watch-01"), "{devices}");
    let e = attach(&ep, &cred.bundle).await.unwrap_err();
    assert_eq!(
        e.code(),
        Some(companion_proto::msg::ErrorCode::CredentialRevoked),
        "{e}"
    );
    // And the revoked key is refused at the handshake now.
    let e = client::run(
        &ep,
        gw.devices,
        &keys,
        &Attempt::provision(Params::default()).unwrap(),
        &opts(),
    )
    .await
    .unwrap_err();
    assert!(matches!(e, DeviceError::NotPaired(_)), "{e}");
    // The other device still attaches.
    attach(&ep, &cred2.bundle).await.unwrap();
    // The LAN filter learned 127.0.0.1 from both devices: the address stays a paired source
    // while sensor-02 is paired, and leaves when sensor-02 is revoked too (issue 15 item 4).
    assert_eq!(gw.status()["filter"]["paired_sources"], 1);
    let (ok, text) = gw.ctl(&["revoke", "sensor-02"]);
    assert!(ok, "{text}");
    assert_eq!(gw.status()["filter"]["paired_sources"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unpaired_key_is_refused_and_the_window_admits_exactly_one_device() {
    let (_tmp, cn, gw) = stack("");
    let ep = endpoint();

    let stranger = device("stranger");
    let e = client::provision(&ep, gw.devices, &stranger, &Default::default())
        .await
        .unwrap_err();
    assert!(matches!(e, DeviceError::NotPaired(_)), "{e}");
    assert!(!e.is_retryable());
    assert!(e.to_string().contains("not paired"), "{e}");

    let (ok, text) = gw.ctl(&["pair", "--window", "60s"]);
    assert!(ok, "{text}");
    let code = text
        .lines()
        .find_map(|l| l.strip_prefix("one-time code: "))
        .unwrap()
        .trim()
        .to_string();
    let with_code = |c: &str| ProvisionParams {
        options: ClientOptions {
            window_code: Some(c.to_string()),
            ..opts()
        },
        ..Default::default()
    };
    // Issue 14 attack: whoever connects first while the window is open used to claim it. Now a
    // stranger without the owner's code — connecting first, with no code or a guessed one —
    // is refused, pairs nothing, gets nothing issued, and the window stays open.
    let e = client::provision(&ep, gw.devices, &stranger, &Default::default())
        .await
        .unwrap_err();
    assert!(matches!(e, DeviceError::NotPaired(_)), "{e}");
    let e = client::provision(&ep, gw.devices, &stranger, &with_code("00000-00000"))
        .await
        .unwrap_err();
    assert!(matches!(e, DeviceError::NotPaired(_)), "{e}");
    assert_eq!(gw.status()["pairing_window"]["wrong_codes"], 1);
    assert!(
        cn_metrics(&cn)
            .await
            .contains("cn_backend_credentials_issued_total 0")
    );
    let first = device("newcomer-1");
    let cred = client::provision(&ep, gw.devices, &first, &with_code(&code))
        .await
        .unwrap();
    assert_eq!(cred.bundle.device_id.as_str(), "newcomer-1");
    // The code is spent: the window closed with the first pairing.
    let second = device("newcomer-2");
    let e = client::provision(&ep, gw.devices, &second, &with_code(&code))
        .await
        .unwrap_err();
    assert!(matches!(e, DeviceError::NotPaired(_)), "{e}");
    let (_, devices) = gw.ctl(&["devices", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&devices).unwrap();
    let list = v.as_array().unwrap();
    assert_eq!(list.len(), 1, "{devices}");
    assert_eq!(list[0]["device"], "newcomer-1");
    assert_eq!(list[0]["paired_via"], "window");
    assert!(gw.status()["pairing_window"].is_null());
    // The window's device is a paired device from now on.
    client::provision(&ep, gw.devices, &first, &Default::default())
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cn_down_means_retry_later_and_the_gateway_recovers_by_itself() {
    let (_tmp, mut cn, gw) = stack("");
    let ep = endpoint();
    let keys = device("meter-1");
    gw.pair(&keys);

    cn.stop();
    gw.wait_cn("down");
    let attempt = Attempt::provision(Params::default()).unwrap();
    let e = client::run(&ep, gw.devices, &keys, &attempt, &opts())
        .await
        .unwrap_err();
    assert!(matches!(e, DeviceError::CnUnavailable { .. }), "{e}");
    assert!(e.is_retryable() && e.retry_after().is_some(), "{e}");
    let st = gw.status();
    assert_eq!(st["requests_outstanding"], 1, "{st}");

    cn.start();
    gw.wait_cn("up");
    let until = Instant::now() + Duration::from_secs(20);
    let cred = loop {
        match client::run(&ep, gw.devices, &keys, &attempt, &opts()).await {
            Ok(c) => break c,
            Err(e) if e.is_retryable() && Instant::now() < until => {
                tokio::time::sleep(e.retry_after().unwrap_or(Duration::from_millis(200))).await;
            }
            Err(e) => panic!("{e}"),
        }
    };
    assert_eq!(cred.request_id, attempt.request_id);
    let m = gw.metrics().await;
    assert!(
        metric(
            &m,
            "gatewayd_requests_total{kind=\"provision\",outcome=\"retry_later\"}"
        ) >= 1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_answers_busy() {
    let tmp = scratch();
    let cn = Cn::init(&tmp.path().join("cn"), 10);
    let gw = Gw::new(
        &tmp.path().join("gw"),
        &cn,
        "max_batch = 1\nmax_in_flight = 1\nqueue_capacity = 1\n",
    );
    gw.wait_cn("up");
    let ep = endpoint();
    let keys: Vec<_> = (0..3).map(|i| device(&format!("tag-{i}"))).collect();
    for k in &keys {
        gw.pair(k);
    }
    // A frozen CN: the link stays up but batches hang.
    cn.signal("-STOP");
    let mut tasks = Vec::new();
    for k in keys.iter().take(2) {
        let (ep, k, addr) = (ep.clone(), k.clone(), gw.devices);
        tasks.push(tokio::spawn(async move {
            let a = Attempt::provision(Params::default()).unwrap();
            (client::run(&ep, addr, &k, &a, &opts()).await, a, k)
        }));
        // Let the first occupy the in-flight slot before the second queues.
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    let e = client::provision(&ep, gw.devices, &keys[2], &Default::default())
        .await
        .unwrap_err();
    assert!(matches!(e, DeviceError::Busy { .. }), "{e}");
    assert!(e.is_retryable() && e.retry_after().unwrap() >= Duration::from_millis(50));
    cn.signal("-CONT");
    for t in tasks {
        let (r, a, k) = t.await.unwrap();
        let cred = match r {
            Ok(c) => c,
            Err(e) => {
                assert!(e.is_retryable(), "{e}");
                continue_after(&ep, gw.devices, &k, &a).await
            }
        };
        assert!(cred.acknowledged);
    }
    let m = gw.metrics().await;
    assert!(
        metric(
            &m,
            "gatewayd_requests_total{kind=\"provision\",outcome=\"busy\"}"
        ) >= 1.0
    );
}

/// Retries attempt `a` of device `k` (same request ID) until it succeeds.
async fn continue_after(
    ep: &quinn::Endpoint,
    addr: SocketAddr,
    k: &DeviceKeys,
    a: &Attempt,
) -> iotdev::ProvisionedCredential {
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        match client::run(ep, addr, k, a, &opts()).await {
            Ok(c) => return c,
            Err(e) if e.is_retryable() && Instant::now() < until => {
                tokio::time::sleep(e.retry_after().unwrap_or(Duration::from_millis(200))).await;
            }
            Err(e) => panic!("{e}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_gateway_knows_its_devices_and_redelivers() {
    let (_tmp, _cn, mut gw) = stack("");
    let ep = endpoint();
    let mut keys = device("car-7");
    gw.pair(&keys);
    let attempt = Attempt::provision(Params::default()).unwrap();
    let unacked = client::provision_without_ack(&ep, gw.devices, &keys, &attempt, &opts())
        .await
        .unwrap();
    assert!(!unacked.acknowledged);
    keys.gateway_pin = Some(unacked.gateway_fingerprint);

    gw.stop();
    gw.start();
    let (_, devices) = gw.ctl(&["devices", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&devices).unwrap();
    assert_eq!(v[0]["device"], "car-7", "{devices}");
    assert_eq!(v[0]["status"], "delivery_pending", "{devices}");
    assert_eq!(gw.status()["deliveries_pending"], 1);

    // The same attempt gets the same credential (kept by the gateway, not re-issued), even
    // before the CN link is back, and acknowledges it this time. The pin still matches.
    let cred = client::run(&ep, gw.devices, &keys, &attempt, &opts())
        .await
        .unwrap();
    assert!(cred.acknowledged);
    assert_eq!(cred.bundle.supi, unacked.bundle.supi);
    assert_eq!(cred.bundle.k.expose(), unacked.bundle.k.expose());
    let (_, devices) = gw.ctl(&["devices", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&devices).unwrap();
    assert_eq!(v[0]["status"], "provisioned", "{devices}");
    assert_eq!(gw.status()["deliveries_pending"], 0);
    gw.stop();
}

/// A raw connection with `keys`' certificate, for misbehaving devices.
/// A `ProvisionRequest` as a device makes it: signed with its identity key (key binding and
/// renewal authorisation), empty params.
fn signed_provision_request(
    keys: &DeviceKeys,
    request_id: companion_proto::RequestId,
    hpke_public_key: [u8; 32],
) -> companion_proto::msg::ProvisionRequest {
    let (binding, renewal_binding) = iotdev::client::sign_bindings(
        keys,
        companion_proto::binding::BindingOp::Provision,
        &request_id,
        &hpke_public_key,
    )
    .unwrap();
    companion_proto::msg::ProvisionRequest {
        request_id,
        device_id: keys.device_id.clone(),
        hpke_public_key,
        params: Params::default(),
        binding,
        renewal_binding: Some(renewal_binding),
        window_code: None,
    }
}

async fn raw_connect(
    ep: &quinn::Endpoint,
    addr: SocketAddr,
    keys: &DeviceKeys,
) -> quinn::Connection {
    let cfg = unpinned_client_config(keys, companion_transport::ALPN_DEVICE);
    ep.connect_with(cfg, addr, "gw").unwrap().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn misbehaving_devices_are_cut_off_without_affecting_others() {
    let (_tmp, _cn, gw) = stack_with("", "stream_timeout = \"1s\"\nnew_connections_per_ip = 5\n");
    let ep = endpoint();
    let names = ["garbage", "staller", "streamer", "looper"];
    let keys: Vec<_> = names.iter().map(|n| device(n)).collect();
    for k in &keys {
        gw.pair(k);
    }
    // Garbage: a frame header with version 9. The whole connection is closed.
    let conn = raw_connect(&ep, gw.devices, &keys[0]).await;
    let (mut send, _recv) = conn.open_bi().await.unwrap();
    send.write_all(&[9, 1, 0, 0, 0, 0, 0, 4, 1, 2, 3, 4])
        .await
        .unwrap();
    let closed = tokio::time::timeout(Duration::from_secs(5), conn.closed())
        .await
        .expect("a device sending garbage is cut off");
    assert!(
        matches!(closed, quinn::ConnectionError::ApplicationClosed(ref a) if a.error_code == 2u32.into()),
        "{closed:?}"
    );
    // Stall mid-frame: the stream is ended after stream_timeout with an Error frame.
    let conn = raw_connect(&ep, gw.devices, &keys[1]).await;
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(&[1, 1, 0, 0]).await.unwrap();
    let t = Instant::now();
    let answer = tokio::time::timeout(Duration::from_secs(5), recv.read_to_end(1024))
        .await
        .expect("a stalled stream is ended")
        .unwrap();
    assert!(t.elapsed() >= Duration::from_millis(900));
    assert_eq!(answer.get(1), Some(&0x7f), "an Error frame: {answer:02x?}");
    // Too many streams: the third concurrent stream is never granted.
    let conn = raw_connect(&ep, gw.devices, &keys[2]).await;
    let _s1 = conn.open_bi().await.unwrap();
    let _s2 = conn.open_bi().await.unwrap();
    let mut s1 = _s1;
    s1.0.write_all(&[1]).await.unwrap();
    let mut s2 = _s2;
    s2.0.write_all(&[1]).await.unwrap();
    assert!(
        tokio::time::timeout(Duration::from_millis(500), conn.open_bi())
            .await
            .is_err(),
        "a third concurrent stream must wait"
    );
    // Reconnecting in a loop: refused beyond the per-address rate (5/s, bursts of 10). Each
    // connection now takes a Retry round trip first, so the loop is slower and more tokens
    // refill meanwhile: the bound is on what the rate allows over the loop's duration.
    let mut refused = 0;
    let looping = Instant::now();
    for _ in 0..30 {
        let cfg_keys = &keys[3];
        let c = unpinned_client_config(cfg_keys, companion_transport::ALPN_DEVICE);
        match ep.connect_with(c, gw.devices, "gw").unwrap().await {
            Ok(c) => c.close(0u32.into(), b""),
            Err(_) => refused += 1,
        }
    }
    let allowed = 10.0 + 5.0 * looping.elapsed().as_secs_f64();
    assert!(
        refused >= 1 && f64::from(30 - refused) <= allowed + 1.0,
        "only {refused} of 30 loop connections refused in {:?}",
        looping.elapsed()
    );
    // Meanwhile a well-behaved device (from another address) is served normally.
    let good = device("good-1");
    gw.pair(&good);
    let other = quinn::Endpoint::client("127.0.0.2:0".parse().unwrap()).unwrap();
    let cred = client::provision(&other, gw.devices, &good, &Default::default())
        .await
        .unwrap();
    assert!(cred.acknowledged);
}

/// The X25519 public keys whose shared secret is all-zero (RFC 7748 §6.1).
fn low_order_keys() -> Vec<[u8; 32]> {
    companion_testkit::vectors::x25519_low_order_keys()
}

/// `GET /metrics` of cn-backend (its admin address from its ready file).
async fn cn_metrics(cn: &Cn) -> String {
    let addr = cn.http.clone();
    tokio::task::spawn_blocking(move || http::get_ok(&addr, "/metrics"))
        .await
        .unwrap()
}

/// Issue 15, attack 1 at the gateway: a paired device asks for a credential sealed to an
/// all-zero (or other low-order) X25519 key. gatewayd answers `malformed` itself: the request
/// is not recorded and no batch reaches the CN (which used to allocate a SUPI for it). The same
/// device with a real key is then provisioned normally through the iotdev library.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn low_order_hpke_keys_are_refused_without_contacting_the_cn() {
    use companion_proto::msg::{DeviceMessage, ErrorCode, Message};
    let (_tmp, cn, gw) = stack("");
    let ep = endpoint();
    let keys = device("zero-key");
    gw.pair(&keys);

    let conn = raw_connect(&ep, gw.devices, &keys).await;
    let bad = low_order_keys();
    for (i, pk) in bad.iter().enumerate() {
        let mut rid = [0u8; 16];
        rid[0] = u8::try_from(i).unwrap();
        // Correctly signed (key binding): the HPKE key is what is wrong.
        let req = DeviceMessage::ProvisionRequest(signed_provision_request(
            &keys,
            companion_proto::RequestId::from(rid),
            *pk,
        ));
        // One exchange per device at a time: a `busy` answer while the previous stream winds
        // down is retried after its `retry_after_ms`, as a device does.
        let mut tries = 0;
        let e = loop {
            tries += 1;
            assert!(tries <= 50, "{}: still busy", hex::encode(pk));
            let (mut send, mut recv) = conn.open_bi().await.unwrap();
            // The send side stays open (a device ends it only after its acknowledgement).
            send.write_all(&req.encode().unwrap()).await.unwrap();
            let answer = tokio::time::timeout(Duration::from_secs(10), recv.read_to_end(4096))
                .await
                .expect("the gateway answers")
                .unwrap();
            let _ = send.finish();
            match DeviceMessage::decode(&answer).unwrap() {
                DeviceMessage::Error(e) if e.code == ErrorCode::Busy => {
                    tokio::time::sleep(Duration::from_millis(e.retry_after_ms.unwrap_or(100)))
                        .await;
                }
                DeviceMessage::Error(e) => break e,
                other => panic!("{}: {other:?}", hex::encode(pk)),
            }
        };
        assert_eq!(e.code, ErrorCode::Malformed, "{}: {e:?}", hex::encode(pk));
        assert!(e.reason.contains("low-order"), "{e:?}");
        assert!(e.retry_after_ms.is_none());
    }
    conn.close(0u32.into(), b"");
    let st = gw.status();
    assert_eq!(st["requests_outstanding"], 0, "{st}");
    let m = gw.metrics().await;
    assert_eq!(
        metric(
            &m,
            "gatewayd_requests_total{kind=\"provision\",outcome=\"invalid\"}"
        ),
        bad.len() as f64
    );
    // Nothing reached the CN.
    let cm = cn_metrics(&cn).await;
    assert_eq!(metric(&cm, "cn_backend_batch_size_count"), 0.0, "{cm}");

    // A real key from the same device works, through the CN.
    let cred = client::provision(&ep, gw.devices, &keys, &Default::default())
        .await
        .unwrap();
    assert!(cred.acknowledged);
    let cm = cn_metrics(&cn).await;
    assert_eq!(metric(&cm, "cn_backend_batch_size_count"), 1.0, "{cm}");
    assert_eq!(metric(&cm, "cn_backend_credentials_issued_total"), 1.0);
    assert_eq!(metric(&cm, "cn_backend_invalid_items_total"), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn systemd_notifications_sighup_reload_and_sigterm() {
    let (tmp, _cn, mut gw) = stack("max_batch = 64\n");
    assert_eq!(gw.status()["batching"]["max_batch"], 64);
    gw.stop();

    let sock_path = tmp.path().join("notify.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    gw.env = vec![
        ("NOTIFY_SOCKET".into(), sock_path.display().to_string()),
        ("WATCHDOG_USEC".into(), "200000".into()),
    ];
    gw.start();
    let mut seen = String::new();
    let mut buf = [0u8; 4096];
    let until = Instant::now() + Duration::from_secs(10);
    while !(seen.contains("READY=1") && seen.contains("WATCHDOG=1")) {
        assert!(Instant::now() < until, "notifications so far: {seen}");
        let n = sock.recv(&mut buf).unwrap();
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    assert!(seen.contains("STATUS="), "{seen}");

    // SIGHUP: new batching limits apply without a restart.
    let text = std::fs::read_to_string(&gw.config).unwrap();
    std::fs::write(&gw.config, text.replace("max_batch = 64", "max_batch = 7")).unwrap();
    gw.signal("-HUP");
    let until = Instant::now() + Duration::from_secs(10);
    while gw.status()["batching"]["max_batch"] != 7 {
        assert!(
            Instant::now() < until,
            "reload not applied: {}",
            gw.status()
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // SIGTERM: STOPPING=1, exit 0 (checked by stop()).
    gw.stop();
    let mut rest = String::new();
    sock.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    while let Ok(n) = sock.recv(&mut buf) {
        rest.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    assert!(rest.contains("STOPPING=1"), "{rest}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewals_inside_the_margin_are_prefetched_for_the_device() {
    let tmp = scratch();
    let cn = Cn::init(&tmp.path().join("cn"), 10);
    let gw = Gw::new(&tmp.path().join("gw"), &cn, "");
    // Every credential is "inside the renewal margin" from the start: lifetime 1h asked for,
    // margin 2h.
    let text = std::fs::read_to_string(&gw.config).unwrap();
    std::fs::write(
        &gw.config,
        format!("{text}[credentials]\ndefault_lifetime = \"3h\"\nrenewal_margin = \"2h\"\n"),
    )
    .unwrap();
    gw.signal("-HUP");
    std::thread::sleep(Duration::from_millis(300));
    gw.wait_cn("up");
    let ep = endpoint();
    let keys = device("bracelet-1");
    gw.pair(&keys);
    let p = iotdev::ProvisionParams {
        params: Params {
            lifetime_s: Some(3600),
            ..Params::default()
        },
        ..Default::default()
    };
    let cred = client::provision(&ep, gw.devices, &keys, &p).await.unwrap();
    // The gateway renews on its own (maintenance every 5 s) and keeps the result for the device.
    let until = Instant::now() + Duration::from_secs(15);
    while gw.status()["deliveries_pending"] != 1 {
        assert!(
            Instant::now() < until,
            "no pre-fetched renewal: {}",
            gw.status()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let m0 = gw.metrics().await;
    let batches_before = metric(&m0, "gatewayd_batch_size_count");
    let renewed = renew(&ep, &gw, &keys, &cred).await;
    assert_eq!(renewed.bundle.supi, cred.bundle.supi);
    let m1 = gw.metrics().await;
    assert_eq!(
        metric(&m1, "gatewayd_batch_size_count"),
        batches_before,
        "the renewal was served from the pre-fetched delivery, without a CN round trip"
    );
    assert_eq!(gw.status()["deliveries_pending"], 0);
}

/// A greedy device asks for more than the router's owner allows (`[credentials]`: 2 days, no
/// roaming, DNN `iot` only, 256 kbit/s) while the operator's policy would grant all of it. The
/// credential it gets carries the owner's limits: device parameters only ever narrow them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_cannot_widen_the_owners_credential_settings() {
    let tmp = scratch();
    let cn = Cn::init(&tmp.path().join("cn"), 10);
    // The operator allows roaming and any DNN, 30 days, no bitrate cap.
    cn.cli(&["subscriber", "policy", COMPANION_SUPI, "--roaming", "true"]);
    let owner = "max_batch = 16\n[credentials]\ndefault_lifetime = \"2days\"\nroaming = false\n\
                 dnns = [\"iot\"]\nmax_bitrate_kbps = 256\n";
    let gw = Gw::new(&tmp.path().join("gw"), &cn, owner);
    gw.wait_cn("up");
    let ep = endpoint();
    let keys = device("greedy-watch");
    gw.pair(&keys);
    let p = iotdev::ProvisionParams {
        params: Params {
            lifetime_s: Some(30 * 86_400),
            roaming: Some(true),
            dnns: Some(vec!["internet".into(), "iot".into()]),
            max_bitrate_kbps: Some(1_000_000),
        },
        ..Default::default()
    };
    let cred = client::provision(&ep, gw.devices, &keys, &p).await.unwrap();
    let b = &cred.bundle;
    assert!(
        b.expires_at - b.issued_at <= 2 * 86_400,
        "lifetime {} s",
        b.expires_at - b.issued_at
    );
    assert!(!b.restrictions.roaming_allowed, "{:?}", b.restrictions);
    assert_eq!(b.restrictions.dnns, vec!["iot".to_string()]);
    assert_eq!(b.restrictions.max_bitrate_kbps, Some(256));
}

// ---- Forged source addresses (issue 15 item 3) ----

/// Single QUIC Initials (a full ClientHello, padded to 1200 bytes) as a client would send them
/// first, built with quinn-proto and never followed up: what an attacker who forges its source
/// address can send (it never sees the answer).
struct Forger {
    ep: quinn_proto::Endpoint,
    cfg: quinn::ClientConfig,
}

impl Forger {
    fn new(alpn: &[u8]) -> Self {
        let keys = device("forger");
        let cfg = unpinned_client_config(&keys, alpn);
        let ep = quinn_proto::Endpoint::new(
            std::sync::Arc::new(quinn_proto::EndpointConfig::default()),
            None,
            false,
            None,
        );
        Self { ep, cfg }
    }

    /// One Initial of a new connection to `to`.
    fn initial(&mut self, to: SocketAddr) -> Vec<u8> {
        let now = Instant::now();
        let (_, mut conn) = self.ep.connect(now, self.cfg.clone(), to, "gw").unwrap();
        let mut buf = Vec::new();
        let t = conn.poll_transmit(now, 1, &mut buf).unwrap();
        buf.truncate(t.size);
        assert!(buf.len() >= 1200 && buf[0] & 0xf0 == 0xc0, "an Initial");
        buf
    }

    /// Sends one Initial to `to` "from" `from` (any 127/8 address can be bound on loopback).
    fn send_from(&mut self, from: std::net::IpAddr, to: SocketAddr) {
        let pkt = self.initial(to);
        let s = std::net::UdpSocket::bind(SocketAddr::new(from, 0)).unwrap();
        s.send_to(&pkt, to).unwrap();
    }
}

fn blocked(gw: &Gw) -> Vec<String> {
    gw.status()["blocks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["addr"].as_str().unwrap().to_string())
        .collect()
}

fn labelled(text: &str, name: &str, label: &str) -> f64 {
    metric(text, &format!("{name}{{{label}}}"))
}

/// The attack: single-packet Initials with a ClientHello the gateway refuses (wrong ALPN), from
/// a forged source address. Before: ten of them blocked 127.0.0.9 for 10 minutes (persisted).
/// Now (default `retry = "always"`): each is answered with a stateless Retry that the forger
/// never sees, nothing is counted, and a real device at that address is then served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_initials_never_block_an_address_and_its_device_is_served() {
    let (_tmp, _cn, gw) = stack("");
    let victim: std::net::IpAddr = "127.0.0.9".parse().unwrap();
    let mut forger = Forger::new(b"not-companion/0");
    const FORGED: usize = 200;
    for i in 1..=FORGED {
        forger.send_from(victim, gw.devices);
        tokio::time::sleep(Duration::from_millis(5)).await;
        if i % 10 != 0 {
            continue;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        let b = blocked(&gw);
        assert!(
            !b.contains(&victim.to_string()),
            "{victim} blocked after {i} forged Initials: {b:?}"
        );
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(blocked(&gw).is_empty());
    let m = gw.metrics().await;
    assert!(
        metric(&m, "gatewayd_quic_retries_sent_total") >= FORGED as f64,
        "every forged Initial answered with a Retry"
    );
    assert_eq!(
        labelled(
            &m,
            "gatewayd_device_handshake_failures_total",
            "address=\"validated\""
        ),
        0.0
    );

    // The honest device at the forged address: Retry, then its handshake and provisioning.
    let keys = device("victim-01");
    gw.pair(&keys);
    let ep = quinn::Endpoint::client(SocketAddr::new(victim, 0)).unwrap();
    let cred = client::provision(&ep, gw.devices, &keys, &Default::default())
        .await
        .unwrap();
    assert!(cred.acknowledged);
    assert!(blocked(&gw).is_empty());
}

/// Without a Retry (`under_load` while idle, and `never`) a forged bad-ALPN ClientHello does
/// reach TLS and fails there, but from an unvalidated address: not counted. With `under_load`
/// the address becomes a suspect and its next connection gets a Retry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_handshake_from_an_unvalidated_address_is_not_counted() {
    for policy in ["under_load", "never"] {
        let (_tmp, _cn, gw) = stack_with("", &format!("retry = \"{policy}\"\n"));
        let victim: std::net::IpAddr = "127.0.0.10".parse().unwrap();
        let mut forger = Forger::new(b"not-companion/0");
        for i in 0..25 {
            forger.send_from(victim, gw.devices);
            tokio::time::sleep(Duration::from_millis(20)).await;
            if i == 0 {
                // The first failure recorded before the next Initial arrives.
                let until = Instant::now() + Duration::from_secs(10);
                while labelled(
                    &gw.metrics().await,
                    "gatewayd_device_handshake_failures_total",
                    "address=\"unvalidated\"",
                ) < 1.0
                {
                    assert!(
                        Instant::now() < until,
                        "{policy}: the first failure not seen"
                    );
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let m = gw.metrics().await;
        let unvalidated = labelled(
            &m,
            "gatewayd_device_handshake_failures_total",
            "address=\"unvalidated\"",
        );
        let retries = metric(&m, "gatewayd_quic_retries_sent_total");
        match policy {
            // The first failure makes 127.0.0.10 a suspect: the other 24 get a Retry.
            "under_load" => {
                assert_eq!(unvalidated, 1.0, "{policy}");
                assert_eq!(retries, 24.0, "{policy}");
            }
            _ => {
                assert_eq!(unvalidated, 25.0, "{policy}");
                assert_eq!(retries, 0.0, "{policy}");
            }
        }
        assert_eq!(
            labelled(
                &m,
                "gatewayd_device_handshake_failures_total",
                "address=\"validated\""
            ),
            0.0,
            "{policy}"
        );
        assert!(blocked(&gw).is_empty(), "{policy}: {:?}", blocked(&gw));
    }
}

/// The existing defence still works: a client that really is at its address (it answers the
/// Retry) and fails the handshake `block_after_failures` times is blocked, and stays out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_failures_from_a_validated_address_still_block_it() {
    for (policy, expect_failures) in [("always", 10.0), ("under_load", 10.0)] {
        let (_tmp, _cn, gw) = stack_with("", &format!("retry = \"{policy}\"\n"));
        let attacker: std::net::IpAddr = "127.0.0.11".parse().unwrap();
        let ep = quinn::Endpoint::client(SocketAddr::new(attacker, 0)).unwrap();
        let keys = device("attacker");
        let bad = unpinned_client_config(&keys, b"not-companion/0");
        let mut tries = 0;
        while !blocked(&gw).contains(&attacker.to_string()) {
            tries += 1;
            assert!(tries <= 12, "{policy}: not blocked after {tries} failures");
            let r = tokio::time::timeout(
                Duration::from_secs(3),
                ep.connect_with(bad.clone(), gw.devices, "gw").unwrap(),
            )
            .await;
            assert!(!matches!(r, Ok(Ok(_))), "{policy}: a bad ALPN must fail");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let m = gw.metrics().await;
        let validated = labelled(
            &m,
            "gatewayd_device_handshake_failures_total",
            "address=\"validated\"",
        );
        // `under_load` while idle: the first failure is unvalidated (a suspect from then on),
        // the next ten are validated.
        assert_eq!(validated, expect_failures, "{policy}");
        // Blocked: even a paired device at that address gets nowhere now.
        let good = device("good-at-attacker");
        gw.pair(&good);
        let e = tokio::time::timeout(
            Duration::from_secs(10),
            client::run(
                &ep,
                gw.devices,
                &good,
                &Attempt::provision(Params::default()).unwrap(),
                &ClientOptions {
                    connect_timeout: Duration::from_secs(2),
                    ..opts()
                },
            ),
        )
        .await;
        assert!(
            !matches!(e, Ok(Ok(_))),
            "{policy}: a blocked address was served"
        );
    }
}

/// A flood of distinct source addresses leaves every per-address table at its bound
/// (`[filter] max_tracked_sources`), evicting, and the gateway keeps serving devices.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_address_tables_stay_bounded_under_a_flood_of_sources() {
    const MAX: f64 = 256.0;
    let tmp = scratch();
    let cn = Cn::init(&tmp.path().join("cn"), 10);
    // `under_load` that never counts as loaded: forged Initials reach the connection-rate table
    // and TLS (their failures fill the suspects table); the filter's buckets see every source.
    let gw = Gw::with_devices(
        &tmp.path().join("gw"),
        &cn,
        "",
        "retry = \"under_load\"\nretry_load_handshakes = 1000000\n\
         [filter]\nmax_tracked_sources = 256\nblock_after_failures = 1000\n",
    );
    gw.wait_cn("up");
    let mut forger = Forger::new(b"not-companion/0");
    for i in 0..3000u32 {
        let src = std::net::Ipv4Addr::new(127, 1, (i / 250) as u8, (i % 250 + 1) as u8);
        forger.send_from(src.into(), gw.devices);
        if i % 50 == 49 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    // Let gatewayd work through the forged handshakes first (their failures would otherwise
    // keep evicting the real addresses below from the suspects table, as a flood should).
    let mut last = -1.0;
    loop {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let m = gw.metrics().await;
        let now = labelled(
            &m,
            "gatewayd_device_handshake_failures_total",
            "address=\"unvalidated\"",
        );
        if now == last {
            break;
        }
        last = now;
    }
    assert!(last > 256.0, "forged handshakes failed: {last}");
    // Validated failures from 400 real addresses fill the failure counters: each one's first
    // bad handshake is unvalidated (a suspect from then on), its second one follows a Retry.
    let keys = device("flooder");
    let bad = unpinned_client_config(&keys, b"not-companion/0");
    // In batches of 100 (the suspects table holds 256), each batch's second round once gatewayd
    // has recorded the first round's failures (the client learns of its failure before the
    // server's connection task records it).
    let unvalidated = |m: &str| {
        labelled(
            m,
            "gatewayd_device_handshake_failures_total",
            "address=\"unvalidated\"",
        )
    };
    for batch in 0..4u32 {
        let eps: Vec<_> = (batch * 100..(batch + 1) * 100)
            .map(|i| {
                let a = std::net::Ipv4Addr::new(127, 2, (i / 250) as u8, (i % 250 + 1) as u8);
                quinn::Endpoint::client(SocketAddr::new(a.into(), 0)).unwrap()
            })
            .collect();
        let before = unvalidated(&gw.metrics().await);
        for round in 0..2 {
            for ep in &eps {
                let r = tokio::time::timeout(
                    Duration::from_secs(3),
                    ep.connect_with(bad.clone(), gw.devices, "gw").unwrap(),
                )
                .await;
                assert!(!matches!(r, Ok(Ok(_))), "a bad ALPN must fail");
            }
            if round == 0 {
                let until = Instant::now() + Duration::from_secs(10);
                while unvalidated(&gw.metrics().await) < before + 100.0 {
                    assert!(Instant::now() < until, "first-round failures not recorded");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let m = gw.metrics().await;
    for t in [
        "filter_buckets",
        "connection_rate",
        "retry_suspects",
        "handshake_failures",
    ] {
        let entries = labelled(
            &m,
            "gatewayd_address_table_entries",
            &format!("table=\"{t}\""),
        );
        let evicted = labelled(
            &m,
            "gatewayd_address_table_evictions_total",
            &format!("table=\"{t}\""),
        );
        eprintln!("{t}: {entries} entries, {evicted} evicted");
        assert!(entries <= MAX, "{t}: {entries} entries");
        assert!(entries > 0.0, "{t}: empty");
        assert!(evicted > 0.0, "{t}: nothing evicted");
    }
    assert!(blocked(&gw).is_empty());
    // Still serving.
    let good = device("after-flood");
    gw.pair(&good);
    let ep = quinn::Endpoint::client("127.0.0.12:0".parse().unwrap()).unwrap();
    if let Err(e) = client::provision(&ep, gw.devices, &good, &Default::default()).await {
        let log = std::fs::read_dir(&gw.dir)
            .unwrap()
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().ends_with(".log"))
            .map(|e| std::fs::read_to_string(e.path()).unwrap_or_default())
            .collect::<String>();
        let tail: Vec<_> = log.lines().rev().take(40).collect();
        panic!("a device after the flood: {e}\n{}", tail.join("\n"));
    }
}

// ---------------------------------------------------------------- revocation (issue 14)

/// The parent's children at the CN, as `(SUPI, state, device)`, read with the operator's CLI.
fn cn_children(cn: &Cn) -> Vec<(String, String, String)> {
    let v = cn
        .cli(&["--json", "subscriber", "show", COMPANION_SUPI])
        .json();
    v["children"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            let s = |k: &str| c[k].as_str().unwrap().to_string();
            (s("supi"), s("state"), s("device_id"))
        })
        .collect()
}

fn active_children(cn: &Cn) -> usize {
    cn_children(cn)
        .iter()
        .filter(|(_, state, _)| state == "active")
        .count()
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let until = Instant::now() + Duration::from_secs(20);
    while !f() {
        assert!(Instant::now() < until, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Before: `gatewayctl revoke` revoked only the SUPI the gateway held, so a child issued to the
/// same device earlier stayed active at the CN (and in the quota) for its whole lifetime. Now the
/// revoke goes to the CN by device ID and every child of the device is revoked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_a_device_revokes_every_child_it_was_ever_issued() {
    let (_tmp, cn, gw) = stack("");
    let ep = endpoint();
    let keys = device("meter-9");
    gw.pair(&keys);
    let other = device("meter-10");
    gw.pair(&other);
    // Two credentials for the same device (a second provisioning replaces the first here).
    let a = client::provision(&ep, gw.devices, &keys, &Default::default())
        .await
        .unwrap();
    let b = client::provision(&ep, gw.devices, &keys, &Default::default())
        .await
        .unwrap();
    assert_ne!(a.bundle.supi, b.bundle.supi);
    client::provision(&ep, gw.devices, &other, &Default::default())
        .await
        .unwrap();
    assert_eq!(active_children(&cn), 3);

    let (ok, out) = gw.ctl(&["revoke", "meter-9"]);
    assert!(ok, "{out}");
    assert!(out.contains("revoked at the core network"), "{out}");
    let children = cn_children(&cn);
    for (supi, state, device) in &children {
        let want = if device == "meter-9" {
            "revoked"
        } else {
            "active"
        };
        assert_eq!(state, want, "{supi} of {device}: {children:?}");
    }
    assert_eq!(gw.status()["revocations_unconfirmed"], 0);
    // The revoked credentials no longer attach; the other device's still does.
    assert!(attach(&ep, &a.bundle).await.is_err());
    assert!(attach(&ep, &b.bundle).await.is_err());
}

/// Before: with no SUPI held, a revoke was marked confirmed without asking the CN. Now the
/// revoke is always asked of the CN; while the CN is down it stays pending (persisted), the
/// device ID is not provisioned again, and it is carried out once the CN is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoke_while_the_cn_is_down_is_kept_and_carried_out_later() {
    let (_tmp, mut cn, gw) = stack("");
    let ep = endpoint();
    let keys = device("lock-1");
    gw.pair(&keys);
    let cred = client::provision(&ep, gw.devices, &keys, &Default::default())
        .await
        .unwrap();
    cn.stop();
    gw.wait_cn("down");
    let (ok, out) = gw.ctl(&["revoke", "lock-1"]);
    assert!(ok, "{out}");
    assert!(out.contains("pending"), "{out}");
    assert_eq!(gw.status()["revocations_unconfirmed"], 1);
    // Re-paired under the same ID at once: nothing is issued before the CN confirmed.
    let again = device("lock-1");
    gw.pair(&again);
    let e = client::provision(&ep, gw.devices, &again, &Default::default())
        .await
        .unwrap_err();
    assert!(e.is_retryable(), "{e}");
    cn.start();
    wait_until("the revocation confirmed", || {
        gw.status()["revocations_unconfirmed"] == 0
    });
    let children = cn_children(&cn);
    assert!(
        children
            .iter()
            .any(|(s, st, _)| s == cred.bundle.supi.as_str() && st == "revoked"),
        "{children:?}"
    );
    // Now the re-paired device is provisioned; its new child stays active.
    client::provision(&ep, gw.devices, &again, &Default::default())
        .await
        .unwrap();
    assert_eq!(active_children(&cn), 1);
}

/// Before: a batch result that arrived after the device was revoked was still recorded (and the
/// child stayed active at the CN). Now it is discarded, the child is revoked at the CN, and the
/// quota slot is free. The CN is frozen (SIGSTOP) so the revoke happens while the request is at
/// the CN.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_for_a_revoked_device_is_discarded_and_revoked_at_the_cn() {
    let (_tmp, cn, gw) = stack("");
    let ep = endpoint();
    let keys = device("cam-1");
    gw.pair(&keys);
    cn.signal("-STOP");
    let waiting = {
        let ep = ep.clone();
        let addr = gw.devices;
        let keys = keys.clone();
        tokio::spawn(async move { client::provision(&ep, addr, &keys, &Default::default()).await })
    };
    wait_until("the request at the CN", || {
        gw.status()["requests_outstanding"] == 1
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let revoke = {
        let dir = gw.control.clone();
        std::thread::spawn(move || {
            Command::new(env!("CARGO_BIN_EXE_gatewayctl"))
                .arg("--socket")
                .arg(&dir)
                .args(["revoke", "cam-1"])
                .output()
                .unwrap()
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    cn.signal("-CONT");
    let out = revoke.join().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r = waiting.await.unwrap();
    assert!(r.is_err(), "the revoked device got a credential: {r:?}");
    wait_until("the orphan revoked at the CN", || {
        gw.status()["revocations_unconfirmed"] == 0 && active_children(&cn) == 0
    });
    assert_eq!(gw.status()["credentials_held"], 0);
    let m = gw.metrics().await;
    // Whichever the CN processed first (the batch or the revoke), the result came back for a
    // device no longer paired: discarded and revoked.
    assert_eq!(
        metric(&m, "gatewayd_orphan_credentials_revoked_total"),
        1.0,
        "{m}"
    );
}

/// Before: a device answering `credential_unusable` made the gateway drop the blob, but the
/// child stayed active at the CN with its quota slot. Now that new child is revoked at the CN.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credential_unusable_revokes_the_child_at_the_cn() {
    use companion_proto::device::{ClientEvent, ClientExchange};
    let (_tmp, cn, gw) = stack("");
    let ep = endpoint();
    let keys = device("broken-1");
    gw.pair(&keys);
    let conn = raw_connect(&ep, gw.devices, &keys).await;
    let attempt = Attempt::provision(Params::default()).unwrap();
    let now = Instant::now();
    let mut ex = ClientExchange::provision(
        signed_provision_request(&keys, attempt.request_id, attempt.hpke.public_key()),
        now,
        companion_proto::Config::default(),
    )
    .unwrap();
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let mut supi = None;
    let mut buf = vec![0u8; 4096];
    'outer: loop {
        while let Some(f) = ex.poll_transmit() {
            send.write_all(&f).await.unwrap();
        }
        while let Some(ev) = ex.poll_event() {
            match ev {
                ClientEvent::Delivery(d) => {
                    supi = Some(d.supi.clone());
                    // The device cannot use it (as if its storage or HPKE open failed).
                    ex.reject("test: cannot store").unwrap();
                }
                ClientEvent::Pending { .. } => {}
                other => panic!("{other:?}"),
            }
        }
        if ex.is_closed() {
            while let Some(f) = ex.poll_transmit() {
                send.write_all(&f).await.unwrap();
            }
            let _ = send.finish();
            break 'outer;
        }
        let n = tokio::time::timeout(Duration::from_secs(10), recv.read(&mut buf))
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        ex.handle_bytes(Instant::now(), &buf[..n]).unwrap();
    }
    let supi = supi.unwrap();
    wait_until("the unusable child revoked at the CN", || {
        cn_children(&cn)
            .iter()
            .any(|(s, st, _)| s == supi.as_str() && st == "revoked")
    });
    wait_until("the revocation confirmed", || {
        gw.status()["revocations_unconfirmed"] == 0
    });
    assert_eq!(gw.status()["deliveries_pending"], 0);
    let m = gw.metrics().await;
    assert_eq!(
        metric(&m, "gatewayd_orphan_credentials_revoked_total"),
        1.0,
        "{m}"
    );
    // The device tries again with a new request and gets a working credential.
    let retry = ProvisionParams {
        retry_for: Duration::from_secs(10),
        ..Default::default()
    };
    let cred = client::provision(&ep, gw.devices, &keys, &retry)
        .await
        .unwrap();
    assert_ne!(cred.bundle.supi, supi);
    assert_eq!(active_children(&cn), 1);
}

// ---------------------------------------------------------------- bundle authenticity

/// The operator CA (DER) from the CN's directory: what a device's factory configuration holds.
fn operator_ca_der(cn: &Cn) -> Vec<u8> {
    use rustls::pki_types::pem::PemObject;
    CertificateDer::from_pem_file(cn.dir.join("ca.pem"))
        .unwrap()
        .as_ref()
        .to_vec()
}

/// Issue 14, bundle authenticity: the CN signs every bundle under the operator CA. A device
/// whose factory configuration holds that CA provisions through the real gateway and CN (the
/// genuine bundle verifies); a bundle that anyone posing as its gateway made up — sealed to the
/// device's own HPKE key, so it opens — is refused, unsigned or signed under another CA.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_with_the_operator_anchor_refuses_a_bundle_the_gateway_made_up() {
    use companion_proto::bundle::{AttachInfo, BundleSignature, CredentialBundle, HomeNetwork};
    use companion_proto::msg::{CredentialDelivery, Restrictions, Sealed};
    let (_tmp, cn, gw) = stack("");
    let ep = endpoint();
    let anchor = operator_ca_der(&cn);
    let mut keys = device("anchored-1");
    keys.operator_anchor = Some(anchor.clone());
    gw.pair(&keys);
    // The genuine path: signed by the CN, accepted.
    let cred = client::provision(&ep, gw.devices, &keys, &Default::default())
        .await
        .unwrap();
    let sig = cred
        .bundle
        .operator_signature
        .as_ref()
        .expect("signed bundle");
    assert_eq!(sig.scheme, 0x0403);
    companion_transport::verify_bundle(&cred.bundle, &anchor).unwrap();
    attach(&ep, &cred.bundle).await.unwrap();

    // The forger: a first-use LAN attacker (or a compromised gateway) with its own "CN".
    let evil_ca = companion_transport::OperatorCa::generate("evil operator").unwrap();
    let evil_cn = evil_ca.issue_server(&["cn.evil.example".into()]).unwrap();
    let attempt = Attempt::provision(Params::default()).unwrap();
    let forge = |bundle: &CredentialBundle| {
        let pt = bundle.encode().unwrap();
        let s = companion_crypto::hpke::seal_credential(
            &attempt.hpke.public_key(),
            keys.device_id.as_str(),
            attempt.request_id.as_bytes(),
            &pt,
        )
        .unwrap();
        CredentialDelivery {
            request_id: attempt.request_id,
            supi: bundle.supi.clone(),
            expires_at: bundle.expires_at,
            sealed: Sealed {
                enc: s.enc,
                ciphertext: s.ciphertext,
            },
        }
    };
    let mut fake = CredentialBundle {
        version: companion_proto::bundle::BUNDLE_VERSION,
        device_id: keys.device_id.clone(),
        request_id: attempt.request_id,
        supi: companion_proto::Supi::new("imsi-001019999999999").unwrap(),
        k: companion_proto::bundle::Key128::from_bytes([7; 16]),
        opc: companion_proto::bundle::Key128::from_bytes([8; 16]),
        amf: [0x80, 0],
        sqn_start: 0,
        issued_at: 1_800_000_000,
        expires_at: 4_000_000_000,
        restrictions: Restrictions::default(),
        attach: AttachInfo {
            endpoint: "203.0.113.66:4433".into(),
            server_name: "cn.evil.example".into(),
            trust_anchor: evil_ca.cert_der().as_ref().to_vec(),
        },
        home_network: HomeNetwork {
            mcc: "001".into(),
            mnc: "01".into(),
        },
        operator_signature: None,
    };
    // Unsigned.
    let e = client::open_delivery(&keys, &attempt, &forge(&fake)).unwrap_err();
    assert!(e.contains("not signed"), "{e}");
    // Signed under the forger's own CA (and naming it as the attach trust anchor).
    let msg = fake.signed_message().unwrap();
    let s = companion_transport::sign_binding(&evil_cn, &msg).unwrap();
    fake.operator_signature = Some(BundleSignature::new(
        vec![evil_cn.chain()[0].as_ref().to_vec()],
        s.scheme,
        s.signature,
    ));
    assert!(client::open_delivery(&keys, &attempt, &forge(&fake)).is_err());
    // Naming the real operator CA but signed by the forger: the chain does not verify.
    fake.attach.trust_anchor = anchor.clone();
    fake.attach.server_name = cred.bundle.attach.server_name.clone();
    assert!(client::open_delivery(&keys, &attempt, &forge(&fake)).is_err());
    // The genuine signature transplanted onto other contents does not verify either.
    let mut transplanted = fake.clone();
    transplanted.operator_signature = cred.bundle.operator_signature.clone();
    assert!(client::open_delivery(&keys, &attempt, &forge(&transplanted)).is_err());
    // Without a factory anchor the device cannot tell (documented in SECURITY.md).
    let mut tofu = keys.clone();
    tofu.operator_anchor = None;
    assert!(client::open_delivery(&tofu, &attempt, &forge(&fake)).is_ok());
}

/// A device whose identity key is Ed25519 (the pairing code's `K` may be Ed25519 or ECDSA
/// P-256, PROTOCOL.md §10): it pairs, passes mutual TLS, signs its key binding with scheme
/// 0x0807, is provisioned and attaches.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ed25519_device_is_provisioned_and_attaches() {
    let (_tmp, _cn, gw) = stack("");
    let ep = endpoint();
    let keys = DeviceKeys {
        device_id: DeviceId::new("ed-1").unwrap(),
        identity: companion_transport::Identity::self_signed_ed25519("ed-1").unwrap(),
        gateway_pin: None,
        operator_anchor: None,
    };
    let (_, sig) = iotdev::client::sign_bindings(
        &keys,
        companion_proto::binding::BindingOp::Provision,
        &companion_proto::RequestId::from([1; 16]),
        &[9; 32],
    )
    .unwrap();
    assert_eq!(sig.scheme, 0x0807);
    gw.pair(&keys);
    let cred = client::provision(&ep, gw.devices, &keys, &Default::default())
        .await
        .unwrap();
    attach(&ep, &cred.bundle).await.unwrap();
}

fn run_ok(cmd: &mut Command) -> String {
    Out::of(cmd).unwrap().ok().stdout
}

/// Manufacturer attestation end to end (PROTOCOL.md §4.5), with the real binaries: a test
/// manufacturer made with `iotdev factory`, its root installed with `cn-backend attestation
/// add-root`, and a parent that requires attestation. A device initialised from its factory
/// identity presents the chain in TLS; gatewayd forwards it; the CN issues. A device with a
/// self-signed key, paired just the same, is refused by the CN with the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_factory_attested_device_is_provisioned_where_attestation_is_required() {
    let tmp = scratch();
    let cn = Cn::init(&tmp.path().join("cn"), 10);
    let maker = tmp.path().join("maker");
    let iotdev = bin("iotdev");
    run_ok(
        Command::new(&iotdev)
            .args(["factory", "ca", "--name", "Acme devices", "--out"])
            .arg(&maker),
    );
    run_ok(
        Command::new(&iotdev)
            .args(["factory", "device", "--id", "meter-7", "--ca"])
            .arg(&maker)
            .arg("--out")
            .arg(&maker),
    );
    let cn_cli = |args: &[&str]| cn.cli(args);
    cn_cli(&[
        "attestation",
        "add-root",
        "--name",
        "acme",
        maker.join("manufacturer-ca.pem").to_str().unwrap(),
    ]);
    cn_cli(&[
        "subscriber",
        "policy",
        COMPANION_SUPI,
        "--require-attestation",
        "true",
    ]);

    // The device's ID comes from its factory certificate.
    let dev_dir = tmp.path().join("meter-7");
    let out = run_ok(
        Command::new(&iotdev)
            .arg("--dir")
            .arg(&dev_dir)
            .args(["init", "--no-qr", "--factory-cert"])
            .arg(maker.join("meter-7.pem"))
            .arg("--factory-key")
            .arg(maker.join("meter-7.key")),
    );
    assert!(out.contains("created device meter-7"), "{out}");
    let attested = iotdev::Device::open(&dev_dir).unwrap().keys().clone();
    assert_eq!(attested.identity.chain().len(), 2);

    let gw = Gw::new(&tmp.path().join("gw"), &cn, "");
    gw.wait_cn("up");
    let ep = endpoint();
    let plain = device("plain-7");
    gw.pair(&plain);
    gw.pair(&attested);

    match client::provision(&ep, gw.devices, &plain, &Default::default()).await {
        Err(DeviceError::PolicyDenied(why)) => {
            assert!(why.contains("manufacturer attestation"), "{why}");
        }
        other => panic!("a self-signed device was not refused: {other:?}"),
    }
    let cred = client::provision(&ep, gw.devices, &attested, &Default::default())
        .await
        .unwrap();
    assert_eq!(cred.bundle.device_id.as_str(), "meter-7");
    attach(&ep, &cred.bundle).await.unwrap();
    let m = cn_metrics(&cn).await;
    assert!(
        m.contains("cn_backend_attestation_total{result=\"verified\"} 1"),
        "{m}"
    );

    // The gateway keeps the chain with the pairing, durably (renewals it pre-fetches while the
    // device is away carry it too).
    let mut gw = gw;
    gw.stop();
    let state = rusqlite::Connection::open(gw.dir.join("state/gatewayd.db")).unwrap();
    let stored: Option<Vec<u8>> = state
        .query_row(
            "SELECT attestation FROM pairings WHERE device_id = 'meter-7'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    let chain = companion_proto::msg::AttestationChain::from_cbor(&stored.unwrap()).unwrap();
    assert_eq!(chain.certs()[0], attested.identity.chain()[0].to_vec());
}
