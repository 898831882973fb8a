//! One sync session of a device: connect, join, offer every document, answer until each is
//! settled, persist sync states, leave.
//!
//! A document is *settled* when the server reported it unavailable, or when the server's
//! heads equal ours and neither side has anything more to send. Because the server answers
//! only after its copy is flushed, settled-with-equal-heads means **held by the server**.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use automerge::sync::{self, SyncDoc};
use automerge::{Automerge, ChangeHash};
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message as WsMessage;

use super::{
    encode_heads, held_key, load_doc, ClientError, Device, Result, META_SERVER_STORAGE_ID,
};
use crate::ids::{DocumentId, PeerId};
use crate::protocol::{codec, DocMessage, Join, Message, PeerMetadata, PROTOCOL_V1};

/// Frames larger than this from the server are refused.
const MAX_FRAME: usize = 64 * 1024 * 1024;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DocSyncOutcome {
    /// The server holds every local change; heads are equal on both sides.
    Held,
    /// The server does not have (or will not show) this document.
    Unavailable,
    /// The session ended before this document settled.
    Pending,
}

#[derive(Clone, Debug)]
pub struct DocReport {
    pub outcome: DocSyncOutcome,
    pub heads: Vec<ChangeHash>,
    /// Bytes of document messages (`request`/`sync`/`doc-unavailable` frames) both ways.
    pub bytes: usize,
    /// Whether this session brought changes from the server.
    pub received_changes: bool,
}

#[derive(Clone, Debug, Default)]
pub struct SyncReport {
    pub docs: HashMap<DocumentId, DocReport>,
    /// All frames, both ways, including the handshake.
    pub bytes_sent: usize,
    pub bytes_received: usize,
}

impl SyncReport {
    /// True when every document the device has is held by the server.
    pub fn all_held(&self) -> bool {
        self.docs.values().all(|d| {
            d.outcome == DocSyncOutcome::Held
                || (d.outcome == DocSyncOutcome::Unavailable && d.heads.is_empty())
        })
    }
}

struct DocSession {
    doc: Automerge,
    state: sync::State,
    report: DocReport,
    settled: bool,
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

pub(super) async fn run(
    device: &Device,
    url: &str,
    token: Option<&str>,
    ids: Vec<DocumentId>,
) -> Result<SyncReport> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    use tokio_tungstenite::tungstenite::Error as WsError;
    let deadline = Instant::now() + device.sync_timeout;
    let connect_error = |reason: String| ClientError::Connect {
        url: redact(url),
        reason,
    };
    let mut request = url
        .into_client_request()
        .map_err(|e| connect_error(e.to_string()))?;
    if let Some(token) = token {
        let value = format!("Bearer {token}")
            .parse()
            .map_err(|_| connect_error("the stored token is not a valid header value".into()))?;
        request.headers_mut().insert("authorization", value);
    }
    let (mut ws, _) = tokio::time::timeout(
        device.sync_timeout,
        tokio_tungstenite::connect_async(request),
    )
    .await
    .map_err(|_| ClientError::Timeout(device.sync_timeout))?
    .map_err(|e| match e {
        WsError::Http(resp) => {
            let raw = resp
                .body()
                .as_ref()
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .unwrap_or_default();
            let json = serde_json::from_str(&raw).unwrap_or(serde_json::Value::Null);
            ClientError::Refused {
                status: resp.status().as_u16(),
                message: super::error_message(&json, &raw),
            }
        }
        other => connect_error(other.to_string()),
    })?;
    let mut report = SyncReport::default();
    let me = device.peer_id();
    send(
        &mut ws,
        &mut report,
        &Message::Join(Join {
            sender_id: me.clone(),
            peer_metadata: PeerMetadata {
                storage_id: Some(device.storage_id.clone()),
                is_ephemeral: false,
            },
            supported_protocol_versions: vec![PROTOCOL_V1.into()],
        }),
    )
    .await?;
    let (server, server_storage) = loop {
        match recv(&mut ws, &mut report, deadline, device.sync_timeout).await? {
            Message::Peer(p) => {
                break (p.sender_id, p.peer_metadata.storage_id);
            }
            Message::Error(e) => return Err(ClientError::Server(e.message)),
            _ => continue,
        }
    };

    // Load every document and send the opening message.
    let store = device.store().clone();
    let storage_for_states = server_storage.clone();
    let mut sessions: HashMap<DocumentId, DocSession> =
        tokio::task::spawn_blocking(move || -> Result<_> {
            let mut out = HashMap::new();
            for id in ids {
                let doc = load_doc(&store, id)?;
                let state = storage_for_states
                    .as_ref()
                    .and_then(|s| store.sync_state_blocking(id, s).ok().flatten())
                    .and_then(|b| sync::State::decode(&b).ok())
                    .unwrap_or_default();
                out.insert(
                    id,
                    DocSession {
                        report: DocReport {
                            outcome: DocSyncOutcome::Pending,
                            heads: doc.get_heads(),
                            bytes: 0,
                            received_changes: false,
                        },
                        doc,
                        state,
                        settled: false,
                    },
                );
            }
            Ok(out)
        })
        .await
        .map_err(|e| ClientError::Connection(e.to_string()))??;

    for (id, s) in sessions.iter_mut() {
        let empty = s.doc.get_heads().is_empty();
        if let Some(m) = s.doc.generate_sync_message(&mut s.state) {
            let dm = DocMessage {
                sender_id: me.clone(),
                target_id: server.clone(),
                document_id: *id,
                data: m.encode(),
            };
            let msg = if empty {
                Message::Request(dm)
            } else {
                Message::Sync(dm)
            };
            s.report.bytes += send(&mut ws, &mut report, &msg).await?;
        }
    }

    let outcome = exchange(
        device,
        &mut ws,
        &mut report,
        &mut sessions,
        &me,
        &server,
        deadline,
    )
    .await;

    // Persist what was learnt, whatever the outcome.
    let store = device.store().clone();
    let server_storage_for_save = server_storage.clone();
    let mut docs_report = HashMap::new();
    let mut to_save = Vec::new();
    for (id, s) in sessions {
        if s.report.outcome == DocSyncOutcome::Held {
            to_save.push((id, Some(encode_heads(&s.report.heads)), s.state.encode()));
        } else {
            to_save.push((id, None, s.state.encode()));
        }
        docs_report.insert(id, s.report);
    }
    tokio::task::spawn_blocking(move || -> Result<()> {
        if let Some(ss) = &server_storage_for_save {
            store.meta_put_blocking(META_SERVER_STORAGE_ID, ss.as_str().as_bytes())?;
        }
        for (id, held, state) in to_save {
            if let Some(ss) = &server_storage_for_save {
                store.put_sync_state_blocking(id, ss, &state)?;
            }
            if let Some(h) = held {
                store.meta_put_blocking(&held_key(id), &h)?;
            }
        }
        Ok(())
    })
    .await
    .map_err(|e| ClientError::Connection(e.to_string()))??;
    device.store().flush().await?;
    report.docs = docs_report;

    if outcome.is_ok() {
        let _ = send(&mut ws, &mut report, &Message::Leave { sender_id: me }).await;
        let _ = ws.close(None).await;
    }
    outcome.map(|_| report)
}

async fn exchange(
    device: &Device,
    ws: &mut Socket,
    report: &mut SyncReport,
    sessions: &mut HashMap<DocumentId, DocSession>,
    me: &PeerId,
    server: &PeerId,
    deadline: Instant,
) -> Result<()> {
    while sessions.values().any(|s| !s.settled) {
        let (msg, size) = recv_sized(ws, report, deadline, device.sync_timeout).await?;
        match msg {
            Message::Sync(m) | Message::Request(m) => {
                let Some(s) = sessions.get_mut(&m.document_id) else {
                    continue; // a document we did not ask about: ignore
                };
                s.report.bytes += size;
                let message = sync::Message::decode(&m.data)
                    .map_err(|e| ClientError::Protocol(format!("bad sync data: {e}")))?;
                let before = s.doc.get_heads();
                s.doc.receive_sync_message(&mut s.state, message)?;
                if s.doc.get_heads() != before {
                    s.report.received_changes = true;
                    let chunk = s.doc.save_after(&before);
                    let store = device.store().clone();
                    let id = m.document_id;
                    // Not flushed here: the server already holds these changes durably, so
                    // losing them in a device crash costs a re-download, not data. One flush
                    // at the end of the session covers them all.
                    tokio::task::spawn_blocking(move || store.put_incremental_blocking(id, &chunk))
                        .await
                        .map_err(|e| ClientError::Connection(e.to_string()))??;
                }
                s.report.heads = s.doc.get_heads();
                // Held: the server's heads (sent only after its copy was flushed) are ours.
                let held = s.state.their_heads.as_deref() == Some(s.report.heads.as_slice());
                let mut carries_changes = false;
                if let Some(reply) = s.doc.generate_sync_message(&mut s.state) {
                    carries_changes = !reply.changes.is_empty();
                    let out = Message::Sync(DocMessage {
                        sender_id: me.clone(),
                        target_id: server.clone(),
                        document_id: m.document_id,
                        data: reply.encode(),
                    });
                    s.report.bytes += send(ws, report, &out).await?;
                }
                // A last message that only states our heads needs no answer; one that carries
                // changes does (the server's next heads will include them).
                s.settled = held && !carries_changes;
                if s.settled {
                    s.report.outcome = DocSyncOutcome::Held;
                }
            }
            Message::DocUnavailable(m) => {
                if let Some(s) = sessions.get_mut(&m.document_id) {
                    s.report.bytes += size;
                    s.settled = true;
                    s.report.outcome = DocSyncOutcome::Unavailable;
                }
            }
            Message::Error(e) => return Err(ClientError::Server(e.message)),
            _ => {}
        }
    }
    Ok(())
}

async fn send(ws: &mut Socket, report: &mut SyncReport, msg: &Message) -> Result<usize> {
    let frame = codec::encode(msg);
    let n = frame.len();
    ws.send(WsMessage::binary(frame))
        .await
        .map_err(|e| ClientError::Connection(e.to_string()))?;
    report.bytes_sent += n;
    Ok(n)
}

async fn recv(
    ws: &mut Socket,
    report: &mut SyncReport,
    deadline: Instant,
    timeout: Duration,
) -> Result<Message> {
    Ok(recv_sized(ws, report, deadline, timeout).await?.0)
}

async fn recv_sized(
    ws: &mut Socket,
    report: &mut SyncReport,
    deadline: Instant,
    timeout: Duration,
) -> Result<(Message, usize)> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let frame = tokio::time::timeout(left, ws.next())
            .await
            .map_err(|_| ClientError::Timeout(timeout))?;
        match frame {
            Some(Ok(WsMessage::Binary(b))) => {
                report.bytes_received += b.len();
                let m = codec::decode(&b, MAX_FRAME)
                    .map_err(|e| ClientError::Protocol(e.to_string()))?;
                return Ok((m, b.len()));
            }
            Some(Ok(WsMessage::Close(frame))) => {
                let why = frame
                    .map(|f| format!("closed by the server ({}): {}", u16::from(f.code), f.reason))
                    .unwrap_or_else(|| "closed by the server".into());
                return Err(ClientError::Connection(why));
            }
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Err(ClientError::Connection(e.to_string())),
            None => return Err(ClientError::Connection("connection closed".into())),
        }
    }
}

/// `url` without its `token=` value, for error messages and logs.
fn redact(url: &str) -> String {
    match url.find("token=") {
        Some(i) => {
            let end = url[i..].find('&').map(|j| i + j).unwrap_or(url.len());
            format!("{}token=<redacted>{}", &url[..i], &url[end..])
        }
        None => url.to_string(),
    }
}
