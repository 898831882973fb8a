//! Shared test helpers: an in-process server on port 0 with a temp dir, the real binary as a
//! child process (for crash and signal tests), a raw protocol peer, and the JS client setup.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use automerge::sync::SyncDoc;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::oneshot;
use tokio_tungstenite::tungstenite::Message as WsMessage;

use fieldsync::ids::{DocumentId, PeerId};
use fieldsync::protocol::{codec, DocMessage, Join, Message, PeerMetadata};
use fieldsync::server::{ServerConfig, Services};

/// Upper bound for any single wait in a test: generous for a loaded 2-core CI machine, and a
/// failure rather than a hang when something is wrong.
pub const WAIT: Duration = Duration::from_secs(60);

pub struct TestServer {
    pub url: String,
    pub services: Services,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), fieldsync::Error>>>,
    pub dir: tempfile::TempDir,
}

impl TestServer {
    pub async fn spawn() -> Self {
        Self::spawn_with(|_| {}).await
    }

    pub async fn spawn_with(tune: impl FnOnce(&mut ServerConfig)) -> Self {
        // Server logs appear with a failing test's output; FIELDSYNC_LOG=debug for more.
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_env("FIELDSYNC_LOG")
                    .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
            )
            .with_test_writer()
            .try_init();
        let dir = tempfile::tempdir().unwrap();
        let mut config = ServerConfig::new(dir.path().join("data"));
        tune(&mut config);
        let services = Services::open(config).await.unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("ws://{}/sync", listener.local_addr().unwrap());
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(fieldsync::server::run(
            listener,
            services.clone(),
            async move {
                let _ = stopped.await;
            },
        ));
        TestServer {
            url,
            services,
            stop: Some(stop),
            task: Some(task),
            dir,
        }
    }

    pub async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            tokio::time::timeout(WAIT, t)
                .await
                .unwrap()
                .unwrap()
                .unwrap();
        }
    }
}

/// The real `fieldsync` binary, for tests that kill or signal a process.
pub struct ServerProcess {
    pub child: tokio::process::Child,
    pub url: String,
}

impl ServerProcess {
    pub async fn start(data: &Path) -> Self {
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_fieldsync"))
            .args(["serve", "--listen", "127.0.0.1:0", "--data"])
            .arg(data)
            .env("FIELDSYNC_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("the fieldsync binary starts");
        let stdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        let line = tokio::time::timeout(WAIT, lines.next_line())
            .await
            .expect("server prints its address")
            .unwrap()
            .expect("a line on stdout");
        let url = line
            .split_whitespace()
            .find(|w| w.starts_with("ws://"))
            .unwrap_or_else(|| panic!("no ws:// url in {line:?}"))
            .to_string();
        ServerProcess { child, url }
    }

    /// SIGKILL: no shutdown code runs.
    pub async fn kill(mut self) {
        self.child.kill().await.unwrap();
    }
}

pub use fieldsync::records::samples::{household, visit};

/// A protocol peer that sends exactly what a test tells it to.
pub struct RawPeer {
    ws: tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
    pub me: PeerId,
    pub server: PeerId,
}

/// What a raw peer saw next.
#[derive(Debug)]
pub enum Seen {
    Msg(Message),
    Closed(u16, String),
    Gone,
}

impl RawPeer {
    pub async fn connect(url: &str, name: &str) -> Self {
        let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
        let me = PeerId::new(name).unwrap();
        let join = codec::encode(&Message::Join(Join {
            sender_id: me.clone(),
            peer_metadata: PeerMetadata {
                storage_id: None,
                is_ephemeral: true,
            },
            supported_protocol_versions: vec!["1".into()],
        }));
        ws.send(WsMessage::binary(join)).await.unwrap();
        let mut peer = RawPeer {
            ws,
            me,
            server: PeerId::new("unknown").unwrap(),
        };
        match peer.next().await {
            Seen::Msg(Message::Peer(p)) => peer.server = p.sender_id,
            other => panic!("expected peer, got {other:?}"),
        }
        peer
    }

    pub async fn send_raw(&mut self, frame: WsMessage) {
        let _ = self.ws.send(frame).await;
    }

    pub async fn send(&mut self, msg: &Message) {
        self.send_raw(WsMessage::binary(codec::encode(msg))).await;
    }

    /// Sends a `request` for `doc` from an empty document (the way a client asks for a URL).
    pub async fn request(&mut self, doc: DocumentId) {
        let mut state = automerge::sync::State::new();
        let data = automerge::Automerge::new()
            .generate_sync_message(&mut state)
            .unwrap()
            .encode();
        let msg = Message::Request(DocMessage {
            sender_id: self.me.clone(),
            target_id: self.server.clone(),
            document_id: doc,
            data,
        });
        self.send(&msg).await;
    }

    pub async fn next(&mut self) -> Seen {
        loop {
            match tokio::time::timeout(WAIT, self.ws.next())
                .await
                .expect("server answers in time")
            {
                Some(Ok(WsMessage::Binary(b))) => {
                    return Seen::Msg(codec::decode(&b, usize::MAX).expect("server frames decode"))
                }
                Some(Ok(WsMessage::Close(Some(f)))) => {
                    return Seen::Closed(u16::from(f.code), f.reason.to_string())
                }
                Some(Ok(WsMessage::Close(None))) => return Seen::Closed(1005, String::new()),
                Some(Ok(_)) => continue,
                Some(Err(e)) => {
                    eprintln!("raw peer read error: {e}");
                    return Seen::Gone;
                }
                None => return Seen::Gone,
            }
        }
    }

    /// Reads until the server's `error` and close frame; returns (error text, close code).
    pub async fn expect_error_and_close(&mut self) -> (String, u16) {
        let mut error = String::new();
        loop {
            match self.next().await {
                Seen::Msg(Message::Error(e)) => error = e.message,
                Seen::Msg(_) => continue,
                Seen::Closed(code, _) => return (error, code),
                Seen::Gone => {
                    panic!("connection dropped without a close frame (error so far: {error:?})")
                }
            }
        }
    }
}

/// The folder with the JS interop scripts; its node_modules are installed by the README's
/// test command (tests/run-all.sh).
pub fn js_dir() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/js");
    assert!(
        dir.join("node_modules/@automerge/automerge-repo").exists(),
        "the JS client is not installed: run `tests/run-all.sh` (it installs them), or `npm install --prefix tests/js`"
    );
    dir
}
