//! The client drivers against a minimal in-process CN built from the proto server machines:
//! AKA with the right and a wrong key, resynchronisation, one batch, list, revoke, attach, and a
//! silent server (timeout). The real CN is tested in `cn-backend/tests`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use companion_crypto::aka::{AMF_5G, Sqn, generate_vector, next_sqn, random_rand, verify_auts};
use companion_crypto::binding::EXPORTER_LABEL;
use companion_crypto::milenage::Milenage;
use companion_crypto::secret::Key128;
use companion_crypto::usim::{SoftUsim, SqnState};
use companion_proto::Config;
use companion_proto::aka::AkaServer;
use companion_proto::cn::{Operation, OperationEvent, ServerEvent, ServerSession};
use companion_proto::msg::*;
use companion_transport::attach_client;
use companion_transport::cn_client::{ClientOptions, CnClientError, CnSession, CnTarget};
use companion_transport::drive::StreamDriver;
use companion_transport::*;

const K: [u8; 16] = [0x46; 16];
const OPC: [u8; 16] = [0xcd; 16];
const SNN: &str = "5G:mnc001.mcc001.3gppnetwork.org";
const SUPI: &str = "imsi-001010000000001";

fn milenage() -> Milenage {
    Milenage::new(&Key128::from_bytes(K), &Key128::from_bytes(OPC))
}

struct Cn {
    addr: SocketAddr,
    ca: OperatorCa,
    _task: tokio::task::JoinHandle<()>,
}

/// A fake CN: SQN_HE starts at `sqn_he`; `silent` never answers AKA.
fn start_cn(sqn_he: u64, silent: bool) -> Cn {
    let ca = OperatorCa::generate("test operator").unwrap();
    let id = ca.issue_server(&["cn.test".into()]).unwrap();
    let cfg = server_config(&id, None, &[ALPN_CN, ALPN_ATTACH], &Limits::cn_link()).unwrap();
    let ep = quinn::Endpoint::server(cfg, "127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = ep.local_addr().unwrap();
    let task = tokio::spawn(async move {
        while let Some(inc) = ep.accept().await {
            tokio::spawn(async move {
                let Ok(conn) = inc.await else { return };
                if silent {
                    let _streams = conn.accept_bi().await;
                    tokio::time::sleep(Duration::from_secs(30)).await;
                    return;
                }
                let alpn = negotiated_alpn(&conn).unwrap();
                let exporter = tls_exporter(&conn, EXPORTER_LABEL).unwrap();
                let (s, r) = conn.accept_bi().await.unwrap();
                let mut drv = StreamDriver::new(s, r, Duration::from_secs(5));
                if alpn == ALPN_ATTACH {
                    let mut m: AkaServer<AttachMessage> =
                        AkaServer::new(exporter, Instant::now(), Config::default());
                    if aka(&mut drv, &mut m, sqn_he).await {
                        m.accept(AttachAccept {
                            expires_at: 1_900_000_000,
                            restrictions: Restrictions::default(),
                        })
                        .unwrap();
                    }
                    drv.flush_and_finish(&mut m).await.ok();
                    let _ = conn.closed().await;
                    return;
                }
                let mut m = ServerSession::new(exporter, Instant::now(), Config::default());
                if !aka(&mut drv, &mut m, sqn_he).await {
                    drv.flush_and_finish(&mut m).await.ok();
                    let _ = conn.closed().await;
                    return;
                }
                m.accept(AuthResult {
                    max_children: 5,
                    active_children: 0,
                    max_lifetime_s: 3600,
                    roaming_allowed: false,
                    max_batch_items: 4,
                    dnns: None,
                })
                .unwrap();
                drv.flush_and_finish(&mut m).await.unwrap();
                while let Ok((s, r)) = conn.accept_bi().await {
                    let mut req = m.accept_request(Instant::now()).unwrap();
                    let mut drv = StreamDriver::new(s, r, Duration::from_secs(5));
                    let Ok(OperationEvent::Request(op)) = drv.next_event(&mut req).await else {
                        continue;
                    };
                    match op {
                        Operation::Batch(b) => {
                            let items = b
                                .items
                                .iter()
                                .map(|i| ItemResult {
                                    request_id: i.request_id,
                                    outcome: Outcome::Issued,
                                    supi: Some("imsi-001010000000042".parse().unwrap()),
                                    expires_at: Some(1_900_000_000),
                                    sealed: Some(Sealed {
                                        enc: [1; 32],
                                        ciphertext: vec![2; 40],
                                    }),
                                    reason: None,
                                    retry_after_ms: None,
                                })
                                .collect();
                            req.respond_batch(BatchResult {
                                batch_id: b.batch_id,
                                items,
                            })
                            .unwrap();
                        }
                        Operation::Revoke(_) => req
                            .fail(ErrorMsg::new(ErrorCode::NotFound, "no such child"))
                            .unwrap(),
                        Operation::ListChildren => req
                            .respond_children(ChildList { children: vec![] })
                            .unwrap(),
                    }
                    drv.flush_and_finish(&mut req).await.ok();
                }
            });
        }
    });
    Cn {
        addr,
        ca,
        _task: task,
    }
}

/// Runs the server side of AKA; true when verified.
async fn aka<W: companion_proto::aka::AkaWire>(
    drv: &mut StreamDriver,
    m: &mut AkaServer<W>,
    sqn_he: u64,
) -> bool {
    let mil = milenage();
    let mut sqn = Sqn::new(sqn_he).unwrap();
    loop {
        match drv.next_event(m).await {
            Ok(ServerEvent::VectorNeeded {
                serving_network_name,
                ..
            }) => {
                sqn = next_sqn(sqn);
                let v = generate_vector(&mil, sqn, &AMF_5G, random_rand(), &serving_network_name);
                m.provide_vector(Instant::now(), v).unwrap();
            }
            Ok(ServerEvent::ResyncNeeded {
                rand,
                auts,
                serving_network_name,
                ..
            }) => {
                let sqn_ms = verify_auts(&mil, &rand, &auts).unwrap();
                sqn = next_sqn(sqn_ms);
                let v = generate_vector(&mil, sqn, &AMF_5G, random_rand(), &serving_network_name);
                m.provide_vector(Instant::now(), v).unwrap();
            }
            Ok(ServerEvent::Verified { .. }) => return true,
            Ok(ServerEvent::Failed(_)) | Err(_) => return false,
        }
    }
}

fn target(cn: &Cn) -> CnTarget {
    CnTarget {
        addr: cn.addr,
        server_name: "cn.test".into(),
        trust_anchors: vec![cn.ca.cert_der().clone()],
        serving_network_name: SNN.into(),
    }
}

fn client() -> quinn::Endpoint {
    quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap()
}

fn usim(k: [u8; 16]) -> SoftUsim {
    SoftUsim::new(SUPI.into(), Key128::from_bytes(k), Key128::from_bytes(OPC))
}

fn item(n: u8) -> BatchItem {
    companion_proto::fixtures::batch_item(n)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_aka_batch_list_revoke() {
    let cn = start_cn(0, false);
    let ep = client();
    let mut u = usim(K);
    let (s, policy) = CnSession::connect(&ep, &target(&cn), &mut u).await.unwrap();
    assert_eq!(policy.max_batch_items, 4);
    assert_eq!(s.supi(), SUPI);
    // Concurrent operations on clones of one session.
    let s2 = s.clone();
    let (a, b) = tokio::join!(
        s2.batch(BatchProvision {
            batch_id: 1,
            items: vec![item(1), item(2)]
        }),
        s.list_children()
    );
    let a = a.unwrap();
    assert_eq!(a.items.len(), 2);
    assert!(b.unwrap().children.is_empty());
    let err = s
        .revoke(Revoke {
            supi: Some("imsi-001010000000042".parse().unwrap()),
            device_id: None,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::NotFound));
    assert!(!err.is_retryable());
    // Too many items is refused locally, before anything is sent.
    let err = s
        .batch(BatchProvision {
            batch_id: 2,
            items: (1..=5).map(item).collect(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::TooLarge));
    assert!(!s.is_closed());
    s.close();
    assert!(s.is_closed());
    assert!(matches!(
        s.list_children().await,
        Err(CnClientError::Closed)
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_key_fails_and_resync_recovers() {
    let cn = start_cn(0, false);
    let ep = client();
    // A wrong K: the USIM rejects the network's AUTN (MAC failure) and says auth_failed.
    let mut bad = usim([0x47; 16]);
    let err = CnSession::connect(&ep, &target(&cn), &mut bad)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::AuthFailed), "{err}");
    // A USIM far ahead of the CN: resynchronisation, then success.
    let seq = [1000u64; 32];
    let mut ahead = usim(K).with_sqn_state(SqnState::new(seq).unwrap());
    let (s, _) = CnSession::connect(&ep, &target(&cn), &mut ahead)
        .await
        .unwrap();
    assert!(ahead.sqn_state().highest_seq() > 1000);
    s.close();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attach_and_timeout() {
    let cn = start_cn(0, false);
    let ep = client();
    let mut u = usim(K);
    let acc = attach_client::attach(&ep, &target(&cn), &mut u)
        .await
        .unwrap();
    assert_eq!(acc.expires_at, 1_900_000_000);

    let silent = start_cn(0, true);
    let opts = ClientOptions {
        connect_timeout: Duration::from_secs(5),
        exchange_timeout: Duration::from_millis(300),
    };
    let t0 = Instant::now();
    let err = CnSession::connect_with(&ep, &target(&silent), &mut u, opts)
        .await
        .unwrap_err();
    assert!(err.is_retryable(), "{err}");
    assert!(t0.elapsed() < Duration::from_secs(5));
    // An untrusted CA: the handshake fails.
    let mut t = target(&cn);
    t.trust_anchors = vec![OperatorCa::generate("other").unwrap().cert_der().clone()];
    let err = CnSession::connect(&ep, &t, &mut u).await.unwrap_err();
    assert!(matches!(err, CnClientError::Connection(_)), "{err}");
}
