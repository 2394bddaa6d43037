//! Plumbing shared by the state machines: frame input, transmit queue, events, deadline, and
//! the AKA helpers used by both the gateway↔CN and the attach conversations.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use companion_crypto::aka::AuthVector;
use companion_crypto::binding::{session_binding, verify_session_binding};
use companion_crypto::usim::{Usim, UsimError, UsimResponse};

use crate::error::ProtoError;
use crate::frame::FrameDecoder;
use crate::msg::{Challenge, ChallengeResponse, ErrorMsg, Message, Resync};

/// Limits of one state machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Config {
    /// Longest wait for the peer's next message (or for the local caller's answer). Each
    /// received message restarts it; `Pending` on the device conversation extends it.
    pub timeout: Duration,
    /// AKA servers: how many resynchronisations one session may ask for before it fails with
    /// `sync_failure`. AKA clients: how many challenges they answer with AUTS.
    pub max_resyncs: u8,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            timeout: Duration::from_secs(30),
            max_resyncs: 2,
        }
    }
}

/// The interface every state machine of this crate offers, so that one I/O driver (for example
/// `companion_transport::drive::StreamDriver`) can run any of them over a stream.
pub trait SansIo {
    /// What the machine reports to its owner.
    type Event;
    /// Feeds bytes received on the stream.
    fn handle_bytes(&mut self, now: Instant, data: &[u8]) -> Result<(), ProtoError>;
    /// The peer finished its side of the stream.
    fn handle_end_of_stream(&mut self) -> Result<(), ProtoError>;
    /// The deadline from [`SansIo::poll_timeout`] passed.
    fn handle_timeout(&mut self, now: Instant) -> Result<(), ProtoError>;
    /// Next frame to write to the stream.
    fn poll_transmit(&mut self) -> Option<Vec<u8>>;
    /// Next event.
    fn poll_event(&mut self) -> Option<Self::Event>;
    /// When [`SansIo::handle_timeout`] must be called.
    fn poll_timeout(&self) -> Option<Instant>;
}

/// Implements [`SansIo`] by forwarding to the machine's inherent methods of the same names.
macro_rules! impl_sansio {
    ($ty:ty, $ev:ty $(, $g:ident : $bound:path)?) => {
        impl$(<$g: $bound>)? $crate::machine::SansIo for $ty {
            type Event = $ev;
            fn handle_bytes(
                &mut self,
                now: std::time::Instant,
                data: &[u8],
            ) -> Result<(), $crate::error::ProtoError> {
                <$ty>::handle_bytes(self, now, data)
            }
            fn handle_end_of_stream(&mut self) -> Result<(), $crate::error::ProtoError> {
                <$ty>::handle_end_of_stream(self)
            }
            fn handle_timeout(
                &mut self,
                now: std::time::Instant,
            ) -> Result<(), $crate::error::ProtoError> {
                <$ty>::handle_timeout(self, now)
            }
            fn poll_transmit(&mut self) -> Option<Vec<u8>> {
                <$ty>::poll_transmit(self)
            }
            fn poll_event(&mut self) -> Option<Self::Event> {
                <$ty>::poll_event(self)
            }
            fn poll_timeout(&self) -> Option<std::time::Instant> {
                <$ty>::poll_timeout(self)
            }
        }
    };
}
pub(crate) use impl_sansio;

/// Writes the stream-facing inherent methods of a machine whose `state` enum has `Done` and
/// `Closed` variants and a `name()`, and whose `on_message(now, message)` handles one decoded
/// message: input (each message restarts the deadline), end of stream (fine only in `Done` or
/// `Closed`), transmit, events, deadline and timeout, each failure moving the state to
/// `Closed`. Invoked inside the machine's `impl` block:
/// `stream_methods!(ServerState, ServerEvent);`.
macro_rules! stream_methods {
    ($state:ident, $ev:ty) => {
        /// Feeds bytes received on the stream.
        pub fn handle_bytes(
            &mut self,
            now: std::time::Instant,
            data: &[u8],
        ) -> Result<(), $crate::error::ProtoError> {
            for m in self
                .core
                .input(data)
                .inspect_err(|_| self.state = $state::Closed)?
            {
                self.core.touch(now);
                if let Err(e) = self.on_message(now, m) {
                    self.state = $state::Closed;
                    return Err(self.core.fail(e));
                }
                if self.core.is_closed() {
                    break;
                }
            }
            Ok(())
        }

        /// The peer finished its side of the stream.
        pub fn handle_end_of_stream(&mut self) -> Result<(), $crate::error::ProtoError> {
            let terminal = matches!(self.state, $state::Done | $state::Closed);
            let r = self.core.end_of_stream(self.state.name(), terminal);
            if r.is_err() {
                self.state = $state::Closed;
            }
            r
        }

        /// Next frame to write to the stream.
        pub fn poll_transmit(&mut self) -> Option<Vec<u8>> {
            self.core.poll_transmit()
        }

        /// Next event.
        pub fn poll_event(&mut self) -> Option<$ev> {
            self.core.poll_event()
        }

        /// When [`handle_timeout`](Self::handle_timeout) must be called.
        pub fn poll_timeout(&self) -> Option<std::time::Instant> {
            self.core.poll_timeout()
        }

        /// Fails the exchange with `timeout` if the deadline has passed.
        pub fn handle_timeout(
            &mut self,
            now: std::time::Instant,
        ) -> Result<(), $crate::error::ProtoError> {
            let r = self.core.handle_timeout(now, self.state.name());
            if r.is_err() {
                self.state = $state::Closed;
            }
            r
        }
    };
}
pub(crate) use stream_methods;

/// Longest `reason` this crate puts in an `Error` it sends.
const MAX_REASON: usize = 200;

/// Frame input, output queue, events and deadline of one machine speaking `M`.
#[derive(Debug)]
pub(crate) struct Core<M, E> {
    decoder: FrameDecoder,
    out: VecDeque<Vec<u8>>,
    events: VecDeque<E>,
    closed: bool,
    deadline: Option<Instant>,
    pub(crate) config: Config,
    _m: std::marker::PhantomData<fn() -> M>,
}

impl<M: Message, E> Core<M, E> {
    pub(crate) fn new(now: Instant, config: Config) -> Self {
        Core {
            decoder: FrameDecoder::new(M::CONVERSATION),
            out: VecDeque::new(),
            events: VecDeque::new(),
            closed: false,
            deadline: now.checked_add(config.timeout),
            config,
            _m: std::marker::PhantomData,
        }
    }

    pub(crate) fn send(&mut self, m: &M) -> Result<(), ProtoError> {
        let b = m.encode()?;
        self.out.push_back(b);
        Ok(())
    }

    pub(crate) fn event(&mut self, e: E) {
        self.events.push_back(e);
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.closed
    }

    /// Restarts the deadline from `now`.
    pub(crate) fn touch(&mut self, now: Instant) {
        if !self.closed {
            self.deadline = now.checked_add(self.config.timeout);
        }
    }

    /// Sets the deadline to `now + d` (or clears it when the exchange is complete).
    pub(crate) fn set_deadline(&mut self, deadline: Option<Instant>) {
        self.deadline = deadline;
    }

    /// Closes without sending anything (the exchange ended normally or the peer sent `Error`).
    pub(crate) fn finish(&mut self) {
        self.closed = true;
        self.deadline = None;
        self.decoder = FrameDecoder::new(M::CONVERSATION);
    }

    /// Closes after queueing the `Error` message for `err` (none for a peer's own `Error`).
    pub(crate) fn fail(&mut self, err: ProtoError) -> ProtoError
    where
        M: From<ErrorMsg>,
    {
        if !self.closed && !matches!(err, ProtoError::Peer(_) | ProtoError::Closed) {
            let reason = match &err {
                // Do not tell the peer which check failed.
                ProtoError::AuthFailed(_) => "authentication failed".to_owned(),
                e => e.to_string().chars().take(MAX_REASON).collect(),
            };
            let msg = M::from(ErrorMsg::new(err.error_code(), reason));
            // An Error message always fits a frame; if encoding failed there is nothing
            // better to send, and the caller still gets `err`.
            if let Ok(b) = msg.encode() {
                self.out.push_back(b);
            }
        }
        self.finish();
        err
    }

    /// Sends `msg` as the local decision to end the exchange with an error.
    pub(crate) fn abort(&mut self, msg: ErrorMsg) -> Result<(), ProtoError>
    where
        M: From<ErrorMsg>,
    {
        if self.closed {
            return Err(ProtoError::Closed);
        }
        let r = self.send(&M::from(msg));
        self.finish();
        r
    }

    /// Pushes bytes and returns the messages now complete, or the error that closed the machine.
    pub(crate) fn input(&mut self, data: &[u8]) -> Result<Vec<M>, ProtoError>
    where
        M: From<ErrorMsg>,
    {
        if self.closed {
            return Err(ProtoError::Closed);
        }
        self.decoder.push(data);
        let mut msgs = Vec::new();
        loop {
            match self.decoder.next_frame() {
                Ok(Some(f)) => match M::from_frame(&f) {
                    Ok(m) => msgs.push(m),
                    Err(e) => return Err(self.fail(e)),
                },
                Ok(None) => return Ok(msgs),
                Err(e) => return Err(self.fail(e.into())),
            }
        }
    }

    /// End of the peer's stream: fine only in a terminal state.
    pub(crate) fn end_of_stream(
        &mut self,
        state: &'static str,
        terminal: bool,
    ) -> Result<(), ProtoError>
    where
        M: From<ErrorMsg>,
    {
        if self.closed {
            return Ok(());
        }
        if let Err(e) = self.decoder.finish() {
            return Err(self.fail(e.into()));
        }
        if terminal {
            self.finish();
            Ok(())
        } else {
            Err(self.fail(ProtoError::UnexpectedEnd(state)))
        }
    }

    pub(crate) fn poll_transmit(&mut self) -> Option<Vec<u8>> {
        self.out.pop_front()
    }

    pub(crate) fn poll_event(&mut self) -> Option<E> {
        self.events.pop_front()
    }

    pub(crate) fn poll_timeout(&self) -> Option<Instant> {
        if self.closed { None } else { self.deadline }
    }

    pub(crate) fn handle_timeout(
        &mut self,
        now: Instant,
        state: &'static str,
    ) -> Result<(), ProtoError>
    where
        M: From<ErrorMsg>,
    {
        match self.poll_timeout() {
            Some(d) if now >= d => Err(self.fail(ProtoError::Timeout(state))),
            _ => Ok(()),
        }
    }
}

/// `now + retry_after_ms`, for `Failed` events.
pub(crate) fn retry_at(now: Instant, e: &ErrorMsg) -> Option<Instant> {
    e.retry_after_ms
        .and_then(|ms| now.checked_add(Duration::from_millis(ms)))
}

/// What an AKA client sends back for a challenge.
pub(crate) enum Answer {
    Response(ChallengeResponse),
    Resync(Resync),
}

/// Runs the USIM on a challenge; a success is bound to this TLS session.
pub(crate) fn answer_challenge(
    usim: &mut dyn Usim,
    ch: &Challenge,
    snn: &str,
    exporter: &[u8; 32],
) -> Result<Answer, ProtoError> {
    match usim.authenticate(&ch.rand, &ch.autn, snn) {
        Ok(UsimResponse::Success {
            res_star, ck, ik, ..
        }) => Ok(Answer::Response(ChallengeResponse {
            res_star,
            binding: session_binding(&ck, &ik, exporter),
        })),
        Ok(UsimResponse::SyncFailure { auts }) => Ok(Answer::Resync(Resync { auts })),
        Err(UsimError::Unavailable(e)) => Err(ProtoError::Usim(e)),
        Err(e) => Err(ProtoError::AuthFailed(format!(
            "network failed authentication: {e}"
        ))),
    }
}

/// Checks RES* against XRES* and the binding against this session's exporter, both in
/// constant time (both are always computed).
pub(crate) fn verify_response(
    v: &AuthVector,
    r: &ChallengeResponse,
    exporter: &[u8; 32],
) -> Result<(), ProtoError> {
    let res_ok = v.verify_res_star(&r.res_star);
    let binding_ok = verify_session_binding(&v.ck, &v.ik, exporter, &r.binding);
    match (res_ok, binding_ok) {
        (true, true) => Ok(()),
        (false, _) => Err(ProtoError::AuthFailed("RES* does not match XRES*".into())),
        (true, false) => Err(ProtoError::AuthFailed(
            "session binding does not match this TLS session".into(),
        )),
    }
}

/// Checks a serving network name: 1..=255 printable ASCII characters.
pub(crate) fn check_snn(snn: &str) -> Result<(), ProtoError> {
    if (1..=255).contains(&snn.len()) && snn.bytes().all(|b| (0x21..0x7f).contains(&b)) {
        Ok(())
    } else {
        Err(ProtoError::Violation("invalid serving network name".into()))
    }
}
