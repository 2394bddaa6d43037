//! End-to-end tests with REAL processes: `cn-backend` (built by `cargo build -p cn-backend`,
//! found at `target/debug/cn-backend` or `$CN_BACKEND_BIN`) and `gatewayd`, on loopback with
//! port 0 and ready files, in temporary directories; devices are driven through the `iotdev`
//! library.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use companion_crypto::Key128;
use companion_crypto::usim::SoftUsim;
use companion_proto::DeviceId;
use companion_proto::msg::Params;
use companion_transport::attach_client;
use companion_transport::cn_client::CnTarget;
use iotdev::client::{self, Attempt, ClientOptions};
use iotdev::{DeviceError, DeviceKeys};
use rustls::pki_types::CertificateDer;

mod common;
use common::*;

const SNN: &str = "5G:mnc001.mcc001.3gppnetwork.org";

fn signal(child: &Child, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill {sig} failed");
}

struct Cn {
    dir: PathBuf,
    proc: Option<Proc>,
    quic: SocketAddr,
}

impl Cn {
    fn init(dir: &Path, max_children: u32) -> Self {
        init_cn_dir(dir, max_children);
        let mut cn = Cn {
            dir: dir.to_path_buf(),
            proc: None,
            quic: "127.0.0.1:0".parse().unwrap(),
        };
        cn.start();
        cn
    }

    fn start(&mut self) {
        let ready = self.dir.join("ready.json");
        let _ = std::fs::remove_file(&ready);
        let mut child = Command::new(bin("cn-backend"))
            .arg("--dir")
            .arg(&self.dir)
            .arg("serve")
            .arg("--listen")
            .arg(self.quic.to_string())
            .args(["--http-listen", "127.0.0.1:0", "--ready-file"])
            .arg(&ready)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let v = wait_json(&ready, &mut child, "cn-backend", None);
        self.quic = v["quic"].as_str().unwrap().parse().unwrap();
        self.proc = Some(Proc(child));
    }

    /// SIGTERM (a clean stop) and wait for the exit.
    fn stop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            signal(&p.0, "-TERM");
            let until = Instant::now() + Duration::from_secs(10);
            while p.0.try_wait().unwrap().is_none() && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    fn child(&self) -> &Child {
        &self.proc.as_ref().unwrap().0
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
        std::fs::create_dir_all(dir).unwrap();
        let cred = dir.join("companion.toml");
        std::fs::write(
            &cred,
            format!(
                "supi = \"{COMPANION_SUPI}\"\nk = \"{COMPANION_K}\"\nopc = \"{COMPANION_OPC}\"\n"
            ),
        )
        .unwrap();
        std::fs::set_permissions(&cred, std::fs::Permissions::from_mode(0o600)).unwrap();
        let config = dir.join("gatewayd.toml");
        std::fs::write(
            &config,
            format!(
                r#"state_dir = "{state}"
log_level = "info,gatewayd=debug"
drain_timeout = "5s"
[devices]
listen = "127.0.0.1:0"
{devices}
[cn]
endpoint = "{cn}"
server_name = "localhost"
ca_file = "{ca}"
reconnect_min = "100ms"
reconnect_max = "500ms"
request_timeout = "3s"
[companion]
credential_file = "{cred}"
[control]
socket = "{sock}"
[metrics]
listen = "127.0.0.1:0"
[batching]
{batching}
"#,
                state = dir.join("state").display(),
                cn = cn.quic,
                ca = cn.dir.join("ca.pem").display(),
                cred = cred.display(),
                sock = dir.join("control.sock").display(),
            ),
        )
        .unwrap();
        let mut gw = Gw {
            dir: dir.to_path_buf(),
            config,
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
        let ready = self.dir.join("ready.json");
        let _ = std::fs::remove_file(&ready);
        let log = std::fs::File::create(self.dir.join(format!(
            "gatewayd-{}.log",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        )))
        .unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_gatewayd"))
            .arg("--config")
            .arg(&self.config)
            .arg("--ready-file")
            .arg(&ready)
            .env_remove("RUST_LOG")
            .env_remove("NOTIFY_SOCKET")
            .env_remove("WATCHDOG_USEC")
            .env_remove("WATCHDOG_PID")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let v = wait_json(&ready, &mut child, "gatewayd", None);
        self.devices = v["devices"].as_str().unwrap().parse().unwrap();
        self.metrics = v["metrics"].as_str().unwrap().parse().unwrap();
        self.control = PathBuf::from(v["control"].as_str().unwrap());
        self.proc = Some(Proc(child));
    }

    /// SIGTERM, and the exit status must be success (drained).
    fn stop(&mut self) {
        let mut p = self.proc.take().unwrap();
        signal(&p.0, "-TERM");
        let until = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(st) = p.0.try_wait().unwrap() {
                assert!(st.success(), "gatewayd exited with {st} after SIGTERM");
                break;
            }
            assert!(
                Instant::now() < until,
                "gatewayd did not stop after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn ctl(&self, args: &[&str]) -> (bool, String) {
        let out = Command::new(env!("CARGO_BIN_EXE_gatewayctl"))
            .arg("--socket")
            .arg(&self.control)
            .args(args)
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    }

    fn status(&self) -> serde_json::Value {
        let (ok, text) = self.ctl(&["status", "--json"]);
        assert!(ok, "{text}");
        serde_json::from_str(&text).unwrap()
    }

    fn wait_cn(&self, want: &str) {
        let until = Instant::now() + Duration::from_secs(20);
        while self.status()["cn_link"] != want {
            assert!(
                Instant::now() < until,
                "CN link not {want}: {}",
                self.status()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn pair(&self, keys: &DeviceKeys) {
        let code = keys.pairing_code().unwrap().to_string();
        let (ok, text) = self.ctl(&["pair", &code]);
        assert!(ok, "pair: {text}");
    }

    async fn metrics(&self) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(self.metrics).await.unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }
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
    text.lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("metric {line_start} missing"))
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
    let tmp = tempfile::tempdir().unwrap();
    let cn = Cn::init(&tmp.path().join("cn"), 10);
    let gw = Gw::new(&tmp.path().join("gw"), &cn, "");
    gw.wait_cn("up");
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
    let renewed = client::renew(
        &ep,
        gw.devices,
        &keys,
        &cred.request_id,
        cred.bundle.supi.clone(),
        cred.hpke.clone(),
        &Default::default(),
    )
    .await
    .unwrap();
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
    let tmp = tempfile::tempdir().unwrap();
    let cn = Cn::init(&tmp.path().join("cn"), 10);
    let gw = Gw::new(&tmp.path().join("gw"), &cn, "");
    gw.wait_cn("up");
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
    let first = device("newcomer-1");
    let cred = client::provision(&ep, gw.devices, &first, &Default::default())
        .await
        .unwrap();
    assert_eq!(cred.bundle.device_id.as_str(), "newcomer-1");
    let second = device("newcomer-2");
    let e = client::provision(&ep, gw.devices, &second, &Default::default())
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
    let tmp = tempfile::tempdir().unwrap();
    let mut cn = Cn::init(&tmp.path().join("cn"), 10);
    let gw = Gw::new(&tmp.path().join("gw"), &cn, "");
    gw.wait_cn("up");
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
    let tmp = tempfile::tempdir().unwrap();
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
    signal(cn.child(), "-STOP");
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
    signal(cn.child(), "-CONT");
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
    let tmp = tempfile::tempdir().unwrap();
    let cn = Cn::init(&tmp.path().join("cn"), 10);
    let mut gw = Gw::new(&tmp.path().join("gw"), &cn, "");
    gw.wait_cn("up");
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
async fn raw_connect(
    ep: &quinn::Endpoint,
    addr: SocketAddr,
    keys: &DeviceKeys,
) -> quinn::Connection {
    let cfg = companion_transport::client_config(
        companion_transport::ServerTrust::Verifier(std::sync::Arc::new(
            companion_transport::PinnedServerVerifier::new(None),
        )),
        Some(&keys.identity),
        companion_transport::ALPN_DEVICE,
        &companion_transport::Limits::device_link(),
    )
    .unwrap();
    ep.connect_with(cfg, addr, "gw").unwrap().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn misbehaving_devices_are_cut_off_without_affecting_others() {
    let tmp = tempfile::tempdir().unwrap();
    let cn = Cn::init(&tmp.path().join("cn"), 10);
    let gw = Gw::with_devices(
        &tmp.path().join("gw"),
        &cn,
        "",
        "stream_timeout = \"1s\"\nnew_connections_per_ip = 5\n",
    );
    gw.wait_cn("up");
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
    // Reconnecting in a loop: refused beyond the per-address rate.
    let mut refused = 0;
    for _ in 0..30 {
        let cfg_keys = &keys[3];
        let c = companion_transport::client_config(
            companion_transport::ServerTrust::Verifier(std::sync::Arc::new(
                companion_transport::PinnedServerVerifier::new(None),
            )),
            Some(&cfg_keys.identity),
            companion_transport::ALPN_DEVICE,
            &companion_transport::Limits::device_link(),
        )
        .unwrap();
        match ep.connect_with(c, gw.devices, "gw").unwrap().await {
            Ok(c) => c.close(0u32.into(), b""),
            Err(_) => refused += 1,
        }
    }
    assert!(
        refused >= 10,
        "only {refused} of 30 loop connections refused"
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

/// The X25519 public keys whose shared secret is all-zero (RFC 7748 §6.1): 0, 1, the two
/// order-8 points, p − 1, p, p + 1, each also with bit 255 set.
fn low_order_keys() -> Vec<[u8; 32]> {
    [
        "0000000000000000000000000000000000000000000000000000000000000000",
        "0100000000000000000000000000000000000000000000000000000000000000",
        "e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800",
        "5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157",
        "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
        "edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
        "eeffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
    ]
    .iter()
    .flat_map(|h| {
        let k: [u8; 32] = hex::decode(h).unwrap().try_into().unwrap();
        let mut hi = k;
        hi[31] |= 0x80;
        [k, hi]
    })
    .collect()
}

/// `GET /metrics` of cn-backend (its admin address from its ready file).
async fn cn_metrics(cn: &Cn) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(cn.dir.join("ready.json")).unwrap()).unwrap();
    let addr: SocketAddr = v["http"].as_str().unwrap().parse().unwrap();
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

/// Issue 15, attack 1 at the gateway: a paired device asks for a credential sealed to an
/// all-zero (or other low-order) X25519 key. gatewayd answers `malformed` itself: the request
/// is not recorded and no batch reaches the CN (which used to allocate a SUPI for it). The same
/// device with a real key is then provisioned normally through the iotdev library.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn low_order_hpke_keys_are_refused_without_contacting_the_cn() {
    use companion_proto::msg::{DeviceMessage, ErrorCode, Message, ProvisionRequest};
    let tmp = tempfile::tempdir().unwrap();
    let cn = Cn::init(&tmp.path().join("cn"), 10);
    let gw = Gw::new(&tmp.path().join("gw"), &cn, "");
    gw.wait_cn("up");
    let ep = endpoint();
    let keys = device("zero-key");
    gw.pair(&keys);

    let conn = raw_connect(&ep, gw.devices, &keys).await;
    let bad = low_order_keys();
    for (i, pk) in bad.iter().enumerate() {
        let mut rid = [0u8; 16];
        rid[0] = u8::try_from(i).unwrap();
        let req = DeviceMessage::ProvisionRequest(ProvisionRequest {
            request_id: companion_proto::RequestId::from(rid),
            device_id: keys.device_id.clone(),
            hpke_public_key: *pk,
            params: Params::default(),
        });
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
    let tmp = tempfile::tempdir().unwrap();
    let cn = Cn::init(&tmp.path().join("cn"), 10);
    let mut gw = Gw::new(&tmp.path().join("gw"), &cn, "max_batch = 64\n");
    gw.wait_cn("up");
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
    signal(&gw.proc.as_ref().unwrap().0, "-HUP");
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
    let tmp = tempfile::tempdir().unwrap();
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
    signal(&gw.proc.as_ref().unwrap().0, "-HUP");
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
    let renewed = client::renew(
        &ep,
        gw.devices,
        &keys,
        &cred.request_id,
        cred.bundle.supi.clone(),
        cred.hpke.clone(),
        &Default::default(),
    )
    .await
    .unwrap();
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
    let tmp = tempfile::tempdir().unwrap();
    let cn = Cn::init(&tmp.path().join("cn"), 10);
    // The operator allows roaming and any DNN, 30 days, no bitrate cap.
    let out = Command::new(bin("cn-backend"))
        .arg("--dir")
        .arg(&cn.dir)
        .args(["subscriber", "policy", COMPANION_SUPI, "--roaming", "true"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
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
