//! Loading the embedded eBPF object, attaching it (XDP native → generic, or TC ingress) and
//! keeping its maps. Dropping [`EbpfFilter`] detaches every program (aya owns the links).

use std::collections::HashSet;

use aya::maps::{Array, HashMap as BpfHashMap, Map, MapData, MapError, PerCpuArray};
use aya::programs::{Program, ProgramError, SchedClassifier, TcAttachType, Xdp, XdpMode};
use aya::{Ebpf, EbpfLoader};
use companion_filter_common::{
    DenyEntry, FilterConfig, PairedEntry, Reason, SourceKey, maps, programs,
};

/// The eBPF object built from `ebpf/filter-ebpf` by `build.rs`.
pub static OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/companion-filter"));

/// What [`EbpfFilter::set_paired`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PairedSync {
    /// Entries added.
    pub inserted: u64,
    /// Entries removed.
    pub removed: u64,
    /// Inserts or removals the kernel refused.
    pub failed: u64,
    /// The first refusal's error, for the log.
    pub first_error: Option<String>,
}

/// How the program ended up attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attach {
    /// Native (driver) XDP on every interface.
    Xdp,
    /// Generic (skb) XDP on at least one interface (veth, drivers without XDP).
    XdpGeneric,
    /// TC ingress classifier.
    Tc,
    /// Loaded but not attached (tests: BPF_PROG_TEST_RUN).
    Detached,
}

/// The loaded object, its attachments and maps.
pub struct EbpfFilter {
    bpf: Ebpf,
    /// How the program is attached.
    pub attach: Attach,
    /// The interfaces it is attached to.
    pub interfaces: Vec<String>,
}

impl std::fmt::Debug for EbpfFilter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EbpfFilter")
            .field("attach", &self.attach)
            .field("interfaces", &self.interfaces)
            .finish_non_exhaustive()
    }
}

fn err(e: impl std::fmt::Display) -> anyhow::Error {
    anyhow::anyhow!("{e}")
}

/// Program `name` of `bpf` as its concrete type (`Xdp`, `SchedClassifier`); `what` names it in
/// the error when the object lacks it.
fn program<'a, P>(bpf: &'a mut Ebpf, name: &str, what: &str) -> anyhow::Result<&'a mut P>
where
    &'a mut P: TryFrom<&'a mut Program, Error = ProgramError>,
{
    bpf.program_mut(name)
        .ok_or_else(|| anyhow::anyhow!("{what} program missing"))?
        .try_into()
        .map_err(err)
}

/// Map `name` of `bpf` as its typed view (`Array`, `HashMap`, `PerCpuArray`); `what` names it in
/// the error when the object lacks it.
fn map<'a, T>(bpf: &'a mut Ebpf, name: &str, what: &str) -> anyhow::Result<T>
where
    T: TryFrom<&'a mut Map, Error = MapError>,
{
    T::try_from(
        bpf.map_mut(name)
            .ok_or_else(|| anyhow::anyhow!("{what} map missing"))?,
    )
    .map_err(err)
}

impl EbpfFilter {
    /// Loads the object (maps created, programs not yet loaded).
    pub fn open() -> anyhow::Result<Ebpf> {
        if OBJECT.is_empty() {
            anyhow::bail!("gatewayd was built without the eBPF object (AYA_BUILD_SKIP)");
        }
        EbpfLoader::new().load(OBJECT).map_err(err)
    }

    /// Loads and attaches to `interfaces`: XDP (native, else generic) or TC ingress.
    pub fn attach(interfaces: &[String], tc: bool) -> anyhow::Result<Self> {
        let mut bpf = Self::open()?;
        let mut generic = false;
        if tc {
            let prog: &mut SchedClassifier = program(&mut bpf, programs::TC, "TC")?;
            prog.load().map_err(err)?;
            for i in interfaces {
                // The clsact qdisc may already exist (another program, or a previous run).
                let _ = aya::programs::tc::qdisc_add_clsact(i);
                prog.attach(i, TcAttachType::Ingress)
                    .map_err(|e| anyhow::anyhow!("TC ingress on {i}: {e}"))?;
            }
        } else {
            let prog: &mut Xdp = program(&mut bpf, programs::XDP, "XDP")?;
            prog.load().map_err(err)?;
            for i in interfaces {
                if let Err(native) = prog.attach(i, XdpMode::Driver) {
                    prog.attach(i, XdpMode::Skb).map_err(|e| {
                        anyhow::anyhow!("XDP on {i}: native: {native}; generic: {e}")
                    })?;
                    tracing::info!(interface = %i, error = %native, "native XDP unavailable: generic (skb) mode");
                    generic = true;
                }
            }
        }
        let attach = match (tc, generic) {
            (true, _) => Attach::Tc,
            (false, true) => Attach::XdpGeneric,
            (false, false) => Attach::Xdp,
        };
        Ok(Self {
            bpf,
            attach,
            interfaces: interfaces.to_vec(),
        })
    }

    /// Loads both programs without attaching them (for `BPF_PROG_TEST_RUN`).
    pub fn load_detached() -> anyhow::Result<Self> {
        Self::load_detached_object(OBJECT)
    }

    /// [`Self::load_detached`] with another build of the object (before/after measurements
    /// of an older program with the same maps).
    pub fn load_detached_object(object: &[u8]) -> anyhow::Result<Self> {
        if object.is_empty() {
            anyhow::bail!("gatewayd was built without the eBPF object (AYA_BUILD_SKIP)");
        }
        let mut bpf = EbpfLoader::new().load(object).map_err(err)?;
        let prog: &mut Xdp = program(&mut bpf, programs::XDP, "XDP")?;
        prog.load().map_err(err)?;
        let prog: &mut SchedClassifier = program(&mut bpf, programs::TC, "TC")?;
        prog.load().map_err(err)?;
        Ok(Self {
            bpf,
            attach: Attach::Detached,
            interfaces: Vec::new(),
        })
    }

    /// Runs one program on a crafted Ethernet frame through `BPF_PROG_TEST_RUN` (no interface
    /// needed); `Ok(true)` when the program lets the frame pass.
    pub fn test_run(&mut self, tc: bool, frame: &[u8]) -> anyhow::Result<bool> {
        use aya::programs::{TestRun, TestRunOptions};
        let opts = TestRunOptions {
            data_in: Some(frame),
            ..TestRunOptions::default()
        };
        if tc {
            let prog: &mut SchedClassifier = program(&mut self.bpf, programs::TC, "TC")?;
            let r = prog.test_run(opts).map_err(err)?;
            Ok(r.return_value == 0) // TC_ACT_OK; TC_ACT_SHOT is 2
        } else {
            let prog: &mut Xdp = program(&mut self.bpf, programs::XDP, "XDP")?;
            let r = prog.test_run(opts).map_err(err)?;
            Ok(r.return_value == 2) // XDP_PASS; XDP_DROP is 1
        }
    }

    /// Writes the global configuration map.
    pub fn set_config(&mut self, cfg: FilterConfig) -> anyhow::Result<()> {
        let mut a: Array<&mut MapData, FilterConfig> = map(&mut self.bpf, maps::CONFIG, "config")?;
        a.set(0, cfg, 0).map_err(err)
    }

    /// `FILTER_DENY`: blocked sources and when each block ends.
    fn deny_map(&mut self) -> anyhow::Result<BpfHashMap<&mut MapData, SourceKey, DenyEntry>> {
        map(&mut self.bpf, maps::DENY, "deny")
    }

    /// `FILTER_PAIRED`: the paired sources.
    fn paired_map(&mut self) -> anyhow::Result<BpfHashMap<&mut MapData, SourceKey, PairedEntry>> {
        map(&mut self.bpf, maps::PAIRED, "paired")
    }

    /// `FILTER_COUNTERS`: per-CPU per-reason packet counters.
    fn counter_map(&mut self) -> anyhow::Result<PerCpuArray<&mut MapData, u64>> {
        map(&mut self.bpf, maps::COUNTERS, "counter")
    }

    /// Blocks `k` until `e` ends.
    pub fn set_deny(&mut self, k: SourceKey, e: DenyEntry) -> anyhow::Result<()> {
        self.deny_map()?.insert(k, e, 0).map_err(err)
    }

    /// Lifts the block of `k` (no error if there is none).
    pub fn remove_deny(&mut self, k: &SourceKey) -> anyhow::Result<()> {
        let mut m = self.deny_map()?;
        match m.remove(k) {
            Ok(()) => Ok(()),
            Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(err(e)),
        }
    }

    /// The blocked sources.
    pub fn deny_keys(&mut self) -> anyhow::Result<Vec<SourceKey>> {
        let m = self.deny_map()?;
        Ok(m.keys().filter_map(Result::ok).collect())
    }

    /// Makes `FILTER_PAIRED` hold exactly `keys`: removes the others first (so their room is
    /// free), then inserts every missing key it can. A failed insert (map full, or a kernel
    /// error) does not stop the others; the failures are returned for the caller to log and
    /// count. The caller keeps `keys` within [`PAIRED_MAX`](companion_filter_common::PAIRED_MAX)
    /// (see `Filter::sync_paired`), so in practice nothing fails.
    pub fn set_paired(&mut self, keys: &HashSet<SourceKey>) -> anyhow::Result<PairedSync> {
        let mut m = self.paired_map()?;
        let present: HashSet<SourceKey> = m.keys().filter_map(Result::ok).collect();
        let mut out = PairedSync::default();
        for k in present.iter().filter(|k| !keys.contains(k)) {
            match m.remove(k) {
                Ok(()) | Err(aya::maps::MapError::KeyNotFound) => out.removed += 1,
                Err(e) => {
                    out.failed += 1;
                    out.first_error.get_or_insert_with(|| e.to_string());
                }
            }
        }
        for k in keys.iter().filter(|k| !present.contains(k)) {
            match m.insert(*k, PairedEntry { flags: 1 }, 0) {
                Ok(()) => out.inserted += 1,
                Err(e) => {
                    out.failed += 1;
                    out.first_error.get_or_insert_with(|| e.to_string());
                }
            }
        }
        Ok(out)
    }

    /// Adds one source to `FILTER_PAIRED`.
    pub fn insert_paired(&mut self, k: SourceKey) -> anyhow::Result<()> {
        let mut m = self.paired_map()?;
        m.insert(k, PairedEntry { flags: 1 }, 0).map_err(err)
    }

    /// Removes one source from `FILTER_PAIRED` (absent is fine).
    pub fn remove_paired(&mut self, k: &SourceKey) -> anyhow::Result<()> {
        let mut m = self.paired_map()?;
        match m.remove(k) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(err(e)),
        }
    }

    /// How many sources `FILTER_PAIRED` holds.
    pub fn paired_len(&mut self) -> anyhow::Result<usize> {
        let m = self.paired_map()?;
        Ok(m.keys().filter(Result::is_ok).count())
    }

    /// Whether `FILTER_PAIRED` holds `k`.
    pub fn is_paired(&mut self, k: &SourceKey) -> anyhow::Result<bool> {
        let m = self.paired_map()?;
        match m.get(k, 0) {
            Ok(_) => Ok(true),
            Err(aya::maps::MapError::KeyNotFound) => Ok(false),
            Err(e) => Err(err(e)),
        }
    }

    /// One reason's counter, summed over CPUs.
    pub fn counter(&mut self, r: Reason) -> anyhow::Result<u64> {
        let a = self.counter_map()?;
        Ok(a.get(&(r as u32), 0).map_err(err)?.iter().sum())
    }

    /// Per-reason counters, summed over CPUs.
    pub fn counters(&mut self) -> anyhow::Result<[u64; Reason::COUNT as usize]> {
        let a = self.counter_map()?;
        let mut out = [0u64; Reason::COUNT as usize];
        for (i, slot) in out.iter_mut().enumerate() {
            let v = a.get(&(i as u32), 0).map_err(err)?;
            *slot = v.iter().sum();
        }
        Ok(out)
    }
}
