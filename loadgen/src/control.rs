//! A minimal client of gatewayd's control socket (JSON lines, see `gatewayd::control`): status
//! and bulk pairing. One request line, one response line; a connection carries many in turn.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};

/// One connection to the control socket.
#[derive(Debug)]
pub struct Control {
    path: PathBuf,
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
}

impl Control {
    /// Connects to gatewayd's control socket at `path`.
    pub async fn connect(path: &Path) -> anyhow::Result<Self> {
        let s = UnixStream::connect(path).await.with_context(|| {
            format!(
                "cannot connect to gatewayd's control socket {} (is gatewayd running? is \
                 [control] socket / --control-socket right? are you allowed to use it?)",
                path.display()
            )
        })?;
        let (r, w) = s.into_split();
        Ok(Self {
            path: path.to_path_buf(),
            reader: BufReader::new(r),
            writer: w,
        })
    }

    /// Sends one request and reads its response.
    pub async fn call(&mut self, req: &Value) -> anyhow::Result<Value> {
        let mut line = serde_json::to_vec(req).context("encoding a control request")?;
        line.push(b'\n');
        self.writer
            .write_all(&line)
            .await
            .with_context(|| format!("writing to {}", self.path.display()))?;
        let mut answer = String::new();
        let n = tokio::time::timeout(Duration::from_secs(30), self.reader.read_line(&mut answer))
            .await
            .map_err(|_| {
                anyhow!(
                    "gatewayd did not answer on {} within 30 s",
                    self.path.display()
                )
            })?
            .with_context(|| format!("reading from {}", self.path.display()))?;
        if n == 0 {
            bail!(
                "gatewayd closed the control connection {}",
                self.path.display()
            );
        }
        serde_json::from_str(&answer).context("gatewayd's control answer is not JSON")
    }

    /// `gatewayctl status --json`'s object.
    pub async fn status(&mut self) -> anyhow::Result<Value> {
        let v = self.call(&json!({"op": "status"})).await?;
        match v["result"].as_str() {
            Some("status") => Ok(v["status"].clone()),
            _ => Err(control_error(&v)),
        }
    }

    /// Pairs a device by its pairing code; `Ok(new)` (false: it was already paired).
    pub async fn pair(&mut self, code: &str, label: &str) -> anyhow::Result<bool> {
        let v = self
            .call(&json!({"op": "pair", "code": code, "label": label}))
            .await?;
        match v["result"].as_str() {
            Some("paired") => Ok(v["new"].as_bool().unwrap_or(true)),
            _ => Err(control_error(&v)),
        }
    }

    /// Waits until gatewayd's link to the CN is up; returns the status.
    pub async fn wait_cn_up(&mut self, limit: Duration) -> anyhow::Result<Value> {
        let until = Instant::now() + limit;
        loop {
            let st = self.status().await?;
            if st["cn_link"] == "up" {
                return Ok(st);
            }
            if Instant::now() >= until {
                bail!(
                    "gatewayd's link to the CN is {} after {} s: check that cn-backend runs and \
                     gatewayd's [cn] settings (`gatewayctl status`)",
                    st["cn_link"],
                    limit.as_secs()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

fn control_error(v: &Value) -> anyhow::Error {
    match v["result"].as_str() {
        Some("error") => anyhow!(
            "gatewayd refused ({}): {}",
            v["kind"].as_str().unwrap_or("?"),
            v["message"].as_str().unwrap_or("")
        ),
        _ => anyhow!("unexpected control answer: {v}"),
    }
}
