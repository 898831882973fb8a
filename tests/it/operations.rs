//! What docs/operations.md tells station IT to do, done as far as a test can: the systemd
//! unit in deploy/ is accepted by systemd's own checker (Debian's systemd) with its
//! hardening intact.

use std::path::PathBuf;

/// `deploy/fieldsync.service`, its binary path pointed at the one under test (the checker
/// refuses a unit whose program does not exist).
fn unit_under_test(dir: &std::path::Path) -> PathBuf {
    let unit = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("deploy/fieldsync.service"),
    )
    .unwrap();
    assert!(unit.contains("ExecStart=/usr/local/bin/fieldsync serve"));
    let path = dir.join("fieldsync.service");
    std::fs::write(
        &path,
        unit.replace("/usr/local/bin/fieldsync", env!("CARGO_BIN_EXE_fieldsync")),
    )
    .unwrap();
    path
}

fn systemd_analyze(args: &[&str]) -> std::process::Output {
    std::process::Command::new("systemd-analyze")
        .args(args)
        .output()
        .expect(
            "systemd-analyze runs (Debian: apt-get install systemd; tests/run-all.sh installs it)",
        )
}

#[test]
fn the_systemd_unit_is_accepted_by_systemd_and_keeps_its_hardening() {
    let dir = tempfile::tempdir().unwrap();
    let unit = unit_under_test(dir.path());
    let unit_s = unit.display().to_string();
    let out = systemd_analyze(&["verify", &unit_s]);
    // `verify` exits 0 on settings it ignores, and says so on stderr: both must be clean.
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "systemd-analyze verify: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = systemd_analyze(&["security", "--offline=yes", &unit_s]);
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    let exposure: f64 = text
        .split("Overall exposure level for fieldsync.service:")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in: {text}"));
    // systemd rates 0 (locked down) to 10 (unprotected); "OK" is below 2.
    assert!(exposure < 2.0, "exposure {exposure}: {text}");
}

/// A disk that stops answering: `/readyz` turns `not ready` naming the store, and the change
/// waiting on it is not acknowledged. (The `stall-flushes` failpoint hangs every flush
/// while its file exists in the data directory.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_turns_when_the_embedded_stores_flushes_hang() {
    use crate::common::world::AMY;
    use crate::common::{household, http, on_postgres, until_readyz, world_via_cli, ServerProcess};
    if on_postgres() {
        return; // the embedded store's flusher; the PostgreSQL side is in nodes.rs
    }
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    world_via_cli(&data).await;
    let server = ServerProcess::start_with(
        &data,
        &["--failpoint", "stall-flushes"],
        &[],
        std::process::Stdio::inherit(),
    )
    .await;
    let token = server.enrol(AMY).await;
    let readyz = format!("{}/readyz", server.http());
    let (status, body, _) = http("GET", &readyz, None, &[]).await;
    assert_eq!(
        (status, body),
        (200, serde_json::json!({"status": "ready"}))
    );

    std::fs::write(data.join("stall-flushes"), b"").unwrap();
    let phone = fieldsync::client::Device::open(&dir.path().join("amy"))
        .await
        .unwrap();
    phone.set_token(&token).await.unwrap();
    phone.create_household(&household("1")).await.unwrap();
    let url = server.url.clone();
    let syncing = tokio::spawn(async move { phone.sync(&url).await.map(|r| r.all_held()) });
    assert_eq!(
        until_readyz(&server.http(), 503).await,
        serde_json::json!({"status": "not ready", "failing": ["store"]})
    );
    assert!(
        !syncing.is_finished() || !matches!(syncing.await, Ok(Ok(true))),
        "a change was acknowledged while no flush completed"
    );
    server.kill().await;
}
