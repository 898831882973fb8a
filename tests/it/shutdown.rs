//! SIGTERM: open WebSockets get close 1001, the store is flushed, the process exits 0, and
//! the data is there after a restart.

use fieldsync::client::Device;

use crate::common::{household, world_via_cli, RawPeer, Seen, ServerProcess, WAIT};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_closes_sockets_with_1001_and_exits_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let station = crate::common::StationData::new(dir.path()).await;
    let data = station.data.clone();
    world_via_cli(&data).await;
    let mut server = ServerProcess::start(&data).await;
    let device = Device::open(&dir.path().join("phone")).await.unwrap();
    device.set_token(&server.enrol("amy").await).await.unwrap();
    let id = device.create_household(&household("9")).await.unwrap();
    assert!(device.sync(&server.url).await.unwrap().all_held());

    let listener_url = server.url_with(&server.enrol("ben").await);
    let mut peer = RawPeer::connect(&listener_url, "listener").await;
    let pid = server.child.id().unwrap().to_string();
    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(status.success());
    match peer.next().await {
        Seen::Closed(code, reason) => {
            assert_eq!(code, 1001);
            assert!(reason.contains("shutting down"), "{reason}");
        }
        other => panic!("expected close 1001, got {other:?}"),
    }
    let exit = tokio::time::timeout(WAIT, server.child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(exit.success(), "exit status {exit:?}");

    let server = ServerProcess::start(&data).await;
    let fresh = Device::open(&dir.path().join("fresh")).await.unwrap();
    fresh.set_token(&server.enrol("ben").await).await.unwrap();
    fresh.track(id).await.unwrap();
    assert!(fresh.sync(&server.url).await.unwrap().all_held());
    assert_eq!(
        fresh.heads(id).await.unwrap(),
        device.heads(id).await.unwrap()
    );
    server.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_server_on_the_same_data_dir_says_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let station = crate::common::StationData::new(dir.path()).await;
    let data = station.data.clone();
    let first = ServerProcess::start(&data).await;
    let out = crate::common::serve_expecting_refusal(&data).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("in use by another fieldsync process"),
        "{stderr}"
    );
    first.kill().await;
}
