//! Storage: the [`Store`] trait every engine implements, the SQLite engine (the default) and
//! the PostgreSQL engine ([`postgres`]).
//!
//! The trait is deliberately *primitive*: an engine provides a serialisable write transaction
//! ([`Store::write_tx`] handing out a [`WriteTx`]) plus a handful of reads. Every decision — quota,
//! lifetime, restrictions, idempotency, cascades, audit entries — is made once, in
//! [`crate::ops`] on top of these primitives and [`crate::policy`], so a PostgreSQL engine only has
//! to translate the primitives (`lock_parent` becomes `SELECT … FOR UPDATE`) and pass the
//! conformance suite (`tests/conformance/`).
//!
//! Engines encrypt K and OPc at rest with [`crate::kek::Kek`]; secrets leave the engine only as
//! [`crate::model::SubscriberKeys`].
//!
//! | module | what it owns |
//! |---|---|
//! | this one | the trait, its value types, [`transact`] |
//! | `rows` | column lists and the decoding of fetched rows, shared by both engines |
//! | `engine` | write-transaction logic both engines run over their own SQL: keys, AKA, SUPIs |
//! | [`sqlite`], [`migrations`] | the SQLite engine and its schema |
//! | [`postgres`], [`pg_migrations`] | the PostgreSQL engine and its schema |
//!
//! A new engine implements [`Store`] and [`WriteTx`] in its own folder (connection layer,
//! write transaction, store), reads its rows through `rows::Columns` and supplies
//! `engine::EngineTx`, then runs the conformance suite.

mod engine;
pub mod migrations;
pub mod pg_migrations;
pub mod postgres;
mod rows;
pub mod sqlite;

use std::sync::atomic::{AtomicBool, Ordering};

use companion_crypto::aka::Sqn;
use thiserror::Error;

use crate::kek::KekError;
use crate::model::{
    Amf, ChildCredential, DeviceId, ImsiRange, ModelError, NewParent, Parent, ParentPolicy,
    RequestId, SubscriberKeys, SubscriptionStatus, Supi, Timestamp,
};
use crate::policy::IdempotencyKey;

pub use postgres::{PgConfig, PgStore, is_postgres_url};
pub use sqlite::{SqliteConfig, SqliteSettings, SqliteStore};

/// Storage failures. Engine-specific errors are carried as text so the trait stays engine-neutral.
#[derive(Debug, Error)]
pub enum StoreError {
    /// The engine reported an error (I/O, constraint, SQL).
    #[error("database error: {0}")]
    Database(String),
    /// The database stayed locked by another writer longer than the busy timeout.
    #[error("database is busy")]
    Busy,
    /// The database server cannot be reached or closed the connection (restart, failover,
    /// network): a retry later may succeed. Nothing of the failed call was committed unless the
    /// connection was lost during the commit itself, which an idempotent retry resolves.
    #[error("{0}")]
    Unavailable(String),
    /// Secrets at rest could not be decrypted or encrypted.
    #[error(transparent)]
    Kek(#[from] KekError),
    /// The database was created with a different KEK.
    #[error(
        "the KEK does not match this database: use the kek.key the database was created with \
         (every instance of a fleet needs the same one)"
    )]
    WrongKek,
    /// The database schema is newer than this program, or unknown.
    #[error("schema: {0}")]
    Schema(String),
    /// A stored row does not parse (manual edits or corruption).
    #[error("corrupt row: {0}")]
    Corrupt(String),
    /// No parent subscription with this SUPI.
    #[error("unknown subscriber {0}")]
    ParentNotFound(Supi),
    /// No child credential with this SUPI.
    #[error("unknown credential {0}")]
    ChildNotFound(Supi),
    /// No parent or child with this SUPI.
    #[error("unknown SUPI {0}")]
    UnknownSupi(Supi),
    /// A subscriber or credential with this SUPI already exists.
    #[error("{0} already exists")]
    Duplicate(Supi),
    /// A status change that the lifecycle does not allow (e.g. resuming a revoked parent).
    #[error("{supi}: cannot change status from {from} to {to}")]
    InvalidTransition {
        /// The subscriber.
        supi: Supi,
        /// Its current status.
        from: SubscriptionStatus,
        /// The requested status.
        to: SubscriptionStatus,
    },
    /// Every SUPI in the operator's IMSI range has been allocated.
    #[error("IMSI range {0} exhausted")]
    ImsiRangeExhausted(String),
    /// A batch with more items than allowed.
    #[error("batch of {len} items exceeds the maximum of {max}")]
    BatchTooLarge {
        /// Items in the batch.
        len: usize,
        /// The maximum.
        max: usize,
    },
    /// A value failed validation.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// The random number generator failed.
    #[error("random number generator failed")]
    Rng,
    /// A manufacturer root with this name or certificate is already installed.
    #[error("a manufacturer root named {0:?}, or with the same certificate, is already installed")]
    RootExists(String),
}

/// Refuses a database whose schema `version` is newer than the `latest` this program writes
/// (either engine's migrations).
pub(crate) fn check_schema_version(version: u32, latest: u32) -> Result<(), StoreError> {
    if version > latest {
        return Err(StoreError::Schema(format!(
            "database schema version {version} is newer than this program's ({latest}): \
             run the cn-backend release that upgraded it, or a newer one"
        )));
    }
    Ok(())
}

/// A manufacturer root the operator trusts for device attestation (PROTOCOL.md §4.5).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManufacturerRoot {
    /// The operator's name for it (unique).
    pub name: String,
    /// The root certificate, DER.
    pub cert_der: Vec<u8>,
    /// SHA-256 of `cert_der` (unique).
    pub fingerprint: [u8; 32],
    /// The certificate's subject, for display.
    pub subject: String,
    /// When it was installed.
    pub added_at: Timestamp,
}

/// One pending change in the sync outbox: the credential `supi` changed and the core's
/// subscriber store has not acknowledged its new state yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxEntry {
    /// Position in the outbox (increasing).
    pub id: i64,
    /// The credential whose state is to be pushed.
    pub supi: Supi,
    /// When the change was committed.
    pub created_at: Timestamp,
}

/// The sync outbox as a whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SyncBacklog {
    /// Outbox rows not yet acknowledged.
    pub pending: u64,
    /// When the oldest of them was committed.
    pub oldest: Option<Timestamp>,
}

/// What the core's subscriber store knows of one credential.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SyncState {
    /// The last acknowledged push: `Some(true)` a document was upserted, `Some(false)` it was
    /// deleted, `None` nothing was pushed yet.
    pub present: Option<bool>,
    /// When that push was acknowledged.
    pub pushed_at: Option<Timestamp>,
    /// Outbox rows of this credential still to push.
    pub pending: u64,
}

/// What a child credential is stored with, besides its public fields.
#[derive(Debug, Clone)]
pub struct NewChild {
    /// Public fields.
    pub child: ChildCredential,
    /// K and OPc (encrypted by the engine).
    pub keys: SubscriberKeys,
}

/// Kind of an entry in the idempotency ledger.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IssuanceKind {
    /// A new credential.
    Provision,
    /// A renewal of an existing one.
    Renew,
}

impl IssuanceKind {
    /// Name stored in the database.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Provision => "provision",
            Self::Renew => "renew",
        }
    }

    /// Parses the stored name.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "provision" => Some(Self::Provision),
            "renew" => Some(Self::Renew),
            _ => None,
        }
    }
}

/// One entry of the idempotency ledger: the answer given to a request, kept to replay it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issuance {
    /// The credential the request produced or renewed.
    pub child_supi: Supi,
    /// Provision or renew.
    pub kind: IssuanceKind,
    /// The sealed credential returned (HPKE enc || ciphertext, opaque to the store).
    pub sealed: Vec<u8>,
    /// When the answer was committed.
    pub created_at: Timestamp,
}

/// Who or what a stored subscriber is, with what AKA needs.
#[derive(Debug, Clone)]
pub enum Subscriber {
    /// A companion subscription.
    Parent(Parent),
    /// A child credential and the status of its parent (for attach decisions).
    Child {
        /// The credential.
        child: ChildCredential,
        /// Its parent's current status.
        parent_status: SubscriptionStatus,
    },
}

impl Subscriber {
    /// The subscriber's SUPI.
    pub fn supi(&self) -> &Supi {
        match self {
            Self::Parent(p) => &p.supi,
            Self::Child { child, .. } => &child.supi,
        }
    }
}

/// Key material for one authentication vector, with the SQN reserved for it.
#[derive(Debug, Clone)]
pub struct AkaMaterial {
    /// Who it is for.
    pub subscriber: Subscriber,
    /// K and OPc.
    pub keys: SubscriberKeys,
    /// AMF to put in AUTN.
    pub amf: Amf,
    /// From [`crate::ops::aka_vector`]: the SQN reserved for this vector, which no other call
    /// returns again. From [`WriteTx::aka_material`]: the stored SQN_HE.
    pub sqn: Sqn,
}

/// AKA failure counter of one SUPI (for rate limiting).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct AkaFailures {
    /// Failures since the counter was last cleared.
    pub count: u32,
    /// First failure counted.
    pub first_at: Option<Timestamp>,
    /// Most recent failure.
    pub last_at: Option<Timestamp>,
}

/// What an audit entry records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AuditAction {
    /// A subscriber was added by hand.
    Add,
    /// A subscriber was added by a bulk import.
    Import,
    /// A subscriber's policy changed.
    Policy,
    /// A child credential was issued.
    Issue,
    /// A child credential was renewed.
    Renew,
    /// A child credential or parent subscription was revoked.
    Revoke,
    /// A parent subscription was suspended.
    Suspend,
    /// A suspended parent subscription was resumed.
    Resume,
}

impl AuditAction {
    /// Name stored in the database.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Add => "add",
            Self::Import => "import",
            Self::Policy => "policy",
            Self::Issue => "issue",
            Self::Renew => "renew",
            Self::Revoke => "revoke",
            Self::Suspend => "suspend",
            Self::Resume => "resume",
        }
    }

    /// Parses the stored name.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "add" => Self::Add,
            "import" => Self::Import,
            "policy" => Self::Policy,
            "issue" => Self::Issue,
            "renew" => Self::Renew,
            "revoke" => Self::Revoke,
            "suspend" => Self::Suspend,
            "resume" => Self::Resume,
            _ => return None,
        })
    }
}

/// One audit trail entry to append.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditEvent {
    /// When.
    pub at: Timestamp,
    /// Who: an operator name, `api:<token name>`, `gateway:<parent SUPI>`, `import`.
    pub actor: String,
    /// What.
    pub action: AuditAction,
    /// The subscriber or credential acted on.
    pub supi: Supi,
    /// The parent, for child credentials.
    pub parent: Option<Supi>,
    /// The device, for child credentials.
    pub device_id: Option<DeviceId>,
    /// The request, for issue and renew.
    pub request_id: Option<RequestId>,
    /// Free-form detail (e.g. new expiry, reason). Never secrets.
    pub detail: String,
}

/// A stored audit entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditRecord {
    /// Monotonic position in the trail.
    pub id: i64,
    /// The entry.
    pub event: AuditEvent,
}

/// Filter for reading the audit trail.
#[derive(Debug, Clone, Default)]
pub struct AuditQuery {
    /// Entries about this SUPI, as subject or as parent.
    pub supi: Option<Supi>,
    /// Entries with `id > after_id` (paging).
    pub after_id: Option<i64>,
    /// At most this many entries (0 means a default of 100).
    pub limit: u32,
}

/// Primitive operations inside one write transaction. Obtained from [`Store::write_tx`];
/// everything done through it commits or rolls back together.
pub trait WriteTx {
    /// Reads a parent and locks it against concurrent writers until the transaction ends.
    fn lock_parent(&mut self, supi: &Supi) -> Result<Option<Parent>, StoreError>;
    /// Inserts a parent; [`StoreError::Duplicate`] if the SUPI is taken by a parent or child.
    fn insert_parent(&mut self, parent: &NewParent, now: Timestamp) -> Result<(), StoreError>;
    /// Sets a parent's status.
    fn set_parent_status(
        &mut self,
        supi: &Supi,
        status: SubscriptionStatus,
        now: Timestamp,
    ) -> Result<(), StoreError>;
    /// Replaces a parent's policy.
    fn set_parent_policy(
        &mut self,
        supi: &Supi,
        policy: &ParentPolicy,
        now: Timestamp,
    ) -> Result<(), StoreError>;
    /// Counts active children of `parent` with `expires_at > now`, in O(1) per parent
    /// (amortised): engines keep a counter of the parent's live children in the parent row
    /// (schema v5), reconciled here with the children that expired since (or, on a clock
    /// behind, that are live again), so the result is exactly that count for any `now`. Call
    /// it with the parent locked ([`WriteTx::lock_parent`]).
    fn count_active_children(&mut self, parent: &Supi, now: Timestamp) -> Result<u32, StoreError>;
    /// Looks a request up in the idempotency ledger.
    fn issuance(&mut self, key: &IdempotencyKey) -> Result<Option<Issuance>, StoreError>;
    /// Looks up, in advance, the ledger entries of `keys` that [`WriteTx::issuance`] will be
    /// asked for in this transaction (one round trip instead of one per key). Engines without
    /// round trips keep the default, which does nothing. A batch calls it with the keys of its
    /// provision items, which is also how many SUPIs it may allocate.
    fn prefetch_issuances(&mut self, _keys: &[IdempotencyKey]) -> Result<(), StoreError> {
        Ok(())
    }
    /// Records the answer to a request in the idempotency ledger.
    fn insert_issuance(
        &mut self,
        key: &IdempotencyKey,
        issuance: &Issuance,
    ) -> Result<(), StoreError>;
    /// Reads a child credential.
    fn child(&mut self, supi: &Supi) -> Result<Option<ChildCredential>, StoreError>;
    /// Reads and decrypts K and OPc of a parent or child.
    fn keys(&mut self, supi: &Supi) -> Result<Option<SubscriberKeys>, StoreError>;
    /// Allocates an unused SUPI from `range`, uniformly at random among the free ones as far as
    /// possible (a CSPRNG draw, checked against every parent and child; when the range is
    /// nearly full, the first free one after a random point), so child SUPIs cannot be guessed
    /// from one another. No allocator state is kept: a SUPI is taken by the child row stored
    /// with it in the same transaction, so rolled back (to a savepoint or entirely) it is free
    /// again, and one never stored was never taken: batch issuance allocates before the seal,
    /// which may still fail, and writes only after it, so an item that fails consumes nothing.
    /// An engine must keep it so (an allocation writes nothing the transaction keeps).
    /// [`StoreError::ImsiRangeExhausted`] when no SUPI of the range is free.
    fn allocate_supi(&mut self, range: &ImsiRange) -> Result<Supi, StoreError>;
    /// Children of `parent` issued at or after `since` (SUPIs allocated to it in that window,
    /// since every allocation is stored with its child) and the oldest of their `issued_at`.
    fn children_issued_since(
        &mut self,
        parent: &Supi,
        since: Timestamp,
    ) -> Result<(u32, Option<Timestamp>), StoreError>;
    /// Inserts a child credential; [`StoreError::Duplicate`] if the SUPI is taken.
    fn insert_child(&mut self, child: &NewChild) -> Result<(), StoreError>;
    /// Stores a renewal: the expiry, restrictions and renewal time of `renewed`, the child row
    /// of its SUPI.
    fn renew_child(&mut self, renewed: &ChildCredential) -> Result<(), StoreError>;
    /// Revokes one child; returns false if it was already revoked.
    fn revoke_child(&mut self, supi: &Supi, now: Timestamp) -> Result<bool, StoreError>;
    /// Revokes every active child of `parent`; returns the ones revoked.
    fn revoke_children_of(
        &mut self,
        parent: &Supi,
        now: Timestamp,
    ) -> Result<Vec<ChildCredential>, StoreError>;
    /// Reads a parent or child with its keys, AMF and current SQN_HE.
    fn aka_material(&mut self, supi: &Supi) -> Result<Option<AkaMaterial>, StoreError>;
    /// Sets SQN_HE of a parent or child.
    fn set_sqn(&mut self, supi: &Supi, sqn: Sqn) -> Result<(), StoreError>;
    /// Adds one to the AKA failure counter of `supi`.
    fn record_aka_failure(
        &mut self,
        supi: &Supi,
        now: Timestamp,
    ) -> Result<AkaFailures, StoreError>;
    /// Clears the AKA failure counter of `supi`.
    fn clear_aka_failures(&mut self, supi: &Supi) -> Result<(), StoreError>;
    /// Appends one entry to the audit trail.
    fn append_audit(&mut self, event: &AuditEvent) -> Result<(), StoreError>;
    /// Records in the sync outbox that credential `supi` changed, when the outbox is on
    /// ([`Store::set_sync_outbox`]); does nothing otherwise.
    fn enqueue_sync(&mut self, supi: &Supi, now: Timestamp) -> Result<(), StoreError>;
    /// Acknowledges a push: deletes the outbox rows of `supi` up to `up_to` (rows added since
    /// stay) and records what the core's store now holds (`present`).
    fn ack_sync(
        &mut self,
        supi: &Supi,
        up_to: i64,
        present: bool,
        now: Timestamp,
    ) -> Result<(), StoreError>;
    /// Takes or renews the lease of the one pusher of a fleet: `holder` gets it (until `until`)
    /// when nobody holds it, when it already holds it, or when the holder's lease ended before
    /// `now`. Returns whether `holder` holds it now. Several instances on one database thus
    /// push one at a time, and another takes over when the pusher stops renewing.
    fn sync_lease(
        &mut self,
        holder: &str,
        now: Timestamp,
        until: Timestamp,
    ) -> Result<bool, StoreError>;
}

/// A storage engine. Reads may run concurrently with each other and with the writer.
pub trait Store: Send + Sync + std::fmt::Debug {
    /// Runs `f` in one serialisable write transaction and commits iff it returns `Ok`; the
    /// commit is durable when this returns. Writers are serialised (SQLite: one writer
    /// connection and `BEGIN IMMEDIATE`). An engine may call `f` again after a serialisation
    /// conflict, so `f` must have no effects outside the transaction it is given.
    fn write_tx(
        &self,
        f: &mut dyn FnMut(&mut dyn WriteTx) -> Result<(), StoreError>,
    ) -> Result<(), StoreError>;

    /// A parent subscription.
    fn parent(&self, supi: &Supi) -> Result<Option<Parent>, StoreError>;
    /// Parent subscriptions in SUPI order, after `after` (paging), at most `limit`.
    fn list_parents(&self, after: Option<&Supi>, limit: u32) -> Result<Vec<Parent>, StoreError>;
    /// Number of parent subscriptions.
    fn count_parents(&self) -> Result<u64, StoreError>;
    /// A child credential.
    fn child(&self, supi: &Supi) -> Result<Option<ChildCredential>, StoreError>;
    /// Every child credential of a parent, in SUPI order.
    fn children_of(&self, parent: &Supi) -> Result<Vec<ChildCredential>, StoreError>;
    /// Active children of `parent` with `expires_at > now`.
    fn count_active_children(&self, parent: &Supi, now: Timestamp) -> Result<u32, StoreError>;
    /// The answer stored for a request, if any.
    fn issuance(&self, key: &IdempotencyKey) -> Result<Option<Issuance>, StoreError>;
    /// The AKA failure counter of a SUPI.
    fn aka_failures(&self, supi: &Supi) -> Result<AkaFailures, StoreError>;
    /// Audit entries matching `query`, oldest first.
    fn audit(&self, query: &AuditQuery) -> Result<Vec<AuditRecord>, StoreError>;
    /// The installed manufacturer roots, by name.
    fn manufacturer_roots(&self) -> Result<Vec<ManufacturerRoot>, StoreError>;
    /// Installs a manufacturer root; [`StoreError::RootExists`] if its name or certificate is
    /// installed already.
    fn add_manufacturer_root(&self, root: &ManufacturerRoot) -> Result<(), StoreError>;
    /// Removes the root named `name`; whether there was one.
    fn remove_manufacturer_root(&self, name: &str) -> Result<bool, StoreError>;

    /// Turns the sync outbox on (a subscriber store is configured, `[sync.open5gs]`): from now
    /// on [`WriteTx::enqueue_sync`] records rows. Off by default, so that nothing piles up
    /// without a pusher.
    fn set_sync_outbox(&self, on: bool) {
        self.sync_outbox_flag().store(on, Ordering::Relaxed);
    }
    /// Whether the sync outbox is on.
    fn sync_outbox(&self) -> bool {
        self.sync_outbox_flag().load(Ordering::Relaxed)
    }
    /// The engine's sync outbox switch, behind [`Store::set_sync_outbox`] and
    /// [`Store::sync_outbox`] (its write transactions read it when they begin).
    fn sync_outbox_flag(&self) -> &AtomicBool;
    /// The oldest outbox rows, at most `limit`.
    fn sync_pending(&self, limit: u32) -> Result<Vec<OutboxEntry>, StoreError>;
    /// Size and age of the outbox.
    fn sync_backlog(&self) -> Result<SyncBacklog, StoreError>;
    /// The sync state of one credential; `None` when it was never pushed nor queued.
    fn sync_state(&self, supi: &Supi) -> Result<Option<SyncState>, StoreError>;
    /// Credentials whose document is in the core's store although they expired at or before
    /// `now`, with no push queued (the expiry sweeper queues them), at most `limit`.
    fn sync_expired(&self, now: Timestamp, limit: u32) -> Result<Vec<Supi>, StoreError>;
}

/// Runs `f` in a write transaction of `store` and returns its value.
pub fn transact<S, T, F>(store: &S, mut f: F) -> Result<T, StoreError>
where
    S: Store + ?Sized,
    F: FnMut(&mut dyn WriteTx) -> Result<T, StoreError>,
{
    let mut out = None;
    store.write_tx(&mut |tx| {
        out = Some(f(tx)?);
        Ok(())
    })?;
    out.ok_or_else(|| StoreError::Database("transaction returned no value".into()))
}
