//! A gateway whose packets land on another cn-backend instance (the one it was connected to
//! died, and a load balancer or a DNS change now sends its 4-tuple elsewhere) learns at once
//! that its connection is gone: the other instance recognises the connection ID and answers with
//! a stateless reset (RFC 9000 §10.3) whose token verifies, because the instances share the data
//! directory's `reset.key` (docs/OPERATIONS.md, "Running a fleet"). Without the shared key the
//! same packets are ignored and the gateway waits for its idle timeout.
//!
//! The test puts a UDP relay between a real gateway client and the real binaries, kills the
//! instance behind it and switches the relay to another one.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use companion_transport::cn_client::CnSession;
use tokio::net::UdpSocket;

const P1: &str = "imsi-001010000000001";

/// A copy of `dir` (same keys, certificates and configuration; its own database file), as an
/// operator provisions a second host of the fleet. `same_reset_key = false` drops `reset.key`,
/// so the copy creates a key of its own at start.
fn copy_of(dir: &Dir, same_reset_key: bool) -> Dir {
    let copy = dir.copy();
    if !same_reset_key {
        std::fs::remove_file(copy.path().join("reset.key")).unwrap();
    }
    copy
}

/// A one-client UDP relay: what the client sends goes to the current target, what comes back
/// goes to the client. The target can be switched at any time.
struct Relay {
    addr: SocketAddr,
    target: Arc<Mutex<SocketAddr>>,
    task: tokio::task::JoinHandle<()>,
}

impl Relay {
    async fn start(target: SocketAddr) -> Relay {
        let front = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
        let back = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
        let addr = front.local_addr().unwrap();
        let target = Arc::new(Mutex::new(target));
        let client: Arc<Mutex<Option<SocketAddr>>> = Arc::new(Mutex::new(None));
        let (f, b, t, c) = (front.clone(), back.clone(), target.clone(), client.clone());
        let up = async move {
            let mut buf = vec![0u8; 65_536];
            while let Ok((n, from)) = f.recv_from(&mut buf).await {
                *c.lock().unwrap() = Some(from);
                let to = *t.lock().unwrap();
                let _ = b.send_to(&buf[..n], to).await;
            }
        };
        let down = async move {
            let mut buf = vec![0u8; 65_536];
            while let Ok((n, _)) = back.recv_from(&mut buf).await {
                let to = *client.lock().unwrap();
                if let Some(to) = to {
                    let _ = front.send_to(&buf[..n], to).await;
                }
            }
        };
        let task = tokio::spawn(async move {
            tokio::join!(up, down);
        });
        Relay { addr, target, task }
    }

    fn switch_to(&self, target: SocketAddr) {
        *self.target.lock().unwrap() = target;
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Connects through a relay to `first`, kills it, switches the relay to `second`, sends on the
/// connection and waits up to `wait` for it to close. Returns how it ended (`None`: still open
/// after `wait`) and when.
async fn switch_instances(
    first: &mut Server,
    second: &Server,
    wait: Duration,
) -> (Option<quinn::ConnectionError>, Duration) {
    let relay = Relay::start(first.quic).await;
    let mut target = first.target(HOME_SNN);
    target.addr = relay.addr;
    let ep = client_endpoint();
    let mut usim = parent_usim(P1);
    let (session, _) = CnSession::connect(&ep, &target, &mut usim).await.unwrap();
    let conn = session.connection().clone();
    assert!(conn.close_reason().is_none());

    first.kill9();
    relay.switch_to(second.quic);
    let t0 = Instant::now();
    // Any packet on the old connection: a stream with some bytes (larger than a reset, which
    // quinn never sends in answer to a smaller packet).
    if let Ok(mut s) = conn.open_uni().await {
        let _ = s.write_all(&[0u8; 200]).await;
        let _ = s.finish();
    }
    let ended = tokio::time::timeout(wait, conn.closed()).await.ok();
    (ended, t0.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_instance_with_the_shared_reset_key_resets_the_connection_at_once() {
    let a = Dir::init("");
    a.add_parent(P1, &[]);
    let b = copy_of(&a, true);
    let mut srv_a = a.serve();
    let srv_b = b.serve();

    let (ended, after) = switch_instances(&mut srv_a, &srv_b, Duration::from_secs(10)).await;
    eprintln!("shared reset.key: connection ended {ended:?} {after:?} after the switch");
    assert!(
        matches!(ended, Some(quinn::ConnectionError::Reset)),
        "expected a stateless reset from the other instance, got {ended:?} after {after:?}"
    );
}

/// The control: an instance with a reset key of its own cannot produce a token the gateway
/// accepts (and does not recognise the connection IDs), so the connection is not reset; the
/// gateway would only notice at its idle timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_with_another_reset_key_cannot_reset_the_connection() {
    let a = Dir::init("");
    a.add_parent(P1, &[]);
    let c = copy_of(&a, false);
    let mut srv_a = a.serve();
    let srv_c = c.serve();
    assert_ne!(
        std::fs::read(a.path().join("reset.key")).unwrap(),
        std::fs::read(c.path().join("reset.key")).unwrap()
    );

    let (ended, after) = switch_instances(&mut srv_a, &srv_c, Duration::from_secs(3)).await;
    eprintln!("own reset.key: connection ended {ended:?} {after:?} after the switch");
    assert!(
        !matches!(ended, Some(quinn::ConnectionError::Reset)),
        "an instance without the shared key reset the connection"
    );
}
