//! Abuse that must cost the server a bounded amount, and writes that must not reach past a
//! device's scope (issue 10): one test per finding, each asserting what an operator or a
//! user would notice. Where the finding was about the process (descriptors, permissions, a
//! crash) the real binary runs.

use std::net::IpAddr;
use std::process::Stdio;
use std::time::{Duration, Instant};

use fieldsync::client::Device;
use fieldsync::ids::DocumentId;
use fieldsync::protocol::Message;
use fieldsync::records;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio_tungstenite::tungstenite::Message as WsMessage;

use crate::common::world::{AMY, SUE, SUE_PASSWORD, VILLAGE};
use crate::common::{
    admin_cli, household, http, visit, world_via_cli, RawPeer, ServerProcess, StaffSession,
    TestServer, WAIT,
};

/// Waits (bounded) until `cond` holds, checking every 20 ms: for state the server changes
/// in the background after a connection ends, which no message announces.
async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A raw HTTP/1.1 exchange on a fresh connection; returns (status, body).
async fn raw_http(http_base: &str, request: String) -> (u16, String) {
    let addr = http_base.trim_start_matches("http://");
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut out))
        .await
        .expect("the server answers")
        .unwrap();
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    (status, body)
}

/// A household with `visits` visits (notes `visit 0`, `visit 1`, …), each synced in its own
/// change by Amy's phone.
async fn household_with_visits(
    server: &TestServer,
    dir: &std::path::Path,
    visits: usize,
) -> DocumentId {
    let amy = Device::open(&dir.join("amy")).await.unwrap();
    let id = amy.create_household(&household("8")).await.unwrap();
    for n in 0..visits {
        amy.change(id, move |tx| {
            records::add_visit(tx, &visit(AMY, &format!("visit {n}")))
        })
        .await
        .unwrap();
        assert!(amy.sync(&server.url).await.unwrap().all_held());
    }
    id
}

fn sign_in_body(name: &str, password: &str) -> serde_json::Value {
    serde_json::json!({"name": name, "password": password})
}

// ---- 1. sign-in: bounded password work, per-address throttle ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sign_in_flood_hashes_a_bounded_number_of_passwords_at_once() {
    let server = TestServer::spawn_with(|c| {
        c.accounts.max_concurrent_password_checks = 1;
        c.accounts.sign_in_address_throttle.free_failures = 1000;
    })
    .await;
    let url = format!("{}/api/v1/session", server.http);
    // 24 different names at once: each passes the per-name throttle.
    let attempts = (0..24).map(|i| {
        let url = url.clone();
        async move {
            http(
                "POST",
                &url,
                Some(sign_in_body(&format!("guess{i}"), "x")),
                &[],
            )
            .await
        }
    });
    let results = futures_util::future::join_all(attempts).await;
    let busy: Vec<_> = results.iter().filter(|(s, _, _)| *s == 503).collect();
    assert!(
        results.iter().all(|(s, _, _)| *s == 401 || *s == 503),
        "{:?}",
        results.iter().map(|r| r.0).collect::<Vec<_>>()
    );
    assert!(
        !busy.is_empty(),
        "one hash at a time: the rest are told to retry"
    );
    assert_eq!(busy[0].1["error"]["code"], "busy");

    // The staff member signs in once the flood is over.
    let (status, body, _) = http("POST", &url, Some(sign_in_body(SUE, SUE_PASSWORD)), &[]).await;
    assert_eq!(status, 200, "{body}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallel_wrong_passwords_are_counted_before_they_finish() {
    let server = TestServer::spawn_with(|c| {
        c.accounts.max_concurrent_password_checks = 64;
    })
    .await;
    let url = format!("{}/api/v1/session", server.http);
    // 30 wrong passwords for one account at once: no more than the free ones are checked.
    let attempts = (0..30).map(|_| {
        let url = url.clone();
        async move { http("POST", &url, Some(sign_in_body(SUE, "wrong guess")), &[]).await }
    });
    let results = futures_util::future::join_all(attempts).await;
    let checked = results.iter().filter(|(s, _, _)| *s == 401).count();
    let throttled = results.iter().filter(|(s, _, _)| *s == 429).count();
    assert!(checked <= 6, "{checked} wrong passwords were checked");
    assert_eq!(checked + throttled, 30);

    // The same for enrolment codes guessed in parallel from one address (10 free).
    let url = format!("{}/api/v1/devices/enroll", server.http);
    let guesses = (0..30).map(|i| {
        let url = url.clone();
        async move {
            let body = serde_json::json!({"code": format!("AAAA-BBBB-{i:04}"), "device_name": "x"});
            http("POST", &url, Some(body), &[]).await
        }
    });
    let results = futures_util::future::join_all(guesses).await;
    let checked = results.iter().filter(|(s, _, _)| *s == 401).count();
    assert!(checked <= 11, "{checked} enrolment codes were checked");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sign_in_is_throttled_per_address_and_a_trusted_proxy_names_the_client() {
    let server = TestServer::spawn_with(|c| {
        c.listen.trusted_proxies = vec!["127.0.0.1".parse::<IpAddr>().unwrap()];
        c.accounts.sign_in_address_throttle.free_failures = 3;
    })
    .await;
    let url = format!("{}/api/v1/session", server.http);
    let mut statuses = Vec::new();
    for i in 0..6 {
        let (status, _, _) = http(
            "POST",
            &url,
            Some(sign_in_body(&format!("name{i}"), "guess")),
            &[("x-forwarded-for", "198.51.100.7")],
        )
        .await;
        statuses.push(status);
    }
    // Different names each time: only the address throttle can stop this.
    assert_eq!(statuses, vec![401, 401, 401, 401, 429, 429]);
    // The staff member behind the same proxy, from another address, is not locked out.
    let (status, body, _) = http(
        "POST",
        &url,
        Some(sign_in_body(SUE, SUE_PASSWORD)),
        &[("x-forwarded-for", "198.51.100.8")],
    )
    .await;
    assert_eq!(status, 200, "{body}");
    server.stop().await;
}

// ---- 2. connections: header deadline, cap, handshake deadline ----

/// Descriptors the process holds open.
fn open_descriptors(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_sent_headers_cannot_exhaust_descriptors_or_block_administration() {
    let dir = tempfile::tempdir().unwrap();
    let station = crate::common::StationData::new(dir.path()).await;
    let data = station.data.clone();
    world_via_cli(&data).await;
    const CAP: usize = 64;
    let server = ServerProcess::start_with(
        &data,
        &[
            "--max-connections",
            &CAP.to_string(),
            "--header-read-timeout-secs",
            "3",
        ],
        &[],
        Stdio::null(),
    )
    .await;
    let pid = server.child.id().unwrap();
    let before = open_descriptors(pid);
    let addr = server.http().trim_start_matches("http://").to_string();
    // 300 clients each send half a header and then nothing.
    let mut idle = Vec::new();
    for _ in 0..300 {
        let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
        let _ = s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n").await;
        idle.push(s);
    }
    // Administration works during the attack (the admin socket has descriptors left), and
    // so does a client that sends its request at once: it takes the place of the oldest
    // connection still waiting for a header.
    let out = admin_cli(&data, &["device", "list"], None).await;
    assert!(!out.contains("error"), "{out}");
    let (status, _, _) = http("GET", &format!("{}/healthz", server.http()), None, &[]).await;
    assert_eq!(status, 200, "a real client is served during the attack");
    let during = open_descriptors(pid);
    // On PostgreSQL the server also opens database connections as it needs them (its pool
    // of 16 and the listener's): bounded too, but not by the connection cap.
    let database = if crate::common::on_postgres() { 17 } else { 0 };
    assert!(
        during <= before + CAP + database,
        "{during} descriptors open (started with {before}, cap {CAP}, database {database})"
    );
    // The server hangs up on every one of them: after the header deadline, or at once
    // beyond the cap.
    for mut s in idle {
        let mut buf = [0u8; 256];
        let read = tokio::time::timeout(WAIT, s.read(&mut buf))
            .await
            .expect("the server closes a connection that never finishes its header");
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    }
    // And serves again, and says it is ready (its store flushes; on PostgreSQL its
    // listener follows the database).
    let (status, _, _) = http("GET", &format!("{}/healthz", server.http()), None, &[]).await;
    assert_eq!(status, 200);
    let (status, body, _) = http("GET", &format!("{}/readyz", server.http()), None, &[]).await;
    assert_eq!(
        (status, body),
        (200, serde_json::json!({"status": "ready"}))
    );
    server.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websockets_count_against_the_connection_cap() {
    let server = TestServer::spawn_with(|c| c.listen.max_connections = 4).await;
    let mut held = Vec::new();
    for i in 0..4 {
        held.push(RawPeer::connect(&server.url, &format!("phone-{i}")).await);
    }
    // A fifth connection is closed without an answer: every place is a joined WebSocket.
    let fifth = tokio_tungstenite::connect_async(&server.url).await;
    assert!(fifth.is_err(), "a fifth connection was served");
    // One phone leaves; its place is free again.
    drop(held.pop());
    let deadline = Instant::now() + WAIT;
    loop {
        if tokio_tungstenite::connect_async(&server.url).await.is_ok() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the freed place was never reused"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_that_never_joins_is_closed_even_if_it_answers_pings() {
    let server = TestServer::spawn_with(|c| {
        c.join_timeout = Duration::from_secs(1);
        c.ping_interval = Duration::from_millis(200);
    })
    .await;
    let (mut ws, _) = tokio_tungstenite::connect_async(&server.url).await.unwrap();
    let started = Instant::now();
    // Reading answers the server's pings (tungstenite replies with pongs).
    let close = loop {
        match tokio::time::timeout(WAIT, ws.next()).await.unwrap() {
            Some(Ok(WsMessage::Close(Some(f)))) => break (u16::from(f.code), f.reason.to_string()),
            Some(Ok(_)) => continue,
            other => panic!("expected a close frame, got {other:?}"),
        }
    };
    assert_eq!(close.0, 1008);
    assert!(close.1.contains("join"), "{}", close.1);
    assert!(started.elapsed() < WAIT);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_normal_close_gets_the_servers_close_frame_back() {
    let server = TestServer::spawn().await;
    let (mut ws, _) = tokio_tungstenite::connect_async(&server.url).await.unwrap();
    ws.send(WsMessage::Close(Some(
        tokio_tungstenite::tungstenite::protocol::CloseFrame {
            code: 1000.into(),
            reason: "bye".into(),
        },
    )))
    .await
    .unwrap();
    let reply = tokio::time::timeout(WAIT, ws.next()).await.unwrap();
    assert!(
        matches!(&reply, Some(Ok(WsMessage::Close(Some(f)))) if u16::from(f.code) == 1000),
        "expected the close handshake to complete, got {reply:?}"
    );
    server.stop().await;
}

// ---- 3. documents that cost memory but store nothing ----

/// The first sync message of an empty document (what a client sends to offer a new one).
fn empty_sync() -> Vec<u8> {
    use automerge::sync::SyncDoc;
    let mut state = automerge::sync::State::new();
    automerge::Automerge::new()
        .generate_sync_message(&mut state)
        .unwrap()
        .encode()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn made_up_documents_are_bounded_per_connection_and_unloaded_when_it_ends() {
    const BUDGET: usize = 1024 * 1024;
    let server = TestServer::spawn_with(|c| {
        c.hub.cache_budget_bytes = BUDGET;
        c.hub.max_ungranted_docs_per_connection = 100;
    })
    .await;
    let mut p = RawPeer::connect(&server.url, "prober").await;
    let mut ids = Vec::new();
    for _ in 0..60 {
        let doc = DocumentId::random();
        ids.push(doc);
        p.offer(doc, empty_sync()).await;
    }
    // Each counts against the cache budget although it stores nothing: at most a budget's
    // worth stays loaded.
    let hub = server.services.hub.clone();
    eventually("every made-up document loaded once", || {
        hub.cache_stats().loads >= 60
    })
    .await;
    // Once the last of them has loaded (a load counts from its start, at a small estimate;
    // on PostgreSQL a load takes round trips), empty documents must count against the
    // budget: at most a budget's worth stays.
    eventually(
        "at most a budget's worth of made-up documents loaded",
        || hub.cache_stats().loaded_docs <= BUDGET / (64 * 1024) + 1,
    )
    .await;
    // Past the per-connection bound the connection is closed with a reason.
    for _ in 0..60 {
        p.offer(DocumentId::random(), empty_sync()).await;
    }
    let (error, code) = p.expect_error_and_close().await;
    assert_eq!(code, 1008);
    assert!(error.contains("new documents in progress"), "{error}");
    // Nothing was stored, and once the connection is gone nothing stays loaded.
    eventually("made-up documents unloaded", || {
        hub.cache_stats().loaded_docs == 0
    })
    .await;
    for id in ids {
        assert!(!server.services.document_exists(id).await.unwrap());
    }
    server.stop().await;
}

// ---- 4. operations per change and per document ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_past_the_operation_limits_are_refused_before_they_are_applied() {
    let server = TestServer::spawn_with(|c| {
        c.hub.max_ops_per_change = 10_000;
        c.hub.max_ops_per_document = 40_000;
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let amy = Device::open(&dir.path().join("amy")).await.unwrap();
    let id = amy.create_household(&household("5")).await.unwrap();
    // A few visits first, so that the next change travels as a change (a peer sends its
    // whole document instead when the new part is a third of it or more).
    for n in 0..3 {
        amy.change(id, move |tx| {
            records::add_visit(tx, &visit(AMY, &format!("visit {n}")))
        })
        .await
        .unwrap();
    }
    assert!(amy.sync(&server.url).await.unwrap().all_held());
    let held = amy.heads(id).await.unwrap();

    // One change of 50,000 characters (it compresses to a few hundred bytes).
    amy.change(id, |tx| {
        records::add_visit(tx, &visit(AMY, &"x".repeat(50_000)))
    })
    .await
    .unwrap();
    let refused = amy.sync(&server.url).await;
    let text = format!("{refused:?}");
    assert!(
        text.contains("exceeds the limit of 10000 per change"),
        "{text}"
    );

    // Another device is served as usual meanwhile, and the server kept nothing of it.
    let fresh = crate::common::fetching_device(&dir.path().join("fresh"), &server.url, id).await;
    assert_eq!(fresh.heads(id).await.unwrap(), held);

    // Changes under the per-change limit until the document would pass its own limit.
    let ben = Device::open(&dir.path().join("ben")).await.unwrap();
    let url = server.url_for(crate::common::world::BEN).await;
    let id = ben.create_household(&household("6")).await.unwrap();
    let mut refusal = None;
    for n in 0..8 {
        ben.change(id, move |tx| {
            records::add_visit(tx, &visit("ben", &format!("{n}{}", "y".repeat(8_000))))
        })
        .await
        .unwrap();
        match ben.sync(&url).await {
            Ok(r) if r.all_held() => continue,
            other => {
                refusal = Some(format!("{other:?}"));
                break;
            }
        }
    }
    let refusal = refusal.expect("the document limit was reached");
    assert!(refusal.contains("per document"), "{refusal}");
    server.stop().await;
}

// ---- 5. entry keys cannot steer a staff click into another household ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entry_keys_that_are_not_uuids_quarantine_and_cannot_reach_another_household() {
    let server = TestServer::spawn().await;
    let dir = tempfile::tempdir().unwrap();
    let amy = Device::open(&dir.path().join("amy")).await.unwrap();
    // The victim: a household with a real follow-up.
    let victim = amy.create_household(&household("1")).await.unwrap();
    let fid = amy
        .change(victim, |tx| {
            records::add_follow_up(
                tx,
                &records::NewFollowUp {
                    matter: None,
                    task: "return the bicycle".into(),
                    owner: AMY.into(),
                    due_ms: 1_790_000_000_000,
                },
            )
        })
        .await
        .unwrap();
    // The trap: a follow-up whose key is a path into the victim.
    let trap = amy.create_household(&household("2")).await.unwrap();
    let hostile = format!("x/../../../{victim}/follow-ups/{fid}");
    let key = hostile.clone();
    amy.change(trap, move |tx| {
        use automerge::transaction::Transactable;
        use automerge::ReadDoc;
        let (_, map) = tx.get(automerge::ROOT, "follow_ups")?.unwrap();
        let f = tx.put_object(&map, key.as_str(), automerge::ObjType::Map)?;
        tx.put(&f, "task", "click close")?;
        tx.put(&f, "status", "todo")?;
        Ok(())
    })
    .await
    .unwrap();
    assert!(amy.sync(&server.url).await.unwrap().all_held());

    let sue = StaffSession::sign_in(&server.http, SUE, SUE_PASSWORD).await;
    let q = sue.get_ok("/households?quarantined=true").await;
    assert_eq!(q["total"], 1, "{q}");
    assert_eq!(q["households"][0]["id"], trap.to_string());
    let reasons = q["households"][0]["quarantine"].to_string();
    assert!(reasons.contains("entry keys must be UUIDs"), "{reasons}");

    // The API checks the id against the household named in the path.
    let encoded: String = hostile
        .bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect();
    let close = serde_json::json!({"status": "done"});
    let (status, _) = sue
        .send(
            "PATCH",
            &format!("/households/{trap}/follow-ups/{encoded}"),
            close.clone(),
        )
        .await;
    assert_eq!(status, 404);
    let (status, _) = sue
        .send(
            "PATCH",
            &format!("/households/{trap}/follow-ups/{fid}"),
            close,
        )
        .await;
    assert_eq!(
        status, 404,
        "the victim's follow-up is not in this household"
    );
    let detail = sue.get_ok(&format!("/households/{victim}")).await;
    assert!(
        detail.to_string().contains("\"status\":\"todo\""),
        "the victim's follow-up is untouched: {detail}"
    );
    server.stop().await;
}

// ---- 6. the staff views agree with the documents after a crash ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_between_a_change_and_its_projection_is_caught_up_at_start() {
    // The embedded store only: on PostgreSQL the chunk and its projection rows commit in one
    // transaction, so there is no such gap (`an_accepted_batch_commits_or_rolls_back_as_one`).
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    world_via_cli(&data).await;
    let amy = Device::open(&dir.path().join("amy")).await.unwrap();
    let id = amy.create_household(&household("9")).await.unwrap();
    let server = ServerProcess::start(&data).await;
    amy.set_token(&server.enrol(AMY).await).await.unwrap();
    assert!(amy.sync(&server.url).await.unwrap().all_held());
    server.kill().await;

    // The next change stops after its chunk and provenance are on disk, before the
    // projection row is written; then the process is killed.
    let server = ServerProcess::start_with(
        &data,
        &[],
        &[("FIELDSYNC_FAILPOINT", "stall-before-projection")],
        Stdio::piped(),
    )
    .await;
    let mut server = server;
    let stderr = server.child.stderr.take().unwrap();
    amy.change(id, |tx| {
        records::add_visit(tx, &visit(AMY, "just before the crash"))
    })
    .await
    .unwrap();
    let url = server.url.clone();
    // The sync cannot finish (the server stalls); it ends when the process is killed.
    let pushing = tokio::spawn(async move {
        let _ = tokio::time::timeout(WAIT, amy.sync(&url)).await;
    });
    let mut lines = BufReader::new(stderr).lines();
    loop {
        let line = tokio::time::timeout(WAIT, lines.next_line())
            .await
            .expect("the failpoint is reached")
            .unwrap()
            .expect("the server is still running");
        if line.contains("failpoint stall-before-projection reached") {
            break;
        }
    }
    server.kill().await;
    let _ = pushing.await;

    let server = ServerProcess::start(&data).await;
    let http_base = server.http();
    let sue = StaffSession::sign_in(&http_base, SUE, SUE_PASSWORD).await;
    let list = sue.get_ok(&format!("/households?village={VILLAGE}")).await;
    let row = &list["households"][0];
    assert_eq!(row["id"], id.to_string());
    assert_eq!(
        row["visit_count"], 1,
        "the list agrees with the document: {row}"
    );
    let (status, csv, _) = sue.get_text("/export.csv").await;
    assert_eq!(status, 200);
    assert!(csv.contains("just before the crash"), "{csv}");
    server.kill().await;
}

// ---- 7. the data directory is private ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_data_directory_is_private_and_an_open_one_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let station = crate::common::StationData::new(dir.path()).await;
    let data = station.data.clone();
    let server = ServerProcess::start(&data).await;
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&data), 0o700);
    for entry in std::fs::read_dir(&data).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            assert_eq!(
                mode(&path) & 0o077,
                0,
                "{} is open to others",
                path.display()
            );
        }
    }
    server.kill().await;

    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = crate::common::serve_expecting_refusal(&data).await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("open to other users"), "{err}");
    assert!(err.contains("chmod 700"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_store_is_refused_in_one_clear_line_not_served_empty() {
    // sled's own files: the embedded store only.
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    world_via_cli(&data).await;
    // sled opens a database file full of zeros as a fresh, empty database: without a check
    // the server would start with no accounts and no records.
    let db = data.join("db");
    let len = std::fs::metadata(&db).unwrap().len() as usize;
    std::fs::write(&db, vec![0u8; len]).unwrap();
    let out = crate::common::serve_expecting_refusal(&data).await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("storage is corrupt"), "{err}");
    assert!(
        err.contains("restore the data directory from a backup"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    assert!(!err.contains("stack backtrace"), "{err}");
}

// ---- 8. the rest: sessions, names, bodies ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_endpoints_refuse_forms_and_foreign_origins() {
    let server = TestServer::spawn().await;
    let body = sign_in_body(SUE, SUE_PASSWORD).to_string();
    let host = server.http.trim_start_matches("http://").to_string();
    let post = |headers: String, body: String| {
        let http = server.http.clone();
        let host = host.clone();
        async move {
            raw_http(
                &http,
                format!(
                    "POST /api/v1/session HTTP/1.1\r\nHost: {host}\r\n{headers}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                ),
            )
            .await
            .0
        }
    };
    let json = "Content-Type: application/json\r\n";
    // A cross-site form can send text/plain without a preflight.
    let status = post(
        "Origin: http://evil.example\r\nContent-Type: text/plain\r\n".into(),
        body.clone(),
    )
    .await;
    assert_eq!(status, 415);
    let status = post(
        format!("Origin: http://evil.example\r\n{json}"),
        body.clone(),
    )
    .await;
    assert_eq!(status, 403);
    // Its own page (same origin) signs in.
    let status = post(format!("Origin: http://{host}\r\n{json}"), body.clone()).await;
    assert_eq!(status, 200);
    // Behind TLS (--secure-cookies) the session cookie is `Secure`.
    let tls = TestServer::spawn_with(|c| c.secure_cookies = true).await;
    let (status, _, cookie) = http(
        "POST",
        &format!("{}/api/v1/session", tls.http),
        Some(sign_in_body(SUE, SUE_PASSWORD)),
        &[],
    )
    .await;
    assert_eq!(status, 200);
    assert!(cookie.unwrap().contains("; Secure"));
    tls.stop().await;
    // An oversized body is 413, not another route's 405.
    let status = post(json.into(), "x".repeat(64 * 1024)).await;
    assert_eq!(status, 413);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signing_out_with_a_bearer_token_ends_that_session_only() {
    let server = TestServer::spawn().await;
    let a = StaffSession::sign_in(&server.http, SUE, SUE_PASSWORD).await;
    let b = StaffSession::sign_in(&server.http, SUE, SUE_PASSWORD).await;
    let b_token = b.cookie.split('=').nth(1).unwrap().to_string();
    // B's token as a bearer, A's cookie riding along, B's CSRF token.
    let (status, body, _) = http(
        "DELETE",
        &format!("{}/api/v1/session", server.http),
        None,
        &[
            ("authorization", &format!("Bearer {b_token}")),
            ("cookie", &a.cookie),
            ("x-csrf-token", &b.csrf),
        ],
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(a.get("/me").await.0, 200, "the cookie's session goes on");
    assert_eq!(b.get("/me").await.0, 401, "the bearer's session ended");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_names_with_terminal_escapes_are_refused() {
    let server = TestServer::spawn().await;
    let code = server.enrolment_code(AMY).await;
    let (status, body, _) = http(
        "POST",
        &format!("{}/api/v1/devices/enroll", server.http),
        Some(serde_json::json!({"code": code, "device_name": "phone\u{1b}[2J\u{1b}[31mREVOKED"})),
        &[],
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("control characters"));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_staff_edit_that_would_break_the_record_is_refused() {
    let server = TestServer::spawn().await;
    let dir = tempfile::tempdir().unwrap();
    let amy = Device::open(&dir.path().join("amy")).await.unwrap();
    let (id, member) = crate::common::household_with_member(&amy, &server.url, "3").await;
    let sue = StaffSession::sign_in(&server.http, SUE, SUE_PASSWORD).await;
    let (status, body) = sue
        .send(
            "PATCH",
            &format!("/households/{id}/members/{member}"),
            serde_json::json!({"field": "name", "value": ""}),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    let q = sue.get_ok("/households?quarantined=true").await;
    assert_eq!(q["total"], 0, "{q}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sign_in_names_cannot_forge_log_lines_and_unknown_names_are_not_logged() {
    let dir = tempfile::tempdir().unwrap();
    let station = crate::common::StationData::new(dir.path()).await;
    let data = station.data.clone();
    world_via_cli(&data).await;
    let mut server =
        ServerProcess::start_with(&data, &[], &[("FIELDSYNC_LOG", "info")], Stdio::piped()).await;
    let stderr = server.child.stderr.take().unwrap();
    let url = format!("{}/api/v1/session", server.http());
    let (status, _, _) = http(
        "POST",
        &url,
        Some(sign_in_body("my-secret-passw0rd", "oops")),
        &[],
    )
    .await;
    assert_eq!(status, 401);
    let (status, _, _) = http(
        "POST",
        &url,
        Some(sign_in_body(&format!("{SUE}\nFORGED admin signed in"), "x")),
        &[],
    )
    .await;
    assert_eq!(status, 401);
    // A marker request whose log line tells us the two above were logged already.
    let (status, _, _) = http("POST", &url, Some(sign_in_body(SUE, "wrong")), &[]).await;
    assert_eq!(status, 401);
    let mut lines = BufReader::new(stderr).lines();
    let mut seen = Vec::new();
    loop {
        let line = tokio::time::timeout(WAIT, lines.next_line())
            .await
            .expect("the server logs sign-in refusals")
            .unwrap()
            .unwrap();
        let done =
            line.contains("wrong password") && line.contains(SUE) && !line.contains("FORGED");
        seen.push(line);
        if done {
            break;
        }
    }
    let text = seen.join("\n");
    assert!(!text.contains("my-secret-passw0rd"), "{text}");
    assert!(
        !seen.iter().any(|l| l.starts_with("FORGED")),
        "a name started a log line of its own: {text}"
    );
    server.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sync_for_a_household_out_of_scope_is_answered_as_for_a_made_up_id() {
    let server = TestServer::spawn().await;
    let dir = tempfile::tempdir().unwrap();
    // Cat's household, in a village Amy does not work in.
    let cat = Device::open(&dir.path().join("cat")).await.unwrap();
    let cat_url = server.url_for(crate::common::world::CAT).await;
    let mut theirs = household("4");
    theirs.village = crate::common::world::OTHER_VILLAGE.into();
    theirs.address.village = crate::common::world::OTHER_VILLAGE.into();
    let existing = cat.create_household(&theirs).await.unwrap();
    assert!(cat.sync(&cat_url).await.unwrap().all_held());

    let mut answers = Vec::new();
    for doc in [existing, DocumentId::random()] {
        let mut p = RawPeer::connect(&server.url, "prober").await;
        p.offer(doc, empty_sync()).await;
        match p.next().await {
            crate::common::Seen::Msg(Message::Sync(m)) => answers.push(m.data),
            other => panic!("expected a sync answer for {doc}, got {other:?}"),
        }
    }
    assert_eq!(
        answers[0], answers[1],
        "existence must not show in the answer"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_requests_from_a_reading_client_is_paced_not_cut_off() {
    // A small outbound queue, so that a burst is many times larger than it.
    let server = TestServer::spawn_with(|c| c.outbox_len = 16).await;
    let mut p = RawPeer::connect(&server.url, "big-village").await;
    const BURST: usize = 2000;
    for _ in 0..BURST {
        p.request(DocumentId::random()).await;
    }
    // The client reads everything it asked for; it is never told it is too slow.
    for n in 0..BURST {
        match p.next().await {
            crate::common::Seen::Msg(Message::DocUnavailable(_)) => {}
            other => panic!("answer {n} of {BURST}: {other:?}"),
        }
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_households_history_is_served_in_bounded_pages() {
    let server = TestServer::spawn().await;
    let dir = tempfile::tempdir().unwrap();
    let id = household_with_visits(&server, dir.path(), 4).await;
    let sue = StaffSession::sign_in(&server.http, SUE, SUE_PASSWORD).await;
    let first = sue
        .get_ok(&format!("/households/{id}/history?limit=2"))
        .await;
    assert_eq!(first["changes"].as_array().unwrap().len(), 2);
    assert_eq!(first["total"], 5);
    assert_eq!(first["next_offset"], 2);
    let last = sue
        .get_ok(&format!("/households/{id}/history?offset=4&limit=2"))
        .await;
    assert_eq!(last["changes"].as_array().unwrap().len(), 1);
    assert_eq!(last["next_offset"], serde_json::Value::Null);
    let (status, body) = sue
        .get(&format!("/households/{id}/history?limit=100000"))
        .await;
    assert_eq!(status, 400, "{body}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_households_visits_are_served_in_bounded_pages() {
    let server = TestServer::spawn().await;
    let dir = tempfile::tempdir().unwrap();
    let id = household_with_visits(&server, dir.path(), 5).await;
    let sue = StaffSession::sign_in(&server.http, SUE, SUE_PASSWORD).await;
    let notes = |d: &serde_json::Value| -> Vec<String> {
        d["visits"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v["value"]["notes"].as_str().unwrap().to_string())
            .collect()
    };
    let latest = sue
        .get_ok(&format!("/households/{id}?visits_limit=2"))
        .await;
    assert_eq!(notes(&latest), vec!["visit 3", "visit 4"]);
    assert_eq!(latest["visits_total"], 5);
    assert_eq!(latest["visits_next_offset"], 2);
    assert_eq!(latest["value"]["visits"].as_object().unwrap().len(), 2);
    let oldest = sue
        .get_ok(&format!("/households/{id}?visits_limit=2&visits_offset=4"))
        .await;
    assert_eq!(notes(&oldest), vec!["visit 0"]);
    assert_eq!(oldest["visits_next_offset"], serde_json::Value::Null);
    let (status, _) = sue
        .get(&format!("/households/{id}?visits_limit=5000"))
        .await;
    assert_eq!(status, 400);
    server.stop().await;
}
