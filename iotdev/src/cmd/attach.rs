//! `attach`: 5G AKA with the operator's CN using the stored credential.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use companion_transport::cn_client;
use iotdev::attach::{self, AttachError};

use crate::cmd::show::{fmt_time, remaining};
use crate::cmd::{endpoint_for, now_unix};
use crate::{Failure, attach_failure, open};

/// `attach`: authenticates to the CN named in the credential and prints the outcome.
pub(crate) async fn attach_cmd(
    dir: &Path,
    snn: Option<&str>,
    json: bool,
    timeout: Duration,
) -> Result<(), Failure> {
    let d = open(dir)?;
    let Some(c) = d.credential() else {
        return Err(attach_failure(AttachError::NoCredential));
    };
    let b = &c.bundle;
    let home_snn;
    let snn = match snn {
        Some(s) => s,
        None => {
            home_snn = b.home_network.serving_network_name().map_err(|e| {
                anyhow::anyhow!(
                    "the credential's home network is invalid ({e}); pass --serving-network"
                )
            })?;
            home_snn.as_str()
        }
    };
    if b.expires_at <= now_unix() {
        eprintln!(
            "note: the credential expired at {}; asking the network anyway",
            fmt_time(b.expires_at)
        );
    }
    let supi = b.supi.to_string();
    let initial = attach::initial_sqn_state(b);
    let state = match attach::load_sqn_state(dir, &supi).map_err(attach_failure)? {
        // A renewed bundle may start higher than what the USIM has seen: keep the maximum.
        Some(s) => {
            let mut seq = *s.seq_ms();
            for (a, b) in seq.iter_mut().zip(initial.seq_ms()) {
                *a = (*a).max(*b);
            }
            companion_crypto::usim::SqnState::new(seq).unwrap_or(initial)
        }
        None => initial,
    };
    let mut usim = attach::usim(b, Some(state.clone()));
    let target = attach::cn_target(b, snn).await.map_err(attach_failure)?;
    let ep = endpoint_for(target.addr)?;
    let opts = cn_client::ClientOptions {
        connect_timeout: timeout,
        exchange_timeout: timeout,
    };
    let started = Instant::now();
    let r = attach::attach(&ep, b, snn, &mut usim, opts).await;
    let after = usim.sqn_state();
    if after != state {
        attach::save_sqn_state(dir, &supi, &after).map_err(attach_failure)?;
    }
    ep.wait_idle().await;
    let accept = r.map_err(attach_failure)?;
    if json {
        let v = serde_json::json!({
            "attached": true,
            "supi": supi,
            "serving_network": snn,
            "expires_at": accept.expires_at,
            "restrictions": {
                "roaming_allowed": accept.restrictions.roaming_allowed,
                "dnns": accept.restrictions.dnns,
                "max_bitrate_kbps": accept.restrictions.max_bitrate_kbps,
            },
            "elapsed_ms": started.elapsed().as_millis() as u64,
        });
        println!("{}", serde_json::to_string_pretty(&v).context("JSON")?);
    } else {
        println!(
            "attached: the network at {} authenticated {} (5G AKA, {snn}) in {} ms",
            b.attach.endpoint,
            supi,
            started.elapsed().as_millis()
        );
        println!(
            "  valid until {} ({}); roaming {}",
            fmt_time(accept.expires_at),
            remaining(accept.expires_at),
            if accept.restrictions.roaming_allowed {
                "allowed"
            } else {
                "not allowed"
            }
        );
    }
    Ok(())
}
