//! Who may connect, at the door: the per-address rate of new connections, QUIC Retry for
//! addresses that have not proved they receive our packets, and automatic blocks after
//! repeated failed handshakes (kept within the deny list's size). Every table keyed by
//! address is bounded.

use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::{DeviceServer, lock, unix_now};
use crate::config::{DevicesConfig, RetryPolicy};
use crate::metrics::{address, table};

/// A token bucket of new connections from one address.
#[derive(Debug)]
pub(super) struct Bucket {
    tokens: f64,
    at: Instant,
}

impl DeviceServer {
    /// A handshake from `ip` failed or was refused. Counted towards an automatic block only if
    /// the address was `validated` (the client proved it receives our packets there: a Retry
    /// token, or a completed handshake); otherwise the source may be forged, and the address
    /// only becomes a Retry suspect (`retry = "under_load"`).
    pub(super) fn handshake_failed(&self, ip: IpAddr, validated: bool) {
        let label = if validated {
            address::VALIDATED
        } else {
            address::UNVALIDATED
        };
        self.metrics
            .handshake_failures
            .with_label_values(&[label])
            .inc();
        if !validated {
            let (evicted, len) = {
                let mut s = lock(&self.suspects);
                let evicted = s.insert(ip, Instant::now()).is_some();
                (evicted, s.len())
            };
            self.metrics
                .address_table(table::RETRY_SUSPECTS, len, usize::from(evicted));
            return;
        }
        let Some(f) = self.filter.get() else { return };
        let now = unix_now();
        if let Some(b) = f.note_failure(ip, now) {
            tracing::warn!(addr = %ip, until = ?b.until, "repeated failed handshakes: source blocked");
            self.make_room_for_a_block(now);
            if let Err(e) = self.state.block(&b) {
                tracing::error!(error = %e, "cannot store an automatic block");
            }
            if let Ok(blocks) = self.state.blocks(now) {
                self.metrics.address_table(table::BLOCKS, blocks.len(), 0);
                f.sync(&blocks, self.registry.window().is_some(), now);
            }
        }
    }

    /// Keeps the stored blocks within the deny list's size (`DENY_MAX`): a full list loses the
    /// block that ends soonest (never an indefinite one, the owner's) to the new one.
    pub(super) fn make_room_for_a_block(&self, now: i64) {
        let max = companion_filter_common::DENY_MAX as usize;
        let Ok(blocks) = self.state.blocks(now) else {
            return;
        };
        for (until, addr) in blocks_to_evict(&blocks, max) {
            match self.state.unblock(addr) {
                Ok(_) => {
                    tracing::warn!(
                        addr = %addr,
                        until,
                        "deny list full ({max} blocks): the block ending soonest makes room"
                    );
                    self.metrics
                        .address_table_evictions
                        .with_label_values(&[table::BLOCKS])
                        .inc();
                }
                Err(e) => tracing::error!(error = %e, "cannot lift a block to make room"),
            }
        }
    }

    /// Whether a new connection from `ip`, not yet validated, gets a Retry.
    pub(super) fn wants_retry(&self, cfg: &DevicesConfig, ip: IpAddr, window: Duration) -> bool {
        match cfg.retry {
            RetryPolicy::Always => true,
            RetryPolicy::Never => false,
            RetryPolicy::UnderLoad => {
                if self.handshaking.load(Ordering::Relaxed) >= cfg.retry_load_handshakes {
                    return true;
                }
                let mut s = lock(&self.suspects);
                match s.peek(&ip) {
                    Some(t) if t.elapsed() < window => true,
                    Some(_) => {
                        s.remove(&ip);
                        false
                    }
                    None => false,
                }
            }
        }
    }

    /// Bounds the per-address tables to `max_tracked_sources` (SIGHUP).
    pub fn set_max_tracked_sources(&self, max: usize) {
        let (evicted, len) = {
            let mut r = lock(&self.rate);
            (r.set_capacity(max), r.len())
        };
        self.metrics
            .address_table(table::CONNECTION_RATE, len, evicted);
        let (evicted, len) = {
            let mut s = lock(&self.suspects);
            (s.set_capacity(max), s.len())
        };
        self.metrics
            .address_table(table::RETRY_SUSPECTS, len, evicted);
    }

    /// Whether a new connection from `ip` fits its rate of `per_sec` a second (bursts of two
    /// seconds' worth); `0` admits all.
    pub(super) fn admit_rate(&self, ip: IpAddr, per_sec: u32) -> bool {
        if per_sec == 0 {
            return true;
        }
        let now = Instant::now();
        let burst = f64::from(per_sec) * 2.0;
        let mut rate = lock(&self.rate);
        if !rate.contains_key(&ip) {
            let evicted = rate
                .insert(
                    ip,
                    Bucket {
                        tokens: burst,
                        at: now,
                    },
                )
                .is_some();
            self.metrics
                .address_table(table::CONNECTION_RATE, rate.len(), usize::from(evicted));
        }
        // Just inserted if it was missing (the invariant the `else` relies on).
        let Some(b) = rate.get_mut(&ip) else {
            return true;
        };
        b.tokens =
            (b.tokens + now.duration_since(b.at).as_secs_f64() * f64::from(per_sec)).min(burst);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// The blocks to lift so that one more fits within `max`: those ending soonest, never an
/// indefinite one (the owner's).
pub(super) fn blocks_to_evict(blocks: &[crate::state::Block], max: usize) -> Vec<(i64, IpAddr)> {
    if blocks.len() < max {
        return Vec::new();
    }
    let mut finite: Vec<_> = blocks
        .iter()
        .filter_map(|b| b.until.map(|u| (u, b.addr)))
        .collect();
    finite.sort_unstable();
    finite.truncate(blocks.len() + 1 - max);
    finite
}
