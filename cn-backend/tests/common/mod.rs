//! Harness for tests that run the real `cn-backend` binary: temp data directories, the CLI,
//! a served process on loopback (port 0 + ready file), gateway and device clients.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    dead_code,
    unused_imports,
    missing_debug_implementations
)]

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use companion_testkit::{Bins, CnServer, Proc, Scratch, cn, scratch};

use companion_crypto::hpke::{DeviceHpkeKey, SealedCredential, open_credential};
use companion_crypto::secret::Key128;
use companion_crypto::usim::SoftUsim;
use companion_proto::binding::{BindingOp, binding_message};
use companion_proto::bundle::CredentialBundle;
use companion_proto::msg::{BatchItem, BatchProvision, ItemKind, ItemResult, KeyBinding, Params};
use companion_proto::{DeviceId, RequestId, Supi};
use companion_transport::cn_client::{ClientOptions, CnSession, CnTarget};
use companion_transport::{Identity, OperatorCa};

pub const BIN: &str = env!("CARGO_BIN_EXE_cn-backend");

/// The binary under test: `CN_BACKEND_BIN` if set (to measure another build, e.g. the previous
/// one for before/after figures of the security suite), else this crate's.
pub fn bin() -> PathBuf {
    bins().path("cn-backend")
}

/// The directory of this crate's binary (`CN_BACKEND_BIN` overrides the binary itself).
pub fn bins() -> Bins {
    Bins::new(Path::new(BIN).parent().unwrap())
}
pub use companion_testkit::{HOME_SNN, VISITED_SNN};
pub const K: &str = companion_testkit::COMPANION_K;
pub const OPC: &str = companion_testkit::COMPANION_OPC;

/// An initialised data directory.
pub struct Dir {
    pub tmp: Scratch,
}

impl Dir {
    /// `cn-backend init` with a small child range and `extra_args`.
    fn init_with(extra_args: &[&str]) -> Dir {
        let d = Dir { tmp: scratch() };
        let mut args = vec![
            "init",
            "--imsi-start",
            "100000",
            "--imsi-count",
            "100000",
            "--server-name",
            "localhost",
        ];
        args.extend_from_slice(extra_args);
        d.cli_ok(&args);
        d
    }

    /// [`Dir::init`] on the PostgreSQL database of `url` (`init --store URL`).
    pub fn init_store(url: &str) -> Dir {
        Self::init_with(&["--store", url])
    }

    /// A copy of this directory (`cp -a`: same keys, configuration and, on SQLite, a copy of
    /// the database), as an operator provisions another host of a fleet.
    pub fn copy(&self) -> Dir {
        let copy = Dir { tmp: scratch() };
        let st = Command::new("cp")
            .arg("-a")
            .arg(self.path())
            .arg(copy.path())
            .status()
            .unwrap();
        assert!(st.success(), "cp -a {}", self.path().display());
        copy
    }

    /// `cn-backend init` with a small child range; `extra_config` is appended to the TOML.
    pub fn init(extra_config: &str) -> Dir {
        let d = Self::init_with(&[]);
        if !extra_config.is_empty() {
            let mut f = std::fs::OpenOptions::new()
                .append(true)
                .open(d.path().join("cn-backend.toml"))
                .unwrap();
            writeln!(f, "\n{extra_config}").unwrap();
        }
        d
    }

    pub fn path(&self) -> PathBuf {
        self.tmp.path().join("cn")
    }

    /// Runs the CLI; returns (success, stdout, stderr).
    pub fn cli(&self, args: &[&str]) -> (bool, String, String) {
        let out = Command::new(bin())
            .arg("--dir")
            .arg(self.path())
            .args(args)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    pub fn cli_ok(&self, args: &[&str]) -> String {
        let (ok, out, err) = self.cli(args);
        assert!(ok, "cn-backend {args:?} failed: {err}");
        out
    }

    pub fn cli_json(&self, args: &[&str]) -> serde_json::Value {
        let mut a = args.to_vec();
        a.push("--json");
        serde_json::from_str(&self.cli_ok(&a)).unwrap()
    }

    /// Adds a parent with the test K/OPc.
    pub fn add_parent(&self, supi: &str, extra: &[&str]) {
        let mut a = vec!["subscriber", "add", "--supi", supi, "--k", K, "--opc", OPC];
        a.extend_from_slice(extra);
        self.cli_ok(&a);
    }

    pub fn trust_anchor(&self) -> rustls::pki_types::CertificateDer<'static> {
        OperatorCa::load(&self.path().join("ca.pem"), &self.path().join("ca.key"))
            .unwrap()
            .cert_der()
            .clone()
    }

    pub fn token(&self) -> String {
        std::fs::read_to_string(self.path().join("admin.token"))
            .unwrap()
            .trim()
            .to_owned()
    }

    /// Runs `cn-backend serve` (optionally with `--store url` and an environment variable) and
    /// expects a non-zero exit with one line on stderr; returns that line and how long it took.
    pub fn serve_fails(
        &self,
        store: Option<&str>,
        env: Option<(&str, &str)>,
    ) -> (String, Duration) {
        let mut cmd = Command::new(bin());
        cmd.arg("--dir").arg(self.path());
        if let Some(u) = store {
            cmd.args(["--store", u]);
        }
        if let Some((k, v)) = env {
            cmd.env(k, v);
        }
        let t0 = std::time::Instant::now();
        let out = cmd
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--http-listen",
                "127.0.0.1:0",
            ])
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap();
        let took = t0.elapsed();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(!out.status.success(), "{stderr}");
        let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(lines.len(), 1, "{stderr}");
        (lines[0].to_owned(), took)
    }

    /// Starts `cn-backend serve` on loopback and waits for its ready file.
    pub fn serve(&self) -> Server {
        let ready = self.tmp.path().join(format!(
            "ready-{}.json",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        let mut cmd = cn::serve_command(&bins(), &self.path(), "127.0.0.1:0", &ready, None);
        cmd.env("RUST_LOG", "info");
        let log = self.tmp.path().join("serve.log");
        let s = CnServer::start(&self.path(), cmd, &ready, &log).unwrap();
        Server {
            quic: s.quic.parse().unwrap(),
            http: s.http.parse().unwrap(),
            proc: s.proc,
            anchor: self.trust_anchor(),
            log,
        }
    }
}

/// A running `cn-backend serve`; SIGKILLed on drop if still running.
pub struct Server {
    pub proc: Proc,
    pub quic: SocketAddr,
    pub http: SocketAddr,
    pub anchor: rustls::pki_types::CertificateDer<'static>,
    pub log: PathBuf,
}

impl Server {
    pub fn target(&self, snn: &str) -> CnTarget {
        CnTarget {
            addr: self.quic,
            server_name: "localhost".into(),
            trust_anchors: vec![self.anchor.clone()],
            serving_network_name: snn.into(),
        }
    }

    pub fn log_text(&self) -> String {
        self.proc.log_text()
    }

    /// SIGKILL, now.
    pub fn kill9(&mut self) {
        self.proc.kill9();
    }

    /// SIGTERM and wait; returns whether it exited 0.
    pub fn terminate(&mut self) -> bool {
        let st = self.proc.terminate(Duration::from_secs(20)).unwrap();
        st.expect("no exit after SIGTERM").success()
    }

    /// A raw HTTP/1.1 request; returns (status, body).
    pub fn http(&self, method: &str, path: &str, token: Option<&str>, body: &str) -> (u16, String) {
        let mut s = std::net::TcpStream::connect(self.http).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
        write!(
            s,
            "{method} {path} HTTP/1.1\r\nHost: x\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).unwrap();
        let text = String::from_utf8_lossy(&buf).into_owned();
        let status: u16 = text[9..12].parse().unwrap();
        let body = text
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default();
        // Chunked bodies: good enough to search in; JSON callers use `http_json`.
        (status, body)
    }

    pub fn http_json(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: &str,
    ) -> (u16, serde_json::Value) {
        let (st, b) = self.http(method, path, token, body);
        // Strip HTTP/1.1 chunk framing if any: take from the first '{' or '[' to the last
        // matching closer.
        let start = b.find(['{', '[']).unwrap_or(0);
        let end = b.rfind(['}', ']']).map_or(b.len(), |e| e + 1);
        (
            st,
            serde_json::from_str(&b[start..end]).unwrap_or(serde_json::Value::Null),
        )
    }
}

pub fn key(hex_str: &str) -> Key128 {
    Key128::from_hex(hex_str).unwrap()
}

/// The companion's USIM for `supi` with the test K/OPc.
pub fn parent_usim(supi: &str) -> SoftUsim {
    SoftUsim::new(supi.into(), key(K), key(OPC))
}

pub fn client_endpoint() -> quinn::Endpoint {
    quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap()
}

/// A client endpoint with source address `ip` (any of 127.0.0.0/8 is local on Linux).
pub fn client_endpoint_at(ip: &str) -> quinn::Endpoint {
    quinn::Endpoint::client(format!("{ip}:0").parse().unwrap()).unwrap()
}

pub async fn connect(srv: &Server, supi: &str) -> CnSession {
    connect_with(srv, supi, ClientOptions::default()).await
}

/// A session whose exchanges time out after `exchange_timeout`.
pub async fn connect_with(srv: &Server, supi: &str, opts: ClientOptions) -> CnSession {
    let ep = client_endpoint();
    let mut u = parent_usim(supi);
    CnSession::connect_with(&ep, &srv.target(HOME_SNN), &mut u, opts)
        .await
        .unwrap()
        .0
}

/// The device key every [`DeviceReq`] signs with (one per test process: the CN keys children by
/// request and device ID, and a retry must carry the same key).
pub fn device_identity() -> &'static Identity {
    static ID: OnceLock<Identity> = OnceLock::new();
    ID.get_or_init(|| Identity::self_signed("test-device").unwrap())
}

/// Sets `item`'s device key (SPKI and fingerprint) to `identity`'s and signs it (key binding).
pub fn sign(item: &mut BatchItem, identity: &Identity) {
    let spki = identity.spki_der().unwrap();
    let op = match item.kind {
        ItemKind::Renew => BindingOp::Renew,
        _ => BindingOp::Provision,
    };
    let msg = binding_message(op, &item.request_id, &item.device_id, &item.hpke_public_key);
    item.binding = companion_transport::sign_binding(identity, &msg).unwrap();
    item.device_key_fingerprint = companion_transport::spki_fingerprint(&spki);
    item.device_spki = spki;
}

/// A device request: its ids and the HPKE key it will open the bundle with.
#[derive(Clone)]
pub struct DeviceReq {
    pub device_id: DeviceId,
    pub request_id: RequestId,
    pub hpke: DeviceHpkeKey,
    pub params: Params,
}

impl DeviceReq {
    /// Deterministic from `n` (so a restarted test re-sends exactly the same item).
    pub fn new(n: u64) -> Self {
        let mut rid = [0u8; 16];
        rid[..8].copy_from_slice(&n.to_be_bytes());
        rid[8..].copy_from_slice(&std::process::id().to_be_bytes().repeat(2));
        DeviceReq {
            device_id: DeviceId::new(&format!("dev-{n}")).unwrap(),
            request_id: RequestId::from(rid),
            hpke: DeviceHpkeKey::derive(&[&n.to_be_bytes()[..], &[7u8; 32][..]].concat()),
            params: Params::default(),
        }
    }

    /// The provisioning item, signed by [`device_identity`] as a device would (PROTOCOL.md §4.4).
    pub fn item(&self) -> BatchItem {
        let mut item = BatchItem {
            attestation: None,
            kind: ItemKind::Provision,
            request_id: self.request_id,
            device_id: self.device_id.clone(),
            device_key_fingerprint: [0; 32],
            hpke_public_key: self.hpke.public_key(),
            params: self.params.clone(),
            supi: None,
            device_spki: Vec::new(),
            binding: KeyBinding {
                scheme: 0,
                signature: Vec::new(),
            },
        };
        sign(&mut item, device_identity());
        item
    }

    /// The renewal item of `supi`, signed by [`device_identity`].
    pub fn renew_item(&self, supi: &Supi) -> BatchItem {
        let mut item = self.item();
        item.kind = ItemKind::Renew;
        item.supi = Some(supi.clone());
        sign(&mut item, device_identity());
        item
    }

    /// Opens an issued item's sealed bundle.
    pub fn open(&self, r: &ItemResult) -> CredentialBundle {
        let s = r.sealed.as_ref().expect("issued item has a sealed bundle");
        let pt = open_credential(
            &self.hpke,
            self.device_id.as_str(),
            self.request_id.as_bytes(),
            &SealedCredential {
                enc: s.enc,
                ciphertext: s.ciphertext.clone(),
            },
        )
        .unwrap();
        let b = CredentialBundle::decode(&pt).unwrap();
        b.check_for(&self.device_id, &self.request_id).unwrap();
        b
    }
}

/// Sends `item` alone in batch `id` and returns its result.
pub async fn one(s: &CnSession, id: u64, item: BatchItem) -> ItemResult {
    let r = s
        .batch(BatchProvision {
            batch_id: id,
            items: vec![item],
        })
        .await
        .unwrap();
    r.items.into_iter().next().unwrap()
}

/// [`one`], which must be issued (the failure names the CN's reason).
pub async fn issued_one(s: &CnSession, id: u64, item: BatchItem) -> ItemResult {
    let r = one(s, id, item).await;
    assert_eq!(
        r.outcome,
        companion_proto::msg::Outcome::Issued,
        "{:?}",
        r.reason
    );
    r
}

/// The device's USIM built from its bundle.
pub fn device_usim(b: &CredentialBundle) -> SoftUsim {
    SoftUsim::new(b.supi.as_str().into(), b.k.clone(), b.opc.clone())
}

pub fn path_str(p: &Path) -> &str {
    p.to_str().unwrap()
}
