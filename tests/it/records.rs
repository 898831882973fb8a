//! The staff API over merged records, with real devices syncing over loopback and a staff
//! member signed in with a password: merged visits and conflicting values with their
//! authors, reviews that notice later changes, follow-ups that travel to a device and back,
//! quarantine, filters, paging, history, the change feed, coverage and the CSV export.

use fieldsync::client::Device;
use fieldsync::ids::DocumentId;
use fieldsync::records::{self, FollowUpStatus, MatterKind, Premises, Risk};
use serde_json::{json, Value};

/// A visit id (entry keys are UUIDs).
const V1: &str = "0c5f2b1e-0000-4000-8000-00000000000a";

use crate::common::world::{AMY, BEN, CAT, SUE, SUE_PASSWORD};
use crate::common::{
    fetching_device, household, household_with_member, http, visit, visit_with_complaint,
    visit_with_new_phone, StaffSession, TestServer,
};

fn users(values: &Value) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = values
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            (
                v["value"].as_str().unwrap_or_default().to_string(),
                v["author"]["user"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_officers_offline_and_a_staff_correction_merge_with_every_author() {
    let server = TestServer::spawn().await;
    let dir = tempfile::tempdir().unwrap();
    let amy = Device::open(&dir.path().join("amy")).await.unwrap();
    let (id, member) = household_with_member(&amy, &server.url, "12").await;
    let ben_url = server.url_for(BEN).await;
    let ben = fetching_device(&dir.path().join("ben"), &ben_url, id).await;
    let sue = StaffSession::sign_in(&server.http, SUE, SUE_PASSWORD).await;

    // Offline: amy records a visit and a complaint; ben a visit and a new phone number;
    // meanwhile staff correct the phone to a third number through the API.
    amy.change(id, |tx| {
        visit_with_complaint(tx, AMY, "Complains about scooters racing at night.")
    })
    .await
    .unwrap();
    visit_with_new_phone(&ben, id, &member, BEN, "0922-222-333").await;
    let (status, body) = sue
        .send(
            "PATCH",
            &format!("/households/{id}/members/{member}"),
            json!({"field": "phone", "value": "0933-333-444"}),
        )
        .await;
    assert_eq!(status, 200, "{body}");

    assert!(amy.sync(&server.url).await.unwrap().all_held());
    assert!(ben.sync(&ben_url).await.unwrap().all_held());

    let d = sue.get_ok(&format!("/households/{id}")).await;
    // Both visits, each attributed to the account whose device delivered it.
    let mut visit_authors: Vec<&str> = d["visits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["created_by"]["user"].as_str().unwrap())
        .collect();
    visit_authors.sort();
    assert_eq!(visit_authors, vec![AMY, BEN]);
    for v in d["visits"].as_array().unwrap() {
        assert!(v["created_by"]["device"]
            .as_str()
            .unwrap()
            .starts_with("dev-"));
        assert!(v["created_by"]["received_at_ms"].as_i64().unwrap() > 0);
        assert!(
            v["value"]["started_at"].as_i64().is_some(),
            "device time kept: {v}"
        );
    }
    // The complaint.
    let matters = d["matters"].as_array().unwrap();
    assert_eq!(matters.len(), 1);
    assert_eq!(matters[0]["value"]["kind"], "complaint");
    assert_eq!(
        matters[0]["value"]["description"],
        "Scooters race on Linsen S. Rd after midnight."
    );
    assert_eq!(matters[0]["created_by"]["user"], AMY);
    // The phone: both concurrent values, each with its author (staff edits have no device).
    let path = format!("members.{member}.phone");
    let conflict = d["conflicts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["path"] == path.as_str())
        .unwrap_or_else(|| panic!("no conflict at {path}: {}", d["conflicts"]));
    assert_eq!(
        users(&conflict["values"]),
        vec![
            ("0922-222-333".to_string(), BEN.to_string()),
            ("0933-333-444".to_string(), SUE.to_string()),
        ]
    );
    let by_sue = conflict["values"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["author"]["user"] == SUE)
        .unwrap();
    assert_eq!(by_sue["author"]["device"], Value::Null);

    // The list shows the household with its counts; the history names each change's author.
    let list = sue.get_ok("/households").await;
    let row = &list["households"][0];
    assert_eq!(row["id"], id.to_string());
    assert_eq!(row["visit_count"], 2);
    assert_eq!(row["open_matters"]["complaint"], 1);
    assert_eq!(row["conflicts"], 1);
    let history = sue.get_ok(&format!("/households/{id}/history")).await;
    let changes = history["changes"].as_array().unwrap();
    assert!(changes.iter().any(|c| c["author"]["user"] == SUE
        && c["fields"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| *f == path.as_str())));
    assert!(changes.iter().any(|c| c["author"]["user"] == BEN
        && c["fields"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| *f == path.as_str())));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_arriving_after_approval_is_flagged_with_its_fields() {
    let server = TestServer::spawn().await;
    let dir = tempfile::tempdir().unwrap();
    let amy = Device::open(&dir.path().join("amy")).await.unwrap();
    let (id, _) = household_with_member(&amy, &server.url, "7").await;
    let ben_url = server.url_for(BEN).await;
    let ben = fetching_device(&dir.path().join("ben"), &ben_url, id).await;
    // Ben edits offline before the approval...
    ben.change(id, |tx| records::set_premises(tx, Premises::Shop))
        .await
        .unwrap();

    let sue = StaffSession::sign_in(&server.http, SUE, SUE_PASSWORD).await;
    let (status, d) = sue
        .send(
            "POST",
            &format!("/households/{id}/review"),
            json!({"state": "approved", "comment": "Checked with the neighbourhood chief."}),
        )
        .await;
    assert_eq!(status, 200, "{d}");
    assert_eq!(d["review"]["state"], "approved");
    assert_eq!(d["review"]["by"], SUE);
    assert_eq!(d["review"]["changed_since_approval"], false);
    assert_eq!(
        d["review"]["comments"][0]["text"],
        "Checked with the neighbourhood chief."
    );
    let approved = sue.get_ok("/households?review=approved").await;
    assert_eq!(approved["total"], 1);

    // ...and it arrives after it.
    assert!(ben.sync(&ben_url).await.unwrap().all_held());
    let d = sue.get_ok(&format!("/households/{id}")).await;
    assert_eq!(d["review"]["state"], "approved");
    assert_eq!(
        d["review"]["changed_since_approval"], true,
        "{}",
        d["review"]
    );
    assert_eq!(d["review"]["changed_fields"], json!(["premises"]));
    let stale = sue
        .get_ok("/households?review=changed_since_approval")
        .await;
    assert_eq!(stale["households"][0]["id"], id.to_string());
    assert_eq!(stale["households"][0]["changed_since_approval"], true);

    // The review reached the officers' devices like any change.
    assert!(amy.sync(&server.url).await.unwrap().all_held());
    let state = amy
        .read(id, |doc| {
            use automerge::ReadDoc;
            let (_, review) = doc.get(automerge::ROOT, "review").unwrap().unwrap();
            doc.get(&review, "state").unwrap().unwrap().0.to_string()
        })
        .await
        .unwrap();
    assert_eq!(state, "\"approved\"");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_staff_follow_up_reaches_the_officer_who_closes_it_offline() {
    let server = TestServer::spawn().await;
    let dir = tempfile::tempdir().unwrap();
    let amy = Device::open(&dir.path().join("amy")).await.unwrap();
    let (id, _) = household_with_member(&amy, &server.url, "3").await;
    let sue = StaffSession::sign_in(&server.http, SUE, SUE_PASSWORD).await;

    // Owners must be officers of the household's village.
    let (status, body) = sue
        .send(
            "POST",
            &format!("/households/{id}/follow-ups"),
            json!({"task": "Check the street light", "owner": CAT, "due_ms": 1}),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("not an active officer"));

    let due = fieldsync::ids::Timestamp::now().as_millis() as i64 + 3 * 86_400_000;
    let (status, body) = sue
        .send(
            "POST",
            &format!("/households/{id}/follow-ups"),
            json!({"task": "Bring the anti-fraud leaflet to the grandmother", "owner": AMY, "due_ms": due}),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let fid = body["id"].as_str().unwrap().to_string();

    // It reaches amy's phone at the next sync; she closes it offline, then syncs.
    assert!(amy.sync(&server.url).await.unwrap().all_held());
    let on_phone = amy
        .read(id, {
            let fid = fid.clone();
            move |doc| {
                use automerge::ReadDoc;
                let (_, fus) = doc.get(automerge::ROOT, "follow_ups").unwrap().unwrap();
                let (_, fu) = doc.get(&fus, fid.as_str()).unwrap().unwrap();
                let task = doc.get(&fu, "task").unwrap().unwrap().0.to_string();
                let owner = doc.get(&fu, "owner").unwrap().unwrap().0.to_string();
                (task, owner)
            }
        })
        .await
        .unwrap();
    assert_eq!(
        on_phone,
        (
            "\"Bring the anti-fraud leaflet to the grandmother\"".to_string(),
            format!("\"{AMY}\"")
        )
    );
    let todo = sue.get_ok("/households?follow_up_status=todo").await;
    assert_eq!(todo["total"], 1);
    amy.change(id, {
        let fid = fid.clone();
        move |tx| {
            records::update_follow_up(
                tx,
                &fid,
                &records::FollowUpUpdate {
                    status: Some(FollowUpStatus::Done),
                    note: Some("Delivered; she will call 165 if in doubt.".into()),
                    ..Default::default()
                },
            )
        }
    })
    .await
    .unwrap();
    assert!(amy.sync(&server.url).await.unwrap().all_held());

    let d = sue.get_ok(&format!("/households/{id}")).await;
    let fu = &d["follow_ups"][0];
    assert_eq!(fu["id"], fid.as_str());
    assert_eq!(fu["value"]["status"], "done");
    assert_eq!(fu["set_by"]["status"]["user"], AMY, "{fu}");
    assert!(fu["set_by"]["status"]["device"]
        .as_str()
        .unwrap()
        .starts_with("dev-"));
    assert_eq!(fu["created_by"]["user"], SUE);
    assert_eq!(
        sue.get_ok("/households?follow_up_status=todo").await["total"],
        0
    );
    assert_eq!(
        sue.get_ok("/households?follow_up_status=done").await["total"],
        1
    );

    // Staff can reschedule and reassign too; a follow-up that does not exist is a 404.
    let (status, _) = sue
        .send(
            "PATCH",
            &format!("/households/{id}/follow-ups/{fid}"),
            json!({"status": "todo", "due_ms": due + 86_400_000}),
        )
        .await;
    assert_eq!(status, 200);
    let (status, body) = sue
        .send(
            "PATCH",
            &format!("/households/{id}/follow-ups/no-such-id"),
            json!({"status": "done"}),
        )
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (404, Some("not_found"))
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_household_that_breaks_the_schema_is_kept_but_quarantined() {
    let server = TestServer::spawn().await;
    let dir = tempfile::tempdir().unwrap();
    let amy = Device::open(&dir.path().join("amy")).await.unwrap();
    let (good, _) = household_with_member(&amy, &server.url, "1").await;
    // A buggy app writes a visit with an unknown outcome and a score of 9.
    let bad = amy.create_household(&household("2")).await.unwrap();
    amy.edit(bad, |doc| {
        use automerge::transaction::Transactable;
        use automerge::ReadDoc;
        doc.transact(|tx| {
            let (_, visits) = tx.get(automerge::ROOT, "visits")?.unwrap();
            let v = tx.put_object(&visits, V1, automerge::ObjType::Map)?;
            tx.put(&v, "officer", AMY)?;
            tx.put(
                &v,
                "started_at",
                automerge::ScalarValue::Timestamp(1_790_000_000_000),
            )?;
            tx.put(&v, "outcome", "partyy")?;
            tx.put(&v, "mode", "in_home")?;
            tx.put(&v, "notes", "The resident's words must survive the bug.")?;
            tx.put(&v, "security_score", 9)?;
            Ok::<_, automerge::AutomergeError>(())
        })
        .map_err(|f| fieldsync::client::ClientError::Record(f.error.into()))?;
        Ok(())
    })
    .await
    .unwrap();
    assert!(amy.sync(&server.url).await.unwrap().all_held());

    let sue = StaffSession::sign_in(&server.http, SUE, SUE_PASSWORD).await;
    let list = sue.get_ok("/households").await;
    assert_eq!(list["total"], 1);
    assert_eq!(list["households"][0]["id"], good.to_string());
    let q = sue.get_ok("/households?quarantined=true").await;
    assert_eq!(q["total"], 1);
    assert_eq!(q["households"][0]["id"], bad.to_string());
    let reasons: Vec<&str> = q["households"][0]["quarantine"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap())
        .collect();
    assert!(
        reasons.iter().any(|r| r.starts_with(&format!(
            "visits.{V1}.outcome: \"partyy\" is not one of met"
        ))),
        "{reasons:?}"
    );
    assert!(
        reasons
            .iter()
            .any(|r| r.starts_with(&format!("visits.{V1}.security_score"))),
        "{reasons:?}"
    );
    // Counted apart, and its words are all there.
    let cov = sue.get_ok("/coverage").await;
    let linsen = cov["villages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["village"] == "Linsen")
        .unwrap();
    assert_eq!(
        (
            linsen["households"].as_i64(),
            linsen["quarantined"].as_i64()
        ),
        (Some(1), Some(1))
    );
    let d = sue.get_ok(&format!("/households/{bad}")).await;
    assert_eq!(
        d["value"]["visits"][V1]["notes"],
        "The resident's words must survive the bug."
    );
    assert!(!d["quarantine"].as_array().unwrap().is_empty());
    let csv = sue.get_text("/export.csv").await.1;
    assert!(
        !csv.contains("survive the bug"),
        "quarantined households stay out of exports"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lists_filter_page_and_export_only_what_the_caller_may_see() {
    let server = TestServer::spawn().await;
    let dir = tempfile::tempdir().unwrap();
    let amy = Device::open(&dir.path().join("amy")).await.unwrap();
    let mut ids = Vec::new();
    for n in 1..=5 {
        let id = amy
            .create_household(&household(&n.to_string()))
            .await
            .unwrap();
        amy.change(id, move |tx| {
            let notes = if n == 3 {
                "Resident asks about <b>fraud</b> calls, \"urgent\"; =HYPERLINK()".to_string()
            } else {
                format!("Routine visit {n}.")
            };
            let v = records::add_visit(tx, &visit(AMY, &notes))?;
            if n % 2 == 1 {
                records::add_matter(
                    tx,
                    &records::NewMatter {
                        visit: v,
                        kind: if n == 1 {
                            MatterKind::Tip
                        } else {
                            MatterKind::Dispute
                        },
                        description: "Parking dispute".into(),
                        risk: Risk::Blue,
                        confidential: n == 1,
                    },
                )?;
            }
            Ok(())
        })
        .await
        .unwrap();
        ids.push(id);
    }
    assert!(amy.sync(&server.url).await.unwrap().all_held());
    let sue = StaffSession::sign_in(&server.http, SUE, SUE_PASSWORD).await;

    // Filters.
    assert_eq!(
        sue.get_ok("/households?matter_kind=dispute").await["total"],
        2
    );
    assert_eq!(sue.get_ok("/households?matter_kind=tip").await["total"], 1);
    assert_eq!(
        sue.get_ok("/households?q=FRAUD").await["households"][0]["id"],
        ids[2].to_string()
    );
    assert_eq!(sue.get_ok("/households?village=Dongmen").await["total"], 0);
    assert_eq!(
        sue.get_ok(&format!("/households?officer={AMY}")).await["total"],
        5
    );
    assert_eq!(sue.get_ok("/households?overdue=true").await["total"], 0);
    let (status, body) = sue.get("/households?matter_kind=robbery").await;
    assert_eq!(status, 400);
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("consultation | complaint"),
        "{body}"
    );
    let (status, body) = sue.get("/households?vilage=Linsen").await;
    assert_eq!(status, 400);
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("unknown query parameter `vilage`"));

    // Paging: newest first, every household once.
    let mut seen = Vec::new();
    let mut cursor = String::new();
    loop {
        let page = sue.get_ok(&format!("/households?limit=2{cursor}")).await;
        assert_eq!(page["total"], 5);
        for h in page["households"].as_array().unwrap() {
            seen.push(h["id"].as_str().unwrap().to_string());
        }
        match page["next_cursor"].as_str() {
            Some(c) => cursor = format!("&cursor={c}"),
            None => break,
        }
    }
    let mut expected: Vec<String> = ids.iter().map(|i| i.to_string()).collect();
    seen.sort();
    expected.sort();
    assert_eq!(seen, expected);

    // The export: BOM, header, one row per visit, quoting, formulas defused, no tip text.
    let (status, csv, kind) = sue.get_text("/export.csv?matter_status=open").await;
    assert_eq!(status, 200);
    assert_eq!(kind, "text/csv; charset=utf-8");
    assert!(csv.starts_with("\u{feff}household_id,village,address,"));
    let lines: Vec<&str> = csv.trim_end().split("\r\n").collect();
    assert_eq!(lines.len(), 1 + 3, "{csv}");
    assert!(
        csv.contains("\"Resident asks about <b>fraud</b> calls, \"\"urgent\"\"; =HYPERLINK()\"")
    );
    let all = sue.get_text("/export.csv").await.1;
    assert_eq!(all.trim_end().split("\r\n").count(), 1 + 5);
    assert!(
        all.contains("\"Resident asks about <b>fraud</b> calls, \"\"urgent\"\"; =HYPERLINK()\"")
    );

    // The change feed pages through every change in server order.
    let feed = sue.get_ok("/changes?after=0&limit=3").await;
    let first = feed["changes"].as_array().unwrap();
    assert_eq!(first.len(), 3);
    assert_eq!(first[0]["officer"], AMY);
    assert!(first[0]["device"].as_str().unwrap().starts_with("dev-"));
    let next = feed["next"].as_u64().unwrap();
    let rest = sue
        .get_ok(&format!("/changes?after={next}&limit=1000"))
        .await;
    let total = 3 + rest["changes"].as_array().unwrap().len();
    assert_eq!(total, 10, "two changes per household (create, visit)");
    assert!(rest["changes"][0]["seq"].as_u64().unwrap() > next);

    // Coverage: Linsen has 5 households, all visited recently.
    let cov = sue.get_ok("/coverage?days=30").await;
    let linsen = cov["villages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["village"] == "Linsen")
        .unwrap()
        .clone();
    assert_eq!(linsen["households"], 5);
    assert_eq!(linsen["visited_recently"], 5);
    assert_eq!(linsen["never_visited"], 0);
    assert_eq!(linsen["open_matters"], json!({"dispute": 2, "tip": 1}));

    // Officers see their villages through a device token and may not edit through the API;
    // an officer of another village, and anyone without credentials, see nothing.
    let amy_token = server.enrol(AMY).await;
    let bearer = format!("Bearer {amy_token}");
    let (status, body, _) = http(
        "GET",
        &format!("{}/api/v1/households", server.http),
        None,
        &[("authorization", &bearer)],
    )
    .await;
    assert_eq!((status, body["total"].as_u64()), (200, Some(5)));
    let (status, _, _) = http(
        "POST",
        &format!("{}/api/v1/households/{}/review", server.http, ids[0]),
        Some(json!({"state": "approved"})),
        &[("authorization", &bearer)],
    )
    .await;
    assert_eq!(status, 403);
    let cat = format!("Bearer {}", server.enrol(CAT).await);
    let (status, body, _) = http(
        "GET",
        &format!("{}/api/v1/households", server.http),
        None,
        &[("authorization", &cat)],
    )
    .await;
    assert_eq!((status, body["total"].as_u64()), (200, Some(0)));
    let (status, body, _) = http(
        "GET",
        &format!("{}/api/v1/households/{}", server.http, ids[0]),
        None,
        &[("authorization", &cat)],
    )
    .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (404, Some("not_found"))
    );
    let (status, _, _) = http(
        "GET",
        &format!("{}/api/v1/export.csv", server.http),
        None,
        &[],
    )
    .await;
    assert_eq!(status, 401);

    // A browser request without the CSRF token is refused and changes nothing.
    let (status, body, _) = http(
        "POST",
        &format!("{}/api/v1/households/{}/review", server.http, ids[0]),
        Some(json!({"state": "approved"})),
        &[("cookie", &sue.cookie)],
    )
    .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (403, Some("forbidden"))
    );
    assert_eq!(
        sue.get_ok(&format!("/households/{}", ids[0])).await["review"]["state"],
        "received"
    );
    server.stop().await;
}

/// `fieldsync reindex` on the real binary: refused with advice while a server holds the
/// data directory; after the server was SIGKILLed, it rebuilds the projection with progress,
/// and the restarted server lists the same households with the same counts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reindex_command_rebuilds_the_projection_after_a_crash() {
    use crate::common::{world_via_cli, ServerProcess, WAIT};
    let dir = tempfile::tempdir().unwrap();
    let station = crate::common::StationData::new(dir.path()).await;
    let data = station.data.clone();
    world_via_cli(&data).await;
    let server = ServerProcess::start(&data).await;
    let device = Device::open(&dir.path().join("amy")).await.unwrap();
    let url = server.url_with(&server.enrol(AMY).await);
    for n in 1..=3 {
        let id = device
            .create_household(&household(&n.to_string()))
            .await
            .unwrap();
        device
            .change(id, move |tx| {
                records::add_visit(tx, &visit(AMY, &format!("Visit {n}"))).map(|_| ())
            })
            .await
            .unwrap();
    }
    assert!(device.sync(&url).await.unwrap().all_held());
    let sue = StaffSession::sign_in(&server.http(), SUE, SUE_PASSWORD).await;
    let before = sue.get_ok("/households").await;
    let coverage_before = sue.get_ok("/coverage").await;
    assert_eq!(before["total"], 3);

    let reindex = || {
        tokio::process::Command::new(env!("CARGO_BIN_EXE_fieldsync"))
            .args(["reindex", "--data"])
            .arg(&data)
            .args(crate::common::database_args(&data))
            .env("FIELDSYNC_LOG", "warn")
            .kill_on_drop(true)
            .output()
    };
    let busy = tokio::time::timeout(WAIT, reindex())
        .await
        .unwrap()
        .unwrap();
    assert!(!busy.status.success());
    let err = String::from_utf8_lossy(&busy.stderr);
    assert!(
        err.contains("stop it, run reindex, then start it again"),
        "{err}"
    );

    server.kill().await;
    let done = tokio::time::timeout(WAIT, reindex())
        .await
        .unwrap()
        .unwrap();
    let (out, err) = (
        String::from_utf8_lossy(&done.stdout),
        String::from_utf8_lossy(&done.stderr),
    );
    assert!(done.status.success(), "{err}");
    assert!(err.contains("reindexed 3/3 households"), "progress: {err}");
    assert!(
        out.contains("projection rebuilt from 3 households"),
        "{out}"
    );

    let server = ServerProcess::start(&data).await;
    let sue = StaffSession::sign_in(&server.http(), SUE, SUE_PASSWORD).await;
    let after = sue.get_ok("/households").await;
    assert_eq!(after, before);
    assert_eq!(sue.get_ok("/coverage").await, coverage_before);
    server.kill().await;
}

/// A household as it was (issue 15): `?at=` a server receive time gives the merged value,
/// conflicts and review as of then; `?heads=` a point named by its heads; nonsense is
/// refused with a reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_household_is_shown_as_it_was_at_an_earlier_time_or_heads() {
    use fieldsync::ids::{Clock, ManualClock, Timestamp};
    let clock = std::sync::Arc::new(ManualClock::new(Timestamp::from_millis(1_790_000_000_000)));
    let server = TestServer::spawn_with_clock(|_| {}, clock.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let amy = Device::open(&dir.path().join("amy")).await.unwrap();
    let id = amy.create_household(&household("9")).await.unwrap();
    amy.change(id, |tx| {
        records::add_visit(tx, &visit(AMY, "first visit")).map(|_| ())
    })
    .await
    .unwrap();
    assert!(amy.sync(&server.url).await.unwrap().all_held());
    let first_heads = amy.heads(id).await.unwrap();
    let t1 = clock.now().as_millis() as i64;

    clock.advance(std::time::Duration::from_secs(3600));
    let ben_url = server.url_for(BEN).await;
    let ben = fetching_device(&dir.path().join("ben"), &ben_url, id).await;
    ben.change(id, |tx| {
        records::add_visit(tx, &visit(BEN, "second visit")).map(|_| ())
    })
    .await
    .unwrap();
    assert!(ben.sync(&ben_url).await.unwrap().all_held());
    let t2 = clock.now().as_millis() as i64;

    let staff = StaffSession::sign_in(&server.http, SUE, SUE_PASSWORD).await;
    let notes = |d: &Value| -> Vec<String> {
        d["visits"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v["value"]["notes"].as_str().unwrap_or_default().to_string())
            .collect()
    };
    let now = staff.get_ok(&format!("/households/{id}")).await;
    assert!(
        now.get("as_of").is_none(),
        "the current record names no point"
    );
    assert_eq!(notes(&now).len(), 2);

    let then = staff.get_ok(&format!("/households/{id}?at={t1}")).await;
    assert_eq!(notes(&then), vec!["first visit".to_string()]);
    assert_eq!(then["as_of"]["received_by_ms"], t1);
    let mut heads: Vec<String> = first_heads.iter().map(|h| h.to_string()).collect();
    heads.sort();
    let mut shown: Vec<String> = then["as_of"]["heads"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h.as_str().unwrap().to_string())
        .collect();
    shown.sort();
    assert_eq!(shown, heads);
    assert!(then["as_of"]["changes_then"].as_u64() < then["as_of"]["changes_now"].as_u64());

    let later = staff.get_ok(&format!("/households/{id}?at={t2}")).await;
    assert_eq!(notes(&later).len(), 2);

    // Staff approve an hour later: the record as it was before shows no approval.
    clock.advance(std::time::Duration::from_secs(3600));
    let (status, body) = staff
        .send(
            "POST",
            &format!("/households/{id}/review"),
            serde_json::json!({"state": "approved", "comment": "checked"}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let now = staff.get_ok(&format!("/households/{id}")).await;
    assert_eq!(now["review"]["state"], "approved");
    let before = staff.get_ok(&format!("/households/{id}?at={t2}")).await;
    assert_eq!(before["review"]["state"], "received");
    assert_eq!(before["review"]["by"], "", "{}", before["review"]);
    assert_eq!(before["review"]["comments"], serde_json::json!([]));
    let by_heads = staff
        .get_ok(&format!("/households/{id}?heads={}", heads.join(",")))
        .await;
    assert_eq!(notes(&by_heads), vec!["first visit".to_string()]);

    for (query, why) in [
        (format!("at={}", t1 - 86_400_000), "received nothing"),
        (
            format!("heads={}", "ab".repeat(32)),
            "not a change of this household",
        ),
        ("heads=xyz".to_string(), "not a change hash"),
        (format!("at={t1}&heads={}", heads[0]), "not both"),
        ("when=1".to_string(), "unknown query parameter"),
    ] {
        let (status, body) = staff.get(&format!("/households/{id}?{query}")).await;
        assert_eq!(status, 400, "{query}: {body}");
        assert!(
            body["error"]["message"].as_str().unwrap().contains(why),
            "{query}: {body}"
        );
    }
    server.stop().await;
}

/// Two officers register one address written two ways, offline, in one village: the staff
/// list and the detail flag them as likely the same household; the same address in another
/// village, or another number, is not flagged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_registered_twice_is_flagged_in_the_list_and_the_detail() {
    use crate::common::world::{CAT, OTHER_VILLAGE};
    let server = TestServer::spawn().await;
    let dir = tempfile::tempdir().unwrap();
    let at = |street: &str, no: &str, village: &str| {
        let mut h = household(no);
        h.address.street = street.into();
        h.village = village.into();
        h.address.village = village.into();
        h
    };
    let amy = Device::open(&dir.path().join("amy")).await.unwrap();
    let ben = Device::open(&dir.path().join("ben")).await.unwrap();
    let cat = Device::open(&dir.path().join("cat")).await.unwrap();
    let village = crate::common::world::VILLAGE;
    let first = amy
        .create_household(&at("林森南路", "12號", village))
        .await
        .unwrap();
    let other_number = amy
        .create_household(&at("林森南路", "14號", village))
        .await
        .unwrap();
    let second = ben
        .create_household(&at("林森南路 ", "１２ 號", village))
        .await
        .unwrap();
    let elsewhere = cat
        .create_household(&at("林森南路", "12號", OTHER_VILLAGE))
        .await
        .unwrap();
    assert!(amy.sync(&server.url).await.unwrap().all_held());
    assert!(ben
        .sync(&server.url_for(BEN).await)
        .await
        .unwrap()
        .all_held());
    assert!(cat
        .sync(&server.url_for(CAT).await)
        .await
        .unwrap()
        .all_held());

    let staff = StaffSession::sign_in(&server.http, SUE, SUE_PASSWORD).await;
    let list = staff.get_ok("/households").await;
    let flagged: std::collections::BTreeMap<String, Value> = list["households"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| {
            (
                h["id"].as_str().unwrap().to_string(),
                h.get("possible_duplicates").cloned().unwrap_or(Value::Null),
            )
        })
        .collect();
    assert_eq!(flagged[&first.to_string()], json!([second.to_string()]));
    assert_eq!(flagged[&second.to_string()], json!([first.to_string()]));
    assert_eq!(flagged[&other_number.to_string()], Value::Null);
    assert_eq!(flagged[&elsewhere.to_string()], Value::Null);
    let detail = staff.get_ok(&format!("/households/{second}")).await;
    assert_eq!(detail["possible_duplicates"], json!([first.to_string()]));
    let detail = staff.get_ok(&format!("/households/{elsewhere}")).await;
    assert!(detail.get("possible_duplicates").is_none());
    server.stop().await;
}

/// The merge: two officers register "林森南路12號" and "林森南路 12 號" offline in
/// one village. Staff merge them: every visit, member and matter of both is in the survivor
/// with its first author; the retired household leaves the lists and its catalog entry
/// points to the survivor; an officer's offline visit to it that arrives after the merge is
/// kept, staff are told, and merging again copies it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn staff_merge_one_address_registered_twice_and_a_late_visit_is_not_lost() {
    let server = TestServer::spawn().await;
    let dir = tempfile::tempdir().unwrap();
    let at = |street: &str, no: &str| {
        let mut h = household(no);
        h.address.street = street.into();
        h
    };
    let member = |name: &str| records::NewMember {
        name: name.into(),
        relation: "head".into(),
        birth_year: Some(1960),
        phone: String::new(),
    };
    let ben_url = server.url_for(BEN).await;
    let amy = Device::open(&dir.path().join("amy")).await.unwrap();
    let ben = Device::open(&dir.path().join("ben")).await.unwrap();
    let survivor = amy.create_household(&at("林森南路", "12號")).await.unwrap();
    let m = member("王小明");
    amy.change(survivor, move |tx| {
        records::add_member(tx, &m)?;
        visit_with_complaint(tx, AMY, "王先生說夜間機車競速")
    })
    .await
    .unwrap();
    let retired = ben
        .create_household(&at("林森南路 ", "１２ 號"))
        .await
        .unwrap();
    let m = member("王太太");
    ben.change(retired, move |tx| {
        records::add_member(tx, &m)?;
        visit_with_complaint(tx, BEN, "王太太也抱怨噪音")
    })
    .await
    .unwrap();
    assert!(amy.sync(&server.url).await.unwrap().all_held());
    assert!(ben.sync(&ben_url).await.unwrap().all_held());
    // ben's next visit stays on his phone (offline) until after the merge.
    let late = ben
        .change(retired, |tx| {
            records::add_visit(tx, &visit(BEN, "晚到的走訪紀錄"))
        })
        .await
        .unwrap();

    let sue = StaffSession::sign_in(&server.http, SUE, SUE_PASSWORD).await;
    let detail = sue.get_ok(&format!("/households/{survivor}")).await;
    assert_eq!(detail["possible_duplicates"], json!([retired.to_string()]));

    // Refused: into itself, an unknown id, and by an officer.
    let merge_path = format!("/households/{survivor}/merge");
    for (body, status, why) in [
        (json!({"retire": survivor.to_string()}), 400, "itself"),
        (json!({"retire": "nope"}), 400, "not a household id"),
        (
            json!({"retire": DocumentId::random().to_string()}),
            404,
            "no household",
        ),
        (json!({"other": 1}), 400, "unknown field"),
    ] {
        let (got, answer) = sue.send("POST", &merge_path, body.clone()).await;
        assert_eq!(got, status, "{body}: {answer}");
        let message = answer["error"]["message"].as_str().unwrap();
        assert!(message.contains(why), "{body}: {message}");
    }
    let amy_bearer = format!("Bearer {}", server.enrol(AMY).await);
    let (status, _, _) = http(
        "POST",
        &format!("{}/api/v1{merge_path}", server.http),
        Some(json!({"retire": retired.to_string()})),
        &[("authorization", &amy_bearer)],
    )
    .await;
    assert_eq!(status, 403);

    let (status, outcome) = sue
        .send("POST", &merge_path, json!({"retire": retired.to_string()}))
        .await;
    assert_eq!(status, 200, "{outcome}");
    assert_eq!(outcome["merged_before"], json!(false));
    assert_eq!(
        outcome["copied"],
        json!({"members": 1, "visits": 1, "matters": 1, "follow_ups": 0})
    );

    // Every visit, member and matter of both, each with its first author.
    let d = sue.get_ok(&format!("/households/{survivor}")).await;
    let authors = |key: &str| -> Vec<(String, Option<String>)> {
        let mut out: Vec<(String, Option<String>)> = d[key]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                (
                    e["created_by"]["user"].as_str().unwrap().to_string(),
                    e["merged"]["from"].as_str().map(str::to_string),
                )
            })
            .collect();
        out.sort();
        out
    };
    let both = vec![
        (AMY.to_string(), None),
        (BEN.to_string(), Some(retired.to_url())),
    ];
    assert_eq!(authors("visits"), both);
    assert_eq!(authors("members"), both);
    assert_eq!(authors("matters"), both);
    let copied = d["visits"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["created_by"]["user"] == BEN)
        .unwrap();
    assert_eq!(copied["value"]["notes"], "王太太也抱怨噪音");
    assert_eq!(copied["merged"]["by"]["user"], SUE);
    assert!(copied["created_by"]["device"].as_str().is_some());
    assert!(d.get("possible_duplicates").is_none());
    assert_eq!(d["merged_from"][0]["id"], retired.to_string());
    assert_eq!(d["merged_from"][0]["after_merge"], json!([]));

    // The retired household leaves the lists and counts, and stays readable.
    let list = sue.get_ok("/households").await;
    let listed: Vec<&str> = list["households"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["id"].as_str().unwrap())
        .collect();
    assert_eq!(listed, vec![survivor.to_string()]);
    let merged = sue.get_ok("/households?merged=true").await;
    assert_eq!(merged["households"][0]["id"], retired.to_string());
    assert_eq!(
        merged["households"][0]["merged_into"]["into"],
        survivor.to_string()
    );
    let r = sue.get_ok(&format!("/households/{retired}")).await;
    assert_eq!(r["merged_into"]["into"], survivor.to_string());
    assert_eq!(r["merged_into"]["by"], SUE);

    // A new phone of ben's finds the survivor through the retired entry of its catalog.
    let fresh = Device::open(&dir.path().join("ben-new")).await.unwrap();
    let code = server.enrolment_code(BEN).await;
    let answer = fresh
        .enroll(&server.http, &code, "ben's new phone")
        .await
        .unwrap();
    let catalog =
        DocumentId::parse_url_or_id(answer["villages"][0]["catalog_url"].as_str().unwrap())
            .unwrap();
    assert!(fresh.sync(&server.sync_base).await.unwrap().all_held());
    let entries = fresh.catalog(catalog).await.unwrap().households;
    let entry = entries.iter().find(|e| e.id == retired).unwrap();
    assert_eq!(entry.merged_into, Some(survivor.to_url()));
    assert_eq!(
        entries
            .iter()
            .find(|e| e.id == survivor)
            .unwrap()
            .merged_into,
        None
    );

    // ben's offline visit arrives after the merge: kept on the retired household, and staff
    // are told on the survivor, in the counts and in a list.
    assert!(ben.sync(&ben_url).await.unwrap().all_held());
    let path = format!("visits.{late}");
    let r = sue.get_ok(&format!("/households/{retired}")).await;
    assert_eq!(r["after_merge"], json!([path]));
    assert!(r["visits"]
        .as_array()
        .unwrap()
        .iter()
        .any(|v| v["id"] == late.as_str()));
    let d = sue.get_ok(&format!("/households/{survivor}")).await;
    assert_eq!(d["merged_from"][0]["after_merge"], json!([path]));
    let coverage = sue.get_ok("/coverage").await;
    let village = coverage
        .as_array()
        .or_else(|| coverage["villages"].as_array())
        .unwrap()
        .iter()
        .find(|v| v["village"] == crate::common::world::VILLAGE)
        .unwrap()
        .clone();
    assert_eq!(
        (
            village["merged"].as_i64(),
            village["changed_after_merge"].as_i64()
        ),
        (Some(1), Some(1))
    );
    assert_eq!(village["households"].as_i64(), Some(1));
    let told = sue.get_ok("/households?merged=after_merge").await;
    assert_eq!(told["households"][0]["after_merge"], json!([path]));

    // Merging again copies the late visit, and nothing twice.
    let (status, outcome) = sue
        .send("POST", &merge_path, json!({"retire": retired.to_string()}))
        .await;
    assert_eq!(status, 200, "{outcome}");
    assert_eq!(outcome["merged_before"], json!(true));
    assert_eq!(outcome["copied"]["visits"], json!(1));
    assert_eq!(outcome["already_there"], json!(3));
    let d = sue.get_ok(&format!("/households/{survivor}")).await;
    assert_eq!(d["visits"].as_array().unwrap().len(), 3);
    assert_eq!(d["merged_from"][0]["after_merge"], json!([]));
    assert!(
        sue.get_ok("/households?merged=after_merge").await["households"]
            .as_array()
            .unwrap()
            .is_empty()
    );

    // The survivor cannot be merged into the household it absorbed.
    let (status, answer) = sue
        .send(
            "POST",
            &format!("/households/{retired}/merge"),
            json!({"retire": survivor.to_string()}),
        )
        .await;
    assert_eq!(status, 409, "{answer}");
    server.stop().await;
}
