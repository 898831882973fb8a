//! Several fieldsync processes on one real PostgreSQL (issue 13): a change accepted by one
//! node reaches the devices connected to another, through the database's notifications
//! and the chunks it stores, not through the nodes talking to each other.
//!
//! They need PostgreSQL whatever the suite's backend, so they run in its PostgreSQL pass
//! only (the embedded pass would run the very same thing again).

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use automerge::sync::SyncDoc;
use automerge::Automerge;
use fieldsync::client::Device;
use fieldsync::ids::DocumentId;
use fieldsync::protocol::{DocMessage, Message};
use fieldsync::records;
use fieldsync::storage::postgres::testing::Cluster;

use crate::common::browser::Browser;
use crate::common::world::{AMY, BEN, SUE, SUE_PASSWORD};
use crate::common::{
    admin_cli, household, on_postgres, refused_with_401, run_js_interop, until_readyz, visit,
    world_via_cli, RawPeer, Seen, ServerProcess, StaffSession, WAIT,
};

/// A node on `cluster`, its data directory `dir/name`.
async fn node(dir: &Path, name: &str, cluster: &Cluster) -> ServerProcess {
    ServerProcess::start_with(
        &dir.join(name),
        &["--database", cluster.url.as_str()],
        &[],
        Stdio::inherit(),
    )
    .await
}

/// A throwaway cluster and node `a` on it, with the test world made through its CLI.
async fn first_node(dir: &Path) -> (Cluster, ServerProcess) {
    let cluster = Cluster::start(dir.join("cluster")).await;
    let a = node(dir, "a", &cluster).await;
    world_via_cli(&dir.join("a")).await;
    (cluster, a)
}

/// A peer that keeps its own copy of one document in sync with the server it is connected
/// to, answering every message as a client does.
struct Follower {
    peer: RawPeer,
    id: DocumentId,
    doc: Automerge,
    state: automerge::sync::State,
}

impl Follower {
    async fn subscribe(url: &str, id: DocumentId) -> Follower {
        let mut f = Follower {
            peer: RawPeer::connect(url, "follower").await,
            id,
            doc: Automerge::new(),
            state: automerge::sync::State::new(),
        };
        let data = f.doc.generate_sync_message(&mut f.state).unwrap().encode();
        let request = Message::Request(DocMessage {
            sender_id: f.peer.me.clone(),
            target_id: f.peer.server.clone(),
            document_id: id,
            data,
        });
        f.peer.send(&request).await;
        f
    }

    /// Applies what the server sends until the document has `heads`; `false` if that has
    /// not happened by `deadline`.
    async fn until_heads(
        &mut self,
        heads: &[automerge::ChangeHash],
        deadline: tokio::time::Instant,
    ) -> bool {
        let mut want = heads.to_vec();
        want.sort();
        loop {
            let mut have = self.doc.get_heads();
            have.sort();
            if have == want {
                return true;
            }
            let seen = match tokio::time::timeout_at(deadline, self.peer.next()).await {
                Ok(seen) => seen,
                Err(_) => return false,
            };
            match seen {
                Seen::Msg(Message::Sync(m)) if m.document_id == self.id => {
                    let msg = automerge::sync::Message::decode(&m.data).unwrap();
                    self.doc.receive_sync_message(&mut self.state, msg).unwrap();
                    if let Some(reply) = self.doc.generate_sync_message(&mut self.state) {
                        self.peer.offer(self.id, reply.encode()).await;
                    }
                }
                Seen::Msg(_) => {}
                other => panic!("the follower's connection ended: {other:?}"),
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_accepted_by_one_node_reaches_a_device_on_another_within_a_second() {
    if !on_postgres() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (cluster, a) = first_node(dir.path()).await;
    let amy_token = a.enrol(AMY).await;
    let b = node(dir.path(), "b", &cluster).await;
    // Enrolled through node B, after it started: node A hears of it from the database.
    let ben_token = b.enrol(BEN).await;

    let amy = Device::open(&dir.path().join("amy")).await.unwrap();
    amy.set_token(&amy_token).await.unwrap();
    let id = amy.create_household(&household("5")).await.unwrap();
    assert!(amy.sync(&a.url).await.unwrap().all_held());
    let mut follower = Follower::subscribe(&a.url_with(&amy_token), id).await;
    let fetched_by = tokio::time::Instant::now() + WAIT;
    assert!(
        follower
            .until_heads(&amy.heads(id).await.unwrap(), fetched_by)
            .await
    );

    // Ben's phone talks to node B only: it fetches the household there and adds a visit.
    let ben = Device::open(&dir.path().join("ben")).await.unwrap();
    ben.set_token(&ben_token).await.unwrap();
    ben.track(id).await.unwrap();
    assert!(ben.sync(&b.url).await.unwrap().all_held());
    ben.change(id, |tx| {
        records::add_visit(tx, &visit(BEN, "visited from node B")).map(|_| ())
    })
    .await
    .unwrap();
    assert!(ben.sync(&b.url).await.unwrap().all_held());
    let accepted = tokio::time::Instant::now();
    let heads = ben.heads(id).await.unwrap();
    assert!(
        follower
            .until_heads(&heads, accepted + Duration::from_secs(1))
            .await,
        "the device on node A did not get node B's change within a second"
    );
    let view = fieldsync::records::read_household(&follower.doc).unwrap();
    assert!(view.visits.iter().any(|v| v.notes == "visited from node B"));

    // Staff see the same on either node, and a session opened on one holds on the other.
    let on_a = StaffSession::sign_in(&a.http(), SUE, SUE_PASSWORD).await;
    let list = on_a.get_ok("/households").await;
    assert_eq!(list["total"], 1);
    assert_eq!(list["households"][0]["visit_count"], 1);
    let coverage = on_a.get_ok("/coverage").await;
    let on_b = StaffSession::sign_in(&b.http(), SUE, SUE_PASSWORD).await;
    assert_eq!(on_b.get_ok("/households").await, list);
    assert_eq!(on_b.get_ok("/coverage").await, coverage);
    let carried = StaffSession {
        http: b.http(),
        cookie: on_a.cookie.clone(),
        csrf: on_a.csrf.clone(),
    };
    assert_eq!(carried.get_ok("/households").await, list);

    // And the staff page on either node shows the same dashboard and list.
    let mut seen = Vec::new();
    for n in [&a, &b] {
        let mut page = Browser::launch().await;
        page.sign_in(&n.http(), SUE, SUE_PASSWORD).await;
        let coverage = page
            .eval(
                r#"[...document.querySelectorAll('#coverage tbody tr')].map(r => [r.dataset.village,
                    r.querySelector('[data-col=households]').textContent,
                    r.querySelector('[data-col=visited]').textContent])"#,
            )
            .await;
        page.click("#nav a[href='#/households']").await;
        page.wait_for("document.querySelector('#main').dataset.view === 'list' && document.querySelectorAll('#households tbody tr').length === 1")
            .await;
        let row = page
            .eval("document.querySelector('#households tbody tr').dataset.id")
            .await;
        assert_eq!(row, id.to_string());
        seen.push(coverage);
    }
    assert_eq!(seen[0], seen[1]);
    assert!(
        seen[0].to_string().contains(r#"["Linsen","1","1 (100%)"]"#),
        "{}",
        seen[0]
    );
    a.kill().await;
    b.kill().await;
    drop(cluster);
}

/// The stock JS client on node A and another on node B edit one household offline; after
/// reconnecting both hold both edits (they met only through the database), and a fresh
/// Rust device on node C gets everything, with the same heads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_edits_made_through_two_nodes_merge_and_a_third_serves_them() {
    if !on_postgres() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (cluster, a) = first_node(dir.path()).await;
    let url_a = a.url_with(&a.enrol(AMY).await);
    let b = node(dir.path(), "b", &cluster).await;
    let c = node(dir.path(), "c", &cluster).await;
    let b_token = b.enrol(BEN).await;
    let c_token = c.enrol(BEN).await;
    let url_b = b.url_with(&b_token);
    let result = run_js_interop(&[&url_a, "--b-url", &url_b]).await;
    assert_eq!(result["seenByB"]["address"]["house_no"], "18");
    assert_eq!(result["headsA"], result["headsB"]);
    assert_eq!(result["visitsA"].as_array().unwrap().len(), 2);

    let id = DocumentId::parse_url_or_id(result["url"].as_str().unwrap()).unwrap();
    let fresh = Device::open(&dir.path().join("fresh")).await.unwrap();
    fresh.set_token(&c_token).await.unwrap();
    fresh.track(id).await.unwrap();
    assert!(fresh.sync(&c.url).await.unwrap().all_held());
    let view = fresh.household(id).await.unwrap();
    assert_eq!(view.visits.len(), 2);
    let mut heads: Vec<String> = fresh
        .heads(id)
        .await
        .unwrap()
        .iter()
        .map(|h| h.to_string())
        .collect();
    heads.sort();
    let mut js_heads: Vec<String> = result["headsA"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h.as_str().unwrap().to_string())
        .collect();
    js_heads.sort();
    assert_eq!(heads, js_heads);
    for n in [a, b, c] {
        n.kill().await;
    }
    drop(cluster);
}

/// Revoking a device through node B closes its socket on node A at once (node A hears of
/// the directory change from the database), and its token is then refused on every node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_through_one_node_closes_the_devices_socket_on_another() {
    if !on_postgres() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (cluster, a) = first_node(dir.path()).await;
    let known = admin_cli(&dir.path().join("a"), &["device", "list"], None).await;
    let token = a.enrol(AMY).await;
    let bystander = a.enrol(BEN).await;
    let listed = admin_cli(&dir.path().join("a"), &["device", "list"], None).await;
    let device = listed
        .lines()
        .find(|l| !known.contains(*l) && l.contains("\tamy\t"))
        .and_then(|l| l.split('\t').next())
        .unwrap()
        .to_string();
    let b = node(dir.path(), "b", &cluster).await;
    let mut peer = RawPeer::connect(&a.url_with(&token), "amy-on-a").await;
    let mut other = RawPeer::connect(&a.url_with(&bystander), "ben-on-a").await;

    let out = admin_cli(&dir.path().join("b"), &["device", "revoke", &device], None).await;
    assert!(out.contains("revoked"), "{out}");
    match peer.next().await {
        Seen::Msg(Message::Error(e)) => assert!(e.message.contains("revoked"), "{}", e.message),
        other => panic!("expected an error on node A, got {other:?}"),
    }
    assert!(matches!(peer.next().await, Seen::Closed(1008, _)));
    for n in [&a, &b] {
        assert_eq!(
            refused_with_401(&n.url_with(&token)).await,
            "device_revoked"
        );
    }
    // Everyone else on node A is still served.
    other.request(DocumentId::random()).await;
    assert!(matches!(
        other.next().await,
        Seen::Msg(Message::DocUnavailable(_))
    ));
    a.kill().await;
    b.kill().await;
    drop(cluster);
}

/// Households registered at once through two nodes are all in their village's catalog, on
/// either node: each node's directory follows the other's registrations without losing its
/// own (a reload read while a registration's batch was still open once dropped it, and
/// with it the household's catalog entry), and many registrations at once while the
/// other node's notices arrive do not stall a node (a reload once waited for a pooled
/// connection held by batches that waited for the reload's lock).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn households_registered_at_once_through_two_nodes_are_all_in_the_catalog() {
    if !on_postgres() {
        return;
    }
    const EACH: usize = 40;
    let dir = tempfile::tempdir().unwrap();
    let (cluster, a) = first_node(dir.path()).await;
    let b = node(dir.path(), "b", &cluster).await;
    let mut phones = Vec::new();
    for (user, server) in [(AMY, &a), (BEN, &b)] {
        let code = admin_cli(&dir.path().join("a"), &["device", "enroll", user], None).await;
        let phone = Device::open(&dir.path().join(user)).await.unwrap();
        let answer = phone
            .enroll(&server.http(), code.lines().last().unwrap(), "phone")
            .await
            .unwrap();
        let catalog =
            DocumentId::parse_url_or_id(answer["villages"][0]["catalog_url"].as_str().unwrap())
                .unwrap();
        for n in 0..EACH {
            phone
                .create_household(&household(&format!("{user}-{n}")))
                .await
                .unwrap();
        }
        phones.push((phone, server, catalog));
    }
    // Both phones come back online at once, each to its own node.
    let (amy_sync, ben_sync) = tokio::join!(
        phones[0].0.sync(&phones[0].1.url),
        phones[1].0.sync(&phones[1].1.url)
    );
    assert!(amy_sync.unwrap().all_held() && ben_sync.unwrap().all_held());

    // Each phone's catalog comes to list both phones' households (the other node's entries
    // arrive once its node has heard of them: a bounded wait, syncing again meanwhile).
    for (phone, server, catalog) in &phones {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            assert!(phone.sync(&server.url).await.unwrap().all_held());
            let listed = phone.catalog(*catalog).await.unwrap().households.len();
            if listed == 2 * EACH {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the catalog lists {listed} of {} households",
                2 * EACH
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    a.kill().await;
    b.kill().await;
    drop(cluster);
}

/// `/readyz` on a node whose database stops: it says so within seconds (its listener's
/// probe), acknowledges nothing meanwhile, and is ready again once the database is back,
/// when the device's change goes through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_without_its_database_is_not_ready_and_acknowledges_nothing() {
    if !on_postgres() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (mut cluster, a) = first_node(dir.path()).await;
    let amy = Device::open(&dir.path().join("amy")).await.unwrap();
    amy.set_token(&a.enrol(AMY).await).await.unwrap();
    let id = amy.create_household(&household("7")).await.unwrap();
    assert!(amy.sync(&a.url).await.unwrap().all_held());
    let ready = serde_json::json!({"status": "ready"});
    assert_eq!(until_readyz(&a.http(), 200).await, ready);

    tokio::task::block_in_place(|| cluster.stop());
    assert_eq!(
        until_readyz(&a.http(), 503).await,
        serde_json::json!({"status": "not ready", "failing": ["database"]})
    );
    amy.change(id, |tx| {
        records::add_visit(tx, &visit(AMY, "while the database was down")).map(|_| ())
    })
    .await
    .unwrap();
    // Refused with a reason, at once (not left to time out), and nothing acknowledged.
    match amy.sync(&a.url).await {
        Err(fieldsync::client::ClientError::Server(reason)) => {
            assert!(reason.contains("could not store"), "{reason}")
        }
        other => panic!("expected the server to refuse the change, got {other:?}"),
    }

    tokio::task::block_in_place(|| cluster.start_again());
    assert_eq!(until_readyz(&a.http(), 200).await, ready);
    assert!(amy.sync(&a.url).await.unwrap().all_held());
    let on_a = StaffSession::sign_in(&a.http(), SUE, SUE_PASSWORD).await;
    let detail = on_a.get_ok(&format!("/households/{id}")).await;
    assert!(
        detail.to_string().contains("while the database was down"),
        "{detail}"
    );
    a.kill().await;
    drop(cluster);
}

/// The stock JS client on node A and a Rust device on node B edit one household offline;
/// after reconnecting both hold both visits with the same heads, and a fresh device on
/// node C gets everything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_js_client_on_one_node_and_a_rust_device_on_another_merge_offline_edits() {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    if !on_postgres() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (cluster, a) = first_node(dir.path()).await;
    let b = node(dir.path(), "b", &cluster).await;
    let c = node(dir.path(), "c", &cluster).await;
    let url_a = a.url_with(&a.enrol(AMY).await);
    let ben_token = b.enrol(BEN).await;
    let fresh_token = c.enrol(BEN).await;

    let mut js = tokio::process::Command::new("node")
        .arg(crate::common::js_dir().join("interop.mjs"))
        .args([url_a.as_str(), "--pause"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("node runs");
    let mut stdin = js.stdin.take().unwrap();
    let mut lines = BufReader::new(js.stdout.take().unwrap()).lines();
    let mut next = async || -> serde_json::Value {
        let line = tokio::time::timeout(WAIT, lines.next_line())
            .await
            .expect("the JS client answers")
            .unwrap()
            .expect("a line from the JS client");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"))
    };
    // The JS client has created the household on A, and is now offline recording a visit.
    let created = next().await;
    let id = DocumentId::parse_url_or_id(created["url"].as_str().unwrap()).unwrap();

    // Ben's phone on B fetches it, then records a visit offline too.
    let ben = Device::open(&dir.path().join("ben")).await.unwrap();
    ben.set_token(&ben_token).await.unwrap();
    ben.track(id).await.unwrap();
    assert!(ben.sync(&b.url).await.unwrap().all_held());
    ben.change(id, |tx| {
        records::add_visit(tx, &visit(BEN, "Recorded offline on the Rust device.")).map(|_| ())
    })
    .await
    .unwrap();

    // Both come back.
    stdin.write_all(b"go\n").await.unwrap();
    assert!(ben.sync(&b.url).await.unwrap().all_held());
    let merged = next().await;
    assert_eq!(merged["visitsA"].as_array().unwrap().len(), 2, "{merged}");
    let mut js_heads: Vec<String> = merged["headsA"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h.as_str().unwrap().to_string())
        .collect();
    js_heads.sort();
    let heads_of = |hs: Vec<automerge::ChangeHash>| {
        let mut v: Vec<String> = hs.iter().map(|h| h.to_string()).collect();
        v.sort();
        v
    };
    // Ben's phone gets the JS client's visit from B (a bounded wait: it came through A).
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        assert!(ben.sync(&b.url).await.unwrap().all_held());
        if ben.household(id).await.unwrap().visits.len() == 2 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "ben never got the JS visit"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(heads_of(ben.heads(id).await.unwrap()), js_heads);

    // A fresh device on C gets everything, with the same heads.
    let fresh = Device::open(&dir.path().join("fresh")).await.unwrap();
    fresh.set_token(&fresh_token).await.unwrap();
    fresh.track(id).await.unwrap();
    assert!(fresh.sync(&c.url).await.unwrap().all_held());
    let notes: Vec<String> = fresh
        .household(id)
        .await
        .unwrap()
        .visits
        .iter()
        .map(|v| v.notes.clone())
        .collect();
    assert_eq!(notes.len(), 2, "{notes:?}");
    assert_eq!(heads_of(fresh.heads(id).await.unwrap()), js_heads);
    js.wait().await.unwrap();
    for n in [a, b, c] {
        n.kill().await;
    }
    drop(cluster);
}
