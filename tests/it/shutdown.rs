//! SIGTERM: open WebSockets get close 1001, the store is flushed, the process exits 0, and
//! the data is there after a restart.

use fieldsync::client::Device;

use crate::common::{household, RawPeer, Seen, ServerProcess, WAIT};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_closes_sockets_with_1001_and_exits_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut server = ServerProcess::start(&data).await;
    let device = Device::open(&dir.path().join("phone")).await.unwrap();
    let id = device.create_household(&household("9")).await.unwrap();
    assert!(device.sync(&server.url).await.unwrap().all_held());

    let mut peer = RawPeer::connect(&server.url, "listener").await;
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
    fresh.track(id).await.unwrap();
    assert!(fresh.sync(&server.url).await.unwrap().all_held());
    assert_eq!(
        fresh.heads(id).await.unwrap(),
        device.heads(id).await.unwrap()
    );
    server.kill().await;
}
