//! With a cache budget smaller than the data, syncing many documents keeps the loaded bytes
//! within the budget, and evicted documents reload intact.

use fieldsync::client::Device;
use fieldsync::records;

use crate::common::{household, visit, TestServer};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_documents_stay_within_the_cache_budget_and_reload_intact() {
    const BUDGET: usize = 96 * 1024;
    const DOCS: usize = 40;
    let server = TestServer::spawn_with(|c| c.hub.cache_budget_bytes = BUDGET).await;
    let dir = tempfile::tempdir().unwrap();
    let a = Device::open(&dir.path().join("a")).await.unwrap();
    let mut ids = Vec::new();
    for i in 0..DOCS {
        let id = a
            .create_household(&household(&i.to_string()))
            .await
            .unwrap();
        a.change(id, move |tx| {
            for n in 0..5 {
                let notes = format!("household {i}, visit {n}: {}", "notes ".repeat(20));
                records::add_visit(tx, &visit("officer-a", &notes))?;
            }
            Ok(())
        })
        .await
        .unwrap();
        ids.push(id);
    }
    assert!(a.sync(&server.url).await.unwrap().all_held());

    let stats = server.services.hub.cache_stats();
    // Each household counts what it takes in memory (at least 18 KiB), so 40 of them are
    // far over a 96 KiB budget: most must have left memory.
    assert!(
        stats.evictions >= (DOCS - 5) as u64,
        "most documents were evicted: {stats:?}"
    );
    assert!(stats.evictions > 0, "{stats:?}");
    assert!(stats.loaded_bytes <= BUDGET, "{stats:?}");
    // Loaded and still-closing documents together: the budget, plus what the loaded ones
    // grew by after being admitted at an empty document's estimate (a few KiB each; 40
    // households would be 1 MiB if nothing waited).
    assert!(stats.peak_loaded_bytes <= 2 * BUDGET, "{stats:?}");
    assert!(stats.waits_for_room > 0, "{stats:?}");

    // A fresh device fetches every household: evicted ones reload from disk intact.
    let b = Device::open(&dir.path().join("b")).await.unwrap();
    for id in &ids {
        b.track(*id).await.unwrap();
    }
    assert!(b.sync(&server.url).await.unwrap().all_held());
    for (i, id) in ids.iter().enumerate() {
        assert_eq!(b.heads(*id).await.unwrap(), a.heads(*id).await.unwrap());
        let view = b.household(*id).await.unwrap();
        assert_eq!(view.visits.len(), 5);
        assert!(view.visits[0]
            .notes
            .starts_with(&format!("household {i}, visit")));
    }
    let after = server.services.hub.cache_stats();
    assert!(after.peak_loaded_bytes <= 2 * BUDGET, "{after:?}");
    assert!(
        after.loads > DOCS as u64,
        "evicted documents were loaded again: {after:?}"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_document_is_unloaded_and_reloads_intact() {
    let server = TestServer::spawn_with(|c| {
        c.hub.idle_unload_after = std::time::Duration::from_millis(300);
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let a = Device::open(&dir.path().join("a")).await.unwrap();
    let id = a.create_household(&household("1")).await.unwrap();
    a.change(id, |tx| {
        records::add_visit(tx, &visit("officer-a", "first"))
    })
    .await
    .unwrap();
    assert!(a.sync(&server.url).await.unwrap().all_held());
    let loads = server.services.hub.cache_stats().loads;

    // Nobody asks for anything: every loaded document leaves memory by itself.
    let hub = server.services.hub.clone();
    let deadline = std::time::Instant::now() + crate::common::WAIT;
    while hub.cache_stats().loaded_docs > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "idle documents stayed loaded: {:?}",
            hub.cache_stats()
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }

    // It reloads intact for a new device, and takes the next visit.
    let b = crate::common::fetching_device(&dir.path().join("b"), &server.url, id).await;
    assert_eq!(b.heads(id).await.unwrap(), a.heads(id).await.unwrap());
    a.change(id, |tx| {
        records::add_visit(tx, &visit("officer-a", "second"))
    })
    .await
    .unwrap();
    assert!(a.sync(&server.url).await.unwrap().all_held());
    assert!(hub.cache_stats().loads > loads, "it was loaded again");
    let fresh = crate::common::fetching_device(&dir.path().join("c"), &server.url, id).await;
    let mut notes: Vec<String> = fresh
        .household(id)
        .await
        .unwrap()
        .visits
        .iter()
        .map(|v| v.notes.clone())
        .collect();
    notes.sort();
    assert_eq!(notes, vec!["first", "second"]);
    server.stop().await;
}
