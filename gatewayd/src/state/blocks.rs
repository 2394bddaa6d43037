//! The owner's block list of LAN addresses (enforced by the LAN filter).

use crate::state::CachedSql;
use std::net::IpAddr;

use rusqlite::{Row, params};

use super::rows::{corrupt, unwrap_err};
use super::{State, StateError, UnixTime};

/// An owner's block of a LAN address (enforced by the eBPF filter).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Block {
    /// The blocked address.
    pub addr: IpAddr,
    /// Unix time the block ends; `None` = until unblocked.
    pub until: Option<UnixTime>,
    /// When the block was made.
    pub created_at: UnixTime,
}

fn block_from_row(row: &Row<'_>) -> rusqlite::Result<Block> {
    let addr: String = row.get(0)?;
    Ok(Block {
        addr: addr
            .parse()
            .map_err(|_| corrupt(0, format!("{addr:?} is not an IP address")))?,
        until: row.get(1)?,
        created_at: row.get(2)?,
    })
}

impl State {
    /// Blocks `addr` until `until` (`None` = indefinitely); replaces an existing block.
    pub fn block(&self, b: &Block) -> Result<(), StateError> {
        self.conn().execute_cached(
            "INSERT INTO blocks (addr, until, created_at) VALUES (?1, ?2, ?3)
             ON CONFLICT (addr) DO UPDATE SET until = excluded.until,
                 created_at = excluded.created_at",
            params![b.addr.to_string(), b.until, b.created_at],
        )?;
        Ok(())
    }

    /// Lifts a block; `false` if `addr` was not blocked.
    pub fn unblock(&self, addr: IpAddr) -> Result<bool, StateError> {
        let n = self
            .conn()
            .execute_cached("DELETE FROM blocks WHERE addr = ?1", [addr.to_string()])?;
        Ok(n > 0)
    }

    /// Blocks in force at `now` (expired ones are deleted on the way).
    pub fn blocks(&self, now: UnixTime) -> Result<Vec<Block>, StateError> {
        let conn = self.conn();
        conn.execute_cached(
            "DELETE FROM blocks WHERE until IS NOT NULL AND until <= ?1",
            [now],
        )?;
        let mut stmt =
            conn.prepare_cached("SELECT addr, until, created_at FROM blocks ORDER BY addr")?;
        let rows = stmt.query_map([], block_from_row)?;
        rows.collect::<Result<_, _>>().map_err(unwrap_err)
    }
}
