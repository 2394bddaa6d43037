//! The 5G-AKA exchange bound to the TLS session, shared by the gateway↔CN session
//! ([`crate::cn`]) and the device↔CN attach ([`crate::attach`]).
//!
//! ```text
//!  client (AkaClient)                                server (AkaServer)
//!  AwaitChallenge -- Start(SUPI, SNN) ------------->  AwaitStart
//!                                                     AwaitVector   (event VectorNeeded; caller: provide_vector)
//!                 <-- Challenge(RAND, AUTN) -------   AwaitResponse
//!  Answering      (event ChallengeReceived; caller: answer_challenge(usim))
//!    USIM ok:     -- Response(RES*, binding) ----->   check RES* and binding (constant time)
//!  AwaitResult                                        Verified      (event Verified; caller: accept/reject)
//!  Done           <-- Result (AuthResult|AttachAccept) Done
//!    USIM sync:   -- Resync(AUTS) ---------------->   AwaitVector   (event ResyncNeeded; caller checks AUTS,
//!  AwaitChallenge                                                    resets SQN, provide_vector)
//!  (any state: Error -> Closed; wrong RES*/binding -> Error(auth_failed))
//! ```

use std::time::Instant;

use companion_crypto::aka::AuthVector;
use companion_crypto::usim::Usim;

use crate::error::ProtoError;
use crate::frame::MsgType;
use crate::ids::Supi;
use crate::machine::{
    Answer, Config, Core, answer_challenge, check_snn, retry_at, verify_response,
};
use crate::msg::{
    AttachAccept, AttachMessage, AttachRequest, AuthResult, AuthStart, Challenge,
    ChallengeResponse, CnMessage, ErrorMsg, Message, Resync,
};

/// The AKA messages of one conversation, seen generically.
#[derive(Debug)]
pub enum AkaMsg<F> {
    /// `AuthStart` / `AttachRequest`.
    Start(Supi, String),
    /// `AuthChallenge` / `AttachChallenge`.
    Challenge(Challenge),
    /// `AuthResponse` / `AttachResponse`.
    Response(ChallengeResponse),
    /// `AuthResync` / `AttachResync`.
    Resync(Resync),
    /// `AuthResult` / `AttachAccept`.
    Final(F),
    /// `Error`.
    Error(ErrorMsg),
    /// Any other message of the conversation.
    Other(MsgType),
}

/// A conversation that carries the AKA exchange (implemented for [`CnMessage`] and
/// [`AttachMessage`]).
pub trait AkaWire: Message + From<ErrorMsg> + std::fmt::Debug {
    /// What the server sends on success.
    type Final: std::fmt::Debug + Clone + PartialEq + Eq;
    /// Builds the start message.
    fn start(supi: Supi, snn: String) -> Self;
    /// Builds a challenge.
    fn challenge(c: Challenge) -> Self;
    /// Builds a response.
    fn response(r: ChallengeResponse) -> Self;
    /// Builds a resync.
    fn resync(r: Resync) -> Self;
    /// Builds the success message.
    fn fin(f: Self::Final) -> Self;
    /// Classifies a received message.
    fn classify(self) -> AkaMsg<Self::Final>;
}

/// Implements [`AkaWire`] for a conversation enum from the names of its AKA variants: the start
/// (and its body type), challenge, response, resync and final message.
macro_rules! aka_wire {
    ($msg:ident, $final:ident, $start:ident($start_ty:ident), $challenge:ident, $response:ident,
     $resync:ident) => {
        impl AkaWire for $msg {
            type Final = $final;
            fn start(supi: Supi, snn: String) -> Self {
                $msg::$start($start_ty {
                    supi,
                    serving_network_name: snn,
                })
            }
            fn challenge(c: Challenge) -> Self {
                $msg::$challenge(c)
            }
            fn response(r: ChallengeResponse) -> Self {
                $msg::$response(r)
            }
            fn resync(r: Resync) -> Self {
                $msg::$resync(r)
            }
            fn fin(f: $final) -> Self {
                $msg::$final(f)
            }
            // The attach conversation has no message besides AKA's: its `other` arm is unreachable.
            #[allow(unreachable_patterns)]
            fn classify(self) -> AkaMsg<$final> {
                match self {
                    $msg::$start(s) => AkaMsg::Start(s.supi, s.serving_network_name),
                    $msg::$challenge(c) => AkaMsg::Challenge(c),
                    $msg::$response(r) => AkaMsg::Response(r),
                    $msg::$resync(r) => AkaMsg::Resync(r),
                    $msg::$final(f) => AkaMsg::Final(f),
                    $msg::Error(e) => AkaMsg::Error(e),
                    other => AkaMsg::Other(other.msg_type()),
                }
            }
        }
    };
}

aka_wire!(
    CnMessage,
    AuthResult,
    AuthStart(AuthStart),
    AuthChallenge,
    AuthResponse,
    AuthResync
);
aka_wire!(
    AttachMessage,
    AttachAccept,
    AttachRequest(AttachRequest),
    AttachChallenge,
    AttachResponse,
    AttachResync
);

/// Events of the client (USIM) side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientEvent<F> {
    /// A challenge arrived: call [`AkaClient::answer_challenge`] with the USIM.
    ChallengeReceived,
    /// Authenticated: the server's result (policy summary or attach acceptance).
    Authenticated(F),
    /// The server sent `Error`.
    Failed {
        /// The error.
        error: ErrorMsg,
        /// When to retry, if the server said so.
        retry_at: Option<Instant>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum ClientState {
    AwaitChallenge,
    Answering(Challenge),
    AwaitResult,
    Done,
    Closed,
}

impl ClientState {
    fn name(&self) -> &'static str {
        match self {
            ClientState::AwaitChallenge => "AwaitChallenge",
            ClientState::Answering(_) => "Answering",
            ClientState::AwaitResult => "AwaitResult",
            ClientState::Done => "Done",
            ClientState::Closed => "Closed",
        }
    }
}

/// Client side of AKA: answers challenges with the USIM and binds the answer to the TLS session.
#[derive(Debug)]
pub struct AkaClient<W: AkaWire> {
    pub(crate) core: Core<W, ClientEvent<W::Final>>,
    state: ClientState,
    supi: Supi,
    snn: String,
    exporter: [u8; 32],
    resyncs: u8,
    result: Option<W::Final>,
}

impl<W: AkaWire> AkaClient<W> {
    /// Starts AKA for the USIM's SUPI on serving network `snn`; `exporter` is this TLS
    /// session's exporter (label `EXPORTER-companion-aka-binding`, empty context, 32 bytes).
    /// Queues the start message.
    pub fn new(
        usim: &dyn Usim,
        snn: &str,
        exporter: [u8; 32],
        now: Instant,
        config: Config,
    ) -> Result<Self, ProtoError> {
        let supi = Supi::new(usim.supi()).map_err(|e| ProtoError::Usim(e.to_string()))?;
        check_snn(snn).map_err(|_| ProtoError::InvalidState("invalid serving network name"))?;
        let mut core = Core::new(now, config);
        core.send(&W::start(supi.clone(), snn.to_owned()))?;
        Ok(AkaClient {
            core,
            state: ClientState::AwaitChallenge,
            supi,
            snn: snn.to_owned(),
            exporter,
            resyncs: 0,
            result: None,
        })
    }

    /// The authenticated SUPI.
    pub fn supi(&self) -> &Supi {
        &self.supi
    }

    /// The server's result once authenticated.
    pub fn result(&self) -> Option<&W::Final> {
        self.result.as_ref()
    }

    /// Whether AKA completed.
    pub fn is_authenticated(&self) -> bool {
        self.state == ClientState::Done
    }

    fn on_message(&mut self, now: Instant, m: W) -> Result<(), ProtoError> {
        let got = m.msg_type();
        match (&self.state, m.classify()) {
            (_, AkaMsg::Error(error)) => {
                let retry_at = retry_at(now, &error);
                self.state = ClientState::Closed;
                self.core.finish();
                self.core.event(ClientEvent::Failed { error, retry_at });
            }
            (ClientState::AwaitChallenge, AkaMsg::Challenge(c)) => {
                self.state = ClientState::Answering(c);
                self.core.event(ClientEvent::ChallengeReceived);
            }
            (ClientState::AwaitResult, AkaMsg::Final(f)) => {
                self.state = ClientState::Done;
                self.core.set_deadline(None);
                self.result = Some(f.clone());
                self.core.event(ClientEvent::Authenticated(f));
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

    /// Runs the USIM on the pending challenge and queues `Response` (RES* and binding) or,
    /// on a synchronisation failure, `Resync` (AUTS). A MAC failure (the network is not who it
    /// claims) closes with `auth_failed`.
    pub fn answer_challenge(
        &mut self,
        now: Instant,
        usim: &mut dyn Usim,
    ) -> Result<(), ProtoError> {
        let ClientState::Answering(ch) = &self.state else {
            return Err(ProtoError::InvalidState(
                "answer_challenge() needs ChallengeReceived",
            ));
        };
        if usim.supi() != self.supi.as_str() {
            return Err(ProtoError::InvalidState(
                "USIM is not the one this session started with",
            ));
        }
        let answer = answer_challenge(usim, ch, &self.snn, &self.exporter);
        let r = match answer {
            Ok(Answer::Response(r)) => {
                self.state = ClientState::AwaitResult;
                self.core.send(&W::response(r))
            }
            Ok(Answer::Resync(r)) => {
                self.resyncs = self.resyncs.saturating_add(1);
                if self.resyncs > self.core.config.max_resyncs {
                    Err(ProtoError::SyncFailure(
                        "too many resynchronisations".into(),
                    ))
                } else {
                    self.state = ClientState::AwaitChallenge;
                    self.core.send(&W::resync(r))
                }
            }
            Err(e) => Err(e),
        };
        match r {
            Ok(()) => {
                self.core.touch(now);
                Ok(())
            }
            Err(e) => {
                self.state = ClientState::Closed;
                Err(self.core.fail(e))
            }
        }
    }

    crate::machine::stream_methods!(ClientState, ClientEvent<W::Final>);

    /// No more input is accepted on the AKA stream (failed, or done and finished).
    pub fn is_closed(&self) -> bool {
        self.state == ClientState::Closed
    }
}

/// Events of the server (CN) side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerEvent {
    /// Look the subscriber up and call [`AkaServer::provide_vector`] (or
    /// [`AkaServer::reject`] with `unknown_subscriber`, `subscription_suspended`...).
    VectorNeeded {
        /// The claimed SUPI.
        supi: Supi,
        /// The serving network name to compute XRES* with.
        serving_network_name: String,
    },
    /// The USIM reported a synchronisation failure: verify AUTS against RAND (with
    /// `companion_crypto::aka::verify_auts`), reset SQN, then `provide_vector` with a fresh
    /// vector (or `reject` with `sync_failure` if AUTS does not verify).
    ResyncNeeded {
        /// The SUPI.
        supi: Supi,
        /// The serving network name.
        serving_network_name: String,
        /// RAND of the challenge the AUTS answers.
        rand: [u8; 16],
        /// AUTS.
        auts: [u8; 14],
    },
    /// RES* and the binding verified: call [`AkaServer::accept`] or [`AkaServer::reject`].
    Verified {
        /// The authenticated SUPI.
        supi: Supi,
    },
    /// The client sent `Error`.
    Failed(ErrorMsg),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ServerState {
    AwaitStart,
    AwaitVector,
    AwaitResponse,
    Verified,
    Done,
    Closed,
}

impl ServerState {
    fn name(self) -> &'static str {
        match self {
            ServerState::AwaitStart => "AwaitStart",
            ServerState::AwaitVector => "AwaitVector",
            ServerState::AwaitResponse => "AwaitResponse",
            ServerState::Verified => "Verified",
            ServerState::Done => "Done",
            ServerState::Closed => "Closed",
        }
    }
}

/// Server side of AKA: asks the caller for vectors, verifies RES* and the session binding.
#[derive(Debug)]
pub struct AkaServer<W: AkaWire> {
    pub(crate) core: Core<W, ServerEvent>,
    state: ServerState,
    exporter: [u8; 32],
    supi: Option<Supi>,
    snn: String,
    vector: Option<AuthVector>,
    resyncs: u8,
    result: Option<W::Final>,
}

impl<W: AkaWire> AkaServer<W> {
    /// Waits for the client's start message; `exporter` is this TLS session's exporter.
    pub fn new(exporter: [u8; 32], now: Instant, config: Config) -> Self {
        AkaServer {
            core: Core::new(now, config),
            state: ServerState::AwaitStart,
            exporter,
            supi: None,
            snn: String::new(),
            vector: None,
            resyncs: 0,
            result: None,
        }
    }

    /// The SUPI: claimed until `Verified`, authenticated after.
    pub fn supi(&self) -> Option<&Supi> {
        self.supi.as_ref()
    }

    /// Whether the session is authenticated and accepted.
    pub fn is_authenticated(&self) -> bool {
        self.state == ServerState::Done
    }

    /// What was sent with `accept`.
    pub fn result(&self) -> Option<&W::Final> {
        self.result.as_ref()
    }

    fn on_message(&mut self, _now: Instant, m: W) -> Result<(), ProtoError> {
        let got = m.msg_type();
        match (self.state, m.classify()) {
            (_, AkaMsg::Error(e)) => {
                self.state = ServerState::Closed;
                self.core.finish();
                self.core.event(ServerEvent::Failed(e));
            }
            (ServerState::AwaitStart, AkaMsg::Start(supi, snn)) => {
                check_snn(&snn)?;
                self.supi = Some(supi.clone());
                self.snn = snn.clone();
                self.state = ServerState::AwaitVector;
                self.core.event(ServerEvent::VectorNeeded {
                    supi,
                    serving_network_name: snn,
                });
            }
            (ServerState::AwaitResponse, AkaMsg::Response(r)) => {
                let v = self
                    .vector
                    .take()
                    .ok_or(ProtoError::InvalidState("no vector"))?;
                verify_response(&v, &r, &self.exporter)?;
                let supi = self
                    .supi
                    .clone()
                    .ok_or(ProtoError::InvalidState("no SUPI"))?;
                self.state = ServerState::Verified;
                self.core.event(ServerEvent::Verified { supi });
            }
            (ServerState::AwaitResponse, AkaMsg::Resync(r)) => {
                let v = self
                    .vector
                    .take()
                    .ok_or(ProtoError::InvalidState("no vector"))?;
                self.resyncs = self.resyncs.saturating_add(1);
                if self.resyncs > self.core.config.max_resyncs {
                    return Err(ProtoError::SyncFailure(
                        "too many resynchronisations".into(),
                    ));
                }
                let supi = self
                    .supi
                    .clone()
                    .ok_or(ProtoError::InvalidState("no SUPI"))?;
                self.state = ServerState::AwaitVector;
                self.core.event(ServerEvent::ResyncNeeded {
                    supi,
                    serving_network_name: self.snn.clone(),
                    rand: v.rand,
                    auts: r.auts,
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

    /// Sends the challenge of `v` (built for the SUPI and serving network name of the last
    /// `VectorNeeded`/`ResyncNeeded` event).
    pub fn provide_vector(&mut self, now: Instant, v: AuthVector) -> Result<(), ProtoError> {
        if self.state != ServerState::AwaitVector {
            return Err(ProtoError::InvalidState(
                "provide_vector() needs VectorNeeded or ResyncNeeded",
            ));
        }
        self.core.send(&W::challenge(Challenge {
            rand: v.rand,
            autn: v.autn,
        }))?;
        self.vector = Some(v);
        self.state = ServerState::AwaitResponse;
        self.core.touch(now);
        Ok(())
    }

    /// Completes AKA with the server's result (`AuthResult` or `AttachAccept`).
    pub fn accept(&mut self, result: W::Final) -> Result<(), ProtoError> {
        if self.state != ServerState::Verified {
            return Err(ProtoError::InvalidState("accept() needs Verified"));
        }
        self.core.send(&W::fin(result.clone()))?;
        self.result = Some(result);
        self.state = ServerState::Done;
        self.core.set_deadline(None);
        Ok(())
    }

    /// Ends the exchange with an error (unknown subscriber, expired, revoked, roaming...).
    pub fn reject(&mut self, e: ErrorMsg) -> Result<(), ProtoError> {
        self.state = ServerState::Closed;
        self.vector = None;
        self.core.abort(e)
    }

    crate::machine::stream_methods!(ServerState, ServerEvent);

    /// The AKA stream failed.
    pub fn is_closed(&self) -> bool {
        self.state == ServerState::Closed
    }
}

crate::machine::impl_sansio!(AkaClient<W>, ClientEvent<W::Final>, W: AkaWire);
crate::machine::impl_sansio!(AkaServer<W>, ServerEvent, W: AkaWire);
