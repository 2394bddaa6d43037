//! A UDP relay that delays every datagram: the wide-area link between a home router and the
//! operator's data centre, in front of a CN.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;

/// A UDP relay on loopback that holds every datagram for `one_way` in each direction: a
/// wide-area link between a home router and the operator's data centre (this kernel has no
/// netem). Each client address gets its own upstream socket; order is kept per direction. Runs
/// on its own thread until dropped.
#[derive(Debug)]
pub struct DelayProxy {
    /// Where clients send (stands in for the upstream's address).
    pub addr: SocketAddr,
    /// The round-trip time added.
    pub rtt: std::time::Duration,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl DelayProxy {
    /// Starts a relay to `upstream` adding `rtt` (half each way).
    pub fn start(upstream: SocketAddr, rtt: Duration) -> anyhow::Result<Self> {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").context("binding the delay proxy")?;
        socket.set_nonblocking(true)?;
        let addr = socket.local_addr()?;
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel();
        let one_way = rtt / 2;
        let thread = std::thread::Builder::new()
            .name("delay-proxy".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        eprintln!("delay proxy: no runtime: {e}");
                        return;
                    }
                };
                rt.block_on(async move {
                    tokio::select! {
                        r = relay(socket, upstream, one_way) => {
                            if let Err(e) = r { eprintln!("delay proxy stopped: {e:#}"); }
                        }
                        _ = stop_rx => {}
                    }
                });
            })?;
        Ok(Self {
            addr,
            rtt,
            stop: Some(stop_tx),
            thread: Some(thread),
        })
    }
}

impl Drop for DelayProxy {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

type Delayed = tokio::sync::mpsc::UnboundedSender<(tokio::time::Instant, Vec<u8>)>;

/// Sends what arrives on the returned channel to `to` through `socket`, each datagram at its
/// due time (FIFO: the delay is constant, so due times are in order).
fn delayed_sender(
    socket: std::sync::Arc<tokio::net::UdpSocket>,
    to: Option<SocketAddr>,
) -> Delayed {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(tokio::time::Instant, Vec<u8>)>();
    tokio::spawn(async move {
        while let Some((due, data)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            let _ = match to {
                Some(a) => socket.send_to(&data, a).await,
                None => socket.send(&data).await,
            };
        }
    });
    tx
}

async fn relay(
    socket: std::net::UdpSocket,
    upstream: SocketAddr,
    one_way: Duration,
) -> anyhow::Result<()> {
    let front = std::sync::Arc::new(tokio::net::UdpSocket::from_std(socket)?);
    // Client address → the delayed sender towards the upstream on that client's own socket.
    let mut clients: HashMap<SocketAddr, Delayed> = HashMap::new();
    let mut buf = vec![0u8; 65_536];
    loop {
        let (n, from) = front.recv_from(&mut buf).await?;
        let due = tokio::time::Instant::now() + one_way;
        let tx = match clients.get(&from) {
            Some(tx) => tx.clone(),
            None => {
                let up = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
                up.connect(upstream).await?;
                let up = std::sync::Arc::new(up);
                let tx = delayed_sender(up.clone(), None);
                // Answers: upstream → (delay) → this client.
                let back = delayed_sender(front.clone(), Some(from));
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 65_536];
                    while let Ok(n) = up.recv(&mut buf).await {
                        let due = tokio::time::Instant::now() + one_way;
                        if back.send((due, buf[..n].to_vec())).is_err() {
                            break;
                        }
                    }
                });
                clients.insert(from, tx.clone());
                tx
            }
        };
        let _ = tx.send((due, buf[..n].to_vec()));
    }
}
