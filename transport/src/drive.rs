//! Running a `companion-proto` sans-IO machine over one QUIC bidirectional stream.
//!
//! The machines take bytes and a clock and give back frames and events; [`StreamDriver`] moves
//! those frames to a [`quinn::SendStream`], feeds what arrives on the [`quinn::RecvStream`], and
//! turns the machine's deadline into a real timeout. Every stream loop of the project runs
//! through it: the CN client in this crate and `cn-backend`'s server with
//! [`StreamDriver::next_event`]; gatewayd's device server and `iotdev`'s client with
//! [`StreamDriver::next`], which also waits on outside work (the CN's answer to a device's
//! request), wakes its caller at a chosen time (the next `Pending` keep-alive, or a give-up
//! time) and stops at the end of the conversation.

use std::future::Future;
use std::time::{Duration, Instant};

use companion_proto::ProtoError;

/// Largest chunk read from a stream at once.
const READ_CHUNK: usize = 64 * 1024;

/// Used when a machine has no deadline of its own but the driver must still wait for the peer.
pub const FALLBACK_TIMEOUT: Duration = Duration::from_secs(30);

pub use companion_proto::SansIo;

/// Why driving a stream failed.
#[derive(Debug, thiserror::Error)]
pub enum DriveError {
    /// The machine rejected what the peer sent (an `Error` frame was sent to the peer).
    #[error("protocol: {0}")]
    Proto(#[from] ProtoError),
    /// The peer was silent past the machine's deadline (a `timeout` error was sent), or did
    /// not read what was written for the write timeout.
    #[error("the peer did not answer in time ({0})")]
    Timeout(String),
    /// Writing to the stream failed (connection lost, stream reset by the peer).
    #[error("sending failed: {0}")]
    Write(#[from] quinn::WriteError),
    /// Reading from the stream failed (connection lost, stream reset by the peer).
    #[error("receiving failed: {0}")]
    Read(#[from] quinn::ReadError),
    /// The stream ended in a terminal state without the event the caller waited for.
    #[error("the stream ended without an answer")]
    Ended,
    /// The peer sent more bytes on this stream than its read budget allows
    /// ([`StreamDriver::set_read_budget`]); nothing past the budget was read.
    #[error("the peer sent more than {budget} bytes on this stream")]
    OverBudget {
        /// The budget, bytes.
        budget: u64,
    },
}

impl DriveError {
    /// The failure came from the connection, not from this stream's content.
    pub fn is_transport(&self) -> bool {
        matches!(self, DriveError::Write(_) | DriveError::Read(_))
    }
}

/// What [`StreamDriver::next`] stopped for.
#[derive(Debug, PartialEq, Eq)]
pub enum Step<E, O> {
    /// The machine reported an event.
    Event(E),
    /// The outside work finished with this output (the driver has cleared it).
    Done(O),
    /// The wake-up time passed (send a keep-alive, or give up).
    Wake,
    /// The machine's conversation is over: everything it queued was written and the sending
    /// side is finished.
    Closed,
}

/// What one call of [`StreamDriver::run`] waits for besides the machine's events, and in which
/// order it hands them over.
struct Until<'a, M: ?Sized, W> {
    /// Whether the conversation is over (the driver then stops reading).
    closed: &'a (dyn Fn(&M) -> bool + Sync),
    /// Outside work the caller waits on, cleared when it finishes.
    work: &'a mut Option<W>,
    /// When to wake the caller.
    wake_at: Option<Instant>,
    /// Hand an event over before writing the frames queued with it.
    events_first: bool,
}

/// What woke the wait for input.
enum Input<O> {
    Read(Result<Option<quinn::Chunk>, quinn::ReadError>),
    Done(O),
    Wake,
    Deadline,
}

/// One bidirectional stream carrying one conversation's machine.
#[derive(Debug)]
pub struct StreamDriver {
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    peer_finished: bool,
    write_failed: bool,
    write_timeout: Duration,
    /// Most bytes that may still be read from the peer, if limited.
    read_budget: Option<(u64, u64)>,
}

impl StreamDriver {
    /// Wraps a stream; writes that make no progress for `write_timeout` fail.
    pub fn new(send: quinn::SendStream, recv: quinn::RecvStream, write_timeout: Duration) -> Self {
        StreamDriver {
            send,
            recv,
            peer_finished: false,
            write_failed: false,
            write_timeout,
            read_budget: None,
        }
    }

    /// Limits the bytes read from the peer from now on to `budget` (`None`: unlimited). Past
    /// it, [`StreamDriver::next_event`] fails with [`DriveError::OverBudget`] without reading
    /// further, so a peer cannot make the machine buffer a large frame: a server sets a small
    /// budget while the peer is unauthenticated (AKA messages are tiny) and lifts it after.
    pub fn set_read_budget(&mut self, budget: Option<u64>) {
        self.read_budget = budget.map(|b| (b, b));
    }

    /// The peer has finished its sending side (a [`DriveError::Proto`] returned after this
    /// came from the end of the stream, not from bytes the peer sent).
    pub fn peer_finished(&self) -> bool {
        self.peer_finished
    }

    /// Writes every frame the machine has queued.
    pub async fn flush<M: SansIo + ?Sized>(&mut self, m: &mut M) -> Result<(), DriveError> {
        while let Some(frame) = m.poll_transmit() {
            let r =
                match tokio::time::timeout(self.write_timeout, self.send.write_all(&frame)).await {
                    Ok(r) => r.map_err(DriveError::from),
                    Err(_) => Err(DriveError::Timeout("peer does not read".into())),
                };
            if r.is_err() {
                self.write_failed = true;
            }
            r?;
        }
        Ok(())
    }

    /// Flushes, then reads until the machine reports an event, and returns it. A protocol
    /// error is sent to the peer (the machine queued the `Error` frame) before it is returned.
    pub async fn next_event<M: SansIo + ?Sized>(
        &mut self,
        m: &mut M,
    ) -> Result<M::Event, DriveError> {
        let mut no_work: Option<std::future::Pending<std::convert::Infallible>> = None;
        let until = Until {
            closed: &|_| false,
            work: &mut no_work,
            wake_at: None,
            events_first: false,
        };
        match self.run(m, until).await? {
            Step::Event(ev) => Ok(ev),
            Step::Done(never) => match never {},
            // Neither can happen without a wake-up time and a conversation end.
            Step::Wake | Step::Closed => Err(DriveError::Ended),
        }
    }

    /// Like [`StreamDriver::next_event`], and also returns when the outside `work` finishes
    /// (the driver then clears it), when `wake_at` passes, or when `closed` says the
    /// conversation is over (after its last frames are written and the sending side is
    /// finished; pass the machine's own `is_closed`). The machine's deadline is handled as in
    /// `next_event`: while `work` runs, the caller keeps the peer waiting with keep-alives sent
    /// at `wake_at` (`Pending` moves both sides' deadlines). When several are ready at once,
    /// input from the peer comes first, then the work, then the wake-up, then the machine's
    /// deadline. Unlike `next_event`, an event is handed over before the frames the machine
    /// queued with it are written (they go at the next call), so the caller acts on it first:
    /// gatewayd records a device's acknowledgement before the confirmation leaves.
    pub async fn next<M, W>(
        &mut self,
        m: &mut M,
        closed: impl Fn(&M) -> bool + Sync,
        work: &mut Option<W>,
        wake_at: Option<Instant>,
    ) -> Result<Step<M::Event, W::Output>, DriveError>
    where
        M: SansIo + ?Sized,
        W: Future + Unpin,
    {
        let until = Until {
            closed: &closed,
            work,
            wake_at,
            events_first: true,
        };
        self.run(m, until).await
    }

    /// The one loop behind [`StreamDriver::next_event`] and [`StreamDriver::next`].
    async fn run<M: SansIo + ?Sized, W: Future + Unpin>(
        &mut self,
        m: &mut M,
        until: Until<'_, M, W>,
    ) -> Result<Step<M::Event, W::Output>, DriveError> {
        let Until {
            closed,
            work,
            wake_at,
            events_first,
        } = until;
        loop {
            if events_first && let Some(ev) = m.poll_event() {
                return Ok(Step::Event(ev));
            }
            self.flush(m).await?;
            if let Some(ev) = m.poll_event() {
                return Ok(Step::Event(ev));
            }
            if closed(m) {
                self.finish();
                return Ok(Step::Closed);
            }
            if self.peer_finished {
                return Err(DriveError::Ended);
            }
            let deadline = m
                .poll_timeout()
                .unwrap_or_else(|| Instant::now() + FALLBACK_TIMEOUT);
            let chunk_max = self.chunk_max();
            let input = tokio::select! {
                biased;
                read = self.recv.read_chunk(chunk_max, true) => Input::Read(read),
                out = async {
                    match work.as_mut() {
                        Some(w) => w.await,
                        None => std::future::pending().await,
                    }
                } => Input::Done(out),
                () = sleep_opt(wake_at) => Input::Wake,
                () = tokio::time::sleep_until(deadline.into()) => Input::Deadline,
            };
            let now = Instant::now();
            let step = match input {
                Input::Done(out) => {
                    *work = None;
                    return Ok(Step::Done(out));
                }
                Input::Wake => return Ok(Step::Wake),
                Input::Deadline => match m.handle_timeout(now) {
                    Ok(()) if m.poll_timeout().is_some_and(|d| d > now) => Ok(()),
                    Ok(()) => {
                        // The machine had no deadline of its own: the fallback expired.
                        return Err(DriveError::Timeout("no answer".into()));
                    }
                    Err(ProtoError::Timeout(state)) => {
                        let _ = self.flush(m).await;
                        self.finish();
                        return Err(DriveError::Timeout(format!("waiting in state {state}")));
                    }
                    Err(e) => Err(e),
                },
                Input::Read(Ok(Some(chunk))) => {
                    self.charge(chunk.bytes.len())?;
                    m.handle_bytes(now, &chunk.bytes)
                }
                Input::Read(Ok(None)) => {
                    self.peer_finished = true;
                    m.handle_end_of_stream()
                }
                Input::Read(Err(e)) => return Err(e.into()),
            };
            if let Err(e) = step {
                // Deliver the Error frame the machine queued, if the stream still works.
                let _ = self.flush(m).await;
                self.finish();
                return Err(e.into());
            }
        }
    }

    /// Most bytes the next read may take: one byte past what is left of the budget, to tell
    /// "exactly at the budget" from "over it" (and still see the end of the stream when
    /// nothing is left).
    fn chunk_max(&self) -> usize {
        match self.read_budget {
            Some((_, left)) => usize::try_from(left.saturating_add(1))
                .unwrap_or(READ_CHUNK)
                .min(READ_CHUNK),
            None => READ_CHUNK,
        }
    }

    /// Takes `n` bytes just read from the budget, if there is one.
    fn charge(&mut self, n: usize) -> Result<(), DriveError> {
        if let Some((budget, left)) = &mut self.read_budget {
            let n = u64::try_from(n).unwrap_or(u64::MAX);
            if n > *left {
                *left = 0;
                return Err(DriveError::OverBudget { budget: *budget });
            }
            *left -= n;
        }
        Ok(())
    }

    /// Finishes the sending side (nothing more will be written).
    pub fn finish(&mut self) {
        // Already finished or reset: nothing to do.
        let _ = self.send.finish();
    }

    /// Flushes the machine's frames, then finishes the sending side.
    pub async fn flush_and_finish<M: SansIo + ?Sized>(
        &mut self,
        m: &mut M,
    ) -> Result<(), DriveError> {
        let r = self.flush(m).await;
        self.finish();
        r
    }

    /// Waits (bounded by `wait`) until the peer has received everything sent, so a connection
    /// close right after does not lose the last frames. Returns at once if a write failed
    /// (nothing more will be delivered).
    pub async fn wait_delivered(&mut self, wait: Duration) {
        if self.write_failed {
            return;
        }
        let _ = tokio::time::timeout(wait, self.send.stopped()).await;
    }

    /// Resets both directions with application code `code` (abandon the exchange).
    pub fn abort(&mut self, code: u32) {
        let _ = self.send.reset(code.into());
        let _ = self.recv.stop(code.into());
    }
}

/// Sleeps until `at`, or forever without it.
async fn sleep_opt(at: Option<Instant>) {
    match at {
        Some(t) => tokio::time::sleep_until(t.into()).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests;
