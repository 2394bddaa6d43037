//! `loadgen`: drives thousands of simulated devices through the real device flow (the `iotdev`
//! library) against a real `gatewayd`, optionally attaching each to `cn-backend`, and reports
//! throughput and HDR latency percentiles; measures the bare handshake (`handshake`) and holds
//! devices connected (`hold`). See `README.md`.
#![warn(missing_docs)]
#![forbid(unsafe_code)]

pub mod control;
pub mod fleet;
pub mod flood;
pub mod handshake;
pub mod hold;
pub mod report;
pub mod run;
