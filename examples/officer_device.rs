//! An officer's phone on the command line: record household visits offline, sync when back in
//! coverage, and see the merged record. Built on `fieldsync::client::Device`; every command
//! works offline except `sync`.
//!
//! ```text
//! cargo run --example officer_device -- --device ./phone-a enroll <CODE>
//! cargo run --example officer_device -- --device ./phone-a new --village Linsen --house-no 12
//! cargo run --example officer_device -- --device ./phone-a visit <URL> --officer wang --notes "..."
//! cargo run --example officer_device -- --device ./phone-a sync
//! cargo run --example officer_device -- --device ./phone-b catalog
//! cargo run --example officer_device -- --device ./phone-b fetch <URL>
//! cargo run --example officer_device -- --device ./phone-b show <URL>
//! ```
//! See examples/README.md for the full tour.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use fieldsync::client::{Device, DocSyncOutcome};
use fieldsync::ids::{DocumentId, Timestamp};
use fieldsync::records::{
    self, Address, NewHousehold, NewVisit, Premises, VisitMode, VisitOutcome,
};

#[derive(Parser)]
#[command(about = "An officer's device: record visits offline, sync later")]
struct Cli {
    /// The device's local data directory (one per phone).
    #[arg(long, env = "FIELDSYNC_DEVICE", default_value = "./officer-device")]
    device: PathBuf,
    /// The server's sync endpoint (the device token from `enroll` is sent with it).
    #[arg(
        long,
        env = "FIELDSYNC_SERVER",
        default_value = "ws://127.0.0.1:8080/sync"
    )]
    server: String,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Enrol this device with a one-time code from `fieldsync admin device enroll USER`.
    Enroll {
        code: String,
        /// How the device is listed for admins.
        #[arg(long, default_value = "officer phone")]
        name: String,
    },
    /// List the households of this officer's villages (from the village catalogs, as of the
    /// last sync).
    Catalog,
    /// Register a new household (offline); prints its URL.
    New {
        #[arg(long)]
        village: String,
        #[arg(long)]
        house_no: String,
        #[arg(long, default_value = "Zhongzheng Station")]
        station: String,
        #[arg(long, default_value = "")]
        street: String,
        #[arg(long, default_value = "home")]
        premises: String,
    },
    /// Record a visit to a household (offline).
    Visit {
        url: String,
        #[arg(long)]
        officer: String,
        #[arg(long)]
        notes: String,
        /// met | nobody_home | refused | moved | vacant
        #[arg(long, default_value = "met")]
        outcome: String,
    },
    /// Correct what the address is used as: home | rental | shop | business | institution | vacant.
    SetPremises { url: String, premises: String },
    /// Ask for a household another officer registered (fetched at the next sync).
    Fetch { url: String },
    /// Sync every household on this device with the server.
    Sync,
    /// Show a household as this device has it.
    Show { url: String },
    /// List the households on this device and whether the server holds all their changes.
    List,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let device = Device::open(&cli.device)
        .await
        .with_context(|| format!("opening the device store in {}", cli.device.display()))?;
    match cli.command {
        Cmd::Enroll { code, name } => {
            let answer = device
                .enroll(&http_base(&cli.server)?, &code, &name)
                .await?;
            println!(
                "enrolled as device {} of {} ({}, {})",
                answer["device_id"].as_str().unwrap_or("?"),
                answer["user"].as_str().unwrap_or("?"),
                answer["role"].as_str().unwrap_or("?"),
                answer["station"].as_str().unwrap_or("?"),
            );
            for v in answer["villages"].as_array().into_iter().flatten() {
                println!(
                    "village {}: catalog {}",
                    v["name"].as_str().unwrap_or("?"),
                    v["catalog_url"].as_str().unwrap_or("?")
                );
            }
            println!("run `sync` to download the village catalogs");
        }
        Cmd::Catalog => {
            let mut any = false;
            for id in device.documents().await? {
                let Ok(catalog) = device.catalog(id).await else {
                    continue;
                };
                any = true;
                println!("village {} ({}):", catalog.village, catalog.station);
                for h in catalog.households {
                    match &h.merged_into {
                        // Staff merged it into another household: record visits there.
                        Some(survivor) => println!(
                            "  {}  {}  (merged into {survivor}: visit that one)",
                            h.url, h.address_label
                        ),
                        None => println!("  {}  {}", h.url, h.address_label),
                    }
                }
            }
            if !any {
                println!("no village catalog on this device yet: `enroll`, then `sync`");
            }
        }
        Cmd::New {
            village,
            house_no,
            station,
            street,
            premises,
        } => {
            let new = NewHousehold {
                station,
                village: village.clone(),
                address: Address {
                    village,
                    street,
                    house_no,
                    ..Address::default()
                },
                premises: parse_premises(&premises)?,
            };
            let id = device.create_household(&new).await?;
            println!("{}", id.to_url());
        }
        Cmd::Visit {
            url,
            officer,
            notes,
            outcome,
        } => {
            let id = parse_url(&url)?;
            let outcome = VisitOutcome::parse(&outcome).with_context(|| {
                format!(
                    "unknown outcome `{outcome}`: use met, nobody_home, refused, moved or vacant"
                )
            })?;
            let now = i64::try_from(Timestamp::now().as_millis()).unwrap_or(i64::MAX);
            let visit = NewVisit {
                device: format!("{}", device.storage_id()),
                officer,
                started_at_ms: now,
                ended_at_ms: now,
                outcome,
                mode: VisitMode::InHome,
                people_met: Vec::new(),
                notes,
                publicity: Vec::new(),
                security_score: None,
                satisfaction: None,
            };
            let key = device
                .change(id, move |tx| records::add_visit(tx, &visit))
                .await
                .context("is the household on this device? `fetch` it and `sync` first")?;
            println!("recorded visit {key} (offline; run `sync` when in coverage)");
        }
        Cmd::SetPremises { url, premises } => {
            let id = parse_url(&url)?;
            let p = parse_premises(&premises)?;
            device
                .change(id, move |tx| records::set_premises(tx, p))
                .await?;
            println!("premises set to {premises} (offline; run `sync` when in coverage)");
        }
        Cmd::Fetch { url } => {
            device.track(parse_url(&url)?).await?;
            println!("will fetch {url} at the next sync");
        }
        Cmd::Sync => {
            let report = device.sync(&cli.server).await?;
            let mut ids: Vec<_> = report.docs.keys().copied().collect();
            ids.sort();
            for id in ids {
                let d = &report.docs[&id];
                let what = match d.outcome {
                    DocSyncOutcome::Held => "held by the server",
                    DocSyncOutcome::Unavailable => "not available on the server",
                    DocSyncOutcome::Pending => "NOT yet confirmed",
                };
                let got = if d.received_changes {
                    ", received changes"
                } else {
                    ""
                };
                println!("{}  {what}{got}", id.to_url());
            }
            println!(
                "{} bytes sent, {} received",
                report.bytes_sent, report.bytes_received
            );
            if report.all_held() {
                println!("synced: every local change is held by the server");
            } else {
                println!("some changes are not confirmed yet; run `sync` again when in coverage");
            }
        }
        Cmd::Show { url } => {
            let view = device.household(parse_url(&url)?).await?;
            println!("{}", serde_json::to_string_pretty(&view)?);
        }
        Cmd::List => {
            let unsynced = device.unsynced().await?;
            for id in device.documents().await? {
                let label = match device.household(id).await {
                    Ok(v) => v.address_label,
                    Err(_) => "(not fetched yet)".into(),
                };
                let state = if unsynced.contains(&id) {
                    "local changes not yet synced"
                } else {
                    "synced"
                };
                println!("{}  {label}  [{state}]", id.to_url());
            }
        }
    }
    Ok(())
}

/// `http://host:port` from the sync URL `ws://host:port/sync`.
fn http_base(sync_url: &str) -> anyhow::Result<String> {
    let rest = sync_url
        .strip_prefix("ws://")
        .map(|r| format!("http://{r}"))
        .or_else(|| {
            sync_url
                .strip_prefix("wss://")
                .map(|r| format!("https://{r}"))
        })
        .with_context(|| format!("--server `{sync_url}` is not a ws:// or wss:// URL"))?;
    let base = rest.split('?').next().unwrap_or(&rest);
    Ok(base
        .trim_end_matches('/')
        .trim_end_matches("/sync")
        .to_string())
}

fn parse_url(url: &str) -> anyhow::Result<DocumentId> {
    DocumentId::parse_url_or_id(url)
        .with_context(|| format!("`{url}` is not a household URL (automerge:...)"))
}

fn parse_premises(s: &str) -> anyhow::Result<Premises> {
    Premises::parse(s).with_context(|| {
        format!("unknown premises `{s}`: use home, rental, shop, business, institution or vacant")
    })
}
