//! Measurements of a run and the report (human summary and JSON).

use std::collections::BTreeMap;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

/// What every run's report says in the end: a human summary, and whether it all went well.
pub trait Summary {
    /// Whether every device succeeded.
    fn all_ok(&self) -> bool;
    /// The human summary.
    fn human(&self) -> String;
}

/// Latency percentiles, milliseconds.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Latency {
    /// Samples recorded.
    pub count: u64,
    /// Median, milliseconds.
    pub p50_ms: f64,
    /// 90th percentile, milliseconds.
    pub p90_ms: f64,
    /// 99th percentile, milliseconds.
    pub p99_ms: f64,
    /// Longest, milliseconds.
    pub max_ms: f64,
    /// Mean, milliseconds.
    pub mean_ms: f64,
}

/// An HDR histogram of latencies (microseconds, 3 significant digits, up to one hour).
#[derive(Debug, Clone)]
pub struct Recorder {
    h: Histogram<u64>,
}

impl Recorder {
    /// A histogram for 1 µs .. 1 h.
    pub fn new() -> Result<Self, hdrhistogram::CreationError> {
        Ok(Self {
            h: Histogram::new_with_bounds(1, 3_600_000_000, 3)?,
        })
    }

    /// Adds one sample.
    pub fn record(&mut self, d: Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1);
        self.h.saturating_record(us);
    }

    /// The percentiles of what was recorded.
    pub fn latency(&self) -> Latency {
        let ms = |us: u64| (us as f64 / 1000.0 * 1000.0).round() / 1000.0;
        if self.h.is_empty() {
            return Latency::default();
        }
        Latency {
            count: self.h.len(),
            p50_ms: ms(self.h.value_at_quantile(0.50)),
            p90_ms: ms(self.h.value_at_quantile(0.90)),
            p99_ms: ms(self.h.value_at_quantile(0.99)),
            max_ms: ms(self.h.max()),
            mean_ms: (self.h.mean() / 1000.0 * 1000.0).round() / 1000.0,
        }
    }
}

/// The outcome of one simulated device.
#[derive(Debug, Clone, Serialize)]
pub struct DeviceResult {
    /// The device ID.
    pub device: String,
    /// `true` when the credential was delivered, opened, checked and acknowledged.
    pub provisioned: bool,
    /// The SUPI it was issued, if provisioned.
    pub supi: Option<String>,
    /// `None` without `--attach`.
    pub attached: Option<bool>,
    /// Why it failed (a stable reason name), if it did.
    pub reason: Option<String>,
    /// The last error's message, if any.
    pub error: Option<String>,
    /// Whether the failure was one a device would retry later (busy, CN unavailable...).
    pub retryable: bool,
    /// Retries it needed (all phases).
    pub retries: u32,
}

/// The whole run's report (`--json FILE`).
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// How many simulated devices.
    pub devices: u64,
    /// Devices in flight at once.
    pub concurrency: u64,
    /// Devices that completed.
    pub succeeded: u64,
    /// Devices that did not complete.
    pub failed: u64,
    /// Time of the provisioning phase (pairing excluded), seconds.
    pub duration_s: f64,
    /// Successful provisionings (and attaches, with `--attach`) per second of `duration_s`.
    pub throughput_per_s: f64,
    /// Device-perceived provisioning latency, first try to acknowledged credential.
    pub latency_ms: Latency,
    /// Whether the devices attached after provisioning.
    pub attach: bool,
    /// Attaches the CN accepted.
    pub attaches_succeeded: u64,
    /// Attach latency.
    pub attach_latency_ms: Latency,
    /// Time spent pairing the devices through the control socket, seconds.
    pub pairing_s: f64,
    /// Failed devices by reason.
    pub failures_by_reason: BTreeMap<String, u64>,
    /// Retries (busy, CN unavailable, ...) by reason.
    pub retries_by_reason: BTreeMap<String, u64>,
    /// gatewayd's device address.
    pub gateway: String,
    /// Every device's outcome (with `--per-device`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub results: Option<Vec<DeviceResult>>,
}

impl Summary for Report {
    /// Whether everything succeeded (every device provisioned, and attached with `--attach`).
    fn all_ok(&self) -> bool {
        self.failed == 0 && (!self.attach || self.attaches_succeeded == self.devices)
    }

    /// The human summary.
    fn human(&self) -> String {
        let mut s = String::new();
        let l = &self.latency_ms;
        s += &format!(
            "loadgen: {} devices, concurrency {}, gateway {}\n",
            self.devices, self.concurrency, self.gateway
        );
        s += &format!(
            "  paired       {} devices in {:.2} s (control socket)\n",
            self.devices, self.pairing_s
        );
        s += &format!(
            "  provisioned  {} ok, {} failed in {:.2} s: {:.1} devices/s\n",
            self.succeeded, self.failed, self.duration_s, self.throughput_per_s
        );
        s += &format!(
            "  latency      p50 {:.1} ms  p90 {:.1} ms  p99 {:.1} ms  max {:.1} ms\n",
            l.p50_ms, l.p90_ms, l.p99_ms, l.max_ms
        );
        if self.attach {
            let a = &self.attach_latency_ms;
            s += &format!(
                "  attached     {} of {} (5G AKA at the CN): p50 {:.1} ms  p99 {:.1} ms  max {:.1} ms\n",
                self.attaches_succeeded, self.devices, a.p50_ms, a.p99_ms, a.max_ms
            );
        }
        s += &reasons_line("retries", &self.retries_by_reason);
        s += &reasons_line("failures", &self.failures_by_reason);
        s += &outcome_lines(None, self.all_ok());
        s
    }
}

/// `loadgen handshake`'s report (`--json FILE`): the field names of [`Report`] where they apply.
#[derive(Debug, Clone, Serialize)]
pub struct HandshakeReport {
    /// How many simulated devices.
    pub devices: u64,
    /// Devices in flight at once.
    pub concurrency: u64,
    /// Whether the devices were paired first (`--unpaired`: every handshake must be refused).
    pub paired: bool,
    /// Handshakes the gateway confirmed.
    pub succeeded: u64,
    /// Devices that did not complete.
    pub failed: u64,
    /// Time of the handshake phase (key generation and pairing excluded), seconds.
    pub duration_s: f64,
    /// Confirmed handshakes per second of `duration_s`.
    pub throughput_per_s: f64,
    /// From `connect` to the gateway's `HANDSHAKE_DONE` (the gateway admitted the device's key).
    pub latency_ms: Latency,
    /// From `connect` to quinn's "connected" on the device (it sent its `Finished`).
    pub client_side_latency_ms: Latency,
    /// Time spent pairing over the control socket, seconds.
    pub pairing_s: f64,
    /// Failed devices by reason.
    pub failures_by_reason: BTreeMap<String, u64>,
    /// One failure's message, if any failed.
    pub last_error: Option<String>,
    /// gatewayd's device address.
    pub gateway: String,
}

impl Summary for HandshakeReport {
    /// Whether every handshake was confirmed.
    fn all_ok(&self) -> bool {
        self.failed == 0 && self.succeeded == self.devices
    }

    /// The human summary.
    fn human(&self) -> String {
        let mut s = format!(
            "loadgen handshake: {} devices ({}), concurrency {}, gateway {}\n",
            self.devices,
            if self.paired { "paired" } else { "NOT paired" },
            self.concurrency,
            self.gateway
        );
        if self.paired {
            s += &format!(
                "  paired       {} devices in {:.2} s (control socket)\n",
                self.devices, self.pairing_s
            );
        }
        s += &format!(
            "  handshakes   {} confirmed, {} failed in {:.2} s: {:.1} handshakes/s\n",
            self.succeeded, self.failed, self.duration_s, self.throughput_per_s
        );
        s += &latency_line("latency", &self.latency_ms);
        s += &latency_line("device side", &self.client_side_latency_ms);
        s += &reasons_line("failures", &self.failures_by_reason);
        s += &outcome_lines(self.last_error.as_deref(), self.all_ok());
        s
    }
}

/// `loadgen hold`'s report (`--json FILE`), written when the devices have been closed.
#[derive(Debug, Clone, Serialize)]
pub struct HoldReport {
    /// How many simulated devices.
    pub devices: u64,
    /// Devices in flight at once.
    pub concurrency: u64,
    /// Devices whose connection the gateway confirmed.
    pub succeeded: u64,
    /// Devices that could not connect (or were still connecting when the hold was stopped).
    pub failed: u64,
    /// Time to connect every device, seconds.
    pub duration_s: f64,
    /// Connections established per second of `duration_s`.
    pub throughput_per_s: f64,
    /// Per device, `connect` to the gateway's `HANDSHAKE_DONE`.
    pub latency_ms: Latency,
    /// Time spent pairing over the control socket, seconds.
    pub pairing_s: f64,
    /// Keep-alive interval of the held connections, seconds.
    pub keep_alive_s: f64,
    /// From the ready file to the end of the hold, seconds.
    pub held_s: f64,
    /// What ended the hold: `SIGTERM`, `SIGINT` or `hold-for`.
    pub ended_by: String,
    /// Connections still open when the hold ended (then closed by loadgen).
    pub still_connected: u64,
    /// Connections that ended before the hold did (closed by the gateway, timed out, reset).
    pub closed_early: u64,
    /// Those, by reason (`closed_by_gateway_<code>`, `timed_out`, `reset`, ...).
    pub closed_by_reason: BTreeMap<String, u64>,
    /// Failed devices by reason.
    pub failures_by_reason: BTreeMap<String, u64>,
    /// One failure's message, if any failed.
    pub last_error: Option<String>,
    /// gatewayd's device address.
    pub gateway: String,
}

impl Summary for HoldReport {
    /// Whether every device connected and stayed connected to the end.
    fn all_ok(&self) -> bool {
        self.failed == 0 && self.still_connected == self.devices
    }

    /// The human summary.
    fn human(&self) -> String {
        let mut s = format!(
            "loadgen hold: {} devices, concurrency {}, gateway {}\n",
            self.devices, self.concurrency, self.gateway
        );
        s += &format!(
            "  connected    {} ok, {} failed in {:.2} s: {:.1} connections/s\n",
            self.succeeded, self.failed, self.duration_s, self.throughput_per_s
        );
        s += &latency_line("latency", &self.latency_ms);
        s += &format!(
            "  held         {:.1} s (keep-alive {:.0} s), ended by {}: {} still connected, {} closed early\n",
            self.held_s, self.keep_alive_s, self.ended_by, self.still_connected, self.closed_early
        );
        s += &reasons_line("closed", &self.closed_by_reason);
        s += &reasons_line("failures", &self.failures_by_reason);
        s += &outcome_lines(self.last_error.as_deref(), self.all_ok());
        s
    }
}

/// The closing lines of a human summary: the last error (if any) and the verdict.
fn outcome_lines(last_error: Option<&str>, ok: bool) -> String {
    let mut s = last_error.map_or_else(String::new, |e| format!("  last error   {e}\n"));
    s += if ok {
        "  result       OK\n"
    } else {
        "  result       FAILED\n"
    };
    s
}

fn latency_line(what: &str, l: &Latency) -> String {
    format!(
        "  {what:<12} p50 {:.1} ms  p90 {:.1} ms  p99 {:.1} ms  max {:.1} ms\n",
        l.p50_ms, l.p90_ms, l.p99_ms, l.max_ms
    )
}

fn reasons_line(what: &str, m: &BTreeMap<String, u64>) -> String {
    if m.is_empty() {
        return String::new();
    }
    let r: Vec<String> = m.iter().map(|(k, v)| format!("{k}={v}")).collect();
    format!("  {what:<12} {}\n", r.join(" "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_from_the_histogram() {
        let mut r = Recorder::new().unwrap();
        for ms in 1..=100u64 {
            r.record(Duration::from_millis(ms));
        }
        let l = r.latency();
        assert_eq!(l.count, 100);
        assert!((l.p50_ms - 50.0).abs() < 0.1, "{l:?}");
        assert!((l.p90_ms - 90.0).abs() < 0.1, "{l:?}");
        assert!((l.p99_ms - 99.0).abs() < 0.1, "{l:?}");
        assert!((l.max_ms - 100.0).abs() < 0.1, "{l:?}");
        assert_eq!(Recorder::new().unwrap().latency(), Latency::default());
    }

    #[test]
    fn report_json_has_the_fields_and_ok_reflects_failures() {
        let mut rep = Report {
            devices: 2,
            concurrency: 2,
            succeeded: 2,
            failed: 0,
            duration_s: 1.0,
            throughput_per_s: 2.0,
            latency_ms: Latency::default(),
            attach: true,
            attaches_succeeded: 2,
            attach_latency_ms: Latency::default(),
            pairing_s: 0.1,
            failures_by_reason: BTreeMap::new(),
            retries_by_reason: BTreeMap::new(),
            gateway: "127.0.0.1:1".into(),
            results: None,
        };
        assert!(rep.all_ok());
        let v = serde_json::to_value(&rep).unwrap();
        for k in [
            "devices",
            "succeeded",
            "failed",
            "duration_s",
            "throughput_per_s",
            "attaches_succeeded",
            "failures_by_reason",
        ] {
            assert!(v.get(k).is_some(), "{k} missing");
        }
        for k in ["p50_ms", "p90_ms", "p99_ms", "max_ms"] {
            assert!(v["latency_ms"].get(k).is_some(), "{k} missing");
        }
        rep.attaches_succeeded = 1;
        assert!(!rep.all_ok());
        assert!(rep.human().contains("FAILED"));
    }

    #[test]
    fn handshake_and_hold_reports_are_ok_only_when_every_device_made_it() {
        let mut h = HandshakeReport {
            devices: 3,
            concurrency: 2,
            paired: true,
            succeeded: 3,
            failed: 0,
            duration_s: 0.5,
            throughput_per_s: 6.0,
            latency_ms: Latency::default(),
            client_side_latency_ms: Latency::default(),
            pairing_s: 0.1,
            failures_by_reason: BTreeMap::new(),
            last_error: None,
            gateway: "127.0.0.1:1".into(),
        };
        assert!(h.all_ok());
        let v = serde_json::to_value(&h).unwrap();
        for k in [
            "devices",
            "concurrency",
            "succeeded",
            "failed",
            "duration_s",
            "throughput_per_s",
        ] {
            assert!(v.get(k).is_some(), "{k} missing");
        }
        assert!(v["latency_ms"].get("p99_ms").is_some());
        h.succeeded = 2;
        h.failed = 1;
        h.failures_by_reason.insert("not_paired".into(), 1);
        assert!(!h.all_ok());
        assert!(h.human().contains("not_paired=1"), "{}", h.human());

        let mut hold = HoldReport {
            devices: 2,
            concurrency: 2,
            succeeded: 2,
            failed: 0,
            duration_s: 0.1,
            throughput_per_s: 20.0,
            latency_ms: Latency::default(),
            pairing_s: 0.1,
            keep_alive_s: 10.0,
            held_s: 1.0,
            ended_by: "SIGTERM".into(),
            still_connected: 2,
            closed_early: 0,
            closed_by_reason: BTreeMap::new(),
            failures_by_reason: BTreeMap::new(),
            last_error: None,
            gateway: "127.0.0.1:1".into(),
        };
        assert!(hold.all_ok());
        // A connection the gateway closed during the hold is a failure of the hold.
        hold.still_connected = 1;
        hold.closed_early = 1;
        hold.closed_by_reason
            .insert("closed_by_gateway_5".into(), 1);
        assert!(!hold.all_ok());
        assert!(hold.human().contains("closed_by_gateway_5=1"));
    }
}
