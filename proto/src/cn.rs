//! The gateway ↔ CN session (`companion-cn/2`).
//!
//! The first bidirectional stream of the connection (opened by the gateway) carries AKA with
//! the companion's own USIM, bound to the TLS session ([`ClientSession`] / [`ServerSession`],
//! the [`crate::aka`] machine on [`CnMessage`]); it ends with `AuthResult`, the
//! subscription's policy summary. Only then may the gateway open one stream per operation:
//!
//! ```text
//!  gateway (ClientRequest)                       CN (ServerRequest)
//!  AwaitResponse -- BatchProvision|Revoke|ListChildren -->  AwaitRequest -> Processing
//!  Done          <-- BatchResult|RevokeResult|ChildList --  Processing -> Done
//!                <-- Error ------------------------------  (any state)
//! ```

use std::collections::HashSet;
use std::time::Instant;

use crate::aka::{AkaClient, AkaServer};
use crate::error::ProtoError;
use crate::ids::{RequestId, Supi};
use crate::machine::{Config, Core, retry_at};
use crate::msg::{
    AuthResult, BatchProvision, BatchResult, ChildList, CnMessage, ErrorMsg, ListChildren, Message,
    Outcome, Revoke, RevokeResult,
};

pub use crate::aka::ServerEvent;

/// Gateway side of the AKA stream.
pub type ClientSession = AkaClient<CnMessage>;
/// CN side of the AKA stream.
pub type ServerSession = AkaServer<CnMessage>;
/// Events of the gateway's AKA stream.
pub type ClientEvent = crate::aka::ClientEvent<AuthResult>;

/// Events of an operation stream, gateway side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestEvent {
    /// The batch's results (checked: same `batch_id`, known request ids, `issued` items
    /// complete).
    BatchResult(BatchResult),
    /// What was revoked.
    RevokeResult(RevokeResult),
    /// The children.
    ChildList(ChildList),
    /// The CN answered with `Error`.
    Failed {
        /// The error.
        error: ErrorMsg,
        /// When to retry, if the CN said so.
        retry_at: Option<Instant>,
    },
}

#[derive(Debug)]
enum Expect {
    Batch {
        batch_id: u64,
        ids: HashSet<RequestId>,
    },
    Revoke,
    List,
}

fn check_revoke(r: &Revoke) -> Result<(), ProtoError> {
    if r.supi.is_some() == r.device_id.is_some() {
        return Err(ProtoError::Violation(
            "Revoke needs exactly one of supi and device_id".into(),
        ));
    }
    Ok(())
}

fn batch_ids(b: &BatchProvision, max: u64) -> Result<HashSet<RequestId>, ProtoError> {
    let n = b.items.len();
    if n == 0 {
        return Err(ProtoError::Violation("empty batch".into()));
    }
    if u64::try_from(n).unwrap_or(u64::MAX) > max {
        return Err(ProtoError::TooManyItems { n, max });
    }
    let ids: HashSet<RequestId> = b.items.iter().map(|i| i.request_id).collect();
    if ids.len() != n {
        return Err(ProtoError::Violation(
            "duplicate request id in batch".into(),
        ));
    }
    Ok(ids)
}

impl ClientSession {
    fn policy(&self) -> Result<&AuthResult, ProtoError> {
        self.result().ok_or(ProtoError::InvalidState(
            "the CN session is not authenticated",
        ))
    }

    /// A new operation stream carrying `batch` (at most `AuthResult.max_batch_items` items,
    /// unique request ids).
    pub fn batch(&self, now: Instant, batch: BatchProvision) -> Result<ClientRequest, ProtoError> {
        let ids = batch_ids(&batch, self.policy()?.max_batch_items)?;
        let expect = Expect::Batch {
            batch_id: batch.batch_id,
            ids,
        };
        ClientRequest::start(
            CnMessage::BatchProvision(batch),
            expect,
            now,
            self.core.config,
        )
    }

    /// A new operation stream carrying `Revoke`.
    pub fn revoke(&self, now: Instant, r: Revoke) -> Result<ClientRequest, ProtoError> {
        self.policy()?;
        check_revoke(&r)?;
        ClientRequest::start(CnMessage::Revoke(r), Expect::Revoke, now, self.core.config)
    }

    /// A new operation stream carrying `ListChildren`.
    pub fn list_children(&self, now: Instant) -> Result<ClientRequest, ProtoError> {
        self.policy()?;
        ClientRequest::start(
            CnMessage::ListChildren(ListChildren {}),
            Expect::List,
            now,
            self.core.config,
        )
    }
}

/// Gateway side of one operation stream.
#[derive(Debug)]
pub struct ClientRequest {
    core: Core<CnMessage, RequestEvent>,
    expect: Expect,
    done: bool,
}

impl ClientRequest {
    fn start(
        m: CnMessage,
        expect: Expect,
        now: Instant,
        config: Config,
    ) -> Result<Self, ProtoError> {
        let mut core = Core::new(now, config);
        core.send(&m)?;
        Ok(ClientRequest {
            core,
            expect,
            done: false,
        })
    }

    /// Feeds bytes received on the stream.
    pub fn handle_bytes(&mut self, now: Instant, data: &[u8]) -> Result<(), ProtoError> {
        for m in self.core.input(data)? {
            if let Err(e) = self.on_message(now, m) {
                return Err(self.core.fail(e));
            }
            if self.core.is_closed() {
                break;
            }
        }
        Ok(())
    }

    fn on_message(&mut self, now: Instant, m: CnMessage) -> Result<(), ProtoError> {
        let got = m.msg_type();
        let ev = match (&self.expect, m) {
            (_, CnMessage::Error(error)) => {
                let retry_at = retry_at(now, &error);
                self.core.finish();
                self.core.event(RequestEvent::Failed { error, retry_at });
                return Ok(());
            }
            (Expect::Batch { batch_id, ids }, CnMessage::BatchResult(r)) => {
                if r.batch_id != *batch_id {
                    return Err(ProtoError::Violation(format!(
                        "result for batch {}",
                        r.batch_id
                    )));
                }
                let mut seen = HashSet::new();
                for i in &r.items {
                    if !ids.contains(&i.request_id) || !seen.insert(i.request_id) {
                        return Err(ProtoError::Violation(format!(
                            "unknown or repeated request id {} in result",
                            i.request_id
                        )));
                    }
                    if i.outcome == Outcome::Issued
                        && (i.supi.is_none() || i.expires_at.is_none() || i.sealed.is_none())
                    {
                        return Err(ProtoError::Violation(format!(
                            "issued item {} lacks supi, expires_at or sealed",
                            i.request_id
                        )));
                    }
                }
                RequestEvent::BatchResult(r)
            }
            (Expect::Revoke, CnMessage::RevokeResult(r)) => RequestEvent::RevokeResult(r),
            (Expect::List, CnMessage::ChildList(l)) => RequestEvent::ChildList(l),
            (_, _) => {
                return Err(ProtoError::Unexpected {
                    got,
                    state: self.state_name(),
                });
            }
        };
        self.done = true;
        self.core.finish();
        self.core.event(ev);
        Ok(())
    }

    fn state_name(&self) -> &'static str {
        if self.done {
            "Done"
        } else if self.core.is_closed() {
            "Closed"
        } else {
            "AwaitResponse"
        }
    }

    /// The peer finished its side of the stream.
    pub fn handle_end_of_stream(&mut self) -> Result<(), ProtoError> {
        self.core.end_of_stream(self.state_name(), false)
    }

    /// Next frame to write to the stream.
    pub fn poll_transmit(&mut self) -> Option<Vec<u8>> {
        self.core.poll_transmit()
    }

    /// Next event.
    pub fn poll_event(&mut self) -> Option<RequestEvent> {
        self.core.poll_event()
    }

    /// When [`handle_timeout`](Self::handle_timeout) must be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.core.poll_timeout()
    }

    /// Fails with `timeout` if the deadline has passed.
    pub fn handle_timeout(&mut self, now: Instant) -> Result<(), ProtoError> {
        let name = self.state_name();
        self.core.handle_timeout(now, name)
    }

    /// The response arrived.
    pub fn is_done(&self) -> bool {
        self.done
    }

    /// No more input is accepted.
    pub fn is_closed(&self) -> bool {
        self.core.is_closed()
    }
}

/// An operation the gateway asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Operation {
    /// Answer with [`ServerRequest::respond_batch`].
    Batch(BatchProvision),
    /// Answer with [`ServerRequest::respond_revoke`].
    Revoke(Revoke),
    /// Answer with [`ServerRequest::respond_children`].
    ListChildren,
}

/// Events of an operation stream, CN side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OperationEvent {
    /// The gateway's request (already checked: batch size and unique ids, revoke target).
    Request(Operation),
    /// The gateway sent `Error`.
    Failed(ErrorMsg),
}

impl ServerSession {
    /// A new operation stream opened by the (authenticated) gateway.
    pub fn accept_request(&self, now: Instant) -> Result<ServerRequest, ProtoError> {
        let (Some(parent), Some(policy)) = (self.supi(), self.result()) else {
            return Err(ProtoError::InvalidState(
                "the CN session is not authenticated",
            ));
        };
        if !self.is_authenticated() {
            return Err(ProtoError::InvalidState(
                "the CN session is not authenticated",
            ));
        }
        Ok(ServerRequest {
            core: Core::new(now, self.core.config),
            parent: parent.clone(),
            max_items: policy.max_batch_items,
            pending: None,
            state: OpState::AwaitRequest,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OpState {
    AwaitRequest,
    Processing,
    Done,
    Closed,
}

/// CN side of one operation stream.
#[derive(Debug)]
pub struct ServerRequest {
    core: Core<CnMessage, OperationEvent>,
    parent: Supi,
    max_items: u64,
    pending: Option<Expect>,
    state: OpState,
}

impl ServerRequest {
    /// The authenticated parent SUPI the operation acts for.
    pub fn parent(&self) -> &Supi {
        &self.parent
    }

    fn state_name(&self) -> &'static str {
        match self.state {
            OpState::AwaitRequest => "AwaitRequest",
            OpState::Processing => "Processing",
            OpState::Done => "Done",
            OpState::Closed => "Closed",
        }
    }

    /// Feeds bytes received on the stream.
    pub fn handle_bytes(&mut self, now: Instant, data: &[u8]) -> Result<(), ProtoError> {
        for m in self
            .core
            .input(data)
            .inspect_err(|_| self.state = OpState::Closed)?
        {
            self.core.touch(now);
            if let Err(e) = self.on_message(m) {
                self.state = OpState::Closed;
                return Err(self.core.fail(e));
            }
            if self.core.is_closed() {
                break;
            }
        }
        Ok(())
    }

    fn on_message(&mut self, m: CnMessage) -> Result<(), ProtoError> {
        let got = m.msg_type();
        let (op, expect) = match (self.state, m) {
            (_, CnMessage::Error(e)) => {
                self.state = OpState::Closed;
                self.core.finish();
                self.core.event(OperationEvent::Failed(e));
                return Ok(());
            }
            (OpState::AwaitRequest, CnMessage::BatchProvision(b)) => {
                let ids = batch_ids(&b, self.max_items)?;
                let e = Expect::Batch {
                    batch_id: b.batch_id,
                    ids,
                };
                (Operation::Batch(b), e)
            }
            (OpState::AwaitRequest, CnMessage::Revoke(r)) => {
                check_revoke(&r)?;
                (Operation::Revoke(r), Expect::Revoke)
            }
            (OpState::AwaitRequest, CnMessage::ListChildren(_)) => {
                (Operation::ListChildren, Expect::List)
            }
            (_, _) => {
                return Err(ProtoError::Unexpected {
                    got,
                    state: self.state_name(),
                });
            }
        };
        self.pending = Some(expect);
        self.state = OpState::Processing;
        self.core.event(OperationEvent::Request(op));
        Ok(())
    }

    fn respond(&mut self, m: CnMessage) -> Result<(), ProtoError> {
        self.core.send(&m)?;
        self.state = OpState::Done;
        self.pending = None;
        self.core.set_deadline(None);
        Ok(())
    }

    /// Answers a `Batch` (same `batch_id`; one result per item, ids from the batch).
    pub fn respond_batch(&mut self, r: BatchResult) -> Result<(), ProtoError> {
        match &self.pending {
            Some(Expect::Batch { batch_id, ids })
                if *batch_id == r.batch_id
                    && r.items.iter().all(|i| ids.contains(&i.request_id)) => {}
            _ => {
                return Err(ProtoError::InvalidState(
                    "respond_batch() does not match the request",
                ));
            }
        }
        self.respond(CnMessage::BatchResult(r))
    }

    /// Answers a `Revoke`.
    pub fn respond_revoke(&mut self, r: RevokeResult) -> Result<(), ProtoError> {
        if !matches!(self.pending, Some(Expect::Revoke)) {
            return Err(ProtoError::InvalidState(
                "respond_revoke() does not match the request",
            ));
        }
        self.respond(CnMessage::RevokeResult(r))
    }

    /// Answers `ListChildren`.
    pub fn respond_children(&mut self, l: ChildList) -> Result<(), ProtoError> {
        if !matches!(self.pending, Some(Expect::List)) {
            return Err(ProtoError::InvalidState(
                "respond_children() does not match the request",
            ));
        }
        self.respond(CnMessage::ChildList(l))
    }

    /// Ends the operation with an error (busy, internal, policy...).
    pub fn fail(&mut self, e: ErrorMsg) -> Result<(), ProtoError> {
        self.state = OpState::Closed;
        self.core.abort(e)
    }

    /// The peer finished its side of the stream (normal once the request was read).
    pub fn handle_end_of_stream(&mut self) -> Result<(), ProtoError> {
        let terminal = self.state != OpState::AwaitRequest;
        let r = self.core.end_of_stream(self.state_name(), terminal);
        if r.is_err() {
            self.state = OpState::Closed;
        }
        r
    }

    /// Next frame to write to the stream.
    pub fn poll_transmit(&mut self) -> Option<Vec<u8>> {
        self.core.poll_transmit()
    }

    /// Next event.
    pub fn poll_event(&mut self) -> Option<OperationEvent> {
        self.core.poll_event()
    }

    /// When [`handle_timeout`](Self::handle_timeout) must be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.core.poll_timeout()
    }

    /// Fails with `timeout` if the deadline has passed.
    pub fn handle_timeout(&mut self, now: Instant) -> Result<(), ProtoError> {
        let name = self.state_name();
        let r = self.core.handle_timeout(now, name);
        if r.is_err() {
            self.state = OpState::Closed;
        }
        r
    }

    /// The response was queued.
    pub fn is_done(&self) -> bool {
        self.state == OpState::Done
    }
}

crate::machine::impl_sansio!(ClientRequest, RequestEvent);
crate::machine::impl_sansio!(ServerRequest, OperationEvent);

#[cfg(test)]
mod tests;
