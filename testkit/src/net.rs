//! Network namespaces for the LAN-filter suites (`gatewayd/tests/netns.rs`, e2e-bench's filter
//! suite): `ip` commands and the static neighbour entries that keep ARP out of XDP tests.

use std::process::Command;

use crate::Result;
use crate::process::run;

/// Runs `ip ARGS…`; an error carries the command and what `ip` printed.
pub fn ip(args: &[&str]) -> Result<()> {
    let mut c = Command::new("ip");
    c.args(args);
    run(c, &format!("ip {}", args.join(" "))).map(|_| ())
}

/// A permanent neighbour entry in namespace `ns`: `addr` is at `mac` on `dev`. Both ends of a
/// veth pair get one, so no packet of a test waits on (or is eaten with) ARP resolution.
pub fn static_neighbour(ns: &str, addr: &str, mac: &str, dev: &str) -> Result<()> {
    ip(&[
        "-n",
        ns,
        "neigh",
        "replace",
        addr,
        "lladdr",
        mac,
        "dev",
        dev,
        "nud",
        "permanent",
    ])
}
