//! Ephemeral messages reach the document's other peers and are never stored; documents a
//! client did not ask for are never announced to it.

use fieldsync::client::Device;
use fieldsync::ids::DocumentId;
use fieldsync::protocol::{Ephemeral, Message};
use fieldsync::records;

use crate::common::{household, visit, RawPeer, Seen, TestServer};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ephemeral_messages_are_relayed_to_the_documents_peers_only() {
    let server = TestServer::spawn().await;
    let dir = tempfile::tempdir().unwrap();
    let a = Device::open(dir.path()).await.unwrap();
    let id = a.create_household(&household("3")).await.unwrap();
    assert!(a.sync(&server.url).await.unwrap().all_held());
    let heads_before = a.heads(id).await.unwrap();

    let mut p1 = RawPeer::connect(&server.url, "p1").await;
    let mut p2 = RawPeer::connect(&server.url, "p2").await;
    let mut outsider = RawPeer::connect(&server.url, "outsider").await;
    for p in [&mut p1, &mut p2] {
        p.request(id).await;
        assert!(matches!(p.next().await, Seen::Msg(Message::Sync(_))));
    }

    p1.send(&Message::Ephemeral(Ephemeral {
        sender_id: p1.me.clone(),
        target_id: p1.server.clone(),
        document_id: id,
        session_id: "cursor-session".into(),
        count: 1,
        data: b"cursor at visit 2".to_vec(),
    }))
    .await;
    match p2.next().await {
        Seen::Msg(Message::Ephemeral(e)) => {
            assert_eq!(e.sender_id.as_str(), "p1", "the original sender is kept");
            assert_eq!(e.target_id, p2.me);
            assert_eq!(e.data, b"cursor at visit 2");
            assert_eq!(e.count, 1);
        }
        other => panic!("p2 expected the ephemeral message, got {other:?}"),
    }

    // The outsider never asked for the household: a change to it is not announced. It asks
    // for an unknown document afterwards; the answer to that is the first thing it hears.
    a.change(id, |tx| {
        records::add_visit(tx, &visit("officer-a", "late note"))
    })
    .await
    .unwrap();
    assert!(a.sync(&server.url).await.unwrap().all_held());
    let probe = DocumentId::random();
    outsider.request(probe).await;
    match outsider.next().await {
        Seen::Msg(Message::DocUnavailable(m)) => assert_eq!(m.document_id, probe),
        other => panic!("the outsider heard something it did not ask for: {other:?}"),
    }

    // The ephemeral message changed nothing stored.
    let fresh = Device::open(&dir.path().join("fresh")).await.unwrap();
    fresh.track(id).await.unwrap();
    fresh.sync(&server.url).await.unwrap();
    let view = fresh.household(id).await.unwrap();
    assert_eq!(view.visits.len(), 1);
    assert_ne!(fresh.heads(id).await.unwrap(), heads_before);
    server.stop().await;
}
