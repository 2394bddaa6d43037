//! Real QUIC handshakes on loopback: key pinning in both directions, the operator-CA path, and
//! the TLS exporter agreeing on both ends.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use companion_transport::*;

#[derive(Debug, Default)]
struct Paired(Mutex<HashSet<[u8; 32]>>);

impl KeyPolicy for Paired {
    fn admit(&self, fingerprint: &[u8; 32], _spki: &[u8]) -> bool {
        self.0.lock().unwrap().contains(fingerprint)
    }
}

impl Paired {
    /// A registry where only `device`'s key is paired.
    fn only(device: &Identity) -> Arc<Self> {
        let paired = Arc::new(Paired::default());
        paired
            .0
            .lock()
            .unwrap()
            .insert(device.fingerprint().unwrap());
        paired
    }
}

const LABEL: &[u8] = b"EXPORTER-companion-aka-binding";

fn server(identity: &Identity, policy: Option<Arc<dyn KeyPolicy>>, alpn: &[u8]) -> quinn::Endpoint {
    let verifier = policy.map(|p| {
        Arc::new(PinnedClientVerifier::new(p))
            as Arc<dyn rustls::server::danger::ClientCertVerifier>
    });
    let cfg = server_config(identity, verifier, &[alpn], &Limits::device_link()).unwrap();
    quinn::Endpoint::server(cfg, "127.0.0.1:0".parse().unwrap()).unwrap()
}

async fn accept_one(ep: quinn::Endpoint) -> Result<[u8; 32], String> {
    let incoming = ep.accept().await.ok_or("endpoint closed")?;
    let conn = incoming.await.map_err(|e| e.to_string())?;
    let exporter = tls_exporter(&conn, LABEL).map_err(|e| e.to_string())?;
    // Keep the connection until the client has read its exporter and closed.
    let _ = conn.closed().await;
    Ok(exporter)
}

async fn connect(
    addr: SocketAddr,
    trust: ServerTrust,
    identity: Option<&Identity>,
    alpn: &[u8],
    name: &str,
) -> Result<[u8; 32], String> {
    let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    ep.set_default_client_config(
        client_config(trust, identity, alpn, &Limits::device_link()).unwrap(),
    );
    let conn = ep
        .connect(addr, name)
        .unwrap()
        .await
        .map_err(|e| e.to_string())?;
    // With client auth, the server's verdict on our certificate arrives after our handshake
    // completes; one round trip on a stream surfaces a refusal as an error here.
    let result = match conn.open_bi().await {
        Ok((mut send, mut recv)) => {
            send.write_all(b"x").await.map_err(|e| e.to_string())?;
            send.finish().map_err(|e| e.to_string())?;
            match recv.read_to_end(16).await {
                Ok(_)
                | Err(quinn::ReadToEndError::Read(quinn::ReadError::ConnectionLost(
                    quinn::ConnectionError::ApplicationClosed(_),
                ))) => tls_exporter(&conn, LABEL).map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            }
        }
        Err(e) => Err(e.to_string()),
    };
    conn.close(0u32.into(), b"done");
    ep.wait_idle().await;
    result
}

async fn echo_server(ep: quinn::Endpoint) -> Result<[u8; 32], String> {
    let incoming = ep.accept().await.ok_or("endpoint closed")?;
    let conn = incoming.await.map_err(|e| e.to_string())?;
    let exporter = tls_exporter(&conn, LABEL).map_err(|e| e.to_string())?;
    assert!(quic::negotiated_alpn(&conn).is_some());
    if let Ok((mut send, mut recv)) = conn.accept_bi().await {
        let data = recv.read_to_end(16).await.map_err(|e| e.to_string())?;
        send.write_all(&data).await.map_err(|e| e.to_string())?;
        let _ = send.finish();
    }
    let _ = conn.closed().await;
    Ok(exporter)
}

#[tokio::test]
async fn paired_key_connects_and_exporters_agree() {
    let gateway = Identity::self_signed("gateway").unwrap();
    let device = Identity::self_signed("watch-01").unwrap();
    let paired = Paired::only(&device);
    let ep = server(&gateway, Some(paired), ALPN_DEVICE);
    let addr = ep.local_addr().unwrap();
    let srv = tokio::spawn(echo_server(ep));

    let pin = Arc::new(PinnedServerVerifier::new(None));
    let client = connect(
        addr,
        ServerTrust::Verifier(pin.clone()),
        Some(&device),
        ALPN_DEVICE,
        "gateway",
    )
    .await
    .unwrap();
    let server_side = srv.await.unwrap().unwrap();
    assert_eq!(client, server_side, "both ends derive the same exporter");
    assert_eq!(
        pin.seen(),
        Some(gateway.fingerprint().unwrap()),
        "trust on first use records the key"
    );
}

#[tokio::test]
async fn unpaired_key_is_refused_in_the_handshake() {
    let gateway = Identity::self_signed("gateway").unwrap();
    let stranger = Identity::self_signed("stranger").unwrap();
    let ep = server(&gateway, Some(Arc::new(Paired::default())), ALPN_DEVICE);
    let addr = ep.local_addr().unwrap();
    let srv = tokio::spawn(accept_one(ep));
    let trust = ServerTrust::Verifier(Arc::new(PinnedServerVerifier::new(None)));
    let err = connect(addr, trust, Some(&stranger), ALPN_DEVICE, "gateway")
        .await
        .unwrap_err();
    assert!(!err.is_empty());
    let srv_err = srv.await.unwrap().unwrap_err();
    assert!(
        srv_err.contains("certificate") || srv_err.contains("TLS"),
        "{srv_err}"
    );
}

#[tokio::test]
async fn wrong_server_pin_is_refused() {
    let gateway = Identity::self_signed("gateway").unwrap();
    let other = Identity::self_signed("other").unwrap();
    let device = Identity::self_signed("watch-01").unwrap();
    let paired = Paired::only(&device);
    let ep = server(&gateway, Some(paired), ALPN_DEVICE);
    let addr = ep.local_addr().unwrap();
    let _srv = tokio::spawn(accept_one(ep));
    let pin = Arc::new(PinnedServerVerifier::new(Some(
        other.fingerprint().unwrap(),
    )));
    let err = connect(
        addr,
        ServerTrust::Verifier(pin),
        Some(&device),
        ALPN_DEVICE,
        "gateway",
    )
    .await
    .unwrap_err();
    assert!(err.contains("certificate") || err.contains("TLS"), "{err}");
}

/// A client that trusts only `anchor` and offers `alpn` connects to a new server presenting
/// `identity` (ALPN `companion-cn/2`).
async fn connect_anchored(
    identity: &Identity,
    anchor: &OperatorCa,
    alpn: &[u8],
) -> Result<[u8; 32], String> {
    let ep = server(identity, None, ALPN_CN);
    let addr = ep.local_addr().unwrap();
    let _srv = tokio::spawn(accept_one(ep));
    let trust = ServerTrust::Anchors(vec![anchor.cert_der().clone()]);
    connect(addr, trust, None, alpn, "localhost").await
}

#[tokio::test]
async fn operator_ca_chain_is_trusted_and_alpn_is_enforced() {
    let ca = OperatorCa::generate("Test Operator CA").unwrap();
    let cn = ca.issue_server(&["localhost".into()]).unwrap();
    let ep = server(&cn, None, ALPN_CN);
    let addr = ep.local_addr().unwrap();
    let srv = tokio::spawn(echo_server(ep));
    let exporter = connect(
        addr,
        ServerTrust::Anchors(vec![ca.cert_der().clone()]),
        None,
        ALPN_CN,
        "localhost",
    )
    .await
    .unwrap();
    assert_eq!(exporter, srv.await.unwrap().unwrap());

    // Same server, wrong ALPN: no shared application protocol, no connection.
    let err = connect_anchored(&cn, &ca, ALPN_ATTACH).await.unwrap_err();
    assert!(!err.is_empty());

    // A CA the client does not trust.
    let rogue = OperatorCa::generate("Rogue CA")
        .unwrap()
        .issue_server(&["localhost".into()])
        .unwrap();
    let err = connect_anchored(&rogue, &ca, ALPN_CN).await.unwrap_err();
    assert!(
        err.contains("certificate") || err.contains("issuer"),
        "{err}"
    );
}
