//! Load generator: how big a machine does a station need? Simulates many officers' phones
//! against a running server, in its own process, and reports what the server did.
//!
//! ```text
//! cargo build --release --examples
//! target/release/fieldsync serve --data /tmp/fs &                 # the server under test
//! target/release/examples/loadgen --data /tmp/fs --server-pid $! \
//!     --devices 20 --households 40 --visits 4 --shared 10
//! target/release/examples/loadgen --server automerge-repo --url ws://127.0.0.1:3030 ...
//! target/release/examples/loadgen --compare ref.json fieldsync.json   # side by side
//! ```
//!
//! Each simulated device is an officer's phone speaking plain automerge-repo protocol v1
//! (so it drives the reference JS sync server as well as fieldsync). Its households conform
//! to proto-docs/data-model.md: `--households` of its own, each created in one change and
//! given `--visits` visits in one change each, plus `--shared` households that every device
//! has a copy of and records one visit in while offline (they must merge on the server).
//! All changes are made before any connection opens. Then three phases:
//!
//! 1. **push**: every device connects at once and offers everything; done when every own
//!    household is held by the server, every shared household has every device's visit on
//!    every device, and (fieldsync) every village catalog lists every household of it;
//! 2. **steady**: `--rate` new visits per second spread over the connected devices for
//!    `--steady-secs`, each synced at once, as an app does after each edit;
//! 3. **reconnect**: every device reconnects with its sync states and no edits.
//!
//! "Held" is what a client can see: the server's sync message names heads that include the
//! change. Latency runs from sending a change to that message. fieldsync answers only after
//! its copy is on disk, so there it is acknowledged-durable latency.
//!
//! With `--server fieldsync` (the default) the devices are set up the way a station does it:
//! accounts through the admin CLI (`--fieldsync-bin`, `--data` of the running server) and
//! tokens through the enrolment API. With `--server-pid` the report includes the server's
//! CPU seconds and peak resident memory (from /proc; the generator's own CPU is apart).
//!
//! Diagnosis: `LOADGEN_DEBUG=1` prints the sync state of every document that did not settle;
//! `LOADGEN_RESEND_SECS=N` offers a document again when its change waited N seconds.
//!
//! This is a benchmark tool, not a test: run it on a quiet machine (nothing else building).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use automerge::sync::{self, SyncDoc};
use automerge::{ActorId, Automerge, ChangeHash, ObjType, ReadDoc, Value, ROOT};
use clap::Parser;
use fieldsync::ids::{DocumentId, PeerId, StorageId};
use fieldsync::protocol::{codec, DocMessage, Join, Message, PeerMetadata, PROTOCOL_V1};
use fieldsync::records::{self, Address, NewHousehold, NewVisit, Premises};
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio::sync::{mpsc, Notify};
use tokio_tungstenite::tungstenite::Message as WsMessage;

#[derive(Parser, Debug, Clone)]
#[command(about = "Simulates officers' phones against a sync server and reports what it cost")]
struct Args {
    /// The server's WebSocket URL.
    #[arg(long, default_value = "ws://127.0.0.1:8080/sync")]
    url: String,
    /// Other nodes of the same service (fieldsync on one PostgreSQL): the devices are spread
    /// over `--url` and these in turn (accounts are set up through `--url`).
    #[arg(long)]
    also_url: Vec<String>,
    /// `fieldsync` (enrols devices, syncs village catalogs) or `automerge-repo` (the
    /// reference sync server: no accounts, no catalogs).
    #[arg(long, default_value = "fieldsync")]
    server: ServerKind,
    #[arg(long, default_value_t = 20)]
    devices: usize,
    /// Households of each device's own.
    #[arg(long, default_value_t = 40)]
    households: usize,
    /// Visits per own household (one change each).
    #[arg(long, default_value_t = 4)]
    visits: usize,
    /// Households every device has and records a visit in while offline.
    #[arg(long, default_value_t = 10)]
    shared: usize,
    /// Villages the own households spread over (default: one per 10 devices).
    #[arg(long)]
    villages: Option<usize>,
    /// New visits per second in the steady phase, over all devices.
    #[arg(long, default_value_t = 100.0)]
    rate: f64,
    #[arg(long, default_value_t = 10)]
    steady_secs: u64,
    /// Give up on a phase after this long (what did not converge counts as failed).
    #[arg(long, default_value_t = 600)]
    timeout_secs: u64,
    /// The server's process id: its CPU time and peak memory go into the report. Given once
    /// per node (several nodes on one PostgreSQL), the figures are summed and each node's
    /// own are reported too.
    #[arg(long)]
    server_pid: Vec<u32>,
    /// Also write the report as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// fieldsync only: the binary whose admin CLI sets up the accounts (default: the
    /// `fieldsync` next to this example's directory, i.e. target/release/fieldsync).
    #[arg(long)]
    fieldsync_bin: Option<PathBuf>,
    /// fieldsync only: the running server's data directory (for the admin CLI).
    #[arg(long, default_value = "./fieldsync-data")]
    data: PathBuf,
    /// fieldsync only: do not sync the village catalogs.
    #[arg(long)]
    no_catalogs: bool,
    /// Print a side-by-side table of two JSON reports (reference first) and exit.
    #[arg(long, num_args = 2, value_names = ["REFERENCE_JSON", "FIELDSYNC_JSON"])]
    compare: Option<Vec<PathBuf>>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
enum ServerKind {
    Fieldsync,
    AutomergeRepo,
}

const STATION: &str = "Loadgen Station";
const SHARED_VILLAGE: &str = "Shared";
const MAX_FRAME: usize = 64 * 1024 * 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Own,
    Shared,
    Catalog,
}

/// One document on one device, with its sync state towards the server.
struct Slot {
    id: DocumentId,
    kind: Kind,
    doc: Automerge,
    state: sync::State,
    /// Heads the server must be seen to hold, with when they were sent.
    pending: Vec<(Vec<ChangeHash>, Instant)>,
    /// Shared households: every device's visit (each copy's heads before any sync), all of which
    /// every copy must end with.
    expected_visits: Vec<ChangeHash>,
    /// Catalogs: the households the village has.
    expected_entries: usize,
    settled: bool,
    /// Catalog requests answered `doc-unavailable` (the catalog is made on the first
    /// registration): asked again shortly.
    retry_at: Option<Instant>,
}

struct Device {
    index: usize,
    storage_id: StorageId,
    token: Option<String>,
    slots: Vec<Slot>,
    by_id: HashMap<DocumentId, usize>,
    next_edit: usize,
    visits_made: usize,
}

/// What every session reports to the coordinator.
#[derive(Default)]
struct Shared {
    unsettled: AtomicI64,
    changed: Notify,
    latencies_us: Mutex<Vec<u64>>,
    bytes_sent: AtomicU64,
    bytes_received: AtomicU64,
    held_changes: AtomicU64,
    failures: AtomicU64,
    failure_examples: Mutex<Vec<String>>,
    stop: AtomicBool,
    /// Frames handed to the write tasks, and frames they have written.
    frames_queued: AtomicU64,
    frames_written: Arc<AtomicU64>,
    /// Why each (device, document) that heard from the server is not settled yet: said
    /// when a phase gives up.
    stuck: Mutex<HashMap<(usize, DocumentId), String>>,
}

impl Shared {
    fn fail(&self, what: String) {
        self.failures.fetch_add(1, Ordering::Relaxed);
        let mut ex = self.failure_examples.lock().unwrap();
        if ex.len() < 10 {
            // Said at once too: a run that stalls later is diagnosed from its first failures.
            eprintln!("  failed: {what}");
            ex.push(what);
        }
    }
    fn settle(&self, n: i64) {
        if self.unsettled.fetch_sub(n, Ordering::AcqRel) - n <= 0 {
            self.changed.notify_waiters();
        }
    }
}

enum Cmd {
    /// Record one more visit in an own household and sync it.
    Edit,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(files) = &args.compare {
        return compare(&files[0], &files[1]);
    }
    if args.devices == 0 {
        bail!("--devices must be at least 1");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let villages = args.villages.unwrap_or(args.devices.div_ceil(10)).max(1);
    let catalogs = args.server == ServerKind::Fieldsync && !args.no_catalogs;
    let started = Instant::now();

    let mut enrolments = vec![Enrolment::default(); args.devices];
    if args.server == ServerKind::Fieldsync {
        enrolments = enrol(&args, villages)?;
    }

    eprintln!(
        "making {} devices' changes ({} own + {} shared households each, {} visits per own household)",
        args.devices, args.households, args.shared, args.visits
    );
    let mut devices = precompute(&args, villages, enrolments, catalogs).await?;
    let households_total = args.devices * args.households + args.shared;
    let changes_pushed: usize =
        args.devices * args.households * (1 + args.visits) + args.shared * (1 + args.devices);
    eprintln!("made in {:.1} s", started.elapsed().as_secs_f64());

    let shared = Arc::new(Shared::default());
    let mut report = Report::new(&args, villages, households_total);
    let cpu_at_start: Vec<f64> = args.server_pid.iter().map(|&p| pid_cpu(p)).collect();

    // Phase 1 and 2 on the same connections.
    let (handles, senders) = start_sessions(&args, devices, &shared);
    let push = wait_phase("push", &args, &shared, changes_pushed as u64).await;
    report.phase("push", push, &args, &shared);

    let steady = steady(&args, &shared, &senders).await;
    report.phase("steady", steady, &args, &shared);
    devices = stop_sessions(&shared, handles, senders).await?;

    // Phase 3: everyone comes back with nothing new.
    let (handles, senders) = start_sessions(&args, devices, &shared);
    let reconnect = wait_phase("reconnect", &args, &shared, 0).await;
    report.phase("reconnect", reconnect, &args, &shared);
    stop_sessions(&shared, handles, senders).await?;

    if !args.server_pid.is_empty() {
        let nodes: Vec<serde_json::Value> = args
            .server_pid
            .iter()
            .zip(&cpu_at_start)
            .map(|(&pid, start)| {
                json!({
                    "pid": pid,
                    "cpu_s": round3(pid_cpu(pid) - start),
                    "peak_rss_mb": status_mb(pid, "VmHWM:"),
                })
            })
            .collect();
        let sum = |field: &str| round3(nodes.iter().filter_map(|n| n[field].as_f64()).sum());
        report.json["server_cpu_s"] = json!(sum("cpu_s"));
        report.json["server_peak_rss_mb"] = json!(sum("peak_rss_mb"));
        if nodes.len() > 1 {
            report.json["nodes"] = json!(nodes);
        }
    }
    report.json["loadgen_cpu_s"] = json!(round3(cpu_seconds("/proc/self/stat")));
    report.json["failures"] = json!(shared.failures.load(Ordering::Relaxed));
    report.json["failure_examples"] = json!(*shared.failure_examples.lock().unwrap());
    report.print();
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_vec_pretty(&report.json)?)
            .with_context(|| format!("writing {}", path.display()))?;
        eprintln!("report written to {}", path.display());
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Set-up: accounts through the admin CLI, tokens through the enrolment API.

#[derive(Clone, Default)]
struct Enrolment {
    token: Option<String>,
    /// (village, catalog id)
    catalogs: Vec<(String, DocumentId)>,
}

fn village_of(d: usize, villages: usize) -> String {
    format!("Village {}", d % villages)
}

fn enrol(args: &Args, villages: usize) -> anyhow::Result<Vec<Enrolment>> {
    let bin = match &args.fieldsync_bin {
        Some(b) => b.clone(),
        None => std::env::current_exe()?
            .parent()
            .and_then(Path::parent)
            .map(|p| p.join("fieldsync"))
            .context("cannot find the fieldsync binary; pass --fieldsync-bin")?,
    };
    let admin = |words: &[&str]| -> anyhow::Result<String> {
        let out = std::process::Command::new(&bin)
            .arg("admin")
            .arg("--data")
            .arg(&args.data)
            .args(words)
            .output()
            .with_context(|| format!("running {}", bin.display()))?;
        if !out.status.success() {
            bail!(
                "`fieldsync admin {}` failed: {}\n(is the server running with --data {}?)",
                words.join(" "),
                String::from_utf8_lossy(&out.stderr).trim(),
                args.data.display()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let http = args
        .url
        .replacen("ws://", "http://", 1)
        .replacen("wss://", "https://", 1);
    let http = match http.find("/sync") {
        Some(i) => http[..i].to_string(),
        None => http.trim_end_matches('/').to_string(),
    };

    eprintln!(
        "setting up {STATION}: {villages} villages + `{SHARED_VILLAGE}`, {} officers",
        args.devices
    );
    admin(&["station", "add", STATION])?;
    for v in 0..villages {
        admin(&["village", "add", STATION, &format!("Village {v}")])?;
    }
    admin(&["village", "add", STATION, SHARED_VILLAGE])?;
    let mut out = Vec::with_capacity(args.devices);
    let step = (args.devices / 10).max(1);
    for d in 0..args.devices {
        let user = format!("loadgen-{d}");
        let assigned = format!("{},{SHARED_VILLAGE}", village_of(d, villages));
        admin(&[
            "user",
            "add",
            &user,
            "--role",
            "officer",
            "--station",
            STATION,
            "--villages",
            &assigned,
        ])?;
        let code = admin(&["device", "enroll", &user])?;
        let code = code.lines().last().unwrap_or_default().trim().to_string();
        let body = json!({"code": code, "device_name": format!("loadgen phone {d}")}).to_string();
        let answer = fieldsync::client::post_json(
            &format!("{http}/api/v1/devices/enroll"),
            &body,
            Duration::from_secs(30),
        )
        .with_context(|| format!("enrolling device {d} at {http}"))?;
        let token = answer["token"]
            .as_str()
            .context("no token in the enrolment answer")?;
        let mut catalogs = Vec::new();
        for v in answer["villages"].as_array().into_iter().flatten() {
            if let (Some(name), Some(url)) = (v["name"].as_str(), v["catalog_url"].as_str()) {
                catalogs.push((name.to_string(), DocumentId::parse_url_or_id(url)?));
            }
        }
        out.push(Enrolment {
            token: Some(token.to_string()),
            catalogs,
        });
        if (d + 1) % step == 0 || d + 1 == args.devices {
            eprintln!("  enrolled {}/{} devices", d + 1, args.devices);
        }
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------
// The changes, made before anything connects.

fn household(d: usize, h: usize, village: &str) -> NewHousehold {
    NewHousehold {
        station: STATION.into(),
        village: village.into(),
        address: Address {
            township: "Zhongzheng".into(),
            village: village.into(),
            group: (h % 9).to_string(),
            street: format!("Lane {d}"),
            house_no: (h + 1).to_string(),
            landmark: String::new(),
        },
        premises: Premises::Home,
    }
}

fn visit(d: usize, n: usize) -> NewVisit {
    let mut v = records::samples::visit(
        &format!("loadgen-{d}"),
        &format!("Visit {n}: the resident asked about scam calls; left the anti-fraud leaflet and the station's number."),
    );
    v.device = format!("loadgen phone {d}");
    v.started_at_ms += n as i64 * 60_000;
    v.ended_at_ms += n as i64 * 60_000;
    v
}

fn actor_of(d: usize) -> ActorId {
    let mut bytes = [0u8; 16];
    bytes[..8].copy_from_slice(b"loadgen\0");
    bytes[8..].copy_from_slice(&(d as u64).to_be_bytes());
    ActorId::from(bytes)
}

fn slot(id: DocumentId, kind: Kind, doc: Automerge) -> Slot {
    Slot {
        id,
        kind,
        doc,
        state: sync::State::new(),
        pending: Vec::new(),
        expected_visits: Vec::new(),
        expected_entries: 0,
        settled: false,
        retry_at: None,
    }
}

async fn precompute(
    args: &Args,
    villages: usize,
    enrolments: Vec<Enrolment>,
    catalogs: bool,
) -> anyhow::Result<Vec<Device>> {
    // The shared households: created once (by an actor of their own, as if another phone
    // had registered them and every phone had fetched them), then visited by everyone. (With
    // device 0's actor, whichever phone uploaded a base first got that actor bound to it, and
    // device 0's own changes were then flagged as another device's.)
    let mut bases = Vec::new();
    for s in 0..args.shared {
        let mut doc = Automerge::new().with_actor(actor_of(usize::MAX));
        doc.transact(|tx| records::create_household(tx, &household(usize::MAX, s, SHARED_VILLAGE)))
            .map_err(|f| anyhow::anyhow!("creating a shared household: {}", f.error))?;
        bases.push((DocumentId::random(), doc));
    }
    let bases = Arc::new(bases);
    let mut per_village = vec![0usize; villages];
    for d in 0..args.devices {
        per_village[d % villages] += args.households;
    }

    let mut tasks = Vec::new();
    for (d, enrolment) in enrolments.into_iter().enumerate() {
        let bases = bases.clone();
        let (households, visits) = (args.households, args.visits);
        let village = village_of(d, villages);
        let per_village = per_village.clone();
        let shared_count = args.shared;
        tasks.push(tokio::task::spawn_blocking(
            move || -> anyhow::Result<Device> {
                let actor = actor_of(d);
                let mut slots = Vec::new();
                for h in 0..households {
                    let mut doc = Automerge::new().with_actor(actor.clone());
                    doc.transact(|tx| records::create_household(tx, &household(d, h, &village)))
                        .map_err(|f| anyhow::anyhow!("{}", f.error))?;
                    for n in 0..visits {
                        doc.transact(|tx| records::add_visit(tx, &visit(d, n)))
                            .map_err(|f| anyhow::anyhow!("{}", f.error))?;
                    }
                    slots.push(slot(DocumentId::random(), Kind::Own, doc));
                }
                for (id, base) in bases.iter() {
                    let mut doc = base.fork().with_actor(actor.clone());
                    doc.transact(|tx| records::add_visit(tx, &visit(d, 0)))
                        .map_err(|f| anyhow::anyhow!("{}", f.error))?;
                    slots.push(slot(*id, Kind::Shared, doc));
                }
                if catalogs {
                    for (name, id) in &enrolment.catalogs {
                        let mut s = slot(*id, Kind::Catalog, Automerge::new());
                        s.expected_entries = if name == SHARED_VILLAGE {
                            shared_count
                        } else {
                            name.strip_prefix("Village ")
                                .and_then(|v| v.parse::<usize>().ok())
                                .and_then(|v| per_village.get(v).copied())
                                .unwrap_or(0)
                        };
                        slots.push(s);
                    }
                }
                let by_id = slots.iter().enumerate().map(|(i, s)| (s.id, i)).collect();
                Ok(Device {
                    index: d,
                    storage_id: StorageId::random(),
                    token: enrolment.token,
                    slots,
                    by_id,
                    next_edit: 0,
                    visits_made: visits,
                })
            },
        ));
    }
    let mut devices = Vec::new();
    for t in tasks {
        devices.push(t.await??);
    }
    // Every device's copy of a shared household ends with everyone's visit.
    let mut expected: HashMap<DocumentId, BTreeSet<ChangeHash>> = HashMap::new();
    for dev in &devices {
        for s in dev.slots.iter().filter(|s| s.kind == Kind::Shared) {
            expected.entry(s.id).or_default().extend(s.doc.get_heads());
        }
    }
    for dev in &mut devices {
        for s in dev.slots.iter_mut().filter(|s| s.kind == Kind::Shared) {
            s.expected_visits = expected[&s.id].iter().copied().collect();
        }
    }
    Ok(devices)
}

// ---------------------------------------------------------------------------------------
// Sessions: one task per device, one WebSocket each.

type Handles = Vec<tokio::task::JoinHandle<Device>>;

fn start_sessions(
    args: &Args,
    devices: Vec<Device>,
    shared: &Arc<Shared>,
) -> (Handles, Vec<mpsc::Sender<Cmd>>) {
    shared.stop.store(false, Ordering::Release);
    let total: usize = devices.iter().map(|d| d.slots.len()).sum();
    shared.unsettled.store(total as i64, Ordering::Release);
    let mut handles = Vec::new();
    let mut senders = Vec::new();
    let urls: Vec<&String> = std::iter::once(&args.url).chain(&args.also_url).collect();
    for dev in devices {
        let (tx, rx) = mpsc::channel(1024);
        senders.push(tx);
        let url = urls[dev.index % urls.len()].clone();
        handles.push(tokio::spawn(session(dev, url, shared.clone(), rx)));
    }
    (handles, senders)
}

async fn stop_sessions(
    shared: &Arc<Shared>,
    handles: Handles,
    senders: Vec<mpsc::Sender<Cmd>>,
) -> anyhow::Result<Vec<Device>> {
    shared.stop.store(true, Ordering::Release);
    drop(senders); // each session sees its channel close and leaves
    let mut devices = Vec::new();
    for h in handles {
        devices.push(h.await?);
    }
    devices.sort_by_key(|d| d.index);
    Ok(devices)
}

async fn session(
    mut dev: Device,
    url: String,
    shared: Arc<Shared>,
    mut cmds: mpsc::Receiver<Cmd>,
) -> Device {
    // The coordinator counted every slot as unsettled; make the local flags agree.
    for s in &mut dev.slots {
        s.settled = false;
    }
    let fail_rest = |dev: &mut Device, shared: &Shared, why: &str| {
        let mut n = 0;
        for s in dev.slots.iter_mut().filter(|s| !s.settled) {
            s.settled = true;
            n += 1;
        }
        if n > 0 {
            shared.fail(format!(
                "device {}: {why} ({n} documents unsettled)",
                dev.index
            ));
            shared.settle(n);
        }
    };

    let full_url = match &dev.token {
        Some(t) => format!(
            "{url}{}token={t}",
            if url.contains('?') { '&' } else { '?' }
        ),
        None => url.clone(),
    };
    let config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
        .max_message_size(Some(MAX_FRAME))
        .max_frame_size(Some(MAX_FRAME));
    let ws =
        match tokio_tungstenite::connect_async_with_config(full_url.as_str(), Some(config), false)
            .await
        {
            Ok((ws, _)) => ws,
            Err(e) => {
                fail_rest(&mut dev, &shared, &format!("cannot connect: {e}"));
                return dev;
            }
        };
    // Writes go through their own task, as a real client's socket buffers them: this loop
    // never stops reading while a write waits for the server to read (each side waiting on
    // the other would stall both).
    let (mut sink, mut stream) = ws.split();
    // Reads go through their own task too: it keeps reading while this phone's Automerge
    // work runs, so the server's pings are answered at once (tungstenite answers them as it
    // reads), as a phone's network stack does while its app is busy. With 200 phones on two
    // cores a phone's turn can come tens of seconds apart, longer than the server's
    // patience with a silent peer.
    let (frames_in, mut frames) = mpsc::unbounded_channel();
    let _reader = AbortOnDrop(tokio::spawn(async move {
        while let Some(frame) = stream.next().await {
            if frames_in.send(frame).is_err() {
                break;
            }
        }
    }));
    let (writes, mut to_write) = mpsc::unbounded_channel::<WsMessage>();
    let written = shared.frames_written.clone();
    let writer = tokio::spawn(async move {
        while let Some(frame) = to_write.recv().await {
            let close = matches!(frame, WsMessage::Close(_));
            if sink.send(frame).await.is_err() || close {
                break;
            }
            written.fetch_add(1, Ordering::Relaxed);
        }
    });
    let me = PeerId::random("loadgen");
    let join = Message::Join(Join {
        sender_id: me.clone(),
        peer_metadata: PeerMetadata {
            storage_id: Some(dev.storage_id.clone()),
            is_ephemeral: false,
        },
        supported_protocol_versions: vec![PROTOCOL_V1.into()],
    });
    let mut out: Vec<Vec<u8>> = vec![codec::encode(&join)];
    let mut server: Option<PeerId> = None;
    let mut offered = false;
    let resend = resend_after();
    let mut retry = tokio::time::interval(Duration::from_millis(250));
    retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    loop {
        for frame in out.drain(..) {
            shared
                .bytes_sent
                .fetch_add(frame.len() as u64, Ordering::Relaxed);
            shared.frames_queued.fetch_add(1, Ordering::Relaxed);
            if writes.send(WsMessage::Binary(frame.into())).is_err() {
                fail_rest(&mut dev, &shared, "the connection's writer stopped");
                return dev;
            }
        }
        if let (Some(server), false) = (&server, offered) {
            offered = true;
            offer_all(&mut dev, &me, server, &mut out);
            continue;
        }
        tokio::select! {
            frame = frames.recv() => {
                let bytes = match frame {
                    Some(Ok(WsMessage::Binary(b))) => b,
                    Some(Ok(WsMessage::Close(c))) => {
                        if !shared.stop.load(Ordering::Acquire) {
                            fail_rest(&mut dev, &shared, &format!("the server closed the connection: {c:?}"));
                        }
                        return dev;
                    }
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => {
                        fail_rest(&mut dev, &shared, &format!("connection failed: {e}"));
                        return dev;
                    }
                    None => {
                        fail_rest(&mut dev, &shared, "the connection ended");
                        return dev;
                    }
                };
                shared.bytes_received.fetch_add(bytes.len() as u64, Ordering::Relaxed);
                match codec::decode(&bytes, MAX_FRAME) {
                    Ok(Message::Peer(p)) => server = Some(p.sender_id),
                    Ok(Message::Sync(m)) | Ok(Message::Request(m)) => {
                        if let Some(server) = &server {
                            received(&mut dev, &shared, &me, server, m, &mut out);
                        }
                    }
                    Ok(Message::DocUnavailable(m)) => unavailable(&mut dev, &shared, m.document_id),
                    Ok(Message::Error(e)) => shared.fail(format!("device {}: server error: {}", dev.index, e.message)),
                    Ok(_) => {}
                    Err(e) => shared.fail(format!("device {}: undecodable frame: {e}", dev.index)),
                }
                // Automerge work per frame can take milliseconds: let the other phones run
                // (and answer the server's pings) between frames, as separate phones would.
                tokio::task::yield_now().await;
            }
            cmd = cmds.recv() => match cmd {
                Some(Cmd::Edit) => {
                    if let Some(server) = &server {
                        edit(&mut dev, &shared, &me, server, &mut out);
                    }
                }
                None => {
                    let _ = writes.send(WsMessage::Close(None));
                    // A server that stopped reading must not hold the run up.
                    let _ = tokio::time::timeout(Duration::from_secs(5), writer).await;
                    // What is still unsettled when the coordinator gave up is a failure.
                    for s in dev.slots.iter_mut().filter(|s| !s.settled) {
                        s.settled = true;
                        shared.settle(1);
                        shared.fail(format!(
                            "device {}: {:?} document {} did not settle: {} sent changes not held, server heads {}, ours {:?}",
                            dev.index, s.kind, s.id, s.pending.len(),
                            s.state.their_heads.as_ref().map_or("unknown".into(), |h| format!("{h:?}")),
                            s.doc.get_heads(),
                        ));
                        if std::env::var_os("LOADGEN_DEBUG").is_some() {
                            let missing: Vec<_> = s.state.their_heads.iter().flatten().filter(|h| s.doc.get_change_meta_by_hash(h).is_none()).collect();
                            eprintln!("DEBUG {}: in_flight {} have_responded {} shared {:?} last_sent {:?} their_need {:?} sent_hashes {} missing {:?} missing_deps {:?} expected {:?}",
                                s.id, s.state.in_flight, s.state.have_responded, s.state.shared_heads, s.state.last_sent_heads, s.state.their_need, s.state.sent_hashes.len(), missing, s.doc.get_missing_deps(&[]), s.expected_visits);
                        }
                    }
                    // Sync states survive the connection as a non-ephemeral client keeps
                    // them: only what is persisted (the shared heads) carries over.
                    for s in &mut dev.slots {
                        s.state = sync::State::decode(&s.state.encode()).unwrap_or_default();
                        s.pending.clear();
                        s.retry_at = None;
                    }
                    return dev;
                }
            },
            _ = retry.tick() => {
                let now = Instant::now();
                if let Some(server) = &server {
                    for i in 0..dev.slots.len() {
                        if dev.slots[i].retry_at.is_some_and(|t| t <= now) {
                            dev.slots[i].retry_at = None;
                            dev.slots[i].state = sync::State::new();
                            send_sync(&mut dev.slots[i], &me, server, &mut out);
                        }
                        // Diagnosis of stalls: offer again what waited too long for "held".
                        if let Some(after) = resend {
                            let s = &mut dev.slots[i];
                            if s.pending.first().is_some_and(|(_, sent)| now.duration_since(*sent) > after)
                                && s.state.in_flight
                            {
                                eprintln!("RESEND {} after {:?}", s.id, now.duration_since(s.pending[0].1));
                                s.state.in_flight = false;
                                s.state.last_sent_heads.clear();
                                s.state.sent_hashes.clear();
                                send_sync(s, &me, server, &mut out);
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Stops a task when the handle is dropped (a session's reader ends with its session).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// `LOADGEN_RESEND_SECS`: offer a document again when its change waited this long.
fn resend_after() -> Option<Duration> {
    std::env::var("LOADGEN_RESEND_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .map(Duration::from_secs)
}

fn offer_all(dev: &mut Device, me: &PeerId, server: &PeerId, out: &mut Vec<Vec<u8>>) {
    let now = Instant::now();
    // Households first: a catalog exists once its first household is registered.
    for kind in [Kind::Own, Kind::Shared, Kind::Catalog] {
        for s in dev.slots.iter_mut().filter(|s| s.kind == kind) {
            let heads = s.doc.get_heads();
            if !heads.is_empty() {
                s.pending.push((heads, now));
            }
            send_sync(s, me, server, out);
        }
    }
}

/// Sends our next sync message for `s`, as `request` while we have nothing of it.
fn send_sync(s: &mut Slot, me: &PeerId, server: &PeerId, out: &mut Vec<Vec<u8>>) {
    if let Some(msg) = s.doc.generate_sync_message(&mut s.state) {
        let m = DocMessage {
            sender_id: me.clone(),
            target_id: server.clone(),
            document_id: s.id,
            data: msg.encode(),
        };
        out.push(codec::encode(&if s.doc.get_heads().is_empty() {
            Message::Request(m)
        } else {
            Message::Sync(m)
        }));
    }
}

fn received(
    dev: &mut Device,
    shared: &Shared,
    me: &PeerId,
    server: &PeerId,
    m: DocMessage,
    out: &mut Vec<Vec<u8>>,
) {
    let Some(&i) = dev.by_id.get(&m.document_id) else {
        return;
    };
    let s = &mut dev.slots[i];
    let applied = sync::Message::decode(&m.data)
        .map_err(|e| e.to_string())
        .and_then(|msg| {
            s.doc
                .receive_sync_message(&mut s.state, msg)
                .map_err(|e| e.to_string())
        });
    if let Err(e) = applied {
        shared.fail(format!(
            "device {}: a sync message for {} did not apply: {e}",
            dev.index, s.id
        ));
        return;
    }
    if let Some(their) = s.state.their_heads.clone() {
        let now = Instant::now();
        let mut held = Vec::new();
        s.pending.retain(|(target, sent)| {
            let done = covered(&s.doc, &their, target);
            if done {
                held.push(now.duration_since(*sent).as_micros() as u64);
            }
            !done
        });
        if !held.is_empty() {
            shared
                .held_changes
                .fetch_add(held.len() as u64, Ordering::Relaxed);
            shared.latencies_us.lock().unwrap().extend(held);
        }
    }
    send_sync(s, me, server, out);
    update_settled(dev.index, s, shared);
}

fn unavailable(dev: &mut Device, shared: &Shared, doc: DocumentId) {
    let Some(&i) = dev.by_id.get(&doc) else {
        return;
    };
    let s = &mut dev.slots[i];
    if s.kind == Kind::Catalog && !shared.stop.load(Ordering::Acquire) {
        s.retry_at = Some(Instant::now() + Duration::from_millis(200));
    } else if !s.settled {
        s.settled = true;
        shared.fail(format!(
            "device {}: the server says {} is unavailable",
            dev.index, s.id
        ));
        shared.settle(1);
    }
}

fn edit(dev: &mut Device, shared: &Shared, me: &PeerId, server: &PeerId, out: &mut Vec<Vec<u8>>) {
    // The coordinator counted this edit as unsettled when it asked for it (so it cannot see
    // everything settled while the request waits in the channel); each slot counts once, so
    // the count is given back unless it makes a settled slot unsettled.
    let own: Vec<usize> = (0..dev.slots.len())
        .filter(|&i| dev.slots[i].kind == Kind::Own)
        .collect();
    if own.is_empty() {
        shared.settle(1);
        return;
    }
    let i = own[dev.next_edit % own.len()];
    dev.next_edit += 1;
    dev.visits_made += 1;
    let v = visit(dev.index, dev.visits_made);
    let s = &mut dev.slots[i];
    if let Err(f) = s.doc.transact(|tx| records::add_visit(tx, &v)) {
        shared.fail(format!(
            "device {}: a visit could not be recorded: {}",
            dev.index, f.error
        ));
        shared.settle(1);
        return;
    }
    s.pending.push((s.doc.get_heads(), Instant::now()));
    if s.settled {
        s.settled = false;
    } else {
        shared.settle(1);
    }
    send_sync(s, me, server, out);
}

/// True when the server's heads include every one of `target`, directly or as ancestors.
fn covered(doc: &Automerge, their: &[ChangeHash], target: &[ChangeHash]) -> bool {
    if target.iter().all(|h| their.contains(h)) {
        return true;
    }
    // (Metadata, not `get_change_by_hash`: that rebuilds the change from every operation of
    // the document, which made the generator, not the server, the bottleneck at 200 phones.)
    if their
        .iter()
        .any(|h| doc.get_change_meta_by_hash(h).is_none())
    {
        return false; // they have something we have not seen yet: wait for it
    }
    let after: HashSet<ChangeHash> = doc.get_changes_meta(their).iter().map(|c| c.hash).collect();
    target.iter().all(|h| !after.contains(h))
}

fn catalog_entries(doc: &Automerge) -> usize {
    match doc.get(ROOT, "households") {
        Ok(Some((Value::Object(ObjType::Map), id))) => doc.length(&id),
        _ => 0,
    }
}

fn update_settled(device: usize, s: &mut Slot, shared: &Shared) {
    let settled = s.pending.is_empty()
        && match s.kind {
            Kind::Own => true,
            // Everyone's visit is here. (Not "our heads are everyone's visits": the server
            // merges many concurrent heads with a change of its own.)
            Kind::Shared => s
                .expected_visits
                .iter()
                .all(|h| s.doc.get_change_meta_by_hash(h).is_some()),
            Kind::Catalog => catalog_entries(&s.doc) >= s.expected_entries,
        };
    {
        let mut stuck = shared.stuck.lock().unwrap();
        if settled {
            stuck.remove(&(device, s.id));
        } else {
            let server_agrees = s.state.their_heads.as_deref() == Some(&s.doc.get_heads()[..]);
            let why = match s.kind {
                Kind::Catalog => format!(
                    "{} of {} entries",
                    catalog_entries(&s.doc),
                    s.expected_entries
                ),
                Kind::Shared => format!(
                    "{} of {} expected visits",
                    s.expected_visits
                        .iter()
                        .filter(|h| s.doc.get_change_meta_by_hash(h).is_some())
                        .count(),
                    s.expected_visits.len()
                ),
                Kind::Own => String::new(),
            };
            stuck.insert(
                (device, s.id),
                format!(
                    "device {device}: {:?} {}: {} sent changes not yet held by the server; {why}; server's heads {} ours",
                    s.kind,
                    s.id,
                    s.pending.len(),
                    if server_agrees { "equal" } else { "differ from" }
                ),
            );
        }
    }
    if settled != s.settled {
        s.settled = settled;
        shared.settle(if settled { 1 } else { -1 });
    }
}

// ---------------------------------------------------------------------------------------
// Phases and the report.

struct PhaseResult {
    seconds: f64,
    changes: u64,
    converged: bool,
    sent_changes: u64,
}

async fn wait_phase(name: &str, args: &Args, shared: &Shared, changes: u64) -> PhaseResult {
    let started = Instant::now();
    let deadline = started + Duration::from_secs(args.timeout_secs);
    let converged = wait_settled(name, shared, deadline, started).await;
    PhaseResult {
        seconds: started.elapsed().as_secs_f64(),
        changes,
        converged,
        sent_changes: changes,
    }
}

async fn wait_settled(name: &str, shared: &Shared, deadline: Instant, started: Instant) -> bool {
    let mut last_print = Instant::now();
    loop {
        let notified = shared.changed.notified();
        let left = shared.unsettled.load(Ordering::Acquire);
        if left <= 0 {
            return true;
        }
        if Instant::now() >= deadline {
            eprintln!(
                "{name}: gave up with {left} documents unsettled ({} frames queued for writing, {} written)",
                shared.frames_queued.load(Ordering::Relaxed),
                shared.frames_written.load(Ordering::Relaxed)
            );
            let stuck = shared.stuck.lock().unwrap();
            let mut lines: Vec<&String> = stuck.values().collect();
            lines.sort();
            for line in lines.iter().take(20) {
                eprintln!("  not settled: {line}");
            }
            if lines.len() > 20 {
                eprintln!("  … and {} more", lines.len() - 20);
            }
            return false;
        }
        if last_print.elapsed() >= Duration::from_secs(2) {
            last_print = Instant::now();
            eprintln!(
                "  {name}: {left} documents not settled yet ({:.0} s)",
                started.elapsed().as_secs_f64()
            );
        }
        let _ = tokio::time::timeout(Duration::from_millis(500), notified).await;
    }
}

async fn steady(args: &Args, shared: &Shared, senders: &[mpsc::Sender<Cmd>]) -> PhaseResult {
    let started = Instant::now();
    let held_before = shared.held_changes.load(Ordering::Relaxed);
    let end = started + Duration::from_secs(args.steady_secs);
    let mut sent = 0u64;
    if args.rate > 0.0 && args.steady_secs > 0 {
        let period = Duration::from_secs_f64(1.0 / args.rate);
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        let mut d = 0usize;
        while Instant::now() < end {
            tick.tick().await;
            shared.settle(-1);
            if senders[d % senders.len()].send(Cmd::Edit).await.is_ok() {
                sent += 1;
            } else {
                shared.settle(1);
            }
            d += 1;
        }
    }
    let converged = wait_settled(
        "steady",
        shared,
        Instant::now() + Duration::from_secs(args.timeout_secs),
        started,
    )
    .await;
    PhaseResult {
        seconds: started.elapsed().as_secs_f64(),
        changes: shared.held_changes.load(Ordering::Relaxed) - held_before,
        converged,
        sent_changes: sent,
    }
}

struct Report {
    json: serde_json::Value,
    rows: Vec<[String; 9]>,
    marks: (u64, u64, Option<f64>),
    /// Failures counted before the current phase.
    failures_before: u64,
}

impl Report {
    fn new(args: &Args, villages: usize, households: usize) -> Self {
        Report {
            json: json!({
                "server": args.server,
                "url": args.url,
                "devices": args.devices,
                "households_per_device": args.households,
                "visits_per_household": args.visits,
                "shared_households": args.shared,
                "villages": villages,
                "households_total": households,
                "visits_total": args.devices * args.households * args.visits + args.shared * args.devices,
                "steady_rate_per_s": args.rate,
                "catalogs": args.server == ServerKind::Fieldsync && !args.no_catalogs,
                "phases": {},
            }),
            rows: Vec::new(),
            failures_before: 0,
            marks: (0, 0, servers_cpu(args)),
        }
    }

    fn phase(&mut self, name: &str, r: PhaseResult, args: &Args, shared: &Shared) {
        let mut lat = std::mem::take(&mut *shared.latencies_us.lock().unwrap());
        lat.sort_unstable();
        let pct = |p: f64| -> f64 {
            if lat.is_empty() {
                return 0.0;
            }
            let i = ((lat.len() as f64 * p).ceil() as usize).clamp(1, lat.len()) - 1;
            round3(lat[i] as f64 / 1000.0)
        };
        let sent = shared.bytes_sent.load(Ordering::Relaxed);
        let recv = shared.bytes_received.load(Ordering::Relaxed);
        let (bytes_sent, bytes_received) = (sent - self.marks.0, recv - self.marks.1);
        self.marks.0 = sent;
        self.marks.1 = recv;
        let cpu = servers_cpu(args);
        let server_cpu = match (cpu, self.marks.2) {
            (Some(now), Some(before)) => Some(round3(now - before)),
            _ => None,
        };
        self.marks.2 = cpu;
        let rss = (!args.server_pid.is_empty()).then(|| {
            round3(
                args.server_pid
                    .iter()
                    .map(|&p| status_mb(p, "VmRSS:"))
                    .sum(),
            )
        });
        let per_s = if r.seconds > 0.0 {
            r.changes as f64 / r.seconds
        } else {
            0.0
        };
        // Converged means every document settled, not that the failed ones were given up on.
        let failures = shared.failures.load(Ordering::Relaxed);
        let phase_failures = failures - self.failures_before;
        self.failures_before = failures;
        let outcome = match (r.converged, phase_failures) {
            (true, 0) => "",
            (true, _) => " (failures)",
            (false, _) => " (timed out)",
        };
        let r = PhaseResult {
            converged: r.converged && phase_failures == 0,
            ..r
        };
        self.json["phases"][name] = json!({
            "seconds": round3(r.seconds),
            "converged": r.converged,
            "failures": phase_failures,
            "changes": r.changes,
            "changes_sent": r.sent_changes,
            "changes_per_s": round3(per_s),
            "latency_ms": {"p50": pct(0.50), "p95": pct(0.95), "p99": pct(0.99), "max": pct(1.0), "count": lat.len()},
            "bytes_sent": bytes_sent,
            "bytes_received": bytes_received,
            "server_cpu_s": server_cpu,
            "server_rss_mb": rss,
        });
        let opt = |v: Option<f64>| v.map(|v| format!("{v:.2}")).unwrap_or_else(|| "-".into());
        self.rows.push([
            name.to_string(),
            format!("{:.2}{outcome}", r.seconds),
            r.changes.to_string(),
            format!("{per_s:.0}"),
            format!("{:.1}/{:.1}/{:.1}", pct(0.5), pct(0.95), pct(0.99)),
            format!("{:.1}", bytes_sent as f64 / 1e6),
            format!("{:.1}", bytes_received as f64 / 1e6),
            opt(server_cpu),
            opt(rss),
        ]);
    }

    fn print(&self) {
        let j = &self.json;
        println!(
            "\n{} devices x {} households x {} visits + {} shared ({} households, {} visits), server: {}",
            j["devices"], j["households_per_device"], j["visits_per_household"], j["shared_households"],
            j["households_total"], j["visits_total"], j["server"].as_str().unwrap_or("?")
        );
        println!(
            "{:<10} {:>16} {:>8} {:>9} {:>20} {:>8} {:>8} {:>9} {:>9}",
            "phase",
            "seconds",
            "changes",
            "changes/s",
            "held ms p50/p95/p99",
            "MB sent",
            "MB recv",
            "srv CPU s",
            "srv RSS MB"
        );
        for r in &self.rows {
            println!(
                "{:<10} {:>16} {:>8} {:>9} {:>20} {:>8} {:>8} {:>9} {:>9}",
                r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], r[8]
            );
        }
        println!(
            "server CPU total {} s, peak RSS {} MB; loadgen CPU {} s; failures {}",
            j["server_cpu_s"], j["server_peak_rss_mb"], j["loadgen_cpu_s"], j["failures"]
        );
        for n in j["nodes"].as_array().into_iter().flatten() {
            println!(
                "  node pid {}: CPU {} s, peak RSS {} MB",
                n["pid"], n["cpu_s"], n["peak_rss_mb"]
            );
        }
        for f in j["failure_examples"].as_array().into_iter().flatten() {
            println!("  failure: {}", f.as_str().unwrap_or_default());
        }
    }
}

/// `--compare REF FIELDSYNC`: one table, the reference first, with fieldsync/reference ratios.
fn compare(reference: &Path, fieldsync: &Path) -> anyhow::Result<()> {
    let load = |p: &Path| -> anyhow::Result<serde_json::Value> {
        let text =
            std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
        Ok(serde_json::from_str(&text)?)
    };
    let (a, b) = (load(reference)?, load(fieldsync)?);
    println!(
        "\n{} devices x {} households x {} visits + {} shared ({} households, {} visits)",
        b["devices"],
        b["households_per_device"],
        b["visits_per_household"],
        b["shared_households"],
        b["households_total"],
        b["visits_total"]
    );
    println!(
        "{:<34} {:>14} {:>14} {:>10}",
        "", "reference", "fieldsync", "ratio"
    );
    let num = |v: &serde_json::Value| v.as_f64();
    let row = |label: &str, x: Option<f64>, y: Option<f64>| {
        let f = |v: Option<f64>| v.map(|v| format!("{v:.2}")).unwrap_or_else(|| "-".into());
        let ratio = match (x, y) {
            (Some(x), Some(y)) if x > 0.0 => format!("{:.3}", y / x),
            _ => "-".into(),
        };
        println!("{label:<34} {:>14} {:>14} {:>10}", f(x), f(y), ratio);
    };
    row(
        "server CPU s (whole run)",
        num(&a["server_cpu_s"]),
        num(&b["server_cpu_s"]),
    );
    row(
        "server peak RSS MB",
        num(&a["server_peak_rss_mb"]),
        num(&b["server_peak_rss_mb"]),
    );
    for phase in ["push", "steady", "reconnect"] {
        let (p, q) = (&a["phases"][phase], &b["phases"][phase]);
        row(
            &format!("{phase}: seconds"),
            num(&p["seconds"]),
            num(&q["seconds"]),
        );
        row(
            &format!("{phase}: server CPU s"),
            num(&p["server_cpu_s"]),
            num(&q["server_cpu_s"]),
        );
        row(
            &format!("{phase}: changes/s held"),
            num(&p["changes_per_s"]),
            num(&q["changes_per_s"]),
        );
        row(
            &format!("{phase}: held p99 ms"),
            num(&p["latency_ms"]["p99"]),
            num(&q["latency_ms"]["p99"]),
        );
        let bytes = |r: &serde_json::Value| {
            Some((r["bytes_sent"].as_f64()? + r["bytes_received"].as_f64()?) / 1e6)
        };
        row(&format!("{phase}: MB on the wire"), bytes(p), bytes(q));
        let conv = |r: &serde_json::Value| {
            if r["converged"].as_bool() == Some(true) {
                Some(1.0)
            } else {
                Some(0.0)
            }
        };
        row(&format!("{phase}: converged (1 = yes)"), conv(p), conv(q));
    }
    row("failures", num(&a["failures"]), num(&b["failures"]));
    Ok(())
}

fn pid_cpu(pid: u32) -> f64 {
    cpu_seconds(&format!("/proc/{pid}/stat"))
}

/// The CPU seconds of every server process given, summed (`None`: none given).
fn servers_cpu(args: &Args) -> Option<f64> {
    (!args.server_pid.is_empty()).then(|| args.server_pid.iter().map(|&p| pid_cpu(p)).sum())
}

/// utime + stime of a process from its /proc stat line, in seconds (USER_HZ = 100 on Linux).
fn cpu_seconds(stat_path: &str) -> f64 {
    let Ok(text) = std::fs::read_to_string(stat_path) else {
        return 0.0;
    };
    // The command name may contain spaces: fields are counted after its closing ')'.
    let rest = text.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / 100.0
}

/// A `Vm*` line of /proc/PID/status in MB.
fn status_mb(pid: u32, field: &str) -> f64 {
    fieldsync::server::process_memory_kib(Some(pid), field)
        .map(|kib| round3(kib as f64 / 1024.0))
        .unwrap_or(0.0)
}

fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}
