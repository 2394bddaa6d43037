//! The operator-side core-network credential service: storage and policy core.
//!
//! | module | what |
//! |---|---|
//! | [`model`] | domain types: SUPI, IMSI range, parent subscription, child credential, restrictions |
//! | [`policy`] | pure policy functions (seed Notes 1–3): lifetime, quota, narrowing, renewal, attach |
//! | [`kek`] | the key-encryption key that protects K and OPc at rest |
//! | [`store`] | the [`store::Store`] trait (engine primitives) and the SQLite engine |
//! | [`ops`] | operations over any store: batch issuance, lifecycle, AKA SQN, administration |
//! | [`import`] | all-or-nothing CSV import of parent subscriptions |
//!
//! Policy is plain synchronous code; the database sits behind [`store::Store`]. The QUIC server,
//! CLI and HTTP API sit on top of [`ops`] and the store's read methods.

pub mod import;
pub mod kek;
pub mod model;
pub mod ops;
pub mod policy;
pub mod store;

pub use kek::Kek;
pub use model::{ChildCredential, Parent, Supi, Timestamp};
pub use ops::{Batch, BatchItem, IssuerConfig, ItemOutcome, Sealer};
pub use store::{SqliteStore, Store, StoreError};
