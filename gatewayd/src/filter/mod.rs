//! The LAN filter in front of the device QUIC port (issue 6).
//!
//! One policy — deny list (with expiry) → strict mode (paired sources only, unless the pairing
//! window is open) → QUIC Initials shorter than 1200 bytes dropped (RFC 9000 §14.1) → per-source
//! token bucket on Initials — applied only to UDP addressed to the QUIC port, with per-reason
//! counters. It runs in one of two places:
//!
//! - **eBPF** ([`ebpf`]): the program built from `ebpf/filter-ebpf` is attached to
//!   `[filter] interfaces` as XDP (native, falling back to generic/skb mode, e.g. on veth) or as
//!   a TC ingress classifier (`mode = "tc"`); gatewayd keeps its maps in sync;
//! - **userspace** ([`userspace`]): when eBPF cannot be used (no privilege, old kernel, no
//!   interface configured, or `mode = "userspace"`), the same decision function
//!   (`companion_filter_common::decide`) runs on every datagram the QUIC socket receives, before
//!   quinn parses it.
//!
//! The mode is said loudly: a log line at start, `gatewayctl status`, and the
//! `gatewayd_filter_mode{mode}` gauge; counters are `gatewayd_filter_packets_total{reason}`.
//!
//! Files: `filter/mod.rs` ([`Filter`]: start, sync, blocks), `filter/paired.rs` (paired-source
//! tables), `filter/status.rs` (mode, counters, status), [`ebpf`], [`userspace`].

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use companion_filter_common::{
    DENY_MAX, DenyEntry, FilterConfig as BpfConfig, PAIRED_MAX, Reason, SourceKey,
};

use crate::bounded::BoundedMap;
use crate::config::{Config, FilterModeSetting};
use crate::metrics::{Metrics, table};
use crate::state::Block;

pub mod ebpf;
mod paired;
mod status;
pub mod userspace;

pub use status::{FilterCounters, FilterMode, FilterStatus};
pub use userspace::{FilteredSocket, TableStats, UserspacePolicy};

/// Monotonic nanoseconds, the clock of `bpf_ktime_get_ns`.
pub fn monotonic_ns() -> u64 {
    match nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC) {
        Ok(t) => (t.tv_sec() as u64)
            .saturating_mul(1_000_000_000)
            .saturating_add(t.tv_nsec() as u64),
        Err(_) => 0,
    }
}

/// The map key of an address (IPv4 as IPv4-mapped IPv6; IPv4-mapped IPv6 sources, as a dual-stack
/// socket reports IPv4 peers, map to the same key).
pub fn source_key(ip: IpAddr) -> SourceKey {
    match ip {
        IpAddr::V4(v4) => SourceKey::v4(v4.octets()),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => SourceKey::v4(v4.octets()),
            None => SourceKey::v6(v6.octets()),
        },
    }
}

/// The Initial rate and burst in force: `[filter] initial_rate` (default 4 × `[devices]
/// new_connections_per_ip`, 0 = unlimited) and `initial_burst` (default twice the rate).
pub fn rate_and_burst(cfg: &Config) -> (u32, u32) {
    // By default well above the per-address connection rate the device server refuses beyond
    // (with a clear answer): the filter stops floods, the server shapes honest clients.
    let rate = cfg
        .filter
        .initial_rate
        .unwrap_or(cfg.devices.new_connections_per_ip.saturating_mul(4));
    let burst = cfg
        .filter
        .initial_burst
        .unwrap_or_else(|| rate.saturating_mul(2))
        .max(u32::from(rate > 0));
    (rate, burst)
}

/// The map configuration derived from gatewayd's.
pub fn bpf_config(cfg: &Config, port: u16, window_open: bool) -> BpfConfig {
    let (rate, burst) = rate_and_burst(cfg);
    BpfConfig {
        port,
        strict: u8::from(cfg.filter.strict),
        window_open: u8::from(window_open),
        _pad: 0,
        initial_rate: u64::from(rate),
        initial_burst: u64::from(burst),
    }
}

#[derive(Debug)]
struct Inner {
    ebpf: Option<ebpf::EbpfFilter>,
    cfg: Config,
    port: u16,
    window_open: bool,
    /// Sources learned from paired devices' handshakes, bounded by [`Inner::learned_max`]
    /// (least recently seen evicted first) and trimmed when a device is revoked.
    learned: HashMap<SourceKey, Learned>,
    /// Learned entries evicted for room since start.
    evicted: u64,
    /// Recent handshake failures per source (validated addresses only): (first failure in
    /// window, count). Bounded by `[filter] max_tracked_sources`.
    failures: BoundedMap<IpAddr, (std::time::Instant, u32)>,
    /// Counter values already added to the Prometheus counters.
    exported: [u64; Reason::COUNT as usize],
    /// Userspace table evictions already added to the Prometheus counters.
    exported_tables: TableStats,
    deny_entries: u64,
    /// Blocks left out of the deny list at the last sync because it was full (logged on change).
    deny_overflow: usize,
}

/// Most devices remembered per learned source (several paired devices behind one address).
const DEVICES_PER_SOURCE: usize = 8;

/// A learned paired-device source.
#[derive(Debug, Clone)]
struct Learned {
    /// Last handshake of a paired device from it (the eviction order).
    last_seen: std::time::Instant,
    /// Certificate fingerprints of the devices seen from it (most recent last).
    devices: Vec<[u8; 32]>,
}

impl Inner {
    fn allowed(&self) -> HashSet<SourceKey> {
        self.cfg
            .filter
            .allowed_sources
            .iter()
            .map(|a| source_key(*a))
            .collect()
    }

    /// How many learned sources fit beside `allowed_sources` in the paired-source map
    /// (`PAIRED_MAX`; the configuration keeps `allowed_sources` to at most half of it).
    fn learned_max(&self) -> usize {
        (PAIRED_MAX as usize).saturating_sub(self.cfg.filter.allowed_sources.len())
    }

    /// Every paired source: the learned and the configured.
    fn paired_keys(&self) -> HashSet<SourceKey> {
        let mut keys: HashSet<SourceKey> = self.learned.keys().copied().collect();
        keys.extend(self.allowed());
        keys
    }
}

/// The running filter: mode, maps (kernel or userspace), counters.
#[derive(Debug)]
pub struct Filter {
    mode: FilterMode,
    fallback_reason: Option<String>,
    policy: Arc<UserspacePolicy>,
    metrics: Arc<Metrics>,
    inner: Mutex<Inner>,
}

impl Filter {
    /// Chooses the mode, loads and attaches the eBPF program when it is to be used, and says
    /// which mode runs. `policy` is the one the device socket was wrapped with.
    pub fn start(
        cfg: &Config,
        port: u16,
        policy: Arc<UserspacePolicy>,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        let f = &cfg.filter;
        let want_ebpf = match f.mode {
            FilterModeSetting::Userspace => Err("mode = \"userspace\" configured".to_string()),
            FilterModeSetting::Auto | FilterModeSetting::Xdp | FilterModeSetting::Tc
                if f.interfaces.is_empty() =>
            {
                Err("no [filter] interfaces configured".to_string())
            }
            _ => Ok(f.mode == FilterModeSetting::Tc),
        };
        let (ebpf, fallback_reason) = match want_ebpf {
            Err(why) => (None, Some(why)),
            Ok(tc) => match ebpf::EbpfFilter::attach(&f.interfaces, tc) {
                Ok(e) => (Some(e), None),
                Err(e) => (None, Some(format!("eBPF unusable: {e:#}"))),
            },
        };
        Self::build(cfg, port, policy, metrics, ebpf, fallback_reason)
    }

    /// [`Self::start`] around an already loaded, detached program (tests: the real maps,
    /// driven through `BPF_PROG_TEST_RUN`). The userspace policy stays off.
    #[doc(hidden)]
    pub fn start_detached(
        cfg: &Config,
        port: u16,
        policy: Arc<UserspacePolicy>,
        metrics: Arc<Metrics>,
        ebpf: ebpf::EbpfFilter,
    ) -> Arc<Self> {
        let me = Self::build(cfg, port, policy, metrics, Some(ebpf), None);
        me.policy.set_active(false);
        me
    }

    fn build(
        cfg: &Config,
        port: u16,
        policy: Arc<UserspacePolicy>,
        metrics: Arc<Metrics>,
        ebpf: Option<ebpf::EbpfFilter>,
        fallback_reason: Option<String>,
    ) -> Arc<Self> {
        let f = &cfg.filter;
        let mode = match ebpf.as_ref().map(|e| e.attach) {
            Some(ebpf::Attach::Xdp) => FilterMode::Xdp,
            Some(ebpf::Attach::XdpGeneric) => FilterMode::XdpGeneric,
            Some(ebpf::Attach::Tc) => FilterMode::Tc,
            Some(ebpf::Attach::Detached) | None => FilterMode::Userspace,
        };
        policy.set_active(mode == FilterMode::Userspace);
        let (rate, burst) = rate_and_burst(cfg);
        match &fallback_reason {
            None => tracing::info!(
                mode = mode.as_str(),
                interfaces = ?f.interfaces,
                port,
                initial_rate = rate,
                initial_burst = burst,
                strict = f.strict,
                "LAN filter: eBPF ({}) attached to {}",
                mode.as_str(),
                f.interfaces.join(", ")
            ),
            Some(why) => tracing::warn!(
                mode = "userspace",
                port,
                initial_rate = rate,
                initial_burst = burst,
                strict = f.strict,
                "LAN filter: USERSPACE fallback ({why}); the policy runs on the QUIC socket"
            ),
        }
        for m in FilterMode::ALL {
            metrics
                .filter_mode
                .with_label_values(&[m.as_str()])
                .set(i64::from(m == mode));
        }
        let me = Arc::new(Self {
            mode,
            fallback_reason,
            policy,
            metrics,
            inner: Mutex::new(Inner {
                ebpf,
                cfg: cfg.clone(),
                port,
                window_open: false,
                learned: HashMap::new(),
                evicted: 0,
                failures: BoundedMap::new(cfg.filter.max_tracked_sources),
                exported: [0; Reason::COUNT as usize],
                exported_tables: TableStats::default(),
                deny_entries: 0,
                deny_overflow: 0,
            }),
        });
        me.policy
            .set_bucket_capacity(cfg.filter.max_tracked_sources);
        me.push_config();
        // `allowed_sources` are admitted from the start, not only after the first learned
        // source or SIGHUP.
        me.sync_paired();
        me
    }

    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Where the filter runs.
    pub fn mode(&self) -> FilterMode {
        self.mode
    }

    fn push_config(&self) {
        let mut i = self.inner();
        let c = bpf_config(&i.cfg, i.port, i.window_open);
        self.policy.set_config(c);
        if let Some(e) = i.ebpf.as_mut()
            && let Err(err) = e.set_config(c)
        {
            tracing::error!(error = %err, "cannot update the eBPF filter configuration");
        }
    }

    /// New configuration (SIGHUP): rate, burst, strict, allowed sources, failure policy.
    pub fn reconfigure(&self, cfg: &Config) {
        let evicted = {
            let mut i = self.inner();
            i.cfg = cfg.clone();
            i.failures.set_capacity(cfg.filter.max_tracked_sources)
        };
        self.metrics
            .address_table_evictions
            .with_label_values(&[table::HANDSHAKE_FAILURES])
            .inc_by(evicted as u64);
        self.policy
            .set_bucket_capacity(cfg.filter.max_tracked_sources);
        self.push_config();
        self.sync_paired();
    }

    /// Brings the maps in line with the pairing window and the stored blocks (`now` unix s).
    pub fn sync(&self, blocks: &[Block], window_open: bool, now_unix: i64) {
        let changed = {
            let mut i = self.inner();
            let c = i.window_open != window_open;
            i.window_open = window_open;
            c
        };
        if changed {
            self.push_config();
        }
        let mono = monotonic_ns();
        // The deny maps hold DENY_MAX entries: past that, the blocks that end soonest are left
        // out (indefinite ones, the owner's, last). gatewayd itself keeps its automatic blocks
        // within DENY_MAX (see `DeviceServer::handshake_failed`), so only owner blocks get here.
        let mut in_force: Vec<&Block> = blocks
            .iter()
            .filter(|b| b.until.is_none_or(|u| u > now_unix))
            .collect();
        let overflow = in_force.len().saturating_sub(DENY_MAX as usize);
        if overflow > 0 {
            in_force.sort_unstable_by_key(|b| std::cmp::Reverse(b.until.unwrap_or(i64::MAX)));
            in_force.truncate(DENY_MAX as usize);
        }
        {
            let mut i = self.inner();
            if i.deny_overflow != overflow {
                i.deny_overflow = overflow;
                if overflow > 0 {
                    tracing::warn!(
                        blocks = in_force.len() + overflow,
                        left_out = overflow,
                        "more blocks than the deny list holds ({DENY_MAX}): the ones ending \
                         soonest are not enforced; unblock addresses with `gatewayctl unblock`"
                    );
                }
            }
        }
        let want: HashMap<SourceKey, DenyEntry> = in_force
            .into_iter()
            .map(|b| {
                let until_ns = match b.until {
                    None => 0,
                    Some(u) => mono
                        .saturating_add(
                            ((u - now_unix).max(0) as u64).saturating_mul(1_000_000_000),
                        )
                        .max(1),
                };
                (source_key(b.addr), DenyEntry { until_ns })
            })
            .collect();
        let mut i = self.inner();
        i.deny_entries = want.len() as u64;
        if let Some(e) = i.ebpf.as_mut() {
            let present = e.deny_keys().unwrap_or_default();
            for k in present.iter().filter(|k| !want.contains_key(k)) {
                let _ = e.remove_deny(k);
            }
            for (k, v) in &want {
                if let Err(err) = e.set_deny(*k, *v) {
                    tracing::error!(error = %err, "cannot update the eBPF deny list");
                }
            }
        }
        for k in self.policy.deny_keys() {
            if !want.contains_key(&k) {
                self.policy.remove_deny(&k);
            }
        }
        for (k, v) in want {
            self.policy.set_deny(k, v);
        }
    }

    /// Runs `f` on the eBPF filter, if one is loaded (tests: inspect the kernel maps).
    #[doc(hidden)]
    pub fn with_ebpf<R>(&self, f: impl FnOnce(&mut ebpf::EbpfFilter) -> R) -> Option<R> {
        self.inner().ebpf.as_mut().map(f)
    }

    /// `[filter] failure_window`.
    pub fn failure_window(&self) -> Duration {
        self.inner().cfg.filter.failure_window
    }

    /// A handshake from a validated `ip` failed (unpaired key, bad TLS). Returns the block to store when
    /// this source crossed `block_after_failures` within `failure_window`.
    pub fn note_failure(&self, ip: IpAddr, now_unix: i64) -> Option<Block> {
        let mut i = self.inner();
        let f = &i.cfg.filter;
        let (limit, window, block_for) = (f.block_after_failures, f.failure_window, f.block_for);
        if limit == 0 {
            return None;
        }
        let now = std::time::Instant::now();
        let count = match i.failures.get_mut(&ip) {
            Some(e) => {
                if now.duration_since(e.0) > window {
                    *e = (now, 0);
                }
                e.1 += 1;
                e.1
            }
            None => {
                if i.failures.insert(ip, (now, 1)).is_some() {
                    self.metrics
                        .address_table_evictions
                        .with_label_values(&[table::HANDSHAKE_FAILURES])
                        .inc();
                }
                1
            }
        };
        if count < limit {
            self.metrics
                .address_table_entries
                .with_label_values(&[table::HANDSHAKE_FAILURES])
                .set(i.failures.len() as i64);
            return None;
        }
        i.failures.remove(&ip);
        self.metrics
            .address_table_entries
            .with_label_values(&[table::HANDSHAKE_FAILURES])
            .set(i.failures.len() as i64);
        Some(Block {
            addr: ip,
            until: Some(now_unix + block_for.as_secs().max(1) as i64),
            created_at: now_unix,
        })
    }

    /// Per-reason counters (kernel or userspace).
    pub fn counters(&self) -> FilterCounters {
        let mut i = self.inner();
        let raw = match i.ebpf.as_mut() {
            Some(e) => e.counters().unwrap_or_default(),
            None => self.policy.counters(),
        };
        FilterCounters::from_array(raw)
    }

    /// Adds the counters' growth to `gatewayd_filter_packets_total`.
    pub fn export_metrics(&self) {
        let mut i = self.inner();
        let raw = match i.ebpf.as_mut() {
            Some(e) => e.counters().unwrap_or(i.exported),
            None => self.policy.counters(),
        };
        for r in Reason::ALL {
            let idx = r as usize;
            let delta = raw[idx].saturating_sub(i.exported[idx]);
            if delta > 0 {
                self.metrics
                    .filter_packets
                    .with_label_values(&[r.label()])
                    .inc_by(delta);
            }
        }
        i.exported = raw;
        let t = self.policy.table_stats();
        let prev = i.exported_tables;
        i.exported_tables = t;
        drop(i);
        self.metrics.address_table(
            table::FILTER_BUCKETS,
            t.buckets,
            t.bucket_evictions.saturating_sub(prev.bucket_evictions) as usize,
        );
        self.metrics.address_table(
            table::FILTER_DENY,
            t.deny,
            t.deny_evictions.saturating_sub(prev.deny_evictions) as usize,
        );
    }

    /// What `gatewayctl status` shows of the filter now.
    pub fn status(&self) -> FilterStatus {
        let counters = self.counters();
        let i = self.inner();
        let (rate, burst) = rate_and_burst(&i.cfg);
        FilterStatus {
            mode: self.mode,
            interfaces: i
                .ebpf
                .as_ref()
                .map(|e| e.interfaces.clone())
                .unwrap_or_default(),
            fallback_reason: self.fallback_reason.clone(),
            port: i.port,
            strict: i.cfg.filter.strict,
            initial_rate: rate,
            initial_burst: burst,
            deny_entries: i.deny_entries,
            paired_sources: i.paired_keys().len() as u64,
            paired_evicted: i.evicted,
            counters,
        }
    }

    /// Detaches the eBPF program (also done when the filter is dropped).
    pub fn stop(&self) {
        if let Some(e) = self.inner().ebpf.take() {
            tracing::info!(interfaces = ?e.interfaces, "LAN filter: eBPF program detached");
        }
        self.policy.set_active(false);
    }
}

/// How often the maps are re-synchronised and the counters exported.
pub const SYNC_PERIOD: Duration = Duration::from_millis(500);
