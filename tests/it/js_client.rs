//! The official JS client (`@automerge/automerge-repo` 2.5.6 with its WebSocket adapter, from
//! npm, under node) as a real peer, authenticated with a device token in the URL: it creates a
//! household, a fresh JS client finds it by URL (in a message the server writes as several
//! WebSocket frames), concurrent offline edits from both merge; a Rust device then sees the
//! same merged record. Without a token it gets 401 first.

use fieldsync::client::Device;
use fieldsync::ids::DocumentId;

use crate::common::{run_js_interop, TestServer};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stock_js_client_syncs_and_merges_offline_edits() {
    let server = TestServer::spawn().await;
    let result = run_js_interop(&[&server.url]).await;

    // Without a token: 401 with the JSON error, before any upgrade; the run then went on.
    assert_eq!(result["noTokenStatus"]["status"], 401);
    assert_eq!(
        result["noTokenStatus"]["body"]["error"]["code"],
        "unauthenticated"
    );

    // B, a fresh client, found A's household by URL and saw its content.
    assert_eq!(result["seenByB"]["village"], "Linsen");
    assert_eq!(result["seenByB"]["address"]["house_no"], "18");
    // ... including a 60,000-character landmark, which reached B in a message longer than
    // the server's largest frame (so written as a fragmented WebSocket message).
    let landmark = result["seenByB"]["address"]["landmark"].as_str().unwrap();
    assert_eq!(landmark.len(), 60_000);
    // After the offline edits both JS clients hold both visits and both premises values.
    assert_eq!(result["headsA"], result["headsB"]);
    assert_eq!(result["visitsA"].as_array().unwrap().len(), 2);
    assert_eq!(
        result["premisesConflictsA"],
        serde_json::json!(["rental", "shop"])
    );

    // A Rust device sees the same merged record from the server.
    let url = result["url"].as_str().unwrap();
    let id = DocumentId::parse_url_or_id(url).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let device = Device::open(dir.path()).await.unwrap();
    device.track(id).await.unwrap();
    assert!(device.sync(&server.url).await.unwrap().all_held());
    let heads: Vec<String> = device
        .heads(id)
        .await
        .unwrap()
        .iter()
        .map(|h| h.to_string())
        .collect();
    let mut js_heads: Vec<String> = result["headsA"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h.as_str().unwrap().to_string())
        .collect();
    js_heads.sort();
    let mut heads_sorted = heads.clone();
    heads_sorted.sort();
    assert_eq!(heads_sorted, js_heads);
    let view = device.household(id).await.unwrap();
    let mut notes: Vec<&str> = view.visits.iter().map(|v| v.notes.as_str()).collect();
    notes.sort();
    assert_eq!(
        notes,
        vec![
            "Neighbour dispute about parking.",
            "Resident reports scooter theft."
        ]
    );
    let mut premises = view.premises.clone();
    premises.sort();
    assert_eq!(premises, vec!["rental", "shop"]);
    server.stop().await;
}
