//! AKA support over any store: the SQN reserved for a vector (`next_sqn`, stored in the same
//! transaction), the material of an unanswered vector sent again, resynchronisation, and the
//! failure counter.

use companion_crypto::aka::{Sqn, next_sqn};

use crate::model::{Supi, Timestamp};
use crate::store::{AkaFailures, AkaMaterial, Store, StoreError, transact};

/// Reserves the SQN for one authentication vector of a parent or child and returns it with the
/// key material. Status checks (suspended parent, revoked or expired child) are the caller's,
/// with [`crate::policy::check_attach`] and [`crate::store::Subscriber`].
pub fn aka_vector<S: Store + ?Sized>(store: &S, supi: &Supi) -> Result<AkaMaterial, StoreError> {
    transact(store, |tx| {
        let mut m = tx
            .aka_material(supi)?
            .ok_or_else(|| StoreError::UnknownSupi(supi.clone()))?;
        let sqn = next_sqn(m.sqn);
        tx.set_sqn(supi, sqn)?;
        m.sqn = sqn;
        Ok(m)
    })
}

/// The key material of `supi` with its stored SQN_HE, reserving nothing: for sending an
/// unanswered vector again ([`crate::aka_guard`]), whose SQN was reserved by [`aka_vector`].
pub fn aka_material<S: Store + ?Sized>(store: &S, supi: &Supi) -> Result<AkaMaterial, StoreError> {
    transact(store, |tx| {
        tx.aka_material(supi)?
            .ok_or_else(|| StoreError::UnknownSupi(supi.clone()))
    })
}

/// Applies a resynchronisation: `sqn_ms` is the SQN the USIM reported in a verified AUTS. The
/// next [`aka_vector`] then uses `sqn_after_resync(sqn_ms)`.
pub fn apply_resync<S: Store + ?Sized>(
    store: &S,
    supi: &Supi,
    sqn_ms: Sqn,
) -> Result<(), StoreError> {
    transact(store, |tx| tx.set_sqn(supi, sqn_ms))
}

/// Counts one failed AKA attempt for `supi`. Call only for SUPIs that exist (or rate-limit per
/// connection first), so an attacker cannot grow the table with invented SUPIs.
pub fn record_aka_failure<S: Store + ?Sized>(
    store: &S,
    supi: &Supi,
    now: Timestamp,
) -> Result<AkaFailures, StoreError> {
    transact(store, |tx| tx.record_aka_failure(supi, now))
}

/// Clears the AKA failure counter of `supi` (after a success).
pub fn clear_aka_failures<S: Store + ?Sized>(store: &S, supi: &Supi) -> Result<(), StoreError> {
    transact(store, |tx| tx.clear_aka_failures(supi))
}
