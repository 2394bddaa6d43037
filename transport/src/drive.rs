//! Running a `companion-proto` sans-IO machine over one QUIC bidirectional stream.
//!
//! The machines take bytes and a clock and give back frames and events; [`StreamDriver`] moves
//! those frames to a [`quinn::SendStream`], feeds what arrives on the [`quinn::RecvStream`], and
//! turns the machine's deadline into a real timeout. Used by the client drivers in this crate and
//! by `cn-backend`'s server.

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
    /// The peer was silent past the machine's deadline (a `timeout` error was sent).
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

/// One bidirectional stream carrying one conversation's machine.
#[derive(Debug)]
pub struct StreamDriver {
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    peer_finished: bool,
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

    /// Writes every frame the machine has queued.
    pub async fn flush<M: SansIo + ?Sized>(&mut self, m: &mut M) -> Result<(), DriveError> {
        while let Some(frame) = m.poll_transmit() {
            match tokio::time::timeout(self.write_timeout, self.send.write_all(&frame)).await {
                Ok(r) => r?,
                Err(_) => return Err(DriveError::Timeout("peer does not read".into())),
            }
        }
        Ok(())
    }

    /// Flushes, then reads until the machine reports an event, and returns it. A protocol
    /// error is sent to the peer (the machine queued the `Error` frame) before it is returned.
    pub async fn next_event<M: SansIo + ?Sized>(
        &mut self,
        m: &mut M,
    ) -> Result<M::Event, DriveError> {
        loop {
            self.flush(m).await?;
            if let Some(ev) = m.poll_event() {
                return Ok(ev);
            }
            if self.peer_finished {
                return Err(DriveError::Ended);
            }
            let deadline = m
                .poll_timeout()
                .unwrap_or_else(|| Instant::now() + FALLBACK_TIMEOUT);
            let chunk_max = match self.read_budget {
                // One byte past what is left, to tell "exactly at the budget" from "over it"
                // (and still see the end of the stream when nothing is left).
                Some((_, left)) => usize::try_from(left.saturating_add(1))
                    .unwrap_or(READ_CHUNK)
                    .min(READ_CHUNK),
                None => READ_CHUNK,
            };
            let read = tokio::time::timeout_at(
                tokio::time::Instant::from_std(deadline),
                self.recv.read_chunk(chunk_max, true),
            )
            .await;
            let now = Instant::now();
            let step = match read {
                Err(_) => match m.handle_timeout(now) {
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
                Ok(Ok(Some(chunk))) => {
                    if let Some((budget, left)) = &mut self.read_budget {
                        let n = u64::try_from(chunk.bytes.len()).unwrap_or(u64::MAX);
                        if n > *left {
                            *left = 0;
                            return Err(DriveError::OverBudget { budget: *budget });
                        }
                        *left -= n;
                    }
                    m.handle_bytes(now, &chunk.bytes)
                }
                Ok(Ok(None)) => {
                    self.peer_finished = true;
                    m.handle_end_of_stream()
                }
                Ok(Err(e)) => return Err(e.into()),
            };
            if let Err(e) = step {
                // Deliver the Error frame the machine queued, if the stream still works.
                let _ = self.flush(m).await;
                self.finish();
                return Err(e.into());
            }
        }
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
    /// close right after does not lose the last frames.
    pub async fn wait_delivered(&mut self, wait: Duration) {
        let _ = tokio::time::timeout(wait, self.send.stopped()).await;
    }

    /// Resets both directions with application code `code` (abandon the exchange).
    pub fn abort(&mut self, code: u32) {
        let _ = self.send.reset(code.into());
        let _ = self.recv.stop(code.into());
    }
}
