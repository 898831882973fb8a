//! Rust device clients against a real server on loopback: offline edits merge, heads agree
//! everywhere, and a reconnect with nothing new costs a few hundred bytes.

use fieldsync::client::{Device, DocSyncOutcome};
use fieldsync::records::{self, Premises};

use crate::common::world::{SUE, SUE_PASSWORD};
use crate::common::{household, visit, StaffSession, TestServer};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_officers_edit_one_household_offline_and_both_records_survive() {
    let server = TestServer::spawn().await;
    let dir = tempfile::tempdir().unwrap();
    let a = Device::open(&dir.path().join("a")).await.unwrap();
    let b = Device::open(&dir.path().join("b")).await.unwrap();

    // Officer A registers the household and syncs; officer B fetches it by URL.
    let id = a.create_household(&household("12")).await.unwrap();
    assert_eq!(a.unsynced().await.unwrap(), vec![id]);
    assert!(a.sync(&server.url).await.unwrap().all_held());
    assert!(a.unsynced().await.unwrap().is_empty());
    b.track(id).await.unwrap();
    let report = b.sync(&server.url).await.unwrap();
    assert_eq!(report.docs[&id].outcome, DocSyncOutcome::Held);
    assert_eq!(
        b.household(id).await.unwrap().address_label,
        "Zhongzheng Linsen 3 Linsen S. Rd No. 12"
    );

    // Both go offline: each records a visit, and each corrects `premises` differently.
    a.change(id, |tx| {
        records::add_visit(tx, &visit("officer-a", "Resident reports scooter theft."))?;
        records::set_premises(tx, Premises::Rental)
    })
    .await
    .unwrap();
    b.change(id, |tx| {
        records::add_visit(tx, &visit("officer-b", "Neighbour dispute about parking."))?;
        records::set_premises(tx, Premises::Shop)
    })
    .await
    .unwrap();
    assert_eq!(a.unsynced().await.unwrap(), vec![id]);

    // Back in coverage, in either order; A syncs again to pick up B's visit.
    assert!(a.sync(&server.url).await.unwrap().all_held());
    assert!(b.sync(&server.url).await.unwrap().all_held());
    assert!(a.sync(&server.url).await.unwrap().all_held());

    // A fresh device shows what the server holds.
    let c = Device::open(&dir.path().join("c")).await.unwrap();
    c.track(id).await.unwrap();
    c.sync(&server.url).await.unwrap();
    let (ha, hb, hc) = (
        a.heads(id).await.unwrap(),
        b.heads(id).await.unwrap(),
        c.heads(id).await.unwrap(),
    );
    assert_eq!(ha, hb);
    assert_eq!(ha, hc);

    for device in [&a, &b, &c] {
        let view = device.household(id).await.unwrap();
        let notes: Vec<&str> = view.visits.iter().map(|v| v.notes.as_str()).collect();
        assert!(
            notes.contains(&"Resident reports scooter theft."),
            "{notes:?}"
        );
        assert!(
            notes.contains(&"Neighbour dispute about parking."),
            "{notes:?}"
        );
        let mut premises = view.premises.clone();
        premises.sort();
        assert_eq!(
            premises,
            vec!["rental", "shop"],
            "both values of the contested field"
        );
    }
    assert!(a.unsynced().await.unwrap().is_empty());
    assert!(b.unsynced().await.unwrap().is_empty());
    server.stop().await;
}

/// Twelve officers record a visit in one household while offline, more than the eight heads
/// after which the server merges them with a change of its own: every device ends with every
/// visit and the same few heads, the stored document reloads with the merge, and the staff
/// history lists the officers' changes only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_offline_edits_of_one_household_are_merged_into_few_heads() {
    const OFFICERS: usize = 12;
    let server = TestServer::spawn().await;
    let dir = tempfile::tempdir().unwrap();
    let first = Device::open(&dir.path().join("0")).await.unwrap();
    let id = first.create_household(&household("12")).await.unwrap();
    assert!(first.sync(&server.url).await.unwrap().all_held());
    let mut devices = vec![first];
    for i in 1..OFFICERS {
        let d = Device::open(&dir.path().join(i.to_string())).await.unwrap();
        d.track(id).await.unwrap();
        assert!(d.sync(&server.url).await.unwrap().all_held());
        devices.push(d);
    }
    for (i, d) in devices.iter().enumerate() {
        d.change(id, move |tx| {
            records::add_visit(tx, &visit(&format!("officer-{i}"), &format!("visit {i}")))
        })
        .await
        .unwrap();
    }
    let merges_before = fieldsync::metrics::HEADS_MERGED.get();
    // Back in coverage one by one, then once more to pick up the others' visits.
    for _ in 0..2 {
        for d in &devices {
            assert!(d.sync(&server.url).await.unwrap().all_held());
        }
    }
    assert!(fieldsync::metrics::HEADS_MERGED.get() > merges_before);

    let heads = devices[0].heads(id).await.unwrap();
    assert!(
        (1..=8).contains(&heads.len()),
        "twelve concurrent visits, merged after the ninth: {heads:?}"
    );
    for d in &devices {
        assert_eq!(d.heads(id).await.unwrap(), heads);
        let view = d.household(id).await.unwrap();
        let mut notes: Vec<String> = view.visits.iter().map(|v| v.notes.clone()).collect();
        notes.sort();
        let mut expected: Vec<String> = (0..OFFICERS).map(|i| format!("visit {i}")).collect();
        expected.sort();
        assert_eq!(notes, expected);
    }
    let store = server.services.documents.clone();
    let stored = tokio::task::spawn_blocking(move || store.load(id).unwrap().hydrate().unwrap())
        .await
        .unwrap();
    assert_eq!(
        stored.get_heads(),
        heads,
        "the merge change is stored with its batch"
    );

    let sue = StaffSession::sign_in(&server.http, SUE, SUE_PASSWORD).await;
    let history = sue
        .get_ok(&format!("/households/{id}/history?limit=50"))
        .await;
    assert_eq!(
        history["total"],
        OFFICERS + 1,
        "registration and twelve visits: {history}"
    );
    for change in history["changes"].as_array().unwrap() {
        assert!(
            !change["author"].is_null(),
            "every listed change has its officer: {change}"
        );
    }
    server.stop().await;
}

/// Bound on a no-change resync of one document: both sync messages (heads and an empty bloom
/// filter) with their CBOR envelope (type, peer ids, document id), both directions.
const RECONNECT_BYTES_PER_DOC: usize = 450;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnecting_with_persisted_sync_state_and_no_edits_is_cheap() {
    let server = TestServer::spawn().await;
    let dir = tempfile::tempdir().unwrap();
    let a = Device::open(&dir.path().join("a")).await.unwrap();
    let mut ids = Vec::new();
    for i in 0..10 {
        let id = a
            .create_household(&household(&i.to_string()))
            .await
            .unwrap();
        for n in 0..20 {
            a.change(id, move |tx| {
                records::add_visit(tx, &visit("officer-a", &format!("visit {n}: all quiet")))
            })
            .await
            .unwrap();
        }
        ids.push(id);
    }
    let first = a.sync(&server.url).await.unwrap();
    assert!(first.all_held());
    let first_bytes: usize = first.docs.values().map(|d| d.bytes).sum();

    // Reopen the device as a phone would after a restart, and sync again with no edits.
    drop(a);
    let a = loop {
        match Device::open(&dir.path().join("a")).await {
            Ok(d) => break d,
            Err(_) => tokio::task::yield_now().await, // the old store handle is still closing
        }
    };
    let again = a.sync(&server.url).await.unwrap();
    assert!(again.all_held());
    let most = ids.iter().map(|id| again.docs[id].bytes).max().unwrap();
    eprintln!(
        "no-change reconnect: at most {most} bytes per document (first sync: {first_bytes} for 10)"
    );
    for id in &ids {
        let d = &again.docs[id];
        assert!(!d.received_changes);
        assert!(
            d.bytes <= RECONNECT_BYTES_PER_DOC,
            "document {id}: {} bytes on a no-change reconnect (first sync: {first_bytes} for all)",
            d.bytes
        );
    }
    server.stop().await;
}
