//! The server: the socket (created 0660 with the control group), one task per connection, one JSON
//! line in and one out per exchange.

use std::future::Future;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use super::*;

/// Why the control socket could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ControlServerError {
    /// The configured control group does not exist or cannot be read.
    #[error("control group {name:?}: {reason}")]
    Group {
        /// The configured group.
        name: String,
        /// Why it cannot be used.
        reason: String,
    },
    /// The socket could not be created or its permissions set.
    #[error("control socket {path}: {source}")]
    Io {
        /// The socket path.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// Another process answers on the socket.
    #[error("control socket {0} is in use: another gatewayd is running")]
    InUse(PathBuf),
    /// The path exists and is something else.
    #[error("{0} exists and is not a socket; remove it or change [control] socket")]
    NotASocket(PathBuf),
}

/// The listening control socket. Dropping it removes the socket file.
#[derive(Debug)]
pub struct ControlServer {
    listener: UnixListener,
    path: PathBuf,
    access: Arc<AccessPolicy>,
}

impl ControlServer {
    /// Binds `path` (creating its directory), mode 0660, group `access.group`. A stale socket
    /// left by a crashed daemon is replaced; a live one is an error. Must run inside a tokio
    /// runtime.
    pub fn bind(path: &Path, access: AccessPolicy) -> Result<Self, ControlServerError> {
        let io = |source| ControlServerError::Io {
            path: path.to_path_buf(),
            source,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| ControlServerError::Io {
                path: dir.to_path_buf(),
                source,
            })?;
        }
        match std::fs::symlink_metadata(path) {
            Ok(m) if m.file_type().is_socket() => {
                if std::os::unix::net::UnixStream::connect(path).is_ok() {
                    return Err(ControlServerError::InUse(path.to_path_buf()));
                }
                std::fs::remove_file(path).map_err(io)?;
            }
            Ok(_) => return Err(ControlServerError::NotASocket(path.to_path_buf())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(e)),
        }
        let listener = UnixListener::bind(path).map_err(io)?;
        // From here on the file is ours: remove it again if setup fails.
        let server = Self {
            listener,
            path: path.to_path_buf(),
            access: Arc::new(access),
        };
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660)).map_err(io)?;
        if let Some(g) = &server.access.group {
            std::os::unix::fs::chown(path, None, Some(g.gid)).map_err(io)?;
        }
        Ok(server)
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Accepts connections until `shutdown` completes; each runs on its own task.
    pub async fn serve<H: ControlHandler>(
        self,
        handler: Arc<H>,
        shutdown: impl Future<Output = ()>,
    ) {
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                accepted = self.listener.accept() => {
                    let Ok((stream, _)) = accepted else {
                        // EMFILE and friends: back off briefly instead of spinning.
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    };
                    let handler = handler.clone();
                    let access = self.access.clone();
                    tokio::spawn(async move {
                        let _ = serve_connection(stream, &*handler, &access).await;
                    });
                }
            }
        }
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

pub(super) async fn write_response(
    stream: &mut (impl AsyncWriteExt + Unpin),
    r: &Response,
) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(r).map_err(std::io::Error::other)?;
    line.push(b'\n');
    stream.write_all(&line).await?;
    stream.flush().await
}

pub(super) async fn serve_connection<H: ControlHandler>(
    stream: UnixStream,
    handler: &H,
    access: &AccessPolicy,
) -> std::io::Result<()> {
    let cred = stream.peer_cred()?;
    let peer = Peer {
        uid: cred.uid(),
        gid: cred.gid(),
        pid: cred.pid(),
    };
    let (read, mut write) = stream.into_split();
    if let Err(e) = access.check(&peer) {
        return write_response(&mut write, &e.into()).await;
    }
    let mut reader = BufReader::new(read);
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = match tokio::time::timeout(
            IDLE_TIMEOUT,
            (&mut reader)
                .take(MAX_LINE as u64 + 1)
                .read_until(b'\n', &mut line),
        )
        .await
        {
            Ok(r) => r?,
            Err(_) => return Ok(()),
        };
        if n == 0 {
            return Ok(());
        }
        if line.last() != Some(&b'\n') {
            let e = ControlError::new(
                ErrorKind::BadRequest,
                format!("request longer than {MAX_LINE} bytes or not newline-terminated"),
            );
            return write_response(&mut write, &e.into()).await;
        }
        let response = match serde_json::from_slice::<Request>(&line) {
            Ok(req) => dispatch(handler, req).await,
            Err(e) => {
                ControlError::new(ErrorKind::BadRequest, format!("invalid request: {e}")).into()
            }
        };
        write_response(&mut write, &response).await?;
    }
}
