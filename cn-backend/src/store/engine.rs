//! The write-transaction logic both engines share below [`WriteTx`](super::WriteTx): K and OPc
//! sealed under the KEK for their row, AKA material (a parent, else a child and its parent's
//! status), and the SUPI allocator's random probes and ordered walk. An engine supplies its
//! queries through [`EngineTx`]; the decisions are made here, once.

use std::ops::ControlFlow;

use super::{AkaMaterial, StoreError, Subscriber};
use crate::kek::{Kek, RowId};
use crate::model::{ChildCredential, ImsiRange, Parent, SubscriberKeys, Supi};

/// The table of parent subscriptions (also the KEK binding's table name).
pub(crate) const PARENTS: &str = "parents";
/// The table of child credentials (also the KEK binding's table name).
pub(crate) const CHILDREN: &str = "children";

/// Encrypted K and OPc as stored.
pub(crate) type EncKeys = (Vec<u8>, Vec<u8>);

/// Uniform random draws the allocator makes before it falls back to an ordered walk.
const RANDOM_PROBES: usize = 32;

/// The queries of an engine's write transaction that the shared logic runs on.
pub(crate) trait EngineTx {
    /// The key-encryption key of the store.
    fn kek(&self) -> &Kek;
    /// The parent row of `supi`, locked for the transaction if `lock` (and the engine locks rows).
    fn parent_row(&mut self, supi: &Supi, lock: bool) -> Result<Option<Parent>, StoreError>;
    /// The child row of `supi`, locked for the transaction if `lock` (and the engine locks rows).
    fn child_row(&mut self, supi: &Supi, lock: bool)
    -> Result<Option<ChildCredential>, StoreError>;
    /// The encrypted K and OPc of `supi` in `table` ([`PARENTS`] or [`CHILDREN`]).
    fn enc_keys(&mut self, table: &str, supi: &Supi) -> Result<Option<EncKeys>, StoreError>;
    /// Whether a parent or a child holds `supi`.
    fn supi_taken(&mut self, supi: &Supi) -> Result<bool, StoreError>;
    /// Calls `visit` with every SUPI from `lo` to `hi` that a parent or child holds, in text
    /// order, until it breaks.
    fn walk_taken(
        &mut self,
        lo: &Supi,
        hi: &Supi,
        visit: &mut dyn FnMut(&str) -> ControlFlow<()>,
    ) -> Result<(), StoreError>;
}

/// K and OPc of `supi` sealed for their row of `table`.
pub(crate) fn seal_keys(
    kek: &Kek,
    table: &str,
    supi: &Supi,
    keys: &SubscriberKeys,
) -> Result<EncKeys, StoreError> {
    let id = |column| RowId {
        table,
        row: supi.as_str(),
        column,
    };
    Ok((kek.seal(id("k"), &keys.k)?, kek.seal(id("opc"), &keys.opc)?))
}

/// K and OPc of `supi` opened from their row of `table`.
fn open_keys(
    kek: &Kek,
    table: &str,
    supi: &Supi,
    (k, opc): &EncKeys,
) -> Result<SubscriberKeys, StoreError> {
    let id = |column| RowId {
        table,
        row: supi.as_str(),
        column,
    };
    Ok(SubscriberKeys {
        k: kek.open(id("k"), k)?,
        opc: kek.open(id("opc"), opc)?,
    })
}

/// K and OPc of `supi` (a parent or a child), opened.
fn keys_in(
    tx: &mut impl EngineTx,
    table: &str,
    supi: &Supi,
) -> Result<Option<SubscriberKeys>, StoreError> {
    match tx.enc_keys(table, supi)? {
        Some(enc) => open_keys(tx.kek(), table, supi, &enc).map(Some),
        None => Ok(None),
    }
}

/// [`WriteTx::keys`](super::WriteTx::keys): a parent's K and OPc, else a child's.
pub(crate) fn keys(
    tx: &mut impl EngineTx,
    supi: &Supi,
) -> Result<Option<SubscriberKeys>, StoreError> {
    for table in [PARENTS, CHILDREN] {
        if let Some(keys) = keys_in(tx, table, supi)? {
            return Ok(Some(keys));
        }
    }
    Ok(None)
}

/// [`WriteTx::aka_material`](super::WriteTx::aka_material): the subscriber's row (locked: the
/// caller reserves the next SQN from the value read here) and its keys; for a child, also its
/// parent's status.
pub(crate) fn aka_material(
    tx: &mut impl EngineTx,
    supi: &Supi,
) -> Result<Option<AkaMaterial>, StoreError> {
    if let Some(parent) = tx.parent_row(supi, true)? {
        let Some(keys) = keys_in(tx, PARENTS, supi)? else {
            return Ok(None);
        };
        return Ok(Some(AkaMaterial {
            amf: parent.amf,
            sqn: parent.sqn,
            keys,
            subscriber: Subscriber::Parent(parent),
        }));
    }
    let Some(child) = tx.child_row(supi, true)? else {
        return Ok(None);
    };
    let parent = tx
        .parent_row(&child.parent, false)?
        .ok_or_else(|| StoreError::Corrupt(format!("{supi} has no parent row")))?;
    let Some(keys) = keys_in(tx, CHILDREN, supi)? else {
        return Ok(None);
    };
    Ok(Some(AkaMaterial {
        amf: child.amf,
        sqn: child.sqn,
        keys,
        subscriber: Subscriber::Child {
            child,
            parent_status: parent.status,
        },
    }))
}

/// A uniformly random MSIN of `range`, from the operating system's CSPRNG (rejection
/// sampling: no modulo bias), so a child SUPI says nothing about the others.
pub(crate) fn random_msin(range: &ImsiRange) -> Result<u64, StoreError> {
    let span = range.last_msin() - range.first_msin() + 1;
    // The largest multiple of `span` that fits in u64: draws at or above it are redrawn
    // (fewer than half of them, as span <= 10^10 < 2^63).
    let zone = u64::MAX - (u64::MAX % span);
    loop {
        let mut b = [0u8; 8];
        getrandom::fill(&mut b).map_err(|_| StoreError::Kek(crate::kek::KekError::Rng))?;
        let x = u64::from_le_bytes(b);
        if x < zone {
            return Ok(range.first_msin() + x % span);
        }
    }
}

/// The SUPI of `msin`, which the caller drew from `range`.
pub(crate) fn range_supi(range: &ImsiRange, msin: u64) -> Result<Supi, StoreError> {
    range.supi(msin).ok_or_else(|| {
        StoreError::Database(format!(
            "MSIN {msin} outside the IMSI range {}",
            range.plmn()
        ))
    })
}

/// The first MSIN in `from..=to` of `range` that no parent or child holds: one walk, in order,
/// over the SUPIs taken in that span (same width within a PLMN, so text order is numeric).
fn first_free(
    tx: &mut impl EngineTx,
    range: &ImsiRange,
    from: u64,
    to: u64,
) -> Result<Option<u64>, StoreError> {
    let (Some(lo), Some(hi)) = (range.supi(from), range.supi(to)) else {
        return Ok(None);
    };
    let prefix_len = "imsi-".len() + range.plmn().len();
    let mut expected = from;
    let mut found = None;
    tx.walk_taken(&lo, &hi, &mut |taken| {
        let Some(msin) = taken.get(prefix_len..).and_then(|d| d.parse::<u64>().ok()) else {
            return ControlFlow::Continue(());
        };
        if msin > expected {
            found = Some(Some(expected));
            return ControlFlow::Break(());
        }
        expected = expected.max(msin + 1);
        if expected > to {
            found = Some(None);
            return ControlFlow::Break(());
        }
        ControlFlow::Continue(())
    })?;
    Ok(found.unwrap_or((expected <= to).then_some(expected)))
}

/// A free SUPI of `range` by uniform draws, each checked on its own; while the range is less
/// than ~90 % taken one of them is free with near certainty (all [`RANDOM_PROBES`] taken at a
/// fill of f happens with f^32). Nearly full: the first free MSIN at or after a random point
/// (wrapping around), found with one ordered walk over the taken SUPIs instead of more draws.
pub(crate) fn allocate_by_probing(
    tx: &mut impl EngineTx,
    range: &ImsiRange,
) -> Result<Supi, StoreError> {
    for _ in 0..RANDOM_PROBES {
        let supi = range_supi(range, random_msin(range)?)?;
        // Skip SUPIs already issued or imported as parents.
        if !tx.supi_taken(&supi)? {
            return Ok(supi);
        }
    }
    let start = random_msin(range)?;
    if let Some(msin) = first_free(tx, range, start, range.last_msin())? {
        return range_supi(range, msin);
    }
    if start > range.first_msin()
        && let Some(msin) = first_free(tx, range, range.first_msin(), start - 1)?
    {
        return range_supi(range, msin);
    }
    Err(StoreError::ImsiRangeExhausted(format!(
        "{}:{}-{}",
        range.plmn(),
        range.first_msin(),
        range.last_msin()
    )))
}
