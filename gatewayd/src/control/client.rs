//! The client side used by `gatewayctl`: one blocking exchange over the socket with a timeout.

use std::io::{BufRead, BufReader as StdBufReader, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::*;

/// Why `gatewayctl` could not get an answer.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The socket could not be connected to. (The I/O error is part of the message, not a
    /// `source`, so `{:#}` chains do not repeat it.)
    #[error("cannot reach gatewayd at {path}: {}{}", describe(.error), hint(.error))]
    Connect {
        /// The socket path.
        path: PathBuf,
        /// The operating system's error.
        error: std::io::Error,
    },
    /// The connection broke mid-request.
    #[error("connection to gatewayd at {path} failed: {}", describe(.error))]
    Io {
        /// The socket path.
        path: PathBuf,
        /// The operating system's error.
        error: std::io::Error,
    },
    /// The daemon's answer did not parse.
    #[error("gatewayd at {path} sent an invalid answer: {message}")]
    Protocol {
        /// The socket path.
        path: PathBuf,
        /// What was wrong with the answer.
        message: String,
    },
}

/// An I/O error's description without the "(os error N)" suffix.
pub(super) fn describe(e: &std::io::Error) -> String {
    let s = e.to_string();
    match s.find(" (os error") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

pub(super) fn hint(e: &std::io::Error) -> &'static str {
    match e.kind() {
        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
            " (is gatewayd running?)"
        }
        std::io::ErrorKind::PermissionDenied => {
            " (run as root or as a member of gatewayd's control group)"
        }
        _ => "",
    }
}

/// Sends one request and waits (at most `timeout`) for its response. Blocking.
pub fn call(socket: &Path, req: &Request, timeout: Duration) -> Result<Response, ClientError> {
    let stream =
        std::os::unix::net::UnixStream::connect(socket).map_err(|error| ClientError::Connect {
            path: socket.to_path_buf(),
            error,
        })?;
    let io = |error| ClientError::Io {
        path: socket.to_path_buf(),
        error,
    };
    stream.set_read_timeout(Some(timeout)).map_err(io)?;
    stream.set_write_timeout(Some(timeout)).map_err(io)?;
    let mut line = serde_json::to_vec(req).map_err(|e| ClientError::Protocol {
        path: socket.to_path_buf(),
        message: e.to_string(),
    })?;
    line.push(b'\n');
    (&stream).write_all(&line).map_err(io)?;
    let mut answer = String::new();
    StdBufReader::new(&stream)
        .read_line(&mut answer)
        .map_err(io)?;
    if answer.is_empty() {
        return Err(ClientError::Protocol {
            path: socket.to_path_buf(),
            message: "connection closed without an answer".into(),
        });
    }
    serde_json::from_str(&answer).map_err(|e| ClientError::Protocol {
        path: socket.to_path_buf(),
        message: e.to_string(),
    })
}
