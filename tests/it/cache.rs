//! With a cache budget smaller than the data, syncing many documents keeps the loaded bytes
//! within the budget, and evicted documents reload intact.

use fieldsync::client::Device;
use fieldsync::records;

use crate::common::{household, visit, TestServer};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_documents_stay_within_the_cache_budget_and_reload_intact() {
    const BUDGET: usize = 24 * 1024;
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
    let stored: usize = {
        let mut total = 0;
        for id in &ids {
            total += server.services.store.load(*id).await.unwrap().total_bytes();
        }
        total
    };
    assert!(
        stored > 2 * BUDGET,
        "the data ({stored} B) must exceed the budget for this test to mean anything"
    );
    assert!(stats.evictions > 0, "{stats:?}");
    assert!(stats.loaded_bytes <= BUDGET, "{stats:?}");
    assert!(stats.peak_loaded_bytes <= BUDGET, "{stats:?}");

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
    assert!(after.peak_loaded_bytes <= BUDGET, "{after:?}");
    assert!(
        after.loads > DOCS as u64,
        "evicted documents were loaded again: {after:?}"
    );
    server.stop().await;
}
