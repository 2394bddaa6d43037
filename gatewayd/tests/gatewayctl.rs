//! Drives the real `gatewayctl` binary against an in-process control server whose handler is
//! built on the real pairing registry and state database (in a temporary directory).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::Duration;

use companion_proto::pairing::PairingCode;
use companion_proto::{DeviceId, RequestId, Supi};
use companion_transport::Identity;
use gatewayd::clock::{Clock, SystemClock};
use gatewayd::control::{
    AccessPolicy, CnLinkState, CnRevocation, ControlError, ControlHandler, ControlServer,
    DeviceInfo, ErrorKind, PairOutcome, RevokeOutcome, StatusInfo, list_devices,
};
use gatewayd::pairing::{PairingRegistry, WindowStatus};
use gatewayd::state::{Block, PendingDelivery, State};

const DEFAULT_WINDOW: Duration = Duration::from_secs(120);
const MARGIN: Duration = Duration::from_secs(86_400);

/// What the daemon will do, minus the CN: revocations stay "pending".
struct TestHandler {
    state: Arc<State>,
    registry: PairingRegistry,
    clock: Arc<dyn Clock>,
}

impl ControlHandler for TestHandler {
    async fn pair(
        &self,
        code: PairingCode,
        label: Option<String>,
    ) -> Result<PairOutcome, ControlError> {
        let (p, new) = self.registry.pair_code(&code, label)?;
        let cred = self.state.credential(&p.device_id)?;
        Ok(PairOutcome {
            new,
            device: DeviceInfo::build(&p, cred.as_ref(), false, self.clock.unix_now(), MARGIN),
        })
    }

    async fn open_window(&self, d: Option<Duration>) -> Result<WindowStatus, ControlError> {
        Ok(self.registry.open_window(d.unwrap_or(DEFAULT_WINDOW))?)
    }

    async fn devices(&self) -> Result<Vec<DeviceInfo>, ControlError> {
        Ok(list_devices(&self.state, self.clock.unix_now(), MARGIN)?)
    }

    async fn revoke(&self, device: DeviceId) -> Result<RevokeOutcome, ControlError> {
        let r = self.registry.revoke(&device)?;
        let cn = match &r.supi {
            None => CnRevocation::NoCredential,
            Some(_) => CnRevocation::Pending {
                reason: "core network link not configured".into(),
            },
        };
        Ok(RevokeOutcome {
            supi: r.supi.map(|s| s.to_string()),
            cn,
        })
    }

    async fn status(&self) -> Result<StatusInfo, ControlError> {
        let now = self.clock.unix_now();
        let c = self.state.counts()?;
        Ok(StatusInfo {
            version: env!("CARGO_PKG_VERSION").into(),
            uptime_secs: 5,
            companion_supi: Some("imsi-001010000000001".into()),
            gateway_fingerprint: Some("00".repeat(32)),
            cn_link: CnLinkState::NotConfigured,
            devices_paired: c.pairings,
            credentials_held: c.credentials,
            credentials_expiring_24h: self.state.credentials_expiring_by(now + 86_400)?.len()
                as u64,
            deliveries_pending: c.pending_deliveries,
            requests_outstanding: c.outstanding_requests,
            revocations_unconfirmed: c.unconfirmed_revocations,
            queue_depth: 0,
            active_connections: 0,
            pairing_window: self.registry.window(),
            blocks: self.state.blocks(now)?,
            batching: None,
            filter: Some(Box::new(gatewayd::filter::FilterStatus {
                mode: gatewayd::filter::FilterMode::Userspace,
                interfaces: vec![],
                fallback_reason: Some("no [filter] interfaces configured".into()),
                port: 4433,
                strict: false,
                initial_rate: 200,
                initial_burst: 400,
                deny_entries: 0,
                paired_sources: 0,
                paired_evicted: 0,
                counters: gatewayd::filter::FilterCounters {
                    passed: 10,
                    dropped_short_initial: 3,
                    rate_limited: 2,
                    denied: 1,
                    not_paired: 0,
                    dropped_unparsed: 4,
                    dropped_fragment: 5,
                },
            })),
            cn_sessions: vec![
                gatewayd::cn_link::CnSessionInfo {
                    slot: 0,
                    endpoint: Some("cn-a.example:4434".into()),
                    state: "up".into(),
                    remote: Some("192.0.2.10:4434".into()),
                },
                gatewayd::cn_link::CnSessionInfo {
                    slot: 1,
                    endpoint: None,
                    state: "waiting".into(),
                    remote: None,
                },
            ],
            cn_endpoints: vec![
                gatewayd::cn_link::CnEndpointInfo {
                    endpoint: "cn-a.example:4434".into(),
                    sessions: 1,
                    attempting: false,
                    failures: 0,
                    retry_in_ms: None,
                },
                gatewayd::cn_link::CnEndpointInfo {
                    endpoint: "cn-b.example:4434".into(),
                    sessions: 0,
                    attempting: false,
                    failures: 3,
                    retry_in_ms: Some(4_000),
                },
            ],
        })
    }

    async fn block(&self, addr: IpAddr, d: Option<Duration>) -> Result<Block, ControlError> {
        let now = self.clock.unix_now();
        let b = Block {
            addr,
            until: d.map(|d| now + d.as_secs() as i64),
            created_at: now,
        };
        self.state.block(&b)?;
        Ok(b)
    }

    async fn unblock(&self, addr: IpAddr) -> Result<bool, ControlError> {
        if addr.is_unspecified() {
            return Err(ControlError::new(
                ErrorKind::BadRequest,
                "nothing to unblock",
            ));
        }
        Ok(self.state.unblock(addr)?)
    }
}

fn ctl(socket: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_gatewayctl"))
        .arg("--socket")
        .arg(socket)
        .args(args)
        .env_remove("GATEWAYD_CONTROL_SOCKET")
        .output()
        .expect("run gatewayctl")
}

async fn run(socket: &Path, args: &[&str]) -> (bool, String, String) {
    let socket = socket.to_path_buf();
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    let out = tokio::task::spawn_blocking(move || {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        ctl(&socket, &a)
    })
    .await
    .unwrap();
    (
        out.status.success(),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

async fn ok(socket: &Path, args: &[&str]) -> String {
    let (success, stdout, stderr) = run(socket, args).await;
    assert!(success, "gatewayctl {args:?} failed: {stderr}");
    assert!(stderr.is_empty(), "{stderr}");
    stdout
}

async fn fails(socket: &Path, args: &[&str]) -> String {
    let (success, stdout, stderr) = run(socket, args).await;
    assert!(!success, "gatewayctl {args:?} should fail: {stdout}");
    stderr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gatewayctl_drives_every_command() {
    let dir = tempfile::tempdir().unwrap();
    let socket: PathBuf = dir.path().join("run/control.sock");
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let state = Arc::new(State::open(&dir.path().join("state")).unwrap());
    let registry =
        PairingRegistry::load(state.clone(), clock.clone(), Duration::from_secs(3600)).unwrap();
    let handler = Arc::new(TestHandler {
        state: state.clone(),
        registry,
        clock: clock.clone(),
    });
    let server = ControlServer::bind(&socket, AccessPolicy::resolve(None).unwrap()).unwrap();
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&socket).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o660);
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(server.serve(handler.clone(), async {
        let _ = stop_rx.await;
    }));

    // status --json on an empty gateway.
    let out = ok(&socket, &["status", "--json"]).await;
    let status: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(status["devices_paired"], 0);
    assert_eq!(status["cn_link"], "not_configured");
    assert!(status["pairing_window"].is_null());
    let out = ok(&socket, &["devices"]).await;
    assert!(out.contains("no devices paired"), "{out}");

    // pair with a code.
    let device_key = Identity::self_signed("watch-01").unwrap();
    let code = PairingCode::new(
        DeviceId::new("watch-01").unwrap(),
        device_key.spki_der().unwrap(),
    )
    .unwrap()
    .to_string();
    let out = ok(&socket, &["pair", &code, "--label", "kitchen"]).await;
    assert!(
        out.starts_with("paired watch-01 (kitchen), key sha256:"),
        "{out}"
    );
    let out = ok(&socket, &["pair", &code]).await;
    assert!(out.contains("already paired"), "{out}");
    let err = fails(&socket, &["pair", "DPP:V:1;;"]).await;
    assert_eq!(
        err.trim_end(),
        "gatewayctl: pairing code rejected: pairing code must start with \"CPN:\""
    );
    let other = Identity::self_signed("x").unwrap();
    let clash = PairingCode::new(
        DeviceId::new("watch-01").unwrap(),
        other.spki_der().unwrap(),
    )
    .unwrap()
    .to_string();
    let err = fails(&socket, &["pair", &clash]).await;
    assert!(err.contains("already paired with a different key"), "{err}");

    // The credential the CN would issue, as the daemon records it.
    let now = clock.unix_now();
    state
        .record_issued(&PendingDelivery {
            request_id: RequestId([1; 16]),
            device_id: DeviceId::new("watch-01").unwrap(),
            supi: Supi::new("imsi-001010000000042").unwrap(),
            expires_at: now + 30 * 86_400 - 1800,
            sealed: vec![0; 64],
            created_at: now,
        })
        .unwrap();

    // devices: table and JSON.
    let out = ok(&socket, &["devices"]).await;
    let mut lines = out.lines();
    let header = lines.next().unwrap();
    assert!(
        header.starts_with("DEVICE") && header.contains("EXPIRES IN"),
        "{out}"
    );
    let row = lines.next().unwrap();
    for needle in [
        "watch-01",
        "kitchen",
        "imsi-001010000000042",
        "29d 23h",
        "delivery pending",
    ] {
        assert!(row.contains(needle), "{needle:?} missing in {row:?}");
    }
    let out = ok(&socket, &["devices", "--json"]).await;
    let devices: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(devices[0]["device"], "watch-01");
    assert_eq!(devices[0]["label"], "kitchen");
    assert_eq!(devices[0]["status"], "delivery_pending");
    assert_eq!(devices[0]["paired_via"], "code");
    assert_eq!(
        devices[0]["fingerprint"],
        hex::encode(device_key.fingerprint().unwrap())
    );

    // pairing window: explicit and default length.
    let out = ok(&socket, &["pair", "--window", "90s"]).await;
    assert!(out.starts_with("pairing window open for 1m 30s"), "{out}");
    assert!((89..=90).contains(&handler.registry.window().unwrap().remaining_secs));
    let out = ok(&socket, &["pair", "--window"]).await;
    assert!(out.starts_with("pairing window open for 2m"), "{out}");
    let err = fails(&socket, &["pair", "--window", "2h"]).await;
    assert!(err.contains("longer than the allowed"), "{err}");
    let err = fails(&socket, &["pair", "--window", "soon"]).await;
    assert!(err.contains("soon"), "{err}");

    // block / unblock, visible in status.
    let out = ok(&socket, &["block", "192.168.1.50", "--for", "10m"]).await;
    assert_eq!(out, "blocked 192.168.1.50 for 10m\n");
    let out = ok(&socket, &["block", "fd00::7"]).await;
    assert_eq!(out, "blocked fd00::7 until unblocked\n");
    let status: serde_json::Value =
        serde_json::from_str(&ok(&socket, &["status", "--json"]).await).unwrap();
    assert_eq!(status["devices_paired"], 1);
    assert_eq!(status["credentials_held"], 1);
    assert_eq!(status["deliveries_pending"], 1);
    assert_eq!(status["pairing_window"]["wrong_codes"], 0);
    // The status never shows the window's code; only the answer to `pair --window` does.
    assert!(status["pairing_window"].get("code").is_none());
    let blocks = status["blocks"].as_array().unwrap();
    assert_eq!(blocks.len(), 2);
    assert_eq!(blocks[0]["addr"], "192.168.1.50");
    let text = ok(&socket, &["status"]).await;
    assert!(text.contains("devices paired         1"), "{text}");
    // Which endpoint each CN session uses, and each endpoint's health.
    assert_eq!(status["cn_sessions"][0]["endpoint"], "cn-a.example:4434");
    assert_eq!(status["cn_endpoints"][1]["failures"], 3);
    for want in [
        "CN endpoint            cn-a.example:4434  1 sessions, healthy",
        "CN endpoint            cn-b.example:4434  0 sessions, 3 failures, retried in 4s",
        "CN session 0           up cn-a.example:4434 (192.0.2.10:4434)",
        "CN session 1           waiting every endpoint in backoff",
    ] {
        assert!(text.contains(want), "{want:?} not in {text}");
    }
    // The LAN filter's mode and counters.
    assert_eq!(status["filter"]["mode"], "userspace");
    assert_eq!(status["filter"]["counters"]["dropped_short_initial"], 3);
    assert_eq!(status["filter"]["counters"]["dropped_unparsed"], 4);
    assert_eq!(status["filter"]["counters"]["dropped_fragment"], 5);
    assert!(
        text.contains(
            "LAN filter             userspace (fallback: no [filter] interfaces configured)"
        ),
        "{text}"
    );
    assert!(
        text.contains(
            "passed 10, dropped_short_initial 3, rate_limited 2, denied 1, not_paired 0, \
             dropped_unparsed 4, dropped_fragment 5"
        ),
        "{text}"
    );
    assert!(
        text.contains("blocked                192.168.1.50 for 9m")
            || text.contains("blocked                192.168.1.50 for 10m"),
        "{text}"
    );
    assert_eq!(
        ok(&socket, &["unblock", "192.168.1.50"]).await,
        "unblocked 192.168.1.50\n"
    );
    assert_eq!(
        ok(&socket, &["unblock", "192.168.1.50"]).await,
        "192.168.1.50 was not blocked\n"
    );
    let err = fails(&socket, &["unblock", "0.0.0.0"]).await;
    assert_eq!(err, "gatewayctl: nothing to unblock\n");

    // revoke.
    let out = ok(&socket, &["revoke", "watch-01"]).await;
    assert!(
        out.starts_with(
            "revoked watch-01: revoking its credentials at the core network is pending"
        ),
        "{out}"
    );
    let err = fails(&socket, &["revoke", "watch-01"]).await;
    assert_eq!(err, "gatewayctl: device watch-01 is not paired\n");
    let err = fails(&socket, &["revoke", "bad id"]).await;
    assert!(err.contains("invalid device id"), "{err}");
    let devices: serde_json::Value =
        serde_json::from_str(&ok(&socket, &["devices", "--json"]).await).unwrap();
    assert_eq!(devices, serde_json::json!([]));

    // Garbage on the socket gets a typed error and does not disturb the server.
    {
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
        let mut s = tokio::net::UnixStream::connect(&socket).await.unwrap();
        s.write_all(b"{\"op\":\"reboot\"}\n").await.unwrap();
        let mut line = String::new();
        tokio::io::BufReader::new(&mut s)
            .read_line(&mut line)
            .await
            .unwrap();
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["result"], "error");
        assert_eq!(v["kind"], "bad_request");
    }
    ok(&socket, &["status"]).await;

    // A live socket cannot be taken over by a second daemon.
    let e = ControlServer::bind(&socket, AccessPolicy::resolve(None).unwrap()).unwrap_err();
    assert!(e.to_string().contains("another gatewayd is running"), "{e}");

    stop_tx.send(()).unwrap();
    serving.await.unwrap();
    assert!(!socket.exists(), "socket removed on shutdown");

    // Nobody listening: the wg-style error.
    let err = fails(&socket, &["status"]).await;
    assert_eq!(
        err,
        format!(
            "gatewayctl: cannot reach gatewayd at {}: No such file or directory (is gatewayd running?)\n",
            socket.display()
        )
    );
}
