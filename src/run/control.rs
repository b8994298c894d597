//! The control socket: one JSON request per line, one JSON answer per line.
//! Only root (or the user the daemon runs as) may connect; the kernel tells
//! us who is on the other end (SO_PEERCRED), so no password is involved.
//!
//! Request:  {"command": "status"}
//!           {"command": "volume.primary", "force": false}
//! Answer:   {"ok": true, "result": ...} or {"ok": false, "error": "..."}

use std::path::Path;

use serde::Deserialize;
use serde_json::json;
use smol::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use smol::net::unix::UnixStream;

/// The largest request line accepted.
const MAX_LINE: usize = 64 * 1024;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    pub command: String,
    #[serde(default)]
    pub force: bool,
    /// The node a command is about (`fence.confirm`).
    #[serde(default)]
    pub node: Option<String>,
    /// On or off (`standby`).
    #[serde(default)]
    pub on: Option<bool>,
}

/// What the daemon does with a request; the answer is the `result`.
pub trait Handler: Send + Sync + 'static {
    fn handle(
        &self,
        request: Request,
    ) -> impl std::future::Future<Output = Result<serde_json::Value, String>> + Send;
}

/// Counts a refused connection or request (the daemon's metrics).
pub type OnRefused = std::sync::Arc<dyn Fn() + Send + Sync>;

pub async fn listen<H: Handler>(
    path: &Path,
    handler: std::sync::Arc<H>,
    refused: OnRefused,
) -> std::io::Result<()> {
    let listener = crate::run::bind_private_socket(path)?;
    let me = rustix::process::geteuid();
    loop {
        let (stream, _) = listener.accept().await?;
        let allowed = {
            use std::os::fd::AsFd;
            crate::sys::cred::peer_uid(stream.as_fd())
                .map(|uid| uid == 0 || uid == me.as_raw())
                .unwrap_or(false)
        };
        if !allowed {
            refused();
            log::warn!("control: refused a connection from a user other than root");
            let mut s = stream;
            let _ = s
                .write_all(b"{\"ok\":false,\"error\":\"permission denied: the control socket is for root\"}\n")
                .await;
            continue;
        }
        let handler = handler.clone();
        let refused = refused.clone();
        crate::run::spawn(async move {
            serve(stream, handler, &*refused).await;
        })
        .detach();
    }
}

async fn serve<H: Handler>(
    stream: UnixStream,
    handler: std::sync::Arc<H>,
    refused: &(dyn Fn() + Send + Sync),
) {
    let mut input = BufReader::new(stream.clone()).take(MAX_LINE as u64 + 1);
    let mut output = stream;
    loop {
        let mut line = String::new();
        match input.read_line(&mut line).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let answer = if line.len() > MAX_LINE || !line.ends_with('\n') && line.len() >= MAX_LINE {
            refused();
            let _ = output
                .write_all(format!("{}\n", json!({"ok": false, "error": format!("request longer than {MAX_LINE} bytes")})).as_bytes())
                .await;
            return;
        } else {
            match serde_json::from_str::<Request>(line.trim()) {
                Err(e) => {
                    refused();
                    json!({"ok": false, "error": format!("malformed request: {e}; send one JSON object per line, e.g. {{\"command\":\"status\"}}")})
                }
                Ok(req) => match handler.handle(req).await {
                    Ok(result) => json!({"ok": true, "result": result}),
                    Err(error) => json!({"ok": false, "error": error}),
                },
            }
        };
        if output
            .write_all(format!("{answer}\n").as_bytes())
            .await
            .is_err()
        {
            return;
        }
        input.set_limit(MAX_LINE as u64 + 1);
    }
}

#[derive(Debug)]
pub enum ClientError {
    Connect {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    Io(std::io::Error),
    Refused(String),
    Garbled(String),
}

impl std::fmt::Display for ClientError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClientError::Connect { path, source } => write!(
                f,
                "cannot reach the hadb daemon at {}: {source}; is `hadb run` running (systemctl status hadb), and are you root?",
                path.display()
            ),
            ClientError::Io(e) => write!(f, "talking to the daemon failed: {e}"),
            ClientError::Refused(why) => write!(f, "{why}"),
            ClientError::Garbled(what) => {
                write!(f, "the daemon answered something unreadable: {what}")
            }
        }
    }
}

impl std::error::Error for ClientError {}

/// Sends one request, returns its result (the CLI's side).
pub fn call(path: &Path, request: serde_json::Value) -> Result<serde_json::Value, ClientError> {
    use std::io::{BufRead, Write};
    let mut stream =
        std::os::unix::net::UnixStream::connect(path).map_err(|source| ClientError::Connect {
            path: path.to_owned(),
            source,
        })?;
    stream
        .write_all(format!("{request}\n").as_bytes())
        .map_err(ClientError::Io)?;
    let mut line = String::new();
    std::io::BufReader::new(&stream)
        .read_line(&mut line)
        .map_err(ClientError::Io)?;
    let answer: serde_json::Value =
        serde_json::from_str(&line).map_err(|e| ClientError::Garbled(e.to_string()))?;
    if answer["ok"] == json!(true) {
        Ok(answer["result"].clone())
    } else {
        Err(ClientError::Refused(
            answer["error"].as_str().unwrap_or("refused").to_owned(),
        ))
    }
}
