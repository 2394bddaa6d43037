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
}

impl StreamDriver {
    /// Wraps a stream; writes that make no progress for `write_timeout` fail.
    pub fn new(send: quinn::SendStream, recv: quinn::RecvStream, write_timeout: Duration) -> Self {
        StreamDriver {
            send,
            recv,
            peer_finished: false,
            write_timeout,
        }
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
            let read = tokio::time::timeout_at(
                tokio::time::Instant::from_std(deadline),
                self.recv.read_chunk(READ_CHUNK, true),
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
                Ok(Ok(Some(chunk))) => m.handle_bytes(now, &chunk.bytes),
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
