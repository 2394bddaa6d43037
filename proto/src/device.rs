//! The device ↔ gateway exchange (`companion-device/2`), one bidirectional stream per exchange,
//! opened by the device.
//!
//! ```text
//!  device (ClientExchange)                       gateway (ServerExchange)
//!  AwaitDelivery  -- ProvisionRequest|RenewRequest -->  AwaitRequest -> Processing
//!                 <-- Pending* (extends deadline) ----  Processing
//!                 <-- CredentialDelivery -------------  Processing -> AwaitAck
//!  Opening (caller opens the HPKE blob)
//!  AwaitConfirm   -- DeliveryAck -------------------->  AwaitAck -> Done
//!  Done           <-- AckConfirmed ------------------
//!  (either side, any state: Error -> Closed)
//! ```

use std::time::{Duration, Instant};

use crate::error::ProtoError;
use crate::ids::{DeviceId, RequestId, Supi};
use crate::machine::{Config, Core, retry_at};
use crate::msg::{
    AckConfirmed, CredentialDelivery, DeliveryAck, DeviceMessage, ErrorCode, ErrorMsg, Message,
    Pending, ProvisionRequest, RenewRequest,
};

/// Events of the device side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientEvent {
    /// The gateway queued the request; the deadline moved to `deadline`.
    Pending {
        /// The gateway's estimate.
        wait_ms: u64,
        /// The new deadline.
        deadline: Instant,
    },
    /// The sealed credential arrived: open it, then call [`ClientExchange::accept`] or
    /// [`ClientExchange::reject`].
    Delivery(CredentialDelivery),
    /// The gateway confirmed the ack; the exchange is complete.
    Confirmed {
        /// The request.
        request_id: RequestId,
        /// The stored credential's SUPI.
        supi: Supi,
    },
    /// The gateway answered with an `Error`; retry at `retry_at` if given.
    Failed {
        /// The error.
        error: ErrorMsg,
        /// When to retry (`now + retry_after_ms`).
        retry_at: Option<Instant>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ClientState {
    AwaitDelivery,
    Opening,
    AwaitConfirm,
    Done,
    Closed,
}

impl ClientState {
    fn name(self) -> &'static str {
        match self {
            ClientState::AwaitDelivery => "AwaitDelivery",
            ClientState::Opening => "Opening",
            ClientState::AwaitConfirm => "AwaitConfirm",
            ClientState::Done => "Done",
            ClientState::Closed => "Closed",
        }
    }
}

/// Device side of one exchange.
#[derive(Debug)]
pub struct ClientExchange {
    core: Core<DeviceMessage, ClientEvent>,
    state: ClientState,
    request_id: RequestId,
    delivered: Option<Supi>,
}

impl ClientExchange {
    /// Starts a provisioning: queues `ProvisionRequest`.
    pub fn provision(
        req: ProvisionRequest,
        now: Instant,
        config: Config,
    ) -> Result<Self, ProtoError> {
        let request_id = req.request_id;
        Self::start(
            DeviceMessage::ProvisionRequest(req),
            request_id,
            now,
            config,
        )
    }

    /// Starts a renewal: queues `RenewRequest`.
    pub fn renew(req: RenewRequest, now: Instant, config: Config) -> Result<Self, ProtoError> {
        let request_id = req.request_id;
        Self::start(DeviceMessage::RenewRequest(req), request_id, now, config)
    }

    fn start(
        m: DeviceMessage,
        request_id: RequestId,
        now: Instant,
        config: Config,
    ) -> Result<Self, ProtoError> {
        let mut core = Core::new(now, config);
        core.send(&m)?;
        Ok(ClientExchange {
            core,
            state: ClientState::AwaitDelivery,
            request_id,
            delivered: None,
        })
    }

    /// The request id of this exchange.
    pub fn request_id(&self) -> RequestId {
        self.request_id
    }

    fn on_message(&mut self, now: Instant, m: DeviceMessage) -> Result<(), ProtoError> {
        let got = m.msg_type();
        match (self.state, m) {
            (_, DeviceMessage::Error(error)) => {
                let retry_at = retry_at(now, &error);
                self.core.event(ClientEvent::Failed { error, retry_at });
                self.state = ClientState::Closed;
                self.core.finish();
            }
            (ClientState::AwaitDelivery, DeviceMessage::Pending(p)) => {
                self.check_id(&p.request_id)?;
                let deadline = now
                    .checked_add(Duration::from_millis(p.wait_ms))
                    .ok_or_else(|| ProtoError::Violation("wait_ms out of range".into()))?;
                self.core.set_deadline(Some(deadline));
                self.core.event(ClientEvent::Pending {
                    wait_ms: p.wait_ms,
                    deadline,
                });
            }
            (ClientState::AwaitDelivery, DeviceMessage::CredentialDelivery(d)) => {
                self.check_id(&d.request_id)?;
                self.delivered = Some(d.supi.clone());
                self.state = ClientState::Opening;
                self.core.event(ClientEvent::Delivery(d));
            }
            (ClientState::AwaitConfirm, DeviceMessage::AckConfirmed(c)) => {
                self.check_id(&c.request_id)?;
                let supi = self
                    .delivered
                    .take()
                    .ok_or(ProtoError::InvalidState("no delivery"))?;
                self.state = ClientState::Done;
                self.core.finish();
                self.core.event(ClientEvent::Confirmed {
                    request_id: c.request_id,
                    supi,
                });
            }
            (s, _) => {
                return Err(ProtoError::Unexpected {
                    got,
                    state: s.name(),
                });
            }
        }
        Ok(())
    }

    fn check_id(&self, id: &RequestId) -> Result<(), ProtoError> {
        if *id == self.request_id {
            Ok(())
        } else {
            Err(ProtoError::Violation(format!(
                "request id {id} is not {}",
                self.request_id
            )))
        }
    }

    /// The delivered credential was opened and stored: queues `DeliveryAck`.
    pub fn accept(&mut self, now: Instant) -> Result<(), ProtoError> {
        if self.state != ClientState::Opening {
            return Err(ProtoError::InvalidState(
                "accept() needs a Delivery event first",
            ));
        }
        let supi = self
            .delivered
            .clone()
            .ok_or(ProtoError::InvalidState("no delivery"))?;
        self.core.send(&DeviceMessage::DeliveryAck(DeliveryAck {
            request_id: self.request_id,
            supi,
        }))?;
        self.core.touch(now);
        self.state = ClientState::AwaitConfirm;
        Ok(())
    }

    /// The delivered credential cannot be used (does not open, wrong device/request):
    /// queues `Error(credential_unusable)` and closes.
    pub fn reject(&mut self, reason: &str) -> Result<(), ProtoError> {
        if self.state != ClientState::Opening {
            return Err(ProtoError::InvalidState(
                "reject() needs a Delivery event first",
            ));
        }
        self.state = ClientState::Closed;
        self.core
            .abort(ErrorMsg::new(ErrorCode::CredentialUnusable, reason))
    }

    crate::machine::stream_methods!(ClientState, ClientEvent);

    /// The exchange completed successfully.
    pub fn is_done(&self) -> bool {
        self.state == ClientState::Done
    }

    /// No more input is accepted (done or failed).
    pub fn is_closed(&self) -> bool {
        self.core.is_closed()
    }
}

/// What the device asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceRequest {
    /// A first credential.
    Provision(ProvisionRequest),
    /// A renewal.
    Renew(RenewRequest),
}

impl DeviceRequest {
    /// The request id.
    pub fn request_id(&self) -> RequestId {
        match self {
            DeviceRequest::Provision(r) => r.request_id,
            DeviceRequest::Renew(r) => r.request_id,
        }
    }
}

/// Events of the gateway side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerEvent {
    /// A request arrived: answer with [`ServerExchange::deliver`] or [`ServerExchange::fail`]
    /// (optionally [`ServerExchange::pending`] first).
    Request(DeviceRequest),
    /// The device stored the credential: the sealed blob may be forgotten.
    Acked {
        /// The request.
        request_id: RequestId,
        /// The stored SUPI.
        supi: Supi,
    },
    /// The device sent an `Error` (e.g. `credential_unusable`).
    Failed(ErrorMsg),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ServerState {
    AwaitRequest,
    Processing,
    AwaitAck,
    Done,
    Closed,
}

impl ServerState {
    fn name(self) -> &'static str {
        match self {
            ServerState::AwaitRequest => "AwaitRequest",
            ServerState::Processing => "Processing",
            ServerState::AwaitAck => "AwaitAck",
            ServerState::Done => "Done",
            ServerState::Closed => "Closed",
        }
    }
}

/// Gateway side of one exchange (one stream opened by the device).
#[derive(Debug)]
pub struct ServerExchange {
    core: Core<DeviceMessage, ServerEvent>,
    state: ServerState,
    paired: Option<DeviceId>,
    request_id: Option<RequestId>,
    delivered: Option<Supi>,
}

impl ServerExchange {
    /// A new exchange. `paired` is the device id pinned to the peer's TLS key; a
    /// `ProvisionRequest` for another id is refused with `not_paired`.
    pub fn new(now: Instant, config: Config, paired: Option<DeviceId>) -> Self {
        ServerExchange {
            core: Core::new(now, config),
            state: ServerState::AwaitRequest,
            paired,
            request_id: None,
            delivered: None,
        }
    }

    fn on_message(&mut self, _now: Instant, m: DeviceMessage) -> Result<(), ProtoError> {
        let got = m.msg_type();
        match (self.state, m) {
            (_, DeviceMessage::Error(e)) => {
                self.state = ServerState::Closed;
                self.core.finish();
                self.core.event(ServerEvent::Failed(e));
            }
            (ServerState::AwaitRequest, DeviceMessage::ProvisionRequest(r)) => {
                if let Some(p) = &self.paired
                    && *p != r.device_id
                {
                    return Err(ProtoError::NotPaired(r.device_id.to_string()));
                }
                self.accept_request(DeviceRequest::Provision(r));
            }
            (ServerState::AwaitRequest, DeviceMessage::RenewRequest(r)) => {
                self.accept_request(DeviceRequest::Renew(r));
            }
            (ServerState::AwaitAck, DeviceMessage::DeliveryAck(a)) => {
                if Some(a.request_id) != self.request_id || Some(&a.supi) != self.delivered.as_ref()
                {
                    return Err(ProtoError::Violation(
                        "DeliveryAck does not match the delivery".into(),
                    ));
                }
                self.core.send(&DeviceMessage::AckConfirmed(AckConfirmed {
                    request_id: a.request_id,
                }))?;
                self.state = ServerState::Done;
                self.core.finish();
                self.core.event(ServerEvent::Acked {
                    request_id: a.request_id,
                    supi: a.supi,
                });
            }
            (s, _) => {
                return Err(ProtoError::Unexpected {
                    got,
                    state: s.name(),
                });
            }
        }
        Ok(())
    }

    fn accept_request(&mut self, r: DeviceRequest) {
        self.request_id = Some(r.request_id());
        self.state = ServerState::Processing;
        self.core.event(ServerEvent::Request(r));
    }

    /// Tells the device the request is queued and how long to wait (queues `Pending`).
    pub fn pending(&mut self, now: Instant, wait_ms: u64) -> Result<(), ProtoError> {
        let request_id = match (self.state, self.request_id) {
            (ServerState::Processing, Some(id)) => id,
            _ => {
                return Err(ProtoError::InvalidState(
                    "pending() needs a Request event first",
                ));
            }
        };
        self.core.send(&DeviceMessage::Pending(Pending {
            request_id,
            wait_ms,
        }))?;
        let extended = now
            .checked_add(Duration::from_millis(wait_ms))
            .and_then(|d| d.checked_add(self.core.config.timeout));
        self.core.set_deadline(extended);
        Ok(())
    }

    /// Sends the sealed credential (queues `CredentialDelivery`); waits for the ack.
    pub fn deliver(&mut self, now: Instant, d: CredentialDelivery) -> Result<(), ProtoError> {
        if self.state != ServerState::Processing {
            return Err(ProtoError::InvalidState(
                "deliver() needs a Request event first",
            ));
        }
        if Some(d.request_id) != self.request_id {
            return Err(ProtoError::InvalidState("delivery for another request id"));
        }
        self.delivered = Some(d.supi.clone());
        self.core.send(&DeviceMessage::CredentialDelivery(d))?;
        self.core.touch(now);
        self.state = ServerState::AwaitAck;
        Ok(())
    }

    /// Ends the exchange with an error (quota, busy with retry-after, CN unavailable...).
    pub fn fail(&mut self, e: ErrorMsg) -> Result<(), ProtoError> {
        self.state = ServerState::Closed;
        self.core.abort(e)
    }

    crate::machine::stream_methods!(ServerState, ServerEvent);

    /// The device acknowledged the delivery.
    pub fn is_done(&self) -> bool {
        self.state == ServerState::Done
    }

    /// No more input is accepted (done or failed).
    pub fn is_closed(&self) -> bool {
        self.core.is_closed()
    }
}

crate::machine::impl_sansio!(ClientExchange, ClientEvent);
crate::machine::impl_sansio!(ServerExchange, ServerEvent);

#[cfg(test)]
mod tests;
