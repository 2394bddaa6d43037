//! `gatewayd`: the companion UE for many devices at once (seed steps 1, 2, 4 and 6).
//!
//! Foundations, each usable and tested on its own; the device QUIC server and the CN link plug
//! into them:
//! - [`config`]: the TOML configuration with documented defaults;
//! - [`state`]: the embedded database (pairings, credentials, pending deliveries, outstanding
//!   requests, revocations, blocks);
//! - [`identity`]: the gateway's own TLS identity;
//! - [`companion`]: the companion's own 3GPP credential behind the `Usim` trait;
//! - [`pairing`]: paired keys, the pairing window, and the handshake's `KeyPolicy`;
//! - [`control`]: the `gatewayctl` ↔ daemon protocol, server and client;
//! - [`metrics`]: Prometheus metrics and `/metrics`, `/healthz`;
//! - [`batcher`]: smart batching towards the CN;
//! - [`clock`]: injectable time;
//! - [`device_server`]: the device-facing QUIC server (one `ServerExchange` per stream);
//! - [`delivery`]: requests → persisted → batched to the CN → sealed credentials kept until
//!   acknowledged, renewal pre-fetch, revocation retries;
//! - [`cn_link`]: the authenticated sessions to the CN, reconnecting with backoff;
//! - [`filter`]: the LAN filter (eBPF XDP/TC, or the same policy in userspace);
//! - [`bounded`]: the fixed-capacity map behind every per-source-address table;
//! - [`daemon`]: wiring, the control handler, signals, systemd notifications, ready file.
#![warn(missing_docs)]
#![forbid(unsafe_code)]

pub mod batcher;
pub mod bounded;
pub mod clock;
pub mod cn_link;
pub mod companion;
pub mod config;
pub mod control;
pub mod daemon;
pub mod delivery;
pub mod device_server;
pub mod filter;
pub mod identity;
pub mod metrics;
pub mod pairing;
pub mod state;
