//! The admin socket: a Unix socket in the data directory (`admin.sock`, mode 0600) through
//! which `fieldsync admin …` reaches a running server, so a change (a revoked device) takes
//! effect at once. sled admits one process per directory; without a server the CLI opens the
//! store itself and runs the same commands. One JSON request line, one JSON answer line.
//! Must not accept anything but admin commands, nor outlive the server.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{AccountsError, AdminCommand};

/// Runs one admin command for the socket, with the operator's name: the server decides
/// which layer answers it (account commands go to the directory, a backup to `backup`).
pub type Runner = std::sync::Arc<
    dyn Fn(
            AdminCommand,
            String,
        ) -> std::pin::Pin<
            Box<dyn std::future::Future<Output = Result<String, crate::Error>> + Send>,
        > + Send
        + Sync,
>;

/// The socket's file name inside the data directory.
pub const SOCKET_FILE: &str = "admin.sock";

/// Longest request line accepted.
const MAX_REQUEST_BYTES: u64 = 64 * 1024;

#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct Request {
    operator: String,
    command: AdminCommand,
}

#[derive(Debug, serde::Serialize, serde::Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
enum Response {
    Ok { output: String },
    Error { message: String },
}

pub fn socket_path(data_dir: &Path) -> PathBuf {
    data_dir.join(SOCKET_FILE)
}

/// Binds the admin socket. The caller holds the data directory's store (so no other server
/// can be using a leftover socket file, which is removed).
pub fn bind(data_dir: &Path) -> std::io::Result<UnixListener> {
    let path = socket_path(data_dir);
    match std::fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = UnixListener::bind(&path)?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Serves admin requests until `cancel`, then removes the socket file.
pub async fn serve(
    listener: UnixListener,
    data_dir: PathBuf,
    run: Runner,
    cancel: CancellationToken,
) {
    let tasks = TaskTracker::new();
    loop {
        let accepted = tokio::select! {
            _ = cancel.cancelled() => break,
            a = listener.accept() => a,
        };
        let stream = match accepted {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::warn!(error = %e, "admin socket accept failed");
                continue;
            }
        };
        let run = run.clone();
        tasks.spawn(async move {
            if let Err(e) = handle(stream, run).await {
                tracing::warn!(error = %e, "admin socket request failed");
            }
        });
    }
    tasks.close();
    let _ = tokio::time::timeout(Duration::from_secs(5), tasks.wait()).await;
    let _ = std::fs::remove_file(socket_path(&data_dir));
}

async fn handle(stream: UnixStream, run: Runner) -> std::io::Result<()> {
    let uid = stream.peer_cred().map(|c| c.uid()).ok();
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    BufReader::new(read.take(MAX_REQUEST_BYTES))
        .read_line(&mut line)
        .await?;
    let response = match serde_json::from_str::<Request>(&line) {
        Ok(req) => {
            let operator = match uid {
                Some(uid) => format!("{} (uid {uid})", req.operator),
                None => req.operator,
            };
            let span = tracing::info_span!("admin", operator = %operator);
            match tracing::Instrument::instrument(run(req.command, operator.clone()), span).await {
                Ok(output) => Response::Ok { output },
                Err(e) => Response::Error {
                    message: e.to_string(),
                },
            }
        }
        Err(e) => Response::Error {
            message: format!("not an admin request: {e}"),
        },
    };
    let mut out = serde_json::to_vec(&response).expect("responses serialise");
    out.push(b'\n');
    write.write_all(&out).await?;
    write.shutdown().await
}

/// What the CLI got from a running server.
pub enum Reached {
    /// No server is listening on this data directory.
    NoServer,
    Answer(Result<String, AccountsError>),
}

/// Sends one command to the server of `data_dir`, if one is running.
pub async fn call(
    data_dir: &Path,
    operator: &str,
    command: AdminCommand,
) -> std::io::Result<Reached> {
    let stream = match UnixStream::connect(socket_path(data_dir)).await {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(Reached::NoServer)
        }
        Err(e) => return Err(e),
    };
    let (read, mut write) = stream.into_split();
    let mut req = serde_json::to_vec(&Request {
        operator: operator.to_string(),
        command,
    })
    .expect("requests serialise");
    req.push(b'\n');
    write.write_all(&req).await?;
    let mut line = String::new();
    BufReader::new(read).read_line(&mut line).await?;
    match serde_json::from_str::<Response>(&line) {
        Ok(Response::Ok { output }) => Ok(Reached::Answer(Ok(output))),
        Ok(Response::Error { message }) => {
            Ok(Reached::Answer(Err(AccountsError::Invalid(message))))
        }
        Err(e) => Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("the server's answer is unreadable: {e}"),
        )),
    }
}
