//! Export and staff-query benchmark: prints figures for the README. Not a test: run it on a
//! quiet machine.
//!
//! ```text
//! cargo run --release --example bench_export              # 200 households x 50 visits
//! cargo run --release --example bench_export -- 400 100   # households, visits each
//! FIELDSYNC_DATABASE=postgres://USER@HOST:PORT/DB cargo run --release --example bench_export -- 10000 1
//! ```
//!
//! With `FIELDSYNC_DATABASE` the server keeps its data in that (empty) PostgreSQL database
//! instead of the embedded store.
//!
//! An in-process server on loopback (port 0, temp dir); four officer devices upload the
//! households through the real sync path (so the projection is built change by change, as
//! in production). Then a staff session downloads `GET /api/v1/export.csv` three times while
//! a sampler reads the process's resident memory every 5 ms, and times a few list, search and
//! coverage queries. The client reads the CSV in 64 KiB pieces and throws it away, so any
//! growth in memory during the export is the server's.

use std::io::Read;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fieldsync::accounts::AdminCommand;
use fieldsync::auth::Role;
use fieldsync::client::Device;
use fieldsync::records::{self, samples};
use fieldsync::server::{ServerConfig, Services};

const STATION: &str = "Zhongzheng Station";
const DEVICES: usize = 4;
const PASSWORD: &str = "bench staff password";

fn rss_kib() -> u64 {
    fieldsync::server::process_memory_kib(None, "VmRSS:").unwrap_or(0)
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(600)))
        .build()
        .into()
}

fn sign_in(http: &str) -> anyhow::Result<String> {
    let body = serde_json::json!({"name": "staff", "password": PASSWORD}).to_string();
    let resp = agent()
        .post(&format!("{http}/api/v1/session"))
        .header("content-type", "application/json")
        .send(body)?;
    anyhow::ensure!(resp.status() == 200, "sign-in failed: {}", resp.status());
    Ok(resp
        .headers()
        .get("set-cookie")
        .and_then(|v| v.to_str().ok())
        .and_then(|c| c.split(';').next())
        .unwrap_or_default()
        .to_string())
}

/// Downloads `path`, discarding the body; returns (time to first byte, total, bytes).
fn download(http: &str, cookie: &str, path: &str) -> anyhow::Result<(Duration, Duration, u64)> {
    let started = Instant::now();
    let mut resp = agent()
        .get(&format!("{http}/api/v1{path}"))
        .header("cookie", cookie)
        .call()?;
    anyhow::ensure!(resp.status() == 200, "{path}: {}", resp.status());
    let mut reader = resp.body_mut().with_config().limit(u64::MAX).reader();
    let mut buf = vec![0u8; 64 * 1024];
    let mut first = None;
    let mut bytes = 0u64;
    loop {
        let n = reader.read(&mut buf)?;
        if n == 0 {
            break;
        }
        first.get_or_insert_with(|| started.elapsed());
        bytes += n as u64;
    }
    Ok((first.unwrap_or_default(), started.elapsed(), bytes))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let households = args.first().copied().unwrap_or(200);
    let visits_each = args.get(1).copied().unwrap_or(50);
    let dir = tempfile::tempdir()?;
    let mut config = ServerConfig::new(dir.path().join("server"));
    config.database = std::env::var("FIELDSYNC_DATABASE").ok();
    let backend = if config.database.is_some() {
        "PostgreSQL"
    } else {
        "embedded sled"
    };
    let services = Services::open(config).await?;
    let mut cmds = vec![
        AdminCommand::StationAdd {
            station: STATION.into(),
        },
        AdminCommand::VillageAdd {
            station: STATION.into(),
            village: "Linsen".into(),
        },
        AdminCommand::UserAdd {
            name: "staff".into(),
            role: Role::Staff,
            station: STATION.into(),
            villages: vec![],
            password_hash: Some(fieldsync::auth::secrets::hash_password(PASSWORD, [7; 16])?),
        },
    ];
    for o in 0..DEVICES {
        cmds.push(AdminCommand::UserAdd {
            name: format!("officer-{o}"),
            role: Role::Officer,
            station: STATION.into(),
            villages: vec!["Linsen".into()],
            password_hash: None,
        });
    }
    for cmd in cmds {
        services.accounts.admin(&services.hub, cmd, "bench").await?;
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let (http, sync_url) = (format!("http://{addr}"), format!("ws://{addr}/sync"));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(fieldsync::server::run(
        listener,
        services.clone(),
        async move {
            let _ = stopped.await;
        },
    ));

    println!(
        "bench_export ({backend}): {households} households x {visits_each} visits = {} visits, uploaded by {DEVICES} devices",
        households * visits_each
    );
    let started = Instant::now();
    let sync_every = (households / 20).max(10);
    let mut uploads = Vec::new();
    for d in 0..DEVICES {
        let officer = format!("officer-{d}");
        let code = services
            .accounts
            .admin(
                &services.hub,
                AdminCommand::DeviceEnroll {
                    user: officer.clone(),
                },
                "bench",
            )
            .await?;
        let token = services
            .accounts
            .enroll(
                code.lines().last().unwrap_or_default(),
                "bench phone",
                "bench",
            )
            .await?
            .token;
        let device = Device::open(&dir.path().join(&officer)).await?;
        device.set_token(&token).await?;
        let url = sync_url.clone();
        uploads.push(tokio::spawn(async move {
            for h in (d..households).step_by(DEVICES) {
                let id = device
                    .create_household(&samples::household(&h.to_string()))
                    .await?;
                for chunk in 0..visits_each.div_ceil(10) {
                    let officer = officer.clone();
                    let n = (visits_each - chunk * 10).min(10);
                    device
                        .change(id, move |tx| {
                            for i in 0..n {
                                records::add_visit(
                                    tx,
                                    &samples::visit(
                                        &officer,
                                        &format!("Visit {i}: asked about scam calls, 住戶詢問詐騙電話, left the 165 leaflet."),
                                    ),
                                )?;
                            }
                            Ok(())
                        })
                        .await?;
                }
                // Sync every few households so the upload overlaps the edits (every sync
                // offers all of the device's households, so not too often).
                if h % sync_every == d {
                    device.sync(&url).await?;
                }
            }
            device.sync(&url).await?;
            anyhow::Ok(())
        }));
    }
    for u in uploads {
        u.await??;
    }
    println!(
        "upload (sync + projection per change): {:.1} s",
        started.elapsed().as_secs_f64()
    );

    let http2 = http.clone();
    let figures = tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        let cookie = sign_in(&http2)?;
        // Warm-up: the first export pages the projection in from disk.
        download(&http2, &cookie, "/export.csv")?;
        for run in 1..=3 {
            let baseline = rss_kib();
            let peak = Arc::new(AtomicU64::new(baseline));
            let done = Arc::new(AtomicBool::new(false));
            let sampler = {
                let (peak, done) = (peak.clone(), done.clone());
                std::thread::spawn(move || {
                    while !done.load(Ordering::Relaxed) {
                        peak.fetch_max(rss_kib(), Ordering::Relaxed);
                        std::thread::sleep(Duration::from_millis(5));
                    }
                })
            };
            let (first, total, bytes) = download(&http2, &cookie, "/export.csv")?;
            done.store(true, Ordering::Relaxed);
            let _ = sampler.join();
            println!(
                "export run {run}: {:.1} MiB CSV in {:.2} s ({:.0} visit rows/s), first byte after {} ms; RSS {} MiB before, peak +{} KiB during",
                bytes as f64 / 1_048_576.0,
                total.as_secs_f64(),
                (households * visits_each) as f64 / total.as_secs_f64(),
                first.as_millis(),
                baseline / 1024,
                peak.load(Ordering::Relaxed).saturating_sub(baseline),
            );
        }
        for (what, path) in [
            ("list, first page of 50", "/households"),
            ("list, one officer's households", "/households?officer=officer-1&limit=500"),
            ("list, text search", "/households?q=no.%20150"),
            ("list, overdue filter", "/households?overdue=true"),
            ("list, approved", "/households?review=approved"),
            ("coverage", "/coverage?days=30"),
        ] {
            let runs = 5;
            let started = Instant::now();
            for _ in 0..runs {
                download(&http2, &cookie, path)?;
            }
            println!(
                "{what}: {:.1} ms per request (mean of {runs})",
                started.elapsed().as_secs_f64() * 1000.0 / runs as f64
            );
        }
        Ok(())
    })
    .await?;
    figures?;
    println!(
        "process VmRSS at the end: {} MiB (server and the 4 device stores share the process)",
        rss_kib() / 1024
    );
    let _ = stop.send(());
    server.await??;
    Ok(())
}
