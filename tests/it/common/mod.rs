//! Shared test helpers: an in-process server on port 0 with a temp dir and a small world of
//! stations, villages, officers and staff (the [`world`] constants), enrolled devices, the
//! real binary as a child process (for crash and signal tests), a raw protocol peer, a tiny
//! HTTP helper, and the JS client setup.

#![allow(dead_code)]

pub mod browser;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use automerge::sync::SyncDoc;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::oneshot;
use tokio_tungstenite::tungstenite::Message as WsMessage;

use fieldsync::accounts::AdminCommand;
use fieldsync::auth::Role;
use fieldsync::ids::{Clock, DocumentId, PeerId, SystemClock};
use fieldsync::protocol::{codec, DocMessage, Join, Message, PeerMetadata};
use fieldsync::server::{ServerConfig, Services};

/// The test world. The sample households (`records::samples`) live in STATION / VILLAGE.
pub mod world {
    pub const STATION: &str = "Zhongzheng Station";
    pub const VILLAGE: &str = "Linsen";
    pub const OTHER_VILLAGE: &str = "Dongmen";
    /// Another station, with a village of the same name as ours.
    pub const OTHER_STATION: &str = "Daan Station";
    /// Officers of VILLAGE.
    pub const AMY: &str = "amy";
    pub const BEN: &str = "ben";
    /// Officer of OTHER_VILLAGE (same station).
    pub const CAT: &str = "cat";
    /// Officer of OTHER_STATION's village of the same name.
    pub const DAN: &str = "dan";
    /// Staff of STATION.
    pub const SUE: &str = "sue";
    pub const SUE_PASSWORD: &str = "sue's long password";
}

/// The admin commands that build the test world (also run through the CLI for the real
/// binary). Passwords are hashed here as the CLI would.
pub fn world_commands() -> Vec<AdminCommand> {
    use world::*;
    let phc = fieldsync::auth::secrets::hash_password(SUE_PASSWORD, [9; 16]).unwrap();
    let officer = |name: &str, station: &str, village: &str| AdminCommand::UserAdd {
        name: name.into(),
        role: Role::Officer,
        station: station.into(),
        villages: vec![village.into()],
        password_hash: None,
    };
    vec![
        AdminCommand::StationAdd {
            station: STATION.into(),
        },
        AdminCommand::StationAdd {
            station: OTHER_STATION.into(),
        },
        AdminCommand::VillageAdd {
            station: STATION.into(),
            village: VILLAGE.into(),
        },
        AdminCommand::VillageAdd {
            station: STATION.into(),
            village: OTHER_VILLAGE.into(),
        },
        AdminCommand::VillageAdd {
            station: OTHER_STATION.into(),
            village: VILLAGE.into(),
        },
        officer(AMY, STATION, VILLAGE),
        officer(BEN, STATION, VILLAGE),
        officer(CAT, STATION, OTHER_VILLAGE),
        officer(DAN, OTHER_STATION, VILLAGE),
        AdminCommand::UserAdd {
            name: SUE.into(),
            role: Role::Staff,
            station: STATION.into(),
            villages: vec![],
            password_hash: Some(phc),
        },
    ]
}

/// Upper bound for any single wait in a test: generous for a loaded 2-core CI machine, and a
/// failure rather than a hang when something is wrong.
pub const WAIT: Duration = Duration::from_secs(60);

pub struct TestServer {
    /// The sync URL with the token of one of amy's devices: what most tests sync with.
    pub url: String,
    /// `ws://addr/sync` without credentials.
    pub sync_base: String,
    /// `http://addr`.
    pub http: String,
    pub services: Services,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), fieldsync::Error>>>,
    /// The PostgreSQL cluster, when `FIELDSYNC_TEST_BACKEND=postgres` (stopped on drop,
    /// before the directory goes).
    _cluster: Option<fieldsync::storage::postgres::testing::Cluster>,
    pub dir: tempfile::TempDir,
}

/// `FIELDSYNC_TEST_BACKEND=postgres` runs the in-process test servers on a throwaway
/// PostgreSQL cluster each (`tests/run-all.sh` runs the suite once per backend).
pub fn on_postgres() -> bool {
    std::env::var("FIELDSYNC_TEST_BACKEND").is_ok_and(|b| b == "postgres")
}

/// The data of a station for tests that run the `fieldsync` binary: its data directory,
/// and when `FIELDSYNC_TEST_BACKEND=postgres` a throwaway cluster, whose URL every command
/// these helpers run on that directory gets as `--database` (`serve`, `admin`, `reindex`).
/// The cluster stops when this drops.
pub struct StationData {
    pub data: PathBuf,
    _cluster: Option<fieldsync::storage::postgres::testing::Cluster>,
}

/// Data directory -> database URL of the live [`StationData`]s.
static DATABASES: std::sync::Mutex<Vec<(PathBuf, String)>> = std::sync::Mutex::new(Vec::new());

impl StationData {
    /// `dir/data`, on the suite's backend.
    pub async fn new(dir: &Path) -> StationData {
        let data = dir.join("data");
        let cluster = if on_postgres() {
            let cluster =
                fieldsync::storage::postgres::testing::Cluster::start(dir.join("pg")).await;
            DATABASES
                .lock()
                .unwrap()
                .push((data.clone(), cluster.url.clone()));
            Some(cluster)
        } else {
            None
        };
        StationData {
            data,
            _cluster: cluster,
        }
    }
}

impl Drop for StationData {
    fn drop(&mut self) {
        DATABASES
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|(d, _)| *d != self.data);
    }
}

/// `--database URL` for commands run on `data`, if a [`StationData`] keeps it in PostgreSQL.
pub fn database_args(data: &Path) -> Vec<String> {
    DATABASES
        .lock()
        .unwrap()
        .iter()
        .find(|(d, _)| d == data)
        .map(|(_, url)| vec!["--database".to_string(), url.clone()])
        .unwrap_or_default()
}

impl TestServer {
    pub async fn spawn() -> Self {
        Self::spawn_with(|_| {}).await
    }

    pub async fn spawn_with(tune: impl FnOnce(&mut ServerConfig)) -> Self {
        Self::spawn_with_clock(tune, std::sync::Arc::new(SystemClock)).await
    }

    pub async fn spawn_with_clock(
        tune: impl FnOnce(&mut ServerConfig),
        clock: std::sync::Arc<dyn Clock>,
    ) -> Self {
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
        let cluster = if on_postgres() {
            let cluster =
                fieldsync::storage::postgres::testing::Cluster::start(dir.path().join("pg")).await;
            config.database = Some(cluster.url.clone());
            Some(cluster)
        } else {
            None
        };
        tune(&mut config);
        let services = Services::open_with_clock(config, clock).await.unwrap();
        for cmd in world_commands() {
            services
                .accounts
                .admin(&services.hub, cmd, "test")
                .await
                .unwrap();
        }
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let sync_base = format!("ws://{addr}/sync");
        let http = format!("http://{addr}");
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(fieldsync::server::run(
            listener,
            services.clone(),
            async move {
                let _ = stopped.await;
            },
        ));
        let mut server = TestServer {
            url: String::new(),
            sync_base,
            http,
            services,
            stop: Some(stop),
            task: Some(task),
            _cluster: cluster,
            dir,
        };
        let token = server.enrol(world::AMY).await;
        server.url = server.url_with(&token);
        server
    }

    /// Enrols a new device for `user` (code from the admin command, exchanged in-process)
    /// and returns its token.
    pub async fn enrol(&self, user: &str) -> String {
        let code = self.enrolment_code(user).await;
        self.services
            .accounts
            .enroll(&code, &format!("{user}'s phone"), "127.0.0.1")
            .await
            .unwrap()
            .token
    }

    /// A one-time enrolment code for `user`, as `fieldsync admin device enroll` prints it.
    pub async fn enrolment_code(&self, user: &str) -> String {
        self.admin(AdminCommand::DeviceEnroll { user: user.into() })
            .await
            .lines()
            .last()
            .unwrap()
            .to_string()
    }

    pub async fn admin(&self, cmd: AdminCommand) -> String {
        self.services
            .accounts
            .admin(&self.services.hub, cmd, "test")
            .await
            .unwrap()
    }

    /// The sync URL with `token` in the query (how the stock JS client authenticates).
    pub fn url_with(&self, token: &str) -> String {
        format!("{}?token={token}", self.sync_base)
    }

    /// A sync URL for a fresh device of `user`.
    pub async fn url_for(&self, user: &str) -> String {
        let token = self.enrol(user).await;
        self.url_with(&token)
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

/// Runs `fieldsync admin --data DATA ARGS…` (through the running server's admin socket if
/// there is one) and returns its stdout; panics with its stderr if it fails.
pub async fn admin_cli(data: &Path, args: &[&str], stdin: Option<&str>) -> String {
    let out = admin_cli_output(data, args, stdin).await;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "fieldsync admin {args:?} failed: {}{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

pub async fn admin_cli_output(
    data: &Path,
    args: &[&str],
    stdin: Option<&str>,
) -> std::process::Output {
    use tokio::io::AsyncWriteExt;
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_fieldsync"))
        .arg("admin")
        .arg("--data")
        .arg(data)
        .args(database_args(data))
        .args(args)
        .env("FIELDSYNC_LOG", "warn")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    if let Some(text) = stdin {
        input.write_all(text.as_bytes()).await.unwrap();
    }
    drop(input);
    tokio::time::timeout(WAIT, child.wait_with_output())
        .await
        .expect("the admin command finishes")
        .unwrap()
}

/// Runs `fieldsync serve` on `data` expecting it to refuse to start; returns its output
/// (bounded wait: a server that starts after all fails the test instead of hanging it).
pub async fn serve_expecting_refusal(data: &Path) -> std::process::Output {
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_fieldsync"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data"])
        .arg(data)
        .args(database_args(data))
        .env_remove("RUST_BACKTRACE")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let out = tokio::time::timeout(WAIT, child.wait_with_output())
        .await
        .expect("the server refuses to start instead of serving")
        .unwrap();
    assert!(
        !out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Builds the test world in `data` with the real CLI (no server running).
pub async fn world_via_cli(data: &Path) {
    use world::*;
    admin_cli(data, &["station", "add", STATION], None).await;
    admin_cli(data, &["village", "add", STATION, VILLAGE], None).await;
    for officer in [AMY, BEN] {
        admin_cli(
            data,
            &[
                "user",
                "add",
                officer,
                "--role",
                "officer",
                "--station",
                STATION,
                "--villages",
                VILLAGE,
            ],
            None,
        )
        .await;
    }
    admin_cli(
        data,
        &[
            "user",
            "add",
            SUE,
            "--role",
            "staff",
            "--station",
            STATION,
            "--password-stdin",
        ],
        Some(&format!("{SUE_PASSWORD}\n")),
    )
    .await;
}

/// An HTTP request with a JSON body; returns (status, JSON body or Null, Set-Cookie).
pub async fn http(
    method: &str,
    url: &str,
    body: Option<serde_json::Value>,
    headers: &[(&str, &str)],
) -> (u16, serde_json::Value, Option<String>) {
    let (method, url) = (method.to_string(), url.to_string());
    let headers: Vec<(String, String)> = headers
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    tokio::task::spawn_blocking(move || {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(WAIT))
            .build()
            .into();
        let mut req = ureq::http::Request::builder()
            .method(method.as_str())
            .uri(&url);
        for (k, v) in &headers {
            req = req.header(k, v);
        }
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let req = req
            .header("content-type", "application/json")
            .body(body)
            .unwrap();
        let mut resp = agent.run(req).unwrap();
        let status = resp.status().as_u16();
        let cookie = resp
            .headers()
            .get("set-cookie")
            .map(|v| v.to_str().unwrap().to_string());
        let text = resp.body_mut().read_to_string().unwrap_or_default();
        (
            status,
            serde_json::from_str(&text).unwrap_or(serde_json::Value::Null),
            cookie,
        )
    })
    .await
    .unwrap()
}

/// The real `fieldsync` binary, for tests that kill or signal a process.
pub struct ServerProcess {
    pub child: tokio::process::Child,
    /// `ws://addr/sync` (no credentials).
    pub url: String,
    pub data: PathBuf,
    /// The first line it printed (where it listens, and its metrics address if any).
    pub announcement: String,
}

impl ServerProcess {
    pub fn http(&self) -> String {
        self.url
            .replace("ws://", "http://")
            .trim_end_matches("/sync")
            .to_string()
    }

    pub fn url_with(&self, token: &str) -> String {
        format!("{}?token={token}", self.url)
    }

    /// Enrols a device for `user` the way an operator and a phone do: the code from the CLI
    /// (through the admin socket), exchanged over HTTP. Returns the token.
    pub async fn enrol(&self, user: &str) -> String {
        self.enrol_showing_code(user).await.1
    }

    /// Like [`ServerProcess::enrol`]; returns (enrolment code, token).
    pub async fn enrol_showing_code(&self, user: &str) -> (String, String) {
        let out = admin_cli(&self.data, &["device", "enroll", user], None).await;
        let code = out.lines().last().unwrap().to_string();
        let (status, body, _) = http(
            "POST",
            &format!("{}/api/v1/devices/enroll", self.http()),
            Some(serde_json::json!({"code": code, "device_name": format!("{user}'s phone")})),
            &[],
        )
        .await;
        assert_eq!(status, 201, "{body}");
        (code, body["token"].as_str().unwrap().to_string())
    }

    pub async fn start(data: &Path) -> Self {
        Self::start_logging(data, "warn", Stdio::inherit()).await
    }

    /// Starts with log level `level`, its logs (stderr) going to `logs`
    /// (`Stdio::piped()` to read them from `child.stderr`).
    pub async fn start_logging(data: &Path, level: &str, logs: Stdio) -> Self {
        Self::start_with(data, &[], &[("FIELDSYNC_LOG", level)], logs).await
    }

    /// Starts `fieldsync serve` with `args` after the listen address and data directory, and
    /// `envs` set (FIELDSYNC_LOG defaults to warn).
    pub async fn start_with(
        data: &Path,
        args: &[&str],
        envs: &[(&str, &str)],
        logs: Stdio,
    ) -> Self {
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_fieldsync"))
            .args(["serve", "--listen", "127.0.0.1:0", "--data"])
            .arg(data)
            .args(database_args(data))
            .args(args)
            .env("FIELDSYNC_LOG", "warn")
            .envs(envs.iter().copied())
            .stdout(Stdio::piped())
            .stderr(logs)
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
        // Keep reading whatever else it prints, so its stdout never closes under it.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        ServerProcess {
            child,
            url,
            data: data.to_path_buf(),
            announcement: line,
        }
    }

    /// SIGKILL: no shutdown code runs.
    pub async fn kill(mut self) {
        self.child.kill().await.unwrap();
    }
}

pub use fieldsync::records::samples::{household, visit};

/// A household with one member (Chen Mei-ling, phone `0911-000-111`), created on `device`
/// and synced to `url`. Returns the household and member ids.
pub async fn household_with_member(
    device: &fieldsync::client::Device,
    url: &str,
    house_no: &str,
) -> (DocumentId, String) {
    let id = device.create_household(&household(house_no)).await.unwrap();
    let member = device
        .change(id, |tx| {
            fieldsync::records::add_member(
                tx,
                &fieldsync::records::NewMember {
                    name: "Chen Mei-ling".into(),
                    relation: "head".into(),
                    birth_year: Some(1961),
                    phone: "0911-000-111".into(),
                },
            )
        })
        .await
        .unwrap();
    assert!(device.sync(url).await.unwrap().all_held());
    (id, member)
}

/// In one change: a visit by `officer` with `notes`, and a complaint raised in it.
pub fn visit_with_complaint(
    tx: &mut automerge::transaction::Transaction<'_>,
    officer: &str,
    notes: &str,
) -> Result<String, fieldsync::records::RecordError> {
    use fieldsync::records::{self, MatterKind, Risk};
    let v = records::add_visit(tx, &visit(officer, notes))?;
    records::add_matter(
        tx,
        &records::NewMatter {
            visit: v,
            kind: MatterKind::Complaint,
            description: "Scooters race on Linsen S. Rd after midnight.".into(),
            risk: Risk::Yellow,
            confidential: false,
        },
    )
}

/// Offline on `device`: a visit by `officer` who also writes a new `phone` for `member`.
pub async fn visit_with_new_phone(
    device: &fieldsync::client::Device,
    id: DocumentId,
    member: &str,
    officer: &str,
    phone: &str,
) {
    let (member, officer, phone) = (member.to_string(), officer.to_string(), phone.to_string());
    device
        .change(id, move |tx| {
            fieldsync::records::add_visit(
                tx,
                &visit(&officer, "Daughter moved in; new mobile number."),
            )?;
            fieldsync::records::set_member_field(tx, &member, "phone", &phone)
        })
        .await
        .unwrap();
}

/// A device (its store in `dir`) that has fetched `id` from `url`.
pub async fn fetching_device(dir: &Path, url: &str, id: DocumentId) -> fieldsync::client::Device {
    let d = fieldsync::client::Device::open(dir).await.unwrap();
    d.track(id).await.unwrap();
    assert!(d.sync(url).await.unwrap().all_held());
    d
}

/// Connects to `url` expecting a refusal before the upgrade: 401 with the JSON error.
/// Returns the error's `code`.
pub async fn refused_with_401(url: &str) -> String {
    match tokio_tungstenite::connect_async(url).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status().as_u16(), 401, "{url}");
            let body: serde_json::Value =
                serde_json::from_slice(resp.body().as_deref().unwrap_or_default()).unwrap();
            assert!(body["error"]["message"].as_str().is_some(), "{body}");
            body["error"]["code"].as_str().unwrap().to_string()
        }
        other => panic!("{url}: expected 401, got {:?}", other.map(|_| ())),
    }
}

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

    /// Sends a `sync` for `doc` carrying the Automerge sync message `data`.
    pub async fn offer(&mut self, doc: DocumentId, data: Vec<u8>) {
        let msg = Message::Sync(DocMessage {
            sender_id: self.me.clone(),
            target_id: self.server.clone(),
            document_id: doc,
            data,
        });
        self.send(&msg).await;
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

/// Runs `tests/js/interop.mjs` (the official JS client's scenario) with `args` and returns
/// the JSON line it prints; panics with its stderr if it fails.
pub async fn run_js_interop(args: &[&str]) -> serde_json::Value {
    let output = tokio::time::timeout(
        WAIT * 2,
        tokio::process::Command::new("node")
            .arg(js_dir().join("interop.mjs"))
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the JS client finishes")
    .expect("node runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "node failed: {stderr}");
    let line = String::from_utf8_lossy(&output.stdout);
    serde_json::from_str(line.trim().lines().last().unwrap())
        .unwrap_or_else(|e| panic!("bad JSON from node ({e}): {line}"))
}

/// Polls `http_base/readyz` (a bounded wait) until it answers `status`; returns the body.
pub async fn until_readyz(http_base: &str, status: u16) -> serde_json::Value {
    let url = format!("{http_base}/readyz");
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (got, body, _) = http("GET", &url, None, &[]).await;
        if got == status {
            return body;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "/readyz never answered {status}: {got} {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A signed-in staff browser session: the cookie and the CSRF token it echoes.
pub struct StaffSession {
    pub http: String,
    pub cookie: String,
    pub csrf: String,
}

impl StaffSession {
    pub async fn sign_in(http_base: &str, user: &str, password: &str) -> StaffSession {
        let (status, body, cookie) = http(
            "POST",
            &format!("{http_base}/api/v1/session"),
            Some(serde_json::json!({"name": user, "password": password})),
            &[],
        )
        .await;
        assert_eq!(status, 200, "sign-in failed: {body}");
        let cookie = cookie.unwrap();
        StaffSession {
            http: http_base.to_string(),
            cookie: cookie.split(';').next().unwrap().to_string(),
            csrf: body["csrf_token"].as_str().unwrap().to_string(),
        }
    }

    /// GET `path` (under `/api/v1`) with the session cookie.
    pub async fn get(&self, path: &str) -> (u16, serde_json::Value) {
        let url = format!("{}/api/v1{path}", self.http);
        let (status, body, _) = http("GET", &url, None, &[("cookie", &self.cookie)]).await;
        (status, body)
    }

    /// GET `path` and expect 200.
    pub async fn get_ok(&self, path: &str) -> serde_json::Value {
        let (status, body) = self.get(path).await;
        assert_eq!(status, 200, "GET {path}: {body}");
        body
    }

    /// A state-changing request with the cookie and the CSRF header.
    pub async fn send(
        &self,
        method: &str,
        path: &str,
        body: serde_json::Value,
    ) -> (u16, serde_json::Value) {
        let url = format!("{}/api/v1{path}", self.http);
        let (status, body, _) = http(
            method,
            &url,
            Some(body),
            &[("cookie", &self.cookie), ("x-csrf-token", &self.csrf)],
        )
        .await;
        (status, body)
    }

    /// The raw text of a GET (the CSV export) and its content type.
    pub async fn get_text(&self, path: &str) -> (u16, String, String) {
        let url = format!("{}/api/v1{path}", self.http);
        let cookie = self.cookie.clone();
        tokio::task::spawn_blocking(move || {
            let agent: ureq::Agent = ureq::Agent::config_builder()
                .http_status_as_error(false)
                .timeout_global(Some(WAIT))
                .build()
                .into();
            let mut resp = agent.get(&url).header("cookie", &cookie).call().unwrap();
            let kind = resp
                .headers()
                .get("content-type")
                .map(|v| v.to_str().unwrap().to_string())
                .unwrap_or_default();
            let status = resp.status().as_u16();
            let text = resp
                .body_mut()
                .with_config()
                .limit(256 * 1024 * 1024)
                .read_to_string()
                .unwrap();
            (status, text, kind)
        })
        .await
        .unwrap()
    }
}
