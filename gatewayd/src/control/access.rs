//! Access control: who may use the socket (uid 0, the daemon's uid, members of the control group),
//! from the peer credentials the kernel reports.

use super::*;

/// Who may use the socket besides root.
#[derive(Debug, Clone)]
pub struct AccessPolicy {
    /// The daemon's own (effective) uid.
    pub own_uid: u32,
    /// The allowed group: name, gid, and its listed members (from the group database).
    pub group: Option<AllowedGroup>,
}

/// The configured control group, resolved.
#[derive(Debug, Clone)]
pub struct AllowedGroup {
    /// The group's name.
    pub name: String,
    /// Its numeric ID.
    pub gid: u32,
    /// Its supplementary members' user names.
    pub members: Vec<String>,
}

/// A connecting process, as the kernel reports it.
#[derive(Debug, Clone)]
pub struct Peer {
    /// The peer's user ID.
    pub uid: u32,
    /// The peer's primary group ID.
    pub gid: u32,
    /// The peer's process ID, when the kernel reports it.
    pub pid: Option<i32>,
}

impl AccessPolicy {
    /// The daemon's uid, and `group` looked up in the group database.
    pub fn resolve(group: Option<&str>) -> Result<Self, ControlServerError> {
        let own_uid = nix::unistd::geteuid().as_raw();
        let group = match group {
            None => None,
            Some(name) => {
                let g = nix::unistd::Group::from_name(name)
                    .map_err(|e| ControlServerError::Group {
                        name: name.to_string(),
                        reason: e.to_string(),
                    })?
                    .ok_or_else(|| ControlServerError::Group {
                        name: name.to_string(),
                        reason:
                            "no such group (create it with `groupadd`, or change [control] group)"
                                .into(),
                    })?;
                Some(AllowedGroup {
                    name: name.to_string(),
                    gid: g.gid.as_raw(),
                    members: g.mem,
                })
            }
        };
        Ok(Self { own_uid, group })
    }

    /// Whether `peer` may use the socket. `supplementary` are the peer process's supplementary
    /// groups and `user_name` its login name, when known.
    pub fn allows(&self, peer: &Peer, supplementary: &[u32], user_name: Option<&str>) -> bool {
        if peer.uid == 0 || peer.uid == self.own_uid {
            return true;
        }
        let Some(g) = &self.group else { return false };
        peer.gid == g.gid
            || supplementary.contains(&g.gid)
            || user_name.is_some_and(|n| g.members.iter().any(|m| m == n))
    }

    pub(super) fn check(&self, peer: &Peer) -> Result<(), ControlError> {
        let supplementary = peer.pid.map(supplementary_groups).unwrap_or_default();
        let name = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(peer.uid))
            .ok()
            .flatten()
            .map(|u| u.name);
        if self.allows(peer, &supplementary, name.as_deref()) {
            return Ok(());
        }
        let who = name.map_or_else(|| format!("uid {}", peer.uid), |n| format!("user {n}"));
        let how = match &self.group {
            Some(g) => format!(
                "root, gatewayd's own user or a member of group {:?}",
                g.name
            ),
            None => "root or gatewayd's own user (no [control] group is configured)".into(),
        };
        Err(ControlError::new(
            ErrorKind::Forbidden,
            format!("permission denied: {who} may not control gatewayd; only {how} may"),
        ))
    }
}

/// Supplementary groups of process `pid`, from `/proc/<pid>/status` (empty if unreadable).
pub(super) fn supplementary_groups(pid: i32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("Groups:").map(|g| {
                    g.split_whitespace()
                        .filter_map(|x| x.parse().ok())
                        .collect()
                })
            })
        })
        .unwrap_or_default()
}
