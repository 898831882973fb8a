//! `fieldsync migrate` on the real binary: a station's embedded data directory with a few
//! hundred households, visits by two officers, a review and a revoked device, copied to a
//! real PostgreSQL and back. After each move the server on the target answers the staff
//! API the same, the devices go on syncing with their tokens, a fresh device gets the same
//! heads, the accounts and the audit log are the same. Re-running is harmless; a target
//! holding another server's data, and a source in use, are refused with what to do.
//!
//! It needs PostgreSQL whatever the suite's backend, so it runs in the embedded pass only
//! (the PostgreSQL pass would run the very same thing again).

use std::path::Path;
use std::process::Stdio;

use fieldsync::client::Device;
use fieldsync::ids::DocumentId;
use fieldsync::records;
use serde_json::{json, Value};

use crate::common::world::{AMY, BEN, SUE, SUE_PASSWORD};
use crate::common::{
    admin_cli, household, on_postgres, visit, world_via_cli, ServerProcess, StaffSession, WAIT,
};

/// Households the station holds before the move.
const HOUSEHOLDS: usize = 240;

/// What staff and an admin see of the station: the lists, counts, feed, export, a
/// household's detail and history, the users, devices and the audit log.
async fn what_staff_see(server: &ServerProcess, sample: &[DocumentId]) -> Value {
    let sue = StaffSession::sign_in(&server.http(), SUE, SUE_PASSWORD).await;
    let mut details = Vec::new();
    for id in sample {
        details.push(sue.get_ok(&format!("/households/{id}")).await);
        details.push(sue.get_ok(&format!("/households/{id}/history")).await);
    }
    let (status, csv, _) = sue.get_text("/export.csv").await;
    assert_eq!(status, 200);
    json!({
        "list": sue.get_ok("/households?limit=500").await,
        "open_complaints": sue.get_ok("/households?matter_kind=complaint&limit=500").await,
        "coverage": sue.get_ok("/coverage").await,
        "changes": sue.get_ok("/changes?after=0&limit=1000").await,
        "export": csv,
        "details": details,
        "users": admin_cli(&server.data, &["user", "list"], None).await,
        "devices": admin_cli(&server.data, &["device", "list"], None).await,
        "audit": admin_cli(&server.data, &["audit"], None).await,
    })
}

async fn migrate(from: &str, to: &str) -> std::process::Output {
    tokio::time::timeout(
        WAIT * 4,
        tokio::process::Command::new(env!("CARGO_BIN_EXE_fieldsync"))
            .args(["migrate", "--from", from, "--to", to])
            .env("FIELDSYNC_LOG", "warn")
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("migrate finishes")
    .unwrap()
}

async fn migrate_ok(from: &str, to: &str) -> String {
    let out = migrate(from, to).await;
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert!(
        out.status.success(),
        "migrate {from} -> {to}: {stderr}{stdout}"
    );
    assert!(stderr.contains("documents"), "progress on stderr: {stderr}");
    stdout
}

async fn stop(server: ServerProcess) {
    let mut child = server.child;
    let pid = child.id().unwrap().to_string();
    assert!(std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let exit = tokio::time::timeout(WAIT, child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(exit.success());
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_station_moves_to_postgres_and_back_with_everything() {
    if on_postgres() {
        return;
    }
    use fieldsync::storage::postgres::testing::Cluster;
    let dir = tempfile::tempdir().unwrap();
    let cluster = Cluster::start(dir.path().join("cluster")).await;
    let embedded = dir.path().join("embedded");
    world_via_cli(&embedded).await;
    let server = ServerProcess::start(&embedded).await;

    // Amy registers the households, each with a visit; Ben visits some of them and
    // records a complaint; Sue approves one; a spare device of Ben's is revoked.
    let amy = Device::open(&dir.path().join("amy")).await.unwrap();
    amy.set_token(&server.enrol(AMY).await).await.unwrap();
    let mut ids = Vec::new();
    for n in 0..HOUSEHOLDS {
        let id = amy
            .create_household(&household(&n.to_string()))
            .await
            .unwrap();
        amy.change(id, move |tx| {
            records::add_visit(tx, &visit(AMY, &format!("first visit to {n}"))).map(|_| ())
        })
        .await
        .unwrap();
        ids.push(id);
    }
    assert!(amy.sync(&server.url).await.unwrap().all_held());
    let ben = Device::open(&dir.path().join("ben")).await.unwrap();
    ben.set_token(&server.enrol(BEN).await).await.unwrap();
    for id in ids.iter().step_by(20) {
        ben.track(*id).await.unwrap();
    }
    assert!(ben.sync(&server.url).await.unwrap().all_held());
    for id in ids.iter().step_by(20) {
        ben.change(*id, |tx| {
            records::add_visit(tx, &visit(BEN, "second visit: noise at night")).map(|_| ())
        })
        .await
        .unwrap();
    }
    assert!(ben.sync(&server.url).await.unwrap().all_held());
    let sue = StaffSession::sign_in(&server.http(), SUE, SUE_PASSWORD).await;
    let (status, body) = sue
        .send(
            "POST",
            &format!("/households/{}/review", ids[0]),
            json!({"state": "approved"}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let known = admin_cli(&embedded, &["device", "list"], None).await;
    let spare = server.enrol(BEN).await;
    let devices = admin_cli(&embedded, &["device", "list"], None).await;
    let spare_id = devices
        .lines()
        .find(|l| !known.contains(*l))
        .and_then(|l| l.split_whitespace().next())
        .unwrap()
        .to_string();
    admin_cli(&embedded, &["device", "revoke", &spare_id], None).await;
    let sample = [ids[0], ids[20], ids[HOUSEHOLDS - 1]];
    let before = what_staff_see(&server, &sample).await;
    assert_eq!(before["list"]["total"], HOUSEHOLDS);

    // Refused while the server holds the directory.
    let busy = migrate(path(&embedded), &cluster.url).await;
    assert!(!busy.status.success());
    assert!(
        String::from_utf8_lossy(&busy.stderr).contains("stop it, run migrate"),
        "{}",
        String::from_utf8_lossy(&busy.stderr)
    );
    stop(server).await;

    // Embedded -> PostgreSQL.
    let out = migrate_ok(path(&embedded), &cluster.url).await;
    assert!(
        out.contains(&format!("{} documents (0 already there", HOUSEHOLDS + 1)),
        "every household and the village catalog: {out}"
    );
    assert!(
        out.contains(&format!("{HOUSEHOLDS} households projected")),
        "{out}"
    );
    // Running it again changes nothing, and says so.
    let again = migrate_ok(path(&embedded), &cluster.url).await;
    assert!(
        again.contains(&format!(
            "{} documents ({} already there",
            HOUSEHOLDS + 1,
            HOUSEHOLDS + 1
        )),
        "{again}"
    );
    let on_pg = dir.path().join("pg-server");
    let database = ["--database", cluster.url.as_str()];
    let server = ServerProcess::start_with(&on_pg, &database, &[], Stdio::inherit()).await;
    assert_eq!(what_staff_see(&server, &sample).await, before);
    // Refused while a server uses the database (whichever machine it runs on).
    let busy = migrate(&cluster.url, path(&dir.path().join("early"))).await;
    assert!(!busy.status.success());
    assert!(
        String::from_utf8_lossy(&busy.stderr).contains("a fieldsync server is using the database"),
        "{}",
        String::from_utf8_lossy(&busy.stderr)
    );
    // Devices go on with the tokens they have; the revoked one stays revoked.
    ben.change(ids[20], |tx| {
        records::add_visit(tx, &visit(BEN, "third visit, after the move")).map(|_| ())
    })
    .await
    .unwrap();
    assert!(ben.sync(&server.url).await.unwrap().all_held());
    let refused = Device::open(&dir.path().join("spare")).await.unwrap();
    refused.set_token(&spare).await.unwrap();
    assert!(refused.sync(&server.url).await.is_err());
    let fresh = Device::open(&dir.path().join("fresh-pg")).await.unwrap();
    fresh.set_token(&server.enrol(AMY).await).await.unwrap();
    fresh.track(ids[7]).await.unwrap();
    assert!(fresh.sync(&server.url).await.unwrap().all_held());
    assert_eq!(
        fresh.heads(ids[7]).await.unwrap(),
        amy.heads(ids[7]).await.unwrap()
    );
    let moved = what_staff_see(&server, &sample).await;
    stop(server).await;

    // Once a server has written to the target, copying the old source again would undo
    // that: refused.
    let stale = migrate(path(&embedded), &cluster.url).await;
    assert!(!stale.status.success());
    assert!(
        String::from_utf8_lossy(&stale.stderr).contains("changes made after an earlier migration"),
        "{}",
        String::from_utf8_lossy(&stale.stderr)
    );

    // PostgreSQL -> a new data directory: what the server on PostgreSQL had, including
    // what was written there after the first move.
    let back = dir.path().join("back");
    migrate_ok(&cluster.url, path(&back)).await;
    let server = ServerProcess::start(&back).await;
    assert_eq!(what_staff_see(&server, &sample).await, moved);
    assert!(ben.sync(&server.url).await.unwrap().all_held());
    stop(server).await;

    // A target holding another station's data is refused, and nothing is written to it.
    let other = dir.path().join("other");
    world_via_cli(&other).await;
    let refused = migrate(path(&back), path(&other)).await;
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("holds another server's data"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    drop(cluster);
}
