#![warn(missing_docs)]
//! The operator-side core-network credential service: storage and policy core.
//!
//! | module | what |
//! |---|---|
//! | [`model`] | domain types: SUPI, IMSI range, parent subscription, child credential, restrictions |
//! | [`policy`] | pure policy functions (seed Notes 1–3): lifetime, quota, narrowing, renewal, attach |
//! | [`kek`] | the key-encryption key that protects K and OPc at rest |
//! | [`store`] | the [`store::Store`] trait (engine primitives), the SQLite and PostgreSQL engines |
//! | [`ops`] | operations over any store: batch issuance, lifecycle, AKA SQN, administration |
//! | [`import`] | all-or-nothing CSV import of parent subscriptions |
//! | [`config`] | `cn-backend.toml` and the data directory layout |
//! | [`service`] | shared state of the running service, `init`, HPKE sealing of bundles |
//! | [`aka_guard`] | AKA lock-out by SUPI and source prefix, reuse of unanswered vectors (SQN) |
//! | [`server`] | the QUIC server: gateway sessions (AKA, batches, revoke, list) and device attach |
//! | [`admin`] | subscriber administration shared by the CLI and the HTTP API |
//! | [`http`] | the admin HTTP API, `/metrics`, `/healthz` |
//! | [`metrics`] | Prometheus metrics |
//! | [`serve`] | `cn-backend serve`: listeners, ready file, signal handling and draining |
//! | [`sync`] | the Open5GS subscriber store kept in step: document mapping, outbox pusher, expiry sweeper |
//!
//! Policy is plain synchronous code; the database sits behind [`store::Store`]. The QUIC server,
//! CLI and HTTP API sit on top of [`ops`] and the store's read methods.

pub mod admin;
pub mod aka_guard;
pub mod config;
pub mod http;
pub mod import;
pub mod kek;
pub mod metrics;
pub mod model;
pub mod ops;
pub mod parallel;
pub mod policy;
pub mod serve;
pub mod server;
pub mod service;
pub mod store;
pub mod sync;

pub use kek::Kek;
pub use model::{ChildCredential, Parent, Supi, Timestamp};
pub use ops::{Batch, BatchItem, IssuerConfig, ItemOutcome, Sealer};
pub use store::{PgStore, SqliteStore, Store, StoreError};
