//! The flood topology: two network namespaces joined by a veth pair (removed by a guard, also
//! when the suite fails), and the receive-buffer errors of a namespace.

use super::*;
use companion_testkit::net::static_neighbour;

/// The two namespaces and the veth between them; removed on drop.
pub(super) struct Topology {
    pub(super) gw: String,
    pub(super) atk: String,
    /// The gateway's end of the veth (the attacker's is `eth0`).
    pub(super) gw_if: String,
    pub(super) net: &'static str,
}

impl Topology {
    pub(super) fn create(tag: u32) -> anyhow::Result<Self> {
        let t = Self {
            gw: format!("bench{tag}fg"),
            atk: format!("bench{tag}fa"),
            gw_if: format!("bf{tag}"),
            net: "10.210.0",
        };
        for n in [&t.gw, &t.atk] {
            let _ = Command::new("ip")
                .args(["netns", "del", n])
                .stderr(Stdio::null())
                .status();
        }
        // From here on the guard removes whatever was created.
        for n in [&t.gw, &t.atk] {
            ip(&["netns", "add", n])?;
            ip(&["-n", n, "link", "set", "lo", "up"])?;
        }
        let (gw_mac, atk_mac) = ("02:00:00:00:0b:01", "02:00:00:00:0b:02");
        ip(&[
            "-n", &t.gw, "link", "add", &t.gw_if, "address", gw_mac, "type", "veth", "peer",
            "name", "eth0", "address", atk_mac, "netns", &t.atk,
        ])?;
        ip(&[
            "-n",
            &t.gw,
            "addr",
            "add",
            &format!("{GW_ADDR}/24"),
            "dev",
            &t.gw_if,
        ])?;
        ip(&["-n", &t.gw, "link", "set", &t.gw_if, "up"])?;
        ip(&["-n", &t.atk, "addr", "add", &t.addr_cidr(2), "dev", "eth0"])?;
        for i in SOURCES {
            ip(&["-n", &t.atk, "addr", "add", &t.addr_cidr(i), "dev", "eth0"])?;
        }
        ip(&["-n", &t.atk, "link", "set", "eth0", "up"])?;
        // Static neighbours: no ARP in the measurement.
        static_neighbour(&t.atk, GW_ADDR, gw_mac, "eth0")?;
        static_neighbour(&t.gw, &t.addr(2), atk_mac, &t.gw_if)?;
        Ok(t)
    }

    pub(super) fn addr(&self, host: u8) -> String {
        format!("{}.{host}", self.net)
    }

    pub(super) fn addr_cidr(&self, host: u8) -> String {
        format!("{}.{host}/24", self.net)
    }

    /// Packets the veth dropped (both ends, rx + tx): NAPI ring or backlog full.
    pub(super) fn veth_drops(&self) -> anyhow::Result<u64> {
        let mut total = 0;
        for (ns, dev) in [(&self.gw, self.gw_if.as_str()), (&self.atk, "eth0")] {
            let mut c = Command::new("ip");
            c.args(["-n", ns, "-s", "-j", "link", "show", "dev", dev]);
            let out = harness::run(c, "ip -s link show")?;
            let v: serde_json::Value =
                serde_json::from_slice(&out.stdout).context("parsing `ip -j -s link show`")?;
            let s = &v[0]["stats64"];
            for dir in ["rx", "tx"] {
                total += s[dir]["dropped"]
                    .as_u64()
                    .ok_or_else(|| anyhow!("no {dir} drop counter for {dev}: {v}"))?;
            }
        }
        Ok(total)
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        for n in [&self.gw, &self.atk] {
            let _ = Command::new("ip")
                .args(["netns", "del", n])
                .stderr(Stdio::null())
                .status();
        }
    }
}

pub(super) fn ip(args: &[&str]) -> anyhow::Result<()> {
    Ok(companion_testkit::net::ip(args)?)
}

/// UDP `RcvbufErrors` in the namespace (datagrams lost at a full socket buffer).
pub(super) fn rcvbuf_errors(ns: &str) -> anyhow::Result<u64> {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns, "cat", "/proc/net/snmp"]);
    let out = harness::run(c, "reading /proc/net/snmp")?;
    harness::snmp_udp_rcvbuf_errors(&String::from_utf8_lossy(&out.stdout))
        .ok_or_else(|| anyhow!("no Udp RcvbufErrors in /proc/net/snmp"))
}
