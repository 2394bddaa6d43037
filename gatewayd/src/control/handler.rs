//! What the daemon implements ([`ControlHandler`]) and the dispatch of a validated request to it.

use std::future::Future;
use std::net::IpAddr;
use std::time::Duration;

use companion_proto::DeviceId;
use companion_proto::pairing::PairingCode;

use crate::pairing::WindowStatus;
use crate::state::Block;

use super::*;

/// Result of [`ControlHandler::pair`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PairOutcome {
    /// `false` when the device was already paired with this key (label updated).
    pub new: bool,
    /// The device as now listed.
    pub device: DeviceInfo,
}

/// Result of [`ControlHandler::revoke`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RevokeOutcome {
    /// The child credential the device held, if any.
    pub supi: Option<String>,
    /// What happened at the CN.
    pub cn: CnRevocation,
}

/// What the daemon does for each control request. Inputs are already validated.
pub trait ControlHandler: Send + Sync + 'static {
    /// Pair the device of `code` (see [`crate::pairing::PairingRegistry::pair_code`]).
    fn pair(
        &self,
        code: PairingCode,
        label: Option<String>,
    ) -> impl Future<Output = Result<PairOutcome, ControlError>> + Send;

    /// Open the pairing window for `duration`, or the configured default when `None`.
    fn open_window(
        &self,
        duration: Option<Duration>,
    ) -> impl Future<Output = Result<WindowStatus, ControlError>> + Send;

    /// Every paired device with its credential's state.
    fn devices(&self) -> impl Future<Output = Result<Vec<DeviceInfo>, ControlError>> + Send;

    /// Unpair `device` locally (at once, durably), close its connections, and revoke its
    /// credential at the CN — waiting a bounded time for the CN, answering
    /// [`CnRevocation::Pending`] if it does not confirm in time.
    fn revoke(
        &self,
        device: DeviceId,
    ) -> impl Future<Output = Result<RevokeOutcome, ControlError>> + Send;

    /// The daemon's status.
    fn status(&self) -> impl Future<Output = Result<StatusInfo, ControlError>> + Send;

    /// Store a block of `addr` for `duration` (`None` = until unblocked).
    fn block(
        &self,
        addr: IpAddr,
        duration: Option<Duration>,
    ) -> impl Future<Output = Result<Block, ControlError>> + Send;

    /// Lift a block; `Ok(false)` if there was none.
    fn unblock(&self, addr: IpAddr) -> impl Future<Output = Result<bool, ControlError>> + Send;
}

/// Validates `req` and runs it on `handler`.
pub async fn dispatch<H: ControlHandler>(handler: &H, req: Request) -> Response {
    let bad = |m: String| Response::from(ControlError::new(ErrorKind::BadRequest, m));
    let r = match req {
        Request::Pair { code, label } => {
            let code = match PairingCode::parse(&code) {
                Ok(c) => c,
                Err(e) => {
                    return ControlError::new(
                        ErrorKind::PairingCode,
                        format!("pairing code rejected: {e}"),
                    )
                    .into();
                }
            };
            handler.pair(code, label).await.map(|o| Response::Paired {
                new: o.new,
                device: o.device,
            })
        }
        Request::OpenWindow { seconds: Some(0) } => {
            return bad("pairing window must be longer than 0s".into());
        }
        Request::OpenWindow { seconds } => handler
            .open_window(seconds.map(Duration::from_secs))
            .await
            .map(|window| Response::WindowOpened { window }),
        Request::Devices => handler
            .devices()
            .await
            .map(|devices| Response::Devices { devices }),
        Request::Revoke { device } => {
            let id = match DeviceId::new(&device) {
                Ok(id) => id,
                Err(e) => return bad(e.to_string()),
            };
            handler.revoke(id).await.map(|o| Response::Revoked {
                device,
                supi: o.supi,
                cn: o.cn,
            })
        }
        Request::Status => handler
            .status()
            .await
            .map(|status| Response::Status { status }),
        Request::Block {
            seconds: Some(0), ..
        } => return bad("block duration must be longer than 0s".into()),
        Request::Block { addr, seconds } => handler
            .block(addr, seconds.map(Duration::from_secs))
            .await
            .map(|block| Response::Blocked { block }),
        Request::Unblock { addr } => handler
            .unblock(addr)
            .await
            .map(|was_blocked| Response::Unblocked { addr, was_blocked }),
    };
    r.unwrap_or_else(Response::from)
}
