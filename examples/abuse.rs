//! Abuse bench: what each kind of abuse costs a running server, in memory and descriptors,
//! and what a healthy officer's phone notices meanwhile. Prints figures for the README's
//! security section. Not a test: run it on a quiet machine.
//!
//! ```text
//! cargo build --release && cargo run --release --example abuse
//! cargo run --release --example abuse -- --server target/release/fieldsync --seconds 5
//! ABUSE_ONLY=sign-in cargo run --release --example abuse   # one class (a name prefix)
//! ```
//!
//! It starts the real `fieldsync serve` (release build, default limits, a fresh data
//! directory) as its own process, builds a station with the admin CLI, enrols an officer's
//! phone (the probe) and then, one class at a time:
//! 1. sign-in flood: 192 clients (192 addresses, forwarded by a trusted proxy) posting
//!    passwords for made-up names, for the whole phase;
//! 2. idle connections: as many TCP connections as this process may open, each sending half
//!    a header and then nothing;
//! 3. made-up documents: 20 authenticated devices each offering 300 new, empty documents;
//! 4. an operation bomb: one change of 4,000,000 identical characters (a few KB compressed);
//! 5. never-reading clients: 40 connections asking for a 1 MB household and reading nothing;
//! 6. item bombs: 10 connections each sending one 15 MB frame of tiny CBOR items.
//!
//! For each: the server's resident memory (VmRSS, sampled every 20 ms) before, at its peak
//! during the phase and 3 s after; its open descriptors at the peak; and the probe's sync
//! latency (a visit recorded and synced every 200 ms) during the phase.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fieldsync::client::Device;
use fieldsync::ids::{DocumentId, PeerId};
use fieldsync::protocol::{codec, DocMessage, Join, Message, PeerMetadata};
use fieldsync::records::{
    self, Address, NewHousehold, NewVisit, Premises, VisitMode, VisitOutcome,
};
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio_tungstenite::tungstenite::Message as WsMessage;

const STATION: &str = "Bench Station";
const VILLAGE: &str = "Linsen";

fn household(n: usize) -> NewHousehold {
    NewHousehold {
        station: STATION.into(),
        village: VILLAGE.into(),
        address: Address {
            township: "Zhongzheng".into(),
            village: VILLAGE.into(),
            group: "1".into(),
            street: "Linsen S. Rd".into(),
            house_no: n.to_string(),
            landmark: String::new(),
        },
        premises: Premises::Home,
    }
}

fn visit(notes: String) -> NewVisit {
    NewVisit {
        officer: "amy".into(),
        device: "amy-phone".into(),
        started_at_ms: 1_790_000_000_000,
        ended_at_ms: 1_790_000_600_000,
        outcome: VisitOutcome::Met,
        mode: VisitMode::InHome,
        people_met: vec!["resident".into()],
        notes,
        publicity: vec![],
        security_score: Some(4),
        satisfaction: Some(5),
    }
}

struct Server {
    child: tokio::process::Child,
    pid: u32,
    http: String,
    ws: String,
}

fn rss_kib(pid: u32) -> u64 {
    status_field(pid, "VmRSS:")
}

fn status_field(pid: u32, field: &str) -> u64 {
    fieldsync::server::process_memory_kib(Some(pid), field).unwrap_or(0)
}

fn descriptors(pid: u32) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count() as u64)
        .unwrap_or(0)
}

async fn cli(
    bin: &Path,
    data: &Path,
    args: &[&str],
    stdin: Option<&str>,
) -> anyhow::Result<String> {
    let mut child = tokio::process::Command::new(bin)
        .arg("admin")
        .arg("--data")
        .arg(data)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let mut input = child.stdin.take().expect("piped");
    if let Some(s) = stdin {
        input.write_all(s.as_bytes()).await?;
    }
    drop(input);
    let out = child.wait_with_output().await?;
    anyhow::ensure!(
        out.status.success(),
        "fieldsync admin {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

async fn start(bin: &Path, data: &Path) -> anyhow::Result<Server> {
    let mut child = tokio::process::Command::new(bin)
        .args(["serve", "--listen", "127.0.0.1:0", "--data"])
        .arg(data)
        // As behind a reverse proxy on this machine: the sign-in flood below comes from 192
        // forwarded addresses, so the per-address throttle does not stop it and every
        // attempt asks for a password check (the worst case for the hashing bound).
        .args(["--trusted-proxy", "127.0.0.1"])
        .env("FIELDSYNC_LOG", "error")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()?;
    let pid = child.id().unwrap_or_default();
    let mut lines = BufReader::new(child.stdout.take().expect("piped")).lines();
    let line = lines.next_line().await?.unwrap_or_default();
    let ws = line
        .split_whitespace()
        .find(|w| w.starts_with("ws://"))
        .ok_or_else(|| anyhow::anyhow!("no address in {line:?}"))?
        .to_string();
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    let http = ws
        .replace("ws://", "http://")
        .trim_end_matches("/sync")
        .to_string();
    Ok(Server {
        child,
        pid,
        http,
        ws,
    })
}

async fn enrol(bin: &Path, server: &Server, data: &Path, device: &Device) -> anyhow::Result<()> {
    let out = cli(bin, data, &["device", "enroll", "amy"], None).await?;
    let code = out.lines().last().unwrap_or_default().to_string();
    device.enroll(&server.http, &code, "bench phone").await?;
    Ok(())
}

async fn token(bin: &Path, server: &Server, data: &Path) -> anyhow::Result<String> {
    let out = cli(bin, data, &["device", "enroll", "amy"], None).await?;
    let code = out.lines().last().unwrap_or_default().to_string();
    let http = server.http.clone();
    let answer = tokio::task::spawn_blocking(move || -> anyhow::Result<serde_json::Value> {
        let body = serde_json::json!({"code": code, "device_name": "abuser"}).to_string();
        let mut resp = ureq::post(&format!("{http}/api/v1/devices/enroll"))
            .header("content-type", "application/json")
            .send(body)?;
        Ok(serde_json::from_str(&resp.body_mut().read_to_string()?)?)
    })
    .await??;
    Ok(answer["token"].as_str().unwrap_or_default().to_string())
}

/// Samples the server's RSS and descriptors until stopped; returns the peaks.
fn sampler(pid: u32, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<(u64, u64)> {
    tokio::spawn(async move {
        let (mut rss, mut fds) = (0, 0);
        while !stop.load(Ordering::Relaxed) {
            rss = rss.max(rss_kib(pid));
            fds = fds.max(descriptors(pid));
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        (rss, fds)
    })
}

/// Records a visit and syncs every 200 ms until stopped; returns the sync latencies (ms)
/// and how many syncs failed.
fn probe(
    device: Arc<Device>,
    doc: DocumentId,
    url: String,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<(Vec<f64>, usize)> {
    tokio::spawn(async move {
        let mut times = Vec::new();
        let mut failed = 0;
        let mut n = 0;
        while !stop.load(Ordering::Relaxed) {
            n += 1;
            let notes = format!("probe visit {n}");
            let _ = device
                .change(doc, move |tx| records::add_visit(tx, &visit(notes)))
                .await;
            let started = Instant::now();
            match tokio::time::timeout(Duration::from_secs(30), device.sync(&url)).await {
                Ok(Ok(r)) if r.all_held() => times.push(started.elapsed().as_secs_f64() * 1000.0),
                _ => failed += 1,
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        (times, failed)
    })
}

struct Phase {
    name: &'static str,
    round: usize,
    before_kib: u64,
    peak_kib: u64,
    after_kib: u64,
    peak_fds: u64,
    probe: Vec<f64>,
    probe_failed: usize,
    outcome: String,
}

async fn phase<F, Fut>(
    name: &'static str,
    server: &Server,
    probe_device: &Arc<Device>,
    probe_doc: DocumentId,
    attack: F,
) -> Option<Phase>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = String>,
{
    if let Ok(only) = std::env::var("ABUSE_ONLY") {
        if !name.starts_with(only.as_str()) {
            return None;
        }
    }
    eprint!("{name} ... ");
    let _ = std::io::stderr().flush();
    let before_kib = rss_kib(server.pid);
    let stop = Arc::new(AtomicBool::new(false));
    let sampling = sampler(server.pid, stop.clone());
    let probing = probe(
        probe_device.clone(),
        probe_doc,
        server.ws.clone(),
        stop.clone(),
    );
    let outcome = attack().await;
    stop.store(true, Ordering::Relaxed);
    let (peak_kib, peak_fds) = sampling.await.unwrap_or_default();
    let (probe, probe_failed) = probing.await.unwrap_or_default();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after_kib = rss_kib(server.pid);
    eprintln!("done");
    Some(Phase {
        name,
        round: 0,
        before_kib,
        peak_kib,
        after_kib,
        peak_fds,
        probe,
        probe_failed,
        outcome,
    })
}

fn percentile(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    s[((s.len() - 1) as f64 * p).round() as usize]
}

async fn joined_ws(url: &str, name: &str) -> anyhow::Result<(Ws, PeerId, PeerId)> {
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await?;
    let me = PeerId::new(name).ok_or_else(|| anyhow::anyhow!("peer id"))?;
    ws.send(WsMessage::binary(codec::encode(&Message::Join(Join {
        sender_id: me.clone(),
        peer_metadata: PeerMetadata {
            storage_id: None,
            is_ephemeral: true,
        },
        supported_protocol_versions: vec!["1".into()],
    }))))
    .await?;
    loop {
        match ws.next().await {
            Some(Ok(WsMessage::Binary(b))) => {
                if let Ok(Message::Peer(p)) = codec::decode(&b, usize::MAX) {
                    return Ok((ws, me, p.sender_id));
                }
            }
            Some(Ok(_)) => continue,
            other => anyhow::bail!("no peer message: {other:?}"),
        }
    }
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Reads until the server's close frame; its code.
async fn close_code(ws: &mut Ws) -> Option<u16> {
    while let Some(Ok(m)) = ws.next().await {
        if let WsMessage::Close(f) = m {
            return f.map(|f| u16::from(f.code));
        }
    }
    None
}

async fn close_codes(tasks: Vec<tokio::task::JoinHandle<Option<u16>>>) -> Vec<Option<u16>> {
    let mut codes = Vec::new();
    for t in tasks {
        codes.push(t.await.ok().flatten());
    }
    codes
}

fn empty_sync() -> Vec<u8> {
    use automerge::sync::SyncDoc;
    let mut state = automerge::sync::State::new();
    automerge::Automerge::new()
        .generate_sync_message(&mut state)
        .map(|m| m.encode())
        .unwrap_or_default()
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let flag = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1).cloned())
    };
    let bin = PathBuf::from(flag("--server").unwrap_or_else(|| "target/release/fieldsync".into()));
    anyhow::ensure!(
        bin.exists(),
        "{} not found: build it first with `cargo build --release`, or pass --server PATH",
        bin.display()
    );
    let seconds: u64 = flag("--seconds").and_then(|s| s.parse().ok()).unwrap_or(5);
    let run_for = Duration::from_secs(seconds);

    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    cli(&bin, &data, &["station", "add", STATION], None).await?;
    cli(&bin, &data, &["village", "add", STATION, VILLAGE], None).await?;
    cli(
        &bin,
        &data,
        &[
            "user",
            "add",
            "amy",
            "--role",
            "officer",
            "--station",
            STATION,
            "--villages",
            VILLAGE,
        ],
        None,
    )
    .await?;
    cli(
        &bin,
        &data,
        &[
            "user",
            "add",
            "sue",
            "--role",
            "staff",
            "--station",
            STATION,
            "--password-stdin",
        ],
        Some("a long bench password\n"),
    )
    .await?;
    let server = start(&bin, &data).await?;
    let pid = server.pid;

    // The probe phone, with one household.
    let probe_device = Arc::new(Device::open(&dir.path().join("probe")).await?);
    enrol(&bin, &server, &data, &probe_device).await?;
    let probe_doc = probe_device.create_household(&household(1)).await?;
    anyhow::ensure!(
        probe_device.sync(&server.ws).await?.all_held(),
        "probe sync"
    );
    // A 1 MB household (varied, hardly compressible notes) for the never-reading clients,
    // uploaded by another phone (the probe syncs only its own small household).
    let uploader = Device::open(&dir.path().join("uploader")).await?;
    enrol(&bin, &server, &data, &uploader).await?;
    let big = uploader.create_household(&household(2)).await?;
    for part in 0..10 {
        let notes: String = (0..90_000)
            .map(|i: usize| (b'a' + ((i * 7919 + part * 104_729) % 26) as u8) as char)
            .collect();
        uploader
            .change(big, move |tx| records::add_visit(tx, &visit(notes)))
            .await?;
        anyhow::ensure!(uploader.sync(&server.ws).await?.all_held(), "big upload");
    }
    drop(uploader);
    let tokens = {
        let mut t = Vec::new();
        for _ in 0..20 {
            t.push(token(&bin, &server, &data).await?);
        }
        t
    };
    // The bomber: a household with a few visits, then one change of 4,000,000 characters.
    let bomber = Arc::new(Device::open(&dir.path().join("bomber")).await?);
    enrol(&bin, &server, &data, &bomber).await?;
    let target = bomber.create_household(&household(3)).await?;
    for n in 0..3 {
        bomber
            .change(target, move |tx| {
                records::add_visit(tx, &visit(format!("visit {n}")))
            })
            .await?;
    }
    anyhow::ensure!(bomber.sync(&server.ws).await?.all_held(), "bomber upload");
    bomber
        .change(target, |tx| {
            records::add_visit(tx, &visit("a".repeat(4_000_000)))
        })
        .await?;
    let idle_kib = rss_kib(pid);
    let mut phases = Vec::new();
    // Every class twice: memory the allocator keeps after the first round must not grow in
    // the second (bounded, not leaking).
    for round in 1..=2 {
        let first_of_round = phases.len();

        // 1. Sign-in flood.
        let http = server.http.clone();
        phases.extend(
        phase("sign-in flood (192 clients, 192 addresses)", &server, &probe_device, probe_doc, || async move {
            let deadline = Instant::now() + run_for;
            let counts = Arc::new([0, 0, 0, 0].map(|_: i32| AtomicU64::new(0)));
            let mut threads = Vec::new();
            for c in 0..192 {
                let http = http.clone();
                let counts = counts.clone();
                threads.push(std::thread::spawn(move || {
                    let agent: ureq::Agent = ureq::Agent::config_builder()
                        .http_status_as_error(false)
                        .timeout_global(Some(Duration::from_secs(30)))
                        .build()
                        .into();
                    let mut n = 0;
                    while Instant::now() < deadline {
                        n += 1;
                        let body = serde_json::json!({"name": format!("guess-{c}-{n}"), "password": "x"}).to_string();
                        let slot = match agent
                            .post(&format!("{http}/api/v1/session"))
                            .header("content-type", "application/json")
                            .header("x-forwarded-for", &format!("10.0.{}.{}", c / 250, c % 250 + 1))
                            .send(body)
                        {
                            Ok(r) if r.status() == 401 => 0,
                            Ok(r) if r.status() == 429 => 1,
                            Ok(r) if r.status() == 503 => 2,
                            _ => 3,
                        };
                        counts[slot].fetch_add(1, Ordering::Relaxed);
                    }
                }));
            }
            let _ = tokio::task::spawn_blocking(move || {
                for t in threads {
                    let _ = t.join();
                }
            })
            .await;
            format!(
                "{} checked (401), {} throttled (429), {} busy (503), {} other",
                counts[0].load(Ordering::Relaxed),
                counts[1].load(Ordering::Relaxed),
                counts[2].load(Ordering::Relaxed),
                counts[3].load(Ordering::Relaxed)
            )
        })
        .await,
    );

        // 2. Half-sent headers.
        let addr = server.http.trim_start_matches("http://").to_string();
        let room = fieldsync::server::open_files_limit()
            .unwrap_or(1024)
            .saturating_sub(200)
            .min(20_000) as usize;
        phases.extend(
            phase(
                "idle connections (half a header)",
                &server,
                &probe_device,
                probe_doc,
                || async move {
                    let mut held = Vec::new();
                    let mut refused = 0;
                    for _ in 0..room {
                        match tokio::net::TcpStream::connect(&addr).await {
                            Ok(mut s) => {
                                let _ = s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n").await;
                                held.push(s);
                            }
                            Err(_) => refused += 1,
                        }
                    }
                    tokio::time::sleep(run_for).await;
                    let mut closed = 0;
                    for s in &held {
                        let mut buf = [0u8; 1];
                        if matches!(s.try_read(&mut buf), Ok(0) | Err(_))
                            && s.try_read(&mut buf).map(|n| n == 0).unwrap_or(true)
                        {
                            closed += 1;
                        }
                    }
                    format!(
                    "{} opened, {closed} already closed by the server after {}s, {refused} refused",
                    held.len(),
                    run_for.as_secs()
                )
                },
            )
            .await,
        );

        // 3. Made-up documents.
        let ws_base = server.ws.clone();
        let toks = tokens.clone();
        phases.extend(
            phase(
                "made-up documents (20 x 300)",
                &server,
                &probe_device,
                probe_doc,
                || async move {
                    let mut tasks = Vec::new();
                    for (i, t) in toks.into_iter().enumerate() {
                        let url = format!("{ws_base}?token={t}");
                        tasks.push(tokio::spawn(async move {
                            let Ok((mut ws, me, server_id)) =
                                joined_ws(&url, &format!("maker-{i}")).await
                            else {
                                return None;
                            };
                            let data = empty_sync();
                            for _ in 0..300 {
                                let msg = Message::Sync(DocMessage {
                                    sender_id: me.clone(),
                                    target_id: server_id.clone(),
                                    document_id: DocumentId::random(),
                                    data: data.clone(),
                                });
                                if ws
                                    .send(WsMessage::binary(codec::encode(&msg)))
                                    .await
                                    .is_err()
                                {
                                    break;
                                }
                            }
                            close_code(&mut ws).await
                        }));
                    }
                    let codes = close_codes(tasks).await;
                    let closed = codes.iter().filter(|c| **c == Some(1008)).count();
                    format!(
                        "{closed} of 20 connections closed with 1008 past the per-connection bound"
                    )
                },
            )
            .await,
        );

        // 4. The operation bomb (prepared before the rounds).
        let bomber = bomber.clone();
        let ws_url = server.ws.clone();
        phases.extend(
            phase(
                "operation bomb (4,000,001 ops)",
                &server,
                &probe_device,
                probe_doc,
                || async move {
                    let started = Instant::now();
                    let outcome = bomber.sync(&ws_url).await;
                    tokio::time::sleep(run_for.saturating_sub(started.elapsed())).await;
                    match outcome {
                        Err(e) => {
                            format!("refused in {:.0} ms: {e}", started.elapsed().as_millis())
                        }
                        Ok(r) => format!("not refused: {r:?}"),
                    }
                },
            )
            .await,
        );

        // 5. Never-reading clients.
        let ws_base = server.ws.clone();
        let toks = tokens.clone();
        phases.extend(
            phase(
                "never-reading clients (40 x 1 MB)",
                &server,
                &probe_device,
                probe_doc,
                || async move {
                    let mut held = Vec::new();
                    for i in 0..40 {
                        let url = format!("{ws_base}?token={}", toks[i % toks.len()]);
                        if let Ok((mut ws, me, server_id)) =
                            joined_ws(&url, &format!("sloth-{i}")).await
                        {
                            use automerge::sync::SyncDoc;
                            let mut state = automerge::sync::State::new();
                            let data = automerge::Automerge::new()
                                .generate_sync_message(&mut state)
                                .map(|m| m.encode())
                                .unwrap_or_default();
                            let msg = Message::Request(DocMessage {
                                sender_id: me,
                                target_id: server_id,
                                document_id: big,
                                data,
                            });
                            let _ = ws.send(WsMessage::binary(codec::encode(&msg))).await;
                            held.push(ws); // never read
                        }
                    }
                    tokio::time::sleep(run_for).await;
                    format!(
                        "{} connections held without reading for {}s",
                        held.len(),
                        run_for.as_secs()
                    )
                },
            )
            .await,
        );

        // 6. Item bombs before join.
        let ws_base = server.ws.clone();
        let toks = tokens.clone();
        phases.extend(
            phase(
                "item bombs (10 x 15 MB of 1-byte CBOR items)",
                &server,
                &probe_device,
                probe_doc,
                || async move {
                    let mut frame = vec![0x9a];
                    frame.extend_from_slice(&15_000_000u32.to_be_bytes());
                    frame.resize(15_000_005, 0);
                    let frame = bytes::Bytes::from(frame);
                    let mut tasks = Vec::new();
                    for i in 0..10 {
                        let url = format!("{ws_base}?token={}", toks[i % toks.len()]);
                        let frame = frame.clone();
                        tasks.push(tokio::spawn(async move {
                            let Ok((mut ws, _)) = tokio_tungstenite::connect_async(&url).await
                            else {
                                return None;
                            };
                            let _ = ws.send(WsMessage::Binary(frame)).await;
                            close_code(&mut ws).await
                        }));
                    }
                    let codes = close_codes(tasks).await;
                    tokio::time::sleep(run_for).await;
                    format!("close codes {codes:?}")
                },
            )
            .await,
        );

        for p in &mut phases[first_of_round..] {
            p.round = round;
        }
    }

    let mut server = server;
    let _ = server.child.kill().await;

    println!(
        "abuse bench: fieldsync (release) with default limits; server idle at {} MiB RSS after setup; probe = one officer's visit + sync every 200 ms",
        idle_kib / 1024
    );
    println!(
        "| abuse | round | RSS before | peak | 3 s after | peak fds | probe sync p50 / max (failed) | outcome |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for p in &phases {
        println!(
            "| {} | {} | {} MiB | {} MiB | {} MiB | {} | {:.0} / {:.0} ms ({}) | {} |",
            p.name,
            p.round,
            p.before_kib / 1024,
            p.peak_kib / 1024,
            p.after_kib / 1024,
            p.peak_fds,
            percentile(&p.probe, 0.5),
            percentile(&p.probe, 1.0),
            p.probe_failed,
            p.outcome
        );
    }
    Ok(())
}
