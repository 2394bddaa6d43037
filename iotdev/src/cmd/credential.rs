//! Getting a credential through the gateway: `provision` (seed steps 1, 2 and 6) and `renew`.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::anyhow;
use companion_proto::msg::Params;
use iotdev::DeviceError;
use iotdev::client::AttemptKind;

use crate::cmd::show::{fmt_time, print_credential_summary};
use crate::cmd::{client_options, endpoint_for, now_unix, resolve};
use crate::{Failure, GatewayArgs, ParamArgs, device_failure, open, state_file};

/// After a failed try: waits as the gateway asked (1 s if it did not) when the failure is
/// retryable and the wait ends before `until`; otherwise returns the failure to report.
async fn wait_to_retry(e: DeviceError, until: Instant) -> Result<(), Failure> {
    if !e.is_retryable() {
        return Err(device_failure(e));
    }
    let wait = e.retry_after().unwrap_or(Duration::from_secs(1));
    if Instant::now() + wait > until {
        return Err(device_failure(e));
    }
    eprintln!("{e}; retrying in {} ms", wait.as_millis());
    tokio::time::sleep(wait).await;
    Ok(())
}

/// `provision`: a first credential (or another one with `--again`), resuming an unfinished
/// request with the same request ID.
pub(crate) async fn provision(
    dir: &Path,
    gw: &GatewayArgs,
    pa: &ParamArgs,
    again: bool,
) -> Result<(), Failure> {
    let mut d = open(dir)?;
    if let Some(c) = d.credential()
        && c.bundle.expires_at > now_unix()
        && !again
        && d.attempt()
            .is_none_or(|a| matches!(a.kind, AttemptKind::Renew { .. }))
    {
        return Err(anyhow!(
            "this device already holds a valid credential ({}, expires {}): `iotdev renew` extends \
             it; `provision --again` requests another one (it uses the subscription's quota)",
            c.bundle.supi,
            fmt_time(c.bundle.expires_at)
        )
        .into());
    }
    let params = pa.params();
    match d.attempt().map(|a| a.kind.clone()) {
        Some(AttemptKind::Provision { params: p }) if pa.given() && p != params => {
            eprintln!("note: replacing the unfinished request with one for the new parameters");
            d.abandon_attempt().map_err(device_failure)?;
        }
        Some(AttemptKind::Renew { .. }) => d.abandon_attempt().map_err(device_failure)?,
        _ => {}
    }
    d.prepare_provision(params.clone())
        .map_err(device_failure)?;
    let addr = resolve(&gw.gateway).await?;
    let ep = endpoint_for(addr)?;
    let opts = client_options(gw);
    let started = Instant::now();
    let until = started + gw.retry_for;
    let cred = loop {
        match d.provision(&ep, addr, params.clone(), &opts).await {
            Ok(c) => break c,
            Err(e) => wait_to_retry(e, until).await?,
        }
    };
    ep.wait_idle().await;
    println!(
        "provisioned {} in {} ms: credential opened, checked (sealed for {} and this request), \
         stored in {} (0600), acknowledged",
        d.keys().device_id,
        started.elapsed().as_millis(),
        d.keys().device_id,
        state_file(dir).display()
    );
    print_credential_summary(&cred);
    println!(
        "next: `iotdev --dir {} attach` authenticates to the network with it",
        dir.display()
    );
    Ok(())
}

/// `renew`: a fresh expiry (and optionally lifetime) for the credential the device holds.
pub(crate) async fn renew(
    dir: &Path,
    gw: &GatewayArgs,
    lifetime: Option<Duration>,
) -> Result<(), Failure> {
    let mut d = open(dir)?;
    let Some(c) = d.credential() else {
        return Err(anyhow!(
            "this device holds no credential to renew: `iotdev --dir {} provision --gateway {}` \
             first",
            dir.display(),
            gw.gateway
        )
        .into());
    };
    let old_expiry = c.bundle.expires_at;
    if let Some(a) = d.attempt()
        && matches!(a.kind, AttemptKind::Provision { .. })
    {
        // The attempt prepared by `init` or an abandoned one; a pending provisioning that was
        // sent would have been finished by `provision`.
        d.abandon_attempt().map_err(device_failure)?;
    }
    let params = lifetime.map(|l| Params {
        lifetime_s: Some(l.as_secs().max(1)),
        ..Params::default()
    });
    let addr = resolve(&gw.gateway).await?;
    let ep = endpoint_for(addr)?;
    let opts = client_options(gw);
    let until = Instant::now() + gw.retry_for;
    let cred = loop {
        match d.renew(&ep, addr, params.clone(), &opts).await {
            Ok(c) => break c,
            Err(e) => wait_to_retry(e, until).await?,
        }
    };
    ep.wait_idle().await;
    println!(
        "renewed {}: expiry {} -> {}",
        cred.bundle.supi,
        fmt_time(old_expiry),
        fmt_time(cred.bundle.expires_at)
    );
    print_credential_summary(&cred);
    Ok(())
}
