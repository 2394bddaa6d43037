//! The paired-source tables: addresses learned from paired devices' handshakes, kept in the kernel
//! map and the userspace policy alike, and forgotten when a device is revoked.

use std::net::IpAddr;

use companion_filter_common::SourceKey;

use super::*;

impl Filter {
    /// Brings both paired-source tables (kernel and userspace) in line with the learned and
    /// configured sources (start, SIGHUP). Every key that fits is inserted; refusals are
    /// logged and counted, never silently skipped.
    pub(super) fn sync_paired(&self) {
        let mut i = self.inner();
        let keys = i.paired_keys();
        if let Some(e) = i.ebpf.as_mut() {
            match e.set_paired(&keys) {
                Ok(r) if r.failed == 0 => {}
                Ok(r) => {
                    self.metrics.filter_paired_sync_failures.inc_by(r.failed);
                    tracing::error!(
                        failed = r.failed,
                        inserted = r.inserted,
                        removed = r.removed,
                        error = r.first_error.as_deref().unwrap_or(""),
                        "the eBPF paired-source map refused some sources: in strict mode those \
                         devices are dropped as not_paired; check `gatewayctl status` (paired \
                         sources) and the kernel's memory limits for BPF maps"
                    );
                }
                Err(err) => {
                    self.metrics.filter_paired_sync_failures.inc();
                    tracing::error!(error = %err, "cannot update the eBPF paired-source map");
                }
            }
        }
        self.policy.set_paired(keys);
    }

    /// Adds or removes one source in both paired-source tables.
    pub(super) fn put_paired(&self, i: &mut Inner, k: SourceKey, present: bool) {
        if let Some(e) = i.ebpf.as_mut() {
            let r = if present {
                e.insert_paired(k)
            } else {
                e.remove_paired(&k)
            };
            if let Err(err) = r {
                self.metrics.filter_paired_sync_failures.inc();
                tracing::error!(
                    source = %userspace::key_ip(&k),
                    error = %err,
                    "cannot update the eBPF paired-source map: in strict mode this source is \
                     judged as before until the next successful update"
                );
            }
        }
        if present {
            self.policy.add_paired(k);
        } else {
            self.policy.remove_paired(&k);
        }
    }

    /// A paired device (certificate `fingerprint`) completed a handshake from `ip`: admit that
    /// source in strict mode. The learned sources are bounded: when full, the least recently
    /// seen one is evicted (logged, counted in `gatewayd_filter_paired_evictions_total`); a
    /// device whose address was evicted is admitted again from its next handshake inside a
    /// pairing window, or at once if its address is in `allowed_sources`.
    pub fn learn_paired(&self, ip: IpAddr, fingerprint: [u8; 32]) {
        let k = source_key(ip);
        let now = std::time::Instant::now();
        let mut guard = self.inner();
        let i = &mut *guard;
        if let Some(l) = i.learned.get_mut(&k) {
            l.last_seen = now;
            l.devices.retain(|d| *d != fingerprint);
            if l.devices.len() >= DEVICES_PER_SOURCE {
                l.devices.remove(0);
            }
            l.devices.push(fingerprint);
            return;
        }
        let max = i.learned_max();
        while i.learned.len() >= max {
            let Some(oldest) = i
                .learned
                .iter()
                .min_by_key(|(_, l)| l.last_seen)
                .map(|(k, _)| *k)
            else {
                break;
            };
            i.learned.remove(&oldest);
            i.evicted += 1;
            self.metrics.filter_paired_evictions.inc();
            tracing::warn!(
                source = %userspace::key_ip(&oldest),
                capacity = max,
                "LAN filter: paired-source map full; evicted the least recently seen learned \
                 address (in strict mode its device is admitted again inside a pairing window, \
                 or list it in [filter] allowed_sources)"
            );
            if !i.allowed().contains(&oldest) {
                self.put_paired(i, oldest, false);
            }
        }
        i.learned.insert(
            k,
            Learned {
                last_seen: now,
                devices: vec![fingerprint],
            },
        );
        self.put_paired(i, k, true);
    }

    /// A device was revoked: the sources learned from it alone leave the paired-source
    /// tables. Returns how many did.
    pub fn forget_device(&self, fingerprint: &[u8; 32]) -> usize {
        let mut guard = self.inner();
        let i = &mut *guard;
        let mut gone = Vec::new();
        for (k, l) in i.learned.iter_mut() {
            l.devices.retain(|d| d != fingerprint);
            if l.devices.is_empty() {
                gone.push(*k);
            }
        }
        let allowed = i.allowed();
        for k in &gone {
            i.learned.remove(k);
            if !allowed.contains(k) {
                self.put_paired(i, *k, false);
            }
        }
        gone.len()
    }
}
