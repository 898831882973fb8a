//! Sync benchmark: prints figures for the README. Not a test: run it on a quiet machine.
//!
//! ```text
//! cargo run --release --example bench_sync            # defaults: 8 devices x 50 households
//! cargo run --release --example bench_sync -- 16 100  # devices, households per device
//! cargo run --release --example bench_sync -- 8 50 65536  # ... and cache budget in KiB
//! ```
//!
//! It starts an in-process server on loopback (port 0, temp dir) with one station, 12
//! villages and one enrolled officer device per simulated phone, and measures:
//! 1. first upload: every device pushes its households (each with 5 visits) concurrently;
//! 2. group commit: flushes vs. callers that waited for durability during that upload;
//! 3. concurrent edits: every device adds a visit to each of its households and syncs again;
//! 4. a no-change reconnect: bytes per document with persisted sync state;
//! 5. a cold fetch of everything by a fresh device through a cache smaller than the data;
//! 6. process memory (VmHWM, VmRSS from /proc; server and clients share the process).

use std::time::Instant;

use fieldsync::accounts::AdminCommand;
use fieldsync::auth::Role;
use fieldsync::client::Device;
use fieldsync::records::{
    self, Address, NewHousehold, NewVisit, Premises, VisitMode, VisitOutcome,
};
use fieldsync::server::{ServerConfig, Services};

fn household(i: usize) -> NewHousehold {
    NewHousehold {
        station: STATION.into(),
        village: format!("Village {}", i % VILLAGES),
        address: Address {
            township: "Zhongzheng".into(),
            village: format!("Village {}", i % VILLAGES),
            group: (i % 9).to_string(),
            street: "Linsen S. Rd".into(),
            house_no: i.to_string(),
            landmark: String::new(),
        },
        premises: Premises::Home,
    }
}

fn visit(officer: &str, n: usize) -> NewVisit {
    NewVisit {
        officer: officer.into(),
        device: format!("{officer}-phone"),
        started_at_ms: 1_790_000_000_000 + n as i64 * 60_000,
        ended_at_ms: 1_790_000_600_000 + n as i64 * 60_000,
        outcome: VisitOutcome::Met,
        mode: VisitMode::InHome,
        people_met: vec!["resident".into()],
        notes: format!("Visit {n}: resident asked about scam calls; gave the anti-fraud leaflet and the station's number."),
        publicity: vec!["anti_fraud".into()],
        security_score: Some(4),
        satisfaction: Some(5),
    }
}

const STATION: &str = "Zhongzheng Station";
const VILLAGES: usize = 12;

/// One station, its villages, and `officers` officers assigned to every village.
async fn set_up_accounts(services: &Services, officers: usize) -> anyhow::Result<()> {
    let mut cmds = vec![AdminCommand::StationAdd {
        station: STATION.into(),
    }];
    for v in 0..VILLAGES {
        cmds.push(AdminCommand::VillageAdd {
            station: STATION.into(),
            village: format!("Village {v}"),
        });
    }
    for o in 0..officers {
        cmds.push(AdminCommand::UserAdd {
            name: format!("officer-{o}"),
            role: Role::Officer,
            station: STATION.into(),
            villages: (0..VILLAGES).map(|v| format!("Village {v}")).collect(),
            password_hash: None,
        });
    }
    for cmd in cmds {
        services.accounts.admin(&services.hub, cmd, "bench").await?;
    }
    Ok(())
}

/// A device of `officer`, enrolled with a one-time code.
async fn enrolled(
    services: &Services,
    dir: &std::path::Path,
    officer: &str,
) -> anyhow::Result<Device> {
    let out = services
        .accounts
        .admin(
            &services.hub,
            AdminCommand::DeviceEnroll {
                user: officer.into(),
            },
            "bench",
        )
        .await?;
    let code = out.lines().last().unwrap_or_default();
    let enrolled = services
        .accounts
        .enroll(code, "bench phone", "bench")
        .await?;
    let device = Device::open(dir).await?;
    device.set_token(&enrolled.token).await?;
    Ok(device)
}

fn proc_status(field: &str) -> String {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .map(|l| l.split_whitespace().skip(1).collect::<Vec<_>>().join(" "))
        })
        .unwrap_or_else(|| "n/a".into())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let devices_n = args.first().copied().unwrap_or(8);
    let per_device = args.get(1).copied().unwrap_or(50);
    // Default: a budget smaller than the data, to measure eviction and reload.
    let cache_kib = args.get(2).copied().unwrap_or(256);
    let total = devices_n * per_device;
    let dir = tempfile::tempdir()?;
    let mut config = ServerConfig::new(dir.path().join("server"));
    config.hub.cache_budget_bytes = cache_kib * 1024;
    let services = Services::open(config).await?;
    set_up_accounts(&services, devices_n + 1).await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("ws://{}/sync", listener.local_addr()?);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(fieldsync::server::run(
        listener,
        services.clone(),
        async move {
            let _ = stopped.await;
        },
    ));

    println!("fieldsync bench_sync: {devices_n} devices x {per_device} households ({total}), 5 visits each, {cache_kib} KiB document cache");
    let mut devices = Vec::new();
    for d in 0..devices_n {
        let device = enrolled(
            &services,
            &dir.path().join(format!("device-{d}")),
            &format!("officer-{d}"),
        )
        .await?;
        let mut ids = Vec::new();
        for h in 0..per_device {
            let id = device
                .create_household(&household(d * per_device + h))
                .await?;
            let officer = format!("officer-{d}");
            device
                .change(id, move |tx| {
                    for n in 0..5 {
                        records::add_visit(tx, &visit(&officer, n))?;
                    }
                    Ok(())
                })
                .await?;
            ids.push(id);
        }
        devices.push((device, ids));
    }

    let before = services
        .embedded
        .as_ref()
        .expect("bench_sync runs on the embedded store")
        .stats();
    let t = Instant::now();
    let reports =
        futures_util::future::try_join_all(devices.iter().map(|(d, _)| d.sync(&url))).await?;
    let upload = t.elapsed();
    let after = services
        .embedded
        .as_ref()
        .expect("bench_sync runs on the embedded store")
        .stats();
    assert!(reports.iter().all(|r| r.all_held()));
    let up_bytes: usize = reports
        .iter()
        .map(|r| r.bytes_sent + r.bytes_received)
        .sum();
    println!(
        "1. first upload:        {total} households in {:.2} s = {:.0} households/s ({:.1} KiB on the wire)",
        upload.as_secs_f64(),
        total as f64 / upload.as_secs_f64(),
        up_bytes as f64 / 1024.0
    );
    println!(
        "2. group commit:        {} durability waits served by {} flushes ({:.1} waits per flush)",
        after.durability_waits - before.durability_waits,
        after.flushes - before.flushes,
        (after.durability_waits - before.durability_waits) as f64
            / (after.flushes - before.flushes).max(1) as f64
    );

    for (d, (device, ids)) in devices.iter().enumerate() {
        for id in ids {
            let officer = format!("officer-{d}");
            device
                .change(*id, move |tx| records::add_visit(tx, &visit(&officer, 99)))
                .await?;
        }
    }
    let t = Instant::now();
    let reports =
        futures_util::future::try_join_all(devices.iter().map(|(d, _)| d.sync(&url))).await?;
    let edits = t.elapsed();
    assert!(reports.iter().all(|r| r.all_held()));
    println!(
        "3. concurrent edits:    {total} changed households synced in {:.2} s = {:.0} changes/s acknowledged durable",
        edits.as_secs_f64(),
        total as f64 / edits.as_secs_f64()
    );

    let t = Instant::now();
    let report = devices[0].0.sync(&url).await?;
    let per_doc: Vec<usize> = report.docs.values().map(|d| d.bytes).collect();
    println!(
        "4. no-change reconnect: {} households in {:.3} s, {}-{} bytes per household",
        per_doc.len(),
        t.elapsed().as_secs_f64(),
        per_doc.iter().min().unwrap_or(&0),
        per_doc.iter().max().unwrap_or(&0)
    );

    let fresh = enrolled(
        &services,
        &dir.path().join("fresh"),
        &format!("officer-{devices_n}"),
    )
    .await?;
    for (_, ids) in &devices {
        for id in ids {
            fresh.track(*id).await?;
        }
    }
    let t = Instant::now();
    let report = fresh.sync(&url).await?;
    assert!(report.all_held());
    let stats = services.hub.cache_stats();
    println!(
        "5. cold fetch:          {total} households in {:.2} s through a {} KiB cache (peak {} KiB loaded, {} loads, {} evictions)",
        t.elapsed().as_secs_f64(),
        stats.budget_bytes / 1024,
        stats.peak_loaded_bytes / 1024,
        stats.loads,
        stats.evictions
    );
    println!(
        "6. memory:              VmHWM {} , VmRSS {} (server and {} clients in one process); store {} KiB on disk",
        proc_status("VmHWM:"),
        proc_status("VmRSS:"),
        devices_n + 1,
        services.embedded.as_ref().expect("bench_sync runs on the embedded store").size_on_disk()? / 1024
    );
    let _ = stop.send(());
    server.await??;
    Ok(())
}
