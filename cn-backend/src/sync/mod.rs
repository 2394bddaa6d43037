//! Keeping a 5G core's subscriber store in step with the child credentials (`[sync.open5gs]`).
//!
//! Every lifecycle change of a child (issue, renew, revoke, a parent's suspend or revoke)
//! records a row in the store's sync outbox in the transaction that makes the change
//! ([`crate::store::WriteTx::enqueue_sync`]). The [`Pusher`] reads the outbox, works out what
//! the core's store should hold for each credential *now* ([`open5gs::desired`]: the document,
//! or none), writes it idempotently (upsert or delete by `imsi`), and only after the core
//! acknowledged deletes the rows it pushed ([`crate::store::WriteTx::ack_sync`]). A failed push
//! is retried with exponential backoff; a crash between commit and push leaves the row, which
//! the next process pushes. The expiry sweeper queues credentials whose document is still in
//! the core after their expiry, so expired credentials disappear on time.

pub mod open5gs;

use std::sync::Arc;
use std::time::Duration;

use mongodb::bson::{Document, doc};
use mongodb::options::ClientOptions;
use mongodb::{Client, Collection};
use thiserror::Error;
use tracing::{debug, info, warn};

use crate::config::{ConfigError, Open5gsSettings};
use crate::metrics::Metrics;
use crate::model::{Supi, Timestamp};
use crate::ops;
use crate::store::{OutboxEntry, Store, StoreError, Subscriber, transact};
use open5gs::Desired;

/// Outbox rows read per round.
const BATCH: u32 = 64;
/// How often an idle pusher looks at the outbox.
const IDLE_POLL: Duration = Duration::from_millis(200);
/// First pause after a failed push (doubles up to `retry_max`).
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
/// How long the pusher lease lasts without renewal: another instance takes over this long after
/// the pusher stopped (it renews it every round, at least every `IDLE_POLL`).
pub const LEASE: Duration = Duration::from_secs(10);

/// Sync failures.
#[derive(Debug, Error)]
pub enum SyncError {
    /// cn-backend's own store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The core's subscriber store failed or is unreachable.
    #[error("subscriber store: {0}")]
    Mongo(#[from] mongodb::error::Error),
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A blocking store task failed.
    #[error("store task failed: {0}")]
    Task(String),
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, SyncError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| SyncError::Task(e.to_string()))?
        .map_err(SyncError::from)
}

/// Pushes the sync outbox to an Open5GS subscriber store.
#[derive(Debug, Clone)]
pub struct Pusher {
    store: Arc<dyn Store>,
    settings: Open5gsSettings,
    collection: Collection<Document>,
    metrics: Metrics,
    /// This process's name in the pusher lease (host, PID and a random tag).
    holder: String,
}

/// What one push did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    /// The document was upserted.
    Upserted,
    /// The document was deleted (or was already absent).
    Deleted,
}

impl Pusher {
    /// A pusher for `settings` (the MongoDB client connects lazily, at the first push).
    pub async fn new(
        store: Arc<dyn Store>,
        settings: Open5gsSettings,
        metrics: Metrics,
    ) -> Result<Self, SyncError> {
        settings.validate()?;
        let mut opts = ClientOptions::parse(&settings.uri).await?;
        // Fail a push within seconds when the core's store is down, and retry with backoff,
        // instead of the driver's default 30 s server selection.
        opts.server_selection_timeout
            .get_or_insert(Duration::from_secs(2));
        opts.connect_timeout.get_or_insert(Duration::from_secs(2));
        opts.app_name.get_or_insert_with(|| "cn-backend".into());
        let client = Client::with_options(opts)?;
        let collection = client
            .database(&settings.database)
            .collection::<Document>(&settings.collection);
        let mut tag = [0u8; 6];
        getrandom::fill(&mut tag).map_err(|e| SyncError::Task(format!("random tag: {e}")))?;
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        let holder = format!(
            "{}:{}:{}",
            host.trim(),
            std::process::id(),
            tag.iter().map(|b| format!("{b:02x}")).collect::<String>()
        );
        Ok(Self {
            store,
            settings,
            collection,
            metrics,
            holder,
        })
    }

    /// Pushes the state of one credential (as cn-backend's store has it now).
    pub async fn push_supi(&self, supi: &Supi, now: Timestamp) -> Result<Pushed, SyncError> {
        let st = self.store.clone();
        let s = supi.clone();
        let material = blocking(move || match ops::aka_material(&*st, &s) {
            Ok(m) => Ok(Some(m)),
            Err(StoreError::UnknownSupi(_)) => Ok(None),
            Err(e) => Err(e),
        })
        .await?;
        let desired = match material {
            Some(m) => match &m.subscriber {
                Subscriber::Child {
                    child,
                    parent_status,
                } => open5gs::desired(
                    child,
                    *parent_status,
                    &m.keys,
                    m.amf,
                    m.sqn,
                    &self.settings,
                    now,
                ),
                // Parents are not synced.
                Subscriber::Parent(_) => Desired::Absent,
            },
            None => Desired::Absent,
        };
        let filter = doc! { "imsi": supi.imsi() };
        let (op, r) = match desired {
            Desired::Present { set, set_on_insert } => (
                Pushed::Upserted,
                self.collection
                    .update_one(filter, doc! { "$set": set, "$setOnInsert": set_on_insert })
                    .upsert(true)
                    .await
                    .map(|_| ()),
            ),
            Desired::Absent => (
                Pushed::Deleted,
                self.collection.delete_many(filter).await.map(|_| ()),
            ),
        };
        let label = match op {
            Pushed::Upserted => "upsert",
            Pushed::Deleted => "delete",
        };
        match r {
            Ok(()) => {
                self.metrics
                    .sync_pushes
                    .with_label_values(&[label, "ok"])
                    .inc();
                Ok(op)
            }
            Err(e) => {
                self.metrics
                    .sync_pushes
                    .with_label_values(&[label, "error"])
                    .inc();
                Err(e.into())
            }
        }
    }

    /// Takes or renews the fleet's pusher lease ([`crate::store::WriteTx::sync_lease`]):
    /// whether this instance may push now.
    pub async fn hold_lease(&self) -> Result<bool, SyncError> {
        let st = self.store.clone();
        let me = self.holder.clone();
        let now = Timestamp::now();
        let until = Timestamp(
            now.0
                .saturating_add(i64::try_from(LEASE.as_secs()).unwrap_or(10)),
        );
        blocking(move || transact(&*st, |tx| tx.sync_lease(&me, now, until))).await
    }

    /// Pushes the oldest outbox rows once; returns how many rows were acknowledged. Stops at
    /// the first failure (the rows not acknowledged stay for the next round).
    pub async fn push_once(&self) -> Result<usize, SyncError> {
        let st = self.store.clone();
        let entries: Vec<OutboxEntry> = blocking(move || st.sync_pending(BATCH)).await?;
        // One push per credential, covering every row of it read in this round.
        let mut order: Vec<(Supi, i64, Timestamp, usize)> = Vec::new();
        for e in &entries {
            match order.iter_mut().find(|o| o.0 == e.supi) {
                Some(o) => {
                    o.1 = o.1.max(e.id);
                    o.3 += 1;
                }
                None => order.push((e.supi.clone(), e.id, e.created_at, 1)),
            }
        }
        let mut acked = 0;
        for (supi, up_to, first_at, rows) in order {
            let now = Timestamp::now();
            let pushed = self.push_supi(&supi, now).await?;
            let st = self.store.clone();
            let s = supi.clone();
            let present = pushed == Pushed::Upserted;
            blocking(move || transact(&*st, |tx| tx.ack_sync(&s, up_to, present, now))).await?;
            let lag = now.as_secs().saturating_sub(first_at.as_secs()).max(0);
            #[allow(clippy::cast_precision_loss)]
            self.metrics.sync_push_lag.observe(lag as f64);
            debug!(%supi, ?pushed, rows, "pushed to the subscriber store");
            acked += rows;
        }
        Ok(acked)
    }

    /// Queues every credential whose document is still in the core although it expired;
    /// returns how many.
    pub async fn sweep_once(&self, now: Timestamp) -> Result<usize, SyncError> {
        let st = self.store.clone();
        let expired = blocking(move || st.sync_expired(now, 1000)).await?;
        if expired.is_empty() {
            return Ok(0);
        }
        let n = expired.len();
        let st = self.store.clone();
        blocking(move || {
            transact(&*st, |tx| {
                for s in &expired {
                    tx.enqueue_sync(s, now)?;
                }
                Ok(())
            })
        })
        .await?;
        info!(
            n,
            "expired credentials queued for deletion from the subscriber store"
        );
        Ok(n)
    }

    /// Refreshes the backlog gauges.
    pub async fn update_gauges(&self) -> Result<(), SyncError> {
        let st = self.store.clone();
        let b = blocking(move || st.sync_backlog()).await?;
        self.metrics
            .sync_backlog
            .set(i64::try_from(b.pending).unwrap_or(i64::MAX));
        let age = b.oldest.map_or(0, |o| {
            Timestamp::now()
                .as_secs()
                .saturating_sub(o.as_secs())
                .max(0)
        });
        self.metrics.sync_oldest_age.set(age);
        Ok(())
    }

    /// Runs the pusher and the expiry sweeper until `stop` turns true.
    pub async fn run(self, mut stop: tokio::sync::watch::Receiver<bool>) {
        let retry_max = self.settings.retry_max().unwrap_or(Duration::from_secs(30));
        let sweep_every = self
            .settings
            .sweep_interval()
            .unwrap_or(Duration::from_secs(1));
        let mut backoff = FIRST_BACKOFF;
        let mut next_sweep = tokio::time::Instant::now();
        let mut failing = false;
        info!(
            database = %self.settings.database,
            collection = %self.settings.collection,
            "Open5GS subscriber sync running"
        );
        loop {
            if *stop.borrow() {
                return;
            }
            if tokio::time::Instant::now() >= next_sweep {
                next_sweep = tokio::time::Instant::now() + sweep_every;
                if let Err(e) = self.sweep_once(Timestamp::now()).await {
                    warn!(error = %e, "expiry sweep failed");
                }
            }
            if let Err(e) = self.update_gauges().await {
                warn!(error = %e, "reading the sync outbox failed");
            }
            // One pusher per fleet: the others record outbox rows and wait for the lease.
            match self.hold_lease().await {
                Ok(true) => self.metrics.sync_pusher_active.set(1),
                Ok(false) => {
                    self.metrics.sync_pusher_active.set(0);
                    tokio::select! {
                        () = tokio::time::sleep(IDLE_POLL) => {}
                        _ = stop.changed() => {}
                    }
                    continue;
                }
                Err(e) => {
                    self.metrics.sync_pusher_active.set(0);
                    warn!(error = %e, "renewing the pusher lease failed");
                }
            }
            let pause = match self.push_once().await {
                Ok(n) => {
                    if failing {
                        info!("subscriber store reachable again; pushing");
                        failing = false;
                    }
                    backoff = FIRST_BACKOFF;
                    if n > 0 {
                        continue;
                    }
                    IDLE_POLL
                }
                Err(e) => {
                    if !failing {
                        warn!(error = %e, "push to the subscriber store failed; retrying with backoff");
                    } else {
                        debug!(error = %e, "push failed again");
                    }
                    failing = true;
                    let p = backoff;
                    backoff = (backoff * 2).min(retry_max);
                    p
                }
            };
            tokio::select! {
                () = tokio::time::sleep(pause) => {}
                _ = stop.changed() => {}
            }
        }
    }
}
