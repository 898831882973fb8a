//! Durability: the real server process is killed with SIGKILL right after a device received a
//! sync reply whose heads include its changes; after a restart a fresh device receives every
//! one of those changes.

use fieldsync::client::Device;
use fieldsync::ids::DocumentId;
use fieldsync::records;

use crate::common::{household, visit, world_via_cli, ServerProcess};

/// Every officer records a visit ("round N") and syncs, all at once; each sync returns only
/// once the server's reply carried heads equal to the device's (the stored token rides as a
/// Bearer header).
async fn visit_and_sync_everyone(officers: &[Device], ids: &[DocumentId], url: &str, round: usize) {
    let mut syncs = Vec::new();
    for (d, id) in officers.iter().zip(ids) {
        d.change(*id, move |tx| {
            records::add_visit(tx, &visit("officer", &format!("round {round}")))
        })
        .await
        .unwrap();
        syncs.push(d.sync(url));
    }
    for report in futures_util::future::join_all(syncs).await {
        let report = report.unwrap();
        assert!(report.all_held(), "round {round}: {report:?}");
    }
}

/// A device enrolled now gets every officer's household with the same heads and the
/// visits of `rounds` rounds.
async fn a_fresh_device_gets_every_round(
    server: &ServerProcess,
    dir: &std::path::Path,
    officers: &[Device],
    ids: &[DocumentId],
    rounds: usize,
) {
    let fresh = Device::open(&dir.join("fresh")).await.unwrap();
    fresh.set_token(&server.enrol("ben").await).await.unwrap();
    for id in ids {
        fresh.track(*id).await.unwrap();
    }
    assert!(fresh.sync(&server.url).await.unwrap().all_held());
    let expected: Vec<String> = (0..rounds).map(|r| format!("round {r}")).collect();
    for (d, id) in officers.iter().zip(ids) {
        assert_eq!(fresh.heads(*id).await.unwrap(), d.heads(*id).await.unwrap());
        let view = fresh.household(*id).await.unwrap();
        let mut notes: Vec<String> = view.visits.iter().map(|v| v.notes.clone()).collect();
        notes.sort();
        assert_eq!(notes, expected);
    }
}

/// Officers' devices in `dir`, each with a household of its own created offline (house
/// numbers from `first_house_no`).
async fn officers_with_a_household_each(
    dir: &std::path::Path,
    names: &[&str],
    first_house_no: usize,
) -> (Vec<Device>, Vec<DocumentId>) {
    let mut officers = Vec::new();
    let mut ids = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let d = Device::open(&dir.join(name)).await.unwrap();
        ids.push(
            d.create_household(&household(&format!("{}", first_house_no + i)))
                .await
                .unwrap(),
        );
        officers.push(d);
    }
    (officers, ids)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_acknowledged_before_sigkill_survive_restart() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("server-data");
    world_via_cli(&data).await;
    let (officers, ids) = officers_with_a_household_each(dir.path(), &["a", "b", "c"], 40).await;

    for round in 0..3 {
        let server = ServerProcess::start(&data).await;
        if round == 0 {
            for d in &officers {
                d.set_token(&server.enrol("amy").await).await.unwrap();
            }
        }
        visit_and_sync_everyone(&officers, &ids, &server.url, round).await;
        server.kill().await; // SIGKILL: no flush, no shutdown code
    }

    let server = ServerProcess::start(&data).await;
    a_fresh_device_gets_every_round(&server, dir.path(), &officers, &ids, 3).await;
    server.kill().await;
}

/// Catalog upkeep is coalesced (the entries of households registered together go into the
/// catalog in one batch, and the catalog's flush stands in for the household's own): a
/// household its phone was told is held is in its village catalog after a SIGKILL that
/// follows the acknowledgement at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_household_acknowledged_as_held_is_in_its_catalog_after_sigkill() {
    use std::collections::BTreeSet;

    use crate::common::admin_cli;

    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("server-data");
    world_via_cli(&data).await;
    let server = ServerProcess::start(&data).await;
    let mut phones = Vec::new();
    for name in ["a", "b", "c"] {
        let phone = Device::open(&dir.path().join(name)).await.unwrap();
        phone.set_token(&server.enrol("amy").await).await.unwrap();
        phones.push(phone);
    }
    let mut ids = Vec::new();
    for (p, phone) in phones.iter().enumerate() {
        for h in 0..8 {
            let id = phone
                .create_household(&household(&format!("{p}-{h}")))
                .await
                .unwrap();
            ids.push(id);
        }
    }
    // Three phones register 24 households at once: their catalog entries meet in the
    // catalog's queue.
    let syncs: Vec<_> = phones.iter().map(|p| p.sync(&server.url)).collect();
    for report in futures_util::future::join_all(syncs).await {
        let report = report.unwrap();
        assert!(report.all_held(), "{report:?}");
    }
    server.kill().await; // SIGKILL right after the last acknowledgement

    let server = ServerProcess::start(&data).await;
    let out = admin_cli(&data, &["device", "enroll", "ben"], None).await;
    let code = out.lines().last().unwrap();
    let fresh = Device::open(&dir.path().join("fresh")).await.unwrap();
    let answer = fresh
        .enroll(&server.http(), code, "ben's phone")
        .await
        .unwrap();
    let catalog =
        DocumentId::parse_url_or_id(answer["villages"][0]["catalog_url"].as_str().unwrap())
            .unwrap();
    assert!(fresh.sync(&server.url).await.unwrap().all_held());
    let listed: BTreeSet<DocumentId> = fresh
        .catalog(catalog)
        .await
        .unwrap()
        .households
        .iter()
        .map(|e| e.id)
        .collect();
    for id in &ids {
        assert!(listed.contains(id), "{id} is missing from the catalog");
    }
    assert_eq!(listed.len(), ids.len());
    server.kill().await;
}

/// The same on PostgreSQL (`serve --database`): every change a device was told is held
/// survives SIGKILLs of the server process, and a fresh device gets it (same heads). The
/// accounts are set up through the running server's admin socket.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_postgres_changes_acknowledged_before_sigkill_survive_restart() {
    use fieldsync::storage::postgres::testing::Cluster;
    let dir = tempfile::tempdir().unwrap();
    let cluster = Cluster::start(dir.path().join("cluster")).await;
    let data = dir.path().join("server-data");
    let database = ["--database", cluster.url.as_str()];
    let start = || ServerProcess::start_with(&data, &database, &[], std::process::Stdio::inherit());
    let (officers, ids) = officers_with_a_household_each(dir.path(), &["a", "b"], 60).await;
    for round in 0..2 {
        let server = start().await;
        if round == 0 {
            world_via_cli(&data).await;
            for d in &officers {
                d.set_token(&server.enrol("amy").await).await.unwrap();
            }
        }
        visit_and_sync_everyone(&officers, &ids, &server.url, round).await;
        server.kill().await;
    }
    // A data directory of the embedded store is refused by a server on PostgreSQL (its
    // data would be hidden), and the other way round.
    let sled_data = dir.path().join("embedded-data");
    world_via_cli(&sled_data).await;
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_fieldsync"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data"])
        .arg(&sled_data)
        .args(database)
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("holds data of the embedded store"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Without --database the data directory is refused, not opened as an empty store.
    let out = crate::common::admin_cli_output(&data, &["user", "list"], None).await;
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("PostgreSQL: pass its --database"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let server = start().await;
    a_fresh_device_gets_every_round(&server, dir.path(), &officers, &ids, 2).await;
    server.kill().await;
    drop(cluster);
}

/// Two nodes on one PostgreSQL (issue 13): node A is SIGKILLed while its devices push a
/// burst of visits; the devices go on with node B, and every change, acknowledged by A or
/// not, is there exactly once (a fresh device on B gets every round, same heads).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_two_nodes_a_killed_node_loses_nothing_its_devices_sent() {
    use fieldsync::storage::postgres::testing::Cluster;
    if !crate::common::on_postgres() {
        return; // it needs PostgreSQL whatever the backend: run once, in that pass
    }
    let dir = tempfile::tempdir().unwrap();
    let cluster = Cluster::start(dir.path().join("cluster")).await;
    let database = ["--database", cluster.url.as_str()];
    let start = |name: &str| {
        let data = dir.path().join(name);
        async move {
            ServerProcess::start_with(&data, &database, &[], std::process::Stdio::inherit()).await
        }
    };
    let a = start("a").await;
    world_via_cli(&dir.path().join("a")).await;
    let b = start("b").await;
    let (officers, ids) = officers_with_a_household_each(dir.path(), &["a1", "a2", "a3"], 80).await;
    for d in &officers {
        d.set_token(&a.enrol("amy").await).await.unwrap();
    }
    visit_and_sync_everyone(&officers, &ids, &a.url, 0).await;

    // Round 1 is pushed to node A as it dies.
    for (d, id) in officers.iter().zip(&ids) {
        d.change(*id, move |tx| {
            records::add_visit(tx, &visit("officer", "round 1"))
        })
        .await
        .unwrap();
    }
    let url_a = a.url.clone();
    let pushes = futures_util::future::join_all(officers.iter().map(|d| d.sync(&url_a)));
    let (_, ()) = tokio::join!(pushes, a.kill());
    for d in &officers {
        let report = d.sync(&b.url).await.unwrap();
        assert!(report.all_held(), "{report:?}");
    }
    a_fresh_device_gets_every_round(&b, dir.path(), &officers, &ids, 2).await;
    b.kill().await;
    drop(cluster);
}
