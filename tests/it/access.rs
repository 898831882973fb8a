//! Access control as officers and staff meet it: scope by station and village, answers that
//! do not reveal existence, registration of new households, read-only staff, enrolment codes,
//! revocation and disabled accounts closing live connections, catalogs for discovery, and
//! provenance for every accepted change.

use std::sync::Arc;
use std::time::Duration;

use automerge::sync::SyncDoc;
use automerge::transaction::Transactable;
use fieldsync::accounts::{AccountsError, AdminCommand};
use fieldsync::client::{ClientError, Device, DocSyncOutcome};
use fieldsync::ids::{DocumentId, ManualClock, Timestamp};
use fieldsync::protocol::{DocMessage, Message};
use fieldsync::records;

use crate::common::{household, http, refused_with_401, visit, world, RawPeer, Seen, TestServer};

/// A device of `user` with its own store, enrolled on `server`.
async fn device(server: &TestServer, dir: &tempfile::TempDir, name: &str, user: &str) -> Device {
    let d = Device::open(&dir.path().join(name)).await.unwrap();
    d.set_token(&server.enrol(user).await).await.unwrap();
    d
}

/// What a raw peer hears back for a `request` of `doc`, with the document id blanked so two
/// answers can be compared.
async fn answer_to_request(peer: &mut RawPeer, doc: DocumentId) -> Message {
    peer.request(doc).await;
    match peer.next().await {
        Seen::Msg(Message::DocUnavailable(m)) => {
            assert_eq!(m.document_id, doc);
            Message::DocUnavailable(DocMessage {
                document_id: DocumentId::from_bytes([0; 16]),
                ..m
            })
        }
        other => panic!("expected doc-unavailable, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_stations_household_looks_exactly_like_a_missing_one() {
    let server = TestServer::spawn().await;
    let dir = tempfile::tempdir().unwrap();
    let amy = device(&server, &dir, "amy", world::AMY).await;
    let id = amy.create_household(&household("5")).await.unwrap();
    assert!(amy.sync(&server.sync_base).await.unwrap().all_held());
    let heads = amy.heads(id).await.unwrap();

    // dan works in a village of the same name, in another station; cat in another village
    // of amy's station. Neither may read it, and the answer is the one for a missing document.
    for user in [world::DAN, world::CAT] {
        let url = server.url_for(user).await;
        let mut peer = RawPeer::connect(&url, user).await;
        let missing = answer_to_request(&mut peer, DocumentId::random()).await;
        let theirs = answer_to_request(&mut peer, id).await;
        assert_eq!(theirs, missing, "{user} can tell the document exists");

        // Writing: a sync message carrying a change for that document is not applied.
        let mut forged = automerge::Automerge::new();
        let mut tx = forged.transaction();
        tx.put(automerge::ROOT, "village", "Linsen").unwrap();
        tx.commit();
        let mut state = automerge::sync::State::new();
        let data = forged.generate_sync_message(&mut state).unwrap().encode();
        peer.offer(id, data).await;
        // The first message offers no change yet: it is answered as for an id nobody has
        // (an empty document's reply); the change that follows is refused.
        let reply = match peer.next().await {
            Seen::Msg(Message::Sync(m)) => m,
            other => panic!("expected the answer for an unknown document, got {other:?}"),
        };
        forged
            .receive_sync_message(
                &mut state,
                automerge::sync::Message::decode(&reply.data).unwrap(),
            )
            .unwrap();
        let data = forged.generate_sync_message(&mut state).unwrap().encode();
        peer.offer(id, data).await;
        match peer.next().await {
            Seen::Msg(Message::DocUnavailable(m)) => assert_eq!(m.document_id, id),
            other => panic!("expected doc-unavailable for a write, got {other:?}"),
        }
    }

    // Nothing changed: a second device of amy's village gets exactly amy's heads.
    let ben = device(&server, &dir, "ben", world::BEN).await;
    ben.track(id).await.unwrap();
    assert!(ben.sync(&server.sync_base).await.unwrap().all_held());
    assert_eq!(ben.heads(id).await.unwrap(), heads);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_household_outside_the_officers_villages_is_refused_and_nothing_is_stored() {
    let server = TestServer::spawn().await;
    let dir = tempfile::tempdir().unwrap();
    // cat works in Dongmen; the sample household is in Linsen. dan's station is another one
    // than the household names.
    for (user, name) in [(world::CAT, "cat"), (world::DAN, "dan")] {
        let d = device(&server, &dir, name, user).await;
        let id = d.create_household(&household("8")).await.unwrap();
        let report = d.sync(&server.sync_base).await.unwrap();
        assert_eq!(
            report.docs[&id].outcome,
            DocSyncOutcome::Unavailable,
            "{user}"
        );
        assert!(
            !server.services.document_exists(id).await.unwrap(),
            "{user}: bytes of a refused household were stored"
        );
        assert!(server
            .services
            .accounts
            .with_directory(|dir| dir.household(id).is_none()));
        // And nobody can fetch it.
        let amy = device(&server, &dir, &format!("amy-{name}"), world::AMY).await;
        amy.track(id).await.unwrap();
        let report = amy.sync(&server.sync_base).await.unwrap();
        assert_eq!(report.docs[&id].outcome, DocSyncOutcome::Unavailable);
    }
    // The same household from an officer of Linsen is registered to Linsen.
    let amy = device(&server, &dir, "amy", world::AMY).await;
    let id = amy.create_household(&household("8")).await.unwrap();
    assert!(amy.sync(&server.sync_base).await.unwrap().all_held());
    let village = server
        .services
        .accounts
        .with_directory(|dir| dir.household(id).map(|h| h.village.to_string()));
    assert_eq!(village.as_deref(), Some(world::VILLAGE));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn staff_syncing_a_household_cannot_change_it() {
    let server = TestServer::spawn().await;
    let dir = tempfile::tempdir().unwrap();
    let amy = device(&server, &dir, "amy", world::AMY).await;
    let id = amy.create_household(&household("3")).await.unwrap();
    assert!(amy.sync(&server.sync_base).await.unwrap().all_held());

    let mut sue = device(&server, &dir, "sue", world::SUE).await;
    sue.track(id).await.unwrap();
    assert!(
        sue.sync(&server.sync_base).await.unwrap().all_held(),
        "staff read"
    );
    assert_eq!(
        sue.household(id).await.unwrap().address_label,
        amy.household(id).await.unwrap().address_label
    );
    sue.change(id, |tx| {
        records::add_visit(tx, &visit("sue", "edited by staff"))
    })
    .await
    .unwrap();
    // The server never takes the change, so this session cannot settle; bound it.
    sue.sync_timeout = Duration::from_secs(3);
    match sue.sync(&server.sync_base).await {
        Err(ClientError::Timeout(_)) => {}
        Ok(report) => assert_ne!(report.docs[&id].outcome, DocSyncOutcome::Held),
        Err(e) => panic!("unexpected: {e}"),
    }
    let fresh = device(&server, &dir, "ben", world::BEN).await;
    fresh.track(id).await.unwrap();
    assert!(fresh.sync(&server.sync_base).await.unwrap().all_held());
    assert_eq!(fresh.heads(id).await.unwrap(), amy.heads(id).await.unwrap());
    assert!(fresh.household(id).await.unwrap().visits.is_empty());
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_enrolment_code_works_once_and_expires() {
    let clock = Arc::new(ManualClock::new(Timestamp::from_millis(1_790_000_000_000)));
    let server = TestServer::spawn_with_clock(|_| {}, clock.clone()).await;
    let enroll = |code: String| {
        let url = format!("{}/api/v1/devices/enroll", server.http);
        async move {
            http(
                "POST",
                &url,
                Some(serde_json::json!({"code": code, "device_name": "phone"})),
                &[],
            )
            .await
        }
    };
    let code = server.enrolment_code(world::AMY).await;
    let (status, body, _) = enroll(code.clone()).await;
    assert_eq!(status, 201, "{body}");
    assert!(body["token"].as_str().unwrap().starts_with("fsd_"));
    assert_eq!(body["user"], world::AMY);
    assert_eq!(body["villages"][0]["name"], world::VILLAGE);

    let (status, body, _) = enroll(code).await;
    assert_eq!(status, 401);
    assert_eq!(body["error"]["code"], "bad_enrolment_code");

    let code = server.enrolment_code(world::AMY).await;
    clock.advance(Duration::from_secs(16 * 60));
    let (status, body, _) = enroll(code).await;
    assert_eq!(status, 401, "an expired code still worked: {body}");
    assert_eq!(body["error"]["code"], "bad_enrolment_code");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disabled_users_devices_are_cut_off_and_others_keep_syncing() {
    let server = TestServer::spawn().await;
    let (t1, t2) = (
        server.enrol(world::BEN).await,
        server.enrol(world::BEN).await,
    );
    let mut p1 = RawPeer::connect(&server.url_with(&t1), "ben-1").await;
    let mut p2 = RawPeer::connect(&server.url_with(&t2), "ben-2").await;
    let mut amy = RawPeer::connect(&server.url, "amy").await;
    let out = server
        .admin(AdminCommand::UserDisable {
            name: world::BEN.into(),
        })
        .await;
    assert!(out.contains("2 open connection(s) closed"), "{out}");
    for p in [&mut p1, &mut p2] {
        match p.next().await {
            Seen::Msg(Message::Error(e)) => {
                assert!(e.message.contains("disabled"), "{}", e.message)
            }
            other => panic!("expected an error, got {other:?}"),
        }
        assert!(matches!(p.next().await, Seen::Closed(1008, _)));
    }
    assert_eq!(
        refused_with_401(&server.url_with(&t1)).await,
        "account_disabled"
    );
    // amy's connection is untouched.
    let missing = DocumentId::random();
    amy.request(missing).await;
    assert!(matches!(
        amy.next().await,
        Seen::Msg(Message::DocUnavailable(_))
    ));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_and_wrong_tokens_get_401_json_before_any_upgrade() {
    let server = TestServer::spawn().await;
    assert_eq!(refused_with_401(&server.sync_base).await, "unauthenticated");
    assert_eq!(
        refused_with_401(&server.url_with("fsd_0000")).await,
        "invalid_token"
    );
    assert_eq!(
        refused_with_401(&server.url_with("not-a-token")).await,
        "invalid_token"
    );
    // A healthy device keeps syncing.
    let dir = tempfile::tempdir().unwrap();
    let amy = device(&server, &dir, "amy", world::AMY).await;
    amy.create_household(&household("1")).await.unwrap();
    assert!(amy.sync(&server.sync_base).await.unwrap().all_held());
    // The same refusal reaches the client library as a clear error.
    let stranger = Device::open(&dir.path().join("stranger")).await.unwrap();
    match stranger.sync(&server.sync_base).await {
        Err(ClientError::Refused {
            status: 401,
            message,
        }) => {
            assert!(message.contains("no credentials"), "{message}")
        }
        other => panic!("expected a 401 refusal, got {other:?}"),
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_device_of_another_officer_finds_a_new_household_in_the_village_catalog() {
    let server = TestServer::spawn().await;
    let dir = tempfile::tempdir().unwrap();
    let amy = device(&server, &dir, "amy", world::AMY).await;
    let id = amy.create_household(&household("21")).await.unwrap();
    assert!(amy.sync(&server.sync_base).await.unwrap().all_held());

    // ben's new phone: enrolled over HTTP, which tracks the village catalogs.
    let ben = Device::open(&dir.path().join("ben")).await.unwrap();
    let code = server.enrolment_code(world::BEN).await;
    let answer = ben
        .enroll(&server.http, &code, "ben's phone")
        .await
        .unwrap();
    let catalog_url = answer["villages"][0]["catalog_url"].as_str().unwrap();
    let catalog_id = DocumentId::parse_url_or_id(catalog_url).unwrap();
    assert!(ben.sync(&server.sync_base).await.unwrap().all_held());
    let catalog = ben.catalog(catalog_id).await.unwrap();
    assert_eq!(catalog.village, world::VILLAGE);
    let entry = catalog
        .households
        .iter()
        .find(|h| h.id == id)
        .expect("the catalog lists amy's new household");
    assert_eq!(
        entry.address_label,
        amy.household(id).await.unwrap().address_label
    );

    ben.track(id).await.unwrap();
    assert!(ben.sync(&server.sync_base).await.unwrap().all_held());
    assert_eq!(ben.heads(id).await.unwrap(), amy.heads(id).await.unwrap());

    // Devices may read their catalog but not write it.
    let mut peer = RawPeer::connect(&server.url_for(world::BEN).await, "ben-raw").await;
    let mut forged = automerge::Automerge::new();
    let mut tx = forged.transaction();
    tx.put(automerge::ROOT, "type", "catalog").unwrap();
    tx.commit();
    let data = forged
        .generate_sync_message(&mut automerge::sync::State::new())
        .unwrap()
        .encode();
    peer.send(&Message::Sync(DocMessage {
        sender_id: peer.me.clone(),
        target_id: peer.server.clone(),
        document_id: catalog_id,
        data,
    }))
    .await;
    let _ = peer.next().await; // the server's answer (its own changes), not an ack of ours
    let check = Device::open(&dir.path().join("check")).await.unwrap();
    check
        .set_token(&server.enrol(world::AMY).await)
        .await
        .unwrap();
    check.track(catalog_id).await.unwrap();
    assert!(check.sync(&server.sync_base).await.unwrap().all_held());
    let heads = check.heads(catalog_id).await.unwrap();
    let forged_heads = forged.get_heads();
    assert!(heads.iter().all(|h| !forged_heads.contains(h)));
    assert_eq!(check.catalog(catalog_id).await.unwrap().households.len(), 1);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_accepted_change_has_a_provenance_row_naming_its_device_and_server_time() {
    let server = TestServer::spawn().await;
    let dir = tempfile::tempdir().unwrap();
    let amy = device(&server, &dir, "amy", world::AMY).await;
    let ben = device(&server, &dir, "ben", world::BEN).await;
    let before = Timestamp::now();
    let id = amy.create_household(&household("30")).await.unwrap();
    amy.change(id, |tx| {
        records::add_visit(tx, &visit("amy", "first visit"))
    })
    .await
    .unwrap();
    assert!(amy.sync(&server.sync_base).await.unwrap().all_held());
    ben.track(id).await.unwrap();
    assert!(ben.sync(&server.sync_base).await.unwrap().all_held());
    ben.change(id, |tx| {
        records::add_visit(tx, &visit("ben", "second visit"))
    })
    .await
    .unwrap();
    assert!(ben.sync(&server.sync_base).await.unwrap().all_held());
    let after = Timestamp::now();

    let devices = server.services.accounts.with_directory(|d| {
        let of = |u: &str| {
            d.devices_of(&u.parse().unwrap())
                .into_iter()
                .map(|d| d.id.clone())
                .collect::<Vec<_>>()
        };
        (of(world::AMY), of(world::BEN))
    });
    let rows = server.services.changelog.provenance(id).await.unwrap();
    let all_changes = ben
        .read(id, |d| {
            d.get_changes(&[])
                .iter()
                .map(|c| (hex::encode(c.hash().0), c.actor_id().to_hex_string()))
                .collect::<Vec<_>>()
        })
        .await
        .unwrap();
    assert_eq!(rows.len(), all_changes.len(), "one row per change");
    for (hash, actor) in &all_changes {
        let row = rows
            .iter()
            .find(|r| &r.hash == hash)
            .expect("a row per change");
        assert_eq!(&row.actor, actor);
        assert!(row.received_at >= before && row.received_at <= after);
        assert!(!row.flagged);
        let device = row.device.clone().unwrap();
        if row.user.as_str() == world::AMY {
            assert!(devices.0.contains(&device));
        } else {
            assert_eq!(row.user.as_str(), world::BEN);
            assert!(devices.1.contains(&device));
        }
    }
    assert!(rows.windows(2).all(|w| w[0].seq < w[1].seq));
    assert_eq!(
        rows.iter()
            .filter(|r| r.user.as_str() == world::BEN)
            .count(),
        1
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_commands_refuse_bad_input_with_what_to_do() {
    let server = TestServer::spawn().await;
    let a = &server.services.accounts;
    let h = &server.services.hub;
    let err = |r: Result<String, AccountsError>| r.unwrap_err().to_string();
    let e = err(a
        .admin(
            h,
            AdminCommand::VillageAdd {
                station: "Nowhere".into(),
                village: "X".into(),
            },
            "t",
        )
        .await);
    assert!(e.contains("station add"), "{e}");
    let e = err(a
        .admin(
            h,
            AdminCommand::UserAdd {
                name: "zed".into(),
                role: fieldsync::auth::Role::Staff,
                station: world::STATION.into(),
                villages: vec![],
                password_hash: None,
            },
            "t",
        )
        .await);
    assert!(e.contains("--password-stdin"), "{e}");
    let e = err(a
        .admin(
            h,
            AdminCommand::DeviceRevoke {
                device: "dev-0000000000000000".into(),
            },
            "t",
        )
        .await);
    assert!(e.contains("device list"), "{e}");
    let audit = server.admin(AdminCommand::Audit { limit: 100 }).await;
    assert!(audit.contains("station add"), "{audit}");
    assert!(audit.contains("device enroll"), "{audit}");
    server.stop().await;
}

/// The real binary and the real CLI: `fieldsync admin device revoke` on a running server
/// closes the device's open WebSocket at once and its token is refused from then on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_a_device_through_the_cli_closes_its_socket_and_refuses_its_token() {
    use crate::common::{admin_cli, world_via_cli, ServerProcess};
    let dir = tempfile::tempdir().unwrap();
    let station = crate::common::StationData::new(dir.path()).await;
    let data = station.data.clone();
    world_via_cli(&data).await;
    let server = ServerProcess::start(&data).await;
    let token = server.enrol(world::AMY).await;
    let other = server.enrol(world::BEN).await;
    let mut peer = RawPeer::connect(&server.url_with(&token), "amy").await;
    let mut bystander = RawPeer::connect(&server.url_with(&other), "ben").await;

    let list = admin_cli(&data, &["device", "list"], None).await;
    let device = list
        .lines()
        .find(|l| l.contains("\tamy\t"))
        .and_then(|l| l.split('\t').next())
        .expect("amy's device is listed")
        .to_string();
    let out = admin_cli(&data, &["device", "revoke", &device], None).await;
    assert!(out.contains("1 open connection(s) closed"), "{out}");
    match peer.next().await {
        Seen::Msg(Message::Error(e)) => assert!(e.message.contains("revoked"), "{}", e.message),
        other => panic!("expected an error, got {other:?}"),
    }
    assert!(matches!(peer.next().await, Seen::Closed(1008, _)));
    assert_eq!(
        refused_with_401(&server.url_with(&token)).await,
        "device_revoked"
    );
    let list = admin_cli(&data, &["device", "list"], None).await;
    assert!(
        list.lines()
            .any(|l| l.starts_with(&device) && l.ends_with("revoked")),
        "{list}"
    );
    // Everyone else is still served.
    bystander.request(DocumentId::random()).await;
    assert!(matches!(
        bystander.next().await,
        Seen::Msg(Message::DocUnavailable(_))
    ));
    let audit = admin_cli(&data, &["audit"], None).await;
    assert!(
        audit.contains(&format!("device revoke\tdevice={device}")),
        "{audit}"
    );
    server.kill().await;
}

/// Passwords, tokens, session cookies and enrolment codes never reach the logs (at debug
/// level) or the data directory in clear.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_never_appear_in_logs_or_in_the_store() {
    use crate::common::{world_via_cli, ServerProcess, WAIT};
    use tokio::io::AsyncReadExt;
    let dir = tempfile::tempdir().unwrap();
    let station = crate::common::StationData::new(dir.path()).await;
    let data = station.data.clone();
    world_via_cli(&data).await;
    let mut server =
        ServerProcess::start_logging(&data, "debug", std::process::Stdio::piped()).await;
    let (base, http_base) = (server.url.clone(), server.http());
    let (code, token) = server.enrol_showing_code(world::AMY).await;
    // Sync with the token in the URL (logged requests must not carry it).
    let phone = Device::open(&dir.path().join("phone")).await.unwrap();
    phone.create_household(&household("2")).await.unwrap();
    assert!(phone
        .sync(&format!("{base}?token={token}"))
        .await
        .unwrap()
        .all_held());
    // A wrong and a right password; then sign out.
    let session = format!("{http_base}/api/v1/session");
    let (status, _, _) = http(
        "POST",
        &session,
        Some(serde_json::json!({"name": world::SUE, "password": "wrong password!"})),
        &[],
    )
    .await;
    assert_eq!(status, 401);
    let (status, body, cookie) = http(
        "POST",
        &session,
        Some(serde_json::json!({"name": world::SUE, "password": world::SUE_PASSWORD})),
        &[],
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let cookie = cookie.unwrap();
    let session_token = cookie
        .split(';')
        .next()
        .unwrap()
        .trim_start_matches("fieldsync_session=")
        .to_string();
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    let csrf = body["csrf_token"].as_str().unwrap().to_string();
    let cookie_header = format!("fieldsync_session={session_token}");
    let (status, _, _) = http(
        "DELETE",
        &session,
        None,
        &[("cookie", &cookie_header), ("x-csrf-token", &csrf)],
    )
    .await;
    assert_eq!(status, 200);

    // Stop the server (SIGTERM) so everything is flushed, then look everywhere.
    let pid = server.child.id().unwrap().to_string();
    std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    let mut stderr = String::new();
    server
        .child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .await
        .unwrap();
    tokio::time::timeout(WAIT, server.child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(
        stderr.contains("device enrolled"),
        "debug logs were captured: {stderr}"
    );

    let secrets = [
        token.as_str(),
        &token[4..],
        session_token.as_str(),
        world::SUE_PASSWORD,
        code.as_str(),
        &code.replace('-', ""),
        csrf.as_str(),
    ];
    for s in secrets {
        assert!(!stderr.contains(s), "a secret is in the logs");
    }
    // The data directory, and on PostgreSQL the cluster's files (tables and WAL).
    let mut files = vec![data.clone(), dir.path().join("pg")];
    let mut scanned = 0;
    while let Some(p) = files.pop() {
        if p.is_dir() {
            files.extend(std::fs::read_dir(&p).unwrap().map(|e| e.unwrap().path()));
        } else if let Ok(bytes) = std::fs::read(&p) {
            scanned += bytes.len();
            for s in secrets {
                assert!(
                    !bytes.windows(s.len()).any(|w| w == s.as_bytes()),
                    "a secret is stored in clear in {}",
                    p.display()
                );
            }
        }
    }
    assert!(scanned > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn me_tells_each_caller_their_scope_and_catalogs() {
    let server = TestServer::spawn().await;
    let me = format!("{}/api/v1/me", server.http);
    let token = server.enrol(world::AMY).await;
    let auth = format!("Bearer {token}");
    let (status, body, _) = http("GET", &me, None, &[("authorization", &auth)]).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["user"], world::AMY);
    assert_eq!(body["role"], "officer");
    assert_eq!(body["station"], world::STATION);
    let villages = body["villages"].as_array().unwrap();
    assert_eq!(villages.len(), 1, "only the assigned village: {body}");
    assert_eq!(villages[0]["name"], world::VILLAGE);
    assert!(villages[0]["catalog_url"]
        .as_str()
        .unwrap()
        .starts_with("automerge:"));
    assert_eq!(body["device"]["name"], "amy's phone");

    // Staff see every village of their station, and only theirs.
    let (status, body, cookie) = http(
        "POST",
        &format!("{}/api/v1/session", server.http),
        Some(serde_json::json!({"name": world::SUE, "password": world::SUE_PASSWORD})),
        &[],
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let cookie = cookie.unwrap().split(';').next().unwrap().to_string();
    let (status, body, _) = http("GET", &me, None, &[("cookie", &cookie)]).await;
    assert_eq!(status, 200);
    let mut names: Vec<&str> = body["villages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, vec![world::OTHER_VILLAGE, world::VILLAGE]);

    let (status, body, _) = http("GET", &me, None, &[]).await;
    assert_eq!(status, 401);
    assert_eq!(body["error"]["code"], "unauthenticated");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signing_out_needs_the_csrf_token_and_ends_the_session() {
    // A clock that does not move: the sign-in throttle's delays cannot run out mid-test.
    let clock = Arc::new(ManualClock::new(Timestamp::from_millis(1_790_000_000_000)));
    let server = TestServer::spawn_with_clock(|_| {}, clock).await;
    let session = format!("{}/api/v1/session", server.http);
    let me = format!("{}/api/v1/me", server.http);
    let (status, body, cookie) = http(
        "POST",
        &session,
        Some(serde_json::json!({"name": world::SUE, "password": world::SUE_PASSWORD})),
        &[],
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let set_cookie = cookie.unwrap();
    for attr in ["HttpOnly", "SameSite=Strict", "Path=/"] {
        assert!(set_cookie.contains(attr), "{set_cookie}");
    }
    let cookie = set_cookie.split(';').next().unwrap().to_string();
    let csrf = body["csrf_token"].as_str().unwrap().to_string();

    for headers in [
        vec![("cookie", cookie.as_str())],
        vec![
            ("cookie", cookie.as_str()),
            ("x-csrf-token", "0123456789abcdef0123456789abcdef"),
        ],
    ] {
        let (status, body, _) = http("DELETE", &session, None, &headers).await;
        assert_eq!(status, 403, "{body}");
        assert_eq!(body["error"]["code"], "forbidden");
    }
    let (status, _, _) = http("GET", &me, None, &[("cookie", &cookie)]).await;
    assert_eq!(status, 200, "a refused sign-out leaves the session alone");

    let (status, _, cleared) = http(
        "DELETE",
        &session,
        None,
        &[("cookie", &cookie), ("x-csrf-token", &csrf)],
    )
    .await;
    assert_eq!(status, 200);
    assert!(cleared.unwrap().contains("Max-Age=0"));
    let (status, body, _) = http("GET", &me, None, &[("cookie", &cookie)]).await;
    assert_eq!(status, 401);
    assert_eq!(body["error"]["code"], "invalid_token");

    // Officers have no password; wrong passwords are slowed down (429 with Retry-After).
    let (status, _, _) = http(
        "POST",
        &session,
        Some(serde_json::json!({"name": world::AMY, "password": "whatever it is"})),
        &[],
    )
    .await;
    assert_eq!(status, 401);
    let mut last = 0;
    for _ in 0..7 {
        let (status, _, _) = http(
            "POST",
            &session,
            Some(serde_json::json!({"name": world::SUE, "password": "not her password"})),
            &[],
        )
        .await;
        last = status;
    }
    assert_eq!(last, 429);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_data_directory_says_how_to_create_the_first_admin() {
    use tokio::io::AsyncBufReadExt;
    let dir = tempfile::tempdir().unwrap();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_fieldsync"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data"])
        .arg(dir.path().join("fresh"))
        .env("FIELDSYNC_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let mut text = String::new();
    for _ in 0..4 {
        let line = tokio::time::timeout(crate::common::WAIT, lines.next_line())
            .await
            .unwrap()
            .unwrap()
            .unwrap_or_default();
        text.push_str(&line);
        text.push('\n');
    }
    assert!(text.contains("no admin account yet"), "{text}");
    assert!(text.contains("admin --data"), "{text}");
    assert!(text.contains("--role admin"), "{text}");
    child.kill().await.unwrap();
}
