//! `proto-docs/http-api.md` shows real responses: each example there is a file under
//! `tests/fixtures/api/`, and this test checks that (1) the document contains every fixture
//! verbatim and (2) the server's responses today have the same structure (the same keys at
//! every level) as the fixture. `FIELDSYNC_WRITE_FIXTURES=1` rewrites the fixtures from a
//! fresh run (then paste them into the document; the check tells you which).

use std::collections::BTreeMap;
use std::path::PathBuf;

use fieldsync::client::Device;
use serde_json::{json, Value};

use crate::common::world::{AMY, BEN, SUE, SUE_PASSWORD};
use crate::common::{
    fetching_device, household_with_member, visit_with_complaint, visit_with_new_phone,
    StaffSession, TestServer,
};

/// The keys at every level; arrays contribute the union of their elements' keys.
fn shape(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(m.iter().map(|(k, v)| (k.clone(), shape(v))).collect()),
        Value::Array(items) => {
            let mut merged = serde_json::Map::new();
            let mut leaf = false;
            for item in items {
                match shape(item) {
                    Value::Object(m) => {
                        for (k, v) in m {
                            merged.entry(k).or_insert(v);
                        }
                    }
                    _ => leaf = true,
                }
            }
            if merged.is_empty() && leaf {
                json!(["value"])
            } else if merged.is_empty() {
                json!([])
            } else {
                json!([Value::Object(merged)])
            }
        }
        _ => json!("value"),
    }
}

/// Keys named by ids (visits, members, matters, follow-ups, open-matter kinds) differ from
/// run to run: compare them as one generic entry with the keys of them all (entries
/// differ: a member copied by a merge has `merged_from`).
fn generic(v: Value) -> Value {
    match v {
        Value::Object(m) => {
            let id_keyed = !m.is_empty()
                && m.keys()
                    .all(|k| k.len() == 36 && k.chars().filter(|c| *c == '-').count() == 4);
            if id_keyed {
                let all: Vec<Value> = m.into_iter().map(|(_, v)| generic(v)).collect();
                json!({ "<id>": all })
            } else {
                Value::Object(m.into_iter().map(|(k, v)| (k, generic(v))).collect())
            }
        }
        Value::Array(a) => Value::Array(a.into_iter().map(generic).collect()),
        other => other,
    }
}

async fn responses() -> BTreeMap<&'static str, Value> {
    let server = TestServer::spawn().await;
    let dir = tempfile::tempdir().unwrap();
    let amy = Device::open(&dir.path().join("amy")).await.unwrap();
    let (id, member) = household_with_member(&amy, &server.url, "12").await;
    let ben_url = server.url_for(BEN).await;
    let ben = fetching_device(&dir.path().join("ben"), &ben_url, id).await;
    let sue = StaffSession::sign_in(&server.http, SUE, SUE_PASSWORD).await;

    amy.change(id, |tx| {
        visit_with_complaint(tx, AMY, "Complains about scooters racing at night.")
    })
    .await
    .unwrap();
    visit_with_new_phone(&ben, id, &member, BEN, "0922-222-333").await;
    let (_, correction) = sue
        .send(
            "PATCH",
            &format!("/households/{id}/members/{member}"),
            json!({"field": "phone", "value": "0933-333-444"}),
        )
        .await;
    let (_, follow_up) = sue
        .send(
            "POST",
            &format!("/households/{id}/follow-ups"),
            json!({"task": "Ask the council about speed bumps", "owner": AMY, "due_ms": 1_790_600_000_000_i64}),
        )
        .await;
    let (_, review) = sue
        .send(
            "POST",
            &format!("/households/{id}/review"),
            json!({"state": "approved", "comment": "Complaint passed to traffic unit."}),
        )
        .await;
    assert!(amy.sync(&server.url).await.unwrap().all_held());
    assert!(ben.sync(&ben_url).await.unwrap().all_held());

    // ben registered the same address again on his phone, with a member: staff merge it.
    let twice = ben
        .create_household(&crate::common::household("12"))
        .await
        .unwrap();
    ben.change(twice, |tx| {
        fieldsync::records::add_member(
            tx,
            &fieldsync::records::NewMember {
                name: "Lin Chih-hao".into(),
                relation: "tenant".into(),
                birth_year: Some(1988),
                phone: String::new(),
            },
        )
    })
    .await
    .unwrap();
    assert!(ben.sync(&ben_url).await.unwrap().all_held());
    let (_, merge) = sue
        .send(
            "POST",
            &format!("/households/{id}/merge"),
            json!({"retire": twice.to_string()}),
        )
        .await;

    let mut out = BTreeMap::new();
    out.insert("merge", merge);
    out.insert("list", sue.get_ok("/households?limit=1").await);
    out.insert("detail", sue.get_ok(&format!("/households/{id}")).await);
    out.insert(
        "history",
        sue.get_ok(&format!("/households/{id}/history")).await,
    );
    out.insert("review", review);
    out.insert("follow-up-created", follow_up);
    out.insert("updated", correction);
    out.insert("changes", sue.get_ok("/changes?after=0&limit=2").await);
    out.insert("coverage", sue.get_ok("/coverage?days=30").await);
    out.insert("error", sue.get("/households?matter_kind=robbery").await.1);
    server.stop().await;
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_documented_examples_are_real_responses() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/api");
    let doc = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("proto-docs/http-api.md"),
    )
    .unwrap();
    let live = responses().await;
    let write = std::env::var_os("FIELDSYNC_WRITE_FIXTURES").is_some();
    if write {
        std::fs::create_dir_all(&dir).unwrap();
        for (name, body) in &live {
            let text = serde_json::to_string_pretty(body).unwrap() + "\n";
            std::fs::write(dir.join(format!("{name}.json")), text).unwrap();
        }
    }
    for (name, body) in &live {
        let path = dir.join(format!("{name}.json"));
        let text =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let fixture: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(
            shape(&generic(fixture)),
            shape(&generic(body.clone())),
            "the response of `{name}` changed shape; rerun with FIELDSYNC_WRITE_FIXTURES=1 and update proto-docs/http-api.md"
        );
        assert!(
            doc.contains(text.trim_end()),
            "proto-docs/http-api.md does not show tests/fixtures/api/{name}.json verbatim"
        );
    }
}
