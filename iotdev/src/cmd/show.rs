//! `show`: what the device holds, for a person (times in UTC, time left) or as JSON.

use std::path::Path;

use anyhow::Context;
use iotdev::client::AttemptKind;
use iotdev::store::StoredCredential;

use crate::cmd::now_unix;
use crate::{Failure, device_failure, open};

/// A few lines on a credential: SUPI, expiry, restrictions.
pub(crate) fn print_credential_summary(c: &StoredCredential) {
    let b = &c.bundle;
    println!("  SUPI        {}", b.supi);
    println!(
        "  expires     {} ({})",
        fmt_time(b.expires_at),
        remaining(b.expires_at)
    );
    println!(
        "  may         roaming={} dnns=[{}] max_bitrate_kbps={}",
        if b.restrictions.roaming_allowed {
            "yes"
        } else {
            "no"
        },
        b.restrictions.dnns.join(","),
        b.restrictions
            .max_bitrate_kbps
            .map_or_else(|| "none".into(), |v| v.to_string())
    );
    println!(
        "  attach to   {} (TLS name {})",
        b.attach.endpoint, b.attach.server_name
    );
}

/// `show`: the device, its pin and its credential (keys only with `--reveal`), or JSON.
pub(crate) fn show(dir: &Path, json: bool, reveal: bool) -> Result<(), Failure> {
    let d = open(dir)?;
    let keys = d.keys();
    let fingerprint = hex::encode(keys.fingerprint().map_err(device_failure)?);
    let code = d.pairing_code().map_err(device_failure)?;
    let cred = d.credential().map(|c| {
        let b = &c.bundle;
        let mut v = serde_json::json!({
            "supi": b.supi.to_string(),
            "request_id": hex::encode(c.request_id.as_bytes()),
            "issued_at": b.issued_at,
            "expires_at": b.expires_at,
            "expired": b.expires_at <= now_unix(),
            "amf": hex::encode(b.amf),
            "sqn_start": b.sqn_start,
            "restrictions": {
                "roaming_allowed": b.restrictions.roaming_allowed,
                "dnns": b.restrictions.dnns,
                "max_bitrate_kbps": b.restrictions.max_bitrate_kbps,
            },
            "attach": {
                "endpoint": b.attach.endpoint,
                "server_name": b.attach.server_name,
                "trust_anchor_sha256": hex::encode(companion_transport::spki_fingerprint(&b.attach.trust_anchor)),
            },
        });
        if reveal {
            v["k"] = hex::encode(b.k.expose()).into();
            v["opc"] = hex::encode(b.opc.expose()).into();
        }
        v
    });
    let attempt = d.attempt().map(|a| {
        serde_json::json!({
            "request_id": hex::encode(a.request_id.as_bytes()),
            "kind": match a.kind { AttemptKind::Provision { .. } => "provision", AttemptKind::Renew { .. } => "renew" },
            "hpke_public_key": hex::encode(a.hpke.public_key()),
        })
    });
    if json {
        let v = serde_json::json!({
            "device_id": keys.device_id.to_string(),
            "dir": dir.display().to_string(),
            "fingerprint": fingerprint,
            "pairing_code": code,
            "gateway_pin": keys.gateway_pin.map(hex::encode),
            "attempt": attempt,
            "credential": cred,
        });
        println!("{}", serde_json::to_string_pretty(&v).context("JSON")?);
        return Ok(());
    }
    println!("device      {}  ({})", keys.device_id, dir.display());
    println!("key         {fingerprint}");
    println!("pairing     {code}");
    println!(
        "gateway     {}",
        keys.gateway_pin.map_or_else(
            || "not pinned yet (first provisioning pins it)".into(),
            hex::encode
        )
    );
    if let Some(a) = d.attempt() {
        let kind = match a.kind {
            AttemptKind::Provision { .. } => "provisioning",
            AttemptKind::Renew { .. } => "renewal",
        };
        println!(
            "in flight   {kind} request {} (resumed by the next command)",
            hex::encode(a.request_id.as_bytes())
        );
    }
    match d.credential() {
        None => println!("credential  none: `iotdev provision --gateway <addr>`"),
        Some(c) => {
            println!("credential");
            print_credential_summary(c);
            println!("  issued      {}", fmt_time(c.bundle.issued_at));
            if reveal {
                println!("  K           {}", hex::encode(c.bundle.k.expose()));
                println!("  OPc         {}", hex::encode(c.bundle.opc.expose()));
            } else {
                println!("  K, OPc      stored 0600 (show them with --reveal)");
            }
        }
    }
    Ok(())
}
/// Time left before `expires_at`, or how long ago it passed.
pub(crate) fn remaining(expires_at: u64) -> String {
    let now = now_unix();
    if expires_at <= now {
        return format!("expired {} ago", human(expires_at.abs_diff(now)));
    }
    format!("{} left", human(expires_at - now))
}

/// Seconds as a short human duration (s, m, h or d).
fn human(s: u64) -> String {
    match s {
        0..120 => format!("{s}s"),
        120..7200 => format!("{}m", s / 60),
        7200..172_800 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86_400),
    }
}

/// Unix seconds as `YYYY-MM-DD hh:mm:ss UTC`.
pub(crate) fn fmt_time(t: u64) -> String {
    let days = (t / 86_400) as i64;
    let secs = t % 86_400;
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_format() {
        assert_eq!(fmt_time(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(fmt_time(1_764_633_600), "2025-12-02 00:00:00 UTC");
    }
}
