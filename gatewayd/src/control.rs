//! The control protocol between `gatewayctl` and the daemon, over a Unix socket.
//!
//! JSON lines: the client writes one [`Request`] as a JSON object on one line, the server answers
//! with one [`Response`] on one line; a connection may carry several exchanges in turn. Requests
//! are tagged by `"op"`, responses by `"result"`:
//!
//! ```text
//! > {"op":"pair","code":"CPN:V:1;I:watch-1;K:MCow...;;","label":"kitchen"}
//! < {"result":"paired","new":true,"device":{"device":"watch-1",...}}
//! > {"op":"open_window","seconds":120}
//! < {"result":"window_opened","window":{"closes_at":1700000120,"remaining_secs":120,"code":"7KQ2M-X9D4T","wrong_codes":0}}
//! > {"op":"revoke","device":"nope"}
//! < {"result":"error","kind":"not_found","message":"device nope is not paired"}
//! ```
//!
//! Access: the socket is created 0660 with the configured group, and every connection's peer
//! credentials (`SO_PEERCRED`) must be uid 0, the daemon's own uid, or a member of that group
//! (primary or supplementary); anyone else gets a `forbidden` error and the connection is closed.
//!
//! The server validates what it can (pairing code syntax, device ID syntax, durations) and hands
//! typed values to a [`ControlHandler`], which the daemon implements.

use std::time::Duration;

mod access;
mod client;
mod handler;
mod protocol;
mod server;

pub use access::{AccessPolicy, AllowedGroup, Peer};
pub use client::{ClientError, call};
pub use handler::{ControlHandler, PairOutcome, RevokeOutcome, dispatch};
pub use protocol::*;
pub use server::{ControlServer, ControlServerError};

/// Longest request line, bytes (a pairing code is at most 2 KiB).
pub const MAX_LINE: usize = 16 * 1024;
/// A connection idle this long between requests is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

#[cfg(test)]
mod tests;
