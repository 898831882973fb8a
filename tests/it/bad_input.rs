//! Bad input closes only the offending connection, with an `error` message and a close code
//! that says why; a healthy device keeps syncing throughout and nothing stored is lost.

use fieldsync::client::Device;
use fieldsync::ids::DocumentId;
use fieldsync::protocol::{DocMessage, Message};
use fieldsync::records;
use tokio_tungstenite::tungstenite::Message as WsMessage;

use crate::common::{household, visit, RawPeer, TestServer};

const LIMIT: usize = 64 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_frames_close_only_their_connection() {
    let server = TestServer::spawn_with(|c| c.max_message_bytes = LIMIT).await;
    let dir = tempfile::tempdir().unwrap();
    let healthy = Device::open(dir.path()).await.unwrap();
    let id = healthy.create_household(&household("7")).await.unwrap();
    assert!(healthy.sync(&server.url).await.unwrap().all_held());

    // A long-lived healthy raw peer subscribed to the household stays connected throughout.
    let mut watcher = RawPeer::connect(&server.url, "watcher").await;
    watcher.request(id).await;
    assert!(matches!(
        watcher.next().await,
        crate::common::Seen::Msg(Message::Sync(_))
    ));

    // 1. Malformed CBOR.
    let mut p = RawPeer::connect(&server.url, "garbage").await;
    p.send_raw(WsMessage::binary(vec![0xff, 0x00, 0x13])).await;
    let (error, code) = p.expect_error_and_close().await;
    assert_eq!(code, 1002);
    assert!(error.contains("malformed message"), "{error}");

    // 2. A frame over the size limit.
    let mut p = RawPeer::connect(&server.url, "oversized").await;
    p.send_raw(WsMessage::binary(vec![0u8; LIMIT * 2])).await;
    let (error, code) = p.expect_error_and_close().await;
    assert_eq!(code, 1009);
    assert!(error.contains("exceeds the limit"), "{error}");

    // 3. A well-formed sync message whose Automerge bytes are garbage, for a real document.
    let mut p = RawPeer::connect(&server.url, "bad-automerge").await;
    let msg = Message::Sync(DocMessage {
        sender_id: p.me.clone(),
        target_id: p.server.clone(),
        document_id: id,
        data: b"\x42this is not automerge".to_vec(),
    });
    p.send(&msg).await;
    let (error, code) = p.expect_error_and_close().await;
    assert_eq!(code, 1002);
    assert!(
        error.contains("not an Automerge sync message") || error.contains("could not be applied"),
        "{error}"
    );

    // 4. Text frames are not part of the protocol.
    let mut p = RawPeer::connect(&server.url, "texter").await;
    p.send_raw(WsMessage::text("{\"type\":\"join\"}")).await;
    let (_, code) = p.expect_error_and_close().await;
    assert_eq!(code, 1003);

    // 5. Anything before `join`.
    let (mut ws, _) = tokio_tungstenite::connect_async(&server.url).await.unwrap();
    use futures_util::{SinkExt, StreamExt};
    let request = fieldsync::protocol::codec::encode(&Message::Leave {
        sender_id: fieldsync::ids::PeerId::new("early").unwrap(),
    });
    ws.send(WsMessage::binary(request)).await.unwrap();
    let mut saw_close = None;
    while let Some(Ok(frame)) = ws.next().await {
        if let WsMessage::Close(Some(f)) = frame {
            saw_close = Some(u16::from(f.code));
            break;
        }
    }
    assert_eq!(saw_close, Some(1002));

    // The healthy device kept working: it records a visit and syncs, and the watcher that
    // asked for this household hears of it.
    healthy
        .change(id, |tx| {
            records::add_visit(tx, &visit("officer-a", "after the noise"))
        })
        .await
        .unwrap();
    assert!(healthy.sync(&server.url).await.unwrap().all_held());
    let heads = healthy.heads(id).await.unwrap();
    loop {
        match watcher.next().await {
            crate::common::Seen::Msg(Message::Sync(m)) => {
                let s = automerge::sync::Message::decode(&m.data).unwrap();
                if s.heads == heads {
                    break;
                }
            }
            other => panic!("watcher lost: {other:?}"),
        }
    }

    // Nothing stored was lost: a fresh device gets the whole household.
    let fresh = Device::open(&dir.path().join("fresh")).await.unwrap();
    fresh.track(id).await.unwrap();
    fresh.sync(&server.url).await.unwrap();
    assert_eq!(fresh.heads(id).await.unwrap(), heads);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_documents_are_unavailable_and_the_connection_stays_open() {
    let server = TestServer::spawn().await;
    let mut p = RawPeer::connect(&server.url, "asker").await;
    let mut asked = Vec::new();
    for _ in 0..3 {
        let doc = DocumentId::random();
        asked.push(doc);
        p.request(doc).await;
        match p.next().await {
            crate::common::Seen::Msg(Message::DocUnavailable(m)) => {
                assert_eq!(m.document_id, doc);
                assert_eq!(m.target_id, p.me);
            }
            other => panic!("expected doc-unavailable, got {other:?}"),
        }
    }
    for doc in asked {
        assert!(
            !server.services.document_exists(doc).await.unwrap(),
            "nothing stored for {doc}"
        );
    }
    server.stop().await;
}
